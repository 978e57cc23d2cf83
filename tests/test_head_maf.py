"""MAF head (mner/train/heads/maf.py) on small synthetic batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mner.config import build, parse_overrides
from mner.errors import ConfigError
from mner.train.heads import HeadInput, get_head
from mner.train.heads.maf import MafConfig, MafHead

D, DV, R = 32, 24, 49
DIMS = {"resnet/grid": DV, "resnet/pooled": DV}


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
    pooled = grid.mean(1)
    image_mask = torch.ones(B, dtype=torch.bool)
    for i in missing:
        image_mask[i] = False
        grid[i] = 0
        pooled[i] = 0
    return HeadInput(
        hidden=hidden.requires_grad_(grad),
        token_mask=token_mask,
        visual={"resnet/grid": grid, "resnet/pooled": pooled},
        image_mask=image_mask,
    )


def make_head(seed=0, **kw) -> MafHead:
    torch.manual_seed(seed)
    return MafHead(MafConfig(**kw), D, DIMS)


def test_registered_with_paper_defaults():
    cls = get_head("maf")
    assert cls is MafHead
    assert cls.default_scheme == "bioes"
    assert cls.needs == ("resnet/grid", "resnet/pooled")
    cfg = MafConfig()
    # Section 4.3: tau 0.102, lambda_c 0.7, alpha = beta = 0.2, k = 15 of N = 64, n = 128.
    assert (cfg.temperature, cfg.lambda_c, cfg.alpha, cfg.beta) == (0.102, 0.7, 0.2, 0.2)
    assert cfg.swap_fraction * 64 / 2 == pytest.approx(15)
    assert cfg.max_len == 128
    # m = 12 heads at D = 768; hidden sizes follow the encoder.
    with torch.device("meta"):  # paper sizes, without paying for their initialisation
        big = MafHead(MafConfig(), 768, {"resnet/grid": 2048, "resnet/pooled": 2048})
    assert big.ci.attn.num_heads == 12
    assert big.ca_text[0].out_features == 768
    assert big.out_dim == 1536


def test_output_shapes_and_diagnostics():
    head = make_head()
    batch = make_batch()
    out = head(batch)
    B, T = batch.token_mask.shape
    assert head.out_dim == 2 * D
    assert out.hidden.shape == (B, T, 2 * D)
    # H = [T; R]: the first half is the encoder state unchanged.
    torch.testing.assert_close(out.hidden[..., :D], batch.hidden)
    assert set(out.aux_losses) == {"ca", "cm"}
    assert set(out.diagnostics) == {"maf_match_prob", "maf_visual_gate"}
    for v in out.diagnostics.values():
        assert v.shape == (B,)
    p = out.diagnostics["maf_match_prob"]
    assert p[4] == 0  # the missing image retains nothing
    assert ((p[[0, 1, 2, 3, 5]] > 0) & (p[[0, 1, 2, 3, 5]] < 1)).all()


def test_padding_does_not_change_real_tokens():
    head = make_head().eval()
    short = make_batch()
    long = make_batch(pad_to=15)
    a, b = head(short), head(long)
    T = short.token_mask.shape[1]
    real = short.token_mask
    torch.testing.assert_close(a.hidden[real], b.hidden[:, :T][real], atol=1e-5, rtol=1e-5)
    for k in a.diagnostics:
        torch.testing.assert_close(a.diagnostics[k], b.diagnostics[k], atol=1e-6, rtol=1e-5)


def test_missing_image_adds_no_visual_information():
    head = make_head().eval()
    batch = make_batch()
    out = head(batch)
    # The missing row's grid content cannot matter, and its visual half is zero.
    batch.visual["resnet/grid"][4] = torch.randn(R, DV)
    batch.visual["resnet/pooled"][4] = torch.randn(DV)
    out2 = head(batch)
    torch.testing.assert_close(out.hidden, out2.hidden)
    assert out.hidden[4, :, D:].abs().max() == 0
    assert out.hidden[0, :, D:].abs().max() > 0


def test_missing_images_excluded_from_aux_losses():
    head = make_head().train()
    batch = make_batch(missing=(1, 4))
    torch.manual_seed(3)
    a = head(batch).aux_losses
    batch.visual["resnet/pooled"][[1, 4]] = torch.randn(2, DV) * 10
    torch.manual_seed(3)  # same swap and dropout
    b = head(batch).aux_losses
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_gradients_reach_text_and_every_parameter():
    head = make_head(dropout=0.0).train()
    batch = make_batch(grad=True)
    out = head(batch)
    (out.hidden.pow(2).mean() + sum(out.aux_losses.values())).backward()
    assert batch.hidden.grad is not None and batch.hidden.grad.abs().sum() > 0
    dead = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    assert head.region_proj.weight.grad.abs().sum() > 0  # visual side
    assert head.ca_image[0].weight.grad.abs().sum() > 0


def test_aux_losses_finite_and_fall_when_overfitting():
    torch.manual_seed(0)
    head = make_head(dropout=0.0).train()
    batch = make_batch(lengths=(6,) * 12, missing=(4,), seed=1)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    hist = {"ca": [], "cm": []}
    for _ in range(40):
        # The same negatives each step: eq. (10) is linear in [T; C], so its logit is
        # additive in text and image and can fit a fixed swap, not a fresh one each step.
        torch.manual_seed(1)
        out = head(batch)
        for k in hist:
            assert torch.isfinite(out.aux_losses[k])
            hist[k].append(out.aux_losses[k].item())
        opt.zero_grad()
        sum(out.aux_losses.values()).backward()
        opt.step()
    for k, h in hist.items():
        first, last = sum(h[:5]) / 5, sum(h[-5:]) / 5
        assert last < 0.5 * first, (k, first, last)


def test_swap_makes_pairwise_negatives_among_images_only():
    head = make_head()
    B = 10
    c = torch.arange(B, dtype=torch.float).view(B, 1, 1).expand(B, 3, 2).clone()
    img = torch.ones(B, dtype=torch.bool)
    img[[2, 7]] = False
    torch.manual_seed(0)
    swapped, y = head._swap(c, torch.ones(B), img)
    src = swapped[:, 0, 0].long()
    neg = (y == 0).nonzero().flatten()
    # 8 image rows: k = round(0.46875 * 8 / 2) = 2 pairs -> 4 negatives.
    assert neg.numel() == 4
    assert not img[neg].logical_not().any()
    assert (src[neg] != neg).all() and (src[src[neg]] == neg).all()  # pairwise exchange
    pos = (y == 1).nonzero().flatten()
    assert (src[pos] == pos).all()
    # Too few images for a negative and a positive: nothing is swapped.
    _, y2 = head._swap(c, torch.ones(B), torch.arange(B) < 2)
    assert (y2 == 1).all()


def test_fusion_uses_own_image_unless_fuse_swapped():
    batch = make_batch(lengths=(6,) * 10, missing=())
    for fuse_swapped in (False, True):
        head = make_head(dropout=0.0, fuse_swapped=fuse_swapped)
        ref = head.eval()(batch).hidden
        torch.manual_seed(0)
        train = head.train()(batch).hidden  # 2k = 4 rows swapped for CM's loss
        same = torch.isclose(train, ref, atol=1e-6).flatten(1).all(-1)  # (B,)
        if fuse_swapped:
            assert int((~same).sum()) == 4  # the reference code fuses the negatives
        else:
            assert same.all()


def test_eval_is_deterministic_and_has_no_aux_losses():
    head = make_head().eval()
    batch = make_batch()
    a, b = head(batch), head(batch)
    torch.testing.assert_close(a.hidden, b.hidden)
    assert a.aux_losses == {}


def test_match_probability_scales_visual_half():
    head = make_head().eval()
    batch = make_batch(missing=())
    with torch.no_grad():
        head.match.weight.zero_()
        head.match.bias.fill_(-30.0)  # y^_m ~ 0: the image is judged unrelated (eq. 12)
    out = head(batch)
    assert out.diagnostics["maf_match_prob"].max() < 1e-9
    assert out.hidden[..., D:].abs().max() < 1e-6


def switch_diff(**kw):
    base = {n for n, _ in make_head().named_parameters()}
    abl = {n for n, _ in make_head(**kw).named_parameters()}
    assert abl <= base
    return {n.split(".")[0] for n in base - abl}


def test_no_ca_removes_alignment_exactly():
    assert switch_diff(no_ca=True) == {"pooler", "ca_text", "ca_image"}
    head = make_head(no_ca=True).train()
    batch = make_batch()
    del batch.visual["resnet/pooled"]  # w/o CA reads the grid alone
    out = head(batch)
    assert set(out.aux_losses) == {"cm"}
    assert MafHead.required_features(MafConfig(no_ca=True)) == ("resnet/grid",)
    assert MafHead.required_features(MafConfig()) == ("resnet/grid", "resnet/pooled")


def test_no_cm_removes_matching_exactly():
    assert switch_diff(no_cm=True) == {"match"}
    head = make_head(no_cm=True).train()
    out = head(make_batch())
    assert set(out.aux_losses) == {"ca"}
    expected = torch.tensor([1.0, 1, 1, 1, 0, 1])  # no CM: all retained, none without image
    torch.testing.assert_close(out.diagnostics["maf_match_prob"], expected)


def test_no_ca_and_no_cm_together():
    assert switch_diff(no_ca=True, no_cm=True) == {"pooler", "ca_text", "ca_image", "match"}
    out = make_head(no_ca=True, no_cm=True).train()(make_batch())
    assert out.aux_losses == {}
    assert out.hidden.shape[-1] == 2 * D


def test_aux_weights_follow_eq_18():
    batch = make_batch()
    torch.manual_seed(5)
    a = make_head(alpha=0.2, beta=0.2).train()(batch).aux_losses
    torch.manual_seed(5)
    b = make_head(alpha=0.4, beta=0.2).train()(batch).aux_losses
    # alpha/(1-alpha-beta): 1/3 -> 1; beta/(1-alpha-beta): 1/3 -> 1/2.
    torch.testing.assert_close(b["ca"], 3 * a["ca"])
    torch.testing.assert_close(b["cm"], 1.5 * a["cm"])


def test_config_from_overrides_and_errors():
    cfg = build(MafConfig, parse_overrides(["no_cm=true", "temperature=0.2"]), where="-o head")
    assert cfg.no_cm and cfg.temperature == 0.2 and not cfg.no_ca
    with pytest.raises(ConfigError, match="alpha"):
        build(MafConfig, {"alpha": 0.6, "beta": 0.5}, where="params.yaml:train.head")
    with pytest.raises(ConfigError, match="no_xx"):
        build(MafConfig, {"no_xx": True}, where="params.yaml:train.head")
    with pytest.raises(ConfigError, match="heads"):
        MafHead(MafConfig(heads=5), D, DIMS)
    assert dataclasses.is_dataclass(MafConfig) and MafConfig.__dataclass_params__.frozen


def test_too_long_window_names_the_fix():
    head = make_head(max_len=8).eval()
    with pytest.raises(ConfigError, match="head.max_len"):
        head(make_batch(pad_to=9))
