"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", Sec. 4.4 and App. H), state-dict compatible with the Score SDE code.

One class, ``NCSNpp``; DDPM++ is the same network with other keyword arguments, as in the
official code (yang-song/score_sde_pytorch, ``models/ncsnpp.py`` + ``layerspp.py``):

================  ===========  ======  =====================  ===============  ===========
CIFAR-10 config   embedding    fir     progressive_input      num_res_blocks   parameters
================  ===========  ======  =====================  ===============  ===========
NCSN++ (VE)       fourier      True    residual               4                62,758,915
NCSN++ deep       fourier      True    residual               8                107,587,075
DDPM++ (VP)       positional   False   none                   4                61,804,419
DDPM++ deep       positional   False   none                   8                106,632,579
================  ===========  ======  =====================  ===============  ===========

(all four: nf=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), BigGAN residual blocks,
skip_rescale, init_scale=0, progressive='none', progressive_combine='sum').

Parameter names, shapes, registration order and initialisation follow the official code, so
its checkpoints load with ``strict=True`` after ``convert_score_sde_state_dict`` and its EMA
list lines up with ``model.parameters()``. The layers it shares with DDPM (GroupNorm, NIN,
attention, DDPM residual block, up/downsampling, the per-resolution block loops) live in
``models/layers.py``; FIR resampling in ``models/fir.py``.

Conditioning (``forward(x, cond)``, what ``models.get_score_fn`` passes):

* ``embedding_type='fourier'``: Gaussian Fourier features of log(cond), cond = sigma(t)
  > 0 (continuous VE). An integer cond (a discrete level) is refused: the official code also
  allows Fourier features only for continuous training.
* ``embedding_type='positional'``: the sinusoidal embedding of cond as given: 999 t
  (continuous VP / sub-VP), the DDPM step index (or its fractional t (N - 1) with
  ``discrete_labels='score_sde'``), sigma(t) (continuous VE) or the NCSN level
  label ``N - 1 - i`` (discrete VE). The official model also looks ``sigmas[label]`` up in a
  table for ``scale_by_sigma``; here there is no table: ``get_score_fn(...,
  scale_by_sigma=True)`` divides by the same sigma (its discrete sigma_i for label N - 1 - i
  equals their ``sigmas[N - 1 - i]``, both geometric between sigma_min and sigma_max).

Differences from the official code, on purpose:

* No data rescaling and no output scaling in ``forward``. The official forward computes
  ``2 x - 1`` when ``config.data.centered`` is False (every VE config: NCSN++ sees [-1, 1]
  images made from [0, 1] data) and divides by sigma when ``config.model.scale_by_sigma``.
  To reproduce the official score of a published checkpoint, feed the network ``2 x - 1``
  for uncentered data (our data pipeline's [-1, 1] scaling, or ``2 x - 1`` in the caller) and
  use ``get_score_fn(sde, model, scale_by_sigma=config.model.scale_by_sigma)``.
* No ``sigmas`` buffer (dropped by ``convert_score_sde_state_dict``).
* ``num_classes`` adds one ``class_embedding`` (nn.Embedding, 4 nf wide, outside
  ``all_modules``) added to the time embedding; with ``num_classes=None`` nothing is added.
* The activation is SiLU ("swish", the only one the official NCSN++ configs use).
* Attention uses ``scaled_dot_product_attention`` (same math as the einsum version).

Kept from the official code although odd: with ``conditional=False`` the Fourier module
and every residual block's ``Dense_0`` still exist (unused), so the key layout stays official.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import (AttnBlock, Downsample, ResidualBranch, ResnetBlockDDPM, Upsample,
                     ddpm_conv1x1, ddpm_conv3x3, dense, down_level, down_level_modules,
                     group_norm, middle_blocks, set_checkpointing, skip_sum, up_level,
                     up_level_modules)
from .embeddings import GaussianFourierProjection, sinusoidal_embedding
from .fir import DEFAULT_KERNEL, downsample_2d, upsample_2d

__all__ = ["NCSNpp", "ResnetBlockBigGAN", "Combine"]

_CHOICES = {
    "resblock_type": ("ddpm", "biggan"),
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("fourier", "positional"),
    "attention_type": ("ddpm",),
}


