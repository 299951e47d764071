"""Where the time of ``python main.py --mode demo`` goes (issue 10, point 10).

    python bench/demo_profile.py train      [--threads 1,2] [--batch-sizes 32,64,128] [--steps 40]
    python bench/demo_profile.py nfe        [--threads 1,2] [--batch-sizes 50,100,297,594]
    python bench/demo_profile.py likelihood --workdir RUN [--config vp] [--tolerances 1e-5,1e-4,1e-3]
    python bench/demo_profile.py pc         --workdir RUN [--config vp] [--pc-steps 1000,500,250]
        [--snr 0.16] [--correctors langevin,none] [--seeds 0,1,2] [--num-samples 400]

* ``train``: seconds per optimizer step (run_lib.train.train_step: DSM loss, backward, Adam,
  EMA; no scheduled actions) of the demo's network (configs/vp/ddpm_digits.py, the
  0.68 M-parameter DDPM U-Net on 8x8 digits) per torch thread count and batch size; median
  of --steps steps after 5 warm-up steps, images/s.
* ``nfe``: seconds per score evaluation (no_grad forward, what PC and the ODE sampler pay per
  NFE) and per forward + vector-Jacobian product (what the likelihood ODE pays per NFE),
  per thread count and batch size.
* ``likelihood``: bits/dim of the test digits through the probability-flow ODE (dopri5) of
  a trained run at each rtol = atol: NFE, seconds, bits/dim +- standard error, and the
  paired difference to the first tolerance (same dequantization and Hutchinson probes:
  the solver's error alone), with its standard error over the images.
* ``pc``: the PC sampler (reverse diffusion + Langevin, or no corrector) of a trained run
  with N time steps (2 N NFE; N without corrector): seconds and pixel FD / feature FD (bench/digits_samplers.py's classifier) of
  config.sampling.num_samples samples against the test digits, for several seeds.

Every line records the 1-minute load average before and after, since another process on a
2-core machine changes these timings by 2x or more.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))       # after the packages: bench/models.py is no package

from run_lib import compose  # noqa: E402


def load() -> float:
    return round(os.getloadavg()[0], 2)


def get_config(name: str):
    """"vp" -> configs/vp/ddpm_digits.py; "ve/ncsn" -> configs/ve/ncsn_digits.py."""
    sde, _, model = name.partition("/")
    return importlib.import_module(f"configs.{sde}.{model or 'ddpm'}_digits").get_config()


def ints(text):
    return [int(v) for v in text.split(",") if v]


def floats(text):
    return [float(v) for v in text.split(",") if v]


def emit(record: dict, out) -> None:
    print(json.dumps(record), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----- training steps ------------------------------------------------------------------------
def profile_train(args) -> None:
    from run_lib.distributed import DistContext
    from run_lib.state import build_train_state
    from run_lib.train import Objective, train_step
    device = torch.device("cpu")
    for threads in ints(args.threads):
        torch.set_num_threads(threads)
        for batch in ints(args.batch_sizes):
            config = get_config(args.config)
            config.training.batch_size = batch
            sde = compose.build_sde(config)
            state = build_train_state(config, device, DistContext())
            objective = Objective(config, sde, state.model, DistContext(), device)
            state.model.train()
            g = torch.Generator().manual_seed(0)
            x = torch.rand(batch, 1, 8, 8, generator=g) * 2 - 1
            labels = torch.zeros(batch, dtype=torch.long)
            before, times = load(), []
            for k in range(5 + args.steps):
                start = time.perf_counter()
                stats = train_step(state, x, labels, objective)
                stats.loss.item()
                if k >= 5:
                    times.append(time.perf_counter() - start)
            median = statistics.median(times)
            emit({"part": "train", "config": args.config, "threads": threads, "batch": batch,
                  "s_per_step": round(median, 4), "images_per_s": round(batch / median, 1),
                  "load_before": before, "load_after": load()}, args.out)


# ----- score evaluations ---------------------------------------------------------------------
def profile_nfe(args) -> None:
    config = get_config(args.config)
    model = compose.build_model(config).eval()
    sde = compose.build_sde(config)
    score_fn = compose.build_score_fn(config, sde, model)
    for threads in ints(args.threads):
        torch.set_num_threads(threads)
        for batch in ints(args.batch_sizes):
            x = torch.randn(batch, 1, 8, 8)
            t = torch.full((batch,), 0.5)
            before = load()
            fwd, vjp = [], []
            for k in range(3 + args.steps):
                start = time.perf_counter()
                with torch.no_grad():
                    score_fn(x, t)
                mid = time.perf_counter()
                y = x.clone().requires_grad_(True)
                torch.autograd.grad(score_fn(y, t), y, grad_outputs=x)
                end = time.perf_counter()
                if k >= 3:
                    fwd.append(mid - start)
                    vjp.append(end - mid)
            emit({"part": "nfe", "threads": threads, "batch": batch,
                  "ms_forward": round(1e3 * statistics.median(fwd), 2),
                  "ms_forward_vjp": round(1e3 * statistics.median(vjp), 2),
                  "load_before": before, "load_after": load()}, args.out)


# ----- likelihood tolerances -----------------------------------------------------------------
def profile_likelihood(args) -> None:
    from run_lib import evaluate
    from run_lib.datasets import build_dataset
    torch.set_num_threads(ints(args.threads)[0])
    config = get_config(args.config)
    config.device = "cpu"
    run = evaluate.load_score_fn(config, args.workdir, "cpu")
    test = build_dataset(config, "test")
    count = args.num_images or len(test)
    images = test.images[:count]
    reference = None
    for tol in floats(args.tolerances):
        before, start = load(), time.perf_counter()
        generator = torch.Generator().manual_seed(int(config.seed) + evaluate.LIKELIHOOD_SEED)
        options = dict(evaluate.ode_options(config), rtol=tol, atol=tol)
        result = samplers_bpd(run, images, config, generator, options)
        seconds = time.perf_counter() - start
        bpd = result.bpd.double()
        record = {"part": "likelihood", "workdir": str(args.workdir), "tol": tol,
                  "num_images": count, "nfe": int(result.nfe), "seconds": round(seconds, 1),
                  "bits_per_dim": round(bpd.mean().item(), 4),
                  "standard_error": round(bpd.std().item() / count ** 0.5, 4),
                  "threads": torch.get_num_threads(), "load_before": before,
                  "load_after": load()}
        if reference is None:
            reference = bpd
        else:
            diff = bpd - reference
            record.update(paired_difference=round(diff.mean().item(), 5),
                          paired_difference_se=round(diff.std().item() / count ** 0.5, 5),
                          max_abs_difference=round(diff.abs().max().item(), 4))
        emit(record, args.out)


def samplers_bpd(run, images, config, generator, options):
    import samplers
    return samplers.bits_per_dim(run.score_fn, run.sde, images, centered=bool(config.data.centered),
                                 dequantize=True, generator=generator, **options)


# ----- PC steps ------------------------------------------------------------------------------
def profile_pc(args) -> None:
    import samplers
    from digits_samplers import features, pixels, train_classifier
    from run_lib import evaluate
    from run_lib.datasets import load_digits_images
    from run_lib.images import to_uint8
    from samplers.metrics import frechet_distance
    torch.set_num_threads(ints(args.threads)[0])
    train_u8, train_labels = (torch.from_numpy(a) for a in load_digits_images("train"))
    test_u8 = torch.from_numpy(load_digits_images("test")[0])
    net = train_classifier(train_u8.float() / 255, train_labels, seed=0)
    test_pix, test_feat = pixels(test_u8), features(net, test_u8)
    config = get_config(args.config)
    config.device = "cpu"
    run = evaluate.load_score_fn(config, args.workdir, "cpu")
    n = args.num_samples or int(config.sampling.num_samples)
    for steps in ints(args.pc_steps):
        config.sde.num_scales = steps
        sde = compose.build_sde(config)
        for corrector, snr in ((c, s) for c in args.correctors.split(",") for s in floats(args.snr)):
            if corrector == "none" and snr != floats(args.snr)[0]:
                continue
            for seed in ints(args.seeds):
                g = torch.Generator().manual_seed(int(config.seed) + evaluate.SAMPLE_SEED + seed)
                before, start = load(), time.perf_counter()
                r = samplers.pc_sample(run.score_fn, sde, (n, 1, 8, 8),
                                       predictor="reverse_diffusion", corrector=corrector,
                                       snr=snr, generator=g)
                seconds = time.perf_counter() - start
                images = to_uint8(r.x, centered=True)
                emit({"part": "pc", "workdir": str(args.workdir), "steps": steps,
                      "corrector": corrector, "snr": snr, "num_samples": n,
                      "seed": seed, "nfe": int(r.nfe), "seconds": round(seconds, 1),
                      "pixel_fd": round(frechet_distance(pixels(images), test_pix), 4),
                      "feature_fd": round(frechet_distance(features(net, images), test_feat), 2),
                      "threads": torch.get_num_threads(), "load_before": before,
                      "load_after": load()}, args.out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["train", "nfe", "likelihood", "pc"])
    p.add_argument("--config", default="vp", help="vp | ve | subvp (configs/<sde>/ddpm_digits.py) "
                   "or <sde>/<model> (configs/<sde>/<model>_digits.py; train only)")
    p.add_argument("--workdir", help="a trained run (likelihood, pc)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch-sizes", default="32,64,128")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--tolerances", default="1e-5,1e-4,1e-3")
    p.add_argument("--num-images", type=int, default=0, help="likelihood images (0: all 297)")
    p.add_argument("--pc-steps", default="1000,500,250")
    p.add_argument("--snr", default="0.16")
    p.add_argument("--correctors", default="langevin", help="langevin and/or none")
    p.add_argument("--seeds", default="0")
    p.add_argument("--num-samples", type=int, default=0)
    p.add_argument("--out", help="append the JSON lines to this file")
    args = p.parse_args(argv)
    {"train": profile_train, "nfe": profile_nfe, "likelihood": profile_likelihood,
     "pc": profile_pc}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
