"""NCSN++ / DDPM++ (models/ncsnpp.py): the Score SDE checkpoint layout, outputs equal to the
official model for the same weights, conditioning, a short training run, checkpoint helpers,
autocast, channels_last and torch.compile.

Facts of the official PyTorch Score SDE code (yang-song/score_sde_pytorch, models/ncsnpp.py +
layerspp.py), checked by building it on the CPU (with a plain-torch stand-in for its compiled
``op.upfirdn2d``) from its CIFAR-10 configs (configs/ve/cifar10_ncsnpp{,_deep}_continuous.py,
configs/vp/cifar10_ddpmpp{,_deep}_continuous.py):

* parameter counts and state-dict entries (without the ``sigmas`` buffer that our converter
  drops) are those in ``OFFICIAL`` below; keys, shapes and order are identical entry for entry;
  its EMA ``shadow_params`` list has one tensor fewer than our state dict for the Fourier
  models (the frozen ``all_modules.0.W``, requires_grad=False, is not tracked);
* loading the official weights (randomised, including the ~0-initialised layers) with
  ``convert_score_sde_state_dict`` + ``load_state_dict_strict`` gives the same outputs: max abs
  difference 1.4e-6 to 3.1e-6 (outputs of size ~2-4) for positional-embedding models and 1.5e-5
  to 3.3e-5 for Fourier ones, at 16x16 for nine tiny variants covering every option
  (resblock ddpm/biggan, fir on/off, resamp_with_conv off, progressive none/output_skip/residual,
  progressive_input none/input_skip/residual, combine sum/cat, skip_rescale off, init_scale 0.3,
  conditional off)
  and for the four CIFAR-10 models at 32x32 (numbers in the docstring of
  ``test_official_parameter_counts_and_keys``). The larger Fourier difference is float32
  rounding of the feature argument 2 pi W log(sigma) (|W| ~ 16, arguments up to ~10^3
  where one ulp is 6e-5): our shared ``GaussianFourierProjection`` multiplies in another
  order; with the official order the difference falls to 1.7e-6.
* the official pipeline for a VE checkpoint (uncentered [0, 1] data, ``scale_by_sigma``)
  equals ours as ``model(2 x - 1, sigma) / sigma`` (checked on the CIFAR-10 NCSN++ model).
* ``GOLDEN`` holds a few outputs of the official tiny 8x8 models filled with the
  deterministic weights of ``fill_deterministic``; the tests recompute them here.

Two layers of the official PyTorch code cannot run as published: the FIR ``Upsample`` with a
conv (``w[..., ::-1, ::-1]`` on a tensor, then a 4-element stride for conv_transpose2d) and
the non-FIR ``Upsample`` (``F.interpolate(x, size, 'nearest')`` passes the mode as the scale
factor); the CIFAR-10 configs use neither. They were compared after fixing them to their evident intent (the StyleGAN2 /
TensorFlow semantics that models/fir.py implements and tests/test_fir.py checks).
"""
import math
import time

import pytest
import torch
from ml_collections import ConfigDict

import models
import sde_lib
from models.ncsnpp import NCSNpp
from run_lib import compose
from testbed import check_class_conditioning, loss_before_and_after_training, perturb_zero_init

#: name -> (config.model overrides of the NCSN++ config, parameters, state-dict entries).
OFFICIAL = {
    "ncsnpp": ({}, 62_758_915, 571),
    "ncsnpp_deep": (dict(num_res_blocks=8), 107_587_075, 963),
    "ddpmpp": (dict(fir=False, progressive_input="none", embedding_type="positional"),
               61_804_419, 564),
    "ddpmpp_deep": (dict(fir=False, progressive_input="none", embedding_type="positional",
                         num_res_blocks=8), 106_632_579, 956),
}

