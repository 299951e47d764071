"""Annealed Langevin dynamics, the sampler of NCSN (Song & Ermon 2019, Alg. 1)."""
from __future__ import annotations

from typing import Callable

import torch

from sde_lib import SDE, check_bool, check_int, check_real

from .harness import DATA_POINT, Harness, SampleResult

__all__ = ["ald_sample", "check_ald_options"]


def check_ald_options(sde: SDE, *, n_steps_each=100, step_lr=2e-5, denoise=True) -> None:
    """ValueError naming the first bad option of ``ald_sample`` (or the SDE it needs)."""
    if not (sde.keeps_data_scale and sde.has_discrete_chain):
        raise ValueError(f"ald_sample runs NCSN's annealed Langevin dynamics over the noise "
                         f"levels of an SDE with alpha = 1 and a discrete chain (VESDE); for "
                         f"{sde!r} use pc_sample (e.g. corrector='ald' or 'langevin')")
    check_int("n_steps_each (Langevin steps per noise level)", n_steps_each)
    check_real("step_lr", step_lr, strict=True)
    check_bool("denoise", denoise)


def ald_sample(score_fn: Callable, sde: SDE, shape, *, n_steps_each: int = 100,
               step_lr: float = 2e-5, denoise: bool = True, **harness_options) -> SampleResult:
    """NCSN's annealed Langevin dynamics over the VESDE's noise levels, largest first.

    At level i (sigma_i, time t_i = i T / (N - 1)) it runs ``n_steps_each`` steps of
        x <- x + (a_i / 2) s(x, t_i) + sqrt(a_i) z,   a_i = step_lr sigma_i^2 / sigma_min^2
    (Song & Ermon 2019, Alg. 1). With ``denoise`` it ends with NCSNv2's denoising step
    x <- x + sigma_min^2 s(x, t_0) (Song & Ermon 2020, App. B; Tweedie's formula).
    Defaults are NCSN's CIFAR-10 settings (10 levels 1 -> 0.01); NCSNv2 uses e.g.
    n_steps_each=5, step_lr=6.2e-6 with 232 levels from 50.

    Args and result as ``pc_sample``; the callback is called after each noise level.
    """
    check_ald_options(sde, n_steps_each=n_steps_each, step_lr=step_lr, denoise=denoise)
    with Harness(score_fn, sde, shape, name="annealed Langevin", total=sde.N,
                 check_every=max(1, 500 // n_steps_each), **harness_options) as run:
        levels = torch.arange(sde.N - 1, -1, -1)
        times, points = run.points(sde.index_time(levels))
        sigmas = sde.discrete_marginal_coeffs(levels)[1]
        step_sizes = (step_lr * (sigmas / sigmas[-1]) ** 2).tolist()
        x = run.x
        for k, a in enumerate(step_sizes):
            for _ in range(n_steps_each):
                x = x + (0.5 * a) * run.schedule.score(x, times[k]) + a ** 0.5 * run.noise(x)
                x = run.project(x, points[k])
            run.step(k, x, points[k], project=False)
        if denoise:
            x = run.schedule.denoise(x, points[-1])       # x + sigma_min^2 s (alpha = 1)
            x = run.step(sde.N, x, DATA_POINT, denoised=x)
        return run.result(x)
