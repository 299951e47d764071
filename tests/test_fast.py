"""Fast samplers (samplers/fast.py): time-step spacings, DDIM and DPM-Solver(++) orders 1-3.

Convergence orders are measured against the exact probability-flow ODE solution for Gaussian
data N(mu, diag(s^2)): per coordinate the ODE maps x_T to

    x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + std_t^2) / sqrt(alpha_T^2 s^2 + std_T^2)
                       * (x_T - alpha_T mu),

so from a fixed x_T the error at eps (denoise=False) must fall like num_steps^-order.
Distribution checks compare Frechet distances on the 64-D spread Gaussian (exact score) with
the floor, the distance between two independent true sample sets of 2000 (0.108).
"""
import math

import pytest
import torch

import samplers
import sde_lib
from samplers.fast import (DPM_ALGORITHMS, SPACINGS, ddim_sample, dpm_solver_sample,
                           timesteps)
from testbed import (SDES, fitted_order, flow_problem_score, frechet_distance,
                     reference_and_floor, spread_gaussian)

F64 = torch.float64
N_GAUSS = 2000


# ----- time steps ---------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sde_name", SDES)
def test_timesteps_endpoints_and_monotone(sde_name, spacing):
    sde = SDES[sde_name]()
    t = timesteps(sde, 17, spacing=spacing, eps=1e-3)
    assert t.dtype == F64 and t.shape == (18,)
    assert t[0].item() == sde.T and t[-1].item() == 1e-3
    assert (t[1:] < t[:-1]).all()


@pytest.mark.parametrize("sde_name", SDES)
def test_logsnr_spacing_has_equal_lambda_gaps(sde_name):
    sde = SDES[sde_name]()
    lam = sde.log_snr(timesteps(sde, 25, spacing="logsnr"))
    gaps = lam[1:] - lam[:-1]
    assert (gaps > 0).all()
    torch.testing.assert_close(gaps, gaps.mean().expand(25), rtol=1e-9, atol=0)


@pytest.mark.parametrize("sde_name", SDES)
def test_uniform_spacing(sde_name):
    sde = SDES[sde_name]()
    torch.testing.assert_close(timesteps(sde, 8, spacing="uniform", eps=0.01),
                               torch.linspace(1.0, 0.01, 9, dtype=F64))


@pytest.mark.parametrize("rho", [7.0, 3.0])
@pytest.mark.parametrize("sde_name", SDES)
def test_karras_spacing_formula(sde_name, rho):
    sde = SDES[sde_name]()
    n, eps = 12, 1e-3
    t = timesteps(sde, n, spacing="karras", eps=eps, rho=rho)
    alpha, std = sde.marginal_coeffs(t)
    sigma = std / alpha                                   # = exp(-log_snr / 2)
    ends = torch.tensor([1.0, eps], dtype=F64)
    a_end, s_end = sde.marginal_coeffs(ends)
    smax, smin = (s_end / a_end).tolist()
    i = torch.arange(n + 1, dtype=F64)
    expected = (smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    torch.testing.assert_close(sigma, expected, rtol=1e-9, atol=0)


def test_timesteps_bad_input():
    sde = sde_lib.VPSDE()
    with pytest.raises(ValueError, match="logsnr, uniform, karras"):
        timesteps(sde, 10, spacing="cosine")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            timesteps(sde, bad)
    for eps in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="eps"):
            timesteps(sde, 10, eps=eps)
    with pytest.raises(ValueError, match="rho"):
        timesteps(sde, 10, spacing="karras", rho=0.0)


# ----- convergence orders -------------------------------------------------------------------
def _dpm(order, multistep, algorithm, **kw):
    def run(score, sde, x_T, n):
        return dpm_solver_sample(score, sde, x_T.shape, num_steps=n, order=order,
                                 multistep=multistep, algorithm=algorithm, x_init=x_T,
                                 denoise=False, sigma_min=None, **kw)
    return run


def _ddim(score, sde, x_T, n):
    return ddim_sample(score, sde, x_T.shape, num_steps=n, x_init=x_T, denoise=False,
                       sigma_min=None)


