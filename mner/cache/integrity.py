"""Whether a cache file can be trusted: opening, content checksums, verification.

Every place that opens a cache file (the reader, ``mner inspect``, the writer's resume)
goes through :func:`open_h5`, so a truncated or garbage file gives the same one line
whoever meets it. The content checksum of a dataset is the sha256 of its values in C
order (read in row blocks), so two caches with equal checksums hold identical tensors
whatever their HDF5 chunking or creation time; the writer records them in the root
attribute ``checksums`` when a cache is completed, and :func:`verify` re-reads every
dataset against them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from mner.cache import schema
from mner.errors import CacheError

#: Rows hashed per read (keeps memory flat on large caches).
BLOCK_ROWS = 1024

#: Root attribute holding ``{"group/dataset": sha256}`` of a completed cache.
CHECKSUMS_ATTR = "checksums"

# Errors h5py raises for damaged files and chunks (libhdf5 errors surface as OSError,
# some as RuntimeError / KeyError / ValueError when metadata is inconsistent).
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def reason(exc: BaseException) -> str:
    """A short, one-line reason from an h5py / OS error.

    libhdf5 messages carry the file name, addresses and an ``error message = '...'``
    part; only the human part is kept.
    """
    text = str(exc)
    m = re.search(r"error message = '([^']*)'", text)
    if m:
        return m.group(1)
    if isinstance(exc, OSError) and exc.strerror and not text.startswith("Unable"):
        return exc.strerror
    m = re.match(r"(?:\[Errno -?\d+\] )?(?:Unable to|Can't) [^(]*\((.*)\)\s*$", text)
    if m:
        text = m.group(1)
    text = " ".join(text.split())
    return text[:160] or type(exc).__name__


def unreadable(path: Path, why: str) -> CacheError:
    """The one error for a file that is not a usable cache."""
    return CacheError(f"{path}: not a readable HDF5 feature cache ({why}); "
                      "re-run mner extract (--overwrite)")


def open_h5(path: str | Path, mode: str = "r") -> h5py.File:
    """Open a cache file, or raise the one-line :func:`unreadable` error.

    Raises:
        CacheError: The file is not HDF5, is truncated, or its metadata is damaged.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size and not h5py.is_hdf5(path):
        raise unreadable(path, "no HDF5 signature")
    try:
        return h5py.File(path, mode)
    except H5_ERRORS as exc:
        raise unreadable(path, reason(exc)) from None


def checksum(ds: h5py.Dataset) -> str:
    """sha256 of a dataset's values (strings as UTF-8, one per line).

    Raises:
        OSError: (or another h5py error) when a chunk cannot be read.
    """
    h = hashlib.sha256()
    for i in range(0, max(ds.shape[0], 1) if ds.ndim else 1, BLOCK_ROWS):
        block = ds[i: i + BLOCK_ROWS] if ds.ndim else ds[()]
        if ds.dtype.kind == "O":
            for s in np.atleast_1d(block).ravel():  # row-major, one string per line
                h.update((s.decode() if isinstance(s, bytes) else str(s)).encode() + b"\n")
        else:
            h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def content_datasets(h5: h5py.File) -> Iterator[tuple[str, h5py.Dataset]]:
    """``(name, dataset)`` of every content dataset: ids, statuses, features, text keys."""
    for name in ("image_ids", "status"):
        if name in h5:
            yield name, h5[name]
    for g, specs in schema.GROUPS.items():
        if g not in h5:
            continue
        for s in specs:
            if s.name in h5[g]:
                yield f"{g}/{s.name}", h5[g][s.name]
        if g == "clip_text" and schema.TEXT_KEYS in h5[g]:
            yield f"{g}/{schema.TEXT_KEYS}", h5[g][schema.TEXT_KEYS]


def checksums(h5: h5py.File) -> dict[str, str]:
    """Checksum of every content dataset.

    Raises:
        CacheError: One line naming the first dataset that cannot be read.
    """
    out: dict[str, str] = {}
    for name, ds in content_datasets(h5):
        try:
            out[name] = checksum(ds)
        except H5_ERRORS as exc:
            raise CacheError(f"{h5.filename}: {name} cannot be read ({reason(exc)}); "
                             "re-run mner extract (--overwrite)") from None
    return out


def recorded_checksums(h5: h5py.File) -> dict[str, str] | None:
    """The checksums recorded at completion, or None for a cache made before they were."""
    raw = h5.attrs.get(CHECKSUMS_ATTR)
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode()
    return json.loads(raw)


def verify(path: str | Path) -> tuple[list[str], bool]:
    """Re-read every dataset and compare it with the checksums recorded at completion.

    Returns:
        ``(problems, compared)``: one line per damaged dataset (unreadable chunk, or
        values that differ from the recorded checksum; empty when all is well), and
        whether recorded checksums existed to compare with (caches made before mner
        recorded them are only checked for readability).

    Raises:
        CacheError: The file cannot be opened at all.
    """
    path = Path(path)
    problems: list[str] = []
    with open_h5(path) as h5:
        want = recorded_checksums(h5)
        for name, ds in content_datasets(h5):
            try:
                got = checksum(ds)
            except H5_ERRORS as exc:
                problems.append(f"{path}: {name}: unreadable ({reason(exc)}); "
                                "re-run mner extract --overwrite")
                continue
            if want is not None and want.get(name) not in (None, got):
                problems.append(f"{path}: {name}: values differ from the checksum recorded when "
                                "the cache was completed (damaged on disk?); re-run mner extract --overwrite")
        if want is not None:
            lost = sorted(set(want) - {n for n, _ in content_datasets(h5)})
            problems += [f"{path}: {n}: recorded at completion but missing now; re-run mner extract "
                         "--overwrite" for n in lost]
    return problems, want is not None
