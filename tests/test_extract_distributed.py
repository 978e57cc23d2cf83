"""Extraction in shards across ranks (torchrun, ``--nproc``): the merged cache is the
one-process cache, dataset checksum by dataset checksum, also after a rank is killed.

The default tests run the shard plan and the merge in-process and one real 2-process
run (gloo, CPU) with a killed rank and its resume; the full torchrun command line with
every feature is marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from mner.cache.writer import SHARD_ATTR, WORLD_SIZE_ATTR, merge_shards
from mner.errors import CacheError, ConfigError
from mner.extract import shards
from mner.extract.config import ExtractConfig
from mner.extract.runner import TEXT_BATCH, _read_inputs, _write_cache, run_extract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 9
MISSING = ("gone1", "gone2")


def _dataset(d: Path) -> tuple[Path, Path]:
    """9 images and a CoNLL file whose tweets also name two images that do not exist."""
    images = d / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (30 + 3 * i, 36, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    ids = [f"im{i}" for i in range(N_IMAGES)]
    ids = ids[:4] + [MISSING[0]] + ids[4:] + [MISSING[1]]
    lines = []
    for t, img in enumerate(ids):
        lines += [f"IMGID:{img}", f"w{t}\tO", "Paris\tB-LOC", *(["Obama\tB-PER"] if t % 3 == 0 else []), ""]
    conll = d / "d.txt"
    conll.write_text("\n".join(lines) + "\n")
    return images, conll


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"profile": "tiny", "features": ("resnet", "clip_text"), "device": "cpu",
                            "workers": 0, "batch_size": 2, "threads": 1, **kw})


def _sums(path: Path) -> dict[str, str]:
    from mner.cache.inspect import summary

    return {k: v["sha256"] for k, v in summary(path)["datasets"].items()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The dataset and a one-process run's checksums."""
    d = tmp_path_factory.mktemp("dist")
    images, conll = _dataset(d)
    out = d / "one.h5"
    run_extract(_cfg(), images, [conll], out, progress=False)
    return images, conll, out, _sums(out)


# -- the plan ---------------------------------------------------------------------------------


