"""Predictor-corrector sampling (Song et al. 2021, Sec. 4.2, Alg. 1-5 of App. G).

A predictor takes one step of a reverse-time solver from grid time t_k to t_{k+1}; a
corrector runs score-based MCMC (Langevin dynamics) at t_k before it. Any predictor can be
paired with any corrector. Every update returns ``(x, x_mean)``: the new state and its
noiseless mean, which the final denoising step returns.

The time grid is that of the Score SDE code: t_k = T - k (T - eps) / (N - 1), k = 0..N-1,
with N = sde.N. The discrete predictors (reverse diffusion, ancestral) step from chain level
N - 1 - k to the level below, whatever t_k is, so each of the N levels is visited once.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sde_lib import SCHEDULE_DTYPE, SDE, append_dims

from .common import (CountingScore, NonFiniteGuard, SampleResult, check_choice, initial_state,
                     progress_bar, std_normal_like, time_grid)

__all__ = ["PREDICTORS", "CORRECTORS", "pc_sample", "langevin_step_factor"]


class Step:
    """Where a predictor is: the grid time t (B,), the next grid time t_next (B,; 0 after
    the last step) and the discrete chain level (B,) long, all on x's device."""

    def __init__(self, t: torch.Tensor, t_next: torch.Tensor, level: torch.Tensor):
        self.t, self.t_next, self.level = t, t_next, level


# ----- predictors -------------------------------------------------------------------------
def euler_maruyama(score, sde: SDE, x, step: Step, generator):
    """Euler-Maruyama on the reverse SDE (eq. 6): x <- x - [f - g^2 s] dt + g sqrt(dt) z."""
    dt = append_dims((step.t - step.t_next).to(x.dtype), x.ndim)          # > 0
    drift, diffusion = sde.reverse(x, step.t, score(x, step.t))
    x_mean = x - drift * dt
    return x_mean + append_dims(diffusion, x.ndim) * dt.sqrt() * std_normal_like(x, generator), x_mean


def reverse_diffusion(score, sde: SDE, x, step: Step, generator):
    """Reverse diffusion (eq. 47): x_{i-1} = x_i - f_i + G_i^2 s + G_i z, with (f_i, G_i) the
    forward chain of ``sde.discretize`` at level i (DDPM for VP, SMLD for VE, Euler-Maruyama
    for sub-VP)."""
    drift, G = sde.reverse(x, sde.index_time(step.level), score(x, step.t), discrete=True)
    x_mean = x - drift
    return x_mean + append_dims(G, x.ndim) * std_normal_like(x, generator), x_mean


def ancestral_sampling(score, sde: SDE, x, step: Step, generator):
    """Ancestral sampling: draw x_{i-1} from the chain's posterior q(x_{i-1} | x_i, x0_hat),
    with x0_hat = (x_i + std_i^2 s) / alpha_i (Tweedie).

    For a chain x_i = a_i x_{i-1} + b_i z with marginals (alpha_i, std_i): mean =
    alpha_{i-1} b_i^2 / std_i^2 x0_hat + a_i std_{i-1}^2 / std_i^2 x_i and variance
    std_{i-1}^2 b_i^2 / std_i^2. For VE this is SMLD's ancestral step (Song et al. 2021,
    eq. 47); for VP the mean is DDPM's (x + beta_i s) / sqrt(1 - beta_i) (Ho et al. 2020,
    Alg. 2) with DDPM's posterior variance beta~_i.
    """
    alpha, std = sde.discrete_marginal_coeffs(step.level)
    previous = (step.level - 1).clamp(min=0)
    alpha_prev, std_prev = sde.discrete_marginal_coeffs(previous)
    first = step.level == 0                              # below level 0 is the clean data
    alpha_prev = torch.where(first, torch.ones_like(alpha_prev), alpha_prev)
    std_prev = torch.where(first, torch.zeros_like(std_prev), std_prev)
    a = alpha / alpha_prev
    b2 = std ** 2 - a ** 2 * std_prev ** 2
    coeff_x0 = alpha_prev * b2 / std ** 2
    coeff_x = a * std_prev ** 2 / std ** 2
    noise_std = torch.sqrt(std_prev ** 2 * b2 / std ** 2)
    cast = lambda v: append_dims(v.to(x.dtype), x.ndim)  # noqa: E731
    x0_hat = (x + cast(std ** 2) * score(x, step.t)) / cast(alpha)
    x_mean = cast(coeff_x0) * x0_hat + cast(coeff_x) * x
    return x_mean + cast(noise_std) * std_normal_like(x, generator), x_mean


def no_predictor(score, sde, x, step, generator):
    return x, x


PREDICTORS = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral_sampling": ancestral_sampling,
    "none": no_predictor,
}
_DISCRETE_PREDICTORS = ("reverse_diffusion", "ancestral_sampling")


