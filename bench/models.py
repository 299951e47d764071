"""Score-network benchmark: throughput and peak memory per CIFAR-10 architecture (not a test).

    python bench/models.py [--quick] [--models ddpm,ncsnpp,...]
                           [--modes fp32,bf16,compile,bf16+compile]
                           [--batch B] [--device cpu|cuda] [--threads T] [--compile]
                           [--channels-last] [--repeats R] [--warmup W] [--out results.json]

For every CIFAR-10 config (``MODEL_CONFIGS``; 3 x 32 x 32 images) the network is built by
``compose.build_model`` and wrapped by ``compose.build_score_fn(config, sde, model)``, so what is
timed is one score evaluation ``score_fn(x, t)`` as a sampler or the training loss sees it
(the wrapper's noise-level conditioning and scaling included). Per model and mode:

* **fwd img/s**: eval mode, ``torch.no_grad()``, batch / median wall time of one call.
* **fwd+bwd img/s**: train mode (dropout on), a DSM-shaped loss ``sum(score_fn(x, t)**2)``
  (float32) and ``loss.backward()``; gradients set to None between calls.
* **peak MiB**: CUDA: ``torch.cuda.max_memory_allocated()`` of the phase (reset before it;
  weights, gradients and the input included). CPU: the growth of the process's peak resident
  set size (``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs) over its RSS
  when the phase starts, after ``malloc_trim(0)`` returned freed heap to the system. That is the
  extra memory the phase touched (activations, autograd buffers, oneDNN scratch, weight copies
  made by autocast), *not* counting the weights, which were resident before. Where clear_refs
  is not writable it falls back to ``resource.getrusage`` ``ru_maxrss``, which cannot be reset:
  then only a phase that sets a new lifetime peak shows growth (a lower bound, marked ``>=``).
* **rel L2 vs fp32**: ||y - y_fp32|| / ||y_fp32|| of the eval-mode output on the same (x, t):
  the numerical cost of bf16 and the (small) reordering of a compiled graph.
* **compile s**: wall time of the first compiled forward and of the first compiled
  forward+backward (graph capture + Inductor code generation), reported apart from the timings.

Modes: ``fp32`` (torch's defaults: on CUDA that lets cuDNN use TF32 for convolutions on
Ampere and later GPUs); ``bf16`` = ``torch.autocast(device_type, dtype=torch.bfloat16)`` around the
call (weights stay float32); ``compile`` = ``torch.compile(model)`` (default mode) under the
same wrapper, with ``dynamic=False`` (fixed shapes; ``--compile-dynamic`` for torch's
default); ``bf16+compile`` both. ``--channels-last`` moves model and input to
``torch.channels_last``. Warm-up calls (--warmup, default 1 on the CPU, 3 on CUDA) are not
timed; on CUDA ``torch.cuda.synchronize()`` brackets every timed call. Compiling is slow on the
CPU (minutes per model and graph), so there it is opt-in (``--compile``); on CUDA it is on by
default (``--no-compile`` to skip).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                   # run from a checkout, uninstalled

import sde_lib  # noqa: E402
from run_lib import compose  # noqa: E402

#: short name -> CIFAR-10 config file (relative to the repo root).
MODEL_CONFIGS = {
    "ddpm": "configs/vp/ddpm_cifar.py",
    "ncsn": "configs/ve/ncsn_cifar.py",
    "ncsnv2": "configs/ve/ncsnv2_cifar.py",
    "ncsnpp": "configs/ve/ncsnpp_cifar.py",
    "ncsnpp_deep": "configs/ve/ncsnpp_deep_cifar.py",
    "ddpmpp": "configs/vp/ddpmpp_cifar.py",
    "ddpmpp_deep": "configs/vp/ddpmpp_deep_cifar.py",
}
MODES = ("fp32", "bf16", "compile", "bf16+compile")
QUICK_MODELS = ("ddpm", "ncsnv2")
MIB = 2.0 ** 20
nan = float("nan")


# ----- configs and models ---------------------------------------------------------------------
def load_config(path: Path):
    """Execute a config file and return its ``get_config()``."""
    spec = importlib.util.spec_from_file_location(f"bench_config_{path.parent.name}_{path.stem}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def wake_zero_init(model: torch.nn.Module, seed: int = 0) -> int:
    """Redraw the near-zero weights (variance scale 1e-10) with fan-in variance; return how many.

    The published initialisation ends every residual branch, attention block and the output
    conv with such a layer, so at init the output is ~1e-5 and only the skip path counts. With
    them redrawn (weights ~ N(0, 1 / fan_in)) every layer contributes, as in a trained network,
    which is what the rel-L2 column should see. Conv weights (out, in, k, k): fan_in = in k k;
    NIN weights (in, out): fan_in = in.
    """
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim < 2 or p.float().std() > 1e-4:
                continue
            fan_in = p[0].numel() if p.ndim > 2 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            count += 1
    return count


def build(name: str, device: torch.device, channels_last: bool, seed: int = 0,
          init: str = "published"):
    """(config, sde, model) for MODEL_CONFIGS[name], weights drawn after ``manual_seed(seed)``;
    init "full": near-zero layers redrawn (``wake_zero_init``)."""
    config = load_config(ROOT / MODEL_CONFIGS[name])
    torch.manual_seed(seed)
    model = compose.build_model(config)
    if init == "full":
        wake_zero_init(model, seed)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return config, compose.build_sde(config), model


def inputs(config, sde, batch: int, device: torch.device, channels_last: bool, seed: int = 1):
    """x: (batch, 3, 32, 32) float32 noise of the prior's scale at t; t: (batch,) in [eps, T]."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *compose.data_shape(config))
    eps = float(config.training.get("eps", 1e-5) or 1e-5)
    t = eps + (sde.T - eps) * torch.rand(batch, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g)
    mean, std = sde.marginal_prob(x, t)        # x_t = mean + std z: inputs of a realistic scale
    x = (mean + sde_lib.append_dims(std, x.ndim) * torch.randn(shape, generator=g)).float()
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, t.to(device)


