"""``mner report``: tables, plots and provenance over trained run folders.

Options come from, in increasing priority: ``ReportConfig`` defaults, the ``report``
section of ``--params``, then CLI flags and ``-o key=value``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from mner.config import build, load_section, merge, parse_overrides
from mner.report.config import ReportConfig


def report(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run folders written by mner train (or folders holding them)."),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: reports).")
    ] = None,
    title: Annotated[str | None, typer.Option(help="Heading of results.md.")] = None,
    split: Annotated[str | None, typer.Option(help="Split to tabulate: test or dev.")] = None,
    params: Annotated[
        Path | None, typer.Option("--params", help="params.yaml to read the report section from.")
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option("-o", "--set", help="Override a setting: -o key=value (repeatable)."),
    ] = None,
) -> None:
    """Write results.md, results.json, metrics.json, dev_f1.csv and plots for RUNS."""
    from mner.report.build import build_report

    section = load_section(params, "report")
    where = f"{params}:report" if params and section else "report"
    data = merge(
        section,
        {k: v for k, v in {"out": out, "title": title, "split": split}.items() if v is not None},
    )
    over = parse_overrides(override)
    cfg = build(ReportConfig, merge(data, over), where=f"{where} (with -o)" if over else where)

    # Skipped folders are reported as one warning line each, on stderr.
    handler = _WarningLines()
    logger = logging.getLogger("mner.report")
    logger.addHandler(handler)
    try:
        summary = build_report(cfg, runs)
    finally:
        logger.removeHandler(handler)
    rows = sum(summary["datasets"].values())
    per_ds = ", ".join(f"{ds}: {n}" for ds, n in summary["datasets"].items())
    typer.echo(f"report: {rows} row{'s' if rows != 1 else ''} ({per_ds}) -> {cfg.out}/results.md")


class _WarningLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"warning: {record.getMessage()}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``mner report`` to the app."""
    app.command("report")(report)
