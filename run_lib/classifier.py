"""The train_classifier mode: a noise-conditional classifier p_phi(y | x_t, t) for classifier
guidance (Song et al. 2021, Sec. 5 and App. I.1; Dhariwal & Nichol 2021, Sec. 4), trained on
the data of config.data perturbed by the SDE of config.sde:

    python main.py --mode train_classifier --config configs/vp/ddpm_digits.py --workdir runs/x

    state = build_classifier_state(config, device)     # classifier, EMA, Adam, RNG, step
    resume from <workdir>/classifier/checkpoints/latest.pt (or the newest loadable numbered one)
    while state.step < n_iters:
        x, labels = next(batches)
        stats = classifier_step(state, x, labels, objective)   # cross-entropy -> Adam -> EMA
        log / checkpoint / evaluate at their frequencies (config.classifier)

Everything lands in <workdir>/classifier/: config.json, checkpoints/checkpoint_<step>.pt and
checkpoints/latest.pt (written atomically; a resumed run continues bitwise as the train
mode does: the same data order, RNG states, optimizer and EMA), tensorboard/ and metrics.json
(the EMA weights' test accuracy and cross-entropy at the noise levels config.classifier.
eval_sigmas, and for the toy mixtures the Bayes accuracy of the exact posterior next to it).

A checkpoint is the train state's dict plus ``metadata``: the SDE (name, beta_min / beta_max
or sigma_min / sigma_max, N), the data (name, shape, centered), num_classes and the network's
name and keyword arguments. ``load_classifier(config, path, device)`` checks it against the
config (the SDE and its noise range, the data shape and range, num_classes; one-line
ValueError naming the mismatch and the fix) and returns the network with the EMA weights.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

import models
import sde_lib

from . import compose
from .checkpoints import checkpoint_dir, load_latest, read_checkpoint
from .datasets import build_dataset
from .distributed import DistContext
from .exact import component_log_posterior
from .state import NOISE_SEED, TrainState, skip_nonfinite_step
from .train import StepRecord, StepStats, batches_forever, ema_weights
from .utils import pick_device, save_atomic, write_config

__all__ = ["train_classifier", "load_classifier", "classifier_workdir", "classifier_metadata",
           "check_metadata", "build_classifier_state", "classifier_step", "ClassifierObjective",
           "ClassifierEvaluator", "sigma_times", "CLASSIFIER_CHECKPOINT_KEYS"]

log = logging.getLogger(__name__)

#: What a classifier checkpoint holds (a resume needs all of it; loading needs model, ema,
#: metadata).
CLASSIFIER_CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "rng", "metadata")
LOAD_KEYS = ("model", "ema", "metadata")

#: Seed offset (config.seed + offset) of the evaluation's draws.
EVAL_SEED = 4

_FIX = ("train a classifier for this config (--mode train_classifier) or use the config it "
        "was trained with")


def classifier_workdir(workdir) -> Path:
    """<workdir>/classifier: where train_classifier writes."""
    return Path(workdir) / "classifier"


# ----------------------------------------------------------------------------- metadata

def classifier_metadata(config, sde: sde_lib.SDE) -> dict:
    """What a classifier checkpoint records about its training, as plain data."""
    name, arguments = compose.classifier_arguments(config)
    return {"sde": compose.sde_metadata(sde),
            "data": {"name": str(config.data.name), "shape": list(compose.data_shape(config)),
                     "centered": bool(config.data.get("centered", True))},
            "num_classes": int(config.classifier.num_classes),
            "classifier": {"name": name, "arguments": arguments}}


def _mismatch(metadata: dict, config, sde: sde_lib.SDE) -> str | None:
    """The first difference between a checkpoint's metadata and the config, or None."""
    mine = classifier_metadata(config, sde)
    theirs_sde, my_sde = metadata["sde"], mine["sde"]
    if theirs_sde["name"] != my_sde["name"]:
        return (f"it was trained on the SDE {theirs_sde['name']!r} but config.sde.name="
                f"{my_sde['name']!r}")
    for key in compose.SDE_KEYS[my_sde["name"]]:
        if not math.isclose(float(theirs_sde[key]), my_sde[key], rel_tol=1e-9, abs_tol=1e-12):
            return (f"it was trained with sde.{key}={theirs_sde[key]:g} but config.sde.{key}="
                    f"{my_sde[key]:g} (another noise range)")
    shape, my_shape = tuple(metadata["data"]["shape"]), tuple(mine["data"]["shape"])
    if shape != my_shape:
        keys = "config.data.dim" if len(my_shape) == 1 else ("config.data.num_channels / "
                                                             "config.data.image_size")
        return f"it was trained on data of shape {shape} but {keys} give {my_shape}"
    if bool(metadata["data"]["centered"]) != mine["data"]["centered"]:
        return (f"it was trained on data with centered={metadata['data']['centered']} but "
                f"config.data.centered={mine['data']['centered']}")
    if int(metadata["num_classes"]) != mine["num_classes"]:
        return (f"it has {metadata['num_classes']} classes but config.classifier.num_classes="
                f"{mine['num_classes']}")
    return None


