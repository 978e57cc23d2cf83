"""Durable, resumable writing of the HDF5 feature cache.

All writes go to ``NAME.h5.partial``; :meth:`CacheWriter.commit` renames it to
``NAME.h5`` only once every requested row is done and the whole file has been read
back, so the final name only ever holds a complete, readable cache.

Completion is recorded after the data: a row's tensors and status are written and
flushed first, its per-group ``done`` flag afterwards (:meth:`CacheWriter.write_rows`,
:meth:`CacheWriter.mark_done`). A run that stops (a write error, Ctrl-C, a process
killed between or inside writes) is resumed by re-running it, which computes only rows
whose flag is still False. Before a partial file is reused it is verified (it opens,
every dataset reads back, flags and statuses agree); one that cannot be verified is set
aside as ``NAME.h5.partial.broken-<time>`` (never deleted) and the run starts over with
a warning. A failed write (disk full, file-size limit, I/O error) is one
:class:`~mner.errors.CacheError` line naming the file and the fix.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mner.cache import integrity, schema
from mner.errors import CacheError

#: Groups whose rows hold a dense embedding that is never all zeros for a loaded image,
#: so an ``ok`` + ``done`` row of zeros can only be a row whose data never reached disk.
PROBES: dict[str, str] = {"resnet": "pooled", "clip": "image_embed"}


def partial_path(out: Path) -> Path:
    """Where the cache being written lives until it is complete."""
    return out.with_name(out.name + ".partial")


def encode_attr(name: str, value: Any) -> Any:
    """Attribute value as stored: JSON text for structured values, the value otherwise."""
    if name in schema.JSON_ATTRS or isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _writes(method: Callable) -> Callable:
    """Turn an I/O error inside a write into the one-line :class:`CacheError`."""

    @functools.wraps(method)
    def wrapper(self: CacheWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except CacheError:
            raise
        except integrity.H5_ERRORS as exc:
            self.fail()
            raise self.write_error(exc) from None

    return wrapper


def set_aside(part: Path, why: str, warn: Callable[[str], None] | None = None) -> Path:
    """Rename an unusable partial file to ``NAME.partial.broken-<time>`` and warn."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = part.with_name(f"{part.name}.broken-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = part.with_name(f"{part.name}.broken-{stamp}-{n}")
    part.rename(dest)
    (warn or _stderr)(f"warning: {part}: cannot be verified ({why}); set aside as {dest.name}, "
                      "starting over")
    return dest


def check_partial(part: Path) -> str | None:
    """Why ``part`` cannot be resumed (None when every dataset reads back and rows agree)."""
    try:
        with h5py.File(part, "r") as h5:
            n = h5["image_ids"].shape[0] if "image_ids" in h5 else 0
            if "status" in h5 and h5["status"].shape[0] != n:
                return "image_ids and status differ in length"
            for _, ds in integrity.content_datasets(h5):
                integrity.checksum(ds)
            for g in schema.GROUPS:
                if g in h5:
                    done = h5[g][schema.DONE][:]
                    rows = h5[g][schema.TEXT_KEYS].shape[0] if g == "clip_text" else n
                    if len(done) != rows or any(ds.shape[0] != rows for ds in h5[g].values()):
                        return f"{g} has rows of different lengths"
    except integrity.H5_ERRORS as exc:
        return integrity.reason(exc)
    return None


