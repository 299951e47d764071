"""Probability-flow ODE sampler (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", Sec. 4.3 and App. D) and the ODE machinery it shares with
the likelihood (``samplers/likelihood.py``).

Every SDE in sde_lib has a deterministic process with the same marginals p_t (eq. 13):

    dx/dt = v(x, t) = f(x, t) - g(t)^2 / 2 * grad_x log p_t(x),

whose drift is ``sde.reverse(x, t, score, probability_flow=True)`` (``sde_lib.reverse_drift``).
``ode_sample`` integrates it from x_T ~ prior at t = T down to t = eps.

Solvers (``ODE_METHODS``):

* adaptive torchdiffeq Runge-Kutta methods ("dopri5", "bosh3", "adaptive_heun", "fehlberg2",
  "dopri8"), with the step clipped to land exactly on the end time (torchdiffeq's ``step_t``)
  instead of stepping past it and interpolating back;
* fixed-grid torchdiffeq methods ("euler", "midpoint", "heun2", "heun3", "rk4") on
  ``num_steps`` steps uniform in t (``common.time_grid``);
* "scipy_rk45": ``scipy.integrate.solve_ivp(method="RK45")`` on the flattened float64 state,
  the solver of the Score SDE paper's code. Only this option moves the state to the host.

The score is never evaluated outside [eps, T]: apart from the step clipping, the ODE function
clamps t into [eps, T], which matters for the first-step-size probe of torchdiffeq (its trial
time t0 + h0 can lie anywhere) and for float32 rounding of eps.

Times are float64 (B,) tensors on the data's device when they reach ``score_fn``. The torch
path adds no host synchronisation per function evaluation: non-finite derivatives are
recorded on the device and checked once at the end (the adaptive torchdiffeq solvers do read
their error estimate on the host at every step; that is inherent to adaptive stepping).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torchdiffeq import odeint

from sde_lib import SCHEDULE_DTYPE, SDE, check_bool, check_choice, check_int, check_real

from .harness import Harness, SampleResult, check_eps, time_grid

__all__ = ["ode_sample", "check_ode_options", "probability_flow_velocity", "integrate",
           "ODE_METHODS", "ADAPTIVE_METHODS", "FIXED_GRID_METHODS", "SCIPY_METHODS",
           "DEFAULT_NUM_STEPS", "ode_time_grid"]

#: Adaptive Runge-Kutta methods of torchdiffeq (embedded error estimate, rtol / atol).
ADAPTIVE_METHODS = ("dopri5", "bosh3", "adaptive_heun", "fehlberg2", "dopri8")
#: Fixed-grid methods of torchdiffeq -> score evaluations per step.
FIXED_GRID_METHODS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
#: Host (scipy) solvers -> scipy.integrate.solve_ivp method name.
SCIPY_METHODS = {"scipy_rk45": "RK45"}
#: Every valid ``method`` name.
ODE_METHODS = (*ADAPTIVE_METHODS, *FIXED_GRID_METHODS, *SCIPY_METHODS)
#: Steps of the fixed-grid methods when ``num_steps`` is not given.
DEFAULT_NUM_STEPS = 100


# ----- checks -------------------------------------------------------------------------------
def check_ode_options(sde: SDE, *, method="dopri5", rtol=1e-5, atol=1e-5, eps=1e-3,
                      num_steps=None, denoise=None) -> int | None:
    """Validate the solver options shared by ode_sample and log_likelihood (ValueError
    naming the option).

    Returns the number of steps for a fixed-grid method (default ``DEFAULT_NUM_STEPS``) and
    None for adaptive ones (which take rtol / atol instead and refuse ``num_steps``).
    """
    check_choice("method", method, ODE_METHODS)
    check_real("rtol", rtol, strict=True)
    check_real("atol", atol, strict=True)
    check_eps(sde, eps)
    if denoise is not None:
        check_bool("denoise", denoise)
    if method in FIXED_GRID_METHODS:
        return check_int("num_steps", DEFAULT_NUM_STEPS if num_steps is None else num_steps)
    if num_steps is not None:
        raise ValueError(f"num_steps applies to the fixed-grid methods "
                         f"({', '.join(FIXED_GRID_METHODS)}); method {method!r} chooses its "
                         "own steps from rtol and atol")
    return None


# ----- the vector field ---------------------------------------------------------------------
def probability_flow_velocity(score_fn: Callable, sde: SDE, x: torch.Tensor,
                              t: torch.Tensor) -> torch.Tensor:
    """v(x, t) = f(x, t) - g(t)^2 / 2 * score(x, t), the probability-flow ODE (eq. 13).

    x: (B, ...); t: (B,) times. Uses the shared reverse drift of ``SDE.reverse``.
    """
    return sde.reverse(x, t, score_fn(x, t), probability_flow=True)[0]


# ----- the integrator -----------------------------------------------------------------------
class _NonFiniteRecord:
    """Remembers, on the device, the first evaluation time at which the derivative stopped
    being finite; ``check`` reads it on the host once, at the end of the solve.

    A non-finite derivative in a trial step that the adaptive solver rejects and recovers
    from is not an error; one is raised when the solve fails or its result is not finite.
    """

    def __init__(self, what: str):
        self.what = what
        self.first_bad = None

    def update(self, t64: torch.Tensor, outputs) -> None:
        finite = torch.stack([torch.isfinite(o).all() for o in outputs]).all()
        marker = torch.where(finite, torch.full_like(t64, math.nan), t64)
        if self.first_bad is None:
            self.first_bad = marker
        else:
            self.first_bad = torch.where(torch.isnan(self.first_bad), marker, self.first_bad)

    def check(self, final=None) -> None:
        """After a failed solve (final=None) or on its result: raise FloatingPointError if the
        solve failed after non-finite derivatives, or if the result is not finite."""
        if final is not None and bool(torch.stack([torch.isfinite(f).all() for f in final]).all()):
            return                                             # the one host sync
        bad_t = math.nan if self.first_bad is None else float(self.first_bad)
        if final is None and math.isnan(bad_t):
            return
        where = "in the final state" if math.isnan(bad_t) else f"at t={bad_t:.6g}"
        raise FloatingPointError(
            f"{self.what}: the probability-flow ODE produced non-finite values {where}; "
            "check the score model (and the input data) or tighten rtol / atol")


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


def ode_time_grid(sde: SDE, num_steps: int, eps: float, *, increasing: bool = False,
                  device=None) -> torch.Tensor:
    """The fixed-grid methods' num_steps + 1 times, uniform in t between T and eps (float64):
    ``harness.time_grid`` (T down to eps), reversed when integrating upwards (likelihoods)."""
    grid = time_grid(sde, num_steps + 1, eps, device=device)
    return grid.flip(0) if increasing else grid


def integrate(field: Callable, y0, *, t_start: float, t_end: float, method: str, rtol: float,
              atol: float, grid: torch.Tensor | None, t_min: float, t_max: float,
              on_eval: Callable | None = None, what: str = "ode"):
    """Integrate dy/dt = field(y, t) from t_start to t_end and return y(t_end).

    Args:
        field: ``field(y, t)`` with y a tensor or a tuple of tensors (the state) and t a 0-d
            float64 tensor on the state's device, already clamped into [t_min, t_max];
            returns the derivative, shaped like y.
        y0: initial state (tensor or tuple of tensors of one dtype and device).
        t_start, t_end: the integration interval (either direction).
        method: one of ODE_METHODS; rtol, atol: tolerances of the adaptive ones.
        grid: the fixed-grid methods' times, from t_start to t_end (``ode_time_grid``).
        t_min, t_max: the times field may be evaluated at.
        on_eval: ``on_eval(t, y)`` after every evaluation (progress bars, callbacks).
        what: the caller's name, for error messages.
    """
    record = _NonFiniteRecord(what)
    low, high = float(t_min), float(t_max)
    is_tuple = isinstance(y0, tuple)

    def evaluate(t64, y):
        dy = field(y, t64)
        record.update(t64, _as_tuple(dy))
        if on_eval is not None:
            on_eval(t64, y)
        return dy

    if method in SCIPY_METHODS:
        y1 = _integrate_scipy(evaluate, y0, t_start, t_end, SCIPY_METHODS[method], rtol, atol,
                              low, high, what, record)
        record.check(final=_as_tuple(y1))
        return y1

    first = _as_tuple(y0)[0]
    device = first.device

    def func(t, y):  # torchdiffeq calls func(t, y) with t a 0-d tensor (maybe in y's dtype)
        t64 = t.detach().to(SCHEDULE_DTYPE).clamp(low, high)
        return evaluate(t64, y)

    times = torch.tensor([t_start, t_end], dtype=SCHEDULE_DTYPE, device=device)
    if method in FIXED_GRID_METHODS:
        grid = grid.to(device=device, dtype=SCHEDULE_DTYPE)
        if grid.ndim != 1 or len(grid) < 2 or grid[0] != t_start or grid[-1] != t_end:
            raise ValueError(f"the time grid must run from {t_start} to {t_end}")
        options = {"grid_constructor": lambda f, y, t: grid}
    else:
        # Land exactly on t_end instead of stepping past it and interpolating back.
        options = {"step_t": torch.tensor([t_end], dtype=SCHEDULE_DTYPE, device=device)}
    try:
        solution = odeint(func, y0, times, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError:
        # torchdiffeq asserts on non-finite states ("underflow in dt" after a NaN error ratio)
        record.check()
        raise
    y1 = tuple(s[-1] for s in solution) if is_tuple else solution[-1]
    record.check(final=_as_tuple(y1))
    return y1


def _integrate_scipy(evaluate, y0, t_start, t_end, scipy_method, rtol, atol, low, high, what,
                     record):
    """``solve_ivp`` on the flattened float64 state (the Score SDE code's likelihood solver)."""
    parts = _as_tuple(y0)
    shapes = [p.shape for p in parts]
    sizes = [p.numel() for p in parts]
    dtype, device = parts[0].dtype, parts[0].device

    def unflatten(flat: np.ndarray):
        chunks = np.split(flat, np.cumsum(sizes)[:-1])
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(c)).reshape(s).to(device, dtype)
                        for c, s in zip(chunks, shapes))
        return tensors if isinstance(y0, tuple) else tensors[0]

    def fun(t, flat):
        t = min(max(float(t), low), high)
        t64 = torch.tensor(t, dtype=SCHEDULE_DTYPE, device=device)
        dy = evaluate(t64, unflatten(flat))
        return np.concatenate([d.detach().to("cpu", torch.float64).numpy().reshape(-1)
                               for d in _as_tuple(dy)])

    flat0 = np.concatenate([p.detach().to("cpu", torch.float64).numpy().reshape(-1) for p in parts])
    sol = solve_ivp(fun, (t_start, t_end), flat0, method=scipy_method, rtol=rtol, atol=atol)
    if sol.status != 0:
        record.check()              # failed after non-finite derivatives: FloatingPointError
        raise RuntimeError(f"{what}: scipy solve_ivp({scipy_method}) failed: {sol.message}")
    return unflatten(sol.y[:, -1])