# (id, run, expected order, steps). Measured fitted orders (VP / sub-VP / VE):
# ddim and order 1: 0.97 / 0.95 / 0.97 (20-80 steps); 2M: 1.94 / 1.85 / 1.95 (++),
# 1.96 / 1.94 / 1.97 (noise); 2S: 1.95 / 1.92 / 1.95 (++), 2.04 / 2.06 / 2.03 (noise);
# 3S on 40-160 steps: 2.86 / 2.78 / 2.90 (++; pre-asymptotic at fewer steps),
# 3.11 / 3.15 / 3.08 (noise).
ORDER_CASES = [
    ("ddim", _ddim, 1, (20, 40, 80)),
    ("dpm++1", _dpm(1, True, "dpmsolver++"), 1, (20, 40, 80)),
    ("dpm1", _dpm(1, True, "dpmsolver"), 1, (20, 40, 80)),
    ("dpm++2M", _dpm(2, True, "dpmsolver++"), 2, (20, 40, 80)),
    ("dpm2M", _dpm(2, True, "dpmsolver"), 2, (20, 40, 80)),
    ("dpm++2S", _dpm(2, False, "dpmsolver++"), 2, (20, 40, 80)),
    ("dpm2S", _dpm(2, False, "dpmsolver"), 2, (20, 40, 80)),
    ("dpm++3S", _dpm(3, False, "dpmsolver++"), 3, (40, 80, 160)),
    ("dpm3S", _dpm(3, False, "dpmsolver"), 3, (40, 80, 160)),
]


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("case", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_convergence_order(sde_name, case):
    _, run, order, steps = case
    fitted, errors = fitted_order(run, SDES[sde_name](), steps)
    assert abs(fitted - order) <= 0.3, (fitted, errors)


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("algorithm", DPM_ALGORITHMS)
def test_multistep_third_order(sde_name, algorithm):
    """3M with a second-order single-step first step (warmup="singlestep") is at least third
    order. On this Gaussian problem it even converges like h^4 (measured 3.7-4.1 on 40-160
    steps), so only the lower bound is checked. The form of the official implementation,
    whose second divided difference is half the Taylor coefficient's, measured order 2.0-2.3
    here; the papers' first-order warm-up step (the default) limits VE to ~2 as well."""
    run = _dpm(3, True, algorithm, warmup="singlestep")
    fitted, errors = fitted_order(run, SDES[sde_name](), (40, 80, 160))
    assert fitted >= 2.7, (fitted, errors)


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("algorithm", DPM_ALGORITHMS)
def test_ddim_eta0_equals_first_order_dpm_solver(sde_name, algorithm):
    sde = SDES[sde_name]()
    x_T = sde.prior_sampling((8, 4), generator=torch.Generator().manual_seed(3), dtype=F64)
    score = flow_problem_score(sde)
    a = ddim_sample(score, sde, x_T.shape, num_steps=7, x_init=x_T)
    b = dpm_solver_sample(score, sde, x_T.shape, num_steps=7, order=1, algorithm=algorithm,
                          x_init=x_T)
    torch.testing.assert_close(a.x, b.x, rtol=1e-10, atol=1e-10)
    assert a.nfe == b.nfe == 8


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("sde_name", SDES)
def test_ddim_eta1_step_is_the_exact_posterior(sde_name, eta):
    """With point-mass data x0 the predictions are exact (x0_hat = x0), so one DDIM step from
    x_t ~ p_t to s must have the joint law of the forward process: Var(x_s) = std_s^2 for every
    eta, and with eta = 1 (the posterior q(x_s | x_t, x0)) Cov(x_s, x_t) = alpha_t/alpha_s
    std_s^2, as x_t = (alpha_t/alpha_s) x_s + independent noise; with eta = 0,
    Cov = std_s std_t (x_s a deterministic function of x_t). 20000 samples, z-scores < 5."""
    sde = SDES[sde_name]()
    x0, n, s_time = 0.7, 20000, 0.3

    def score(x, t):
        alpha, std = sde.marginal_coeffs(t)
        return -(x - alpha[:, None] * x0) / std[:, None] ** 2

    (a_t, a_s), (sd_t, sd_s) = sde.marginal_coeffs(torch.tensor([1.0, s_time], dtype=F64))
    x_t = a_t * x0 + sd_t * torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    x_s = ddim_sample(score, sde, (n, 2), num_steps=1, eta=eta, eps=s_time, sigma_min=None,
                      x_init=x_t,
                      denoise=False, generator=torch.Generator().manual_seed(8)).x
    cs, ct = x_s - a_s * x0, x_t - a_t * x0
    cov = a_t / a_s * sd_s ** 2 if eta == 1.0 else sd_s * sd_t
    for product, expected in ((cs * cs, sd_s ** 2), (cs * ct, cov)):
        z = (product.mean(0) - expected) / (product.std(0) / math.sqrt(n))
        assert z.abs().max() < 5, (z, expected)


# ----- distributions ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian():
    dist = spread_gaussian(64)
    return (dist, *reference_and_floor(dist, N_GAUSS))


#: FD / floor at 10 and 20 steps on the 64-D spread Gaussian (exact score, float64 state,
#: log-SNR steps ending at sigma_min = 0.02, defaults otherwise: final Tweedie step,
#: lower-order final steps), measured VP / sub-VP / VE (VP and sub-VP take the same noise
#: levels, so they agree), and the bounds checked. Each bound is 1.25x the worst of the three
#: SDEs, rounded up: tight enough that a method losing an order fails (a first-order update is
#: at 5-7x the floor at 10 steps, the second-order ones at 1.0-1.7x), loose enough for the seed.
#: Order 1 (either algorithm) is DDIM eta=0 exactly (test_ddim_eta0_equals_first_order_...).
#: (id, function, kwargs, nfe per step, bound at 10 steps, bound at 20 steps)
FD_CASES = [
    # 6.93 / 6.93 / 4.70 at 10, 2.50 / 2.50 / 1.93 at 20
    ("ddim eta=0", ddim_sample, dict(eta=0.0), 1, 8.7, 3.2),
    # ancestral: 16.89 / 16.89 / 12.10, 6.51 / 6.51 / 4.50 (see also the 50/200-step test)
    ("ddim eta=1", ddim_sample, dict(eta=1.0), 1, 21.5, 8.2),
    # 1.20 / 1.20 / 1.18, 1.06 / 1.06 / 1.07
    ("dpm++ 2M", dpm_solver_sample, dict(order=2), 1, 1.5, 1.35),
    # 1.22 / 1.22 / 1.10, 0.99 / 0.99 / 1.03
    ("dpm 2M", dpm_solver_sample, dict(order=2, algorithm="dpmsolver"), 1, 1.55, 1.3),
    # 1.15 / 1.15 / 1.08, 0.99 / 0.99 / 1.03
    ("dpm++ 2S", dpm_solver_sample, dict(order=2, multistep=False), 2, 1.45, 1.3),
    # 1.72 / 1.72 / 1.31, 1.07 / 1.07 / 1.07
    ("dpm 2S", dpm_solver_sample, dict(order=2, multistep=False, algorithm="dpmsolver"), 2,
     2.2, 1.35),
    # 2.95 / 2.95 / 1.20, 1.01 / 1.01 / 1.04 (at 10 steps the lower-order final steps cost)
    ("dpm++ 3M", dpm_solver_sample, dict(order=3), 1, 3.7, 1.3),
    # 1.00 / 1.00 / 1.03, 1.00 / 1.00 / 1.04
    ("dpm 3M", dpm_solver_sample, dict(order=3, algorithm="dpmsolver"), 1, 1.3, 1.3),
    # 1.00 / 1.00 / 1.04, 1.00 / 1.00 / 1.04
    ("dpm++ 3S", dpm_solver_sample, dict(order=3, multistep=False), 3, 1.3, 1.3),
    # 1.01 / 1.01 / 1.04, 1.00 / 1.00 / 1.04
    ("dpm 3S", dpm_solver_sample, dict(order=3, multistep=False, algorithm="dpmsolver"), 3,
     1.3, 1.3),
]


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("case", FD_CASES, ids=[c[0] for c in FD_CASES])
def test_fd_at_10_and_20_steps(gaussian, sde_name, case):
    """Every fast sampler: FD at 10 and 20 steps within its bound (FD_CASES), and the FD falls
    toward the floor as the steps double: FD(20) <= FD(10) + 0.05 floor (the slack covers
    solvers already at the floor at 10 steps, where the rest is the sample sets' noise)."""
    _, fn, kwargs, per_step, bound_10, bound_20 = case
    dist, reference, floor = gaussian
    sde = SDES[sde_name]()
    fd = {}
    for steps, bound in ((10, bound_10), (20, bound_20)):
        result = fn(dist.score_fn(sde), sde, (N_GAUSS, 64), num_steps=steps, dtype=F64,
                    generator=torch.Generator().manual_seed(1), **kwargs)
        assert result.nfe == per_step * steps + 1
        fd[steps] = frechet_distance(result.x, reference)
        assert fd[steps] < bound * floor, (steps, fd[steps] / floor)
    assert fd[20] <= fd[10] + 0.05 * floor, fd


@pytest.mark.parametrize("algorithm", DPM_ALGORITHMS)
@pytest.mark.parametrize("sde_name", SDES)
def test_lower_order_final(sde_name, algorithm):
    """lower_order_final (default None): with 5 <= num_steps < 15 the last multistep step is
    the first-order update from the previous state and the model output there, the one before
    at most second order; with >= 15 or <= 4 steps, or single-step methods, nothing changes.
    True (the official rule) lowers below 15 steps at any count; False never."""
    sde = SDES[sde_name]()
    x_T = sde.prior_sampling((8, 4), generator=torch.Generator().manual_seed(4), dtype=F64)
    score = flow_problem_score(sde)

    def run(n, **kw):
        states = []
        r = dpm_solver_sample(score, sde, x_T.shape, num_steps=n, x_init=x_T, denoise=False,
                              sigma_min=None, algorithm=algorithm, callback=lambda d: states.append(d["x"]),
                              **kw)
        return r.x, states

    # order 2, 6 steps: steps 0-4 as without, the last one first order
    on, states_on = run(6, order=2)
    off, states_off = run(6, order=2, lower_order_final=False)
    for a, b in zip(states_on[:5], states_off[:5]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (on - off).abs().max() > 1e-6
    t = timesteps(sde, 6)
    x = states_on[4]
    (a_s, a_t), (sd_s, sd_t) = sde.marginal_coeffs(t[5:])
    h = 0.5 * (sde.log_snr(t[6]) - sde.log_snr(t[5]))
    s = score(x, t[5].expand(8))
    if algorithm == "dpmsolver++":      # DPM-Solver++(1) (eq. 4.1) with x0_hat by Tweedie
        expected = (sd_t / sd_s) * x - a_t * torch.expm1(-h) * (x + sd_s ** 2 * s) / a_s
    else:                               # DPM-Solver-1 (eq. 3.7) with eps_hat = -std s
        expected = (a_t / a_s) * x - sd_t * torch.expm1(h) * (-sd_s * s)
    torch.testing.assert_close(on, expected, rtol=1e-12, atol=1e-12)
    # order 1 at any count = DPM-Solver-1 = DDIM
    torch.testing.assert_close(run(2, order=1)[0], ddim_sample(
        score, sde, x_T.shape, num_steps=2, x_init=x_T, denoise=False, sigma_min=None).x, rtol=1e-10,
        atol=1e-10)
    # 5 steps of order 3: lowered (orders 1, 2, 3, 2, 1 against 1, 2, 3, 3, 3)
    assert (run(5, order=3)[0] - run(5, order=3, lower_order_final=False)[0]).abs().max() > 1e-6
    # True: the official rule, also at 4 steps (orders 1, 2, 2, 1); from 5 steps as the default
    official, default = run(4, order=2, lower_order_final=True)[0], run(4, order=2)[0]
    assert (official - default).abs().max() > 1e-6
    torch.testing.assert_close(run(6, order=2, lower_order_final=True)[0], on, rtol=0, atol=0)
    assert samplers.fast.final_orders(4, 2, True) == [1, 2, 2, 1]
    assert samplers.fast.final_orders(4, 3, None) == [1, 2, 3, 3]
    assert samplers.fast.final_orders(6, 3, None) == [1, 2, 3, 3, 2, 1]
    assert samplers.fast.final_orders(6, 3, False) == [1, 2, 3, 3, 3, 3]
    # >= 15 steps, <= 4 steps (fast.LOWER_ORDER_FINAL_FROM) and single-step: no change
    for kw in (dict(num_steps=15, order=3), dict(num_steps=4, order=2),
               dict(num_steps=4, order=3), dict(num_steps=6, order=3, multistep=False)):
        n = kw.pop("num_steps")
        torch.testing.assert_close(run(n, **kw)[0], run(n, lower_order_final=False, **kw)[0],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("sde_name", SDES)
def test_ddim_eta1_is_unbiased_as_steps_grow(gaussian, sde_name):
    """DDIM with eta = 1 samples the exact posterior q(x_s | x_t, x0_hat) (ancestral). Its FD
    falls with the steps: measured 0.229 / 0.376 / 0.187 at 50 steps, 0.101 / 0.121 / 0.106
    at 200 (VP / sub-VP / VE; floor 0.108). Checked: 200 steps within 1.3x the floor, and at
    most half the 50-step FD minus the floor (the bias shrinks)."""
    dist, reference, floor = gaussian
    sde = SDES[sde_name]()
    fd = {}
    for steps in (50, 200):
        result = ddim_sample(dist.score_fn(sde), sde, (N_GAUSS, 64), num_steps=steps, eta=1.0,
                             dtype=F64, generator=torch.Generator().manual_seed(1))
        fd[steps] = frechet_distance(result.x, reference)
    assert fd[200] < 1.3 * floor
    assert fd[200] - floor < 0.5 * (fd[50] - floor)


# ----- behaviour ----------------------------------------------------------------------------
def test_nfe_and_callback_and_dtype():
    sde = sde_lib.VPSDE()
    score = flow_problem_score(sde)
    seen = []
    r = dpm_solver_sample(score, sde, (4, 4), num_steps=5, order=3, multistep=False,
                          denoise=False, generator=torch.Generator().manual_seed(0),
                          callback=lambda info: seen.append(info["step"]))
    assert r.nfe == 15 and seen == list(range(5))
    assert r.x.dtype == torch.float32 and torch.isfinite(r.x).all()
    r = dpm_solver_sample(score, sde, (4, 4), num_steps=5, order=2, multistep=False,
                          generator=torch.Generator().manual_seed(0))
    assert r.nfe == 11
    r = dpm_solver_sample(score, sde, (4, 4), num_steps=5, order=3, warmup="singlestep",
                          denoise=False, generator=torch.Generator().manual_seed(0))
    assert r.nfe == 6
    r = ddim_sample(score, sde, (4, 4), num_steps=1, eta=0.5, spacing="karras",
                    generator=torch.Generator().manual_seed(0))
    assert r.nfe == 2 and r.x.shape == (4, 4)


@pytest.mark.parametrize("sde_name", SDES)
def test_float32_state_matches_float64(sde_name):
    """Schedules stay float64; a float32 state keeps its dtype and follows the float64 run
    (measured max difference ~1.5e-6 on the 64-D Gaussian at 20 steps)."""
    sde = SDES[sde_name]()
    x_T = sde.prior_sampling((16, 4), generator=torch.Generator().manual_seed(2), dtype=F64)
    score = flow_problem_score(sde)
    for kw in (dict(order=2), dict(order=3), dict(order=3, multistep=False),
               dict(order=2, algorithm="dpmsolver"), dict(order=3, algorithm="dpmsolver")):
        a = dpm_solver_sample(score, sde, x_T.shape, num_steps=20, x_init=x_T, **kw).x
        b = dpm_solver_sample(score, sde, x_T.shape, num_steps=20, x_init=x_T.float(), **kw).x
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, rtol=0, atol=1e-4 * sde.prior_std)
    b = ddim_sample(score, sde, x_T.shape, num_steps=20, x_init=x_T.float()).x
    assert b.dtype == torch.float32


def test_reproducible_with_generator():
    sde = sde_lib.VESDE(0.01, 20.0)
    score = flow_problem_score(sde)
    a, b = (ddim_sample(score, sde, (4, 4), num_steps=6, eta=1.0,
                        generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a.x, b.x)


def test_bad_input():
    sde = sde_lib.VPSDE()
    score = flow_problem_score(sde)
    with pytest.raises(ValueError, match="dpmsolver\\+\\+, dpmsolver"):
        dpm_solver_sample(score, sde, (2, 4), algorithm="dpm")
    for order in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match="order must be an integer >= 1 and <= 3"):
            dpm_solver_sample(score, sde, (2, 4), order=order)
    for fn in (ddim_sample, dpm_solver_sample):
        for steps in (0, -3):
            with pytest.raises(ValueError, match="num_steps"):
                fn(score, sde, (2, 4), num_steps=steps)
        with pytest.raises(ValueError, match="spacing"):
            fn(score, sde, (2, 4), spacing="linear")
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(score, sde, (2, 4), eta=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        dpm_solver_sample(score, sde, (2, 4), warmup="none")


def test_exported():
    for name in ("ddim_sample", "dpm_solver_sample", "timesteps"):
        assert hasattr(samplers, name) and name in samplers.__all__
