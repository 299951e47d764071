"""Probability-flow ODE sampler (samplers/ode.py) against the exact-score test bed.

With the exact score, the probability-flow ODE carries the prior to p_eps exactly (up to the
solver tolerance and the prior's mismatch with p_T, both far below the sampling noise here),
so the samples must be indistinguishable from draws of the true marginal at eps.
"""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

import sde_lib
from samplers.harness import SampleResult, Schedule
from samplers.ode import ADAPTIVE_METHODS, FIXED_GRID_METHODS, ODE_METHODS, ode_sample
from sde_lib import GaussianMixture
from testbed import (SDE_PARAMS, Z_MAX, correlated_gaussian, eight_mode_mixture,
                     frechet_distance, spread_gaussian)

F64 = torch.float64
#: ODE end time for the sample-quality tests: p_eps is the data plus noise of std 1e-3 (VP,
#: sub-VP: std(eps)^2 ~ beta_min eps) or 0.01 (VE: sigma_min), and the reference sets below
#: are drawn from that same p_eps with ``sample_marginal``, so nothing has to be neglected.
EPS = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class RecordingScore:
    """The exact score, recording every time t it is called with (and counting calls)."""

    def __init__(self, dist: GaussianMixture, sde):
        self.score = dist.score_fn(sde)
        self.times = []

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],) and t.dtype == F64, (t.shape, t.dtype)
        assert torch.all(t == t[0]), "one time per evaluation"
        self.times.append(float(t[0]))
        return self.score(x, t)


# ----- sample quality ----------------------------------------------------------------------
@pytest.mark.parametrize("make_sde", SDE_PARAMS)
def test_ode_samples_match_the_spread_gaussian(make_sde):
    """Frechet distance of 4000 ODE samples (64-D, data stds 0.02 .. 1.5) to true draws of
    p_eps within 1.5x the floor of true-vs-true sets of the same size.

    Both sides are averaged over three independent reference sets. Under the null (two true
    sets) the ratio was measured at 0.99 +- 0.07 (30 seeds, max 1.14), so 1.5 is ~7 SD; it
    flags a bias of about half the floor (FD ~ 0.03), e.g. a 10% scale error in the top
    eigen-direction. VE uses the default sigma_max = 50: its prior N(0, 50^2 I) differs from
    p_T = N(mu, Sigma + 50^2 I) by a variance factor <= 1.0009 and a mean offset of 0.01
    prior std per direction, far below this resolution (sigma_max = 5 would shrink the top
    variance by ~8%).
    """
    sde = make_sde()
    dist = spread_gaussian()
    n = 4000
    result = ode_sample(dist.score_fn(sde), sde, (n, dist.dim), eps=EPS, generator=_gen(0))
    assert result.x.shape == (n, 64) and result.x.dtype == torch.float32
    assert torch.isfinite(result.x).all()
    refs = [dist.sample_marginal(sde, EPS, n, generator=_gen(100 + j), dtype=F64) for j in range(3)]
    fd = np.mean([frechet_distance(result.x, r) for r in refs])
    floor = np.mean([frechet_distance(a, b) for a, b in itertools.combinations(refs, 2)])
    assert fd <= 1.5 * floor, f"FD {fd:.4f} vs floor {floor:.4f} (ratio {fd / floor:.2f})"


def _mode_weights(x: torch.Tensor, dist: GaussianMixture) -> torch.Tensor:
    """Fraction of samples nearest to each mode's mean (K,)."""
    d = torch.cdist(x.to(F64).reshape(x.shape[0], -1), dist.means)
    return torch.bincount(d.argmin(1), minlength=dist.num_components).to(F64) / x.shape[0]