# ----- the sampler --------------------------------------------------------------------------
def ode_sample(score_fn: Callable, sde: SDE, shape, *, method: str = "dopri5", rtol: float = 1e-5,
               atol: float = 1e-5, eps: float = 1e-3, num_steps: int | None = None,
               denoise: bool = False, **harness_options) -> SampleResult:
    """Sample by integrating the probability-flow ODE (Song et al. 2021, eq. 13) from T to eps.

        x_T ~ prior (``sde.prior_sampling``), dx/dt = f(x, t) - g(t)^2 / 2 * score(x, t),

    solved backwards in time with ``method`` (see ``ODE_METHODS``), optionally followed by one
    Tweedie denoising step at eps (``denoise``): x_0 = (x + std(eps)^2 score(x, eps)) / alpha(eps).

    Args:
        score_fn: ``score_fn(x, t)`` with t a (B,) float64 tensor in [eps, T].
        sde: the forward SDE.
        shape: (B, *data_shape) of the samples.
        method: adaptive ("dopri5", "bosh3", "adaptive_heun", "fehlberg2", "dopri8"),
            fixed-grid ("euler", "midpoint", "heun2", "heun3", "rk4") or "scipy_rk45".
        rtol, atol: tolerances of the adaptive methods (ignored by the fixed-grid ones).
        eps: the end time of the ODE (the smallest time the score is evaluated at).
        num_steps: steps of the fixed-grid methods, uniform in t (default 100); not allowed
            for the adaptive methods.
        denoise: apply the Tweedie denoising step at eps (one more score evaluation).
        harness_options: generator, device, dtype, x_init, progress, callback; the callback
            is called after every evaluation of the ODE function (step = its index).

    Returns:
        SampleResult(x, nfe): samples in the state's dtype, and the number of (batched) score
        evaluations.

    Raises:
        ValueError: unknown method (the message lists the valid ones) or bad options.
        FloatingPointError: the ODE produced non-finite values (the message gives the time).
    """
    num_steps = check_ode_options(sde, method=method, rtol=rtol, atol=atol, eps=eps,
                                  num_steps=num_steps, denoise=denoise)
    total = None if num_steps is None else num_steps * FIXED_GRID_METHODS[method]
    with Harness(score_fn, sde, shape, name=f"ode ({method})", total=total,
                 **harness_options) as run:
        grid = None if num_steps is None else ode_time_grid(sde, num_steps, eps,
                                                            device=run.x.device)
        evaluations = 0

        constraint = _constraint(run)

        def field(y, t64):
            if constraint is not None:     # an inverse problem: the known part on its path
                y = constraint.constrain(y, run.schedule.at(t64))
                return constraint.free(probability_flow_velocity(run.counter, sde, y,
                                                                 t64.expand(run.batch)))
            return probability_flow_velocity(run.counter, sde, y, t64.expand(run.batch))

        def on_eval(t64, y):
            nonlocal evaluations
            run.step(evaluations, y, run.schedule.at(t64) if run.callback else None, guard=False,
                     project=False)
            evaluations += 1

        x = integrate(field, run.x, t_start=float(sde.T), t_end=float(eps), method=method,
                      rtol=rtol, atol=atol, grid=grid, t_min=float(eps), t_max=float(sde.T),
                      on_eval=on_eval, what="ode_sample")
        end = run.schedule.at(torch.tensor(eps, dtype=SCHEDULE_DTYPE, device=x.device))
        if constraint is not None:
            x = constraint.constrain(x, end)
        if denoise:
            x = run.schedule.denoise(x, end)
        return run.result(x)


def _constraint(run: Harness):
    """The harness's projection as a constraint of the vector field: ``constrain(x, point)``
    puts the known part on a fixed path (one noise draw for the whole solve, so the field is
    smooth in t) and ``free(v)`` zeroes the known part of a velocity. A projection without
    them (a plain callable) cannot act inside an ODE solve."""
    projection = run.projection
    if projection is None:
        return None
    if not (hasattr(projection, "constrain") and hasattr(projection, "free")):
        raise ValueError("ode_sample applies a projection inside the vector field and needs "
                         "one with constrain(x, point) and free(v) (samplers.inverse."
                         "Replacement); use another sampler for a plain projection callable")
    projection.fix_noise(run.x, run.generator)
    return projection
