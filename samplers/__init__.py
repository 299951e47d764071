"""samplers: integrate the reverse-time SDE / probability-flow ODE from the prior to data.

    result = samplers.pc_sample(score_fn, sde, (64, 3, 32, 32), predictor="reverse_diffusion",
                                corrector="langevin", snr=0.16)
    result.x, result.nfe
    samplers.SAMPLERS["dpm_solver"](score_fn, sde, shape, num_steps=10)   # by name

Every sampler takes ``score_fn(x, t)`` (from ``models.get_score_fn`` or an exact score),
the SDE, the sample shape, its options, and the harness options (generator, device, dtype,
x_init, progress, callback); it returns a ``SampleResult(x, nfe)``. All of them run on the
one harness (``samplers.harness``) and its schedule view.

``SAMPLERS`` is the registry: name -> ``Sampler(fn, check)``; the options of a sampler and
their defaults are its function's keyword-only parameters. A new sampler adds its module,
one line here and its test (tests/test_sampler_contract.py runs over every entry).
"""
from .adaptive import check_dpm_adaptive_options, dpm_solver_adaptive_sample
from .ald import ald_sample, check_ald_options
from .edm import check_edm_options, edm_sample, edm_sigmas
from .fast import (DPM_ALGORITHMS, SPACINGS, check_ddim_options, check_dpm_solver_options,
                   ddim_sample, dpm_solver_sample, timesteps)
from .guidance import classifier_free_guidance, classifier_guidance, dynamic_thresholding
from .harness import Harness, SampleResult, Sampler, Schedule, SchedulePoint
from .inverse import KNOWN_NOISE, METHODS as INVERSE_METHODS
from .inverse import (Replacement, colorize, inpaint, pigdm_score, smc_sample,
                      solve_inverse_problem, super_resolve)
from .ipndm import check_ipndm_options, ipndm_sample
from .operators import Colorization, Inpainting, LinearOperator, SuperResolution
from .likelihood import (PROBE_NOISES, TRACE_ESTIMATORS, BitsPerDimResult, LikelihoodResult,
                         bits_per_dim, log_likelihood)
from .ode import ODE_METHODS, check_ode_options, ode_sample
from .pc import CORRECTORS, PREDICTORS, check_pc_options, pc_sample
from .respaced import RESPACINGS, check_respaced_options, respaced_sample
from .unipc import UNIPC_ALGORITHMS, UNIPC_VARIANTS, check_unipc_options, unipc_sample
from .vlb import VARIANCES, VLBResult, expected_posterior_variance, reverse_variances, vlb

__all__ = ["SampleResult", "SAMPLERS", "Sampler", "Harness", "Schedule", "SchedulePoint",
           "pc_sample", "ald_sample", "ode_sample", "ddim_sample", "dpm_solver_sample",
           "edm_sample", "dpm_solver_adaptive_sample", "log_likelihood", "bits_per_dim",
           "LikelihoodResult", "BitsPerDimResult", "PREDICTORS", "CORRECTORS", "ODE_METHODS",
           "TRACE_ESTIMATORS", "PROBE_NOISES", "timesteps", "SPACINGS", "DPM_ALGORITHMS",
           "edm_sigmas", "inpaint", "colorize", "super_resolve", "solve_inverse_problem",
           "smc_sample", "pigdm_score", "Replacement", "INVERSE_METHODS", "KNOWN_NOISE",
           "LinearOperator", "Inpainting", "Colorization", "SuperResolution",
           "classifier_free_guidance", "classifier_guidance", "dynamic_thresholding",
           "vlb", "VLBResult", "VARIANCES", "reverse_variances", "expected_posterior_variance",
           "respaced_sample", "RESPACINGS",
           "unipc_sample", "UNIPC_VARIANTS", "UNIPC_ALGORITHMS", "ipndm_sample"]

#: The samplers by name (main.py --sampler, config.sampling.<name>).
SAMPLERS = {
    "pc": Sampler(pc_sample, check_pc_options),
    "ald": Sampler(ald_sample, check_ald_options),
    "ode": Sampler(ode_sample, check_ode_options),
    "ddim": Sampler(ddim_sample, check_ddim_options),
    "dpm_solver": Sampler(dpm_solver_sample, check_dpm_solver_options),
    "edm": Sampler(edm_sample, check_edm_options),
    "dpm_adaptive": Sampler(dpm_solver_adaptive_sample, check_dpm_adaptive_options),
    "respaced": Sampler(respaced_sample, check_respaced_options),
    "unipc": Sampler(unipc_sample, check_unipc_options),
    "ipndm": Sampler(ipndm_sample, check_ipndm_options),
}