def check_metadata(metadata, config, sde: sde_lib.SDE, path) -> None:
    """A one-line ValueError when the checkpoint ``path``'s metadata does not fit ``config``."""
    if not isinstance(metadata, dict) or not {"sde", "data", "num_classes",
                                              "classifier"} <= set(metadata):
        raise ValueError(f"{path} is not a classifier checkpoint of this project (its metadata "
                         "lacks sde / data / num_classes / classifier); pass a file written by "
                         "--mode train_classifier")
    problem = _mismatch(metadata, config, sde)
    if problem:
        raise ValueError(f"classifier checkpoint {path} does not fit this config: {problem}; "
                         f"{_FIX}")


def _classifier_file(path) -> Path:
    """A checkpoint file, or for a work directory its classifier/checkpoints/latest.pt."""
    path = Path(path)
    if path.is_dir():
        return checkpoint_dir(classifier_workdir(path)) / "latest.pt"
    return path


def load_classifier(config, path, device, *, use_ema: bool = True):
    """(classifier, metadata) of a train_classifier checkpoint: the network of the
    checkpoint's metadata with its EMA weights (``use_ema``), in eval mode and with
    requires_grad off for its parameters (gradients still flow to its input x).

    Args:
        config: the config the classifier is used with; its SDE (name and noise range), data
            shape and range and config.classifier.num_classes must be those of the checkpoint.
        path: a checkpoint file (<workdir>/classifier/checkpoints/latest.pt or a numbered
            one), or a work directory (then its classifier/checkpoints/latest.pt).
        device: where to load it.
    Raises:
        FileNotFoundError when there is no file; ValueError (one line) when the file cannot
        be read, is not a classifier checkpoint, or does not fit the config (naming the
        mismatch and the fix).
    """
    path = _classifier_file(path)
    state = read_checkpoint(path, device, required=LOAD_KEYS)
    sde = compose.build_sde(config)
    check_metadata(state["metadata"], config, sde, path)
    info = state["metadata"]["classifier"]
    network = models.build_classifier(info["name"], **info["arguments"]).to(device)
    try:
        models.load_state_dict_strict(network, state["model"])
        if use_ema:
            ema = models.ExponentialMovingAverage(network)
            ema.load_state_dict(state["ema"])
            ema.copy_to(network)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path}: the weights do not match the classifier its metadata "
                         f"describes ({info['name']}): {' '.join(str(error).split())}") from error
    network.eval().requires_grad_(False)
    return network, state["metadata"]


# ----------------------------------------------------------------------------- state and step

def _lr_at(step: int, group) -> float:
    """config.classifier.lr after a linear warm-up over config.classifier.warmup steps."""
    warmup = int(group.warmup)
    return float(group.lr) * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)


