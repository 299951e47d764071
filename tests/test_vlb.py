"""The variational bound (samplers.vlb) against closed forms on Gaussian data.

Data x0 ~ N(m, diag(s^2)) (independent dimensions), and the exact model: the score of the
chain's marginal q(x_i) = N(alpha_i m, alpha_i^2 s^2 + std_i^2) at level i. Everything is
linear-Gaussian, so
- each term of the bound has a closed form (``closed_form_terms``);
- independently, the bound equals KL(q(x0, x_0..x_{N-1}) || p(x0, x_0..x_{N-1})) + H(q(x0))
  with both joints built as (N + 1)-dimensional Gaussians per data dimension
  (``joint_gaussians``), and the model's exact NLL is that of p's x0 marginal, so the gap
  between the bound and the NLL is known;
- the optimal reverse variance is v_i + c0_i^2 Var[x0 | x_i].
"""
import math

import pytest
import torch

import sde_lib
from samplers.pc import ancestral_coefficients
from samplers.vlb import (discretized_gaussian_log_likelihood, expected_posterior_variance,
                          reverse_variances, vlb)

M = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64)
S = torch.tensor([0.4, 1.0, 0.15], dtype=torch.float64)
N_LEVELS = 40


def sdes():
    return {"vp": sde_lib.VPSDE(N=N_LEVELS), "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0,
                                                                  N=N_LEVELS)}


def exact_chain_score(sde):
    """The score of q(x_i) at the level i of time t."""
    def score_fn(x, t):
        i = sde.time_index(t)
        alpha, std = sde.discrete_marginal_coeffs(i)
        alpha, std = alpha[:, None].to(x), std[:, None].to(x)
        var = alpha ** 2 * S.to(x) ** 2 + std ** 2
        return -(x - alpha * M.to(x)) / var
    return score_fn


def posterior_x0_variance(sde):
    """Var[x0 | x_i] (N, D) of every level."""
    alpha, std = sde.discrete_marginal_coeffs(torch.arange(sde.N))
    return S ** 2 * std[:, None] ** 2 / (alpha[:, None] ** 2 * S ** 2 + std[:, None] ** 2)


def closed_form_terms(sde, variances):
    """(prior, sum of KL terms, Gaussian decoder) in nats, summed over dimensions."""
    alpha, std, c0, _, noise_std = ancestral_coefficients(sde, torch.arange(sde.N))
    r = posterior_x0_variance(sde)
    p = sde.prior_std ** 2
    a, sd = alpha[-1], std[-1]
    prior = (0.5 * (torch.log(p / sd ** 2) + (sd ** 2 + a ** 2 * (M ** 2 + S ** 2)) / p - 1)).sum()
    v, sig = noise_std[1:, None] ** 2, variances[1:, None]
    kl = (0.5 * (torch.log(sig / v) + v / sig - 1 + c0[1:, None] ** 2 * r[1:] / sig)).sum()
    decoder = (0.5 * torch.log(2 * math.pi * variances[0]) + r[0] / (2 * variances[0])).sum()
    return prior.item(), kl.item(), decoder.item()


def _linear_gaussian(a_matrix, offsets, noise_vars):
    """z = A z + c + e, e ~ N(0, diag(noise_vars)), A strictly lower triangular in the order
    of generation: mean and covariance of z."""
    n = len(offsets)
    inverse = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - a_matrix)
    return inverse @ offsets, inverse @ torch.diag(noise_vars) @ inverse.T


