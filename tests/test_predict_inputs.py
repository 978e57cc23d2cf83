"""``mner predict`` never answers silently wrong: image statuses, id escapes, bad input lines.

One tiny UMT run (1 epoch, 1 seed, tiny-profile cache) is trained per module, on a slice of
the sample whose train split repeats one IMGID, so the duplicate warning of training is
checked on the way.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import zlib

import pytest
from PIL import Image

from mner.apps.predict import NO_IMAGE, OUTSIDE, ImageCheck, Post, Predictor, read_posts
from mner.data.conll import read_conll
from mner.extract.images import load_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(sample_dir, tmp_path_factory):
    """A small slice of the sample (fast to train), with train.txt's first tweet repeated
    and test.txt holding good and broken images."""
    from mner.data.images import find_image

    out = tmp_path_factory.mktemp("dup_sample")
    for name, n in (("train.txt", 80), ("valid.txt", 20), ("test.txt", 12)):
        every = (sample_dir / name).read_text(encoding="utf-8").strip("\n").split("\n\n")
        tweets = every[:n]
        if name == "train.txt":
            tweets.append(tweets[0])
        if name == "test.txt":  # and 8 whose image is broken or missing
            tweets += [t for t in every[n:] if not load_image(
                find_image(sample_dir / "images", t.split("\n")[0][len("IMGID:"):])).ok][:8]
        (out / name).write_text("\n\n".join(tweets) + "\n\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def trained(data, tiny_cache, tmp_path_factory):
    """``(run folder, what training printed on stderr)``."""
    from mner.train.config import make_train_config
    from mner.train.trainer import train_run

    cfg = make_train_config({"model": "umt", "profile": "tiny"}, ["epochs=1", "seeds=[1]"])
    out = tmp_path_factory.mktemp("runs") / "umt"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train_run(cfg, data, tiny_cache, out)
    return out, err.getvalue()


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor(trained[0], device="cpu")


def test_training_warns_about_a_duplicated_imgid(trained, data):
    tweets = read_conll(data / "train.txt", warn=lambda m: None)
    dup = tweets[-1]
    line = (f"warning: {data / 'train.txt'}:{dup.line}: IMGID:{dup.image_id} already at line 1; "
            "both tweets get the same image (remove the duplicate or fix the id)")
    assert trained[1].splitlines().count(line) == 1


def same_entities(got, want, tol=1e-2):
    """Equal entity lists, scores to within the rounding of a different batch composition."""
    return len(got) == len(want) and all(
        {k: v for k, v in g.items() if k != "score"} == {k: v for k, v in w.items() if k != "score"}
        and abs(g["score"] - w["score"]) <= tol for g, w in zip(got, want, strict=True)
    )


def _lines(tmp_path, records, name="in.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f


def _png_claiming(path, width, height):
    """A real 2x2 PNG whose header (with a valid CRC) claims ``width`` x ``height``."""
    Image.new("RGB", (2, 2), "red").save(path)
    raw = bytearray(path.read_bytes())
    # IHDR data starts at byte 16: width, height (big-endian), then 5 bytes of settings
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture
def zoo(sample_dir, tmp_path):
    """An images folder with one good image and every kind of bad one, plus outsiders."""
    images = tmp_path / "images"
    images.mkdir()
    good = next(p for p in sorted((sample_dir / "images").glob("*.jpg")) if load_image(p).ok)
    shutil.copy(good, images / "good.jpg")
    jpeg = good.read_bytes()
    (images / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "page.jpg").write_text("<html>404 not found</html>")
    (images / "zero.jpg").write_bytes(b"")
    (images / "dir.jpg").mkdir()
    _png_claiming(images / "bomb.png", 20000, 20000)
    secret = tmp_path / "secret.jpg"
    shutil.copy(good, secret)
    (images / "link.jpg").symlink_to(secret)
    (images / "inner.jpg").symlink_to(images / "good.jpg")  # a link inside the folder is fine
    return images


def test_read_posts_finds_each_image_status_by_id(zoo, predictor, tmp_path):
    ids = ["good", "cut", "page", "zero", "dir", "bomb", "link", "inner", "nothere"]
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"text": f"post {i}", "image_id": i}) + "\n" for i in ids)
                 + json.dumps({"text": "no image here"}) + "\n")
    posts, problems = read_posts(f, zoo)
    assert problems == []
    got = {p.id: predictor.check_image(p).status for p in posts}
    assert got == {"good": "ok", "cut": "truncated", "page": "not_image", "zero": "empty",
                   "dir": "missing", "bomb": "too_large", "link": OUTSIDE, "inner": "ok",
                   "nothere": "missing", "10": NO_IMAGE}
    long_id = "a" * 300  # longer than a file name may be: missing, not a traceback
    [post], _ = read_posts(_lines(tmp_path, [{"text": "x", "image_id": long_id}], "long.jsonl"), zoo)
    assert predictor.check_image(post) == ImageCheck("missing", f"cannot look it up in {zoo}: File name too long")
    link = next(p for p in posts if p.id == "link")
    assert link.image is None  # never opened
    assert [p.where for p in posts] == [f"{f}:{n}" for n in range(1, 11)]
    # an explicit path is the user's choice: a folder is unreadable, a symlink is followed
    assert predictor.check_image(zoo / "dir.jpg").status == "unreadable"
    assert predictor.check_image(zoo / "link.jpg").status == "ok"


BAD_LINES = [
    ('{"text": 42}', '"text" must be a string or a list of strings, found a number'),
    ('{"text": ["a", 3]}', '"text" must be a string or a list of strings, found a number at position 1'),
    ('{"tokens": "a b"}', '"tokens" must be a list of strings, found a string'),
    ('{"tokens": ["a", "b c"]}', "\"tokens\"[1] is 'b c'; a token is a non-empty string without spaces"),
    ('{"text": null}', '"text" must be a string or a list of strings, found null'),
    ('{"text": "  "}', "\"text\" has no words to tag; give the post's text"),
    ('{"text": []}', '"text" is an empty list; give at least one word'),
    ('{"image_id": "x"}', 'the object has no "text" or "tokens"; write {"text": "..."} or {"tokens": [...]}'),
    ('["text"]', 'expected an object with "text" or "tokens", found a list'),
    ('{"text": "a", "tokens": ["a"]}', 'the object has both "text" and "tokens"; keep one'),
    ('{"text": "a", "image": 3}', '"image" must be a file path (a string), found a number'),
    ('{"text": "a", "image_id": true}', '"image_id" must be a string, found a boolean'),
    ('{"text": "a", "image": "x.jpg", "image_id": "x"}', 'the object has both "image" and "image_id"; keep one'),
    ('{"text": "a"', "not valid JSON (Expecting ',' delimiter at column 13); write one object per line"),
]
ESCAPES = ["../../x", "a/b", "/etc/passwd", "..", "a\\b", ""]


def test_malformed_and_escaping_lines_are_listed_not_fatal(tmp_path, zoo):
    lines = [json.dumps({"text": "Kevin Durant in Oakland", "image_id": "good"})]
    lines += [bad for bad, _ in BAD_LINES]
    lines += [json.dumps({"text": "x", "image_id": e}) for e in ESCAPES]
    lines += [json.dumps({"tokens": ["Paris", "!"], "image": str(zoo / "good.jpg")})]
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(lines) + "\n\n")
    posts, problems = read_posts(f, zoo)
    assert [p.id for p in posts] == ["good", str(len(lines))]
    assert posts[1].text == ("Paris", "!") and posts[1].image == zoo / "good.jpg"
    want = [f"{f}:{n}: {msg}" for n, (_, msg) in enumerate(BAD_LINES, start=2)]
    for n, e in enumerate(ESCAPES, start=len(BAD_LINES) + 2):
        want.append(
            f"{f}:{n}: \"image_id\" {e!r} is not an image id: ids name a file inside --images and "
            "hold no \"/\", \"\\\", spaces, or \".\"/\"..\" alone; give \"image\": PATH for a file elsewhere"
        )
    assert problems == want


def test_cli_reports_each_image_status(trained, predictor, zoo, tmp_path, mner_cli):
    run = trained[0]
    text = "Kevin Durant visits Oakland"
    names = ["good", "cut", "page", "zero", "bomb", "link", "nothere"]
    f = tmp_path / "in.jsonl"
    rows = [{"text": text, "image_id": i} for i in names]
    rows += [{"text": text}, {"text": text, "image": str(zoo / "dir.jpg")}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = mner_cli("predict", "--run", run, "--input", f, "--images", zoo, "--json",
                              "--device", "cpu")
    assert code == 0
    recs = [json.loads(x) for x in out.splitlines()]
    assert [r["image_status"] for r in recs] == [
        "ok", "truncated", "not_image", "empty", "too_large", OUTSIDE, "missing", NO_IMAGE, "unreadable"
    ]
    assert [r["id"] for r in recs] == [*names, "8", "9"]
    # every post whose image is not used is tagged exactly like the post without an image
    blind = predictor(text, None)
    assert all(same_entities(r["entities"], blind) for r in recs[1:])
    assert same_entities(recs[0]["entities"], predictor(text, zoo / "good.jpg"))
    warn = err.splitlines()
    assert len(warn) == 7 and all(w.startswith("warning: ") and w.endswith("; tagged without it") for w in warn)
    for n, w in zip([2, 3, 4, 5, 6, 7, 9], warn, strict=True):
        assert w.startswith(f"warning: {f}:{n}: image ")
    assert f"warning: {f}:2: image cut: truncated (truncated JPEG" in warn[0]
    assert warn[4] == (f"warning: {f}:6: image link: outside ({zoo / 'link.jpg'} leads outside {zoo} "
                       f"(to {(tmp_path / 'secret.jpg').resolve()})); tagged without it")
    assert warn[5] == (f"warning: {f}:7: image nothere: missing (no nothere.jpg/.jpeg/.png in {zoo}); "
                       "tagged without it")
    assert warn[-1].startswith(f"warning: {f}:9: image {zoo / 'dir.jpg'}: unreadable (not a regular file")

    # plain output and --text: the same warning line, no JSON field
    code, out, err = mner_cli("predict", "--run", run, "--text", text, "--image", zoo / "cut.jpg",
                              "--device", "cpu")
    assert code == 0 and err.startswith(f"warning: --text: image {zoo / 'cut.jpg'}: truncated (")
    assert err.count("\n") == 1


def test_strict_images_stops_before_tagging(trained, zoo, tmp_path, mner_cli):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"text": "a b", "image_id": i}) + "\n" for i in ["good", "nothere", "zero"]))
    code, out, err = mner_cli("predict", "--run", trained[0], "--input", f, "--images", zoo,
                              "--strict-images", "--device", "cpu")
    assert code == 2 and out == ""
    assert err == (f"error: {f}:2: image nothere: missing (no nothere.jpg/.jpeg/.png in {zoo}); "
                   f"--strict-images stops on any image that is not ok (2 in all, also {f}:3); "
                   "fix or remove them, or drop --strict-images to tag those posts without their image\n")
    # all ok: strict changes nothing
    f.write_text(json.dumps({"text": "a b", "image_id": "good"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    code, out, err = mner_cli("predict", "--run", trained[0], "--input", f, "--images", zoo,
                              "--strict-images", "--json", "--device", "cpu")
    assert code == 0 and err == ""
    assert [json.loads(x)["image_status"] for x in out.splitlines()] == ["ok", NO_IMAGE]


def test_bad_lines_are_listed_after_the_good_ones_are_tagged(trained, zoo, tmp_path, mner_cli):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "Kevin Durant"}\n{"text": 42}\n\n{"text": "in Oakland"}\n'
                 '{"text": "x", "image_id": "../../etc/passwd"}\nnot json\n')
    code, out, err = mner_cli("predict", "--run", trained[0], "--input", f, "--images", zoo,
                              "--json", "--device", "cpu")
    assert code == 2
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["1", "4"]
    assert err.splitlines() == [
        f'error: {f}:2: "text" must be a string or a list of strings, found a number',
        f"error: {f}:5: \"image_id\" '../../etc/passwd' is not an image id: ids name a file inside "
        "--images and hold no \"/\", \"\\\", spaces, or \".\"/\"..\" alone; give \"image\": PATH for a "
        "file elsewhere",
        f"error: {f}:6: not valid JSON (Expecting value at column 1); write one object per line",
        f"error: {f}: 3 post(s) could not be read (listed above); the other 2 were tagged; "
        "fix those lines and run them again",
    ]
    # nothing good at all: no model is loaded, still one line per bad line and exit 2
    f.write_text('{"text": 42}\n')
    code, out, err = mner_cli("predict", "--run", trained[0], "--input", f, "--device", "cpu")
    assert code == 2 and out == "" and len(err.splitlines()) == 2


def test_conll_input_reports_missing_and_outside_images(trained, data, zoo, tmp_path, mner_cli):
    f = tmp_path / "in.txt"
    f.write_text("IMGID:good\nKevin\tB-PER\n\nIMGID:link\nOakland\tB-LOC\n\nIMGID:gone\nhi\tO\n")
    code, out, err = mner_cli("predict", "--run", trained[0], "--input", f, "--images", zoo,
                              "--json", "--device", "cpu")
    assert code == 0
    assert [json.loads(x)["image_status"] for x in out.splitlines()] == ["ok", OUTSIDE, "missing"]
    assert [w.split(": image ")[0] for w in err.splitlines()] == [f"warning: {f}:4", f"warning: {f}:7"]
    # a malformed tweet among good ones: the good ones are tagged, the bad one listed
    g = tmp_path / "mixed.txt"
    g.write_text("IMGID:good\nKevin\tB-PER\n\nIMGID:x\nOakland\n\nIMGID:nothere\nhi\tO\n")
    code, out, err = mner_cli("predict", "--run", trained[0], "--input", g, "--images", zoo,
                              "--json", "--device", "cpu")
    assert code == 2 and [json.loads(x)["id"] for x in out.splitlines()] == ["good", "nothere"]
    assert err.splitlines()[1:] == [
        f"error: {g}:5: token 'Oakland' has no label; write token<TAB>label, e.g. 'Paris\tB-LOC' or 'the\tO'",
        f"error: {g}: 1 post(s) could not be read (listed above); the other 2 were tagged; "
        "fix those lines and run them again",
    ]
    assert err.splitlines()[0].startswith(f"warning: {g}:7: image nothere: missing")
    # without an images folder, every id is missing, and says how to fix it
    posts, _ = read_posts(f, None)
    assert {p.lookup.message for p in posts} == {"no images folder to look the id up in; pass --images DIR"}


def test_predict_api_keeps_its_signature(predictor, zoo):
    ents = predictor.predict([["Kevin", "Durant"], "in Oakland"], [zoo / "cut.jpg", None])
    assert len(ents) == 2 and all(isinstance(e, list) for e in ents)
    [r] = predictor.tag([Post("a", ("Kevin",), "here", zoo / "zero.jpg", "zero")])
    assert r.image.status == "empty"


def test_flags_of_the_other_mode_are_refused(tmp_path, mner_cli):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "a"}\n')
    code, out, err = mner_cli("predict", "--run", tmp_path, "--input", f, "--image", "x.jpg")
    assert code == 2 and out == "" and err.startswith("error: predict: --image goes with --text;")
    code, out, err = mner_cli("predict", "--run", tmp_path, "--text", "a b", "--images", tmp_path)
    assert code == 2 and err == ("error: predict: --images goes with --input; give --text its image "
                                 "with --image PATH\n")
    code, out, err = mner_cli("predict", "--run", tmp_path, "--text", "   ")
    assert (code, out) == (2, "") and err == "error: --text has no words to tag; pass the tweet's text\n"


def test_predict_agrees_with_the_cache_and_the_training_predictions(trained, data, sample_dir, tiny_cache,
                                                                    mner_cli):
    """Each image's status is the one extraction recorded, and the tags are training's."""
    from mner.cache.reader import FeatureCache
    from mner.data.schemes import entities

    run = trained[0]
    code, out, _ = mner_cli("predict", "--run", run, "--input", data / "test.txt", "--images",
                            sample_dir / "images", "--json", "--device", "cpu")
    assert code == 0
    recs = [json.loads(x) for x in out.splitlines()]
    tweets = read_conll(data / "test.txt")
    cache = FeatureCache(tiny_cache)
    try:
        want = cache.status_of([t.image_id for t in tweets])
    finally:
        cache.close()
    assert [r["image_status"] for r in recs] == want
    assert want.count("ok") == 12 and len(set(want)) >= 3  # good, missing and broken images
    pred = read_conll(run / "seed_1" / "pred_test.txt")
    assert [[(e["entity_group"], e["word_start"], e["word_end"]) for e in r["entities"]] for r in recs] == [
        entities(t.labels) for t in pred
    ]
