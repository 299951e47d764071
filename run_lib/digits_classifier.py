"""A clean (not noise-conditional) classifier of the 8x8 digits: the judge of completions
and guided samples, and the feature space of the digits' FID / KID / IS / precision-recall.

    net, info = digits_classifier(cache_path)     # trained once, then read from the cache
    accuracy(net, x, labels)                      # x (N, 1, 8, 8) in the model's space
    extractor = DigitsFeatures(net)               # uint8 digits -> (64 features, 10 logits)

    python -m run_lib.digits_classifier --data_dir data    # train (or read) and print it

The cache is <config.data.data_dir>/digits_classifier.pt (``digits_classifier_path``).

--mode inpaint reports the accuracy of this classifier on completed test digits next to its
accuracy on the original test digits (the ceiling) and on digits whose unknown pixels are
filled with black or the training mean (the floors). It is trained on the 1500 training
digits only, deterministically (fixed seeds, one CPU thread), so every run judges with the
same network; the weights are cached as a plain state dict (loaded with weights_only=True).

The network: conv 3x3 (1 -> 16) - ReLU - conv 3x3 stride 2 (16 -> 32) - ReLU - linear
(512 -> 64) - ReLU [the 64 features] - linear (64 -> 10), trained for ``EPOCHS`` epochs with
Adam on batches of 50, each batch shifted by up to one pixel (padding with the background),
which makes it less brittle to completions that are slightly off-centre. Its accuracy on the
297 held-out digits is recorded in the cache (``info["test_accuracy"]``, about 0.95).
"""
from __future__ import annotations

from pathlib import Path

import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from .datasets import load_digits_images, preprocess
from .fidelity import FeatureExtractor, state_dict_sha256

__all__ = ["DigitsNet", "DigitsFeatures", "digits_classifier", "digits_classifier_path",
           "train_digits_classifier", "accuracy", "EPOCHS", "FEATURES"]

#: Training epochs over the 1500 training digits.
EPOCHS = 40
#: Seed of the weights' initialisation and of the batches' order and shifts.
SEED = 0
BATCH_SIZE = 50
LEARNING_RATE = 2e-3
#: Width of the penultimate layer: the feature space of the digits' FID.
FEATURES = 64
#: Bumped when the network or its training changes: older caches are retrained.
VERSION = 2


class DigitsNet(nn.Module):
    """logits (B, 10) of digits x (B, 1, 8, 8) in [-1, 1] (background -1); ``features(x)``
    the penultimate activations (B, FEATURES)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.hidden = nn.Linear(32 * 4 * 4, FEATURES)
        self.linear = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class DigitsFeatures(FeatureExtractor):
    """The digits' feature extractor for run_lib.fidelity: uint8 digits (B, 1, 8, 8) ->
    (penultimate features (B, 64), logits (B, 10)), on the device of the images."""

    name, num_features, num_logits, image_shape = "digits-classifier-v2", FEATURES, 10, (1, 8, 8)

    def __init__(self, net: DigitsNet):
        super().__init__()
        self.net = net.eval()
        self.sha256 = state_dict_sha256(net)

    def extract(self, images: torch.Tensor):
        x = images.to(next(self.net.parameters()).device).float() / 127.5 - 1.0
        features = self.net.features(x)
        return features, self.net.linear(features)


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x (B, 1, 8, 8) shifted by (dy, dx) in {-1, 0, 1}^2, one draw per batch, background -1."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_images(split)
    return preprocess(torch.as_tensor(images), centered=True), torch.as_tensor(labels)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of x (N, 1, 8, 8), centered model space, classified as ``labels`` (N,)."""
    predicted = net(x.detach().float().cpu().clamp(-1, 1)).argmax(dim=1)
    return (predicted == labels.cpu()).double().mean().item()


def train_digits_classifier(epochs: int = EPOCHS) -> tuple[DigitsNet, dict]:
    """A DigitsNet trained on the digits' training split (deterministic on the CPU), and
    {"epochs", "train_accuracy", "test_accuracy"} (all 297 test digits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                        # the same result on every machine load
    try:
        x, labels = _split("train")
        generator = torch.Generator().manual_seed(SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            net = DigitsNet()
        optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        with torch.enable_grad():                   # also when called under no_grad
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=generator)
                for first in range(0, len(x), BATCH_SIZE):
                    index = order[first:first + BATCH_SIZE]
                    loss = F.cross_entropy(net(_shift(x[index], generator)), labels[index])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        net.eval()
        test_x, test_labels = _split("test")
        info = {"epochs": epochs, "train_accuracy": accuracy(net, x, labels),
                "test_accuracy": accuracy(net, test_x, test_labels)}
    finally:
        torch.set_num_threads(threads)
    return net, info


def digits_classifier(cache_path, *, epochs: int = EPOCHS) -> tuple[DigitsNet, dict]:
    """The classifier of ``train_digits_classifier``, read from ``cache_path`` when that file
    holds one (a dict: weights ``state``, ``info``), else trained and written there."""
    cache_path = Path(cache_path)
    net = DigitsNet()
    if cache_path.is_file():
        try:
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
            net.load_state_dict(cached["state"], strict=True)
            net.eval()
            if cached["info"].get("version") == VERSION:
                return net, {key: cached["info"][key] for key in _INFO_KEYS}
        except (OSError, RuntimeError, KeyError, TypeError, ValueError):
            pass                                    # damaged or another network: retrain
    net, info = train_digits_classifier(epochs)
    from .utils import save_atomic
    save_atomic({"state": net.state_dict(), "info": {**info, "version": VERSION}}, cache_path)
    return net, info


_INFO_KEYS = ("epochs", "train_accuracy", "test_accuracy")


def digits_classifier_path(config) -> Path:
    """Where the digits classifier is cached: <config.data.data_dir>/digits_classifier.pt."""
    return Path(config.data.data_dir) / "digits_classifier.pt"


def main(argv=None) -> dict:
    """``python -m run_lib.digits_classifier --data_dir data``: train (or read) the cached
    classifier and print its accuracies as JSON."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data_dir", default="data", help="cache folder (config.data.data_dir)")
    args = parser.parse_args(argv)
    path = Path(args.data_dir) / "digits_classifier.pt"
    _, info = digits_classifier(path)
    print(json.dumps({"cache": str(path), **info}, indent=2))
    return info


if __name__ == "__main__":
    main()