def joint_gaussians(sde, variances, d):
    """(mean, cov) of q and p over (x0, x_level0, ..., x_level{N-1}) for data dimension d."""
    n = sde.N
    alpha, std, c0, cx, noise_std = ancestral_coefficients(sde, torch.arange(n))
    alpha_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha[:-1]])
    std_prev = torch.cat([torch.zeros(1, dtype=torch.float64), std[:-1]])
    a_step = alpha / alpha_prev
    b2 = std ** 2 - a_step ** 2 * std_prev ** 2
    m, s = M[d], S[d]
    # q: generated x0, level 0, ..., level N-1 (index j + 1 for level j)
    a_q = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    c_q = torch.zeros(n + 1, dtype=torch.float64)
    c_q[0] = m
    for j in range(n):
        a_q[j + 1, j] = a_step[j]
    q = _linear_gaussian(a_q, c_q, torch.cat([s.reshape(1) ** 2, b2]))
    # p: generated level N-1, ..., level 0, x0; x0_hat_j(x) = m + k_j (x - alpha_j m)
    k = alpha * s ** 2 / (alpha ** 2 * s ** 2 + std ** 2)
    order = list(range(n, -1, -1))             # positions in q's order, in p's generation order
    a_p = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    c_p = torch.zeros(n + 1, dtype=torch.float64)
    noise = torch.zeros(n + 1, dtype=torch.float64)
    noise[0] = sde.prior_std ** 2
    for g in range(1, n + 1):
        j = n - g                                 # the level x_j feeding the generated one
        coefficient = c0[j] * k[j] + cx[j]
        a_p[g, g - 1] = coefficient
        c_p[g] = c0[j] * (m - k[j] * alpha[j] * m)
        noise[g] = variances[j]
    mean_p, cov_p = _linear_gaussian(a_p, c_p, noise)
    back = torch.tensor([order.index(i) for i in range(n + 1)])   # p's order -> q's order
    return q, (mean_p[back], cov_p[back][:, back])


def _kl(mean_q, cov_q, mean_p, cov_p):
    n = len(mean_q)
    inverse_p = torch.linalg.inv(cov_p)
    d = mean_p - mean_q
    return 0.5 * (torch.trace(inverse_p @ cov_q) + d @ inverse_p @ d - n
                  + torch.logdet(cov_p) - torch.logdet(cov_q))


