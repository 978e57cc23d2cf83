"""Device names and mixed precision: one rule for both stages, recorded and reused by runs."""

from __future__ import annotations

import json

import pytest
import torch

from mner import devices
from mner.devices import autocast, resolve_device
from mner.errors import ConfigError
from mner.extract.base import resolve_precision
from mner.train.config import make_train_config
from mner.train.trainer import resolve_amp, run_precision

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


def test_train_amp_resolves_like_extraction_precision(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert resolve_amp("auto", CPU) == resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert resolve_amp("auto", CPU) == resolve_precision("auto", CPU) == "fp32"
    assert resolve_amp("bf16", CPU) == "bf16"  # forced: emulated where not native
    assert resolve_amp("off", CPU) == resolve_amp("off", CUDA) == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", CPU)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", CUDA) == "fp16" and resolve_amp("bf16", CUDA) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", CUDA) == "bf16" and resolve_amp("fp16", CUDA) == "fp16"


def test_a_resumed_run_keeps_the_precision_it_started_in(tmp_path, monkeypatch):
    cfg = make_train_config({"model": "bert_crf", "profile": "tiny"}, [])
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert run_precision(cfg, CPU, tmp_path, resume=False) == "fp32"
    (tmp_path / "provenance.json").write_text(json.dumps({"precision": "bf16"}))
    # Started on a bfloat16 machine, resumed on one without: still bf16, same result.
    assert run_precision(cfg, CPU, tmp_path, resume=True) == "bf16"
    assert run_precision(cfg, CPU, tmp_path, resume=False) == "fp32"  # a new run decides anew
    (tmp_path / "provenance.json").write_text(json.dumps({"precision": "fp16"}))
    with pytest.raises(ConfigError, match="float16 on CUDA and cannot resume on cpu"):
        run_precision(cfg, CPU, tmp_path, resume=True)
    (tmp_path / "provenance.json").write_text(json.dumps({}))  # written before precision existed
    assert run_precision(cfg, CPU, tmp_path, resume=True) == "fp32"
