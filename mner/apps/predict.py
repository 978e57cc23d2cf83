"""``mner predict``: tag new tweets with a trained run, extracting image features on the fly.

The image features are computed by the same extractors, with the same settings, that
made the run's training cache (``mner.extract.api.extract_arrays`` re-creates them
from the cache provenance recorded in ``RUN/provenance.json``), so a prediction sees
the tensors the model was trained on.

Every post's image gets a status, decided by the extraction loader
(:func:`mner.extract.images.load_image`, with the cache's ``max_pixels``), so an image
predict calls ``ok`` is one extraction calls ``ok``: the values of
:class:`mner.data.images.ImageStatus`, plus :data:`OUTSIDE` (an ``image_id`` whose file
is a symlink leading out of the images folder) and :data:`NO_IMAGE` (the post names no
image). A post whose image is not ``ok`` is tagged as if it had none (the image mask),
and says so.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mner.data.images import ImageStatus
from mner.errors import ConfigError, DataError, json_kind
from mner.train.crf import predict_scored
from mner.train.data import NerDataset, VisualStore
from mner.train.evaluation import load_run

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


#: ``image_status`` of a post that names no image (no ``"image"``/``"image_id"``, no ``--image``).
NO_IMAGE = "none"
#: ``image_status`` of an ``image_id`` whose file resolves outside the images folder (a
#: symlink leading out). The same string as extraction's status for such files.
OUTSIDE = "outside"


@dataclass(frozen=True)
class ImageCheck:
    """What became of one post's image.

    Attributes:
        status: an :class:`ImageStatus` value, :data:`OUTSIDE` or :data:`NO_IMAGE`.
        message: one human line on why (empty for ``none``).
    """

    status: str
    message: str = ""

    @property
    def ok(self) -> bool:
        """True only when the image is used."""
        return self.status == ImageStatus.OK.value

    @property
    def given(self) -> bool:
        """True when the post named an image (whatever became of it)."""
        return self.status != NO_IMAGE


@dataclass(frozen=True)
class Post:
    """One post of a batch input, ready to tag.

    Attributes:
        id: output id (the image id, or the input line number when there is none).
        text: a raw string (tokenised with :func:`tokenize`) or a tuple of tokens.
        where: ``FILE:LINE`` of the post (``--text`` for the one-off), for messages.
        image: the file to decode, or None (none named, or the id has no file).
        image_ref: the path or id as the user wrote it, None when none was named.
        lookup: the status already decided while finding the file (``missing`` or
            ``outside`` for an id), else None: decode ``image`` to know.
    """

    id: str
    text: str | tuple[str, ...]
    where: str
    image: Path | None = None
    image_ref: str | None = None
    lookup: ImageCheck | None = None

    @property
    def line(self) -> int | None:
        """The post's line in its input file (None for a post not read from a file)."""
        head, _, tail = self.where.rpartition(":")
        return int(tail) if head and tail.isdigit() else None


@dataclass(frozen=True)
class Prediction:
    """The entities of one post and what became of its image.

    Attributes:
        entities: ``{"type", "start", "end", "text"}`` per entity (word span
            ``[start, end)``), plus ``"char_start"``/``"char_end"`` for raw-string input
            (the shape :meth:`Predictor.predict` has always returned).
        image: :class:`ImageCheck` of the post's image.
        scored: the same entities in the Hugging Face token-classification pipeline's
            aggregated shape (see :func:`scored_entities`).
    """

    entities: list[dict]
    image: ImageCheck
    scored: list[dict] = field(default_factory=list)

    def record(self, post_id: str, line: int | None = None) -> dict:
        """The post's output object: ``{"id", ["line",] "entities", "image_status"}``."""
        rec: dict = {"id": post_id}
        if line is not None:
            rec["line"] = line
        rec["entities"] = self.scored
        rec["image_status"] = self.image.status
        return rec


#: Decimals of ``score`` in the output. The same post in batches of other posts gets the
#: same entities, but padding changes float rounding: scores agree to ~1e-6 in float32
#: and only to a few thousandths when the run decodes in bfloat16.
SCORE_DECIMALS = 4


