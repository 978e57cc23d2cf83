"""Is a difference in F1 real? Paired tests over test tweets.

Two systems tagged the same tweets. Entity-level F1 is a corpus statistic, not a mean
over tweets, so the usual t-test does not apply; NER papers use the two tests here, with
the tweet as the unit that is resampled (the tweets are the independent draws, the
entities within a tweet are not):

* **Paired bootstrap** (Koehn, EMNLP 2004; Berg-Kirkpatrick et al., EMNLP 2012): draw
  the test tweets with replacement, score both systems on the same draw, keep the F1
  difference; the 2.5 and 97.5 percentiles of the differences are the 95 % confidence
  interval (``scipy.stats.bootstrap`` with ``paired=True``, percentile method).
* **Approximate randomization** (Noreen 1989; Riezler and Maxwell, 2005; Yeh, COLING
  2000): under the null hypothesis the two systems' outputs are exchangeable per tweet,
  so each tweet's two outputs are swapped with probability 1/2 and the F1 difference
  recomputed; the two-sided p-value is the share of swaps at least as extreme as the
  observed difference, counting the observed one ((k + 1) / (R + 1); with few enough
  tweets scipy enumerates every swap exactly) (``scipy.stats.permutation_test`` with
  ``permutation_type="samples"``).

Each tweet is reduced to counts (correct, predicted, gold entities): F1 of any set of
tweets is ``2 * sum(correct) / (sum(predicted) + sum(gold))``, conlleval's F1.

Seeds: per seed, the model's seed ``k`` is paired with the baseline's seed ``k`` (when the
two share no seed, the i-th seeds in order are paired). Pooled over seeds, the paired
tweets of every seed pair are stacked into one sample (a tweet appears once per pair), so
the pooled difference is micro F1 over the stacked predictions; it is close to, not
equal to, the difference of the mean per-seed F1 the tables show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from mner.report.predictions import Entity, RowPredictions, TestSet


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of a model with the baseline.

    Attributes:
        seeds: ``[(model seed, baseline seed), ...]`` compared (pooled: all pairs).
        n_tweets: paired observations (tweets x seed pairs).
        f1: the model's F1 on them (percent, micro over the stacked tweets).
        baseline_f1: the baseline's F1 on them.
        delta: ``f1 - baseline_f1``.
        ci_low: lower end of the 95 % paired-bootstrap interval of ``delta``.
        ci_high: upper end.
        p_value: two-sided approximate-randomization p-value of ``delta``.
    """

    seeds: list[tuple[Any, Any]]
    n_tweets: int
    f1: float
    baseline_f1: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = [list(p) for p in self.seeds]
        return d


def tweet_counts(gold: Sequence[set[Entity]], pred: Sequence[set[Entity]]) -> np.ndarray:
    """Per tweet (correct, predicted, gold) entity counts.

    Returns:
        (N, 3) int64.
    """
    return np.array([(len(g & p), len(p), len(g)) for g, p in zip(gold, pred, strict=True)],
                    dtype=np.int64).reshape(-1, 3)


def f1_of(correct: np.ndarray, predicted: np.ndarray, gold: np.ndarray, axis: int = -1) -> np.ndarray:
    """conlleval F1 in percent of the tweets along ``axis`` (0 when nothing is predicted or gold)."""
    num = 2.0 * correct.sum(axis=axis)
    den = predicted.sum(axis=axis) + gold.sum(axis=axis)
    return np.divide(100.0 * num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def compare_counts(a: np.ndarray, b: np.ndarray, *, resamples: int, seed: int = 0,
                   confidence: float = 0.95, batch: int = 200) -> tuple[float, float, float, float, float, float]:
    """Paired bootstrap interval and approximate-randomization p-value of F1(a) - F1(b).

    Args:
        a: (N, 3) counts of the model per tweet (:func:`tweet_counts`).
        b: (N, 3) counts of the baseline on the same tweets (same gold column).
        resamples: bootstrap draws, and random swaps of the randomization test.
        seed: seeds both tests' random generators (the report is reproducible).
        confidence: the interval's level.
        batch: resamples per vectorised step (bounds memory to ``batch x N``).

    Returns:
        ``(f1_a, f1_b, delta, ci_low, ci_high, p_value)``.
    """
    n = len(a)
    f1_a = float(f1_of(a[:, 0], a[:, 1], a[:, 2]))
    f1_b = float(f1_of(b[:, 0], b[:, 1], b[:, 2]))
    delta = f1_a - f1_b
    if n < 2:
        return f1_a, f1_b, delta, delta, delta, 1.0

    def diff(ca, pa, cb, pb, g, axis=-1):
        return f1_of(ca, pa, g, axis) - f1_of(cb, pb, g, axis)

    boot = stats.bootstrap(
        (a[:, 0], a[:, 1], b[:, 0], b[:, 1], a[:, 2]), diff, paired=True, vectorized=True,
        n_resamples=resamples, batch=batch, method="percentile", confidence_level=confidence,
        random_state=np.random.default_rng(seed),
    )
    # Observation i of x is tweet i's output of one system: ids < n are the model's,
    # ids >= n the baseline's; a swap exchanges the two ids of a tweet.
    correct = np.concatenate([a[:, 0], b[:, 0]])
    predicted = np.concatenate([a[:, 1], b[:, 1]])
    gold = np.concatenate([a[:, 2], a[:, 2]])

    def swapped(x, y, axis=-1):
        return (f1_of(correct[x], predicted[x], gold[x], axis)
                - f1_of(correct[y], predicted[y], gold[y], axis))

    ids = np.arange(n)
    perm = stats.permutation_test(
        (ids, ids + n), swapped, permutation_type="samples", vectorized=True,
        n_resamples=resamples, batch=batch, alternative="two-sided",
        random_state=np.random.default_rng(seed + 1),
    )
    low, high = boot.confidence_interval
    # A degenerate bootstrap (every draw the same difference) gives NaN bounds.
    low = delta if not np.isfinite(low) else float(low)
    high = delta if not np.isfinite(high) else float(high)
    return f1_a, f1_b, delta, low, high, float(min(1.0, perm.pvalue))


def seed_pairs(model: RowPredictions, baseline: RowPredictions) -> list[tuple[Any, Any]]:
    """Model seed k with baseline seed k; without shared seeds, the i-th with the i-th."""
    shared = [s for s in model.seeds if s in baseline.seeds]
    if shared:
        return [(s, s) for s in shared]
    return list(zip(model.seeds, baseline.seeds, strict=False))


def compare_rows(model: RowPredictions, baseline: RowPredictions, test: TestSet, *,
                 resamples: int, seed: int = 0) -> dict[str, Any] | None:
    """Pooled and per-seed :class:`Comparison` of a row with the baseline row.

    Returns:
        ``{"pooled": Comparison, "per_seed": [Comparison, ...]}``, or None when the two
        share no usable seed pair.
    """
    pairs = seed_pairs(model, baseline)
    if not pairs:
        return None
    per_seed, stacked_a, stacked_b = [], [], []
    for sm, sb in pairs:
        a = tweet_counts(test.gold, model.seeds[sm])
        b = tweet_counts(test.gold, baseline.seeds[sb])
        stacked_a.append(a)
        stacked_b.append(b)
        per_seed.append(Comparison([(sm, sb)], len(a), *compare_counts(a, b, resamples=resamples, seed=seed)))
    a, b = np.concatenate(stacked_a), np.concatenate(stacked_b)
    pooled = Comparison(pairs, len(a), *compare_counts(a, b, resamples=resamples, seed=seed))
    return {"pooled": pooled, "per_seed": per_seed}
