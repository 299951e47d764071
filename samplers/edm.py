"""EDM sampler: Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (NeurIPS 2022), Algorithm 2 (Heun's second-order method
with optional stochastic "churn"), for every linear SDE of sde_lib.

The sigma parameterisation. Every kernel x_t = alpha_t x_0 + std_t z becomes the paper's
sigma(t) = t, s(t) = 1 form (its eq. 1 / Table 1) after dividing by alpha:

    sigma = std / alpha = exp(-log_snr / 2),      x_ve = x / alpha,

so x_ve = x_0 + sigma z, and the paper's denoiser is Tweedie's formula (its eq. 3),

    D(x_ve; sigma) = (x + std^2 score(x, t)) / alpha,   x = alpha x_ve,
    t = sde.t_from_log_snr(-2 log sigma),

whence grad log p(x_ve; sigma) = (D - x_ve) / sigma^2 and the probability-flow ODE is
dx_ve / dsigma = (x_ve - D(x_ve; sigma)) / sigma (eq. 1 with sigma(t) = t, s(t) = 1; the "d_i"
of Algorithm 2). This holds for VP, sub-VP and VE alike (VE: alpha = 1, sigma = std).

Noise levels: sigma_0 = sigma(T) > ... > sigma_{N-1} = sigma(t_end) by ``fast.timesteps``
(default: the rho-schedule of eq. 5, i/(N-1) spacing) and sigma_N = 0. N = num_steps. End
point: sigma_{N-1} = sigma_min (default ``fast.SIGMA_MIN`` = 0.02 on every SDE), or with
sigma_min=None sigma(eps); below, "eps" stands for that t_end.

The last step, from sigma_{N-1} = sigma(eps) to sigma_N = 0, is Algorithm 2's Euler step (no
correction since t_{i+1} = 0): x_N = x_hat + (0 - sigma_hat) (x_hat - D)/sigma_hat = D(x_hat;
sigma_hat), i.e. exactly the final Tweedie denoising step at eps of the other samplers
(``denoise=True``; with churn off, sigma_hat = sigma(eps)). So both options the design leaves
open coincide; the output is then the data prediction (x-space at t = 0, where alpha = 1).
With ``denoise=False`` the last step is skipped and the state at sigma(eps) is returned in
the SDE's x-space at t = eps, x = alpha(eps) x_ve (as the fast samplers with denoise=False).

NFE: 2 per Heun step, 1 for the last (Euler) step: 2 N - 1 with denoise (35 for the paper's
N = 18), 2 (N - 1) without.

Churn (eq. 7 and Alg. 2 lines 4-6): gamma_i = min(s_churn / N, sqrt(2) - 1) when
s_tmin <= sigma_i <= s_tmax, else 0; sigma_hat = sigma_i (1 + gamma_i);
x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) s_noise z. A churned sigma_hat above sigma(T) maps
to a time beyond T through ``t_from_log_snr`` (the schedules' closed forms extrapolate); use
s_tmax < sigma(T) to avoid that.

In this form the paper's d_i = (x_hat - D(x_hat; sigma_hat)) / sigma_hat is the noise
prediction -std score at (alpha x_hat, t_hat), which ``harness.Schedule.noise`` gives.
Schedules are float64 host floats computed before the loop (``harness``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sde_lib import SDE, check_int, check_real

from .fast import SIGMA_MIN, check_grid_options, timesteps
from .harness import DATA_POINT, Harness, SampleResult

__all__ = ["edm_sample", "edm_sigmas", "check_edm_options"]

def edm_sigmas(sde: SDE, num_steps: int, *, spacing: str = "karras", rho: float = 7.0,
               eps: float = 1e-3, sigma_min: float | None = SIGMA_MIN,
               schedule: str | None = None, device=None) -> torch.Tensor:
    """sigma_0 = sigma(T) > ... > sigma_{N-1} = sigma(t_end) > sigma_N = 0, (N + 1,) float64,
    sigma = exp(-log_snr / 2); "karras" spacing is eq. 5 (t_i of the paper); t_end = eps or
    the time of ``sigma_min``; a ``schedule`` file gives its entry for N - 1 intervals. N >= 2."""
    num_steps = check_int("num_steps", num_steps, 2)
    t = timesteps(sde, num_steps - 1, spacing=spacing, eps=eps, rho=rho, sigma_min=sigma_min,
                  schedule=schedule, device=device)
    sigma = torch.exp(-0.5 * sde.log_snr(t))
    return torch.cat([sigma, sigma.new_zeros(1)])


def check_edm_options(sde: SDE, *, num_steps=18, spacing="karras", rho=7.0, s_churn=0.0,
                      s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, eps=1e-3, sigma_min=SIGMA_MIN,
                      schedule=None, denoise=True) -> None:
    """ValueError naming the first bad option of ``edm_sample``."""
    check_int("num_steps", num_steps, 2)
    check_grid_options(sde, num_steps, spacing, eps, denoise, sigma_min, schedule,
                       intervals=num_steps - 1)
    check_real("rho", rho, strict=True)
    check_real("s_churn", s_churn)
    check_real("s_tmin", s_tmin, allow_inf=True)
    check_real("s_tmax", s_tmax, allow_inf=True)
    if s_tmin > s_tmax:
        raise ValueError(f"s_tmin must be <= s_tmax, got {s_tmin} > {s_tmax}")
    check_real("s_noise", s_noise)


def edm_sample(score_fn: Callable, sde: SDE, shape, *, num_steps: int = 18,
               spacing: str = "karras", rho: float = 7.0, s_churn: float = 0.0,
               s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
               eps: float = 1e-3, sigma_min: float | None = SIGMA_MIN,
               schedule: str | None = None, denoise: bool = True,
               **harness_options) -> SampleResult:
    """EDM Algorithm 2 (Karras et al. 2022): Heun steps in sigma, optional churn.

    Args:
        score_fn: ``score_fn(x, t)``, t a (B,) float64 tensor (x in the SDE's x-space).
        sde, shape: the forward SDE; (B, *data_shape).
        num_steps: N >= 2 noise levels sigma(T) ... sigma(eps) before sigma_N = 0 (N - 1 Heun
            steps, then the last step; see the module docstring).
        spacing, rho: the sigma schedule ("karras": eq. 5 with rho; "logsnr", "uniform").
        s_churn, s_tmin, s_tmax, s_noise: the stochasticity of eq. 7 / Alg. 2 (s_churn = 0:
            deterministic Heun; the others only act when s_churn > 0). s_tmin/s_tmax are
            sigmas (sigma = std/alpha), not times.
        eps: the smallest time, sigma_{N-1} = sigma(eps), unless sigma_min is set.
        sigma_min: sigma_{N-1} = sigma_min (the grid ends at t_end where std / alpha =
            sigma_min); None: at eps.
        schedule: a fitted step schedule file (``samplers.schedules_opt``; its entry for N - 1
            intervals), replacing spacing.
        denoise: take the last step to sigma = 0 (= Tweedie at t_end; returns data); False:
            return x = alpha(t_end) x_ve at t = t_end.
        harness_options: generator, device, dtype, x_init (x_T in the SDE's x-space),
            progress, callback (x in the SDE's x-space; data space after the last step).

    Returns: SampleResult(x, nfe), nfe = 2 N - 1 (denoise) or 2 (N - 1).
    """
    check_edm_options(sde, num_steps=num_steps, spacing=spacing, rho=rho, s_churn=s_churn,
                      s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, eps=eps,
                      sigma_min=sigma_min, schedule=schedule, denoise=denoise)
    last = num_steps - 1 if denoise else num_steps - 2          # index of the final step
    with Harness(score_fn, sde, shape, name="edm", total=last + 1, **harness_options) as run:
        sigmas = edm_sigmas(sde, num_steps, spacing=spacing, rho=rho, eps=eps,
                            sigma_min=sigma_min, schedule=schedule)
        churn = _churn(sigmas[:-1], num_steps, s_churn, s_tmin, s_tmax, s_noise)
        t_hat, hat = run.points(run.schedule.t_from_sigma(churn[0]))       # line 5
        t_next, nxt = run.points(run.schedule.t_from_sigma(sigmas[1:-1]))  # sigma_1..sigma_{N-1}
        nxt.append(DATA_POINT)
        noise_scale = churn[1].tolist()
        x = run.x / run.points(run.schedule.t_from_sigma(sigmas[:1]))[1][0].alpha   # x_ve at sigma_0
        for i in range(last + 1):                                          # line 3
            # lines 4-6: x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) eps_i, eps_i ~ N(0, S_noise^2)
            x_hat = x.add(run.noise(x), alpha=noise_scale[i]) if noise_scale[i] > 0 else x
            # line 7: d_i = (x_hat - D(x_hat; sigma_hat)) / sigma_hat = -std score (eps_hat)
            # line 8: x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d_i   (Euler step)
            step = nxt[i].sigma - hat[i].sigma
            score = _score_ve(run, x_hat, t_hat[i], hat[i])
            x = x_hat.add(score, alpha=-step * hat[i].std)
            if i < num_steps - 1:                                          # line 9: sigma_{i+1} > 0
                # lines 10-11: d'_i at x_{i+1}; x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat)(d + d')/2
                score_next = _score_ve(run, x, t_next[i], nxt[i])
                x = x_hat.add(score, alpha=-0.5 * step * hat[i].std).add_(
                    score_next, alpha=-0.5 * step * nxt[i].std)
            x = run.step(i, x, nxt[i], scale=nxt[i].alpha)
        return run.result(x if nxt[last].alpha == 1.0 else x * nxt[last].alpha)


def _score_ve(run: Harness, x_ve: torch.Tensor, t: torch.Tensor, point) -> torch.Tensor:
    """The score at x = alpha x_ve (the SDE's coordinates) and time t."""
    return run.schedule.score(x_ve if point.alpha == 1.0 else x_ve * point.alpha, t)


def _churn(sigmas: torch.Tensor, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_hat, noise scale) of each step: gamma_i = min(S_churn / N, sqrt(2) - 1) if
    sigma_i in [S_tmin, S_tmax] else 0 (Alg. 2 line 5); sigma_hat = sigma_i (1 + gamma_i);
    scale = S_noise sqrt(sigma_hat^2 - sigma_i^2) (line 6), 0 without churn."""
    in_range = (sigmas >= s_tmin) & (sigmas <= s_tmax)
    gamma = in_range.to(sigmas.dtype) * min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
    sigma_hat = sigmas * (1.0 + gamma)
    scale = s_noise * torch.sqrt((sigma_hat ** 2 - sigmas ** 2).clamp(min=0.0))
    return sigma_hat, scale if (s_churn > 0 and s_noise > 0) else torch.zeros_like(scale)
