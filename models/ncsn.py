"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020): RefineNets with dilated
convolutions, state-dict compatible with the Score SDE PyTorch code.

Parameter names, shapes and registration order follow yang-song/score_sde_pytorch
(``models/ncsnv2.py``: ``ncsn``, ``ncsnv2_64``, ``ncsnv2_128``, ``ncsnv2_256``;
``models/layers.py``; ``models/normalization.py``), so its checkpoints load with
``strict=True`` after ``models.convert_score_sde_state_dict`` and its EMA ``shadow_params``
list lines up with ``model.parameters()``. At the CIFAR-10 settings (nf=128, 3 channels,
32x32; NCSN with 10 noise levels) the parameter counts are NCSN 30,117,635 and NCSNv2
29,694,083 (NCSNv2 at 128 px: 83,445,379; at 256 px: 94,132,611). With the same weights the
outputs agree with (a minimally fixed build of) that code to float rounding (tests/test_ncsn.py).

Architecture (NCSN / NCSNv2 at < 96 px): a 3x3 conv to nf channels; four stages of two residual
blocks (nf, 2 nf with one 2x2 mean-pool downsampling, 2 nf with dilation 2, 2 nf with dilation
4); four RefineNet blocks going back up (residual conv units, multi-resolution fusion by
interpolation, chained residual pooling); norm, activation, 3x3 conv to the image channels.
NCSN conditions every norm on the noise-level label (``ConditionalInstanceNorm2dPlus`` with one
embedding row per level; average pooling in the RefineNet); NCSNv2 uses unconditional
``InstanceNorm2dPlus`` (max pooling) and relies on the score wrapper to divide by sigma.

Differences from that code, on purpose:

* The official PyTorch ``ncsnv2.py`` does not build as shipped: it reads
  ``config.data.channels`` (the configs say ``num_channels``); ``ncsn_conv3x3(bias=False)``
  touches a missing bias; ``ConditionalResidualBlock`` compares its default ``dilation=None``
  with 1; NCSN asks for the unconditional norm; and dilated 3x3 convs keep ``padding=1``, so a
  dilated block shrinks the feature map and its residual sum fails. Here a dilated conv pads by
  its dilation ('SAME', as in the JAX Score SDE code and the NCSNv2 repository) and NCSN uses
  the conditional norm with ``num_scales`` rows. None of this changes a parameter shape.
* No data rescaling in ``forward`` (the official code computes ``2 x - 1`` for uncentered
  data; here ``models.get_score_fn(..., center_input=True)`` does), and NCSNv2 neither holds a
  ``sigmas`` buffer nor divides by ``sigmas[label]``: ``get_score_fn(..., scale_by_sigma=True)``
  owns that division. The converter drops the buffer.
* 2x2 mean pooling is ``avg_pool2d`` (the official code sums four strided slices): the same
  numbers up to float rounding.
* A "down" block with dilation > 1 does not downsample (the official behaviour once its convs
  keep the size): only undilated "down" blocks halve the map, so inputs must have sides
  divisible by 2 (NCSN, NCSNv2 < 96 px), 4 (128 px) or 8 (256 px), and at least twice that.
  The smallest input of NCSN / NCSNv2-64 is 4x4; 8x8 works.
* ``adjust_padding`` (28 px) is not implemented: the official code passes it only to dilated
  blocks, which ignore it. A channel-changing block without resampling (never built by the
  official networks) gets a 1x1 conv shortcut.
* Optional ``num_classes``: a ``class_embedding`` (nn.Embedding(num_classes, nf), default
  N(0, 1) init) whose row is added per channel to the first conv's output. It lives outside the
  official names; with ``num_classes=None`` nothing is added.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from sde_lib import check_choice
from torch.nn import functional as F

from .layers import CheckpointBlock, set_checkpointing
from .normalization import ConditionalInstanceNorm2dPlus, InstanceNorm2dPlus

__all__ = ["NCSN", "NCSNv2", "NCSNV2_VARIANTS", "ncsnv2_variant"]

#: config.model.nonlinearity -> activation (names of the Score SDE configs).
ACTIVATIONS = {"elu": F.elu, "relu": F.relu, "lrelu": partial(F.leaky_relu, negative_slope=0.2),
               "swish": F.silu}
