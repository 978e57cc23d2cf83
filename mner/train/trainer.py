"""``mner train``: fine-tune encoder + head + CRF on cached features, one run per seed.

For each seed the loop is: AdamW (encoder and the rest at their own learning rates, no
decay on biases/LayerNorm), linear warmup then decay, gradient clipping, AMP on CUDA,
length-bucketed batches in a seeded order; after every epoch the dev split is decoded,
the best model by dev F1 kept, and a full checkpoint written atomically so ``--resume``
continues bit for bit. Test is decoded once, with the best model, at the end; it never
takes part in model selection. Nothing here is head-specific: heads are reached only
through ``mner.train.heads.base``.

Testing hook: ``MNER_STOP_AFTER_EPOCH=k`` raises ``KeyboardInterrupt`` right after the
checkpoint of epoch ``k`` is written, which is how the resume test interrupts a run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

import mner
from mner import devices
from mner.config import to_dict
from mner.devices import autocast, resolve_device
from mner.errors import CacheError, ConfigError, DataError
from mner.provenance import sha256_file
from mner.train import encoder as encoders
from mner.train.config import TrainConfig
from mner.train.data import NerDataset, TagSet, VisualStore, bucket_batches
from mner.train.evaluation import group_diagnostics, marked_for, predict_words, score_split
from mner.train.model import Tagger, build_head, param_groups

STOP_ENV = "MNER_STOP_AFTER_EPOCH"


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


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast precision (``fp32``, ``bf16`` or ``fp16``) for ``train.amp`` on ``device``.

    ``auto`` is bfloat16 on CUDA devices that support it, else float16; on CPU it is
    bfloat16 where oneDNN has native bfloat16 (AVX512-BF16, AMX: BERT-base trains about
    twice as fast there), else float32.

    Raises:
        ConfigError: ``fp16`` on CPU (float16 autocast there is slower than float32).
    """
    if amp == "off":
        return "fp32"
    if device.type == "cuda":
        return "bf16" if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()) else "fp16"
    if amp == "fp16":
        raise ConfigError(f"train.amp fp16 needs a CUDA device (running on {device.type}); use bf16, auto or off")
    if amp == "bf16":
        return "bf16"
    return "bf16" if devices.cpu_has_bf16() else "fp32"


def run_precision(cfg: TrainConfig, device: torch.device, out: Path, resume: bool) -> str:
    """The precision of a run: ``train.amp`` resolved here, or the recorded one on --resume.

    A resumed run keeps the precision its first half trained in (recorded in
    provenance.json), so ``--resume`` on another machine still reaches the same result.
    """
    prov = out / "provenance.json"
    if resume and prov.exists():
        recorded = json.loads(prov.read_text(encoding="utf-8")).get("precision")
        if recorded is not None:
            if recorded == "fp16" and device.type != "cuda":
                raise ConfigError(
                    f"{out}: this run trained in float16 on CUDA and cannot resume on {device.type}; "
                    "resume it on a CUDA machine or start a new run"
                )
            return recorded
    return resolve_amp(cfg.amp, device)


def open_cache(cfg: TrainConfig, features: Path | None):
    """Open and check the feature cache the head needs (None for text-only heads).

    Raises:
        CacheError: when the head needs features and none were given, the cache lacks a
            dataset, or it was extracted with another profile.
    """
    from mner.cache.reader import FeatureCache

    head_cls = cfg.head_class()
    needs = tuple(head_cls.required_features(cfg.head_config()))
    teacher = bool(head_cls.needs_text_teacher)
    if not needs and not teacher:
        return None, needs
    if features is None:
        what = ", ".join(needs) if needs else "clip_text"
        raise CacheError(
            f"model {cfg.model!r} reads cached features ({what}); pass --features "
            "cache/NAME.h5 made by `mner extract`"
        )
    cache = FeatureCache(features)
    cache.require(list(needs) + (["clip_text/sentence"] if teacher else []), expect={"profile": cfg.profile})
    return cache, needs


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


def _datasets(cfg, splits, tokenizer, tagset, cache, needs) -> dict[str, _Split]:
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
            [t.labels for t in tweets], visual, teacher,
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


