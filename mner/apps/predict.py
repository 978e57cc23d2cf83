"""``mner predict``: tag new tweets with a trained run, extracting image features on the fly.

The image features are computed by the same extractors, with the same settings, that
made the run's training cache (``mner.extract.api.extract_arrays`` re-creates them
from the cache provenance recorded in ``RUN/provenance.json``), so a prediction sees
the tensors the model was trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mner.errors import DataError
from mner.train.data import NerDataset, VisualStore
from mner.train.evaluation import load_run, predict_words

# URLs, @handles and #hashtags stay whole, words keep inner apostrophes/hyphens, and
# every other punctuation mark is its own token: how the Twitter-2015/2017 CoNLL files
# are tokenised.
_TOKEN = re.compile(r"https?://\S+|[@#]?\w+(?:['’\-]\w+)*|[^\w\s]")


def tokenize(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Split raw text into tweet-style tokens.

    Returns:
        ``(tokens, offsets)`` with character ``[start, end)`` offsets per token.
    """
    tokens, offsets = [], []
    for m in _TOKEN.finditer(text):
        tokens.append(m.group())
        offsets.append((m.start(), m.end()))
    return tokens, offsets


class _ArrayCache:
    """Quacks like ``FeatureCache.load`` over arrays extracted in memory (rows = "0", "1", ...)."""

    def __init__(self, arrays: dict[str, np.ndarray], ok: np.ndarray):
        self.arrays, self.ok = arrays, np.asarray(ok, dtype=bool)
        self.datasets = set(arrays)
        self.path = None

    def load(self, names, image_ids):
        idx = np.array([int(i) for i in image_ids], dtype=np.int64)
        return {n: self.arrays[n][idx] for n in names}, self.ok[idx], {}


class Predictor:
    """Tag tweets with a trained run.

    Args:
        run: the run folder ``mner train`` wrote.
        seed: which seed's model (default: the best on dev).
        device: ``auto``, ``cpu`` or ``cuda[:i]``; also where image features are computed.
    """

    def __init__(self, run: str | Path, seed: int | None = None, device: str = "auto"):
        self.loaded = load_run(Path(run), seed, device)
        self.device = device

    def predict(
        self,
        texts: Sequence[str | Sequence[str]],
        image_paths: Sequence[str | Path | None],
    ) -> list[list[dict]]:
        """Entities of each tweet.

        Args:
            texts: raw strings (tokenised with :func:`tokenize`) or token sequences.
            image_paths: one image per tweet, or None when it has none.

        Returns:
            Per tweet, a list of ``{"type", "start", "end", "text"}`` with the word span
            ``[start, end)``, plus ``"char_start"``/``"char_end"`` for raw-string input.
        """
        from mner.data.schemes import entities

        if len(texts) != len(image_paths):
            raise DataError(f"{len(texts)} texts but {len(image_paths)} images; pass one image (or none) per text")
        lr = self.loaded
        sentences, offsets = [], []
        for t in texts:
            if isinstance(t, str):
                toks, offs = tokenize(t)
                sentences.append(toks)
                offsets.append(offs)
            else:
                sentences.append(list(t))
                offsets.append(None)
        ids = [str(i) for i in range(len(texts))]
        visual = None
        if lr.needs:
            visual = VisualStore(self._extract(image_paths), lr.needs, ids)
        ds = NerDataset(sentences, ids, lr.tokenizer, lr.cfg.max_length, None, None, visual)
        tags, _ = predict_words(lr.model, ds, lr.device, lr.cfg.eval_batch_size, lr.precision)
        out = []
        for words, offs, t in zip(sentences, offsets, tags, strict=False):
            ents = []
            for typ, s, e in entities(lr.tagset.decode(t)):
                ent = {"type": typ, "start": s, "end": e, "text": " ".join(words[s:e])}
                if offs is not None:
                    ent["char_start"], ent["char_end"] = offs[s][0], offs[e - 1][1]
                ents.append(ent)
            out.append(ents)
        return out

    def _extract(self, image_paths: Sequence[str | Path | None]) -> _ArrayCache:
        """Run the run's extractors on the images; absent files get ``image_ok`` False."""
        from mner.extract.api import extract_arrays

        lr = self.loaded
        prov = (lr.provenance.get("cache") or {}).get("provenance") or {}
        names = list(VisualStore(None, lr.needs, []).load_names)
        paths = [Path(p) if p is not None and Path(p).is_file() else None for p in image_paths]
        arrays, ok = extract_arrays(paths, prov, names, device=str(lr.device))
        return _ArrayCache({n: np.asarray(a) for n, a in arrays.items()}, ok)


def read_inputs(path: Path, images_dir: Path | None) -> tuple[list, list, list[str]]:
    """Read a batch input file: CoNLL (tokens, IMGID) or JSON lines.

    JSON lines hold ``{"text": "..."}`` or ``{"tokens": [...]}``, and ``"image"`` (a
    path) or ``"image_id"`` (looked up in ``images_dir``).

    Returns:
        ``(texts, image_paths, ids)``.
    """
    from mner.data.images import find_image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a .conll/.txt or .jsonl file")
    texts, images, ids = [], [], []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not ("text" in rec or "tokens" in rec):
                raise DataError(f"{path}:{n}: expected an object with \"text\" or \"tokens\"")
            texts.append(rec.get("text", rec.get("tokens")))
            img = rec.get("image")
            iid = rec.get("image_id")
            if img is None and iid is not None and images_dir is not None:
                img = find_image(images_dir, str(iid))
            images.append(Path(img) if img else None)
            ids.append(str(iid if iid is not None else n))
    else:
        from mner.data.conll import read_conll

        for t in read_conll(path):
            texts.append(list(t.tokens))
            images.append(find_image(images_dir, t.image_id) if images_dir is not None else None)
            ids.append(t.image_id)
    return texts, images, ids
