"""Sample-quality metrics in a feature space: FID, KID, Inception Score, precision / recall.

    extractor = ...                          # a FeatureExtractor (run_lib.features)
    features, logits = extractor(images)     # uint8 (B, C, H, W) -> (B, D), (B, K)
    ref = ReferenceStats.load(path, extractor=extractor, image_shape=(3, 32, 32))
    metrics = quality_metrics(features, logits, ref, seed=0)

FID, KID and IS are torchmetrics' (FrechetInceptionDistance with float64 statistics,
KernelInceptionDistance, InceptionScore), fed with features that were extracted once: the
extractor runs batched on the sampling device and its output is kept in resumable chunks,
so the library's metric objects get a pass-through network (``_GivenFeatures``). Precision
and recall are not in torchmetrics; they are the k-NN definition of Kynkaenniemi et al.
(2019), ``precision_recall``.

torchmetrics is imported lazily: a missing or broken install (torch-fidelity pulls in a
torchvision that may not load with the installed torch) is a one-line ImportError that
says what to do, and the rest of the project works without it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

__all__ = ["FeatureExtractor", "ReferenceStats", "FeatureAccumulator", "import_torchmetrics",
           "frechet_distance", "kernel_distance", "inception_score", "precision_recall",
           "quality_metrics", "file_sha256", "state_dict_sha256", "REFERENCE_FORMAT"]

#: Version tag of the reference-statistics file layout.
REFERENCE_FORMAT = "score-sde-ref-stats-v1"


def import_torchmetrics():
    """torchmetrics' FrechetInceptionDistance, KernelInceptionDistance and InceptionScore
    classes (attributes of the returned namespace), or a one-line ImportError naming the cause and the fix."""
    try:
        from torchmetrics.image import fid, inception, kid
    except ModuleNotFoundError as error:
        if error.name == "torchmetrics":
            raise ImportError("FID / KID / IS need torchmetrics, which is not installed: pip "
                              "install torchmetrics (or pip install -e . in this project)") from None
        raise ImportError(f"torchmetrics could not be imported ({error}; torch-fidelity imports "
                          "torchvision): install a torchvision built for this torch, or pip "
                          "uninstall torch-fidelity") from None
    except (ImportError, OSError, RuntimeError) as error:
        raise ImportError(f"torchmetrics could not be imported ({' '.join(str(error).split())}): "
                          "reinstall torchmetrics / torch-fidelity / torchvision for this torch, "
                          "or pip uninstall torch-fidelity") from None
    return SimpleNamespace(FrechetInceptionDistance=fid.FrechetInceptionDistance,
                           KernelInceptionDistance=kid.KernelInceptionDistance,
                           InceptionScore=inception.InceptionScore)


# ----------------------------------------------------------------------------- extractors

def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Hex sha256 of a network's parameters and buffers (names, shapes, float32 values)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        array = value.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class FeatureExtractor(nn.Module):
    """The feature network of the metrics: uint8 images (B, C, H, W) in [0, 255] -> (features
    (B, num_features), logits (B, num_logits) or None), both float64 on the input's device.

    Subclasses set ``name`` (e.g. "inception-v3-tf-2015-12-05", "digits-classifier"),
    ``sha256`` (of the weight file or the weights), ``num_features``, ``num_logits`` (0: no
    Inception Score) and ``image_shape`` ((C, H, W) the extractor expects, or None: any size,
    resized inside), and implement ``extract``. ``identity()`` is what reference statistics
    store and what evaluations check.
    """

    name: str = "feature-extractor"
    sha256: str = ""
    num_features: int = 0
    num_logits: int = 0
    image_shape: tuple[int, int, int] | None = None

    def identity(self) -> dict:
        """{"name", "sha256", "num_features", "num_logits"}: the extractor's fingerprint."""
        return {"name": self.name, "sha256": self.sha256, "num_features": int(self.num_features),
                "num_logits": int(self.num_logits)}

    def check_images(self, images: torch.Tensor) -> None:
        """A one-line ValueError unless ``images`` is uint8 (B, C, H, W) of ``image_shape``."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{self.name} takes uint8 images (B, C, H, W) in [0, 255], got "
                             f"{str(images.dtype).replace('torch.', '')} of shape "
                             f"{tuple(images.shape)}")
        if self.image_shape is not None and tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"{self.name} takes images of shape {tuple(self.image_shape)}, got "
                             f"{tuple(images.shape[1:])}")

    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_images(images)
        features, logits = self.extract(images)
        return features.double(), None if logits is None else logits.double()


class _GivenFeatures(nn.Module):
    """The 'network' handed to torchmetrics: features already extracted pass through (float64)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


