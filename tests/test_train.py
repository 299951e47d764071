"""The training loop (run_lib.train.train) on the 8x8 digits with a tiny DDPM U-Net:
learning, EMA test loss, sample grids, ETA, determinism, bitwise resume, atomic checkpoints,
the fallback from a corrupt latest.pt, refused checkpoints, NaN stop without per-step host
reads, bf16 autocast, the EMA warm-up, progress lines in log files. (The same loop on the
toy mixtures: tests/test_toy_pipeline.py.)"""
import io
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.vp.ddpm_digits import get_config
from run_lib import compose
from run_lib import train as train_module
from run_lib.train import grid_picture, load_checkpoint, sample_grid, skip_nonfinite_step, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(n_iters=6, **model):
    config = get_config()
    config.device = "cpu"
    config.model.nf = 16
    config.model.update(model)
    config.training.batch_size = 16
    config.training.n_iters = n_iters
    config.training.log_freq = 2
    config.training.snapshot_freq = 4
    config.training.snapshot_freq_for_preemption = 2
    config.optim.warmup = 5
    return config


def tensorboard_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (path,) = Path(folder).glob("events.out.tfevents.*")
    events = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_train_loss_finite_and_decreasing(tmp_path, caplog):
    """40 steps: the training loss falls, the EMA test loss (steps 0, 20, 40) falls, a sample
    grid is written at step 40 and is what sample_grid gives for the saved EMA weights, and
    the log lines carry an ETA."""
    caplog.set_level(logging.INFO, logger="run_lib.train")
    config = tiny_config(40)
    config.model.dropout = 0.0
    config.model.ema_rate = 0.9
    config.training.eval_freq = 20
    config.training.eval_batches = 4
    config.training.sample_freq = 40
    config.training.num_grid_samples = 9
    config.sampling.dpm_solver.num_steps = 8       # the grid sampler's steps
    result = train(config, tmp_path, progress=False)
    losses = result["losses"]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.6 * first, (first, last)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["nf"] == 16
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == sorted(["latest.pt"] + [f"checkpoint_{s}.pt" for s in range(4, 41, 4)])

    evals = result["eval_losses"]
    assert sorted(evals) == [0, 20, 40] and all(math.isfinite(v) for v in evals.values())
    assert evals[40] < 0.8 * evals[0], evals
    events = tensorboard_events(tmp_path / "tensorboard")
    logged = {e.step: e.value for e in events.Scalars("eval/loss_ema")}
    assert logged == pytest.approx(evals, rel=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 41))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in events.Images("samples/grid")] == [40]
    assert re.search(r"step 40/40 loss \d+\.\d+ .* eta \d+:\d\d:\d\d", caplog.text)

    # the grid PNG is the seeded sample of the EMA weights saved at step 40
    from PIL import Image
    import models
    from run_lib.images import to_uint8
    png = np.asarray(Image.open(tmp_path / "samples" / "grid_40.png"))
    assert png.shape == (3 * 33 + 1, 3 * 33 + 1, 3)       # 3x3 cells of 8x8 upscaled x4
    model = compose.build_model(config)
    ema = models.ExponentialMovingAverage(model, decay=0.9)
    ema.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "latest.pt", "cpu")["ema"])
    x = sample_grid(config, compose.build_sde(config), model, ema, device="cpu")
    assert x.shape == (9, 1, 8, 8)
    assert to_uint8(x, centered=True).float().std() > 10        # not a blank grid
    assert np.array_equal(grid_picture(config, x), png)


