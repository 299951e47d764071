"""Small helpers of the run package: device choice, atomic files, resolved configs."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["pick_device", "save_atomic", "write_config"]


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else the CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def save_atomic(obj, path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``: a
    process killed while writing never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_config(config, workdir) -> Path:
    """Write the resolved config as JSON into the work directory; returns its path."""
    path = Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return path
