"""The generated sample dataset (mner.data.sample)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from mner.config import build
from mner.data.dataset import load_splits, read_image_dependent
from mner.data.images import ImageStatus, check_image, find_image
from mner.data.sample import (
    AMBIGUOUS_NAMES,
    AMBIGUOUS_TEMPLATES,
    KNOWLEDGE,
    NEUTRAL,
    NEUTRAL_KNOWLEDGE,
    SIGN,
    SampleConfig,
    generate,
    read_image_kinds,
)
from mner.data.sample import SIZES as SAMPLE_PRESETS
from mner.errors import ConfigError, DataError

SIZES = {"train": 300, "valid": 80, "test": 80}  # tests/conftest.py
SIZES_PRESETS = {"default": SAMPLE_PRESETS["default"], "small": SAMPLE_PRESETS["small"]}


def tree_digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_byte_identical(tmp_path):
    cfg = SampleConfig(seed=5, n_train=30, n_valid=12, n_test=12)
    a = tree_digest(generate(cfg, tmp_path / "a"))
    b = tree_digest(generate(cfg, tmp_path / "b"))
    assert a == b
    n_ocr = sum(cfg.ocr_sizes().values())
    assert n_ocr == 8 and len([k for k in a if k.startswith("images/")]) == 54 + n_ocr - 3 * cfg.n_missing
    c = tree_digest(
        generate(SampleConfig(seed=6, n_train=30, n_valid=12, n_test=12), tmp_path / "c")
    )
    assert c["train.txt"] != a["train.txt"]
    # written aside and renamed: nothing partial is left next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_files_are_in_twitter_format(sample_dir):
    text = (sample_dir / "train.txt").read_text(encoding="utf-8")
    blocks = text.split("\n\n")
    assert blocks[-1] == ""  # every tweet, the last too, ends with a blank line
    for block in blocks[:-1]:
        first, *rows = block.split("\n")
        assert re.fullmatch(r"IMGID:\S+", first)
        for row in rows:
            assert re.fullmatch(r"\S+\t(O|[BI]-(PER|LOC|ORG|MISC))", row), row


def test_counts_and_ids(sample_dir):
    splits = load_splits(sample_dir)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    ids = [t.image_id for tweets in splits.values() for t in tweets]
    assert len(set(ids)) == len(ids)
    forms = Counter(
        "2017" if re.fullmatch(r"1[67]_\d\d_\d+", i) else "O" if re.fullmatch(r"O_\d+", i)
        else "2015" if re.fullmatch(r"\d{6}", i) else i
        for i in ids
    )  # fmt: skip
    assert set(forms) == {"2017", "O", "2015"}
    manifest = json.loads((sample_dir / "sample.json").read_text(encoding="utf-8"))
    for split, tweets in splits.items():
        c = manifest["counts"][split]
        assert c["tweets"] == len(tweets)
        assert c["tokens"] == sum(len(t.tokens) for t in tweets)
        assert c["image_dependent"] == round(0.33 * len(tweets))
        for typ in ("PER", "LOC", "ORG", "MISC"):
            n = sum(1 for t in tweets for e in t.entities if e[0] == typ)
            assert c[typ] == n and n > 0.1 * len(tweets)


def test_tweets_look_like_tweets(sample_dir):
    tweets = load_splits(sample_dir)["train"]
    tokens = [tok for t in tweets for tok in t.tokens]
    assert any(tok.startswith("@") for tok in tokens)
    assert any(tok.startswith("#") for tok in tokens)
    assert any(tok.startswith("http://t.co/") for tok in tokens)
    assert "RT" in tokens and "!" in tokens and "," in tokens
    n_ents = Counter(len(t.entities) for t in tweets)
    assert n_ents[0] > 10 and n_ents[2] > 10 and n_ents[3] > 0
    assert any(e - s > 1 for t in tweets for _, s, e in t.entities)  # multi-token entities


def test_image_dependent_side_file_matches_labels_and_is_ambiguous(sample_dir):
    splits = load_splits(sample_dir)
    marks = read_image_dependent(sample_dir, splits)  # checks every row against the labels
    types_of = defaultdict(set)
    for (split, i), spans in marks.items():
        tw = splits[split][i]
        assert len(spans) == 1 and tw.entities == [(spans[0][2], spans[0][0], spans[0][1])]
        s, e, typ = spans[0]
        name = " ".join(tw.tokens[s:e])
        assert name in AMBIGUOUS_NAMES
        types_of[name].add(typ)
    assert sum(len(v) for v in marks.values()) == sum(round(0.33 * n) for n in SIZES.values())
    # every ambiguous name is seen with at least three types: text cannot tell the type
    assert len(types_of) == len(AMBIGUOUS_NAMES)
    assert all(len(t) >= 3 for t in types_of.values()), types_of
    # and they never occur as text-determinable entities
    for split, tweets in splits.items():
        for i, tw in enumerate(tweets):
            if (split, i) not in marks:
                assert not any(
                    " ".join(tw.tokens[s:e]) in AMBIGUOUS_NAMES for _, s, e in tw.entities
                )
    # the context is shared by the types: strip the name and decorations, compare templates
    contexts = defaultdict(set)
    for (split, i), [(s, e, typ)] in marks.items():
        toks = splits[split][i].tokens
        core = tuple(t for t in toks[:s] + ("<E>",) + toks[e:] if t[0] not in "@#h" and t != "RT")
        contexts[core].add(typ)
    assert max(len(t) for t in contexts.values()) == 4


def test_missing_and_corrupt_images(sample_dir):
    kinds = read_image_kinds(sample_dir)
    splits = load_splits(sample_dir)
    marks = read_image_dependent(sample_dir)
    for split, tweets in splits.items():
        found = Counter()
        for i, tw in enumerate(tweets):
            expected = kinds[tw.image_id][1]
            got = check_image(find_image(sample_dir / "images", tw.image_id))
            assert got.value == expected, tw.image_id
            found[got] += 1
            if got is not ImageStatus.OK:
                assert (split, i) not in marks  # broken images spare the image-dependent subset
        assert found[ImageStatus.MISSING] == 2
        assert found[ImageStatus.TRUNCATED] == found[ImageStatus.EMPTY] == 1
        assert found[ImageStatus.NOT_IMAGE] == 1


def test_images_show_the_type_by_global_colour(sample_dir):
    kinds = read_image_kinds(sample_dir)
    splits = load_splits(sample_dir)
    feats, labels, sizes = [], [], []
    for tw in splits["train"] + splits["valid"]:
        kind, status = kinds[tw.image_id]
        if status != "ok":
            continue
        with Image.open(find_image(sample_dir / "images", tw.image_id)) as im:
            sizes.append(im.size)
            arr = np.asarray(im.convert("RGB"), dtype=np.float64) / 255
        feats.append(np.concatenate([arr.mean((0, 1)), arr.std((0, 1))]))
        labels.append(kind)
    feats, labels = np.array(feats), np.array(labels)
    # nearest centroid on mean/std colour, fitted on the first half, tested on the second
    half = len(labels) // 2
    names = sorted(set(labels))
    assert names == sorted(["PER", "LOC", "ORG", "MISC", NEUTRAL])
    cents = np.stack([feats[:half][labels[:half] == k].mean(0) for k in names])
    pred = np.array(names)[np.argmin(((feats[half:, None] - cents[None]) ** 2).sum(-1), 1)]
    assert (pred == labels[half:]).mean() >= 0.97
    longest = [max(s) for s in sizes]
    assert 96 <= min(longest) and max(longest) <= 224 and min(longest) < 150
    assert sum(w != h for w, h in sizes) > 0.8 * len(sizes)


def test_image_kinds_match_text(sample_dir):
    kinds = read_image_kinds(sample_dir)
    marks = read_image_dependent(sample_dir)
    tweets = load_splits(sample_dir)["train"]
    unrelated = with_entities = 0
    for i, tw in enumerate(tweets):
        kind = kinds[tw.image_id][0]
        if ("train", i) in marks:
            assert kind == marks[("train", i)][0][2]
        elif not tw.entities:
            assert kind == NEUTRAL
        else:
            with_entities += 1
            unrelated += kind == NEUTRAL
            assert kind in (NEUTRAL, tw.entities[0][0])
    assert 0.1 < unrelated / with_entities < 0.3


def test_refuses_to_replace_other_files(tmp_path):
    cfg = SampleConfig(n_train=20, n_valid=10, n_test=10)
    (tmp_path / "mine.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(DataError, match="not a previous mner sample"):
        generate(cfg, tmp_path)
    assert (tmp_path / "mine.txt").read_text(encoding="utf-8") == "keep me"
    out = tmp_path / "s"
    generate(cfg, out)
    generate(SampleConfig(seed=1, n_train=20, n_valid=10, n_test=10), out)  # replaces a sample
    assert "(seed 1)" in (out / "README.md").read_text(encoding="utf-8")
    generate(cfg, tmp_path, overwrite=True)
    assert not (tmp_path / "mine.txt").exists() and (tmp_path / "train.txt").is_file()


def test_config_validation():
    with pytest.raises(ConfigError, match=r"sample: n_train must be >= 0"):
        build(SampleConfig, {"n_train": -1}, where="sample")
    with pytest.raises(ConfigError, match="image_dependent_share must be between 0 and 1"):
        build(SampleConfig, {"image_dependent_share": 1.5}, where="sample")
    with pytest.raises(ConfigError, match="ocr_dependent_share must be between 0 and 1"):
        build(SampleConfig, {"ocr_dependent_share": -0.1}, where="sample")
    with pytest.raises(ConfigError, match="min_image_size"):
        build(SampleConfig, {"image_size": 64, "min_image_size": 96}, where="sample")
    with pytest.raises(ConfigError, match="unknown key n_dev"):
        build(SampleConfig, {"n_dev": 3}, where="sample")


def test_too_many_broken_images_for_a_split(tmp_path):
    cfg = SampleConfig(n_train=6, n_valid=6, n_test=6, n_missing=3, n_corrupt=3)
    with pytest.raises(ConfigError, match="n_missing \\+ n_corrupt = 6"):
        generate(cfg, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# What mner wrote before the OCR-dependent tweets existed, for SampleConfig() (seed 0,
# default settings) and the --size small preset: (length, sha256) of each file's old
# content, and (count, sha256) over the old images ("images/<id>.jpg <sha256>" lines,
# sorted by name). The new tweets are appended after these bytes; nothing before them
# may change.
OLD_SAMPLES = {
    "default": ({}, {
        "train.txt": (66095, "8c6e3e5f84b71c28af70a0bed74fbe1efe08509493661758705674e420b56c32"),
        "valid.txt": (16691, "618ca82c65365bfbf8a36ce6fe3a33517fc9080cabb68f0ad3cf496d4656e134"),
        "test.txt": (16505, "7615914a261dc16afe56802ea25afebf49e8a529242a84e089c04ed25031464a"),
        "image_dependent.tsv": (7907, "49c021eb2fd271e89bcf67c6813dd88634ae484f0b00dd729ea6c96071eab11a"),
        "image_kinds.tsv": (23639, "1faf182734284167a441bd49bdf1297ad59b3f301ad023ff70e38cb0824d298c"),
    }, (894, "fb459db578b49f2e38dade1ffcbb52fb1bdb4b904186edd2885ec2530901445a"), (90, 22, 22)),
    "small": ({"n_train": 120, "n_valid": 40, "n_test": 40}, {
        "train.txt": (13049, "eebcc018c568e0b9157dddc45b8a635b52c87446c58bc3272128a562455fd2d5"),
        "valid.txt": (4271, "f1b17e71726e2bda86b61c002d65c40adaf2d59427aa645cb806672576dde028"),
        "test.txt": (4312, "56e70eb2137510be3943747db2daa63006c23ec2e90f12988c4476552f96d0bf"),
        "image_dependent.tsv": (1732, "71b9d19e75e8008700b5c47b1f2c522a822f1d1dadf64b1720348a79966a8e52"),
        "image_kinds.tsv": (5220, "442e34b242eec95f4aa28d06cab2c5cfba959a373fd5a4b68d84942947c900d0"),
    }, (194, "639ea188914323ee3249aedab47b03528ad2d70a2795b484f77df50218cfa5dc"), (18, 6, 6)),
}  # fmt: skip


@pytest.mark.parametrize("which", ["small", pytest.param("default", marks=pytest.mark.slow)])
def test_old_sample_is_unchanged_by_the_ocr_tweets(tmp_path, which):
    settings, text, images, n_ocr = OLD_SAMPLES[which]
    assert SIZES_PRESETS[which] == settings  # the presets the digests were recorded with
    out = generate(SampleConfig(**settings), tmp_path / "s")
    for name, (n, digest) in text.items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data[:n]).hexdigest() == digest, name
        # appended after the old bytes; the image-dependent list itself is unchanged
        assert len(data) == n if name == "image_dependent.tsv" else len(data) > n, name
    old_rows = (out / "image_kinds.tsv").read_bytes()[: text["image_kinds.tsv"][0]]
    old_ids = [r.split("\t")[2] for r in old_rows.decode().splitlines()[1:]]
    files = [f"images/{i}.jpg" for i in old_ids if (out / "images" / f"{i}.jpg").is_file()]
    lines = "".join(f"{f} {hashlib.sha256((out / f).read_bytes()).hexdigest()}\n" for f in sorted(files))
    assert (len(files), hashlib.sha256(lines.encode()).hexdigest()) == images
    counts = json.loads((out / "sample.json").read_text(encoding="utf-8"))["counts"]
    assert tuple(c["ocr_dependent"] for c in counts.values()) == n_ocr


def test_ocr_dependent_tweets_are_typed_only_by_their_sign(ocr_sample_dir):
    splits = load_splits(ocr_sample_dir)
    assert {k: len(v) for k, v in splits.items()} == {"train": 150, "valid": 50, "test": 50}
    marks = read_image_dependent(ocr_sample_dir / "ocr_dependent.tsv", splits)  # checks the spans
    assert len(marks) == 50 and not set(marks) & set(read_image_dependent(ocr_sample_dir))
    kinds = read_image_kinds(ocr_sample_dir)
    base = {"train": 120, "valid": 40, "test": 40}
    types = Counter()
    templates = {tuple(t.split()) for t in AMBIGUOUS_TEMPLATES}
    for (split, i), [(s, e, typ)] in marks.items():
        tw = splits[split][i]
        assert i >= base[split]  # appended after the split's other tweets
        assert tw.entities == [(typ, s, e)] and tw.tokens[s] in AMBIGUOUS_NAMES and e == s + 1
        toks = tw.tokens[:s] + ("{E}",) + tw.tokens[e:]
        assert any(toks[k: k + len(t)] == t for t in templates for k in range(len(toks))), toks
        assert kinds[tw.image_id] == (SIGN, "ok")
        with Image.open(find_image(ocr_sample_dir / "images", tw.image_id)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float64)
            assert im.size[0] == 224  # drawn at the largest size, legible
        # grey around a light board: the colours do not tell the type
        assert np.abs(arr.mean((0, 1)) - arr.mean()).max() < 12
        types[typ] += 1
    assert set(types) == {"PER", "LOC", "ORG", "MISC"} and min(types.values()) >= 8
    assert all(i < base[s] for (s, i) in read_image_dependent(ocr_sample_dir))


def test_knowledge_file_states_the_type_of_dependent_entities_only(ocr_sample_dir):
    splits = load_splits(ocr_sample_dir)
    lines = (ocr_sample_dir / "knowledge.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in lines]
    tweets = [t for s in ("train", "valid", "test") for t in splits[s]]
    assert [r["image_id"] for r in rows] == [t.image_id for t in tweets]
    assert all(set(r) == {"image_id", "context"} and r["context"] for r in rows)
    marks = {**read_image_dependent(ocr_sample_dir), **read_image_dependent(ocr_sample_dir / "ocr_dependent.tsv")}
    index = {t.image_id: (s, i) for s in splits for i, t in enumerate(splits[s])}
    typed = 0
    for r, tw in zip(rows, tweets, strict=True):
        key = index[tw.image_id]
        if key in marks:
            [(s, e, typ)] = marks[key]
            name = " ".join(tw.tokens[s:e])
            assert r["context"] in {k.replace("{E}", name) for k in KNOWLEDGE[typ]}, r
            typed += 1
        else:
            assert r["context"] in NEUTRAL_KNOWLEDGE
    assert typed == len(marks) == 40 + 13 + 13 + 50
