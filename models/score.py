"""The one place that turns a network's output into a score, and owns its time scalings.

Conventions (those of the Score SDE code, so published checkpoints keep their meaning):

* VP and sub-VP networks predict the noise z in x_t = alpha x_0 + std z, so
  score = -eps_hat / std. They are conditioned on ``VP_TIME_SCALE * t`` (continuous) or on
  the discrete step index i (DDPM, ``continuous=False``, std from the DDPM chain).
* VE networks are conditioned on sigma(t) (continuous) or on the NCSN level label
  ``N - 1 - i``, so that label 0 is the largest sigma as in NCSN (``continuous=False``).
  They output the score, or the score times sigma when ``scale_by_sigma=True`` (NCSNv2,
  NCSN++), in which case the wrapper divides by sigma.
* Networks always see pixels in [-1, 1]. For data kept in [0, 1] (config.data.centered
  False, as the official VE CIFAR-10 runs) ``center_input=True`` feeds the network 2 x - 1,
  which the Score SDE networks do inside their forward; the output is used unchanged, so a
  published checkpoint gives the same score as in that code.
"""
from __future__ import annotations

from typing import Callable

import torch

from sde_lib import SDE, VESDE, append_dims, batch_time

__all__ = ["get_score_fn", "VP_TIME_SCALE"]

#: Continuous VP / sub-VP networks see 999 t: the range of DDPM's step index.
VP_TIME_SCALE = 999.0


def _noise_level(sde: SDE, t: torch.Tensor, continuous: bool):
    """(std (B,) float64, network conditioning (B,)) at times t."""
    if continuous:
        _, std = sde.marginal_coeffs(t)
        if isinstance(sde, VESDE):
            return std, std
        return std, VP_TIME_SCALE * t
    i = sde.time_index(t)
    _, std = sde.discrete_marginal_coeffs(i)
    if isinstance(sde, VESDE):
        return std, sde.N - 1 - i
    return std, i


def get_score_fn(sde: SDE, model: Callable, continuous: bool = True, *,
                 scale_by_sigma: bool = False, center_input: bool = False) -> Callable:
    """Wrap ``model(x, cond[, class_labels])`` as ``score_fn(x, t, class_labels=None)``.

    Args:
        sde: the forward SDE the model was trained for.
        model: network taking x (B, ...) and a (B,) conditioning (see module docstring).
        continuous: conditioning on continuous time/sigma (True) or on discrete levels.
        scale_by_sigma: VE only; the network outputs sigma * score.
        center_input: data in [0, 1]; the network is given 2 x - 1 (see module docstring).
    Returns:
        score_fn(x (B, ...), t (B,) or scalar in [eps, T], class_labels=None) -> score like x,
        in x's dtype. The model's train/eval mode is left as the caller set it.
    """
    if not continuous:
        sde.discrete_marginal_coeffs(torch.zeros(1, dtype=torch.long))  # raises for sub-VP
    if scale_by_sigma and not isinstance(sde, VESDE):
        raise ValueError("scale_by_sigma applies to VE SDEs only; VP and sub-VP networks "
                         "predict noise and are always divided by std")
    is_ve = isinstance(sde, VESDE)

    def score_fn(x: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = batch_time(t, x)
        std, cond = _noise_level(sde, t, continuous)
        cond = cond if cond.dtype == torch.long else cond.to(x.dtype)
        h = 2 * x - 1 if center_input else x
        out = model(h, cond) if class_labels is None else model(h, cond, class_labels)
        std = append_dims(std.to(x.dtype), x.ndim)
        if is_ve:
            return out / std if scale_by_sigma else out
        return -out / std

    return score_fn
