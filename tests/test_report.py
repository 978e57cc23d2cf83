"""``mner report`` over synthetic run folders in the documented run-folder format."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mner.errors import DataError
from mner.report import ReportConfig, build_report
from mner.report import runs as runs_mod
from mner.report.paper_numbers import paper_dataset, paper_f1
from mner.report.tables import Stat, build_tables, columns, markdown_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TYPES = ("PER", "LOC", "ORG", "MISC")

# Head defaults as the registry would give them; the tests do not depend on the heads
# other engineers are writing.
DEFAULTS = {
    "umt": {"layers": 1, "no_gate": False},
    "maf": {"no_cm": False, "no_ca": False, "tau": 0.07},
    "bert_crf": {},
    "hamlearning": {"no_rgcn": False},
}


@pytest.fixture(autouse=True)
def fixed_head_defaults(monkeypatch):
    monkeypatch.setattr(runs_mod, "default_head_options", lambda model: DEFAULTS.get(model))


def prf(f1, p=None, r=None, n=100):
    p = f1 + 1.0 if p is None else p
    r = f1 - 1.0 if r is None else r
    return {
        "precision": p,
        "recall": r,
        "f1": f1,
        "n_gold": n,
        "n_pred": n,
        "n_correct": int(n * f1 / 100),
    }


def record(f1, per_type, img_dep):
    return {
        "overall": prf(f1),
        "per_type": {t: prf(v) for t, v in zip(TYPES, per_type, strict=True)},
        "image_dependent": prf(img_dep) if img_dep is not None else None,
    }


def mean_std(records):
    """The trainer's summary: sample std (ddof=1), 0 for one seed."""
    if any(r is None for r in records):
        return None
    if isinstance(records[0], dict):
        return {k: mean_std([r[k] for r in records]) for k in records[0]}
    a = np.asarray(records, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def make_run(
    root: Path,
    name: str,
    model: str,
    dataset: str,
    f1s: list[float],
    head: dict | None = None,
    img_dep: list[float] | None = None,
    secs: list[float] | None = None,
    diagnostics: bool = False,
    where: str = "provenance",
    data_hash: str = "ab" * 32,
    seeds: list[int] | None = None,
    config_extra: dict | None = None,
) -> Path:
    """A run folder as mner train writes it (docs/ARCHITECTURE.md, "Run folder")."""
    run = root / name
    run.mkdir(parents=True)
    seeds = seeds or list(range(1, len(f1s) + 1))
    head_opts = {**DEFAULTS.get(model, {}), **(head or {})}
    per_seed = []
    for i, (seed, f1) in enumerate(zip(seeds, f1s, strict=True)):
        per_type = [f1 + 5, f1 + 2, f1 - 10, f1 - 20]
        dep = img_dep[i] if img_dep else None
        per_seed.append(
            {
                "seed": seed,
                "best_epoch": 3,
                "dev": record(f1 + 1.5, per_type, dep),
                "test": record(f1, per_type, dep),
                "seconds_per_epoch": (secs or [2.0] * len(f1s))[i],
            }
        )
        sd = run / f"seed_{seed}"
        sd.mkdir()
        hist = [
            {"epoch": e, "train_loss": 10.0 / e, "dev_f1": f1 - 3 + e + i, "seconds": 2.0}
            for e in (1, 2, 3, 4)
        ]
        (sd / "history.json").write_text(json.dumps(hist))
        if diagnostics:
            rng = np.random.default_rng(seed)
            diag = {
                "visual_gate": {
                    "ok": rng.uniform(0.5, 1.0, 40).tolist(),
                    "missing": rng.uniform(0.0, 0.2, 5).tolist(),
                    "unreadable": [0.1],
                    "truncated": [0.15],
                },
                "match_prob": {
                    "ok": rng.uniform(0, 1, 40).tolist(),
                    "missing": [],
                    "unreadable": [],
                },
            }
            (sd / "diagnostics.json").write_text(json.dumps(diag))
    metrics = {
        "model": model,
        "head": head_opts,
        "profile": "tiny",
        "seeds": seeds,
        "summary": {
            "dev": mean_std([r["dev"] for r in per_seed]),
            "test": mean_std([r["test"] for r in per_seed]),
            "seconds_per_epoch": mean_std([r["seconds_per_epoch"] for r in per_seed]),
        },
        "runs": per_seed,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    config = {
        "model": model,
        "profile": "tiny",
        "epochs": 4,
        "lr_encoder": 0.002,
        "seeds": seeds,
        "device": "auto",
        "head": head_opts,
        **(config_extra or {}),
    }
    prov = {
        "profile": "tiny",
        "mner_version": "0.1.0",
        "cache": None
        if model == "bert_crf"
        else {
            "path": "/data/cache/sample.h5",
            "sha256": "cd" * 32,
            "provenance": {
                "schema_version": 1,
                "profile": "tiny",
                "resnet": {"model": "resnet152", "weights": "seeded"},
                "clip": {"model": "ViT-B-32", "weights": "seeded"},
            },
        },
    }
    files = {"/data/sample/train.txt": data_hash, "/data/sample/test.txt": "ef" * 32}
    if where == "provenance":
        prov["dataset"] = {"name": dataset, "files": files}
    else:  # older runs: the name only in config.yaml, files at the top level
        config["dataset_name"] = dataset
        prov["data_files"] = files
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "provenance.json").write_text(json.dumps(prov))
    return run


def make_runs(root: Path) -> list[Path]:
    return [
        make_run(
            root,
            "t15_maf",
            "maf",
            "twitter2015",
            [73.0, 74.0, 75.0],
            img_dep=[60.0, 61.0, 62.0],
            diagnostics=True,
        ),
        make_run(
            root,
            "t15_bert",
            "bert_crf",
            "twitter2015",
            [70.0, 72.0],
            img_dep=[50.0, 52.0],
            secs=[1.0, 1.5],
        ),
        make_run(
            root,
            "t15_maf_nocm",
            "maf",
            "twitter2015",
            [71.0, 71.5],
            head={"no_cm": True},
            img_dep=[55.0, 56.0],
        ),
        make_run(root, "sample_umt", "umt", "sample", [80.0], where="config"),
        make_run(root, "sample_ham", "hamlearning", "sample", [82.0, 84.0], head={"no_rgcn": True}),
    ]


@pytest.fixture
def runs(tmp_path):
    return make_runs(tmp_path / "runs")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The full report (plots included) over the five runs, built once: (cfg, summary, runs)."""
    tmp = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs_mod, "default_head_options", lambda model: DEFAULTS.get(model))
        paths = make_runs(tmp / "runs")
        cfg = ReportConfig(out=tmp / "reports")
        summary = build_report(cfg, paths)
    return cfg, summary, paths


def report(runs, tmp_path, **kw):
    kw.setdefault("plots", False)
    cfg = ReportConfig(out=tmp_path / "reports", **kw)
    return cfg, build_report(cfg, runs)


def table_rows(md: str, heading: str) -> list[list[str]]:
    """The Markdown table under ``## heading`` as lists of cells (header first)."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    table = []
    for ln in lines:
        if set(ln) <= set("|:- "):
            continue
        if table and ln.startswith("| row |"):
            break
        table.append([c.strip() for c in ln.strip("|").split("|")])
    return table


def test_stat_formatting():
    assert Stat(73.4149, 0.5151, 3).format() == "73.41 ± 0.52"
    assert Stat(73.4149, 0.0, 1).format() == "73.41"
    assert Stat(2.25, 0.25, 2).format(1) == "2.2 ± 0.2"


def test_paper_dataset_names():
    assert paper_dataset("Twitter-2015") == "twitter2015"
    assert paper_dataset("twitter_17") == "twitter2017"
    assert paper_dataset("TWITTER2017") == "twitter2017"
    assert paper_dataset("sample") is None
    assert paper_dataset("twitter2016") is None
    assert paper_f1("twitter2015", "mgips_cl") == 76.86
    assert paper_f1("twitter2017", "hamlearning") == 87.13
    assert paper_f1("sample", "maf") is None


def test_twitter_table_values_order_and_paper_column(built):
    cfg, summary, _ = built
    assert summary["datasets"] == {"sample": 2, "twitter2015": 3}
    md = (cfg.out / "results.md").read_text()
    rows = table_rows(md, "twitter2015")
    assert rows[0] == [
        "model",
        "PER",
        "LOC",
        "ORG",
        "MISC",
        "P",
        "R",
        "F1",
        "paper F1",
        "img-dep F1",
        "s/epoch",
        "seeds",
    ]
    # Papers' order: BERT-CRF first, then MAF, its ablation right after it.
    assert [r[0] for r in rows[1:]] == ["bert_crf", "maf", "maf (no_cm=true)"]
    bert, maf, nocm = rows[1:]
    # bert: test F1 70, 72 -> 71.00 ± 1.41 (sample std); PER = F1 + 5.
    assert bert[7] == "71.00 ± 1.41"
    assert bert[1] == "76.00 ± 1.41" and bert[4] == "51.00 ± 1.41"
    assert bert[5] == "72.00 ± 1.41" and bert[6] == "70.00 ± 1.41"  # P = F1 + 1, R = F1 - 1
    assert bert[8] == "71.81"  # the paper's BERT-CRF on Twitter-2015
    assert bert[9] == "51.00 ± 1.41"
    assert bert[10] == "1.2 ± 0.4" and bert[11] == "2"
    assert maf[7] == "74.00 ± 1.00" and maf[8] == "73.42" and maf[11] == "3"
    assert nocm[8] == "–"  # ablations have no paper number
    assert nocm[7] == "71.25 ± 0.35"


def test_non_twitter_table_has_no_paper_column_and_single_seed_has_no_std(built):
    cfg, _, _ = built
    md = (cfg.out / "results.md").read_text()
    rows = table_rows(md, "sample")
    assert "paper F1" not in rows[0]
    assert "img-dep F1" not in rows[0]  # no run of this dataset marks a subset
    assert rows[0][:8] == ["model", "PER", "LOC", "ORG", "MISC", "P", "R", "F1"]
    assert [r[0] for r in rows[1:]] == ["umt", "hamlearning (no_rgcn=true)"]
    assert rows[1][7] == "80.00"  # one seed: the mean alone
    assert rows[2][7] == "83.00 ± 1.41"


def test_paper_column_can_be_turned_off(runs, tmp_path):
    cfg, _ = report(runs, tmp_path, include_paper_numbers=False)
    rows = table_rows((cfg.out / "results.md").read_text(), "twitter2015")
    assert "paper F1" not in rows[0]


def test_dev_split_table(runs, tmp_path):
    cfg, _ = report(runs, tmp_path, split="dev")
    rows = table_rows((cfg.out / "results.md").read_text(), "twitter2015")
    assert rows[1][7] == "72.50 ± 1.41"  # dev F1 = test F1 + 1.5


def test_results_json_and_dvc_metrics(built):
    cfg, _, _ = built
    res = json.loads((cfg.out / "results.json").read_text())
    t15 = res["datasets"]["twitter2015"]
    assert t15["paper_dataset"] == "twitter2015"
    maf = next(r for r in t15["rows"] if r["label"] == "maf")
    assert maf["scores"]["f1"] == {"mean": 74.0, "std": 1.0, "n": 3}
    assert maf["scores"]["image_dependent_f1"]["mean"] == pytest.approx(61.0)
    assert maf["paper_f1"] == 73.42
    assert [s["f1"] for s in maf["per_seed"]] == [73.0, 74.0, 75.0]
    nocm = next(r for r in t15["rows"] if r["label"] == "maf (no_cm=true)")
    assert nocm["head_ablation"] == {"no_cm": True}
    assert res["datasets"]["sample"]["rows"][0]["scores"]["image_dependent_f1"] is None

    metrics = json.loads((cfg.out / "metrics.json").read_text())
    assert set(metrics) == {"sample", "twitter2015"}
    assert metrics["twitter2015"]["maf"] == {
        "f1": 74.0,
        "precision": 75.0,
        "recall": 73.0,
        "image_dependent_f1": 61.0,
    }
    assert "image_dependent_f1" not in metrics["sample"]["umt"]
    assert metrics["sample"]["hamlearning (no_rgcn=true)"]["f1"] == 83.0


def test_plots_are_valid_pngs(built):
    from PIL import Image

    cfg, summary, _ = built
    out = cfg.out
    expected = [
        "dev_f1_twitter2015.png",
        "dev_f1_sample.png",
        "per_type_f1_twitter2015.png",
        "per_type_f1_sample.png",
        "diagnostics_twitter2015_maf.png",
    ]
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        with Image.open(out / name) as im:
            im.verify()
        assert str(out / name) in summary["files"]
    # Only the run with diagnostics.json gets a histogram figure.
    assert sorted(p.name for p in out.glob("diagnostics_*.png")) == [
        "diagnostics_twitter2015_maf.png"
    ]
    md = (out / "results.md").read_text()
    assert "![dev F1 per epoch](dev_f1_twitter2015.png)" in md
    assert not list(out.glob("*.part"))


def test_diagnostics_grouping(runs):
    from mner.report.plots import pooled_diagnostics

    run = runs_mod.load_run(runs[0])
    pooled = pooled_diagnostics(run)
    assert set(pooled) == {"visual_gate", "match_prob"}
    gate = pooled["visual_gate"]
    # Three seeds pooled; "truncated" folds into "unreadable".
    assert len(gate["ok"]) == 120 and len(gate["missing"]) == 15
    assert sorted(gate["unreadable"]) == [0.1, 0.1, 0.1, 0.15, 0.15, 0.15]


def test_dev_f1_csv(built, tmp_path):
    cfg, _, runs = built
    with (cfg.out / "dev_f1.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["model", "epoch", "dev_f1"]
    maf = [r for r in rows if r["model"] == "twitter2015/maf"]
    # dev_f1 = f1 - 3 + epoch + seed_index, averaged over seeds (73, 74, 75 -> +1 each).
    assert [(int(r["epoch"]), float(r["dev_f1"])) for r in maf] == [
        (1, 72.0 + 1),
        (2, 74.0),
        (3, 75.0),
        (4, 76.0),
    ]
    # One dataset: plain labels.
    cfg2 = ReportConfig(out=tmp_path / "one", plots=False)
    build_report(cfg2, [runs[3]])
    assert (cfg2.out / "dev_f1.csv").read_text().splitlines()[1] == "umt,1,78.0"


def test_provenance_section(built):
    cfg, _, _ = built
    md = (cfg.out / "results.md").read_text()
    t15 = md.split("## twitter2015\n", 1)[1]
    prov = t15.split("### Provenance\n", 1)[1]
    assert "- profile: tiny" in prov
    assert f"`/data/sample/train.txt`: `{'ab' * 32}`" in prov
    assert "feature cache `/data/cache/sample.h5`" in prov
    assert f"sha256: `{'cd' * 32}`" in prov
    assert "resnet: resnet152" in prov and "clip: ViT-B-32" in prov
    assert "feature cache: none (text only) — bert_crf" in prov
    assert md.count("### Provenance") == 2
    # The config.yaml-named dataset with top-level data_files is traced too.
    sample = md.split("## sample\n", 1)[1]
    assert "`/data/sample/test.txt`" in sample


def test_different_data_files_are_flagged(tmp_path):
    root = tmp_path / "runs"
    a = make_run(root, "a", "umt", "sample", [80.0])
    b = make_run(root, "b", "maf", "sample", [81.0], data_hash="00" * 32)
    cfg, _ = report([a, b], tmp_path)
    md = (cfg.out / "results.md").read_text()
    assert "trained on different data files" in md


def test_other_training_settings_are_separate_rows(tmp_path):
    # Same model and head but another learning rate: another experiment, not more seeds.
    root = tmp_path / "runs"
    a = make_run(root, "umt_lr1", "umt", "sample", [80.0])
    b = make_run(root, "umt_lr2", "umt", "sample", [79.0], config_extra={"lr_encoder": 0.001})
    # Where it ran does not matter.
    c = make_run(
        root,
        "umt_lr2_gpu",
        "umt",
        "sample",
        [77.0],
        seeds=[2],
        config_extra={"lr_encoder": 0.001, "device": "cuda"},
    )
    cfg, _ = report([a, b, c], tmp_path)
    metrics = json.loads((cfg.out / "metrics.json").read_text())
    assert metrics["sample"] == {
        "umt [lr_encoder=0.002]": {"f1": 80.0, "precision": 81.0, "recall": 79.0},
        "umt [lr_encoder=0.001]": {"f1": 78.0, "precision": 79.0, "recall": 77.0},
    }


def single_seed_layout(root: Path) -> Path:
    """The DVC layout: one complete run folder per seed, runs/<dataset>/<model>/seed<k>."""
    runs = root / "runs"
    make_run(runs, "sample/umt/seed1", "umt", "sample", [80.0], seeds=[1], secs=[1.0])
    make_run(
        runs, "sample/umt/seed2", "umt", "sample", [83.0], seeds=[2], secs=[2.0], diagnostics=True
    )
    # An ablation: its own row, even though its seeds are the same.
    make_run(
        runs, "sample/umt_nogate/seed_1", "umt", "sample", [70.0], seeds=[1], head={"no_gate": True}
    )
    make_run(
        runs, "sample/umt_nogate/seed_2", "umt", "sample", [72.0], seeds=[2], head={"no_gate": True}
    )
    return runs


def test_single_seed_folders_pool_into_one_row(tmp_path):
    runs = single_seed_layout(tmp_path)
    cfg = ReportConfig(out=tmp_path / "reports", plots=False)
    summary = build_report(cfg, [runs])
    assert summary["datasets"] == {"sample": 2} and summary["skipped"] == []
    md = (cfg.out / "results.md").read_text()
    rows = table_rows(md, "sample")
    assert [r[0] for r in rows[1:]] == ["umt", "umt (no_gate=true)"]
    umt, nogate = rows[1:]
    # F1 80 and 83: mean 81.5, sample std |83 - 80| / sqrt(2) = 2.1213.
    assert umt[7] == "81.50 ± 2.12" and umt[-1] == "2"
    assert umt[1] == "86.50 ± 2.12"  # PER = F1 + 5, pooled the same way
    assert umt[-2] == "1.5 ± 0.7"  # s/epoch 1.0 and 2.0
    assert nogate[7] == "71.00 ± 1.41" and nogate[-1] == "2"
    res = json.loads((cfg.out / "results.json").read_text())
    row = res["datasets"]["sample"]["rows"][0]
    assert row["scores"]["f1"]["mean"] == 81.5 and row["scores"]["f1"]["n"] == 2
    assert row["scores"]["f1"]["std"] == pytest.approx(3 / np.sqrt(2))
    assert row["scores"]["dev_f1"]["mean"] == 83.0  # dev = test + 1.5
    assert row["seeds"] == [1, 2]
    assert [s["f1"] for s in row["per_seed"]] == [80.0, 83.0]
    assert row["run"] == str(runs / "sample" / "umt")
    assert row["run_folders"] == [str(runs / "sample/umt/seed1"), str(runs / "sample/umt/seed2")]
    # Provenance traces every pooled folder; they share one set of data files.
    prov = res["datasets"]["sample"]["provenance"]
    assert prov["consistent_data"] is True
    assert [(r["label"], Path(r["run"]).relative_to(runs).as_posix()) for r in prov["runs"]] == [
        ("umt", "sample/umt/seed1"),
        ("umt", "sample/umt/seed2"),
        ("umt (no_gate=true)", "sample/umt_nogate/seed_1"),
        ("umt (no_gate=true)", "sample/umt_nogate/seed_2"),
    ]
    assert prov["caches"][0]["runs"] == ["umt", "umt (no_gate=true)"]
    assert f"| umt | `{runs / 'sample/umt/seed2'}` | 2 | tiny |" in md
    assert "from 4 run folders" in md


def test_multi_seed_folder_pools_with_single_seed_folder(tmp_path, caplog):
    root = tmp_path / "runs"
    a = make_run(root, "umt_12", "umt", "sample", [80.0, 82.0], diagnostics=True)
    b = make_run(root, "umt_3", "umt", "sample", [86.0], seeds=[3], diagnostics=True)
    loaded, _ = runs_mod.load_runs([a, b])
    with caplog.at_level("WARNING", logger="mner.report"):
        pooled = runs_mod.pool_runs(loaded)
    assert not caplog.messages
    assert len(pooled) == 1
    run = pooled[0]
    assert run.metrics["seeds"] == [1, 2, 3] and sorted(run.histories) == [1, 2, 3]
    # 80, 82, 86: mean 82.667; deviations -8/3, -2/3, 10/3 -> var (64+4+100)/9/2 = 9.333.
    f1 = run.metrics["summary"]["test"]["overall"]["f1"]
    assert f1["mean"] == pytest.approx(248 / 3)
    assert f1["std"] == pytest.approx(np.sqrt(28 / 3))
    # The image-dependent subset is not marked: null, as the trainer writes it.
    assert run.metrics["summary"]["test"]["image_dependent"] is None
    from mner.report.plots import pooled_diagnostics

    assert len(pooled_diagnostics(run)["visual_gate"]["ok"]) == 3 * 40
    runs_mod.assign_labels(pooled)
    tab = build_tables(pooled)[0]
    assert tab.rows[0].stats["f1"].format() == "82.67 ± 3.06"


def test_duplicate_seed_is_kept_once_with_a_warning(tmp_path, caplog):
    root = tmp_path / "runs"
    a = make_run(root, "sample/umt/seed1", "umt", "sample", [80.0], seeds=[1])
    b = make_run(root, "sample/umt/seed1_again", "umt", "sample", [90.0], seeds=[1])
    c = make_run(root, "sample/umt/seed2", "umt", "sample", [84.0], seeds=[2])
    cfg = ReportConfig(out=tmp_path / "reports", plots=False)
    with caplog.at_level("WARNING", logger="mner.report"):
        summary = build_report(cfg, [root])
    assert summary["datasets"] == {"sample": 1}
    warnings = [m for m in caplog.messages if "seed 1" in m]
    assert len(warnings) == 1
    assert str(a) in warnings[0] and str(b) in warnings[0]
    res = json.loads((cfg.out / "results.json").read_text())
    row = res["datasets"]["sample"]["rows"][0]
    # The first folder's seed 1 (80) is kept: 80 and 84 -> 82 ± 2.83.
    assert row["seeds"] == [1, 2]
    assert [s["f1"] for s in row["per_seed"]] == [80.0, 84.0]
    assert row["scores"]["f1"]["mean"] == 82.0
    assert row["scores"]["f1"]["std"] == pytest.approx(np.sqrt(8))
    assert str(c) in row["run_folders"]
    # Provenance still lists the duplicate's folder, with no seed taken from it.
    prov = res["datasets"]["sample"]["provenance"]["runs"]
    assert [(Path(r["run"]).name, r["seeds"]) for r in prov] == [
        ("seed1", [1]),
        ("seed1_again", []),
        ("seed2", [2]),
    ]
    md = (cfg.out / "results.md").read_text()
    assert f"| umt | `{b}` | none (duplicate seeds) |" in md


def test_duplicate_seed_warning_is_one_cli_line(tmp_path):
    import typer

    from mner.pipeline import cmd_report

    root = tmp_path / "runs"
    a = make_run(root, "a/seed1", "umt", "sample", [80.0], seeds=[1])
    b = make_run(root, "b/seed1", "umt", "sample", [81.0], seeds=[1])
    app = typer.Typer()
    cmd_report.register(app)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["report", str(root), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    warn = [ln for ln in result.output.splitlines() if ln.startswith("warning: seed")]
    assert len(warn) == 1 and str(a) in warn[0] and str(b) in warn[0]
    # The fake runs' test file does not exist: said once, in the summary (not a warning).
    (no_cases,) = [ln for ln in result.output.splitlines() if "no significance tests" in ln]
    assert no_cases.startswith("report: sample: no significance tests or cases.html: ")
    assert "/data/sample/test.txt" in no_cases
    assert "report: 1 row (sample: 1)" in result.output


def test_other_data_files_are_not_pooled_and_are_flagged(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "sample/umt/seed1", "umt", "sample", [80.0], seeds=[1])
    make_run(root, "sample/umt/seed2", "umt", "sample", [82.0], seeds=[2])
    make_run(root, "other/umt/seed3", "umt", "sample", [70.0], seeds=[3], data_hash="00" * 32)
    cfg, summary = report([root], tmp_path)
    assert summary["datasets"] == {"sample": 2}
    metrics = json.loads((cfg.out / "metrics.json").read_text())
    assert metrics["sample"] == {
        "umt [sample/umt]": {"f1": 81.0, "precision": 82.0, "recall": 80.0},
        "umt [other/umt/seed3]": {"f1": 70.0, "precision": 71.0, "recall": 69.0},
    }
    md = (cfg.out / "results.md").read_text()
    assert "trained on different data files" in md
    prov = json.loads((cfg.out / "results.json").read_text())["datasets"]["sample"]["provenance"]
    assert prov["consistent_data"] is False and len(prov["runs"]) == 3


def test_pooled_dev_f1_csv_and_plot(tmp_path):
    runs = single_seed_layout(tmp_path)
    cfg = ReportConfig(out=tmp_path / "reports")
    summary = build_report(cfg, [runs])
    with (cfg.out / "dev_f1.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    umt = [(int(r["epoch"]), float(r["dev_f1"])) for r in rows if r["model"] == "umt"]
    # dev_f1 = f1 - 3 + epoch: seed 1 (F1 80) 77 + e, seed 2 (F1 83) 80 + e; mean 78.5 + e.
    assert umt == [(1, 79.5), (2, 80.5), (3, 81.5), (4, 82.5)]
    nogate = [float(r["dev_f1"]) for r in rows if r["model"] == "umt (no_gate=true)"]
    assert nogate == [69.0, 70.0, 71.0, 72.0]  # 70 and 72 -> 71 - 3 + e
    assert (cfg.out / "dev_f1_sample.png").read_bytes().startswith(PNG_MAGIC)
    assert str(cfg.out / "dev_f1_sample.png") in summary["files"]
    # The pooled row's diagnostics come from the seed folder that wrote them.
    assert (cfg.out / "diagnostics_sample_umt.png").read_bytes().startswith(PNG_MAGIC)


def test_ablation_labels_without_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(runs_mod, "default_head_options", lambda model: None)
    root = tmp_path / "runs"
    a = make_run(root, "full", "maf", "sample", [80.0])
    b = make_run(root, "abl", "maf", "sample", [79.0], head={"no_ca": True, "tau": 0.1})
    loaded, _ = runs_mod.load_runs([a, b])
    runs_mod.assign_labels(loaded)
    assert [r.label for r in loaded] == ["maf", "maf (no_ca=true, tau=0.1)"]


def test_folder_of_runs_and_skipped_run(runs, tmp_path, caplog):
    broken = runs[0].parent / "unfinished"
    (broken / "seed_1").mkdir(parents=True)
    cfg = ReportConfig(out=tmp_path / "r2", plots=False)
    with caplog.at_level("WARNING", logger="mner.report"):
        summary = build_report(cfg, [runs[0].parent])
    assert sum(summary["datasets"].values()) == 5
    assert summary["skipped"] == [
        {"path": str(broken), "reason": "no metrics.json (training not finished?)"}
    ]
    assert any("unfinished" in m for m in caplog.messages)
    assert "`" + str(broken) + "`" in (cfg.out / "results.md").read_text()


def test_no_usable_runs_is_an_error(tmp_path):
    empty = tmp_path / "empty_run"
    (empty / "seed_1").mkdir(parents=True)
    with pytest.raises(DataError, match="no usable run folders.*empty_run"):
        build_report(ReportConfig(out=tmp_path / "r"), [empty, tmp_path / "nope"])


def test_corrupt_metrics_names_file_and_line(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.json").write_text('{"model": "umt",\n "summary": {,}}')
    with pytest.raises(DataError, match=r"bad/metrics.json:2: not valid JSON"):
        build_report(ReportConfig(out=tmp_path / "r"), [run])


def test_columns_helper(runs):
    loaded, _ = runs_mod.load_runs(runs)
    runs_mod.assign_labels(loaded)
    tabs = {t.dataset: t for t in build_tables(loaded)}
    assert [h for _, h in columns(tabs["twitter2015"])][-4:] == [
        "paper F1",
        "img-dep F1",
        "s/epoch",
        "seeds",
    ]
    md = markdown_table(tabs["sample"], digits=1)
    assert "| umt | 85.0 | 82.0 | 70.0 | 60.0 | 81.0 | 79.0 | 80.0 | 2.0 | 1 |" in md


def test_cli_with_params_and_overrides(runs, tmp_path):
    import typer

    from mner.pipeline import cmd_report

    app = typer.Typer()
    cmd_report.register(app)
    app.command("noop")(lambda: None)  # keep typer in multi-command mode
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"report": {"title": "From params", "plots": False, "out": str(tmp_path / "ignored")}}
        )
    )
    out = tmp_path / "cli_out"
    missing = tmp_path / "runs" / "not_there"
    result = CliRunner().invoke(
        app,
        [
            "report",
            *map(str, runs),
            str(missing),
            "--out",
            str(out),
            "--params",
            str(params),
            "-o",
            "digits=1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "warning: skipping" in result.output and "not_there" in result.output
    md = (out / "results.md").read_text()
    assert md.startswith("# From params\n")
    assert not list(out.glob("*.png"))  # plots: false from params
    assert re.search(r"\| maf \| 79\.0 ± 1\.0 \|", md)  # digits=1 from -o
    assert not (tmp_path / "ignored").exists()  # --out wins over params


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mner.pipeline.cli",
            "report",
            str(empty),
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    # One warning line for the skipped folder, then the error on one line.
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("warning: skipping") and lines[0].endswith(
        "(training not finished?)"
    )
    assert lines[1].startswith("error: no usable run folders") and "nothing" in lines[1]


def test_cli_unknown_setting(tmp_path):
    import typer

    from mner.errors import ConfigError
    from mner.pipeline import cmd_report

    app = typer.Typer()
    cmd_report.register(app)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["report", str(tmp_path), "-o", "colour=blue"])
    assert isinstance(result.exception, ConfigError)
    assert "unknown key colour" in str(result.exception)
