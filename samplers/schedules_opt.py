"""Optimized step schedules: fitted noise levels for few-step samplers, stored as files.

A fixed formula (log-SNR, Karras) spends the steps of a few-step sampler without looking at
the data. Following GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based
Diffusion Sampling": dynamic programming over a fine grid on a local truncation error
measured on data) and Align Your Steps (Sabour et al. 2024: a schedule fitted per model and
solver, stored as a list of sigmas), ``fit_schedule`` places the steps for a proxy of the
data: a ``sde_lib.GaussianMixture`` (a Gaussian with the data's mean and covariance, or a
fitted mixture), whose exact score and exact probability-flow trajectories stand in for the
model. Two stages, both deterministic (seeded draws, no randomness in the search):

1. Dynamic programming (GITS). A fine grid of ``fine`` points, uniform in log-SNR, from
   sigma(T) to the end point; the proxy's probability-flow trajectories from seeded x_T at
   every fine point (a third-order single-step DPM-Solver with ``substeps`` steps per fine
   interval); the cost of a first-order (DDIM) step from fine point i to j > i is the RMS
   distance between the step from the true x_i and the true x_j (one score evaluation per i,
   all j at once); the n-step path 0 -> fine of least total cost, by dynamic programming.
2. Refinement for the solver (the AYS idea of fitting per solver, with the global error as
   the objective): coordinate descent on the interior points' log-SNR fractions minimizing
   the RMS distance between the solver's end point (``denoise=False``) and the true
   trajectory's, from the same x_T. The pathwise RMS error bounds the Wasserstein-2 distance
   between the sampled and the true marginal at the end point, which is the quantity a
   schedule should make small.

The file (JSON; ``save_schedule`` / ``load_schedule``) holds, per number of grid intervals,
the noise levels sigma_0 = sigma(T) > ... > sigma_n (sigma = std / alpha) and the NFE, plus
the solver and its options, the SDE, the proxy's description, the method and a format
version. Samplers take it as ``schedule=<path>`` (``fast.timesteps``): the levels move in
log sigma from the fitted range onto the sampler's [sigma(t_end), sigma(T)] (exact when
they agree), so a file fitted on one SDE still gives a valid grid on another.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from sde_lib import SCHEDULE_DTYPE, SDE, check_int

__all__ = ["SCHEDULE_FORMAT", "SCHEDULE_VERSION", "load_schedule", "save_schedule",
           "schedule_fractions", "check_schedule", "fit_schedule", "dp_schedule",
           "reference_trajectory", "grid_intervals", "proxy_description"]

SCHEDULE_FORMAT = "scorediff-step-schedule"
SCHEDULE_VERSION = 1


# ----- the file ------------------------------------------------------------------------------
def load_schedule(path) -> dict:
    """The schedule file at ``path`` as a dict, or a one-line ValueError naming ``schedule``."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"schedule must be the path of a step schedule file or None, got {path!r}")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"schedule {str(path)!r} could not be read as a step schedule file "
                         f"({type(error).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"schedule {str(path)!r} is not a {SCHEDULE_FORMAT} file")
    if data.get("version") != SCHEDULE_VERSION:
        raise ValueError(f"schedule {str(path)!r} has version {data.get('version')!r}; this "
                         f"code reads version {SCHEDULE_VERSION}")
    return data


def save_schedule(path, *, solver: str, solver_options: dict, sde: str, proxy: dict,
                  method: dict, entries: dict) -> None:
    """Write a schedule file; ``entries``: {intervals: {"sigmas": [...], "nfe": int, ...}}."""
    data = {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION, "solver": solver,
            "solver_options": solver_options, "sde": sde, "proxy": proxy, "method": method,
            "schedules": {str(k): v for k, v in sorted(entries.items())}}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def _fractions(sigmas) -> list[float]:
    """u_i = log(sigma_i / sigma_0) / log(sigma_n / sigma_0): the log-SNR fractions, 0 .. 1."""
    logs = [math.log(s) for s in sigmas]
    return [(v - logs[0]) / (logs[-1] - logs[0]) for v in logs]


