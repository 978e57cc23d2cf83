"""Extraction never loses or corrupts anything: injected write failures, kill -9, two
processes on one cache, damaged files, and the thread count.

Every test compares the cache it ends with against an uninterrupted run's per-dataset
checksums (``mner inspect --json``), so "resumed" means "identical", not "finished".
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from mner.cache.reader import FeatureCache
from mner.cache.writer import partial_path
from mner.errors import CacheError
from mner.extract.config import ExtractConfig
from mner.extract.runner import BATCH_DELAY_ENV, FAIL_AFTER_ENV, run_extract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 8
ARGS = ("--profile", "tiny", "--features", "resnet", "--device", "cpu", "--workers", "0",
        "--batch-size", "2", "--quiet", "-o", "threads=1")


def _images(d: Path, n: int = N_IMAGES) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32 + 4 * i, 40, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"profile": "tiny", "features": ("resnet",), "device": "cpu", "workers": 0,
                            "batch_size": 2, "threads": 1, **kw})


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Images and an uninterrupted run's checksums."""
    d = _images(tmp_path_factory.mktemp("dur") / "images")
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    run_extract(_cfg(), d, out=out, progress=False)
    return d, out, _sums(out)


def _sums(path: Path) -> dict[str, str]:
    from mner.cache.inspect import summary

    return {k: v["sha256"] for k, v in summary(path)["datasets"].items()}


def _no_ok_row_is_zero(path: Path) -> None:
    cache = FeatureCache(path)
    arrays, ok, _ = cache.load(["resnet/pooled", "resnet/grid"], cache.image_ids)
    assert ok.all()
    for name, a in arrays.items():
        assert a.reshape(len(a), -1).any(axis=1).all(), f"an ok row of {name} holds zeros"


