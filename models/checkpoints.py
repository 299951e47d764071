"""Checkpoints of the official Score SDE PyTorch code (yang-song/score_sde_pytorch): recognise
them, convert their state dicts to ours, and load strictly with a message naming a bad key.

    state = torch.load(path, weights_only=True)
    if models.is_score_sde_checkpoint(state):
        state = models.convert_score_sde_state_dict(state, ema=True)
    models.load_state_dict_strict(model, state)

The DDPM and NCSN++ networks here keep the official parameter names, shapes and registration
order, so the conversion only strips the ``nn.DataParallel`` prefix, drops the unused
``sigmas`` buffer and lines the bare EMA list up with the model's parameters.
"""
from __future__ import annotations

from torch import nn

__all__ = ["is_score_sde_checkpoint", "convert_score_sde_state_dict", "load_state_dict_strict"]

#: Buffers of the official models that ours do not have (noise tables belong to get_score_fn).
_DROPPED_KEYS = ("sigmas",)
#: Parameters that the official models create with requires_grad=False (NCSN++'s Gaussian
#: Fourier features ``W``, always module 0): their EMA neither tracks nor overwrites them.
_FROZEN_KEYS = ("all_modules.0.W",)


def is_score_sde_checkpoint(state: dict) -> bool:
    """Whether a checkpoint dict was written by the official Score SDE code (its EMA is a bare
    list ``ema['shadow_params']``, ours keys the shadow by name; their ``save_checkpoint``
    writes ``{'model', 'ema', 'optimizer', 'step'}``)."""
    return isinstance(state.get("ema"), dict) and "shadow_params" in state["ema"]


def convert_score_sde_state_dict(state: dict, *, ema: bool = False) -> dict:
    """Turn a Score SDE (yang-song/score_sde_pytorch) DDPM or NCSN++ checkpoint into our
    state dict.

    Accepts the whole checkpoint (a dict with a ``'model'`` entry, as their ``save_checkpoint``
    writes: ``{'model', 'ema', 'optimizer', 'step'}``) or the model state dict itself. Strips
    the ``module.`` prefix that their ``nn.DataParallel`` wrapper adds and drops the unused
    ``sigmas`` buffer; every other key is kept unchanged, so the result loads with
    ``strict=True`` (use ``load_state_dict_strict`` for a message naming a bad key).

    ``ema=True`` (whole checkpoints only) returns the EMA weights instead: their
    ``checkpoint['ema']['shadow_params']`` is a bare list of the parameters with
    ``requires_grad`` in ``model.parameters()`` order; for DDPM and NCSN++ every state-dict
    entry but ``sigmas`` is a parameter, in that same order (checked against their code), so
    the list is matched to the model's keys one to one, skipping the frozen Fourier features
    ``all_modules.0.W`` of NCSN++, which keep the model's value (as their ``copy_to`` does).
    """
    checkpoint = state
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    elif ema:
        raise ValueError("ema=True needs the whole checkpoint (a dict with 'model' and 'ema')")
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key not in _DROPPED_KEYS:
            out[key] = value
    if not ema:
        return out
    shadow = checkpoint.get("ema", {}).get("shadow_params")
    if shadow is None:
        raise ValueError("checkpoint has no ema['shadow_params']")
    tracked = [key for key in out if key not in _FROZEN_KEYS]
    if len(shadow) != len(tracked):
        raise ValueError(f"ema['shadow_params'] has {len(shadow)} tensors but the model state "
                         f"has {len(tracked)} trainable parameters")
    for key, avg in zip(tracked, shadow):
        if tuple(avg.shape) != tuple(out[key].shape):
            raise ValueError(f"EMA tensor for {key!r} has shape {tuple(avg.shape)}, the model "
                             f"has {tuple(out[key].shape)}")
    averaged = dict(zip(tracked, shadow))
    return {key: averaged.get(key, value) for key, value in out.items()}


def load_state_dict_strict(model: nn.Module, state: dict) -> None:
    """``model.load_state_dict(state, strict=True)``, but first check keys and shapes and raise
    a ValueError that names the first offending key (torch's error lists them all)."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ValueError(f"state dict is missing key {key!r} (expected shape "
                             f"{tuple(value.shape)})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch for {key!r}: checkpoint has "
                             f"{tuple(state[key].shape)}, model has {tuple(value.shape)}")
    for key in state:
        if key not in own:
            raise ValueError(f"unexpected key {key!r} in state dict (not in the model)")
    model.load_state_dict(state, strict=True)
