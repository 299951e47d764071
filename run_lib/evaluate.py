"""Sample and likelihood modes of image runs, and the table that compares work directories.

    load_score_fn(config, workdir, device)   -> the EMA weights of checkpoints/latest.pt as a score_fn
    sample_images(config, workdir)           -> samples_<method>.{png,npz,json} + TensorBoard grid
    likelihood_images(config, workdir)       -> likelihood.json: bits/dim of the test split
    gaussian_fit_bpd(config)                 -> the bits/dim of a full-covariance Gaussian (baseline)
    compare_workdirs(workdirs)               -> one markdown table (SDE, model, NFE, bits/dim, ...)
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

import models
import samplers
import sde_lib
from samplers.common import check_choice
from samplers.metrics import frechet_distance

from .datasets import build_dataset, preprocess
from .images import make_grid, save_png, to_uint8
from .utils import pick_device

__all__ = ["load_score_fn", "sample_images", "likelihood_images", "gaussian_fit", "gaussian_fit_bpd",
           "compare_workdirs", "LoadedRun"]

log = logging.getLogger(__name__)

#: Pixel Frechet distances are reported for images up to this many dimensions (8x8 digits,
#: 28x28 MNIST); CIFAR-10's 3072 needs far more samples than a quick run draws.
MAX_PIXEL_FD_DIM = 1024


class LoadedRun:
    """A trained image run: the network with the EMA weights in eval mode, its score_fn,
    the SDE, the checkpoint's step and, for class-conditional models, the class count."""

    def __init__(self, model, score_fn, sde, step: int, num_classes: int):
        self.model, self.score_fn, self.sde = model, score_fn, sde
        self.step, self.num_classes = step, num_classes

    def score_for_labels(self, labels: torch.Tensor | None):
        """score_fn(x, t) for the samplers; class-conditional runs get ``labels`` (B,)."""
        return with_class_labels(self.score_fn, labels)


def balanced_labels(n: int, num_classes: int, device=None) -> torch.Tensor | None:
    """Class labels 0, 1, ..., K-1, 0, ... (n,) for a class-conditional model (K > 0), else None."""
    return torch.arange(n, device=device) % num_classes if num_classes else None


def _score_with_labels(score_fn, labels, x, t):
    return score_fn(x, t, labels)


def with_class_labels(score_fn, labels: torch.Tensor | None):
    """score_fn(x, t) with fixed class labels (B,) bound (``score_fn`` itself when None)."""
    return score_fn if labels is None else functools.partial(_score_with_labels, score_fn, labels)


def is_score_sde_checkpoint(state: dict) -> bool:
    """Whether a checkpoint dict was written by the official Score SDE code (its EMA is a bare
    list ``ema['shadow_params']``; ours keys the shadow by name)."""
    return isinstance(state.get("ema"), dict) and "shadow_params" in state["ema"]


def load_score_fn(config, workdir, device, *, checkpoint: str | None = None,
                  use_ema: bool = True) -> LoadedRun:
    """The run of ``workdir`` (checkpoints/latest.pt, or ``checkpoint``) with its EMA weights.

    ``checkpoint`` may also be a checkpoint of the official Score SDE PyTorch code (e.g. a
    published checkpoint_<k>.pth): it is converted with models.convert_score_sde_state_dict.
    The file is read with weights_only=True and loaded strictly; a checkpoint of another
    model raises a one-line ValueError naming the first mismatching key.
    """
    path = Path(checkpoint) if checkpoint else Path(workdir) / "checkpoints" / "latest.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: run --mode train with this --config "
                                "and --workdir first (or pass --checkpoint)")
    state = torch.load(path, map_location=device, weights_only=True)
    model = models.build_model(config).to(device)
    try:
        if is_score_sde_checkpoint(state):
            models.load_state_dict_strict(model, models.convert_score_sde_state_dict(state, ema=use_ema))
        else:
            models.load_state_dict_strict(model, state["model"])
            if use_ema:
                ema = models.ExponentialMovingAverage(model, decay=config.model.ema_rate)
                ema.load_state_dict(state["ema"])
                ema.copy_to(model)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path} does not match this config's model (config.model.name="
                         f"{config.model.name!r}): {error}") from error
    model.eval()
    sde = sde_lib.build_sde(config)
    score_fn = models.build_score_fn(config, sde, model)
    return LoadedRun(model, score_fn, sde, int(state["step"]), int(config.model.get("num_classes") or 0))


def _pixel_fd(samples_uint8: torch.Tensor, reference_uint8: torch.Tensor) -> float | None:
    """Frechet distance between two image sets in pixel space, pixels in [0, 1]."""
    if samples_uint8[0].numel() > MAX_PIXEL_FD_DIM:
        return None
    return float(frechet_distance(samples_uint8.double() / 255, reference_uint8.double() / 255))


