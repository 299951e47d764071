"""Command-line entry point: one function per mode.

    python main.py --mode train      --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode sample     --config configs/toy/vp_mixture.py --workdir runs/toy_vp --sampler ode
    python main.py --mode likelihood --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode train      --config configs/vp/ddpm_digits.py --workdir runs/digits_vp

    python main.py --mode sample     --config configs/vp/ddpm_digits.py --workdir runs/digits_vp --sampler pc
    python main.py --mode likelihood --config configs/vp/ddpm_digits.py --workdir runs/digits_vp
    python main.py --mode compare    --workdir runs/digits_vp,runs/digits_ve

Image configs (config.data.name in digits, cifar10, mnist, folder) train with
run_lib.train.train (resuming from <workdir>/checkpoints/latest.pt), sample and compute
bits/dim of the test split with the EMA weights (run_lib.evaluate). --mode compare prints
one table of several work directories (comma-separated --workdir; no --config needed).

Any config value can be overridden, e.g. --config.training.n_iters=500.
"""
from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_enum("mode", "train", ["train", "sample", "likelihood", "compare"],
                  "train: fit the score model; sample: draw samples with --sampler; "
                  "likelihood: log-likelihood (bits/dim for images) of held-out data through the "
                  "probability-flow ODE; compare: one table of the results of several "
                  "comma-separated --workdir's.")
flags.DEFINE_string("workdir", None, "Work directory for config, logs, weights and results "
                    "(--mode compare: a comma-separated list).")
flags.DEFINE_enum("sampler", None, ["pc", "ald", "ode", "ddim", "dpm_solver", "edm",
                                       "dpm_adaptive"],
                  "Sampler of --mode sample (default: config.sampling.method).")
flags.mark_flags_as_required(["workdir"])

#: config.data.name values trained by run_lib.train.train (the rest are toy distributions).
IMAGE_DATASETS = ("digits", "cifar10", "mnist", "folder")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
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
        elif FLAGS.mode == "sample":
            metrics = evaluate.sample_images(config, FLAGS.workdir, method=FLAGS.sampler)
        else:
            metrics = evaluate.likelihood_images(config, FLAGS.workdir)
    elif FLAGS.mode == "train":
        metrics = run_lib.train_toy(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        metrics = run_lib.sample_toy(config, FLAGS.workdir, method=FLAGS.sampler)
    else:
        metrics = run_lib.likelihood_toy(config, FLAGS.workdir)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(main)
