"""Pictures that people look at: sample grids of images and scatter plots of 2-D points as
uint8 (H, W, 3) arrays, PNG files and TensorBoard entries.

    picture(x, centered=True)     samples in model space -> an image grid or a scatter plot
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["to_uint8", "make_grid", "image_grid", "scatter_image", "picture", "class_rows",
           "save_png"]


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


def image_grid(images: torch.Tensor, *, min_pixels: int = 32, nrow: int | None = None,
               padding: int | None = None) -> np.ndarray:
    """uint8 images (B, C, H, W) as one grid, each pixel repeated upscale = max(1,
    min_pixels // W) times, ``padding`` pixels between images (default max(1, upscale // 2))."""
    upscale = max(1, min_pixels // images.shape[-1])
    padding = max(1, upscale // 2) if padding is None else padding
    return make_grid(images, nrow=nrow, upscale=upscale, padding=padding)


def scatter_image(points: torch.Tensor, size: int = 512, extent: float = 3.5) -> np.ndarray:
    """A (size, size, 3) uint8 scatter plot of the first two coordinates of points (N, D),
    the square [-extent, extent]^2 filling the picture (points outside are left out)."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    xy = points.detach().double().cpu().reshape(points.shape[0], -1)[:, :2]
    xy = xy[torch.isfinite(xy).all(dim=1)]
    pixels = ((xy + extent) / (2 * extent) * (size - 1)).numpy()
    for px, py in pixels:                   # a 3x3 dot per point
        px, py = float(px), float(size - 1 - py)
        draw.rectangle((px - 1, py - 1, px + 1, py + 1), fill=(20, 60, 160))
    return np.asarray(image)


def picture(x: torch.Tensor, *, centered: bool = True, max_images: int = 100,
            min_pixels: int = 32, padding: int | None = None) -> np.ndarray:
    """Samples in model space as one (H, W, 3) uint8 picture.

    Images (B, C, H, W): a grid of the first ``max_images``, each pixel repeated ``upscale``
    = max(1, min_pixels // W) times, ``padding`` pixels between images (default
    max(1, upscale // 2)); ``centered``: the data scaling (see to_uint8).
    Flat points (B, D): a scatter plot of their first two coordinates."""
    if x.ndim == 4:
        return image_grid(to_uint8(x[:max_images], centered=centered), min_pixels=min_pixels,
                          padding=padding)
    if x.ndim == 2 and x.shape[1] >= 2:
        return scatter_image(x)
    raise ValueError(f"cannot draw samples of shape {tuple(x.shape)}: expected images "
                     "(B, C, H, W) or points (B, D) with D >= 2")


def class_rows(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *, per_class: int = 10,
               centered: bool = True, min_pixels: int = 32) -> np.ndarray:
    """Images x (N, C, H, W) in model space (or already uint8) with their labels (N,) as one
    (H', W', 3) uint8 picture with one row per class 0..num_classes-1: the first
    ``per_class`` images of that class in order, a row filled up with blank (white) images
    when the class has fewer."""
    images = x if x.dtype == torch.uint8 else to_uint8(x, centered=centered)
    blank = torch.full_like(images[:1], 255)
    labels = labels.cpu()
    rows = []
    for k in range(num_classes):
        mine = images[labels == k][:per_class]
        rows.append(torch.cat([mine, blank.expand(per_class - len(mine), -1, -1, -1)]))
    return image_grid(torch.cat(rows), nrow=per_class, min_pixels=min_pixels)


def save_png(grid: np.ndarray, path) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG file; returns the path."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
