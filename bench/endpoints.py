"""Where should a few-step sampler's grid end? FD / floor on exact scores (a benchmark).

    python bench/endpoints.py [--samples 2000] [--nfe 5,10,20] [--out endpoints.json]
                              [--samplers ddim,dpm_solver,edm,unipc,ipndm] [--schedule FILE]

For every few-step sampler (registry defaults otherwise), SDE (VPSDE(), subVPSDE(),
VESDE(0.01, 20)), distribution and NFE budget (with the final Tweedie step: num_steps =
NFE - 1; EDM: N = (NFE + 1) // 2 levels, 2 N - 1 NFE), the Frechet distance of the samples to
an independent true set divided by the floor (the FD between two true sets of the same size),
for each end point: "eps" (t = 1e-3: sigma = 0.0105 on VP, 1.1e-4 on sub-VP, 0.0101 on VE)
and sigma_min = std / alpha in SIGMA_MINS (skipped where the SDE cannot reach it: VE's
sigma(0) = 0.01). Distributions: the test bed's spread Gaussian (64-D) and eight-mode
mixture, and held-out ones no default was tuned on (a thin anisotropic ring, an 8-D random
mixture, a 2-D two-scale mixture). The summary: per end point, the geometric mean of
FD / floor over distributions, per SDE and NFE. One thread; float64 state.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import samplers  # noqa: E402
import sde_lib  # noqa: E402
from samplers.metrics import frechet_distance  # noqa: E402
from testbed import eight_mode_mixture, random_orthogonal, spread_gaussian  # noqa: E402

F64 = torch.float64
SIGMA_MINS = (0.002, 0.005, 0.01, 0.02, 0.05)
SDES = {"VP": lambda: sde_lib.VPSDE(), "subVP": lambda: sde_lib.subVPSDE(),
        "VE": lambda: sde_lib.VESDE(0.01, 20.0)}


def random_mixture(dim: int, components: int, seed: int, *, spread: float = 2.0,
                   std_min: float = 0.05, std_max: float = 0.5) -> sde_lib.GaussianMixture:
    """A seeded mixture: means N(0, spread^2 I), covariances Q diag(s^2) Q^T with s
    log-uniform in [std_min, std_max], weights uniform in [1, 3]."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(components, dim, generator=g, dtype=F64)
    covs = []
    for _ in range(components):
        q = random_orthogonal(dim, g)
        u = torch.rand(dim, generator=g, dtype=F64)
        s = torch.exp(math.log(std_min) + u * (math.log(std_max) - math.log(std_min)))
        covs.append(q @ torch.diag(s ** 2) @ q.T)
    weights = 1.0 + 2.0 * torch.rand(components, generator=g, dtype=F64)
    return sde_lib.GaussianMixture(weights, means, torch.stack(covs))


def two_scale_mixture() -> sde_lib.GaussianMixture:
    """2-D: a broad component (std 0.6) and three tight ones (std 0.03) around it."""
    means = torch.tensor([[0.0, 0.0], [1.5, 0.5], [-1.2, 1.0], [0.3, -1.6]], dtype=F64)
    stds = torch.tensor([0.6, 0.03, 0.03, 0.03], dtype=F64)
    covs = stds[:, None, None] ** 2 * torch.eye(2, dtype=F64)
    return sde_lib.GaussianMixture(torch.tensor([4.0, 1.0, 2.0, 1.0]), means, covs)


#: name -> (factory, held out): held-out distributions were not used to pick any default
#: before this benchmark.
DISTRIBUTIONS = {
    "gauss64": (lambda: spread_gaussian(64), False),
    "ring8": (lambda: eight_mode_mixture(), False),
    "ring8_thin": (lambda: eight_mode_mixture(seed=3, std=0.06, anisotropy=4.0), True),
    "mix8d": (lambda: random_mixture(8, 6, seed=11), True),
    "two_scale": (two_scale_mixture, True),
}


def run_sampler(name: str, sde, dist, n: int, nfe: int, seed: int, **grid):
    steps = (nfe + 1) // 2 if name == "edm" else nfe - 1
    result = samplers.SAMPLERS[name](dist.score_fn(sde), sde, (n, dist.dim), num_steps=steps,
                                     dtype=F64, generator=torch.Generator().manual_seed(seed),
                                     **grid)
    return result


def ends_for(sde) -> list:
    """("eps", None) and the reachable sigma_min values."""
    out = [("eps", None)]
    for s in SIGMA_MINS:
        try:
            samplers.harness.check_sigma_min(sde, s)
        except ValueError:
            continue
        out.append((f"{s:g}", s))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--nfe", default="5,10,20")
    p.add_argument("--samplers", default="ddim,dpm_solver,edm,unipc,ipndm")
    p.add_argument("--distributions", default=",".join(DISTRIBUTIONS))
    p.add_argument("--sdes", default=",".join(SDES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    budgets = [int(v) for v in args.nfe.split(",")]
    rows = []
    start = time.time()
    for dist_name in args.distributions.split(","):
        dist = DISTRIBUTIONS[dist_name][0]()
        ref = dist.sample(args.samples, generator=torch.Generator().manual_seed(101), dtype=F64)
        second = dist.sample(args.samples, generator=torch.Generator().manual_seed(102), dtype=F64)
        floor = frechet_distance(second, ref)
        for sde_name in args.sdes.split(","):
            sde = SDES[sde_name]()
            for name in args.samplers.split(","):
                for nfe in budgets:
                    for end, sigma_min in ends_for(sde):
                        x = run_sampler(name, sde, dist, args.samples, nfe, args.seed,
                                        sigma_min=sigma_min).x
                        ratio = frechet_distance(x, ref) / floor
                        rows.append(dict(dist=dist_name, sde=sde_name, sampler=name, nfe=nfe,
                                         end=end, ratio=ratio))
            print(f"{dist_name} {sde_name} done ({time.time() - start:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(summary(rows))
    return 0


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(rows) -> str:
    """Per SDE, NFE and end point: the geometric mean of FD / floor over distributions and
    samplers, and per sampler."""
    lines = []
    ends = list(dict.fromkeys(r["end"] for r in rows))
    for sde in dict.fromkeys(r["sde"] for r in rows):
        lines.append(f"\n## {sde}: geometric mean FD / floor over distributions")
        lines.append("| sampler | NFE | " + " | ".join(ends) + " |")
        lines.append("|---" * (len(ends) + 2) + "|")
        for name in list(dict.fromkeys(r["sampler"] for r in rows)) + ["all"]:
            for nfe in dict.fromkeys(r["nfe"] for r in rows):
                cells = []
                for end in ends:
                    vals = [r["ratio"] for r in rows if r["sde"] == sde and r["nfe"] == nfe
                            and r["end"] == end and (name == "all" or r["sampler"] == name)]
                    cells.append(f"{geomean(vals):.2f}" if vals else "-")
                lines.append(f"| {name} | {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