class CacheWriter:
    """Row-wise writer of one cache file.

    Args:
        out: Final path (``NAME.h5``); the file written is ``NAME.h5.partial``.
        h5: The open partial file.
    """

    def __init__(self, out: Path, h5: h5py.File):
        self.out = out
        self.h5 = h5
        #: Set once a write failed: the open file may no longer be consistent.
        self.failed = False

    def fail(self) -> None:
        """Stop every further write to disk after a failed one.

        libhdf5 flushes its dirty metadata when the file is closed, and would hit the
        same full disk or size limit again: an error at every object's deallocation and,
        at exit, a segfault. The file descriptor is pointed at ``/dev/null`` instead, so
        the close completes and the partial file keeps exactly what reached the disk
        (the next run verifies it before any reuse).
        """
        if not self.failed:
            self.failed = True
            _detach(self.h5)

    @property
    def part(self) -> Path:
        """The partial file being written."""
        return partial_path(self.out)

    def write_error(self, exc: BaseException) -> CacheError:
        """The one line for a failed write (what failed, which file, what to do)."""
        return CacheError(f"{self.part}: writing the feature cache failed ({integrity.reason(exc)}); "
                          "free disk space (or raise the file-size limit) and re-run the same "
                          "mner extract to resume")

    @classmethod
    def open(cls, out: Path, *, overwrite: bool = False,
             warn: Callable[[str], None] | None = None) -> CacheWriter:
        """Open ``out``'s partial file, resuming or extending when possible.

        * ``overwrite``: any previous partial or final file is discarded.
        * an existing partial file: verified (:func:`check_partial`) and resumed, or set
          aside with a warning when it cannot be verified.
        * only a final file: copied to the partial name and extended, so the final file
          stays valid until the extended one replaces it.

        Rows that a previous run marked done but whose status or data never reached the
        disk are marked not done again (see :meth:`distrust_incomplete_rows`).

        Args:
            out: The final cache path.
            overwrite: Start from an empty file.
            warn: Called with one line when a partial file is set aside (default stderr).

        Raises:
            CacheError: If ``out`` exists but is not a readable cache, or the folder
                cannot be written.
        """
        out = Path(out)
        part = partial_path(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if overwrite:
                part.unlink(missing_ok=True)
            elif not part.exists() and out.exists():
                integrity.open_h5(out).close()  # one line for a damaged final file
                shutil.copyfile(out, part)
            if part.exists():
                why = check_partial(part)
                if why is not None:
                    set_aside(part, why, warn)
            # No chunk cache: every row write reaches the file inside the call that makes
            # it, so a failure is an exception here and not a swallowed error when h5py
            # later closes a dataset (which used to end in a segfault).
            h5 = h5py.File(part, "a" if part.exists() else "w", rdcc_nbytes=0)
        except (CacheError, KeyboardInterrupt):
            raise
        except integrity.H5_ERRORS as exc:
            raise CacheError(f"{part}: cannot write the feature cache here ({integrity.reason(exc)}); "
                             "check the folder's permissions and free space, or choose another "
                             "--out") from None
        writer = cls(out, h5)
        writer.distrust_incomplete_rows()
        return writer

    @_writes
    def distrust_incomplete_rows(self) -> int:
        """Mark not done every row whose completion cannot be trusted; returns how many.

        A row is untrusted when it is marked done but its status is still ``pending``
        (the status write never landed), or it is ``ok`` and its probe embedding
        (:data:`PROBES`) is all zeros (the fill value: its data never landed).
        """
        if "status" not in self.h5:
            return 0
        status = np.array([s.decode() if isinstance(s, bytes) else s for s in self.h5["status"][:]],
                          dtype=object)
        undone = 0
        for g in schema.IMAGE_GROUPS:
            if g not in self.h5:
                continue
            d = self.h5[g][schema.DONE]
            done = d[:]
            bad = done & (status == "pending")
            if g in PROBES:
                probe = self.h5[g][PROBES[g]][:]
                zero = ~probe.reshape(len(probe), -1).any(axis=1)
                bad |= done & (status == "ok") & zero
            if bad.any():
                done[bad] = False
                d[:] = done
                undone += int(bad.sum())
        if undone:
            self.h5.flush()
        return undone

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

    @_writes
    def set_root_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Set root attributes (JSON-encoding structured values)."""
        for k, v in attrs.items():
            self.h5.attrs[k] = encode_attr(k, v)

    @_writes
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

    @_writes
    def set_status(self, rows: np.ndarray, statuses: Sequence[str]) -> None:
        """Overwrite the status of ``rows`` (a status is final once its row is computed)."""
        ds = self.h5["status"]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            ds[int(rows[0]): int(rows[0]) + len(rows)] = np.array(list(statuses), dtype=object)
            return
        for r, s in zip(rows, statuses, strict=True):
            ds[int(r)] = s

    # -- groups ---------------------------------------------------------------------------

    @_writes
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
            # fletcher32: a chunk damaged on disk fails to read (a CacheError) instead of
            # returning wrong numbers. HDF5 allows no filter on variable-length strings:
            # those keep their empty-string fill and rely on the content checksums.
            numeric = s.dtype.kind != "O"
            g.create_dataset(s.name, shape=shape, maxshape=maxshape, dtype=s.dtype,
                             chunks=_chunks(shape), fillvalue=0 if numeric else None,
                             fletcher32=numeric)
        g.create_dataset(schema.DONE, shape=(rows,), maxshape=(None,), dtype=bool,
                         chunks=(1024,), fillvalue=False, fletcher32=True)
        if group == "clip_text":
            g.create_dataset(schema.TEXT_KEYS, shape=(rows,), maxshape=(None,),
                             dtype=schema.STR_DTYPE, chunks=(1024,))

    def done(self, group: str) -> np.ndarray:
        """Per-row done flags of ``group`` (all False when the group does not exist)."""
        if group not in self.h5:
            return np.zeros(len(self.image_ids), dtype=bool)
        return self.h5[group][schema.DONE][:]

    @_writes
    def write_rows(self, group: str, rows: np.ndarray, arrays: Mapping[str, np.ndarray],
                   *, mark: bool = True) -> None:
        """Write ``arrays[name][j]`` to row ``rows[j]``; then, with ``mark``, mark them done.

        Rows absent from ``arrays`` (images that did not load) keep the zero fill value;
        pass them in ``rows`` with empty ``arrays`` to just mark them done. With ``mark``
        the data is flushed before the flags are set, so a flag on disk always means the
        row's data is on disk too; callers that also write statuses pass ``mark=False``
        and call :meth:`mark_done` after flushing those.

        Args:
            group: Group name.
            rows: Row indices, shape (B,).
            arrays: Dataset name -> array of shape (B, ...) matching the schema.
            mark: Flush, then set the rows' done flags.
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
        if mark:
            self.h5.flush()
            self.mark_done(group, rows)

    @_writes
    def mark_done(self, group: str, rows: np.ndarray) -> None:
        """Set the done flags of ``rows`` (after their data was flushed) and flush them."""
        srows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(srows):
            self.h5[group][schema.DONE][srows.tolist()] = True
            self.h5.flush()

    # -- clip_text ------------------------------------------------------------------------

    def text_keys(self) -> list[str]:
        """Sentence keys of clip_text in row order (empty when absent)."""
        if "clip_text" not in self.h5:
            return []
        return [s.decode() if isinstance(s, bytes) else s
                for s in self.h5["clip_text"][schema.TEXT_KEYS][:]]

    @_writes
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

    @_writes
    def grow_entities(self, emax: int) -> None:
        """Widen clip_text/entities to at least ``emax`` entity slots."""
        ds = self.h5["clip_text"]["entities"]
        if ds.shape[1] < emax:
            ds.resize(emax, axis=1)

    # -- lifecycle ------------------------------------------------------------------------

    @_writes
    def flush(self) -> None:
        """Push written rows and flags to disk (called once per batch)."""
        self.h5.flush()

    def close(self) -> None:
        """Close the partial file, keeping it for a later resume.

        After a failed write the close itself may fail again (the same full disk); the
        partial is then left as it is, and the next run verifies it before any reuse.
        """
        if self.h5.id.valid:
            try:
                self.h5.close()
            except integrity.H5_ERRORS:
                if not self.failed:
                    raise

    def commit(self) -> Path:
        """Verify the partial file, record its checksums and rename it to the final path.

        The file is closed and reopened, every dataset is read back and hashed, the
        checksums are stored in the root attribute ``checksums`` (``mner inspect
        --verify`` compares against them), the file is fsynced and then atomically
        renamed (``os.replace``), and the folder entry is fsynced too.

        Raises:
            CacheError: A dataset cannot be read back, or the folder cannot be written;
                the partial file is kept and nothing is renamed.
        """
        part = self.part
        try:
            self.h5.flush()
            self.h5.close()
            self.h5 = h5py.File(part, "a", rdcc_nbytes=0)
            sums = integrity.checksums(self.h5)
            self.h5.attrs[integrity.CHECKSUMS_ATTR] = json.dumps(sums, sort_keys=True)
            self.h5.close()
            with part.open("rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(part, self.out)
            _fsync_dir(self.out.parent)
        except CacheError:
            raise
        except integrity.H5_ERRORS as exc:
            self.fail()
            raise self.write_error(exc) from None
        return self.out

    @staticmethod
    def _grow(group: h5py.Group, rows: int) -> None:
        for ds in group.values():
            if isinstance(ds, h5py.Dataset) and ds.shape[0] < rows:
                ds.resize(rows, axis=0)


def _detach(h5: h5py.File) -> None:
    """Point an open file's descriptor at ``/dev/null`` (see :meth:`CacheWriter.fail`)."""
    try:
        if not h5.id.valid:
            return
        fd = h5.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except (OSError, TypeError, ValueError, RuntimeError):
        pass


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    # One row per chunk for per-row tensors (readers fetch single images); 1-D columns in
    # blocks, since a 1-element chunk per image would cost more metadata than data.
    if len(shape) == 1:
        return (1024,)
    return (1,) + tuple(max(1, n) for n in shape[1:])


def _fit(arr: np.ndarray, ds: h5py.Dataset) -> np.ndarray:
    """Zero-pad ``arr`` along axis 1 to the dataset's width (clip_text entity slots)."""
    out = np.zeros((arr.shape[0],) + ds.shape[1:], dtype=ds.dtype)
    if ds.dtype.kind == "O":  # string slots pad with "", as the fill value reads
        out[...] = ""
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
