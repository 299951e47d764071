"""The main job on the built-in digits: train a small VP and a small VE model, sample each with
the PC sampler and the probability-flow ODE, compute their bits/dim through the ODE, and put
them side by side (main.py --mode demo).

    <root>/vp/ and <root>/ve/   work directories of the two runs (checkpoints, grids, JSON)
    <root>/comparison.md        the table of compare_workdirs, with the Gaussian-fit baseline
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from . import evaluate
from .train import train

__all__ = ["DEMO_RUNS", "demo_config", "run_demo"]

log = logging.getLogger(__name__)

#: run name -> config module of the demo.
DEMO_RUNS = {"vp": "configs.vp.ddpm_digits", "ve": "configs.ve.ddpm_digits"}


def demo_config(name: str, *, n_iters: int, overrides: dict | None = None):
    """The config of demo run ``name`` with ``n_iters`` training steps and dotted overrides
    ({"sampling.num_samples": 64, ...})."""
    config = importlib.import_module(DEMO_RUNS[name]).get_config()
    config.training.n_iters = n_iters
    config.training.snapshot_freq = n_iters
    config.training.sample_freq = n_iters          # one grid of the final EMA weights
    config.training.eval_freq = max(1, n_iters // 10)
    for key, value in (overrides or {}).items():
        group, _, field = key.rpartition(".")
        target = config
        for part in filter(None, group.split(".")):
            target = target[part]
        target[field] = value
    return config


def run_demo(root, *, n_iters: int = 1500, samplers=("pc", "ode"), progress: bool = True,
             overrides: dict | None = None) -> str:
    """Train, sample and evaluate every run of DEMO_RUNS under ``root``; returns the table.

    A run whose work directory already holds a finished checkpoint resumes (or skips)
    training, so the demo can be interrupted and started again.
    """
    root = Path(root)
    workdirs = []
    for name in DEMO_RUNS:
        config = demo_config(name, n_iters=n_iters, overrides=overrides)
        workdir = root / name
        log.info("demo: training %s (%s, %d steps) in %s", name, DEMO_RUNS[name], n_iters, workdir)
        train(config, workdir, progress=progress)
        for method in samplers:
            metrics = evaluate.sample(config, workdir, method=method, progress=progress)
            log.info("demo: %s %s: NFE %d, %.1f s, pixel FD %.4f", name, method, metrics["nfe"],
                     metrics["seconds"], metrics.get("pixel_fd_to_test", float("nan")))
        metrics = evaluate.likelihood(config, workdir, progress=progress)
        log.info("demo: %s: %.3f +- %.3f bits/dim (Gaussian fit %.3f)", name,
                 metrics["bits_per_dim"], metrics["bits_per_dim_standard_error"],
                 metrics["gaussian_fit_bits_per_dim"])
        workdirs.append(workdir)
    table = evaluate.compare_workdirs(workdirs)
    (root / "comparison.md").write_text(table + "\n")
    return table
