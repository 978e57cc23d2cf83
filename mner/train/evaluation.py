"""Decoding a split with a trained tagger, scoring it, and scoring a trained run folder on a file (loading it is :mod:`mner.train.runs`).

Evaluation mimics prediction: the model sees no gold labels, entity spans or text
teacher (those feed training losses only), so dev/test scores are what ``mner predict``
would produce. Every gold word is scored: words a window did not cover (none with the
current windowing, but the contract holds) are predicted ``O``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mner.devices import autocast
from mner.errors import ConfigError, DataError
from mner.train.data import NerDataset, VisualStore, bucket_batches
from mner.train.model import Tagger

# Loading a trained run is the run-folder module's business (mner.train.runs); the names
# stay importable from here for the callers written before it existed.
from mner.train.runs import LoadedRun, load_run, pick_seed_dir

__all__ = [
    "LoadedRun", "evaluate_run", "group_diagnostics", "load_run", "marked_for", "pick_seed_dir",
    "predict_words", "score_split",
]

IMAGE_STATUSES = ("ok", "missing", "unreadable")


@torch.no_grad()
def predict_words(
    model: Tagger,
    dataset: NerDataset,
    device: torch.device,
    batch_size: int,
    precision: str = "fp32",
) -> tuple[list[list[int]], dict[str, np.ndarray]]:
    """Viterbi tags for every word of every sentence in ``dataset``.

    Args:
        model: the tagger (switched to eval mode here).
        dataset: windows of the sentences.
        device: where to run.
        batch_size: windows per batch.
        precision: autocast precision (``fp32``, ``bf16`` or ``fp16``), the run's.

    Returns:
        ``(tags, diagnostics)``: tag ids per word for each sentence (``O`` = 0 where a
        word was not covered), and each head diagnostic as an (N,) array per sentence
        (the value of the sentence's first window; NaN when the head gave none).
    """
    model.eval()
    tags = [[0] * len(s) for s in dataset.sentences]
    diags: dict[str, np.ndarray] = {}
    for idx in bucket_batches(dataset.lengths(), batch_size, 1, None):
        batch = dataset.collate(idx)
        # Inference mode: no gold information reaches the head.
        batch.sub_labels = batch.word_tags = None
        batch.entity_spans = batch.entity_mask = None
        batch.text_teacher = {}
        with autocast(device, precision):
            paths, d = model.decode(batch.to(device))
        for b, (wi, path) in enumerate(zip(idx, paths, strict=False)):
            win = dataset.windows[wi]
            row = tags[win.item]
            for j, t in enumerate(path[: win.n_words]):
                row[win.word_start + j] = t
            if win.word_start == 0:
                for name, values in d.items():
                    arr = diags.setdefault(name, np.full(len(dataset.sentences), np.nan))
                    arr[win.item] = float(values[b])
    return tags, diags


def prf_dict(prf) -> dict:
    """A scoring ``PRF`` as a plain dict."""
    return dataclasses.asdict(prf) if dataclasses.is_dataclass(prf) else dict(prf)


def score_split(
    gold: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
    marked: Sequence[list[tuple[int, int, str]]] | None = None,
) -> dict:
    """The R record of ARCHITECTURE.md: overall, per type, and image-dependent P/R/F1.

    Args:
        gold: BIO2 gold labels per sentence.
        pred: BIO2 predicted labels per sentence.
        marked: the image-dependent gold entities per sentence, or None when the
            dataset has no ``image_dependent.tsv``.
    """
    from mner.scoring import score, score_marked

    s = score(gold, pred)
    return {
        "overall": prf_dict(s.overall),
        "per_type": {k: prf_dict(v) for k, v in s.per_type.items()},
        "image_dependent": prf_dict(score_marked(marked, pred)) if marked is not None else None,
    }


def marked_for(data_dir: Path | None, split: str, tweets) -> list | None:
    """Image-dependent marks of ``tweets`` (by their index in the split file), or None."""
    from mner.data.dataset import read_image_dependent

    if data_dir is None or not (Path(data_dir) / "image_dependent.tsv").is_file():
        return None
    marks = read_image_dependent(data_dir)
    return [marks.get((split, t.index), []) for t in tweets]


def group_diagnostics(diags: dict[str, np.ndarray], statuses: Sequence[str]) -> dict:
    """``{name: {"ok": [...], "missing": [...], "unreadable": [...]}}`` (NaNs dropped).

    Args:
        diags: per-sentence values of each head diagnostic, (N,) arrays.
        statuses: the cache status of each sentence's image.
    """
    out = {}
    for name, values in diags.items():
        groups = {s: [] for s in IMAGE_STATUSES}
        for v, s in zip(values, statuses, strict=False):
            if not np.isnan(v):
                # The cache records why an image failed (empty, truncated, ...); the
                # report groups all of those as unreadable.
                key = s if s in ("ok", "missing") else "unreadable"
                groups[key].append(float(v))
        out[name] = groups
    return out


# -- scoring a run ----------------------------------------------------------------------


def evaluate_run(
    run: Path,
    data_file: Path,
    *,
    seed: int | None = None,
    features: Path | None = None,
    device: str = "auto",
    pred_out: Path | None = None,
    context_file: Path | None = None,
    view: str | None = None,
) -> dict:
    """Score a trained run on a CoNLL file.

    Args:
        run: the run folder.
        data_file: a CoNLL file (any split); ``image_dependent.tsv`` next to it, if any,
            gives the image-dependent score (the split is named by the file's stem).
        seed: which seed's model; default the best on dev.
        features: the feature cache to read (default: the one the run was trained on).
        device: where to run.
        pred_out: optionally write the predictions there as BIO2 CoNLL.
        context_file: the context file for a run that reads one (default: the run's
            own, which must be unchanged; see :func:`mner.train.context.run_contexts`).
        view: decode this view (``context`` or ``tweet``) instead of the run's
            ``decode_view`` (``tweet`` reads no context).

    Returns:
        The R record: ``{"overall", "per_type", "image_dependent"}``.
    """
    from mner.cache.reader import FeatureCache
    from mner.data.conll import read_conll, write_conll
    from mner.data.dataset import split_name

    data_file = Path(data_file)
    if not data_file.is_file():
        raise DataError(f"{data_file}: no such file; pass a CoNLL file such as DIR/test.txt")
    lr = load_run(run, seed, device)
    if view is not None:
        if view not in ("context", "tweet"):
            raise ConfigError(f"--view {view!r}: choose context or tweet")
        lr.cfg = dataclasses.replace(lr.cfg, decode_view=view)
        lr.model.decode_view = view
    tweets = read_conll(data_file)
    from mner.train.context import CACHE_SOURCES, context_budget, run_contexts

    cache = None
    reads_cache_text = lr.cfg.decode_view == "context" and any(s in CACHE_SOURCES for s in lr.cfg.context)
    if lr.needs or reads_cache_text:
        path = Path(features) if features else lr.cache_path
        if path is None:
            raise ConfigError(f"{run}: model {lr.cfg.model!r} needs features; pass --features CACHE.h5")
        cache = FeatureCache(path)
        if lr.needs:
            cache.require(lr.needs, expect={"profile": lr.cfg.profile})
    contexts = run_contexts(lr.cfg, lr.provenance, tweets, cache=cache, context_file=context_file, where=str(run))
    ds = NerDataset(
        [t.tokens for t in tweets],
        [t.image_id for t in tweets],
        lr.tokenizer,
        lr.cfg.max_length,
        lr.tagset,
        [t.labels for t in tweets],
        VisualStore(cache, lr.needs, [t.image_id for t in tweets]) if cache is not None and lr.needs else None,
        contexts=contexts,
        context_max_length=context_budget(lr.cfg, lr.model.encoder, lr.tokenizer),
    )
    tags, _ = predict_words(lr.model, ds, lr.device, lr.cfg.eval_batch_size, lr.precision)
    pred = [lr.tagset.decode(t) for t in tags]
    if pred_out is not None:
        try:
            write_conll(pred_out, tweets, pred, scheme="bio2")
        except OSError as exc:
            with contextlib.suppress(OSError):
                Path(str(pred_out) + ".partial").unlink(missing_ok=True)
            raise DataError(
                f"{pred_out}: cannot write the predictions ({exc.strerror or exc}); choose another "
                "--pred file or free disk space"
            ) from None
    marked = marked_for(data_file.parent, split_name(data_file), tweets)
    return score_split([list(t.labels) for t in tweets], pred, marked)
