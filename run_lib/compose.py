"""The one place that reads a config: it builds the SDE, the network, the score function, the
loss and the sampler call from the groups of an ml_collections config. sde_lib, models and
samplers take plain arguments only.

    sde = compose.build_sde(config)                  # config.sde
    model = compose.build_model(config)              # config.model (+ config.data's shape)
    score_fn = compose.build_score_fn(config, sde, model)
    loss_fn = compose.build_loss_fn(config, sde)     # config.training
    result = compose.sample(config, score_fn, sde, shape, method="pc", generator=g)
    classifier = compose.build_classifier(config)    # config.classifier (+ data shape)
    labels = compose.sampling_labels(config, n, classifier=False)   # config.sampling.class_label
    guided = compose.guided_score_fn(config, sde, score_fn, labels) # CFG / classifier / thresholding

Class-conditional models (config.model.num_classes = K > 0) embed the labels 0..K-1. With
classifier-free guidance training (config.training.p_uncond > 0; Ho & Salimans 2022) a
training label is replaced by the null label with probability p_uncond; the null label is
the index K (``null_label(config)``), so such a network is built with K + 1 embedding rows.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

import models
import samplers
import sde_lib

__all__ = ["build_sde", "build_model", "build_score_fn", "build_loss_fn", "data_shape",
           "sampler_options", "sample", "MODEL_ARGUMENTS", "null_label", "CLASSIFIER_KEYS",
           "classifier_arguments", "build_classifier", "sde_metadata", "GUIDANCE",
           "guidance_method", "label_classes", "sampling_labels", "guided_score_fn",
           "learn_sigma", "level_time", "respaced_call"]


def _group(config, name: str):
    try:
        return config[name]
    except (KeyError, AttributeError, TypeError):
        raise ValueError(f"the config has no '{name}' group; add config.{name}") from None


# ----------------------------------------------------------------------------- the SDE

#: config.sde keys -> keyword of the SDE class, per SDE name (num_scales is N for all).
SDE_KEYS = {"vpsde": ("beta_min", "beta_max"), "subvpsde": ("beta_min", "beta_max"),
            "vesde": ("sigma_min", "sigma_max"), "cosine_vpsde": ("s", "max_beta"),
            "logsnr_vpsde": ("logsnr_min", "logsnr_max")}


def build_sde(config) -> sde_lib.SDE:
    """The SDE named by config.sde.name (vpsde, subvpsde, vesde, cosine_vpsde, logsnr_vpsde)
    with its parameters (beta_min/beta_max, sigma_min/sigma_max, s/max_beta or
    logsnr_min/logsnr_max; num_scales = N); missing ones take the class defaults."""
    group = _group(config, "sde")
    name = str(group.get("name", "")).lower()
    sde_lib.check_choice("config.sde.name", name, sde_lib.SDES)
    kwargs = {key: group[key] for key in SDE_KEYS[name] if key in group}
    if "num_scales" in group:
        kwargs["N"] = group["num_scales"]
    return sde_lib.build_sde(name, **kwargs)


def build_loss_fn(config, sde: sde_lib.SDE):
    """``sde_lib.get_loss_fn`` with config.training's continuous, reduce_mean,
    likelihood_weighting, importance_sampling, eps and Improved DDPM's loss ('simple',
    'hybrid', 'vlb'), vlb_weight and level_importance; the 8-bit decoder's bins follow
    config.data.centered."""
    training = _group(config, "training")
    options = {key: training[key] for key in
               ("continuous", "reduce_mean", "likelihood_weighting", "importance_sampling", "eps",
                "loss", "vlb_weight", "level_importance")
               if key in training}
    if options.get("loss", "simple") != "simple":
        centered = bool(config.data.get("centered", True))
        options.update(bin_width=(2.0 if centered else 1.0) / 255.0,
                       data_range=(-1.0, 1.0) if centered else (0.0, 1.0))
    return sde_lib.get_loss_fn(sde, **options)


# ----------------------------------------------------------------------------- the network

def data_shape(config) -> tuple[int, ...]:
    """Shape of one sample: (dim,) for flat data (config.data.dim), else
    (num_channels, image_size, image_size)."""
    data = _group(config, "data")
    if "dim" in data and data.dim:
        return (int(data.dim),)
    return (int(data.num_channels), int(data.image_size), int(data.image_size))


def null_label(config) -> int | None:
    """The label of "no class" for classifier-free guidance: K = config.model.num_classes when
    the model is class-conditional and trained with config.training.p_uncond > 0, else None."""
    classes = int(config.model.get("num_classes") or 0)
    p_uncond = float(config.training.get("p_uncond", 0.0) or 0.0)
    return classes if classes > 0 and p_uncond > 0 else None


def _num_classes(config):
    """Rows of the network's class embedding: None (unconditional), K, or K + 1 with the
    null label of classifier-free guidance training (``null_label``)."""
    classes = int(config.model.get("num_classes") or 0)
    if not classes:
        return None
    return classes + 1 if null_label(config) is not None else classes


def learn_sigma(config) -> bool:
    """config.model.learn_sigma (default False): the network also outputs the reverse
    variance interpolation of Improved DDPM (MLP, DDPM and NCSN++ networks)."""
    return bool(config.model.get("learn_sigma", False))


def _mlp_arguments(config) -> dict:
    m = config.model
    return dict(data_shape=data_shape(config), hidden_dim=m.hidden_dim, num_blocks=m.num_blocks,
                embedding_type=m.embedding_type, embedding_dim=m.embedding_dim,
                fourier_scale=m.fourier_scale, num_classes=_num_classes(config),
                learn_sigma=learn_sigma(config))


def _ddpm_arguments(config) -> dict:
    m, d = config.model, config.data
    return dict(nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                resamp_with_conv=m.resamp_with_conv, conditional=m.conditional,
                image_size=d.image_size, num_channels=d.num_channels,
                num_classes=_num_classes(config), learn_sigma=learn_sigma(config),
                checkpointing=bool(m.get("checkpointing", False)))


def _ncsnpp_arguments(config) -> dict:
    """NCSN++ / DDPM++ from the official Score SDE config names (configs/*/cifar10_ncsnpp*)."""
    m = config.model
    return dict(_ddpm_arguments(config), fir=m.fir, fir_kernel=tuple(m.fir_kernel),
                skip_rescale=m.skip_rescale, resblock_type=m.resblock_type,
                progressive=m.progressive, progressive_input=m.progressive_input,
                progressive_combine=m.progressive_combine,
                attention_type=m.get("attention_type", "ddpm"), init_scale=m.init_scale,
                embedding_type=m.embedding_type, fourier_scale=m.fourier_scale,
                conv_size=m.get("conv_size", 3))


def _refinenet_arguments(config) -> dict:
    """NCSN / NCSNv2 keywords, official Score SDE key names (configs/ve/ncsn*/...)."""
    m, d = config.model, config.data
    return dict(nf=m.nf, normalization=m.get("normalization", "InstanceNorm++"),
                nonlinearity=m.get("nonlinearity", "elu"),
                interpolation=m.get("interpolation", "bilinear"), image_size=d.image_size,
                num_channels=d.num_channels, num_classes=_num_classes(config),
                checkpointing=bool(m.get("checkpointing", False)))


def _ncsn_arguments(config) -> dict:
    """The label embedding has one row per noise level: config.sde.num_scales."""
    return dict(_refinenet_arguments(config), num_scales=int(config.sde.num_scales))


def _ncsnv2_arguments(config, variant=None) -> dict:
    """variant: 'ncsnv2_64' / '_128' / '_256', or None to pick it from the image size."""
    return dict(_refinenet_arguments(config), variant=variant or config.model.get("variant"))


#: config.model.name -> (models.MODELS name, function config -> the network's keywords).
MODEL_ARGUMENTS = {
    "mlp": ("mlp", _mlp_arguments),
    "ddpm": ("ddpm", _ddpm_arguments),
    "ncsnpp": ("ncsnpp", _ncsnpp_arguments),
    "ncsn": ("ncsn", _ncsn_arguments),
    "ncsnv2": ("ncsnv2", _ncsnv2_arguments),
    # the official registry's names, which fix the variant
    "ncsnv2_64": ("ncsnv2", partial(_ncsnv2_arguments, variant="ncsnv2_64")),
    "ncsnv2_128": ("ncsnv2", partial(_ncsnv2_arguments, variant="ncsnv2_128")),
    "ncsnv2_256": ("ncsnv2", partial(_ncsnv2_arguments, variant="ncsnv2_256")),
}


def build_model(config) -> torch.nn.Module:
    """The network named by config.model.name, built from explicit keyword arguments."""
    name = str(_group(config, "model").get("name", ""))
    sde_lib.check_choice("config.model.name", name, MODEL_ARGUMENTS)
    model_name, arguments_of = MODEL_ARGUMENTS[name]
    if learn_sigma(config) and model_name in ("ncsn", "ncsnv2"):
        raise ValueError(f"config.model.learn_sigma: {name} has no variance head; use model "
                         "ddpm, ncsnpp or mlp, or set config.model.learn_sigma=False")
    return models.build_model(model_name, **arguments_of(config))


def build_score_fn(config, sde: sde_lib.SDE, model, *,
                   discrete_labels: str | None = None) -> Callable:
    """``models.get_score_fn`` with config.training.continuous, config.model.scale_by_sigma,
    center_input for images kept in [0, 1] (config.data.centered False), and the discrete
    label convention ``discrete_labels`` (default config.model.discrete_labels, "nearest";
    "score_sde" for weights of the official code: see models/score.py)."""
    labels = discrete_labels or config.model.get("discrete_labels", "nearest")
    return models.get_score_fn(sde, model, continuous=config.training.get("continuous", True),
                               scale_by_sigma=bool(config.model.get("scale_by_sigma", False)),
                               center_input=not bool(config.data.get("centered", True)),
                               discrete_labels=labels, learned_variance=learn_sigma(config))


# ----------------------------------------------------------------------------- the sampler

def sampler_options(config, method: str | None = None) -> tuple[str, dict]:
    """(name, options) of the sampler ``method`` (default config.sampling.method): its option
    group config.sampling.<name> as a plain dict."""
    sampling = _group(config, "sampling")
    name = method or sampling.method
    sde_lib.check_choice("sampler", name, samplers.SAMPLERS)
    group = sampling.get(name)
    return name, ({} if group is None else dict(group.to_dict() if hasattr(group, "to_dict")
                                                 else group))


def sample(config, score_fn: Callable, sde: sde_lib.SDE, shape, *, method: str | None = None,
           posterior_x0_variance: torch.Tensor | None = None,
           **harness_options) -> samplers.SampleResult:
    """Sample with the sampler ``method`` (default config.sampling.method) and its options
    from config.sampling.<method>; ``harness_options`` are generator, device, dtype, x_init,
    progress and callback. The respaced sampler also gets (``respaced_call``) the network's
    level times, the learned variance and ``posterior_x0_variance`` (N,) for 'analytic'."""
    name, options = sampler_options(config, method)
    if name == "respaced":
        score_fn, options = respaced_call(config, score_fn, options)
        return samplers.SAMPLERS[name].fn(score_fn, sde, shape, posterior_x0_variance,
                                          **options, **harness_options)
    return samplers.SAMPLERS[name].fn(score_fn, sde, shape, **options, **harness_options)


def level_time(config) -> str:
    """The time a network is asked about chain level i at (samplers.vlb.chain_times): 'index'
    (i T / (N - 1), where the discrete losses train it) for config.training.continuous False,
    else 'grid' (the PC grid's time)."""
    return "grid" if bool(config.training.get("continuous", True)) else "index"


def respaced_call(config, score_fn: Callable, options: dict) -> tuple[Callable, dict]:
    """(score_fn, options) for the respaced sampler: level_time None becomes ``level_time``;
    variance='learned' takes the network's (score, v) (``score_fn.score_and_variance``)."""
    options = dict(options)
    if options.get("level_time") is None:
        options["level_time"] = level_time(config)
    if options.get("clip_denoised") is None:         # images in [-1, 1]: Improved DDPM clips
        options["clip_denoised"] = (len(data_shape(config)) > 1
                                    and bool(config.data.get("centered", True)))
    if options.get("variance") == "learned":
        if not hasattr(score_fn, "score_and_variance"):
            raise ValueError("config.sampling.respaced.variance='learned' needs a network with a "
                             "variance head (config.model.learn_sigma=True) sampled without "
                             "guidance or thresholding; use variance 'small', 'large' or "
                             "'analytic' for this model")
        score_fn = score_fn.score_and_variance
    return score_fn, options


# ----------------------------------------------------------------------------- the classifier

#: config.classifier.name -> the keys of config.classifier that are the network's keyword
#: arguments (a key left out takes the class default); the data shape and num_classes are
#: added by ``classifier_arguments``.
CLASSIFIER_KEYS = {"mlp": ("hidden_dim", "num_blocks", "embedding_dim", "fourier_scale"),
                   "conv": ("nf", "ch_mult", "embedding_dim", "fourier_scale"),
                   "wideresnet": ("depth", "widen_factor", "embedding_dim", "fourier_scale")}


def classifier_arguments(config) -> tuple[str, dict]:
    """(models.CLASSIFIERS name, keyword arguments) of the noise-conditional classifier of
    config.classifier: its network keys (CLASSIFIER_KEYS), num_classes, and the data shape
    (data_shape for "mlp"; num_channels and image_size for the image classifiers)."""
    group = _group(config, "classifier")
    name = str(group.get("name", ""))
    sde_lib.check_choice("config.classifier.name", name, models.CLASSIFIERS)
    kwargs = {key: tuple(group[key]) if isinstance(group[key], (tuple, list)) else group[key]
              for key in CLASSIFIER_KEYS[name] if key in group}
    shape = data_shape(config)
    if name == "mlp":
        kwargs["data_shape"] = shape
    elif len(shape) != 3:
        raise ValueError(f"config.classifier.name={name!r} classifies images, but the data are "
                         f"flat (config.data.dim={shape[0]}); use config.classifier.name='mlp'")
    else:
        kwargs.update(num_channels=shape[0], image_size=shape[1])
    kwargs["num_classes"] = int(group.num_classes)
    return name, kwargs


def build_classifier(config) -> torch.nn.Module:
    """The classifier of config.classifier (``classifier_arguments``); wrap it with
    ``models.get_logits_fn(sde, classifier)``."""
    name, kwargs = classifier_arguments(config)
    return models.build_classifier(name, **kwargs)


def sde_metadata(sde: sde_lib.SDE) -> dict:
    """The SDE as plain data, e.g. {"name": "vpsde", "beta_min": 0.1, "beta_max": 20.0,
    "N": 1000}: what a classifier checkpoint records to be checked at load."""
    name = next(key for key, cls in sde_lib.SDES.items() if type(sde) is cls)
    return {"name": name, **{key: float(getattr(sde, key)) for key in SDE_KEYS[name]},
            "N": int(sde.N)}


# ----------------------------------------------------------------------------- guidance

#: Values of config.sampling.guidance ('auto': classifier guidance when a classifier is
#: given, else CFG when the model has a null label, else none).
GUIDANCE = ("none", "cfg", "classifier", "auto")


def guidance_method(config, *, classifier: bool) -> str:
    """The guidance of config.sampling ('none', 'cfg' or 'classifier', 'auto' resolved) for a
    run with (``classifier``) or without a noise-conditional classifier, or a one-line
    ValueError naming the fix when the config asks for what the model cannot give: a scale
    without a way to guide, CFG without a null label (training.p_uncond = 0), a class label
    for an unconditional model, a label outside [0, K), thresholding of data not in [-1, 1]."""
    s = _group(config, "sampling")
    guidance = str(s.get("guidance", "auto"))
    scale = float(s.get("guidance_scale", 0.0))
    classes = int(config.model.get("num_classes") or 0)
    null = null_label(config)
    retrain = ("train with config.model.num_classes and config.training.p_uncond > 0 (e.g. "
               "configs/vp/ddpm_digits_cond.py), or pass --classifier <train_classifier "
               "checkpoint>")
    if guidance not in GUIDANCE:
        raise ValueError(f"config.sampling.guidance must be one of "
                         f"{', '.join(map(repr, GUIDANCE))}, got {guidance!r}")
    if classifier and guidance in ("none", "cfg"):
        raise ValueError(f"--classifier is for classifier guidance but config.sampling."
                         f"guidance={guidance!r}: set it to 'classifier' or 'auto', or drop "
                         "--classifier")
    if guidance == "auto":
        guidance = ("classifier" if classifier else "cfg" if null is not None
                    else "none")
        if guidance == "none" and scale > 0:
            if not classes:
                raise ValueError(f"config.sampling.guidance_scale={scale:g}: guidance on an "
                                 f"unconditional model needs a classifier or a null label: "
                                 f"{retrain}")
            raise ValueError(f"config.sampling.guidance_scale={scale:g}: this class-conditional "
                             "model was trained with config.training.p_uncond=0 (no null label "
                             "for classifier-free guidance): retrain with "
                             "config.training.p_uncond > 0, or pass --classifier")
    elif guidance == "none" and scale > 0:
        raise ValueError(f"config.sampling.guidance_scale={scale:g} but config.sampling."
                         "guidance='none': set guidance='auto' (or 'cfg' / 'classifier') or "
                         "guidance_scale=0")
    elif guidance == "cfg" and null is None:
        what = ("an unconditional model" if not classes else
                "a class-conditional model trained with config.training.p_uncond=0")
        raise ValueError(f"config.sampling.guidance='cfg' (classifier-free guidance) needs the "
                         f"null label of a model trained with config.training.p_uncond > 0, but "
                         f"this is {what}: {retrain}")
    if guidance == "classifier" and "classifier" not in config:
        raise ValueError("classifier guidance needs config.classifier (the classifier's "
                         "num_classes): add configs.common.classifier_group(...)")
    label = int(s.get("class_label", -1))
    k = label_classes(config, classifier=guidance == "classifier")
    if label >= 0 and not k:
        raise ValueError(f"config.sampling.class_label={label} is given to an unconditional "
                         f"model: {retrain}, or use class_label=-1")
    if label >= k > 0:
        raise ValueError(f"config.sampling.class_label={label} is outside [0, {k}), the model's "
                         f"classes: use 0..{k - 1}, or -1 for all classes in turn")
    if bool(s.get("thresholding", False)):
        data = config.data
        if data.get("name") in sde_lib.TOY_DISTRIBUTIONS or not bool(data.get("centered", True)):
            raise ValueError("config.sampling.thresholding=True (dynamic thresholding) is for "
                             f"data in [-1, 1], and config.data.name={data.get('name')!r} has "
                             f"{'points' if 'dim' in data and data.dim else 'centered=False'}: "
                             "set thresholding=False (or config.data.centered=True)")
    return guidance


def label_classes(config, *, classifier: bool) -> int:
    """K, the classes the sampled labels range over: config.model.num_classes for a
    class-conditional model, else config.classifier.num_classes under classifier guidance,
    else 0 (no labels)."""
    classes = int(config.model.get("num_classes") or 0)
    if not classes and classifier:
        classes = int(config.classifier.num_classes)
    return classes


def sampling_labels(config, n: int, *, classifier: bool, device=None):
    """The labels (n,) long of the samples: config.sampling.class_label for every sample, or
    with class_label = -1 the classes 0, 1, ..., K-1, 0, ... (K = ``label_classes``); None
    when there are no classes (an unconditional model without classifier guidance)."""
    classes = label_classes(config, classifier=classifier)
    if not classes:
        return None
    label = int(config.sampling.get("class_label", -1))
    if label >= 0:
        return torch.full((n,), label, dtype=torch.long, device=device)
    return torch.arange(n, device=device) % classes


def _bind_labels(score_fn, labels, x, t):
    return score_fn(x, t, labels)


def _bound_labels(score_fn, labels):
    """score_fn(x, t) with ``labels`` bound; a learned-variance network's
    ``score_and_variance`` is bound too."""
    bound = partial(_bind_labels, score_fn, labels)
    if hasattr(score_fn, "score_and_variance"):
        bound.score_and_variance = partial(_bind_labels, score_fn.score_and_variance, labels)
    return bound


def guided_score_fn(config, sde: sde_lib.SDE, score_fn: Callable, labels,
                    logits_fn: Callable | None = None) -> Callable:
    """The score_fn(x (B, ...), t (B,)) -> (B, ...) that the samplers get, from the model's
    label-aware ``score_fn(x, t, class_labels)`` and config.sampling (``guidance_method``):

    * 'cfg': samplers.classifier_free_guidance, (1 + w) s(x, t, y) - w s(x, t, null);
    * 'classifier': samplers.classifier_guidance with ``logits_fn`` (models.get_logits_fn of
      a train_classifier network), s(x, t[, y]) + w grad_x log p_phi(y | x_t, t), on the
      conditional score of a class-conditional model, else on the unconditional one;
    * 'none': score_fn(x, t, labels) (score_fn(x, t) without labels);
    then samplers.dynamic_thresholding at config.sampling.thresholding_percentile when
    config.sampling.thresholding. w = config.sampling.guidance_scale; ``labels`` (B,) long
    (``sampling_labels``) or None; B must be the sampler's batch."""
    s = config.sampling
    method = guidance_method(config, classifier=logits_fn is not None)
    scale = float(s.get("guidance_scale", 0.0))
    classes = int(config.model.get("num_classes") or 0)
    if method == "cfg":
        guided = samplers.classifier_free_guidance(score_fn, labels, scale, null_label(config),
                                                   num_classes=classes)
    elif method == "classifier":
        if logits_fn is None:
            raise ValueError("config.sampling.guidance='classifier' needs a classifier: pass "
                             "--classifier <train_classifier checkpoint>")
        guided = samplers.classifier_guidance(
            score_fn, logits_fn, labels, scale, score_labels="class" if classes else None,
            num_classes=label_classes(config, classifier=True))
    else:
        guided = score_fn if labels is None else _bound_labels(score_fn, labels)
    if bool(s.get("thresholding", False)):
        guided = samplers.dynamic_thresholding(guided, sde,
                                               float(s.get("thresholding_percentile", 0.995)))
    return guided
