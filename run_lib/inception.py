"""The Inception-v3 feature extractors of paper-comparable FID / KID / IS (CIFAR-10 and up).

    extractor = load_inception("/path/to/inception-2015-12-05.pt", device)
    features, logits = extractor(images)       # uint8 (B, C, H, W) -> (B, 2048), (B, 1008)

Both extractors below run the same network: the TensorFlow Inception-v3 graph of
http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz (the network of
the original TF FID and IS code), and give its 2048-D pool3 features (FID, KID, precision /
recall) and its 1008-class output without the output bias (IS). They differ only in how
images are resized to 299 x 299 (both emulate TF1's ``resize_bilinear``, by different code),
so their features agree closely but not bit for bit; hence two names, and reference
statistics made with one are refused by the other (``ReferenceStats.check``).

* ``InceptionTorchScript``: NVIDIA's TorchScript translation, the detector of StyleGAN2-ADA,
  StyleGAN3 and EDM (``inception-2015-12-05.pt``, ``TORCHSCRIPT_URL``). Needs only torch.
* ``InceptionFidelity``: torch-fidelity's ``FeatureExtractorInceptionV3`` (the network
  torchmetrics' FID uses) with its weight file (``FIDELITY_URL``). Needs torch-fidelity and
  a torchvision that loads with the installed torch.

Call conventions (StyleGAN2-ADA metrics/frechet_inception_distance.py and inception_score.py,
EDM fid.py): ``detector(images_uint8, return_features=True)`` -> (B, 2048) float32 features;
``detector(images_uint8, no_output_bias=True)`` -> (B, 1008) softmax probabilities of the
logits ``features @ output.weight.T``; the detector casts the uint8 images to float, resizes
them to 299 x 299 itself and maps [0, 255] to [-1, 1]; grey images are repeated to 3 channels
by the caller. Nothing here downloads: the weights are files the user names
(``config.eval.inception_path``).
"""
from __future__ import annotations

import itertools
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .fidelity import FeatureExtractor, file_sha256

__all__ = ["InceptionTorchScript", "InceptionFidelity", "load_inception", "TORCHSCRIPT_URL",
           "FIDELITY_URL", "DEFAULT_INCEPTION_PATH"]

#: NVIDIA's TorchScript Inception (StyleGAN2-ADA / StyleGAN3 / EDM). Not the .pkl of NGC: that
#: is a pickle of their Python classes, which this project does not unpickle.
TORCHSCRIPT_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                   "inception-2015-12-05.pt")
#: torch-fidelity's state dict of the same network (torch_fidelity.feature_extractor_inceptionv3).
FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                "weights-inception-2015-12-05-6726825d.pth")
#: Where the tests look for the TorchScript file when $INCEPTION_PATH is not set.
DEFAULT_INCEPTION_PATH = Path("~/.cache/score_sde/inception-2015-12-05.pt").expanduser()

NUM_FEATURES = 2048
NUM_CLASSES = 1008          # the 2015 graph's softmax: the 1000 ImageNet classes and 8 unused


