"""Sample and likelihood modes of every run (toy mixtures and images alike), and the table
that compares work directories.

    load_score_fn(config, workdir, device)   -> the EMA weights of the newest checkpoint as a score_fn
    sample(config, workdir)                  -> samples_<method>.{npz,png,json} + TensorBoard
    likelihood(config, workdir)              -> likelihood.json: bits/dim of 8-bit images, or
                                                nats next to the true NLL (closed-form data)
    gaussian_fit_bpd(config)                 -> the bits/dim of a full-covariance Gaussian (baseline)
    compare_workdirs(workdirs)               -> one markdown table (SDE, model, NFE, bits/dim, ...)

Both modes work in seeded, resumable chunks (config.sampling.batch_size /
config.eval.batch_size; run_lib.chunks) under <workdir>/samples_<method>/ and
<workdir>/likelihood/, sharded over torchrun's ranks; rank 0 gathers them one at a time, so
large images are streamed to the .npz and never held all at once.

Both modes write the resolved config.json first, so a work directory used only with
--checkpoint can join --mode compare. Sample mode writes the samples before it computes any
metric; a metric that needs data that is absent (a CIFAR-10 archive not downloaded) is
skipped with a note in the JSON.
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
from samplers.harness import progress_bar
from samplers.metrics import frechet_distance

from . import compose, exact
from .checkpoints import checkpoint_dir, load_latest, read_checkpoint
from .chunks import chunk_paths, chunk_size, offset_seed, own_chunks, read_chunk, write_chunk
from .chunks import write_npz_streamed
from .datasets import build_dataset, preprocess
from .distributed import DistContext, init_distributed
from .images import class_rows, image_grid, picture, save_png, to_uint8
from .utils import write_config

__all__ = ["load_score_fn", "sample", "likelihood", "draw_samples", "save_samples",
           "sample_quality", "gaussian_fit", "gaussian_fit_bpd", "compare_workdirs",
           "LoadedRun", "balanced_labels", "with_class_labels", "classifier_path",
           "label_accuracy", "sample_chunk_seed", "likelihood_chunk_seed"]

log = logging.getLogger(__name__)

#: Pixel Frechet distances are reported for images up to this many dimensions (8x8 digits,
#: 28x28 MNIST); CIFAR-10's 3072 needs far more samples than a quick run draws.
MAX_PIXEL_FD_DIM = 1024

#: Seed offsets (config.seed + offset) of the samples, the true draws they are compared
#: with, and the likelihood's dequantization / probe noise.
SAMPLE_SEED, TRUTH_SEED, LIKELIHOOD_SEED = 10, 11, 12

#: The picture of samples larger than MAX_PIXEL_FD_DIM values shows at most this many.
MAX_PICTURE_IMAGES = 64

#: The protocol version of the chunk files of sample and likelihood mode (a chunk of another
#: version is done again).
CHUNK_VERSION = 1

#: What a checkpoint needs for sampling: ours, or the official Score SDE code's.
SAMPLING_KEYS = ("model", "ema", "step")


class LoadedRun:
    """A trained run: the network with the EMA weights in eval mode, its score_fn, the SDE,
    the checkpoint's step and, for class-conditional models, the class count."""

    def __init__(self, model, score_fn, sde, step: int, num_classes: int):
        self.model, self.score_fn, self.sde = model, score_fn, sde
        self.step, self.num_classes = step, num_classes
        self._posterior_x0_variance = None

    def posterior_x0_variance(self, config, device, progress: bool = False) -> torch.Tensor:
        """E Var[x0 | x_i] (N,) of Analytic-DPM (samplers.expected_posterior_variance), estimated
        once on the first config.eval.vlb_analytic_samples training images (seeded)."""
        if self._posterior_x0_variance is None:
            train = build_dataset(config, "train")
            count = int(config.eval.get("vlb_analytic_samples", 100))
            data = preprocess(train.images[:count], centered=bool(config.data.centered)).to(device)
            generator = torch.Generator(device=device).manual_seed(int(config.seed) + LIKELIHOOD_SEED)
            self._posterior_x0_variance = samplers.expected_posterior_variance(
                self.score_fn, self.sde, data, generator=generator,
                level_time=compose.level_time(config),
                batch_size=int(config.eval.get("batch_size", 0) or 0), progress=progress)
        return self._posterior_x0_variance

    def sampler_extras(self, config, method: str, device, progress: bool = False) -> dict:
        """What compose.sample needs beyond the config: Analytic-DPM's estimate for
        ``--sampler respaced`` with variance 'analytic'."""
        _, options = compose.sampler_options(config, method)
        if method == "respaced" and options.get("variance") == "analytic":
            return {"posterior_x0_variance": self.posterior_x0_variance(config, device, progress)}
        return {}

    def score_for_labels(self, labels: torch.Tensor | None):
        """score_fn(x, t) for the samplers; class-conditional runs get ``labels`` (B,)."""
        return with_class_labels(self.score_fn, labels)


def balanced_labels(n: int, num_classes: int, device=None) -> torch.Tensor | None:
    """Class labels 0, 1, ..., K-1, 0, ... (n,) for a class-conditional model (K > 0), else None."""
    return torch.arange(n, device=device) % num_classes if num_classes else None


