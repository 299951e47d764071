"""The variational bound of a discrete-chain model: bits/dim as DDPM and Improved DDPM report
them (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, Sec. 2-3), next to the ODE's.

The chain of an SDE with ``has_discrete_chain`` has levels i = 0..N-1 with marginals
q(x_i | x0) = N(alpha_i x0, std_i^2 I) (``sde.discrete_marginal_coeffs``); level -1 is the
data. The bound on -log p(x0) is

    L = L_prior + sum_{i=1}^{N-1} L_i + L_0
    L_prior = KL(q(x_{N-1} | x0) || N(0, prior_std^2 I))
    L_i     = KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i))           (Ho et al. eq. 5)
    L_0     = -log p(x0 | x_0-level)  (discretized Gaussian for 8-bit data, Ho et al. eq. 13)

q(x_{i-1} | x_i, x0) = N(c0_i x0 + cx_i x_i, v_i I) (samplers.pc.ancestral_coefficients), and
the model's reverse step puts the data prediction x0_hat (Tweedie, from the score) in its
place: p(x_{i-1} | x_i) = N(c0_i x0_hat + cx_i x_i, Sigma_i I). The reverse variance Sigma_i
is 'small' (v_i, DDPM's beta~), 'large' (the step's forward variance, DDPM's beta) or
'analytic' (Bao et al. 2022, Analytic-DPM: v_i + c0_i^2 E Var[x0 | x_i], the optimum for the
data-prediction mean, E Var[x0 | x_i] estimated from the score model on data by
``expected_posterior_variance``). At level 0, v_0 = 0: 'small' and 'large' use v_1
there, as Improved DDPM clips it.

The network sees level i at the time the PC sampler pairs with it (Score SDE's convention):
t_i = eps + i (T - eps) / (N - 1) (``level_times``). Each L_i is one network evaluation at
x_i ~ q(x_i | x0) (a Monte Carlo estimate of the KL's expectation), so the whole bound costs N - 1 + 1 evaluations per image; ``num_levels`` = K
evaluates a uniform random subset of the KL terms, weighted (N - 1) / K: unbiased.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from sde_lib import SDE
from sde_lib.utils import append_dims

from .harness import Schedule, progress_bar, time_grid
from .pc import ancestral_coefficients

__all__ = ["VLBResult", "VARIANCES", "DECODERS", "ESTIMATORS", "level_times", "vlb", "reverse_variances",
           "expected_posterior_variance", "discretized_gaussian_log_likelihood"]

#: The reverse-step variances of ``reverse_variances``.
VARIANCES = ("small", "large", "analytic")
#: The decoders of L_0: 8-bit data, or continuous data (the exactness tests).
DECODERS = ("discretized", "gaussian")


@dataclass
class VLBResult:
    """The bound per sample: ``bpd`` (B,) bits/dim; ``nats`` (B,) its total in nats;
    ``prior`` (B,), ``decoder`` (B,), ``kl`` (B, K) the KL terms of ``levels`` (K,) in nats
    (unweighted), ``kl_weight`` the factor (N - 1) / K of their sum; ``nfe`` network
    evaluations per sample; ``variances`` (N,) the reverse variances Sigma_i used."""

    bpd: torch.Tensor
    nats: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    kl: torch.Tensor
    levels: torch.Tensor
    kl_weight: float
    nfe: int
    variances: torch.Tensor

    def terms_bpd(self, dim: int) -> dict:
        """Mean bits/dim of each part: prior, the KL sum, decoder (they add up to bpd)."""
        scale = 1.0 / (dim * math.log(2.0))
        return {"prior": self.prior.mean().item() * scale,
                "kl_sum": (self.kl.sum(1) * self.kl_weight).mean().item() * scale,
                "decoder": self.decoder.mean().item() * scale}


def level_times(sde: SDE, eps: float = 1e-3) -> torch.Tensor:
    """(N,) float64: the time t_i = eps + i (T - eps) / (N - 1) at which the network is asked
    about chain level i, as the PC sampler's grid linspace(T, eps, N) pairs them."""
    return time_grid(sde, sde.N, eps).flip(0)


def _check_chain(sde: SDE) -> None:
    if not getattr(sde, "has_discrete_chain", False):
        raise ValueError(f"{type(sde).__name__} has no discrete chain, so it has no variational "
                         "bound: use the ODE likelihood (samplers.log_likelihood), or an SDE with "
                         "a chain (VP / VE with N steps)")


