"""sde_lib: the math of the forward SDEs and the denoising score matching objectives.

    import sde_lib
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    sde = sde_lib.build_sde(config)          # from the config's ``sde`` group
"""
from __future__ import annotations

from .losses import discrete_dsm_losses, dsm_losses, get_loss_fn, sample_time
from .mixtures import (TOY_DISTRIBUTIONS, GaussianMixture, eight_mode_mixture, spread_gaussian,
                       toy_distribution)
from .sdes import SDE, VESDE, VPSDE, reverse_drift, subVPSDE
from .utils import SCHEDULE_DTYPE, append_dims, batch_time

__all__ = [
    "SDE", "VPSDE", "subVPSDE", "VESDE", "SDES", "build_sde", "reverse_drift",
    "dsm_losses", "discrete_dsm_losses", "get_loss_fn", "build_loss_fn", "sample_time",
    "GaussianMixture", "eight_mode_mixture", "spread_gaussian", "toy_distribution",
    "TOY_DISTRIBUTIONS", "append_dims", "batch_time", "SCHEDULE_DTYPE",
]

#: SDE name in ``config.sde.name`` -> (class, the config keys it takes besides num_scales).
SDES = {
    "vpsde": (VPSDE, ("beta_min", "beta_max")),
    "subvpsde": (subVPSDE, ("beta_min", "beta_max")),
    "vesde": (VESDE, ("sigma_min", "sigma_max")),
}


def _group(config, name: str):
    try:
        return config[name]
    except (KeyError, AttributeError, TypeError):
        raise ValueError(f"the config has no '{name}' group; add config.{name}") from None


def build_sde(config) -> SDE:
    """Build the SDE named by ``config.sde.name`` (one of SDES) from the config's sde group.

    Keys: name, num_scales (N), and beta_min/beta_max (vpsde, subvpsde) or
    sigma_min/sigma_max (vesde); missing parameters take the class defaults.
    """
    group = _group(config, "sde")
    name = str(group.get("name", "")).lower()
    if name not in SDES:
        raise ValueError(f"config.sde.name={group.get('name')!r} is not a known SDE; "
                         f"valid names: {', '.join(SDES)}")
    cls, keys = SDES[name]
    kwargs = {key: group[key] for key in keys if key in group}
    if "num_scales" in group:
        kwargs["N"] = group["num_scales"]
    return cls(**kwargs)


def build_loss_fn(config, sde: SDE):
    """``get_loss_fn`` with the options of ``config.training`` (continuous, reduce_mean,
    likelihood_weighting, importance_sampling) and ``config.training.eps``."""
    training = _group(config, "training")
    options = {key: training[key] for key in
               ("continuous", "reduce_mean", "likelihood_weighting", "importance_sampling", "eps")
               if key in training}
    return get_loss_fn(sde, **options)
