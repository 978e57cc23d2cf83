"""Reading the HDF5 feature cache (``FeatureCache``), aligned with dataset image ids.

The h5py handle is opened lazily and kept per process id: a DataLoader worker forked
after the parent touched the cache opens its own handle instead of sharing the parent's
(HDF5 handles are not fork-safe).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mner.cache import integrity, schema
from mner.cache.writer import decode_attr
from mner.errors import CacheError


class FeatureCache:
    """Read access to one cache file.

    Args:
        path: The ``.h5`` file written by ``mner extract``.

    Raises:
        CacheError: If the file is missing, not HDF5, or of another schema version.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            part = self.path.with_name(self.path.name + ".partial")
            hint = (f" ({part.name} exists: the extraction did not finish; re-run mner extract "
                    "to resume)") if part.exists() else " (run mner extract first)"
            raise CacheError(f"{self.path}: no such cache{hint}")
        self._handles: dict[int, h5py.File] = {}
        try:
            version = self.h5.attrs.get("schema_version")
        except integrity.H5_ERRORS as exc:
            raise integrity.unreadable(self.path, integrity.reason(exc)) from None
        if version != schema.SCHEMA_VERSION:
            raise CacheError(
                f"{self.path}: cache schema version {version}, this mner reads "
                f"{schema.SCHEMA_VERSION}; re-run mner extract --overwrite"
            )
        try:
            ids = [s.decode() if isinstance(s, bytes) else s for s in self.h5["image_ids"][:]]
            status = [s.decode() if isinstance(s, bytes) else s for s in self.h5["status"][:]]
        except integrity.H5_ERRORS as exc:
            raise integrity.unreadable(self.path, integrity.reason(exc)) from None
        self.image_ids: list[str] = ids
        self._row = {k: i for i, k in enumerate(ids)}
        self._status = np.array(status, dtype=object)
        self._text_row: dict[str, int] | None = None
        self._strings: dict[str, list[list[str]]] = {}

    @property
    def h5(self) -> h5py.File:
        """The h5py handle of the current process (opened on first use)."""
        pid = os.getpid()
        h = self._handles.get(pid)
        if h is None or not h.id.valid:
            # Handles inherited from a parent process are dropped, never closed: closing
            # them here would close the parent's file descriptor state as well.
            self._handles = {pid: integrity.open_h5(self.path)}
            h = self._handles[pid]
        return h

    def close(self) -> None:
        """Close this process's handle (reopened on next use)."""
        h = self._handles.pop(os.getpid(), None)
        if h is not None and h.id.valid:
            h.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    # -- metadata -------------------------------------------------------------------------

    @property
    def provenance(self) -> dict[str, Any]:
        """Root attributes plus one entry per group with that group's attributes.

        ``provenance["profile"]``, ``provenance["resnet"]["model"]``, ... (JSON decoded).
        The checksums recorded at completion are integrity data, not provenance: see
        :attr:`checksums`.
        """
        out: dict[str, Any] = {k: decode_attr(k, v) for k, v in self.h5.attrs.items()
                               if k != integrity.CHECKSUMS_ATTR}
        for g in schema.GROUPS:
            if g in self.h5:
                out[g] = {k: decode_attr(k, v) for k, v in self.h5[g].attrs.items()}
        return out

    @property
    def checksums(self) -> dict[str, str] | None:
        """``{"group/dataset": sha256}`` recorded at completion (None for older caches)."""
        return integrity.recorded_checksums(self.h5)

    @property
    def datasets(self) -> set[str]:
        """``"group/dataset"`` names present (done flags and keys excluded)."""
        return {f"{g}/{s.name}" for g, specs in schema.GROUPS.items() if g in self.h5
                for s in specs if s.name in self.h5[g]}

    def dims(self, name: str) -> int:
        """Last dimension of dataset ``name``.

        Raises:
            CacheError: If the dataset is absent.
        """
        self.require([name])
        return int(self.h5[name].shape[-1])

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of dataset ``name``."""
        self.require([name])
        return tuple(self.h5[name].shape)

    def require(self, names: Iterable[str], expect: Mapping[str, Any] | None = None) -> None:
        """Check the cache has ``names`` and was made with the settings in ``expect``.

        Args:
            names: ``"group/dataset"`` names a model needs.
            expect: Settings to compare: root attribute names (``"profile"``) or
                ``"group.attr"`` (``"clip.model"``); values compared after JSON decoding.

        Raises:
            CacheError: One line naming the first missing dataset or differing setting.
        """
        present = self.datasets
        missing = [n for n in names if n not in present]
        if missing:
            groups = sorted({n.split("/")[0] for n in missing})
            raise CacheError(
                f"{self.path}: lacks {', '.join(missing)}; re-run mner extract with "
                f"--features {','.join(groups)} (and the same --out) to add them"
            )
        prov = self.provenance
        for key, want in (expect or {}).items():
            node: Any = prov
            for part in key.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            if node != want:
                raise CacheError(
                    f"{self.path} was made with {key} {node}, the run asks for {want}; "
                    "re-extract with matching settings or change the run's settings"
                )

    def has_feature(self, name: str) -> bool:
        """Whether the cache holds feature group ``name`` (``"ocr"``) or dataset ``name``
        (``"ocr/text"``)."""
        if "/" in name:
            return name in self.datasets
        return name in schema.GROUPS and name in self.h5

    # -- rows -----------------------------------------------------------------------------

    def status_of(self, image_ids: Sequence[str]) -> list[str]:
        """Load status per id (``"missing"`` for ids not in the cache)."""
        return [str(self._status[self._row[i]]) if i in self._row else "missing"
                for i in image_ids]

    def status(self, image_id: str) -> str:
        """Load status of one image: ``ok``, ``missing``, ``truncated``, ... (see
        :class:`mner.data.images.ImageStatus`); ``missing`` for an id not in the cache."""
        return self.status_of([image_id])[0]

    # -- text read from images ----------------------------------------------------------------

    def strings(self, feature: str, image_id: str) -> list[str]:
        """The text a string feature holds for one image.

        Args:
            feature: ``tags`` (distinct object label names, best score first), ``ocr``
                (recognised strings in reading order: lines top to bottom, left to right
                within a line) or ``caption`` (``[caption]``).
            image_id: The image.

        Returns:
            The strings; ``[]`` when the image holds none, did not load (its
            :meth:`status` is not ``ok``) or is not in the cache.

        Raises:
            CacheError: One line with the remedy when the cache lacks ``feature``.
            ValueError: ``feature`` is not a string feature.
        """
        return self.strings_of(feature, [image_id])[0]

    def strings_of(self, feature: str, image_ids: Sequence[str]) -> list[list[str]]:
        """:meth:`strings` for many images (one list per id, in order)."""
        rows = self._string_rows(feature)
        return [list(rows[self._row[i]]) if i in self._row else [] for i in image_ids]

    def ocr_boxes(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and confidences of the OCR strings of one image (same order as
        ``strings("ocr", image_id)``).

        Returns:
            ``(boxes, scores)``: (L, 4, 2) float32 quadrilaterals, four ``(x, y)`` corners
            in pixels of the original image (clockwise from the top-left, as the detector
            returns them), and (L,) float32 recognition confidences in [0, 1]; L = 0 for
            an image without text, that did not load or is not in the cache.

        Raises:
            CacheError: The cache has no ``ocr`` feature.
        """
        self.require(["ocr/boxes", "ocr/scores", "ocr/count"])
        r = self._row.get(image_id, -1)
        if r < 0 or self._status[r] != "ok":
            return np.zeros((0, 4, 2), np.float32), np.zeros((0,), np.float32)
        g = self.h5["ocr"]
        n = int(_read_rows(g["count"], np.array([r]))[0])
        boxes = _read_rows(g["boxes"], np.array([r]))[0, :n]
        scores = _read_rows(g["scores"], np.array([r]))[0, :n]
        return boxes.astype(np.float32), scores.astype(np.float32)

    def _string_rows(self, feature: str) -> list[list[str]]:
        """Every row of a string feature, read once per reader (these columns are small)."""
        if feature not in schema.STRING_GROUPS:
            raise ValueError(f"unknown string feature {feature!r}; choose from "
                             f"{', '.join(schema.STRING_GROUPS)}")
        if feature not in self._strings:
            name = f"{feature}/{schema.STRING_DATASETS[feature]}"
            counted = f"{feature}/count" in {f"{feature}/{s.name}" for s in schema.GROUPS[feature]}
            self.require([name] + ([f"{feature}/count"] if counted else []))
            n = len(self.image_ids)
            ds = self.h5[name]
            text = _read_rows(ds, np.arange(n)) if n else np.zeros((0,) + ds.shape[1:], object)
            text = np.vectorize(_text, otypes=[object])(text) if text.size else text
            ok = self._status == "ok"
            if counted:
                count = _read_rows(self.h5[f"{feature}/count"], np.arange(n)) if n else []
                rows = [list(text[r, : int(count[r])]) if ok[r] else [] for r in range(n)]
            else:
                rows = [[text[r]] if ok[r] and text[r] else [] for r in range(n)]
            self._strings[feature] = rows
        return self._strings[feature]

    def load(self, names: Sequence[str], image_ids: Sequence[str]
             ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """Rows of ``names`` for ``image_ids`` (in that order, duplicates allowed).

        Args:
            names: ``"group/dataset"`` names (image groups only).
            image_ids: Ids to fetch, shape (B,).

        Returns:
            ``(arrays, image_ok, masks)``: ``arrays[name]`` has shape (B, ...) with zero
            rows for ids that are absent or whose image did not load; ``image_ok`` (B,)
            bool; ``masks[group]`` (B, O) bool for ``objects`` (valid detections) and
            (B, K) for ``crops``, when those groups are requested.
        """
        self.require(names)
        rows = np.array([self._row.get(i, -1) for i in image_ids], dtype=np.int64)
        ok = rows >= 0
        ok[ok] = self._status[rows[ok]] == "ok"
        take = rows[ok]
        # h5py wants increasing unique indices: read the unique sorted rows once, then
        # scatter them back to the requested order.
        uniq, inverse = np.unique(take, return_inverse=True)
        arrays: dict[str, np.ndarray] = {}
        for name in names:
            ds = self.h5[name]
            out = np.zeros((len(image_ids),) + ds.shape[1:], dtype=ds.dtype)
            if len(uniq):
                out[ok] = _read_rows(ds, uniq)[inverse]
            arrays[name] = out
        masks: dict[str, np.ndarray] = {}
        for group, count, width in (("objects", "objects/count", "objects/scores"),
                                    ("crops", "crops/count", "crops/boxes")):
            if any(n.startswith(group + "/") for n in names) or (
                    group == "objects" and any(n.startswith("relations/") for n in names)):
                if count not in self.datasets:
                    continue
                cnt = np.zeros(len(image_ids), dtype=np.int64)
                if len(uniq):
                    cnt[ok] = _read_rows(self.h5[count], uniq)[inverse]
                slots = self.h5[width].shape[1]
                masks[group] = np.arange(slots)[None, :] < cnt[:, None]
        return arrays, ok, masks

    def load_text(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """CLIP text-teacher rows for sentence keys (``Tweet.key``).

        Returns:
            ``{"sentence": (S, Dc), "entities": (S, E, Dc), "entity_count": (S,),
            "found": (S,) bool}``; unknown keys give zero rows and ``found`` False.

        Raises:
            CacheError: If the cache has no clip_text group.
        """
        self.require(["clip_text/sentence"])
        g = self.h5["clip_text"]
        if self._text_row is None:
            self._text_row = {(k.decode() if isinstance(k, bytes) else k): i
                              for i, k in enumerate(g[schema.TEXT_KEYS][:])}
        rows = np.array([self._text_row.get(k, -1) for k in keys], dtype=np.int64)
        found = rows >= 0
        uniq, inverse = np.unique(rows[found], return_inverse=True)
        out: dict[str, np.ndarray] = {}
        for name in ("sentence", "entities", "entity_count"):
            ds = g[name]
            arr = np.zeros((len(keys),) + ds.shape[1:], dtype=ds.dtype)
            if len(uniq):
                arr[found] = _read_rows(ds, uniq)[inverse]
            out[name] = arr
        out["found"] = found
        return out


def stored_root_attrs(out: str | Path) -> dict[str, Any]:
    """Root attributes of the cache a run on ``out`` would continue (JSON decoded).

    The partial file when there is one (a resume), else the final file (an extension);
    ``{}`` when neither exists or the file cannot be read (the writer then sets it aside
    or reports it).
    """
    out = Path(out)
    for f in (out.with_name(out.name + ".partial"), out):
        if f.exists():
            try:
                with integrity.open_h5(f) as h5:
                    return {k: decode_attr(k, v) for k, v in h5.attrs.items()}
            except (CacheError, *integrity.H5_ERRORS):
                return {}
    return {}


def holds_all(path: str | Path, *, profile: str, seed: int, groups: Sequence[str],
              image_ids: Sequence[str], text_keys: Sequence[str]) -> bool:
    """True when the complete cache ``path`` already holds every requested row.

    Args:
        path: A final cache file (need not exist).
        profile, seed: Settings the cache must have been made with.
        groups: Feature groups wanted.
        image_ids: Image ids wanted.
        text_keys: Sentence keys wanted (for ``clip_text``).
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        cache = FeatureCache(path)
        h5 = cache.h5
        try:
            if h5.attrs.get("profile") != profile or h5.attrs.get("seed") != seed:
                return False
            if not set(image_ids) <= set(cache.image_ids):
                return False
            for g in groups:
                if g == "clip_text":
                    if not text_keys:
                        continue
                    if g not in h5:
                        return False
                    have = {k.decode() if isinstance(k, bytes) else k for k in h5[g][schema.TEXT_KEYS][:]}
                    if not set(text_keys) <= have or not h5[g][schema.DONE][:].all():
                        return False
                elif g not in h5 or not h5[g][schema.DONE][:].all():
                    return False
            return True
        finally:
            cache.close()
    except (CacheError, *integrity.H5_ERRORS):
        return False


def statuses_of(path: str | Path) -> dict[str, str]:
    """``image id -> status`` of every row of the cache ``path``."""
    cache = FeatureCache(path)
    try:
        return dict(zip(cache.image_ids, cache.status_of(cache.image_ids), strict=True))
    finally:
        cache.close()


def _text(value: bytes | str) -> str:
    """A stored variable-length string as ``str`` (h5py returns UTF-8 bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read sorted unique ``rows``; a contiguous run is one slice (much faster in h5py).

    Raises:
        CacheError: A chunk cannot be read (damaged on disk: checksum or decode failure).
    """
    try:
        return _read(ds, rows)
    except integrity.H5_ERRORS as exc:
        raise CacheError(f"{ds.file.filename}: {ds.name.lstrip('/')} cannot be read "
                         f"({integrity.reason(exc)}): the file is damaged; check it with mner "
                         "inspect --verify and re-run mner extract --overwrite") from None


def _read(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    if rows[-1] - rows[0] + 1 == len(rows):
        return ds[int(rows[0]): int(rows[-1]) + 1]
    if len(rows) > ds.shape[0] // 4:
        # Dense selections: one full read beats h5py's per-row point selection.
        return ds[:][rows]
    return ds[rows.tolist()]