def reverse_variances(sde: SDE, variance: str = "small",
                      posterior_x0_variance: torch.Tensor | None = None) -> torch.Tensor:
    """Sigma_i (N,) float64 of the model's reverse steps for every level i = 0..N-1.

    'small': v_i, the posterior variance (beta~_i for DDPM), v_0 := v_1 (Improved DDPM's clip);
    'large': the step's forward variance (beta_i for DDPM), level 0 := v_1 as well;
    'analytic': v_i + c0_i^2 E Var[x0 | x_i] with ``posterior_x0_variance`` (N,) from
    ``expected_posterior_variance`` (Analytic-DPM; the optimum for this mean)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown reverse variance {variance!r}; valid: {', '.join(VARIANCES)}")
    levels = torch.arange(sde.N)
    alpha, std, c0, _, noise_std = ancestral_coefficients(sde, levels)
    v = noise_std ** 2
    if variance == "analytic":
        if posterior_x0_variance is None:
            raise ValueError("variance='analytic' needs posterior_x0_variance (N,): estimate it "
                             "with samplers.vlb.expected_posterior_variance")
        return v + c0 ** 2 * posterior_x0_variance.to(v)
    first = v[1] if sde.N > 1 else std[0] ** 2
    if variance == "small":
        return torch.cat([first.reshape(1), v[1:]])
    alpha_prev = torch.cat([torch.ones(1, dtype=alpha.dtype), alpha[:-1]])
    std_prev = torch.cat([torch.zeros(1, dtype=std.dtype), std[:-1]])
    step = std ** 2 - (alpha / alpha_prev) ** 2 * std_prev ** 2        # b_i^2 of x_i | x_{i-1}
    return torch.cat([first.reshape(1), step[1:]])


#: Estimators of E Var[x0 | x_i] (``expected_posterior_variance``).
ESTIMATORS = ("mse", "score_norm")


@torch.no_grad()
def expected_posterior_variance(score_fn: Callable, sde: SDE, data: torch.Tensor, *,
                                estimator: str = "mse", eps: float = 1e-3,
                                generator: torch.Generator | None = None,
                                batch_size: int = 0, progress: bool = False) -> torch.Tensor:
    """E Var[x0 | x_i] per dimension (N,) float64 for every level, estimated on ``data``
    (M, ...) with x_i ~ q(x_i | x0); N network evaluations per data row.

    'mse': E|x0 - x0_hat(x_i)|^2 / D, the data prediction's mean squared error. For the mean
    c0 x0_hat + cx x_i, v_i + c0_i^2 mse_i is the variance that minimises the expected KL term
    of *this* model (exact or not), and for the exact score it is E Var[x0 | x_i].
    'score_norm': Analytic-DPM's formula (Bao et al. 2022, Thm. 1), std_i^2 / alpha_i^2
    (1 - std_i^2 E|score(x_i)|^2 / D), exact for the exact score; at high noise it is a
    difference of nearly equal numbers scaled by std^2 / alpha^2, so its Monte Carlo error
    grows there. Both are clipped to [0, std_i^2 / alpha_i^2] (the range of Var[x0 | x_i])."""
    _check_chain(sde)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    levels = torch.arange(sde.N)
    alpha, std = sde.discrete_marginal_coeffs(levels)
    times = level_times(sde, eps)
    dim = data[0].numel()
    batch_size = batch_size or len(data)
    mean_square = torch.zeros(sde.N, dtype=torch.float64)
    bar = progress_bar(sde.N, progress, "posterior variance", unit="level")
    try:
        for i in range(sde.N):
            total = 0.0
            for first in range(0, len(data), batch_size):
                x0 = data[first:first + batch_size]
                x = _perturb(x0, alpha[i], std[i], generator)
                t = torch.full((len(x0),), float(times[i]), device=x0.device, dtype=x0.dtype)
                score = score_fn(x, t)
                if estimator == "mse":
                    x0_hat = Schedule.tweedie(x, score, float(alpha[i]), float(std[i]))
                    total += (x0 - x0_hat).double().flatten(1).pow(2).sum().item()
                else:
                    total += score.double().flatten(1).pow(2).sum().item()
            mean_square[i] = total / (len(data) * dim)
            bar.update(1)
    finally:
        bar.close()
    ratio = (std / alpha) ** 2
    estimate = mean_square if estimator == "mse" else ratio * (1.0 - std ** 2 * mean_square)
    return estimate.clamp(min=0.0).minimum(ratio)


def _perturb(x0, alpha, std, generator):
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return x0 * float(alpha) + noise * float(std)


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
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
                            _approx_standard_normal_cdf(upper))
    cdf_lower = torch.where(x <= low + bin_width / 2, torch.zeros_like(lower),
                            _approx_standard_normal_cdf(lower))
    mass = (cdf_upper - cdf_lower).clamp(min=1e-300)
    # far in a tail the difference of CDFs underflows: use the density times the bin width
    centre = (x - mean) / std
    log_density = -0.5 * centre ** 2 - 0.5 * math.log(2 * math.pi) - torch.log(std) \
        + math.log(bin_width)
    return torch.where(mass > 1e-12, torch.log(mass), log_density)


def _gaussian_kl(mean_q, var_q, mean_p, var_p) -> torch.Tensor:
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) summed over the event dims -> (B,)."""
    d = mean_q.double() - mean_p.double()
    elementwise = 0.5 * (torch.log(var_p / var_q) + var_q / var_p - 1.0 + d ** 2 / var_p)
    return elementwise.flatten(1).sum(1)


