"""Marginals of the tagger's linear-chain CRF: forward-backward, and exact span probabilities.

pytorch-crf (``torchcrf.CRF``) decodes and scores paths but gives no marginals. Here the
forward-backward recursions run over its own parameters (``start_transitions`` (K,),
``transitions`` (K, K) from-to, ``end_transitions`` (K,)) and the emissions (B, W, K),
vectorised over the batch, in log space, for sequences of any length below W (a
``mask`` that is a prefix of ones, as the CRF requires).

The confidence of a predicted entity (``mner predict``'s ``score``) is a span
probability, computed exactly by a constrained forward pass::

    P(span) = P(y_s..y_{e-1} = the predicted tags, and y_e does not continue the entity)
            = exp(log Z_constrained - log Z)

where the constrained partition sums only the paths that satisfy the condition (the
other tags' emissions set to -inf), and "does not continue" means ``y_e`` is not ``I-X``
(nor ``E-X`` in BIOES) of the entity's type X; a span that ends the sentence has no such
condition. All spans of a batch go through one batched forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def _forward_scores(crf: nn.Module, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward log-scores ``alpha`` (B, W, K): log-sum over paths ending in tag k at word i."""
    B, W, K = emissions.shape
    alpha = [crf.start_transitions + emissions[:, 0]]  # (B, K)
    trans = crf.transitions.unsqueeze(0)  # (1, K_from, K_to)
    for i in range(1, W):
        nxt = torch.logsumexp(alpha[-1].unsqueeze(2) + trans, dim=1) + emissions[:, i]  # (B, K)
        # Past a sequence's end the scores are carried unchanged, so the last valid
        # position's alpha is at every later position too.
        alpha.append(torch.where(mask[:, i].unsqueeze(1), nxt, alpha[-1]))
    return torch.stack(alpha, dim=1)


