"""Command-line entry point: one function per mode, the same for every data set.

    python main.py --mode train      --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode sample     --config configs/toy/vp_mixture.py --workdir runs/toy_vp --sampler ode
    python main.py --mode likelihood --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode train      --config configs/vp/ddpm_digits.py --workdir runs/digits_vp
    python main.py --mode sample     --config configs/vp/ddpm_digits.py --workdir runs/digits_vp --sampler pc
    python main.py --mode likelihood --config configs/vp/ddpm_digits.py --workdir runs/digits_vp
    python main.py --mode compare    --workdir runs/digits_vp,runs/digits_ve
    python main.py --mode demo       --workdir runs/digits   # train VP + VE, sample, bits/dim, table

train: run_lib.train.train (resuming from <workdir>/checkpoints/latest.pt); sample and
likelihood: run_lib.evaluate with the EMA weights (bits/dim for images, nats next to the true
NLL for the toy mixtures); compare: one table of several work directories (comma-separated
--workdir; no --config needed). Any config value can be overridden, e.g.
--config.training.n_iters=500.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

import samplers

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
flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS),
                  "Sampler of --mode sample (default: config.sampling.method).")
flags.DEFINE_string("checkpoint", None, "--mode sample / likelihood: a checkpoint file instead "
                    "of <workdir>/checkpoints/latest.pt: ours, or one of the official Score SDE "
                    "code (e.g. a published checkpoint_26.pth; converted on load).")
flags.mark_flags_as_required(["workdir"])


def _config():
    """The --config, or a usage error naming an example."""
    if FLAGS.config is None:
        raise app.UsageError(f"--mode {FLAGS.mode} needs --config (e.g. configs/vp/ddpm_digits.py)")
    return FLAGS.config


def run_train() -> dict | None:
    """Train (or resume); under torchrun only rank 0 reports."""
    from run_lib.train import train
    metrics = train(_config(), FLAGS.workdir)
    metrics.pop("losses")
    return metrics if int(os.environ.get("RANK", "0")) == 0 else None


def run_sample() -> dict:
    from run_lib import evaluate
    return evaluate.sample(_config(), FLAGS.workdir, method=FLAGS.sampler,
                           checkpoint=FLAGS.checkpoint)


def run_likelihood() -> dict:
    from run_lib import evaluate
    return evaluate.likelihood(_config(), FLAGS.workdir, checkpoint=FLAGS.checkpoint)


def run_compare() -> str:
    from run_lib.evaluate import compare_workdirs
    return compare_workdirs([w for w in FLAGS.workdir.split(",") if w])


def run_demo() -> str:
    from run_lib.demo import run_demo as demo
    return demo(FLAGS.workdir, n_iters=FLAGS.demo_steps)


MODES = {"train": run_train, "sample": run_sample, "likelihood": run_likelihood,
         "compare": run_compare, "demo": run_demo}


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = MODES[FLAGS.mode]()
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2))


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
