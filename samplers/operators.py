"""Linear observation operators of inverse problems, all on one footing.

An observation is y = A x (+ noise). Every operator here is a *mask in an orthonormal basis*:
A = c M U with U orthogonal (``to_basis`` / ``from_basis``), M a 0/1 selection (``known`` in
basis coordinates) and c > 0 a scale. Because the forward SDEs of sde_lib are isotropic
(x_t = alpha x_0 + std z with z ~ N(0, I)), they commute with U: the basis coordinates of x_t
are alpha U x_0 + std z~ with z~ ~ N(0, I) again. So every method (replacement, SMC, the
gradient method) works in basis coordinates, where the known coordinates are
``embed(y) = U x_0`` on M, and treats all three operators alike:

* ``Inpainting(mask)``: U = I, M = the mask (1 = known), c = 1; y = mask * x.
* ``Colorization()``: per pixel, U is the orthogonal "decorrelated colour space" of the Score
  SDE paper (App. I): basis vectors (1, 1, 1)/sqrt(3), (-2, 1, 1)/sqrt(6), (0, 1, -1)/sqrt(2);
  the first coordinate is the known one, and y = the gray image mean(R, G, B) (B, 1, H, W) =
  x~_0 / sqrt(3), so c = 1/sqrt(3).
* ``SuperResolution(factor)``: per factor x factor block (per channel), U is the Householder
  reflection that maps the block's unit mean direction u = 1/f (1, ..., 1) to the first
  coordinate; y = avg_pool2d(x, f) = x~_0 / f, so c = 1/f.

Basis coordinates may have another layout than x (super-resolution: (B, C, H/f, W/f, f^2));
``known`` broadcasts against that layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LinearOperator", "Inpainting", "Colorization", "SuperResolution",
           "decorrelated_colour_matrix"]


class LinearOperator:
    """A = scale * M U: see the module docstring. Subclasses define ``to_basis``,
    ``from_basis``, ``known`` (basis layout, bool, broadcastable), ``scale`` and ``observe``."""

    #: c of A = c M U: y = c * (U x on the known coordinates).
    scale: float = 1.0

    def check(self, x_shape) -> None:
        """A ValueError naming the problem when data of ``x_shape`` (B, ...) cannot be
        observed by this operator."""

    def to_basis(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_basis(self, x_basis: torch.Tensor) -> torch.Tensor:
        return x_basis

    def known(self, x_basis: torch.Tensor) -> torch.Tensor:
        """The known coordinates as a bool tensor broadcastable against ``x_basis``."""
        raise NotImplementedError

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """y = A x (without noise), in the observation's own layout."""
        raise NotImplementedError

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        """U x_0 on the known coordinates (zeros elsewhere) from an observation y = A x_0,
        in the basis layout."""
        raise NotImplementedError

    def residual(self, y_basis: torch.Tensor, x_basis: torch.Tensor) -> torch.Tensor:
        """The known coordinates of y_basis - x_basis (zero elsewhere), basis layout."""
        return torch.where(self.known(x_basis), y_basis - x_basis, torch.zeros_like(x_basis))


class Inpainting(LinearOperator):
    """y = mask * x; mask (broadcastable to x): 1 (or True) = known, 0 = to fill."""

    def __init__(self, mask: torch.Tensor):
        if not torch.is_tensor(mask):
            raise ValueError(f"mask must be a tensor (1 = known, 0 = to fill), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            values = mask.detach()
            if not bool(((values == 0) | (values == 1)).all()):
                raise ValueError("mask must hold only 0 (to fill) and 1 (known)")
        self.mask = mask.bool()

    def check(self, x_shape) -> None:
        x_shape = tuple(x_shape)
        mask_shape = tuple(self.mask.shape)
        try:
            shape = torch.broadcast_shapes(mask_shape, x_shape)
        except RuntimeError:
            shape = None
        if shape != x_shape or len(mask_shape) > len(x_shape):
            raise ValueError(f"the mask has shape {mask_shape}, which does not broadcast to the "
                             f"data's shape {x_shape}; give a mask of shape {x_shape} or "
                             f"(1, {', '.join(map(str, x_shape[1:]))})")

    def known(self, x_basis):
        return self.mask.to(x_basis.device)

    def observe(self, x):
        return torch.where(self.known(x), x, torch.zeros_like(x))

    def embed(self, y):
        return self.observe(y)


def decorrelated_colour_matrix(dtype=torch.float64) -> torch.Tensor:
    """U^T (3, 3), columns the orthonormal colour basis (1, 1, 1)/sqrt(3), (-2, 1, 1)/sqrt(6),
    (0, 1, -1)/sqrt(2): x~_c = sum_j U^T[j, c] x_j. Its first coordinate is sqrt(3) x the gray
    value (the decorrelated colour space of Song et al. 2021, App. I)."""
    columns = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 1.0, 1.0], [0.0, 1.0, -1.0]], dtype=dtype)
    return (columns / columns.norm(dim=1, keepdim=True)).T


