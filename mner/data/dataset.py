"""A dataset folder: the three splits and the optional image-dependent side file.

Layout (what ``mner sample`` writes, and how Twitter-2015/2017 are laid out)::

    DIR/train.txt  DIR/valid.txt (or dev.txt)  DIR/test.txt
    DIR/images/<id>.jpg
    DIR/image_dependent.tsv      optional: split, index, image_id, start, end, type
    DIR/ocr_dependent.tsv        optional, same columns: entities typed by printed text
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mner.data.conll import Tweet, read_conll
from mner.errors import DataError

#: Split names in their usual order.
SPLITS: tuple[str, ...] = ("train", "valid", "test")
#: Other file stems accepted for a split.
ALIASES: dict[str, str] = {"dev": "valid", "val": "valid", "validation": "valid"}

IMAGE_DEPENDENT_FILE = "image_dependent.tsv"
IMAGE_DEPENDENT_HEADER: tuple[str, ...] = ("split", "index", "image_id", "start", "end", "type")
#: The entities whose type only text printed in the image reveals (same columns; read it
#: with ``read_image_dependent(DIR / OCR_DEPENDENT_FILE)``).
OCR_DEPENDENT_FILE = "ocr_dependent.tsv"

Marks = dict[tuple[str, int], list[tuple[int, int, str]]]


@dataclass(frozen=True)
class ReadConfig:
    """How CoNLL files are read (section ``data`` of params.yaml; ``mner data stats``, ``mner score``).

    Attributes:
        strict: Reject malformed tag sequences instead of reading them as conlleval does.
        map_other: Read Twitter-2015's OTHER type as MISC.
    """

    strict: bool = False
    map_other: bool = True


def split_name(path: str | os.PathLike) -> str:
    """The split a file holds, from its stem: ``dev.txt`` -> ``valid``; unknown stems as is."""
    stem = Path(path).stem.lower()
    return ALIASES.get(stem, stem)


def load_splits(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    strict: bool = False,
    map_other: bool = True,
    warn: Callable[[str], None] | None = None,
) -> dict[str, list[Tweet]]:
    """Read the splits of a dataset.

    Args:
        data: A dataset folder (reads ``train.txt``, ``valid.txt`` or ``dev.txt``,
            ``test.txt`` where present), a single file, or a list of files (each named by
            its stem, ``dev`` read as ``valid``).
        strict: See :func:`mner.data.conll.read_conll`.
        map_other: See :func:`mner.data.conll.read_conll`.
        warn: Where a split's duplicated IMGIDs are reported, one line each (default:
            stderr); see :func:`mner.data.conll.read_conll`.

    Returns:
        ``{split: tweets}`` with ``train``, ``valid``, ``test`` first, in that order.

    Raises:
        DataError: If the folder holds no split file, two files map to the same split, or a
            file is malformed.
    """
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            files = []
            for name in ("train", "valid", "dev", "test"):
                f = p / f"{name}.txt"
                if f.is_file():
                    files.append(f)
            if not files:
                raise DataError(
                    f"{p}: no train.txt, valid.txt (or dev.txt) or test.txt in this folder; "
                    "point at a dataset folder or pass the files"
                )
        else:
            files = [p]
    else:
        files = [Path(f) for f in data]
    out: dict[str, list[Tweet]] = {}
    seen: dict[str, Path] = {}
    for f in files:
        name = split_name(f)
        if name in seen:
            raise DataError(
                f"{f}: holds the {name} split, like {seen[name]}; pass one file per split"
            )
        seen[name] = f
        out[name] = read_conll(f, strict=strict, map_other=map_other, warn=warn)
    order = {s: i for i, s in enumerate(SPLITS)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def read_image_dependent(
    data_dir: str | os.PathLike,
    splits: Mapping[str, Sequence[Tweet]] | None = None,
) -> Marks:
    """Read ``image_dependent.tsv``: the entities whose type only the image shows.

    Args:
        data_dir: Dataset folder (or the .tsv file itself).
        splits: Optional tweets by split (from :func:`load_splits`); when given, each row of
            a split present there is checked: the index exists, the image id matches and the
            span is a gold entity of that type. Rows of a standard split that is absent from
            ``splits`` are kept unchecked; rows naming an unknown split are an error.

    Returns:
        ``{(split, tweet_index): [(start, end_exclusive, type), ...]}``; empty when the
        file does not exist (a dataset without the annotation).

    Raises:
        DataError: On a bad header, a malformed row, or (with ``splits``) a row that does
            not match the data; the message names the file and line.
    """
    p = Path(data_dir)
    path = p if p.suffix == ".tsv" else p / IMAGE_DEPENDENT_FILE
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; re-encode the file as UTF-8") from None
    header = tuple(c.strip() for c in lines[0].split("\t")) if lines else ()
    if header != IMAGE_DEPENDENT_HEADER:
        raise DataError(
            f"{path}:1: expected the header {' '.join(IMAGE_DEPENDENT_HEADER)} "
            "(tab-separated), found " + (repr(lines[0]) if lines else "an empty file")
        )
    marks: Marks = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) != len(IMAGE_DEPENDENT_HEADER):
            raise DataError(
                f"{path}:{lineno}: expected {len(IMAGE_DEPENDENT_HEADER)} tab-separated "
                f"columns ({' '.join(IMAGE_DEPENDENT_HEADER)}), found {len(cols)}"
            )
        split, index, image_id, start, end, typ = cols
        split = ALIASES.get(split, split)
        try:
            i, s, e = int(index), int(start), int(end)
        except ValueError:
            raise DataError(
                f"{path}:{lineno}: index, start and end must be integers, found "
                f"{index!r}, {start!r}, {end!r}"
            ) from None
        if i < 0 or s < 0 or e <= s:
            raise DataError(
                f"{path}:{lineno}: need index >= 0 and 0 <= start < end (end exclusive), "
                f"found index={i} start={s} end={e}"
            )
        if splits is not None:
            _check_mark(path, lineno, splits, split, i, image_id, s, e, typ)
        marks.setdefault((split, i), []).append((s, e, typ))
    for spans in marks.values():
        spans.sort()
    return marks


def _check_mark(
    path: Path,
    lineno: int,
    splits: Mapping[str, Sequence[Tweet]],
    split: str,
    i: int,
    image_id: str,
    s: int,
    e: int,
    typ: str,
) -> None:
    where = f"{path}:{lineno}"
    if split not in splits:
        if split in SPLITS:  # a standard split that was not loaded: nothing to check against
            return
        raise DataError(
            f"{where}: unknown split {split!r}; use one of {', '.join(dict.fromkeys([*SPLITS, *splits]))}"
        )
    tweets = splits[split]
    if i >= len(tweets):
        raise DataError(f"{where}: {split} has {len(tweets)} tweets, no index {i}")
    tw = tweets[i]
    if tw.image_id != image_id:
        raise DataError(
            f"{where}: {split} tweet {i} has IMGID:{tw.image_id}, not {image_id}; "
            "the side file does not belong to these data files"
        )
    if (typ, s, e) not in tw.entities:
        raise DataError(
            f"{where}: {typ} [{s}, {e}) is not a gold entity of {split} tweet {i} "
            f"({tw.source}:{tw.line}); fix the span or the labels"
        )
