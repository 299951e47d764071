"""Gradient accumulation (config.training.batch_per_device): K micro-batches per optimizer step
give the one-micro-batch run, one process and two (DDP, gloo), with one gradient all-reduce
per optimizer step; resume, logging and the config checks.

Run as a script under torchrun (2 processes), this file is the DDP worker of
``test_ddp_accumulation_one_all_reduce_per_step``."""
import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from run_lib import compose                                          # noqa: E402
from run_lib.distributed import DistContext, init_distributed, micro_batches   # noqa: E402
from run_lib.state import build_train_state                          # noqa: E402
from run_lib.train import Objective, load_checkpoint, train, train_step  # noqa: E402
from test_train import tiny_config                                  # noqa: E402

STEPS, BATCH = 3, 16


class NoRewind(torch.Generator):
    """A generator whose set_state does nothing: every micro-batch pass draws afresh."""

    def set_state(self, state):
        pass


def run_steps(per_device: int, ctx=DistContext(), *, precision="no", conditional=False,
              before_steps=None, rewind=True, configure=None, steps=STEPS) -> dict:
    """``steps`` optimizer steps of the tiny digits DDPM (dropout 0) on seeded global batches
    of BATCH rows (this rank's rows rank::W), with batch_per_device ``per_device``; the
    weights, EMA, optimizer state, counters and losses after them. ``configure(config)``
    changes the config first."""
    config = tiny_config(steps)
    config.model.dropout = 0.0
    config.training.batch_per_device = per_device
    config.training.mixed_precision = precision
    if conditional:
        config.model.num_classes = 10
        config.training.p_uncond = 0.5      # labels dropped per row, from the noise generator
    if configure is not None:
        configure(config)
    device = torch.device("cpu")
    state = build_train_state(config, device, ctx)
    objective = Objective(config, compose.build_sde(config), state.model, ctx, device)
    if before_steps is not None:
        before_steps(objective)
    if not rewind:
        fresh = NoRewind()
        torch.Generator.set_state(fresh, state.noise_gen.get_state())
        state.noise_gen = fresh
    g = torch.Generator().manual_seed(5)
    state.model.train()
    losses, images = [], set()
    for _ in range(steps):
        x = torch.rand(BATCH, 1, 8, 8, generator=g) * 2 - 1
        labels = torch.randint(0, 10, (BATCH,), generator=g)
        r, w = ctx.rank, ctx.world_size
        stats = train_step(state, x[r::w], labels[r::w], objective)
        losses.append(stats.loss.item())
        images.add(stats.images)
    adam = state.optimizer.state_dict()["state"]
    return {"micro_batches": objective.micro_batches, "losses": losses, "step": state.step,
            "images": images,
            "ema_updates": state.ema.num_updates,
            "adam_steps": [float(s["step"]) for s in adam.values()],
            "model": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
            "ema": [v.clone() for v in state.ema.shadow],
            "exp_avg_sq": [s["exp_avg_sq"].clone() for s in adam.values()],
            "noise": state.noise_gen.get_state(),
            "levels": getattr(objective.loss_fn, "level_sampler", None)}


def max_difference(a: dict, b: dict) -> dict:
    return {"model": max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]),
            "ema": max((p - q).abs().max().item() for p, q in zip(a["ema"], b["ema"])),
            "exp_avg_sq": max(((p - q).norm() / p.norm()).item()      # relative, per tensor
                              for p, q in zip(a["exp_avg_sq"], b["exp_avg_sq"]))}


def initial_weights() -> dict:
    torch.manual_seed(int(tiny_config().seed))
    return compose.build_model(tiny_config()).state_dict()


