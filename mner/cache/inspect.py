"""``mner inspect``: what a cache holds, and checksums to compare two caches.

The content checksum of a dataset is the sha256 of its raw bytes in C order (read in
row blocks), so two caches with equal checksums hold identical tensors whatever their
HDF5 chunking or creation time.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mner.cache import schema
from mner.cache.reader import FeatureCache

#: Rows hashed per read (keeps memory flat on large caches).
BLOCK_ROWS = 1024


def checksum(ds: h5py.Dataset) -> str:
    """sha256 of a dataset's values (strings as UTF-8, one per line)."""
    h = hashlib.sha256()
    for i in range(0, max(ds.shape[0], 1) if ds.ndim else 1, BLOCK_ROWS):
        block = ds[i: i + BLOCK_ROWS] if ds.ndim else ds[()]
        if ds.dtype.kind == "O":
            for s in np.atleast_1d(block):
                h.update((s.decode() if isinstance(s, bytes) else str(s)).encode() + b"\n")
        else:
            h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def summary(path: str | Path) -> dict[str, Any]:
    """Everything ``mner inspect`` shows, as a JSON-friendly dict.

    Returns:
        ``{"path", "schema_version", "provenance", "images", "status": {status: count},
        "sentences", "datasets": {name: {"shape", "dtype", "sha256", "done"?}}}``.
    """
    cache = FeatureCache(path)
    h5 = cache.h5
    prov = cache.provenance
    datasets: dict[str, Any] = {}
    for name in ("image_ids", "status"):
        datasets[name] = {"shape": list(h5[name].shape), "dtype": "str", "sha256": checksum(h5[name])}
    for g in schema.GROUPS:
        if g not in h5:
            continue
        done = h5[g][schema.DONE][:]
        for s in schema.GROUPS[g]:
            ds = h5[g][s.name]
            datasets[f"{g}/{s.name}"] = {"shape": list(ds.shape), "dtype": str(ds.dtype),
                                         "sha256": checksum(ds),
                                         "done": f"{int(done.sum())}/{len(done)}"}
        if g == "clip_text":
            ds = h5[g][schema.TEXT_KEYS]
            datasets[f"{g}/{schema.TEXT_KEYS}"] = {"shape": list(ds.shape), "dtype": "str",
                                                   "sha256": checksum(ds)}
    return {"path": str(path), "schema_version": prov.get("schema_version"),
            "provenance": prov, "images": len(cache.image_ids),
            "status": dict(Counter(cache.status_of(cache.image_ids))),
            "sentences": int(h5["clip_text"][schema.TEXT_KEYS].shape[0]) if "clip_text" in h5 else 0,
            "datasets": datasets}


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
