"""Adaptive-step DPM-Solver (Lu et al. 2022, "DPM-Solver", Sec. 5 / App. C, Algorithm 4):
DPM-Solver-12 (order 2) and DPM-Solver-23 (order 3), with data prediction (DPM-Solver++
updates, the default) or noise prediction, for every SDE of sde_lib (through ``fast``'s
``harness.Schedule``'s alpha, std and half log-SNR lambda = log(alpha / std) = sde.log_snr / 2,
and ``fast``'s DPM-Solver updates).

Each step from s to t = t_lambda(lambda_s + h) computes a lower- and a higher-order estimate
that share score evaluations:

    order 2: x_low = DPM-Solver-1(x, s, t), x_high = DPM-Solver-2(x, s, t; r1 = 1/2)
             (2 evaluations: at s and at lambda_s + h/2);
    order 3: x_low = DPM-Solver-2(x, s, t; r1 = 1/3), x_high = DPM-Solver-3(x, s, t;
             r1 = 1/3, r2 = 2/3) (3 evaluations: at s, lambda_s + h/3, lambda_s + 2h/3),

the error estimate (App. C)

    delta = max(atol, rtol * max(|x_low|, |x_prev|))          (elementwise)
    E = max over the batch of RMS over dims of (x_high - x_low) / delta,

accepts the step if E <= 1 (x <- x_high, x_prev <- x_low, s <- t) and always updates
h <- min(theta h E^(-1/order), lambda_eps - lambda_s). It stops when |s - eps| <= t_err; the
step that reaches lambda_eps lands on eps exactly. Here "eps" is the end point t_end: eps,
or with ``sigma_min`` the time at which sigma = std / alpha = sigma_min (the default None
keeps t = eps, since the step control already places the steps); then the Tweedie step. Rejected steps cost evaluations too (nfe
counts all of them; the evaluation at s is reused after a rejection). As in the official
implementation, E is the batch maximum, so the whole batch shares one step size.

Host synchronisation: exactly one per step (E.item(), which the accept/reject decision and
the next h need on the host; unavoidable for step-size control). Schedule points are host
floats computed on the CPU, so nothing else syncs. Non-finite E raises FloatingPointError.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sde_lib import SCHEDULE_DTYPE, SDE, check_bool, check_choice, check_int, check_real

from .fast import (DPM_ALGORITHMS, ExponentialStep, combine, final_denoise, model_output,
                   singlestep_2, singlestep_3)
from .harness import Harness, SampleResult, check_eps, check_sigma_min, end_time

__all__ = ["dpm_solver_adaptive_sample", "check_dpm_adaptive_options"]


def check_dpm_adaptive_options(sde: SDE, *, order=2, algorithm="dpmsolver++", rtol=0.05,
                               atol=0.0078, h_init=0.05, theta=0.9, t_err=1e-5, eps=1e-3,
                               sigma_min=None, denoise=True, max_steps=10000) -> None:
    """ValueError naming the first bad option of ``dpm_solver_adaptive_sample``."""
    check_int("order", order, 2, 3)
    check_choice("algorithm", algorithm, DPM_ALGORITHMS)
    check_real("rtol", rtol, strict=True)
    check_real("atol", atol)
    check_real("h_init", h_init, strict=True)
    check_real("theta", theta, strict=True, maximum=1.0)
    check_real("t_err", t_err, strict=True)
    check_eps(sde, eps)
    if sigma_min is not None:
        check_sigma_min(sde, sigma_min)
    check_bool("denoise", denoise)
    check_int("max_steps", max_steps)


def dpm_solver_adaptive_sample(score_fn: Callable, sde: SDE, shape, *, order: int = 2,
                               algorithm: str = "dpmsolver++", rtol: float = 0.05,
                               atol: float = 0.0078, h_init: float = 0.05, theta: float = 0.9,
                               t_err: float = 1e-5, eps: float = 1e-3,
                               sigma_min: float | None = None, denoise: bool = True,
                               max_steps: int = 10000, **harness_options) -> SampleResult:
    """Adaptive-step DPM-Solver-12 (order=2) / DPM-Solver-23 (order=3); see the module
    docstring for the step control.

    Args:
        order: 2 (DPM-Solver-12) or 3 (DPM-Solver-23).
        algorithm: "dpmsolver++" (data prediction) or "dpmsolver" (noise prediction).
        rtol, atol: relative and absolute tolerances of E (defaults: the paper's for images in
            [-1, 1]; atol = 0.0078 ~ 1/128). rtol > 0, atol >= 0.
        h_init: the first step in half log-SNR lambda; theta: safety factor in (0, 1].
        t_err: stop when |s - eps| <= t_err. max_steps: attempted steps (accepted or
            rejected) before a RuntimeError.
        eps, sigma_min, denoise, harness_options: as in ``dpm_solver_sample``: the steps end
            at t_end = eps, or where sigma = std / alpha = sigma_min, then the Tweedie step
            (denoise); the callback is called after every accepted step.

    Returns: SampleResult(x, nfe): order evaluations per accepted step, order - 1 per
    rejected one (the evaluation at s is kept and reused), + 1 if denoise.
    """
    check_dpm_adaptive_options(sde, order=order, algorithm=algorithm, rtol=rtol, atol=atol,
                               h_init=h_init, theta=theta, t_err=t_err, eps=eps,
                               sigma_min=sigma_min, denoise=denoise, max_steps=max_steps)
    eps = end_time(sde, eps, sigma_min)                       # t_end: where the steps stop
    name = f"dpm_solver_adaptive (order {order})"
    with Harness(score_fn, sde, shape, name=name, total=None, **harness_options) as run:
        x = _adaptive_loop(run, order, algorithm == "dpmsolver++", rtol, atol, h_init, theta,
                           t_err, eps, max_steps)
        if denoise:
            x = final_denoise(run, x, eps, -1)
        return run.result(x)


def _adaptive_loop(run: Harness, order: int, data: bool, rtol: float, atol: float,
                   h: float, theta: float, t_err: float, eps: float, max_steps: int):
    """Algorithm 4 of DPM-Solver: steps of size h in lambda, accepted when E <= 1."""
    (s_t,), (s,) = run.points(torch.tensor([run.sde.T], dtype=SCHEDULE_DTYPE))
    (eps_t,), (end,) = run.points(torch.tensor([eps], dtype=SCHEDULE_DTYPE))
    rs = (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    x = x_prev = run.x
    m0, accepted_steps = None, 0                 # m0: the output at (x, s), reused on rejection
    for attempt in range(max_steps + 1):
        if abs(s.t - eps) <= t_err:
            return x
        if attempt == max_steps:
            raise RuntimeError(f"dpm_solver_adaptive_sample took {max_steps} steps without "
                               f"reaching eps (t={s.t:.6g}); loosen rtol/atol or raise max_steps")
        h = min(h, end.lam - s.lam)
        t_t, t = (eps_t, end) if h == end.lam - s.lam else run.point_at_lam(s.lam + h)
        step = ExponentialStep(s, data)
        if m0 is None:
            m0 = model_output(run.schedule, x, s_t, s, data)
        mids = [run.point_at_lam(s.lam + r * h) for r in rs]
        if order == 2:
            x_low = combine(x, *step.first_order(t), [m0])
            x_high = singlestep_2(run, x, step, t, m0, mids[0], rs[0], data)
        else:
            x_high, m1 = singlestep_3(run, x, step, t, m0, mids, rs, data)
            x_low = combine(x, *step.singlestep_2(t, rs[0]), [m0, m1])
        error = _error_norm(x_low, x_high, x_prev, rtol, atol)
        if error <= 1.0:
            x, x_prev, s, s_t, m0 = x_high, x_low, t, t_t, None
            x = run.step(accepted_steps, x, t)
            accepted_steps += 1
        h *= math.inf if error == 0.0 else theta * error ** (-1.0 / order)


def _error_norm(x_low, x_high, x_prev, rtol: float, atol: float) -> float:
    """E = max over the batch of the RMS over dims of (x_high - x_low) / delta with
    delta = max(atol, rtol max(|x_low|, |x_prev|)) (App. C); the one host sync of a step."""
    delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
    error = ((x_high - x_low) / delta).flatten(1).pow(2).mean(1).sqrt().max().item()
    if not math.isfinite(error):
        raise FloatingPointError("dpm_solver_adaptive_sample: non-finite error estimate; "
                                 "check the score model")
    return error
