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
        baseline: the row every other row is compared with on the test split (a head
            name, matching its row without ablation switches, or a row label).
        significance: run the paired bootstrap and approximate-randomization tests.
        resamples: bootstrap draws and random swaps of each test (the smallest p-value
            reported is 2 / (resamples + 1), two-sided; 10000 for a paper).
        seed: seeds the tests' random draws, so a report is reproducible.
        cases: write ``cases.html`` and ``cases.png``.
        case_figure: tweets drawn in ``cases.png`` (the most instructive first).
        thumbnail: largest side in px of the images embedded in ``cases.html``.
        data: folder holding the runs' test file (by name) when the path recorded in
            their provenance does not resolve from where the report runs.
    """

    out: Path = Path("reports")
    title: str = "mner results"
    split: Literal["test", "dev"] = "test"
    include_paper_numbers: bool = True
    plots: bool = True
    digits: int = 2
    bins: int = 20
    baseline: str = "bert_crf"
    significance: bool = True
    resamples: int = 1000
    seed: int = 0
    cases: bool = True
    case_figure: int = 4
    thumbnail: int = 128
    data: str | None = None

    def __post_init__(self) -> None:
        if self.resamples < 100:
            raise ValueError(f"resamples must be at least 100, got {self.resamples}")
        if self.case_figure < 1 or not 16 <= self.thumbnail <= 1024:
            raise ValueError("case_figure must be at least 1 and thumbnail in 16..1024 px")
        if not 0 <= self.digits <= 6:
            raise ValueError(f"digits must be in 0..6, got {self.digits}")
        if self.bins < 1:
            raise ValueError(f"bins must be at least 1, got {self.bins}")
