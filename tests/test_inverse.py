"""Inverse problems (samplers/inverse.py, samplers/operators.py) against exact answers.

For Gaussian data the posterior p(x_unknown | x_known) is Gaussian in closed form; for a
Gaussian mixture the posterior mode weights given a partial observation are
w_j N(y; mu_j,known, Sigma_j,known) normalised. Samples are compared with them by the
Fréchet distance (next to the floor: the distance between two exact sample sets of the same
size) and by the total variation of the mode weights.

Measured (exact scores; seeds fixed):
* 8-mode mixture, the first coordinate observed at 1.3 (posterior weights 0.2 / 0.8 on two
  modes): replacement (PC, 1000 steps) TV 0.09-0.11 (biased: it favours the prior's mode
  balance); SMC (16 particles, 200 steps) TV 0.0085 at 2000 samples.
* 64-D spread Gaussian (stds 0.3 ... 1.5 along a random rotation), first 32 coordinates
  observed: replacement FD ~3.1 vs floor 0.12 (25x, a mean error of 1.7); SMC 64 particles,
  200 steps, 300 samples: FD 0.72 / 0.81 / 0.79 (VP / VE / sub-VP) vs floor 0.75.
"""
from __future__ import annotations

import math

import pytest
import torch

import samplers
import sde_lib
from samplers.operators import Colorization, Inpainting, SuperResolution
from sde_lib import GaussianMixture
from sde_lib.mixtures import eight_mode_mixture
from testbed import frechet_distance, spread_gaussian

