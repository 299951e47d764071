"""sde_lib: the math of the forward SDEs and the denoising score matching objectives.

    import sde_lib
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    sde = sde_lib.build_sde("vesde", sigma_min=0.01, sigma_max=50.0, N=1000)   # by name
    sde = sde_lib.CosineVPSDE(N=1000, s=0.008, max_beta=0.999)      # improved DDPM's schedule
    sde = sde_lib.LinearLogSNRVPSDE(logsnr_min=-10.0, logsnr_max=13.3, N=1000)

Plain arguments only: building from a config is run_lib.compose's job.
"""
from __future__ import annotations

from .losses import (LOSSES, LossAwareLevels, classifier_losses, discrete_dsm_losses, dsm_losses,
                     get_classifier_loss_fn, get_loss_fn, learned_variance_losses, sample_time)
from .mixtures import (TOY_DISTRIBUTIONS, GaussianMixture, eight_mode_mixture, spread_gaussian,
                       toy_distribution)
from .schedules import CosineVPSDE, LinearLogSNRVPSDE, VPScheduleSDE, betas_for_alpha_bar
from .sdes import SDE, VESDE, VPSDE, reverse_drift, subVPSDE
from .utils import (SCHEDULE_DTYPE, append_dims, batch_time, check_bool, check_choice, check_int,
                    check_real, check_time)

__all__ = [
    "SDE", "VPSDE", "subVPSDE", "VESDE", "SDES", "build_sde", "reverse_drift",
    "VPScheduleSDE", "CosineVPSDE", "LinearLogSNRVPSDE", "betas_for_alpha_bar",
    "dsm_losses", "discrete_dsm_losses", "get_loss_fn", "sample_time", "classifier_losses",
    "get_classifier_loss_fn", "LOSSES", "LossAwareLevels", "learned_variance_losses",
    "GaussianMixture", "eight_mode_mixture", "spread_gaussian", "toy_distribution",
    "TOY_DISTRIBUTIONS", "append_dims", "batch_time", "SCHEDULE_DTYPE",
    "check_int", "check_real", "check_choice", "check_bool", "check_time",
]

#: SDE name -> class (config.sde.name in the configs).
SDES = {"vpsde": VPSDE, "subvpsde": subVPSDE, "vesde": VESDE, "cosine_vpsde": CosineVPSDE,
        "logsnr_vpsde": LinearLogSNRVPSDE}


def build_sde(name: str, **params) -> SDE:
    """The SDE called ``name`` (one of SDES) with its keyword parameters (beta_min, beta_max,
    N for vpsde / subvpsde; sigma_min, sigma_max, N for vesde; N, s, max_beta for
    cosine_vpsde; logsnr_min, logsnr_max, N for logsnr_vpsde)."""
    if not isinstance(name, str):
        raise TypeError("sde_lib.build_sde takes an SDE name and keyword parameters; to build "
                        "from a config use run_lib.compose.build_sde(config)")
    check_choice("SDE name", name.lower(), SDES)
    return SDES[name.lower()](**params)
