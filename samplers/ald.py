"""Annealed Langevin dynamics, the sampler of NCSN (Song & Ermon 2019, Alg. 1)."""
from __future__ import annotations

from typing import Callable

import torch

from sde_lib import SDE, VESDE

from .common import (CountingScore, NonFiniteGuard, SampleResult, check_int, check_real,
                     initial_state, progress_bar, std_normal_like)

__all__ = ["ald_sample"]


def ald_sample(score_fn: Callable, sde: SDE, shape, *, n_steps_each: int = 100,
               step_lr: float = 2e-5, denoise: bool = True,
               generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype | None = None, x_init: torch.Tensor | None = None,
               progress: bool = False, callback: Callable | None = None) -> SampleResult:
    """NCSN's annealed Langevin dynamics over the VESDE's noise levels, largest first.

    At level i (sigma_i, time t_i = i T / (N - 1)) it runs ``n_steps_each`` steps of
        x <- x + (a_i / 2) s(x, t_i) + sqrt(a_i) z,   a_i = step_lr sigma_i^2 / sigma_min^2
    (Song & Ermon 2019, Alg. 1). With ``denoise`` it ends with NCSNv2's denoising step
    x <- x + sigma_min^2 s(x, t_0) (Song & Ermon 2020, App. B; Tweedie's formula).
    Defaults are NCSN's CIFAR-10 settings (10 levels 1 -> 0.01); NCSNv2 uses e.g.
    n_steps_each=5, step_lr=6.2e-6 with 232 levels from 50.

    Args and result as ``pc_sample``; callback gets dict(step, level, t, x) after each level.
    """
    if not isinstance(sde, VESDE):
        raise ValueError(f"ald_sample runs NCSN's annealed Langevin dynamics over a VESDE's noise "
                         f"levels; for {type(sde).__name__} use pc_sample (e.g. corrector='ald' "
                         "or 'langevin')")
    n_steps_each = check_int("n_steps_each", n_steps_each)
    step_lr = check_real("step_lr", step_lr, strict=True)
    x = initial_state(sde, shape, generator=generator, device=device, dtype=dtype, x_init=x_init)
    score = CountingScore(score_fn)
    levels = torch.arange(sde.N - 1, -1, -1, device=x.device)
    times = sde.index_time(levels)                                  # float64, on x's device
    sigmas = sde.discrete_marginal_coeffs(levels)[1]
    step_sizes = (step_lr * (sigmas / sde.sigma_min) ** 2).to(x.dtype)
    guard = NonFiniteGuard(times, check_every=max(1, 500 // n_steps_each))
    batch = x.shape[0]
    with progress_bar(sde.N, progress, "annealed Langevin") as bar:
        for k in range(sde.N):
            t = times[k].to(x.dtype).expand(batch)
            a = step_sizes[k]
            for _ in range(n_steps_each):
                x = x + 0.5 * a * score(x, t) + torch.sqrt(a) * std_normal_like(x, generator)
            guard.update(k, x)
            if callback is not None:
                callback(dict(step=k, level=sde.N - 1 - k, t=times[k].item(), x=x))
            bar.update(1)
    if denoise:
        t = times[-1].to(x.dtype).expand(batch)
        x = x + sde.sigma_min ** 2 * score(x, t)
        guard.update(sde.N - 1, x)
    return SampleResult(x, score.nfe)
