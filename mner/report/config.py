"""``ReportConfig``: the frozen config of ``mner report`` (section ``report`` of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class ReportConfig:
    """What ``mner report`` writes and how.

    Attributes:
        out: output folder (``results.md``, ``results.json``, ``metrics.json``,
            ``dev_f1.csv`` and the PNG plots).
        title: the Markdown report's top heading.
        split: which split the tables report: ``test`` (as the papers do) or ``dev``.
        include_paper_numbers: add the paper's reported F1 beside ours for
            Twitter-2015 and Twitter-2017.
        plots: draw the PNG plots (tables and JSON are always written).
        digits: decimals shown for percentages in the Markdown tables.
        bins: histogram bins for the diagnostics plots.
    """

    out: Path = Path("reports")
    title: str = "mner results"
    split: Literal["test", "dev"] = "test"
    include_paper_numbers: bool = True
    plots: bool = True
    digits: int = 2
    bins: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.digits <= 6:
            raise ValueError(f"digits must be in 0..6, got {self.digits}")
        if self.bins < 1:
            raise ValueError(f"bins must be at least 1, got {self.bins}")
