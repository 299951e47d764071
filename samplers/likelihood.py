"""Exact log-likelihoods through the probability-flow ODE, and bits per dimension.

Instantaneous change of variables (Chen et al. 2018, "Neural ODEs", Thm. 1; Grathwohl et al.
2019, FFJORD; Song et al. 2021, App. D.2): along a solution of dx/dt = v(x, t),

    d/dt log p_t(x(t)) = -div_x v(x(t), t),

so, with x(eps) = x the data point and x(T) = z,

    log p_eps(x) = log p_T(z) + int_eps^T div_x v(x(t), t) dt  ~=  prior_logp(z) + delta(T),

where delta solves d delta/dt = div v, delta(eps) = 0, alongside x. As in the Score SDE code,
the input x is taken to be the sample at time eps, and p_T is replaced by the prior.

The divergence is either exact (the trace of the Jacobian, from D vector-Jacobian products
with the basis vectors, batched into one pass over a D-fold replicated batch; for small D)
or Hutchinson's estimator eps^T (dv/dx) eps (Hutchinson 1989; FFJORD) with Rademacher or
Gaussian probes, ``probes`` of them averaged in one batched pass; the probes are drawn once
per call and kept fixed along the trajectory, so the result is an unbiased estimate of the
exact-ODE log-density for every x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from sde_lib import SDE, check_bool, check_choice, check_int

from .harness import CountingScore, check_generator, progress_bar
from .ode import check_ode_options, integrate, ode_time_grid, probability_flow_velocity

__all__ = ["log_likelihood", "bits_per_dim", "LikelihoodResult", "BitsPerDimResult",
           "TRACE_ESTIMATORS", "PROBE_NOISES", "MAX_EXACT_TRACE_DIM"]

#: Divergence estimators of ``log_likelihood(trace=...)``.
TRACE_ESTIMATORS = ("hutchinson", "exact")
#: Probe distributions of Hutchinson's estimator (``noise=...``).
PROBE_NOISES = ("rademacher", "gaussian")
#: The exact trace replicates the batch D times; above this D it is refused.
MAX_EXACT_TRACE_DIM = 4096


@dataclass
class LikelihoodResult:
    """logp: (B,) log-density in nats of each input x; z: x_T (B, ...), the point the ODE
    maps x to; nfe: the number of (batched) score evaluations."""
    logp: torch.Tensor
    z: torch.Tensor
    nfe: int


@dataclass
class BitsPerDimResult:
    """bpd: (B,) bits per dimension of each 8-bit image; logp: (B,) log-density (nats) of the
    scaled, dequantized data y given to ``log_likelihood``; z: x_T; nfe: score evaluations."""
    bpd: torch.Tensor
    logp: torch.Tensor
    z: torch.Tensor
    nfe: int


def _probe_vectors(x: torch.Tensor, trace: str, probes: int, noise: str,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Probe vectors (R * B, ...) for the R-fold replicated batch, replica-major.

    exact: R = D, replica d holds the basis vector e_d for every sample;
    hutchinson: R = probes, i.i.d. Rademacher (+-1) or standard normal entries.
    """
    batch, dim = x.shape[0], x[0].numel()
    if trace == "exact":
        eye = torch.eye(dim, dtype=x.dtype, device=x.device)
        return eye[:, None, :].expand(dim, batch, dim).reshape(dim * batch, *x.shape[1:])
    shape = (probes * batch, *x.shape[1:])
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
    return (2 * bits - 1).to(x.dtype)


