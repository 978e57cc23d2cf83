"""Context text for training with context: the context file, and joining the sources.

A tweet may be read together with a *context* text (ITA's image text, MoRe's retrieved
passages, PGIM's LLM-written knowledge): ``train.context`` lists the sources in order,

* ``tags``: the object names the detector found, score-ordered (cache feature ``tags``);
* ``ocr``: the text read from the image, in reading order (cache feature ``ocr``);
* ``caption``: the image caption (cache feature ``caption``);
* ``file``: the tweet's entry in a context file (``--context-file``, see below),

and :func:`join_context` joins the non-empty parts, in that order, into one string. The
encoder reads it as the second sentence of a pair (see :mod:`mner.train.data`).

Context file: JSON lines ``{"image_id": ID, "context": "..."}`` (the entry of every tweet
with that image) or ``{"key": "SPLIT:INDEX", "context": "..."}`` (one tweet: its 0-based
index in the split's file, e.g. ``test:17``; at ``mner predict`` the post's id).
:func:`read_context_file` refuses with one line naming ``FILE:LINE``: a line that is not
a JSON object, one with neither or both of ``image_id``/``key``, an id or context that
is not a string, and an id given twice (which entry is meant cannot be guessed).
:func:`ContextFile.lookup` counts tweets without an entry (their file part is empty) and
entries that match no tweet: both are warnings with counts, recorded in provenance.json;
a file that matches no tweet at all is an error (most likely the file of another
dataset).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mner.errors import CacheError, ConfigError, DataError, json_kind
from mner.provenance import sha256_file

#: Context sources, in the order ITA lists them; a run may use any subset in any order.
SOURCES = ("tags", "caption", "ocr", "file")
#: Sources read from the feature cache (``mner extract`` features of the same name).
CACHE_SOURCES = ("tags", "caption", "ocr")
#: Joins the parts of a context (and the strings of one part, e.g. OCR lines).
SEPARATOR = " ; "


def check_sources(sources: Sequence[str], context_file: str | None) -> tuple[str, ...]:
    """Validate ``train.context`` against :data:`SOURCES` and ``context_file``.

    Returns:
        The sources as a tuple, with ``file`` appended when a context file is given and
        the list does not name it (``--context-file FILE`` alone means "read it").

    Raises:
        ValueError: an unknown or repeated source, or ``file`` without a context file.
    """
    out = tuple(sources)
    unknown = [s for s in out if s not in SOURCES]
    if unknown:
        raise ValueError(f"context source {unknown[0]!r} is unknown; sources: {', '.join(SOURCES)}")
    if len(set(out)) != len(out):
        raise ValueError(f"context lists a source twice: {list(out)}")
    if context_file is not None and "file" not in out:
        out = out + ("file",)
    if "file" in out and context_file is None:
        raise ValueError("context names 'file' but no context file is given; pass --context-file FILE")
    return out


@dataclass
class ContextFile:
    """A parsed context file.

    Attributes:
        path: the file.
        sha256: its hash (recorded in provenance.json; evaluate/predict compare it).
        by_image: context per image id.
        by_key: context per ``SPLIT:INDEX`` key.
        used: ids and keys some looked-up tweet matched (for the unmatched count).
    """

    path: Path
    sha256: str
    by_image: dict[str, str] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.by_image) + len(self.by_key)

    def get(self, image_id: str | None, key: str | None) -> str | None:
        """The entry of one tweet (a key entry wins over an image entry), or None."""
        if key is not None and key in self.by_key:
            self.used.add("key:" + key)
            return self.by_key[key]
        if image_id is not None and image_id in self.by_image:
            self.used.add("image_id:" + image_id)
            return self.by_image[image_id]
        return None

    def unmatched(self) -> list[str]:
        """Entries no looked-up tweet matched, as ``image_id:ID`` / ``key:K``."""
        every = [f"image_id:{i}" for i in self.by_image] + [f"key:{k}" for k in self.by_key]
        return [e for e in every if e not in self.used]


def read_context_file(path: str | Path) -> ContextFile:
    """Parse a context file (JSON lines, see the module docstring).

    Raises:
        DataError: one line naming ``FILE:LINE`` and the fix, for any malformed line,
            a duplicate id, or a file that cannot be read or holds no entry.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such context file; pass a JSON-lines file of "
                        '{"image_id": ..., "context": "..."} objects')
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    out = ContextFile(path, sha256_file(path))
    first_line: dict[str, int] = {}
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "write one object per line") from None
        if not isinstance(rec, dict):
            raise DataError(f'{where}: expected an object {{"image_id": ..., "context": "..."}}, found {json_kind(rec)}')
        ids = [k for k in ("image_id", "key") if k in rec]
        if len(ids) != 1:
            what = "neither" if not ids else "both"
            raise DataError(f'{where}: the object has {what} of "image_id" and "key"; give exactly one')
        which = ids[0]
        ident = rec[which]
        if isinstance(ident, int) and not isinstance(ident, bool) and which == "image_id":
            ident = str(ident)  # numeric image ids, as Twitter-2015 writes them
        if not isinstance(ident, str) or not ident:
            raise DataError(f'{where}: "{which}" must be a non-empty string, found {json_kind(ident)}')
        if "context" not in rec:
            raise DataError(f'{where}: the object has no "context"; write "context": "..." ("" for none)')
        ctx = rec["context"]
        if not isinstance(ctx, str):
            raise DataError(f'{where}: "context" must be a string, found {json_kind(ctx)}')
        tag = f"{which}:{ident}"
        if tag in first_line:
            raise DataError(f"{where}: {which} {ident!r} is given twice (first at line {first_line[tag]}); "
                            "keep one entry per id (join the texts into one context)")
        first_line[tag] = n
        (out.by_image if which == "image_id" else out.by_key)[ident] = " ".join(ctx.split())
    if not len(out):
        raise DataError(f'{path}: no entries; write one {{"image_id": ..., "context": "..."}} object per line')
    return out


