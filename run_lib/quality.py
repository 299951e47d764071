"""Sample quality in the papers' protocol: --mode eval (sample, then measure) and --mode
ref_stats (the reference statistics it measures against).

    python main.py --mode ref_stats --config configs/ve/ncsnpp_cifar.py --workdir runs/x \
        --config.eval.inception_path=/path/to/inception-2015-12-05.pt
    python main.py --mode eval --config configs/ve/ncsnpp_cifar.py --workdir runs/x --sampler pc
    python main.py --mode eval ... --samples samples.npz         # an existing set of samples

Eval draws config.eval.num_samples samples (50k for CIFAR-10) with the EMA weights
(config.eval.use_ema) in chunks of config.eval.sample_batch. Chunk k is drawn from its own
generator, seeded with ``chunk_seed(config.seed, k)``, so the samples do not depend on how
many processes draw them: under torchrun rank r draws the chunks k = r, r + W, ... Each
chunk is written atomically to <workdir>/eval_<sampler>/chunk_<k>.npz (uint8 images, their
features and logits, labels, NFE, seconds) right after its features are extracted on the
sampling device, and a chunk already on disk with the same protocol is not drawn again, so
a pre-empted evaluation continues where it stopped. Rank 0 then reads every chunk in order
and computes FID, KID, IS and precision / recall (run_lib.fidelity) against the reference
statistics, and writes eval.json (and eval_<sampler>.json) with the protocol.

Feature spaces (config.eval.features): 'inception' (the TF Inception-v3 of the papers, from
the local file config.eval.inception_path; run_lib.inception), 'digits' (the 64 penultimate
features and 10 logits of run_lib.digits_classifier) and 'auto' (digits for the digits,
else inception). Reference statistics: config.eval.ref_stats, by default
<data_dir>/ref_stats/<data>-<split>-<C>x<H>x<W>-<extractor>-<hash>.npz; the digits' are
made on first use (1500 images), the others by --mode ref_stats.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from samplers.harness import progress_bar

from . import compose
from .chunks import CHUNK_SEED_STRIDE, chunk_paths as _chunk_paths, chunk_size as _chunk_size
from .chunks import own_chunks, read_chunk as _read_chunk, write_chunk as _write_chunk
from .datasets import build_dataset
from .distributed import init_distributed
from .fidelity import (FeatureAccumulator, FeatureExtractor, ReferenceStats, file_sha256,
                       quality_metrics)
from .images import make_grid, save_png, to_uint8
from .utils import write_config

__all__ = ["build_extractor", "reference_path", "read_images_npz", "extract", "make_reference",
           "ref_stats", "evaluate", "chunk_seed", "PAPER_NUM_SAMPLES"]

log = logging.getLogger(__name__)

#: The papers' number of samples for FID; fewer gives a warning in eval.json.
PAPER_NUM_SAMPLES = 50_000
#: Seed of KID's subsets and IS's splits (torchmetrics draws them from the global RNG).
METRIC_SEED = 0


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of --mode eval for config.seed ``seed``:
    CHUNK_SEED_STRIDE * (seed + 1) + chunk (disjoint from other seeds' chunks below 10^6
    chunks)."""
    return CHUNK_SEED_STRIDE * (int(seed) + 1) + int(chunk)


# ----------------------------------------------------------------------------- features

def _feature_kind(config) -> str:
    kind = str(config.eval.get("features", "auto"))
    if kind == "auto":
        return "digits" if config.data.name == "digits" else "inception"
    return kind


def build_extractor(config, device) -> FeatureExtractor:
    """The feature extractor of config.eval.features on ``device``: the digits classifier
    (trained and cached on first use) or the Inception file config.eval.inception_path (a
    one-line FileNotFoundError says where to get it when absent)."""
    kind = _feature_kind(config)
    if kind == "digits":
        if tuple(compose.data_shape(config)) != (1, 8, 8):
            raise ValueError(f"config.eval.features='digits' measures 8x8 digits, but the data are "
                             f"{tuple(compose.data_shape(config))}: use features='inception'")
        from .digits_classifier import DigitsFeatures, digits_classifier, digits_classifier_path
        net, _ = digits_classifier(digits_classifier_path(config))
        return DigitsFeatures(net).to(device)
    from .inception import load_inception
    return load_inception(str(config.eval.get("inception_path", "") or ""), device)


