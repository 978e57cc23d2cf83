"""``mner train`` under torchrun (CPU, gloo, 2 ranks, tiny profile): DDP and seed-parallel.

The runs use a 40-tweet sample and two epochs, so a launch costs mostly imports. To
compare a DDP run with a one-process run step for step, dropout is switched off in the
tiny encoder (``sitecustomize`` below, on the ``PYTHONPATH`` of every process torchrun
starts) and before the emission layer (``-o dropout=0``): dropout masks are drawn per
rank, so with dropout the two runs agree only in distribution. With it off, and
``global_batch: true``, they agree up to float summation order: the per-epoch losses to
within a relative 1e-4, which is what is asserted (dev and test F1 too, which came out
identical).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mner.errors import ConfigError
from mner.train import distributed
from mner.train.config import make_train_config
from mner.train.data import bucket_batches
from mner.train.losses import info_nce
from mner.train.trainer import train_run

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
#: Relative tolerance of DDP vs one-process per-epoch losses (float summation order).
LOSS_RTOL = 1e-4

#: ``build_tiny`` without dropout; defined once as source, for this process and for the
#: ``sitecustomize`` hook below that patches it into every process torchrun starts.
NO_DROPOUT_BUILD = textwrap.dedent(
    """
    def no_dropout_build(build):
        def build_tiny(*args, **kwargs):
            import torch

            enc, tok = build(*args, **kwargs)
            enc.config.hidden_dropout_prob = enc.config.attention_probs_dropout_prob = 0.0
            for m in enc.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
                if hasattr(m, "dropout_prob"):
                    m.dropout_prob = 0.0
            return enc, tok

        return build_tiny
    """
)
_ns: dict = {}
exec(NO_DROPOUT_BUILD, _ns)
_no_dropout_build = _ns["no_dropout_build"]

NO_DROPOUT = '"""Tests only: the tiny encoder without dropout (patched when mner imports it)."""\n' + \
    NO_DROPOUT_BUILD + textwrap.dedent(
    """
    import importlib.abc
    import importlib.util
    import sys


    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "mner.train.encoder":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.build_tiny = no_dropout_build(module.build_tiny)

            spec.loader.exec_module = exec_module
            return spec


    sys.meta_path.insert(0, _Hook())
    """
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment for subprocesses: this worktree first, the no-dropout hook, 1 thread each."""
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(NO_DROPOUT)
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(hook), str(REPO), e.get("PYTHONPATH", "")])
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("MNER_KILL_AT", "MNER_STOP_AFTER_EPOCH", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from mner.data.sample import SampleConfig, generate

    out = tmp_path_factory.mktemp("mini")
    generate(SampleConfig(seed=5, n_train=40, n_valid=16, n_test=16, image_size=64, min_image_size=32), out)
    return out


def _torchrun(env, *args, nproc=2, extra_env=None, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mner", *map(str, args)]
    r = subprocess.run(cmd, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _opts(*extra):
    return ["--model", "bert_crf", "--profile", "tiny", "-o", f"epochs={EPOCHS}", "-o", "amp=off",
            "-o", "dropout=0", "-o", "threads=1", "-o", "patience=0", *extra]


def _history(run: Path, seed: int = 1) -> list[dict]:
    return json.loads((run / f"seed_{seed}" / "history.json").read_text())


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


# -- the sampler and the mode (no processes) --------------------------------------------


def test_shards_partition_every_global_batch_and_weights_restore_the_mean():
    gen = torch.Generator().manual_seed(3)
    lengths = [(i * 7) % 11 + 1 for i in range(37)]
    batches = bucket_batches(lengths, 8, 2, gen)  # 4 batches of 8, one of 5
    for n in (1, 2, 3):
        per_rank = [distributed.shard_batches(batches, r, n) for r in range(n)]
        for b, batch in enumerate(batches):
            parts = [per_rank[r][0][b] for r in range(n)]
            assert sum(parts, []) == list(batch)  # contiguous, in order, disjoint, complete
            weights = [per_rank[r][1][b] for r in range(n)]
            # mean over ranks of weight x (mean over the share) = mean over the batch
            x = torch.tensor(lengths, dtype=torch.float64)
            got = sum(w * x[p].mean() for w, p in zip(weights, parts, strict=True)) / n
            assert float(got) == pytest.approx(float(x[list(batch)].mean()), rel=1e-12)
    # a global batch smaller than the world: the empty rank gets a weight-0 stand-in
    assert distributed.shard([4, 9], 2, 3) == ([4], 0.0)
    assert distributed.shard([4, 9], 1, 3) == ([9], 1.5)


def test_mode_rule_and_config():
    assert distributed.choose_mode("auto", 3, 1) == "single"
    assert distributed.choose_mode("auto", 1, 4) == "ddp"
    assert distributed.choose_mode("auto", 3, 4) == "seeds"
    assert distributed.choose_mode("ddp", 3, 2) == "ddp"
    assert distributed.choose_mode("seeds", 1, 2) == "seeds"
    with pytest.raises(ConfigError):
        make_train_config({"profile": "tiny"}, ["parallel=both"])
    assert make_train_config({"profile": "tiny"}, ["global_batch=true"]).global_batch is True


# -- the contrastive loss gathered across 2 ranks ---------------------------------------

GATHER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from mner.train import distributed
    from mner.train.losses import info_nce

    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    (share, weight) = distributed.shard(list(range(7)), rank, 2)   # 4 rows, then 3
    out = {}
    with distributed.process_group(torch.device("cpu"), "ddp"):
        for direction in ("a2b", "both"):
            x, y = a[share].clone().requires_grad_(), b[share].clone().requires_grad_()
            with distributed.gathering():
                loss = info_nce(x, y, 0.3, direction, valid=valid[share])
            loss.backward()
            out[direction] = {"loss": loss.item(), "ga": (x.grad / 2).tolist(), "gb": (y.grad / 2).tolist()}
        # a weight-0 stand-in batch on rank 1: its rows are no one's negatives
        x = a[share].clone().requires_grad_()
        with distributed.gathering(rows_valid=rank == 0):
            out["stand_in"] = info_nce(x, b[share], 0.3, "a2b").item()
        # multi-positive calls stay within the rank
        with distributed.gathering():
            pos = torch.eye(len(share), dtype=torch.bool)
            out["local"] = info_nce(a[share], b[share], 0.3, "a2b", positives=pos).item()
    out["share"] = share
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    """
)


def test_info_nce_gathered_over_two_ranks_equals_one_process(env, tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    for direction in ("a2b", "both"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = info_nce(x, y, 0.3, direction, valid=valid)
        loss.backward()
        for out in ranks:
            got = out[direction]
            assert got["loss"] == pytest.approx(loss.item(), rel=1e-12)
            # each rank's gradient (as DDP averages it) is the one-process gradient of its rows
            assert torch.allclose(torch.tensor(got["ga"], dtype=torch.float64), x.grad[out["share"]], atol=1e-12)
            assert torch.allclose(torch.tensor(got["gb"], dtype=torch.float64), y.grad[out["share"]], atol=1e-12)
    rank0 = ranks[0]["share"]
    expect = info_nce(a[rank0], b[rank0], 0.3, "a2b").item()
    assert ranks[0]["stand_in"] == pytest.approx(expect, rel=1e-12)
    for out in ranks:
        s = out["share"]
        assert out["local"] == pytest.approx(info_nce(a[s], b[s], 0.3, "a2b").item(), rel=1e-12)


# -- DDP runs ---------------------------------------------------------------------------


def _cfg(*extra):
    return make_train_config(
        {"model": "bert_crf", "profile": "tiny"},
        [f"epochs={EPOCHS}", "amp=off", "dropout=0", "threads=1", "patience=0", *extra],
    )


DDP_OPTS = ("-o", "global_batch=true", "-o", "batch_size=16")


@pytest.fixture(scope="module")
def ddp_pair(mini, env, tmp_path_factory):
    """One run in this process, and the same with 2 DDP ranks killed after epoch 1 and
    resumed with ``mner train --nproc 2 --resume``; global batch 16 both."""
    from mner.train import encoder as encoders

    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoders, "build_tiny", _no_dropout_build(encoders.build_tiny))
        train_run(_cfg("global_batch=true", "batch_size=16"), mini, None, one)
    args = ["train", "--data", mini, "--out", two, *_opts(*DDP_OPTS)]
    killed = _torchrun(env, *args, extra_env={"MNER_KILL_AT": "epoch:1"}, check=False)
    assert killed.returncode != 0
    state = json.loads((two / "seed_1" / "checkpoint" / "state.json").read_text())
    rngs = torch.load(two / "seed_1" / "checkpoint" / "state.pt", weights_only=True)["rank_rngs"]
    resumed = subprocess.run([sys.executable, "-m", "mner", *map(str, args), "--resume", "--nproc", "2"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return one, two, resumed, state, rngs


def test_ddp_run_matches_one_process_and_is_written_once(ddp_pair):
    one, two, proc, state, rngs = ddp_pair
    # the kill came after epoch 1's checkpoint, which records the world size and both
    # ranks' generators; --resume continued it
    assert state["epoch"] == 1 and state["world_size"] == 2 and len(rngs) == 2
    # the summary line is printed by rank 0 alone
    assert proc.stdout.count("wrote") == 1, proc.stdout
    # the same files, written once (no per-rank copies, no leftovers)
    assert _files(two) == _files(one)
    # dvclive was written by rank 0 alone: one value per epoch, the last one rank 0's
    dvclive = json.loads((two / "seed_1" / "dvclive" / "metrics.json").read_text())
    assert dvclive["train"]["loss"] == pytest.approx(_history(two)[-1]["train_loss"], rel=1e-6)
    prov = json.loads((two / "provenance.json").read_text())
    assert prov["parallel"] == {"world_size": 2, "mode": "ddp"}
    assert json.loads((one / "provenance.json").read_text())["parallel"]["world_size"] == 1
    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) == EPOCHS
    for a, b in zip(h1, h2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL)
        assert b["dev_f1"] == a["dev_f1"]
    m1 = json.loads((one / "metrics.json").read_text())["runs"][0]
    m2 = json.loads((two / "metrics.json").read_text())["runs"][0]
    assert m2["dev"]["overall"] == m1["dev"]["overall"]
    assert m2["test"]["overall"] == m1["test"]["overall"]


def test_resume_with_another_world_size_is_one_line(ddp_pair, mini, tmp_path):
    import shutil

    two = ddp_pair[1]
    # an interrupted DDP run: its checkpoint records 2 ranks
    run = tmp_path / "run"
    shutil.copytree(two, run)
    (run / "metrics.json").unlink()
    (run / "seed_1" / "metrics.json").unlink()
    with pytest.raises(ConfigError, match=r"checkpointed by 2 DDP rank\(s\) and is resumed with 1; "
                                          r"resume it with 2 ranks"):
        train_run(_cfg("global_batch=true", "batch_size=16"), mini, None, run, resume=True)


@pytest.mark.slow
def test_ddp_resume_after_kill_equals_the_uninterrupted_ddp_run(ddp_pair, mini, env, tmp_path):
    two = ddp_pair[1]
    out = tmp_path / "straight"
    _torchrun(env, "train", "--data", mini, "--out", out, *_opts(*DDP_OPTS))
    # same world size: the killed and resumed run is the uninterrupted one, bit for bit
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in _history(out)]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in _history(two)]
    for split in ("dev", "test"):
        assert json.loads((out / "seed_1" / "metrics.json").read_text())[split] == json.loads(
            (two / "seed_1" / "metrics.json").read_text())[split]


@pytest.mark.slow
def test_ddp_contrastive_head_matches_one_process(sample_dir, tiny_cache, env, tmp_path):
    """MAF's alignment loss gathers negatives across ranks: without CM (random swaps
    within a rank's share) and dropout, 2 DDP ranks give the one-process losses."""
    from mner.train import encoder as encoders

    extra = ["-o", "head.no_cm=true", "-o", "head.dropout=0", *DDP_OPTS]
    one, two = tmp_path / "one", tmp_path / "two"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoders, "build_tiny", _no_dropout_build(encoders.build_tiny))
        cfg = make_train_config(
            {"model": "maf", "profile": "tiny"},
            ["epochs=1", "amp=off", "dropout=0", "threads=1", "patience=0", "head.no_cm=true",
             "head.dropout=0", "global_batch=true", "batch_size=16"],
        )
        train_run(cfg, sample_dir, tiny_cache, one)
    _torchrun(env, "train", "--data", sample_dir, "--features", tiny_cache, "--out", two, "--model", "maf",
              "--profile", "tiny", "-o", "epochs=1", "-o", "amp=off", "-o", "dropout=0", "-o", "threads=1",
              "-o", "patience=0", *extra)
    for a, b in zip(_history(one), _history(two), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL)
        assert b["dev_f1"] == a["dev_f1"]


# -- seed-parallel ----------------------------------------------------------------------


def test_seed_parallel_equals_sequential_seed_by_seed(mini, env, tmp_path):
    par, seq = tmp_path / "par", tmp_path / "seq"
    # with dropout (no hook): each seed is a one-process run wherever it runs
    plain = dict(env, PYTHONPATH=os.pathsep.join(env["PYTHONPATH"].split(os.pathsep)[1:]))
    _torchrun(plain, "train", "--out", par, "--data", mini, "--seeds", "1,2", *_opts("-o", "dropout=0.1"))
    train_run(_cfg("seeds=[1,2]", "dropout=0.1"), mini, None, seq)
    mp, ms = (json.loads((d / "metrics.json").read_text()) for d in (par, seq))
    assert [x["seed"] for x in mp["runs"]] == [1, 2]
    for a, b in zip(mp["runs"], ms["runs"], strict=True):
        assert a.pop("seconds_per_epoch") >= 0 and b.pop("seconds_per_epoch") >= 0
        assert a == b
    for seed in (1, 2):
        assert [h["train_loss"] for h in _history(par, seed)] == [h["train_loss"] for h in _history(seq, seed)]
    assert mp["summary"]["dev"] == ms["summary"]["dev"] and mp["summary"]["test"] == ms["summary"]["test"]
    assert json.loads((par / "provenance.json").read_text())["parallel"] == {"world_size": 2, "mode": "seeds"}


def test_info_nce_without_ranks_is_unchanged():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    with distributed.gathering():  # no process group: nothing to gather
        assert info_nce(a, b, 0.5).item() == info_nce(a, b, 0.5).item()


# -- --nproc and dvc ----------------------------------------------------------------------


def test_nproc_flag_and_dvc_stages(mner_cli, monkeypatch):
    import yaml

    from mner.pipeline.cmd_train import _without_nproc

    assert _without_nproc(["train", "--nproc", "2", "--out", "r", "--nproc=3", "-o", "x=1"]) == [
        "train", "--out", "r", "-o", "x=1"]
    code, _, err = mner_cli("train", "--nproc", "0", "--data", "d", "--out", "r")
    assert code == 2 and "--nproc" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="under torchrun leave --nproc out"):
        distributed.launch(2, ["train"])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["pipeline"]["nproc"] == 1  # dvc repro: one process unless asked
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "--nproc ${pipeline.nproc}" in stages["train"]["cmd"]
    assert "--nproc ${pipeline.nproc}" in stages["extract"]["do"]["cmd"]


def test_summed_losses_add_up_to_the_global_sum_over_ranks(monkeypatch):
    # Heads whose papers sum a loss over the batch (MGC eq. 19, HamLearning eq. 17, the
    # KD and ESD terms) must give under DDP what one process gives: the global sum.
    per_row = torch.arange(1.0, 8.0)  # 7 rows' loss terms, one global batch
    for ranks in (2, 3):
        total_sum, total_mean = 0.0, 0.0
        for rank in range(ranks):
            idx, weight = distributed.shard(list(range(7)), rank, ranks)
            rows = per_row[idx] if weight > 0 else per_row[:0]
            scale = distributed.sum_scale(weight, ranks)
            monkeypatch.setattr(distributed, "active", lambda: True)
            with distributed.gathering(rows_valid=weight > 0, sum_scale=scale):
                local = float(rows.sum()) * distributed.local_sum_scale()
            total_sum += weight * local / ranks  # the trainer's weight, then DDP's average
            total_mean += weight * (float(rows.mean()) if len(rows) else 0.0) / ranks
        assert total_sum == pytest.approx(float(per_row.sum()))
        assert total_mean == pytest.approx(float(per_row.mean()))
    monkeypatch.setattr(distributed, "active", lambda: False)
    assert distributed.local_sum_scale() == 1.0  # one process: nothing changes
