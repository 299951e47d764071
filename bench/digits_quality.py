"""Sample quality of trained digits models: the digits FID, KID, IS, precision / recall and
NFE of PC, the probability-flow ODE, DPM-Solver, DDIM and EDM at N = 2000 samples (what
``main.py --mode eval`` measures: run_lib.quality.evaluate), next to each model's bits/dim,
and the same metrics of real digits against the same reference (the 1500 training digits
in the 64-D feature space of the digits classifier): the 297 held-out test digits, and
2000 training digits drawn with replacement (an ideal generator: the floor at N = 2000).

    python main.py --mode demo --workdir runs/digits_demo       # trains and evaluates vp, ve
    OMP_NUM_THREADS=1 python bench/digits_quality.py --root runs/digits_demo --runs vp,real
    OMP_NUM_THREADS=1 python bench/digits_quality.py --root runs/digits_demo --runs ve
    OMP_NUM_THREADS=1 python bench/digits_quality.py --root runs/digits_demo --runs subvp
    python bench/digits_quality.py --root runs/digits_demo --render --out-json q.json

Runs (<root>/<run>/): vp and ve are the demo's (run_lib.demo.demo_config: 1500 steps of 64,
PC without the Langevin corrector at 1000 steps, ODE dopri5 at rtol 1e-4, likelihood at
VP 1e-3 / VE 1e-4); subvp is configs/subvp/ddpm_digits.py with the same training and
sampler settings (run_lib.demo.SHARED_SETTINGS) and the likelihood at rtol 1e-4. A run not
yet trained is trained (a finished one is not trained again), bits/dim are computed when
likelihood.json is absent or of another step, and each sampler is evaluated with
config.eval.num_samples = --num-samples in chunks of 500: chunks already drawn (the demo's
first 500) are reused, so sampling images/s averages over chunks drawn at different times.
'real' writes the 297 test digits and 2000 training digits drawn with replacement to
<root>/real_test/*.npz and evaluates those files (eval_npz_<stem>.json). Every invocation
ends with the table of what is on disk (--render: only that), as markdown on stdout and,
with --out-json, as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Run name -> config module; vp and ve are the demo's.
RUNS = {"vp": "configs.vp.ddpm_digits", "ve": "configs.ve.ddpm_digits",
        "subvp": "configs.subvp.ddpm_digits"}
SAMPLERS = ("pc", "ode", "dpm_solver", "ddim", "edm")
#: The likelihood tolerances of the runs that are not the demo's.
EXTRA_SETTINGS = {"subvp": {"eval.rtol": 1e-4, "eval.atol": 1e-4}}
REAL = "real"


def run_config(name: str, *, steps: int, num_samples: int, device: str):
    """The config of run ``name``: the demo's settings (for subvp: the shared ones) with
    ``num_samples`` samples per evaluation on ``device``."""
    import importlib
    from run_lib import demo
    overrides = {"device": device, "eval.num_samples": num_samples, "eval.sample_batch": 500}
    if name in demo.DEMO_RUNS:
        return demo.demo_config(name, n_iters=steps, overrides=overrides)
    config = importlib.import_module(RUNS[name]).get_config()
    settings = {**demo.SHARED_SETTINGS, **EXTRA_SETTINGS[name], **overrides}
    return demo.apply_settings(config, n_iters=steps, settings=settings)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def measure_run(name: str, root: Path, args) -> None:
    """Train run ``name`` (when not finished), compute its bits/dim (when absent) and
    evaluate each sampler of --samplers at --num-samples."""
    from run_lib import evaluate, quality, validate
    from run_lib.train import train
    config = run_config(name, steps=args.steps, num_samples=args.num_samples,
                        device=args.device)
    for method in args.samplers:
        validate.validate_config(config, "eval", sampler=method)
    workdir = root / name
    train(config, workdir, progress=False)
    like = _read(workdir / "likelihood.json")
    if like is None or like.get("step") != args.steps:
        like = evaluate.likelihood(config, workdir, progress=False)
    print(json.dumps({"run": name, "bits_per_dim": like["bits_per_dim"]}), flush=True)
    for method in args.samplers:
        start = time.perf_counter()
        result = quality.evaluate(config, workdir, method=method, progress=False)
        print(json.dumps({"run": name, "sampler": method, "fid": result["fid"],
                          "is": result.get("is"), "nfe": result["protocol"]["nfe"],
                          "seconds": round(time.perf_counter() - start, 1),
                          "timing": result["timing"]}), flush=True)


#: The real sets of the floor: file stem -> (label, split, images drawn with replacement or 0).
REAL_SETS = {"digits_test": ("real: the 297 held-out test digits", "test", 0),
             "digits_train_drawn_2000": ("real: 2000 training digits drawn with replacement",
                                         "train", 2000)}


def measure_real(root: Path, args) -> None:
    """The floor, evaluated like samples (--samples): the 297 test digits, and 2000 of the
    1500 training digits drawn with replacement (seed 0; an ideal generator of the training
    distribution; its precision is 1 by construction, its points being reference points)."""
    import numpy as np
    from run_lib import quality
    from run_lib.datasets import build_dataset
    config = run_config("vp", steps=args.steps, num_samples=args.num_samples,
                        device=args.device)
    folder = root / "real_test"
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (label, split, draws) in REAL_SETS.items():
        images = build_dataset(config, split).images.numpy()
        if draws:
            images = images[np.random.default_rng(0).integers(0, len(images), draws)]
        np.savez(folder / f"{stem}.npz", images=images)
        result = quality.evaluate(config, folder, samples=str(folder / f"{stem}.npz"),
                                  progress=False)
        print(json.dumps({"run": label, "fid": result["fid"], "is": result.get("is"),
                          "num_samples": result["num_samples"]}), flush=True)


def _row(run: str, sampler: str, result: dict, like: dict | None, num_samples: int) -> dict:
    protocol, timing = result.get("protocol", {}), result.get("timing", {})
    n = result["num_samples"]
    return {"run": run, "sampler": sampler, "num_samples": n, "complete": n == num_samples,
            "nfe": protocol.get("nfe"),
            **{k: result.get(k) for k in ("fid", "kid", "kid_std", "is", "is_std",
                                          "precision", "recall")},
            "sampling_images_per_s": timing.get("sampling_images_per_s"),
            "extraction_images_per_s": timing.get(
                "extraction_images_per_s", result.get("extraction_images_per_s")),
            "bits_per_dim": None if like is None else like["bits_per_dim"],
            "bits_per_dim_standard_error": None if like is None else
            like["bits_per_dim_standard_error"]}


def gather(root: Path, runs, samplers, num_samples: int) -> list[dict]:
    """One row per (run, sampler) with an eval_<sampler>.json on disk, and the floor."""
    rows = []
    for name in runs:
        if name == REAL:
            for stem, (label, _, _) in REAL_SETS.items():
                result = _read(root / "real_test" / f"eval_npz_{stem}.json")
                if result is not None:
                    rows.append(_row(label, "-", result, None, result["num_samples"]))
            continue
        like = _read(root / name / "likelihood.json")
        for method in samplers:
            result = _read(root / name / f"eval_{method}.json")
            if result is not None:
                rows.append(_row(name, method, result, like, num_samples))
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[dict]) -> str:
    """The markdown table of ``gather``'s rows."""
    header = ["run", "bits/dim", "sampler", "NFE", "N", "FID", "KID", "IS",
              "precision", "recall", "sampling img/s", "extraction img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        bpd = ("-" if r["bits_per_dim"] is None else
               f"{r['bits_per_dim']:.3f} +- {r['bits_per_dim_standard_error']:.3f}")
        kid = ("-" if r["kid"] is None else
               f"{r['kid']:.2f} +- {r['kid_std']:.2f}")
        score = "-" if r["is"] is None else f"{r['is']:.2f} +- {r['is_std']:.2f}"
        n = f"{r['num_samples']}" + ("" if r["complete"] else " (incomplete)")
        lines.append("| " + " | ".join([
            r["run"], bpd, r["sampler"], _fmt(r["nfe"], "d"), n, _fmt(r["fid"], ".3f"), kid,
            score, _fmt(r["precision"], ".3f"), _fmt(r["recall"], ".3f"),
            _fmt(r["sampling_images_per_s"], ".2f"),
            _fmt(r["extraction_images_per_s"], ".0f")]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/digits_demo", help="folder of the runs")
    parser.add_argument("--runs", default="vp,ve,subvp,real",
                        help=f"comma-separated from {', '.join([*RUNS, REAL])}")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--render", action="store_true", help="only print the table")
    parser.add_argument("--out-json")
    args = parser.parse_args()
    args.samplers = [m for m in args.samplers.split(",") if m]
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in (*RUNS, REAL)]
    if unknown:
        parser.error(f"unknown runs {unknown}: choose from {', '.join([*RUNS, REAL])}")
    import torch
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    if not args.render:
        for name in runs:
            measure_real(root, args) if name == REAL else measure_run(name, root, args)
    rows = gather(root, runs, args.samplers, args.num_samples)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(rows, indent=2) + "\n")
    print(render(rows))


if __name__ == "__main__":
    main()