def _score_with_labels(score_fn, labels, x, t):
    if x.shape[0] != labels.shape[0] and x.shape[0] % labels.shape[0] == 0:
        # the likelihood's replica-major replicated batch (exact trace, several probes)
        labels = labels.repeat(x.shape[0] // labels.shape[0])
    return score_fn(x, t, labels)


def with_class_labels(score_fn, labels: torch.Tensor | None):
    """score_fn(x, t) with fixed class labels (B,) bound (``score_fn`` itself when None); x of
    R B rows (a batch replicated replica-major, as the likelihood's traces do) gets the labels
    repeated R times."""
    return score_fn if labels is None else functools.partial(_score_with_labels, score_fn, labels)


def _read_run_checkpoint(workdir, device, checkpoint: str | None) -> tuple[dict, Path]:
    """The checkpoint named by --checkpoint, or the newest loadable one of ``workdir``."""
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: pass an existing file to "
                                    "--checkpoint")
        return read_checkpoint(path, device, required=SAMPLING_KEYS), path
    folder = checkpoint_dir(workdir)
    state, path = load_latest(folder, device, required=SAMPLING_KEYS)
    if state is None:
        raise FileNotFoundError(f"no checkpoint at {folder / 'latest.pt'}: run --mode train "
                                "with this --config and --workdir first (or pass --checkpoint)")
    return state, path


def _load_weights(model, state: dict, config, use_ema: bool) -> None:
    if models.is_score_sde_checkpoint(state):
        models.load_state_dict_strict(model, models.convert_score_sde_state_dict(state, ema=use_ema))
        return
    models.load_state_dict_strict(model, state["model"])
    if use_ema:
        ema = models.ExponentialMovingAverage(model, decay=float(config.model.ema_rate))
        ema.load_state_dict(state["ema"])
        ema.copy_to(model)


def load_score_fn(config, workdir, device, *, checkpoint: str | None = None,
                  use_ema: bool = True) -> LoadedRun:
    """The run of ``workdir`` (checkpoints/latest.pt, or when that cannot be read the newest
    loadable checkpoint_<step>.pt, with a warning; or the file ``checkpoint``) with its EMA
    weights (``use_ema``) in eval mode.

    ``checkpoint`` may also be a checkpoint of the official Score SDE PyTorch code (e.g. a
    published checkpoint_<k>.pth): it is converted with models.convert_score_sde_state_dict,
    and a discrete-time model then takes the official code's labels (discrete_labels=
    "score_sde": the fractional t (N - 1) for VP), so its scores are the official ones.
    Files are read with weights_only=True and loaded strictly; a checkpoint of another model
    raises a one-line ValueError naming the first mismatching key.
    """
    state, path = _read_run_checkpoint(workdir, device, checkpoint)
    model = compose.build_model(config).to(device)
    try:
        _load_weights(model, state, config, use_ema)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path} does not match this config's model (config.model.name="
                         f"{config.model.name!r}): {error}") from error
    model.eval()
    sde = compose.build_sde(config)
    # weights of the official code get its discrete-time labels (models/score.py)
    official = models.is_score_sde_checkpoint(state)
    score_fn = compose.build_score_fn(config, sde, model,
                                      discrete_labels="score_sde" if official else None)
    return LoadedRun(model, score_fn, sde, int(state["step"]),
                     int(config.model.get("num_classes") or 0))


# ----------------------------------------------------------------------------- sample mode

def sample_chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of sample mode: config.seed + 10 + 10^6 k (chunk
    0 keeps the seed of the whole draw before chunks: one chunk gives the samples it gave)."""
    return offset_seed(int(seed) + SAMPLE_SEED, chunk)


def likelihood_chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of likelihood mode: config.seed + 12 + 10^6 k."""
    return offset_seed(int(seed) + LIKELIHOOD_SEED, chunk)


def _is_small(shape) -> bool:
    """Flat data, or images of at most MAX_PIXEL_FD_DIM values: all samples fit in memory
    (pixel FD, label accuracy, exact metrics and scatter plots need them all)."""
    return len(shape) == 1 or math.prod(shape) <= MAX_PIXEL_FD_DIM


def _sample_sizes(config) -> tuple[int, int]:
    """(N = config.sampling.num_samples, chunk size = config.sampling.batch_size or N)."""
    n = int(config.sampling.num_samples)
    return n, int(config.sampling.get("batch_size", 0) or n)


def _draw_chunk(config, run: LoadedRun, method: str, k: int, size: int, labels, logits_fn,
                extras: dict, device, progress: bool):
    """Chunk k of sample mode: (x (size, *data_shape) in model space on the CPU, NFE, seconds),
    drawn with the generator of ``sample_chunk_seed`` and the labels (size,) or None."""
    generator = torch.Generator(device=device).manual_seed(sample_chunk_seed(config.seed, k))
    score_fn = compose.guided_score_fn(config, run.sde, run.score_fn, labels, logits_fn)
    start = time.perf_counter()
    result = compose.sample(config, score_fn, run.sde, (size, *compose.data_shape(config)),
                            method=method, generator=generator, device=device,
                            progress=progress, **extras)
    x = result.x.detach().cpu()         # waits for the device
    return x, int(result.nfe), time.perf_counter() - start


def _nonfinite_rows(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).sum())


