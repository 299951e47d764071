"""The DDPM U-Net (Ho et al. 2020, App. B), state-dict compatible with the Score SDE code.

Parameter names, shapes, registration order and initialisation follow the PyTorch Score SDE
implementation (yang-song/score_sde_pytorch, ``models/ddpm.py`` + ``models/layers.py``), so that
its checkpoints load with ``strict=True`` after ``convert_score_sde_state_dict`` and its EMA
``shadow_params`` list lines up with ``model.parameters()``. With the CIFAR-10 settings
(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)) it has 35,218,947
parameters.

Differences from that code, on purpose:

* No data rescaling in ``forward``: the official model computes ``2 x - 1`` when
  ``config.data.centered`` is False. Here the data pipeline hands the network data in [-1, 1]
  (the official DDPM CIFAR-10 config sets ``centered=True``, so nothing changes there).
* No ``sigmas`` buffer (a VE noise table the VP model never uses with ``scale_by_sigma=False``;
  noise scalings belong to ``models.get_score_fn``). The converter drops it.
* ``conditional=False`` works (the official constructor fails on it) and has no time MLP and
  no per-block ``Dense_0``; module indices then shift by two, so such a model is not
  checkpoint compatible with anything official.
* ``num_classes`` adds one ``class_embedding`` (nn.Embedding, 4 nf wide) outside
  ``all_modules``; the official names are unchanged and, with ``num_classes=None``, no
  parameter is added.
* GroupNorm uses 32 groups as in DDPM whenever C is a multiple of 32 and at least 64 (always,
  for the official configs); otherwise (tiny test configs, where 32 groups would not divide C
  or would leave one channel per group) the largest divisor of C with at least four channels
  per group. GroupNorm parameter shapes do not depend on the group count.
* Attention uses ``scaled_dot_product_attention`` (same math as the einsum version).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .embeddings import sinusoidal_embedding
from .fir import DEFAULT_KERNEL, FIRConv2d, downsample_2d, upsample_2d

__all__ = ["DDPM", "variance_scaling_", "convert_score_sde_state_dict", "load_state_dict_strict"]


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


def _conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, padding: int = 1,
             init_scale: float = 1.0) -> nn.Conv2d:
    """``ddpm_conv3x3``: 3x3 conv, variance-scaling weights, zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _conv1x1(in_ch: int, out_ch: int, *, init_scale: float = 1.0) -> nn.Conv2d:
    """``ddpm_conv1x1``: 1x1 conv, variance-scaling weights, zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _dense(in_dim: int, out_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    variance_scaling_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _num_groups(channels: int) -> int:
    """32, as in DDPM, when that leaves at least two channels per group (every official config);
    else (tiny test configs) the largest divisor of C with at least four channels per group.
    One channel per group would normalise away the per-channel time-embedding bias."""
    if channels % 32 == 0 and channels >= 64:
        return 32
    groups = max(1, channels // 4)
    while channels % groups:
        groups -= 1
    return groups


def _group_norm(channels: int, group_rule=None) -> nn.GroupNorm:
    """GroupNorm(eps=1e-6) with ``group_rule(C)`` groups (default ``_num_groups``)."""
    groups = (group_rule or _num_groups)(channels)
    if groups < 1 or channels % groups:
        raise ValueError(f"GroupNorm over {channels} channels cannot use {groups} groups; "
                         f"choose channel counts (nf * ch_mult) divisible by 4")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


def _skip_sum(x: torch.Tensor, h: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    """x + h, divided by sqrt(2) with ``skip_rescale`` (NCSN++, Song et al. 2021, App. H)."""
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


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


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, residual; the output NIN starts near zero
    (variance scale ``init_scale``, 0 = 1e-10). ``skip_rescale`` divides the sum by sqrt(2)
    and ``group_rule`` picks the GroupNorm groups (NCSN++'s ``AttnBlockpp`` options)."""

    def __init__(self, channels: int, *, skip_rescale: bool = False, init_scale: float = 0.0,
                 group_rule=None):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels, group_rule)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (nin(h).reshape(B, C, H * W).transpose(1, 2)
                   for nin in (self.NIN_0, self.NIN_1, self.NIN_2))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return _skip_sum(x, self.NIN_3(h), self.skip_rescale)


