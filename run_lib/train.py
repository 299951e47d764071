"""Training of a score network on an image data set (digits, cifar10, mnist, folder).

One readable loop, in the spirit of nanoGPT's train.py:

    data -> SDE -> model -> Adam (linear warm-up, gradient clipping) -> EMA -> DSM loss

Checkpoints are plain dicts of tensors and numbers (loadable with weights_only=True):

    {"model", "ema", "optimizer": state dicts, "step": completed optimizer steps,
     "rng": {"torch": CPU RNG state, "noise": the loss generator's state, "cuda": ...,
             "ranks": [{"torch", "cuda"} of every rank] (multi-process runs only)}}

written atomically (run_lib.save_atomic) as checkpoints/checkpoint_<step>.pt every
config.training.snapshot_freq steps and as checkpoints/latest.pt every
config.training.snapshot_freq_for_preemption steps and at the end. A run started in a work
directory that holds latest.pt resumes from it with the same state: the model, EMA and
optimizer, the RNG states, and the data order (the batches of an epoch depend on
(seed, epoch) only, so the loop skips the batches already used in the current epoch). With
the same seed and config, a run interrupted and resumed gives bitwise the same model as an
uninterrupted one on the CPU.

No host-device synchronisation per step. The loss, the gradient norm and a "non-finite"
flag stay on the device; they are read back (one sync) only at log steps, before every
checkpoint write and at the end. A step whose loss or gradient norm is not finite does not
change the weights: the fused Adam kernel takes that flag as ``found_inf`` (the protocol of
torch's GradScaler) and skips the update of the weights, both moments and the step count on
the device (the EMA still takes its update towards the unchanged weights, so it stays
finite). Training then stops at the next read-back with the number of the first bad step,
before any checkpoint is written, so the last good checkpoint stays the newest one.

Mixed precision (config.training.mixed_precision='bf16'): torch.autocast in bfloat16 around
the network's forward only; the weights, the optimizer and the loss stay float32 (the
network output is cast to float32 before the loss reduces it).

Several processes (torchrun sets WORLD_SIZE > 1): one process group (nccl on CUDA, gloo on
the CPU), one device per process (cuda:LOCAL_RANK), DistributedDataParallel. The global
batch config.training.batch_size is split across the ranks: rank r reads rows r, r + W, ...
of each global batch (run_lib.datasets.shard_indices), runs the network on them only, and
the network outputs are all-gathered so that every rank evaluates the DSM loss of the whole
global batch with the same times and noise as a single process (drawn from the same seeded
generator; cheap next to the network). The training curve therefore does not depend on the
number of processes (up to float summation order; dropout masks and random flips, drawn per
rank, excepted). Rank 0 alone writes logs, TensorBoard, config.json, sample grids and
checkpoints; all ranks resume from the same latest.pt.
"""
from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import models
import samplers
import sde_lib

from .datasets import build_dataset
from .evaluate import balanced_labels, with_class_labels
from .images import make_grid, save_png, to_uint8
from .utils import pick_device, save_atomic, write_config

__all__ = ["train", "load_checkpoint", "lr_at", "DistContext", "init_distributed",
           "NetworkForward", "skip_nonfinite_step", "ema_test_loss", "sample_grid"]

log = logging.getLogger(__name__)

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16}


def lr_at(step: int, config) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over
    config.optim.warmup steps, then constant."""
    warmup = int(config.optim.warmup)
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return float(config.optim.lr) * factor


def load_checkpoint(path, device) -> dict:
    """The checkpoint dict of ``path`` (weights_only=True: tensors and plain data only)."""
    return torch.load(path, map_location=device, weights_only=True)


# ----------------------------------------------------------------------------- processes

@dataclass
class DistContext:
    """Where this process stands in a (possibly one-process) run."""
    rank: int = 0
    world_size: int = 1
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """(context, device) from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK).

    WORLD_SIZE > 1: starts the default process group (nccl for CUDA devices, gloo for the
    CPU) unless one exists, and gives each process cuda:LOCAL_RANK on CUDA. Otherwise a
    one-process context and ``pick_device(device_name)``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size <= 1:
        return DistContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    initialized_here = not dist.is_initialized()
    if initialized_here:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       initialized_here=initialized_here), device


