"""Small helpers shared by sde_lib, models, samplers and run_lib: broadcasting of per-sample
scalars, the schedule dtype, and the one set of argument checks (each raises a ValueError
that names the argument and what it must be)."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["append_dims", "batch_time", "SCHEDULE_DTYPE", "check_int", "check_real",
           "check_choice", "check_bool", "check_time"]

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


# ----- argument checks ----------------------------------------------------------------------
def check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int, or a ValueError when it is not an integer in [minimum, maximum]
    (bools are refused)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{bound}, got {value!r}")
    return int(value)


def check_real(name: str, value, *, minimum: float | None = 0.0, strict: bool = False,
               maximum: float | None = None, allow_inf: bool = False) -> float:
    """``value`` as a float, or a ValueError when it is not a real number >= ``minimum``
    (> with ``strict``; no lower bound when None), <= ``maximum`` if given, finite unless
    ``allow_inf`` (bools and NaN are refused)."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and not math.isnan(value)
          and (allow_inf or math.isfinite(value))
          and (minimum is None or (value > minimum if strict else value >= minimum))
          and (maximum is None or value <= maximum))
    if not ok:
        low = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        high = f"{' and' if low else ''} <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number"
                         f"{low}{high}, got {value!r}")
    return float(value)


def check_choice(name: str, value, valid) -> str:
    """``value`` if it is one of ``valid``, else a ValueError listing the valid names."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid {name}s: {', '.join(valid)}")
    return value


def check_time(name: str, value, T: float) -> float:
    """``value`` as a float, or a ValueError when it is not a time in the open interval (0, T)
    (the smallest time of a sampler, a loss or a likelihood)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not 0.0 < value < T):
        raise ValueError(f"{name} must be a number in (0, {T}), got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (numbers and strings are refused), else a ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
