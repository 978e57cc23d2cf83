"""CRF forward-backward and span probabilities against brute-force enumeration of all tag paths."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchcrf import CRF

from mner.train.crf import continuation_tags, log_partition, marginals, span_probabilities

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _crf(seed=0):
    torch.manual_seed(seed)
    crf = CRF(len(TAGS), batch_first=True)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_(0, 1.0)
    return crf


def _path_score(crf, em, path):
    s = crf.start_transitions[path[0]] + em[0, path[0]]
    for i in range(1, len(path)):
        s = s + crf.transitions[path[i - 1], path[i]] + em[i, path[i]]
    return float(s + crf.end_transitions[path[-1]])


def _brute(crf, em, n):
    """{path: probability} over all K**n paths of the first n words."""
    scores = {p: _path_score(crf, em[:n], p) for p in itertools.product(range(len(TAGS)), repeat=n)}
    z = math.log(sum(math.exp(s) for s in scores.values()))
    return {p: math.exp(s - z) for p, s in scores.items()}, z


@pytest.fixture
def case():
    crf = _crf()
    torch.manual_seed(1)
    em = torch.randn(3, 5, len(TAGS)) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return crf, em, mask


@torch.no_grad()
def test_log_partition_and_marginals_equal_brute_force(case):
    crf, em, mask = case
    logz = log_partition(crf, em, mask)
    marg = marginals(crf, em, mask)
    # torchcrf's own normaliser agrees (its log-likelihood of any path = score - log Z)
    path = torch.zeros(3, 5, dtype=torch.long)
    ll = crf(em, path, mask=mask, reduction="none")
    for b in range(3):
        n = int(mask[b].sum())
        probs, z = _brute(crf, em[b], n)
        assert float(logz[b]) == pytest.approx(z, abs=1e-4)
        assert float(ll[b]) == pytest.approx(_path_score(crf, em[b, :n], (0,) * n) - z, abs=1e-4)
        for i in range(n):
            for k in range(len(TAGS)):
                want = sum(p for path_, p in probs.items() if path_[i] == k)
                assert float(marg[b, i, k]) == pytest.approx(want, abs=1e-5)
        assert torch.all(marg[b, n:] == 0)
        assert torch.allclose(marg[b, :n].sum(-1), torch.ones(n))


@torch.no_grad()
def test_span_probability_equals_brute_force(case):
    crf, em, mask = case
    cont = continuation_tags(TAGS)
    assert cont == {"PER": [2], "LOC": [4]}
    spans = [
        (0, 1, [1, 2], cont["PER"]),  # B-PER I-PER at words 1-2, word 3 not I-PER
        (0, 3, [3, 4], cont["LOC"]),  # ends the sentence: no condition after it
        (1, 0, [3], cont["LOC"]),
        (1, 2, [1], cont["PER"]),  # the last word of a 3-word sentence
        (2, 0, [2], cont["PER"]),
    ]
    got = span_probabilities(crf, em, mask, spans)
    for (b, s, tags, stop), g in zip(spans, got, strict=True):
        n = int(mask[b].sum())
        probs, _ = _brute(crf, em[b], n)
        e = s + len(tags)
        want = sum(p for path, p in probs.items()
                   if list(path[s:e]) == list(tags) and (e >= n or path[e] not in stop))
        assert 0.0 <= float(g) <= 1.0
        assert float(g) == pytest.approx(want, abs=1e-5)


@torch.no_grad()
def test_a_sure_span_scores_higher_than_an_unsure_one():
    crf = CRF(len(TAGS), batch_first=True)
    with torch.no_grad():
        for p in crf.parameters():
            p.zero_()
    em = torch.zeros(2, 3, len(TAGS))
    em[:, :, 0] = 2.0  # O is likely everywhere ...
    em[0, 1, 1] = 9.0  # ... but word 1 of sentence 0 is surely B-PER
    em[0, 2, 0] = 9.0  # and surely ends there
    em[1, 1, 1] = 2.2  # and in sentence 1 barely more likely B-PER than O
    mask = torch.ones(2, 3, dtype=torch.bool)
    sure, unsure = span_probabilities(crf, em, mask, [(0, 1, [1], [2]), (1, 1, [1], [2])])
    assert 0.99 < float(sure) <= 1.0
    assert 0.0 <= float(unsure) < 0.5 < float(sure)