def _spawn(images: Path, out: Path, *extra: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """``mner extract`` in a real second process (same interpreter and source tree)."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-c", "from mner.pipeline.cli import main; main()", "extract",
           "--images", str(images), "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


# -- failed writes -------------------------------------------------------------------------


def test_disk_full_mid_run_is_one_line_and_the_resume_is_identical(tmp_path, ref, mner_cli, monkeypatch):
    images, _, want = ref
    out = tmp_path / "c.h5"
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full_after_some_writes(self, key, value):
        calls["n"] += 1
        if calls["n"] > 12:  # a few batches in
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full_after_some_writes)
    code, _, err = mner_cli("extract", "--images", images, "--out", out, *ARGS)
    assert code == 2
    assert err == (f"error: {partial_path(out)}: writing the feature cache failed (No space left on "
                   "device); free disk space (or raise the file-size limit) and re-run the same mner "
                   "extract to resume\n")
    assert partial_path(out).exists() and not out.exists()
    assert not out.with_name(out.name + ".lock").exists()

    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    code, stdout, err = mner_cli("extract", "--images", images, "--out", out, *ARGS)
    assert code == 0, err
    assert "computed" in stdout and f"{N_IMAGES} images" in stdout
    assert _sums(out) == want
    _no_ok_row_is_zero(out)


def test_file_size_limit_in_a_real_process(tmp_path, ref):
    images, ref_out, want = ref
    out = tmp_path / "c.h5"
    limit = ref_out.stat().st_size // 2

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _spawn(images, out, preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {partial_path(out)}: writing the feature cache failed (")
    assert "File too large" in lines[0] and lines[0].endswith("re-run the same mner extract to resume")
    assert not out.exists()

    res = run_extract(_cfg(), images, out=out, progress=False)  # no limit now: resumes
    assert res["images"] == N_IMAGES
    assert _sums(out) == want
    _no_ok_row_is_zero(out)


def test_done_flag_without_data_is_not_trusted(tmp_path, ref, monkeypatch):
    images, _, want = ref
    out = tmp_path / "c.h5"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_extract(_cfg(), images, out=out, progress=False)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    with h5py.File(partial_path(out), "a") as h5:  # as if row 1's data never reached the disk
        assert h5["resnet/done"][:4].all()
        h5["resnet/grid"][1] = 0
        h5["resnet/pooled"][1] = 0
        h5["status"][3] = "pending"  # and row 3's status never did
    res = run_extract(_cfg(), images, out=out, progress=False)
    assert res["computed"] == N_IMAGES - 4 + 2
    assert _sums(out) == want


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unverifiable_partial_is_set_aside_and_the_run_starts_over(tmp_path, ref, monkeypatch, capsys,
                                                                   damage):
    images, _, want = ref
    out = tmp_path / "c.h5"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(RuntimeError):
        run_extract(_cfg(), images, out=out, progress=False)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    part = partial_path(out)
    raw = part.read_bytes()
    if damage == "truncate":
        part.write_bytes(raw[: len(raw) * 2 // 3])
    else:
        with h5py.File(part, "r") as h5:  # overwrite the stored grid chunk of row 0
            off = h5["resnet/grid"].id.get_chunk_info(0).byte_offset
        part.write_bytes(raw[:off] + bytes(64) + raw[off + 64:])
    broken = part.read_bytes()
    capsys.readouterr()
    res = run_extract(_cfg(), images, out=out, progress=False)
    err = capsys.readouterr().err
    assert res["computed"] == N_IMAGES
    aside = list(tmp_path.glob("c.h5.partial.broken-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == broken  # kept, byte for byte
    assert f"warning: {part}: cannot be verified (" in err
    assert f"set aside as {aside[0].name}, starting over" in err
    assert _sums(out) == want


# -- two processes, kill -9 ------------------------------------------------------------------


def test_second_extract_on_the_same_cache_is_refused(tmp_path, ref, mner_cli):
    images, _, want = ref
    out = tmp_path / "c.h5"
    first = _spawn(images, out, env={BATCH_DELAY_ENV: "0.4"})
    try:
        _wait_for(partial_path(out), first)
        code, _, err = mner_cli("extract", "--images", images, "--out", out, *ARGS)
        assert code == 2
        assert err.startswith(f"error: {out}: this feature cache is being written by pid {first.pid} on ")
        assert err.count("\n") == 1
        assert partial_path(out).exists() and not list(tmp_path.glob("*.broken-*"))
        _, ferr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, ferr
    assert _sums(out) == want


def test_kill_9_mid_run_then_resume_takes_over_the_lock(tmp_path, ref, capsys):
    images, _, want = ref
    out = tmp_path / "c.h5"
    proc = _spawn(images, out, env={BATCH_DELAY_ENV: "0.5"})
    try:
        _wait_for(partial_path(out), proc)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not out.exists() and out.with_name("c.h5.lock").exists()
    capsys.readouterr()
    run_extract(_cfg(), images, out=out, progress=False)
    err = capsys.readouterr().err
    assert f"warning: {out}: took over a stale lock left by pid {proc.pid}" in err
    assert _sums(out) == want
    assert not out.with_name("c.h5.lock").exists()


# -- damaged caches ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_cache_is_one_line_everywhere(tmp_path, ref, mner_cli, damage):
    images, ref_out, _ = ref
    bad = tmp_path / "bad.h5"
    raw = ref_out.read_bytes()
    bad.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else os.urandom(4096))
    start = f"{bad}: not a readable HDF5 feature cache ("
    end = "); re-run mner extract (--overwrite)"
    with pytest.raises(CacheError) as e:
        FeatureCache(bad)
    assert str(e.value).startswith(start) and str(e.value).endswith(end) and "\n" not in str(e.value)
    for args in (("inspect", bad), ("inspect", bad, "--verify"),
                 ("extract", "--images", images, "--out", bad, *ARGS)):
        code, _, err = mner_cli(*args)
        assert code == 2 and err.startswith("error: " + start), (args, err)
        assert err.rstrip("\n").endswith(end) and err.count("\n") == 1, err


def test_verify_finds_flipped_bytes_and_reading_them_is_a_cache_error(tmp_path, ref, mner_cli):
    _, ref_out, _ = ref
    copy = tmp_path / "c.h5"
    copy.write_bytes(ref_out.read_bytes())
    code, stdout, err = mner_cli("inspect", copy, "--verify")
    assert code == 0, err
    assert "matches the checksums recorded at completion" in stdout
    with h5py.File(copy, "r") as h5:
        info = h5["resnet/grid"].id.get_chunk_info_by_coord((2, 0, 0))
    data = bytearray(copy.read_bytes())
    for i in range(info.byte_offset + 100, info.byte_offset + 108):
        data[i] ^= 0xFF
    copy.write_bytes(bytes(data))
    code, _, err = mner_cli("inspect", copy, "--verify")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {copy}: resnet/grid: ")
    code, _, err = mner_cli("inspect", copy)  # the plain summary reads everything too
    assert code == 2 and err.startswith(f"error: {copy}: resnet/grid cannot be read (")
    assert err.count("\n") == 1
    cache = FeatureCache(copy)
    cache.load(["resnet/grid"], ["im0", "im1"])  # undamaged rows still read
    with pytest.raises(CacheError, match=r"resnet/grid cannot be read .*the file is damaged; check it "
                                         r"with mner inspect --verify"):
        cache.load(["resnet/grid"], ["im2"])


def test_inspect_lists_ids_per_status(tmp_path, mner_cli):
    d = _images(tmp_path / "images", 3)
    (d / "zz_empty.jpg").write_bytes(b"")
    (d / "trunc.png").write_bytes((d / "im0.png").read_bytes()[:200])
    out = tmp_path / "c.h5"
    run_extract(_cfg(), d, out=out, progress=False)
    code, stdout, _ = mner_cli("inspect", out, "--statuses")
    assert code == 0
    assert stdout.splitlines() == ["empty (1): zz_empty", "truncated (1): trunc"]
    code, stdout, _ = mner_cli("inspect", out, "--json")
    assert json.loads(stdout)["statuses"] == {"empty": ["zz_empty"], "truncated": ["trunc"]}


# -- thread count ------------------------------------------------------------------------------


def test_the_cache_does_not_depend_on_the_thread_count(tmp_path):
    d = _images(tmp_path / "images", 4)
    feats = ("objects", "relations", "crops")
    sums = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.h5"
        run_extract(_cfg(features=feats, threads=threads, batch_size=4), d, out=out, progress=False)
        sums.append(_sums(out))
    assert sums[0] == sums[1]