def save_checkpoint(folder: Path, model, optimizer, scheduler, scaler, state: dict) -> None:
    """Write the full training state to ``folder`` atomically.

    Written into ``folder.tmp`` first, then swapped in by renames, so an interruption
    leaves either the previous or the new checkpoint, never a torn one.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(),
        },
        tmp / "state.pt",
    )
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, scheduler, scaler) -> dict | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; None when there is none."""
    if not (folder / "state.json").exists():
        old = folder.with_name(folder.name + ".old")  # interrupted between the renames
        if not (old / "state.json").exists():
            return None
        folder = old
    load_model(model, str(folder / "model.safetensors"))
    blob = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    return json.loads((folder / "state.json").read_text(encoding="utf-8"))


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -- one epoch ------------------------------------------------------------------------


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
) -> float:
    """One pass over ``batches``; returns the mean total loss.

    Args:
        batch_hook: optional ``f(batch) -> batch`` applied after collation (the
            training benchmark uses it to compute features per batch from images).
    """
    model.train()
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=dataset.collate, num_workers=num_workers
    )
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)
    for batch in bar:
        if batch_hook is not None:
            batch = batch_hook(batch)
        batch = batch.to(device)
        with autocast(device, precision):
            loss, _ = model.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()}; lower the learning rates")
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
        out: the run folder.
        resume: continue an interrupted run from its checkpoints (the config must
            match the one recorded in ``out/config.yaml``).
        overwrite: replace a run already in ``out`` (its seed folders and results).

    Returns:
        The contents of ``out/metrics.json``.
    """
    if cfg.threads is None:
        return _train_run(cfg, data, features, out, resume, overwrite)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_run(cfg, data, features, out, resume, overwrite)
    finally:
        torch.set_num_threads(before)


def _train_run(cfg: TrainConfig, data, features, out, resume: bool, overwrite: bool) -> dict:
    from mner.data.dataset import load_splits

    out = Path(out)
    features = Path(features) if features is not None else None
    splits = load_splits(data)
    for need in ("train", "valid"):
        if not splits.get(need):
            raise DataError(f"{data}: no {need} split (train.txt and valid.txt or dev.txt are needed)")
    cache, needs = open_cache(cfg, features)
    _prepare_out(cfg, out, resume, overwrite)
    data_dir = Path(data) if isinstance(data, (str, Path)) and Path(data).is_dir() else Path(splits["train"][0].source).parent
    device = resolve_device(cfg.device)
    precision = run_precision(cfg, device, out, resume)
    _write_provenance(cfg, out, splits, data_dir, cache, needs, precision)

    runs = []
    for seed in cfg.seeds:
        runs.append(
            train_seed(cfg, seed, splits, data_dir, cache, needs, out / f"seed_{seed}", resume, device, precision)
        )
    summary = summarize(cfg, runs)
    _atomic_json(out / "metrics.json", summary)
    return summary


#: What ``mner train`` writes in a run folder (``--overwrite`` removes exactly these).
RUN_FILES = ("config.yaml", "provenance.json", "metrics.json")


def _prepare_out(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool = False) -> None:
    cfg_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    path = out / "config.yaml"
    if overwrite and resume:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one")
    if overwrite and out.is_dir():
        # Only what mner train wrote: anything else the user keeps there stays.
        for seed_dir in out.glob("seed_*"):
            if seed_dir.is_dir():
                shutil.rmtree(seed_dir)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    if not resume and (any(out.glob("seed_*/checkpoint")) or (out / "metrics.json").exists()):
        raise ConfigError(
            f"{out}: already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out"
        )
    if resume and path.exists():
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
        new = to_dict(cfg)
        if old != new:
            diff = next(k for k in new if old.get(k) != new[k])
            raise ConfigError(
                f"{path}: --resume with a different config ({diff}: {old.get(diff)!r} before, "
                f"{new[diff]!r} now); use a new --out or the same settings"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg_yaml, encoding="utf-8")


def _write_provenance(cfg, out: Path, splits, data_dir: Path, cache, needs, precision: str) -> None:
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
        "mner_version": mner.__version__ if hasattr(mner, "__version__") else _version(),
    }
    if cache is not None:
        prov["cache"] = {
            "path": str(Path(cache.path).resolve()),
            "sha256": sha256_file(cache.path),
            "provenance": cache.provenance,
        }
        prov["feature_dims"] = feature_dims(cfg, cache, needs)
    _atomic_json(out / "provenance.json", json.loads(json.dumps(prov, default=str)))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mner")
    except PackageNotFoundError:
        return "unknown"


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


def build_model(cfg: TrainConfig, seed: int, enc, tagset: TagSet, feature_dims: dict) -> Tagger:
    """Head + emissions + CRF on top of ``enc``, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(cfg, enc, feature_dims)
        return Tagger(enc, head, tagset.names, cfg.dropout)


