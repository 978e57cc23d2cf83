"""Per-paper training recipes: values, per-dataset overrides, user precedence, the record in
config.yaml, best-dev-epoch selection without early stopping, ``mner models --recipe`` and
the report's recipe mark.

Paper-profile configs are only built here (no bert-base weights needed); the runs that
train use a tiny BERT saved to a folder, loaded through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from mner.config import build, to_dict
from mner.train import encoder as encoders
from mner.train.config import TrainConfig, make_train_config, recipe_mark
from mner.train.heads.base import HEADS, get_head
from mner.train.recipes import RECIPE_FIELDS, Recipe, dataset_key


@pytest.fixture(scope="module")
def twitter2017(sample_dir, tmp_path_factory):
    """A slice of the sample (seconds to train) in a folder named like Twitter-2017's."""
    data = tmp_path_factory.mktemp("data") / "twitter2017"
    data.mkdir()
    for split, n in (("train", 64), ("valid", 16), ("test", 16)):
        blocks = (sample_dir / f"{split}.txt").read_text(encoding="utf-8").strip().split("\n\n")
        (data / f"{split}.txt").write_text("\n\n".join(blocks[:n]) + "\n", encoding="utf-8")
    return data


# -- the recipes themselves -----------------------------------------------------------


def _paper_heads():
    """The fusion heads with a paper recipe: all but the context presets (ita, more_*,
    pgim), whose XLM-R-large recipes are not declared (docs/fidelity.md says why)."""
    from mner.train.heads.ita import ContextRecipeHead

    get_head("bert_crf")
    return {n: c for n, c in HEADS.items() if not issubclass(c, ContextRecipeHead)}


def test_context_presets_fall_back_to_the_bert_crf_recipe():
    from mner.train.config import paper_recipe

    for name in ("ita", "more_text", "more_image", "pgim"):
        assert get_head(name).recipe is None
        assert paper_recipe(name) == ("bert_crf", get_head("bert_crf").recipe)


def test_every_head_declares_a_recipe_with_a_source_for_each_value():
    heads = _paper_heads()
    assert set(heads) >= {"bert_crf", "umt", "maf", "bfcl", "mgc", "mgips_cl", "hamlearning"}
    for name, cls in heads.items():
        assert isinstance(cls.recipe, Recipe), name
        for key, value, source in cls.recipe.rows():
            assert value and source.strip(), (name, key)
        assert cls.recipe.patience[0] == 0, name  # best dev epoch, never early stopping


@pytest.mark.parametrize(
    ("model", "dataset", "expected"),
    [
        # the old shared recipe: bert-base-cased, batch 16, 30 epochs, patience 5, lr 5e-5, 128
        ("umt", None, dict(batch_size=32, epochs=24, lr_encoder=5e-5, warmup_ratio=0.1, max_length=128)),
        ("umt", "twitter2017", dict(batch_size=32, epochs=22)),
        ("bert_crf", "twitter2017", dict(batch_size=32, epochs=22, encoder="bert-base-cased")),
        ("maf", "twitter2015", dict(batch_size=64, epochs=24, lr_head=5e-5)),
        ("maf", "twitter2017", dict(batch_size=64, epochs=23)),
        ("bfcl", None, dict(batch_size=16, epochs=30, dropout=0.1)),
        ("mgc", None, dict(batch_size=64, epochs=24, max_length=128)),
        ("mgips_cl", "twitter2017", dict(epochs=40, warmup_ratio=0.06, max_length=40, lr_encoder=5e-5)),
        ("hamlearning", "twitter2017", dict(encoder="bert-base-uncased", batch_size=32, epochs=60,
                                            lr_encoder=3e-5, lr_head=3e-5)),
    ],
)
def test_paper_profile_applies_the_heads_recipe(model, dataset, expected):
    cfg = make_train_config({"model": model, "profile": "paper", "dataset_name": dataset})
    got = {k: getattr(cfg, k) for k in expected}
    assert got == expected
    assert cfg.patience == 0
    assert cfg.recipe == {"name": model, "dataset": dataset if model in ("umt", "bert_crf", "maf")
                          and dataset == "twitter2017" else None, "user": []}


