"""Reader and writer for the Twitter-2015/2017 CoNLL files.

Format: tweets separated by blank lines; each tweet starts with an ``IMGID:<id>`` line,
then one ``token<TAB>label`` line per token::

    IMGID:17_06_12483
    RT	O
    @jack	O
    Kevin	B-PER
    Durant	I-PER

The reader tolerates space separators, trailing whitespace, CRLF line ends and a UTF-8
BOM, reads BIO2 or BIOES files, and keeps labels in BIO2 in memory. Twitter-2015's
``OTHER`` type becomes ``MISC`` unless ``map_other=False``. Every malformed input raises
:class:`~mner.errors.DataError` naming the file and line and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mner.data.schemes import Scheme, check, detect_scheme, entities, from_entities, split_label
from mner.errors import DataError

#: Entity types of the papers, in their table order.
TYPES: tuple[str, ...] = ("PER", "LOC", "ORG", "MISC")
#: Types the reader accepts by default: the four above plus Twitter-2015's OTHER.
KNOWN_TYPES: frozenset[str] = frozenset(TYPES) | {"OTHER"}

_IMGID = "IMGID:"
# Only ASCII whitespace separates fields: tweets contain characters such as U+00A0 or
# U+2028 that str.split() would treat as separators and str.splitlines() as line ends.
_FIELDS = re.compile(r"[ \t]+")
_ASCII_WS = " \t\r\f\v"
_BAD_ID = re.compile(r"[\s/\\\x00]|^\.{1,2}$")
#: Duplicated IMGIDs warned about one line each per file; the rest are counted in one line.
MAX_DUPLICATE_WARNINGS = 10


def is_image_id(image_id: str) -> bool:
    """Whether ``image_id`` names a file *inside* an image folder.

    The one rule for every image id a user gives (CoNLL ``IMGID:`` lines, ``image_id`` of
    ``mner predict``'s JSON lines): an id is a plain file-name stem, never a path, so
    ``IMAGES/<id>.jpg`` cannot leave ``IMAGES``.

    Args:
        image_id: The id as written.

    Returns:
        False for an empty id, ``.`` or ``..``, or one holding whitespace, ``/``, ``\\``
        or a NUL byte; True otherwise.
    """
    return bool(image_id) and not _BAD_ID.search(image_id)


@dataclass(frozen=True)
class Tweet:
    """One tweet of a CoNLL file.

    Attributes:
        image_id: The id from the ``IMGID:<id>`` line.
        tokens: (T,) tokens.
        labels: (T,) BIO2 labels (OTHER mapped to MISC by default).
        source: The file it was read from, for error messages.
        line: 1-based line of its IMGID line.
        index: 0-based position of the tweet in its file.
        file_labels: (T,) the labels as written in the file (scheme, ``OTHER`` and
            ``I-`` starts kept), for statistics that count tags rather than entities.
    """

    image_id: str
    tokens: tuple[str, ...]
    labels: tuple[str, ...]
    source: str = ""
    line: int = 0
    index: int = 0
    file_labels: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def key(self) -> str:
        """Row key of the tweet's text features: sha1 of its tokens and labels, 16 hex chars.

        The labels are part of the key because the cached entity embeddings depend on the
        gold entities; the JSON encoding keeps token boundaries unambiguous.
        """
        payload = json.dumps([list(self.tokens), list(self.labels)], ensure_ascii=False)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]

    @property
    def entities(self) -> list[tuple[str, int, int]]:
        """``(type, start, end_exclusive)`` of the gold entities."""
        return entities(self.labels)


def read_conll(
    path: str | os.PathLike,
    *,
    strict: bool = False,
    map_other: bool = True,
    types: Collection[str] | None = KNOWN_TYPES,
    warn: Callable[[str], None] | None = None,
    problems: list[str] | None = None,
) -> list[Tweet]:
    """Read a Twitter-format CoNLL file (BIO2 or BIOES).

    Args:
        path: The file.
        strict: Reject tag sequences that are not well formed in the file's scheme (an
            ``I-X`` after ``O`` or another type, an unclosed BIOES entity). When False they
            are read the way conlleval reads them (an ``I-X`` after ``O`` starts an entity).
        map_other: Rename the type ``OTHER`` (Twitter-2015) to ``MISC`` (Twitter-2017).
        types: Entity types accepted; ``None`` accepts any type name.
        warn: Called with one ``warning: ...`` line per IMGID that appears twice in the
            file (naming both lines; default: print to stderr). Two tweets of one split
            sharing an image are read, not refused: the ids are the cache's row keys, so
            they share one row of image features, which is right only when they really
            share the image.
        problems: When given, a malformed tweet does not stop the reading: its
            ``FILE:LINE: what is wrong`` line is appended here, the tweet is left out and
            the others are read (``mner predict`` tags the good ones). Problems of the
            whole file (missing, empty, not UTF-8) still raise.

    Returns:
        The tweets in file order, labels in BIO2.

    Raises:
        DataError: On an empty file, bytes that are not UTF-8, or (without ``problems``)
            a token line without a label, an unknown label, a tweet without an IMGID line,
            a bad IMGID, or (strict) a malformed tag sequence. The message names the file
            and line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise DataError(
            f"{path}: is a folder, expected a CoNLL file (e.g. {path}/train.txt)"
        ) from None
    text = _decode(raw, path)
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip(_ASCII_WS + "\n"):
        raise DataError(
            f"{path}: file is empty; expected tweets of an IMGID:<id> line followed by "
            "token<TAB>label lines"
        )

    # Collected here and added in line order, leaving the caller's earlier entries alone.
    found: list[str] | None = None if problems is None else []
    blocks = _blocks(text, path, found)
    # One scheme per file: a BIOES file is recognised by any E-/S- tag in it.
    scheme = detect_scheme([lab for _, _, rows in blocks for _, _, lab in rows])
    tweets = []
    for index, (image_id, id_line, rows) in enumerate(blocks):
        try:
            tweets.append(_tweet(path, index, image_id, id_line, rows, scheme, strict, map_other, types))
        except DataError as exc:
            if found is None:
                raise
            found.append(str(exc))
    if problems is not None and found:
        # every message starts with "FILE:LINE: "
        problems.extend(sorted(found, key=lambda m: int(m[len(str(path)) + 1 :].split(":", 1)[0])))
    _warn_duplicates(tweets, path, warn)
    return tweets


