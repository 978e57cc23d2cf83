"""``mner train`` end to end (tiny profile, CPU): run folder, evaluate, predict, resume, CLI.

The encoder is loaded through the real ``from_pretrained`` path: a tiny BERT and its
WordPiece tokenizer are saved to a folder first and the runs use ``encoder=<folder>``.
"""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
import yaml

from mner.data.conll import read_conll
from mner.data.schemes import entities
from mner.errors import CacheError
from mner.train.config import make_train_config
from mner.train.data import NerDataset
from mner.train.evaluation import evaluate_run, load_run, predict_words
from mner.train.trainer import STOP_ENV, summarize, train_run

EPOCHS = 2


def _cfg(encoder_dir, *extra):
    # bf16 autocast on every machine (emulated where the CPU lacks it), so the scoring and
    # resume tests below cover the mixed-precision path; the overwrite test trains in fp32.
    return make_train_config(
        {"model": "bert_crf", "profile": "tiny"},
        [f"encoder={encoder_dir}", f"epochs={EPOCHS}", "seeds=[1,2]", "patience=0", "amp=bf16", *extra],
    )


@pytest.fixture(scope="module")
def run(sample_dir, encoder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bert"
    train_run(_cfg(encoder_dir), sample_dir, None, out)
    return out


def test_run_folder_has_every_output(run, sample_dir, encoder_dir):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["encoder"] == str(encoder_dir) and cfg["epochs"] == EPOCHS and cfg["head"] == {}
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["dataset"]["name"] == sample_dir.name and prov["profile"] == "tiny"
    assert prov["precision"] == "bf16" and load_run(run, device="cpu").precision == "bf16"
    train_file = str(sample_dir / "train.txt")
    assert prov["dataset"]["files"][train_file] == hashlib.sha256(
        (sample_dir / "train.txt").read_bytes()
    ).hexdigest()
    assert prov["cache"] is None  # text-only: no cache needed
    for seed in (1, 2):
        d = run / f"seed_{seed}"
        for name in ("model.safetensors", "labels.json", "encoder/config.json",
                     "encoder/tokenizer.json", "checkpoint/state.pt", "diagnostics.json",
                     "history.png", "dvclive/metrics.json"):
            assert (d / name).is_file(), name
        hist = json.loads((d / "history.json").read_text())
        assert [h["epoch"] for h in hist] == list(range(1, EPOCHS + 1))
        assert hist[-1]["train_loss"] < hist[0]["train_loss"]
        m = json.loads((d / "metrics.json").read_text())
        assert m["best_epoch"] == max(hist, key=lambda h: h["dev_f1"])["epoch"]
        assert m["dev"]["overall"]["f1"] == max(h["dev_f1"] for h in hist)
        gold = read_conll(sample_dir / "test.txt")
        pred = read_conll(d / "pred_test.txt")
        assert [p.tokens for p in pred] == [g.tokens for g in gold]
        assert m["test"]["overall"]["n_gold"] == sum(len(g.entities) for g in gold)
        assert m["test"]["image_dependent"]["n_gold"] > 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["seeds"] == [1, 2] and [r["seed"] for r in summary["runs"]] == [1, 2]
    f1s = [r["test"]["overall"]["f1"] for r in summary["runs"]]
    assert summary["summary"]["test"]["overall"]["f1"]["mean"] == pytest.approx(np.mean(f1s))
    assert summary["summary"]["test"]["overall"]["f1"]["std"] == pytest.approx(np.std(f1s, ddof=1))
    # the tiny text-only model learns the text-determinable entities
    assert summary["summary"]["test"]["overall"]["f1"]["mean"] > 50


def test_summary_mean_and_std_and_null_subset():
    cfg = make_train_config({"profile": "tiny"})
    prf = {"precision": 1.0, "recall": 2.0, "f1": 3.0, "n_gold": 4, "n_pred": 5, "n_correct": 6}
    r1 = {"overall": prf, "per_type": {"PER": prf}, "image_dependent": None}
    r2 = {"overall": {**prf, "f1": 5.0}, "per_type": {"PER": prf}, "image_dependent": None}
    s = summarize(cfg, [
        {"seed": 1, "dev": r1, "test": r1, "seconds_per_epoch": 1.0},
        {"seed": 2, "dev": r2, "test": r2, "seconds_per_epoch": 3.0},
    ])
    assert s["summary"]["dev"]["overall"]["f1"] == {"mean": 4.0, "std": pytest.approx(2**0.5)}
    assert s["summary"]["dev"]["image_dependent"] is None
    assert s["summary"]["seconds_per_epoch"]["mean"] == 2.0


def test_evaluate_run_reproduces_the_training_scores(run, sample_dir, tmp_path):
    m = json.loads((run / "seed_2" / "metrics.json").read_text())
    r = evaluate_run(run, sample_dir / "test.txt", seed=2, device="cpu", pred_out=tmp_path / "p.txt")
    assert r == m["test"]
    assert (tmp_path / "p.txt").read_text() == (run / "seed_2" / "pred_test.txt").read_text()


def test_windows_shorter_than_sentences_still_tag_every_word(run, sample_dir):
    lr = load_run(run, seed=1, device="cpu")
    tweets = read_conll(sample_dir / "test.txt")
    ds = NerDataset([t.tokens for t in tweets], [t.image_id for t in tweets], lr.tokenizer,
                    8, lr.tagset, [t.labels for t in tweets])
    assert len(ds) > 2 * len(tweets)  # most sentences span several windows
    tags, _ = predict_words(lr.model, ds, lr.device, 32)
    assert [len(t) for t in tags] == [len(t.tokens) for t in tweets]
    late = sum(1 for t in tags for i, x in enumerate(t) if x != 0 and i >= 6)
    assert late > 10  # words far beyond the first window get entity tags


def test_predictor_text_and_tokens(run, sample_dir):
    from mner.apps.predict import Predictor, tokenize

    toks, offs = tokenize("RT @user: Barack Obama's visit, #Paris http://t.co/x")
    assert toks == ["RT", "@user", ":", "Barack", "Obama's", "visit", ",", "#Paris", "http://t.co/x"]
    assert offs[3] == (10, 16)
    p = Predictor(run, seed=1, device="cpu")
    tweets = read_conll(sample_dir / "test.txt")[:20]
    out = p.predict([t.tokens for t in tweets], [None] * len(tweets))
    pred = read_conll(run / "seed_1" / "pred_test.txt")[:20]
    assert [[(e["type"], e["start"], e["end"]) for e in o] for o in out] == [
        entities(t.labels) for t in pred
    ]
    text = " ".join(tweets[0].tokens)
    [ents] = p.predict([text], [None])
    for e in ents:
        assert text[e["char_start"]: e["char_end"]] == e["text"]


def test_resume_after_interruption_matches_uninterrupted_run(
    run, sample_dir, encoder_dir, tmp_path, monkeypatch
):
    out = tmp_path / "resumed"
    monkeypatch.setenv(STOP_ENV, "1")
    with pytest.raises(KeyboardInterrupt):
        train_run(_cfg(encoder_dir), sample_dir, None, out)
    state = json.loads((out / "seed_1" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and not (out / "metrics.json").exists()
    monkeypatch.delenv(STOP_ENV)
    with pytest.raises(Exception, match="--resume"):
        train_run(_cfg(encoder_dir), sample_dir, None, out)  # refuses to overwrite
    train_run(_cfg(encoder_dir), sample_dir, None, out, resume=True)
    for seed in (1, 2):
        a = json.loads((run / f"seed_{seed}" / "metrics.json").read_text())
        b = json.loads((out / f"seed_{seed}" / "metrics.json").read_text())
        assert (a["dev"], a["test"], a["best_epoch"]) == (b["dev"], b["test"], b["best_epoch"])
        ha = json.loads((run / f"seed_{seed}" / "history.json").read_text())
        hb = json.loads((out / f"seed_{seed}" / "history.json").read_text())
        assert [(h["train_loss"], h["dev_f1"]) for h in ha] == [(h["train_loss"], h["dev_f1"]) for h in hb]
    with pytest.raises(Exception, match="different config"):
        train_run(_cfg(encoder_dir, "lr_head=0.5"), sample_dir, None, out, resume=True)


def test_overwrite_replaces_only_the_run_and_threads_apply_during_training(
    run, sample_dir, encoder_dir, tmp_path, monkeypatch
):
    out = tmp_path / "again"
    out.mkdir()
    for name in ("seed_1", "seed_2"):
        (out / name / "checkpoint").mkdir(parents=True)  # a previous run's leftovers
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="--overwrite"):
        train_run(_cfg(encoder_dir), sample_dir, None, out)
    with pytest.raises(Exception, match="pass one"):
        train_run(_cfg(encoder_dir), sample_dir, None, out, resume=True, overwrite=True)
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    summary = train_run(_cfg(encoder_dir, "seeds=[1]", "threads=1", "amp=off"), sample_dir, None, out,
                        overwrite=True)
    assert json.loads((out / "provenance.json").read_text())["precision"] == "fp32"
    assert seen == [1, before] and torch.get_num_threads() == before
    assert sorted(p.name for p in out.glob("seed_*")) == ["seed_1"]  # seed_2 is gone
    assert (out / "notes.txt").read_text() == "mine"
    assert summary["seeds"] == [1] and (out / "seed_1" / "model.safetensors").is_file()


def test_cache_mismatches_stop_with_one_line(sample_dir, tiny_cache, tmp_path):
    cfg = make_train_config({"model": "umt", "profile": "tiny"}, ["epochs=1"])
    with pytest.raises(CacheError, match="pass --features"):
        train_run(cfg, sample_dir, None, tmp_path / "a")
    other = tmp_path / "paper.h5"
    other.write_bytes(tiny_cache.read_bytes())
    with h5py.File(other, "a") as f:
        f.attrs["profile"] = "paper"
    with pytest.raises(CacheError, match="profile paper, the run asks for tiny"):
        train_run(cfg, sample_dir, other, tmp_path / "b")
    lacking = tmp_path / "lacking.h5"
    lacking.write_bytes(tiny_cache.read_bytes())
    with h5py.File(lacking, "a") as f:
        del f["resnet"]
    with pytest.raises(CacheError, match="lacks resnet/grid"):
        train_run(cfg, sample_dir, lacking, tmp_path / "c")




def test_cli_models_evaluate_predict_and_errors(run, sample_dir, tmp_path, mner_cli):
    code, out, _ = mner_cli("models")
    lines = out.strip().splitlines()
    assert code == 0 and any(line.startswith("umt ") and "resnet/grid" in line for line in lines)
    assert any(line.startswith("bert_crf ") and "features: none" in line for line in lines)

    code, out, _ = mner_cli("evaluate", "--run", str(run), "--data",
                        str(sample_dir / "test.txt"), "--seed", "1", "--json", "--device", "cpu")
    m = json.loads((run / "seed_1" / "metrics.json").read_text())
    assert code == 0 and json.loads(out) == m["test"]

    code, out, _ = mner_cli("predict", "--run", str(run), "--input",
                        str(sample_dir / "test.txt"), "--json", "--device", "cpu")
    rows = [json.loads(x) for x in out.strip().splitlines()]
    assert code == 0 and len(rows) == len(read_conll(sample_dir / "test.txt"))

    code, _, err = mner_cli("train", "--data", str(sample_dir), "--out",
                        str(tmp_path / "x"), "--profile", "tiny", "-o", "epochz=3")
    assert code == 2 and err.startswith("error: ") and "epochz" in err and err.count("\n") == 1

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  model: bert_crf\n  profile: tiny\n  epochs: two\n")
    code, _, err = mner_cli("train", "--data", str(sample_dir), "--out",
                        str(tmp_path / "y"), "--params", str(params))
    assert code == 2 and "epochs" in err and "expected int" in err


def test_optimizer_is_fused_adamw_and_steps_like_foreach():
    from transformers import BertConfig, BertModel

    from mner.train.data import TagSet
    from mner.train.model import param_groups
    from mner.train.trainer import build_model, make_optimizer

    cfg = make_train_config({"model": "bert_crf", "profile": "tiny"})
    steps = []
    for fused in (True, False):
        enc = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=40), add_pooling_layer=False)
        torch.manual_seed(0)
        enc.apply(enc._init_weights)
        model = build_model(cfg, 1, enc, TagSet("bio2"), {})
        opt = make_optimizer(model, cfg)
        if fused:
            assert opt.defaults["fused"] is True  # CPU has PyTorch's fused AdamW kernel
        else:
            opt = torch.optim.AdamW(param_groups(model, cfg.lr_encoder, cfg.lr_head, cfg.weight_decay),
                                    foreach=True)
            assert not opt.defaults["fused"]
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
        opt.step()
        steps.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1])
