"""The training loop: one loop for every data set (2-D toy mixtures, digits, CIFAR-10, MNIST,
image folders), in the spirit of nanoGPT's train.py:

    state = build_train_state(config)          # model, EMA, Adam, RNGs, step (run_lib.state)
    resume from checkpoints/latest.pt          # or the newest loadable checkpoint_<step>.pt
    while state.step < n_iters:
        x, labels = next(batches)
        stats = train_step(state, x, labels, objective)     # DSM loss -> Adam -> EMA
        actions.after_step(state, stats)                    # log, checkpoint, eval, grid

Checkpoints (run_lib.checkpoints): checkpoints/checkpoint_<step>.pt every
config.training.snapshot_freq steps, checkpoints/latest.pt every
config.training.snapshot_freq_for_preemption steps and at the end, written atomically. A run
started in a work directory that holds latest.pt resumes from it with the same state: the
model, EMA and optimizer, the RNG states, and the data order (the batches of an epoch depend
on (seed, epoch) only, so the loop skips the batches already used in the current epoch).
With the same seed and config, a run interrupted and resumed gives bitwise the same model as
an uninterrupted one on the CPU.

No host-device synchronisation per step. The loss, the gradient norm and a "non-finite"
flag stay on the device; they are read back (one sync) only at log steps and before every
checkpoint write. A step whose loss or gradient norm is not finite does not change the
weights: the fused Adam kernel takes that flag as ``found_inf`` and skips the update of the
weights, both moments and the step count on the device (the EMA still takes its update
towards the unchanged weights, so it stays finite). Training then stops at the next
read-back with the number of the first bad step, before any checkpoint is written, so the
last good checkpoint stays the newest one.

Scheduled evaluation (config.training.eval_freq) with the EMA weights: the DSM loss of fixed
test batches and, for data with a closed-form density (the toy mixtures), the relative score
error against the exact score (run_lib.exact) and, once, the exact score's loss on the same
batches (the floor). Sample pictures (config.training.sample_freq): an image grid, or a
scatter plot of 2-D points.

Mixed precision (config.training.mixed_precision='bf16'): torch.autocast in bfloat16 around
the network's forward only; the weights, the optimizer and the loss stay float32.

Gradient accumulation (config.training.batch_per_device > 0): config.training.batch_size
stays the global batch of one optimizer step; each process runs its share of it in K equal
micro-batches of at most batch_per_device rows (run_lib.distributed.micro_batches). The
step's loss is evaluated K times with the same times, noise, label drops and levels (the
noise generator, and a stateful loss's level sampler, are rewound before each pass), the
network running on one micro-batch per pass (NetworkForward.micro_batch); only the last
pass, which sees every row's output, updates the level sampler. The gradients of the K
passes add up to the full batch's, so the run equals the one-micro-batch run up to float
rounding (dropout masks excepted); then one clipping, one Adam step, one EMA update: the
step count, the learning-rate schedule and the EMA count optimizer steps. Under DDP the
first K - 1 backward passes run in no_sync(): one gradient all-reduce per optimizer step.

Several processes (torchrun, WORLD_SIZE > 1): see run_lib.distributed. Rank 0 alone writes
logs, TensorBoard, config.json, sample pictures and checkpoints; all ranks resume from the
same checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import samplers
from samplers.harness import progress_bar

from . import compose
from .checkpoints import checkpoint_dir, load_latest, read_checkpoint
from .datasets import build_dataset
from .distributed import (DistContext, NetworkForward, init_distributed, interleave_into_global,
                          micro_batches)
from .evaluate import balanced_labels, with_class_labels
from .exact import relative_score_error
from .images import picture, save_png
from .state import TrainState, build_train_state, lr_at, skip_nonfinite_step
from .utils import save_atomic, write_config

__all__ = ["train", "train_step", "Objective", "drop_labels", "StepStats", "StepRecord",
           "Evaluator", "ScheduledActions", "sample_grid", "mean_test_loss", "ema_test_loss",
           "load_checkpoint", "lr_at", "skip_nonfinite_step", "DistContext", "init_distributed",
           "NetworkForward"]

log = logging.getLogger(__name__)

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16}

#: Seed offsets (config.seed + offset) of the sample pictures and the evaluation draws.
GRID_SEED, EVAL_SEED = 2, 3


def load_checkpoint(path, device) -> dict:
    """The checkpoint dict of ``path`` (weights_only=True; see run_lib.checkpoints)."""
    return read_checkpoint(path, device)


# ----------------------------------------------------------------------------- data

def batches_forever(dataset, config, start_step: int, device, ctx: DistContext, *,
                    batch_key: str = "training.batch_size"):
    """(x, labels) batches of this rank from optimizer step ``start_step`` on: epoch after
    epoch of dataset.batches(seed=config.seed, epoch=e, rank, world_size), the first epoch
    entered part-way. Batches of B / W rows, B = config.<batch_key> (the classifier's loop
    passes "classifier.batch_size"); on CUDA copied from pinned memory without blocking the
    host. A global batch larger than the data set raises a ValueError at once (not at the
    first batch)."""
    group, key = batch_key.split(".")
    global_batch = int(config[group][key])
    batch_size = global_batch // ctx.world_size
    per_epoch = len(dataset) // ctx.world_size // batch_size
    if per_epoch == 0:
        raise ValueError(f"config.{batch_key}={global_batch} is larger "
                         f"than the data set ({len(dataset)} items); use at most {len(dataset)}")
    return _batches(dataset, config, start_step, per_epoch, batch_size, device, ctx)


def _batches(dataset, config, start_step: int, per_epoch: int, batch_size: int, device,
             ctx: DistContext):
    """The generator of ``batches_forever`` (``per_epoch`` batches of ``batch_size`` rows)."""
    epoch, skip = divmod(start_step, per_epoch)
    pin = device.type == "cuda"
    while True:
        batches = dataset.batches(batch_size, seed=int(config.seed), epoch=epoch,
                                  rank=ctx.rank, world_size=ctx.world_size)
        for x, labels in itertools.islice(batches, skip, None):
            if pin:
                x, labels = x.pin_memory(), labels.pin_memory()
            yield x.to(device, non_blocking=pin), labels.to(device, non_blocking=pin)
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- one step

def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int,
                generator: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): each label (B,) is
    replaced by ``null_label`` with probability ``p_uncond``, drawn from ``generator`` (the
    step's noise generator, so a resumed run draws the same)."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


class Objective:
    """The DSM loss of one global batch as this rank computes it, and the step's settings.
    With config.training.p_uncond > 0 the labels first go through ``drop_labels``.

    The network is wrapped in DistributedDataParallel with several ranks and run through
    NetworkForward (bf16 autocast, all-gather of the ranks' rows); ``loss(x, labels,
    generator)`` takes this rank's rows (B/W, ...) and returns the 0-d loss of the global
    batch. ``grad_scale`` = W undoes DDP's average over ranks of per-rank gradients.

    ``micro_batches`` = K (config.training.batch_per_device); inside ``micro_batch(k)`` the
    loss runs the network on micro-batch k only (NetworkForward.micro_batch), and under DDP
    outside the last one without the gradient all-reduce (DistributedDataParallel.no_sync)."""

    def __init__(self, config, sde, model, ctx: DistContext, device: torch.device):
        net = model
        if ctx.world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        forward = NetworkForward(net, amp_dtype=MIXED_PRECISION[config.training.mixed_precision],
                                 rank=ctx.rank, world_size=ctx.world_size)
        self.net, self.forward = net, forward
        self.micro_batches = micro_batches(config.training.batch_size,
                                           config.training.get("batch_per_device"),
                                           ctx.world_size)
        self.score_fn = compose.build_score_fn(config, sde, forward)
        self.loss_fn = compose.build_loss_fn(config, sde)
        self.conditional = bool(config.model.get("num_classes"))
        self.null_label = compose.null_label(config)
        self.p_uncond = float(config.training.get("p_uncond", 0.0) or 0.0)
        self.ctx, self.config = ctx, config
        self.grad_scale = float(ctx.world_size)
        self.grad_clip = float(config.optim.grad_clip)
        self.found_inf = torch.zeros((), device=device)

    @contextlib.contextmanager
    def micro_batch(self, k: int):
        """Pass k of the K of one optimizer step (see the class docstring)."""
        last = k == self.micro_batches - 1
        sync = (self.net.no_sync() if not last and self.ctx.world_size > 1
                else contextlib.nullcontext())
        with sync, self.forward.micro_batch(k, self.micro_batches):
            yield

    def rewind_point(self, generator: torch.Generator):
        """A function that puts back what the step's loss draws from and changes: the state
        of ``generator`` and of the loss's level sampler (loss-aware level sampling,
        sde_lib.LossAwareLevels: its history, updated by every loss call), as they are now.
        Copied on the device: no host synchronisation."""
        draws = generator.get_state()
        sampler = getattr(self.loss_fn, "level_sampler", None)
        kept = None if sampler is None else copy.deepcopy(vars(sampler))

        def rewind() -> None:
            generator.set_state(draws)
            if sampler is not None:
                vars(sampler).update(copy.deepcopy(kept))
        return rewind

    def loss(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        labels = interleave_into_global(labels, self.ctx) if self.conditional else None
        if labels is not None and self.null_label is not None:
            labels = drop_labels(labels, self.p_uncond, self.null_label, generator)
        return self.loss_fn(self.score_fn, interleave_into_global(x, self.ctx),
                            generator=generator, class_labels=labels)


class StepStats(NamedTuple):
    """What one step leaves on the device (0-d tensors) and the host knows (lr, images)."""
    loss: torch.Tensor
    grad_norm: torch.Tensor
    bad: torch.Tensor           # True when the loss or the gradient norm is not finite
    lr: float
    images: int                 # items of the global batch


def train_step(state: TrainState, x: torch.Tensor, labels: torch.Tensor,
               objective: Objective) -> StepStats:
    """One optimizer step on this rank's rows x (B/W, ...) and labels (B/W,): learning rate
    ``lr_at(step)``, DSM loss, backward (K = objective.micro_batches passes over the same
    draws, gradients accumulated: see the module docstring), gradient clipping at
    config.optim.grad_clip, Adam (skipped on the device when the loss or gradient norm is
    not finite), EMA update, step + 1. Reads nothing back to the host."""
    lr = lr_at(state.step, objective.config)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    num = objective.micro_batches
    rewind = objective.rewind_point(state.noise_gen) if num > 1 else None
    for k in range(num):
        if k:
            rewind()        # every pass: the step's times, noise, label drops and levels
        with objective.micro_batch(k):
            loss = objective.loss(x, labels, state.noise_gen)
            (loss * objective.grad_scale if objective.grad_scale != 1 else loss).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), objective.grad_clip)
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    objective.found_inf.copy_(bad)
    skip_nonfinite_step(state.optimizer, objective.found_inf)
    state.ema.update(state.model)
    state.step += 1
    return StepStats(loss.detach(), grad_norm.detach(), bad, lr,
                     x.shape[0] * objective.ctx.world_size)


class StepRecord:
    """Per-step loss, gradient norm and non-finite flag kept on the device until ``flush``."""

    def __init__(self):
        self.first_step, self.rows = 0, []

    def add(self, step: int, loss, grad_norm, bad) -> None:
        if not self.rows:
            self.first_step = step
        self.rows.append(torch.stack([loss.float(), grad_norm.float(), bad.float()]))

    def flush(self, latest: Path) -> list[tuple[int, float, float]]:
        """(step, loss, grad_norm) of the recorded steps (one host-device sync); raises
        FloatingPointError naming the first step with a non-finite loss or gradient."""
        if not self.rows:
            return []
        values = torch.stack(self.rows).cpu().tolist()
        first, self.rows = self.first_step, []
        for offset, (loss, grad_norm, bad) in enumerate(values):
            if bad:
                raise FloatingPointError(
                    f"non-finite loss {loss} (gradient norm {grad_norm}) at step "
                    f"{first + offset}; the weights were not updated by it and the last good "
                    f"checkpoint ({latest if latest.exists() else 'none yet'}) was kept")
        return [(first + i, loss, grad_norm) for i, (loss, grad_norm, _) in enumerate(values)]


# ----------------------------------------------------------------------------- evaluation

@contextlib.contextmanager
def ema_weights(model, ema):
    """The model in eval mode with the EMA weights; weights and mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with ema.average_parameters(model):
            yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def mean_test_loss(loss_fn, score_fn, test_batches, *, seed: int, device,
                   conditional: bool) -> float:
    """Mean DSM loss per item of ``test_batches`` (a list of (x, labels)) with times and
    noise from a generator seeded with ``seed`` (the same draws at every call, so values at
    different steps and of different score functions are comparable)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, labels in test_batches:
        x = x.to(device)
        loss = loss_fn(score_fn, x, generator=generator,
                       class_labels=labels.to(device) if conditional else None)
        total += loss.double() * x.shape[0]
        count += x.shape[0]
    return float(total) / count


def ema_test_loss(loss_fn, score_fn, model, ema, test_batches, *, seed: int, device,
                  conditional: bool) -> float:
    """``mean_test_loss`` with the EMA weights and the model in eval mode."""
    with ema_weights(model, ema):
        return mean_test_loss(loss_fn, score_fn, test_batches, seed=seed, device=device,
                              conditional=conditional)


def _with_null_label(score_fn, null_label: int):
    """score_fn(x, t) of a classifier-free guidance model with the null label on every row:
    its unconditional score."""
    def unconditional(x, t):
        return score_fn(x, t, torch.full((x.shape[0],), null_label, dtype=torch.long,
                                         device=x.device))
    return unconditional


class Evaluator:
    """The scheduled evaluation with the EMA weights: ``loss_ema``, the DSM loss of the first
    config.training.eval_batches test batches, and for data with a closed-form density
    ``score_error_ema`` (run_lib.exact.relative_score_error over
    config.eval.score_error_samples draws, t >= config.eval.score_error_eps). ``floor`` is
    the exact score's loss on the same batches and draws (None without a density).

    Class-conditional models: the score error is that of the unconditional score, the null
    label's (config.training.p_uncond > 0), against the exact score of the data; without a
    null label there is no unconditional score and no score error, and no floor either (the
    exact score is the unconditional one)."""

    def __init__(self, config, sde, model, ema, device: torch.device):
        test_set = build_dataset(config, "test")
        size = min(int(config.training.batch_size), len(test_set))
        self.batches = list(itertools.islice(
            test_set.batches(size, shuffle=False, seed=int(config.seed)),
            int(config.training.eval_batches)))
        amp = MIXED_PRECISION[config.training.mixed_precision]
        self.score_fn = compose.build_score_fn(config, sde, NetworkForward(model, amp_dtype=amp))
        self.loss_fn = compose.build_loss_fn(config, sde)     # its own: no shared state
        self.model, self.ema, self.sde, self.device = model, ema, sde, device
        self.seed = int(config.seed) + EVAL_SEED
        self.conditional = bool(config.model.get("num_classes"))
        self.density, self.floor = test_set.density, None
        self.score_error_fn = self.score_fn
        if self.conditional:
            null = compose.null_label(config)
            self.score_error_fn = None if null is None else _with_null_label(self.score_fn, null)
        if self.density is not None:
            self.score_error_options = dict(num_samples=int(config.eval.score_error_samples),
                                            eps=float(config.eval.score_error_eps))
            if not self.conditional:
                self.floor = mean_test_loss(self.loss_fn, self.density.score_fn(sde),
                                            self.batches, seed=self.seed, device=device,
                                            conditional=False)

    def __call__(self) -> dict[str, float]:
        with ema_weights(self.model, self.ema):
            values = {"loss_ema": mean_test_loss(self.loss_fn, self.score_fn, self.batches,
                                                 seed=self.seed, device=self.device,
                                                 conditional=self.conditional)}
            if self.density is not None and self.score_error_fn is not None:
                values["score_error_ema"] = relative_score_error(
                    self.score_error_fn, self.density, self.sde, device=self.device,
                    generator=torch.Generator().manual_seed(self.seed),
                    **self.score_error_options)
        return values


@torch.no_grad()
def sample_grid(config, sde, model, ema, *, device, method: str | None = None) -> torch.Tensor:
    """config.training.num_grid_samples samples (N, *data_shape) in model space, drawn with
    the EMA weights by ``method`` (default config.training.grid_sampler) from the prior
    noise of a generator seeded with config.seed + 2 (the same samples for the same weights)."""
    shape = (int(config.training.num_grid_samples), *compose.data_shape(config))
    labels = balanced_labels(shape[0], int(config.model.get("num_classes") or 0), device)
    score_fn = with_class_labels(compose.build_score_fn(config, sde, model), labels)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + GRID_SEED)
    with ema_weights(model, ema):
        return compose.sample(config, score_fn, sde, shape,
                              method=method or config.training.grid_sampler,
                              generator=generator, device=device).x


def grid_picture(config, x: torch.Tensor):
    """The (H, W, 3) uint8 picture of training samples: all of them, images at >= 32 px."""
    return picture(x, centered=bool(config.data.get("centered", True)), max_images=len(x),
                   min_pixels=32, padding=1)


# ----------------------------------------------------------------------------- actions

def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class ScheduledActions:
    """The work between optimizer steps, each at its own frequency (config.training): log
    (log_freq and the last step), checkpoint_<step>.pt (snapshot_freq), latest.pt
    (snapshot_freq_for_preemption and the last step), evaluation (eval_freq; needs an
    Evaluator) and the sample picture (sample_freq). Rank 0 writes; every rank joins the
    checkpoint's RNG gather."""

    def __init__(self, config, workdir, state: TrainState, sde, evaluator: Evaluator | None,
                 *, progress: bool):
        self.config, self.tcfg, self.sde, self.evaluator = config, config.training, sde, evaluator
        self.workdir, self.folder, self.ctx = Path(workdir), checkpoint_dir(workdir), state.ctx
        self.n_iters = int(self.tcfg.n_iters)
        self.writer = None
        if self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.workdir / "tensorboard"))
        self.record, self.losses, self.evals = StepRecord(), [], {}
        self.last_grad_norm = float("nan")
        self.bar = progress_bar(self.n_iters, progress and self.ctx.is_main, "train",
                                initial=state.step)
        self.window = [time.perf_counter(), 0, 0]      # start, images, steps

    def due(self, step: int) -> dict[str, bool]:
        """Which actions run after optimizer step ``step`` (1-based count)."""
        t, last = self.tcfg, step == self.n_iters
        return {"log": step % t.log_freq == 0 or last,
                "numbered": step % t.snapshot_freq == 0,
                "latest": step % t.snapshot_freq_for_preemption == 0 or last,
                "eval": self.evaluator is not None and step % int(t.eval_freq) == 0,
                "grid": self.ctx.is_main and int(t.sample_freq) > 0
                and step % int(t.sample_freq) == 0}

    def after_step(self, state: TrainState, stats: StepStats) -> None:
        self.record.add(state.step - 1, stats.loss, stats.grad_norm, stats.bad)
        self.window[1] += stats.images
        self.window[2] += 1
        self.bar.update(1)
        due = self.due(state.step)
        if due["log"] or due["numbered"] or due["latest"]:
            self.read_back()
        if due["log"]:
            self.log(state.step, stats.lr)
        if due["numbered"] or due["latest"]:
            self.save(state, numbered=due["numbered"], latest=due["latest"])
        if due["eval"]:
            self.evaluate(state.step)
        if due["grid"]:
            self.write_grid(state)

    def read_back(self) -> None:
        """The recorded steps to the host (the only sync); TensorBoard train/loss, grad_norm."""
        done = self.record.flush(self.folder / "latest.pt")   # raises on a bad step
        self.losses.extend(loss for _, loss, _ in done)
        self.last_grad_norm = done[-1][2] if done else self.last_grad_norm
        if self.writer is not None:
            for step, loss, grad_norm in done:
                self.writer.add_scalar("train/loss", loss, step + 1)
                self.writer.add_scalar("train/grad_norm", grad_norm, step + 1)

    def log(self, step: int, lr: float) -> None:
        now = time.perf_counter()
        start, images, steps = self.window
        seconds_per_step, images_per_s = (now - start) / steps, images / max(now - start, 1e-9)
        self.window = [now, 0, 0]
        if self.writer is None:
            return
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_s", images_per_s, step)
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
        log.info("step %d/%d loss %.5f lr %.2e grad_norm %.3f images/s %.1f eta %s", step,
                 self.n_iters, self.losses[-1], lr, self.last_grad_norm, images_per_s,
                 _eta((self.n_iters - step) * seconds_per_step))

    def save(self, state: TrainState, *, numbered: bool, latest: bool) -> None:
        checkpoint = state.state_dict()       # once, also when both files are due (a collective)
        if self.ctx.is_main and numbered:
            save_atomic(checkpoint, self.folder / f"checkpoint_{state.step}.pt")
        if self.ctx.is_main and latest:
            save_atomic(checkpoint, self.folder / "latest.pt")

    def evaluate(self, step: int) -> None:
        values = self.evals[step] = self.evaluator()
        for name, value in values.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        log.info("step %d evaluation (EMA weights): %s", step,
                 ", ".join(f"{name} {value:.5f}" for name, value in values.items()))

    def write_grid(self, state: TrainState) -> None:
        x = sample_grid(self.config, self.sde, state.model, state.ema, device=state.device)
        grid = grid_picture(self.config, x)
        save_png(grid, self.workdir / "samples" / f"grid_{state.step}.png")
        self.writer.add_image("samples/grid", grid, state.step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def metrics(self, state: TrainState, start_step: int, seconds: float) -> dict:
        """The run's summary: step, start_step, loss (last), losses (of this call), eval_losses
        ({step: EMA test loss}), seconds_per_step, sde; for closed-form data also
        score_errors ({step: relative score error}), relative_score_error (the last) and
        exact_score_test_loss (the floor of the EMA test loss)."""
        metrics = {"step": state.step, "start_step": start_step,
                   "loss": self.losses[-1] if self.losses else None, "losses": self.losses,
                   "eval_losses": {s: v["loss_ema"] for s, v in self.evals.items()},
                   "seconds_per_step": seconds / len(self.losses) if self.losses else None,
                   "sde": repr(self.sde)}
        if self.evaluator is not None and self.evaluator.density is not None:
            errors = {s: v["score_error_ema"] for s, v in self.evals.items()
                      if "score_error_ema" in v}
            metrics.update(score_errors=errors, exact_score_test_loss=self.evaluator.floor,
                           relative_score_error=errors[max(errors)] if errors else None)
        return metrics


# ----------------------------------------------------------------------------- the loop

def _check_config(config, ctx: DistContext) -> int:
    """Raise a ValueError for settings the loop cannot run; return the micro-batch count."""
    tcfg = config.training
    if tcfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"config.training.mixed_precision={tcfg.mixed_precision!r}; valid: "
                         f"{', '.join(MIXED_PRECISION)}")
    num = micro_batches(tcfg.batch_size, tcfg.get("batch_per_device"), ctx.world_size)
    if int(tcfg.sample_freq) > 0 and tcfg.grid_sampler not in samplers.SAMPLERS:
        raise ValueError(f"config.training.grid_sampler={tcfg.grid_sampler!r}; valid: "
                         f"{', '.join(samplers.SAMPLERS)}")
    return num


