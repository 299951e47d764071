"""The one run pipeline on the 2-D eight-mode mixture (configs/toy/*): the same training loop,
checkpoints, sample and likelihood modes as images, plus the exact evaluations that a data
set with a closed-form density provides (run_lib.exact): relative score error, true
log-density of samples, mode weights, true NLL next to the ODE's."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sde_lib
from configs.toy.vp_mixture import get_config
from run_lib import compose, evaluate, exact
from run_lib.datasets import build_dataset
from run_lib.train import train

ROOT = Path(__file__).resolve().parents[1]

#: Entropy of the eight-mode mixture in nats: that of one component, log(2 pi e 0.15^2) =
#: -0.956, plus that of the weights k / 36, k = 1..8 (1.925), since the modes barely overlap.
MIXTURE_ENTROPY = math.log(2 * math.pi * math.e * 0.15 ** 2) - sum(
    k / 36 * math.log(k / 36) for k in range(1, 9))


def toy_config(n_iters=300):
    config = get_config()
    config.device = "cpu"
    config.training.n_iters = n_iters
    config.training.log_freq = 100
    config.training.eval_freq = 100
    config.training.snapshot_freq = 200
    config.training.snapshot_freq_for_preemption = 100
    config.training.sample_freq = n_iters
    config.training.num_grid_samples = 512
    config.eval.score_error_samples = 4096
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """300 steps of the VP toy config (about 15 s on one thread)."""
    workdir = tmp_path_factory.mktemp("toy_vp")
    config = toy_config()
    metrics = train(config, workdir, progress=False)
    return config, workdir, metrics


def test_training_learns_the_exact_score(trained):
    """The zero-initialised MLP starts at relative score error 1 (its output is 0); after
    300 steps the EMA weights' error is measured 0.03 (bound 0.08, the README's 2000-step
    runs reach 0.013-0.03) and the EMA test loss is within 15 % of the exact score's on the
    same draws (measured 1.10x). The files are the image runs': checkpoints, metrics.json,
    TensorBoard, a scatter plot of samples."""
    config, workdir, metrics = trained
    errors = metrics["score_errors"]
    assert sorted(errors) == [0, 100, 200, 300]
    assert errors[0] == pytest.approx(1.0, abs=1e-6)
    assert errors[300] < 0.08 and errors[300] < errors[100] and metrics["relative_score_error"] == errors[300]
    floor, final = metrics["exact_score_test_loss"], metrics["eval_losses"][300]
    assert floor < final < 1.15 * floor, (floor, final)
    assert metrics["eval_losses"][0] > 3 * floor          # untrained: far above the floor
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved["relative_score_error"] == pytest.approx(errors[300])
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert names == ["checkpoint_200.pt", "latest.pt"]
    state = torch.load(workdir / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 300 and {"model", "ema", "optimizer", "rng"} <= set(state)
    from PIL import Image
    scatter = np.asarray(Image.open(workdir / "samples" / "grid_300.png"))
    assert scatter.shape == (512, 512, 3) and (scatter.min(axis=2) < 200).sum() > 1000
    assert not (workdir / "model.pt").exists()


def test_relative_score_error_of_known_score_functions():
    """0 for the exact score, 1 for zero, (1 - c)^2 for c times the exact score."""
    data = sde_lib.eight_mode_mixture()
    sde = sde_lib.VESDE(0.01, 5.0)
    exact_score = data.score_fn(sde)
    kw = dict(num_samples=2048, generator=None)
    for scale, expected in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.25), (1.5, 0.25)):
        kw["generator"] = torch.Generator().manual_seed(0)
        error = exact.relative_score_error(lambda x, t: scale * exact_score(x, t), data, sde, **kw)
        assert error == pytest.approx(expected, abs=1e-6), scale


def test_sample_metrics_of_true_and_wrong_draws():
    """True draws: mode TV at the sampling error (~0.02 for 4096) and the data's log-density;
    all points on the heaviest mode: TV 1 - 8/36; points on a circle of radius 3 instead of
    2: log-density about -(1 / 0.15)^2 / 2 = -22 nats lower."""
    data = sde_lib.eight_mode_mixture()
    x = data.sample(4096, generator=torch.Generator().manual_seed(1))
    good = exact.sample_metrics(data, x, seed=2)
    assert good["mode_weight_tv"] < 0.04 and good["nonfinite_fraction"] == 0
    assert good["mean_true_logp_of_samples"] == pytest.approx(good["mean_true_logp_of_data"], abs=0.1)
    one_mode = exact.sample_metrics(data, data.means[7].float().expand(100, 2), seed=2)
    assert one_mode["mode_weight_tv"] == pytest.approx(1 - 8 / 36)
    wide = exact.sample_metrics(data, 1.5 * x, seed=2)
    assert wide["median_true_logp_of_samples"] < good["median_true_logp_of_samples"] - 15
    x[:10] = float("nan")
    assert exact.sample_metrics(data, x, seed=2)["nonfinite_fraction"] == pytest.approx(10 / 4096)


def test_sample_mode_on_the_trained_toy(trained):
    """DPM-Solver (20 steps) from the 300-step model: points (N, 2) in the .npz, a scatter
    plot, mode-weight TV measured 0.03 (bound 0.12; the zero score's samples, spread far and
    wide, fall near every mode alike: 0.21) and a median true log-density within 2.5 nats of
    the data's (measured 2.0 below; the zero score's is -7e5)."""
    config, workdir, _ = trained
    config = toy_config()
    config.sampling.num_samples = 1024
    metrics = evaluate.sample(config, workdir, method="dpm_solver", progress=False)
    with np.load(workdir / "samples_dpm_solver.npz") as archive:
        assert archive["samples"].shape == (1024, 2) and archive["samples"].dtype == np.float32
    assert (workdir / "samples_dpm_solver.png").stat().st_size > 1000
    assert metrics["nfe"] == 21 and metrics["step"] == 300
    assert metrics["mode_weight_tv"] < 0.12, metrics
    assert metrics["median_true_logp_of_samples"] > metrics["median_true_logp_of_data"] - 2.5
    assert json.loads((workdir / "samples_dpm_solver.json").read_text()) == metrics


def test_likelihood_mode_on_the_trained_toy(trained):
    """The ODE NLL of 64 test points (2 batches) next to their true NLL: the true one is the
    mixture's entropy up to the sampling error of 64 points (std of -log p ~1 nat: bound
    0.4; measured 0.14); the model's is measured 0.64 nats above it after 300 steps (bound:
    within -0.3 and +1.5; the zero score gives +11.0)."""
    config, workdir, _ = trained
    config = toy_config()
    config.eval.likelihood_samples, config.eval.batch_size = 64, 32
    config.eval.rtol = config.eval.atol = 1e-4
    metrics = evaluate.likelihood(config, workdir, progress=False)
    assert metrics["num_points"] == 64 and len(metrics["nfe_per_batch"]) == 2
    assert abs(metrics["true_nll_nats"] - MIXTURE_ENTROPY) < 0.4, metrics
    assert -0.3 < metrics["nll_nats"] - metrics["true_nll_nats"] < 1.5, metrics
    assert json.loads((workdir / "likelihood.json").read_text())["nll_nats"] == metrics["nll_nats"]


def test_likelihood_mode_with_the_exact_score_gives_the_true_nll(tmp_path, monkeypatch):
    """The likelihood mode's bookkeeping (test split, eps, batches, sign) against the closed
    form: with the exact score of the data, the ODE NLL of each point equals its true NLL up
    to the solver's error (rtol 1e-5: measured 3.5e-3 nats; bound 0.01)."""
    config = toy_config()
    config.eval.likelihood_samples, config.eval.batch_size = 32, 16
    density = build_dataset(config, "test").density
    sde = compose.build_sde(config)
    run = evaluate.LoadedRun(None, density.score_fn(sde), sde, 0, 0)
    monkeypatch.setattr(evaluate, "load_score_fn", lambda *args, **kwargs: run)
    metrics = evaluate.likelihood(config, tmp_path, progress=False)
    assert metrics["mean_abs_error_nats"] < 0.01, metrics
    assert metrics["nll_nats"] == pytest.approx(metrics["true_nll_nats"], abs=0.01)


