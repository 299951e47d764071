"""Improved DDPM on the digits: linear vs cosine schedule, fixed vs learned reverse variances.

Each run is configs/vp/iddpm_digits.py (discrete levels, N = 1000; the learned runs add the
variance head and the hybrid loss, lambda = 0.001) trained like the demo's runs (1500 steps
of 64, run_lib.demo.apply_settings). For each run the script reports
- bits/dim of the 297 test digits through the probability-flow ODE (dequantized, dopri5 at
  rtol = atol = 1e-3) and the variational bound (8-bit, an unbiased subset of 100 of the 999
  KL terms, as the digits configs; the learned
  variance for learned runs, beta~ for fixed ones), both from --mode likelihood;
- the digits FID / IS of N samples (--mode eval; default 1000) at 50 respaced steps with each
  applicable variance (fixed: beta~ 'small', beta 'large', Analytic-DPM's 'analytic';
  learned: 'learned' and 'small'), and DDIM at 50 steps and DPM-Solver++ 2M at 20 on the same
  network.

    OMP_NUM_THREADS=1 python bench/iddpm_digits.py --root runs/iddpm_digits
    python bench/iddpm_digits.py --root runs/iddpm_digits --render

Finished work is kept: a trained run is not trained again, likelihood.json of the same step
is reused, and results.json under --root caches the evaluations (--render prints the table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: run name -> (schedule, learned variance)
RUNS = {"linear_fixed": ("linear", False), "linear_learned": ("linear", True),
        "cosine_fixed": ("cosine", False), "cosine_learned": ("cosine", True)}
#: (column, sampler, options, applies to fixed runs, applies to learned runs)
SAMPLERS = (("respaced-50 small", "respaced", {"num_steps": 50, "variance": "small"}, True, True),
            ("respaced-50 large", "respaced", {"num_steps": 50, "variance": "large"}, True, False),
            ("respaced-50 analytic", "respaced", {"num_steps": 50, "variance": "analytic"},
             True, False),
            ("respaced-50 learned", "respaced", {"num_steps": 50, "variance": "learned"},
             False, True),
            ("ddim-50", "ddim", {"num_steps": 50}, True, True),
            ("dpm_solver-20", "dpm_solver", {"num_steps": 20}, True, True))


def run_config(name: str, *, steps: int, num_samples: int, vlb_levels: int = 100):
    from configs.vp import iddpm_digits
    from run_lib import demo
    schedule, learned = RUNS[name]
    config = iddpm_digits.get_config(schedule, learned)
    settings = {"device": "cpu", "eval.num_samples": num_samples, "eval.sample_batch": 500,
                "eval.rtol": 1e-3, "eval.atol": 1e-3, "eval.vlb_levels": vlb_levels}
    return demo.apply_settings(config, n_iters=steps, settings=settings)


def _trained(workdir: Path, steps: int) -> bool:
    return (workdir / "checkpoints" / f"checkpoint_{steps}.pt").is_file()


def evaluate_run(name: str, root: Path, *, steps: int, num_samples: int, results: dict) -> None:
    from run_lib import evaluate, quality
    from run_lib.train import train
    config = run_config(name, steps=steps, num_samples=num_samples)
    workdir = root / name
    entry = results.setdefault(name, {})
    if not _trained(workdir, steps):
        start = time.perf_counter()
        train(config, workdir, progress=False)
        entry["train_seconds"] = round(time.perf_counter() - start, 1)
    if "likelihood" not in entry:
        like = evaluate.likelihood(config, workdir, progress=False)
        entry["likelihood"] = {"ode_bpd": like["bits_per_dim"], "ode_nfe": like["nfe_mean"]
                               if "nfe_mean" in like else like["nfe_per_batch"],
                               "vlb_bpd": like["vlb"]["bits_per_dim"],
                               "vlb_variance": like["vlb"]["variance"],
                               "vlb_terms": like["vlb"]["terms_bits_per_dim"],
                               "vlb_nfe": like["vlb"]["nfe"]}
    learned = RUNS[name][1]
    for column, sampler, options, fixed_ok, learned_ok in SAMPLERS:
        if column in entry or not (learned_ok if learned else fixed_ok):
            continue
        config.sampling[sampler] = options
        metrics = quality.evaluate(config, workdir, method=sampler, progress=False)
        entry[column] = ({"fid": metrics["fid"], "is": metrics["is"],
                          "nfe": metrics["protocol"].get("nfe"),
                          "images_per_s": metrics["timing"]["sampling_images_per_s"]}
                         if metrics else None)
        _save(root, results)


def _save(root: Path, results: dict) -> None:
    path = root / "results.json"
    path.write_text(json.dumps(results, indent=1, default=float))


def render(results: dict) -> str:
    columns = [c for c, *_ in SAMPLERS]
    lines = ["| run | ODE bits/dim | VLB bits/dim (variance) | "
             + " | ".join(f"{c}: FID / IS" for c in columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    for name, entry in results.items():
        like = entry.get("likelihood", {})
        cells = [name, f"{like.get('ode_bpd', float('nan')):.3f}",
                 f"{like.get('vlb_bpd', float('nan')):.3f} ({like.get('vlb_variance', '-')})"]
        for column in columns:
            value = entry.get(column)
            cells.append("-" if not value else
                         f"{value['fid']:.2f} / {value['is']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/iddpm_digits")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if not args.render:
        from run_lib import demo
        demo.prepare_quality(run_config("cosine_learned", steps=args.steps,
                                        num_samples=args.num_samples))
        for name in args.runs.split(","):
            start = time.perf_counter()
            evaluate_run(name, root, steps=args.steps, num_samples=args.num_samples,
                         results=results)
            _save(root, results)
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(render(results))


if __name__ == "__main__":
    main()
