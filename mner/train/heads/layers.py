"""Fusion building blocks shared by the heads: masks, the attention-head rule, the
standard cross-modal transformer layer, and UMT's multimodal interaction module.

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

import torch
from torch import nn

from mner.errors import ConfigError

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
    * eqs. 13-16: regions attend to words, ``img2txt`` (query V, memory H) -> ``P``.
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
    ):
        super().__init__()
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
            P = self.img2txt(V, text, token_mask)  # eqs. 13-16: (B, R, D)
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
