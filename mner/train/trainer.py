"""``mner train``: fine-tune encoder + head + CRF on cached features, one run per seed.

A run reads top to bottom: :func:`train_run` opens the data and the cache (and, for a
model that reads visual features, counts per split the tweets whose image the cache
holds as ``ok``, stopping under ``train.min_image_coverage``), takes the run folder's
lock for the whole run, resolves the precision once and writes ``config.yaml`` and
``provenance.json``; then for each seed :func:`train_seed` does

* :func:`setup_seed`: seed everything, build (or, on ``--resume`` with a checkpoint,
  reload) encoder and tokenizer, tag set, model, datasets, optimizer and schedule;
* :func:`fit`: epochs of :func:`train_epoch` (AdamW with the encoder and the rest at
  their own learning rates, linear warmup then decay, gradient clipping, autocast,
  length-bucketed batches in a seeded order); after each epoch the dev split is decoded,
  the best model by dev F1 kept, early stopping applied and a full checkpoint written
  atomically, so ``--resume`` continues bit for bit;
* :func:`final_evaluation`: dev and test decoded once with the best model (test never
  takes part in model selection), predictions, diagnostics and the seed's metrics.

Under ``torchrun`` (see :mod:`mner.train.distributed`) the same functions run on every
rank: with DDP each rank trains on its share of each global batch and rank 0 alone
writes, evaluates and checkpoints (its results reach the others by broadcast);
seed-parallel ranks each run their own seeds as one-process runs.

Nothing here is head-specific: heads are reached only through ``mner.train.heads.base``;
where files go is :mod:`mner.train.runs`'s business.

Testing hooks: ``MNER_STOP_AFTER_EPOCH=k`` raises ``KeyboardInterrupt`` right after the
checkpoint of epoch ``k`` is written; ``MNER_KILL_AT`` sends the process SIGKILL at a
chosen point (``setup``: a seed is set up, before its first batch; ``batch:n``: the n-th
training batch of the process is collated; ``epoch:k``: the checkpoint of epoch ``k`` is
written), which is how the resume tests interrupt real runs (``MNER_KILL_SIGNAL=STOP``
pauses the process there instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_model
from tqdm.auto import tqdm

from mner.devices import autocast, replay_precision, resolve_device, resolve_precision
from mner.errors import CacheError, ConfigError, DataError, MnerError
from mner.locks import locked
from mner.provenance import mner_version, sha256_file
from mner.train import distributed
from mner.train import encoder as encoders
from mner.train.config import TrainConfig
from mner.train.context import context_budget, split_contexts
from mner.train.data import NerDataset, TagSet, VisualStore, bucket_batches
from mner.train.distributed import World
from mner.train.evaluation import group_diagnostics, marked_for, predict_words, score_split
from mner.train.model import Tagger, param_groups
from mner.train.runs import (
    RUN_FILES,
    RunFolder,
    RunWriteError,
    SeedFolder,
    build_model,
    load_weights,
    read_json,
    summarize_seeds,
    write_failed,
    write_json,
)

__all__ = ["RUN_FILES", "build_model", "train_run", "train_seed", "train_epoch", "summarize"]

STOP_ENV = "MNER_STOP_AFTER_EPOCH"
KILL_ENV = "MNER_KILL_AT"


class NonFiniteLoss(MnerError, FloatingPointError):
    """The training loss became NaN or infinite (damaged features, or too high a learning rate)."""


def _kill_point(point: str) -> None:
    """Testing hook: signal this process when ``MNER_KILL_AT`` names ``point``.

    The signal is SIGKILL, or the one ``MNER_KILL_SIGNAL`` names (``STOP`` pauses the
    run while it holds its lock, for the concurrency test).
    """
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("MNER_KILL_SIGNAL", "KILL")))


# -- setup ----------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs; set before first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def run_precision(cfg: TrainConfig, device: torch.device, folder: RunFolder, resume: bool) -> str:
    """The precision of a run, decided once: ``train.amp`` resolved for a new run, or
    the recorded one replayed exactly on ``--resume`` (see :mod:`mner.devices`).

    A resumed run keeps the precision its first half trained in, so ``--resume`` on
    another machine still reaches the same result; one this device cannot continue
    exactly (float16 off CUDA) is a ConfigError.
    """
    recorded = folder.recorded_precision() if resume else None
    if recorded is not None:
        return replay_precision(recorded, device, exact=True, where=str(folder.root))
    return resolve_precision(cfg.amp, device, what="train.amp")


def open_cache(cfg: TrainConfig, features: Path | None):
    """Open and check the feature cache the head needs (None for text-only heads).

    Raises:
        CacheError: when the head needs features and none were given, the cache lacks a
            dataset, or it was extracted with another profile.
    """
    from mner.cache.reader import FeatureCache
    from mner.train.context import CACHE_SOURCES, check_cache_sources

    head_cls = cfg.head_class()
    needs = tuple(head_cls.required_features(cfg.head_config()))
    teacher = bool(head_cls.needs_text_teacher)
    context_needs = [s for s in cfg.context if s in CACHE_SOURCES]
    if not needs and not teacher:
        if not context_needs:
            return None, needs
        # A text-only head reading image text: the cache serves the context strings only.
        cache = FeatureCache(features) if features is not None else None
        check_cache_sources(cache, cfg.context)
        return cache, needs
    if features is None:
        what = ", ".join(needs) if needs else "clip_text"
        raise CacheError(
            f"model {cfg.model!r} reads cached features ({what}); pass --features "
            "cache/NAME.h5 made by `mner extract`"
        )
    cache = FeatureCache(features)
    cache.require(list(needs) + (["clip_text/sentence"] if teacher else []), expect={"profile": cfg.profile})
    check_cache_sources(cache, cfg.context)
    return cache, needs


def image_coverage(cache, splits: dict) -> dict[str, dict[str, int]]:
    """Per split: how many tweets there are and how many found an ``ok`` image row in ``cache``."""
    out = {}
    for name in ("train", "valid", "test"):
        tweets = splits.get(name)
        if tweets:
            statuses = cache.status_of([t.image_id for t in tweets])
            out[name] = {"tweets": len(tweets), "ok": sum(s == "ok" for s in statuses)}
    return out


def check_coverage(cfg: TrainConfig, cache, coverage: dict, data) -> None:
    """Say how many tweets have an image in the cache; stop when too few train tweets do.

    Raises:
        CacheError: under ``train.min_image_coverage`` of the train tweets have an ok
            image (most likely the cache of another dataset).
    """
    parts = ", ".join(f"{k} {v['ok']}/{v['tweets']}" for k, v in coverage.items())
    print(f"image coverage: tweets with an ok image in {cache.path}: {parts}", file=sys.stderr)
    train = coverage.get("train")
    if not train:
        return
    share = train["ok"] / train["tweets"]
    if share < cfg.min_image_coverage:
        raise CacheError(
            f"{cache.path}: only {train['ok']} of {train['tweets']} train tweets ({share:.0%}) have an ok "
            f"image in this cache (train.min_image_coverage is {cfg.min_image_coverage:g}); is it the "
            f"cache of another dataset? re-extract it with `mner extract --data {data}`, or pass "
            "-o min_image_coverage=0 if this is meant"
        )


def feature_dims(cfg: TrainConfig, cache, needs) -> dict[str, int]:
    """Last-dim sizes of the cached datasets the head is built with.

    Includes ``clip_text/sentence`` for heads that read the text teacher, so a head whose
    ablation drops every visual input (MGC without the visual modules) still learns the
    joint-space size from the cache.
    """
    if cache is None:
        return {}
    names = list(needs)
    if cfg.head_class().needs_text_teacher:
        names.append("clip_text/sentence")
    return {n: cache.dims(n) for n in names}


class _Split:
    """One split's tweets and dataset."""

    def __init__(self, name, tweets, dataset):
        self.name, self.tweets, self.dataset = name, tweets, dataset


