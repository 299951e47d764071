"""The train state: everything a checkpoint holds and a resumed run continues from.

    state = build_train_state(config, device, ctx)     # model, EMA, Adam, noise generator
    state.load_state_dict(read_checkpoint(path, device))
    save_atomic(state.state_dict(), path)              # a collective under torchrun

The optimizer is Adam with fused=True: its kernel takes a ``found_inf`` flag (GradScaler's
protocol), so a step with a non-finite loss changes nothing without a host-device sync
(``skip_nonfinite_step``). The learning rate warms up linearly (``lr_at``).
"""
from __future__ import annotations

import torch

import models

from . import compose
from .distributed import DistContext, rng_state, set_rng_state

__all__ = ["TrainState", "build_train_state", "lr_at", "skip_nonfinite_step"]

#: Seed offsets of the streams of a run (config.seed + offset).
NOISE_SEED, DROPOUT_RANK_STRIDE = 1, 7919


def lr_at(step: int, config) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over
    config.optim.warmup steps, then constant config.optim.lr."""
    warmup = int(config.optim.warmup)
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return float(config.optim.lr) * factor


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


def _use_fused_adam(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict of a checkpoint written by an unfused Adam: fused again, with
    the step counts on the weights' device (where the fused kernel wants them)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


class TrainState:
    """The network, its EMA, the optimizer, the generator of the loss's times and noise,
    the number of completed optimizer steps, and this process's place in the run (``ctx``,
    for the RNG states of every rank)."""

    def __init__(self, model, ema, optimizer, noise_gen: torch.Generator, ctx: DistContext,
                 step: int = 0):
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.noise_gen, self.ctx, self.step = noise_gen, ctx, step
        self.loss_state, self._pending_loss_state = None, None

    def attach_loss_state(self, loss_state) -> None:
        """The loss's own state (an object with state_dict / load_state_dict, e.g. the level
        sampler of loss-aware importance sampling, sde_lib.LossAwareLevels) or None: saved in
        checkpoints as "loss_state", and loaded from the checkpoint already read, if any."""
        self.loss_state = loss_state
        if loss_state is not None and self._pending_loss_state is not None:
            loss_state.load_state_dict(self._pending_loss_state)
        self._pending_loss_state = None

    @property
    def device(self) -> torch.device:
        return self.noise_gen.device

    def state_dict(self) -> dict:
        """The checkpoint dict (run_lib.checkpoints); a collective with several ranks."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step,
                "rng": rng_state(self.noise_gen, self.device, self.ctx),
                **({} if self.loss_state is None else {"loss_state": self.loss_state.state_dict()})}

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint dict strictly; a checkpoint of another model raises the
        ValueError / KeyError / RuntimeError of the first mismatch."""
        models.load_state_dict_strict(self.model, state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        _use_fused_adam(self.optimizer)
        set_rng_state(state["rng"], self.noise_gen, self.device, self.ctx)
        self.step = int(state["step"])
        self._pending_loss_state = state.get("loss_state")   # for attach_loss_state


def build_train_state(config, device: torch.device, ctx: DistContext) -> TrainState:
    """A fresh state: the network initialised from config.seed (the same on every rank),
    Adam (config.optim), the EMA (config.model.ema_rate, warm-up config.model.ema_warmup)
    and the noise generator (config.seed + 1). Ranks > 0 then reseed the global RNG, so
    their dropout masks differ."""
    seed = int(config.seed)
    torch.manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + NOISE_SEED)
    model = compose.build_model(config).to(device)
    if ctx.rank > 0:
        torch.manual_seed(seed + DROPOUT_RANK_STRIDE * ctx.rank)
    optim = config.optim
    optimizer = torch.optim.Adam(model.parameters(), lr=lr_at(0, config),
                                 betas=(optim.beta1, 0.999), eps=optim.eps,
                                 weight_decay=optim.weight_decay, fused=True)
    ema = models.ExponentialMovingAverage(model, decay=float(config.model.ema_rate),
                                          warmup=bool(config.model.ema_warmup))
    return TrainState(model, ema, optimizer, noise_gen, ctx)