def draw_samples(config, run: LoadedRun, method: str, *, device, progress: bool = True,
                 logits_fn=None):
    """config.sampling.num_samples samples in model space, (N, *data_shape) on the CPU, in
    memory (``sample`` streams them to disk instead): the chunks of config.sampling.batch_size
    (0: one chunk) of sample mode, chunk k from a generator seeded ``sample_chunk_seed(
    config.seed, k)``, with the labels of config.sampling.class_label (-1: 0, 1, ..., K-1, 0,
    ...) and the guidance of config.sampling (compose.guided_score_fn; ``logits_fn``: the
    classifier of classifier guidance). Returns (x, labels (N,) or None, metrics: sampler,
    step, num_samples, nfe (per call; a CFG step is two network passes), seconds,
    samples_per_s, nonfinite_fraction)."""
    n, size = _sample_sizes(config)
    labels = compose.sampling_labels(config, n, classifier=logits_fn is not None,
                                     device=device)    # one per sample, across chunks
    extras = run.sampler_extras(config, method, device, progress)
    parts, nfe, seconds = [], 0, 0.0
    for k in range(-(-n // size)):
        first, m = k * size, chunk_size(n, size, k)
        x, chunk_nfe, chunk_seconds = _draw_chunk(
            config, run, method, k, m, None if labels is None else labels[first:first + m],
            logits_fn, extras, device, progress)
        parts.append(x)
        nfe, seconds = max(nfe, chunk_nfe), seconds + chunk_seconds
    x = torch.cat(parts)
    metrics = {"sampler": method, "step": run.step, "num_samples": n, "nfe": nfe,
               "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 2),
               "nonfinite_fraction": _nonfinite_rows(x) / n}
    return x, labels, metrics


def save_samples(config, workdir, method: str, x: torch.Tensor, labels, *, step: int,
                 num_classes: int = 0) -> None:
    """samples_<method>.{npz,png} and the TensorBoard picture of samples x held in memory
    (``sample`` writes the same files from its chunks): see ``_write_sample_files``."""
    centered = bool(config.data.get("centered", True))
    shape = tuple(x.shape[1:])
    part = {"x": x.numpy()} if x.ndim != 4 else {"images": to_uint8(x, centered=centered).numpy()}
    if labels is not None:
        part["labels"] = labels.cpu().numpy()
    _write_sample_files(config, Path(workdir), method, [part], len(x), shape, labels,
                        step=step, num_classes=num_classes)


def _write_sample_files(config, workdir: Path, method: str, chunks, n: int, shape, labels, *,
                        step: int, num_classes: int) -> list:
    """samples_<method>.npz (uint8 ``images`` (N, C, H, W), or float32 ``samples`` (N, D) for
    flat data; ``labels`` (N,) when the samples have labels), samples_<method>.png (a grid of
    the first 100 images at >= 64 px, 64 for images larger than MAX_PIXEL_FD_DIM values; for
    labels of several of ``num_classes`` classes, as class_label = -1 gives, one row per class
    with its first 10 images; or a scatter plot) and the picture in TensorBoard.

    ``chunks``: an iterable of dicts with the rows of one chunk ("images" uint8 and/or "x"
    in model space, "labels"), read once, one at a time: the .npz is written as they come
    and only the picture's images are kept. Returns the chunks' "x" (small data only)."""
    centered = bool(config.data.get("centered", True))
    image = len(shape) == 3
    per_class = 10
    class_picture = (image and labels is not None and num_classes > 1
                     and labels.unique().numel() > 1)
    limit = 100 if _is_small(shape) else MAX_PICTURE_IMAGES
    shown, shown_labels, kept_x = [], [], []
    taken = torch.zeros(max(num_classes, 1), dtype=torch.long)

    def rows():
        for chunk in chunks:
            if "x" in chunk and _is_small(shape):
                kept_x.append(torch.from_numpy(chunk["x"]))
            if not image:
                yield chunk["x"]
                continue
            images = torch.from_numpy(chunk["images"])
            if class_picture:       # the first per_class images of each class, in order
                part = torch.from_numpy(chunk["labels"])
                for c in range(num_classes):
                    mine = images[part == c][:max(0, per_class - int(taken[c]))]
                    taken[c] += len(mine)
                    shown.append(mine)
                    shown_labels.append(torch.full((len(mine),), c, dtype=torch.long))
            elif sum(len(s) for s in shown) < limit:
                shown.append(images[:limit - sum(len(s) for s in shown)].clone())
            yield chunk["images"]

    entry = (("images", ((n, *shape), np.uint8, rows())) if image
             else ("samples", ((n, *shape), np.float32, rows())))
    arrays = dict([entry])
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    write_npz_streamed(workdir / f"samples_{method}.npz", arrays)
    if class_picture:
        picture_array = class_rows(torch.cat(shown), torch.cat(shown_labels), num_classes,
                                   per_class=per_class, min_pixels=64)
    elif image:
        picture_array = image_grid(torch.cat(shown), min_pixels=64)
    else:
        picture_array = picture(torch.cat(kept_x), centered=centered)
    save_png(picture_array, workdir / f"samples_{method}.png")
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(workdir / "tensorboard")) as writer:
        writer.add_image(f"samples/{method}", picture_array, step, dataformats="HWC")
    return kept_x


def _pixel_fd(samples_uint8: torch.Tensor, reference_uint8: torch.Tensor) -> float:
    """Frechet distance between two image sets in pixel space, pixels in [0, 1]."""
    return float(frechet_distance(samples_uint8.double() / 255, reference_uint8.double() / 255))


def _too_large(shape) -> dict:
    """The note of sample_quality for images of more than MAX_PIXEL_FD_DIM values."""
    return {"skipped": {"pixel_fd_to_test": f"images of {math.prod(shape)} values; pixel FD "
                        f"is computed up to {MAX_PIXEL_FD_DIM}"}}


def sample_quality(config, x: torch.Tensor) -> dict:
    """Metrics of samples x (model space) against the data: for a closed-form density the
    exact ones (run_lib.exact.sample_metrics); for small images (<= 1024 pixels) the pixel
    Frechet distance to the test split next to that of the training split (the floor).
    A metric that cannot be computed is listed under "skipped" with the reason."""
    if not _is_small(tuple(x.shape[1:])):
        return _too_large(tuple(x.shape[1:]))
    try:
        test = build_dataset(config, "test")
        if test.density is not None:
            return exact.sample_metrics(test.density, x, seed=int(config.seed) + TRUTH_SEED)
        train = build_dataset(config, "train")
    except FileNotFoundError as error:
        return {"skipped": {"sample_quality": f"data not found: {error}"}}
    images = to_uint8(x, centered=bool(config.data.centered))
    return {"pixel_fd_to_test": _pixel_fd(images, test.images),
            "pixel_fd_train_to_test": _pixel_fd(train.images, test.images)}


def classifier_path(config, workdir, classifier: str | None) -> Path | None:
    """The classifier checkpoint of classifier guidance: ``classifier`` (main.py --classifier:
    a file, or a work directory whose classifier/checkpoints/latest.pt is meant); without it,
    <workdir>/classifier/checkpoints/latest.pt when config.sampling.guidance='classifier',
    else None (no classifier guidance). FileNotFoundError (one line) when it is absent."""
    if classifier is None and config.sampling.get("guidance") != "classifier":
        return None
    path = Path(workdir if classifier is None else classifier)
    if classifier is None or path.is_dir():
        path = path / "classifier" / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path}: run --mode train_classifier with this "
                                "--config and --workdir first, or pass --classifier <checkpoint>")
    return path


