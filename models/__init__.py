"""models: score networks and the wrapper that turns a network into score_fn(x, t).

    model = models.build_model(config)
    score_fn = models.get_score_fn(sde, model, continuous=True)
"""
from __future__ import annotations

from functools import partial

from .ema import ExponentialMovingAverage
from .embeddings import GaussianFourierProjection, sinusoidal_embedding
from .fir import (FIRConv2d, conv_downsample_2d, downsample_2d, setup_kernel, upfirdn2d,
                  upsample_2d, upsample_conv_2d)
from .mlp import MLPScoreNet
from .score import VP_TIME_SCALE, get_score_fn
from .ddpm import DDPM, convert_score_sde_state_dict, load_state_dict_strict
from .ncsn import NCSN, NCSNv2
from .normalization import ConditionalInstanceNorm2dPlus, InstanceNorm2dPlus
from .ncsnpp import NCSNpp

__all__ = ["MODELS", "build_model", "build_score_fn", "data_shape", "get_score_fn",
           "MLPScoreNet", "GaussianFourierProjection", "sinusoidal_embedding", "VP_TIME_SCALE",
           "upfirdn2d", "setup_kernel", "upsample_2d", "downsample_2d", "upsample_conv_2d",
           "conv_downsample_2d", "FIRConv2d", "ExponentialMovingAverage",
           "DDPM", "convert_score_sde_state_dict", "load_state_dict_strict", "NCSNpp",
           "NCSN", "NCSNv2", "InstanceNorm2dPlus", "ConditionalInstanceNorm2dPlus"]


def data_shape(config) -> tuple[int, ...]:
    """Shape of one sample: (dim,) for flat data (config.data.dim), else
    (num_channels, image_size, image_size)."""
    data = config.data
    if "dim" in data and data.dim:
        return (int(data.dim),)
    return (int(data.num_channels), int(data.image_size), int(data.image_size))


def _mlp_kwargs(config) -> dict:
    m = config.model
    return dict(data_shape=data_shape(config), hidden_dim=m.hidden_dim, num_blocks=m.num_blocks,
                embedding_type=m.embedding_type, embedding_dim=m.embedding_dim,
                fourier_scale=m.fourier_scale, num_classes=m.get("num_classes") or None)


def _ddpm_kwargs(config) -> dict:
    m, d = config.model, config.data
    return dict(nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                resamp_with_conv=m.resamp_with_conv, conditional=m.conditional,
                image_size=d.image_size, num_channels=d.num_channels,
                num_classes=m.get("num_classes") or None)


def _ncsnpp_kwargs(config) -> dict:
    """NCSN++ / DDPM++ from the official Score SDE config names (configs/*/cifar10_ncsnpp*)."""
    m, d = config.model, config.data
    return dict(nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                resamp_with_conv=m.resamp_with_conv, conditional=m.conditional, fir=m.fir,
                fir_kernel=tuple(m.fir_kernel), skip_rescale=m.skip_rescale,
                resblock_type=m.resblock_type, progressive=m.progressive,
                progressive_input=m.progressive_input,
                progressive_combine=m.progressive_combine,
                attention_type=m.get("attention_type", "ddpm"), init_scale=m.init_scale,
                embedding_type=m.embedding_type, fourier_scale=m.fourier_scale,
                conv_size=m.get("conv_size", 3), image_size=d.image_size,
                num_channels=d.num_channels, num_classes=m.get("num_classes") or None)


def _refinenet_kwargs(config) -> dict:
    """NCSN / NCSNv2 keywords, official Score SDE key names (configs/ve/ncsn*/...)."""
    m, d = config.model, config.data
    return dict(nf=m.nf, normalization=m.get("normalization", "InstanceNorm++"),
                nonlinearity=m.get("nonlinearity", "elu"),
                interpolation=m.get("interpolation", "bilinear"), image_size=d.image_size,
                num_channels=d.num_channels, num_classes=m.get("num_classes") or None)


def _ncsn_kwargs(config) -> dict:
    """The label embedding has one row per noise level: config.sde.num_scales."""
    return dict(_refinenet_kwargs(config), num_scales=int(config.sde.num_scales))


def _ncsnv2_kwargs(config, variant=None) -> dict:
    """variant: 'ncsnv2_64' / '_128' / '_256', or None to pick it from the image size."""
    return dict(_refinenet_kwargs(config), variant=variant or config.model.get("variant"))


#: config.model.name -> (network class, function config -> its keyword arguments).
MODELS = {
    "mlp": (MLPScoreNet, _mlp_kwargs),
    "ddpm": (DDPM, _ddpm_kwargs),
    "ncsnpp": (NCSNpp, _ncsnpp_kwargs),
    "ncsn": (NCSN, _ncsn_kwargs),
    "ncsnv2": (NCSNv2, _ncsnv2_kwargs),
    # the official registry's names, which fix the variant
    "ncsnv2_64": (NCSNv2, partial(_ncsnv2_kwargs, variant="ncsnv2_64")),
    "ncsnv2_128": (NCSNv2, partial(_ncsnv2_kwargs, variant="ncsnv2_128")),
    "ncsnv2_256": (NCSNv2, partial(_ncsnv2_kwargs, variant="ncsnv2_256")),
}


def build_model(config):
    """Build the network named by ``config.model.name`` from explicit keyword arguments."""
    name = str(config.model.get("name", ""))
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r} is not a known model; valid names: "
                         f"{', '.join(MODELS)}")
    cls, kwargs_of = MODELS[name]
    return cls(**kwargs_of(config))


def build_score_fn(config, sde, model):
    """``get_score_fn`` with config.training.continuous, config.model.scale_by_sigma and,
    for images kept in [0, 1] (config.data.centered False), center_input."""
    return get_score_fn(sde, model, continuous=config.training.get("continuous", True),
                        scale_by_sigma=bool(config.model.get("scale_by_sigma", False)),
                        center_input=not bool(config.data.get("centered", True)))