def _three_channels(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (B, 3, H, W): grey images (B, 1, H, W) repeated to RGB, as StyleGAN3 / EDM do."""
    if images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise ValueError(f"{name} takes grey or RGB images (B, 1 or 3, H, W), got "
                         f"{images.shape[1]} channels")
    return images


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    """The device of a network's first parameter or buffer (``default`` when it has none)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return default if tensor is None else tensor.device


class InceptionTorchScript(FeatureExtractor):
    """NVIDIA's TorchScript Inception-v3 (``inception-2015-12-05.pt``, ``TORCHSCRIPT_URL``).

    uint8 images (B, 1 or 3, H, W) of any size -> pool3 features (B, 2048) and IS logits
    (B, 1008), float64 on the images' device. The logits are log-probabilities: softmax(logits)
    equals the detector's ``no_output_bias=True`` output. When the detector exposes its output
    layer (``detector.output.weight``, (1008, 2048); NVIDIA's file has ``self.output =
    nn.Linear(2048, 1008)``) they come from the features in one pass (log_softmax(features @
    W.T), the detector's own formula, checked against its output by the real-file test);
    otherwise from a second call, log(probabilities clamped at the smallest float32)."""

    name = "inception-v3-tf-2015-12-05-torchscript"
    num_features = NUM_FEATURES
    num_logits = NUM_CLASSES
    image_shape = None

    def __init__(self, path, device="cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.path = Path(path)
        with warnings.catch_warnings():             # recent torch deprecates TorchScript,
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated",
                                    category=DeprecationWarning)   # but this file is one
            self.detector = torch.jit.load(str(path), map_location=self.device).eval()
        self.sha256 = file_sha256(path)

    def output_weight(self) -> torch.Tensor | None:
        """The detector's output-layer weight (1008, 2048), or None when it has no such layer."""
        weight = getattr(getattr(self.detector, "output", None), "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (NUM_CLASSES, NUM_FEATURES):
            return weight
        return None

    def extract(self, images: torch.Tensor):
        weight = self.output_weight()
        x = _three_channels(images, self.name).to(_device_of(self.detector, self.device))
        features = self.detector(x, return_features=True)
        if weight is not None:
            logits = F.linear(features.float(), weight).double().log_softmax(dim=1)
        else:
            probs = self.detector(x, no_output_bias=True).double()
            logits = probs.clamp_min(torch.finfo(torch.float32).tiny).log()
        return features.to(images.device), logits.to(images.device)


def _import_fidelity_inception():
    """torch_fidelity's FeatureExtractorInceptionV3 class, or a one-line ImportError that names
    the cause and the fix (torch_fidelity imports torchvision, which may not load)."""
    fix = (f"use the TorchScript file instead, which needs no torchvision ({TORCHSCRIPT_URL}, "
           "--config.eval.inception_path=/path/to/inception-2015-12-05.pt), or install "
           "torch-fidelity with a torchvision built for this torch")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as error:
        if error.name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
            raise ImportError(f"the torch-fidelity Inception needs torch_fidelity, which is not "
                              f"installed: {fix}") from None
        raise ImportError(f"torch_fidelity could not be imported ({error}): {fix}") from None
    except (ImportError, OSError, RuntimeError, AttributeError) as error:
        raise ImportError(f"torch_fidelity could not be imported "
                          f"({' '.join(str(error).split())}): {fix}") from None
    return FeatureExtractorInceptionV3


class InceptionFidelity(FeatureExtractor):
    """torch-fidelity's Inception-v3 (``FeatureExtractorInceptionV3``, name "inception-v3-compat",
    features "2048" and "logits_unbiased") with its weight file
    ``weights-inception-2015-12-05-6726825d.pth`` (``FIDELITY_URL``).

    uint8 images (B, 1 or 3, H, W) of any size -> pool3 features (B, 2048) and the unbiased
    logits (B, 1008) (features @ fc.weight.T, whose softmax is the TorchScript detector's
    ``no_output_bias=True`` output), float64 on the images' device. A one-line ImportError
    when torch_fidelity does not import."""

    name = "inception-v3-tf-2015-12-05-fidelity"
    num_features = NUM_FEATURES
    num_logits = NUM_CLASSES
    image_shape = None

    def __init__(self, path, device="cpu"):
        super().__init__()
        network = _import_fidelity_inception()
        self.device = torch.device(device)
        self.path = Path(path)
        self.net = network(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                           feature_extractor_weights_path=str(path)).to(self.device).eval()
        self.sha256 = file_sha256(path)

    def extract(self, images: torch.Tensor):
        x = _three_channels(images, self.name).to(_device_of(self.net, self.device))
        features, logits = self.net(x)
        return features.to(images.device), logits.to(images.device)


# ----------------------------------------------------------------------------- loading

def _missing(path) -> FileNotFoundError:
    """The one-line error for an unset or absent weight file: where to get it, what to set."""
    where = "no Inception weight file given" if not path else f"no Inception weight file at {path}"
    return FileNotFoundError(
        f"{where}: download {TORCHSCRIPT_URL} (TorchScript, needs only torch; or torch-fidelity's "
        f"{FIDELITY_URL}) and set --config.eval.inception_path=/path/to/inception-2015-12-05.pt")


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive: a zip holding a code/ folder (torch.save's
    zips of state dicts hold data.pkl and no code)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in f"/{name}" for name in archive.namelist())


def load_inception(path, device="cpu") -> FeatureExtractor:
    """The Inception extractor for the weight file ``path``, chosen by its content: a TorchScript
    archive (``inception-2015-12-05.pt``) -> InceptionTorchScript; a torch state dict
    (``weights-inception-2015-12-05-6726825d.pth``) -> InceptionFidelity. A one-line
    FileNotFoundError when ``path`` is unset or absent (never downloads), a one-line ValueError
    for any other file (e.g. NVIDIA's .pkl, which would need their pickled classes)."""
    if not path or not Path(path).expanduser().is_file():
        raise _missing(path)
    path = Path(path).expanduser()
    if _is_torchscript(path):
        return InceptionTorchScript(path, device)
    if zipfile.is_zipfile(path) or path.suffix == ".pth":
        return InceptionFidelity(path, device)
    raise ValueError(f"{path} is neither a TorchScript archive nor a torch state dict: use "
                     f"{TORCHSCRIPT_URL} (the .pt, not NVIDIA's .pkl)")
