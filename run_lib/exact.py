"""Evaluations that a data set with a closed-form density provides (``dataset.density``, a
sde_lib.GaussianMixture: the 2-D toy mixtures). Images have no such density (None).

    relative_score_error(score_fn, density, sde)   E||std (s - s*)||^2 / E||std s*||^2
    sample_metrics(density, x)                      true log-density of samples, mode weights
    true_log_prob(density, sde, x, eps)             exact log p_eps(x), next to the ODE's
    component_log_posterior(density, x, alpha, std) exact log p_t(k | x_t): the Bayes classifier
"""
from __future__ import annotations

import torch

import sde_lib

__all__ = ["relative_score_error", "mode_weights", "sample_metrics", "true_log_prob",
           "component_log_posterior"]


@torch.no_grad()
def relative_score_error(score_fn, density: sde_lib.GaussianMixture, sde: sde_lib.SDE, *,
                         num_samples: int = 8192, eps: float = 1e-3,
                         generator: torch.Generator | None = None, device=None) -> float:
    """E ||std (s - s*)||^2 / E ||std s*||^2 over t ~ U(eps, T) and x_t ~ p_t.

    s* is the exact score of the perturbed data; the std weighting is that of the default
    DSM loss. Dimensionless: 0 for the exact score, 1 for the zero function. ``generator``
    (a CPU generator) draws the data, times and noise.
    """
    x0 = density.sample(num_samples, generator=generator, dtype=torch.float32, device=device)
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64).to(x0.device)
    t = (eps + (sde.T - eps) * u).to(x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    std = sde_lib.append_dims(std, x0.ndim)
    x_t = mean + std * noise
    exact = density.marginal_score(sde, x_t, t)
    error = ((score_fn(x_t, t) - exact) * std).square().sum()
    return (error / (exact * std).square().sum()).item()


def mode_weights(density: sde_lib.GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Fraction of the samples x (N, D) nearest to each component mean: (K,) float64."""
    flat = x.detach().double().cpu().reshape(x.shape[0], -1)
    nearest = torch.cdist(flat, density.means).argmin(dim=1)
    return torch.bincount(nearest, minlength=density.num_components).double() / x.shape[0]


def sample_metrics(density: sde_lib.GaussianMixture, x: torch.Tensor, *, seed: int = 0) -> dict:
    """Quality of samples x (N, ...) against the closed-form density, in nats:

    mean / median_true_logp_of_samples (lower than that of data means samples off the data;
    the mean is dominated by the few samples farthest off, the median is not),
    mean / median_true_logp_of_data (N true draws, seeded: the reference),
    nonfinite_fraction and, for mixtures, mode_weight_tv: the total variation between the
    samples' nearest-mode frequencies and the mixture weights (0 is perfect). Non-finite
    samples are left out of the log-density and the mode weights."""
    x = x.detach().cpu()
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    kept = x[finite]
    truth = density.log_prob(density.sample(x.shape[0],
                                            generator=torch.Generator().manual_seed(seed)))
    logp = density.log_prob(kept) if len(kept) else torch.full((1,), float("nan"))
    metrics = {"mean_true_logp_of_samples": logp.mean().item(),
               "median_true_logp_of_samples": logp.median().item(),
               "mean_true_logp_of_data": truth.mean().item(),
               "median_true_logp_of_data": truth.median().item(),
               "nonfinite_fraction": 1.0 - finite.double().mean().item()}
    if density.num_components > 1 and len(kept):
        tv = 0.5 * (mode_weights(density, kept) - density.weights).abs().sum().item()
        metrics["mode_weight_tv"] = tv
    return metrics


def true_log_prob(density: sde_lib.GaussianMixture, sde: sde_lib.SDE, x: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """log p_eps(x) in nats, (N,) float64 on the CPU: the density the probability-flow ODE
    started at time eps evaluates (the data, smoothed by the SDE up to eps)."""
    t = torch.tensor(float(eps), dtype=torch.float64, device=x.device)
    return density.marginal_log_prob(sde, x, t).cpu()


def component_log_posterior(density: sde_lib.GaussianMixture, x: torch.Tensor, alpha,
                            std) -> torch.Tensor:
    """log p(k | x_t) (B, K) float64 of the mixture's components for x_t = alpha x_0 + std z
    (alpha, std floats or (B,)): the Bayes classifier of the component labels, the best any
    noise-conditional classifier of this data can do. From the perturbed components
    w_k N(alpha mu_k, alpha^2 Sigma_k + std^2 I)."""
    log_joint = torch.stack([
        density.weights[k].log() + sde_lib.GaussianMixture.gaussian(
            density.means[k], density.covs[k], density.event_shape).log_prob(x, alpha, std)
        for k in range(density.num_components)], dim=1)
    return torch.log_softmax(log_joint, dim=1)