# ----------------------------------------------------------------------------- the network

class NetworkForward:
    """The network as the loss sees it: ``forward(x (B, ...), cond (B,)[, labels (B,)])``.

    Runs ``net`` under bfloat16 autocast when ``amp_dtype`` is given and returns float32 (the
    loss is reduced in float32). With ``world_size`` W > 1 the inputs are a whole global
    batch: this rank runs ``net`` on rows rank, rank + W, ... only, and the other ranks'
    outputs are all-gathered (without gradient) into their rows, so every rank sees the
    output of the whole batch; gradients flow through this rank's rows only.
    """

    def __init__(self, net, *, amp_dtype: torch.dtype | None = None, rank: int = 0,
                 world_size: int = 1):
        self.net, self.amp_dtype, self.rank, self.world_size = net, amp_dtype, rank, world_size

    def _run(self, *inputs):
        device_type = inputs[0].device.type
        with torch.autocast(device_type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.net(*inputs)
        return out.float()

    def __call__(self, x, cond, *labels):
        if self.world_size == 1:
            return self._run(x, cond, *labels).to(x.dtype)
        r, w = self.rank, self.world_size
        own = self._run(*(v[r::w] for v in (x, cond, *labels)))          # (B / W, ...)
        parts = [torch.empty_like(own) for _ in range(w)]
        dist.all_gather(parts, own.detach().contiguous())
        parts[r] = own
        # rows of rank r are r, r + W, ...: interleave (W, B/W, ...) -> (B/W, W, ...) -> (B, ...)
        return torch.stack(parts, dim=1).reshape(x.shape[:1] + own.shape[1:]).to(x.dtype)


def _interleave_into_global(local: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's rows (B/W, ...) placed at rows rank, rank + W, ... of a zero (B, ...)
    tensor: the loss draws times and noise for the whole global batch."""
    if ctx.world_size == 1:
        return local
    full = local.new_zeros((local.shape[0] * ctx.world_size,) + tuple(local.shape[1:]))
    full[ctx.rank::ctx.world_size] = local
    return full


def skip_nonfinite_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` that changes nothing (weights, moments, step count) when the
    0-d float tensor ``found_inf`` is nonzero, decided on the device without a sync.

    Needs an optimizer built with fused=True, whose kernel honours ``found_inf`` (the flag
    GradScaler passes). Zeroing the gradients instead would not do: Adam's momentum would
    still move the weights.
    """
    if not all(group.get("fused") for group in optimizer.param_groups):
        raise ValueError("skip_nonfinite_step needs torch.optim.Adam(..., fused=True)")
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


# ----------------------------------------------------------------------------- data

def _batches_forever(dataset, config, start_step: int, device, ctx: DistContext):
    """(x, labels) batches of this rank from optimizer step ``start_step`` on: epoch after
    epoch of dataset.batches(seed=config.seed, epoch=e, rank, world_size), the first epoch
    entered part-way. Batches of B / W rows; on CUDA copied from pinned memory without
    blocking the host."""
    batch_size = int(config.training.batch_size) // ctx.world_size
    per_epoch = len(dataset) // ctx.world_size // batch_size
    if per_epoch == 0:
        raise ValueError(f"config.training.batch_size={config.training.batch_size} is larger "
                         f"than the data set ({len(dataset)} images)")
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


# ----------------------------------------------------------------------------- RNG states

def _own_rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_state(noise_gen: torch.Generator, device: torch.device, ctx: DistContext) -> dict:
    """RNG states for a checkpoint; a collective when world_size > 1 (every rank calls it)."""
    state = {**_own_rng_state(device), "noise": noise_gen.get_state()}
    if ctx.world_size > 1:
        ranks = [None] * ctx.world_size
        dist.all_gather_object(ranks, _own_rng_state(device))
        state["ranks"] = [{k: v.cpu() for k, v in r.items()} for r in ranks]
    return state


def _set_rng_state(state: dict, noise_gen: torch.Generator, device: torch.device,
                   ctx: DistContext) -> None:
    own = state
    if ctx.world_size > 1:
        ranks = state.get("ranks") or []
        if len(ranks) == ctx.world_size:
            own = ranks[ctx.rank]
        elif ctx.rank > 0:
            log.warning("checkpoint holds no dropout RNG state for %d ranks; rank %d keeps "
                        "its freshly seeded one", ctx.world_size, ctx.rank)
            own = None
    noise_gen.set_state(state["noise"].cpu())
    if own is None:
        return
    torch.set_rng_state(own["torch"].cpu())
    if device.type == "cuda" and "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"].cpu(), device)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def ema_test_loss(loss_fn, score_fn, model, ema, test_batches, *, seed: int, device,
                  conditional: bool) -> float:
    """Mean DSM loss per image of ``test_batches`` (a list of (x, labels)) with the EMA
    weights, the model in eval mode, and times and noise from a generator seeded with
    ``seed`` (the same draws at every call, so values at different steps are comparable).
    The model's weights and train/eval mode are restored afterwards."""
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    model.eval()
    try:
        with ema.average_parameters(model):
            for x, labels in test_batches:
                x = x.to(device)
                loss = loss_fn(score_fn, x, generator=generator,
                               class_labels=labels.to(device) if conditional else None)
                total += loss.double() * x.shape[0]
                count += x.shape[0]
    finally:
        model.train(was_training)
    return float(total) / count


