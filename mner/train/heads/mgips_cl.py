"""MGIPS-CL: Multi-Granularity Interweave and Implicit Positive Sample Contrastive Learning.

Paper: "MGIPS-CL: Multimodal NER with Multi-Granularity Interweave and Implicit Positive
Sample Contrastive Learning", a journal article (c. 2025) whose copy the implementation
follows names no authors, venue, arXiv id or DOI (docs/papers.md); sections 3.1-3.4,
4.3 and ablation table 3. Defaults are the paper's (see ``MgipsClConfig``).

Departure: CLIP is frozen. The paper fine-tunes CLIP ViT (lr 3e-5) with BERT;
mner caches CLIP's hidden states once (``mner extract``) and trains only BERT and the
head, so the image encoder's states H^v_l are CLIP's pretrained ones and trainable
projections (below) carry them into BERT's key/value space.

Visual input (section 3.1.2). Three visual-grounding crops of 128 x 128 pixels, each
4 x 4 patches of 32 pixels, plus one learnable class embedding: V = [v_0, 3 x 16
patches], M = 1 + 48 = 49 positions. The cache keeps, per crop, CLIP's tokens with the
crop's own class token first (``crops/patch_tokens``, (B, O, R, Wc), R = 17) and the
patch states at chosen depths (``crop_layers/tokens``, (B, O, L, R-1, Wc)); each crop's
own class token is dropped here, so the sequence is 1 + O*(R-1) as in the paper, not
1 + O*R. Crops come from the detector instead of a grounding model (``crops`` feature).
``visual_masks["crops/patch_tokens"]`` (B, O) marks real crops.

``fusion="layerwise"`` (default; section 3.2, eqs. 2-4). The mutual attention runs
inside the text encoder: the head runs BERT's own layers (``Tagger`` calls
:meth:`MgipsClHead.encode`, with :func:`mner.train.encoder_layers.run_layer`), and text layer
l+1 attends, in one softmax, over [K^v_l, H^t_l W^k] and [V^v_l, H^t_l W^v] with BERT's
own W^q, W^k, W^v (eq. 2); layer 1 reads depth 0, the embeddings V^e (eq. 3). K^v_l and
V^v_l = ``img_key[l]``/``img_value[l]`` (Linear Wc -> D after ``img_norm[l]``, a
LayerNorm standing where CLIP's pre-attention norm does) of the cached CLIP states at
depth l: the image encoder's key and value of layer l. The image side of eq. 4 is
CLIP's own self-attention, which reads no text, so its states are exactly what a
frozen CLIP computes and the cache holds them; what is not done is fine-tuning CLIP
(its W^q, W^k, W^v stay pretrained, and K^v, V^v are trainable projections of the
frozen states instead of CLIP's own). The class position v_0 at each depth is a
learned vector per text layer (``layer_class``; ``layer_no_image`` for a tweet
without an image): the paper's class token is CLIP's joint class token over the 48
patches, which per-crop caching does not compute. Layer count: one fusion per encoder
layer (``encoder_layers``, filled with the encoder's count: 12 for BERT-base, 2 for the
tiny BERT). Depth rule: with n cached depths (``extract.clip_layers``, default 0..L-1
for an L-block CLIP ViT), text layer i (0-based, of Lt) reads cached depth number
floor(i * n / Lt); for BERT-base (12) and ViT-B (12 depths 0..11) text layer l+1 reads
CLIP depth l, the paper's pairing; a 2-layer tiny BERT over 3 cached depths reads 0, 1.
H^v, the image encoder's output that MGI reads, is the final CLIP tokens after
``ln_post`` (``crops/patch_tokens`` without the crops' class tokens) through
``visual_embed`` with v_0 = ``class_embed``.

``fusion="late"`` (the head before the layer-wise fusion): the encoder runs unchanged,
then ``ma_layers`` new mutual-attention layers (``_TextLayer`` + ``_ImageLayer``, a
trainable image stream over the final CLIP tokens) run eqs. 2-4 on its output.

Equation -> code (D = text_dim, d = ``mgi_dim``, P = ``proj_dim``):

* Sec. 3.1.2, V^e: ``visual_embed`` = LayerNorm(Linear(crop tokens)) with the class
  embedding ``class_embed`` first, plus ``visual_pos`` (1 + O*(R-1) positions): (B, M, D).
* Eqs. 2-4: see the fusion modes above; outputs ``h_t`` (B, T, D), ``h_v`` (B, M, D).
* Eq. 5, M_im = f1(Linear1(subject)) (.) f2(Linear2(guide)): ``Excavator``
  (``lin1``/``f1``, ``lin2``/``f2``). Reading of eq. 9's MGE(A, B): A guides, B is
  re-weighted and sets the output's shape (eq. 7 weights f1(Linear1(H^t)) in
  MGE(H^v, H^t); the residuals of eqs. 10-11 then need every MGE output text-length).
  The element-wise product needs both sides to have the same length; in the first
  image-guided call the guide is the image stream (M tokens), so ``align`` first
  gathers one visual vector per text token by attention (text queries, visual keys).
* Eq. 6 row-grained, M_C = softmax(M_im x M_3, dim=-2): ``m3`` is M_3 in R^{d x 1}, so
  M_im x M_3 is one score per token (B, T, 1), softmax over the real tokens, and each
  token's f1(...) row is scaled by its one weight. Column-grained, M_F =
  softmax(M_im x M_4, dim=-1): read literally (M_4 in R^{d x 1}) the softmax runs over
  a single column and is 1 everywhere, so ``m4`` is a (d,) vector applied element-wise
  (M_im (.) M_4, softmax over the d features), the only reading in which the column
  weights depend on anything.
* Eq. 7, V_C = M_C (.) f1(...), V_F = M_F (.) f1(...); eq. 8, X = f3(V_F + V_C) with
  ``f3`` = Linear(d, D) + LayerNorm. Softmax weights are rescaled by the number of
  entries they share (real tokens; d) so that uniform weights leave f1(...) unchanged
  and the two granularities start on one scale (the paper leaves f1-f3 unspecified).
* Eq. 9, X^v = MGE(H^v, H^t): ``x = mge_image(aligned h_v, h_t)``; T^t starts as H^t.
* Eqs. 10-11, Interweave Encoder (``interweave_layers``, 1 as in the paper):
  X_l = X_{l-1} + MGE_img(X_{l-1}, T_{l-1}); T_l = T_{l-1} + MGE_txt(T_{l-1}, X_l).
  All image-guided MGEs share ``mge_image``, all text-guided share ``mge_text``
  (section 3.3.2), hence one more image-guided call than text-guided ones.
* Eqs. 12-13, pre-post adaptive gate: I = sigmoid(W1 T^t + W2 H^t + b) (``gate_post``
  = W1, ``gate_pre`` = W2 with bias b); z = I (.) H^t + (1 - I) (.) T^t -> ``hidden``.
* Eq. 14, sim(v_j, t_i) = cos(f(v_j), g(t_i)): section 3.3 says the image-guided MGI
  output finds the implicit positives, so v_j is the final X^v (image-guided MGE
  output) and t_i the final T^t (text-guided MGE output), each a masked mean over the
  real tokens (eq. 14's t_i, v_j are token matrices; the paper does not say how f and
  g reduce them) through ``f_image`` / ``g_text`` (Linear to P). Both losses therefore
  train the MGI modules. With ``no_mgi`` (no MGI outputs) they fall back to the mean
  of H^t and the mean of H^v over real positions.
* Eqs. 15-16, IPS-CL: for each tweet the top-``ips_k`` images of the batch by eq. 14
  (chosen without gradient, among tweets with an image and at least one crop) are its
  positives; loss -log(sum_pos e^{s/tau} / sum_j e^{s/tau}) via
  ``info_nce(..., positives=, multi_positive="sum", diagonal_positive=False)``.
* Eq. 17, standard CL: ``info_nce(t, v, direction="a2b")``.
* tau = ``temperature`` 0.07: the paper gives no value; 0.07 is CLIP's initial one.
* Eq. 19, Loss = Loss_MNER + Loss_IPS-CL + Loss_CL: aux losses ``ips_cl`` and ``cl``
  (weights ``ips_weight``, ``cl_weight``, 1 in the paper; the trainer adds the CRF).

Ablations (table 3): ``no_ips_cl`` (w/o IPS-CL), ``no_mgi`` (w/o MGI: no excavators,
interweave encoder or gate; ``hidden`` = H^t), ``no_row`` (w/o row-grained: no M_3,
V_C), ``no_column`` (w/o column-grained: no M_4, V_F). ``no_cl`` also drops eq. 17.

Missing images (the paper substitutes a default image): the class position of a tweet
without an image holds a learned ``no_image`` embedding (``layer_no_image`` inside the
encoder) and all its crop tokens are masked, so the text attends only to that; such
tweets, and images without any crop, are left out of both contrastive losses.

Diagnostics: ``mgips_gate`` (B,) mean of I over real tokens (1 = text only);
``mgips_relevance`` (B,) eq. 14 between a tweet and its own image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mner.errors import CacheError
from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.heads.layers import attention_heads, key_padding_mask, masked_mean
from mner.train.losses import info_nce
from mner.train.recipes import BEST_DEV, DEVLIN, Recipe

CROPS = "crops/patch_tokens"
LAYERS = "crop_layers/tokens"


@dataclass(frozen=True)
class MgipsClConfig:
    """MGIPS-CL hyperparameters; defaults are the paper's where it gives one.

    Attributes:
        fusion: ``layerwise`` (the paper, section 3.2: every text encoder layer attends
            to the cached CLIP states of its mapped depth, needs the ``crop_layers``
            feature) or ``late`` (``ma_layers`` new mutual-attention layers after the
            encoder over the final CLIP tokens, the head before layer-wise fusion).
        encoder_layers: layer-wise fusion modules, one per text encoder layer; None =
            the encoder's layer count (filled in when the model is built).
        ma_layers: ``late`` only: mutual-attention layers after the encoder.
        heads: attention heads of the late layers and of ``align``; None = text_dim //
            64 (12 at 768, as in the paper), lowered to a divisor of text_dim. Inside
            the encoder the encoder's own heads are used (12 for BERT-base).
        interweave_layers: stacked Interweave Encoders (eqs. 10-11); 1 is the paper's best.
        mgi_dim: d, the width of M_im (eq. 5); None = text_dim.
        proj_dim: output width of the eq. 14 encoders f and g; None = text_dim.
        num_crops: crops per image in the cache (3 in the paper and ``mner extract``).
        crop_tokens: CLIP tokens per crop in ``crops/patch_tokens``: the crop's class
            token + patches (17 for the paper's 128-pixel crops in 32-pixel patches);
            the head keeps the patches, R - 1 = 16 per crop.
        ips_k: K, implicit positive images per tweet (eq. 15); 3 in the paper.
        temperature: tau of eqs. 16-17 (not given in the paper; CLIP's initial value).
        ips_weight: weight of Loss_IPS-CL in eq. 19.
        cl_weight: weight of Loss_CL in eq. 19.
        dropout: dropout in the late mutual-attention layers.
        no_ips_cl: ablation "w/o IPS-CL": no eq. 16 loss.
        no_cl: drop the standard contrastive loss (eq. 17) too (not in table 3).
        no_mgi: ablation "w/o MGI": no excavators, interweave encoder or gate.
        no_row: ablation "w/o Row-grained": no M_3 / V_C in eqs. 6-8.
        no_column: ablation "w/o Column-grained": no M_4 / V_F in eqs. 6-8.
    """

    #: Old option names (saved configs, ``-o``) -> their names now.
    renamed_options: ClassVar[dict[str, str]] = {"ma_heads": "heads"}

    fusion: Literal["layerwise", "late"] = "layerwise"
    encoder_layers: int | None = None
    ma_layers: int = 1
    heads: int | None = None
    interweave_layers: int = 1
    mgi_dim: int | None = None
    proj_dim: int | None = None
    num_crops: int = 3
    crop_tokens: int = 17
    ips_k: int = 3
    temperature: float = 0.07
    ips_weight: float = 1.0
    cl_weight: float = 1.0
    dropout: float = 0.1
    no_ips_cl: bool = False
    no_cl: bool = False
    no_mgi: bool = False
    no_row: bool = False
    no_column: bool = False

    def __post_init__(self):
        if self.fusion not in ("layerwise", "late"):
            raise ValueError(f"fusion must be layerwise or late, got {self.fusion!r}")
        for name in ("ma_layers", "interweave_layers", "num_crops", "ips_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.crop_tokens < 2:
            raise ValueError(f"crop_tokens must be at least 2 (class token + a patch), got {self.crop_tokens}")
        for name in ("heads", "mgi_dim", "proj_dim", "encoder_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or null, got {value}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.no_row and self.no_column and not self.no_mgi:
            raise ValueError(
                "no_row and no_column together leave the excavator empty; set no_mgi=true instead"
            )


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, heads: int, p: float
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on already projected states.

    Args:
        q: (B, Tq, D) queries; k, v: (B, S, D) keys and values.
        key_mask: (B, S) bool, True for keys that may be attended (at least one per row).
        heads: number of heads (divides D).
        p: attention dropout probability.

    Returns:
        (B, Tq, D).
    """
    B, Tq, D = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, D/heads)
        return x.view(B, x.shape[1], heads, D // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        split(q), split(k), split(v), attn_mask=key_mask[:, None, None, :], dropout_p=p
    )
    return out.transpose(1, 2).reshape(B, Tq, D)


# Not the shared CrossModalLayer: eqs. 2-4 need the image stream's own K^v, V^v (and the
# text layer attends over [image; text] keys), so Q, K, V are separate projections.
class _Block(nn.Module):
    """Output projection, residual + LayerNorm, feed-forward (a BERT layer's tail)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.out(attended)))
        return self.norm2(x + self.drop(self.ffn(x)))


class _MutualLayer(nn.Module):
    """Q, K, V projections and a BERT layer's tail: what both streams' layers have."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.block = _Block(dim, dropout)


class _ImageLayer(_MutualLayer):
    """Eq. 4 (image side): H^v_{l+1} = Attn(Q^v, K^v, V^v), plain self-attention."""

    def forward(self, hv: torch.Tensor, vmask: torch.Tensor):
        """Args: hv (B, M, D); vmask (B, M). Returns H^v_{l+1} (B, M, D) and K^v, V^v."""
        k, v = self.k(hv), self.v(hv)
        att = _attend(self.q(hv), k, v, vmask, self.heads, self.p if self.training else 0.0)
        return self.block(hv, att), k, v


class _TextLayer(_MutualLayer):
    """Eqs. 2-4 (text side): text queries over [image keys/values, text keys/values]."""

    def forward(self, ht, tmask, kv, vv, vmask) -> torch.Tensor:
        """Args: ht (B, T, D); tmask (B, T); kv, vv (B, M, D) image K^v, V^v; vmask (B, M)."""
        keys = torch.cat([kv, self.k(ht)], dim=1)  # (B, M+T, D)
        values = torch.cat([vv, self.v(ht)], dim=1)
        mask = torch.cat([vmask, tmask], dim=1)
        att = _attend(self.q(ht), keys, values, mask, self.heads, self.p if self.training else 0.0)
        return self.block(ht, att)


class Excavator(nn.Module):
    """Multi-Granularity Excavator, eqs. 5-8: ``MGE(guide, subject)`` -> (B, T, D).

    The subject is re-weighted row-wise (which tokens) and column-wise (which
    features) by weights computed from its interaction with the guide.
    """

    def __init__(self, dim: int, mgi_dim: int, row: bool, column: bool):
        super().__init__()
        self.lin1, self.f1 = nn.Linear(dim, mgi_dim), nn.LayerNorm(mgi_dim)  # subject side
        self.lin2, self.f2 = nn.Linear(dim, mgi_dim), nn.LayerNorm(mgi_dim)  # guide side
        self.m3 = self.m4 = None
        if row:  # M_3 in R^{d x 1}: M_im x M_3 is one score per token (var ~1 at init)
            self.m3 = nn.Parameter(torch.full((mgi_dim, 1), mgi_dim**-0.5))
        if column:
            self.m4 = nn.Parameter(torch.ones(mgi_dim))  # M_4
        self.f3 = nn.Sequential(nn.Linear(mgi_dim, dim), nn.LayerNorm(dim))

    def forward(
        self, guide: torch.Tensor, subject: torch.Tensor, tmask: torch.Tensor
    ) -> torch.Tensor:
        """Args: guide, subject (B, T, D) token-aligned; tmask (B, T) real tokens."""
        s = self.f1(self.lin1(subject))  # (B, T, d)
        m_im = s * self.f2(self.lin2(guide))  # eq. 5, (B, T, d)
        fused = torch.zeros_like(s)
        if self.m3 is not None:  # eq. 6 row-grained: one weight per token, padding excluded
            scores = (m_im @ self.m3).masked_fill(~tmask.unsqueeze(-1), float("-inf"))  # (B, T, 1)
            n_real = tmask.sum(1).clamp(min=1).to(s.dtype).view(-1, 1, 1)
            fused = fused + scores.softmax(dim=-2) * n_real * s  # eq. 7 V_C, (B, T, d)
        if self.m4 is not None:  # eq. 6 column-grained: over the d features (see module doc)
            fused = fused + (m_im * self.m4).softmax(dim=-1) * s.shape[-1] * s  # eq. 7 V_F
        return self.f3(fused)  # eq. 8


@register
class MgipsClHead(FusionHead):
    """MGIPS-CL fusion head (see the module docstring for the equation map).

    Distributed training: under DDP the standard contrastive loss (eq. 17) gathers the
    text and image embeddings of every rank (``losses.info_nce``), so negatives come
    from the whole global batch as in one process; the implicit-positive loss (eqs.
    14-16) passes its within-batch positives and is computed within each rank's share
    of the batch (its negatives are that share's images).
    """

    name = "mgips_cl"
    recipe = Recipe(
        "MGIPS-CL (Multimodal NER with Multi-Granularity Interweave and Implicit Positive "
        "Sample Contrastive Learning), sections 4.3 and 4.6.1",
        encoder=("bert-base-cased", "sec. 4.3: BERT_TEXT; casing not given: cased, as UMT"),
        batch_size=(32, "not given: UMT's released code's 32, the MNER baselines' batch"),
        epochs=(40, "sec. 4.6.1: trained 40 epochs with the same hyperparameters"),
        patience=(0, "not given: " + BEST_DEV),
        lr_encoder=(5e-5, "sec. 4.3: lr of BERT_TEXT 5e-5"),
        lr_head=(5e-5, "not given for the new layers: BERT's 5e-5 (sec. 4.3; CLIP's 3e-5 is "
                 "not used, the cached CLIP is frozen)"),
        warmup_ratio=(0.06, "sec. 4.3: warmup_ratio 0.06"),
        max_length=(40, "sec. 4.3: maximum sentence length 40"),
        dropout=(0.1, DEVLIN + " (BERT's hidden dropout 0.1)"),
        notes=("weight decay 1e-2 (sec. 4.3) is mner's weight_decay default",
               "the tables report the mean of 5 runs: train with --seeds 1,2,3,4,5"),
    )
    summary = (
        "MGIPS-CL: mutual attention, multi-granularity interweave, implicit-positive contrastive"
    )
    needs = (CROPS, LAYERS)
    Config = MgipsClConfig

    @classmethod
    def required_features(cls, cfg: MgipsClConfig) -> tuple[str, ...]:
        """Late fusion reads only the final crop tokens; layer-wise also the per-depth ones."""
        return cls.needs if cfg.fusion == "layerwise" else (CROPS,)

    @property
    def fuses_in_encoder(self) -> bool:
        """The tagger lets :meth:`encode` run the encoder (layer-wise fusion)."""
        return self.cfg.fusion == "layerwise"

    def __init__(self, cfg: MgipsClConfig, text_dim: int, feature_dims: Mapping[str, int]):
        super().__init__(cfg, text_dim, feature_dims)
        D = text_dim
        heads = attention_heads(D, cfg.heads)
        self.heads = heads
        # Sec. 3.1.2: visual embedding of the O x cached crop patches + class embedding.
        self.visual_embed = nn.Sequential(nn.Linear(self.feature_dims[CROPS], D), nn.LayerNorm(D))
        self.class_embed = nn.Parameter(torch.randn(D) * 0.02)
        self.no_image = nn.Parameter(torch.randn(D) * 0.02)
        self.visual_pos = nn.Parameter(
            torch.randn(1 + cfg.num_crops * (cfg.crop_tokens - 1), D) * 0.02
        )
        self.text_layers = self.image_layers = None
        self.img_norm = self.img_key = self.img_value = None
        self.layer_class = self.layer_no_image = None
        if cfg.fusion == "late":  # eqs. 2-4 after the encoder
            self.text_layers = nn.ModuleList(
                _TextLayer(D, heads, cfg.dropout) for _ in range(cfg.ma_layers)
            )
            self.image_layers = nn.ModuleList(
                _ImageLayer(D, heads, cfg.dropout) for _ in range(cfg.ma_layers)
            )
        else:  # eqs. 2-4 inside the encoder: K^v_l, V^v_l per text layer
            if cfg.encoder_layers is None:
                raise ValueError("mgips_cl fusion=layerwise needs encoder_layers (the model "
                                 "builder fills it from the encoder)")
            Wl, L = self.feature_dims.get(LAYERS, self.feature_dims[CROPS]), cfg.encoder_layers
            self.img_norm = nn.ModuleList(nn.LayerNorm(Wl) for _ in range(L))
            self.img_key = nn.ModuleList(nn.Linear(Wl, D) for _ in range(L))
            self.img_value = nn.ModuleList(nn.Linear(Wl, D) for _ in range(L))
            self.layer_class = nn.Parameter(torch.randn(L, Wl) * 0.02)
            self.layer_no_image = nn.Parameter(torch.randn(L, Wl) * 0.02)
        self.align = self.mge_image = self.mge_text = self.gate_post = self.gate_pre = None
        self.f_image = self.g_text = None
        if not cfg.no_mgi:  # eqs. 5-13
            d = cfg.mgi_dim or D
            self.align = nn.MultiheadAttention(D, heads, batch_first=True)
            self.mge_image = Excavator(D, d, row=not cfg.no_row, column=not cfg.no_column)
            self.mge_text = Excavator(D, d, row=not cfg.no_row, column=not cfg.no_column)
            self.gate_post = nn.Linear(D, D, bias=False)  # W1
            self.gate_pre = nn.Linear(D, D)  # W2 and b
        if not (cfg.no_cl and cfg.no_ips_cl):  # eq. 14 encoders f and g
            P = cfg.proj_dim or D
            self.f_image = nn.Linear(D, P)
            self.g_text = nn.Linear(D, P)

    @staticmethod
    def depth_map(text_layers: int, depths: int) -> list[int]:
        """Cached depth number read by each text layer: floor(i * n / Lt) for layer i."""
        return [i * depths // text_layers for i in range(text_layers)]

    def _crop_mask(self, visual_masks, image_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, O) real crops of images that were read."""
        mask = visual_masks.get(CROPS)
        if mask is None:
            mask = torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
        return mask.bool() & image_mask.bool().unsqueeze(1)

    def encode(self, encoder: nn.Module, inputs: dict[str, torch.Tensor],
               visual: Mapping[str, torch.Tensor], visual_masks: Mapping[str, torch.Tensor],
               image_mask: torch.Tensor | None) -> torch.Tensor:
        """Eqs. 2-4 inside the encoder: run its layers, each over [image; text] keys.

        Args:
            encoder: the BERT-family text encoder (BERT, RoBERTa, XLM-R).
            inputs: the encoder's keyword inputs (``input_ids``, ``attention_mask``
                (B, T) and whatever else the tagger passes, e.g. ``token_type_ids``).
            visual: ``visual[LAYERS]`` (B, O, n, R-1, Wc) cached CLIP states at n depths.
            visual_masks: ``visual_masks[CROPS]`` (B, O) real crops.
            image_mask: (B,) images that were read (None = all).

        Returns:
            H^t_L (B, T, D), the last text layer's output.

        Raises:
            CacheError: the batch lacks the per-depth CLIP states.
            ConfigError: the encoder is not BERT-style or its depth differs from
                ``encoder_layers``.
        """
        from mner.errors import ConfigError
        from mner.train.encoder_layers import bert_layers, embed, run_layer

        if LAYERS not in visual:
            raise CacheError(f"mgips_cl fusion=layerwise reads {LAYERS}; re-run mner extract with "
                             "--features crop_layers (and the same --out), or -o head.fusion=late")
        _, layers = bert_layers(encoder)
        if len(layers) != len(self.img_key):
            raise ConfigError(f"mgips_cl was built for {len(self.img_key)} encoder layers, the "
                              f"encoder has {len(layers)}")
        tokens = visual[LAYERS]  # (B, O, n, R-1, Wc)
        B, _, n, Pc, _ = tokens.shape
        tmask = inputs["attention_mask"].bool()  # (B, T)
        h = embed(encoder, inputs)  # S^e (B, T, D), eq. 1
        image_ok = (torch.ones(B, dtype=torch.bool, device=h.device) if image_mask is None
                    else image_mask.bool())
        crop_ok = self._crop_mask(visual_masks, image_ok, tokens)
        vmask = torch.cat(  # (B, 1+O*Pc): v_0 always visible, so no row is empty
            [torch.ones(B, 1, dtype=torch.bool, device=h.device),
             crop_ok.repeat_interleave(Pc, 1)], dim=1)
        for i, (layer, depth) in enumerate(zip(layers, self.depth_map(len(layers), n), strict=True)):
            v0 = torch.where(image_ok.unsqueeze(-1), self.layer_class[i], self.layer_no_image[i])
            hv = torch.cat([v0.unsqueeze(1).to(tokens.dtype), tokens[:, :, depth].flatten(1, 2)], 1)
            hv = self.img_norm[i](hv.to(h.dtype))  # (B, 1+O*Pc, Wc): H^v at depth ``depth``
            h = run_layer(layer, h, tmask, self.img_key[i](hv), self.img_value[i](hv), vmask)
        return h

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Fuse one batch.

        Args:
            batch: ``hidden`` (B, T, D) (with layer-wise fusion: the output of
                :meth:`encode`), ``token_mask`` (B, T), ``visual[CROPS]`` (B, O, R, Wc),
                ``visual_masks[CROPS]`` (B, O), ``image_mask`` (B,).

        Returns:
            ``hidden`` z (B, T, D); aux losses ``cl``/``ips_cl`` unless switched off;
            diagnostics ``mgips_gate`` (without ``no_mgi``) and ``mgips_relevance``
            (when a contrastive loss is on), each (B,).

        Raises:
            CacheError: the cached crops do not have ``num_crops`` x ``crop_tokens``.
        """
        cfg = self.cfg
        hidden, tmask = batch.hidden, batch.token_mask
        crops = batch.visual[CROPS]  # (B, O, R, Wc)
        B = hidden.shape[0]
        n_crops, n_tokens = cfg.num_crops, cfg.crop_tokens  # O, R
        if tuple(crops.shape[1:3]) != (n_crops, n_tokens):
            raise CacheError(
                f"{CROPS}: the cache has {crops.shape[1]} crops of {crops.shape[2]} tokens per "
                f"image but the mgips_cl head is set for {n_crops} of {n_tokens}; set "
                f"-o head.num_crops={crops.shape[1]} -o head.crop_tokens={crops.shape[2]}"
            )
        image_ok = batch.image_mask  # (B,)
        crop_ok = self._crop_mask(batch.visual_masks, image_ok, crops)  # (B, O)

        # Sec. 3.1.2: V^e = [v_0, O x crop patches] + position (each crop's own class
        # token is dropped: 1 + 48 positions); v_0 = no_image without an image.
        patches = crops[:, :, 1:].to(hidden.dtype)  # (B, O, R-1, Wc)
        tokens = self.visual_embed(patches).flatten(1, 2)  # (B, O*(R-1), D)
        v0 = torch.where(image_ok.unsqueeze(-1), self.class_embed, self.no_image).unsqueeze(1)
        ve = torch.cat([v0, tokens], dim=1) + self.visual_pos  # (B, M, D)
        vmask = torch.cat(  # (B, M): v_0 always visible, so no row is empty
            [
                torch.ones(B, 1, dtype=torch.bool, device=hidden.device),
                crop_ok.repeat_interleave(n_tokens - 1, 1),
            ],
            dim=1,
        )

        h_t, h_v = hidden, ve  # layer-wise: H^t came fused out of the encoder
        if self.text_layers is not None:
            # Late eqs. 2-4: text layer l+1 reads image layer l's K^v, V^v; layer 1 reads V^e.
            k_v = v_v = ve
            for text_layer, image_layer in zip(self.text_layers, self.image_layers, strict=True):
                h_t = text_layer(h_t, tmask, k_v, v_v, vmask)
                h_v, k_v, v_v = image_layer(h_v, vmask)

        aux: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, torch.Tensor] = {}
        if cfg.no_mgi:
            out = h_t
            t_seq, t_mask, v_seq, v_mask = h_t, tmask, h_v, vmask  # eq. 14 fallback
        else:
            # Eq. 9: X^v = MGE(H^v, H^t), with H^v gathered per text token first.
            aligned, _ = self.align(
                h_t, h_v, h_v, key_padding_mask=key_padding_mask(vmask), need_weights=False
            )
            x = self.mge_image(aligned, h_t, tmask)  # (B, T, D)
            t = h_t
            for _ in range(cfg.interweave_layers):  # eqs. 10-11, shared excavators
                x = x + self.mge_image(x, t, tmask)
                t = t + self.mge_text(t, x, tmask)
            gate = torch.sigmoid(self.gate_post(t) + self.gate_pre(h_t))  # eq. 12, (B, T, D)
            out = gate * h_t + (1 - gate) * t  # eq. 13
            diagnostics["mgips_gate"] = masked_mean(
                gate.detach().mean(-1, keepdim=True), tmask
            ).squeeze(-1)
            t_seq, t_mask, v_seq, v_mask = t, tmask, x, tmask  # T^t and X^v (sec. 3.3)

        if self.f_image is not None:
            t_emb = self.g_text(masked_mean(t_seq, t_mask))  # (B, P) g(t_i)
            v_emb = self.f_image(masked_mean(v_seq, v_mask))  # (B, P) f(v_j)
            valid = crop_ok.any(1)  # an image with at least one crop
            diagnostics["mgips_relevance"] = F.cosine_similarity(t_emb, v_emb, dim=-1).detach()
            if not cfg.no_cl:  # eq. 17
                aux["cl"] = cfg.cl_weight * info_nce(t_emb, v_emb, cfg.temperature, "a2b", valid)
            if not cfg.no_ips_cl:  # eqs. 14-16
                aux["ips_cl"] = cfg.ips_weight * info_nce(
                    t_emb,
                    v_emb,
                    cfg.temperature,
                    "a2b",
                    valid,
                    positives=self._implicit_positives(t_emb, v_emb, valid),
                    multi_positive="sum",
                    diagonal_positive=False,
                )
        return HeadOutput(hidden=out, aux_losses=aux, diagnostics=diagnostics)

    def _implicit_positives(
        self, t_emb: torch.Tensor, v_emb: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Eqs. 14-15: (B, B) bool, row i marks the top-K images of the batch for tweet i.

        K is capped at (valid images - 1) so at least one negative remains; selection is
        a discrete choice and carries no gradient.
        """
        B = t_emb.shape[0]
        positives = torch.zeros(B, B, dtype=torch.bool, device=t_emb.device)
        k = min(self.cfg.ips_k, int(valid.sum()) - 1)
        if k < 1:
            return positives
        with torch.no_grad():
            sim = F.normalize(t_emb, dim=-1) @ F.normalize(v_emb, dim=-1).t()  # (B, B) eq. 14
            sim = sim.masked_fill(~valid.unsqueeze(0), -math.inf)
            top = sim.topk(k, dim=1).indices  # (B, K) eq. 15
        return positives.scatter(1, top, True)
