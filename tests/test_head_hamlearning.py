"""HamLearning head (mner/train/heads/hamlearning.py) on small synthetic batches.

HamLearning has no auxiliary loss (the paper trains with the CRF likelihood only), so
instead of "aux losses fall" the learning tests overfit tags that only the image can
explain: once through the object labels (semantic level) and once through the relation
graph alone (spatial level, ``no_vit``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mner.config import build
from mner.errors import ConfigError
from mner.extract.relations import RELATION_NAMES
from mner.train.heads import HeadInput, get_head
from mner.train.heads.hamlearning import HamLearning, HamLearningConfig

DT, DV, DO, C, R = 32, 24, 20, 7, 12  # text, ResNet, object dims; object classes; relation labels
DIMS = {"resnet/pooled": DV, "objects/features": DO}


def small_cfg(**kw) -> HamLearningConfig:
    base = dict(num_object_classes=C, heads=4, semantic_layers=2, dropout=0.1)
    base.update(kw)
    return HamLearningConfig(**base)


def make_head(seed: int = 0, **kw) -> HamLearning:
    torch.manual_seed(seed)
    return HamLearning(small_cfg(**kw), DT, DIMS)


def make_batch(B=4, T=7, n_obj=3, seed=0, n_tokens=None, n_objects=None, image_ok=None) -> HeadInput:
    """Random batch; ``n_tokens`` / ``n_objects`` (B,) give the real counts, the rest is padding."""
    O = n_obj  # noqa: E741 (O is the object count in shape comments)
    g = torch.Generator().manual_seed(seed)
    n_tokens = torch.full((B,), T) if n_tokens is None else torch.as_tensor(n_tokens)
    n_objects = torch.full((B,), O) if n_objects is None else torch.as_tensor(n_objects)
    image_ok = torch.ones(B, dtype=torch.bool) if image_ok is None else torch.as_tensor(image_ok)
    token_mask = torch.arange(T).unsqueeze(0) < n_tokens.unsqueeze(1)
    obj_mask = (torch.arange(O).unsqueeze(0) < n_objects.unsqueeze(1)) & image_ok.unsqueeze(1)
    node_mask = torch.cat([image_ok.unsqueeze(1), obj_mask], dim=1)
    x1y1 = torch.rand(B, O, 2, generator=g) * 0.5
    boxes = torch.cat([x1y1, x1y1 + 0.1 + torch.rand(B, O, 2, generator=g) * 0.4], dim=-1)
    rel = torch.randint(0, R, (B, O + 1, O + 1), generator=g)
    rel[:, 0, 1:] = 1  # the [IMG] node contains every object ("inside")
    rel = (rel * (node_mask.unsqueeze(2) & node_mask.unsqueeze(1))).to(torch.int8)
    return HeadInput(
        hidden=torch.randn(B, T, DT, generator=g),
        token_mask=token_mask,
        visual={
            "resnet/pooled": torch.randn(B, DV, generator=g) * image_ok.unsqueeze(1),
            "objects/features": torch.randn(B, O, DO, generator=g) * obj_mask.unsqueeze(-1),
            "objects/boxes_norm": boxes * obj_mask.unsqueeze(-1),
            "objects/labels": torch.randint(0, C, (B, O), generator=g, dtype=torch.int32) * obj_mask,
            "relations/labels": rel,
        },
        visual_masks={"objects/features": obj_mask, "relations/labels": node_mask},
        image_mask=image_ok,
    )


def test_registered_with_paper_defaults():
    cls = get_head("hamlearning")
    assert cls is HamLearning
    cfg = build(cls.Config, {}, where="test")
    assert (cfg.semantic_layers, cfg.rgcn_layers, cfg.rounds, cfg.ffnn_layers) == (4, 2, 3, 2)
    assert (cfg.heads, cfg.dropout, cfg.num_object_classes, cfg.num_relations) == (None, 0.1, 91, 12)
    assert not (cfg.no_rgcn or cfg.no_vit or cfg.no_rm)
    assert cfg.num_relations == len(RELATION_NAMES)  # the extractor's label set
    # Tiny profile: text_dim 128 -> hidden 128, 12 heads do not divide it so 8 are used.
    head = cls(cfg, 128, {"resnet/pooled": 512, "objects/features": 256})
    assert head.out_dim == 128
    assert head.rounds[0].text.attn.num_heads == 8
    assert head.rgcn[0].weight.shape == (2 * (12 - 1), 128 + 4, 128 + 4)


def test_output_shapes_and_diagnostics():
    head = make_head().eval()
    batch = make_batch(B=5, T=6, n_obj=4, image_ok=[True, True, False, True, True])
    out = head(batch)
    assert out.hidden.shape == (5, 6, DT)
    assert out.aux_losses == {}
    assert set(out.diagnostics) == {"hamlearning_relevance", "hamlearning_relevance_semantic",
                                    "hamlearning_relevance_spatial", "hamlearning_semantic_gate"}
    for value in out.diagnostics.values():
        assert value.shape == (5,)
        assert torch.isfinite(value).all()
    rel = out.diagnostics["hamlearning_relevance"]
    assert (rel.abs() < 1).all()  # tanh, eq. 9
    expected = (out.diagnostics["hamlearning_relevance_semantic"] + out.diagnostics["hamlearning_relevance_spatial"]) / 2
    torch.testing.assert_close(rel, expected)
    gate = out.diagnostics["hamlearning_semantic_gate"]
    assert ((gate > 0) & (gate < 1)).all()


def test_hidden_dim_and_rounds_configurable():
    head = make_head(hidden_dim=16, rounds=5).eval()
    assert head.out_dim == 16
    assert head(make_batch()).hidden.shape == (4, 7, 16)
    assert len(head.rounds) == 5
    # The last round only updates the text: its visual outputs could not reach H.
    assert all(r.semantic is not None and r.spatial is not None for r in head.rounds[:4])
    assert head.rounds[4].semantic is None and head.rounds[4].spatial is None
    one = make_head(rounds=1)
    assert not any(".semantic." in n or ".spatial." in n for n, _ in one.rounds.named_parameters())


def _pad(batch: HeadInput, extra_t: int, extra_o: int, seed: int) -> HeadInput:
    """The same batch with junk-filled padding tokens and padding objects appended."""
    g = torch.Generator().manual_seed(seed)
    B, T, _ = batch.hidden.shape
    O = batch.visual["objects/features"].shape[1]  # noqa: E741
    v = batch.visual
    rel = torch.randint(0, R, (B, O + 1 + extra_o, O + 1 + extra_o), generator=g, dtype=torch.int8)
    rel[:, : O + 1, : O + 1] = v["relations/labels"]
    junk_labels = torch.randint(50, 99, (B, extra_o), generator=g, dtype=torch.int32)  # out of range: must be ignored
    obj_mask = torch.cat([batch.visual_masks["objects/features"], torch.zeros(B, extra_o, dtype=torch.bool)], 1)
    return HeadInput(
        hidden=torch.cat([batch.hidden, torch.randn(B, extra_t, DT, generator=g) * 5], 1),
        token_mask=torch.cat([batch.token_mask, torch.zeros(B, extra_t, dtype=torch.bool)], 1),
        visual={
            "resnet/pooled": v["resnet/pooled"],
            "objects/features": torch.cat([v["objects/features"], torch.randn(B, extra_o, DO, generator=g) * 5], 1),
            "objects/boxes_norm": torch.cat([v["objects/boxes_norm"], torch.rand(B, extra_o, 4, generator=g)], 1),
            "objects/labels": torch.cat([v["objects/labels"], junk_labels], 1),
            "relations/labels": rel,
        },
        visual_masks={"objects/features": obj_mask,
                      "relations/labels": torch.cat([batch.visual_masks["relations/labels"],
                                                     torch.zeros(B, extra_o, dtype=torch.bool)], 1)},
        image_mask=batch.image_mask,
    )


@pytest.mark.parametrize("switch", [{}, {"no_rgcn": True}, {"no_vit": True}, {"no_rm": True}])
def test_padding_tokens_and_objects_do_not_change_real_outputs(switch):
    head = make_head(**switch).eval()
    batch = make_batch(B=4, T=6, n_obj=3, n_tokens=[6, 4, 5, 2], n_objects=[3, 1, 0, 2],
                       image_ok=[True, True, True, False])
    with torch.no_grad():
        ref = head(batch)
        padded = head(_pad(batch, extra_t=3, extra_o=4, seed=1))
    real = batch.token_mask
    torch.testing.assert_close(padded.hidden[:, :6][real], ref.hidden[real], atol=1e-5, rtol=1e-4)
    for key, value in ref.diagnostics.items():
        torch.testing.assert_close(padded.diagnostics[key], value, atol=1e-5, rtol=1e-4)


def test_missing_image_rows_ignore_their_visual_tensors():
    head = make_head().eval()
    batch = make_batch(B=3, image_ok=[True, False, True])
    with torch.no_grad():
        ref = head(batch).hidden
        g = torch.Generator().manual_seed(5)
        for t in batch.visual.values():  # junk in the missing row, where the cache has zeros
            if t.is_floating_point():
                t[1] = torch.rand(t[1].shape, generator=g) * 3
            else:
                t[1] = torch.randint(0, 5, t[1].shape, generator=g).to(t.dtype)
        junk = head(batch).hidden
        torch.testing.assert_close(junk, ref)
        # ... yet the missing row is not treated like an image: it differs from a row
        # whose image is present but all zeros.
        batch.image_mask[1] = True
        batch.visual_masks["objects/features"][1] = True
        for t in batch.visual.values():
            t[1] = 0
        assert (head(batch).hidden[1] - ref[1]).abs().max() > 1e-3


@pytest.mark.parametrize("switch", [{}, {"no_rgcn": True}, {"no_vit": True}, {"no_rm": True},
                                    {"rgcn_bases": 3}, {"hidden_dim": 16}])
def test_gradients_reach_text_and_every_parameter(switch):
    head = make_head(**switch).train()
    batch = make_batch(B=4, n_objects=[3, 2, 1, 3], image_ok=[True, True, False, True])
    batch.hidden.requires_grad_(True)
    head(batch).hidden.pow(2).mean().backward()
    assert batch.hidden.grad is not None and batch.hidden.grad.abs().sum() > 0
    dead = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []  # every built parameter (visual ones included) is used


SWITCH_REMOVES = {
    # w/o RGCN: the whole spatial level and the eq. 13 gate mixing it in.
    "no_rgcn": ("rgcn.", "relevance_spatial.", "fuse_spatial.", "spatial_norm.", ".gate_", ".spatial."),
    # w/o ViT: the whole semantic level and the eq. 13 gate.
    "no_vit": ("semantic_encoder.", "relevance_semantic.", "fuse_semantic.", ".gate_", ".semantic."),
    # w/o RM: eqs. 8-9 at both levels.
    "no_rm": ("relevance_semantic.", "relevance_spatial."),
}


@pytest.mark.parametrize("switch", sorted(SWITCH_REMOVES))
def test_each_ablation_switch_removes_exactly_its_component(switch):
    full = {n for n, _ in make_head().named_parameters()}
    ablated = {n for n, _ in make_head(**{switch: True}).named_parameters()}
    removed = full - ablated
    assert ablated < full  # nothing new is created
    assert removed == {n for n in full if any(p in n for p in SWITCH_REMOVES[switch])}
    assert removed  # the component existed
    with torch.no_grad():
        diag = set(make_head(**{switch: True}).eval()(make_batch()).diagnostics)
    expected = {
        "no_rgcn": {"hamlearning_relevance", "hamlearning_relevance_semantic"},
        "no_vit": {"hamlearning_relevance", "hamlearning_relevance_spatial"},
        "no_rm": {"hamlearning_semantic_gate"},
    }[switch]
    assert diag == expected


def test_required_features_follow_the_switches():
    assert set(HamLearning.required_features(small_cfg())) == {
        "resnet/pooled", "objects/features", "objects/boxes_norm", "objects/labels", "relations/labels"}
    assert HamLearning.required_features(small_cfg(no_rgcn=True)) == (
        "resnet/pooled", "objects/features", "objects/labels")
    assert HamLearning.required_features(small_cfg(no_vit=True)) == HamLearning.needs
    # Without the R-GCN the head runs on a batch that has no boxes and no graph.
    batch = make_batch()
    del batch.visual["objects/boxes_norm"], batch.visual["relations/labels"]
    assert make_head(no_rgcn=True).eval()(batch).hidden.shape == (4, 7, DT)


@pytest.mark.parametrize("data, message", [
    ({"no_rgcn": True, "no_vit": True}, "no visual encoder"),
    ({"rounds": 0}, "rounds must be at least 1"),
    ({"num_relations": 1}, "num_relations"),
    ({"dropout": 1.5}, "dropout"),
    ({"rgcn_bases": 0}, "rgcn_bases"),
    ({"no_rm": "yes"}, "no_rm"),
    ({"l": 3}, "unknown key l"),
])
def test_bad_config_is_a_one_line_config_error(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        build(HamLearningConfig, data, where="params.yaml:train.head")
    assert "\n" not in str(info.value)


def test_ids_beyond_the_tables_name_the_field_to_change():
    head = make_head().eval()
    batch = make_batch()
    batch.visual["objects/labels"][0, 1] = C + 5
    with pytest.raises(ConfigError, match=rf"num_object_classes={C + 6}"):
        head(batch)
    batch = make_batch()
    batch.visual["relations/labels"][2, 1, 2] = R + 1
    with pytest.raises(ConfigError, match=rf"num_relations={R + 2}"):
        head(batch)
    with pytest.raises(ConfigError, match="objects/features"):
        HamLearning(small_cfg(), DT, {"resnet/pooled": DV})


def _same_image_everywhere(batch: HeadInput) -> None:
    """Copy row 0's visual tensors to every row, so only what a test changes differs."""
    for t in batch.visual.values():
        t[:] = t[0]


