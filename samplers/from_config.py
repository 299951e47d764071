"""Run the sampler that a config's ``sampling`` group names."""
from __future__ import annotations

from typing import Callable

import torch

from sde_lib import SDE

from .adaptive import dpm_solver_adaptive_sample
from .ald import ald_sample
from .common import SampleResult, check_choice
from .edm import edm_sample
from .fast import ddim_sample, dpm_solver_sample
from .ode import ode_sample
from .pc import pc_sample

__all__ = ["SAMPLERS", "sample_from_config"]

SAMPLERS = ("pc", "ald", "ode", "ddim", "dpm_solver", "edm", "dpm_adaptive")


def sample_from_config(sampling, score_fn: Callable, sde: SDE, shape, *,
                       generator: torch.Generator | None = None, device=None,
                       progress: bool = False, callback: Callable | None = None,
                       method: str | None = None) -> SampleResult:
    """Sample with ``sampling.method`` (or ``method``): one of SAMPLERS.

    Keys of the ``sampling`` config group: predictor, corrector, snr, n_steps_each,
    noise_removal, eps (pc); n_steps_each, step_lr, noise_removal (ald); ode_method, rtol,
    atol, eps, noise_removal (ode); num_steps, spacing, eta, eps, noise_removal (ddim);
    num_steps, spacing, order, multistep, algorithm, eps, noise_removal (dpm_solver);
    num_steps, edm_spacing, rho, s_churn, s_tmin, s_tmax, s_noise, eps, noise_removal (edm);
    order (2 or 3), algorithm, adaptive_rtol, adaptive_atol (DPM-Solver's 0.05 / 0.0078 by
    default; the ode sampler's rtol / atol of 1e-5 cost 6-30x the NFE on the 64-D test
    Gaussian for no better FD), eps,
    noise_removal (dpm_adaptive).
    """
    method = method or sampling.method
    check_choice("sampler", method, SAMPLERS)
    common = dict(generator=generator, device=device, progress=progress, callback=callback)
    if method == "pc":
        return pc_sample(score_fn, sde, shape, predictor=sampling.predictor,
                         corrector=sampling.corrector, snr=sampling.snr,
                         n_steps=sampling.n_steps_each, denoise=sampling.noise_removal,
                         eps=sampling.eps, **common)
    if method == "ald":
        return ald_sample(score_fn, sde, shape, n_steps_each=sampling.n_steps_each,
                          step_lr=sampling.step_lr, denoise=sampling.noise_removal, **common)
    if method == "ode":
        return ode_sample(score_fn, sde, shape, method=sampling.ode_method, rtol=sampling.rtol,
                          atol=sampling.atol, eps=sampling.eps, denoise=sampling.noise_removal,
                          **common)
    if method == "edm":
        return edm_sample(score_fn, sde, shape, num_steps=sampling.num_steps,
                          spacing=sampling.edm_spacing, rho=sampling.rho,
                          s_churn=sampling.s_churn, s_tmin=sampling.s_tmin,
                          s_tmax=sampling.s_tmax, s_noise=sampling.s_noise, eps=sampling.eps,
                          denoise=sampling.noise_removal, **common)
    if method == "dpm_adaptive":
        return dpm_solver_adaptive_sample(score_fn, sde, shape, order=sampling.order,
                                          algorithm=sampling.algorithm,
                                          rtol=sampling.adaptive_rtol,
                                          atol=sampling.adaptive_atol, eps=sampling.eps,
                                          denoise=sampling.noise_removal, **common)
    fast = dict(num_steps=sampling.num_steps, spacing=sampling.spacing, eps=sampling.eps,
                denoise=sampling.noise_removal, **common)
    if method == "ddim":
        return ddim_sample(score_fn, sde, shape, eta=sampling.eta, **fast)
    return dpm_solver_sample(score_fn, sde, shape, order=sampling.order,
                             multistep=sampling.multistep, algorithm=sampling.algorithm, **fast)
