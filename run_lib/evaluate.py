"""Sample and likelihood modes of every run (toy mixtures and images alike), and the table
that compares work directories.

    load_score_fn(config, workdir, device)   -> the EMA weights of the newest checkpoint as a score_fn
    sample(config, workdir)                  -> samples_<method>.{npz,png,json} + TensorBoard
    likelihood(config, workdir)              -> likelihood.json: bits/dim of 8-bit images, or
                                                nats next to the true NLL (closed-form data)
    gaussian_fit_bpd(config)                 -> the bits/dim of a full-covariance Gaussian (baseline)
    compare_workdirs(workdirs)               -> one markdown table (SDE, model, NFE, bits/dim, ...)

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
from .datasets import build_dataset, preprocess
from .images import class_rows, picture, save_png, to_uint8
from .utils import pick_device, write_config

__all__ = ["load_score_fn", "sample", "likelihood", "draw_samples", "save_samples",
           "sample_quality", "gaussian_fit", "gaussian_fit_bpd", "compare_workdirs",
           "LoadedRun", "balanced_labels", "with_class_labels", "classifier_path",
           "label_accuracy"]

log = logging.getLogger(__name__)

#: Pixel Frechet distances are reported for images up to this many dimensions (8x8 digits,
#: 28x28 MNIST); CIFAR-10's 3072 needs far more samples than a quick run draws.
MAX_PIXEL_FD_DIM = 1024

#: Seed offsets (config.seed + offset) of the samples, the true draws they are compared
#: with, and the likelihood's dequantization / probe noise.
SAMPLE_SEED, TRUTH_SEED, LIKELIHOOD_SEED = 10, 11, 12

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

def draw_samples(config, run: LoadedRun, method: str, *, device, progress: bool = True,
                 logits_fn=None):
    """config.sampling.num_samples samples in model space, (N, *data_shape) on the CPU, in
    calls of config.sampling.batch_size (0: all at once) from a generator seeded with
    config.seed + 10, with the labels of config.sampling.class_label (-1: 0, 1, ..., K-1, 0,
    ...) and the guidance of config.sampling (compose.guided_score_fn; ``logits_fn``: the
    classifier of classifier guidance). Returns (x, labels (N,) or None, metrics: sampler,
    step, num_samples, nfe (per call; a CFG step is two network passes), seconds,
    samples_per_s, nonfinite_fraction)."""
    n = int(config.sampling.num_samples)
    batch_size = int(config.sampling.get("batch_size", 0) or n)
    shape = compose.data_shape(config)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + SAMPLE_SEED)
    labels = compose.sampling_labels(config, n, classifier=logits_fn is not None,
                                     device=device)    # one per sample, across calls
    parts, nfe = [], 0
    extras = run.sampler_extras(config, method, device, progress)
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        size = min(batch_size, n - first)
        score_fn = compose.guided_score_fn(
            config, run.sde, run.score_fn,
            None if labels is None else labels[first:first + size], logits_fn)
        result = compose.sample(config, score_fn, run.sde, (size, *shape), method=method,
                                generator=generator, device=device, progress=progress, **extras)
        parts.append(result.x.detach().cpu())
        nfe = max(nfe, int(result.nfe))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    x = torch.cat(parts)
    nonfinite = (~torch.isfinite(x.reshape(n, -1))).any(dim=1).double().mean().item()
    metrics = {"sampler": method, "step": run.step, "num_samples": n, "nfe": nfe,
               "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 2),
               "nonfinite_fraction": nonfinite}
    return x, labels, metrics


def save_samples(config, workdir, method: str, x: torch.Tensor, labels, *, step: int,
                 num_classes: int = 0) -> None:
    """samples_<method>.npz (uint8 ``images`` (N, C, H, W), or float32 ``samples`` (N, D) for
    flat data; ``labels`` (N,) when the samples have labels), samples_<method>.png (a grid of
    the first 100 images at >= 64 px; for labels of several of ``num_classes`` classes, as
    class_label = -1 gives, one row per class with its first 10 images; or a scatter plot)
    and the picture in TensorBoard."""
    workdir = Path(workdir)
    centered = bool(config.data.get("centered", True))
    arrays = ({"images": to_uint8(x, centered=centered).numpy()} if x.ndim == 4
              else {"samples": x.float().numpy()})
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    np.savez_compressed(workdir / f"samples_{method}.npz", **arrays)
    if x.ndim == 4 and labels is not None and num_classes > 1 and labels.unique().numel() > 1:
        image = class_rows(x, labels, num_classes, centered=centered, min_pixels=64)
    else:
        image = picture(x, centered=centered, max_images=100, min_pixels=64)
    save_png(image, workdir / f"samples_{method}.png")
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(workdir / "tensorboard")) as writer:
        writer.add_image(f"samples/{method}", image, step, dataformats="HWC")


def _pixel_fd(samples_uint8: torch.Tensor, reference_uint8: torch.Tensor) -> float:
    """Frechet distance between two image sets in pixel space, pixels in [0, 1]."""
    return float(frechet_distance(samples_uint8.double() / 255, reference_uint8.double() / 255))


def sample_quality(config, x: torch.Tensor) -> dict:
    """Metrics of samples x (model space) against the data: for a closed-form density the
    exact ones (run_lib.exact.sample_metrics); for small images (<= 1024 pixels) the pixel
    Frechet distance to the test split next to that of the training split (the floor).
    A metric that cannot be computed is listed under "skipped" with the reason."""
    if x.ndim == 4 and x[0].numel() > MAX_PIXEL_FD_DIM:
        return {"skipped": {"pixel_fd_to_test": f"images of {x[0].numel()} values; pixel FD "
                            f"is computed up to {MAX_PIXEL_FD_DIM}"}}
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


@torch.no_grad()
def sample(config, workdir, *, method: str | None = None, progress: bool = True,
           checkpoint: str | None = None, classifier: str | None = None) -> dict:
    """Sample the EMA weights of ``workdir`` (or ``checkpoint``) with ``method`` (default
    config.sampling.method) and its options config.sampling.<method>, with the class labels
    and guidance of config.sampling (``classifier``: the checkpoint of classifier guidance,
    see ``classifier_path``).

    Loads the classifier and the checkpoint (one-line errors, e.g. a classifier of another
    SDE), then writes config.json, the samples (``save_samples``) and samples_<method>.json
    (``draw_samples``' metrics, the guidance, ``sample_quality``'s and ``label_accuracy``'s),
    in that order. Seeded by config.seed: the same config gives the same samples on the CPU."""
    workdir = Path(workdir)
    device = pick_device(config.get("device", "auto"))
    method, _ = compose.sampler_options(config, method)
    path = classifier_path(config, workdir, classifier)
    logits_fn = _load_logits_fn(config, path, device)
    run = load_score_fn(config, workdir, device, checkpoint=checkpoint)
    guidance = compose.guidance_method(config, classifier=logits_fn is not None)
    write_config(config, workdir)       # after a successful load: nothing written on errors
    x, labels, metrics = draw_samples(config, run, method, device=device, progress=progress,
                                      logits_fn=logits_fn)
    classes = compose.label_classes(config, classifier=logits_fn is not None)
    save_samples(config, workdir, method, x, labels, step=run.step, num_classes=classes)
    s = config.sampling
    metrics["guidance"] = {
        "method": guidance, "guidance_scale": float(s.get("guidance_scale", 0.0)),
        "class_label": int(s.get("class_label", -1)), "num_classes": classes,
        "thresholding": bool(s.get("thresholding", False)),
        "classifier": None if path is None else str(path)}
    if metrics["guidance"]["thresholding"]:
        metrics["guidance"]["thresholding_percentile"] = float(s.thresholding_percentile)
    metrics.update(sample_quality(config, x))
    for key, value in label_accuracy(config, workdir, x, labels).items():
        if key == "skipped":
            metrics.setdefault("skipped", {}).update(value)
        else:
            metrics[key] = value
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


def _in_batches(config, items: torch.Tensor, labels, compute, *, progress: bool):
    """[compute(batch, batch_labels) for each batch of config.eval.batch_size (0: one batch)
    of ``items``] and the seconds it took, with a progress bar over the batches."""
    batch_size = int(config.eval.get("batch_size", 0) or len(items))
    starts = range(0, len(items), batch_size)
    bar = progress_bar(len(starts), progress, "likelihood", unit="batch")
    results, start = [], time.perf_counter()
    try:
        for first in starts:
            part = slice(first, first + batch_size)
            results.append(compute(items[part], None if labels is None else labels[part]))
            bar.update(1)
    finally:
        bar.close()
    return results, time.perf_counter() - start


def _mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    n = values.numel()
    return values.mean().item(), (values.std().item() / math.sqrt(n)) if n > 1 else float("nan")


def _image_likelihood(config, run: LoadedRun, test, device, progress: bool) -> dict:
    """Bits/dim of the first config.eval.likelihood_samples (0: all) test images, uniformly
    dequantized, with the Gaussian fit's bits/dim as the baseline."""
    count = int(config.eval.likelihood_samples) or len(test)
    images, labels = test.images[:count].to(device), test.labels[:count].to(device)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + LIKELIHOOD_SEED)
    options = ode_options(config)

    def compute(batch, cond):
        result = samplers.bits_per_dim(
            run.score_for_labels(cond if run.num_classes else None), run.sde, batch,
            centered=bool(config.data.centered), dequantize=True, generator=generator,
            progress=progress, **options)
        log.info("likelihood batch: %.4f bits/dim (NFE %d)", result.bpd.mean().item(), result.nfe)
        return result.bpd.double().cpu(), int(result.nfe)

    results, seconds = _in_batches(config, images, labels, compute, progress=progress)
    bpd, se = _mean_and_standard_error(torch.cat([r[0] for r in results]))
    return {"num_images": len(images), "bits_per_dim": bpd, "bits_per_dim_standard_error": se,
            "nfe_per_batch": [r[1] for r in results], "seconds": round(seconds, 3),
            "gaussian_fit_bits_per_dim": gaussian_fit_bpd(config, num_images=len(images))}