def test_dataset_names_are_recognised_from_common_spellings():
    for name in ("twitter2017", "Twitter-2017", "TWITTER_17", "t17", "twitter2017_full"):
        assert dataset_key(name) == "twitter2017", name
    assert dataset_key("data/twitter15".split("/")[-1]) == "twitter2015"
    for name in ("sample", "twitter2016", "", None, "my2017tweets"):
        assert dataset_key(name) is None, name


def test_user_settings_win_over_the_recipe_and_are_recorded():
    cfg = make_train_config(
        {"model": "maf", "profile": "paper", "batch_size": 16, "dataset_name": "twitter2017"},
        ["patience=3", "max_length=64"], epochs=5,
    )
    assert (cfg.batch_size, cfg.epochs, cfg.patience, cfg.max_length) == (16, 5, 3, 64)
    assert cfg.lr_encoder == 5e-5 and cfg.encoder == "bert-base-cased"  # from the recipe
    assert cfg.recipe == {"name": "maf", "dataset": "twitter2017",
                          "user": ["batch_size", "epochs", "patience", "max_length"]}


def test_recipe_record_is_not_a_setting():
    from mner.errors import ConfigError

    with pytest.raises(ConfigError, match="recipe is the record mner writes to config.yaml"):
        make_train_config({"model": "umt", "recipe": {"name": "maf"}})


def test_tiny_profile_is_unchanged_and_says_so():
    cfg = make_train_config({"model": "maf", "profile": "tiny", "dataset_name": "twitter2017"})
    assert (cfg.encoder, cfg.epochs, cfg.batch_size, cfg.patience, cfg.lr_encoder, cfg.max_length,
            cfg.dropout) == ("tiny", 12, 16, 6, 2e-3, 128, 0.1)
    assert cfg.recipe == {"name": "tiny", "dataset": None, "user": []}
    assert cfg.for_dataset("twitter2015") is cfg


def test_config_yaml_records_every_value_and_round_trips():
    cfg = make_train_config({"model": "hamlearning", "profile": "paper"}, ["epochs=7"])
    cfg = cfg.for_dataset("twitter2015")  # what train_run does with the data folder's name
    doc = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    assert {k: doc[k] for k in RECIPE_FIELDS} == {
        "encoder": "bert-base-uncased", "batch_size": 32, "epochs": 7, "patience": 0,
        "lr_encoder": 3e-5, "lr_head": 3e-5, "warmup_ratio": 0.1, "max_length": 128, "dropout": 0.1,
    }
    assert doc["dataset_name"] == "twitter2015"
    assert doc["recipe"] == {"name": "hamlearning", "dataset": None, "user": ["epochs"]}
    again = build(TrainConfig, doc, where="config.yaml")
    assert again == cfg  # read back: the same values and the same record


def test_for_dataset_picks_per_dataset_values_and_keeps_the_users():
    cfg = make_train_config({"model": "umt", "profile": "paper"}, ["batch_size=8"])
    assert cfg.epochs == 24
    t17 = cfg.for_dataset("twitter2017")
    assert (t17.epochs, t17.batch_size, t17.dataset_name) == (22, 8, "twitter2017")
    assert t17.recipe == {"name": "umt", "dataset": "twitter2017", "user": ["batch_size"]}
    named = make_train_config({"model": "umt", "profile": "paper", "dataset_name": "mine"})
    assert named.for_dataset("twitter2017") is named  # an explicit dataset_name wins


# -- training: the recorded config and best-dev-epoch selection ----------------------------


