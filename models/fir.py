"""FIR up/down-sampling with native torch ops (no compiled extension).

``upfirdn2d`` follows the StyleGAN2 definition (Karras et al. 2020, "Analyzing and Improving
the Image Quality of StyleGAN", the ``upfirdn_2d`` op): upsample by zero insertion, pad (or
crop), convolve with a FIR kernel (a true convolution), keep every ``down``-th pixel. The
helpers on top of it are the resampling layers that NCSN++ / DDPM++ use (Song et al. 2021,
"Score-Based Generative Modeling through Stochastic Differential Equations", App. H: FIR
up/down-sampling with the [1, 3, 3, 1] kernel), with the padding of the Score SDE code:

    upsample_2d(x, k, f)            (B, C, H, W) -> (B, C, H f, W f)
    downsample_2d(x, k, f)          (B, C, H, W) -> (B, C, H // f, W // f)
    upsample_conv_2d(x, w, k, f)    fused FIR upsampling + conv2d with w (O, C, r, r)
    conv_downsample_2d(x, w, k, f)  fused conv2d with w + FIR downsampling

Every function takes the device and dtype of ``x``; kernels given as lists, numpy arrays or
tensors are cast to them. Gradients of any order flow through (only conv/pad/slice ops).
"""
from __future__ import annotations

import functools

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["upfirdn2d", "setup_kernel", "upsample_2d", "downsample_2d", "upsample_conv_2d",
           "conv_downsample_2d", "FIRConv2d"]

#: The NCSN++ / DDPM++ resampling kernel (Song et al. 2021, App. H; StyleGAN2's default).
DEFAULT_KERNEL = (1, 3, 3, 1)


def _pads(pad) -> tuple[int, int, int, int]:
    """pad -> (x0, x1, y0, y1): an int, (pad0, pad1) for both axes, or (x0, x1, y0, y1)."""
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return (pad[0], pad[1], pad[0], pad[1])
    if len(pad) == 4:
        return pad
    raise ValueError(f"pad must be an int, (pad0, pad1) or (x0, x1, y0, y1), got {pad}")


