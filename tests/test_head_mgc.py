"""The MGC head (mner/train/heads/mgc.py) on synthetic, seeded tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mner.config import build
from mner.errors import CacheError, ConfigError
from mner.train.heads import HeadInput, get_head
from mner.train.heads.layers import span_mean
from mner.train.heads.mgc import MGCConfig, MGCHead
from mner.train.losses import info_nce

D, DC, B, T = 24, 16, 5, 9
CL_KD = {"kd_global", "kd_entity", "contrastive_global", "contrastive_entity"}
ALL_LOSSES = CL_KD | {"esd"}  # UMT's span detection loss of the full UMT output module
MISSING = 2  # the row whose image could not be read


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_head(seed: int = 0, dim: int = D, **cfg) -> MGCHead:
    torch.manual_seed(seed)
    return MGCHead(MGCConfig(**cfg), dim, {"clip/image_embed": DC})


def make_batch(seed: int = 0, dim: int = D) -> HeadInput:
    """Rows of lengths 9, 7, 9, 8, 9 with one to two entities each; row 2 has no image."""
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 7, 9, 8, 9]
    token_mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, n in enumerate(lengths):
        token_mask[b, :n] = True
        # A generator of its own, so the other tensors stay as they were before labels.
        labels[b, 1 : n - 1] = torch.randint(0, 3, (n - 2,), generator=torch.Generator().manual_seed(b))
    spans = torch.tensor([[[1, 3], [4, 5]], [[2, 4], [0, 0]], [[1, 2], [3, 6]],
                          [[5, 7], [1, 2]], [[6, 8], [2, 3]]])
    entity_mask = torch.tensor([[True, True], [True, False], [True, True],
                                [True, True], [True, False]])
    image = torch.randn(B, DC, generator=g)
    image_mask = torch.ones(B, dtype=torch.bool)
    image_mask[MISSING] = False
    image[MISSING] = 0.0
    teacher_entities = torch.randn(B, 2, DC, generator=g) * entity_mask.unsqueeze(-1)
    return HeadInput(
        hidden=torch.randn(B, T, dim, generator=g),
        token_mask=token_mask,
        visual={"clip/image_embed": image},
        image_mask=image_mask,
        labels=labels,
        label_names=("O", "B-PER", "I-PER"),
        entity_spans=spans,
        entity_mask=entity_mask,
        text_teacher={"sentence": torch.randn(B, DC, generator=g), "entities": teacher_entities},
    )


def prediction_batch(batch: HeadInput) -> HeadInput:
    """What the trainer passes at prediction time: no labels, spans or teacher."""
    return HeadInput(hidden=batch.hidden, token_mask=batch.token_mask, visual=batch.visual,
                     image_mask=batch.image_mask, label_names=batch.label_names)


def test_registered_with_shapes_losses_and_diagnostics():
    assert get_head("mgc") is MGCHead
    assert MGCHead.needs == ("clip/image_embed",) and MGCHead.needs_text_teacher
    assert MGCHead.required_features(MGCConfig()) == ("clip/image_embed",)
    head = make_head().eval()
    out = head(make_batch())
    assert head.out_dim == 2 * D and out.hidden.shape == (B, T, 2 * D)
    assert set(out.aux_losses) == ALL_LOSSES
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in out.aux_losses.values())
    sim = out.diagnostics["mgc_image_text_sim"]
    assert sim.shape == (B,) and (sim.abs() <= 1).all() and sim[MISSING] == 0
    gate = out.diagnostics["mgc_gate"]
    assert gate.shape == (B,) and ((gate > 0) & (gate < 1)).all()


def test_prediction_time_skips_losses_but_gives_the_same_output():
    head = make_head().eval()
    batch = make_batch()
    with torch.no_grad():
        train_out = head(batch)
        pred_out = head(prediction_batch(batch))
    assert pred_out.aux_losses == {}
    assert torch.equal(train_out.hidden, pred_out.hidden)
    assert torch.equal(train_out.diagnostics["mgc_image_text_sim"],
                       pred_out.diagnostics["mgc_image_text_sim"])


def test_padding_tokens_do_not_change_outputs_or_losses():
    head = make_head().eval()
    short = make_batch()
    extra = 4
    long = make_batch()
    long.hidden = torch.cat([short.hidden, torch.full((B, extra, D), 30.0)], dim=1)
    long.token_mask = torch.cat([short.token_mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    long.labels = torch.cat([short.labels, torch.full((B, extra), -100)], dim=1)
    with torch.no_grad():
        a, b = head(short), head(long)
    m = short.token_mask
    assert torch.allclose(a.hidden[m], b.hidden[:, :T][m], atol=1e-5)
    for k in ALL_LOSSES:
        assert a.aux_losses[k].item() == pytest.approx(b.aux_losses[k].item(), rel=1e-5), k


def test_missing_image_is_ignored_and_left_out_of_contrastive_losses():
    head = make_head().eval()
    batch = make_batch()
    with torch.no_grad():
        ref = head(batch)
        batch.visual["clip/image_embed"][MISSING] = torch.randn(DC) * 100  # garbage
        again = head(batch)
        assert torch.equal(ref.hidden, again.hidden)
        for k in ALL_LOSSES:
            assert torch.equal(ref.aux_losses[k], again.aux_losses[k]), k
        # Dropping the row entirely leaves the contrastive losses unchanged.
        keep = torch.arange(B) != MISSING
        sub = make_batch()
        for name in ("hidden", "token_mask", "image_mask", "labels", "entity_spans", "entity_mask"):
            setattr(sub, name, getattr(sub, name)[keep])
        sub.visual = {"clip/image_embed": sub.visual["clip/image_embed"][keep]}
        sub.text_teacher = {k: v[keep] for k, v in sub.text_teacher.items()}
        dropped = head(sub)
    for k in ("contrastive_global", "contrastive_entity"):
        assert ref.aux_losses[k].item() == pytest.approx(dropped.aux_losses[k].item(), rel=1e-5)


def test_losses_follow_the_equations_with_an_identity_mapping():
    # With D = Dc and E(.) the identity, u_gl = h_[CLS] and u_e = the span means.
    head = make_head(dim=DC, kd_weight=2.0, cl_weight=0.5).eval()
    with torch.no_grad():
        head.joint.weight.copy_(torch.eye(DC))
        head.joint.bias.zero_()
    batch = make_batch(dim=DC)
    g = batch.visual["clip/image_embed"]
    # Make entity 1 of rows 0, 2 and 3 the one most similar to the image (eq. 11).
    for b in (0, 2, 3):
        s, e = batch.entity_spans[b, 1].tolist()
        batch.hidden[b, s:e] = g[b] + 0.1 * batch.hidden[b, s:e]
    with torch.no_grad():
        out = head(batch)
    H, t = batch.hidden, batch.text_teacher
    kd_g = (t["sentence"] - H[:, 0]).norm(dim=-1).sum()  # eq. 7 (sum over B)
    u_e = span_mean(H, batch.entity_spans, batch.entity_mask)
    dist = (t["entities"] - u_e).norm(dim=-1)
    kd_e = dist[batch.entity_mask].sum()  # eq. 8 (sum over the real entities)
    assert out.aux_losses["kd_global"].item() == pytest.approx(2.0 * kd_g.item(), rel=1e-4)
    assert out.aux_losses["kd_entity"].item() == pytest.approx(2.0 * kd_e.item(), rel=1e-4)
    valid = batch.image_mask
    cg = info_nce(g, H[:, 0], 0.05, direction="a2b", valid=valid)  # eqs. 9-10
    assert out.aux_losses["contrastive_global"].item() == pytest.approx(0.5 * cg.item(), rel=1e-4)
    best = torch.tensor([1, 0, 0, 1, 0])  # rows 1 and 4 have a single entity
    sims = F.cosine_similarity(g.unsqueeze(1), u_e, dim=-1)
    assert sims[0, 1] > sims[0, 0] and sims[3, 1] > sims[3, 0]
    ce = info_nce(g, u_e[torch.arange(B), best], 0.05, direction="a2b", valid=valid)
    assert out.aux_losses["contrastive_entity"].item() == pytest.approx(0.5 * ce.item(), rel=1e-4)
    wrong = info_nce(g, u_e[:, 0], 0.05, direction="a2b", valid=valid)
    assert wrong.item() != pytest.approx(ce.item(), rel=1e-2)  # the selection matters


def test_gradients_reach_text_joint_and_visual_parameters():
    head = make_head().train()
    batch = make_batch()
    batch.hidden.requires_grad_(True)
    out = head(batch)
    (out.hidden.pow(2).mean() + sum(out.aux_losses.values())).backward()
    assert batch.hidden.grad.abs().sum() > 0
    params = dict(head.named_parameters())
    for name in ("joint.weight", "interaction.visual_proj.weight", "interaction.no_image",
                 "interaction.img2txt.attn.in_proj_weight", "interaction.gate.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_every_auxiliary_loss_falls_when_overfitting_one_batch():
    head = make_head().train()
    batch = make_batch()
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    first = last = None
    for _ in range(40):
        losses = head(batch).aux_losses
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        first = first or {k: v.item() for k, v in losses.items()}
        last = {k: v.item() for k, v in losses.items()}
    for k in ALL_LOSSES:
        assert last[k] < 0.5 * first[k], (k, first[k], last[k])


def _names(head) -> set[str]:
    return {n for n, _ in head.named_parameters()}


def test_kd_and_contrastive_switches_remove_their_losses():
    full = _names(make_head())
    batch = make_batch()
    for switch, gone in (("no_kd", {"kd_global", "kd_entity"}),
                         ("no_cl", {"contrastive_global", "contrastive_entity"})):
        head = make_head(**{switch: True}).eval()
        # E(.) is shared by both losses, so one switch alone removes no parameter.
        assert _names(head) == full
        assert set(head(batch).aux_losses) == ALL_LOSSES - gone
    both = make_head(no_kd=True, no_cl=True).eval()
    assert full - _names(both) == {"joint.weight", "joint.bias"}
    out = both(batch)
    assert set(out.aux_losses) == {"esd"} and "mgc_image_text_sim" not in out.diagnostics


def test_no_visual_removes_every_vision_module():
    """-Visual. removes the interaction module, E(.) and with it the contrastive losses
    and the CLIP-teacher distillation; UMT's text-only parts (text layer, ESD) stay."""
    cfg = MGCConfig(no_visual=True)
    assert MGCHead.required_features(cfg) == ()
    full = _names(make_head())
    torch.manual_seed(0)
    head = MGCHead(cfg, D, {}).eval()  # no feature dims at all: nothing visual is built
    gone = {n for n in full if n.startswith(("interaction.", "joint."))}
    assert gone and full - _names(head) == gone
    assert any(n.startswith("text_layer.") for n in _names(head))
    assert any(n.startswith("esd_layer.") for n in _names(head))
    batch = make_batch()
    batch.visual = {}
    out = head(batch)
    assert head.out_dim == D
    torch.testing.assert_close(out.hidden, head.text_layer(batch.hidden, batch.hidden, batch.token_mask))
    assert set(out.aux_losses) == {"esd"}  # no kd_*, no contrastive_*
    assert out.diagnostics == {}
    # The reduced output module under -Visual. is BERT alone (plus no loss).
    torch.manual_seed(0)
    reduced = MGCHead(MGCConfig(no_visual=True, output_module="interaction"), D, {}).eval()
    assert _names(reduced) == set() and torch.equal(reduced(batch).hidden, batch.hidden)


