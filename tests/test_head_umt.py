"""The UMT head (mner/train/heads/umt.py) on synthetic, seeded tensors."""

from __future__ import annotations

import pytest
import torch

from mner.config import build
from mner.errors import ConfigError
from mner.train.heads import HeadInput, get_head
from mner.train.heads.layers import attention_heads
from mner.train.heads.umt import (
    SPAN_TAGS,
    UMTConfig,
    UMTHead,
    compact_labelled,
    conversion_matrix,
    span_tag_map,
)

D, DV, R = 32, 16, 49
NAMES = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_head(seed: int = 0, **cfg) -> UMTHead:
    torch.manual_seed(seed)
    return UMTHead(UMTConfig(**cfg), D, {"resnet/grid": DV})


def make_batch(seed: int = 0, B: int = 4, T: int = 7) -> HeadInput:
    """Rows of lengths T, T-2, T, T-1; row 2's image is missing (zeros, as in the cache)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [T, T - 2, T, T - 1][:B]
    hidden = torch.randn(B, T, D, generator=g)
    token_mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, n in enumerate(lengths):
        token_mask[b, :n] = True
        # [CLS] w1 w2 w3 ... [SEP]; every word a single sub-token except w2 (2 pieces).
        tags = torch.randint(0, len(NAMES), (n,), generator=g)
        labels[b, 1 : n - 1] = tags[1 : n - 1]
        labels[b, 3] = -100  # continuation sub-token
    grid = torch.rand(B, R, DV, generator=g)
    image_mask = torch.tensor([True, True, False, True][:B])
    grid[~image_mask] = 0.0
    return HeadInput(
        hidden=hidden,
        token_mask=token_mask,
        visual={"resnet/grid": grid},
        image_mask=image_mask,
        labels=labels,
        label_names=NAMES,
    )


def pad_tokens(batch: HeadInput, extra: int) -> HeadInput:
    """The same batch with ``extra`` more padding positions holding garbage states."""
    B, T, _ = batch.hidden.shape
    hidden = torch.cat([batch.hidden, torch.full((B, extra, D), 50.0)], dim=1)
    token_mask = torch.cat([batch.token_mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    labels = torch.cat([batch.labels, torch.full((B, extra), -100)], dim=1)
    return HeadInput(
        hidden=hidden,
        token_mask=token_mask,
        visual=dict(batch.visual),
        image_mask=batch.image_mask,
        labels=labels,
        label_names=batch.label_names,
    )


def test_registered_with_shapes_and_gate_diagnostic():
    assert get_head("umt") is UMTHead
    assert UMTHead.needs == ("resnet/grid",) and not UMTHead.needs_text_teacher
    head = make_head().eval()
    out = head(make_batch())
    assert head.out_dim == 2 * D
    assert out.hidden.shape == (4, 7, 2 * D)
    assert set(out.aux_losses) == {"esd"}
    gate = out.diagnostics["umt_gate"]
    assert gate.shape == (4,) and ((gate > 0) & (gate < 1)).all()


def test_padding_tokens_do_not_change_real_outputs():
    head = make_head().eval()
    short = make_batch(T=7)
    long = pad_tokens(short, 4)
    with torch.no_grad():
        a, b = head(short), head(long)
    m = short.token_mask
    assert torch.allclose(a.hidden[m], b.hidden[:, :7][m], atol=1e-5)
    assert torch.allclose(a.diagnostics["umt_gate"], b.diagnostics["umt_gate"], atol=1e-6)
    assert torch.allclose(a.aux_losses["esd"], b.aux_losses["esd"], atol=1e-5)


def test_missing_image_rows_ignore_the_visual_row_and_use_the_learned_embedding():
    head = make_head().eval()
    batch = make_batch()
    with torch.no_grad():
        ref = head(batch).hidden
        batch.visual["resnet/grid"][2] = torch.randn(R, DV) * 100  # garbage, row 2 missing
        again = head(batch).hidden
        assert torch.equal(ref, again)
        # The same row with its image marked present does see the image.
        batch.image_mask = torch.ones(4, dtype=torch.bool)
        seen = head(batch).hidden
    assert not torch.allclose(seen[2], ref[2], atol=1e-3)
    assert torch.allclose(seen[[0, 1, 3]], ref[[0, 1, 3]], atol=1e-6)  # rows are independent


def test_gradients_reach_text_visual_and_esd_parameters():
    head = make_head().train()
    batch = make_batch()
    batch.hidden.requires_grad_(True)
    out = head(batch)
    (out.hidden.pow(2).mean() + out.aux_losses["esd"]).backward()
    assert batch.hidden.grad.abs().sum() > 0
    params = dict(head.named_parameters())
    for name in (
        "text_layer.attn.in_proj_weight",
        "interaction.visual_proj.weight",
        "interaction.visual_proj_v2.weight",
        "interaction.no_image",
        "interaction.img2txt.attn.in_proj_weight",
        "interaction.txt2img_visual.ffn.0.weight",
        "interaction.gate.weight",
        "esd_classifier.weight",
        "esd_crf.transitions",
    ):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


@pytest.mark.parametrize("decoder", ["crf", "softmax"])
def test_esd_loss_is_finite_and_falls_when_overfitting(decoder):
    head = make_head(esd_decoder=decoder).train()
    batch = make_batch()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = head(batch).aux_losses["esd"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_esd_weight_scales_the_loss_and_no_labels_means_no_loss():
    batch = make_batch()
    half = make_head(seed=3).eval()(batch).aux_losses["esd"]
    full = make_head(seed=3, esd_weight=1.0).eval()(batch).aux_losses["esd"]
    assert full.item() == pytest.approx(2 * half.item(), rel=1e-5)
    batch.labels = None
    assert make_head().eval()(batch).aux_losses == {}


def test_span_tags_map_bio2_and_bioes():
    names = ("O", "B-PER", "I-PER", "E-PER", "S-LOC", "B-MISC", "I-MISC")
    got = [SPAN_TAGS[i] for i in span_tag_map(names).tolist()]
    assert got == ["O", "B", "I", "I", "B", "B", "I"]


def test_compact_labelled_keeps_word_order():
    em = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    tags = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 1, 0, 1]])
    labelled = torch.tensor([[False, True, False, True, True], [False, False, True, False, False]])
    e, t, m = compact_labelled(em, tags, labelled)
    assert e[0].squeeze(-1).tolist() == [1.0, 3.0, 4.0]
    assert e[1, 0, 0].item() == 7.0  # row 1's only labelled position; the rest is masked
    assert t.tolist() == [[1, 1, 0], [1, 0, 0]]
    assert m.tolist() == [[True, True, True], [True, False, False]]


def test_esd_crf_loss_equals_torchcrf_on_word_positions():
    head = make_head(esd_weight=1.0).eval()
    batch = make_batch()
    got = head(batch).aux_losses["esd"]
    with torch.no_grad():
        logits = head.esd_classifier(head.esd_layer(batch.hidden, batch.hidden, batch.token_mask))
        span = span_tag_map(NAMES)
        ems, tags = [], []
        for b in range(4):
            pos = (batch.labels[b] >= 0).nonzero().squeeze(-1)
            ems.append(logits[b, pos])
            tags.append(span[batch.labels[b, pos]])
        total = sum(
            -head.esd_crf(e[None], t[None], mask=torch.ones(1, len(t), dtype=torch.bool), reduction="sum")
            for e, t in zip(ems, tags, strict=True)
        )
    assert got.item() == pytest.approx(total.item() / 4, rel=1e-5)


def _param_names(head) -> set[str]:
    return {n for n, _ in head.named_parameters()}


@pytest.mark.parametrize(
    ("switch", "removed_prefixes", "aux", "out_dim"),
    [
        ({"esd": False}, ("esd_layer.", "esd_classifier.", "esd_crf."), set(), 2 * D),
        ({"text_layer": False}, ("text_layer.",), {"esd"}, 2 * D),
        ({"no_gate": True}, ("interaction.gate.",), {"esd"}, 2 * D),
        (
            {"no_image_aware": True},
            ("interaction.img2txt.", "interaction.txt2img_word.", "interaction.visual_proj_v2."),
            {"esd"},
            2 * D,
        ),
        (
            {"no_word_aware": True},
            ("interaction.txt2img_visual.", "interaction.gate.", "interaction.visual_proj_v2."),
            {"esd"},
            D,
        ),
    ],
)
def test_each_switch_removes_exactly_its_component(switch, removed_prefixes, aux, out_dim):
    full = _param_names(make_head())
    head = make_head(**switch)
    removed = full - _param_names(head)
    assert _param_names(head) <= full
    assert removed and all(n.startswith(removed_prefixes) for n in removed)
    assert all(any(n.startswith(p) for n in removed) for p in removed_prefixes)
    out = head.eval()(make_batch())
    assert set(out.aux_losses) == aux
    assert head.out_dim == out_dim and out.hidden.shape[-1] == out_dim
    assert ("umt_gate" in out.diagnostics) == ("interaction.gate.weight" in _param_names(head))


def test_without_text_layer_the_interaction_reads_the_encoder_states():
    head = make_head(text_layer=False).eval()
    batch = make_batch()
    out = head(batch)
    direct = head.interaction(batch.hidden, batch.token_mask, batch.visual["resnet/grid"], batch.image_mask)
    torch.testing.assert_close(out.hidden, direct.hidden)
    with_layer = make_head().eval()
    assert not torch.allclose(with_layer(batch).hidden, with_layer.interaction(
        batch.hidden, batch.token_mask, batch.visual["resnet/grid"], batch.image_mask).hidden)


def test_conversion_matrix_spreads_span_tags_over_entity_types():
    w = conversion_matrix(("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"))
    # UMT's released matrix: O -> O 1; B -> each B-X 0.25; I -> each I-X 0.25
    expected = torch.zeros(3, 9)
    expected[0, 0] = 1.0
    expected[1, [1, 3, 5, 7]] = 0.25
    expected[2, [2, 4, 6, 8]] = 0.25
    torch.testing.assert_close(w, expected)
    bioes = conversion_matrix(("O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "S-LOC"))
    torch.testing.assert_close(bioes, torch.tensor([[1.0, 0, 0, 0, 0, 0, 0],
                                                     [0, 0.5, 0, 0, 0.5, 0.5, 0.5],
                                                     [0, 0, 0.5, 0.5, 0, 0, 0]]))


def test_conversion_returns_converted_esd_scores_in_training_and_decoding():
    batch = make_batch()
    head = make_head(seed=4).eval()
    out = head(batch)
    assert out.emission_prior.shape == (4, 7, len(NAMES)) and out.prior_weight == 0.5
    # The prior is the ESD branch's B/I/O scores through the fixed matrix.
    logits = head.esd_classifier(head.esd_layer(batch.hidden, batch.hidden, batch.token_mask))
    torch.testing.assert_close(out.emission_prior, logits @ conversion_matrix(NAMES))
    batch.labels = None  # decoding: no loss, same prior
    dec = head(batch)
    assert dec.aux_losses == {}
    torch.testing.assert_close(dec.emission_prior, out.emission_prior)
    assert make_head(conversion=False).eval()(batch).emission_prior is None
    assert make_head(esd=False).eval()(batch).emission_prior is None
    assert make_head(conversion_weight=0.3).eval()(batch).prior_weight == 0.3


def test_tagger_mixes_the_prior_into_its_typed_emissions():
    from types import SimpleNamespace

    from mner.train.model import Tagger

    batch = make_batch()

    class Encoder(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(last_hidden_state=batch.hidden)

    tagger = Tagger(Encoder(), make_head(seed=6), NAMES, dropout=0.0).eval()
    word_pos = torch.tensor([[1, 2, 4, 5]] * 4)  # first sub-tokens of four words
    tb = SimpleNamespace(input_ids=None, attention_mask=batch.token_mask, visual=batch.visual,
                         visual_masks={}, image_mask=batch.image_mask, sub_labels=None,
                         entity_spans=None, entity_mask=None, text_teacher={}, word_pos=word_pos)
    em, out = tagger(tb)
    idx = word_pos.unsqueeze(-1)
    typed = tagger.emissions(out.hidden.gather(1, idx.expand(-1, -1, out.hidden.shape[-1])))
    prior = out.emission_prior.gather(1, idx.expand(-1, -1, len(NAMES)))
    assert em.shape == (4, 4, len(NAMES))
    torch.testing.assert_close(em, 0.5 * typed + 0.5 * prior)
    assert not torch.allclose(em, typed)


def test_esd_crf_only_with_the_crf_decoder():
    names = _param_names(make_head(esd_decoder="softmax"))
    assert "esd_classifier.weight" in names and not any(n.startswith("esd_crf.") for n in names)


def test_config_is_strict_and_validated():
    cfg = build(UMTConfig, {"esd": False, "esd_weight": 1}, where="train.head")
    assert cfg.esd is False and cfg.esd_weight == 1.0
    with pytest.raises(ConfigError, match="unknown key"):
        build(UMTConfig, {"no_esd": True}, where="train.head")
    with pytest.raises(ConfigError, match="bert_crf"):
        build(UMTConfig, {"no_image_aware": True, "no_word_aware": True}, where="train.head")
    with pytest.raises(ConfigError, match="does not divide"):
        UMTHead(UMTConfig(heads=5), D, {"resnet/grid": DV})


def test_default_heads_follow_bert_head_size():
    assert make_head().text_layer.attn.num_heads == 1  # D=32 < 64
    assert make_head(heads=4).text_layer.attn.num_heads == 4
    assert attention_heads(768, None) == 12  # the paper's value for BERT-base
    assert attention_heads(128, None) == 2  # the tiny profile


def test_switches_are_set_from_the_command_line():
    from mner.train.config import make_train_config

    cfg = make_train_config({}, ["head.esd=false", "no_gate=true"], model="umt", profile="tiny")
    head_cfg = cfg.head_config()
    assert isinstance(head_cfg, UMTConfig) and head_cfg.esd is False and head_cfg.no_gate is True
    assert cfg.head["esd_weight"] == 0.5  # defaults recorded in config.yaml


def test_ffn_follows_the_encoder_unless_set():
    from transformers import BertConfig, BertModel

    from mner.train.config import make_train_config
    from mner.train.data import TagSet
    from mner.train.trainer import build_model

    enc = BertModel(BertConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=48, vocab_size=50), add_pooling_layer=False)
    dims = {"resnet/grid": DV, "resnet/pooled": DV}

    def ffn(model, **over):
        cfg = make_train_config({"model": model, "profile": "tiny", **over})
        return build_model(cfg, 1, enc, TagSet("bio2"), dims).head

    assert ffn("umt").text_layer.ffn[0].out_features == 48  # UMT's layers: the BERT config's
    assert ffn("umt", head={"ffn_dim": 40}).text_layer.ffn[0].out_features == 40
    assert ffn("maf").ci.ffn[0].out_features == 4 * D  # MAF's own FFN keeps its 4 D
    assert make_head().text_layer.ffn[0].out_features == 4 * D  # no encoder: 4 D


def test_shared_output_module_keeps_umts_outputs_for_a_fixed_seed():
    """Moving UMT's modules into layers.UMTOutputModule changed no number: with one
    visual projection (the former layout) a fixed seed gives the former outputs."""
    cases = [
        ({}, 4.87841, 1070.5459, [0.925459, 0.465874, 0.327845], 2.116243, -16.43663),
        ({"esd_decoder": "softmax"}, 4.87841, 1070.5459, [0.925459, 0.465874, 0.327845], 0.656495, -16.43663),
        ({"text_layer": False, "no_gate": True}, -2e-05, 1437.52759, [1.101725, -0.626526, -0.126447],
         1.802039, 4.98542),
    ]
    for cfg, total, absolute, first, esd, prior in cases:
        head = make_head(seed=5, visual_projections=1, **cfg).eval()
        with torch.no_grad():
            out = head(make_batch(seed=1))
        assert out.hidden.sum().item() == pytest.approx(total, abs=1e-3), cfg
        assert out.hidden.abs().sum().item() == pytest.approx(absolute, rel=1e-5), cfg
        assert out.hidden[0, 1, :3].tolist() == pytest.approx(first, abs=1e-5), cfg
        assert out.aux_losses["esd"].item() == pytest.approx(esd, rel=1e-5), cfg
        assert out.emission_prior.sum().item() == pytest.approx(prior, abs=1e-3), cfg


def test_two_visual_projections_as_the_released_code():
    """vismap2text feeds the words-attend-to-regions path (Q), vismap2text_v2 the
    regions-attend-to-words path (P); one projection is a switch."""
    head = make_head().eval()
    inter = head.interaction
    assert inter.visual_proj_v2 is not None
    assert inter.visual_proj_v2.weight.shape == inter.visual_proj.weight.shape
    assert make_head(visual_projections=1).interaction.visual_proj_v2 is None
    batch = make_batch()
    H = head.text_layer(batch.hidden, batch.hidden, batch.token_mask)
    grid = batch.visual["resnet/grid"]
    with torch.no_grad():
        ref = inter(H, batch.token_mask, grid, batch.image_mask)
        inter.visual_proj_v2.weight.add_(0.5)  # only P (hence A and the gate) may move
        moved = inter(H, batch.token_mask, grid, batch.image_mask)
    D_ = H.shape[-1]
    assert not torch.allclose(ref.hidden[..., :D_], moved.hidden[..., :D_], atol=1e-4)  # A
    with torch.no_grad():
        Q = inter.txt2img_visual(H, inter.visual_proj(grid), None)
    assert torch.isfinite(Q).all()
    with pytest.raises(ValueError, match="visual_projections"):
        UMTConfig(visual_projections=3)


@pytest.mark.parametrize("switch", [{}, {"no_gate": True}, {"no_image_aware": True}, {"no_word_aware": True},
                                    {"text_layer": False}, {"visual_projections": 1}])
def test_every_parameter_of_each_layout_is_trained(switch):
    """No dead weights: with two projections each feeds its own path, and a layout with
    one path keeps one projection (an unused one would also break DDP)."""
    head = make_head(**switch).train()
    out = head(make_batch())
    (out.hidden.pow(2).mean() + out.aux_losses["esd"] + out.emission_prior.pow(2).mean()).backward()
    dead = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
