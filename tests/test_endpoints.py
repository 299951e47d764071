"""Noise-level end points of the few-step samplers (``sigma_min``; issue 14, item 1).

With ``sigma_min`` the grid ends where sigma(t) = std / alpha = sigma_min, the same noise
level for every SDE, instead of at t = eps (sigma(1e-3) = 0.0105 on VP, 1.1e-4 on sub-VP,
0.0101 on VE(0.01, .)). The default, ``fast.SIGMA_MIN`` = 0.02, was chosen by
bench/endpoints.py (README "Few-step samplers: where the grids end").
"""
from __future__ import annotations

import math

import pytest
import torch

import samplers
import sde_lib
from samplers.fast import SIGMA_MIN, SPACINGS, timesteps
from samplers.harness import Schedule
from testbed import SDES, eight_mode_mixture, frechet_distance, reference_and_floor

F64 = torch.float64
#: The few-step samplers with a precomputed grid, and the adaptive one.
GRID_SAMPLERS = ("ddim", "dpm_solver", "edm", "unipc", "ipndm")
ALL_FEW_STEP = GRID_SAMPLERS + ("dpm_adaptive",)


def sigma_of(sde, t) -> torch.Tensor:
    alpha, std = sde.marginal_coeffs(torch.as_tensor(t, dtype=F64))
    return std / alpha


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sde_name", SDES)
def test_grid_ends_at_sigma_min(sde_name, spacing):
    sde = SDES[sde_name]()
    for sigma_min in (0.02, 0.3):
        t = timesteps(sde, 9, spacing=spacing, sigma_min=sigma_min)
        assert t.shape == (10,) and t[0].item() == sde.T and (t[1:] < t[:-1]).all()
        torch.testing.assert_close(sigma_of(sde, t[-1]), torch.tensor(sigma_min, dtype=F64),
                                   rtol=1e-9, atol=0)
    # None: the old end point, t = eps
    assert timesteps(sde, 9, spacing=spacing, sigma_min=None, eps=2e-3)[-1].item() == 2e-3


def test_default_is_the_measured_noise_level():
    assert SIGMA_MIN == 0.02
    for name in GRID_SAMPLERS:
        assert samplers.SAMPLERS[name].defaults["sigma_min"] == SIGMA_MIN, name
    # the adaptive solver controls its own error: it keeps the time end point by default
    assert samplers.SAMPLERS["dpm_adaptive"].defaults["sigma_min"] is None


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("name", ALL_FEW_STEP)
def test_last_grid_point_and_nfe(name, sde_name):
    """The state before the final denoising step sits at sigma = sigma_min (the callback's
    sigma), and the NFE count is that of the eps grid."""
    sde = SDES[sde_name]()
    score = sde_lib.GaussianMixture.gaussian(torch.zeros(2, dtype=F64),
                                             0.3 * torch.eye(2, dtype=F64)).score_fn(sde)
    options = {"ddim": {"num_steps": 4}, "dpm_solver": {"num_steps": 4},
               "edm": {"num_steps": 4}, "unipc": {"num_steps": 4}, "ipndm": {"num_steps": 4},
               "dpm_adaptive": {"rtol": 0.2}}[name]
    nfes = {}
    for sigma_min in (0.05, None):
        seen = []
        result = samplers.SAMPLERS[name](score, sde, (8, 2), sigma_min=sigma_min,
                                         generator=torch.Generator().manual_seed(0),
                                         callback=lambda p: seen.append(p["sigma"]), **options)
        assert seen[-1] == 0.0                       # after the final denoising step
        if sigma_min is not None:
            assert math.isclose(seen[-2], sigma_min, rel_tol=1e-9), seen
        nfes[sigma_min] = result.nfe
    if name != "dpm_adaptive":
        assert nfes[0.05] == nfes[None]


@pytest.mark.parametrize("sde_name", SDES)
def test_final_denoise_is_tweedie_at_the_end_point(sde_name):
    sde = SDES[sde_name]()
    dist = sde_lib.GaussianMixture.gaussian(torch.tensor([0.3, -0.2], dtype=F64),
                                            torch.diag(torch.tensor([0.2, 0.05], dtype=F64)))
    x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(num_steps=5, sigma_min=0.07, x_init=x_T)
    x = samplers.ddim_sample(dist.score_fn(sde), sde, x_T.shape, denoise=False, **kw).x
    x0 = samplers.ddim_sample(dist.score_fn(sde), sde, x_T.shape, denoise=True, **kw).x
    point = Schedule(sde, dist.score_fn(sde)).at_sigma(0.07)
    torch.testing.assert_close(x0, Schedule(sde, dist.score_fn(sde)).denoise(x, point),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL_FEW_STEP)
def test_bad_sigma_min_is_refused_naming_the_option(name):
    sampler = samplers.SAMPLERS[name]
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    cases = [(sde_lib.VPSDE(), v) for v in (0.0, -0.1, math.nan, math.inf, True, "0.1", 1e4)]
    cases += [(sde_lib.VESDE(0.01, 20.0), v) for v in (0.005, 0.01, 20.0)]   # VE: sigma(0) = 0.01
    for sde, value in cases:
        with pytest.raises(ValueError, match="sigma_min") as info:
            sampler(score, sde, (2, 2), sigma_min=value)
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match="sigma_min"):
            sampler.options(sde, {"sigma_min": value})
    assert not calls


@pytest.fixture(scope="module")
def thin_ring():
    """A held-out mixture (no default was tuned on it before the end-point benchmark
    measured it): 8 thin modes (std 0.06 radially, 0.24 tangentially)."""
    dist = eight_mode_mixture(seed=3, std=0.06, anisotropy=4.0)
    return (dist, *reference_and_floor(dist, 2000))


@pytest.mark.parametrize("name", ("dpm_solver", "unipc"))
def test_noise_level_end_fixes_sub_vp_at_10_nfe(thin_ring, name):
    """sub-VP's eps = 1e-3 is sigma = 1.1e-4, and a log-SNR grid spends 10 NFE there. With the
    default end sigma = 0.02 (as on VP and VE), FD / floor at 10 NFE falls from (measured)
    dpm_solver 12.1, unipc 7.2 to 0.69, 0.45 (VP with its old end, eps: 1.05, 0.51); checked:
    at most 0.5x the eps end's FD and within 2x the floor. The end point is SDE-independent:
    VP gives the same FD within 2 % (measured 0.03 %)."""
    dist, reference, floor = thin_ring
    fd = {}
    for sde_name, sigma_min in (("subvp", None), ("subvp", SIGMA_MIN), ("vp", SIGMA_MIN)):
        sde = SDES[sde_name]()
        x = samplers.SAMPLERS[name](dist.score_fn(sde), sde, (2000, 2), num_steps=9,
                                    sigma_min=sigma_min, dtype=F64,
                                    generator=torch.Generator().manual_seed(1)).x
        fd[sde_name, sigma_min] = frechet_distance(x, reference) / floor
    assert fd["subvp", SIGMA_MIN] < 0.5 * fd["subvp", None], fd
    assert fd["subvp", SIGMA_MIN] < 2.0, fd
    assert abs(fd["subvp", SIGMA_MIN] - fd["vp", SIGMA_MIN]) < 0.02 * fd["vp", SIGMA_MIN], fd
