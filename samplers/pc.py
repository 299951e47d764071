"""Predictor-corrector sampling (Song et al. 2021, Sec. 4.2, Alg. 1-5 of App. G).

A predictor takes one step of a reverse-time solver from grid time t_k to t_{k+1}; a
corrector runs score-based MCMC (Langevin dynamics) at t_k before it. Any predictor can be
paired with any corrector. Every update returns ``(x, x_mean)``: the new state and its
noiseless mean, which the final denoising step returns.

The time grid is that of the Score SDE code: t_k = T - k (T - eps) / (N - 1), k = 0..N-1,
with N = sde.N, and t_N = 0 after the last step. The discrete predictors (reverse
diffusion, ancestral) step from chain level N - 1 - k to the level below, whatever t_k is,
so each of the N levels is visited once. Everything a step needs (times, levels, step
factors, the ancestral coefficients) is computed before the loop (``PCPlan``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sde_lib import SDE, append_dims, check_bool, check_choice, check_int, check_real
from sde_lib.chain import posterior_coefficients

from .harness import Harness, SampleResult, Schedule, check_eps, time_grid

__all__ = ["PREDICTORS", "CORRECTORS", "pc_sample", "check_pc_options", "PCPlan",
           "ancestral_coefficients"]


@dataclass
class PCPlan:
    """The precomputed schedule of a PC run, one entry per step k = 0..N-1: the (B,) times
    t_k and next times t_{k+1} (0 after the last step) on the device, the host points at
    t_{k+1}, the chain levels N - 1 - k ((B,) long), and the host floats dt_k = t_k - t_{k+1},
    the Langevin factor alpha_k and std(t_k); the host points at t_k."""
    times: list
    points: list
    next_times: list
    next_points: list
    levels: list
    dts: list
    langevin_factors: list
    stds: list
    ancestral: list | None = None


def _plan(run: Harness, eps: float) -> PCPlan:
    sde = run.sde
    grid = time_grid(sde, sde.N, eps)
    grid_next = torch.cat([grid[1:], grid.new_zeros(1)])
    times, points = run.points(grid)
    next_times, next_points = run.points(grid_next)
    levels = torch.arange(sde.N - 1, -1, -1, device=run.x.device)
    return PCPlan(times=times, points=points, next_times=next_times, next_points=next_points,
                  levels=[v.expand(run.batch) for v in levels.unbind()],
                  dts=(grid - grid_next).tolist(),
                  langevin_factors=sde.langevin_step_factor(grid).tolist(),
                  stds=[p.std for p in points])


# ----- predictors -------------------------------------------------------------------------
def euler_maruyama(run: Harness, plan: PCPlan, x, k: int):
    """Euler-Maruyama on the reverse SDE (eq. 6): x <- x - [f - g^2 s] dt + g sqrt(dt) z."""
    t, dt = plan.times[k], plan.dts[k]
    drift, diffusion = run.sde.reverse(x, t, run.schedule.score(x, t))
    x_mean = x - drift * dt
    noise = append_dims(diffusion, x.ndim) * dt ** 0.5
    return x_mean + noise * run.noise(x), x_mean


def reverse_diffusion(run: Harness, plan: PCPlan, x, k: int):
    """Reverse diffusion (eq. 47): x_{i-1} = x_i - f_i + G_i^2 s + G_i z, with (f_i, G_i) the
    forward chain of ``sde.discretize`` at level i (DDPM for VP, SMLD for VE, Euler-Maruyama
    for sub-VP)."""
    sde = run.sde
    drift, G = sde.reverse(x, sde.index_time(plan.levels[k]),
                           run.schedule.score(x, plan.times[k]), discrete=True)
    x_mean = x - drift
    return x_mean + append_dims(G, x.ndim) * run.noise(x), x_mean


def ancestral_coefficients(sde: SDE, levels: torch.Tensor):
    """Per level i of the chain: (alpha_i, std_i, c_0, c_x, sqrt(v)) of the posterior
    q(x_{i-1} | x_i, x_0) = N(c_0 x_0 + c_x x_i, v), (n,) float64 each
    (``sde_lib.chain.posterior_coefficients``)."""
    return posterior_coefficients(sde, levels)


def ancestral_sampling(run: Harness, plan: PCPlan, x, k: int):
    """Ancestral sampling: draw x_{i-1} from the chain's posterior q(x_{i-1} | x_i, x0_hat)
    (``ancestral_coefficients``), x0_hat by Tweedie with the chain's alpha_i, std_i. For VE
    this is SMLD's ancestral step (Song et al. 2021, eq. 47); for VP the mean is DDPM's
    (x + beta_i s) / sqrt(1 - beta_i) (Ho et al. 2020, Alg. 2) with variance beta~_i."""
    alpha, std, c_0, c_x, noise_std = plan.ancestral[k]
    x0_hat = Schedule.tweedie(x, run.schedule.score(x, plan.times[k]), alpha, std)
    x_mean = x0_hat * c_0 + x * c_x
    return x_mean + run.noise(x) * noise_std, x_mean


def no_predictor(run, plan, x, k):
    return x, x


PREDICTORS = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral_sampling": ancestral_sampling,
    "none": no_predictor,
}


# ----- correctors -------------------------------------------------------------------------
def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


def langevin(run: Harness, plan: PCPlan, x, k: int, *, snr: float, n_steps: int):
    """Langevin corrector with the signal-to-noise step rule (Song et al. 2021, Alg. 4-5):
    eps = 2 alpha_i (snr ||z|| / ||s||)^2;  x <- x + eps s + sqrt(2 eps) z.
    The norms are averaged over the batch, as in the Score SDE code: with per-sample norms a
    sample near a mode centre (score ~ 0) takes a huge step and hops between modes (on the
    2-D mixture test the mode weights are then off by 0.13 in total variation, vs 0.007)."""
    x_mean = x
    for _ in range(n_steps):
        grad = run.schedule.score(x, plan.times[k])
        noise = run.noise(x)
        ratio = _per_sample_norm(noise).mean() / _per_sample_norm(grad).mean().clamp(min=1e-30)
        step_size = 2 * plan.langevin_factors[k] * (snr * ratio) ** 2
        x_mean = x + step_size * grad
        x = x_mean + torch.sqrt(2 * step_size) * noise
    return x, x_mean


def annealed_langevin(run: Harness, plan: PCPlan, x, k: int, *, snr: float, n_steps: int):
    """Annealed Langevin dynamics as a corrector (Song et al. 2021, App. G; NCSN's step
    alpha_i proportional to sigma_i^2): eps = 2 alpha_i (snr std(t))^2."""
    step_size = 2 * plan.langevin_factors[k] * (snr * plan.stds[k]) ** 2
    x_mean = x
    for _ in range(n_steps):
        x_mean = x + step_size * run.schedule.score(x, plan.times[k])
        x = x_mean + (2 * step_size) ** 0.5 * run.noise(x)
    return x, x_mean


def no_corrector(run, plan, x, k, *, snr, n_steps):
    return x, x


CORRECTORS = {
    "langevin": langevin,
    "ald": annealed_langevin,
    "none": no_corrector,
}


# ----- the sampler ------------------------------------------------------------------------
def check_pc_options(sde: SDE, *, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
                     n_steps=1, denoise=True, eps=1e-3) -> None:
    """ValueError naming the first bad option of ``pc_sample``."""
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    if predictor == "none" and corrector == "none":
        raise ValueError("predictor and corrector are both 'none': nothing would be sampled")
    if predictor == "ancestral_sampling" and not sde.has_discrete_chain:
        raise ValueError(f"predictor='ancestral_sampling' needs a discrete chain with "
                         f"closed-form marginals, which {sde!r} lacks; use predictor="
                         "'reverse_diffusion' or 'euler_maruyama'")
    check_real("snr", snr, strict=True)
    check_int("n_steps (corrector steps per time step)", n_steps, 0)
    check_bool("denoise", denoise)
    check_eps(sde, eps)
    if sde.N < 2:
        raise ValueError(f"pc_sample steps over the SDE's N levels and needs N >= 2; {sde!r}")


def pc_sample(score_fn: Callable, sde: SDE, shape, *, predictor: str = "reverse_diffusion",
              corrector: str = "langevin", snr: float = 0.16, n_steps: int = 1,
              denoise: bool = True, eps: float = 1e-3, **harness_options) -> SampleResult:
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
        harness_options: generator, device, dtype, x_init, progress, callback (``harness``).
    Returns:
        SampleResult(x (shape,), nfe = number of score evaluations).
    """
    check_pc_options(sde, predictor=predictor, corrector=corrector, snr=snr, n_steps=n_steps,
                     denoise=denoise, eps=eps)
    predict, correct = PREDICTORS[predictor], CORRECTORS[corrector]
    with Harness(score_fn, sde, shape, name=f"pc {predictor}/{corrector}", total=sde.N,
                 **harness_options) as run:
        plan = _plan(run, eps)
        if predictor == "ancestral_sampling":
            levels = torch.arange(sde.N - 1, -1, -1)
            plan.ancestral = list(zip(*(v.tolist() for v in ancestral_coefficients(sde, levels))))
        x = x_mean = run.x
        for k in range(sde.N):
            if corrector != "none":
                x, x_mean = correct(run, plan, x, k, snr=snr, n_steps=n_steps)
                x = run.project(x, plan.points[k])
            x, x_mean = predict(run, plan, x, k)
            x = run.step(k, x, plan.next_points[k])
        return run.result(x_mean if denoise else x)