def test_no_host_read_per_step(tmp_path, monkeypatch):
    """10 steps, log every 5: no tensor is read back as a Python scalar (item(), bool(),
    float(): aten._local_scalar_dense, a device sync on CUDA) and the step record is
    read back (one sync each) only at the 2 log steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountScalarReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default,
                        torch.ops.aten.is_nonzero.default):
                CountScalarReads.reads += 1
            return func(*args, **(kwargs or {}))

    flushes = []
    real_flush = train_module.StepRecord.flush
    monkeypatch.setattr(train_module.StepRecord, "flush",
                        lambda self, latest: flushes.append(len(self.rows)) or real_flush(self,
                                                                                          latest))
    config = tiny_config(10)
    config.training.log_freq = 5
    config.training.snapshot_freq = config.training.snapshot_freq_for_preemption = 10
    config.training.eval_freq = 0
    with CountScalarReads():
        assert len(train(config, tmp_path, progress=False)["losses"]) == 10
    assert CountScalarReads.reads == 0
    assert flushes == [5, 5]


def test_skipped_step_changes_neither_weights_nor_adam_state():
    """skip_nonfinite_step with found_inf=1 and NaN gradients leaves the weights, both Adam
    moments and the step count bitwise as they were; with found_inf=0 it is Adam's step."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
    reference = torch.nn.Parameter(weight.detach().clone())
    plain = torch.optim.Adam([reference], lr=0.1)
    for grad in (torch.randn(5), torch.randn(5)):
        weight.grad, reference.grad = grad.clone(), grad.clone()
        skip_nonfinite_step(optimizer, torch.tensor(0.0))
        plain.step()
    torch.testing.assert_close(weight, reference, rtol=1e-6, atol=1e-7)
    before = {k: v.clone() for k, v in optimizer.state[weight].items()}, weight.detach().clone()
    weight.grad = torch.full((5,), float("nan"))
    skip_nonfinite_step(optimizer, torch.tensor(1.0))
    assert torch.equal(weight.detach(), before[1])
    for key, value in optimizer.state[weight].items():
        assert torch.equal(value, before[0][key]), key
    with pytest.raises(ValueError, match="fused=True"):
        skip_nonfinite_step(plain, torch.tensor(0.0))


def test_bf16_autocast_close_to_fp32(tmp_path):
    """12 steps with the network under bfloat16 autocast: finite, falling losses within 1e-2
    (relative) of the float32 run's (measured <= 3e-4; the untrained U-Net's output is tiny,
    so bf16 rounding barely shows), yet not identical (autocast was on); weights stay fp32."""
    runs = {}
    for precision in ("no", "bf16"):
        config = tiny_config(12)
        config.model.dropout = 0.0
        config.training.mixed_precision = precision
        config.training.eval_freq = 0
        runs[precision] = train(config, tmp_path / precision, progress=False)["losses"]
    fp32, bf16 = runs["no"], runs["bf16"]
    assert all(math.isfinite(v) for v in bf16)
    assert sum(bf16[-4:]) < 0.8 * sum(bf16[:4])
    assert bf16 == pytest.approx(fp32, rel=1e-2) and bf16 != fp32
    state = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "latest.pt", "cpu")
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    config.training.mixed_precision = "fp16"
    with pytest.raises(ValueError, match="mixed_precision='fp16'; valid: no, bf16"):
        train(config, tmp_path / "fp16", progress=False)


def test_train_same_seed_same_losses(tmp_path):
    a = train(tiny_config(4), tmp_path / "a", progress=False)["losses"]
    b = train(tiny_config(4), tmp_path / "b", progress=False)["losses"]
    assert a == b


def test_train_resume_is_bitwise(tmp_path):
    """6 steps in one go == 3 steps, stop, resume to 6 (dropout on: the RNG state resumes)."""
    full = train(tiny_config(6), tmp_path / "full", progress=False)
    first = train(tiny_config(3), tmp_path / "split", progress=False)
    second = train(tiny_config(6), tmp_path / "split", progress=False)
    assert second["start_step"] == 3 and second["step"] == 6
    assert first["losses"] + second["losses"] == full["losses"]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt", "cpu")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "latest.pt", "cpu")
    assert a["step"] == b["step"] == 6
    for part in ("model",):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key


