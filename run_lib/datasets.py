"""Data sets for training and evaluation: image readers, 2-D toy mixtures, scaling and a
shardable batch iterator.

Every reader returns ``(images, labels)``: ``images`` a uint8 numpy array (N, C, H, W) with
values 0..255, ``labels`` an int64 array (N,). ``build_dataset(config, split)`` turns the
config's data group into an ``ImageDataset`` (a torch Dataset of uint8 images) whose
``batches(...)`` yields float batches scaled for the network.

Data sets (``config.data.name``):

- ``digits``: the 8x8 handwritten digits that ship inside scikit-learn (1797 images, no
  download). Pixel values 0..16 become uint8 ``round(x * 255 / 16)`` (0 -> 0, 8 -> 128,
  16 -> 255; the one tie, x = 8 -> 127.5, rounds to even: 128). Split: the first 1500
  images are ``train``, the last 297 ``test`` (scikit-learn's fixed order: the same split
  on every machine).
- ``cifar10``: the standard python archive ``cifar-10-python.tar.gz`` (or its extracted
  folder ``cifar-10-batches-py``) in ``config.data.data_dir``. Downloaded from the official
  URL only when it is missing and a download is allowed (``config.data.download``).
- ``mnist``: the standard IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``)
  in ``config.data.data_dir``. Never downloaded.
- ``folder``: PNG/JPEG images under ``config.data.data_dir`` (``<data_dir>/<split>/`` when
  that folder exists), optionally center-cropped to ``config.data.center_crop`` first (CelebA:
  140), then resized (shorter side, bicubic) and center-cropped to ``image_size``; labels from
  the first level of subfolders (sorted), 0 when the images lie directly in the folder. Read
  into memory when the decoded images take at most ``config.data.max_in_memory_gb`` GiB
  (default 4), else read per batch from disk (``FolderImages``): LSUN, FFHQ, CelebA-HQ.
- the toy distributions of ``sde_lib.TOY_DISTRIBUTIONS`` (``eight_modes``, ``spread_gaussian``):
  ``MixtureDataset``, config.data.train_size / test_size points (float32 (N, D)) drawn from
  the closed-form mixture with fixed seeds (the same split on every machine); labels are
  the mixture components.

Every data set has the same interface for the training loop: ``len(dataset)``,
``dataset.batches(batch_size, shuffle=, seed=, epoch=, rank=, world_size=)`` yielding
float32 ``(x, labels)``, and ``dataset.density``: the closed-form density
(``sde_lib.GaussianMixture``) when there is one, which adds exact evaluations
(run_lib.exact), else None.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import sde_lib

__all__ = ["DATASETS", "ImageDataset", "MixtureDataset", "build_dataset", "dataset_names",
           "load_digits_images", "load_cifar10", "load_mnist", "load_image_folder", "read_idx",
           "list_image_folder", "FolderImages", "MAX_IN_MEMORY_GB",
           "restricted_loads", "preprocess", "shard_indices", "CIFAR10_URL", "CIFAR10_MD5"]

SPLITS = ("train", "test")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

DIGITS_NUM_TEST = 297


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------- digits

def load_digits_images(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 (N, 1, 8, 8) images and int64 labels.

    0..16 -> round(x * 255 / 16). ``train``: the first 1500 of the 1797 images; ``test``:
    the last 297 (scikit-learn's fixed order).
    """
    _check_split(split)
    from sklearn.datasets import load_digits
    digits = load_digits()
    values = np.asarray(digits.images, dtype=np.float64)            # (1797, 8, 8), 0..16
    images = np.rint(values * 255.0 / 16.0).astype(np.uint8)[:, None]
    labels = np.asarray(digits.target, dtype=np.int64)
    cut = len(images) - DIGITS_NUM_TEST
    part = slice(None, cut) if split == "train" else slice(cut, None)
    return np.ascontiguousarray(images[part]), labels[part].copy()


# ----------------------------------------------------------------------------- CIFAR-10

def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles bytes with protocol < 3 as _codecs.encode(str, 'latin1'); nothing else.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError("refused _codecs.encode call other than latin1 of a str")
    return text.encode("latin1")


