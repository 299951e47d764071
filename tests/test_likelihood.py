"""Log-likelihoods through the probability-flow ODE and bits/dim (samplers/likelihood.py),
against the exact log-densities of the test bed.

With the exact score the ODE transports p_eps to p_T exactly, so

    logp_hat(x) - log p_eps(x) = [prior_logp(z) - log p_T(z)] + solver error (+ probe noise),

where the bracket (replacing p_T by the prior, as the Score SDE code does) is known exactly
per sample. For zero-mean data it is below 1e-3 nats for all three SDEs; the test bed's
spread Gaussian has |mean| = 2.3, which under VE (sigma_max = 50) makes it 0.03 nats on
average, so that case is checked separately with the bracket taken out.
"""
from __future__ import annotations

import math

import pytest
import torch

import sde_lib
from samplers.likelihood import (MAX_EXACT_TRACE_DIM, PROBE_NOISES, TRACE_ESTIMATORS,
                                 BitsPerDimResult, LikelihoodResult, bits_per_dim,
                                 log_likelihood)
from sde_lib import GaussianMixture
from testbed import SDE_PARAMS, Z_MAX, eight_mode_mixture, spread_gaussian

F64 = torch.float64
EPS = 1e-5          # the likelihood's default eps (as in the Score SDE code)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def centred_gaussian() -> GaussianMixture:
    """The 64-D spread-spectrum Gaussian of the test bed (stds 0.02 .. 1.5, rotated), mean 0."""
    dist = spread_gaussian()
    return GaussianMixture.gaussian(torch.zeros(dist.dim, dtype=F64), dist.covs[0])


DATA = {  # name -> (distribution factory, number of test points)
    "gaussian64": (centred_gaussian, 128),
    "eight_modes": (eight_mode_mixture, 1000),
}


def _points(dist: GaussianMixture, sde, n: int, seed: int, dtype=torch.float32):
    """n draws of p_eps, the data the likelihood is evaluated at."""
    return dist.sample_marginal(sde, EPS, n, generator=_gen(seed), dtype=dtype)


def _prior_substitution(dist: GaussianMixture, sde, z: torch.Tensor) -> torch.Tensor:
    """prior_logp(z) - log p_T(z): the error of replacing p_T by the prior, (B,) float64."""
    z = z.to(F64)
    return sde.prior_logp(z) - dist.marginal_log_prob(sde, z, sde.T)


# ----- exact trace -------------------------------------------------------------------------
@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("make_sde", SDE_PARAMS)
def test_exact_trace_matches_the_true_log_density(make_sde, data):
    """Mean absolute error <= 0.02 nats per sample against log p_eps(x).

    The error is deterministic (no probes): the prior substitution (< 1e-3 here, and taken
    out in the second check) plus the solver error at rtol = atol = 1e-5, measured at
    1e-4 .. 4e-3 nats MAE (it falls to < 1e-4 at 1e-7 tolerances), so 0.01 after removing
    the prior term and 0.02 overall leave room for rounding while an error in the drift's
    divergence (-beta D / 2 for VP), in the g^2 / 2 factor or in the time placement of x
    costs nats.
    """
    sde = make_sde()
    make_dist, n = DATA[data]
    dist = make_dist()
    x = _points(dist, sde, n, seed=1)
    result = log_likelihood(dist.score_fn(sde), sde, x, trace="exact")
    assert isinstance(result, LikelihoodResult)
    assert result.logp.shape == (n,) and result.logp.dtype == torch.float32
    assert result.z.shape == x.shape and result.nfe > 10
    error = result.logp.to(F64) - dist.marginal_log_prob(sde, x, EPS)
    solver_error = error - _prior_substitution(dist, sde, result.z)
    assert error.abs().mean() <= 0.02, f"MAE {error.abs().mean():.4g}"
    assert solver_error.abs().mean() <= 0.01, f"solver MAE {solver_error.abs().mean():.4g}"


@pytest.mark.parametrize("make_sde", SDE_PARAMS)
def test_remaining_error_is_the_prior_substitution(make_sde):
    """On the test bed's uncentred spread Gaussian (|mean| = 2.3) the error is dominated by
    replacing p_T with the prior (VE: MAE ~0.03 nats, VP / sub-VP ~0.01); once that exactly
    known term is removed, what is left is the solver error (<= 0.01, see above)."""
    sde = make_sde()
    dist = spread_gaussian()
    x = _points(dist, sde, 64, seed=2)
    result = log_likelihood(dist.score_fn(sde), sde, x, trace="exact")
    error = result.logp.to(F64) - dist.marginal_log_prob(sde, x, EPS)
    prior_term = _prior_substitution(dist, sde, result.z)
    assert (error - prior_term).abs().mean() <= 0.01
    assert prior_term.abs().mean() > 3 * (error - prior_term).abs().mean()