@torch.no_grad()
def sample_grid(config, sde, model, ema, *, device, method: str | None = None) -> torch.Tensor:
    """config.training.num_grid_samples uint8 images (N, C, H, W) sampled with the EMA
    weights by ``method`` (default config.training.grid_sampler) from the prior noise of a
    generator seeded with config.seed + 2 (the same grid for the same weights)."""
    tcfg, data = config.training, config.data
    shape = (int(tcfg.num_grid_samples), int(data.num_channels), int(data.image_size),
             int(data.image_size))
    labels = balanced_labels(shape[0], int(config.model.get("num_classes") or 0), device)
    score_fn = with_class_labels(models.build_score_fn(config, sde, model), labels)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + 2)
    was_training = model.training
    model.eval()
    try:
        with ema.average_parameters(model):
            result = samplers.sample_from_config(config.sampling, score_fn, sde, shape,
                                                 generator=generator, device=device,
                                                 method=method or tcfg.grid_sampler)
    finally:
        model.train(was_training)
    return to_uint8(result.x, centered=bool(data.centered))


# ----------------------------------------------------------------------------- the loop

def _check_config(config, ctx: DistContext) -> None:
    tcfg = config.training
    if tcfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"config.training.mixed_precision={tcfg.mixed_precision!r}; valid: "
                         f"{', '.join(MIXED_PRECISION)}")
    if int(tcfg.batch_size) % ctx.world_size:
        raise ValueError(f"config.training.batch_size={tcfg.batch_size} (the global batch) is "
                         f"not divisible by the {ctx.world_size} processes; use a multiple of "
                         f"{ctx.world_size}")
    if int(tcfg.sample_freq) > 0 and tcfg.grid_sampler not in samplers.SAMPLERS:
        raise ValueError(f"config.training.grid_sampler={tcfg.grid_sampler!r}; valid: "
                         f"{', '.join(samplers.SAMPLERS)}")


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class _StepRecord:
    """Per-step loss, gradient norm and non-finite flag kept on the device until ``flush``."""

    def __init__(self):
        self.first_step, self.rows = 0, []

    def add(self, step: int, loss, grad_norm, bad) -> None:
        if not self.rows:
            self.first_step = step
        self.rows.append(torch.stack([loss.detach().float(), grad_norm.detach().float(),
                                      bad.float()]))

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


def _use_fused_adam(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict of a checkpoint written by an unfused Adam: fused again, with
    the step counts on the weights' device (where the fused kernel wants them)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def _resume(latest: Path, config, model, ema, optimizer, noise_gen, device,
            ctx: DistContext) -> int:
    """Load ``latest`` (when it exists) into the model, EMA, optimizer and RNGs; returns the
    step to continue from (0 without a checkpoint). A checkpoint of another model raises a
    ValueError and is left untouched."""
    if not latest.exists():
        return 0
    state = load_checkpoint(latest, device)
    try:
        models.load_state_dict_strict(model, state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{latest} does not match this config's model "
                         f"(config.model.name={config.model.name!r}): {error}. The "
                         "checkpoint was left untouched; use another --workdir or the "
                         "config it was trained with") from error
    _use_fused_adam(optimizer)
    _set_rng_state(state["rng"], noise_gen, device, ctx)
    step = int(state["step"])
    if ctx.is_main:
        log.info("resumed from %s at step %d", latest, step)
    return step


