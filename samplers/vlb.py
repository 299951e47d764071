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
is 'small' (v_i, DDPM's beta~), 'large' (the step's forward variance, DDPM's beta),
'analytic' (Bao et al. 2022, Analytic-DPM: v_i + c0_i^2 E Var[x0 | x_i], the optimum for the
data-prediction mean, E Var[x0 | x_i] estimated from the score model on data by
``expected_posterior_variance``) or 'learned' (Improved DDPM: the network's interpolation
v between log beta_i and log beta~_i, per element; ``score_fn`` then returns (score, v), as
``score_fn.score_and_variance`` of models.get_score_fn does). At level 0, v_0 = 0: 'small'
and 'large' use v_1 there, as Improved DDPM clips it.

The network sees level i at the time the PC sampler pairs with it (Score SDE's convention):
t_i = eps + i (T - eps) / (N - 1) (``level_times``, level_time='grid', for networks on
continuous time), or at t_i = i T / (N - 1) (level_time='index': the time the discrete losses
train level i at, for networks conditioned on discrete levels, which the grid's times would
round to level i + 1 in the lower half of the chain). Each L_i is one network evaluation at
x_i ~ q(x_i | x0) (a Monte Carlo estimate of the KL's expectation), so the whole bound costs N - 1 + 1 evaluations per image; ``num_levels`` = K
evaluates a uniform random subset of the KL terms, weighted (N - 1) / K: unbiased.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from sde_lib import SDE
from sde_lib.chain import (check_chain, discretized_gaussian_log_likelihood, gaussian_kl,
                           gaussian_log_likelihood, learned_log_variance, variance_bounds)
from sde_lib.utils import check_choice

from .harness import Schedule, progress_bar, time_grid
from .pc import ancestral_coefficients

__all__ = ["VLBResult", "VARIANCES", "DECODERS", "ESTIMATORS", "LEVEL_TIMES", "level_times",
           "chain_times", "vlb", "reverse_variances", "expected_posterior_variance",
           "discretized_gaussian_log_likelihood"]

#: The reverse-step variances: fixed ('small', 'large'), Analytic-DPM's, or the network's.
VARIANCES = ("small", "large", "analytic", "learned")
#: Which time the network is asked about a chain level at (``chain_times``).
LEVEL_TIMES = ("grid", "index")
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


def chain_times(sde: SDE, eps: float = 1e-3, level_time: str = "grid") -> torch.Tensor:
    """(N,) float64: the time of each chain level: ``level_times`` ('grid') or i T / (N - 1)
    ('index', the discrete losses' times; module docstring)."""
    check_choice("level_time", level_time, LEVEL_TIMES)
    if level_time == "index":
        return sde.index_time(torch.arange(sde.N))
    return level_times(sde, eps)


def _check_chain(sde: SDE) -> None:
    check_chain(sde, "the variational bound (or use the ODE likelihood, samplers.log_likelihood)")


def reverse_variances(sde: SDE, variance: str = "small",
                      posterior_x0_variance: torch.Tensor | None = None) -> torch.Tensor:
    """Sigma_i (N,) float64 of the model's reverse steps for every level i = 0..N-1.

    'small': v_i, the posterior variance (beta~_i for DDPM), v_0 := v_1 (Improved DDPM's clip);
    'large': the step's forward variance (beta_i for DDPM), level 0 := v_1 as well;
    'analytic': v_i + c0_i^2 E Var[x0 | x_i] with ``posterior_x0_variance`` (N,) from
    ``expected_posterior_variance`` (Analytic-DPM; the optimum for this mean).
    'learned' has no fixed values (the network's, per element): NaN."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown reverse variance {variance!r}; valid: {', '.join(VARIANCES)}")
    if variance == "learned":
        return torch.full((sde.N,), math.nan, dtype=torch.float64)
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
                                level_time: str = "grid",
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
    times = chain_times(sde, eps, level_time)
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
                score = _score_only(score_fn(x, t))
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


def _score_only(output):
    """The score of a score_fn's output (a learned-variance network's (score, v) too)."""
    return output[0] if isinstance(output, tuple) else output


def _perturb(x0, alpha, std, generator):
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return x0 * float(alpha) + noise * float(std)


def _prior_term(sde, x0, alpha, std) -> torch.Tensor:
    prior_log_var = 2 * math.log(float(getattr(sde, "prior_std", 1.0)))
    mean = x0.double() * float(alpha)
    kl = gaussian_kl(mean, torch.tensor(2 * math.log(float(std)), dtype=torch.float64),
                     torch.zeros_like(mean), torch.tensor(prior_log_var, dtype=torch.float64))
    return kl.flatten(1).sum(1)


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
        num_levels: int | None = None, eps: float = 1e-3, level_time: str = "grid",
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
    check_choice("variance", variance, VARIANCES)
    variances = reverse_variances(sde, variance, posterior_x0_variance)
    levels, weight = _levels(sde, num_levels, generator, x0.device)
    all_levels = torch.arange(sde.N)
    alpha, std, c0, cx, noise_std = ancestral_coefficients(sde, all_levels)
    batch = x0.shape[0]
    denoise = _denoiser(score_fn, chain_times(sde, eps, level_time), variance, variances,
                        variance_bounds(sde) if variance == "learned" else None)
    kl = torch.zeros(batch, len(levels), dtype=torch.float64, device=x0.device)
    bar = progress_bar(len(levels) + 1, progress, "VLB", unit="level")
    try:
        for k, i in enumerate(levels.tolist()):
            x = _perturb(x0, alpha[i], std[i], generator)
            x0_hat, model_log_var = denoise(x, i, alpha[i], std[i])
            posterior_log_var = torch.tensor(2 * math.log(float(noise_std[i])),
                                             dtype=torch.float64)
            # the means differ by c0_i (x0 - x0_hat): the same x_i term cancels
            kl[:, k] = gaussian_kl(x0.double() * float(c0[i]), posterior_log_var,
                                   x0_hat * float(c0[i]), model_log_var).flatten(1).sum(1)
            bar.update(1)
        x = _perturb(x0, alpha[0], std[0], generator)
        x0_hat, model_log_var = denoise(x, 0, alpha[0], std[0])
        scale = torch.exp(0.5 * model_log_var)
        if decoder == "discretized":
            log_p = discretized_gaussian_log_likelihood(x0, x0_hat, scale, bin_width=bin_width,
                                                        low=data_range[0], high=data_range[1])
        else:
            log_p = gaussian_log_likelihood(x0.double(), x0_hat, scale)
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


def _denoiser(score_fn, times: torch.Tensor, variance: str, variances: torch.Tensor, bounds):
    """(x, level i) -> (x0_hat float64, the model's log variance float64: 0-d, or per element
    for 'learned'): Tweedie's E[x0 | x_i] with the chain's alpha_i, std_i and the score at
    the level's time ``times[i]``."""
    def denoise(x, i, alpha, std):
        t = torch.full((x.shape[0],), float(times[i]), device=x.device, dtype=x.dtype)
        output = score_fn(x, t)
        if variance == "learned":
            if not isinstance(output, tuple):
                raise ValueError("variance='learned' needs score_fn(x, t) -> (score, v): pass "
                                 "the learned-variance network's score_fn.score_and_variance")
            score, v = output
            level = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            log_var = learned_log_variance(bounds, level, v.double())
        else:
            score, log_var = _score_only(output), torch.log(variances[i].double())
        return Schedule.tweedie(x, score, float(alpha), float(std)).double(), log_var
    return denoise