#: name -> [(key, shape)] from the official model's state_dict().
OFFICIAL_KEYS = {
    "ncsnpp": [
        ("all_modules.0.W", (128,)),                    # Fourier features (frozen)
        ("all_modules.1.weight", (512, 256)),           # Dense(2 nf, 4 nf)
        ("all_modules.2.weight", (512, 512)),
        ("all_modules.3.weight", (128, 3, 3, 3)),       # first conv
        ("all_modules.4.Dense_0.weight", (128, 512)),
        ("all_modules.8.Conv_2.weight", (128, 128, 1, 1)),  # BigGAN down block, 1x1 shortcut
        ("all_modules.9.Conv2d_0.weight", (128, 3, 3, 3)),  # input pyramid: FIR conv-down 3 -> 128
        ("all_modules.9.Conv2d_0.bias", (128,)),
        ("all_modules.11.NIN_0.W", (256, 256)),         # attention at 16x16
        ("all_modules.11.NIN_3.W", (256, 256)),
        ("all_modules.19.Conv2d_0.weight", (256, 128, 3, 3)),  # input pyramid 128 -> 256
        ("all_modules.25.Conv2d_0.weight", (256, 256, 3, 3)),
        ("all_modules.38.Conv_2.weight", (256, 256, 1, 1)),  # BigGAN up block
        ("all_modules.49.GroupNorm_0.weight", (384,)),  # concat 256 + 128
        ("all_modules.57.weight", (128,)),              # final GroupNorm
        ("all_modules.58.weight", (3, 128, 3, 3)),      # last conv
        ("all_modules.58.bias", (3,)),
    ],
    "ncsnpp_deep": [
        ("all_modules.0.W", (128,)),
        ("all_modules.1.weight", (512, 256)),
        ("all_modules.12.Conv_2.weight", (128, 128, 1, 1)),  # BigGAN down block
        ("all_modules.13.Conv2d_0.weight", (128, 3, 3, 3)),  # input pyramid FIR conv
        ("all_modules.15.NIN_3.W", (256, 256)),         # attention at 16x16
        ("all_modules.31.Conv2d_0.weight", (256, 128, 3, 3)),
        ("all_modules.41.Conv2d_0.weight", (256, 256, 3, 3)),
        ("all_modules.81.GroupNorm_0.weight", (384,)),
        ("all_modules.93.weight", (128,)),
        ("all_modules.94.weight", (3, 128, 3, 3)),
        ("all_modules.94.bias", (3,)),
    ],
    "ddpmpp": [
        ("all_modules.0.weight", (512, 128)),           # Dense(nf, 4 nf): positional embedding
        ("all_modules.1.weight", (512, 512)),
        ("all_modules.2.weight", (128, 3, 3, 3)),       # first conv
        ("all_modules.3.Dense_0.weight", (128, 512)),
        ("all_modules.7.Conv_2.weight", (128, 128, 1, 1)),  # BigGAN down block
        ("all_modules.8.Conv_2.weight", (256, 128, 1, 1)),
        ("all_modules.9.NIN_0.W", (256, 256)),          # attention at 16x16
        ("all_modules.34.Conv_2.weight", (256, 256, 1, 1)),  # BigGAN up block
        ("all_modules.45.GroupNorm_0.weight", (384,)),
        ("all_modules.53.weight", (128,)),              # final GroupNorm
        ("all_modules.54.weight", (3, 128, 3, 3)),      # last conv
        ("all_modules.54.bias", (3,)),
    ],
    "ddpmpp_deep": [
        ("all_modules.0.weight", (512, 128)),
        ("all_modules.2.weight", (128, 3, 3, 3)),
        ("all_modules.11.Conv_2.weight", (128, 128, 1, 1)),  # BigGAN down block
        ("all_modules.12.Conv_2.weight", (256, 128, 1, 1)),
        ("all_modules.13.NIN_3.W", (256, 256)),         # attention at 16x16
        ("all_modules.77.GroupNorm_0.weight", (384,)),
        ("all_modules.89.weight", (128,)),
        ("all_modules.90.weight", (3, 128, 3, 3)),
        ("all_modules.90.bias", (3,)),
    ],
}


def official_config(name="ncsnpp", image_size=32, **model_overrides):
    """The official config names (configs/ve/cifar10_ncsnpp_continuous.py and friends)."""
    model = dict(name="ncsnpp", scale_by_sigma=True, nf=128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks=4, attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
                 conditional=True, fir=True, fir_kernel=[1, 3, 3, 1], skip_rescale=True,
                 resblock_type="biggan", progressive="none", progressive_input="residual",
                 progressive_combine="sum", attention_type="ddpm", init_scale=0.0,
                 embedding_type="fourier", fourier_scale=16, conv_size=3)
    model.update(OFFICIAL[name][0])
    model.update(model_overrides)
    if model["embedding_type"] == "positional":
        model["scale_by_sigma"] = False
    return ConfigDict(dict(model=model, data=dict(image_size=image_size, num_channels=3,
                                                  centered=True),
                           training=dict(continuous=True)))


TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def tiny_config(name="ncsnpp", image_size=8, **model_overrides):
    return official_config(name, image_size, **dict(TINY, **model_overrides))


def _cond(model, batch):
    """A (B,) conditioning of the kind the model embeds: sigma or 999 t."""
    values = [0.05, 3.0] if model.embedding_type == "fourier" else [10.0, 800.0]
    return torch.tensor((values * batch)[:batch])


def fill_deterministic(model, seed=0):
    """The weights behind ``GOLDEN``: for each state-dict entry in order, a float64 N(0, 1)
    draw r; 16 r for the Fourier W, r / sqrt(fan in) for matrices and kernels, 1 + 0.1 r for
    1-D weights (GroupNorm), 0.1 r for biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name == "all_modules.0.W":
                t.copy_(16.0 * r)
            elif t.ndim >= 2:
                t.copy_(r / math.sqrt(t[0].numel()))
            elif name.endswith(".weight"):
                t.copy_(1.0 + 0.1 * r)
            else:
                t.copy_(0.1 * r)


#: Official outputs for x = randn(2, 3, 8, 8) (generator seed 3), cond (sigma 0.05, 3.0) or
#: (999 t = 10, 800): (mean, mean |y|, y[1, :, 3, 5]) for tiny 8x8 variants (TINY + overrides).
GOLDEN = {
    "ncsnpp": ({}, (-0.119333, 0.558062, (0.405149, 0.907540, -0.156450))),
    "ddpmpp": ({}, (0.041193, 0.468762, (-0.362938, 0.945182, -0.086205))),
    "ncsnpp/ddpm_blocks_fir_skips_cat": (
        dict(resblock_type="ddpm", progressive="output_skip", progressive_input="input_skip",
             progressive_combine="cat"),
        (-0.022133, 0.476966, (0.135522, -0.279648, -0.021538))),
    "ddpmpp/residual_pyramids_no_fir": (
        dict(progressive="residual", progressive_input="residual", skip_rescale=False),
        (0.199456, 0.509304, (0.558119, -0.051557, -0.217416))),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_parameter_counts_and_keys(name):
    """Parameter count, state-dict entries (order included for the listed keys' first and
    last) and (key, shape) facts of the official CIFAR-10 models.

    The full list of (key, shape) pairs equals the official one in order. Same (randomised)
    weights, batch 2 (deep: 1) at 32x32, max abs difference to the official output / max |y|:
    NCSN++ 3.3e-5 / 2.3, NCSN++ deep 2.9e-5 / 2.3, DDPM++ 1.8e-6 / 2.9, DDPM++ deep 1.6e-6 /
    2.6. The official VE pipeline (uncentered data, scale_by_sigma) vs model(2 x - 1, sigma) /
    sigma: 7.8e-4 / 38 (the 3.3e-5 divided by sigma = 0.05).
    """
    _, num_params, num_entries = OFFICIAL[name]
    torch.manual_seed(0)
    model = compose.build_model(official_config(name))
    assert sum(p.numel() for p in model.parameters()) == num_params
    state = model.state_dict()
    assert len(state) == num_entries
    keys = list(state)
    for key, shape in OFFICIAL_KEYS[name]:
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert keys[0] == OFFICIAL_KEYS[name][0][0] and keys[-1] == OFFICIAL_KEYS[name][-1][0]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == min(m.num_channels // 4, 32) and m.eps == 1e-6
                         for m in norms)
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    assert frozen == (["all_modules.0.W"] if "ncsnpp" in name else [])


@pytest.mark.parametrize("name", list(GOLDEN))
def test_outputs_equal_official_for_the_same_weights(name):
    """Tiny 8x8 models with the deterministic weights of ``fill_deterministic`` reproduce
    the official model's outputs (``GOLDEN``, computed with the official code)."""
    base, _, _ = name.partition("/")
    overrides, (mean, abs_mean, pixel) = GOLDEN[name]
    model = compose.build_model(tiny_config(base, **overrides)).eval()
    fill_deterministic(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x, _cond(model, 2)).double()
    # 1e-4: the Fourier features' float32 rounding (module docstring) plus print rounding.
    assert y.mean().item() == pytest.approx(mean, abs=1e-4)
    assert y.abs().mean().item() == pytest.approx(abs_mean, abs=1e-4)
    torch.testing.assert_close(y[1, :, 3, 5], torch.tensor(pixel, dtype=torch.float64),
                               rtol=0, atol=1e-4)


