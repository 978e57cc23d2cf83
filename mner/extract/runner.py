"""``run_extract``: the batched, resumable extraction run behind ``mner extract``.

Order of work:

1. List the images: with ``data``, exactly the ids the tweets reference (first
   appearance order, missing files included); without, every image file in the folder
   (sorted by name; the id is the file stem).
2. Build every extractor. Weights are resolved first, so an offline machine without
   local weights stops here, before any image is read or any file written.
3. Open ``OUT.partial`` (resume / extend / overwrite, see :class:`CacheWriter`; a
   partial that cannot be verified is set aside), add new images, create or check the
   feature groups.
4. Rows with any requested group not done are decoded and preprocessed in DataLoader
   workers and run through the models batch by batch; each batch's rows and statuses
   are flushed first and its ``done`` flags after them, so a flag on disk always means
   the row is on disk. Pending rows keep their original order and are cut into batches
   from the first pending row, so a resumed run forms the same batches as an
   uninterrupted one and writes byte-identical tensors.
5. CLIP text embeddings of the sentences and gold entities (with ``data``).
6. Verify the file, record its checksums and rename ``OUT.partial`` to ``OUT``; print
   one line per image that did not load.

The whole run holds an exclusive lock on ``OUT`` (``OUT.lock``, :mod:`mner.locks`): a
second run on the same ``--out`` stops with one line naming the holder and touches
nothing. Precision is resolved once per run (:func:`run_precision`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mner.cache import schema
from mner.cache.reader import holds_all, statuses_of, stored_root_attrs
from mner.cache.writer import CacheWriter
from mner.data.conll import Tweet, read_conll
from mner.data.images import find_image, list_image_files
from mner.data.schemes import entities
from mner.devices import replay_precision, resolve_device, resolve_precision
from mner.errors import CacheError, DataError
from mner.extract.base import recorded_precision
from mner.extract.config import ExtractConfig
from mner.extract.dataset import ImageItems, collate
from mner.extract.relations import RELATION_NAMES, relation_matrix
from mner.provenance import mner_version

#: Test hook: raise after this many flushed batches (simulates a killed run).
FAIL_AFTER_ENV = "MNER_EXTRACT_FAIL_AFTER"

#: Test hook: sleep this many seconds after each flushed batch (lets a test act mid-run).
BATCH_DELAY_ENV = "MNER_EXTRACT_BATCH_DELAY"

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
    if "ocr" in feats:
        from mner.extract.ocr import OcrExtractor

        out["ocr"] = OcrExtractor(cfg, device)
    if "caption" in feats:
        from mner.extract.caption import CaptionExtractor

        out["caption"] = CaptionExtractor(cfg, device)
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
        if g in ("resnet", "clip", "crops", "ocr", "caption"):
            out[g] = (ex[g].attrs(), ex[g].dims())
        elif g == "tags":  # derived from the stored objects (mner.extract.tags)
            from mner.extract.tags import tags_attrs

            out[g] = (tags_attrs(cfg, ex["detector"].attrs()), {"O": cfg.max_objects})
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
    for g in ("resnet", "clip", "caption"):
        if need.get(g):
            sel = [ok_index[p] for p in need[g]]
            out[g] = ex[g](batch[g][sel])
    if need.get("ocr"):
        out["ocr"] = ex["ocr"]([batch["raw"][ok_index[p]] for p in need["ocr"]])
    det_pos = sorted({p for g in ("objects", "relations", "crops", "tags") for p in need.get(g, [])})
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
        if need.get("tags"):  # new images (mner predict); a cache derives them from its objects
            from mner.extract.tags import derive_tags

            idx = [at[p] for p in need["tags"]]
            cfg = ex["detector"].cfg
            out["tags"] = derive_tags(det["labels"][idx], det["scores"][idx], det["count"][idx],
                                      ex["detector"].attrs()["class_names"], cfg.tag_threshold)
    return out


def list_images(images: Path, tweets: Sequence[Tweet] | None) -> tuple[list[str], list[Path | None]]:
    """Image ids to extract and their files (None when an id has no file).

    Both ways use the one rule of :mod:`mner.data.images`: with tweets, each id is looked
    up with :func:`find_image`; without, every file :func:`list_image_files` accepts.
    """
    if tweets is not None:
        ids = list(dict.fromkeys(t.image_id for t in tweets))
        return ids, [find_image(images, i) for i in ids]
    files = list_image_files(images)
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
            "h5py": _dist_version("h5py"), "numpy": np.__version__, "pillow": PIL.__version__}


def run_precision(cfg: ExtractConfig, out: Path, device: torch.device) -> str:
    """The one autocast precision of this run, resolved before any model is built.

    A new cache: :func:`mner.devices.resolve_precision` of ``cfg.precision``. A cache
    being resumed or extended continues in its recorded precision
    (:func:`mner.devices.replay_precision` with ``exact=True``: rows computed in two
    precisions would differ by more than rounding); an explicit setting that differs
    from it is an error. Caches made before ``precision`` was recorded follow their old
    rule (:func:`mner.extract.base.recorded_precision`).

    Raises:
        ConfigError: An unknown setting, fp16 on a CPU, or a recorded fp16 cache
            continued off CUDA.
        CacheError: An explicit precision other than the cache's.
    """
    stored = {} if cfg.overwrite else stored_root_attrs(out).get("extract_config")
    if not isinstance(stored, Mapping) or not stored:
        return resolve_precision(cfg.precision, device, what="extract.precision")
    had = recorded_precision(dict(stored), device)
    if cfg.precision == "auto":
        return replay_precision(had, device, exact=True, where=str(out))
    precision = resolve_precision(cfg.precision, device, what="extract.precision")
    if had != precision:
        raise CacheError(f"{out} was made with precision {had}, this run resolves to "
                         f"{precision}; pass -o precision={had}, or --overwrite")
    return precision


def _check_root(writer: CacheWriter, cfg: ExtractConfig) -> None:
    root = writer.root_attrs
    if not root:
        return
    if root.get("schema_version") != schema.SCHEMA_VERSION:
        raise CacheError(f"{writer.out}: schema version {root.get('schema_version')}, this mner "
                         f"writes {schema.SCHEMA_VERSION}; pass --overwrite")
    for key, want in (("profile", cfg.profile), ("seed", cfg.seed)):
        if root.get(key) != want:
            raise CacheError(f"{writer.out} was made with {key} {root.get(key)}, this run asks for "
                             f"{want}; pass --overwrite or choose another --out")


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
        CacheError: An existing cache made with other settings (without ``overwrite``),
            a failed write (disk full, file-size limit; the partial file is kept for a
            resume), or a cache that cannot be read.
        LockError: Another process is writing ``out``.
    """
    from mner.locks import locked

    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"{images}: no such images folder; pass --images DIR")
    try:
        lock = locked(out, folder=False, what="feature cache")
        lock.__enter__()
    except OSError as exc:
        raise CacheError(f"{out}: cannot create files in {out.parent} ({exc.strerror or exc}); "
                         "check the folder's permissions or choose another --out") from None
    try:
        if cfg.threads is None:
            return _run_extract(cfg, images, data, out, progress)
        before = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            return _run_extract(cfg, images, data, out, progress)
        finally:
            torch.set_num_threads(before)
    finally:
        lock.__exit__(None, None, None)


