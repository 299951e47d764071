"""The VP SDEs given by their schedule (sde_lib/schedules.py): improved DDPM's cosine schedule
(CosineVPSDE) and the linear log-SNR schedule (LinearLogSNRVPSDE).

Checked against numbers computed independently of the library: the paper's alpha_bar and
beta written out here, scipy's quadrature of beta, a line-by-line copy of improved DDPM's
``betas_for_alpha_bar``, the closed-form log-density and DSM-loss minimum of Gaussian data,
and sampler output against true samples (the exact-score test bed, tests/testbed.py).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate

import samplers
import sde_lib
from run_lib import compose
from run_lib.validate import ConfigError, check_override_key, load_config_file, validate_config
from samplers.likelihood import log_likelihood
from testbed import frechet_distance, reference_and_floor, spread_gaussian

F64 = torch.float64
ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
S = 0.008                        # improved DDPM's offset


def _t(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=F64)


# ----- the paper's formulas, written out independently --------------------------------------
def paper_alpha_bar(t: float, s: float = S) -> float:
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) pi / 2) (Nichol & Dhariwal
    2021, eq. 17)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f(t) / f(0.0)


def paper_betas(N: int, max_beta: float = 0.999, s: float = S) -> np.ndarray:
    """improved-diffusion's get_named_beta_schedule("cosine", N), line by line
    (openai/improved-diffusion, improved_diffusion/gaussian_diffusion.py)."""
    alpha_bar = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = []
    for i in range(N):
        t1 = i / N
        t2 = (i + 1) / N
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def paper_beta(t: float, s: float = S) -> float:
    """-d log alpha_bar / dt of the unclipped cosine schedule: pi / (1 + s) tan(u(t))."""
    return math.pi / (1 + s) * math.tan((t + s) / (1 + s) * math.pi / 2)


SCHEDULES = {
    "cosine_vpsde": sde_lib.CosineVPSDE,
    "logsnr_vpsde": sde_lib.LinearLogSNRVPSDE,
}
PARAMS = [pytest.param(cls, id=name) for name, cls in SCHEDULES.items()]


# ----- a. the continuous schedule ------------------------------------------------------------
def test_cosine_marginals_are_the_papers_and_clipped_as_documented():
    sde = sde_lib.CosineVPSDE()
    assert sde.N == 1000 and sde.s == S and sde.max_beta == 0.999
    # the clip: the rate whose one step of 1/N decays alpha_bar by 1 - max_beta, reached at
    # t_clip where the paper's beta(t) equals it
    assert math.isclose(sde.beta_clip, -1000 * math.log(0.001), rel_tol=1e-15)
    assert math.isclose(paper_beta(sde.t_clip), sde.beta_clip, rel_tol=1e-9)
    assert 1 - 3e-4 < sde.t_clip < 1 - 2.8e-4
    # below t_clip: the paper's alpha_bar and beta (float64: the paper's cos^2 near t = 1 has
    # relative error ~1e-16 / cos^2(u) ~ 1e-9 at t_clip, so the tolerance is 1e-8 there)
    t = torch.cat([_t([0.0, 1e-7, 1e-5]), torch.linspace(1e-3, sde.t_clip, 2001, dtype=F64)])
    alpha, std = sde.marginal_coeffs(t)
    expected = _t([paper_alpha_bar(v) for v in t.tolist()])
    torch.testing.assert_close(alpha ** 2, expected, rtol=1e-8, atol=0)
    torch.testing.assert_close(alpha ** 2 + std ** 2, torch.ones_like(t), rtol=0, atol=1e-15)
    torch.testing.assert_close(sde.beta(t), _t([paper_beta(v) for v in t.tolist()]),
                               rtol=1e-8, atol=0)
    # above it: the rate is beta_clip and log alpha_bar falls linearly to a finite value
    t = torch.linspace(sde.t_clip, 1.0, 50, dtype=F64)
    assert (sde.beta(t[1:]) == sde.beta_clip).all()
    b = sde.integrated_beta(t)
    torch.testing.assert_close(b - b[0], sde.beta_clip * (t - t[0]), rtol=1e-12, atol=1e-12)
    alpha_T, std_T = sde.marginal_coeffs(_t(1.0))
    # the documented end point: alpha_bar(1) = 2.7e-8, alpha(T) = 1.7e-4, lambda(T) = -17.4,
    # and the clipped tail adds ~2 to B whatever N is
    assert 2.6e-8 < alpha_T ** 2 < 2.9e-8 and 1.6e-4 < alpha_T < 1.75e-4
    assert -17.5 < sde.log_snr(_t(1.0)) < -17.3
    for N in (10, 100, 1000, 4000):
        other = sde_lib.CosineVPSDE(N=N)
        tail = other.integrated_beta(_t(1.0)) - other.integrated_beta(_t(other.t_clip))
        assert 1.99 < tail < 2.0, (N, tail)


@pytest.mark.parametrize("make_sde", PARAMS)
def test_alpha_bar_is_exp_of_minus_the_integral_of_beta(make_sde):
    """B(t) - B(0) = int_0^t beta by scipy's adaptive quadrature (the clip's kink as a break
    point), so beta, the marginals and the SDE's drift / diffusion belong to one schedule."""
    sde = make_sde()
    beta = lambda v: sde.beta(_t(v)).item()
    kinks = [getattr(sde, "t_clip", 0.5)]
    for t in (1e-4, 0.1, 0.5, 0.9, 0.999, 0.9999, 1.0):
        points = [k for k in kinks if 0 < k < t]
        value, error = integrate.quad(beta, 0.0, t, points=points or None, limit=200,
                                      epsabs=1e-13, epsrel=1e-12)
        b = sde.integrated_beta(_t([0.0, t]))
        assert math.isclose((b[1] - b[0]).item(), value, rel_tol=1e-9, abs_tol=1e-12), (t, value)
        alpha, std = sde.marginal_coeffs(_t(t))
        assert math.isclose(alpha.item() ** 2, math.exp(-b[1].item()), rel_tol=1e-12)
    # the SDE's coefficients: drift -beta x / 2, diffusion sqrt(beta)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = _t([0.01, 0.3, 0.97, 1.0])
    drift, g = sde.sde(x, t)
    torch.testing.assert_close(drift, -0.5 * sde.beta(t)[:, None] * x, rtol=1e-15, atol=0)
    torch.testing.assert_close(g ** 2, sde.beta(t), rtol=1e-14, atol=0)


