"""Image training loop (run_lib.train.train) on the 8x8 digits with a tiny DDPM U-Net:
learning, determinism, bitwise resume, atomic checkpoints, refused checkpoints, NaN stop."""
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.vp.ddpm_digits import get_config
from run_lib.train import load_checkpoint, train

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


def test_train_loss_finite_and_decreasing(tmp_path):
    config = tiny_config(40)
    config.model.dropout = 0.0
    losses = train(config, tmp_path, progress=False)["losses"]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.6 * first, (first, last)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["nf"] == 16
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == sorted(["latest.pt"] + [f"checkpoint_{s}.pt" for s in range(4, 41, 4)])


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
    import sde_lib
    real = sde_lib.build_loss_fn

    def nan_after_three(config, sde):
        loss_fn = real(config, sde)
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(1)
            loss = loss_fn(*args, **kwargs)
            return loss * float("nan") if len(calls) > 3 else loss
        return wrapped

    monkeypatch.setattr(sde_lib, "build_loss_fn", nan_after_three)
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
