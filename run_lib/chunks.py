"""Seeded, resumable chunks of work on disk, shared by --mode eval (run_lib.quality) and
--mode sample / likelihood (run_lib.evaluate).

A job of n items is cut into chunks of a fixed size; chunk k gets its own seed, so its
result does not depend on how many processes share the job (under torchrun rank r does the
chunks k = r, r + W, ...). Each chunk is one .npz written atomically (a temporary file,
then a rename) with a JSON ``meta`` entry holding the protocol ``key``; a chunk on disk with
the same key and size is reused, a damaged one or one of another protocol is done again.
Rank 0 then reads the chunks one at a time; ``write_npz_streamed`` builds an .npz output
from them without holding more than one chunk in memory.

    chunk_paths(folder, n, size)   chunk_<k:05d>.npz of every chunk
    read_chunk(path, key, size)    the arrays and meta of a finished chunk, or None
    write_chunk(path, arrays, meta)
    write_npz_streamed(path, arrays)
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["CHUNK_SEED_STRIDE", "chunk_paths", "chunk_size", "own_chunks", "read_chunk",
           "write_chunk", "write_npz_streamed", "offset_seed"]

log = logging.getLogger(__name__)

#: Seeds of the chunks are CHUNK_SEED_STRIDE apart (or a multiple of it from a base).
CHUNK_SEED_STRIDE = 1_000_000


def offset_seed(base: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of sample / likelihood mode: ``base`` + 10^6 k, so chunk 0
    keeps the seed that the whole job had before it was cut into chunks."""
    return int(base) + CHUNK_SEED_STRIDE * int(chunk)


def chunk_size(n: int, size: int, k: int) -> int:
    """Items in chunk k of n items in chunks of ``size`` (the last one may be short)."""
    return min(size, n - k * size)


def chunk_paths(folder: Path, n: int, size: int) -> list[Path]:
    """<folder>/chunk_<k:05d>.npz of the ceil(n / size) chunks."""
    return [Path(folder) / f"chunk_{k:05d}.npz" for k in range(-(-n // size))]


def own_chunks(count: int, rank: int, world_size: int) -> range:
    """The chunks of rank ``rank`` of ``world_size``: k = rank, rank + W, ..."""
    return range(rank, count, world_size)


def read_chunk(path: Path, key: dict, size: int | None = None, *,
               rows: str = "images") -> dict | None:
    """The arrays (and meta entries) of a chunk file written with the protocol ``key`` and
    holding ``size`` rows of the array ``rows`` (when given); None when absent, damaged, of
    another protocol or of another size (then it is done again)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        log.warning("%s cannot be read (%s): doing it again", path, error)
        return None
    if meta.get("key") != json.loads(json.dumps(key)):
        log.warning("%s was made with another protocol: doing it again", path)
        return None
    if size is not None and len(arrays.get(rows, ())) != size:
        log.warning("%s holds %d rows, not %d: doing it again", path,
                    len(arrays.get(rows, ())), size)
        return None
    return {**arrays, **meta}


def write_chunk(path: Path, arrays: dict, meta: dict) -> None:
    """Write the arrays and ``meta`` (JSON) to ``path`` atomically."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, meta=np.array(json.dumps(meta)), **arrays)
    temporary.replace(path)


def write_npz_streamed(path, arrays: dict, *, compress: bool = True) -> Path:
    """An .npz (np.load reads it like np.savez_compressed's) written atomically, whose
    entries are either arrays or ``(shape, dtype, parts)`` with ``parts`` an iterable of
    arrays whose rows are concatenated into an array of ``shape``: the parts are written one
    at a time, so the whole array is never in memory."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp.npz")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(temporary, "w", compression=method, allowZip64=True) as archive:
        for name, value in arrays.items():
            if isinstance(value, tuple):
                shape, dtype, parts = value
                _write_entry(archive, name, tuple(shape), np.dtype(dtype), parts)
            else:
                with archive.open(f"{name}.npy", "w", force_zip64=True) as stream:
                    np.lib.format.write_array(stream, np.asarray(value), allow_pickle=False)
    temporary.replace(path)
    return path


def _write_entry(archive: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype,
                 parts: Iterable) -> None:
    rows = 0
    with archive.open(f"{name}.npy", "w", force_zip64=True) as stream:
        np.lib.format.write_array_header_2_0(
            stream, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                     "shape": shape})
        for part in parts:
            part = np.ascontiguousarray(part, dtype=dtype)
            if part.shape[1:] != shape[1:]:
                raise ValueError(f"a part of {name} has shape {part.shape}, not (*, "
                                 f"{', '.join(map(str, shape[1:]))})")
            stream.write(part.tobytes())
            rows += len(part)
    if rows != shape[0]:
        raise ValueError(f"{name}: {rows} rows written, {shape[0]} announced")
