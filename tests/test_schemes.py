"""BIO2/BIOES conversion and conlleval chunk reading (mner.data.schemes)."""

from __future__ import annotations

import random

import pytest

from mner.data.schemes import check, detect_scheme, entities, to_bio2, to_bioes

TYPES = ("PER", "LOC", "ORG", "MISC")


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([], []),
        (["O", "O"], []),
        (["B-PER", "I-PER", "O"], [("PER", 0, 2)]),
        # conlleval: an I- after O starts a chunk
        (["O", "I-LOC", "I-LOC"], [("LOC", 1, 3)]),
        (["I-ORG"], [("ORG", 0, 1)]),
        # adjacent entities of one type are split by B-
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
        # a type change inside a span ends one chunk and starts another
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),
        (
            ["B-PER", "I-PER", "I-ORG", "O", "B-MISC"],
            [("PER", 0, 2), ("ORG", 2, 3), ("MISC", 4, 5)],
        ),
        # BIOES: singletons and ends
        (["S-PER", "S-PER", "B-LOC", "E-LOC"], [("PER", 0, 1), ("PER", 1, 2), ("LOC", 2, 4)]),
        (["B-ORG", "I-ORG", "E-ORG", "I-ORG"], [("ORG", 0, 3), ("ORG", 3, 4)]),
        (["E-MISC", "O"], [("MISC", 0, 1)]),
        # an entity running to the end of the sequence
        (["O", "B-MISC", "I-MISC"], [("MISC", 1, 3)]),
    ],
)
def test_entities_follow_conlleval(labels, expected):
    assert entities(labels) == expected


def _random_bio2(rng: random.Random, n: int) -> list[str]:
    """A well-formed BIO2 sequence (I- only continues an entity of the same type)."""
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if out and out[-1] != "O" and r < 0.35:
            out.append("I-" + out[-1][2:])
        elif r < 0.65:
            out.append("O")
        else:
            out.append("B-" + rng.choice(TYPES))
    return out


def test_bioes_round_trip_on_random_sequences():
    rng = random.Random(7)
    for _ in range(2000):
        seq = _random_bio2(rng, rng.randint(0, 15))
        bioes = to_bioes(seq)
        assert to_bio2(bioes) == seq
        assert to_bioes(to_bio2(bioes)) == bioes
        assert entities(bioes) == entities(seq)
        assert check(seq, "bio2") is None
        assert check(bioes, "bioes") is None


def test_to_bioes_values():
    assert to_bioes(["B-PER", "I-PER", "I-PER", "B-LOC", "O", "B-ORG", "I-ORG"]) == [
        "B-PER", "I-PER", "E-PER", "S-LOC", "O", "B-ORG", "E-ORG",
    ]  # fmt: skip
    # lenient input is normalised the way conlleval reads it
    assert to_bioes(["O", "I-LOC"]) == ["O", "S-LOC"]
    assert to_bio2(["S-PER", "B-LOC", "I-LOC", "E-LOC"]) == ["B-PER", "B-LOC", "I-LOC", "I-LOC"]


def test_check_reports_first_bad_tag():
    assert check(["O", "I-PER"], "bio2") == (
        1,
        "I-PER follows O; a PER entity must start with B-PER",
    )
    pos, reason = check(["B-PER", "I-LOC"], "bio2")
    assert pos == 1 and "follows B-PER" in reason
    assert check(["S-PER"], "bio2")[0] == 0
    assert check(["B-PER", "O"], "bioes")[0] == 0  # unclosed multi-token entity
    assert check(["B-PER"], "bioes")[0] == 0
    assert check(["O", "E-PER"], "bioes")[0] == 1
    assert check(["B-PER", "I-PER", "E-PER", "S-LOC"], "bioes") is None


def test_detect_scheme():
    assert detect_scheme(["B-PER", "I-PER", "O"]) == "bio2"
    assert detect_scheme(["B-PER", "E-PER"]) == "bioes"
    assert detect_scheme(["S-LOC"]) == "bioes"
