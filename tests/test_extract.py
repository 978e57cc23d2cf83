"""Stage one with the tiny profile: shapes, provenance, bad images, resume, weights, api."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mner.cache.inspect import summary
from mner.cache.reader import FeatureCache
from mner.cache.writer import partial_path
from mner.config import build
from mner.errors import CacheError, ConfigError, WeightsError
from mner.extract.config import ExtractConfig
from mner.extract.runner import FAIL_AFTER_ENV, run_extract

ALL = ("resnet", "clip", "objects", "relations", "crops")
EXPECTED = {"ok_rgb": "ok", "ok_rgba": "ok", "grey": "ok", "palette": "ok", "cmyk": "ok",
            "exif": "ok", "exif_ref": "ok", "anim": "ok", "trunc": "truncated", "empty": "empty",
            "text": "not_image", "big": "too_large"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scene(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = rng.integers(0, 255, 3)
    a[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(a)


def make_images(d):
    """Every kind of image the runner must survive, written to folder ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    _scene(1).save(d / "ok_rgb.jpg", quality=95)
    _scene(2).convert("RGBA").save(d / "ok_rgba.png")
    _scene(3).convert("L").save(d / "grey.png")
    _scene(4).convert("P").save(d / "palette.png")
    _scene(5).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    _scene(6).save(d / "exif.jpg", quality=95, exif=exif)
    with Image.open(d / "exif.jpg") as im:
        ImageOps.exif_transpose(im).convert("RGB").save(d / "exif_ref.png")
    frames = [_scene(7), _scene(8)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    _scene(9, (200, 200)).save(d / "big.png")
    raw = (d / "ok_rgb.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("<html>not found</html>")
    return d


def tiny(**kw) -> ExtractConfig:
    base = {"profile": "tiny", "device": "cpu", "workers": 0, "batch_size": 4, "features": ALL,
            "max_pixels": 150 * 150}
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    d = make_images(tmp_path_factory.mktemp("imgs") / "images")
    out = tmp_path_factory.mktemp("c") / "bad.h5"
    res = run_extract(tiny(workers=1), images=d, out=out, progress=False)
    return d, out, res


def test_statuses_of_bad_images(bad_run, capsys):
    d, out, res = bad_run
    cache = FeatureCache(out)
    assert dict(zip(cache.image_ids, cache.status_of(cache.image_ids), strict=True)) == EXPECTED
    assert res["computed"] == 8
    assert sorted(b[0] for b in res["bad"]) == ["big", "empty", "text", "trunc"]
    assert not partial_path(out).exists()


def test_shapes_dtypes_and_zero_rows(bad_run):
    _, out, _ = bad_run
    cache = FeatureCache(out)
    n = len(EXPECTED)
    want = {"resnet/grid": ((n, 49, 512), np.float16), "resnet/pooled": ((n, 512), np.float16),
            "clip/image_embed": ((n, 128), np.float16), "clip/patch_tokens": ((n, 50, 192), np.float16),
            "objects/boxes": ((n, 15, 4), np.float32), "objects/features": ((n, 15, 1024), np.float16),
            "objects/labels": ((n, 15), np.int32), "objects/count": ((n,), np.int32),
            "relations/labels": ((n, 16, 16), np.int8),
            "crops/patch_tokens": ((n, 3, 17, 192), np.float16), "crops/count": ((n,), np.int32)}
    ids = cache.image_ids
    arrays, ok, masks = cache.load(list(want), ids)
    for name, (shape, dtype) in want.items():
        assert arrays[name].shape == shape and arrays[name].dtype == dtype, name
        assert np.isfinite(arrays[name].astype(np.float32)).all(), name
    good = np.array([EXPECTED[i] == "ok" for i in ids])
    assert (ok == good).all()
    assert (arrays["objects/count"][good] == 15).all()  # threshold 0: random detector fills O
    assert (arrays["crops/count"][good] == 3).all()
    assert not arrays["resnet/grid"][~good].any() and not arrays["objects/count"][~good].any()
    # crops are the top-3 detector boxes
    np.testing.assert_array_equal(cache.load(["crops/boxes"], ids)[0]["crops/boxes"][good],
                                  cache.load(["objects/boxes"], ids)[0]["objects/boxes"][good][:, :3])
    norm = arrays["objects/boxes_norm"] if "objects/boxes_norm" in arrays else \
        cache.load(["objects/boxes_norm"], ids)[0]["objects/boxes_norm"]
    assert norm.min() >= 0 and norm.max() <= 1
    # relations: node 0 is [IMG]; nothing relates to itself
    rel = arrays["relations/labels"][good]
    assert (np.diagonal(rel, axis1=1, axis2=2) == 0).all() and rel[:, 0, 1:].any()
    # distinct images give distinct features; pooled is the grid average
    pooled = arrays["resnet/pooled"][good].astype(np.float32)
    assert np.abs(pooled[0] - pooled[1]).max() > 1e-2
    np.testing.assert_allclose(arrays["resnet/grid"][good].astype(np.float32).mean(1), pooled,
                               atol=2e-2, rtol=1e-2)
    assert masks["objects"][good].all() and not masks["objects"][~good].any()


def test_exif_orientation_is_applied(bad_run):
    _, out, _ = bad_run
    a = FeatureCache(out).load(["clip/image_embed", "resnet/pooled"], ["exif", "exif_ref"])[0]
    for v in a.values():
        np.testing.assert_allclose(v[0].astype(np.float32), v[1].astype(np.float32), atol=0.05)


def test_provenance(bad_run):
    _, out, _ = bad_run
    prov = FeatureCache(out).provenance
    assert prov["profile"] == "tiny" and prov["seed"] == 0 and prov["schema_version"] == 1
    assert prov["resnet"]["model"] == "resnet18"
    assert prov["resnet"]["weights"] == {"source": "seeded-random", "name": "resnet18", "seed": 0}
    assert prov["resnet"]["preprocessing"]["batchnorm"] == "eval"
    assert prov["clip"]["architecture"]["vision_cfg"]["patch_size"] == 32
    assert prov["objects"]["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert prov["objects"]["class_names"][1] == "person"
    assert prov["relations"]["relation_names"][0] == "none"
    assert prov["extract_config"]["max_objects"] == 15
    assert {"torch", "torchvision", "open_clip", "h5py"} <= set(prov["library_versions"])


def test_extract_arrays_reproduces_cached_rows(bad_run):
    from mner.extract.api import extract_arrays

    d, out, _ = bad_run
    cache = FeatureCache(out)
    names = ["resnet/pooled", "clip/patch_tokens", "objects/boxes", "objects/features",
             "relations/labels", "crops/patch_tokens"]
    arrays, ok = extract_arrays([d / "ok_rgb.jpg", None, d / "palette.png"], cache.provenance, names)
    assert ok.tolist() == [True, False, True]
    cached = cache.load(names, ["ok_rgb", "nope", "palette"])[0]
    for n in names:
        assert arrays[n].shape == cached[n].shape and arrays[n].dtype == cached[n].dtype, n
        np.testing.assert_allclose(arrays[n].astype(np.float32), cached[n].astype(np.float32),
                                   atol=2e-2, rtol=2e-2, err_msg=n)


def _checksums(path):
    return {k: v["sha256"] for k, v in summary(path)["datasets"].items()}


def test_resume_after_failure_gives_identical_content(tmp_path, monkeypatch):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(6):
        _scene(20 + i, (48 + 8 * i, 40)).save(d / f"im{i}.jpg")
    cfg = tiny(batch_size=2)
    ref = run_extract(cfg, images=d, out=tmp_path / "ref.h5", progress=False)
    assert ref["computed"] == 6
    out = tmp_path / "res.h5"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(RuntimeError, match="injected failure after 2 batches"):
        run_extract(cfg, images=d, out=out, progress=False)
    assert partial_path(out).exists() and not out.exists()
    with h5py.File(partial_path(out)) as h5:
        assert h5["resnet/done"][:].tolist() == [True] * 4 + [False] * 2
    monkeypatch.delenv(FAIL_AFTER_ENV)
    res = run_extract(cfg, images=d, out=out, progress=False)
    assert res["computed"] == 2
    assert _checksums(out) == _checksums(tmp_path / "ref.h5")
    # complete already: nothing to do, file untouched
    mtime = out.stat().st_mtime_ns
    assert run_extract(cfg, images=d, out=out, progress=False)["computed"] == 0
    assert out.stat().st_mtime_ns == mtime


def test_new_images_only_and_overwrite(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        _scene(40 + i).save(d / f"im{i}.png")
    cfg = tiny(features=("resnet",))
    out = tmp_path / "c.h5"
    run_extract(cfg, images=d, out=out, progress=False)
    before = FeatureCache(out).load(["resnet/grid"], ["im0", "im1", "im2"])[0]["resnet/grid"]
    _scene(50).save(d / "new.png")
    res = run_extract(cfg, images=d, out=out, progress=False)
    assert res["computed"] == 1 and res["images"] == 4
    cache = FeatureCache(out)
    assert cache.image_ids == ["im0", "im1", "im2", "new"]
    np.testing.assert_array_equal(cache.load(["resnet/grid"], ["im0", "im1", "im2"])[0]["resnet/grid"],
                                  before)
    assert run_extract(tiny(features=("resnet",), overwrite=True), images=d, out=out,
                       progress=False)["computed"] == 4
    # adding a feature computes only that feature; existing datasets are untouched
    grid = _checksums(out)["resnet/grid"]
    res = run_extract(tiny(features=("resnet", "clip")), images=d, out=out, progress=False)
    assert res["computed"] == 4 and _checksums(out)["resnet/grid"] == grid
    assert "clip/patch_tokens" in FeatureCache(out).datasets
    with pytest.raises(CacheError, match="made with seed 0, this run asks for 1; pass --overwrite"):
        run_extract(tiny(features=("resnet",), seed=1), images=d, out=out, progress=False)


def test_data_files_select_images_and_text_teacher(tmp_path):
    from mner.data.conll import read_conll
    from mner.data.schemes import entities

    d = tmp_path / "images"
    d.mkdir()
    _scene(60).save(d / "111.jpg")
    _scene(61).save(d / "222.jpg")
    _scene(62).save(d / "333.jpg")  # not referenced: must not be extracted
    conll = tmp_path / "train.txt"
    conll.write_text("IMGID:111\nJohn\tB-PER\nSmith\tI-PER\nin\tO\nParis\tB-LOC\n\n"
                     "IMGID:999\nhello\tO\n\n"
                     "IMGID:222\nApple\tB-ORG\nrocks\tO\n\n", encoding="utf-8")
    out = tmp_path / "c.h5"
    res = run_extract(tiny(features=("resnet", "clip_text")), images=d, data=[conll], out=out,
                      progress=False)
    cache = FeatureCache(out)
    assert cache.image_ids == ["111", "999", "222"]
    assert cache.status_of(["111", "999", "222"]) == ["ok", "missing", "ok"]
    assert res["sentences"] == 3 and res["status"] == {"ok": 2, "missing": 1}
    tweets = read_conll(conll)
    t = cache.load_text([tw.key for tw in tweets])
    assert t["found"].all()
    assert t["entity_count"].tolist() == [len(entities(tw.labels)) for tw in tweets] == [2, 0, 1]
    assert t["entities"].shape == (3, 2, 128)
    assert np.abs(t["entities"][0, 0].astype(np.float32) - t["entities"][0, 1]).max() > 1e-3
    assert not t["entities"][1].any() and not t["entities"][2, 1].any()


def test_weights_dir_route(tmp_path, bad_run):
    from mner.extract.runner import build_extractors

    d, ref_out, _ = bad_run
    ex = build_extractors(tiny(), torch.device("cpu"))
    wdir = tmp_path / "w"
    wdir.mkdir()
    torch.save(ex["resnet"].full.state_dict(), wdir / "resnet18.pth")
    torch.save(ex["clip"].bb.model.state_dict(), wdir / "mner-tiny-clip.pth")
    torch.save(ex["detector"].full.state_dict(), wdir / "fasterrcnn_mobilenet_v3_large_320_fpn.pth")
    imgs = tmp_path / "images"
    imgs.mkdir()
    for n in ("ok_rgb.jpg", "grey.png"):
        shutil.copy(d / n, imgs / n)
    out = tmp_path / "w.h5"
    run_extract(tiny(weights_dir=wdir), images=imgs, out=out, progress=False)
    cache = FeatureCache(out)
    w = cache.provenance["resnet"]["weights"]
    assert w["source"] == "local" and w["file"] == "resnet18.pth" and len(w["sha256"]) == 64
    names = ["resnet/pooled", "clip/image_embed", "objects/features", "crops/patch_tokens"]
    got = cache.load(names, ["grey", "ok_rgb"])[0]
    ref = FeatureCache(ref_out).load(names, ["grey", "ok_rgb"])[0]
    for n in names:
        np.testing.assert_allclose(got[n].astype(np.float32), ref[n].astype(np.float32),
                                   atol=2e-2, rtol=2e-2, err_msg=n)
    (wdir / "resnet18.pth").unlink()
    with pytest.raises(WeightsError, match="has no resnet18.pth"):
        run_extract(tiny(weights_dir=wdir), images=imgs, out=tmp_path / "x.h5", progress=False)
    (wdir / "resnet18.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a readable weights file"):
        run_extract(tiny(weights_dir=wdir), images=imgs, out=tmp_path / "x.h5", progress=False)


@pytest.mark.parametrize("features", [("resnet",), ("clip",), ("objects",)])
def test_paper_profile_offline_stops_before_work(tmp_path, monkeypatch, features):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path / "images"
    d.mkdir()
    _scene(1).save(d / "a.jpg")
    out = tmp_path / "c.h5"
    with pytest.raises(WeightsError, match="--weights-dir|--profile tiny") as err:
        run_extract(ExtractConfig(profile="paper", device="cpu", features=features), images=d,
                    out=out, progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists() and not partial_path(out).exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown feature bogus"):
        build(ExtractConfig, {"features": "resnet,bogus"}, where="params.yaml:extract")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        build(ExtractConfig, {"batch_size": 0}, where="x")
    cfg = build(ExtractConfig, {"features": "crops,resnet", "profile": "tiny"}, where="x")
    assert cfg.features == ("resnet", "crops") and cfg.threshold == 0.0 and cfg.needs_detector


def test_tiny_features_separate_sample_image_kinds(tiny_cache, sample_dir):
    """A linear probe on tiny resnet and clip features tells the sample image types apart."""
    with open(sample_dir / "image_kinds.tsv", encoding="utf-8") as f:
        kinds = {r["image_id"]: r["kind"] for r in csv.DictReader(f, delimiter="\t")
                 if r["status"] == "ok"}
    cache = FeatureCache(tiny_cache)
    ids = sorted(kinds)
    classes = sorted(set(kinds.values()))
    y = np.array([classes.index(kinds[i]) for i in ids])
    for name in ("resnet/pooled", "clip/image_embed"):
        x, ok, _ = cache.load([name], ids)
        assert ok.all()
        x = x[name].astype(np.float64)
        assert np.isfinite(x).all()
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        x = np.hstack([x, np.ones((len(x), 1))])
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(ids))
        tr, te = perm[: len(ids) * 2 // 3], perm[len(ids) * 2 // 3:]
        onehot = np.eye(len(classes))[y[tr]]
        w = np.linalg.solve(x[tr].T @ x[tr] + 1.0 * np.eye(x.shape[1]), x[tr].T @ onehot)
        acc = float((np.argmax(x[te] @ w, 1) == y[te]).mean())
        assert acc > 0.8, (name, acc)
