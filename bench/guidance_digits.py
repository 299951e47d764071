"""Guided sampling on the digits: the accuracy of the held-out digits classifier
(run_lib.digits_classifier) on generated digits with respect to the requested labels, at
several guidance scales (the README's table).

    python bench/guidance_digits.py --run runs/cond --config configs/vp/ddpm_digits_cond.py
    python bench/guidance_digits.py --run runs/uncond --config configs/vp/ddpm_digits.py \
        --classifier runs/uncond

For each scale w it runs ``run_lib.quality.evaluate`` (what ``main.py --mode eval`` does)
on the checkpoint of --run with config.sampling.guidance_scale = w, class_label = -1 (the
classes in turn), the sampler --sampler (default dpm_solver, 20 steps) and --num-samples
samples, writing each into RUN/guidance_w<w>/, and prints two markdown rows: the digits
classifier's accuracy on the requested labels at each scale with its accuracy on the 297
real test digits (the ceiling), and the digits FID / IS at each scale (the trade-off).
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

    from run_lib import quality, validate
    from run_lib.digits_classifier import digits_classifier, digits_classifier_path
    run = Path(args.run)
    row = {}
    for w in [float(v) for v in args.scales.split(",")]:
        config = validate.load_config_file(args.config)
        config.device = "cpu"
        config.eval.update(num_samples=args.num_samples, sample_batch=args.num_samples)
        config.sampling.guidance_scale = w
        validate.validate_config(config, "eval", sampler=args.sampler,
                                 classifier=args.classifier is not None)
        out = run / f"guidance_w{w:g}"
        out.mkdir(exist_ok=True)
        metrics = quality.evaluate(config, out, method=args.sampler, progress=False,
                                   checkpoint=str(run / "checkpoints" / "latest.pt"),
                                   classifier=args.classifier)
        row[w] = metrics
        print(json.dumps({"scale": w, "guidance": metrics["protocol"]["guidance"]["method"],
                          "accuracy": metrics["class_accuracy"], "fid": metrics["fid"],
                          "is": metrics["is"], "precision": metrics["precision"],
                          "recall": metrics["recall"], "nfe": metrics["protocol"]["nfe"],
                          "samples_per_s": metrics["timing"]["sampling_images_per_s"]}),
              flush=True)
    first = next(iter(row.values()))
    method = first["protocol"]["guidance"]["method"]
    ceiling = digits_classifier(digits_classifier_path(config))[1]["test_accuracy"]
    cells = " | ".join(f"{m['class_accuracy']:.3f}" for m in row.values())
    print(f"| {method} accuracy | {cells} | {ceiling:.3f} |")
    cells = " | ".join(f"{m['fid']:.2f} / {m['is']:.2f}" for m in row.values())
    print(f"| {method} FID / IS | {cells} | - |")


if __name__ == "__main__":
    main()
