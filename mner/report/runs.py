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

A path with no ``metrics.json`` stands for the run folders found below it, at any
depth (a search stops at a run folder), so ``mner report runs/`` works as well as
``mner report runs/*``, and for the DVC layout ``runs/<dataset>/<model>/seed<k>/``.

Folders are read one :class:`Run` each (:func:`load_runs`); :func:`pool_runs` then
merges the folders of one experiment into one :class:`Run`, i.e. one table row: same
dataset (name and data file sha256s), model, head options and training settings
(``config.yaml`` less the seeds and where it ran). Their per-seed records are
concatenated and the summary recomputed as ``mner train`` computes it (mean and sample
std, ddof=1, over all pooled seeds); histories and diagnostics are pooled by seed. A
seed present in two folders is kept once (from the first folder) with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mner.errors import DataError
from mner.train.runs import RunFolder, summarize_seeds

log = logging.getLogger("mner.report")

#: ``config.yaml`` keys that do not make two runs different experiments: the seeds
#: (what pooling is over), where and how fast it ran, the keys compared on their own
#: (model, profile, dataset, head) and the recipe record (who set the values compared).
POOL_IGNORED_CONFIG: frozenset[str] = frozenset(
    {"seeds", "device", "num_workers", "model", "profile", "dataset", "dataset_name", "head", "recipe"}
)


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
        members: the run folders pooled into this run by :func:`pool_runs` (empty for
            a run read from one folder, which then stands for itself).
        seed_folders: for a pooled run, seed -> the folder its record was taken from.
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
    members: list[Run] = field(default_factory=list)
    seed_folders: dict[Any, Path] = field(default_factory=dict)

    @property
    def folders(self) -> list[Run]:
        """The single-folder runs this row is made of (itself when not pooled)."""
        return list(self.members) if self.members else [self]

    def seeds_from(self, folder: Run) -> list[Any]:
        """The seeds of this row that come from ``folder`` (one of :attr:`folders`);
        empty for a folder whose seeds were all duplicates of earlier folders'."""
        if not self.members:
            return [s for s, _ in _seed_records(self)] or list(self.metrics.get("seeds") or [])
        return [s for s, p in self.seed_folders.items() if p == folder.path]

    @property
    def head(self) -> dict[str, Any]:
        """The head options used (config.yaml, else metrics.json)."""
        head = self.config.get("head")
        if not isinstance(head, Mapping):
            head = self.metrics.get("head")
        return dict(head) if isinstance(head, Mapping) else {}

    @property
    def recipe(self) -> str:
        """``paper`` / ``differs: ...`` / ``tiny profile`` / ``–``: the run's settings
        against its paper recipe, from config.yaml (see mner.train.config.recipe_mark)."""
        from mner.train.config import recipe_mark

        return recipe_mark(self.config, self.dataset)

    @property
    def profile(self) -> str | None:
        """``tiny`` / ``paper`` as recorded by the run."""
        return (
            self.metrics.get("profile")
            or self.provenance.get("profile")
            or self.config.get("profile")
        )


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Expand the command-line paths into candidate run folders, in the order given.

    A path that is not itself a run folder stands for the run folders below it, found
    at any depth (sorted by name; the search does not enter a run folder nor hidden
    folders). A path with none below it is returned as is, to be reported as skipped.
    """
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        found = _collect(p, set()) if p.is_dir() else []
        out.extend(found or [p])
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _collect(p: Path, visited: set[Path]) -> list[Path]:
    key = p.resolve()
    if key in visited:  # a symlink loop
        return []
    visited.add(key)
    if RunFolder(p).metrics.exists() or _looks_like_run(p):
        return [p]
    found: list[Path] = []
    for c in sorted(p.iterdir()):
        if c.is_dir() and not c.name.startswith("."):
            found.extend(_collect(c, visited))
    return found


def _looks_like_run(p: Path) -> bool:
    """A (maybe unfinished) run folder: ``config.yaml``, or ``seed_<k>/`` sub-folders
    that are per-seed folders rather than complete run folders of their own (those
    have a ``config.yaml``, as in ``runs/umt/seed_1/config.yaml``)."""
    if RunFolder(p).config.exists():
        return True
    return any(not RunFolder(sf.path).config.exists() for _, sf in RunFolder(p).seeds())


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
        if not RunFolder(path).metrics.is_file():
            skipped.append((path, "no metrics.json (training not finished?)"))
            continue
        runs.append(load_run(path))
    return runs, skipped


def load_run(path: Path) -> Run:
    """Read one run folder that has a ``metrics.json`` (layout: :class:`mner.train.runs.RunFolder`)."""
    folder = RunFolder(path)
    metrics = read_json(folder.metrics)
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("model"), str):
        raise DataError(
            f"{folder.metrics}: no 'model' name; is this a run folder written by mner train?"
        )
    summary = metrics.get("summary")
    if not isinstance(summary, Mapping) and not metrics.get("runs"):
        raise DataError(
            f"{path / 'metrics.json'}: neither 'summary' nor 'runs'; re-run mner train for this folder"
        )
    config = read_yaml(folder.config) if folder.config.is_file() else {}
    prov = read_json(folder.provenance) if folder.provenance.is_file() else {}
    run = Run(
        path=path,
        model=metrics["model"],
        dataset=_dataset_name(prov, config),
        metrics=dict(metrics),
        config=dict(config) if isinstance(config, Mapping) else {},
        provenance=dict(prov) if isinstance(prov, Mapping) else {},
    )
    for seed, seed_dir in folder.seeds():
        if seed_dir.history.is_file():
            hist = read_json(seed_dir.history)
            if isinstance(hist, list):
                run.histories[seed] = [h for h in hist if isinstance(h, Mapping)]
        if seed_dir.diagnostics.is_file():
            diag = read_json(seed_dir.diagnostics)
            if isinstance(diag, Mapping):
                run.diagnostics[seed] = {
                    str(k): {str(s): list(v) for s, v in d.items() if isinstance(v, list)}
                    for k, d in diag.items()
                    if isinstance(d, Mapping)
                }
    run.head_diff = _head_diff(run)
    return run


def _seed_records(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    """``(seed, record)`` for each per-seed record of ``metrics.json`` ``runs``."""
    seeds = run.metrics.get("seeds") or []
    out = []
    for i, rec in enumerate(run.metrics.get("runs") or []):
        if not isinstance(rec, Mapping):
            continue
        seed = rec.get("seed", seeds[i] if i < len(seeds) else None)
        out.append((seed, dict(rec)))
    return out


def data_files_key(run: Run) -> tuple[tuple[str, str | None], ...]:
    """The data files a run was trained on, as ``(file name, sha256)`` pairs.

    File names rather than full paths, so that the same files checked out elsewhere
    (another workspace, another machine) still match.
    """
    files = provenance_of(run)["data_files"]
    return tuple(sorted((Path(f).name, h) for f, h in files.items()))


def train_settings(run: Run) -> dict[str, Any]:
    """``config.yaml`` less :data:`POOL_IGNORED_CONFIG`: what must match to pool."""
    return {k: v for k, v in sorted(run.config.items()) if k not in POOL_IGNORED_CONFIG}


def pool_key(run: Run) -> str:
    """Runs with equal keys are seeds of one experiment and make one table row."""
    return json.dumps(
        [
            run.dataset,
            data_files_key(run),
            run.model,
            run.profile,
            run.head,
            train_settings(run),
        ],
        sort_keys=True,
        default=str,
    )


def pool_runs(runs: Sequence[Run]) -> list[Run]:
    """Merge the folders of one experiment (same :func:`pool_key`) into one run each.

    A group of one folder is returned unchanged. A group of several gives a :class:`Run`
    whose ``metrics.json`` has the concatenated per-seed records (sorted by seed), the
    pooled ``seeds``, and a ``summary`` recomputed over all of them with
    :func:`mner.train.runs.mean_std` (the trainer's own); ``histories`` and ``diagnostics`` are
    merged by seed, so plots average over every pooled seed. A seed found in two
    folders is kept from the first and a warning names both. A folder without per-seed
    records (``runs``) cannot be pooled and keeps its own row, with a warning.

    Returns:
        The pooled runs, in the order of each group's first folder.
    """
    keys = [pool_key(r) for r in runs]
    groups: dict[str, list[Run]] = {}
    for r, key in zip(runs, keys, strict=True):
        if not _seed_records(r):
            if keys.count(key) > 1:
                log.warning(
                    "not pooling %s with the other folders of its experiment: its "
                    "metrics.json has no per-seed records ('runs')",
                    r.path,
                )
            key = f"{key}\0{r.path}"  # its own row
        groups.setdefault(key, []).append(r)
    return [g[0] if len(g) == 1 else _merge(g) for g in groups.values()]


def _merge(group: list[Run]) -> Run:
    first = group[0]
    owner: dict[Any, Run] = {}
    records: list[tuple[Any, dict[str, Any]]] = []
    for r in group:
        for seed, rec in _seed_records(r):
            if seed is not None and seed in owner:
                log.warning(
                    "seed %s is in both %s and %s; keeping the one from %s",
                    seed,
                    owner[seed].path,
                    r.path,
                    owner[seed].path,
                )
                continue
            if seed is not None:
                owner[seed] = r
            records.append((seed, rec))
    # By seed (stable: records without an integer seed keep their order, last).
    records.sort(
        key=lambda sr: (not isinstance(sr[0], int), sr[0] if isinstance(sr[0], int) else 0)
    )
    recs = [rec for _, rec in records]
    histories: dict[int, list[dict[str, Any]]] = {}
    diagnostics: dict[int, dict[str, dict[str, list[float]]]] = {}
    for r in group:
        for seed, hist in r.histories.items():
            if owner.get(seed, r) is r and seed not in histories:
                histories[seed] = hist
        for seed, diag in r.diagnostics.items():
            if owner.get(seed, r) is r and seed not in diagnostics:
                diagnostics[seed] = diag
    seeds = [s for s, _ in records if s is not None]
    metrics = dict(first.metrics)
    metrics["seeds"] = seeds
    metrics["runs"] = recs
    metrics["summary"] = summarize_seeds(recs)
    try:
        path = Path(os.path.commonpath([str(r.path) for r in group]))
    except ValueError:  # relative and absolute paths mixed
        path = first.path
    config = dict(first.config)
    if "seeds" in config:
        config["seeds"] = seeds
    return Run(
        path=path,
        model=first.model,
        dataset=first.dataset,
        metrics=metrics,
        config=config,
        provenance=dict(first.provenance),
        histories=dict(sorted(histories.items())),
        diagnostics=dict(sorted(diagnostics.items())),
        head_diff=dict(first.head_diff),
        members=list(group),
        seed_folders={s: owner[s].path for s in seeds},
    )


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
        from mner.train.runs import default_head_options as registry_defaults

        return registry_defaults(model)
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
    Labels still equal after that (same model and head options, but another
    experiment, e.g. another learning rate) get the training settings that differ
    among them appended, ``umt [lr_encoder=3e-05]``; failing that (e.g. other data
    files), the run folder's name, ``umt [run_b]``.
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
    for suffix in (_settings_suffix, _folder_suffix):
        clashes: dict[tuple[str, str], list[Run]] = {}
        for r in runs:
            clashes.setdefault((r.dataset, r.label), []).append(r)
        for group in clashes.values():
            if len(group) > 1:
                for r, tag in zip(group, suffix(group), strict=True):
                    if tag:
                        r.label = f"{r.label} [{tag}]"


def _settings_suffix(group: list[Run]) -> list[str]:
    settings = [{**train_settings(r), "profile": r.profile} for r in group]
    keys = sorted({k for s in settings for k in s})
    differ = [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]
    return [", ".join(f"{k}={format_value(s.get(k))}" for k in differ) for s in settings]


def _folder_suffix(group: list[Run]) -> list[str]:
    """Each run's folder relative to the folder all of them are in (``sample/umt``)."""
    paths = [r.path for r in group]
    try:
        base = Path(os.path.commonpath([str(p) for p in paths]))
        names = [p.relative_to(base).as_posix() for p in paths]
    except ValueError:  # relative and absolute paths mixed
        names = [str(p) for p in paths]
    return [n if n not in ("", ".") else str(p) for n, p in zip(names, paths, strict=True)]


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
        "run_folders": [str(m.path) for m in run.folders],
        "profile": run.profile,
        "head_ablation": dict(run.head_diff),
        "seeds": list(run.metrics.get("seeds") or sorted(run.histories)),
    }
