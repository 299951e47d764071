"""The image-folder reader of the high-resolution data sets: the lazy folder data set (read
per batch) gives the batches of the in-memory one; the centre crop; the switch at
config.data.max_in_memory_gb; one-line errors for missing data.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from run_lib.datasets import FolderImages, build_dataset, load_image_folder

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    path = ROOT / "configs" / name
    spec = importlib.util.spec_from_file_location(f"highres_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ----------------------------------------------------------------------------- tiny folders

def write_folder(root: Path, sizes, *, seed: int = 0, classes=("a", "b"), jpeg_every: int = 0,
                 gray_every: int = 0) -> Path:
    """Random images of the (width, height) ``sizes`` under root/train/<class>/, alternating
    classes; every ``jpeg_every``-th a JPEG, every ``gray_every``-th a grayscale PNG."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i, (width, height) in enumerate(sizes):
        folder = root / "train" / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        if gray_every and i % gray_every == gray_every - 1:
            Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(
                folder / f"{i:03d}.png")
            continue
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if jpeg_every and i % jpeg_every == jpeg_every - 1:
            image.save(folder / f"{i:03d}.jpg", quality=90)
        else:
            image.save(folder / f"{i:03d}.png")
    return root


def folder_config(data_dir, *, image_size=8, centered=False, random_flip=True,
                  dequantize=False, center_crop=0, max_in_memory_gb=4.0):
    """A config reading the folder ``data_dir`` (the CIFAR-10 NCSN++ one on other data)."""
    config = load("ve/ncsnpp_cifar.py")
    config.data.update(name="folder", data_dir=str(data_dir), image_size=image_size,
                       centered=centered, random_flip=random_flip, dequantize=dequantize,
                       center_crop=center_crop, max_in_memory_gb=max_in_memory_gb)
    return config


# ----------------------------------------------------------------------------- the reader

def test_lazy_folder_gives_the_batches_of_the_in_memory_one(tmp_path):
    """11 images of mixed sizes, formats and modes, two classes: the per-batch reader has the
    in-memory reader's images, labels, shape and indexing, and identical batches (order,
    flips, dequantization noise) for every epoch, rank and drop_last setting."""
    sizes = [(20, 14), (14, 20), (16, 16), (31, 17), (9, 12), (40, 40), (12, 9), (18, 18),
             (25, 11), (13, 13), (22, 30)]
    write_folder(tmp_path / "data", sizes, jpeg_every=4, gray_every=5)
    eager = build_dataset(folder_config(tmp_path / "data", dequantize=True))
    lazy = build_dataset(folder_config(tmp_path / "data", dequantize=True, max_in_memory_gb=0))
    assert isinstance(eager.images, torch.Tensor) and isinstance(lazy.images, FolderImages)
    assert len(lazy) == len(eager) == 11 and lazy.shape == eager.shape == (3, 8, 8)
    assert lazy.images.shape == tuple(eager.images.shape)
    torch.testing.assert_close(lazy.labels, eager.labels, rtol=0, atol=0)
    assert eager.labels.tolist() == [0] * 6 + [1] * 5     # sorted by class folder
    torch.testing.assert_close(lazy.images[:], eager.images, rtol=0, atol=0)
    for index in (3, -1, slice(2, 9, 3), torch.tensor([10, 0, 4]), [5, 5], np.array([7])):
        torch.testing.assert_close(lazy.images[index], eager.images[index], rtol=0, atol=0)
    image, label = lazy[6]
    assert image.dtype == torch.uint8 and torch.equal(image, eager[6][0]) and label == 1
    assert eager.images.float().std() > 20          # random pixels, not a constant image
    for epoch in (0, 1):
        for rank, world in ((0, 1), (0, 2), (1, 2)):
            for drop_last in (True, False):
                options = dict(shuffle=True, seed=3, epoch=epoch, rank=rank, world_size=world,
                               drop_last=drop_last)
                a, b = list(eager.batches(2, **options)), list(lazy.batches(2, **options))
                shard = 11 // world
                assert len(a) == len(b) == (shard // 2 if drop_last else (shard + 1) // 2)
                for (xa, ya), (xb, yb) in zip(a, b):
                    torch.testing.assert_close(xb, xa, rtol=0, atol=0)
                    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    assert len(list(lazy.batches(2, shuffle=False))) == 5
    with pytest.raises(IndexError):
        lazy.images[11]
    with pytest.raises(TypeError, match="index"):
        lazy.images[torch.ones(11, dtype=torch.bool)]


def test_in_memory_up_to_max_in_memory_gb(tmp_path):
    """The folder is held in memory when its decoded bytes are at most the limit."""
    write_folder(tmp_path / "data", [(12, 12)] * 6)
    nbytes = 6 * 3 * 8 * 8
    at = build_dataset(folder_config(tmp_path / "data", max_in_memory_gb=nbytes / 2 ** 30))
    below = build_dataset(folder_config(tmp_path / "data",
                                        max_in_memory_gb=(nbytes - 1) / 2 ** 30))
    assert isinstance(at.images, torch.Tensor) and isinstance(below.images, FolderImages)
    assert below.images.nbytes == nbytes


def test_center_crop_before_the_resize(tmp_path):
    """A 30 x 40 image whose centre 10 x 10 square is red and the rest blue: with
    center_crop 10 the 5-px image is all red (CelebA's 140-px crop); without it the
    shorter side is resized to 5 and blue remains. A crop larger than an image is refused."""
    from PIL import Image
    pixels = np.zeros((40, 30, 3), np.uint8)
    pixels[:] = (0, 0, 255)
    pixels[15:25, 10:20] = (255, 0, 0)
    (tmp_path / "train").mkdir()
    Image.fromarray(pixels).save(tmp_path / "train" / "face.png")
    for lazy in (False, True):
        cropped, _ = load_image_folder(tmp_path, image_size=5, center_crop=10, lazy=lazy)
        cropped = np.asarray(cropped[:])
        assert cropped.shape == (1, 3, 5, 5)
        np.testing.assert_array_equal(cropped[0], np.broadcast_to(
            np.array([255, 0, 0], np.uint8)[:, None, None], (3, 5, 5)))
    whole, _ = load_image_folder(tmp_path, image_size=5)
    assert whole[0, 2].max() > 200 and whole[0, 0].min() < 50
    config = folder_config(tmp_path, image_size=5, center_crop=31)
    with pytest.raises(ValueError, match=r"face.png is 30x40, smaller than "
                                         r"config.data.center_crop=31"):
        build_dataset(config)


def test_missing_or_empty_folder_errors_say_the_layout(tmp_path):
    config = folder_config(tmp_path / "nowhere")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    write_folder(tmp_path / "only_train", [(8, 8)] * 2)
    cases = [(tmp_path / "nowhere", "train", "is missing"),
             (tmp_path / "empty", "train", "has no PNG/JPEG images"),
             (tmp_path / "only_train", "test", "no test images")]
    for data_dir, split, what in cases:
        config.data.data_dir = str(data_dir)
        with pytest.raises(FileNotFoundError) as info:
            build_dataset(config, split)
        message = str(info.value)
        assert "\n" not in message and what in message, message
        assert "config.data.data_dir" in message and "<data_dir>/train/*.png" in message
        assert "<data_dir>/train/<class>/*.png" in message