def scored_entities(text: str | Sequence[str], ents: Sequence[tuple[str, int, int]],
                    probs: Sequence[float]) -> list[dict]:
    """Entities in the Hugging Face token-classification pipeline's aggregated shape.

    Args:
        text: the post as a raw string, or its tokens (then the text is the tokens
            joined by single spaces, and the character offsets point into that).
        ents: ``(type, word_start, word_end)`` per entity.
        probs: each entity's span probability (:func:`mner.train.crf.span_probabilities`).

    Returns:
        ``{"entity_group", "score", "word", "start", "end", "word_start", "word_end"}``
        per entity: ``start``/``end`` are character offsets (``text[start:end] == word``),
        ``word_start``/``word_end`` the word span ``[word_start, word_end)``.
    """
    if isinstance(text, str):
        offsets = tokenize(text)[1]
    else:
        offsets, pos = [], 0
        for tok in text:
            offsets.append((pos, pos + len(tok)))
            pos += len(tok) + 1
        text = " ".join(text)
    out = []
    for (typ, s, e), p in zip(ents, probs, strict=True):
        a, b = offsets[s][0], offsets[e - 1][1]
        out.append({"entity_group": typ, "score": round(float(p), SCORE_DECIMALS), "word": text[a:b],
                    "start": a, "end": b, "word_start": s, "word_end": e})
    return out


class Entities(list):
    """The entities of one post (a list of dicts, see :func:`scored_entities`).

    Attributes:
        image_status: what became of the post's image (``ok``, ``missing``, ...,
            ``none``); a post whose image is not ``ok`` was tagged without it.
    """

    image_status: str = NO_IMAGE