NORMALIZATIONS = ("InstanceNorm++",)
INTERPOLATIONS = ("bilinear", "nearest")

Norm = Callable[[int], nn.Module]  # channels -> a norm module called as norm(x, y)


# --------------------------------------------------------------------------- layers

def _conv3x3(in_ch: int, out_ch: int, *, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """``ncsn_conv3x3``: 3x3 conv keeping the size (padding = dilation), PyTorch's default init."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
    """A size-keeping conv (``conv``), then 2x2 mean pooling:
    (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(x), kernel_size=2)


class ResidualBlock(CheckpointBlock):
    """norm-act-conv-norm-act-conv plus a shortcut (``ResidualBlock`` /
    ``ConditionalResidualBlock``; the same layout, the norm decides).

    ``resample="down"`` halves the map by ConvMeanPool when ``dilation == 1``; with dilation > 1
    it keeps the size (dilated convs throughout, dilated 3x3 shortcut). Registration order is
    the official one: conv1, normalize2, conv2, shortcut, normalize1.
    """

    def __init__(self, in_ch: int, out_ch: int, *, norm: Norm, act: Callable,
                 resample: str | None = None, dilation: int = 1):
        super().__init__()
        if resample not in (None, "down"):
            raise ValueError(f"resample={resample!r} is not supported; use None or 'down'")
        mid = in_ch if resample == "down" else out_ch
        self.conv1 = _conv3x3(in_ch, mid, dilation=dilation)
        self.normalize2 = norm(mid)
        if resample == "down" and dilation == 1:
            self.conv2 = ConvMeanPool(in_ch, out_ch, 3)
            self.shortcut = ConvMeanPool(in_ch, out_ch, 1)
        else:
            self.conv2 = _conv3x3(mid, out_ch, dilation=dilation)
            if resample == "down" or (in_ch != out_ch and dilation > 1):
                self.shortcut = _conv3x3(in_ch, out_ch, dilation=dilation)
            elif in_ch != out_ch:
                self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        self.normalize1 = norm(in_ch)
        self.act = act
        self.identity = in_ch == out_ch and resample is None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self._checkpointed(x, y)

    def _forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(self.act(self.normalize1(x, y)))
        h = self.conv2(self.act(self.normalize2(h, y)))
        return h + (x if self.identity else self.shortcut(x))


class RCUBlock(nn.Module):
    """Residual conv units (RefineNet): n_blocks times x + [(norm)-act-conv] * n_stages.
    Submodules ``{i}_{j}_norm`` (only with a norm) and ``{i}_{j}_conv`` (3x3, no bias)."""

    def __init__(self, features: int, n_blocks: int, n_stages: int, *, act: Callable,
                 norm: Norm | None = None):
        super().__init__()
        self.n_blocks, self.n_stages, self.act = n_blocks, n_stages, act
        self.has_norm = norm is not None
        for i in range(1, n_blocks + 1):
            for j in range(1, n_stages + 1):
                if norm is not None:
                    self.add_module(f"{i}_{j}_norm", norm(features))
                self.add_module(f"{i}_{j}_conv", _conv3x3(features, features, bias=False))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        for i in range(1, self.n_blocks + 1):
            h = x
            for j in range(1, self.n_stages + 1):
                if self.has_norm:
                    h = getattr(self, f"{i}_{j}_norm")(h, y)
                h = getattr(self, f"{i}_{j}_conv")(self.act(h))
            x = h + x
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling: x = act(x); path = x; n_stages times
    path = conv(pool5x5((norm) path)), x = x + path. ``convs`` (3x3, no bias), ``norms``."""

    def __init__(self, features: int, n_stages: int, *, act: Callable, norm: Norm | None = None,
                 pool: str = "max"):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool={pool!r} is not supported; use 'max' or 'avg'")
        self.convs = nn.ModuleList(_conv3x3(features, features, bias=False)
                                   for _ in range(n_stages))
        if norm is not None:
            self.norms = nn.ModuleList(norm(features) for _ in range(n_stages))
        self.has_norm = norm is not None
        self.pool = F.max_pool2d if pool == "max" else F.avg_pool2d
        self.act = act

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        x = self.act(x)
        path = x
        for i, conv in enumerate(self.convs):
            if self.has_norm:
                path = self.norms[i](path, y)
            path = conv(self.pool(path, kernel_size=5, stride=1, padding=2))
            x = path + x
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: sum over inputs of interpolate(conv3x3((norm) x_i), size)."""

    def __init__(self, in_planes, features: int, *, norm: Norm | None = None,
                 interpolation: str = "bilinear"):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(c, features) for c in in_planes)
        if norm is not None:
            self.norms = nn.ModuleList(norm(c) for c in in_planes)
        self.has_norm = norm is not None
        self.interpolation = interpolation

    def forward(self, xs, y: torch.Tensor | None, size) -> torch.Tensor:
        total = 0
        for i, (x, conv) in enumerate(zip(xs, self.convs)):
            h = conv(self.norms[i](x, y) if self.has_norm else x)
            if tuple(h.shape[2:]) != tuple(size):
                align = True if self.interpolation == "bilinear" else None
                h = F.interpolate(h, size=tuple(size), mode=self.interpolation,
                                  align_corners=align)
            total = total + h
        return total


