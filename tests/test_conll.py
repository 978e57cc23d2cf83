"""The CoNLL reader/writer, dataset folders, side file and image lookup (mner.data)."""

from __future__ import annotations

import hashlib
import io
import json
import re

import pytest
from PIL import Image

from mner.data.conll import Tweet, read_conll, write_conll
from mner.data.dataset import load_splits, read_image_dependent
from mner.data.images import ImageStatus, check_image, find_image
from mner.errors import DataError

GOOD = (
    "IMGID:17_06_12483\n"
    "RT\tO\n@jack\tO\nKevin\tB-PER\nDurant\tI-PER\nin\tO\nOakland\tB-LOC\n"
    "\n"
    "IMGID:O_1926\n"
    "World\tB-OTHER\nCup\tI-OTHER\n#win\tO\n"
    "\n"
)


def write(tmp_path, text: str | bytes, name: str = "data.txt"):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8", newline="")
    return p


def test_reads_tweets_and_maps_other(tmp_path):
    p = write(tmp_path, GOOD)
    tweets = read_conll(p)
    assert len(tweets) == 2
    a, b = tweets
    assert a.image_id == "17_06_12483" and b.image_id == "O_1926"
    assert a.tokens == ("RT", "@jack", "Kevin", "Durant", "in", "Oakland")
    assert a.labels == ("O", "O", "B-PER", "I-PER", "O", "B-LOC")
    assert b.labels == ("B-MISC", "I-MISC", "O")
    assert (a.line, a.index, b.line, b.index) == (1, 0, 9, 1)
    assert a.source == str(p)
    assert a.entities == [("PER", 2, 4), ("LOC", 5, 6)]
    assert read_conll(p, map_other=False)[1].labels == ("B-OTHER", "I-OTHER", "O")


def test_tolerates_bom_crlf_spaces_trailing_whitespace(tmp_path):
    messy = "\ufeff" + GOOD.replace("\t", "   ").replace("\n", "  \r\n")
    p = write(tmp_path, messy.encode("utf-8"))
    clean = read_conll(write(tmp_path, GOOD, "clean.txt"))
    got = read_conll(p)
    assert [(t.image_id, t.tokens, t.labels, t.line) for t in got] == [
        (t.image_id, t.tokens, t.labels, t.line) for t in clean
    ]


def test_unicode_spaces_inside_tokens_are_kept(tmp_path):
    # U+2028 and U+00A0 are not separators in the Twitter files; str.split would break them.
    p = write(tmp_path, "IMGID:996537\na\u00a0b\tO\nx\u2028y\tB-PER\n")
    tw = read_conll(p)[0]
    assert tw.tokens == ("a\u00a0b", "x\u2028y")
    assert tw.labels == ("O", "B-PER")