def _load_logits_fn(config, path: Path | None, device):
    """models.get_logits_fn of the train_classifier checkpoint ``path`` (checked against the
    config by run_lib.classifier.load_classifier), or None."""
    if path is None:
        return None
    from .classifier import load_classifier
    network, _ = load_classifier(config, path, device)
    return models.get_logits_fn(compose.build_sde(config), network)


def label_accuracy(config, workdir, x: torch.Tensor, labels) -> dict:
    """How often a held-out classifier finds the requested labels (N,) in the samples x
    (model space): {"label_accuracy": {accuracy, per_class, classifier, ceiling}} or, where
    no such classifier exists, a "skipped" note; {} without labels.

    Digits: run_lib.digits_classifier (a clean conv net trained on the training split only,
    deterministic; cached in <config.data.data_dir>/digits_classifier.pt); ceiling = its accuracy on the 297
    test digits. Toy mixtures: the Bayes classifier of the components (the exact posterior
    at t = 0); ceiling = its accuracy on the test points."""
    if labels is None:
        return {}
    if x is None:
        return {"skipped": {"label_accuracy": "the samples are too large to be held in "
                            "memory at once"}}
    labels = labels.cpu()
    name = str(config.data.name)
    if name == "digits":
        from .digits_classifier import digits_classifier, digits_classifier_path
        net, info = digits_classifier(digits_classifier_path(config))
        with torch.no_grad():
            predicted = net(x.detach().float().cpu().clamp(-1, 1)).argmax(dim=1)
        ceiling, what = info["test_accuracy"], ("run_lib.digits_classifier.DigitsNet v2 (clean, "
                                                "trained on the 1500 training digits)")
    elif name in sde_lib.TOY_DISTRIBUTIONS:
        test = build_dataset(config, "test")
        predicted = exact.component_log_posterior(test.density, x.double().cpu(), 1.0,
                                                  0.0).argmax(dim=1)
        truth = exact.component_log_posterior(test.density, test.points.double(), 1.0, 0.0)
        ceiling = (truth.argmax(dim=1) == test.labels).double().mean().item()
        what = "the Bayes classifier of the mixture components (exact posterior at t = 0)"
    else:
        return {"skipped": {"label_accuracy": f"no held-out classifier of {name}"}}
    correct = (predicted == labels).double()
    per_class = {str(k): round(correct[labels == k].mean().item(), 4)
                 for k in labels.unique().tolist()}
    return {"label_accuracy": {"accuracy": correct.mean().item(), "per_class": per_class,
                               "classifier": what, "ceiling_on_test_data": ceiling}}


def _sample_key(config, method: str, options: dict, step: int, checkpoint, labels_record,
                classifier) -> dict:
    """What must match for a chunk of sample mode on disk to be reused."""
    n, size = _sample_sizes(config)
    return {"mode": "sample", "version": CHUNK_VERSION, "sampler": method, "options": options,
            "step": step, "checkpoint": checkpoint, "seed": int(config.seed), "chunk_size": size,
            "data_shape": list(compose.data_shape(config)),
            "centered": bool(config.data.get("centered", True)), "labels": labels_record,
            "classifier": None if classifier is None else str(classifier),
            "guidance": [str(config.sampling.get("guidance", "auto")),
                         float(config.sampling.get("guidance_scale", 0.0)),
                         bool(config.sampling.get("thresholding", False)),
                         float(config.sampling.get("thresholding_percentile", 0.995))]}