def _groups(channels: int) -> int:
    """NCSN++'s GroupNorm rule: min(C // 4, 32) groups."""
    return min(channels // 4, 32)


def _up2(x: torch.Tensor, fir: bool, kernel) -> torch.Tensor:
    """x2 upsampling without weights: FIR with ``kernel``, or nearest neighbour."""
    return upsample_2d(x, kernel) if fir else F.interpolate(x, scale_factor=2.0, mode="nearest")


def _down2(x: torch.Tensor, fir: bool, kernel) -> torch.Tensor:
    """/2 downsampling without weights: FIR with ``kernel``, or 2x2 average pooling."""
    return downsample_2d(x, kernel) if fir else F.avg_pool2d(x, kernel_size=2, stride=2)


def _head(mods, h: torch.Tensor) -> torch.Tensor:
    """Apply the next two modules, a GroupNorm and a conv, as conv(SiLU(norm(h)))."""
    norm = next(mods)
    conv = next(mods)
    return conv(F.silu(norm(h)))


# --------------------------------------------------------------------------- layers

class Combine(nn.Module):
    """Merge the input pyramid into the features (``progressive_input='input_skip'``):
    a 1x1 conv of x (dim1 -> dim2 channels), then summed with y or concatenated before y."""

    def __init__(self, dim1: int, dim2: int, *, method: str = "cat"):
        super().__init__()
        if method not in _CHOICES["progressive_combine"]:
            raise ValueError(f"progressive_combine={method!r}; valid: 'sum', 'cat'")
        self.Conv_0 = ddpm_conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, dim1, H, W), y (B, dim2, H, W) -> (B, dim2 or 2 dim2, H, W)."""
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class ResnetBlockBigGAN(ResidualBranch):
    """BigGAN residual block (Brock et al. 2019), optionally resampling by 2 (NCSN++).

    (B, in_ch, H, W) -> (B, out_ch, H', W') with H' = 2 H (``up``), H / 2 (``down``) or H.
    GroupNorm-SiLU, resample (FIR with ``fir``, else nearest / average pooling), conv,
    + Dense(SiLU(temb)) per channel, GroupNorm-SiLU-dropout-conv (init scale ``init_scale``);
    the input, resampled the same way and through a 1x1 conv (``Conv_2``) when the channels or
    the size change, is added (divided by sqrt(2) with ``skip_rescale``).
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, *, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, fir: bool = False,
                 fir_kernel=DEFAULT_KERNEL, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self._build_branch(in_ch, out_ch, temb_dim, dropout, init_scale, _groups)
        self.shortcut = in_ch != out_ch or up or down
        if self.shortcut:
            self.Conv_2 = ddpm_conv1x1(in_ch, out_ch)
        self.up, self.down, self.fir, self.fir_kernel = up, down, fir, tuple(fir_kernel)
        self.skip_rescale = skip_rescale

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return _up2(x, self.fir, self.fir_kernel)
        if self.down:
            return _down2(x, self.fir, self.fir_kernel)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self._checkpointed(x, temb)

    def _forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self._resample(F.silu(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self._add_temb_and_finish(self.Conv_0(h), temb)
        if self.shortcut:
            x = self.Conv_2(x)
        return skip_sum(x, h, self.skip_rescale)


# --------------------------------------------------------------------------- the network

class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ U-Net: x (B, C, H, W) and a (B,) conditioning -> (B, C, H, W).

    All modules live, in call order, in one flat ``nn.ModuleList`` named ``all_modules``
    (the official layout; its checkpoints' keys are ``all_modules.<i>.<...>``). Defaults are
    the NCSN++ CIFAR-10 continuous config (configs/ve/cifar10_ncsnpp_continuous.py).

    Args:
        nf: base channel count (128 for CIFAR-10).
        ch_mult: channel multiplier per resolution; len(ch_mult) - 1 downsamplings.
        num_res_blocks: residual blocks per resolution going down (one more going up);
            4 for NCSN++ / DDPM++, 8 for the deep variants.
        attn_resolutions: feature-map sizes with self-attention.
        dropout: dropout rate inside the residual blocks.
        resamp_with_conv: learned convs in the DDPM-type Upsample / Downsample.
        conditional: use the noise-level conditioning (True for every official config).
        fir: FIR up/downsampling with ``fir_kernel`` (NCSN++) instead of nearest / average
            pooling (DDPM++).
        fir_kernel: the 1-D FIR kernel, default [1, 3, 3, 1].
        skip_rescale: divide every residual sum by sqrt(2).
        resblock_type: 'biggan' (resampling inside residual blocks) or 'ddpm'.
        progressive: output pyramid: 'none', 'output_skip' (sum of upsampled per-level
            outputs) or 'residual'.
        progressive_input: input pyramid: 'none', 'input_skip' (downsampled image merged at
            each level) or 'residual'.
        progressive_combine: how 'input_skip' merges: 'sum' or 'cat'.
        attention_type: 'ddpm' (the only one).
        init_scale: variance scale of the last layer of each residual branch and of the output
            conv (0 means 1e-10).
        embedding_type: 'fourier' (of log sigma) or 'positional' (sinusoidal).
        fourier_scale: std of the Fourier frequencies (16).
        conv_size: 3 (the only one; the official code ignores it).
        image_size: input height = width; divisible by 2 ** (len(ch_mult) - 1).
        num_channels: image channels.
        num_classes: optional class conditioning (``class_embedding``, needs ``conditional``).
        learn_sigma: output 2 num_channels channels (the network's output and the reverse
            variance interpolation v of Improved DDPM; see ``models.get_score_fn``).
        checkpointing: activation checkpointing of the residual and attention blocks while
            training with gradients (recomputed in the backward pass; see models/layers.py).
    """

    def __init__(self, *, nf: int = 128, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 4,
                 attn_resolutions=(16,), dropout: float = 0.1, resamp_with_conv: bool = True,
                 conditional: bool = True, fir: bool = True, fir_kernel=DEFAULT_KERNEL,
                 skip_rescale: bool = True, resblock_type: str = "biggan",
                 progressive: str = "none", progressive_input: str = "residual",
                 progressive_combine: str = "sum", attention_type: str = "ddpm",
                 init_scale: float = 0.0, embedding_type: str = "fourier",
                 fourier_scale: float = 16.0, conv_size: int = 3, image_size: int = 32,
                 num_channels: int = 3, num_classes: int | None = None,
                 learn_sigma: bool = False, checkpointing: bool = False):
        super().__init__()
        options = dict(resblock_type=resblock_type.lower(), progressive=progressive.lower(),
                       progressive_input=progressive_input.lower(),
                       progressive_combine=progressive_combine.lower(),
                       embedding_type=embedding_type.lower(),
                       attention_type=attention_type.lower())
        for name, value in options.items():
            if value not in _CHOICES[name]:
                raise ValueError(f"{name}={value!r} is not supported; valid: "
                                 f"{', '.join(map(repr, _CHOICES[name]))}")
        ch_mult = tuple(int(c) for c in ch_mult)
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size={image_size} must be divisible by "
                             f"2 ** (len(ch_mult) - 1) = {2 ** (len(ch_mult) - 1)}")
        if conv_size != 3:
            raise ValueError(f"conv_size={conv_size}: NCSN++ uses 3x3 convolutions only")
        if num_classes and not conditional:
            raise ValueError("num_classes needs conditional=True (the class embedding is added "
                             "to the noise-level embedding)")
        self.resblock_type, self.progressive = options["resblock_type"], options["progressive"]
        self.progressive_input = options["progressive_input"]
        self.progressive_combine = options["progressive_combine"]
        self.embedding_type = options["embedding_type"]
        self.nf, self.ch_mult, self.num_res_blocks = nf, ch_mult, num_res_blocks
        self.attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.conditional, self.skip_rescale = conditional, skip_rescale
        self.fir, self.fir_kernel = fir, tuple(fir_kernel)
        self.image_size, self.num_channels = image_size, num_channels
        self.learn_sigma = bool(learn_sigma)
        self.out_channels = num_channels * (2 if learn_sigma else 1)
        self.num_resolutions = len(ch_mult)
        self._dropout, self._init_scale = dropout, init_scale
        self._resamp_with_conv = resamp_with_conv

        modules = self._embedding_modules(fourier_scale)
        skip_ch = self._encoder_modules(modules)
        in_ch = skip_ch[-1]
        modules += [self._resnet(in_ch), self._attn(in_ch), self._resnet(in_ch)]
        self._decoder_modules(modules, skip_ch)
        self.all_modules = nn.ModuleList(modules)
        self.class_embedding = nn.Embedding(num_classes, 4 * nf) if num_classes else None
        self.checkpointing = bool(checkpointing)
        set_checkpointing(self, self.checkpointing)

    # ------------------------------------------------------------------ construction
    def _resnet(self, in_ch: int, out_ch: int | None = None, *, up: bool = False,
                down: bool = False) -> nn.Module:
        """A residual block; temb_dim is always 4 nf, as officially (even unconditional)."""
        common = dict(temb_dim=4 * self.nf, dropout=self._dropout,
                      skip_rescale=self.skip_rescale, init_scale=self._init_scale)
        if self.resblock_type == "ddpm":
            return ResnetBlockDDPM(in_ch, out_ch, group_rule=_groups, **common)
        return ResnetBlockBigGAN(in_ch, out_ch, up=up, down=down, fir=self.fir,
                                 fir_kernel=self.fir_kernel, **common)

    def _attn(self, channels: int) -> AttnBlock:
        return AttnBlock(channels, skip_rescale=self.skip_rescale, init_scale=self._init_scale,
                         group_rule=_groups)

    def _resample(self, cls, in_ch: int, out_ch: int | None = None,
                  with_conv: bool | None = None) -> nn.Module:
        with_conv = self._resamp_with_conv if with_conv is None else with_conv
        return cls(in_ch, with_conv, out_ch=out_ch, fir=self.fir, fir_kernel=self.fir_kernel)

    def _out_conv(self, in_ch: int, out_ch: int) -> list[nn.Module]:
        """GroupNorm + 3x3 conv (init scale ``init_scale``): an output head."""
        return [group_norm(in_ch, _groups),
                ddpm_conv3x3(in_ch, out_ch, init_scale=self._init_scale)]

    def _embedding_modules(self, fourier_scale: float) -> list[nn.Module]:
        nf, modules = self.nf, []
        if self.embedding_type == "fourier":
            modules.append(GaussianFourierProjection(2 * nf, scale=fourier_scale))
        if self.conditional:
            in_dim = 2 * nf if self.embedding_type == "fourier" else nf
            modules += [dense(in_dim, 4 * nf), dense(4 * nf, 4 * nf)]
        return modules

    def _encoder_modules(self, modules: list[nn.Module]) -> list[int]:
        """Append the first conv and the downsampling path; return the skip channel counts."""
        nf, C = self.nf, self.num_channels
        modules.append(ddpm_conv3x3(C, nf))
        skip_ch, in_ch, pyramid_ch = [nf], nf, C
        for level, mult in enumerate(self.ch_mult):
            level_modules, level_skips = down_level_modules(
                self._resnet, self._attn, in_ch, nf * mult, self.num_res_blocks,
                self.image_size // 2 ** level in self.attn_resolutions)
            modules += level_modules
            skip_ch += level_skips
            in_ch = skip_ch[-1]
            if level == self.num_resolutions - 1:
                break
            modules.append(self._resample(Downsample, in_ch) if self.resblock_type == "ddpm"
                           else self._resnet(in_ch, down=True))
            if self.progressive_input == "input_skip":
                modules.append(Combine(pyramid_ch, in_ch, method=self.progressive_combine))
                in_ch *= 2 if self.progressive_combine == "cat" else 1
            elif self.progressive_input == "residual":
                modules.append(self._resample(Downsample, pyramid_ch, in_ch, with_conv=True))
                pyramid_ch = in_ch
            skip_ch.append(in_ch)
        return skip_ch

    def _decoder_modules(self, modules: list[nn.Module], skip_ch: list[int]) -> None:
        """Append the upsampling path, the output pyramid and the output head."""
        nf, C = self.nf, self.out_channels
        in_ch, pyramid_ch = skip_ch[-1], 0
        for level in reversed(range(self.num_resolutions)):
            modules += up_level_modules(self._resnet, self._attn, in_ch, nf * self.ch_mult[level],
                                        skip_ch, self.num_res_blocks,
                                        self.image_size // 2 ** level in self.attn_resolutions)
            in_ch = nf * self.ch_mult[level]
            if self.progressive == "output_skip":
                modules += self._out_conv(in_ch, C)
            elif self.progressive == "residual" and level == self.num_resolutions - 1:
                modules += [group_norm(in_ch, _groups), ddpm_conv3x3(in_ch, in_ch)]
                pyramid_ch = in_ch
            elif self.progressive == "residual":
                modules.append(self._resample(Upsample, pyramid_ch, in_ch, with_conv=True))
                pyramid_ch = in_ch
            if level != 0:
                modules.append(self._resample(Upsample, in_ch) if self.resblock_type == "ddpm"
                               else self._resnet(in_ch, up=True))
        assert not skip_ch
        if self.progressive != "output_skip":
            modules += self._out_conv(in_ch, C)

    # ------------------------------------------------------------------ forward
    def _embed(self, mods, cond: torch.Tensor, class_labels, dtype) -> torch.Tensor | None:
        """(B,) conditioning -> (B, 4 nf) embedding, or None when unconditional."""
        if cond.ndim != 1:
            raise ValueError(f"cond must have shape (B,), got {tuple(cond.shape)}")
        if self.embedding_type == "fourier":
            if not cond.is_floating_point():
                raise ValueError("embedding_type='fourier' embeds log sigma: pass sigma(t) "
                                 "(continuous VE), not an integer level; use 'positional'")
            temb = next(mods)(torch.log(cond))
        else:
            temb = sinusoidal_embedding(cond if cond.is_floating_point() else cond.float(),
                                        self.nf)
        if class_labels is not None and self.class_embedding is None:
            raise ValueError("class_labels given to an NCSNpp built without num_classes")
        if not self.conditional:
            return None
        temb = next(mods)(temb.to(dtype))
        temb = next(mods)(F.silu(temb))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this NCSNpp is class-conditional: pass class_labels (B,)")
            temb = temb + self.class_embedding(class_labels)
        return temb

    def _encode(self, mods, x: torch.Tensor, temb) -> list[torch.Tensor]:
        """The downsampling path: the list of skip activations (its last is the bottom)."""
        pyramid = x
        hs = [next(mods)(x)]
        for level in range(self.num_resolutions):
            down_level(mods, hs, temb, self.num_res_blocks, self.attn_resolutions)
            if level == self.num_resolutions - 1:
                break
            h = next(mods)(hs[-1]) if self.resblock_type == "ddpm" else next(mods)(hs[-1], temb)
            if self.progressive_input == "input_skip":
                pyramid = _down2(pyramid, self.fir, self.fir_kernel)
                h = next(mods)(pyramid, h)
            elif self.progressive_input == "residual":
                pyramid = h = skip_sum(next(mods)(pyramid), h, self.skip_rescale)
            hs.append(h)
        return hs

    def _decode(self, mods, h: torch.Tensor, hs: list[torch.Tensor], temb) -> torch.Tensor:
        """The upsampling path, the output pyramid and the head."""
        pyramid = None
        for level in reversed(range(self.num_resolutions)):
            h = up_level(mods, h, hs, temb, self.num_res_blocks, self.attn_resolutions)
            if self.progressive == "output_skip":
                out = _head(mods, h)
                if pyramid is not None:
                    pyramid = _up2(pyramid, self.fir, self.fir_kernel)
                pyramid = out if pyramid is None else pyramid + out
            elif self.progressive == "residual" and pyramid is None:
                pyramid = _head(mods, h)
            elif self.progressive == "residual":
                pyramid = h = skip_sum(next(mods)(pyramid), h, self.skip_rescale)
            if level != 0:
                h = next(mods)(h) if self.resblock_type == "ddpm" else next(mods)(h, temb)
        assert not hs
        if self.progressive == "output_skip":
            return pyramid
        return _head(mods, h)

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, num_channels, image_size, image_size), already scaled (no rescaling here);
        cond: (B,) sigma(t) (Fourier) or 999 t / step index / level label (positional);
        class_labels: (B,) long, required iff the model has ``num_classes``.
        Returns (B, num_channels, image_size, image_size): the raw network output (noise
        prediction for VP, score or sigma * score for VE; see ``models.get_score_fn``)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.num_channels, self.image_size,
                                                 self.image_size):
            raise ValueError(f"NCSNpp expects x of shape (B, {self.num_channels}, "
                             f"{self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        mods = iter(self.all_modules)
        temb = self._embed(mods, cond, class_labels, x.dtype)
        hs = self._encode(mods, x, temb)
        h = middle_blocks(mods, hs[-1], temb)
        out = self._decode(mods, h, hs, temb)
        assert next(mods, None) is None
        return out
