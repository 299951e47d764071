"""The Inception-v3 extractors of run_lib.inception.

With fake networks built here (a scripted detector with NVIDIA's call convention, a fake
torch_fidelity module): shapes, dtypes, the IS logits (softmax(logits) must equal the
detector's ``no_output_bias=True`` probabilities, not its biased ones), grey images, the
file hash, and the one-line errors (wrong input, absent file, torch_fidelity that does not
import). With the real weight files, only when they are on disk ($INCEPTION_PATH or
~/.cache/score_sde/inception-2015-12-05.pt; $INCEPTION_FIDELITY_PATH): features of random
CIFAR-sized images, and the two implementations against each other.
"""
import hashlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from run_lib import inception
from run_lib.inception import InceptionFidelity, InceptionTorchScript, load_inception

# the fakes are TorchScript like the real file, which recent torch calls deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


# ----------------------------------------------------------------------------- fakes

class _Trunk(nn.Module):
    """(B, 3, H, W) uint8 -> (B, 2048) >= 0 features from per-channel means and mean squares."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(6, 2048, generator=generator))

    def forward(self, img: Tensor) -> Tensor:
        x = img.to(torch.float32) / 127.5 - 1.0
        stats = torch.cat([x.mean(dim=(2, 3)), x.pow(2).mean(dim=(2, 3))], dim=1)
        return torch.relu(stats @ self.projection)


def _linear_1008(bias: float) -> nn.Linear:
    """A seeded Linear(2048, 1008) with a large bias, so biased and unbiased outputs differ."""
    generator = torch.Generator().manual_seed(1)
    layer = nn.Linear(2048, 1008)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1008, 2048, generator=generator) * 0.02)
        layer.bias.copy_(torch.randn(1008, generator=generator) * bias)
    return layer


class FakeDetector(nn.Module):
    """NVIDIA's TorchScript call convention: features with return_features=True, else softmax
    probabilities (of the logits without the output bias when no_output_bias=True)."""

    def __init__(self):
        super().__init__()
        self.trunk = _Trunk()
        self.output = _linear_1008(bias=3.0)

    def forward(self, img: Tensor, return_features: bool = False,
                no_output_bias: bool = False) -> Tensor:
        assert img.shape[1] == 3
        features = self.trunk(img)
        if return_features:
            return features
        if no_output_bias:
            return F.softmax(F.linear(features, self.output.weight), dim=1)
        return F.softmax(self.output(features), dim=1)


class FakeDetectorHiddenHead(nn.Module):
    """The same convention with the output layer under another name (the two-call path)."""

    def __init__(self):
        super().__init__()
        self.trunk = _Trunk()
        self.head = _linear_1008(bias=3.0)

    def forward(self, img: Tensor, return_features: bool = False,
                no_output_bias: bool = False) -> Tensor:
        assert img.shape[1] == 3
        features = self.trunk(img)
        if return_features:
            return features
        if no_output_bias:
            return F.softmax(F.linear(features, self.head.weight), dim=1)
        return F.softmax(self.head(features), dim=1)


def _save_scripted(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture(scope="module")
def fake_pt(tmp_path_factory):
    return _save_scripted(FakeDetector(), tmp_path_factory.mktemp("inception") / "fake.pt")


def _images(batch=4, channels=3, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8,
                         generator=generator)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- TorchScript

def test_torchscript_features_and_logits_follow_the_detector(fake_pt):
    extractor = InceptionTorchScript(fake_pt, "cpu")
    assert extractor.output_weight() is not None                    # the one-pass route
    detector = torch.jit.load(str(fake_pt))
    images = _images()
    features, logits = extractor(images)
    assert features.shape == (4, 2048) and logits.shape == (4, 1008)
    assert features.dtype == logits.dtype == torch.float64
    torch.testing.assert_close(features, detector(images, return_features=True).double())
    unbiased = detector(images, no_output_bias=True).double()
    biased = detector(images).double()
    torch.testing.assert_close(logits.softmax(dim=1), unbiased, atol=1e-6, rtol=1e-5)
    assert (logits.softmax(dim=1) - biased).abs().max() > 1e-3      # the bias is left out
    assert extractor.identity() == {"name": "inception-v3-tf-2015-12-05-torchscript",
                                    "sha256": hashlib.sha256(fake_pt.read_bytes()).hexdigest(),
                                    "num_features": 2048, "num_logits": 1008}


def test_torchscript_without_output_attribute_calls_the_detector_twice(tmp_path):
    path = _save_scripted(FakeDetectorHiddenHead(), tmp_path / "hidden.pt")
    extractor = InceptionTorchScript(path)
    assert extractor.output_weight() is None
    images = _images(size=17)
    _, logits = extractor(images)
    probs = torch.jit.load(str(path))(images, no_output_bias=True).double()
    torch.testing.assert_close(logits.softmax(dim=1), probs, atol=1e-6, rtol=1e-5)


def test_torchscript_grey_images_are_repeated_to_rgb(fake_pt):
    extractor = InceptionTorchScript(fake_pt)
    grey = _images(batch=3, channels=1, size=28)
    features, logits = extractor(grey)
    rgb_features, rgb_logits = extractor(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(features, rgb_features)
    torch.testing.assert_close(logits, rgb_logits)
    with pytest.raises(ValueError) as error:
        extractor(_images(channels=2))
    assert "2 channels" in _one_line(error)


def test_torchscript_refuses_float_images(fake_pt):
    extractor = InceptionTorchScript(fake_pt)
    with pytest.raises(ValueError) as error:
        extractor(_images().float())
    assert "uint8" in _one_line(error) and "float32" in str(error.value)


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("path", [None, "", "does/not/exist/inception-2015-12-05.pt"])
def test_load_inception_without_a_file_says_where_to_get_it(path):
    with pytest.raises(FileNotFoundError) as error:
        load_inception(path)
    message = _one_line(error)
    assert "--config.eval.inception_path=" in message
    assert inception.TORCHSCRIPT_URL in message and inception.FIDELITY_URL in message


def test_load_inception_picks_the_extractor_by_file_content(fake_pt, tmp_path, monkeypatch):
    assert isinstance(load_inception(fake_pt), InceptionTorchScript)
    state = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, state)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ImportError):                 # a state dict: the torch-fidelity route
        load_inception(state)
    pickle = tmp_path / "inception-2015-12-05.pkl"
    pickle.write_bytes(b"\x80\x04not a torch file")
    with pytest.raises(ValueError) as error:
        load_inception(pickle)
    assert inception.TORCHSCRIPT_URL in _one_line(error)


# ----------------------------------------------------------------------------- torch-fidelity

def test_fidelity_import_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ImportError) as error:
        InceptionFidelity(tmp_path / "weights.pth")
    message = _one_line(error)
    assert "not installed" in message and "inception-2015-12-05.pt" in message
    assert "torchvision" in message


def test_fidelity_broken_torchvision_is_one_line(tmp_path, monkeypatch):
    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("operator torchvision::nms\n does not exist")

    package = types.ModuleType("torch_fidelity")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3",
                        Broken("torch_fidelity.feature_extractor_inceptionv3"))
    with pytest.raises(ImportError) as error:
        InceptionFidelity(tmp_path / "weights.pth")
    message = _one_line(error)
    assert "torchvision::nms does not exist" in message and "TorchScript" in message


def test_fidelity_wrapper_asks_for_pool3_and_unbiased_logits(tmp_path, monkeypatch):
    calls = {}

    class FakeFidelityInception(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            calls.update(name=name, features_list=list(features_list),
                         path=feature_extractor_weights_path)
            self.trunk = _Trunk()

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            features = self.trunk(x)
            return features, features[:, :1008] * 2.0

    package = types.ModuleType("torch_fidelity")
    package.__path__ = []
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FakeFidelityInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in weights")
    extractor = InceptionFidelity(weights)
    assert calls == {"name": "inception-v3-compat", "features_list": ["2048", "logits_unbiased"],
                     "path": str(weights)}
    features, logits = extractor(_images(channels=1))
    expected = _Trunk()(_images(channels=1).repeat(1, 3, 1, 1)).double()
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(logits, expected[:, :1008] * 2.0)
    assert extractor.identity()["name"] == "inception-v3-tf-2015-12-05-fidelity"
    assert extractor.sha256 == hashlib.sha256(b"stand-in weights").hexdigest()


# ----------------------------------------------------------------------------- real weights

def _real_torchscript_path():
    path = Path(os.environ.get("INCEPTION_PATH", inception.DEFAULT_INCEPTION_PATH)).expanduser()
    if not path.is_file():
        pytest.skip(f"no Inception TorchScript file at {path} (set $INCEPTION_PATH)")
    return path


@pytest.fixture(scope="module")
def real_torchscript():
    return InceptionTorchScript(_real_torchscript_path(), "cpu")


def test_real_inception_features_and_class_distribution(real_torchscript):
    images = _images(batch=4, size=32, seed=3)
    features, logits = real_torchscript(images)
    assert features.shape == (4, 2048) and logits.shape == (4, 1008)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()
    assert (features >= 0).all() and features.std(dim=0).mean() > 0    # pooled ReLU activations
    assert real_torchscript.output_weight() is not None               # the one-pass route
    probs = real_torchscript.detector(images, no_output_bias=True).double()
    torch.testing.assert_close(logits.exp(), probs, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(logits.exp().sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_real_torchscript_and_fidelity_features_agree(real_torchscript):
    path = Path(os.environ.get("INCEPTION_FIDELITY_PATH", "")).expanduser()
    if not path.is_file():
        pytest.skip("no torch-fidelity weights (set $INCEPTION_FIDELITY_PATH)")
    try:
        fidelity = InceptionFidelity(path, "cpu")
    except ImportError as error:
        pytest.skip(str(error))
    images = _images(batch=4, size=32, seed=4)
    ts_features, ts_logits = real_torchscript(images)
    tf_features, tf_logits = fidelity(images)
    error = (ts_features - tf_features).norm() / ts_features.norm()
    assert error < 1e-2, f"relative feature difference {error:.2e}"
    difference = (ts_logits.softmax(dim=1) - tf_logits.softmax(dim=1)).abs().max()
    assert difference < 1e-2, f"class probabilities differ by {difference:.2e}"
