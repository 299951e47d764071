"""The one place that turns a network's output into a score, and owns its time scalings.

Conventions (those of the Score SDE code, yang-song/score_sde_pytorch ``models/utils.py``
``get_score_fn``, so published checkpoints keep their meaning). What the wrapper needs to know
about the SDE it reads from its capabilities: ``sde.network_conditioning`` ("time" for VP and
sub-VP, "sigma" for VE) and ``sde.has_discrete_chain``.

* Time-conditioned (VP, sub-VP) networks predict the noise z in x_t = alpha x_0 + std z, so
  score = -eps_hat / std. They are conditioned on ``VP_TIME_SCALE * t`` (continuous) or on
  the discrete DDPM level (``continuous=False``, std from the DDPM chain).
* Sigma-conditioned (VE) networks are conditioned on sigma(t) (continuous) or on the NCSN
  level label ``N - 1 - i``, so that label 0 is the largest sigma as in NCSN
  (``continuous=False``). They output the score, or the score times sigma when
  ``scale_by_sigma=True`` (NCSNv2, NCSN++), in which case the wrapper divides by sigma.
* Networks always see pixels in [-1, 1]. For data kept in [0, 1] (config.data.centered
  False, as the official VE CIFAR-10 runs) ``center_input=True`` feeds the network 2 x - 1,
  which the Score SDE networks do inside their forward; the output is used unchanged, so a
  published checkpoint gives the same score as in that code.

Discrete levels off the time grid t_i = i T / (N - 1) (``continuous=False``;
``discrete_labels`` picks the convention):

* ``"nearest"`` (default): the nearest level i = round(t (N - 1) / T). A VP network sees the
  integer i and std is the chain's std_i; a VE network sees N - 1 - i and std is sigma_i.
  Score and label are those of one level of the chain the network was trained on.
* ``"score_sde"``: the official ``get_score_fn``, computed as there in t's dtype. VP: the
  network sees the fractional label t (N - 1) and std = sqrt(1 - alphas_cumprod)[floor(t (N -
  1))] (their ``labels.long()``); between grid points the label and the std thus come from
  different places, and a grid time whose product t (N - 1) falls just below the integer
  (float64 126 / 999 * 999 = 125.99999999999999) takes the std of the level below, as there.
  VE: label round((T - t)(N - 1)) and the sigma of that label, i.e. "nearest" but for ties.
  Use it to reproduce the official scores (bits/dim, ODE samples) of a converted official
  DDPM checkpoint: with the same weights they agree to ~1e-15 in float64 (their float32 std
  table moves the VP scores by up to ~3e-6; tests/test_ddpm_unet.py).

Learned variances (Improved DDPM, Nichol & Dhariwal 2021, Sec. 3.1): a network built with
``learn_sigma`` outputs twice the channels, [out, r] along dim 1. With
``learned_variance=True`` the score comes from ``out`` as above, and
``score_fn.score_and_variance(x, t, class_labels=None)`` also returns the interpolation
v = (r + 1) / 2 of the reverse variance, Sigma = exp(v log beta_t + (1 - v) log beta~_t)
(their eq. 15 with improved-diffusion's map of r in [-1, 1] to v in [0, 1]; the step
variances themselves are the sampler's: samplers.vlb.learned_variances).

Both agree on the grid points whose product t (N - 1) is exact; off the grid they differ by
~1e-2 relative for VP. Continuous conditioning
(``continuous=True``) is the official one: 999 t for VP / sub-VP, sigma(t) for VE.
"""
from __future__ import annotations

from typing import Callable

import torch

from sde_lib import SDE, append_dims, batch_time, check_bool, check_choice

__all__ = ["get_score_fn", "VP_TIME_SCALE", "DISCRETE_LABELS"]

#: Continuous VP / sub-VP networks see 999 t: the range of DDPM's step index.
VP_TIME_SCALE = 999.0
#: The conventions for discrete levels off the grid (module docstring).
DISCRETE_LABELS = ("nearest", "score_sde")


def _sigma_conditioned(sde: SDE) -> bool:
    """True when the network sees sigma (VE), False when it sees time (VP, sub-VP)."""
    return check_choice("sde.network_conditioning", sde.network_conditioning,
                        ("time", "sigma")) == "sigma"


# Each level function maps times t (B,) to (std (B,) float64, the network's conditioning (B,));
# ``sigma`` says whether the network is sigma-conditioned (VE) or time-conditioned (VP, sub-VP).

def _continuous_level(sde: SDE, t: torch.Tensor, sigma: bool):
    """Conditioning sigma(t) (VE) or 999 t (VP, sub-VP); std(t) of the SDE."""
    _, std = sde.marginal_coeffs(t)
    return std, (std if sigma else VP_TIME_SCALE * t)


def _nearest_level(sde: SDE, t: torch.Tensor, sigma: bool):
    """The nearest level i: long label i (VP) or N - 1 - i (VE); std_i of the chain."""
    i = sde.time_index(t)
    _, std = sde.discrete_marginal_coeffs(i)
    return std, (sde.N - 1 - i if sigma else i)


