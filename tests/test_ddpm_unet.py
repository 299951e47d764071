"""The DDPM U-Net (models/ddpm.py): the Score SDE checkpoint layout, shapes, conditioning,
a short training run on a tiny config, the checkpoint helpers (models/checkpoints.py), and the
scores of models.get_score_fn against the official get_score_fn for the same weights.

The parameter count and the key names / shapes below are facts of the official PyTorch Score
SDE code (yang-song/score_sde_pytorch, models/ddpm.py + models/layers.py) with its CIFAR-10
DDPM config (configs/vp/ddpm/cifar10.py): an instance of that code built on the CPU has
35,218,947 parameters and the same 308 state-dict entries, in the same order, plus the
``sigmas`` buffer of shape (1000,) that the converter drops.
"""
import math

import pytest
import torch
from ml_collections import ConfigDict

import models
import sde_lib
from models.layers import AttnBlock
from run_lib import compose
from test_ncsnpp import fill_deterministic
from testbed import check_class_conditioning, loss_before_and_after_training, perturb_zero_init

OFFICIAL_NUM_PARAMS = 35_218_947

#: (key, shape) pairs from the official model's state_dict().
OFFICIAL_KEYS = [
    ("all_modules.0.weight", (512, 128)),            # time embedding Dense(nf, 4 nf)
    ("all_modules.0.bias", (512,)),
    ("all_modules.1.weight", (512, 512)),            # time embedding Dense(4 nf, 4 nf)
    ("all_modules.1.bias", (512,)),
    ("all_modules.2.weight", (128, 3, 3, 3)),        # first conv
    ("all_modules.2.bias", (128,)),
    ("all_modules.3.GroupNorm_0.weight", (128,)),    # first ResnetBlockDDPM
    ("all_modules.3.Conv_0.weight", (128, 128, 3, 3)),
    ("all_modules.3.Dense_0.weight", (128, 512)),
    ("all_modules.3.Conv_1.weight", (128, 128, 3, 3)),
    ("all_modules.5.Conv_0.weight", (128, 128, 3, 3)),   # Downsample 32 -> 16
    ("all_modules.6.NIN_0.W", (128, 256)),           # channel change shortcut
    ("all_modules.7.GroupNorm_0.weight", (256,)),    # attention at 16x16
    ("all_modules.7.NIN_0.W", (256, 256)),
    ("all_modules.7.NIN_0.b", (256,)),
    ("all_modules.7.NIN_3.W", (256, 256)),
    ("all_modules.7.NIN_3.b", (256,)),
    ("all_modules.17.NIN_2.W", (256, 256)),          # middle attention
    ("all_modules.19.NIN_0.W", (512, 256)),          # first up block (concat 256 + 256)
    ("all_modules.29.NIN_0.W", (384, 256)),
    ("all_modules.31.Conv_0.weight", (256, 256, 3, 3)),  # Upsample 16 -> 32
    ("all_modules.32.NIN_0.W", (384, 128)),
    ("all_modules.35.weight", (128,)),               # final GroupNorm
    ("all_modules.36.weight", (3, 128, 3, 3)),       # last conv
    ("all_modules.36.bias", (3,)),
]


def official_config(**model_overrides):
    """The config names of configs/vp/ddpm/cifar10.py (model) and the CIFAR-10 default (data)."""
    model = dict(name="ddpm", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True, conditional=True,
                 scale_by_sigma=False)
    model.update(model_overrides)
    return ConfigDict(dict(model=model, data=dict(image_size=32, num_channels=3, centered=True),
                           training=dict(continuous=False)))


def tiny_config(**model_overrides):
    cfg = official_config(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                          **model_overrides)
    cfg.data.image_size = 8
    return cfg


@pytest.fixture(scope="module")
def official_model():
    torch.manual_seed(0)
    return compose.build_model(official_config())


def test_official_cifar10_parameter_count(official_model):
    assert sum(p.numel() for p in official_model.parameters()) == OFFICIAL_NUM_PARAMS


