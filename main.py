"""Command-line entry point: one function per mode.

    python main.py --mode train --config configs/toy/vp_mixture.py --workdir runs/toy_vp

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
flags.DEFINE_enum("mode", "train", ["train", "sample", "likelihood"], "What to run.")
flags.DEFINE_string("workdir", None, "Work directory for config, logs and weights.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = FLAGS.config
    if FLAGS.mode == "train":
        if "dim" not in config.data:
            raise app.UsageError("only the toy configs (configs/toy/) can be trained so far")
        import run_lib
        metrics = run_lib.train_toy(config, FLAGS.workdir)
        print(json.dumps(metrics, indent=2))
    else:
        raise app.UsageError(f"--mode {FLAGS.mode} is not implemented yet (samplers issue)")


if __name__ == "__main__":
    app.run(main)
