"""The run folder: its layout, reading and writing it, seed summaries, rebuilding a model.

The one module that knows what ``mner train --out RUN`` holds (docs/ARCHITECTURE.md,
"Run folder")::

    RUN/config.yaml          the TrainConfig, every default filled in
    RUN/provenance.json      data files and cache (sha256), precision, mner version, coverage
    RUN/metrics.json         per-seed records and their mean and std (written last)
    RUN/seed_<k>/            model.safetensors, labels.json, encoder/, checkpoint/,
                             metrics.json, history.json, diagnostics.json, pred_*.txt, ...

The trainer writes through it, ``mner evaluate`` / ``mner predict`` load a trained seed
through :func:`load_run` (which rebuilds the model with :func:`build_model`, the path
training uses), and the report reads seed summaries with :func:`mean_std`. Every JSON/YAML
file is written atomically (a temporary file renamed over the old one), and a write that
fails (disk full, file-size limit, read-only folder) is one line naming the file.

Only NumPy, YAML and the standard library are imported at module level, so the report
can use this module without loading torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mner.errors import ConfigError, DataError, MnerError

CONFIG = "config.yaml"
PROVENANCE = "provenance.json"
METRICS = "metrics.json"
#: What ``mner train`` writes at the top of a run folder (``--overwrite`` removes exactly
#: these and the ``seed_*`` folders).
RUN_FILES = (CONFIG, PROVENANCE, METRICS)


class RunWriteError(MnerError):
    """A file of a run folder could not be written (disk full, size limit, permissions)."""


def write_failed(path: Path, exc: OSError) -> RunWriteError:
    """The one-line error for a failed write of ``path`` (the caller raises it)."""
    return RunWriteError(
        f"{path}: cannot write ({exc.strerror or exc}); free disk space or raise the "
        "file-size limit, or choose another --out, then run again (add --resume to continue)"
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``PATH.partial`` and a rename.

    Raises:
        RunWriteError: the write failed; ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from None


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> Any:
    """Parse a run folder's JSON file; a damaged file is one line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); the run folder is damaged: "
            "train it again (--overwrite)"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


# -- layout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedFolder:
    """``RUN/seed_<k>/``: one seed's model, checkpoint and results."""

    path: Path

    @property
    def model(self) -> Path:
        """The best model on dev (safetensors), replaced whenever dev F1 improves."""
        return self.path / "model.safetensors"

    @property
    def labels(self) -> Path:
        return self.path / "labels.json"

    @property
    def encoder(self) -> Path:
        """The encoder's config and tokenizer (its weights are in :attr:`model`)."""
        return self.path / "encoder"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def history(self) -> Path:
        return self.path / "history.json"

    @property
    def diagnostics(self) -> Path:
        return self.path / "diagnostics.json"

    @property
    def plot(self) -> Path:
        return self.path / "history.png"

    @property
    def dvclive(self) -> Path:
        return self.path / "dvclive"

    def predictions(self, split: str) -> Path:
        return self.path / f"pred_{split}.txt"


