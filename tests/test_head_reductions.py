"""Loss reductions, dropout placement and the encoder's pooler at the tagger level
(mner/train/model.py honouring what each head declares)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from mner.train.data import Batch
from mner.train.heads import get_head
from mner.train.heads.bert_crf import BertCrfHead
from mner.train.model import Tagger, build_head

D, B, T, W = 32, 3, 6, 4
NAMES = ("O", "B-PER", "I-PER")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def encoder(pooler: bool = True) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=48, vocab_size=40), add_pooling_layer=pooler)


def batch(rows: int = B, grid: bool = False) -> Batch:
    g = torch.Generator().manual_seed(0)
    base = Batch(
        windows=list(range(B)),
        input_ids=torch.randint(5, 40, (B, T), generator=g),
        attention_mask=torch.ones(B, T, dtype=torch.bool),
        word_pos=torch.tensor([[1, 2, 3, 4]] * B),
        word_mask=torch.ones(B, W, dtype=torch.bool),
        word_tags=torch.randint(0, 3, (B, W), generator=g),
        sub_labels=None,
        image_mask=torch.ones(B, dtype=torch.bool),
    )
    base.sub_labels = torch.full((B, T), -100)
    base.sub_labels[:, 1:5] = base.word_tags
    if grid:
        base.visual = {"resnet/grid": torch.rand(B, 49, 8, generator=g)}
    reps = rows // B
    return Batch(**{k: (torch.cat([v] * reps) if isinstance(v, torch.Tensor) else
                        {n: torch.cat([x] * reps) for n, x in v.items()} if isinstance(v, dict) else
                        v if v is None else v * reps) for k, v in base.__dict__.items()})


class SummedCRF(BertCrfHead):
    """bert_crf declaring a summed CRF loss (as MGC and HamLearning do)."""

    crf_reduction = "sum"


def test_heads_declare_their_papers_reductions():
    declared = {n: get_head(n).crf_reduction for n in ("bert_crf", "umt", "maf", "bfcl", "mgc", "hamlearning")}
    # MGC eq. 19 and HamLearning eq. 17 sum over the batch; BFCL eq. 16 and MAF eq. 17
    # divide by |D|; UMT's code uses reduction='mean'.
    assert declared == {"bert_crf": "mean", "umt": "mean", "maf": "mean", "bfcl": "mean",
                        "mgc": "sum", "hamlearning": "sum"}


@pytest.mark.parametrize(("head_cls", "factor"), [(BertCrfHead, 1.0), (SummedCRF, 2.0)])
def test_tagger_reduces_the_crf_loss_as_the_head_declares(head_cls, factor):
    """Doubling the batch (the same rows twice) doubles a summed CRF loss only."""
    head = head_cls(head_cls.Config(), D, {})
    model = Tagger(encoder(pooler=False), head, NAMES, dropout=0.0).eval()
    _, one = model.loss(batch())
    _, two = model.loss(batch(rows=2 * B))
    assert two["crf"] == pytest.approx(factor * one["crf"], rel=1e-5)


def test_umt_drops_out_the_encoder_states_not_the_head_output():
    """UMT's code drops out BERT's output and not [A; B] before the classifier: with the
    head's own dropout at 0, the tagger's dropout must not touch the emissions."""
    from mner.train.heads.umt import UMTConfig, UMTHead

    def emissions_twice(**cfg):
        torch.manual_seed(0)
        head = UMTHead(UMTConfig(dropout=0.0, **cfg), D, {"resnet/grid": 8})
        model = Tagger(encoder(pooler=False), head, NAMES, dropout=0.9).train()
        model.encoder.eval()  # keep BERT's own dropout out of the comparison
        b = batch(grid=True)
        return model(b)[0], model(b)[0]

    a, b = emissions_twice()
    assert torch.equal(a, b)
    a, b = emissions_twice(encoder_dropout=False)  # the tagger's dropout is back
    assert not torch.equal(a, b)


def test_maf_reads_the_encoders_pretrained_pooler():
    """MAF's T_s is BERT's pooler: the head keeps no stand-in of its own and reads
    ``HeadInput.pooled``; other heads leave the encoder without its unused pooler."""
    from mner.train.config import make_train_config

    cfg = make_train_config({"model": "maf", "profile": "tiny"})
    enc = encoder(pooler=True)
    pretrained = enc.pooler.dense.weight.detach().clone()
    head = build_head(cfg, enc, {"resnet/grid": 8, "resnet/pooled": 8})
    assert head.pooler is None and enc.pooler is not None
    assert torch.equal(enc.pooler.dense.weight, pretrained)
    # Without a pooler in the encoder, MAF builds its documented Linear + Tanh.
    head = build_head(cfg, encoder(pooler=False), {"resnet/grid": 8, "resnet/pooled": 8})
    assert isinstance(head.pooler[0], torch.nn.Linear) and isinstance(head.pooler[1], torch.nn.Tanh)
    # A head that does not read the pooler drops it (not trained, not saved).
    enc = encoder(pooler=True)
    build_head(make_train_config({"model": "umt", "profile": "tiny"}), enc, {"resnet/grid": 8})
    assert enc.pooler is None and not any(n.startswith("pooler.") for n, _ in enc.named_parameters())


def test_maf_run_reloads_with_the_encoders_pooler_and_old_runs_still_load():
    """A run's weights hold the adopted pooler as the encoder's; an encoder rebuilt as
    ``load_saved`` does (without pooler, then ``add_pooler``) takes them back, and a
    checkpoint written when the pooler was the head's (``head.pooler.0``) loads too."""
    from mner.train.config import make_train_config
    from mner.train.encoder import add_pooler

    cfg = make_train_config({"model": "maf", "profile": "tiny"})
    dims = {"resnet/grid": 8, "resnet/pooled": 8}

    def tagger(enc):
        torch.manual_seed(1)
        return Tagger(enc, build_head(cfg, enc, dims), NAMES, dropout=0.0)

    trained = tagger(encoder(pooler=True))
    state = trained.state_dict()
    assert "encoder.pooler.dense.weight" in state and not any(k.startswith("head.pooler") for k in state)
    rebuilt_enc = encoder(pooler=False)
    add_pooler(rebuilt_enc)
    rebuilt = tagger(rebuilt_enc)
    rebuilt.load_state_dict(state)  # strict
    torch.testing.assert_close(rebuilt.encoder.pooler.dense.weight, trained.encoder.pooler.dense.weight)
    old = {("head.pooler.0." + k[len("encoder.pooler.dense."):] if k.startswith("encoder.pooler.dense.") else k): v
           for k, v in state.items()}
    again = tagger(encoder(pooler=True))
    again.load_state_dict(old)  # strict: the old names are mapped onto the encoder's pooler
    torch.testing.assert_close(again.encoder.pooler.dense.bias, trained.encoder.pooler.dense.bias)