def _vlb_variances(config, run: LoadedRun, device, progress: bool):
    """(variance kind, E Var[x0 | x_i] or None) of config.eval.vlb_variance ('learned' by
    default for a network with a variance head, else 'small'); 'analytic' estimates it on
    the first config.eval.vlb_analytic_samples training images."""
    kind = str(config.eval.get("vlb_variance", "auto") or "auto")
    if kind == "auto":
        kind = "learned" if compose.learn_sigma(config) else "small"
    if kind == "learned" and not compose.learn_sigma(config):
        raise ValueError("config.eval.vlb_variance='learned' needs a network with a variance "
                         "head (config.model.learn_sigma=True); use small, large or analytic")
    if kind != "analytic":
        return kind, None
    return kind, run.posterior_x0_variance(config, device, progress)


def _image_vlb(config, run: LoadedRun, test, device, progress: bool) -> dict:
    """The variational bound's bits/dim of the same test images (8-bit, no dequantization:
    the discretized-Gaussian decoder), per term, when the SDE has a discrete chain."""
    count = int(config.eval.likelihood_samples) or len(test)
    centered = bool(config.data.centered)
    images = preprocess(test.images[:count], centered=centered).to(device)
    labels = test.labels[:count].to(device)
    kind, x0_variance = _vlb_variances(config, run, device, progress)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + LIKELIHOOD_SEED)
    levels = int(config.eval.get("vlb_levels", 0)) or None
    dim = images[0].numel()

    score_fn = run.score_fn.score_and_variance if kind == "learned" else run.score_fn

    def compute(batch, cond):
        result = samplers.vlb(with_class_labels(score_fn, cond if run.num_classes else None),
                              run.sde, batch, variance=kind, posterior_x0_variance=x0_variance,
                              level_time=compose.level_time(config),
                              bin_width=(2.0 if centered else 1.0) / 255.0,
                              data_range=(-1.0, 1.0) if centered else (0.0, 1.0),
                              num_levels=levels, generator=generator, progress=progress)
        return result

    results, seconds = _in_batches(config, images, labels, compute, progress=progress)
    bpd, se = _mean_and_standard_error(torch.cat([r.bpd.double().cpu() for r in results]))
    terms = {key: sum(r.terms_bpd(dim)[key] * len(r.bpd) for r in results) / len(images)
             for key in ("prior", "kl_sum", "decoder")}
    return {"bits_per_dim": bpd, "bits_per_dim_standard_error": se, "variance": kind,
            "terms_bits_per_dim": terms, "kl_levels": len(results[0].levels),
            "nfe": results[0].nfe, "seconds": round(seconds, 3)}