def test_paper_profile_run_records_recipe_in_config_yaml(twitter2017, encoder_dir, tmp_path):
    """A paper-profile run on a folder named twitter2017 (encoder: the tiny one, the
    user's): config.yaml holds UMT's Twitter-2017 recipe and says what came from whom."""
    from mner.train.trainer import train_run

    data = twitter2017
    cfg = make_train_config({"model": "bert_crf", "profile": "paper"},
                            [f"encoder={encoder_dir}", "epochs=1", "amp=off", "threads=1"])
    train_run(cfg, data, None, tmp_path / "run")
    doc = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert doc["dataset_name"] == "twitter2017"
    assert (doc["batch_size"], doc["patience"], doc["lr_encoder"], doc["max_length"]) == (32, 0, 5e-5, 128)
    assert doc["recipe"] == {"name": "bert_crf", "dataset": "twitter2017", "user": ["encoder", "epochs"]}
    assert recipe_mark(doc) == f"differs: encoder {encoder_dir} (paper bert-base-cased), epochs 1 (paper 22)"


def test_patience_zero_trains_every_epoch_and_keeps_the_best_dev_epoch(
    twitter2017, encoder_dir, tmp_path, monkeypatch
):
    """Dev F1 scripted to peak at epoch 2 of 3: all 3 epochs run (no early stopping) and the
    saved model is epoch 2's weights, which the final dev score comes from."""
    from safetensors.torch import load_file

    from mner.train import trainer

    scripted = {1: 10.0, 2: 30.0, 3: 20.0}
    snapshots = {}
    real = trainer.run_epoch

    def run_epoch(ctx, run, epoch):
        loss, seconds, _ = real(ctx, run, epoch)
        snapshots[epoch] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        return loss, seconds, scripted[epoch]

    monkeypatch.setattr(trainer, "run_epoch", run_epoch)
    cfg = make_train_config({"model": "bert_crf", "profile": "tiny"},
                            [f"encoder={encoder_dir}", "epochs=3", "patience=0", "amp=off", "threads=1"])
    trainer.train_run(cfg, twitter2017, None, tmp_path / "run")
    seed = tmp_path / "run" / "seed_1"
    hist = json.loads((seed / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert json.loads((seed / "metrics.json").read_text())["best_epoch"] == 2
    saved = load_file(str(seed / "model.safetensors"))
    assert saved and all(torch.equal(saved[k], snapshots[2][k]) for k in saved)
    assert any(not torch.equal(saved[k], snapshots[3][k]) for k in saved)  # not the last epoch


def test_uncased_encoder_lowercases_through_the_loading_path(encoder_dir, tmp_path):
    """HamLearning's bert-base-uncased: an uncased tokenizer folder lower-cases in
    load_pretrained and again when a run's saved encoder is reloaded."""
    from transformers import BertTokenizerFast

    _, cased = encoders.load_pretrained(str(encoder_dir))
    vocab = cased.get_vocab()
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("".join(f"{w}\n" for w in sorted(vocab, key=vocab.get)), encoding="utf-8")
    folder = tmp_path / "uncased"
    BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True).save_pretrained(folder)
    shutil.copy(encoder_dir / "config.json", folder / "config.json")
    shutil.copy(encoder_dir / "model.safetensors", folder / "model.safetensors")
    model, tok = encoders.load_pretrained(str(folder))
    words = ["Obama", "visits", "PARIS"]

    def ids(t, w):
        return t(w, is_split_into_words=True)["input_ids"]

    assert ids(tok, words) == ids(tok, [w.lower() for w in words])
    assert ids(cased, words) != ids(cased, [w.lower() for w in words])
    encoders.save(model, tok, tmp_path / "run_encoder")
    _, again = encoders.load_saved(tmp_path / "run_encoder")
    assert ids(again, words) == ids(tok, [w.lower() for w in words])


# -- mner models --recipe and the report ------------------------------------------------


def test_cli_models_recipe_shows_values_and_sources(mner_cli):
    code, out, _ = mner_cli("models", "--recipe")
    assert code == 0
    blocks = {b.split()[0]: b for b in ("\n" + out).split("\n") if b and not b.startswith(" ")}
    assert set(blocks) == set(HEADS)
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("mgips_cl "))
    block = lines[start + 1:start + 14]
    assert any(line.split()[:2] == ["max_length", "40"] and "sec. 4.3" in line for line in block)
    assert any(line.split()[:2] == ["warmup_ratio", "0.06"] for line in block)
    code, out, _ = mner_cli("models", "--recipe", "--model", "maf")
    assert code == 0 and out.startswith("maf ")
    assert any(line.split()[:4] == ["epochs", "(twitter2017)", "23", "run_gate_cl.py:"]
               for line in out.splitlines())
    code, out, err = mner_cli("models", "--model", "nope")
    assert code == 2 and "unknown model 'nope'" in err and len(err.strip().splitlines()) == 1
    code, out, _ = mner_cli("models")  # without --recipe: one line per head, as before
    assert code == 0 and len(out.strip().splitlines()) == len(HEADS)
    # the context presets say what they read
    ita = next(line for line in out.splitlines() if line.startswith("ita "))
    assert ita.endswith("[features: none; context: tags, caption, ocr]")


