"""run_lib.datasets: built-in digits, CIFAR-10 archive reader (restricted unpickling), MNIST
IDX reader, image folder, the toy mixtures as a data set with a closed-form density,
scaling/dequantization and seeded, sharded batches.

CIFAR-10 and MNIST cannot be downloaded here, so the tests write small files in the real
formats themselves and read them back."""
import gzip
import os
import pickle
import struct
import tarfile

import ml_collections
import numpy as np
import pytest
import torch

from run_lib import datasets


# ----------------------------------------------------------------------------- digits

def test_digits_shapes_values_and_mapping():
    from sklearn.datasets import load_digits
    raw = load_digits().images                                   # 0..16
    train_x, train_y = datasets.load_digits_images("train")
    test_x, test_y = datasets.load_digits_images("test")
    assert train_x.shape == (1500, 1, 8, 8) and test_x.shape == (297, 1, 8, 8)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert train_x.min() == 0 and train_x.max() == 255
    assert set(np.unique(train_y)) == set(range(10)) and set(np.unique(test_y)) == set(range(10))
    # the documented mapping round(x * 255 / 16): 16 -> 255, 8 -> 128 (127.5 to even), 1 -> 16
    expected = np.rint(raw * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.concatenate([train_x, test_x])[:, 0], expected)
    assert set(np.unique(train_x)) == set(np.rint(np.arange(17) * 255 / 16).astype(int))


def test_digits_split_disjoint_and_deterministic():
    train_x, _ = datasets.load_digits_images("train")
    test_x, _ = datasets.load_digits_images("test")
    again_x, _ = datasets.load_digits_images("test")
    np.testing.assert_array_equal(test_x, again_x)
    from sklearn.datasets import load_digits
    raw = load_digits().images
    # train is exactly the first 1500 images, test the last 297: disjoint as index sets
    np.testing.assert_array_equal(test_x[:, 0], np.rint(raw[1500:] * 255 / 16).astype(np.uint8))
    with pytest.raises(ValueError, match="valid splits"):
        datasets.load_digits_images("validation")


# ----------------------------------------------------------------------------- CIFAR-10

def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch",
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


