"""Predictor-corrector and annealed Langevin samplers, run on exact scores.

Distribution checks: with the exact score a correct sampler reproduces the data up to its
discretisation error, so its Frechet distance to an independent true sample set must be
close to the floor, the distance between two independent true sample sets of the same size
(the floor is pure sampling noise: ~0.094 for 2000 samples of the 64-D Gaussian). Mode
weights of the 2-D mixture are compared in total variation; with 10000 samples the TV of a
perfect sampler is ~0.008 (sum of 8 binomial errors), so 0.02 is ~2.5x that.
"""
import math

import pytest
import torch

import samplers
import sde_lib
from samplers.harness import Schedule
from samplers.pc import ancestral_coefficients
from testbed import SDES, reference_and_floor, eight_mode_mixture, frechet_distance, spread_gaussian

F64 = torch.float64
N_GAUSS = 2000
N_MIX = 10000



def pc_sde(name: str, N: int = 1000):
    """The test bed's SDE ``name`` with N levels; VE with sigma_max = 5, the setting the
    bounds of these PC tests were measured with."""
    return SDES[name](N=N, sigma_max=5.0) if name == "ve" else SDES[name](N=N)


@pytest.fixture(scope="module")
def gaussian():
    dist = spread_gaussian(64)
    return (dist, *reference_and_floor(dist, N_GAUSS))


def mode_weights(mixture, x):
    """Fraction of samples nearest to each mode mean, (K,)."""
    nearest = torch.cdist(x.double(), mixture.means).argmin(dim=1)
    return torch.bincount(nearest, minlength=mixture.num_components).double() / x.shape[0]


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def check_mixture(mixture, x):
    """Mode weights within 0.02 TV, and the within-mode spread close to the data's."""
    assert torch.isfinite(x).all()
    true_x = mixture.sample(x.shape[0], generator=torch.Generator().manual_seed(103), dtype=F64)
    assert total_variation(mode_weights(mixture, x), mixture.weights) < 0.02
    # the floor for 10000 2-D samples is ~1e-3; a sampler that collapses or blurs the
    # modes (std 0.15) by 20 % moves the distance by > 5e-3
    floor = frechet_distance(
        mixture.sample(x.shape[0], generator=torch.Generator().manual_seed(104), dtype=F64), true_x)
    assert frechet_distance(x.double(), true_x) < max(3 * floor, 5e-3)


@pytest.mark.parametrize("sde_name", [pytest.param("vp", marks=pytest.mark.slow),
                                      pytest.param("subvp", marks=pytest.mark.slow), "ve"])
def test_pc_recovers_64d_gaussian(gaussian, sde_name):
    """Reverse diffusion + Langevin (the Score SDE default), 1000 steps: Frechet distance
    within 1.5x the floor (measured 1.10x VP, 1.10x sub-VP, 1.23x VE). The default run takes
    VE, the closest to its bound; tests/test_sampler_contract.py checks the same sampler on
    every SDE at 1.5x the floor on a 16-D spread Gaussian."""
    dist, reference, floor = gaussian
    sde = pc_sde(sde_name)
    result = samplers.pc_sample(dist.score_fn(sde), sde, (N_GAUSS, 64), dtype=F64,
                                generator=torch.Generator().manual_seed(1))
    assert result.nfe == 2 * sde.N
    assert frechet_distance(result.x, reference) < 1.5 * floor


@pytest.mark.slow
@pytest.mark.parametrize("predictor", ["euler_maruyama", "ancestral_sampling"])
@pytest.mark.parametrize("sde_name", SDES)
def test_other_predictors_recover_64d_gaussian(gaussian, sde_name, predictor):
    if sde_name == "subvp" and predictor == "ancestral_sampling":
        pytest.skip("sub-VP has no discrete chain")
    dist, reference, floor = gaussian
    sde = pc_sde(sde_name)
    result = samplers.pc_sample(dist.score_fn(sde), sde, (N_GAUSS, 64), predictor=predictor,
                                dtype=F64, generator=torch.Generator().manual_seed(2))
    assert frechet_distance(result.x, reference) < 1.5 * floor


