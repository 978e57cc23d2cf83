"""Fusion building blocks shared by the heads: masks, the attention-head rule, the
standard cross-modal transformer layer, UMT's multimodal interaction module, and UMT's
complete output module (extra text layer + interaction + entity span detection with
its conversion matrix), which UMT and MGC (built "based on UMT") both use.

Mask convention (one for the whole package): a boolean mask is True for a real item
(a real sub-token, a real region, an image that was read), as in ``HeadInput`` and in
UMT's code. ``torch.nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` want the
opposite ("True = ignore"); :func:`key_padding_mask` is the one place that converts, and
layers here take "is real" masks only.

A head whose paper uses the standard layer imports :class:`CrossModalLayer`; a paper
whose layer differs keeps its variant in its own module, with a one-line comment saying
how it differs from this one.

Letters in shape comments: B batch, T sub-tokens, N queries, M memory items, R regions,
D dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchcrf import CRF

from mner.errors import ConfigError
from mner.train.distributed import local_sum_scale

# ---------------------------------------------------------------------------------------
# Masks.
# ---------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` counting only positions where ``mask`` is True.

    Args:
        x: (B, N, D) values.
        mask: (B, N) bool.
        dim: the dimension to reduce (the N of ``mask``).

    Returns:
        (B, D); rows with no True position are zeros.
    """
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """Turn a (B, N) "is real" mask into nn.MultiheadAttention's (B, N) "ignore" mask.

    A row with no real key (an image that is missing, zero objects) would make softmax
    produce NaN, so such rows keep their first key visible; callers zero or gate out
    those rows through ``image_mask``.
    """
    ignore = ~mask.bool()
    empty = ignore.all(dim=-1)
    if empty.any():
        ignore = ignore.clone()
        ignore[empty, 0] = False
    return ignore


def replace_missing(x: torch.Tensor, image_mask: torch.Tensor, no_image: torch.Tensor) -> torch.Tensor:
    """Substitute a learned "no image" embedding for the rows of missing images.

    Args:
        x: (B, ..., D) visual tensor (rows of missing images are zeros from the cache).
        image_mask: (B,) bool, True where the image was read.
        no_image: (D,) or broadcastable (..., D) learned parameter.

    Returns:
        Tensor shaped like ``x``.
    """
    keep = image_mask.bool().view(-1, *([1] * (x.dim() - 1)))
    # where, not x * keep: a NaN or inf in a missing row must not survive as NaN * 0.
    return torch.where(keep, x, no_image.to(x.dtype))