def _prior_term(sde, x0, alpha, std) -> torch.Tensor:
    prior_var = float(getattr(sde, "prior_std", 1.0)) ** 2
    mean = x0.double() * float(alpha)
    return _gaussian_kl(mean, torch.tensor(float(std) ** 2, dtype=torch.float64),
                        torch.zeros_like(mean), torch.tensor(prior_var, dtype=torch.float64))


def _levels(sde, num_levels: int | None, generator, device) -> tuple[torch.Tensor, float]:
    """The KL levels to evaluate (1..N-1, or a uniform subset of K) and their weight."""
    count = sde.N - 1
    if not num_levels or num_levels >= count:
        return torch.arange(1, sde.N), 1.0
    order = torch.randperm(count, generator=generator, device=generator.device
                           if generator is not None else "cpu")
    return order[:num_levels].sort().values.cpu() + 1, count / num_levels


@torch.no_grad()
def vlb(score_fn: Callable, sde: SDE, x0: torch.Tensor, *, variance: str = "small",
        posterior_x0_variance: torch.Tensor | None = None, decoder: str = "discretized",
        bin_width: float = 2.0 / 255.0, data_range: tuple[float, float] = (-1.0, 1.0),
        num_levels: int | None = None, eps: float = 1e-3,
        generator: torch.Generator | None = None, progress: bool = False) -> VLBResult:
    """The variational bound of the model ``score_fn`` on ``sde``'s discrete chain at data
    x0 (B, ...) in the model's space.

    decoder='discretized': x0 are 8-bit values scaled to [-1, 1] (centered data; bins of
    ``bin_width`` = 2/255; for uncentered data 1/255 and ``data_range`` (0, 1)), so the bound is
    on the discrete data's -log P and its bits/dim are those of 8-bit images (no
    dequantization). decoder='gaussian': a Gaussian density N(x0_hat, Sigma_0) for continuous
    data. ``variance``: see ``reverse_variances``. ``num_levels``: an unbiased random subset of
    the KL terms (default all N - 1). ``eps``: the time of level 0 (``level_times``). One
    network evaluation per level, noise and subset from ``generator``."""
    _check_chain(sde)
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    variances = reverse_variances(sde, variance, posterior_x0_variance)
    levels, weight = _levels(sde, num_levels, generator, x0.device)
    all_levels = torch.arange(sde.N)
    alpha, std, c0, cx, noise_std = ancestral_coefficients(sde, all_levels)
    batch = x0.shape[0]
    denoise = _denoiser(score_fn, level_times(sde, eps))
    kl = torch.zeros(batch, len(levels), dtype=torch.float64, device=x0.device)
    bar = progress_bar(len(levels) + 1, progress, "VLB", unit="level")
    try:
        for k, i in enumerate(levels.tolist()):
            x = _perturb(x0, alpha[i], std[i], generator)
            x0_hat = denoise(x, i, alpha[i], std[i])
            posterior_var = torch.tensor(float(noise_std[i]) ** 2, dtype=torch.float64)
            model_var = variances[i].to(torch.float64)
            # the means differ by c0_i (x0 - x0_hat): the same x_i term cancels
            kl[:, k] = _gaussian_kl(x0 * float(c0[i]), posterior_var,
                                    x0_hat * float(c0[i]), model_var)
            bar.update(1)
        x = _perturb(x0, alpha[0], std[0], generator)
        x0_hat = denoise(x, 0, alpha[0], std[0])
        scale = torch.sqrt(variances[0]).to(torch.float64)
        if decoder == "discretized":
            log_p = discretized_gaussian_log_likelihood(x0, x0_hat, scale, bin_width=bin_width,
                                                        low=data_range[0], high=data_range[1])
        else:
            log_p = (-0.5 * ((x0.double() - x0_hat.double()) / scale) ** 2
                     - torch.log(scale) - 0.5 * math.log(2 * math.pi))
        decoder_nats = -log_p.flatten(1).sum(1)
        bar.update(1)
    finally:
        bar.close()
    prior = _prior_term(sde, x0, alpha[-1], std[-1])
    nats = prior + kl.sum(1) * weight + decoder_nats
    dim = x0[0].numel()
    return VLBResult(bpd=nats / (dim * math.log(2.0)), nats=nats, prior=prior,
                     decoder=decoder_nats, kl=kl, levels=levels, kl_weight=weight,
                     nfe=len(levels) + 1, variances=variances)


def _denoiser(score_fn, times: torch.Tensor):
    """x0_hat(x, level i): Tweedie's E[x0 | x_i] with the chain's alpha_i, std_i and the score
    at the level's time ``times[i]``."""
    def denoise(x, i, alpha, std):
        t = torch.full((x.shape[0],), float(times[i]), device=x.device, dtype=x.dtype)
        return Schedule.tweedie(x, score_fn(x, t), float(alpha), float(std))
    return denoise
