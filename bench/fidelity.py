"""Feature-extraction throughput of the metrics' feature networks (not a test).

    OMP_NUM_THREADS=1 python bench/fidelity.py                       # digits classifier only
    OMP_NUM_THREADS=1 python bench/fidelity.py --inception /path/to/inception-2015-12-05.pt
    python bench/fidelity.py --device cuda --inception /path/to/inception-2015-12-05.pt

Times ``extractor(images)`` (run_lib.fidelity.FeatureExtractor: uint8 images -> float64
features and logits, on the images' device) on a fixed random uint8 batch:

* **digits**: ``run_lib.digits_classifier.DigitsFeatures`` on (B, 1, 8, 8) digits, with an
  untrained ``DigitsNet`` (the weights do not change the time; skipped with a note when the
  class is absent);
* **inception**: ``run_lib.inception.load_inception(--inception)`` on (B, 3, 32, 32) CIFAR-sized
  images (the network resizes them to 299 x 299 itself; the TorchScript file or torch-fidelity's
  weights, whichever file is given).

Per extractor: one untimed warm-up call, then calls until ``--min-time`` seconds and at least
``--repeats`` calls have passed; the median call gives images/s and ms/batch (on CUDA,
``torch.cuda.synchronize()`` brackets every call). ``--threads`` sets torch's CPU threads
(default 1; OMP_NUM_THREADS=1 keeps other libraries to one thread too). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                   # run from a checkout, uninstalled


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help="inception-2015-12-05.pt (or torch-fidelity's .pth); none: skipped")
    parser.add_argument("--batch", type=int, default=100, help="images per call (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed calls")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="and at least this many seconds of timed calls (default 2)")
    return parser.parse_args(argv)


def random_images(shape, device, seed=0) -> torch.Tensor:
    """A fixed uint8 batch of ``shape`` (B, C, H, W) on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device)


def time_call(call, device, repeats: int, min_time: float) -> list[float]:
    """Seconds of each timed ``call()`` after one untimed warm-up call."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()
    times = []
    while len(times) < repeats or sum(times) < min_time:
        times.append(once())
    return times


def digits_extractor(device):
    """DigitsFeatures around an untrained DigitsNet, or None when the class is absent."""
    from run_lib import digits_classifier
    features = getattr(digits_classifier, "DigitsFeatures", None)
    if features is None:
        return None
    return features(digits_classifier.DigitsNet().to(device))


def measure(name, extractor, shape, device, args) -> dict:
    """One table row: the extractor's images/s on a random uint8 batch of ``shape``."""
    images = random_images(shape, device)
    times = time_call(lambda: extractor(images), device, args.repeats, args.min_time)
    median = statistics.median(times)
    return {"extractor": name, "id": extractor.name, "shape": "x".join(map(str, shape[1:])),
            "batch": shape[0], "calls": len(times), "ms": 1e3 * median,
            "rate": shape[0] / median}


def table(rows) -> str:
    lines = ["| extractor | name | image | batch | timed calls | ms / batch (median) "
             "| images / s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['extractor']} | {r['id']} | {r['shape']} | {r['batch']} | "
                     f"{r['calls']} | {r['ms']:.2f} | {r['rate']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    digits = digits_extractor(device)
    if digits is None:
        print("note: run_lib.digits_classifier.DigitsFeatures does not exist yet: digits skipped")
    else:
        rows.append(measure("digits", digits, (args.batch, 1, 8, 8), device, args))
    if args.inception:
        from run_lib.inception import load_inception
        try:
            extractor = load_inception(args.inception, device)
        except (FileNotFoundError, ImportError, ValueError) as error:
            sys.exit(f"error: {error}")
        rows.append(measure("inception", extractor, (args.batch, 3, 32, 32), device, args))
    else:
        print("note: no --inception PATH: the Inception network is not measured")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"\ndevice {device} ({where or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
