"""Gaussian-mixture data with closed-form perturbed marginals: the exact-score test bed.

If p_0 = sum_k w_k N(mu_k, Sigma_k) and x_t | x_0 ~ N(alpha x_0, std^2 I) (every SDE in
sde_lib), then

    p_t = sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + std^2 I),

so the true score and log-density of every perturbed marginal are known exactly. Samplers,
likelihoods and losses are checked against them, and benchmarks use them as a perfect model.
Each covariance is eigendecomposed once (Sigma_k = U_k diag(l_k) U_k^T), so evaluating p_t
at a batch of different times costs O(B K D^2) and no per-time matrix inverse.
"""
from __future__ import annotations

import math

import torch

from .sdes import SDE
from .utils import batch_time, check_int

__all__ = ["GaussianMixture", "LabelledMixture", "eight_mode_mixture", "spread_gaussian",
           "toy_distribution", "TOY_DISTRIBUTIONS"]

_F64 = torch.float64


def _per_sample(value, batch: int, device) -> torch.Tensor:
    """A float or (B,) tensor of coefficients as a (B, 1, 1) float64 tensor."""
    v = torch.as_tensor(value, dtype=_F64, device=device)
    return v.expand(batch).reshape(batch, 1, 1) if v.ndim == 0 else v.reshape(batch, 1, 1)


def _sum_last(v: torch.Tensor) -> torch.Tensor:
    """v.sum(-1); over a short last axis (2-D toy data) as a product with ones, which runs
    ~20x faster than torch's CPU reduction over a short innermost axis."""
    if v.shape[-1] > 8:
        return v.sum(-1)
    return (v @ v.new_ones(v.shape[-1], 1)).squeeze(-1)


