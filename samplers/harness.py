"""The one sampler harness, and the schedule view every sampler steps along.

``Schedule`` is a view over (sde, score_fn): it converts between time t, noise level
sigma = std / alpha and half log-SNR lambda = log(alpha / std) (half of ``sde.log_snr``),
gives alpha and std as ``SchedulePoint``s, and turns a score into the data prediction
(Tweedie's formula) and the noise prediction. It is the only place that writes Tweedie.

``Harness`` is what is common to running any sampler:

    with Harness(score_fn, sde, shape, name="ddim", total=n, **harness_options) as run:
        x = run.x                                   # x_T ~ prior (or x_init)
        for i in range(n):
            ...                                     # the sampler's update of x
            x = run.step(i, x, grid[i + 1])         # projection, non-finite guard, progress, callback
        return run.result(x)                        # SampleResult(x, nfe)

It draws the prior, counts score evaluations (NFE) at the score function, records
non-finite states on the device and checks them on the host every ``check_every`` steps
(no per-step synchronisation), runs everything under ``torch.no_grad``, shows a progress
bar, and calls ``callback`` with one payload for every sampler::

    {"step": k, "t": t, "sigma": sigma (floats: where x is after step k),
     "x": the state after step k, "denoised": the data prediction of the step}

``denoised`` is the sampler's own data prediction when it has one (DPM-Solver++, EDM),
else Tweedie's formula applied to the last score evaluation of the step.

Harness options (keyword arguments of every sampler): ``generator`` (for every random
draw; its device is the sampling device), ``device``, ``dtype`` (of x_T), ``x_init`` (start
from this x_T), ``progress``, ``callback`` and ``projection``.

Conditioning goes through the harness in two ways. A transformed score (guidance, the
gradient method of inverse problems: ``samplers.guidance``, ``samplers.inverse``) is just
another ``score_fn``. A ``projection(x, point, noise) -> x`` (replacement of the known part of
an inverse problem, ``samplers.inverse.Replacement``) is applied by ``run.step`` to the state
after every step, at the schedule point the state is at (``noise()`` draws z ~ N(0, I) like x
from the sampler's generator), and by ``run.result`` at ``DATA_POINT`` (t = 0) to the output;
samplers use the state ``run.step`` returns. Samplers with inner steps (PC's corrector, ALD's
Langevin steps) call ``run.project`` after them too; the probability-flow ODE, which has no
steps of its own, applies ``projection.constrain`` inside its vector field instead.
"""
from __future__ import annotations

import inspect
import logging
import math
import sys
import time
import typing
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from sde_lib import SCHEDULE_DTYPE, SDE, append_dims, check_int, check_time

__all__ = ["SampleResult", "CountingScore", "SchedulePoint", "Schedule", "Harness",
           "HARNESS_OPTIONS", "initial_state", "progress_bar", "std_normal_like", "check_eps",
           "time_grid", "check_generator", "Sampler", "DATA_POINT", "check_sigma_min",
           "end_time"]

log = logging.getLogger("samplers")

#: The keyword arguments every sampler takes for the harness (not sampler options).
HARNESS_OPTIONS = ("generator", "device", "dtype", "x_init", "progress", "callback",
                   "projection")


@dataclass
class SampleResult:
    """x: the samples (B, ...); nfe: the number of (batched) score evaluations made."""
    x: torch.Tensor
    nfe: int


class CountingScore:
    """Wraps ``score_fn(x, t)``, counts its calls, checks the first output's shape and keeps
    the last evaluation (x, t, score) for the callback's ``denoised``."""

    def __init__(self, score_fn: Callable):
        self.score_fn = score_fn
        self.nfe = 0
        self.last = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        output = self.score_fn(x, t)
        # a learned-variance network's score_and_variance returns (score, v)
        score = output[0] if isinstance(output, tuple) else output
        if self.nfe == 0 and score.shape != x.shape:
            raise ValueError(f"score_fn returned shape {tuple(score.shape)} for x of shape "
                             f"{tuple(x.shape)}; it must return a tensor shaped like x")
        self.nfe += 1
        self.last = (x, t, score)
        return output


