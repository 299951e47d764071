"""Noise-conditional classifiers (models/classifier.py), their loss (sde_lib.losses) and the
train_classifier mode (run_lib/classifier.py); class-conditional / classifier-free guidance
training (config.training.p_uncond)."""
import math

import pytest
import torch

import models
import sde_lib

SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(),
        "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)}


# ----------------------------------------------------------------------------- networks

@pytest.mark.parametrize("name, kwargs, shape", [
    ("mlp", dict(data_shape=(2,), num_classes=8), (2,)),
    ("conv", dict(num_channels=1, image_size=8, num_classes=10), (1, 8, 8)),
    ("wideresnet", dict(num_channels=3, image_size=8, num_classes=10, depth=10, widen_factor=1),
     (3, 8, 8)),
])
def test_classifier_shapes_forward_backward(name, kwargs, shape):
    torch.manual_seed(0)
    net = models.build_classifier(name, **kwargs)
    x = torch.randn(5, *shape, requires_grad=True)
    logits = net(x, torch.linspace(-4.0, 4.0, 5))
    assert logits.shape == (5, kwargs["num_classes"]) and logits.dtype == x.dtype
    logits.logsumexp(1).sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the conditioning matters: other noise levels give other logits
    assert not torch.allclose(net(x, torch.zeros(5)), net(x, torch.full((5,), 3.0)))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        net(torch.randn(2, *shape[:-1], shape[-1] + 1), torch.zeros(2))


def test_wideresnet_default_is_wrn_28_10():
    """WRN-28-10: 4 blocks per group, 160 / 320 / 640 channels, and without the noise
    embedding layers the WRN paper's 36.5M weights."""
    net = models.build_classifier("wideresnet")
    assert len(net.blocks) == 12 and net.head.in_features == 640
    count = sum(p.numel() for name, p in net.named_parameters()
                if p.requires_grad and "emb" not in name)
    assert 36.4e6 < count < 36.6e6, count


def test_build_classifier_rejects_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match="valid classifier names: mlp, conv, wideresnet"):
        models.build_classifier("resnet")
    with pytest.raises(ValueError, match="depth must be 6 n \\+ 4"):
        models.build_classifier("wideresnet", depth=12)
    with pytest.raises(TypeError):
        models.build_classifier("mlp", data_shape=(2,), num_classes=3, width=4)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_logits_fn_conditions_on_log_sigma(sde_name):
    """cond = log(std / alpha) from the SDE's marginal coefficients, in x's dtype."""
    sde, seen = SDES[sde_name], []

    def fake(x, cond):
        seen.append(cond)
        return x.new_zeros(x.shape[0], 3)

    t = torch.tensor([1e-3, 0.25, 0.5, 1.0])
    logits = models.get_logits_fn(sde, fake)(torch.zeros(4, 1, 2, 2), t)
    alpha, std = sde.marginal_coeffs(t.double())
    assert logits.shape == (4, 3)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0].double(), torch.log(std / alpha), rtol=1e-6, atol=1e-6)
    if sde_name == "ve":
        torch.testing.assert_close(seen[0].double(), torch.log(sde.sigma(t)), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- the loss

def test_classifier_losses_is_cross_entropy_at_the_perturbed_data():
    """An oracle logits_fn that sees x_t and t: the loss is the cross-entropy at
    x_t = alpha x + std z with the same draws of t and z as sample_time + randn."""
    sde = SDES["vp"]
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    seen = {}

    def logits_fn(xt, t):
        seen["xt"], seen["t"] = xt, t
        return torch.stack([xt[:, 0], xt[:, 1], t], dim=1)

    losses = sde_lib.classifier_losses(logits_fn, sde, x, labels,
                                       generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t, _ = sde_lib.sample_time(sde, 6, generator=g)
    alpha, std = sde.marginal_coeffs(t)
    xt = alpha[:, None] * x + std[:, None] * torch.randn(6, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(seen["xt"], xt)
    logits = torch.stack([xt[:, 0], xt[:, 1], t], dim=1)
    expected = -torch.log_softmax(logits, 1)[torch.arange(6), labels]
    torch.testing.assert_close(losses, expected)
    with pytest.raises(ValueError, match="labels must have shape"):
        sde_lib.classifier_losses(logits_fn, sde, x, labels[:3])
    with pytest.raises(ValueError, match="eps"):
        sde_lib.get_classifier_loss_fn(sde, eps=0.0)


def _bayes(mixture, sde, x, t):
    """The exact posterior p_t(y | x) of the mixture's components at time t: log (B, K)."""
    alpha, std = sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64))
    log_joint, _, _ = mixture._components(x, alpha, std)
    return torch.log_softmax(log_joint, dim=1)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_mlp_classifier_on_the_mixture_reaches_the_bayes_accuracy(sde_name):
    """8-mode mixture, labels = component: after 250 Adam steps the classifier's accuracy and
    cross-entropy on p_t at sigma ~ 1 are within 0.03 / 0.1 nats of the exact posterior's
    (the Bayes classifier: ~0.55 / 1.06 nats, chance 0.125 / 2.08 nats); 4000 test points give
    a binomial std of accuracy ~0.008 (measured: VP 0.01 / 0.03 nats, VE 0.02 / 0.09 nats
    off; VE's inputs up to sigma_max = 50 learn more slowly, 500 steps give 0.03 nats). The
    training loss decreases from log 8 (chance)."""
    torch.manual_seed(0)
    sde, mixture = SDES[sde_name], sde_lib.eight_mode_mixture()
    net = models.build_classifier("mlp", data_shape=(2,), num_classes=8)
    logits_fn = models.get_logits_fn(sde, net)
    loss_fn = sde_lib.get_classifier_loss_fn(sde)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(250):
        x, y = mixture.sample(256, generator=g, return_components=True)
        loss = loss_fn(logits_fn, x, y, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(8) - 0.3 and sum(losses[-20:]) / 20 < losses[0] - 0.5
    t = 0.25 if sde_name == "vp" else 0.55          # sigma ~ 1: the classes overlap
    x, y = mixture.sample_marginal(sde, t, 4000, generator=g, return_components=True)
    posterior = _bayes(mixture, sde, x, t)
    bayes_acc = (posterior.argmax(1) == y).double().mean().item()
    bayes_nll = -posterior[torch.arange(4000), y].mean().item()
    assert 0.4 < bayes_acc < 0.9                    # a point where accuracy is informative
    with torch.no_grad():
        logits = logits_fn(x, torch.full((4000,), t))
    acc = (logits.argmax(1) == y).double().mean().item()
    nll = torch.nn.functional.cross_entropy(logits.double(), y).item()
    assert acc > bayes_acc - 0.03, (acc, bayes_acc)
    assert bayes_nll - 0.01 < nll < bayes_nll + 0.1, (nll, bayes_nll)
