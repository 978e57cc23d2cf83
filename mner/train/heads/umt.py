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
  the text dim D by ``MultimodalInteraction.visual_proj`` (``V`` below); rows of
  missing images are replaced by the learned ``no_image`` embedding.
* text input ``H``: the encoder states passed through one transformer layer
  (``UMTHead.text_layer``, UMT's "main" text branch; switch ``text_layer``: False uses
  the encoder states as ``H``, as MGC's section 2.4 summary states it).
* eqs. 13-16, ``P = LN(P~ + FFN(P~))`` with ``P~ = LN(g + M(H, g))``: regions attend to
  words, a shared ``CrossModalLayer`` ``img2txt`` (query V, key/value H) -> ``P`` (B, R, D).
  The interaction module (``MultimodalInteraction``) and its layers are the shared
  building blocks of ``mner/train/heads/layers.py``, which MGC's output module uses too.
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

import torch
import torch.nn.functional as F
from torch import nn
from torchcrf import CRF

from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.heads.layers import (
    CrossModalLayer,
    MultimodalInteraction,
    attention_heads,
    mean_gate,
)
from mner.train.recipes import UMT_CODE

# ---------------------------------------------------------------------------------------
# Entity span detection (UMT's auxiliary text-only module).
# ---------------------------------------------------------------------------------------

#: Untyped span tags of the ESD task.
SPAN_TAGS = ("O", "B", "I")


def span_tag_map(label_names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Map typed tag ids to untyped span tag ids (index into :data:`SPAN_TAGS`).

    ``B-X``/``S-X`` -> B, ``I-X``/``E-X`` -> I, anything else (``O``) -> O.

    Returns:
        (L,) long tensor.
    """
    out = []
    for name in label_names:
        prefix = name.split("-", 1)[0] if "-" in name else name
        out.append(1 if prefix in ("B", "S") else 2 if prefix in ("I", "E") else 0)
    return torch.tensor(out, dtype=torch.long)


def conversion_matrix(label_names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """UMT's fixed conversion from span tag scores to typed tag scores.

    Row ``s`` spreads span tag ``s`` (``O``, ``B``, ``I``) over the typed tags it stands
    for: ``O`` -> ``O`` with weight 1; ``B`` -> each ``B-X`` and ``S-X``, ``I`` -> each
    ``I-X`` and ``E-X``, with weight 1 / (number of entity types).

    Returns:
        (3, K) float tensor, K = ``len(label_names)``.
    """
    spans = span_tag_map(label_names)
    types = {n.split("-", 1)[1] for n in label_names if "-" in n}
    w = torch.zeros(len(SPAN_TAGS), len(label_names))
    w[spans, torch.arange(len(label_names))] = 1.0
    w[1:] /= max(len(types), 1)
    return w


def compact_labelled(
    emissions: torch.Tensor, tags: torch.Tensor, labelled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the labelled positions (first sub-tokens) of each row to the left.

    Args:
        emissions: (B, T, K).
        tags: (B, T) long.
        labelled: (B, T) bool.

    Returns:
        ``(emissions (B, W, K), tags (B, W), mask (B, W))`` with W the largest number
        of labelled positions in a row; word order is kept.
    """
    count = labelled.sum(1)
    W = max(int(count.max()), 1)
    # Stable sort puts labelled positions first, in their original order.
    order = torch.sort((~labelled).to(torch.int8), dim=1, stable=True).indices[:, :W]
    em = emissions.gather(1, order.unsqueeze(-1).expand(-1, -1, emissions.shape[-1]))
    tg = tags.gather(1, order)
    mask = torch.arange(W, device=tags.device).unsqueeze(0) < count.unsqueeze(1)
    return em, tg.masked_fill(~mask, 0), mask


# ---------------------------------------------------------------------------------------
# The head.
# ---------------------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
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
class UMTHead(FusionHead):
    """UMT (Yu et al. 2020): multimodal transformer over the ResNet grid + ESD."""

    name = "umt"
    recipe = UMT_CODE  # its released code's training recipe (mner.train.recipes)
    summary = "UMT (ACL'20): cross-modal transformer over the ResNet grid, visual gate, span detection"
    needs = ("resnet/grid",)
    default_scheme = "bio2"
    Config = UMTConfig
    ffn_follows_encoder = True

    def __init__(self, cfg: UMTConfig, text_dim: int, feature_dims: Mapping[str, int]):
        super().__init__(cfg, text_dim, feature_dims)
        D = text_dim
        heads = attention_heads(D, cfg.heads)
        ffn = cfg.ffn_dim or 4 * D
        # UMT's main text branch: one more transformer layer over BERT.
        self.text_layer = CrossModalLayer(D, heads, ffn, cfg.dropout) if cfg.text_layer else None
        self.interaction = MultimodalInteraction(
            D,
            self.feature_dims["resnet/grid"],
            heads,
            ffn,
            cfg.dropout,
            image_aware=not cfg.no_image_aware,
            word_aware=not cfg.no_word_aware,
            gate=not cfg.no_gate,
        )
        self.out_dim = self.interaction.out_dim
        self.esd_layer = self.esd_classifier = self.esd_crf = None
        if cfg.esd:
            # A separate text-only branch, so span detection cannot lean on the image.
            self.esd_layer = CrossModalLayer(D, heads, ffn, cfg.dropout)
            self.esd_classifier = nn.Linear(D, len(SPAN_TAGS))
            if cfg.esd_decoder == "crf":
                self.esd_crf = CRF(len(SPAN_TAGS), batch_first=True)
        # Fixed tables derived from the tag names (span map, conversion matrix), per device.
        self._tables: dict[tuple, torch.Tensor] = {}

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
        mask = batch.token_mask
        H = batch.hidden if self.text_layer is None else self.text_layer(batch.hidden, batch.hidden, mask)  # (B, T, D)
        fused = self.interaction(H, mask, batch.visual["resnet/grid"], batch.image_mask)
        out = HeadOutput(hidden=fused.hidden)
        if fused.gate is not None:
            out.diagnostics["umt_gate"] = mean_gate(fused.gate, mask)
        convert = self.cfg.esd and self.cfg.conversion
        if self.cfg.esd and (batch.labels is not None or convert):
            # ESD's own text branch (UMT's second self-attention layer) -> B/I/O scores.
            # float32: the CRF's log-sum-exp is sensitive to half precision under autocast.
            logits = self.esd_classifier(self.esd_layer(batch.hidden, batch.hidden, mask)).float()  # (B, T, 3)
            if batch.labels is not None:
                out.aux_losses["esd"] = self.cfg.esd_weight * self._esd_loss(logits, batch)
            if convert:
                out.emission_prior = logits @ self._conversion(batch.label_names, logits.device)  # (B, T, K)
                out.prior_weight = self.cfg.conversion_weight
        return out

    def _esd_loss(self, logits: torch.Tensor, batch: HeadInput) -> torch.Tensor:
        """Untyped B/I/O span detection loss (mean over rows) of (B, T, 3) ``logits``."""
        labels = batch.labels
        labelled = labels >= 0
        span = self._span_map(batch.label_names, labels.device)[labels.clamp(min=0)]  # (B, T)
        if self.cfg.esd_decoder == "softmax":
            return F.cross_entropy(logits[labelled], span[labelled]) if labelled.any() else logits.sum() * 0.0
        rows = labelled.any(1)  # the CRF needs at least one position per row
        if not rows.any():
            return logits.sum() * 0.0
        em, tags, m = compact_labelled(logits[rows], span[rows], labelled[rows])
        return -self.esd_crf(em, tags, mask=m, reduction="mean")

    def _conversion(self, label_names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        return self._label_table(conversion_matrix, label_names, device, "UMT's conversion matrix")

    def _span_map(self, label_names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        return self._label_table(span_tag_map, label_names, device, "UMT's ESD loss")

    def _label_table(self, build, label_names, device: torch.device, user: str) -> torch.Tensor:
        """``build(label_names)`` on ``device``, kept until the tag set or device changes."""
        names = tuple(label_names)
        if not names:
            raise ValueError(f"{user} needs HeadInput.label_names")
        key = (build.__name__, names, device)
        if key not in self._tables:
            self._tables[key] = build(names).to(device)
        return self._tables[key]