def _resume(state: TrainState, workdir, config) -> None:
    """Load checkpoints/latest.pt (or, when it is unreadable, the newest loadable
    checkpoint_<step>.pt) into ``state``; nothing when there is none. A checkpoint of another
    model raises a ValueError and is left untouched."""
    checkpoint, path = load_latest(checkpoint_dir(workdir), state.device)
    if checkpoint is None:
        return
    try:
        state.load_state_dict(checkpoint)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path} does not match this config's model "
                         f"(config.model.name={config.model.name!r}): {error}. The "
                         "checkpoint was left untouched; use another --workdir or the "
                         "config it was trained with") from error
    if state.ctx.is_main:
        log.info("resumed from %s at step %d", path, state.step)


def train(config, workdir, *, progress: bool = True) -> dict:
    """Train ``config.model`` on ``config.data`` with the DSM loss of ``config.sde``; resume
    from ``workdir/checkpoints/latest.pt`` when it exists. Under torchrun (WORLD_SIZE > 1)
    every process calls it; see the module docstring.

    Writes (rank 0) config.json, TensorBoard scalars (train/loss and train/grad_norm every
    step, train/lr and train/images_per_s at log steps, eval/* at evaluations), sample
    pictures (TensorBoard samples/grid and samples/grid_<step>.png), checkpoints and
    metrics.json into ``workdir``. Returns ScheduledActions.metrics.

    Raises ValueError when the checkpoint belongs to a different model (the file is left as
    it is) and FloatingPointError naming the first step with a non-finite loss (no
    checkpoint is written after it).
    """
    ctx, device = init_distributed(config.get("device", "auto"))
    try:
        return _run(config, Path(workdir), ctx, device, progress)
    finally:
        if ctx.initialized_here:
            dist.destroy_process_group()


