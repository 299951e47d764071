"""The denoising score matching losses, checked against exact scores.

Statistical checks compare paired or independent Monte-Carlo estimates with their standard
errors (SE = sample std / sqrt(n)); a threshold of 4 SE has a false-alarm probability of
~6e-5 for a Gaussian statistic, and every random draw is seeded so the suite is
deterministic. Each check also has a negative control showing that it can fail.
"""
import math

import pytest
import torch

import sde_lib
from run_lib import compose

N_SAMPLES = 20000
Z_MAX = 4.0

SDES = {
    "vp": lambda: sde_lib.VPSDE(),
    "subvp": lambda: sde_lib.subVPSDE(),
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0),
}
WEIGHTINGS = {
    "std2": dict(),
    "likelihood": dict(likelihood_weighting=True),
    "likelihood_is": dict(likelihood_weighting=True, importance_sampling=True),
}


@pytest.fixture(scope="module")
def mixture():
    return sde_lib.eight_mode_mixture()


@pytest.fixture(scope="module")
def data(mixture):
    return mixture.sample(N_SAMPLES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def mean_and_se(values: torch.Tensor):
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def losses_with(score_fn, sde, x, seed, **options):
    return sde_lib.dsm_losses(score_fn, sde, x, generator=torch.Generator().manual_seed(seed),
                              **options)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("sde_name", SDES)
def test_exact_score_minimises_dsm_loss(mixture, data, sde_name, weighting):
    """Paired draws: L(s* + delta) - L(s*) = E[lambda ||delta||^2] + a zero-mean term > 0."""
    sde = SDES[sde_name]()
    exact = mixture.score_fn(sde)
    options = WEIGHTINGS[weighting]
    base = losses_with(exact, sde, data, 1, **options)
    for perturbed in (lambda x, t: 1.1 * exact(x, t), lambda x, t: exact(x, t) + 0.3):
        diff = losses_with(perturbed, sde, data, 1, **options) - base
        mean, se = mean_and_se(diff)
        assert mean > Z_MAX * se, (mean, se)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("sde_name", SDES)
def test_gradient_wrt_score_scale_vanishes_at_exact_score(mixture, data, sde_name, weighting):
    """d/dc E[lambda ||c s* - target||^2] at c = 1 is 2 E[lambda s* . (s* - target)] = 0,
    because E[target | x_t] = s*(x_t). A score of the wrong noise level must fail this."""
    sde = SDES[sde_name]()
    options = WEIGHTINGS[weighting]

    def per_sample_gradient(score):
        scale = torch.ones(data.shape[0], dtype=data.dtype, requires_grad=True)
        losses = losses_with(lambda x, t: scale[:, None] * score(x, t), sde, data, 2, **options)
        (grad,) = torch.autograd.grad(losses.sum(), scale)
        return grad

    mean, se = mean_and_se(per_sample_gradient(mixture.score_fn(sde)))
    assert abs(mean) < Z_MAX * se, (mean, se)

    def wrong_noise_level(x, t):           # the score of p_t with a 30 % larger std
        alpha, std = sde.marginal_coeffs(t)
        return mixture.score(x, alpha, 1.3 * std)
    mean, se = mean_and_se(per_sample_gradient(wrong_noise_level))
    assert abs(mean) > Z_MAX * se, (mean, se)


def likelihood_weighted_loss_by_quadrature(sde, gaussian, shrink, eps):
    """E_t E_x [g^2 ||shrink * s* + z / std||^2 / 2] for Gaussian data, t ~ U(eps, T).

    For data N(mu, S) the score of p_t is s* = -C^{-1}(x - alpha mu), C = alpha^2 S + std^2 I,
    E||s*||^2 = tr(C^{-1}) and E[s* . z / std] = -E||s*||^2 (Tweedie), so the inner mean is
    D / std^2 - (2 shrink - shrink^2) tr(C^{-1}) in closed form; the t integral is done by quadrature
    in log t (the integrand grows like 1/t for VP and sub-VP).
    """
    from scipy import integrate
    eigvals = gaussian.eigvals[0]

    def integrand(log_t):
        t = torch.tensor(math.exp(log_t), dtype=torch.float64)
        alpha, std = sde.marginal_coeffs(t)
        g2 = sde.sde(torch.zeros(1, 1, dtype=torch.float64), t[None])[1].item() ** 2
        trace = (1.0 / (alpha ** 2 * eigvals + std ** 2)).sum().item()
        inner = eigvals.numel() / std.item() ** 2 - (2 * shrink - shrink ** 2) * trace
        return 0.5 * g2 * inner * t.item()
    value, _ = integrate.quad(integrand, math.log(eps), math.log(sde.T), limit=200, epsabs=1e-10)
    return value / (sde.T - eps)


@pytest.mark.parametrize("sde_name", ["vp", "subvp"])
def test_importance_sampling_is_unbiased_with_lower_variance(sde_name):
    """Both estimators of the likelihood-weighted loss match its value by quadrature
    (within 4 SE); importance sampling cuts the variance. Uniform sampling of t has a heavy
    1/t tail, so it is checked at eps = 1e-3 where its SE is trustworthy."""
    sde = SDES[sde_name]()
    gaussian = sde_lib.GaussianMixture.gaussian([0.5, -0.3], [[0.3, 0.1], [0.1, 0.05]])
    data = gaussian.sample(N_SAMPLES, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64)
    exact = gaussian.score_fn(sde)

    def shrunk(x, t):
        return 0.8 * exact(x, t)
    for eps, estimators in ((1e-3, (False, True)), (1e-5, (True,))):
        expected = likelihood_weighted_loss_by_quadrature(sde, gaussian, 0.8, eps)
        variances = []
        for importance_sampling in estimators:
            losses = losses_with(shrunk, sde, data, 4, eps=eps, likelihood_weighting=True,
                                 importance_sampling=importance_sampling)
            mean, se = mean_and_se(losses)
            assert abs(mean - expected) < Z_MAX * se, (eps, importance_sampling, mean, se, expected)
            variances.append(losses.var().item())
        if len(variances) == 2:
            assert variances[1] < 0.2 * variances[0], variances
    # negative control: the importance-sampled losses without their weight are biased
    _, weight = sde_lib.sample_time(sde, 1, eps=1e-5, importance_sampling=True)
    mean, se = mean_and_se(losses / weight)
    assert abs(mean - expected) > Z_MAX * se


def test_importance_sampling_is_exact_for_ve(mixture, data):
    """For VE, g^2/std^2 = 2 log(sigma_max/sigma_min) is constant: importance sampling is
    uniform in t and the two estimators agree draw by draw."""
    sde = SDES["ve"]()
    exact = mixture.score_fn(sde)
    plain = losses_with(exact, sde, data, 5, likelihood_weighting=True)
    weighted = losses_with(exact, sde, data, 5, likelihood_weighting=True, importance_sampling=True)
    torch.testing.assert_close(weighted, plain, rtol=1e-9, atol=0)


@pytest.mark.parametrize("sde_name", SDES)
def test_importance_sampled_times_follow_log_snr(sde_name):
    """t ~ q(t) with CDF (lambda(eps) - lambda(t)) / (lambda(eps) - lambda(T)): a
    Kolmogorov-Smirnov distance below 1.63 / sqrt(n) (the 1 % critical value)."""
    sde, eps, n = SDES[sde_name](), 1e-5, 50000
    t, _ = sde_lib.sample_time(sde, n, eps=eps, importance_sampling=True,
                               generator=torch.Generator().manual_seed(6))
    assert t.min() >= eps and t.max() <= sde.T
    t = t.sort().values
    lam = sde.log_snr(torch.tensor([eps, sde.T], dtype=torch.float64))
    cdf = (lam[0] - sde.log_snr(t)) / (lam[0] - lam[1])
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - empirical).abs().max() < 1.63 / math.sqrt(n)
    uniform_cdf = (t - eps) / (sde.T - eps)
    if sde_name != "ve":                   # negative control: not uniform for VP / sub-VP
        assert (uniform_cdf - empirical).abs().max() > 1.63 / math.sqrt(n)


