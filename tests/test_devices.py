"""Device names and mixed precision: one rule for both stages, recorded and reused by runs."""

from __future__ import annotations

import json

import pytest
import torch

from mner import devices
from mner.devices import autocast, replay_precision, resolve_device, resolve_precision
from mner.errors import ConfigError
from mner.train.config import make_train_config
from mner.train.runs import RunFolder
from mner.train.trainer import run_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_resolve_device_names_and_errors():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="use auto, cpu or cuda"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:1")


def test_autocast_runs_matmuls_in_the_named_precision():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast(CPU, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert layer(x).dtype == torch.float32


class _FakeCuda:
    """A stand-in for a CUDA device object: the policy only looks at ``.type``."""

    type = "cuda"


def test_precision_policy_for_new_runs(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", CPU, what="train.amp") == "bf16"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # forced: emulated where not native
    assert resolve_precision("off", CPU) == resolve_precision("fp32", _FakeCuda()) == "fp32"
    with pytest.raises(ConfigError, match=r"^train\.amp fp16 needs a CUDA device \(running on cpu\)"):
        resolve_precision("fp16", CPU, what="train.amp")
    with pytest.raises(ConfigError, match=r"^train\.amp 'half': use one of auto, fp32, off, bf16, fp16$"):
        resolve_precision("half", CPU, what="train.amp")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", _FakeCuda()) == "fp16" and resolve_precision("bf16", _FakeCuda()) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", _FakeCuda()) == "bf16" and resolve_precision("fp16", _FakeCuda()) == "fp16"


def test_replaying_a_recorded_precision(tmp_path):
    warnings = []
    assert replay_precision("bf16", CPU, where="runs/a") == "bf16"
    assert replay_precision("fp16", _FakeCuda(), exact=True, where="runs/a") == "fp16"
    assert replay_precision("fp16", CPU, where="runs/a", warn=warnings.append) == "fp32"
    assert warnings == ["warning: runs/a: made in float16 on CUDA; computing in float32 on cpu, "
                        "so results may differ from the recorded ones in the last digits"]
    with pytest.raises(ConfigError, match=r"^runs/a: made in float16 on CUDA, which a cpu cannot continue exactly"):
        replay_precision("fp16", CPU, exact=True, where="runs/a")
    with pytest.raises(ConfigError, match="recorded precision 'fp8'"):
        replay_precision("fp8", CPU, where="runs/a")


def test_a_resumed_run_keeps_the_precision_it_started_in(tmp_path, monkeypatch):
    cfg = make_train_config({"model": "bert_crf", "profile": "tiny"}, [])
    folder = RunFolder(tmp_path)
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert run_precision(cfg, CPU, folder, resume=False) == "fp32"
    (tmp_path / "provenance.json").write_text(json.dumps({"precision": "bf16"}))
    # Started on a bfloat16 machine, resumed on one without: still bf16, same result.
    assert run_precision(cfg, CPU, folder, resume=True) == "bf16"
    assert run_precision(cfg, CPU, folder, resume=False) == "fp32"  # a new run decides anew
    (tmp_path / "provenance.json").write_text(json.dumps({"precision": "fp16"}))
    with pytest.raises(ConfigError, match="made in float16 on CUDA, which a cpu cannot continue exactly"):
        run_precision(cfg, CPU, folder, resume=True)
    (tmp_path / "provenance.json").write_text(json.dumps({}))  # written before precision existed
    assert run_precision(cfg, CPU, folder, resume=True) == "fp32"