def schedule_fractions(path, num_steps: int) -> list[float]:
    """The fractions 0 = u_0 < ... < u_n = 1 of the fitted schedule for ``num_steps``
    intervals along log sigma (= along log-SNR) between its ends; ValueError naming
    ``schedule`` when the file has no such entry or its levels do not decrease."""
    data = load_schedule(path)
    entry = data.get("schedules", {}).get(str(num_steps))
    if entry is None:
        have = ", ".join(sorted(data.get("schedules", {}), key=int)) or "none"
        raise ValueError(f"schedule {str(path)!r} has no entry for {num_steps} grid intervals "
                         f"(it has: {have}); fit one with bench/fit_schedule.py")
    sigmas = entry.get("sigmas") if isinstance(entry, dict) else None
    if (not isinstance(sigmas, list) or len(sigmas) != num_steps + 1
            or not all(isinstance(s, (int, float)) and s > 0 for s in sigmas)
            or any(b >= a for a, b in zip(sigmas, sigmas[1:]))):
        raise ValueError(f"schedule {str(path)!r}: the entry for {num_steps} intervals must be "
                         f"{num_steps + 1} decreasing positive sigmas")
    return _fractions(sigmas)


def check_schedule(schedule, num_steps: int) -> None:
    """None, or a ValueError naming ``schedule`` (before any evaluation)."""
    if schedule is not None:
        schedule_fractions(schedule, num_steps)


def grid_intervals(solver: str, nfe: int) -> int:
    """The grid intervals of ``solver`` at ``nfe`` score evaluations with its final denoising
    step (ddim, dpm_solver multistep, unipc, ipndm: nfe - 1; edm: N - 1 with 2 N - 1 <= nfe)."""
    nfe = check_int("nfe", nfe, 3)
    if solver == "edm":
        return (nfe + 1) // 2 - 1
    return nfe - 1


def proxy_description(proxy) -> dict:
    """A JSON description of a GaussianMixture proxy: components, dimension, and the moments
    (mean norm, eigenvalue range of the covariance), enough to tell proxies apart."""
    cov = proxy.covariance().reshape(proxy.dim, proxy.dim)
    eig = torch.linalg.eigvalsh(cov)
    return {"components": int(proxy.weights.numel()), "dim": int(proxy.dim),
            "mean_norm": float(proxy.mean().norm()), "std_min": float(eig.min().clamp(min=0).sqrt()),
            "std_max": float(eig.max().sqrt())}


# ----- fitting -------------------------------------------------------------------------------
def reference_trajectory(proxy, sde: SDE, *, fine: int, substeps: int, n_samples: int,
                         seed: int, eps: float, sigma_min: float | None):
    """(times (fine + 1,), states (fine + 1, B, D)) of the proxy's probability-flow ODE on
    the fine log-SNR grid from seeded x_T ~ prior: DPM-Solver-3 (single-step, exact score)
    with ``substeps`` steps per fine interval, states read by the callback."""
    from .fast import dpm_solver_sample, timesteps
    times = timesteps(sde, fine, spacing="logsnr", eps=eps, sigma_min=sigma_min)
    states = []
    result = dpm_solver_sample(
        proxy.score_fn(sde), sde, (n_samples, proxy.dim), num_steps=fine * substeps, order=3,
        multistep=False, spacing="logsnr", eps=eps, sigma_min=sigma_min, denoise=False,
        dtype=SCHEDULE_DTYPE, generator=torch.Generator().manual_seed(seed),
        callback=lambda p: states.append(p["x"]) if (p["step"] + 1) % substeps == 0 else None)
    x_T = sde.prior_sampling((n_samples, proxy.dim), generator=torch.Generator().manual_seed(seed),
                             dtype=SCHEDULE_DTYPE)
    assert torch.equal(states[-1], result.x)
    return times, torch.stack([x_T] + states)


