"""The inpaint mode: inverse problems (inpainting, colorization, super-resolution) on images
with a trained run, from config.inpaint:

    python main.py --mode inpaint --config configs/vp/ddpm_digits.py --workdir runs/digits_vp

    mask = named_mask("bottom_half", 8, 8)            # (1, 1, H, W) float, 1 = known
    operator = build_operator("inpaint", mask)        # a samplers.operators.LinearOperator
    inpaint(config, workdir)                          # <workdir>/inpaint/<name>.{png,npz,json}

config.inpaint: ``task`` ("inpaint" | "colorize" | "super_resolution"); for inpainting
``mask``, the region to *fill*: "left_half", "bottom_half", "center" (the central H/2 x W/2
square), "random" (a seeded mask with ``random_fraction`` of the pixels known), or the path of
a PNG of the images' size (white = known); ``factor`` of super-resolution (f x f block means
are observed); ``method`` ("replace" | "smc" | "pigdm", samplers.INVERSE_METHODS) with the
registry ``sampler`` (options: config.sampling.<sampler>; "smc" runs its own particle filter
on the pc sampler's grid: num_steps = config.sde.num_scales, eps = config.sampling.pc.eps,
``particles``, ``ess_threshold``); ``noise_std`` (observation noise, "pigdm" only) and
``guidance_scale`` ("pigdm"), ``known_noise`` ("replace"); ``images``: "test" (the first
``num_images`` of the test split) or a .npz (uint8 ``images`` (N, C, H, W), as the sample
mode writes) or .png file of the images' size; ``batch_size`` images per sampler call (0: all).

What it writes, under <workdir>/inpaint/ (``problem_name``: e.g. inpaint_bottom_half_replace_pc):
a PNG with one row per image (input with the unknown pixels grey, mask (inpainting only),
completion, original for the test split), an .npz (uint8 and model-space originals,
observations, masks, completions; labels of the test split), a JSON of metrics
(``known_max_abs_diff`` = max |A x - y|, for inpainting the largest change of a known pixel,
0.0 for replace / smc; for the test split the MSE of the completed pixels, and of simple
fills as floors; for the digits, the accuracy of a clean digits classifier
(run_lib.digits_classifier) on completions, originals and the fills), and the PNG in
TensorBoard. Seeded by config.seed: the same config gives the same completions on the CPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import samplers
from samplers.operators import Colorization, Inpainting, LinearOperator, SuperResolution

from . import compose
from .datasets import build_dataset, preprocess
from .images import make_grid, save_png, to_uint8
from .utils import pick_device, write_config

__all__ = ["TASKS", "MASKS", "named_mask", "read_mask_png", "build_mask", "build_operator",
           "load_images", "inverse_options", "problem_name", "check_problem", "inpaint",
           "fills", "render_rows"]

#: Inverse problems (config.inpaint.task).
TASKS = ("inpaint", "colorize", "super_resolution")
#: Named masks (config.inpaint.mask): the region that is filled.
MASKS = ("left_half", "bottom_half", "center", "random")
#: Seed offsets (config.seed + offset) of the random mask, the sampler, the observation noise.
MASK_SEED, INPAINT_SEED, NOISE_SEED = 20, 21, 22
#: Rows (images) per column block of the PNG.
PNG_ROWS = 25
#: Grey of the unknown pixels in the PNG's input column.
UNKNOWN_GREY = 128


# ----------------------------------------------------------------------------- masks

def named_mask(name: str, height: int, width: int, *, random_fraction: float = 0.5,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The mask ``name`` of MASKS for H x W images: float (1, 1, H, W), 1 = known, 0 = to fill.

    left_half: the left W // 2 columns are filled; bottom_half: the bottom H - H // 2 rows;
    center: the central (H // 2) x (W // 2) square (from H // 4, W // 4); random: exactly
    round(random_fraction * H * W) known pixels at positions drawn from ``generator``."""
    mask = torch.ones(height, width)
    if name == "left_half":
        mask[:, :width // 2] = 0
    elif name == "bottom_half":
        mask[height // 2:, :] = 0
    elif name == "center":
        top, left = height // 4, width // 4
        mask[top:top + height // 2, left:left + width // 2] = 0
    elif name == "random":
        known = round(random_fraction * height * width)
        mask = torch.zeros(height * width)
        mask[torch.randperm(height * width, generator=generator)[:known]] = 1
        mask = mask.reshape(height, width)
    else:
        raise ValueError(f"unknown mask {name!r}; valid masks: {', '.join(MASKS)}, or the path "
                         "of a PNG file (white = known)")
    return mask[None, None]


def read_mask_png(path, height: int, width: int) -> torch.Tensor:
    """The mask of a PNG file (white, grey level >= 128 = known), float (1, 1, H, W); a
    ValueError naming both sizes when the file is not H x W pixels."""
    from PIL import Image
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config.inpaint.mask={str(path)!r}: no such PNG file; give "
                                f"the path of a {width}x{height} PNG (white = known) or one "
                                f"of {', '.join(MASKS)}")
    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"))
    except OSError as error:
        raise ValueError(f"config.inpaint.mask={str(path)!r} is not a readable image "
                         f"({' '.join(str(error).split())})") from None
    if grey.shape != (height, width):
        raise ValueError(f"config.inpaint.mask={str(path)!r} is {grey.shape[1]}x{grey.shape[0]} "
                         f"pixels but the data's images are {width}x{height}: give a mask PNG "
                         f"of {width}x{height} pixels (white = known)")
    return torch.as_tensor(grey >= 128, dtype=torch.float32)[None, None]


def build_mask(config) -> torch.Tensor:
    """config.inpaint.mask for the config's images: float (1, 1, H, W), 1 = known; the
    "random" mask drawn with seed config.seed + MASK_SEED."""
    group = config.inpaint
    _, height, width = compose.data_shape(config)
    if str(group.mask).lower().endswith(".png"):
        return read_mask_png(group.mask, height, width)
    generator = torch.Generator().manual_seed(int(config.seed) + MASK_SEED)
    return named_mask(str(group.mask), height, width,
                      random_fraction=float(group.random_fraction), generator=generator)


# ----------------------------------------------------------------------------- the problem

def build_operator(task: str, mask: torch.Tensor | None = None, factor: int = 2) -> LinearOperator:
    """The observation operator of ``task``: Inpainting(mask), Colorization() or
    SuperResolution(factor)."""
    if task == "inpaint":
        return Inpainting(mask)
    if task == "colorize":
        return Colorization()
    if task == "super_resolution":
        return SuperResolution(int(factor))
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _operator(config) -> LinearOperator:
    group = config.inpaint
    mask = build_mask(config) if group.task == "inpaint" else None
    return build_operator(str(group.task), mask, int(group.factor))


def inverse_options(config, sde) -> tuple[str, str, dict]:
    """(method, sampler, options) of samplers.solve_inverse_problem from config.inpaint:
    "smc": particles, ess_threshold, num_steps = sde.N and eps = config.sampling.pc.eps;
    "pigdm": the sampler's options (config.sampling.<sampler>) and guidance_scale;
    "replace": the sampler's options and known_noise."""
    group = config.inpaint
    method, sampler = str(group.method), str(group.sampler)
    if method == "smc":
        eps = config.sampling.get("pc", {}).get("eps", 1e-3)
        return method, sampler, dict(particles=int(group.particles), num_steps=int(sde.N),
                                     eps=float(eps), ess_threshold=float(group.ess_threshold))
    _, options = compose.sampler_options(config, sampler)
    # the ODE's solver option shares its name with solve_inverse_problem's own ``method``:
    # it cannot be passed through, so the inverse problem's ODE runs the default solver
    solver, default = options.pop("method", None), samplers.SAMPLERS[sampler].defaults.get("method")
    if solver is not None and solver != default:
        raise ValueError(f"config.sampling.{sampler}.method={solver!r}: the inverse problems "
                         f"run the {sampler} sampler with its default solver {default!r} "
                         "(samplers.solve_inverse_problem's own argument 'method' shadows "
                         f"it); set config.sampling.{sampler}.method={default!r} for "
                         "--mode inpaint")
    if method == "pigdm":
        options["guidance_scale"] = float(group.guidance_scale)
    else:
        options["known_noise"] = str(group.known_noise)
    return method, sampler, options


def problem_name(config) -> str:
    """The files' stem: <task>[_<mask> | _x<factor>]_<method>[_<sampler>], e.g.
    inpaint_bottom_half_replace_pc, super_resolution_x2_smc."""
    group = config.inpaint
    task = str(group.task)
    if task == "inpaint":
        mask = str(group.mask)
        task += "_" + (Path(mask).stem if mask.lower().endswith(".png") else mask)
    elif task == "super_resolution":
        task += f"_x{int(group.factor)}"
    method = str(group.method)
    return f"{task}_{method}" if method == "smc" else f"{task}_{method}_{group.sampler}"


class _DryRunDone(Exception):
    """Raised by the dry run's score function: every check of the library has passed."""


def _refuse_score(x, t, *labels):
    raise _DryRunDone


def check_problem(config, sde) -> None:
    """The library's own checks of config.inpaint (operator against the data shape, method /
    sampler / noise combination, options) on one zero image, stopped at the first score
    evaluation: a ValueError with the library's message, before any work."""
    group = config.inpaint
    shape = (1, *compose.data_shape(config))
    operator = _operator(config)
    try:
        operator.check(shape)
    except ValueError as error:
        what = "factor" if group.task == "super_resolution" else "task"
        raise ValueError(f"config.inpaint.{what}={group[what]!r}: {error}") from None
    method, sampler, options = inverse_options(config, sde)
    y = operator.observe(torch.zeros(shape))
    known_noise = options.pop("known_noise", "fresh")
    try:
        samplers.solve_inverse_problem(_refuse_score, sde, operator, y, shape, method=method,
                                       sampler=sampler, noise_std=float(group.noise_std),
                                       known_noise=known_noise, device="cpu", **options)
    except _DryRunDone:
        return
    except ValueError as error:
        raise ValueError(f"config.inpaint (task={group.task!r}, method={method!r}, sampler="
                         f"{sampler!r}, noise_std={group.noise_std:g}): {error}") from None


# ----------------------------------------------------------------------------- images

def _read_image_file(path: Path, shape) -> np.ndarray:
    """uint8 images (N, C, H, W) of a .npz (key ``images``) or a .png file, checked against
    the data's (C, H, W)."""
    channels, height, width = shape
    if not path.is_file():
        raise FileNotFoundError(f"config.inpaint.images={str(path)!r}: no such file; use "
                                "'test' or the path of an .npz / .png file")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise ValueError(f"config.inpaint.images={str(path)!r} has no array 'images' "
                                 f"(it has {', '.join(archive.files) or 'none'}); save uint8 "
                                 "images (N, C, H, W) under the key 'images'")
            images = archive["images"]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"config.inpaint.images={str(path)!r}: 'images' must be uint8 "
                             f"(N, C, H, W), got {images.dtype} {images.shape}")
    elif path.suffix.lower() == ".png":
        from PIL import Image
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except OSError as error:
            raise ValueError(f"config.inpaint.images={str(path)!r} is not a readable image "
                             f"({' '.join(str(error).split())})") from None
        images = (array[None] if array.ndim == 2 else array.transpose(2, 0, 1))[None]
    else:
        raise ValueError(f"config.inpaint.images={str(path)!r} must be 'test' or an .npz / "
                         ".png file")
    if tuple(images.shape[1:]) != (channels, height, width):
        raise ValueError(f"config.inpaint.images={str(path)!r} holds images of shape "
                         f"{tuple(images.shape[1:])} (C, H, W) but the data's are "
                         f"{(channels, height, width)}: give images of that shape")
    return np.ascontiguousarray(images)


def load_images(config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 images (N, C, H, W), labels (N,) or None) of config.inpaint.images: the first
    num_images of the test split ("test") or of the given file."""
    group = config.inpaint
    count = int(group.num_images)
    if group.images == "test":
        test = build_dataset(config, "test")
        if count > len(test):
            raise ValueError(f"config.inpaint.num_images={count} but the {config.data.name} "
                             f"test split has {len(test)} images; use at most {len(test)}")
        return test.images[:count], test.labels[:count]
    images = _read_image_file(Path(group.images), compose.data_shape(config))
    return torch.as_tensor(images[:count]), None


# ----------------------------------------------------------------------------- pictures

def _observation_picture(task: str, operator: LinearOperator, y: torch.Tensor, mask, shape,
                         centered: bool) -> torch.Tensor:
    """The observation as uint8 images (N, C, H, W): inpainting the known pixels with the
    unknown ones grey; colorization the grey image; super-resolution the low-resolution
    image, each pixel repeated factor x factor times."""
    if task == "inpaint":
        pixels = to_uint8(y, centered=centered)
        pixels = torch.where(mask.bool().cpu(), pixels, torch.full_like(pixels, UNKNOWN_GREY))
    elif task == "super_resolution":
        f = operator.factor
        pixels = to_uint8(y.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3),
                          centered=centered)
    else:
        pixels = to_uint8(y, centered=centered)
    return pixels


def render_rows(columns: list[torch.Tensor], *, rows_per_block: int = PNG_ROWS) -> np.ndarray:
    """One (H, W, 3) uint8 picture of uint8 image columns (each (N, 1 or 3, h, w)): row i
    holds image i of every column; rows_per_block rows per block, blocks side by side."""
    columns = [c.expand(-1, 3, -1, -1) if c.shape[1] == 1 else c for c in columns]
    n, _, h, w = columns[0].shape
    upscale = max(1, 64 // w)
    padding = max(1, upscale // 2)
    blocks = []
    for first in range(0, n, rows_per_block):
        rows = torch.stack([c[first:first + rows_per_block] for c in columns], dim=1)
        blocks.append(make_grid(rows.reshape(-1, 3, h, w), nrow=len(columns), upscale=upscale,
                                padding=padding))
    height = blocks[0].shape[0]
    gap = np.full((height, 4 * padding, 3), 255, dtype=np.uint8)
    parts = []
    for block in blocks:
        if block.shape[0] < height:
            block = np.concatenate([block, np.full((height - block.shape[0], *block.shape[1:]),
                                                   255, dtype=np.uint8)])
        parts += [block, gap]
    return np.concatenate(parts[:-1], axis=1)


# ----------------------------------------------------------------------------- metrics

def fills(task: str, operator: LinearOperator, x0: torch.Tensor, y: torch.Tensor, mask,
          train_mean: torch.Tensor, black: float) -> dict:
    """Naive completions of the observation (model space, like x0), the floors of the
    metrics: inpainting ``zero_fill`` (unknown pixels black, the digits' background) and
    ``mean_fill`` (the training images' per-pixel mean); super-resolution ``block_mean``
    (each low-resolution pixel repeated); colorization ``grey`` (R = G = B)."""
    if task == "inpaint":
        known = mask.bool().to(x0.device)
        return {"zero_fill": torch.where(known, x0, torch.full_like(x0, black)),
                "mean_fill": torch.where(known, x0, train_mean.to(x0).expand_as(x0))}
    if task == "super_resolution":
        f = operator.factor
        return {"block_mean": y.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)}
    return {"grey": y.expand_as(x0)}


def _completed_mse(x: torch.Tensor, x0: torch.Tensor, mask) -> float:
    """Mean squared error (model space) over the filled pixels (inpainting) or all pixels."""
    squared = (x.double() - x0.double()) ** 2
    if mask is None:
        return squared.mean().item()
    unknown = (1 - mask.double()).to(x.device).expand_as(squared)
    return ((squared * unknown).sum() / unknown.sum().clamp(min=1)).item()


def _digits_accuracies(config, completions, originals, floor_fills, labels) -> dict:
    from .digits_classifier import accuracy, digits_classifier, digits_classifier_path
    net, info = digits_classifier(digits_classifier_path(config))
    return {"classifier": {"name": "run_lib.digits_classifier.DigitsNet v2 (clean, trained on the "
                                   "1500 training digits)", **info},
            "accuracy_completions": accuracy(net, completions, labels),
            "accuracy_originals": accuracy(net, originals, labels),
            **{f"accuracy_{name}": accuracy(net, x, labels) for name, x in floor_fills.items()}}


# ----------------------------------------------------------------------------- the mode

def _score_function(config, run):
    """The unconditional score of the run: a class-conditional run with classifier-free
    guidance training gets its null label."""
    if not run.num_classes:
        return run.score_fn
    null = compose.null_label(config)
    if null is None:
        raise ValueError("--mode inpaint needs an unconditional score: this run is "
                         "class-conditional without a null label (config.training.p_uncond=0)")
    return lambda x, t: run.score_fn(x, t, torch.full((x.shape[0],), null, device=x.device,
                                                      dtype=torch.long))


@torch.no_grad()
def inpaint(config, workdir, *, progress: bool = True, checkpoint: str | None = None) -> dict:
    """Solve config.inpaint's inverse problem for its images with the EMA weights of
    ``workdir`` (or ``checkpoint``); write <workdir>/inpaint/<problem_name>.{png,npz,json}
    and the PNG in TensorBoard (see the module docstring). Everything is loaded and checked
    before anything is written. Returns the metrics."""
    from .evaluate import load_score_fn
    workdir = Path(workdir)
    group = config.inpaint
    task = str(group.task)
    device = pick_device(config.get("device", "auto"))
    centered = bool(config.data.get("centered", True))
    run = load_score_fn(config, workdir, device, checkpoint=checkpoint)
    score_fn = _score_function(config, run)
    images, labels = load_images(config)
    operator = _operator(config)
    mask = operator.mask.float() if task == "inpaint" else None
    method, sampler, options = inverse_options(config, run.sde)
    known_noise = options.pop("known_noise", "fresh")
    is_test = group.images == "test"
    write_config(config, workdir)       # after a successful load: nothing written on errors

    x0 = preprocess(images, centered=centered).to(device)
    y = operator.observe(x0)
    noise_std = float(group.noise_std)
    if noise_std > 0:
        noise = torch.Generator(device=device).manual_seed(int(config.seed) + NOISE_SEED)
        y = y + noise_std * torch.randn(y.shape, generator=noise, device=device, dtype=y.dtype)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + INPAINT_SEED)
    n = len(x0)
    batch_size = int(group.batch_size) or n
    parts, nfe = [], 0
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        part = slice(first, first + batch_size)
        result = samplers.solve_inverse_problem(
            score_fn, run.sde, operator, y[part], tuple(x0[part].shape), method=method,
            sampler=sampler, noise_std=noise_std, known_noise=known_noise, generator=generator,
            device=device, progress=progress, **options)
        parts.append(result.x)
        nfe = max(nfe, int(result.nfe))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    x = torch.cat(parts)

    metrics = {"task": task, "mask": str(group.mask) if task == "inpaint" else None,
               "known_fraction": None if mask is None else mask.mean().item(),
               "factor": int(group.factor) if task == "super_resolution" else None,
               "method": method, "sampler": None if method == "smc" else sampler,
               "particles": int(group.particles) if method == "smc" else None,
               "noise_std": noise_std, "images": str(group.images), "num_images": n,
               "step": run.step, "nfe": nfe, "seconds": round(seconds, 3),
               # max |A x - y|: for inpainting the largest change of a known pixel
               "known_max_abs_diff": (operator.observe(x) - y).abs().max().item(),
               "nonfinite_fraction": (~torch.isfinite(x.reshape(n, -1))).any(1).double()
               .mean().item()}
    name = problem_name(config)
    folder = workdir / "inpaint"
    folder.mkdir(parents=True, exist_ok=True)
    uint8 = lambda v: to_uint8(v, centered=centered).numpy()      # noqa: E731
    arrays = {"completions": uint8(x), "completions_model": x.float().cpu().numpy(),
              "observations_model": y.float().cpu().numpy()}
    if task == "inpaint":
        arrays["masks"] = mask.to(torch.uint8).numpy()
    observed = _observation_picture(task, operator, y, mask, x0.shape, centered)
    arrays["observations"] = observed.numpy()
    columns = [observed]
    if task == "inpaint":
        columns.append((mask.expand(n, 1, -1, -1) * 255).to(torch.uint8))
    columns.append(to_uint8(x, centered=centered))
    if is_test:
        arrays.update(originals=images.numpy(), originals_model=x0.float().cpu().numpy(),
                      labels=labels.numpy())
        columns.append(images)
        train_mean = preprocess(build_dataset(config, "train").images,
                                centered=centered).mean(0, keepdim=True)
        floor_fills = fills(task, operator, x0, y, mask, train_mean, -1.0 if centered else 0.0)
        metrics["mse_completed"] = _completed_mse(x, x0, mask)
        metrics.update({f"mse_{k}": _completed_mse(v, x0, mask) for k, v in floor_fills.items()})
        if config.data.name == "digits":
            metrics.update(_digits_accuracies(config, x, x0, floor_fills, labels))
    np.savez_compressed(folder / f"{name}.npz", **arrays)
    picture = render_rows(columns)
    save_png(picture, folder / f"{name}.png")
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(workdir / "tensorboard")) as writer:
        writer.add_image(f"inpaint/{name}", picture, run.step, dataformats="HWC")
    metrics["columns"] = ["input (unknown pixels grey)" if task == "inpaint" else "observation",
                          *(["mask (white = known)"] if task == "inpaint" else []),
                          "completion", *(["original"] if is_test else [])]
    (folder / f"{name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