def test_config_validation_and_teacher_mismatch():
    assert build(MGCConfig, {"no_kd": True}, where="train.head").no_kd
    with pytest.raises(ConfigError, match="temperature"):
        build(MGCConfig, {"temperature": 0}, where="train.head")
    with pytest.raises(ConfigError, match="unknown key"):
        build(MGCConfig, {"no_cm": True}, where="train.head")
    with pytest.raises(ConfigError, match="differs"):
        MGCHead(MGCConfig(joint_dim=DC + 1), D, {"clip/image_embed": DC})
    batch = make_batch()
    batch.text_teacher["sentence"] = torch.randn(B, DC + 2)
    with pytest.raises(CacheError, match="one CLIP model"):
        make_head()(batch)


def test_ablations_are_set_from_the_command_line():
    from mner.train.config import make_train_config

    cfg = make_train_config({}, ["head.no_visual=true", "no_kd=true"], model="mgc", profile="tiny")
    head_cfg = cfg.head_config()
    assert head_cfg.no_visual and head_cfg.no_kd and not head_cfg.no_cl
    assert cfg.head_class().required_features(head_cfg) == ()
    assert cfg.head["temperature"] == 0.05


def test_output_module_is_the_full_umt_and_the_reduced_variant_is_the_old_head():
    """MGC is "based on UMT": its output module has exactly UMT's modules (text layer,
    two visual projections, interaction, span detection); ``interaction`` is the
    reduced variant, which reproduces the former head for a fixed seed."""
    from mner.train.heads.umt import UMTConfig, UMTHead

    head = make_head()
    torch.manual_seed(0)
    umt = UMTHead(UMTConfig(ffn_dim=4 * D), D, {"resnet/grid": DC})
    assert _names(head) - {"joint.weight", "joint.bias"} == _names(umt)
    assert head.emission_dropout is False and umt.emission_dropout is False
    reduced = make_head(output_module="interaction")
    assert reduced.emission_dropout is True
    assert {n.split(".")[0] for n in _names(reduced)} == {"joint", "interaction"}
    assert not any(n.startswith("interaction.visual_proj_v2") for n in _names(reduced))
    # Numbers of the head before the full UMT output module (seed 5, batch seed 1).
    old = make_head(seed=5, output_module="interaction", kd_reduction="mean").eval()
    with torch.no_grad():
        out = old(make_batch(seed=1))
    assert out.hidden.sum().item() == pytest.approx(3.39919, abs=1e-3)
    assert out.hidden.abs().sum().item() == pytest.approx(1306.01819, rel=1e-5)
    assert out.hidden[0, 1, :3].tolist() == pytest.approx([-1.241657, 1.420388, -0.803621], abs=1e-5)
    assert out.aux_losses["kd_global"].item() == pytest.approx(4.845465, rel=1e-5)
    assert out.aux_losses["contrastive_global"].item() == pytest.approx(8.988201, rel=1e-5)


