"""The discrete chain of an SDE (``sde.has_discrete_chain``): its posteriors, its reverse
variances and the Gaussian terms of its variational bound.

Levels i = 0..N-1 have marginals q(x_i | x0) = N(alpha_i x0, std_i^2 I)
(``sde.discrete_marginal_coeffs``); level -1 is the data. One step is x_i = a_i x_{i-1} +
b_i z with a_i = alpha_i / alpha_{i-1}, b_i^2 = std_i^2 - a_i^2 std_{i-1}^2 (DDPM: a_i =
sqrt(1 - beta_i), b_i^2 = beta_i; Ho et al. 2020, eq. 2), and the posterior is

    q(x_{i-1} | x_i, x0) = N(c0_i x0 + cx_i x_i, v_i I),   c0_i = alpha_{i-1} b_i^2 / std_i^2,
    cx_i = a_i std_{i-1}^2 / std_i^2,   v_i = std_{i-1}^2 b_i^2 / std_i^2     (Ho et al. eq. 7)

(DDPM's beta~_i = v_i). Improved DDPM (Nichol & Dhariwal 2021, eq. 15) learns the reverse
variance as Sigma_i = exp(v log beta_i + (1 - v) log beta~_i) between the two fixed choices;
``learned_log_variance`` computes it for every chain (VP, VE, the cosine schedule).
"""
from __future__ import annotations

import math

import torch

from .sdes import SDE
from .utils import append_dims

__all__ = ["posterior_coefficients", "variance_bounds", "learned_log_variance", "gaussian_kl",
           "discretized_gaussian_log_likelihood", "gaussian_log_likelihood", "check_chain"]


def check_chain(sde: SDE, what: str = "this") -> None:
    """ValueError when ``sde`` has no discrete chain (sub-VP, or N unset)."""
    if not getattr(sde, "has_discrete_chain", False):
        raise ValueError(f"{type(sde).__name__} has no discrete chain, which {what} needs: use "
                         "an SDE with a chain (VP, VE, cosine / log-SNR VP with N steps)")


def posterior_coefficients(sde: SDE, levels: torch.Tensor):
    """Per level i (n,) the marginal and the posterior q(x_{i-1} | x_i, x0) (module
    docstring): (alpha_i, std_i, c0_i, cx_i, sqrt(v_i)), (n,) float64 each. Level 0's
    posterior is the data itself (v_0 = 0)."""
    alpha, std = sde.discrete_marginal_coeffs(levels)
    alpha_prev, std_prev = sde.discrete_marginal_coeffs((levels - 1).clamp(min=0))
    first = levels == 0
    alpha_prev = torch.where(first, torch.ones_like(alpha_prev), alpha_prev)
    std_prev = torch.where(first, torch.zeros_like(std_prev), std_prev)
    a = alpha / alpha_prev
    b2 = std ** 2 - a ** 2 * std_prev ** 2
    return (alpha, std, alpha_prev * b2 / std ** 2, a * std_prev ** 2 / std ** 2,
            torch.sqrt(std_prev ** 2 * b2 / std ** 2))


def variance_bounds(sde: SDE) -> tuple[torch.Tensor, torch.Tensor]:
    """(log beta~_i, log beta_i), (N,) float64 each, the ends of the learned variance's range
    (Improved DDPM's ``posterior_log_variance_clipped`` and ``log(betas)``): beta~_i = v_i
    with v_0 := v_1 (v_0 = 0), beta_i = b_i^2 (level 0: b_0^2 = std_0^2)."""
    levels = torch.arange(sde.N)
    alpha, std, _, _, posterior_std = posterior_coefficients(sde, levels)
    small = posterior_std ** 2
    if sde.N > 1:
        small = torch.cat([small[1:2], small[1:]])
    alpha_prev = torch.cat([torch.ones(1, dtype=alpha.dtype), alpha[:-1]])
    std_prev = torch.cat([torch.zeros(1, dtype=std.dtype), std[:-1]])
    step = std ** 2 - (alpha / alpha_prev) ** 2 * std_prev ** 2
    return torch.log(small), torch.log(step)


def learned_log_variance(bounds: tuple[torch.Tensor, torch.Tensor], levels: torch.Tensor,
                         v: torch.Tensor) -> torch.Tensor:
    """log Sigma = v log beta_i + (1 - v) log beta~_i (Improved DDPM eq. 15) for levels (B,)
    long and the network's interpolation v (B, ...); ``bounds`` from ``variance_bounds``.
    Returns the shape of v in v's dtype."""
    log_small, log_large = (append_dims(b.to(v.device)[levels].to(v.dtype), v.ndim)
                            for b in bounds)
    return v * log_large + (1 - v) * log_small


def gaussian_kl(mean_q, log_var_q, mean_p, log_var_p) -> torch.Tensor:
    """KL(N(mean_q, e^log_var_q) || N(mean_p, e^log_var_p)) per element (broadcast), in the
    dtype of the inputs (Ho et al. 2020, eq. 5's Gaussian terms)."""
    return 0.5 * (log_var_p - log_var_q + torch.exp(log_var_q - log_var_p)
                  + (mean_q - mean_p) ** 2 * torch.exp(-log_var_p) - 1.0)


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                                        *, bin_width: float, low: float = -1.0,
                                        high: float = 1.0) -> torch.Tensor:
    """log P(x) per element of a Gaussian N(mean, std^2) integrated over the bin [x - w/2,
    x + w/2] of 8-bit data (Ho et al. 2020, eq. 13), the outermost bins extended to -inf /
    +inf; x on the grid low, low + w, ..., high. Shapes broadcast; float64 inside."""
    x, mean, std = x.double(), mean.double(), std.double()
    upper = (x - mean + bin_width / 2) / std
    lower = (x - mean - bin_width / 2) / std
    cdf_upper = torch.where(x >= high - bin_width / 2, torch.ones_like(upper),
                            _standard_normal_cdf(upper))
    cdf_lower = torch.where(x <= low + bin_width / 2, torch.zeros_like(lower),
                            _standard_normal_cdf(lower))
    mass = (cdf_upper - cdf_lower).clamp(min=1e-300)
    # far in a tail the difference of CDFs underflows: use the density times the bin width
    log_density = gaussian_log_likelihood(x, mean, std) + math.log(bin_width)
    return torch.where(mass > 1e-12, torch.log(mass), log_density)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element (shapes broadcast)."""
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
