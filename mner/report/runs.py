"""Reading run folders (written by ``mner train``) into what the report needs.

A run folder (docs/ARCHITECTURE.md, "Run folder") holds ``metrics.json`` (the summary
over seeds), ``config.yaml``, ``provenance.json`` and ``seed_<k>/history.json`` and
``seed_<k>/diagnostics.json``. What the report reads:

* ``metrics.json``: ``model``, ``head``, ``profile``, ``seeds``, ``summary`` and ``runs``.
  A folder without it is skipped with a warning (training unfinished or failed).
* the dataset name, first found of: ``provenance.json`` ``dataset.name`` (or
  ``dataset`` as a plain string), ``config.yaml`` ``dataset_name`` or ``dataset``
  (string or mapping with ``name``); else ``unknown``;
* ``config.yaml`` ``head`` (falling back to ``metrics.json`` ``head``) to name ablations;
* ``provenance.json`` for the report's provenance section (see :func:`provenance_of`);
* ``seed_<k>/history.json`` for the dev-F1 curves and ``seed_<k>/diagnostics.json``
  for the gate/relevance histograms; both optional.

A path with no ``metrics.json`` whose sub-folders have one (``runs/``) stands for those
sub-folders, so ``mner report runs/`` works as well as ``mner report runs/*``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mner.errors import DataError


@dataclass
class Run:
    """One run folder as the report sees it.

    Attributes:
        path: the run folder.
        model: head registry name (``metrics.json`` ``model``).
        dataset: dataset name (see module docstring).
        metrics: ``metrics.json`` as parsed.
        config: ``config.yaml`` as parsed ({} if absent).
        provenance: ``provenance.json`` as parsed ({} if absent).
        histories: seed -> ``history.json`` rows.
        diagnostics: seed -> ``diagnostics.json`` ({name: {status: [values]}}).
        head_diff: head options that differ from the head's defaults (the ablation).
        label: the table row label, e.g. ``maf (no_cm=true)``; set by :func:`assign_labels`.
    """

    path: Path
    model: str
    dataset: str
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    histories: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    diagnostics: dict[int, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    head_diff: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def head(self) -> dict[str, Any]:
        """The head options used (config.yaml, else metrics.json)."""
        head = self.config.get("head")
        if not isinstance(head, Mapping):
            head = self.metrics.get("head")
        return dict(head) if isinstance(head, Mapping) else {}

    @property
    def profile(self) -> str | None:
        """``tiny`` / ``paper`` as recorded by the run."""
        return (
            self.metrics.get("profile")
            or self.provenance.get("profile")
            or self.config.get("profile")
        )


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Expand the command-line paths into candidate run folders, in the order given."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir() and not (p / "metrics.json").exists() and not _looks_like_run(p):
            children = sorted(
                c
                for c in p.iterdir()
                if c.is_dir() and ((c / "metrics.json").exists() or _looks_like_run(c))
            )
            if children:
                out.extend(children)
                continue
        out.append(p)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _looks_like_run(p: Path) -> bool:
    return (p / "config.yaml").exists() or any(p.glob("seed_*"))


def load_runs(paths: Sequence[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Read run folders.

    Args:
        paths: run folders, or folders of run folders.

    Returns:
        ``(runs, skipped)``: the usable runs, and ``(path, reason)`` for each folder
        left out (missing, or without ``metrics.json``).

    Raises:
        DataError: on a file that exists but is not valid JSON/YAML or lacks the
            fields the report needs; the message names the file and line.
    """
    runs: list[Run] = []
    skipped: list[tuple[Path, str]] = []
    for path in find_run_dirs(paths):
        if not path.is_dir():
            skipped.append((path, "not a folder" if path.exists() else "no such folder"))
            continue
        if not (path / "metrics.json").is_file():
            skipped.append((path, "no metrics.json (training not finished?)"))
            continue
        runs.append(load_run(path))
    return runs, skipped


def load_run(path: Path) -> Run:
    """Read one run folder that has a ``metrics.json``."""
    metrics = read_json(path / "metrics.json")
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("model"), str):
        raise DataError(
            f"{path / 'metrics.json'}: no 'model' name; is this a run folder written by mner train?"
        )
    summary = metrics.get("summary")
    if not isinstance(summary, Mapping) and not metrics.get("runs"):
        raise DataError(
            f"{path / 'metrics.json'}: neither 'summary' nor 'runs'; re-run mner train for this folder"
        )
    config = read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
    prov = read_json(path / "provenance.json") if (path / "provenance.json").is_file() else {}
    run = Run(
        path=path,
        model=metrics["model"],
        dataset=_dataset_name(prov, config),
        metrics=dict(metrics),
        config=dict(config) if isinstance(config, Mapping) else {},
        provenance=dict(prov) if isinstance(prov, Mapping) else {},
    )
    for seed_dir in sorted(path.glob("seed_*"), key=_seed_key):
        seed = _seed_key(seed_dir)
        if seed is None:
            continue
        if (seed_dir / "history.json").is_file():
            hist = read_json(seed_dir / "history.json")
            if isinstance(hist, list):
                run.histories[seed] = [h for h in hist if isinstance(h, Mapping)]
        if (seed_dir / "diagnostics.json").is_file():
            diag = read_json(seed_dir / "diagnostics.json")
            if isinstance(diag, Mapping):
                run.diagnostics[seed] = {
                    str(k): {str(s): list(v) for s, v in d.items() if isinstance(v, list)}
                    for k, d in diag.items()
                    if isinstance(d, Mapping)
                }
    run.head_diff = _head_diff(run)
    return run