def reference_path(config, extractor: FeatureExtractor, *, split: str | None = None) -> Path:
    """config.eval.ref_stats, or the default file of the data's ``split`` (config.eval.ref_split)
    in this extractor's feature space under <data_dir>/ref_stats/."""
    given = str(config.eval.get("ref_stats", "") or "")
    if given:
        return Path(given)
    split = split or str(config.eval.get("ref_split", "train"))
    shape = "x".join(str(s) for s in compose.data_shape(config))
    return (Path(config.data.data_dir) / "ref_stats" /
            f"{config.data.name}-{split}-{shape}-{extractor.name}-{extractor.sha256[:8]}.npz")


def read_images_npz(path) -> torch.Tensor:
    """uint8 images (N, C, H, W) of an .npz: key 'images' (ours: N, C, H, W) or 'arr_0' (the
    official EDM / guided-diffusion files: N, H, W, C); one-line errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no samples file at {path}: pass an existing .npz to --samples")
    try:
        with np.load(path, allow_pickle=False) as data:
            key = "images" if "images" in data else "arr_0" if "arr_0" in data else None
            if key is None:
                raise ValueError(f"{path} has arrays {sorted(data.files)}, but no 'images' "
                                 "(N, C, H, W) or 'arr_0' (N, H, W, C) of uint8 images")
            images = data[key]
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} cannot be read as an .npz of images: {error}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}['{key}'] must be uint8 images of 4 dimensions, got "
                         f"{images.dtype} of shape {images.shape}")
    if key == "arr_0" or (images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3)):
        images = images.transpose(0, 3, 1, 2)             # N, H, W, C -> N, C, H, W
    return torch.from_numpy(np.ascontiguousarray(images))


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: torch.Tensor, *, batch_size: int,
            device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (N, D) and logits (N, K) or None, float32 on the CPU, of uint8 images
    (N, C, H, W), in batches of ``batch_size`` on ``device``."""
    features, logits = [], []
    for first in range(0, len(images), batch_size):
        f, l = extractor(images[first:first + batch_size].to(device))
        features.append(f.float().cpu())
        if l is not None:
            logits.append(l.float().cpu())
    return torch.cat(features), (torch.cat(logits) if logits else None)


def _reference_images(config, samples: str | None) -> tuple[torch.Tensor, str]:
    if samples:
        return read_images_npz(samples), f"npz:{Path(samples).resolve()}"
    if config.data.name not in ("digits", "cifar10", "mnist", "folder"):
        raise ValueError(f"--mode ref_stats needs images; config.data.name={config.data.name!r} "
                         "is not an image data set")
    split = str(config.eval.get("ref_split", "train"))
    return build_dataset(config, split).images, f"{config.data.name}:{split}"


def make_reference(config, extractor: FeatureExtractor, *, device, samples: str | None = None,
                   path=None, progress: bool = True) -> tuple[ReferenceStats, Path]:
    """Reference statistics of the data split config.eval.ref_split (the papers: CIFAR-10's
    50k training images) or of the uint8 images of the .npz ``samples``, written to ``path``
    (default ``reference_path``): mean, covariance and the first config.eval.ref_features
    features, with the extractor's identity and the image shape."""
    images, source = _reference_images(config, samples)
    path = Path(path) if path else reference_path(config, extractor)
    if samples and not str(config.eval.get("ref_stats", "") or ""):
        path = path.with_name(f"{Path(samples).stem}-{extractor.name}-{extractor.sha256[:8]}.npz")
    acc = FeatureAccumulator(extractor.num_features, int(config.eval.get("ref_features", 50_000)))
    batch = int(config.eval.get("feature_batch", 250))
    bar = progress_bar(len(images), progress, "reference features", unit="img")
    try:
        for first in range(0, len(images), batch * 8):
            features, _ = extract(extractor, images[first:first + batch * 8], batch_size=batch,
                                  device=device)
            acc.update(features)
            bar.update(len(features))
    finally:
        bar.close()
    stats = ReferenceStats.from_accumulator(acc, extractor.identity(), tuple(images.shape[1:]),
                                            source)
    stats.save(path)
    log.info("reference statistics of %d images (%s) written to %s", acc.count, source, path)
    return stats, path