@pytest.mark.parametrize("conditional", [False, True])
def test_four_micro_batches_equal_one_batch(conditional):
    """3 steps of a global batch of 16 as one batch and as K = 4 micro-batches of 4: the same
    losses (rel 1e-6), weights and EMA weights (abs 1e-5; measured <= 4e-7, float32 rounding
    of per-block convolutions), Adam second moments (relative norm 1e-4), step counters (3 optimizer
    steps, 3 EMA updates, not 12) and the same noise generator state afterwards, while the 3
    steps move the weights by > 2e-3 (200x the tolerance). With class labels and
    p_uncond = 0.5, the labels are dropped per row alike (they come from the rewound noise
    generator)."""
    one = run_steps(0, conditional=conditional)
    four = run_steps(4, conditional=conditional)
    assert (one["micro_batches"], four["micro_batches"]) == (1, 4)
    assert four["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert one["losses"][0] != one["losses"][1]
    assert one["step"] == four["step"] == STEPS and one["ema_updates"] == four["ema_updates"] == STEPS
    assert one["adam_steps"] == four["adam_steps"] == [float(STEPS)] * len(one["adam_steps"])
    assert torch.equal(one["noise"], four["noise"])
    assert one["images"] == four["images"] == {BATCH}     # StepStats: the global batch
    difference = max_difference(one, four)
    assert difference["model"] < 1e-5 and difference["ema"] < 1e-5, difference
    assert difference["exp_avg_sq"] < 1e-4, difference
    start = initial_weights()
    moved = max((one["model"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 2e-3


def test_hybrid_loss_with_loss_aware_levels_accumulates_exactly():
    """Improved DDPM's hybrid loss with a variance head and loss-aware level sampling on a
    4-level chain: the level sampler's history is updated once per optimizer step, by the
    last micro-batch pass (which sees every row), so after 5 steps (80 draws; the law is no
    longer uniform once every level holds 10 values) its history and counts, the losses and
    the weights (abs 1e-5) equal the one-batch run's."""
    def hybrid(config):
        config.sde.num_scales, config.sde.beta_max = 4, 2.0     # betas <= 0.5
        config.model.learn_sigma = True
        config.training.continuous = False
        config.training.reduce_mean = True
        config.training.loss = "hybrid"
        config.training.vlb_weight = 0.001
        config.training.level_importance = True
    one = run_steps(0, configure=hybrid, steps=5)
    four = run_steps(4, configure=hybrid, steps=5)
    a, b = one["levels"], four["levels"]
    assert int(a.count.sum()) == int(b.count.sum()) == 5 * BATCH
    assert bool((a.count >= a.history).all())         # the last steps drew from the loss law
    assert torch.equal(a.count, b.count)
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-7)
    assert four["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert max_difference(one, four)["model"] < 1e-5


def test_micro_batches_see_the_same_draws_as_the_full_batch():
    """Without rewinding the noise generator between micro-batches (each pass drawing fresh
    times and noise) the 4-micro-batch run would differ from the one-batch run by far more
    than the tolerance above: the test above can fail."""
    one, fresh = run_steps(0), run_steps(4, rewind=False)
    assert max_difference(one, fresh)["model"] > 1e-4
    assert fresh["losses"][1] != pytest.approx(one["losses"][1], rel=1e-3)


def first_step_gradient(per_device: int, precision: str, monkeypatch) -> torch.Tensor:
    """The clipped gradient that train_step hands Adam at the first step (all parameters)."""
    from run_lib import train as train_module
    real, grads = train_module.skip_nonfinite_step, []

    def record(optimizer, found_inf):
        if not grads:
            grads.append(torch.cat([p.grad.flatten() for group in optimizer.param_groups
                                    for p in group["params"]]))
        real(optimizer, found_inf)
    monkeypatch.setattr(train_module, "skip_nonfinite_step", record)
    run_steps(per_device, precision=precision, conditional=True)
    return grads[0]


def test_bf16_micro_batches_close_to_one_batch(monkeypatch):
    """bf16 autocast with labels dropped (p_uncond 0.5): the first step's gradient with K = 4
    micro-batches is as close to the one-batch bf16 gradient as bf16 is to float32 (relative
    norm of the difference: measured 3.6e-3 and 4.4e-3; a CPU bf16 convolution rounds
    differently for another batch size), bound 2e-2; in float32 it is 5e-7 (bound 1e-5)."""
    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()
    fp32 = first_step_gradient(0, "no", monkeypatch)
    bf16 = first_step_gradient(0, "bf16", monkeypatch)
    bf16_four = first_step_gradient(4, "bf16", monkeypatch)
    assert relative(first_step_gradient(4, "no", monkeypatch), fp32) < 1e-5
    assert 0 < relative(bf16, fp32) < 2e-2          # autocast was on
    assert relative(bf16_four, bf16) < 2e-2
    assert relative(bf16_four, fp32) < 2e-2


def test_micro_batch_count_and_errors():
    """K = ceil(share / batch_per_device) with equal micro-batches; a one-line ValueError
    names both numbers and a fitting divisor otherwise."""
    assert micro_batches(128, 0, 1) == micro_batches(128, None, 1) == 1
    assert micro_batches(128, 32, 1) == 4 and micro_batches(128, 32, 2) == 2
    assert micro_batches(120, 48, 1) == 3          # 3 micro-batches of 40 <= 48
    assert micro_batches(16, 64, 2) == 1           # a share smaller than batch_per_device
    with pytest.raises(ValueError, match=r"batch_per_device=48 splits the per-process batch of "
                                         r"128 .* 3 unequal micro-batches; use a divisor of "
                                         r"128 such as 32") as error:
        micro_batches(128, 48, 1)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="batch_per_device=-1 must be >= 0"):
        micro_batches(16, -1, 1)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        micro_batches(16, 0, 3)


def test_config_validation_names_the_keys():
    """validate_config refuses a batch_per_device that splits unevenly or is not an integer,
    and a non-boolean model.checkpointing, naming the key."""
    from run_lib.validate import ConfigError, validate_config
    config = tiny_config()
    config.training.batch_per_device = 6
    with pytest.raises(ConfigError, match=r"batch_per_device=6 splits the per-process batch "
                                          r"of 16 .* such as 4"):
        validate_config(config, "train")
    config = tiny_config()
    config.training.batch_per_device = 4
    config.model.checkpointing = True
    validate_config(config, "train")
    del config.model["checkpointing"]           # a fresh key (ConfigDict keeps a key's type)
    config.model.checkpointing = "yes"
    with pytest.raises(ConfigError, match="config.model.checkpointing"):
        validate_config(config, "train")
    config = tiny_config()
    del config.training["batch_per_device"]
    config.training.batch_per_device = 2.5
    with pytest.raises(ConfigError, match="config.training.batch_per_device"):
        validate_config(config, "train")


def test_accumulated_run_resumes_bitwise_and_logs_global_images(tmp_path, caplog):
    """train() with batch_per_device 4 (K = 4; dropout on): 4 steps in one go == 2 steps,
    stop, resume to 4, bitwise (weights, EMA); the log announces the micro-batches and
    reports images/s (of the global batch: StepStats.images, checked above)."""
    caplog.set_level(logging.INFO, logger="run_lib.train")

    def config(n):
        c = tiny_config(n)
        c.training.batch_per_device = 4
        c.training.eval_freq = 0
        c.training.log_freq = 2
        return c
    full = train(config(4), tmp_path / "full", progress=False)
    train(config(2), tmp_path / "split", progress=False)
    second = train(config(4), tmp_path / "split", progress=False)
    assert second["start_step"] == 2 and second["losses"] == full["losses"][2:]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt", "cpu")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "latest.pt", "cpu")
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k])
               for k in a["ema"]["shadow"])
    assert "gradient accumulation: 4 micro-batches of 4 rows per process" in caplog.text
    assert "images/s" in caplog.text

    from test_ddp import tensorboard_scalars
    per_s = tensorboard_scalars(tmp_path / "full" / "tensorboard", "train/images_per_s")
    assert sorted(per_s) == [2, 4] and all(v > 0 for v in per_s.values())


