"""The test tweets and each row's predictions on them, for significance tests and cases.

The tables read ``metrics.json``; the paired tests and the case-study page need the
predictions themselves: ``seed_<k>/pred_test.txt`` of every run folder, aligned with the
gold test file the run was trained against. The gold file is the one ``provenance.json``
records (``dataset.files``, the path as given to ``mner train``, usually relative to the
folder it ran in), found as recorded or, with ``report.data`` set, by its file name in
that folder; its sha256 must equal the recorded one, so a table is never compared against
other data than it was scored on. What cannot be found is listed as a reason, not an error:
the tables do not need it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mner.data.conll import Tweet, read_conll
from mner.data.dataset import read_image_dependent, split_name
from mner.data.schemes import entities
from mner.errors import DataError
from mner.report.runs import Run, provenance_of
from mner.train.runs import RunFolder

Entity = tuple[str, int, int]


@dataclass
class TestSet:
    """The gold split the rows were scored on.

    Attributes:
        path: the gold CoNLL file.
        tweets: its tweets, in file order.
        gold: per tweet, the gold entities ``(type, start, end_exclusive)``.
        image_dependent: per tweet, the gold entities the data marks as needing the image
            (``image_dependent.tsv`` beside the file; empty sets when there is none).
        has_marks: whether the data has such marks at all.
        images_dir: the ``images`` folder beside the file, if there is one.
    """

    path: Path
    tweets: list[Tweet]
    gold: list[set[Entity]]
    image_dependent: list[set[Entity]]
    has_marks: bool
    images_dir: Path | None


@dataclass
class RowPredictions:
    """One table row's predictions on the test set.

    Attributes:
        label: the row label.
        model: the head name.
        seeds: seed -> per tweet the predicted entities.
        dev_f1: seed -> dev F1 recorded in ``metrics.json`` (to pick the best seed).
        missing: ``"seed k: reason"`` for seeds whose predictions could not be used.
    """

    label: str
    model: str
    seeds: dict[Any, list[set[Entity]]] = field(default_factory=dict)
    dev_f1: dict[Any, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def best_seed(self) -> Any:
        """The seed with the best dev F1 (the first seed when none is recorded)."""
        return max(self.seeds, key=lambda s: (self.dev_f1.get(s, float("-inf")), -_order(s)))


def _order(seed: Any) -> float:
    try:
        return float(seed)
    except (TypeError, ValueError):
        return 0.0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_test_set(
    runs: Sequence[Run], split: str = "test", data: str | Path | None = None
) -> tuple[TestSet | None, str]:
    """The gold file of ``split`` the runs were trained with, read and checked.

    Args:
        runs: the rows of one dataset's table.
        split: ``test`` (or ``valid``).
        data: a folder to look for the file in (by its name) when its recorded path does
            not resolve, e.g. when the report runs in another folder than training did.

    Returns:
        ``(test_set, "")``, or ``(None, reason)`` when the file is not recorded, not
        found, or its sha256 differs from the recorded one.
    """
    recorded: dict[str, str | None] = {}
    for run in runs:
        for folder in run.folders:
            files = provenance_of(folder)["data_files"] or {}
            for path, digest in files.items():
                if split_name(path) == split:
                    recorded.setdefault(path, digest)
    if not recorded:
        return None, f"no {split} file is recorded in the runs' provenance.json"
    if len(recorded) > 1:
        return None, f"the runs were trained with different {split} files: {', '.join(recorded)}"
    (path_str, digest), = recorded.items()
    candidates = [Path(path_str)]
    if data is not None:
        candidates.insert(0, Path(data) / Path(path_str).name)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        where = " or ".join(f"`{p}`" for p in candidates)
        return None, (f"the {split} file {where} was not found; run the report where training ran, "
                      "or set report.data to the dataset folder")
    if digest and sha256_file(found) != digest:
        return None, f"`{found}` changed since training (sha256 differs from the recorded one)"
    try:
        tweets = read_conll(found, types=None)
        marks = read_image_dependent(found.parent, {split: tweets})
    except DataError as exc:
        return None, str(exc)
    gold = [set(entities(t.labels)) for t in tweets]
    dep = [
        {(typ, s, e) for s, e, typ in marks.get((split, i), [])} for i in range(len(tweets))
    ]
    images = found.parent / "images"
    return TestSet(
        path=found,
        tweets=tweets,
        gold=gold,
        image_dependent=dep,
        has_marks=bool(marks),
        images_dir=images if images.is_dir() else None,
    ), ""


def row_predictions(run: Run, test: TestSet, split: str = "test") -> RowPredictions:
    """Read every seed's ``pred_<split>.txt`` of a row and align it with ``test``.

    A seed whose file is missing or holds other tweets is listed in ``missing``.
    """
    out = RowPredictions(label=run.label, model=run.model)
    dev = {r.get("seed"): r.get("dev", {}) for r in run.metrics.get("runs", []) if isinstance(r, Mapping)}
    for folder in run.folders:
        for seed in run.seeds_from(folder):
            path = RunFolder(folder.path).seed(seed).predictions(split)
            if not path.is_file():
                out.missing.append(f"seed {seed}: no {path.name} in {path.parent}")
                continue
            try:
                pred = read_conll(path, types=None)
            except DataError as exc:
                out.missing.append(f"seed {seed}: {exc}")
                continue
            if [(t.image_id, t.tokens) for t in pred] != [(t.image_id, t.tokens) for t in test.tweets]:
                out.missing.append(f"seed {seed}: {path} holds other tweets than {test.path}")
                continue
            out.seeds[seed] = [set(entities(t.labels)) for t in pred]
            f1 = _f1_of(dev.get(seed))
            if f1 is not None:
                out.dev_f1[seed] = f1
    return out


def _f1_of(record: Any) -> float | None:
    if not isinstance(record, Mapping):
        return None
    node = record.get("overall", record)
    f1 = node.get("f1") if isinstance(node, Mapping) else None
    return float(f1) if isinstance(f1, int | float) else None