def log_partition(crf: nn.Module, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log Z`` per sequence (B,): the log-sum of the scores of all tag paths.

    Args:
        crf: a ``torchcrf.CRF`` (batch_first).
        emissions: (B, W, K) float scores; ``-inf`` forbids a tag at a word.
        mask: (B, W) bool, a prefix of True per sequence (at least the first word).
    """
    alpha = _forward_scores(crf, emissions.float(), mask.bool())
    return torch.logsumexp(alpha[:, -1] + crf.end_transitions, dim=1)


def log_marginals(crf: nn.Module, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-word log tag marginals ``log P(y_i = k | x)`` by forward-backward.

    Args:
        crf: a ``torchcrf.CRF`` (batch_first).
        emissions: (B, W, K) float scores.
        mask: (B, W) bool, a prefix of True per sequence.

    Returns:
        (B, W, K) log-probabilities; rows at padded words are meaningless (mask them).
    """
    emissions, mask = emissions.float(), mask.bool()
    B, W, K = emissions.shape
    alpha = _forward_scores(crf, emissions, mask)
    log_z = torch.logsumexp(alpha[:, -1] + crf.end_transitions, dim=1)  # (B,)
    end = crf.end_transitions.unsqueeze(0).expand(B, K)
    beta = [end]  # beta at word W-1
    for i in range(W - 2, -1, -1):
        # sum over the next tag j: transition k->j + emission of j at i+1 + beta_{i+1}(j)
        nb = torch.logsumexp(crf.transitions.unsqueeze(0) + (emissions[:, i + 1] + beta[-1]).unsqueeze(1), dim=2)
        # Word i is a sequence's last when word i+1 is padding: only the end transition follows.
        beta.append(torch.where(mask[:, i + 1].unsqueeze(1), nb, end))
    beta = torch.stack(beta[::-1], dim=1)  # (B, W, K)
    return alpha + beta - log_z[:, None, None]


def marginals(crf: nn.Module, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-word tag marginals ``P(y_i = k | x)`` by forward-backward.

    Args:
        crf: a ``torchcrf.CRF`` (batch_first).
        emissions: (B, W, K) float scores.
        mask: (B, W) bool, a prefix of True per sequence.

    Returns:
        (B, W, K) probabilities; each valid word's row sums to 1, padded words are 0.
    """
    return torch.exp(log_marginals(crf, emissions, mask)) * mask.bool().unsqueeze(-1)


def span_probabilities(
    crf: nn.Module,
    emissions: torch.Tensor,
    mask: torch.Tensor,
    spans: Sequence[tuple[int, int, Sequence[int], Sequence[int]]],
) -> torch.Tensor:
    """Exact probability of each span, by one batched constrained forward pass.

    Args:
        crf: a ``torchcrf.CRF`` (batch_first).
        emissions: (B, W, K) float scores.
        mask: (B, W) bool, a prefix of True per sequence.
        spans: ``(row, start, tags, stop_not)`` per span: the sequence ``row`` of the
            batch, the first word ``start``, the tag ids the span must have on words
            ``start .. start+len(tags)-1``, and the tag ids the next word must NOT have
            (ignored when the span ends its sequence).

    Returns:
        (N,) probabilities in [0, 1], one per span.
    """
    if not spans:
        return torch.zeros(0)
    emissions, mask = emissions.float(), mask.bool()
    rows = torch.tensor([s[0] for s in spans], dtype=torch.long, device=emissions.device)
    lengths = mask.sum(1)
    allowed = torch.ones(len(spans), *emissions.shape[1:], dtype=torch.bool, device=emissions.device)
    for n, (row, start, tags, stop_not) in enumerate(spans):
        for j, t in enumerate(tags):
            allowed[n, start + j] = False
            allowed[n, start + j, t] = True
        nxt = start + len(tags)
        if nxt < int(lengths[row]) and len(stop_not):
            allowed[n, nxt, list(stop_not)] = False
    em = emissions[rows].masked_fill(~allowed, float("-inf"))
    m = mask[rows]
    log_p = log_partition(crf, em, m) - log_partition(crf, emissions, mask)[rows]
    return torch.exp(log_p).clamp(0.0, 1.0)


def continuation_tags(tag_names: Sequence[str]) -> dict[str, list[int]]:
    """Per entity type X, the ids of the tags that continue an X entity (``I-X``, ``E-X``)."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(tag_names):
        prefix, _, typ = name.partition("-")
        if prefix in ("I", "E") and typ:
            out.setdefault(typ, []).append(i)
    return out


@torch.no_grad()
def predict_scored(model, dataset, device, batch_size: int, precision: str = "fp32", decode=None):
    """Viterbi tags of every sentence, and the probability of each predicted entity.

    The same decoding as :func:`mner.train.evaluation.predict_words` (same batches, same
    autocast, the CRF's Viterbi path), plus :func:`span_probabilities` of the entities on
    each window's path. An entity that straddles two windows (a sentence longer than
    ``max_length`` sub-tokens) gets the product of its parts' probabilities, each part
    computed in its own window: an approximation, as the windows are decoded apart.

    Args:
        model: the :class:`~mner.train.model.Tagger` (switched to eval mode here).
        dataset: windows of the sentences (``NerDataset``).
        device: where to run.
        batch_size: windows per batch.
        precision: autocast precision, the run's.
        decode: tag ids -> BIO2 labels (``TagSet.decode``); default: the tag names.

    Returns:
        ``(tags, scores)``: tag ids per word for each sentence (``O`` = 0 where a word was
        not covered), and per sentence ``{(type, start, end): probability}`` for the
        entities of its BIO2 labels (word spans ``[start, end)``).
    """
    from mner.data.schemes import entities
    from mner.devices import autocast
    from mner.train.data import bucket_batches

    names = model.tag_names
    decode = decode or (lambda ids: [names[i] for i in ids])
    cont = continuation_tags(names)
    model.eval()
    tags = [[0] * len(s) for s in dataset.sentences]
    parts: list[list[tuple[str, int, int, float]]] = [[] for _ in dataset.sentences]
    for idx in bucket_batches(dataset.lengths(), batch_size, 1, None):
        batch = dataset.collate(idx)
        # Inference mode: no gold information reaches the head.
        batch.sub_labels = batch.word_tags = None
        batch.entity_spans = batch.entity_mask = None
        batch.text_teacher = {}
        batch = batch.to(device)
        with autocast(device, precision):
            emissions, _ = model(batch)
            paths = model.crf.decode(emissions, mask=batch.word_mask)
        spans, where = [], []
        for b, (wi, path) in enumerate(zip(idx, paths, strict=False)):
            win = dataset.windows[wi]
            path = path[: win.n_words]
            row = tags[win.item]
            for j, t in enumerate(path):
                row[win.word_start + j] = t
            for typ, s, e in entities(decode(path)):
                spans.append((b, s, path[s:e], cont.get(typ, [])))
                where.append((win.item, typ, win.word_start + s, win.word_start + e))
        probs = span_probabilities(model.crf, emissions.float(), batch.word_mask, spans).tolist()
        for (item, typ, s, e), p in zip(where, probs, strict=True):
            parts[item].append((typ, s, e, p))
    scores = []
    for item, row in enumerate(tags):
        got = {}
        for typ, s, e in entities(decode(row)):
            inside = [p for t, ps, pe, p in parts[item] if t == typ and s <= ps and pe <= e]
            got[(typ, s, e)] = math.prod(inside) if inside else 0.0
        scores.append(got)
    return tags, scores
