"""Fast samplers on trained 8x8-digits score models vs PC and the ODE sampler (issue 5, point 4).

    python bench/digits_samplers.py [--runs-dir DIR] [--train-steps 1500] [--sdes vp,ve,subvp]
        [--num-samples 1000] [--nfe 10,20] [--pc-steps 1000] [--device cpu] [--out r.json]

For each SDE (configs/{vp,ve,subvp}/ddpm_digits.py) it takes the trained run in
RUNS_DIR/<sde> (checkpoints/latest.pt; trained here with ``run_lib.train.train`` for
--train-steps steps if missing or shorter), loads its EMA score function
(``run_lib.evaluate.load_score_fn``; --weights auto takes the raw weights while the EMA
still holds > 1% of the random initial weights) and samples
--num-samples images with

* PC: reverse-diffusion predictor + Langevin corrector (snr 0.16), --pc-steps time steps
  (2 NFE each; the reference setting of Song et al. 2021), final denoising step;
* ODE: probability-flow ODE, dopri5, rtol = atol = 1e-5, final Tweedie step;
* each fast sampler at every --nfe budget B (final Tweedie step included): DDIM (eta 0),
  DPM-Solver++ 2M and 3M and DPM-Solver 2M (noise prediction) with B - 1 log-SNR steps,
  DPM-Solver++ 2S / 3S with (B - 1) // 2 / (B - 1) // 3 steps, EDM Heun with (B + 1) // 2
  Karras sigmas (2 n - 1 NFE), and once adaptive DPM-Solver-12/23++ at DPM-Solver's default
  tolerances (rtol 0.05, atol 0.0078).

Quality against the 297 held-out test digits (run_lib.datasets, split "test"):

* pixel FD: Frechet distance of the pixels in [0, 1] (64-D);
* feature FD: Frechet distance of the penultimate-layer features (64-D, after ReLU) of a small
  CNN trained here on the 1500 training digits (fixed seed; its test accuracy is printed).

Floors: the same distances between the 1500 training digits and the test digits, and between
--num-samples of them (a seeded subset) and the test digits: the floor for the rows, as an FD
of n samples is biased upward by ~1/n. (The classifier was trained on those training digits,
which may put their features slightly apart from the test digits': the feature floor is a
reference, not a lower bound.)
All samplers of one SDE start from the same seed. One torch thread by default.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

import samplers  # noqa: E402
from run_lib import compose  # noqa: E402
from run_lib.datasets import load_digits_images  # noqa: E402
from run_lib.images import to_uint8  # noqa: E402
from samplers.metrics import frechet_distance  # noqa: E402

SDE_NAMES = ("vp", "ve", "subvp")
#: DPM-Solver's default tolerances (also configs/common.py's sampling.adaptive_*).
ADAPTIVE_RTOL, ADAPTIVE_ATOL = 0.05, 0.0078


# ----- the runs -----------------------------------------------------------------------------
def get_config(sde_name: str):
    return importlib.import_module(f"configs.{sde_name}.ddpm_digits").get_config()


def checkpoint_step(workdir: Path) -> int:
    path = workdir / "checkpoints" / "latest.pt"
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def ensure_trained(config, workdir: Path, steps: int) -> None:
    """Train (or resume) ``workdir`` to ``steps`` steps with run_lib.train.train."""
    if checkpoint_step(workdir) >= steps:
        return
    from run_lib.train import train
    config.training.n_iters = steps
    start = time.perf_counter()
    train(config, workdir, progress=False)
    print(f"# trained {workdir} to {steps} steps in {time.perf_counter() - start:.0f} s",
          flush=True)


def ema_initial_share(workdir: Path) -> float:
    """The weight of the initial (random) parameters in the checkpoint's EMA: the product of
    the decays of its updates (models.ExponentialMovingAverage: decay, or min(decay,
    (1 + n) / (10 + n)) with warm-up). Without warm-up it is decay^n: with decay 0.999,
    74% after 300 steps, 37% after 1000, 5% after 3000; with 0.99, 4e-5 after 1000."""
    state = torch.load(workdir / "checkpoints" / "latest.pt", map_location="cpu",
                       weights_only=True)["ema"]
    decay, n = float(state["decay"]), int(state["num_updates"])
    if not state["warmup"]:
        return decay ** n
    return math.prod(min(decay, (1.0 + k) / (10.0 + k)) for k in range(1, n + 1))


def use_ema_weights(choice: str, share: float) -> bool:
    """"ema", "raw", or "auto": the EMA unless it still holds > 1% of the initial weights."""
    if choice == "auto":
        return share < 0.01
    return choice == "ema"


# ----- the classifier -----------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """conv 3x3 (1->16) - ReLU - conv 3x3 (16->32) - ReLU - maxpool 2 - linear 512->64 - ReLU
    (the features) - linear 64->10. Input (B, 1, 8, 8) pixels in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 40,
                     seed: int = 0) -> DigitsCNN:
    """Adam (lr 1e-3), batches of 64, ``epochs`` epochs, seeded; images (N, 1, 8, 8) in [0, 1]."""
    torch.manual_seed(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=g).split(64):
            loss = nn.functional.cross_entropy(net(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return net


@torch.no_grad()
def features(net: DigitsCNN, images_uint8: torch.Tensor) -> torch.Tensor:
    return net.features(images_uint8.float() / 255)


def pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.double().flatten(1) / 255


# ----- the samplers -------------------------------------------------------------------------
def sampler_cases(nfe_budgets, pc_sde=None):
    """(name, budget, fn(score_fn, sde, shape, generator) -> SampleResult) for every sampler;
    PC runs on ``pc_sde`` (the run's SDE with N = --pc-steps), none if it is None."""
    def fast(fn, steps, **kw):
        return lambda score, sde, shape, g: fn(score, sde, shape, num_steps=steps, generator=g,
                                               **kw)

    cases = []
    for b in nfe_budgets:
        n = b - 1
        cases += [
            ("ddim eta=0", b, fast(samplers.ddim_sample, n, eta=0.0)),
            ("dpm++ 2M", b, fast(samplers.dpm_solver_sample, n, order=2)),
            ("dpm++ 3M", b, fast(samplers.dpm_solver_sample, n, order=3)),
            ("dpm 2M (noise pred.)", b, fast(samplers.dpm_solver_sample, n, order=2,
                                             algorithm="dpmsolver")),
            ("dpm++ 2S", b, fast(samplers.dpm_solver_sample, n // 2, order=2, multistep=False)),
            ("dpm++ 3S", b, fast(samplers.dpm_solver_sample, n // 3, order=3, multistep=False)),
            ("edm heun", b, fast(samplers.edm_sample, (b + 1) // 2)),
        ]
    for order, label in ((2, "12"), (3, "23")):
        cases.append((f"dpm adaptive {label}++", None,
            lambda score, sde, shape, g, order=order: samplers.dpm_solver_adaptive_sample(
                score, sde, shape, order=order, rtol=ADAPTIVE_RTOL, atol=ADAPTIVE_ATOL,
                generator=g)))
    cases.append(("ode dopri5", None, lambda score, sde, shape, g: samplers.ode_sample(
        score, sde, shape, method="dopri5", rtol=1e-5, atol=1e-5, denoise=True, generator=g)))
    if pc_sde is not None:
        cases.append((f"pc rd+langevin N={pc_sde.N}", None,
                      lambda score, sde, shape, g: samplers.pc_sample(
                          score, pc_sde, shape, predictor="reverse_diffusion",
                          corrector="langevin", snr=0.16, generator=g)))
    return cases


def run_sampler(fn, score_fn, sde, shape, *, num_samples: int, batch_size: int, seed: int,
                device, centered: bool):
    """All samples in batches from one generator: (uint8 images, NFE per batch, seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    images, nfe = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, num_samples, batch_size):
            size = min(batch_size, num_samples - first)
            r = fn(score_fn, sde, (size, *shape), g)
            images.append(to_uint8(r.x, centered=centered))
            nfe = max(nfe, r.nfe)
    return torch.cat(images), nfe, time.perf_counter() - start


# ----- main ---------------------------------------------------------------------------------
def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default="runs/digits_bench",
                   help="work directories RUNS_DIR/<sde> (trained here if missing)")
    p.add_argument("--train-steps", type=int, default=1500,
                   help="train (or resume) each run to at least this many steps")
    p.add_argument("--sdes", default=",".join(SDE_NAMES))
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--nfe", default="10,20", help="NFE budgets of the fast samplers")
    p.add_argument("--pc-steps", type=int, default=1000, help="PC time steps (0: skip PC)")
    p.add_argument("--skip", default="", help="comma-separated sampler names to skip")
    p.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                   help="EMA or raw network weights (auto: EMA once decay^step < 1%%)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the rows and settings to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budgets = [int(b) for b in args.nfe.split(",") if b]
    skip = {s for s in args.skip.split(",") if s}
    sde_names = [s for s in args.sdes.split(",") if s]
    for s in sde_names:
        if s not in SDE_NAMES:
            raise SystemExit(f"unknown SDE {s!r}; valid: {', '.join(SDE_NAMES)}")

    train_u8, train_labels = (torch.from_numpy(a) for a in load_digits_images("train"))
    test_u8, test_labels = (torch.from_numpy(a) for a in load_digits_images("test"))
    start = time.perf_counter()
    net = train_classifier(train_u8.float() / 255, train_labels, seed=args.seed)
    with torch.no_grad():
        accuracy = (net(test_u8.float() / 255).argmax(1) == test_labels).double().mean().item()
    test_feat, test_pix = features(net, test_u8), pixels(test_u8)
    floors = dict(pixel_fd=frechet_distance(pixels(train_u8), test_pix),
                  feature_fd=frechet_distance(features(net, train_u8), test_feat))
    # the same with as many training digits as samples (the FD of n samples is biased upward
    # by ~1/n: this is the floor to compare the samplers' rows with)
    n_floor = min(args.num_samples, len(train_u8))
    subset = train_u8[torch.randperm(len(train_u8),
                                     generator=torch.Generator().manual_seed(1))[:n_floor]]
    floors.update(n=n_floor, pixel_fd_n=frechet_distance(pixels(subset), test_pix),
                  feature_fd_n=frechet_distance(features(net, subset), test_feat))
    settings = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                    torch=torch.__version__, device=str(device), threads=args.threads,
                    num_samples=args.num_samples, nfe=budgets, pc_steps=args.pc_steps,
                    classifier_test_accuracy=accuracy, floors=floors)
    print("# settings: " + json.dumps(settings))
    print(f"# classifier: test accuracy {accuracy:.3f} on the 297 test digits "
          f"({time.perf_counter() - start:.0f} s to train)")
    print(f"# floors (1500 training digits vs the 297 test digits): pixel FD "
          f"{floors['pixel_fd']:.3f}, feature FD {floors['feature_fd']:.3f}; with {n_floor} "
          f"training digits: {floors['pixel_fd_n']:.3f}, {floors['feature_fd_n']:.3f}",
          flush=True)

    from run_lib.evaluate import load_score_fn
    rows = []
    for sde_name in sde_names:
        config = get_config(sde_name)
        config.device = str(device)
        workdir = Path(args.runs_dir) / sde_name
        ensure_trained(config, workdir, args.train_steps)
        step, share = checkpoint_step(workdir), ema_initial_share(workdir)
        use_ema = use_ema_weights(args.weights, share)
        run = load_score_fn(config, workdir, device, use_ema=use_ema)
        print(f"# {sde_name}: {workdir} at step {step}, {'EMA' if use_ema else 'raw'} weights "
              f"(the EMA's share of the initial weights: {share:.2g})", flush=True)
        shape = (config.data.num_channels, config.data.image_size, config.data.image_size)
        pc_sde = None
        if args.pc_steps:
            config.sde.num_scales = args.pc_steps
            pc_sde = compose.build_sde(config)
        for name, budget, fn in sampler_cases(budgets, pc_sde):
            if name in skip:
                continue
            try:
                images, nfe, seconds = run_sampler(
                    fn, run.score_fn, run.sde, shape, num_samples=args.num_samples,
                    batch_size=args.batch_size, seed=args.seed + 10, device=device,
                    centered=bool(config.data.centered))
            except (FloatingPointError, RuntimeError, ValueError) as error:
                print(f"# {sde_name} {name}: failed ({str(error).split(';')[0]})", flush=True)
                continue
            row = dict(sde=sde_name, step=run.step, weights="ema" if use_ema else "raw",
                       sampler=name, budget=budget, nfe=nfe,
                       seconds=seconds,
                       pixel_fd=frechet_distance(pixels(images), test_pix),
                       feature_fd=frechet_distance(features(net, images), test_feat))
            rows.append(row)
            print(f"# {sde_name} {name}: NFE {nfe}, {seconds:.0f} s, pixel FD "
                  f"{row['pixel_fd']:.3f}, feature FD {row['feature_fd']:.3f}", flush=True)
    print()
    print(markdown(["SDE (train steps, weights)", "sampler", "NFE budget", "NFE", "wall (s)", "pixel FD",
                    "feature FD"],
                   [[f"{r['sde']} ({r['step']}, {r['weights']})", r["sampler"], r["budget"] or "-", r["nfe"],
                     f"{r['seconds']:.0f}", f"{r['pixel_fd']:.3f}", f"{r['feature_fd']:.3f}"]
                    for r in rows]))
    print(f"\nfloors (training vs test digits): pixel FD {floors['pixel_fd']:.3f}, feature FD "
          f"{floors['feature_fd']:.3f} with all 1500; {floors['pixel_fd_n']:.3f}, "
          f"{floors['feature_fd_n']:.3f} with {n_floor}; classifier test accuracy {accuracy:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