def test_linear_log_snr_schedule():
    sde = sde_lib.LinearLogSNRVPSDE()
    assert (sde.logsnr_min, sde.logsnr_max) == (-10.0, 13.3)
    t = torch.linspace(0, 1, 101, dtype=F64)
    lam = 13.3 + t * (-10.0 - 13.3)
    torch.testing.assert_close(sde.log_snr(t), lam, rtol=1e-15, atol=1e-14)
    alpha, std = sde.marginal_coeffs(t)
    torch.testing.assert_close(alpha ** 2, 1 / (1 + torch.exp(-lam)), rtol=1e-14, atol=0)
    torch.testing.assert_close(std ** 2, 1 / (1 + torch.exp(lam)), rtol=1e-14, atol=0)
    # beta = -d lambda/dt sigmoid(-lambda), bounded by the slope: no clip needed
    torch.testing.assert_close(sde.beta(t), 23.3 / (1 + torch.exp(lam)), rtol=1e-14, atol=0)
    # the documented ends: std(0) = 1.3e-3, alpha(T) = 6.7e-3
    assert 1.29e-3 < std[0] < 1.30e-3 and 6.73e-3 < alpha[-1] < 6.74e-3


@pytest.mark.parametrize("make_sde", PARAMS + [
    pytest.param(lambda: sde_lib.CosineVPSDE(N=50, s=0.02, max_beta=0.99), id="cosine-custom"),
    pytest.param(lambda: sde_lib.LinearLogSNRVPSDE(-5.0, 5.0, N=10), id="logsnr-custom"),
])
def test_log_snr_and_its_inverse_are_exact_over_the_whole_range(make_sde):
    sde = make_sde()
    clip = getattr(sde, "t_clip", 0.999)
    t = torch.cat([torch.logspace(-8, 0, 801, dtype=F64), torch.linspace(1e-3, 1, 999, dtype=F64),
                   clip + torch.linspace(-1e-4, 1e-4, 201, dtype=F64) * (1 - clip),
                   _t([1.0, 1.001, 1.05])])                      # past T: it extrapolates
    lam = sde.log_snr(t)
    assert torch.isfinite(lam).all()
    # measured: <= 3.4e-16 absolute on t for all four; for the cosine schedule <= 2e-15
    # relative down to t = 1e-12 (the angles are formed without cancellation). The log-SNR
    # schedule's t = (logsnr_max - lambda) / slope cannot do better than ~1e-16 absolute.
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=1e-12, atol=1e-15)
    if hasattr(sde, "t_clip"):
        tiny = torch.logspace(-12, -6, 50, dtype=F64)
        torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(tiny)), tiny, rtol=1e-13, atol=0)
    # lambda -> t -> lambda over [lambda(T), lambda(1e-8)] (measured <= 8e-13 absolute)
    grid = torch.linspace(lam.min().item(), lam.max().item(), 3001, dtype=F64)
    torch.testing.assert_close(sde.log_snr(sde.t_from_log_snr(grid)), grid, rtol=1e-12,
                               atol=1e-12)
    alpha, std = sde.marginal_coeffs(t)
    torch.testing.assert_close(lam, torch.log(alpha ** 2 / std ** 2), rtol=1e-11, atol=1e-11)
    assert (torch.diff(sde.log_snr(torch.linspace(0, 1, 20001, dtype=F64))) < 0).all()
    # continuous at the clip
    if hasattr(sde, "t_clip"):
        left, right = sde.integrated_beta(_t([sde.t_clip * (1 - 1e-15), sde.t_clip * (1 + 1e-15)]))
        assert abs(right - left) < 1e-10