def bound_and_nll_from_joints(sde, variances):
    """(bound, model NLL) in nats summed over dimensions, from the joints."""
    bound = nll = 0.0
    for d in range(len(M)):
        (mq, cq), (mp, cp) = joint_gaussians(sde, variances, d)
        entropy = 0.5 * math.log(2 * math.pi * math.e * S[d].item() ** 2)
        bound += (_kl(mq, cq, mp, cp) + entropy).item()
        var_p = cp[0, 0]
        nll += (0.5 * torch.log(2 * math.pi * var_p)
                + ((M[d] - mp[0]) ** 2 + S[d] ** 2) / (2 * var_p)).item()
    return bound, nll


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("variance", ["small", "large"])
def test_closed_form_terms_agree_with_the_joint_kl(name, variance):
    """Two independent closed forms of the exact model's bound agree."""
    sde = sdes()[name]
    variances = reverse_variances(sde, variance)
    terms = sum(closed_form_terms(sde, variances))
    bound, nll = bound_and_nll_from_joints(sde, variances)
    assert terms == pytest.approx(bound, rel=1e-9, abs=1e-8)
    true_nll = (0.5 * torch.log(2 * math.pi * math.e * S ** 2)).sum().item()
    assert bound > nll > true_nll - 1e-9          # the bound is above the model's NLL


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("variance", ["small", "large", "analytic"])
def test_vlb_of_the_exact_model_equals_the_closed_form_bound(name, variance):
    sde = sdes()[name]
    g = torch.Generator().manual_seed(0)
    x0 = M + S * torch.randn(20000, 3, generator=g, dtype=torch.float64)
    optimal = posterior_x0_variance(sde).mean(1) if variance == "analytic" else None
    result = vlb(exact_chain_score(sde), sde, x0, variance=variance, decoder="gaussian",
                 posterior_x0_variance=optimal, generator=g)
    variances = reverse_variances(sde, variance, optimal)
    prior, kl, decoder = closed_form_terms(sde, variances)
    se = result.nats.std().item() / math.sqrt(len(x0))
    assert result.nats.mean().item() == pytest.approx(prior + kl + decoder, abs=4 * se)
    assert result.prior.mean().item() == pytest.approx(prior, abs=4 * result.prior.std().item()
                                                       / math.sqrt(len(x0)))
    assert result.nfe == sde.N
    bound, nll = bound_and_nll_from_joints(sde, variances)
    # the bound is above the model's exact NLL by the known gap (> 0)
    gap = bound - nll
    assert gap > 0 and result.nats.mean().item() - nll == pytest.approx(gap, abs=4 * se)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_analytic_variance_is_the_optimum_and_is_estimated_from_the_score(name):
    sde = sdes()[name]
    g = torch.Generator().manual_seed(1)
    x0 = M + S * torch.randn(4000, 3, generator=g, dtype=torch.float64)
    exact = posterior_x0_variance(sde).mean(1)
    mse = expected_posterior_variance(exact_chain_score(sde), sde, x0, generator=g)
    assert torch.allclose(mse, exact, rtol=0.05)
    # Analytic-DPM's score-norm formula: exact in expectation, noisy where std / alpha is large
    norm = expected_posterior_variance(exact_chain_score(sde), sde, x0, generator=g,
                                       estimator="score_norm")
    alpha, std = sde.discrete_marginal_coeffs(torch.arange(sde.N))
    low_noise = std / alpha < 1.0
    assert low_noise.sum() >= 5
    assert torch.allclose(norm[low_noise], exact[low_noise], rtol=0.1, atol=1e-3)
    bounds = {v: sum(closed_form_terms(sde, reverse_variances(sde, v, exact)))
              for v in ("small", "large", "analytic")}
    assert bounds["analytic"] < min(bounds["small"], bounds["large"])
    # and it is the per-level optimum: a small change of any Sigma_i raises the bound
    variances = reverse_variances(sde, "analytic", exact)
    for i in (0, sde.N // 2, sde.N - 1):
        for factor in (0.9, 1.1):
            moved = variances.clone()
            moved[i] *= factor
            assert sum(closed_form_terms(sde, moved)) > bounds["analytic"]


def test_subset_of_levels_is_unbiased():
    sde = sdes()["vp"]
    g = torch.Generator().manual_seed(2)
    x0 = M + S * torch.randn(4000, 3, generator=g, dtype=torch.float64)
    full = sum(closed_form_terms(sde, reverse_variances(sde, "small")))
    means = [vlb(exact_chain_score(sde), sde, x0, decoder="gaussian", num_levels=4,
                 generator=g).nats.mean().item() for _ in range(30)]
    spread = torch.tensor(means).std().item() / math.sqrt(len(means))
    assert sum(means) / len(means) == pytest.approx(full, abs=4 * spread + 1e-3)


def test_discretized_decoder_is_a_distribution_over_the_256_values():
    grid = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    for mean, std in ((0.1, 0.05), (-1.0, 0.3), (0.99, 1e-3), (0.0, 5.0)):
        log_p = discretized_gaussian_log_likelihood(grid, torch.tensor(mean), torch.tensor(std),
                                                    bin_width=2 / 255)
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # far in the tail the log-probability stays finite (the density times the bin width)
    far = discretized_gaussian_log_likelihood(torch.tensor(1.0 - 2 / 255), torch.tensor(-1.0),
                                              torch.tensor(1e-3), bin_width=2 / 255)
    assert torch.isfinite(far) and far < -1e5


def test_sde_without_a_chain_and_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="no discrete chain"):
        vlb(lambda x, t: -x, sde_lib.subVPSDE(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="posterior_x0_variance"):
        reverse_variances(sdes()["vp"], "analytic")
    with pytest.raises(ValueError, match="unknown reverse variance"):
        reverse_variances(sdes()["vp"], "huge")


def test_likelihood_mode_reports_the_vlb_next_to_the_ode(tmp_path):
    """--mode likelihood on a tiny digits run: likelihood.json holds the ODE bits/dim and the
    VLB's (8-bit, per term, adding up); the sub-VP SDE has no chain and no VLB entry."""
    from configs.vp.ddpm_digits import get_config
    from run_lib import evaluate
    from run_lib.train import train
    for name in ("vpsde", "subvpsde"):
        config = get_config()
        config.device = "cpu"
        config.sde.name = name
        config.model.update(nf=8, dropout=0.0)
        config.training.update(batch_size=16, n_iters=2, log_freq=1, snapshot_freq=100,
                               snapshot_freq_for_preemption=2, sample_freq=0, eval_freq=0)
        config.eval.update(likelihood_samples=6, vlb_levels=5, ode_method="euler", num_steps=4)
        workdir = tmp_path / name
        train(config, workdir, progress=False)
        result = evaluate.likelihood(config, workdir, progress=False)
        if name == "subvpsde":
            assert "vlb" not in result
            continue
        bound = result["vlb"]
        assert bound["kl_levels"] == 5 and bound["nfe"] == 6 and bound["variance"] == "small"
        assert sum(bound["terms_bits_per_dim"].values()) == pytest.approx(bound["bits_per_dim"])
        assert bound["bits_per_dim"] > 0 and math.isfinite(bound["bits_per_dim"])
