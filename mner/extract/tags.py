"""Object tags (``tags``): the label names the detector found, read from ``objects``.

ITA (Wang et al., "ITA: Image-Text Alignments for Multi-Modal Named Entity Recognition",
NAACL 2022) feeds the detector's object labels to the text encoder as words. Here they
are derived from the ``objects`` rows already in the cache, so no vision model runs
again: for each image the labels of the valid detections scoring at least
``tags_threshold`` are taken in descending score order, and each label name is kept
once, at its best score ("person dog" rather than "person person dog"). Images that did
not load have no objects and get no tags.

Listing ``tags`` adds ``objects`` to the run (:class:`mner.extract.config.ExtractConfig`),
so the objects are extracted first when the cache lacks them; the tags then follow the
objects' detector, score threshold and ``max_objects``, recorded in the group attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mner.extract.config import ExtractConfig


def derive_tags(labels: np.ndarray, scores: np.ndarray, count: np.ndarray,
                class_names: Sequence[str], threshold: float) -> dict[str, np.ndarray]:
    """Tags of a batch of images from their stored detections.

    Args:
        labels: (B, O) int class indices into ``class_names``.
        scores: (B, O) detection scores (descending within the valid ones).
        count: (B,) valid detections per image.
        class_names: Name of each class index.
        threshold: Minimum score of a tag.

    Returns:
        ``{"names": (B, O) object array of str ("" padding), "scores": (B, O) float32,
        "count": (B,) int32}``: distinct names, best score first (ties keep detection
        order).
    """
    b, o = labels.shape
    names = np.full((b, o), "", dtype=object)
    best = np.zeros((b, o), np.float32)
    n_out = np.zeros(b, np.int32)
    for i in range(b):
        n = int(count[i])
        order = np.argsort(-scores[i, :n], kind="stable")  # already sorted; keep it robust
        seen: dict[str, float] = {}
        for j in order:
            s = float(scores[i, j])
            if s < threshold:
                continue
            lab = int(labels[i, j])
            name = class_names[lab] if 0 <= lab < len(class_names) else f"class_{lab}"
            if name and name not in ("N/A", "__background__") and name not in seen:
                seen[name] = s
        for k, (name, s) in enumerate(seen.items()):
            names[i, k], best[i, k] = name, s
        n_out[i] = len(seen)
    return {"names": names, "scores": best, "count": n_out}


def tags_attrs(cfg: ExtractConfig, objects_attrs: dict[str, Any]) -> dict[str, Any]:
    """Group attributes of ``tags``: derived from ``objects`` (named with its model)."""
    return {"model": "mner.extract.tags.derive_tags", "weights": {"source": "none"},
            "preprocessing": {"from": "objects", "objects_model": objects_attrs.get("model"),
                              "threshold": cfg.tag_threshold, "distinct": True,
                              "order": "best score first"},
            "dims": {"O": cfg.max_objects}}


def write_tags(cfg: ExtractConfig, writer: Any, rows: Sequence[int], block: int = 1024) -> int:
    """Derive and write the ``tags`` rows not done yet among ``rows``, from stored objects.

    Runs after the images pass, so every requested row's objects are on disk; a row whose
    objects are not done is left not done (a later run derives it). Each block is written,
    flushed and then marked done, like the image groups.

    Args:
        cfg: ``tag_threshold``.
        writer: The open :class:`mner.cache.writer.CacheWriter` (``objects`` and ``tags``
            groups created).
        rows: Cache rows wanted.
        block: Rows read and written at once.

    Returns:
        Rows derived.
    """
    from mner.cache.writer import decode_attr

    done_tags, done_obj = writer.done("tags"), writer.done("objects")
    todo = sorted({int(r) for r in rows if not done_tags[r] and done_obj[r]})
    objects = writer.h5["objects"]
    names = decode_attr("class_names", objects.attrs.get("class_names")) or []
    for i in range(0, len(todo), block):
        idx = todo[i: i + block]
        arrays = {k: objects[k][idx] for k in ("labels", "scores", "count")}
        tags = derive_tags(arrays["labels"], arrays["scores"], arrays["count"], names, cfg.tag_threshold)
        writer.write_rows("tags", np.array(idx, dtype=np.int64), tags)
    return len(todo)
