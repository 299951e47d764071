"""Class-conditional and guided sampling from the config (run_lib.compose.guided_score_fn,
main.py --mode sample with config.sampling.class_label / guidance / guidance_scale /
thresholding and --classifier): the composed score equals the library's transforms, the
sample mode writes labelled outputs, and bad combinations fail in one line before any file
is written (the config-only cases are in tests/test_cli_errors.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
import samplers
from run_lib import compose, evaluate
from run_lib.classifier import train_classifier
from run_lib.train import train
from run_lib.validate import load_config_file

ROOT = Path(__file__).resolve().parents[1]
TOY_COND, TOY = "configs/toy/vp_mixture_cond.py", "configs/toy/vp_mixture.py"
DIGITS_COND = "configs/vp/ddpm_digits_cond.py"


def config_of(path: str, **sampling):
    config = load_config_file(str(ROOT / path))
    config.device = "cpu"
    config.sampling.update(sampling)
    return config


def _network(config, seed=0):
    torch.manual_seed(seed)
    model = compose.build_model(config).eval()
    return compose.build_score_fn(config, compose.build_sde(config), model)


def _batch(config, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *compose.data_shape(config), generator=g)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x, t


# ----------------------------------------------------------------------------- composition

def test_cfg_and_thresholding_equal_the_library_transforms():
    """guided_score_fn = classifier_free_guidance(score, labels, w, null) (then
    dynamic_thresholding), bit for bit, on a random conditional digits network; w = 0 is the
    conditional score; no guidance binds the labels."""
    config = config_of(DIGITS_COND, guidance_scale=2.5)
    config.model.update(nf=16, ch_mult=(1, 2))
    sde, score_fn = compose.build_sde(config), _network(config)
    x, t = _batch(config)
    labels = compose.sampling_labels(config, len(x), classifier=False)
    assert labels.tolist() == [k % 10 for k in range(12)]
    with torch.no_grad():
        want = samplers.classifier_free_guidance(score_fn, labels, 2.5, 10)(x, t)
        got = compose.guided_score_fn(config, sde, score_fn, labels)(x, t)
        assert torch.equal(got, want)
        uncond = score_fn(x, t, torch.full_like(labels, 10))
        cond = score_fn(x, t, labels)
        torch.testing.assert_close(got, 3.5 * cond - 2.5 * uncond, rtol=1e-4, atol=1e-4)
        config.sampling.update(thresholding=True, thresholding_percentile=0.9)
        got = compose.guided_score_fn(config, sde, score_fn, labels)(x, t)
        assert torch.equal(got, samplers.dynamic_thresholding(
            samplers.classifier_free_guidance(score_fn, labels, 2.5, 10), sde, 0.9)(x, t))
        assert not torch.equal(got, want)           # x ~ N(0, 1): some x0 beyond [-1, 1]
        config.sampling.update(thresholding=False, guidance_scale=0.0, guidance="none")
        assert torch.equal(compose.guided_score_fn(config, sde, score_fn, labels)(x, t), cond)


def test_classifier_guidance_equals_the_library_transform():
    """Unconditional toy model + a noise-conditional classifier: s(x, t) + w grad log
    p(y | x, t); on the conditional toy model the conditional score is the one guided."""
    for path, score_labels in ((TOY, None), (TOY_COND, "class")):
        config = config_of(path, guidance_scale=1.5, class_label=3)
        sde, score_fn = compose.build_sde(config), _network(config)
        torch.manual_seed(2)
        logits_fn = models.get_logits_fn(sde, compose.build_classifier(config).eval())
        x, t = _batch(config)
        labels = compose.sampling_labels(config, len(x), classifier=True)
        assert labels.tolist() == [3] * 12
        assert compose.guidance_method(config, classifier=True) == "classifier"
        want = samplers.classifier_guidance(score_fn, logits_fn, labels, 1.5,
                                            score_labels=score_labels)(x, t)
        got = compose.guided_score_fn(config, sde, score_fn, labels, logits_fn)(x, t)
        assert torch.equal(got, want)
        base = score_fn(x, t) if score_labels is None else score_fn(x, t, labels)
        assert (got - base).abs().max() > 1e-4                 # the gradient term is there


@pytest.mark.parametrize("path, sampling, classifier, method", [
    (TOY_COND, {}, False, "cfg"),                 # auto: null label -> CFG
    (TOY_COND, {}, True, "classifier"),           # auto: a classifier is given
    (TOY, {}, False, "none"),
    (TOY, {"guidance": "classifier"}, False, "classifier"),
])
def test_auto_guidance_rule(path, sampling, classifier, method):
    assert compose.guidance_method(config_of(path, **sampling),
                                   classifier=classifier) == method


# ----------------------------------------------------------------------------- sample mode

def _tiny_toy_run(workdir, path=TOY_COND):
    config = config_of(path)
    config.data.train_size, config.data.test_size = 2000, 512
    config.training.update(n_iters=4, batch_size=64, eval_freq=0, sample_freq=0,
                           snapshot_freq=4, snapshot_freq_for_preemption=4, log_freq=2)
    train(config, workdir, progress=False)
    return config


TOY_FLAGS = ["--config.device=cpu", "--config.data.train_size=2000",
             "--config.data.test_size=512", "--config.sampling.num_samples=64",
             "--config.sampling.dpm_solver.num_steps=5"]


def main_py(*args):
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_main_sample_with_class_label_and_cfg_writes_labelled_outputs(tmp_path):
    """main.py --mode sample --config.sampling.class_label=3 --config.sampling.guidance_scale=2
    on a 4-step conditional toy run: npz labels all 3, json with the guidance and the Bayes
    classifier's accuracy on the samples next to its accuracy on test points."""
    _tiny_toy_run(tmp_path)
    done = main_py("--mode", "sample", "--config", TOY_COND, "--workdir", tmp_path,
                   "--sampler", "dpm_solver", *TOY_FLAGS, "--config.sampling.class_label=3",
                   "--config.sampling.guidance_scale=2.0")
    assert done.returncode == 0, done.stderr[-2000:]
    data = np.load(tmp_path / "samples_dpm_solver.npz")
    assert data["samples"].shape == (64, 2) and data["labels"].tolist() == [3] * 64
    result = json.loads((tmp_path / "samples_dpm_solver.json").read_text())
    assert result["guidance"] == {"method": "cfg", "guidance_scale": 2.0, "class_label": 3,
                                  "num_classes": 8, "thresholding": False, "classifier": None}
    accuracy = result["label_accuracy"]
    assert set(accuracy["per_class"]) == {"3"} and 0 <= accuracy["accuracy"] <= 1
    assert 0.9 < accuracy["ceiling_on_test_data"] <= 1.0    # the 8 modes barely overlap
    # 5 steps + the final denoising evaluation (a CFG evaluation is one batched call)
    assert result["nfe"] == 6 and (tmp_path / "samples_dpm_solver.png").exists()