# ----- correctors -------------------------------------------------------------------------
def langevin_step_factor(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """The factor alpha_i of Song et al. 2021, Alg. 4-5, for every SDE: the squared signal
    decay over one chain step, (alpha(t) / alpha(t - T/N))^2. It is ~1 - beta_i for VP and
    sub-VP (Alg. 5) and exactly 1 for VE (Alg. 4). Returns (B,) float64."""
    t = t.to(SCHEDULE_DTYPE)
    alpha, _ = sde.marginal_coeffs(t)
    alpha_before, _ = sde.marginal_coeffs((t - sde.T / sde.N).clamp(min=0.0))
    return (alpha / alpha_before) ** 2


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


def langevin(score, sde: SDE, x, t, *, snr: float, n_steps: int, generator):
    """Langevin corrector with the signal-to-noise step rule (Song et al. 2021, Alg. 4-5):
    eps = 2 alpha_i (snr ||z|| / ||s||)^2;  x <- x + eps s + sqrt(2 eps) z.
    The norms are averaged over the batch, as in the Score SDE code: with per-sample norms a
    sample near a mode centre (score ~ 0) takes a huge step and hops between modes (on the
    2-D mixture test the mode weights are then off by 0.13 in total variation, vs 0.007)."""
    factor = append_dims(langevin_step_factor(sde, t).to(x.dtype), x.ndim)
    x_mean = x
    for _ in range(n_steps):
        grad = score(x, t)
        noise = std_normal_like(x, generator)
        ratio = _per_sample_norm(noise).mean() / _per_sample_norm(grad).mean().clamp(min=1e-30)
        step_size = 2 * factor * (snr * ratio) ** 2
        x_mean = x + step_size * grad
        x = x_mean + torch.sqrt(2 * step_size) * noise
    return x, x_mean


def annealed_langevin(score, sde: SDE, x, t, *, snr: float, n_steps: int, generator):
    """Annealed Langevin dynamics as a corrector (Song et al. 2021, App. G; NCSN's step
    alpha_i proportional to sigma_i^2): eps = 2 alpha_i (snr std(t))^2."""
    _, std = sde.marginal_coeffs(t)
    factor = langevin_step_factor(sde, t)
    step_size = append_dims((2 * factor * (snr * std) ** 2).to(x.dtype), x.ndim)
    x_mean = x
    for _ in range(n_steps):
        x_mean = x + step_size * score(x, t)
        x = x_mean + torch.sqrt(2 * step_size) * std_normal_like(x, generator)
    return x, x_mean


def no_corrector(score, sde, x, t, *, snr, n_steps, generator):
    return x, x


CORRECTORS = {
    "langevin": langevin,
    "ald": annealed_langevin,
    "none": no_corrector,
}


# ----- the sampler ------------------------------------------------------------------------
def _check_pc_arguments(sde: SDE, predictor: str, corrector: str, snr: float, n_steps: int):
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    if predictor == "none" and corrector == "none":
        raise ValueError("predictor and corrector are both 'none': nothing would be sampled")
    if predictor == "ancestral_sampling":
        try:
            sde.discrete_marginal_coeffs(torch.zeros(1, dtype=torch.long))
        except ValueError:
            raise ValueError(f"ancestral_sampling needs a discrete chain with closed-form "
                             f"marginals (VPSDE, VESDE), which {type(sde).__name__} lacks; use "
                             "predictor='reverse_diffusion' or 'euler_maruyama'") from None
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps (corrector steps per time step) must be an integer >= 0, "
                         f"got {n_steps!r}")
    if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a positive number, got {snr!r}")


def pc_sample(score_fn: Callable, sde: SDE, shape, *, predictor: str = "reverse_diffusion",
              corrector: str = "langevin", snr: float = 0.16, n_steps: int = 1,
              denoise: bool = True, eps: float = 1e-3, generator: torch.Generator | None = None,
              device=None, dtype: torch.dtype | None = None, x_init: torch.Tensor | None = None,
              progress: bool = False, callback: Callable | None = None) -> SampleResult:
    """Predictor-corrector sampler (Song et al. 2021, Alg. 1) over the N = sde.N steps.

    Args:
        score_fn: (x (B, ...), t (B,)) -> score like x.
        sde: the forward SDE; sde.N is the number of time steps.
        shape: (B, *data_shape) of the samples.
        predictor: one of PREDICTORS; corrector: one of CORRECTORS.
        snr: the corrector's signal-to-noise ratio r.
        n_steps: corrector steps per time step.
        denoise: return the noiseless mean of the last predictor step (the Score SDE code's
            "noise removal"); else the last noisy state.
        eps: the last (smallest) time of the grid.
        generator: for every random draw (prior and noise); its device is the sampling device.
        x_init: start from this x_T instead of a prior draw.
        progress: show a progress bar. callback: called after each time step with
            dict(step=k, t=t_k (float), x=x, x_mean=x_mean), e.g. to log images.
    Returns:
        SampleResult(x (shape,), nfe = number of score evaluations).
    """
    _check_pc_arguments(sde, predictor, corrector, snr, n_steps)
    x = initial_state(sde, shape, generator=generator, device=device, dtype=dtype, x_init=x_init)
    times = time_grid(sde, sde.N, eps, device=x.device) if sde.N >= 2 else None
    if times is None:
        raise ValueError("pc_sample needs an SDE with N >= 2 steps")
    next_times = torch.cat([times[1:], times.new_zeros(1)])
    levels = torch.arange(sde.N - 1, -1, -1, device=x.device)
    score = CountingScore(score_fn)
    predict, correct = PREDICTORS[predictor], CORRECTORS[corrector]
    guard = NonFiniteGuard(times)
    batch = x.shape[0]
    x_mean = x
    with progress_bar(sde.N, progress, f"PC {predictor}/{corrector}") as bar:
        for k in range(sde.N):
            t = times[k].to(x.dtype).expand(batch)
            x, x_mean = correct(score, sde, x, t, snr=snr, n_steps=n_steps, generator=generator)
            step = Step(t, next_times[k].to(x.dtype).expand(batch), levels[k].expand(batch))
            x, x_mean = predict(score, sde, x, step, generator)
            guard.update(k, x)
            if callback is not None:
                callback(dict(step=k, t=times[k].item(), x=x, x_mean=x_mean))
            bar.update(1)
    return SampleResult(x_mean if denoise else x, score.nfe)
