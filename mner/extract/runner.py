"""``run_extract``: the batched, resumable extraction run behind ``mner extract``.

Order of work:

1. List the images: with ``data``, exactly the ids the tweets reference (first
   appearance order, missing files included); without, every image file in the folder
   (sorted by name; the id is the file stem).
2. Build every extractor. Weights are resolved first, so an offline machine without
   local weights stops here, before any image is read or any file written.
3. Open ``OUT.partial`` (resume / extend / overwrite, see :class:`CacheWriter`), add new
   images, create or check the feature groups.
4. Rows with any requested group not done are decoded and preprocessed in DataLoader
   workers and run through the models batch by batch; each batch's rows, statuses and
   ``done`` flags are flushed together. Pending rows keep their original order and are
   cut into batches from the first pending row, so a resumed run forms the same batches
   as an uninterrupted one and writes byte-identical tensors.
5. CLIP text embeddings of the sentences and gold entities (with ``data``).
6. Rename ``OUT.partial`` to ``OUT``; print one line per image that did not load.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

import mner
from mner.cache import schema
from mner.cache.writer import CacheWriter
from mner.data.conll import Tweet, read_conll
from mner.data.images import find_image
from mner.data.schemes import entities
from mner.devices import resolve_device
from mner.errors import CacheError, DataError
from mner.extract.base import recorded_precision, resolve_precision
from mner.extract.config import ExtractConfig
from mner.extract.dataset import ImageItems, collate
from mner.extract.relations import RELATION_NAMES, relation_matrix

#: Files treated as images when no CoNLL data is given.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

#: Test hook: raise after this many flushed batches (simulates a killed run).
FAIL_AFTER_ENV = "MNER_EXTRACT_FAIL_AFTER"

#: Sentences per clip_text batch.
TEXT_BATCH = 64


def build_extractors(cfg: ExtractConfig, device: torch.device) -> dict[str, Any]:
    """Every extractor ``cfg.features`` needs, keyed by group (``"detector"`` for objects).

    Raises:
        WeightsError: Before loading anything heavy when a model's weights are unavailable.
    """
    from mner.extract.clip import ClipBackbone, ClipExtractor, ClipTextExtractor
    from mner.extract.crops import CropExtractor
    from mner.extract.objects import build_detector
    from mner.extract.resnet import ResNetExtractor

    feats = set(cfg.features)
    out: dict[str, Any] = {}
    if "resnet" in feats:
        out["resnet"] = ResNetExtractor(cfg, device)
    if feats & {"clip", "clip_text", "crops"}:
        bb = ClipBackbone(cfg, device)
        if "clip" in feats:
            out["clip"] = ClipExtractor(cfg, device, bb)
        if "clip_text" in feats:
            out["clip_text"] = ClipTextExtractor(cfg, device, bb)
    if cfg.needs_detector:
        out["detector"] = build_detector(cfg, device)
    if "crops" in feats:
        out["crops"] = CropExtractor(cfg, device, bb)
    return out


def relations_attrs(cfg: ExtractConfig, detector: Any) -> dict[str, Any]:
    """Group attributes of ``relations`` (derived from the detector's boxes)."""
    return {"model": "mner.extract.relations.relation_matrix", "weights": {"source": "none"},
            "preprocessing": {"boxes": detector.arch, "nodes": "[IMG] + objects",
                              "max_objects": cfg.max_objects},
            "dims": {"O1": cfg.max_objects + 1}, "relation_names": list(RELATION_NAMES)}


def group_specs(cfg: ExtractConfig, ex: dict[str, Any]) -> dict[str, tuple[dict, dict]]:
    """``group -> (attrs, dims)`` for every requested image group."""
    out: dict[str, tuple[dict, dict]] = {}
    for g in cfg.features:
        if g in ("resnet", "clip", "crops"):
            out[g] = (ex[g].attrs(), ex[g].dims())
        elif g == "objects":
            out[g] = (ex["detector"].attrs(), ex["detector"].dims())
        elif g == "relations":
            out[g] = (relations_attrs(cfg, ex["detector"]), {"O1": cfg.max_objects + 1})
    return out


def run_batch(ex: dict[str, Any], batch: dict[str, Any], need: dict[str, list[int]]
              ) -> dict[str, dict[str, np.ndarray]]:
    """Run the models on one collated batch.

    Args:
        ex: Extractors from :func:`build_extractors`.
        batch: Output of :func:`mner.extract.dataset.collate`.
        need: Group -> positions (indices into the batch, all loaded images) to compute.

    Returns:
        Group -> dataset -> array with one row per position in ``need[group]``, in order.
    """
    ok_index = {p: j for j, p in enumerate(batch["ok"])}
    out: dict[str, dict[str, np.ndarray]] = {}
    for g in ("resnet", "clip"):
        if need.get(g):
            sel = [ok_index[p] for p in need[g]]
            out[g] = ex[g](batch[g][sel])
    det_pos = sorted({p for g in ("objects", "relations", "crops") for p in need.get(g, [])})
    if det_pos:
        raw = [batch["raw"][ok_index[p]] for p in det_pos]
        det = ex["detector"](raw)
        at = {p: j for j, p in enumerate(det_pos)}
        if need.get("objects"):
            idx = [at[p] for p in need["objects"]]
            out["objects"] = {k: v[idx] for k, v in det.items()}
        if need.get("relations"):
            o = ex["detector"].cfg.max_objects
            mats = [relation_matrix(det["boxes"][at[p]], int(det["count"][at[p]]),
                                    tuple(batch["size"][p]), o) for p in need["relations"]]
            out["relations"] = {"labels": np.stack(mats)}
        if need.get("crops"):
            idx = [at[p] for p in need["crops"]]
            out["crops"] = ex["crops"]([raw[i] for i in idx], det["boxes"][idx], det["count"][idx])
    return out


def list_images(images: Path, tweets: Sequence[Tweet] | None) -> tuple[list[str], list[Path | None]]:
    """Image ids to extract and their files (None when an id has no file)."""
    if tweets is not None:
        ids = list(dict.fromkeys(t.image_id for t in tweets))
        return ids, [find_image(images, i) for i in ids]
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems = Counter(p.stem for p in files)
    dup = [s for s, n in stems.items() if n > 1]
    if dup:
        raise DataError(f"{images}: several files share the id {dup[0]!r} "
                        f"({', '.join(p.name for p in files if p.stem == dup[0])}); keep one")
    return [p.stem for p in files], list(files)


def library_versions() -> dict[str, str]:
    """Versions of the libraries the features depend on (recorded in the cache)."""
    import open_clip
    import PIL
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def _check_root(writer: CacheWriter, cfg: ExtractConfig, precision: str, device: torch.device) -> None:
    root = writer.root_attrs
    if not root:
        return
    had = recorded_precision(dict(root.get("extract_config") or {}), device)
    if had != precision:
        # Rows computed in two precisions would differ by more than rounding.
        raise CacheError(f"{writer.out} was made with precision {had}, this run resolves to "
                         f"{precision}; pass -o precision={had}, or --overwrite")
    if root.get("schema_version") != schema.SCHEMA_VERSION:
        raise CacheError(f"{writer.out}: schema version {root.get('schema_version')}, this mner "
                         f"writes {schema.SCHEMA_VERSION}; pass --overwrite")
    for key, want in (("profile", cfg.profile), ("seed", cfg.seed)):
        if root.get(key) != want:
            raise CacheError(f"{writer.out} was made with {key} {root.get(key)}, this run asks for "
                             f"{want}; pass --overwrite or choose another --out")


def _already_complete(out: Path, cfg: ExtractConfig, ids: list[str], keys: list[str]) -> bool:
    """True when ``out`` already holds every requested row (nothing to compute or copy)."""
    if cfg.overwrite or not out.exists() or not h5py.is_hdf5(out):
        return False
    try:
        with h5py.File(out, "r") as h5:
            if h5.attrs.get("profile") != cfg.profile or h5.attrs.get("seed") != cfg.seed:
                return False
            have = {s.decode() if isinstance(s, bytes) else s for s in h5["image_ids"][:]}
            if not set(ids) <= have:
                return False
            for g in cfg.features:
                if g == "clip_text":
                    if not keys:
                        continue
                    if g not in h5:
                        return False
                    tk = {s.decode() if isinstance(s, bytes) else s for s in h5[g][schema.TEXT_KEYS][:]}
                    if not set(keys) <= tk or not h5[g][schema.DONE][:].all():
                        return False
                elif g not in h5 or not h5[g][schema.DONE][:].all():
                    return False
    except (OSError, KeyError):
        return False
    return True


def run_extract(cfg: ExtractConfig, images: str | os.PathLike, data: Sequence[str | os.PathLike] | None = None,
                out: str | os.PathLike = "cache/features.h5", *, progress: bool = True) -> dict[str, Any]:
    """Extract the requested features of a folder of images into an HDF5 cache.

    Args:
        cfg: Extraction settings.
        images: Folder of ``<id>.jpg`` / ``.png`` files.
        data: CoNLL files; when given, exactly their images are extracted (missing ones
            recorded as ``missing``) plus CLIP text embeddings of their sentences.
        out: The cache file (written as ``out.partial`` and renamed when complete).
        progress: Show a progress bar (images/s).

    Returns:
        Summary: ``out``, ``images`` (rows in the cache), ``computed`` (rows computed by
        this run), ``status`` (counts over the requested ids), ``bad`` (list of
        ``(id, status, message)`` met by this run), ``sentences``, ``seconds``.

    Raises:
        DataError: Missing images folder or CoNLL file.
        WeightsError: Weights unavailable (before any work).
        CacheError: An existing cache made with other settings (without ``overwrite``).
    """
    if cfg.threads is None:
        return _run_extract(cfg, images, data, out, progress)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_extract(cfg, images, data, out, progress)
    finally:
        torch.set_num_threads(before)


def _run_extract(cfg: ExtractConfig, images: str | os.PathLike,
                 data: Sequence[str | os.PathLike] | None, out: str | os.PathLike,
                 progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"{images}: no such images folder; pass --images DIR")
    tweets: list[Tweet] | None = None
    if data:
        tweets = []
        for f in data:
            if not Path(f).is_file():
                raise DataError(f"{f}: no such CoNLL file; check --data")
            tweets.extend(read_conll(f))
    ids, paths = list_images(images, tweets)
    text = _text_rows(tweets) if tweets is not None and "clip_text" in cfg.features else {}
    if _already_complete(out, cfg, ids, list(text)):
        with h5py.File(out, "r") as h5:
            st = dict(zip((s.decode() if isinstance(s, bytes) else s for s in h5["image_ids"][:]),
                          (s.decode() if isinstance(s, bytes) else s for s in h5["status"][:]),
                          strict=True))
        return {"out": str(out), "images": len(st), "computed": 0,
                "status": dict(Counter(st[i] for i in ids)), "bad": [], "sentences": len(text),
                "seconds": time.perf_counter() - t0}

    device = resolve_device(cfg.device)
    ex = build_extractors(cfg, device)  # WeightsError here, before any file is touched
    specs = group_specs(cfg, ex)

    writer = CacheWriter.open(out, overwrite=cfg.overwrite)
    try:
        precision = resolve_precision(cfg.precision, device)
        _check_root(writer, cfg, precision, device)
        from mner.config import to_dict

        created = writer.root_attrs.get("created") or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        writer.set_root_attrs({
            "schema_version": schema.SCHEMA_VERSION, "mner_version": mner.__version__,
            "profile": cfg.profile, "seed": cfg.seed, "created": created,
            "library_versions": library_versions(),
            "extract_config": {**{k: v for k, v in to_dict(cfg).items()
                                  if k not in ("overwrite", "workers", "device", "batch_size", "threads")},
                               "precision": precision},
        })
        initial = ["missing" if p is None else "pending" for p in paths]
        rows = writer.add_images(ids, initial)
        n = len(writer.image_ids)
        for g, (attrs, dims) in specs.items():
            writer.ensure_group(g, attrs, dims, n)
        done = {g: writer.done(g) for g in specs}
        order = list(dict.fromkeys(int(r) for r in rows))
        pending = [r for r in order if not all(done[g][r] for g in specs)]
        row_path = dict(zip((int(r) for r in rows), paths, strict=True))
        bad, computed = _run_images(cfg, ex, writer, specs, done, pending, row_path, device, progress)
        sentences = _run_text(cfg, ex, writer, text) if text else 0
        writer.commit()
    except BaseException:
        writer.close()
        raise
    for rid, status, message in bad:
        print(f"image {rid}: {status} ({message})", file=sys.stderr)
    with h5py.File(out, "r") as h5:
        st = [s.decode() if isinstance(s, bytes) else s for s in h5["status"][:]]
        all_ids = [s.decode() if isinstance(s, bytes) else s for s in h5["image_ids"][:]]
    status_of = dict(zip(all_ids, st, strict=True))
    return {"out": str(out), "images": len(all_ids), "computed": computed,
            "status": dict(Counter(status_of[i] for i in ids)), "bad": bad,
            "sentences": sentences, "seconds": time.perf_counter() - t0}


def default_workers(device: torch.device) -> int:
    """DataLoader workers when ``cfg.workers`` is None.

    CUDA: 4, so decoding overlaps inference. CPU: the model's intra-op threads already
    use every core, and each worker takes one away from them (and adds a copy through
    shared memory), so 0 (decode between batches) up to 2 cores, then 1 per extra core,
    at most 2.
    """
    if device.type == "cuda":
        return 4
    return max(0, min(2, (os.cpu_count() or 1) - 2))


def _worker_init(_: int) -> None:
    # Decoding/resizing is per-image work; intra-op threads in each worker would only
    # fight the main process's model threads for the same cores.
    torch.set_num_threads(1)


def _run_images(cfg: ExtractConfig, ex: dict[str, Any], writer: CacheWriter,
                specs: dict[str, tuple[dict, dict]], done: dict[str, np.ndarray],
                pending: list[int], row_path: dict[int, Path | None], device: torch.device,
                progress: bool) -> tuple[list[tuple[str, str, str]], int]:
    if not pending:
        return [], 0
    transforms: dict[str, Any] = {g: ex[g].preprocess for g in ("resnet", "clip") if g in specs}
    if any(g in specs for g in ("objects", "relations", "crops")):
        transforms["raw"] = ex["detector"].preprocess
    items = ImageItems([row_path[r] for r in pending], pending, transforms, cfg.max_pixels)
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    workers = min(workers, max(0, (len(pending) + cfg.batch_size - 1) // cfg.batch_size))
    loader = DataLoader(items, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda",
                        worker_init_fn=_worker_init if workers else None,
                        persistent_workers=False)
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    ids = writer.image_ids
    bad: list[tuple[str, str, str]] = []
    computed = 0
    from tqdm.auto import tqdm

    with tqdm(total=len(pending), unit="img", desc="extract", disable=not progress,
              dynamic_ncols=True) as bar:
        for nb, batch in enumerate(loader, start=1):
            ok = set(batch["ok"])
            need = {g: [p for p in batch["ok"] if not done[g][batch["row"][p]]] for g in specs}
            arrays = run_batch(ex, batch, need)
            for g in specs:
                if need[g]:
                    writer.write_rows(g, np.array([batch["row"][p] for p in need[g]]), arrays[g])
                skip = [batch["row"][p] for p in range(len(batch["row"])) if p not in ok]
                writer.write_rows(g, np.array(skip, dtype=np.int64), {})  # zeros, marked done
            writer.set_status(np.array(batch["row"]), batch["status"])
            writer.flush()
            for p, (r, s) in enumerate(zip(batch["row"], batch["status"], strict=True)):
                if p not in ok:
                    bad.append((ids[r], s, batch["message"][p]))
            computed += len(ok)
            bar.update(len(batch["row"]))
            if fail_after and nb >= fail_after:
                raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: injected failure after {nb} batches")
    return bad, computed


def _text_rows(tweets: Sequence[Tweet]) -> dict[str, tuple[str, list[str]]]:
    """``Tweet.key -> (sentence, [entity text, ...])`` in first-appearance order."""
    out: dict[str, tuple[str, list[str]]] = {}
    for t in tweets:
        if t.key not in out:
            ents = [" ".join(t.tokens[s:e]) for _, s, e in entities(t.labels)]
            out[t.key] = (" ".join(t.tokens), ents)
    return out


def _run_text(cfg: ExtractConfig, ex: dict[str, Any], writer: CacheWriter,
              text: dict[str, tuple[str, list[str]]]) -> int:
    tx = ex["clip_text"]
    emax = max(1, max(len(e) for _, e in text.values()))
    writer.ensure_group("clip_text", tx.attrs(), {**tx.dims(), "E": emax}, 0)
    keys = list(text)
    rows = writer.add_text_keys(keys)
    writer.grow_entities(emax)
    done = writer.done("clip_text")
    todo = [(k, int(r)) for k, r in zip(keys, rows, strict=True) if not done[r]]
    for i in range(0, len(todo), TEXT_BATCH):
        chunk = todo[i: i + TEXT_BATCH]
        sents = tx.encode([text[k][0] for k, _ in chunk])
        flat = [e for k, _ in chunk for e in text[k][1]]
        embs = tx.encode(flat)
        ent = np.zeros((len(chunk), emax, sents.shape[1]), np.float32)
        j = 0
        for b, (k, _) in enumerate(chunk):
            m = len(text[k][1])
            ent[b, :m] = embs[j: j + m]
            j += m
        writer.write_rows("clip_text", np.array([r for _, r in chunk]), {
            "sentence": sents, "entities": ent,
            "entity_count": np.array([len(text[k][1]) for k, _ in chunk], np.int32)})
        writer.flush()
    return len(keys)