def test_maf_alignment_loss_is_fed_by_the_pooler_output():
    """With the encoder's pooler adopted, L_ca (eqs. 1-3) reads ``HeadInput.pooled``."""
    from mner.train.heads import HeadInput
    from mner.train.heads.maf import MafConfig, MafHead
    from mner.train.losses import info_nce

    torch.manual_seed(0)
    head = MafHead(MafConfig(dropout=0.0, max_len=T, no_cm=True), D, {"resnet/grid": 8, "resnet/pooled": 8})
    assert head.adopt_encoder_pooler(encoder(pooler=True)) and head.pooler is None
    g = torch.Generator().manual_seed(1)
    pooled, image = torch.randn(B, D, generator=g), torch.randn(B, 8, generator=g)
    x = HeadInput(hidden=torch.randn(B, T, D, generator=g), token_mask=torch.ones(B, T, dtype=torch.bool),
                  visual={"resnet/grid": torch.rand(B, 49, 8, generator=g), "resnet/pooled": image},
                  pooled=pooled)
    cfg = head.cfg
    with torch.no_grad():
        got = head.train()(x).aux_losses["ca"]
        t_c, v_c = head.ca_text(pooled), head.ca_image(image)
        want = cfg.lambda_c * info_nce(v_c, t_c, cfg.temperature, "a2b") + (1 - cfg.lambda_c) * info_nce(
            v_c, t_c, cfg.temperature, "b2a")
    torch.testing.assert_close(got, cfg.alpha / (1 - cfg.alpha - cfg.beta) * want)
    x.pooled = None
    with pytest.raises(ValueError, match="pooled"):
        head(x)
