"""Layers shared by the DDPM U-Net (models/ddpm.py) and NCSN++ / DDPM++ (models/ncsnpp.py).

They follow the PyTorch Score SDE code (yang-song/score_sde_pytorch, ``models/layers.py`` and
``models/layerspp.py``): parameter names, shapes, registration order and initialisation are
the official ones, so its checkpoints load with ``strict=True``. Two differences, on purpose:

* GroupNorm uses 32 groups as in DDPM whenever C is a multiple of 32 and at least 64 (always,
  for the official configs); otherwise (tiny test configs, where 32 groups would not divide C
  or would leave one channel per group) the largest divisor of C with at least four channels
  per group (``ddpm_num_groups``); NCSN++ passes its own rule. GroupNorm parameter shapes do
  not depend on the group count.
* Attention uses ``scaled_dot_product_attention`` (same math as the einsum version).

Activation checkpointing (``checkpointing=True`` of DDPM, NCSN++ and the RefineNets):
the residual and attention blocks derive from ``CheckpointBlock``; with ``checkpointing``
set, in training mode and with gradients enabled, a block keeps only its inputs and runs its
forward again during the backward pass (``torch.utils.checkpoint``, non-reentrant, RNG state
preserved: the recomputed dropout masks are the first pass's). Elsewhere (evaluation,
sampling, ``torch.no_grad``) the forward is the plain one.

Both U-Nets keep all their modules, in call order, in one flat ``nn.ModuleList``; the
``*_level`` functions at the end walk the parts of that list that the two networks share.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .fir import DEFAULT_KERNEL, FIRConv2d, downsample_2d, upsample_2d

__all__ = ["CheckpointBlock", "set_checkpointing", "variance_scaling_", "ddpm_conv3x3", "ddpm_conv1x1", "dense", "ddpm_num_groups",
           "group_norm", "skip_sum", "fir_conv3x3", "NIN", "AttnBlock", "Upsample", "Downsample",
           "ResidualBranch", "ResnetBlockDDPM", "down_level_modules", "up_level_modules",
           "down_level", "middle_blocks", "up_level"]


# --------------------------------------------------------------------------- initialisation

def variance_scaling_(tensor: torch.Tensor, scale: float = 1.0, *, in_axis: int = 1,
                      out_axis: int = 0) -> torch.Tensor:
    """In-place ``variance_scaling(scale, 'fan_avg', 'uniform')`` (JAX / DDPM ``default_init``):
    U(-a, a) with a = sqrt(3 scale / fan_avg), fan_avg = (fan_in + fan_out) / 2, where the fans
    are taken along ``in_axis`` / ``out_axis`` times the receptive field. ``scale=0`` means 1e-10
    (as in DDPM: tiny, not exactly zero)."""
    scale = 1e-10 if scale == 0 else scale
    shape = tensor.shape
    receptive = math.prod(shape) / shape[in_axis] / shape[out_axis]
    fan_avg = (shape[in_axis] + shape[out_axis]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def ddpm_conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, padding: int = 1,
             init_scale: float = 1.0) -> nn.Conv2d:
    """``ddpm_conv3x3``: 3x3 conv, variance-scaling weights, zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def ddpm_conv1x1(in_ch: int, out_ch: int, *, init_scale: float = 1.0) -> nn.Conv2d:
    """``ddpm_conv1x1``: 1x1 conv, variance-scaling weights, zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def dense(in_dim: int, out_dim: int) -> nn.Linear:
    """``nn.Linear`` with variance-scaling weights and zero bias (the official ``default_init``)."""
    layer = nn.Linear(in_dim, out_dim)
    variance_scaling_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def ddpm_num_groups(channels: int) -> int:
    """32, as in DDPM, when that leaves at least two channels per group (every official config);
    else (tiny test configs) the largest divisor of C with at least four channels per group.
    One channel per group would normalise away the per-channel time-embedding bias."""
    if channels % 32 == 0 and channels >= 64:
        return 32
    groups = max(1, channels // 4)
    while channels % groups:
        groups -= 1
    return groups


def group_norm(channels: int, group_rule=None) -> nn.GroupNorm:
    """GroupNorm(eps=1e-6) with ``group_rule(C)`` groups (default ``ddpm_num_groups``)."""
    groups = (group_rule or ddpm_num_groups)(channels)
    if groups < 1 or channels % groups:
        raise ValueError(f"GroupNorm over {channels} channels cannot use {groups} groups; "
                         f"choose channel counts (nf * ch_mult) divisible by 4")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


def skip_sum(x: torch.Tensor, h: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    """x + h, divided by sqrt(2) with ``skip_rescale`` (NCSN++, Song et al. 2021, App. H)."""
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


# --------------------------------------------------------------------------- checkpointing

class CheckpointBlock(nn.Module):
    """A block whose forward may run under activation checkpointing: subclasses implement
    ``_forward`` and call ``self._checkpointed(*inputs)`` from ``forward``. The flag
    ``checkpointing`` (default False) is set by ``set_checkpointing``."""

    checkpointing: bool = False

    def _checkpointed(self, *inputs):
        """``self._forward(*inputs)``; under torch.utils.checkpoint (use_reentrant=False,
        the RNG state preserved for dropout) when ``checkpointing`` is set, the block is in
        training mode and gradients are enabled."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *inputs, use_reentrant=False)
        return self._forward(*inputs)


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of every ``CheckpointBlock`` in ``model`` on or off."""
    for module in model.modules():
        if isinstance(module, CheckpointBlock):
            module.checkpointing = bool(enabled)


# --------------------------------------------------------------------------- layers

class NIN(nn.Module):
    """Per-pixel dense layer ("network in network"): y[b, :, h, w] = x[b, :, h, w] @ W + b.
    Parameters ``W`` (in, out) and ``b`` (out,) as in the Score SDE code."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(variance_scaling_(torch.empty(in_dim, out_dim), init_scale))
        self.b = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttnBlock(CheckpointBlock):
    """Single-head self-attention over all pixels, residual; the output NIN starts near zero
    (variance scale ``init_scale``, 0 = 1e-10). ``skip_rescale`` divides the sum by sqrt(2)
    and ``group_rule`` picks the GroupNorm groups (NCSN++'s ``AttnBlockpp`` options)."""

    def __init__(self, channels: int, *, skip_rescale: bool = False, init_scale: float = 0.0,
                 group_rule=None):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels, group_rule)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._checkpointed(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (nin(h).reshape(B, C, H * W).transpose(1, 2)
                   for nin in (self.NIN_0, self.NIN_1, self.NIN_2))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return skip_sum(x, self.NIN_3(h), self.skip_rescale)


def fir_conv3x3(in_ch: int, out_ch: int, *, up: bool, fir_kernel) -> FIRConv2d:
    """3x3 ``FIRConv2d`` (fused FIR resampling) with variance-scaling weights, zero bias."""
    conv = FIRConv2d(in_ch, out_ch, 3, up=up, down=not up, resample_kernel=fir_kernel)
    variance_scaling_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _Resample(nn.Module):
    """What Upsample and Downsample share: the learned conv (``Conv2d_0``, a 3x3 conv fused with
    FIR resampling, with ``fir``; else a 3x3 ``Conv_0``, stride 2 going down) when
    ``with_conv``, and the rule that only a conv may change the channel count."""

    #: True for Upsample, False for Downsample.
    up: bool

    def __init__(self, channels: int, with_conv: bool = False, *, out_ch: int | None = None,
                 fir: bool = False, fir_kernel=DEFAULT_KERNEL):
        super().__init__()
        out_ch = out_ch or channels
        if with_conv and fir:
            self.Conv2d_0 = fir_conv3x3(channels, out_ch, up=self.up, fir_kernel=fir_kernel)
        elif with_conv:
            self.Conv_0 = (ddpm_conv3x3(channels, out_ch) if self.up
                           else ddpm_conv3x3(channels, out_ch, stride=2, padding=0))
        elif out_ch != channels:
            raise ValueError(f"{type(self).__name__} without a conv cannot change {channels} "
                             f"channels to {out_ch}; set with_conv=True")
        self.with_conv, self.fir, self.fir_kernel = with_conv, fir, tuple(fir_kernel)


class Upsample(_Resample):
    """(B, C, H, W) -> (B, out_ch, 2 H, 2 W).

    Without ``fir``: nearest-neighbour x2, then a 3x3 conv (``Conv_0``) if ``with_conv``.
    With ``fir`` (NCSN++): FIR upsampling with ``fir_kernel``, fused with a 3x3 conv
    (``Conv2d_0``) if ``with_conv``. ``out_ch`` (default C) needs ``with_conv``.
    """

    up = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else upsample_2d(x, self.fir_kernel)
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(_Resample):
    """(B, C, H, W) -> (B, out_ch, H / 2, W / 2).

    Without ``fir``: a stride-2 3x3 conv (``Conv_0``) with TensorFlow 'SAME' padding (pad
    right/bottom by one), or 2x2 average pooling without ``with_conv``. With ``fir``
    (NCSN++): a 3x3 conv fused with FIR downsampling (``Conv2d_0``), or FIR downsampling alone.
    ``out_ch`` (default C) needs ``with_conv``.
    """

    up = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else downsample_2d(x, self.fir_kernel)
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResidualBranch(CheckpointBlock):
    """The layers shared by the DDPM and BigGAN residual blocks, registered in the official
    order (GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Dropout_0, Conv_1): the first
    GroupNorm-SiLU and conv, the time embedding added per channel, and the second
    GroupNorm-SiLU-dropout-conv (initialised near zero: variance scale ``init_scale``,
    0 = 1e-10). Subclasses add their shortcut and call ``_add_temb_and_finish``."""

    def _build_branch(self, in_ch: int, out_ch: int, temb_dim: int | None, dropout: float,
                      init_scale: float, group_rule) -> None:
        self.GroupNorm_0 = group_norm(in_ch, group_rule)
        self.Conv_0 = ddpm_conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch, group_rule)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = ddpm_conv3x3(out_ch, out_ch, init_scale=init_scale)

    def _add_temb_and_finish(self, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """h (B, out_ch, H, W) after Conv_0 -> the branch's output."""
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        return self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))