# ----- b. the discrete chain -----------------------------------------------------------------
@pytest.mark.parametrize("N, max_beta", [(1000, 0.999), (4000, 0.999), (50, 0.999), (1000, 0.9)])
def test_cosine_chain_is_improved_ddpms(N, max_beta):
    sde = sde_lib.CosineVPSDE(N=N, max_beta=max_beta)
    expected = paper_betas(N, max_beta)
    betas = sde.discrete_betas.numpy()
    # the paper's 1 - ratio loses ~1e-16 absolute on betas of ~4e-5 / N-th size; ours is
    # -expm1(difference of logs): agreement to 1e-10 relative
    np.testing.assert_allclose(betas, expected, rtol=1e-10, atol=0)
    assert betas.max() == max_beta and (betas == max_beta).sum() == (expected == max_beta).sum()
    np.testing.assert_allclose(sde.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-10)
    # level i: the unclipped alpha_bar((i + 1) / N), and the SDE's where no beta was clipped
    i = torch.arange(N)
    alpha_i, std_i = sde.discrete_marginal_coeffs(i)
    abar = _t([paper_alpha_bar((k + 1) / N) for k in range(N)])
    unclipped = torch.from_numpy(np.cumsum(expected == max_beta) == 0)
    torch.testing.assert_close(alpha_i[unclipped] ** 2, abar[unclipped], rtol=1e-8, atol=0)
    torch.testing.assert_close(alpha_i ** 2 + std_i ** 2, torch.ones(N, dtype=F64), rtol=0,
                               atol=1e-15)
    below = ((i + 1) / N <= sde.t_clip) & unclipped
    assert below.sum() == N - 1                     # all but the last: 1 - t_clip < 1 / N
    alpha_t, _ = sde.marginal_coeffs((i[below] + 1).to(F64) / N)
    torch.testing.assert_close(alpha_i[below], alpha_t, rtol=1e-8, atol=0)


