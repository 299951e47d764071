"""Guided sampling on the digits: the accuracy of the held-out digits classifier
(run_lib.digits_classifier) on generated digits with respect to the requested labels, at
several guidance scales (the README's table).

    python bench/guidance_digits.py --run runs/cond --config configs/vp/ddpm_digits_cond.py
    python bench/guidance_digits.py --run runs/uncond --config configs/vp/ddpm_digits.py \
        --classifier runs/uncond

For each scale w it runs ``run_lib.evaluate.sample`` (what ``main.py --mode sample`` does)
on the checkpoint of --run with config.sampling.guidance_scale = w, class_label = -1 (the
classes in turn), the sampler --sampler (default dpm_solver, 20 steps) and --num-samples
samples, writing each into RUN/guidance_w<w>/, and prints one markdown row: the accuracy at
each scale and the classifier's accuracy on the 297 real test digits (the ceiling).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="work directory of a trained run")
    parser.add_argument("--config", required=True)
    parser.add_argument("--classifier", default=None, help="train_classifier checkpoint or "
                        "work directory: classifier guidance (default: the config's guidance)")
    parser.add_argument("--scales", default="0,1,2,4")
    parser.add_argument("--sampler", default="dpm_solver")
    parser.add_argument("--num-samples", type=int, default=500)
    args = parser.parse_args()

    from run_lib import evaluate, validate
    run = Path(args.run)
    row = {}
    for w in [float(v) for v in args.scales.split(",")]:
        config = validate.load_config_file(args.config)
        config.device = "cpu"
        config.sampling.num_samples = args.num_samples
        config.sampling.guidance_scale = w
        validate.validate_config(config, "sample", sampler=args.sampler,
                                 classifier=args.classifier is not None)
        out = run / f"guidance_w{w:g}"
        out.mkdir(exist_ok=True)
        metrics = evaluate.sample(config, out, method=args.sampler, progress=False,
                                  checkpoint=str(run / "checkpoints" / "latest.pt"),
                                  classifier=args.classifier)
        row[w] = metrics
        print(json.dumps({"scale": w, "guidance": metrics["guidance"]["method"],
                          "accuracy": metrics["label_accuracy"]["accuracy"],
                          "pixel_fd_to_test": metrics.get("pixel_fd_to_test"),
                          "nfe": metrics["nfe"], "seconds": metrics["seconds"]}), flush=True)
    first = next(iter(row.values()))
    cells = " | ".join(f"{m['label_accuracy']['accuracy']:.3f}" for m in row.values())
    print(f"| {first['guidance']['method']} | {cells} | "
          f"{first['label_accuracy']['ceiling_on_test_data']:.3f} |")


if __name__ == "__main__":
    main()
