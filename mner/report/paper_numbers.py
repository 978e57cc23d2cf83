"""The papers' reported overall test F1 on Twitter-2015 and Twitter-2017.

Source: each paper's main results table (BERT-CRF and UMT as quoted in the comparison
tables of the five papers; the others from their own papers); the papers are cited in
docs/papers.md. Keys are the head
registry names. The context recipes (ITA, NAACL 2022; MoRe, Findings of EMNLP 2022, text
and image retrieval; PGIM, Findings of EMNLP 2023) report XLM-R-large runs; a run of
``--model ita`` / ``more_text`` / ``more_image`` / ``pgim`` shows its paper's number.
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
        "ita": 78.03,
        "more_text": 77.79,
        "more_image": 77.57,
        "pgim": 79.33,
    },
    "twitter2017": {
        "bert_crf": 83.44,
        "umt": 85.31,
        "mgc": 86.12,
        "bfcl": 85.70,
        "maf": 86.25,
        "mgips_cl": 88.52,
        "hamlearning": 87.13,
        "ita": 89.75,
        "more_text": 89.49,
        "more_image": 90.28,
        "pgim": 91.43,
    },
}

#: Models in the order the papers' tables list them (text baseline first).
PAPER_ORDER: tuple[str, ...] = (
    "bert_crf", "umt", "mgc", "bfcl", "maf", "mgips_cl", "hamlearning", "ita", "more_text", "more_image", "pgim",
)


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


def paper_f1_of_run(dataset: str | None, model: str, config: dict | None) -> float | None:
    """The reported F1 that fits a run: :func:`paper_f1`, unless the run reads another
    context than the model's recipe (a ``bert_crf`` with a context file is not the paper's
    BERT-CRF; an ``ita`` run without its image text is not ITA), then None."""
    from mner.train.config import CONTEXT_PRESETS

    config = config or {}
    recipe = list(CONTEXT_PRESETS.get(model, {}).get("context", ()))
    used = [s for s in (config.get("context") or []) if s != "file"]
    if used != [s for s in recipe if s != "file"] or (("file" in recipe) != bool(config.get("context_file"))):
        return None
    return paper_f1(dataset, model)