def test_cosine_chain_at_n_1000_clips_only_the_last_beta():
    sde = sde_lib.CosineVPSDE()
    betas = sde.discrete_betas
    assert betas[-1] == 0.999 and (betas[:-1] < 0.75 + 1e-6).all()
    assert 4.1e-5 < betas[0] < 4.2e-5                         # beta_0 = 1 - f(1/N)/f(0)
    assert 2.4e-9 < sde.alphas_cumprod[-1] < 2.5e-9


def test_logsnr_chain_has_the_kernels_alpha_bar_at_every_level():
    for N in (1000, 25):
        sde = sde_lib.LinearLogSNRVPSDE(N=N)
        lam = 13.3 - 23.3 * torch.arange(1, N + 1, dtype=F64) / N
        torch.testing.assert_close(sde.alphas_cumprod, torch.sigmoid(lam), rtol=1e-12, atol=0)
        # the same rule as the paper's: beta_i = 1 - abar((i+1)/N) / abar(i/N), from the data
        ratio = torch.sigmoid(lam) / torch.cat([_t([1.0]), torch.sigmoid(lam[:-1])])
        torch.testing.assert_close(sde.discrete_betas, 1 - ratio, rtol=1e-9, atol=1e-15)
        assert sde.discrete_betas.max() < 1 - math.exp(-23.3 / N) + 1e-12


@pytest.mark.parametrize("make_sde", PARAMS)
def test_discretize_is_the_ddpm_step_of_the_table(make_sde):
    sde = make_sde(N=100)
    assert sde.has_discrete_chain and sde.network_conditioning == "time"
    assert not sde.keeps_data_scale
    i = torch.tensor([0, 1, 50, 98, 99])
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    f, G = sde.discretize(x, sde.index_time(i))
    beta = sde.discrete_betas[i]
    torch.testing.assert_close(f, (torch.sqrt(1 - beta) - 1)[:, None, None] * x, rtol=1e-14,
                               atol=0)
    torch.testing.assert_close(G, torch.sqrt(beta), rtol=0, atol=0)
    # the chain's moments: x_i = prod sqrt(1 - beta) x_0 + ..., variance 1 - alpha_bar_i
    a, v = 1.0, 0.0
    for k in range(sde.N):
        fk, gk = sde.discretize(torch.ones(1, 1, dtype=F64), sde.index_time(torch.tensor([k])))
        c = 1 + fk.item()
        a, v = c * a, c * c * v + gk.item() ** 2
    alpha_last, std_last = sde.discrete_marginal_coeffs(torch.tensor(sde.N - 1))
    assert math.isclose(a, alpha_last.item(), rel_tol=1e-12)
    assert math.isclose(v, std_last.item() ** 2, rel_tol=1e-12)


# ----- c. the ODE likelihood -----------------------------------------------------------------
EPS = 1e-5