def _datasets(cfg, splits, tokenizer, tagset, cache, needs, contexts=None, budget=0) -> dict[str, _Split]:
    teacher_on = cache is not None and cfg.head_class().needs_text_teacher
    out = {}
    for name in ("train", "valid", "test"):
        tweets = splits.get(name)
        if not tweets:
            continue
        ids = [t.image_id for t in tweets]
        visual = VisualStore(cache, needs, ids) if cache is not None and needs else None
        teacher = cache.load_text([t.key for t in tweets]) if teacher_on and name == "train" else None
        ds = NerDataset(
            [t.tokens for t in tweets], ids, tokenizer, cfg.max_length, tagset,
            [t.labels for t in tweets], visual, teacher, (contexts or {}).get(name), budget,
        )
        out[name] = _Split(name, tweets, ds)
    return out


# -- checkpoints ----------------------------------------------------------------------


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # NumPy's state holds an ndarray, which weights_only loading refuses: store a tensor.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))


def _checkpoint_in(folder: Path) -> Path | None:
    """The complete checkpoint at ``folder``, or its previous copy when a run was
    interrupted between the two renames of :func:`save_checkpoint`; None if neither."""
    if (folder / "state.json").exists():
        return folder
    old = folder.with_name(folder.name + ".old")
    return old if (old / "state.json").exists() else None


