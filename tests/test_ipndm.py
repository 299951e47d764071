"""iPNDM (samplers/ipndm.py): fixed-coefficient Adams-Bashforth in sigma = std / alpha on the
noise prediction, orders 1-4 with lower-order warm-up (Zhang & Chen 2023; k-diffusion's
``sample_ipndm``).

Orders are measured as in tests/test_fast.py against the exact probability-flow ODE of the
4-D Gaussian of tests/testbed.py; Frechet distances on the 64-D spread Gaussian (exact score)
against the floor of two true sample sets of 2000 (0.108) and DPM-Solver++(2M).
"""
import numpy as np
import pytest
import torch

import samplers
import sde_lib
from samplers.fast import SPACINGS, ddim_sample, dpm_solver_sample, timesteps
from samplers.harness import Schedule
from samplers.ipndm import ADAMS_BASHFORTH, ipndm_sample
from testbed import (SDES, exact_flow, fitted_order, flow_problem_score, frechet_distance,
                     reference_and_floor, spread_gaussian)

F64 = torch.float64
N_GAUSS = 2000


def _ipndm(order):
    def run(score, sde, x_T, n):
        return ipndm_sample(score, sde, x_T.shape, num_steps=n, order=order, x_init=x_T,
                            denoise=False, sigma_min=None)
    return run


