"""From tweets and the feature cache to padded batches the model reads.

* Words are split into sub-tokens with the encoder's fast tokenizer; each word's tag
  sits on its first sub-token (``-100`` on the others, as heads expect in
  :attr:`HeadInput.labels`), and the model gathers first sub-tokens so the CRF sees one
  position per word.
* A sentence longer than ``max_length`` sub-tokens is cut into consecutive windows at
  word boundaries, so every gold word is tagged exactly once at evaluation (a single
  word longer than a whole window keeps only its first sub-tokens).
* With context (``train.context``, :mod:`mner.train.context`) a window is the
  tokenizer's own pair encoding of the window's words and the sentence's context text
  (``[CLS] tweet [SEP] context [SEP]`` for BERT, with token type ids 0 then 1;
  ``<s> tweet </s></s> context </s>`` for RoBERTa/XLM-R, without): the tweet part is
  exactly the window without context (``Window.tweet_len`` sub-tokens), and the context
  is cut to ``context_max_length`` sub-tokens; the tweet is never cut for it. An empty
  context gives exactly the window without context.
* Visual tensors come only from the cache, aligned by image id. Small caches are read
  into memory once; large ones are read per batch (the reader opens the file lazily in
  each DataLoader worker). Images that are missing or unreadable give zero rows and
  ``image_mask`` False.
* Batches are length-bucketed: windows are sorted by length within chunks of
  ``bucket_size`` batches and the batches shuffled with a seeded generator, which keeps
  padding small and the order reproducible.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mner.data.schemes import entities as bio_entities
from mner.data.schemes import to_bio2, to_bioes
from mner.errors import CacheError

ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
#: Caches up to this size on disk are read into memory once per split.
PRELOAD_MAX_BYTES = 4 * 1024**3
_COUNTS = {"objects": "objects/count", "crops": "crops/count"}


class TagSet:
    """The CRF's tag vocabulary for a scheme, and conversion from/to BIO2 word labels."""

    def __init__(self, scheme: str, types: Sequence[str] = ENTITY_TYPES):
        self.scheme = scheme
        self.types = tuple(sorted(set(types) | set(ENTITY_TYPES)))
        prefixes = ("B", "I") if scheme == "bio2" else ("B", "I", "E", "S")
        self.names = ("O",) + tuple(f"{p}-{t}" for t in self.types for p in prefixes)
        self.index = {n: i for i, n in enumerate(self.names)}

    def encode(self, bio2_labels: Sequence[str]) -> list[int]:
        """Tag ids for BIO2 word labels (converted to the scheme first)."""
        labels = to_bioes(list(bio2_labels)) if self.scheme == "bioes" else list(bio2_labels)
        return [self.index[label] for label in labels]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """BIO2 word labels for tag ids (ill-formed BIOES sequences read as conlleval does)."""
        labels = [self.names[i] for i in ids]
        return to_bio2(labels) if self.scheme == "bioes" else labels

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "types": list(self.types), "tags": list(self.names)}

    @classmethod
    def from_json(cls, data: dict) -> TagSet:
        return cls(data["scheme"], data["types"])

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TagSet:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass
class Window:
    """A run of consecutive words of one sentence that fits in ``max_length``.

    Attributes:
        item: index of the sentence in its split.
        word_start: index of the window's first word in the sentence.
        input_ids: sub-token ids with [CLS] first and [SEP] last.
        first: sub-token position of each word's first sub-token (W,).
        tags: tag id per word (W,), empty when there are no gold labels.
        entities: (entity row in the sentence, start, end) in sub-token positions of
            the gold entities lying fully inside the window.
        tweet_len: sub-tokens of the tweet part (the window without context); equals
            ``len(input_ids)`` when the window has no context.
        token_type_ids: segment ids of the pair encoding for tokenizers that use them
            (BERT), else None.
    """

    item: int
    word_start: int
    input_ids: list[int]
    first: list[int]
    tags: list[int] = field(default_factory=list)
    entities: list[tuple[int, int, int]] = field(default_factory=list)
    tweet_len: int = 0
    token_type_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.tweet_len:
            self.tweet_len = len(self.input_ids)

    @property
    def n_words(self) -> int:
        return len(self.first)