def _load_or_make_reference(config, extractor, device, progress) -> tuple[ReferenceStats, Path]:
    """The reference statistics of this evaluation; the digits' are made when absent."""
    path = reference_path(config, extractor)
    shape = tuple(compose.data_shape(config))
    if not path.is_file() and _feature_kind(config) == "digits":
        return make_reference(config, extractor, device=device, path=path, progress=progress)
    if not path.is_file():
        raise FileNotFoundError(
            f"no reference statistics at {path}: make them with python main.py --mode ref_stats "
            "and the same --config (the papers use the training split; or set "
            "--config.eval.ref_stats=<file>)")
    return ReferenceStats.load(path, extractor=extractor, image_shape=shape), path


def ref_stats(config, workdir, *, samples: str | None = None,
              progress: bool = True) -> dict | None:
    """--mode ref_stats: make and write the reference statistics (``make_reference``) and
    <workdir>/ref_stats.json describing them (under torchrun on rank 0 only; None elsewhere)."""
    ctx, device = init_distributed(config.get("device", "auto"))
    if not ctx.is_main:
        return None
    extractor = build_extractor(config, device)
    stats, path = make_reference(config, extractor, device=device, samples=samples,
                                 progress=progress)
    summary = {"file": str(path), "source": stats.source, "num_images": stats.num_images,
               "features_kept": len(stats.features), "image_shape": list(stats.image_shape),
               "feature_extractor": stats.extractor}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "ref_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- chunks

def _protocol_key(config, method: str, options: dict, step: int, extractor, labels) -> dict:
    """What must match for a chunk on disk to be reused."""
    return {"sampler": method, "options": options, "step": step, "seed": int(config.seed),
            "chunk_size": int(config.eval.sample_batch), "use_ema": bool(config.eval.use_ema),
            "extractor": extractor.sha256, "labels": labels,
            "guidance": [str(config.sampling.get("guidance", "auto")),
                         float(config.sampling.get("guidance_scale", 0.0)),
                         bool(config.sampling.get("thresholding", False))]}


def _draw_chunk(config, run, method, k: int, size: int, labels, logits_fn, device):
    """uint8 images (size, C, H, W), NFE and seconds of chunk k."""
    generator = torch.Generator(device=device).manual_seed(chunk_seed(config.seed, k))
    score_fn = compose.guided_score_fn(config, run.sde, run.score_fn, labels, logits_fn)
    extras = run.sampler_extras(config, method, device)      # estimated once per run
    start = time.perf_counter()
    result = compose.sample(config, score_fn, run.sde, (size, *compose.data_shape(config)),
                            method=method, generator=generator, device=device, progress=False,
                            **extras)
    images = to_uint8(result.x, centered=bool(config.data.centered))
    return images, int(result.nfe), time.perf_counter() - start


def _make_chunk(config, run, method, k, n, labels, logits_fn, extractor, device, path, key):
    chunk = int(config.eval.sample_batch)
    first, size = k * chunk, min(chunk, n - k * chunk)
    part = None if labels is None else labels[first:first + size]
    images, nfe, seconds = _draw_chunk(config, run, method, k, size, part, logits_fn, device)
    start = time.perf_counter()
    features, logits = extract(extractor, images, device=device,
                               batch_size=int(config.eval.get("feature_batch", 250)))
    arrays = {"images": images.numpy(), "features": features.numpy()}
    if logits is not None:
        arrays["logits"] = logits.numpy()
    if part is not None:
        arrays["labels"] = part.cpu().numpy()
    meta = {"key": key, "chunk": k, "seed": chunk_seed(config.seed, k), "nfe": nfe,
            "sample_seconds": seconds, "extract_seconds": time.perf_counter() - start}
    _write_chunk(path, arrays, meta)


def _draw_missing_chunks(config, run, method, ctx, device, folder, extractor, key, labels,
                         logits_fn, progress) -> int:
    """Draw this rank's chunks (k = rank, rank + W, ...) that are not on disk; returns how
    many it drew."""
    n, chunk = int(config.eval.num_samples), int(config.eval.sample_batch)
    paths = _chunk_paths(folder, n, chunk)
    mine = [k for k in own_chunks(len(paths), ctx.rank, ctx.world_size)
            if _read_chunk(paths[k], key, _chunk_size(n, chunk, k)) is None]
    bar = progress_bar(len(mine), progress and ctx.is_main, f"eval {method}", unit="chunk")
    try:
        for k in mine:
            _make_chunk(config, run, method, k, n, labels, logits_fn, extractor, device,
                        paths[k], key)
            bar.update(1)
            log.info("eval chunk %d / %d written", k + 1, len(paths))
    finally:
        bar.close()
    return len(mine)