def test_official_key_names_and_shapes(official_model):
    state = official_model.state_dict()
    assert len(state) == 308
    for key, shape in OFFICIAL_KEYS:
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert list(state)[-1] == "all_modules.36.bias"
    assert len(official_model.all_modules) == 37
    norms = [m for m in official_model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_official_init(official_model):
    """DDPM's variance-scaling init (fan_avg, uniform) and its near-zero output layers."""
    w = official_model.all_modules[2].weight  # fan_in 3*9, fan_out 128*9
    bound = math.sqrt(3.0 / ((3 * 9 + 128 * 9) / 2))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # init_scale=0 means variance scale 1e-10: |w| <= sqrt(3e-10 / fan_avg) ~ 1e-6
    last = official_model.all_modules[36].weight  # fan_avg (128 + 3) * 9 / 2
    assert 0 < last.abs().max() <= math.sqrt(3e-10 / ((128 + 3) * 9 / 2))
    assert official_model.all_modules[7].NIN_3.W.abs().max() <= math.sqrt(3e-10 / 256)
    assert official_model.all_modules[3].Conv_1.weight.abs().max() <= math.sqrt(3e-10 / 1152)
    assert torch.count_nonzero(official_model.all_modules[3].Dense_0.bias) == 0


def test_official_forward_shape(official_model):
    official_model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = official_model(x, torch.tensor([500]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_attention_matches_einsum_reference():
    """The attention block computes softmax(q.k / sqrt(C)) v over all pixels, written here as
    in the DDPM reference code."""
    torch.manual_seed(1)
    block = AttnBlock(32)
    with torch.no_grad():
        block.NIN_3.W.normal_()
    x = torch.randn(2, 32, 4, 4)
    h = block.GroupNorm_0(x)
    q, k, v = block.NIN_0(h), block.NIN_1(h), block.NIN_2(h)
    w = torch.einsum("bchw,bcij->bhwij", q, k) * 32 ** -0.5
    w = torch.softmax(w.reshape(2, 4, 4, 16), dim=-1).reshape(2, 4, 4, 4, 4)
    expected = x + block.NIN_3(torch.einsum("bhwij,bcij->bchw", w, v))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_time_conditioning_changes_output():
    torch.manual_seed(0)
    model = compose.build_model(tiny_config()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        at_init = model(x, torch.tensor([10, 900]))
        assert at_init.abs().max() < 1e-4  # zero-initialised output conv
        perturb_zero_init(model, scale=0.05)
        a = model(x, torch.tensor([10, 10]))
        b = model(x, torch.tensor([900, 900]))
        c = model(x, torch.tensor([10.0, 10.0]))  # float and long step indices agree
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    torch.testing.assert_close(a, c)


def test_class_conditioning_adds_one_embedding():
    torch.manual_seed(0)
    plain = compose.build_model(tiny_config())
    model = compose.build_model(tiny_config(num_classes=10)).eval()
    perturb_zero_init(model, scale=0.05)
    check_class_conditioning(plain, model, torch.randn(2, 3, 8, 8), torch.tensor([100, 100]),
                             num_classes=10, width=64, min_relative_change=1e-3)


def test_tiny_ddpm_training_lowers_epsilon_loss():
    torch.manual_seed(0)
    model = compose.build_model(tiny_config())
    sde = sde_lib.VPSDE(N=100)
    loss_fn = sde_lib.get_loss_fn(sde, continuous=False)
    score_fn = models.get_score_fn(sde, model, continuous=False)
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    before, after = loss_before_and_after_training(model, loss_fn, score_fn, x, steps=15, lr=2e-3,
                                                   last_layer=model.all_modules[-1].weight)
    print(f'tiny DDPM epsilon loss {before:.4f} -> {after:.4f}')
    assert math.isfinite(before) and after < 0.8 * before, (before, after)


def test_wrong_shape_names_first_mismatching_key():
    model = compose.build_model(tiny_config())
    state = model.state_dict()
    first, later = "all_modules.3.Conv_0.weight", "all_modules.6.NIN_0.W"
    assert list(state).index(first) < list(state).index(later)
    state[later] = torch.zeros(1, 2)
    state[first] = torch.zeros(state[first].shape[0], 1, 3, 3)
    with pytest.raises(ValueError, match=r"all_modules\.3\.Conv_0\.weight") as err:
        models.load_state_dict_strict(model, state)
    assert later not in str(err.value)
    good = model.state_dict()
    del good["all_modules.0.bias"]
    with pytest.raises(ValueError, match=r"missing key 'all_modules\.0\.bias'"):
        models.load_state_dict_strict(model, good)
    good = dict(model.state_dict(), extra=torch.zeros(1))
    with pytest.raises(ValueError, match="unexpected key 'extra'"):
        models.load_state_dict_strict(model, good)


def test_converter_round_trip_from_score_sde_checkpoint():
    """An official-style checkpoint: DataParallel 'module.' keys plus the 'sigmas' buffer,
    inside the dict their save_checkpoint writes."""
    torch.manual_seed(0)
    source = compose.build_model(tiny_config())
    state = {"module." + k: v.clone() for k, v in source.state_dict().items()}
    state["module.sigmas"] = torch.linspace(50.0, 0.01, 1000)
    shadow = [p.detach() + 1.0 for p in source.parameters()]  # their EMA: a list, parameters()
    checkpoint = {"model": state, "ema": {"decay": 0.9999, "num_updates": 7,
                                          "shadow_params": shadow},
                  "optimizer": {}, "step": 7}
    torch.manual_seed(1)
    target = compose.build_model(tiny_config())
    converted = models.convert_score_sde_state_dict(checkpoint)
    assert "sigmas" not in converted and not any(k.startswith("module.") for k in converted)
    target.load_state_dict(converted, strict=True)
    models.load_state_dict_strict(target, models.convert_score_sde_state_dict(state))
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k
    models.load_state_dict_strict(target, models.convert_score_sde_state_dict(checkpoint,
                                                                             ema=True))
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a + 1.0, b), k
    checkpoint["ema"]["shadow_params"] = shadow[1:]
    with pytest.raises(ValueError, match="shadow_params"):
        models.convert_score_sde_state_dict(checkpoint, ema=True)


def test_registry_and_bad_configs():
    assert models.MODELS["ddpm"] is models.DDPM
    with pytest.raises(ValueError, match="divisible"):
        models.DDPM(nf=16, ch_mult=(1, 2, 2, 2), image_size=12)
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
        compose.build_model(tiny_config())(torch.zeros(1, 3, 16, 16), torch.zeros(1))
    unconditional = compose.build_model(tiny_config(conditional=False)).eval()
    assert not any("Dense_0" in k for k in unconditional.state_dict())
    with torch.no_grad():
        assert unconditional(torch.zeros(1, 3, 8, 8), torch.zeros(1)).shape == (1, 3, 8, 8)


# --------------------------------------------------------------------------- the official scores

#: Scores of the official get_score_fn (yang-song/score_sde_pytorch at cb1f359, models/utils.py)
#: with its DDPM (models/ddpm.py), in float64, for the tiny U-Net ``OFFICIAL_SCORE_MODEL`` with
#: the weights of ``fill_deterministic`` (loaded there with strict=True, plus its ``sigmas``),
#: x = randn(5, 3, 8, 8) (float64, generator seed 3) and one t per sample, ``OFFICIAL_SCORE_T``.
#: Per case: (mean |score| per sample, score[:, 1, 3, 5]). Produced by running the official
#: code from a checkout outside this repository, with two changes that let it run in float64
#: and leave the conventions alone: its get_timestep_embedding computed in float64 (theirs
#: casts the labels to float32) and VPSDE.sqrt_1m_alphas_cumprod recomputed in float64 (their
#: table is float32; with it the VP discrete scores move by up to 2.6e-6 relative). Our
#: scores equal these to ~2e-15 relative. Cases (their config names):
#: vp_score_sde: VPSDE(0.1, 20, 1000), continuous=False; vp_continuous: continuous=True;
#: ve_discrete: VESDE(0.01, 50, 1000), continuous=False, model.scale_by_sigma=True;
#: ve_continuous: continuous=True, scale_by_sigma=False; ve_continuous_centered: the same with
#: data.centered=False, for x.sigmoid() (their model computes 2 x - 1).
OFFICIAL_SCORES = {
    "vp_score_sde": ((3.171852557, 0.6090508409, 0.5153624261, 0.5089176164, 1.355512653),
                     (0.1536846807, -2.284886551, -0.3519489801, -0.6094563404, -3.374470969)),
    "vp_continuous": ((3.14757315, 0.6091990846, 0.5153659506, 0.5091579137, 1.350851726),
                      (0.152508279, -2.285442696, -0.351951387, -0.6097441094, -3.362867858)),
    "ve_discrete": ((33.77131964, 1.729166816, 0.02476724035, 0.6743472714, 17.54035115),
                    (-17.94596591, 6.569874037, 0.01895812483, 0.7729824987, 31.91323248)),
    "ve_continuous": ((0.5050547543, 0.5422776228, 0.5338782021, 0.4884070165, 0.4985027446),
                      (-0.09585656707, 2.027523909, 0.3306839492, 0.2587325449, 1.183521944)),
    "ve_continuous_centered": (
        (0.5191224275, 0.503652004, 0.5477437078, 0.5133481934, 0.4881704726),
        (-0.4900282276, 1.544539651, 0.726699169, -0.2936403204, 1.10678645)),
}
#: Off the grid t_i = i / 999 (0.05, 0.4, 0.9), on it (500 / 999), and 126 / 999, whose float64
#: product t * 999 is 125.99999999999999: the official floor takes level 125 there.
OFFICIAL_SCORE_T = (0.05, 0.4, 0.9, 500 / 999, 126 / 999)
#: ch_mult (1, 2) with nf=64: every GroupNorm has 32 groups, as in the official DDPM.
OFFICIAL_SCORE_MODEL = dict(nf=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                            dropout=0.1, image_size=8, num_channels=3)


@pytest.fixture(scope="module")
def official_checkpoint_model():
    """The tiny DDPM in float64, loaded from an official-style checkpoint (DataParallel
    'module.' keys and the 'sigmas' buffer) through convert_score_sde_state_dict."""
    source = models.DDPM(**OFFICIAL_SCORE_MODEL).double()
    fill_deterministic(source)
    checkpoint = {"model": {"module." + k: v for k, v in source.state_dict().items()}}
    checkpoint["model"]["module.sigmas"] = torch.ones(1000, dtype=torch.float64)
    model = models.DDPM(**OFFICIAL_SCORE_MODEL).double().eval()
    models.load_state_dict_strict(model, models.convert_score_sde_state_dict(checkpoint))
    return model


def _official_case(name, model):
    """(score_fn, input) of one ``OFFICIAL_SCORES`` case, with our wrapper's options."""
    vp, ve = sde_lib.VPSDE(0.1, 20.0, 1000), sde_lib.VESDE(0.01, 50.0, 1000)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cases = {
        "vp_score_sde": (vp, dict(continuous=False, discrete_labels="score_sde")),
        "vp_continuous": (vp, dict(continuous=True)),
        "ve_discrete": (ve, dict(continuous=False, scale_by_sigma=True)),
        "ve_continuous": (ve, dict(continuous=True)),
        "ve_continuous_centered": (ve, dict(continuous=True, center_input=True)),
    }
    sde, options = cases[name]
    return models.get_score_fn(sde, model, **options), (x.sigmoid() if "centered" in name else x)


@pytest.mark.parametrize("name", list(OFFICIAL_SCORES))
def test_scores_equal_official_get_score_fn(official_checkpoint_model, name):
    score_fn, x = _official_case(name, official_checkpoint_model)
    with torch.no_grad():
        score = score_fn(x, torch.tensor(OFFICIAL_SCORE_T, dtype=torch.float64))
    abs_mean, entries = (torch.tensor(v, dtype=torch.float64) for v in OFFICIAL_SCORES[name])
    torch.testing.assert_close(score.abs().flatten(1).mean(1), abs_mean, rtol=1e-9, atol=0)
    torch.testing.assert_close(score[:, 1, 3, 5], entries, rtol=1e-9, atol=0)


def test_nearest_levels_differ_from_the_official_score_off_the_grid(official_checkpoint_model):
    """The default discrete_labels='nearest' (label round(t (N - 1)), std there) is not the
    official score off the grid: 1.8e-2, 2.7e-2 and 6.2e-3 relative at t = 0.05, 0.4, 0.9, and
    7.0e-3 at 126 / 999 (floor vs round); on the grid (500 / 999) the two are one."""
    sde = sde_lib.VPSDE(0.1, 20.0, 1000)
    t = torch.tensor(OFFICIAL_SCORE_T, dtype=torch.float64)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        nearest = models.get_score_fn(sde, official_checkpoint_model, False)(x, t)
        official = models.get_score_fn(sde, official_checkpoint_model, False,
                                       discrete_labels="score_sde")(x, t)
    relative = (nearest - official).flatten(1).norm(dim=1) / official.flatten(1).norm(dim=1)
    assert (relative[[0, 1, 2, 4]] > 5e-3).all() and relative[3] < 1e-12, relative