def dp_schedule(proxy, sde: SDE, times: torch.Tensor, states: torch.Tensor,
                num_steps: int) -> tuple[list[int], float]:
    """GITS's dynamic programming: the indices 0 = k_0 < ... < k_n = fine of the fine grid
    minimizing the summed RMS error of first-order (DDIM) steps from the true states, and that
    cost. cost[i, j] = RMS(DDIM(x_i; t_i -> t_j) - x_j), one score evaluation per i."""
    fine = len(times) - 1
    alpha, std = sde.marginal_coeffs(times)
    score_fn = proxy.score_fn(sde)
    cost = torch.full((fine + 1, fine + 1), math.inf, dtype=SCHEDULE_DTYPE)
    for i in range(fine):
        x = states[i]
        eps_hat = -std[i] * score_fn(x, times[i].expand(x.shape[0]))            # noise prediction
        x0 = (x - std[i] * eps_hat) / alpha[i]
        j = torch.arange(i + 1, fine + 1)
        # DDIM eta = 0 (Song et al. 2021, eq. 12): x_j = alpha_j x0_hat + std_j eps_hat
        pred = alpha[j, None, None] * x0 + std[j, None, None] * eps_hat
        cost[i, j] = (pred - states[j]).pow(2).mean(dim=(1, 2)).sqrt()
    best = torch.full((num_steps + 1, fine + 1), math.inf, dtype=SCHEDULE_DTYPE)
    parent = torch.zeros((num_steps + 1, fine + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for m in range(1, num_steps + 1):
        total = best[m - 1][:, None] + cost                                     # (from, to)
        best[m], parent[m] = total.min(dim=0)
    path = [fine]
    for m in range(num_steps, 0, -1):
        path.append(int(parent[m, path[-1]]))
    return path[::-1], float(best[num_steps, fine])


def _write_fractions(path: str, fractions, num_steps: int, sigma_hi: float, sigma_lo: float):
    sigmas = [math.exp(math.log(sigma_hi) + u * (math.log(sigma_lo) - math.log(sigma_hi)))
              for u in fractions]
    save_schedule(path, solver="", solver_options={}, sde="", proxy={}, method={},
                  entries={num_steps: {"sigmas": sigmas}})
    return sigmas


def fit_schedule(proxy, sde: SDE, solver: str, num_steps: int, *,
                 solver_options: dict | None = None, eps: float = 1e-3,
                 sigma_min: float | None = None, n_samples: int = 512, fine: int = 64,
                 substeps: int = 4, sweeps: int = 4, seed: int = 0) -> dict:
    """Fit the noise levels of ``solver`` (a registry name) for ``num_steps`` grid intervals
    on the proxy (a GaussianMixture); see the module docstring.

    Returns {"sigmas": [sigma_0 .. sigma_n], "fractions": [...], "error": the solver's RMS
    error on the proxy with the fitted grid, "error_logsnr": with the log-SNR grid,
    "error_dp": with the dynamic-programming grid before refinement}.
    """
    from . import SAMPLERS
    from .harness import Schedule, end_time
    num_steps = check_int("num_steps", num_steps, 1)
    options = {k: v for k, v in (solver_options or {}).items()}
    sampler = SAMPLERS[solver]
    t_end = end_time(sde, eps, sigma_min)
    view = Schedule(sde)
    sigma_hi, sigma_lo = (float(view.at(torch.tensor(t, dtype=SCHEDULE_DTYPE)).sigma)
                          for t in (float(sde.T), t_end))
    times, states = reference_trajectory(proxy, sde, fine=fine, substeps=substeps,
                                         n_samples=n_samples, seed=seed, eps=eps,
                                         sigma_min=sigma_min)
    target, x_T = states[-1], states[0]
    score_fn = proxy.score_fn(sde)
    run_steps = num_steps + 1 if solver == "edm" else num_steps

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trial.json")

        def error(fractions) -> float:
            _write_fractions(path, fractions, num_steps, sigma_hi, sigma_lo)
            x = sampler(score_fn, sde, x_T.shape, num_steps=run_steps, eps=eps,
                        sigma_min=sigma_min, schedule=path, denoise=False, x_init=x_T,
                        **options).x
            value = (x - target).pow(2).mean().sqrt().item()
            return value if math.isfinite(value) else math.inf

        logsnr = [i / num_steps for i in range(num_steps + 1)]
        path_dp, _ = dp_schedule(proxy, sde, times, states, num_steps)
        dp = [k / fine for k in path_dp]
        start = min((error(u), u) for u in (dp, logsnr))
        fitted, best = list(start[1]), start[0]
        error_logsnr, error_dp = error(logsnr), error(dp)
        delta = 0.5 / num_steps
        for _ in range(sweeps):
            for k in range(1, num_steps):
                for sign in (-1.0, 1.0):
                    trial = list(fitted)
                    lo, hi = trial[k - 1], trial[k + 1]
                    trial[k] = min(max(trial[k] + sign * delta * (hi - lo), lo + 0.02 * (hi - lo)),
                                   hi - 0.02 * (hi - lo))
                    value = error(trial)
                    if value < best:
                        fitted, best = trial, value
                        break
            delta *= 0.5
    sigmas = [math.exp(math.log(sigma_hi) + u * (math.log(sigma_lo) - math.log(sigma_hi)))
              for u in fitted]
    return {"sigmas": sigmas, "fractions": fitted, "error": best, "error_logsnr": error_logsnr,
            "error_dp": error_dp}
