"""Activation checkpointing (config.model.checkpointing; models/layers.py CheckpointBlock) of
the residual and attention blocks of DDPM, NCSN++ (DDPM and BigGAN blocks) and the
RefineNets (NCSN, NCSNv2): the same loss and gradients as the plain network (dropout on),
fewer saved activations, no checkpointing outside training with gradients, and the switch
from the config through the training loop."""
import pytest
import torch

import models
from models import layers
from models.ddpm import DDPM
from models.ncsn import NCSN, NCSNv2
from models.ncsnpp import NCSNpp
from run_lib import compose
from run_lib.train import load_checkpoint, train

from test_train import tiny_config

TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.3,
            image_size=8, num_channels=1)

NETWORKS = {
    "ddpm": lambda ck: DDPM(**TINY, checkpointing=ck),
    "ncsnpp_ddpm": lambda ck: NCSNpp(**TINY, resblock_type="ddpm", checkpointing=ck),
    "ncsnpp_biggan": lambda ck: NCSNpp(**TINY, resblock_type="biggan", checkpointing=ck),
    "ncsnv2": lambda ck: NCSNv2(nf=8, image_size=8, num_channels=1, checkpointing=ck),
    "ncsn": lambda ck: NCSN(nf=8, num_scales=5, image_size=8, num_channels=1, checkpointing=ck),
}


def loss_and_gradients(name: str, checkpointing: bool, *, dropout_seed: int = 7):
    """Loss, parameter gradients and the bytes of activations autograd saved (distinct
    tensors other than the parameters, counted by a saved_tensors_hooks pack hook) of one
    forward + backward of the tiny network in float64, training mode, inputs and weights
    (N(0, 0.2^2)) from fixed seeds, dropout masks from ``dropout_seed``."""
    torch.manual_seed(0)
    model = NETWORKS[name](checkpointing).double().train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():       # random weights: no near-zero layers that hide dropout's mask
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=g, dtype=torch.float64))
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    cond = (torch.randint(0, 5, (4,), generator=g) if name == "ncsn"
            else torch.rand(4, generator=g, dtype=torch.float64) + 0.1)
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            saved[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor
    torch.manual_seed(dropout_seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = (model(x, cond) - x).square().mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("name", list(NETWORKS))
def test_checkpointing_same_gradients_fewer_saved_activations(name):
    """The same loss and every parameter gradient as the plain network (abs 1e-12, float64;
    measured: bitwise equal), with dropout 0.3 in the DDPM / NCSN++ blocks (a changed seed
    changes the gradients, so equal ones mean equal masks: the recomputation replays the
    RNG state), and at most half the activation bytes saved for the backward pass (measured
    fractions: DDPM 0.26, NCSN++ ddpm 0.33 / biggan 0.17, NCSNv2 0.08, NCSN 0.05)."""
    loss, grads, saved = loss_and_gradients(name, False)
    loss_ck, grads_ck, saved_ck = loss_and_gradients(name, True)
    assert torch.equal(loss, loss_ck) or abs(loss - loss_ck) < 1e-12
    assert grads.keys() == grads_ck.keys() and len(grads) > 10
    for key in grads:
        torch.testing.assert_close(grads_ck[key], grads[key], rtol=0, atol=1e-12, msg=key)
    if name.startswith(("ddpm", "ncsnpp")):      # dropout is on: another seed, other grads
        _, other, _ = loss_and_gradients(name, False, dropout_seed=8)
        assert max((other[k] - grads[k]).abs().max().item() for k in grads) > 1e-6
    assert saved_ck < 0.5 * saved, (saved_ck, saved)


def test_checkpointing_only_when_training_with_gradients(monkeypatch):
    """torch.utils.checkpoint runs for every checkpointed block in training mode with
    gradients, never in eval mode or under no_grad (sampling pays nothing), nor without the
    switch; the outputs are the same either way."""
    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint",
                        lambda fn, *args, **kw: calls.append(kw) or real(fn, *args, **kw))
    torch.manual_seed(0)
    model = DDPM(**{**TINY, "dropout": 0.0}, checkpointing=True)
    blocks = [m for m in model.modules() if isinstance(m, layers.CheckpointBlock)]
    assert len(blocks) == 11 and all(b.checkpointing for b in blocks)  # 8 resnet + 3 attn
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    model.train()
    out = model(x, t)
    assert len(calls) == 11 and all(kw == {"use_reentrant": False} for kw in calls)
    calls.clear()
    with torch.no_grad():
        assert torch.allclose(model(x, t), out)
    model.eval()
    assert torch.allclose(model(x, t), out.detach())
    layers.set_checkpointing(model, False)
    model.train()
    model(x, t)
    assert calls == []


@pytest.mark.parametrize("config_name", ["vp/ddpm_digits", "ve/ncsnpp_digits", "vp/ddpmpp_digits",
                                         "ve/ncsnv2_digits", "ve/ncsn_digits"])
def test_config_switch_reaches_every_block(config_name):
    """config.model.checkpointing (default False) reaches the network's constructor through
    run_lib.compose and sets every residual / attention block; the state dict is unchanged."""
    import importlib
    config = importlib.import_module("configs." + config_name.replace("/", ".")).get_config()
    torch.manual_seed(0)
    plain = compose.build_model(config)
    config.model.checkpointing = True
    torch.manual_seed(0)
    model = compose.build_model(config)
    blocks = [m for m in model.modules() if isinstance(m, layers.CheckpointBlock)]
    assert model.checkpointing and blocks and all(b.checkpointing for b in blocks)
    assert not plain.checkpointing and not any(
        m.checkpointing for m in plain.modules() if isinstance(m, layers.CheckpointBlock))
    assert plain.state_dict().keys() == model.state_dict().keys()


def test_training_with_checkpointing_equals_plain_training(tmp_path):
    """train() 4 steps with dropout 0.1 on, bf16 autocast and 2 micro-batches per step: with
    config.model.checkpointing the losses and weights are those of the plain run (losses rel
    1e-6, weights abs 1e-6; measured bitwise equal)."""
    runs = {}
    for checkpointing in (False, True):
        config = tiny_config(4)
        config.training.eval_freq = 0
        config.training.mixed_precision = "bf16"
        config.training.batch_per_device = 8
        config.model.checkpointing = checkpointing
        runs[checkpointing] = train(config, tmp_path / str(checkpointing), progress=False)
    assert runs[True]["losses"] == pytest.approx(runs[False]["losses"], rel=1e-6)
    a = load_checkpoint(tmp_path / "False" / "checkpoints" / "latest.pt", "cpu")["model"]
    b = load_checkpoint(tmp_path / "True" / "checkpoints" / "latest.pt", "cpu")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert isinstance(models.build_model("ddpm", **{**TINY, "checkpointing": True}), DDPM)
