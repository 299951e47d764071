"""Memory plan of one training step (python main.py --mode plan): parameters, the memory of
the weights, gradients, Adam moments and EMA (float32 master weights), the activation memory
of one image's forward + backward, and the largest per-device batch (with the
config.training.batch_per_device to set) that fits a memory budget, with and without
activation checkpointing (config.model.checkpointing) and bf16 autocast
(config.training.mixed_precision), i.e. four rows per budget.

    report = plan(config)                      # dict; format_plan(report) is the table
    predict_memory(config, batch)              # bytes of one training step at ``batch``

How the activations are obtained (every number says which):

- **CPU (extrapolated).** The bytes saved for backward by one training loss
  (run_lib.train.Objective: compose.build_loss_fn + build_score_fn, bf16 autocast as in
  training) are summed over unique storages (torch.autograd.graph.saved_tensors_hooks;
  parameters excluded, autocast's bf16 weight copies included) at batch 1 and 2 and at two
  reduced image sizes (default 1/4 and 1/2 of config.data.image_size, the same network as
  built for the full size). The bytes are fitted as F + B * (a * H * W + c): linear in the
  batch B, per image linear in the pixels; a third size (batch 1) checks the pixel fit
  (``pixel_fit_check``: its relative error), then the fit is extrapolated to the real size.
  With checkpointing the backward pass recomputes one block at a time, so the largest
  block's own saved bytes (measured without checkpointing, fitted the same way) are added to
  the bytes saved with checkpointing. bf16 is measured under torch.autocast("cpu",
  bfloat16) when the fit sizes are at most BF16_MEASURE_MAX_PX (bfloat16 convolutions are
  very slow on CPUs without native support); above that, or should autocast fail, the bf16
  rows take half the fp32 activations plus autocast's bf16 weight copies and say so
  ("extrapolated, fp32 halved").
- **CUDA (measured).** torch.cuda.max_memory_allocated of full training steps
  (run_lib.train.train_step: forward, backward, clipping, fused Adam, EMA) at batch 1 and 2
  at the real size, minus what is allocated before the step; linear in the batch.

What fits: weights + gradients + Adam + EMA + activations(B), plus a safety margin of
SAFETY_FRACTION (10 %) of that and a fixed OVERHEAD_BYTES (1 GiB: CUDA context, cuDNN /
cuBLAS workspaces, allocator fragmentation) must stay within the budget. Budgets are GiB
(2**30 bytes; a "24 GB" card has 24 GiB). The batch_per_device to set is the largest divisor
of the per-process share config.training.batch_size / WORLD_SIZE that fits (0 when the whole
share fits), with K = share / batch_per_device micro-batches per optimizer step
(run_lib.distributed.micro_batches).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from run_lib import compose
from run_lib.distributed import DistContext, micro_batches

__all__ = ["plan", "predict_memory", "format_plan", "measure_saved_bytes", "fit_activations",
           "DEFAULT_BUDGETS_GB", "SAFETY_FRACTION", "OVERHEAD_BYTES", "VARIANTS"]

GIB = 2 ** 30
#: The budgets of the table when none is given (GiB).
DEFAULT_BUDGETS_GB = (16.0, 24.0, 40.0, 80.0)
#: Safety margin on top of the predicted bytes, and a fixed allowance for the CUDA context,
#: library workspaces and allocator fragmentation.
SAFETY_FRACTION = 0.10
OVERHEAD_BYTES = 1 * GIB
#: The four rows of each budget: (name, checkpointing, bf16).
VARIANTS = (("fp32", False, False), ("fp32+ckpt", True, False), ("bf16", False, True),
            ("bf16+ckpt", True, True))
#: bf16 autocast is measured on the CPU when the larger fit size is at most this many pixels
#: per side (bfloat16 convolutions without native CPU support are 30-100 x slower than
#: float32); above it the bf16 rows halve the fp32 activations, plus autocast's bf16 weight
#: copies (2 bytes per parameter) without checkpointing, and say so.
BF16_MEASURE_MAX_PX = 32
#: Largest batch the search considers.
MAX_BATCH = 1 << 16


# ----------------------------------------------------------------------------- state

def state_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the training state outside the activations: float32 weights (and buffers),
    gradients and Adam's two moments of the trainable weights, the EMA's copy."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    out = {"parameters": int(total), "trainable_parameters": int(trainable),
           "weights_bytes": 4 * total + buffers, "gradients_bytes": 4 * trainable,
           "adam_bytes": 8 * trainable, "ema_bytes": 4 * total}
    out["state_bytes"] = sum(out[k] for k in ("weights_bytes", "gradients_bytes", "adam_bytes",
                                              "ema_bytes"))
    return out


# ----------------------------------------------------------------------------- measuring

def _granularity(model: torch.nn.Module, config) -> int:
    """Image sizes the network takes are multiples of this (2 ** (levels - 1); 16 for the
    RefineNets of NCSN / NCSNv2)."""
    levels = len(tuple(config.model.get("ch_mult", ()) or ()))
    return 2 ** max(levels - 1, 0) if levels else 16


@contextlib.contextmanager
def at_size(model: torch.nn.Module, size: int, full: int):
    """The same network (built for ``full`` px) run on ``size`` px inputs: its input check
    takes ``size`` and its attention stays at the same levels (the attention resolutions
    scaled by size / full). Restored on exit."""
    saved = {k: getattr(model, k) for k in ("image_size", "attn_resolutions")
             if hasattr(model, k)}
    try:
        if "image_size" in saved:
            model.image_size = int(size)
        if "attn_resolutions" in saved:
            model.attn_resolutions = tuple(int(r) * int(size) // int(full)
                                           for r in saved["attn_resolutions"])
        yield model
    finally:
        for key, value in saved.items():
            setattr(model, key, value)


def _objective(config, model, *, bf16: bool, device):
    from run_lib.train import Objective
    cfg = copy.deepcopy(config)
    with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
        cfg.training.mixed_precision = "bf16" if bf16 else "no"
        cfg.training.batch_per_device = 0
    return Objective(cfg, compose.build_sde(cfg), model, DistContext(), device)


def measure_saved_bytes(objective, model, batch: int, size: int, *, device=None,
                        blocks: bool = False) -> tuple[int, int]:
    """(bytes saved for backward by one training loss at ``batch`` images of ``size`` px,
    the largest share of them saved inside one top-level CheckpointBlock) — unique storages,
    parameters excluded. The loss is not backpropagated: the saved tensors are what a
    backward pass would need."""
    from models.layers import CheckpointBlock
    device = torch.device(device or "cpu")
    seen: dict = {}
    per_block: dict = {}
    stack: list = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            key = (storage.data_ptr(), str(t.device))
            if key not in seen:
                seen[key] = storage.nbytes()
                if stack:
                    per_block[id(stack[0])] = per_block.get(id(stack[0]), 0) + storage.nbytes()
        return t

    handles = []
    if blocks:
        for module in model.modules():
            if isinstance(module, CheckpointBlock):
                handles.append(module.register_forward_pre_hook(
                    lambda m, args: stack.append(m) and None))
                handles.append(module.register_forward_hook(
                    lambda m, args, out: stack.pop() and None))
    channels = int(config_channels(objective.config))
    x = torch.rand(batch, channels, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    full = int(objective.config.data.image_size)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                at_size(model, size, full):
            loss = objective.loss(x, labels, gen)
        del loss
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values()), max(per_block.values(), default=0)


def config_channels(config) -> int:
    return int(compose.data_shape(config)[0])


def fit_activations(points: dict) -> dict:
    """The fit F + B * (a * P + c) (P = H * W) through measured bytes ``points`` {(batch,
    size): bytes} with batches 1 and 2 at the smaller size and batch 1 (and 2) at the larger:
    F from the batch slope at the larger size (else the smaller), per-image bytes linear in
    P through the two sizes."""
    sizes = sorted({s for _, s in points})
    s1, s2 = sizes[0], sizes[-1]
    d1 = points[(2, s1)] - points[(1, s1)]
    fixed = points[(1, s1)] - d1
    if (2, s2) in points:
        d2 = points[(2, s2)] - points[(1, s2)]
        fixed = points[(1, s2)] - d2
    else:
        d2 = points[(1, s2)] - fixed
    a = (d2 - d1) / (s2 * s2 - s1 * s1)
    c = d1 - a * s1 * s1
    return {"fixed": float(fixed), "per_pixel": float(a), "per_image_const": float(c)}


def evaluate_fit(fit: dict, batch: int, size: int) -> float:
    return fit["fixed"] + batch * (fit["per_pixel"] * size * size + fit["per_image_const"])


def _fit_sizes(config, model, fit_sizes=None, check_size=None) -> tuple[list[int], int | None]:
    """Two reduced sizes (default 1/4 and 1/2 of the image size, rounded to what the network
    takes) and a third one to check the pixel fit (1/8 when the network takes it, else 3/4)."""
    size = int(config.data.image_size)
    m = _granularity(model, config)

    def valid(s):
        return max(m, int(round(s / m)) * m)
    if fit_sizes is None:
        fit_sizes = sorted({valid(size / 4), valid(size / 2)})
        if len(fit_sizes) < 2 or fit_sizes[-1] >= size:
            raise ValueError(f"config.data.image_size={size}: too small to plan by "
                             f"extrapolation (the network takes multiples of {m} px)")
    if check_size is None:
        options = [s for s in (size // 8, 3 * size // 4) if s >= m and s % m == 0
                   and s not in fit_sizes]
        check_size = options[0] if options else None
    return [int(s) for s in fit_sizes], (int(check_size) if check_size else None)


def _measure_cpu(config, model, *, fit_sizes=None, check_size=None, log=None,
                 bf16_autocast: bool | None = None) -> dict:
    """Extrapolated activation bytes per variant (see the module docstring)."""
    from models.layers import set_checkpointing
    fit_sizes, check_size = _fit_sizes(config, model, fit_sizes, check_size)
    size = int(config.data.image_size)
    model.train()
    out = {"method": "extrapolated", "device": "cpu", "fit_sizes": fit_sizes,
           "check_size": check_size, "image_size": size, "variants": {}}
    if bf16_autocast is None:
        bf16_autocast = max(fit_sizes) <= BF16_MEASURE_MAX_PX
    for bf16 in (False, True):
        note = None
        if bf16 and not bf16_autocast:
            note = (f"bf16 not measured (autocast on this CPU is too slow at {max(fit_sizes)} "
                    "px): the fp32 activations halved, plus the bf16 weight copies")
        try:
            if note:
                raise _Skip

            objective = _objective(config, model, bf16=bf16, device=torch.device("cpu"))
            plain, block, ckpt = {}, {}, {}
            pts = [(1, fit_sizes[0]), (2, fit_sizes[0]), (1, fit_sizes[1]), (2, fit_sizes[1])]
            for b, s in pts:
                set_checkpointing(model, False)
                plain[(b, s)], block[(b, s)] = measure_saved_bytes(objective, model, b, s,
                                                                   blocks=True)
                set_checkpointing(model, True)
                ckpt[(b, s)], _ = measure_saved_bytes(objective, model, b, s)
                if log:
                    log(f"bf16={bf16} batch {b} at {s} px: saved {plain[(b, s)] / GIB:.3f} GiB, "
                        f"with checkpointing {ckpt[(b, s)] / GIB:.3f} + largest block "
                        f"{block[(b, s)] / GIB:.3f} GiB")
        except _Skip:
            pass
        except RuntimeError as error:           # bf16 autocast unsupported on this CPU
            if not bf16:
                raise
            note = (f"bf16 autocast failed on the CPU ({str(error).splitlines()[0][:120]}); "
                    "bf16 rows: the fp32 activation estimate halved")
        finally:
            set_checkpointing(model, bool(config.model.get("checkpointing", False)))
        if note:
            copies = 2.0 * sum(p.numel() for p in model.parameters())
            for name, ckpt_on, b16 in VARIANTS:
                if b16:
                    src = out["variants"]["fp32+ckpt" if ckpt_on else "fp32"]
                    fit = {k: v / 2 for k, v in src["fit"].items()}
                    if not ckpt_on:
                        fit["fixed"] += copies
                    out["variants"][name] = {"fit": fit, "method": "extrapolated, fp32 halved",
                                             "note": note}
            continue
        combined = {k: ckpt[k] + block[k] for k in ckpt}
        for name, ckpt_on, b16 in VARIANTS:
            if b16 != bf16:
                continue
            points = combined if ckpt_on else plain
            fit = fit_activations(points)
            entry = {"fit": fit, "method": "extrapolated",
                     "measured_gib": {f"batch{b}_{s}px": round(v / GIB, 4)
                                      for (b, s), v in points.items()}}
            out["variants"][name] = entry
        if check_size:
            set_checkpointing(model, False)
            measured, _ = measure_saved_bytes(objective, model, 1, check_size)
            set_checkpointing(model, bool(config.model.get("checkpointing", False)))
            predicted = evaluate_fit(out["variants"]["bf16" if bf16 else "fp32"]["fit"], 1,
                                     check_size)
            out["variants"]["bf16" if bf16 else "fp32"]["pixel_fit_check"] = {
                "size": check_size, "batch": 1, "measured_bytes": int(measured),
                "predicted_bytes": int(predicted),
                "relative_error": round((predicted - measured) / measured, 4)}
    return out


class _Skip(Exception):
    pass


def _measure_cuda(config, device, log=None) -> dict:
    """Measured step peaks on CUDA at batch 1 and 2 at the real size (see the docstring)."""
    from run_lib.state import build_train_state
    from run_lib.train import Objective, train_step
    size = int(config.data.image_size)
    out = {"method": "measured", "device": str(device), "image_size": size, "variants": {}}
    shape = compose.data_shape(config)
    for name, ckpt_on, bf16 in VARIANTS:
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
            cfg.model.checkpointing = ckpt_on
            cfg.training.mixed_precision = "bf16" if bf16 else "no"
            cfg.training.batch_per_device = 0
        state = build_train_state(cfg, device, DistContext())
        objective = Objective(cfg, compose.build_sde(cfg), state.model, DistContext(), device)
        state.model.train()
        peaks = {}
        for b in (1, 1, 2):        # the first step creates Adam's moments
            x = torch.rand(b, *shape, device=device)
            labels = torch.zeros(b, dtype=torch.long, device=device)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            train_step(state, x, labels, objective)
            torch.cuda.synchronize(device)
            peaks[b] = (torch.cuda.max_memory_allocated(device) - base, base)
        per_image = peaks[2][0] - peaks[1][0]
        fixed = peaks[1][0] - per_image
        out["variants"][name] = {
            "fit": {"fixed": float(fixed), "per_pixel": 0.0, "per_image_const": float(per_image)},
            "method": "measured", "base_bytes": int(peaks[1][1]),
            "measured_gib": {f"batch{b}_{size}px": round(p / GIB, 4) for b, (p, _) in peaks.items()},
            "note": "step peak above the allocated state (includes gradients and workspaces)"}
        if log:
            log(f"{name}: step peak batch 1 {peaks[1][0] / GIB:.3f} GiB, batch 2 "
                f"{peaks[2][0] / GIB:.3f} GiB above {peaks[1][1] / GIB:.3f} GiB")
        del state, objective
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- planning

def _total(state: dict, entry: dict, batch: int, size: int, cuda: bool) -> dict:
    act = max(evaluate_fit(entry["fit"], batch, size), 0.0)
    if cuda:        # the measured peak already holds the gradients; the base holds the rest
        static = entry["base_bytes"]
    else:
        static = state["state_bytes"]
    raw = static + act
    total = raw * (1 + SAFETY_FRACTION) + OVERHEAD_BYTES
    return {"state_bytes": int(static), "activation_bytes": int(act), "raw_bytes": int(raw),
            "total_bytes": int(total)}


def _largest_batch(state, entry, size, budget_bytes, cuda) -> int:
    if _total(state, entry, 1, size, cuda)["total_bytes"] > budget_bytes:
        return 0
    lo, hi = 1, 2
    while hi <= MAX_BATCH and _total(state, entry, hi, size, cuda)["total_bytes"] <= budget_bytes:
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _total(state, entry, mid, size, cuda)["total_bytes"] <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def accumulation(config, fits: int) -> dict:
    """batch_per_device to set for a per-device batch of at most ``fits`` and the resulting
    micro-batches K of the config's global batch (per process: batch_size / WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    share = int(config.training.batch_size) // world
    if fits <= 0:
        return {"batch_per_device": None, "micro_batches": None, "share": share}
    if fits >= share:
        return {"batch_per_device": 0, "micro_batches": 1, "share": share}
    most = max(d for d in range(1, fits + 1) if share % d == 0)
    return {"batch_per_device": most,
            "micro_batches": micro_batches(share * world, most, world), "share": share}


