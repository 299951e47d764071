"""FID is biased upward at small N: the digits FID (and KID, which is unbiased) of N = 300, 500,
1000 and 2000 images, for a model's samples and for real digits, against the reference
statistics of the 1500 training digits (the 64 penultimate features of the digits
classifier, run_lib.digits_classifier; the metrics of run_lib.fidelity).

    python bench/fid_bias.py --eval runs/digits_demo/vp:pc --eval runs/digits_demo/ve:pc
    python bench/fid_bias.py --samples samples.npz --sizes 300,1000,2000

The sets of images and their subsets of N (a size above a set's size is cut to the set):

* ``--eval WORKDIR:SAMPLER``: the samples of a finished ``--mode eval`` (the chunks
  WORKDIR/eval_SAMPLER/chunk_*.npz in order; each chunk is drawn from its own seed, so
  consecutive blocks are independent draws of the model), cut in order into
  floor(n / N) disjoint subsets of N. ``--samples FILE.npz``: uint8 images, the same way.
* the training digits drawn with replacement: ``--draws`` seeded draws of N of the 1500
  images that make the reference: an ideal generator of the training distribution, so
  every FID above 0 is small-N bias (KID is left out: the draws are reference points).
* the 297 held-out test digits, all of them (the only real images outside the reference).
  They are the last 297 of scikit-learn's order, a block of other writers, not a random
  draw: a random 297 of the training digits scores far lower against the other 1203.

For each set and N: the number of subsets, FID mean, standard deviation and range, the
ratio of the mean to the mean at the largest N, KID mean; and a least-squares fit
FID(N) = FID_inf + b / N over all subsets (the Frechet distance of estimated means and
covariances is biased by about b / N; Chong & Forsyth 2020). Markdown on stdout, JSON with
--out-json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def eval_images(spec: str):
    """uint8 images (N, C, H, W) of the chunks of a finished --mode eval, 'WORKDIR:SAMPLER'."""
    import numpy as np
    import torch
    workdir, _, sampler = spec.rpartition(":")
    paths = sorted(Path(workdir, f"eval_{sampler}").glob("chunk_*.npz"))
    if not workdir or not paths:
        raise SystemExit(f"--eval {spec}: no chunks in {workdir}/eval_{sampler}/ (run "
                         "python main.py --mode eval --sampler ... there first)")
    result = json.loads(Path(workdir, f"eval_{sampler}.json").read_text())
    chunks = -(-result["protocol"]["num_samples"] // result["protocol"]["chunk_size"])
    images = []
    for path in paths[:chunks]:
        with np.load(path, allow_pickle=False) as data:
            images.append(data["images"])
    return torch.from_numpy(np.concatenate(images))


def features_of(config, images):
    """(features (N, 64), the extractor) of uint8 digits."""
    import torch
    from run_lib import quality
    extractor = quality.build_extractor(config, torch.device("cpu"))
    features, _ = quality.extract(extractor, images, batch_size=250, device="cpu")
    return features.double(), extractor


def reference(config, extractor):
    """The reference statistics of the 1500 training digits (made when absent)."""
    import torch
    from run_lib import quality
    from run_lib.fidelity import ReferenceStats
    path = quality.reference_path(config, extractor)
    if not path.is_file():
        return quality.make_reference(config, extractor, device=torch.device("cpu"),
                                      path=path, progress=False)[0]
    return ReferenceStats.load(path, extractor=extractor, image_shape=(1, 8, 8))


def disjoint_subsets(n: int, size: int, draws: int = 0) -> list:
    """Index ranges of the n // size consecutive disjoint subsets of ``size`` of n rows."""
    return [range(first, first + size) for first in range(0, n - size + 1, size)]


def drawn_with_replacement(n: int, size: int, draws: int) -> list:
    """``draws`` seeded draws (seeds 0, 1, ...) of ``size`` indices of n, with replacement."""
    import torch
    return [torch.randint(0, n, (size,), generator=torch.Generator().manual_seed(seed))
            for seed in range(draws)]


def subset_metrics(features, ref, subsets, *, kid: bool) -> list[dict]:
    """FID (and KID when ``kid``) of each subset (index sequence) of ``features``."""
    from run_lib.fidelity import frechet_distance, kernel_distance
    values = []
    for index in subsets:
        part = features[list(index)]
        value = {"fid": frechet_distance(part.mean(0), part.T.cov(), len(part), ref)}
        if kid:
            value["kid"] = kernel_distance(ref.features, part.float(), subsets=100,
                                           subset_size=min(1000, len(part)), seed=0)["kid"]
        values.append(value)
    return values


def fit_inverse_n(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares of FID = a + b / N over (N, FID) points; (a, b)."""
    x = [1.0 / n for n, _ in points]
    y = [f for _, f in points]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((v - mx) ** 2 for v in x)
    b = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


def bias_rows(name: str, features, ref, sizes, *, choose, draws: int,
              kid: bool) -> tuple[list[dict], dict]:
    """One row per N of ``sizes`` (cut to the set's size) for the set ``name``, whose
    subsets ``choose(n, N, draws)`` gives, and its 1 / N fit."""
    rows, points = [], []
    if choose is disjoint_subsets:
        sizes = {min(s, len(features)) for s in sizes}
    for size in sorted(sizes):
        values = subset_metrics(features, ref, choose(len(features), size, draws), kid=kid)
        fids = [v["fid"] for v in values]
        points += [(size, f) for f in fids]
        rows.append({"set": name, "n": size, "subsets": len(values),
                     "fid_mean": statistics.fmean(fids),
                     "fid_std": statistics.stdev(fids) if len(fids) > 1 else None,
                     "fid_min": min(fids), "fid_max": max(fids),
                     "kid_mean": statistics.fmean(v["kid"] for v in values) if kid else None})
    for row in rows:
        row["ratio_to_largest_n"] = row["fid_mean"] / rows[-1]["fid_mean"]
    a, b = fit_inverse_n(points) if len({n for n, _ in points}) > 1 else (None, None)
    return rows, {"set": name, "fid_inf": a, "b": b, "num_images": len(features)}


def render(rows: list[dict], fits: list[dict]) -> str:
    """Markdown: the rows, then the 1 / N fits."""
    def f(value, spec):
        return "-" if value is None else format(value, spec)
    lines = ["| set | N | subsets | FID mean | FID std | FID min - max | mean / mean at the "
             "largest N | KID (mean) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['n']} | {r['subsets']} | {r['fid_mean']:.3f} | "
                     f"{f(r['fid_std'], '.3f')} | {r['fid_min']:.3f} - {r['fid_max']:.3f} | "
                     f"{r['ratio_to_largest_n']:.2f} | {f(r['kid_mean'], '.2f')} |")
    lines += ["", "| set | images | FID_inf of the fit FID(N) = FID_inf + b / N | b |",
              "|---|---|---|---|"]
    lines += [f"| {x['set']} | {x['num_images']} | {f(x['fid_inf'], '.3f')} | "
              f"{f(x['b'], '.0f')} |" for x in fits]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", action="append", default=[], metavar="WORKDIR:SAMPLER",
                        help="samples of a finished --mode eval (repeatable)")
    parser.add_argument("--samples", action="append", default=[], metavar="FILE.npz",
                        help="uint8 images (repeatable)")
    parser.add_argument("--sizes", default="300,500,1000,2000", help="subset sizes N")
    parser.add_argument("--draws", type=int, default=5,
                        help="draws of the training digits per N")
    parser.add_argument("--data-dir", default="data", help="config.data.data_dir (classifier "
                        "and reference statistics)")
    parser.add_argument("--out-json")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(1)
    from configs.vp.ddpm_digits import get_config
    from run_lib import quality
    from run_lib.datasets import build_dataset
    config = get_config()
    config.data.data_dir = args.data_dir
    sizes = [int(s) for s in args.sizes.split(",")]
    independent = dict(choose=disjoint_subsets, kid=True)
    sets = [(f"samples {spec}", eval_images(spec), independent) for spec in args.eval]
    sets += [(f"samples {path}", quality.read_images_npz(path), independent)
             for path in args.samples]
    sets += [("training digits drawn with replacement", build_dataset(config, "train").images,
              dict(choose=drawn_with_replacement, kid=False)),
             ("held-out test digits", build_dataset(config, "test").images, independent)]
    rows, fits = [], []
    for name, images, how in sets:
        features, extractor = features_of(config, images)
        ref = reference(config, extractor)
        set_rows, fit = bias_rows(name, features, ref, sizes, draws=args.draws, **how)
        rows += set_rows
        fits.append(fit)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"rows": rows, "fits": fits}, indent=2) + "\n")
    print(render(rows, fits))


if __name__ == "__main__":
    main()