def _exact_likelihood(config, run: LoadedRun, test, device, progress: bool) -> dict:
    """NLL in nats of the first config.eval.likelihood_samples (0: all) test points through
    the ODE, next to the true NLL of the same points under p_eps (eps =
    config.eval.likelihood_eps) and the mean absolute error per point."""
    count = int(config.eval.likelihood_samples) or len(test)
    points, labels = test.points[:count].to(device), test.labels[:count].to(device)
    generator = torch.Generator(device=device).manual_seed(int(config.seed) + LIKELIHOOD_SEED)
    options = ode_options(config)

    def compute(batch, cond):
        result = samplers.log_likelihood(run.score_for_labels(cond if run.num_classes else None),
                                         run.sde, batch, generator=generator,
                                         progress=progress, **options)
        return result.logp.double().cpu(), int(result.nfe)

    results, seconds = _in_batches(config, points, labels, compute, progress=progress)
    logp = torch.cat([r[0] for r in results])
    true = exact.true_log_prob(test.density, run.sde, points, options["eps"])
    nll, se = _mean_and_standard_error(-logp)
    return {"num_points": len(points), "nll_nats": nll, "nll_standard_error": se,
            "true_nll_nats": -true.mean().item(),
            "mean_abs_error_nats": (logp - true).abs().mean().item(),
            "nfe_per_batch": [r[1] for r in results], "seconds": round(seconds, 3)}


