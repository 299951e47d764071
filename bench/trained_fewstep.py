"""Few-step samplers on trained digits models: the digits FID of DPM-Solver++ 2M as it was
before round two (grid ending at t = eps = 1e-3, final orders lowered below 15 steps) against
today's registry defaults (dpm_solver, unipc, ipndm; grids ending at sigma_min = 0.02) and
variants (lower_order_final off, ipndm orders and grids, schedules fitted on the digits' mean
and covariance) at 5, 10 and 20 NFE (final denoising step included), on the demo's VP and VE
models and a sub-VP model trained the same way (trained here when missing).

    python main.py --mode demo --workdir runs/demo_cur       # the vp and ve models (optional)
    OMP_NUM_THREADS=1 python bench/trained_fewstep.py --demo runs/demo_cur --root runs/fewstep \
        --seeds 0,1,2

Each cell draws --num-samples samples (default 1000) with --mode eval's seeded chunks for each
config.seed of --seeds and reports FID / IS against the 1500 training digits in the digits
classifier's features (N = 1000 is biased upward: compare within the table only; the seeds
are shared by the columns, so differences are paired). Results: <root>/results.json, cached
per (run, column, seed); the table prints the mean over the seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The budgets, final denoising step included.
NFES = (5, 10, 20)


#: column -> (sampler, options) at NFE n: num_steps = n - 1 plus the final denoising step.
#: Labels name every option that differs from the registry's defaults, or say "(default)":
#: those columns were re-measured when a default changed (ipndm: order 3 and Karras steps on VE
#: since round two; dpm_solver / unipc: no lowered final order at 4 steps).
def cells(nfe: int) -> dict:
    steps = nfe - 1
    return {f"dpm_solver 2M, eps end (before) @{nfe}":
                ("dpm_solver", {"num_steps": steps, "sigma_min": None,
                                "lower_order_final": True}),
            f"dpm_solver (default) @{nfe}": ("dpm_solver", {"num_steps": steps}),
            f"unipc (default) @{nfe}": ("unipc", {"num_steps": steps}),
            f"ipndm (default) @{nfe}": ("ipndm", {"num_steps": steps}),
            f"ipndm order 4 logsnr @{nfe}": ("ipndm", {"num_steps": steps, "order": 4,
                                                        "spacing": "logsnr"}),
            f"dpm_solver 2M lof=off @{nfe}": ("dpm_solver", {"num_steps": steps,
                                                             "lower_order_final": False}),
            f"unipc lof=off @{nfe}": ("unipc", {"num_steps": steps, "lower_order_final": False}),
            f"ipndm order 3 logsnr @{nfe}": ("ipndm", {"num_steps": steps, "order": 3,
                                                        "spacing": "logsnr"}),
            f"ipndm order 3 karras @{nfe}": ("ipndm", {"num_steps": steps, "order": 3,
                                                        "spacing": "karras"}),
            f"ipndm fitted on the moments @{nfe}": ("ipndm", {"num_steps": steps, "order": 3,
                                                               "schedule": MOMENTS}),
            f"unipc fitted on the moments @{nfe}": ("unipc", {"num_steps": steps,
                                                               "schedule": MOMENTS})}


#: An option value replaced by a schedule fitted on the training digits' mean and covariance
#: (samplers.schedules_opt.fit_schedule with the run's SDE and the sampler's options).
MOMENTS = "moments"


def moment_schedule(config, workdir: Path, sampler: str, options: dict) -> str:
    """The path of ``sampler``'s schedule for options["num_steps"] intervals fitted on a
    Gaussian with the mean and covariance of the training digits in [-1, 1] (fitted once and
    kept in <workdir>/schedules)."""
    from run_lib import compose
    from samplers.schedules_opt import fit_schedule, proxy_description, save_schedule
    from fit_schedule import build_proxy
    steps = options["num_steps"]
    fixed = {k: v for k, v in options.items() if k not in ("num_steps", "schedule")}
    path = workdir / "schedules" / (f"{sampler}_{steps}_"
                                    + "_".join(f"{k}={v}" for k, v in sorted(fixed.items()))
                                    + ".json")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        sde = compose.build_sde(config)
        proxy, name = build_proxy("digits")
        import samplers
        sigma_min = fixed.get("sigma_min", samplers.SAMPLERS[sampler].defaults["sigma_min"])
        fit = fit_schedule(proxy, sde, sampler, steps, solver_options=fixed, sigma_min=sigma_min)
        save_schedule(path, solver=sampler, solver_options=fixed, sde=repr(sde),
                      proxy={"name": name, **proxy_description(proxy)}, method={"fit": "bench"},
                      entries={steps: {"sigmas": fit["sigmas"], "nfe": steps + 1}})
    return str(path)


#: Earlier labels of the same cells (results files written before the relabelling).
OLD_LABELS = {"ipndm (default)": "ipndm order 4 logsnr", "ipndm order 3": "ipndm order 3 logsnr"}


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
    parser.add_argument("--seeds", default="0",
                        help="comma-separated config.seed values (each draws other samples)")
    args = parser.parse_args()
    import samplers
    from run_lib import demo, quality
    from run_lib.train import train
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "results.json"
    results = upgrade(json.loads(path.read_text())) if path.is_file() else {}
    seeds = [int(v) for v in args.seeds.split(",") if v]
    demo.prepare_quality(run_config("vp", args.num_samples))
    for name in args.runs.split(","):
        config = run_config(name, args.num_samples)
        workdir = Path(args.demo) / name if name in demo.DEMO_RUNS else root / name
        if not (workdir / "checkpoints" / "checkpoint_1500.pt").is_file():
            train(config, workdir, progress=False)
        entry = results.setdefault(name, {})
        for seed in seeds:
            config.seed = seed
            for nfe in NFES:
                for column, (sampler, options) in cells(nfe).items():
                    per_seed = entry.setdefault(column, {})
                    if str(seed) in per_seed:
                        continue
                    if options.get("schedule") == MOMENTS:
                        options = {**options, "schedule": moment_schedule(config, workdir,
                                                                          sampler, options)}
                    config.sampling[sampler] = {**samplers.SAMPLERS[sampler].defaults,
                                                **options}
                    start = time.perf_counter()
                    metrics = quality.evaluate(config, workdir, method=sampler, progress=False)
                    per_seed[str(seed)] = {"fid": metrics["fid"], "is": metrics["is"],
                                           "nfe": metrics["protocol"].get("nfe"),
                                           "seconds": round(time.perf_counter() - start, 1)}
                    path.write_text(json.dumps(results, indent=1))
                    print(name, column, seed, per_seed[str(seed)], flush=True)
    print(table(results))


def upgrade(results: dict) -> dict:
    """Results of the one-seed format ({run: {column: metrics}}) as {run: {column: {seed:
    metrics}}} with the current labels."""
    for entry in results.values():
        for column in list(entry):
            if "fid" not in entry[column]:
                continue                                # already {seed: metrics}
            label, _, nfe = column.rpartition(" @")
            entry[f"{OLD_LABELS.get(label, label)} @{nfe}"] = {"0": entry.pop(column)}
    return results


def table(results: dict) -> str:
    """Markdown: one row per run, one column per cell, the mean FID over the seeds (and the
    number of seeds when more than one)."""
    columns = [column for nfe in NFES for column in cells(nfe)]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, entry in results.items():
        values = []
        for column in columns:
            per_seed = entry.get(column, {})
            fids = [m["fid"] for m in per_seed.values()]
            values.append("-" if not fids else f"{sum(fids) / len(fids):.2f}"
                          + (f" (x{len(fids)})" if len(fids) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
