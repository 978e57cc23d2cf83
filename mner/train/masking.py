"""Masking helpers used by the trainer and every head (one place, not one per head)."""

from __future__ import annotations

import torch


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