@pytest.mark.parametrize("data", ["gaussian16", "eight_modes"])
@pytest.mark.parametrize("make_sde", PARAMS)
def test_ode_likelihood_matches_the_true_log_density(make_sde, data):
    """As tests/test_likelihood.py does for VP / sub-VP / VE: exact trace, dopri5 at
    rtol = atol = 1e-5, error against log p_eps(x) in closed form. Measured MAE (16-D
    Gaussian / eight modes): cosine 2.3e-4 / 1.6e-4, log-SNR 1.1e-3 / 2.9e-3, of which the
    prior substitution (p_T -> N(0, I)) is 5e-8 / 7e-5 for the cosine schedule (alpha(T) =
    1.7e-4) and 8e-5 / 2.9e-3 for the log-SNR one (alpha(T) = 6.7e-3); an error in the
    drift's divergence or in beta costs nats. Bounds as in test_likelihood.py."""
    sde = make_sde()
    if data == "gaussian16":
        base = spread_gaussian(16, seed=3)
        dist = sde_lib.GaussianMixture.gaussian(torch.zeros(16, dtype=F64), base.covs[0])
        n = 64
    else:
        dist, n = sde_lib.eight_mode_mixture(), 300
    x = dist.sample_marginal(sde, EPS, n, generator=torch.Generator().manual_seed(1))
    result = log_likelihood(dist.score_fn(sde), sde, x, trace="exact", eps=EPS)
    error = result.logp.to(F64) - dist.marginal_log_prob(sde, x, EPS)
    z = result.z.to(F64)
    prior_term = sde.prior_logp(z) - dist.marginal_log_prob(sde, z, sde.T)
    assert error.abs().mean() <= 0.02, f"MAE {error.abs().mean():.4g}"
    assert (error - prior_term).abs().mean() <= 0.01


# ----- d. every sampler on the exact score ---------------------------------------------------
#: FD to a true sample set / the floor of two true sets (n = 2000, 16-D spread Gaussian,
#: stds 0.05-1.0, as in tests/test_sampler_contract.py), registry defaults, N = 100 levels.
#: Measured (cosine / log-SNR): pc 0.86 / 1.10, ode 1.21 / 1.20, ddim 3.68 / 2.89 (log-SNR
#: steps to sigma_min = 0.02; uniform-in-t steps give 1.90 on the cosine schedule with the exact
#: score, but on a trained cosine digits model DDIM-50's FID went 11.3 -> 158: the first
#: uniform step from alpha(T) = 1.7e-4 to 0.031 multiplies the network's noise error by ~190),
#: dpm_solver 1.56 / 1.56, edm 5.56 / 3.40, dpm_adaptive 1.08 / 1.07. EDM's 18 Karras levels
#: start at sigma(T) = exp(-lambda(T) / 2): 602 for the cosine schedule at N = 100 (6024 at
#: N = 1000, where the ratio is 21 and falls to 1.4 at 72 steps), against 148 for the log-SNR
#: one and 152 for VP, so it is furthest from the floor there; DDIM is first order. A broken
#: update gives ~100x the floor. Bounds: ~1.5x the measured ratio.
#: unipc 1.45 / 1.44, ipndm 1.35 / 1.30, respaced (50 of the 100 levels, beta~) 2.17 / 4.51:
#: the log-SNR chain's beta~ is far below the optimal variance in its first levels.
BOUNDS = {"pc": 1.7, "ode": 1.8, "ddim": 5.5, "dpm_solver": 2.4, "edm": {"cosine_vpsde": 8.5,
          "logsnr_vpsde": 5.5}, "dpm_adaptive": 1.6, "unipc": 2.2, "ipndm": 2.3,
          "respaced": {"cosine_vpsde": 3.3, "logsnr_vpsde": 6.8}}


@pytest.fixture(scope="module")
def gaussian16():
    dist = spread_gaussian(16, seed=5, std_min=0.05, std_max=1.0)
    return (dist, *reference_and_floor(dist, 2000))


def _applies(name: str, sde) -> bool:
    try:
        samplers.SAMPLERS[name].options(sde, {})
    except ValueError:
        return False
    return True


def _sampler_cases():
    """Every registry sampler that runs on a VP SDE (all but ald, test_ald_names_...)."""
    for sde_name, cls in SCHEDULES.items():
        for name in samplers.SAMPLERS:
            if _applies(name, cls(N=100)):
                yield pytest.param(sde_name, name, id=f"{name}-{sde_name}")


def _bound(bounds: dict, name: str, sde_name: str) -> float:
    if name not in bounds:
        pytest.fail(f"sampler {name!r} has no measured bound in tests/test_schedules.py: run it "
                    "and add one")
    return bounds[name][sde_name] if isinstance(bounds[name], dict) else bounds[name]


