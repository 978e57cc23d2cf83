"""``mner inspect``: what a cache holds, and checksums to compare two caches.

The content checksum of a dataset (:func:`mner.cache.integrity.checksum`) is the sha256
of its values in C order, so two caches with equal checksums hold identical tensors
whatever their HDF5 chunking or creation time. ``--verify`` compares them with the
checksums recorded when the cache was completed (:func:`mner.cache.integrity.verify`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from mner.cache import integrity, schema
from mner.cache.integrity import BLOCK_ROWS, checksum, verify  # noqa: F401 - public here too
from mner.cache.reader import FeatureCache
from mner.errors import CacheError


def summary(path: str | Path) -> dict[str, Any]:
    """Everything ``mner inspect`` shows, as a JSON-friendly dict.

    Returns:
        ``{"path", "schema_version", "provenance", "images", "status": {status: count},
        "statuses": {non-ok status: [image id, ...]}, "sentences",
        "datasets": {name: {"shape", "dtype", "sha256", "done"?}}}``.

    Raises:
        CacheError: The file is missing, not a readable cache, or a dataset cannot be read.
    """
    cache = FeatureCache(path)
    try:
        return _summary(cache, path)
    except CacheError:
        raise
    except integrity.H5_ERRORS as exc:
        raise CacheError(f"{path}: cannot be read ({integrity.reason(exc)}); check it with mner "
                         "inspect --verify and re-run mner extract --overwrite") from None


def _summary(cache: FeatureCache, path: str | Path) -> dict[str, Any]:
    h5 = cache.h5
    prov = cache.provenance
    datasets: dict[str, Any] = {}
    for name in ("image_ids", "status"):
        datasets[name] = {"shape": list(h5[name].shape), "dtype": "str", "sha256": _checksum(name, h5[name])}
    for g in schema.GROUPS:
        if g not in h5:
            continue
        done = h5[g][schema.DONE][:]
        for s in schema.GROUPS[g]:
            ds = h5[g][s.name]
            datasets[f"{g}/{s.name}"] = {"shape": list(ds.shape),
                                         "dtype": "str" if ds.dtype.kind == "O" else str(ds.dtype),
                                         "sha256": _checksum(f"{g}/{s.name}", ds),
                                         "done": f"{int(done.sum())}/{len(done)}"}
        if g == "clip_text":
            ds = h5[g][schema.TEXT_KEYS]
            datasets[f"{g}/{schema.TEXT_KEYS}"] = {"shape": list(ds.shape), "dtype": "str",
                                                   "sha256": _checksum(f"{g}/{schema.TEXT_KEYS}", ds)}
    return {"path": str(path), "schema_version": prov.get("schema_version"),
            "provenance": prov, "images": len(cache.image_ids),
            "status": dict(Counter(cache.status_of(cache.image_ids))),
            "statuses": statuses(cache),
            "sentences": int(h5["clip_text"][schema.TEXT_KEYS].shape[0]) if "clip_text" in h5 else 0,
            "datasets": datasets}


def _checksum(name: str, ds: Any) -> str:
    try:
        return checksum(ds)
    except integrity.H5_ERRORS as exc:
        raise CacheError(f"{ds.file.filename}: {name} cannot be read ({integrity.reason(exc)}); "
                         "check it with mner inspect --verify and re-run mner extract --overwrite") from None


def statuses(cache: FeatureCache) -> dict[str, list[str]]:
    """Image ids per non-ok status, in row order: ``{"truncated": ["17_06_4", ...], ...}``."""
    out: dict[str, list[str]] = {}
    for i, s in zip(cache.image_ids, cache.status_of(cache.image_ids), strict=True):
        if s != "ok":
            out.setdefault(s, []).append(i)
    return dict(sorted(out.items()))


def format_statuses(info: dict[str, Any]) -> str:
    """One line per non-ok status listing its image ids (``--statuses``)."""
    if not info["statuses"]:
        return "every image is ok"
    return "\n".join(f"{s} ({len(ids)}): {' '.join(ids)}" for s, ids in info["statuses"].items())


def format_summary(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`summary`."""
    prov = info["provenance"]
    lines = [f"{info['path']}: schema {info['schema_version']}, mner {prov.get('mner_version')}, "
             f"profile {prov.get('profile')} (seed {prov.get('seed')}), created {prov.get('created')}",
             f"images: {info['images']} ("
             + ", ".join(f"{k} {v}" for k, v in sorted(info["status"].items())) + ")",
             f"sentences: {info['sentences']}"]
    libs = prov.get("library_versions") or {}
    if libs:
        lines.append("libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(libs.items())))
    for g in schema.GROUPS:
        if g not in prov:
            continue
        a = prov[g]
        w = a.get("weights") or {}
        src = w.get("source", "?") + (f" {w['name']}" if w.get("name") else "")
        if w.get("sha256"):
            src += f" sha256 {w['sha256'][:12]}"
        lines.append(f"[{g}] model {a.get('model')}; weights {src}; dims {json.dumps(a.get('dims'))}")
    width = max(len(n) for n in info["datasets"])
    for name, d in info["datasets"].items():
        shape = "x".join(str(n) for n in d["shape"])
        done = f"  done {d['done']}" if "done" in d else ""
        lines.append(f"  {name:<{width}}  {shape:<16} {d['dtype']:<8} {d['sha256'][:16]}{done}")
    return "\n".join(lines)