def _fit(head: HamLearning, batch: HeadInput, target: torch.Tensor, steps: int, n_tags: int) -> tuple[float, float]:
    """Train head + a linear tagger on one batch; return (first loss, last accuracy at tagged tokens)."""
    torch.manual_seed(0)
    tagger = nn.Linear(head.out_dim, n_tags)
    opt = torch.optim.Adam([*head.parameters(), *tagger.parameters()], lr=2e-3)
    where = target >= 0
    first = None
    head.train()
    for _ in range(steps):
        logits = tagger(head(batch).hidden)
        loss = nn.functional.cross_entropy(logits[where], target[where])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        acc = (tagger(head(batch).hidden)[where].argmax(-1) == target[where]).float().mean().item()
    return first, acc


def test_learns_tags_that_only_the_object_classes_explain():
    # Every tweet has the same text; the tag of token 1 is the class of the
    # image's first object (0-3), which text alone cannot know (chance = 25%).
    torch.manual_seed(1)
    B, T = 16, 4
    batch = make_batch(B=B, T=T, n_obj=3, seed=3)
    batch.hidden[:] = batch.hidden[0]  # one tweet text for all
    _same_image_everywhere(batch)
    cls = torch.arange(B) % 4
    batch.visual["objects/labels"][:, 0] = cls.to(torch.int32)
    target = torch.full((B, T), -100)
    target[:, 1] = cls
    first, acc = _fit(make_head(seed=1, no_rgcn=True), batch, target, steps=40, n_tags=4)
    assert first > 1.0  # about log 4 at the start
    assert acc >= 0.9


