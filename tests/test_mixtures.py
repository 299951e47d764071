"""Checks of the exact-score test bed itself: sde_lib.GaussianMixture (score, log-density,
sampling, perturbed marginals) and the helpers in tests/testbed.py.

Everything else in the suite trusts these oracles, so they are compared against independent
references: torch.autograd for the score, torch.distributions for the log-density, and
moment / frequency statistics (with standard errors from the sample) for the samplers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

import sde_lib
from sde_lib import GaussianMixture
from testbed import (SDE_PARAMS, Z_MAX, eight_mode_mixture, frechet_distance,
                     frechet_from_moments, gaussian_frechet_to, moment_zscores, random_orthogonal,
                     sample_moments, spread_gaussian)

F64 = torch.float64

DISTS = {
    "eight_modes": lambda: eight_mode_mixture(),
    "eight_modes_aniso": lambda: eight_mode_mixture(seed=3, anisotropy=2.5),
    "gaussian5": lambda: spread_gaussian(dim=5, seed=2),
}
#: (alpha, std): the data itself, almost clean, mid-way, noise-dominated, and VE-like.
COEFFS = [(1.0, 0.0), (1.0, 0.05), (0.8, 0.3), (0.1, 1.0), (1.0, 5.0)]


def _points(dist: GaussianMixture, alpha, std, n: int, seed: int) -> torch.Tensor:
    """n float64 points (n, *event_shape): draws of the perturbed distribution, plus a few far
    out (x 4, x 30) where the responsibilities saturate and log-sum-exp must be stable."""
    gen = torch.Generator().manual_seed(seed)
    x = dist.sample(n, alpha=alpha, std=std, generator=gen, dtype=F64)
    x[: n // 8] *= 4.0
    x[n // 8: n // 4] *= 30.0
    return x


def _reference_log_prob(dist: GaussianMixture, x, alpha: float, std: float) -> torch.Tensor:
    """log p(x) of sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + std^2 I) with torch.distributions."""
    eye = torch.eye(dist.dim, dtype=F64)
    comps = MultivariateNormal(alpha * dist.means, covariance_matrix=alpha ** 2 * dist.covs + std ** 2 * eye)
    ref = MixtureSameFamily(Categorical(probs=dist.weights), comps)
    return ref.log_prob(x.reshape(x.shape[0], -1))


# ----- score and log-density -----------------------------------------------------------------
@pytest.mark.parametrize("alpha, std", COEFFS)
@pytest.mark.parametrize("name", list(DISTS))
def test_score_is_the_gradient_of_log_prob(name, alpha, std):
    dist = DISTS[name]()
    x = _points(dist, alpha, std, 64, seed=1).requires_grad_(True)
    logp = dist.log_prob(x, alpha, std)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    score = dist.score(x.detach(), alpha, std)
    assert score.shape == x.shape and score.dtype == F64 and torch.isfinite(score).all()
    # Same float64 quantities by two routes (autograd of log-sum-exp vs the closed form
    # -sum_k r_k C_k^{-1}(x - alpha mu_k)): agreement to ~1e-13 relative; 1e-10 is generous,
    # and e.g. a wrong responsibility or a missing alpha^2 is O(1) off.
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(DISTS))
def test_score_and_log_prob_with_per_sample_coefficients(name):
    dist = DISTS[name]()
    n = len(COEFFS) * 8
    alpha = torch.tensor([a for a, _ in COEFFS], dtype=F64).repeat_interleave(8)
    std = torch.tensor([s for _, s in COEFFS], dtype=F64).repeat_interleave(8)
    x = torch.cat([_points(dist, a, s, 8, seed=k) for k, (a, s) in enumerate(COEFFS)])
    x.requires_grad_(True)
    logp = dist.log_prob(x, alpha, std)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    score = dist.score(x.detach(), alpha, std)
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)
    # each row equals the scalar-coefficient evaluation, and torch.distributions
    for k, (a, s) in enumerate(COEFFS):
        rows = slice(8 * k, 8 * (k + 1))
        torch.testing.assert_close(logp[rows].detach(), dist.log_prob(x[rows].detach(), a, s),
                                   rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(score[rows], dist.score(x[rows].detach(), a, s),
                                   rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(logp[rows].detach(), _reference_log_prob(dist, x[rows].detach(), a, s),
                                   rtol=1e-10, atol=1e-9)
    assert logp.shape == (n,)


@pytest.mark.parametrize("alpha, std", COEFFS)
@pytest.mark.parametrize("name", list(DISTS))
def test_log_prob_matches_torch_distributions(name, alpha, std):
    dist = DISTS[name]()
    x = _points(dist, alpha, std, 64, seed=2)
    got = dist.log_prob(x, alpha, std)
    assert got.shape == (64,) and got.dtype == F64
    # Cholesky (torch) vs eigendecomposition (GaussianMixture): both float64; log-densities
    # of the far points reach -1e5, hence the relative tolerance.
    torch.testing.assert_close(got, _reference_log_prob(dist, x, alpha, std), rtol=1e-10, atol=1e-9)


def test_log_prob_normalises_in_2d():
    # independent of torch.distributions: integrate p over a grid covering +- 6 sd of every
    # mode (trapezoid in 2-D: for a Gaussian of sd s on a grid of spacing h the error is
    # ~exp(-2 pi^2 s^2 / h^2), negligible for s >= 0.1, h = 0.02; the mass beyond +-4 is < 1e-8)
    dist = eight_mode_mixture(anisotropy=1.5)
    grid = torch.linspace(-4.0, 4.0, 401, dtype=F64)             # spacing 0.02 < sd / 5
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    for alpha, std in [(1.0, 0.0), (0.7, 0.4)]:
        p = dist.log_prob(pts, alpha, std).exp().reshape(401, 401)
        total = torch.trapezoid(torch.trapezoid(p, grid, dim=1), grid).item()
        assert abs(total - 1.0) < 1e-6


# ----- sampling ------------------------------------------------------------------------------
def test_sample_moments_and_component_frequencies():
    dist = eight_mode_mixture(anisotropy=2.0)
    n = 40000
    x, k = dist.sample(n, generator=torch.Generator().manual_seed(7), dtype=F64,
                       return_components=True)
    assert x.shape == (n, 2) and k.shape == (n,) and x.dtype == F64
    # overall moments against mean() / covariance(); SEs from the sample (fourth moments)
    z_mean, z_cov = moment_zscores(x, dist.mean(), dist.covariance())
    assert z_mean.max() < Z_MAX and z_cov.max() < Z_MAX, (z_mean, z_cov)
    # component frequencies: binomial SE sqrt(w (1 - w) / n)
    freq = torch.bincount(k, minlength=8).double() / n
    se = torch.sqrt(dist.weights * (1 - dist.weights) / n)
    assert ((freq - dist.weights).abs() / se).max() < Z_MAX
    # within each component: mean and covariance of its own samples (n_k >= 1000)
    for j in range(8):
        z_mean, z_cov = moment_zscores(x[k == j], dist.means[j], dist.covs[j])
        assert z_mean.max() < Z_MAX and z_cov.max() < Z_MAX, (j, z_mean, z_cov)
    # negative control: a 10% larger within-component std would be seen: the variance is off
    # by 21%, i.e. 0.21 / sqrt(2 / n_k) SE = 5 SE for the smallest component (n_k ~ 1100)
    # and 14 SE for the largest (n_k ~ 8900)
    z_bad = max(moment_zscores(x[k == j], dist.means[j], 1.21 * dist.covs[j])[1].max()
                for j in range(8))
    assert z_bad > Z_MAX


def test_sample_spread_spectrum_along_eigenvectors():
    # the 64-D spread Gaussian: variance along each eigenvector (0.02^2 ... 1.5^2) within SE
    dim, n = 64, 10000       # GaussianMixture.sample gathers (n, D, D) eigenvectors: 330 MB
    dist = spread_gaussian(dim=dim, seed=0)
    x = dist.sample(n, generator=torch.Generator().manual_seed(8), dtype=F64)
    y = (x - dist.mean()) @ dist.eigvecs[0]                         # eigen-coordinates
    var = y.var(dim=0)
    se = dist.eigvals[0] * math.sqrt(2.0 / n)                       # SE of a Gaussian variance
    assert ((var - dist.eigvals[0]).abs() / se).max() < Z_MAX
    stds = torch.logspace(math.log10(0.02), math.log10(1.5), dim, dtype=F64)
    torch.testing.assert_close(dist.eigvals[0].sqrt(), stds, rtol=1e-10, atol=0)
    assert (dist.mean().abs() <= 0.5).all() and dist.mean().abs().max() > 0.3
    z_mean, _ = moment_zscores(x, dist.mean(), dist.covariance())
    assert z_mean.max() < Z_MAX


def test_sample_with_alpha_std_and_dtypes():
    dist = spread_gaussian(dim=5, seed=4)
    n = 20000
    x = dist.sample(n, alpha=0.6, std=0.5, generator=torch.Generator().manual_seed(9))
    assert x.dtype == torch.float32 and x.shape == (n, 5)
    z_mean, z_cov = moment_zscores(x, 0.6 * dist.mean(), 0.36 * dist.covariance() + 0.25 * torch.eye(5, dtype=F64))
    assert z_mean.max() < Z_MAX and z_cov.max() < Z_MAX
    # reproducible with a generator
    a = dist.sample(10, generator=torch.Generator().manual_seed(1))
    b = dist.sample(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("make_sde", SDE_PARAMS)
@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
def test_sample_marginal_matches_marginal_moments(make_sde, t):
    sde = make_sde()
    dist = eight_mode_mixture()
    n = 20000
    x = dist.sample_marginal(sde, t, n, generator=torch.Generator().manual_seed(10), dtype=F64)
    alpha, std = (v.item() for v in sde.marginal_coeffs(torch.tensor(t, dtype=F64)))
    z_mean, z_cov = moment_zscores(x, alpha * dist.mean(),
                                   alpha ** 2 * dist.covariance() + std ** 2 * torch.eye(2, dtype=F64))
    assert z_mean.max() < Z_MAX and z_cov.max() < Z_MAX, (z_mean, z_cov)
    # and p_t is the mixture with perturbed components: the sample log-likelihood under
    # log_prob(., alpha, std) matches its expectation, estimated on a second independent draw
    # (difference of two means of iid values: SE = sqrt(var_1/n + var_2/n))
    y = dist.sample_marginal(sde, t, n, generator=torch.Generator().manual_seed(11), dtype=F64)
    lx, ly = dist.marginal_log_prob(sde, x, t), dist.log_prob(y, alpha, std)
    se = math.sqrt(lx.var().item() / n + ly.var().item() / n)
    assert abs(lx.mean().item() - ly.mean().item()) < Z_MAX * se


# ----- the marginal helpers and shapes ------------------------------------------------------
@pytest.mark.parametrize("make_sde", SDE_PARAMS)
def test_marginal_score_and_score_fn(make_sde):
    sde = make_sde()
    dist = eight_mode_mixture()
    x = _points(dist, 1.0, 0.2, 16, seed=5)
    t = torch.linspace(0.01, 1.0, 16, dtype=F64)
    alpha, std = sde.marginal_coeffs(t)
    expected = dist.score(x, alpha, std)
    torch.testing.assert_close(dist.marginal_score(sde, x, t), expected, rtol=0, atol=0)
    torch.testing.assert_close(dist.score_fn(sde)(x, t), expected, rtol=0, atol=0)
    torch.testing.assert_close(dist.marginal_log_prob(sde, x, t), dist.log_prob(x, alpha, std),
                               rtol=0, atol=0)
    # a Python-float time, and float32 inputs (score in x's dtype, float64 inside)
    a, s = (v.item() for v in sde.marginal_coeffs(torch.tensor(0.3, dtype=F64)))
    torch.testing.assert_close(dist.marginal_score(sde, x, 0.3), dist.score(x, a, s),
                               rtol=1e-12, atol=1e-12)
    s32 = dist.marginal_score(sde, x.float(), t.float())
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_image_event_shape():
    dist = spread_gaussian(dim=16, seed=6, event_shape=(1, 4, 4))
    flat = spread_gaussian(dim=16, seed=6)
    assert dist.event_shape == (1, 4, 4) and dist.dim == 16
    x = dist.sample(300, generator=torch.Generator().manual_seed(12), dtype=F64)
    assert x.shape == (300, 1, 4, 4)
    xf = flat.sample(300, generator=torch.Generator().manual_seed(12), dtype=F64)
    torch.testing.assert_close(x.reshape(300, 16), xf, rtol=0, atol=0)
    sde = sde_lib.VPSDE()
    t = torch.rand(300, generator=torch.Generator().manual_seed(13), dtype=F64)
    score = dist.marginal_score(sde, x, t)
    assert score.shape == (300, 1, 4, 4)
    torch.testing.assert_close(score.reshape(300, 16), flat.marginal_score(sde, xf, t), rtol=0, atol=0)
    logp = dist.marginal_log_prob(sde, x, t)
    assert logp.shape == (300,)
    # per-pixel check of the image layout: autograd of log_prob in image shape
    xg = x[:8].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dist.marginal_log_prob(sde, xg, t[:8]).sum(), xg)
    torch.testing.assert_close(score[:8], grad, rtol=1e-10, atol=1e-10)
    z_mean, _ = moment_zscores(x, dist.mean(), dist.covariance())
    assert z_mean.max() < Z_MAX


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=torch.ones(3), means=torch.zeros(2, 2), covs=torch.eye(2).expand(2, 2, 2)), "weights"),
    (dict(weights=torch.ones(2), means=torch.zeros(2), covs=torch.eye(2).expand(2, 2, 2)), "means"),
    (dict(weights=torch.ones(2), means=torch.zeros(2, 2), covs=torch.eye(3).expand(2, 3, 3)), "covs"),
    (dict(weights=torch.tensor([1.0, 0.0]), means=torch.zeros(2, 2), covs=torch.eye(2).expand(2, 2, 2)),
     "weights"),
    (dict(weights=torch.tensor([1.0, -1.0]), means=torch.zeros(2, 2), covs=torch.eye(2).expand(2, 2, 2)),
     "weights"),
    (dict(weights=torch.ones(1), means=torch.zeros(1, 2), covs=torch.tensor([[[1.0, 0.0], [0.0, -0.5]]])),
     "semi-definite"),
    (dict(weights=torch.ones(1), means=torch.zeros(1, 4), covs=torch.eye(4)[None], event_shape=(1, 3, 3)),
     "event_shape"),
], ids=["weights-shape", "means-1d", "covs-shape", "zero-weight", "negative-weight", "not-psd",
        "event-shape"])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


# ----- the test bed's own distributions and helpers -----------------------------------------
def test_testbed_distributions():
    mix = eight_mode_mixture()
    assert mix.num_components == 8 and mix.dim == 2
    torch.testing.assert_close(mix.means.norm(dim=1), torch.full((8,), 2.0, dtype=F64))
    torch.testing.assert_close(mix.weights, torch.arange(1, 9, dtype=F64) / 36)
    torch.testing.assert_close(mix.covs, 0.0225 * torch.eye(2, dtype=F64).expand(8, 2, 2))
    # anisotropy stretches the tangential direction only
    aniso = eight_mode_mixture(anisotropy=2.0)
    tangent = torch.tensor([0.0, 1.0], dtype=F64)                 # at the mode on the x axis
    assert abs(tangent @ aniso.covs[0] @ tangent - 4 * 0.0225) < 1e-15
    q = random_orthogonal(6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(6, dtype=F64), rtol=0, atol=1e-13)
    # seeded: same seed, same data
    torch.testing.assert_close(spread_gaussian(8, seed=5).covs, spread_gaussian(8, seed=5).covs)
    assert not torch.allclose(spread_gaussian(8, seed=5).covs, spread_gaussian(8, seed=6).covs)


@pytest.mark.skipif(not hasattr(sde_lib, "spread_gaussian") or not hasattr(sde_lib, "eight_mode_mixture"),
                    reason="sde_lib has no built-in toy distributions")
def test_library_toy_distributions_agree_with_testbed():
    lib, ours = sde_lib.eight_mode_mixture(), eight_mode_mixture()
    for attr in ("weights", "means", "covs"):
        torch.testing.assert_close(getattr(lib, attr), getattr(ours, attr), rtol=1e-14, atol=1e-15)
    lib, ours = sde_lib.spread_gaussian(dim=12, seed=3), spread_gaussian(dim=12, seed=3)
    for attr in ("weights", "means", "covs"):
        torch.testing.assert_close(getattr(lib, attr), getattr(ours, attr), rtol=1e-12, atol=1e-14)


def test_frechet_from_moments_closed_forms():
    # commuting (diagonal) covariances: |dmu|^2 + sum (sqrt a_i - sqrt b_i)^2
    a, b = torch.tensor([0.5, 2.0, 1e-6]), torch.tensor([1.5, 0.1, 3.0])
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.3, 1.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((a.double().sqrt() - b.double().sqrt()) ** 2).sum()
    got = frechet_from_moments(mu1, torch.diag(a), mu2, torch.diag(b))
    assert abs(got - expected.item()) < 1e-6
    # general covariances: the textbook formula with scipy's sqrtm(S1 S2)
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    got = frechet_from_moments(mu1, s1, mu2, s2)
    assert abs(got - ref) < 1e-8 * abs(ref)
    assert abs(got - frechet_from_moments(mu2, s2, mu1, s1)) < 1e-8 * abs(ref)   # symmetric
    # identical covariances give 0; singular (rank-1) ones a finite result, 0 up to the
    # square-root round-off sqrt(eps) * tr(S) ~ 1e-7 of the zero eigenvalues (sqrtm fares worse)
    assert abs(frechet_from_moments(mu1, s1, mu1, s1)) < 1e-10 * np.trace(s1)
    v = rng.normal(size=(6, 1))
    singular = v @ v.T
    got = frechet_from_moments(mu1, singular, mu1, singular)
    assert math.isfinite(got) and abs(got) < 1e-6 * np.trace(singular)
    w = rng.normal(size=(6, 1))
    got = frechet_from_moments(mu1, singular, mu1, w @ w.T)      # two rank-1 covariances:
    exact = (v ** 2).sum() + (w ** 2).sum() - 2 * abs((v * w).sum())   # tr(v v^T w w^T)^(1/2)
    assert abs(got - exact) < 1e-6 * exact


def test_frechet_distance_of_samples():
    dist = spread_gaussian(dim=8, seed=1)
    gen = torch.Generator().manual_seed(14)
    x = dist.sample(20000, generator=gen, dtype=F64)
    y = dist.sample(20000, generator=gen, dtype=F64)
    shifted = y + 0.2                                            # exact FD: 8 * 0.04 = 0.32
    mu, cov = sample_moments(x)
    assert abs(gaussian_frechet_to(dist, x)
               - frechet_from_moments(mu, cov, dist.mean(), dist.covariance())) < 1e-12
    # sampling error of the FD is O(tr(Sigma) / n) ~ 1e-4 here (tr(Sigma) ~ 3.5)
    assert gaussian_frechet_to(dist, x) < 3e-3
    assert frechet_distance(x, y) < 3e-3
    assert abs(frechet_distance(x, shifted) - 0.32) < 0.02
    # image-shaped samples are flattened
    assert abs(frechet_distance(x.reshape(-1, 2, 2, 2), y.reshape(-1, 2, 2, 2)) - frechet_distance(x, y)) < 1e-12
