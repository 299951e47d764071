"""Ancestral sampling on a respaced chain (samplers.respaced) on Gaussian data with the exact
chain score: K = 50 of N = 1000 levels with the optimal (analytic) reverse variance lands
closer to the data than with beta (large) or beta~ (small), measured against the floor of
two exact sample sets."""
import pytest
import torch

import sde_lib
from samplers.metrics import frechet_distance
from samplers.respaced import check_respaced_options, respaced_levels, respaced_sample
from samplers.vlb import expected_posterior_variance

MEAN = torch.tensor([0.5, -0.3, 0.0, 0.2], dtype=torch.float64)
STD = 0.5        # isotropic: the isotropic optimal variance is then the exact posterior's


def exact_chain_score(sde, eps=1e-3):
    """The score of q(x_i) at the level i whose time (samplers.vlb.level_times) is t."""
    def score_fn(x, t):
        level = torch.round((t.double() - eps) * (sde.N - 1) / (sde.T - eps)).long()
        alpha, std = sde.discrete_marginal_coeffs(level)
        alpha, std = alpha[:, None].to(x), std[:, None].to(x)
        return -(x - alpha * MEAN.to(x)) / (alpha ** 2 * STD ** 2 + std ** 2)
    return score_fn


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, len(MEAN), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(N=1000),
                                 sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0, N=1000)],
                         ids=["vp", "ve"])
def test_optimal_variance_beats_beta_and_beta_tilde_at_50_respaced_steps(sde):
    n = 4000
    floor = sum(frechet_distance(_data(n, 10 + k), _data(n, 20 + k)) for k in range(6)) / 6
    score = exact_chain_score(sde)
    x0_variance = expected_posterior_variance(score, sde, _data(2000, 1),
                                              generator=torch.Generator().manual_seed(2))
    ratios = {}
    for variance in ("small", "large", "analytic"):
        distances = []
        for seed in range(4):       # a single Frechet distance of 4000 points is noisy
            result = respaced_sample(score, sde, (n, len(MEAN)),
                                     x0_variance if variance == "analytic" else None,
                                     num_steps=50, variance=variance, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(3 + seed))
            assert result.nfe == 50
            distances.append(frechet_distance(result.x, _data(n, 30 + seed)))
        ratios[variance] = sum(distances) / len(distances) / floor
    assert ratios["analytic"] < 2.0, ratios
    assert ratios["analytic"] < 0.8 * min(ratios["small"], ratios["large"]), ratios


def test_levels_and_options():
    sde = sde_lib.VPSDE(N=1000)
    uniform = respaced_levels(sde, 50)
    assert len(uniform) == 50 and uniform[0] == 0 and uniform[-1] == 999
    logsnr = respaced_levels(sde, 50, "logsnr")
    assert logsnr[0] == 0 and logsnr[-1] == 999 and torch.all(logsnr.diff() > 0)
    # the full chain: every level, and DDPM's ancestral step
    assert torch.equal(respaced_levels(sde, 1000), torch.arange(1000))
    with pytest.raises(ValueError, match="no discrete chain"):
        check_respaced_options(sde_lib.subVPSDE())
    check_respaced_options(sde, variance="analytic")     # the registry's check: no estimate yet
    with pytest.raises(ValueError, match="posterior_x0_variance"):
        respaced_sample(lambda x, t: -x, sde, (2, 3), variance="analytic")
    with pytest.raises(ValueError, match="posterior_x0_variance has 3 entries"):
        check_respaced_options(sde, variance="analytic", posterior_x0_variance=torch.ones(3))
    with pytest.raises(ValueError, match="level_time"):
        check_respaced_options(sde, level_time="middle")
    with pytest.raises(ValueError, match="learned"):
        respaced_sample(lambda x, t: -x, sde, (2, 3), variance="learned", num_steps=3)
    with pytest.raises(ValueError, match="num_steps"):
        check_respaced_options(sde, num_steps=1001)