def test_split_cuts_whole_batches_and_covers_every_row_once():
    assert shards.split(10, 2, 4) == [(0, 8), (8, 10)]
    assert shards.split(9, 2, 2) == [(0, 6), (6, 9)]
    assert shards.split(3, 4, 2) == [(0, 2), (2, 3), (3, 3), (3, 3)]
    assert shards.split(0, 3, 2) == [(0, 0)] * 3
    for n in range(0, 40):
        for size in (1, 2, 3, 8):
            cuts = shards.split(n, size, 4)
            assert cuts[0][0] == 0 and cuts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:], strict=False))
            assert all(s % 4 == 0 or s == n for s, _ in cuts)  # one-process batches never split
            batches = [-(-(e - s) // 4) for s, e in cuts]
            assert max(batches) - min(batches) <= 1 and batches == sorted(batches, reverse=True)


def test_plan_depends_only_on_the_ordered_list_and_world_size():
    ids = [f"i{k}" for k in range(7)]
    a = shards.make_plan(ids, ["k1"], 3, 2, TEXT_BATCH)
    assert a == shards.make_plan(list(ids), ["k1"], 3, 2, TEXT_BATCH)
    assert a["images"] == [[0, 4], [4, 6], [6, 7]] and a["text"] == [[0, 1], [1, 1], [1, 1]]
    assert a["image_list_sha256"] != shards.make_plan(ids[::-1], ["k1"], 3, 2, TEXT_BATCH)["image_list_sha256"]


def test_world_comes_from_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert shards.world() == shards.World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert shards.world() == shards.World(rank=3, size=4, local_rank=1, local_size=2)
    assert shards.cpu_share(shards.World(size=2, local_size=2)) == max(1, len(os.sched_getaffinity(0)) // 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="inconsistent"):
        shards.world()


# -- shards and merge, in-process ---------------------------------------------------------------


def test_shards_merged_equal_the_one_process_cache(ref, tmp_path):
    """Each rank's slice written to its own shard, merged: the same bytes as one process.

    Three ranks over 11 images in batches of 2 (one rank gets an odd count, one holds a
    missing image), sentences split too; the shards are written by the same code a rank
    runs, in this process.
    """
    images, conll, _, want = ref
    cfg = _cfg()
    ids, paths, text = _read_inputs(cfg, images, [conll])
    keys = list(text)
    plan = shards.make_plan(ids, keys, 3, cfg.batch_size, TEXT_BATCH)
    out = tmp_path / "merged.h5"
    files = []
    emax = max(len(v[1]) for v in text.values())
    for rank in range(3):
        (s, e), (ts, te) = plan["images"][rank], plan["text"][rank]
        f = shards.shard_path(out, rank, 3)
        _write_cache(cfg, images, f, ids[s:e], paths[s:e], {k: text[k] for k in keys[ts:te]},
                     progress=False, root={SHARD_ATTR: {**plan, "rank": rank}, WORLD_SIZE_ATTR: 3},
                     emax=emax)
        files.append(f)
    assert [f.name for f in files] == [f"merged.h5.shard-0000{r}-of-00003" for r in range(3)]
    merge_shards(out, files, {WORLD_SIZE_ATTR: 3})
    assert _sums(out) == want
    with h5py.File(out) as h5:
        assert h5.attrs[WORLD_SIZE_ATTR] == 3 and SHARD_ATTR not in h5.attrs
        assert h5["resnet/done"][:].all() and h5["resnet/done"].maxshape == (None,)
    assert not out.with_name(out.name + ".merging").exists()
    # Shards still beside a committed merge (a run stopped just before deleting them) are
    # leftovers: any later run on out drops them instead of asking to resume them.
    assert all(f.exists() for f in files)
    res = run_extract(cfg, images, [conll], out, progress=False)
    assert res["computed"] == 0 and shards.existing_shards(out) == {}
    assert _sums(out) == want


def test_merge_refuses_shards_made_with_other_settings(ref, tmp_path):
    images, _, _, _ = ref
    out = tmp_path / "m.h5"
    a, b = shards.shard_path(out, 0, 2), shards.shard_path(out, 1, 2)
    ids = [f"im{i}" for i in range(4)]
    paths = [images / f"{i}.png" for i in ids]
    _write_cache(_cfg(features=("resnet",)), images, a, ids[:2], paths[:2], {}, progress=False)
    _write_cache(_cfg(features=("resnet",), seed=1), images, b, ids[2:], paths[2:], {},
                 progress=False)
    with pytest.raises(CacheError, match=r"m\.h5\.shard-00001-of-00002: its resnet features were made "
                                         "with other settings"):
        merge_shards(out, [a, b], {})
    assert not out.exists() and a.exists() and b.exists()


def test_merge_is_verified_against_the_shards(ref, tmp_path, monkeypatch):
    """A merged dataset that does not read back as the shards' rows is never committed."""
    from mner.cache import integrity

    images, _, _, _ = ref
    out = tmp_path / "v.h5"
    ids = [f"im{i}" for i in range(2)]
    a = shards.shard_path(out, 0, 1)
    _write_cache(_cfg(features=("resnet",)), images, a, ids, [images / f"{i}.png" for i in ids], {},
                 progress=False)
    real = integrity.concat_checksum
    def lying(parts):  # the shards' side of one dataset hashes differently from the copy
        shard = parts[0].file.filename.endswith("shard-00000-of-00001")
        return "0" * 64 if shard and parts[0].name == "/resnet/pooled" else real(parts)

    monkeypatch.setattr(integrity, "concat_checksum", lying)
    with pytest.raises(CacheError, match=r"v\.h5\.merging: resnet/pooled does not read back as the "
                                         "shards' rows"):
        merge_shards(out, [a], {})
    assert not out.exists() and a.exists()


def test_sharded_run_resumes_its_recorded_plan_and_refuses_changed_inputs(ref, tmp_path, monkeypatch):
    """The rank-side logic in one process (a world of one rank): an interrupted shard keeps
    its plan, other inputs are refused, the resume completes to the one-process cache; a
    one-process partial on ``out`` is not taken over."""
    from mner.extract.runner import FAIL_AFTER_ENV, _run_sharded

    images, conll, _, want = ref
    w = shards.World()
    out = tmp_path / "s.h5"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(RuntimeError, match="injected failure"):
        _run_sharded(_cfg(), images, [conll], out, False, w)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    part = shards.shard_path(out, 0, 1).with_name("s.h5.shard-00000-of-00001.partial")
    assert part.exists() and not out.exists()
    with pytest.raises(CacheError, match="the image list changed since this sharded extraction started"):
        _run_sharded(_cfg(), images, None, out, False, w)  # the folder's images, not the tweets'
    res = _run_sharded(_cfg(), images, [conll], out, False, w)
    assert res["computed"] == N_IMAGES - 4 and res["world_size"] == 1  # 2 batches of 2 were kept
    assert _sums(out) == want and shards.existing_shards(out) == {}

    other = tmp_path / "p.h5"
    other.with_name("p.h5.partial").write_bytes(b"x")
    with pytest.raises(CacheError, match=r"p\.h5\.partial: an interrupted one-process extraction; resume "
                                         "it with one process"):
        _run_sharded(_cfg(), images, [conll], other, False, w)


def test_nproc_flag_is_checked(mner_cli, ref, tmp_path, monkeypatch):
    images, _, _, _ = ref
    code, _, err = mner_cli("extract", "--images", images, "--out", tmp_path / "x.h5", "--nproc", "0")
    assert code == 2 and err.strip() == "error: --nproc 0: pass 1 or more processes"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="inside a torchrun job of 2 ranks: drop --nproc"):
        run_extract(_cfg(), images, None, tmp_path / "x.h5", nproc=2)
    assert not any(tmp_path.iterdir())


# -- real ranks ---------------------------------------------------------------------------------


def _mner(*args: str | Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    e.pop(shards.KILL_AFTER_ENV, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "mner", *map(str, args)], env=e, capture_output=True,
                          text=True, timeout=timeout)


ARGS = ("--profile", "tiny", "--features", "resnet,clip_text", "--device", "cpu", "--workers", "0",
        "--batch-size", "2", "--quiet")


def test_killed_rank_resumes_to_the_one_process_cache(ref, tmp_path):
    """``--nproc 2`` with rank 1 killed (SIGKILL) after its first batch: one line, exit 2,
    both shards kept; one process refuses them (other world size); the same command
    resumes them and writes the one-process cache; the shards are gone."""
    images, conll, _, want = ref
    out = tmp_path / "two.h5"
    run = ("extract", "--images", images, "--data", conll, "--out", out, *ARGS, "--nproc", "2")
    r = _mner(*run, env={shards.KILL_AFTER_ENV: "1:1"})
    assert r.returncode == 2, r.stderr
    assert "error: extraction rank 1 stopped (killed by signal 9); re-run the same command to resume" in r.stderr
    assert not out.exists()
    left = sorted(p.name for p in shards.existing_shards(out))
    assert "two.h5.shard-00001-of-00002.partial" in left, left

    with pytest.raises(CacheError, match=r"shard of an interrupted extraction with 2 processes, this run "
                                         r"has 1; re-run with 2 processes \(--nproc 2"):
        run_extract(_cfg(), images, [conll], out, progress=False)

    r = _mner(*run)
    assert r.returncode == 0, r.stderr
    computed = int(r.stdout.split("computed ")[1].split()[0])
    assert 0 < computed < N_IMAGES  # rank 1's first batch was kept
    assert _sums(out) == want
    assert shards.existing_shards(out) == {}
    with h5py.File(out) as h5:
        assert h5.attrs[WORLD_SIZE_ATTR] == 2


@pytest.mark.slow
def test_torchrun_every_feature_equals_one_process(ref, tmp_path):
    """``torchrun --nproc-per-node 2 -m mner extract`` with every feature, then a re-run
    with another world size on the finished cache is a no-op, and a world-size mismatch
    on shards is one line through the launcher."""
    images, conll, _, _ = ref
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    cfg = ExtractConfig(profile="tiny", device="cpu", workers=0, batch_size=2, threads=1)
    run_extract(cfg, images, [conll], one, progress=False)
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mner", "extract", "--images", str(images), "--data", str(conll), "--out", str(two),
           "--profile", "tiny", "--device", "cpu", "--workers", "0", "--batch-size", "2", "--quiet"]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _sums(two) == _sums(one)

    r = _mner("extract", "--images", images, "--data", conll, "--out", two, "--profile", "tiny",
              "--device", "cpu", "--quiet", "--nproc", "3")
    assert r.returncode == 0 and "computed 0 this run" in r.stdout, r.stderr

    three = tmp_path / "three.h5"
    shards.shard_path(three, 0, 2).with_name(shards.shard_path(three, 0, 2).name + ".partial").write_bytes(b"")
    r = _mner("extract", "--images", images, "--out", three, *ARGS, "--nproc", "3")
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert lines == [f"error: {three}.shard-00000-of-00002.partial: shard of an interrupted extraction "
                     "with 2 processes, this run has 3; re-run with 2 processes (--nproc 2, or torchrun "
                     "with 2 ranks in all) to resume it, or pass --overwrite to start over"]
    assert "Traceback" not in r.stderr
