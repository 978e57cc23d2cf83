"""MGC: Multi-Granularity Contrastive knowledge distillation.

Paper: Anonymous, "Multi-Granularity Contrastive Knowledge Distillation for Multimodal
Named Entity Recognition", anonymous ACL submission (ACL Rolling Review, c. 2022; no
author list, arXiv id or DOI in the submitted text), section 2 (docs/papers.md).

Map from the paper's equations to this module (shapes: B batch, T sub-tokens,
E entities, D text dim ``d1``, Dc joint/CLIP dim ``d2``):

* eq. 1, ``H = BERT(X)``: ``batch.hidden`` (B, T, D); ``h^g`` is its [CLS] row 0.
* eqs. 2-3, the mapping ``E(.)`` into the joint space: ``self.joint`` = Linear(D -> Dc);
  ``u_gl_s = E(h^g)`` (B, Dc) and ``u_e_s = E(psi(span))`` (B, E, Dc) with ``psi`` the
  mean over each entity's sub-tokens (``layers.span_mean``).
* eq. 4, ``g = ViT(V)``: the cached CLIP image embedding ``clip/image_embed`` (B, Dc).
* eqs. 5-6, the CLIP text teacher: ``batch.text_teacher["sentence"]`` (B, Dc) and
  ``["entities"]`` (B, E, Dc), cached by ``mner extract``.
* eqs. 7-8, knowledge distillation, the Euclidean distance ``||u^t - u^s||_2``:
  ``aux_losses["kd_global"]`` and ``["kd_entity"]``, summed over the sentences and over
  the real entities as the equations write them (``kd_reduction="sum"``; ``"mean"``
  averages, which makes ``kd_weight`` independent of the batch size and entity count).
* eqs. 9-10, global contrastive loss on ``A^G = g_i . u_gl_s_j`` (cosine, rows are
  images): ``losses.info_nce(g, u_gl_s, tau, direction="a2b")`` ->
  ``aux_losses["contrastive_global"]``.
* eqs. 11-12, local contrastive loss: for each image the entity whose ``u_e_s`` is most
  similar to it (argmax of the cosine over real entities), then the same InfoNCE ->
  ``aux_losses["contrastive_entity"]``.
* eqs. 13-18, the output module, "based on UMT" (sections 2.4 and 3.3: MGC is built on
  UMT[spade], the authors' re-run of UMT): UMT's complete output module, the shared
  :class:`mner.train.heads.layers.UMTOutputModule` that ``umt.py`` uses too
  (``output_module="umt"``, the default): dropout on the encoder states, UMT's extra
  text layer ``text_layer`` producing the ``H`` of eqs. 13-18, the multimodal
  interaction ``interaction`` with ``g`` projected to D as a single visual item (R=1)
  by UMT's two projections, the visual gate ``c`` and ``S = [A; B]`` (B, T, 2D), plus
  UMT's entity span detection branch (``esd_layer``, ``esd_classifier``, ``esd_crf``;
  ``aux_losses["esd"]`` with UMT's ``esd_weight`` 0.5) and its conversion matrix
  (``emission_prior`` with ``conversion_weight`` 0.5). ``output_module="interaction"``
  is the reduced variant (the interaction module alone over the encoder states, as the
  section 2.4 summary reads on its own; the tagger's dropout on its output).
* eq. 19, ``L_mner = -sum_i log p(y|X)``: a sum over the batch, so ``crf_reduction =
  "sum"``; the ESD loss is summed over rows too, keeping UMT's 0.5 relative weight.
* eq. 20, ``L = L_mner + lambda (L_G^C + L_E^C) + beta (L_G^KD + L_E^KD)``: the trainer
  adds the CRF loss (eq. 19) to the aux losses, which are already multiplied by
  ``cl_weight`` (lambda) and ``kd_weight`` (beta). With the paper's reductions (sums for
  eqs. 7, 8 and 19, the 1/B mean of eq. 10) lambda and beta are the weights of eq. 20
  as written: the summed terms grow with the batch size, the contrastive ones do not.

The paper does not report lambda and beta; both default to 1.0. tau = 0.05, d2 = 512
(CLIP ViT-B) and 12 attention heads are its section 3.1 values; d2 follows the cached
CLIP dim so the student lands in the teacher's space.

Images that could not be read are excluded from both contrastive losses (``valid=``)
and replaced by a learned no-image embedding in the output module. At prediction time
the teacher embeddings and entity spans are absent: KD and contrastive losses are
skipped and only the output module runs.

Ablation switches (Table 2): ``no_kd`` (-KD: no ``kd_*`` losses), ``no_cl``
(-Contra.: no ``contrastive_*`` losses), ``no_visual`` (-Visual., "removing entire
vision-related modules": no image input, no interaction module, no contrastive losses
and no CLIP-teacher distillation either, so neither ``E(.)`` nor any cached feature is
used; UMT's text-only parts, the text layer and the span detection branch, stay, and
the head returns the text layer's ``H``). ``E(.)`` exists only while a loss uses it.
The trainer still loads the cached CLIP text teacher for every MGC run (the head
ignores it under ``no_visual``), so the cache must hold ``clip_text``.

Diagnostics: ``mgc_image_text_sim`` (B,) cosine of ``g`` and ``u_gl_s`` in the joint
space; ``mgc_gate`` (B,) mean visual gate over real tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mner.errors import CacheError, ConfigError
from mner.train.distributed import local_sum_scale
from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.heads.layers import (
    MultimodalInteraction,
    UMTOutputModule,
    attention_heads,
    mean_gate,
    span_mean,
)
from mner.train.losses import info_nce
from mner.train.recipes import BEST_DEV, DEVLIN, Recipe

IMAGE = "clip/image_embed"
TEACHER = "clip_text/sentence"


@dataclass(frozen=True)
class MGCConfig:
    """MGC hyperparameters and ablation switches (paper section 3.1 and Table 2).

    Attributes:
        joint_dim: d2, the joint space size; None = the cached CLIP embedding dim
            (512 for ViT-B/32). Must equal the teacher's dim.
        temperature: tau of the contrastive losses (0.05).
        cl_weight: lambda in eq. 20 (not reported; 1.0).
        kd_weight: beta in eq. 20 (not reported; 1.0).
        heads: attention heads of the output module; None keeps head size 64
            (12 at D=768, the paper's value).
        ffn_dim: FFN inner size; None = the encoder's intermediate size (4 * D
            when the head is built without an encoder).
        dropout: dropout in the output module's transformer layers.
        no_kd: ablation -KD: no knowledge distillation from the CLIP text teacher.
        no_cl: ablation -Contra.: no global/local contrastive losses.
        no_visual: ablation -Visual.: no vision-related module at all (image input,
            interaction, contrastive losses and the CLIP-teacher distillation).
        output_module: ``umt`` = UMT's complete output module (text layer, interaction,
            span detection and conversion, MGC is "based on UMT"); ``interaction`` = the
            reduced variant, the interaction module alone.
        esd_weight: weight of UMT's span detection loss (``umt``; 0.5, UMT's code).
        conversion_weight: weight of the converted span scores in the emissions
            (``umt``; 0.5, UMT's code).
        kd_reduction: ``sum`` (eqs. 7-8) or ``mean`` of the distillation distances.
    """

    #: Old option names (saved configs, ``-o``) -> their names now (BFCL's and MGIPS-CL's).
    renamed_options: ClassVar[dict[str, str]] = {"no_contrastive": "no_cl", "contrastive_weight": "cl_weight"}

    joint_dim: int | None = None
    temperature: float = 0.05
    cl_weight: float = 1.0
    kd_weight: float = 1.0
    heads: int | None = None
    ffn_dim: int | None = None
    dropout: float = 0.1
    no_kd: bool = False
    no_cl: bool = False
    no_visual: bool = False
    output_module: Literal["umt", "interaction"] = "umt"
    esd_weight: float = 0.5
    conversion_weight: float = 0.5
    kd_reduction: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        if not 0.0 <= self.conversion_weight <= 1.0:
            raise ValueError(f"conversion_weight must be in [0, 1], got {self.conversion_weight}")
        if self.esd_weight < 0:
            raise ValueError(f"esd_weight must not be negative, got {self.esd_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.cl_weight < 0 or self.kd_weight < 0:
            raise ValueError("cl_weight and kd_weight must not be negative")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.joint_dim is not None and self.joint_dim < 1:
            raise ValueError(f"joint_dim must be positive, got {self.joint_dim}")

    @property
    def uses_contrastive(self) -> bool:
        return not (self.no_cl or self.no_visual)

    @property
    def uses_kd(self) -> bool:
        return not (self.no_kd or self.no_visual)


@register
class MGCHead(UMTOutputModule, FusionHead):
    """MGC: CLIP-distilled joint space, multi-granularity contrast, UMT output module.

    Distributed training: under DDP the global and entity image-text contrastive losses
    (eqs. 9-12) gather the embeddings of every rank (``losses.info_nce``), so negatives
    come from the whole global batch as in one process, and gradients reach the rank
    that owns each row; the distillation losses are per tweet.
    """

    name = "mgc"
    recipe = Recipe(
        "MGC (Multi-Granularity Contrastive Knowledge Distillation for MNER), section 3.1",
        encoder=("bert-base-cased", "sec. 3.1: BERT-BASE-CASED"),
        batch_size=(64, "sec. 3.1: batch size 64 (the contrastive losses' negatives come from the batch)"),
        epochs=(24, "not given (sec. 3.1 defers to Devlin et al., whose 2-4 epochs are for GLUE): "
                "UMT's released code, the model MGC builds on: 24 for twitter2015"),
        patience=(0, "not given: " + BEST_DEV + ", as UMT's released code"),
        lr_encoder=(5e-5, "sec. 3.1: AdamW, initial learning rate 5e-5"),
        lr_head=(5e-5, "sec. 3.1: AdamW, initial learning rate 5e-5"),
        warmup_ratio=(0.1, DEVLIN),
        max_length=(128, "sec. 3.1: maximum sentence length 128"),
        dropout=(0.1, DEVLIN + " (BERT's hidden dropout 0.1)"),
        datasets={"twitter2017": {"epochs": (
            22, "not given: UMT's released code run_mtmner_crf.py, 22 for twitter2017")}},
    )
    summary = "MGC: CLIP text-teacher distillation, global + entity image-text contrast, UMT gated fusion"
    needs = (IMAGE,)
    needs_text_teacher = True
    default_scheme = "bio2"
    Config = MGCConfig
    ffn_follows_encoder = True  # UMT's output module, built from the BERT config
    crf_reduction = "sum"  # eq. 19

    @classmethod
    def required_features(cls, cfg: MGCConfig) -> tuple[str, ...]:
        """``clip/image_embed``, or nothing under the -Visual. ablation."""
        return () if cfg.no_visual else cls.needs

    def __init__(self, cfg: MGCConfig, text_dim: int, feature_dims: Mapping[str, int]):
        super().__init__(cfg, text_dim, feature_dims)
        D = text_dim
        # d2 is the teacher's space: the CLIP image dim, or (under -Visual., where no
        # image is read) the cached text-teacher dim when the trainer passes it.
        joint_dim = cfg.joint_dim or self.feature_dims.get(IMAGE) or self.feature_dims.get(TEACHER)
        self.joint = None
        if cfg.uses_contrastive or cfg.uses_kd:
            if joint_dim is None:
                raise ConfigError(
                    "train.head: MGC's joint space size is unknown without the CLIP image "
                    "embedding; set head.joint_dim to the cached CLIP dim "
                    "(`mner inspect` shows it as the dims of clip_text/sentence)"
                )
            if self.feature_dims.get(IMAGE, joint_dim) != joint_dim:
                raise ConfigError(
                    f"train.head.joint_dim: {joint_dim} differs from the cached CLIP image "
                    f"embedding dim {self.feature_dims[IMAGE]}; leave joint_dim unset"
                )
            self.joint = nn.Linear(D, joint_dim)  # E(.), eqs. 2-3
        self.joint_dim = joint_dim
        heads, ffn = attention_heads(D, cfg.heads), cfg.ffn_dim or 4 * D
        visual_dim = None if cfg.no_visual else self.feature_dims[IMAGE]
        self.interaction = None
        if cfg.output_module == "umt":
            self.build_umt_output(D, visual_dim, heads, ffn, cfg.dropout, visual=not cfg.no_visual)
        elif not cfg.no_visual:
            self.interaction = MultimodalInteraction(D, visual_dim, heads, ffn, cfg.dropout)
            self.out_dim = self.interaction.out_dim

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Output module plus, when training inputs are present, the KD and contrastive losses.

        Args:
            batch: ``hidden`` (B, T, D), ``token_mask`` (B, T), ``visual["clip/image_embed"]``
                (B, Dc), ``image_mask`` (B,); for the losses ``text_teacher``
                (``sentence`` (B, Dc), ``entities`` (B, E, Dc)), ``entity_spans``
                (B, E, 2) and ``entity_mask`` (B, E).

        Returns:
            ``hidden`` (B, T, out_dim), the enabled ``aux_losses`` and diagnostics.
        """
        cfg = self.cfg
        H = batch.hidden
        mask = batch.token_mask
        B = H.shape[0]
        out = HeadOutput(hidden=H)
        image_mask = batch.image_mask
        g = batch.visual[IMAGE].to(H.dtype) if not cfg.no_visual else None  # (B, Dc)

        # Output module, eqs. 13-18: the image embedding is one visual item (R=1).
        if cfg.output_module == "umt":
            res = self.umt_output(
                H,
                mask,
                None if g is None else g.unsqueeze(1),
                image_mask,
                labels=batch.labels,
                label_names=batch.label_names,
                reduction=self.crf_reduction,
            )
            out.hidden = res.hidden
            if res.gate is not None:
                out.diagnostics["mgc_gate"] = mean_gate(res.gate, mask)
            if res.esd_loss is not None:
                out.aux_losses["esd"] = cfg.esd_weight * res.esd_loss
            out.emission_prior, out.prior_weight = res.emission_prior, cfg.conversion_weight
        elif self.interaction is not None:
            fused = self.interaction(H, mask, g.unsqueeze(1), image_mask)
            out.hidden = fused.hidden
            out.diagnostics["mgc_gate"] = mean_gate(fused.gate, mask)

        if self.joint is None:
            return out
        u_gl = self.joint(H[:, 0])  # eq. 2: (B, Dc)
        if g is not None:
            out.diagnostics["mgc_image_text_sim"] = F.cosine_similarity(
                g.float(), u_gl.detach().float(), dim=-1
            )
        teacher = batch.text_teacher or {}
        if not teacher:  # prediction time: no teacher, no gold entities
            return out

        has_entities = batch.entity_spans is not None and batch.entity_mask is not None
        if has_entities:
            e_mask = batch.entity_mask.bool()  # (B, E)
            u_e = self.joint(span_mean(H, batch.entity_spans, e_mask))  # eq. 3: (B, E, Dc)

        if cfg.uses_kd:
            u_gl_t = teacher["sentence"]  # eq. 5: (B, Dc)
            if u_gl_t.shape[-1] != self.joint_dim:
                raise CacheError(
                    f"the cached CLIP text teacher is {u_gl_t.shape[-1]}-d but MGC's joint "
                    f"space is {self.joint_dim}-d; extract image and text features with one "
                    "CLIP model (or unset head.joint_dim)"
                )
            out.aux_losses["kd_global"] = cfg.kd_weight * _distance(
                u_gl_t, u_gl, u_gl_t.abs().sum(-1) > 0, cfg.kd_reduction
            )  # eq. 7
            if has_entities and "entities" in teacher:
                u_e_t = teacher["entities"]  # eq. 6: (B, E, Dc)
                if u_e_t.shape[:2] != u_e.shape[:2]:
                    raise ValueError(
                        f"teacher entities {tuple(u_e_t.shape)} do not match entity_spans "
                        f"{tuple(batch.entity_spans.shape)}"
                    )
                out.aux_losses["kd_entity"] = cfg.kd_weight * _distance(
                    u_e_t, u_e, e_mask, cfg.kd_reduction
                )  # eq. 8

        if cfg.uses_contrastive:
            tau = cfg.temperature
            # eqs. 9-10: each image must pick its own sentence among the batch's.
            out.aux_losses["contrastive_global"] = cfg.cl_weight * info_nce(
                g.float(), u_gl.float(), tau, direction="a2b", valid=image_mask
            )
            if has_entities:
                # eq. 11: the entity most similar to the image stands for the sentence.
                # Only the argmax is used; float32 avoids mixed dtypes under autocast.
                sim = torch.einsum(
                    "bd,bed->be", F.normalize(g.float(), dim=-1), F.normalize(u_e.detach().float(), dim=-1)
                )
                best = sim.masked_fill(~e_mask, float("-inf")).argmax(-1)  # (B,)
                u_best = u_e[torch.arange(B, device=H.device), best]  # (B, Dc)
                # eq. 12 and the loss of eq. 10 over image-entity pairs.
                out.aux_losses["contrastive_entity"] = cfg.cl_weight * info_nce(
                    g.float(), u_best.float(), tau, direction="a2b", valid=image_mask & e_mask.any(-1)
                )
        return out


def _distance(target: torch.Tensor, pred: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Euclidean distances ``||target - pred||_2`` of the valid rows, summed or averaged.

    Args:
        target: (..., Dc) teacher embeddings (no gradient flows into them).
        pred: (..., Dc) student embeddings.
        valid: (...) bool.
        reduction: ``sum`` (eqs. 7-8) or ``mean``.

    Returns:
        A scalar; 0 (still attached to ``pred``) when nothing is valid.
    """
    # The epsilon keeps the gradient of the norm finite at a zero distance.
    dist = ((target.detach().float() - pred.float()).pow(2).sum(-1) + 1e-8).sqrt()
    w = valid.to(dist.dtype)
    total = (dist * w).sum()
    # Summed over this rank's rows: under DDP scaled so the ranks add up to the global sum.
    return total * local_sum_scale() if reduction == "sum" else total / w.sum().clamp(min=1.0)