def build_classifier_state(config, device: torch.device) -> TrainState:
    """A fresh state: the classifier initialised from config.seed, fused Adam
    (config.classifier.lr, weight_decay), its EMA (config.classifier.ema_rate, with warm-up)
    and the noise generator (config.seed + 1)."""
    group, seed = config.classifier, int(config.seed)
    torch.manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + NOISE_SEED)
    model = compose.build_classifier(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=_lr_at(0, group),
                                 weight_decay=float(group.weight_decay), fused=True)
    ema = models.ExponentialMovingAverage(model, decay=float(group.ema_rate), warmup=True)
    return TrainState(model, ema, optimizer, noise_gen, DistContext())


class ClassifierObjective:
    """The cross-entropy of the classifier at perturbed data (sde_lib.classifier_losses),
    with the step's settings (config.classifier: lr, warmup, grad_clip, eps)."""

    def __init__(self, config, sde: sde_lib.SDE, model, device: torch.device):
        self.group = config.classifier
        self.logits_fn = models.get_logits_fn(sde, model)
        self.loss_fn = sde_lib.get_classifier_loss_fn(sde, eps=float(self.group.eps))
        self.grad_clip = float(self.group.grad_clip)
        self.found_inf = torch.zeros((), device=device)

    def loss(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        return self.loss_fn(self.logits_fn, x, labels, generator=generator)


def classifier_step(state: TrainState, x: torch.Tensor, labels: torch.Tensor,
                    objective: ClassifierObjective) -> StepStats:
    """One optimizer step on x (B, ...) and labels (B,): warm-up learning rate, loss,
    backward, gradient clipping, Adam (skipped on the device for a non-finite loss or
    gradient, as run_lib.train.train_step), EMA update, step + 1. No host sync."""
    lr = _lr_at(state.step, objective.group)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    loss = objective.loss(x, labels, state.noise_gen)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), objective.grad_clip)
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    objective.found_inf.copy_(bad)
    skip_nonfinite_step(state.optimizer, objective.found_inf)
    state.ema.update(state.model)
    state.step += 1
    return StepStats(loss.detach(), grad_norm.detach(), bad, lr, x.shape[0])


# ----------------------------------------------------------------------------- evaluation

def sigma_times(sde: sde_lib.SDE, sigmas) -> torch.Tensor:
    """The times (float64) at which sigma(t) = std / alpha takes the values ``sigmas``
    (log-SNR = -2 log sigma)."""
    sigmas = torch.as_tensor(list(sigmas), dtype=torch.float64)
    return sde.t_from_log_snr(-2.0 * torch.log(sigmas))


class ClassifierEvaluator:
    """Test metrics of the EMA weights on the first config.classifier.eval_batches test
    batches: ``loss`` (the training objective, t ~ U(eps, T)) and, at each noise level sigma
    of config.classifier.eval_sigmas, ``accuracy`` and cross-entropy ``nll`` of
    p_phi(y | x_t), plus ``bayes_accuracy`` / ``bayes_nll`` of the exact posterior for data
    with a closed-form density. The same draws at every call (seed config.seed + 4)."""

    def __init__(self, config, sde: sde_lib.SDE, model, ema, device: torch.device):
        group = config.classifier
        test_set = build_dataset(config, "test")
        size = min(int(group.batch_size), len(test_set))
        self.batches = list(itertools.islice(
            test_set.batches(size, shuffle=False, seed=int(config.seed)), int(group.eval_batches)))
        self.sigmas = [float(s) for s in group.eval_sigmas]
        self.times = sigma_times(sde, self.sigmas)
        self.objective = ClassifierObjective(config, sde, model, device)
        self.model, self.ema, self.sde, self.device = model, ema, sde, device
        self.density, self.seed = test_set.density, int(config.seed) + EVAL_SEED

    @torch.no_grad()
    def __call__(self) -> dict:
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        with ema_weights(self.model, self.ema):
            values = {"loss": self._mean_loss(generator)}
            for sigma, t in zip(self.sigmas, self.times.tolist()):
                values[f"sigma={sigma:g}"] = self._at_time(t, generator)
        return values

    def _mean_loss(self, generator) -> float:
        total, count = 0.0, 0
        for x, labels in self.batches:
            x, labels = x.to(self.device), labels.to(self.device)
            total += float(self.objective.loss(x, labels, generator)) * x.shape[0]
            count += x.shape[0]
        return total / count

    def _at_time(self, t: float, generator) -> dict:
        alpha, std = (float(c) for c in self.sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64)))
        sums = {"accuracy": 0.0, "nll": 0.0, "bayes_accuracy": 0.0, "bayes_nll": 0.0}
        count = 0
        for x, labels in self.batches:
            x, labels = x.to(self.device), labels.to(self.device)
            z = torch.randn(x.shape, generator=generator, device=self.device, dtype=x.dtype)
            xt = alpha * x + std * z
            logits = self.objective.logits_fn(xt, torch.full((x.shape[0],), t, dtype=x.dtype,
                                                             device=self.device))
            sums["accuracy"] += float((logits.argmax(1) == labels).sum())
            sums["nll"] += float(torch.nn.functional.cross_entropy(
                logits.double(), labels, reduction="sum"))
            if self.density is not None:
                posterior = component_log_posterior(self.density, xt.cpu(), alpha, std)
                cpu_labels = labels.cpu()
                sums["bayes_accuracy"] += float((posterior.argmax(1) == cpu_labels).sum())
                sums["bayes_nll"] -= float(posterior[torch.arange(len(cpu_labels)),
                                                     cpu_labels].sum())
            count += x.shape[0]
        keys = sums if self.density is not None else ("accuracy", "nll")
        return {"t": t, **{key: sums[key] / count for key in keys}}


# ----------------------------------------------------------------------------- the loop

def _resume(state: TrainState, folder: Path, config, sde: sde_lib.SDE) -> None:
    """Load <folder>/checkpoints/latest.pt (or the newest loadable numbered one) into
    ``state`` after checking its metadata against the config; nothing when there is none."""
    checkpoint, path = load_latest(checkpoint_dir(folder), state.device,
                                   required=CLASSIFIER_CHECKPOINT_KEYS)
    if checkpoint is None:
        return
    check_metadata(checkpoint["metadata"], config, sde, path)
    try:
        state.load_state_dict(checkpoint)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path} does not match config.classifier (name="
                         f"{config.classifier.name!r}): {' '.join(str(error).split())}; the "
                         "checkpoint was left untouched: use another --workdir or the config "
                         "it was trained with") from error
    log.info("resumed the classifier from %s at step %d", path, state.step)


