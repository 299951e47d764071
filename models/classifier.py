"""Noise-conditional classifiers p_phi(y | x_t, t) for classifier guidance.

Song et al. 2021 ("Score-Based Generative Modeling through Stochastic Differential
Equations", Sec. 5 and App. I.1) train a classifier on perturbed data x_t and add
grad_x log p_phi(y | x_t, t) to the score; Dhariwal & Nichol 2021 ("Diffusion Models Beat
GANs", Sec. 4) scale that gradient. Every network here has the one interface

    classifier(x (B, ...), cond (B,)) -> logits (B, num_classes)

where ``cond = log sigma`` and ``sigma = std(t) / alpha(t)`` is the VE-equivalent noise level
of the SDE (x_t / alpha = x_0 + sigma z), so one classifier interface serves VP, sub-VP and
VE SDEs. ``get_logits_fn(sde, classifier)`` turns a network into ``logits_fn(x, t)``.

Networks take explicit keyword arguments, do no data rescaling inside ``forward`` and never
switch train/eval mode (GroupNorm / LayerNorm only, no BatchNorm).

* ``MLPClassifier`` ("mlp"): flat data such as the 2-D toy mixtures.
* ``ConvClassifier`` ("conv"): a small conv net for the 8x8 digits.
* ``WideResNetClassifier`` ("wideresnet"): the Score SDE CIFAR-10 classifier, a Wide ResNet
  (Zagoruyko & Komodakis 2016; WRN-28-10 by default) with a Gaussian Fourier embedding of
  log sigma added in every residual block, GroupNorm + ReLU as activation (the structure of
  yang-song/score_sde ``models/wideresnet_noise_conditional.py``, written anew; that code
  also standardises each input image inside its forward, which is left out here as data
  rescaling; the stem is followed by normalised residual blocks).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from sde_lib import SDE, batch_time, check_int, check_real

from .embeddings import GaussianFourierProjection

__all__ = ["MLPClassifier", "ConvClassifier", "WideResNetClassifier", "get_logits_fn",
           "classifier_conditioning"]


class _NoiseEmbedding(nn.Module):
    """log sigma (B,) -> (B, out_dim): Gaussian Fourier features, then Linear-SiLU-Linear."""

    def __init__(self, embedding_dim: int, out_dim: int, fourier_scale: float):
        super().__init__()
        self.fourier = GaussianFourierProjection(embedding_dim, fourier_scale)
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, out_dim), nn.SiLU(),
                                 nn.Linear(out_dim, out_dim))

    def forward(self, cond: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if cond.ndim != 1:
            raise ValueError(f"the classifier's conditioning (log sigma) must have shape (B,), "
                             f"got {tuple(cond.shape)}")
        return self.mlp(self.fourier(cond.to(dtype)))


def _check_common(num_classes, embedding_dim, fourier_scale) -> None:
    check_int("num_classes", num_classes, 2)
    check_int("embedding_dim", embedding_dim, 2)
    if embedding_dim % 2:
        raise ValueError(f"embedding_dim must be even (sin and cos halves), got {embedding_dim}")
    check_real("fourier_scale", fourier_scale, strict=True)


def _check_input(name: str, x: torch.Tensor, shape: tuple) -> None:
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"{name} expects inputs of shape (B, {', '.join(map(str, shape))}), "
                         f"got {tuple(x.shape)}")


# ----------------------------------------------------------------------------- MLP

class _MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(nn.functional.silu(out))


class MLPClassifier(nn.Module):
    """Residual MLP classifier: x (B, *data_shape) and log sigma (B,) -> logits (B, num_classes).

    Args:
        data_shape: shape of one sample, e.g. (2,); it is flattened.
        num_classes: number of classes (>= 2).
        hidden_dim: width of the residual blocks.
        num_blocks: number of residual blocks; each adds the noise embedding.
        embedding_dim: size of the Gaussian Fourier features of log sigma.
        fourier_scale: std of the Fourier frequencies (per unit of log sigma).
    """

    def __init__(self, *, data_shape, num_classes: int, hidden_dim: int = 128,
                 num_blocks: int = 2, embedding_dim: int = 64, fourier_scale: float = 1.0):
        super().__init__()
        _check_common(num_classes, embedding_dim, fourier_scale)
        check_int("hidden_dim", hidden_dim, 1)
        check_int("num_blocks", num_blocks, 0)
        self.data_shape = tuple(int(d) for d in data_shape)
        self.embed = _NoiseEmbedding(embedding_dim, hidden_dim, fourier_scale)
        self.inp = nn.Linear(math.prod(self.data_shape), hidden_dim)
        self.blocks = nn.ModuleList(_MLPBlock(hidden_dim) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, *data_shape); cond: (B,) log sigma. Returns (B, num_classes) logits."""
        _check_input("MLPClassifier", x, self.data_shape)
        emb = self.embed(cond, x.dtype)
        h = self.inp(x.reshape(x.shape[0], -1)) + emb
        for block in self.blocks:
            h = block(h, emb)
        return self.head(nn.functional.silu(self.out_norm(h)))


