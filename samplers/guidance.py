"""Guidance as score transforms: each function takes a score and returns a new
``score_fn(x, t)`` (x (B, ...), t (B,) float64), so it works in every sampler of
``samplers.SAMPLERS`` at once:

    guided = samplers.classifier_free_guidance(label_score_fn, labels, 3.0, null_label=10)
    guided = samplers.classifier_guidance(score_fn, logits_fn, labels, 1.0)
    guided = samplers.dynamic_thresholding(guided, sde, percentile=0.995)
    samplers.SAMPLERS["dpm_solver"](guided, sde, (len(labels), 3, 32, 32))

The samplers run the score under ``torch.no_grad`` (samplers/harness.py); classifier
guidance turns gradients back on for its own input-gradient and keeps no graph.

* ``classifier_free_guidance``: (1 + w) s(x, t, y) - w s(x, t, null) (Ho & Salimans 2022,
  eq. 6, written for scores: s = -eps / std is linear in eps, so the same combination).
* ``classifier_guidance``: s(x, t) + scale grad_x log p_phi(y | x, t) (Song et al. 2021,
  eq. 14 at scale 1; Dhariwal & Nichol 2021, Alg. 1 with a scale).
* ``dynamic_thresholding``: Imagen's per-sample percentile clipping of the data prediction
  (Saharia et al. 2022, Sec. 2.3), returned as the score of the clipped prediction.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch

from sde_lib import SDE, append_dims, batch_time, check_int, check_real

from .harness import Schedule

__all__ = ["classifier_free_guidance", "classifier_guidance", "dynamic_thresholding"]


# ----- argument checks ----------------------------------------------------------------------
def _check_labels(class_labels, num_classes: int | None) -> torch.Tensor:
    """``class_labels`` (an int, or a (B,) integer tensor) as a 0-d or (B,) long tensor, or a
    one-line ValueError; in [0, num_classes) when num_classes is given."""
    if isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, bool):
        class_labels = torch.tensor(int(class_labels))
    if (not torch.is_tensor(class_labels) or class_labels.dtype.is_floating_point
            or class_labels.dtype.is_complex or class_labels.dtype == torch.bool
            or class_labels.ndim > 1):
        raise ValueError("class_labels must be an int or a (batch,) integer tensor of class "
                         f"indices, got {_describe(class_labels)}")
    if num_classes is not None and class_labels.numel() and (
            class_labels.min() < 0 or class_labels.max() >= num_classes):
        raise ValueError(f"class_labels must lie in [0, num_classes={num_classes}), got values in "
                         f"[{int(class_labels.min())}, {int(class_labels.max())}]")
    return class_labels.long()


def _describe(v) -> str:
    return f"a {v.dtype} tensor of shape {tuple(v.shape)}" if torch.is_tensor(v) else repr(v)


def _batch_labels(labels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The labels as (B,) on x's device, or a ValueError when their batch is not x's."""
    if labels.ndim == 1 and labels.shape[0] != x.shape[0]:
        raise ValueError(f"class_labels has {labels.shape[0]} labels but the sampler's batch is "
                         f"{x.shape[0]}: pass one label per sample (or one int for all)")
    return labels.to(x.device).expand(x.shape[0])


def _check_num_classes(num_classes) -> int | None:
    return None if num_classes is None else check_int("num_classes", num_classes, 1)