def _variant(name, **overrides):
    """The tiny version of an official variant (deep: twice the residual blocks)."""
    blocks = 2 if name.endswith("_deep") else 1
    return tiny_config(name, **dict(dict(num_res_blocks=blocks), **overrides))


@pytest.mark.parametrize("name", list(OFFICIAL))
@pytest.mark.parametrize("size", [8, 32])
def test_output_shape_equals_input_shape(name, size):
    """At 32x32 with the CIFAR-10 ch_mult / attention (nf=16), and at 8x8 (two levels)."""
    overrides = dict(ch_mult=(1, 2, 2, 2), attn_resolutions=(16,)) if size == 32 else {}
    torch.manual_seed(0)
    model = compose.build_model(_variant(name, image_size=size, **overrides)).eval()
    fill_deterministic(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y = model(x, _cond(model, 1))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert y.abs().mean() > 0.1  # an actual, non-degenerate output


def test_option_grid_shapes():
    """Every resblock / pyramid / combine / fir / resampling option builds and runs at 16x16,
    each with its own key layout."""
    layouts = set()
    for resblock in ("ddpm", "biggan"):
        for progressive in ("none", "output_skip", "residual"):
            for progressive_input in ("none", "input_skip", "residual"):
                for combine, fir, with_conv in (("sum", True, True), ("cat", False, False)):
                    cfg = tiny_config(image_size=16, ch_mult=(1, 2, 2), attn_resolutions=(),
                                      resblock_type=resblock, progressive=progressive,
                                      progressive_input=progressive_input,
                                      progressive_combine=combine, fir=fir,
                                      resamp_with_conv=with_conv)
                    model = compose.build_model(cfg).eval()
                    with torch.no_grad():
                        y = model(torch.randn(1, 3, 16, 16), torch.tensor([1.0]))
                    assert y.shape == (1, 3, 16, 16), cfg.model
                    layouts.add(tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    # 36 combinations; the two option sets give the same keys and shapes only where no layer
    # depends on them: BigGAN blocks without an input pyramid and with no or the output_skip
    # output pyramid (2 pairs).
    assert len(layouts) == 34


def test_noise_conditioning_changes_output():
    torch.manual_seed(0)
    for name in ("ncsnpp", "ddpmpp"):
        model = compose.build_model(tiny_config(name)).eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert model(x, _cond(model, 2)).abs().max() < 1e-4  # ~0 output conv at init
            perturb_zero_init(model, scale=0.1)
            a = model(x, _cond(model, 1).expand(2))
            b = model(x, _cond(model, 2)[1:].expand(2))
        assert (a - b).abs().mean() > 1e-2 * a.abs().mean(), name
    with pytest.raises(ValueError, match="log sigma"):
        compose.build_model(tiny_config())(x, torch.tensor([3, 4]))


def test_class_conditioning_adds_one_embedding():
    torch.manual_seed(0)
    plain = compose.build_model(tiny_config())
    model = compose.build_model(tiny_config(num_classes=10)).eval()
    perturb_zero_init(model, scale=0.1)
    check_class_conditioning(plain, model, torch.randn(2, 3, 8, 8), torch.tensor([1.0, 1.0]),
                             num_classes=10, width=64, min_relative_change=1e-2)
    with pytest.raises(ValueError, match="conditional=True"):
        compose.build_model(tiny_config(num_classes=10, conditional=False))


@pytest.mark.parametrize("name,sde,continuous", [
    ("ncsnpp", sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=100), True),
    ("ddpmpp", sde_lib.VPSDE(N=100), True),
    ("ddpmpp", sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=100), False),
])
def test_tiny_training_lowers_dsm_loss(name, sde, continuous):
    """A few Adam steps on a fixed batch, with fixed times and noise, through the score
    wrapper (VE: scale_by_sigma as in the official configs; discrete VE: positional
    embedding of the level label)."""
    torch.manual_seed(0)
    cfg = tiny_config(name, dropout=0.0)
    model = compose.build_model(cfg)
    loss_fn = sde_lib.get_loss_fn(sde, continuous=continuous, reduce_mean=True)
    score_fn = models.get_score_fn(sde, model, continuous=continuous,
                                   scale_by_sigma=isinstance(sde, sde_lib.VESDE))
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    before, after = loss_before_and_after_training(model, loss_fn, score_fn, x, steps=15, lr=2e-3)
    print(f"tiny {name} {type(sde).__name__} DSM loss {before:.4f} -> {after:.4f}")
    assert math.isfinite(before) and after < 0.8 * before, (before, after)


