"""Text read from images in the cache: variable-length UTF-8 through the one schema,
``FeatureCache.strings`` / ``ocr_boxes`` / ``status``, checksums and ``--verify``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mner.cache import integrity, schema
from mner.cache.reader import FeatureCache
from mner.cache.writer import CacheWriter
from mner.errors import CacheError


def _write(out, *, groups=("tags", "ocr", "caption")):
    w = CacheWriter.open(out)
    w.set_root_attrs({"schema_version": schema.SCHEMA_VERSION, "profile": "tiny", "seed": 0})
    rows = w.add_images(["a", "b", "c"], ["pending", "pending", "pending"])
    attrs = {"model": "m", "weights": {"source": "none"}, "preprocessing": {}, "dims": {}}
    if "tags" in groups:
        w.ensure_group("tags", attrs, {"O": 3}, 3)
        w.write_rows("tags", rows[[0, 2]], {
            "names": np.array([["person", "dog", ""], ["", "", ""]], dtype=object),
            "scores": np.array([[0.9, 0.6, 0], [0, 0, 0]], np.float32),
            "count": np.array([2, 0], np.int32)})
    if "ocr" in groups:
        w.ensure_group("ocr", attrs, {"L": 2}, 3)
        box = np.array([[1, 2], [30, 2], [30, 12], [1, 12]], np.float32)
        w.write_rows("ocr", rows[[0]], {
            "text": np.array([["RIO FC", "Café ✓"]], dtype=object),
            "boxes": np.stack([box, box + 20])[None], "scores": np.array([[0.94, 0.8]], np.float32),
            "count": np.array([2], np.int32)})
    if "caption" in groups:
        w.ensure_group("caption", attrs, {}, 3)
        w.write_rows("caption", rows[[0, 2]], {"text": np.array(["a man on a horse", ""], dtype=object)})
    w.set_status(rows, ["ok", "truncated", "ok"])
    w.commit()
    return out


def test_strings_round_trip_with_statuses(tmp_path):
    cache = FeatureCache(_write(tmp_path / "c.h5"))
    assert cache.has_feature("ocr") and cache.has_feature("ocr/text") and cache.has_feature("tags")
    assert not cache.has_feature("resnet") and not cache.has_feature("ocr/nothing")
    assert cache.strings("tags", "a") == ["person", "dog"]
    assert cache.strings("tags", "c") == []
    assert cache.strings("ocr", "a") == ["RIO FC", "Café ✓"]
    assert cache.strings("caption", "a") == ["a man on a horse"]
    assert cache.strings("caption", "c") == []  # an empty caption is no caption
    # b did not load: nothing, whatever its rows hold; an unknown id: nothing, status missing
    assert [cache.strings(f, "b") for f in ("tags", "ocr", "caption")] == [[], [], []]
    assert cache.status("b") == "truncated" and cache.status("zz") == "missing"
    assert cache.strings("ocr", "zz") == []
    assert cache.strings_of("tags", ["c", "a", "a"]) == [[], ["person", "dog"], ["person", "dog"]]
    boxes, scores = cache.ocr_boxes("a")
    assert boxes.shape == (2, 4, 2) and boxes.dtype == np.float32
    assert boxes[1, 0].tolist() == [21.0, 22.0] and scores.tolist() == pytest.approx([0.94, 0.8])
    assert cache.ocr_boxes("b")[0].shape == (0, 4, 2) and cache.ocr_boxes("c")[1].shape == (0,)
    with pytest.raises(ValueError, match="unknown string feature 'file'"):
        cache.strings("file", "a")


def test_missing_string_feature_is_one_line_with_the_remedy(tmp_path):
    cache = FeatureCache(_write(tmp_path / "c.h5", groups=("tags",)))
    with pytest.raises(CacheError, match=r"lacks ocr/text.*--features ocr") as e:
        cache.strings("ocr", "a")
    assert "\n" not in str(e.value)
    with pytest.raises(CacheError, match="lacks ocr/boxes"):
        cache.ocr_boxes("a")


def test_strings_are_checksummed_and_verified(tmp_path):
    out = _write(tmp_path / "c.h5")
    sums = FeatureCache(out).checksums
    assert {"tags/names", "ocr/text", "ocr/boxes", "caption/text"} <= set(sums)
    assert integrity.verify(out) == ([], True)
    with h5py.File(out, "a") as h5:  # a changed string must be caught by --verify
        h5["ocr/text"][0, 0] = "RIO FK"
    problems, _ = integrity.verify(out)
    assert len(problems) == 1 and "ocr/text: values differ" in problems[0]