class RefineBlock(CheckpointBlock):
    """RefineNet block (``RefineBlock`` / ``CondRefineBlock``): RCU (2 x 2) on each input,
    multi-resolution fusion to ``size`` when there are two inputs, chained residual pooling,
    output RCU (3 blocks for the last refine block, else 1)."""

    def __init__(self, in_planes, features: int, *, act: Callable, norm: Norm | None = None,
                 pool: str = "max", interpolation: str = "bilinear", end: bool = False):
        super().__init__()
        self.adapt_convs = nn.ModuleList(RCUBlock(c, 2, 2, act=act, norm=norm)
                                         for c in in_planes)
        self.output_convs = RCUBlock(features, 3 if end else 1, 2, act=act, norm=norm)
        if len(in_planes) > 1:
            self.msf = MSFBlock(in_planes, features, norm=norm, interpolation=interpolation)
        self.crp = CRPBlock(features, 2, act=act, norm=norm, pool=pool)

    def forward(self, xs, y: torch.Tensor | None, size) -> torch.Tensor:
        return self._checkpointed(xs, y, size)

    def _forward(self, xs, y: torch.Tensor | None, size) -> torch.Tensor:
        hs = [adapt(x, y) for adapt, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, y, size) if len(hs) > 1 else hs[0]
        return self.output_convs(self.crp(h, y), y)


# --------------------------------------------------------------------------- architectures

@dataclass(frozen=True)
class _Arch:
    """stages: (name, channel multiplier, resample, dilation) in call order, two residual blocks
    each; refines: (refine block name, the stage it starts from) in registration order."""
    stages: tuple
    refines: tuple

    @property
    def downsampling(self) -> int:
        """Total downsampling factor: 2 per undilated 'down' stage."""
        return 2 ** sum(1 for _, _, resample, dilation in self.stages
                        if resample == "down" and dilation == 1)


