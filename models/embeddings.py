"""Noise-level embeddings shared by the score networks."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["sinusoidal_embedding", "GaussianFourierProjection"]


def sinusoidal_embedding(cond: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of a (B,) conditioning value (DDPM, Ho et al.
    2020, App. B; the VP wrapper feeds 999 t or the discrete step index).

    Returns (B, dim) in cond's floating dtype (float32 for integer input).
    """
    if cond.ndim != 1:
        raise ValueError(f"conditioning must have shape (B,), got {tuple(cond.shape)}")
    cond = cond if cond.is_floating_point() else cond.float()
    half = dim // 2
    scale = math.log(max_positions) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=cond.device, dtype=cond.dtype) * -scale)
    args = cond[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2 pi W c), cos(2 pi W c)] of a (B,) value c with fixed
    W ~ N(0, scale^2) (Tancik et al. 2020; NCSN++ applies it to log sigma)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"GaussianFourierProjection needs an even dim, got {dim}")
        self.W = nn.Parameter(torch.randn(dim // 2) * scale, requires_grad=False)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, dim)."""
        # (c W) 2 pi in this order, as the Score SDE code: the same float32 rounding, so a
        # published NCSN++ checkpoint gives its outputs to ~2e-6 rather than ~3e-5.
        args = cond[:, None] * self.W[None, :].to(cond.dtype) * 2 * math.pi
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)