def upfirdn2d(x: torch.Tensor, kernel, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample a batch of images (StyleGAN2's upfirdn2d).

    1. insert ``up - 1`` zeros after each pixel along H and W: (H, W) -> (H up, W up);
    2. pad with zeros, ``pad0`` before and ``pad1`` after on both axes (negative pads crop);
    3. convolve with ``kernel`` (true convolution: correlation with the flipped kernel),
       keeping only the fully overlapping ("valid") positions;
    4. keep every ``down``-th pixel, starting with the first.

    Args:
        x: (B, C, H, W), any floating dtype, contiguous or channels_last.
        kernel: (kh, kw) 2-D kernel, or (k,) 1-D kernel applied separably along both axes
            (the same as the outer product ``k[:, None] * k[None, :]``). Used as given: no
            normalisation, no gain (see ``setup_kernel``).
        up, down: integer factors >= 1.
        pad: (pad0, pad1) for both axes, an int, or (x0, x1, y0, y1) (W axis first, as
            StyleGAN2-ADA).
    Returns:
        (B, C, H_out, W_out) with H_out = (H up + pad0 + pad1 - kh) // down + 1 (and the same
        for W with kw), in x's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    up, down = int(up), int(down)
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be integers >= 1, got up={up}, down={down}")
    k = torch.as_tensor(kernel).to(device=x.device, dtype=x.dtype)
    if k.ndim not in (1, 2):
        raise ValueError(f"kernel must be 1-D (separable) or 2-D, got shape {tuple(k.shape)}")
    x0, x1, y0, y1 = _pads(pad)
    B, C, H, W = x.shape

    if up > 1:  # zero insertion after each pixel
        x = x.reshape(B, C, H, 1, W, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(B, C, H * up, W * up)
    x = F.pad(x, (max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)))
    x = x[:, :, max(-y0, 0):x.shape[2] - max(-y1, 0), max(-x0, 0):x.shape[3] - max(-x1, 0)]

    # True convolution = correlation (F.conv2d) with the flipped kernel, depthwise; striding
    # the correlation by `down` is the same as keeping every down-th output pixel.
    k = k.flip(list(range(k.ndim)))
    if k.ndim == 2:
        w = k[None, None].expand(C, 1, *k.shape)
        return F.conv2d(x, w, stride=down, groups=C)
    x = F.conv2d(x, k[None, None, None, :].expand(C, 1, 1, k.numel()), stride=(1, down), groups=C)
    return F.conv2d(x, k[None, None, :, None].expand(C, 1, k.numel(), 1), stride=(down, 1),
                    groups=C)


def setup_kernel(k) -> torch.Tensor:
    """A 1-D kernel (n,) -> its outer product (n, n); a square 2-D kernel as is; then
    normalised to sum 1. Returned as a float64 CPU tensor (cast at use)."""
    k = torch.as_tensor(k, dtype=torch.float64, device="cpu")
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    total = k.sum()
    if total == 0:
        raise ValueError("FIR kernel sums to 0 and cannot be normalised")
    return k / total


def _kernel(k, factor: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """setup_kernel(k) * scale on ``like``'s device and dtype; for a kernel given as numbers
    (the layers' tuples) made once per device and dtype and cached, so a forward pass makes
    no host-to-device copy (which would stall the host on CUDA)."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    if torch.is_tensor(k):
        return (setup_kernel(k) * scale).to(device=like.device, dtype=like.dtype)
    key = None if k is None else tuple(float(v) for v in k)
    return _cached_kernel(key, factor, float(scale), like.device, like.dtype)


@functools.lru_cache(maxsize=64)
def _cached_kernel(k, factor: int, scale: float, device: torch.device, dtype: torch.dtype):
    return (setup_kernel([1] * factor if k is None else k) * scale).to(device=device, dtype=dtype)


def _square_weight(w: torch.Tensor) -> int:
    if w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
        raise ValueError(f"conv weight must have shape (out_ch, in_ch, r, r) with odd r, got "
                         f"{tuple(w.shape)}")
    return w.shape[3]


def upsample_2d(x: torch.Tensor, k: Sequence[float] | torch.Tensor | None = DEFAULT_KERNEL,
                factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """FIR upsampling: (B, C, H, W) -> (B, C, H factor, W factor).

    The kernel is ``setup_kernel(k) * gain * factor**2``, so a constant image stays constant
    (times ``gain``) away from the borders (outside, pixels are zero). ``k=None`` is
    ``[1] * factor``: nearest-neighbour upsampling. Padding (with p = len(k) - factor):
    ((p + 1) // 2 + factor - 1, p // 2).
    """
    k = _kernel(k, factor, gain * factor ** 2, x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, k: Sequence[float] | torch.Tensor | None = DEFAULT_KERNEL,
                  factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """FIR downsampling: (B, C, H, W) -> (B, C, H // factor, W // factor).

    The kernel is ``setup_kernel(k) * gain``. ``k=None`` is ``[1] * factor``: average pooling.
    Padding (with p = len(k) - factor): ((p + 1) // 2, p // 2).
    """
    k = _kernel(k, factor, gain, x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: torch.Tensor, w: torch.Tensor,
                     k: Sequence[float] | torch.Tensor | None = DEFAULT_KERNEL,
                     factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Fused ``upsample_2d`` followed by ``conv2d(., w)``, padded once (StyleGAN2).

    x: (B, C, H, W); w: (O, C, r, r) with odd r (the layout of F.conv2d) ->
    (B, O, H factor, W factor).

    A strided transposed convolution (zero insertion + full correlation with w, size
    (H - 1) factor + r) is FIR-filtered with ``setup_kernel(k) * gain * factor**2`` and pad
    ((p + 1) // 2 + factor - 1, p // 2 + factor - 1), p = len(k) - factor - (r - 1).
    For factor 2 this is the Score SDE / StyleGAN2 padding; their right pad ``p // 2 + 1``
    gives a size of H factor - factor + 2, which is H factor only for factor 2.

    It equals ``conv2d(upfirdn2d(x, K, up=factor, pad=(P0 + r // 2, P1 + r // 2)), w)``
    exactly, with K, (P0, P1) the kernel and pads of ``upsample_2d``: the FIR-upsampled image
    is not cut back to H factor before the (unpadded) convolution. It therefore equals
    ``conv2d(upsample_2d(x, k), w, padding=r // 2)`` except within r // 2 pixels of the borders.
    """
    r = _square_weight(w)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {w.shape[1]} input channels, x has {x.shape[1]}")
    k = _kernel(k, factor, gain * factor ** 2, x)
    p = k.shape[0] - factor - (r - 1)
    # conv_transpose2d takes (in, out, r, r) and correlates the flipped kernel: swapping the
    # channel axes and flipping makes it the full correlation of the upsampled x with w.
    wt = w.transpose(0, 1).flip([2, 3])
    x = F.conv_transpose2d(x, wt, stride=factor)
    return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + factor - 1))


def conv_downsample_2d(x: torch.Tensor, w: torch.Tensor,
                       k: Sequence[float] | torch.Tensor | None = DEFAULT_KERNEL,
                       factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Fused ``conv2d(., w)`` followed by ``downsample_2d``, padded once (StyleGAN2).

    x: (B, C, H, W); w: (O, C, r, r) with odd r -> (B, O, H // factor, W // factor).

    FIR-filters x with ``setup_kernel(k) * gain`` and pad ((p + 1) // 2, p // 2),
    p = len(k) - factor + (r - 1), then convolves with w at stride ``factor``, no padding.
    It equals ``upfirdn2d(conv2d(x, w, padding=r - 1), K, down=factor,
    pad=(P0 - r // 2, P1 - r // 2))`` exactly (full convolution, then the pads of
    ``downsample_2d`` less r // 2), and so ``downsample_2d(conv2d(x, w, padding=r // 2), k)``
    except near the borders.
    """
    r = _square_weight(w)
    k = _kernel(k, factor, gain, x)
    p = k.shape[0] - factor + (r - 1)
    x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, w, stride=factor)


class FIRConv2d(nn.Module):
    """Conv2d with optional fused FIR up- or downsampling (the Score SDE ``Conv2d`` layer).

    (B, in_ch, H, W) -> (B, out_ch, H', W') with H' = 2 H (up), H // 2 (down) or H.
    The weight has the F.conv2d layout (out_ch, in_ch, r, r), r odd; initialisation is
    PyTorch's default for conv layers unless the caller re-initialises it.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, up: bool = False,
                 down: bool = False, resample_kernel=DEFAULT_KERNEL, bias: bool = True):
        super().__init__()
        if up and down:
            raise ValueError("FIRConv2d: choose up or down, not both")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, bias=bias)
        self.weight = conv.weight
        self.bias = conv.bias
        self.up, self.down = up, down
        self.resample_kernel = tuple(resample_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = upsample_conv_2d(x, self.weight, k=self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, k=self.resample_kernel)
        else:
            x = F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias[None, :, None, None]
        return x
