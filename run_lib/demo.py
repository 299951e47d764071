"""The main job on the built-in digits: train a small VP and a small VE model, sample each with
the PC sampler and the probability-flow ODE, compute their bits/dim through the ODE, and put
them side by side (main.py --mode demo).

    <root>/vp/ and <root>/ve/   work directories of the two runs (checkpoints, grids, JSON)
    <root>/comparison.md        the table of compare_workdirs, with the Gaussian-fit baseline
    <root>/demo_times.json      seconds per phase (train, each sampler, likelihood) and in all

On a CPU with at least two torch threads the two runs go to two processes at once, each
with its share of the threads: the 0.68 M-parameter U-Net on 8x8 images gains little from a
second thread (bench/README.md, "The demo"), so two one-thread runs side by side finish
well before two two-thread runs in a row. On a GPU, or with one thread, they run in turn.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import json
import logging
import multiprocessing
import time
from pathlib import Path

import torch

from . import evaluate
from .train import train
from .utils import pick_device
from .validate import check_override_key

__all__ = ["DEMO_RUNS", "DEMO_SETTINGS", "demo_config", "run_demo", "run_one"]

log = logging.getLogger(__name__)

#: run name -> config module of the demo.
DEMO_RUNS = {"vp": "configs.vp.ddpm_digits", "ve": "configs.ve.ddpm_digits"}

#: What the demo sets on top of each run's config (before the caller's overrides), per run;
#: each setting is measured on the 1500-step demo models in bench/README.md ("The demo"):
#: the PC sampler without the Langevin corrector (which made these models' samples worse),
#: the ODE sampler at rtol 1e-4, and the likelihood ODE at the loosest tolerance within
#: 0.001 bits/dim of rtol 1e-5 (VP 1e-3, VE 1e-4). Training is not shortened: it costs
#: bits/dim.
_SHARED_SETTINGS = {"sampling.pc.corrector": "none",
                    "sampling.ode.rtol": 1e-4, "sampling.ode.atol": 1e-4}
DEMO_SETTINGS = {"vp": {**_SHARED_SETTINGS, "eval.rtol": 1e-3, "eval.atol": 1e-3},
                 "ve": {**_SHARED_SETTINGS, "eval.rtol": 1e-4, "eval.atol": 1e-4}}


def demo_config(name: str, *, n_iters: int, overrides: dict | None = None):
    """The config of demo run ``name`` with ``n_iters`` training steps, DEMO_SETTINGS[name] and
    dotted overrides ({"sampling.num_samples": 64, ...}), in that order."""
    config = importlib.import_module(DEMO_RUNS[name]).get_config()
    config.training.n_iters = n_iters
    config.training.snapshot_freq = n_iters
    config.training.sample_freq = n_iters          # one grid of the final EMA weights
    config.training.eval_freq = max(1, n_iters // 10)
    settings = {**DEMO_SETTINGS[name], **(overrides or {})}
    for key in settings:
        check_override_key(config, key)     # ConfigError naming the closest key
    config.update_from_flattened_dict(settings)
    return config


def run_one(name: str, workdir, *, n_iters: int, samplers=("pc", "ode"), progress: bool = True,
            overrides: dict | None = None) -> dict:
    """Train, sample and evaluate demo run ``name`` in ``workdir``; returns the seconds of
    each phase ({"train": ..., "pc": ..., "ode": ..., "likelihood": ..., "total": ...})."""
    config = demo_config(name, n_iters=n_iters, overrides=overrides)
    workdir = Path(workdir)
    seconds, start = {}, time.perf_counter()
    log.info("demo: training %s (%s, %d steps) in %s", name, DEMO_RUNS[name], n_iters, workdir)
    train(config, workdir, progress=progress)
    seconds["train"] = time.perf_counter() - start
    for method in samplers:
        begin = time.perf_counter()
        metrics = evaluate.sample(config, workdir, method=method, progress=progress)
        seconds[method] = time.perf_counter() - begin
        log.info("demo: %s %s: NFE %d, %.1f s, pixel FD %.4f", name, method, metrics["nfe"],
                 metrics["seconds"], metrics.get("pixel_fd_to_test", float("nan")))
    begin = time.perf_counter()
    metrics = evaluate.likelihood(config, workdir, progress=progress)
    seconds["likelihood"] = time.perf_counter() - begin
    seconds["total"] = time.perf_counter() - start
    log.info("demo: %s: %.3f +- %.3f bits/dim (Gaussian fit %.3f; NFE %.0f); %.0f s in all",
             name, metrics["bits_per_dim"], metrics["bits_per_dim_standard_error"],
             metrics["gaussian_fit_bits_per_dim"], metrics["nfe_mean"], seconds["total"])
    return {key: round(value, 1) for key, value in seconds.items()}


def _run_in_worker(name: str, workdir: str, threads: int, log_level: int, kwargs: dict) -> dict:
    """``run_one`` in a spawned process with ``threads`` torch threads, logging like the
    parent with the run's name in every line."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s [{name}] %(message)s")
    return run_one(name, workdir, **kwargs)


def _runs_in_parallel(config) -> bool:
    """Side by side when the runs use the CPU and there is a thread for each."""
    device = pick_device(config.get("device", "auto"))
    return device.type == "cpu" and torch.get_num_threads() >= len(DEMO_RUNS)


def run_demo(root, *, n_iters: int = 1500, samplers=("pc", "ode"), progress: bool = True,
             overrides: dict | None = None, parallel: bool | None = None) -> str:
    """Train, sample and evaluate every run of DEMO_RUNS under ``root``; returns the table.

    ``parallel``: run the runs in one process each (torch.get_num_threads() // runs threads
    apiece), or in turn in this process; None: in parallel on a CPU with a thread per run.
    A run whose work directory already holds a finished checkpoint resumes (or skips)
    training, so the demo can be interrupted and started again.
    """
    root = Path(root)
    workdirs = {name: root / name for name in DEMO_RUNS}
    kwargs = dict(n_iters=n_iters, samplers=tuple(samplers), overrides=overrides)
    if parallel is None:
        parallel = _runs_in_parallel(demo_config(next(iter(DEMO_RUNS)), n_iters=n_iters,
                                                 overrides=overrides))
    start = time.perf_counter()
    if parallel:
        threads = max(1, torch.get_num_threads() // len(DEMO_RUNS))
        log.info("demo: %d runs side by side, %d torch thread(s) each", len(DEMO_RUNS), threads)
        level = logging.getLogger().getEffectiveLevel()
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=len(DEMO_RUNS), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(_run_in_worker, name, str(workdir), threads, level,
                                         dict(kwargs, progress=False))
                       for name, workdir in workdirs.items()}
            seconds = {name: future.result() for name, future in futures.items()}
    else:
        seconds = {name: run_one(name, workdir, progress=progress, **kwargs)
                   for name, workdir in workdirs.items()}
    times = {"runs": seconds, "parallel": bool(parallel), "threads": torch.get_num_threads(),
             "total": round(time.perf_counter() - start, 1)}
    table = evaluate.compare_workdirs(list(workdirs.values()))
    (root / "comparison.md").write_text(table + "\n")
    (root / "demo_times.json").write_text(json.dumps(times, indent=2) + "\n")
    log.info("demo: %.0f s in all (%s)", times["total"],
             "runs side by side" if parallel else "runs in turn")
    return table
