"""Report plots (matplotlib, Agg backend, PNG) and the CSV that ``dvc plots`` renders.

* ``dev_f1_<dataset>.png``: dev F1 per epoch, one line per row of the table (mean over
  the seeds that reached that epoch, from every run folder pooled into the row; early
  stopping makes seeds end at different epochs).
* ``per_type_f1_<dataset>.png``: grouped bars of PER/LOC/ORG/MISC F1 per row, with the
  std over seeds as error bars.
* ``diagnostics_<dataset>_<label>.png``: for runs whose heads report per-example values
  (MAF's matching probability, visual gates, HamLearning's relevance...), one histogram
  per diagnostic name (values of all the row's seeds), with tweets split by image status: ok, missing, and unreadable
  (every other status: empty, truncated, not an image...). Densities, so the groups
  compare in shape although "ok" dominates; the legend gives each group's count.
* ``dev_f1.csv``: columns ``model, epoch, dev_f1`` (the same means as the line plot);
  with several datasets the model is written ``<dataset>/<label>``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the report runs in CI and in dvc repro
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mner.report.runs import Run  # noqa: E402
from mner.report.tables import TYPES, Table  # noqa: E402

STATUS_GROUPS: tuple[str, ...] = ("ok", "missing", "unreadable")


def slug(text: str) -> str:
    """A file-name-safe form of a dataset name or row label."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")
    return s or "unnamed"


def dev_curve(run: Run) -> list[tuple[int, float]]:
    """``(epoch, mean dev F1 over seeds)`` for the epochs any seed reached."""
    per_epoch: dict[int, list[float]] = {}
    for hist in run.histories.values():
        for h in hist:
            ep, f1 = h.get("epoch"), h.get("dev_f1")
            if isinstance(ep, int) and isinstance(f1, (int, float)) and np.isfinite(f1):
                per_epoch.setdefault(ep, []).append(float(f1))
    return [(ep, float(np.mean(v))) for ep, v in sorted(per_epoch.items())]


def dev_f1_rows(tables: Sequence[Table]) -> list[tuple[str, int, float]]:
    """Rows of ``dev_f1.csv``: ``(model, epoch, dev_f1)``."""
    several = len(tables) > 1
    out = []
    for t in tables:
        for row in t.rows:
            name = f"{t.dataset}/{row.label}" if several else row.label
            out.extend((name, ep, round(f1, 4)) for ep, f1 in dev_curve(row.run))
    return out


def dev_f1_csv(tables: Sequence[Table]) -> str:
    """The text of ``dev_f1.csv``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "epoch", "dev_f1"])
    w.writerows(dev_f1_rows(tables))
    return buf.getvalue()


def plot_dev_f1(table: Table, path: Path) -> bool:
    """Draw the dev-F1 curves of one dataset; False (nothing written) without history."""
    curves = [(row.label, dev_curve(row.run)) for row in table.rows]
    curves = [(label, c) for label, c in curves if c]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, c in curves:
        ax.plot([e for e, _ in c], [f for _, f in c], marker="o", markersize=3, label=label)
    ax.set(
        xlabel="epoch",
        ylabel="dev F1 (%)",
        title=f"{table.dataset}: dev F1 per epoch (mean over seeds)",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return True


def plot_per_type(table: Table, path: Path) -> bool:
    """Grouped bars of per-type F1; False when no row has per-type scores."""
    rows = [r for r in table.rows if any(r.stats.get(t) is not None for t in TYPES)]
    if not rows:
        return False
    width = 0.8 / len(rows)
    x = np.arange(len(TYPES))
    fig, ax = plt.subplots(figsize=(max(9, 0.6 * len(rows) + 7), 4.5))
    for i, row in enumerate(rows):
        means = [row.stats[t].mean if row.stats.get(t) else 0.0 for t in TYPES]
        stds = [row.stats[t].std if row.stats.get(t) else 0.0 for t in TYPES]
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=2,
            label=row.label,
        )
    ax.set_xticks(x, TYPES)
    ax.set(ylabel="F1 (%)", title=f"{table.dataset}: F1 per entity type", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return True


def group_by_status(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """Fold a diagnostic's per-status values into ok / missing / unreadable."""
    out: dict[str, list[float]] = {s: [] for s in STATUS_GROUPS}
    for status, vals in values.items():
        key = status if status in ("ok", "missing") else "unreadable"
        out[key].extend(float(v) for v in vals if isinstance(v, (int, float)) and np.isfinite(v))
    return out


def pooled_diagnostics(run: Run) -> dict[str, dict[str, list[float]]]:
    """A run's diagnostics pooled over seeds: ``{name: {status group: values}}``."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for diag in run.diagnostics.values():
        for name, values in diag.items():
            g = group_by_status(values)
            dst = pooled.setdefault(name, {s: [] for s in STATUS_GROUPS})
            for s in STATUS_GROUPS:
                dst[s].extend(g[s])
    return {n: g for n, g in sorted(pooled.items()) if any(g.values())}


def plot_diagnostics(run: Run, title: str, path: Path, bins: int = 20) -> bool:
    """Histograms of one run's diagnostics by image status; False when it has none."""
    pooled = pooled_diagnostics(run)
    if not pooled:
        return False
    n = len(pooled)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False)
    for ax, (name, groups) in zip(axes[0], pooled.items(), strict=True):
        allv = np.concatenate([np.asarray(v) for v in groups.values() if v])
        lo, hi = float(allv.min()), float(allv.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for status, vals in groups.items():
            if vals:
                ax.hist(
                    vals, bins=edges, density=True, alpha=0.5, label=f"{status} (n={len(vals)})"
                )
        ax.set(title=name, xlabel="value", ylabel="density")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:
    """Save atomically: a reader never sees half a PNG."""
    fig.tight_layout()
    tmp = path.with_name(path.name + ".part")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