def discrete_exact_score(mixture, sde):
    """Exact score of the discrete chain's marginal after steps 0..i, i = time_index(t)."""
    def score(x, t):
        alpha, std = sde.discrete_marginal_coeffs(sde.time_index(t))
        return mixture.score(x, alpha, std)
    return score


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_discrete_losses_minimised_by_exact_score(mixture, data, sde_name):
    """DDPM (VP) and SMLD (VE) losses: lower at the exact discrete score, zero gradient in a
    scale on it, non-zero for the continuous-time score at the wrong level."""
    sde = SDES[sde_name]()
    sde = type(sde)(**{**sde._params(), "N": 100})
    exact = discrete_exact_score(mixture, sde)

    def losses(score, seed=7):
        return sde_lib.discrete_dsm_losses(score, sde, data,
                                           generator=torch.Generator().manual_seed(seed))
    mean, se = mean_and_se(losses(lambda x, t: 1.1 * exact(x, t)) - losses(exact))
    assert mean > Z_MAX * se

    scale = torch.ones(data.shape[0], dtype=data.dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(losses(lambda x, t: scale[:, None] * exact(x, t)).sum(), scale)
    mean, se = mean_and_se(grad)
    assert abs(mean) < Z_MAX * se


def test_discrete_losses_sample_every_level_uniformly(mixture):
    """The index drawn by the discrete loss covers 0..N-1 uniformly (chi-square, 10 levels)."""
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=1.0, N=10)
    seen = []

    def recorder(x, t):
        seen.append(sde.time_index(t))
        return torch.zeros_like(x)
    x = torch.zeros(20000, 2, dtype=torch.float64)
    sde_lib.discrete_dsm_losses(recorder, sde, x, generator=torch.Generator().manual_seed(8))
    counts = torch.bincount(seen[0], minlength=10).double()
    chi2 = ((counts - 2000) ** 2 / 2000).sum().item()
    assert chi2 < 27.9                      # 99.9 % quantile of chi-square with 9 dof


