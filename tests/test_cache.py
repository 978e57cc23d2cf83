"""HDF5 cache: schema, writer (partial file, resume flags, extension), reader, inspect."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from mner.cache import schema
from mner.cache.inspect import format_summary, summary
from mner.cache.reader import FeatureCache
from mner.cache.writer import CacheWriter, partial_path
from mner.errors import CacheError

DIMS = {"Dr": 8, "O": 3, "Do": 4}


def _attrs(model="m1"):
    return {"model": model, "weights": {"source": "seeded-random", "seed": 0},
            "preprocessing": {"size": 224}, "dims": DIMS}


def _make(path, ids=("a", "b", "c"), status=("ok", "missing", "ok"), commit=True):
    w = CacheWriter.open(path)
    w.set_root_attrs({"schema_version": schema.SCHEMA_VERSION, "mner_version": "0", "profile": "tiny",
                      "seed": 0, "created": "now", "library_versions": {"x": "1"},
                      "extract_config": {"profile": "tiny"}})
    rows = w.add_images(list(ids), list(status))
    w.ensure_group("resnet", _attrs(), DIMS, len(ids))
    w.ensure_group("objects", _attrs("det"), DIMS, len(ids))
    ok = np.array([r for r, s in zip(rows, status, strict=True) if s == "ok"])
    n = len(ok)
    pooled = np.arange(n * 8, dtype=np.float32).reshape(n, 8) + 1
    w.write_rows("resnet", ok, {"grid": np.repeat(pooled[:, None], 49, 1), "pooled": pooled})
    w.write_rows("objects", ok, {"count": np.array([2, 3][:n] + [1] * max(0, n - 2), np.int32),
                                 "scores": np.ones((n, 3), np.float32)})
    bad = np.array([r for r, s in zip(rows, status, strict=True) if s != "ok"], dtype=np.int64)
    w.write_rows("resnet", bad, {})
    w.write_rows("objects", bad, {})
    if commit:
        w.commit()
    return w


def test_schema_names_and_shapes():
    assert schema.spec("resnet/grid").concrete_shape(5, {"Dr": 2048}) == (5, 49, 2048)
    assert schema.spec("crops/patch_tokens").dtype == np.float16
    assert schema.spec("relations/labels").dtype == np.int8
    assert "clip_text/entities" in schema.all_dataset_names()
    with pytest.raises(KeyError):
        schema.spec("resnet/nope")


def test_writer_uses_partial_file_and_commits(tmp_path):
    out = tmp_path / "c.h5"
    w = _make(out, commit=False)
    assert partial_path(out).exists() and not out.exists()
    w.commit()
    assert out.exists() and not partial_path(out).exists()
    with h5py.File(out) as h5:
        assert h5["resnet/grid"].chunks == (1, 49, 8)
        assert h5["resnet/grid"].dtype == np.float16
        assert h5["resnet/done"][:].tolist() == [True, True, True]


def test_reader_alignment_zero_rows_and_masks(tmp_path):
    out = tmp_path / "c.h5"
    _make(out)
    cache = FeatureCache(out)
    arrays, ok, masks = cache.load(["resnet/pooled", "objects/scores"], ["c", "zz", "a", "b", "c"])
    assert ok.tolist() == [True, False, True, False, True]
    pooled = arrays["resnet/pooled"]
    assert pooled.shape == (5, 8) and pooled.dtype == np.float16
    assert pooled[0, 0] == 9 and pooled[2, 0] == 1 and pooled[4, 0] == 9  # c is the 2nd ok row
    assert not pooled[1].any() and not pooled[3].any()
    assert masks["objects"].tolist()[0] == [True, True, True]
    assert masks["objects"].tolist()[2] == [True, True, False]
    assert not masks["objects"][1].any()
    assert cache.status_of(["a", "b", "zz"]) == ["ok", "missing", "missing"]
    assert cache.dims("resnet/grid") == 8
    assert cache.datasets >= {"resnet/grid", "objects/count"}
    assert cache.provenance["resnet"]["weights"] == {"source": "seeded-random", "seed": 0}
    assert cache.provenance["library_versions"] == {"x": "1"}


def test_require_names_missing_and_setting_differences(tmp_path):
    out = tmp_path / "c.h5"
    _make(out)
    cache = FeatureCache(out)
    cache.require(["resnet/grid"], {"profile": "tiny", "resnet.model": "m1"})
    with pytest.raises(CacheError, match=r"lacks clip/image_embed; .*--features clip"):
        cache.require(["resnet/grid", "clip/image_embed"])
    with pytest.raises(CacheError, match=r"c.h5 was made with profile tiny, the run asks for paper"):
        cache.require([], {"profile": "paper"})
    with pytest.raises(CacheError, match="resnet.model m1"):
        cache.require([], {"resnet.model": "resnet152"})


def test_reader_errors(tmp_path):
    with pytest.raises(CacheError, match="no such cache.*run mner extract"):
        FeatureCache(tmp_path / "none.h5")
    _make(tmp_path / "p.h5", commit=False).close()
    with pytest.raises(CacheError, match="did not finish; re-run mner extract to resume"):
        FeatureCache(tmp_path / "p.h5")
    (tmp_path / "t.h5").write_text("hello")
    with pytest.raises(CacheError, match="not a readable HDF5 feature cache"):
        FeatureCache(tmp_path / "t.h5")
    _make(tmp_path / "v.h5")
    with h5py.File(tmp_path / "v.h5", "a") as h5:
        h5.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99"):
        FeatureCache(tmp_path / "v.h5")


def test_handle_is_per_process(tmp_path):
    out = tmp_path / "c.h5"
    _make(out)
    cache = FeatureCache(out)
    h = cache.h5
    assert cache.h5 is h
    cache._handles = {os.getpid() + 1: h}  # as seen from a forked worker
    assert cache.h5 is not h and cache.h5.id.valid
    import pickle

    clone = pickle.loads(pickle.dumps(cache))
    assert clone.load(["resnet/pooled"], ["a"])[0]["resnet/pooled"][0, 0] == 1


def test_extend_and_resume_flags(tmp_path):
    out = tmp_path / "c.h5"
    _make(out)
    w = CacheWriter.open(out)  # copies the final file aside, extends it
    rows = w.add_images(["a", "d"], ["ok", "ok"])
    assert rows.tolist() == [0, 3]
    assert w.done("resnet").tolist() == [True, True, True, False]
    w.write_rows("resnet", np.array([3]), {"pooled": np.full((1, 8), 7, np.float32)})
    w.commit()
    cache = FeatureCache(out)
    assert cache.image_ids == ["a", "b", "c", "d"]
    assert cache.load(["resnet/pooled"], ["d"])[0]["resnet/pooled"][0, 0] == 7


def test_group_settings_mismatch_is_an_error(tmp_path):
    out = tmp_path / "c.h5"
    _make(out)
    w = CacheWriter.open(out)
    with pytest.raises(CacheError, match="resnet was extracted with model=m1, this run uses m2"):
        w.ensure_group("resnet", _attrs("m2"), DIMS, 3)
    w.close()


def test_text_rows_and_entity_growth(tmp_path):
    out = tmp_path / "c.h5"
    w = _make(out, commit=False)
    w.ensure_group("clip_text", {**_attrs(), "dims": {"Dc": 4}}, {"Dc": 4, "E": 1}, 0)
    rows = w.add_text_keys(["k1", "k2", "k1"])
    assert rows.tolist() == [0, 1, 0]
    w.grow_entities(2)
    w.write_rows("clip_text", np.array([0, 1]), {
        "sentence": np.ones((2, 4), np.float32), "entities": np.full((2, 2, 4), 2, np.float32),
        "entity_count": np.array([2, 1], np.int32)})
    w.commit()
    t = FeatureCache(out).load_text(["k2", "nope"])
    assert t["entities"].shape == (2, 2, 4)
    assert t["found"].tolist() == [True, False]
    assert t["entity_count"].tolist() == [1, 0]
    assert t["sentence"][0].tolist() == [1, 1, 1, 1] and not t["sentence"][1].any()


def test_inspect_summary_and_checksums(tmp_path):
    _make(tmp_path / "a.h5")
    _make(tmp_path / "b.h5")
    a, b = summary(tmp_path / "a.h5"), summary(tmp_path / "b.h5")
    assert a["status"] == {"ok": 2, "missing": 1}
    assert a["datasets"]["resnet/grid"] == b["datasets"]["resnet/grid"]
    assert a["datasets"]["resnet/grid"]["shape"] == [3, 49, 8]
    assert a["datasets"]["resnet/grid"]["done"] == "3/3"
    with h5py.File(tmp_path / "b.h5", "a") as h5:
        h5["resnet/grid"][0, 0, 0] = 5
    assert summary(tmp_path / "b.h5")["datasets"]["resnet/grid"]["sha256"] != \
        a["datasets"]["resnet/grid"]["sha256"]
    text = format_summary(a)
    assert "schema 1" in text and "ok 2" in text and "resnet/grid" in text and "3x49x8" in text
    json.dumps(a, default=str)


def test_commit_records_checksums_apart_from_provenance(tmp_path):
    from mner.cache.integrity import checksums

    _make(tmp_path / "a.h5")
    cache = FeatureCache(tmp_path / "a.h5")
    assert "checksums" not in cache.provenance
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        assert cache.checksums == checksums(h5)
    assert cache.checksums["resnet/grid"] == summary(tmp_path / "a.h5")["datasets"]["resnet/grid"]["sha256"]
    assert set(cache.checksums) >= {"image_ids", "status", "resnet/grid", "objects/count"}
