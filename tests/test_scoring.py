"""conlleval-exact entity scoring (mner.scoring)."""

from __future__ import annotations

import random

import pytest
from seqeval.metrics import classification_report

from mner.data.conll import read_conll, write_conll
from mner.errors import DataError
from mner.scoring import PRF, align_files, score, score_marked


def prf(s: PRF) -> tuple:
    return (
        round(s.precision, 4),
        round(s.recall, 4),
        round(s.f1, 4),
        s.n_gold,
        s.n_pred,
        s.n_correct,
    )


def test_one_right_one_wrong_type():
    s = score([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]])
    assert prf(s.overall) == (50.0, 50.0, 50.0, 2, 2, 1)
    assert prf(s.per_type["PER"]) == (100.0, 100.0, 100.0, 1, 1, 1)
    assert prf(s.per_type["LOC"]) == (0.0, 0.0, 0.0, 1, 0, 0)
    assert prf(s.per_type["ORG"]) == (0.0, 0.0, 0.0, 0, 1, 0)
    assert prf(s.per_type["MISC"]) == (0.0, 0.0, 0.0, 0, 0, 0)
    assert list(s.per_type) == ["PER", "LOC", "ORG", "MISC"]


def test_i_after_o_starts_an_entity():
    s = score([["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]])
    assert prf(s.overall) == (100.0, 100.0, 100.0, 1, 1, 1)


def test_adjacent_entities_of_one_type():
    s = score([["B-PER", "B-PER", "O"]], [["B-PER", "I-PER", "O"]])
    assert prf(s.overall) == (0.0, 0.0, 0.0, 2, 1, 0)
    s = score([["B-PER", "B-PER"]], [["B-PER", "B-PER"]])
    assert prf(s.overall) == (100.0, 100.0, 100.0, 2, 2, 2)


def test_type_change_inside_a_span():
    s = score([["B-LOC", "I-LOC", "O"]], [["B-LOC", "I-ORG", "O"]])
    assert prf(s.overall) == (0.0, 0.0, 0.0, 1, 2, 0)
    assert s.per_type["ORG"].n_pred == 1 and s.per_type["LOC"].n_pred == 1


def test_bioes_singletons_and_ends():
    gold = [["S-PER", "B-LOC", "I-LOC", "E-LOC", "S-MISC"]]
    s = score(gold, [["B-PER", "B-LOC", "I-LOC", "I-LOC", "O"]])
    assert prf(s.overall) == (100.0, 66.6667, 80.0, 3, 2, 2)
    assert prf(s.per_type["MISC"]) == (0.0, 0.0, 0.0, 1, 0, 0)


def test_empty_and_short_predictions_are_padded_with_o():
    gold = [["B-PER", "O", "B-LOC"], ["B-ORG"]]
    s = score(gold, [[], []])
    assert prf(s.overall) == (0.0, 0.0, 0.0, 3, 0, 0)
    s = score(gold, [["B-PER"], []])
    assert prf(s.overall) == (100.0, 33.3333, 50.0, 3, 1, 1)
    with pytest.raises(ValueError, match="2 gold sequences but 1 predicted"):
        score(gold, [[]])
    with pytest.raises(ValueError, match="sequence 1: 2 predicted tags for 1 gold"):
        score(gold, [[], ["O", "O"]])


def test_other_types_are_listed_after_the_four():
    s = score([["B-EVENT", "B-PER"]], [["B-EVENT", "B-DATE"]])
    assert list(s.per_type) == ["PER", "LOC", "ORG", "MISC", "DATE", "EVENT"]
    assert prf(s.per_type["EVENT"]) == (100.0, 100.0, 100.0, 1, 1, 1)
    d = s.to_dict()
    assert d["overall"] == {
        "precision": 50.0, "recall": 50.0, "f1": 50.0, "n_gold": 2, "n_pred": 2, "n_correct": 1,
    }  # fmt: skip
    assert set(d["per_type"]) == {"PER", "LOC", "ORG", "MISC", "DATE", "EVENT"}


TAGS = ["O"] * 4 + [f"{p}-{t}" for p in "BIES" for t in ("PER", "LOC", "ORG", "MISC")]


@pytest.mark.parametrize("tags", [TAGS[:12] + ["O"] * 4, TAGS], ids=["bio2", "bio2+bioes"])
def test_agrees_with_seqeval_default_mode_on_random_sequences(tags):
    # seqeval's default mode reproduces conlleval's chunking, including I- after O.
    rng = random.Random(2024)
    for _ in range(30):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 20))] for _ in range(100)]
        # predictions: gold with some tags replaced, so a fair share of entities match
        pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in g] for g in gold]
        ours = score(gold, pred)
        ref = classification_report(gold, pred, output_dict=True, zero_division=0)
        for typ, r in ref.items():
            if typ.endswith("avg"):
                continue
            mine = ours.per_type[typ]
            assert mine.n_gold == r["support"]
            assert mine.precision == pytest.approx(100 * r["precision"], abs=1e-9)
            assert mine.recall == pytest.approx(100 * r["recall"], abs=1e-9)
            assert mine.f1 == pytest.approx(100 * r["f1-score"], abs=1e-9)
        micro = ref["micro avg"]
        assert ours.overall.precision == pytest.approx(100 * micro["precision"], abs=1e-9)
        assert ours.overall.recall == pytest.approx(100 * micro["recall"], abs=1e-9)
        assert ours.overall.f1 == pytest.approx(100 * micro["f1-score"], abs=1e-9)
        assert ours.overall.n_gold == micro["support"]