def test_rgcn_learns_from_the_relation_graph_alone():
    # Same token, same image except the graph: the tag says
    # whether the graph has an "overlap" (label 3) edge between objects 1 and 2. Only
    # the spatial level's relation-typed weights can see it (no_vit: no semantic level).
    torch.manual_seed(2)
    B, T = 16, 4
    batch = make_batch(B=B, T=T, n_obj=3, seed=4)
    batch.hidden[:] = batch.hidden[0]  # one tweet text for all
    _same_image_everywhere(batch)
    batch.visual["objects/labels"].zero_()
    overlap = torch.arange(B) % 2
    rel = batch.visual["relations/labels"]
    rel[:, 1:, 1:] = 0
    rel[:, 1, 2] = torch.where(overlap.bool(), 3, 5).to(torch.int8)
    target = torch.full((B, T), -100)
    target[:, 1] = overlap
    first, acc = _fit(make_head(seed=2, no_vit=True), batch, target, steps=40, n_tags=2)
    assert first > 0.5
    assert acc == 1.0


def test_spatial_level_is_layer_normalised_after_eq_10():
    """V^2 enters the interaction rounds normalised (``spatial_norm``); the switch off
    gives the text's bare eq. 10, whose scale follows the R-GCN's residual sums."""
    seen = {}

    def grab(module, args):
        seen["V2"] = args[2].detach()  # forward(H, V1, V2, token_mask, node_mask)

    batch = make_batch()
    for norm in (True, False):
        head = make_head(spatial_norm=norm).eval()
        assert (head.spatial_norm is not None) == norm
        handle = head.rounds[0].register_forward_pre_hook(grab)
        with torch.no_grad():
            head(batch)
        handle.remove()
        V2 = seen["V2"]
        torch.testing.assert_close(V2.mean(-1), torch.zeros(V2.shape[:2]), atol=1e-4, rtol=0) if norm else None
        std = V2.std(-1, unbiased=False)
        assert (torch.allclose(std, torch.ones_like(std), atol=1e-2)) == norm
    assert make_head(no_rgcn=True).spatial_norm is None
    assert HamLearning.crf_reduction == "sum"  # eq. 17