class Predictor:
    """Tag tweets with a trained run.

    ``predictor("Kevin Durant in Oakland", "photo.jpg")`` returns the post's entities in
    the Hugging Face pipeline's shape (:func:`scored_entities`); a list of texts (with a
    list of images, or none) returns a list of them.

    Args:
        run: the run folder ``mner train`` wrote, or a folder ``mner export`` wrote.
        seed: which seed's model (default: the best on dev).
        device: ``auto``, ``cpu`` or ``cuda[:i]``; also where image features are computed.
        weights_dir: the folder of the vision weight files the training cache was made
            with (``mner extract --weights-dir``), when it is not the one recorded (an
            exported model, another machine).
        context_file: for a run that reads a context file: the file to look posts up in
            (by image id, or by post id as ``"key"``); default the run's own, unchanged.
    """

    def __init__(self, run: str | Path, seed: int | None = None, device: str = "auto",
                 weights_dir: str | Path | None = None, context_file: str | Path | None = None):
        self.loaded = load_run(Path(run), seed, device)
        self.device = device
        self.context_file = context_file
        prov = (self.loaded.provenance.get("cache") or {}).get("provenance") or {}
        stored = prov.get("extract_config") or {}
        if weights_dir is not None:
            stored = {**stored, "weights_dir": str(weights_dir)}
            prov = {**prov, "extract_config": stored}
        elif not stored.get("weights_dir") and self.loaded.needs:
            # An exported model drops the exporting machine's weights folder: features
            # made from local weight files must not silently come from other weights here.
            groups = {n.split("/")[0] for n in self.loaded.needs}
            local = sorted(f"{g} ({(prov[g].get('weights') or {}).get('file')})" for g in groups
                           if isinstance(prov.get(g), dict)
                           and (prov[g].get("weights") or {}).get("source") == "local")
            if local:
                raise ConfigError(
                    f"{run}: its image features came from local weight files ({', '.join(local)}); "
                    "put them in a folder and pass it: mner.load(..., weights_dir=DIR)"
                )
        self._cache_provenance = prov
        # The guard the training cache was extracted with: an image too large there is too
        # large here. Text-only runs have no cache and use the extraction default.
        from mner.extract.images import DEFAULT_MAX_PIXELS

        self.max_pixels = int(stored.get("max_pixels") or DEFAULT_MAX_PIXELS)
        self._extractors = None

    def __call__(self, text, image=None):
        """Entities of one post, or of a list of posts.

        Args:
            text: the post's raw text, or a list of texts.
            image: for one text: an image file path, a PIL image, or None; for a list:
                a list of those (one per text) or None (no images).

        Returns:
            For one text, an :class:`Entities` list of ``{"entity_group", "score",
            "word", "start", "end", "word_start", "word_end"}`` with its
            ``image_status``; for a list, a list of them.

        Raises:
            DataError: a text without words, or images not matching the texts.
        """
        import tempfile
        import warnings

        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if single:
            images = [image]
        elif image is None:
            images = [None] * len(texts)
        elif isinstance(image, (list, tuple)) and len(image) == len(texts):
            images = list(image)
        else:
            raise DataError(f"{len(texts)} texts: pass a list of as many images (None for no image), or none")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not tokenize(t)[0]:
                raise DataError(f"text {i} ({t!r:.40}) has no words to tag; pass the post's text as a string")
        with tempfile.TemporaryDirectory(prefix="mner-") as tmp:
            posts = []
            for i, (t, im) in enumerate(zip(texts, images, strict=True)):
                if im is not None and not isinstance(im, (str, os.PathLike)):
                    if not hasattr(im, "save"):
                        raise DataError(f"image {i}: expected a file path, a PIL image or None, found {type(im).__name__}")
                    # PNG is lossless: the loader decodes the very pixels passed in.
                    path = Path(tmp) / f"{i}.png"
                    im.save(path, format="PNG")
                    im = path
                posts.append(Post(str(i), t, f"text {i}", None if im is None else Path(im),
                                  None if im is None else str(im)))
            results = self.tag(posts)
        out = []
        for p, r in zip(posts, results, strict=True):
            if r.image.given and not r.image.ok:
                warnings.warn(f"{image_line(p, r.image)}; tagged without it", stacklevel=2)
            ents = Entities(r.scored)
            ents.image_status = r.image.status
            out.append(ents)
        return out[0] if single else out

    def check_image(self, image: Post | str | os.PathLike | None) -> ImageCheck:
        """Status of a post's image, decoded as extraction decodes it.

        Args:
            image: a :class:`Post` (its lookup status, else its file) or an image path
                (None: no image).
        """
        from mner.extract.images import load_image

        if isinstance(image, Post):
            if image.lookup is not None:
                return image.lookup
            if image.image_ref is None:
                return ImageCheck(NO_IMAGE)
            image = image.image
        if image is None:
            return ImageCheck(NO_IMAGE)
        dec = load_image(Path(image), max_pixels=self.max_pixels)
        return ImageCheck(dec.status.value, dec.message)

    def check_posts(self, posts: Sequence[Post], *, strict: bool = False) -> tuple[list[ImageCheck], list[str]]:
        """Check every post's image before tagging.

        Args:
            posts: the posts.
            strict: refuse any named image that is not ``ok`` (``--strict-images``).

        Returns:
            ``(checks, warnings)``: one :class:`ImageCheck` per post, and one
            ``warning: FILE:LINE: image REF: STATUS (why); tagged without it`` line per
            post whose named image will not be used.

        Raises:
            DataError: ``strict`` and an image is not ok; one line naming the first post
                and image, and how many others there are.
        """
        checks = [self.check_image(p) for p in posts]
        bad = [(p, c) for p, c in zip(posts, checks, strict=True) if c.given and not c.ok]
        if strict and bad:
            others = ", ".join(p.where for p, _ in bad[1:6]) + (", ..." if len(bad) > 6 else "")
            raise DataError(
                f"{image_line(*bad[0])}; --strict-images stops on any image that is not ok"
                + (f" ({len(bad)} in all, also {others})" if len(bad) > 1 else "")
                + "; fix or remove them, or drop --strict-images to tag those posts without their image"
            )
        return checks, [f"warning: {image_line(p, c)}; tagged without it" for p, c in bad]

    def predict(
        self,
        texts: Sequence[str | Sequence[str]],
        image_paths: Sequence[str | Path | None],
    ) -> list[list[dict]]:
        """Entities of each tweet (see :meth:`tag` for the image statuses too).

        Args:
            texts: raw strings (tokenised with :func:`tokenize`) or token sequences.
            image_paths: one image per tweet, or None when it has none.

        Returns:
            Per tweet, a list of ``{"type", "start", "end", "text"}`` with the word span
            ``[start, end)``, plus ``"char_start"``/``"char_end"`` for raw-string input.
        """
        if len(texts) != len(image_paths):
            raise DataError(f"{len(texts)} texts but {len(image_paths)} images; pass one image (or none) per text")
        posts = [
            Post(str(i), t if isinstance(t, str) else tuple(t), f"text {i}",
                 None if p is None else Path(p), None if p is None else str(p))
            for i, (t, p) in enumerate(zip(texts, image_paths, strict=True))
        ]
        return [p.entities for p in self.tag(posts)]

    def tag(self, posts: Sequence[Post], checks: Sequence[ImageCheck] | None = None) -> list[Prediction]:
        """Entities of each post, with the status of its image.

        Args:
            posts: the posts (see :func:`read_posts`).
            checks: their :meth:`check_image` results when already made (same length);
                otherwise the images are checked here.

        Returns:
            One :class:`Prediction` per post. Images that are not ``ok`` are not used: the
            post is tagged as one without an image.
        """
        from mner.data.schemes import entities

        if checks is None:
            checks = [self.check_image(p) for p in posts]
        if len(checks) != len(posts):
            raise ValueError(f"{len(checks)} image checks for {len(posts)} posts")
        if not posts:
            return []
        texts = [p.text for p in posts]
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
        ids = [str(i) for i in range(len(texts))]  # rows of the in-memory feature arrays
        visual = None
        if lr.needs:
            use = [p.image if c.ok else None for c, p in zip(checks, posts, strict=True)]
            arrays = self._extract(use)
            # The extractors decode again; a file that failed there (e.g. preprocessing)
            # was not used, whatever the first decoding said.
            checks = [
                ImageCheck(ImageStatus.UNREADABLE.value, "decoded, but the extractors could not use it")
                if c.ok and not arrays.ok[i] else c
                for i, c in enumerate(checks)
            ]
            visual = VisualStore(arrays, lr.needs, ids)
        contexts, budget = self._contexts(posts, checks)
        ds = NerDataset(sentences, ids, lr.tokenizer, lr.cfg.max_length, None, None, visual,
                        contexts=contexts, context_max_length=budget)
        tags, scores = predict_scored(lr.model, ds, lr.device, lr.cfg.eval_batch_size, lr.precision,
                                      lr.tagset.decode)
        out = []
        for words, offs, t, sc, check, text in zip(sentences, offsets, tags, scores, checks, texts, strict=True):
            ents = []
            spans = entities(lr.tagset.decode(t))
            for typ, s, e in spans:
                ent = {"type": typ, "start": s, "end": e, "text": " ".join(words[s:e])}
                if offs is not None:
                    ent["char_start"], ent["char_end"] = offs[s][0], offs[e - 1][1]
                ents.append(ent)
            out.append(Prediction(ents, check, scored_entities(text, spans, [sc[x] for x in spans])))
        return out

    def _contexts(self, posts: Sequence[Post], checks: Sequence[ImageCheck]) -> tuple[list[str] | None, int]:
        """The context of each post for a run that reads one (None otherwise), and its budget.

        The file source looks a post up by its image id (``image_id``, CoNLL ``IMGID``)
        or by its id as ``"key"``; image-text sources are extracted from the post's image
        like the visual features (:meth:`_context_strings`).
        """
        from types import SimpleNamespace

        from mner.train.context import CACHE_SOURCES, context_budget, run_contexts

        cfg = self.loaded.cfg
        if not cfg.context or cfg.decode_view == "tweet":
            return None, 0
        items = [SimpleNamespace(image_id=p.id if p.image_ref == p.id else None) for p in posts]
        found: list[dict[str, list[str]]] = [{} for _ in posts]
        if any(s in CACHE_SOURCES for s in cfg.context):
            found = self._context_strings([p.image if c.ok else None for p, c in zip(posts, checks, strict=True)])
        contexts = run_contexts(
            cfg, self.loaded.provenance, items, context_file=self.context_file, where=str(self.loaded.run),
            keys=[p.id for p in posts], strings=lambda feature, i: found[i].get(feature, []),
        )
        return contexts, context_budget(cfg, self.loaded.model.encoder, self.loaded.tokenizer)

    def _context_strings(self, image_paths: Sequence[Path | None]) -> list[dict[str, list[str]]]:
        """The image-text features (tags, caption, ocr) of each image, extracted with the
        settings of the run's cache (``mner.extract.api.extract_arrays``), as the cache
        reader returns them: ``{feature: strings}`` per image, ``{}`` for no usable image."""
        from mner.cache.schema import STRING_DATASETS
        from mner.extract.api import extract_arrays
        from mner.train.context import CACHE_SOURCES

        wanted = [s for s in self.loaded.cfg.context if s in CACHE_SOURCES]
        names = [f"{f}/{STRING_DATASETS[f]}" for f in wanted] + [f"{f}/count" for f in wanted if f != "caption"]
        arrays, ok = extract_arrays(list(image_paths), self._cache_provenance, names, device=str(self.loaded.device))
        out: list[dict[str, list[str]]] = []
        for i in range(len(image_paths)):
            row: dict[str, list[str]] = {}
            for f in wanted if ok[i] else ():
                text = np.asarray(arrays[f"{f}/{STRING_DATASETS[f]}"][i], dtype=object).reshape(-1)
                n = int(arrays[f"{f}/count"][i]) if f != "caption" else len(text)
                row[f] = [v.decode() if isinstance(v, bytes) else str(v) for v in text[:n] if v]
            out.append(row)
        return out

    def _extract(self, image_paths: Sequence[Path | None]) -> _ArrayCache:
        """Run the run's extractors on the images (None: no image, ``image_ok`` False)."""
        from mner.extract.api import extract_arrays

        lr = self.loaded
        names = list(VisualStore(None, lr.needs, []).load_names)
        if self._extractors is None:  # built once, reused for every batch
            from mner.extract.api import config_from_provenance
            from mner.extract.runner import build_extractors

            groups = list(dict.fromkeys(n.split("/")[0] for n in names))
            cfg = config_from_provenance(self._cache_provenance, groups, str(lr.device))
            self._extractors = build_extractors(cfg, lr.device)
        arrays, ok = extract_arrays(list(image_paths), self._cache_provenance, names, device=str(lr.device),
                                    extractors=self._extractors)
        return _ArrayCache({n: np.asarray(a) for n, a in arrays.items()}, ok)


