"""``mner extract`` / ``mner inspect`` on the command line: flags, params, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mner.cache.reader import FeatureCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(d / f"i{i}.jpg")
    (d / "bad.jpg").write_bytes(b"")
    return d


def test_extract_params_flags_and_overrides(tmp_path, images, mner_cli):
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  profile: tiny\n  features: [resnet, objects]\n  max_objects: 4\n"
                      "  workers: 0\n")
    out = tmp_path / "c.h5"
    code, stdout, stderr = mner_cli("extract", "--images", images, "--out", out,
                                   "--params", params, "--device", "cpu", "--quiet",
                                   "-o", "max_objects=5", "--batch-size", "2")
    assert code == 0, stderr
    assert "wrote" in stdout and "4 images (empty 1, ok 3)" in stdout
    assert "image bad: empty" in stderr
    cache = FeatureCache(out)
    assert cache.datasets == {"resnet/grid", "resnet/pooled", "objects/boxes", "objects/boxes_norm",
                              "objects/scores", "objects/labels", "objects/features", "objects/count"}
    assert cache.shape("objects/boxes") == (4, 5, 4)  # -o wins over params.yaml

    code, stdout, _ = mner_cli("inspect", out)
    assert code == 0 and "profile tiny" in stdout and "objects/boxes" in stdout and "ok 3" in stdout
    code, stdout, _ = mner_cli("inspect", out, "--json")
    info = json.loads(stdout)
    assert info["status"] == {"ok": 3, "empty": 1}
    assert info["datasets"]["objects/boxes"]["shape"] == [4, 5, 4]
    assert len(info["datasets"]["resnet/grid"]["sha256"]) == 64


@pytest.mark.parametrize("args, message", [
    (["-o", "profile=huge"], "error: -o profile: 'huge' is not one of 'paper', 'tiny'"),
    (["-o", "features=resnet,nope"], "unknown feature nope"),
    (["--images", "/nonexistent/dir"], "/nonexistent/dir: no such images folder"),
])
def test_user_errors_are_one_line(tmp_path, images, args, message, mner_cli):
    base = ["extract", "--images", images, "--out", tmp_path / "c.h5", "--profile", "tiny"]
    code, _, stderr = mner_cli(*base, *args)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_data_takes_several_files(tmp_path, images, mner_cli):
    for name, img in (("train.txt", "i0"), ("test.txt", "i2")):
        (tmp_path / name).write_text(f"IMGID:{img}\nRome\tB-LOC\n\n", encoding="utf-8")
    out = tmp_path / "c.h5"
    code, stdout, stderr = mner_cli("extract", "--images", images, "--data",
                                   tmp_path / "train.txt", tmp_path / "test.txt", "--out", out,
                                   "--profile", "tiny", "--features", "resnet", "--quiet",
                                   "--device", "cpu", "--workers", "0")
    assert code == 0, stderr
    assert FeatureCache(out).image_ids == ["i0", "i2"]


def test_params_file_errors_name_the_file(tmp_path, images, mner_cli):
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  batchsize: 3\n")
    code, _, stderr = mner_cli("extract", "--images", images, "--out",
                              tmp_path / "c.h5", "--params", params)
    assert code == 2 and f"{params}:extract: unknown key batchsize" in stderr


def test_inspect_missing_file(tmp_path, mner_cli):
    code, _, stderr = mner_cli("inspect", tmp_path / "none.h5")
    assert code == 2 and "none.h5: no such cache" in stderr


def _statuses(out):
    cache = FeatureCache(out)
    return dict(zip(cache.image_ids, cache.status_of(cache.image_ids), strict=True))


def test_one_rule_with_and_without_data_gif_and_symlinks(tmp_path, mner_cli):
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(2)]
    elsewhere = tmp_path / "private"
    elsewhere.mkdir()
    frames[0].save(elsewhere / "secret.png")
    d = tmp_path / "real_images"
    d.mkdir()
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[1].save(d / "plain.PNG")
    (d / "out.png").symlink_to(elsewhere / "secret.png")
    (d / "in.jpg").symlink_to(d / "plain.PNG")
    images = tmp_path / "images"
    images.symlink_to(d, target_is_directory=True)  # README: a symlinked folder works
    conll = tmp_path / "train.txt"
    conll.write_text("".join(f"IMGID:{i}\nRome\tB-LOC\n\n" for i in ("anim", "plain", "out", "in")))
    want = {"anim": "ok", "plain": "ok", "out": "outside", "in": "ok"}
    base = ["extract", "--images", images, "--profile", "tiny", "--features", "resnet", "--quiet",
            "--device", "cpu", "--workers", "0"]
    code, _, err = mner_cli(*base, "--out", tmp_path / "a.h5")
    assert code == 0, err
    assert _statuses(tmp_path / "a.h5") == want
    assert "image out: outside (symlink to " in err and "-o follow_symlinks=true" in err
    code, _, err = mner_cli(*base, "--out", tmp_path / "b.h5", "--data", conll)
    assert code == 0, err
    assert _statuses(tmp_path / "b.h5") == want
    code, _, err = mner_cli(*base, "--out", tmp_path / "c.h5", "-o", "follow_symlinks=true")
    assert code == 0, err
    assert _statuses(tmp_path / "c.h5") == {**want, "out": "ok"}
