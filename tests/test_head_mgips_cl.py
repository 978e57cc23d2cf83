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

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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


# -- layer-wise mutual attention inside the encoder (section 3.2, eqs. 2-4) -------------

N_DEPTHS, PC = 3, 16  # cached CLIP depths and patches per crop (tiny CLIP: 3 blocks)


def tiny_encoder(kind: str = "bert", layers: int = 2):
    """A seeded random BERT-family encoder of width DT."""
    import transformers

    config_cls, model_cls = {
        "bert": (transformers.BertConfig, transformers.BertModel),
        "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
        "xlmr": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel),
    }[kind]
    cfg = config_cls(vocab_size=60, hidden_size=DT, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=40, pad_token_id=1)
    torch.manual_seed(5)
    return model_cls(cfg, add_pooling_layer=False).eval()


def encoder_inputs(batch: HeadInput) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 60, batch.token_mask.shape, generator=g)
    ids[~batch.token_mask] = 1  # pad id
    return {"input_ids": ids, "attention_mask": batch.token_mask.long()}


def with_layers(batch: HeadInput, seed: int = 2) -> HeadInput:
    g = torch.Generator().manual_seed(seed)
    layers = torch.randn(batch.hidden.shape[0], 3, N_DEPTHS, PC, DC, generator=g)
    return dataclasses.replace(batch, visual={**batch.visual, LAYERS: layers})


def layer_outputs(head, enc, inputs, batch) -> list[torch.Tensor]:
    """Each encoder layer's output (B, T, D) during ``head.encode``."""
    seen: list[torch.Tensor] = []
    hooks = [layer.output.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
             for layer in enc.encoder.layer]
    try:
        head.encode(enc, inputs, batch.visual, batch.visual_masks, batch.image_mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlmr"])
def test_running_the_encoder_layer_by_layer_is_its_own_forward(kind):
    from mner.train.encoder_layers import bert_layers, embed, run_layer

    enc = tiny_encoder(kind)
    batch = make_batch()
    inputs = encoder_inputs(batch)
    want = enc(**inputs).last_hidden_state
    h = embed(enc, inputs)
    for layer in bert_layers(enc)[1]:
        h = run_layer(layer, h, batch.token_mask)
    real = batch.token_mask
    torch.testing.assert_close(h[real], want[real], atol=1e-5, rtol=1e-5)


def test_one_fusion_per_encoder_layer_and_the_model_builder_counts_them():
    from types import SimpleNamespace

    from mner.train.model import build_head

    enc = tiny_encoder(layers=3)
    cfg = SimpleNamespace(head_class=lambda: MgipsClHead,
                          head_config=lambda: MgipsClConfig(heads=2))
    head = build_head(cfg, enc, {CROPS: DC, LAYERS: DC})
    assert head.cfg.encoder_layers == 3 and head.fuses_in_encoder
    assert len(head.img_key) == len(head.img_value) == len(head.img_norm) == 3
    assert head.text_layers is None and head.image_layers is None  # no layer after BERT
    with pytest.raises(ConfigError, match="built for 3 encoder layers, the encoder has 2"):
        batch = with_layers(make_batch())
        head.encode(tiny_encoder(layers=2), encoder_inputs(batch), batch.visual,
                    batch.visual_masks, batch.image_mask)


def test_depth_rule_pairs_text_layer_l_plus_1_with_clip_layer_l():
    assert MgipsClHead.depth_map(12, 12) == list(range(12))  # BERT-base x ViT-B: the paper
    assert MgipsClHead.depth_map(2, 3) == [0, 1]  # tiny BERT x tiny CLIP
    assert MgipsClHead.depth_map(2, 12) == [0, 6]
    assert MgipsClHead.depth_map(4, 2) == [0, 0, 1, 1]


@pytest.mark.parametrize("depth, first_changed", [(0, 0), (1, 1), (2, None)])
def test_each_encoder_layer_reads_the_clip_states_of_its_mapped_depth(depth, first_changed):
    enc = tiny_encoder()
    head = make_head(fusion="layerwise", encoder_layers=2).eval()
    batch = with_layers(make_batch())
    inputs = encoder_inputs(batch)
    before = layer_outputs(head, enc, inputs, batch)
    layers = batch.visual[LAYERS].clone()
    # One real crop of row 0, at one cached depth (not a constant: LayerNorm removes it).
    layers[0, 0, depth] += torch.randn(PC, DC, generator=torch.Generator().manual_seed(4))
    after = layer_outputs(head, enc, inputs, dataclasses.replace(
        batch, visual={**batch.visual, LAYERS: layers}))
    changed = [not torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after, strict=True)]
    want = [False] * 2 if first_changed is None else [i >= first_changed for i in range(2)]
    assert changed == want
    if first_changed is not None:  # only the row whose crop moved
        moved = (after[-1] - before[-1]).abs().amax(dim=(1, 2))
        assert moved[0] > 1e-4 and (moved[1:] == 0).all()


