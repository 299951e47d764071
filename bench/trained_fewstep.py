"""Few-step samplers on trained digits models: the digits FID of DPM-Solver++ 2M as it was
before round two (grid ending at t = eps = 1e-3) against the new defaults (every grid ending
at sigma_min = 0.02: dpm_solver, unipc, ipndm) at 10 and 20 NFE (final denoising step
included), on the demo's VP and VE models and a sub-VP model trained the same way.

    python main.py --mode demo --workdir runs/demo_cur       # the vp and ve models
    OMP_NUM_THREADS=1 python bench/trained_fewstep.py --demo runs/demo_cur --root runs/fewstep

Each cell draws --num-samples samples (default 1000) with --mode eval's seeded chunks and
reports FID / IS against the 1500 training digits in the digits classifier's features
(N = 1000 is biased upward: compare within the table only). Results: <root>/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: column -> (sampler, options) at NFE n: num_steps = n - 1 plus the final denoising step.
def cells(nfe: int) -> dict:
    steps = nfe - 1
    return {f"dpm_solver 2M, eps end (before) @{nfe}":
                ("dpm_solver", {"num_steps": steps, "sigma_min": None}),
            f"dpm_solver (default) @{nfe}": ("dpm_solver", {"num_steps": steps}),
            f"unipc (default) @{nfe}": ("unipc", {"num_steps": steps}),
            f"ipndm (default) @{nfe}": ("ipndm", {"num_steps": steps})}


def run_config(name: str, num_samples: int):
    import importlib
    from run_lib import demo
    overrides = {"device": "cpu", "eval.num_samples": num_samples, "eval.sample_batch": 500}
    if name in demo.DEMO_RUNS:
        return demo.demo_config(name, n_iters=1500, overrides=overrides)
    config = importlib.import_module("configs.subvp.ddpm_digits").get_config()
    return demo.apply_settings(config, n_iters=1500,
                               settings={**demo.SHARED_SETTINGS, **overrides})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo_cur")
    parser.add_argument("--root", default="runs/fewstep")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--runs", default="vp,ve,subvp")
    args = parser.parse_args()
    import samplers
    from run_lib import demo, quality
    from run_lib.train import train
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    demo.prepare_quality(run_config("vp", args.num_samples))
    for name in args.runs.split(","):
        config = run_config(name, args.num_samples)
        workdir = Path(args.demo) / name if name in demo.DEMO_RUNS else root / name
        if not (workdir / "checkpoints" / "checkpoint_1500.pt").is_file():
            train(config, workdir, progress=False)
        entry = results.setdefault(name, {})
        for nfe in (10, 20):
            for column, (sampler, options) in cells(nfe).items():
                if column in entry:
                    continue
                config.sampling[sampler] = {**samplers.SAMPLERS[sampler].defaults, **options}
                start = time.perf_counter()
                metrics = quality.evaluate(config, workdir, method=sampler, progress=False)
                entry[column] = {"fid": metrics["fid"], "is": metrics["is"],
                                 "nfe": metrics["protocol"].get("nfe"),
                                 "seconds": round(time.perf_counter() - start, 1)}
                path.write_text(json.dumps(results, indent=1))
                print(name, column, entry[column], flush=True)
    columns = list(cells(10)) + list(cells(20))
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, entry in results.items():
        print(f"| {name} | " + " | ".join(
            f"{entry[c]['fid']:.2f} ({entry[c]['nfe']})" if c in entry else "-"
            for c in columns) + " |")


if __name__ == "__main__":
    main()
