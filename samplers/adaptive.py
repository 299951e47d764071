"""Adaptive-step DPM-Solver (Lu et al. 2022, "DPM-Solver", Sec. 5 / App. C, Algorithm 4):
DPM-Solver-12 (order 2) and DPM-Solver-23 (order 3), with data prediction (DPM-Solver++
updates, the default) or noise prediction, for every SDE of sde_lib (through ``fast``'s
alpha, std and half log-SNR lambda = log(alpha / std) = sde.log_snr / 2).

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
step that reaches lambda_eps lands on eps exactly. Rejected steps cost evaluations too (nfe
counts all of them; the evaluation at s is reused after a rejection). As in the official
implementation, E is the batch maximum, so the whole batch shares one step size.

Host synchronisation: exactly one per step (E.item(), which the accept/reject decision and
the next h need on the host; unavoidable for step-size control). Time schedules are computed
from host floats, so nothing else syncs. Non-finite E raises FloatingPointError.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from sde_lib import SCHEDULE_DTYPE, SDE

from .common import (CountingScore, SampleResult, check_choice, check_eps, check_int, check_real,
                     initial_state, progress_bar)
from .fast import (DPM_ALGORITHMS, _denoise, _first_order, _Model,
                   _singlestep_2)

__all__ = ["dpm_solver_adaptive_sample"]


class _Point:
    """t, alpha, std (0-d float64 on the device) at a half log-SNR lambda (host float)."""

    def __init__(self, sde: SDE, lam: float, device, t: float | None = None):
        if t is None:
            t = sde.t_from_log_snr(torch.tensor(2.0 * lam, dtype=SCHEDULE_DTYPE)).item()
        self.t_host = t
        self.t = torch.tensor(t, dtype=SCHEDULE_DTYPE, device=device)
        self.alpha, self.std = sde.marginal_coeffs(self.t)


def _third_order(x, m0, m1, m2, data, p_s, p1, p2, p_t, h, r1, r2):
    """DPM-Solver-3 (DPM-Solver Alg. 2 with r1, r2) / its data-prediction form, given the
    model outputs m1 at u1 (lambda_s + r1 h) and m2 at u2 (lambda_s + r2 h)."""
    a_s, sd_s, a_t, sd_t = p_s.alpha, p_s.std, p_t.alpha, p_t.std
    if data:
        phi_1 = torch.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        return (sd_t / sd_s) * x - (a_t * phi_1) * m0 + (a_t * phi_2 / r2) * (m2 - m0)
    phi_1 = torch.expm1(h)
    phi_2 = phi_1 / h - 1.0
    return (a_t / a_s) * x - (sd_t * phi_1) * m0 - (sd_t * phi_2 / r2) * (m2 - m0)


def _u2(x, m0, m1, data, p_s, p2, h, r1, r2):
    """The second intermediate state of DPM-Solver-3 at lambda_s + r2 h."""
    a_s, sd_s, a2, sd2 = p_s.alpha, p_s.std, p2.alpha, p2.std
    if data:
        phi_12 = torch.expm1(-r2 * h)
        phi_22 = phi_12 / (r2 * h) + 1.0
        return (sd2 / sd_s) * x - (a2 * phi_12) * m0 + (r2 / r1 * a2 * phi_22) * (m1 - m0)
    phi_12 = torch.expm1(r2 * h)
    phi_22 = phi_12 / (r2 * h) - 1.0
    return (a2 / a_s) * x - (sd2 * phi_12) * m0 - (r2 / r1 * sd2 * phi_22) * (m1 - m0)


def dpm_solver_adaptive_sample(score_fn: Callable, sde: SDE, shape, *, order: int = 2,
                               algorithm: str = "dpmsolver++", rtol: float = 0.05,
                               atol: float = 0.0078, h_init: float = 0.05, theta: float = 0.9,
                               t_err: float = 1e-5, eps: float = 1e-3, denoise: bool = True,
                               max_steps: int = 10000,
                               generator: torch.Generator | None = None, device=None,
                               dtype: torch.dtype | None = None,
                               x_init: torch.Tensor | None = None, progress: bool = False,
                               callback: Callable | None = None) -> SampleResult:
    """Adaptive-step DPM-Solver-12 (order=2) / DPM-Solver-23 (order=3); see the module
    docstring for the step control.

    Args:
        order: 2 (DPM-Solver-12) or 3 (DPM-Solver-23).
        algorithm: "dpmsolver++" (data prediction) or "dpmsolver" (noise prediction).
        rtol, atol: relative and absolute tolerances of E (defaults: the paper's for images in
            [-1, 1]; atol = 0.0078 ~ 1/128). rtol > 0, atol >= 0 with atol + rtol > 0.
        h_init: the first step in half log-SNR lambda; theta: safety factor in (0, 1].
        t_err: stop when |s - eps| <= t_err. max_steps: attempted steps (accepted or
            rejected) before a RuntimeError.
        eps, denoise, generator, device, dtype, x_init, progress: as in ``dpm_solver_sample``.
        callback: ``callback({"step", "t", "x", "h", "error", "accepted"})`` after every
            attempted step ("t": the time reached, a host float; "x": the current state).

    Returns: SampleResult(x, nfe): order evaluations per accepted step, order - 1 per
    rejected one (the evaluation at s is kept and reused), + 1 if denoise.
    """
    check_choice("algorithm", algorithm, DPM_ALGORITHMS)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in (2, 3):
        raise ValueError(f"order must be 2 (DPM-Solver-12) or 3 (DPM-Solver-23), got {order!r}")
    order = int(order)
    rtol = check_real("rtol", rtol, strict=True)
    atol = check_real("atol", atol)
    h_init = check_real("h_init", h_init, strict=True)
    theta = check_real("theta", theta, strict=True, maximum=1.0)
    t_err = check_real("t_err", t_err, strict=True)
    max_steps = check_int("max_steps", max_steps)
    eps = check_eps(sde, eps)
    x = initial_state(sde, shape, generator=generator, device=device, dtype=dtype, x_init=x_init)
    counter = CountingScore(score_fn)
    data = algorithm == "dpmsolver++"
    model = _Model(counter, x.shape[0], data=data)
    dev = x.device

    ends = torch.tensor([sde.T, eps], dtype=SCHEDULE_DTYPE)
    lam_T, lam_eps = (0.5 * sde.log_snr(ends)).tolist()
    p_s = _Point(sde, lam_T, dev, t=float(sde.T))
    lam_s, h = lam_T, h_init
    r1, r2 = (0.5, None) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    x_prev = x
    m0 = None                                 # the model output at (x, s), reused on rejection
    bar = progress_bar(None, progress, f"dpm_solver_adaptive_sample (order {order})")
    step = 0
    try:
        with torch.no_grad():
            while abs(p_s.t_host - eps) > t_err:
                if step >= max_steps:
                    raise RuntimeError(f"dpm_solver_adaptive_sample took {max_steps} steps "
                                       f"without reaching eps (t={p_s.t_host:.6g}); loosen "
                                       "rtol/atol or raise max_steps")
                final = h >= lam_eps - lam_s
                if final:
                    h = lam_eps - lam_s
                    p_t = _Point(sde, lam_eps, dev, t=eps)
                else:
                    p_t = _Point(sde, lam_s + h, dev)
                h_t = torch.tensor(h, dtype=SCHEDULE_DTYPE, device=dev)
                p1 = _Point(sde, lam_s + r1 * h, dev)
                if m0 is None:
                    m0 = model(x, p_s.t, p_s.alpha, p_s.std)
                u1 = _first_order(x, m0, data, p_s.alpha, p_s.std, p1.alpha, p1.std, r1 * h_t)
                m1 = model(u1, p1.t, p1.alpha, p1.std)
                if order == 2:
                    x_low = _first_order(x, m0, data, p_s.alpha, p_s.std, p_t.alpha, p_t.std, h_t)
                    x_high = _singlestep_2(x, m0, m1, data, p_s.alpha, p_s.std, p_t.alpha,
                                           p_t.std, h_t, r1)
                else:
                    x_low = _singlestep_2(x, m0, m1, data, p_s.alpha, p_s.std, p_t.alpha,
                                          p_t.std, h_t, r1)
                    p2 = _Point(sde, lam_s + r2 * h, dev)
                    u2 = _u2(x, m0, m1, data, p_s, p2, h_t, r1, r2)
                    m2 = model(u2, p2.t, p2.alpha, p2.std)
                    x_high = _third_order(x, m0, m1, m2, data, p_s, p1, p2, p_t, h_t, r1, r2)
                # delta = max(atol, rtol max(|x_low|, |x_prev|)); E = RMS over dims, max over batch
                delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
                err = ((x_high - x_low) / delta).flatten(1).pow(2).mean(1).sqrt().max()
                E = err.item()                                 # the one host sync per step
                if not math.isfinite(E):
                    raise FloatingPointError(
                        f"dpm_solver_adaptive_sample: non-finite error estimate at t="
                        f"{p_s.t_host:.6g}; check the score model")
                accepted = E <= 1.0
                if accepted:
                    x, x_prev = x_high, x_low
                    p_s, lam_s, m0 = p_t, (lam_eps if final else lam_s + h), None
                factor = math.inf if E == 0.0 else theta * E ** (-1.0 / order)
                h = min(h * factor, lam_eps - lam_s) if lam_eps > lam_s else h
                bar.update(1)
                if callback is not None:
                    callback({"step": step, "t": p_s.t_host, "x": x, "h": h, "error": E,
                              "accepted": accepted})
                step += 1
            if denoise:
                x = _denoise(counter, sde, x, eps)
    finally:
        bar.close()
    return SampleResult(x=x, nfe=counter.nfe)