@pytest.mark.parametrize("reduce_mean", [True, False])
def test_reduction_over_dimensions(reduce_mean):
    """reduce_mean averages over data dims; otherwise half the sum (the papers' 1/2).
    With x_0 = 0 and a zero score the residual is the noise z = x_t / std itself."""
    sde = sde_lib.VPSDE()
    x = torch.zeros(4, 3, 5, 5, dtype=torch.float64)
    noises = []

    def zero_score(x_t, t):
        noises.append(x_t / sde_lib.append_dims(sde.marginal_prob(x_t, t)[1], x_t.ndim))
        return torch.zeros_like(x_t)
    losses = sde_lib.dsm_losses(zero_score, sde, x, reduce_mean=reduce_mean,
                                generator=torch.Generator().manual_seed(9))
    squared = noises[0].reshape(4, -1) ** 2
    expected = squared.mean(1) if reduce_mean else 0.5 * squared.sum(1)
    torch.testing.assert_close(losses, expected)


def test_class_labels_reach_the_score_function():
    sde = sde_lib.VPSDE()
    received = []

    def conditional(x, t, class_labels):
        received.append(class_labels)
        return torch.zeros_like(x)
    labels = torch.arange(6)
    for continuous in (True, False):
        loss_fn = sde_lib.get_loss_fn(sde, continuous=continuous)
        loss_fn(conditional, torch.zeros(6, 2), class_labels=labels)
        assert received[-1] is labels


def test_loss_options_that_make_no_sense_are_refused():
    vp, subvp, ve = sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE()
    with pytest.raises(ValueError, match="importance_sampling.*likelihood_weighting"):
        sde_lib.get_loss_fn(vp, importance_sampling=True)
    with pytest.raises(ValueError, match="continuous=True"):
        sde_lib.get_loss_fn(ve, continuous=False, likelihood_weighting=True)
    with pytest.raises(ValueError, match=r"subVPSDE\(.*\) lacks; use continuous=True"):
        sde_lib.get_loss_fn(subvp, continuous=False)
    with pytest.raises(ValueError, match="eps"):
        sde_lib.get_loss_fn(vp, eps=0.0)
    with pytest.raises(ValueError, match="importance_sampling.*likelihood_weighting"):
        sde_lib.dsm_losses(lambda x, t: x, vp, torch.zeros(2, 2), importance_sampling=True)


def test_build_loss_fn_reads_training_options():
    from ml_collections import ConfigDict
    config = ConfigDict({"training": {"continuous": False, "reduce_mean": True}})
    loss_fn = compose.build_loss_fn(config, sde_lib.VPSDE(N=100))
    x = torch.zeros(8, 4)
    zero = loss_fn(lambda x, t: torch.zeros_like(x), x, generator=torch.Generator().manual_seed(0))
    assert 0.3 < zero.item() < 2.0          # mean of z^2 over 32 values
    with pytest.raises(ValueError, match="has no 'training' group"):
        compose.build_loss_fn(ConfigDict({"sde": {}}), sde_lib.VPSDE())