def test_checkpoints_load_with_weights_only(tmp_path):
    train(tiny_config(2), tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert set(state) >= {"model", "ema", "optimizer", "step", "rng"}
    assert state["step"] == 2 and isinstance(state["rng"]["torch"], torch.Tensor)


def test_failed_save_never_replaces_latest(tmp_path, monkeypatch):
    train(tiny_config(2), tmp_path, progress=False)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:100])        # a partial file, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(4), tmp_path, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = tmp_path / "checkpoints"
    assert load_checkpoint(ckpt_dir / "latest.pt", "cpu")["step"] == 2
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_of_another_model_is_refused_untouched(tmp_path):
    train(tiny_config(2), tmp_path, progress=False)
    latest = tmp_path / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    with pytest.raises(ValueError, match=r"latest\.pt does not match .*'"):
        train(tiny_config(4, ch_mult=(1, 1)), tmp_path, progress=False)
    assert latest.read_bytes() == before


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = compose.build_loss_fn

    def nan_after_three(config, sde):
        loss_fn = real(config, sde)
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(1)
            loss = loss_fn(*args, **kwargs)
            return loss * float("nan") if len(calls) > 3 else loss
        return wrapped

    monkeypatch.setattr(compose, "build_loss_fn", nan_after_three)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(tiny_config(6), tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt", "cpu")["step"] == 2


def test_main_train_mode_digits(tmp_path):
    cmd = [sys.executable, "main.py", "--mode", "train", "--config", "configs/ve/ddpm_digits.py",
           "--workdir", str(tmp_path), "--config.device=cpu", "--config.training.n_iters=2",
           "--config.training.batch_size=8", "--config.model.nf=16"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 2 and "VESDE" in metrics["sde"]
    assert (tmp_path / "checkpoints" / "latest.pt").exists()


def test_corrupt_latest_falls_back_to_the_newest_numbered_checkpoint(tmp_path, caplog):
    """A truncated latest.pt (step 6) next to a good checkpoint_4.pt: training warns and
    resumes from step 4, and its steps 5-8 give bitwise the model of an uninterrupted 8-step
    run (so it really continued from checkpoint_4's state, RNGs included). With no loadable
    checkpoint left, a one-line CheckpointError (a ValueError) says what to do."""
    full = train(tiny_config(8), tmp_path / "full", progress=False)
    train(tiny_config(6), tmp_path / "split", progress=False)
    folder = tmp_path / "split" / "checkpoints"
    raw = (folder / "latest.pt").read_bytes()
    (folder / "latest.pt").write_bytes(raw[:len(raw) // 2])
    caplog.set_level(logging.WARNING, logger="run_lib.checkpoints")
    resumed = train(tiny_config(8), tmp_path / "split", progress=False)
    assert resumed["start_step"] == 4 and resumed["losses"] == full["losses"][4:]
    assert "latest.pt cannot be read" in caplog.text and "checkpoint_4.pt (step 4)" in caplog.text
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt", "cpu")
    b = load_checkpoint(folder / "latest.pt", "cpu")
    assert b["step"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    from run_lib.checkpoints import CheckpointError
    for path in folder.glob("checkpoint_*.pt"):
        path.write_bytes(b"")
    (folder / "latest.pt").write_bytes(raw[:100])
    with pytest.raises(CheckpointError, match="no checkpoint_<step>.pt next to it loads") as error:
        train(tiny_config(10), tmp_path / "split", progress=False)
    assert "\n" not in str(error.value)


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum((a[k].double() - b[k].double()).square().sum().item() for k in a))


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_warmup_samples_trained_weights_after_a_short_run(tmp_path, warmup):
    """ema_rate 0.999 (the ncsn / ncsnv2 / ncsnpp / ddpmpp digits configs) and 30 steps.
    Without the warm-up the EMA is 0.999^30 = 97 % the initial weights: far from the trained
    ones. With config.model.ema_warmup (the digits default) the n-th decay is
    min(0.999, (1 + n) / (10 + n)), so the EMA spans the last few steps: measured distance to
    the trained weights about 0.1 of that to the initial ones; bound 0.3. The weights that
    sample mode loads (load_score_fn) are these EMA weights."""
    from run_lib import evaluate
    config = tiny_config(30)
    config.model.dropout = 0.0
    config.model.ema_rate = 0.999
    config.model.ema_warmup = warmup
    config.training.eval_freq = 0
    torch.manual_seed(int(config.seed))
    initial = {k: v.clone() for k, v in compose.build_model(config).named_parameters()}
    train(config, tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pt", "cpu")
    trained = {k: state["model"][k] for k in initial}
    ema = {k: state["ema"]["shadow"][k] for k in initial}
    assert _distance(initial, trained) > 0.1            # the run moved the weights
    to_trained, to_initial = _distance(ema, trained), _distance(ema, initial)
    if warmup:
        assert to_trained < 0.3 * to_initial, (to_trained, to_initial)
    else:
        assert to_initial < 0.1 * to_trained, (to_trained, to_initial)
    loaded = dict(evaluate.load_score_fn(config, tmp_path, "cpu").model.named_parameters())
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_progress_in_a_log_file_is_a_few_lines(tmp_path, capfd, monkeypatch):
    """With stderr not a terminal (a log file), the training progress writes log lines at
    most every interval, never carriage-return bar updates: 12 steps with a 0 s interval give
    one line per step, with the default 30 s interval none."""
    import samplers.harness as harness
    config = tiny_config(12)
    config.training.eval_freq = 0
    train(config, tmp_path / "a", progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err and "train: 12/12" not in err
    real = harness._LogProgress.__init__
    monkeypatch.setattr(harness._LogProgress, "__init__",
                        lambda self, total, desc, interval=30.0: real(self, total, desc, 0.0))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(harness.log, "info", lambda msg, *args: print(msg % args, file=sys.stderr))
        train(config, tmp_path / "b", progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err and "train: 12/12" in err and "train: 1/12" in err
