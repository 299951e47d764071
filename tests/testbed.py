"""The exact-score test bed: data distributions with closed-form perturbed marginals.

For Gaussian and Gaussian-mixture data, every SDE in sde_lib perturbs the data into another
Gaussian mixture (see ``sde_lib.GaussianMixture``), so the true score and log-density of
p_t are known exactly. Tests of SDEs, samplers and likelihoods build their data here:

    from testbed import spread_gaussian, eight_mode_mixture, SDE_PARAMS, frechet_distance

    @pytest.mark.parametrize("make_sde", SDE_PARAMS)
    def test_something(make_sde):
        sde = make_sde()
        dist = eight_mode_mixture()
        score_fn = dist.score_fn(sde)                     # exact score of p_t
        x = dist.sample(1000, generator=torch.Generator().manual_seed(0))   # (1000, 2)

The distributions are built here independently of any toy data in the library, so a test
comparing the library against them compares against an independent oracle.

This is a plain module (no tests); pytest's default import mode puts tests/ on sys.path.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sde_lib
from samplers.metrics import flat_float64, frechet_distance, frechet_from_moments, sample_moments
from sde_lib import GaussianMixture

__all__ = [
    "Z_MAX",
    "random_orthogonal", "spread_gaussian", "correlated_gaussian", "eight_mode_mixture",
    "SDE_FACTORIES", "SDE_IDS", "SDE_PARAMS", "ALL_SDES", "SDES",
    "sample_moments", "moment_standard_errors", "moment_zscores", "frechet_from_moments",
    "frechet_distance", "gaussian_frechet_to",
]

F64 = torch.float64
#: Default threshold for statistical checks, in standard errors. For a correct statistic
#: P(|z| > 5) = 5.7e-7, so even O(100) z-scores in one test give a false-alarm rate < 1e-4
#: (and tests use fixed seeds anyway); an error of a few percent on 20000 samples is >= 8 SE.
Z_MAX = 5.0


# ----- data distributions -----------------------------------------------------------------
def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix (dim, dim) float64: QR of a seeded standard normal matrix,
    with the signs of R's diagonal folded into Q (so Q is Haar-distributed and unique)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=F64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def spread_gaussian(dim: int = 64, seed: int = 0, *, std_min: float = 0.02, std_max: float = 1.5,
                    event_shape=None) -> GaussianMixture:
    """A single Gaussian N(mu, Sigma) in ``dim`` dimensions with a "spread spectrum".

    Sigma = Q diag(s^2) Q^T with Q a seeded random orthogonal matrix (``random_orthogonal``)
    and standard deviations s geometrically spaced from ``std_min`` to ``std_max``; the mean
    mu (dim,) has seeded uniform entries in [-0.5, 0.5]. Samples have shape (n, dim), or
    (n, *event_shape) if ``event_shape`` (with prod(event_shape) == dim) is given.
    """
    g = torch.Generator().manual_seed(seed)
    q = random_orthogonal(dim, g)
    stds = torch.logspace(math.log10(std_min), math.log10(std_max), dim, dtype=F64)
    cov = q @ torch.diag(stds ** 2) @ q.T
    mean = torch.rand(dim, generator=g, dtype=F64) - 0.5
    return GaussianMixture.gaussian(mean, cov, event_shape)


def correlated_gaussian(dim: int = 3, seed: int = 1) -> GaussianMixture:
    """A small, strongly correlated Gaussian (dim,) with a non-zero mean, for moment tests.

    Mean entries in [0.8, 1.5] with alternating signs (|mu| ~ 1, so that a 5% error in the
    mean coefficient alpha is many standard errors); covariance Q diag(s^2) Q^T with s from
    0.3 to 1.2 (condition number 16), so off-diagonal entries are O(0.3).
    """
    g = torch.Generator().manual_seed(seed)
    q = random_orthogonal(dim, g)
    stds = torch.linspace(0.3, 1.2, dim, dtype=F64)
    cov = q @ torch.diag(stds ** 2) @ q.T
    signs = torch.tensor([(-1.0) ** k for k in range(dim)], dtype=F64)
    mean = signs * (0.8 + 0.7 * torch.rand(dim, generator=g, dtype=F64))
    return GaussianMixture.gaussian(mean, cov)


def eight_mode_mixture(seed: int = 0, *, radius: float = 2.0, std: float = 0.15,
                       anisotropy: float = 1.0) -> GaussianMixture:
    """2-D mixture of 8 Gaussians evenly spaced on a circle of the given radius.

    Weights are proportional to 1, 2, ..., 8 (normalised), assigned to the modes in angular
    order starting at the mode ``seed % 8`` (seed 0: mode at angle 0 has weight 1/36).
    Each component has std ``std`` along the radius and ``std * anisotropy`` along the
    tangent (anisotropy 1: isotropic). Samples have shape (n, 2).
    """
    k = torch.arange(8, dtype=F64)
    angles = k * (2 * math.pi / 8)
    radial = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)          # (8, 2)
    tangent = torch.stack([-torch.sin(angles), torch.cos(angles)], dim=1)
    means = radius * radial
    covs = (std ** 2) * (radial[:, :, None] * radial[:, None, :]
                         + anisotropy ** 2 * tangent[:, :, None] * tangent[:, None, :])
    weights = torch.roll(torch.arange(1, 9, dtype=F64), shifts=seed % 8)
    return GaussianMixture(weights, means, covs)


# ----- the SDEs ---------------------------------------------------------------------------
#: (id, factory) of the three SDEs with their default parameters.
SDE_FACTORIES = [
    ("vpsde", sde_lib.VPSDE),
    ("subvpsde", sde_lib.subVPSDE),
    ("vesde", sde_lib.VESDE),
]
SDE_IDS = [name for name, _ in SDE_FACTORIES]
#: For ``@pytest.mark.parametrize("make_sde", SDE_PARAMS)``: factories with readable ids.
SDE_PARAMS = [pytest.param(factory, id=name) for name, factory in SDE_FACTORIES]


#: The sampler tests' SDEs by name; factories taking N (and sigma_max for VE). VE defaults to
#: sigma_max = 20, not 5: with 5 the prior N(0, 25 I) is far enough from the true p_T of the
#: test Gaussians that an exact sampler sits at FD 0.067 from the data (bench/README.md).
SDES = {
    "vp": lambda N=1000: sde_lib.VPSDE(N=N),
    "subvp": lambda N=1000: sde_lib.subVPSDE(N=N),
    "ve": lambda N=1000, sigma_max=20.0: sde_lib.VESDE(sigma_min=0.01, sigma_max=sigma_max, N=N),
}


def ALL_SDES() -> list:
    """Fresh instances of VPSDE(), subVPSDE(), VESDE() with default parameters."""
    return [factory() for _, factory in SDE_FACTORIES]


# ----- statistics of sample sets ----------------------------------------------------------
def moment_standard_errors(x) -> tuple[np.ndarray, np.ndarray]:
    """Standard errors of the sample mean (D,) and sample covariance entries (D, D) of x (B, ...).

    Distribution-free (CLT): SE(mean_i) = sd(x_i) / sqrt(B) and
    SE(S_ij) = sd((x_i - m_i)(x_j - m_j)) / sqrt(B), which for Gaussian data equals
    sqrt((S_ii S_jj + S_ij^2) / B) and for mixtures accounts for their fourth moments.
    """
    x = flat_float64(x)
    n = x.shape[0]
    c = x - x.mean(axis=0)
    # sample variance of p_ij = c_i c_j over the B samples, without a (B, D, D) array
    mean_p = c.T @ c / n
    var_p = np.clip(((c ** 2).T @ (c ** 2) - n * mean_p ** 2) / (n - 1), 0.0, None)
    return c.std(axis=0, ddof=1) / math.sqrt(n), np.sqrt(var_p / n)


def moment_zscores(x, mean, cov, *, mean_allowance=0.0, cov_allowance=0.0):
    """z-scores of the sample moments of x (B, ...) against a predicted mean (D,) and cov (D, D).

    z = max(|sample moment - prediction| - allowance, 0) / SE, with the SEs of
    ``moment_standard_errors``. Allowances (scalars or arrays shaped like the moment) are for
    a known, separately justified bias such as a discretization error.

    Returns (z_mean (D,), z_cov (D, D)), non-negative float64 arrays.
    """
    m, s = sample_moments(x)
    se_mean, se_cov = moment_standard_errors(x)
    mean = torch.as_tensor(mean, dtype=F64).cpu().numpy().reshape(m.shape)
    cov = torch.as_tensor(cov, dtype=F64).cpu().numpy().reshape(s.shape)
    z_mean = np.maximum(np.abs(m - mean) - mean_allowance, 0.0) / se_mean
    z_cov = np.maximum(np.abs(s - cov) - cov_allowance, 0.0) / se_cov
    return z_mean, z_cov


def gaussian_frechet_to(dist: GaussianMixture, x) -> float:
    """Frechet distance between samples x (B, ...) and the exact mean (D,) and covariance (D, D)
    of ``dist`` (for a mixture, of the Gaussian with the mixture's first two moments)."""
    mu, cov = sample_moments(x)
    return frechet_from_moments(mu, cov, dist.mean(), dist.covariance())


def reference_and_floor(dist: GaussianMixture, n: int, seeds=(101, 102)):
    """A true sample set (n, ...) float64 to compare a sampler's output with, and the noise
    floor of that comparison: the Frechet distance between it and a second true set of n."""
    reference = dist.sample(n, generator=torch.Generator().manual_seed(seeds[0]), dtype=torch.float64)
    second = dist.sample(n, generator=torch.Generator().manual_seed(seeds[1]), dtype=torch.float64)
    return reference, frechet_distance(second, reference)


# ----- a probability-flow ODE with a known solution ---------------------------------------
#: Data N(FLOW_MU, diag(FLOW_S^2)) in 4-D: per coordinate the probability-flow ODE maps x_T
#: to x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + std_t^2) / sqrt(alpha_T^2 s^2 + std_T^2) (x_T - alpha_T mu).
FLOW_MU = torch.tensor([0.5, -1.0, 0.2, 1.5], dtype=torch.float64)
FLOW_S = torch.tensor([0.1, 0.3, 1.0, 2.0], dtype=torch.float64)


def flow_problem_score(sde):
    """Exact score_fn(x (B, 4), t (B,)) of the FLOW_MU / FLOW_S Gaussian under ``sde``."""
    def score(x, t):
        alpha, std = sde.marginal_coeffs(t)
        alpha, std = alpha[:, None], std[:, None]
        return -(x - alpha * FLOW_MU) / (alpha ** 2 * FLOW_S ** 2 + std ** 2)
    return score


def exact_flow(sde, x_T, t):
    """The probability-flow ODE solution at time t from x_T (B, 4) at T."""
    times = torch.tensor([sde.T, t], dtype=torch.float64)
    (a_T, a_t), (s_T, s_t) = sde.marginal_coeffs(times)
    scale = (torch.sqrt(a_t ** 2 * FLOW_S ** 2 + s_t ** 2)
             / torch.sqrt(a_T ** 2 * FLOW_S ** 2 + s_T ** 2))
    return a_t * FLOW_MU + scale * (x_T - a_T * FLOW_MU)


def fitted_order(run, sde, steps):
    """Convergence order: -slope of log(RMS error at eps = 1e-3) against log(num_steps), for
    ``run(score_fn, sde, x_T, num_steps) -> SampleResult``; returns (order, errors)."""
    eps = 1e-3
    x_T = sde.prior_sampling((8, 4), generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    reference = exact_flow(sde, x_T, eps)
    errors = [(run(flow_problem_score(sde), sde, x_T, n).x - reference).pow(2).mean().sqrt().item()
              for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


# ----------------------------------------------------------------------------- score networks

def perturb_zero_init(model, *, scale: float = 0.05, seed: int = 0) -> None:
    """Give the ~0-initialised layers (the official init_scale=0: variance scale 1e-10, the
    last layer of every residual branch and the output conv) random weights of std ``scale``,
    so that a conditioning that enters before them reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and p.abs().max() < 1e-5:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def check_class_conditioning(plain, model, x, cond, *, num_classes: int, width: int,
                             min_relative_change: float) -> None:
    """``model`` (built with num_classes) adds exactly one (num_classes, width) embedding to
    ``plain``'s state dict, two labels give outputs that differ by more than
    ``min_relative_change`` (mean |a - b| / mean |a|), and both models refuse a call with the
    wrong class_labels with a ValueError naming class_labels."""
    assert set(model.state_dict()) - set(plain.state_dict()) == {"class_embedding.weight"}
    assert tuple(model.class_embedding.weight.shape) == (num_classes, width)
    batch = x.shape[0]
    with torch.no_grad():
        a = model(x, cond, torch.zeros(batch, dtype=torch.long))
        b = model(x, cond, torch.full((batch,), 3, dtype=torch.long))
    assert (a - b).abs().mean() > min_relative_change * a.abs().mean()
    with pytest.raises(ValueError, match="class_labels"):
        model(x, cond)
    with pytest.raises(ValueError, match="class_labels"):
        plain(x, cond, torch.zeros(batch, dtype=torch.long))


def loss_before_and_after_training(model, loss_fn, score_fn, x, *, steps: int, lr: float,
                                   last_layer=None) -> tuple[float, float]:
    """The loss on one fixed batch ``x`` (same times and noise at every call), in eval mode,
    before and after ``steps`` Adam steps on it; ``last_layer`` (a weight tensor), if given,
    must receive a non-zero gradient at every step (the output layer is initialised ~0)."""
    def fixed_loss():
        return loss_fn(score_fn, x, generator=torch.Generator().manual_seed(2))

    model.eval()
    with torch.no_grad():
        before = fixed_loss().item()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        fixed_loss().backward()
        if last_layer is not None:
            assert last_layer.grad.abs().sum() > 0
        opt.step()
    model.eval()
    with torch.no_grad():
        after = fixed_loss().item()
    return before, after