def likelihood(config, workdir, *, progress: bool = True, checkpoint: str | None = None) -> dict:
    """Log-likelihood of the test split through the probability-flow ODE with the EMA
    weights, with config.eval's options (``ode_options``), in batches of
    config.eval.batch_size. Writes config.json (once the checkpoint and the test split have
    loaded), then likelihood.json: bits/dim with its standard error and the Gaussian-fit
    baseline for 8-bit images; NLL in nats next to the true NLL for data with a closed-form
    density; NFE per batch, seconds, the settings; for images of an SDE with a discrete chain
    also "vlb": the variational bound's bits/dim of the same images (samplers.vlb, 8-bit,
    per term; config.eval.vlb / vlb_variance / vlb_levels)."""
    workdir = Path(workdir)
    device = pick_device(config.get("device", "auto"))
    run = load_score_fn(config, workdir, device, checkpoint=checkpoint)
    test = build_dataset(config, "test")
    write_config(config, workdir)       # after the checkpoint and data load
    measure = _exact_likelihood if test.density is not None else _image_likelihood
    result = measure(config, run, test, device, progress)
    if test.density is None and bool(config.eval.get("vlb", True)) and getattr(
            run.sde, "has_discrete_chain", False):
        result["vlb"] = _image_vlb(config, run, test, device, progress)
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
