"""UMT: Unified Multimodal Transformer with auxiliary entity span detection.

Paper: Jianfei Yu, Jing Jiang, Li Yang and Rui Xia, "Improving Multimodal Named Entity
Recognition via Entity Span Detection with Unified Multimodal Transformer", ACL 2020,
pp. 3342-3352, doi:10.18653/v1/2020.acl-main.306 (docs/papers.md). The equation
numbers below are those of its summary in section 2.4 ("Output Module", eqs. 13-18) of
the MGC paper (see ``mgc.py``), which builds on UMT; UMT's own design and its authors'
released code fill in what that summary leaves out (the extra text transformer layer,
the ESD branch and its loss weight 0.5).

Map from the equations (MGC paper numbering) to this module:

* visual input ``g``: the ResNet 7x7 grid ``resnet/grid`` (B, R=49, Dv), projected to
  the text dim D twice, as the released code does (``my_bert/mner_modeling.py``,
  ``MTCCMBertForMMTokenClassificationCRF``): ``interaction.visual_proj`` (the code's
  ``vismap2text``) gives the ``V`` the words attend to, ``interaction.visual_proj_v2``
  (``vismap2text_v2``) the ``V2`` that attends to the words; switch
  ``visual_projections: 1`` shares one projection (MGC's summary writes one ``g``).
  Rows of missing images are replaced by the learned ``no_image`` embedding.
* dropout (``encoder_dropout``, the released code's placement): ``dropout`` on the
  encoder states before the text layer and the ESD layer, and no dropout on the fused
  ``[A; B]`` before the classifier (the code's ``final_output = self.dropout(...)`` is
  commented out), so the tagger's emission dropout is off for this head. False: no
  input dropout and the tagger's dropout on the head's output, as for other heads.
* the loss, as the released code reduces it: ``-crf(..., reduction='mean') + 0.5 *
  -aux_crf(..., reduction='mean')``: ``crf_reduction = "mean"`` and the ESD loss is the
  mean over rows too, so ``esd_weight`` is the code's beta = 0.5 as written. The paper
  text was not at hand; the code is the source.
* text input ``H``: the encoder states passed through one transformer layer
  (``UMTHead.text_layer``, UMT's "main" text branch; switch ``text_layer``: False uses
  the encoder states as ``H``, as MGC's section 2.4 summary states it).
* eqs. 13-16, ``P = LN(P~ + FFN(P~))`` with ``P~ = LN(g + M(H, g))``: regions attend to
  words, a shared ``CrossModalLayer`` ``img2txt`` (query V2, key/value H) -> ``P`` (B, R, D).
  The whole output module (text layer, interaction, ESD, conversion:
  ``layers.UMTOutputModule``) is a shared building block of
  ``mner/train/heads/layers.py``, which MGC's output module uses too.
* image-aware word representation ``A``: words attend to ``P`` through a second
  cross-modal transformer layer ``txt2img_word`` (query H, key/value P) -> (B, T, D).
* word-aware visual representation ``Q``: words attend to the regions,
  ``txt2img_visual`` (query H, key/value V) -> (B, T, D).
* eq. 17, visual gate ``c = sigmoid(W_a A + W_q Q)``: ``gate`` = Linear(2D -> D) on
  ``[A; Q]`` (element-wise gate, as in UMT).
* eq. 18, ``B = c * Q``; output ``S = [A; B]`` (B, T, 2D), so ``out_dim = 2 * D``.
* entity span detection (UMT's auxiliary module): a separate transformer layer over the
  encoder states (``esd_layer``), a linear layer to untyped B/I/O (``esd_classifier``)
  and its own CRF (``esd_crf``); loss ``esd_weight * L_ESD`` in ``aux_losses["esd"]``.
  Gold span tags come from ``labels``/``label_names``: B-X and S-X -> B, I-X and E-X
  -> I, O -> O (so BIO2 and BIOES runs both work).

* UMT's conversion matrix (the authors' code: ``final = 0.5 * typed + 0.5 * esd @ W_tr``):
  ``conversion_matrix`` builds the fixed (3, K) ``W_tr`` (O -> O with 1; B -> every
  B-X/S-X and I -> every I-X/E-X with 1 / number of entity types, 0.25 for the four
  Twitter types, as in the code); the head returns ``esd_logits @ W_tr`` as
  ``HeadOutput.emission_prior`` with ``prior_weight = conversion_weight`` (0.5), so the
  tagger's typed emissions become ``0.5 * E + 0.5 * prior`` in training and decoding.
  The ESD branch therefore also runs at inference while the conversion is on.

Ablation switches, one per component of the design above (the UMT paper's own text
was not at hand, so its ablation table could not be checked row by row); each
removes exactly its parameters and loss term: ``text_layer`` (False: ``H`` is the
encoder output; one transformer layer less, about a sixth of the head's cost at BERT-base), ``esd`` (False:
no ESD branch, no ``esd`` loss, no conversion), ``conversion`` (False: ESD is a training-only
auxiliary loss; no parameters to remove, the matrix is fixed), ``no_gate`` (``B = Q``), ``no_image_aware`` (``A = H``:
no ``img2txt``/``txt2img_word`` layers), ``no_word_aware`` (no ``Q``, no gate, output
``A`` only, ``out_dim = D``).

Diagnostic: ``umt_gate`` (B,) is the mean visual gate over real tokens and dims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.heads.layers import (  # noqa: F401  (the ESD helpers are UMT's; re-exported)
    SPAN_TAGS,
    UMTOutputModule,
    attention_heads,
    compact_labelled,
    conversion_matrix,
    mean_gate,
    span_tag_map,
)
from mner.train.recipes import UMT_CODE


@dataclass(frozen=True)
class UMTConfig:
    """UMT hyperparameters and ablation switches.

    Attributes:
        heads: attention heads; None keeps BERT's head size 64 (12 at D=768).
        ffn_dim: FFN inner size of every transformer layer; None = the encoder's
            intermediate size (UMT builds its layers from the BERT config: 3072 for
            BERT-base), or 4 * D when the head is built without an encoder.
        dropout: dropout in the transformer layers (BERT's 0.1).
        text_layer: UMT's extra transformer layer over the encoder states (the paper
            and its code); False takes ``H`` straight from the encoder, as MGC's
            section 2.4 summary of UMT does.
        esd: auxiliary entity span detection branch and loss.
        esd_weight: weight of the ESD loss (0.5 in the UMT code).
        esd_decoder: ``crf`` (the paper) or ``softmax`` (token cross-entropy).
        conversion: mix the ESD scores, converted to typed tags, into the typed
            emissions (UMT's conversion matrix; needs ``esd``).
        conversion_weight: weight of the converted ESD scores (``1 - alpha``, 0.5 in
            the UMT code).
        no_gate: drop the visual gate (eq. 17): ``B = Q``.
        no_image_aware: drop the image-aware word representation: ``A = H``.
        no_word_aware: drop the word-aware visual representation ``Q`` (and the gate).
        visual_projections: 2 = the released code's two projections of the grid
            (``vismap2text`` for the words-attend-to-regions path, ``vismap2text_v2``
            for the regions-attend-to-words path); 1 = one shared projection.
        encoder_dropout: dropout (``dropout``) on the encoder states before every
            branch and none before the classifier, as the released code places it;
            False = the tagger's dropout on the head's output instead.
    """

    heads: int | None = None
    ffn_dim: int | None = None
    dropout: float = 0.1
    text_layer: bool = True
    esd: bool = True
    esd_weight: float = 0.5
    esd_decoder: Literal["crf", "softmax"] = "crf"
    conversion: bool = True
    conversion_weight: float = 0.5
    no_gate: bool = False
    no_image_aware: bool = False
    no_word_aware: bool = False
    visual_projections: int = 2
    encoder_dropout: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.visual_projections not in (1, 2):
            raise ValueError(f"visual_projections must be 1 or 2, got {self.visual_projections}")
        if not 0.0 <= self.conversion_weight <= 1.0:
            raise ValueError(f"conversion_weight must be in [0, 1], got {self.conversion_weight}")
        if self.esd_weight < 0:
            raise ValueError(f"esd_weight must not be negative, got {self.esd_weight}")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"ffn_dim must be positive, got {self.ffn_dim}")
        if self.no_image_aware and self.no_word_aware:
            raise ValueError(
                "no_image_aware and no_word_aware together remove every visual module; "
                "use --model bert_crf for a text-only model"
            )


@register
class UMTHead(UMTOutputModule, FusionHead):
    """UMT (Yu et al. 2020): multimodal transformer over the ResNet grid + ESD."""

    name = "umt"
    recipe = UMT_CODE  # its released code's training recipe (mner.train.recipes)
    summary = "UMT (ACL'20): cross-modal transformer over the ResNet grid, visual gate, span detection"
    needs = ("resnet/grid",)
    default_scheme = "bio2"
    Config = UMTConfig
    ffn_follows_encoder = True
    # The released code: ``- crf(..., reduction='mean')`` for both tagging losses.
    crf_reduction = "mean"

    def __init__(self, cfg: UMTConfig, text_dim: int, feature_dims: Mapping[str, int]):
        super().__init__(cfg, text_dim, feature_dims)
        D = text_dim
        self.build_umt_output(
            D,
            self.feature_dims["resnet/grid"],
            attention_heads(D, cfg.heads),
            cfg.ffn_dim or 4 * D,
            cfg.dropout,
            text_layer=cfg.text_layer,
            esd=cfg.esd,
            esd_decoder=cfg.esd_decoder,
            image_aware=not cfg.no_image_aware,
            word_aware=not cfg.no_word_aware,
            gate=not cfg.no_gate,
            visual_projections=cfg.visual_projections,
            encoder_dropout=cfg.encoder_dropout,
        )

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Fuse the encoder states with the ResNet grid.

        Args:
            batch: ``hidden`` (B, T, D), ``token_mask`` (B, T), ``visual["resnet/grid"]``
                (B, 49, Dv), ``image_mask`` (B,); ``labels`` and ``label_names`` for the
                ESD loss (skipped when ``labels`` is None).

        Returns:
            ``hidden`` (B, T, out_dim); ``aux_losses["esd"]`` when ESD is on and labels
            are given; ``emission_prior`` (B, T, K) and ``prior_weight`` when the
            conversion is on; ``diagnostics["umt_gate"]`` (B,) when the gate is on.
        """
        cfg = self.cfg
        res = self.umt_output(
            batch.hidden,
            batch.token_mask,
            batch.visual["resnet/grid"],
            batch.image_mask,
            labels=batch.labels,
            label_names=batch.label_names,
            conversion=cfg.esd and cfg.conversion,
            reduction=self.crf_reduction,
        )
        out = HeadOutput(hidden=res.hidden)
        if res.gate is not None:
            out.diagnostics["umt_gate"] = mean_gate(res.gate, batch.token_mask)
        if res.esd_loss is not None:
            out.aux_losses["esd"] = cfg.esd_weight * res.esd_loss
        if res.emission_prior is not None:
            out.emission_prior = res.emission_prior
            out.prior_weight = cfg.conversion_weight
        return out