def test_scipy_rk45_and_rk4_agree_with_dopri5():
    """The Score SDE code's solver (scipy RK45 on the flat float64 state) and a fixed-grid rk4
    give the same log-densities as dopri5 (per-sample differences < 0.01 nats; each is
    within ~1e-3 of the truth)."""
    sde = sde_lib.VPSDE()
    dist = eight_mode_mixture()
    x = _points(dist, sde, 200, seed=3, dtype=F64)
    ref = log_likelihood(dist.score_fn(sde), sde, x, trace="exact")
    for kwargs in ({"method": "scipy_rk45"}, {"method": "rk4", "num_steps": 200}):
        other = log_likelihood(dist.score_fn(sde), sde, x, trace="exact", **kwargs)
        assert other.logp.dtype == F64
        assert (other.logp - ref.logp).abs().max() < 0.01, kwargs
        if kwargs["method"] == "rk4":
            assert other.nfe == 4 * 200


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "scipy_rk45"])
def test_likelihood_score_times_stay_inside_eps_T(method):
    """Integrating upwards from eps to T the score sees only times in [eps, T], starts at eps,
    and the steps land on T (at most the last step's c = 1 stages sit there)."""
    sde = sde_lib.VESDE()
    dist = eight_mode_mixture()
    exact = dist.score_fn(sde)
    times, sizes = [], []

    def recording(x, t):
        times.append(float(t[0]))
        sizes.append(x.shape[0])
        assert t.dtype == F64 and torch.all(t == t[0])
        return exact(x, t)

    x = _points(dist, sde, 32, seed=4)
    result = log_likelihood(recording, sde, x, method=method, probes=3, generator=_gen(0))
    assert result.nfe == len(times) > 10
    assert set(sizes) == {3 * 32}                      # one batched call per evaluation
    assert min(times) >= EPS and max(times) <= sde.T and times[0] == EPS
    assert max(times) >= sde.T * (1 - 1e-6)
    assert sum(t >= sde.T * (1 - 1e-5) for t in times) <= 3


# ----- Hutchinson --------------------------------------------------------------------------
def _hutchinson_variance(dist: GaussianMixture, sde, noise: str) -> float:
    """Exact variance of one fixed-probe Hutchinson estimate for Gaussian data.

    For N(mu, Sigma = Q diag(s^2) Q^T) the ODE's Jacobian is dv/dx = f I + g^2/2 Sigma_t^{-1}
    with Sigma_t = alpha^2 Sigma + std^2 I, whose eigenvalues are V_i'/(2 V_i)
    (V_i = alpha^2 s_i^2 + std^2 obeys V' = 2 f V + g^2). With the probe e fixed along the
    path the estimate of int div v dt is e^T A e, A = Q diag(a) Q^T, a_i = log(V_i(T) /
    V_i(eps)) / 2: variance 2 ||A||_F^2 for Gaussian probes and 2 (||A||_F^2 - sum_j A_jj^2)
    for Rademacher ones. (Redrawing the probes at each evaluation would average them and
    give a far smaller variance.)
    """
    t = torch.tensor([EPS, sde.T], dtype=F64)
    alpha, std = sde.marginal_coeffs(t)
    s2 = dist.eigvals[0]
    a = 0.5 * torch.log((alpha[1] ** 2 * s2 + std[1] ** 2) / (alpha[0] ** 2 * s2 + std[0] ** 2))
    q = dist.eigvecs[0]
    A = q @ torch.diag(a) @ q.T
    frob2 = (A ** 2).sum().item()
    return 2 * frob2 if noise == "gaussian" else 2 * (frob2 - (torch.diagonal(A) ** 2).sum().item())