def image_line(post: Post, check: ImageCheck) -> str:
    """``FILE:LINE: image REF: STATUS (why)``: where a post's image went wrong, for messages."""
    return f"{post.where}: image {post.image_ref}: {check.status} ({check.message})"


def find_post_image(images_dir: Path | None, image_id: str) -> tuple[Path | None, ImageCheck | None]:
    """The file of ``image_id`` inside ``images_dir``, or the status that says why not.

    ``image_id`` must already pass :func:`mner.data.conll.is_image_id`. A file found by
    name that resolves outside the folder (a symlink leading out) is not used.

    Returns:
        ``(file, None)`` to decode, or ``(None, check)`` with ``missing`` / ``outside``.
    """
    from mner.data.images import find_image

    if images_dir is None:
        return None, ImageCheck(ImageStatus.MISSING.value, "no images folder to look the id up in; pass --images DIR")
    try:
        found = find_image(images_dir, image_id)
    except OSError as exc:  # e.g. an id longer than a file name may be, an unreadable folder
        status = ImageStatus.MISSING if exc.errno == errno.ENAMETOOLONG else ImageStatus.UNREADABLE
        return None, ImageCheck(status.value, f"cannot look it up in {images_dir}: {exc.strerror or exc}")
    if found is None:
        return None, ImageCheck(ImageStatus.MISSING.value, f"no {image_id}.jpg/.jpeg/.png in {images_dir}")
    if not _inside(found, images_dir):
        return None, ImageCheck(OUTSIDE, f"{found} leads outside {images_dir} (to {found.resolve()})")
    return found, None