def span_mean(hidden: torch.Tensor, spans: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pool token states over [start, end) spans.

    Args:
        hidden: (B, T, D).
        spans: (B, E, 2) long start/end sub-token indices.
        span_mask: (B, E) bool.

    Returns:
        (B, E, D); padded spans are zeros.
    """
    T = hidden.shape[1]
    pos = torch.arange(T, device=hidden.device).view(1, 1, T)
    inside = (pos >= spans[..., :1]) & (pos < spans[..., 1:]) & span_mask.unsqueeze(-1)  # (B,E,T)
    w = inside.to(hidden.dtype)
    return torch.einsum("bet,btd->bed", w, hidden) / w.sum(-1, keepdim=True).clamp(min=1.0)


# ---------------------------------------------------------------------------------------
# Attention heads.
# ---------------------------------------------------------------------------------------

#: BERT's attention head size: ``heads: null`` gives a D-dim layer D // 64 heads.
HEAD_SIZE = 64


def attention_heads(dim: int, heads: int | None, *, default: int | None = None, option: str = "heads") -> int:
    """The number of attention heads of a ``dim``-wide layer: the one rule of every head.

    An explicit ``heads`` must divide ``dim``. ``None`` means ``default`` (a head's
    paper value, e.g. HamLearning's 12) or, without one, BERT's head size of 64
    (``dim // 64``: 12 at D=768 as in every paper here, 2 at the tiny profile's D=128),
    lowered to the largest count that divides ``dim``.

    Args:
        dim: D, the layer width.
        heads: the configured value (``train.head.heads``), or None.
        default: the count ``None`` stands for; None = ``dim // 64``.
        option: the config field, for the error message.

    Returns:
        A head count >= 1 that divides ``dim``.

    Raises:
        ConfigError: ``heads`` is set and does not divide ``dim``.
    """
    if heads is None:
        wanted = max(1, default if default is not None else dim // HEAD_SIZE)
        return max(h for h in range(1, min(wanted, dim) + 1) if dim % h == 0)
    if heads < 1 or dim % heads:
        raise ConfigError(
            f"train.head.{option}: {heads} does not divide the hidden size {dim}; "
            f"set -o head.{option} to a divisor of {dim}, or null for the default"
        )
    return heads


# ---------------------------------------------------------------------------------------
# The standard cross-modal transformer layer.
# ---------------------------------------------------------------------------------------


class CrossModalLayer(nn.Module):
    """A post-LN (BERT-style) transformer layer whose queries attend to a memory.

    With ``memory is query`` it is an ordinary self-attention layer; with another
    modality as memory it is the cross-modal transformer layer of UMT (MGC eqs. 13-16),
    BFCL (eqs. 6-7) and HamLearning (eq. 15)::

        X~ = LN(query + Dropout(MultiHead(query, memory, memory)))
        X  = LN(X~ + Dropout(FFN(X~)))

    Args:
        dim: D.
        heads: attention heads (see :func:`attention_heads`).
        ffn_dim: inner size of the FFN.
        dropout: dropout on the attention weights and on both sublayer outputs.
        ffn_dropout: dropout between the FFN's two linear layers too (the
            ``nn.TransformerEncoderLayer`` FFN); False is BERT's FFN
            (BertIntermediate + BertOutput), which UMT's layers reuse.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, *, ffn_dropout: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        inner = [nn.Dropout(dropout)] if ffn_dropout else []
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), *inner, nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Args:
            query: (B, N, D).
            memory: (B, M, D) keys and values.
            memory_mask: (B, M) bool, True for real memory items; None when all are real.

        Returns:
            (B, N, D).
        """
        ignore = None if memory_mask is None else key_padding_mask(memory_mask)
        ctx, _ = self.attn(query, memory, memory, key_padding_mask=ignore, need_weights=False)
        x = self.norm1(query + self.drop(ctx))
        return self.norm2(x + self.drop(self.ffn(x)))


# ---------------------------------------------------------------------------------------
# UMT's multimodal interaction module (UMT's and MGC's output module).
# ---------------------------------------------------------------------------------------


@dataclass
class InteractionOutput:
    """What :class:`MultimodalInteraction` returns.

    Attributes:
        hidden: (B, T, 2D) ``[A; B]``, or (B, T, D) ``A`` without the word-aware branch.
        gate: (B, T, D) visual gate ``c`` (eq. 17), or None when there is no gate.
    """

    hidden: torch.Tensor
    gate: torch.Tensor | None


class MultimodalInteraction(nn.Module):
    """UMT's multimodal interaction module, the output module of UMT and of MGC.

    Yu, Jiang, Yang and Xia, "Improving Multimodal Named Entity Recognition via Entity
    Span Detection with Unified Multimodal Transformer", ACL 2020; equation numbers are
    those of its summary in MGC's section 2.4 (eqs. 13-18), see docs/papers.md.

    * ``V = visual_proj(g)``; rows of missing images become the learned ``no_image``.
      With ``visual_projections=2`` (UMT's released code, ``my_bert/mner_modeling.py``:
      ``vismap2text`` and ``vismap2text_v2``) the regions attending to words get their
      own projection ``V2 = visual_proj_v2(g)``; with 1, ``V`` serves both paths.
    * eqs. 13-16: regions attend to words, ``img2txt`` (query V2, memory H) -> ``P``.
    * image-aware words ``A``: ``txt2img_word`` (query H, memory P).
    * word-aware visual ``Q``: ``txt2img_visual`` (query H, memory V).
    * eq. 17, ``c = sigmoid(W [A; Q])`` (``gate``); eq. 18, ``B = c * Q``; out ``[A; B]``.

    Args:
        dim: D, the text hidden size (the fused representations have this size).
        visual_dim: Dv, the last dim of the visual input (projected to D).
        heads: attention heads (see :func:`attention_heads`).
        ffn_dim: FFN inner size.
        dropout: dropout inside the transformer layers.
        image_aware: build the image-aware word representation ``A`` (else ``A = H``).
        word_aware: build the word-aware visual representation ``Q`` and ``B``.
        gate: apply the visual gate to ``Q`` (needs ``word_aware``).
        visual_projections: 2 = separate projections of ``g`` for the two paths (UMT's
            code), 1 = one shared projection.
    """

    def __init__(
        self,
        dim: int,
        visual_dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float,
        *,
        image_aware: bool = True,
        word_aware: bool = True,
        gate: bool = True,
        visual_projections: int = 1,
    ):
        super().__init__()
        if visual_projections not in (1, 2):
            raise ValueError(f"visual_projections must be 1 or 2, got {visual_projections}")
        self.visual_proj = nn.Linear(visual_dim, dim)
        # Stands in for the regions of a missing image, so that the zeros the cache
        # stores for it are never attended to as if they were image content.
        self.no_image = nn.Parameter(torch.randn(dim) * 0.02)
        self.img2txt = self.txt2img_word = None
        if image_aware:
            self.img2txt = CrossModalLayer(dim, heads, ffn_dim, dropout)
            self.txt2img_word = CrossModalLayer(dim, heads, ffn_dim, dropout)
        self.txt2img_visual = self.gate = None
        if word_aware:
            self.txt2img_visual = CrossModalLayer(dim, heads, ffn_dim, dropout)
            if gate:
                self.gate = nn.Linear(2 * dim, dim)
        # Built last so that one projection gives the same seeded weights as before.
        # With one path only (no A or no Q) one projection serves it.
        self.visual_proj_v2 = None
        if visual_projections == 2 and image_aware and word_aware:
            self.visual_proj_v2 = nn.Linear(visual_dim, dim)
        self.out_dim = 2 * dim if word_aware else dim

    def forward(
        self,
        text: torch.Tensor,
        token_mask: torch.Tensor,
        visual: torch.Tensor,
        image_mask: torch.Tensor,
        region_mask: torch.Tensor | None = None,
    ) -> InteractionOutput:
        """Fuse text states with visual items.

        Args:
            text: (B, T, D) text states ``H``.
            token_mask: (B, T) bool, True for real sub-tokens.
            visual: (B, R, Dv) visual items ``g`` (R=49 grid cells, or R=1 for a
                single image vector).
            image_mask: (B,) bool, True where the image was read.
            region_mask: (B, R) bool for padded items; None when all R are real.

        Returns:
            :class:`InteractionOutput`.
        """
        B, R = visual.shape[:2]
        V = self.visual_proj(visual)  # (B, R, D)
        V = replace_missing(V, image_mask, self.no_image)
        if region_mask is None:
            region_mask = torch.ones(B, R, dtype=torch.bool, device=visual.device)
        # A missing image's items are all the no-image embedding: let words see them.
        region_mask = region_mask.bool() | ~image_mask.bool().view(B, 1)

        if self.img2txt is not None:
            V2 = V
            if self.visual_proj_v2 is not None:
                V2 = replace_missing(self.visual_proj_v2(visual), image_mask, self.no_image)
            P = self.img2txt(V2, text, token_mask)  # eqs. 13-16: (B, R, D)
            A = self.txt2img_word(text, P, region_mask)  # image-aware words: (B, T, D)
        else:
            A = text
        if self.txt2img_visual is None:
            return InteractionOutput(hidden=A, gate=None)
        Q = self.txt2img_visual(text, V, region_mask)  # word-aware visual: (B, T, D)
        if self.gate is not None:
            c = torch.sigmoid(self.gate(torch.cat([A, Q], dim=-1)))  # eq. 17: (B, T, D)
            Bv = c * Q  # eq. 18
        else:
            c, Bv = None, Q
        return InteractionOutput(hidden=torch.cat([A, Bv], dim=-1), gate=c)


def mean_gate(gate: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of a (B, T, D) gate over real tokens and dims, detached for reports."""
    return masked_mean(gate.detach().float().mean(-1, keepdim=True), token_mask).squeeze(-1)


# ---------------------------------------------------------------------------------------
# Entity span detection (UMT's auxiliary text-only module) and its conversion matrix.
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
# UMT's complete output module (UMT's head and MGC's full-UMT output module).
# ---------------------------------------------------------------------------------------


@dataclass
class UMTOutput:
    """What :meth:`UMTOutputModule.umt_output` returns.

    Attributes:
        hidden: (B, T, 2D) ``[A; B]`` (or (B, T, D) without the word-aware branch).
        gate: (B, T, D) visual gate, or None.
        esd_loss: the unweighted ESD loss (reduced over rows as ``reduction`` says), or
            None without labels or without the ESD branch.
        emission_prior: (B, T, K) converted ESD scores (UMT's conversion matrix), or None.
    """

    hidden: torch.Tensor
    gate: torch.Tensor | None
    esd_loss: torch.Tensor | None = None
    emission_prior: torch.Tensor | None = None


class UMTOutputModule:
    """UMT's complete output module, as a mixin for a :class:`~torch.nn.Module` head.

    Yu et al. 2020 and their released code (``my_bert/mner_modeling.py``,
    ``MTCCMBertForMMTokenClassificationCRF``); UMT's head and MGC's output module (MGC
    section 2.4: "based on UMT") build it through :meth:`build_umt_output` and run it
    through :meth:`umt_output`. The parts, in the code's order:

    * ``input_dropout``: dropout on the encoder states before every branch, and none
      before the classifier (the code's ``self.dropout(sequence_output)``; the tagger's
      emission dropout is then off, ``emission_dropout = False``). Off: the tagger's
      dropout on the head's output, as for every other head.
    * ``text_layer``: UMT's extra transformer layer over the encoder states (the code's
      ``self_attention_v2``), whose output is the ``H`` the interaction reads.
    * ``interaction``: :class:`MultimodalInteraction` (eqs. 13-18).
    * entity span detection: ``esd_layer`` (the code's ``self_attention``, a separate
      text-only layer so span detection cannot lean on the image), ``esd_classifier``
      (B/I/O) and ``esd_crf``; loss on untyped span tags derived from the typed gold tags.
    * the conversion matrix: ``esd_logits @ W_tr`` (:func:`conversion_matrix`) as the
      tagger's ``emission_prior``.

    The attributes are plain attributes of the head (parameter names ``text_layer.``,
    ``interaction.``, ``esd_layer.``, ``esd_classifier.``, ``esd_crf.``), built in that
    order, so a fixed seed gives the same weights in every head that builds it.
    """

    def build_umt_output(
        self,
        dim: int,
        visual_dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float,
        *,
        text_layer: bool = True,
        esd: bool = True,
        esd_decoder: Literal["crf", "softmax"] = "crf",
        image_aware: bool = True,
        word_aware: bool = True,
        gate: bool = True,
        visual_projections: int = 2,
        encoder_dropout: bool = True,
        visual: bool = True,
    ) -> None:
        """Build the modules on ``self`` (see the class docstring); sets ``self.out_dim``.

        Args:
            dim: D, the text size. visual_dim: Dv. heads, ffn_dim, dropout: of every
                transformer layer. The switches remove what their names say;
                ``visual=False`` builds no interaction module (the text-only remainder:
                text layer and ESD, output ``H`` of size D).
        """
        self.input_dropout = nn.Dropout(dropout) if encoder_dropout else None
        self.emission_dropout = not encoder_dropout
        self.text_layer = CrossModalLayer(dim, heads, ffn_dim, dropout) if text_layer else None
        self.interaction = None
        self.out_dim = dim
        if visual:
            self.interaction = MultimodalInteraction(
                dim,
                visual_dim,
                heads,
                ffn_dim,
                dropout,
                image_aware=image_aware,
                word_aware=word_aware,
                gate=gate,
                visual_projections=visual_projections,
            )
            self.out_dim = self.interaction.out_dim
        self.esd_layer = self.esd_classifier = self.esd_crf = None
        self.esd_decoder = esd_decoder
        if esd:
            self.esd_layer = CrossModalLayer(dim, heads, ffn_dim, dropout)
            self.esd_classifier = nn.Linear(dim, len(SPAN_TAGS))
            if esd_decoder == "crf":
                self.esd_crf = CRF(len(SPAN_TAGS), batch_first=True)
        # Fixed tables derived from the tag names (span map, conversion matrix), per device.
        self._tables: dict[tuple, torch.Tensor] = {}

    def umt_output(
        self,
        hidden: torch.Tensor,
        token_mask: torch.Tensor,
        visual: torch.Tensor | None,
        image_mask: torch.Tensor,
        *,
        region_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        label_names: tuple[str, ...] = (),
        conversion: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> UMTOutput:
        """Run the output module.

        Args:
            hidden: (B, T, D) encoder states.
            token_mask: (B, T) bool.
            visual: (B, R, Dv) visual items (UMT: the 49 ResNet cells; MGC: R=1); None
                when the module was built with ``visual=False``.
            image_mask: (B,) bool.
            region_mask: (B, R) bool, or None when every item is real.
            labels: (B, T) typed tag ids at first sub-tokens (-100 elsewhere), or None.
            label_names: names of the typed tags (for the span map and conversion).
            conversion: return the converted ESD scores as ``emission_prior``.
            reduction: how the ESD loss reduces over rows (the head's CRF reduction,
                so the two tagging losses keep UMT's relative weight).

        Returns:
            :class:`UMTOutput`.
        """
        x = hidden if self.input_dropout is None else self.input_dropout(hidden)
        H = x if self.text_layer is None else self.text_layer(x, x, token_mask)  # (B, T, D)
        if self.interaction is None:
            out = UMTOutput(hidden=H, gate=None)
        else:
            fused = self.interaction(H, token_mask, visual, image_mask, region_mask)
            out = UMTOutput(hidden=fused.hidden, gate=fused.gate)
        if self.esd_layer is not None and (labels is not None or conversion):
            # float32: the CRF's log-sum-exp is sensitive to half precision under autocast.
            logits = self.esd_classifier(self.esd_layer(x, x, token_mask)).float()  # (B, T, 3)
            if labels is not None:
                out.esd_loss = self._esd_loss(logits, labels, label_names, reduction)
            if conversion:
                out.emission_prior = logits @ self._label_table(
                    conversion_matrix, label_names, logits.device, "UMT's conversion matrix"
                )  # (B, T, K)
        return out

    def _esd_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, label_names: tuple[str, ...], reduction: str
    ) -> torch.Tensor:
        """Untyped B/I/O span detection loss of (B, T, 3) ``logits``, reduced over rows."""
        labelled = labels >= 0
        span = self._label_table(span_tag_map, label_names, labels.device, "UMT's ESD loss")[labels.clamp(min=0)]
        if self.esd_decoder == "softmax":
            if not labelled.any():
                return logits.sum() * 0.0
            loss = F.cross_entropy(logits[labelled], span[labelled])  # mean over tokens
            # "sum" scales it by the rows, as a summed CRF loss scales with the batch.
            return loss * labelled.any(1).sum() * local_sum_scale() if reduction == "sum" else loss
        rows = labelled.any(1)  # the CRF needs at least one position per row
        if not rows.any():
            return logits.sum() * 0.0
        em, tags, m = compact_labelled(logits[rows], span[rows], labelled[rows])
        nll = -self.esd_crf(em, tags, mask=m, reduction=reduction)
        # A sum over this rank's rows: under DDP scaled so the ranks add up to the global sum.
        return nll * local_sum_scale() if reduction == "sum" else nll

    def _label_table(self, build, label_names, device: torch.device, user: str) -> torch.Tensor:
        """``build(label_names)`` on ``device``, kept until the tag set or device changes."""
        names = tuple(label_names)
        if not names:
            raise ValueError(f"{user} needs HeadInput.label_names")
        key = (build.__name__, names, device)
        if key not in self._tables:
            self._tables[key] = build(names).to(device)
        return self._tables[key]
