"""Score wrapper conventions and the MLP score network (its training on the toy mixture
against the exact score: tests/test_toy_pipeline.py)."""
from pathlib import Path

import pytest
import torch
from ml_collections import ConfigDict

import models
import sde_lib
from run_lib import compose

ROOT = Path(__file__).resolve().parents[1]


class Recorder(torch.nn.Module):
    """A fake network: returns ``out`` and remembers what it was called with."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, x, cond, class_labels=None):
        self.calls.append((cond, class_labels))
        return self.out.to(x.dtype)


def grid_times(sde, indices):
    return sde.index_time(torch.tensor(indices)).float()


def test_vp_continuous_networks_predict_noise():
    sde, out = sde_lib.VPSDE(), torch.randn(3, 2)
    t = torch.tensor([1e-3, 0.4, 1.0])
    net = Recorder(out)
    score = models.get_score_fn(sde, net)(torch.zeros(3, 2), t)
    std = sde.marginal_prob(torch.zeros(3, 2), t)[1]
    torch.testing.assert_close(net.calls[0][0], 999.0 * t)
    torch.testing.assert_close(score, -out / std[:, None])


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.subVPSDE()], ids=["vp", "subvp"])
def test_continuous_noise_oracle_gives_zero_loss(sde):
    """With x_0 = 0, x_t = std z: a network returning x_t / std(cond / 999) predicts z exactly,
    so the DSM loss is 0 only if the wrapper and the loss agree on time scaling and std."""
    def oracle(x, cond):
        _, std = sde.marginal_coeffs(cond.double() / models.VP_TIME_SCALE)
        return x / sde_lib.append_dims(std.to(x.dtype), x.ndim)
    score_fn = models.get_score_fn(sde, oracle)
    losses = sde_lib.dsm_losses(score_fn, sde, torch.zeros(64, 3, dtype=torch.float64),
                                generator=torch.Generator().manual_seed(0))
    assert losses.abs().max() < 1e-12


def test_ddpm_wrapper_and_loss_share_the_discrete_chain():
    """Discrete VP: the network sees the step index, std = sqrt(1 - alpha_bar_i); an oracle that
    knows only that index recovers the noise exactly inside the DDPM loss."""
    sde = sde_lib.VPSDE(N=50)

    def oracle(x, cond):
        assert cond.dtype == torch.long
        abar = sde.alphas_cumprod[cond]
        return x / sde_lib.append_dims(torch.sqrt(1 - abar).to(x.dtype), x.ndim)
    score_fn = models.get_score_fn(sde, oracle, continuous=False)
    losses = sde_lib.discrete_dsm_losses(score_fn, sde, torch.zeros(256, 2, dtype=torch.float64),
                                         generator=torch.Generator().manual_seed(1))
    assert losses.abs().max() < 1e-12
    net = Recorder(torch.ones(3, 2))
    models.get_score_fn(sde, net, continuous=False)(torch.zeros(3, 2), grid_times(sde, [0, 7, 49]))
    assert net.calls[0][0].tolist() == [0, 7, 49]


def test_ncsn_labels_count_down_from_the_largest_sigma():
    """Discrete VE: label 0 is sigma_max (NCSN's order), and the SMLD loss is 0 for the oracle
    score -x / sigma_label^2 when x_0 = 0."""
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=1.0, N=10)
    net = Recorder(torch.ones(3, 2))
    models.get_score_fn(sde, net, continuous=False)(torch.zeros(3, 2), grid_times(sde, [0, 4, 9]))
    assert net.calls[0][0].tolist() == [9, 5, 0]
    sigmas_descending = sde.discrete_sigmas.flip(0)

    def oracle(x, label):
        return -x / sde_lib.append_dims(sigmas_descending[label].to(x.dtype) ** 2, x.ndim)
    score_fn = models.get_score_fn(sde, oracle, continuous=False)
    losses = sde_lib.discrete_dsm_losses(score_fn, sde, torch.zeros(256, 2, dtype=torch.float64),
                                         generator=torch.Generator().manual_seed(2))
    assert losses.abs().max() < 1e-12


@pytest.mark.parametrize("scale_by_sigma", [False, True])
def test_ve_continuous_networks_see_sigma(scale_by_sigma):
    sde, out = sde_lib.VESDE(), torch.randn(3, 1, 2, 2)
    t = torch.tensor([1e-3, 0.5, 1.0])
    net = Recorder(out)
    score = models.get_score_fn(sde, net, scale_by_sigma=scale_by_sigma)(torch.zeros(3, 1, 2, 2), t)
    sigma = sde.sigma(t).float()
    torch.testing.assert_close(net.calls[0][0], sigma)
    expected = out / sigma[:, None, None, None] if scale_by_sigma else out
    torch.testing.assert_close(score, expected)


def test_class_labels_reach_the_network():
    net = Recorder(torch.zeros(2, 2))
    labels = torch.tensor([3, 1])
    models.get_score_fn(sde_lib.VPSDE(), net)(torch.zeros(2, 2), 0.5, labels)
    assert net.calls[0][1] is labels


def test_score_sde_labels_are_fractional_with_the_std_at_the_floor():
    """discrete_labels='score_sde' is the official get_score_fn (models/utils.py): VP label
    t (N - 1) as a float and std = sqrt(1 - alphas_cumprod)[floor(t (N - 1))]; VE label
    round((T - t)(N - 1)) and its sigma. 'nearest' rounds to one level for both."""
    sde, x = sde_lib.VPSDE(N=50), torch.zeros(3, 2, dtype=torch.float64)
    t = torch.tensor([0.3, 0.52, 1.0], dtype=torch.float64)    # t * 49 = 14.7, 25.48, 49
    net = Recorder(torch.ones(3, 2))
    score = models.get_score_fn(sde, net, False, discrete_labels="score_sde")(x, t)
    torch.testing.assert_close(net.calls[0][0], t * 49)
    std = torch.sqrt(1 - sde.alphas_cumprod[[14, 25, 49]])
    torch.testing.assert_close(score, -1 / std[:, None].expand(3, 2))
    models.get_score_fn(sde, net, False)(x, t)
    assert net.calls[1][0].tolist() == [15, 25, 49]
    ve = sde_lib.VESDE(sigma_min=0.01, sigma_max=1.0, N=50)
    score = models.get_score_fn(ve, net, False, scale_by_sigma=True,
                                discrete_labels="score_sde")(x, t)
    assert net.calls[2][0].tolist() == [34, 24, 0]          # round((1 - t) 49)
    torch.testing.assert_close(score, 1 / ve.discrete_sigmas[[15, 25, 49]][:, None].expand(3, 2))


def test_wrapper_refuses_combinations_that_make_no_sense():
    net = Recorder(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="subVPSDE has no discrete chain.*continuous=True"):
        models.get_score_fn(sde_lib.subVPSDE(), net, continuous=False)
    with pytest.raises(ValueError, match="VPSDE has no discrete chain"):   # beta_max / N >= 1
        models.get_score_fn(sde_lib.VPSDE(beta_max=20.0, N=10), net, continuous=False)
    with pytest.raises(ValueError, match="discrete_labels.*nearest, score_sde"):
        models.get_score_fn(sde_lib.VPSDE(), net, continuous=False, discrete_labels="floor")
    with pytest.raises(ValueError, match="continuous must be True or False"):
        models.get_score_fn(sde_lib.VPSDE(), net, continuous="no")
    with pytest.raises(ValueError, match="scale_by_sigma applies to VE"):
        models.get_score_fn(sde_lib.VPSDE(), net, scale_by_sigma=True)
    with pytest.raises(ValueError, match="time t has shape"):
        models.get_score_fn(sde_lib.VPSDE(), net)(torch.zeros(2, 2), torch.ones(3))


def randomise_output_layer(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.out.weight.copy_(torch.randn(net.out.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("shape", [(2,), (5,), (1, 8, 8)])
@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
def test_mlp_keeps_shape_and_dtype(shape, embedding_type):
    net = models.MLPScoreNet(data_shape=shape, hidden_dim=32, num_blocks=2,
                             embedding_type=embedding_type, embedding_dim=16)
    for dtype in (torch.float32, torch.float64):
        net = net.to(dtype)
        out = net(torch.randn(4, *shape, dtype=dtype), torch.rand(4, dtype=dtype) + 0.1)
        assert out.shape == (4, *shape) and out.dtype == dtype


def test_mlp_output_depends_on_noise_level_and_class():
    net = models.MLPScoreNet(data_shape=(2,), hidden_dim=32, num_classes=3)
    randomise_output_layer(net)
    x = torch.randn(1, 2).expand(3, 2)
    by_class = net(x, torch.full((3,), 10.0), torch.tensor([0, 1, 2]))
    by_level = net(x, torch.tensor([1.0, 100.0, 900.0]), torch.zeros(3, dtype=torch.long))
    for out in (by_class, by_level):
        assert torch.cdist(out, out).triu(1).max() > 1e-3
        assert (torch.cdist(out, out) + torch.eye(3)).min() > 1e-6
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.ones(3))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        net(torch.zeros(3, 3), torch.ones(3))


def toy_config(sde_name: str, n_iters: int) -> ConfigDict:
    from configs import default_toy
    config = default_toy.get_default_configs()
    config.sde.name = sde_name
    if sde_name == "vesde":
        config.model.embedding_type = "fourier"
        config.model.scale_by_sigma = True
    config.training.n_iters = n_iters
    config.device = "cpu"
    return config


def test_build_model_by_name_and_from_config():
    """models.build_model takes a name and keywords; the config is read by run_lib.compose."""
    model = models.build_model("mlp", data_shape=(3,), hidden_dim=8, num_blocks=1)
    assert isinstance(model, models.MLPScoreNet) and model.data_shape == (3,)
    assert models.MODELS["ddpm"] is models.DDPM and models.MODELS["ncsnpp"] is models.NCSNpp
    with pytest.raises(ValueError, match="valid model names: mlp, ddpm, ncsnpp, ncsn, ncsnv2"):
        models.build_model("unet9000")
    config = toy_config("vpsde", 1)
    with pytest.raises(TypeError, match=r"run_lib\.compose\.build_model\(config\)"):
        models.build_model(config)
    model = compose.build_model(config)
    assert isinstance(model, models.MLPScoreNet) and model.data_shape == (2,)
    assert compose.data_shape(config) == (2,)
    config.model.name = "unet9000"
    with pytest.raises(ValueError, match="unet9000"):
        compose.build_model(config)


def test_center_input_feeds_the_network_2x_minus_1():
    """Data in [0, 1]: the network sees 2x - 1 (what the Score SDE networks do inside forward);
    compose.build_score_fn switches it on from config.data.centered."""
    seen = []

    def net(h, cond):
        seen.append(h.clone())
        return h * 0 + 1.0

    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
    x = torch.rand(3, 1, 2, 2)
    t = torch.full((3,), 0.5)
    plain = models.get_score_fn(sde, net)(x, t)
    centered = models.get_score_fn(sde, net, center_input=True)(x, t)
    assert torch.equal(seen[0], x) and torch.allclose(seen[1], 2 * x - 1)
    assert torch.equal(plain, centered)   # the output is used unchanged
    config = ConfigDict(dict(training=dict(continuous=True), model=dict(scale_by_sigma=False),
                             data=dict(centered=False)))
    compose.build_score_fn(config, sde, net)(x, t)
    assert torch.allclose(seen[2], 2 * x - 1)
