"""samplers: integrate the reverse-time SDE / probability-flow ODE from the prior to data.

    result = samplers.pc_sample(score_fn, sde, (64, 3, 32, 32), predictor="reverse_diffusion",
                                corrector="langevin", snr=0.16)
    result.x, result.nfe

Every sampler takes ``score_fn(x, t)`` (from ``models.get_score_fn`` or an exact score),
the SDE, the sample shape, and keyword options; it returns a ``SampleResult(x, nfe)``.
All of them use the one reverse-time drift of ``sde_lib`` (``SDE.reverse``).
"""
from .adaptive import dpm_solver_adaptive_sample
from .ald import ald_sample
from .common import SampleResult
from .edm import edm_sample, edm_sigmas
from .fast import DPM_ALGORITHMS, SPACINGS, ddim_sample, dpm_solver_sample, timesteps
from .from_config import SAMPLERS, sample_from_config
from .likelihood import (PROBE_NOISES, TRACE_ESTIMATORS, BitsPerDimResult, LikelihoodResult,
                         bits_per_dim, log_likelihood)
from .ode import ODE_METHODS, ode_sample
from .pc import CORRECTORS, PREDICTORS, langevin_step_factor, pc_sample

__all__ = ["SampleResult", "pc_sample", "ald_sample", "ode_sample", "log_likelihood",
           "bits_per_dim", "LikelihoodResult", "BitsPerDimResult", "PREDICTORS", "CORRECTORS",
           "ODE_METHODS", "TRACE_ESTIMATORS", "PROBE_NOISES", "langevin_step_factor", "SAMPLERS", "sample_from_config",
           "ddim_sample", "dpm_solver_sample", "timesteps", "SPACINGS", "DPM_ALGORITHMS",
           "edm_sample", "edm_sigmas", "dpm_solver_adaptive_sample"]
