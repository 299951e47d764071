"""Fast deterministic / few-step samplers written through each SDE's Gaussian marginal:
DDIM (Song, Meng & Ermon 2021) and DPM-Solver / DPM-Solver++ of orders 1-3 (Lu et al. 2022,
"DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10
Steps", NeurIPS 2022; Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", arXiv:2211.01095).

Every SDE of sde_lib has the kernel x_t = alpha_t x_0 + std_t z (``sde.marginal_coeffs``), so
the score gives a data prediction and a noise prediction,

    x0_hat(x, t) = (x + std_t^2 score(x, t)) / alpha_t,     eps_hat(x, t) = -std_t score(x, t),

and the probability-flow ODE is solved exactly in its linear part in terms of the papers'
half log-SNR lambda_t = log(alpha_t / std_t) = sde.log_snr(t) / 2 (NOTE: half of our
``log_snr``). Hence the same code serves VP, sub-VP and VE (alpha = 1, std = sigma).

Time steps (``timesteps``): uniform in t, uniform in log-SNR (the papers' default), or the
Karras et al. (2022, "Elucidating the Design Space...", eq. 5) rho-schedule on the noise level
sigma = std / alpha = exp(-log_snr / 2), all mapped back to t with ``sde.t_from_log_snr``.

Schedules are float64; the loops make no host synchronisation per step (non-finite values
are checked every 50 steps by ``common.NonFiniteGuard``) and are vectorised over the batch.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch

from sde_lib import SCHEDULE_DTYPE, SDE, append_dims

from .common import (CountingScore, NonFiniteGuard, SampleResult, check_choice, check_eps,
                     check_int, check_real, initial_state,
                     progress_bar, std_normal_like)
from .ode import tweedie_denoise

__all__ = ["timesteps", "ddim_sample", "dpm_solver_sample", "SPACINGS", "DPM_ALGORITHMS",
           "WARMUPS", "data_prediction", "noise_prediction"]

#: Valid ``spacing`` names of ``timesteps``.
SPACINGS = ("logsnr", "uniform", "karras")
#: Valid ``warmup`` names of ``dpm_solver_sample`` (how multistep order 3 starts).
WARMUPS = ("lower_order", "singlestep")
#: Valid ``algorithm`` names of ``dpm_solver_sample``: data (++) or noise prediction.
DPM_ALGORITHMS = ("dpmsolver++", "dpmsolver")
#: ``dpm_solver_sample(lower_order_final=True)`` lowers the final multistep orders only for
#: runs of fewer steps than this (the official DPM-Solver / diffusers threshold).
LOWER_ORDER_FINAL_BELOW = 15


# ----- checks -------------------------------------------------------------------------------
# ----- time steps ---------------------------------------------------------------------------
def timesteps(sde: SDE, num_steps: int, *, spacing: str = "logsnr", eps: float = 1e-3,
              rho: float = 7.0, device=None) -> torch.Tensor:
    """Decreasing times T = t_0 > t_1 > ... > t_n = eps, (num_steps + 1,) float64.

    spacing:
        "uniform": uniform in t.
        "logsnr": uniform in lambda = sde.log_snr(t) between lambda(T) and lambda(eps)
            (DPM-Solver's "logSNR" skip type), t = sde.t_from_log_snr(lambda).
        "karras": sigma_i = (sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
            with sigma = exp(-lambda/2) = std/alpha, sigma_max = sigma(T), sigma_min = sigma(eps)
            (Karras et al. 2022, eq. 5), mapped back to t.
    The end points are exactly T and eps.
    """
    check_choice("spacing", spacing, SPACINGS)
    num_steps = check_int("num_steps", num_steps, 1)
    eps = check_eps(sde, eps)
    T = float(sde.T)
    ends = torch.tensor([T, eps], dtype=SCHEDULE_DTYPE, device=device)
    if spacing == "uniform":
        t = torch.linspace(T, eps, num_steps + 1, dtype=SCHEDULE_DTYPE, device=device)
    else:
        lam_T, lam_eps = sde.log_snr(ends).unbind(0)
        frac = torch.linspace(0.0, 1.0, num_steps + 1, dtype=SCHEDULE_DTYPE, device=device)
        if spacing == "logsnr":
            lam = lam_T + frac * (lam_eps - lam_T)
        else:
            rho = check_real("rho", rho, strict=True)
            # sigma^(1/rho) = exp(-lambda / (2 rho))
            lo, hi = torch.exp(-lam_eps / (2 * rho)), torch.exp(-lam_T / (2 * rho))
            sigma = (hi + frac * (lo - hi)) ** rho
            lam = -2.0 * torch.log(sigma)
        t = sde.t_from_log_snr(lam)
    t[0], t[-1] = T, eps
    return t


# ----- predictions from the score -----------------------------------------------------------
def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-d or (B,) coefficient, broadcastable against x (0-d tensors keep x's dtype)."""
    return append_dims(v.to(x.dtype), x.ndim) if v.ndim else v


def data_prediction(score: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
                    std: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x + std^2 score) / alpha (Tweedie's formula); alpha, std: 0-d or (B,)."""
    return (x + _per_sample(std, x) ** 2 * score) / _per_sample(alpha, x)


def noise_prediction(score: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """eps_hat = -std * score; std: 0-d or (B,)."""
    return -_per_sample(std, score) * score


class _Schedule:
    """float64 alpha, std and half log-SNR lambda = log(alpha / std) at given times."""

    def __init__(self, sde: SDE, t: torch.Tensor):
        self.t = t
        self.alpha, self.std = sde.marginal_coeffs(t)
        self.lam = 0.5 * sde.log_snr(t)


class _Model:
    """Score -> (data or noise) prediction at a 0-d float64 time, counting evaluations."""

    def __init__(self, counter: CountingScore, batch: int, data: bool):
        self.counter, self.batch, self.data = counter, batch, data

    def __call__(self, x: torch.Tensor, t, alpha, std) -> torch.Tensor:
        score = self.counter(x, t.expand(self.batch)).to(x.dtype)    # keep the state's dtype
        return data_prediction(score, x, alpha, std) if self.data else noise_prediction(score, std)


def _denoise(counter: CountingScore, sde: SDE, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The final Tweedie step at eps (``ode.tweedie_denoise``), in the state's dtype."""
    return tweedie_denoise(lambda y, t: counter(y, t).to(y.dtype), sde, x, eps)


def _setup(score_fn, sde, shape, num_steps, spacing, eps, generator, device, dtype, x_init):
    num_steps = check_int("num_steps", num_steps, 1)
    eps = check_eps(sde, eps)
    x = initial_state(sde, shape, generator=generator, device=device, dtype=dtype, x_init=x_init)
    t = timesteps(sde, num_steps, spacing=spacing, eps=eps, device=x.device)
    return num_steps, eps, x, t, CountingScore(score_fn)


# ----- DDIM ---------------------------------------------------------------------------------
def ddim_sample(score_fn: Callable, sde: SDE, shape, *, num_steps: int = 20, eta: float = 0.0,
                spacing: str = "logsnr", eps: float = 1e-3, denoise: bool = True,
                generator: torch.Generator | None = None, device=None,
                dtype: torch.dtype | None = None, x_init: torch.Tensor | None = None,
                progress: bool = False, callback: Callable | None = None) -> SampleResult:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) for any kernel x_t = alpha_t x_0 + std_t z.

    From time t to the next (smaller) time s, with x0_hat, eps_hat the predictions at (x, t):

        x_s = alpha_s x0_hat + sqrt(std_s^2 - sigma_eta^2) eps_hat + sigma_eta z,
        sigma_eta = eta * std_s * sqrt(1 - alpha_t^2 std_s^2 / (alpha_s^2 std_t^2))
                  = eta * std_s * sqrt(-expm1(log_snr(t) - log_snr(s))).

    With eta = 1 this is the exact posterior q(x_s | x_t, x_0 = x0_hat), whose variance is
    std_s^2 (1 - alpha_t^2 std_s^2 / (alpha_s^2 std_t^2)); for VP it is DDIM's eq. 16
    sigma = sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s). eta = 0 is deterministic
    and equals first-order DPM-Solver (DPM-Solver paper, Sec. 4.1 / DPM-Solver-1).

    Args:
        score_fn: ``score_fn(x, t)``, t a (B,) float64 tensor in [eps, T].
        sde, shape: the forward SDE; (B, *data_shape).
        num_steps: steps from T to eps (one score evaluation each).
        eta: stochasticity, >= 0 (1: ancestral / DDPM-like; 0: deterministic).
        spacing: "logsnr", "uniform" or "karras" (see ``timesteps``).
        eps: the last time; denoise: one more evaluation for the Tweedie step at eps.
        generator, device, dtype, x_init, progress: as in ``pc_sample``.
        callback: ``callback({"step": i, "t": t_next, "x": x})`` after every step.

    Returns: SampleResult(x, nfe) with nfe = num_steps (+ 1 if denoise).
    """
    eta = check_real("eta", eta)
    num_steps, eps, x, t, counter = _setup(score_fn, sde, shape, num_steps, spacing, eps,
                                           generator, device, dtype, x_init)
    sch = _Schedule(sde, t)
    # per-step coefficients (float64, on the device; no host syncs in the loop)
    std_s = sch.std[1:]
    # 2 (lam_t - lam_s) = log(alpha_t^2 std_s^2 / (alpha_s^2 std_t^2)) < 0
    sigma_eta = float(eta) * std_s * torch.sqrt(-torch.expm1(2.0 * (sch.lam[:-1] - sch.lam[1:])))
    noise_coef = torch.sqrt((std_s ** 2 - sigma_eta ** 2).clamp(min=0.0))
    model = _Model(counter, x.shape[0], data=True)
    guard = NonFiniteGuard(t[1:])
    bar = progress_bar(num_steps, progress, "ddim_sample")
    try:
        with torch.no_grad():
            for i in range(num_steps):
                alpha_t, std_t = sch.alpha[i], sch.std[i]
                x0 = model(x, t[i], alpha_t, std_t)
                eps_hat = (x - alpha_t * x0) / std_t
                x_new = sch.alpha[i + 1] * x0 + noise_coef[i] * eps_hat
                if eta > 0:
                    x_new = x_new + sigma_eta[i] * std_normal_like(x, generator)
                x = x_new
                guard.update(i, x)
                bar.update(1)
                if callback is not None:
                    callback({"step": i, "t": t[i + 1], "x": x})
            if denoise:
                x = _denoise(counter, sde, x, eps)
    finally:
        bar.close()
    return SampleResult(x=x, nfe=counter.nfe)


# ----- DPM-Solver(++) -----------------------------------------------------------------------
def dpm_solver_sample(score_fn: Callable, sde: SDE, shape, *, num_steps: int = 20, order: int = 2,
                      multistep: bool = True, algorithm: str = "dpmsolver++",
                      spacing: str = "logsnr", eps: float = 1e-3, denoise: bool = True,
                      warmup: str = "lower_order", lower_order_final: bool = True,
                      generator: torch.Generator | None = None, device=None,
                      dtype: torch.dtype | None = None, x_init: torch.Tensor | None = None,
                      progress: bool = False, callback: Callable | None = None) -> SampleResult:
    """DPM-Solver (noise prediction) / DPM-Solver++ (data prediction), orders 1-3.

    With lambda = log(alpha / std) (half of ``sde.log_snr``) and h = lambda_t - lambda_s for a
    step from s to t (t < s in time, lambda_t > lambda_s), the updates are the papers':

    order 1 (DPM-Solver eq. 3.7 / DPM-Solver++ eq. 4.1; both equal DDIM with eta = 0):
        noise: x_t = alpha_t/alpha_s x_s - std_t expm1(h) eps_s
        data:  x_t = std_t/std_s x_s - alpha_t expm1(-h) x0_s
    single-step (``multistep=False``), intermediate times at lambda_s + r h:
        order 2 (r1 = 1/2): DPM-Solver-2 (DPM-Solver Alg. 4 in App. / Alg. 1 with r1),
            DPM-Solver++(2S) (DPM-Solver++ Alg. 1);
        order 3 (r1 = 1/3, r2 = 2/3): DPM-Solver-3 (DPM-Solver Alg. 2 / App. A.5),
            and its data-prediction form (DPM-Solver++ App. / official code).
    multistep (``multistep=True``), previous predictions reused, 1 evaluation per step:
        order 2: DPM-Solver++(2M) (DPM-Solver++ Alg. 2) and its noise-prediction form;
        order 3: the third-order multistep method (3M) of DPM-Solver++ (App. B / the
            official code's ``multistep_dpm_solver_third_update``), with one correction: the
            second divided difference D2 carries the factor 2 of the Taylor term
            m''(lambda) tau^2 / 2, i.e. D2 ~ h^2 m'' (as the official single-step "taylor"
            variant has); the official multistep form, D2 ~ h^2 m'' / 2, measured only
            second order against the exact Gaussian flow (tests/test_fast.py).
        Warm-up (``warmup``): "lower_order" (the papers' and the default) starts with
        orders 1, 2 until enough history exists; a first-order first step has local error
        O(h^2), which bounds 3M's global order by 2 when that step matters (measured on VE).
        "singlestep" takes the first 3M step with the single-step second-order method (one
        more evaluation), which keeps 3M third order.
        Lower-order final steps (``lower_order_final``, on by default as in the official
        DPM-Solver code): with fewer than LOWER_ORDER_FINAL_BELOW = 15 steps (the official
        code's current threshold; older versions used 10), multistep step i (0-based) uses
        order min(order, num_steps - i): the last step is first order, the one before at
        most second order. Its purpose is stability with trained networks, whose outputs
        are least smooth at small t, where few-step grids take their longest extrapolations;
        on the exact score it costs accuracy (bench/README.md). It does not change
        single-step methods or runs of >= 15 steps.
    All phi functions use expm1 for accuracy when h is small.

    Args:
        order: 1, 2 or 3. multistep: multistep (1 NFE / step) or single-step (order NFE /
            step) methods. algorithm: "dpmsolver++" (data prediction, the better choice for
            few steps / guidance) or "dpmsolver" (noise prediction).
        num_steps: steps (outer steps for single-step methods); nfe = num_steps * (1 or
            order) (+ 1 with warmup="singlestep" and order 3 multistep) (+ 1 if denoise).
        warmup: "lower_order" or "singlestep", how multistep order 3 starts (see above).
        lower_order_final: lower orders for the last multistep steps when num_steps < 15.
        Others as in ``ddim_sample``. callback gets {"step", "t", "x"} after every step.
    """
    check_choice("algorithm", algorithm, DPM_ALGORITHMS)
    check_choice("warmup", warmup, WARMUPS)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    order = int(order)
    num_steps, eps, x, t, counter = _setup(score_fn, sde, shape, num_steps, spacing, eps,
                                           generator, device, dtype, x_init)
    data = algorithm == "dpmsolver++"
    lower_final = bool(lower_order_final) and num_steps < LOWER_ORDER_FINAL_BELOW
    model = _Model(counter, x.shape[0], data=data)
    sch = _Schedule(sde, t)
    guard = NonFiniteGuard(t[1:])
    bar = progress_bar(num_steps, progress, f"dpm_solver_sample ({algorithm}, order {order})")

    singlestep_start = multistep and order == 3 and warmup == "singlestep"
    if (not multistep and order > 1) or singlestep_start:
        # intermediate times at lambda_s + r h (r = 1/2, or 1/3 and 2/3)
        rs = (0.5,) if (order == 2 or singlestep_start) else (1.0 / 3.0, 2.0 / 3.0)
        h_all = sch.lam[1:] - sch.lam[:-1]
        mids = [_Schedule(sde, sde.t_from_log_snr(2.0 * (sch.lam[:-1] + r * h_all))) for r in rs]
    try:
        with torch.no_grad():
            history: list[torch.Tensor] = []        # model outputs at t_{i}, t_{i-1}, ...
            for i in range(num_steps):
                s_idx, t_idx = i, i + 1
                a_s, sd_s, l_s = sch.alpha[s_idx], sch.std[s_idx], sch.lam[s_idx]
                a_t, sd_t, l_t = sch.alpha[t_idx], sch.std[t_idx], sch.lam[t_idx]
                h = l_t - l_s
                m0 = model(x, t[s_idx], a_s, sd_s)
                if multistep or order == 1:
                    history.insert(0, m0)
                    del history[order:]
                    k = min(order, i + 1)
                    if lower_final:
                        k = min(k, num_steps - i)
                    if k == 1 and singlestep_start and i == 0:
                        x = _singlestep_2_step(x, m0, model, data, a_s, sd_s, a_t, sd_t, h,
                                               mids[0], i)
                    elif k == 1:
                        x = _first_order(x, m0, data, a_s, sd_s, a_t, sd_t, h)
                    else:
                        h0 = l_s - sch.lam[s_idx - 1]
                        if k == 2:
                            x = _multistep_2(x, history[0], history[1], data, a_s, sd_s, a_t,
                                             sd_t, h, h0)
                        else:
                            h1 = sch.lam[s_idx - 1] - sch.lam[s_idx - 2]
                            x = _multistep_3(x, history, data, a_s, sd_s, a_t, sd_t, h, h0, h1)
                elif order == 2:
                    x = _singlestep_2_step(x, m0, model, data, a_s, sd_s, a_t, sd_t, h,
                                           mids[0], i)
                else:
                    x = _singlestep_3(x, m0, model, data, a_s, sd_s, a_t, sd_t, h, mids, i)
                guard.update(i, x)
                bar.update(1)
                if callback is not None:
                    callback({"step": i, "t": t[t_idx], "x": x})
            if denoise:
                x = _denoise(counter, sde, x, eps)
    finally:
        bar.close()
    return SampleResult(x=x, nfe=counter.nfe)


def _first_order(x, m0, data, a_s, sd_s, a_t, sd_t, h):
    """DPM-Solver-1 (DPM-Solver eq. 3.7) / DPM-Solver++(1) (DPM-Solver++ eq. 4.1) from s to t."""
    if data:
        return (sd_t / sd_s) * x - (a_t * torch.expm1(-h)) * m0
    return (a_t / a_s) * x - (sd_t * torch.expm1(h)) * m0


def _multistep_2(x, m0, m1, data, a_s, sd_s, a_t, sd_t, h, h0):
    """Second-order multistep: DPM-Solver++(2M) (DPM-Solver++ Alg. 2, eq. of D_i with
    r = h_{i-1}/h_i) and the same construction with noise prediction:
    D = (1 + 1/(2r)) m0 - 1/(2r) m1, i.e. m0 + (m0 - m1) / (2 r)."""
    r = h0 / h
    d = m0 + (m0 - m1) / (2.0 * r)
    if data:
        return (sd_t / sd_s) * x - (a_t * torch.expm1(-h)) * d
    return (a_t / a_s) * x - (sd_t * torch.expm1(h)) * d


def _multistep_3(x, hist, data, a_s, sd_s, a_t, sd_t, h, h0, h1):
    """Third-order multistep ("3M", DPM-Solver++ App. B): divided differences of the last
    three outputs m0, m1, m2 (at lambda_s, lambda_s - h0, lambda_s - h0 - h1), r0 = h0/h,
    r1 = h1/h:  D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) ~ h m'(lambda_s),
    D2 = 2 (D1_0 - D1_1)/(r0 + r1) ~ h^2 m''(lambda_s)  (the official code omits the 2),
    and the exact integrals of e^{-+(h - tau)} tau^k / k!:
      data:  x_t = std_t/std_s x - alpha_t phi_1 m0 + alpha_t phi_2 D1 - alpha_t phi_3 D2,
             phi_1 = expm1(-h), phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2;
      noise: x_t = alpha_t/alpha_s x - std_t (phi_1 m0 + phi_2 D1 + phi_3 D2),
             phi_1 = expm1(h), phi_2 = phi_1/h - 1, phi_3 = phi_2/h - 1/2."""
    m0, m1, m2 = hist[0], hist[1], hist[2]
    r0, r1 = h0 / h, h1 / h
    d1_0 = (m0 - m1) / r0
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
    if data:
        phi_1 = torch.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return (sd_t / sd_s) * x - (a_t * phi_1) * m0 + (a_t * phi_2) * d1 - (a_t * phi_3) * d2
    phi_1 = torch.expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return (a_t / a_s) * x - (sd_t * phi_1) * m0 - (sd_t * phi_2) * d1 - (sd_t * phi_3) * d2


def _singlestep_2_step(x, m0, model, data, a_s, sd_s, a_t, sd_t, h, mid, i):
    """One single-step second-order step from s to t through lambda_s + h/2 (one evaluation)."""
    r1 = 0.5
    u = _first_order(x, m0, data, a_s, sd_s, mid.alpha[i], mid.std[i], r1 * h)
    m1 = model(u, mid.t[i], mid.alpha[i], mid.std[i])
    return _singlestep_2(x, m0, m1, data, a_s, sd_s, a_t, sd_t, h, r1)


def _singlestep_2(x, m0, m1, data, a_s, sd_s, a_t, sd_t, h, r1):
    """DPM-Solver-2 (DPM-Solver Alg. 1 with r1; the "DPM-Solver" form) and DPM-Solver++(2S)
    (DPM-Solver++ Alg. 1): x_t = x_t^(1) - coef / (2 r1) (m1 - m0)."""
    if data:
        phi_1 = torch.expm1(-h)
        return (sd_t / sd_s) * x - (a_t * phi_1) * m0 - (a_t * phi_1 / (2.0 * r1)) * (m1 - m0)
    phi_1 = torch.expm1(h)
    return (a_t / a_s) * x - (sd_t * phi_1) * m0 - (sd_t * phi_1 / (2.0 * r1)) * (m1 - m0)


def _singlestep_3(x, m0, model, data, a_s, sd_s, a_t, sd_t, h, mids, i):
    """DPM-Solver-3 (DPM-Solver Alg. 2 / App. A.5, r1 = 1/3, r2 = 2/3) and its data-prediction
    counterpart (DPM-Solver++ App. A; official ``singlestep_dpm_solver_third_update``)."""
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s1, s2 = mids
    a1, sd1, a2, sd2 = s1.alpha[i], s1.std[i], s2.alpha[i], s2.std[i]
    if data:
        phi_11 = torch.expm1(-r1 * h)
        phi_12 = torch.expm1(-r2 * h)
        phi_1 = torch.expm1(-h)
        phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.0
        phi_2 = phi_1 / h + 1.0
        u1 = (sd1 / sd_s) * x - (a1 * phi_11) * m0
        m1 = model(u1, s1.t[i], a1, sd1)
        u2 = (sd2 / sd_s) * x - (a2 * phi_12) * m0 + (r2 / r1 * a2 * phi_22) * (m1 - m0)
        m2 = model(u2, s2.t[i], a2, sd2)
        return (sd_t / sd_s) * x - (a_t * phi_1) * m0 + (a_t * phi_2 / r2) * (m2 - m0)
    phi_11 = torch.expm1(r1 * h)
    phi_12 = torch.expm1(r2 * h)
    phi_1 = torch.expm1(h)
    phi_22 = torch.expm1(r2 * h) / (r2 * h) - 1.0
    phi_2 = phi_1 / h - 1.0
    u1 = (a1 / a_s) * x - (sd1 * phi_11) * m0
    m1 = model(u1, s1.t[i], a1, sd1)
    u2 = (a2 / a_s) * x - (sd2 * phi_12) * m0 - (r2 / r1 * sd2 * phi_22) * (m1 - m0)
    m2 = model(u2, s2.t[i], a2, sd2)
    return (a_t / a_s) * x - (sd_t * phi_1) * m0 - (sd_t * phi_2 / r2) * (m2 - m0)