def test_sample_on_digits_draws_one_row_per_class_and_reports_the_accuracy(tmp_path):
    """A 2-step conditional digits run sampled with balanced labels (class_label = -1): the
    PNG has one row of 10 images per class, the npz the labels 0..9 in turn, the json the
    held-out digits classifier's accuracy (cached in the data directory)."""
    config = config_of(DIGITS_COND, num_samples=20)
    config.data.data_dir = str(tmp_path / "data")
    config.model.update(nf=16, ch_mult=(1, 2), dropout=0.0)
    config.training.update(n_iters=2, batch_size=16, eval_freq=0, sample_freq=0,
                           snapshot_freq=2, snapshot_freq_for_preemption=2, log_freq=1)
    config.sampling.dpm_solver.num_steps = 3
    train(config, tmp_path, progress=False)
    result = evaluate.sample(config, tmp_path, method="dpm_solver", progress=False)
    assert np.load(tmp_path / "samples_dpm_solver.npz")["labels"].tolist() == \
        [k % 10 for k in range(20)]
    from PIL import Image
    picture = np.asarray(Image.open(tmp_path / "samples_dpm_solver.png"))
    cell = 8 * 8 + 4                         # 8x8 digits at 8x, 4 px padding
    assert picture.shape[:2] == (10 * cell + 4, 10 * cell + 4)
    # rows 0 and 1 have 2 images each, then blanks (white padding value)
    assert (picture[4:4 + 64, 4 + 2 * cell:] == 255).all()
    assert not (picture[4:4 + 64, 4:4 + 64] == 255).all()
    accuracy = result["label_accuracy"]
    assert set(accuracy["per_class"]) == {str(k) for k in range(10)}
    assert 0.9 < accuracy["ceiling_on_test_data"] < 1.0
    assert (tmp_path / "data" / "digits_classifier.pt").exists()
    assert result["guidance"]["method"] == "cfg" and result["guidance"]["guidance_scale"] == 0


def test_classifier_of_another_sde_fails_before_anything_is_written(tmp_path):
    """--classifier trained on the VP toy SDE, sampling a VE config: load_classifier's one
    line, exit 1, no config.json / samples in the work directory."""
    config = config_of(TOY)
    config.data.train_size, config.data.test_size = 2000, 256
    c = config.classifier
    c.hidden_dim, c.n_iters, c.batch_size, c.warmup, c.eval_freq = 16, 2, 32, 1, 0
    c.snapshot_freq = c.snapshot_freq_for_preemption = 2
    train_classifier(config, tmp_path / "clf", progress=False)
    work = tmp_path / "ve"
    done = main_py("--mode", "sample", "--config", "configs/toy/ve_mixture.py", "--workdir",
                   work, *TOY_FLAGS, "--classifier", tmp_path / "clf",
                   "--config.sampling.class_label=1", "--config.sampling.guidance_scale=1.0")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert "trained on the SDE 'vpsde' but config.sde.name='vesde'" in lines[0]
    assert not work.exists() or not any(work.iterdir())
    # the default classifier of guidance='classifier' is <workdir>/classifier/...
    done = main_py("--mode", "sample", "--config", TOY, "--workdir", work, *TOY_FLAGS,
                   "--config.sampling.guidance=classifier")
    assert done.returncode == 1 and "no classifier at" in done.stderr
    assert "classifier/checkpoints/latest.pt" in done.stderr
    assert not work.exists() or not any(work.iterdir())