# ----------------------------------------------------------------------------- accumulate

class FeatureAccumulator:
    """Running float64 sums of features (the sufficient statistics of FID) plus the first
    ``keep`` feature rows (for KID and precision / recall) and all logits (for IS).

    update(features (B, D), logits (B, K) or None); mean() (D,), covariance() (D, D) with
    the unbiased 1 / (N - 1), both float64 on the CPU."""

    def __init__(self, num_features: int, keep: int):
        self.count = 0
        self.total = torch.zeros(num_features, dtype=torch.float64)
        self.products = torch.zeros(num_features, num_features, dtype=torch.float64)
        self.keep = int(keep)
        self.kept: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def update(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        f = features.detach().to("cpu", torch.float64)
        self.count += f.shape[0]
        self.total += f.sum(dim=0)
        self.products += f.T @ f
        room = self.keep - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(f[:room].float())
        if logits is not None:
            self.logits.append(logits.detach().to("cpu", torch.float32))   # 50k x 1008: 200 MB

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def covariance(self) -> torch.Tensor:
        mean = self.mean()
        return (self.products - self.count * torch.outer(mean, mean)) / (self.count - 1)

    def features(self) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.zeros(0, len(self.total))

    def all_logits(self) -> torch.Tensor | None:
        """Every logit row (N, K), float64, or None."""
        return torch.cat(self.logits).double() if self.logits else None


# ----------------------------------------------------------------------------- references

@dataclass
class ReferenceStats:
    """Reference statistics of a data set in one extractor's feature space.

    mean (D,) and covariance (D, D) float64 of all ``num_images`` images; ``features`` (M, D)
    float32, the first M <= num_images of them (KID, precision / recall); ``extractor`` the
    extractor's identity(); ``image_shape`` (C, H, W) of the images; ``source`` where they
    came from (e.g. "cifar10:train")."""

    mean: torch.Tensor
    covariance: torch.Tensor
    num_images: int
    features: torch.Tensor
    extractor: dict
    image_shape: tuple[int, int, int]
    source: str
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_accumulator(cls, acc: FeatureAccumulator, extractor: dict, image_shape, source: str,
                         **extra) -> "ReferenceStats":
        if acc.count < 2:
            raise ValueError(f"reference statistics need at least 2 images, got {acc.count}")
        return cls(acc.mean(), acc.covariance(), acc.count, acc.features(), dict(extractor),
                   tuple(int(s) for s in image_shape), source, dict(extra))

    def save(self, path) -> Path:
        """Write an .npz (plain arrays, the metadata as a JSON string: no pickles), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": REFERENCE_FORMAT, "num_images": self.num_images,
                "extractor": self.extractor, "image_shape": list(self.image_shape),
                "source": self.source, **self.extra}
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, mean=self.mean.numpy(), covariance=self.covariance.numpy(),
                 features=self.features.float().numpy(), meta=np.array(json.dumps(meta)))
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path, *, extractor: "FeatureExtractor | dict | None" = None,
             image_shape=None) -> "ReferenceStats":
        """Read ``save``'s file; a one-line ValueError when it was made by another extractor
        (name or weights hash differ) or from images of another shape than ``image_shape``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reference statistics at {path}: make them with --mode "
                                    "ref_stats (or set config.eval.ref_stats to the file)")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                stats = cls(torch.from_numpy(data["mean"]).double(),
                            torch.from_numpy(data["covariance"]).double(), int(meta["num_images"]),
                            torch.from_numpy(data["features"]).float(), dict(meta["extractor"]),
                            tuple(meta["image_shape"]), str(meta["source"]),
                            {k: v for k, v in meta.items() if k not in _META_KEYS})
        except (KeyError, ValueError, OSError, TypeError) as error:
            raise ValueError(f"{path} is not a reference-statistics file of --mode ref_stats "
                             f"({error}): make it again") from None
        if meta.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, expected "
                             f"{REFERENCE_FORMAT!r}: make it again with --mode ref_stats")
        stats.check(extractor, image_shape, path)
        return stats

    def check(self, extractor=None, image_shape=None, path="reference statistics") -> None:
        """The one-line refusal of statistics made by another extractor or at another shape."""
        if extractor is not None:
            want = extractor.identity() if isinstance(extractor, FeatureExtractor) else extractor
            for key in ("name", "sha256", "num_features"):
                if self.extractor.get(key) != want.get(key):
                    raise ValueError(
                        f"{path} was made with feature extractor {self.extractor.get('name')} "
                        f"(sha256 {str(self.extractor.get('sha256'))[:12]}), but this evaluation "
                        f"uses {want.get('name')} (sha256 {str(want.get('sha256'))[:12]}): make "
                        "the reference statistics again with this extractor (--mode ref_stats)")
        if image_shape is not None and tuple(image_shape) != tuple(self.image_shape):
            raise ValueError(f"{path} holds statistics of {tuple(self.image_shape)} images, but "
                             f"the samples are {tuple(image_shape)}: make reference statistics "
                             "at this resolution (--mode ref_stats)")


