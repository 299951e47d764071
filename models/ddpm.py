"""The DDPM U-Net (Ho et al. 2020, App. B), state-dict compatible with the Score SDE code.

Parameter names, shapes, registration order and initialisation follow the PyTorch Score SDE
implementation (yang-song/score_sde_pytorch, ``models/ddpm.py`` + ``models/layers.py``), so that
its checkpoints load with ``strict=True`` after ``models.convert_score_sde_state_dict`` and its EMA
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
* GroupNorm groups and attention as described in ``models/layers.py`` (32 groups for every
  official config; ``scaled_dot_product_attention``).

Its layers (shared with NCSN++) live in ``models/layers.py``; checkpoint conversion in
``models/checkpoints.py``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .embeddings import sinusoidal_embedding
from .layers import (AttnBlock, Downsample, ResnetBlockDDPM, Upsample, ddpm_conv3x3, dense,
                     down_level, down_level_modules, group_norm, middle_blocks,
                     set_checkpointing, up_level, up_level_modules)

__all__ = ["DDPM"]


class DDPM(nn.Module):
    """DDPM U-Net: x (B, C, H, W) in [-1, 1] and a (B,) conditioning -> predicted noise.

    The conditioning is embedded as is (sinusoidal, nf wide, then Dense(nf, 4 nf), SiLU,
    Dense(4 nf, 4 nf)): the DDPM step index i (``get_score_fn(..., continuous=False)``), the
    fractional t (N - 1) of the Score SDE code (``discrete_labels='score_sde'``) or 999 t
    (continuous VP / sub-VP), what the Score SDE code feeds its DDPM model.

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
        learn_sigma: output 2 num_channels channels, [eps, v]: the noise prediction and the
            interpolation of the reverse variance (Improved DDPM; ``models.get_score_fn``
            with ``learned_variance=True`` splits them).
        checkpointing: activation checkpointing of the residual and attention blocks while
            training with gradients (recomputed in the backward pass; see models/layers.py).
    """

    def __init__(self, *, nf: int = 128, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions=(16,), dropout: float = 0.1, resamp_with_conv: bool = True,
                 conditional: bool = True, image_size: int = 32, num_channels: int = 3,
                 num_classes: int | None = None, learn_sigma: bool = False,
                 checkpointing: bool = False):
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
        self.num_resolutions, self.learn_sigma = num_resolutions, bool(learn_sigma)
        resolutions = [image_size // 2 ** i for i in range(num_resolutions)]
        temb_dim = 4 * nf if conditional else None

        def resnet(in_ch, out_ch=None):
            return ResnetBlockDDPM(in_ch, out_ch, temb_dim=temb_dim, dropout=dropout)

        modules: list[nn.Module] = []
        if conditional:
            modules += [dense(nf, 4 * nf), dense(4 * nf, 4 * nf)]
        modules.append(ddpm_conv3x3(num_channels, nf))
        skip_ch = [nf]
        in_ch = nf
        for level, mult in enumerate(ch_mult):  # downsampling path
            level_modules, level_skips = down_level_modules(
                resnet, AttnBlock, in_ch, nf * mult, num_res_blocks,
                resolutions[level] in self.attn_resolutions)
            modules += level_modules
            skip_ch += level_skips
            in_ch = skip_ch[-1]
            if level != num_resolutions - 1:
                modules.append(Downsample(in_ch, with_conv=resamp_with_conv))
                skip_ch.append(in_ch)
        modules += [resnet(in_ch), AttnBlock(in_ch), resnet(in_ch)]  # middle
        for level in reversed(range(num_resolutions)):  # upsampling path
            modules += up_level_modules(resnet, AttnBlock, in_ch, nf * ch_mult[level], skip_ch,
                                        num_res_blocks, resolutions[level] in self.attn_resolutions)
            in_ch = nf * ch_mult[level]
            if level != 0:
                modules.append(Upsample(in_ch, with_conv=resamp_with_conv))
        assert not skip_ch
        modules += [group_norm(in_ch), ddpm_conv3x3(in_ch, num_channels * (2 if learn_sigma else 1),
                                                   init_scale=0.0)]
        self.all_modules = nn.ModuleList(modules)
        self.class_embedding = nn.Embedding(num_classes, 4 * nf) if num_classes else None
        self.checkpointing = bool(checkpointing)
        set_checkpointing(self, self.checkpointing)

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, num_channels, image_size, image_size) in [-1, 1]; cond: (B,) step index i,
        the fractional label t (N - 1) (``discrete_labels='score_sde'``) or 999 t;
        class_labels: (B,) long, required iff the model has ``num_classes``.
        Returns the predicted noise, shape of x ((B, 2 num_channels, ...) with
        ``learn_sigma``: noise and variance interpolation)."""
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
            down_level(mods, hs, temb, self.num_res_blocks, self.attn_resolutions)
            if level != self.num_resolutions - 1:
                hs.append(next(mods)(hs[-1]))  # Downsample
        h = middle_blocks(mods, hs[-1], temb)
        for level in reversed(range(self.num_resolutions)):
            h = up_level(mods, h, hs, temb, self.num_res_blocks, self.attn_resolutions)
            if level != 0:
                h = next(mods)(h)  # Upsample
        h = F.silu(next(mods)(h))
        return next(mods)(h)