def _allowed_globals() -> dict:
    reconstruct = np.empty(0).__reduce__()[0]       # numpy's _reconstruct, under any numpy
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR batches hold: dicts, lists, bytes/str, ints and numpy
    arrays. Every other global (os.system, builtins.eval, ...) is refused before it is
    looked up, so a malicious pickle cannot run code."""

    def find_class(self, module, name):
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refused to unpickle global {module}.{name}: "
                "a CIFAR-10 batch holds only dicts, lists and numpy arrays")
        return allowed


def restricted_loads(data: bytes):
    """``pickle.loads(data, encoding='bytes')`` limited to the globals of a CIFAR batch."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _parse_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = restricted_loads(raw)
    except Exception as error:  # noqa: BLE001 - a refused global or a damaged pickle
        raise pickle.UnpicklingError(f"{source} is not a readable CIFAR-10 batch: "
                                     f"{' '.join(str(error).split())}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{source} is not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
            or len(labels) != len(data)):
        raise ValueError(f"{source}: expected uint8 data (N, 3072) and N labels, got "
                         f"{data.dtype} {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_archive(path: Path, split: str) -> list:
    """The (images, labels) of the split's batches in the archive ``path``, read in memory:
    nothing is extracted, so no path in the archive is used."""
    parts = []
    with tarfile.open(path, "r:*") as tar:
        for name in CIFAR10_BATCHES[split]:
            member_name = f"{CIFAR10_FOLDER}/{name}"
            try:
                member = tar.getmember(member_name)
            except KeyError:
                raise FileNotFoundError(f"{path} has no member {member_name}") from None
            if not member.isfile():
                raise ValueError(f"{path}: {member_name} is not a regular file")
            parts.append(_parse_cifar_batch(tar.extractfile(member).read(),
                                            f"{path}:{member_name}"))
    return parts


def _read_cifar(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    if path.is_dir():
        for name in CIFAR10_BATCHES[split]:
            member = path / name
            if not member.is_file():
                raise FileNotFoundError(f"CIFAR-10 batch {member} is missing")
            parts.append(_parse_cifar_batch(member.read_bytes(), str(member)))
    else:
        try:
            parts = _read_cifar_archive(path, split)
        except (tarfile.TarError, EOFError, zlib.error) as error:
            reason = " ".join(str(error).split())
            raise ValueError(f"{path} is not a readable tar.gz archive ({type(error).__name__}: "
                             f"{reason}); it is damaged or truncated: download "
                             f"{CIFAR10_ARCHIVE} again from {CIFAR10_URL}") from error
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    return images, np.concatenate([p[1] for p in parts])


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(data_dir) -> Path:
    """Download the official archive into ``data_dir`` (temporary file, md5 check, rename)."""
    target = Path(data_dir) / CIFAR10_ARCHIVE
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{CIFAR10_ARCHIVE}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(CIFAR10_URL, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
        md5 = _md5(Path(tmp))
        if md5 != CIFAR10_MD5:
            raise OSError(f"downloaded {CIFAR10_URL} has md5 {md5}, expected {CIFAR10_MD5}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_cifar10(data_dir, split: str = "train", *, download: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 as uint8 (N, 3, 32, 32) images and int64 labels (50000 train, 10000 test).

    Reads ``data_dir/cifar-10-batches-py/`` if it exists, else ``data_dir/cifar-10-python.tar.gz``
    (without extracting it). When neither exists it downloads the archive if ``download``,
    and otherwise raises FileNotFoundError saying where to put the file.
    """
    _check_split(split)
    data_dir = Path(data_dir)
    folder, archive = data_dir / CIFAR10_FOLDER, data_dir / CIFAR10_ARCHIVE
    if folder.is_dir():
        return _read_cifar(folder, split)
    if not archive.is_file():
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found: put {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) at {archive} "
                f"or its extracted folder at {folder}, or set config.data.download=True")
        download_cifar10(data_dir)
    return _read_cifar(archive, split)


# ----------------------------------------------------------------------------- MNIST (IDX)

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or .gz): magic 0x0000 <type> <ndim>, then ndim big-endian
    uint32 sizes, then the values in row-major order. Returns a native-endian array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: "
                         f"{' '.join(str(error).split())}); it is "
                         "damaged or truncated: fetch the IDX file again") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: bad magic number {raw[:4].hex()}")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes) "
                         f"but {len(raw) - header} bytes follow")
    array = np.frombuffer(raw, dtype=dtype, offset=header, count=count).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_file(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST file {name} not found: put {name} or {name}.gz "
                            f"(the standard IDX files) in {data_dir}")


def load_mnist(data_dir, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST as uint8 (N, 1, 28, 28) images and int64 labels from the IDX files in ``data_dir``."""
    _check_split(split)
    data_dir = Path(data_dir)
    image_name, label_name = MNIST_FILES[split]
    images = read_idx(_find_file(data_dir, image_name))
    labels = read_idx(_find_file(data_dir, label_name))
    if (images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1
            or len(labels) != len(images)):
        raise ValueError(f"{data_dir}: expected uint8 images (N, H, W) and N labels, got "
                         f"{images.dtype} {images.shape} and {labels.shape}")
    return np.ascontiguousarray(images[:, None]), labels.astype(np.int64)


# ----------------------------------------------------------------------------- image folder

#: The folder layouts load_image_folder reads (said in its errors).
FOLDER_LAYOUT = ("<data_dir>/train/*.png (and <data_dir>/test/*.png), or one subfolder per "
                 "class: <data_dir>/train/<class>/*.png (PNG or JPEG)")


def _load_image(path, image_size: int, num_channels: int, center_crop: int = 0) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as image:
        image = image.convert("L" if num_channels == 1 else "RGB")
        if center_crop:
            width, height = image.size
            if min(width, height) < center_crop:
                raise ValueError(f"{path} is {width}x{height}, smaller than "
                                 f"config.data.center_crop={center_crop}; use a smaller crop or "
                                 "remove the image")
            left, top = (width - center_crop) // 2, (height - center_crop) // 2
            image = image.crop((left, top, left + center_crop, top + center_crop))
        width, height = image.size
        scale = image_size / min(width, height)
        if scale != 1:
            size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = image.size
        left, top = (width - image_size) // 2, (height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _load_readable_image(path, image_size: int, num_channels: int,
                         center_crop: int = 0) -> np.ndarray:
    try:
        return _load_image(path, image_size, num_channels, center_crop)
    except OSError as error:        # PIL: not an image, or a truncated one
        raise ValueError(f"{path} is not a readable image ({' '.join(str(error).split())}); "
                         "remove or replace it") from error


def list_image_folder(data_dir, split: str = "train") -> tuple[Path, list[str], np.ndarray]:
    """(root, file paths relative to root, int64 labels) of the PNG/JPEG images of ``split``.

    The root is ``data_dir/<split>/`` when that folder exists; otherwise the whole ``data_dir``
    is the ``train`` split (and ``test`` raises). Files are sorted by their path components;
    a label is the index of the file's first-level subfolder (sorted names), 0 at the top.
    Missing or empty folders raise a one-line FileNotFoundError with the layout to use.
    """
    _check_split(split)
    data_dir = Path(data_dir)
    root = data_dir / split if (data_dir / split).is_dir() else data_dir
    if root == data_dir and split != "train":
        raise FileNotFoundError(f"no {split} images: put them in {data_dir / split} "
                                f"(config.data.data_dir={str(data_dir)!r}; layout {FOLDER_LAYOUT})")
    relative = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders.sort()
        prefix = os.path.relpath(folder, root)
        relative.extend(name if prefix == "." else os.path.join(prefix, name) for name in names
                        if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)
    if not relative:
        what = "is missing" if not root.is_dir() else "has no PNG/JPEG images"
        raise FileNotFoundError(f"no PNG/JPEG images found under {root} (it {what}): set "
                                f"config.data.data_dir to a folder laid out as {FOLDER_LAYOUT}")
    parts = sorted(path.split(os.sep) for path in relative)
    classes = sorted({part[0] for part in parts if len(part) > 1})
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[part[0]] if len(part) > 1 else 0 for part in parts], dtype=np.int64)
    return root, [os.path.join(*part) for part in parts], labels


class FolderImages:
    """The images of an image folder as a read-only uint8 array (N, C, S, S) whose entries are
    read from disk when indexed: ``images[i]`` (C, S, S), ``images[2:5]``, ``images[tensor]``
    (B, C, S, S), each file through the same crop and resize as ``load_image_folder``, by a
    pool of ``threads`` threads (PIL decodes without the GIL). Holds only the file names, so
    a data set of any size fits: the lazy storage of ``ImageDataset``.
    """

    ndim = 4
    dtype = torch.uint8

    def __init__(self, root, files, *, image_size: int, num_channels: int = 3,
                 center_crop: int = 0, threads: int | None = None):
        self.root = Path(root)
        # encoded names in one numpy array: ~50 bytes per file (3M LSUN bedrooms: 150 MB)
        self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.image_size, self.num_channels = int(image_size), int(num_channels)
        self.center_crop = int(center_crop)
        self.threads = threads or min(8, os.cpu_count() or 1)
        self._pool = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.num_channels, self.image_size, self.image_size)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.files[i])

    def read(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (C, S, S)."""
        return _load_readable_image(self.path(i), self.image_size, self.num_channels,
                                    self.center_crop)

    def _positions(self, index) -> list[int]:
        whole = range(len(self))
        if isinstance(index, slice):
            return list(whole[index])
        if torch.is_tensor(index):
            index = index.cpu().numpy()
        index = np.asarray(index)
        if index.dtype == np.bool_ or not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
            raise TypeError("FolderImages takes an int, a slice or a 1-D integer index, got "
                            f"{index.dtype} of shape {index.shape}")
        return [whole[i] for i in index.tolist()]

    def _map(self, positions):
        if len(positions) <= 1 or self.threads <= 1:
            return map(self.read, positions)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="image-folder")
        return self._pool.map(self.read, positions)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.ndim == 0):
            return torch.from_numpy(self.read(range(len(self))[int(index)]).copy())
        positions = self._positions(index)
        out = np.empty((len(positions), *self.shape[1:]), dtype=np.uint8)
        for row, array in enumerate(self._map(positions)):
            out[row] = array
        return torch.from_numpy(out)

    def __getstate__(self):         # picklable (DataLoader workers): without the thread pool
        return {**self.__dict__, "_pool": None}

    def numpy(self) -> np.ndarray:
        """All images read into one uint8 array (N, C, S, S)."""
        return self[:].numpy()


def load_image_folder(data_dir, split: str = "train", *, image_size: int, num_channels: int = 3,
                      center_crop: int = 0, lazy: bool = False):
    """PNG/JPEG images under ``data_dir`` as uint8 (N, C, image_size, image_size), and labels.

    Uses ``data_dir/<split>/`` when that folder exists; otherwise the whole ``data_dir`` is
    the ``train`` split (and ``test`` raises). With ``center_crop`` > 0 the centre square of
    that size is cut first (CelebA: 140 of the 178 x 218 aligned faces, as the NCSNv2 and
    Score SDE code). Then the shorter side is resized to ``image_size`` (bicubic, PIL's
    antialiased filter) and the centre square cropped; ``num_channels`` 1 -> grayscale,
    3 -> RGB. Labels: index of the first-level subfolder (sorted names), 0 for images at the
    top. ``lazy``: the images as ``FolderImages`` (read when indexed) instead of a numpy array.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"config.data.num_channels={num_channels}: an image folder gives 1 or 3")
    if center_crop < 0:
        raise ValueError(f"config.data.center_crop={center_crop} must be >= 0 (0: no crop)")
    root, files, labels = list_image_folder(data_dir, split)
    images = FolderImages(root, files, image_size=image_size, num_channels=num_channels,
                          center_crop=center_crop)
    return (images if lazy else images.numpy()), labels


