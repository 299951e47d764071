"""FIR up/down-sampling (models/fir.py) against a slow reference written from the definition
of StyleGAN2's upfirdn2d, and the NCSN++ helpers against the compositions they must equal."""
import itertools

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from models import fir


def reference_upfirdn2d(x, kernel, up, down, pad):
    """Straight from the definition, one output pixel at a time (float64 numpy).

    The upsampled-and-padded image U has U[r, s] = x[(r - pad0) / up, (s - pad0) / up] where
    both are integers inside the image, else 0 (a negative pad0 starts inside the image, a
    negative pad1 stops early); out[i, j] = sum_{a, b} U[i down + a, j down + b] k[kh-1-a, kw-1-b]
    (true convolution), for the positions where the kernel lies fully inside U.
    """
    x = np.asarray(x, dtype=np.float64)
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim == 1:
        k = np.outer(k, k)
    pad0, pad1 = pad
    B, C, H, W = x.shape
    kh, kw = k.shape
    n_h, n_w = H * up + pad0 + pad1, W * up + pad0 + pad1
    out_h, out_w = (n_h - kh) // down + 1, (n_w - kw) // down + 1

    def sample(r, s):
        rr, ss = r - pad0, s - pad0
        if rr < 0 or ss < 0 or rr % up or ss % up or rr // up >= H or ss // up >= W:
            return np.zeros((B, C))
        return x[:, :, rr // up, ss // up]

    out = np.zeros((B, C, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            acc = np.zeros((B, C))
            for a in range(kh):
                for b in range(kw):
                    acc += sample(i * down + a, j * down + b) * k[kh - 1 - a, kw - 1 - b]
            out[:, :, i, j] = acc
    return out


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# (up, down, (pad0, pad1), kernel shape, H, W): odd/even, non-square images and kernels,
# negative pads (crops), 1-D separable kernels.
CASES = [
    (1, 1, (0, 0), (3, 3), 5, 5),
    (1, 1, (1, 1), (3, 3), 4, 6),
    (2, 1, (2, 1), (4, 4), 5, 4),
    (2, 1, (1, 2), (4,), 3, 6),
    (1, 2, (1, 1), (4, 4), 7, 6),
    (1, 2, (0, 0), (2, 2), 6, 5),
    (3, 1, (2, 3), (5, 5), 3, 4),
    (1, 3, (1, 2), (3, 3), 8, 7),
    (2, 2, (1, 2), (3, 4), 5, 6),
    (2, 3, (3, 0), (2, 5), 4, 5),
    (3, 2, (0, 4), (6,), 3, 3),
    (2, 1, (-1, -2), (3, 3), 5, 6),
    (1, 1, (-2, 1), (2, 2), 6, 5),
    (1, 2, (-1, -1), (1, 1), 7, 8),
    (2, 2, (-3, 2), (4, 3), 4, 5),
    (3, 3, (-2, -1), (4,), 4, 3),
    (1, 1, (0, 0), (1, 1), 1, 1),
    (2, 1, (0, 0), (1, 4), 1, 3),
    (4, 1, (3, 2), (4, 4), 2, 3),
    (1, 4, (2, 2), (5, 5), 9, 6),
]


@pytest.mark.parametrize("up, down, pad, kshape, H, W", CASES,
                         ids=[f"u{c[0]}d{c[1]}p{c[2][0]},{c[2][1]}k{'x'.join(map(str, c[3]))}"
                              f"_{c[4]}x{c[5]}" for c in CASES])
def test_upfirdn2d_matches_reference(up, down, pad, kshape, H, W):
    g = _gen(hash((up, down, pad, kshape, H, W)) % 2 ** 31)
    x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    k = torch.randn(*kshape, generator=g, dtype=torch.float64)  # not symmetric: flips matter
    out = fir.upfirdn2d(x, k, up=up, down=down, pad=pad)
    ref = reference_upfirdn2d(x.numpy(), k.numpy(), up, down, pad)
    kh, kw = (kshape * 2) if len(kshape) == 1 else kshape
    assert out.shape == (2, 3, (H * up + sum(pad) - kh) // down + 1,
                         (W * up + sum(pad) - kw) // down + 1)
    assert out.shape == ref.shape
    err = np.abs(out.numpy() - ref).max()
    assert err < 1e-12, err


def test_upfirdn2d_is_convolution_not_correlation():
    """A delta image filtered by an asymmetric kernel reproduces the kernel itself."""
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 1, 1] = 1
    k = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(2, 3)
    out = fir.upfirdn2d(x, k, pad=(1, 1))  # (5 - 2 + 1, 5 - 3 + 1) = (4, 3)
    # out[i, j] = sum_ab U[i + a, j + b] k[1 - a, 2 - b] with U the delta at (2, 2)
    assert out.shape == (1, 1, 4, 3)
    torch.testing.assert_close(out[0, 0, 1:3], k, rtol=0, atol=0)  # correlation would flip it
    assert out[0, 0, 0].abs().sum() == 0 and out[0, 0, 3].abs().sum() == 0


def test_upfirdn2d_per_axis_pads():
    x = torch.randn(1, 2, 4, 5, generator=_gen(), dtype=torch.float64)
    k = torch.randn(3, 3, generator=_gen(1), dtype=torch.float64)
    out = fir.upfirdn2d(x, k, pad=(2, -1, 1, 0))  # W: (2, -1), H: (1, 0)
    full = fir.upfirdn2d(x, k, pad=(2, 2))
    torch.testing.assert_close(out, full[:, :, 1:-2, :-3], rtol=0, atol=1e-14)


def test_setup_kernel():
    k = fir.setup_kernel([1, 3, 3, 1])
    expected = torch.tensor([1.0, 3, 3, 1], dtype=torch.float64)
    torch.testing.assert_close(k, torch.outer(expected, expected) / 64, rtol=0, atol=0)
    torch.testing.assert_close(fir.setup_kernel([[1.0, 1.0], [2.0, 0.0]]),
                               torch.tensor([[0.25, 0.25], [0.5, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        fir.setup_kernel(torch.ones(2, 3))


# Upsampling keeps constants when every polyphase component of the kernel has the same sum
# (true of these; not of (1, 3, 3, 1) with factor 3: 2, 3, 3); downsampling for any kernel.
@pytest.mark.parametrize("gain", [1.0, 2.5])
@pytest.mark.parametrize("factor, k", [(2, (1, 3, 3, 1)), (2, (1, 2, 1)), (2, None),
                                       (3, (1, 2, 3, 2, 1)), (3, None)])
def test_resampling_keeps_constants_in_the_interior(gain, k, factor):
    x = torch.full((1, 2, 9, 8), 3.0, dtype=torch.float64)
    up = fir.upsample_2d(x, k, factor=factor, gain=gain)
    down = fir.downsample_2d(x, k, factor=factor, gain=gain)
    assert up.shape == (1, 2, 9 * factor, 8 * factor)
    assert down.shape == (1, 2, 9 // factor, 8 // factor)
    m = 2 * factor  # the borders see the zeros outside the image
    torch.testing.assert_close(up[..., m:-m, m:-m], torch.full_like(up[..., m:-m, m:-m], 3 * gain))
    torch.testing.assert_close(down[..., 1:-1, 1:-1],
                               torch.full_like(down[..., 1:-1, 1:-1], 3 * gain))
    if k == (1, 3, 3, 1):  # and the border really is different: the zero padding is seen
        assert abs(up[0, 0, 0, 0].item() - 3 * gain) > 0.1


def test_box_kernel_is_nearest_neighbour_and_average_pooling():
    x = torch.randn(2, 3, 6, 4, generator=_gen(), dtype=torch.float64)
    up = fir.upsample_2d(x, None, factor=2)
    torch.testing.assert_close(up, x.repeat_interleave(2, 2).repeat_interleave(2, 3),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(fir.downsample_2d(x, None, factor=2), F.avg_pool2d(x, 2),
                               rtol=0, atol=1e-15)


def test_1331_upsampling_known_values():
    """[1,3,3,1]/4 per axis (factor 2) is linear interpolation at +-1/4 pixel."""
    x = torch.tensor([0.0, 4.0, 8.0, 12.0], dtype=torch.float64)[None, None, None, :]
    x = x.expand(1, 1, 6, 4)
    up = fir.upsample_2d(x)
    row = up[0, 0, 5]  # an interior row: the vertical filter sums to 1 there
    expected = torch.tensor([0.0, 1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("H, W", [(8, 8), (7, 5), (6, 9)])
def test_down_of_up_shapes(H, W):
    x = torch.randn(2, 3, H, W, generator=_gen())
    y = fir.downsample_2d(fir.upsample_2d(x))
    assert y.shape == x.shape
    assert fir.upsample_2d(fir.downsample_2d(x)).shape == (2, 3, H // 2 * 2, W // 2 * 2)


def _upsample_pads(kk, f):
    """The pads of upsample_2d: kernel setup_kernel(k) f^2, p = kk - f."""
    p = kk - f
    return (p + 1) // 2 + f - 1, p // 2


def _downsample_pads(kk, f):
    p = kk - f
    return (p + 1) // 2, p // 2


FUSED = list(itertools.product([2, 3], [1, 3, 5], [(1, 3, 3, 1), (1, 2, 1), None]))


@pytest.mark.parametrize("factor, r, k", FUSED)
def test_upsample_conv_equals_upsample_then_conv(factor, r, k):
    """Upsampling is linear and shift-invariant, so fusing it with the conv is exact when the
    FIR-upsampled image keeps r // 2 more pixels on each side for the unpadded conv; against
    upsample_2d followed by a zero-padded 'same' conv it differs only at the borders."""
    g = _gen(factor * 100 + r)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, r, r, generator=g, dtype=torch.float64)
    out = fir.upsample_conv_2d(x, w, k, factor=factor, gain=1.5)
    assert out.shape == (2, 4, 5 * factor, 6 * factor)
    kern = fir.setup_kernel([1] * factor if k is None else k) * 1.5 * factor ** 2
    p0, p1 = _upsample_pads(kern.shape[0], factor)
    c = r // 2
    exact = F.conv2d(fir.upfirdn2d(x, kern, up=factor, pad=(p0 + c, p1 + c)), w)
    err = (out - exact).abs().max().item()
    assert err < 1e-12, err
    same = F.conv2d(fir.upsample_2d(x, k, factor=factor, gain=1.5), w, padding=c)
    if r == 1:  # a 1x1 conv has no border effect
        torch.testing.assert_close(out, same, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(out[..., c:-c, c:-c], same[..., c:-c, c:-c], rtol=0, atol=1e-12)
        if factor == 2 and k == (1, 3, 3, 1):  # this kernel spills past the borders
            assert (out - same).abs().max() > 1e-3


@pytest.mark.parametrize("factor, r, k", FUSED)
def test_conv_downsample_equals_conv_then_downsample(factor, r, k):
    """Exact against the full (padding r - 1) conv followed by downsampling with the pads of
    downsample_2d less r // 2 (negative pads crop); against a 'same' conv followed by
    downsample_2d only away from the borders."""
    g = _gen(factor * 10 + r)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, r, r, generator=g, dtype=torch.float64)
    out = fir.conv_downsample_2d(x, w, k, factor=factor, gain=0.7)
    assert out.shape == (2, 4, 9 // factor, 8 // factor)
    kern = fir.setup_kernel([1] * factor if k is None else k) * 0.7
    p0, p1 = _downsample_pads(kern.shape[0], factor)
    c = r // 2
    exact = fir.upfirdn2d(F.conv2d(x, w, padding=r - 1), kern, down=factor, pad=(p0 - c, p1 - c))
    err = (out - exact).abs().max().item()
    assert err < 1e-12, err
    same = fir.downsample_2d(F.conv2d(x, w, padding=c), k, factor=factor, gain=0.7)
    if r == 1:
        torch.testing.assert_close(out, same, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(out[..., 1:-1, 1:-1], same[..., 1:-1, 1:-1], rtol=0, atol=1e-12)


def test_gradcheck():
    g = _gen(3)
    x = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, k: fir.upfirdn2d(x, k, up=2, down=2, pad=(2, -1)),
                                    (x, k))
    assert torch.autograd.gradcheck(lambda x, w: fir.upsample_conv_2d(x, w), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: fir.conv_downsample_2d(x, w), (x, w))
    assert torch.autograd.gradgradcheck(lambda x: fir.upsample_2d(x), (x,))


@pytest.mark.parametrize("fn", ["upfirdn2d", "upsample_2d", "downsample_2d", "upsample_conv_2d",
                                "conv_downsample_2d"])
def test_float32_and_channels_last(fn):
    g = _gen(4)
    x64 = torch.randn(2, 3, 8, 6, generator=g, dtype=torch.float64)
    w64 = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)

    def call(x, w):
        if fn == "upfirdn2d":
            return fir.upfirdn2d(x, [1.0, 3.0, 2.0], up=2, down=1, pad=(1, 0))
        if fn in ("upsample_conv_2d", "conv_downsample_2d"):
            return getattr(fir, fn)(x, w)
        return getattr(fir, fn)(x)

    ref = call(x64, w64)
    x32, w32 = x64.float(), w64.float()
    out32 = call(x32, w32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, ref.float(), rtol=1e-5, atol=1e-5)
    out_cl = call(x32.to(memory_format=torch.channels_last),
                  w32.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out32, rtol=1e-6, atol=1e-6)


def test_fir_conv2d_module():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for kw, size in [(dict(up=True), 16), (dict(down=True), 4), ({}, 8)]:
        layer = fir.FIRConv2d(3, 5, 3, **kw)
        out = layer(x)
        assert out.shape == (2, 5, size, size)
        if kw.get("up"):
            expected = fir.upsample_conv_2d(x, layer.weight)
        elif kw.get("down"):
            expected = fir.conv_downsample_2d(x, layer.weight)
        else:
            expected = F.conv2d(x, layer.weight, padding=1)
        torch.testing.assert_close(out, expected + layer.bias[None, :, None, None])
    with pytest.raises(ValueError, match="odd"):
        fir.FIRConv2d(3, 5, 2)
