"""Text read from images: ``tags`` (from the stored objects), ``ocr`` (RapidOCR, real
PP-OCRv4 weights), ``caption`` (BLIP; tiny random, saved to and loaded from a folder)."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest

from mner.cache.inspect import verify
from mner.cache.reader import FeatureCache
from mner.cache.writer import partial_path
from mner.data.sample import SIGNS
from mner.errors import WeightsError
from mner.extract import runner
from mner.extract.config import ExtractConfig
from mner.extract.runner import run_extract
from mner.extract.tags import derive_tags
from mner.provenance import sha256_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(src, tmp_path, ids, corrupt=True):
    """A folder holding copies of some sample images (and one broken file)."""
    d = tmp_path / "images"
    d.mkdir()
    for i in ids:
        shutil.copy(src / "images" / f"{i}.jpg", d / f"{i}.jpg")
    if corrupt:
        (d / "zz_broken.jpg").write_bytes(b"")
    return d


def _signs(sample):
    """One OCR-dependent tweet per type: ``[(image_id, type, name)]``."""
    rows = list(csv.DictReader(open(sample / "ocr_dependent.tsv", encoding="utf-8"), delimiter="\t"))
    tokens = {}
    for split in ("train", "valid", "test"):
        from mner.data.conll import read_conll

        tokens.update({t.image_id: t.tokens for t in read_conll(sample / f"{split}.txt")})
    out = {}
    for r in rows:
        out.setdefault(r["type"], (r["image_id"], r["type"], tokens[r["image_id"]][int(r["start"])]))
    return [out[t] for t in ("PER", "LOC", "ORG", "MISC")]


def test_derive_tags_orders_dedups_and_thresholds():
    names = ["__background__", "person", "dog", "N/A", "car"]
    labels = np.array([[1, 2, 1, 4, 3, 2], [0, 0, 0, 0, 0, 0]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.55, 0.2], [0, 0, 0, 0, 0, 0]], np.float32)
    out = derive_tags(labels, scores, np.array([6, 0]), names, threshold=0.5)
    # distinct names, best score first, N/A skipped, below-threshold dropped, padding ""
    assert out["names"][0].tolist() == ["person", "dog", "car", "", "", ""]
    assert out["scores"][0, :3].tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert out["count"].tolist() == [3, 0] and out["names"][1].tolist() == [""] * 6
    assert derive_tags(labels, scores, np.array([6, 0]), names, 0.85)["count"].tolist() == [1, 0]
    # count bounds the valid detections: entries past it are ignored
    assert derive_tags(labels, scores, np.array([1, 0]), names, 0.0)["names"][0, :2].tolist() == ["person", ""]


def test_tags_come_from_the_stored_objects_without_running_the_detector(tiny_cache, sample_dir,
                                                                        tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    shutil.copy(tiny_cache, out)
    before = FeatureCache(out)
    ok = [i for i in before.image_ids if before.status(i) == "ok"][:2]
    broken = next(i for i in before.image_ids if before.status(i) not in ("ok", "missing"))
    before.close()
    # Give two stored detections known labels and scores (a random detector finds nothing real).
    with h5py.File(out, "a") as h5:
        rows = {s.decode(): r for r, s in enumerate(h5["image_ids"][:])}
        labels, scores = h5["objects/labels"][:], h5["objects/scores"][:]
        labels[rows[ok[0]], :4], scores[rows[ok[0]], :4] = [18, 1, 18, 3], [0.9, 0.7, 0.6, 0.3]
        labels[rows[ok[1]], :2], scores[rows[ok[1]], :2] = [3, 1], [0.45, 0.4]
        h5["objects/labels"][:], h5["objects/scores"][:] = labels, scores
    from mner.extract.objects import ObjectExtractor

    def no_detector(*a, **k):
        raise AssertionError("the detector ran again")

    monkeypatch.setattr(ObjectExtractor, "__call__", no_detector)  # (building it calibrates once)
    cfg = ExtractConfig(profile="tiny", device="cpu", threads=1, features=("tags",), tags_threshold=0.5)
    assert cfg.features == ("objects", "tags")  # tags bring their objects
    res = run_extract(cfg, sample_dir / "images", out=out, progress=False)
    assert res["computed"] == 0  # no image was read: every objects row was already there
    cache = FeatureCache(out)
    assert cache.strings("tags", ok[0]) == ["dog", "person"]  # COCO 18, 1; 3 (car) is below 0.5
    assert cache.strings("tags", ok[1]) == []
    assert cache.strings("tags", broken) == []
    prov = cache.provenance["tags"]
    assert prov["preprocessing"]["threshold"] == 0.5 and prov["preprocessing"]["from"] == "objects"
    assert prov["preprocessing"]["objects_model"] == cache.provenance["objects"]["model"]
    assert verify(out) == ([], True) and "tags/names" in cache.checksums


def test_ocr_reads_the_printed_words_of_the_sample(ocr_sample_dir, tmp_path):
    signs = _signs(ocr_sample_dir)
    images = _images(ocr_sample_dir, tmp_path, [i for i, *_ in signs])
    out = tmp_path / "ocr.h5"
    cfg = ExtractConfig(profile="tiny", device="cpu", threads=1, features=("ocr",), ocr_threads=1)
    res = run_extract(cfg, images, out=out, progress=False)
    assert res["status"] == {"ok": 4, "empty": 1}
    cache = FeatureCache(out)
    for iid, typ, name in signs:
        words = cache.strings("ocr", iid)
        # the two printed lines, in reading order: e.g. ["DR", "NOVA"], ["RIO", "FC"]
        assert words in [[w.replace("{N}", name.upper()) for w in s] for s in SIGNS[typ]], (typ, words)
        boxes, conf = cache.ocr_boxes(iid)
        assert boxes.shape == (2, 4, 2) and (conf > 0.8).all()
        assert boxes[0, :, 1].max() <= boxes[1, :, 1].min() + 2  # the first line is above
        assert (boxes >= 0).all() and (boxes[..., 0] <= 224).all()
    assert cache.strings("ocr", "zz_broken") == [] and cache.status("zz_broken") == "empty"
    prov = cache.provenance["ocr"]
    import rapidocr_onnxruntime

    det = prov["weights"]["files"]["det"]
    pkg = __import__("pathlib").Path(rapidocr_onnxruntime.__file__).parent / "models" / det["file"]
    assert det["file"] == "ch_PP-OCRv4_det_infer.onnx" and det["sha256"] == sha256_file(pkg)
    assert prov["dims"] == {"L": 32} and prov["preprocessing"]["min_score"] == 0.5
    assert verify(out) == ([], True)
    assert {"ocr/text", "ocr/boxes"} <= set(cache.checksums)


def test_caption_tiny_blip_saved_and_loaded_from_a_folder(ocr_sample_dir, tmp_path):
    from mner.extract.caption import build_tiny

    ids = [i for i, *_ in _signs(ocr_sample_dir)][:2]
    images = _images(ocr_sample_dir, tmp_path, ids)
    tiny = ExtractConfig(profile="tiny", device="cpu", threads=1, features=("caption",),
                         caption_max_tokens=6, batch_size=2)
    run_extract(tiny, images, out=tmp_path / "a.h5", progress=False)
    a = FeatureCache(tmp_path / "a.h5")
    caps = a.strings_of("caption", ids)
    assert all(len(c) == 1 and 0 < len(c[0].split()) <= 6 for c in caps), caps
    assert a.strings("caption", "zz_broken") == []
    assert a.provenance["caption"]["weights"] == {"source": "seeded-random", "name": "mner-tiny-blip", "seed": 0}
    # The real loading path: save_pretrained to a folder, load it back as caption_model.
    model, proc = build_tiny(0)
    folder = tmp_path / "blip"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    paper = ExtractConfig(profile="paper", device="cpu", threads=1, features=("caption",),
                          caption_max_tokens=6, batch_size=2, caption_model=str(folder))
    run_extract(paper, images, out=tmp_path / "b.h5", progress=False)
    b = FeatureCache(tmp_path / "b.h5")
    assert b.strings_of("caption", ids) == caps  # same weights, greedy: the same captions
    w = b.provenance["caption"]["weights"]
    assert w["source"] == "local" and w["sha256"] == sha256_file(folder / "model.safetensors")
    assert a.checksums["caption/text"] == b.checksums["caption/text"]


def test_caption_model_offline_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    (tmp_path / "images").mkdir()
    cfg = ExtractConfig(profile="paper", device="cpu", features=("caption",),
                        caption_model="Salesforce/blip-image-captioning-base")
    with pytest.raises(WeightsError, match="caption: cannot load 'Salesforce/blip-image-captioning-base'") as e:
        run_extract(cfg, tmp_path / "images", out=tmp_path / "c.h5", progress=False)
    assert "\n" not in str(e.value) and "-o caption_model=DIR" in str(e.value)
    assert not (tmp_path / "c.h5").exists() and not partial_path(tmp_path / "c.h5").exists()


def test_interrupted_caption_run_resumes_to_the_same_cache(ocr_sample_dir, tmp_path, monkeypatch):
    ids = [i for i, *_ in _signs(ocr_sample_dir)]
    images = _images(ocr_sample_dir, tmp_path, ids)
    cfg = ExtractConfig(profile="tiny", device="cpu", threads=1, features=("caption",),
                        caption_max_tokens=4, batch_size=2)
    run_extract(cfg, images, out=tmp_path / "whole.h5", progress=False)
    monkeypatch.setenv(runner.FAIL_AFTER_ENV, "1")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_extract(cfg, images, out=tmp_path / "r.h5", progress=False)
    with h5py.File(partial_path(tmp_path / "r.h5"), "r") as h5:
        assert h5["caption/done"][:].sum() == 2  # one batch landed
    monkeypatch.delenv(runner.FAIL_AFTER_ENV)
    res = run_extract(cfg, images, out=tmp_path / "r.h5", progress=False)
    assert res["computed"] == 2  # the two other loaded images; the broken one is not computed
    assert FeatureCache(tmp_path / "r.h5").checksums == FeatureCache(tmp_path / "whole.h5").checksums