F64 = torch.float64
SDE_MAKERS = {"vp": lambda: sde_lib.VPSDE(), "subvp": lambda: sde_lib.subVPSDE(),
              "ve": lambda: sde_lib.VESDE(sigma_max=20.0)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def fd_and_floor(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, seeds=4):
    """(FD of the samples x (n, d) to an exact sample set of N(mean, cov), the floor: the FD
    between two exact sets of n), each averaged over ``seeds`` pairs of exact sets."""
    chol = torch.linalg.cholesky(cov)

    def exact(seed):
        return mean + torch.randn(x.shape, generator=gen(seed), dtype=F64) @ chol.T

    fds = [frechet_distance(x.double(), exact(100 + s)) for s in range(seeds)]
    floors = [frechet_distance(exact(200 + s), exact(100 + s)) for s in range(seeds)]
    return sum(fds) / seeds, sum(floors) / seeds


# ----- operators ------------------------------------------------------------------------------
OPERATORS = {
    "inpainting": (lambda: Inpainting(torch.rand(1, 3, 4, 4, generator=gen(0)) > 0.5), (2, 3, 4, 4)),
    "colorization": (Colorization, (2, 3, 4, 4)),
    "super_resolution": (lambda: SuperResolution(2), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_is_a_scaled_mask_in_an_orthonormal_basis(name):
    """U is orthogonal (round trip, norms kept), and y = A x is c times the known basis
    coordinates, which embed(y) gives back."""
    make, shape = OPERATORS[name]
    op = make()
    x = torch.randn(shape, generator=gen(1), dtype=F64)
    basis = op.to_basis(x)
    assert torch.allclose(op.from_basis(basis), x, atol=1e-12)
    assert torch.allclose(basis.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), atol=1e-12)
    known = op.known(basis).expand_as(basis)
    embedded = op.embed(op.observe(x))
    assert torch.allclose(embedded[known], basis[known], atol=1e-12)
    assert (embedded[~known] == 0).all()


def test_operator_observations():
    x = torch.randn(2, 3, 4, 4, generator=gen(2), dtype=F64)
    assert torch.allclose(Colorization().observe(x), x.mean(1, keepdim=True))
    assert torch.allclose(SuperResolution(2).observe(x), torch.nn.functional.avg_pool2d(x, 2))
    gray_basis = Colorization().to_basis(x)[:, :1]
    assert torch.allclose(gray_basis, math.sqrt(3.0) * x.mean(1, keepdim=True), atol=1e-12)


# ----- replacement keeps the known part, in every sampler -------------------------------------
SAMPLER_CASES = {
    "pc": dict(corrector="none"), "ald": dict(n_steps_each=2), "ode": dict(sampler_options=dict(method="euler", num_steps=20)),
    "ddim": dict(num_steps=10), "dpm_solver": dict(num_steps=10), "edm": dict(num_steps=8),
    "dpm_adaptive": dict(rtol=0.1),
}


@pytest.mark.parametrize("sampler", SAMPLER_CASES)
def test_replacement_keeps_the_known_part_in_every_sampler(sampler):
    """The known coordinates of the result are the observation bit for bit; the unknown
    ones are finite and moved; the NFE is the sampler's own."""
    sde = sde_lib.VESDE(sigma_max=5.0, N=20) if sampler == "ald" else sde_lib.VPSDE(N=50)
    dist = GaussianMixture.gaussian(torch.zeros(8, dtype=F64), torch.eye(8, dtype=F64) * 0.5)
    known = torch.randn(16, 8, generator=gen(3), dtype=F64)
    mask = (torch.arange(8) < 5)[None]
    result = samplers.inpaint(dist.score_fn(sde), sde, known, mask, sampler=sampler,
                              generator=gen(4), **SAMPLER_CASES[sampler])
    assert torch.equal(result.x[:, :5], known[:, :5])
    assert torch.isfinite(result.x).all() and not torch.equal(result.x[:, 5:], known[:, 5:])
    assert result.nfe > 0


@pytest.mark.parametrize("name", ["colorization", "super_resolution"])
def test_replacement_solves_colorization_and_super_resolution(name):
    """A x = y exactly for the other operators, through the same replacement."""
    make, shape = OPERATORS[name]
    op = make()
    sde = sde_lib.VPSDE(N=30)
    dist = GaussianMixture.gaussian(torch.zeros(48, dtype=F64), torch.eye(48, dtype=F64),
                                    event_shape=shape[1:])
    x_true = torch.randn(shape, generator=gen(5), dtype=F64)
    y = op.observe(x_true)
    result = samplers.solve_inverse_problem(dist.score_fn(sde), sde, op, y, shape,
                                            sampler="ddim", num_steps=10, generator=gen(6))
    assert torch.allclose(op.observe(result.x), y, atol=1e-12)
    assert not torch.allclose(result.x, x_true)


def test_replacement_is_exact_for_independent_coordinates():
    """With a diagonal covariance the unknown part is independent of the known one, and
    replacement samples p(x_u) exactly (here up to the sampler's error): FD to the exact
    marginal within 1.5x the floor of two exact sets (2000 samples, 8-D)."""
    sde = sde_lib.VPSDE()
    stds = torch.linspace(0.2, 1.5, 8, dtype=F64)
    dist = GaussianMixture.gaussian(torch.linspace(-1, 1, 8, dtype=F64), torch.diag(stds ** 2))
    known = dist.sample(2000, generator=gen(7))
    mask = (torch.arange(8) < 4)[None]
    result = samplers.inpaint(dist.score_fn(sde), sde, known, mask, sampler="dpm_solver",
                              num_steps=30, generator=gen(8))
    fd, floor = fd_and_floor(result.x[:, 4:], dist.means[0, 4:], dist.covs[0, 4:, 4:])
    assert fd < 1.5 * floor, (fd, floor)


# ----- exactness against the closed-form Gaussian posterior ------------------------------------
def gaussian_posterior(dist: GaussianMixture, y: torch.Tensor, k: int):
    """Mean and covariance of x[k:] given x[:k] = y for one Gaussian."""
    mu, cov = dist.means[0], dist.covs[0]
    gain = torch.linalg.solve(cov[:k, :k], cov[:k, k:]).T
    return mu[k:] + gain @ (y - mu[:k]), cov[k:, k:] - gain @ cov[:k, k:]


def posterior_fd(sde_name, method, *, dim, n, std_min=0.3, **options):
    """(FD of the method's samples to the exact posterior, floor) for a spread Gaussian in
    ``dim`` dimensions with the first half observed."""
    sde = SDE_MAKERS[sde_name]()
    dist = spread_gaussian(dim, std_min=std_min)
    k = dim // 2
    x_true = dist.sample(1, generator=gen(0))[0]
    mean, cov = gaussian_posterior(dist, x_true[:k], k)
    mask = (torch.arange(dim) < k)[None]
    result = samplers.inpaint(dist.score_fn(sde), sde, x_true.expand(n, dim).clone(), mask,
                              method=method, generator=gen(3), dtype=F64, **options)
    assert torch.equal(result.x[:, :k], x_true.expand(n, dim)[:, :k])
    return fd_and_floor(result.x[:, k:], mean, cov)


def test_smc_matches_the_gaussian_posterior_16d():
    """16-D spread Gaussian, 8 coordinates observed, 500 samples: SMC (32 particles, 300
    steps) within 1.5x the floor (measured 1.31x; 32 particles at 100 / 200 steps: 2.45x /
    1.36x, 16 particles at 200 / 400 steps: 1.54x / 1.65x, 64 at 200: 1.45x: the
    discretisation of the reverse kernel and the particle count both matter); replacement
    (100 DDIM eta=1 steps) is biased: 22x the floor."""
    fd, floor = posterior_fd("vp", "smc", dim=16, n=500, particles=32, num_steps=300)
    assert fd < 1.5 * floor, (fd, floor)
    fd_replace, _ = posterior_fd("vp", "replace", dim=16, n=500, sampler="ddim", num_steps=100,
                                 eta=1.0)
    assert fd_replace > 3 * floor, (fd_replace, floor)


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", SDE_MAKERS)
def test_smc_matches_the_gaussian_posterior_64d(sde_name):
    """The issue's target: 64-D strongly correlated Gaussian (stds 0.3 ... 1.5 along a
    random rotation), 32 coordinates observed, <= 2000 NFE: SMC (64 particles, 200 steps,
    201 NFE, 300 samples) within 1.5x the floor for VP, sub-VP and VE (measured 0.96 / 1.05 /
    1.08x with a single-pair floor). At 1000 samples (64 particles, 300 steps) the floor is
    smaller and the measured ratios are 1.45 / 1.66 / 1.56 (VP / sub-VP / VE): the target
    holds there for VP only; more particles and steps are needed for the others."""
    fd, floor = posterior_fd(sde_name, "smc", dim=64, n=300, particles=64, num_steps=200)
    assert fd < 1.5 * floor, (fd, floor)


def basis_matrix(op, event_shape) -> torch.Tensor:
    """U (D, D) of an operator: row i is basis coordinate i of x (flattened basis layout)."""
    dim = math.prod(event_shape)
    eye = torch.eye(dim, dtype=F64).reshape(dim, *event_shape)
    return op.to_basis(eye).reshape(dim, dim).T


@pytest.mark.slow
@pytest.mark.parametrize("name", ["colorization", "super_resolution"])
def test_smc_matches_the_gaussian_posterior_of_every_operator(name):
    """Colorization and 2x super-resolution of 12-D Gaussian images (3, 2, 2) (spread
    covariance, stds 0.3 ... 1.5): in basis coordinates x~ = U x ~ N(U mu, U Sigma U^T) and the
    known ones are c^-1 y, so the posterior of the unknown ones is a Gaussian conditional.
    SMC (32 particles, 300 steps, 500 samples) within 1.5x the floor (measured 1.05x
    colorization, 1.02x super-resolution); A x = y exactly."""
    op = Colorization() if name == "colorization" else SuperResolution(2)
    shape = (3, 2, 2)
    dist = spread_gaussian(12, std_min=0.3, event_shape=shape)
    sde = sde_lib.VPSDE()
    u = basis_matrix(op, shape)
    x_true = dist.sample(1, generator=gen(20), dtype=F64)
    y = op.observe(x_true)
    known = op.known(op.to_basis(x_true)).expand_as(op.to_basis(x_true)).reshape(-1)
    mean, cov = u @ dist.means[0], u @ dist.covs[0] @ u.T
    observed = (u @ x_true.reshape(-1))[known]
    gain = torch.linalg.solve(cov[known][:, known], cov[known][:, ~known]).T
    post_mean = mean[~known] + gain @ (observed - mean[known])
    post_cov = cov[~known][:, ~known] - gain @ cov[known][:, ~known]
    n = 500
    result = samplers.solve_inverse_problem(dist.score_fn(sde), sde, op, y.expand(n, *y.shape[1:]),
                                            (n, *shape), method="smc", particles=32,
                                            num_steps=300, generator=gen(21))
    assert torch.allclose(op.observe(result.x), y.expand_as(op.observe(result.x)), atol=1e-12)
    unknown = (result.x.reshape(n, -1) @ u.T)[:, ~known]
    fd, floor = fd_and_floor(unknown, post_mean, post_cov)
    assert fd < 1.5 * floor, (fd, floor)


# ----- exactness on a Gaussian mixture: posterior mode weights --------------------------------
def posterior_mode_weights(mixture: GaussianMixture, first: float) -> torch.Tensor:
    """p(mode j | x_0 = first) = w_j N(first; mu_j0, Sigma_j00) normalised."""
    var = mixture.covs[:, 0, 0]
    log_p = torch.log(mixture.weights) - 0.5 * (first - mixture.means[:, 0]) ** 2 / var \
        - 0.5 * torch.log(var)
    return torch.softmax(log_p, dim=0)


def mode_weight_tv(method, n, sde=None, **options):
    """TV between the modes of samples given x_0 = 1.3 of the 8-mode mixture and the
    posterior mode weights (0.2 / 0.8 on the modes at 45 and 315 degrees)."""
    mixture = eight_mode_mixture()
    sde = sde or sde_lib.VPSDE()
    known = torch.zeros(n, 2, dtype=F64)
    known[:, 0] = 1.3
    result = samplers.inpaint(mixture.score_fn(sde), sde, known, torch.tensor([[True, False]]),
                              method=method, generator=gen(11), dtype=F64, **options)
    nearest = torch.cdist(result.x, mixture.means).argmin(dim=1)
    found = torch.bincount(nearest, minlength=8).double() / n
    return 0.5 * (found - posterior_mode_weights(mixture, 1.3)).abs().sum().item()


def test_smc_recovers_the_posterior_mode_weights():
    """SMC (8 particles, 100 steps, 4000 samples): TV <= 0.02 (the sampling noise of a
    0.2 / 0.8 split is 0.006); replacement (DDIM eta=1, 100 steps) is biased: TV > 0.05."""
    assert mode_weight_tv("smc", 4000, particles=8, num_steps=100) <= 0.02
    assert mode_weight_tv("replace", 4000, sampler="ddim", num_steps=100, eta=1.0) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", SDE_MAKERS)
def test_smc_recovers_the_posterior_mode_weights_every_sde(sde_name):
    """Every SDE (VE with sigma_max 5 for the 2-D data): SMC 16 particles, 200 steps,
    TV <= 0.02 at 4000 samples."""
    sde = sde_lib.VESDE(sigma_max=5.0) if sde_name == "ve" else SDE_MAKERS[sde_name]()
    assert mode_weight_tv("smc", 4000, sde=sde, particles=16, num_steps=200) <= 0.02


# ----- the gradient method ---------------------------------------------------------------------
def test_pigdm_moves_towards_the_noisy_posterior():
    """PiGDM with observation noise 0.1 on an 8-D Gaussian: its samples are much closer to
    the exact posterior of the noisy observation than unconditional samples are (the
    method is approximate: FD is reported, not bounded by the floor)."""
    sde = sde_lib.VPSDE()
    dist = spread_gaussian(8, std_min=0.3)
    x_true = dist.sample(1, generator=gen(12))[0]
    noise_std = 0.1
    y = x_true[:4] + noise_std * torch.randn(4, generator=gen(13), dtype=F64)
    mu, cov = dist.means[0], dist.covs[0]
    h = torch.eye(8, dtype=F64)[:4]
    gain = cov @ h.T @ torch.linalg.inv(h @ cov @ h.T + noise_std ** 2 * torch.eye(4, dtype=F64))
    post_mean, post_cov = mu + gain @ (y - h @ mu), cov - gain @ h @ cov
    n = 1000
    exact = post_mean + torch.randn(n, 8, generator=gen(14), dtype=F64) @ torch.linalg.cholesky(post_cov).T
    known = torch.zeros(n, 8, dtype=F64)
    known[:, :4] = y
    op = Inpainting((torch.arange(8) < 4)[None])
    result = samplers.solve_inverse_problem(dist.score_fn(sde), sde, op, op.observe(known), (n, 8),
                                            method="pigdm", sampler="dpm_solver", num_steps=50,
                                            noise_std=noise_std, generator=gen(15))
    prior = dist.sample(n, generator=gen(16))
    fd_pigdm, fd_prior = frechet_distance(result.x, exact), frechet_distance(prior, exact)
    assert fd_pigdm < 0.25 * fd_prior, (fd_pigdm, fd_prior)


# ----- bad input -------------------------------------------------------------------------------
def test_bad_input_errors():
    sde = sde_lib.VPSDE(N=10)
    dist = GaussianMixture.gaussian(torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64))
    known = torch.zeros(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="does not broadcast to the data's shape"):
        samplers.inpaint(dist.score_fn(sde), sde, known, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        samplers.inpaint(dist.score_fn(sde), sde, known, torch.full((1, 4), 0.5))
    with pytest.raises(ValueError, match="use method='pigdm'"):
        samplers.solve_inverse_problem(dist.score_fn(sde), sde, Inpainting(torch.ones(1, 4)),
                                       known, (3, 4), noise_std=0.1)
    with pytest.raises(ValueError, match="leave sampler at 'pc'"):
        samplers.inpaint(dist.score_fn(sde), sde, known, torch.ones(1, 4), method="smc",
                         sampler="ddim")
    with pytest.raises(ValueError, match="unknown method"):
        samplers.inpaint(dist.score_fn(sde), sde, known, torch.ones(1, 4), method="magic")
    with pytest.raises(ValueError, match="unknown option"):
        samplers.inpaint(dist.score_fn(sde), sde, known, torch.ones(1, 4), sampler="ddim",
                         snr=0.1)
    with pytest.raises(ValueError, match="1-channel data is already gray"):
        samplers.solve_inverse_problem(dist.score_fn(sde), sde, Colorization(),
                                       torch.zeros(2, 1, 4, 4), (2, 1, 4, 4))
    with pytest.raises(ValueError, match="divisible by 3"):
        samplers.solve_inverse_problem(dist.score_fn(sde), sde, SuperResolution(3),
                                       torch.zeros(1, 1, 1, 1), (1, 1, 4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        samplers.inpaint(dist.score_fn(sde), sde, torch.full((3, 4), math.nan), torch.ones(1, 4))


def test_smc_takes_one_mask_per_image():
    """A mask (B, ...) with a different known set per image: each result keeps its own
    known coordinates exactly."""
    sde = sde_lib.VPSDE()
    dist = GaussianMixture.gaussian(torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64) * 0.5 + 0.5)
    known = torch.randn(3, 4, generator=gen(30), dtype=F64)
    mask = torch.rand(3, 4, generator=gen(31)) > 0.5
    result = samplers.inpaint(dist.score_fn(sde), sde, known, mask, method="smc", particles=4,
                              num_steps=20, generator=gen(32))
    assert torch.equal(result.x[mask], known[mask])
    assert not torch.equal(result.x[~mask], known[~mask])


def test_pigdm_runs_on_colorization_and_super_resolution():
    """The gradient method in basis coordinates of the other operators: one guided score
    equals the plain score plus the gradient of the isotropic Gaussian log-likelihood of the
    known basis coordinates (computed here by hand with autograd)."""
    sde = sde_lib.VPSDE()
    for op in (Colorization(), SuperResolution(2)):
        dist = spread_gaussian(12, std_min=0.3, event_shape=(3, 2, 2))
        x = torch.randn(2, 3, 2, 2, generator=gen(40), dtype=F64)
        y = op.observe(torch.randn(2, 3, 2, 2, generator=gen(41), dtype=F64))
        t = torch.full((2,), 0.5, dtype=F64)
        guided = samplers.pigdm_score(dist.score_fn(sde), sde, op, y, noise_std=0.1)(x, t)
        alpha, std = (float(v[0]) for v in sde.marginal_coeffs(t))
        x_in = x.clone().requires_grad_(True)
        x0 = (x_in + std ** 2 * dist.score_fn(sde)(x_in, t)) / alpha
        basis = op.to_basis(x0)
        known = op.known(basis).expand_as(basis)
        variance = std ** 2 / (alpha ** 2 + std ** 2) + (0.1 / op.scale) ** 2
        log_likelihood = -0.5 * ((op.embed(y) - basis)[known] ** 2).sum() / variance
        (grad,) = torch.autograd.grad(log_likelihood, x_in)
        assert torch.allclose(guided, dist.score_fn(sde)(x, t) + grad, atol=1e-10)
