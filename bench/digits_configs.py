"""Every digits config, trained with its defaults and sampled with its default sampler
(issue 10, point 8: "every digits config must give recognizable digits").

    python bench/digits_configs.py [--configs vp/ddpm,ve/ncsn,...] [--runs-dir DIR]
        [--set [CONFIG:]KEY=VALUE ...] [--reuse] [--threads N] [--out-json F] [--out-md F]
    python bench/digits_configs.py --render a.json,b.json [--out-json F] [--out-md F]

For each config file configs/<sde>/<model>_digits.py (all of them by default) it trains a
fresh run in RUNS_DIR/<sde>_<model> with ``run_lib.train.train`` (the config's own
n_iters, EMA, lr, ...; ``--set`` overrides a key, for one config with ``CONFIG:`` e.g.
``--set ve/ncsn:training.n_iters=1500``), samples config.sampling.num_samples images with
its default sampler config.sampling.method through ``run_lib.evaluate.sample`` (what
``main.py --mode sample`` does: EMA weights, seed config.seed + 10; writes
samples_<method>.png / .npz / .json there) and measures against the 297 test digits:

* pixel FD: Frechet distance of the pixels in [0, 1] (64-D), as sample mode reports it;
* feature FD: Frechet distance of the 64 penultimate features of the small digits CNN of
  bench/digits_samplers.py (trained here on the 1500 training digits, seed 0);
* confidence: the CNN's mean top-1 softmax probability on the samples (real test digits:
  0.99; uniform noise images: also ~0.85, so it separates little), the number of classes it
  predicts (of 10) and the largest predicted class's share (in the JSON);
* distinct: the number of different uint8 images among the samples (a collapse to one
  pattern gives 1).

References: the same measures for the 1500 training digits against the test digits (the
floor), for as many training digits as there are samples (the floor for the rows: an FD of
n samples is biased upward by ~1/n), and for as many images of uniform random pixels (the
CNN is confident on those too, about 0.85: its confidence separates little).
``--render`` joins the JSON of several runs (e.g. two halves of the configs run side by side
in two processes) into one table. Seconds are wall-clock of this process (training includes its scheduled evaluations and
the sample grid); the load average before and after each run is recorded, since timings on
a shared machine mean little without it.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                     # run from a checkout
sys.path.append(str(ROOT / "bench"))       # after the packages: bench/models.py is no package

from digits_samplers import features, pixels, train_classifier  # noqa: E402
from run_lib.datasets import load_digits_images  # noqa: E402
from samplers.metrics import frechet_distance  # noqa: E402
from run_lib.validate import ConfigError, check_override_key  # noqa: E402

#: Every digits config, as <sde>/<model> (configs/<sde>/<model>_digits.py).
CONFIGS = ("vp/ddpm", "vp/ddpmpp", "subvp/ddpm", "subvp/ddpmpp", "ve/ddpm", "ve/ncsnpp",
           "ve/ncsn", "ve/ncsnv2")


def get_config(name: str):
    sde, model = name.split("/")
    return importlib.import_module(f"configs.{sde}.{model}_digits").get_config()


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, name: str, overrides) -> dict:
    """Apply ``[CONFIG:]KEY=VALUE`` overrides that concern ``name``; returns those applied."""
    applied = {}
    for item in overrides:
        target, _, assignment = item.rpartition(":")
        if target and target != name:
            continue
        key, _, value = assignment.partition("=")
        try:
            check_override_key(config, key)
        except ConfigError as error:
            raise SystemExit(f"--set {item}: {error}") from None
        config.update_from_flattened_dict({key: parse_value(value)})
        applied[key] = parse_value(value)
    return applied


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ----- the semantic measures -----------------------------------------------------------------
class Judge:
    """The digits CNN and the reference statistics of the test and training digits."""

    def __init__(self, num_samples: int, seed: int = 0):
        train_u8, train_labels = (torch.from_numpy(a) for a in load_digits_images("train"))
        test_u8, test_labels = (torch.from_numpy(a) for a in load_digits_images("test"))
        self.net = train_classifier(train_u8.float() / 255, train_labels, seed=seed)
        with torch.no_grad():
            logits = self.net(test_u8.float() / 255)
        self.accuracy = (logits.argmax(1) == test_labels).double().mean().item()
        self.test_pix, self.test_feat = pixels(test_u8), features(self.net, test_u8)
        n = min(num_samples, len(train_u8))
        subset = train_u8[torch.randperm(len(train_u8),
                                         generator=torch.Generator().manual_seed(1))[:n]]
        noise = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(2))
        self.floors = {"all_training_digits": self.measure(train_u8),
                       f"{n}_training_digits": self.measure(subset),
                       f"{n}_uniform_noise_images": self.measure(noise),
                       "test_digits_confidence": self.confidence(test_u8)[0]}

    def confidence(self, images_uint8: torch.Tensor) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            probs = torch.softmax(self.net(images_uint8.float() / 255), dim=1)
        counts = np.bincount(probs.argmax(1).numpy(), minlength=10)
        return probs.max(1).values.mean().item(), counts

    def measure(self, images_uint8: torch.Tensor) -> dict:
        conf, counts = self.confidence(images_uint8)
        distinct = len(np.unique(images_uint8.reshape(len(images_uint8), -1).numpy(), axis=0))
        return {"pixel_fd": frechet_distance(pixels(images_uint8), self.test_pix),
                "feature_fd": frechet_distance(features(self.net, images_uint8), self.test_feat),
                "confidence": conf, "classes": int((counts > 0).sum()),
                "largest_class_share": float(counts.max() / counts.sum()),
                "class_counts": counts.tolist(), "distinct": distinct, "n": len(images_uint8)}


# ----- one config ----------------------------------------------------------------------------
def run_config(name: str, args, judge: Judge) -> dict:
    from run_lib import evaluate
    from run_lib.train import train
    config = get_config(name)
    config.device = args.device
    applied = apply_overrides(config, name, args.set)
    workdir = Path(args.runs_dir) / (name.replace("/", "_") + args.tag)
    timing_file = workdir / "bench_train.json"
    n_iters = int(config.training.n_iters)
    load_before = load_average()
    if args.reuse and timing_file.exists() and \
            json.loads(timing_file.read_text())["n_iters"] == n_iters:
        train_seconds = json.loads(timing_file.read_text())["seconds"]
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        start = time.perf_counter()
        train(config, workdir, progress=False)
        train_seconds = time.perf_counter() - start
        timing_file.write_text(json.dumps({"n_iters": n_iters, "seconds": train_seconds}))
    method = str(config.sampling.method)
    metrics = evaluate.sample(config, workdir, method=method, progress=False)
    images = torch.from_numpy(np.load(workdir / f"samples_{method}.npz")["images"])
    options = config.sampling[method].to_dict()
    row = {"config": f"{name}_digits", "overrides": applied, "n_iters": n_iters,
           "batch_size": int(config.training.batch_size), "lr": float(config.optim.lr),
           "ema_rate": float(config.model.ema_rate), "ema_warmup": bool(config.model.ema_warmup),
           "sde": str(config.sde.name), "num_scales": int(config.sde.num_scales),
           "sigma_min": float(config.sde.sigma_min), "sigma_max": float(config.sde.sigma_max),
           "model": str(config.model.name), "sampler": method, "sampler_options": options,
           "nfe": int(metrics["nfe"]), "train_seconds": round(train_seconds, 1),
           "sample_seconds": float(metrics["seconds"]),
           "pixel_fd_reported": metrics.get("pixel_fd_to_test"),
           "load_before": load_before, "load_after": load_average(),
           "threads": torch.get_num_threads(), "workdir": str(workdir),
           "grid": str(workdir / f"samples_{method}.png"), **judge.measure(images)}
    print(f"# {name}{args.tag}: {n_iters} steps {train_seconds:.0f} s, {method} NFE "
          f"{row['nfe']} {row['sample_seconds']:.0f} s, pixel FD {row['pixel_fd']:.3f}, "
          f"feature FD {row['feature_fd']:.1f}, confidence {row['confidence']:.3f}, "
          f"classes {row['classes']}, distinct {row['distinct']} "
          f"(load {load_before} -> {row['load_after']})", flush=True)
    return row


def sampler_label(row: dict) -> str:
    o = row["sampler_options"]
    if row["sampler"] == "ald":
        return f"ald {o['n_steps_each']} x {row['num_scales']}, step_lr {o['step_lr']:g}"
    if row["sampler"] == "pc":
        return (f"pc {o['predictor']} + {o['corrector']} snr {o['snr']:g}, "
                f"N = {row['num_scales']}")
    return row["sampler"]


def markdown(rows, floors) -> str:
    header = ["config", "steps (EMA)", "sampler", "NFE", "train / sample s", "pixel FD",
              "feature FD", "confidence", "classes", "distinct"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        extra = (" [" + ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) + "]"
                 if r["overrides"] else "")
        lines.append("| " + " | ".join([
            r["config"] + extra, f"{r['n_iters']} ({r['ema_rate']:g})", sampler_label(r),
            str(r["nfe"]), f"{r['train_seconds']:.0f} / {r['sample_seconds']:.0f}",
            f"{r['pixel_fd']:.3f}", f"{r['feature_fd']:.1f}", f"{r['confidence']:.3f}",
            str(r["classes"]), str(r["distinct"])]) + " |")
    for label, f in floors.items():
        if isinstance(f, dict):
            lines.append(f"| reference: {label.replace('_', ' ')} | | | | | {f['pixel_fd']:.3f} | "
                         f"{f['feature_fd']:.1f} | {f['confidence']:.3f} | {f['classes']} | "
                         f"{f['distinct']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated <sde>/<model> of configs/<sde>/<model>_digits.py")
    p.add_argument("--runs-dir", default="runs/digits_configs")
    p.add_argument("--tag", default="", help="suffix of the work directories")
    p.add_argument("--set", action="append", default=[],
                   help="[CONFIG:]KEY=VALUE config override (repeatable)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a finished run of the same length instead of retraining")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-json")
    p.add_argument("--out-md")
    p.add_argument("--render", help="comma-separated JSON files of earlier runs: join their "
                   "rows into one table (runs nothing)")
    return p.parse_args(argv)


def render(args) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.render.split(",") if f]
    rows = [row for part in parts for row in part["rows"]]
    table = markdown(rows, parts[0]["floors"])
    print(table)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(
            {"settings": [p["settings"] for p in parts], "floors": parts[0]["floors"],
             "rows": rows}, indent=1) + "\n")
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.configs.split(",") if n]
    for name in names:
        if not (ROOT / "configs" / f"{name}_digits.py").exists():
            raise SystemExit(f"no config configs/{name}_digits.py; valid: {', '.join(CONFIGS)}")
    num_samples = max(int(get_config(n).sampling.num_samples) for n in names)
    judge = Judge(num_samples)
    settings = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "device": args.device, "classifier_test_accuracy": judge.accuracy,
                "set": args.set, "cpu_count": os.cpu_count()}
    print("# settings: " + json.dumps(settings), flush=True)
    rows = [run_config(name, args, judge) for name in names]
    table = markdown(rows, judge.floors)
    print(table)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(
            {"settings": settings, "floors": judge.floors, "rows": rows}, indent=1) + "\n")
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
