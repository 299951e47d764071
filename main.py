"""Command-line entry point: one function per mode, the same for every data set.

    python main.py --mode train      --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode sample     --config configs/toy/vp_mixture.py --workdir runs/toy_vp --sampler ode
    python main.py --mode likelihood --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode train      --config configs/vp/ddpm_digits.py --workdir runs/digits_vp
    python main.py --mode sample     --config configs/vp/ddpm_digits.py --workdir runs/digits_vp --sampler pc
    python main.py --mode sample     --config configs/vp/ddpm_digits_cond.py --workdir runs/cond --sampler dpm_solver --config.sampling.class_label=3 --config.sampling.guidance_scale=2.0
    python main.py --mode likelihood --config configs/vp/ddpm_digits.py --workdir runs/digits_vp
    python main.py --mode train_classifier --config configs/vp/ddpm_digits.py --workdir runs/digits_vp
    python main.py --mode inpaint    --config configs/vp/ddpm_digits.py --workdir runs/digits_vp
    python main.py --mode eval       --config configs/vp/ddpm_digits.py --workdir runs/digits_vp --sampler dpm_solver
    python main.py --mode ref_stats  --config configs/ve/ncsnpp_cifar.py --workdir runs/ncsnpp --config.eval.inception_path=inception-2015-12-05.pt
    python main.py --mode compare    --workdir runs/digits_vp,runs/digits_ve
    python main.py --mode demo       --workdir runs/digits   # train VP + VE, sample, bits/dim, table
    python main.py --mode plan       --config configs/ve/ncsnpp_church256.py [--budget_gb=24] [--workdir runs/church]

train: run_lib.train.train (resuming from <workdir>/checkpoints/latest.pt); sample and
likelihood: run_lib.evaluate with the EMA weights (sample: the class labels and guidance of
config.sampling, classifier guidance with --classifier; run_lib.compose.guided_score_fn) (bits/dim for images, nats next to the true
NLL for the toy mixtures); train_classifier: run_lib.classifier.train_classifier (the
noise-conditional classifier of config.classifier for guidance, under <workdir>/classifier/,
resuming like train); inpaint: run_lib.inverse.inpaint (config.inpaint's inverse problem:
inpainting, colorization or super-resolution of test images, written to <workdir>/inpaint/);
eval and ref_stats: run_lib.quality (FID / KID / IS / precision-recall of config.eval.num_samples
samples in resumable chunks, sharded by seed under torchrun; reference statistics); compare: one table of several work directories (comma-separated
--workdir; no --config needed); plan: run_lib.plan's memory plan of a training step (the
largest per-device batch and batch_per_device for --budget_gb, with and without activation
checkpointing and bf16; plan.json into --workdir when given, the one mode without a
required --workdir). Any config value can be overridden, e.g.
--config.training.n_iters=500.

Bad input is reported before any work is done or any file is written, in one line on stderr
(``error: ...``, exit code 1; SCOREDIFF_TRACEBACK=1 shows the traceback): the config file,
unknown or old override keys and values of the wrong type (``parse_flags``), every config
value (run_lib.validate.validate_config), flags given to a mode that does not use them, the
work directory and the --checkpoint file.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys

from absl import app, flags
from ml_collections import config_flags

import samplers

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_enum("mode", "train", ["train", "sample", "likelihood", "compare", "demo",
                                    "train_classifier", "inpaint", "eval", "ref_stats", "plan"],
                  "train: fit the score model; sample: draw samples with --sampler; "
                  "likelihood: log-likelihood (bits/dim for images) of held-out data through the "
                  "probability-flow ODE; compare: one table of the results of several "
                  "comma-separated --workdir's; demo: the main job on the built-in digits "
                  "(train VP and VE models, sample with PC and ODE, compare bits/dim); "
                  "train_classifier: fit the noise-conditional classifier of config.classifier "
                  "on data perturbed by config.sde, for classifier guidance (written to "
                  "<workdir>/classifier/); inpaint: fill, colorize or super-resolve test "
                  "images with the trained run (config.inpaint; written to <workdir>/inpaint/); "
                  "eval: draw config.eval.num_samples samples with --sampler and the EMA "
                  "weights in resumable chunks (sharded under torchrun), then FID / KID / IS / "
                  "precision-recall against reference statistics (eval.json); ref_stats: make "
                  "those reference statistics (the training split, or --samples); plan: the "
                  "memory plan of a training step (run_lib.plan: largest per-device batch "
                  "for --budget_gb with / without checkpointing and bf16; plan.json into "
                  "--workdir if given).")
flags.DEFINE_integer("demo_steps", 1500, "Training steps of each --mode demo model.")
flags.DEFINE_string("workdir", None, "Work directory for config, logs, weights and results "
                    "(--mode compare: a comma-separated list).")
flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS),
                  "Sampler of --mode sample (default: config.sampling.method).")
flags.DEFINE_string("checkpoint", None, "--mode sample / likelihood: a checkpoint file instead "
                    "of <workdir>/checkpoints/latest.pt: ours, or one of the official Score SDE "
                    "code (e.g. a published checkpoint_26.pth; converted on load).")
flags.DEFINE_string("classifier", None, "--mode sample: classifier guidance with this "
                    "--mode train_classifier checkpoint (or a work directory: its "
                    "classifier/checkpoints/latest.pt); default: none, or with "
                    "config.sampling.guidance='classifier' <workdir>/classifier/checkpoints/"
                    "latest.pt.")
flags.DEFINE_string("samples", None, "--mode eval: measure this .npz of uint8 images "
                    "('images' N,C,H,W or 'arr_0' N,H,W,C) instead of sampling; --mode ref_stats: "
                    "make the reference statistics of this .npz instead of the training split.")
flags.DEFINE_string("budget_gb", None, "--mode plan: GPU memory budget(s) in GiB, comma-"
                    "separated (default: a table for 16, 24, 40, 80).")
#: Modes that run without --workdir (every other one needs it).
NO_WORKDIR_MODES = ("plan",)

#: The modes that use each optional flag; given to another mode it is an error.
FLAG_MODES = {"config": ("train", "sample", "likelihood", "train_classifier", "inpaint", "eval",
                         "ref_stats", "plan"), "budget_gb": ("plan",),
              "sampler": ("sample", "eval"),
              "checkpoint": ("sample", "likelihood", "inpaint", "eval"), "demo_steps": ("demo",),
              "classifier": ("sample", "eval"), "samples": ("eval", "ref_stats")}


# ----------------------------------------------------------------------------- flags

_CONFIG_ARG = re.compile(r"^--?config(=|$)")
_OVERRIDE_ARG = re.compile(r"^--?(?:no)?config\.([^=]+)")
_VALUE_ERROR = re.compile(r"^flag --config\.([^=]+)=(.*?): (.*)$", re.S)
#: How a message names the type of a config value.
_KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
          tuple: "a tuple, e.g. '(1, 2)'"}


def _config_argument(argv: list[str]) -> str | None:
    """The value of --config in ``argv`` (the last one), or None."""
    found = None
    for i, arg in enumerate(argv):
        if _CONFIG_ARG.match(arg):
            found = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv)
                                                             else "")
    return found


def _value_error(error: flags.Error, config) -> str:
    """absl's 'flag --config.x.y=v: <reason>' as one line that names the key's type."""
    found = _VALUE_ERROR.match(str(error))
    if not found or config is None:
        return " ".join(str(error).split())
    path, value, reason = found.groups()
    *groups, leaf = path.split(".")
    parent = config
    for part in groups:
        parent = parent[part]
    try:
        field_type = parent.get_ref(leaf).get_type()     # also of a typed None placeholder
    except (AttributeError, KeyError, TypeError):
        field_type = type(parent[leaf])
    kind = _KINDS.get(field_type, field_type.__name__)
    return (f"--config.{path}={value}: config.{path} takes {kind}, and {value!r} is not one "
            f"({' '.join(reason.split())})")


def _flag_error(error: flags.Error, config) -> str:
    """One line for an error of absl's flag parsing."""
    message = str(error)
    if "is not supported for overriding" in message:
        field = re.search(r"field (config\.[\w.]+)", message)
        name = field.group(1) if field else "this config value"
        return (f"--{name} cannot be set on the command line: its value in the config file is "
                f"None, which ml_collections cannot type; set it in the config file (or declare "
                f"it ml_collections.config_dict.placeholder(<type>) there)")
    if message.startswith("flag --config."):
        return _value_error(error, config)
    order = re.match(r"Found (\S+) in argv before a value for --config", message)
    if order:
        return f"{order.group(1)} comes before --config: pass --config <file> first, then overrides"
    return f"{' '.join(message.split())} (python main.py --helpshort lists the flags)"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's flags_parser) with every error one line: a missing or
    broken config file and unknown or old override keys are found before ml_collections
    parses them (run_lib.validate), a value of the wrong type names the key's type."""
    from run_lib.validate import ConfigError, check_override_key, load_config_file
    try:
        args = FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error as error:
        raise ConfigError(_flag_error(error, None)) from None
    path = _config_argument(args)
    config = load_config_file(path) if path is not None else None
    for arg in args:
        override = _OVERRIDE_ARG.match(arg)
        if override and config is None:
            raise ConfigError(f"{arg} overrides a value of the config file, but no --config "
                              "was given: pass --config <file> before it (--mode compare "
                              "and demo take no config)")
        if override:
            check_override_key(config, override.group(1), flag=arg)
    try:
        return FLAGS(argv)
    except flags.Error as error:
        raise ConfigError(_flag_error(error, config)) from None