@pytest.mark.parametrize("sde_name, name", list(_sampler_cases()))
def test_every_sampler_recovers_the_data_from_the_exact_score(gaussian16, sde_name, name):
    dist, reference, floor = gaussian16
    sde = SCHEDULES[sde_name](N=100)
    result = samplers.SAMPLERS[name](dist.score_fn(sde), sde, (2000, 16), dtype=F64,
                                     generator=torch.Generator().manual_seed(3))
    ratio = frechet_distance(result.x, reference) / floor
    assert ratio < _bound(BOUNDS, name, sde_name), (name, sde_name, ratio)


@pytest.mark.parametrize("predictor", ["ancestral_sampling", "euler_maruyama"])
@pytest.mark.parametrize("make_sde", PARAMS)
def test_every_pc_predictor(gaussian16, make_sde, predictor):
    """The ancestral predictor uses the chain's posterior, Euler-Maruyama the continuous
    beta (beta_clip * dt = 6.9 N / (N - 1) in the first step of the cosine schedule, where x
    is noise and the score ~ -x). Without the corrector at N = 100, FD / floor measured over
    seeds 3, 4 (cosine / log-SNR / VP for comparison): ancestral 1.39-1.56 / 1.74-2.00 /
    2.25-2.68 (PC's score times t_k sit up to 1/N from the chain's levels; the same for VP),
    Euler-Maruyama 0.85-0.88 / 0.61-0.90 / 0.76-0.88."""
    dist, reference, floor = gaussian16
    sde = make_sde(N=100)
    result = samplers.pc_sample(dist.score_fn(sde), sde, (2000, 16), predictor=predictor,
                                corrector="none", dtype=F64,
                                generator=torch.Generator().manual_seed(4))
    bound = {"ancestral_sampling": 3.0, "euler_maruyama": 1.5}[predictor]
    assert frechet_distance(result.x, reference) / floor < bound


@pytest.mark.slow
@pytest.mark.parametrize("sde_name, name", list(_sampler_cases()))
def test_every_sampler_at_n_1000(gaussian16, sde_name, name):
    """The same at the default N = 1000 (pc: 1000 levels, ~7 s). Measured (cosine / log-SNR):
    pc 0.79 / 0.72, ode 1.21 / 1.20, ddim 5.22 / 2.89, dpm_solver 1.72 / 1.56, edm 21.2 / 3.4,
    dpm_adaptive 1.08 / 1.07, unipc 1.63 / 1.44, ipndm 1.40 / 1.30, respaced 1.58 / 3.40."""
    dist, reference, floor = gaussian16
    sde = SCHEDULES[sde_name]()
    result = samplers.SAMPLERS[name](dist.score_fn(sde), sde, (2000, 16), dtype=F64,
                                     generator=torch.Generator().manual_seed(3))
    bounds = {**BOUNDS, "ddim": 7.8, "edm": {"cosine_vpsde": 32.0, "logsnr_vpsde": 5.5}}
    assert frechet_distance(result.x, reference) / floor < _bound(bounds, name, sde_name)


@pytest.mark.parametrize("make_sde", PARAMS)
def test_ald_names_what_works_instead(make_sde):
    with pytest.raises(ValueError, match="VESDE"):
        samplers.SAMPLERS["ald"].options(make_sde(), {})
    assert {case.values[1] for case in _sampler_cases()} == set(samplers.SAMPLERS) - {"ald"}


# ----- e. the losses -------------------------------------------------------------------------
#: Data N(0, diag(L)) in 4-D; with the exact score the DSM loss (reduce_mean) at a noise level
#: (alpha, std) has expectation mean_d alpha^2 l_d / (alpha^2 l_d + std^2) (the residual
#: std * s + z = (alpha^2 l z - std alpha x_0) / (alpha^2 l + std^2) per coordinate).
L = torch.tensor([0.04, 0.25, 1.0, 2.25], dtype=F64)


def _expected_residual(alpha_bar: float) -> float:
    l = L.numpy()
    return float(np.mean(alpha_bar * l / (alpha_bar * l + 1 - alpha_bar)))