# ----- the schedule view --------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulePoint:
    """Points of the noise schedule: times t with the kernel's alpha(t) and std(t) and the
    half log-SNR lam = log(alpha / std) (= sde.log_snr(t) / 2, the DPM-Solver papers'
    lambda). Either float64 tensors of one shape (0-d for one point, (n,) for a grid) or, for
    a point of a precomputed grid (``tolist``), Python floats that cost no kernel launch."""
    t: torch.Tensor | float
    alpha: torch.Tensor | float
    std: torch.Tensor | float
    lam: torch.Tensor | float

    @property
    def sigma(self):
        """The noise level std / alpha (the VE-equivalent sigma of Karras et al. 2022)."""
        return self.std / self.alpha

    def __getitem__(self, index) -> "SchedulePoint":
        return SchedulePoint(self.t[index], self.alpha[index], self.std[index], self.lam[index])

    def __len__(self) -> int:
        return len(self.t)

    def tolist(self) -> list["SchedulePoint"]:
        """The points of a grid with Python-float fields (one host transfer in all), for
        the coefficients of a sampler's loop."""
        rows = torch.stack([self.t, self.alpha, self.std, self.lam]).tolist()
        return [SchedulePoint(*values) for values in zip(*rows)]


#: The data end of every schedule (t = 0, alpha = 1, std = sigma = 0): where the final
#: denoising step of a sampler puts its output.
DATA_POINT = SchedulePoint(t=0.0, alpha=1.0, std=0.0, lam=math.inf)


