"""Command-line entry point: one function per mode.

    python main.py --mode train      --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode sample     --config configs/toy/vp_mixture.py --workdir runs/toy_vp --sampler ode
    python main.py --mode likelihood --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode train      --config configs/vp/ddpm_digits.py --workdir runs/digits_vp

    python main.py --mode sample     --config configs/vp/ddpm_digits.py --workdir runs/digits_vp --sampler pc
    python main.py --mode likelihood --config configs/vp/ddpm_digits.py --workdir runs/digits_vp
    python main.py --mode compare    --workdir runs/digits_vp,runs/digits_ve
    python main.py --mode demo       --workdir runs/digits   # train VP + VE, sample, bits/dim, table

Image configs (config.data.name in digits, cifar10, mnist, folder) train with
run_lib.train.train (resuming from <workdir>/checkpoints/latest.pt), sample and compute
bits/dim of the test split with the EMA weights (run_lib.evaluate). --mode compare prints
one table of several work directories (comma-separated --workdir; no --config needed).

Any config value can be overridden, e.g. --config.training.n_iters=500.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_enum("mode", "train", ["train", "sample", "likelihood", "compare", "demo"],
                  "train: fit the score model; sample: draw samples with --sampler; "
                  "likelihood: log-likelihood (bits/dim for images) of held-out data through the "
                  "probability-flow ODE; compare: one table of the results of several "
                  "comma-separated --workdir's; demo: the main job on the built-in digits "
                  "(train VP and VE models, sample with PC and ODE, compare bits/dim).")
flags.DEFINE_integer("demo_steps", 1500, "Training steps of each --mode demo model.")
flags.DEFINE_string("workdir", None, "Work directory for config, logs, weights and results "
                    "(--mode compare: a comma-separated list).")
flags.DEFINE_enum("sampler", None, ["pc", "ald", "ode", "ddim", "dpm_solver", "edm",
                                       "dpm_adaptive"],
                  "Sampler of --mode sample (default: config.sampling.method).")
flags.DEFINE_string("checkpoint", None, "--mode sample / likelihood: a checkpoint file instead "
                    "of <workdir>/checkpoints/latest.pt: ours, or one of the official Score SDE "
                    "code (e.g. a published checkpoint_26.pth; converted on load).")
flags.mark_flags_as_required(["workdir"])

#: config.data.name values trained by run_lib.train.train (the rest are toy distributions).
IMAGE_DATASETS = ("digits", "cifar10", "mnist", "folder")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if FLAGS.mode == "demo":
        from run_lib.demo import run_demo
        print(run_demo(FLAGS.workdir, n_iters=FLAGS.demo_steps))
        return
    if FLAGS.mode == "compare":
        from run_lib.evaluate import compare_workdirs
        print(compare_workdirs([w for w in FLAGS.workdir.split(",") if w]))
        return
    config = FLAGS.config
    if config is None:
        raise app.UsageError(f"--mode {FLAGS.mode} needs --config (e.g. configs/vp/ddpm_digits.py)")
    import run_lib
    if config.data.name in IMAGE_DATASETS:
        from run_lib import evaluate
        if FLAGS.mode == "train":
            from run_lib.train import train
            metrics = train(config, FLAGS.workdir)
            metrics.pop("losses")
            if int(os.environ.get("RANK", "0")) != 0:   # torchrun: rank 0 reports
                return
        elif FLAGS.mode == "sample":
            metrics = evaluate.sample_images(config, FLAGS.workdir, method=FLAGS.sampler,
                                             checkpoint=FLAGS.checkpoint)
        else:
            metrics = evaluate.likelihood_images(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    elif FLAGS.mode == "train":
        metrics = run_lib.train_toy(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        metrics = run_lib.sample_toy(config, FLAGS.workdir, method=FLAGS.sampler)
    else:
        metrics = run_lib.likelihood_toy(config, FLAGS.workdir)
    print(json.dumps(metrics, indent=2))


#: Errors that mean bad input (a missing file or checkpoint, a wrong config value, an unknown
#: config key): reported in one line. Set SCOREDIFF_TRACEBACK=1 to see the traceback.
USER_ERRORS = (FileNotFoundError, ValueError, KeyError, AttributeError, FloatingPointError)


def _one_line(error: BaseException, argv: list[str]) -> str:
    """The message for a user error; an unknown --config.<key> override names the argument."""
    if isinstance(error, (AttributeError, KeyError)):
        overrides = [a for a in argv if a.startswith("--config.")]
        key = str(error).strip("'\"")
        for arg in overrides:
            path = arg[len("--"):].split("=", 1)[0]
            if path.split(".")[-1] == key or f".{key}." in f"{path}.":
                return (f"unknown config key in {arg}: {path!r} does not exist in the config "
                        "(see config.json of a run, or the config file, for the valid keys)")
    return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    try:
        app.run(main)
    except USER_ERRORS as error:
        if os.environ.get("SCOREDIFF_TRACEBACK"):
            raise
        print(f"error: {_one_line(error, sys.argv)}", file=sys.stderr)
        sys.exit(1)
