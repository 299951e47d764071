"""--mode inpaint (run_lib.inverse, main.py): the named masks' shapes and known fractions, PNG
masks, the picture's layout, and a tiny trained digits run end to end (replace through main.py,
SMC in-process): the PNG, npz and json are written and the known pixels are kept exactly.
The bad inputs of config.inpaint are one-line errors before any work (more of them through
main.py in tests/test_cli_errors.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs.vp.ddpm_digits import get_config
from run_lib import inverse
from run_lib.digits_classifier import digits_classifier
from run_lib.train import train
from run_lib.validate import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("height,width", [(8, 8), (6, 10)])
def test_named_masks_shape_region_and_known_fraction(height, width):
    left = inverse.named_mask("left_half", height, width)
    bottom = inverse.named_mask("bottom_half", height, width)
    center = inverse.named_mask("center", height, width)
    for mask in (left, bottom, center):
        assert mask.shape == (1, 1, height, width) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert left[..., :width // 2].sum() == 0 and left[..., width // 2:].min() == 1
    assert bottom[..., height // 2:, :].sum() == 0 and bottom[..., :height // 2, :].min() == 1
    assert left.mean() == bottom.mean() == 0.5
    hole = center[0, 0, height // 4:height // 4 + height // 2, width // 4:width // 4 + width // 2]
    assert hole.sum() == 0
    assert center.sum() == height * width - (height // 2) * (width // 2)


def test_random_mask_has_the_known_fraction_and_is_seeded():
    draw = lambda seed, fraction: inverse.named_mask(     # noqa: E731
        "random", 8, 8, random_fraction=fraction, generator=torch.Generator().manual_seed(seed))
    for fraction in (0.0, 0.3, 0.5, 1.0):
        assert draw(0, fraction).sum() == round(fraction * 64)
    assert torch.equal(draw(1, 0.5), draw(1, 0.5)) and not torch.equal(draw(1, 0.5), draw(2, 0.5))
    with pytest.raises(ValueError, match="unknown mask 'top'"):
        inverse.named_mask("top", 8, 8)


def test_png_mask_white_is_known_and_its_size_must_match(tmp_path):
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:3] = 255
    pixels[3, :2] = 200                      # >= 128 counts as white
    Image.fromarray(pixels).save(tmp_path / "m.png")
    mask = inverse.read_mask_png(tmp_path / "m.png", 8, 8)
    assert mask.shape == (1, 1, 8, 8) and mask.sum() == 26
    with pytest.raises(ValueError, match="is 8x8 pixels but the data's images are 16x12: give "
                                         "a mask PNG of 16x12 pixels"):
        inverse.read_mask_png(tmp_path / "m.png", 12, 16)


def test_rows_picture_layout():
    """One row per image, blocks of rows side by side; 8x8 images at 8x (64 px, padding 4)."""
    columns = [torch.zeros(30, 1, 8, 8, dtype=torch.uint8)] * 3
    picture = inverse.render_rows(columns, rows_per_block=25)
    block_height, block_width = 25 * 68 + 4, 3 * 68 + 4
    assert picture.shape == (block_height, 2 * block_width + 16, 3)


# ----------------------------------------------------------------------------- end to end

def tiny_config():
    config = get_config()
    config.device = "cpu"
    config.model.nf = 8
    config.model.dropout = 0.0
    config.training.batch_size = 16
    config.training.n_iters = 4
    config.training.log_freq = 2
    config.training.snapshot_freq = 100
    config.training.snapshot_freq_for_preemption = 4
    config.training.sample_freq = 0
    config.training.eval_freq = 0
    config.sde.num_scales = 25                # pc and smc: 25 steps (beta_max / N < 1)
    config.inpaint.num_images = 5
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step digits run with a cached (one-epoch) digits classifier."""
    workdir = tmp_path_factory.mktemp("digits_inpaint")
    config = tiny_config()
    config.data.data_dir = str(workdir / "data")
    train(config, workdir, progress=False)
    digits_classifier(workdir / "data" / "digits_classifier.pt", epochs=1)
    return config, workdir


def _check_outputs(folder: Path, name: str, rows: int) -> dict:
    metrics = json.loads((folder / f"{name}.json").read_text())
    arrays = np.load(folder / f"{name}.npz")
    known = arrays["masks"].astype(bool)                    # (1, 1, 8, 8), bottom half 0
    assert known.shape == (1, 1, 8, 8) and known.mean() == 0.5 and not known[..., 4:, :].any()
    completions, originals = arrays["completions"], arrays["originals"]
    assert completions.shape == originals.shape == (rows, 1, 8, 8)
    assert completions.dtype == np.uint8
    known_b = np.broadcast_to(known, completions.shape)
    assert np.array_equal(completions[known_b], originals[known_b])
    model, truth = arrays["completions_model"], arrays["originals_model"]
    assert np.array_equal(model[known_b], truth[known_b])     # bit for bit
    assert not np.array_equal(model[~known_b], truth[~known_b])
    assert metrics["known_max_abs_diff"] == 0.0
    mse = float(((model.astype(np.float64) - truth) ** 2)[~known_b].mean())
    assert metrics["mse_completed"] == pytest.approx(mse, rel=1e-9) and mse > 0
    assert metrics["accuracy_originals"] >= 0 and metrics["classifier"]["epochs"] == 1
    picture = np.asarray(Image.open(folder / f"{name}.png"))
    assert picture.shape == (rows * 68 + 4, 4 * 68 + 4, 3)   # input, mask, completion, original
    return metrics


