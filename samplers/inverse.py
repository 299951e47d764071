"""Inverse problems: inpainting, colorization and super-resolution with a score model.

An observation y = A x_0 (+ N(0, noise_std^2) noise) of an operator of ``samplers.operators``
(a mask in an orthonormal basis); the methods draw x_0 from (an approximation of) p(x_0 | y):

* ``"replace"`` (Song et al. 2021, App. I): any sampler of ``SAMPLERS``. After every step
  (and every corrector / Langevin step) the known basis coordinates are replaced by a draw of
  the forward marginal at the noise level the state is at, alpha(t) y~ + std(t) z~, z~ ~ N(0,
  I) fresh at every step (``known_noise="fresh"``, the paper's) or one draw for the whole run
  (``"fixed"``; the probability-flow ODE always uses one draw, so that its vector field is
  smooth in t). Noiseless observations only. Biased: the unknown part is drawn given a
  *noisy* known part, p_t(x_u | x_k,t), not given y (tests/test_inverse.py measures it).
* ``"smc"``: a particle filter over the reverse chain (SMCDiff, Trippe et al. 2023, Alg. 1,
  on the DDPM posterior kernel of any SDE), exact as particles and steps go to infinity;
  noiseless observations only. See ``smc_sample``.
* ``"pigdm"``: the gradient method of pseudo-inverse guidance (Song, Vahdat, Mardani & Kautz
  2023, "Pseudoinverse-guided diffusion models", eq. 7-8), a transformed score for any
  sampler: score + grad_x log N(y~; x0_hat~_known, (r_t^2 + noise_std~^2) I), with x0_hat
  Tweedie's data prediction and r_t^2 = sigma^2 / (1 + sigma^2), sigma = std / alpha (the
  paper's choice for data of unit variance). Handles noisy observations.

The end of every method: the last step denoises the whole state (Tweedie's x0_hat at t = eps
when the sampler has ``denoise``), then the known basis coordinates are set to the
observation exactly (for masks: the known pixels are the given ones, bit for bit), with
replacement and SMC; with ``"pigdm"`` they are left as sampled (the observation is noisy).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sde_lib import SCHEDULE_DTYPE, SDE, append_dims, check_choice, check_int, check_real

from .fast import SPACINGS, timesteps
from .harness import (DATA_POINT, HARNESS_OPTIONS, Harness, SampleResult, Schedule,
                      SchedulePoint, check_eps)
from .operators import Colorization, Inpainting, LinearOperator, SuperResolution

__all__ = ["METHODS", "KNOWN_NOISE", "Replacement", "pigdm_score", "smc_sample",
           "solve_inverse_problem", "inpaint", "colorize", "super_resolve"]

#: Inverse-problem methods (``method=``).
METHODS = ("replace", "smc", "pigdm")
#: How the replacement method draws the noise of the known part.
KNOWN_NOISE = ("fresh", "fixed")


# ----- replacement --------------------------------------------------------------------------
class Replacement:
    """The harness projection of the replacement method: the known basis coordinates of x
    at a schedule point (alpha, std) become alpha y~ + std z~.

    Args:
        operator: the observation operator; y_basis: ``operator.embed(y)`` (basis layout,
            batch like the state); known_noise: "fresh" (a new z~ at every projection) or
            "fixed" (one z~ for the whole run; ``fix_noise``).
    """

    def __init__(self, operator: LinearOperator, y_basis: torch.Tensor, known_noise: str = "fresh"):
        self.operator, self.y_basis = operator, y_basis
        self.known_noise = check_choice("known_noise", known_noise, KNOWN_NOISE)
        self.fixed = None

    def fix_noise(self, x: torch.Tensor, generator: torch.Generator | None) -> None:
        """Draw the one z~ of a fixed path (like x, from ``generator``)."""
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        self.fixed = self.operator.to_basis(z)

    def _replace(self, x: torch.Tensor, point: SchedulePoint, noise_basis) -> torch.Tensor:
        op = self.operator
        x_basis = op.to_basis(x)
        y = self.y_basis.to(x_basis.dtype)
        target = y if point.alpha == 1.0 else y * _scalar(point.alpha, x_basis)
        if noise_basis is not None:
            target = target + noise_basis * _scalar(point.std, x_basis)
        return op.from_basis(torch.where(op.known(x_basis), target, x_basis))

    def __call__(self, x: torch.Tensor, point: SchedulePoint, noise: Callable) -> torch.Tensor:
        """The projection after a step: ``noise()``-style z ~ N(0, I) like x from the
        sampler's generator (``Harness.noise``), unless the path is fixed or std = 0."""
        if _is_zero(point.std):
            return self._replace(x, point, None)
        if self.known_noise == "fixed":
            if self.fixed is None:
                raise RuntimeError("Replacement with known_noise='fixed' needs fix_noise() first")
            return self._replace(x, point, self.fixed)
        return self._replace(x, point, self.operator.to_basis(noise(x)))

    def constrain(self, x: torch.Tensor, point: SchedulePoint) -> torch.Tensor:
        """The known part on the fixed path at ``point`` (alpha, std floats or 0-d tensors)."""
        return self._replace(x, point, self.fixed)

    def free(self, v: torch.Tensor) -> torch.Tensor:
        """v with its known basis coordinates zeroed (a velocity of the unknown part only)."""
        op = self.operator
        v_basis = op.to_basis(v)
        return op.from_basis(torch.where(op.known(v_basis), torch.zeros_like(v_basis), v_basis))


