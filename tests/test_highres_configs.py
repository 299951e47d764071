"""The high-resolution configs (CelebA 64 to FFHQ 1024; README "High-resolution configs") and
the image-folder reader they read their data with.

* Every config builds its SDE and the published network: the parameter counts of the
  official models (how they were obtained: PUBLISHED_PARAMS) and the official
  hyperparameters (OFFICIAL).
* One training step of each config at reduced width and size through run_lib.train.train on
  a tiny generated PNG / JPEG folder.
* The lazy folder data set (read per batch) gives the batches of the in-memory one; the
  centre crop; the switch at config.data.max_in_memory_gb; one-line errors for missing data.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import sde_lib
from run_lib import compose
from run_lib.datasets import FolderImages, build_dataset, load_image_folder
from run_lib.train import load_checkpoint, train
from run_lib.validate import validate_config

ROOT = Path(__file__).resolve().parents[1]

#: Parameter counts of the official models these configs build. NCSN++ and DDPM: the networks
#: of yang-song/score_sde_pytorch (commit cb1f359) built on the CPU from its own config files
#: (configs/ve/celeba_ncsnpp.py, ve/{celebahq_256,church,bedroom,ffhq_256}_ncsnpp_continuous.py,
#: ve/ffhq_ncsnpp_continuous.py, vp/ddpm/{celebahq,church,bedroom}.py) with
#: ``sum(p.numel() for p in model.parameters())`` (the CUDA ops of op/ stubbed: they are not
#: needed to build); this counts the fixed Gaussian Fourier features too (128 for nf 128, 16
#: for nf 16), as tests/test_configs.py does for CIFAR-10. The DDPM paper rounds its 256-px
#: U-Net to 114M. NCSNv2: ermongroup/ncsnv2's NCSNv2 / NCSNv2Deeper / NCSNv2Deepest built
#: from its configs/{celeba,church,tower,bedroom,ffhq}.yml (a RefineNet's count does not
#: depend on the image size).
PUBLISHED_PARAMS = {
    "ve/ncsnpp_celeba64.py": 62_693_251,
    "ve/ncsnpp_celebahq256.py": 65_574_549,
    "ve/ncsnpp_church256.py": 65_574_549,
    "ve/ncsnpp_bedroom256.py": 65_574_549,
    "ve/ncsnpp_ffhq256.py": 65_574_549,
    "ve/ncsnpp_ffhq1024.py": 105_785_896,
    "vp/ddpm_celebahq256.py": 111_569_923,
    "vp/ddpm_church256.py": 111_569_923,
    "vp/ddpm_bedroom256.py": 111_569_923,
    "ve/ncsnv2_celeba64.py": 29_694_083,
    "ve/ncsnv2_church96.py": 83_445_379,
    "ve/ncsnv2_tower128.py": 83_445_379,
    "ve/ncsnv2_bedroom128.py": 83_445_379,
    "ve/ncsnv2_ffhq256.py": 94_132_611,
}

#: The official values (files named in PUBLISHED_PARAMS): image size, centre crop, SDE
#: (sigma_max or beta_max, levels), global batch, steps, EMA rate, Adam lr, and the sampler's
#: step setting (PC snr, or ALD step size and steps per level).
OFFICIAL = {
    "ve/ncsnpp_celeba64.py": (64, 140, 90.0, 1000, 128, 1_300_001, 0.999, 2e-4, ("pc", 0.17)),
    "ve/ncsnpp_celebahq256.py": (256, 0, 348.0, 2000, 64, 2_400_001, 0.999, 2e-4, ("pc", 0.075)),
    "ve/ncsnpp_church256.py": (256, 0, 380.0, 2000, 64, 2_400_001, 0.999, 2e-4, ("pc", 0.075)),
    "ve/ncsnpp_bedroom256.py": (256, 0, 378.0, 2000, 64, 2_400_001, 0.999, 2e-4, ("pc", 0.075)),
    "ve/ncsnpp_ffhq256.py": (256, 0, 348.0, 2000, 64, 2_400_001, 0.999, 2e-4, ("pc", 0.075)),
    "ve/ncsnpp_ffhq1024.py": (1024, 0, 1348.0, 2000, 8, 2_400_001, 0.9999, 2e-4, ("pc", 0.15)),
    "vp/ddpm_celebahq256.py": (256, 0, 20.0, 1000, 64, 2_400_001, 0.9999, 2e-5, ("pc", None)),
    "vp/ddpm_church256.py": (256, 0, 20.0, 1000, 64, 2_400_001, 0.9999, 2e-5, ("pc", None)),
    "vp/ddpm_bedroom256.py": (256, 0, 20.0, 1000, 64, 2_400_001, 0.9999, 2e-5, ("pc", None)),
    "ve/ncsnv2_celeba64.py": (64, 140, 90.0, 500, 128, 210_001, 0.999, 1e-4, ("ald", 3.3e-6, 5)),
    "ve/ncsnv2_church96.py": (96, 0, 140.0, 788, 128, 200_001, 0.999, 1e-4, ("ald", 4.9e-6, 4)),
    "ve/ncsnv2_tower128.py": (128, 0, 190.0, 1086, 128, 150_001, 0.999, 1e-4, ("ald", 1.8e-6, 3)),
    "ve/ncsnv2_bedroom128.py": (128, 0, 190.0, 1086, 128, 150_001, 0.999, 1e-4,
                                ("ald", 1.8e-6, 3)),
    "ve/ncsnv2_ffhq256.py": (256, 0, 348.0, 2311, 32, 80_001, 0.999, 1e-4, ("ald", 9e-7, 3)),
}

#: The official file of each config (the continuous NCSN++ runs are *_continuous.py).
OFFICIAL_FILES = {
    "ve/ncsnpp_celeba64.py": "configs/ve/celeba_ncsnpp.py",
    "ve/ncsnpp_celebahq256.py": "configs/ve/celebahq_256_ncsnpp_continuous.py",
    "ve/ncsnpp_church256.py": "configs/ve/church_ncsnpp_continuous.py",
    "ve/ncsnpp_bedroom256.py": "configs/ve/bedroom_ncsnpp_continuous.py",
    "ve/ncsnpp_ffhq256.py": "configs/ve/ffhq_256_ncsnpp_continuous.py",
    "ve/ncsnpp_ffhq1024.py": "configs/ve/ffhq_ncsnpp_continuous.py",
    "vp/ddpm_celebahq256.py": "configs/vp/ddpm/celebahq.py",
    "vp/ddpm_church256.py": "configs/vp/ddpm/church.py",
    "vp/ddpm_bedroom256.py": "configs/vp/ddpm/bedroom.py",
    "ve/ncsnv2_celeba64.py": "configs/celeba.yml",
    "ve/ncsnv2_church96.py": "configs/church.yml",
    "ve/ncsnv2_tower128.py": "configs/tower.yml",
    "ve/ncsnv2_bedroom128.py": "configs/bedroom.yml",
    "ve/ncsnv2_ffhq256.py": "configs/ffhq.yml",
}


#: Image size of the one-step training runs: small enough for the CPU, with every level of
#: the network's ch_mult (the 1024-px NCSN++ halves 1024 seven times: 128 px leaves 1 px).
REDUCED_SIZE = {64: 32, 96: 48, 128: 64, 256: 64, 1024: 128}


def load(name: str):
    path = ROOT / "configs" / name
    spec = importlib.util.spec_from_file_location(f"highres_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_every_highres_config_is_checked():
    """Every config on the image folder is in the tables (a new one must add its counts)."""
    on_folder = set()
    for path in sorted((ROOT / "configs").glob("*/*.py")):
        if path.name == "__init__.py":
            continue
        name = f"{path.parent.name}/{path.name}"
        if load(name).data.name == "folder":
            on_folder.add(name)
    assert on_folder == set(PUBLISHED_PARAMS) == set(OFFICIAL)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_config_builds_the_published_model(name):
    config = load(name)
    validate_config(config, "train")
    validate_config(config, "sample")
    with torch.device("meta"):             # counts without allocating 100M parameters
        model = compose.build_model(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]

    size, crop, top, levels, batch, n_iters, ema, lr, sampler = OFFICIAL[name]
    data = config.data
    assert (data.name, data.image_size, data.num_channels, data.center_crop) == (
        "folder", size, 3, crop)
    assert data.random_flip and not data.dequantize
    sde = compose.build_sde(config)
    assert sde.N == levels
    if name.startswith("vp/"):
        assert isinstance(sde, sde_lib.VPSDE) and data.centered
        assert (sde.beta_min, sde.beta_max) == (0.1, top)
        assert not config.training.continuous and config.training.reduce_mean
    else:
        assert isinstance(sde, sde_lib.VESDE) and not data.centered
        assert (sde.sigma_min, sde.sigma_max) == (0.01, top)
        assert config.model.scale_by_sigma
    assert config.training.continuous == ("_continuous" in OFFICIAL_FILES[name])
    assert (config.training.batch_size, config.training.n_iters) == (batch, n_iters)
    assert (config.model.ema_rate, config.optim.lr) == (ema, lr)
    method = sampler[0]
    assert config.sampling.method == method
    if method == "ald":
        assert (config.sampling.ald.step_lr, config.sampling.ald.n_steps_each) == sampler[1:]
        assert config.optim.warmup == 0 and math.isinf(config.optim.grad_clip)
    else:
        assert (config.optim.warmup, config.optim.grad_clip) == (5000, 1.0)
        if sampler[1] is None:           # DDPM: ancestral sampling, no corrector
            assert (config.sampling.pc.predictor, config.sampling.pc.corrector) == (
                "ancestral_sampling", "none")
        else:
            assert (config.sampling.pc.predictor, config.sampling.pc.corrector,
                    config.sampling.pc.snr, config.sampling.pc.n_steps) == (
                "reverse_diffusion", "langevin", sampler[1], 1)


def test_config_docstrings_name_their_official_file_and_count():
    for name, official in OFFICIAL_FILES.items():
        text = (ROOT / "configs" / name).read_text()
        assert official in text, (name, official)
        assert f"{PUBLISHED_PARAMS[name]:,}" in text, name


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


# ----------------------------------------------------------------------------- training

#: Tiny folders per kind of data: CelebA's 178 x 218 aligned faces (centre crop 140), LSUN's
#: landscape / portrait JPEGs, square FFHQ / CelebA-HQ images.
FOLDER_SIZES = {"celeba": [(178, 218)] * 4, "lsun": [(96, 72), (72, 96), (100, 72), (72, 72)],
                "square": [(160, 160)] * 4}


def data_kind(name: str) -> str:
    if "celeba64" in name:
        return "celeba"
    return "lsun" if any(s in name for s in ("church", "bedroom", "tower")) else "square"


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_one_training_step_at_reduced_width(name, tmp_path):
    """One optimizer step of the config with nf // 8 (at least 4: GroupNorm needs 4 channels
    per group; the 1024-px NCSN++ trains at nf 4), global batch 2 and the image size of
    REDUCED_SIZE, every other value as published, through run_lib.train.train on a tiny
    folder (read per batch from disk for the configs that are in practice). The step is
    taken (finite loss; a checkpoint of step 1 whose weights moved away from their EMA) and
    the network is the reduced one."""
    config = load(name)
    size = config.data.image_size
    data = write_folder(tmp_path / "data", FOLDER_SIZES[data_kind(name)], jpeg_every=2)
    config.device = "cpu"
    config.data.data_dir = str(data)
    config.data.image_size = REDUCED_SIZE[size]
    config.data.max_in_memory_gb = 4.0 if size <= 64 else 0.0
    if data_kind(name) == "celeba":
        config.data.center_crop = 140
    config.model.nf = max(config.model.nf // 8, 4)
    config.training.update(batch_size=2, n_iters=1, log_freq=1, eval_freq=0, sample_freq=0,
                           snapshot_freq=1, snapshot_freq_for_preemption=1)
    validate_config(config, "train")
    result = train(config, tmp_path / "run", progress=False)
    assert result["step"] == 1 and len(result["losses"]) == 1
    assert math.isfinite(result["losses"][0]) and result["losses"][0] > 0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_1.pt", "cpu")
    assert state["step"] == 1
    with torch.device("meta"):
        reduced = compose.build_model(config)
    assert {k: v.shape for k, v in state["model"].items()} == {
        k: v.shape for k, v in reduced.state_dict().items()}
    assert sum(p.numel() for p in reduced.parameters()) < PUBLISHED_PARAMS[name] / 10
    shadow = state["ema"]["shadow"]
    moved = [k for k, v in shadow.items() if not torch.equal(v, state["model"][k])]
    assert moved, "no parameter moved away from its EMA: no optimizer step was taken"


def test_readme_table_lists_every_config_with_its_size_count_and_batch():
    """README "High-resolution configs": one row per config with the config's image size,
    the official parameter count and the config's global batch."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## High-resolution configs"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in PUBLISHED_PARAMS:
            rows[cells[0]] = cells
    assert set(rows) == set(PUBLISHED_PARAMS)
    for name, cells in rows.items():
        config = load(name)
        assert int(cells[2]) == config.data.image_size, name
        assert int(cells[4].replace(",", "")) == PUBLISHED_PARAMS[name], name
        assert int(cells[6]) == config.training.batch_size, name