def _fir_conv(in_ch: int, out_ch: int, *, up: bool, fir_kernel) -> FIRConv2d:
    """3x3 ``FIRConv2d`` (fused FIR resampling) with variance-scaling weights, zero bias."""
    conv = FIRConv2d(in_ch, out_ch, 3, up=up, down=not up, resample_kernel=fir_kernel)
    variance_scaling_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, out_ch, 2 H, 2 W).

    Without ``fir``: nearest-neighbour x2, then a 3x3 conv (``Conv_0``) if ``with_conv``.
    With ``fir`` (NCSN++): FIR upsampling with ``fir_kernel``, fused with a 3x3 conv
    (``Conv2d_0``) if ``with_conv``. ``out_ch`` (default C) needs ``with_conv``.
    """

    def __init__(self, channels: int, with_conv: bool = False, *, out_ch: int | None = None,
                 fir: bool = False, fir_kernel=DEFAULT_KERNEL):
        super().__init__()
        out_ch = out_ch or channels
        if with_conv and fir:
            self.Conv2d_0 = _fir_conv(channels, out_ch, up=True, fir_kernel=fir_kernel)
        elif with_conv:
            self.Conv_0 = _conv3x3(channels, out_ch)
        elif out_ch != channels:
            raise ValueError(f"Upsample without a conv cannot change {channels} channels to "
                             f"{out_ch}; set with_conv=True")
        self.with_conv, self.fir, self.fir_kernel = with_conv, fir, tuple(fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else upsample_2d(x, self.fir_kernel)
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, out_ch, H / 2, W / 2).

    Without ``fir``: a stride-2 3x3 conv (``Conv_0``) with TensorFlow 'SAME' padding (pad
    right/bottom by one), or 2x2 average pooling without ``with_conv``. With ``fir``
    (NCSN++): a 3x3 conv fused with FIR downsampling (``Conv2d_0``), or FIR downsampling alone.
    ``out_ch`` (default C) needs ``with_conv``.
    """

    def __init__(self, channels: int, with_conv: bool = False, *, out_ch: int | None = None,
                 fir: bool = False, fir_kernel=DEFAULT_KERNEL):
        super().__init__()
        out_ch = out_ch or channels
        if with_conv and fir:
            self.Conv2d_0 = _fir_conv(channels, out_ch, up=False, fir_kernel=fir_kernel)
        elif with_conv:
            self.Conv_0 = _conv3x3(channels, out_ch, stride=2, padding=0)
        elif out_ch != channels:
            raise ValueError(f"Downsample without a conv cannot change {channels} channels to "
                             f"{out_ch}; set with_conv=True")
        self.with_conv, self.fir, self.fir_kernel = with_conv, fir, tuple(fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else downsample_2d(x, self.fir_kernel)
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResidualBranch(nn.Module):
    """The layers shared by the DDPM and BigGAN residual blocks, registered in the official
    order (GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Dropout_0, Conv_1): the first
    GroupNorm-SiLU and conv, the time embedding added per channel, and the second
    GroupNorm-SiLU-dropout-conv (initialised near zero: variance scale ``init_scale``,
    0 = 1e-10). Subclasses add their shortcut and call ``_add_temb_and_finish``."""

    def _build_branch(self, in_ch: int, out_ch: int, temb_dim: int | None, dropout: float,
                      init_scale: float, group_rule) -> None:
        self.GroupNorm_0 = _group_norm(in_ch, group_rule)
        self.Conv_0 = _conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch, group_rule)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(out_ch, out_ch, init_scale=init_scale)

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
        h = self._add_temb_and_finish(self.Conv_0(F.silu(self.GroupNorm_0(x))), temb)
        if self.in_ch != self.out_ch:
            x = self.NIN_0(x)
        return _skip_sum(x, h, self.skip_rescale)


# --------------------------------------------------------------------------- the network

