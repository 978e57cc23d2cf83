"""The papers' reported overall test F1 on Twitter-2015 and Twitter-2017.

Source: each paper's main results table (BERT-CRF and UMT as quoted in the comparison
tables of the five papers; the others from their own papers); the papers are cited in
docs/papers.md. Keys are the head
registry names.
"""

from __future__ import annotations

import re

PAPER_F1: dict[str, dict[str, float]] = {
    "twitter2015": {
        "bert_crf": 71.81,
        "umt": 73.41,
        "mgc": 75.05,
        "bfcl": 74.54,
        "maf": 73.42,
        "mgips_cl": 76.86,
        "hamlearning": 76.49,
    },
    "twitter2017": {
        "bert_crf": 83.44,
        "umt": 85.31,
        "mgc": 86.12,
        "bfcl": 85.70,
        "maf": 86.25,
        "mgips_cl": 88.52,
        "hamlearning": 87.13,
    },
}

#: Models in the order the papers' tables list them (text baseline first).
PAPER_ORDER: tuple[str, ...] = ("bert_crf", "umt", "mgc", "bfcl", "maf", "mgips_cl", "hamlearning")


def paper_dataset(name: str | None) -> str | None:
    """``twitter2015`` / ``twitter2017`` for the spellings people use, else None.

    Accepts e.g. ``Twitter-2015``, ``twitter_2017``, ``twitter15``, ``TWITTER-17``.
    """
    if not name:
        return None
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    match = re.fullmatch(r"twitter(?:20)?(15|17)", key)
    return f"twitter20{match.group(1)}" if match else None


def paper_f1(dataset: str | None, model: str) -> float | None:
    """The paper's reported F1 of ``model`` on ``dataset``, or None."""
    canon = paper_dataset(dataset)
    return PAPER_F1.get(canon, {}).get(model) if canon else None