#: Decoded folders larger than this (GiB; config.data.max_in_memory_gb) are read per batch.
MAX_IN_MEMORY_GB = 4.0


def _folder(data, split: str):
    """The ``folder`` data set of config.data: in memory when the decoded uint8 images take at
    most config.data.max_in_memory_gb GiB (default MAX_IN_MEMORY_GB), else ``FolderImages``
    read per batch (FFHQ at 1024 px would take 220 GB)."""
    images, labels = load_image_folder(
        data.data_dir, split, image_size=int(data.image_size),
        num_channels=int(data.num_channels), center_crop=int(data.get("center_crop", 0) or 0),
        lazy=True)
    limit = float(data.get("max_in_memory_gb", MAX_IN_MEMORY_GB))
    return (images if images.nbytes > limit * 2 ** 30 else images.numpy()), labels


# ----------------------------------------------------------------------------- scaling, batches

def preprocess(images: torch.Tensor, *, centered: bool = True, dequantize: bool = False,
               random_flip: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 network input.

    Without dequantization x / 255, in [0, 1] (0 -> 0, 255 -> 1). With it (x + u) / 256,
    u ~ U(0, 1) per pixel, in [x / 256, (x + 1) / 256) within [0, 1): the uniform
    dequantization under which a continuous density gives a bound on the discrete
    likelihood (bits/dim). ``centered`` maps [0, 1] to [-1, 1] by 2 v - 1. ``random_flip``
    mirrors each image left-right with probability 1/2 (before scaling).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 images, got {images.dtype}")
    x = images
    if random_flip:
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.to(x.device).view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)
    x = x.float()
    if dequantize:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x = (x + noise) / 256.0
    else:
        x = x / 255.0
    return 2.0 * x - 1.0 if centered else x