@pytest.mark.parametrize("noise", list(PROBE_NOISES))
@pytest.mark.parametrize("make_sde", SDE_PARAMS)
def test_hutchinson_is_unbiased_and_probes_cut_its_sd(make_sde, noise):
    """Hutchinson estimates on the centred 64-D Gaussian, 256 points, K = 1 and 16 probes:

    * mean error within 3 standard errors (SD / sqrt(n)) of zero (the deterministic part,
      <= 0.004 nats, is < 1% of an SE);
    * per-sample SD of the error equal to the exact SD of the fixed-probe estimator / sqrt(K)
      within Z_MAX standard errors of log SD, SE(log SD) = sqrt((kurtosis - 1) / (4 n)) from
      the sample (about 0.05, i.e. within ~25%);
    * SD(K=1) / SD(K=16) within [0.6, 1.5] x sqrt(16).
    """
    sde = make_sde()
    dist = centred_gaussian()
    n = 256
    x = _points(dist, sde, n, seed=5)
    truth = dist.marginal_log_prob(sde, x, EPS)
    predicted_sd = math.sqrt(_hutchinson_variance(dist, sde, noise))
    sds = {}
    for k in (1, 16):
        result = log_likelihood(dist.score_fn(sde), sde, x, probes=k, noise=noise,
                                generator=_gen(10 + k))
        error = result.logp.to(F64) - truth
        sd = error.std().item()
        assert abs(error.mean().item()) <= 3 * sd / math.sqrt(n), (k, error.mean(), sd)
        centred = error - error.mean()
        kurtosis = (centred ** 4).mean().item() / (centred ** 2).mean().item() ** 2
        se_log_sd = math.sqrt((kurtosis - 1) / (4 * n))
        z = abs(math.log(sd / (predicted_sd / math.sqrt(k)))) / se_log_sd
        assert z <= Z_MAX, (k, sd, predicted_sd / math.sqrt(k), z)
        sds[k] = sd
    ratio = sds[1] / sds[16]
    assert 0.6 * 4 <= ratio <= 1.5 * 4, ratio


@pytest.mark.parametrize("method", ["dopri5", "scipy_rk45"])
def test_non_finite_scores_raise_with_the_time(method):
    sde = sde_lib.VPSDE()
    score = eight_mode_mixture().score_fn(sde)

    def bad_score(x, t):
        s = score(x, t)
        return torch.where(t[0] > 0.5, torch.full_like(s, math.nan), s)

    with pytest.raises(FloatingPointError, match=r"log_likelihood.*non-finite values at t=0\.[5-9]"):
        log_likelihood(bad_score, sde, torch.zeros(4, 2), method=method, generator=_gen(0))


def test_hutchinson_is_reproducible_with_a_seed():
    sde = sde_lib.subVPSDE()
    dist = eight_mode_mixture()
    x = _points(dist, sde, 16, seed=6)
    a = log_likelihood(dist.score_fn(sde), sde, x, noise="gaussian", generator=_gen(1))
    b = log_likelihood(dist.score_fn(sde), sde, x, noise="gaussian", generator=_gen(1))
    c = log_likelihood(dist.score_fn(sde), sde, x, noise="gaussian", generator=_gen(2))
    torch.testing.assert_close(a.logp, b.logp, rtol=0, atol=0)
    assert (a.logp - c.logp).abs().max() > 1e-3


def test_no_graph_is_kept():
    """A score with trainable parameters and an input that requires grad: the results are
    detached and no gradient reaches either."""
    sde = sde_lib.VPSDE()
    dist = eight_mode_mixture()
    exact = dist.score_fn(sde)
    scale = torch.nn.Parameter(torch.tensor(1.0))
    x = _points(dist, sde, 8, seed=7).requires_grad_(True)
    result = log_likelihood(lambda y, t: scale * exact(y, t), sde, x, generator=_gen(0))
    assert not result.logp.requires_grad and result.logp.grad_fn is None
    assert not result.z.requires_grad
    assert scale.grad is None and x.grad is None


# ----- bits per dimension ------------------------------------------------------------------
def _image_model(centered: bool) -> GaussianMixture:
    """A rotated Gaussian on (3, 4, 4) images: stds 0.02 .. 0.25 in [-1, 1] space (halved
    for data in [0, 1]), mean in [-0.5, 0.5] (mapped to [0.25, 0.75])."""
    dist = spread_gaussian(dim=48, seed=4, std_min=0.02, std_max=0.25)
    mean, cov = dist.means[0], dist.covs[0]
    if not centered:
        mean, cov = (mean + 1) / 2, cov / 4
    return GaussianMixture.gaussian(mean, cov, event_shape=(3, 4, 4))


def _images(n: int, seed: int) -> torch.Tensor:
    """8-bit images (n, 3, 4, 4) quantised from draws of the centred model."""
    y = _image_model(True).sample(n, generator=_gen(seed), dtype=F64)
    return ((y + 1) / 2 * 256).floor().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("dequantize", [False, True])
