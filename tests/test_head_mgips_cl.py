"""MGIPS-CL head (mner/train/heads/mgips_cl.py) on small synthetic batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mner.config import build
from mner.errors import CacheError, ConfigError
from mner.train.heads import get_head
from mner.train.heads.base import HeadInput
from mner.train.heads.mgips_cl import CROPS, LAYERS, MgipsClConfig, MgipsClHead

DT, DC = 32, 24  # text and CLIP widths, small; heads use heads=2
B, T = 8, 7


def make_head(seed: int = 0, **overrides) -> MgipsClHead:
    """A head on given encoder states: late fusion unless ``fusion`` says otherwise (the
    MGI, gate and contrastive parts are the same in both modes)."""
    torch.manual_seed(seed)
    cfg = MgipsClConfig(heads=2, **{"fusion": "late", **overrides})
    return MgipsClHead(cfg, DT, {CROPS: DC, LAYERS: DC})


def make_batch(seed: int = 1, batch: int = B, length: int = T) -> HeadInput:
    """Rows: varying sentence lengths; row 1 has no image (garbage in its crop rows, as a
    bug upstream might leave), row 2 an image with no crop, row 3 one crop, others 2-3."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, 5, 4, length, 3, 6, length, 5][:batch])
    token_mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    counts = torch.tensor([3, 3, 0, 1, 2, 3, 3, 2][:batch])
    crop_mask = torch.arange(3).unsqueeze(0) < counts.unsqueeze(1)
    image_mask = torch.ones(batch, dtype=torch.bool)
    image_mask[1] = False
    return HeadInput(
        hidden=torch.randn(batch, length, DT, generator=g),
        token_mask=token_mask,
        visual={CROPS: torch.randn(batch, 3, 17, DC, generator=g)},
        visual_masks={CROPS: crop_mask},
        image_mask=image_mask,
    )