def shard_indices(num_items: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                  rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's indices for one epoch, like torch's DistributedSampler with drop_last.

    All ranks draw the same permutation (seeded by seed and epoch); rank r takes positions
    r, r + world_size, ... of its first (num_items // world_size) * world_size entries, so
    the shards are disjoint, of equal size (DDP needs the same number of steps on each
    rank), and at most world_size - 1 items (different ones each shuffled epoch) are skipped.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if shuffle:
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(num_items)
    usable = num_items // world_size * world_size
    return order[:usable][rank::world_size]


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) with labels and the scaling settings of one data set.

    ``dataset[i]`` is ``(uint8 image, label)``; ``batches(...)`` yields scaled float batches.
    ``images`` is a uint8 tensor in memory, or a ``FolderImages`` that reads the files of each
    batch when indexed (the same values, order, flips and shards; ``batches`` reads the next
    batch in a background thread while the current one is used).
    """

    def __init__(self, images, labels, *, centered: bool = True, random_flip: bool = False,
                 dequantize: bool = False, name: str = "custom"):
        self.images = (images if isinstance(images, FolderImages)
                       else torch.as_tensor(np.asarray(images, dtype=np.uint8)))
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if self.images.ndim != 4 or len(self.labels) != len(self.images):
            raise ValueError(f"expected images (N, C, H, W) and N labels, got "
                             f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}")
        self.centered, self.random_flip, self.dequantize = centered, random_flip, dequantize
        self.name = name
        self.density = None     # no closed-form density

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = True, device=None):
        """One epoch of (x, labels) batches of this rank's shard (see ``shard_indices``).

        x is float32, scaled by ``preprocess`` with this data set's settings; flips and
        dequantization noise come from a generator seeded by (seed, epoch, rank), so a
        run is reproducible and the ranks draw different noise.
        """
        indices = shard_indices(len(self), shuffle=shuffle, seed=seed, epoch=epoch,
                                rank=rank, world_size=world_size)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 4099 + rank + 1)
        stop = len(indices) - len(indices) % batch_size if drop_last else len(indices)
        chunks = [indices[start:start + batch_size] for start in range(0, stop, batch_size)]
        for index, images in self._read(chunks):
            x = preprocess(images, centered=self.centered, dequantize=self.dequantize,
                           random_flip=self.random_flip, generator=generator)
            yield x.to(device) if device is not None else x, self.labels[index]

    def _read(self, chunks):
        """(index, uint8 images) of each index in ``chunks``; from a folder, the next chunk is
        read in a background thread while the caller uses the current one."""
        if not isinstance(self.images, FolderImages):
            yield from ((index, self.images[index]) for index in chunks)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
            pending = reader.submit(self.images.__getitem__, chunks[0]) if chunks else None
            for k, index in enumerate(chunks):
                images = pending.result()
                if k + 1 < len(chunks):
                    pending = reader.submit(self.images.__getitem__, chunks[k + 1])
                yield index, images


# ----------------------------------------------------------------------------- factory

# Whether images are flipped left-right unless config.data.random_flip says otherwise. Never
# for digits: a mirrored handwritten digit is not a digit of the same class (2, 3, 4, 7, 9
# become glyphs that do not occur), so flipping would teach the model images outside the data.
DEFAULT_FLIP = {"digits": False, "cifar10": True, "mnist": False, "folder": False}
NATIVE_SHAPE = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "mnist": (1, 28, 28)}


# config.data.name -> loader(config.data, split) -> (uint8 images, int64 labels)
DATASETS = {
    "digits": lambda data, split: load_digits_images(split),
    "cifar10": lambda data, split: load_cifar10(data.data_dir, split,
                                                download=bool(data.get("download", False))),
    "mnist": lambda data, split: load_mnist(data.data_dir, split),
    "folder": _folder,
}


class MixtureDataset(torch.utils.data.Dataset):
    """``num_points`` float32 points (N, *density.event_shape) drawn from the closed-form
    ``density`` (a sde_lib.GaussianMixture) with a CPU generator seeded by ``seed``;
    ``labels`` (N,) are the components the points were drawn from.

    ``batches(...)`` has the signature of ``ImageDataset.batches`` (no scaling: the points
    are the data). ``density`` gives the exact evaluations of run_lib.exact.
    """

    def __init__(self, density: sde_lib.GaussianMixture, num_points: int, *, seed: int,
                 name: str = "mixture"):
        if num_points < 1:
            raise ValueError(f"a mixture data set needs at least one point, got {num_points}")
        self.density, self.name = density, name
        self.points, self.labels = density.sample(
            num_points, generator=torch.Generator().manual_seed(seed), dtype=torch.float32,
            return_components=True)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index):
        return self.points[index], self.labels[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.points.shape[1:])

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = True, device=None):
        """One epoch of (x (B, D) float32, labels (B,)) batches of this rank's shard (see
        ``shard_indices``); the order depends on (seed, epoch) only."""
        indices = shard_indices(len(self), shuffle=shuffle, seed=seed, epoch=epoch,
                                rank=rank, world_size=world_size)
        stop = len(indices) - len(indices) % batch_size if drop_last else len(indices)
        for start in range(0, stop, batch_size):
            index = indices[start:start + batch_size]
            x = self.points[index]
            yield x.to(device) if device is not None else x, self.labels[index]


#: Seeds of the draws of a mixture's splits (fixed: the same data on every machine).
MIXTURE_SPLIT_SEEDS = {"train": 0, "test": 1}


def _build_mixture(config, split: str) -> MixtureDataset:
    """The MixtureDataset of the toy distribution config.data.name with
    config.data.train_size / test_size points; config.data.dim must match its dimension."""
    data = config.data
    density = sde_lib.toy_distribution(data.name)
    if tuple(density.event_shape) != (int(data.dim),):
        raise ValueError(f"config.data.dim={data.dim} but {data.name} has points of shape "
                         f"{tuple(density.event_shape)}; set config.data.dim={density.dim}")
    size = int(data[f"{split}_size"])
    if size < 1:
        raise ValueError(f"config.data.{split}_size={size}: the {split} split needs at least "
                         "one point; use e.g. 50000 (train) / 5000 (test)")
    return MixtureDataset(density, size, seed=MIXTURE_SPLIT_SEEDS[split], name=data.name)


def dataset_names() -> list[str]:
    """Every valid config.data.name: the image data sets and the toy distributions."""
    return list(DATASETS) + list(sde_lib.TOY_DISTRIBUTIONS)


def build_dataset(config, split: str = "train"):
    """The data set of ``config.data`` for ``split`` (train | test): a MixtureDataset for a
    toy distribution (name, dim, train_size, test_size), else an ImageDataset (name,
    data_dir, image_size, num_channels, centered, random_flip (None: the data set's
    default), dequantize, download)."""
    _check_split(split)
    data = config.data
    name = data.name
    if name in sde_lib.TOY_DISTRIBUTIONS:
        return _build_mixture(config, split)
    if name not in DATASETS:
        raise ValueError(f"unknown config.data.name={name!r}; valid names: "
                         f"{', '.join(dataset_names())}")
    if name in NATIVE_SHAPE:
        expected = NATIVE_SHAPE[name]
        if (data.num_channels, data.image_size, data.image_size) != expected:
            raise ValueError(f"{name} images are {expected[0]}x{expected[1]}x{expected[2]}: set "
                             f"config.data.num_channels={expected[0]} and "
                             f"config.data.image_size={expected[1]}")
    images, labels = DATASETS[name](data, split)
    random_flip = data.get("random_flip", None)
    if random_flip is None:
        random_flip = DEFAULT_FLIP[name]
    return ImageDataset(images, labels, centered=bool(data.centered), random_flip=bool(random_flip),
                        dequantize=bool(data.get("dequantize", False)), name=name)