def train(config, workdir, *, progress: bool = True) -> dict:
    """Train ``config.model`` on ``config.data`` with the DSM loss of ``config.sde``; resume
    from ``workdir/checkpoints/latest.pt`` when it exists. Under torchrun (WORLD_SIZE > 1)
    every process calls it; see the module docstring.

    Writes (rank 0) config.json, TensorBoard scalars (train/loss and train/grad_norm every
    step, train/lr and train/images_per_s at log steps, eval/loss_ema every
    config.training.eval_freq steps), sample grids (TensorBoard samples/grid and
    samples/grid_<step>.png every config.training.sample_freq steps), checkpoints and
    metrics.json into ``workdir``. Returns {"step", "start_step", "loss" (last), "losses"
    (one per step run by this call), "eval_losses" ({step: EMA test loss}),
    "seconds_per_step", "sde"}.

    Raises ValueError when latest.pt belongs to a different model (the file is left as it is)
    and FloatingPointError naming the first step with a non-finite loss (no checkpoint is
    written after it).
    """
    workdir = Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    latest = ckpt_dir / "latest.pt"
    ctx, device = init_distributed(config.get("device", "auto"))
    try:
        return _train(config, workdir, ckpt_dir, latest, ctx, device, progress)
    finally:
        if ctx.initialized_here:
            dist.destroy_process_group()


