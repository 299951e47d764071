"""FID / KID / IS / precision-recall (run_lib.fidelity) against exact answers, with a small
deterministic, non-degenerate substitute feature network."""
import math
import sys

import numpy as np
import pytest
import torch

from run_lib.fidelity import (FeatureAccumulator, FeatureExtractor, ReferenceStats,
                              frechet_distance, import_torchmetrics, inception_score,
                              kernel_distance, precision_recall, quality_metrics)
from samplers.metrics import frechet_from_moments


class ProjectionFeatures(FeatureExtractor):
    """tanh of a fixed random projection of the pixels in [0, 1] (16 features) and a second
    projection as logits (10 classes): deterministic, full-rank, any image size of 1 x 8 x 8."""

    name, sha256, num_features, num_logits, image_shape = "projection", "abc", 16, 10, (1, 8, 8)

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(64, 16, generator=g) / 4)
        self.register_buffer("v", torch.randn(16, 10, generator=g))

    def extract(self, images):
        h = torch.tanh((images.flatten(1).double() / 255 - 0.5) @ self.w.double())
        return h, h @ self.v.double()


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)


def _accumulate(features, logits=None, keep=100000):
    acc = FeatureAccumulator(features.shape[1], keep)
    for first in range(0, len(features), 97):       # in uneven batches
        acc.update(features[first:first + 97], None if logits is None else logits[first:first + 97])
    return acc


def _reference(acc, identity=None, shape=(1, 8, 8)):
    identity = identity or ProjectionFeatures().identity()
    return ReferenceStats.from_accumulator(acc, identity, shape, "test")


def test_fid_of_a_set_with_itself_is_zero():
    net = ProjectionFeatures()
    features, logits = net(_images(600, 0))
    assert features.dtype == torch.float64 and features.shape == (600, 16)
    acc = _accumulate(features, logits)
    assert abs(frechet_distance(acc.mean(), acc.covariance(), acc.count, _reference(acc))) < 1e-8
    other = _accumulate(net(_images(600, 1))[0])
    assert frechet_distance(other.mean(), other.covariance(), other.count, _reference(acc)) > 1e-3


def test_fid_of_gaussian_features_is_the_closed_form_frechet_distance():
    g = torch.Generator().manual_seed(3)
    d = 6
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov1, cov2 = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64), torch.diag(
        torch.linspace(0.2, 2.0, d, dtype=torch.float64))
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.linspace(-1, 1, d, dtype=torch.float64)
    x = mu1 + torch.randn(40000, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov1).T
    y = mu2 + torch.randn(40000, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov2).T
    ref, fake = _accumulate(x), _accumulate(y)
    fid = frechet_distance(fake.mean(), fake.covariance(), fake.count,
                           _reference(ref, {"name": "g", "sha256": "", "num_features": d}))
    # the same statistics through an independent float64 implementation: equal to round-off
    sample = frechet_from_moments(torch.mean(y, 0), torch.cov(y.T), torch.mean(x, 0), torch.cov(x.T))
    assert fid == pytest.approx(sample, rel=1e-9, abs=1e-9)
    # and close to the population value (sampling error of 40k draws)
    exact = frechet_from_moments(mu1, cov1, mu2, cov2)
    assert fid == pytest.approx(exact, rel=0.02)


def _poly_kernel(a, b):
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def test_kid_is_unbiased_for_the_known_mmd():
    """Features from two discrete distributions on the same 5 support points: the MMD^2 of
    the cubic kernel is exact by enumeration; KID's mean over many subsets matches it, while
    the biased (V-statistic) estimate at the same subset size does not."""
    g = torch.Generator().manual_seed(5)
    support = torch.randn(5, 4, generator=g, dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=torch.float64)
    k = _poly_kernel(support, support)
    exact = float(p @ k @ p + q @ k @ q - 2 * p @ k @ q)
    real = support[torch.multinomial(p, 30000, replacement=True, generator=g)]
    fake = support[torch.multinomial(q, 30000, replacement=True, generator=g)]
    m, subsets = 50, 400
    kid = kernel_distance(real, fake, subsets=subsets, subset_size=m, seed=0)
    assert kid["kid_subset_size"] == m
    tolerance = 4 * kid["kid_std"] / math.sqrt(subsets)
    assert abs(kid["kid"] - exact) < tolerance
    # the biased estimate of one subset size m is off by about (E k(x,x) - E k(x,x')) / m
    biased = float(p @ k @ p + q @ k @ q - 2 * p @ k @ q
                   + (p @ torch.diag(k) - p @ k @ p + q @ torch.diag(k) - q @ k @ q) / m)
    assert abs(biased - exact) > 2 * tolerance


