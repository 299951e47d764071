"""Command-line entry point: one function per mode.

    python main.py --mode train      --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode sample     --config configs/toy/vp_mixture.py --workdir runs/toy_vp --sampler ode
    python main.py --mode likelihood --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode train      --config configs/vp/ddpm_digits.py --workdir runs/digits_vp

Image configs (config.data.name in digits, cifar10, mnist, folder) train with
run_lib.train.train (resuming from <workdir>/checkpoints/latest.pt); their sample and
likelihood modes are not built yet.

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
flags.DEFINE_enum("mode", "train", ["train", "sample", "likelihood"],
                  "train: fit the score model; sample: draw samples with --sampler; "
                  "likelihood: log-likelihood of held-out data through the probability-flow ODE.")
flags.DEFINE_string("workdir", None, "Work directory for config, logs, weights and results.")
flags.DEFINE_enum("sampler", None, ["pc", "ald", "ode", "ddim", "dpm_solver", "edm",
                                       "dpm_adaptive"],
                  "Sampler of --mode sample (default: config.sampling.method).")
flags.mark_flags_as_required(["config", "workdir"])

#: config.data.name values trained by run_lib.train.train (the rest are toy distributions).
IMAGE_DATASETS = ("digits", "cifar10", "mnist", "folder")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = FLAGS.config
    import run_lib
    if config.data.name in IMAGE_DATASETS:
        if FLAGS.mode != "train":
            raise app.UsageError(f"--mode {FLAGS.mode} is not built yet for image data "
                                 f"(config.data.name={config.data.name!r}); only --mode train")
        from run_lib.train import train
        metrics = train(config, FLAGS.workdir)
        metrics.pop("losses")
    elif FLAGS.mode == "train":
        metrics = run_lib.train_toy(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        metrics = run_lib.sample_toy(config, FLAGS.workdir, method=FLAGS.sampler)
    else:
        metrics = run_lib.likelihood_toy(config, FLAGS.workdir)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(main)
