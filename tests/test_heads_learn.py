"""Every multimodal head learns from the cached image features (tiny profile, CPU).

On the generated sample, a third of the entities can only be typed from the image
(``image_dependent.tsv``); the text-only ``bert_crf`` baseline guesses them. Each
multimodal head, trained with the same tiny config on the tiny-profile cache, must type
them better. Head engineers run their head's case with ``-k <name>``.
"""

from __future__ import annotations

import pytest

from mner.train.config import make_train_config
from mner.train.heads import HEADS
from mner.train.trainer import train_run

# Heads that read cached visual features (the context recipes read text, not tensors).
MULTIMODAL = sorted(n for n, c in HEADS.items() if c.needs or c.needs_text_teacher)


@pytest.fixture(scope="module")
def trained(sample_dir, tiny_cache, tmp_path_factory):
    """``trained(name)`` -> the test-split R record of a tiny run, trained once per module."""
    runs: dict[str, dict] = {}

    def get(model: str) -> dict:
        if model not in runs:
            cfg = make_train_config({"model": model, "profile": "tiny"})
            out = tmp_path_factory.mktemp(f"run_{model}")
            runs[model] = train_run(cfg, sample_dir, tiny_cache, out)["runs"][0]["test"]
            runs[model]["run"] = out
        return runs[model]

    return get


def test_umt_beats_text_only_baseline(trained):
    base, umt = trained("bert_crf"), trained("umt")
    assert base["image_dependent"]["n_gold"] >= 15  # enough marked entities to compare
    gain_dep = umt["image_dependent"]["f1"] - base["image_dependent"]["f1"]
    gain_all = umt["overall"]["f1"] - base["overall"]["f1"]
    assert gain_dep >= 20, (umt["image_dependent"], base["image_dependent"])
    assert gain_all >= 5, (umt["overall"], base["overall"])


def test_predict_extracts_features_like_the_cache(trained, sample_dir):
    """``mner predict`` recomputes the image features; it must tag as training did."""
    from mner.apps.predict import Predictor
    from mner.data.conll import read_conll
    from mner.data.images import find_image
    from mner.data.schemes import entities

    run = trained("umt")["run"]
    tweets = read_conll(sample_dir / "test.txt")[:24]
    p = Predictor(run, device="cpu")
    images = [find_image(sample_dir / "images", t.image_id) for t in tweets]
    got = p.predict([t.tokens for t in tweets], images)
    want = [entities(t.labels) for t in read_conll(run / "seed_1" / "pred_test.txt")[:24]]
    assert [[(e["type"], e["start"], e["end"]) for e in g] for g in got] == want
    blind = p.predict([t.tokens for t in tweets], [None] * len(tweets))
    assert [[(e["type"], e["start"], e["end"]) for e in g] for g in blind] != want


@pytest.mark.parametrize("model", MULTIMODAL)
def test_head_beats_bert_crf_on_image_dependent_entities(trained, model):
    base, head = trained("bert_crf"), trained(model)
    assert head["image_dependent"]["f1"] > base["image_dependent"]["f1"], (
        model, head["image_dependent"], base["image_dependent"]
    )


def test_mgc_without_visual_modules_builds_from_the_cache(sample_dir, tiny_cache, tmp_path):
    """Ablation `no_visual` reads no image feature; its joint space size still comes
    from the cached CLIP text-teacher embeddings (recorded in provenance for reloading)."""
    import json

    cfg = make_train_config({"model": "mgc", "profile": "tiny", "epochs": 1,
                             "head": {"no_visual": True}})
    metrics = train_run(cfg, sample_dir, tiny_cache, tmp_path / "run")
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert set(prov["feature_dims"]) == {"clip_text/sentence"}
    assert metrics["runs"][0]["test"]["overall"]["n_gold"] > 0