class Colorization(LinearOperator):
    """y = the gray image mean over channels (B, 1, H, W) of RGB data x (B, 3, H, W)."""

    scale = 1.0 / math.sqrt(3.0)

    def check(self, x_shape) -> None:
        if len(x_shape) != 4 or x_shape[1] != 3:
            raise ValueError(f"colorization needs RGB images (B, 3, H, W); the data has shape "
                             f"{tuple(x_shape)}" + ("; 1-channel data is already gray: use "
                                                    "inpainting or super-resolution instead"
                                                    if len(x_shape) == 4 and x_shape[1] == 1
                                                    else ""))

    def _matrix(self, x):
        return decorrelated_colour_matrix().to(device=x.device, dtype=x.dtype)

    def to_basis(self, x):
        return torch.einsum("bjhw,jc->bchw", x, self._matrix(x))

    def from_basis(self, x_basis):
        return torch.einsum("bchw,jc->bjhw", x_basis, self._matrix(x_basis))

    def known(self, x_basis):
        return (torch.arange(3, device=x_basis.device) == 0).view(1, 3, 1, 1)

    def observe(self, x):
        return x.mean(dim=1, keepdim=True)

    def embed(self, y):
        if y.ndim != 4 or y.shape[1] != 1:
            raise ValueError(f"a colorization observation is a gray image (B, 1, H, W), got "
                             f"shape {tuple(y.shape)}")
        zeros = y.new_zeros(y.shape[0], 2, *y.shape[2:])
        return torch.cat([y / self.scale, zeros], dim=1)


class SuperResolution(LinearOperator):
    """y = avg_pool2d(x, factor) (B, C, H/f, W/f) of images x (B, C, H, W)."""

    def __init__(self, factor: int):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"the super-resolution factor must be an integer >= 2, got {factor!r}")
        self.factor = factor
        self.scale = 1.0 / factor

    def check(self, x_shape) -> None:
        f = self.factor
        if len(x_shape) != 4 or x_shape[2] % f or x_shape[3] % f:
            raise ValueError(f"super-resolution by {f} needs images (B, C, H, W) with H and W "
                             f"divisible by {f}; the data has shape {tuple(x_shape)}")

    def _householder(self, x):
        """H (f^2, f^2), symmetric and orthogonal, H e_0 = u = (1, ..., 1)/f."""
        n = self.factor ** 2
        u = torch.full((n,), 1.0 / self.factor, dtype=torch.float64)
        v = u.clone()
        v[0] -= 1.0
        h = torch.eye(n, dtype=torch.float64) - 2.0 * torch.outer(v, v) / (v @ v)
        return h.to(device=x.device, dtype=x.dtype)

    def to_basis(self, x):
        b, c, hh, ww = x.shape
        f = self.factor
        blocks = x.reshape(b, c, hh // f, f, ww // f, f).permute(0, 1, 2, 4, 3, 5)
        return blocks.reshape(b, c, hh // f, ww // f, f * f) @ self._householder(x)

    def from_basis(self, x_basis):
        b, c, h, w, _ = x_basis.shape
        f = self.factor
        blocks = (x_basis @ self._householder(x_basis)).reshape(b, c, h, w, f, f)
        return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h * f, w * f)

    def known(self, x_basis):
        return (torch.arange(x_basis.shape[-1], device=x_basis.device) == 0)

    def observe(self, x):
        return F.avg_pool2d(x, self.factor)

    def embed(self, y):
        if y.ndim != 4:
            raise ValueError(f"a super-resolution observation is an image batch (B, C, h, w), "
                             f"got shape {tuple(y.shape)}")
        zeros = y.new_zeros(*y.shape, self.factor ** 2 - 1)
        return torch.cat([(y / self.scale).unsqueeze(-1), zeros], dim=-1)
