"""Images that people look at: sample grids as uint8 arrays, PNG files and TensorBoard entries."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["to_uint8", "make_grid", "save_png"]


def to_uint8(x: torch.Tensor, *, centered: bool) -> torch.Tensor:
    """Model-space images (B, C, H, W) -> uint8 pixels (B, C, H, W) on the CPU.

    ``centered``: the data scaling of the run (config.data.centered): pixels in [-1, 1] when
    True, [0, 1] when False. Values outside the range are clipped; NaNs become 0.
    """
    x = x.detach().float().cpu()
    if centered:
        x = (x + 1) / 2
    x = torch.nan_to_num(x, nan=0.0).clamp(0, 1)
    return (x * 255 + 0.5).floor().to(torch.uint8)


def make_grid(images: torch.Tensor, *, nrow: int | None = None, padding: int = 1,
              pad_value: int = 255, upscale: int = 1) -> np.ndarray:
    """uint8 images (B, C, H, W) with C in {1, 3} -> one (rows*(H+p)+p, cols*(W+p)+p, 3) uint8
    grid, ``nrow`` images per row (default: ceil(sqrt(B))), each image enlarged ``upscale``
    times by pixel repetition (8x8 digits are easier to see at upscale=4)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid needs uint8 images of shape (B, 1 or 3, H, W), got "
                         f"{tuple(images.shape)} {images.dtype}; convert with to_uint8 first")
    if upscale > 1:
        images = images.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    batch, _, height, width = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(batch)))
    rows = math.ceil(batch / cols)
    grid = torch.full((rows * (height + padding) + padding, cols * (width + padding) + padding, 3),
                      pad_value, dtype=torch.uint8)
    for index in range(batch):      # a handful of images; not a solver loop
        r, c = divmod(index, cols)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top:top + height, left:left + width] = images[index].permute(1, 2, 0)
    return grid.numpy()


def save_png(grid: np.ndarray, path) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG file; returns the path."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