def tweet_key(tweet) -> str:
    """``SPLIT:INDEX`` of a tweet (the file's split name and its 0-based index)."""
    from mner.data.dataset import split_name

    return f"{split_name(tweet.source)}:{tweet.index}" if tweet.source else str(tweet.index)


def join_context(parts: Sequence[str | Sequence[str] | None]) -> str:
    """One context string from per-source parts (a string, a list of strings, or None).

    Empty parts are skipped, so a tweet whose sources are all empty has the context
    ``""`` and is read exactly as without context.
    """
    texts = []
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, str):
            part = SEPARATOR.join(" ".join(str(p).split()) for p in part if str(p).strip())
        part = " ".join(part.split())
        if part:
            texts.append(part)
    return SEPARATOR.join(texts)


def check_cache_sources(cache, sources: Sequence[str]) -> None:
    """Stop when the feature cache lacks a string feature a context source reads.

    Raises:
        CacheError: no cache was given, or it lacks the feature (one line, with the fix).
    """
    need = [s for s in sources if s in CACHE_SOURCES]
    if not need:
        return
    if cache is None:
        raise CacheError(f"context source(s) {', '.join(need)} are read from the feature cache; "
                         f"pass --features cache/NAME.h5 made by `mner extract` with {', '.join(need)}")
    has = getattr(cache, "has_feature", None)
    missing = [s for s in need if has is None or not has(s)]
    if missing:
        raise CacheError(f"{getattr(cache, 'path', 'the feature cache')}: has no {', '.join(missing)} feature "
                         f"for the context; re-run `mner extract` with features including {', '.join(missing)}")


@dataclass
class ContextStats:
    """What building the contexts of a split found (recorded in provenance.json)."""

    tweets: int = 0
    empty: int = 0
    file_missing: int = 0

    def to_dict(self) -> dict:
        return {"tweets": self.tweets, "empty": self.empty, "file_missing": self.file_missing}