def _check_flags(mode: str) -> None:
    """Each optional flag given is one that ``mode`` uses."""
    from run_lib.validate import ConfigError
    if FLAGS.workdir is None and mode not in NO_WORKDIR_MODES:
        raise ConfigError(f"--mode {mode} needs --workdir (e.g. --workdir runs/digits)")
    for name, modes in FLAG_MODES.items():
        if FLAGS[name].present and mode not in modes:
            raise ConfigError(f"--{name} applies to --mode {' / '.join(modes)}, not --mode "
                              f"{mode}: drop it")
    if mode in FLAG_MODES["config"] and FLAGS.config is None:
        raise ConfigError(f"--mode {mode} needs --config (e.g. configs/vp/ddpm_digits.py)")


def _checked_config(mode: str):
    """The --config, validated for ``mode`` with the flags, the work directory and the
    --checkpoint file, before any work (run_lib.validate)."""
    from run_lib import validate
    _check_flags(mode)
    validate.validate_config(FLAGS.config, mode, sampler=FLAGS.sampler,
                             classifier=FLAGS.classifier is not None)
    if FLAGS.workdir is not None or mode not in NO_WORKDIR_MODES:
        validate.check_workdir(FLAGS.workdir)
    if FLAGS.checkpoint is not None:
        validate.check_checkpoint_file(FLAGS.checkpoint)
    return FLAGS.config