_META_KEYS = ("format", "num_images", "extractor", "image_shape", "source")


# ----------------------------------------------------------------------------- metrics

@contextlib.contextmanager
def _quiet():
    """torchmetrics' user warnings (features kept in memory; states set before compute) off."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchmetrics")
        warnings.filterwarnings("ignore", message=".*(will save all extracted features|"
                                "called before the ``update``).*")
        yield


@contextlib.contextmanager
def _seeded(seed: int):
    """A fork of the global CPU RNG seeded with ``seed`` (torchmetrics draws its subsets and
    splits from the global RNG); the caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: The metric objects compute on this process's features only (the features of every rank
#: are already gathered from the chunk files; torchmetrics would otherwise all-gather).
_LOCAL = {"sync_on_compute": False}


def frechet_distance(fake_mean, fake_cov, fake_count: int, ref: ReferenceStats) -> float:
    """FID (Heusel et al. 2017): |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^{1/2}), computed
    by torchmetrics' FrechetInceptionDistance from float64 sums; the fake statistics are
    mean (D,), unbiased covariance (D, D) of ``fake_count`` samples."""
    image = import_torchmetrics()
    with _quiet():
        metric = image.FrechetInceptionDistance(feature=_GivenFeatures(ref.mean.numel()),
                                                **_LOCAL)
    for prefix, mean, cov, count in (("real", ref.mean, ref.covariance, ref.num_images),
                                     ("fake", fake_mean, fake_cov, fake_count)):
        mean, cov = mean.double().cpu(), cov.double().cpu()
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(int(count)))
        setattr(metric, f"{prefix}_features_sum", mean * count)
        # torchmetrics' covariance is (sum f f^T - N mu mu^T) / (N - 1)
        setattr(metric, f"{prefix}_features_cov_sum",
                cov * (count - 1) + count * torch.outer(mean, mean))
    metric.orig_dtype = torch.float64
    with _quiet():
        return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> dict:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial
    kernel (x.y / D + 1)^3, averaged over ``subsets`` random subsets of min(subset_size, N)
    rows of each set (torchmetrics' KernelInceptionDistance). real (N1, D), fake (N2, D).
    Returns {"kid", "kid_std", "kid_subset_size", "kid_subsets"}."""
    image = import_torchmetrics()
    size = int(min(subset_size, len(real), len(fake)))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {len(real)} reference "
                         f"and {len(fake)} generated")
    with _quiet(), _seeded(seed):
        metric = image.KernelInceptionDistance(feature=_GivenFeatures(real.shape[1]),
                                               subsets=int(subsets), subset_size=size, **_LOCAL)
        metric.update(real.double().cpu(), real=True)
        metric.update(fake.double().cpu(), real=False)
        mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "kid_subset_size": size,
            "kid_subsets": int(subsets)}


def inception_score(logits: torch.Tensor, *, splits: int = 10, seed: int = 0) -> dict:
    """IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), mean and std over ``splits``
    splits of a seeded random permutation (torchmetrics' InceptionScore). logits (N, K); a
    feature network that outputs probabilities passes their logarithm. Returns {"is",
    "is_std", "is_splits"}."""
    image = import_torchmetrics()
    splits = int(max(1, min(splits, len(logits))))
    with _quiet(), _seeded(seed):
        metric = image.InceptionScore(feature=_GivenFeatures(logits.shape[1]), splits=splits,
                                      **_LOCAL)
        metric.update(logits.double().cpu())
        mean, std = metric.compute()
    std = float(std) if splits > 1 else 0.0
    return {"is": float(mean), "is_std": std, "is_splits": splits}


def _kth_neighbour_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance (N,) of each row of x to its k-th nearest other row."""
    radii = []
    for first in range(0, len(x), block):
        d = torch.cdist(x[first:first + block], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)      # +1: the row itself at distance 0
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
            block: int) -> torch.Tensor:
    """(N,) bool: whether each point lies in some ball (centre, radius)."""
    found = []
    for first in range(0, len(points), block):
        d = torch.cdist(points[first:first + block], centres)
        found.append((d <= radii[None]).any(dim=1))
    return torch.cat(found)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3,
                     block: int = 4096) -> dict:
    """Improved precision and recall (Kynkaenniemi et al. 2019): each set's manifold is the
    union of balls around its points with radius = distance to the k-th nearest neighbour in
    the same set; precision = fraction of fake points inside the real manifold, recall =
    fraction of real points inside the fake manifold. real (N1, D), fake (N2, D), on any
    device (float32 distances, computed in row blocks of ``block``)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision / recall with k = {k} need more than {k} samples in each "
                         f"set, got {len(real)} reference and {len(fake)} generated")
    real, fake = real.float(), fake.float().to(real.device)
    real_radii = _kth_neighbour_radii(real, k, block)
    fake_radii = _kth_neighbour_radii(fake, k, block)
    precision = _inside(fake, real, real_radii, block).double().mean().item()
    recall = _inside(real, fake, fake_radii, block).double().mean().item()
    return {"precision": precision, "recall": recall, "pr_k": int(k),
            "pr_num_real": len(real), "pr_num_fake": len(fake)}


def quality_metrics(fake: FeatureAccumulator, ref: ReferenceStats, *, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, is_splits: int = 10, pr_k: int = 3,
                    pr_samples: int = 10000, seed: int = 0) -> dict:
    """FID against ``ref``'s mean and covariance, KID and precision / recall against its kept
    features (the first ``pr_samples`` rows of each set for P/R), IS of the fake logits
    (when the extractor has logits). All values plain floats; seeded by ``seed``."""
    result = {"fid": frechet_distance(fake.mean(), fake.covariance(), fake.count, ref),
              "num_samples": fake.count, "num_reference": ref.num_images}
    fake_features, real_features = fake.features(), ref.features.float()
    if len(real_features) and len(fake_features):
        result.update(kernel_distance(real_features, fake_features, subsets=kid_subsets,
                                      subset_size=kid_subset_size, seed=seed))
        result.update(precision_recall(real_features[:pr_samples], fake_features[:pr_samples],
                                       k=pr_k))
    logits = fake.all_logits()
    if logits is not None and logits.shape[1] > 1:
        result.update(inception_score(logits, splits=is_splits, seed=seed))
    return {key: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
            for key, v in result.items()}