def test_main_toy_train_sample_likelihood_compare(tmp_path):
    """The README's toy commands: train (30 steps), sample with PC, likelihood, compare; an
    ALD request on the sub-VP SDE is a one-line error."""
    base = [sys.executable, "main.py", "--config", "configs/toy/subvp_mixture.py",
            "--workdir", str(tmp_path), "--config.device=cpu"]
    small = ["--config.sde.num_scales=20", "--config.sampling.num_samples=64",
             "--config.eval.likelihood_samples=16", "--config.eval.rtol=1e-3",
             "--config.eval.atol=1e-3"]

    def run(*args):
        return subprocess.run([*base, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    done = run("--mode", "train", "--config.training.n_iters=30", "--config.training.eval_freq=10")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 30 and "subVPSDE" in metrics["sde"]
    assert 0 < metrics["relative_score_error"] < metrics["score_errors"]["0"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    done = run("--mode", "sample", "--sampler", "pc", *small)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "samples_pc.json").read_text())
    assert result["nfe"] == 40 and 0 <= result["mode_weight_tv"] <= 1
    done = run("--mode", "likelihood", *small)
    assert done.returncode == 0, done.stderr[-2000:]
    likelihood = json.loads((tmp_path / "likelihood.json").read_text())
    assert math.isfinite(likelihood["nll_nats"]) and likelihood["nfe_mean"] > 0
    done = run("--mode", "sample", "--sampler", "ald", *small)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "error:" in done.stderr and "ald" in done.stderr.lower()
    compare = subprocess.run([sys.executable, "main.py", "--mode", "compare", "--workdir",
                              str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr[-2000:]
    row = compare.stdout.splitlines()[2]
    assert "| subvpsde | mlp | 30 |" in row and "nats" in row and "| 40 / " in row
