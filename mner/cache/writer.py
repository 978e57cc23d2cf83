"""Durable, resumable writing of the HDF5 feature cache.

All writes go to ``NAME.h5.partial``; :meth:`CacheWriter.commit` renames it to
``NAME.h5`` only once every requested row is done, so a reader never sees a
half-written cache under the final name. Each group has a ``done`` flag per row that is
set in the same flush as the row's tensors: a run that stops (an exception, Ctrl-C, a
killed process between batches) is resumed by re-running it, which computes only rows
whose flag is still False. A process killed *inside* an HDF5 write can leave the
partial file unreadable; :meth:`CacheWriter.open` then starts over with a warning.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mner.cache import schema
from mner.errors import CacheError


def partial_path(out: Path) -> Path:
    """Where the cache being written lives until it is complete."""
    return out.with_name(out.name + ".partial")


def encode_attr(name: str, value: Any) -> Any:
    """Attribute value as stored: JSON text for structured values, the value otherwise."""
    if name in schema.JSON_ATTRS or isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


class CacheWriter:
    """Row-wise writer of one cache file.

    Args:
        out: Final path (``NAME.h5``); the file written is ``NAME.h5.partial``.
        h5: The open partial file.
    """

    def __init__(self, out: Path, h5: h5py.File):
        self.out = out
        self.h5 = h5

    @classmethod
    def open(cls, out: Path, *, overwrite: bool = False) -> CacheWriter:
        """Open ``out``'s partial file, resuming or extending when possible.

        * ``overwrite``: any previous partial or final file is discarded.
        * an existing partial file: resumed (an interrupted run).
        * only a final file: copied to the partial name and extended, so the final file
          stays valid until the extended one replaces it.

        Raises:
            CacheError: If ``out`` exists but is not an HDF5 file.
        """
        out = Path(out)
        part = partial_path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            part.unlink(missing_ok=True)
        elif not part.exists() and out.exists():
            if not h5py.is_hdf5(out):
                raise CacheError(
                    f"{out}: exists and is not an HDF5 cache; choose another --out or pass --overwrite"
                )
            shutil.copyfile(out, part)
        if part.exists():
            try:
                h5 = h5py.File(part, "a")
            except OSError:
                warnings.warn(f"{part}: unreadable partial cache (killed mid-write?); starting over",
                              stacklevel=2)
                part.unlink()
                h5 = h5py.File(part, "w")
        else:
            h5 = h5py.File(part, "w")
        return cls(out, h5)

    # -- root -----------------------------------------------------------------------------

    @property
    def image_ids(self) -> list[str]:
        """Image ids in row order."""
        if "image_ids" not in self.h5:
            return []
        return [s.decode() if isinstance(s, bytes) else s for s in self.h5["image_ids"][:]]

    @property
    def root_attrs(self) -> dict[str, Any]:
        """Root attributes, JSON decoded."""
        return {k: decode_attr(k, v) for k, v in self.h5.attrs.items()}

    def set_root_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Set root attributes (JSON-encoding structured values)."""
        for k, v in attrs.items():
            self.h5.attrs[k] = encode_attr(k, v)

    def add_images(self, ids: Sequence[str], statuses: Sequence[str]) -> np.ndarray:
        """Append images not yet present; grows every image group to the new row count.

        Args:
            ids: Image ids, possibly including ones already in the cache.
            statuses: Their load statuses (same order).

        Returns:
            Row index of every id in ``ids`` (int64, shape (len(ids),)).
        """
        existing = {k: i for i, k in enumerate(self.image_ids)}
        new = [(i, s) for i, s in zip(ids, statuses, strict=True) if i not in existing]
        if "image_ids" not in self.h5:
            for name in ("image_ids", "status"):
                self.h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=schema.STR_DTYPE,
                                       chunks=(1024,))
        n0 = len(existing)
        if new:
            n1 = n0 + len(new)
            for name, col in (("image_ids", 0), ("status", 1)):
                ds = self.h5[name]
                ds.resize((n1,))
                ds[n0:n1] = np.array([x[col] for x in new], dtype=object)
            for g in schema.IMAGE_GROUPS:
                if g in self.h5:
                    self._grow(self.h5[g], n1)
            for j, (i, _) in enumerate(new):
                existing[i] = n0 + j
        return np.array([existing[i] for i in ids], dtype=np.int64)

    def set_status(self, rows: np.ndarray, statuses: Sequence[str]) -> None:
        """Overwrite the status of ``rows`` (a status is final once its row is computed)."""
        ds = self.h5["status"]
        for r, s in zip(rows, statuses, strict=True):
            ds[int(r)] = s

    # -- groups ---------------------------------------------------------------------------

    def ensure_group(self, group: str, attrs: Mapping[str, Any], dims: Mapping[str, int],
                     rows: int) -> None:
        """Create ``group`` with empty datasets, or check an existing one matches ``attrs``.

        Args:
            group: A key of :data:`schema.GROUPS`.
            attrs: Group attributes; must include :data:`schema.GROUP_ATTRS`.
            dims: Values of the symbolic dimensions used by the group's shape templates.
            rows: Current number of rows (images, or sentences for clip_text).

        Raises:
            CacheError: If the group exists with a different model, weights,
                preprocessing or dims; the message says which and how to fix it.
        """
        missing = [a for a in schema.GROUP_ATTRS if a not in attrs]
        if missing:
            raise ValueError(f"group {group} lacks required attributes {missing}")
        if group in self.h5:
            g = self.h5[group]
            for key in schema.GROUP_ATTRS:
                old = decode_attr(key, g.attrs.get(key))
                new = json.loads(encode_attr(key, attrs[key])) if key in schema.JSON_ATTRS else attrs[key]
                if old != new:
                    raise CacheError(
                        f"{self.out}: {group} was extracted with {key}={_short(old)}, this run uses "
                        f"{_short(new)}; pass --overwrite or choose another --out"
                    )
            return
        g = self.h5.create_group(group)
        for k, v in attrs.items():
            g.attrs[k] = encode_attr(k, v)
        for s in schema.GROUPS[group]:
            shape = s.concrete_shape(rows, dict(dims))
            maxshape = (None,) + tuple(None if (group == "clip_text" and d == "E") else n
                                       for d, n in zip(s.shape[1:], shape[1:], strict=True))
            g.create_dataset(s.name, shape=shape, maxshape=maxshape, dtype=s.dtype,
                             chunks=_chunks(shape), fillvalue=0)
        g.create_dataset(schema.DONE, shape=(rows,), maxshape=(None,), dtype=bool,
                         chunks=(1024,), fillvalue=False)
        if group == "clip_text":
            g.create_dataset(schema.TEXT_KEYS, shape=(rows,), maxshape=(None,),
                             dtype=schema.STR_DTYPE, chunks=(1024,))

    def done(self, group: str) -> np.ndarray:
        """Per-row done flags of ``group`` (all False when the group does not exist)."""
        if group not in self.h5:
            return np.zeros(len(self.image_ids), dtype=bool)
        return self.h5[group][schema.DONE][:]

    def write_rows(self, group: str, rows: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """Write ``arrays[name][j]`` to row ``rows[j]`` and mark those rows done.

        Rows absent from ``arrays`` (images that did not load) keep the zero fill value;
        pass them in ``rows`` with empty ``arrays`` to just mark them done.

        Args:
            group: Group name.
            rows: Row indices, shape (B,).
            arrays: Dataset name -> array of shape (B, ...) matching the schema.
        """
        g = self.h5[group]
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)  # h5py fancy indexing wants increasing indices
        srows = rows[order]
        for name, arr in arrays.items():
            ds = g[name]
            arr = np.asarray(arr)[order].astype(ds.dtype, copy=False)
            if arr.ndim > 1 and arr.shape[1:] != ds.shape[1:]:
                arr = _fit(arr, ds)
            if len(srows) and np.all(np.diff(srows) == 1):
                ds[int(srows[0]): int(srows[-1]) + 1] = arr
            elif len(srows):
                ds[srows.tolist()] = arr
        if len(srows):
            d = g[schema.DONE]
            d[srows.tolist()] = True

    # -- clip_text ------------------------------------------------------------------------

    def text_keys(self) -> list[str]:
        """Sentence keys of clip_text in row order (empty when absent)."""
        if "clip_text" not in self.h5:
            return []
        return [s.decode() if isinstance(s, bytes) else s
                for s in self.h5["clip_text"][schema.TEXT_KEYS][:]]

    def add_text_keys(self, keys: Sequence[str]) -> np.ndarray:
        """Append sentence keys not yet present; returns the row of every key."""
        g = self.h5["clip_text"]
        existing = {k: i for i, k in enumerate(self.text_keys())}
        new = [k for k in dict.fromkeys(keys) if k not in existing]
        if new:
            n0 = len(existing)
            self._grow(g, n0 + len(new))
            g[schema.TEXT_KEYS][n0:] = np.array(new, dtype=object)
            existing.update({k: n0 + j for j, k in enumerate(new)})
        return np.array([existing[k] for k in keys], dtype=np.int64)

    def grow_entities(self, emax: int) -> None:
        """Widen clip_text/entities to at least ``emax`` entity slots."""
        ds = self.h5["clip_text"]["entities"]
        if ds.shape[1] < emax:
            ds.resize(emax, axis=1)

    # -- lifecycle ------------------------------------------------------------------------

    def flush(self) -> None:
        """Push written rows and flags to disk (called once per batch)."""
        self.h5.flush()

    def close(self) -> None:
        """Close the partial file, keeping it for a later resume."""
        if self.h5.id.valid:
            self.h5.close()

    def commit(self) -> Path:
        """Close and atomically rename the partial file to the final path."""
        self.close()
        partial_path(self.out).replace(self.out)
        return self.out

    @staticmethod
    def _grow(group: h5py.Group, rows: int) -> None:
        for ds in group.values():
            if isinstance(ds, h5py.Dataset) and ds.shape[0] < rows:
                ds.resize(rows, axis=0)


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    # One row per chunk for per-row tensors (readers fetch single images); 1-D columns in
    # blocks, since a 1-element chunk per image would cost more metadata than data.
    if len(shape) == 1:
        return (1024,)
    return (1,) + tuple(max(1, n) for n in shape[1:])


def _fit(arr: np.ndarray, ds: h5py.Dataset) -> np.ndarray:
    """Zero-pad ``arr`` along axis 1 to the dataset's width (clip_text entity slots)."""
    out = np.zeros((arr.shape[0],) + ds.shape[1:], dtype=ds.dtype)
    out[:, : arr.shape[1]] = arr
    return out


def decode_attr(name: str, value: Any) -> Any:
    """Attribute value as read back: JSON decoded, numpy scalars as Python values."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and name in schema.JSON_ATTRS:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."