#: The official RefineNet variants (names of the Score SDE model registry).
NCSNV2_VARIANTS = {
    "ncsnv2_64": _Arch(
        stages=(("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 2),
                ("res4", 2, "down", 4)),
        refines=(("refine1", "res4"), ("refine2", "res3"), ("refine3", "res2"),
                 ("refine4", "res1"))),
    "ncsnv2_128": _Arch(
        stages=(("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 1),
                ("res4", 4, "down", 2), ("res5", 4, "down", 4)),
        refines=(("refine1", "res5"), ("refine2", "res4"), ("refine3", "res3"),
                 ("refine4", "res2"), ("refine5", "res1"))),
    "ncsnv2_256": _Arch(
        stages=(("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 1),
                ("res31", 2, "down", 1), ("res4", 4, "down", 2), ("res5", 4, "down", 4)),
        refines=(("refine1", "res5"), ("refine2", "res4"), ("refine3", "res3"),
                 ("refine31", "res31"), ("refine4", "res2"), ("refine5", "res1"))),
}


def ncsnv2_variant(image_size: int) -> str:
    """The NCSNv2 variant the Score SDE code picks for an image size (its ``get_network``)."""
    if image_size < 96:
        return "ncsnv2_64"
    if image_size <= 128:
        return "ncsnv2_128"
    if image_size <= 256:
        return "ncsnv2_256"
    raise ValueError(f"image_size={image_size} has no NCSNv2 variant; use at most 256")


class _RefineNet(nn.Module):
    """The body shared by NCSN and NCSNv2; subclasses pick the norms (``norm`` in the residual
    blocks and the output, ``refine_norm`` inside the RefineNet blocks or None), the pooling
    and what the conditioning does. ``checkpointing``: activation checkpointing of the
    residual and RefineNet blocks while training with gradients (models/layers.py)."""

    def __init__(self, *, arch: str, nf: int, image_size: int, num_channels: int, norm: Norm,
                 refine_norm: Norm | None, pool: str, nonlinearity: str, interpolation: str,
                 num_classes: int | None, checkpointing: bool = False):
        super().__init__()
        check_choice("nonlinearity", nonlinearity.lower(), ACTIVATIONS)
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        spec = NCSNV2_VARIANTS[arch]
        self.nf, self.image_size, self.num_channels = nf, image_size, num_channels
        self.arch, self.downsampling = arch, spec.downsampling
        self.act = act = ACTIVATIONS[nonlinearity.lower()]
        self.begin_conv = nn.Conv2d(num_channels, nf, 3, padding=1)
        self.normalizer = norm(nf)
        self.end_conv = nn.Conv2d(nf, num_channels, 3, padding=1)
        channels, in_ch = {}, nf
        for name, mult, resample, dilation in spec.stages:
            out_ch = mult * nf
            self.add_module(name, nn.ModuleList([
                ResidualBlock(in_ch, out_ch, norm=norm, act=act, resample=resample,
                              dilation=dilation),
                ResidualBlock(out_ch, out_ch, norm=norm, act=act, dilation=dilation)]))
            channels[name], in_ch = out_ch, out_ch
        stage_names = [s[0] for s in spec.stages]
        for refine_name, stage in spec.refines:
            k = stage_names.index(stage)
            in_planes = [channels[stage]] * (1 if k == len(stage_names) - 1 else 2)
            features = channels[stage_names[k - 1]] if k > 0 else nf
            self.add_module(refine_name, RefineBlock(
                in_planes, features, act=act, norm=refine_norm, pool=pool,
                interpolation=interpolation, end=k == 0))
        self.stage_names = tuple(stage_names)
        self.refine_of = {stage: name for name, stage in spec.refines}
        self.class_embedding = nn.Embedding(num_classes, nf) if num_classes else None
        self.checkpointing = bool(checkpointing)
        set_checkpointing(self, self.checkpointing)

    def _check_input(self, x: torch.Tensor, cond: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.num_channels}, "
                             f"H, W), got {tuple(x.shape)}")
        f = self.downsampling
        if any(s % f or s < 2 * f for s in x.shape[2:]):
            raise ValueError(f"{type(self).__name__} ({self.arch}) needs H and W divisible by "
                             f"{f} and at least {2 * f}, got {tuple(x.shape[2:])}")
        if cond.shape != (x.shape[0],):
            raise ValueError(f"cond must have shape (B,) = ({x.shape[0]},), got "
                             f"{tuple(cond.shape)}")

    def _class_shift(self, class_labels: torch.Tensor | None) -> torch.Tensor | None:
        """(B, nf, 1, 1) per-channel shift from the class embedding, or None."""
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError(f"class_labels given to a {type(self).__name__} built without "
                                 f"num_classes")
            return None
        if class_labels is None:
            raise ValueError(f"this {type(self).__name__} is class-conditional: pass "
                             f"class_labels (B,) long")
        return self.class_embedding(class_labels).unsqueeze(-1).unsqueeze(-1)

    def _run(self, x: torch.Tensor, y: torch.Tensor | None,
             class_labels: torch.Tensor | None) -> torch.Tensor:
        shift = self._class_shift(class_labels)
        h = self.begin_conv(x)
        if shift is not None:
            h = h + shift.to(h.dtype)
        layers = {}
        for name in self.stage_names:
            for block in getattr(self, name):
                h = block(h, y)
            layers[name] = h
        ref = None
        for name in reversed(self.stage_names):
            xs = [layers[name]] if ref is None else [layers[name], ref]
            ref = getattr(self, self.refine_of[name])(xs, y, layers[name].shape[2:])
        return self.end_conv(self.act(self.normalizer(ref, y)))


class NCSN(_RefineNet):
    """NCSN (Song & Ermon 2019): RefineNet conditioned on the noise-level label through
    conditional InstanceNorm++ in every block; outputs the score at that level.

    Args:
        nf: base channel count (128 for CIFAR-10).
        num_scales: number of noise levels L (rows of every norm's embedding; 10 for CIFAR-10).
        normalization: 'InstanceNorm++' (the only one the official NCSN uses).
        nonlinearity: 'elu' (official), 'relu', 'lrelu' (slope 0.2) or 'swish'.
        interpolation: multi-resolution fusion upsampling, 'bilinear' (align_corners=True, as
            the official code) or 'nearest'.
        image_size: training image side (the network itself is fully convolutional).
        num_channels: image channels.
        num_classes: optional class conditioning (see the module docstring).
        checkpointing: activation checkpointing of the residual and RefineNet blocks while
            training with gradients (recomputed in the backward pass; models/layers.py).
    """

    def __init__(self, *, nf: int = 128, num_scales: int = 10,
                 normalization: str = "InstanceNorm++", nonlinearity: str = "elu",
                 interpolation: str = "bilinear", image_size: int = 32, num_channels: int = 3,
                 num_classes: int | None = None, checkpointing: bool = False):
        check_choice("normalization", normalization, NORMALIZATIONS)
        if num_scales < 1:
            raise ValueError(f"num_scales={num_scales} must be at least 1")
        norm = partial(ConditionalInstanceNorm2dPlus, num_classes=num_scales)
        super().__init__(arch="ncsnv2_64", nf=nf, image_size=image_size,
                         num_channels=num_channels, norm=norm, refine_norm=norm, pool="avg",
                         nonlinearity=nonlinearity, interpolation=interpolation,
                         num_classes=num_classes, checkpointing=checkpointing)
        self.num_scales = num_scales

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) (data as the score wrapper hands it, no rescaling here); cond: (B,)
        long noise-level labels in [0, num_scales), 0 = the largest sigma; class_labels: (B,)
        long, required iff built with num_classes. Returns the score estimate, (B, C, H, W)."""
        self._check_input(x, cond)
        if cond.is_floating_point() or cond.is_complex():
            raise ValueError(f"NCSN is conditioned on integer noise-level labels, got cond of "
                             f"dtype {cond.dtype}; use get_score_fn(sde, model, "
                             f"continuous=False) with a VESDE")
        return self._run(x, cond.long(), class_labels)


class NCSNv2(_RefineNet):
    """NCSNv2 (Song & Ermon 2020): unconditional RefineNet with InstanceNorm++; its output is the
    score times sigma (train and sample it with ``scale_by_sigma=True``, which divides by sigma).

    Args:
        nf: base channel count (128 for CIFAR-10).
        normalization, nonlinearity, interpolation, num_channels, num_classes,
            checkpointing: as for ``NCSN``.
        image_size: picks the variant when ``variant`` is None, as the official code does
            (< 96: 'ncsnv2_64', <= 128: 'ncsnv2_128', <= 256: 'ncsnv2_256').
        variant: one of ``NCSNV2_VARIANTS``, or None.
    """

    def __init__(self, *, nf: int = 128, normalization: str = "InstanceNorm++",
                 nonlinearity: str = "elu", interpolation: str = "bilinear",
                 image_size: int = 32, num_channels: int = 3, num_classes: int | None = None,
                 variant: str | None = None, checkpointing: bool = False):
        check_choice("normalization", normalization, NORMALIZATIONS)
        variant = variant or ncsnv2_variant(image_size)
        check_choice("variant", variant, NCSNV2_VARIANTS)
        super().__init__(arch=variant, nf=nf, image_size=image_size, num_channels=num_channels,
                         norm=InstanceNorm2dPlus, refine_norm=None, pool="max",
                         nonlinearity=nonlinearity,
                         interpolation=interpolation, num_classes=num_classes,
                         checkpointing=checkpointing)

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); cond: (B,) noise label or sigma, accepted for the common signature
        and not used (NCSNv2 is unconditional); class_labels as for ``NCSN``. Returns
        sigma * score, (B, C, H, W): the wrapper divides by sigma."""
        self._check_input(x, cond)
        return self._run(x, None, class_labels)