class WordPieces:
    """Sub-token ids of single words, memoised (tweets repeat words a lot)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.unk = tokenizer.unk_token_id
        self.memo: dict[str, list[int]] = {}

    def __call__(self, words: Sequence[str]) -> list[list[int]]:
        new = sorted({w for w in words if w not in self.memo})
        if new:
            ids = self.tokenizer(new, add_special_tokens=False)["input_ids"]
            for w, i in zip(new, ids, strict=False):
                # Words the tokenizer drops entirely (control characters, odd emoji)
                # still need a first sub-token to carry their tag.
                self.memo[w] = list(i) or [self.unk]
        return [self.memo[w] for w in words]


@dataclass(frozen=True)
class PairTemplate:
    """The tokenizer's own pair encoding, as special tokens around the two parts.

    ``prefix + A + middle + B + suffix`` with segment ids ``type_a`` over
    ``prefix + A + middle`` and ``type_b`` over ``B + suffix`` (None: the tokenizer has
    no token type ids). Read off the tokenizer by encoding a probe pair, so any
    tokenizer's template (BERT, RoBERTa, XLM-R) is followed without naming it.
    """

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    type_a: int | None
    type_b: int | None

    @classmethod
    def of(cls, tokenizer) -> PairTemplate:
        """Probe ``tokenizer`` with a pair of two distinct special tokens.

        Raises:
            ConfigError: the tokenizer has no pair encoding, or one whose first part is
                not its single-sentence encoding (``[CLS] A [SEP]``), which the tagger
                relies on to read the tweet's positions.
        """
        from mner.errors import ConfigError

        a, b = tokenizer.mask_token, tokenizer.pad_token
        ia, ib = tokenizer.mask_token_id, tokenizer.pad_token_id
        enc = tokenizer(a, b, return_token_type_ids=True) if a and b else None
        ids = list(enc["input_ids"]) if enc is not None else []
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        if ids.count(ia) != 1 or ids.count(ib) != 1 or ids.index(ia) > ids.index(ib):
            raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no pair encoding to read a context with")
        pa, pb = ids.index(ia), ids.index(ib)
        prefix, middle, suffix = ids[:pa], ids[pa + 1 : pb], ids[pb + 1 :]
        if prefix != [cls_id] or middle[:1] != [sep_id]:
            raise ConfigError(
                f"tokenizer {type(tokenizer).__name__}: its pair encoding does not start with its "
                "single-sentence encoding ([CLS] tweet [SEP]); context is not supported for it"
            )
        types = enc.get("token_type_ids")
        use_types = types is not None and "token_type_ids" in tokenizer.model_input_names
        return cls(
            tuple(prefix), tuple(middle), tuple(suffix),
            int(types[pa]) if use_types else None, int(types[pb]) if use_types else None,
        )

    @property
    def extra(self) -> int:
        """Special tokens the pair adds over the single encoding (its [CLS] and [SEP])."""
        return len(self.prefix) + len(self.middle) + len(self.suffix) - 2


def position_limit(model: torch.nn.Module, tokenizer) -> int:
    """How many sub-tokens one input of this encoder may hold.

    The position embeddings (less RoBERTa/XLM-R's offset of ``pad_token_id + 1``) and
    the tokenizer's ``model_max_length`` when it sets a real one.
    """
    cfg = model.config
    limit = int(getattr(cfg, "max_position_embeddings", 512) or 512)
    if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(getattr(cfg, "pad_token_id", 1) or 0) + 1
    own = getattr(tokenizer, "model_max_length", None)
    if isinstance(own, int) and 0 < own < 100_000:
        limit = min(limit, own)
    return limit


def make_windows(
    sentences: Sequence[Sequence[str]],
    tokenizer,
    max_length: int,
    tags: Sequence[Sequence[int]] | None = None,
    gold: Sequence[Sequence[str]] | None = None,
    contexts: Sequence[str] | None = None,
    context_max_length: int = 0,
) -> list[Window]:
    """Split sentences into windows of at most ``max_length`` sub-tokens.

    Args:
        sentences: word sequences.
        tokenizer: the encoder's fast tokenizer.
        max_length: sub-tokens per window including [CLS] and [SEP] (the tweet part).
        tags: tag ids per word (training/evaluation) or None.
        gold: BIO2 gold labels per word, for the entity spans heads may read.
        contexts: one context text per sentence ("" for none), read after every window
            of the sentence as the pair's second part; None for none.
        context_max_length: the context's sub-token budget (it is cut to it).

    Returns:
        Windows in sentence order; every word belongs to exactly one window.
    """
    windows = _tweet_windows(sentences, tokenizer, max_length, tags, gold)
    if contexts is not None and any(contexts):
        add_context(windows, contexts, tokenizer, context_max_length)
    return windows


def add_context(windows: list[Window], contexts: Sequence[str], tokenizer, budget: int) -> None:
    """Turn each window with a non-empty context into the tokenizer's pair encoding.

    Args:
        windows: windows without context (changed in place).
        contexts: per sentence (indexed by ``Window.item``).
        tokenizer: the encoder's fast tokenizer.
        budget: the context's sub-token budget.
    """
    template = PairTemplate.of(tokenizer)
    memo: dict[str, list[int]] = {}
    for win in windows:
        text = contexts[win.item]
        if not text:
            continue
        if text not in memo:
            memo[text] = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:budget]
        ctx = memo[text]
        if not ctx:
            continue
        tweet = win.input_ids[1:-1]
        a = list(template.prefix) + tweet + list(template.middle)
        win.input_ids = a + ctx + list(template.suffix)
        if template.type_a is not None:
            win.token_type_ids = [template.type_a] * len(a) + [template.type_b] * (len(ctx) + len(template.suffix))


def _tweet_windows(sentences, tokenizer, max_length, tags, gold) -> list[Window]:
    pieces = WordPieces(tokenizer)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    budget = max_length - 2
    out: list[Window] = []
    truncated = 0
    for item, words in enumerate(sentences):
        word_pieces = pieces(list(words))
        spans = bio_entities(list(gold[item])) if gold is not None else []
        start = 0
        while start < len(words) or (start == 0 and not words):
            ids, first = [cls_id], []
            end = start
            while end < len(words):
                wp = word_pieces[end]
                if len(ids) - 1 + len(wp) > budget:
                    if end > start:
                        break
                    wp = wp[:budget]  # one word longer than a window: keep its head
                    truncated += 1
                first.append(len(ids))
                ids.extend(wp)
                end += 1
            ids.append(sep_id)
            win = Window(item, start, ids, first)
            if tags is not None:
                win.tags = list(tags[item][start:end])
            for row, (_, s, e) in enumerate(spans):
                if start <= s and e <= end:
                    stop = first[e - start] if e < end else len(ids) - 1
                    win.entities.append((row, first[s - start], stop))
            out.append(win)
            if not words:
                break
            start = end
    if truncated:
        warnings.warn(
            f"{truncated} word(s) longer than max_length={max_length} sub-tokens were "
            "truncated to their first sub-tokens",
            stacklevel=2,
        )
    return out


class VisualStore:
    """Cached visual tensors for a set of image ids, with masks, as the heads expect.

    Args:
        cache: an open ``FeatureCache`` or None (text-only model).
        names: the ``"group/dataset"`` names the head reads.
        image_ids: every image id the split refers to (preloaded when small).
    """

    def __init__(self, cache, names: Sequence[str], image_ids: Sequence[str]):
        self.cache = cache
        self.names = tuple(names)
        extra = []
        for name in self.names:
            count = _COUNTS.get(name.split("/")[0])
            if name.startswith("relations/"):
                count = "objects/count"
            if count and count not in self.names and count not in extra:
                extra.append(count)
        missing = [c for c in extra if cache is not None and c not in cache.datasets]
        if missing:
            raise CacheError(
                f"{cache_path(cache)}: lacks {', '.join(missing)} needed to mask "
                f"{', '.join(self.names)}; re-run `mner extract` with those features"
            )
        self.load_names = self.names + tuple(extra)
        self.rows: dict[str, int] | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.ok: np.ndarray | None = None
        if cache is not None and self.names and _size_on_disk(cache) <= PRELOAD_MAX_BYTES:
            ids = sorted(set(image_ids))
            self.arrays, self.ok, _ = cache.load(list(self.load_names), ids)
            self.rows = {i: r for r, i in enumerate(ids)}

    def get(self, image_ids: Sequence[str]):
        """Tensors for a batch of image ids.

        Returns:
            ``(visual, visual_masks, image_mask)``: dicts of float/bool tensors keyed by
            dataset name with leading dim B, and a (B,) bool tensor.
        """
        B = len(image_ids)
        if self.cache is None or not self.names:
            return {}, {}, torch.zeros(B, dtype=torch.bool)
        if self.rows is not None:
            idx = np.array([self.rows[i] for i in image_ids], dtype=np.int64)
            arrays = {k: v[idx] for k, v in self.arrays.items()}
            ok = self.ok[idx]
        else:
            arrays, ok, _ = self.cache.load(list(self.load_names), list(image_ids))
        ok_t = torch.as_tensor(np.asarray(ok, dtype=bool))
        visual = {}
        for name in self.names:
            arr = np.asarray(arrays[name])
            t = torch.as_tensor(arr)
            visual[name] = t.float() if t.is_floating_point() else t.long()
        masks = visual_masks(visual, arrays, ok_t)
        return visual, masks, ok_t


def visual_masks(visual: dict[str, torch.Tensor], arrays: dict, ok: torch.Tensor) -> dict:
    """Padding masks for variable-count datasets, from ``objects/count``/``crops/count``.

    ``objects/*`` get (B, O); ``relations/labels`` (B, O+1) with node 0 (the whole
    image) valid when the image was read; ``crops/*`` (B, 3). Items of images that were
    not read are masked out.
    """
    masks = {}
    for name, t in visual.items():
        group = name.split("/")[0]
        if name in ("objects/count", "crops/count") or t.dim() < 2:
            continue
        if group in ("objects", "crops"):
            count = torch.as_tensor(np.asarray(arrays[_COUNTS[group]])).long()
            n = t.shape[1]
            masks[name] = (torch.arange(n).unsqueeze(0) < count.unsqueeze(1)) & ok.unsqueeze(1)
        elif group == "relations":
            count = torch.as_tensor(np.asarray(arrays["objects/count"])).long()
            n = t.shape[1]
            m = torch.arange(n).unsqueeze(0) < (count + 1).unsqueeze(1)
            masks[name] = m & ok.unsqueeze(1)
    return masks


def cache_path(cache) -> str:
    return str(getattr(cache, "path", "feature cache"))


def _size_on_disk(cache) -> int:
    path = getattr(cache, "path", None)
    try:
        return Path(path).stat().st_size if path is not None else 0
    except OSError:
        return 0


@dataclass
class Batch:
    """A padded batch (all tensors with leading dim B).

    Attributes:
        windows: window indices in the dataset (to map predictions back to words).
        input_ids: (B, T) long; attention_mask: (B, T) bool.
        tweet_len: (B,) long sub-tokens of each window's tweet part (its first
            ``tweet_len`` positions); less than the length when it reads a context.
        token_type_ids: (B, T) long segment ids, or None (no context, or a tokenizer
            without them).
        sub_labels: (B, T) long tag ids at first sub-tokens, -100 elsewhere (or None).
        word_pos: (B, W) long first sub-token positions; word_mask: (B, W) bool.
        word_tags: (B, W) long gold tags (0 at padding) or None.
        visual / visual_masks / image_mask: as in ``HeadInput``.
        entity_spans: (B, E, 2) long; entity_mask: (B, E) bool (or None).
        text_teacher: ``{"sentence": (B, Dc), "entities": (B, E, Dc)}`` or empty.
    """

    windows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_pos: torch.Tensor
    word_mask: torch.Tensor
    sub_labels: torch.Tensor | None = None
    word_tags: torch.Tensor | None = None
    visual: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    image_mask: torch.Tensor | None = None
    entity_spans: torch.Tensor | None = None
    entity_mask: torch.Tensor | None = None
    text_teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    tweet_len: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        def mv(x):
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, dict):
                return {k: mv(v) for k, v in x.items()}
            return x

        return Batch(**{k: mv(v) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class NerDataset(torch.utils.data.Dataset):
    """Windows of one split plus what they need from the cache.

    Args:
        sentences: word sequences.
        image_ids: one image id per sentence.
        tokenizer: the encoder's fast tokenizer.
        tagset: tag vocabulary, or None at prediction time (no gold labels).
        max_length: sub-tokens per window.
        labels: BIO2 gold labels per sentence (None at prediction time).
        visual: a :class:`VisualStore` (or None for text-only models).
        teacher: per-sentence text-teacher arrays ``{"sentence": (N, Dc),
            "entities": (N, Emax, Dc), "entity_count": (N,)}`` or None.
        contexts: per-sentence context texts (see :func:`make_windows`) or None.
        context_max_length: the context's sub-token budget.
    """

    def __init__(
        self,
        sentences: Sequence[Sequence[str]],
        image_ids: Sequence[str],
        tokenizer,
        max_length: int,
        tagset: TagSet | None = None,
        labels: Sequence[Sequence[str]] | None = None,
        visual: VisualStore | None = None,
        teacher: dict[str, np.ndarray] | None = None,
        contexts: Sequence[str] | None = None,
        context_max_length: int = 0,
    ):
        self.sentences = [list(s) for s in sentences]
        self.image_ids = list(image_ids)
        self.tokenizer = tokenizer
        tags = [tagset.encode(lab) for lab in labels] if (tagset and labels is not None) else None
        self.windows = make_windows(
            self.sentences, tokenizer, max_length, tags, labels, contexts, context_max_length
        )
        self.has_labels = tags is not None
        self.visual = visual
        self.teacher = teacher
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> int:
        return i

    def lengths(self) -> list[int]:
        return [len(w.input_ids) for w in self.windows]

    def collate(self, indices: Sequence[int]) -> Batch:
        """Pad the windows ``indices`` into a :class:`Batch` (the DataLoader's collate_fn)."""
        wins = [self.windows[i] for i in indices]
        B = len(wins)
        T = max(len(w.input_ids) for w in wins)
        W = max(max(w.n_words, 1) for w in wins)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention = torch.zeros(B, T, dtype=torch.bool)
        word_pos = torch.zeros(B, W, dtype=torch.long)
        word_mask = torch.zeros(B, W, dtype=torch.bool)
        for b, w in enumerate(wins):
            input_ids[b, : len(w.input_ids)] = torch.tensor(w.input_ids)
            attention[b, : len(w.input_ids)] = True
            if w.n_words:
                word_pos[b, : w.n_words] = torch.tensor(w.first)
                word_mask[b, : w.n_words] = True
            else:  # an empty sentence: the CRF needs one position; [CLS] stands in
                word_mask[b, 0] = True
        batch = Batch(list(indices), input_ids, attention, word_pos, word_mask)
        batch.tweet_len = torch.tensor([w.tweet_len for w in wins], dtype=torch.long)
        if any(w.token_type_ids is not None for w in wins):
            types = torch.zeros(B, T, dtype=torch.long)
            for b, w in enumerate(wins):
                if w.token_type_ids is not None:
                    types[b, : len(w.token_type_ids)] = torch.tensor(w.token_type_ids)
            batch.token_type_ids = types
        if self.has_labels:
            sub = torch.full((B, T), -100, dtype=torch.long)
            tags = torch.zeros(B, W, dtype=torch.long)
            for b, w in enumerate(wins):
                if w.n_words:
                    tags[b, : w.n_words] = torch.tensor(w.tags)
                    sub[b, w.first] = torch.tensor(w.tags)
            batch.sub_labels, batch.word_tags = sub, tags
            E = max((len(w.entities) for w in wins), default=0)
            spans = torch.zeros(B, max(E, 1), 2, dtype=torch.long)
            emask = torch.zeros(B, max(E, 1), dtype=torch.bool)
            for b, w in enumerate(wins):
                for e, (_, s, t) in enumerate(w.entities):
                    spans[b, e, 0], spans[b, e, 1] = s, t
                    emask[b, e] = True
            batch.entity_spans, batch.entity_mask = spans, emask
            if self.teacher is not None:
                batch.text_teacher = self._teacher(wins, emask)
        if self.visual is not None:
            ids = [self.image_ids[w.item] for w in wins]
            batch.visual, batch.visual_masks, batch.image_mask = self.visual.get(ids)
        else:
            batch.image_mask = torch.zeros(B, dtype=torch.bool)
        return batch

    def _teacher(self, wins: list[Window], emask: torch.Tensor) -> dict[str, torch.Tensor]:
        sent = self.teacher["sentence"]
        ents = self.teacher["entities"]
        count = self.teacher["entity_count"]
        items = [w.item for w in wins]
        out_ent = torch.zeros(len(wins), emask.shape[1], ents.shape[-1])
        for b, w in enumerate(wins):
            for e, (row, _, _) in enumerate(w.entities):
                if row < min(int(count[w.item]), ents.shape[1]):
                    out_ent[b, e] = torch.as_tensor(np.asarray(ents[w.item, row], dtype=np.float32))
                else:  # an entity the teacher file did not embed: leave it out
                    emask[b, e] = False
        sentence = torch.as_tensor(np.asarray(sent[items], dtype=np.float32))
        return {"sentence": sentence, "entities": out_ent}


def bucket_batches(
    lengths: Sequence[int], batch_size: int, bucket_size: int, generator: torch.Generator | None
) -> list[list[int]]:
    """Length-bucketed batches of indices.

    With a generator (training) the indices are shuffled, sorted by length within
    chunks of ``bucket_size * batch_size``, cut into batches, and the batches shuffled.
    Without one (evaluation) all indices are sorted by length, which pads least.
    """
    n = len(lengths)
    if generator is None:
        order = sorted(range(n), key=lambda i: (lengths[i], i))
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    perm = torch.randperm(n, generator=generator).tolist()
    chunk = batch_size * bucket_size
    batches = []
    for c in range(0, n, chunk):
        part = sorted(perm[c : c + chunk], key=lambda i: lengths[i])
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]
