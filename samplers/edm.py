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

Noise levels: sigma_0 = sigma(T) > ... > sigma_{N-1} = sigma(eps) by ``fast.timesteps``
(default: the rho-schedule of eq. 5, i/(N-1) spacing) and sigma_N = 0. N = num_steps.

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

Schedules are float64 and computed before the loop; the loop has no host synchronisation
(non-finite values are checked every 50 steps by ``common.NonFiniteGuard``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sde_lib import SDE

from .common import (CountingScore, NonFiniteGuard, SampleResult, check_eps, check_int,
                     check_real, initial_state, progress_bar, std_normal_like)
from .fast import _per_sample, timesteps

__all__ = ["edm_sample", "edm_sigmas"]


def edm_sigmas(sde: SDE, num_steps: int, *, spacing: str = "karras", rho: float = 7.0,
               eps: float = 1e-3, device=None) -> torch.Tensor:
    """sigma_0 = sigma(T) > ... > sigma_{N-1} = sigma(eps) > sigma_N = 0, (N + 1,) float64,
    sigma = exp(-log_snr / 2); "karras" spacing is eq. 5 (t_i of the paper). N >= 2."""
    num_steps = check_int("num_steps", num_steps, 2)
    t = timesteps(sde, num_steps - 1, spacing=spacing, eps=eps, rho=rho, device=device)
    sigma = torch.exp(-0.5 * sde.log_snr(t))
    return torch.cat([sigma, sigma.new_zeros(1)])


def edm_sample(score_fn: Callable, sde: SDE, shape, *, num_steps: int = 18,
               spacing: str = "karras", rho: float = 7.0, s_churn: float = 0.0,
               s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
               eps: float = 1e-3, denoise: bool = True,
               generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype | None = None, x_init: torch.Tensor | None = None,
               progress: bool = False, callback: Callable | None = None) -> SampleResult:
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
        eps: the smallest time, sigma_{N-1} = sigma(eps).
        denoise: take the last step to sigma = 0 (= Tweedie at eps; returns data); False:
            return x = alpha(eps) x_ve at t = eps.
        generator, device, dtype, x_init, progress: as in ``pc_sample``; x_init is x_T in the
            SDE's x-space.
        callback: ``callback({"step": i, "t": t_{i+1}, "sigma": sigma_{i+1}, "x": x})`` after
            every step, x in the SDE's x-space at t_{i+1} (data space after the last step).

    Returns: SampleResult(x, nfe), nfe = 2 N - 1 (denoise) or 2 (N - 1).
    """
    num_steps = check_int("num_steps", num_steps, 2)
    eps = check_eps(sde, eps)
    s_churn = check_real("s_churn", s_churn)
    s_noise = check_real("s_noise", s_noise)
    s_tmin = check_real("s_tmin", s_tmin, allow_inf=True)
    s_tmax = check_real("s_tmax", s_tmax, allow_inf=True)
    if s_tmin > s_tmax:
        raise ValueError(f"s_tmin must be <= s_tmax, got {s_tmin} > {s_tmax}")
    x = initial_state(sde, shape, generator=generator, device=device, dtype=dtype, x_init=x_init)
    N = num_steps
    sigmas = edm_sigmas(sde, N, spacing=spacing, rho=rho, eps=eps, device=x.device)

    # ----- float64 schedules, before the loop ----------------------------------------------
    # gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax] else 0   (Alg. 2)
    s = sigmas[:-1]
    in_range = (s >= s_tmin) & (s <= s_tmax)
    gamma = torch.where(in_range, torch.full_like(s, min(s_churn / N, math.sqrt(2.0) - 1.0)),
                        torch.zeros_like(s))
    sigma_hat = s * (1.0 + gamma)                                          # line 5
    noise_scale = s_noise * torch.sqrt((sigma_hat ** 2 - s ** 2).clamp(min=0.0))   # line 6
    churn = s_churn > 0 and s_noise > 0

    def coeffs(sig: torch.Tensor):
        """t, alpha, std at noise levels sigma > 0: t = t_from_log_snr(-2 log sigma)."""
        t = sde.t_from_log_snr(-2.0 * torch.log(sig))
        alpha, std = sde.marginal_coeffs(t)
        return t, alpha, std

    t_hat, a_hat, sd_hat = coeffs(sigma_hat)
    t_next, a_next, sd_next = coeffs(sigmas[1:-1])       # sigma_1 ... sigma_{N-1} (> 0)
    t_0, a_0, _ = coeffs(sigmas[:1])
    counter = CountingScore(score_fn)
    batch = x.shape[0]

    def D(x_ve, t, alpha, std):
        """The denoiser D(x_ve; sigma) = (x + std^2 score(x, t)) / alpha, x = alpha x_ve."""
        x_sde = _per_sample(alpha, x_ve) * x_ve
        score = counter(x_sde, t.expand(batch)).to(x_ve.dtype)
        return (x_sde + _per_sample(std, x_ve) ** 2 * score) / _per_sample(alpha, x_ve)

    x = x / _per_sample(a_0[0], x)                       # x_0 = x_T / alpha(T), ~N(0, sigma_0^2)
    last = N - 1 if denoise else N - 2                   # index of the final step taken
    guard = NonFiniteGuard(sigmas[1:last + 2])
    bar = progress_bar(last + 1, progress, "edm_sample")
    try:
        with torch.no_grad():
            for i in range(last + 1):                                      # line 3
                sig_hat, sig_next = sigma_hat[i], sigmas[i + 1]
                # lines 4-6: eps_i ~ N(0, S_noise^2 I); t_hat = t_i + gamma_i t_i;
                # x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps_i
                if churn:
                    x_hat = x + noise_scale[i] * std_normal_like(x, generator)
                else:
                    x_hat = x
                # line 7: d_i = (x_hat - D(x_hat; t_hat)) / t_hat
                d = (x_hat - D(x_hat, t_hat[i], a_hat[i], sd_hat[i])) / sig_hat
                # line 8: x_{i+1} = x_hat + (t_{i+1} - t_hat) d_i   (Euler step)
                x = x_hat + (sig_next - sig_hat) * d
                if i < N - 1:                                              # line 9: t_{i+1} != 0
                    # line 10: d'_i = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}
                    d_prime = (x - D(x, t_next[i], a_next[i], sd_next[i])) / sig_next
                    # line 11: x_{i+1} = x_hat + (t_{i+1} - t_hat) (d_i / 2 + d'_i / 2)
                    x = x_hat + (sig_next - sig_hat) * (0.5 * d + 0.5 * d_prime)
                guard.update(i, x)
                bar.update(1)
                if callback is not None:
                    if i < N - 1:
                        callback({"step": i, "t": t_next[i], "sigma": sig_next,
                                  "x": _per_sample(a_next[i], x) * x})
                    else:
                        callback({"step": i, "t": torch.zeros_like(sig_next), "sigma": sig_next,
                                  "x": x})
        if not denoise:                                  # back to x-space at t = eps
            x = _per_sample(a_next[-1], x) * x
    finally:
        bar.close()
    return SampleResult(x=x, nfe=counter.nfe)