class GaussianMixture:
    """Mixture of K Gaussians in D = prod(event_shape) dimensions, stored in float64.

    Args:
        weights: (K,) positive mixture weights (normalised here).
        means: (K, D) component means.
        covs: (K, D, D) symmetric positive semi-definite covariances.
        event_shape: shape of one sample, e.g. (2,) or (1, 8, 8); default (D,).
    """

    def __init__(self, weights, means, covs, event_shape=None):
        weights = torch.as_tensor(weights, dtype=_F64)
        means = torch.as_tensor(means, dtype=_F64)
        covs = torch.as_tensor(covs, dtype=_F64)
        if means.ndim != 2 or weights.shape != means.shape[:1] or covs.shape != (
                means.shape[0], means.shape[1], means.shape[1]):
            raise ValueError(f"expected weights (K,), means (K, D), covs (K, D, D); got "
                             f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(covs.shape)}")
        if (weights <= 0).any():
            raise ValueError("mixture weights must all be > 0")
        self.weights = weights / weights.sum()
        self.means = means
        self.covs = 0.5 * (covs + covs.transpose(1, 2))
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)
        if (self.eigvals < -1e-10 * self.eigvals.abs().max()).any():
            raise ValueError("mixture covariances must be positive semi-definite")
        self.eigvals = self.eigvals.clamp(min=0.0)
        self.event_shape = tuple(event_shape) if event_shape is not None else (means.shape[1],)
        if math.prod(self.event_shape) != means.shape[1]:
            raise ValueError(f"event_shape {self.event_shape} does not have {means.shape[1]} elements")

    @classmethod
    def gaussian(cls, mean, cov, event_shape=None) -> "GaussianMixture":
        """A single Gaussian N(mean (D,), cov (D, D))."""
        mean = torch.as_tensor(mean, dtype=_F64)
        return cls(torch.ones(1), mean[None], torch.as_tensor(cov, dtype=_F64)[None], event_shape)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> torch.Tensor:
        """Mean of the data distribution, (D,) float64."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Covariance of the data distribution, (D, D) float64."""
        centred = self.means - self.mean()
        between = torch.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return torch.einsum("k,kij->ij", self.weights, self.covs) + between

    # ----- sampling -----------------------------------------------------------------------
    def sample_components(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Component indices (n,) drawn with the mixture weights (on the CPU)."""
        return torch.multinomial(self.weights, n, replacement=True, generator=generator)

    def sample(self, n: int, *, alpha=1.0, std=0.0, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device=None,
               return_components: bool = False):
        """Draw n samples of the perturbed mixture (alpha, std scalars; default: the data).

        Draws on the CPU with ``generator`` (a CPU generator) and moves the result to
        ``device``. Returns (n, *event_shape), and the (n,) component indices if asked.
        """
        k = self.sample_components(n, generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64) * self.eigvals[k].sqrt()
        x0 = self.means[k]
        for j in range(self.num_components):          # x0 = mu_k + U_k (sqrt(l_k) z), per component
            rows = (k == j).nonzero().squeeze(1)
            x0 = x0.index_add(0, rows, z[rows] @ self.eigvecs[j].T)
        noise = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        x = (alpha * x0 + std * noise).reshape(n, *self.event_shape).to(device=device, dtype=dtype)
        return (x, k) if return_components else x

    def sample_marginal(self, sde: SDE, t: float, n: int, **kwargs):
        """Draw n samples of p_t, the data perturbed by ``sde`` up to the scalar time t."""
        alpha, std = sde.marginal_coeffs(torch.tensor(float(t), dtype=_F64))
        return self.sample(n, alpha=alpha.item(), std=std.item(), **kwargs)

    # ----- density and score --------------------------------------------------------------
    def _components(self, x: torch.Tensor, alpha, std):
        """Per-component log-densities (B, K) and whitened residuals for x (B, ...)."""
        flat = x.reshape(x.shape[0], -1).to(_F64)
        batch = flat.shape[0]
        a = _per_sample(alpha, batch, flat.device)
        s = _per_sample(std, batch, flat.device)
        means, vecs, vals = (v.to(flat.device) for v in (self.means, self.eigvecs, self.eigvals))
        residual = flat[:, None, :] - a * means[None]                        # (B, K, D)
        y = torch.einsum("bkd,kde->bke", residual, vecs)                      # rotated residual
        var = a ** 2 * vals[None] + s ** 2                                    # (B, K, D)
        whitened = y / var
        log_normal = -0.5 * (self.dim * math.log(2 * math.pi)
                             + _sum_last(var.log() + y * whitened))
        log_joint = self.weights.to(flat.device).log()[None] + log_normal     # (B, K)
        return log_joint, whitened, vecs

    def log_prob(self, x: torch.Tensor, alpha=1.0, std=0.0) -> torch.Tensor:
        """log p(x) (nats) of the mixture perturbed with alpha, std (floats or (B,)); (B,) float64."""
        log_joint, _, _ = self._components(x, alpha, std)
        return torch.logsumexp(log_joint, dim=1)

    def score(self, x: torch.Tensor, alpha=1.0, std=0.0) -> torch.Tensor:
        """grad_x log p(x) of the perturbed mixture; shape and dtype of x.

        score = -sum_k r_k(x) C_k^{-1} (x - alpha mu_k), r_k the posterior responsibilities.
        """
        log_joint, whitened, vecs = self._components(x, alpha, std)
        return self._score_from(x, log_joint, whitened, vecs)

    @staticmethod
    def _score_from(x: torch.Tensor, log_joint: torch.Tensor, whitened: torch.Tensor,
                    vecs: torch.Tensor) -> torch.Tensor:
        """-sum_k r_k C_k^{-1} (x - alpha mu_k) with r = softmax(log_joint) over the K
        components (entries -inf drop a component); shape and dtype of x."""
        resp = torch.softmax(log_joint, dim=1)
        # two-operand einsum (a batched matmul); the three-operand form was ~50x slower on CPU
        score = -torch.einsum("kde,bke->bd", vecs, resp[:, :, None] * whitened)
        return score.reshape(x.shape).to(x.dtype)

    def marginal_log_prob(self, sde: SDE, x: torch.Tensor, t) -> torch.Tensor:
        """log p_t(x) (nats, (B,) float64) of the data perturbed by ``sde`` up to time t."""
        alpha, std = sde.marginal_coeffs(batch_time(t, x))
        return self.log_prob(x, alpha, std)

    def marginal_score(self, sde: SDE, x: torch.Tensor, t) -> torch.Tensor:
        """grad_x log p_t(x), the exact score of the perturbed data at time t (B,) or scalar."""
        alpha, std = sde.marginal_coeffs(batch_time(t, x))
        return self.score(x, alpha, std)

    def score_fn(self, sde: SDE):
        """The exact ``score_fn(x, t)`` of this data under ``sde``, for samplers and tests."""
        def exact_score(x, t):
            return self.marginal_score(sde, x, t)
        return exact_score


class LabelledMixture(GaussianMixture):
    """A GaussianMixture whose components carry class labels: the guidance test bed.

    p(x, y) = sum_{k: l_k = y} w_k N(x; mu_k, Sigma_k), so p(y) = sum_{k: l_k = y} w_k and
    p(x | y) is the mixture of y's components with weights w_k / p(y). Perturbed with
    (alpha, std) every piece stays a Gaussian mixture, so the class-conditional score
    grad log p_t(x | y), the exact time-dependent classifier log p_t(y | x) and its gradient
    grad log p_t(x | y) - grad log p_t(x) (Bayes), and the guided scores are closed form.

    Class labels y are integers in [0, num_classes); ``null_label`` (= num_classes) stands
    for "no class" wherever a score takes labels, and gives the unconditional score (the
    convention of a classifier-free-guidance model with one extra null class).

    Args:
        weights, means, covs, event_shape: as for GaussianMixture.
        labels: (K,) integer class of each component.
        num_classes: C (default max(labels) + 1); every class needs at least one component.
    """

    def __init__(self, weights, means, covs, labels, num_classes: int | None = None,
                 event_shape=None):
        super().__init__(weights, means, covs, event_shape)
        labels = torch.as_tensor(labels)
        if (labels.dtype.is_floating_point or labels.dtype == torch.bool
                or labels.shape != (self.num_components,)):
            raise ValueError(f"labels must be an integer tensor of shape ({self.num_components},), "
                             f"one class per component; got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
        num_classes = int(labels.max()) + 1 if num_classes is None else check_int("num_classes",
                                                                                  num_classes)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got {labels.tolist()}")
        empty = (torch.bincount(labels, minlength=num_classes) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no component: give each class in "
                             f"[0, {num_classes}) a component or lower num_classes")
        self.labels, self.num_classes = labels, num_classes
        members = labels[None, :] == torch.arange(num_classes)[:, None]
        #: (C, K) log-mask: 0 where component k belongs to class c, -inf elsewhere.
        self._class_log_mask = torch.zeros(members.shape, dtype=_F64).masked_fill(~members, -math.inf)

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, labels,
                     num_classes: int | None = None) -> "LabelledMixture":
        """``mixture``'s components with class ``labels`` (K,)."""
        return cls(mixture.weights, mixture.means, mixture.covs, labels, num_classes,
                   mixture.event_shape)

    @property
    def null_label(self) -> int:
        """The label meaning "unconditional" (num_classes)."""
        return self.num_classes

    def class_weights(self) -> torch.Tensor:
        """p(y), (C,) float64."""
        return torch.zeros(self.num_classes, dtype=_F64).index_add(0, self.labels, self.weights)

    def class_mixture(self, y: int) -> GaussianMixture:
        """p(x | y) as a GaussianMixture of y's components (weights renormalised)."""
        y = check_int("class label y", y, 0, self.num_classes - 1)
        keep = self.labels == y
        return GaussianMixture(self.weights[keep], self.means[keep], self.covs[keep],
                               self.event_shape)

    def _label_log_mask(self, y, x: torch.Tensor) -> torch.Tensor:
        """(B, K) log-mask of the components of each y_i (all components for the null label);
        y an int or a (B,) integer tensor in [0, num_classes]."""
        batch = x.shape[0]
        y = torch.as_tensor(y, device=x.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.shape not in ((), (batch,)):
            raise ValueError(f"class labels must be an int or an integer tensor of shape ({batch},), "
                             f"got {y.dtype} {tuple(y.shape)}")
        if ((y < 0) | (y > self.num_classes)).any():
            raise ValueError(f"class labels must lie in [0, {self.num_classes}] "
                             f"({self.num_classes} = the null label)")
        y = y.long().expand(batch)
        mask = torch.cat([self._class_log_mask, torch.zeros(1, self.num_components, dtype=_F64)])
        return mask.to(x.device)[y]

    def class_log_prob(self, x: torch.Tensor, y, alpha=1.0, std=0.0) -> torch.Tensor:
        """log p(x | y) of the perturbed mixture; y an int or (B,) labels; (B,) float64."""
        log_joint, _, _ = self._components(x, alpha, std)
        mask = self._label_log_mask(y, x)
        log_py = torch.logsumexp(self.weights.log().to(x.device)[None] + mask, dim=1)
        return torch.logsumexp(log_joint + mask, dim=1) - log_py

    def class_score(self, x: torch.Tensor, y, alpha=1.0, std=0.0) -> torch.Tensor:
        """grad_x log p(x | y): the score of y's components alone, reweighted by their
        responsibilities; shape and dtype of x."""
        log_joint, whitened, vecs = self._components(x, alpha, std)
        return self._score_from(x, log_joint + self._label_log_mask(y, x), whitened, vecs)

    def classifier_logits(self, x: torch.Tensor, alpha=1.0, std=0.0) -> torch.Tensor:
        """log p(y | x) = log p(x, y) - log p(x) for every class, (B, C) float64."""
        log_joint, _, _ = self._components(x, alpha, std)
        log_xy = torch.logsumexp(log_joint[:, None, :] + self._class_log_mask.to(x.device), dim=2)
        return log_xy - torch.logsumexp(log_joint, dim=1, keepdim=True)

    def _class_and_marginal_scores(self, x: torch.Tensor, y, alpha, std):
        """(grad log p(x | y), grad log p(x)) from one evaluation of the components."""
        log_joint, whitened, vecs = self._components(x, alpha, std)
        cond = self._score_from(x, log_joint + self._label_log_mask(y, x), whitened, vecs)
        return cond, self._score_from(x, log_joint, whitened, vecs)

    def guided_score(self, x: torch.Tensor, y, guidance_scale: float, alpha=1.0,
                     std=0.0) -> torch.Tensor:
        """(1 + w) grad log p(x | y) - w grad log p(x), w = guidance_scale: the score of
        p(x | y)^(1 + w) p(x)^(-w) (Ho & Salimans 2022, eq. 6 in score form); shape and
        dtype of x."""
        cond, uncond = self._class_and_marginal_scores(x, y, alpha, std)
        return (1 + guidance_scale) * cond - guidance_scale * uncond

    def classifier_gradient(self, x: torch.Tensor, y, alpha=1.0, std=0.0) -> torch.Tensor:
        """grad_x log p(y | x) = grad log p(x | y) - grad log p(x) (Bayes' rule; Song et al.
        2021, eq. 14); shape and dtype of x."""
        cond, uncond = self._class_and_marginal_scores(x, y, alpha, std)
        return cond - uncond

    # ----- exact functions of (x, t) under an SDE, for samplers and guidance ---------------
    def label_score_fn(self, sde: SDE):
        """The exact label-aware ``score_fn(x, t, class_labels=None)`` -> grad log p_t(x | y),
        with None or the null label (num_classes) giving grad log p_t(x); what
        models.get_score_fn returns for a class-conditional network with a null class."""
        def exact_label_score(x, t, class_labels=None):
            alpha, std = sde.marginal_coeffs(batch_time(t, x))
            y = self.null_label if class_labels is None else class_labels
            return self.class_score(x, y, alpha, std)
        return exact_label_score

    def logits_fn(self, sde: SDE):
        """The exact time-dependent classifier ``logits_fn(x, t)`` -> log p_t(y | x) (B, C),
        in x's dtype."""
        def exact_logits(x, t):
            alpha, std = sde.marginal_coeffs(batch_time(t, x))
            return self.classifier_logits(x, alpha, std).to(x.dtype)
        return exact_logits

    def guided_score_fn(self, sde: SDE, class_labels, guidance_scale: float):
        """The closed-form guided ``score_fn(x, t)`` = (1 + w) grad log p_t(x | y) -
        w grad log p_t(x) for labels ``class_labels`` (int or (B,)), w = guidance_scale."""
        def exact_guided_score(x, t):
            alpha, std = sde.marginal_coeffs(batch_time(t, x))
            return self.guided_score(x, class_labels, guidance_scale, alpha, std)
        return exact_guided_score


def eight_mode_mixture(radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """2-D toy data: 8 isotropic Gaussians (std ``std``) evenly spaced on a circle of the given
    radius, with unequal weights proportional to 1, 2, ..., 8."""
    angles = torch.arange(8, dtype=_F64) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    covs = (std ** 2) * torch.eye(2, dtype=_F64).expand(8, 2, 2)
    return GaussianMixture(torch.arange(1, 9, dtype=_F64), means, covs)


def spread_gaussian(dim: int = 64, *, std_min: float = 0.02, std_max: float = 1.5,
                    seed: int = 0) -> GaussianMixture:
    """A Gaussian in ``dim`` dimensions with a spread spectrum: standard deviations geometric
    from std_min to std_max along a seeded random rotation, and a seeded mean in [-0.5, 0.5]."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=_F64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    stds = torch.logspace(math.log10(std_min), math.log10(std_max), dim, dtype=_F64)
    cov = q @ torch.diag(stds ** 2) @ q.T
    mean = torch.rand(dim, generator=g, dtype=_F64) - 0.5
    return GaussianMixture.gaussian(mean, cov)


#: Built-in toy distributions by name (config.data.name for 2-D / flat toy data).
TOY_DISTRIBUTIONS = {
    "eight_modes": eight_mode_mixture,
    "spread_gaussian": spread_gaussian,
}


def toy_distribution(name: str, **kwargs) -> GaussianMixture:
    """The built-in toy distribution ``name`` (one of TOY_DISTRIBUTIONS)."""
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(f"unknown toy distribution {name!r}; valid names: "
                         f"{', '.join(TOY_DISTRIBUTIONS)}")
    return TOY_DISTRIBUTIONS[name](**kwargs)