def test_score_marked_counts_only_predictions_on_marked_spans():
    marks = [[(1, 2, "PER")], [], [(0, 2, "LOC"), (3, 4, "ORG")]]
    pred = [
        ["B-ORG", "B-PER", "O"],  # ORG elsewhere ignored; PER exact: correct
        ["B-MISC"],  # unmarked sentence: ignored
        ["B-LOC", "O", "O", "B-MISC"],  # LOC overlaps but too short; MISC wrong type
    ]
    assert prf(score_marked(marks, pred)) == (33.3333, 33.3333, 33.3333, 3, 3, 1)
    assert prf(score_marked(marks, [[], [], []])) == (0.0, 0.0, 0.0, 3, 0, 0)
    with pytest.raises(ValueError):
        score_marked(marks, [[]])


def test_align_files_names_first_difference(tmp_path):
    gold_p = tmp_path / "test.txt"
    gold_p.write_text("IMGID:1\na\tB-PER\nb\tO\n\nIMGID:2\nc\tO\nd\tB-LOC\n\n", encoding="utf-8")
    gold = read_conll(gold_p)
    same = write_conll(tmp_path / "pred.txt", gold, labels=[["B-PER"], ["O", "B-ORG"]])
    g, p = align_files(gold_p, same)
    assert prf(score([t.labels for t in g], [t.labels for t in p]).overall)[:3] == (
        50.0,
        50.0,
        50.0,
    )

    bad_tok = tmp_path / "bad_tok.txt"
    bad_tok.write_text("IMGID:1\na\tO\nb\tO\n\nIMGID:2\nc\tO\nX\tO\n\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        align_files(gold_p, bad_tok)
    assert str(exc.value).startswith(f"{bad_tok}:7: tweet IMGID:2 token 1 is 'X'")
    assert f"gold {gold_p}:7 has 'd'" in str(exc.value)

    bad_id = tmp_path / "bad_id.txt"
    bad_id.write_text("IMGID:1\na\tO\nb\tO\n\nIMGID:9\nc\tO\nd\tO\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{bad_id}:5: tweet 1 is IMGID:9 but gold"):
        align_files(gold_p, bad_id)

    short = tmp_path / "short.txt"
    short.write_text("IMGID:1\na\tO\nb\tO\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{gold_p}:5: .*has 1 tweets, gold .* has 2"):
        align_files(gold_p, short)