def test_wrong_shape_names_first_mismatching_key():
    model = compose.build_model(tiny_config())
    state = model.state_dict()
    first, later = "all_modules.3.weight", "all_modules.6.Conv2d_0.weight"  # input pyramid
    assert list(state).index(first) < list(state).index(later)
    state[later] = torch.zeros(1, 2, 3, 3)
    state[first] = torch.zeros(16, 1, 3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch for 'all_modules\.3\.weight'") as err:
        models.load_state_dict_strict(model, state)
    assert later not in str(err.value)


def test_converter_round_trip_from_official_checkpoint():
    """{'model', 'ema', 'optimizer', 'step'} with 'module.' keys and the 'sigmas' buffer; the
    official EMA list holds the requires_grad parameters only (not the Fourier W)."""
    torch.manual_seed(0)
    source = compose.build_model(tiny_config())
    state = {"module." + k: v.clone() for k, v in source.state_dict().items()}
    state["module.sigmas"] = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), 1000))
    shadow = [p.detach() + 1.0 for p in source.parameters() if p.requires_grad]
    assert len(shadow) == len(source.state_dict()) - 1
    checkpoint = {"model": state, "ema": {"decay": 0.999, "num_updates": 7,
                                          "shadow_params": shadow},
                  "optimizer": {}, "step": 7}
    torch.manual_seed(1)
    target = compose.build_model(tiny_config())
    converted = models.convert_score_sde_state_dict(checkpoint)
    assert "sigmas" not in converted and not any(k.startswith("module.") for k in converted)
    models.load_state_dict_strict(target, converted)
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k
    models.load_state_dict_strict(target, models.convert_score_sde_state_dict(checkpoint,
                                                                             ema=True))
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        expected = a if k == "all_modules.0.W" else a + 1.0  # W: the model's own value
        assert torch.equal(expected, b), k
    checkpoint["ema"]["shadow_params"] = shadow[1:]
    with pytest.raises(ValueError, match="shadow_params"):
        models.convert_score_sde_state_dict(checkpoint, ema=True)


def test_bfloat16_autocast_close_to_float32():
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation); through
    ~20 layers with residual sums the relative RMS error measured 1.0%; allow 5%."""
    model = compose.build_model(tiny_config()).eval()
    fill_deterministic(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x, _cond(model, 2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, _cond(model, 2))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    print(f"bf16 autocast relative RMS error {rel:.4f}")
    assert rel < 0.05


def test_channels_last_matches_contiguous():
    model = compose.build_model(tiny_config(name="ncsnpp", resblock_type="ddpm",
                                           progressive="output_skip",
                                           progressive_input="input_skip")).eval()
    fill_deterministic(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x, _cond(model, 2))
        cl = model(x.to(memory_format=torch.channels_last), _cond(model, 2))
        model_cl = model.to(memory_format=torch.channels_last)
        both = model_cl(x.to(memory_format=torch.channels_last), _cond(model, 2))
    torch.testing.assert_close(cl, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(both, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """Slow: compiling took 275 s on the 2-core CPU test machine."""
    model = compose.build_model(tiny_config()).eval()
    fill_deterministic(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x, _cond(model, 2))
        start = time.perf_counter()
        out = torch.compile(model)(x, _cond(model, 2))
    print(f"torch.compile + first call {time.perf_counter() - start:.1f} s")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_registry_and_bad_configs():
    assert models.MODELS["ncsnpp"] is NCSNpp
    with pytest.raises(ValueError, match="resblock_type='resnet'.*'ddpm', 'biggan'"):
        compose.build_model(tiny_config(resblock_type="resnet"))
    with pytest.raises(ValueError, match="progressive_input='skip'"):
        compose.build_model(tiny_config(progressive_input="skip"))
    with pytest.raises(ValueError, match="divisible"):
        compose.build_model(tiny_config(image_size=10, ch_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="conv_size=5"):
        compose.build_model(tiny_config(conv_size=5))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
        compose.build_model(tiny_config())(torch.zeros(1, 3, 16, 16), torch.ones(1))
