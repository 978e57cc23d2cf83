"""Stage-two data: first-sub-token labels, windows, bucketing, cache alignment and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mner.train.data import NerDataset, TagSet, VisualStore, bucket_batches, make_windows
from mner.train.encoder import train_wordpiece

WORDS = [
    ["RT", "@user", ":", "Barack", "Obama", "visits", "Paris", "today", "!"],
    ["Messi", "scores", "again"],
    [],
]
LABELS = [
    ["O", "O", "O", "B-PER", "I-PER", "O", "B-LOC", "O", "O"],
    ["B-PER", "O", "O"],
    [],
]


@pytest.fixture(scope="module")
def tok():
    # Train on other text so "Obama" / "Paris" split into several WordPieces.
    return train_wordpiece([["Ob", "ama", "Par", "is", "RT", "Messi", "!", ":", "@", "user"]] * 3, 200)


def test_tagset_bioes_round_trip_and_tags():
    ts = TagSet("bioes")
    assert ts.names[0] == "O" and "S-PER" in ts.names and len(ts.names) == 1 + 4 * 4
    ids = ts.encode(LABELS[0])
    assert [ts.names[i] for i in ids][3:7] == ["B-PER", "E-PER", "O", "S-LOC"]
    assert ts.decode(ids) == LABELS[0]
    assert len(TagSet("bio2", ["PER", "OTHER"]).names) == 1 + 2 * 5


def test_labels_sit_on_first_subtokens(tok):
    ts = TagSet("bio2")
    ds = NerDataset(WORDS, ["a", "b", "c"], tok, 64, ts, LABELS)
    assert len(ds) == 3  # one window per sentence at this length
    b = ds.collate([0, 1, 2])
    w0 = ds.windows[0]
    pieces = [tok(w, add_special_tokens=False)["input_ids"] for w in WORDS[0]]
    assert len(w0.input_ids) == 2 + sum(len(p) for p in pieces)
    assert any(len(p) > 1 for p in pieces)  # the test must exercise continuation pieces
    # first sub-token positions: 1 + cumulative piece lengths
    assert w0.first == list(1 + np.cumsum([0] + [len(p) for p in pieces[:-1]]))
    row = b.sub_labels[0]
    assert (row != -100).sum() == len(WORDS[0])
    assert row[w0.first].tolist() == ts.encode(LABELS[0])
    assert b.word_tags[0, : len(WORDS[0])].tolist() == ts.encode(LABELS[0])
    # entity spans in sub-token coordinates cover the whole entity (all its pieces)
    start, end = b.entity_spans[0, 0].tolist()
    assert start == w0.first[3] and end == w0.first[5]
    assert b.entity_mask[0].tolist()[:2] == [True, True]
    # the empty sentence still has one CRF position
    assert b.word_mask[2].tolist()[0] is True and b.word_mask[2].sum() == 1


def test_long_sentences_split_into_windows_covering_every_word(tok):
    ts = TagSet("bio2")
    ds = NerDataset(WORDS[:1], ["a"], tok, 8, ts, LABELS[:1])
    wins = ds.windows
    assert len(wins) > 1
    assert all(len(w.input_ids) <= 8 for w in wins)
    covered = [w.word_start + j for w in wins for j in range(w.n_words)]
    assert covered == list(range(len(WORDS[0])))
    tags = [t for w in wins for t in w.tags]
    assert tags == ts.encode(LABELS[0])


def test_a_word_longer_than_a_window_is_truncated_with_a_warning(tok):
    long = "ama" * 8  # ama + 21 continuation pieces
    with pytest.warns(UserWarning, match="truncated"):
        wins = make_windows([["a", long, "b"]], tok, 8)
    assert [w.n_words for w in wins] and sum(w.n_words for w in wins) == 3
    assert all(len(w.input_ids) <= 8 for w in wins)


def test_bucket_batches_are_seeded_and_length_sorted():
    lengths = [5, 30, 7, 28, 6, 29, 8, 31] * 4
    g1 = torch.Generator().manual_seed(1)
    g2 = torch.Generator().manual_seed(1)
    a = bucket_batches(lengths, 4, 2, g1)
    assert a == bucket_batches(lengths, 4, 2, g2)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert a != bucket_batches(lengths, 4, 2, torch.Generator().manual_seed(2))
    ev = bucket_batches(lengths, 4, 2, None)
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in ev]
    assert max(spans) <= 2  # sorted: each batch holds similar lengths


class FakeCache:
    """Rows by image id; 'bad' is an unreadable image, unknown ids are missing."""

    path = None

    def __init__(self):
        self.ids = {"x": 0, "y": 1, "bad": 2}
        n, o = 3, 4
        self.data = {
            "objects/features": np.arange(n * o * 2, dtype=np.float16).reshape(n, o, 2),
            "objects/count": np.array([2, 4, 0], dtype=np.int32),
            "relations/labels": np.ones((n, o + 1, o + 1), dtype=np.int8),
            "crops/patch_tokens": np.ones((n, 3, 17, 2), dtype=np.float16),
            "crops/count": np.array([1, 3, 0], dtype=np.int32),
        }
        self.datasets = set(self.data)
        self.ok = np.array([True, True, False])
        self.loads = 0

    def load(self, names, image_ids):
        self.loads += 1
        rows = [self.ids.get(i, -1) for i in image_ids]
        ok = np.array([r >= 0 and self.ok[r] for r in rows])
        out = {}
        for n in names:
            arr = np.zeros((len(rows),) + self.data[n].shape[1:], self.data[n].dtype)
            for b, r in enumerate(rows):
                if ok[b]:
                    arr[b] = self.data[n][r]
            out[n] = arr
        return out, ok, {}


def test_visual_store_aligns_by_image_id_and_builds_masks():
    cache = FakeCache()
    names = ("objects/features", "relations/labels", "crops/patch_tokens")
    store = VisualStore(cache, names, ["x", "y", "bad", "gone"])
    assert cache.loads == 1  # a small cache is read once, then served from memory
    vis, masks, ok = store.get(["y", "gone", "x", "bad"])
    assert cache.loads == 1
    assert ok.tolist() == [True, False, True, False]
    assert vis["objects/features"].dtype == torch.float32
    assert torch.equal(vis["objects/features"][0], torch.arange(8, 16.0).view(4, 2))
    assert vis["objects/features"][1].abs().sum() == 0
    assert masks["objects/features"].tolist() == [
        [True] * 4, [False] * 4, [True, True, False, False], [False] * 4
    ]
    assert masks["relations/labels"].tolist()[2] == [True, True, True, False, False]
    assert masks["crops/patch_tokens"].tolist()[0] == [True, True, True]
    assert masks["crops/patch_tokens"].tolist()[2] == [True, False, False]
    assert "objects/count" not in vis  # counts are read for masks, not passed on