def test_registered_with_paper_defaults():
    cls = get_head("mgips_cl")
    assert cls is MgipsClHead
    cfg = build(cls.Config, {}, where="test")
    assert (cfg.ips_k, cfg.interweave_layers, cfg.ips_weight, cfg.cl_weight) == (3, 1, 1.0, 1.0)
    assert cfg.fusion == "layerwise" and cfg.temperature == 0.07
    assert cls.required_features(cfg) == (CROPS, LAYERS)
    late = dataclasses.replace(cfg, fusion="late")
    assert cls.required_features(late) == (CROPS,)
    # text_dim // 64 heads: 12 at BERT-base's 768 as in the paper.
    head = cls(dataclasses.replace(cfg, encoder_layers=12), 768, {CROPS: 512, LAYERS: 512})
    assert head.heads == 12 and head.out_dim == 768
    assert cls(late, 200, {CROPS: 8}).heads == 2  # 200 // 64 = 3 does not divide 200
    with pytest.raises(ConfigError, match="heads"):
        cls(MgipsClConfig(heads=5, fusion="late"), 32, {CROPS: 8})


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"no_row": True, "no_column": True}, "no_mgi"),
        ({"ips_k": 0}, "ips_k"),
        ({"temperature": 0.0}, "temperature"),
        ({"no_rows": True}, "unknown key"),
    ],
)
def test_bad_config_is_a_config_error(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build(MgipsClConfig, data, where="params.yaml:train.head")


def test_output_shapes_losses_and_diagnostics():
    head = make_head().eval()
    out = head(make_batch())
    assert out.hidden.shape == (B, T, DT) and head.out_dim == DT
    assert torch.isfinite(out.hidden).all()
    assert set(out.aux_losses) == {"cl", "ips_cl"}
    for value in out.aux_losses.values():
        assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
    assert set(out.diagnostics) == {"mgips_gate", "mgips_relevance"}
    gate = out.diagnostics["mgips_gate"]
    assert gate.shape == (B,) and ((gate > 0) & (gate < 1)).all()
    rel = out.diagnostics["mgips_relevance"]
    assert rel.shape == (B,) and (rel.abs() <= 1 + 1e-6).all()


def test_padding_crops_and_missing_images_do_not_change_real_tokens():
    head = make_head().eval()
    base = make_batch()
    out = head(base)

    # Same batch with 4 extra padding positions, garbage in padded crops and in the
    # missing image's rows: real tokens' outputs and the losses must not move.
    pad = 4
    g = torch.Generator().manual_seed(7)
    hidden = torch.cat([base.hidden, 50 * torch.randn(B, pad, DT, generator=g)], dim=1)
    token_mask = torch.cat([base.token_mask, torch.zeros(B, pad, dtype=torch.bool)], dim=1)
    # also fill positions that were already padding in the base batch
    hidden[:, :T][~base.token_mask] = 50.0
    crops = base.visual[CROPS].clone()
    crops[~base.visual_masks[CROPS]] = 30.0  # padded crop slots
    crops[1] = -20.0  # the tweet without an image
    padded = dataclasses.replace(base, hidden=hidden, token_mask=token_mask, visual={CROPS: crops})
    out2 = head(padded)

    real = base.token_mask
    torch.testing.assert_close(out2.hidden[:, :T][real], out.hidden[real], atol=1e-5, rtol=1e-5)
    for name in out.aux_losses:
        torch.testing.assert_close(out2.aux_losses[name], out.aux_losses[name])
    for name in out.diagnostics:
        torch.testing.assert_close(out2.diagnostics[name], out.diagnostics[name])


def test_missing_image_reads_the_learned_no_image_embedding():
    head = make_head().eval()
    batch = make_batch()
    out = head(batch)
    with torch.no_grad():
        head.no_image.add_(1.0)
    moved = (head(batch).hidden - out.hidden).abs().amax(dim=(1, 2))
    assert moved[1] > 1e-3  # row 1 has no image: it sees no_image
    assert (moved[torch.arange(B) != 1] == 0).all()


def test_missing_images_and_cropless_images_leave_the_contrastive_losses():
    head = make_head().eval()
    batch = make_batch()
    out = head(batch)

    # Swapping the texts of the two excluded rows (1: no image, 2: no crop) changes
    # neither loss; swapping two valid rows' texts does.
    def swapped(i, j):
        hidden = batch.hidden.clone()
        hidden[[i, j]] = hidden[[j, i]]
        mask = batch.token_mask.clone()
        mask[[i, j]] = mask[[j, i]]
        return head(dataclasses.replace(batch, hidden=hidden, token_mask=mask)).aux_losses

    excluded = swapped(1, 2)
    kept = swapped(0, 5)
    for name in ("cl", "ips_cl"):
        torch.testing.assert_close(excluded[name], out.aux_losses[name])
    assert not torch.allclose(kept["cl"], out.aux_losses["cl"])


def test_implicit_positives_are_the_top_k_valid_images():
    head = make_head(ips_k=2)
    # Images on a circle; text i sits just past image i: its order is i, i+1, i-1, ...
    n = 5
    angles = torch.arange(n, dtype=torch.float) * 0.4
    v = torch.stack([angles.cos(), angles.sin()], dim=1)
    t = torch.stack([(angles + 0.15).cos(), (angles + 0.15).sin()], dim=1)
    valid = torch.tensor([True, True, True, False, True])
    pos = head._implicit_positives(t, v, valid)
    assert pos.sum(1).tolist() == [2] * n
    assert not pos[:, 3].any()
    assert pos[0].nonzero().flatten().tolist() == [0, 1]
    assert pos[2].nonzero().flatten().tolist() == [1, 2]  # 3 is invalid: i-1 instead
    # K is capped so one valid negative remains; fewer than two valid images: none.
    assert head._implicit_positives(t, v, torch.tensor([1, 1, 0, 0, 1]).bool()).sum(1).max() == 2
    head5 = make_head(ips_k=5)
    assert head5._implicit_positives(t, v, valid).sum(1).tolist() == [3] * n
    assert not head5._implicit_positives(t, v, torch.tensor([1, 0, 0, 0, 0]).bool()).any()


def test_gradients_reach_text_and_visual_sides():
    head = make_head().train()
    batch = make_batch()
    batch.hidden.requires_grad_(True)
    out = head(batch)
    (out.hidden.pow(2).mean() + sum(out.aux_losses.values())).backward()
    assert batch.hidden.grad is not None and batch.hidden.grad.abs().sum() > 0
    params = dict(head.named_parameters())
    for name in (
        "visual_embed.0.weight",
        "class_embed",
        "no_image",
        "image_layers.0.q.weight",
        "text_layers.0.k.weight",
        "align.in_proj_weight",
        "mge_image.m3",
        "mge_text.m4",
        "gate_pre.weight",
        "f_image.weight",
        "g_text.weight",
    ):
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_every_aux_loss_falls_when_overfitting_one_batch():
    head = make_head(dropout=0.0).train()
    batch = make_batch()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        losses = head(batch).aux_losses
        if first is None:
            first = {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    last = {k: v.item() for k, v in head(batch).aux_losses.items()}
    for name in ("cl", "ips_cl"):
        assert last[name] < 0.5 * first[name], (name, first[name], last[name])


def _names(head) -> set[str]:
    return {n for n, _ in head.named_parameters()}


@pytest.mark.parametrize(
    "switch, removed, losses, diagnostics",
    [
        ({"no_ips_cl": True}, set(), {"cl"}, {"mgips_gate", "mgips_relevance"}),
        ({"no_cl": True}, set(), {"ips_cl"}, {"mgips_gate", "mgips_relevance"}),
        (
            {"no_cl": True, "no_ips_cl": True},
            {"f_image.", "g_text."},
            set(),
            {"mgips_gate"},
        ),
        (
            {"no_mgi": True},
            {"align.", "mge_image.", "mge_text.", "gate_post.", "gate_pre."},
            {"cl", "ips_cl"},
            {"mgips_relevance"},
        ),
        ({"no_row": True}, {"mge_image.m3", "mge_text.m3"}, {"cl", "ips_cl"}, None),
        ({"no_column": True}, {"mge_image.m4", "mge_text.m4"}, {"cl", "ips_cl"}, None),
    ],
)
def test_each_switch_removes_exactly_its_component(switch, removed, losses, diagnostics):
    full = make_head()
    ablated = make_head(**switch).eval()
    gone = _names(full) - _names(ablated)
    assert _names(ablated) <= _names(full)
    assert {n for n in gone if not any(n.startswith(p) for p in removed)} == set()
    for prefix in removed:
        assert any(n.startswith(prefix) for n in gone), prefix
    out = ablated(make_batch())
    assert out.hidden.shape == (B, T, DT)
    assert set(out.aux_losses) == losses
    if diagnostics is not None:
        assert set(out.diagnostics) == diagnostics


def test_without_mgi_the_mutual_attention_text_stream_is_the_output():
    head = make_head(no_mgi=True).eval()
    batch = make_batch()
    with_image = head(batch).hidden
    # The text stream reads the crops (eqs. 2-4): changing a real crop moves it.
    crops = batch.visual[CROPS].clone()
    crops[0, 0] += 1.0
    moved = head(dataclasses.replace(batch, visual={CROPS: crops})).hidden
    assert (moved[0] - with_image[0]).abs().max() > 1e-4
    torch.testing.assert_close(moved[2:], with_image[2:])


def test_interweave_layers_share_excavators_and_deeper_stacks_run():
    one = make_head()
    three = make_head(interweave_layers=3, ma_layers=2)
    assert {n for n in _names(three) if "mge_" in n} == {n for n in _names(one) if "mge_" in n}
    assert any(n.startswith("text_layers.1.") for n in _names(three))
    out = three.eval()(make_batch())
    assert out.hidden.shape == (B, T, DT) and torch.isfinite(out.hidden).all()


def test_hidden_sizes_follow_the_config():
    head = make_head(mgi_dim=16, proj_dim=8)
    assert head.mge_image.lin1.out_features == 16
    assert head.f_image.out_features == 8
    assert head(make_batch()).hidden.shape == (B, T, DT)


def test_wrong_crop_layout_is_a_cache_error():
    head = make_head()
    batch = make_batch()
    bad = dataclasses.replace(batch, visual={CROPS: torch.zeros(B, 3, 50, DC)})
    with pytest.raises(CacheError, match="head.num_crops=3 -o head.crop_tokens=50"):
        head(bad)