def _seed_key(p: Path) -> int | None:
    m = re.fullmatch(r"seed_(\d+)", p.name)
    return int(m.group(1)) if m else None


def _dataset_name(prov: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    for source, keys in ((prov, ("dataset",)), (config, ("dataset_name", "dataset"))):
        if not isinstance(source, Mapping):
            continue
        for key in keys:
            value = source.get(key)
            if isinstance(value, Mapping):
                value = value.get("name")
            if isinstance(value, str) and value.strip():
                return value.strip()
    return "unknown"


def default_head_options(model: str) -> dict[str, Any] | None:
    """The head's default options from the registry, or None if it is not available."""
    try:
        from mner.pipeline.config import to_dict
        from mner.train.heads.base import get_head

        cfg_cls = get_head(model).Config
        return to_dict(cfg_cls())
    except Exception:  # noqa: BLE001 - a report must work without the training stack
        return None


def _head_diff(run: Run) -> dict[str, Any]:
    defaults = default_head_options(run.model)
    if defaults is None:
        return {}
    return {k: v for k, v in sorted(run.head.items()) if k in defaults and defaults[k] != v}


def format_value(v: Any) -> str:
    """A head option as written in a row label (YAML spelling: ``true``, ``0.1``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def assign_labels(runs: list[Run]) -> None:
    """Set :attr:`Run.label`: the model, plus the head options that differ from defaults.

    Where the registry is not importable, runs of one model that differ among
    themselves are told apart by the options that differ from the model's first run.
    Labels still equal after that (same model and options, e.g. another learning rate)
    get the run folder's name appended: ``umt [run_lr3e-5]``.
    """
    by_model: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        by_model.setdefault((r.dataset, r.model), []).append(r)
    for group in by_model.values():
        if default_head_options(group[0].model) is None and len(group) > 1:
            base = group[0].head
            for r in group[1:]:
                r.head_diff = {k: v for k, v in sorted(r.head.items()) if base.get(k) != v}
    for r in runs:
        opts = ", ".join(f"{k}={format_value(v)}" for k, v in r.head_diff.items())
        r.label = f"{r.model} ({opts})" if opts else r.model
    counts: dict[tuple[str, str], int] = {}
    for r in runs:
        counts[(r.dataset, r.label)] = counts.get((r.dataset, r.label), 0) + 1
    for r in runs:
        if counts[(r.dataset, r.label)] > 1:
            r.label = f"{r.label} [{r.path.name}]"


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file and line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); re-run mner train for this run "
            "or leave the folder out"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error names the file and line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise DataError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None


def provenance_of(run: Run) -> dict[str, Any]:
    """What can be traced about a run: data files, cache, profile, versions.

    Reads ``provenance.json`` leniently: data files from ``dataset.files`` (or
    ``data_files``), each ``{path: sha256}`` (or a list of ``{"path", "sha256"}``);
    the cache from ``cache`` (``path``, ``sha256``, ``profile``, and ``provenance``,
    the cache's root and per-group attributes, whose groups' ``model`` attributes
    name the vision models). A text-only run has no cache.

    Returns:
        ``{"profile", "mner_version", "data_files": {path: sha256}, "cache": {"path",
        "sha256", "profile", "models": {group: model}} | None, "run": str}``.
    """
    prov = run.provenance
    files: Any = None
    ds = prov.get("dataset")
    if isinstance(ds, Mapping):
        files = ds.get("files")
    if files is None:
        files = prov.get("data_files") or prov.get("data")
    data_files = _file_hashes(files)

    cache = prov.get("cache") or prov.get("features")
    cache_out = None
    if isinstance(cache, Mapping):
        cprov = cache.get("provenance") if isinstance(cache.get("provenance"), Mapping) else {}
        models = {
            str(g): str(attrs.get("model"))
            for g, attrs in sorted(cprov.items())
            if isinstance(attrs, Mapping) and attrs.get("model")
        }
        if isinstance(cache.get("models"), Mapping):
            models.update({str(k): str(v) for k, v in cache["models"].items()})
        cache_out = {
            "path": cache.get("path"),
            "sha256": cache.get("sha256"),
            "profile": cache.get("profile") or cprov.get("profile"),
            "schema_version": cprov.get("schema_version"),
            "models": models,
        }
    elif isinstance(cache, str):
        cache_out = {
            "path": cache,
            "sha256": None,
            "profile": None,
            "schema_version": None,
            "models": {},
        }
    return {
        "run": str(run.path),
        "profile": run.profile,
        "mner_version": prov.get("mner_version") or run.metrics.get("mner_version"),
        "data_files": data_files,
        "cache": cache_out,
    }


def _file_hashes(files: Any) -> dict[str, str | None]:
    if isinstance(files, Mapping):
        out = {}
        for k, v in files.items():
            if isinstance(v, Mapping):
                v = v.get("sha256")
            out[str(k)] = str(v) if v is not None else None
        return dict(sorted(out.items()))
    if isinstance(files, list):
        out = {}
        for item in files:
            if isinstance(item, Mapping) and item.get("path"):
                out[str(item["path"])] = item.get("sha256")
        return dict(sorted(out.items()))
    return {}


def as_dict(run: Run) -> dict[str, Any]:
    """A JSON-friendly identity of a run (no scores)."""
    return {
        "label": run.label,
        "model": run.model,
        "run": str(run.path),
        "profile": run.profile,
        "head_ablation": dict(run.head_diff),
        "seeds": list(run.metrics.get("seeds") or sorted(run.histories)),
    }