# ----------------------------------------------------------------------------- modes

def run_train() -> dict | None:
    """Train (or resume); under torchrun only rank 0 reports."""
    config = _checked_config("train")
    from run_lib.train import train
    metrics = train(config, FLAGS.workdir)
    metrics.pop("losses")
    return metrics if int(os.environ.get("RANK", "0")) == 0 else None


def run_train_classifier() -> dict:
    """Train (or resume) the noise-conditional classifier of config.classifier."""
    config = _checked_config("train_classifier")
    from run_lib.classifier import train_classifier
    metrics = train_classifier(config, FLAGS.workdir)
    return {key: metrics[key] for key in ("step", "start_step", "loss", "seconds_per_step",
                                          "test")}


def run_sample() -> dict:
    config = _checked_config("sample")
    from run_lib import evaluate
    return evaluate.sample(config, FLAGS.workdir, method=FLAGS.sampler,
                           checkpoint=FLAGS.checkpoint, classifier=FLAGS.classifier)


def run_likelihood() -> dict:
    config = _checked_config("likelihood")
    from run_lib import evaluate
    return evaluate.likelihood(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint)


def run_inpaint() -> dict:
    """config.inpaint's inverse problem on the run's EMA weights (run_lib.inverse)."""
    config = _checked_config("inpaint")
    from run_lib.inverse import inpaint
    return inpaint(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint)