def build_contexts(
    sources: Sequence[str],
    tweets: Sequence,
    *,
    cache=None,
    context_file: ContextFile | None = None,
    keys: Sequence[str] | None = None,
    strings: Callable[[str, int], list[str]] | None = None,
) -> tuple[list[str], ContextStats]:
    """The context string of each tweet.

    Args:
        sources: the ordered sources (``train.context``).
        tweets: objects with ``image_id`` (and ``source``/``index`` for keys).
        cache: the feature cache (``cache.strings(feature, image_id) -> list[str]``) for
            the cache sources.
        context_file: the parsed context file for ``file``.
        keys: per-tweet keys (default :func:`tweet_key`), e.g. post ids at predict.
        strings: ``f(feature, i)``: the strings of tweet ``i``, instead of
            ``cache.strings(feature, image_id)`` (predict's freshly extracted strings).

    Returns:
        ``(contexts, stats)``: one string per tweet (``""`` when all parts are empty).
    """
    stats = ContextStats(tweets=len(tweets))
    if not sources:
        return [""] * len(tweets), stats
    if strings is not None:
        get = strings
    elif cache is not None:
        def get(feature: str, i: int) -> list[str]:
            return cache.strings(feature, tweets[i].image_id)
    else:
        get = None
    out = []
    for i, t in enumerate(tweets):
        parts: list = []
        for s in sources:
            if s == "file":
                key = keys[i] if keys is not None else tweet_key(t)
                entry = context_file.get(t.image_id, key) if context_file is not None else None
                if entry is None:
                    stats.file_missing += 1
                parts.append(entry)
            else:
                parts.append(get(s, i) if get is not None else None)
        text = join_context(parts)
        stats.empty += not text
        out.append(text)
    return out, stats


def report_file_coverage(context_file: ContextFile, stats: dict[str, ContextStats], warn=None) -> dict:
    """Warn (with counts) about tweets without an entry and entries matching no tweet.

    Args:
        context_file: the parsed file, after every split's contexts were built.
        stats: per split, what :func:`build_contexts` found.
        warn: ``f(line)``; default prints to stderr.

    Returns:
        The record for provenance.json: path, sha256, entries, missing per split, unmatched.

    Raises:
        DataError: no tweet of any split matched an entry (the file of another dataset).
    """
    warn = warn or (lambda line: print(line, file=sys.stderr))
    tweets = sum(s.tweets for s in stats.values())
    missing = {k: s.file_missing for k, s in stats.items()}
    unmatched = context_file.unmatched()
    if tweets and sum(missing.values()) == tweets:
        raise DataError(
            f"{context_file.path}: none of its {len(context_file)} entries matches a tweet of the data "
            '(by "image_id" or "key" SPLIT:INDEX); is it the context file of another dataset?'
        )
    if any(missing.values()):
        parts = ", ".join(f"{k} {v}/{stats[k].tweets}" for k, v in missing.items() if v)
        warn(f"warning: {context_file.path}: no entry for {sum(missing.values())} tweet(s) ({parts}); "
             "their file context is empty")
    if unmatched:
        more = f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""
        warn(f"warning: {context_file.path}: {len(unmatched)} entr(y/ies) match no tweet of the data "
             f"({', '.join(unmatched[:3])}{more}); they are not used")
    return {
        "path": str(context_file.path.resolve()),
        "sha256": context_file.sha256,
        "entries": len(context_file),
        "missing": missing,
        "unmatched": len(unmatched),
    }


