"""``mner sample``, ``mner data stats`` and ``mner score`` (mner.pipeline.cmd_data)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mner.data.conll import read_conll, write_conll
from mner.errors import ConfigError, DataError
from mner.pipeline.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_data_stats_table_and_json(sample_dir):
    res = invoke("data", "stats", sample_dir, "--images", sample_dir / "images")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(line for line in lines if "PER" in line)
    cols = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert cols[:8] == ["Split", "PER", "LOC", "ORG", "MISC", "Total", "#Tweets", "#Tokens"]
    assert cols[8:] == ["Img ok", "Missing", "Unreadable"]
    train = next(line for line in lines if line.startswith("│ train"))
    cells = [c.strip() for c in train.strip("│ ").split("│")]
    tweets = read_conll(sample_dir / "train.txt")
    assert cells[6] == "300"
    assert cells[5] == str(sum(len(t.entities) for t in tweets))
    assert cells[8:] == ["295", "2", "3"]
    assert "OTHER entities are counted as MISC (0 mapped)" in res.output
    assert "empty 1, not_image 1, truncated 1" in res.output

    res = invoke("data", "stats", sample_dir / "test.txt", "--json")
    doc = json.loads(res.output)
    assert doc["map_other"] is True
    (f,) = doc["files"]
    assert f["split"] == "test" and f["tweets"] == 80 and f["images"] is None
    assert list(f["entities"]) == ["PER", "LOC", "ORG", "MISC"]
    assert f["total"] == sum(f["entities"].values())


def test_data_stats_other_mapping(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("IMGID:1\nWorld\tB-OTHER\nCup\tI-OTHER\nBob\tB-PER\n\n", encoding="utf-8")
    doc = json.loads(invoke("data", "stats", p, "--json").output)
    assert doc["files"][0]["entities"] == {"PER": 1, "LOC": 0, "ORG": 0, "MISC": 1}
    assert doc["files"][0]["other_as_misc"] == 1
    doc = json.loads(invoke("data", "stats", p, "--json", "--keep-other").output)
    assert doc["map_other"] is False
    assert doc["files"][0]["entities"] == {"PER": 1, "LOC": 0, "ORG": 0, "MISC": 0, "OTHER": 1}
    # the same through params.yaml (section data), and -o winning over it
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  map_other: false\n", encoding="utf-8")
    doc = json.loads(invoke("data", "stats", p, "--json", "--params", params).output)
    assert doc["map_other"] is False
    doc = json.loads(
        invoke("data", "stats", p, "--json", "--params", params, "-o", "map_other=true").output
    )
    assert doc["map_other"] is True
    with pytest.raises(
        ConfigError, match="^-o: unknown key mapother; valid keys: map_other, strict$"
    ):
        invoke("data", "stats", p, "-o", "mapother=1")
    with pytest.raises(ConfigError, match="^-o strict: expected true or false, got 3$"):
        invoke("data", "stats", p, "-o", "strict=3")
    params.write_text("data:\n  strict: maybe\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{params}:data.strict: expected true or false"):
        invoke("data", "stats", p, "--params", params)


def test_score_table_json_and_image_dependent(sample_dir, tmp_path):
    gold = read_conll(sample_dir / "test.txt")
    # drop every other entity's prediction: recall about half, precision 100
    labels = []
    for k, tw in enumerate(gold):
        labs = list(tw.labels)
        if k % 2:
            labs = ["O"] * len(labs)
        labels.append(labs)
    pred = write_conll(tmp_path / "pred.txt", gold, labels=labels)
    res = invoke("score", "--gold", sample_dir / "test.txt", "--pred", pred, "--json",
                 "--image-dependent", sample_dir)  # fmt: skip
    doc = json.loads(res.output)
    n_gold = sum(len(t.entities) for t in gold)
    n_pred = sum(len(t.entities) for k, t in enumerate(gold) if k % 2 == 0)
    o = doc["overall"]
    assert (o["n_gold"], o["n_pred"], o["n_correct"], o["precision"]) == (
        n_gold,
        n_pred,
        n_pred,
        100.0,
    )
    assert o["recall"] == pytest.approx(100 * n_pred / n_gold)
    assert list(doc["per_type"]) == ["PER", "LOC", "ORG", "MISC"]
    dep = doc["image_dependent"]
    assert dep["n_gold"] == 26 and dep["precision"] == 100.0 and 0 < dep["n_correct"] < 26

    res = invoke("score", "--gold", sample_dir / "test.txt", "--pred", pred)
    assert res.exit_code == 0
    header = next(line for line in res.output.splitlines() if "PER F1" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == [
        "PER F1", "LOC F1", "ORG F1", "MISC F1", "P", "R", "F1",
    ]  # fmt: skip
    assert f"{o['f1']:.2f}" in res.output


def test_score_rejects_mismatched_tweets(sample_dir):
    with pytest.raises(DataError, match=r"valid.txt:1: tweet 0 is IMGID:"):
        invoke("score", "--gold", sample_dir / "test.txt", "--pred", sample_dir / "valid.txt")


def test_sample_command(tmp_path):
    out = tmp_path / "s"
    params = tmp_path / "params.yaml"
    params.write_text(
        "sample:\n  seed: 4\n  n_train: 30\n  n_valid: 10\n  n_test: 12\n", encoding="utf-8"
    )
    res = invoke("sample", "--out", out, "--size", "small", "--params", params, "-o", "n_valid=11")
    assert res.exit_code == 0, res.output
    # defaults < params.yaml < CLI flags (--size) < -o
    assert "train 120, valid 11, test 40 tweets (+ 18, 2, 6 OCR-dependent)" in res.output
    assert "(seed 4)" in res.output
    cfg = json.loads((out / "sample.json").read_text(encoding="utf-8"))["config"]
    assert (cfg["seed"], cfg["n_train"], cfg["n_valid"], cfg["n_test"]) == (4, 120, 11, 40)
    res = invoke("sample", "--out", out, "--params", params)
    assert "train 30, valid 10, test 12 tweets" in res.output
    res = invoke("sample", "--out", out, "--seed", "9", "--size", "small")
    assert "(seed 9)" in res.output and "test 40" in res.output


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mner.pipeline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_text("IMGID:1\nhello\n", encoding="utf-8")
    res = run_cli("data", "stats", bad)
    assert res.returncode == 2
    assert (
        res.stderr
        == f"error: {bad}:2: token 'hello' has no label; write token<TAB>label, e.g. 'Paris\tB-LOC' or 'the\tO'\n"
    )
    assert res.stdout == ""
