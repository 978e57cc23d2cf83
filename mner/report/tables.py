"""Result tables: one per dataset, one row per model or ablation, in the papers' order.

Columns, as the papers print them: F1 of PER, LOC, ORG, MISC, then overall precision,
recall and F1 (entity level, conlleval), then the paper's reported F1 where the dataset
is Twitter-2015/2017, F1 on the image-dependent subset where the data marks one, and
seconds per training epoch. Every cell is ``mean ± std`` over seeds; the std is the
sample standard deviation (ddof=1) as ``mner train`` writes it in ``metrics.json``'s
``summary``, and a single seed shows the mean alone. Where a summary entry is absent
the value is computed from the per-seed records (``runs``) the same way. A row pooled
from several run folders (:func:`mner.report.runs.pool_runs`) carries a summary
recomputed over all its seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mner.report.paper_numbers import PAPER_ORDER, paper_dataset, paper_f1_of_run
from mner.report.runs import Run, as_dict

TYPES: tuple[str, ...] = ("PER", "LOC", "ORG", "MISC")

#: Stat key -> (path inside a split's R/S record, column header).
SCORE_PATHS: dict[str, tuple[tuple[str, ...], str]] = {
    "PER": (("per_type", "PER", "f1"), "PER"),
    "LOC": (("per_type", "LOC", "f1"), "LOC"),
    "ORG": (("per_type", "ORG", "f1"), "ORG"),
    "MISC": (("per_type", "MISC", "f1"), "MISC"),
    "precision": (("overall", "precision"), "P"),
    "recall": (("overall", "recall"), "R"),
    "f1": (("overall", "f1"), "F1"),
    "image_dependent_f1": (("image_dependent", "f1"), "img-dep F1"),
}


@dataclass(frozen=True)
class Stat:
    """A value over seeds.

    Attributes:
        mean: mean over seeds.
        std: sample standard deviation over seeds (0 for one seed).
        n: number of seeds.
    """

    mean: float
    std: float
    n: int

    def format(self, digits: int = 2) -> str:
        """``"73.41 ± 0.52"``, or ``"73.41"`` for a single seed."""
        if self.n <= 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class Row:
    """One table row.

    Attributes:
        run: the run it comes from.
        stats: score key (``PER`` ... ``f1``, ``image_dependent_f1``,
            ``seconds_per_epoch``, ``dev_f1``) -> :class:`Stat`, or None when unknown.
        per_seed: per-seed overall scores on the reported split, for the JSON.
        paper_f1: the paper's reported F1 (full models on Twitter-2015/2017 only).
    """

    run: Run
    stats: dict[str, Stat | None]
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    paper_f1: float | None = None

    @property
    def label(self) -> str:
        return self.run.label


@dataclass
class Table:
    """The rows of one dataset."""

    dataset: str
    rows: list[Row]
    paper_dataset: str | None

    @property
    def has_image_dependent(self) -> bool:
        return any(r.stats.get("image_dependent_f1") is not None for r in self.rows)

    @property
    def runs(self) -> list[Run]:
        return [r.run for r in self.rows]


def _get(node: Any, path: Sequence[str]) -> Any:
    for part in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _split_key(record: Mapping[str, Any], split: str) -> Any:
    if split in record:
        return record[split]
    alias = {"dev": "valid", "valid": "dev"}.get(split)
    return record.get(alias) if alias else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def stat_of(metrics: Mapping[str, Any], split: str | None, path: Sequence[str]) -> Stat | None:
    """Mean ± std of one score from a run's ``metrics.json``.

    Args:
        metrics: the parsed ``metrics.json``.
        split: ``test`` or ``dev``; None for run-level values (``seconds_per_epoch``).
        path: keys inside a split record, e.g. ``("overall", "f1")``.

    Returns:
        The :class:`Stat`, or None when no seed has the value.
    """
    seeds = [r for r in metrics.get("runs") or [] if isinstance(r, Mapping)]
    per_seed = []
    for r in seeds:
        v = _get(_split_key(r, split) if split else r, path)
        if _finite(v):
            per_seed.append(float(v))
    summary = metrics.get("summary") or {}
    node = _get(_split_key(summary, split) if split else summary, path)
    n = len(per_seed) or len(metrics.get("seeds") or []) or 1
    if isinstance(node, Mapping) and _finite(node.get("mean")):
        std = node.get("std")
        return Stat(float(node["mean"]), float(std) if _finite(std) else 0.0, n)
    if _finite(node):  # a plain number where a summary was expected
        return Stat(float(node), 0.0, n)
    if not per_seed:
        return None
    arr = np.asarray(per_seed)
    return Stat(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr))


def row_of(run: Run, split: str, include_paper: bool) -> Row:
    """The table row of one run."""
    stats: dict[str, Stat | None] = {
        key: stat_of(run.metrics, split, path) for key, (path, _) in SCORE_PATHS.items()
    }
    stats["seconds_per_epoch"] = stat_of(run.metrics, None, ("seconds_per_epoch",))
    stats["dev_f1"] = stat_of(run.metrics, "dev", ("overall", "f1"))
    per_seed = []
    for r in run.metrics.get("runs") or []:
        rec = _split_key(r, split) if isinstance(r, Mapping) else None
        if not isinstance(rec, Mapping):
            continue
        per_seed.append(
            {
                "seed": r.get("seed"),
                "best_epoch": r.get("best_epoch"),
                "precision": _get(rec, ("overall", "precision")),
                "recall": _get(rec, ("overall", "recall")),
                "f1": _get(rec, ("overall", "f1")),
                "image_dependent_f1": _get(rec, ("image_dependent", "f1")),
            }
        )
    # The paper's number is for the full model only; an ablation row gets none.
    paper = paper_f1_of_run(run.dataset, run.model, run.config) if include_paper and not run.head_diff else None
    return Row(run=run, stats=stats, per_seed=per_seed, paper_f1=paper)


def _order_key(row: Row) -> tuple:
    model = row.run.model
    rank = PAPER_ORDER.index(model) if model in PAPER_ORDER else len(PAPER_ORDER)
    return (rank, model, bool(row.run.head_diff), row.label)


def build_tables(
    runs: Sequence[Run], split: str = "test", include_paper: bool = True
) -> list[Table]:
    """Group runs by dataset and build one :class:`Table` each (datasets sorted by name).

    Rows follow the papers' model order (BERT-CRF, UMT, MGC, BFCL, MAF, MGIPS-CL,
    HamLearning, then other models alphabetically); each model's ablations follow it.
    """
    by_ds: dict[str, list[Run]] = {}
    for run in runs:
        by_ds.setdefault(run.dataset, []).append(run)
    tables = []
    for ds in sorted(by_ds):
        canon = paper_dataset(ds) if include_paper else None
        rows = sorted((row_of(r, split, include_paper) for r in by_ds[ds]), key=_order_key)
        tables.append(Table(dataset=ds, rows=rows, paper_dataset=canon))
    return tables


def columns(table: Table) -> list[tuple[str, str]]:
    """``(key, header)`` pairs of a table's columns, in order."""
    cols = [("label", "model")]
    cols += [
        (k, SCORE_PATHS[k][1]) for k in ("PER", "LOC", "ORG", "MISC", "precision", "recall", "f1")
    ]
    if table.paper_dataset:
        cols.append(("paper_f1", "paper F1"))
    if table.has_image_dependent:
        cols.append(("image_dependent_f1", "img-dep F1"))
    cols += [("seconds_per_epoch", "s/epoch"), ("seeds", "seeds")]
    # Settings against the paper recipe, when a row trained with the paper profile.
    if any(r.run.recipe not in ("tiny profile", "–") for r in table.rows):
        cols.append(("recipe", "recipe"))
    return cols


