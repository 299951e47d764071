"""A small residual MLP score network for 2-D toy data and flat (or flattened) data."""
from __future__ import annotations

import math

import torch
from torch import nn

from .embeddings import GaussianFourierProjection, sinusoidal_embedding

__all__ = ["MLPScoreNet"]

EMBEDDINGS = ("positional", "fourier")


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.fc1(self.act(self.norm(h))) + self.emb(emb)
        return h + self.fc2(self.act(out))


class MLPScoreNet(nn.Module):
    """Residual MLP: x (B, *data_shape) and a (B,) noise conditioning -> (B, *data_shape).

    What the output means is decided by ``models.get_score_fn``: predicted noise for VP and
    sub-VP SDEs, the score (or the score times sigma, ``scale_by_sigma``) for VE SDEs.

    Args:
        data_shape: shape of one sample, e.g. (2,) or (1, 8, 8); it is flattened.
        hidden_dim: width of the residual blocks.
        num_blocks: number of residual blocks.
        embedding_type: "positional" (sinusoidal of the value: 999 t or a level index) or
            "fourier" (Gaussian Fourier features of log(value): for sigma conditioning).
        embedding_dim: size of the noise embedding.
        fourier_scale: std of the Fourier frequencies.
        num_classes: if set, a learned class embedding is added (class-conditional model).
        learn_sigma: output (B, 2 D, ...) for data (B, D, ...): [network output, variance
            interpolation v] along dim 1 (Improved DDPM's learned variances).
    """

    def __init__(self, *, data_shape, hidden_dim: int = 256, num_blocks: int = 3,
                 embedding_type: str = "positional", embedding_dim: int = 128,
                 fourier_scale: float = 16.0, num_classes: int | None = None,
                 learn_sigma: bool = False):
        super().__init__()
        if embedding_type not in EMBEDDINGS:
            raise ValueError(f"embedding_type={embedding_type!r} is not known; valid: "
                             f"{', '.join(EMBEDDINGS)}")
        self.data_shape = tuple(int(d) for d in data_shape)
        dim = math.prod(self.data_shape)
        self.embedding_type = embedding_type
        self.embedding_dim = embedding_dim
        self.fourier = (GaussianFourierProjection(embedding_dim, fourier_scale)
                        if embedding_type == "fourier" else None)
        self.emb_mlp = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.SiLU(),
                                     nn.Linear(hidden_dim, hidden_dim))
        self.class_emb = nn.Embedding(num_classes, hidden_dim) if num_classes else None
        self.inp = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden_dim, hidden_dim) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.learn_sigma = bool(learn_sigma)
        self.out = nn.Linear(hidden_dim, dim * (2 if learn_sigma else 1))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _embed(self, cond: torch.Tensor, class_labels: torch.Tensor | None, dtype) -> torch.Tensor:
        cond = cond.to(dtype)
        if self.fourier is not None:
            emb = self.fourier(torch.log(cond))
        else:
            emb = sinusoidal_embedding(cond, self.embedding_dim)
        emb = self.emb_mlp(emb)
        if self.class_emb is not None:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels (B,)")
            emb = emb + self.class_emb(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to an MLP score network built without "
                             "num_classes (an unconditional model): drop the labels or train "
                             "a class-conditional model (config.model.num_classes)")
        return emb

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, *data_shape); cond: (B,) noise conditioning; class_labels: (B,) long."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"MLPScoreNet expects inputs of shape (B, {self.data_shape}), got "
                             f"{tuple(x.shape)}")
        emb = self._embed(cond, class_labels, x.dtype)
        h = self.inp(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(nn.functional.silu(self.out_norm(h)))
        if self.learn_sigma:
            return out.reshape(x.shape[0], 2 * x.shape[1], *x.shape[2:])
        return out.reshape(x.shape)