def check_budgets(budgets) -> tuple[float, ...]:
    """Budgets in GiB as positive finite numbers; a ValueError in one line otherwise."""
    if isinstance(budgets, str):
        parts = [p for p in budgets.replace(" ", "").split(",") if p]
    elif isinstance(budgets, (int, float)):
        parts = [budgets]
    else:
        parts = list(budgets)
    out = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"memory budget {part!r} is not a positive number of GiB; pass "
                             "e.g. --budget_gb=24 or --budget_gb=24,80")
        out.append(value)
    if not out:
        raise ValueError("no memory budget given; pass e.g. --budget_gb=24 or --budget_gb=24,80")
    return tuple(out)


def _device_for(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def measure(config, *, device=None, fit_sizes=None, check_size=None, log=None) -> dict:
    """The state bytes and the activation fits of every variant (CPU: extrapolated; CUDA:
    measured)."""
    device = _device_for(device)
    torch.manual_seed(int(config.get("seed", 0)))
    with torch.device("meta"):
        meta = compose.build_model(config)
    state = state_bytes(meta)
    del meta
    started = time.perf_counter()
    if device.type == "cuda":
        activations = _measure_cuda(config, device, log=log)
    else:
        model = compose.build_model(config)
        activations = _measure_cpu(config, model, fit_sizes=fit_sizes, check_size=check_size,
                                   log=log)
    activations["seconds"] = round(time.perf_counter() - started, 1)
    return {"state": state, "activations": activations}


def plan(config, budgets=DEFAULT_BUDGETS_GB, *, device=None, fit_sizes=None, check_size=None,
         measured: dict | None = None, log=None) -> dict:
    """The memory plan of ``config`` for each budget (GiB): a JSON-able dict (see
    format_plan)."""
    budgets = check_budgets(budgets)
    measured = measured or measure(config, device=device, fit_sizes=fit_sizes,
                                   check_size=check_size, log=log)
    state, acts = measured["state"], measured["activations"]
    size = int(config.data.image_size)
    cuda = acts["method"] == "measured"
    per_image = {}
    for name, _, _ in VARIANTS:
        entry = acts["variants"][name]
        one = evaluate_fit(entry["fit"], 1, size)
        per_image[name] = {"activation_bytes_per_image":
                           int(evaluate_fit(entry["fit"], 2, size) - one),
                           "activation_bytes_fixed": int(one - (evaluate_fit(entry["fit"], 2, size)
                                                               - one)),
                           "method": entry["method"], **({"note": entry["note"]}
                                                          if "note" in entry else {})}
    rows = []
    for budget in budgets:
        for name, ckpt_on, bf16 in VARIANTS:
            entry = acts["variants"][name]
            fits = _largest_batch(state, entry, size, budget * GIB, cuda)
            row = {"budget_gib": budget, "variant": name, "checkpointing": ckpt_on,
                   "bf16": bf16, "largest_batch": fits, "method": entry["method"],
                   **accumulation(config, fits)}
            if fits:
                row["total_gib_at_largest"] = round(
                    _total(state, entry, fits, size, cuda)["total_bytes"] / GIB, 2)
            rows.append(row)
    return {"config": {"model": str(config.model.name), "image_size": size,
                       "channels": config_channels(config),
                       "global_batch": int(config.training.batch_size),
                       "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1)},
            "parameters": state["parameters"], "state": state,
            "margin": {"safety_fraction": SAFETY_FRACTION, "overhead_bytes": OVERHEAD_BYTES},
            "activations": acts, "per_image": per_image, "rows": rows}


def predict_memory(config, batch: int, *, device=None, measured: dict | None = None) -> dict:
    """Bytes of one training step of ``config`` at ``batch`` images per device with the
    config's own checkpointing and mixed precision: {'params_optimizer_bytes',
    'activation_bytes', 'margin_bytes', 'total_bytes', 'method', ...} (bench/gpu.py's
    memory_plan hook). ``total_bytes`` includes the safety margin and overhead."""
    if int(batch) < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    measured = measured or measure(config, device=device)
    name = {(c, b): n for n, c, b in VARIANTS}[(bool(config.model.get("checkpointing", False)),
                                               config.training.mixed_precision == "bf16")]
    entry = measured["activations"]["variants"][name]
    cuda = measured["activations"]["method"] == "measured"
    size = int(config.data.image_size)
    parts = _total(measured["state"], entry, int(batch), size, cuda)
    return {"batch": int(batch), "variant": name,
            "params_optimizer_bytes": parts["state_bytes"],
            "activation_bytes": parts["activation_bytes"],
            "margin_bytes": parts["total_bytes"] - parts["raw_bytes"],
            "total_bytes": parts["total_bytes"], "raw_bytes": parts["raw_bytes"],
            "method": entry["method"] + (" (CUDA max_memory_allocated)" if cuda else
                                         " (CPU saved-for-backward bytes)")}


# ----------------------------------------------------------------------------- output

def _gib(n) -> str:
    return f"{n / GIB:.2f}"


def format_plan(report: dict) -> str:
    """The plan as text: the state, the activations per image and one row per budget and
    variant."""
    st, acts, cfg = report["state"], report["activations"], report["config"]
    lines = [f"memory plan: {cfg['model']} at {cfg['image_size']} px, global batch "
             f"{cfg['global_batch']} over {cfg['world_size']} process(es)",
             f"parameters: {st['parameters']:,} ({st['trainable_parameters']:,} trainable)",
             f"weights + gradients + Adam + EMA (fp32): {_gib(st['state_bytes'])} GiB "
             f"(weights {_gib(st['weights_bytes'])}, gradients {_gib(st['gradients_bytes'])}, "
             f"Adam {_gib(st['adam_bytes'])}, EMA {_gib(st['ema_bytes'])})"]
    if acts["method"] == "extrapolated":
        lines.append(f"activations: EXTRAPOLATED from bytes saved for backward on the CPU at "
                     f"batch 1, 2 and {' / '.join(map(str, acts['fit_sizes']))} px to "
                     f"{acts['image_size']} px (linear in batch and in pixels)")
        check = acts["variants"]["fp32"].get("pixel_fit_check")
        if check:
            lines.append(f"  pixel-fit check at {check['size']} px (measured): relative error "
                         f"{check['relative_error']:+.1%}")
    else:
        lines.append(f"activations: MEASURED on {acts['device']} (max_memory_allocated of "
                     "training steps at batch 1 and 2, linear in batch)")
    for name, entry in report["per_image"].items():
        note = f"  [{entry['note']}]" if "note" in entry else ""
        lines.append(f"  {name:10s} {_gib(entry['activation_bytes_per_image'])} GiB per image "
                     f"+ {_gib(entry['activation_bytes_fixed'])} GiB fixed ({entry['method']})"
                     f"{note}")
    margin = report["margin"]
    lines.append(f"fits: (state + activations) x {1 + margin['safety_fraction']:.2f} + "
                 f"{_gib(margin['overhead_bytes'])} GiB overhead <= budget")
    lines.append("")
    lines.append("| budget GiB | variant | largest batch/device | batch_per_device | "
                 "micro-batches | GiB at that batch | method |")
    lines.append("|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        bpd = "-" if row["batch_per_device"] is None else row["batch_per_device"]
        k = "-" if row["micro_batches"] is None else row["micro_batches"]
        at = row.get("total_gib_at_largest", "-")
        lines.append(f"| {row['budget_gib']:g} | {row['variant']} | {row['largest_batch']} | "
                     f"{bpd} | {k} | {at} | {row['method']} |")
    return "\n".join(lines)


def write_plan(report: dict, workdir) -> Path:
    path = Path(workdir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path
