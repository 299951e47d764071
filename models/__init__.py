"""models: score networks and the wrapper that turns a network into score_fn(x, t).

    model = models.build_model("ddpm", nf=128, ch_mult=(1, 2, 2, 2), image_size=32)
    score_fn = models.get_score_fn(sde, model, continuous=True)

Plain arguments only: building from a config is run_lib.compose's job
(``compose.build_model(config)``, ``compose.build_score_fn(config, sde, model)``).

Layout: the networks (mlp.py, ddpm.py, ncsnpp.py, ncsn.py), the layers DDPM and NCSN++ share
(layers.py), FIR resampling (fir.py), embeddings and normalisations, the score wrapper
(score.py), the EMA (ema.py), the conversion of official Score SDE checkpoints
(checkpoints.py) and the noise-conditional classifiers for guidance (classifier.py:
CLASSIFIERS, build_classifier, get_logits_fn).
"""
from __future__ import annotations

from torch import nn

from sde_lib import check_choice

from .classifier import (ConvClassifier, MLPClassifier, WideResNetClassifier,
                         classifier_conditioning, get_logits_fn)
from .checkpoints import (convert_score_sde_state_dict, is_score_sde_checkpoint,
                          load_state_dict_strict)
from .ddpm import DDPM
from .ema import ExponentialMovingAverage
from .embeddings import GaussianFourierProjection, sinusoidal_embedding
from .fir import (FIRConv2d, conv_downsample_2d, downsample_2d, setup_kernel, upfirdn2d,
                  upsample_2d, upsample_conv_2d)
from .mlp import MLPScoreNet
from .ncsn import NCSN, NCSNv2
from .ncsnpp import NCSNpp
from .normalization import ConditionalInstanceNorm2dPlus, InstanceNorm2dPlus
from .score import DISCRETE_LABELS, VP_TIME_SCALE, get_score_fn

__all__ = ["MODELS", "build_model", "get_score_fn", "DISCRETE_LABELS", "VP_TIME_SCALE",
           "MLPScoreNet", "GaussianFourierProjection", "sinusoidal_embedding",
           "upfirdn2d", "setup_kernel", "upsample_2d", "downsample_2d", "upsample_conv_2d",
           "conv_downsample_2d", "FIRConv2d", "ExponentialMovingAverage",
           "DDPM", "convert_score_sde_state_dict", "load_state_dict_strict",
           "is_score_sde_checkpoint", "NCSNpp", "NCSN", "NCSNv2", "InstanceNorm2dPlus",
           "ConditionalInstanceNorm2dPlus", "CLASSIFIERS", "build_classifier", "get_logits_fn",
           "classifier_conditioning", "MLPClassifier", "ConvClassifier",
           "WideResNetClassifier"]

#: Model name -> network class; each class takes explicit keyword arguments (its docstring).
MODELS = {"mlp": MLPScoreNet, "ddpm": DDPM, "ncsnpp": NCSNpp, "ncsn": NCSN, "ncsnv2": NCSNv2}


def build_model(name: str, **kwargs) -> nn.Module:
    """The network ``MODELS[name]`` built from its keyword arguments, e.g.
    ``build_model("ddpm", nf=64, ch_mult=(1, 2), image_size=8, num_channels=1)``."""
    if not isinstance(name, str):
        raise TypeError("models.build_model takes a model name and keyword arguments; to build "
                        "from a config use run_lib.compose.build_model(config)")
    check_choice("model name", name, MODELS)
    return MODELS[name](**kwargs)


#: Classifier name -> noise-conditional classifier class (models/classifier.py); each is called
#: as classifier(x (B, ...), log_sigma (B,)) -> logits (B, num_classes).
CLASSIFIERS = {"mlp": MLPClassifier, "conv": ConvClassifier, "wideresnet": WideResNetClassifier}


def build_classifier(name: str, **kwargs) -> nn.Module:
    """The classifier ``CLASSIFIERS[name]`` built from its keyword arguments, e.g.
    ``build_classifier("mlp", data_shape=(2,), num_classes=8)``; wrap it with
    ``get_logits_fn(sde, classifier)``."""
    if not isinstance(name, str):
        raise TypeError("models.build_classifier takes a classifier name and keyword arguments")
    check_choice("classifier name", name, CLASSIFIERS)
    return CLASSIFIERS[name](**kwargs)