# ----------------------------------------------------------------------------- small conv net

def _groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= min(channels // 4, max_groups) that divides channels."""
    groups = max(1, min(channels // 4, max_groups))
    while channels % groups:
        groups -= 1
    return groups


class _ConvBlock(nn.Module):
    """GroupNorm-SiLU-conv, + noise embedding per channel, GroupNorm-SiLU-conv, residual;
    ``stride=2`` halves the image (a 1x1 strided skip)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, stride: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = (nn.Conv2d(in_ch, out_ch, 1, stride=stride)
                     if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.conv1(nn.functional.silu(self.norm1(h)))
        out = out + self.emb(emb)[:, :, None, None]
        out = self.conv2(nn.functional.silu(self.norm2(out)))
        return self.skip(h) + out


class ConvClassifier(nn.Module):
    """A small residual conv net: x (B, C, H, W) and log sigma (B,) -> logits (B, num_classes).

    Stem conv, then ``len(ch_mult)`` residual blocks (GroupNorm, SiLU, the noise embedding
    added per block; every block after the first halves the image), GroupNorm-SiLU, global
    average pooling and a linear head. Sized for the 8x8 digits (a few seconds per hundred
    steps on a CPU core).

    Args:
        num_channels: image channels C.
        image_size: H = W.
        num_classes: number of classes (>= 2).
        nf: channels of the stem; block i has nf * ch_mult[i].
        ch_mult: channel multipliers of the blocks.
        embedding_dim: size of the Gaussian Fourier features of log sigma.
        fourier_scale: std of the Fourier frequencies (per unit of log sigma).
    """

    def __init__(self, *, num_channels: int = 1, image_size: int = 8, num_classes: int = 10,
                 nf: int = 32, ch_mult=(1, 2, 2), embedding_dim: int = 64,
                 fourier_scale: float = 1.0):
        super().__init__()
        _check_common(num_classes, embedding_dim, fourier_scale)
        check_int("num_channels", num_channels, 1)
        check_int("image_size", image_size, 1)
        check_int("nf", nf, 1)
        ch_mult = tuple(check_int("ch_mult entry", m, 1) for m in ch_mult)
        if not ch_mult:
            raise ValueError("ch_mult must have at least one entry")
        self.data_shape = (num_channels, image_size, image_size)
        emb_dim = 4 * nf
        self.embed = _NoiseEmbedding(embedding_dim, emb_dim, fourier_scale)
        self.stem = nn.Conv2d(num_channels, nf, 3, padding=1)
        chans = [nf] + [nf * m for m in ch_mult]
        self.blocks = nn.ModuleList(
            _ConvBlock(chans[i], chans[i + 1], emb_dim, stride=1 if i == 0 else 2)
            for i in range(len(ch_mult)))
        self.out_norm = nn.GroupNorm(_groups(chans[-1]), chans[-1])
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); cond: (B,) log sigma. Returns (B, num_classes) logits."""
        _check_input("ConvClassifier", x, self.data_shape)
        emb = nn.functional.silu(self.embed(cond, x.dtype))
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb)
        h = nn.functional.silu(self.out_norm(h)).mean(dim=(2, 3))
        return self.head(h)


# ----------------------------------------------------------------------------- Wide ResNet

def _norm_relu(channels: int) -> nn.Module:
    """The WRN "activation": GroupNorm (min(C // 4, 32) groups) then ReLU."""
    return nn.Sequential(nn.GroupNorm(_groups(channels), channels), nn.ReLU())


class _WideBlock(nn.Module):
    """Pre-activation WRN block with the noise embedding added after the first conv.
    ``activate_before_residual``: the shortcut also takes the activated input (the first
    block of the first group, as in the WRN reference code)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, stride: int,
                 activate_before_residual: bool):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.act1 = _norm_relu(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.act2 = _norm_relu(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.skip = (nn.Conv2d(in_ch, out_ch, 1, stride=stride)
                     if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        activated = self.act1(h)
        shortcut = activated if self.activate_before_residual else h
        out = self.conv1(activated)
        out = out + self.emb(nn.functional.silu(emb))[:, :, None, None]
        out = self.conv2(self.act2(out))
        return self.skip(shortcut) + out


class WideResNetClassifier(nn.Module):
    """Noise-conditional Wide ResNet (Zagoruyko & Komodakis 2016) as the Score SDE CIFAR-10
    classifier (Song et al. 2021, App. I.1): x (B, C, H, W), log sigma (B,) -> logits.

    A 3x3 stem conv to 16 channels, three groups of (depth - 4) / 6 residual blocks with
    16, 32, 64 times ``widen_factor`` channels (the second and third groups halve the image),
    GroupNorm-ReLU, global average pooling and a linear head. log sigma goes through
    Gaussian Fourier features and two dense layers (4 * embedding_dim wide) and is added,
    after a SiLU and a per-block dense layer, to every block's first convolution.

    Args:
        num_channels: image channels C.
        image_size: H = W (must be divisible by 4).
        num_classes: number of classes (>= 2).
        depth: 6 n + 4 (28 for WRN-28-10; 10 for a tiny test instance).
        widen_factor: channel multiplier k (10 for WRN-28-10).
        embedding_dim: size of the Gaussian Fourier features of log sigma.
        fourier_scale: std of the Fourier frequencies (16 as in the Score SDE classifier).
    """

    def __init__(self, *, num_channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 depth: int = 28, widen_factor: int = 10, embedding_dim: int = 128,
                 fourier_scale: float = 16.0):
        super().__init__()
        _check_common(num_classes, embedding_dim, fourier_scale)
        check_int("num_channels", num_channels, 1)
        check_int("image_size", image_size, 4)
        check_int("widen_factor", widen_factor, 1)
        check_int("depth", depth, 10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 (10, 16, 22, 28, ...), got {depth}")
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two halvings), got {image_size}")
        self.data_shape = (num_channels, image_size, image_size)
        per_group = (depth - 4) // 6
        emb_dim = 4 * embedding_dim
        self.embed = _NoiseEmbedding(embedding_dim, emb_dim, fourier_scale)
        self.stem = nn.Conv2d(num_channels, 16, 3, padding=1)
        blocks, in_ch = [], 16
        for group, width in enumerate((16, 32, 64)):
            out_ch = width * widen_factor
            for i in range(per_group):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(_WideBlock(in_ch, out_ch, emb_dim, stride,
                                         activate_before_residual=group == 0 and i == 0))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.out_act = _norm_relu(in_ch)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); cond: (B,) log sigma. Returns (B, num_classes) logits."""
        _check_input("WideResNetClassifier", x, self.data_shape)
        emb = self.embed(cond, x.dtype)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(self.out_act(h).mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- the wrapper

def classifier_conditioning(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """log sigma(t) = log(std(t) / alpha(t)) = -log_snr(t) / 2, float64 (B,): the conditioning
    of every classifier here (computed from the SDE's float64 log-SNR, which equals
    log(std / alpha) of ``sde.marginal_coeffs`` without its round-off at small t)."""
    return -0.5 * sde.log_snr(t)


def get_logits_fn(sde: SDE, classifier: Callable) -> Callable:
    """Wrap ``classifier(x, log_sigma)`` as ``logits_fn(x, t)``.

    Args:
        sde: the forward SDE whose perturbed data the classifier was trained on.
        classifier: a network ``(x (B, ...), cond (B,)) -> (B, num_classes)`` (CLASSIFIERS).
    Returns:
        logits_fn(x (B, ...), t (B,) float or a scalar in [eps, T]) -> (B, num_classes) logits;
        the network sees cond = log(std(t) / alpha(t)) (float64 schedule cast to x's dtype).
        The classifier's train/eval mode is left as the caller set it.
    """
    def logits_fn(x: torch.Tensor, t) -> torch.Tensor:
        t = batch_time(t, x)
        if not t.is_floating_point():
            raise ValueError(f"logits_fn takes float times t in [eps, T], got dtype {t.dtype}")
        return classifier(x, classifier_conditioning(sde, t).to(x.dtype))

    return logits_fn
