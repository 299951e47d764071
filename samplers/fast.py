"""Few-step samplers written through each SDE's Gaussian marginal: DDIM (Song, Meng & Ermon
2021) and DPM-Solver / DPM-Solver++ of orders 1-3 (Lu et al. 2022, "DPM-Solver", NeurIPS
2022; Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095), single-step and multistep.

Every SDE of sde_lib has the kernel x_t = alpha_t x_0 + std_t z, so the score gives the data
and noise predictions of ``harness.Schedule``, and the probability-flow ODE is solved
exactly in its linear part in the half log-SNR lambda = log(alpha / std) (half of
``sde.log_snr``). The same code serves VP, sub-VP and VE (alpha = 1, std = sigma).

End points: every grid runs from T to t_end, the time at which sigma = std / alpha equals
``sigma_min`` (default ``SIGMA_MIN`` = 0.02 for every SDE) or, with sigma_min=None, t_end =
eps; with ``denoise`` a final Tweedie step at t_end (one more NFE) returns data at t = 0.

Each sampler precomputes its grid of ``SchedulePoint``s, and every update is a linear
combination ``c_x x + sum_k c_k m_k`` of the state and model outputs m_k whose coefficients
are host floats: the loop launches a handful of kernels per step and never synchronises.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sde_lib import SCHEDULE_DTYPE, SDE, check_bool, check_choice, check_int, check_real

from .harness import (DATA_POINT, Harness, SampleResult, Schedule, SchedulePoint, check_eps,
                      check_sigma_min, end_time)
from .schedules_opt import check_schedule, schedule_fractions

__all__ = ["timesteps", "ddim_sample", "dpm_solver_sample", "check_ddim_options", "Output",
           "check_dpm_solver_options", "ExponentialStep", "combine", "model_output", "singlestep_2", "singlestep_3",
           "final_denoise", "SPACINGS", "SIGMA_MIN", "check_grid_options",
           "DPM_ALGORITHMS", "WARMUPS", "LOWER_ORDER_FINAL_BELOW", "LOWER_ORDER_FINAL_FROM",
           "final_orders", "check_lower_order_final"]

#: The default end point of the few-step samplers' grids: sigma = std / alpha = 0.02 on every
#: SDE (``sigma_min``; None ends at t = eps: sigma 0.0105 on VP, 1.1e-4 on sub-VP, 0.0101 on
#: VE(0.01, .)). Chosen by bench/endpoints.py (exact scores, 2 Gaussians + 3 mixtures x VP /
#: sub-VP / VE x 5 / 10 / 20 NFE; README "Few-step samplers: where the grids end"): at 10 and
#: 20 NFE it beats eps on every SDE and 0.002 / 0.005 / 0.01; at 5 NFE on VP eps (= 0.0105)
#: is better by 13 %.
SIGMA_MIN = 0.02
#: Valid ``spacing`` names of ``timesteps``.
SPACINGS = ("logsnr", "uniform", "karras")
#: Valid ``warmup`` names of ``dpm_solver_sample`` (how multistep order 3 starts).
WARMUPS = ("lower_order", "singlestep")
#: Valid ``algorithm`` names: data prediction (DPM-Solver++) or noise prediction.
DPM_ALGORITHMS = ("dpmsolver++", "dpmsolver")
#: ``lower_order_final`` lowers the final multistep orders only for runs of fewer steps than
#: this (the official DPM-Solver / diffusers threshold; ``lower_order_final=True``) ...
LOWER_ORDER_FINAL_BELOW = 15
#: ... and, by default (``lower_order_final=None``), of at least this many: with 4 steps or
#: fewer the warm-up and the lowered end would leave half the steps first order. Measured
#: (bench/README.md, "Few-step race, round two"): at 4 steps (5 NFE) lowering cost
#: DPM-Solver++(2M) and UniPC on the trained digits models (FID 100 -> 69 and 82 -> 51 on VP
#: without it, 3 seeds) and in the worst case on exact scores (FD / floor 78 -> 20 on the
#: tuning set); at 5-7 steps it helped (worst case 11 / 7.6 / 3.3 against 14 / 9.4 / 5.0
#: without).
LOWER_ORDER_FINAL_FROM = 5


# ----- time steps ---------------------------------------------------------------------------
def timesteps(sde: SDE, num_steps: int, *, spacing: str = "logsnr", eps: float = 1e-3,
              rho: float = 7.0, sigma_min: float | None = None, schedule: str | None = None,
              device=None) -> torch.Tensor:
    """Decreasing times T = t_0 > t_1 > ... > t_n = t_end, (num_steps + 1,) float64.

    The end point t_end is ``eps``, or with ``sigma_min`` the time at which the noise level
    sigma(t) = std / alpha equals sigma_min (the same noise level for every SDE;
    ``harness.end_time``).

    spacing:
        "uniform": uniform in t.
        "logsnr": uniform in lambda = sde.log_snr(t) between lambda(T) and lambda(t_end)
            (DPM-Solver's "logSNR" skip type), t = sde.t_from_log_snr(lambda).
        "karras": sigma_i = (sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
            with sigma = exp(-lambda/2) = std/alpha, sigma_max = sigma(T), sigma_min =
            sigma(t_end) (Karras et al. 2022, eq. 5), mapped back to t.
    schedule: the path of a fitted step schedule (``samplers.schedules_opt``; replaces
        ``spacing``): its noise levels for ``num_steps`` intervals, moved in log sigma from
        the fitted range onto [sigma(t_end), sigma(T)] (unchanged when the ranges agree).
    The end points are exactly T and t_end.
    """
    check_choice("spacing", spacing, SPACINGS)
    num_steps = check_int("num_steps", num_steps, 1)
    t_end = end_time(sde, eps, sigma_min)
    T = float(sde.T)
    ends = torch.tensor([T, t_end], dtype=SCHEDULE_DTYPE, device=device)
    if schedule is not None:
        lam_T, lam_end = sde.log_snr(ends).unbind(0)
        frac = torch.as_tensor(schedule_fractions(schedule, num_steps), dtype=SCHEDULE_DTYPE,
                               device=device)
        t = sde.t_from_log_snr(lam_T + frac * (lam_end - lam_T))
    elif spacing == "uniform":
        t = torch.linspace(T, t_end, num_steps + 1, dtype=SCHEDULE_DTYPE, device=device)
    else:
        lam_T, lam_eps = sde.log_snr(ends).unbind(0)
        frac = torch.linspace(0.0, 1.0, num_steps + 1, dtype=SCHEDULE_DTYPE, device=device)
        if spacing == "logsnr":
            lam = lam_T + frac * (lam_eps - lam_T)
        else:
            rho = check_real("rho", rho, strict=True)
            # sigma^(1/rho) = exp(-lambda / (2 rho))
            lo, hi = torch.exp(-lam_eps / (2 * rho)), torch.exp(-lam_T / (2 * rho))
            lam = -2.0 * rho * torch.log(hi + frac * (lo - hi))
        t = sde.t_from_log_snr(lam)
    t[0], t[-1] = T, t_end
    return t


class Output:
    """A model output m = sum_k c_k v_k over tensors v_k (the state it was evaluated at and the
    score there), kept as terms and never formed on its own: ``combine`` folds every update
    into one linear combination of the tensors, in which the state's terms merge, so a
    DPM-Solver++(2M) step takes four passes over the data besides the score."""
    __slots__ = ("terms",)

    def __init__(self, terms):
        self.terms = tuple(terms)


def combine(x: torch.Tensor, c_x: float, coefficients, outputs) -> torch.Tensor:
    """c_x x + sum_k c_k m_k for host-float coefficients c_k of the model outputs m_k
    (``Output``s or tensors): one kernel per distinct tensor."""
    weights = {id(x): [c_x, x]}
    for c, m in zip(coefficients, outputs):
        for c_v, v in (m.terms if isinstance(m, Output) else ((1.0, m),)):
            weights.setdefault(id(v), [0.0, v])[0] += c * c_v
    terms = [(c, v) for c, v in weights.values() if c != 0.0]
    out = terms[0][1] * terms[0][0]
    for c, v in terms[1:]:
        out = out.add_(v, alpha=c)
    return out


# ----- the exponential integrator of DPM-Solver ----------------------------------------------
class ExponentialStep:
    """One step of DPM-Solver from the point s to later points p (host-float SchedulePoints),
    in the exponential-integrator form shared by its two parameterisations:

        data prediction (DPM-Solver++; sgn = -1):  ratio(p) = std_p / std_s,     w(p) = alpha_p
        noise prediction (DPM-Solver; sgn = +1):   ratio(p) = alpha_p / alpha_s, w(p) = std_p

    so that the first-order step to p, h = lam_p - lam_s, is (DPM-Solver eq. 3.7 / DPM-Solver++
    eq. 4.1) x_p = ratio(p) x - w(p) expm1(sgn h) m_s. Each method returns the coefficients
    (c_x, [c_0, c_1, ...]) of x and of the model outputs m_0 = m_s, m_1, ... for ``combine``.
    """

    def __init__(self, s: SchedulePoint, data: bool):
        self.s, self.data, self.sgn = s, data, (-1.0 if data else 1.0)

    def _parts(self, p: SchedulePoint):
        """(h, ratio(p), w(p)) of the step from s to p."""
        ratio = p.std / self.s.std if self.data else p.alpha / self.s.alpha
        return p.lam - self.s.lam, ratio, (p.alpha if self.data else p.std)

    def first_order(self, p: SchedulePoint):
        """DPM-Solver-1 / DPM-Solver++(1), which equal DDIM with eta = 0."""
        h, ratio, w = self._parts(p)
        return ratio, [-w * math.expm1(self.sgn * h)]

    def singlestep_2(self, p: SchedulePoint, r1: float):
        """Given m_1 at lam_s + r1 h: DPM-Solver-2 (DPM-Solver Alg. 1 with r1) and
        DPM-Solver++(2S) (DPM-Solver++ Alg. 1), x_p = x_p^(1) - w expm1(sgn h) / (2 r1) (m_1 - m_0)."""
        h, ratio, w = self._parts(p)
        phi = -w * math.expm1(self.sgn * h)
        return ratio, [phi * (1.0 - 0.5 / r1), phi * 0.5 / r1]

    def third_intermediate(self, p2: SchedulePoint, r1: float, r2: float):
        """The second intermediate state u_2 of DPM-Solver-3 at lam_s + r2 h, given m_1 at
        lam_s + r1 h (DPM-Solver Alg. 2; DPM-Solver++ App. A):
        u_2 = ratio x - w expm1(sgn r2 h) m_0 - sgn (r2 / r1) w phi_2 (m_1 - m_0)."""
        h2, ratio, w = self._parts(p2)                       # h2 = r2 h
        phi_1 = math.expm1(self.sgn * h2)
        phi_2 = phi_1 / h2 - self.sgn
        c1 = -self.sgn * (r2 / r1) * w * phi_2
        return ratio, [-w * phi_1 - c1, c1]

    def third_order(self, p: SchedulePoint, r2: float):
        """DPM-Solver-3 from m_0 and m_2 at lam_s + r2 h (m_1 enters through u_2 only):
        x_p = ratio x - w expm1(sgn h) m_0 - sgn (w phi_2 / r2) (m_2 - m_0)."""
        h, ratio, w = self._parts(p)
        phi_1 = math.expm1(self.sgn * h)
        c2 = -self.sgn * w * (phi_1 / h - self.sgn) / r2
        return ratio, [-w * phi_1 - c2, 0.0, c2]

    def multistep_2(self, p: SchedulePoint, h0: float):
        """DPM-Solver++(2M) (DPM-Solver++ Alg. 2) and its noise form, with the previous output
        m_1 at lam_s - h0: D = m_0 + (m_0 - m_1) / (2 r), r = h0 / h."""
        h, ratio, w = self._parts(p)
        phi, r = -w * math.expm1(self.sgn * h), h0 / h
        return ratio, [phi * (1.0 + 0.5 / r), -phi * 0.5 / r]

    def multistep_3(self, p: SchedulePoint, h0: float, h1: float):
        """Third-order multistep (3M; DPM-Solver++ App. B) from m_0, m_1, m_2 at lam_s,
        lam_s - h0, lam_s - h0 - h1, r0 = h0 / h, r1 = h1 / h: divided differences
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) ~ h m', D2 = 2 (D1_0 - D1_1) / (r0 + r1) ~ h^2 m''
        (the official code omits the 2 and measures only second order; tests/test_fast.py),
        and the exact integrals: x_p = ratio x - w phi_1 m_0 - sgn w phi_2 D1 - w phi_3 D2 with
        phi_1 = expm1(sgn h), phi_2 = phi_1 / h - sgn, phi_3 = phi_2 / h - 1/2."""
        h, ratio, w = self._parts(p)
        r0, r1 = h0 / h, h1 / h
        d10 = (1.0 / r0, -1.0 / r0, 0.0)                           # D1_0 in m_0, m_1, m_2
        diff = (1.0 / r0, -(1.0 / r0 + 1.0 / r1), 1.0 / r1)         # D1_0 - D1_1
        d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d10, diff)]
        d2 = [2.0 / (r0 + r1) * b for b in diff]
        phi_1 = math.expm1(self.sgn * h)
        phi_2 = phi_1 / h - self.sgn
        phi_3 = phi_2 / h - 0.5
        first = (-w * phi_1, 0.0, 0.0)
        return ratio, [f - self.sgn * w * phi_2 * a - w * phi_3 * b
                       for f, a, b in zip(first, d1, d2)]


def model_output(schedule: Schedule, x: torch.Tensor, t: torch.Tensor, point: SchedulePoint,
                 data: bool) -> Output:
    """The data prediction x0_hat = (x + std^2 score) / alpha (Tweedie) or the noise
    prediction -std score at (x, t), from one score evaluation, as an ``Output``; ``point``
    holds alpha, std (host floats) at t."""
    score = schedule.score(x, t)
    if data:
        c_x, c_score = Schedule.tweedie_coefficients(point.alpha, point.std)
        return Output(((c_x, x), (c_score, score)))
    return Output(((-point.std, score),))


# ----- checks -------------------------------------------------------------------------------
def check_grid_options(sde: SDE, num_steps, spacing, eps, denoise, sigma_min=None,
                       schedule=None, intervals=None) -> None:
    """ValueError naming the first bad grid option of a few-step sampler (``intervals``: the
    grid's intervals if not num_steps, for the schedule file's entry)."""
    num_steps = check_int("num_steps", num_steps, 1)
    check_choice("spacing", spacing, SPACINGS)
    check_eps(sde, eps)
    if sigma_min is not None:
        check_sigma_min(sde, sigma_min)
    check_schedule(schedule, num_steps if intervals is None else intervals)
    check_bool("denoise", denoise)


def check_ddim_options(sde: SDE, *, num_steps=20, eta=0.0, spacing="logsnr", eps=1e-3,
                       sigma_min=SIGMA_MIN, schedule=None, denoise=True) -> None:
    """ValueError naming the first bad option of ``ddim_sample``."""
    check_grid_options(sde, num_steps, spacing, eps, denoise, sigma_min, schedule)
    check_real("eta", eta)


def check_dpm_solver_options(sde: SDE, *, num_steps=20, order=2, multistep=True,
                             algorithm="dpmsolver++", spacing="logsnr", eps=1e-3,
                             sigma_min=SIGMA_MIN, schedule=None, denoise=True,
                             warmup="lower_order", lower_order_final=None) -> None:
    """ValueError naming the first bad option of ``dpm_solver_sample``."""
    check_grid_options(sde, num_steps, spacing, eps, denoise, sigma_min, schedule)
    check_int("order", order, 1, 3)
    check_bool("multistep", multistep)
    check_choice("algorithm", algorithm, DPM_ALGORITHMS)
    check_choice("warmup", warmup, WARMUPS)
    check_lower_order_final(lower_order_final)


def _grid(run: Harness, num_steps: int, spacing: str, eps: float, sigma_min=None,
          schedule=None):
    """(device (B,) times, host-float points) of the time steps T = t_0 > ... > t_n = t_end
    (``timesteps``); t_end = points[-1].t."""
    return run.points(timesteps(run.sde, num_steps, spacing=spacing, eps=eps,
                                sigma_min=sigma_min, schedule=schedule))


def final_denoise(run: Harness, x: torch.Tensor, eps: float, step: int) -> torch.Tensor:
    """The last denoising step of the Score SDE samplers: Tweedie's x0_hat at the grid's last
    time ``eps`` (t_end; one more score evaluation)."""
    point = run.schedule.at(torch.tensor(eps, dtype=SCHEDULE_DTYPE, device=run.x.device))
    x0 = run.schedule.denoise(x, point)
    return run.step(step, x0, DATA_POINT, denoised=x0)


# ----- DDIM ---------------------------------------------------------------------------------
def ddim_sample(score_fn: Callable, sde: SDE, shape, *, num_steps: int = 20, eta: float = 0.0,
                spacing: str = "logsnr", eps: float = 1e-3,
                sigma_min: float | None = SIGMA_MIN, schedule: str | None = None,
                denoise: bool = True, **harness_options) -> SampleResult:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) for any kernel x_t = alpha_t x_0 + std_t z.

    From time s to the next (smaller) time t, with x0_hat, eps_hat the predictions at (x, s):

        x_t = alpha_t x0_hat + sqrt(std_t^2 - sigma_eta^2) eps_hat + sigma_eta z,
        sigma_eta = eta * std_t * sqrt(1 - alpha_s^2 std_t^2 / (alpha_t^2 std_s^2)).

    eta = 1 is the exact posterior q(x_t | x_s, x_0 = x0_hat) (DDIM eq. 16 for VP); eta = 0 is
    deterministic and equals first-order DPM-Solver. Written as x_t = c_x x + c_s score + c_z z.

    Args:
        score_fn: ``score_fn(x, t)``, t a (B,) float64 tensor in [eps, T].
        sde, shape: the forward SDE; (B, *data_shape).
        num_steps: steps from T to eps (one score evaluation each).
        eta: stochasticity, >= 0. spacing: "logsnr", "uniform" or "karras" (``timesteps``).
        eps: the last time, unless sigma_min is set.
        sigma_min: end the grid at the time t_end where sigma = std / alpha = sigma_min
            (default ``SIGMA_MIN`` = 0.02, the same noise level on every SDE); None: at
            t_end = eps.
        schedule: a fitted step schedule file (``samplers.schedules_opt``), replacing spacing.
        denoise: one more evaluation for the Tweedie step at t_end (to t = 0).
        harness_options: generator, device, dtype, x_init, progress, callback (``harness``).

    End point: the grid ends at t_end, then the Tweedie step (denoise) returns data.
    Returns: SampleResult(x, nfe) with nfe = num_steps (+ 1 if denoise).
    """
    check_ddim_options(sde, num_steps=num_steps, eta=eta, spacing=spacing, eps=eps,
                       sigma_min=sigma_min, schedule=schedule, denoise=denoise)
    with Harness(score_fn, sde, shape, name="ddim", total=num_steps, **harness_options) as run:
        times, points = _grid(run, num_steps, spacing, eps, sigma_min, schedule)
        x = run.x
        for i in range(num_steps):
            c_x, c_score, c_z = _ddim_coefficients(points[i], points[i + 1], eta)
            x = combine(x, c_x, [c_score], [run.schedule.score(x, times[i])])
            if c_z > 0:
                x = x.add_(run.noise(x), alpha=c_z)
            x = run.step(i, x, points[i + 1])
        if denoise:
            x = final_denoise(run, x, points[-1].t, num_steps)
        return run.result(x)


def _ddim_coefficients(s: SchedulePoint, t: SchedulePoint, eta: float):
    """(c_x, c_score, c_z) of DDIM's step from s to t: x0_hat = (x + std_s^2 score) / alpha_s,
    eps_hat = -std_s score; sigma_eta^2 = eta^2 std_t^2 (-expm1(2 (lam_s - lam_t)))."""
    sigma_eta = eta * t.std * math.sqrt(-math.expm1(2.0 * (s.lam - t.lam)))
    c_eps = math.sqrt(max(t.std ** 2 - sigma_eta ** 2, 0.0))
    c_x = t.alpha / s.alpha
    return c_x, c_x * s.std ** 2 - c_eps * s.std, sigma_eta


# ----- DPM-Solver(++) -----------------------------------------------------------------------
def dpm_solver_sample(score_fn: Callable, sde: SDE, shape, *, num_steps: int = 20, order: int = 2,
                      multistep: bool = True, algorithm: str = "dpmsolver++",
                      spacing: str = "logsnr", eps: float = 1e-3,
                      sigma_min: float | None = SIGMA_MIN, schedule: str | None = None,
                      denoise: bool = True, warmup: str = "lower_order",
                      lower_order_final: bool | None = None,
                      **harness_options) -> SampleResult:
    """DPM-Solver (noise prediction) / DPM-Solver++ (data prediction), orders 1-3.

    Single-step (``multistep=False``): order 2 through lam_s + h/2 (DPM-Solver-2,
    DPM-Solver++(2S)), order 3 through lam_s + h/3 and lam_s + 2h/3 (DPM-Solver-3); ``order``
    evaluations per step. Multistep: previous outputs reused, one evaluation per step
    (DPM-Solver++(2M), 3M); the updates are ``ExponentialStep``'s.

    Warm-up of multistep order 3 (``warmup``): "lower_order" (the papers') takes orders 1, 2
    until enough history exists, which bounds 3M's global order by 2 where the first step
    matters (measured on VE); "singlestep" takes the first step with the single-step
    second-order method (one more evaluation) and keeps third order.
    ``lower_order_final``: multistep step i uses order min(order, num_steps - i) (for stability
    with trained networks at small t) for runs of LOWER_ORDER_FINAL_FROM = 5 to fewer than
    LOWER_ORDER_FINAL_BELOW = 15 steps with None (the default), below 15 steps with True (the
    official code's rule, which at 4 steps or fewer measured worse here), never with False.

    Args:
        order: 1, 2 or 3. multistep: multistep or single-step. algorithm: "dpmsolver++" or
            "dpmsolver". num_steps: (outer) steps. warmup, lower_order_final: see above.
        spacing, eps, sigma_min, schedule, denoise, harness_options: as in ``ddim_sample``
            (the grid ends at t_end, then the Tweedie step).

    Returns: SampleResult(x, nfe), nfe = num_steps * (1 or order) (+ 1 with
    warmup="singlestep" and 3M) (+ 1 if denoise).
    """
    check_dpm_solver_options(sde, num_steps=num_steps, order=order, multistep=multistep,
                             algorithm=algorithm, spacing=spacing, eps=eps, sigma_min=sigma_min,
                             schedule=schedule, denoise=denoise, warmup=warmup,
                             lower_order_final=lower_order_final)
    data = algorithm == "dpmsolver++"
    name = f"dpm_solver ({algorithm}, order {order})"
    with Harness(score_fn, sde, shape, name=name, total=num_steps, **harness_options) as run:
        times, points = _grid(run, num_steps, spacing, eps, sigma_min, schedule)
        if multistep or order == 1:
            orders = final_orders(num_steps, order, lower_order_final)
            first_singlestep = order == 3 and warmup == "singlestep"
            x = _multistep_loop(run, times, points, orders, data, first_singlestep)
        else:
            x = _singlestep_loop(run, times, points, order, data)
        if denoise:
            x = final_denoise(run, x, points[-1].t, num_steps)
        return run.result(x)


def check_lower_order_final(lower_order_final) -> None:
    """ValueError naming ``lower_order_final`` unless it is True, False or None."""
    if lower_order_final is not None:
        check_bool("lower_order_final", lower_order_final)


def final_orders(num_steps: int, order: int, lower_order_final: bool | None) -> list[int]:
    """The order of each multistep step (DPM-Solver multistep, UniPC): min(order, i + 1)
    while the history fills and, for short runs (``lower_order_final``, see
    ``dpm_solver_sample``), at most num_steps - i at the end."""
    orders = [min(order, i + 1) for i in range(num_steps)]
    shortest = 1 if lower_order_final else LOWER_ORDER_FINAL_FROM
    if lower_order_final is not False and shortest <= num_steps < LOWER_ORDER_FINAL_BELOW:
        orders = [min(k, num_steps - i) for i, k in enumerate(orders)]
    return orders


def _multistep_loop(run: Harness, times, points, orders, data: bool, first_singlestep: bool):
    """Multistep DPM-Solver over the grid: one evaluation per step (+ 1 for a single-step
    second-order first step)."""
    x, history = run.x, []                         # model outputs at t_i, t_{i-1}, ...
    for i, k in enumerate(orders):
        s, t = points[i], points[i + 1]
        step = ExponentialStep(s, data)
        history.insert(0, model_output(run.schedule, x, times[i], s, data))
        del history[3:]
        if k == 1 and first_singlestep and i == 0:
            mid_t, mid = run.point_at_lam(s.lam + 0.5 * (t.lam - s.lam))
            x = singlestep_2(run, x, step, t, history[0], (mid_t, mid), 0.5, data)
        elif k == 1:
            x = combine(x, *step.first_order(t), history[:1])
        elif k == 2:
            x = combine(x, *step.multistep_2(t, s.lam - points[i - 1].lam), history[:2])
        else:
            h0, h1 = s.lam - points[i - 1].lam, points[i - 1].lam - points[i - 2].lam
            x = combine(x, *step.multistep_3(t, h0, h1), history[:3])
        x = run.step(i, x, t)
    return x


def _singlestep_loop(run: Harness, times, points, order: int, data: bool):
    """Single-step DPM-Solver-2 / -3 over the grid, with the intermediate points at
    lam_s + r h (r = 1/2, or 1/3 and 2/3) precomputed for every step."""
    rs = (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    lam = torch.tensor([p.lam for p in points], dtype=SCHEDULE_DTYPE)
    mids = [run.points(run.schedule.t_from_lam(lam[:-1] + r * (lam[1:] - lam[:-1])))
            for r in rs]
    x = run.x
    for i in range(len(points) - 1):
        s, t = points[i], points[i + 1]
        step = ExponentialStep(s, data)
        m0 = model_output(run.schedule, x, times[i], s, data)
        mid = [(m_times[i], m_points[i]) for m_times, m_points in mids]
        if order == 2:
            x = singlestep_2(run, x, step, t, m0, mid[0], rs[0], data)
        else:
            x = singlestep_3(run, x, step, t, m0, mid, rs, data)[0]
        x = run.step(i, x, t)
    return x


def singlestep_2(run: Harness, x, step: ExponentialStep, t: SchedulePoint, m0, mid,
                 r1: float, data: bool) -> torch.Tensor:
    """One single-step second-order step from s to t through ``mid`` = (times, point) at
    lam_s + r1 h (one evaluation)."""
    mid_t, mid_point = mid
    u = combine(x, *step.first_order(mid_point), [m0])
    m1 = model_output(run.schedule, u, mid_t, mid_point, data)
    return combine(x, *step.singlestep_2(t, r1), [m0, m1])


def singlestep_3(run: Harness, x, step: ExponentialStep, t: SchedulePoint, m0, mids, rs,
                 data: bool):
    """DPM-Solver-3 (DPM-Solver Alg. 2, r1 = 1/3, r2 = 2/3) and its data-prediction form
    (DPM-Solver++ App. A) from s to t, two evaluations at ``mids`` = [(times, point)] at
    lam_s + r1 h and lam_s + r2 h. Returns (x_t, m1), m1 for the adaptive solver's
    second-order estimate."""
    (t1, p1), (t2, p2) = mids
    r1, r2 = rs
    u1 = combine(x, *step.first_order(p1), [m0])
    m1 = model_output(run.schedule, u1, t1, p1, data)
    u2 = combine(x, *step.third_intermediate(p2, r1, r2), [m0, m1])
    m2 = model_output(run.schedule, u2, t2, p2, data)
    c_x, (c0, _, c2) = step.third_order(t, r2)
    return combine(x, c_x, [c0, c2], [m0, m2]), m1