def test_ald_recovers_64d_gaussian(gaussian):
    """NCSN's settings (10 levels 5 -> 0.01, 100 steps each, step_lr 2e-5): within 3x the
    floor (measured 1.64x). ALD has a bias from its finite step size, hence the wider bound."""
    dist, reference, floor = gaussian
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0, N=10)
    result = samplers.ald_sample(dist.score_fn(sde), sde, (N_GAUSS, 64), n_steps_each=100,
                                 step_lr=2e-5, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert result.nfe == 10 * 100 + 1
    distance = frechet_distance(result.x, reference)
    assert distance < 3 * floor
    # negative control: without the final denoising step the sigma_min noise remains and
    # a 10x too small step leaves the chain unmixed; both must be visibly worse
    bad = samplers.ald_sample(dist.score_fn(sde), sde, (N_GAUSS, 64), n_steps_each=100,
                              step_lr=2e-6, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert frechet_distance(bad.x, reference) > 3 * floor


#: Known weak combination: annealed Langevin alone on sub-VP takes steps ~ std^2 while sub-VP's
#: std ~ beta_min t near t = 0, so the fine scale does not settle (Frechet 0.0072 > 0.005).
KNOWN_WEAK = {("subvp", "none", "ald")}


def mixture_case(sde_name, predictor, corrector, slow=True):
    marks = [pytest.mark.slow] if slow else []
    if (sde_name, predictor, corrector) in KNOWN_WEAK:
        marks.append(pytest.mark.xfail(strict=True, reason="corrector-only ALD on sub-VP"))
    return pytest.param(sde_name, predictor, corrector, marks=marks,
                        id=f"{sde_name}-{predictor}-{corrector}")


# The default run covers each SDE and each predictor and corrector once (about 30 s a case);
# `pytest -m slow` runs every other combination.
FAST_CASES = {("ve", "reverse_diffusion", "langevin"), ("vp", "ancestral_sampling", "langevin"),
              ("subvp", "euler_maruyama", "ald")}
MIXTURE_CASES = [
    mixture_case(sde_name, predictor, corrector, (sde_name, predictor, corrector) not in FAST_CASES)
    for sde_name in SDES
    for predictor in ("reverse_diffusion", "euler_maruyama", "ancestral_sampling", "none")
    for corrector in ("langevin", "ald", "none")
    if not (predictor == "none" and corrector == "none")
    and not (sde_name == "subvp" and predictor == "ancestral_sampling")
]


@pytest.mark.parametrize("sde_name, predictor, corrector", MIXTURE_CASES)
def test_pc_recovers_mixture_weights(sde_name, predictor, corrector):
    """Any predictor with any corrector, 1000 steps, on the 8-mode mixture (measured TV
    0.007-0.015 for the default cases, the floor for 10000 samples being ~0.008)."""
    mixture = eight_mode_mixture()
    sde = pc_sde(sde_name)
    n_steps = 5 if predictor == "none" else 1       # corrector-only sampling needs more steps
    result = samplers.pc_sample(mixture.score_fn(sde), sde, (N_MIX, 2), predictor=predictor,
                                corrector=corrector, n_steps=n_steps, dtype=F64,
                                generator=torch.Generator().manual_seed(4))
    expected_nfe = sde.N * ((predictor != "none") + (corrector != "none") * n_steps)
    assert result.nfe == expected_nfe
    check_mixture(mixture, result.x)


def test_ald_recovers_mixture_weights():
    """Mode weights need slow annealing (Song & Ermon 2020): with 100 levels x 10 steps the TV
    is 0.015; with NCSN's 10 levels x 100 steps it is 0.026, above the 0.02 bound."""
    mixture = eight_mode_mixture()
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0, N=100)
    result = samplers.ald_sample(mixture.score_fn(sde), sde, (N_MIX, 2), n_steps_each=10,
                                 step_lr=2e-5, dtype=F64, generator=torch.Generator().manual_seed(5))
    check_mixture(mixture, result.x)


def _ancestral_step(sde, level: int, x, score, noise):
    """One ancestral step from chain level ``level`` as pc_sample takes it: x0_hat by Tweedie
    with the chain's (alpha_i, std_i), then the posterior mean and noise of
    ``ancestral_coefficients``."""
    alpha, std, c_0, c_x, noise_std = (v.item() for v in
                                       ancestral_coefficients(sde, torch.tensor([level])))
    x_mean = Schedule.tweedie(x, score, alpha, std) * c_0 + x * c_x
    return x_mean + noise * noise_std, x_mean


def test_ancestral_step_is_ddpm_algorithm_2():
    """VP ancestral mean = (x + beta_i s) / sqrt(1 - beta_i) (Ho et al. 2020, Alg. 2 with
    eps = -std s); variance = DDPM's posterior beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)."""
    sde = sde_lib.VPSDE(N=100)
    x, score = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for i in (0, 1, 37, 99):
        x1, x_mean = _ancestral_step(sde, i, x, score, noise)
        beta = sde.discrete_betas[i].item()
        torch.testing.assert_close(x_mean, (x + beta * score) / math.sqrt(1 - beta))
        abar, abar_prev = sde.alphas_cumprod[i].item(), (sde.alphas_cumprod[i - 1].item() if i else 1.0)
        posterior_var = beta * (1 - abar_prev) / (1 - abar)
        torch.testing.assert_close(x1, x_mean + math.sqrt(posterior_var) * noise)
        assert (i == 0) == torch.equal(x1, x_mean)          # level 0 adds no noise


def test_ancestral_step_is_smld_for_ve():
    """VE: x_mean = x + (sigma_i^2 - sigma_{i-1}^2) s, noise std^2 = sigma_{i-1}^2 (sigma_i^2 -
    sigma_{i-1}^2) / sigma_i^2 (Song et al. 2021, eq. 47)."""
    sde = sde_lib.VESDE(N=20)
    x, score = torch.randn(2, 5, dtype=F64), torch.randn(2, 5, dtype=F64)
    noise = torch.randn(2, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    x1, x_mean = _ancestral_step(sde, 7, x, score, noise)
    s, s_prev = sde.discrete_sigmas[7].item(), sde.discrete_sigmas[6].item()
    torch.testing.assert_close(x_mean, x + (s ** 2 - s_prev ** 2) * score)
    torch.testing.assert_close(x1, x_mean + math.sqrt(s_prev ** 2 * (s ** 2 - s_prev ** 2) / s ** 2) * noise)


def test_pc_ancestral_step_matches_the_formula():
    """pc_sample with predictor='ancestral_sampling' and no corrector takes exactly the
    ancestral step of the formula above at level N - 1 (its first step)."""
    sde = sde_lib.VPSDE(beta_max=1.0, N=2)
    x_T = torch.randn(3, 2, dtype=F64)
    score = torch.randn(3, 2, dtype=F64)
    states = []
    result = samplers.pc_sample(lambda x, t: score, sde, (3, 2), predictor="ancestral_sampling",
                                corrector="none", x_init=x_T, generator=torch.Generator().manual_seed(4),
                                callback=lambda p: states.append(p["x"]))
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    x1, _ = _ancestral_step(sde, 1, x_T, score, noise)
    torch.testing.assert_close(states[0], x1)
    assert result.nfe == 2


def test_langevin_step_factor():
    """~1 - beta_i for VP and sub-VP (Alg. 5), exactly 1 for VE (Alg. 4)."""
    vp, subvp, ve = pc_sde("vp"), pc_sde("subvp"), pc_sde("ve")
    levels = torch.tensor([1, 100, 500, 999])
    t = vp.index_time(levels)
    factor = vp.langevin_step_factor(t)
    # exp(-beta_i) vs 1 - beta_i differ by <= beta_max^2 / (2 N^2) = 2e-4, plus O(beta / N)
    # from the half-step offset between the continuous and the discrete beta
    torch.testing.assert_close(factor, 1 - vp.discrete_betas[levels], rtol=0, atol=3e-4)
    torch.testing.assert_close(subvp.langevin_step_factor(t), factor)
    assert (ve.langevin_step_factor(t) == 1).all()


def test_seeds_callback_and_dtype():
    mixture = eight_mode_mixture()
    sde = pc_sde("vp", N=50)
    seen = []
    runs = [samplers.pc_sample(mixture.score_fn(sde), sde, (16, 2), generator=torch.Generator().manual_seed(s),
                               callback=seen.append) for s in (7, 7, 8)]
    assert torch.equal(runs[0].x, runs[1].x) and not torch.equal(runs[0].x, runs[2].x)
    assert runs[0].x.dtype == torch.get_default_dtype()
    assert [c["step"] for c in seen[:50]] == list(range(50))
    # t: where the state is after the step (the next grid time; 0 after the last step)
    assert seen[0]["t"] == pytest.approx(sde.T - (sde.T - 1e-3) / 49)
    assert seen[48]["t"] == pytest.approx(1e-3) and seen[49]["t"] == 0.0
    x64 = samplers.pc_sample(mixture.score_fn(sde), sde, (4, 2), dtype=F64, progress=True).x
    assert x64.dtype == F64


def test_bad_input_is_refused():
    sde, score = pc_sde("vp", N=10), (lambda x, t: -x)
    with pytest.raises(ValueError, match="valid predictors: euler_maruyama, reverse_diffusion"):
        samplers.pc_sample(score, sde, (2, 2), predictor="ddim")
    with pytest.raises(ValueError, match="valid correctors: langevin, ald, none"):
        samplers.pc_sample(score, sde, (2, 2), corrector="hmc")
    with pytest.raises(ValueError, match="both 'none'"):
        samplers.pc_sample(score, sde, (2, 2), predictor="none", corrector="none")
    with pytest.raises(ValueError, match="ancestral_sampling' needs a discrete chain"):
        samplers.pc_sample(score, pc_sde("subvp", N=10), (2, 2), predictor="ancestral_sampling")
    with pytest.raises(ValueError, match="use pc_sample"):
        samplers.ald_sample(score, sde, (2, 2))
    with pytest.raises(ValueError, match="shape must be"):
        samplers.pc_sample(score, sde, (2,))
    with pytest.raises(ValueError, match="generator is on cpu"):
        samplers.pc_sample(score, sde, (2, 2), generator=torch.Generator(), device="meta")
    with pytest.raises(ValueError, match="score_fn returned shape"):
        samplers.pc_sample(lambda x, t: x[:, :1], sde, (2, 2))
    with pytest.raises(ValueError, match="snr must be"):
        samplers.pc_sample(score, sde, (2, 2), snr=-1.0)


def test_non_finite_values_stop_sampling_at_the_step_they_appear():
    sde = pc_sde("ve", N=100)

    def breaks_below_half(x, t):
        return torch.where(t[:, None] < 0.5, torch.full_like(x, float("nan")), -x)
    with pytest.raises(FloatingPointError, match=r"at step 50 \(t=0\.485"):
        samplers.pc_sample(breaks_below_half, sde, (3, 2), corrector="none")
    with pytest.raises(FloatingPointError, match="at step 0"):
        samplers.ald_sample(lambda x, t: x * float("inf"), pc_sde("ve", N=10), (3, 2), n_steps_each=2)