@torch.no_grad()
def sample_images(config, workdir, *, method: str | None = None, progress: bool = True,
                  checkpoint: str | None = None) -> dict:
    """Sample ``config.sampling.num_samples`` images from the EMA weights of ``workdir``.

    Writes samples_<method>.npz (uint8 images (N, C, H, W) and, for conditional runs, labels),
    samples_<method>.png (a grid of the first 100, pixels enlarged for small images),
    the grid to TensorBoard (samples/<method>) and samples_<method>.json: sampler, NFE,
    seconds, images/s and, for small images, the pixel Frechet distance of the samples to the
    test split next to that of the training split to the test split (the floor).
    Seeded by config.seed: the same config gives the same samples on the CPU.
    ``checkpoint``: another checkpoint file than workdir/checkpoints/latest.pt (ours or a
    published Score SDE one, see ``load_score_fn``).
    """
    workdir = Path(workdir)
    device = pick_device(config.get("device", "auto"))
    method = method or config.sampling.method
    check_choice("sampler", method, samplers.SAMPLERS)
    run = load_score_fn(config, workdir, device, checkpoint=checkpoint)
    workdir.mkdir(parents=True, exist_ok=True)
    n = int(config.sampling.num_samples)
    batch_size = int(config.sampling.get("batch_size", 0) or n)
    shape = models.data_shape(config)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + 10)
    labels = balanced_labels(n, run.num_classes, device)   # one per image, across batches
    batches, nfe, nonfinite = [], 0, 0
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        size = min(batch_size, n - first)
        batch_labels = None if labels is None else labels[first:first + size]
        result = samplers.sample_from_config(config.sampling, run.score_for_labels(batch_labels), run.sde,
                                             (size, *shape), generator=generator, device=device,
                                             progress=progress, method=method)
        nonfinite += int((~torch.isfinite(result.x.flatten(1))).any(dim=1).sum())
        batches.append(to_uint8(result.x, centered=bool(config.data.centered)))
        nfe = max(nfe, result.nfe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    images = torch.cat(batches)
    metrics = {"sampler": method, "step": run.step, "num_samples": n, "nfe": nfe,
               "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2),
               "nonfinite_fraction": nonfinite / n}
    test = build_dataset(config, "test").images
    fd = _pixel_fd(images, test)
    if fd is not None:
        metrics["pixel_fd_to_test"] = fd
        metrics["pixel_fd_train_to_test"] = _pixel_fd(build_dataset(config, "train").images, test)
    arrays = {"images": images.numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    np.savez_compressed(workdir / f"samples_{method}.npz", **arrays)
    upscale = max(1, 64 // shape[-1])
    grid = make_grid(images[:100], upscale=upscale, padding=max(1, upscale // 2))
    save_png(grid, workdir / f"samples_{method}.png")
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(workdir / "tensorboard")) as writer:
        writer.add_image(f"samples/{method}", grid, run.step, dataformats="HWC")
    (workdir / f"samples_{method}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    n = values.numel()
    return values.mean().item(), (values.std().item() / math.sqrt(n)) if n > 1 else float("nan")


def likelihood_images(config, workdir, *, progress: bool = True,
                      checkpoint: str | None = None) -> dict:
    """Bits/dim of the test split through the probability-flow ODE with the EMA weights.

    Uses the first config.eval.likelihood_samples test images (0: all), in batches of
    config.eval.batch_size, uniformly dequantized (samplers.bits_per_dim), with
    config.eval.{trace, probes, rtol, atol, likelihood_eps, ode_method}. Writes
    likelihood.json: mean bits/dim with its standard error over images, NFE per batch,
    seconds, and the bits/dim of a full-covariance Gaussian fitted to the training images
    (``gaussian_fit_bpd``), the baseline a score model has to beat.
    """
    workdir = Path(workdir)
    device = pick_device(config.get("device", "auto"))
    run = load_score_fn(config, workdir, device, checkpoint=checkpoint)
    workdir.mkdir(parents=True, exist_ok=True)
    ev = config.eval
    test = build_dataset(config, "test")
    count = int(ev.likelihood_samples) or len(test)
    images, labels = test.images[:count], test.labels[:count]
    batch_size = int(ev.get("batch_size", 0) or count)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + 12)
    bpds, nfes = [], []
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        batch = images[first:first + batch_size].to(device)
        cond = labels[first:first + batch_size].to(device) if run.num_classes else None
        result = samplers.bits_per_dim(
            run.score_for_labels(cond), run.sde, batch, centered=bool(config.data.centered),
            dequantize=True, generator=generator, trace=ev.trace, probes=int(ev.probes),
            method=ev.get("ode_method", "dopri5"), rtol=float(ev.get("rtol", 1e-5)),
            atol=float(ev.get("atol", 1e-5)), eps=float(ev.likelihood_eps), progress=progress)
        bpds.append(result.bpd.double().cpu())
        nfes.append(int(result.nfe))
        log.info("likelihood batch %d: %.4f bits/dim (NFE %d)", first // batch_size,
                 bpds[-1].mean().item(), nfes[-1])
    seconds = time.perf_counter() - start
    bpd, se = _mean_and_standard_error(torch.cat(bpds))
    metrics = {"sde": type(run.sde).__name__, "model": str(config.model.name),
               "continuous": bool(config.training.get("continuous", True)), "step": run.step,
               "num_images": len(images), "bits_per_dim": bpd, "bits_per_dim_standard_error": se,
               "nfe_per_batch": nfes, "nfe_mean": sum(nfes) / len(nfes), "seconds": round(seconds, 3),
               "trace": str(ev.trace), "probes": int(ev.probes),
               "gaussian_fit_bits_per_dim": gaussian_fit_bpd(config, num_images=len(images))}
    (workdir / "likelihood.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def gaussian_fit(config, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-likelihood mean (D,) and covariance (D, D), float64, of the uniformly
    dequantized training images in the model's data scaling (config.data.centered)."""
    train = preprocess(build_dataset(config, "train").images, centered=bool(config.data.centered),
                       dequantize=True, generator=torch.Generator().manual_seed(seed))
    train = train.double().flatten(1)
    return train.mean(0), torch.cov(train.T, correction=0)


def gaussian_fit_bpd(config, *, num_images: int = 0, seed: int = 0,
                     smoothing_std: float = 0.0) -> float:
    """Bits/dim of the first ``num_images`` (0: all) test images under the full-covariance
    Gaussian of ``gaussian_fit``, with the same uniform dequantization as ``likelihood_images``.

    log p(u) = log N(y; mu, Sigma) + D log|dy/du| for y = 2u - 1 (centered) or y = u; bits/dim
    = -(log p(u) - D log 256) / (D ln 2), i.e. samplers.bits_per_dim's formula. A baseline:
    a score model that does not beat it has learned less than the second moments.
    ``smoothing_std`` adds that much isotropic Gaussian noise to the fit (Sigma + s^2 I): the
    density a VE model's ODE actually evaluates is the data smoothed at sigma(eps) ~ sigma_min.
    """
    centered = bool(config.data.centered)
    mean, cov = gaussian_fit(config, seed=seed)
    dim = mean.numel()
    test_images = build_dataset(config, "test").images
    test_images = test_images[:num_images] if num_images else test_images
    test = preprocess(test_images, centered=centered, dequantize=True,
                      generator=torch.Generator().manual_seed(seed + 1)).double().flatten(1)
    gaussian = torch.distributions.MultivariateNormal(
        mean, covariance_matrix=cov + (1e-9 + smoothing_std ** 2) * torch.eye(dim, dtype=torch.float64))
    log_jacobian = dim * math.log(2.0) if centered else 0.0
    log_pu = gaussian.log_prob(test) + log_jacobian
    return (-(log_pu - dim * math.log(256.0)) / (dim * math.log(2.0))).mean().item()


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def compare_workdirs(workdirs) -> str:
    """One markdown table of trained runs side by side: SDE, model, training steps, the
    likelihood (bits/dim +- standard error, NFE) of likelihood.json and, per sampler with a
    samples_<method>.json, its NFE and pixel FD. Work directories without results show '-'."""
    rows = []
    samplers_seen: list[str] = []
    for workdir in map(Path, workdirs):
        config = _read_json(workdir / "config.json")
        if config is None:
            raise FileNotFoundError(f"{workdir} has no config.json: not a work directory of "
                                    "main.py (train there first)")
        like = _read_json(workdir / "likelihood.json") or {}
        sampled = {p.stem[len("samples_"):]: json.loads(p.read_text())
                   for p in sorted(workdir.glob("samples_*.json"))}
        samplers_seen += [m for m in sampled if m not in samplers_seen]
        rows.append((workdir, config, like, sampled))
    header = ["run", "SDE", "model", "steps", "bits/dim", "NFE (ODE)", "Gaussian fit bits/dim"]
    header += [f"{m}: NFE / pixel FD" for m in samplers_seen]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workdir, config, like, sampled in rows:
        bpd = (f"{like['bits_per_dim']:.3f} +- {like['bits_per_dim_standard_error']:.3f}"
               if like else "-")
        cells = [workdir.name, config["sde"]["name"], config["model"]["name"],
                 str(like.get("step", "-")), bpd,
                 f"{like['nfe_mean']:.0f}" if like else "-",
                 f"{like['gaussian_fit_bits_per_dim']:.3f}" if like else "-"]
        for method in samplers_seen:
            s = sampled.get(method)
            fd = s.get("pixel_fd_to_test") if s else None
            cells.append(f"{s['nfe']} / {fd:.4f}" if s and fd is not None
                         else (f"{s['nfe']} / -" if s else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