def _score_sde_level(sde: SDE, t: torch.Tensor, sigma: bool):
    """The official get_score_fn's labels (models/utils.py), in t's dtype: VP ``labels =
    t * (N - 1)`` (float) and ``std = sqrt_1m_alphas_cumprod[labels.long()]``; VE ``labels =
    round((T - t) * (N - 1)).long()`` and sigma = their descending ``sigmas[labels]``."""
    t = t if t.is_floating_point() else t.to(torch.get_default_dtype())
    last = sde.N - 1
    if sigma:
        label = torch.round((sde.T - t) * last).long().clamp(0, last)
        _, std = sde.discrete_marginal_coeffs(last - label)
        return std, label
    label = t * last
    _, std = sde.discrete_marginal_coeffs(label.long().clamp(0, last))
    return std, label


def _check_discrete(sde: SDE) -> None:
    if not sde.has_discrete_chain:
        raise ValueError(f"{type(sde).__name__} has no discrete chain here ({sde!r}) for a "
                         "network conditioned on discrete levels: use continuous=True")


def get_score_fn(sde: SDE, model: Callable, continuous: bool = True, *,
                 scale_by_sigma: bool = False, center_input: bool = False,
                 discrete_labels: str = "nearest", learned_variance: bool = False) -> Callable:
    """Wrap ``model(x, cond[, class_labels])`` as ``score_fn(x, t, class_labels=None)``.

    Args:
        sde: the forward SDE the model was trained for.
        model: network taking x (B, ...) and a (B,) conditioning (see module docstring).
        continuous: conditioning on continuous time/sigma (True) or on discrete levels
            (needs ``sde.has_discrete_chain``).
        scale_by_sigma: sigma-conditioned (VE) SDEs only; the network outputs sigma * score.
        center_input: data in [0, 1]; the network is given 2 x - 1 (see module docstring).
        discrete_labels: with ``continuous=False``, how a time off the grid becomes a level:
            "nearest" (default; the nearest level) or "score_sde" (the official Score SDE
            convention: VP label t (N - 1), std at floor(t (N - 1))); see the module
            docstring. Ignored with ``continuous=True``.
        learned_variance: the model outputs (B, 2 C, ...) = [out, r] (``learn_sigma``); the
            score uses ``out`` and ``score_fn.score_and_variance`` returns (score, v (B, C,
            ...)) with v = (r + 1) / 2 (module docstring).
    Returns:
        score_fn(x (B, ...), t (B,) or scalar in [eps, T], class_labels=None) -> score like x,
        in x's dtype. The model's train/eval mode is left as the caller set it.
        ``score_fn.learned_variance`` says whether it has ``score_and_variance``.
    """
    check_bool("continuous", continuous)
    check_bool("scale_by_sigma", scale_by_sigma)
    check_bool("center_input", center_input)
    check_choice("discrete_labels", discrete_labels, DISCRETE_LABELS)
    check_bool("learned_variance", learned_variance)
    sigma_conditioned = _sigma_conditioned(sde)
    if not continuous:
        _check_discrete(sde)
    if scale_by_sigma and not sigma_conditioned:
        raise ValueError("scale_by_sigma applies to VE (sigma-conditioned) SDEs only; VP and "
                         "sub-VP networks predict noise and are always divided by std")
    if continuous:
        level = _continuous_level
    else:
        level = _nearest_level if discrete_labels == "nearest" else _score_sde_level

    def score_and_output(x: torch.Tensor, t, class_labels):
        """(score like x, the network's raw output)."""
        t = batch_time(t, x)
        std, cond = level(sde, t, sigma_conditioned)
        cond = cond if cond.dtype == torch.long else cond.to(x.dtype)
        h = 2 * x - 1 if center_input else x
        raw = model(h, cond) if class_labels is None else model(h, cond, class_labels)
        out = _split_learned(raw, x)[0] if learned_variance else raw
        std = append_dims(std.to(x.dtype), x.ndim)
        if sigma_conditioned:
            return (out / std if scale_by_sigma else out), raw
        return -out / std, raw

    def score_fn(x: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return score_and_output(x, t, class_labels)[0]

    def score_and_variance(x: torch.Tensor, t, class_labels: torch.Tensor | None = None):
        """(score (B, ...), v (B, ...) in x's dtype): the variance interpolation v = (r + 1) / 2."""
        score, raw = score_and_output(x, t, class_labels)
        return score, (_split_learned(raw, x)[1] + 1) / 2

    score_fn.learned_variance = learned_variance
    if learned_variance:
        score_fn.score_and_variance = score_and_variance
    return score_fn


def _split_learned(raw: torch.Tensor, x: torch.Tensor):
    """[out, r] halves of a learned-variance output (B, 2 C, ...) for x (B, C, ...)."""
    if raw.shape[1] != 2 * x.shape[1] or raw.shape[2:] != x.shape[2:]:
        raise ValueError(f"learned_variance=True needs a network output of shape (B, "
                         f"{2 * x.shape[1]}, ...) for x of shape {tuple(x.shape)}, got "
                         f"{tuple(raw.shape)}: build the network with learn_sigma=True "
                         "(config.model.learn_sigma)")
    return raw.chunk(2, dim=1)