def _scalar(v, like: torch.Tensor):
    """A float or 0-d schedule value, in like's dtype when it is a tensor."""
    return v.to(like.dtype) if torch.is_tensor(v) else v


def _is_zero(v) -> bool:
    return (not torch.is_tensor(v)) and v == 0.0


# ----- the gradient method (pseudo-inverse guidance) -----------------------------------------
def pigdm_score(score_fn: Callable, sde: SDE, operator: LinearOperator, y: torch.Tensor, *,
                noise_std: float = 0.0, guidance_scale: float = 1.0) -> Callable:
    """score_fn(x, t) + guidance_scale * grad_x log p~_t(y | x) of PiGDM (Song et al. 2023,
    eq. 7-8) for A = c M U: in basis coordinates p~_t(y | x_t) = N(y~; (U x0_hat)_known,
    (r_t^2 + (noise_std / c)^2) I), x0_hat = (x + std^2 s) / alpha (Tweedie), r_t^2 =
    sigma^2 / (1 + sigma^2), sigma = std / alpha. The gradient goes through the score (one
    backward pass per evaluation); y: the observation in its own layout, batch B of x."""
    y_basis = operator.embed(y)
    noise_var = (noise_std / operator.scale) ** 2

    def guided_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_t, std_t = (v.to(x.dtype) for v in sde.marginal_coeffs(t))
        r2 = std_t ** 2 / (alpha_t ** 2 + std_t ** 2)        # sigma^2 / (1 + sigma^2), (B,)
        alpha, std = append_dims(alpha_t, x.ndim), append_dims(std_t, x.ndim)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            score = score_fn(x_in, t)
            x0_basis = operator.to_basis((x_in + std ** 2 * score) / alpha)
            residual = operator.residual(y_basis.to(x.dtype), x0_basis)
            # isotropic in basis coordinates (which may have more dims than x)
            variance = append_dims(r2, x0_basis.ndim) + noise_var
            log_likelihood = -0.5 * (residual ** 2 / variance).sum()
            (grad,) = torch.autograd.grad(log_likelihood, x_in)
        return score.detach() + guidance_scale * grad

    return guided_score


