"""The optional detectron2 backend of ``objects`` (``-o detector=detectron2``).

The first tests run everywhere (detectron2 absent, config checks, the class-name file);
the rest need detectron2 and build tiny random models from its model-zoo configs.
"""

from __future__ import annotations

import builtins
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mner.cache.reader import FeatureCache
from mner.cache.writer import partial_path
from mner.config import build
from mner.errors import ConfigError, DataError, WeightsError
from mner.extract.config import ExtractConfig
from mner.extract.detectron2_backend import read_class_names
from mner.extract.objects import build_detector
from mner.extract.relations import relation_matrix
from mner.extract.runner import run_extract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FPN = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"
C4 = "COCO-Detection/faster_rcnn_R_50_C4_3x.yaml"
CPU = torch.device("cpu")


def d2cfg(**kw) -> ExtractConfig:
    base = {"profile": "tiny", "device": "cpu", "workers": 0, "features": ("objects",),
            "detector": "detectron2", "max_objects": 6, "precision": "fp32"}
    return ExtractConfig(**{**base, **kw})


def scene(seed: int, size: tuple[int, int]) -> Image.Image:
    """A flat background with two coloured rectangles, ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = rng.integers(0, 255, 3)
    a[h // 5: h // 2, w // 6: w // 2] = rng.integers(0, 255, 3)
    a[h // 2: h - 4, w // 2: w - 3] = rng.integers(0, 255, 3)
    return Image.fromarray(a)


# -- without detectron2 -------------------------------------------------------------------

def test_not_installed_is_one_weights_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # import detectron2 -> ImportError
    d = tmp_path / "images"
    d.mkdir()
    scene(1, (64, 48)).save(d / "a.jpg")
    out = tmp_path / "c.h5"
    with pytest.raises(WeightsError, match="detectron2 is not installed") as err:
        run_extract(d2cfg(features=("objects", "relations")), images=d, out=out, progress=False)
    assert "-o detector=fasterrcnn" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and not partial_path(out).exists()


def test_missing_dependency_of_detectron2_is_named(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "detectron2":
            raise ModuleNotFoundError("No module named 'fvcore'", name="fvcore")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(WeightsError, match="cannot be imported .*no module fvcore.*pip install fvcore"):
        build_detector(d2cfg(), CPU)


def test_d2_settings_need_the_detectron2_detector():
    with pytest.raises(ConfigError, match="d2_config is set but detector is fasterrcnn; add "
                                          "-o detector=detectron2"):
        build(ExtractConfig, {"d2_config": FPN}, where="x")
    cfg = build(ExtractConfig, {"detector": "detectron2", "d2_config": FPN, "d2_weights": "w.pkl",
                                "d2_classes": "vg.txt"}, where="x")
    assert cfg.d2_config == FPN and cfg.d2_weights == "w.pkl" and cfg.d2_classes.name == "vg.txt"


def test_class_name_file(tmp_path):
    f = tmp_path / "objects_vocab.txt"
    f.write_text("yolk\nbicycle,bike\n  man \n\n\n")
    assert read_class_names(f) == ["yolk", "bicycle,bike", "man"]
    f.write_text("yolk\n\nman\n")
    with pytest.raises(DataError, match=r"objects_vocab.txt:2: blank line between class names"):
        read_class_names(f)
    with pytest.raises(DataError, match="cannot read"):
        read_class_names(tmp_path / "nope.txt")


# -- with detectron2 (tiny random models from model-zoo configs) ------------------------------

@pytest.fixture(scope="module")
def fpn():
    pytest.importorskip("detectron2")
    return build_detector(d2cfg(), CPU)


@pytest.fixture(scope="module")
def images():
    # a and c share a size, so they share one forward pass; b is alone in its size group
    return {name: scene(seed, size) for name, seed, size in
            (("a", 1, (64, 48)), ("b", 2, (90, 120)), ("c", 3, (64, 48)))}


def as_tensors(ex, imgs):
    return [ex.preprocess(im) for im in imgs]


def test_fpn_outputs(fpn, images):
    from detectron2.data import MetadataCatalog

    assert type(fpn).__name__ == "Detectron2Extractor"
    imgs = list(images.values())
    out = fpn(as_tensors(fpn, imgs))
    o = fpn.cfg.max_objects
    assert fpn.dims() == {"O": o, "Do": 1024}
    want = {"boxes": ((3, o, 4), np.float32), "boxes_norm": ((3, o, 4), np.float32),
            "scores": ((3, o), np.float32), "labels": ((3, o), np.int32),
            "features": ((3, o, 1024), np.float32), "count": ((3,), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == want
    assert (out["count"] == o).all()  # score threshold 0: a random detector fills O
    for i, im in enumerate(imgs):
        w, h = im.size
        b = out["boxes"][i]
        assert (b[:, [0, 2]] >= 0).all() and (b[:, [0, 2]] <= w).all()
        assert (b[:, [1, 3]] >= 0).all() and (b[:, [1, 3]] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()  # empty boxes dropped
        np.testing.assert_allclose(out["boxes_norm"][i], b / [w, h, w, h], rtol=1e-6)
        s = out["scores"][i]
        assert (np.diff(s) <= 0).all() and (s > 0).all() and (s <= 1).all()
    assert out["labels"].min() >= 0 and out["labels"].max() < 80
    f = out["features"]
    assert np.isfinite(f).all() and np.abs(f).max() < 6e4  # float16-safe after output_scale
    assert np.abs(f[0] - f[1]).max() > 1e-3  # different images, different regions
    a = fpn.attrs()
    assert a["model"] == f"detectron2:{FPN}"
    assert a["weights"] == {"source": "seeded-random", "name": f"detectron2:{FPN}", "seed": 0}
    assert a["class_names"] == list(MetadataCatalog.get("coco_2017_val").thing_classes)
    assert a["class_names"][0] == "person" and len(a["class_names"]) == 80
    assert a["architecture"]["roi_heads"] == "StandardROIHeads"
    assert a["preprocessing"]["format"] == "BGR" and a["preprocessing"]["min_size"] == 224
    assert a["detectron2"] and a["output_scale"] == fpn.scale > 0
    json.dumps(a)  # every attribute is storable


def test_an_image_alone_and_in_a_batch_gives_the_same_detections(fpn, images):
    a, b, c = as_tensors(fpn, images.values())
    batch = fpn([a, b, c])
    for i, alone in ((0, fpn([a])), (2, fpn([c]))):
        np.testing.assert_array_equal(batch["labels"][i], alone["labels"][0])
        np.testing.assert_allclose(batch["boxes"][i], alone["boxes"][0], atol=1e-3)
        np.testing.assert_allclose(batch["scores"][i], alone["scores"][0], atol=1e-5)
        np.testing.assert_allclose(batch["features"][i], alone["features"][0], atol=1e-3, rtol=1e-3)


def test_fewer_detections_than_o_are_zero_padded(fpn, images, monkeypatch):
    im = as_tensors(fpn, [images["a"]])
    real = fpn._run(im)[0]
    monkeypatch.setattr(fpn, "_run", lambda ims: [{k: v[:2] for k, v in real.items()}])
    out = fpn(im)
    assert out["count"][0] == 2
    np.testing.assert_allclose(out["boxes"][0, :2], real["boxes"][:2])
    assert not out["boxes"][0, 2:].any() and not out["features"][0, 2:].any()
    assert not out["scores"][0, 2:].any() and not out["labels"][0, 2:].any()


def test_c4_config_file_with_class_names_from_a_file(tmp_path, images):
    pytest.importorskip("detectron2")
    from detectron2 import model_zoo

    # a user's yaml on top of the zoo's C4 config, like a Visual Genome model (fewer classes here)
    conf = tmp_path / "vg_c4.yaml"
    conf.write_text(f"_BASE_: {model_zoo.get_config_file(C4)}\n"
                    "MODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 5\n")
    names = tmp_path / "objects_vocab.txt"
    names.write_text("yolk\nbicycle,bike\nman\nshirt\ntree\n")
    ex = build_detector(d2cfg(d2_config=str(conf), d2_classes=names), CPU)
    assert ex.dims()["Do"] == 2048  # res5 output averaged, the bottom-up-attention feature
    out = ex(as_tensors(ex, [images["b"]]))
    assert out["features"].shape == (1, 6, 2048) and np.isfinite(out["features"]).all()
    assert out["count"][0] == 6 and out["labels"].max() < 5
    a = ex.attrs()
    assert a["model"] == "detectron2:vg_c4.yaml" and a["architecture"]["model_zoo"] is False
    assert a["class_names"] == ["yolk", "bicycle,bike", "man", "shirt", "tree"]
    assert a["architecture"]["roi_heads"] == "Res5ROIHeads" and a["architecture"]["num_classes"] == 5
    names.write_text("yolk\nbicycle\nman\nshirt\n")
    with pytest.raises(ConfigError, match="4 class names, but the model has "
                                          "ROI_HEADS.NUM_CLASSES 5; pass -o d2_classes"):
        build_detector(d2cfg(d2_config=str(conf), d2_classes=names), CPU)
    with pytest.raises(ConfigError, match="thing_classes of coco_2017_val: 80 class names, but "
                                          "the model has ROI_HEADS.NUM_CLASSES 5"):
        build_detector(d2cfg(d2_config=str(conf)), CPU)  # the base config's test set is COCO
    conf.write_text(conf.read_text() + "DATASETS:\n  TEST: []\n")
    with pytest.raises(ConfigError, match="no class names .*is empty.* pass -o d2_classes=FILE"):
        build_detector(d2cfg(d2_config=str(conf)), CPU)
    conf.write_text("MODEL:\n  NO_SUCH_KEY: 1\n")
    with pytest.raises(ConfigError, match="vg_c4.yaml: not a valid detectron2 config"):
        build_detector(d2cfg(d2_config=str(conf)), CPU)


def test_checkpoint_loading_and_weight_errors(fpn, images, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny_fpn.pth"
    torch.save(fpn.model.state_dict(), ckpt)
    ex = build_detector(d2cfg(d2_weights=str(ckpt)), CPU)
    w = ex.attrs()["weights"]
    assert w["source"] == "local" and w["file"] == "tiny_fpn.pth" and len(w["sha256"]) == 64
    im = as_tensors(fpn, [images["b"]])
    got, ref = ex(im), fpn(im)
    np.testing.assert_array_equal(got["labels"], ref["labels"])
    np.testing.assert_allclose(got["features"], ref["features"], atol=1e-4, rtol=1e-4)

    with pytest.raises(WeightsError, match="does not fit d2_config .*R_50_C4.*use the config"):
        build_detector(d2cfg(d2_config=C4, d2_weights=str(ckpt)), CPU)
    from detectron2 import model_zoo

    five = tmp_path / "five.yaml"
    five.write_text(f"_BASE_: {model_zoo.get_config_file(FPN)}\nMODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 5\n")
    (tmp_path / "five.txt").write_text("a\nb\nc\nd\ne\n")
    with pytest.raises(WeightsError, match=r"cls_score.weight has shape \(81, 1024\), the model "
                                           r"\(6, 1024\)"):
        build_detector(d2cfg(d2_config=str(five), d2_classes=tmp_path / "five.txt",
                              d2_weights=str(ckpt)), CPU)
    with pytest.raises(WeightsError, match="no such file"):
        build_detector(d2cfg(d2_weights=str(tmp_path / "nope.pkl")), CPU)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="not a readable detectron2 checkpoint"):
        build_detector(d2cfg(d2_weights=str(junk)), CPU)
    # a URL is taken from detectron2's own download cache, where its PathManager looks
    from detectron2.utils.file_io import PathManager

    from mner.extract.detectron2_backend import url_cache_path

    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "iopath"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = "detectron2://mner-test/42/tiny_fpn.pth"
    cached = url_cache_path(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(ckpt.read_bytes())
    assert PathManager.get_local_path(url) == str(cached)  # found, so no download attempted
    ex = build_detector(d2cfg(profile="paper", d2_weights=url), CPU)
    assert ex.attrs()["weights"] == {"source": "detectron2", "name": url, "file": "tiny_fpn.pth",
                                     "sha256": w["sha256"]}
    assert ex.attrs()["preprocessing"]["min_size"] == 800  # the config's own test size
    # paper profile, offline, zoo checkpoint not cached: stops before building anything
    with pytest.raises(WeightsError, match=r"model_final_\w+\.pkl.*not in detectron2's cache") as err:
        build_detector(d2cfg(profile="paper"), CPU)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="nor a detectron2 model-zoo config"):
        build_detector(d2cfg(d2_config="COCO-Detection/nope.yaml"), CPU)
    with pytest.raises(ConfigError, match="RetinaNet has no ROI box head"):
        build_detector(d2cfg(d2_config="COCO-Detection/retinanet_R_50_FPN_3x.yaml"), CPU)




def test_mner_extract_end_to_end(fpn, images, tmp_path, mner_cli):
    from mner.extract.api import extract_arrays

    d = tmp_path / "images"
    d.mkdir()
    for name, im in images.items():
        im.save(d / f"{name}.png")
    out = tmp_path / "d2.h5"
    code, stdout, stderr = mner_cli("extract", "--images", d, "--out", out, "--profile", "tiny",
        "--device", "cpu", "--features", "objects,relations", "--workers", "0", "--quiet",
        "-o", "detector=detectron2", "-o", "max_objects=6", "-o", "precision=fp32")
    assert code == 0, stderr
    code, stdout, _ = mner_cli("inspect", out, "--json")
    assert code == 0
    assert f"detectron2:{FPN}" in stdout and "objects/features" in stdout

    cache = FeatureCache(out)
    prov = cache.provenance
    assert prov["objects"]["model"] == f"detectron2:{FPN}"
    assert prov["objects"]["class_names"][0] == "person"
    assert prov["relations"]["preprocessing"]["boxes"] == f"detectron2:{FPN}"
    assert prov["extract_config"]["detector"] == "detectron2"
    ids = ["a", "b", "c"]
    names = ["objects/boxes", "objects/count", "objects/features", "objects/labels", "relations/labels"]
    arr, ok, _ = cache.load(names, ids)
    assert ok.all() and (arr["objects/count"] == 6).all()
    ref = fpn(as_tensors(fpn, [images[i] for i in ids]))  # same seed, same model
    np.testing.assert_array_equal(arr["objects/labels"], ref["labels"])
    np.testing.assert_allclose(arr["objects/boxes"], ref["boxes"], atol=1e-3)
    np.testing.assert_allclose(arr["objects/features"].astype(np.float32), ref["features"],
                               atol=2e-2, rtol=2e-2)
    for j, i in enumerate(ids):  # the relation graph is built from these boxes
        want = relation_matrix(arr["objects/boxes"][j], int(arr["objects/count"][j]), images[i].size, 6)
        np.testing.assert_array_equal(arr["relations/labels"][j], want)
    # mner predict re-creates the extractor from the cache's provenance
    again, ok2 = extract_arrays([d / "b.png"], prov, ["objects/boxes", "objects/labels"])
    assert ok2.all()
    np.testing.assert_array_equal(again["objects/labels"][0], arr["objects/labels"][1])
    np.testing.assert_allclose(again["objects/boxes"][0], arr["objects/boxes"][1], atol=1e-3)
