"""Small tensor helpers shared by sde_lib, models and samplers."""
from __future__ import annotations

import torch

__all__ = ["append_dims", "batch_time", "SCHEDULE_DTYPE"]

#: Noise schedules are evaluated in this dtype and cast to the data's dtype at use.
SCHEDULE_DTYPE = torch.float64


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to a per-sample tensor so it broadcasts.

    Args:
        v: tensor of shape (B,) (or any shape with ``v.ndim <= ndim``).
        ndim: the number of dims of the tensor it must broadcast against, e.g. ``x.ndim``.

    Returns:
        ``v`` viewed as shape (B, 1, ..., 1) with ``ndim`` dims in total.
    """
    extra = ndim - v.ndim
    if extra < 0:
        raise ValueError(f"append_dims: tensor has {v.ndim} dims, more than the target {ndim}")
    return v.reshape(*v.shape, *([1] * extra))


def batch_time(t, x: torch.Tensor) -> torch.Tensor:
    """Return the time(s) ``t`` as a (B,) tensor on ``x``'s device, B = x.shape[0].

    ``t`` may be a Python number, a 0-d tensor or a (B,) tensor. The dtype is kept for
    tensors (schedules upcast to float64 themselves) and is x's dtype for numbers.
    """
    batch = x.shape[0]
    if not torch.is_tensor(t):
        return torch.full((batch,), float(t), dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.to(device=x.device).expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"time t has shape {tuple(t.shape)} but x has batch size {batch}: pass t of shape "
            f"({batch},) or a scalar"
        )
    if t.device != x.device:
        raise ValueError(f"time t is on {t.device} but x is on {x.device}: move them to one device")
    return t