def test_main_inpaint_mode_writes_png_npz_json_and_keeps_known_pixels(trained):
    config, workdir = trained
    args = ["--mode", "inpaint", "--config", "configs/vp/ddpm_digits.py", "--workdir", workdir,
            "--config.device=cpu", "--config.model.nf=8", "--config.model.dropout=0.0",
            "--config.sde.num_scales=25", "--config.inpaint.num_images=5",
            f"--config.data.data_dir={workdir / 'data'}"]
    done = subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = _check_outputs(workdir / "inpaint", "inpaint_bottom_half_replace_pc", 5)
    assert metrics["nfe"] == 50 and metrics["step"] == 4    # 25 predictor + 25 corrector steps
    assert json.loads(done.stdout)["known_max_abs_diff"] == 0.0
    assert (workdir / "tensorboard").is_dir()


def test_smc_keeps_known_pixels_and_is_seeded(trained):
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.inpaint.method = "smc"
    config.inpaint.particles = 3
    config.inpaint.num_images = 3
    first = inverse.inpaint(config, workdir, progress=False)
    assert first["nfe"] == 26 and first["particles"] == 3
    _check_outputs(workdir / "inpaint", "inpaint_bottom_half_smc", 3)
    x = np.load(workdir / "inpaint" / "inpaint_bottom_half_smc.npz")["completions_model"]
    inverse.inpaint(config, workdir, progress=False)
    assert np.array_equal(np.load(workdir / "inpaint" / "inpaint_bottom_half_smc.npz")
                          ["completions_model"], x)


def test_super_resolution_keeps_the_block_means(trained):
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.inpaint.task = "super_resolution"
    config.inpaint.sampler = "ddim"
    config.sampling.ddim.num_steps = 3
    config.inpaint.num_images = 2
    metrics = inverse.inpaint(config, workdir, progress=False)
    arrays = np.load(workdir / "inpaint" / "super_resolution_x2_replace_ddim.npz")
    x = torch.as_tensor(arrays["completions_model"])
    low = torch.nn.functional.avg_pool2d(torch.as_tensor(arrays["originals_model"]), 2)
    assert arrays["observations_model"].shape == (2, 1, 4, 4)
    # kept up to float32 rounding of the orthogonal block transform (x of an untrained model
    # reaches |x| ~ 100s)
    tolerance = 1e-6 * max(1.0, x.abs().max().item())
    error = (torch.nn.functional.avg_pool2d(x, 2) - low).abs().max().item()
    assert error < tolerance and metrics["known_max_abs_diff"] == pytest.approx(error, abs=1e-6)
    assert "mse_block_mean" in metrics


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("key,value,text", [
    ("mask", "botom_half", "config.inpaint.mask='botom_half' is not a mask: use one of "
                           "'left_half', 'bottom_half', 'center', 'random' or the path of a PNG "
                           "file (white = known); did you mean 'bottom_half'?"),
    ("task", "colorize", "config.inpaint.task='colorize': colorization needs RGB images"),
    ("method", "foo", "config.inpaint.method must be one of 'replace', 'smc', 'pigdm'"),
    ("noise_std", 0.1, "method='replace' conditions on a noiseless observation; for "
                       "noise_std=0.1 use method='pigdm'"),
    ("sampler", "ald", "config.inpaint.sampler='ald' does not apply to config.sde.name='vpsde'"),
    ("num_images", 300, "the digits test split has 297 images; use at most 297"),
    ("random_fraction", 1.5, "config.inpaint.random_fraction must be a finite number >= 0.0 "
                             "and <= 1.0"),
    ("masks", "x", "config.inpaint has no key 'masks'; did you mean config.inpaint.mask?"),
])
def test_bad_inpaint_values_are_one_line_errors(key, value, text):
    config = get_config()
    if key in config.inpaint:
        del config.inpaint[key]
    config.inpaint[key] = value
    with pytest.raises(ConfigError) as info:
        validate_config(config, "inpaint")
    assert "\n" not in str(info.value) and text in str(info.value), str(info.value)


def test_library_refusals_and_files_before_any_work(tmp_path):
    config = get_config()
    config.inpaint.method, config.inpaint.sampler = "smc", "ddim"
    with pytest.raises(ConfigError, match="method='smc' runs its own particle filter"):
        validate_config(config, "inpaint")
    config = get_config()
    config.inpaint.task, config.inpaint.factor = "super_resolution", 3
    with pytest.raises(ConfigError, match="factor=3: super-resolution by 3 needs images"):
        validate_config(config, "inpaint")
    Image.new("L", (16, 16), 255).save(tmp_path / "big.png")
    config = get_config()
    config.inpaint.images = str(tmp_path / "big.png")
    with pytest.raises(ConfigError, match=r"holds images of shape \(1, 16, 16\)"):
        validate_config(config, "inpaint")
    config = get_config()
    config.inpaint.mask = str(tmp_path / "none.png")
    with pytest.raises(ConfigError, match="no such PNG file"):
        validate_config(config, "inpaint")
    config = get_config()
    del config.inpaint
    validate_config(config, "sample")          # optional but for --mode inpaint
    with pytest.raises(ConfigError, match="config.inpaint is missing: --mode inpaint needs it"):
        validate_config(config, "inpaint")
