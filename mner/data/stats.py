"""Dataset statistics in the layout of Table 1 of the Twitter-2015/2017 papers.

Per file: tweets, tokens, and entities per type (PER LOC ORG MISC, then any other type),
and optionally how many of the tweets' images are present, missing or unreadable.

Entities are read as conlleval (and every scorer of the field) reads them: an ``I-X``
after ``O`` or after another type starts an entity. The papers' Table 1 counts ``B-``
tags only, so on data with such ``I-`` starts (Twitter-2015 has them) the two counts
differ; both are kept (``entities`` and ``b_only``, with ``i_starts`` the difference).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mner.data.conll import TYPES, read_conll
from mner.data.dataset import split_name
from mner.data.images import ImageStatus, check_image, find_image
from mner.data.schemes import entities


@dataclass(frozen=True)
class FileStats:
    """Counts for one CoNLL file.

    Attributes:
        split: Split name from the file stem (``dev`` read as ``valid``).
        path: The file.
        tweets: Number of tweets.
        tokens: Number of tokens.
        entities: Entities per type: PER, LOC, ORG, MISC always, then others found.
        other_as_misc: How many OTHER entities were counted as MISC (0 when not mapped).
        images: Image status counts per tweet (``ok``, ``missing``, ``unreadable``, the
            last being every file that exists but cannot be decoded), or None when no
            images folder was given.
        image_problems: The unreadable count broken down by status (empty, truncated, ...).
        i_starts: Entities per type whose first tag is ``I-`` (an ``I-X`` after ``O`` or
            after another type): conlleval counts them, a ``B-``-only count does not.
        b_only: ``B-`` tags per type (``S-`` too for BIOES files), the count the papers'
            Table 1 reports.
    """

    split: str
    path: str
    tweets: int
    tokens: int
    entities: dict[str, int]
    other_as_misc: int = 0
    images: dict[str, int] | None = None
    image_problems: dict[str, int] = field(default_factory=dict)
    i_starts: dict[str, int] = field(default_factory=dict)
    b_only: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All entities."""
        return sum(self.entities.values())

    @property
    def total_i_starts(self) -> int:
        """Entities that begin with ``I-``."""
        return sum(self.i_starts.values())

    @property
    def total_b_only(self) -> int:
        """``B-`` (and ``S-``) tags: the papers' Table 1 total."""
        return sum(self.b_only.values())

    def to_dict(self) -> dict:
        """JSON-ready dict, with ``total`` added."""
        d = asdict(self)
        d["total"] = self.total
        d["total_i_starts"] = self.total_i_starts
        d["total_b_only"] = self.total_b_only
        return d


def file_stats(
    path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    map_other: bool = True,
    strict: bool = False,
    status_cache: dict[str, ImageStatus] | None = None,
    advance: Callable[[int], None] | None = None,
) -> FileStats:
    """Count tweets, tokens, entities (and image statuses) of one file.

    Args:
        path: CoNLL file.
        images: Images folder; when given, each tweet's image is found and fully decoded.
        map_other: Count OTHER entities as MISC (reported in ``other_as_misc``).
        strict: Read with strict tag checking.
        status_cache: Statuses already computed, by image id (shared across files).
        advance: Called with 1 after each image check (progress display).

    Returns:
        :class:`FileStats`.
    """
    tweets = read_conll(path, strict=strict, map_other=False)
    counts: Counter[str] = Counter()
    i_starts: Counter[str] = Counter()
    b_tags: Counter[str] = Counter()
    for tw in tweets:
        raw = tw.file_labels or tw.labels
        for typ, start, _ in entities(raw):
            counts[typ] += 1
            if not raw[start].startswith(("B-", "S-")):
                i_starts[typ] += 1
        b_tags.update(lab[2:] for lab in raw if lab[:2] in ("B-", "S-"))
    other = counts.pop("OTHER", 0) if map_other else 0
    counts["MISC"] += other
    if map_other:
        i_starts["MISC"] += i_starts.pop("OTHER", 0)
        b_tags["MISC"] += b_tags.pop("OTHER", 0)
    extra = sorted(set(counts) - set(TYPES))
    types = (*TYPES, *extra)
    ents = {t: counts.get(t, 0) for t in types}
    img_counts = None
    problems: Counter[str] = Counter()
    if images is not None:
        cache = {} if status_cache is None else status_cache
        statuses: Counter[str] = Counter()
        for tw in tweets:
            st = cache.get(tw.image_id)
            if st is None:
                st = cache[tw.image_id] = check_image(find_image(images, tw.image_id))
            if advance is not None:
                advance(1)
            if st.broken:
                problems[st.value] += 1
                statuses[ImageStatus.UNREADABLE.value] += 1
            else:
                statuses[st.value] += 1
        img_counts = {
            k: statuses.get(k, 0)
            for k in (ImageStatus.OK, ImageStatus.MISSING, ImageStatus.UNREADABLE)
        }
        img_counts = {str(k): v for k, v in img_counts.items()}
    return FileStats(
        split=split_name(path),
        path=str(path),
        tweets=len(tweets),
        tokens=sum(len(tw.tokens) for tw in tweets),
        entities=ents,
        other_as_misc=other,
        images=img_counts,
        image_problems=dict(sorted(problems.items())),
        i_starts={t: i_starts.get(t, 0) for t in types},
        b_only={t: b_tags.get(t, 0) for t in types},
    )


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder stands for its train/valid (or dev)/test .txt files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [p / f"{s}.txt" for s in ("train", "valid", "dev", "test")]
            out += [f for f in found if f.is_file()] or [p]  # read_conll reports the folder
        else:
            out.append(p)
    return out


def dataset_stats(
    paths: Sequence[str | os.PathLike],
    *,
    images: str | os.PathLike | None = None,
    map_other: bool = True,
    strict: bool = False,
    progress: bool = False,
) -> list[FileStats]:
    """:func:`file_stats` for each file (folders expand to their split files).

    Args:
        paths: Files or dataset folders.
        images: Images folder (optional).
        map_other: Count OTHER as MISC.
        strict: Strict tag checking.
        progress: Show a progress bar on stderr while images are checked.
    """
    cache: dict[str, ImageStatus] = {}
    files = expand_paths(paths)
    if not (progress and images is not None):
        return [
            file_stats(p, images=images, map_other=map_other, strict=strict, status_cache=cache)
            for p in files
        ]
    from rich.console import Console
    from rich.progress import Progress

    out = []
    with Progress(console=Console(stderr=True), transient=True) as bar:
        for p in files:
            task = bar.add_task(f"checking images of {Path(p).name}", total=None)
            out.append(
                file_stats(
                    p,
                    images=images,
                    map_other=map_other,
                    strict=strict,
                    status_cache=cache,
                    advance=lambda n, task=task: bar.advance(task, n),
                )
            )
    return out