def _train(config, workdir, ckpt_dir, latest, ctx, device, progress) -> dict:
    tcfg = config.training
    _check_config(config, ctx)
    n_iters = int(tcfg.n_iters)

    # --- state: seeds, data, SDE, model, optimizer, EMA, loss
    torch.manual_seed(int(config.seed))      # initialisation (the same on every rank)
    noise_gen = torch.Generator(device=device).manual_seed(int(config.seed) + 1)  # t and noise
    dataset = build_dataset(config, "train")
    sde = sde_lib.build_sde(config)
    model = models.build_model(config).to(device)
    if ctx.rank > 0:                         # dropout masks: a different stream per rank
        torch.manual_seed(int(config.seed) + 7919 * ctx.rank)
    loss_fn = sde_lib.build_loss_fn(config, sde)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr_at(0, config),
                                 betas=(config.optim.beta1, 0.999), eps=config.optim.eps,
                                 weight_decay=config.optim.weight_decay, fused=True)
    ema = models.ExponentialMovingAverage(model, decay=config.model.ema_rate)
    conditional_labels = bool(config.model.get("num_classes"))

    # --- resume (before anything is written, so a refused checkpoint leaves the workdir alone)
    step = _resume(latest, config, model, ema, optimizer, noise_gen, device, ctx)
    if ctx.is_main:
        write_config(config, workdir)

    # DDP after the resume: its first broadcast waits for every rank to have read latest.pt,
    # so rank 0 cannot overwrite it before.
    net = model
    if ctx.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = NetworkForward(net, amp_dtype=MIXED_PRECISION[tcfg.mixed_precision],
                             rank=ctx.rank, world_size=ctx.world_size)
    score_fn = models.build_score_fn(config, sde, forward)

    eval_freq, sample_freq = int(tcfg.eval_freq), int(tcfg.sample_freq)
    test_batches = None
    if ctx.is_main and eval_freq > 0:
        test_set = build_dataset(config, "test")
        size = min(int(tcfg.batch_size), len(test_set))
        test_batches = list(itertools.islice(
            test_set.batches(size, shuffle=False, seed=int(config.seed)), int(tcfg.eval_batches)))
        eval_loss_fn = sde_lib.build_loss_fn(config, sde)     # its own: no shared state
        eval_score_fn = models.build_score_fn(
            config, sde, NetworkForward(model, amp_dtype=MIXED_PRECISION[tcfg.mixed_precision]))

    def checkpoint() -> dict:
        return {"model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step,
                "rng": _rng_state(noise_gen, device, ctx)}

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(workdir / "tensorboard"))
    eval_losses = {}

    def evaluate() -> None:
        value = ema_test_loss(eval_loss_fn, eval_score_fn, model, ema, test_batches,
                              seed=int(config.seed) + 3, device=device,
                              conditional=conditional_labels)
        eval_losses[step] = value
        writer.add_scalar("eval/loss_ema", value, step)
        log.info("step %d test loss (EMA weights) %.5f", step, value)

    def write_grid() -> None:
        images = sample_grid(config, sde, model, ema, device=device)
        grid = make_grid(images, upscale=max(1, 32 // int(config.data.image_size)))
        save_png(grid, workdir / "samples" / f"grid_{step}.png")
        writer.add_image("samples/grid", grid, step, dataformats="HWC")

    start_step, losses, record = step, [], _StepRecord()
    if test_batches is not None and step == 0:
        evaluate()
    batches = _batches_forever(dataset, config, step, device, ctx)
    bar = tqdm(total=n_iters, initial=step, desc="train", unit="step",
               disable=not (progress and ctx.is_main and sys.stderr.isatty()))
    scale = float(ctx.world_size)   # DDP averages the ranks' gradients, each of its own rows
    found_inf = torch.zeros((), device=device)
    model.train()
    started = window_start = time.perf_counter()
    window_images = window_steps = 0
    try:
        while step < n_iters:
            x, labels = next(batches)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(score_fn, _interleave_into_global(x, ctx), generator=noise_gen,
                           class_labels=_interleave_into_global(labels, ctx)
                           if conditional_labels else None)
            optimizer.zero_grad(set_to_none=True)
            (loss * scale if scale != 1 else loss).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            found_inf.copy_(bad)
            skip_nonfinite_step(optimizer, found_inf)
            ema.update(model)
            record.add(step, loss, grad_norm, bad)
            step += 1
            window_images += x.shape[0] * ctx.world_size
            window_steps += 1
            bar.update(1)

            log_now = step % tcfg.log_freq == 0 or step == n_iters
            save_now = (step % tcfg.snapshot_freq == 0
                        or step % tcfg.snapshot_freq_for_preemption == 0 or step == n_iters)
            if log_now or save_now:
                done = record.flush(latest)          # the only sync; raises on a bad step
                losses.extend(v for _, v, _ in done)
                if writer is not None:
                    for s, v, g in done:
                        writer.add_scalar("train/loss", v, s + 1)
                        writer.add_scalar("train/grad_norm", g, s + 1)
            if log_now:
                now = time.perf_counter()
                seconds_per_step = (now - window_start) / window_steps
                images_per_s = window_images / max(now - window_start, 1e-9)
                window_start, window_images, window_steps = now, 0, 0
                if writer is not None:
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/images_per_s", images_per_s, step)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    log.info("step %d/%d loss %.5f lr %.2e grad_norm %.3f images/s %.1f eta %s",
                             step, n_iters, losses[-1], lr, done[-1][2], images_per_s,
                             _eta((n_iters - step) * seconds_per_step))
            if save_now:
                state = checkpoint()       # once, also when both files are due (a collective)
                if ctx.is_main and step % tcfg.snapshot_freq == 0:
                    save_atomic(state, ckpt_dir / f"checkpoint_{step}.pt")
                if ctx.is_main and (step % tcfg.snapshot_freq_for_preemption == 0
                                    or step == n_iters):
                    save_atomic(state, latest)
            if test_batches is not None and step % eval_freq == 0:
                evaluate()
            if ctx.is_main and sample_freq > 0 and step % sample_freq == 0:
                write_grid()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    ctx.barrier()       # every rank returns after rank 0 has written the last checkpoint

    seconds = time.perf_counter() - started
    metrics = {"step": step, "start_step": start_step,
               "loss": losses[-1] if losses else None, "losses": losses,
               "eval_losses": eval_losses,
               "seconds_per_step": seconds / len(losses) if losses else None, "sde": repr(sde)}
    if ctx.is_main:
        (workdir / "metrics.json").write_text(json.dumps(
            {k: v for k, v in metrics.items() if k != "losses"}, indent=2) + "\n")
    return metrics