def _report_run(root, name, model, config, dataset="twitter2015"):
    run = root / name
    run.mkdir(parents=True)
    overall = {"precision": 70.0, "recall": 70.0, "f1": 70.0}
    record = {"overall": overall, "per_type": {}}
    metrics = {"model": model, "profile": config["profile"], "seeds": [1], "head": {},
               "runs": [{"seed": 1, "best_epoch": 3, "dev": record, "test": record}]}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model, **config}))
    (run / "provenance.json").write_text(json.dumps({"dataset": {"name": dataset, "files": {}}}))
    return run


def test_report_marks_runs_that_differ_from_their_paper_recipe(tmp_path):
    from mner.report import tables
    from mner.report.runs import load_runs

    maf = get_head("maf").recipe.values("twitter2015")
    _report_run(tmp_path, "as_paper", "maf", {"profile": "paper", **maf})
    _report_run(tmp_path, "short", "umt", {"profile": "paper", **get_head("umt").recipe.values("twitter2017"),
                                           "batch_size": 16, "epochs": 12}, dataset="twitter2017")
    _report_run(tmp_path, "tiny", "bfcl", {"profile": "tiny", "epochs": 12})
    runs, _ = load_runs([tmp_path])
    marks = {r.path.name: r.recipe for r in runs}
    assert marks == {
        "as_paper": "paper",
        "short": "differs: batch_size 16 (paper 32), epochs 12 (paper 22)",
        "tiny": "tiny profile",
    }
    by_ds = {t.dataset: t for t in tables.build_tables(runs)}
    md = tables.markdown_table(by_ds["twitter2017"])
    header = md.splitlines()[0].split("|")
    assert header[-2].strip() == "recipe"
    assert md.splitlines()[2].split("|")[-2].strip() == "differs: batch_size 16 (paper 32), epochs 12 (paper 22)"
    rows = {r.run.model: tables.row_dict(r) for r in by_ds["twitter2015"].rows}
    assert (rows["maf"]["recipe"], rows["bfcl"]["recipe"]) == ("paper", "tiny profile")
    assert recipe_mark({}) == "–"


def test_fidelity_doc_recipe_tables_match_the_recipes():
    """docs/fidelity.md's "Training recipe" tables show what --profile paper applies."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "fidelity.md").read_text(encoding="utf-8")
    for name, cls in _paper_heads().items():
        section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        part = section.split("### Training recipe", 1)[1].split("### Architecture", 1)[0]
        cells = [line.strip("|").split("|") for line in part.splitlines() if line.startswith("| `")]
        table = {c[0].strip().strip("`"): c[2].strip() for c in cells}
        assert table == {key: value for key, value, _ in cls.recipe.rows()}, name