# ----- timing and memory ----------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


class PeakMemory:
    """Peak memory of a phase, in MiB (see the module docstring for what it means per device).

    ``with PeakMemory(device) as m: ...`` then ``m.mib`` (float) and ``m.kind`` (str).
    """

    def __init__(self, device: torch.device):
        self.device, self.mib, self.kind, self.lower_bound = device, float("nan"), "", False

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)     # hand freed heap back: honest RSS base
        try:
            Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current RSS
            self.base, self.kind = _status_kib("VmRSS"), "cpu peak RSS growth (VmHWM)"
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.kind, self.lower_bound = "cpu ru_maxrss growth (lower bound)", True
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / MIB
        elif self.lower_bound:
            self.mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024
        else:
            self.mib = (_status_kib("VmHWM") - self.base) / 1024
        return False


def time_calls(step, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def make_steps(score_fn, model, x, t, device, bf16):
    """(forward, forward_backward) closures; the forward one returns the float32 output."""
    def forward():
        with torch.no_grad(), autocast(device, bf16):
            return score_fn(x, t).float()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            out = score_fn(x, t)
        loss = out.float().square().sum()       # DSM-shaped: a sum of squares of the output
        loss.backward()
        return loss

    return forward, forward_backward


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def run_model(name: str, modes, args, device: torch.device) -> list[dict]:
    """All modes of one architecture; one dict per mode (the fp32 reference runs first)."""
    config, sde, model = build(name, device, args.channels_last, init=args.init)
    n_params = sum(p.numel() for p in model.parameters())
    x, t = inputs(config, sde, args.batch, device, args.channels_last)
    compiled = None
    model.eval()
    with torch.no_grad():
        reference = compose.build_score_fn(config, sde, model)(x, t).float()
    rows = []
    for mode in modes:
        bf16, use_compile = "bf16" in mode, "compile" in mode
        net = model
        row = dict(model=name, mode=mode, params=n_params, batch=args.batch,
                   channels_last=args.channels_last)
        if use_compile:
            if compiled is None:
                torch._dynamo.reset()
                compiled = torch.compile(model, dynamic=args.compile_dynamic)
            net = compiled
        score_fn = compose.build_score_fn(config, sde, net)
        forward, forward_backward = make_steps(score_fn, model, x, t, device, bf16)
        try:
            model.eval()
            with PeakMemory(device) as mem:
                if use_compile:
                    sync(device)
                    start = time.perf_counter()
                    forward()
                    sync(device)
                    row["compile_fwd_s"] = time.perf_counter() - start
                out = forward()
                times = time_calls(forward, device, args.warmup, args.repeats)
            row.update(fwd_s=times, fwd_img_s=args.batch / statistics.median(times),
                       fwd_peak_mib=mem.mib, rel_l2=rel_l2(out, reference), memory=mem.kind)
            del out
            if not args.no_train:
                model.train()
                with PeakMemory(device) as mem:
                    if use_compile:
                        sync(device)
                        start = time.perf_counter()
                        forward_backward()
                        sync(device)
                        row["compile_train_s"] = time.perf_counter() - start
                    times = time_calls(forward_backward, device, args.warmup, args.repeats)
                row.update(train_s=times, train_img_s=args.batch / statistics.median(times),
                           train_peak_mib=mem.mib)
        except Exception as error:                   # noqa: BLE001  report and go on
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        finally:
            model.zero_grad(set_to_none=True)
        rows.append(row)
        print(f"# {name:12s} {mode:13s} " + (row.get("error") or
              f"fwd {row['fwd_img_s']:.2f} img/s, fwd+bwd {row.get('train_img_s', nan):.2f} img/s, "
              f"peak {row['fwd_peak_mib']:.0f}/{row.get('train_peak_mib', nan):.0f} MiB, "
              f"rel L2 {row['rel_l2']:.1e}"), flush=True)
    return rows


# ----- output ---------------------------------------------------------------------------------
def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def results_table(rows) -> str:
    fp32 = {r["model"]: r for r in rows if r["mode"] == "fp32" and "error" not in r}
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], f"{r['params'] / 1e6:.1f}", r["mode"], r["error"]]
                        + ["-"] * 6)
            continue
        base = fp32.get(r["model"])
        r = dict(dict(train_img_s=nan, train_peak_mib=nan), **r)
        speed = (f"{r['fwd_img_s'] / base['fwd_img_s']:.2f}x / "
                 f"{r['train_img_s'] / base.get('train_img_s', nan):.2f}x") if base else "-"
        compile_s = (f"{r['compile_fwd_s']:.0f} / {r['compile_train_s']:.0f}"
                     if "compile_fwd_s" in r else "-")
        body.append([r["model"], f"{r['params'] / 1e6:.1f}", r["mode"], f"{r['fwd_img_s']:.2f}",
                     f"{r['train_img_s']:.2f}", speed, f"{r['fwd_peak_mib']:.0f}",
                     f"{r['train_peak_mib']:.0f}",
                     "-" if r["mode"] == "fp32" else f"{r['rel_l2']:.1e}", compile_s])
    return markdown(["model", "params (M)", "mode", "fwd img/s", "fwd+bwd img/s",
                     "speed-up vs fp32 (fwd / fwd+bwd)", "fwd peak MiB", "fwd+bwd peak MiB",
                     "rel L2 vs fp32", "compile s (fwd / fwd+bwd)"], body)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"models {','.join(QUICK_MODELS)}, batch 2, fp32+bf16, 2 repeats")
    p.add_argument("--models", help="comma-separated subset of " + ",".join(MODEL_CONFIGS))
    p.add_argument("--modes", help="comma-separated subset of " + ",".join(MODES)
                   + " (default: fp32,bf16 plus compile,bf16+compile when compiling)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, help="batch size (default 128 on CUDA, 8 on the CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="add the compiled modes (default on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-dynamic", action="store_const", const=None, default=False,
                   help="torch.compile(dynamic=None), torch's default: shapes made symbolic "
                   "after a recompile (default here: dynamic=False; NCSN++ then compiles, with "
                   "dynamic=None Inductor fails on it, torch 2.13 CPU)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and input in torch.channels_last")
    p.add_argument("--warmup", type=int, help="untimed calls per phase (default 1 CPU, 3 CUDA)")
    p.add_argument("--repeats", type=int, help="timed calls per phase; the median counts "
                   "(default 3 CPU, 10 CUDA; --quick 2)")
    p.add_argument("--init", default="published", choices=["published", "full"],
                   help="weights: the published init (near-zero last layers), or 'full': those "
                   "redrawn so every layer counts in the rel L2 column (timings do not care)")
    p.add_argument("--no-train", action="store_true", help="forward only (skip fwd+bwd)")
    p.add_argument("--out", help="write all rows and settings to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False; use --device cpu")
    on_cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (2 if args.quick else 128 if on_cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    args.repeats = args.repeats or (2 if args.quick else 10 if on_cuda else 3)
    use_compile = on_cuda if args.compile is None else args.compile
    names = args.models.split(",") if args.models else list(
        QUICK_MODELS if args.quick else MODEL_CONFIGS)
    for n in names:
        if n not in MODEL_CONFIGS:
            raise SystemExit(f"unknown model {n!r}; valid: {', '.join(MODEL_CONFIGS)}")
    modes = args.modes.split(",") if args.modes else (
        list(MODES) if use_compile else ["fp32", "bf16"])
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; valid: {', '.join(MODES)}")
    if "fp32" not in modes:
        modes = ["fp32"] + modes                   # the reference of the rel L2 column
    settings = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                    machine=machine_description(), torch=torch.__version__, device=str(device),
                    gpu=torch.cuda.get_device_name(device) if on_cuda else None,
                    threads=torch.get_num_threads(), batch=args.batch, warmup=args.warmup,
                    repeats=args.repeats, init=args.init, channels_last=args.channels_last,
                    models=names,
                    modes=modes, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    print("# settings: " + json.dumps(settings), flush=True)
    rows = []
    for name in names:
        rows += run_model(name, modes, args, device)
        if args.out:                               # after every model: a killed run keeps its rows
            Path(args.out).write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
    print(f"\n## score networks at CIFAR-10 size, batch {args.batch}, {device}"
          f"{' (channels_last)' if args.channels_last else ''}, "
          f"{torch.get_num_threads()} threads\n")
    print(results_table(rows))
    print(f"\n# memory: {rows[0].get('memory', '?') if rows else '?'}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
