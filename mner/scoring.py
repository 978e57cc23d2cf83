"""Entity-level scoring that agrees exactly with conlleval.

Entities are exact matches of (type, start, end): a predicted entity is correct only when
the gold file has an entity of the same type over the same tokens. Chunks are read with
conlleval's rules (:func:`mner.data.schemes.entities`), so BIO2 sequences score exactly
as ``conlleval.pl`` scores them (an ``I-X`` after ``O`` starts an entity) and BIOES
sequences are read correctly (``S-`` singletons, ``E-`` ends). Scores are percentages,
micro-averaged over entities, overall and per type.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mner.data.conll import TYPES, Tweet, read_conll
from mner.data.schemes import entities
from mner.errors import DataError

Span = tuple[int, int, str]  # (start, end_exclusive, type), as in image_dependent.tsv


@dataclass(frozen=True)
class PRF:
    """Precision, recall and F1 in percent, with the counts they come from.

    Precision is 0 when nothing was predicted, recall 0 when there is no gold entity, and
    F1 0 when both are 0 (conlleval's conventions).
    """

    precision: float
    recall: float
    f1: float
    n_gold: int
    n_pred: int
    n_correct: int

    @classmethod
    def from_counts(cls, n_gold: int, n_pred: int, n_correct: int) -> PRF:
        """Build from entity counts, the way conlleval.pl computes its percentages."""
        p = 100.0 * n_correct / n_pred if n_pred else 0.0
        r = 100.0 * n_correct / n_gold if n_gold else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return cls(p, r, f, n_gold, n_pred, n_correct)

    def to_dict(self) -> dict[str, float | int]:
        """``{"precision", "recall", "f1", "n_gold", "n_pred", "n_correct"}``."""
        return asdict(self)


@dataclass(frozen=True)
class Scores:
    """Overall and per-type scores.

    Attributes:
        overall: Micro-averaged over all entities.
        per_type: PER, LOC, ORG, MISC always (in that order), then any other type found
            in gold or predictions, alphabetically.
    """

    overall: PRF
    per_type: dict[str, PRF]

    def to_dict(self) -> dict:
        """``{"overall": PRF, "per_type": {type: PRF}}`` as plain dicts (JSON-ready)."""
        return {
            "overall": self.overall.to_dict(),
            "per_type": {t: p.to_dict() for t, p in self.per_type.items()},
        }


def _aligned(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]):
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sequences but {len(pred)} predicted")
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(p) > len(g):
            raise ValueError(f"sequence {i}: {len(p)} predicted tags for {len(g)} gold tags")
        # Gold is never truncated: a model that saw fewer tokens predicted O for the rest.
        yield g, list(p) + ["O"] * (len(g) - len(p))


def score(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> Scores:
    """Score predicted tag sequences against gold ones, as conlleval does.

    Args:
        gold: (S, T_s) gold tags per sequence (BIO2 or BIOES).
        pred: (S, <=T_s) predicted tags; shorter sequences are padded with ``O``.

    Returns:
        :class:`Scores` with percentages.

    Raises:
        ValueError: If the number of sequences differs or a prediction is longer than its
            gold sequence.
    """
    n_gold: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_ok: Counter[str] = Counter()
    for g, p in _aligned(gold, pred):
        ge, pe = set(entities(g)), set(entities(p))
        n_gold.update(t for t, _, _ in ge)
        n_pred.update(t for t, _, _ in pe)
        n_ok.update(t for t, _, _ in ge & pe)
    extra = sorted((set(n_gold) | set(n_pred)) - set(TYPES))
    per_type = {t: PRF.from_counts(n_gold[t], n_pred[t], n_ok[t]) for t in (*TYPES, *extra)}
    overall = PRF.from_counts(sum(n_gold.values()), sum(n_pred.values()), sum(n_ok.values()))
    return Scores(overall, per_type)


def score_marked(gold_marked: Sequence[Sequence[Span]], pred: Sequence[Sequence[str]]) -> PRF:
    """Score only marked entities (the image-dependent subset).

    Gold is the marked entities; a predicted entity counts when it overlaps a marked span
    of its sequence (so a wrong type or boundary on a marked name costs precision, while
    predictions elsewhere are ignored); it is correct when span and type match exactly.

    Args:
        gold_marked: (S,) lists of ``(start, end_exclusive, type)`` marks per sequence (an
            empty list for unmarked sequences), e.g. from
            :func:`mner.data.dataset.read_image_dependent`.
        pred: (S, T_s) predicted tags.

    Returns:
        :class:`PRF` over the marked entities.
    """
    if len(gold_marked) != len(pred):
        raise ValueError(f"{len(gold_marked)} marked sequences but {len(pred)} predicted")
    n_gold = n_pred = n_ok = 0
    for marks, p in zip(gold_marked, pred, strict=True):
        marks_set = {(t, s, e) for s, e, t in marks}
        n_gold += len(marks_set)
        for typ, s, e in entities(p):
            if any(s < me and ms < e for ms, me, _ in marks):
                n_pred += 1
                n_ok += (typ, s, e) in marks_set
    return PRF.from_counts(n_gold, n_pred, n_ok)


def marked_for_split(
    marks: Mapping[tuple[str, int], Sequence[Span]], split: str, n: int
) -> list[list[Span]]:
    """Per-tweet mark lists of one split, for :func:`score_marked`.

    Args:
        marks: ``{(split, index): spans}`` from ``read_image_dependent``.
        split: The split name.
        n: Number of tweets in the split.
    """
    return [list(marks.get((split, i), [])) for i in range(n)]


def align_files(
    gold_path: str | os.PathLike,
    pred_path: str | os.PathLike,
    *,
    map_other: bool = True,
) -> tuple[list[Tweet], list[Tweet]]:
    """Read a gold and a predicted CoNLL file and check that they hold the same tweets.

    Both files are read with any entity type accepted (an unexpected type shows up as its
    own column rather than stopping the scoring).

    Returns:
        ``(gold_tweets, pred_tweets)``, aligned.

    Raises:
        DataError: Naming the first tweet (file and line) whose IMGID or tokens differ, or
            the tweet counts when one file is longer.
    """
    gold = read_conll(gold_path, map_other=map_other, types=None)
    pred = read_conll(pred_path, map_other=map_other, types=None)
    for g, p in zip(gold, pred, strict=False):
        if g.image_id != p.image_id:
            raise DataError(
                f"{p.source}:{p.line}: tweet {p.index} is IMGID:{p.image_id} but gold "
                f"{g.source}:{g.line} has IMGID:{g.image_id}; predict on the gold file itself"
            )
        if g.tokens != p.tokens:
            j = next(
                (k for k, (a, b) in enumerate(zip(g.tokens, p.tokens, strict=False)) if a != b),
                min(len(g.tokens), len(p.tokens)),
            )
            got = repr(p.tokens[j]) if j < len(p.tokens) else "end of tweet"
            want = repr(g.tokens[j]) if j < len(g.tokens) else "end of tweet"
            raise DataError(
                f"{p.source}:{p.line + 1 + j}: tweet IMGID:{p.image_id} token {j} is {got} but "
                f"gold {g.source}:{g.line + 1 + j} has {want}; tokens must match the gold file"
            )
    if len(gold) != len(pred):
        short, long_ = (pred, gold) if len(pred) < len(gold) else (gold, pred)
        first = long_[len(short)]
        raise DataError(
            f"{first.source}:{first.line}: {Path(pred_path)} has {len(pred)} tweets, gold "
            f"{Path(gold_path)} has {len(gold)}; the first unmatched is IMGID:{first.image_id}"
        )
    return gold, pred
