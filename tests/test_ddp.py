"""Multi-process training (torchrun, DistributedDataParallel, gloo on the CPU) against a
single process with the same global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_lib import train as train_module
from run_lib.train import DistContext, load_checkpoint, train

from test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]

# Tiny run of test_train.tiny_config, as command-line overrides (global batch 16 = 2 x 8).
OVERRIDES = ["--config.device=cpu", "--config.model.nf=16", "--config.model.dropout=0.0",
             "--config.training.batch_size=16", "--config.training.log_freq=2",
             "--config.training.snapshot_freq=4",
             "--config.training.snapshot_freq_for_preemption=2",
             "--config.optim.warmup=5", "--config.training.eval_freq=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(workdir, n_iters):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "main.py", "--mode", "train",
           "--config", "configs/vp/ddpm_digits.py", "--workdir", str(workdir),
           f"--config.training.n_iters={n_iters}", *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tensorboard_scalars(folder, tag) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    values = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


def single_process_run(workdir, n_iters):
    config = tiny_config(n_iters)
    config.model.dropout = 0.0
    config.training.eval_freq = 0
    return train(config, workdir, progress=False)


def test_ddp_two_steps_rank0_writes_same_losses(tmp_path):
    """One 2-process launch, 2 steps: the losses of the global batches equal those of one
    process (rel 1e-5; measured <= 1e-7), and only rank 0 wrote files."""
    ddp = tmp_path / "ddp"
    torchrun(ddp, 2)
    single = single_process_run(tmp_path / "single", 2)
    ddp_losses = tensorboard_scalars(ddp / "tensorboard", "train/loss")
    assert [ddp_losses[s] for s in sorted(ddp_losses)] == pytest.approx(single["losses"],
                                                                       rel=1e-5)
    assert len(ddp_losses) == 2 and single["losses"][0] != single["losses"][1]
    assert len(list((ddp / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoints", "config.json",
                                                     "metrics.json", "tensorboard"]
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == ["latest.pt"]
    assert len(load_checkpoint(ddp / "checkpoints" / "latest.pt", "cpu")["rng"]["ranks"]) == 2


@pytest.mark.slow
def test_ddp_two_processes_match_one_and_resume(tmp_path):
    """3 steps on 2 gloo processes, stop, resume on 2 processes to 6 == 6 steps in one
    process with the same global batch of 16 (dropout 0).

    Every rank draws the times and noise of the whole global batch from the same generator
    and the network outputs are all-gathered, so the two runs differ only in float summation
    order (a conv's weight gradient over 8 rows instead of 16, then a sum of two): measured
    <= 3e-7 on the weights after 6 steps, while steps 5 and 6 alone move them by 4e-3.
    Tolerance 1e-5. About 50 s on 2 busy cores (two launches of three processes each).
    """
    ddp = tmp_path / "ddp"
    torchrun(ddp, 3)
    second = torchrun(ddp, 6)
    assert "resumed from" in second.stderr and "at step 3" in second.stderr

    single = single_process_run(tmp_path / "single", 6)

    # losses of the same global batches (TensorBoard of the two DDP launches vs the return)
    ddp_losses = tensorboard_scalars(ddp / "tensorboard", "train/loss")
    assert sorted(ddp_losses) == list(range(1, 7))
    assert [ddp_losses[s] for s in range(1, 7)] == pytest.approx(single["losses"], rel=1e-5)

    a = load_checkpoint(ddp / "checkpoints" / "latest.pt", "cpu")
    b = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt", "cpu")
    assert a["step"] == b["step"] == 6 and len(a["rng"]["ranks"]) == 2
    step4 = load_checkpoint(ddp / "checkpoints" / "checkpoint_4.pt", "cpu")
    moved = max((b["model"][k] - step4["model"][k]).abs().max().item() for k in b["model"])
    assert moved > 1e-3         # steps 5 and 6 alone move the weights 100x the tolerance
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-5)
    for key in b["ema"]["shadow"]:
        torch.testing.assert_close(a["ema"]["shadow"][key], b["ema"]["shadow"][key],
                                   rtol=0, atol=1e-5)

    # rank 0 alone wrote: one event file per launch, the files of one process
    assert len(list((ddp / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoints", "config.json",
                                                     "metrics.json", "tensorboard"]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["checkpoint_4.pt",
                                                                      "latest.pt"]
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["start_step"] == 3 and metrics["step"] == 6


def test_global_batch_must_divide_by_world_size(tmp_path, monkeypatch):
    """A global batch of 16 on 3 processes is refused before anything is written."""
    monkeypatch.setattr(train_module, "init_distributed",
                        lambda name: (DistContext(rank=0, world_size=3), torch.device("cpu")))
    with pytest.raises(ValueError, match=r"batch_size=16 .* not divisible by the 3 processes"):
        train(tiny_config(2), tmp_path, progress=False)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
