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

import math
from typing import Callable

import torch

from .chain import (discretized_gaussian_log_likelihood, gaussian_kl, learned_log_variance,
                    posterior_coefficients, variance_bounds)
from .sdes import SDE
from .utils import append_dims, check_bool, check_choice, check_real, check_time

__all__ = ["dsm_losses", "discrete_dsm_losses", "sample_time", "get_loss_fn",
           "classifier_losses", "get_classifier_loss_fn", "LOSSES", "learned_variance_losses",
           "LossAwareLevels"]

#: The objectives (config.training.loss): DSM ("simple"), and for networks with a variance
#: head the hybrid L_simple + lambda L_vlb and the bound L_vlb alone (Improved DDPM).
LOSSES = ("simple", "hybrid", "vlb")


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


class LossAwareLevels:
    """Importance sampling of the chain's levels for L_vlb (Improved DDPM, Sec. 3.3, eq. 18):
    p_i proportional to sqrt(E[L_i^2]) over the last ``history`` values of each level's
    term, mixed with ``uniform_prob`` of the uniform law; uniform until every level has
    ``history`` values. Kept on the device (no host synchronisation); a level drawn twice in
    one batch records one of its values. ``state_dict`` / ``load_state_dict`` for checkpoints."""

    def __init__(self, num_levels: int, *, history: int = 10, uniform_prob: float = 0.001):
        self.num_levels, self.history, self.uniform_prob = num_levels, history, uniform_prob
        self.values = torch.zeros(num_levels, history, dtype=torch.float64)
        self.count = torch.zeros(num_levels, dtype=torch.long)

    def _to(self, device) -> None:
        if self.values.device != torch.device(device):
            self.values, self.count = self.values.to(device), self.count.to(device)

    def probabilities(self) -> torch.Tensor:
        """(N,) float64: the law the levels are drawn from."""
        weights = self.values.pow(2).mean(1).sqrt()
        weights = weights / weights.sum().clamp(min=1e-300)
        weights = weights * (1 - self.uniform_prob) + self.uniform_prob / self.num_levels
        uniform = torch.full_like(weights, 1.0 / self.num_levels)
        return torch.where((self.count >= self.history).all(), weights, uniform)

    def draw(self, batch: int, generator: torch.Generator | None, device):
        """(levels (B,) long, weights 1 / (N p_i) (B,) float64) on ``device``."""
        self._to(device)
        probs = self.probabilities()
        levels = torch.multinomial(probs, batch, replacement=True, generator=generator)
        return levels, 1.0 / (self.num_levels * probs[levels])

    def update(self, levels: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the terms ``losses`` (B,) of ``levels`` (B,) (detached)."""
        self._to(levels.device)
        slot = self.count[levels] % self.history
        self.values[levels, slot] = losses.detach().to(self.values.dtype)
        self.count.index_add_(0, levels, torch.ones_like(levels))

    def state_dict(self) -> dict:
        return {"values": self.values.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.values = state["values"].to(self.values.device, torch.float64)
        self.count = state["count"].to(self.count.device, torch.long)


def learned_variance_losses(score_fn: Callable, sde: SDE, x: torch.Tensor, *,
                            loss: str = "hybrid", vlb_weight: float = 0.001,
                            reduce_mean: bool = True, class_labels: torch.Tensor | None = None,
                            generator: torch.Generator | None = None,
                            levels: torch.Tensor | None = None,
                            level_weights: torch.Tensor | None = None,
                            bin_width: float = 2.0 / 255.0,
                            data_range: tuple[float, float] = (-1.0, 1.0),
                            bounds=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Improved DDPM's objectives (Nichol & Dhariwal 2021, Sec. 3.1) per sample, for a network
    with a variance head (``score_fn.score_and_variance``, models.get_score_fn with
    ``learned_variance=True``) on the SDE's discrete chain.

    A level i is drawn (uniformly, or given ``levels`` with importance ``level_weights``),
    x_i = alpha_i x0 + std_i z, t_i = i T / (N - 1); the network gives eps_hat = -std_i s and
    the variance interpolation v. L_i is the KL between the posterior q(x_{i-1} | x_i, x0)
    and p(x_{i-1} | x_i) = N(c0 x0_hat + cx x_i, Sigma) with Sigma =
    exp(v log beta_i + (1 - v) log beta~_i) (sde_lib.chain), and at i = 0 the discretized
    Gaussian decoder's -log p(x0 | x_0-level) for 8-bit data (bins ``bin_width`` on
    ``data_range``), in bits, averaged over dimensions (``reduce_mean``) or summed.

    loss='hybrid': L_simple + vlb_weight N L_i (eq. 16; lambda = 0.001 over the N-term sum)
    with a stop-gradient on eps_hat in L_i, so the mean is trained by L_simple only.
    loss='vlb': N L_i (the bound's estimate over all N terms), gradients through both.
    L_simple = ||z - eps_hat||^2 reduced as ``discrete_dsm_losses``.

    Returns:
        (losses (B,), L_i (B,) in bits (unweighted, detached), levels (B,) long).
    """
    if not hasattr(score_fn, "score_and_variance"):
        raise ValueError(f"loss={loss!r} needs a network with a variance head: build it with "
                         "learn_sigma=True (config.model.learn_sigma) and "
                         "models.get_score_fn(..., learned_variance=True)")
    n = sde.N
    if levels is None:
        levels = torch.randint(0, n, (x.shape[0],), generator=generator, device=x.device)
    bounds = variance_bounds(sde) if bounds is None else bounds
    alpha, std, c0, _, posterior_std = (append_dims(c.to(x.device, x.dtype), x.ndim)
                                         for c in posterior_coefficients(sde, levels))
    t = sde.index_time(levels).to(x.dtype)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_i = alpha * x + std * z
    score, v = (score_fn.score_and_variance(x_i, t) if class_labels is None
                else score_fn.score_and_variance(x_i, t, class_labels))
    eps_hat = -std * score
    simple = _reduce((eps_hat - z) ** 2, reduce_mean)
    mean_eps = eps_hat.detach() if loss == "hybrid" else eps_hat
    x0_hat = (x_i - std * mean_eps) / alpha
    log_var = learned_log_variance(bounds, levels, v)
    first = append_dims(levels == 0, x.ndim)
    kl = gaussian_kl(c0 * x, 2 * torch.log(posterior_std.clamp(min=1e-30)),
                     c0 * x0_hat, log_var)        # the cx x_i parts of the means cancel
    decoder = -discretized_gaussian_log_likelihood(
        x, x0_hat, torch.exp(0.5 * log_var), bin_width=bin_width, low=data_range[0],
        high=data_range[1]).to(x.dtype)
    terms = torch.where(first, decoder, kl) / math.log(2.0)
    flat = terms.reshape(terms.shape[0], -1)
    vb = flat.mean(1) if reduce_mean else flat.sum(1)
    weighted = vb * (n if level_weights is None else n * level_weights.to(vb.dtype))
    total = simple + vlb_weight * weighted if loss == "hybrid" else weighted
    return total, vb.detach(), levels


def get_loss_fn(sde: SDE, *, continuous: bool = True, reduce_mean: bool = False,
                likelihood_weighting: bool = False, importance_sampling: bool = False,
                eps: float = 1e-5, loss: str = "simple", vlb_weight: float = 0.001,
                level_importance: bool = False, bin_width: float = 2.0 / 255.0,
                data_range: tuple[float, float] = (-1.0, 1.0)) -> Callable:
    """Validate the loss options once and return ``loss_fn(score_fn, x, *, class_labels=None,
    generator=None) -> scalar`` (the batch mean of the per-sample losses).

    ``continuous=False`` selects the discrete DDPM (VPSDE) or SMLD (VESDE) loss; it has no
    likelihood weighting, and sub-VP has no discrete chain. ``loss`` 'hybrid' / 'vlb' are
    Improved DDPM's objectives for a network with a variance head
    (``learned_variance_losses``; discrete chain, continuous=False), with ``vlb_weight``
    (lambda), ``level_importance`` (``LossAwareLevels``, kept as ``loss_fn.level_sampler``)
    and the 8-bit decoder's ``bin_width`` / ``data_range``.
    """
    for name, value in (("continuous", continuous), ("reduce_mean", reduce_mean),
                        ("likelihood_weighting", likelihood_weighting),
                        ("importance_sampling", importance_sampling),
                        ("level_importance", level_importance)):
        check_bool(name, value)
    check_choice("loss", loss, LOSSES)
    if loss != "simple":
        return _learned_variance_loss_fn(sde, continuous, reduce_mean, likelihood_weighting,
                                         importance_sampling, loss, vlb_weight,
                                         level_importance, bin_width, data_range)
    if level_importance:
        raise ValueError("level_importance=True samples the levels of L_vlb: it needs "
                         "loss='hybrid' or 'vlb'")
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


def _learned_variance_loss_fn(sde, continuous, reduce_mean, likelihood_weighting,
                              importance_sampling, loss, vlb_weight, level_importance,
                              bin_width, data_range):
    if continuous:
        raise ValueError(f"loss={loss!r} (Improved DDPM) is defined on the discrete chain: set "
                         "continuous=False (config.training.continuous=False)")
    if likelihood_weighting or importance_sampling:
        raise ValueError(f"loss={loss!r} has its own weights: set likelihood_weighting and "
                         "importance_sampling to False (level_importance samples its levels)")
    if not sde.has_discrete_chain:
        raise ValueError(f"loss={loss!r} needs an SDE with a discrete chain, which {sde!r} lacks")
    vlb_weight = check_real("vlb_weight", vlb_weight)
    bounds = variance_bounds(sde)
    sampler = LossAwareLevels(sde.N) if level_importance else None

    def loss_fn(score_fn, x, *, class_labels=None, generator=None):
        levels = weights = None
        if sampler is not None:
            levels, weights = sampler.draw(x.shape[0], generator, x.device)
        total, vb, levels = learned_variance_losses(
            score_fn, sde, x, loss=loss, vlb_weight=vlb_weight, reduce_mean=reduce_mean,
            class_labels=class_labels, generator=generator, levels=levels,
            level_weights=weights, bin_width=bin_width, data_range=data_range, bounds=bounds)
        if sampler is not None:
            sampler.update(levels, vb)
        return total.mean()

    loss_fn.level_sampler = sampler
    return loss_fn


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