@pytest.mark.parametrize("make_sde", SDE_PARAMS)
def test_ode_samples_recover_the_mixture_weights(make_sde):
    """Unequal mode weights (1..8 / 36) of the 2-D mixture within 0.02 total variation.

    Modes are 1.53 apart with std 0.15, so nearest-mean assignment never errs. With n = 20000
    the multinomial noise gives E[TV] = 0.5 sum_k E|w_hat_k - w_k| ~= 0.5 sum_k
    sqrt(2 w_k (1 - w_k) / (pi n)) = 0.0065 (SD ~0.002), so 0.02 is >6 SD above it and still
    catches a 4% shift of mass between two modes.
    """
    sde = make_sde()
    dist = eight_mode_mixture()
    n = 20000
    result = ode_sample(dist.score_fn(sde), sde, (n, 2), eps=EPS, generator=_gen(1))
    tv = 0.5 * (_mode_weights(result.x, dist) - dist.weights).abs().sum().item()
    assert tv <= 0.02, f"TV {tv:.4f}"
    # and no mass left between the modes: all samples within 6 component stds of a mean
    d = torch.cdist(result.x.to(F64), dist.means).min(1).values
    assert (d > 6 * 0.15).float().mean().item() < 1e-3


def test_ode_denoise_is_tweedie_and_shrinks_the_noise():
    """denoise=True adds exactly one Tweedie step (one more NFE) at eps, and for VE data
    smoothed at sigma(eps) = 0.1 the denoised covariance is Sigma (Sigma + s^2 I)^{-1} Sigma
    (the posterior mean of a Gaussian), checked per eigen-direction of Sigma with z-scores."""
    sde = sde_lib.VESDE()
    dist = spread_gaussian(dim=16, seed=3, std_min=0.05, std_max=1.0)
    eps = math.log(0.1 / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)  # sigma = 0.1
    n = 8000
    x_T = sde.prior_sampling((n, 16), generator=_gen(2), dtype=F64)
    plain = ode_sample(dist.score_fn(sde), sde, x_T.shape, x_init=x_T, eps=eps)
    den = ode_sample(dist.score_fn(sde), sde, x_T.shape, x_init=x_T, eps=eps, denoise=True)
    assert den.nfe == plain.nfe + 1
    std_eps = sde.marginal_coeffs(torch.tensor(eps, dtype=F64))[1].item()
    t_eps = torch.full((n,), eps, dtype=F64)
    expected = Schedule.tweedie(plain.x, dist.score_fn(sde)(plain.x, t_eps), 1.0, std_eps)
    torch.testing.assert_close(den.x, expected, rtol=1e-12, atol=1e-14)    # the same formula
    # per-direction variance: s^4 / (s^2 + 0.01) after denoising vs s^2 + 0.01 before
    lam, vecs = dist.eigvals[0], dist.eigvecs[0]
    proj = (den.x - dist.means[0]) @ vecs                               # (n, 16)
    var_hat = proj.var(0)
    var_true = lam ** 2 / (lam + 0.01)
    z = (var_hat - var_true).abs() / (var_true * math.sqrt(2.0 / (n - 1)))   # Gaussian SE of a variance
    assert z.max() <= Z_MAX, z
    proj_plain = (plain.x - dist.means[0]) @ vecs
    assert (proj_plain.var(0) > var_hat).all()


# ----- never outside [eps, T]; nfe ---------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-3, 1e-5])
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun", "fehlberg2", "dopri8",
                                    "scipy_rk45", "rk4"])
def test_score_is_only_evaluated_inside_eps_T(method, eps):
    """A recording score sees only times in [eps, T] (float64), starts at T and reaches eps,
    and nfe equals the number of its calls. float32 state: the solver's float32 times round
    eps down (1e-5 -> 9.99999997e-06) and torchdiffeq's first-step probe can land below eps."""
    sde = sde_lib.VPSDE()
    dist = eight_mode_mixture()
    score = RecordingScore(dist, sde)
    result = ode_sample(score, sde, (64, 2), method=method, eps=eps, generator=_gen(3))
    times = np.array(score.times)
    assert result.nfe == len(times) > 10
    assert times.min() >= eps and times.max() <= sde.T
    assert times[0] == sde.T
    assert times.min() <= eps * (1 + 1e-6)          # the solve did reach eps
    # The clamp inside the ODE function only absorbs rounding: the steps themselves land on
    # eps (torchdiffeq's step_t), so only the last step's c = 1 stages sit at eps (dopri8:
    # 3). Stepping past eps and interpolating back would put every stage beyond eps there
    # (measured 13 for dopri5, 35 for dopri8 without step_t).
    assert (times <= eps * (1 + 1e-5)).sum() <= 3


