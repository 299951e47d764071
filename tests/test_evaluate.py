"""Sample and likelihood modes of image runs (run_lib.evaluate, main.py --mode sample /
likelihood / compare) on the built-in 8x8 digits with a tiny DDPM U-Net: files, seeds, EMA
weights, published checkpoints, absent data, config.json in every mode, the configured
steps of fixed-grid likelihood ODEs, the demo.

The bits/dim pipeline (test split, dequantization, data scaling, ODE, bits conversion) is
checked against a closed form: with the exact score of the Gaussian fitted to the training
digits, the ODE's bits/dim of the test digits must equal that Gaussian's bits/dim.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import samplers
import sde_lib
from configs.vp.ddpm_digits import get_config
from run_lib import compose, evaluate
from run_lib.datasets import build_dataset
from run_lib.train import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(n_iters=4):
    config = get_config()
    config.device = "cpu"
    config.model.nf = 8
    config.model.dropout = 0.0
    config.training.batch_size = 16
    config.training.n_iters = n_iters
    config.training.log_freq = 2
    config.training.snapshot_freq = 100
    config.training.snapshot_freq_for_preemption = 2
    config.sampling.num_samples = 6
    config.sampling.method = "ddim"
    config.sampling.ddim.num_steps = 4
    config.eval.likelihood_samples = 5
    config.eval.rtol = 1e-3
    config.eval.atol = 1e-3
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_vp")
    config = tiny_config()
    train(config, workdir, progress=False)
    return config, workdir


def test_sample_images_writes_grid_npz_json_and_is_seeded(trained, tmp_path):
    config, workdir = trained
    metrics = evaluate.sample(config, workdir, progress=False)
    images = np.load(workdir / "samples_ddim.npz")["images"]
    assert images.shape == (6, 1, 8, 8) and images.dtype == np.uint8
    assert metrics["nfe"] == 5 and metrics["step"] == 4      # 4 steps + the final denoising
    assert metrics["num_samples"] == 6 and metrics["seconds"] > 0
    assert metrics["pixel_fd_to_test"] > metrics["pixel_fd_train_to_test"] > 0
    from PIL import Image
    grid = np.asarray(Image.open(workdir / "samples_ddim.png"))
    assert grid.shape == (2 * (64 + 4) + 4, 3 * (64 + 4) + 4, 3)   # 6 images: 3 per row, x8
    assert json.loads((workdir / "samples_ddim.json").read_text())["nfe"] == 5
    evaluate.sample(config, workdir, progress=False)
    assert np.array_equal(np.load(workdir / "samples_ddim.npz")["images"], images)


def test_sample_uses_the_ema_weights(trained):
    config, workdir = trained
    ema = evaluate.load_score_fn(config, workdir, "cpu")
    raw = evaluate.load_score_fn(config, workdir, "cpu", use_ema=False)
    state = torch.load(workdir / "checkpoints" / "latest.pt", weights_only=True)
    for name, value in ema.model.state_dict().items():
        if name in state["ema"]["shadow"]:
            assert torch.equal(value, state["ema"]["shadow"][name]), name
    differs = [n for n, v in raw.model.state_dict().items() if not torch.equal(v, state["ema"]["shadow"].get(n, v))]
    assert differs, "after 4 steps the EMA differs from the raw weights"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run --mode train"):
        evaluate.load_score_fn(tiny_config(), tmp_path, "cpu")
    for mode in (evaluate.sample, evaluate.likelihood):      # and nothing is written
        with pytest.raises(FileNotFoundError, match="no checkpoint at"):
            mode(tiny_config(), tmp_path / "empty", progress=False)
        assert not (tmp_path / "empty").exists()


def test_likelihood_images_json(trained):
    config, workdir = trained
    metrics = evaluate.likelihood(config, workdir, progress=False)
    assert metrics["num_images"] == 5 and metrics["nfe_mean"] > 0
    assert 0 < metrics["bits_per_dim"] < 30 and metrics["bits_per_dim_standard_error"] > 0
    assert json.loads((workdir / "likelihood.json").read_text())["bits_per_dim"] == metrics["bits_per_dim"]


@pytest.mark.parametrize("sde_name", ["vpsde", "vesde"])
def test_bits_per_dim_of_the_exact_gaussian_score_equals_the_gaussian_fit(sde_name):
    """The exact score of N(mu, Sigma) fitted to the training digits, through the ODE, gives
    the bits/dim that the closed-form Gaussian gives on the same test digits. The two use
    independent dequantization noise, so they agree up to its Monte Carlo error (the per-image
    bpd varies by ~0.02 with the noise; over 297 images the means differ by < 0.01) plus the
    ODE's error at rtol 1e-5 and the VP prior mismatch (alpha(1)^2 = 4e-5): bound 0.02.
    The VE ODE evaluates the data smoothed at sigma(eps) = 0.01 (p_eps; the VE convention),
    so the Gaussian compared with it has covariance Sigma + sigma(eps)^2 I: on digits, whose
    blank pixels vary only by the dequantization (std 0.0045 in [-1, 1]), that smoothing costs
    0.14 bits/dim, which the comparison must include to pass."""
    config = get_config()
    config.sde.name = sde_name
    mean, cov = evaluate.gaussian_fit(config)
    gaussian = sde_lib.GaussianMixture.gaussian(mean, cov, event_shape=(1, 8, 8))
    sde = compose.build_sde(config)
    test = build_dataset(config, "test").images
    result = samplers.bits_per_dim(gaussian.score_fn(sde), sde, test, centered=True,
                                   dequantize=True, generator=torch.Generator().manual_seed(5),
                                   dtype=torch.float64, trace="exact")
    smoothing = sde.marginal_coeffs(torch.tensor(1e-5))[1].item() if sde_name == "vesde" else 0.0
    expected = evaluate.gaussian_fit_bpd(config, smoothing_std=smoothing)
    assert abs(result.bpd.mean().item() - expected) < 0.02, (result.bpd.mean().item(), expected)
    assert 5.0 < expected < 8.0      # better than uniform (8 bits), far from a good model


def test_compare_workdirs_table(tmp_path):
    rows = {"vp": ("vpsde", "ddpm", 3.21), "ve": ("vesde", "ncsnpp", 3.55)}
    for name, (sde, model, bpd) in rows.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"sde": {"name": sde}, "model": {"name": model}}))
        (d / "likelihood.json").write_text(json.dumps({
            "bits_per_dim": bpd, "bits_per_dim_standard_error": 0.05, "nfe_mean": 140.0,
            "step": 1500, "gaussian_fit_bits_per_dim": 6.44}))
    (tmp_path / "vp" / "samples_pc.json").write_text(json.dumps({"nfe": 2000, "pixel_fd_to_test": 0.5}))
    like = json.loads((tmp_path / "ve" / "likelihood.json").read_text())
    like["vlb"] = {"bits_per_dim": 3.9, "bits_per_dim_standard_error": 0.04, "nfe": 1000}
    (tmp_path / "ve" / "likelihood.json").write_text(json.dumps(like))
    table = evaluate.compare_workdirs([tmp_path / "vp", tmp_path / "ve"])
    lines = table.splitlines()
    assert len(lines) == 4 and "pc: NFE / pixel FD" in lines[0]
    assert "| bits/dim (or NLL) | NFE (ODE) | VLB bits/dim (NFE) |" in lines[0]
    assert "| vp | vpsde | ddpm | 1500 | 3.210 +- 0.050 | 140 | - | 6.440 | 2000 / 0.5000 |" == lines[2]
    assert "| 3.550 +- 0.050 | 140 | 3.900 +- 0.040 (1000) | 6.440 |" in lines[3]
    assert lines[3].endswith("| - |")
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.compare_workdirs([tmp_path / "nothing"])


def test_main_sample_likelihood_compare(trained, tmp_path):
    config, workdir = trained
    common = ["--config", "configs/vp/ddpm_digits.py", "--config.device=cpu", "--config.model.nf=8",
              "--config.model.dropout=0.0", "--config.sampling.num_samples=4",
              "--config.sampling.ddim.num_steps=3", "--config.eval.likelihood_samples=3",
              "--config.eval.rtol=1e-2", "--config.eval.atol=1e-2", "--workdir", str(workdir)]
    run = lambda *args: subprocess.run([sys.executable, "main.py", *args], cwd=ROOT,
                                       capture_output=True, text=True, timeout=300)
    sample = run("--mode", "sample", "--sampler", "ddim", *common)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert json.loads((workdir / "samples_ddim.json").read_text())["nfe"] == 4
    like = run("--mode", "likelihood", *common)
    assert like.returncode == 0, like.stderr[-2000:]
    compare = run("--mode", "compare", "--workdir", f"{workdir},{workdir}")
    assert compare.returncode == 0 and compare.stdout.count("| vpsde | ddpm |") == 2


def test_sample_from_an_official_score_sde_checkpoint(tmp_path):
    """A checkpoint in the official Score SDE format ('module.' keys, EMA as a bare
    shadow_params list) samples through --checkpoint with its EMA weights."""
    config = tiny_config()
    torch.manual_seed(3)
    net = compose.build_model(config)
    shadow = [p.detach() + 0.01 * torch.randn_like(p) for p in net.parameters()]
    official = {"model": {f"module.{k}": v for k, v in net.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": shadow},
                "optimizer": {}, "step": 7}
    torch.save(official, tmp_path / "checkpoint_1.pth")
    run = evaluate.load_score_fn(config, tmp_path / "unused", "cpu",
                                 checkpoint=str(tmp_path / "checkpoint_1.pth"))
    assert run.step == 7
    for loaded, expected in zip(run.model.parameters(), shadow):
        assert torch.equal(loaded, expected)
    metrics = evaluate.sample(config, tmp_path / "out", progress=False,
                              checkpoint=str(tmp_path / "checkpoint_1.pth"))
    assert metrics["step"] == 7 and (tmp_path / "out" / "samples_ddim.png").exists()


def test_an_official_discrete_vp_checkpoint_gets_the_official_labels(tmp_path):
    """A discrete DDPM (continuous=False) loaded from a checkpoint in the official format
    conditions on the fractional label t (N - 1) (discrete_labels="score_sde"); the same
    weights from our own checkpoint format keep the nearest level."""
    import models
    config = tiny_config()
    config.training.continuous = False
    torch.manual_seed(4)
    net = compose.build_model(config)
    official = {"model": {f"module.{k}": v for k, v in net.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 1,
                        "shadow_params": [p.detach().clone() for p in net.parameters()]},
                "optimizer": {}, "step": 1}
    torch.save(official, tmp_path / "checkpoint_1.pth")
    run = evaluate.load_score_fn(config, tmp_path / "unused", "cpu",
                                 checkpoint=str(tmp_path / "checkpoint_1.pth"))
    sde = compose.build_sde(config)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.4)       # off the level grid
    with torch.no_grad():
        got = run.score_fn(x, t)
        expected = models.get_score_fn(sde, run.model, continuous=False,
                                       discrete_labels="score_sde")(x, t)
        nearest = models.get_score_fn(sde, run.model, continuous=False)(x, t)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - nearest).abs().max() > 1e-4 * nearest.abs().max()      # 0.1 % apart here
    assert compose.build_score_fn(config, sde, run.model)(x, t).equal(nearest)


def test_class_conditional_labels_follow_the_images_across_batches(tmp_path, monkeypatch):
    """Sampling in batches gives image i the label i mod K, the one saved in the .npz."""
    config = tiny_config(n_iters=1)
    config.model.num_classes = 10
    config.sampling.num_samples, config.sampling.batch_size = 6, 4
    train(config, tmp_path, progress=False)
    used = []
    real = compose.sample

    def spy(config, score_fn, *args, **kwargs):
        used.append(score_fn.args[1].cpu())          # functools.partial(_, score_fn, labels)
        return real(config, score_fn, *args, **kwargs)

    monkeypatch.setattr(compose, "sample", spy)
    evaluate.sample(config, tmp_path, progress=False)
    saved = np.load(tmp_path / "samples_ddim.npz")["labels"]
    assert torch.equal(torch.cat(used), torch.arange(6)) and saved.tolist() == list(range(6))


@pytest.mark.parametrize("data", ["mnist", "cifar10"])
def test_sample_with_a_checkpoint_and_absent_data_writes_samples_and_a_note(tmp_path, data):
    """--mode sample --checkpoint <file> without the data set: the samples (npz, png) and
    config.json are written, the pixel FD is skipped with the reason in the JSON (MNIST: the
    IDX files are missing; CIFAR-10: 3072 values per image, never computed, so the archive
    is not even looked for), and the work directory joins --mode compare."""
    import models
    config = tiny_config()
    shape = {"mnist": (1, 28), "cifar10": (3, 32)}[data]
    config.data.name, config.data.data_dir = data, str(tmp_path / "absent")
    config.data.num_channels, config.data.image_size = shape
    torch.manual_seed(0)
    net = compose.build_model(config)
    ema = models.ExponentialMovingAverage(net, decay=0.9)
    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "step": 3},
               tmp_path / "weights.pt")
    out = tmp_path / "out"
    metrics = evaluate.sample(config, out, progress=False, checkpoint=str(tmp_path / "weights.pt"))
    assert np.load(out / "samples_ddim.npz")["images"].shape == (6, shape[0], shape[1], shape[1])
    assert (out / "samples_ddim.png").exists() and (out / "config.json").exists()
    reason = {"mnist": "MNIST file", "cifar10": "3072 values"}[data]
    saved = json.loads((out / "samples_ddim.json").read_text())
    assert reason in json.dumps(saved["skipped"]) and "pixel_fd_to_test" not in saved
    assert saved == metrics and saved["nfe"] == 5
    table = evaluate.compare_workdirs([out])
    assert table.splitlines()[2].endswith("| 5 / - |")


def test_likelihood_uses_the_configured_steps_of_fixed_grid_methods(trained, tmp_path):
    """config.eval.num_steps reaches the ODE: RK4 with 3 steps is 12 NFE per batch (the
    default grid is longer), in batches of config.eval.batch_size (5 images, batches of 2:
    3 batches). Used through --checkpoint in a fresh directory, which gets config.json."""
    _, workdir = trained
    config = tiny_config()
    config.eval.ode_method, config.eval.num_steps, config.eval.batch_size = "rk4", 3, 2
    fresh = tmp_path / "fresh"
    metrics = evaluate.likelihood(config, fresh, progress=False,
                                  checkpoint=str(workdir / "checkpoints" / "latest.pt"))
    assert metrics["nfe_per_batch"] == [12, 12, 12] and metrics["num_steps"] == 3
    assert (fresh / "config.json").exists() and metrics["num_images"] == 5
    config.eval.num_steps = None
    default = evaluate.likelihood(config, fresh, progress=False,
                                  checkpoint=str(workdir / "checkpoints" / "latest.pt"))
    assert default["nfe_per_batch"][0] > 12


def test_sample_mode_falls_back_from_a_corrupt_latest_checkpoint(trained, tmp_path, caplog):
    """A truncated latest.pt next to a good checkpoint_<step>.pt: sample mode warns and uses
    the numbered one (its step is in the JSON)."""
    import logging
    import shutil
    config, workdir = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(workdir / "checkpoints" / "latest.pt", run / "checkpoints" / "checkpoint_4.pt")
    (run / "checkpoints" / "latest.pt").write_bytes(b"PK\x03\x04 truncated")
    caplog.set_level(logging.WARNING, logger="run_lib.checkpoints")
    metrics = evaluate.sample(config, run, progress=False)
    assert metrics["step"] == 4 and "using" in caplog.text and "checkpoint_4.pt" in caplog.text
