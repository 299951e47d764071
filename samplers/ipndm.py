"""iPNDM: the improved pseudo numerical method (PNDM, Liu et al. 2022) of Zhang & Chen 2023,
"Fast Sampling of Diffusion Models with Exponential Integrator" (DEIS, ICLR 2023), as in the
``sample_ipndm`` of k-diffusion: Adams-Bashforth multistep steps with fixed coefficients on
the probability-flow ODE in the sigma parameterisation, PNDM's Runge-Kutta warm-up replaced
by lower-order multistep steps, orders 1-4, for every SDE of sde_lib.

The sigma parameterisation (as ``samplers.edm``): sigma = std / alpha, x_ve = x / alpha, and the
ODE is dx_ve / dsigma = eps_hat, the noise prediction -std score(x, t) (= (x_ve - D) / sigma with
D Tweedie's data prediction). Step i from sigma_i to sigma_{i+1} with the noise predictions
eps_i, eps_{i-1}, ... at the previous points and q_i = min(order, i + 1):

    x_ve_{i+1} = x_ve_i + (sigma_{i+1} - sigma_i) sum_j c^(q_i)_j eps_{i-j},
    c^(1) = [1],  c^(2) = [3, -1] / 2,  c^(3) = [23, -16, 5] / 12,  c^(4) = [55, -59, 37, -9] / 24,

the Adams-Bashforth weights of a uniform grid, used as they are on the (non-uniform) noise
levels. Written in the SDE's coordinates, x_{i+1} = (alpha_{i+1} / alpha_i) x_i +
alpha_{i+1} (sigma_{i+1} - sigma_i) sum_j c_j eps_{i-j}: one ``fast.combine`` of the state and
the stored scores per step, with host-float coefficients computed before the loop. Order 1 is
Euler in sigma, which is DDIM with eta = 0.

Accuracy: the fixed weights are those of a uniform grid, so on a grid that is not uniform in
sigma (log-SNR, Karras) one step errs like h^3 whatever the order, and the first-order first
step like h^2: globally orders 2-4 are second order (tests/test_ipndm.py measures 1.9-2.1),
though orders 3-4 have smaller error constants at few steps.

Noise levels: sigma(t_i) on ``fast.timesteps`` (T = t_0 > ... > t_n = t_end, the time of
sigma_min = 0.02 by default, or eps with sigma_min=None); NFE = num_steps (+ 1 for the final
Tweedie step at t_end with ``denoise``, k-diffusion's step to sigma = 0).

Defaults (chosen by measurement, bench/README.md "Few-step race, round two"): order 3, and
``spacing=None`` takes ``default_spacing(sde)``: Karras (rho = 7) steps on an SDE that keeps
the data's scale (VE), log-SNR steps otherwise. The first step is Euler; on a VP-type SDE
sigma(T) ~ 150 is far above the data's scale, so a log-SNR first step (152 -> 17 at 4 steps)
changes little and is nearly exact, while on a VE SDE sigma_max is about the data's diameter
(Song & Ermon 2020, technique 1) and the log-SNR first step (20 -> 3.6) is where Euler errs
most; Karras's (20 -> 6.1) is shorter. On the tuning distributions (bench/endpoints.py,
exact scores, mean FD / floor over 8 seeds) at 5 NFE Karras steps took order 3's VE results
from 1.25 / 3.33 / 6.16 / 4.94 to 1.02 / 2.05 / 2.58 / 4.25 (64-D Gaussian / eight-mode ring
/ thin ring / two-scale mixture), while on VP they would take log-SNR's 2.75 / 4.83 (ring /
thin ring) to 106 / 125. On the trained VE digits model at 5 NFE iPNDM is nevertheless the
worst few-step sampler on either grid (FID 41 against 20 for UniPC); order 3 against 4 on
the default grids: see bench/README.md.
"""
from __future__ import annotations

from typing import Callable

from sde_lib import SDE, check_int

