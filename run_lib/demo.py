"""The main job on the built-in digits: train a small VP and a small VE model, measure the
sample quality of each with the PC sampler, the probability-flow ODE and the few-step
DPM-Solver (digits FID / IS / KID / precision / recall of run_lib.quality), compute their
bits/dim through the ODE, and put them side by side (main.py --mode demo).

    <root>/vp/ and <root>/ve/   work directories of the two runs (checkpoints, JSON)
    <root>/*/eval_<sampler>.json and .png   sample quality of --mode eval and its first 100
                                samples; the chunks of samples in eval_<sampler>/
    <root>/comparison.md        the table of compare_workdirs, with the Gaussian-fit baseline
    <root>/demo_times.json      seconds per phase (train, each sampler, likelihood) and in all

Sample quality is measured on DEMO_SETTINGS' eval.num_samples samples per sampler (500:
PC at 1000 NFE draws about 1.2 images/s on one CPU thread, so 500 cost the demo about five
minutes more than the 100 pixel-FD samples before; bench/digits_quality.py measures 2000)
against the reference statistics of the 1500 training digits in the digits classifier's
feature space. FID at N = 500 is biased upward against N = 2000 (README, "Sample quality").

On a CPU with at least two torch threads the two runs go to two processes at once, each
with its share of the threads: the 0.68 M-parameter U-Net on 8x8 images gains little from a
second thread (bench/README.md, "The demo"), so two one-thread runs side by side finish
well before two two-thread runs in a row. On a GPU, or with one thread, they run in turn.
The digits classifier and the reference statistics are made (when absent) before the runs
start, so the two processes never write them at once.
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

from . import evaluate, quality
from .train import train
from .utils import pick_device
from .validate import check_override_key, validate_config

__all__ = ["DEMO_RUNS", "DEMO_SAMPLERS", "DEMO_SETTINGS", "SHARED_SETTINGS", "apply_settings",
           "demo_config", "prepare_quality", "run_demo", "run_one"]

log = logging.getLogger(__name__)

#: run name -> config module of the demo.
DEMO_RUNS = {"vp": "configs.vp.ddpm_digits", "ve": "configs.ve.ddpm_digits"}

#: The samplers whose sample quality the demo measures, each with its config options:
#: PC (1000 steps), the probability-flow ODE (dopri5) and DPM-Solver++ 2M at its default
#: 20 steps (21 NFE).
DEMO_SAMPLERS = ("pc", "ode", "dpm_solver")

#: What the demo sets on top of each run's config (before the caller's overrides), per run;
#: each setting is measured on the 1500-step demo models in bench/README.md ("The demo"):
#: the PC sampler without the Langevin corrector (which made these models' samples worse),
#: the ODE sampler at rtol 1e-4, and the likelihood ODE at the loosest tolerance within
#: 0.001 bits/dim of rtol 1e-5 (VP 1e-3, VE 1e-4). Training is not shortened: it costs
#: bits/dim. Sample quality on 500 samples per sampler (one chunk; see the module docstring).
SHARED_SETTINGS = {"sampling.pc.corrector": "none",
                   "sampling.ode.rtol": 1e-4, "sampling.ode.atol": 1e-4,
                   "eval.num_samples": 500, "eval.sample_batch": 500}
DEMO_SETTINGS = {"vp": {**SHARED_SETTINGS, "eval.rtol": 1e-3, "eval.atol": 1e-3},
                 "ve": {**SHARED_SETTINGS, "eval.rtol": 1e-4, "eval.atol": 1e-4}}


def apply_settings(config, *, n_iters: int, settings: dict):
    """``config`` trained for ``n_iters`` steps (one checkpoint and one picture at the end,
    ten test-loss evaluations) with the dotted ``settings`` ({"eval.num_samples": 500, ...})
    applied; an unknown key is a ConfigError naming the closest one."""
    config.training.n_iters = n_iters
    config.training.snapshot_freq = n_iters
    config.training.sample_freq = n_iters          # one grid of the final EMA weights
    config.training.eval_freq = max(1, n_iters // 10)
    for key in settings:
        check_override_key(config, key)
    config.update_from_flattened_dict(settings)
    return config


def demo_config(name: str, *, n_iters: int, overrides: dict | None = None):
    """The config of demo run ``name`` with ``n_iters`` training steps, DEMO_SETTINGS[name] and
    dotted overrides ({"eval.num_samples": 64, ...}), in that order."""
    config = importlib.import_module(DEMO_RUNS[name]).get_config()
    return apply_settings(config, n_iters=n_iters,
                          settings={**DEMO_SETTINGS[name], **(overrides or {})})


def prepare_quality(config, *, progress: bool = False) -> Path:
    """Make the digits classifier and the reference statistics of config's evaluation when
    absent (on the CPU: the statistics do not depend on the device); returns the statistics'
    path. Called once before the runs start, so parallel runs only read them."""
    extractor = quality.build_extractor(config, torch.device("cpu"))
    path = quality.reference_path(config, extractor)
    if not path.is_file():
        quality.make_reference(config, extractor, device=torch.device("cpu"), path=path,
                               progress=progress)
    return path


def run_one(name: str, workdir, *, n_iters: int, samplers=DEMO_SAMPLERS, progress: bool = True,
            overrides: dict | None = None) -> dict:
    """Train demo run ``name`` in ``workdir``, measure the sample quality of each sampler
    (run_lib.quality.evaluate: eval_<sampler>.json / .png) and the bits/dim; returns the
    seconds of each phase ({"train": ..., "pc": ..., "likelihood": ..., "total": ...})."""
    config = demo_config(name, n_iters=n_iters, overrides=overrides)
    workdir = Path(workdir)
    seconds, start = {}, time.perf_counter()
    log.info("demo: training %s (%s, %d steps) in %s", name, DEMO_RUNS[name], n_iters, workdir)
    train(config, workdir, progress=progress)
    seconds["train"] = time.perf_counter() - start
    for method in samplers:
        begin = time.perf_counter()
        result = quality.evaluate(config, workdir, method=method, progress=progress)
        seconds[method] = time.perf_counter() - begin
        log.info("demo: %s %s: NFE %d, FID %.3f, IS %.2f over %d samples, %.0f s", name, method,
                 result["protocol"]["nfe"], result["fid"], result.get("is", float("nan")),
                 result["num_samples"], seconds[method])
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


def _check_configs(n_iters: int, samplers, overrides: dict | None) -> None:
    """Every run's config for every mode the demo runs: one ConfigError before any work."""
    for name in DEMO_RUNS:
        config = demo_config(name, n_iters=n_iters, overrides=overrides)
        validate_config(config, "train")
        validate_config(config, "likelihood")
        for method in samplers:
            validate_config(config, "eval", sampler=method)


def run_demo(root, *, n_iters: int = 1500, samplers=DEMO_SAMPLERS, progress: bool = True,
             overrides: dict | None = None, parallel: bool | None = None) -> str:
    """Train, evaluate and compare every run of DEMO_RUNS under ``root``; returns the table.

    ``parallel``: run the runs in one process each (torch.get_num_threads() // runs threads
    apiece), or in turn in this process; None: in parallel on a CPU with a thread per run.
    A run whose work directory already holds a finished checkpoint resumes (or skips)
    training, and sample chunks already drawn are reused, so the demo can be interrupted
    and started again.
    """
    root = Path(root)
    workdirs = {name: root / name for name in DEMO_RUNS}
    kwargs = dict(n_iters=n_iters, samplers=tuple(samplers), overrides=overrides)
    _check_configs(n_iters, samplers, overrides)
    first = demo_config(next(iter(DEMO_RUNS)), n_iters=n_iters, overrides=overrides)
    if parallel is None:
        parallel = _runs_in_parallel(first)
    start = time.perf_counter()
    prepare_quality(first, progress=progress)
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
