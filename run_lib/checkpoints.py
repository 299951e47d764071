"""Checkpoint files of a run: reading them safely and finding the newest loadable one.

A checkpoint is a plain dict of tensors and numbers, written atomically
(run_lib.utils.save_atomic) into <workdir>/checkpoints/:

    checkpoint_<step>.pt   every config.training.snapshot_freq steps (kept)
    latest.pt              every config.training.snapshot_freq_for_preemption steps and at
                           the end (the resume point; overwritten)

    {"model", "ema", "optimizer": state dicts, "step": completed optimizer steps,
     "rng": {"torch", "noise", ["cuda"], ["ranks"]}}      (run_lib.state.TrainState)

Files are read with ``torch.load(..., weights_only=True)``: tensors and plain data only,
never pickled code. A latest.pt that cannot be read (truncated by a full disk, overwritten
by another program) is not the end of a run: ``load_latest`` warns and falls back to the
newest checkpoint_<step>.pt that loads.
"""
from __future__ import annotations

import logging
import pickle
import re
import warnings
from pathlib import Path

import torch

__all__ = ["CheckpointError", "CHECKPOINT_KEYS", "read_checkpoint", "numbered_checkpoints",
           "load_latest", "checkpoint_dir"]

log = logging.getLogger(__name__)

#: What a checkpoint of run_lib.train holds (a resume needs all of it).
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "rng")

_NUMBERED = re.compile(r"checkpoint_(\d+)\.pt")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or is not a checkpoint of this project."""


def checkpoint_dir(workdir) -> Path:
    """<workdir>/checkpoints."""
    return Path(workdir) / "checkpoints"


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """The one-line error for a file torch.load(weights_only=True) cannot read: a pickle
    that holds code (or objects other than tensors and plain data), or a truncated, empty or
    foreign file."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL [\w.]+|Unsupported operand \d+", text)
        what = f" ({found.group(0)})" if found else ""
        return CheckpointError(
            f"{path} is a pickle that torch.load(weights_only=True) refuses{what}: it holds "
            "Python objects other than tensors and plain data, and unpickling those can run "
            "code; only plain state dicts are loaded, so re-save the weights as a dict of "
            "tensors")
    reason = " ".join(text.split())[:160]
    return CheckpointError(f"{path} cannot be read ({type(error).__name__}"
                           f"{': ' + reason if reason else ''}); it is truncated or not a "
                           "checkpoint of this project")


def read_checkpoint(path, device, *, required=CHECKPOINT_KEYS) -> dict:
    """The checkpoint dict of ``path``, read with weights_only=True onto ``device``.

    Raises FileNotFoundError when there is no file, and CheckpointError (a ValueError, one
    line) when the file cannot be read or lacks one of the ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure means: not loadable
            raise _unreadable(path, error) from error
    for warning in caught:      # only a file that loads may warn (a failure is one line)
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project: it lacks "
                              f"{', '.join(repr(k) for k in missing)}")
    return state


def numbered_checkpoints(folder) -> list[Path]:
    """The checkpoint_<step>.pt files of ``folder``, highest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _NUMBERED.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def load_latest(folder, device, *, required=CHECKPOINT_KEYS) -> tuple[dict | None, Path | None]:
    """(state, path) of ``folder``/latest.pt, or (None, None) when there is no latest.pt.

    When latest.pt exists but cannot be read, logs a warning and returns the newest
    checkpoint_<step>.pt that can; raises CheckpointError (one line) when none can."""
    latest = Path(folder) / "latest.pt"
    if not latest.exists():
        return None, None
    try:
        return read_checkpoint(latest, device, required=required), latest
    except CheckpointError as error:
        first_error = error
    for path in numbered_checkpoints(folder):
        try:
            state = read_checkpoint(path, device, required=required)
        except CheckpointError as error:
            log.warning("%s", error)
            continue
        log.warning("%s; using %s (step %d) instead", first_error, path, int(state["step"]))
        return state, path
    raise CheckpointError(f"{first_error}, and no checkpoint_<step>.pt next to it loads: "
                          f"delete {latest} to start afresh, or pass --checkpoint")
