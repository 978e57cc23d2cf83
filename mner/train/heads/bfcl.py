"""BFCL: MNER with Bottleneck Fusion and Contrastive Learning (Wang et al., IEICE 2023).

Paper: Peng Wang, Xiaohang Chen, Ziyu Shang and Wenjun Ke, "Multimodal Named Entity
Recognition with Bottleneck Fusion and Contrastive Learning", IEICE Transactions on
Information and Systems E106.D(4), pp. 545-555, 2023, doi:10.1587/transinf.2022EDP7116
(docs/papers.md). Tags are BIO2 as in the paper.

Inputs: ``hidden`` = the BERT token states C (B, T, Dt); ``resnet/grid`` = the 7x7
ResNet regions U (B, R=49, Dv). D is the shared multimodal size d (768 in the paper;
``hidden_dim`` = None takes Dt, 128 for ``tiny``).

Equation map (paper -> code):

* (1) T = ReLU(W_t C + b_t)                                  -> ``self.text_proj``, ``t`` (B, T, D)
* (2) V = ReLU(W_v U + b_v)                                  -> ``self.visual_proj``, ``v``
* 3.4 MCA (multimodal co-attention), switch ``no_mca``; each arrow is one
  cross-modal transformer (CMT) layer, the shared :class:`~mner.train.heads.layers.CrossModalLayer`
  (FFN of 4 D with dropout inside, as ``nn.TransformerEncoderLayer``'s):
  (3)-(5) multi-head scaled dot-product attention          -> ``CrossModalLayer.attn``
  (6) T~_v = LN(V + MH-SA(V, T, T)),
  (7) T_v = LN(T~_v + FFN(T~_v)): visual-guided text (B, R, D) -> ``self.mca_v2t``
  (8) T_v = CMT(T, T_v, T_v), back on the tokens (B, T, D)   -> ``self.mca_t2tv``, ``t_v``
  (9) V_t = CMT(T, V, V), textual-guided vision (B, T, D)    -> ``self.mca_t2v``, ``v_t``
  Without MCA the fusion reads T and V directly (section 4.3).
* 3.5 bottleneck fusion (BF), switch ``no_bf``, ``fusion="bottleneck"``:
  m learned bottleneck tokens B^0                             -> ``self.bottleneck``
  (final LayerNorm of the pre-norm stack                      -> ``self.bf_norm``)
  (10) [T_v^{l+1}, B^^{l+1}] = Transformer([T_v^l, B^l]; theta_text^l)   -> ``self.bf_text[l]``
  (11) [V_t^{l+1}, B^{l+1}] = Transformer([V_t^l, B^^{l+1}]; theta_vision^l)
                                                              -> ``self.bf_vision[l]``
  H = T_v^L, the text side, is the output.
  ``fusion_stage="early"``: L bottleneck layers; ``"mid"``: L/2 unimodal self-attention
  layers per modality (``self.text_self``, ``self.vision_self``), then L/2 bottleneck
  layers (section 4.5).
  ``no_bf``: H = T_v of eq. (8), "directly input the visual guided textual
  representations to CRF" (section 4.3).
* Table 5 fusion mechanisms, ``fusion``: ``"attention"`` (AF: per-token attention
  weights over the two modalities, weighted sum), ``"gated"`` (GF: one sigmoid logit per
  token from [T_v; V_t], weighted sum); both fuse T_v and V_t of eqs. (8)-(9).
* 3.7 contrastive learning (CL), switch ``no_cl``:
  (13) L_vt, vision anchors; (15) L_tv, text anchors; (14) sim = cosine of f(v_i) and
  g(t_i), the pooled unimodal representations of eqs. (1)-(2): t_i = mean of T over
  real tokens, v_i = mean of V over regions             -> ``t_pool``, ``v_pool``
  (losses.info_nce, directions ``a2b`` and ``b2a`` with a = v, b = t)
* (17) L = L_MNER + lambda_vt L_vt + lambda_tv L_tv       -> ``aux_losses["vt"]``, ``["tv"]``
* Reductions, as the equations write them: eqs. (13) and (15) sum over the N examples
  of the batch (``cl_reduction="sum"``, info_nce ``reduction="sum"``), while eq. (16),
  L_MNER = -1/|D| sum_j log P(y_j | S_j, I_j), is a mean (``crf_reduction = "mean"``).
  So lambda_vt and lambda_tv weigh the summed losses as eq. (17) is written: at batch 16
  each contrastive term weighs 16x its per-example mean against the CRF mean.
  ``cl_reduction="mean"`` averages them (the former behaviour: lambda then weighs
  per-example means, i.e. the paper's lambda divided by the batch size). On the
  generated sample (tiny profile, one seed; test F1 overall / image-dependent
  entities) the sums gave 81.6 / 62.7 and the means 88.6 / 76.9: with lambda = 1 the
  summed terms outweigh the CRF mean there, so the unreported lambdas matter.

Choices where the paper is silent or garbled, and why:

* The printed denominators of eqs. (13) and (15) add the positive term twice (a PDF
  conversion artefact); the standard InfoNCE denominator over the batch is used.
* Section 4.1.3 says "dot production" while eq. (14) is the cosine; ``similarity``
  picks one, cosine by default (unnormalised 768-d dot products at tau = 0.6 saturate).
* lambda_vt, lambda_tv are not reported; both default to 1.
* The "Transformer" of eqs. (10)-(11) (and the mid-fusion self-attention layers) is
  not specified; it is pre-norm with a final LayerNorm by default (``pre_norm``): on
  the generated sample (tiny profile, head lr 1e-3) the post-norm stack of 8 text + 7
  vision layers trained from scratch stayed below 32 dev F1 for 4 epochs (78 after 8),
  the pre-norm one reached 95 after 7. The MCA layers keep the paper's explicit
  post-norm (eqs. 6-7).
* Eq. (11) at the last layer only produces V_t^L and B^L, which nothing reads (H is
  T_v^L), so that last vision transformer is not built.
* Bottleneck layers number at least 2, else no visual information reaches the text.
* Without BF, eq. (9) feeds nothing, so ``no_bf`` does not build it either.
* Missing images (``image_mask`` False): V is replaced by a learned "no image"
  embedding (layers.replace_missing) and those rows are excluded from CL.
* The attention head count defaults to D // 64 (the paper's 12 at D = 768); the FFN
  inner size is 4 D as in BERT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.heads.layers import (
    CrossModalLayer,
    attention_heads,
    key_padding_mask,
    masked_mean,
    replace_missing,
)
from mner.train.losses import info_nce
from mner.train.recipes import BEST_DEV, DEVLIN, Recipe


@dataclass(frozen=True)
class BfclConfig:
    """BFCL hyperparameters (paper section 4.1.3) and ablation switches (Tables 3 and 5).

    Attributes:
        hidden_dim: d, the shared multimodal size; None = the encoder size.
        heads: attention heads of every transformer layer; None = hidden_dim // 64
            (lowered to a divisor of hidden_dim).
        bottlenecks: m, the number of bottleneck tokens (best: 4, Fig. 6a).
        layers: L, fusion layers (best: 8 with mid fusion, Fig. 6b).
        fusion_stage: ``early`` (L bottleneck layers) or ``mid`` (L/2 self-attention
            layers per modality, then L/2 bottleneck layers).
        fusion: ``bottleneck`` (BF), ``attention`` (AF) or ``gated`` (GF) (Table 5).
        temperature: tau of the contrastive losses (eqs. 13, 15).
        similarity: ``cosine`` (eq. 14) or ``dot`` (section 4.1.3).
        lambda_vt: weight of the vision-text loss (eq. 17).
        lambda_tv: weight of the text-vision loss (eq. 17).
        cl_reduction: ``sum`` over the batch (eqs. 13, 15) or ``mean`` of the
            contrastive losses.
        dropout: dropout in every transformer layer (paper: 0.1).
        pre_norm: pre-norm bottleneck/self-attention layers plus a final LayerNorm
            (False: BERT-style post-norm, ``LN(x + f(x))``).
        no_bf: ablation "- BF": H = T_v from MCA, no fusion module.
        no_cl: ablation "- CL": no contrastive losses.
        no_mca: ablation "- MCA": the fusion reads the projected text and regions.
    """

    #: Old option names (saved configs, ``-o``) -> their names now.
    renamed_options: ClassVar[dict[str, str]] = {"hidden": "hidden_dim"}

    hidden_dim: int | None = None
    heads: int | None = None
    bottlenecks: int = 4
    layers: int = 8
    fusion_stage: Literal["early", "mid"] = "mid"
    fusion: Literal["bottleneck", "attention", "gated"] = "bottleneck"
    temperature: float = 0.6
    similarity: Literal["cosine", "dot"] = "cosine"
    lambda_vt: float = 1.0
    lambda_tv: float = 1.0
    cl_reduction: Literal["sum", "mean"] = "sum"
    dropout: float = 0.1
    pre_norm: bool = True
    no_bf: bool = False
    no_cl: bool = False
    no_mca: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lambda_vt < 0 or self.lambda_tv < 0:
            raise ValueError("lambda_vt and lambda_tv must be >= 0")
        if self.bottlenecks < 1:
            raise ValueError(f"bottlenecks must be >= 1, got {self.bottlenecks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("hidden_dim", "heads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {v}")
        if self.no_bf and self.fusion != "bottleneck":
            raise ValueError(
                f"no_bf removes the fusion module, so fusion={self.fusion!r} has nothing to "
                "switch; use no_bf=true alone or fusion=attention|gated alone"
            )
        if self.no_mca and self.fusion != "bottleneck":
            raise ValueError(
                f"fusion={self.fusion!r} mixes token-aligned T_v and V_t, which exist only "
                "with MCA; use no_mca=true with fusion=bottleneck"
            )
        if self.fusion == "bottleneck" and not self.no_bf and self.bf_layers < 2:
            raise ValueError(
                f"layers={self.layers} with fusion_stage={self.fusion_stage!r} gives "
                f"{self.bf_layers} bottleneck layer(s); at least 2 are needed for visual "
                "information to reach the text (eqs. 10-11)"
            )

    @property
    def self_layers(self) -> int:
        """Unimodal self-attention layers per modality before bottleneck fusion."""
        return self.layers // 2 if self.fusion_stage == "mid" else 0

    @property
    def bf_layers(self) -> int:
        """Bottleneck fusion layers."""
        return self.layers - self.self_layers


def _cmt(d: int, heads: int, dropout: float) -> CrossModalLayer:
    """CMT(Q, K, V) of eqs. (3)-(7): ``LN(Q + MH-SA(Q, K, K))`` then ``LN(x + FFN(x))``."""
    return CrossModalLayer(d, heads, 4 * d, dropout, ffn_dropout=True)


def _encoder_layer(d: int, heads: int, dropout: float, pre_norm: bool) -> nn.Module:
    """The "Transformer" of eqs. (10)-(11): a self-attention layer, post- or pre-norm."""
    return nn.TransformerEncoderLayer(
        d, heads, dim_feedforward=4 * d, dropout=dropout, activation="gelu", batch_first=True,
        norm_first=pre_norm,
    )


@register
class BfclHead(FusionHead):
    """BFCL fusion head: co-attention, bottleneck fusion, decoupled contrastive losses.

    ``out_dim`` is the shared size d (``hidden_dim``, default the encoder size).

    Distributed training: under DDP both directions of the contrastive loss (eqs.
    13-15) gather the pooled text and image representations of every rank
    (``losses.info_nce``), so negatives come from the whole global batch as in one
    process, and gradients reach the rank that owns each row.
    """

    name = "bfcl"
    recipe = Recipe(
        "Wang et al. (2023), BFCL, sections 4.1.3 and 4.5",
        encoder=("bert-base-cased", "sec. 4.1.3: pre-trained BERT-base; casing not given: cased, as UMT"),
        batch_size=(16, "sec. 4.1.3: batch size 16"),
        epochs=(30, "sec. 4.5: trained 30 epochs, the best dev model is tested"),
        patience=(0, "sec. 4.5: " + BEST_DEV),
        lr_encoder=(5e-5, "sec. 4.1.3: learning rate 5e-5"),
        lr_head=(5e-5, "sec. 4.1.3: learning rate 5e-5 (one rate given)"),
        warmup_ratio=(0.1, DEVLIN),
        max_length=(128, "sec. 4.1.3: maximum text length 128"),
        dropout=(0.1, "sec. 4.1.3: dropout rate 0.1"),
        notes=("Table 2 reports the mean of 3 runs: train with --seeds 1,2,3",),
    )
    summary = "BFCL (IEICE'23): co-attention, bottleneck-token fusion, image-text contrastive"
    needs = ("resnet/grid",)
    default_scheme = "bio2"
    Config = BfclConfig
    crf_reduction = "mean"  # eq. (16): L_MNER = -1/|D| sum_j log P(y_j | S_j, I_j)

    def __init__(self, cfg: BfclConfig, text_dim: int, feature_dims):
        super().__init__(cfg, text_dim, feature_dims)
        d = cfg.hidden_dim or text_dim
        heads = attention_heads(d, cfg.heads)
        self.out_dim = d
        self.uses_visual = not (cfg.no_mca and cfg.no_bf and cfg.no_cl)

        self.text_proj = nn.Linear(text_dim, d)  # eq. (1)
        self.visual_proj = self.no_image = None
        if self.uses_visual:
            self.visual_proj = nn.Linear(self.feature_dims["resnet/grid"], d)  # eq. (2)
            self.no_image = nn.Parameter(torch.zeros(d))
        self.mca_v2t = self.mca_t2tv = self.mca_t2v = None
        if not cfg.no_mca:
            self.mca_v2t = _cmt(d, heads, cfg.dropout)  # eqs. (6)-(7)
            self.mca_t2tv = _cmt(d, heads, cfg.dropout)  # eq. (8)
            if not cfg.no_bf:
                self.mca_t2v = _cmt(d, heads, cfg.dropout)  # eq. (9)
        self.bottleneck = self.text_self = self.vision_self = self.bf_text = self.bf_vision = None
        self.bf_norm = self.af_score = self.gf_gate = None
        if cfg.no_bf:
            pass
        elif cfg.fusion == "bottleneck":
            self.bottleneck = nn.Parameter(torch.randn(cfg.bottlenecks, d) * 0.02)
            self.text_self = nn.ModuleList(
                _encoder_layer(d, heads, cfg.dropout, cfg.pre_norm) for _ in range(cfg.self_layers)
            )
            self.vision_self = nn.ModuleList(
                _encoder_layer(d, heads, cfg.dropout, cfg.pre_norm) for _ in range(cfg.self_layers)
            )
            self.bf_text = nn.ModuleList(
                _encoder_layer(d, heads, cfg.dropout, cfg.pre_norm) for _ in range(cfg.bf_layers)
            )
            self.bf_vision = nn.ModuleList(
                _encoder_layer(d, heads, cfg.dropout, cfg.pre_norm)
                for _ in range(cfg.bf_layers - 1)
            )
            # A pre-norm stack leaves its output unnormalised; close it like BERT does.
            self.bf_norm = nn.LayerNorm(d) if cfg.pre_norm else None
        elif cfg.fusion == "attention":
            # AF: e_k = w^T tanh(W x_k + b) per modality k, softmax over modalities.
            self.af_score = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))
        else:
            # GF: one logit per token from both modalities.
            self.gf_gate = nn.Linear(2 * d, 1)

    @classmethod
    def required_features(cls, cfg: BfclConfig) -> tuple[str, ...]:
        """With MCA, BF and CL all switched off the head reads no image at all."""
        return () if (cfg.no_mca and cfg.no_bf and cfg.no_cl) else cls.needs

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Fuse token states with the image regions (paper section 3).

        Args:
            batch: ``hidden`` (B, T, Dt), ``token_mask`` (B, T), ``visual["resnet/grid"]``
                (B, 49, Dv), ``image_mask`` (B,).

        Returns:
            ``hidden`` H (B, T, D); ``aux_losses`` ``vt`` and ``tv`` (eqs. 13, 15, already
            weighted by eq. 17; training mode only, absent under ``no_cl``); ``diagnostics``
            ``bfcl_text_image_sim`` (B,) cosine of the pooled T and V, and for AF/GF
            ``bfcl_visual_weight`` (B,) the mean weight of the visual side.
        """
        cfg = self.cfg
        tok = batch.token_mask  # (B, T)
        # nn.TransformerEncoderLayer's "True = padding" form of ``tok``.
        text_ignore = key_padding_mask(tok)  # (B, T)
        t = F.relu(self.text_proj(batch.hidden))  # eq. (1): (B, T, D)
        B = t.shape[0]
        aux: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, torch.Tensor] = {}
        if not self.uses_visual:
            return HeadOutput(hidden=t)

        img = batch.image_mask  # (B,)
        v = F.relu(self.visual_proj(batch.visual["resnet/grid"].to(t.dtype)))  # eq. (2)
        v = replace_missing(v, img, self.no_image)  # (B, R, D)

        # ---- 3.7 contrastive learning, eqs. (13)-(15), on the unimodal representations.
        t_pool = masked_mean(t, tok)  # (B, D)
        v_pool = v.mean(dim=1)  # (B, D)
        diagnostics["bfcl_text_image_sim"] = F.cosine_similarity(t_pool, v_pool, dim=-1).detach()
        if not cfg.no_cl and self.training:  # a training objective (eq. 17) only
            norm = cfg.similarity == "cosine"
            red = cfg.cl_reduction
            l_vt = info_nce(v_pool, t_pool, cfg.temperature, "a2b", valid=img, normalize=norm, reduction=red)
            l_tv = info_nce(v_pool, t_pool, cfg.temperature, "b2a", valid=img, normalize=norm, reduction=red)
            aux["vt"] = cfg.lambda_vt * l_vt
            aux["tv"] = cfg.lambda_tv * l_tv

        # ---- 3.4 multimodal co-attention, eqs. (3)-(9).
        if cfg.no_mca:
            t_v, v_t, v_ignore = t, v, None  # the fusion reads eqs. (1)-(2) directly
        else:
            t_v = self.mca_v2t(v, t, tok)  # eqs. (6)-(7): (B, R, D)
            t_v = self.mca_t2tv(t, t_v)  # eq. (8): (B, T, D)
            if cfg.no_bf:
                return HeadOutput(hidden=t_v, aux_losses=aux, diagnostics=diagnostics)
            v_t = self.mca_t2v(t, v)  # eq. (9): (B, T, D)
            v_ignore = text_ignore  # V_t lives on the token positions
        if cfg.no_bf:  # and no MCA: the projected text goes to the CRF
            return HeadOutput(hidden=t_v, aux_losses=aux, diagnostics=diagnostics)

        # ---- Table 5: attention / gated fusion of T_v and V_t.
        if cfg.fusion == "attention":
            both = torch.stack([t_v, v_t], dim=2)  # (B, T, 2, D)
            alpha = self.af_score(both).softmax(dim=2)  # (B, T, 2, 1)
            h = (alpha * both).sum(dim=2)
            diagnostics["bfcl_visual_weight"] = masked_mean(alpha[:, :, 1], tok)[:, 0].detach()
            return HeadOutput(hidden=h, aux_losses=aux, diagnostics=diagnostics)
        if cfg.fusion == "gated":
            g = torch.sigmoid(self.gf_gate(torch.cat([t_v, v_t], dim=-1)))  # (B, T, 1)
            h = g * t_v + (1 - g) * v_t
            diagnostics["bfcl_visual_weight"] = masked_mean(1 - g, tok)[:, 0].detach()
            return HeadOutput(hidden=h, aux_losses=aux, diagnostics=diagnostics)

        # ---- 3.5 bottleneck fusion, eqs. (10)-(11).
        for layer in self.text_self:  # mid fusion: unimodal layers first
            t_v = layer(t_v, src_key_padding_mask=text_ignore)
        for layer in self.vision_self:
            v_t = layer(v_t, src_key_padding_mask=v_ignore)
        n_t, m = t_v.shape[1], cfg.bottlenecks
        bn = self.bottleneck.unsqueeze(0).expand(B, -1, -1)  # B^0: (B, m, D)
        bn_real = torch.zeros(B, m, dtype=torch.bool, device=t.device)
        text_keys = torch.cat([text_ignore, bn_real], dim=1)  # (B, T + m)
        vision_keys = None if v_ignore is None else torch.cat([v_ignore, bn_real], dim=1)
        for i, text_layer in enumerate(self.bf_text):
            out = text_layer(torch.cat([t_v, bn], dim=1), src_key_padding_mask=text_keys)
            t_v, bn = out[:, :n_t], out[:, n_t:]  # eq. (10): T_v^{l+1}, B^^{l+1}
            if i < len(self.bf_vision):
                out = self.bf_vision[i](
                    torch.cat([v_t, bn], dim=1), src_key_padding_mask=vision_keys
                )
                v_t, bn = out[:, : v_t.shape[1]], out[:, v_t.shape[1] :]  # eq. (11)
        if self.bf_norm is not None:
            t_v = self.bf_norm(t_v)
        return HeadOutput(hidden=t_v, aux_losses=aux, diagnostics=diagnostics)
