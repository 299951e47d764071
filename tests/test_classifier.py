"""Noise-conditional classifiers (models/classifier.py), their loss (sde_lib.losses) and the
train_classifier mode (run_lib/classifier.py); class-conditional / classifier-free guidance
training (config.training.p_uncond)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
import sde_lib
from run_lib import compose, evaluate
from run_lib.classifier import load_classifier, sigma_times, train_classifier
from run_lib.train import drop_labels, train
from run_lib.validate import load_config_file, validate_config

SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(),
        "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)}


# ----------------------------------------------------------------------------- networks

@pytest.mark.parametrize("name, kwargs, shape", [
    ("mlp", dict(data_shape=(2,), num_classes=8), (2,)),
    ("conv", dict(num_channels=1, image_size=8, num_classes=10), (1, 8, 8)),
    ("wideresnet", dict(num_channels=3, image_size=8, num_classes=10, depth=10, widen_factor=1),
     (3, 8, 8)),
])
def test_classifier_shapes_forward_backward(name, kwargs, shape):
    torch.manual_seed(0)
    net = models.build_classifier(name, **kwargs)
    x = torch.randn(5, *shape, requires_grad=True)
    logits = net(x, torch.linspace(-4.0, 4.0, 5))
    assert logits.shape == (5, kwargs["num_classes"]) and logits.dtype == x.dtype
    logits.logsumexp(1).sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the conditioning matters: other noise levels give other logits
    assert not torch.allclose(net(x, torch.zeros(5)), net(x, torch.full((5,), 3.0)))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        net(torch.randn(2, *shape[:-1], shape[-1] + 1), torch.zeros(2))


def test_wideresnet_default_is_wrn_28_10():
    """WRN-28-10: 4 blocks per group, 160 / 320 / 640 channels, and without the noise
    embedding layers the WRN paper's 36.5M weights."""
    net = models.build_classifier("wideresnet")
    assert len(net.blocks) == 12 and net.head.in_features == 640
    count = sum(p.numel() for name, p in net.named_parameters()
                if p.requires_grad and "emb" not in name)
    assert 36.4e6 < count < 36.6e6, count