def test_layerwise_tagger_fuses_in_the_encoder_and_late_runs_it_unchanged():
    from types import SimpleNamespace

    from mner.train.model import Tagger

    batch = with_layers(make_batch())
    inputs = encoder_inputs(batch)
    T_ = batch.token_mask.shape[1]
    fake = SimpleNamespace(
        input_ids=inputs["input_ids"], attention_mask=batch.token_mask, visual=batch.visual,
        visual_masks=batch.visual_masks, image_mask=batch.image_mask, sub_labels=None,
        entity_spans=None, entity_mask=None, text_teacher={},
        word_pos=torch.arange(T_).expand(B, T_))
    for fusion in ("layerwise", "late"):
        enc = tiny_encoder()
        head = make_head(fusion=fusion, encoder_layers=2)
        tagger = Tagger(enc, head, ("O", "B-PER", "I-PER"), 0.0).eval()
        seen = {}

        def keep(module, args, seen=seen):
            seen["hidden"] = args[0].hidden  # returns None: the input is left as it is

        head.register_forward_pre_hook(keep)
        tagger(fake)
        plain = enc(**inputs).last_hidden_state
        real = batch.token_mask
        same = torch.allclose(seen["hidden"][real], plain[real], atol=1e-5)
        # Late fusion: the head gets BERT's unchanged output, as before; layer-wise: the
        # encoder's output already read the image in every layer.
        assert same == (fusion == "late"), fusion


def test_late_fusion_ignores_the_per_depth_states_and_keeps_its_layers():
    head = make_head(fusion="late", ma_layers=2).eval()
    assert not head.fuses_in_encoder and head.img_key is None
    assert len(head.text_layers) == len(head.image_layers) == 2
    batch = with_layers(make_batch())
    out = head(batch).hidden
    other = with_layers(make_batch(), seed=11)
    torch.testing.assert_close(head(other).hidden, out)


def test_layerwise_needs_the_per_depth_states_with_a_one_line_remedy():
    enc = tiny_encoder()
    head = make_head(fusion="layerwise", encoder_layers=2)
    batch = make_batch()
    with pytest.raises(CacheError, match="--features crop_layers .*head.fusion=late"):
        head.encode(enc, encoder_inputs(batch), batch.visual, batch.visual_masks, batch.image_mask)


def test_an_old_cache_without_the_layers_names_the_re_extract_command(tiny_cache, tmp_path):
    import h5py

    from mner.cache.reader import FeatureCache

    old = tmp_path / "old.h5"
    old.write_bytes(tiny_cache.read_bytes())
    with h5py.File(old, "a") as f:
        del f["crop_layers"]
    needs = MgipsClHead.required_features(MgipsClConfig())
    with pytest.raises(CacheError, match=r"lacks crop_layers/tokens; re-run mner extract with "
                                         r"--features crop_layers \(and the same --out\)") as exc:
        FeatureCache(old).require(needs)
    assert "\n" not in str(exc.value)
    FeatureCache(old).require(MgipsClHead.required_features(MgipsClConfig(fusion="late")))


# -- contrastive inputs, M_3, positions (sections 3.1.2, 3.3) ---------------------------


@pytest.mark.parametrize("fusion", ["layerwise", "late"])
def test_contrastive_losses_train_the_mgi_modules(fusion):
    head = make_head(fusion=fusion, encoder_layers=2).train()
    batch = with_layers(make_batch())
    out = head(batch)
    sum(out.aux_losses.values()).backward()  # the contrastive losses alone
    params = dict(head.named_parameters())
    for name in ("mge_image.lin1.weight", "mge_image.m3", "mge_image.m4", "mge_text.lin2.weight",
                 "mge_text.f3.0.weight", "align.in_proj_weight", "f_image.weight", "g_text.weight"):
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # v_j is the image-guided output X^v: moving only the excavators' output layer moves
    # both losses (before, they read the encoder mean and the image class token).
    head.eval()
    before = {k: v.detach() for k, v in head(batch).aux_losses.items()}
    with torch.no_grad():
        head.mge_image.f3[1].bias.add_(0.5)
    after = head(batch).aux_losses
    for name in ("cl", "ips_cl"):
        assert not torch.allclose(after[name], before[name]), name