def markdown_table(table: Table, digits: int = 2) -> str:
    """The Markdown table of one dataset."""
    cols = columns(table)
    lines = [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "|".join(":---" if k == "label" else "---:" for k, _ in cols) + "|",
    ]
    for row in table.rows:
        cells = []
        for key, _ in cols:
            if key == "label":
                cells.append(row.label.replace("|", "\\|"))
            elif key == "paper_f1":
                cells.append(f"{row.paper_f1:.2f}" if row.paper_f1 is not None else "–")
            elif key == "recipe":
                cells.append(row.run.recipe.replace("|", "\\|"))
            elif key == "seeds":
                f1 = row.stats.get("f1")
                cells.append(str(f1.n) if f1 else str(len(row.run.metrics.get("seeds") or [])))
            else:
                stat = row.stats.get(key)
                d = 1 if key == "seconds_per_epoch" else digits
                cells.append(stat.format(d) if stat is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def row_dict(row: Row) -> dict[str, Any]:
    """A row as JSON: identity, every stat as ``{mean, std, n}``, per-seed values."""
    # identity as in as_dict, but labelled as the row (pooled rows may be relabelled)
    return {
        **as_dict(row.run),
        "label": row.label,
        "scores": {k: (v.to_dict() if v is not None else None) for k, v in row.stats.items()},
        "paper_f1": row.paper_f1,
        "recipe": row.run.recipe,
        "per_seed": row.per_seed,
    }


def dvc_metrics(tables: Sequence[Table]) -> dict[str, dict[str, dict[str, float]]]:
    """``{dataset: {label: {"f1", "precision", "recall", "image_dependent_f1"}}}`` (means).

    Shaped for ``dvc metrics show``; a score that is unknown is left out rather than
    written as null, which DVC would show as a value.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in tables:
        ds = out.setdefault(t.dataset, {})
        for row in t.rows:
            entry = {}
            for key in ("f1", "precision", "recall", "image_dependent_f1"):
                stat = row.stats.get(key)
                if stat is not None:
                    entry[key] = round(stat.mean, 4)
            ds[row.label] = entry
    return out