class ResnetBlockDDPM(ResidualBranch):
    """GroupNorm-SiLU-conv, + Dense(SiLU(temb)) per channel, GroupNorm-SiLU-dropout-conv (init
    near zero: variance scale ``init_scale``, 0 = 1e-10), plus the input (through a NIN when
    the channel count changes). ``skip_rescale`` divides the sum by sqrt(2) and ``group_rule``
    picks the GroupNorm groups (NCSN++'s ``ResnetBlockDDPMpp`` options)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, temb_dim: int | None = None,
                 dropout: float = 0.1, skip_rescale: bool = False, init_scale: float = 0.0,
                 group_rule=None):
        super().__init__()
        out_ch = out_ch or in_ch
        self._build_branch(in_ch, out_ch, temb_dim, dropout, init_scale, group_rule)
        if in_ch != out_ch:
            self.NIN_0 = NIN(in_ch, out_ch)
        self.in_ch, self.out_ch, self.skip_rescale = in_ch, out_ch, skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self._checkpointed(x, temb)

    def _forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self._add_temb_and_finish(self.Conv_0(F.silu(self.GroupNorm_0(x))), temb)
        if self.in_ch != self.out_ch:
            x = self.NIN_0(x)
        return skip_sum(x, h, self.skip_rescale)


# --------------------------------------------------------------------------- the U-Net levels
# DDPM (Ho et al. 2020, App. B; official models/ddpm.py) and NCSN++ (official ncsnpp.py) build
# and walk the residual blocks of each resolution alike. The *_modules functions return the
# modules in call order; in the walks, ``mods`` is an iterator over ``all_modules`` positioned
# at the step's first module.

def down_level_modules(resnet, attn, in_ch: int, out_ch: int, num_res_blocks: int,
                       with_attn: bool) -> tuple[list[nn.Module], list[int]]:
    """The modules that ``down_level`` calls for one resolution, and the channel count of each
    skip connection it appends. ``resnet(in_ch, out_ch)`` and ``attn(ch)`` build the blocks."""
    modules: list[nn.Module] = []
    for _ in range(num_res_blocks):
        modules.append(resnet(in_ch, out_ch))
        in_ch = out_ch
        if with_attn:
            modules.append(attn(out_ch))
    return modules, [out_ch] * num_res_blocks


def up_level_modules(resnet, attn, in_ch: int, out_ch: int, skip_ch: list[int],
                     num_res_blocks: int, with_attn: bool) -> list[nn.Module]:
    """The modules that ``up_level`` calls for one resolution; pops the channel counts of the
    skip connections it consumes from ``skip_ch``."""
    modules: list[nn.Module] = []
    for _ in range(num_res_blocks + 1):
        modules.append(resnet(in_ch + skip_ch.pop(), out_ch))
        in_ch = out_ch
    if with_attn:
        modules.append(attn(out_ch))
    return modules


def down_level(mods: Iterator[nn.Module], hs: list[torch.Tensor], temb: torch.Tensor | None,
               num_res_blocks: int, attn_resolutions) -> None:
    """The residual blocks of one resolution on the way down: each takes hs[-1] (B, C, H, W)
    and temb (B, 4 nf) and is followed by attention when H is in ``attn_resolutions``; every
    output is appended to ``hs`` (the skip connections)."""
    for _ in range(num_res_blocks):
        h = next(mods)(hs[-1], temb)
        if h.shape[-1] in attn_resolutions:
            h = next(mods)(h)
        hs.append(h)


def middle_blocks(mods: Iterator[nn.Module], h: torch.Tensor,
                  temb: torch.Tensor | None) -> torch.Tensor:
    """The bottom of the U-Net: residual block, attention, residual block; shape kept."""
    h = next(mods)(h, temb)
    h = next(mods)(h)
    return next(mods)(h, temb)


def up_level(mods: Iterator[nn.Module], h: torch.Tensor, hs: list[torch.Tensor],
             temb: torch.Tensor | None, num_res_blocks: int, attn_resolutions) -> torch.Tensor:
    """The residual blocks of one resolution on the way up: num_res_blocks + 1 blocks, each on
    h concatenated with the last skip popped from ``hs``, then attention when H is in
    ``attn_resolutions``. Returns (B, C_level, H, W); resampling is the caller's."""
    for _ in range(num_res_blocks + 1):
        h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
    if h.shape[-1] in attn_resolutions:
        h = next(mods)(h)
    return h