def test_row_grained_weight_is_one_scalar_per_token():
    from mner.train.heads.mgips_cl import Excavator

    torch.manual_seed(0)
    ex = Excavator(DT, 16, row=True, column=False)
    assert tuple(ex.m3.shape) == (16, 1)  # M_3 in R^{d x 1}
    seen = {}

    def keep(module, args):
        seen["fused"] = args[0]

    ex.f3.register_forward_pre_hook(keep)
    batch = make_batch()
    ex(batch.hidden, batch.hidden.flip(0), batch.token_mask)
    s = ex.f1(ex.lin1(batch.hidden.flip(0)))
    ratio = seen["fused"] / s  # V_C / f1(...) = M_C: one value per token
    real = batch.token_mask
    torch.testing.assert_close(ratio[real], ratio[real][:, :1].expand(-1, 16), atol=1e-4, rtol=1e-4)
    assert ratio[real][:, 0].std() > 1e-3  # and it differs between tokens


@pytest.mark.parametrize("fusion", ["layerwise", "late"])
def test_visual_sequence_is_one_class_embedding_and_48_patches(fusion):
    head = make_head(fusion=fusion, encoder_layers=2).eval()
    assert head.visual_pos.shape[0] == 1 + 3 * 16  # the paper's 1 + 48, not 1 + 3 * 17
    batch = with_layers(make_batch())
    out = head(batch).hidden
    crops = batch.visual[CROPS].clone()
    crops[:, :, 0] = 9.0  # each crop's own CLIP class token: not read
    torch.testing.assert_close(head(dataclasses.replace(
        batch, visual={**batch.visual, CROPS: crops})).hidden, out)
    crops[0, 0, 1] += torch.randn(DC)  # a patch token is
    assert not torch.allclose(head(dataclasses.replace(
        batch, visual={**batch.visual, CROPS: crops})).hidden[0], out[0])


# -- the cached per-depth CLIP crop states (``crop_layers``) -----------------------------


def test_clip_depths_are_the_vits_hidden_states():
    from mner.extract.clip import ClipBackbone
    from mner.extract.config import ExtractConfig

    bb = ClipBackbone(ExtractConfig(profile="tiny", device="cpu"), torch.device("cpu"))
    assert bb.depth == 3 and bb.clip_layers(ExtractConfig(profile="tiny")) == (0, 1, 2)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = bb.encode_layers(bb.model.visual, x, (0, 2, 3))  # (B, L, 1+P, Wc)
        _, final = bb.encode_tokens(bb.model.visual, x)
        embeds = bb.model.visual._embeds(x)
    assert states.shape == (2, 3, 50, 192)
    torch.testing.assert_close(states[:, 0], embeds)  # depth 0: V^e, after ln_pre
    # The deepest block's output through ln_post is the cached final-layer tokens.
    torch.testing.assert_close(bb.model.visual.ln_post(states[:, 2]), final, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(states[:, 1], states[:, 2])
    with pytest.raises(ConfigError, match="has 3 blocks, so depths go from 0 to 3"):
        bb.clip_layers(ExtractConfig(profile="tiny", clip_layers=(0, 4)))
    with pytest.raises(ValueError, match="increasing depths"):
        ExtractConfig(clip_layers=(2, 1))


def test_the_cache_holds_each_crops_patch_states_per_depth(tiny_cache):
    import numpy as np

    from mner.cache.reader import FeatureCache

    cache = FeatureCache(tiny_cache)
    prov = cache.provenance["crop_layers"]
    assert prov["preprocessing"]["clip_layers"] == [0, 1, 2]
    assert prov["dims"] == {"K": 3, "Lc": 3, "Pc": 16, "Wc": 192}
    assert prov["weights"] == cache.provenance["crops"]["weights"]
    ids = cache.image_ids
    arrays, ok, masks = cache.load([LAYERS, CROPS], ids)
    tokens = arrays[LAYERS]
    assert tokens.shape == (len(ids), 3, 3, 16, 192) and tokens.dtype == np.float16
    real = masks["crops"]  # (B, K) crops below count, of images that were read
    assert real.any() and (~ok).any()
    assert (np.abs(tokens[real]).reshape(int(real.sum()), -1).max(1) > 0).all()
    assert not tokens[~real].any()  # padded crop slots and unread images stay zero
