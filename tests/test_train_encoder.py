"""Encoders: the seeded tiny BERT, the from_pretrained path, and the offline error."""

from __future__ import annotations

import pytest
import torch

from mner.errors import WeightsError
from mner.train import encoder as encoders

TEXT = [["Barack", "Obama", "visits", "Paris"], ["Messi", "scores", "for", "Barcelona"]] * 5


def test_tiny_encoder_is_seeded_and_small():
    a, tok = encoders.build_tiny(TEXT, seed=3)
    b, _ = encoders.build_tiny(TEXT, seed=3)
    c, _ = encoders.build_tiny(TEXT, seed=4)
    wa, wb, wc = (m.embeddings.word_embeddings.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.hidden_size == 128 and a.config.num_hidden_layers == 2
    assert a.config.vocab_size == len(tok)
    # cased vocabulary trained on the text: a seen word is one piece
    assert tok.tokenize("Obama") == ["Obama"]
    enc = tok(["Obama", "visits"], is_split_into_words=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"])[0] == "[CLS]"


def test_saved_encoder_reloads_through_from_pretrained(tmp_path):
    model, tok = encoders.build_tiny(TEXT, seed=1)
    # A full HF folder (weights included) loads as a pretrained encoder...
    model.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    loaded, ltok = encoders.load_pretrained(str(tmp_path / "full"))
    assert ltok.is_fast and ltok.tokenize("Obama visits") == tok.tokenize("Obama visits")
    assert torch.equal(
        loaded.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight
    )
    # ...and the run-folder form (config + tokenizer only) rebuilds the architecture.
    encoders.save(model, tok, tmp_path / "run")
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "run").iterdir())
    arch, rtok = encoders.load_saved(tmp_path / "run")
    assert arch.config.hidden_size == model.config.hidden_size and len(rtok) == len(tok)


def test_offline_without_a_local_copy_is_a_one_line_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="--encoder /path/to/no-such-bert-xyz") as info:
        encoders.load_pretrained("mner-tests/no-such-bert-xyz")
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="cannot load encoder"):
        encoders.load_pretrained(str(tmp_path))  # an empty folder
