"""Fit optimized step schedules for a few-step sampler on a proxy of the data.

    python bench/fit_schedule.py --solver dpm_solver --sde vp --proxy digits \
        --nfe 5,10,20 --out schedules/dpm_solver_vp_digits.json
    python main.py --mode sample ... --sampler dpm_solver \
        --config.sampling.dpm_solver.schedule=schedules/dpm_solver_vp_digits.json

The proxy is a ``sde_lib.GaussianMixture`` standing in for the data: ``digits`` (a Gaussian
with the mean and covariance of scikit-learn's 8x8 digits scaled to [-1, 1], 64-D),
``eight_modes`` (``sde_lib.eight_mode_mixture``), ``gaussian:<file.npz>`` (arrays ``mean``
(D,) and ``cov`` (D, D), e.g. the moments of a data set or of a model's samples) or
``mixture:<file.npz>`` (``weights`` (K,), ``means`` (K, D), ``covs`` (K, D, D): a fitted
mixture). For every NFE budget (with the sampler's final denoising step;
``samplers.schedules_opt.grid_intervals``) ``samplers.schedules_opt.fit_schedule`` places the
steps (dynamic programming on the first-order local error over a fine log-SNR grid, then
coordinate descent on the solver's own error against the proxy's exact trajectories) and the
schedules go to one JSON file with the solver, its options, the SDE, the proxy's description
and the method, which every few-step sampler reads as ``schedule=<file>``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sde_lib  # noqa: E402
from samplers.schedules_opt import (fit_schedule, grid_intervals, proxy_description,  # noqa: E402
                                    save_schedule)

F64 = torch.float64
SDES = {"vp": lambda: sde_lib.VPSDE(), "subvp": lambda: sde_lib.subVPSDE(),
        "ve": lambda: sde_lib.VESDE(0.01, 50.0), "ve20": lambda: sde_lib.VESDE(0.01, 20.0)}


def build_proxy(spec: str) -> tuple[sde_lib.GaussianMixture, str]:
    """(proxy, its name) from --proxy."""
    if spec == "digits":
        from run_lib.datasets import load_digits_images
        images, _ = load_digits_images("train")
        x = torch.as_tensor(images.reshape(len(images), -1), dtype=F64) / 255.0 * 2.0 - 1.0
        mean = x.mean(0)
        cov = torch.cov(x.T) + 1e-6 * torch.eye(x.shape[1], dtype=F64)
        return sde_lib.GaussianMixture.gaussian(mean, cov), "digits (train) mean + covariance, [-1, 1]"
    if spec == "eight_modes":
        return sde_lib.eight_mode_mixture(), "sde_lib.eight_mode_mixture()"
    kind, _, path = spec.partition(":")
    if kind in ("gaussian", "mixture") and path:
        arrays = np.load(path)
        if kind == "gaussian":
            return sde_lib.GaussianMixture.gaussian(arrays["mean"], arrays["cov"]), f"gaussian {path}"
        return sde_lib.GaussianMixture(arrays["weights"], arrays["means"], arrays["covs"]), f"mixture {path}"
    raise SystemExit(f"unknown --proxy {spec!r}: digits, eight_modes, gaussian:<npz>, mixture:<npz>")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--solver", default="dpm_solver",
                   choices=["ddim", "dpm_solver", "edm", "unipc", "ipndm"])
    p.add_argument("--options", default="{}", help="the solver's options as JSON, e.g. '{\"order\": 3}'")
    p.add_argument("--sde", default="vp", choices=sorted(SDES))
    p.add_argument("--proxy", default="digits")
    p.add_argument("--nfe", default="5,10,20")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--sigma-min", type=float, default=None,
                   help="the grid's end noise level (default: the sampler's default end point)")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--fine", type=int, default=64)
    p.add_argument("--substeps", type=int, default=4)
    p.add_argument("--sweeps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import samplers
    options = json.loads(args.options)
    sigma_min = args.sigma_min
    if sigma_min is None:
        sigma_min = samplers.SAMPLERS[args.solver].defaults.get("sigma_min")
    sde = SDES[args.sde]()
    proxy, proxy_name = build_proxy(args.proxy)
    method = {"name": "GITS dynamic programming + solver refinement",
              "fine": args.fine, "substeps": args.substeps, "samples": args.samples,
              "sweeps": args.sweeps, "seed": args.seed, "eps": args.eps, "sigma_min": sigma_min}
    entries = {}
    for nfe in (int(v) for v in args.nfe.split(",")):
        n = grid_intervals(args.solver, nfe)
        start = time.time()
        fit = fit_schedule(proxy, sde, args.solver, n, solver_options=options, eps=args.eps,
                           sigma_min=sigma_min, n_samples=args.samples, fine=args.fine,
                           substeps=args.substeps, sweeps=args.sweeps, seed=args.seed)
        entries[n] = {"nfe": nfe, "sigmas": fit["sigmas"], "rms_error": fit["error"],
                      "rms_error_logsnr": fit["error_logsnr"], "rms_error_dp": fit["error_dp"]}
        print(f"NFE {nfe} ({n} intervals, {time.time() - start:.0f} s): RMS error on the proxy "
              f"{fit['error']:.4g} (log-SNR grid {fit['error_logsnr']:.4g}, dynamic programming "
              f"{fit['error_dp']:.4g}); sigmas {[round(s, 4) for s in fit['sigmas']]}", flush=True)
    save_schedule(args.out, solver=args.solver, solver_options=options, sde=repr(sde),
                  proxy={"name": proxy_name, **proxy_description(proxy)}, method=method,
                  entries=entries)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