class Schedule:
    """The schedule view over (sde, score_fn): conversions and predictions.

    All conversions are float64; predictions are in the state's dtype. ``score_fn`` may be
    None for a view used only for conversions (time grids).
    """

    def __init__(self, sde: SDE, score_fn: Callable | None = None):
        self.sde, self.score_fn = sde, score_fn

    # conversions t <-> sigma <-> log-SNR
    def at(self, t) -> SchedulePoint:
        """The point(s) at times t (a float or tensor; float64)."""
        t = torch.as_tensor(t, dtype=SCHEDULE_DTYPE)
        alpha, std = self.sde.marginal_coeffs(t)
        return SchedulePoint(t, alpha, std, 0.5 * self.sde.log_snr(t))

    def t_from_sigma(self, sigma) -> torch.Tensor:
        """The time at which std / alpha = sigma > 0: t = t_from_log_snr(-2 log sigma)."""
        return self.sde.t_from_log_snr(-2.0 * torch.log(torch.as_tensor(sigma, dtype=SCHEDULE_DTYPE)))

    def t_from_lam(self, lam) -> torch.Tensor:
        """The time at which the half log-SNR is lam."""
        return self.sde.t_from_log_snr(2.0 * torch.as_tensor(lam, dtype=SCHEDULE_DTYPE))

    def at_sigma(self, sigma) -> SchedulePoint:
        return self.at(self.t_from_sigma(sigma))

    def at_lam(self, lam) -> SchedulePoint:
        return self.at(self.t_from_lam(lam))

    # predictions
    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """score_fn(x, t) for t (B,) (or 0-d or a float, expanded to float64 (B,)), in x's
        dtype."""
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), t, dtype=SCHEDULE_DTYPE, device=x.device)
        elif t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.score_fn(x, t).to(x.dtype)

    @staticmethod
    def tweedie_coefficients(alpha, std):
        """(1 / alpha, std^2 / alpha): Tweedie's formula (Efron 2011) E[x_0 | x_t] =
        (x + std^2 score) / alpha as the coefficients of x and of the score. The one Tweedie
        of the code base (``tweedie`` and the DPM-Solver outputs use it)."""
        return 1.0 / alpha, std ** 2 / alpha

    @staticmethod
    def tweedie(x: torch.Tensor, score: torch.Tensor, alpha, std) -> torch.Tensor:
        """E[x_0 | x_t] from x (B, ...) and its score, with alpha, std floats or 0-d / (B,)
        tensors (``tweedie_coefficients``). With floats: two passes over x (one if alpha = 1)."""
        if torch.is_tensor(alpha):
            if alpha.ndim:
                alpha, std = (append_dims(v.to(x.dtype), x.ndim) for v in (alpha, std))
            c_x, c_score = Schedule.tweedie_coefficients(alpha, std)
            return x * c_x + score * c_score
        c_x, c_score = Schedule.tweedie_coefficients(alpha, std)
        x0 = torch.add(x, score, alpha=std ** 2)
        return x0 if alpha == 1.0 else x0.mul_(c_x)

    def denoise(self, x: torch.Tensor, point: SchedulePoint, score: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The data prediction x0_hat at ``point`` (one score evaluation unless given)."""
        if score is None:
            score = self.score(x, point.t)
        return self.tweedie(x, score, _cast(point.alpha, x), _cast(point.std, x))

    def noise(self, x: torch.Tensor, point: SchedulePoint, score: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The noise prediction eps_hat = -std score at ``point``."""
        if score is None:
            score = self.score(x, point.t)
        return -_cast(point.std, x) * score


def _cast(v, x: torch.Tensor):
    """A float, 0-d or (B,) schedule value, broadcastable against x (0-d keeps x's dtype)."""
    return append_dims(v.to(x.dtype), x.ndim) if torch.is_tensor(v) and v.ndim else v


# ----- the harness --------------------------------------------------------------------------
def check_eps(sde: SDE, eps) -> float:
    """The smallest sampling time as a float, or a ValueError when it is not in (0, T)."""
    return check_time("eps (the smallest sampling time)", eps, sde.T)


def check_sigma_min(sde: SDE, sigma_min) -> float:
    """The time at which sigma(t) = std / alpha = ``sigma_min``, or a one-line ValueError
    naming sigma_min when it is not a number strictly between sigma(0) (the SDE's noise
    level at t -> 0: 0 for VP and sub-VP, its sigma_min for VE) and sigma(T)."""
    ok = (not isinstance(sigma_min, bool) and isinstance(sigma_min, (int, float))
          and math.isfinite(sigma_min) and sigma_min > 0)
    ends = torch.tensor([0.0, float(sde.T)], dtype=SCHEDULE_DTYPE)
    with torch.no_grad():
        low, high = torch.exp(-0.5 * sde.log_snr(ends)).tolist()
    t = float(Schedule(sde).t_from_sigma(float(sigma_min))) if ok else math.nan
    if not (ok and low < sigma_min < high and 0.0 < t < sde.T):
        raise ValueError(f"sigma_min (the last noise level std/alpha) must be a number in "
                         f"({low:.4g}, {high:.4g}) for {type(sde).__name__}, got {sigma_min!r}")
    return t


def end_time(sde: SDE, eps, sigma_min=None) -> float:
    """The last time of a few-step sampler's grid: ``eps``, or with ``sigma_min`` (not None)
    the time at which sigma(t) = std / alpha = sigma_min (``check_sigma_min``)."""
    eps = check_eps(sde, eps)
    return eps if sigma_min is None else check_sigma_min(sde, sigma_min)


def time_grid(sde: SDE, num_steps: int, eps: float, device=None) -> torch.Tensor:
    """Decreasing times T = t_0 > ... > t_{n-1} = eps, uniform in t; (num_steps,) float64.

    The grid of the Score SDE PC samplers (linspace(T, eps, N)); the step is (T - eps)/(n-1).
    """
    eps = check_eps(sde, eps)
    num_steps = check_int("num_steps", num_steps, 2)
    return torch.linspace(sde.T, eps, num_steps, dtype=SCHEDULE_DTYPE, device=device)


def check_generator(generator: torch.Generator | None, device) -> None:
    """A ValueError when ``generator`` is not on the device type the draws are made on."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the work runs on {device}: "
                         f"create it with torch.Generator(device={str(device)!r})")


def initial_state(sde: SDE, shape, *, generator: torch.Generator | None, device,
                  dtype: torch.dtype | None, x_init: torch.Tensor | None = None) -> torch.Tensor:
    """x_T ~ prior (or ``x_init``), after checking the shape and the device of the generator."""
    shape = tuple(shape)
    if len(shape) < 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"shape must be (batch, *data_shape) of positive integers, got {shape}")
    if device is None:
        device = generator.device if generator is not None else (
            x_init.device if x_init is not None else torch.device("cpu"))
    device = torch.device(device)
    check_generator(generator, device)
    if x_init is not None:
        if tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {shape}")
        return x_init.to(device=device, dtype=dtype or x_init.dtype)
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)


def std_normal_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, on x's device and in x's dtype."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class _LogProgress:
    """A progress report for output that is not a terminal: one log line at most every
    ``interval`` seconds (and at the end), instead of a bar's carriage-return updates."""

    def __init__(self, total: int | None, desc: str, interval: float = 30.0):
        self.total, self.desc, self.interval = total, desc, interval
        self.n, self.start = 0, time.monotonic()
        self.last, self.reported = self.start, 0
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._report(now)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def _report(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        log.info("%s: %d%s (%.0f s) %s", self.desc, self.n, of, now - self.start, self.postfix)
        self.reported = self.n

    def close(self) -> None:
        """A last line for a run that took over ``interval`` seconds, unless it was just
        reported."""
        if self.n != self.reported and time.monotonic() - self.start >= self.interval:
            self._report(time.monotonic())


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, enabled: bool, desc: str, unit: str = "step", initial: int = 0):
    """A tqdm bar on a terminal; in a log file (stderr not a terminal) a log line every 30 s,
    so files stay readable; nothing when not ``enabled``."""
    if not enabled:
        return _NoProgress()
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, initial=initial)
    progress = _LogProgress(total, desc)
    progress.n = initial
    return progress


