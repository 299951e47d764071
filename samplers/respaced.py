"""Ancestral sampling on a respaced chain (Nichol & Dhariwal 2021, Sec. 4, "Improving
sampling speed"): K of the N levels of an SDE's discrete chain, and the chain between them.

Levels s_0 < ... < s_{K-1} of the N-level chain keep their marginals (alpha_s, std_s) (for
DDPM: alpha_bar'_k = alpha_bar_{s_k}); the respaced step from level s to the level p below
it is x_s = a x_p + b z with a = alpha_s / alpha_p, b^2 = std_s^2 - a^2 std_p^2 (DDPM's
beta'_k = 1 - alpha_bar_{s_k} / alpha_bar_{s_{k-1}}). Each step draws from

    p(x_p | x_s) = N(c0 x0_hat + cx x_s, Sigma),  c0 = alpha_p b^2 / std_s^2,
                   cx = a std_p^2 / std_s^2,         v = std_p^2 b^2 / std_s^2,

the posterior q(x_p | x_s, x0) with x0_hat (Tweedie) in place of x0, and Sigma = v ('small',
beta~), b^2 ('large', beta), v + c0^2 E Var[x0 | x_s] ('analytic', Bao et al. 2022; the
estimate ``posterior_x0_variance`` (N,) of samplers.vlb.expected_posterior_variance), or
exp(u log b^2 + (1 - u) log v) with the network's interpolation u ('learned', Improved DDPM:
the learned range moves to the respaced step's beta' and beta~'; ``score_fn`` returns (score,
u), a learned-variance network's ``score_fn.score_and_variance``). The last step (from s_0
to the data) returns x0_hat, as Improved DDPM's sampler returns the mean. The network sees
level s at the PC grid's time (``level_time='grid'``) or at s T / (N - 1) ('index', for
networks on discrete levels; samplers.vlb.chain_times).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sde_lib import SDE
from sde_lib.utils import check_choice, check_int

from .harness import DATA_POINT, Harness, SampleResult, SchedulePoint, check_eps
from .vlb import LEVEL_TIMES, VARIANCES, chain_times

__all__ = ["respaced_levels", "respaced_sample", "check_respaced_options", "RESPACINGS"]

#: How the K levels are chosen: evenly in level index (Improved DDPM's "space_timesteps" with
#: one section), or evenly in log-SNR (the levels nearest a uniform log-SNR grid).
RESPACINGS = ("uniform", "logsnr")


def respaced_levels(sde: SDE, num_steps: int, spacing: str = "uniform") -> torch.Tensor:
    """K = ``num_steps`` distinct increasing chain levels (K,) long, always holding 0 and
    N - 1."""
    n = sde.N
    if spacing == "uniform":
        levels = torch.round(torch.linspace(0, n - 1, num_steps, dtype=torch.float64)).long()
    else:
        alpha, std = sde.discrete_marginal_coeffs(torch.arange(n))
        lam = torch.log(alpha / std)
        grid = torch.linspace(float(lam[0]), float(lam[-1]), num_steps, dtype=torch.float64)
        levels = (lam[None, :] - grid[:, None]).abs().argmin(dim=1)
    return torch.unique(levels)


def check_respaced_options(sde: SDE, *, num_steps=50, variance="small", spacing="uniform",
                           eps=1e-3, level_time=None, clip_denoised=None,
                           posterior_x0_variance=None) -> None:
    """ValueError naming the first bad option of ``respaced_sample``."""
    if not getattr(sde, "has_discrete_chain", False):
        raise ValueError(f"{type(sde).__name__} has no discrete chain to respace: use another "
                         "sampler (ddim, dpm_solver) or an SDE with a chain (VP / VE)")
    check_int("num_steps", num_steps, 2, sde.N)
    check_choice("variance", variance, VARIANCES)
    check_choice("spacing", spacing, RESPACINGS)
    if level_time is not None:
        check_choice("level_time", level_time, LEVEL_TIMES)
    if clip_denoised is not None and not isinstance(clip_denoised, bool):
        raise ValueError(f"clip_denoised must be True, False or None, got {clip_denoised!r}")
    check_eps(sde, eps)
    if variance == "analytic" and posterior_x0_variance is not None:
        if len(posterior_x0_variance) != sde.N:
            raise ValueError(f"posterior_x0_variance has {len(posterior_x0_variance)} entries; "
                             f"the chain has N = {sde.N} levels")


def _step_coefficients(sde, levels, variance, posterior_x0_variance):
    """Per respaced step k (from levels[k] to levels[k-1], k = K-1..1): (alpha_s, std_s, c0,
    cx, sqrt(Sigma) or, for 'learned', (log b^2, log v)) host floats."""
    alpha, std = sde.discrete_marginal_coeffs(levels)
    steps = {}
    for k in range(len(levels) - 1, 0, -1):
        a_s, s_s, a_p, s_p = (float(v) for v in (alpha[k], std[k], alpha[k - 1], std[k - 1]))
        a = a_s / a_p
        b2 = s_s ** 2 - a ** 2 * s_p ** 2
        c0, cx, v = a_p * b2 / s_s ** 2, a * s_p ** 2 / s_s ** 2, s_p ** 2 * b2 / s_s ** 2
        if variance == "small":
            sigma2 = v
        elif variance == "large":
            sigma2 = b2
        elif variance == "learned":
            steps[k] = (a_s, s_s, c0, cx, (math.log(b2), math.log(v)))
            continue
        else:
            sigma2 = v + c0 ** 2 * float(posterior_x0_variance[int(levels[k])])
        steps[k] = (a_s, s_s, c0, cx, math.sqrt(sigma2))
    return steps, float(alpha[0]), float(std[0])


def respaced_sample(score_fn: Callable, sde: SDE, shape,
                    posterior_x0_variance: torch.Tensor | None = None, *, num_steps: int = 50,
                    variance: str = "small", spacing: str = "uniform", eps: float = 1e-3,
                    level_time: str | None = None, clip_denoised: bool | None = None,
                    **harness_options) -> SampleResult:
    """Ancestral sampling on ``num_steps`` levels of the chain (module docstring): K - 1
    ancestral steps from x_{N-1} ~ prior, then x0_hat at level s_0; K network evaluations.

    Args:
        score_fn, sde, shape: as every sampler; the SDE must have a discrete chain.
        posterior_x0_variance: (N,) E Var[x0 | x_i] for variance='analytic' (not a registry
            option: run_lib or the caller estimates it, samplers.vlb.expected_posterior_variance).
        num_steps: K levels (2..N). variance: 'small' | 'large' | 'analytic' | 'learned'
            ('learned': score_fn(x, t) returns (score, u); module docstring).
        spacing: 'uniform' in level index (Improved DDPM) or 'logsnr'.
        eps, level_time: the network's time of each level (samplers.vlb.chain_times; None:
            'grid'; run_lib.compose picks 'index' for networks on discrete levels).
        clip_denoised: clip x0_hat to [-1, 1] in every step (Improved DDPM's sampler for
            images in [-1, 1]; at the first levels of the cosine chain alpha ~ 1e-2 and
            x0_hat = (x - std eps_hat) / alpha amplifies the network's error). None: no clip
            (run_lib.compose clips for centred image data).
        harness_options: generator, device, dtype, x_init, progress, callback, projection.

    Returns: SampleResult(x, nfe = K).
    """
    check_respaced_options(sde, num_steps=num_steps, variance=variance, spacing=spacing,
                           eps=eps, level_time=level_time, clip_denoised=clip_denoised,
                           posterior_x0_variance=posterior_x0_variance)
    if variance == "analytic" and posterior_x0_variance is None:
        raise ValueError("variance='analytic' needs posterior_x0_variance (N,) from "
                         "samplers.vlb.expected_posterior_variance (main.py estimates it on "
                         "config.eval.vlb_analytic_samples training images)")
    levels = respaced_levels(sde, num_steps, spacing)
    times = chain_times(sde, eps, level_time or "grid")[levels]
    steps, alpha_0, std_0 = _step_coefficients(sde, levels, variance, posterior_x0_variance)
    alphas, stds = (v.tolist() for v in sde.discrete_marginal_coeffs(levels))
    with Harness(score_fn, sde, shape, name="respaced", total=len(levels), **harness_options) as run:
        x = run.x
        batch_times = run.batch_times(times)
        for k in range(len(levels) - 1, 0, -1):
            a_s, s_s, c0, cx, noise_std = steps[k]
            score, noise_std = _score_and_noise_std(run, x, batch_times[k], noise_std)
            x0_hat = (x + score * s_s ** 2) / a_s              # Tweedie at level s_k
            if clip_denoised:
                x0_hat = x0_hat.clamp(-1.0, 1.0)
            x = x0_hat * c0 + x * cx + run.noise(x) * noise_std
            a_p, s_p = alphas[k - 1], stds[k - 1]
            point = SchedulePoint(float(times[k - 1]), a_p, s_p, math.log(a_p / s_p))
            x = run.step(len(levels) - 1 - k, x, point, denoised=x0_hat)
        score, _ = _score_and_noise_std(run, x, batch_times[0], 0.0)
        x = (x + score * std_0 ** 2) / alpha_0
        if clip_denoised:
            x = x.clamp(-1.0, 1.0)
        x = run.step(len(levels) - 1, x, DATA_POINT, denoised=x)
        return run.result(x)


def _score_and_noise_std(run: Harness, x: torch.Tensor, t: torch.Tensor, noise_std):
    """(score, the step's noise std): a float, or for 'learned' (log b^2, log v) and the
    network's u: exp((u log b^2 + (1 - u) log v) / 2) per element."""
    output = run.counter(x, t)
    if not isinstance(noise_std, tuple):
        return (output[0] if isinstance(output, tuple) else output).to(x.dtype), noise_std
    if not isinstance(output, tuple):
        raise ValueError("variance='learned' needs score_fn(x, t) -> (score, u): pass a "
                         "learned-variance network's score_fn.score_and_variance "
                         "(config.model.learn_sigma)")
    score, u = output
    log_large, log_small = noise_std
    return score.to(x.dtype), torch.exp(0.5 * (u.to(x.dtype) * (log_large - log_small) + log_small))
