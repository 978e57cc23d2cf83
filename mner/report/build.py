"""``build_report``: run folders in, a traceable results report out.

Writes into ``cfg.out``:

* ``results.md``: per dataset, the results table, the plots, and a "Provenance"
  section (data files and their sha256, the feature cache's path, sha256, profile and
  vision models, the profile and mner version of every run), so any number in the
  table can be traced to the exact inputs that produced it;
* ``results.json``: the same numbers, machine-readable (every score as
  ``{mean, std, n}``, per-seed values, provenance);
* ``metrics.json``: ``{dataset: {row label: {f1, precision, recall,
  image_dependent_f1}}}`` for ``dvc metrics show``;
* ``dev_f1.csv`` and the PNG plots of :mod:`mner.report.plots`;
* the paired significance tests of every row against the baseline on the test split
  (:mod:`mner.report.significance`), in ``results.md`` and ``results.json``;
* ``cases.html``, the filterable case-study page of every test tweet, and ``cases.png``,
  a paper-style figure of the most instructive ones (:mod:`mner.report.cases`).

Every file is written next to its final name and renamed when complete, while the
folder is locked (:func:`mner.locks.locked`): a second report into the same folder stops
with one line naming the holder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mner.errors import DataError
from mner.locks import locked
from mner.provenance import mner_version
from mner.report import cases as case_studies
from mner.report import plots, tables
from mner.report.compare import DatasetComparison, compare_dataset
from mner.report.config import ReportConfig
from mner.report.runs import Run, assign_labels, load_runs, pool_runs, provenance_of

log = logging.getLogger("mner.report")


def build_report(cfg: ReportConfig, runs: Sequence[Path]) -> dict[str, Any]:
    """Read run folders and write the report.

    Args:
        cfg: the report settings; ``cfg.out`` is created if needed.
        runs: run folders (or folders of run folders, at any depth). Folders of one
            experiment (same dataset and data files, model, head options and training
            settings; see :func:`mner.report.runs.pool_runs`) are pooled into one row.

    Returns:
        ``{"out", "files": [written paths], "datasets": {name: number of rows},
        "skipped": [{"path", "reason"}], "not_compared": {dataset: why it has no
        significance tests or cases}}``.

    Raises:
        DataError: when no usable run is left, or a run's files are malformed.
        LockError: another live process is writing a report into ``cfg.out``.
    """
    loaded, skipped = load_runs(runs)
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    if not loaded:
        listed = ", ".join(f"{p} ({r})" for p, r in skipped) or "none given"
        raise DataError(
            f"no usable run folders: {listed}; pass folders written by mner train "
            "(each with a metrics.json)"
        )
    # One row per experiment: the folders of its seeds (runs/<ds>/<model>/seed<k>) pooled.
    loaded = pool_runs(loaded)
    assign_labels(loaded)
    tabs = tables.build_tables(loaded, cfg.split, cfg.include_paper_numbers)
    comparisons = (
        [compare_dataset(cfg, t) for t in tabs] if cfg.significance or cfg.cases else []
    )

    out = Path(cfg.out)
    # One writer per report folder: two reports into one --out would mix their files.
    with locked(out, folder=True, what="report folder"):
        written = _write_report(cfg, tabs, skipped, out, comparisons)
    return {
        "out": str(out),
        "files": [str(p) for p in written],
        "datasets": {t.dataset: len(t.rows) for t in tabs},
        "skipped": [{"path": str(p), "reason": r} for p, r in skipped],
        # datasets without significance tests or cases, and why (the runs' test file)
        "not_compared": {c.dataset: c.reason for c in comparisons if c.test is None},
    }


def _write_report(
    cfg: ReportConfig,
    tabs: list,
    skipped: list[tuple[Path, str]],
    out: Path,
    comparisons: Sequence[DatasetComparison] = (),
) -> list[Path]:
    """Write the plots, the cases and the report files into ``out``; return the paths written."""
    written: list[Path] = []
    with_cases = [c for c in comparisons if c.test is not None and c.cases]
    if cfg.cases and with_cases:
        page = case_studies.render_html(
            cfg.title, [(c.dataset, c.test, c.rows, c.cases) for c in with_cases], cfg.thumbnail
        )
        _write_atomic(out / "cases.html", page)
        written.append(out / "cases.html")
        first = with_cases[0]
        tmp = out / "cases.png.part"
        if case_studies.render_figure(
            first.test, first.rows, first.cases[: cfg.case_figure], tmp, title=first.dataset
        ):
            tmp.replace(out / "cases.png")
            written.append(out / "cases.png")
    figures: dict[str, list[tuple[str, str]]] = {}
    if cfg.plots:
        for t in tabs:
            figs = figures.setdefault(t.dataset, [])
            name = f"dev_f1_{plots.slug(t.dataset)}.png"
            if plots.plot_dev_f1(t, out / name):
                figs.append(("dev F1 per epoch", name))
            name = f"per_type_f1_{plots.slug(t.dataset)}.png"
            if plots.plot_per_type(t, out / name):
                figs.append(("F1 per entity type", name))
            for row in t.rows:
                name = f"diagnostics_{plots.slug(t.dataset)}_{plots.slug(row.label)}.png"
                title = f"{t.dataset} / {row.label}: diagnostics by image status (test split)"
                if plots.plot_diagnostics(row.run, title, out / name, bins=cfg.bins):
                    figs.append((f"{row.label} diagnostics", name))
        written += [out / n for figs in figures.values() for _, n in figs]

    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    files = {
        "results.md": render_markdown(cfg, tabs, figures, skipped, generated, comparisons),
        "results.json": json.dumps(
            results_dict(cfg, tabs, skipped, generated, comparisons), indent=2
        ) + "\n",
        "metrics.json": json.dumps(tables.dvc_metrics(tabs), indent=2) + "\n",
        "dev_f1.csv": plots.dev_f1_csv(tabs),
    }
    for name, text in files.items():
        _write_atomic(out / name, text)
        written.append(out / name)
    return written


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def dataset_provenance(runs: Sequence[Run]) -> dict[str, Any]:
    """Provenance of one dataset's runs, with the inputs they share factored out.

    Every run folder is traced, including each folder pooled into a row.

    Returns:
        ``{"profiles": [...], "data_files": {path: sha256} | None (when folders differ),
        "caches": [{"path", "sha256", "profile", "models", "runs": [labels]}],
        "runs": [{"label", "run", "seeds", "profile", "mner_version", "data_files"}]
        (one per folder; ``seeds``: those of the row taken from it), "consistent_data":
        bool}``.
    """
    provs = [(r, m, provenance_of(m)) for r in runs for m in r.folders]
    data_sets = {json.dumps(p["data_files"], sort_keys=True) for _, _, p in provs}
    caches: dict[str, dict[str, Any]] = {}
    for r, _, p in provs:
        c = p["cache"]
        key = json.dumps(c, sort_keys=True) if c else "null"
        entry = caches.setdefault(key, {**(c or {"path": None}), "runs": []})
        if r.label not in entry["runs"]:
            entry["runs"].append(r.label)
    return {
        "profiles": sorted({str(p["profile"]) for _, _, p in provs}),
        "consistent_data": len(data_sets) == 1,
        "data_files": provs[0][2]["data_files"] if len(data_sets) == 1 else None,
        "caches": list(caches.values()),
        "runs": [
            {
                "label": r.label,
                "run": p["run"],
                "seeds": r.seeds_from(m),
                "profile": p["profile"],
                "mner_version": p["mner_version"],
                "data_files": p["data_files"],
            }
            for r, m, p in provs
        ],
    }


def results_dict(
    cfg: ReportConfig,
    tabs: Sequence[tables.Table],
    skipped: Sequence[tuple[Path, str]],
    generated: str,
    comparisons: Sequence[DatasetComparison] = (),
) -> dict[str, Any]:
    """The content of ``results.json``."""
    by_ds = {c.dataset: c for c in comparisons}
    return {
        "title": cfg.title,
        "generated": generated,
        "mner_version": mner_version(),
        "split": cfg.split,
        "units": "percent; mean and sample std (ddof=1) over seeds",
        "datasets": {
            t.dataset: {
                "paper_dataset": t.paper_dataset,
                "columns": [h for _, h in tables.columns(t)],
                "rows": [tables.row_dict(r) for r in t.rows],
                "provenance": dataset_provenance(t.runs),
                **(
                    {"significance": by_ds[t.dataset].to_dict(cfg)}
                    if t.dataset in by_ds and cfg.significance
                    else {}
                ),
            }
            for t in tabs
        },
        "skipped": [{"path": str(p), "reason": r} for p, r in skipped],
    }


def _short(h: Any) -> str:
    return f"`{h}`" if h else "(not recorded)"


def render_markdown(
    cfg: ReportConfig,
    tabs: Sequence[tables.Table],
    figures: dict[str, list[tuple[str, str]]],
    skipped: Sequence[tuple[Path, str]],
    generated: str,
    comparisons: Sequence[DatasetComparison] = (),
) -> str:
    """The content of ``results.md``."""
    by_ds = {c.dataset: c for c in comparisons}
    split = "test" if cfg.split == "test" else "dev"
    n_runs = sum(len(row.run.folders) for t in tabs for row in t.rows)
    lines = [
        f"# {cfg.title}",
        "",
        f"Generated {generated} by mner {mner_version()} from {n_runs} run folder"
        f"{'s' if n_runs != 1 else ''}; the folders of one experiment (dataset and data "
        "files, model, head options and training settings) are pooled into one row over "
        f"all their seeds. Entity-level (conlleval) scores on the {split} split, "
        "in percent, as mean ± sample std over seeds (a single seed shows the mean only); "
        "per-type columns are F1. `img-dep F1` is F1 on the entities the data marks as "
        "needing the image; `s/epoch` is training time per epoch.",
    ]
    if skipped:
        lines += ["", "Skipped run folders:"]
        lines += [f"- `{p}`: {r}" for p, r in skipped]
    for t in tabs:
        lines += ["", f"## {t.dataset}", ""]
        if t.paper_dataset:
            lines += [
                f"`paper F1` is the overall test F1 each method's paper reports on "
                f"{t.paper_dataset.replace('twitter', 'Twitter-')} (ablation rows have none).",
                "",
            ]
        lines.append(tables.markdown_table(t, cfg.digits))
        for caption, name in figures.get(t.dataset, []):
            lines += ["", f"![{caption}]({name})"]
        if cfg.significance and t.dataset in by_ds:
            lines += _significance_lines(cfg, by_ds[t.dataset])
        lines += ["", "### Provenance", ""]
        lines += _provenance_lines(dataset_provenance(t.runs))
    return "\n".join(lines) + "\n"


def _significance_lines(cfg: ReportConfig, comp: DatasetComparison) -> list[str]:
    """The "Is the difference real?" section of one dataset."""
    lines = ["", f"### Significance against {comp.baseline or cfg.baseline} (test split)", ""]
    if comp.test is None or comp.baseline is None:
        return [*lines, f"Not computed: {comp.reason}."]
    lines += [
        f"Difference in F1 (points) of each row minus `{comp.baseline}`, with the 95 % "
        f"confidence interval of a paired bootstrap over the {len(comp.test.tweets)} test "
        f"tweets and the two-sided p-value of approximate randomization ({cfg.resamples} "
        f"resamples each, seed {cfg.seed}). Pooled: the tweets of every seed pair (seed k "
        "against the baseline's seed k) stacked; per seed: Δ (p) for each pair.",
        "",
        "| row | Δ F1 pooled | 95 % CI | p | per seed: Δ (p) |",
        "|:---|---:|:---:|---:|:---|",
    ]
    for label, c in comp.significance.items():
        p = c["pooled"]
        seeds = "; ".join(
            f"{s.seeds[0][0]}: {s.delta:+.2f} ({_p(s.p_value)})" for s in c["per_seed"]
        )
        lines.append(
            f"| {label} | {p.delta:+.2f} | [{p.ci_low:+.2f}, {p.ci_high:+.2f}] | "
            f"{_p(p.p_value)} | {seeds} |"
        )
    if not comp.significance:
        lines.append("| (no other row with test predictions) | | | | |")
    if comp.missing:
        lines += ["", "Predictions not used:"] + [f"- {m}" for m in comp.missing]
    return lines


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _provenance_lines(prov: dict[str, Any]) -> list[str]:
    lines = [f"- profile: {', '.join(prov['profiles'])}"]
    if prov["consistent_data"]:
        files = prov["data_files"]
        if files:
            lines += ["- data files (sha256):"]
            lines += [f"  - `{f}`: {_short(h)}" for f, h in files.items()]
        else:
            lines += ["- data files: (not recorded)"]
    else:
        lines += ["- **warning: these runs were trained on different data files**; per run:"]
        for r in prov["runs"]:
            lines.append(f"  - {r['label']}:")
            lines += [f"    - `{f}`: {_short(h)}" for f, h in r["data_files"].items()]
    for c in prov["caches"]:
        if not c.get("path"):
            lines.append(f"- feature cache: none (text only) — {', '.join(c['runs'])}")
            continue
        models = ", ".join(f"{g}: {m}" for g, m in c.get("models", {}).items()) or "(not recorded)"
        lines += [
            f"- feature cache `{c['path']}` — used by {', '.join(c['runs'])}",
            f"  - sha256: {_short(c.get('sha256'))}",
            f"  - profile: {c.get('profile') or '(not recorded)'}; schema version: "
            f"{c.get('schema_version') or '(not recorded)'}",
            f"  - models: {models}",
        ]
    # "seeds used": a folder whose seeds all duplicate an earlier folder's adds none.
    lines += [
        "",
        "| row | run folder | seeds used | profile | mner |",
        "|:---|:---|:---|:---|:---|",
    ]
    lines += [
        f"| {r['label']} | `{r['run']}` | "
        f"{', '.join(map(str, r['seeds'])) or 'none (duplicate seeds)'} | "
        f"{r['profile'] or '–'} | {r['mner_version'] or '–'} |"
        for r in prov["runs"]
    ]
    return lines