def test_imgid_without_blank_line_starts_a_new_tweet(tmp_path):
    p = write(tmp_path, "IMGID:1\na\tO\nIMGID:2\nb\tB-LOC\n")
    assert [t.image_id for t in read_conll(p)] == ["1", "2"]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("IMGID:1\nhello\tO\nworld\n", 3, "has no label"),
        ("IMGID:1\nhello\tB-FOO\n", 2, "unknown label 'B-FOO'"),
        ("IMGID:1\nhello\tPER\n", 2, "unknown label 'PER'"),
        ("IMGID:1\nhello\tO\n\nworld\tO\n", 4, "no IMGID line"),
        ("hello\tO\n", 1, "no IMGID line"),
        ("IMGID:1\na\tO\tO\n", 2, "expected 2 columns"),
        ("IMGID:1\n\nIMGID:2\na\tO\n", 1, "has no tokens"),
        ("IMGID:a/b\na\tO\n", 1, "bad image id"),
        ("IMGID:\na\tO\n", 1, "bad image id"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, text, line, words):
    p = write(tmp_path, text)
    with pytest.raises(DataError) as exc:
        read_conll(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert words in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text", ["", "\n\n  \n", "\ufeff\r\n"])
def test_empty_file(tmp_path, text):
    p = write(tmp_path, text.encode("utf-8"))
    with pytest.raises(DataError, match=r"file is empty"):
        read_conll(p)


def test_non_utf8_byte_reports_its_line(tmp_path):
    p = write(tmp_path, b"IMGID:1\nhello\tO\ncaf\xe9\tO\n")
    with pytest.raises(DataError) as exc:
        read_conll(p)
    assert str(exc.value).startswith(f"{p}:3: byte 0xe9 at column 4 is not valid UTF-8")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_conll(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="is a folder"):
        read_conll(tmp_path)


def test_strict_vs_lenient_i_after_o(tmp_path):
    p = write(
        tmp_path, "IMGID:1\nthe\tO\nBig\tI-LOC\nApple\tI-LOC\nand\tO\nBob\tB-PER\nSmith\tI-ORG\n"
    )
    tw = read_conll(p)[0]
    # lenient: read as conlleval does, stored as BIO2
    assert tw.labels == ("O", "B-LOC", "I-LOC", "O", "B-PER", "B-ORG")
    with pytest.raises(DataError) as exc:
        read_conll(p, strict=True)
    assert str(exc.value).startswith(f"{p}:3: I-LOC follows O")
    ok = write(tmp_path, GOOD, "good.txt")
    assert len(read_conll(ok, strict=True)) == 2


def test_reads_bioes_files_into_bio2(tmp_path):
    p = write(
        tmp_path, "IMGID:1\nNew\tB-LOC\nYork\tE-LOC\nObama\tS-PER\nWorld\tB-OTHER\nCup\tE-OTHER\n"
    )
    tw = read_conll(p, strict=True)[0]
    assert tw.labels == ("B-LOC", "I-LOC", "B-PER", "B-MISC", "I-MISC")
    bad = write(tmp_path, "IMGID:1\nNew\tB-LOC\nYork\tO\nObama\tS-PER\n", "bad.txt")
    with pytest.raises(DataError, match=r"bad.txt:2: B-LOC is not closed"):
        read_conll(bad, strict=True)
    assert read_conll(bad)[0].labels == ("B-LOC", "O", "B-PER")


def test_write_read_round_trip_both_schemes(tmp_path):
    tweets = read_conll(write(tmp_path, GOOD))
    for scheme in ("bio2", "bioes"):
        out = write_conll(tmp_path / f"{scheme}.txt", tweets, scheme=scheme)
        back = read_conll(out, strict=True)
        assert [(t.image_id, t.tokens, t.labels) for t in back] == [
            (t.image_id, t.tokens, t.labels) for t in tweets
        ]
    text = (tmp_path / "bioes.txt").read_text(encoding="utf-8")
    assert "Oakland\tS-LOC\n" in text and "Durant\tE-PER\n" in text
    assert text.startswith("IMGID:17_06_12483\nRT\tO\n") and text.endswith("#win\tO\n\n")


def test_write_with_prediction_labels_pads_with_o(tmp_path):
    tweets = read_conll(write(tmp_path, GOOD))
    out = write_conll(tmp_path / "pred.txt", tweets, labels=[["B-ORG"], []])
    back = read_conll(out)
    assert back[0].labels == ("B-ORG", "O", "O", "O", "O", "O")
    assert back[1].labels == ("O", "O", "O")
    with pytest.raises(ValueError, match="2 label sequences for 1 tweets"):
        write_conll(tmp_path / "x.txt", tweets[:1], labels=[[], []])
    assert not list(tmp_path.glob("*.partial"))


def test_tweet_key_depends_on_tokens_and_labels():
    a = Tweet("1", ("a", "b"), ("O", "O"))
    assert re.fullmatch(r"[0-9a-f]{16}", a.key)
    assert a.key == Tweet("2", ("a", "b"), ("O", "O"), "elsewhere", 5, 3).key
    assert a.key != Tweet("1", ("a b",), ("O",)).key
    assert a.key != Tweet("1", ("a", "b"), ("B-PER", "O")).key
    # the documented definition: the cache stores these keys, so it must not drift
    payload = json.dumps([["a", "b"], ["O", "O"]], ensure_ascii=False).encode("utf-8")
    assert a.key == hashlib.sha1(payload).hexdigest()[:16] == "bd321592e6e63fb5"


def test_load_splits_folder_and_files(tmp_path):
    write(tmp_path, GOOD, "train.txt")
    write(tmp_path, GOOD, "dev.txt")
    write(tmp_path, GOOD.split("\n\n")[0] + "\n", "test.txt")
    splits = load_splits(tmp_path)
    assert list(splits) == ["train", "valid", "test"]
    assert [len(v) for v in splits.values()] == [2, 2, 1]
    files = load_splits([tmp_path / "test.txt", tmp_path / "dev.txt"])
    assert list(files) == ["valid", "test"]
    with pytest.raises(DataError, match="holds the valid split"):
        load_splits([tmp_path / "dev.txt", tmp_path / "dev.txt"])
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no train.txt"):
        load_splits(tmp_path / "images")


def test_read_image_dependent_checks_rows(tmp_path):
    write(tmp_path, GOOD, "train.txt")
    splits = load_splits(tmp_path)
    header = "split\tindex\timage_id\tstart\tend\ttype\n"
    tsv = write(tmp_path, header + "train\t0\t17_06_12483\t5\t6\tLOC\ntrain\t0\t17_06_12483\t2\t4\tPER\n",
                "image_dependent.tsv")  # fmt: skip
    assert read_image_dependent(tmp_path, splits) == {("train", 0): [(2, 4, "PER"), (5, 6, "LOC")]}
    assert read_image_dependent(tmp_path / "nothing") == {}
    cases = [
        ("train\t0\t17_06_12483\t5\t6\tPER\n", "is not a gold entity"),
        ("train\t0\tO_1926\t5\t6\tLOC\n", "has IMGID:17_06_12483, not O_1926"),
        ("train\t9\tO_1926\t0\t1\tLOC\n", "no index 9"),
        ("train\tx\tO_1926\t0\t1\tLOC\n", "must be integers"),
        ("train\t0\tO_1926\t3\t3\tLOC\n", "start < end"),
        ("train\t0\n", "expected 6 tab-separated columns"),
        ("trian\t0\tO_1926\t0\t1\tLOC\n", "unknown split 'trian'"),
    ]
    for row, words in cases:
        tsv.write_text(header + row, encoding="utf-8")
        with pytest.raises(DataError) as exc:
            read_image_dependent(tmp_path, splits)
        assert str(exc.value).startswith(f"{tsv}:2: ") and words in str(exc.value), str(exc.value)
    tsv.write_text("split index\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":1: expected the header"):
        read_image_dependent(tmp_path)


def _jpeg_bytes(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_find_image_extensions(tmp_path):
    assert find_image(tmp_path, "17_06_1") is None
    (tmp_path / "17_06_1.png").write_bytes(b"x")
    assert find_image(tmp_path, "17_06_1") == tmp_path / "17_06_1.png"
    (tmp_path / "17_06_1.jpg").write_bytes(b"x")
    assert find_image(tmp_path, "17_06_1") == tmp_path / "17_06_1.jpg"  # .jpg first
    (tmp_path / "O_5.jpeg").write_bytes(b"x")
    assert find_image(tmp_path, "O_5") == tmp_path / "O_5.jpeg"


def test_check_image_statuses(tmp_path):
    data = _jpeg_bytes()
    (tmp_path / "ok.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "html.jpg").write_text("<html>404</html>", encoding="utf-8")
    assert check_image(tmp_path / "ok.jpg") is ImageStatus.OK
    assert check_image(tmp_path / "cut.jpg") is ImageStatus.TRUNCATED
    assert check_image(tmp_path / "empty.jpg") is ImageStatus.EMPTY
    assert check_image(tmp_path / "html.jpg") is ImageStatus.NOT_IMAGE
    assert check_image(None) is ImageStatus.MISSING
    assert check_image(tmp_path / "gone.jpg") is ImageStatus.MISSING
    assert check_image(tmp_path / "ok.jpg", max_pixels=40 * 30 - 1) is ImageStatus.TOO_LARGE
    assert ImageStatus("unreadable") is ImageStatus.UNREADABLE and ImageStatus.OK == "ok"
    assert {s.value for s in ImageStatus} == {
        "ok", "missing", "unreadable", "empty", "truncated", "too_large", "not_image", "outside",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("image_id", "ok"),
    [("17_06_12483", True), ("O_1926", True), ("a.b", True), ("..x", True),
     ("", False), (".", False), ("..", False), ("a/b", False), ("../../x", False),
     ("/etc/passwd", False), ("a\\b", False), ("a b", False), ("a\x00b", False)],
)
def test_is_image_id_is_the_one_rule_for_ids(tmp_path, image_id, ok):
    from mner.data.conll import is_image_id

    assert is_image_id(image_id) is ok
    if "\n" not in image_id and " " not in image_id:  # CoNLL applies the same rule
        p = write(tmp_path, f"IMGID:{image_id}\na\tO\n")
        if ok:
            assert read_conll(p)[0].image_id == image_id
        else:
            with pytest.raises(DataError, match=r":1: bad image id"):
                read_conll(p)


def test_duplicated_imgid_warns_with_both_lines(tmp_path, capsys):
    p = write(tmp_path, "IMGID:7\na\tO\n\nIMGID:8\nb\tO\n\nIMGID:7\nc\tO\n\nIMGID:7\nd\tO\n")
    said = []
    tweets = read_conll(p, warn=said.append)
    assert [t.image_id for t in tweets] == ["7", "8", "7", "7"]  # read, not refused
    assert said == [
        f"warning: {p}:7: IMGID:7 already at line 1; both tweets get the same image "
        "(remove the duplicate or fix the id)",
        f"warning: {p}:10: IMGID:7 already at line 1; both tweets get the same image "
        "(remove the duplicate or fix the id)",
    ]
    # default: the same lines on stderr; load_splits passes them through
    read_conll(p)
    assert capsys.readouterr().err.splitlines() == said
    said.clear()
    p.rename(tmp_path / "train.txt")
    write(tmp_path, "IMGID:7\na\tO\n", "test.txt")  # the same id in another split is fine
    load_splits(tmp_path, warn=said.append)
    assert len(said) == 2 and all("train.txt:" in s for s in said)


def test_many_duplicates_are_summarised_after_ten(tmp_path):
    from mner.data.conll import MAX_DUPLICATE_WARNINGS

    p = write(tmp_path, "".join(f"IMGID:{i % 3}\na\tO\n\n" for i in range(20)))
    said = []
    read_conll(p, warn=said.append)
    assert len(said) == MAX_DUPLICATE_WARNINGS + 1
    assert said[-1] == f"warning: {p}: 7 more duplicated IMGID(s) not listed (17 in all)"


def test_cli_data_stats_shows_duplicate_warning(tmp_path, mner_cli):
    write(tmp_path, "IMGID:5\na\tB-PER\n\nIMGID:5\nb\tO\n", "train.txt")
    code, out, err = mner_cli("data", "stats", str(tmp_path))
    assert code == 0 and out
    assert err.splitlines() == [
        f"warning: {tmp_path / 'train.txt'}:4: IMGID:5 already at line 1; both tweets get the "
        "same image (remove the duplicate or fix the id)"
    ]


def test_generated_sample_has_no_duplicated_imgid(sample_dir):
    for split in ("train", "valid", "test"):
        said = []
        read_conll(sample_dir / f"{split}.txt", warn=said.append)
        assert said == [], split


def test_problems_list_collects_bad_tweets_and_keeps_the_good(tmp_path):
    text = (
        "IMGID:1\nKevin\tB-PER\n\n"          # 1-2 good
        "IMGID:a/b\nx\tO\ny\tO\n\n"          # 4 bad id, its lines skipped
        "IMGID:3\nhello\tO\nworld\n\n"       # 10 no label
        "orphan\tO\nmore\tO\n\n"             # 12 no IMGID (once)
        "IMGID:5\nParis\tB-FOO\n\n"          # 16 unknown label
        "IMGID:6\n"                          # 18 no tokens
        "IMGID:7\nOakland\tB-LOC\n"          # 19-20 good
    )
    p = write(tmp_path, text)
    problems = ["earlier entry"]
    tweets = read_conll(p, problems=problems)
    assert [(t.image_id, t.tokens) for t in tweets] == [("1", ("Kevin",)), ("7", ("Oakland",))]
    assert [t.line for t in tweets] == [1, 19]
    assert problems[0] == "earlier entry"
    assert [m.split(": ", 1)[0] for m in problems[1:]] == [f"{p}:{n}" for n in (4, 10, 12, 16, 18)]
    assert "bad image id 'a/b'" in problems[1] and "has no label" in problems[2]
    assert "no IMGID line" in problems[3] and "unknown label 'B-FOO'" in problems[4]
    assert "has no tokens" in problems[5]
    # without the list, the first problem raises as before
    with pytest.raises(DataError, match=f"^{re.escape(str(p))}:4: bad image id"):
        read_conll(p)