from .fast import SIGMA_MIN, Output, check_grid_options, combine, final_denoise, timesteps
from .harness import Harness, SampleResult

__all__ = ["ipndm_sample", "check_ipndm_options", "ADAMS_BASHFORTH", "default_spacing"]

#: The Adams-Bashforth weights by order, newest output first (iPNDM's c^(q)).
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


def default_spacing(sde: SDE) -> str:
    """iPNDM's step spacing when none is given: "karras" on an SDE that keeps the data's scale
    (alpha = 1, VE: its prior std sigma_max is about the data's diameter), "logsnr" otherwise
    (the module docstring says why)."""
    return "karras" if sde.keeps_data_scale else "logsnr"


def check_ipndm_options(sde: SDE, *, num_steps=20, order=3, spacing=None, eps=1e-3,
                        sigma_min=SIGMA_MIN, schedule=None, denoise=True) -> None:
    """ValueError naming the first bad option of ``ipndm_sample``."""
    spacing = default_spacing(sde) if spacing is None else spacing
    check_grid_options(sde, num_steps, spacing, eps, denoise, sigma_min, schedule)
    check_int("order", order, 1, 4)


def ipndm_sample(score_fn: Callable, sde: SDE, shape, *, num_steps: int = 20, order: int = 3,
                 spacing: str | None = None, eps: float = 1e-3,
                 sigma_min: float | None = SIGMA_MIN, schedule: str | None = None,
                 denoise: bool = True, **harness_options) -> SampleResult:
    """iPNDM (Zhang & Chen 2023): fixed-coefficient Adams-Bashforth in sigma on the noise
    prediction, orders warming up as min(order, i + 1); see the module docstring.

    Args:
        score_fn: ``score_fn(x, t)``, x (B, ...), t a (B,) float64 tensor in [eps, T].
        sde, shape: the forward SDE; (B, *data_shape).
        num_steps: steps from T to eps on ``fast.timesteps`` (one evaluation each).
        order: the Adams-Bashforth order, 1-4 (1: Euler in sigma = DDIM with eta = 0).
        spacing: "logsnr", "uniform" or "karras" (``fast.timesteps``); None:
            ``default_spacing(sde)``. eps: the last time, unless sigma_min is set.
        sigma_min, schedule: the grid's end noise level and a fitted step schedule file (as
            ``fast.ddim_sample``).
        denoise: one more evaluation for the Tweedie step at the grid's end t_end (as ``fast``).
        harness_options: generator, device, dtype, x_init, progress, callback, projection.

    Returns: SampleResult(x (B, ...), nfe), nfe = num_steps (+ 1 if denoise).
    """
    spacing = default_spacing(sde) if spacing is None else spacing
    check_ipndm_options(sde, num_steps=num_steps, order=order, spacing=spacing, eps=eps,
                        sigma_min=sigma_min, schedule=schedule, denoise=denoise)
    with Harness(score_fn, sde, shape, name=f"ipndm (order {order})", total=num_steps,
                 **harness_options) as run:
        times, points = run.points(timesteps(sde, num_steps, spacing=spacing, eps=eps,
                                             sigma_min=sigma_min, schedule=schedule))
        steps = []
        for i in range(num_steps):
            s, t = points[i], points[i + 1]
            scale = t.alpha * (t.sigma - s.sigma)
            weights = ADAMS_BASHFORTH[min(order, i + 1)]
            steps.append((t.alpha / s.alpha, [scale * c for c in weights]))
        x, history = run.x, []                     # eps_hat at t_i, t_{i-1}, ...
        for i, (c_x, coefficients) in enumerate(steps):
            history.insert(0, Output(((-points[i].std, run.schedule.score(x, times[i])),)))
            del history[order:]
            x = combine(x, c_x, coefficients, history)
            x = run.step(i, x, points[i + 1])
        if denoise:
            x = final_denoise(run, x, points[-1].t, num_steps)
        return run.result(x)
