"""Command-line entry point: one function per mode.

    python main.py --mode train      --config configs/toy/vp_mixture.py --workdir runs/toy_vp
    python main.py --mode sample     --config configs/toy/vp_mixture.py --workdir runs/toy_vp --sampler ode
    python main.py --mode likelihood --config configs/toy/vp_mixture.py --workdir runs/toy_vp

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


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = FLAGS.config
    if "dim" not in config.data:
        raise app.UsageError("only the toy configs (configs/toy/) run so far; the image "
                             "pipelines are not built yet")
    import run_lib
    if FLAGS.mode == "train":
        metrics = run_lib.train_toy(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        metrics = run_lib.sample_toy(config, FLAGS.workdir, method=FLAGS.sampler)
    else:
        metrics = run_lib.likelihood_toy(config, FLAGS.workdir)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(main)