# ----------------------------------------------------------------------------- DDP

def _ddp_worker(out: Path) -> None:
    """Each of 2 gloo processes: 3 steps with K = 1, K = 4 and K = 4 without no_sync, counting
    the calls of a DDP comm hook (one per gradient bucket all-reduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    torch.set_num_threads(1)
    ctx, _ = init_distributed("cpu")
    results = {}
    for name, per_device, no_sync in (("k1", 0, True), ("k4", 2, True),
                                      ("k4_all_reduce_each", 2, False)):
        calls = []

        def count(objective, calls=calls, no_sync=no_sync):
            def hook(state, bucket):
                calls.append(1)
                return allreduce_hook(None, bucket)
            objective.net.register_comm_hook(None, hook)
            if not no_sync:
                objective.net.no_sync = contextlib.nullcontext
        result = run_steps(per_device, ctx, before_steps=count)
        result["all_reduces"] = len(calls)
        results[name] = result
    if ctx.is_main:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


def test_ddp_accumulation_one_all_reduce_per_step(tmp_path):
    """2 gloo processes, global batch 16 (8 per process), batch_per_device 2 (K = 4): one
    gradient all-reduce (per bucket) per optimizer step, as with K = 1, where all-reducing
    after every micro-batch (no no_sync) makes 4 times as many; the weights and EMA weights
    equal the K = 1 run's (abs 1e-5; measured <= 4e-7) and the losses (rel 1e-6)."""
    from test_ddp import free_port
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(out, weights_only=False)
    k1, k4, each = results["k1"], results["k4"], results["k4_all_reduce_each"]
    assert (k1["micro_batches"], k4["micro_batches"]) == (1, 4)
    buckets = k1["all_reduces"] // STEPS
    assert buckets >= 1 and k1["all_reduces"] == STEPS * buckets
    assert k4["all_reduces"] == STEPS * buckets
    assert each["all_reduces"] == 4 * STEPS * buckets
    assert k4["losses"] == pytest.approx(k1["losses"], rel=1e-6)
    assert k4["step"] == k4["ema_updates"] == STEPS and k4["images"] == {BATCH}
    difference = max_difference(k1, k4)
    assert difference["model"] < 1e-5 and difference["ema"] < 1e-5, difference
    # the single-process one-batch run: the same (DDP == one process, tests/test_ddp.py)
    single = run_steps(0)
    assert max_difference(single, k4)["model"] < 1e-5


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
