"""Per dataset: the test predictions of every row, the paired tests against the baseline,
and the cases of the case-study page (:mod:`mner.report.significance`,
:mod:`mner.report.cases`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mner.report.cases import Case, build_cases
from mner.report.config import ReportConfig
from mner.report.predictions import RowPredictions, TestSet, find_test_set, row_predictions
from mner.report.significance import compare_rows
from mner.report.tables import Table

log = logging.getLogger("mner.report")


@dataclass
class DatasetComparison:
    """What the report knows about one dataset's test predictions.

    Attributes:
        dataset: the table's dataset.
        test: the gold test split, or None (``reason`` says why).
        rows: the rows with usable predictions, in table order.
        baseline: the baseline row's label, or None.
        reason: why there is no test set, or no baseline ("" otherwise).
        significance: ``{label: {"pooled": Comparison, "per_seed": [...]}}``.
        cases: the case-study cases, most instructive first.
        missing: ``"label: seed k: reason"`` for predictions that could not be used.
    """

    dataset: str
    test: TestSet | None = None
    rows: list[RowPredictions] = field(default_factory=list)
    baseline: str | None = None
    reason: str = ""
    significance: dict[str, dict[str, Any]] = field(default_factory=dict)
    cases: list[Case] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_dict(self, cfg: ReportConfig) -> dict[str, Any]:
        """The ``significance`` entry of results.json."""
        return {
            "baseline": self.baseline,
            "reason": self.reason or None,
            "test_file": str(self.test.path) if self.test else None,
            "resamples": cfg.resamples,
            "confidence": 0.95,
            "seed": cfg.seed,
            "method": "paired bootstrap over test tweets (percentile 95 % CI) and approximate "
                      "randomization (two-sided p), per seed pair and pooled over seed pairs",
            "rows": [
                {
                    "label": label,
                    "pooled": comp["pooled"].to_dict(),
                    "per_seed": [c.to_dict() for c in comp["per_seed"]],
                }
                for label, comp in self.significance.items()
            ],
            "missing_predictions": self.missing,
        }


def baseline_index(rows: list[RowPredictions], table: Table, name: str) -> int | None:
    """The baseline row: the head ``name`` without ablation switches, else the row labelled
    ``name``."""
    by_label = {r.label: k for k, r in enumerate(rows)}
    for row in table.rows:
        if row.run.model == name and not row.run.head_diff and row.label in by_label:
            return by_label[row.label]
    return by_label.get(name)


def compare_dataset(cfg: ReportConfig, table: Table) -> DatasetComparison:
    """Read the test predictions of a table's rows and run what ``cfg`` asks for."""
    out = DatasetComparison(table.dataset)
    test, reason = find_test_set(table.runs, "test", cfg.data)
    if test is None:
        out.reason = reason  # said in results.md and in mner report's summary line
        log.info("%s: no significance tests or cases: %s", table.dataset, reason)
        return out
    out.test = test
    for row in table.rows:
        preds = row_predictions(row.run, test)
        out.missing += [f"{row.label}: {m}" for m in preds.missing]
        if preds.seeds:
            out.rows.append(preds)
    base = baseline_index(out.rows, table, cfg.baseline)
    if base is None:
        out.reason = (f"no {cfg.baseline} row with test predictions; set report.baseline to "
                      "one of: " + ", ".join(r.label for r in out.rows))
    else:
        out.baseline = out.rows[base].label
        if cfg.significance:
            for k, row in enumerate(out.rows):
                if k == base:
                    continue
                comp = compare_rows(row, out.rows[base], test, resamples=cfg.resamples, seed=cfg.seed)
                if comp is not None:
                    out.significance[row.label] = comp
    if cfg.cases and out.rows:
        out.cases = build_cases(test, out.rows, base)
    return out