class DDPM(nn.Module):
    """DDPM U-Net: x (B, C, H, W) in [-1, 1] and a (B,) conditioning -> predicted noise.

    The conditioning is embedded as is (sinusoidal, nf wide, then Dense(nf, 4 nf), SiLU,
    Dense(4 nf, 4 nf)): the DDPM step index i (``get_score_fn(..., continuous=False)``) or
    999 t (continuous VP / sub-VP), exactly what the Score SDE code feeds its DDPM model.

    All modules live, in call order, in one flat ``nn.ModuleList`` named ``all_modules``
    (the official layout; its checkpoints' keys are ``all_modules.<i>.<...>``).

    Args:
        nf: base channel count (128 for CIFAR-10).
        ch_mult: channel multiplier per resolution; len(ch_mult) - 1 downsamplings.
        num_res_blocks: residual blocks per resolution on the way down (one more going up).
        attn_resolutions: feature-map sizes at which self-attention follows each block.
        dropout: dropout rate inside the residual blocks.
        resamp_with_conv: learned 3x3 convs in Upsample / Downsample.
        conditional: use the time conditioning (True for every official config).
        image_size: input height = width; must be divisible by 2 ** (len(ch_mult) - 1).
        num_channels: image channels.
        num_classes: optional class conditioning: a learned embedding (``class_embedding``,
            not part of ``all_modules``) added to the time embedding; needs ``conditional``.
    """

    def __init__(self, *, nf: int = 128, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions=(16,), dropout: float = 0.1, resamp_with_conv: bool = True,
                 conditional: bool = True, image_size: int = 32, num_channels: int = 3,
                 num_classes: int | None = None):
        super().__init__()
        ch_mult = tuple(int(c) for c in ch_mult)
        num_resolutions = len(ch_mult)
        if image_size % 2 ** (num_resolutions - 1):
            raise ValueError(f"image_size={image_size} must be divisible by "
                             f"2 ** (len(ch_mult) - 1) = {2 ** (num_resolutions - 1)}")
        if num_classes and not conditional:
            raise ValueError("num_classes needs conditional=True (the class embedding is added "
                             "to the time embedding)")
        self.nf, self.ch_mult, self.num_res_blocks = nf, ch_mult, num_res_blocks
        self.attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.conditional, self.image_size, self.num_channels = conditional, image_size, num_channels
        self.num_resolutions = num_resolutions
        resolutions = [image_size // 2 ** i for i in range(num_resolutions)]
        temb_dim = 4 * nf if conditional else None

        def resnet(in_ch, out_ch=None):
            return ResnetBlockDDPM(in_ch, out_ch, temb_dim=temb_dim, dropout=dropout)

        modules: list[nn.Module] = []
        if conditional:
            modules += [_dense(nf, 4 * nf), _dense(4 * nf, 4 * nf)]
        modules.append(_conv3x3(num_channels, nf))
        skip_ch = [nf]
        in_ch = nf
        for level, mult in enumerate(ch_mult):  # downsampling path
            for _ in range(num_res_blocks):
                modules.append(resnet(in_ch, nf * mult))
                in_ch = nf * mult
                if resolutions[level] in self.attn_resolutions:
                    modules.append(AttnBlock(in_ch))
                skip_ch.append(in_ch)
            if level != num_resolutions - 1:
                modules.append(Downsample(in_ch, with_conv=resamp_with_conv))
                skip_ch.append(in_ch)
        modules += [resnet(in_ch), AttnBlock(in_ch), resnet(in_ch)]  # middle
        for level in reversed(range(num_resolutions)):  # upsampling path
            for _ in range(num_res_blocks + 1):
                modules.append(resnet(in_ch + skip_ch.pop(), nf * ch_mult[level]))
                in_ch = nf * ch_mult[level]
            if resolutions[level] in self.attn_resolutions:
                modules.append(AttnBlock(in_ch))
            if level != 0:
                modules.append(Upsample(in_ch, with_conv=resamp_with_conv))
        assert not skip_ch
        modules += [_group_norm(in_ch), _conv3x3(in_ch, num_channels, init_scale=0.0)]
        self.all_modules = nn.ModuleList(modules)
        self.class_embedding = nn.Embedding(num_classes, 4 * nf) if num_classes else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, num_channels, image_size, image_size) in [-1, 1]; cond: (B,) step index or
        999 t; class_labels: (B,) long, required iff the model has ``num_classes``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.num_channels, self.image_size,
                                                 self.image_size):
            raise ValueError(f"DDPM expects x of shape (B, {self.num_channels}, "
                             f"{self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        mods = iter(self.all_modules)
        temb = None
        if self.conditional:
            temb = sinusoidal_embedding(cond.to(x.dtype) if cond.is_floating_point()
                                        else cond.float().to(x.dtype), self.nf)
            temb = next(mods)(temb)
            temb = next(mods)(F.silu(temb))
            if self.class_embedding is not None:
                if class_labels is None:
                    raise ValueError("this DDPM is class-conditional: pass class_labels (B,)")
                temb = temb + self.class_embedding(class_labels)
            elif class_labels is not None:
                raise ValueError("class_labels given to a DDPM built without num_classes")
        elif class_labels is not None:
            raise ValueError("class_labels given to a DDPM built without num_classes")

        hs = [next(mods)(x)]
        for level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                if h.shape[-1] in self.attn_resolutions:
                    h = next(mods)(h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                hs.append(next(mods)(hs[-1]))
        h = next(mods)(hs[-1], temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)
        for level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if h.shape[-1] in self.attn_resolutions:
                h = next(mods)(h)
            if level != 0:
                h = next(mods)(h)
        h = F.silu(next(mods)(h))
        return next(mods)(h)


# --------------------------------------------------------------------------- checkpoints

#: Buffers of the official model that this implementation does not have (see module docstring).
_DROPPED_KEYS = ("sigmas",)
#: Parameters that the official models create with requires_grad=False (NCSN++'s Gaussian
#: Fourier features ``W``, always module 0): their EMA neither tracks nor overwrites them.
_FROZEN_KEYS = ("all_modules.0.W",)


def convert_score_sde_state_dict(state: dict, *, ema: bool = False) -> dict:
    """Turn a Score SDE (yang-song/score_sde_pytorch) DDPM checkpoint into our state dict.

    Accepts the whole checkpoint (a dict with a ``'model'`` entry, as their ``save_checkpoint``
    writes: ``{'model', 'ema', 'optimizer', 'step'}``) or the model state dict itself. Strips
    the ``module.`` prefix that their ``nn.DataParallel`` wrapper adds and drops the unused
    ``sigmas`` buffer; every other key is kept unchanged, so the result loads with
    ``strict=True`` (use ``load_state_dict_strict`` for a message naming a bad key).

    ``ema=True`` (whole checkpoints only) returns the EMA weights instead: their
    ``checkpoint['ema']['shadow_params']`` is a bare list of the parameters with
    ``requires_grad`` in ``model.parameters()`` order; for DDPM and NCSN++ every state-dict
    entry but ``sigmas`` is a parameter, in that same order (checked against their code), so
    the list is matched to the model's keys one to one, skipping the frozen Fourier features
    ``all_modules.0.W`` of NCSN++, which keep the model's value (as their ``copy_to`` does).
    """
    checkpoint = state
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    elif ema:
        raise ValueError("ema=True needs the whole checkpoint (a dict with 'model' and 'ema')")
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key not in _DROPPED_KEYS:
            out[key] = value
    if not ema:
        return out
    shadow = checkpoint.get("ema", {}).get("shadow_params")
    if shadow is None:
        raise ValueError("checkpoint has no ema['shadow_params']")
    tracked = [key for key in out if key not in _FROZEN_KEYS]
    if len(shadow) != len(tracked):
        raise ValueError(f"ema['shadow_params'] has {len(shadow)} tensors but the model state "
                         f"has {len(tracked)} trainable parameters")
    for key, avg in zip(tracked, shadow):
        if tuple(avg.shape) != tuple(out[key].shape):
            raise ValueError(f"EMA tensor for {key!r} has shape {tuple(avg.shape)}, the model "
                             f"has {tuple(out[key].shape)}")
    averaged = dict(zip(tracked, shadow))
    return {key: averaged.get(key, value) for key, value in out.items()}


def load_state_dict_strict(model: nn.Module, state: dict) -> None:
    """``model.load_state_dict(state, strict=True)``, but first check keys and shapes and raise
    a ValueError that names the first offending key (torch's error lists them all)."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ValueError(f"state dict is missing key {key!r} (expected shape "
                             f"{tuple(value.shape)})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch for {key!r}: checkpoint has "
                             f"{tuple(state[key].shape)}, model has {tuple(value.shape)}")
    for key in state:
        if key not in own:
            raise ValueError(f"unexpected key {key!r} in state dict (not in the model)")
    model.load_state_dict(state, strict=True)
