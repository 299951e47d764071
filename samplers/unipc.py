"""UniPC: Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models" (NeurIPS 2023), multistep UniP-p predictor with the UniC-p
corrector, B(h) variants "bh1" and "bh2", orders 1-3, data or noise prediction, for every SDE
of sde_lib (through ``harness.Schedule``'s alpha, std and half log-SNR lambda = log(alpha/std)).

One step from s = t_{i} to t = t_{i+1}, h = lambda_t - lambda_s, with the model outputs m_0 at
t_i and m_k at the earlier points t_{i-k} (k = 1 .. p-1) and, in the paper's notation,
hh = -h (data prediction, m = x0_hat) or +h (noise prediction, m = eps_hat):

    r_k = (lambda_{t_{i-k}} - lambda_s) / h,    D_k = (m_k - m_0) / r_k,    r_p = 1,
    x^(1) = ratio x - w expm1(hh) m_0                 (DPM-Solver(++)-1 = DDIM; eq. 7's first term)
    UniP-p (Alg. 2):  x_t^c = x^(1) - w B(h) sum_{k<p} a_k D_k
    UniC-p (Alg. 1):  m_t = m(x_t^c, t);  D_p = m_t - m_0
                      x_t = x^(1) - w B(h) (sum_{k<p} a^c_k D_k + a^c_p D_p)

with ratio = std_t / std_s, w = alpha_t (data) or ratio = alpha_t / alpha_s, w = std_t (noise);
B(h) = hh ("bh1") or expm1(hh) ("bh2") (Sec. 3.3). The weights solve the order conditions
R a = b (eq. 9; App. C), R_{ik} = r_k^(i-1) and b_i = i! phi_{i+1}(hh) / B(h), with
phi_{k+1}(hh) = (phi_k(hh) - 1 / k!) / hh, phi_1(hh) = expm1(hh) / hh: UniP-p uses the
(p-1) x (p-1) system on r_1 .. r_{p-1}, UniC-p the p x p system with r_p = 1. As in the
authors' code, UniP-2 takes a_1 = 1/2 and UniC-1 a^c_1 = 1/2 (the systems' h -> 0 limits).

The corrector costs no evaluation: m_t, evaluated at the predicted x_t^c, is the model output
the next step uses (the paper's key point), so UniPC-p has order p + 1 at the NFE of UniP-p.
Globally the lower-order warm-up steps bound this: UniPC-3 starts with UniPC-1 (local error
h^3) and measures third order where the first step matters (tests/test_unipc.py).
It is not applied after the last step (that evaluation would be used by nothing), so the
NFE is num_steps (+ 1 for the final Tweedie step with ``denoise``, at the grid's end t_end:
where sigma = sigma_min, 0.02 by default, or eps with sigma_min=None), as for multistep
DPM-Solver. Orders warm up as p_i = min(order, i + 1) and, with ``lower_order_final`` as in
``fast.dpm_solver_sample`` (``fast.final_orders``), fall to min(order, num_steps - i) at the
end of runs of 5 to 14 steps by default (None), of fewer than 15 with True (the authors'
code lowers them at any step count; at 4 steps it measured worse here), never with False.

Every coefficient is a host float computed before the loop (the small solves included); each
update is one ``fast.combine`` of the state and the model outputs, and nothing synchronises.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sde_lib import SCHEDULE_DTYPE, SDE, check_bool, check_choice, check_int

from .fast import (SIGMA_MIN, check_grid_options, check_lower_order_final, combine,
                   final_denoise, final_orders, model_output, timesteps)
from .harness import Harness, SampleResult, SchedulePoint

__all__ = ["unipc_sample", "check_unipc_options", "unipc_coefficients", "UNIPC_VARIANTS",
           "UNIPC_ALGORITHMS"]

#: Valid ``variant`` names: B(h) = hh ("bh1") or expm1(hh) ("bh2"), UniPC Sec. 3.3.
UNIPC_VARIANTS = ("bh1", "bh2")
#: Valid ``algorithm`` names: the model output is the data prediction (the default, as
#: DPM-Solver++) or the noise prediction.
UNIPC_ALGORITHMS = ("data_prediction", "noise_prediction")


def check_unipc_options(sde: SDE, *, num_steps=20, order=2, variant="bh2", use_corrector=True,
                        algorithm="data_prediction", spacing="logsnr", eps=1e-3,
                        sigma_min=SIGMA_MIN, schedule=None, denoise=True,
                        lower_order_final=None) -> None:
    """ValueError naming the first bad option of ``unipc_sample``."""
    check_grid_options(sde, num_steps, spacing, eps, denoise, sigma_min, schedule)
    check_int("order", order, 1, 3)
    check_choice("variant", variant, UNIPC_VARIANTS)
    check_bool("use_corrector", use_corrector)
    check_choice("algorithm", algorithm, UNIPC_ALGORITHMS)
    check_lower_order_final(lower_order_final)


def _weights(rks: list[float], hh: float, b_h: float) -> tuple[list[float], list[float]]:
    """(a, a^c): the UniP and UniC weights for the ratios r_1 .. r_{p-1} (``rks``) of the
    earlier outputs: R a = b on r_1 .. r_{p-1} and R a^c = b on r_1 .. r_{p-1}, 1, with
    R_{ik} = r_k^(i-1), b_i = i! phi_{i+1}(hh) / B(h) (UniPC eq. 9 / App. C), and the authors'
    a = [1/2] for p = 2 and a^c = [1/2] for p = 1."""
    p = len(rks) + 1
    b, hphi, factorial = [], math.expm1(hh) / hh - 1.0, 1.0      # hphi = hh phi_2(hh)
    for i in range(1, p + 1):
        b.append(hphi * factorial / b_h)
        factorial *= i + 1
        hphi = hphi / hh - 1.0 / factorial
    r = torch.tensor(rks + [1.0], dtype=SCHEDULE_DTYPE)
    R = torch.stack([r ** k for k in range(p)])
    b = torch.tensor(b, dtype=SCHEDULE_DTYPE)
    if p == 1:
        return [], [0.5]
    predictor = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    return predictor, torch.linalg.solve(R, b).tolist()


def unipc_coefficients(s: SchedulePoint, t: SchedulePoint, earlier: list[SchedulePoint],
                       data: bool, variant: str) -> tuple[tuple[float, list[float]],
                                                          tuple[float, list[float]]]:
    """The coefficients of one UniP-p step and of its UniC-p correction from s to t (host-float
    points), p = len(earlier) + 1, ``earlier`` the points of m_1 .. m_{p-1} (newest first).

    Returns ((c_x, [c_0, .., c_{p-1}]), (c_x, [c_0, .., c_{p-1}, c_t])) for ``fast.combine``
    over the state x at s and the outputs m_0 .. m_{p-1} (and m_t for the corrector): the
    module docstring's updates with D_k = (m_k - m_0) / r_k expanded into the outputs.
    """
    h = t.lam - s.lam
    hh = -h if data else h
    ratio, w = (t.std / s.std, t.alpha) if data else (t.alpha / s.alpha, t.std)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(e.lam - s.lam) / h for e in earlier]
    a, a_c = _weights(rks, hh, b_h)
    first = -w * math.expm1(hh)                                     # x^(1) = ratio x + first m_0

    def expand(weights, last=None):
        coefficients = [-w * b_h * a_k / r_k for a_k, r_k in zip(weights, rks)]
        c_0 = first - sum(coefficients)
        if last is not None:                                        # a^c_p (m_t - m_0)
            c_0 += w * b_h * last
            coefficients.append(-w * b_h * last)
        return ratio, [c_0] + coefficients

    return expand(a), expand(a_c[:-1], a_c[-1])


def unipc_sample(score_fn: Callable, sde: SDE, shape, *, num_steps: int = 20, order: int = 2,
                 variant: str = "bh2", use_corrector: bool = True,
                 algorithm: str = "data_prediction", spacing: str = "logsnr", eps: float = 1e-3,
                 sigma_min: float | None = SIGMA_MIN, schedule: str | None = None,
                 denoise: bool = True, lower_order_final: bool | None = None,
                 **harness_options) -> SampleResult:
    """Multistep UniPC (Zhao et al. 2023): UniP-p (Alg. 2) with the UniC-p corrector (Alg. 1)
    after every step but the last; see the module docstring for the updates.

    Args:
        score_fn: ``score_fn(x, t)``, x (B, ...), t a (B,) float64 tensor in [eps, T].
        sde, shape: the forward SDE; (B, *data_shape).
        num_steps: steps from T to eps on ``fast.timesteps`` (one evaluation each).
        order: p = 1, 2 or 3 of UniP (UniPC-p: order p + 1 with the corrector).
        variant: "bh1" (B(h) = hh) or "bh2" (B(h) = expm1(hh)).
        use_corrector: apply UniC (no extra evaluation); False: UniP alone (order 1 of it is
            DDIM / DPM-Solver++(1)).
        algorithm: "data_prediction" (x0_hat, as DPM-Solver++) or "noise_prediction".
        spacing: "logsnr", "uniform" or "karras" (``fast.timesteps``). eps: the last time,
            unless sigma_min is set.
        sigma_min, schedule: the grid's end noise level and a fitted step schedule file (as
            ``fast.ddim_sample``).
        denoise: one more evaluation for the Tweedie step at the grid's end t_end (as ``fast``).
        lower_order_final: see the module docstring.
        harness_options: generator, device, dtype, x_init, progress, callback, projection.

    Returns: SampleResult(x (B, ...), nfe), nfe = num_steps (+ 1 if denoise).
    """
    check_unipc_options(sde, num_steps=num_steps, order=order, variant=variant,
                        use_corrector=use_corrector, algorithm=algorithm, spacing=spacing,
                        eps=eps, sigma_min=sigma_min, schedule=schedule, denoise=denoise,
                        lower_order_final=lower_order_final)
    data = algorithm == "data_prediction"
    name = f"unipc ({variant}, order {order}{', corrector' if use_corrector else ''})"
    with Harness(score_fn, sde, shape, name=name, total=num_steps, **harness_options) as run:
        times, points = run.points(timesteps(sde, num_steps, spacing=spacing, eps=eps,
                                             sigma_min=sigma_min, schedule=schedule))
        orders = final_orders(num_steps, order, lower_order_final)
        steps = [unipc_coefficients(points[i], points[i + 1], points[i - k + 1:i][::-1], data,
                                    variant) for i, k in enumerate(orders)]
        x, history, m_t = run.x, [], None          # history: outputs at t_i, t_{i-1}, ...
        for i, k in enumerate(orders):
            if m_t is None:                        # no corrector before: evaluate at x
                m_t = model_output(run.schedule, x, times[i], points[i], data)
            history.insert(0, m_t)
            del history[order:]
            (c_x, c_p), (c_xc, c_c) = steps[i]
            x_next = combine(x, c_x, c_p, history[:k])                          # UniP-p
            m_t = None
            if use_corrector and i < num_steps - 1:
                m_t = model_output(run.schedule, x_next, times[i + 1], points[i + 1], data)
                x_next = combine(x, c_xc, c_c, history[:k] + [m_t])            # UniC-p
            x = run.step(i, x_next, points[i + 1])
        if denoise:
            x = final_denoise(run, x, points[-1].t, num_steps)
        return run.result(x)