def _write_cifar(root, sizes=(3, 2, 4, 1, 2, 5), legacy_numpy_name=False):
    """The real layout: cifar-10-batches-py/data_batch_1..5, test_batch (protocol 2 pickles
    of dicts with bytes keys), inside cifar-10-python.tar.gz. Returns the batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for i, (name, n) in enumerate(zip(names, sizes)):
        batches[name] = _cifar_batch(n, i)
        raw = pickle.dumps(batches[name], protocol=2)
        if legacy_numpy_name:   # the real archive names numpy 1's module
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return batches


def _expected(batches, names):
    x = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    return x, np.concatenate([batches[n][b"labels"] for n in names])


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("form", ["tar", "folder"])
def test_cifar_round_trip(tmp_path, form, legacy):
    src = tmp_path / "src"
    batches = _write_cifar(src, legacy_numpy_name=legacy)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if form == "tar":
        (src / "cifar-10-python.tar.gz").rename(data_dir / "cifar-10-python.tar.gz")
    else:
        (src / "cifar-10-batches-py").rename(data_dir / "cifar-10-batches-py")
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    for split, names in [("train", train_names), ("test", ["test_batch"])]:
        x, y = datasets.load_cifar10(data_dir, split, download=False)
        ex, ey = _expected(batches, names)
        assert x.dtype == np.uint8 and x.shape == (len(ey), 3, 32, 32) and y.dtype == np.int64
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    # channel layout: the first 1024 bytes of a row are the red plane, row-major
    assert x[0, 0, 0, 1] == batches["test_batch"][b"data"][0, 1]
    assert x[0, 1, 0, 0] == batches["test_batch"][b"data"][0, 1024]


def _s(b):
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)


def _py2_batch(data, labels):
    """A batch pickled the way the real archive was (Python 2 cPickle, protocol 2, numpy 1):
    str keys as SHORT_BINSTRING, the array as numpy.core.multiarray._reconstruct + BUILD."""
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _s(b"b")
           + b"\x87R(K\x01J" + struct.pack("<i", len(data)) + b"M\x00\x0c\x86"
           + b"cnumpy\ndtype\n" + _s(b"u1") + b"K\x00K\x01\x87R"
           + b"(K\x03" + _s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
           + b"\x89" + _s(data.tobytes()) + b"tb")
    lab = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}(" + _s(b"batch_label") + _s(b"testing batch 1 of 1") + _s(b"labels")
            + lab + _s(b"data") + arr + b"u.")


def test_cifar_python2_style_pickle(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(_py2_batch(data, [3, 7]))
    x, y = datasets.load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(x, data.reshape(2, 3, 32, 32))
    np.testing.assert_array_equal(y, [3, 7])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    assert b"system" in payload
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        datasets.restricted_loads(payload)
    assert not marker.exists()
    # also inside an archive in the real layout
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(payload)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder / "test_batch", arcname="cifar-10-batches-py/test_batch")
    folder.rename(tmp_path / "moved")        # read the tar, not the folder
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        datasets.load_cifar10(tmp_path, "test")
    assert not marker.exists()
    # other dangerous globals and codec tricks are refused too
    for module, name in [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")]:
        with pytest.raises(pickle.UnpicklingError):
            datasets.restricted_loads(b"c" + module.encode() + b"\n" + name.encode() + b"\n.")


def test_cifar_offline_missing_file_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not download when download=False")
    monkeypatch.setattr(datasets.urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_cifar10(tmp_path, "train", download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-python.tar.gz") in message and datasets.CIFAR10_URL in message


def test_cifar_download_checks_md5(tmp_path, monkeypatch):
    import io
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(b"not the archive")
    monkeypatch.setattr(datasets.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(OSError, match="md5"):
        datasets.load_cifar10(tmp_path, "train", download=True)
    assert calls == [datasets.CIFAR10_URL]
    assert list(tmp_path.iterdir()) == []     # the partial download is removed


# ----------------------------------------------------------------------------- MNIST / IDX

def _write_idx(path, array, type_code=0x08, big_endian=">u1"):
    data = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    data += struct.pack(f">{array.ndim}I", *array.shape) + array.astype(big_endian).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    arrays = {}
    for split, n in [("train", 7), ("test", 3)]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        image_name, label_name = datasets.MNIST_FILES[split]
        _write_idx(tmp_path / (image_name + suffix), images)
        _write_idx(tmp_path / (label_name + suffix), labels)
        arrays[split] = images, labels
    for split, (images, labels) in arrays.items():
        x, y = datasets.load_mnist(tmp_path, split)
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x[:, 0], images)
        np.testing.assert_array_equal(y, labels)
    # multi-byte big-endian types come back with the right values
    ints = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    _write_idx(tmp_path / "ints.idx", ints, 0x0C, ">i4")
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "ints.idx"), ints)


def test_idx_bad_magic_and_missing(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(struct.pack(">BBBB", 0x1F, 0x8B, 8, 1) + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(ValueError, match="magic"):
        datasets.read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="bytes follow"):
        datasets.read_idx(short)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte") as info:
        datasets.load_mnist(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(info.value)


# ----------------------------------------------------------------------------- image folder

def test_image_folder(tmp_path):
    from PIL import Image
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    # 8 x 4 (w x h): left half red, right half blue; resize to 4 -> 8 x 4, centre crop 4 x 4
    left_right = np.zeros((4, 8, 3), np.uint8)
    left_right[:, :4] = (255, 0, 0)
    left_right[:, 4:] = (0, 0, 255)
    Image.fromarray(left_right).save(root / "cats" / "a.png")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "dogs" / "b.png")
    Image.fromarray(np.full((10, 10, 3), 60, np.uint8)).save(root / "dogs" / "c.jpg", quality=95)
    x, y = datasets.load_image_folder(root, "train", image_size=4, num_channels=3)
    assert x.shape == (3, 3, 4, 4) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, [0, 1, 1])
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    np.testing.assert_array_equal(x[0, :, :, :2], np.broadcast_to(red[:, None, None], (3, 4, 2)))
    np.testing.assert_array_equal(x[0, :, :, 2:], np.broadcast_to(blue[:, None, None], (3, 4, 2)))
    np.testing.assert_array_equal(x[1], 200)
    assert np.abs(x[2].astype(int) - 60).max() <= 2          # JPEG, bicubic of a flat image
    g, _ = datasets.load_image_folder(root, "train", image_size=4, num_channels=1)
    assert g.shape == (3, 1, 4, 4)
    assert g[0, 0, 0, 0] == round(0.299 * 255) and g[0, 0, 0, 3] == round(0.114 * 255)  # PIL's L
    with pytest.raises(FileNotFoundError, match="test"):
        datasets.load_image_folder(root, "test", image_size=4)
    with pytest.raises(FileNotFoundError, match="no PNG/JPEG"):
        datasets.load_image_folder(tmp_path / "empty", "train", image_size=4)


# ----------------------------------------------------------------------------- scaling

def test_scaling_and_dequantization_ranges():
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(64, 1, 1, 1)
    zero_one = datasets.preprocess(values, centered=False)
    assert zero_one.dtype == torch.float32
    assert zero_one.min().item() == 0.0 and zero_one.max().item() == 1.0
    torch.testing.assert_close(zero_one, values.float() / 255, rtol=0, atol=0)
    centred = datasets.preprocess(values, centered=True)
    assert centred.min().item() == -1.0 and centred.max().item() == 1.0
    torch.testing.assert_close(centred, values.float() / 255 * 2 - 1, rtol=0, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    deq = datasets.preprocess(values, centered=False, dequantize=True, generator=g)
    lower, upper = values.float() / 256, (values.float() + 1) / 256
    assert ((deq >= lower) & (deq < upper)).all()
    noise = deq * 256 - values.float()                 # the U(0, 1) draws
    assert abs(noise.mean().item() - 0.5) < 0.01 and abs(noise.var().item() - 1 / 12) < 0.005
    deq_c = datasets.preprocess(values, centered=True, dequantize=True,
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(deq_c, 2 * deq - 1)
    assert deq_c.min() >= -1 and deq_c.max() < 1


def test_random_flip_seeded():
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(1, 2, 3, 4).repeat(200, 1, 1, 1)
    a = datasets.preprocess(images, centered=False, random_flip=True,
                            generator=torch.Generator().manual_seed(1))
    b = datasets.preprocess(images, centered=False, random_flip=True,
                            generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = images.float() / 255
    flipped = (a == plain.flip(-1)).flatten(1).all(1)
    same = (a == plain).flatten(1).all(1)
    assert (flipped ^ same).all() and 70 < flipped.sum() < 130


# ----------------------------------------------------------------------------- batches, sharding

def test_shuffle_reproducible_and_shards_disjoint():
    n = 103
    a = datasets.shard_indices(n, seed=5, epoch=2)
    torch.testing.assert_close(a, datasets.shard_indices(n, seed=5, epoch=2))
    assert sorted(a.tolist()) == list(range(n))
    assert not torch.equal(a, datasets.shard_indices(n, seed=5, epoch=3))
    for world_size in (1, 2, 4):
        shards = [datasets.shard_indices(n, seed=5, epoch=2, rank=r, world_size=world_size)
                  for r in range(world_size)]
        union = torch.cat(shards).tolist()
        assert len(union) == len(set(union)) == n // world_size * world_size
        assert {len(s) for s in shards} == {n // world_size}
        assert set(union) <= set(range(n))
    with pytest.raises(ValueError, match="rank"):
        datasets.shard_indices(n, rank=2, world_size=2)


def test_batches_cover_dataset_across_ranks():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2).clone()
    dataset = datasets.ImageDataset(images.numpy(), np.arange(40), centered=False)
    seen = []
    for rank in range(2):
        run1 = list(dataset.batches(4, seed=3, rank=rank, world_size=2))
        run2 = list(dataset.batches(4, seed=3, rank=rank, world_size=2))
        assert len(run1) == 5
        for (x1, y1), (x2, y2) in zip(run1, run2):
            torch.testing.assert_close(x1, x2, rtol=0, atol=0)
            assert torch.equal(y1, y2)
            assert x1.shape == (4, 1, 2, 2)
            torch.testing.assert_close(x1[:, 0, 0, 0], y1.float() / 255)   # images stay with labels
            seen += y1.tolist()
    assert sorted(seen) == list(range(40))


def _config(**overrides):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(
        name="digits", data_dir="", image_size=8, num_channels=1, centered=True,
        random_flip=None, dequantize=False, download=False))
    config.data.update(overrides)
    return config


def test_build_dataset_digits_and_errors(tmp_path):
    dataset = datasets.build_dataset(_config(), "train")
    assert len(dataset) == 1500 and dataset.shape == (1, 8, 8) and dataset.density is None
    assert dataset.random_flip is False          # digits are never flipped by default
    x, y = next(dataset.batches(64, seed=0))
    assert x.shape == (64, 1, 8, 8) and x.min() == -1 and x.max() == 1
    with pytest.raises(ValueError, match="valid names: digits, cifar10, mnist, folder, "
                                         "eight_modes"):
        datasets.build_dataset(_config(name="imagenet"), "train")
    with pytest.raises(ValueError, match="image_size=8"):
        datasets.build_dataset(_config(image_size=32), "train")
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as info:
        datasets.build_dataset(_config(name="cifar10", data_dir=str(tmp_path), image_size=32,
                                       num_channels=3), "train")
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    cifar = tmp_path / "c"
    _write_cifar(cifar)
    built = datasets.build_dataset(_config(name="cifar10", data_dir=str(cifar), image_size=32,
                                           num_channels=3, dequantize=True, centered=False), "test")
    assert len(built) == 5 and built.random_flip is True and built.dequantize is True


# ----------------------------------------------------------------------------- toy mixtures

def _toy_config(**overrides):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(name="eight_modes", dim=2, train_size=4000,
                                                 test_size=1000))
    config.data.update(overrides)
    return config


def test_mixture_dataset_splits_are_draws_of_its_density():
    """Both splits are fixed draws (the same on every build) of the closed-form mixture that
    ``density`` holds: different points, the mixture's weights and mean log-density within
    their sampling error (4000 points: TV of the component frequencies ~0.02, the mean
    log-density's standard error ~0.02 nats); labels are the components."""
    train = datasets.build_dataset(_toy_config(), "train")
    test = datasets.build_dataset(_toy_config(), "test")
    again = datasets.build_dataset(_toy_config(), "train")
    assert len(train) == 4000 and len(test) == 1000 and train.shape == (2,)
    assert train.points.dtype == torch.float32 and torch.equal(train.points, again.points)
    assert not torch.equal(train.points[:1000], test.points)
    density = train.density
    assert density is not None and density.num_components == 8
    freq = torch.bincount(train.labels, minlength=8).double() / len(train)
    assert 0.5 * (freq - density.weights).abs().sum() < 0.05
    nearest = torch.cdist(train.points.double(), density.means).argmin(dim=1)
    assert (nearest == train.labels).double().mean() > 0.99        # labels: the components
    more = density.sample(50_000, generator=torch.Generator().manual_seed(9))
    expected = density.log_prob(more).mean()
    assert abs(density.log_prob(train.points).mean() - expected) < 0.07


def test_mixture_batches_shard_like_images():
    dataset = datasets.build_dataset(_toy_config(train_size=40), "train")
    seen = []
    for rank in range(2):
        batches = list(dataset.batches(4, seed=3, epoch=1, rank=rank, world_size=2))
        assert len(batches) == 5 and all(x.shape == (4, 2) for x, _ in batches)
        again = list(dataset.batches(4, seed=3, epoch=1, rank=rank, world_size=2))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
        for x, labels in batches:
            index = [int((dataset.points == row).all(dim=1).nonzero()[0]) for row in x]
            assert torch.equal(dataset.labels[index], labels)      # points keep their labels
            seen += index
    assert sorted(seen) == list(range(40))


def test_mixture_config_errors():
    with pytest.raises(ValueError, match="config.data.dim=3 .* set config.data.dim=2"):
        datasets.build_dataset(_toy_config(dim=3), "train")
    with pytest.raises(ValueError, match="config.data.test_size=0"):
        datasets.build_dataset(_toy_config(test_size=0), "test")
    gaussian = datasets.build_dataset(_toy_config(name="spread_gaussian", dim=64), "test")
    assert gaussian.shape == (64,) and gaussian.density.num_components == 1
