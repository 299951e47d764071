"""Machinery shared by every sampler: results, time grids, score-evaluation counting,
input checks, progress bars and the non-finite guard."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from sde_lib import SCHEDULE_DTYPE, SDE

__all__ = ["check_int", "check_real", "check_eps", "SampleResult", "CountingScore", "time_grid", "initial_state", "NonFiniteGuard",
           "progress_bar", "check_choice", "std_normal_like"]


@dataclass
class SampleResult:
    """x: the samples (B, ...); nfe: the number of (batched) score evaluations made."""
    x: torch.Tensor
    nfe: int


class CountingScore:
    """Wraps ``score_fn(x, t)``, counts its calls and checks the first output's shape."""

    def __init__(self, score_fn: Callable):
        self.score_fn = score_fn
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        score = self.score_fn(x, t)
        if self.nfe == 0 and score.shape != x.shape:
            raise ValueError(f"score_fn returned shape {tuple(score.shape)} for x of shape "
                             f"{tuple(x.shape)}; it must return a tensor shaped like x")
        self.nfe += 1
        return score


def check_choice(kind: str, name: str, valid) -> None:
    """Raise a ValueError listing the valid names if ``name`` is not one of them."""
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError when it is not an integer >= ``minimum`` (bools
    are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value, *, minimum: float = 0.0, strict: bool = False,
               maximum: float | None = None, allow_inf: bool = False) -> float:
    """``value`` as a float, or a ValueError when it is not a real number >= ``minimum``
    (> with ``strict``), <= ``maximum`` if given, finite unless ``allow_inf`` (bools and
    NaN are refused)."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and not math.isnan(value)
          and (allow_inf or math.isfinite(value))
          and (value > minimum if strict else value >= minimum)
          and (maximum is None or value <= maximum))
    if not ok:
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number "
                         f"{'>' if strict else '>='} {minimum}{bound}, got {value!r}")
    return float(value)


def check_eps(sde: SDE, eps) -> float:
    """The smallest sampling time as a float, or a ValueError when it is not in (0, T)."""
    if (isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps)
            or not 0.0 < eps < sde.T):
        raise ValueError(f"eps (the smallest sampling time) must be in (0, {sde.T}), got {eps!r}")
    return float(eps)


def time_grid(sde: SDE, num_steps: int, eps: float, device=None) -> torch.Tensor:
    """Decreasing times T = t_0 > ... > t_{n-1} = eps, uniform in t; (num_steps,) float64.

    The grid of the Score SDE PC samplers (linspace(T, eps, N)); the step is (T - eps)/(n-1).
    """
    eps = check_eps(sde, eps)
    num_steps = check_int("num_steps", num_steps, 2)
    return torch.linspace(sde.T, eps, num_steps, dtype=SCHEDULE_DTYPE, device=device)


def initial_state(sde: SDE, shape, *, generator: torch.Generator | None, device,
                  dtype: torch.dtype | None, x_init: torch.Tensor | None = None) -> torch.Tensor:
    """x_T ~ prior (or ``x_init``), after checking the shape and the device of the generator."""
    shape = tuple(shape)
    if len(shape) < 2 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"shape must be (batch, *data_shape) of positive integers, got {shape}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but sampling runs on {device}: "
                         f"create it with torch.Generator(device={str(device)!r})")
    if x_init is not None:
        if tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {shape}")
        return x_init.to(device)
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)


def progress_bar(total: int, enabled: bool, desc: str):
    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)


class NonFiniteGuard:
    """Records, on the device, the first step at which x stopped being finite, and checks it
    on the host only every ``check_every`` steps (no per-step synchronisation)."""

    def __init__(self, times: torch.Tensor, check_every: int = 50):
        self.times = times
        self.check_every = check_every
        self.first_bad = None

    def update(self, step: int, x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x.sum())      # NaN / inf anywhere makes the sum non-finite; 20x
                                            # cheaper than isfinite(x).all() on the CPU
        marker = torch.where(bad, step, torch.iinfo(torch.long).max)
        self.first_bad = marker if self.first_bad is None else torch.minimum(self.first_bad, marker)
        if (step + 1) % self.check_every == 0 or step == len(self.times) - 1:
            self.check()

    def check(self) -> None:
        if self.first_bad is None:
            return
        step = int(self.first_bad.item())
        if step != torch.iinfo(torch.long).max:
            t = self.times[min(step, len(self.times) - 1)].item()
            raise FloatingPointError(
                f"sampling produced non-finite values at step {step} (t={t:.6g}); check the "
                "score model, lower the step size (snr) or raise the number of steps")


def std_normal_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, on x's device and in x's dtype."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