def test_kid_is_reproducible_with_its_seed():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g) + 0.2
    a = kernel_distance(real, fake, subsets=10, subset_size=100, seed=7)
    b = kernel_distance(real, fake, subsets=10, subset_size=100, seed=7)
    assert a == b and a["kid_std"] > 0


@pytest.mark.parametrize("classes", [2, 10])
def test_inception_score_of_confident_balanced_predictions_is_the_class_count(classes):
    labels = torch.arange(classes * 300) % classes
    logits = 40.0 * torch.nn.functional.one_hot(labels, classes).double()
    assert inception_score(logits, splits=1)["is"] == pytest.approx(classes, rel=1e-9)
    ten = inception_score(logits, splits=10, seed=0)       # random splits: nearly balanced
    assert ten["is"] == pytest.approx(classes, rel=0.02) and ten["is_splits"] == 10
    # uniform predictions carry no information: IS = 1
    assert inception_score(torch.zeros(100, classes), splits=1)["is"] == pytest.approx(1.0)


def _brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = torch.cdist(x, x)
        return d.sort(dim=1).values[:, k]
    r_real, r_fake = radii(real), radii(fake)
    precision = (torch.cdist(fake, real) <= r_real[None]).any(1).double().mean().item()
    recall = (torch.cdist(real, fake) <= r_fake[None]).any(1).double().mean().item()
    return precision, recall


def test_precision_recall_matches_its_definition():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(500, 3, generator=g)
    fake = torch.cat([torch.randn(250, 3, generator=g), torch.randn(250, 3, generator=g) + 6])
    result = precision_recall(real, fake, k=3, block=64)     # several row blocks
    precision, recall = _brute_force_precision_recall(real, fake, 3)
    assert result["precision"] == pytest.approx(precision) and result["recall"] == pytest.approx(recall)
    assert 0.4 < result["precision"] < 0.6 < 0.8 < result["recall"]
    same = precision_recall(real, real, k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    apart = precision_recall(real, real + 100.0, k=3)
    assert apart["precision"] == 0.0 and apart["recall"] == 0.0
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(real[:3], fake, k=3)


def test_quality_metrics_and_reference_file_round_trip(tmp_path):
    net = ProjectionFeatures()
    ref_acc = _accumulate(*net(_images(400, 0)))
    fake_acc = _accumulate(*net(_images(300, 1)))
    path = _reference(ref_acc).save(tmp_path / "ref.npz")
    ref = ReferenceStats.load(path, extractor=net, image_shape=(1, 8, 8))
    assert ref.num_images == 400 and ref.features.shape == (400, 16)
    assert torch.equal(ref.covariance, ref_acc.covariance())
    metrics = quality_metrics(fake_acc, ref, kid_subsets=5, kid_subset_size=100, seed=0)
    assert set(metrics) >= {"fid", "kid", "kid_std", "is", "precision", "recall"}
    assert metrics == quality_metrics(fake_acc, ref, kid_subsets=5, kid_subset_size=100, seed=0)
    with open(path, "rb") as handle:               # plain arrays: no pickles to load
        assert np.load(handle, allow_pickle=False)["meta"].dtype.kind == "U"


def test_reference_statistics_of_another_extractor_or_resolution_are_refused(tmp_path):
    path = _reference(_accumulate(ProjectionFeatures()(_images(50, 0))[0])).save(tmp_path / "r.npz")
    other = {"name": "inception", "sha256": "ff", "num_features": 16}
    with pytest.raises(ValueError, match="made with feature extractor projection.*--mode ref_stats"):
        ReferenceStats.load(path, extractor=other)
    with pytest.raises(ValueError, match=r"\(1, 8, 8\) images.*\(3, 32, 32\)"):
        ReferenceStats.load(path, extractor=ProjectionFeatures(), image_shape=(3, 32, 32))
    with pytest.raises(FileNotFoundError, match="--mode ref_stats"):
        ReferenceStats.load(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a file of ours")
    with pytest.raises(ValueError, match="not a reference-statistics file"):
        ReferenceStats.load(tmp_path / "bad.npz")


def test_extractor_refuses_images_that_are_not_uint8_of_its_shape():
    net = ProjectionFeatures()
    with pytest.raises(ValueError, match="uint8 images"):
        net(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_a_torchmetrics_that_cannot_be_imported_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(ImportError) as info:
        import_torchmetrics()
    assert "\n" not in str(info.value) and "torchmetrics" in str(info.value)