def test_build_classifier_rejects_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match="valid classifier names: mlp, conv, wideresnet"):
        models.build_classifier("resnet")
    with pytest.raises(ValueError, match="depth must be 6 n \\+ 4"):
        models.build_classifier("wideresnet", depth=12)
    with pytest.raises(TypeError):
        models.build_classifier("mlp", data_shape=(2,), num_classes=3, width=4)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_logits_fn_conditions_on_log_sigma(sde_name):
    """cond = log(std / alpha) from the SDE's marginal coefficients, in x's dtype."""
    sde, seen = SDES[sde_name], []

    def fake(x, cond):
        seen.append(cond)
        return x.new_zeros(x.shape[0], 3)

    t = torch.tensor([1e-3, 0.25, 0.5, 1.0])
    logits = models.get_logits_fn(sde, fake)(torch.zeros(4, 1, 2, 2), t)
    alpha, std = sde.marginal_coeffs(t.double())
    assert logits.shape == (4, 3)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0].double(), torch.log(std / alpha), rtol=1e-6, atol=1e-6)
    if sde_name == "ve":
        torch.testing.assert_close(seen[0].double(), torch.log(sde.sigma(t)), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- the loss

def test_classifier_losses_is_cross_entropy_at_the_perturbed_data():
    """An oracle logits_fn that sees x_t and t: the loss is the cross-entropy at
    x_t = alpha x + std z with the same draws of t and z as sample_time + randn."""
    sde = SDES["vp"]
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    seen = {}

    def logits_fn(xt, t):
        seen["xt"], seen["t"] = xt, t
        return torch.stack([xt[:, 0], xt[:, 1], t], dim=1)

    losses = sde_lib.classifier_losses(logits_fn, sde, x, labels,
                                       generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t, _ = sde_lib.sample_time(sde, 6, generator=g)
    alpha, std = sde.marginal_coeffs(t)
    xt = alpha[:, None] * x + std[:, None] * torch.randn(6, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(seen["xt"], xt)
    logits = torch.stack([xt[:, 0], xt[:, 1], t], dim=1)
    expected = -torch.log_softmax(logits, 1)[torch.arange(6), labels]
    torch.testing.assert_close(losses, expected)
    with pytest.raises(ValueError, match="labels must have shape"):
        sde_lib.classifier_losses(logits_fn, sde, x, labels[:3])
    with pytest.raises(ValueError, match="eps"):
        sde_lib.get_classifier_loss_fn(sde, eps=0.0)


def _bayes(mixture, sde, x, t):
    """The exact posterior p_t(y | x) of the mixture's components at time t: log (B, K)."""
    alpha, std = sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64))
    log_joint, _, _ = mixture._components(x, alpha, std)
    return torch.log_softmax(log_joint, dim=1)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_mlp_classifier_on_the_mixture_reaches_the_bayes_accuracy(sde_name):
    """8-mode mixture, labels = component: after 250 Adam steps the classifier's accuracy and
    cross-entropy on p_t at sigma ~ 1 are within 0.03 / 0.1 nats of the exact posterior's
    (the Bayes classifier: ~0.55 / 1.06 nats, chance 0.125 / 2.08 nats); 4000 test points give
    a binomial std of accuracy ~0.008 (measured: VP 0.01 / 0.03 nats, VE 0.02 / 0.09 nats
    off; VE's inputs up to sigma_max = 50 learn more slowly, 500 steps give 0.03 nats). The
    training loss decreases from log 8 (chance)."""
    torch.manual_seed(0)
    sde, mixture = SDES[sde_name], sde_lib.eight_mode_mixture()
    net = models.build_classifier("mlp", data_shape=(2,), num_classes=8)
    logits_fn = models.get_logits_fn(sde, net)
    loss_fn = sde_lib.get_classifier_loss_fn(sde)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(250):
        x, y = mixture.sample(256, generator=g, return_components=True)
        loss = loss_fn(logits_fn, x, y, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(8) - 0.3 and sum(losses[-20:]) / 20 < losses[0] - 0.5
    t = 0.25 if sde_name == "vp" else 0.55          # sigma ~ 1: the classes overlap
    x, y = mixture.sample_marginal(sde, t, 4000, generator=g, return_components=True)
    posterior = _bayes(mixture, sde, x, t)
    bayes_acc = (posterior.argmax(1) == y).double().mean().item()
    bayes_nll = -posterior[torch.arange(4000), y].mean().item()
    assert 0.4 < bayes_acc < 0.9                    # a point where accuracy is informative
    with torch.no_grad():
        logits = logits_fn(x, torch.full((4000,), t))
    acc = (logits.argmax(1) == y).double().mean().item()
    nll = torch.nn.functional.cross_entropy(logits.double(), y).item()
    assert acc > bayes_acc - 0.03, (acc, bayes_acc)
    assert bayes_nll - 0.01 < nll < bayes_nll + 0.1, (nll, bayes_nll)


# ----------------------------------------------------------------------------- train_classifier

ROOT = Path(__file__).resolve().parents[1]


def toy_config(n_iters=6):
    """The toy mixture's classifier, tiny: 2000 training points, batches of 64."""
    config = load_config_file(str(ROOT / "configs/toy/vp_mixture.py"))
    config.device = "cpu"
    config.data.train_size, config.data.test_size = 2000, 256
    c = config.classifier
    c.hidden_dim, c.n_iters, c.batch_size, c.warmup = 32, n_iters, 64, 2
    c.log_freq, c.snapshot_freq, c.snapshot_freq_for_preemption = 2, 4, 3
    c.eval_freq, c.eval_batches = 3, 2
    return config


def digits_config():
    config = load_config_file(str(ROOT / "configs/vp/ddpm_digits.py"))
    config.device = "cpu"
    c = config.classifier
    c.nf, c.ch_mult, c.n_iters, c.batch_size, c.eval_batches = 8, (1, 2), 2, 16, 1
    return config


def test_train_classifier_resume_is_bitwise(tmp_path):
    """6 steps in one go == 3 steps (latest.pt at 3), then resume to 6: the same losses and
    bitwise the same weights, EMA and Adam moments; the evaluation draws are fixed, so the
    test metrics of the last step agree too."""
    full = train_classifier(toy_config(6), tmp_path / "full", progress=False)
    first = train_classifier(toy_config(3), tmp_path / "split", progress=False)
    second = train_classifier(toy_config(6), tmp_path / "split", progress=False)
    assert second["start_step"] == 3 and second["step"] == 6
    assert first["losses"] + second["losses"] == full["losses"]
    a, b = (torch.load(tmp_path / run / "classifier" / "checkpoints" / "latest.pt",
                       weights_only=True) for run in ("full", "split"))
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    assert full["test"] == second["test"]
    assert set(full["test"]) == {"loss", "sigma=0.1", "sigma=0.5", "sigma=1", "sigma=2"}
    assert set(full["test"]["sigma=1"]) == {"t", "accuracy", "nll", "bayes_accuracy",
                                            "bayes_nll"}
    assert a["metadata"]["sde"] == {"name": "vpsde", "beta_min": 0.1, "beta_max": 20.0,
                                    "N": 1000}
    assert a["metadata"]["classifier"] == {
        "name": "mlp", "arguments": {"hidden_dim": 32, "num_blocks": 2, "embedding_dim": 64,
                                     "fourier_scale": 1.0, "data_shape": (2,),
                                     "num_classes": 8}}


def test_evaluation_times_give_the_noise_levels():
    for sde in SDES.values():
        t = sigma_times(sde, [0.1, 1.0, 2.0])
        alpha, std = sde.marginal_coeffs(t)
        torch.testing.assert_close(std / alpha, torch.tensor([0.1, 1.0, 2.0],
                                                             dtype=torch.float64))


def test_main_train_classifier_writes_checkpoint_and_metrics(tmp_path):
    """main.py --mode train_classifier on the digits (a tiny conv net, 2 steps): the files of
    <workdir>/classifier/, and load_classifier gives the EMA weights."""
    cmd = [sys.executable, "main.py", "--mode", "train_classifier", "--config",
           "configs/vp/ddpm_digits.py", "--workdir", str(tmp_path), "--config.device=cpu",
           "--config.classifier.n_iters=2", "--config.classifier.batch_size=16",
           "--config.classifier.nf=8", "--config.classifier.eval_batches=1",
           "--config.classifier.snapshot_freq=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "classifier"
    assert {p.name for p in (folder / "checkpoints").iterdir()} == {
        "latest.pt", "checkpoint_1.pt", "checkpoint_2.pt"}
    assert (folder / "config.json").exists() and list((folder / "tensorboard").iterdir())
    assert not (tmp_path / "checkpoints").exists()       # the score model's folder is apart
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["classifier"] == "conv"
    assert 0.0 <= metrics["test"]["sigma=0.5"]["accuracy"] <= 1.0
    config = load_config_file(str(ROOT / "configs/vp/ddpm_digits.py"))
    config.classifier.nf = 32            # the checkpoint's own arguments build the network
    net, metadata = load_classifier(config, tmp_path, "cpu")
    state = torch.load(folder / "checkpoints" / "latest.pt", weights_only=True)
    assert metadata["classifier"]["arguments"]["nf"] == 8 and not net.training
    for name, value in net.named_parameters():
        assert torch.equal(value, state["ema"]["shadow"][name]) and not value.requires_grad


@pytest.mark.parametrize("change, text", [
    (("sde", "name", "vesde"), "trained on the SDE 'vpsde' but config.sde.name='vesde'"),
    (("sde", "beta_max", 10.0), "sde.beta_max=20 but config.sde.beta_max=10"),
    (("data", "image_size", 16), "shape (1, 8, 8) but config.data.num_channels / "
                                 "config.data.image_size give (1, 16, 16)"),
    (("data", "num_channels", 3), "give (3, 8, 8)"),
    (("classifier", "num_classes", 5), "10 classes but config.classifier.num_classes=5"),
    (("data", "centered", False), "config.data.centered=False"),
])
def test_load_classifier_rejects_another_config_in_one_line(tmp_path, change, text):
    config = digits_config()
    train_classifier(config, tmp_path, progress=False)
    group, key, value = change
    config[group][key] = value
    with pytest.raises(ValueError) as info:
        load_classifier(config, tmp_path / "classifier" / "checkpoints" / "latest.pt", "cpu")
    message = str(info.value)
    assert "\n" not in message and text in message, message
    assert "--mode train_classifier" in message          # the fix
    if group != "data":     # (the digits loader itself refuses other shapes)
        with pytest.raises(ValueError, match="does not fit this config"):   # a resume refuses
            train_classifier(config, tmp_path, progress=False)


def test_load_classifier_needs_a_classifier_checkpoint(tmp_path):
    torch.save({"model": {}, "ema": {}, "step": 1}, tmp_path / "score.pt")
    with pytest.raises(ValueError, match="lacks 'metadata'"):
        load_classifier(digits_config(), tmp_path / "score.pt", "cpu")
    with pytest.raises(FileNotFoundError):
        load_classifier(digits_config(), tmp_path / "none", "cpu")


# ----------------------------------------------------------------------------- p_uncond

def test_label_dropout_rate_and_null_label():
    """P(label -> null) = p_uncond within 4 binomial standard deviations; other labels kept;
    the same generator state gives the same drops (resume)."""
    labels = torch.arange(200_000) % 7
    dropped = drop_labels(labels, 0.1, 7, torch.Generator().manual_seed(0))
    rate = (dropped == 7).double().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(labels)), rate
    kept = dropped != 7
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(dropped, drop_labels(labels, 0.1, 7, torch.Generator().manual_seed(0)))
    assert not (drop_labels(labels, 0.0, 7, torch.Generator()) == 7).any()


@pytest.mark.parametrize("path, classes, rows", [
    ("configs/toy/vp_mixture_cond.py", 8, 9), ("configs/vp/ddpm_digits_cond.py", 10, 11),
    ("configs/ve/ddpm_digits_cond.py", 10, 11)])
def test_classifier_free_guidance_networks_have_a_null_row(path, classes, rows):
    config = load_config_file(str(ROOT / path))
    validate_config(config, "train")
    assert compose.null_label(config) == classes and config.training.p_uncond == 0.1
    model = compose.build_model(config)
    embedding = model.class_emb if hasattr(model, "class_emb") else model.class_embedding
    assert embedding.num_embeddings == rows
    config.training.p_uncond = 0.0               # plain class-conditional: no null label
    assert compose.null_label(config) is None
    assert compose._num_classes(config) == classes


def test_unconditional_configs_have_no_null_label():
    config = load_config_file(str(ROOT / "configs/vp/ddpm_digits.py"))
    assert config.training.p_uncond == 0.0 and compose.null_label(config) is None


def test_conditional_toy_run_trains_samples_and_evaluates(tmp_path):
    """configs/toy/vp_mixture_cond.py end to end (4 steps): the training loss sees dropped
    labels, the evaluation reports the null label's score error, the sample grid and sample
    mode draw the classes in turn."""
    config = load_config_file(str(ROOT / "configs/toy/vp_mixture_cond.py"))
    config.device = "cpu"
    config.data.train_size, config.data.test_size = 2000, 512
    config.training.update(n_iters=4, batch_size=64, eval_freq=2, sample_freq=4,
                           num_grid_samples=64, snapshot_freq=4, snapshot_freq_for_preemption=4,
                           log_freq=2)
    config.eval.score_error_samples = 512
    config.sampling.num_samples = 64
    metrics = train(config, tmp_path, progress=False)
    assert set(metrics["score_errors"]) == {0, 2, 4} and metrics["exact_score_test_loss"] is None
    assert (tmp_path / "samples" / "grid_4.png").exists()
    result = evaluate.sample(config, tmp_path, method="ddim", progress=False)
    labels = np.load(tmp_path / "samples_ddim.npz")["labels"]
    assert result["num_samples"] == 64 and np.array_equal(labels, np.arange(64) % 8)