def train_seed(
    cfg, seed, splits, data_dir, cache, needs, seed_dir: Path, resume: bool, device: torch.device, precision: str
) -> dict:
    """Train, select on dev, and evaluate one seed; returns its metrics record."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # dvclive must not phone home
    from dvclive import Live

    from mner.data.conll import write_conll

    metrics_path = seed_dir / "metrics.json"
    if resume and metrics_path.exists():
        return json.loads(metrics_path.read_text(encoding="utf-8"))
    seed_everything(seed, cfg.deterministic)
    seed_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = seed_dir / "checkpoint"

    # The encoder folder is written once; a resumed run reloads its tokenizer instead of
    # re-training it, so the vocabulary cannot drift between the two halves of a run.
    enc_dir = seed_dir / "encoder"
    if resume and (enc_dir / "config.json").exists():
        enc, tokenizer = encoders.load_saved(enc_dir)
    elif cfg.is_tiny_encoder:
        enc, tokenizer = encoders.build_tiny([t.tokens for t in splits["train"]], seed, cfg.max_length)
    else:
        enc, tokenizer = encoders.load_pretrained(cfg.encoder)
    encoders.save(enc, tokenizer, enc_dir)
    types = {lab[2:] for t in splits["train"] for lab in t.labels if lab != "O"}
    tagset = TagSet(cfg.resolved_scheme(), types)
    tagset.save(seed_dir / "labels.json")

    model = build_model(cfg, seed, enc, tagset, feature_dims(cfg, cache, needs)).to(device)
    sets = _datasets(cfg, splits, tokenizer, tagset, cache, needs)
    train_ds = sets["train"].dataset

    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model, cfg)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0, "stopped": False, "history": []}
    if resume:
        loaded = load_checkpoint(ckpt_dir, model, optimizer, scheduler, scaler)
        if loaded is not None:
            state = loaded
    elif ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)

    live = Live(
        dir=str(seed_dir / "dvclive"),
        resume=resume and state["epoch"] > 0,
        save_dvc_exp=False,
        dvcyaml=False,  # never touch the project's dvc.yaml from inside a training run
    )
    try:
        stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
        while state["epoch"] < cfg.epochs and not state["stopped"]:
            epoch = state["epoch"] + 1
            # The batch order depends only on (seed, epoch), so a resumed run sees the
            # same batches without carrying a sampler state.
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            batches = bucket_batches(train_ds.lengths(), cfg.batch_size, cfg.bucket_size, gen)
            t0 = time.perf_counter()
            loss = train_epoch(
                model, train_ds, batches, optimizer, scheduler, scaler, device, precision,
                cfg.grad_clip, cfg.num_workers, desc=f"seed {seed} epoch {epoch}/{cfg.epochs}",
            )
            seconds = time.perf_counter() - t0
            dev = _eval_split(model, sets["valid"], tagset, device, precision, cfg, data_dir)
            f1 = dev["overall"]["f1"]
            state["history"].append({"epoch": epoch, "train_loss": loss, "dev_f1": f1, "seconds": seconds})
            if f1 > state["best_f1"]:
                state.update(best_f1=f1, best_epoch=epoch, bad_epochs=0)
                save_model(model, str(seed_dir / "model.safetensors.partial"))
                os.replace(seed_dir / "model.safetensors.partial", seed_dir / "model.safetensors")
            else:
                state["bad_epochs"] += 1
                if cfg.patience and state["bad_epochs"] >= cfg.patience:
                    state["stopped"] = True
            state["epoch"] = epoch
            live.log_metric("train/loss", loss)
            live.log_metric("dev/f1", f1)
            live.log_metric("epoch_seconds", seconds)
            live.next_step()
            save_checkpoint(ckpt_dir, model, optimizer, scheduler, scaler, state)
            if stop_after and epoch == stop_after:
                raise KeyboardInterrupt(f"{STOP_ENV}={stop_after}")
        _plot_history(state["history"], seed_dir / "history.png")
    finally:
        live.end()

    _atomic_json(seed_dir / "history.json", state["history"])
    # Final evaluation with the best model; test is touched here only.
    load_model(model, str(seed_dir / "model.safetensors"))
    record = {"seed": seed, "best_epoch": state["best_epoch"]}
    for split, key in (("valid", "dev"), ("test", "test")):
        if split not in sets:
            record[key] = None
            continue
        sp = sets[split]
        tags, diags = predict_words(model, sp.dataset, device, cfg.eval_batch_size, precision)
        pred = [tagset.decode(t) for t in tags]
        write_conll(seed_dir / f"pred_{split}.txt", sp.tweets, pred, scheme="bio2")
        record[key] = score_split(
            [list(t.labels) for t in sp.tweets], pred, marked_for(data_dir, split, sp.tweets)
        )
        if split == "test":
            statuses = cache.status_of([t.image_id for t in sp.tweets]) if cache is not None else ["missing"] * len(sp.tweets)
            _atomic_json(seed_dir / "diagnostics.json", group_diagnostics(diags, statuses))
    if "test" not in sets:
        _atomic_json(seed_dir / "diagnostics.json", {})
    secs = [h["seconds"] for h in state["history"]]
    record["seconds_per_epoch"] = float(np.mean(secs)) if secs else 0.0
    _atomic_json(metrics_path, record)
    return record


def _eval_split(model, split: _Split, tagset, device, precision, cfg, data_dir) -> dict:
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


def _mean_std(values: list) -> dict | None:
    if any(v is None for v in values):
        return None
    if isinstance(values[0], dict):
        return {k: _mean_std([v[k] for v in values]) for k in values[0]}
    arr = np.asarray(values, dtype=float)
    # Sample standard deviation over seeds (0 for a single seed).
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def summarize(cfg: TrainConfig, runs: list[dict]) -> dict:
    """RUN/metrics.json: the per-seed records and their mean and std."""
    return {
        "model": cfg.model,
        "head": cfg.head,
        "profile": cfg.profile,
        "seeds": list(cfg.seeds),
        "summary": {
            "dev": _mean_std([r["dev"] for r in runs]),
            "test": _mean_std([r["test"] for r in runs]),
            "seconds_per_epoch": _mean_std([r["seconds_per_epoch"] for r in runs]),
        },
        "runs": runs,
    }
