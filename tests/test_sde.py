"""Tests of the forward SDEs in sde_lib.sdes: marginals, discrete chains, priors, log-SNR,
reverse drifts, dtype handling, validation and the DDPM time index.

Statistical checks use fixed generator seeds (the suite is deterministic) and tolerances in
units of the standard error (SE) of the statistic; each states where its SE comes from.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

import sde_lib
from run_lib import compose
from testbed import (SDE_PARAMS, Z_MAX, correlated_gaussian, moment_standard_errors,
                     moment_zscores)

F64 = torch.float64
#: The VP SDEs given by their schedule (sde_lib/schedules.py; tests/test_schedules.py), added
#: to the generic checks below.
SCHEDULE_PARAMS = [pytest.param(sde_lib.CosineVPSDE, id="cosine_vpsde"),
                   pytest.param(sde_lib.LinearLogSNRVPSDE, id="logsnr_vpsde")]


def _t(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=F64)


# ----- a. marginal_prob vs an Euler-Maruyama simulation of sde.sde ---------------------------
EM_STEPS = 1000          # dt = 1e-3
EM_PATHS = 20000
EM_TIMES = (0.1, 0.5, 1.0)


def _em_moment_coeffs(sde, steps: int, var0: float):
    """Exact moments of the Euler-Maruyama chain x_{k+1} = x_k + f(x_k, t_k) h + g(t_k) sqrt(h) z.

    The drift is linear, f = a(t) x, so if x_0 has mean mu and covariance Sigma + var0 I then
    x_k has mean A_k mu and covariance A_k^2 Sigma + V_k I with
        A_{k+1} = (1 + a_k h) A_k,   V_{k+1} = (1 + a_k h)^2 V_k + g_k^2 h.
    Returns (A, V), float64 tensors (steps + 1,), index k = time k h.
    """
    h = sde.T / steps
    t = torch.arange(steps, dtype=F64) * h
    drift, g = sde.sde(torch.ones(steps, 1, dtype=F64), t)                # a_k = drift on x=1
    c = 1.0 + drift[:, 0] * h
    A = torch.cat([_t([1.0]), torch.cumprod(c, 0)])
    V = [var0]
    for k in range(steps):
        V.append(c[k].item() ** 2 * V[-1] + g[k].item() ** 2 * h)
    return A, _t(V)


@pytest.mark.parametrize("make_sde", SDE_PARAMS + [
    pytest.param(sde_lib.LinearLogSNRVPSDE, id="logsnr_vpsde", marks=pytest.mark.slow)])
def test_marginal_prob_matches_euler_maruyama_simulation(make_sde):
    # (not the cosine schedule: its rate near T, up to beta_clip = 6908, makes Euler-Maruyama
    # at dt = 1e-3 overshoot (1 - beta dt / 2 = -2.5); tests/test_schedules.py checks it by
    # quadrature instead. The log-SNR case (~3-5 s) is marked slow.)
    sde = make_sde()
    dist = correlated_gaussian(3)
    mu, sigma, eye = dist.mean(), dist.covariance(), torch.eye(3, dtype=F64)
    gen = torch.Generator().manual_seed(1234)

    # x_0 ~ p_0: the data perturbed with marginal_prob at t=0 (std(0) = 0 for VP / sub-VP;
    # sigma_min for VE, whose p_0 is the data smoothed at sigma_min).
    x = dist.sample(EM_PATHS, generator=gen, dtype=F64)
    mean0, std0 = sde.marginal_prob(x, 0.0)
    x = mean0 + std0[:, None] * torch.randn(x.shape, generator=gen, dtype=F64)

    # Discretization bias allowance: EM moments of a linear SDE are known in closed form
    # (_em_moment_coeffs), so the allowance is the *exact* O(dt) bias |EM - continuous| of
    # each moment, not a guess. (For dt = 1e-3: up to 1.2% of alpha and 1.7% of std^2.)
    A, V = _em_moment_coeffs(sde, EM_STEPS, std0[0].item() ** 2)

    h = sde.T / EM_STEPS
    checked = 0
    for k in range(EM_STEPS):
        drift, g = sde.sde(x, k * h)
        x = x + drift * h + g[:, None] * math.sqrt(h) * torch.randn(x.shape, generator=gen, dtype=F64)
        t = round((k + 1) * h, 9)
        if t not in EM_TIMES:
            continue
        alpha, std = sde.marginal_coeffs(_t(t))
        # what marginal_prob says p_t is: mean alpha mu, covariance alpha^2 Sigma + std^2 I
        mean_t, std_t = sde.marginal_prob(mu[None], t)
        assert torch.allclose(mean_t[0], alpha * mu, rtol=1e-12) and abs(std_t.item() - std.item()) < 1e-12
        cov_t = alpha ** 2 * sigma + std ** 2 * eye
        em_mean, em_cov = A[k + 1] * mu, A[k + 1] ** 2 * sigma + V[k + 1] * eye
        allow_mean = (em_mean - mean_t[0]).abs().numpy()
        allow_cov = (em_cov - cov_t).abs().numpy()

        z_mean, z_cov = moment_zscores(x, mean_t[0], cov_t,
                                       mean_allowance=allow_mean, cov_allowance=allow_cov)
        assert z_mean.max() < Z_MAX, f"t={t}: mean z-scores {z_mean}"
        assert z_cov.max() < Z_MAX, f"t={t}: covariance z-scores {z_cov}"
        # The allowance must stay below one SE, or it would blunt the test (it is O(dt)).
        se_mean, se_cov = moment_standard_errors(x)
        assert (allow_mean / se_mean).max() < 1.0 and (allow_cov / se_cov).max() < 1.0

        # Negative controls: the same statistic must reject a 5% error in std (at t = 1, where
        # the noise dominates the variance) and in alpha (at t = 0.1, where |alpha mu| ~ 1).
        if t == 1.0:
            _, z_bad = moment_zscores(x, mean_t[0], alpha ** 2 * sigma + (1.05 * std) ** 2 * eye,
                                      mean_allowance=allow_mean, cov_allowance=allow_cov)
            assert z_bad.max() > Z_MAX + 3, f"a 5% std error went unnoticed: {z_bad}"
        if t == 0.1:
            z_bad, _ = moment_zscores(x, 1.05 * alpha * mu, cov_t,
                                      mean_allowance=allow_mean, cov_allowance=allow_cov)
            assert z_bad.max() > Z_MAX + 3, f"a 5% alpha error went unnoticed: {z_bad}"
        checked += 1
    assert checked == len(EM_TIMES)            # every time, incl. both negative controls, ran


# ----- b. the discrete Markov chains ---------------------------------------------------------
def _propagate_chain(sde, N: int):
    """Moments of the chain x_i = x_{i-1} + f_i + G_i z over steps i = 0..N-1 at t_i = i T/(N-1).

    f is linear in x (f_i = c_i x - x), so from x_{-1} with mean m and variance v the chain has
    mean A_i m and variance A_i^2 v + V_i, with A_i = prod_{j<=i} (1 + f-coeff_j) and
    V_i = (1 + f-coeff_i)^2 V_{i-1} + G_i^2, V_{-1} = 0. The coefficients come from calling
    discretize on x = 1. Returns (A, V), float64 (N,).
    """
    t = sde.index_time(torch.arange(N))
    f, G = sde.discretize(torch.ones(N, 1, dtype=F64), t)
    c = (1.0 + f[:, 0]).tolist()
    g2 = (G ** 2).tolist()
    A, V, a, v = [], [], 1.0, 0.0
    for ci, gi in zip(c, g2):
        a, v = ci * a, ci ** 2 * v + gi
        A.append(a)
        V.append(v)
    return _t(A), _t(V)


def test_vp_discretize_is_the_ddpm_chain():
    N = 1000
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=N)
    A, V = _propagate_chain(sde, N)
    # DDPM: beta_i = beta_min/N + i/(N-1) (beta_max - beta_min)/N, alpha-bar_i = prod (1 - beta_j)
    i = torch.arange(N, dtype=F64)
    betas = sde.beta_min / N + i / (N - 1) * (sde.beta_max - sde.beta_min) / N
    abar = torch.cumprod(1.0 - betas, dim=0)
    # Both are O(N) products of float64 numbers: round-off ~N * 1e-16 = 1e-13 << 1e-10.
    torch.testing.assert_close(A, abar.sqrt(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(V, 1.0 - abar, rtol=1e-10, atol=1e-14)
    a_i, s_i = sde.discrete_marginal_coeffs(torch.arange(N))
    torch.testing.assert_close(a_i, abar.sqrt(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(s_i, (1.0 - abar).sqrt(), rtol=1e-10, atol=1e-14)

    # Closeness to the continuous VP marginal at t_i = i/(N-1). With beta linear and
    # log(1 - b) = -b - b^2/2 - b^3/3 - ..., Euler-Maclaurin on the sums gives
    #   log abar_i - log alpha(t_i)^2 = e1 + O(1/N^2),
    #   e1 = [B(t) - (beta_min + beta(t))/2 - I2(t)/2] / N,         I_p(t) = int_0^t beta^p,
    # and the 1/N^2 terms are I2/(2N^2) - (beta_min^2 + beta(t)^2)/(4N^2) - I3/(3N^2), bounded
    # by e2 = [I2/2 + (beta_min^2 + beta^2)/4 + I3/3] / N^2; the factor 1.5 covers the O(1/N^3)
    # rest (measured: about 1% of e2 at N=1000). At t=1: e1 = -0.067, e2 = 8.5e-4.
    alpha, std = sde.marginal_coeffs(sde.index_time(torch.arange(N)))
    t = i / (N - 1)
    bmin, slope = sde.beta_min, sde.beta_max - sde.beta_min
    beta_t, B = bmin + slope * t, bmin * t + 0.5 * slope * t ** 2
    I2 = ((bmin + slope * t) ** 3 - bmin ** 3) / (3 * slope)
    I3 = ((bmin + slope * t) ** 4 - bmin ** 4) / (4 * slope)
    e1 = (B - 0.5 * (bmin + beta_t) - 0.5 * I2) / N
    e2 = (0.5 * I2 + 0.25 * (bmin ** 2 + beta_t ** 2) + I3 / 3) / N ** 2
    log_err = torch.log(abar) - 2.0 * torch.log(alpha)
    assert (log_err.abs() <= e1.abs() + 1.5 * e2).all()
    # the bound itself is O(1/N): at most 0.07 in log alpha-bar for N = 1000 (log alpha^2 >= -10)
    assert (e1.abs() + 1.5 * e2).max() < 0.07
    # and the std: |(1 - abar) - std^2| = |abar - alpha^2| <= alpha^2 (exp|log_err| - 1)
    bound_var = alpha ** 2 * torch.expm1(e1.abs() + 1.5 * e2)
    assert ((V - std ** 2).abs() <= bound_var + 1e-15).all()


def test_ve_discretize_is_the_smld_chain():
    N = 1000
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=N)
    A, V = _propagate_chain(sde, N)
    assert (A == 1.0).all()                                   # VE: f = 0 exactly
    i = torch.arange(N, dtype=F64)
    sigmas = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** (i / (N - 1))
    # sum of G_j^2 = sigma_j^2 - sigma_{j-1}^2 telescopes to sigma_i^2; relative round-off of
    # a sum of positive terms is <= N * 1e-16.
    torch.testing.assert_close(V, sigmas ** 2, rtol=1e-12, atol=0.0)
    _, std = sde.marginal_coeffs(sde.index_time(torch.arange(N)))
    torch.testing.assert_close(std, sigmas, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(sde.discrete_marginal_coeffs(torch.arange(N))[1], sigmas,
                               rtol=1e-12, atol=0.0)


def test_subvp_discretize_is_euler_maruyama_with_first_order_convergence():
    sde = sde_lib.subVPSDE(N=500)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.rand(7, generator=torch.Generator().manual_seed(1), dtype=F64)
    f, G = sde.discretize(x, t)
    drift, g = sde.sde(x, t)
    torch.testing.assert_close(f, drift / 500, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(G, g * math.sqrt(1 / 500), rtol=1e-14, atol=0.0)

    alpha, std = sde.marginal_coeffs(_t(sde.T))
    errors = []
    for N in (250, 500, 1000):
        A, V = _propagate_chain(sde_lib.subVPSDE(N=N), N)
        errors.append((A[-1].item() / alpha.item() - 1.0, V[-1].item() - std.item() ** 2))
    errors = np.array(errors)
    # First order: the error at T halves when N doubles (ratio 2 + O(1/N); measured 1.98-2.05).
    ratios = errors[:-1] / errors[1:]
    assert ((ratios > 1.8) & (ratios < 2.2)).all(), f"errors {errors}, ratios {ratios}"
    # and at N = 1000 the chain is within 2% of the continuous marginal
    assert np.abs(errors[-1]).max() < 0.02


@pytest.mark.parametrize("name", ["vpsde", "vesde"])
def test_stochastic_chain_monte_carlo(name):
    N, n = 100, 20000
    sde = sde_lib.VPSDE(N=N) if name == "vpsde" else sde_lib.VESDE(N=N)
    dist = correlated_gaussian(3)
    mu, sigma, eye = dist.mean(), dist.covariance(), torch.eye(3, dtype=F64)
    gen = torch.Generator().manual_seed(99)
    x = dist.sample(n, generator=gen, dtype=F64)                 # x_{-1} = clean data
    i_all = torch.arange(N, dtype=F64)
    if name == "vpsde":
        betas = sde.beta_min / N + i_all / (N - 1) * (sde.beta_max - sde.beta_min) / N
        abar = torch.cumprod(1.0 - betas, 0)
        exact = [(abar[i].sqrt() * mu, abar[i] * sigma + (1 - abar[i]) * eye) for i in range(N)]
    else:
        sig = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** (i_all / (N - 1))
        exact = [(mu, sigma + sig[i] ** 2 * eye) for i in range(N)]
    for i in range(N):
        t = sde.index_time(torch.tensor(i))
        f, G = sde.discretize(x, t)
        x = x + f + G[:, None] * torch.randn(x.shape, generator=gen, dtype=F64)
        if i in (29, N - 1):
            # SE of the sample mean / covariance from the samples themselves (moment_zscores)
            z_mean, z_cov = moment_zscores(x, *exact[i])
            assert z_mean.max() < Z_MAX and z_cov.max() < Z_MAX, (i, z_mean, z_cov)
            # negative control: a 5% larger noise std would be detected at the last step,
            # where the noise is ~all of the variance: a 10% variance error is
            # 0.1 / sqrt(2/n) = 10 SE at n = 20000
            if i == N - 1:
                noise_var = (1 - abar[i]) if name == "vpsde" else sig[i] ** 2
                _, z_bad = moment_zscores(x, exact[i][0], exact[i][1] + (1.05 ** 2 - 1) * noise_var * eye)
                assert z_bad.max() > Z_MAX


# ----- c. the prior --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vpsde", "vesde"])
@pytest.mark.parametrize("shape", [(5, 2), (4, 3, 8, 8)])
def test_prior_logp_matches_torch_distributions(name, shape):
    sde = sde_lib.VPSDE() if name == "vpsde" else sde_lib.VESDE()
    z = sde.prior_std * torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    z[0] *= 3.0                                                  # one sample far in the tail
    ref = Independent(Normal(torch.zeros(shape[1:], dtype=F64), sde.prior_std),
                      len(shape) - 1).log_prob(z)
    got = sde.prior_logp(z)
    assert got.shape == (shape[0],) and got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)
    got32 = sde.prior_logp(z.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("make_sde", SDE_PARAMS + SCHEDULE_PARAMS)
def test_prior_sampling(make_sde):
    sde = make_sde()
    shape = (4000, 3, 2, 2)
    x = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert x.shape == shape and x.dtype == F64 and x.device.type == "cpu"
    again = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    other = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    assert torch.equal(x, again) and not torch.equal(x, other)
    assert sde.prior_sampling((3, 2)).dtype == torch.get_default_dtype()
    assert sde.prior_sampling((3, 2), device="cpu", dtype=torch.float32).dtype == torch.float32
    # n = 48000 iid N(0, s^2) draws: SE(mean) = s/sqrt(n), SE(sample std) = s/sqrt(2n).
    n, s = x.numel(), sde.prior_std
    assert abs(x.mean().item()) < Z_MAX * s / math.sqrt(n)
    assert abs(x.std().item() - s) < Z_MAX * s / math.sqrt(2 * n)
    # the SE check has power: a 2% wrong std is 0.02 * sqrt(2n) = 6.2 SE away
    assert abs(x.std().item() - 1.02 * s) > Z_MAX * s / math.sqrt(2 * n)


# ----- d. log-SNR ----------------------------------------------------------------------------
@pytest.mark.parametrize("make_sde", SDE_PARAMS + SCHEDULE_PARAMS + [
    pytest.param(lambda: sde_lib.VPSDE(beta_min=0.5, beta_max=30.0), id="vpsde-custom"),
    pytest.param(lambda: sde_lib.subVPSDE(beta_min=0.05, beta_max=10.0), id="subvpsde-custom"),
    pytest.param(lambda: sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0), id="vesde-custom"),
])
def test_log_snr_round_trip_monotone_and_consistent_with_g_and_std(make_sde):
    sde = make_sde()
    t = torch.cat([torch.logspace(-5, 0, 400, dtype=F64), torch.linspace(1e-3, 1, 400, dtype=F64)])
    lam = sde.log_snr(t)
    assert lam.dtype == F64 and torch.isfinite(lam).all()
    back = sde.t_from_log_snr(lam)
    # float64 round-trip. Measured: <= 2e-15 relative for VP / sub-VP; 8e-12 for VE at t = 1e-5,
    # where t = (log sigma - log sigma_min) / log(sigma_max / sigma_min) cancels, an inherent
    # |log sigma_min| * eps / (t * 8.5) ~ 6e-12. 1e-10 keeps a margin; a wrong inverse is O(1) off.
    torch.testing.assert_close(back, t, rtol=1e-10, atol=1e-15)
    # log-SNR by definition
    alpha, std = sde.marginal_coeffs(t)
    torch.testing.assert_close(lam, torch.log(alpha ** 2 / std ** 2), rtol=1e-10, atol=1e-10)
    # strictly decreasing
    ts = torch.linspace(1e-5, 1.0, 5001, dtype=F64)
    assert (torch.diff(sde.log_snr(ts)) < 0).all()

    # d lambda / dt = -g^2 / std^2 by central differences with a relative step h = 1e-4 t:
    # truncation h^2 |lambda'''| / 6 ~ 1e-8 relative (lambda ~ log t near 0), round-off
    # 1e-16 |lambda| / h ~ 1e-11 relative -> tolerance 1e-6 relative.
    t = torch.logspace(-3, 0, 60, dtype=F64)
    h = 1e-4 * t
    dlam = (sde.log_snr(t + h) - sde.log_snr(t - h)) / (2 * h)
    _, g = sde.sde(torch.zeros(t.shape[0], 1, dtype=F64), t)
    _, std = sde.marginal_coeffs(t)
    torch.testing.assert_close(dlam, -g ** 2 / std ** 2, rtol=1e-6, atol=0.0)


# ----- e. reverse-time drift -----------------------------------------------------------------
@pytest.mark.parametrize("make_sde", SDE_PARAMS + SCHEDULE_PARAMS)
@pytest.mark.parametrize("shape", [(6, 3), (4, 1, 2, 2)])
def test_reverse_drift_for_gaussian_data(make_sde, shape):
    sde = make_sde()
    s0 = 0.7
    dim = math.prod(shape[1:])
    dist = sde_lib.GaussianMixture.gaussian(torch.zeros(dim, dtype=F64), s0 ** 2 * torch.eye(dim, dtype=F64),
                                            event_shape=shape[1:])
    score_fn = dist.score_fn(sde)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=F64)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=F64).repeat(2)[:shape[0]]
    score = score_fn(x, t)

    def sigma_tot(tt):
        alpha, std = sde.marginal_coeffs(tt)
        return torch.sqrt(alpha ** 2 * s0 ** 2 + std ** 2)

    # Probability-flow ODE for N(0, sigma_tot(t)^2 I): x(t) = x(T) sigma_tot(t) / sigma_tot(T),
    # i.e. dx/dt = (sigma_tot' / sigma_tot) x. Central differences, h = 1e-5: truncation
    # h^2 |sigma'''/sigma| / 6 <= 1e-10 * (2 log 5000)^3 / 6 ~ 1e-8 relative (VE is steepest).
    h = 1e-5
    rate = (sigma_tot(t + h) - sigma_tot(t - h)) / (2 * h) / sigma_tot(t)
    drift, diffusion = sde.reverse(x, t, score, probability_flow=True)
    expected = sde_lib.append_dims(rate, x.ndim) * x
    torch.testing.assert_close(drift, expected, rtol=1e-6, atol=1e-9)
    assert diffusion.shape == (shape[0],) and (diffusion == 0).all()

    # Reverse SDE: f - g^2 score, and the diffusion is g.
    f, g = sde.sde(x, t)
    drift, diffusion = sde.reverse(x, t, score, probability_flow=False)
    torch.testing.assert_close(drift, f - sde_lib.append_dims(g ** 2, x.ndim) * score,
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(diffusion, g, rtol=0, atol=0)
    # for this data: f + g^2 x / sigma_tot^2 (score = -x / sigma_tot^2)
    a_coeff = sde.sde(torch.ones(shape[0], 1, dtype=F64), t)[0][:, 0]     # f = a(t) x
    torch.testing.assert_close(
        drift, sde_lib.append_dims(a_coeff + g ** 2 / sigma_tot(t) ** 2, x.ndim) * x,
        rtol=1e-10, atol=1e-12)

    # the discrete variant uses (f_i, G_i) of the chain
    fi, Gi = sde.discretize(x, t)
    drift, diffusion = sde.reverse(x, t, score, discrete=True)
    torch.testing.assert_close(drift, fi - sde_lib.append_dims(Gi ** 2, x.ndim) * score,
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(diffusion, Gi, rtol=0, atol=0)


# ----- f. dtypes, shapes, time arguments -----------------------------------------------------
@pytest.mark.parametrize("make_sde", SDE_PARAMS + SCHEDULE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 3), (5, 2, 4, 4)])
def test_dtype_and_shape_preservation(make_sde, dtype, shape):
    sde = make_sde()
    B = shape[0]
    x64 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    x = x64.to(dtype)
    t64 = torch.tensor([0.0, 0.1, 0.25, 0.6, 1.0], dtype=F64)
    t = t64.to(dtype)
    # float32 results agree with float64 ones to float32 round-off (VE's g ~ 206 at t=1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-14, atol=0.0)

    drift, diffusion = sde.sde(x, t)
    drift64, diffusion64 = sde.sde(x64, t64)
    assert drift.shape == shape and drift.dtype == dtype and drift.device == x.device
    assert diffusion.shape == (B,) and diffusion.dtype == dtype
    torch.testing.assert_close(drift.double(), drift64, **tol)
    torch.testing.assert_close(diffusion.double(), diffusion64, **tol)
    # image-shaped input = the flattened input, coordinate by coordinate
    drift_flat, _ = sde.sde(x64.reshape(B, -1), t64)
    torch.testing.assert_close(drift64.reshape(B, -1), drift_flat, rtol=0, atol=0)

    mean, std = sde.marginal_prob(x, t)
    mean64, std64 = sde.marginal_prob(x64, t64)
    assert mean.shape == shape and mean.dtype == dtype and std.shape == (B,) and std.dtype == dtype
    torch.testing.assert_close(mean.double(), mean64, **tol)
    torch.testing.assert_close(std.double(), std64, **tol)
    alpha, s = sde.marginal_coeffs(t64)
    torch.testing.assert_close(mean64, sde_lib.append_dims(alpha, x.ndim) * x64, rtol=1e-14, atol=0)
    torch.testing.assert_close(std64, s, rtol=0, atol=0)

    f, G = sde.discretize(x, t)
    f64, G64 = sde.discretize(x64, t64)
    assert f.shape == shape and f.dtype == dtype and G.shape == (B,) and G.dtype == dtype
    torch.testing.assert_close(f.double(), f64, **tol)
    torch.testing.assert_close(G.double(), G64, **tol)

    logp = sde.prior_logp(x)
    assert logp.shape == (B,) and logp.dtype == dtype

    # t as a Python float / 0-d tensor == the same t broadcast over the batch
    for t_scalar in (0.3, torch.tensor(0.3, dtype=F64)):
        d1, g1 = sde.sde(x64, t_scalar)
        d2, g2 = sde.sde(x64, torch.full((B,), 0.3, dtype=F64))
        assert g1.shape == (B,)
        torch.testing.assert_close(d1, d2, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        m1, s1 = sde.marginal_prob(x, t_scalar)
        assert m1.dtype == dtype and s1.shape == (B,) and s1.dtype == dtype
        f1, G1 = sde.discretize(x, t_scalar)
        assert f1.dtype == dtype and G1.shape == (B,)

    # a t of the wrong shape is an error, not a silent broadcast
    for bad in (torch.zeros(B + 1, dtype=F64), torch.zeros(B, 1, dtype=F64)):
        with pytest.raises(ValueError, match="shape"):
            sde.sde(x, bad)
        with pytest.raises(ValueError, match="shape"):
            sde.marginal_prob(x, bad)
        with pytest.raises(ValueError, match="shape"):
            sde.discretize(x, bad)


# ----- g. validation and the factory ---------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: sde_lib.VPSDE(beta_min=-1.0), "beta_min"),
    (lambda: sde_lib.VPSDE(beta_max=0.0), "beta_max"),
    (lambda: sde_lib.VPSDE(beta_min=5.0, beta_max=1.0), "beta_max.*beta_min"),
    (lambda: sde_lib.subVPSDE(beta_min=float("nan")), "beta_min"),
    (lambda: sde_lib.VESDE(sigma_min=1.0, sigma_max=1.0), "sigma_min.*sigma_max"),
    (lambda: sde_lib.VESDE(sigma_min=0.0), "sigma_min"),
    (lambda: sde_lib.VESDE(sigma_max=-3.0), "sigma_max"),
    (lambda: sde_lib.VPSDE(N=0), r"\bN\b"),
    (lambda: sde_lib.VESDE(N=2.5), r"\bN\b"),
    (lambda: sde_lib.subVPSDE(N=True), r"\bN\b"),
    (lambda: sde_lib.CosineVPSDE(s=-0.1), r"\bs must be"),
    (lambda: sde_lib.CosineVPSDE(max_beta=1.5), "max_beta"),
    (lambda: sde_lib.LinearLogSNRVPSDE(logsnr_min=3.0, logsnr_max=3.0), "logsnr_min.*logsnr_max"),
], ids=["vp-beta_min<0", "vp-beta_max=0", "vp-beta_max<beta_min", "subvp-nan", "ve-equal",
        "ve-sigma_min=0", "ve-sigma_max<0", "N=0", "N=2.5", "N=True", "cosine-s<0",
        "cosine-max_beta>1", "logsnr-equal"])
def test_bad_parameters_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name, cls, params", [
    ("vpsde", sde_lib.VPSDE, {"beta_min": 0.2, "beta_max": 15.0}),
    ("subvpsde", sde_lib.subVPSDE, {"beta_min": 0.05, "beta_max": 12.0}),
    ("vesde", sde_lib.VESDE, {"sigma_min": 0.02, "sigma_max": 30.0}),
    ("cosine_vpsde", sde_lib.CosineVPSDE, {"s": 0.02, "max_beta": 0.99}),
    ("logsnr_vpsde", sde_lib.LinearLogSNRVPSDE, {"logsnr_min": -8.0, "logsnr_max": 12.0}),
])
def test_build_sde_from_config(name, cls, params):
    config = ml_collections.ConfigDict()
    config.sde = ml_collections.ConfigDict({"name": name, "num_scales": 321, **params})
    sde = compose.build_sde(config)
    assert type(sde) is cls and sde.N == 321
    for key, value in params.items():
        assert getattr(sde, key) == value
    # the parameters reach the schedule (not only the attributes)
    ref = cls(N=321, **params)
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(sde.marginal_coeffs(t), ref.marginal_coeffs(t), rtol=0, atol=0)
    assert sde.marginal_coeffs(t)[1][-1] != cls().marginal_coeffs(t)[1][-1]
    # missing parameters take the class defaults
    config.sde = ml_collections.ConfigDict({"name": name.upper()})
    sde = compose.build_sde(config)
    assert type(sde) is cls and sde.N == cls().N and repr(sde) == repr(cls())


def test_build_sde_by_name_takes_plain_arguments_only():
    sde = sde_lib.build_sde("VESDE", sigma_min=0.02, sigma_max=30.0, N=7)
    assert repr(sde) == repr(sde_lib.VESDE(0.02, 30.0, N=7))
    with pytest.raises(ValueError, match="vpsde, subvpsde, vesde"):
        sde_lib.build_sde("ddpm")
    with pytest.raises(TypeError, match="run_lib.compose.build_sde"):
        sde_lib.build_sde(ml_collections.ConfigDict({"sde": {"name": "vpsde"}}))


def test_build_sde_errors():
    config = ml_collections.ConfigDict({"sde": {"name": "ddpm", "num_scales": 10}})
    with pytest.raises(ValueError, match="vpsde.*subvpsde.*vesde") as info:
        compose.build_sde(config)
    assert "ddpm" in str(info.value)
    config.sde.name = "vesde"
    config.sde.sigma_min = -1.0
    with pytest.raises(ValueError, match="sigma_min"):
        compose.build_sde(config)
    with pytest.raises(ValueError, match="sde"):
        compose.build_sde(ml_collections.ConfigDict({"model": {"name": "mlp"}}))


# ----- h. the DDPM time index ----------------------------------------------------------------
@pytest.mark.parametrize("make_sde", SDE_PARAMS + SCHEDULE_PARAMS)
@pytest.mark.parametrize("N", [1, 2, 7, 1000, 4096])
def test_time_index_inverts_index_time(make_sde, N):
    cls = type(make_sde())
    # a DDPM chain needs beta_max / N < 1 (test_ddpm_chain_needs_betas_below_one)
    sde = cls(N=N, beta_max=0.5) if cls is sde_lib.VPSDE and N <= 20 else cls(N=N)
    i = torch.arange(N)
    t = sde.index_time(i)
    assert t.dtype == F64 and t[0] == 0 and (N == 1 or abs(t[-1].item() - sde.T) < 1e-15)
    assert torch.equal(sde.time_index(t), i)
    assert torch.equal(sde.time_index(t.float()), i)               # float32 times too
    assert torch.equal(sde.time_index(t.float().double()), i)
    if N > 1:
        # off-grid times go to the nearest level; times outside [0, T] clamp to the ends
        step = sde.T / (N - 1)
        assert torch.equal(sde.time_index(t + 0.4 * step), i)
        assert torch.equal(sde.time_index(t - 0.4 * step), i)
        assert sde.time_index(_t([-0.5, sde.T + 0.5])).tolist() == [0, N - 1]
    # a time given as the chain's float32 batch time (x float32, t Python float) too
    x = torch.zeros(1, 2)
    k = N // 3
    _, G = sde.discretize(x, float(sde.index_time(torch.tensor(k))))
    _, G_ref = sde.discretize(x.double(), sde.index_time(torch.tensor([k])))
    torch.testing.assert_close(G.double(), G_ref, rtol=1e-6, atol=0)   # float32 round-off


def test_ddpm_chain_needs_betas_below_one():
    """beta_max / N >= 1 has no DDPM chain (sqrt(1 - beta) undefined): a clear error from the
    discrete functions, while the continuous SDE and sub-VP's Euler-Maruyama chain still work."""
    sde = sde_lib.VPSDE(N=10)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"beta_max / N = 2, must be < 1"):
        sde.discretize(x, 0.5)
    with pytest.raises(ValueError, match="use N > beta_max"):
        sde.discrete_marginal_coeffs(torch.tensor([3]))
    assert torch.isfinite(sde.sde(x, 0.5)[1]).all()
    assert torch.isfinite(sde_lib.subVPSDE(N=10).discretize(x, 0.5)[1]).all()