# ----- classifier-free guidance -------------------------------------------------------------
def classifier_free_guidance(score_fn: Callable, class_labels, guidance_scale: float,
                             null_label: int, *, num_classes: int | None = None) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a score transform.

    guided(x, t) = (1 + w) s(x, t, y) - w s(x, t, null_label), the score of
    p_t(x | y)^(1 + w) p_t(x)^(-w); w = 0 is the conditional model, larger w trades diversity
    for class fidelity.

    Args:
        score_fn: a label-aware score ``score_fn(x, t, class_labels)`` of a model trained with
            label dropout to ``null_label`` (``models.get_score_fn`` of a network built with
            one more class than the data has).
        class_labels: the class of every sample, an int or a (B,) integer tensor.
        guidance_scale: w >= 0.
        null_label: the label the model was trained with for "no class" (typically
            num_classes, the extra embedding).
        num_classes: if given, the labels are checked to lie in [0, num_classes).
    Returns:
        score_fn(x (B, ...), t (B,)) -> (B, ...). Cost: for w > 0 the conditional and the
        unconditional scores are one batched call on (2B, ...), so one NFE of a sampler is
        two network passes (and twice the activation memory); w = 0 makes one pass, the
        conditional score alone.
    """
    num_classes = _check_num_classes(num_classes)
    labels = _check_labels(class_labels, num_classes)
    w = check_real("guidance_scale", guidance_scale, minimum=0.0)
    null = check_int("null_label", null_label, 0)
    if (labels == null).any():
        raise ValueError(f"class_labels contain the null label {null}: pass real classes, "
                         "or use the unconditional score_fn for unguided samples")

    def guided_score(x: torch.Tensor, t) -> torch.Tensor:
        t, y = batch_time(t, x), _batch_labels(labels, x)
        if w == 0.0:
            return _call_label_score(score_fn, x, t, y, null)
        both = _call_label_score(score_fn, torch.cat([x, x]), torch.cat([t, t]),
                                 torch.cat([y, torch.full_like(y, null)]), null)
        cond, uncond = both.chunk(2)
        return cond + w * (cond - uncond)                       # = (1 + w) cond - w uncond
    return guided_score


def _call_label_score(score_fn: Callable, x, t, labels, null: int) -> torch.Tensor:
    """score_fn(x, t, labels), with the errors of a model that takes no labels (or fewer
    classes) turned into a one-line ValueError naming the fix."""
    try:
        return score_fn(x, t, labels)
    except TypeError as err:
        raise ValueError("classifier-free guidance needs a label-aware score_fn(x, t, "
                         f"class_labels) of a class-conditional model; this one is not ({err})"
                         ) from err
    except ValueError as err:
        if "class_labels" not in str(err) and "num_classes" not in str(err):
            raise
        raise ValueError("classifier-free guidance needs a class-conditional model (build it "
                         f"with num_classes, including the null label {null}): {err}") from err
    except IndexError as err:
        raise ValueError(f"a class label or the null label {null} is outside the model's class "
                         "embedding: build the model with num_classes = classes + 1 (the null "
                         f"class) and pass that null_label ({err})") from err


# ----- classifier guidance ------------------------------------------------------------------
#: Accepted values of ``score_labels`` in classifier_guidance besides an int.
SCORE_LABELS = (None, "class")


def classifier_guidance(score_fn: Callable, logits_fn: Callable, class_labels,
                        guidance_scale: float, *, score_labels=None,
                        num_classes: int | None = None) -> Callable:
    """Classifier guidance (Song et al. 2021, eq. 14; Dhariwal & Nichol 2021, Alg. 1) as a
    score transform: guided(x, t) = s(x, t) + scale * grad_x log p_phi(y | x, t).

    At scale 1 with the exact classifier this is the exact conditional score
    grad log p_t(x | y) (Bayes' rule); scale > 1 sharpens towards the class.

    Args:
        score_fn: the score to guide. The rule for label-aware scores is ``score_labels``:
            None (default) calls ``score_fn(x, t)`` (an unconditional model; also
            ``models.get_score_fn`` of one, whose class_labels default to None); "class" calls
            ``score_fn(x, t, class_labels)`` (a class-conditional model, guided further by
            the classifier); an int calls ``score_fn(x, t, that label)`` for every sample
            (e.g. the null label of a classifier-free-guidance model, its unconditional score).
        logits_fn: the noise-conditional classifier ``logits_fn(x, t) -> (B, C)`` logits
            (``models.get_logits_fn``); normalised here with log_softmax. It must treat the
            samples independently (no batch statistics), since the gradient of the summed
            log-probabilities is taken.
        class_labels: the class of every sample, an int or a (B,) integer tensor in [0, C).
        guidance_scale: the classifier scale >= 0 (0: the unguided score).
        num_classes: if given, the labels are checked against it now (otherwise against the
            classifier's C at the first call).
    Returns:
        score_fn(x (B, ...), t (B,)) -> (B, ...) in x's dtype. Each call makes one score
        evaluation and one forward + backward pass of the classifier, with gradients on
        (``torch.enable_grad``) on a detached copy of x; no graph is kept.
    """
    num_classes = _check_num_classes(num_classes)
    labels = _check_labels(class_labels, num_classes)
    scale = check_real("guidance_scale", guidance_scale, minimum=0.0)
    if not (score_labels in SCORE_LABELS or (isinstance(score_labels, numbers.Integral)
                                             and not isinstance(score_labels, bool))):
        raise ValueError(f"score_labels must be None (score_fn(x, t)), 'class' (score_fn(x, t, "
                         f"class_labels)) or an int label for every sample, got {score_labels!r}")

    def base_score(x, t, y):
        if score_labels is None:
            return _call_unconditional(score_fn, x, t)
        fixed = y if score_labels == "class" else torch.full_like(y, int(score_labels))
        return score_fn(x, t, fixed)

    def guided_score(x: torch.Tensor, t) -> torch.Tensor:
        t, y = batch_time(t, x), _batch_labels(labels, x)
        score = base_score(x, t, y)
        if scale == 0.0:
            return score
        return score + scale * classifier_log_prob_gradient(logits_fn, x, t, y).to(score.dtype)
    return guided_score


def _call_unconditional(score_fn: Callable, x, t) -> torch.Tensor:
    """score_fn(x, t), with a class-conditional model's refusal turned into the fix."""
    try:
        return score_fn(x, t)
    except ValueError as err:
        if "class_labels" not in str(err):
            raise
        raise ValueError("the score model is class-conditional: pass score_labels='class' (its "
                         "conditional score) or score_labels=<its null label> to "
                         f"classifier_guidance ({err})") from err


def classifier_log_prob_gradient(logits_fn: Callable, x: torch.Tensor, t: torch.Tensor,
                                 labels: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x, t) for every sample, shape and dtype of x (labels (B,) long).

    Computed with gradients on even under the sampler's no_grad, on a detached x, so neither
    the caller's graph nor a graph of its own is kept.
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = logits_fn(x_in, t)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"logits_fn must return (batch, num_classes) logits, got shape "
                             f"{tuple(logits.shape)} for a batch of {x.shape[0]}")
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise ValueError(f"class_labels must lie in [0, {logits.shape[1]}), the classifier's "
                             f"classes; got values in [{int(labels.min())}, {int(labels.max())}]")
        log_probs = torch.log_softmax(logits, dim=1)
        selected = log_probs.gather(1, labels[:, None]).sum()   # samples independent: sum of grads
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad.to(x.dtype)


# ----- dynamic thresholding -----------------------------------------------------------------
def dynamic_thresholding(score_fn: Callable, sde: SDE, percentile: float = 0.995, *,
                         max_threshold: float | None = None) -> Callable:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3) as a score transform, for
    data in [-1, 1].

    At each call the data prediction x0 = (x + std^2 s) / alpha (Tweedie, ``Schedule.tweedie``)
    is thresholded per sample: s_q = max(1, quantile_p(|x0|)) (capped at ``max_threshold``
    if given, like diffusers' sample_max_value), x0' = clip(x0, -s_q, s_q) / s_q; and the score
    of that prediction is returned, s' = (alpha x0' - x) / std^2, computed as
    s + alpha (x0' - x0) / std^2 so that it is exactly s where nothing is clipped.

    Args:
        score_fn: score_fn(x, t), e.g. a guided one (thresholding is meant for high guidance).
        sde: the SDE (for alpha(t), std(t)).
        percentile: p in (0, 1], the quantile of |x0| over each sample's elements.
        max_threshold: None or a cap >= 1 on s_q.
    Returns:
        score_fn(x (B, ...), t (B,)) -> (B, ...) in x's dtype.
    """
    p = check_real("percentile", percentile, minimum=0.0, strict=True, maximum=1.0)
    if max_threshold is not None:
        max_threshold = check_real("max_threshold", max_threshold, minimum=1.0)

    def thresholded_score(x: torch.Tensor, t) -> torch.Tensor:
        t = batch_time(t, x)
        score = score_fn(x, t)
        alpha, std = sde.marginal_coeffs(t)
        x0 = Schedule.tweedie(x, score, alpha, std)
        x0_clipped = threshold_prediction(x0, p, max_threshold)
        scale = append_dims((alpha / std ** 2).to(x.dtype), x.ndim)
        return score + scale * (x0_clipped - x0)
    return thresholded_score


def threshold_prediction(x0: torch.Tensor, percentile: float,
                         max_threshold: float | None = None) -> torch.Tensor:
    """Imagen's dynamic thresholding of a data prediction x0 (B, ...): per sample
    s = max(1, quantile_p(|x0|)) (at most ``max_threshold``), clip(x0, -s, s) / s; in [-1, 1]."""
    flat = x0.detach().reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.to(torch.float64), percentile, dim=1).clamp(min=1.0)
    if max_threshold is not None:
        s = s.clamp(max=max_threshold)
    s = append_dims(s.to(x0.dtype), x0.ndim)
    return torch.maximum(torch.minimum(x0, s), -s) / s

