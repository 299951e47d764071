"""Denoising score matching objectives, shared by every SDE.

All losses compare a score model s(x_t, t) with the score of the Gaussian perturbation
kernel, grad log p(x_t | x_0) = -z / std, where x_t = alpha x_0 + std z (Vincent 2011).
They return one value per sample; ``get_loss_fn`` validates the options once and returns
a function that averages over the batch.

Reduction over data dimensions follows the Score SDE code: ``reduce_mean=True`` averages
the squared error over dimensions; otherwise it is half the sum (the 1/2 of the papers).

Score functions are called as ``score_fn(x, t)``, or ``score_fn(x, t, class_labels)`` when
class labels are given (conditional models).
"""
from __future__ import annotations

from typing import Callable

import torch

from .sdes import SDE
from .utils import append_dims, check_bool, check_time

__all__ = ["dsm_losses", "discrete_dsm_losses", "sample_time", "get_loss_fn",
           "classifier_losses", "get_classifier_loss_fn"]


def _reduce(squared: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    flat = squared.reshape(squared.shape[0], -1)
    return flat.mean(dim=1) if reduce_mean else 0.5 * flat.sum(dim=1)


def _call_score(score_fn, x, t, class_labels):
    return score_fn(x, t) if class_labels is None else score_fn(x, t, class_labels)


def sample_time(sde: SDE, batch: int, *, eps: float = 1e-5, importance_sampling: bool = False,
                generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Draw training times t in [eps, T] and the weight that keeps the loss unbiased.

    Uniform sampling returns weight 1. Importance sampling draws t with density
    q(t) proportional to g(t)^2 / std(t)^2 = -d lambda / dt, i.e. lambda = log-SNR uniform on
    [lambda(T), lambda(eps)] (Song et al. 2021b, "Maximum Likelihood Training of Score-Based
    Diffusion Models", Sec. 5; Kingma et al. 2021). For the likelihood weighting
    g^2 ||s + z/std||^2 = (g^2/std^2) ||s std + z||^2 the estimator becomes
    weight * ||s std + z||^2 with the constant weight (lambda(eps) - lambda(T)) / (T - eps),
    which has the same expectation as uniform sampling.

    Returns:
        t: (B,) float64 on ``device``; weight: a Python float.
    """
    check_time("eps (the smallest training time)", eps, sde.T)
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    if not importance_sampling:
        return eps + (sde.T - eps) * u, 1.0
    lam_lo, lam_hi = sde.log_snr(torch.tensor([sde.T, eps], dtype=torch.float64)).tolist()
    # lambda decreases in t: u = 0 gives t = eps as for uniform sampling (a monotone coupling)
    t = sde.t_from_log_snr(lam_hi - (lam_hi - lam_lo) * u).clamp(eps, sde.T)
    return t, (lam_hi - lam_lo) / (sde.T - eps)


def dsm_losses(score_fn: Callable, sde: SDE, x: torch.Tensor, *, eps: float = 1e-5,
               reduce_mean: bool = False, likelihood_weighting: bool = False,
               importance_sampling: bool = False, class_labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Continuous denoising score matching loss per sample (Song et al. 2021, eq. 7).

    lambda(t) = std(t)^2 by default:  || std * s(x_t, t) + z ||^2
    lambda(t) = g(t)^2 with ``likelihood_weighting`` (Song et al. 2021b, Thm. 1):
        g^2 || s(x_t, t) + z / std ||^2, an upper bound on the negative log-likelihood
        (up to constants) when reduced with the half-sum; ``importance_sampling`` lowers
        its variance without changing its expectation (see ``sample_time``).

    Args:
        score_fn: (x (B, ...), t (B,)) -> score like x.
        x: clean data x_0, shape (B, ...).
        eps: smallest time sampled, avoids the singular std(0) = 0 of VP SDEs.
    Returns:
        (B,) losses in x's dtype.
    """
    if importance_sampling and not likelihood_weighting:
        raise ValueError("importance_sampling=True needs likelihood_weighting=True (it samples t "
                         "in proportion to the likelihood weight g^2/std^2)")
    t, weight = sample_time(sde, x.shape[0], eps=eps, importance_sampling=importance_sampling,
                            generator=generator, device=x.device)
    t = t.to(x.dtype)
    alpha, std = sde.marginal_coeffs(t)
    alpha, std = (append_dims(c.to(x.dtype), x.ndim) for c in (alpha, std))
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    score = _call_score(score_fn, alpha * x + std * z, t, class_labels)
    if likelihood_weighting and not importance_sampling:
        g2 = sde.sde(x.new_zeros(x.shape[0], 1), t)[1] ** 2   # g(t) only: no x-sized drift
        return _reduce((score + z / std) ** 2, reduce_mean) * g2
    return _reduce((score * std + z) ** 2, reduce_mean) * weight


def discrete_dsm_losses(score_fn: Callable, sde: SDE, x: torch.Tensor, *,
                        reduce_mean: bool = False, class_labels: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising score matching over the N levels of the SDE's discrete chain, per sample.

    A level i is drawn uniformly, x_i = alpha_i x_0 + std_i z, and the loss is
    || std_i s(x_i, t_i) + z ||^2 with t_i = i T / (N - 1):
      * VPSDE: DDPM's epsilon loss ||z - eps_hat||^2 with alpha_i^2 = prod_{j<=i}(1 - beta_j)
        (Ho et al. 2020, eq. 14), since the score wrapper returns s = -eps_hat / std_i;
      * VESDE: SMLD's loss with lambda(sigma) = sigma^2 (Song & Ermon 2019, eq. 6).
    Use a score_fn from ``models.get_score_fn(sde, model, continuous=False)``.

    Returns:
        (B,) losses in x's dtype.
    """
    i = torch.randint(0, sde.N, (x.shape[0],), generator=generator, device=x.device)
    alpha, std = sde.discrete_marginal_coeffs(i)
    t = sde.index_time(i).to(x.dtype)
    alpha, std = (append_dims(c.to(x.dtype), x.ndim) for c in (alpha, std))
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    score = _call_score(score_fn, alpha * x + std * z, t, class_labels)
    return _reduce((score * std + z) ** 2, reduce_mean)


def get_loss_fn(sde: SDE, *, continuous: bool = True, reduce_mean: bool = False,
                likelihood_weighting: bool = False, importance_sampling: bool = False,
                eps: float = 1e-5) -> Callable:
    """Validate the loss options once and return ``loss_fn(score_fn, x, *, class_labels=None,
    generator=None) -> scalar`` (the batch mean of the per-sample losses).

    ``continuous=False`` selects the discrete DDPM (VPSDE) or SMLD (VESDE) loss; it has no
    likelihood weighting, and sub-VP has no discrete chain.
    """
    for name, value in (("continuous", continuous), ("reduce_mean", reduce_mean),
                        ("likelihood_weighting", likelihood_weighting),
                        ("importance_sampling", importance_sampling)):
        check_bool(name, value)
    if continuous:
        check_time("eps (the smallest training time)", eps, sde.T)
        if importance_sampling and not likelihood_weighting:
            raise ValueError("importance_sampling=True needs likelihood_weighting=True")

        def loss_fn(score_fn, x, *, class_labels=None, generator=None):
            return dsm_losses(score_fn, sde, x, eps=eps, reduce_mean=reduce_mean,
                              likelihood_weighting=likelihood_weighting,
                              importance_sampling=importance_sampling,
                              class_labels=class_labels, generator=generator).mean()
        return loss_fn

    if likelihood_weighting or importance_sampling:
        raise ValueError("likelihood_weighting / importance_sampling need continuous=True: the "
                         "discrete DDPM and SMLD losses have fixed weights")
    if not sde.has_discrete_chain:
        raise ValueError(f"continuous=False (the discrete DDPM / SMLD loss) needs an SDE with a "
                         f"discrete chain, which {sde!r} lacks; use continuous=True")

    def discrete_loss_fn(score_fn, x, *, class_labels=None, generator=None):
        return discrete_dsm_losses(score_fn, sde, x, reduce_mean=reduce_mean,
                                   class_labels=class_labels, generator=generator).mean()
    return discrete_loss_fn


# ----------------------------------------------------------------------------- classifiers

def classifier_losses(logits_fn: Callable, sde: SDE, x: torch.Tensor, labels: torch.Tensor, *,
                      eps: float = 1e-5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of a noise-conditional classifier on perturbed data, per sample.

    t ~ U(eps, T) (``sample_time``), x_t = alpha(t) x + std(t) z, loss = -log p_phi(y | x_t, t):
    the training objective of the time-dependent classifier of classifier guidance (Song et
    al. 2021, Sec. 5 and App. I.1; Dhariwal & Nichol 2021, Sec. 4).

    Args:
        logits_fn: (x_t (B, ...), t (B,)) -> (B, C) logits (``models.get_logits_fn``).
        x: clean data x_0, shape (B, ...).
        labels: (B,) long class indices in [0, C).
        eps: smallest time sampled.
        generator: the draws of t and z.
    Returns:
        (B,) losses in the logits' dtype.
    """
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) like x's batch, got "
                         f"{tuple(labels.shape)}")
    t, _ = sample_time(sde, x.shape[0], eps=eps, generator=generator, device=x.device)
    t = t.to(x.dtype)
    alpha, std = sde.marginal_coeffs(t)
    alpha, std = (append_dims(c.to(x.dtype), x.ndim) for c in (alpha, std))
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    logits = logits_fn(alpha * x + std * z, t)
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def get_classifier_loss_fn(sde: SDE, *, eps: float = 1e-5) -> Callable:
    """Validate ``eps`` once and return ``loss_fn(logits_fn, x, labels, *, generator=None) ->
    scalar``, the batch mean of ``classifier_losses``."""
    check_time("eps (the smallest training time)", eps, sde.T)

    def loss_fn(logits_fn, x, labels, *, generator=None):
        return classifier_losses(logits_fn, sde, x, labels, eps=eps, generator=generator).mean()
    return loss_fn
