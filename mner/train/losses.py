"""Loss functions shared by several heads.

The papers' image-text contrastive objectives (MAF eqs. 1-3, BFCL eqs. 13-15, MGC eqs.
9-12, MGIPS-CL eq. 17) are all the same InfoNCE over a batch of paired embeddings, in
one or both directions; heads call :func:`info_nce` instead of writing their own.

Under DDP (``train.parallel: ddp`` with several ranks) :func:`info_nce` gathers the
rows of every rank during a training step, so each anchor meets the negatives of the
whole global batch, as in one process; gradients flow back to the rank that owns each
row, and the averaged gradient is the one-process gradient. Multi-positive calls
(``positives=``, a (B, B) relation that exists only within one rank's rows) are computed
within each rank's share. A head must therefore call it the same number of times on
every rank (decided by its config, never by its data); a mismatch is an error.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mner.train import distributed

Direction = Literal["a2b", "b2a", "both"]


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float,
    direction: Direction = "both",
    valid: torch.Tensor | None = None,
    normalize: bool = True,
    positives: torch.Tensor | None = None,
    multi_positive: Literal["mean", "sum"] = "mean",
    diagonal_positive: bool = True,
    reduction: Literal["mean", "sum"] = "mean",
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
            for an anchor is then the mean over its positives. The diagonal is
            positive unless ``diagonal_positive`` is False.
        multi_positive: how several positives of one anchor combine: ``mean`` is the
            mean over positives of ``-log p`` (supervised-contrastive style); ``sum`` is
            ``-log`` of the summed probability of the positives (MGIPS-CL eq. 16).
        diagonal_positive: False when ``positives`` alone says which pairs are positive
            (MGIPS-CL's top-K images need not include the tweet's own image). Anchors
            left without a positive among the valid rows are skipped.
        reduction: ``mean`` (1/N sum over the anchors, MAF eq. 3, MGC eq. 10) or
            ``sum`` over the anchors (BFCL eqs. 13 and 15); ``both`` is the mean of the
            two directions either way.

    Returns:
        A scalar tensor.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce expects two (B, D) tensors of one shape, got {a.shape} {b.shape}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if positives is None and distributed.gathering_active():
        (a, b), valid = distributed.gather_rows(
            [a, b],
            torch.ones(a.shape[0], dtype=torch.bool, device=a.device) if valid is None else valid,
            distributed.caller_site(),
        )
    B = a.shape[0]
    if valid is None:
        valid = torch.ones(B, dtype=torch.bool, device=a.device)
    if valid.shape != (B,):
        raise ValueError(f"info_nce: valid must be ({B},), got {tuple(valid.shape)}")
    # A 0/1 integer mask would index rows 0 and 1 instead of selecting rows.
    valid = valid.to(torch.bool)
    if int(valid.sum()) < 2:
        return a.sum() * 0.0 + b.sum() * 0.0
    a = a[valid]
    b = b[valid]
    if normalize:
        a = F.normalize(a, dim=-1)
        b = F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature  # (B', B')
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    if positives is None:
        pos = eye
    else:
        pos = positives[valid][:, valid].bool()
        if diagonal_positive:
            pos = pos | eye
    if multi_positive not in ("mean", "sum"):
        raise ValueError(f"unknown multi_positive {multi_positive!r}; use mean or sum")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; use mean or sum")

    def reduce(per_anchor: torch.Tensor) -> torch.Tensor:
        return per_anchor.sum() if reduction == "sum" else per_anchor.mean()

    def one_way(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        has = p.sum(-1) > 0  # only without the diagonal can an anchor lack a positive
        if not bool(has.all()):
            if not bool(has.any()):
                return lg.sum() * 0.0
            lg, p = lg[has], p[has]  # a logsumexp over no positive would give NaN grads
        logp = lg.log_softmax(dim=-1)
        if multi_positive == "sum":
            return reduce(-torch.logsumexp(logp.masked_fill(p == 0, float("-inf")), dim=-1))
        return reduce(-((logp * p).sum(-1) / p.sum(-1)))

    if direction == "a2b":
        return one_way(logits, pos.float())
    if direction == "b2a":
        return one_way(logits.t(), pos.t().float())
    if direction == "both":
        return 0.5 * (one_way(logits, pos.float()) + one_way(logits.t(), pos.t().float()))
    raise ValueError(f"unknown direction {direction!r}; use a2b, b2a or both")