def _inside(path: Path, folder: Path) -> bool:
    # The one place predict checks containment; to become mner.data.images' own rule for
    # the ``outside`` status, so that extraction and predict refuse the same files.
    return path.resolve().is_relative_to(Path(folder).resolve())


def _words(value: object, field: str, *, allow_string: bool) -> str | tuple[str, ...]:
    """The ``text``/``tokens`` of a JSON line, or raise ValueError saying what is wrong."""
    wanted = "a string or a list of strings" if allow_string else "a list of strings"
    if isinstance(value, str) and allow_string:
        if not tokenize(value)[0]:
            raise ValueError(f'"{field}" has no words to tag; give the post\'s text')
        return value
    if not isinstance(value, list):
        raise ValueError(f'"{field}" must be {wanted}, found {json_kind(value)}')
    if not value:
        raise ValueError(f'"{field}" is an empty list; give at least one word')
    for i, tok in enumerate(value):
        if not isinstance(tok, str):
            raise ValueError(f'"{field}" must be {wanted}, found {json_kind(tok)} at position {i}')
        if not tok.strip() or any(c.isspace() for c in tok):
            raise ValueError(f'"{field}"[{i}] is {tok!r}; a token is a non-empty string without spaces')
    return tuple(value)


def _json_post(rec: object, n: int, where: str, images_dir: Path | None) -> Post:
    """One JSON line as a :class:`Post`; ValueError with the reason when it is malformed."""
    if not isinstance(rec, dict):
        raise ValueError(f'expected an object with "text" or "tokens", found {json_kind(rec)}')
    has = [k for k in ("text", "tokens") if k in rec]
    if not has:
        raise ValueError('the object has no "text" or "tokens"; write {"text": "..."} or {"tokens": [...]}')
    if len(has) == 2:
        raise ValueError('the object has both "text" and "tokens"; keep one')
    text = _words(rec[has[0]], has[0], allow_string=has[0] == "text")
    pid = rec.get("id")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip()):
        raise ValueError(f'"id" must be a non-empty string or an integer, found {json_kind(pid)}')
    post = _json_image(rec, text, n, where, images_dir)
    # The post's own "id" (e.g. a tweet id) names it in the output; else its image id or line.
    return post if pid is None else dataclasses.replace(post, id=str(pid))