def _x_T(sde, seed=3):
    return sde.prior_sampling((8, 4), generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----- convergence orders ---------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_convergence_order(sde_name, order):
    """Globally iPNDM is first order for order 1 and second order for orders 2-4: the
    first-order warm-up step (local error h^2) and the fixed Adams-Bashforth weights on a
    non-uniform sigma grid (local error h^3, test_local_order) both bound it by 2. Measured
    on log-SNR steps, 40 / 80 / 160 steps (VP / sub-VP / VE): order 1 0.98 / 0.98 / 0.99,
    2: 1.99 / 1.98 / 1.99, 3: 1.95 / 1.90 / 1.95, 4: 2.03 / 2.06 / 1.98."""
    fitted, errors = fitted_order(_ipndm(order), SDES[sde_name](), (40, 80, 160))
    assert abs(fitted - min(order, 2)) <= 0.3, (fitted, errors)


@pytest.mark.parametrize("sde_name", SDES)
def test_local_order(sde_name):
    """One step x_ve' = x_ve + (sigma' - sigma) sum_j c_j eps_j (the weights ADAMS_BASHFORTH)
    from the exact solution, with the exact noise predictions at the earlier points: on a
    grid uniform in sigma the error of order q is O(h^(q+1)) (measured slopes 2.01, 2.99,
    3.93, 4.82); on a grid uniform in log-SNR, the sampler's default, the fixed weights stop
    at O(h^3) (measured 1.94, 2.94, 3.22, 2.95), whence the global order 2 of orders 3, 4."""
    sde = SDES[sde_name]()
    score, schedule, x_T = flow_problem_score(sde), Schedule(sde), _x_T(sde, seed=0)
    hs = [0.2, 0.1, 0.05, 0.025]
    for order, weights in ADAMS_BASHFORTH.items():
        slopes = {}
        for grid in ("sigma", "lam"):
            errors = []
            for h in hs:
                k = torch.arange(order, -2, -1, dtype=F64)[1:]       # order - 1, ..., 0, -1
                sigma = 1.0 + 0.5 * h * k if grid == "sigma" else torch.exp(h * k)
                points = schedule.at_sigma(sigma).tolist()           # oldest ... s, t
                x = [exact_flow(sde, x_T, p.t) / p.alpha for p in points]          # x_ve
                eps = [-p.std * score(x_i * p.alpha, torch.full((8,), p.t, dtype=F64))
                       for p, x_i in zip(points[:-1], x[:-1])]
                step = points[-1].sigma - points[-2].sigma
                x_next = x[-2] + step * sum(c * e for c, e in zip(weights, eps[::-1]))
                errors.append((x_next - x[-1]).pow(2).mean().sqrt().item())
            slopes[grid] = np.polyfit(np.log(hs), np.log(errors), 1)[0]
        assert slopes["sigma"] >= order + 0.7, slopes
        assert abs(slopes["lam"] - min(order + 1, 3)) <= 0.35, slopes


# ----- the update -----------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sde_name", SDES)
def test_order_1_is_ddim(sde_name, spacing):
    """Euler in (sigma, x / alpha) is DDIM with eta = 0 (Karras et al. 2022, Sec. 4)."""
    sde = SDES[sde_name]()
    x_T, score = _x_T(sde), flow_problem_score(sde)
    a = ddim_sample(score, sde, x_T.shape, num_steps=7, spacing=spacing, x_init=x_T)
    b = ipndm_sample(score, sde, x_T.shape, num_steps=7, order=1, spacing=spacing, x_init=x_T)
    torch.testing.assert_close(b.x, a.x, rtol=1e-12, atol=1e-12)
    assert a.nfe == b.nfe == 8


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("sde_name", SDES)
def test_matches_adams_bashforth_in_ve_coordinates(sde_name, order):
    """The sampler, which works in the SDE's x, equals the k-diffusion form written out in
    x_ve = x / alpha with d = (x_ve - D) / sigma, D Tweedie's data prediction, and the
    warm-up q_i = min(order, i + 1), to round-off, on the default grid of each SDE (Karras
    on VE, log-SNR otherwise)."""
    sde = SDES[sde_name]()
    x_T, score = _x_T(sde), flow_problem_score(sde)
    n = 7
    t = timesteps(sde, n, spacing="karras" if sde_name == "ve" else "logsnr")
    alpha, std = sde.marginal_coeffs(t)
    sigma = std / alpha
    x_ve, ds = x_T / alpha[0], []
    for i in range(n):
        x = alpha[i] * x_ve
        denoised = (x + std[i] ** 2 * score(x, t[i].expand(8))) / alpha[i]
        ds.insert(0, (x_ve - denoised) / sigma[i])
        weights = ADAMS_BASHFORTH[min(order, i + 1)]
        x_ve = x_ve + (sigma[i + 1] - sigma[i]) * sum(c * d for c, d in zip(weights, ds))
    result = ipndm_sample(score, sde, x_T.shape, num_steps=n, order=order, x_init=x_T,
                          denoise=False, sigma_min=None)
    torch.testing.assert_close(result.x, alpha[n] * x_ve, rtol=1e-12, atol=1e-12)
    assert result.nfe == n


# ----- distributions --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian():
    dist = spread_gaussian(64)
    return (dist, *reference_and_floor(dist, N_GAUSS))


#: FD / floor at 10 and 20 steps (the default grid: log-SNR on VP and sub-VP, which take the
#: same noise levels, Karras on VE; ending at sigma_min = 0.02; final Tweedie step), VP /
#: sub-VP / VE, and the bounds (~1.25x the worst SDE). dpm_solver's default (2M) for
#: comparison: 1.20 / 1.20 / 1.18 at 10, 1.06 / 1.06 / 1.07 at 20. (order, bound at 10,
#: bound at 20)
FD_CASES = [
    (1, 8.7, 3.2),       # 6.93 / 6.93 / 4.68, 2.50 / 2.50 / 1.93 (= DDIM on VP / sub-VP)
    (2, 1.5, 1.3),       # 1.18 / 1.18 / 1.10, 0.99 / 0.99 / 1.03
    (3, 1.4, 1.35),      # 1.08 / 1.08 / 1.10, 1.03 / 1.03 / 1.06 (the default)
    (4, 1.65, 1.35),     # 1.32 / 1.32 / 1.17, 1.04 / 1.04 / 1.06
]


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("case", FD_CASES, ids=[f"order{c[0]}" for c in FD_CASES])
def test_fd_at_10_and_20_steps(gaussian, sde_name, case):
    order, bound_10, bound_20 = case
    dist, reference, floor = gaussian
    sde = SDES[sde_name]()
    fd = {}
    for steps in (10, 20):
        result = ipndm_sample(dist.score_fn(sde), sde, (N_GAUSS, 64), num_steps=steps,
                              order=order, dtype=F64, generator=torch.Generator().manual_seed(1))
        assert result.nfe == steps + 1
        fd[steps] = frechet_distance(result.x, reference) / floor
    assert fd[10] < bound_10 and fd[20] < bound_20, fd
    assert fd[20] <= fd[10] + 0.05, fd


@pytest.mark.parametrize("sde_name", SDES)
def test_fd_against_dpm_solver_at_20_steps(gaussian, sde_name):
    """At 20 NFE the default iPNDM (order 3) is within 3 % of DPM-Solver++(2M)'s FD / floor
    (1.03 / 1.03 / 1.06 against 1.06 / 1.06 / 1.07)."""
    dist, reference, floor = gaussian
    sde = SDES[sde_name]()
    fds = [frechet_distance(fn(dist.score_fn(sde), sde, (N_GAUSS, 64), num_steps=20, dtype=F64,
                               generator=torch.Generator().manual_seed(1)).x, reference)
           for fn in (ipndm_sample, dpm_solver_sample)]
    assert fds[0] <= 1.03 * fds[1], fds


# ----- options and registry -------------------------------------------------------------------
def test_nfe_is_num_steps_plus_the_denoising_step():
    sde = sde_lib.VESDE(0.01, 20.0)
    score = flow_problem_score(sde)
    for order in (1, 2, 3, 4):
        for n, denoise in ((1, False), (2, True), (3, False), (12, True)):
            r = ipndm_sample(score, sde, (3, 4), num_steps=n, order=order, denoise=denoise,
                             generator=torch.Generator().manual_seed(0))
            assert r.nfe == n + denoise and r.x.dtype == torch.float32


@pytest.mark.parametrize("option, value", [
    ("num_steps", 0), ("num_steps", 1.5), ("order", 0), ("order", 5), ("order", True),
    ("spacing", "cosine"), ("eps", 0.0), ("eps", 2.0), ("denoise", 1)])
def test_bad_options_name_the_option(option, value):
    sde = sde_lib.VPSDE()
    calls = []
    with pytest.raises(ValueError, match=option) as info:
        ipndm_sample(lambda x, t: calls.append(1) or x, sde, (2, 4), **{option: value})
    assert not calls and "\n" not in str(info.value)
    with pytest.raises(ValueError, match=option):
        samplers.SAMPLERS["ipndm"].options(sde, {option: value})


def test_registered_and_exported():
    assert samplers.SAMPLERS["ipndm"].fn is ipndm_sample
    assert samplers.SAMPLERS["ipndm"].defaults == dict(num_steps=20, order=3, spacing=None,
                                                        eps=1e-3, sigma_min=0.02,
                                                        schedule=None, denoise=True)
    assert "ipndm_sample" in samplers.__all__ and samplers.ipndm_sample is ipndm_sample