def _gather_chunks(folder: Path, n: int, chunk: int, key: dict, extractor, keep: int):
    """(accumulator of every chunk's features and logits, per-chunk metadata list, the
    fraction of labelled samples whose logits' argmax is their label, or None)."""
    acc, metas, hits = FeatureAccumulator(extractor.num_features, keep), [], []
    for k, path in enumerate(_chunk_paths(folder, n, chunk)):
        data = _read_chunk(path, key, _chunk_size(n, chunk, k))
        if data is None:
            raise RuntimeError(f"{path} is missing after sampling: run --mode eval again to "
                               "draw it")
        logits = torch.from_numpy(data["logits"]) if "logits" in data else None
        acc.update(torch.from_numpy(data["features"]), logits)
        metas.append({k: data[k] for k in ("nfe", "sample_seconds", "extract_seconds", "seed")})
        if logits is not None and "labels" in data:
            hits.append(logits.argmax(dim=1) == torch.from_numpy(data["labels"]))
    accuracy = torch.cat(hits).double().mean().item() if hits else None
    return acc, metas, accuracy


# ----------------------------------------------------------------------------- eval mode

def _metric_options(config) -> dict:
    ev = config.eval
    return dict(kid_subsets=int(ev.kid_subsets), kid_subset_size=int(ev.kid_subset_size),
                is_splits=int(ev.is_splits), pr_k=int(ev.pr_k), pr_samples=int(ev.pr_samples),
                seed=METRIC_SEED)


def _small_n_warning(n: int) -> str | None:
    if n >= PAPER_NUM_SAMPLES:
        return None
    return (f"N = {n} < {PAPER_NUM_SAMPLES}: FID is biased upward at small N (the papers use "
            f"{PAPER_NUM_SAMPLES} samples); compare only numbers of the same N (README: "
            "Sample quality)")


def _labels_record(config, labels, classes: int):
    if labels is None:
        return None
    label = int(config.sampling.get("class_label", -1))
    return f"balanced over {classes} classes" if label < 0 else f"all {label}"


def _reference_record(ref: ReferenceStats, path: Path) -> dict:
    return {"file": str(path), "sha256": file_sha256(path), "source": ref.source,
            "num_images": ref.num_images, "image_shape": list(ref.image_shape)}


#: The metrics written to TensorBoard (eval/<name>/<metric>).
BOARD_METRICS = ("fid", "kid", "is", "precision", "recall")