def _json_image(rec: dict, text, n: int, where: str, images_dir: Path | None) -> Post:
    """The :class:`Post` of a JSON line, with its ``image`` / ``image_id`` resolved."""
    from mner.data.conll import is_image_id

    image, iid = rec.get("image"), rec.get("image_id")
    if image is not None and iid is not None:
        raise ValueError('the object has both "image" and "image_id"; keep one')
    if image is not None:
        if not isinstance(image, str) or not image:
            raise ValueError(f'"image" must be a file path (a string), found {json_kind(image)}')
        # An explicit path is the user's own choice of file: used as given.
        return Post(str(n), text, where, Path(image), image)
    if iid is None:
        return Post(str(n), text, where)
    if isinstance(iid, bool) or not isinstance(iid, (str, int)):
        raise ValueError(f'"image_id" must be a string, found {json_kind(iid)}')
    iid = str(iid)
    if not is_image_id(iid):
        raise ValueError(
            f'"image_id" {iid!r} is not an image id: ids name a file inside --images and hold no '
            '"/", "\\", spaces, or "."/".." alone; give "image": PATH for a file elsewhere'
        )
    found, lookup = find_post_image(images_dir, iid)
    return Post(iid, text, where, found, iid, lookup)


def read_posts(path: str | os.PathLike, images_dir: str | os.PathLike | None) -> tuple[list[Post], list[str]]:
    """Read a batch input file: CoNLL (tokens, IMGID) or JSON lines (``.jsonl``).

    JSON lines hold ``{"text": "..."}`` (a string, or a list of strings) or
    ``{"tokens": [...]}``, and optionally ``"image"`` (a file path, used as given) or
    ``"image_id"`` (a file ``<id>.jpg``/``.jpeg``/``.png`` inside ``images_dir``; ids
    follow the CoNLL IMGID rule, so they cannot name a path), and optionally ``"id"``
    (a string or integer naming the post in the output; default the image id, else the
    line number). Blank lines are skipped; other keys are ignored.

    A malformed JSON line (or CoNLL tweet) does not stop the others: it is returned as a
    problem.

    Returns:
        ``(posts, problems)``: the posts to tag in file order, and one
        ``FILE:LINE: what is wrong`` line per malformed input line.

    Raises:
        DataError: the file is missing or unreadable as a whole (not UTF-8, empty CoNLL).
    """
    path = Path(path)
    images = None if images_dir is None else Path(images_dir)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a .conll/.txt or .jsonl file")
    posts: list[Post] = []
    problems: list[str] = []
    if path.suffix != ".jsonl":
        from mner.data.conll import read_conll

        for t in read_conll(path, problems=problems):
            found, lookup = find_post_image(images, t.image_id)
            posts.append(Post(t.image_id, t.tokens, f"{path}:{t.line}", found, t.image_id, lookup))
        return posts, problems
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the file's permissions") from None
    # Only "\n" ends a line: JSON escapes every other line break inside strings.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            posts.append(json_line_post(line, n, path, images))
        except ValueError as exc:
            problems.append(f"{path}:{n}: {exc}")
    return posts, problems


def json_line_post(line: str, n: int, path: Path, images_dir: Path | None) -> Post:
    """Line ``n`` of a JSON-lines input as a :class:`Post`.

    Raises:
        ValueError: the line is malformed; the message says what is wrong and how to fix it.
    """
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno}); write one object per line") from None
    return _json_post(rec, n, f"{path}:{n}", images_dir)