def resolve_context_file(recorded: dict | None, given: str | Path | None, where: str) -> ContextFile | None:
    """The context file evaluate/predict read: ``given``, else the one the run recorded.

    The run's file must still have the sha256 it was trained with; a different file
    given on purpose is used, with a warning when its hash differs.

    Raises:
        ConfigError: the run needs a file and none is given nor found unchanged.
    """
    if given is not None:
        cf = read_context_file(given)
        if recorded and recorded.get("sha256") != cf.sha256:
            print(f"warning: {given}: not the context file {where} was trained with "
                  f"(sha256 {cf.sha256[:12]} vs {str(recorded.get('sha256'))[:12]}); using it", file=sys.stderr)
        return cf
    if not recorded:
        raise ConfigError(f"{where}: the run reads a context file but none is recorded; pass --context-file FILE")
    path = Path(recorded["path"])
    if not path.is_file():
        raise ConfigError(f"{where}: the run's context file {path} is gone; pass --context-file FILE")
    cf = read_context_file(path)
    if cf.sha256 != recorded.get("sha256"):
        raise ConfigError(f"{path}: changed since {where} was trained (sha256 differs); pass it explicitly "
                          "with --context-file FILE to use it anyway")
    return cf


def split_contexts(cfg, splits: dict, cache) -> tuple[dict[str, list[str]], dict | None]:
    """The context of every tweet of every split of a training run.

    Args:
        cfg: the ``TrainConfig`` (``context``, ``context_file``).
        splits: split name -> tweets.
        cache: the open feature cache (for the cache sources) or None.

    Returns:
        ``(contexts, record)``: per split one string per tweet (empty dict without
        context), and the provenance record (None without context): the sources, per
        split how many tweets and how many had an empty context, and the context file's
        path, sha256 and coverage.
    """
    if not cfg.context:
        return {}, None
    check_cache_sources(cache, cfg.context)
    cf = read_context_file(cfg.context_file) if cfg.context_file else None
    out, stats = {}, {}
    for name, tweets in splits.items():
        if tweets:
            out[name], stats[name] = build_contexts(cfg.context, tweets, cache=cache, context_file=cf)
    record: dict = {"sources": list(cfg.context), "splits": {k: v.to_dict() for k, v in stats.items()}}
    if cf is not None:
        record["file"] = report_file_coverage(cf, stats)
    return out, record


def context_budget(cfg, encoder, tokenizer) -> int:
    """The context's sub-token budget: ``context_max_length``, cut so the longest pair
    (a full tweet window, the context and the pair's extra special tokens) fits the
    encoder's position embeddings.

    Raises:
        ConfigError: not even one context sub-token fits beside a full tweet window.
    """
    from mner.train.data import PairTemplate, position_limit

    if not cfg.context:
        return 0
    room = position_limit(encoder, tokenizer) - cfg.max_length - PairTemplate.of(tokenizer).extra
    if room < 1:
        raise ConfigError(
            f"max_length {cfg.max_length} leaves no room for a context in encoder {cfg.encoder!r} "
            f"({position_limit(encoder, tokenizer)} positions); lower max_length (-o max_length=...)"
        )
    return min(cfg.context_max_length, room)


def run_contexts(
    cfg,
    provenance: dict,
    tweets: Sequence,
    *,
    cache=None,
    context_file: str | Path | None = None,
    where: str = "the run",
    keys: Sequence[str] | None = None,
    strings: Callable[[str, int], list[str]] | None = None,
) -> list[str] | None:
    """The contexts a trained run reads for ``tweets`` at evaluation or prediction.

    None when the run reads no context, or decodes the tweet view (``decode_view:
    tweet``), which needs none. The file source reads ``context_file`` or else the
    run's recorded file, unchanged (:func:`resolve_context_file`); tweets without an
    entry are a counted warning, as in training.

    Raises:
        CacheError: a cache source without a cache that has it.
        ConfigError: the run's context file is gone or changed and none is given.
    """
    if not cfg.context or cfg.decode_view == "tweet":
        return None
    if strings is None:
        check_cache_sources(cache, cfg.context)
    cf = None
    if "file" in cfg.context:
        cf = resolve_context_file((provenance.get("context") or {}).get("file"), context_file, where)
    contexts, stats = build_contexts(cfg.context, tweets, cache=cache, context_file=cf, keys=keys, strings=strings)
    if cf is not None and stats.file_missing:
        print(f"warning: {cf.path}: no entry for {stats.file_missing} of {stats.tweets} tweet(s); "
              "their file context is empty", file=sys.stderr)
    return contexts