def _write_results(workdir: Path, name: str, result: dict, images: torch.Tensor,
                   step: int = 0) -> None:
    """eval_<name>.json and eval.json (the latest evaluation), eval_<name>.png (the first 100
    samples) and the metrics + picture in TensorBoard."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    (workdir / f"eval_{name}.json").write_text(text)
    (workdir / "eval.json").write_text(text)
    upscale = max(1, 64 // images.shape[-1])
    grid = make_grid(images[:100], upscale=upscale, padding=max(1, upscale // 2))
    save_png(grid, workdir / f"eval_{name}.png")
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(workdir / "tensorboard")) as writer:
        for metric in BOARD_METRICS:
            if isinstance(result.get(metric), float):
                writer.add_scalar(f"eval/{name}/{metric}", result[metric], step)
        writer.add_image(f"eval/{name}", grid, step, dataformats="HWC")


def _evaluate_file(config, workdir: Path, samples: str, extractor, ref, ref_file,
                   device) -> dict:
    """eval.json of an existing .npz of uint8 samples."""
    images = read_images_npz(samples)
    ref.check(extractor, tuple(images.shape[1:]), ref_file)
    start = time.perf_counter()
    features, logits = extract(extractor, images, device=device,
                               batch_size=int(config.eval.get("feature_batch", 250)))
    seconds = time.perf_counter() - start
    acc = FeatureAccumulator(extractor.num_features, len(features))
    acc.update(features, logits)
    result = {**quality_metrics(acc, ref, **_metric_options(config)),
              "protocol": {"samples_file": str(Path(samples).resolve()),
                           "samples_sha256": file_sha256(samples), "num_samples": len(images),
                           "reference": _reference_record(ref, ref_file),
                           "feature_extractor": extractor.identity(),
                           **_metric_options(config)},
              "extraction_images_per_s": round(len(images) / max(seconds, 1e-9), 2)}
    result["warning"] = _small_n_warning(len(images))
    _write_results(workdir, f"npz_{Path(samples).stem}", result, images)
    return result


def evaluate(config, workdir, *, method: str | None = None, samples: str | None = None,
             checkpoint: str | None = None, classifier: str | None = None,
             progress: bool = True) -> dict | None:
    """--mode eval: draw config.eval.num_samples samples with ``method`` (default
    config.sampling.method) in seeded, resumable chunks (sharded over torchrun's ranks),
    extract their features, and write eval.json / eval_<method>.json on rank 0 with FID,
    KID, IS, precision / recall and the protocol. With ``samples`` (an .npz of uint8
    images) only that file is measured. Returns the result on rank 0, None on other ranks."""
    from .evaluate import _load_logits_fn, classifier_path, load_score_fn
    workdir = Path(workdir)
    ctx, device = init_distributed(config.get("device", "auto"))
    extractor = build_extractor(config, device)
    ref, ref_file = (None, None)
    if ctx.is_main:
        ref, ref_file = _load_or_make_reference(config, extractor, device, progress)
    if samples:
        return _evaluate_file(config, workdir, samples, extractor, ref, ref_file, device) \
            if ctx.is_main else None
    method, options = compose.sampler_options(config, method)
    logits_fn = _load_logits_fn(config, classifier_path(config, workdir, classifier), device)
    run = load_score_fn(config, workdir, device, checkpoint=checkpoint,
                        use_ema=bool(config.eval.use_ema))
    if ctx.is_main:
        write_config(config, workdir)
    n = int(config.eval.num_samples)
    labels = compose.sampling_labels(config, n, classifier=logits_fn is not None, device=device)
    classes = compose.label_classes(config, classifier=logits_fn is not None)
    key = _protocol_key(config, method, options, run.step, extractor,
                        None if labels is None else [int(config.sampling.class_label), classes])
    folder = workdir / f"eval_{method}"
    folder.mkdir(parents=True, exist_ok=True)
    drawn = _draw_missing_chunks(config, run, method, ctx, device, folder, extractor, key,
                                 labels, logits_fn, progress)
    ctx.barrier()
    if not ctx.is_main:
        return None
    acc, metas, accuracy = _gather_chunks(folder, n, int(config.eval.sample_batch), key,
                                          extractor, int(config.eval.get("ref_features", 50_000)))
    result = quality_metrics(acc, ref, **_metric_options(config))
    if accuracy is not None and _feature_kind(config) == "digits":
        # the digits classifier's predictions against the requested labels (guidance)
        result["class_accuracy"] = round(accuracy, 6)
    sample_seconds = sum(m["sample_seconds"] for m in metas)
    extract_seconds = sum(m["extract_seconds"] for m in metas)
    result["protocol"] = {
        "num_samples": n, "chunk_size": int(config.eval.sample_batch),
        "chunk_seeds": f"{CHUNK_SEED_STRIDE} * (seed + 1) + k for chunk k",
        "seed": int(config.seed), "weights": "ema" if config.eval.use_ema else "raw",
        "checkpoint": checkpoint or str(workdir / "checkpoints" / "latest.pt"),
        "step": run.step, "sampler": method, "sampler_options": options,
        "nfe": max(int(m["nfe"]) for m in metas),
        "guidance": {"method": compose.guidance_method(config, classifier=logits_fn is not None),
                     "guidance_scale": key["guidance"][1], "thresholding": key["guidance"][2]},
        "class_labels": _labels_record(config, labels, classes),
        "reference": _reference_record(ref, ref_file),
        "feature_extractor": extractor.identity(), "world_size": ctx.world_size,
        **_metric_options(config)}
    result["timing"] = {"chunks_drawn_now": drawn, "chunks": len(metas),
                        "sampling_images_per_s": round(n / max(sample_seconds, 1e-9), 3),
                        "extraction_images_per_s": round(n / max(extract_seconds, 1e-9), 2),
                        "device": str(device)}
    result["warning"] = _small_n_warning(n)
    first = _read_chunk(_chunk_paths(folder, n, int(config.eval.sample_batch))[0], key)
    _write_results(workdir, method, result, torch.from_numpy(first["images"]), run.step)
    log.info("eval %s: FID %.4f over %d samples", method, result["fid"], n)
    return result
