"""BFCL head (mner/train/heads/bfcl.py) on small synthetic batches."""

from __future__ import annotations

import pytest
import torch

from mner.config import build, parse_overrides
from mner.errors import ConfigError
from mner.train.heads import HeadInput, get_head
from mner.train.heads.bfcl import BfclConfig, BfclHead

D, DV, R = 32, 24, 49
DIMS = {"resnet/grid": DV}
# Small stacks keep the file fast; the structure is the same as the paper's L = 8.
SMALL = {"layers": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(lengths=(7, 5, 9, 3, 6, 8), pad_to=None, missing=(4,), seed=0, grad=False):
    """A seeded batch; row i has lengths[i] real tokens; rows in ``missing`` have no image."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    T = pad_to or max(lengths)
    hidden = torch.randn(B, max(lengths), D, generator=g)
    token_mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    # Padded positions hold arbitrary states (an encoder does not zero them).
    hidden = torch.cat([hidden, torch.randn(B, T - hidden.shape[1], D)], dim=1)
    hidden = torch.where(token_mask.unsqueeze(-1), hidden, torch.randn(B, T, D))
    grid = torch.randn(B, R, DV, generator=g).abs()
    image_mask = torch.ones(B, dtype=torch.bool)
    for i in missing:
        image_mask[i] = False
        grid[i] = 0
    return HeadInput(
        hidden=hidden.requires_grad_(grad),
        token_mask=token_mask,
        visual={"resnet/grid": grid},
        image_mask=image_mask,
    )


def make_head(seed=0, **kw) -> BfclHead:
    torch.manual_seed(seed)
    return BfclHead(BfclConfig(**{**SMALL, **kw}), D, DIMS)


def test_registered_with_paper_defaults():
    assert get_head("bfcl") is BfclHead
    assert BfclHead.default_scheme == "bio2"
    assert BfclHead.needs == ("resnet/grid",)
    cfg = BfclConfig()
    # Section 4.1.3 and 4.5: tau 0.6, m = 4 bottlenecks, L = 8 with mid fusion.
    assert (cfg.temperature, cfg.bottlenecks, cfg.layers) == (0.6, 4, 8)
    assert (cfg.fusion_stage, cfg.fusion, cfg.dropout) == ("mid", "bottleneck", 0.1)
    with torch.device("meta"):  # paper sizes, without paying for their initialisation
        big = BfclHead(cfg, 768, {"resnet/grid": 2048})
    assert big.out_dim == 768
    assert big.mca_v2t.attn.num_heads == 12  # 12 heads at d = 768
    # Mid fusion: L/2 self-attention layers per modality, then L/2 bottleneck layers;
    # the last eq. (11) vision layer feeds nothing and is not built.
    assert (len(big.text_self), len(big.vision_self)) == (4, 4)
    assert (len(big.bf_text), len(big.bf_vision)) == (4, 3)
    with torch.device("meta"):
        early = BfclHead(BfclConfig(fusion_stage="early"), 64, {"resnet/grid": 16})
    assert (len(early.text_self), len(early.bf_text), len(early.bf_vision)) == (0, 8, 7)
    assert early.bottleneck.shape == (4, 64)


@pytest.mark.parametrize(
    "kw", [{}, {"fusion_stage": "early"}, {"fusion": "attention"}, {"fusion": "gated"}]
)
def test_output_shapes_and_diagnostics(kw):
    head = make_head(**kw)
    batch = make_batch()
    out = head(batch)
    B, T = batch.token_mask.shape
    assert out.hidden.shape == (B, T, D) and head.out_dim == D
    assert set(out.aux_losses) == {"vt", "tv"}
    sim = out.diagnostics["bfcl_text_image_sim"]
    assert sim.shape == (B,) and (sim.abs() <= 1 + 1e-6).all()
    if kw.get("fusion") in ("attention", "gated"):
        w = out.diagnostics["bfcl_visual_weight"]
        assert w.shape == (B,) and ((w > 0) & (w < 1)).all()


def test_post_norm_option():
    head = make_head(pre_norm=False)
    assert head.bf_norm is None and not head.bf_text[0].norm_first
    assert make_head().bf_text[0].norm_first
    out = head(make_batch())
    assert out.hidden.shape == (6, 9, D)
    assert out.hidden.mean(-1).abs().max() < 1e-5  # ends in the post-norm LayerNorm


def test_hidden_size_is_configurable():
    head = BfclHead(BfclConfig(hidden_dim=48, heads=3, **SMALL), D, DIMS)
    out = head(make_batch())
    assert head.out_dim == 48 and out.hidden.shape[-1] == 48


@pytest.mark.parametrize(
    "kw",
    [{}, {"fusion_stage": "early"}, {"fusion": "attention"}, {"fusion": "gated"},
     {"no_mca": True}, {"no_bf": True}],
)
def test_padding_does_not_change_real_tokens(kw):
    head = make_head(**kw).eval()
    short = make_batch()
    long = make_batch(pad_to=14)
    a, b = head(short), head(long)
    T = short.token_mask.shape[1]
    real = short.token_mask
    torch.testing.assert_close(a.hidden[real], b.hidden[:, :T][real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        a.diagnostics["bfcl_text_image_sim"], b.diagnostics["bfcl_text_image_sim"]
    )


def test_missing_image_uses_learned_embedding_not_its_row():
    head = make_head().train()
    batch = make_batch(missing=(1, 4))
    torch.manual_seed(2)
    a = head(batch)
    batch.visual["resnet/grid"][[1, 4]] = torch.randn(2, R, DV) * 5
    torch.manual_seed(2)  # same dropout
    b = head(batch)
    torch.testing.assert_close(a.hidden, b.hidden)
    for k in a.aux_losses:  # and never enter the contrastive losses
        torch.testing.assert_close(a.aux_losses[k], b.aux_losses[k])
    # A real image does change the text output.
    batch.visual["resnet/grid"][0] = torch.randn(R, DV).abs() * 5
    torch.manual_seed(2)
    c = head(batch)
    assert (c.hidden[0] - a.hidden[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [{}, {"fusion": "attention"}, {"fusion": "gated"}, {"no_mca": True}])
def test_gradients_reach_text_and_every_parameter(kw):
    head = make_head(dropout=0.0, **kw).train()
    batch = make_batch(grad=True)
    out = head(batch)
    (out.hidden.pow(2).mean() + sum(out.aux_losses.values())).backward()
    assert batch.hidden.grad is not None and batch.hidden.grad.abs().sum() > 0
    dead = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []  # includes visual_proj, bottleneck tokens and no_image


def test_contrastive_losses_finite_and_fall_when_overfitting():
    # The losses read only eqs. (1)-(2), so the fusion stack is left out for speed.
    torch.manual_seed(0)
    head = make_head(dropout=0.0, no_mca=True, no_bf=True).train()
    batch = make_batch(lengths=(6,) * 10, missing=(3,), seed=1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    hist = {"vt": [], "tv": []}
    for _ in range(40):
        out = head(batch)
        for k in hist:
            assert torch.isfinite(out.aux_losses[k])
            hist[k].append(out.aux_losses[k].item())
        opt.zero_grad()
        sum(out.aux_losses.values()).backward()
        opt.step()
    for k, h in hist.items():
        assert h[-1] < 0.5 * h[0], (k, h[0], h[-1])


def test_lambdas_dot_similarity_and_eval():
    batch = make_batch()
    assert make_head().eval()(batch).aux_losses == {}  # eq. (17) is a training objective
    torch.manual_seed(1)
    a = make_head(dropout=0.0).train()(batch).aux_losses
    b = make_head(dropout=0.0, lambda_vt=2.0, lambda_tv=0.5).train()(batch).aux_losses
    torch.testing.assert_close(b["vt"], 2.0 * a["vt"])
    torch.testing.assert_close(b["tv"], 0.5 * a["tv"])
    assert not torch.allclose(a["vt"], a["tv"])  # two directions, two different losses
    c = make_head(dropout=0.0, similarity="dot").train()(batch).aux_losses
    assert torch.isfinite(c["vt"]) and not torch.allclose(c["vt"], a["vt"])


def switch_diff(**kw):
    base = {n.split(".")[0] for n, _ in make_head().named_parameters()}
    abl = {n.split(".")[0] for n, _ in make_head(**kw).named_parameters()}
    return base - abl, abl - base


def test_no_bf_removes_fusion_and_outputs_visual_guided_text():
    removed, added = switch_diff(no_bf=True)
    # eq. (9)'s V_t only feeds the fusion, so it goes with it.
    assert removed == {
        "bottleneck", "text_self", "vision_self", "bf_text", "bf_vision", "bf_norm", "mca_t2v"
    }
    assert added == set()
    head = make_head(no_bf=True).train()
    out = head(make_batch())
    assert set(out.aux_losses) == {"vt", "tv"}
    # H is T_v of eq. (8): the output of the last MCA layer (a LayerNorm, zero-mean rows).
    assert out.hidden.mean(-1).abs().max() < 1e-5


def test_no_cl_removes_only_the_losses():
    assert switch_diff(no_cl=True) == (set(), set())
    out = make_head(no_cl=True).train()(make_batch())
    assert out.aux_losses == {}
    assert "bfcl_text_image_sim" in out.diagnostics


def test_no_mca_removes_co_attention_and_fuses_raw_projections():
    removed, added = switch_diff(no_mca=True)
    assert removed == {"mca_v2t", "mca_t2tv", "mca_t2v"} and added == set()
    out = make_head(no_mca=True).train()(make_batch())
    assert set(out.aux_losses) == {"vt", "tv"}
    assert out.hidden.shape == (6, 9, D)


def test_fusion_mechanisms_replace_bottleneck():
    bf = {"bottleneck", "text_self", "vision_self", "bf_text", "bf_vision", "bf_norm"}
    assert switch_diff(fusion="attention") == (bf, {"af_score"})
    assert switch_diff(fusion="gated") == (bf, {"gf_gate"})


def test_all_visual_ablations_read_no_image():
    cfg = BfclConfig(no_mca=True, no_bf=True, no_cl=True)
    assert BfclHead.required_features(cfg) == ()
    assert BfclHead.required_features(BfclConfig(no_mca=True, no_bf=True)) == ("resnet/grid",)
    head = BfclHead(cfg, D, DIMS)
    assert {n.split(".")[0] for n, _ in head.named_parameters()} == {"text_proj"}
    batch = make_batch()
    batch.visual = {}
    out = head(batch)
    assert out.hidden.shape == (6, 9, D) and out.aux_losses == {}


def test_without_mca_and_bf_the_image_cannot_reach_the_text():
    head = make_head(no_mca=True, no_bf=True).eval()
    batch = make_batch()
    a = head(batch).hidden
    batch.visual["resnet/grid"] = batch.visual["resnet/grid"] * 3 + 1
    torch.testing.assert_close(head(batch).hidden, a)


def test_config_from_overrides_and_errors():
    cfg = build(
        BfclConfig, parse_overrides(["fusion=gated", "fusion_stage=early"]), where="-o head"
    )
    assert (cfg.fusion, cfg.fusion_stage) == ("gated", "early")
    where = "params.yaml:train.head"
    with pytest.raises(ConfigError, match="fusion"):
        build(BfclConfig, {"fusion": "concat"}, where=where)
    with pytest.raises(ConfigError, match="no_bf"):
        build(BfclConfig, {"no_bf": True, "fusion": "gated"}, where=where)
    with pytest.raises(ConfigError, match="no_mca"):
        build(BfclConfig, {"no_mca": True, "fusion": "attention"}, where=where)
    with pytest.raises(ConfigError, match="bottleneck layer"):
        build(BfclConfig, {"layers": 2, "fusion_stage": "mid"}, where=where)
    with pytest.raises(ConfigError, match="heads"):
        BfclHead(BfclConfig(heads=5), D, DIMS)


def test_contrastive_losses_are_sums_over_the_batch_as_eqs_13_and_15():
    """Eqs. 13/15 sum over the N examples: the default equals N_valid times the mean, so
    lambda weighs the summed loss as eq. 17 is written; ``cl_reduction=mean`` averages."""
    assert BfclConfig().cl_reduction == "sum" and BfclHead.crf_reduction == "mean"
    batch = make_batch()  # 6 rows, row 4 without an image: 5 anchors
    with torch.no_grad():  # training mode computes the losses; no dropout, same numbers
        summed = make_head(dropout=0.0).train()(batch).aux_losses
        mean = make_head(dropout=0.0, cl_reduction="mean").train()(batch).aux_losses
    for k in ("vt", "tv"):
        torch.testing.assert_close(summed[k], 5.0 * mean[k])
