"""Significance tests, cases.html (in a real headless browser) and cases.png of ``mner report``.

The data is built so every answer is known: 40 test tweets with one entity each; the
even tweets' entities are marked image-dependent. ``bert_crf`` gets the type of every
even tweet wrong, ``umt`` gets everything right, ``mgc`` predicts exactly what
``bert_crf`` predicts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mner.data.conll import TYPES, Tweet, write_conll
from mner.errors import ConfigError
from mner.report.build import build_report
from mner.report.config import ReportConfig
from mner.report.significance import compare_counts, tweet_counts

N = 40
NAMES = ["Rio", "Jordan", "Everest", "Lincoln"]
WRONG = {"PER": "LOC", "LOC": "ORG", "ORG": "MISC", "MISC": "PER"}


def _gold_type(i: int) -> str:
    return TYPES[i % 4]


def _labels(i: int, typ: str) -> list[str]:
    return ["O", f"B-{typ}", "O"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cases") / "data"
    (root / "images").mkdir(parents=True)
    tweets, labels = [], []
    for i in range(N):
        tweets.append(Tweet(f"img{i}", ("Saw", NAMES[i % 4], "today"), ("O", "O", "O")))
        labels.append(_labels(i, _gold_type(i)))
        if i != 3:  # tweet 3 has no image file
            Image.new("RGB", (40, 30), (200, 40 + 5 * i, 40)).save(root / "images" / f"img{i}.jpg")
    write_conll(root / "test.txt", tweets, labels)
    rows = ["split\tindex\timage_id\tstart\tend\ttype"]
    rows += [f"test\t{i}\timg{i}\t1\t2\t{_gold_type(i)}" for i in range(0, N, 2)]
    (root / "image_dependent.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _make_run(root: Path, data: Path, model: str, wrong_even: bool, seeds=(1, 2)) -> Path:
    run = root / model
    test = data / "test.txt"
    digest = hashlib.sha256(test.read_bytes()).hexdigest()
    tweets = [Tweet(f"img{i}", ("Saw", NAMES[i % 4], "today"), ("O", "O", "O")) for i in range(N)]
    per_seed = []
    for seed in seeds:
        sd = run / f"seed_{seed}"
        sd.mkdir(parents=True)
        pred = [
            _labels(i, WRONG[_gold_type(i)] if (wrong_even and i % 2 == 0) else _gold_type(i))
            for i in range(N)
        ]
        write_conll(sd / "pred_test.txt", tweets, pred)
        f1 = 50.0 if wrong_even else 100.0
        rec = {"overall": {"precision": f1, "recall": f1, "f1": f1}}
        per_seed.append({"seed": seed, "best_epoch": 1, "dev": rec, "test": rec})
    stat = {"mean": per_seed[0]["test"]["overall"]["f1"], "std": 0.0}
    metrics = {
        "model": model, "head": {}, "profile": "tiny", "seeds": list(seeds),
        "summary": {"dev": {"overall": {"f1": stat}}, "test": {"overall": {"f1": stat}}},
        "runs": per_seed,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model, "profile": "tiny", "seeds": list(seeds)}))
    prov = {"profile": "tiny", "dataset": {"name": "toy", "files": {str(test): digest}}}
    (run / "provenance.json").write_text(json.dumps(prov))
    return run


@pytest.fixture(scope="module")
def report(data, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("rep") / "runs"
    for model, wrong in (("bert_crf", True), ("umt", False), ("mgc", True)):
        _make_run(runs, data, model, wrong)
    out = runs.parent / "report"
    build_report(ReportConfig(out=out, resamples=500), [runs])
    return out


def test_paired_tests_known_answers():
    rng = np.random.default_rng(0)
    gold = [{("PER", 0, 1)} if rng.random() < 0.8 else set() for _ in range(200)]
    same = tweet_counts(gold, gold)
    f1_a, f1_b, delta, low, high, p = compare_counts(same, same.copy(), resamples=1000)
    assert (delta, low, high, p) == (0.0, 0.0, 0.0, 1.0)  # identical predictions: p = 1
    nothing = tweet_counts(gold, [set()] * 200)
    f1_a, f1_b, delta, low, high, p = compare_counts(same, nothing, resamples=1000)
    assert (f1_a, f1_b, delta) == (100.0, 0.0, 100.0)
    assert p < 0.01 and p == pytest.approx(2 / 1001)  # every swap is less extreme
    assert low == high == 100.0
    # A small difference on few tweets is not significant, and its CI straddles 0.
    one_off = [set(g) for g in gold]
    k = next(i for i, g in enumerate(gold) if g)
    one_off[k] = {("LOC", 0, 1)}
    _, _, delta, low, high, p = compare_counts(same, tweet_counts(gold, one_off), resamples=1000)
    assert delta > 0 and low <= 0 <= high and p > 0.5


def test_significance_in_results(report):
    doc = json.loads((report / "results.json").read_text())
    sig = doc["datasets"]["toy"]["significance"]
    assert sig["baseline"] == "bert_crf" and sig["resamples"] == 500
    rows = {r["label"]: r for r in sig["rows"]}
    assert set(rows) == {"umt", "mgc"}
    umt, mgc = rows["umt"]["pooled"], rows["mgc"]["pooled"]
    # bert_crf: 20 of 40 right -> P = R = F1 = 50; umt 100; pooled over 2 seed pairs.
    assert (umt["f1"], umt["baseline_f1"], umt["delta"]) == (100.0, 50.0, 50.0)
    assert umt["n_tweets"] == 2 * N and umt["seeds"] == [[1, 1], [2, 2]]
    assert umt["p_value"] < 0.01 and umt["ci_low"] > 30
    assert (mgc["delta"], mgc["p_value"], mgc["ci_low"], mgc["ci_high"]) == (0.0, 1.0, 0.0, 0.0)
    assert [s["seeds"] for s in rows["umt"]["per_seed"]] == [[[1, 1]], [[2, 2]]]
    md = (report / "results.md").read_text()
    assert "### Significance against bert_crf (test split)" in md
    assert "| umt | +50.00 |" in md and "| mgc | +0.00 | [+0.00, +0.00] | 1.0000 |" in md


def test_baseline_option_and_missing_baseline(data, tmp_path):
    runs = tmp_path / "runs"
    _make_run(runs, data, "umt", False)
    _make_run(runs, data, "mgc", True)
    build_report(ReportConfig(out=tmp_path / "a"), [runs])
    md = (tmp_path / "a" / "results.md").read_text()
    assert "Not computed: no bert_crf row with test predictions; set report.baseline to one of: " in md
    build_report(ReportConfig(out=tmp_path / "b", baseline="umt", resamples=200), [runs])
    sig = json.loads((tmp_path / "b" / "results.json").read_text())["datasets"]["toy"]["significance"]
    assert [r["label"] for r in sig["rows"]] == ["mgc"] and sig["rows"][0]["pooled"]["delta"] == -50.0
    with pytest.raises(ValueError, match="resamples must be at least 100"):
        ReportConfig(resamples=10)


def test_changed_test_file_is_not_compared(data, tmp_path):
    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    runs = tmp_path / "runs"
    for model, wrong in (("bert_crf", True), ("umt", False)):
        _make_run(runs, moved, model, wrong)
    with open(moved / "test.txt", "a", encoding="utf-8") as f:
        f.write("\n")
    build_report(ReportConfig(out=tmp_path / "r"), [runs])
    md = (tmp_path / "r" / "results.md").read_text()
    assert "changed since training (sha256 differs from the recorded one)" in md
    assert not (tmp_path / "r" / "cases.html").exists()


def test_cases_order_and_figure(report):
    html = (report / "cases.html").read_text()
    assert "http://" not in html.replace("http://t.co", "") and "<script src" not in html
    first = html.index('class="case"')
    # Most instructive first: an even tweet (bert_crf wrong, umt right, image-dependent).
    assert 'data-group="3"' in html[first: first + 400] and 'data-imgdep="1"' in html[first: first + 400]
    assert html.count('class="case"') == N
    assert html.count("data:image/jpeg;base64,") == N - 1 and "image missing" in html
    png = (report / "cases.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    im = np.asarray(Image.open(report / "cases.png").convert("RGB")).astype(int)
    # The PER highlight colour (#E69F00) is drawn.
    assert (np.abs(im - [0xE6, 0x9F, 0x00]).sum(axis=2) < 20).sum() > 50


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(.ci/run does) to run the cases.html browser test")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_cases_page_in_a_real_browser(report, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser = _browser()
    try:
        browser.get((report / "cases.html").resolve().as_uri())

        def shown():
            return [c.get_attribute("id") for c in browser.find_elements(By.CSS_SELECTOR, ".case")
                    if c.is_displayed()]

        assert len(shown()) == N and browser.find_element(By.ID, "shown").text == str(N)
        browser.find_element(By.ID, "f-imgdep").click()
        assert sorted(shown()) == sorted(f"toy-{i}" for i in range(0, N, 2))
        browser.find_element(By.ID, "f-imgdep").click()
        browser.find_element(By.ID, "f-disagree").click()
        assert len(shown()) == N // 2  # umt differs from bert_crf/mgc on the even tweets
        browser.find_element(By.ID, "f-disagree").click()
        Select(browser.find_element(By.ID, "f-right")).select_by_visible_text("umt")
        Select(browser.find_element(By.ID, "f-wrong")).select_by_visible_text("bert_crf")
        assert len(shown()) == N // 2
        Select(browser.find_element(By.ID, "f-right")).select_by_visible_text("bert_crf")
        Select(browser.find_element(By.ID, "f-wrong")).select_by_visible_text("umt")
        assert shown() == [] and browser.find_element(By.ID, "shown").text == "0"
        Select(browser.find_element(By.ID, "f-right")).select_by_index(0)
        Select(browser.find_element(By.ID, "f-wrong")).select_by_index(0)
        Select(browser.find_element(By.ID, "f-errtype")).select_by_visible_text("PER")
        # Errors of type PER: only gold PER predicted LOC (i % 4 == 0); ORG -> MISC at i % 4 == 2.
        assert sorted(shown()) == sorted(f"toy-{i}" for i in range(0, N, 4))
        # The wrong predictions are marked, the right ones highlighted in their type's colour.
        card = browser.find_element(By.ID, "toy-0")
        bad = card.find_elements(By.CSS_SELECTOR, "tr.model .ent.bad")
        assert [e.get_attribute("title") for e in bad] == ["predicted LOC, gold PER"] * 2
        ok = card.find_element(By.CSS_SELECTOR, 'tr.gold .ent[data-type="PER"]')
        shot = tmp_path / "per.png"
        ok.screenshot(str(shot))
        im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        # The border is the PER colour #E69F00; the fill a tint of it.
        assert (np.abs(im - [0xE6, 0x9F, 0x00]).sum(axis=2) < 40).sum() > 20
    finally:
        browser.quit()


def test_report_cli_options(report, data, tmp_path):
    from typer.testing import CliRunner

    from mner.pipeline.cli import app

    runs = report.parent / "runs"
    res = CliRunner().invoke(app, ["report", str(runs), "--out", str(tmp_path / "r"), "-o", "cases=false",
                                   "-o", "significance=false"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "r" / "cases.html").exists()
    assert "Significance" not in (tmp_path / "r" / "results.md").read_text()
    with pytest.raises(ConfigError, match="^-o resamples: "):
        CliRunner().invoke(app, ["report", str(runs), "-o", "resamples=many"], catch_exceptions=False)