# ----- sequential Monte Carlo -----------------------------------------------------------------
def posterior_coefficients(s: SchedulePoint, t: SchedulePoint) -> tuple[float, float, float]:
    """(c_0, c_x, v) of q(x_s | x_t, x_0) = N(c_0 x_0 + c_x x_t, v I) for s < t, from the
    Markov kernel x_t | x_s ~ N(a x_s, b^2), a = alpha_t / alpha_s, b^2 = std_t^2 - a^2 std_s^2
    (true for any linear SDE): c_0 = alpha_s b^2 / std_t^2, c_x = a std_s^2 / std_t^2,
    v = std_s^2 b^2 / std_t^2 (the DDPM posterior, Ho et al. 2020 eq. 7, for any schedule)."""
    a = t.alpha / s.alpha
    b2 = t.std ** 2 - a ** 2 * s.std ** 2
    return s.alpha * b2 / t.std ** 2, a * s.std ** 2 / t.std ** 2, s.std ** 2 * b2 / t.std ** 2


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Indices (G, K) into each group's K particles by systematic resampling of the weights
    softmax(log_weights) (G, K): one uniform per group (Douc & Cappe 2005)."""
    groups, k = log_weights.shape
    cdf = torch.softmax(log_weights, dim=1).cumsum(dim=1)
    u = torch.rand((groups, 1), generator=generator, device=log_weights.device,
                   dtype=log_weights.dtype)
    positions = (u + torch.arange(k, device=log_weights.device, dtype=log_weights.dtype)) / k
    return torch.searchsorted(cdf.contiguous(), positions).clamp(max=k - 1)


def check_smc_options(sde: SDE, *, particles=16, num_steps=1000, spacing="uniform", eps=1e-3,
                      ess_threshold=0.5) -> None:
    """ValueError naming the first bad option of ``smc_sample``."""
    check_int("particles", particles, 1)
    check_int("num_steps", num_steps, 1)
    check_choice("spacing", spacing, SPACINGS)
    check_eps(sde, eps)
    check_real("ess_threshold", ess_threshold, maximum=1.0)


def smc_sample(score_fn: Callable, sde: SDE, operator: LinearOperator, y: torch.Tensor, shape, *,
               particles: int = 16, num_steps: int = 1000, spacing: str = "uniform",
               eps: float = 1e-3, ess_threshold: float = 0.5, **harness_options) -> SampleResult:
    """A particle filter for a noiseless observation y~ = (U x_0)_known (SMCDiff, Trippe et al.
    2023, Alg. 1), for any SDE, exact as particles and num_steps go to infinity.

    The known coordinates follow one path y~_T, ..., y~_eps drawn backwards from the forward
    process given y~ (y~_T ~ N(alpha_T y~, std_T^2), then the posterior q(y~_s | y~_t, y~)).
    Each observation has ``particles`` particles x_t, moved from t to the next time s by the
    DDPM posterior kernel q(x_s | x_t, x0_hat(x_t)) (``posterior_coefficients``). Since that
    kernel is isotropic, the known and unknown parts of x_s are independent given x_t, so the
    filter is fully adapted: each step weights particle i by the kernel's density of the known
    path, N(y~_s; c_0 x0_hat~_known + c_x y~_t, v), resamples (systematic, per observation) when
    the effective sample size falls below ``ess_threshold`` x particles, moves the unknown part
    and sets the known part to y~_s. At t = eps: Tweedie's x0_hat, one particle per observation
    drawn by the final weights, the known part set to y~.

    Args:
        y: the observation (B_obs, ...) in the operator's layout; shape: (B_obs, *data_shape).
        particles: K per observation; the score is evaluated on batches of B_obs K.
        num_steps, spacing, eps: the time grid (``fast.timesteps``).
        harness_options: generator, device, dtype, progress, callback (x of all particles).
    Returns: SampleResult(x (B_obs, ...), nfe = num_steps + 1).
    """
    check_smc_options(sde, particles=particles, num_steps=num_steps, spacing=spacing, eps=eps,
                      ess_threshold=ess_threshold)
    if harness_options.get("x_init") is not None:
        raise ValueError("smc_sample draws its particles from the prior; x_init is not supported")
    groups, k = shape[0], particles
    with Harness(score_fn, sde, (groups * k, *shape[1:]), name=f"smc ({k} particles)",
                 total=num_steps, **harness_options) as run:
        times, points = run.points(timesteps(sde, num_steps, spacing=spacing, eps=eps))
        y = y.to(run.x)
        y0 = operator.embed(y)                                      # (G, basis...)
        known = _per_particle(operator.known(y0), groups, k)          # a mask per image too
        group_noise = torch.empty((groups, *shape[1:]), device=run.x.device, dtype=run.x.dtype)
        y_t = y0 * points[0].alpha + operator.to_basis(run.noise(group_noise)) * points[0].std
        x = _set_known(operator, run.x, y_t.repeat_interleave(k, dim=0), known)
        log_w = run.x.new_zeros(groups, k, dtype=SCHEDULE_DTYPE)
        for i in range(num_steps):
            s, t = points[i + 1], points[i]
            c_0, c_x, v = posterior_coefficients(s, t)
            x0 = run.schedule.denoise(x, t, run.schedule.score(x, times[i]))
            mean_basis = operator.to_basis(x0) * c_0 + operator.to_basis(x) * c_x
            y_s = y0 * c_0 + y_t * c_x + operator.to_basis(run.noise(group_noise)) * math.sqrt(v)
            y_particles = y_s.repeat_interleave(k, dim=0)
            log_w = log_w + _log_kernel(y_particles - mean_basis, known, v, groups)
            index, log_w = _resample_if_degenerate(log_w, ess_threshold, run.generator)
            x, x0, mean_basis = (_take(v_, index) for v_ in (x, x0, mean_basis))
            x_basis = mean_basis + operator.to_basis(run.noise(x)) * math.sqrt(v)
            x = operator.from_basis(torch.where(known, y_particles, x_basis))
            y_t = y_s
            x = run.step(i, x, s, project=False)
        x0 = run.schedule.denoise(x, points[-1], run.schedule.score(x, times[-1]))
        pick = torch.multinomial(torch.softmax(log_w, dim=1), 1, generator=run.generator)
        x0 = _take(x0, pick)
        return run.result(_set_known(operator, x0, y0, operator.known(y0)))


def _per_particle(known: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """A known-coordinate mask with one row per observation (G, ...) repeated for the K
    particles of each; a mask shared by all (batch dim 1 or none) as it is."""
    if known.ndim and known.shape[0] == groups and groups > 1:
        return known.repeat_interleave(k, dim=0)
    return known


def _set_known(operator: LinearOperator, x: torch.Tensor, y_basis: torch.Tensor,
               known: torch.Tensor) -> torch.Tensor:
    x_basis = operator.to_basis(x)
    return operator.from_basis(torch.where(known, y_basis, x_basis))


def _log_kernel(difference: torch.Tensor, known: torch.Tensor, variance: float,
                groups: int) -> torch.Tensor:
    """log N(difference; 0, variance I) over the known coordinates, up to a constant, (G, K)."""
    squared = torch.where(known, difference, torch.zeros_like(difference)) ** 2
    return (-0.5 / variance) * squared.reshape(groups, -1, squared[0].numel()).sum(-1).to(SCHEDULE_DTYPE)


def _resample_if_degenerate(log_w: torch.Tensor, threshold: float, generator):
    """(flat particle indices (G K,), new log-weights): systematic resampling of the groups
    whose effective sample size 1 / sum w^2 is below threshold K, identity elsewhere; the
    resampled groups' weights become uniform. No host synchronisation."""
    groups, k = log_w.shape
    log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)
    ess = 1.0 / torch.exp(2.0 * log_w).sum(dim=1, keepdim=True)
    degenerate = ess < threshold * k
    identity = torch.arange(k, device=log_w.device).expand(groups, k)
    index = torch.where(degenerate, systematic_resample(log_w, generator), identity)
    log_w = torch.where(degenerate, torch.zeros_like(log_w), log_w)
    offsets = torch.arange(groups, device=log_w.device)[:, None] * k
    return (index + offsets).reshape(-1), log_w


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x (G K, ...) at flat indices (G K,), or one per group at (G, 1) group-local
    indices."""
    if index.ndim == 2:
        k = x.shape[0] // index.shape[0]
        index = (index + torch.arange(index.shape[0], device=index.device)[:, None] * k).reshape(-1)
    return x.index_select(0, index)


# ----- the entry points ---------------------------------------------------------------------
def _split_options(options: dict) -> tuple[dict, dict]:
    harness = {k: options.pop(k) for k in list(options) if k in HARNESS_OPTIONS}
    return options, harness


def solve_inverse_problem(score_fn: Callable, sde: SDE, operator: LinearOperator,
                          y: torch.Tensor, shape, *, method: str = "replace", sampler: str = "pc",
                          noise_std: float = 0.0, known_noise: str = "fresh",
                          generator: torch.Generator | None = None,
                          sampler_options: dict | None = None, **options) -> SampleResult:
    """Draw x_0 (shape) given y = A x_0 (+ noise) with ``method`` (see the module docstring).

    Args:
        score_fn: score_fn(x, t) of the unconditional model (differentiable for "pigdm").
        operator: an ``operators.LinearOperator``; y: its observation (B, ...).
        shape: (B, *data_shape) of the solutions.
        method: "replace", "smc" or "pigdm". sampler: a ``SAMPLERS`` name ("replace",
            "pigdm"; "smc" runs its own filter and takes sampler="pc", the default).
        noise_std: the observation noise (y's units); > 0 only with "pigdm".
        known_noise: the replacement's noise draw ("fresh" or "fixed"; see ``Replacement``).
        options: the sampler's options (config.sampling.<sampler>), "pigdm"'s guidance_scale,
            "smc"'s particles / num_steps / spacing / eps / ess_threshold, and the harness
            options device, dtype (default y's), progress, callback.
        sampler_options: the same as a dict (merged with ``options``), for a sampler option
            whose name is taken here: the ODE sampler's ``method`` (sampler="ode",
            sampler_options={"method": "rk4", "num_steps": 50}).
    Returns: SampleResult(x (shape), nfe).
    """
    from . import SAMPLERS                       # the registry (package level)

    check_choice("method", method, METHODS)
    check_choice("sampler", sampler, SAMPLERS)
    noise_std = check_real("noise_std", noise_std)
    _check_observation(operator, y, shape)
    if noise_std > 0 and method != "pigdm":
        raise ValueError(f"method={method!r} conditions on a noiseless observation; for "
                         f"noise_std={noise_std:g} use method='pigdm'")
    options, harness = _split_options({**(sampler_options or {}), **options})
    if "x_init" in harness:
        raise ValueError("inverse problems draw x_T themselves; x_init is not supported")
    harness["generator"] = generator
    harness.setdefault("device", y.device)
    if y.is_floating_point():
        harness.setdefault("dtype", y.dtype)
    if method == "smc":
        if sampler != "pc":
            raise ValueError("method='smc' runs its own particle filter on the DDPM posterior "
                             "kernel; leave sampler at 'pc' (its options: particles, num_steps, "
                             "spacing, eps, ess_threshold)")
        return smc_sample(score_fn, sde, operator, y, shape, **options, **harness)
    if method == "pigdm":
        scale = check_real("guidance_scale", options.pop("guidance_scale", 1.0))
        guided = pigdm_score(score_fn, sde, operator, y, noise_std=noise_std, guidance_scale=scale)
        return SAMPLERS[sampler].fn(guided, sde, shape, **SAMPLERS[sampler].options(sde, options),
                                    **harness)
    replacement = Replacement(operator, operator.embed(y), known_noise)
    if known_noise == "fixed" or sampler == "ode":
        replacement.fix_noise(torch.empty(shape, device=y.device, dtype=y.dtype), generator)
    return SAMPLERS[sampler].fn(score_fn, sde, shape, **SAMPLERS[sampler].options(sde, options),
                                projection=replacement, **harness)


def _check_observation(operator: LinearOperator, y, shape) -> None:
    if not torch.is_tensor(y):
        raise ValueError(f"the observation must be a tensor, got {type(y).__name__}")
    operator.check(tuple(shape))
    expected = tuple(operator.observe(torch.zeros(shape, device="meta")).shape)
    if tuple(y.shape) != expected:
        raise ValueError(f"the observation has shape {tuple(y.shape)}; for data of shape "
                         f"{tuple(shape)} it must have shape {expected}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("the observation has non-finite values (NaN or inf)")


def inpaint(score_fn: Callable, sde: SDE, known: torch.Tensor, mask: torch.Tensor, *,
            method: str = "replace", sampler: str = "pc", generator: torch.Generator | None = None,
            **sampler_options) -> SampleResult:
    """Fill the pixels where mask == 0 given ``known`` (B, ...) in the model's space where
    mask == 1 (mask broadcastable to known). ``solve_inverse_problem`` with
    ``operators.Inpainting(mask)``; with "replace" and "smc" the known pixels of the result
    are those of ``known`` exactly."""
    if not torch.is_tensor(known):
        raise ValueError(f"known must be a tensor (B, ...), got {type(known).__name__}")
    operator = Inpainting(mask)
    operator.check(tuple(known.shape))
    return solve_inverse_problem(score_fn, sde, operator, operator.observe(known),
                                 tuple(known.shape), method=method, sampler=sampler,
                                 generator=generator, **sampler_options)


def colorize(score_fn: Callable, sde: SDE, gray: torch.Tensor, *, method: str = "replace",
             sampler: str = "pc", generator: torch.Generator | None = None,
             **sampler_options) -> SampleResult:
    """RGB images (B, 3, H, W) whose channel mean is ``gray`` (B, 1, H, W) (model space),
    in the decorrelated colour space of ``operators.Colorization``."""
    if not torch.is_tensor(gray) or gray.ndim != 4 or gray.shape[1] != 1:
        raise ValueError("gray must be a tensor (B, 1, H, W) of gray images; colorization "
                         "needs a model of RGB (3-channel) data")
    return solve_inverse_problem(score_fn, sde, Colorization(), gray, (gray.shape[0], 3, *gray.shape[2:]),
                                 method=method, sampler=sampler, generator=generator,
                                 **sampler_options)


def super_resolve(score_fn: Callable, sde: SDE, low_res: torch.Tensor, factor: int, *,
                  method: str = "replace", sampler: str = "pc",
                  generator: torch.Generator | None = None, **sampler_options) -> SampleResult:
    """Images (B, C, f H, f W) whose f x f block means are ``low_res`` (B, C, H, W)."""
    operator = SuperResolution(factor)
    if not torch.is_tensor(low_res) or low_res.ndim != 4:
        raise ValueError("low_res must be a tensor (B, C, H, W) of images")
    b, c, h, w = low_res.shape
    return solve_inverse_problem(score_fn, sde, operator, low_res, (b, c, h * factor, w * factor),
                                 method=method, sampler=sampler, generator=generator,
                                 **sampler_options)