@pytest.mark.parametrize("centered", [True, False])
def test_bits_per_dim_against_the_true_density(centered, dequantize):
    """bpd = -(log p(y) + D log|dy/du|) / (D ln 2) + 8 with the true log p of the model, on
    (B, 3, 4, 4) uint8 images. The dequantization noise is reproduced from the documented
    draw (torch.rand with the same seed). For centered data this is the Score SDE code's
    -log p(y) / (D ln 2) + 7. The solver error (~1e-3 nats, see above) is 3e-5 bits/dim at
    D = 48; the test allows 1e-3 (0.033 nats per image), while a wrong log 2 or log 256
    term would be off by 1 bit/dim or more."""
    sde = sde_lib.VPSDE()
    dist = _image_model(centered)
    images = _images(32, seed=8)
    result = bits_per_dim(dist.score_fn(sde), sde, images, centered=centered,
                          dequantize=dequantize, generator=_gen(9), trace="exact")
    assert isinstance(result, BitsPerDimResult)
    assert result.bpd.shape == (32,) and result.bpd.dtype == torch.float32
    assert result.logp.shape == (32,) and result.z.shape == (32, 3, 4, 4)

    if dequantize:
        noise = torch.rand(images.shape, generator=_gen(9), dtype=torch.float32)
    else:
        noise = torch.full(images.shape, 0.5)
    u = (images.to(torch.float32) + noise) / 256
    y = 2 * u - 1 if centered else u
    # what the exact ODE gives: log p_eps(y), plus the known prior-substitution term (up to
    # 0.06 nats here: the data mean is ~0.5 per pixel in [0, 1] space)
    logp = dist.marginal_log_prob(sde, y, EPS) + _prior_substitution(dist, sde, result.z)
    D = 48
    if centered:
        expected = -logp / (D * math.log(2)) + 7          # the Score SDE code's formula
    else:
        expected = -logp / (D * math.log(2)) + 8
    assert (result.bpd.to(F64) - expected).abs().max() <= 1e-3
    assert 0.0 < expected.mean() < 8.0                    # a sensible, non-trivial value


def test_bits_per_dim_input_types():
    """uint8 and integer-valued float64 images give the same numbers (float64 result for
    float64 input); non-integer, out-of-range and flat inputs are refused."""
    sde = sde_lib.subVPSDE()
    dist = _image_model(True)
    images = _images(4, seed=10)
    kwargs = dict(dequantize=False, trace="exact")
    a = bits_per_dim(dist.score_fn(sde), sde, images, dtype=F64, **kwargs)
    b = bits_per_dim(dist.score_fn(sde), sde, images.to(F64), **kwargs)
    assert a.bpd.dtype == b.bpd.dtype == F64
    torch.testing.assert_close(a.bpd, b.bpd, rtol=0, atol=0)
    with pytest.raises(ValueError, match="integer"):
        bits_per_dim(dist.score_fn(sde), sde, images.to(F64) / 255, **kwargs)
    with pytest.raises(ValueError, match="0..255"):
        bits_per_dim(dist.score_fn(sde), sde, images.to(torch.int64) + 200, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        bits_per_dim(dist.score_fn(sde), sde, images.reshape(-1), **kwargs)


# ----- bad input ---------------------------------------------------------------------------
def _never_called(x, t):
    raise AssertionError("the score must not be evaluated for invalid input")


def test_unknown_names_list_the_valid_ones():
    sde = sde_lib.VPSDE()
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError) as info:
        log_likelihood(_never_called, sde, x, trace="skilling")
    assert all(name in str(info.value) for name in TRACE_ESTIMATORS)
    with pytest.raises(ValueError) as info:
        log_likelihood(_never_called, sde, x, noise="uniform")
    assert all(name in str(info.value) for name in PROBE_NOISES)
    with pytest.raises(ValueError) as info:
        log_likelihood(_never_called, sde, x, method="rk45")
    assert "dopri5" in str(info.value) and "scipy_rk45" in str(info.value)


@pytest.mark.parametrize("kwargs, x, match", [
    ({"probes": 0}, torch.zeros(2, 2), "probes"),
    ({"probes": 2.0}, torch.zeros(2, 2), "probes"),
    ({"probes": True}, torch.zeros(2, 2), "probes"),
    ({"trace": "exact"}, torch.zeros(1, MAX_EXACT_TRACE_DIM + 1), "hutchinson"),
    ({}, torch.zeros(2, 2, dtype=torch.long), "floating"),
    ({}, torch.zeros(2), "shape"),
    ({"eps": 0.0}, torch.zeros(2, 2), "eps"),
    ({"num_steps": 10}, torch.zeros(2, 2), "fixed-grid"),
])
def test_bad_arguments_raise(kwargs, x, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(_never_called, sde_lib.VPSDE(), x, **kwargs)
