"""Extraction precision (autocast dtype per device) and the uint8 worker transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mner import devices
from mner.cache.reader import FeatureCache
from mner.devices import resolve_precision
from mner.errors import CacheError
from mner.extract.base import ByteTransform
from mner.extract.config import ExtractConfig
from mner.extract.runner import run_extract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_precision_per_device(monkeypatch):
    # Extraction uses the one policy of mner.devices: bf16 on CUDA where supported.
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", CUDA) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", CUDA) == "fp16"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"
    for explicit in ("fp32", "bf16"):
        assert resolve_precision(explicit, CPU) == explicit == resolve_precision(explicit, CUDA)
    assert resolve_precision("fp16", CUDA) == "fp16"


def test_precision_is_resolved_once_per_run(tmp_path, monkeypatch):
    from mner.extract import runner

    calls = []
    real = runner.resolve_precision
    monkeypatch.setattr(runner, "resolve_precision",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(devices, "resolve_precision",
                        lambda *a, **k: pytest.fail("an extractor resolved precision again"))
    images = _images(tmp_path / "images")
    run_extract(ExtractConfig(profile="tiny", features=("resnet", "objects"), precision="auto",
                              workers=0, device="cpu"), images, out=tmp_path / "c.h5", progress=False)
    assert len(calls) == 1
    assert FeatureCache(tmp_path / "c.h5").provenance["extract_config"]["precision"] in ("bf16", "fp32")


def test_extending_a_cache_replays_its_precision(tmp_path, monkeypatch):
    from mner.errors import ConfigError
    from mner.extract.runner import run_precision

    images = _images(tmp_path / "images")
    out = tmp_path / "c.h5"
    run_extract(ExtractConfig(profile="tiny", features=("resnet",), precision="fp32", workers=0),
                images, out=out, progress=False)
    # auto continues in the recorded precision, whatever this machine would pick
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert run_precision(ExtractConfig(profile="tiny", precision="auto"), out, CPU) == "fp32"
    assert run_precision(ExtractConfig(profile="tiny", precision="auto", overwrite=True), out, CPU) == "bf16"
    # a cache made in float16 on CUDA cannot be extended exactly on a CPU
    import h5py

    with h5py.File(out, "a") as h5:
        h5.attrs["extract_config"] = '{"precision": "fp16", "profile": "tiny"}'
    with pytest.raises(ConfigError, match="made in float16 on CUDA, which a cpu cannot continue exactly"):
        run_precision(ExtractConfig(profile="tiny", precision="auto"), out, CPU)


def test_byte_transform_is_bit_identical_to_the_float_transform():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8))
    full = T.Compose([T.Resize(32, antialias=True), T.CenterCrop(32), T.ToTensor(),
                      T.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
    split = ByteTransform(full, CPU)
    x = split(image)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert torch.equal(split.normalize(x.unsqueeze(0))[0], full(image))
    with pytest.raises(TypeError, match="ToTensor, Normalize"):
        ByteTransform(T.Compose([T.Resize(32), T.ToTensor()]), CPU)


def _images(d, n=3):
    d.mkdir()
    for i in range(n):
        Image.fromarray(np.full((40, 50, 3), 40 * i + 20, np.uint8)).save(d / f"im{i}.png")
    return d


def test_precision_is_recorded_and_a_resume_in_another_precision_is_refused(tmp_path):
    images = _images(tmp_path / "images")
    out = tmp_path / "c.h5"
    cfg = ExtractConfig(profile="tiny", features=("resnet",), precision="bf16", batch_size=2, workers=0)
    run_extract(cfg, images, out=out, progress=False)
    prov = FeatureCache(out).provenance
    assert prov["extract_config"]["precision"] == "bf16"
    bf16 = FeatureCache(out).load(["resnet/pooled"], ["im0", "im1", "im2"])[0]["resnet/pooled"]
    (images / "im3.png").write_bytes((images / "im0.png").read_bytes())  # something to add
    with pytest.raises(CacheError, match="precision bf16, this run resolves to fp32"):
        run_extract(ExtractConfig(profile="tiny", features=("resnet",), precision="fp32"),
                    images, out=out, progress=False)
    fp32_out = tmp_path / "f.h5"
    run_extract(ExtractConfig(profile="tiny", features=("resnet",), precision="fp32", workers=0),
                images, out=fp32_out, progress=False)
    fp32 = FeatureCache(fp32_out).load(["resnet/pooled"], ["im0", "im1", "im2"])[0]["resnet/pooled"]
    a, b = bf16.astype(np.float32), fp32.astype(np.float32)
    # bfloat16 arithmetic: close to float32, but not identical.
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05 * float(np.abs(b).max()))


def test_caches_from_before_precision_reproduce_their_old_rule():
    from mner.extract.api import config_from_provenance
    from mner.extract.base import recorded_precision

    assert recorded_precision({"precision": "bf16"}, CPU) == "bf16"
    # older caches recorded amp: fp16 autocast on CUDA only
    assert recorded_precision({"amp": True}, CPU) == "fp32"
    assert recorded_precision({"amp": True}, CUDA) == "fp16"
    assert recorded_precision({"amp": False}, CUDA) == "fp32"
    old = {"extract_config": {"profile": "tiny", "amp": True, "max_objects": 15}, "resnet": {}}
    assert config_from_provenance(old, ["resnet"]).precision == "fp32"
    new = {"extract_config": {"profile": "tiny", "precision": "bf16"}, "resnet": {}}
    assert config_from_provenance(new, ["resnet"]).precision == "bf16"


def test_predict_replays_a_float16_cache_as_float32_on_a_cpu(capsys):
    from mner.extract.api import config_from_provenance

    fp16 = {"extract_config": {"profile": "tiny", "precision": "fp16"}, "resnet": {}}
    assert config_from_provenance(fp16, ["resnet"], device="cpu").precision == "fp32"
    assert ("warning: the training cache: made in float16 on CUDA; computing in float32 on cpu"
            in capsys.readouterr().err)