def log_likelihood(score_fn: Callable, sde: SDE, x: torch.Tensor, *, trace: str = "hutchinson",
                   probes: int = 1, noise: str = "rademacher", method: str = "dopri5",
                   rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5,
                   num_steps: int | None = None, generator: torch.Generator | None = None,
                   progress: bool = False) -> LikelihoodResult:
    """log p(x) in nats of continuous data x (B, ...) under the probability-flow ODE.

    Integrates the augmented ODE (Song et al. 2021, eq. 39-40; FFJORD eq. 4) from eps to T:

        dx/dt = v(x, t) = f(x, t) - g(t)^2 / 2 * score(x, t),     x(eps) = x,
        d delta/dt = div_x v(x, t),                               delta(eps) = 0,

    and returns logp = sde.prior_logp(x(T)) + delta(T).

    Args:
        score_fn: ``score_fn(x, t)`` with t a (B,) float64 tensor in [eps, T]; it must be
            differentiable in x (the divergence takes one backward pass per evaluation).
        sde: the forward SDE.
        x: data (B, ...) at time eps (e.g. scaled, dequantized images).
        trace: "hutchinson" (unbiased stochastic estimate) or "exact" (the full Jacobian
            trace; replicates the batch D = x[0].numel() times, allowed for D <= 4096).
        probes: Hutchinson probes per sample, averaged (one batched pass of probes * B).
        noise: "rademacher" or "gaussian" Hutchinson probes.
        method, rtol, atol, num_steps: the ODE solver, as for ``ode_sample``.
        eps: the time the data is placed at (default 1e-5, as in the Score SDE code).
        generator: draws the probe vectors (on x's device).
        progress: show a tqdm bar counting score evaluations.

    Returns:
        LikelihoodResult(logp (B,), z (B, ...), nfe), detached, in x's dtype and device.
    """
    num_steps = _check_likelihood_options(sde, x, trace, probes, noise, method, rtol, atol,
                                          eps, num_steps, generator)
    x = x.detach()
    probe = _probe_vectors(x, trace, int(probes), noise, generator)
    counter = CountingScore(score_fn)
    field = _augmented_field(counter, sde, probe, x.shape[0], exact=trace == "exact")
    grid = (None if num_steps is None
            else ode_time_grid(sde, num_steps, eps, increasing=True, device=x.device))
    bar = progress_bar(None, progress, f"log_likelihood ({method})")
    try:
        with torch.no_grad():
            delta0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            z, delta = integrate(field, (x, delta0), t_start=float(eps), t_end=float(sde.T),
                                 method=method, rtol=rtol, atol=atol, grid=grid,
                                 t_min=float(eps), t_max=float(sde.T),
                                 on_eval=lambda t, y: bar.update(1), what="log_likelihood")
    finally:
        bar.close()
    logp = sde.prior_logp(z) + delta
    return LikelihoodResult(logp=logp.detach(), z=z.detach(), nfe=counter.nfe)


def _check_likelihood_options(sde, x, trace, probes, noise, method, rtol, atol, eps, num_steps,
                              generator) -> int | None:
    """ValueError naming the first bad argument of ``log_likelihood``; returns the steps of a
    fixed-grid method (None for adaptive ones)."""
    check_choice("trace estimator", trace, TRACE_ESTIMATORS)
    check_choice("probe noise", noise, PROBE_NOISES)
    check_int("probes (Hutchinson probe vectors per sample)", probes)
    num_steps = check_ode_options(sde, method=method, rtol=rtol, atol=atol, eps=eps,
                                  num_steps=num_steps)
    if not torch.is_tensor(x) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (B, *data_shape), got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if trace == "exact" and x[0].numel() > MAX_EXACT_TRACE_DIM:
        raise ValueError(f"trace='exact' replicates the batch once per dimension; "
                         f"D={x[0].numel()} > {MAX_EXACT_TRACE_DIM} is too large: use "
                         "trace='hutchinson'")
    check_generator(generator, x.device)
    return num_steps


def _augmented_field(score_fn: Callable, sde: SDE, probe: torch.Tensor, batch: int, *,
                     exact: bool) -> Callable:
    """field((x (B, ...), delta (B,)), t) -> (v, div v): the probability-flow velocity and
    its divergence e^T (dv/dx) e over the R = probe.shape[0] / B replicas of the batch
    (summed for the exact trace's basis vectors, averaged for Hutchinson's probes), from one
    forward and one backward pass on the replicated batch."""
    replicas = probe.shape[0] // batch
    repeat = (replicas,) + (1,) * (probe.ndim - 1)

    def field(state, t64):
        y = state[0].detach().repeat(repeat).requires_grad_(True)
        with torch.enable_grad():
            v = probability_flow_velocity(score_fn, sde, y, t64.expand(y.shape[0]))
            (vjp,) = torch.autograd.grad(v, y, grad_outputs=probe)
        quad = (vjp * probe).reshape(replicas, batch, -1).sum(-1)       # e^T (dv/dx) e
        div = quad.sum(0) if exact else quad.mean(0)
        return v[:batch].detach(), div.detach().to(state[1].dtype)
    return field