def _paper_alpha_bar(name: str):
    if name == "cosine_vpsde":
        return paper_alpha_bar
    return lambda t: 1 / (1 + math.exp(-(13.3 - 23.3 * t)))


def _paper_beta(name: str):
    if name == "cosine_vpsde":
        return paper_beta
    return lambda t: 23.3 / (1 + math.exp(13.3 - 23.3 * t))


@pytest.mark.parametrize("weighting", ["uniform", "likelihood", "importance"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_continuous_dsm_loss_has_the_closed_form_expectation(name, weighting):
    """Monte Carlo over 40000 samples within 5 SE of the expectation computed by quadrature
    of the paper's (unclipped) alpha_bar and beta: the clip changes the integrand by < 1e-6
    (alpha_bar < 3e-7 where it acts). Importance sampling draws t through t_from_log_snr, so
    a wrong inverse shifts the mean."""
    sde = SCHEDULES[name]()
    eps = 1e-5
    dist = sde_lib.GaussianMixture.gaussian(torch.zeros(4, dtype=F64), torch.diag(L))
    x = dist.sample(40000, generator=torch.Generator().manual_seed(0), dtype=F64)
    abar, beta = _paper_alpha_bar(name), _paper_beta(name)
    if weighting == "uniform":
        integrand = lambda t: _expected_residual(abar(t))
    else:   # g^2 / std^2 times the residual
        integrand = lambda t: beta(t) / (1 - abar(t)) * _expected_residual(abar(t))
    upper = min(sde.t_clip, 1.0) if name == "cosine_vpsde" else 1.0
    expected = integrate.quad(integrand, eps, upper, limit=200, points=[1e-3, 1e-2])[0] / (1 - eps)
    losses = sde_lib.dsm_losses(dist.score_fn(sde), sde, x, eps=eps, reduce_mean=True,
                                likelihood_weighting=weighting != "uniform",
                                importance_sampling=weighting == "importance",
                                generator=torch.Generator().manual_seed(1))
    assert losses.shape == (40000,)
    se = losses.std().item() / math.sqrt(losses.numel())
    assert abs(losses.mean().item() - expected) < 5 * se, (losses.mean().item(), expected, se)
    # power: the VP schedule's expectation is many SE away
    if weighting == "uniform":
        vp = sde_lib.VPSDE()
        vp_abar = lambda t: vp.marginal_coeffs(_t(t))[0].item() ** 2
        other = integrate.quad(lambda t: _expected_residual(vp_abar(t)), eps, 1.0,
                               limit=200)[0] / (1 - eps)
        assert abs(other - expected) > 10 * se


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_discrete_dsm_loss_uses_the_papers_levels(name):
    """The discrete loss draws a level uniformly and uses the chain's (alpha_i, std_i): with a
    score exact for the chain's levels its expectation is the level average of the residual
    with the paper's alpha_bar_i (the table re-implemented here). Through get_loss_fn
    (continuous=False), as training does."""
    sde = SCHEDULES[name](N=100)
    dist = sde_lib.GaussianMixture.gaussian(torch.zeros(4, dtype=F64), torch.diag(L))
    x = dist.sample(40000, generator=torch.Generator().manual_seed(0), dtype=F64)

    def chain_score(x_t, t):
        alpha, std = sde.discrete_marginal_coeffs(sde.time_index(t))
        return -x_t / (alpha[:, None] ** 2 * L + std[:, None] ** 2)

    if name == "cosine_vpsde":
        abar = np.cumprod(1 - paper_betas(100))
    else:
        abar = 1 / (1 + np.exp(-(13.3 - 23.3 * np.arange(1, 101) / 100)))
    expected = np.mean([_expected_residual(a) for a in abar])
    losses = sde_lib.discrete_dsm_losses(chain_score, sde, x, reduce_mean=True,
                                         generator=torch.Generator().manual_seed(1))
    se = losses.std().item() / math.sqrt(losses.numel())
    assert abs(losses.mean().item() - expected) < 5 * se, (losses.mean().item(), expected, se)
    # power: DDPM's linear chain of as many levels is many SE away
    linear = np.mean([_expected_residual(a) for a in sde_lib.VPSDE(N=100).alphas_cumprod.tolist()])
    assert abs(linear - expected) > 10 * se
    loss_fn = sde_lib.get_loss_fn(sde, continuous=False, reduce_mean=True)
    assert math.isclose(loss_fn(chain_score, x, generator=torch.Generator().manual_seed(1)).item(),
                        losses.mean().item(), rel_tol=1e-12)


# ----- f. parameters, names and configs ------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: sde_lib.CosineVPSDE(s=0.0), r"^s must be"),
    (lambda: sde_lib.CosineVPSDE(max_beta=1.0), r"^max_beta must be a number in \(0, 1\)"),
    (lambda: sde_lib.CosineVPSDE(max_beta=0.0), r"^max_beta"),
    (lambda: sde_lib.CosineVPSDE(N=0), r"\bN\b"),
    (lambda: sde_lib.LinearLogSNRVPSDE(logsnr_min=5.0, logsnr_max=1.0),
     r"^logsnr_min must be < logsnr_max"),
    (lambda: sde_lib.LinearLogSNRVPSDE(logsnr_max=float("inf")), r"^logsnr_max"),
])
def test_bad_parameters_raise_one_line_errors_naming_them(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_registered_and_built_by_name():
    assert sde_lib.SDES["cosine_vpsde"] is sde_lib.CosineVPSDE
    assert sde_lib.SDES["logsnr_vpsde"] is sde_lib.LinearLogSNRVPSDE
    sde = sde_lib.build_sde("cosine_vpsde", N=400, s=0.01, max_beta=0.99)
    assert repr(sde) == "CosineVPSDE(N=400, s=0.01, max_beta=0.99)"
    sde = sde_lib.build_sde("LOGSNR_VPSDE", logsnr_min=-8.0, logsnr_max=9.0, N=30)
    assert repr(sde) == "LinearLogSNRVPSDE(logsnr_min=-8.0, logsnr_max=9.0, N=30)"
    with pytest.raises(ValueError, match="cosine_vpsde, logsnr_vpsde"):
        sde_lib.build_sde("cosine")


@pytest.mark.parametrize("name, params", [
    ("cosine_vpsde", {"s": 0.02, "max_beta": 0.99}),
    ("logsnr_vpsde", {"logsnr_min": -8.0, "logsnr_max": 11.0}),
])
def test_config_builds_validates_and_records_the_sde(name, params):
    config = load_config_file(str(ROOT_CONFIGS / "toy" / "vp_mixture.py"))
    for key in ("sde.s", "sde.max_beta", "sde.logsnr_min", "sde.logsnr_max"):
        check_override_key(config, key)            # --config.sde.<key>=... works
    config.sde.name = name
    config.sde.num_scales = 200
    for key, value in params.items():
        config.sde[key] = value
    sde = compose.build_sde(config)
    assert type(sde) is SCHEDULES[name] and sde.N == 200
    assert repr(sde) == repr(SCHEDULES[name](N=200, **params))
    assert compose.sde_metadata(sde) == {"name": name, **params, "N": 200}
    for mode in ("train", "sample", "likelihood"):
        validate_config(config, mode)
    config.training.continuous = False             # the discrete (DDPM) loss and labels
    validate_config(config, "train")
    bad = {"cosine_vpsde": ("max_beta", 1.0, "config.sde.max_beta must be a number in (0, 1)"),
           "logsnr_vpsde": ("logsnr_min", 12.0, "config.sde.logsnr_min must be < logsnr_max")}
    key, value, message = bad[name]
    config.sde[key] = value
    with pytest.raises(ConfigError) as info:
        validate_config(config, "train")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