def run_eval() -> dict | None:
    """Sample quality of the run (or of --samples); under torchrun only rank 0 reports."""
    config = _checked_config("eval")
    from run_lib.quality import evaluate
    return evaluate(config, FLAGS.workdir, method=FLAGS.sampler, samples=FLAGS.samples,
                    checkpoint=FLAGS.checkpoint, classifier=FLAGS.classifier)


def run_ref_stats() -> dict:
    """Reference statistics of the training split (or of --samples) for --mode eval."""
    config = _checked_config("ref_stats")
    from run_lib.quality import ref_stats
    return ref_stats(config, FLAGS.workdir, samples=FLAGS.samples)


def run_plan() -> str:
    """The memory plan of a training step of the config (run_lib.plan); plan.json into
    --workdir when given."""
    from run_lib import plan
    budgets = plan.check_budgets(FLAGS.budget_gb if FLAGS.budget_gb is not None
                                 else plan.DEFAULT_BUDGETS_GB)
    config = _checked_config("plan")
    report = plan.plan(config, budgets, log=logging.info)
    text = plan.format_plan(report)
    if FLAGS.workdir is not None:
        text += f"\nwritten: {plan.write_plan(report, FLAGS.workdir)}"
    return text


def run_compare() -> str:
    _check_flags("compare")
    from run_lib.evaluate import compare_workdirs
    from run_lib.validate import ConfigError
    workdirs = [w for w in FLAGS.workdir.split(",") if w.strip()]
    if not workdirs:
        raise ConfigError("--mode compare needs work directories: --workdir runs/a,runs/b")
    return compare_workdirs(workdirs)


def run_demo() -> str:
    _check_flags("demo")
    from run_lib import validate
    from run_lib.demo import DEMO_RUNS, demo_config
    from run_lib.demo import run_demo as demo
    for name in DEMO_RUNS:     # the demo's configs, as it builds them, before any work
        config = demo_config(name, n_iters=FLAGS.demo_steps)
        for mode, sampler in (("train", None), ("sample", "pc"), ("sample", "ode"),
                              ("likelihood", None)):
            validate.validate_config(config, mode, sampler=sampler)
    validate.check_workdir(FLAGS.workdir)
    return demo(FLAGS.workdir, n_iters=FLAGS.demo_steps)


MODES = {"train": run_train, "sample": run_sample, "likelihood": run_likelihood,
         "compare": run_compare, "demo": run_demo, "train_classifier": run_train_classifier,
         "inpaint": run_inpaint, "eval": run_eval, "ref_stats": run_ref_stats, "plan": run_plan}


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = MODES[FLAGS.mode]()
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2))


#: Errors that mean bad input (a config value or key, a config file, a flag, a missing or
#: unreadable file or checkpoint, absent data, a non-finite loss, an optional dependency that
#: cannot be imported): reported in one line.
#: Set SCOREDIFF_TRACEBACK=1 to see the traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, pickle.UnpicklingError, ImportError)


def one_line(error: BaseException) -> str:
    """The one-line message of a user error."""
    message = " ".join(str(error).split())
    return message or type(error).__name__


if __name__ == "__main__":
    try:
        app.run(main, flags_parser=parse_flags)
    except USER_ERRORS as error:
        if os.environ.get("SCOREDIFF_TRACEBACK"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(1)