class _Run:
    """The scheduled actions of the loop (config.classifier's frequencies) and what they keep:
    TensorBoard, the per-step record, the evaluations."""

    def __init__(self, config, folder: Path, state: TrainState, metadata: dict, evaluator):
        from torch.utils.tensorboard import SummaryWriter
        self.group, self.folder, self.metadata = config.classifier, folder, metadata
        self.n_iters = int(self.group.n_iters)
        self.evaluator, self.evals, self.losses = evaluator, {}, []
        self.record = StepRecord()
        self.writer = SummaryWriter(str(folder / "tensorboard"))
        self.latest = checkpoint_dir(folder) / "latest.pt"

    def after_step(self, state: TrainState, stats: StepStats) -> None:
        group, step = self.group, state.step
        self.record.add(step - 1, stats.loss, stats.grad_norm, stats.bad)
        last = step == self.n_iters
        logged = step % int(group.log_freq) == 0 or last
        numbered = step % int(group.snapshot_freq) == 0
        latest = step % int(group.snapshot_freq_for_preemption) == 0 or last
        if logged or numbered or latest:
            self.read_back()
        if logged:
            self.writer.add_scalar("train/lr", stats.lr, step)
            log.info("classifier step %d/%d loss %.5f lr %.2e", step, self.n_iters,
                     self.losses[-1], stats.lr)
        if numbered or latest:
            checkpoint = {**state.state_dict(), "metadata": self.metadata}
            if numbered:
                save_atomic(checkpoint, checkpoint_dir(self.folder) / f"checkpoint_{step}.pt")
            if latest:
                save_atomic(checkpoint, self.latest)
        eval_freq = int(group.eval_freq)
        if self.evaluator is not None and ((eval_freq > 0 and step % eval_freq == 0) or last):
            self.evaluate(step)

    def read_back(self) -> None:
        """The recorded steps to the host (raises FloatingPointError on a non-finite one)."""
        for step, loss, grad_norm in self.record.flush(self.latest):
            self.losses.append(loss)
            self.writer.add_scalar("train/loss", loss, step + 1)
            self.writer.add_scalar("train/grad_norm", grad_norm, step + 1)

    def evaluate(self, step: int) -> None:
        values = self.evals[step] = self.evaluator()
        self.writer.add_scalar("eval/loss", values["loss"], step)
        for key, level in values.items():
            if isinstance(level, dict):
                for name in ("accuracy", "nll"):
                    self.writer.add_scalar(f"eval/{name}_{key}", level[name], step)
        log.info("classifier step %d evaluation (EMA weights): loss %.4f, accuracy %s", step,
                 values["loss"], ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in values.items()
                                           if isinstance(v, dict)))

    def metrics(self, state: TrainState, start_step: int, seconds: float) -> dict:
        """step, start_step, loss (the last training loss), losses (of this call; not in
        metrics.json), seconds_per_step, test (the last evaluation), evaluations ({step:
        values}), the classifier, its number of parameters and the SDE."""
        steps = state.step - start_step
        last = self.evals[max(self.evals)] if self.evals else None
        return {"step": state.step, "start_step": start_step,
                "loss": self.losses[-1] if self.losses else None, "losses": self.losses,
                "seconds_per_step": seconds / steps if steps else None,
                "test": last, "evaluations": {str(k): v for k, v in self.evals.items()},
                "classifier": self.metadata["classifier"]["name"],
                "num_parameters": sum(p.numel() for p in state.model.parameters()),
                "sde": self.metadata["sde"]}


def train_classifier(config, workdir, *, progress: bool = True) -> dict:
    """Train config.classifier on config.data perturbed by config.sde; resume from
    <workdir>/classifier/checkpoints/latest.pt when it exists. One process (no torchrun).

    Writes config.json, TensorBoard scalars, checkpoints and metrics.json into
    <workdir>/classifier/ and returns the metrics (``_Run.metrics``). Raises ValueError when
    a checkpoint there belongs to another config (left untouched) and FloatingPointError
    naming the first step with a non-finite loss."""
    del progress        # the loop logs every config.classifier.log_freq steps
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--mode train_classifier runs in one process; start it with python, "
                         "not torchrun")
    device = pick_device(config.get("device", "auto"))
    folder = classifier_workdir(workdir)
    dataset = build_dataset(config, "train")
    sde = compose.build_sde(config)
    metadata = classifier_metadata(config, sde)
    state = build_classifier_state(config, device)
    _resume(state, folder, config, sde)       # before any write: a refused file stays as it is
    batches = batches_forever(dataset, config, state.step, device, state.ctx,
                              batch_key="classifier.batch_size")
    write_config(config, folder)
    objective = ClassifierObjective(config, sde, state.model, device)
    evaluator = ClassifierEvaluator(config, sde, state.model, state.ema, device)
    run = _Run(config, folder, state, metadata, evaluator)
    start_step, started = state.step, time.perf_counter()
    try:
        if state.step == 0 and int(config.classifier.eval_freq) > 0:
            run.evaluate(0)
        state.model.train()
        while state.step < int(config.classifier.n_iters):
            x, labels = next(batches)
            run.after_step(state, classifier_step(state, x, labels, objective))
    finally:
        run.writer.close()
    metrics = run.metrics(state, start_step, time.perf_counter() - started)
    (folder / "metrics.json").write_text(json.dumps(
        {k: v for k, v in metrics.items() if k != "losses"}, indent=2) + "\n")
    return metrics