def _run_extract(cfg: ExtractConfig, images: str | os.PathLike,
                 data: Sequence[str | os.PathLike] | None, out: str | os.PathLike,
                 progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    images, out = Path(images), Path(out)
    tweets: list[Tweet] | None = None
    if data:
        tweets = []
        for f in data:
            if not Path(f).is_file():
                raise DataError(f"{f}: no such CoNLL file; check --data")
            tweets.extend(read_conll(f))
    ids, paths = list_images(images, tweets)
    text = _text_rows(tweets) if tweets is not None and "clip_text" in cfg.features else {}
    if not cfg.overwrite and holds_all(out, profile=cfg.profile, seed=cfg.seed, groups=cfg.features,
                                       image_ids=ids, text_keys=list(text)):
        st = statuses_of(out)
        return {"out": str(out), "images": len(st), "computed": 0,
                "status": dict(Counter(st[i] for i in ids)), "bad": [], "sentences": len(text),
                "seconds": time.perf_counter() - t0}

    device = resolve_device(cfg.device)
    precision = run_precision(cfg, out, device)
    cfg = dataclasses.replace(cfg, precision=precision)  # what every extractor uses
    ex = build_extractors(cfg, device)  # WeightsError here, before any file is touched
    specs = group_specs(cfg, ex)

    writer = CacheWriter.open(out, overwrite=cfg.overwrite)
    try:
        _check_root(writer, cfg)
        from mner.config import to_dict

        created = writer.root_attrs.get("created") or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        writer.set_root_attrs({
            "schema_version": schema.SCHEMA_VERSION, "mner_version": mner_version(),
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
        # tags are derived from the stored objects after the images pass (no image read)
        derived = {g: specs.pop(g) for g in ("tags",) if g in specs}
        done = {g: writer.done(g) for g in specs}
        order = list(dict.fromkeys(int(r) for r in rows))
        pending = [r for r in order if not all(done[g][r] for g in specs)]
        row_path = dict(zip((int(r) for r in rows), paths, strict=True))
        bad, computed = _run_images(cfg, ex, writer, specs, done, pending, row_path, device, progress,
                                    images)
        if derived:
            from mner.extract.tags import write_tags

            write_tags(cfg, writer, order)
        sentences = _run_text(cfg, ex, writer, text) if text else 0
        writer.commit()
    except BaseException:
        writer.close()
        raise
    for rid, status, message in bad:
        print(f"image {rid}: {status} ({message})", file=sys.stderr)
    status_of = statuses_of(out)
    return {"out": str(out), "images": len(status_of), "computed": computed,
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
                progress: bool, images: Path) -> tuple[list[tuple[str, str, str]], int]:
    if not pending:
        return [], 0
    transforms: dict[str, Any] = {g: ex[g].preprocess for g in ("resnet", "clip", "caption") if g in specs}
    if any(g in specs for g in ("objects", "relations", "crops")):
        transforms["raw"] = ex["detector"].preprocess
    elif "ocr" in specs:  # the same decoded uint8 image
        transforms["raw"] = ex["ocr"].preprocess
    items = ImageItems([row_path[r] for r in pending], pending, transforms, cfg.max_pixels,
                       root=None if cfg.follow_symlinks else images)
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    workers = min(workers, max(0, (len(pending) + cfg.batch_size - 1) // cfg.batch_size))
    loader = DataLoader(items, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda",
                        worker_init_fn=_worker_init if workers else None,
                        persistent_workers=False)
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    delay = float(os.environ.get(BATCH_DELAY_ENV, "0") or 0)
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
            # Data and statuses first, flushed; the done flags only after them, so a run
            # killed in between recomputes these rows instead of trusting zeros.
            for g in specs:
                if need[g]:
                    writer.write_rows(g, np.array([batch["row"][p] for p in need[g]]), arrays[g],
                                      mark=False)
            writer.set_status(np.array(batch["row"]), batch["status"])
            writer.flush()
            skip = [batch["row"][p] for p in range(len(batch["row"])) if p not in ok]
            for g in specs:  # images that did not load keep zero rows, marked done
                writer.mark_done(g, np.array([batch["row"][p] for p in need[g]] + skip, dtype=np.int64))
            for p, (r, s) in enumerate(zip(batch["row"], batch["status"], strict=True)):
                if p not in ok:
                    bad.append((ids[r], s, batch["message"][p]))
            computed += len(ok)
            bar.update(len(batch["row"]))
            if delay:
                time.sleep(delay)
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