class _NonFiniteGuard:
    """Records, on the device, x.sum() after every step (NaN / inf anywhere makes it
    non-finite) and checks the record on the host every ``check_every`` steps."""

    def __init__(self, name: str, check_every: int):
        self.name, self.check_every = name, check_every
        self.sums, self.where = [], []

    def update(self, step, x: torch.Tensor, point) -> None:
        self.sums.append(x.sum())
        self.where.append((step, point))
        if len(self.sums) >= self.check_every:
            self.check()

    def check(self) -> None:
        if not self.sums:
            return
        finite = torch.isfinite(torch.stack(self.sums)).tolist()         # the one sync
        if not all(finite):
            step, point = self.where[finite.index(False)]
            at = "" if point is None else f" (t={float(point.t):.6g})"
            raise FloatingPointError(
                f"{self.name}: sampling produced non-finite values at step {step}{at}; check "
                "the score model, lower the step size (snr) or raise the number of steps")
        self.sums, self.where = [], []


class Harness:
    """What every sampler shares: prior draw, NFE count, non-finite guard, no_grad, progress
    bar, callback and result (see the module docstring). Use as a context manager."""

    def __init__(self, score_fn: Callable, sde: SDE, shape, *, name: str, total: int | None,
                 generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype | None = None, x_init: torch.Tensor | None = None,
                 progress: bool = False, callback: Callable | None = None,
                 projection: Callable | None = None, check_every: int = 50):
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {callback!r}")
        if projection is not None and not callable(projection):
            raise ValueError(f"projection must be callable, got {projection!r}")
        self.sde, self.generator, self.callback = sde, generator, callback
        self.projection = projection
        self.x = initial_state(sde, shape, generator=generator, device=device, dtype=dtype,
                               x_init=x_init)
        self.counter = CountingScore(score_fn)
        self.schedule = Schedule(sde, self.counter)
        self.batch = self.x.shape[0]
        self._bar = progress_bar(total, bool(progress), name)
        self._guard = _NonFiniteGuard(name, check_every)
        self._no_grad = torch.no_grad()

    def __enter__(self) -> "Harness":
        self._no_grad.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
        self._no_grad.__exit__(*exc)

    @property
    def nfe(self) -> int:
        return self.counter.nfe

    def batch_times(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The (B,) float64 time tensors of a grid t (n,), one per grid point, on the state's
        device: built before the loop, so a step indexes a list instead of launching an op."""
        t = t.to(device=self.x.device, dtype=SCHEDULE_DTYPE)
        return [v.expand(self.batch) for v in t.unbind()]

    def points(self, t: torch.Tensor) -> tuple[list[torch.Tensor], list[SchedulePoint]]:
        """(device (B,) times, host-float SchedulePoints) of a time grid t (n,): the schedule
        is evaluated once, on the CPU, before the loop."""
        t = t.detach().to("cpu", SCHEDULE_DTYPE)
        return self.batch_times(t), self.schedule.at(t).tolist()

    def point_at_lam(self, lam: float) -> tuple[torch.Tensor, SchedulePoint]:
        """(device (B,) times, host-float point) at the half log-SNR ``lam`` (a float),
        computed on the CPU: no device synchronisation."""
        times, points = self.points(self.schedule.t_from_lam(torch.tensor([lam], dtype=SCHEDULE_DTYPE)))
        return times[0], points[0]

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """z ~ N(0, I) like x, from the sampler's generator."""
        return std_normal_like(x, self.generator)

    def project(self, x: torch.Tensor, point: SchedulePoint, scale: float = 1.0) -> torch.Tensor:
        """x after the projection (if any) at ``point``; ``scale``: x is in coordinates
        x / scale of the SDE's x (EDM's x / alpha)."""
        if self.projection is None:
            return x
        if scale == 1.0:
            return self.projection(x, point, self.noise)
        return self.projection(x * scale, point, self.noise) / scale

    def step(self, k: int, x: torch.Tensor, point: SchedulePoint | None,
             denoised: torch.Tensor | None = None, guard: bool = True,
             scale: float = 1.0, project: bool = True) -> torch.Tensor:
        """After step k: project x at ``point`` (the time x is at; see ``project``), record it
        for the non-finite check, advance the bar, call the callback with {step, t, sigma, x,
        denoised} (t, sigma of ``point``, converted to floats only when there is a callback).
        ``scale``: x is in coordinates x / scale of the SDE's x (EDM's x / alpha); the
        callback gets ``scale * x``. Returns the (projected) state the sampler goes on from."""
        if project and point is not None:
            x = self.project(x, point, scale)
        if guard:
            self._guard.update(k, x, point)
        self._bar.update(1)
        if self.callback is not None:
            if denoised is None:
                denoised = self._last_denoised()
            t, sigma = (None, None) if point is None else (float(point.t), float(point.sigma))
            self.callback({"step": k, "t": t, "sigma": sigma, "x": x if scale == 1.0 else x * scale,
                           "denoised": denoised})
        return x

    def _last_denoised(self) -> torch.Tensor | None:
        """Tweedie's formula on the last score evaluation (x, t, score)."""
        if self.counter.last is None:
            return None
        x, t, score = self.counter.last
        point = self.schedule.at(t.to(SCHEDULE_DTYPE))
        return self.schedule.tweedie(x, score.to(x.dtype), point.alpha, point.std)

    def result(self, x: torch.Tensor) -> SampleResult:
        """SampleResult(x, nfe) after the projection at t = 0 (``DATA_POINT``: the known part
        of an inverse problem is the observation exactly) and the last non-finite check."""
        x = self.project(x, DATA_POINT)
        self._guard.update("final", x, None)
        self._guard.check()
        return SampleResult(x=x, nfe=self.counter.nfe)


# ----- the registry entry -------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """A registry entry: the sampler function ``fn(score_fn, sde, shape, **options,
    **harness_options)`` and ``check(sde, **options)``, which raises a ValueError naming a bad
    option. The options and their defaults are the keyword-only parameters of ``fn``."""
    fn: Callable
    check: Callable

    @property
    def defaults(self) -> dict:
        """{option: default} from the signature of ``fn``."""
        parameters = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}

    def option_type(self, name: str) -> type:
        """The type of an option from its annotation (``int | None`` -> int)."""
        hint = typing.get_type_hints(self.fn)[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if args else hint

    def options(self, sde: SDE, options: dict | None = None) -> dict:
        """The defaults updated with ``options``, validated against ``sde``: an unknown name
        or a bad value raises a ValueError that names the option."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))} of {self.fn.__name__}; valid "
                             f"options: {', '.join(self.defaults)}")
        merged = {**self.defaults, **options}
        self.check(sde, **merged)
        return merged

    def __call__(self, score_fn: Callable, sde: SDE, shape, **kwargs) -> SampleResult:
        return self.fn(score_fn, sde, shape, **kwargs)