def _write_checkpoint_files(tmp: Path, model, optimizer, scheduler, scaler, state: dict,
                            rank_rngs: list | None = None) -> None:
    save_model(model, str(tmp / "model.safetensors"))
    blob = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
    }
    if rank_rngs is not None:
        # DDP: every rank's generators (dropout draws differ by rank), so each continues.
        blob["rank_rngs"] = rank_rngs
    torch.save(blob, tmp / "state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(folder: Path, model, optimizer, scheduler, scaler, state: dict,
                    rank_rngs: list | None = None) -> None:
    """Write the full training state to ``folder`` atomically.

    ``rank_rngs`` (DDP) holds every rank's random generator states, in rank order.

    Written into ``folder.tmp`` first, then swapped in by renames, so an interruption or
    a failed write leaves either the previous or the new checkpoint, never a torn one.

    Raises:
        RunWriteError: the write failed (disk full, file-size limit); the previous
            checkpoint is intact and the half-written one removed.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_checkpoint_files(tmp, model, optimizer, scheduler, scaler, state, rank_rngs)
    except (OSError, RuntimeError, SafetensorError) as exc:
        # torch.save and safetensors report a failed write as RuntimeError / SafetensorError.
        shutil.rmtree(tmp, ignore_errors=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:160]
        raise RunWriteError(
            f"{folder}: cannot write the checkpoint ({why}); the previous one is kept; free disk "
            "space or raise the file-size limit, then continue with --resume"
        ) from None
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(path: Path) -> dict:
    """``state.pt`` through ``torch.load(weights_only=True)``; a refusal or damage is one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch explains at length; keep what names the refused object ("Unsupported
        # global: GLOBAL some.module.Class").
        text = " ".join(str(exc).split())
        start = text.find("Unsupported")
        why = text[start:].split(" was not an allowed")[0] if start >= 0 else text
        raise DataError(
            f"{path}: not a trusted checkpoint: it holds objects other than tensors and plain data "
            f"({why[:160]}), which mner does not unpickle; delete {path.parent} to restart this seed "
            "with --resume, or train again with --overwrite"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        why = " ".join(str(exc).split()).split(". ")[0][:120] or type(exc).__name__
        raise DataError(
            f"{path}: damaged or truncated checkpoint ({why}); delete "
            f"{path.parent} to restart this seed with --resume, or train again with --overwrite"
        ) from None


def load_checkpoint(folder: Path, model, optimizer, scheduler, scaler, rank: int = 0) -> dict | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; None when there is none.

    ``rank`` picks this rank's random generator states in a DDP checkpoint.

    Raises:
        DataError: a damaged or untrusted checkpoint file (one line naming it).
    """
    found = _checkpoint_in(folder)
    if found is None:
        return None
    state = read_json(found / "state.json")
    load_weights(model, found / "model.safetensors")
    blob = _load_state(found / "state.pt")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    rngs = blob.get("rank_rngs")
    _set_rng_state(rngs[rank] if rngs and rank < len(rngs) else blob["rng"])
    state.pop("world_size", None)
    return state


# -- one epoch ------------------------------------------------------------------------


def _nonfinite_loss(loss: float, batch, dataset: NerDataset, desc: str) -> NonFiniteLoss:
    """Name the visual features of ``batch`` that hold NaN/inf, if any, else advise on rates."""
    ids = [dataset.image_ids[dataset.windows[w].item] for w in batch.windows]
    bad = []
    for name, t in batch.visual.items():
        if not t.is_floating_point():
            continue
        rows = t.detach().float().reshape(t.shape[0], -1)
        nan = torch.isnan(rows).any(1)
        inf = torch.isinf(rows).any(1)
        if (nan | inf).any():
            which = sorted({ids[i] for i in (nan | inf).nonzero().flatten().tolist()})
            kind = "NaN" if nan.any() else "inf"
            more = f" and {len(which) - 5} more" if len(which) > 5 else ""
            bad.append(f"{name} has {kind} for image ids {', '.join(which[:5])}{more}")
    if bad:
        cache = getattr(dataset.visual, "cache", None)
        where = getattr(cache, "path", "CACHE.h5")
        return NonFiniteLoss(
            f"{desc}: loss is {loss}: {'; '.join(bad)}; the cache is damaged: mner inspect --verify {where}"
        )
    return NonFiniteLoss(f"{desc}: loss is {loss}; lower the learning rates")


def train_epoch(
    model: Tagger,
    dataset: NerDataset,
    batches: Sequence[Sequence[int]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    device: torch.device,
    precision: str,
    grad_clip: float,
    num_workers: int = 0,
    desc: str = "train",
    batch_hook: Callable | None = None,
    weights: Sequence[float] | None = None,
    ddp: torch.nn.Module | None = None,
) -> float:
    """One pass over ``batches``; returns the mean total loss.

    Args:
        batch_hook: optional ``f(batch) -> batch`` applied after collation (the
            training benchmark uses it to compute features per batch from images).
        weights: per batch, the weight of its loss (DDP: this rank's share of the
            global batch, see :func:`mner.train.distributed.shard`); the returned
            mean is then of the weighted losses.
        ddp: ``model`` wrapped by :func:`mner.train.distributed.wrap_ddp`; the loss is
            computed through it, so gradients are averaged over the ranks and the
            contrastive losses gather their negatives across ranks.

    Raises:
        NonFiniteLoss: the loss became NaN/inf; names the batch's damaged features if any.
    """
    model.train()
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=dataset.collate, num_workers=num_workers
    )
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)
    for i, batch in enumerate(bar):
        if batch_hook is not None:
            batch = batch_hook(batch)
        batch = batch.to(device)
        weight = 1.0 if weights is None else float(weights[i])
        with autocast(device, precision):
            if ddp is None:
                loss, _ = model.loss(batch)
            else:
                scale = distributed.sum_scale(weight, distributed.world().world_size)
                with distributed.gathering(rows_valid=weight > 0, sum_scale=scale):
                    loss, _ = ddp(batch)
        if not torch.isfinite(loss):
            raise _nonfinite_loss(loss.item(), batch, dataset, desc)
        if weights is not None:
            loss = loss * weight
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        total += float(loss.detach())
        n += 1
        bar.set_postfix(loss=f"{total / n:.3f}")
    return total / max(n, 1)


# -- a run ----------------------------------------------------------------------------


def train_run(
    cfg: TrainConfig,
    data: str | Path | Sequence[str | Path],
    features: str | Path | None = None,
    out: str | Path = "runs/run",
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train one model per seed and write the run folder (see ARCHITECTURE.md).

    Args:
        cfg: the training config.
        data: a dataset folder (train/valid/test.txt) or a list of CoNLL files.
        features: the feature cache; required when the head reads visual features.
        out: the run folder; locked for the whole run (a second ``mner train`` on it
            stops with a LockError naming this process).
        resume: continue an interrupted run from its checkpoints (the config must
            match the one recorded in ``out/config.yaml``); a seed interrupted before
            its first checkpoint starts afresh, exactly as an uninterrupted run.
        overwrite: replace a run already in ``out`` (its seed folders and results).

    Under ``torchrun`` every rank calls this; ``train.parallel`` decides between DDP
    and seed-parallel (see :mod:`mner.train.distributed`), and every rank returns the
    summary.

    Returns:
        The contents of ``out/metrics.json``.
    """
    threads = distributed.rank_threads(cfg.threads, distributed.world())
    if threads is None:
        return _train_run(cfg, data, features, out, resume, overwrite)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_run(cfg, data, features, out, resume, overwrite)
    finally:
        torch.set_num_threads(before)


@dataclass
class RunContext:
    """What every seed of a run shares (set up once by :func:`train_run`)."""

    cfg: TrainConfig
    folder: RunFolder
    splits: dict
    data_dir: Path
    cache: object
    needs: tuple[str, ...]
    device: torch.device
    precision: str
    resume: bool
    #: this process among the ranks (World() outside torchrun and for seed-parallel ranks)
    world: World = field(default_factory=World)
    #: ``single``, ``ddp`` or ``seeds`` (see :func:`mner.train.distributed.choose_mode`)
    mode: str = "single"
    #: split -> one context text per tweet (empty without ``train.context``).
    contexts: dict = field(default_factory=dict)

    @property
    def ddp(self) -> bool:
        """True when this seed is trained by several DDP ranks."""
        return self.mode == "ddp" and self.world.world_size > 1

    @property
    def ranks(self) -> int:
        """DDP ranks training each seed (1 unless :attr:`ddp`)."""
        return self.world.world_size if self.ddp else 1


def _open_inputs(cfg: TrainConfig, data, features: Path | None, report: bool):
    """Read the splits, open the cache and (``report``: on rank 0) check image coverage.

    Returns ``cfg`` too: with the paper profile it takes the recipe's values for the
    dataset (:meth:`TrainConfig.for_dataset`), so it must replace the caller's.
    """
    from mner.data.dataset import load_splits

    splits = load_splits(data)
    for need in ("train", "valid"):
        if not splits.get(need):
            raise DataError(f"{data}: no {need} split (train.txt and valid.txt or dev.txt are needed)")
    cache, needs = open_cache(cfg, features)
    contexts, context_record = split_contexts(cfg, splits, cache)
    data_dir = Path(data) if isinstance(data, (str, Path)) and Path(data).is_dir() else Path(splits["train"][0].source).parent
    # The paper recipe's per-dataset values: the data folder's name when dataset_name is unset.
    cfg = cfg.for_dataset(data_dir.resolve().name)
    coverage = None
    if report and cache is not None and needs:
        coverage = image_coverage(cache, splits)
        check_coverage(cfg, cache, coverage, data_dir)
    return cfg, splits, cache, needs, data_dir, coverage, contexts, context_record


def _train_run(cfg: TrainConfig, data, features, out, resume: bool, overwrite: bool) -> dict:
    w = distributed.world()
    mode = distributed.choose_mode(cfg.parallel, len(cfg.seeds), w.world_size)
    device = distributed.rank_device(resolve_device(cfg.device), w)
    with distributed.process_group(device, mode):
        return _train_ranks(cfg, data, features, out, resume, overwrite, w, mode, device)


def _train_ranks(cfg: TrainConfig, data, features, out, resume: bool, overwrite: bool, w: World,
                 mode: str, device: torch.device) -> dict:
    folder = RunFolder(Path(out))
    features = Path(features) if features is not None else None
    # Checks every rank would fail alike are made (and reported) by rank 0 first.
    cfg, splits, cache, needs, data_dir, coverage, contexts, context_record = distributed.main_first(
        lambda: _open_inputs(cfg, data, features, report=w.is_main), w
    )
    try:
        with contextlib.ExitStack() as held:

            def prepare() -> str:
                # Rank 0 alone takes the run folder's lock (for the whole run) and writes.
                held.enter_context(locked(folder.root, folder=True, what="run folder"))
                precision = run_precision(cfg, device, folder, resume)
                _prepare_out(cfg, folder, resume, overwrite)
                _write_provenance(cfg, folder, splits, data_dir, cache, needs, precision, coverage,
                                  {"world_size": w.world_size, "mode": mode}, context_record)
                return precision

            precision = distributed.on_main(prepare, w)
            ctx = RunContext(cfg, folder, splits, data_dir, cache, needs, device, precision, resume, w, mode,
                             contexts)
            if mode == "seeds":
                runs = _seed_parallel(ctx)
            else:
                runs = [train_seed(ctx, seed) for seed in cfg.seeds]
            summary = summarize(cfg, runs)
            distributed.on_main(lambda: folder.write_metrics(summary), w)
    except OSError as exc:
        # The environment refused a write (full disk, size limit, read-only or not a
        # folder): one line naming the file; what was written before stays usable.
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise write_failed(Path(exc.filename or folder.root), exc) from None
    return summary


def _seed_parallel(ctx: RunContext) -> list[dict]:
    """Seed-parallel: rank r trains seeds r, r + N, ... as one-process runs.

    Each seed is trained exactly as :func:`train_seed` trains it in one process (its
    own seed folder, checkpoints and metrics, written by the rank that trains it);
    the records are gathered once all ranks are done, in ``cfg.seeds`` order.
    """
    w = ctx.world
    mine = ctx.cfg.seeds[w.rank :: w.world_size]
    if not mine and w.rank == len(ctx.cfg.seeds):
        print(f"warning: {w.world_size} ranks for {len(ctx.cfg.seeds)} seeds; ranks "
              f"{len(ctx.cfg.seeds)}.. have no seed to train", file=sys.stderr)
    solo = dataclasses.replace(ctx, world=World(), mode="single")
    done = distributed.everywhere(lambda: [train_seed(solo, s) for s in mine], w)
    records = {r["seed"]: r for part in done for r in part}
    return [records[s] for s in ctx.cfg.seeds]


_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                 errno.ENOTDIR, errno.EEXIST}


def _prepare_out(cfg: TrainConfig, folder: RunFolder, resume: bool, overwrite: bool = False) -> None:
    from mner.config import to_dict

    out = folder.root
    if overwrite and resume:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one")
    if overwrite and out.is_dir():
        # Only what mner train wrote: anything else the user keeps there stays.
        for _, seed_dir in folder.seeds():
            shutil.rmtree(seed_dir.path)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    if not resume and (any(out.glob("seed_*/checkpoint")) or folder.metrics.exists()):
        raise ConfigError(
            f"{out}: already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out"
        )
    if resume and folder.config.exists():
        old = folder.read_config_dict()
        new = to_dict(cfg)
        # A setting added after the run was written is not a difference when at its default.
        defaults = to_dict(TrainConfig(model=cfg.model, profile=cfg.profile))
        # The recipe record says who set the values; the values themselves are compared.
        diff = next((k for k in new if k != "recipe" and old.get(k, defaults.get(k)) != new[k]), None)
        if diff is not None:
            raise ConfigError(
                f"{folder.config}: --resume with a different config ({diff}: {old.get(diff)!r} before, "
                f"{new[diff]!r} now); use a new --out or the same settings"
            )
    out.mkdir(parents=True, exist_ok=True)
    folder.write_config(cfg)


def _write_provenance(cfg, folder: RunFolder, splits, data_dir: Path, cache, needs, precision: str,
                      coverage: dict | None, parallel: dict | None = None,
                      context: dict | None = None) -> None:
    files = sorted({t.source for tweets in splits.values() for t in tweets[:1]})
    prov = {
        "dataset": {
            "name": cfg.dataset_name or data_dir.resolve().name,
            "files": {f: sha256_file(f) for f in files},
        },
        "cache": None,
        "feature_dims": {},
        "profile": cfg.profile,
        # Autocast precision the run trained and evaluated in; mner evaluate/predict reuse it.
        "precision": precision,
        "mner_version": mner_version(),
        # torchrun ranks and what they did (mode: single, ddp or seeds); a DDP seed
        # resumes only with the same world size (its checkpoint records it too).
        "parallel": parallel or {"world_size": 1, "mode": "single"},
    }
    if cache is not None:
        prov["cache"] = {
            "path": str(Path(cache.path).resolve()),
            "sha256": sha256_file(cache.path),
            "provenance": cache.provenance,
        }
        prov["feature_dims"] = feature_dims(cfg, cache, needs)
    if coverage is not None:
        # Per split: tweets, and how many found an ok image row in the cache.
        prov["cache_coverage"] = coverage
    if context is not None:
        # Sources, empty contexts per split, and the context file's sha256 (evaluate and
        # predict check it).
        prov["context"] = context
    folder.write_provenance(prov)


def make_optimizer(model: Tagger, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with PyTorch's fused kernel where there is one.

    The fused kernel (CPU and CUDA) updates every tensor in one pass: for BERT-base on a
    2-core CPU its step took 70-100 ms against 500 ms for ``foreach=True``, itself far
    faster than the default per-tensor loop. Devices without a fused kernel get
    ``foreach``. Build the optimizer after moving the model to its device.
    """
    groups = param_groups(model, cfg.lr_encoder, cfg.lr_head, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, ValueError):  # no fused AdamW for this device or dtype
        return torch.optim.AdamW(groups, foreach=True)


# -- a seed: setup, fit, final evaluation ---------------------------------------------


def _fresh_state() -> dict:
    return {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0, "stopped": False, "history": []}


@dataclass
class SeedRun:
    """One seed's model and training state, as :func:`setup_seed` builds it."""

    seed: int
    paths: SeedFolder
    tagset: TagSet
    model: Tagger
    sets: dict[str, _Split]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    #: epoch, best_f1, best_epoch, bad_epochs, stopped, history: what a checkpoint restores.
    state: dict = field(default_factory=_fresh_state)
    #: True when continuing from a checkpoint (False: from scratch, resumed or not).
    continued: bool = False
    #: DDP: ``model`` wrapped for gradient averaging (None in one process).
    ddp: torch.nn.Module | None = None


def train_seed(ctx: RunContext, seed: int) -> dict:
    """Train, select on dev, and evaluate one seed; returns its metrics record."""
    paths = ctx.folder.seed(seed)
    if ctx.resume and paths.metrics.exists():
        return read_json(paths.metrics)
    run = setup_seed(ctx, seed)
    _kill_point("setup")
    fit(ctx, run)
    # Rank 0 alone decodes dev and test with the full model: one-process numbers.
    return distributed.on_main(lambda: final_evaluation(ctx, run), ctx.world)


def setup_seed(ctx: RunContext, seed: int) -> SeedRun:
    """Seed, build encoder/tagger/datasets/optimizer and restore a checkpoint if resuming.

    A resumed seed without a checkpoint (interrupted before its first one was written)
    is set up exactly as a new one: the encoder is built or loaded afresh (pretrained
    weights, or the seeded tiny BERT), never rebuilt from the saved config, whose weights
    would be random.
    """
    cfg, w = ctx.cfg, ctx.world
    paths = ctx.folder.seed(seed)
    seed_everything(seed, cfg.deterministic)
    # Rank 0 decides (and checks) whether to continue; the other ranks follow.
    continued = distributed.on_main(lambda: _continues(ctx, paths), w)

    # The encoder folder is written once; a continued run reloads its tokenizer instead
    # of re-training it, so the vocabulary cannot drift between the two halves of a run
    # (the weights come from the checkpoint).
    if continued:
        enc, tokenizer = encoders.load_saved(paths.encoder)
    elif cfg.is_tiny_encoder:
        # With context, the tiny vocabulary also learns the train contexts' words (an
        # empty context adds nothing, so the plain model is unchanged).
        texts = [t.tokens for t in ctx.splits["train"]] + [c.split() for c in ctx.contexts.get("train", []) if c]
        positions = cfg.max_length + (cfg.context_max_length + 8 if cfg.context else 0)
        enc, tokenizer = encoders.build_tiny(texts, seed, positions)
    else:
        enc, tokenizer = encoders.load_pretrained(cfg.encoder)
    types = {lab[2:] for t in ctx.splits["train"] for lab in t.labels if lab != "O"}
    tagset = TagSet(cfg.resolved_scheme(), types)
    distributed.barrier(w)  # every rank has read the saved encoder before rank 0 rewrites it

    def write_seed_files() -> None:
        paths.path.mkdir(parents=True, exist_ok=True)
        encoders.save(enc, tokenizer, paths.encoder)
        tagset.save(paths.labels)

    distributed.on_main(write_seed_files, w)

    model = build_model(cfg, seed, enc, tagset, feature_dims(cfg, ctx.cache, ctx.needs)).to(ctx.device)
    sets = _datasets(cfg, ctx.splits, tokenizer, tagset, ctx.cache, ctx.needs, ctx.contexts,
                     context_budget(cfg, enc, tokenizer))

    total_steps = math.ceil(len(sets["train"].dataset) / global_batch(cfg, ctx.ranks)) * cfg.epochs
    optimizer = make_optimizer(model, cfg)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda") if ctx.precision == "fp16" else None

    run = SeedRun(seed, paths, tagset, model, sets, optimizer, scheduler, scaler, continued=continued)
    if continued:
        run.state = load_checkpoint(paths.checkpoint, model, optimizer, scheduler, scaler, rank=w.rank)
    elif w.is_main:
        for stale in (paths.checkpoint, paths.checkpoint.with_name("checkpoint.old")):
            shutil.rmtree(stale, ignore_errors=True)
    if ctx.ddp:
        run.ddp = distributed.wrap_ddp(model)
    return run


def global_batch(cfg: TrainConfig, ranks: int) -> int:
    """Windows per optimizer step over all DDP ranks.

    ``batch_size`` per rank, so ``batch_size x ranks`` in all (the effective batch grows
    with the ranks), or ``batch_size`` in all with ``train.global_batch: true``, which
    then gives the one-process run's steps and gradients.
    """
    return cfg.batch_size if cfg.global_batch else cfg.batch_size * ranks


def _continues(ctx: RunContext, paths: SeedFolder) -> bool:
    """Whether this seed continues from a checkpoint; checks the world size it was made with.

    Raises:
        ConfigError: the checkpoint was written by a different number of DDP ranks
            (its batches, steps and per-rank random streams depend on it).
    """
    found = _checkpoint_in(paths.checkpoint) if ctx.resume else None
    if found is None:
        return False
    recorded = int(read_json(found / "state.json").get("world_size", 1))
    if recorded != ctx.ranks:
        how = "in one process (no torchrun, or --nproc 1)" if recorded == 1 else (
            f"with {recorded} ranks (torchrun --nproc-per-node {recorded}, or --nproc {recorded})")
        raise ConfigError(
            f"{found}: seed {paths.path.name.removeprefix('seed_')} was checkpointed by {recorded} DDP "
            f"rank(s) and is resumed with {ctx.ranks}; resume it {how}, or train it again with --overwrite"
        )
    return True


def fit(ctx: RunContext, run: SeedRun) -> None:
    """Epochs until ``cfg.epochs`` or early stopping; keeps the best model, checkpoints each epoch."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # dvclive must not phone home
    from dvclive import Live

    cfg, state, w = ctx.cfg, run.state, ctx.world
    live = None
    if w.is_main:  # rank 0 alone logs
        live = Live(
            dir=str(run.paths.dvclive),
            resume=run.continued and state["epoch"] > 0,
            save_dvc_exp=False,
            dvcyaml=False,  # never touch the project's dvc.yaml from inside a training run
        )
    try:
        stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
        while state["epoch"] < cfg.epochs and not state["stopped"]:
            epoch = state["epoch"] + 1
            loss, seconds, f1 = run_epoch(ctx, run, epoch)
            state["history"].append({"epoch": epoch, "train_loss": loss, "dev_f1": f1, "seconds": seconds})
            better = f1 > state["best_f1"]
            if better:
                state.update(best_f1=f1, best_epoch=epoch, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
                if cfg.patience and state["bad_epochs"] >= cfg.patience:
                    state["stopped"] = True
            state["epoch"] = epoch
            # Every rank's generators go into rank 0's checkpoint, so each continues.
            rngs = distributed.gather(_rng_state(), w) if ctx.ddp else None
            distributed.on_main(functools.partial(_record_epoch, ctx, run, live, better, loss, f1, seconds, rngs), w)
            if stop_after and epoch == stop_after:
                raise KeyboardInterrupt(f"{STOP_ENV}={stop_after}")
        if w.is_main:
            _plot_history(state["history"], run.paths.plot)
    finally:
        if live is not None:
            live.end()


def _record_epoch(ctx: RunContext, run: SeedRun, live, better: bool, loss: float, f1: float, seconds: float,
                  rngs: list | None) -> None:
    """Rank 0's writes after an epoch: best model, dvclive step and the checkpoint."""
    if better:
        _save_best(run)
    live.log_metric("train/loss", loss)
    live.log_metric("dev/f1", f1)
    live.log_metric("epoch_seconds", seconds)
    live.next_step()
    state = run.state
    saved = {**state, "world_size": ctx.ranks} if ctx.ddp else state
    save_checkpoint(run.paths.checkpoint, run.model, run.optimizer, run.scheduler, run.scaler, saved, rngs)
    _kill_point(f"epoch:{state['epoch']}")


_batches_seen = 0


def _kill_hook() -> Callable | None:
    """Testing: a batch hook that SIGKILLs at the n-th batch when ``MNER_KILL_AT=batch:n``."""
    at = os.environ.get(KILL_ENV, "")
    if not at.startswith("batch:"):
        return None

    def hook(batch):
        global _batches_seen
        _batches_seen += 1
        _kill_point(f"batch:{_batches_seen}")
        return batch

    return hook


def run_epoch(ctx: RunContext, run: SeedRun, epoch: int) -> tuple[float, float, float]:
    """Train one epoch and score dev; returns ``(train loss, seconds, dev F1)``."""
    cfg, w = ctx.cfg, ctx.world
    train_ds = run.sets["train"].dataset
    # The batch order depends only on (seed, epoch), so a resumed run sees the same
    # batches without carrying a sampler state. Under DDP every rank draws the same
    # global batches and takes its share of each.
    gen = torch.Generator().manual_seed(run.seed * 100_003 + epoch)
    batches = bucket_batches(train_ds.lengths(), global_batch(cfg, ctx.ranks), cfg.bucket_size, gen)
    weights = None
    if ctx.ddp:
        batches, weights = distributed.shard_batches(batches, w.rank, w.world_size)
    t0 = time.perf_counter()
    loss = train_epoch(
        run.model, train_ds, batches, run.optimizer, run.scheduler, run.scaler, ctx.device, ctx.precision,
        cfg.grad_clip, cfg.num_workers, desc=f"seed {run.seed} epoch {epoch}/{cfg.epochs}",
        batch_hook=_kill_hook(), weights=weights, ddp=run.ddp,
    )
    if ctx.ddp:
        # The mean over ranks of the weighted losses: the one-process epoch loss.
        loss = distributed.all_sum(loss, w) / w.world_size
    seconds = time.perf_counter() - t0
    # Rank 0 alone scores dev with the full model (one-process numbers); all ranks
    # then take the same early-stopping decision.
    f1 = distributed.on_main(
        lambda: _eval_split(run.model, run.sets["valid"], run.tagset, ctx.device, ctx.precision, cfg)["overall"]["f1"],
        w,
    )
    seconds = distributed.broadcast(seconds, w)
    return loss, seconds, f1


def _save_best(run: SeedRun) -> None:
    partial = run.paths.model.with_name(run.paths.model.name + ".partial")
    try:
        save_model(run.model, str(partial))
        os.replace(partial, run.paths.model)
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise write_failed(run.paths.model, exc if isinstance(exc, OSError) else OSError(None, str(exc))) from None


def final_evaluation(ctx: RunContext, run: SeedRun) -> dict:
    """Decode dev and test with the best model; write predictions, diagnostics and metrics."""
    from mner.data.conll import write_conll

    paths, cache = run.paths, ctx.cache
    write_json(paths.history, run.state["history"])
    # Test is touched here only.
    load_weights(run.model, paths.model)
    record = {"seed": run.seed, "best_epoch": run.state["best_epoch"]}
    for split, key in (("valid", "dev"), ("test", "test")):
        if split not in run.sets:
            record[key] = None
            continue
        sp = run.sets[split]
        tags, diags = predict_words(run.model, sp.dataset, ctx.device, ctx.cfg.eval_batch_size, ctx.precision)
        pred = [run.tagset.decode(t) for t in tags]
        write_conll(paths.predictions(split), sp.tweets, pred, scheme="bio2")
        record[key] = score_split(
            [list(t.labels) for t in sp.tweets], pred, marked_for(ctx.data_dir, split, sp.tweets)
        )
        if split == "test":
            statuses = cache.status_of([t.image_id for t in sp.tweets]) if cache is not None else ["missing"] * len(sp.tweets)
            write_json(paths.diagnostics, group_diagnostics(diags, statuses))
    if "test" not in run.sets:
        write_json(paths.diagnostics, {})
    secs = [h["seconds"] for h in run.state["history"]]
    record["seconds_per_epoch"] = float(np.mean(secs)) if secs else 0.0
    write_json(paths.metrics, record)
    return record


def _eval_split(model, split: _Split, tagset, device, precision, cfg) -> dict:
    tags, _ = predict_words(model, split.dataset, device, cfg.eval_batch_size, precision)
    pred = [tagset.decode(t) for t in tags]
    return score_split([list(t.labels) for t in split.tweets], pred, None)


def _plot_history(history: list[dict], path: Path) -> None:
    """Train loss and dev F1 per epoch, side by side."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(ep, [h["train_loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="train loss")
    b.plot(ep, [h["dev_f1"] for h in history], marker="o", color="C1")
    b.set(xlabel="epoch", ylabel="dev F1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- summary over seeds ---------------------------------------------------------------


def summarize(cfg: TrainConfig, runs: list[dict]) -> dict:
    """RUN/metrics.json: the per-seed records and their mean and std."""
    return {
        "model": cfg.model,
        "head": cfg.head,
        "profile": cfg.profile,
        "seeds": list(cfg.seeds),
        "summary": summarize_seeds(runs),
        "runs": runs,
    }
