"""``mner report``: tables, plots and provenance over trained run folders.

Options come from, in increasing priority: ``ReportConfig`` defaults, the ``report``
section of ``--params``, then CLI flags, then ``-o/--set key=value``, merged by
:func:`mner.config.configure`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from mner.config import configure
from mner.pipeline.options import OverrideOpt, ParamsOpt
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
    params: ParamsOpt = None,
    override: OverrideOpt = None,
) -> None:
    """Write results.md, results.json, metrics.json, dev_f1.csv and plots for RUNS."""
    from mner.report.build import build_report

    flags = {"out": out, "title": title, "split": split}
    cfg = configure(ReportConfig, "report", params=params, flags=flags, overrides=override)

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
    for ds, why in summary.get("not_compared", {}).items():
        typer.echo(f"report: {ds}: no significance tests or cases.html: {why}")


class _WarningLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"warning: {record.getMessage()}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``mner report`` to the app."""
    app.command("report")(report)