@pytest.mark.parametrize("method", list(FIXED_GRID_METHODS))
def test_fixed_grid_nfe_is_steps_times_stages(method):
    sde = sde_lib.subVPSDE()
    dist = eight_mode_mixture()
    score = RecordingScore(dist, sde)
    result = ode_sample(score, sde, (8, 2), method=method, num_steps=7, generator=_gen(4),
                        denoise=True)
    assert result.nfe == len(score.times) == 7 * FIXED_GRID_METHODS[method] + 1


@pytest.mark.parametrize("make_sde", [sde_lib.VPSDE, sde_lib.VESDE], ids=["vpsde", "vesde"])
@pytest.mark.parametrize("method", list(FIXED_GRID_METHODS))
def test_fixed_grid_methods_converge_at_their_order(method, make_sde):
    """Max error against a dopri5 solution at rtol = atol = 1e-10 (float64, same x_T) falls as
    N^-order: with 50 -> 100 -> 200 uniform steps on a 3-D correlated Gaussian the measured
    log2 ratios were within 0.25 of the order (euler 1, midpoint / heun2 2, heun3 3, rk4 4);
    the test allows 0.35 at the finer pair and requires a fall at the coarser one."""
    order = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}[method]
    sde = make_sde()
    dist = correlated_gaussian()
    x_T = sde.prior_sampling((256, 3), generator=_gen(5), dtype=F64)
    ref = ode_sample(dist.score_fn(sde), sde, x_T.shape, x_init=x_T, rtol=1e-10, atol=1e-10).x
    errors = [(ode_sample(dist.score_fn(sde), sde, x_T.shape, x_init=x_T, method=method,
                          num_steps=n).x - ref).abs().max().item() for n in (50, 100, 200)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert rates[0] > 0.5 * order, (errors, rates)
    assert abs(rates[1] - order) <= 0.35, (errors, rates)


def test_scipy_rk45_agrees_with_dopri5():
    """The Score SDE code's solver and torchdiffeq's dopri5, both at 1e-5 tolerances, give
    the same map x_T -> x_eps to within 100x the tolerance (64-D, float64)."""
    sde = sde_lib.VPSDE()
    dist = spread_gaussian()
    x_T = sde.prior_sampling((256, 64), generator=_gen(6), dtype=F64)
    a = ode_sample(dist.score_fn(sde), sde, x_T.shape, x_init=x_T, method="scipy_rk45")
    b = ode_sample(dist.score_fn(sde), sde, x_T.shape, x_init=x_T, method="dopri5")
    assert a.x.dtype == F64 and a.x.shape == (256, 64)
    assert (a.x - b.x).abs().max().item() < 1e-3
    assert 20 < a.nfe < 1000


# ----- options, shapes, errors -------------------------------------------------------------
def test_unknown_method_lists_the_valid_names():
    sde = sde_lib.VPSDE()
    with pytest.raises(ValueError) as info:
        ode_sample(lambda x, t: -x, sde, (4, 2), method="rk45")
    message = str(info.value)
    for name in ODE_METHODS:
        assert name in message
    assert set(ADAPTIVE_METHODS) | set(FIXED_GRID_METHODS) | {"scipy_rk45"} == set(ODE_METHODS)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 10}, "fixed-grid"),
    ({"method": "rk4", "num_steps": 0}, "num_steps"),
    ({"eps": 0.0}, "eps"),
    ({"eps": 1.0}, "eps"),
    ({"rtol": -1e-5}, "rtol"),
    ({"atol": float("nan")}, "atol"),
    ({"x_init": torch.zeros(3, 2)}, "x_init"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ode_sample(lambda x, t: -x, sde_lib.VPSDE(), (4, 2), **kwargs)


def test_image_shapes_dtype_seed_and_x_init():
    """(B, C, H, W) data (a Gaussian with event_shape (1, 4, 4)), float64 state, a seeded
    generator gives the same samples as passing its prior draw as x_init, and another seed
    gives different ones."""
    sde = sde_lib.VESDE()
    dist = spread_gaussian(dim=16, seed=1, event_shape=(1, 4, 4))
    shape = (5, 1, 4, 4)
    a = ode_sample(dist.score_fn(sde), sde, shape, generator=_gen(7), dtype=F64)
    assert isinstance(a, SampleResult)
    assert a.x.shape == shape and a.x.dtype == F64 and a.x.device.type == "cpu"
    x_T = sde.prior_sampling(shape, generator=_gen(7), dtype=F64)
    b = ode_sample(dist.score_fn(sde), sde, shape, x_init=x_T)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.nfe == b.nfe
    c = ode_sample(dist.score_fn(sde), sde, shape, generator=_gen(8), dtype=F64)
    assert (c.x - a.x).abs().max() > 0.1


@pytest.mark.parametrize("method", ["dopri5", "rk4", "scipy_rk45"])
def test_non_finite_values_raise_with_the_time(method):
    sde = sde_lib.VPSDE()
    score = eight_mode_mixture().score_fn(sde)

    def bad_score(x, t):
        s = score(x, t)
        return torch.where(t[0] < 0.5, torch.full_like(s, math.nan), s)

    with pytest.raises(FloatingPointError, match=r"non-finite values at t=") as info:
        ode_sample(bad_score, sde, (8, 2), method=method, generator=_gen(9))
    t_bad = float(re.search(r"t=([0-9.e+-]+)", str(info.value)).group(1))
    assert 0.2 < t_bad < 0.5        # the first evaluation below 0.5 (steps are < 0.3 there)


@pytest.mark.parametrize("method", ["scipy_rk45"])
def test_a_rejected_non_finite_trial_step_is_not_an_error(method):
    """An overflow (inf) in one trial step makes scipy's RK45 reject it and retry with a
    smaller step; the solve recovers, so no error, and the result matches a clean solve.
    (torchdiffeq cannot recover: its error estimate becomes inf - inf = NaN, and it stops
    with "underflow in dt", which is turned into the FloatingPointError tested above.)"""
    sde = sde_lib.VPSDE()
    score = eight_mode_mixture().score_fn(sde)
    fired = []

    def flaky_score(x, t):
        s = score(x, t)
        if not fired and float(t[0]) < 0.5:
            fired.append(float(t[0]))
            return torch.full_like(s, math.inf)
        return s

    x_T = sde.prior_sampling((8, 2), generator=_gen(11), dtype=F64)
    flaky = ode_sample(flaky_score, sde, x_T.shape, x_init=x_T, method=method)
    clean = ode_sample(score, sde, x_T.shape, x_init=x_T, method=method)
    assert fired and torch.isfinite(flaky.x).all()
    assert (flaky.x - clean.x).abs().max() < 1e-3


def test_callback_and_progress():
    sde = sde_lib.VPSDE()
    dist = eight_mode_mixture()
    seen = []
    result = ode_sample(dist.score_fn(sde), sde, (8, 2), method="heun2", num_steps=5,
                        generator=_gen(10), progress=True, callback=seen.append)
    assert [c["step"] for c in seen] == list(range(result.nfe)) and result.nfe == 10
    assert float(seen[0]["t"]) == sde.T and seen[0]["x"].shape == (8, 2)
    assert all(float(a["t"]) >= float(b["t"]) for a, b in zip(seen, seen[1:]))
