"""Exponential moving average of a network's parameters, for sampling and evaluation.

    ema = ExponentialMovingAverage(model, decay=0.9999, warmup=False)
    ...  optimizer.step(); ema.update(model)
    with ema.average_parameters(model):      # or ema.store(model); ema.copy_to(model); ...
        samples = sample(model)              #    ema.restore(model)
    ckpt["ema"] = ema.state_dict()

After each update, shadow <- decay * shadow + (1 - decay) * parameter (Song et al. 2021 use
decay 0.9999 for NCSN++ / DDPM++ and 0.999 for NCSN). With ``warmup=True`` the n-th update
(n = 1, 2, ...) uses min(decay, (1 + n) / (10 + n)), the num_updates rule of TensorFlow's
ExponentialMovingAverage and of the Score SDE code, so early averages forget the random
initialisation quickly.

Buffers (BatchNorm statistics and the like) are not averaged: the EMA keeps a copy of the
latest ones, refreshed at every update, and ``copy_to`` / ``store`` / ``restore`` handle them
with the parameters. All tensors live on the device and in the dtype of the model's own.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


def _named_tensors(source) -> tuple[list[str], list[torch.Tensor], list[str], list[torch.Tensor]]:
    """(parameter names, parameters, buffer names, buffers) of a module, or of an iterable of
    tensors (named "0", "1", ...; no buffers)."""
    if isinstance(source, nn.Module):
        params = list(source.named_parameters())
        buffers = list(source.named_buffers())
    else:
        params = [(str(i), p) for i, p in enumerate(source)]
        buffers = []
        if not all(isinstance(p, torch.Tensor) for _, p in params):
            raise TypeError("ExponentialMovingAverage takes an nn.Module or an iterable of tensors")
    return ([n for n, _ in params], [p for _, p in params],
            [n for n, _ in buffers], [b for _, b in buffers])


class ExponentialMovingAverage:
    """Shadow copies of a model's parameters, averaged exponentially over updates.

    Args:
        parameters: an nn.Module (parameters and buffers, keyed by name) or an iterable of
            parameter tensors (keyed by position). ``update``, ``copy_to``, ``store`` and
            ``restore`` take the same kind of object, with the same tensors in the same order.
        decay: the decay rate in [0, 1].
        warmup: use min(decay, (1 + n) / (10 + n)) at the n-th update.
    """

    def __init__(self, parameters: nn.Module | Iterable[torch.Tensor], decay: float = 0.999,
                 warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        names, params, buffer_names, buffers = _named_tensors(parameters)
        self.names, self.buffer_names = names, buffer_names
        self.shadow = [p.detach().clone() for p in params]
        self.buffers = [b.detach().clone() for b in buffers]
        self._stored: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    # ----------------------------------------------------------------------------- updates
    def decay_for(self, num_updates: int) -> float:
        """The decay used by the update that brings the count to ``num_updates`` (>= 1)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))

    def _matching(self, model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        names, params, buffer_names, buffers = _named_tensors(model)
        if names != self.names or buffer_names != self.buffer_names:
            raise ValueError(
                f"the model does not match this EMA: {len(names)} parameters and "
                f"{len(buffer_names)} buffers (first names {names[:3]}), the EMA tracks "
                f"{len(self.names)} and {len(self.buffer_names)} (first names {self.names[:3]})")
        return params, buffers

    @torch.no_grad()
    def update(self, model) -> None:
        """shadow <- d shadow + (1 - d) parameter, d = ``decay_for(num_updates + 1)``;
        buffers are copied."""
        params, buffers = self._matching(model)
        self.num_updates += 1
        weight = 1.0 - self.decay_for(self.num_updates)
        if self.shadow:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], weight)
        if self.buffers:
            torch._foreach_copy_(self.buffers, [b.detach() for b in buffers])

    # -------------------------------------------------------------------- swapping weights
    @torch.no_grad()
    def copy_to(self, model) -> None:
        """Write the averaged parameters (and the latest buffers) into ``model``."""
        params, buffers = self._matching(model)
        if params:
            torch._foreach_copy_(params, self.shadow)
        if buffers:
            torch._foreach_copy_(buffers, self.buffers)

    @torch.no_grad()
    def store(self, model) -> None:
        """Keep a copy of ``model``'s current parameters and buffers for ``restore``."""
        params, buffers = self._matching(model)
        self._stored = ([p.detach().clone() for p in params], [b.detach().clone() for b in buffers])

    @torch.no_grad()
    def restore(self, model) -> None:
        """Put back the parameters and buffers saved by the last ``store``."""
        if self._stored is None:
            raise RuntimeError("restore() without a preceding store(): nothing to restore")
        params, buffers = self._matching(model)
        stored_params, stored_buffers = self._stored
        if params:
            torch._foreach_copy_(params, stored_params)
        if buffers:
            torch._foreach_copy_(buffers, stored_buffers)
        self._stored = None

    @contextlib.contextmanager
    def average_parameters(self, model) -> Iterator[None]:
        """``store``, ``copy_to``, and ``restore`` on exit (also on an exception)."""
        self.store(model)
        self.copy_to(model)
        try:
            yield
        finally:
            self.restore(model)

    def to(self, device=None) -> "ExponentialMovingAverage":
        """Move the shadow tensors (after moving the model)."""
        self.shadow = [s.to(device) for s in self.shadow]
        self.buffers = [b.to(device) for b in self.buffers]
        return self

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Plain data (floats, ints, bools and tensors keyed by name): loadable with
        ``torch.load(..., weights_only=True)``."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {n: s.clone() for n, s in zip(self.names, self.shadow)},
                "buffers": {n: b.clone() for n, b in zip(self.buffer_names, self.buffers)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()`` of an EMA of the same model (strict: same names, same
        shapes); the tensors keep this EMA's device and dtype."""
        missing = {"decay", "warmup", "num_updates", "shadow", "buffers"} - set(state)
        if missing:
            raise ValueError(f"EMA state dict lacks {sorted(missing)}")
        for kind, names, tensors in (("parameter", self.names, self.shadow),
                                     ("buffer", self.buffer_names, self.buffers)):
            saved = state["shadow" if kind == "parameter" else "buffers"]
            for name, tensor in zip(names, tensors):
                if name not in saved:
                    raise ValueError(f"EMA state dict has no {kind} {name!r}")
                if tuple(saved[name].shape) != tuple(tensor.shape):
                    raise ValueError(f"EMA {kind} {name!r} has shape {tuple(saved[name].shape)} "
                                     f"in the state dict but {tuple(tensor.shape)} in this model")
            extra = [n for n in saved if n not in set(names)]
            if extra:
                raise ValueError(f"EMA state dict has {kind}s this model lacks, first {extra[0]!r}")
        for name, tensor in zip(self.names, self.shadow):
            tensor.copy_(state["shadow"][name])
        for name, tensor in zip(self.buffer_names, self.buffers):
            tensor.copy_(state["buffers"][name])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
