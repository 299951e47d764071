"""The GPU benchmark: every check that needs CUDA, as one prepared run (issue 14 item 5, issue 15).

    bash bench/gpu.sh                      # on a CUDA machine: < 8 min, JSON + markdown table
    bash bench/gpu.sh --dry-run            # every size shrunk: runs on a CPU in about a minute
    python bench/gpu.py --sections train_step,pc_sample --out my.json

Sections, each in its own subprocess under a wall-clock limit (a hanging or crashing section
loses only itself; what it had measured so far is kept, it writes its results as it goes):

  cuda_tests     pytest -m cuda tests/test_cuda.py: bf16 step vs fp32, no host sync per
                 training step, CUDA RNG state in checkpoints + resume, DDP over nccl,
                 torch.compile of NCSN++ vs eager
  train_step     NCSN++ cont. (configs/ve/ncsnpp_cifar.py), batch 128, 32x32, run_lib.train's
                 train_step: fp32 / bf16 / bf16 + torch.compile + channels_last: images/s,
                 step ms, peak memory, model FLOPs (FlopCounterMode, one step) and MFU
  official_step  the official score_sde_pytorch NCSN++ step (losses.get_step_fn, their
                 configs/ve/cifar10_ncsnpp_continuous.py) on the same random batch size;
                 needs bench/official/ (bash bench/get_official.sh), skipped without it
  pc_sample      PC sampling (reverse diffusion + Langevin, snr 0.16), 1000 steps = 2000 NFE,
                 100 CIFAR-sized images, random weights (speed only): seconds (target 85 s)
  dpm_solver     DPM-Solver++ 2M at 20 NFE (19 steps + the final Tweedie step), same: seconds
  bits_per_dim   samplers.bits_per_dim of 100 images, Hutchinson, dopri5 rtol = atol = 1e-5:
                 seconds and NFE (random weights: the NFE is not a trained model's)
  memory_plan    NCSN++ 256 px (configs/ve/ncsnpp_church256.py): training-step memory at
                 batch 1 and 2 extrapolated to batch B vs measured at B
                 (torch.cuda.max_memory_allocated), and run_lib.plan.predict_memory(config, B)
                 when that function exists

Writes one JSON file ($OUT/gpu.json when $OUT is set, else bench/results/gpu.json; --out)
and prints markdown tables. Statuses: ok, skipped (with the reason), partial (stopped at its
inner deadline; extrapolated numbers say so), failed (a check failed), timeout (killed at its
limit; partial results kept), error (crashed; the log's tail is kept).

--dry-run shrinks every size (tiny NCSN++, 16 px, a few steps) so that the whole run takes
about a minute on a CPU; CUDA-only parts run on the CPU where they can, else they are
reported as skipped with the reason. Its numbers are no benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OFFICIAL = BENCH / "official" / "score_sde_pytorch"
# bench/ holds a models.py: never let it shadow the project's (or the official) models package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

#: (name, wall-clock limit in seconds on the GPU, title), in the order they run: the quick
#: ones first; time a section leaves unused goes to those after it, so the two that compile
#: NCSN++ (train_step, cuda_tests) come last. The limits add up to TOTAL_BUDGET_S.
SECTIONS = [
    ("official_step", 45, "official score_sde_pytorch step"),
    ("dpm_solver", 20, "DPM-Solver, 20 NFE"),
    ("pc_sample", 85, "PC sampling, 2000 NFE"),
    ("bits_per_dim", 50, "bits/dim through the ODE"),
    ("memory_plan", 40, "memory plan, NCSN++ 256 px"),
    ("train_step", 110, "NCSN++ training step"),
    ("cuda_tests", 120, "CUDA tests (pytest -m cuda)"),
]
TOTAL_BUDGET_S = 470          # the whole run stays under 8 minutes
DRY_LIMIT_S = 120             # per section in --dry-run (a loaded CPU)
DRY_BUDGET_S = 600

#: Dense (no sparsity) peak throughput of the SXM H100 / H200, FLOP/s.
PEAKS = {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}
PEAK_GPUS = ("H100", "H200")


# ============================================================================ helpers

class Recorder:
    """The section's result dict, written to ``path`` (atomically) after every change, so a
    section killed at its limit leaves what it had measured."""

    def __init__(self, path: Path | None):
        self.path, self.data = path, {"status": "running", "results": {}, "notes": []}

    def set(self, key, value) -> None:
        self.data["results"][key] = value
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def status(self, status: str, reason: str | None = None) -> None:
        self.data["status"] = status
        if reason:
            self.data["reason"] = reason
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


class DeadlineReached(Exception):
    """Raised by TimedScore when the section's inner deadline has passed."""


class TimedScore:
    """score_fn that counts its calls and raises DeadlineReached once the host clock passes
    ``deadline`` (perf_counter seconds), so a long sampler stops with a partial measurement
    before the section is killed."""

    def __init__(self, score_fn, deadline: float):
        self.score_fn, self.deadline, self.nfe = score_fn, deadline, 0

    def __call__(self, x, t, *args, **kwargs):
        if time.perf_counter() > self.deadline:
            raise DeadlineReached
        self.nfe += 1
        return self.score_fn(x, t, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.score_fn, name)


