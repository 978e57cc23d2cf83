"""End to end: `dvc repro` in a copy of the repository, on a reduced sample.

This is the product's main job (README's first command) shrunk by params overrides so
it fits the default suite: every registered model trains for one epoch on a tiny sample,
and the report must list every one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _copy_repo(dst: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files, as a fresh clone would have."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if not src.is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the repository")
    work = tmp_path_factory.mktemp("repo")
    _copy_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["sample"].update(n_train=48, n_valid=16, n_test=16)
    params["train"].update(epochs=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    dvc = [sys.executable, "-m", "dvc"]
    run = subprocess.run([*dvc, "repro"], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work, env, dvc, params


def test_repro_writes_a_report_listing_every_model(repro):
    work, _, _, params = repro
    models = params["pipeline"]["models"]
    results = json.loads((work / "reports" / "results.json").read_text())
    text = json.dumps(results)
    md = (work / "reports" / "results.md").read_text()
    for model in models:
        assert f'"{model}"' in text, f"{model} missing from results.json"
        assert f"| {model} " in md, f"{model} missing from results.md"
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert set(metrics["sample"]) >= set(models)
    for model in models:
        assert 0.0 <= metrics["sample"][model]["f1"] <= 100.0
    assert (work / "reports" / "dev_f1.csv").read_text().startswith("model,epoch,dev_f1")
    # the significance tests against bert_crf and the case-study page and figure
    assert "### Significance against bert_crf (test split)" in md
    sig = results["datasets"]["sample"]["significance"]
    assert {r["label"] for r in sig["rows"]} == set(models) - {"bert_crf"}
    n_test = (work / "data" / "sample" / "test.txt").read_text().count("IMGID:")
    assert (work / "reports" / "cases.html").read_text().count('class="case"') == n_test
    assert (work / "reports" / "cases.png").read_bytes()[:4] == b"\x89PNG"
    # every run folder and the cache exist where dvc.yaml says
    assert (work / "cache" / "sample.h5").is_file()
    for model in models:
        assert (work / "runs" / "sample" / model / "seed1" / "metrics.json").is_file()


def test_dvc_metrics_and_status_after_repro(repro):
    work, env, dvc, params = repro
    shown = subprocess.run([*dvc, "metrics", "show", "--json"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert "bert_crf" in shown.stdout
    status = subprocess.run([*dvc, "status"], cwd=work, env=env, capture_output=True,
                            text=True, check=True)
    assert "changed" not in status.stdout, status.stdout


def test_dvc_plots_show_renders_the_report_plots(repro):
    work, env, dvc, _ = repro
    out = subprocess.run([*dvc, "plots", "show", "--json"], cwd=work, env=env,
                         capture_output=True, text=True, check=True)
    shown = json.loads(out.stdout)
    assert "reports/dev_f1.csv" in json.dumps(shown)
    assert "reports/dev_f1_sample.png" in json.dumps(shown)


def test_dvc_exp_run_with_a_param_override(repro):
    """`dvc exp run -S` (README's way to run one model) re-runs just what changed."""
    work, env, dvc, _ = repro
    run = subprocess.run([*dvc, "exp", "run", "-S", "pipeline.models=[bert_crf]"], cwd=work,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert set(metrics["sample"]) == {"bert_crf"}
    shown = subprocess.run([*dvc, "exp", "show", "--json"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    exps = [e for rev in json.loads(shown.stdout) for e in (rev.get("experiments") or [])]
    assert exps, "dvc exp show lists no experiment"
    assert '"models": ["bert_crf"]' in json.dumps(exps)
