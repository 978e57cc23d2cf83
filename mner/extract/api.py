"""Re-extracting features for new images the way a cache was made (``mner predict``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mner.cache import schema
from mner.config import build
from mner.devices import replay_precision, resolve_device
from mner.errors import CacheError
from mner.extract.base import recorded_precision
from mner.extract.config import ExtractConfig
from mner.extract.dataset import ImageItems, collate
from mner.extract.runner import build_extractors, run_batch


def config_from_provenance(provenance: Mapping[str, Any], groups: Sequence[str],
                           device: str = "cpu") -> ExtractConfig:
    """The ExtractConfig a cache was made with, restricted to ``groups``.

    The recorded precision is replayed on ``device`` by the one policy
    (:func:`mner.devices.replay_precision`): float16 off CUDA becomes float32 with a
    warning. Caches from before ``precision`` was recorded keep their old rule
    (:func:`mner.extract.base.recorded_precision`).

    Raises:
        CacheError: If the provenance lacks ``extract_config`` or a requested group.
    """
    stored = provenance.get("extract_config")
    if not isinstance(stored, Mapping):
        raise CacheError("cache provenance has no extract_config; re-run mner extract --overwrite")
    missing = [g for g in groups if g not in provenance]
    if missing:
        raise CacheError(f"the cache has no {', '.join(missing)} features; re-extract with "
                         f"--features {','.join(groups)}")
    fields = {k: v for k, v in stored.items() if k in ExtractConfig.__dataclass_fields__}
    dev = resolve_device(device)
    fields.update(features=list(groups), device=device, workers=0, overwrite=False,
                  precision=replay_precision(recorded_precision(dict(stored), dev), dev,
                                             where="the training cache"))
    return build(ExtractConfig, fields, where="cache provenance extract_config")


def extract_arrays(image_paths: Sequence[str | os.PathLike | None], provenance: Mapping[str, Any],
                   names: Sequence[str], device: str = "cpu"
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of new images, computed by the extractors recorded in a cache.

    Tiny caches rebuild the same seeded weights; paper caches load the same weights
    (library cache or the recorded ``weights_dir``). Rows are cast to the cache dtypes.

    Args:
        image_paths: One file per image (None = no image), length B.
        provenance: ``FeatureCache.provenance`` of the cache the model was trained on.
        names: ``"group/dataset"`` names wanted (image groups).
        device: ``cpu``, ``cuda`` or ``auto``.

    Returns:
        ``(arrays, image_ok)``: ``arrays[name]`` (B, ...) like the cache rows (zeros for
        images that did not load); ``image_ok`` (B,) bool.
    """
    groups = list(dict.fromkeys(n.split("/")[0] for n in names))
    bad = [g for g in groups if g not in schema.IMAGE_GROUPS]
    if bad:
        raise CacheError(f"extract_arrays: {', '.join(bad)} is not an image feature")
    cfg = config_from_provenance(provenance, groups, device)
    dev = resolve_device(device)
    ex = build_extractors(cfg, dev)
    transforms: dict[str, Any] = {g: ex[g].preprocess for g in ("resnet", "clip", "caption") if g in ex}
    if "detector" in ex:
        transforms["raw"] = ex["detector"].preprocess
    elif "ocr" in ex:
        transforms["raw"] = ex["ocr"].preprocess
    paths = [None if p is None else os.fspath(p) for p in image_paths]
    items = ImageItems(paths, list(range(len(paths))), transforms, cfg.max_pixels)
    arrays: dict[str, np.ndarray] = {}
    ok = np.zeros(len(paths), dtype=bool)
    results: dict[str, dict[str, list]] = {}
    for start in range(0, len(paths), cfg.batch_size):
        batch = collate([items[i] for i in range(start, min(len(paths), start + cfg.batch_size))])
        for p in batch["ok"]:
            ok[start + p] = True
        out = run_batch(ex, batch, {g: list(batch["ok"]) for g in groups})
        for g, d in out.items():
            for k, v in d.items():
                results.setdefault(f"{g}/{k}", []).append((start, batch["ok"], v))
    for name in names:
        s = schema.spec(name)
        g = name.split("/")[0]
        dims = _dims(provenance[g])
        shape = s.concrete_shape(len(paths), {**dims, "O": cfg.max_objects,
                                              "O1": cfg.max_objects + 1, "K": cfg.num_crops})
        arr = np.zeros(shape, dtype=s.dtype)
        if s.dtype.kind == "O":  # strings (tags, ocr, caption): "" like the cache's fill
            arr[...] = ""
        for start, pos, v in results.get(name, []):
            for j, p in enumerate(pos):
                arr[start + p] = v[j]
        arrays[name] = arr
    return arrays, ok


def _dims(attrs: Mapping[str, Any]) -> dict[str, int]:
    d = attrs.get("dims") or {}
    return {k: int(v) for k, v in d.items()}