def _run(config, workdir: Path, ctx: DistContext, device: torch.device, progress: bool) -> dict:
    """The loop of ``train`` in this process."""
    num_micro = _check_config(config, ctx)
    dataset = build_dataset(config, "train")
    sde = compose.build_sde(config)
    state = build_train_state(config, device, ctx)
    _resume(state, workdir, config)   # before any write: a refused checkpoint stays untouched
    batches = batches_forever(dataset, config, state.step, device, ctx)   # checks the batch size
    if ctx.is_main:
        write_config(config, workdir)
        if num_micro > 1:
            share = int(config.training.batch_size) // ctx.world_size
            log.info("gradient accumulation: %d micro-batches of %d rows per process and "
                     "optimizer step (global batch %d)", num_micro, share // num_micro,
                     int(config.training.batch_size))
    # DDP after the resume: its first broadcast waits for every rank to have read the
    # checkpoint, so rank 0 cannot overwrite it before.
    objective = Objective(config, sde, state.model, ctx, device)
    state.attach_loss_state(getattr(objective.loss_fn, "level_sampler", None))
    evaluator = None
    if ctx.is_main and int(config.training.eval_freq) > 0:
        evaluator = Evaluator(config, sde, state.model, state.ema, device)
    actions = ScheduledActions(config, workdir, state, sde, evaluator, progress=progress)
    start_step, started = state.step, time.perf_counter()
    try:
        if evaluator is not None and state.step == 0:
            actions.evaluate(0)
        state.model.train()
        while state.step < int(config.training.n_iters):
            x, labels = next(batches)
            stats = train_step(state, x, labels, objective)
            actions.after_step(state, stats)
    finally:
        actions.close()
    ctx.barrier()       # every rank returns after rank 0 has written the last checkpoint
    metrics = actions.metrics(state, start_step, time.perf_counter() - started)
    if ctx.is_main:
        (workdir / "metrics.json").write_text(json.dumps(
            {k: v for k, v in metrics.items() if k != "losses"}, indent=2) + "\n")
    return metrics
