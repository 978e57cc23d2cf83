"""Loss functions shared by several heads.

The papers' image-text contrastive objectives (MAF eqs. 1-3, BFCL eqs. 13-15, MGC eqs.
9-12, MGIPS-CL eq. 17) are all the same InfoNCE over a batch of paired embeddings, in
one or both directions; heads call :func:`info_nce` instead of writing their own.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Direction = Literal["a2b", "b2a", "both"]


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float,
    direction: Direction = "both",
    valid: torch.Tensor | None = None,
    normalize: bool = True,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE loss over a batch where ``a[i]`` and ``b[i]`` are the positive pair.

    For direction ``a2b`` each ``a[i]`` must pick ``b[i]`` among all valid ``b[j]``:
    ``-log exp(s_ii / tau) / sum_j exp(s_ij / tau)`` with ``s`` the cosine (or dot)
    similarity; ``b2a`` is the transpose; ``both`` is their mean.

    Args:
        a: (B, D) embeddings.
        b: (B, D) embeddings paired row by row with ``a``.
        temperature: tau > 0.
        direction: which side is the anchor.
        valid: (B,) bool; rows that are False (e.g. tweets without an image) are
            neither anchors nor negatives. With fewer than two valid rows the loss is 0.
        normalize: L2-normalise before the dot product (cosine similarity).
        positives: optional (B, B) bool of extra positives per anchor row for
            multi-positive contrastive learning (MGIPS-CL's implicit positives); the loss
            for an anchor is then the mean over its positives. The diagonal is always
            positive.

    Returns:
        A scalar tensor.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce expects two (B, D) tensors of one shape, got {a.shape} {b.shape}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    B = a.shape[0]
    if valid is None:
        valid = torch.ones(B, dtype=torch.bool, device=a.device)
    if int(valid.sum()) < 2:
        return a.sum() * 0.0 + b.sum() * 0.0
    a = a[valid]
    b = b[valid]
    if normalize:
        a = F.normalize(a, dim=-1)
        b = F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature  # (B', B')
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    pos = eye if positives is None else (positives[valid][:, valid] | eye)

    def one_way(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        logp = lg.log_softmax(dim=-1)
        return -((logp * p).sum(-1) / p.sum(-1)).mean()

    if direction == "a2b":
        return one_way(logits, pos.float())
    if direction == "b2a":
        return one_way(logits.t(), pos.t().float())
    if direction == "both":
        return 0.5 * (one_way(logits, pos.float()) + one_way(logits.t(), pos.t().float()))
    raise ValueError(f"unknown direction {direction!r}; use a2b, b2a or both")
