"""Validation at the edge (run_lib/validate.py, main.py): every class of bad input, a config
value of the wrong type or out of range, an unknown or old key, a missing key, a broken
config file, a bad work directory, a damaged or malicious checkpoint, data files that cannot
be read, gives one line that names the key or the file, and nothing is written.

Most cases go through validate_config and the loaders directly (fast); a few run
``python main.py`` to check the exit code, the single stderr line and the untouched disk."""
import concurrent.futures
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
import torch

from run_lib import checkpoints, datasets, evaluate, validate
from run_lib.validate import OLD_KEYS, ConfigError, load_config_file, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*/*.py") if p.name != "__init__.py")
DIGITS, TOY = "configs/vp/ddpm_digits.py", "configs/toy/vp_mixture.py"
NCSN = "configs/ve/ncsn_digits.py"
COND = "configs/vp/ddpm_digits_cond.py"


def config_of(path: str = DIGITS) -> ml_collections.ConfigDict:
    return load_config_file(str(ROOT / path))


def set_value(config, path: str, value) -> None:
    """config.<path> = value, also of another type (the field is replaced)."""
    *groups, key = path.split(".")
    node = config
    for group in groups:
        node = node[group]
    if key in node:
        del node[key]
    node[key] = value


def delete(config, path: str) -> None:
    *groups, key = path.split(".")
    node = config
    for group in groups:
        node = node[group]
    del node[key]


def expect_error(config, *fragments, mode="train", sampler=None) -> str:
    """validate_config raises a one-line ConfigError holding every fragment."""
    with pytest.raises(ConfigError) as info:
        validate_config(config, mode, sampler=sampler)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- every config

@pytest.mark.parametrize("mode", validate.MODES)
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_file_passes_for_every_mode(path, mode):
    if mode in validate.IMAGE_MODES and path.parent.name == "toy":      # points, not images
        expect_error(load_config_file(str(path)), f"--mode {mode} needs image data", mode=mode)
        return
    validate_config(load_config_file(str(path)), mode)


def _none_leaves(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _none_leaves(value, f"{prefix}{key}.")
        elif value is None:
            yield f"{prefix}{key}", config.get_type(key)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_none_value_is_a_typed_placeholder(path):
    """A plain None field takes no value from the command line (ml_collections keeps its
    type, NoneType): every None must be placeholder(<type>) so --config.<key>=... works."""
    untyped = [key for key, kind in _none_leaves(load_config_file(str(path)))
               if kind is type(None)]
    assert not untyped, f"plain None (use ml_collections.config_dict.placeholder): {untyped}"


def test_the_demo_configs_pass():
    from run_lib.demo import DEMO_RUNS, demo_config
    for name in DEMO_RUNS:
        for mode in validate.MODES:
            validate_config(demo_config(name, n_iters=5), mode)


def test_samplers_that_apply_pass_and_the_others_name_the_sde():
    vp, ve = config_of(DIGITS), config_of(NCSN)
    for name in ("pc", "ode", "ddim", "dpm_solver", "edm", "dpm_adaptive"):
        validate_config(vp, "sample", sampler=name)
        validate_config(ve, "sample", sampler=name)
    validate_config(ve, "sample", sampler="ald")
    expect_error(vp, "--sampler ald does not apply to config.sde.name='vpsde'", "pc_sample",
                 mode="sample", sampler="ald")
    expect_error(vp, "--sampler must be one of", mode="sample", sampler="nope")


# ----------------------------------------------------------------------------- values

#: (key, bad value, text of the message); wrong types, out-of-range values and unknown
#: choices in every group. The message must also name config.<key>.
BAD_VALUES = [
    # wrong type
    ("seed", "0", "must be an integer >= 0"),
    ("training.n_iters", "100", "must be an integer >= 1"),
    ("training.n_iters", 1.5, "must be an integer >= 1"),
    ("training.continuous", 1, "must be True or False"),
    ("training.batch_size", True, "must be an integer >= 1"),
    ("optim.lr", "1e-3", "must be a finite number > 0"),
    ("model.ch_mult", "abc", "must be a non-empty tuple of integers"),
    ("model.ch_mult", (1, "2"), "must be a non-empty tuple of integers"),
    ("model.attn_resolutions", 4, "tuple of integers"),
    ("data.centered", "yes", "must be True or False"),
    ("data.random_flip", 1, "must be True or False"),
    ("sde.num_scales", 10.0, "must be an integer >= 1"),
    ("eval.probes", True, "must be an integer >= 1"),
    ("eval.num_steps", 2.5, "must be an integer >= 1"),
    ("sampling.pc.snr", "0.16", "must be a number"),
    ("sampling.pc.denoise", 1, "must be True or False"),
    ("sampling.ddim.num_steps", 20.0, "must be an integer"),
    # out of range
    ("seed", -1, ">= 0, got -1"),
    ("training.n_iters", -5, "must be an integer >= 1, got -5"),
    ("training.n_iters", 0, ">= 1, got 0"),
    ("training.batch_size", 0, ">= 1, got 0"),
    ("training.batch_size", 5000, "larger than the training set of digits (1500 items)"),
    ("training.log_freq", 0, ">= 1"),
    ("training.snapshot_freq", 0, ">= 1"),
    ("training.snapshot_freq_for_preemption", -1, ">= 1"),
    ("training.sample_freq", -1, ">= 0"),
    ("training.eval_freq", -1, ">= 0"),
    ("training.eval_batches", 0, ">= 1"),
    ("training.num_grid_samples", 0, ">= 1"),
    ("training.eps", 0.0, "> 0"),
    ("training.eps", 1.0, "in (0, 1.0)"),
    ("optim.lr", 0.0, "> 0"),
    ("optim.lr", float("nan"), "finite number"),
    ("optim.warmup", -1, ">= 0"),
    ("optim.grad_clip", 0.0, "> 0"),
    ("optim.grad_clip", -math.inf, "> 0"),
    ("optim.beta1", 1.0, "in [0, 1)"),
    ("optim.eps", 0.0, "> 0"),
    ("optim.weight_decay", -0.1, ">= 0"),
    ("model.ema_rate", 1.5, "<= 1.0"),
    ("model.ema_rate", -0.1, ">= 0"),
    ("model.dropout", 1.0, "in [0, 1)"),
    ("model.nf", 0, ">= 1"),
    ("model.num_res_blocks", 0, ">= 1"),
    ("model.num_classes", -1, ">= 0"),
    ("data.image_size", 16, "digits images are 1x8x8"),
    ("data.num_channels", 3, "digits images are 1x8x8"),
    ("sde.num_scales", 0, ">= 1"),
    ("sde.beta_max", 0.0, "> 0"),
    ("sde.beta_min", -1.0, ">= 0"),
    ("sampling.num_samples", 0, ">= 1"),
    ("sampling.batch_size", -1, ">= 0"),
    ("sampling.pc.snr", -0.1, "> 0"),
    ("sampling.pc.eps", 2.0, "in (0, 1.0)"),
    ("sampling.ddim.num_steps", 0, ">= 1"),
    ("sampling.dpm_solver.order", 4, "<= 3"),
    ("sampling.ald.n_steps_each", 0, ">= 1"),          # ald does not apply to VP: checked on VE
    ("sampling.ald.step_lr", -1.0, "> 0"),
    ("sampling.edm.s_noise", -1.0, ">= 0"),
    ("eval.rtol", 0.0, "> 0"),
    ("eval.atol", -1e-5, "> 0"),
    ("eval.likelihood_eps", 0.0, "> 0"),
    ("eval.likelihood_eps", 1.0, "in (0, 1.0)"),
    ("eval.probes", 0, ">= 1"),
    ("eval.likelihood_samples", -1, ">= 0"),
    ("eval.batch_size", -1, ">= 0"),
    # choices
    ("device", "gpu", "is not a device name"),
    ("device", "meta", "is not a device to train or sample on"),
    ("data.name", "digit", "did you mean 'digits'"),
    ("sde.name", "vp", "must be one of 'vpsde', 'subvpsde', 'vesde'"),
    ("model.name", "unet", "must be one of"),
    ("model.resblock_type", "resnet", "must be one of 'ddpm', 'biggan'"),
    ("model.discrete_labels", "round", "must be one of 'nearest', 'score_sde'"),
    ("training.mixed_precision", "fp16", "must be one of 'no', 'bf16'"),
    ("training.grid_sampler", "dpm", "must be one of"),
    ("sampling.method", "dpm", "must be one of"),
    ("sampling.pc.predictor", "ancestral", "unknown predictor 'ancestral'"),
    ("sampling.ode.method", "rk5", "unknown method"),
    ("eval.trace", "exakt", "did you mean 'exact'"),
    ("eval.ode_method", "rk5", "did you mean 'rk4'"),
    # classifier-free guidance training and the classifier group
    ("training.p_uncond", 1.0, "in [0, 1)"),
    ("classifier.name", "resnet", "must be one of 'mlp', 'conv', 'wideresnet'"),
    ("classifier.num_classes", 1, ">= 2"),
    ("classifier.n_iters", 0, ">= 1"),
    ("classifier.lr", 0.0, "> 0"),
    ("classifier.ch_mult", (), "non-empty tuple of integers"),
    ("classifier.eval_sigmas", (0.1, -1.0), "tuple of numbers > 0"),
    ("classifier.eps", 1.0, "in (0, 1.0)"),
    ("classifier.ema_rate", 2.0, "<= 1.0"),
    # class labels and guidance of sample mode
    ("sampling.class_label", -2, ">= -1"),
    ("sampling.class_label", 1.0, "must be an integer"),
    ("sampling.guidance", "cgf", "must be one of 'none', 'cfg', 'classifier', 'auto'"),
    ("sampling.guidance_scale", -1.0, ">= 0"),
    ("sampling.thresholding", 1, "must be True or False"),
    ("sampling.thresholding_percentile", 0.0, "> 0"),
    ("sampling.thresholding_percentile", 1.5, "<= 1.0"),
]


@pytest.mark.parametrize("key, value, text", BAD_VALUES,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_the_key(key, value, text):
    config = config_of()
    set_value(config, key, value)
    message = expect_error(config, text)
    assert f"config.{key}" in message or f"config.{key.rsplit('.', 1)[0]}" in message


def test_cuda_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    config = config_of()
    set_value(config, "device", "cuda:0")
    expect_error(config, "config.device='cuda:0' but CUDA is not available; use 'cpu' or 'auto'")


# ----------------------------------------------------------------------------- cross checks

@pytest.mark.parametrize("key, value, mode, text", [
    ("sampling.method", "ald", "train", "config.sampling.method='ald' does not apply to "
                                        "config.sde.name='vpsde'"),
    ("training.grid_sampler", "ald", "train", "config.training.grid_sampler='ald' does not "
                                              "apply"),
    ("eval.num_steps", 5, "likelihood", "config.eval.num_steps applies to the fixed-grid "
                                        "methods"),
    ("sampling.ode.num_steps", 5, "sample", "config.sampling.ode.num_steps applies to the "
                                            "fixed-grid methods"),
    ("training.importance_sampling", True, "train", "config.training.importance_sampling=True "
                                                    "needs likelihood_weighting=True"),
    ("model.ch_mult", (1, 2, 2, 2, 2), "train", "config.model: image_size=8 must be divisible"),
    ("data.dim", 2, "train", "config.data.dim=2 applies to the toy mixtures only"),
    ("training.p_uncond", 0.1, "train", "config.training.p_uncond=0.1 (classifier-free "
                                        "guidance training) needs a class-conditional model"),
    ("classifier.num_classes", 8, "train", "config.classifier.num_classes=8 but digits has 10 "
                                           "classes"),
    ("classifier.hidden_dim", 64, "train", "config.classifier.hidden_dim applies to "
                                           "config.classifier.name='mlp', not 'conv'"),
    ("classifier.eval_sigmas", (0.5, 1000.0), "train", "config.classifier.eval_sigmas has "
                                                       "1000, outside the noise levels"),
    ("classifier.batch_size", 5000, "train_classifier", "config.classifier.batch_size=5000 is "
                                                        "larger than the training set"),
])
def test_inconsistent_values_name_the_key(key, value, mode, text):
    config = config_of()
    set_value(config, key, value)
    expect_error(config, text, mode=mode)


#: (config, sampling keys, classifier given, text): what guided sampling refuses, sample mode.
GUIDANCE_CASES = [
    (DIGITS, {"class_label": 3}, False,
     "config.sampling.class_label=3 is given to an unconditional model: train with "
     "config.model.num_classes and config.training.p_uncond > 0"),
    (DIGITS, {"guidance_scale": 2.0}, False,
     "guidance on an unconditional model needs a classifier or a null label: train with "
     "config.model.num_classes and config.training.p_uncond > 0 (e.g. configs/vp/"
     "ddpm_digits_cond.py), or pass --classifier"),
    (DIGITS, {"guidance": "cfg"}, False, "config.sampling.guidance='cfg' (classifier-free "
                                         "guidance) needs the null label"),
    (DIGITS, {"guidance": "none", "guidance_scale": 1.0}, False,
     "config.sampling.guidance_scale=1 but config.sampling.guidance='none'"),
    (DIGITS, {"guidance": "cfg"}, True, "--classifier is for classifier guidance"),
    (COND, {"class_label": 10}, False, "config.sampling.class_label=10 is outside [0, 10)"),
    (COND, {"class_label": 10}, True, "config.sampling.class_label=10 is outside [0, 10)"),
    (DIGITS, {"class_label": 10}, True, "config.sampling.class_label=10 is outside [0, 10)"),
    (TOY, {"thresholding": True}, False, "config.sampling.thresholding=True (dynamic "
                                         "thresholding) is for data in [-1, 1]"),
]


@pytest.mark.parametrize("path, sampling, classifier, text", GUIDANCE_CASES)
def test_guided_sampling_refusals(path, sampling, classifier, text):
    config = config_of(path)
    config.sampling.update(sampling)
    validate_config(config, "train")               # the sampling keys matter to sample mode
    with pytest.raises(ConfigError) as info:
        validate_config(config, "sample", classifier=classifier)
    assert "\n" not in str(info.value) and text in str(info.value), str(info.value)


def test_guided_sampling_refuses_cfg_without_a_null_label_and_uncentered_thresholding():
    config = config_of(COND)
    config.training.p_uncond = 0.0
    config.sampling.guidance_scale = 2.0
    expect_error(config, "this class-conditional model was trained with "
                         "config.training.p_uncond=0 (no null label", mode="sample")
    validate_config(config, "sample", classifier=True)      # classifier guidance instead
    config.sampling.update(guidance_scale=0.0, class_label=4)
    validate_config(config, "sample")                       # the plain conditional model
    config.sampling.guidance = "cfg"
    expect_error(config, "a class-conditional model trained with config.training.p_uncond=0",
                 mode="sample")
    config = config_of(COND)
    config.sampling.thresholding = True
    validate_config(config, "sample")
    config.data.centered = False
    expect_error(config, "config.sampling.thresholding=True", "centered=False", mode="sample")


def test_cross_checks_of_other_sdes_and_data():
    subvp = config_of("configs/subvp/ddpm_digits.py")
    set_value(subvp, "training.continuous", False)
    expect_error(subvp, "config.training.continuous=False", "use continuous=True")
    ve = config_of(NCSN)
    set_value(ve, "sde.sigma_min", 20.0)
    expect_error(ve, "config.sde.sigma_min must be < sigma_max")
    toy = config_of(TOY)
    set_value(toy, "data.dim", 3)
    expect_error(toy, "config.data.dim=3 but eight_modes has points of dimension 2")
    set_value(toy, "data.dim", 2)
    set_value(toy, "training.batch_size", 60_000)
    expect_error(toy, "config.training.batch_size=60000 is larger than the training set")
    folder = config_of()
    set_value(folder, "data.name", "folder")
    set_value(folder, "data.image_size", 64)
    set_value(folder, "model.ch_mult", (1, 2, 2))
    set_value(folder, "data.num_channels", 3)
    set_value(folder, "eval.trace", "exact")
    validate_config(folder, "train")              # exact trace matters to the likelihood only
    expect_error(folder, "config.eval.trace='exact'", "D=12288", "hutchinson", mode="likelihood")
    set_value(folder, "data.num_channels", 2)
    expect_error(folder, "config.data.num_channels=2: an image folder gives 1")


def test_batch_size_must_divide_among_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    expect_error(config_of(), "config.training.batch_size=64 (the global batch) is not "
                              "divisible by the 3 processes")


# ----------------------------------------------------------------------------- keys

@pytest.mark.parametrize("key, hint", [
    ("training.n_iter", "did you mean config.training.n_iters?"),
    ("model.nff", "did you mean config.model.nf?"),
    ("training.lr", "config.optim.lr"),           # or config.classifier.lr
    ("sampling.pc.snrr", "did you mean config.sampling.pc.snr?"),
    ("sampling.ddim.order", "config.sampling.dpm_solver.order"),
    ("sampling.ddim.order", "config.sampling.dpm_adaptive.order"),
    ("eval.foo", "valid keys:"),
    ("seeds", "did you mean config.seed?"),
    ("classifier.n_iter", "did you mean config.classifier.n_iters?"),
])
def test_unknown_key_names_the_closest_key(key, hint):
    config = config_of()
    set_value(config, key, 1)
    expect_error(config, f"unknown key config.{key}", hint)


@pytest.mark.parametrize("old", sorted(OLD_KEYS))
def test_old_key_of_a_config_file_names_the_new_key(old):
    config = config_of(TOY if old.startswith("eval.") else DIGITS)
    set_value(config, old, 1)
    new = OLD_KEYS[old].split()[0]
    expect_error(config, f"unknown key config.{old}", f"the key moved: use config.{new}")


def test_old_key_override_names_the_new_flag():
    config = config_of()
    with pytest.raises(ConfigError, match=r"unknown config key in --config.sampling.snr=0.2: "
                                          r"config.sampling has no key 'snr'; the key moved: use "
                                          r"--config.sampling.pc.snr$"):
        validate.check_override_key(config, "sampling.snr", flag="--config.sampling.snr=0.2")
    with pytest.raises(ConfigError, match="config.training.n_iters is a value, not a group"):
        validate.check_override_key(config, "training.n_iters.x",
                                    flag="--config.training.n_iters.x=1")
    validate.check_override_key(config, "sampling.pc.snr", flag="--config.sampling.pc.snr=0.2")


@pytest.mark.parametrize("key", ["training.n_iters", "optim.lr", "sampling.method", "sde.name",
                                 "model.ema_rate", "eval.trace", "data.image_size", "seed",
                                 "model.nf"])
def test_missing_key_is_named(key):
    config = config_of()
    delete(config, key)
    expect_error(config, f"config.{key} is missing")


def test_missing_group_and_toy_keys():
    config = config_of()
    delete(config, "optim")
    expect_error(config, "config.optim is missing or not a group")
    config = config_of()
    delete(config, "classifier")           # optional but for the mode that trains it
    validate_config(config, "train")
    expect_error(config, "config.classifier is missing: --mode train_classifier needs it",
                 mode="train_classifier")
    config = config_of()
    delete(config, "classifier.n_iters")
    expect_error(config, "config.classifier.n_iters is missing")
    toy = config_of(TOY)
    delete(toy, "eval.score_error_eps")
    expect_error(toy, "config.eval.score_error_eps is missing")


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("source, text", [
    (None, "not found"),
    ("def get_config(:\n", "SyntaxError"),
    ("import ml_collections\n\ndef get_config():\n    return undefined_name\n",
     "NameError: name 'undefined_name' is not defined (line 4)"),
    ("X = 1\n", "defines no get_config()"),
    ("def get_config():\n    return {'a': 1}.keys()\n", "not an ml_collections.ConfigDict"),
])
def test_broken_config_file(tmp_path, source, text):
    path = tmp_path / "cfg.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(ConfigError) as info:
        load_config_file(str(path))
    assert str(path) in str(info.value) and text in str(info.value)
    assert "\n" not in str(info.value)


def test_config_file_that_is_not_a_python_file(tmp_path):
    with pytest.raises(ConfigError, match="is not a Python file"):
        load_config_file(str(tmp_path))
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a Python file"):
        load_config_file(str(tmp_path / "c.json"))
    with pytest.raises(ConfigError, match="path is empty"):
        load_config_file("")


def test_workdir_checks_create_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert validate.check_workdir(target) == target and not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        validate.check_workdir(tmp_path / "file")
    with pytest.raises(ConfigError, match="cannot be created: .* is a file"):
        validate.check_workdir(tmp_path / "file" / "sub")
    with pytest.raises(ConfigError, match="--workdir is empty"):
        validate.check_workdir("")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_workdir_that_is_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="is not writable"):
        validate.check_workdir(locked / "run")


class _Evil:
    """A pickle that would create a marker file when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(tmp_path) -> dict:
    """name -> (path, text of the error) of files that are not loadable checkpoints."""
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(64)}, "ema": {}, "step": 3, "optimizer": {},
                "rng": {}}, good)
    raw = good.read_bytes()
    files = {"truncated.pt": raw[: len(raw) // 2], "text.pt": b"hello, not a checkpoint",
             "empty.pt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"model": _Evil(tmp_path / "pwned")}, tmp_path / "evil.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    return {"truncated.pt": "it is truncated or not a checkpoint of this project",
            "text.pt": "it is truncated or not a checkpoint of this project",
            "empty.pt": "it is truncated or not a checkpoint of this project",
            "evil.pt": "is a pickle that torch.load(weights_only=True) refuses (GLOBAL",
            "list.pt": "holds a list, not a checkpoint dict",
            "partial.pt": "is not a checkpoint of this project: it lacks 'ema', 'step'"}


def test_unloadable_checkpoints_are_one_line(tmp_path, recwarn):
    for name, text in _bad_checkpoints(tmp_path).items():
        with pytest.raises(checkpoints.CheckpointError) as info:
            checkpoints.read_checkpoint(tmp_path / name, "cpu",
                                        required=("model", "ema", "step"))
        message = str(info.value)
        assert "\n" not in message and str(tmp_path / name) in message and text in message, message
    assert not (tmp_path / "pwned").exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    with pytest.raises(ConfigError, match="--checkpoint .* not found"):
        validate.check_checkpoint_file(tmp_path / "none.pt")
    with pytest.raises(ConfigError, match="is not a file"):
        validate.check_checkpoint_file(tmp_path)


def test_damaged_data_files_name_the_file(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz is not a readable tar.gz "
                                         "archive [^\n]* download"):
        datasets.load_cifar10(tmp_path, "test")
    folder = tmp_path / "batches" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(pickle.UnpicklingError, match="test_batch is not a readable CIFAR-10 batch"):
        datasets.load_cifar10(tmp_path / "batches", "test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz cannot be read"):
        datasets.load_mnist(tmp_path, "test")
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        datasets.load_image_folder(images, "train", image_size=8, num_channels=1)


def test_compare_names_a_damaged_result_file(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        evaluate.compare_workdirs([tmp_path])
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        evaluate.compare_workdirs([tmp_path / "nothing"])


def test_train_refuses_a_batch_larger_than_the_data_before_writing(tmp_path):
    """A folder data set smaller than the batch: the error comes before config.json."""
    from PIL import Image
    from run_lib.train import train
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(images / f"{i}.png")
    config = config_of()
    set_value(config, "data.name", "folder")
    set_value(config, "data.data_dir", str(images))
    set_value(config, "model.nf", 8)
    set_value(config, "device", "cpu")
    set_value(config, "training.batch_size", 8)
    validate_config(config, "train")            # the folder's size is known only when read
    with pytest.raises(ValueError, match="batch_size=8 is larger than the data set .3 items"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- main.py

def main_py(*args, env=None):
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _cli_cases(tmp_path) -> list:
    """(arguments, text of the one stderr line) of bad command lines."""
    _bad_checkpoints(tmp_path)
    (tmp_path / "afile").write_text("x")
    from PIL import Image
    Image.new("L", (16, 16), 255).save(tmp_path / "mask16.png")
    config = ["--config", DIGITS]
    sample = ["--mode", "sample", *config]
    inpaint = ["--mode", "inpaint", *config]
    return [
        (["--config", "configs/nope.py"], "config file configs/nope.py not found"),
        ([*config, "--config.training.nonsense=1"],
         "unknown config key in --config.training.nonsense=1"),
        ([*config, "--config.sampling.snr=0.2"], "use --config.sampling.pc.snr"),
        ([*config, "--config.training.n_iters=abc"],
         "--config.training.n_iters=abc: config.training.n_iters takes an integer"),
        ([*config, "--config.training.n_iters=-5"],
         "config.training.n_iters must be an integer >= 1, got -5"),
        ([*config, "--config.training.batch_size=0"],
         "config.training.batch_size must be an integer >= 1, got 0"),
        ([*config, "--workdir", tmp_path / "afile"], f"--workdir {tmp_path / 'afile'} is a file"),
        (["--config.training.n_iters=5"], "no --config was given"),
        (sample, "no checkpoint at"),
        ([*sample, "--config.sampling.guidance_scale=2"], "guidance on an unconditional model"),
        ([*config, "--classifier", tmp_path / "good.pt"],
         "--classifier applies to --mode sample / eval, not --mode train"),
        (["--mode", "train_classifier", *config, "--config.classifier.lr=0"],
         "config.classifier.lr must be a finite number > 0"),
        (["--mode", "train_classifier", *config, "--sampler", "pc"],
         "--sampler applies to --mode sample / eval, not --mode train_classifier"),
        ([*inpaint, f"--config.inpaint.mask={tmp_path / 'mask16.png'}"],
         "mask16.png' is 16x16 pixels but the data's images are 8x8: give a mask PNG of 8x8"),
        ([*inpaint, "--config.inpaint.mask=top_half"],
         "config.inpaint.mask='top_half' is not a mask: use one of 'left_half', 'bottom_half'"),
        ([*inpaint, "--config.inpaint.task=colorize"],
         "config.inpaint.task='colorize': colorization needs RGB images (B, 3, H, W); the data "
         "has shape (1, 1, 8, 8); 1-channel data is already gray"),
        ([*inpaint, "--config.inpaint.method=replacement"],
         "config.inpaint.method must be one of 'replace', 'smc', 'pigdm', got 'replacement'"),
        (["--config", "configs/ve/ncsn_cifar.py", "--config.data.data_dir", tmp_path / "none"],
         "CIFAR-10 not found: put"),
        ([*config, "--checkpoint", tmp_path / "good.pt"],
         "--checkpoint applies to --mode sample / likelihood / inpaint / eval, not --mode train"),
        *[([*sample, "--checkpoint", tmp_path / name], f"{tmp_path / name} {text}")
          for name, text in (("truncated.pt", "cannot be read"), ("text.pt", "cannot be read"),
                             ("evil.pt", "is a pickle that torch.load(weights_only=True) "
                                         "refuses"))],
    ]


def test_main_reports_bad_input_in_one_line_and_writes_nothing(tmp_path):
    """Each case in its own process with its own work directory, two at a time (one per
    core: each process mostly imports torch)."""
    cases = [(args if "--workdir" in args else [*args, "--workdir", tmp_path / f"w{k}"], text)
             for k, (args, text) in enumerate(_cli_cases(tmp_path))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: main_py(*case[0]), cases))
    for (args, text), done in zip(cases, results):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, (args, done.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        assert text in lines[0], (args, lines)
    assert not any(p.name.startswith("w") and p.is_dir() for p in tmp_path.iterdir())
    assert not (tmp_path / "pwned").exists()


def test_main_shows_the_traceback_when_asked(tmp_path):
    done = main_py("--config", DIGITS, "--config.training.n_iters=-5", "--workdir",
                   tmp_path / "w", env={"SCOREDIFF_TRACEBACK": "1"})
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr
