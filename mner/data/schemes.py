"""Tagging schemes (BIO2 and BIOES) and entity extraction the way conlleval reads tags.

A label is ``O`` or ``<prefix>-<TYPE>`` with prefix ``B``, ``I``, ``E`` or ``S``. Chunks
are found with conlleval's own start/end rules (``startOfChunk`` / ``endOfChunk`` in
conlleval.pl), which read BIO2 and BIOES alike:

* ``B-`` and ``S-`` always start a chunk; ``I-`` or ``E-`` start one after ``O``, after
  ``E-``/``S-``, or after a tag of another type (the lenient reading of an ``I-X`` that
  follows ``O``).
* a chunk ends before ``B-``, ``S-`` or ``O``, after ``E-`` and ``S-``, and wherever the
  type changes.

In memory every sequence is BIO2; :func:`to_bioes` and :func:`to_bio2` convert losslessly
between the two schemes for well-formed sequences (see :func:`check`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Scheme = Literal["bio2", "bioes"]

PREFIXES = ("B", "I", "E", "S")


def split_label(label: str) -> tuple[str, str]:
    """Split a label into (prefix, type) the way conlleval does.

    ``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``. A label without a dash is
    its own prefix with an empty type (conlleval's ``^([^-]*)-(.*)$`` fallback).
    """
    prefix, dash, typ = label.partition("-")
    if not dash:
        return label, ""
    return prefix, typ


def _ends(prev_tag: str, tag: str, prev_type: str, typ: str) -> bool:
    # conlleval.pl endOfChunk, transcribed rule for rule.
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != typ


def _starts(prev_tag: str, tag: str, prev_type: str, typ: str) -> bool:
    # conlleval.pl startOfChunk, transcribed rule for rule.
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != typ


def entities(labels: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of one tag sequence, read with conlleval's chunk rules.

    Args:
        labels: (T,) tags in BIO2 or BIOES (or a mix; conlleval reads both).

    Returns:
        ``(type, start, end_exclusive)`` for each chunk, in order of ``start``.

    Example:
        >>> entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"])
        [('PER', 0, 2), ('LOC', 3, 4), ('LOC', 4, 5)]
    """
    out: list[tuple[str, int, int]] = []
    prev_tag, prev_type = "O", ""
    start: int | None = None
    for i, label in enumerate(labels):
        tag, typ = split_label(label)
        if tag not in PREFIXES:
            # Tags outside the schemes are rejected by the reader; read them as O here.
            tag, typ = "O", ""
        if start is not None and _ends(prev_tag, tag, prev_type, typ):
            out.append((prev_type, start, i))
            start = None
        if _starts(prev_tag, tag, prev_type, typ):
            start = i
        prev_tag, prev_type = tag, typ
    if start is not None:
        out.append((prev_type, start, len(labels)))
    return out


def from_entities(
    n: int, spans: Sequence[tuple[str, int, int]], scheme: Scheme = "bio2"
) -> list[str]:
    """Write entities back as a tag sequence of length ``n`` in ``scheme``.

    Args:
        n: Sequence length T.
        spans: ``(type, start, end_exclusive)`` chunks, non-overlapping.
        scheme: ``"bio2"`` or ``"bioes"``.

    Returns:
        (T,) tags.
    """
    tags = ["O"] * n
    for typ, start, end in spans:
        if scheme == "bioes" and end - start == 1:
            tags[start] = f"S-{typ}"
            continue
        tags[start] = f"B-{typ}"
        for j in range(start + 1, end):
            tags[j] = f"I-{typ}"
        if scheme == "bioes":
            tags[end - 1] = f"E-{typ}"
    return tags


def to_bioes(labels: Sequence[str]) -> list[str]:
    """Convert a BIO2 (or any conlleval-readable) sequence to BIOES.

    Lossless for well-formed BIO2: ``to_bio2(to_bioes(x)) == x``. An ``I-X`` that starts
    a chunk is read as conlleval reads it and comes out as ``B-X``/``S-X``.
    """
    return from_entities(len(labels), entities(labels), "bioes")


def to_bio2(labels: Sequence[str]) -> list[str]:
    """Convert a BIOES (or any conlleval-readable) sequence to BIO2.

    Lossless for well-formed BIOES: ``to_bioes(to_bio2(x)) == x``.
    """
    return from_entities(len(labels), entities(labels), "bio2")


def detect_scheme(labels: Sequence[str]) -> Scheme:
    """``"bioes"`` if any tag has an ``E-`` or ``S-`` prefix, else ``"bio2"``."""
    for label in labels:
        if label[:2] in ("E-", "S-"):
            return "bioes"
    return "bio2"


def check(labels: Sequence[str], scheme: Scheme) -> tuple[int, str] | None:
    """Find the first tag that is not well formed in ``scheme``.

    BIO2: an ``I-X`` must follow ``B-X`` or ``I-X``; ``E-``/``S-`` are not allowed.
    BIOES: ``I-X``/``E-X`` must follow ``B-X`` or ``I-X``, and ``B-X``/``I-X`` must be
    followed by ``I-X`` or ``E-X``.

    Returns:
        ``(position, reason)`` of the first problem, or ``None`` when well formed.
    """
    prev_tag, prev_type = "O", ""
    for i, label in enumerate(labels):
        tag, typ = split_label(label)
        if scheme == "bio2":
            if tag in ("E", "S"):
                return i, f"{label} is a BIOES tag in a BIO2 sequence"
            if tag == "I" and (prev_tag not in ("B", "I") or prev_type != typ):
                after = "the start" if i == 0 else labels[i - 1]
                return i, f"{label} follows {after}; a {typ} entity must start with B-{typ}"
        else:
            if tag in ("I", "E") and (prev_tag not in ("B", "I") or prev_type != typ):
                after = "the start" if i == 0 else labels[i - 1]
                return (
                    i,
                    f"{label} follows {after}; a {typ} entity must start with B-{typ} or be S-{typ}",
                )
            if prev_tag in ("B", "I") and not (tag in ("I", "E") and typ == prev_type):
                return i - 1, (
                    f"{labels[i - 1]} is not closed; a multi-token {prev_type} entity "
                    f"must end with E-{prev_type} (single tokens are S-{prev_type})"
                )
        prev_tag, prev_type = tag, typ
    if scheme == "bioes" and prev_tag in ("B", "I"):
        return len(labels) - 1, (
            f"{labels[-1]} ends the sequence; the entity must end with E-{prev_type}"
        )
    return None
