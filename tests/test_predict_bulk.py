"""Bulk prediction, the public Python API, scored predictions and ``mner export``.

One tiny UMT run per module, trained through the Python API (``mner.train`` with keyword
options) on the sample and its session tiny-profile cache. The bulk output of a JSON-lines
file (good, missing, broken and no images; raw text and tokens; two malformed lines) is
made once and compared with single-post predictions, with a run killed and resumed, and
with two torchrun ranks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import mner
from mner.apps.bulk import KILL_ENV, predict_file, problems_path
from mner.apps.predict import read_posts
from mner.data.conll import read_conll
from mner.errors import ConfigError, DataError, LockError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(sample_dir, tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bulk_run") / "umt"
    metrics = mner.train(data=sample_dir, features=tiny_cache, out=out, model="umt", profile="tiny",
                         epochs=3, seeds=[1])
    assert metrics["runs"][0]["seed"] == 1
    return out


@pytest.fixture(scope="module")
def predictor(run):
    return mner.load(run, device="cpu")


@pytest.fixture(scope="module")
def posts_file(sample_dir, tmp_path_factory):
    """20 posts of the test split (text or tokens, own id or not, a missing image, no
    image) with a malformed line at lines 5 and 10."""
    tweets = read_conll(sample_dir / "test.txt")[:20]
    lines = []
    for i, t in enumerate(tweets):
        rec = {"text": " ".join(t.tokens)} if i % 2 else {"tokens": list(t.tokens)}
        if i % 3 == 0:
            rec["id"] = f"tweet-{i}"
        if i == 7:
            rec["image_id"] = "not_there"
        elif i != 11:
            rec["image_id"] = t.image_id
        lines.append(json.dumps(rec))
    lines.insert(4, '{"text": "a broken line",')
    lines.insert(9, '{"text": 3}')
    f = tmp_path_factory.mktemp("posts") / "posts.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def bulk(predictor, posts_file, sample_dir, tmp_path_factory):
    """``(result, output bytes)`` of one uninterrupted run with batches of 4 posts."""
    out = tmp_path_factory.mktemp("bulk") / "pred.jsonl"
    res = predict_file(predictor, posts_file, out, images=sample_dir / "images", batch_size=BATCH,
                       progress=False, echo=lambda m: None)
    return res, out.read_bytes()


def same_records(got: dict, want: dict, tol=1e-2) -> bool:
    """Equal output records, scores to within the rounding of another batch composition
    (bfloat16 decoding, the precision the tiny run trained in on a CPU with it, rounds to ~1e-3)."""
    strip = lambda r: {**r, "entities": [{k: v for k, v in e.items() if k != "score"} for e in r["entities"]]}  # noqa: E731
    return strip(got) == strip(want) and all(
        abs(g["score"] - w["score"]) <= tol for g, w in zip(got["entities"], want["entities"], strict=True))


def test_bulk_equals_single_post_predictions(bulk, predictor, posts_file, sample_dir):
    res, data = bulk
    recs = [json.loads(x) for x in data.decode().splitlines()]
    posts, problems = read_posts(posts_file, sample_dir / "images")
    assert len(problems) == 2 and len(recs) == len(posts) == 20 and res.written == 20
    assert [r["line"] for r in recs] == [n for n in range(1, 23) if n not in (5, 10)]
    assert recs[0]["id"] == "tweet-0" and recs[1]["id"] == posts[1].image_ref
    statuses = [r["image_status"] for r in recs]
    assert statuses[7] == "missing" and statuses[11] == "none" and statuses.count("ok") >= 12
    n_ents = 0
    for post, rec in zip(posts, recs, strict=True):
        [alone] = predictor.tag([post])  # one post, as `mner predict --text` tags it
        assert same_records(rec, alone.record(post.id, post.line))
        for e in rec["entities"]:
            text = post.text if isinstance(post.text, str) else " ".join(post.text)
            assert text[e["start"]:e["end"]] == e["word"] and 0.0 <= e["score"] <= 1.0
            n_ents += 1
        if isinstance(post.text, str):  # the API call on raw text gives the same entities
            api = predictor(post.text, post.image if post.image_ref and post.lookup is None else None)
            assert same_records({**rec, "entities": list(api)}, rec)
    assert n_ents >= 5  # the comparison is not between empty lists


def test_malformed_lines_are_reported_and_recorded(bulk, posts_file):
    res, _ = bulk
    assert len(res.problems) == 2
    assert re.fullmatch(re.escape(f"{posts_file}:5: not valid JSON (") + r"[^()]+ at column \d+\); "
                        "write one object per line", res.problems[0])
    assert res.problems[1] == f'{posts_file}:10: "text" must be a string or a list of strings, found a number'


def test_cli_writes_the_same_file_and_exits_2_on_bad_lines(bulk, run, posts_file, sample_dir, tmp_path, mner_cli):
    out = tmp_path / "cli.jsonl"
    args = ("predict", "--run", run, "--input", posts_file, "--images", sample_dir / "images", "--out", out,
            "--batch-size", BATCH, "--device", "cpu")
    code, stdout, err = mner_cli(*args)
    assert code == 2 and stdout == "" and out.read_bytes() == bulk[1]
    lines = err.splitlines()  # errors and warnings (the missing image) as the lines are read
    assert [x for x in lines[:-1] if x.startswith("error: ")] == [f"error: {p}" for p in bulk[0].problems]
    assert [x for x in lines if x.startswith("warning: ")] == [
        f"warning: {posts_file}:9: image not_there: missing (no not_there.jpg/.jpeg/.png in "
        f"{sample_dir / 'images'}); tagged without it"]
    assert lines[-1] == (f"error: {posts_file}: 2 line(s) could not be read (listed above and in "
                         f"{problems_path(out)}); the other posts are in {out}; fix those lines and run them again")
    assert problems_path(out).read_text().splitlines() == bulk[0].problems
    # fixed input: a re-run resumes (nothing to predict), exit 0, the problems file goes
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text("".join(x + "\n" if n not in (5, 10) else "\n"
                             for n, x in enumerate(posts_file.read_text().splitlines(), start=1)))
    code, _, err = mner_cli(*[fixed if a == posts_file else a for a in args])
    assert code == 0 and err == f"predict: wrote 0 post(s) to {out} (20 already there)\n"
    assert out.read_bytes() == bulk[1] and not problems_path(out).exists()


def _cli(*args, env=None):
    e = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], env=e, capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_to_the_same_bytes(bulk, run, predictor, posts_file, sample_dir, tmp_path):
    out = tmp_path / "pred.jsonl"
    p = _cli("-m", "mner", "predict", "--run", run, "--input", posts_file, "--images", sample_dir / "images",
             "--out", out, "--batch-size", BATCH, "--device", "cpu", env={KILL_ENV: "1"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    torn = out.read_bytes()
    assert torn.count(b"\n") == BATCH and not torn.endswith(b"\n")  # one batch, then half a line
    assert bulk[1].startswith(torn)
    res = predict_file(predictor, posts_file, out, images=sample_dir / "images", batch_size=BATCH,
                       progress=False, echo=lambda m: None)
    assert (res.skipped, res.written) == (BATCH, 20 - BATCH)
    assert out.read_bytes() == bulk[1]


def test_two_torchrun_ranks_write_what_one_process_writes(bulk, run, posts_file, sample_dir, tmp_path):
    out = tmp_path / "pred.jsonl"
    p = _cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mner", "predict",
             "--run-dir", run, "--input", posts_file, "--images", sample_dir / "images", "--out", out,
             "--batch-size", BATCH, "--device", "cpu")
    assert p.returncode != 0 and "2 line(s) could not be read" in p.stderr  # rank 0 reports the bad lines
    assert out.read_bytes() == bulk[1]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pred.jsonl", "pred.jsonl.problems.txt"]


def test_output_of_another_input_and_a_second_writer_are_refused(bulk, predictor, sample_dir, tmp_path):
    from mner.locks import OutputLock

    out = tmp_path / "pred.jsonl"
    out.write_bytes(bulk[1])
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "Paris", "id": "x"}\n')
    with pytest.raises(DataError, match=r"input line 1 was post 'tweet-0' there but is 'x' in .*another input"):
        predict_file(predictor, other, out, progress=False)
    with OutputLock(out, folder=False, what="predictions file"), pytest.raises(LockError, match="being written by pid"):
        predict_file(predictor, other, out, progress=False)
    out.write_bytes(b"garbage\n")
    with pytest.raises(DataError, match=r"pred.jsonl:1: not a line of `mner predict --out`"):
        predict_file(predictor, other, out, progress=False)


# -- the Python API ---------------------------------------------------------------------


def test_import_mner_loads_no_torch():
    p = subprocess.run([sys.executable, "-c", "import sys, mner; print('torch' in sys.modules, mner.load.__module__)"],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["False", "mner.apps.api"]


def test_predictor_call_on_paths_pil_images_and_lists(predictor, sample_dir):
    from PIL import Image

    t = read_conll(sample_dir / "test.txt")[0]
    text, image = " ".join(t.tokens), next((sample_dir / "images").glob(f"{t.image_id}.*"))
    by_path = predictor(text, image)
    assert by_path.image_status == "ok" and isinstance(by_path, list)
    with Image.open(image) as im:
        assert predictor(text, im.convert("RGB")) == by_path
    both = predictor([text, text], [image, None])
    assert same_records({"entities": both[0]}, {"entities": by_path})
    assert same_records({"entities": both[1]}, {"entities": predictor(text)}) and both[1].image_status == "none"
    with pytest.raises(DataError, match="2 texts: pass a list of as many images"):
        predictor([text, text], [image])
    with pytest.raises(DataError, match="no words to tag"):
        predictor("  ")


def test_stage_functions_take_options_or_config_objects(run, sample_dir, tmp_path):
    from mner.extract.config import ExtractConfig

    with pytest.raises(ConfigError, match=r"mner.train\(\): unknown option epoch; valid options: "):
        mner.train(data=sample_dir, out=tmp_path / "x", model="umt", epoch=3)
    with pytest.raises(ConfigError, match=r"--epochs"):
        mner.train(data=sample_dir, out=tmp_path / "x", model="umt", epochs="many")
    with pytest.raises(ConfigError, match="either config= or options"):
        mner.extract(ExtractConfig(), images=sample_dir / "images", out=tmp_path / "c.h5", profile="tiny")
    # mner.extract with keyword options writes the cache `mner extract` would
    mini = tmp_path / "mini.txt"
    mini.write_text("\n\n".join((sample_dir / "test.txt").read_text().split("\n\n")[:3]) + "\n\n")
    res = mner.extract(images=sample_dir / "images", data=mini, out=tmp_path / "c.h5", profile="tiny",
                       features=["resnet"], device="cpu", threads=1, progress=False)
    assert res["images"] == 3 and (tmp_path / "c.h5").is_file()
    # mner.evaluate scores the run as training scored its test split
    test_f1 = json.loads((run / "metrics.json").read_text())["runs"][0]["test"]["overall"]["f1"]
    assert mner.evaluate(run, sample_dir / "test.txt", device="cpu")["overall"]["f1"] == pytest.approx(test_f1)


# -- export -----------------------------------------------------------------------------


def test_export_moves_to_another_place_and_predicts_identically(run, predictor, sample_dir, tiny_cache, tmp_path,
                                                                mner_cli):
    work = tmp_path / "work"
    src = work / "umt"
    shutil.copytree(run, src)
    code, out, err = mner_cli("export", src, "--out", work / "exported")
    assert code == 0, err
    assert out.startswith(f"wrote {work / 'exported'} (model card: ")
    code, _, err = mner_cli("export", src, "--out", work / "exported")
    assert code == 2 and "already exists; pass --overwrite" in err
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(work / "exported", moved)
    shutil.rmtree(work)  # the run and the first export are gone
    # no absolute path of this machine anywhere, in any file (weights included)
    roots = {str(tmp_path), str(run), str(sample_dir), str(tiny_cache), str(tiny_cache.parent), str(Path.home())}
    for f in moved.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not [r for r in roots if r.encode() in data], f
    assert sorted(p.name for p in moved.iterdir()) == [
        "README.md", "config.yaml", "metrics.json", "mner_export.json", "provenance.json", "seed_1"]
    assert sorted(p.name for p in (moved / "seed_1").iterdir()) == ["encoder", "labels.json", "model.safetensors"]
    for f in ("model.safetensors", "encoder/tokenizer.json"):  # a vocabulary has tokens such as "/"
        assert (moved / "seed_1" / f).read_bytes() == (run / "seed_1" / f).read_bytes()
    # the model card: Hugging Face front matter, then the card
    card = (moved / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    metrics = json.loads((run / "metrics.json").read_text())["summary"]
    assert front["library_name"] == "mner" and "umt" in front["tags"] and front["datasets"]
    [res] = front["model-index"][0]["results"]
    assert res["metrics"][0] == {"type": "f1", "value": round(metrics["test"]["overall"]["f1"]["mean"], 2),
                                 "name": "test f1 (mean of 1 seed)"}
    body = card.split("---\n", 2)[2]
    for needle in ("## Model", "## Data", "## Metrics", "## Intended use", "## Limitations", " ± ",
                   "`resnet`: resnet18 (seeded-random)", "sha256 `"):
        assert needle in body, needle
    # loads elsewhere and predicts exactly as the run did
    tweets = read_conll(sample_dir / "test.txt")[:12]
    texts = [" ".join(t.tokens) for t in tweets]
    images = [next(iter((sample_dir / "images").glob(f"{t.image_id}.*")), None) for t in tweets]
    assert mner.load(moved, device="cpu")(texts, images) == predictor(texts, images)
    # features made from local weight files: the folder must be named on the new machine
    prov = json.loads((moved / "provenance.json").read_text())
    prov["cache"]["provenance"]["resnet"]["weights"] = {"source": "local", "file": "resnet18.pth"}
    (moved / "provenance.json").write_text(json.dumps(prov))
    with pytest.raises(ConfigError, match=r"local weight files \(resnet \(resnet18.pth\)\); put them in a "
                                          r"folder and pass it: mner.load\(..., weights_dir=DIR\)"):
        mner.load(moved, device="cpu")
    assert mner.load(moved, device="cpu", weights_dir=tmp_path)._cache_provenance["extract_config"][
        "weights_dir"] == str(tmp_path)


# -- README ------------------------------------------------------------------------------


def test_readme_python_api_examples_run(run, sample_dir, tmp_path, monkeypatch):
    """Every ```python block of README's "Python API" section runs, in order, in a folder
    holding the files the examples name."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "umt").symlink_to(run)
    good = read_conll(sample_dir / "test.txt")[0]
    shutil.copy(next((sample_dir / "images").glob(f"{good.image_id}.*")), tmp_path / "photo.jpg")
    (tmp_path / "images").symlink_to(sample_dir / "images")
    (tmp_path / "posts.jsonl").write_text(json.dumps({"text": " ".join(good.tokens), "image_id": good.image_id}) + "\n")
    mini = tmp_path / "data" / "mini"
    mini.mkdir(parents=True)
    for split, n in (("train", 16), ("valid", 6), ("test", 6)):
        tweets = (sample_dir / f"{split}.txt").read_text().split("\n\n")[:n]
        (mini / f"{split}.txt").write_text("\n\n".join(tweets) + "\n\n")
    (mini / "images").symlink_to(sample_dir / "images")
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "predictions.jsonl").is_file() and (tmp_path / "models" / "mini" / "README.md").is_file()
