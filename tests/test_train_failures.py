"""``mner train`` under failure: real kills and resumes, two processes on one run folder,
a cache of another dataset, damaged checkpoints and models, a full disk, NaN features.

Every run here trains the tiny profile on the first tweets of the session sample (a few
seconds each) in float32 on one thread, so an interrupted-then-resumed run can be
compared with an uninterrupted one bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mner.errors import DataError, LockError, MnerError
from mner.train import trainer
from mner.train.config import make_train_config
from mner.train.runs import RunWriteError, load_run
from mner.train.trainer import KILL_ENV, STOP_ENV, train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = ["encoder=tiny", "epochs=2", "seeds=[1]", "patience=0", "amp=off", "threads=1", "batch_size=16"]
SIZES = {"train": 40, "valid": 16, "test": 16}  # 3 batches per epoch


def _blocks(path: Path) -> list[str]:
    return [b for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]


@pytest.fixture(scope="module")
def small_data(sample_dir, tmp_path_factory) -> Path:
    """The first tweets of each split of the session sample (same images, same cache rows)."""
    out = tmp_path_factory.mktemp("small")
    for split, n in SIZES.items():
        (out / f"{split}.txt").write_text("\n\n".join(_blocks(sample_dir / f"{split}.txt")[:n]) + "\n",
                                          encoding="utf-8")
    return out


def _cfg(model="bert_crf", *extra):
    return make_train_config({"model": model, "profile": "tiny"}, [*SETTINGS, *extra])


def _scores(run: Path) -> dict:
    """metrics.json without the timings (the only thing allowed to differ)."""
    m = json.loads((run / "metrics.json").read_text())
    for r in m["runs"]:
        r.pop("seconds_per_epoch")
    m["summary"].pop("seconds_per_epoch")
    return m


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_run(_cfg(), small_data, None, out)
    return out


def _cli(*args, env=None, **kw) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "mner.pipeline.cli", *map(str, args)],
        env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )


def _train_args(data, out, model="bert_crf"):
    args = ["train", "--data", data, "--out", out, "--model", model, "--profile", "tiny"]
    for s in SETTINGS:
        args += ["-o", s]
    return args


@pytest.mark.parametrize("point", ["setup", "batch:2", "epoch:1"])
def test_a_run_killed_and_resumed_matches_an_uninterrupted_one(point, small_data, reference, tmp_path):
    out = tmp_path / "run"
    proc = _cli(*_train_args(small_data, out), env={KILL_ENV: point})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    ckpt = out / "seed_1" / "checkpoint" / "state.json"
    if point == "epoch:1":
        assert json.loads(ckpt.read_text())["epoch"] == 1
    else:  # killed before the first checkpoint: the encoder folder is there, no weights
        assert (out / "seed_1" / "encoder" / "config.json").is_file() and not ckpt.exists()
    assert not (out / "metrics.json").exists()
    assert (out / ".mner.lock").exists()  # the dead process's lock file: taken over below
    train_run(_cfg(), small_data, None, out, resume=True)
    assert _scores(out) == _scores(reference)
    assert not (out / ".mner.lock").exists()


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_second_train_on_the_same_folder_stops_and_touches_nothing(small_data, tiny_cache, tmp_path):
    out = tmp_path / "run"
    first = _cli(*_train_args(small_data, out), env={KILL_ENV: "setup", "MNER_KILL_SIGNAL": "STOP"})
    try:
        deadline = time.time() + 120
        while not _stopped(first.pid):  # paused after its setup, holding the lock
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        assert out / "config.yaml" in before and out / "seed_1" / "labels.json" in before
        second = _cli(*_train_args(small_data, out, model="umt"), "--features", tiny_cache)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        # Above the error only the image-coverage line (its check comes before the lock).
        assert "Traceback" not in err and err.count("error:") == 1
        assert err.strip().splitlines()[-1].startswith(
            f"error: {out}: this run folder is being written by pid {first.pid} on "), err
        after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        assert after == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((out / "metrics.json").read_text())["model"] == "bert_crf"
    assert not (out / ".mner.lock").exists()


def test_the_lock_is_held_for_the_whole_run(small_data, tmp_path):
    from mner.locks import locked

    out = tmp_path / "run"
    with locked(out, folder=True, what="run folder"):
        with pytest.raises(LockError, match=f"^{out}: this run folder is being written by pid {os.getpid()} "):
            train_run(_cfg(), small_data, None, out)
        assert sorted(p.name for p in out.iterdir()) == [".mner.lock"]  # ours; nothing written


def test_a_cache_of_another_dataset_stops_training(tiny_cache, tmp_path, mner_cli):
    from mner.data.sample import SampleConfig, generate

    other = generate(SampleConfig(seed=77, n_train=30, n_valid=10, n_test=10, ocr_dependent_share=0.0),
                     tmp_path / "other")
    out = tmp_path / "run"
    code, _, err = mner_cli(*_train_args(other, out, model="umt"), "--features", tiny_cache)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {tiny_cache}: only ") and " of 30 train tweets (" in line
    assert line.endswith(f"re-extract it with `mner extract --data {other}`, or pass "
                         "-o min_image_coverage=0 if this is meant")
    assert "image coverage: tweets with an ok image in" in err and "train " in err
    assert not out.exists()


def test_coverage_is_recorded_in_provenance(small_data, tiny_cache, tmp_path, capsys):
    out = tmp_path / "run"
    train_run(_cfg("umt", "epochs=1"), small_data, tiny_cache, out)
    cov = json.loads((out / "provenance.json").read_text())["cache_coverage"]
    from mner.cache.reader import FeatureCache
    from mner.data.conll import read_conll

    cache = FeatureCache(tiny_cache)
    for split, n in SIZES.items():
        ok = sum(s == "ok" for s in cache.status_of([t.image_id for t in read_conll(small_data / f"{split}.txt")]))
        assert cov[split] == {"tweets": n, "ok": ok}
    assert 0 < cov["train"]["ok"] <= 40
    assert f"train {cov['train']['ok']}/40, valid" in capsys.readouterr().err


# -- damaged files -------------------------------------------------------------------------


@pytest.fixture
def interrupted(small_data, tmp_path, monkeypatch) -> Path:
    """A run stopped right after the checkpoint of epoch 1."""
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_ENV, "1")
    with pytest.raises(KeyboardInterrupt):
        train_run(_cfg(), small_data, None, out)
    monkeypatch.delenv(STOP_ENV)
    return out


class NotATensor:
    """Pickled into a state.pt: weights_only loading must refuse it."""


def _resume_error(small_data, out, mner_cli) -> str:
    code, _, err = mner_cli(*_train_args(small_data, out), "--resume")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_damaged_checkpoints_are_one_line(interrupted, small_data, mner_cli):
    ckpt = interrupted / "seed_1" / "checkpoint"
    state = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(state[: len(state) // 2])
    line = _resume_error(small_data, interrupted, mner_cli)
    assert line.startswith(f"error: {ckpt / 'state.pt'}: damaged or truncated checkpoint (")
    assert line.endswith(f"delete {ckpt} to restart this seed with --resume, or train again with --overwrite")

    torch.save({"optimizer": NotATensor()}, ckpt / "state.pt")
    line = _resume_error(small_data, interrupted, mner_cli)
    assert line.startswith(f"error: {ckpt / 'state.pt'}: not a trusted checkpoint: it holds objects other "
                           "than tensors and plain data (")
    assert "NotATensor" in line

    (ckpt / "state.pt").write_bytes(state)
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[:1000])
    line = _resume_error(small_data, interrupted, mner_cli)
    assert line.startswith(f"error: {ckpt / 'model.safetensors'}: damaged or truncated model file (")


def test_a_truncated_model_is_one_line_for_evaluate_and_predict(reference, small_data, tmp_path, mner_cli):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    model = run / "seed_1" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"model\.safetensors: damaged or truncated model file"):
        load_run(run, device="cpu")  # what mner predict loads through
    code, _, err = mner_cli("evaluate", "--run", run, "--data", small_data / "test.txt", "--device", "cpu")
    assert code == 2 and err.strip() == (
        f"error: {model}: damaged or truncated model file ({_first_line(err)}); "
        "train the run again (or --resume it, if it was interrupted)")
    code, _, err = mner_cli("predict", "--run", run, "--text", "hello Paris", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "damaged or truncated model file" in err


def _first_line(err: str) -> str:
    return err.split("damaged or truncated model file (", 1)[1].rsplit("); train the run again", 1)[0]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(small_data, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = trainer._write_checkpoint_files
    calls = []

    def second_write_fails(tmp, *args):
        calls.append(tmp)
        if len(calls) == 2:
            (tmp / "model.safetensors").write_bytes(b"half")  # a torn write in the temp folder
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, *args)

    monkeypatch.setattr(trainer, "_write_checkpoint_files", second_write_fails)
    ckpt = out / "seed_1" / "checkpoint"
    with pytest.raises(RunWriteError) as info:
        train_run(_cfg(), small_data, None, out)
    assert str(info.value) == (
        f"{ckpt}: cannot write the checkpoint (No space left on device); the previous one is kept; "
        "free disk space or raise the file-size limit, then continue with --resume")
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1
    assert not ckpt.with_name("checkpoint.tmp").exists()
    monkeypatch.setattr(trainer, "_write_checkpoint_files", real)
    train_run(_cfg(), small_data, None, out, resume=True)  # the kept checkpoint is whole
    assert _scores(out) == _scores(reference)


def test_nan_features_are_named_with_the_cache_to_verify(sample_dir, small_data, tiny_cache, tmp_path):
    cache = tmp_path / "damaged.h5"
    shutil.copy(tiny_cache, cache)
    name = _cfg("umt").head_class().required_features(_cfg("umt").head_config())[0]
    with h5py.File(cache, "r+") as f:
        ds = f[name]
        ds[...] = np.full(ds.shape, np.nan, dtype=ds.dtype)
    with pytest.raises(trainer.NonFiniteLoss) as info:
        train_run(_cfg("umt"), small_data, cache, tmp_path / "run")
    msg = str(info.value)
    assert msg.startswith("seed 1 epoch 1/2: loss is nan: ") and f"{name} has NaN for image ids " in msg
    assert msg.endswith(f"; the cache is damaged: mner inspect --verify {cache}")
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, MnerError)


def test_a_file_size_limit_while_checkpointing_is_one_line(small_data, reference, tmp_path):
    import resource

    out = tmp_path / "run"
    # Room for the best model, not for the checkpoint's optimizer state (twice its size).
    limit = int((reference / "seed_1" / "model.safetensors").stat().st_size * 1.5)

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # Run outside the repository: inside it dvclive opens the project's DVC state, a
    # SQLite file that the whole test suite grows, and the limit would hit it first.
    proc = _cli(*_train_args(small_data, out), preexec_fn=limited, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    ckpt = out / "seed_1" / "checkpoint"
    assert proc.returncode == 2, err
    assert "Traceback" not in err and err.count("error:") == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {ckpt}: cannot write the checkpoint (")
    assert line.endswith("; the previous one is kept; free disk space or raise the file-size limit, "
                         "then continue with --resume")
    assert not ckpt.exists() and not ckpt.with_name("checkpoint.tmp").exists()
    train_run(_cfg(), small_data, None, out, resume=True)  # limit lifted: starts afresh
    assert _scores(out) == _scores(reference)


def test_an_output_that_is_not_a_folder_is_one_line(small_data, tmp_path, mner_cli):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    code, _, err = mner_cli(*_train_args(small_data, out))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {out}: cannot write (Not a directory); ")


def test_loading_a_run_replays_its_precision_and_builds_like_training(reference, tmp_path, monkeypatch, capsys):
    from mner.train import runs

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["precision"] == "fp32" and load_run(run, device="cpu").precision == "fp32"
    prov["precision"] = "fp16"  # as a CUDA machine records it
    (run / "provenance.json").write_text(json.dumps(prov))
    built = []
    real = runs.build_model
    monkeypatch.setattr(runs, "build_model", lambda *a: built.append(a[1]) or real(*a))
    loaded = load_run(run, device="cpu")
    assert loaded.precision == "fp32" and built == [1]
    assert capsys.readouterr().err.strip() == (
        f"warning: {run}: made in float16 on CUDA; computing in float32 on cpu, so results may "
        "differ from the recorded ones in the last digits")


def test_evaluate_pred_to_an_unwritable_place_is_one_line(reference, small_data, tmp_path, mner_cli):
    (tmp_path / "afile").write_text("x")
    pred = tmp_path / "afile" / "pred.txt"
    code, out, err = mner_cli("evaluate", "--run", reference, "--data", small_data / "test.txt",
                              "--device", "cpu", "--pred", pred)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith(f"error: {pred}: cannot write the predictions (")
    assert not (reference / ".mner.lock").exists()  # evaluate --pred takes no lock on the run


def test_resume_accepts_a_config_written_before_a_setting_existed(tmp_path):
    import yaml

    from mner.config import to_dict
    from mner.errors import ConfigError
    from mner.train.runs import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    old = to_dict(_cfg())
    del old["min_image_coverage"]  # a run folder from before the coverage check
    folder.config.write_text(yaml.safe_dump(old, sort_keys=False))
    trainer._prepare_out(_cfg(), folder, resume=True)
    assert yaml.safe_load(folder.config.read_text())["min_image_coverage"] == 0.5
    with pytest.raises(ConfigError, match=r"--resume with a different config \(min_image_coverage: 0\.5 before, 0\.0 now\)"):
        trainer._prepare_out(_cfg("bert_crf", "min_image_coverage=0"), folder, resume=True)