def _warn_duplicates(tweets: Sequence[Tweet], path: Path, warn: Callable[[str], None] | None) -> None:
    """One warning line per repeated IMGID (both lines), at most :data:`MAX_DUPLICATE_WARNINGS`."""
    first: dict[str, int] = {}
    lines = []
    for tw in tweets:
        if tw.image_id in first:
            lines.append(
                f"warning: {path}:{tw.line}: IMGID:{tw.image_id} already at line {first[tw.image_id]}; "
                "both tweets get the same image (remove the duplicate or fix the id)"
            )
        else:
            first[tw.image_id] = tw.line
    if len(lines) > MAX_DUPLICATE_WARNINGS:
        more = len(lines) - MAX_DUPLICATE_WARNINGS
        lines = lines[:MAX_DUPLICATE_WARNINGS] + [
            f"warning: {path}: {more} more duplicated IMGID(s) not listed ({len(lines)} in all)"
        ]
    emit = warn or (lambda m: print(m, file=sys.stderr))
    for line in lines:
        emit(line)


def _tweet(
    path: Path,
    index: int,
    image_id: str,
    id_line: int,
    rows: list[tuple[int, str, str]],
    scheme: Scheme,
    strict: bool,
    map_other: bool,
    types: Collection[str] | None,
) -> Tweet:
    """One block as a :class:`Tweet`, labels checked and converted to BIO2."""
    tokens = tuple(tok for _, tok, _ in rows)
    raw_labels = [lab for _, _, lab in rows]
    for lineno, _, label in rows:
        _check_label(label, types, path, lineno)
    if strict:
        problem = check(raw_labels, scheme)
        if problem is not None:
            pos, reason = problem
            raise DataError(
                f"{path}:{rows[pos][0]}: {reason} (strict {scheme.upper()} reading); "
                "fix the tag or read without --strict to accept it as conlleval does"
            )
    spans = entities(raw_labels)
    if map_other:
        spans = [("MISC" if t == "OTHER" else t, s, e) for t, s, e in spans]
    labels = tuple(from_entities(len(tokens), spans, "bio2"))
    return Tweet(image_id, tokens, labels, str(path), id_line, index, tuple(raw_labels))


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = raw[exc.start : exc.start + 1].hex()
        raise DataError(
            f"{path}:{line}: byte 0x{bad} at column {col} is not valid UTF-8; "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _blocks(
    text: str, path: Path, problems: list[str] | None = None
) -> list[tuple[str, int, list[tuple[int, str, str]]]]:
    """Split the text into tweets: ``(image_id, id_line, [(line, token, label), ...])``.

    With ``problems``, a malformed tweet is recorded there and left out (the rest of its
    lines are skipped up to the next blank or IMGID line) instead of raising.
    """
    blocks: list[tuple[str, int, list[tuple[int, str, str]]]] = []
    current: list[tuple[int, str, str]] | None = None
    in_tweet = False
    skipping = False  # inside a tweet already reported as malformed

    def fail(message: str) -> None:
        nonlocal current, skipping
        if problems is None:
            raise DataError(message)
        problems.append(message)
        if current is not None and blocks and blocks[-1][2] is current:
            blocks.pop()
        current, skipping = None, True

    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.strip(_ASCII_WS)
        if not line:
            in_tweet = skipping = False
            continue
        fields = _FIELDS.split(line)
        if len(fields) == 1 and fields[0].startswith(_IMGID):
            # An IMGID line starts a tweet even without a blank line before it.
            image_id = fields[0][len(_IMGID) :]
            in_tweet, skipping, current = True, False, None
            if not is_image_id(image_id):
                fail(
                    f"{path}:{lineno}: bad image id {image_id!r}; write IMGID:<id> with an id "
                    "such as 17_06_12483 (no spaces or slashes)"
                )
                continue
            current = []
            blocks.append((image_id, lineno, current))
            continue
        if skipping:
            continue
        if not in_tweet or current is None:
            fail(
                f"{path}:{lineno}: tweet has no IMGID line; start each tweet with "
                "IMGID:<id> after a blank line"
            )
        elif len(fields) == 1:
            fail(
                f"{path}:{lineno}: token {fields[0]!r} has no label; write token<TAB>label, "
                "e.g. 'Paris\tB-LOC' or 'the\tO'"
            )
        elif len(fields) > 2:
            fail(
                f"{path}:{lineno}: expected 2 columns (token<TAB>label), found {len(fields)}; "
                "tokens cannot contain spaces"
            )
        else:
            current.append((lineno, fields[0], fields[1]))
    good = []
    for image_id, lineno, rows in blocks:
        if rows:
            good.append((image_id, lineno, rows))
            continue
        message = (
            f"{path}:{lineno}: tweet IMGID:{image_id} has no tokens; remove the IMGID line "
            "or add its token<TAB>label lines"
        )
        if problems is None:
            raise DataError(message)
        problems.append(message)
    return good


def _check_label(label: str, types: Collection[str] | None, path: Path, lineno: int) -> None:
    if label == "O":
        return
    prefix, typ = split_label(label)
    if prefix in ("B", "I", "E", "S") and typ and (types is None or typ in types):
        return
    allowed = ", ".join(sorted(types)) if types is not None else "a type name"
    raise DataError(
        f"{path}:{lineno}: unknown label {label!r}; expected O or B-/I-/E-/S- followed by {allowed}"
    )


def write_conll(
    path: str | os.PathLike,
    tweets: Iterable[Tweet],
    labels: Sequence[Sequence[str]] | None = None,
    scheme: Scheme = "bio2",
) -> Path:
    """Write tweets in the Twitter CoNLL format, atomically (temp file, then rename).

    Args:
        path: Output file.
        tweets: The tweets (image ids and tokens are written as they are).
        labels: Optional per-tweet labels that replace the tweets' own (e.g. predictions);
            a shorter sequence is padded with ``O``.
        scheme: ``"bio2"`` or ``"bioes"``.

    Returns:
        The path written.

    Raises:
        ValueError: If ``labels`` has a different number of tweets, or a label sequence is
            longer than its tweet.
    """
    path = Path(path)
    tweets = list(tweets)
    if labels is not None and len(labels) != len(tweets):
        raise ValueError(f"{len(labels)} label sequences for {len(tweets)} tweets")
    parts = []
    for i, tw in enumerate(tweets):
        labs = list(tw.labels if labels is None else labels[i])
        if len(labs) > len(tw.tokens):
            raise ValueError(
                f"tweet {i} (IMGID:{tw.image_id}) has {len(tw.tokens)} tokens, {len(labs)} labels"
            )
        labs += ["O"] * (len(tw.tokens) - len(labs))
        labs = from_entities(len(labs), entities(labs), scheme)
        lines = [f"{_IMGID}{tw.image_id}"] + [
            f"{t}\t{lab}" for t, lab in zip(tw.tokens, labs, strict=True)
        ]
        parts.append("\n".join(lines) + "\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(parts), encoding="utf-8", newline="\n")
    os.replace(tmp, path)
    return path
