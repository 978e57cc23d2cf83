"""``mner report``: result tables, plots and provenance over run folders.

Modules: :mod:`~mner.report.config` (``ReportConfig``), :mod:`~mner.report.runs`
(reading run folders, row labels), :mod:`~mner.report.tables` (mean ± std tables,
``metrics.json``), :mod:`~mner.report.plots` (PNG plots, ``dev_f1.csv``),
:mod:`~mner.report.paper_numbers` (the papers' reported F1) and
:mod:`~mner.report.build` (``build_report``, which writes everything).
"""

from mner.report.config import ReportConfig

__all__ = ["ReportConfig", "build_report"]


def build_report(cfg, runs):
    """See :func:`mner.report.build.build_report` (imported lazily: it loads matplotlib)."""
    from mner.report.build import build_report as _build

    return _build(cfg, runs)