def bits_per_dim(score_fn: Callable, sde: SDE, images: torch.Tensor, *, centered: bool = True,
                 dequantize: bool = True, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, **likelihood_kwargs) -> BitsPerDimResult:
    """Bits per dimension of 8-bit images under the model's probability-flow ODE.

    With images x in {0, ..., 255}^D (shape (B, C, H, W) or any (B, ...)):

        u = (x + U) / 256,  U ~ U[0, 1)^D    (uniform dequantization; dequantize=False: U = 1/2)
        y = 2 u - 1 if centered else u       (the data scaling the model was trained on)
        log p(u) = log p(y) + D log|dy/du|   (log|dy/du| = log 2 if centered, else 0)
        bpd = -(log p(u) - D log 256) / (D ln 2) = -(log p(y) + D log|dy/du|) / (D ln 2) + 8

    log p(y) is ``log_likelihood(score_fn, sde, y, **likelihood_kwargs)``. For centered data
    this is the Score SDE code's ``-logp / (D ln 2) + 7`` (+ 8 for data in [0, 1]); averaged
    over U it upper-bounds the discrete model's bits/dim (Theis et al. 2016).

    Args:
        images: integer values 0..255 (uint8, another integer dtype, or integer-valued floats).
        centered: the model sees data in [-1, 1] (True) or [0, 1] (False).
        dequantize: add U ~ U[0, 1) (drawn first, with ``generator``, as
            ``torch.rand(images.shape, generator=generator, dtype=dtype, device=images.device)``)
            instead of 1/2.
        generator: for the dequantization noise and the Hutchinson probes.
        dtype: floating dtype of y (default: the images' dtype if floating, else the default).
        **likelihood_kwargs: trace, probes, noise, method, rtol, atol, eps, num_steps, progress.

    Returns:
        BitsPerDimResult(bpd (B,), logp (B,) of y in nats, z, nfe).
    """
    check_bool("centered", centered)
    check_bool("dequantize", dequantize)
    if not torch.is_tensor(images) or images.ndim < 2:
        raise ValueError("images must be a tensor of shape (B, C, H, W) (or (B, ...)), got "
                         f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    if dtype is None:
        dtype = images.dtype if images.is_floating_point() else torch.get_default_dtype()
    if images.is_complex() or images.dtype == torch.bool:
        raise ValueError(f"images must hold integers 0..255, got dtype {images.dtype}")
    values = images.to(dtype)
    if images.is_floating_point() and not bool((values == values.round()).all()):
        raise ValueError("images must hold integer values 0..255 (8-bit pixels); got "
                         "non-integer floats (data in [0, 1] or [-1, 1]? pass the 8-bit "
                         "values, e.g. (x * 255).round())")
    if bool((values < 0).any()) or bool((values > 255).any()):
        raise ValueError(f"images must hold integer values 0..255, got values in "
                         f"[{float(values.min())}, {float(values.max())}]")
    check_generator(generator, images.device)
    if dequantize:
        noise = torch.rand(images.shape, generator=generator, dtype=dtype, device=images.device)
    else:
        noise = torch.full_like(values, 0.5)
    u = (values + noise) / 256.0
    y = 2.0 * u - 1.0 if centered else u
    result = log_likelihood(score_fn, sde, y, generator=generator, **likelihood_kwargs)
    dim = y[0].numel()
    log_jacobian = dim * math.log(2.0) if centered else 0.0      # D log|dy/du|
    bpd = -(result.logp + log_jacobian) / (dim * math.log(2.0)) + 8.0
    return BitsPerDimResult(bpd=bpd, logp=result.logp, z=result.z, nfe=result.nfe)