def _sum_over_ranks(value: int, ctx: DistContext, device) -> int:
    if ctx.world_size == 1:
        return int(value)
    total = torch.tensor([int(value)], device=device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def _draw_missing_sample_chunks(config, run, method, ctx, device, paths, key, labels, logits_fn,
                                progress) -> int:
    """Draw this rank's chunks (k = rank, rank + W, ...) that are not on disk and write each
    one atomically (uint8 "images" and, for small data, "x" in model space; "labels"; meta:
    seed, NFE, seconds, non-finite rows); returns how many it drew."""
    n, size = _sample_sizes(config)
    shape = tuple(compose.data_shape(config))
    rows = "images" if len(shape) == 3 else "x"
    mine = [k for k in own_chunks(len(paths), ctx.rank, ctx.world_size)
            if read_chunk(paths[k], key, chunk_size(n, size, k), rows=rows) is None]
    if not mine:
        return 0
    extras = run.sampler_extras(config, method, device, progress and ctx.is_main)
    bar = progress_bar(len(mine), progress and ctx.is_main and len(paths) > 1,
                       f"sample {method}", unit="chunk")
    try:
        for k in mine:
            first, m = k * size, chunk_size(n, size, k)
            part = None if labels is None else labels[first:first + m]
            x, nfe, seconds = _draw_chunk(config, run, method, k, m, part, logits_fn, extras,
                                          device, progress and ctx.is_main and len(paths) == 1)
            arrays = {}
            if rows == "images":
                arrays["images"] = to_uint8(x, centered=bool(config.data.centered)).numpy()
            if _is_small(shape):
                arrays["x"] = x.numpy()
            if part is not None:
                arrays["labels"] = part.cpu().numpy()
            write_chunk(paths[k], arrays, {
                "key": key, "chunk": k, "seed": sample_chunk_seed(config.seed, k), "nfe": nfe,
                "seconds": seconds, "nonfinite": _nonfinite_rows(x)})
            del x, arrays
            bar.update(1)
    finally:
        bar.close()
    return len(mine)


def _read_sample_chunks(paths, key, n: int, size: int, rows: str, metas: list):
    """The chunks of sample mode in order, read one at a time (their meta appended to
    ``metas``); a RuntimeError names a chunk missing after sampling."""
    for k, path in enumerate(paths):
        data = read_chunk(path, key, chunk_size(n, size, k), rows=rows)
        if data is None:
            raise RuntimeError(f"{path} is missing after sampling: run --mode sample again to "
                               "draw it")
        metas.append({name: data[name] for name in ("nfe", "seconds", "nonfinite", "seed")})
        yield data


@torch.no_grad()
def sample(config, workdir, *, method: str | None = None, progress: bool = True,
           checkpoint: str | None = None, classifier: str | None = None) -> dict | None:
    """Sample the EMA weights of ``workdir`` (or ``checkpoint``) with ``method`` (default
    config.sampling.method) and its options config.sampling.<method>, with the class labels
    and guidance of config.sampling (``classifier``: the checkpoint of classifier guidance,
    see ``classifier_path``).

    Loads the classifier and the checkpoint (one-line errors, e.g. a classifier of another
    SDE), then writes config.json, draws the samples in resumable chunks of
    config.sampling.batch_size (0: one chunk) to <workdir>/samples_<method>/chunk_<k>.npz
    (chunk k seeded with ``sample_chunk_seed``; under torchrun rank r draws k = r, r + W,
    ...; a chunk on disk of the same protocol is reused), then on rank 0 writes the samples
    (``_write_sample_files``, reading the chunks one at a time) and samples_<method>.json
    (the chunks' metrics, the guidance, ``sample_quality``'s and ``label_accuracy``'s), in
    that order. Seeded by config.seed: the same config gives the same samples on the CPU,
    with any number of processes. Returns the metrics on rank 0, None on the others."""
    workdir = Path(workdir)
    ctx, device = init_distributed(config.get("device", "auto"))
    method, options = compose.sampler_options(config, method)
    path = classifier_path(config, workdir, classifier)
    logits_fn = _load_logits_fn(config, path, device)
    run = load_score_fn(config, workdir, device, checkpoint=checkpoint)
    guidance = compose.guidance_method(config, classifier=logits_fn is not None)
    if ctx.is_main:
        write_config(config, workdir)       # after a successful load: nothing written on errors
    n, size = _sample_sizes(config)
    shape = tuple(compose.data_shape(config))
    labels = compose.sampling_labels(config, n, classifier=logits_fn is not None, device=device)
    classes = compose.label_classes(config, classifier=logits_fn is not None)
    key = _sample_key(config, method, options, run.step, checkpoint,
                      None if labels is None else [int(config.sampling.class_label), classes],
                      path)
    folder = workdir / f"samples_{method}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = chunk_paths(folder, n, size)
    drawn = _draw_missing_sample_chunks(config, run, method, ctx, device, paths, key, labels,
                                        logits_fn, progress)
    drawn = _sum_over_ranks(drawn, ctx, device)
    ctx.barrier()
    if not ctx.is_main:
        return None
    metas = []
    chunks = _read_sample_chunks(paths, key, n, size, "images" if len(shape) == 3 else "x",
                                 metas)
    kept = _write_sample_files(config, workdir, method, chunks, n, shape,
                               None if labels is None else labels.cpu(), step=run.step,
                               num_classes=classes)
    seconds = sum(m["seconds"] for m in metas)
    metrics = {"sampler": method, "step": run.step, "num_samples": n,
               "nfe": max(int(m["nfe"]) for m in metas), "seconds": round(seconds, 3),
               "samples_per_s": round(n / max(seconds, 1e-9), 2),
               "nonfinite_fraction": sum(int(m["nonfinite"]) for m in metas) / n,
               "chunks": {"size": size, "count": len(paths), "drawn_now": drawn,
                          "folder": str(folder), "seeds": "config.seed + 10 + 10^6 k for chunk k",
                          "world_size": ctx.world_size}}
    s = config.sampling
    metrics["guidance"] = {
        "method": guidance, "guidance_scale": float(s.get("guidance_scale", 0.0)),
        "class_label": int(s.get("class_label", -1)), "num_classes": classes,
        "thresholding": bool(s.get("thresholding", False)),
        "classifier": None if path is None else str(path)}
    if metrics["guidance"]["thresholding"]:
        metrics["guidance"]["thresholding_percentile"] = float(s.thresholding_percentile)
    x = torch.cat(kept) if kept else None       # small data only (MAX_PIXEL_FD_DIM)
    metrics.update(sample_quality(config, x) if x is not None else _too_large(shape))
    for key_, value in label_accuracy(config, workdir, x, labels).items():
        if key_ == "skipped":
            metrics.setdefault("skipped", {}).update(value)
        else:
            metrics[key_] = value
    (workdir / f"samples_{method}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ----------------------------------------------------------------------------- likelihood

def ode_options(config) -> dict:
    """Options of samplers.log_likelihood from config.eval: trace, probes, ode_method,
    rtol, atol, likelihood_eps and num_steps (fixed-grid methods; None: the solver's
    default)."""
    ev = config.eval
    num_steps = ev.get("num_steps")
    return dict(trace=str(ev.trace), probes=int(ev.probes), method=str(ev.ode_method),
                rtol=float(ev.rtol), atol=float(ev.atol), eps=float(ev.likelihood_eps),
                num_steps=None if num_steps is None else int(num_steps))


def _mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    n = values.numel()
    return values.mean().item(), (values.std().item() / math.sqrt(n)) if n > 1 else float("nan")


def _vlb_kind(config) -> str:
    """The variance of config.eval.vlb_variance ('learned' by default for a network with a
    variance head, else 'small')."""
    kind = str(config.eval.get("vlb_variance", "auto") or "auto")
    if kind == "auto":
        kind = "learned" if compose.learn_sigma(config) else "small"
    if kind == "learned" and not compose.learn_sigma(config):
        raise ValueError("config.eval.vlb_variance='learned' needs a network with a variance "
                         "head (config.model.learn_sigma=True); use small, large or analytic")
    return kind


def _vlb_variances(config, run: LoadedRun, device, progress: bool):
    """(variance kind, E Var[x0 | x_i] or None); 'analytic' estimates it (once per run) on
    the first config.eval.vlb_analytic_samples training images, in batches of
    config.eval.batch_size."""
    kind = _vlb_kind(config)
    if kind != "analytic":
        return kind, None
    return kind, run.posterior_x0_variance(config, device, progress)


def _chunk_ode(config, run: LoadedRun, batch, cond, generator, progress: bool, exact_data: bool):
    """Rows of one chunk through the ODE: {"logp"} (closed-form data) or {"bpd"}, and NFE."""
    score_fn = run.score_for_labels(cond if run.num_classes else None)
    options = ode_options(config)
    if exact_data:
        result = samplers.log_likelihood(score_fn, run.sde, batch, generator=generator,
                                         progress=progress, **options)
        return {"logp": result.logp.double().cpu().numpy()}, int(result.nfe)
    result = samplers.bits_per_dim(score_fn, run.sde, batch, centered=bool(config.data.centered),
                                   dequantize=True, generator=generator, progress=progress,
                                   **options)
    log.info("likelihood batch: %.4f bits/dim (NFE %d)", result.bpd.mean().item(), result.nfe)
    return {"bpd": result.bpd.double().cpu().numpy()}, int(result.nfe)


def _chunk_vlb(config, run: LoadedRun, images, cond, generator, device, progress: bool):
    """The variational bound's rows of one chunk of 8-bit images (no dequantization: the
    discretized-Gaussian decoder): bits/dim and the prior, weighted KL sum and decoder terms
    in nats per row, and (NFE, KL levels)."""
    centered = bool(config.data.centered)
    kind, x0_variance = _vlb_variances(config, run, device, progress)
    score_fn = run.score_fn.score_and_variance if kind == "learned" else run.score_fn
    batch = preprocess(images, centered=centered).to(device)
    result = samplers.vlb(with_class_labels(score_fn, cond if run.num_classes else None),
                          run.sde, batch, variance=kind, posterior_x0_variance=x0_variance,
                          level_time=compose.level_time(config),
                          bin_width=(2.0 if centered else 1.0) / 255.0,
                          data_range=(-1.0, 1.0) if centered else (0.0, 1.0),
                          num_levels=int(config.eval.get("vlb_levels", 0)) or None,
                          generator=generator, progress=progress)
    rows = {"vlb_bpd": result.bpd, "vlb_prior": result.prior,
            "vlb_kl_sum": result.kl.sum(1) * result.kl_weight, "vlb_decoder": result.decoder}
    return ({k: v.double().cpu().numpy() for k, v in rows.items()}, int(result.nfe),
            len(result.levels))


def _likelihood_key(config, run: LoadedRun, checkpoint, size: int, exact_data: bool,
                    with_vlb: bool) -> dict:
    """What must match for a chunk of likelihood mode on disk to be reused."""
    ev = config.eval
    vlb = None if not with_vlb else {
        "variance": _vlb_kind(config), "levels": int(ev.get("vlb_levels", 0)),
        "analytic_samples": int(ev.get("vlb_analytic_samples", 100)),
        "level_time": compose.level_time(config)}
    return {"mode": "likelihood", "version": CHUNK_VERSION, "step": run.step,
            "checkpoint": checkpoint, "seed": int(config.seed), "chunk_size": size,
            "data": [str(config.data.name), bool(config.data.get("centered", True))],
            "exact_data": exact_data, "ode": ode_options(config), "vlb": vlb}


def _compute_missing_likelihood_chunks(config, run, test, ctx, device, paths, key, count: int,
                                       size: int, exact_data: bool, with_vlb: bool,
                                       progress: bool) -> int:
    """This rank's chunks (k = rank, rank + W, ...) of the first ``count`` test items that
    are not on disk: the ODE (and the VLB) of rows k size, ..., each chunk from generators
    seeded ``likelihood_chunk_seed(config.seed, k)``, written atomically; returns how many."""
    rows = "logp" if exact_data else "bpd"
    mine = [k for k in own_chunks(len(paths), ctx.rank, ctx.world_size)
            if read_chunk(paths[k], key, chunk_size(count, size, k), rows=rows) is None]
    items = test.points if exact_data else test.images
    bar = progress_bar(len(mine), progress and ctx.is_main, "likelihood", unit="batch")
    inner = progress and ctx.is_main and len(paths) == 1
    try:
        for k in mine:
            part = slice(k * size, k * size + chunk_size(count, size, k))
            batch, cond = items[part].to(device), test.labels[part].to(device)
            seed = likelihood_chunk_seed(config.seed, k)
            start = time.perf_counter()
            arrays, nfe = _chunk_ode(config, run, batch, cond,
                                     torch.Generator(device=device).manual_seed(seed), inner,
                                     exact_data)
            meta = {"key": key, "chunk": k, "seed": seed, "nfe": nfe,
                    "seconds": time.perf_counter() - start}
            if with_vlb:
                start = time.perf_counter()
                bound, vlb_nfe, levels = _chunk_vlb(
                    config, run, items[part], cond,
                    torch.Generator(device=device).manual_seed(seed), device, inner)
                arrays.update(bound)
                meta.update(vlb_nfe=vlb_nfe, vlb_levels=levels,
                            vlb_seconds=time.perf_counter() - start)
            write_chunk(paths[k], arrays, meta)
            bar.update(1)
    finally:
        bar.close()
    return len(mine)


def _gather_likelihood(config, run, test, paths, key, count: int, size: int,
                       exact_data: bool, with_vlb: bool) -> dict:
    """likelihood.json's result from the chunks (per-row values; read one at a time)."""
    rows = "logp" if exact_data else "bpd"
    names = [rows] + (["vlb_bpd", "vlb_prior", "vlb_kl_sum", "vlb_decoder"] if with_vlb else [])
    values, metas = {name: [] for name in names}, []
    for k, path in enumerate(paths):
        data = read_chunk(path, key, chunk_size(count, size, k), rows=rows)
        if data is None:
            raise RuntimeError(f"{path} is missing after the likelihood: run --mode likelihood "
                               "again to compute it")
        for name in names:
            values[name].append(torch.from_numpy(data[name]))
        metas.append(data)
    values = {name: torch.cat(v) for name, v in values.items()}
    nfe = [int(m["nfe"]) for m in metas]
    seconds = round(sum(m["seconds"] for m in metas), 3)
    if exact_data:
        logp = values["logp"]
        points = test.points[:count]
        true = exact.true_log_prob(test.density, run.sde, points, ode_options(config)["eps"])
        nll, se = _mean_and_standard_error(-logp)
        result = {"num_points": count, "nll_nats": nll, "nll_standard_error": se,
                  "true_nll_nats": -true.mean().item(),
                  "mean_abs_error_nats": (logp - true).abs().mean().item(),
                  "nfe_per_batch": nfe, "seconds": seconds}
    else:
        bpd, se = _mean_and_standard_error(values["bpd"])
        result = {"num_images": count, "bits_per_dim": bpd, "bits_per_dim_standard_error": se,
                  "nfe_per_batch": nfe, "seconds": seconds,
                  "gaussian_fit_bits_per_dim": gaussian_fit_bpd(config, num_images=count)}
    if with_vlb:
        scale = 1.0 / (test.images[0].numel() * math.log(2.0))
        bound, bound_se = _mean_and_standard_error(values["vlb_bpd"])
        result["vlb"] = {
            "bits_per_dim": bound, "bits_per_dim_standard_error": bound_se,
            "variance": key["vlb"]["variance"],
            "terms_bits_per_dim": {term: values[f"vlb_{term}"].mean().item() * scale
                                   for term in ("prior", "kl_sum", "decoder")},
            "kl_levels": int(metas[0]["vlb_levels"]), "nfe": int(metas[0]["vlb_nfe"]),
            "seconds": round(sum(m["vlb_seconds"] for m in metas), 3)}
    result["chunks"] = {"size": size, "count": len(paths), "folder": str(paths[0].parent),
                        "seeds": "config.seed + 12 + 10^6 k for chunk k"}
    return result


def likelihood(config, workdir, *, progress: bool = True,
               checkpoint: str | None = None) -> dict | None:
    """Log-likelihood of the test split through the probability-flow ODE with the EMA
    weights, with config.eval's options (``ode_options``), in resumable chunks of
    config.eval.batch_size (0: one chunk) written to <workdir>/likelihood/chunk_<k>.npz
    (per-row values; chunk k seeded with ``likelihood_chunk_seed``; under torchrun rank r
    computes k = r, r + W, ...; a chunk on disk of the same protocol is reused). Writes
    config.json (once the checkpoint and the test split have loaded), then on rank 0
    likelihood.json: bits/dim with its standard error and the Gaussian-fit baseline for 8-bit
    images; NLL in nats next to the true NLL for data with a closed-form density; NFE per
    chunk, seconds, the settings; for images of an SDE with a discrete chain also "vlb": the
    variational bound's bits/dim of the same images (samplers.vlb, 8-bit, per term;
    config.eval.vlb / vlb_variance / vlb_levels), in the same chunks. Returns the metrics on
    rank 0, None on the others."""
    workdir = Path(workdir)
    ctx, device = init_distributed(config.get("device", "auto"))
    run = load_score_fn(config, workdir, device, checkpoint=checkpoint)
    test = build_dataset(config, "test")
    if ctx.is_main:
        write_config(config, workdir)       # after the checkpoint and data load
    exact_data = test.density is not None
    with_vlb = (not exact_data and bool(config.eval.get("vlb", True))
                and getattr(run.sde, "has_discrete_chain", False))
    count = int(config.eval.likelihood_samples) or len(test)
    count = min(count, len(test))
    size = int(config.eval.get("batch_size", 0) or count)
    key = _likelihood_key(config, run, checkpoint, size, exact_data, with_vlb)
    folder = workdir / "likelihood"
    folder.mkdir(parents=True, exist_ok=True)
    paths = chunk_paths(folder, count, size)
    drawn = _compute_missing_likelihood_chunks(config, run, test, ctx, device, paths, key, count,
                                               size, exact_data, with_vlb, progress)
    drawn = _sum_over_ranks(drawn, ctx, device)
    ctx.barrier()
    if not ctx.is_main:
        return None
    result = _gather_likelihood(config, run, test, paths, key, count, size, exact_data, with_vlb)
    result["chunks"].update(computed_now=drawn, world_size=ctx.world_size)
    options = ode_options(config)
    metrics = {"sde": type(run.sde).__name__, "model": str(config.model.name),
               "continuous": bool(config.training.get("continuous", True)), "step": run.step,
               **result, "nfe_mean": sum(result["nfe_per_batch"]) / len(result["nfe_per_batch"]),
               "trace": options["trace"], "probes": options["probes"],
               "ode_method": options["method"], "num_steps": options["num_steps"]}
    (workdir / "likelihood.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ----------------------------------------------------------------------------- baselines

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
    Gaussian of ``gaussian_fit``, with the same uniform dequantization as ``likelihood``.

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


# ----------------------------------------------------------------------------- compare

def _read_json(path: Path) -> dict | None:
    """The JSON object of ``path``; None when there is no file; a ValueError naming the file
    when it is not a JSON object."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it was damaged: run the mode "
                         "that writes it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def _likelihood_cells(like: dict) -> list[str]:
    """[likelihood +- standard error, NFE, VLB bits/dim (NFE), baseline]: bits/dim and the
    Gaussian fit's for images, NLL in nats and the true NLL for closed-form data, '-' without
    a result."""
    bound = like.get("vlb")
    vlb_cell = (f"{bound['bits_per_dim']:.3f} +- {bound['bits_per_dim_standard_error']:.3f} "
                f"({bound['nfe']})" if bound else "-")
    if "bits_per_dim" in like:
        return [f"{like['bits_per_dim']:.3f} +- {like['bits_per_dim_standard_error']:.3f}",
                f"{like['nfe_mean']:.0f}", vlb_cell, f"{like['gaussian_fit_bits_per_dim']:.3f}"]
    if "nll_nats" in like:
        return [f"{like['nll_nats']:.3f} +- {like['nll_standard_error']:.3f} nats",
                f"{like['nfe_mean']:.0f}", vlb_cell,
                f"true NLL {like['true_nll_nats']:.3f} nats"]
    return ["-", "-", "-", "-"]


def _sampler_cell(result: dict | None) -> str:
    """'NFE / pixel FD' (images) or 'NFE / mode TV' (mixtures) of a samples_<method>.json."""
    if result is None:
        return "-"
    quality = result.get("pixel_fd_to_test", result.get("mode_weight_tv"))
    return f"{result['nfe']} / {quality:.4f}" if quality is not None else f"{result['nfe']} / -"


def _eval_cell(result: dict | None) -> str:
    """'FID / IS (N, NFE)' of an eval_<method>.json of --mode eval ('-' without one)."""
    if result is None:
        return "-"
    score = f"{result['is']:.2f}" if "is" in result else "-"
    protocol = result.get("protocol", {})
    return (f"{result['fid']:.3f} / {score} (N {protocol.get('num_samples', '?')}, "
            f"NFE {protocol.get('nfe', '?')})")


def _results_by_method(workdir: Path, prefix: str) -> dict:
    """{method: JSON} of <workdir>/<prefix><method>.json (eval_npz_* files left out)."""
    return {p.stem[len(prefix):]: _read_json(p) for p in sorted(workdir.glob(f"{prefix}*.json"))
            if not p.stem.startswith("eval_npz_")}


def compare_workdirs(workdirs) -> str:
    """One markdown table of runs side by side: SDE, model, training steps, the likelihood
    of likelihood.json (bits/dim +- standard error, or NLL in nats), its NFE and baseline,
    per sampler evaluated by --mode eval (eval_<method>.json) its FID / IS with N and NFE,
    and per sampler with a samples_<method>.json its NFE and pixel FD (images) or mode-weight
    TV (mixtures). Work directories without results show '-'."""
    rows, samplers_seen, evaluated = [], [], []
    for workdir in map(Path, workdirs):
        config = _read_json(workdir / "config.json")
        if config is None:
            raise FileNotFoundError(f"{workdir} has no config.json: not a work directory of "
                                    "main.py (train, sample or compute a likelihood there first)")
        sampled = _results_by_method(workdir, "samples_")
        quality = _results_by_method(workdir, "eval_")
        samplers_seen += [m for m in sampled if m not in samplers_seen]
        evaluated += [m for m in quality if m not in evaluated]
        rows.append((workdir, config, _read_json(workdir / "likelihood.json") or {}, sampled,
                     quality))
    header = ["run", "SDE", "model", "steps", "bits/dim (or NLL)", "NFE (ODE)",
              "VLB bits/dim (NFE)", "baseline: Gaussian fit bits/dim (or true NLL)"]
    header += [f"{m}: FID / IS (N, NFE)" for m in evaluated]
    header += [f"{m}: NFE / pixel FD (or mode TV)" for m in samplers_seen]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workdir, config, like, sampled, quality in rows:
        cells = [workdir.name, str(config.get("sde", {}).get("name", "-")),
                 str(config.get("model", {}).get("name", "-")),
                 str(like.get("step", "-")), *_likelihood_cells(like)]
        cells += [_eval_cell(quality.get(method)) for method in evaluated]
        cells += [_sampler_cell(sampled.get(method)) for method in samplers_seen]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
