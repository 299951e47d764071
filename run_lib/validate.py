"""Validation at the edge: the config, the config file and the work directory are checked once,
at start, before any work is done or any file is touched (main.py calls these for every mode).

    config = load_config_file("configs/vp/ddpm_digits.py")     # ConfigError: one line
    check_override_key(config, "sampling.snr")                  # -> use config.sampling.pc.snr
    validate_config(config, "sample", sampler="ode")            # every key's type and range
    check_workdir("runs/digits")                                # a directory that can be written

Every error is a ``ConfigError`` (a ValueError) with a one-line message that names the config
key (``config.training.n_iters must be an integer >= 1, got -5``), the file or the flag, and
the fix. Unknown keys (a typo, or a key of an old config file) name the closest valid key or,
for the flat sampling keys of old configs, the new nested key (``config.sampling.pc.snr``).

What is checked (``validate_config``): the type and range of every key of every group (seed,
device, data, sde, model, training, optim, sampling, eval, and classifier when present or
for --mode train_classifier) from the tables below; keys the
code reads that are missing; the data set's name and shape; the batch size against the data
set and the number of processes; then the SDE (compose.build_sde), the loss
(compose.build_loss_fn), the network built on the meta device (compose.build_model: the
constructors check the architecture without allocating), the score function, the
likelihood's ODE options, and every sampler group through the registry
(``samplers.SAMPLERS[name].options(sde, group)``) for the samplers that apply to the SDE;
config.training.p_uncond only with a class-conditional model; the classifier group's network
keys, its network on the meta device, num_classes against the data set and its evaluation
noise levels inside the SDE's range.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import numbers
import os
import re
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import samplers
import sde_lib
from samplers.likelihood import MAX_EXACT_TRACE_DIM, TRACE_ESTIMATORS
from samplers.ode import ODE_METHODS, check_ode_options
from sde_lib import check_bool, check_int, check_real, check_time

from . import compose
from .datasets import NATIVE_SHAPE, dataset_names
from .distributed import micro_batches

__all__ = ["ConfigError", "validate_config", "load_config_file", "check_override_key",
           "check_workdir", "check_checkpoint_file", "OLD_KEYS", "GROUPS", "MODES"]

#: The modes validate_config knows (main.py's compare and demo modes read no config file).
MODES = ("train", "sample", "likelihood", "train_classifier", "inpaint", "eval", "ref_stats",
         "plan")


class ConfigError(ValueError):
    """A bad config value or key, config file, flag or work directory: a one-line message
    that names it and the fix."""


# ----------------------------------------------------------------------------- value checks
# A check is check(name, value) -> None that raises a ValueError naming ``name``.

Check = Callable[[str, Any], None]


def integer(minimum: int = 1, maximum: int | None = None) -> Check:
    def check(name: str, value) -> None:
        check_int(name, value, minimum, maximum)
    return check


def real(minimum: float | None = 0.0, *, strict: bool = False, maximum: float | None = None,
         allow_inf: bool = False) -> Check:
    def check(name: str, value) -> None:
        check_real(name, value, minimum=minimum, strict=strict, maximum=maximum,
                   allow_inf=allow_inf)
    return check


def fraction(name: str, value) -> None:
    """A number in [0, 1) (dropout, Adam's beta1)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def boolean(name: str, value) -> None:
    check_bool(name, value)


def text(name: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def path_or_empty(name: str, value) -> None:
    """A string: a file path, or '' for the default."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string (a file path, or '' for the default), got "
                         f"{value!r}")


def _did_you_mean(value, valid) -> str:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def choice(valid) -> Check:
    """One of ``valid`` (a collection, or a function returning one, read at check time)."""
    def check(name: str, value) -> None:
        names = list(valid() if callable(valid) else valid)
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, names))}, got "
                             f"{value!r}{_did_you_mean(value, names)}")
    return check


def optional(check: Check) -> Check:
    """None, or a value that passes ``check``."""
    return lambda name, value: None if value is None else check(name, value)


def integers(minimum: int = 1, *, allow_empty: bool = False) -> Check:
    """A tuple (or list) of integers >= minimum, e.g. ch_mult (1, 2, 2, 2)."""
    def check(name: str, value) -> None:
        ok = (isinstance(value, (tuple, list)) and (allow_empty or len(value) > 0)
              and all(not isinstance(v, bool) and isinstance(v, numbers.Integral)
                      and v >= minimum for v in value))
        if not ok:
            raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}tuple of "
                             f"integers >= {minimum}, e.g. '(1, 2)', got {value!r}")
    return check


def reals(name: str, value) -> None:
    """A non-empty tuple of finite numbers (a FIR kernel)."""
    ok = (isinstance(value, (tuple, list)) and len(value) > 0
          and all(not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
                  for v in value))
    if not ok:
        raise ValueError(f"{name} must be a non-empty tuple of numbers, e.g. '(1, 3, 3, 1)', "
                         f"got {value!r}")


def device_name(name: str, value) -> None:
    """'auto', 'cpu', 'cuda', 'cuda:<index>' (an available one) or 'mps'."""
    fix = "use 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a device name, got {value!r}; {fix}")
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a device name; {fix}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}={value!r} but CUDA is not available; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}={value!r} but this machine has {count} CUDA "
                             f"device(s); use 'cuda:0' .. 'cuda:{count - 1}'")
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"{name}={value!r} is not a device to train or sample on; {fix}")


def _mixed_precision_modes():
    from .train import MIXED_PRECISION
    return MIXED_PRECISION


def _models():
    import models
    return models


def positive_reals(name: str, value) -> None:
    """A non-empty tuple of finite numbers > 0 (noise levels)."""
    ok = (isinstance(value, (tuple, list)) and len(value) > 0
          and all(not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
                  and v > 0 for v in value))
    if not ok:
        raise ValueError(f"{name} must be a non-empty tuple of numbers > 0, e.g. '(0.1, 1.0)', "
                         f"got {value!r}")


# ----------------------------------------------------------------------------- the tables

#: Top-level keys (besides the groups).
TOP = {"seed": integer(0), "device": device_name}

#: group -> {key: check}. Every key a group may hold; a key outside its table is an error.
#: Times (eps of the loss, the likelihood and the score error) are checked against the SDE's
#: T once the SDE is built (TIMES); the sampler groups of config.sampling are the registry's.
GROUPS: dict[str, dict[str, Check]] = {
    "data": {
        "name": choice(dataset_names), "data_dir": text, "download": boolean,
        "image_size": integer(1), "num_channels": integer(1), "centered": boolean,
        "random_flip": optional(boolean), "dequantize": boolean,
        "dim": integer(1), "train_size": integer(1), "test_size": integer(1),
        # image folders (run_lib.datasets.load_image_folder): centre crop before the resize
        # (0: none), and the decoded size above which images are read per batch from disk
        "center_crop": integer(0), "max_in_memory_gb": real(0.0)},
    "sde": {
        "name": choice(sde_lib.SDES), "beta_min": real(0.0), "beta_max": real(0.0, strict=True),
        "sigma_min": real(0.0, strict=True), "sigma_max": real(0.0, strict=True),
        "s": real(0.0, strict=True), "max_beta": real(0.0, strict=True, maximum=1.0),
        "logsnr_min": real(None), "logsnr_max": real(None), "num_scales": integer(1)},
    "model": {
        "name": choice(compose.MODEL_ARGUMENTS), "scale_by_sigma": boolean,
        "num_classes": integer(0), "ema_rate": real(0.0, maximum=1.0), "ema_warmup": boolean,
        "dropout": fraction, "discrete_labels": choice(lambda: _models().DISCRETE_LABELS),
        # DDPM / NCSN++ / DDPM++
        "nf": integer(1), "ch_mult": integers(1), "num_res_blocks": integer(1),
        "attn_resolutions": integers(1, allow_empty=True), "resamp_with_conv": boolean,
        "conditional": boolean, "fir": boolean, "fir_kernel": reals, "skip_rescale": boolean,
        "resblock_type": choice(("ddpm", "biggan")),
        "progressive": choice(("none", "output_skip", "residual")),
        "progressive_input": choice(("none", "input_skip", "residual")),
        "progressive_combine": choice(("sum", "cat")), "attention_type": choice(("ddpm",)),
        "init_scale": real(0.0), "embedding_type": choice(("fourier", "positional")),
        "fourier_scale": real(0.0, strict=True), "conv_size": integer(1),
        # MLP (toy data)
        "hidden_dim": integer(1), "num_blocks": integer(1), "embedding_dim": integer(2),
        # NCSN / NCSNv2 (the constructors check the names against their lists)
        "normalization": text, "nonlinearity": text, "interpolation": text,
        "variant": optional(text),
        # Improved DDPM's variance head: 2 C output channels (mlp, ddpm, ncsnpp)
        "learn_sigma": boolean,
        # activation checkpointing of the residual / attention blocks (DDPM, NCSN++, NCSN*)
        "checkpointing": boolean},
    "training": {
        "n_iters": integer(1), "batch_size": integer(1), "continuous": boolean,
        "reduce_mean": boolean, "likelihood_weighting": boolean, "importance_sampling": boolean,
        "eps": real(0.0, strict=True), "log_freq": integer(1),
        "mixed_precision": choice(_mixed_precision_modes), "sample_freq": integer(0),
        "num_grid_samples": integer(1), "grid_sampler": choice(samplers.SAMPLERS),
        "eval_freq": integer(0), "eval_batches": integer(1), "snapshot_freq": integer(1),
        "snapshot_freq_for_preemption": integer(1), "p_uncond": fraction,
        # Improved DDPM: the objective, lambda of the hybrid loss, importance-sampled levels
        "loss": choice(sde_lib.LOSSES), "vlb_weight": real(0.0), "level_importance": boolean,
        "batch_per_device": optional(integer(0))},
    "optim": {
        "lr": real(0.0, strict=True), "beta1": fraction, "eps": real(0.0, strict=True),
        "weight_decay": real(0.0), "warmup": integer(0),
        "grad_clip": real(0.0, strict=True, allow_inf=True)},
    "sampling": {
        "method": choice(samplers.SAMPLERS), "num_samples": integer(1), "batch_size": integer(0),
        # class labels and guidance (compose.guided_score_fn; cross-checked in sample mode)
        "class_label": integer(-1), "guidance": choice(compose.GUIDANCE),
        "guidance_scale": real(0.0), "thresholding": boolean,
        "thresholding_percentile": real(0.0, strict=True, maximum=1.0)},
    "eval": {
        "likelihood_samples": integer(0), "batch_size": integer(0),
        "likelihood_eps": real(0.0, strict=True), "trace": choice(TRACE_ESTIMATORS),
        "probes": integer(1), "ode_method": choice(ODE_METHODS), "rtol": real(0.0, strict=True),
        "atol": real(0.0, strict=True), "num_steps": optional(integer(1)),
        "score_error_samples": integer(1), "score_error_eps": real(0.0, strict=True),
        "vlb": boolean, "vlb_variance": choice(("auto",) + samplers.VARIANCES), "vlb_levels": integer(0),
        "vlb_analytic_samples": integer(1),
        # sample quality (--mode eval / ref_stats; run_lib.quality)
        "num_samples": integer(2), "sample_batch": integer(1), "use_ema": boolean,
        "features": choice(("auto", "inception", "digits")), "inception_path": path_or_empty,
        "ref_stats": path_or_empty, "ref_split": choice(("train", "test")), "ref_features": integer(0),
        "feature_batch": integer(1), "kid_subsets": integer(1), "kid_subset_size": integer(2),
        "is_splits": integer(1), "pr_k": integer(1), "pr_samples": integer(2)},
    # the noise-conditional classifier (--mode train_classifier; run_lib.classifier): the
    # network (models.CLASSIFIERS, its keys compose.CLASSIFIER_KEYS) and its training
    "classifier": {
        "name": choice(lambda: _models().CLASSIFIERS), "num_classes": integer(2),
        "hidden_dim": integer(1), "num_blocks": integer(0), "embedding_dim": integer(2),
        "fourier_scale": real(0.0, strict=True), "nf": integer(1), "ch_mult": integers(1),
        "depth": integer(10), "widen_factor": integer(1),
        "n_iters": integer(1), "batch_size": integer(1), "lr": real(0.0, strict=True),
        "warmup": integer(0), "weight_decay": real(0.0),
        "grad_clip": real(0.0, strict=True, allow_inf=True), "ema_rate": real(0.0, maximum=1.0),
        "eps": real(0.0, strict=True), "log_freq": integer(1), "snapshot_freq": integer(1),
        "snapshot_freq_for_preemption": integer(1), "eval_freq": integer(0),
        "eval_batches": integer(1), "eval_sigmas": positive_reals},
    # the inverse problem of --mode inpaint (run_lib.inverse; the mask, the images file and
    # the method / sampler combination are checked in that mode: _check_inpaint)
    "inpaint": {
        "task": choice(lambda: _inverse().TASKS), "mask": text,
        "random_fraction": real(0.0, maximum=1.0), "factor": integer(2),
        "method": choice(samplers.INVERSE_METHODS), "sampler": choice(samplers.SAMPLERS),
        "images": text, "num_images": integer(1), "batch_size": integer(0),
        "noise_std": real(0.0), "guidance_scale": real(0.0), "particles": integer(1),
        "ess_threshold": real(0.0, maximum=1.0), "known_noise": choice(samplers.KNOWN_NOISE)},
}

#: Groups a config may leave out (each mode that needs one says so: OPTIONAL_GROUPS[name]).
OPTIONAL_GROUPS = {"classifier": ("train_classifier",), "inpaint": ("inpaint",)}

#: Keys the code reads without a default (a config without them fails later).
REQUIRED = {
    "sde": ("name",),
    "model": ("name", "ema_rate", "ema_warmup"),
    "training": ("n_iters", "batch_size", "log_freq", "mixed_precision", "sample_freq",
                 "num_grid_samples", "grid_sampler", "eval_freq", "eval_batches",
                 "snapshot_freq", "snapshot_freq_for_preemption"),
    "optim": ("lr", "beta1", "eps", "weight_decay", "warmup", "grad_clip"),
    "sampling": ("method", "num_samples"),
    "eval": ("likelihood_samples", "likelihood_eps", "trace", "probes", "ode_method", "rtol",
             "atol"),
    "classifier": ("name", "num_classes", "n_iters", "batch_size", "lr", "warmup",
                   "weight_decay", "grad_clip", "ema_rate", "eps", "log_freq", "snapshot_freq",
                   "snapshot_freq_for_preemption", "eval_freq", "eval_batches", "eval_sigmas"),
    "inpaint": ("task", "mask", "random_fraction", "factor", "method", "sampler", "images",
                "num_images", "batch_size", "noise_std", "guidance_scale", "particles",
                "ess_threshold", "known_noise"),
}
REQUIRED_DATA = {"images": ("name", "data_dir", "image_size", "num_channels", "centered"),
                 "toy": ("name", "dim", "train_size", "test_size")}
REQUIRED_TOY_EVAL = ("score_error_samples", "score_error_eps")

#: (group, key) of the smallest times, checked in (0, T) of the SDE.
TIMES = (("training", "eps"), ("eval", "likelihood_eps"), ("eval", "score_error_eps"),
         ("classifier", "eps"))

#: Items of the training split of the image data sets (the toy mixtures: data.train_size).
TRAIN_SIZES = {"digits": 1500, "cifar10": 50_000, "mnist": 60_000}
#: Classes of the labels of the image data sets (the toy mixtures: their components).
DATA_CLASSES = {"digits": 10, "cifar10": 10, "mnist": 10}

#: Keys of old config files -> where the value lives now (dotted paths below config.).
OLD_KEYS = {
    "sampling.predictor": "sampling.pc.predictor",
    "sampling.corrector": "sampling.pc.corrector",
    "sampling.snr": "sampling.pc.snr",
    "sampling.n_steps_each": "sampling.pc.n_steps (corrector steps of pc) or "
                             "sampling.ald.n_steps_each (steps per level of ald)",
    "sampling.step_lr": "sampling.ald.step_lr",
    "sampling.noise_removal": "sampling.<sampler>.denoise, e.g. sampling.pc.denoise",
    "sampling.eps": "sampling.<sampler>.eps, e.g. sampling.pc.eps",
    "sampling.ode_method": "sampling.ode.method",
    "sampling.rtol": "sampling.ode.rtol (the likelihood's: eval.rtol)",
    "sampling.atol": "sampling.ode.atol (the likelihood's: eval.atol)",
    "sampling.num_steps": "sampling.<sampler>.num_steps (ddim, dpm_solver, edm, ode), "
                          "e.g. sampling.ddim.num_steps",
    "sampling.spacing": "sampling.ddim.spacing or sampling.dpm_solver.spacing",
    "sampling.eta": "sampling.ddim.eta",
    "sampling.order": "sampling.dpm_solver.order or sampling.dpm_adaptive.order",
    "sampling.multistep": "sampling.dpm_solver.multistep",
    "sampling.algorithm": "sampling.dpm_solver.algorithm or sampling.dpm_adaptive.algorithm",
    "sampling.adaptive_rtol": "sampling.dpm_adaptive.rtol",
    "sampling.adaptive_atol": "sampling.dpm_adaptive.atol",
    "sampling.edm_spacing": "sampling.edm.spacing",
    **{f"sampling.{key}": f"sampling.edm.{key}"
       for key in ("rho", "s_churn", "s_tmin", "s_tmax", "s_noise")},
    "eval.eps": "eval.score_error_eps (the likelihood's: eval.likelihood_eps)",
}

#: A dotted config path in a message (to write it as config.<path> or --config.<path>).
_PATH = re.compile(r"\b((?:seed|device|data|sde|model|training|optim|sampling|eval|classifier|"
                   r"inpaint)"
                   r"(?:\.[\w<>]+)*)(?!\w)")


# ----------------------------------------------------------------------------- unknown keys

def _key_paths(config, prefix: str = "") -> list[str]:
    """Every dotted key path of a (nested) ConfigDict, groups included."""
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if hasattr(value, "items"):
            paths += _key_paths(value, f"{path}.")
    return paths


def _suggestion(config, path: str, valid) -> str:
    """Where the value of the unknown key ``path`` ('sampling.snr') belongs: its new key
    (OLD_KEYS), the same key name elsewhere in the config, or the closest name in its group;
    dotted paths without the 'config.' prefix."""
    if path in OLD_KEYS:
        return f"the key moved: use {OLD_KEYS[path]}"
    parent, _, leaf = path.rpartition(".")
    elsewhere = [p for p in _key_paths(config) if p.rpartition(".")[2] == leaf and p != path]
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere[:4])}?"
    close = difflib.get_close_matches(leaf, list(valid), n=1, cutoff=0.6)
    if close:
        return f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    return f"valid keys: {', '.join(valid)}"


def _unknown_key(config, path: str, valid, *, flag: str | None = None) -> ConfigError:
    """The error for the unknown key ``path`` (valid keys of its group: ``valid``); with
    ``flag`` (the command-line argument) the keys are written as --config.<key>."""
    parent, _, key = path.rpartition(".")
    prefix = "--config." if flag else "config."
    where = f"config.{parent}" if parent else "the config"
    hint = _PATH.sub(lambda m: prefix + m.group(1), _suggestion(config, path, valid))
    start = f"unknown config key in {flag}" if flag else f"unknown key config.{path}"
    return ConfigError(f"{start}: {where} has no key {key!r}; {hint}")


def check_override_key(config, path: str, *, flag: str | None = None) -> None:
    """Raise a ConfigError when the dotted key ``path`` (``training.n_iters``) is not in
    ``config``: naming the new key of an old flat key, or the closest key. ``flag`` is the
    command-line argument that named it (``--config.sampling.snr=0.2``)."""
    node, walked = config, []
    for part in path.split("."):
        if not hasattr(node, "items"):
            raise ConfigError(f"unknown config key in {flag or 'config.' + path}: "
                              f"config.{'.'.join(walked)} is a value, not a group")
        if part not in node:
            raise _unknown_key(config, ".".join([*walked, part]), list(node.keys()), flag=flag)
        node, walked = node[part], [*walked, part]


# ----------------------------------------------------------------------------- one group

def _message(error: Exception) -> str:
    return " ".join(str(error).split())


def _named(path: str, keys, error: Exception) -> ConfigError:
    """A ValueError of a builder or checker as a ConfigError naming the config key: a
    message that starts with a key of the group ('snr must be ...') becomes
    'config.sampling.pc.snr must be ...', any other is prefixed with the group's path."""
    message = _message(error)
    if message.startswith("config."):
        return ConfigError(message)
    for key in sorted(keys, key=len, reverse=True):
        if re.match(rf"{re.escape(key)}(?=[ =(]|$)", message):
            return ConfigError(f"{path}.{message}")
    return ConfigError(f"{path}: {message}")


def _group(config, name: str):
    if name not in config or not hasattr(config[name], "items"):
        raise ConfigError(f"config.{name} is missing or not a group: add the {name} group "
                          "(configs/default_*.py has every group)")
    return config[name]


def _check_keys(config, path: str, values: dict, table: dict, required=(),
                also_valid=()) -> None:
    """Unknown keys (valid: the table's and ``also_valid``), missing required ones, and
    each value's type and range."""
    for key in values:
        if key not in table and key not in also_valid:
            raise _unknown_key(config, f"{path}.{key}" if path else key,
                               [*table, *also_valid])
    for key in required:
        if key not in values:
            raise ConfigError(f"config.{path + '.' if path else ''}{key} is missing: add it "
                              "to the config (configs/default_*.py has every key)")
    for key, check in table.items():
        if key in values:
            _check_value(f"config.{path + '.' if path else ''}{key}", values[key], check)


def _check_value(name: str, value, check: Check) -> None:
    try:
        check(name, value)
    except ValueError as error:
        raise ConfigError(_message(error)) from None


def _data_kind(config) -> str:
    return "toy" if config.data.get("name") in sde_lib.TOY_DISTRIBUTIONS else "images"


def _check_groups(config, mode: str = "train") -> None:
    """The top-level keys and every group's keys, from the tables; an optional group
    (OPTIONAL_GROUPS) only when present or when ``mode`` needs it."""
    _check_keys(config, "", {k: config[k] for k in config.keys() if k not in GROUPS}, TOP,
                ("seed",), also_valid=GROUPS)
    for name, table in GROUPS.items():
        if name in OPTIONAL_GROUPS and name not in config:
            if mode not in OPTIONAL_GROUPS[name]:
                continue
            raise ConfigError(f"config.{name} is missing: --mode {mode} needs it (add "
                              f"config.{name} = configs.common.{name}_group(...), as the "
                              "configs/default_*.py do)")
        values = dict(_group(config, name).items())
        required, also_valid = REQUIRED.get(name, ()), ()
        if name == "sampling":
            also_valid = tuple(samplers.SAMPLERS)
            values = {k: v for k, v in values.items() if k not in samplers.SAMPLERS}
        if name == "data":
            _check_keys(config, name, values, table, ("name",))
            required = REQUIRED_DATA[_data_kind(config)]
        elif name == "eval" and _data_kind(config) == "toy":
            required = (*required, *REQUIRED_TOY_EVAL)
        _check_keys(config, name, values, table, required, also_valid)


# ----------------------------------------------------------------------------- data

def _train_size(config) -> int | None:
    data = config.data
    if data.name in sde_lib.TOY_DISTRIBUTIONS:
        return int(data.train_size)
    return TRAIN_SIZES.get(data.name)


def _check_data(config) -> None:
    """The data set's shape, and the global batch against its size and the processes."""
    data = config.data
    if data.name in sde_lib.TOY_DISTRIBUTIONS:
        dim = sde_lib.toy_distribution(data.name).dim
        if int(data.dim) != dim:
            raise ConfigError(f"config.data.dim={data.dim} but {data.name} has points of "
                              f"dimension {dim}; set config.data.dim={dim}")
    elif data.get("dim"):
        raise ConfigError(f"config.data.dim={data.dim} applies to the toy mixtures only; "
                          f"remove it for config.data.name={data.name!r}")
    elif data.name in NATIVE_SHAPE:
        channels, size, _ = NATIVE_SHAPE[data.name]
        if (data.num_channels, data.image_size) != (channels, size):
            raise ConfigError(f"{data.name} images are {channels}x{size}x{size}: set "
                              f"config.data.num_channels={channels} and "
                              f"config.data.image_size={size}")
    elif data.name == "folder" and data.num_channels not in (1, 3):
        raise ConfigError(f"config.data.num_channels={data.num_channels}: an image folder "
                          "gives 1 (grayscale) or 3 (RGB) channels")
    _check_batch(config)


def _check_batch(config) -> None:
    batch, world = int(config.training.batch_size), int(os.environ.get("WORLD_SIZE", "1") or 1)
    try:
        micro_batches(batch, config.training.get("batch_per_device"), world)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    size = _train_size(config)
    if size is not None and batch > size:
        raise ConfigError(f"config.training.batch_size={batch} is larger than the training "
                          f"set of {config.data.name} ({size} items); use at most {size}")


# ----------------------------------------------------------------------------- builders

def _build_sde(config):
    try:
        return compose.build_sde(config)
    except ValueError as error:
        raise _named("config.sde", config.sde.keys(), error) from None


def _check_times(config, sde) -> None:
    for group, key in TIMES:
        if group in config and key in config[group]:
            try:
                check_time(f"config.{group}.{key}", config[group][key], sde.T)
            except ValueError as error:
                raise ConfigError(_message(error)) from None


def _missing_key(error: Exception) -> str:
    found = re.search(r"'(\w+)'", str(error))
    return found.group(1) if found else str(error)


def _check_network(config, sde) -> None:
    """The loss, the network (built on the meta device: no memory, same checks) and the
    score function, as every mode builds them."""
    try:
        compose.build_loss_fn(config, sde)
    except ValueError as error:
        raise _named("config.training", config.training.keys(), error) from None
    loss = config.training.get("loss", "simple")
    if loss != "simple" and not compose.learn_sigma(config):
        raise ConfigError(f"config.training.loss={loss!r} (Improved DDPM) trains a variance head: "
                          "set config.model.learn_sigma=True, or use loss='simple'")
    if config.model.get("checkpointing") and config.model.get("name") == "mlp":
        raise ConfigError("config.model.checkpointing=True: the mlp has no residual blocks to "
                          "checkpoint (ddpm, ncsnpp, ncsn, ncsnv2 have); set it to False")
    try:
        with torch.device("meta"):
            model = compose.build_model(config)
        compose.build_score_fn(config, sde, model)
    except (KeyError, AttributeError) as error:
        key = _missing_key(error)
        raise ConfigError(f"config.model.{key} is missing: config.model.name="
                          f"{config.model.name!r} needs it; add it "
                          "(configs/default_*.py and configs/*/ show every key)") from None
    except (ValueError, TypeError, RuntimeError) as error:
        raise _named("config.model", config.model.keys(), error) from None


def _check_likelihood(config, sde, mode: str) -> None:
    ev = config.eval
    try:
        check_ode_options(sde, method=ev.ode_method, rtol=ev.rtol, atol=ev.atol,
                          eps=ev.likelihood_eps, num_steps=ev.get("num_steps"))
    except ValueError as error:
        raise _named("config.eval", ev.keys(), error) from None
    dim = math.prod(compose.data_shape(config))
    if mode == "likelihood" and ev.trace == "exact" and dim > MAX_EXACT_TRACE_DIM:
        raise ConfigError(f"config.eval.trace='exact' replicates the batch once per dimension; "
                          f"D={dim} > {MAX_EXACT_TRACE_DIM} is too large: use "
                          "--config.eval.trace=hutchinson")


# ----------------------------------------------------------------------------- labels, classifier

def _data_classes(config) -> int | None:
    """How many classes the data set's labels have (the toy mixtures: their components), or
    None when unknown (an image folder)."""
    name = config.data.name
    if name in sde_lib.TOY_DISTRIBUTIONS:
        return sde_lib.toy_distribution(name).num_components
    return DATA_CLASSES.get(name)


def _check_labels(config) -> None:
    """Classifier-free guidance training needs a class-conditional model."""
    p_uncond = config.training.get("p_uncond", 0.0)
    if p_uncond and not config.model.get("num_classes"):
        raise ConfigError(f"config.training.p_uncond={p_uncond} (classifier-free guidance "
                          "training) needs a class-conditional model: set "
                          "config.model.num_classes to the number of classes, or p_uncond=0")


def _check_classifier(config, sde, mode: str) -> None:
    """config.classifier: keys of the chosen network only, the network built on the meta
    device, num_classes against the data, eval_sigmas inside the SDE's noise range, and for
    train_classifier the batch against the training set."""
    group = config.classifier
    name = group.name
    keys = compose.CLASSIFIER_KEYS
    for key in group.keys():
        owners = [n for n, names in keys.items() if key in names]
        if owners and name not in owners:
            raise ConfigError(f"config.classifier.{key} applies to config.classifier.name="
                              f"{' or '.join(map(repr, owners))}, not {name!r}: remove it")
    try:
        with torch.device("meta"):
            compose.build_classifier(config)
    except (ValueError, TypeError, RuntimeError) as error:
        raise _named("config.classifier", group.keys(), error) from None
    classes = _data_classes(config)
    if classes is not None and int(group.num_classes) != classes:
        raise ConfigError(f"config.classifier.num_classes={group.num_classes} but "
                          f"{config.data.name} has {classes} classes; set "
                          f"config.classifier.num_classes={classes}")
    eps = float(group.eps)
    low, high = (float(v) for v in torch.exp(-0.5 * sde.log_snr(
        torch.tensor([eps, sde.T], dtype=torch.float64))))
    for sigma in group.eval_sigmas:
        if not low <= sigma <= high:
            raise ConfigError(f"config.classifier.eval_sigmas has {sigma:g}, outside the noise "
                              f"levels of config.sde from t=eps to T ({low:.3g} .. {high:.3g}); "
                              "use levels in that range")
    size = _train_size(config)
    if mode == "train_classifier" and size is not None and int(group.batch_size) > size:
        raise ConfigError(f"config.classifier.batch_size={group.batch_size} is larger than the "
                          f"training set of {config.data.name} ({size} items); use at most "
                          f"{size}")


# ----------------------------------------------------------------------------- samplers

#: How a message names the type of a value.
TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def _of_type(value, kind: type) -> bool:
    """isinstance for option types: bools are not numbers, ints are floats."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, numbers.Real if kind is float else kind)


def _check_option_types(config, name: str, group) -> None:
    """The keys of config.sampling.<name> are the sampler's options, of their types."""
    sampler = samplers.SAMPLERS[name]
    path = f"sampling.{name}"
    if not hasattr(group, "items"):
        raise ConfigError(f"config.{path} must be a group of {name}'s options "
                          f"({', '.join(sampler.defaults)}), got {group!r}")
    for key, value in group.items():
        if key not in sampler.defaults:
            raise _unknown_key(config, f"{path}.{key}", list(sampler.defaults))
        kind = sampler.option_type(key)
        if not (_of_type(value, kind) or value is None and sampler.defaults[key] is None):
            raise ConfigError(f"config.{path}.{key} must be {TYPE_NAMES.get(kind, kind)}, got "
                              f"{value!r}")


def _applies(name: str, sde) -> bool:
    """Whether sampler ``name`` runs on ``sde`` with its default options."""
    try:
        samplers.SAMPLERS[name].options(sde, {})
    except ValueError:
        return False
    return True


def _sampler_options(config, sde, name: str, why: str | None = None) -> None:
    """config.sampling.<name> validated against the SDE; ``why`` (e.g. '--sampler ald') says
    who asked for the sampler, which then must apply to the SDE."""
    group = config.sampling.get(name)
    options = {} if group is None else dict(group.items())
    if why and not _applies(name, sde):
        try:
            samplers.SAMPLERS[name].options(sde, {})
        except ValueError as error:
            raise ConfigError(f"{why} does not apply to config.sde.name="
                              f"{config.sde.name!r}: {_message(error)}") from None
    try:
        samplers.SAMPLERS[name].options(sde, options)
    except ValueError as error:
        raise _named(f"config.sampling.{name}", options, error) from None


def _reference_sde(name: str, sde):
    """``sde`` when sampler ``name`` applies to it, else a VE or VP SDE with as many steps
    that it applies to (the values of its group are checked there: ald's options on a VP
    config), or None."""
    steps = max(int(sde.N), 2)
    for candidate in (sde, sde_lib.VESDE(N=steps), sde_lib.VPSDE(N=steps)):
        if _applies(name, candidate):
            return candidate
    return None


def _check_samplers(config, sde, mode: str, sampler: str | None) -> None:
    """Every sampler group's keys, types and values (against the config's SDE, or one the
    sampler applies to); the default sampler, the requested one (sample mode) and the
    training grid's must apply to the config's SDE."""
    for name in samplers.SAMPLERS:
        if name in config.sampling:
            _check_option_types(config, name, config.sampling[name])
        reference = _reference_sde(name, sde)
        if reference is not None:
            _sampler_options(config, reference, name)
    method = config.sampling.method
    _sampler_options(config, sde, method, f"config.sampling.method={method!r}")
    if mode in ("sample", "eval") and sampler:
        _check_value("--sampler", sampler, choice(samplers.SAMPLERS))
        _sampler_options(config, sde, sampler, f"--sampler {sampler}")
    training = config.training
    if mode == "train" and int(training.sample_freq) > 0:
        grid = training.grid_sampler
        _sampler_options(config, sde, grid, f"config.training.grid_sampler={grid!r}")


# ----------------------------------------------------------------------------- eval

#: Modes that need image data.
IMAGE_MODES = ("inpaint", "eval", "ref_stats", "plan")     # plan: run_lib.plan measures images


def _check_quality(config, mode: str) -> None:
    """--mode eval / ref_stats: the eval group's sample-quality keys (present, and the digits
    feature space only for 8x8 digits)."""
    ev = config.eval
    needed = ("num_samples", "sample_batch", "use_ema", "features", "inception_path",
              "ref_stats", "ref_split", "kid_subsets", "kid_subset_size", "is_splits", "pr_k",
              "pr_samples")
    missing = [key for key in needed if key not in ev]
    if missing:
        raise ConfigError(f"config.eval.{missing[0]} is missing: --mode {mode} needs it (see "
                          "configs/common.py eval_group for every key and its default)")
    shape = tuple(compose.data_shape(config))
    if ev.features == "digits" and shape != (1, 8, 8):
        raise ConfigError(f"config.eval.features='digits' measures 8x8 digits, but the data "
                          f"are {shape}: use --config.eval.features=inception")
    if int(ev.num_samples) <= int(ev.pr_k):
        raise ConfigError(f"config.eval.num_samples={ev.num_samples} is too few for precision / "
                          f"recall with config.eval.pr_k={ev.pr_k} neighbours: draw more than "
                          f"{ev.pr_k} samples (the papers draw 50000)")
    # the Inception file is checked when it is loaded, before any sampling (one line, URL)


# ----------------------------------------------------------------------------- inpaint

def _inverse():
    from . import inverse
    return inverse


#: Test-split sizes of the image data sets (an image folder's is known once read).
TEST_SIZES = {"digits": 297, "cifar10": 10_000, "mnist": 10_000}


def _check_inpaint(config, sde) -> None:
    """config.inpaint for --mode inpaint: the mask (a name, or a PNG file of the images'
    size), the images ('test' within the test split, or a readable .npz / .png of the data's
    shape), an unconditional score, the sampler on the SDE, and the library's own checks of
    task, method, sampler and noise (run_lib.inverse.check_problem: the operator against the
    data shape, combinations it refuses), all before any work."""
    inverse = _inverse()
    group = config.inpaint
    mask = str(group.mask)
    if group.task == "inpaint" and not mask.lower().endswith(".png") and mask not in inverse.MASKS:
        raise ConfigError(f"config.inpaint.mask={mask!r} is not a mask: use one of "
                          f"{', '.join(map(repr, inverse.MASKS))} or the path of a PNG file "
                          f"(white = known){_did_you_mean(mask, inverse.MASKS)}")
    images = str(group.images)
    size = TEST_SIZES.get(config.data.name)
    if images == "test" and size is not None and int(group.num_images) > size:
        raise ConfigError(f"config.inpaint.num_images={group.num_images} but the "
                          f"{config.data.name} test split has {size} images; use at most {size}")
    if config.model.get("num_classes") and compose.null_label(config) is None:
        raise ConfigError("--mode inpaint needs an unconditional score, and this model is "
                          "class-conditional without a null label: train it with "
                          "config.training.p_uncond > 0 or use an unconditional config")
    if group.method != "smc":
        _sampler_options(config, sde, str(group.sampler),
                         f"config.inpaint.sampler={group.sampler!r}")
    try:
        if images != "test":
            inverse.load_images(config)
        inverse.check_problem(config, sde)
    except (ValueError, OSError) as error:
        raise ConfigError(_message(error)) from None


# ----------------------------------------------------------------------------- the config

def _check_guidance(config, classifier: bool) -> None:
    """Sample mode: class_label, guidance and thresholding against the model (and whether a
    classifier is given: --classifier, or the default one of guidance='classifier')."""
    given = classifier or config.sampling.get("guidance") == "classifier"
    try:
        compose.guidance_method(config, classifier=given)
    except ValueError as error:
        raise ConfigError(_message(error)) from None


def validate_config(config, mode: str = "train", *, sampler: str | None = None,
                    classifier: bool = False) -> None:
    """Check ``config`` for ``mode`` (train, sample, likelihood) before any work: every
    key's type and range, unknown and missing keys, the data set, and what every mode builds
    from it (SDE, loss, network on the meta device, score function, likelihood options and
    the sampler groups through the registry). ``sampler``: the --sampler of sample mode;
    ``classifier``: whether sample mode got --classifier (classifier guidance).
    Raises a ConfigError with a one-line message naming the key and the fix."""
    _check_value("mode", mode, choice(MODES))
    if not hasattr(config, "items"):
        raise ConfigError(f"the config must be an ml_collections.ConfigDict, got "
                          f"{type(config).__name__}")
    if mode in IMAGE_MODES and "data" in config and _data_kind(config) == "toy":
        raise ConfigError(f"--mode {mode} needs image data; config.data.name="
                          f"{config.data.name!r} is a distribution of points: use an image "
                          "config, e.g. configs/vp/ddpm_digits.py"
                          + (" (--mode sample reports a mixture's exact sample metrics)"
                             if mode == "eval" else ""))
    _check_groups(config, mode)
    _check_data(config)
    sde = _build_sde(config)
    _check_times(config, sde)
    _check_network(config, sde)
    _check_labels(config)
    if "classifier" in config:
        _check_classifier(config, sde, mode)
    _check_likelihood(config, sde, mode)
    _check_samplers(config, sde, mode, sampler)
    if mode == "inpaint":
        _check_inpaint(config, sde)
    if mode in ("sample", "eval"):
        _check_guidance(config, classifier)
    if mode in ("eval", "ref_stats"):
        _check_quality(config, mode)


# ----------------------------------------------------------------------------- files

def _error_line(error: BaseException, path: Path) -> str:
    """'<Type>: <message> (line N)', N the deepest line of ``path`` in the traceback."""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    where = f" (line {line})" if line else ""
    text = _message(error.msg if isinstance(error, SyntaxError) else error)
    return f"{type(error).__name__}: {text}{where}"


def load_config_file(argument: str):
    """``get_config()`` of the config file ``argument`` ('path.py' or 'path.py:arg', as
    ml_collections' config_flags reads it); a ConfigError names the file and what is wrong."""
    path_text, *args = str(argument).split(":", 1)
    path = Path(path_text)
    example = "e.g. --config configs/vp/ddpm_digits.py"
    if not path_text:
        raise ConfigError(f"the config file's path is empty: pass one, {example}")
    if not path.exists():
        raise ConfigError(f"config file {path} not found: pass an existing config file, {example}")
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"config file {path} is not a Python file (.py) that defines "
                          f"get_config(); {example}")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(str(path)))}", path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"config file {path} defines no get_config(): a config file "
                              f"returns an ml_collections.ConfigDict from get_config(); {example}")
        config = module.get_config(*args)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the user's file is reported
        raise ConfigError(f"config file {path} fails to load: "
                          f"{_error_line(error, path)}") from error
    if not hasattr(config, "items"):
        raise ConfigError(f"config file {path}: get_config() returned a "
                          f"{type(config).__name__}, not an ml_collections.ConfigDict")
    return config


def check_workdir(workdir) -> Path:
    """``workdir`` as a Path when it is a directory that can be written, or can be created
    (its nearest existing parent is a writable directory); nothing is created here."""
    if workdir is None or not str(workdir).strip():
        raise ConfigError("--workdir is empty: pass a directory for the run's files, e.g. "
                          "--workdir runs/digits")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {path} is a file, not a directory: pass a directory "
                          "(it is created when missing)")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--workdir {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {path} is not writable ({existing} refuses writes): "
                          "pick a directory you can write to")
    return path


def check_checkpoint_file(checkpoint) -> Path:
    """``checkpoint`` as a Path when it is a readable file (its content is checked when it is
    loaded, before anything is written: run_lib.checkpoints.read_checkpoint)."""
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path} not found: pass an existing checkpoint file "
                          "(e.g. <workdir>/checkpoints/checkpoint_<step>.pt)")
    if not path.is_file():
        raise ConfigError(f"--checkpoint {path} is not a file: pass a checkpoint file "
                          "(e.g. <workdir>/checkpoints/latest.pt)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"--checkpoint {path} cannot be read (permission denied)")
    return path