def test_full_umt_output_feeds_the_emissions_with_the_converted_span_scores():
    head = make_head().eval()
    batch = make_batch()
    with torch.no_grad():
        out = head(batch)
        x = batch.hidden  # eval: the input dropout is the identity
        logits = head.esd_classifier(head.esd_layer(x, x, batch.token_mask))
    from mner.train.heads.layers import conversion_matrix

    torch.testing.assert_close(out.emission_prior, logits @ conversion_matrix(batch.label_names))
    assert out.prior_weight == 0.5 and out.aux_losses["esd"] > 0
    # The interaction reads the extra text layer's states, not the encoder's.
    with torch.no_grad():
        H = head.text_layer(x, x, batch.token_mask)
        g = batch.visual["clip/image_embed"].unsqueeze(1)
        direct = head.interaction(H, batch.token_mask, g, batch.image_mask).hidden
    torch.testing.assert_close(out.hidden, direct)


def _double(batch: HeadInput) -> HeadInput:
    """The batch twice over (B -> 2B)."""
    cat = lambda x: torch.cat([x, x])  # noqa: E731
    return HeadInput(
        hidden=cat(batch.hidden), token_mask=cat(batch.token_mask),
        visual={k: cat(v) for k, v in batch.visual.items()}, image_mask=cat(batch.image_mask),
        labels=cat(batch.labels), label_names=batch.label_names,
        entity_spans=cat(batch.entity_spans), entity_mask=cat(batch.entity_mask),
        text_teacher={k: cat(v) for k, v in batch.text_teacher.items()},
    )


def test_reductions_are_the_papers_sums_for_kd_crf_and_esd():
    """Eqs. 7, 8 and 19 sum over the batch (doubling the batch doubles them); eq. 10 is
    a 1/B mean; ``kd_reduction=mean`` gives the former averages."""
    assert MGCHead.crf_reduction == "sum"
    head = make_head(no_cl=True).eval()
    batch = make_batch()
    with torch.no_grad():
        one, two = head(batch).aux_losses, head(_double(batch)).aux_losses
    for k in ("kd_global", "kd_entity", "esd"):
        assert two[k].item() == pytest.approx(2 * one[k].item(), rel=1e-4), k
    mean = make_head(no_cl=True, kd_reduction="mean").eval()
    with torch.no_grad():
        m1, m2 = mean(batch).aux_losses, mean(_double(batch)).aux_losses
    assert m2["kd_global"].item() == pytest.approx(m1["kd_global"].item(), rel=1e-4)
    assert one["kd_global"].item() == pytest.approx(B * m1["kd_global"].item(), rel=1e-4)
