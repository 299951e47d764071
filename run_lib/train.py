"""Training of a score network on an image data set (digits, cifar10, mnist, folder).

One readable loop, in the spirit of nanoGPT's train.py:

    data -> SDE -> model -> Adam (linear warm-up, gradient clipping) -> EMA -> DSM loss

Checkpoints are plain dicts of tensors and numbers (loadable with weights_only=True):

    {"model", "ema", "optimizer": state dicts, "step": completed optimizer steps,
     "rng": {"torch": CPU RNG state, "noise": the loss generator's state, "cuda": ...}}

written atomically (run_lib.save_atomic) as checkpoints/checkpoint_<step>.pt every
config.training.snapshot_freq steps and as checkpoints/latest.pt every
config.training.snapshot_freq_for_preemption steps and at the end. A run started in a work
directory that holds latest.pt resumes from it with the same state: the model, EMA and
optimizer, the RNG states, and the data order (the batches of an epoch depend on
(seed, epoch) only, so the loop skips the batches already used in the current epoch). With
the same seed and config, a run interrupted and resumed gives bitwise the same model as an
uninterrupted one on the CPU.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import models
import sde_lib

from .datasets import build_dataset
from .utils import pick_device, save_atomic, write_config

__all__ = ["train", "load_checkpoint", "lr_at"]

log = logging.getLogger(__name__)


def lr_at(step: int, config) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over
    config.optim.warmup steps, then constant."""
    warmup = int(config.optim.warmup)
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return float(config.optim.lr) * factor


def load_checkpoint(path, device) -> dict:
    """The checkpoint dict of ``path`` (weights_only=True: tensors and plain data only)."""
    return torch.load(path, map_location=device, weights_only=True)


def _batches_forever(dataset, config, start_step: int, device):
    """(x, labels) batches from optimizer step ``start_step`` on: epoch after epoch of
    dataset.batches(seed=config.seed, epoch=e), the first epoch entered part-way."""
    batch_size = int(config.training.batch_size)
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0:
        raise ValueError(f"config.training.batch_size={batch_size} is larger than the data set "
                         f"({len(dataset)} images)")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        batches = dataset.batches(batch_size, seed=int(config.seed), epoch=epoch, device=device)
        yield from itertools.islice(batches, skip, None)
        epoch, skip = epoch + 1, 0


def _rng_state(noise_gen: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "noise": noise_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, noise_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    noise_gen.set_state(state["noise"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def train(config, workdir, *, progress: bool = True) -> dict:
    """Train ``config.model`` on ``config.data`` with the DSM loss of ``config.sde``; resume
    from ``workdir/checkpoints/latest.pt`` when it exists.

    Writes config.json, TensorBoard scalars (train/loss, train/lr, train/grad_norm,
    train/images_per_s), checkpoints and metrics.json into ``workdir``. Returns
    {"step", "start_step", "loss" (last), "losses" (one per step run by this call),
    "seconds_per_step", "sde"}.

    Raises ValueError when latest.pt belongs to a different model (the file is left as it is)
    and FloatingPointError at the first non-finite loss (no checkpoint is written for it).
    """
    workdir = Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    latest = ckpt_dir / "latest.pt"
    device = pick_device(config.get("device", "auto"))
    tcfg = config.training
    n_iters = int(tcfg.n_iters)

    # --- state: seeds, data, SDE, model, optimizer, EMA, loss
    torch.manual_seed(int(config.seed))      # initialisation and dropout
    noise_gen = torch.Generator(device=device).manual_seed(int(config.seed) + 1)  # t and noise
    dataset = build_dataset(config, "train")
    sde = sde_lib.build_sde(config)
    model = models.build_model(config).to(device)
    score_fn = models.build_score_fn(config, sde, model)
    loss_fn = sde_lib.build_loss_fn(config, sde)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr_at(0, config),
                                 betas=(config.optim.beta1, 0.999), eps=config.optim.eps,
                                 weight_decay=config.optim.weight_decay)
    ema = models.ExponentialMovingAverage(model, decay=config.model.ema_rate)
    conditional_labels = bool(config.model.get("num_classes"))

    # --- resume (before anything is written, so a refused checkpoint leaves the workdir alone)
    step = 0
    if latest.exists():
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
        _set_rng_state(state["rng"], noise_gen, device)
        step = int(state["step"])
        log.info("resumed from %s at step %d", latest, step)
    write_config(config, workdir)

    def checkpoint() -> dict:
        return {"model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step,
                "rng": _rng_state(noise_gen, device)}

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(workdir / "tensorboard"))
    start_step, losses = step, []
    batches = _batches_forever(dataset, config, step, device)
    bar = tqdm(total=n_iters, initial=step, disable=not progress, desc="train", unit="step")
    model.train()
    started = window_start = time.perf_counter()
    window_images = 0
    try:
        while step < n_iters:
            x, labels = next(batches)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(score_fn, x, class_labels=labels.to(device) if conditional_labels
                           else None, generator=noise_gen)
            loss_value = loss.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss_value} at step {step}; the last good checkpoint "
                    f"({latest if latest.exists() else 'none yet'}) was kept")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            ema.update(model)
            step += 1
            losses.append(loss_value)
            window_images += x.shape[0]
            bar.update(1)

            if step % tcfg.log_freq == 0 or step == n_iters:
                now = time.perf_counter()
                images_per_s = window_images / max(now - window_start, 1e-9)
                window_start, window_images = now, 0
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", grad_norm.item(), step)
                writer.add_scalar("train/images_per_s", images_per_s, step)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                log.info("step %d loss %.5f lr %.2e grad_norm %.3f images/s %.1f", step,
                         loss_value, lr, grad_norm.item(), images_per_s)
            if step % tcfg.snapshot_freq == 0:
                save_atomic(checkpoint(), ckpt_dir / f"checkpoint_{step}.pt")
            if step % tcfg.snapshot_freq_for_preemption == 0 or step == n_iters:
                save_atomic(checkpoint(), latest)
    finally:
        bar.close()
        writer.close()

    seconds = time.perf_counter() - started
    metrics = {"step": step, "start_step": start_step,
               "loss": losses[-1] if losses else None, "losses": losses,
               "seconds_per_step": seconds / len(losses) if losses else None, "sde": repr(sde)}
    (workdir / "metrics.json").write_text(json.dumps(
        {k: v for k, v in metrics.items() if k != "losses"}, indent=2) + "\n")
    return metrics