@dataclass(frozen=True)
class RunFolder:
    """The folder ``mner train --out`` writes."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def provenance(self) -> Path:
        return self.root / PROVENANCE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    def seed(self, seed: int) -> SeedFolder:
        return SeedFolder(self.root / f"seed_{seed}")

    def seeds(self) -> list[tuple[int, SeedFolder]]:
        """The ``seed_<k>`` folders present, by seed."""
        found = []
        for p in self.root.glob("seed_*"):
            m = re.fullmatch(r"seed_(\d+)", p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), SeedFolder(p)))
        return sorted(found, key=lambda kv: kv[0])

    # -- reading and writing

    def read_config_dict(self) -> dict:
        """``config.yaml`` as a plain mapping ({} when absent)."""
        if not self.config.exists():
            return {}
        try:
            return yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{self.config}: not valid YAML ({exc}); train the run again (--overwrite)") from None

    def read_config(self):
        """The run's :class:`~mner.train.config.TrainConfig`.

        Raises:
            ConfigError: no ``config.yaml`` (not a run folder) or one that does not validate.
        """
        from mner.config import build
        from mner.train.config import TrainConfig

        if not self.config.exists():
            raise ConfigError(f"{self.root}: no config.yaml; is this a run folder written by `mner train`?")
        return build(TrainConfig, self.read_config_dict(), where=str(self.config))

    def write_config(self, cfg) -> None:
        from mner.config import to_dict

        write_text_atomic(self.config, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def read_provenance(self) -> dict:
        """``provenance.json`` ({} when absent)."""
        return read_json(self.provenance) if self.provenance.exists() else {}

    def write_provenance(self, prov: dict) -> None:
        # Paths and other non-JSON values as strings, as every run folder has them.
        write_json(self.provenance, json.loads(json.dumps(prov, default=str)))

    def read_metrics(self) -> dict | None:
        return read_json(self.metrics) if self.metrics.exists() else None

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics, metrics)

    def recorded_precision(self) -> str | None:
        """The precision the run trained in, as provenance.json records it (None: not recorded)."""
        return self.read_provenance().get("precision") if self.provenance.exists() else None

    # -- picking a seed

    def best_seed(self, seed: int | None = None) -> SeedFolder:
        """``seed_<seed>``; by default the seed with the best dev F1 in ``metrics.json``.

        Without ``metrics.json`` (an unfinished run), the lowest seed with a model.

        Raises:
            ConfigError: the seed has no model, or no seed has one.
        """
        if seed is not None:
            d = self.seed(seed)
            if not d.model.exists():
                raise ConfigError(f"{d.path}: no trained model for seed {seed}; see {self.metrics}")
            return d
        metrics = self.read_metrics()
        runs = (metrics or {}).get("runs", [])
        if runs:
            best = max(runs, key=lambda r: r["dev"]["overall"]["f1"])
            return self.seed(best["seed"])
        trained = [d for _, d in self.seeds() if d.model.exists()]
        if not trained:
            raise ConfigError(
                f"{self.root}: not a trained run folder (no seed_*/model.safetensors); run `mner train` first"
            )
        return trained[0]


# -- seed summaries ---------------------------------------------------------------------


def mean_std(values: list[Any]) -> Any:
    """Mean and sample std over seeds of numbers, or of records key by key.

    Nested mappings are summarised key by key; a value that is None (e.g.
    ``image_dependent`` without marks) or missing for any seed gives None. Numbers become
    ``{"mean", "std"}`` with the sample std (ddof=1), 0 for one seed. Both ``mner train``
    (``metrics.json`` ``summary``) and the report (pooling run folders) use this.
    """
    if not values or any(v is None for v in values):
        return None
    if isinstance(values[0], Mapping):
        if not all(isinstance(v, Mapping) for v in values):
            return None
        return {
            k: mean_std([v.get(k) for v in values]) if all(k in v for v in values) else None
            for k in values[0]
        }
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return None
    if arr.ndim != 1:
        return None
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def summarize_seeds(records: list[dict]) -> dict:
    """The ``summary`` of ``metrics.json``: dev, test and seconds per epoch over seeds."""
    return {
        "dev": mean_std([r.get("dev", r.get("valid")) for r in records]),
        "test": mean_std([r.get("test") for r in records]),
        "seconds_per_epoch": mean_std([r.get("seconds_per_epoch") for r in records]),
    }


def default_head_options(model: str) -> dict[str, Any] | None:
    """The default options of head ``model`` from the registry; None if it is unknown."""
    from mner.config import to_dict
    from mner.train.heads.base import get_head

    try:
        return to_dict(get_head(model).Config())
    except ConfigError:
        return None


# -- rebuilding a model -------------------------------------------------------------------


def build_model(cfg, seed: int, enc, tagset, feature_dims: dict):
    """Head + emissions + CRF on top of ``enc``, initialised from ``seed``.

    The one build path: training builds its model here, and :func:`load_run` rebuilds a
    trained one here before loading its weights, so the two always have the same tensors.
    The head is built on a private RNG state (seeded with ``seed``), so building it does
    not shift the run's global RNG stream.
    """
    import torch

    from mner.train.model import Tagger, build_head

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(cfg, enc, feature_dims)
        return Tagger(
            enc, head, tagset.names, cfg.dropout,
            cross_view_weight=cfg.cross_view_weight if cfg.cross_view else 0.0, decode_view=cfg.decode_view,
        )


def load_weights(model, path: Path, *, strict: bool = True) -> tuple[list, list]:
    """Load a ``model.safetensors`` into ``model``; a damaged file is one line.

    Returns:
        ``(missing, unexpected)`` tensor names (empty with ``strict``).

    Raises:
        DataError: the file is missing, truncated or not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        return load_model(model, str(path), strict=strict)
    except (SafetensorError, OSError, EOFError) as exc:
        raise DataError(
            f"{path}: damaged or truncated model file ({str(exc).splitlines()[0][:120]}); "
            "train the run again (or --resume it, if it was interrupted)"
        ) from None


@dataclass
class LoadedRun:
    """A trained seed of a run folder, ready to decode.

    Attributes:
        precision: the autocast precision to decode in: the one the run trained and was
            scored in, replayed on this device (:func:`mner.devices.replay_precision`:
            float16 becomes float32 off CUDA, with a warning).
    """

    run: Path
    seed_dir: Path
    cfg: Any
    model: Any
    tokenizer: object
    tagset: Any
    provenance: dict
    device: Any
    precision: str = "fp32"

    @property
    def needs(self) -> tuple[str, ...]:
        """The cached feature datasets the head reads."""
        return tuple(self.cfg.head_class().required_features(self.cfg.head_config()))

    @property
    def cache_path(self) -> Path | None:
        """The cache the run was trained on, as provenance.json records it."""
        p = (self.provenance.get("cache") or {}).get("path")
        return Path(p) if p else None


def pick_seed_dir(run: Path, seed: int | None = None) -> Path:
    """``RUN/seed_<seed>``; by default the seed with the best dev F1 (see :meth:`RunFolder.best_seed`)."""
    return RunFolder(run).best_seed(seed).path


def load_run(run: Path, seed: int | None = None, device: str = "auto") -> LoadedRun:
    """Rebuild a trained tagger from a run folder, through the training build path.

    Args:
        run: the folder ``mner train --out`` wrote.
        seed: which seed's model; default the best on dev.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.

    Raises:
        ConfigError: not a run folder, or a model that does not fit the recorded head.
        DataError: a damaged model file.
    """
    from mner.devices import replay_precision, resolve_device
    from mner.train import encoder as encoders
    from mner.train.data import TagSet

    folder = RunFolder(run)
    cfg = folder.read_config()
    sf = folder.best_seed(seed)
    provenance = folder.read_provenance()
    tagset = TagSet.load(sf.labels)
    enc, tokenizer = encoders.load_saved(sf.encoder)
    seed_no = int(sf.path.name.split("_", 1)[1])
    model = build_model(cfg, seed_no, enc, tagset, provenance.get("feature_dims", {}))
    missing, unexpected = load_weights(model, sf.model, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{sf.model} does not fit head {cfg.model!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors); was the run "
            "written by another mner version?"
        )
    dev = resolve_device(device)
    model.to(dev).eval()
    precision = replay_precision(provenance.get("precision", "fp32"), dev, exact=False, where=str(folder.root))
    return LoadedRun(folder.root, sf.path, cfg, model, tokenizer, tagset, provenance, dev, precision)