def torch_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def gpu_peaks():
    """{dtype: FLOP/s} of the H100 / H200 (dense), or None on other devices."""
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return dict(PEAKS) if any(g in name for g in PEAK_GPUS) else None


def cifar_ncsnpp_config(dry: bool):
    """configs/ve/ncsnpp_cifar.py (62.8M parameters); dry: nf 16, 16 px, 2 levels, 1 block,
    N = 4 levels of the SDE grid."""
    from configs.ve.ncsnpp_cifar import get_config
    config = get_config()
    config.device = str(torch_device())
    if dry:
        config.model.nf = 16
        config.model.ch_mult = (1, 2)
        config.model.num_res_blocks = 1
        config.model.attn_resolutions = (8,)
        config.data.image_size = 16
        config.sde.num_scales = 4
    return config


def image_shape(config, batch: int) -> tuple[int, ...]:
    return (batch, int(config.data.num_channels), int(config.data.image_size),
            int(config.data.image_size))


def model_flops(run_once) -> int:
    """FLOPs (matmuls, convolutions, attention) counted by FlopCounterMode during one call."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        run_once()
    return int(counter.get_total_flops())


def time_steps(step, n: int, device) -> float:
    """Seconds for n calls of ``step`` (synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - start


def throughput_row(*, images: int, seconds: float, steps: int, flops_per_step: int | None,
                   peak_key: str, device) -> dict:
    import torch
    row = {"images_per_s": round(images * steps / seconds, 2),
           "step_ms": round(1e3 * seconds / steps, 3), "timed_steps": steps}
    if device.type == "cuda":
        row["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
    if flops_per_step:
        achieved = flops_per_step * steps / seconds
        row["tflops_per_s"] = round(achieved / 1e12, 3)
        peaks = gpu_peaks()
        if peaks:
            row["mfu"] = round(achieved / peaks[peak_key], 4)
            row["peak_used"] = f"{peak_key} {peaks[peak_key] / 1e12:.0f} TFLOP/s"
            if peak_key == "fp32":       # cuDNN convolutions run in TF32 by default
                row["mfu_vs_tf32"] = round(achieved / peaks["tf32"], 4)
    return row


# ============================================================================ sections

def section_cuda_tests(rec: Recorder, dry: bool, limit: float) -> None:
    """pytest -m cuda tests/test_cuda.py, in this process (torch is imported already); each
    test's outcome is recorded as it finishes."""
    import pytest
    import torch
    args = ["-m", "cuda", "tests/test_cuda.py", "-v", "-rs", "-p", "no:cacheprovider"]
    rec.set("command", "pytest " + " ".join(args))
    outcomes, reasons = {}, {}

    class Collector:
        def pytest_runtest_logreport(self, report):
            name = report.nodeid.split("::", 1)[-1]
            if report.when == "call" or report.outcome != "passed":
                outcome = report.outcome.upper()
                if report.when != "call" and report.outcome == "failed":
                    outcome = "ERROR"
                outcomes[name] = outcome
                if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                    reasons[name] = report.longrepr[2]
                elif report.outcome == "failed":
                    reasons[name] = str(report.longrepr)[-1500:]
                rec.set("tests", outcomes)

    os.chdir(ROOT)
    rc = int(pytest.main(args, plugins=[Collector()]))
    rec.set("counts", {k: sum(v == k for v in outcomes.values())
                       for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")})
    if reasons:
        rec.set("reasons", reasons)
    if not outcomes:
        rec.status("error", f"pytest exit code {rc}; no test ran")
    elif not torch.cuda.is_available() and all(v == "SKIPPED" for v in outcomes.values()):
        rec.status("skipped", f"no CUDA device: the {len(outcomes)} cuda tests were collected "
                              "and skipped")
    elif rc == 0 and all(v in ("PASSED", "SKIPPED") for v in outcomes.values()):
        rec.status("ok")
    else:
        rec.status("failed", f"pytest exit code {rc}: " + ", ".join(
            k for k, v in outcomes.items() if v in ("FAILED", "ERROR")))


def _our_step_setup(config, device, *, channels_last: bool, compile_model: bool, batch: int):
    import torch
    from run_lib import compose
    from run_lib.state import build_train_state
    from run_lib.train import DistContext, Objective, train_step
    ctx = DistContext()
    state = build_train_state(config, device, ctx)
    sde = compose.build_sde(config)
    model = state.model
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    objective = Objective(config, sde, net, ctx, device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(image_shape(config, batch), generator=generator, device=device)
    x = x.contiguous(memory_format=fmt)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    state.model.train()
    last = {}

    def step():
        last["stats"] = train_step(state, x, labels, objective)
    return step, last


def _count_parameters(config) -> int:
    from run_lib import compose
    return sum(p.numel() for p in compose.build_model(config).parameters())


def section_train_step(rec: Recorder, dry: bool, limit: float) -> None:
    import torch
    device = torch_device()
    batch, timed, warm = (4, 2, 1) if dry else (128, 10, 2)
    config = cifar_ncsnpp_config(dry)
    config.training.batch_size = batch
    rec.set("config", {"model": "configs/ve/ncsnpp_cifar.py" + (" (shrunk: dry run)" if dry else ""),
                       "batch": batch, "image_size": int(config.data.image_size),
                       "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                       "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                       "cudnn_benchmark": torch.backends.cudnn.benchmark})
    variants = [("fp32", "no", False, False), ("bf16", "bf16", False, False),
                ("bf16+compile+channels_last", "bf16", True, True)]
    flops = None
    for name, precision, compile_model, channels_last in variants:
        if dry and compile_model:
            rec.set(name, {"status": "skipped", "reason": "torch.compile is not run in "
                           "--dry-run (minutes of compilation on a CPU); channels_last and "
                           "bf16 ran below as 'bf16+channels_last'"})
            name, compile_model = "bf16+channels_last", False
        cfg = copy.deepcopy(config)
        cfg.training.mixed_precision = precision
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        step, last = _our_step_setup(cfg, device, channels_last=channels_last,
                                     compile_model=compile_model, batch=batch)
        if flops is None:       # the same FLOPs for every variant: count once, eager fp32
            rec.set("parameters", _count_parameters(config))
            flops = model_flops(step)
            rec.set("flops_per_step", flops)
            rec.set("flops_per_image_forward_approx", round(flops / batch / 3))
        first = time_steps(step, 1, device)      # compilation happens here
        for _ in range(warm - 1):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_steps(step, timed, device)
        row = throughput_row(images=batch, seconds=seconds, steps=timed, flops_per_step=flops,
                             peak_key="fp32" if precision == "no" else "bf16", device=device)
        row["first_step_s"] = round(first, 3)
        loss = float(last["stats"].loss)
        row["loss"] = loss
        row["status"] = "ok" if math.isfinite(loss) else "failed"
        rec.set(name, row)
        del step, last
    bad = [k for k, v in rec.data["results"].items() if isinstance(v, dict)
           and v.get("status") == "failed"]
    rec.status("failed" if bad else "ok", f"non-finite loss: {bad}" if bad else None)


def _import_official():
    """The official code's modules, its compiled ops replaced by their pure-PyTorch
    fallbacks: op/__init__ builds op/upfirdn2d and op/fused_act with
    torch.utils.cpp_extension.load at import time; it is imported with ``load`` stubbed out,
    and op.upfirdn2d then always takes their own upfirdn2d_native path (which they use on
    the CPU). fused_act is imported by op/__init__ only, never used by NCSN++."""
    import torch
    import torch.utils.cpp_extension as cpp_extension
    sys.path.insert(0, str(OFFICIAL))
    for name in ("models", "sde_lib", "configs", "losses", "op", "utils"):
        if name in sys.modules:
            raise RuntimeError(f"module {name} imported before the official code")
    real_load = cpp_extension.load
    cpp_extension.load = lambda *args, **kwargs: None
    try:
        import op
    finally:
        cpp_extension.load = real_load
    native = sys.modules["op.upfirdn2d"].upfirdn2d_native

    def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
        return native(input, kernel, up, up, down, down, pad[0], pad[1], pad[0], pad[1])
    op.upfirdn2d = upfirdn2d
    import losses
    import sde_lib
    from models import ncsnpp  # noqa: F401  (registers 'ncsnpp')
    from models import utils as mutils
    from models.ema import ExponentialMovingAverage
    from models import up_or_down_sampling
    assert up_or_down_sampling.upfirdn2d is upfirdn2d
    return losses, sde_lib, mutils, ExponentialMovingAverage, torch


def section_official_step(rec: Recorder, dry: bool, limit: float) -> None:
    if not (OFFICIAL / "losses.py").exists():
        shown = OFFICIAL.relative_to(ROOT) if OFFICIAL.is_relative_to(ROOT) else OFFICIAL
        rec.status("skipped", f"{shown} is absent (CI has no copy): run "
                              "`bash bench/get_official.sh`, and carry bench/official on the "
                              "device")
        return
    losses, sde_lib, mutils, EMA, torch = _import_official()
    commit = (OFFICIAL / "COMMIT").read_text().strip() if (OFFICIAL / "COMMIT").exists() else None
    device = torch_device()
    from configs.ve import cifar10_ncsnpp_continuous as official_config
    config = official_config.get_config()
    config.device = device
    batch, timed, warm = (4, 2, 1) if dry else (128, 10, 2)
    if dry:
        config.model.nf = 16
        config.model.ch_mult = (1, 2)
        config.model.num_res_blocks = 1
        config.model.attn_resolutions = (8,)
        config.data.image_size = 16
        config.model.num_scales = 4
    rec.set("config", {"source": "score_sde_pytorch configs/ve/cifar10_ncsnpp_continuous.py"
                       + (" (shrunk: dry run)" if dry else ""), "commit": commit,
                       "batch": batch, "ops": "upfirdn2d_native (their pure-PyTorch path)",
                       "optimizer": "torch.optim.Adam (their get_optimizer; not fused)",
                       "wrapper": "torch.nn.DataParallel (their create_model)"})
    torch.manual_seed(0)
    model = mutils.create_model(config)
    ema = EMA(model.parameters(), decay=config.model.ema_rate)
    optimizer = losses.get_optimizer(config, model.parameters())
    state = dict(optimizer=optimizer, model=model, ema=ema, step=0)
    sde = sde_lib.VESDE(sigma_min=config.model.sigma_min, sigma_max=config.model.sigma_max,
                        N=config.model.num_scales)
    step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(config),
                                 reduce_mean=config.training.reduce_mean, continuous=True,
                                 likelihood_weighting=config.training.likelihood_weighting)
    size = config.data.image_size
    generator = torch.Generator(device=device).manual_seed(0)
    batch_x = torch.rand((batch, 3, size, size), generator=generator, device=device)
    last = {}

    def step():
        last["loss"] = step_fn(state, batch_x)
    rec.set("parameters", sum(p.numel() for p in model.parameters()))
    flops = model_flops(step)
    rec.set("flops_per_step", flops)
    for _ in range(warm):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(step, timed, device)
    row = throughput_row(images=batch, seconds=seconds, steps=timed, flops_per_step=flops,
                         peak_key="fp32", device=device)
    row["loss"] = float(last["loss"])
    rec.set("fp32", row)
    rec.status("ok" if math.isfinite(row["loss"]) else "failed")


def _sampling_setup(dry: bool):
    """(config, sde, model in eval mode, score_fn, device) of NCSN++ cont. with random
    weights (the config's initialisation)."""
    import torch
    from run_lib import compose
    device = torch_device()
    config = cifar_ncsnpp_config(dry)
    torch.manual_seed(0)
    model = compose.build_model(config).to(device).eval()
    sde = compose.build_sde(config)
    return config, sde, model, compose.build_score_fn(config, sde, model), device


def _timed_sampler(rec: Recorder, key: str, run, score_fn, device, deadline: float,
                   total_nfe: int | None) -> dict:
    """Run ``run(timed_score)``; seconds, NFE, s/NFE. Past the deadline: the NFE done, and
    the seconds extrapolated to ``total_nfe`` (status partial)."""
    timed = TimedScore(score_fn, deadline)
    sync(device)
    start = time.perf_counter()
    row = {}
    try:
        result = run(timed)
        sync(device)
        seconds = time.perf_counter() - start
        row.update(status="ok", seconds=round(seconds, 3), nfe=int(result.nfe))
        row["result"] = result
    except DeadlineReached:
        sync(device)
        seconds = time.perf_counter() - start
        row.update(status="partial", seconds_done=round(seconds, 3), nfe_done=timed.nfe)
        if total_nfe and timed.nfe:
            row["seconds_extrapolated"] = round(seconds * total_nfe / timed.nfe, 2)
    nfe = row.get("nfe") or row.get("nfe_done")
    if nfe:
        row["ms_per_nfe"] = round(1e3 * seconds / nfe, 3)
    return row


def _warm_up(score_fn, sde, shape, device):
    """One network call at the benchmark's batch (cuDNN / allocator warm-up)."""
    import torch
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        score_fn(x, torch.full((shape[0],), 0.5, device=device))
    sync(device)


def section_pc_sample(rec: Recorder, dry: bool, limit: float) -> None:
    import torch
    import samplers
    config, sde, model, score_fn, device = _sampling_setup(dry)
    shape = image_shape(config, 2 if dry else 100)
    steps = int(config.sde.num_scales)
    rec.set("setting", {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16,
                        "n_steps": 1, "steps": steps, "images": shape[0],
                        "image_size": shape[-1], "dtype": "float32", "weights": "random"})
    _warm_up(score_fn, sde, shape, device)
    begin = time.perf_counter()
    deadline = begin + limit - 15
    generator = torch.Generator(device=device).manual_seed(0)

    def run(fn):
        return samplers.pc_sample(fn, sde, shape, predictor="reverse_diffusion",
                                  corrector="langevin", snr=0.16, n_steps=1,
                                  generator=generator, device=device)
    row = _timed_sampler(rec, "fp32", run, score_fn, device, deadline, total_nfe=2 * steps)
    result = row.pop("result", None)
    if result is not None:
        row["finite"] = bool(torch.isfinite(result.x).all())
    row["target_s"] = 85.0
    seconds = row.get("seconds", row.get("seconds_extrapolated"))
    if seconds is not None and not dry:
        row["meets_target"] = seconds <= 85.0
    rec.set("fp32", row)
    # bf16 autocast of the network, a tenth of the steps, extrapolated (if time is left)
    left = deadline - time.perf_counter()
    if row["status"] == "ok" and left > 0.15 * row["seconds"] + 5:
        from run_lib import compose
        from run_lib.distributed import NetworkForward
        bf16_score = compose.build_score_fn(config, sde, NetworkForward(model,
                                                                        amp_dtype=torch.bfloat16))
        short = copy.deepcopy(config)
        short.sde.num_scales = max(steps // 10, 2)
        short_sde = compose.build_sde(short)

        def run_bf16(fn):
            return samplers.pc_sample(fn, short_sde, shape, snr=0.16, generator=generator,
                                      device=device)
        _warm_up(bf16_score, sde, shape, device)
        bf = _timed_sampler(rec, "bf16", run_bf16, bf16_score, device, deadline, None)
        bf.pop("result", None)
        if bf["status"] == "ok":
            bf["steps"] = int(short.sde.num_scales)
            bf["seconds_extrapolated_all_steps"] = round(bf["seconds"] * steps / bf["steps"], 2)
        rec.set("bf16_autocast_short", bf)
    rec.status(row["status"], "stopped at the inner deadline; seconds extrapolated"
               if row["status"] == "partial" else None)


def section_dpm_solver(rec: Recorder, dry: bool, limit: float) -> None:
    import torch
    import samplers
    config, sde, model, score_fn, device = _sampling_setup(dry)
    shape = image_shape(config, 2 if dry else 100)
    steps = 3 if dry else 19
    rec.set("setting", {"algorithm": "dpmsolver++", "order": 2, "multistep": True,
                        "num_steps": steps, "final_denoise_step": True, "images": shape[0],
                        "dtype": "float32", "weights": "random"})
    _warm_up(score_fn, sde, shape, device)
    deadline = time.perf_counter() + limit - 5
    runs = []
    for repeat in range(3):
        generator = torch.Generator(device=device).manual_seed(repeat)

        def run(fn):
            return samplers.dpm_solver_sample(fn, sde, shape, num_steps=steps, order=2,
                                              generator=generator, device=device)
        row = _timed_sampler(rec, "dpm", run, score_fn, device, deadline, total_nfe=steps + 1)
        row.pop("result", None)
        runs.append(row)
        if row["status"] != "ok":
            break
    done = [r["seconds"] for r in runs if r["status"] == "ok"]
    summary = {"runs": runs, "nfe": runs[0].get("nfe", runs[0].get("nfe_done"))}
    if done:
        summary.update(seconds=min(done), seconds_median=sorted(done)[len(done) // 2])
        if summary["nfe"]:
            summary["ms_per_nfe"] = round(1e3 * min(done) / summary["nfe"], 3)
    rec.set("fp32", summary)
    rec.status("ok" if done else "partial")


def section_bits_per_dim(rec: Recorder, dry: bool, limit: float) -> None:
    import torch
    import samplers
    config, sde, model, score_fn, device = _sampling_setup(dry)
    shape = image_shape(config, 2 if dry else 100)
    centered = bool(config.data.centered)
    rec.set("setting", {"images": shape[0], "trace": "hutchinson", "method": "dopri5",
                        "rtol": 1e-5, "atol": 1e-5, "eps": 1e-5, "centered": centered,
                        "weights": "random (init_scale 0: a near-zero score; the NFE is not "
                                   "that of a trained model, ms/NFE is what transfers)"})
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)
    _warm_up(score_fn, sde, shape, device)
    deadline = time.perf_counter() + limit - 10

    def run(fn):
        return samplers.bits_per_dim(fn, sde, images, centered=centered, generator=generator)
    row = _timed_sampler(rec, "bpd", run, score_fn, device, deadline, total_nfe=None)
    result = row.pop("result", None)
    if result is not None:
        bpd = result.bpd.double()
        row["bpd_mean"] = round(float(bpd.mean()), 4)
        row["finite"] = bool(torch.isfinite(bpd).all())
    rec.set("fp32", row)
    rec.status(row["status"] if row.get("finite", True) else "failed",
               "stopped at the inner deadline" if row["status"] == "partial" else None)


def memory_config(dry: bool):
    """NCSN++ at 256 px: configs/ve/ncsnpp_church256.py, else ncsnpp_celebahq256.py, else
    the Score SDE church settings on the CIFAR-10 default. dry: nf 8, 32 px, 3 levels."""
    import importlib
    config, source = None, None
    for name in ("configs.ve.ncsnpp_church256", "configs.ve.ncsnpp_celebahq256"):
        try:
            config, source = importlib.import_module(name).get_config(), name
            break
        except ImportError:
            continue
    if config is None:
        config, source = cifar_ncsnpp_config(False), "configs/ve/ncsnpp_cifar.py + church 256 settings"
        config.data.image_size = 256
        config.model.update(dict(ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, dropout=0.0,
                                 progressive="output_skip", progressive_input="input_skip"))
        config.sde.sigma_max = 380.0
    config.device = str(torch_device())
    if dry:
        config.model.nf = 8
        config.model.ch_mult = (1, 2, 2)
        config.data.image_size = 32
        source += " (shrunk: dry run)"
    config.training.mixed_precision = "no"
    if "batch_per_device" in config.training:
        config.training.batch_per_device = 0
    return config, source


def _saved_tensor_bytes(run) -> int:
    """Bytes of the distinct storages saved for backward during ``run`` (the activations
    autograd keeps), parameters excluded."""
    import torch
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def section_memory_plan(rec: Recorder, dry: bool, limit: float) -> None:
    import torch
    from run_lib import compose
    from run_lib.state import build_train_state
    from run_lib.train import DistContext, Objective, train_step
    device = torch_device()
    config, source = memory_config(dry)
    ctx = DistContext()
    state = build_train_state(config, device, ctx)
    sde = compose.build_sde(config)
    objective = Objective(config, sde, state.model, ctx, device)
    state.model.train()
    params = sum(p.numel() for p in state.model.parameters())
    rec.set("config", {"source": source, "image_size": int(config.data.image_size),
                       "parameters": params, "precision": "fp32", "optimizer": "Adam (fused)"})
    cuda = device.type == "cuda"

    def step(b):
        x = torch.rand(image_shape(config, b), device=device)
        labels = torch.zeros(b, dtype=torch.long, device=device)
        train_step(state, x, labels, objective)

    def measured(b):
        """Peak bytes above what is allocated before the step (weights, Adam moments)."""
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(b)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, base

    def saved(b):
        x = torch.rand(image_shape(config, b), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        return _saved_tensor_bytes(lambda: objective.loss(x, torch.zeros(
            b, dtype=torch.long, device=device), gen))

    step(1)                     # Adam moments exist from here on
    s1, s2 = saved(1), saved(2)
    per_image_saved = s2 - s1
    rec.set("saved_for_backward", {"batch_1_gib": gib(s1), "batch_2_gib": gib(s2),
                                   "per_image_gib": gib(per_image_saved)})
    target = None
    if cuda:
        (m1, base), (m2, _) = measured(1), measured(2)
        per_image, fixed = m2 - m1, m1 - (m2 - m1)
        total = torch.cuda.get_device_properties(device).total_memory
        rec.set("extrapolation", {"base_gib": gib(base), "step_peak_batch1_gib": gib(m1),
                                  "step_peak_batch2_gib": gib(m2),
                                  "per_image_gib": gib(per_image), "fixed_gib": gib(fixed),
                                  "device_total_gib": gib(total)})
        fits = [b for b in (64, 32, 16, 8, 4) if base + fixed + b * per_image < 0.6 * total]
        for target in fits:
            predicted = fixed + target * per_image
            try:
                got, _ = measured(target)
            except torch.cuda.OutOfMemoryError:
                rec.note(f"batch {target}: out of memory")
                continue
            rec.set("at_batch", {"batch": target, "predicted_gib": gib(predicted),
                                 "measured_gib": gib(got), "predicted_bytes": int(predicted),
                                 "measured_bytes": int(got),
                                 "relative_error": round((predicted - got) / got, 4),
                                 "predicted_saved_tensors_gib": gib(s1 + (target - 1) * per_image_saved)})
            break
    else:
        target = 4
        s_target = saved(target)
        predicted = s1 + (target - 1) * per_image_saved
        rec.set("at_batch", {"batch": target, "method": "saved-for-backward bytes (CPU)",
                             "predicted_gib": gib(predicted), "measured_gib": gib(s_target),
                             "predicted_bytes": int(predicted), "measured_bytes": int(s_target),
                             "relative_error": round((predicted - s_target) / s_target, 4)})
        rec.set("cuda_measurement", "skipped: no CUDA device (torch.cuda.max_memory_allocated)")
    try:
        from run_lib import plan
        predict = getattr(plan, "predict_memory")
    except (ImportError, AttributeError):
        rec.set("plan_hook", "run_lib.plan.predict_memory absent: nothing to compare")
    else:
        try:
            value = predict(config, target)
        except Exception as error:      # another helper's function: record, do not fail
            value = f"raised {type(error).__name__}: {error}"[:500]
        entry = {"batch": target, "value": value}
        at = rec.data["results"].get("at_batch", {})
        number = value if isinstance(value, (int, float)) else None
        if isinstance(value, dict):
            number = next((value[k] for k in ("total_bytes", "bytes", "activation_bytes",
                                              "peak_bytes") if k in value), None)
        if number is not None and cuda and at.get("measured_gib"):
            entry["ratio_to_measured_step_peak"] = round(number / 2**30 / at["measured_gib"], 4)
        rec.set("plan_hook", entry)
    rec.status("ok" if target else "failed", None if target else "no batch fitted")


SECTION_FUNCTIONS = {
    "env": lambda *args: section_env(*args),      # defined below, with environment()
    "cuda_tests": section_cuda_tests, "train_step": section_train_step,
    "official_step": section_official_step, "pc_sample": section_pc_sample,
    "dpm_solver": section_dpm_solver, "bits_per_dim": section_bits_per_dim,
    "memory_plan": section_memory_plan,
}


def run_section(name: str, dry: bool, limit: float, result: Path | None) -> int:
    rec = Recorder(result)
    rec.flush()
    try:
        if name == "official_step":
            _forget_project_modules()
        elif str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        import torch
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        SECTION_FUNCTIONS[name](rec, dry, limit)
    except Exception as error:       # the parent records it; other sections go on
        rec.data["traceback"] = traceback.format_exc()[-4000:]
        rec.status("error", f"{type(error).__name__}: {error}"[:500])
        return 1
    return 0


# ============================================================================ the parent

def section_env(rec: Recorder, dry: bool, limit: float) -> None:
    """Versions and the device, read in a child (the parent never touches CUDA: it forks)."""
    for key, value in environment().items():
        rec.set(key, value)
    rec.status("ok")


def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "host": platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=gib(props.total_memory),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))))
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    peaks = gpu_peaks()
    env["peak_flops"] = ({k: f"{v / 1e12:.0f} TFLOP/s" for k, v in peaks.items()}
                         if peaks else "unknown device: no MFU")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True,
                                           timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _preload() -> None:
    """Import torch and the project once in the parent (not CUDA: nothing here touches the
    driver), so that each forked section starts at once instead of paying seconds of imports."""
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401
    import pytest  # noqa: F401
    import samplers  # noqa: F401
    import configs.ve.ncsnpp_cifar  # noqa: F401
    from run_lib import compose, state, train  # noqa: F401


def _forget_project_modules() -> None:
    """For the official code: drop the project's modules and path entry whose names it
    shares (models, sde_lib, configs, ...)."""
    if not OFFICIAL.is_dir():
        return
    names = {p.stem for p in OFFICIAL.glob("*.py")} | {p.name for p in OFFICIAL.iterdir()
                                                         if p.is_dir()}
    for module in list(sys.modules):
        if module.split(".")[0] in names:
            del sys.modules[module]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]


def spawn_section(name: str, dry: bool, limit: float, folder: Path) -> dict:
    """Run one section in a forked child (its own session, output to a log file) under
    ``limit`` seconds of wall clock; killed with its process group when it runs over."""
    result, log = folder / f"{name}.json", folder / f"{name}.log"
    start = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                    # the child
        code = 1
        try:
            os.setsid()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = run_section(name, dry, limit, result)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    rc = None
    while rc is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
        elif time.perf_counter() - start > limit:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = "timeout"
        else:
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    try:
        entry = json.loads(result.read_text())
    except (OSError, ValueError):
        entry = {"status": "running", "results": {}, "notes": []}
    if rc == "timeout":
        entry["status"] = "timeout"
        entry["reason"] = f"killed at its limit of {limit:.0f} s; results so far kept"
    elif rc != 0 and entry.get("status") in ("running", "ok"):
        entry["status"] = "error"
        entry["reason"] = f"exit code {rc}"
    if entry["status"] in ("error", "timeout") or rc != 0:
        entry["log_tail"] = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    entry.update(seconds=round(seconds, 2), limit_s=round(limit, 1))
    return entry


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(report: dict) -> str:
    env, sections = report["env"], report["sections"]
    lines = [f"GPU benchmark ({'DRY RUN, shrunk sizes: no benchmark' if report['dry_run'] else 'full'}) "
             f"{report['started']}: {env.get('gpu', 'no GPU')}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda_runtime')}; total {report['total_seconds']:.0f} s", "",
             "| section | status | seconds | limit s | note |", "| --- | --- | --- | --- | --- |"]
    for name, title in ((n, t) for n, _, t in SECTIONS):
        if name not in sections:
            continue
        s = sections[name]
        note = s.get("reason", "")
        if name == "cuda_tests" and s["status"] != "skipped" and s.get("results", {}).get("counts"):
            note = (note + " " + ", ".join(f"{v} {k.lower()}" for k, v in
                                           s["results"]["counts"].items() if v)).strip()
        lines.append(f"| {name}: {title} | {s['status']} | {_fmt(s.get('seconds'), 1)} | "
                     f"{_fmt(s.get('limit_s'), 0)} | {note.replace('|', '/')[:160]} |")
    rows = []
    train = sections.get("train_step", {}).get("results", {})
    for key in ("fp32", "bf16", "bf16+compile+channels_last", "bf16+channels_last"):
        if isinstance(train.get(key), dict):
            rows.append((f"ours {key}", train[key]))
    official = sections.get("official_step", {}).get("results", {})
    if isinstance(official.get("fp32"), dict):
        rows.append(("official score_sde_pytorch fp32", official["fp32"]))
    if rows:
        lines += ["", "| training step | images/s | step ms | peak GiB | TFLOP/s | MFU | peak used |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, r in rows:
            if r.get("status") == "skipped":
                lines.append(f"| {label} | skipped | | | | | {r.get('reason', '')[:60]} |")
                continue
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
            lines.append(f"| {label} | {_fmt(r.get('images_per_s'), 1)} | {_fmt(r.get('step_ms'), 1)} | "
                         f"{_fmt(r.get('peak_memory_gib'))} | {_fmt(r.get('tflops_per_s'), 1)} | "
                         f"{mfu} | {r.get('peak_used', '-')} |")
    sample_rows = []
    for name, label in (("pc_sample", "PC (reverse diffusion + Langevin, snr 0.16)"),
                        ("dpm_solver", "DPM-Solver++ 2M"),
                        ("bits_per_dim", "bits/dim (dopri5, 1e-5, Hutchinson)")):
        results = sections.get(name, {}).get("results", {})
        r = results.get("fp32")
        setting = results.get("setting", {})
        if setting.get("images"):
            label += f", {setting['images']} images"
        if isinstance(r, dict):
            seconds = r.get("seconds", r.get("seconds_extrapolated"))
            extra = " (extrapolated)" if "seconds" not in r and seconds is not None else ""
            sample_rows.append(f"| {label} | {_fmt(seconds)}{extra} | "
                               f"{_fmt(r.get('nfe', r.get('nfe_done')))} | {_fmt(r.get('ms_per_nfe'))} |")
    bf = sections.get("pc_sample", {}).get("results", {}).get("bf16_autocast_short")
    if isinstance(bf, dict) and bf.get("seconds_extrapolated_all_steps"):
        steps = sections["pc_sample"]["results"].get("setting", {}).get("steps")
        sample_rows.append(f"| PC, bf16 autocast ({bf['steps']} of {steps} steps run) "
                           f"| {_fmt(bf['seconds_extrapolated_all_steps'])} (extrapolated) | "
                           f"{_fmt(bf.get('nfe'))} | {_fmt(bf.get('ms_per_nfe'))} |")
    if sample_rows:
        lines += ["", "| sampling (fp32, random weights) | seconds | NFE | ms/NFE |",
                  "| --- | --- | --- | --- |"] + sample_rows
    mem = sections.get("memory_plan", {}).get("results", {})
    if mem.get("at_batch"):
        a = mem["at_batch"]
        lines += ["", f"Memory plan ({mem.get('config', {}).get('source', '')}): batch {a['batch']}: "
                      f"predicted {_fmt(a['predicted_gib'])} GiB, measured {_fmt(a['measured_gib'])} GiB "
                      f"(relative error {_fmt(a['relative_error'], 3)}; {a.get('method', 'max_memory_allocated')}); "
                      f"plan hook: {mem.get('plan_hook', '-') if isinstance(mem.get('plan_hook'), str) else 'compared'}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="shrink every size (CPU)")
    parser.add_argument("--out", help="the JSON file (default $OUT/gpu.json or "
                                      "bench/results/gpu.json; gpu_dry_run.json for --dry-run)")
    parser.add_argument("--sections", help="comma-separated subset of: "
                                           + ", ".join(n for n, _, _ in SECTIONS))
    parser.add_argument("--budget", type=float, help="total seconds for all sections "
                                                     f"(default {TOTAL_BUDGET_S})")
    parser.add_argument("--section", help=argparse.SUPPRESS)      # internal: one section
    parser.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return run_section(args.section, args.dry_run, args.limit,
                           Path(args.result) if args.result else None)

    names = [n for n, _, _ in SECTIONS]
    chosen = names if not args.sections else [s.strip() for s in args.sections.split(",")]
    unknown = [s for s in chosen if s not in names]
    if unknown:
        parser.error(f"unknown sections {unknown}; valid: {', '.join(names)}")
    default_name = "gpu_dry_run.json" if args.dry_run else "gpu.json"
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / default_name
                                           if os.environ.get("OUT")
                                           else ROOT / "bench" / "results" / default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    # per-section scratch files outside out's folder ($OUT returns at most 8 files)
    folder = Path(tempfile.mkdtemp(prefix="gpu_sections_"))
    budget = args.budget or (DRY_BUDGET_S if args.dry_run else TOTAL_BUDGET_S)
    begin = time.perf_counter()
    _preload()
    env = spawn_section("env", args.dry_run, 60, folder)
    report = {"schema": 1, "dry_run": args.dry_run,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": budget, "env": env.get("results") or {"status": env["status"]},
              "sections": {}}
    plan = [(n, limit, title) for n, limit, title in SECTIONS if n in chosen]
    for index, (name, limit, title) in enumerate(plan):
        left = budget - (time.perf_counter() - begin)
        later = sum(nominal for _, nominal, _ in plan[index + 1:])
        limit = min(DRY_LIMIT_S if args.dry_run else max(limit, left - later), left)
        if limit < 5:
            report["sections"][name] = {"status": "skipped", "results": {},
                                        "reason": f"no time left of the {budget:.0f} s budget"}
            continue
        print(f"[gpu.py] {name}: {title} (limit {limit:.0f} s)", flush=True)
        report["sections"][name] = entry = spawn_section(name, args.dry_run, limit, folder)
        print(f"[gpu.py] {name}: {entry['status']} in {entry['seconds']:.1f} s"
              + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)
        report["total_seconds"] = round(time.perf_counter() - begin, 2)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    report["total_seconds"] = round(time.perf_counter() - begin, 2)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table + "\n")
    with open(out.with_suffix(".log"), "w") as logs:     # every section's full output
        for name in report["sections"]:
            path = folder / f"{name}.log"
            if path.exists():
                logs.write(f"===== {name}\n{path.read_text(errors='replace')}\n")
    shutil.rmtree(folder, ignore_errors=True)
    print(table)
    print(f"\n[gpu.py] wrote {out}, {out.with_suffix('.md').name} and {out.with_suffix('.log').name}")
    bad = [n for n, s in report["sections"].items() if s["status"] in ("failed", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
