"""Finding a tweet's image and telling whether it can be used.

One rule for every command, with or without CoNLL data: a tweet's image is
``IMAGES_DIR/<id><ext>`` with ``ext`` one of :data:`EXTENSIONS` (tried in that order),
and a folder scan (:func:`list_image_files`) accepts exactly the files that rule would
find. A missing or broken image is reported as such, never replaced by a stock picture:
the models are told, through an image mask, that there is no image.

Symlinks: the images folder itself may be a symlink (it is resolved first). A file that
is a symlink resolving outside the folder is refused with status ``outside`` unless the
caller allows it (``extract.follow_symlinks``), so an id can never read a file elsewhere.
"""

from __future__ import annotations

import os
import warnings
from enum import StrEnum
from pathlib import Path

from PIL import Image, UnidentifiedImageError

#: Image suffixes (lower case), in the order tried for ``<id>``.
SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")

#: Extensions tried, in order, for ``<id>``: each suffix in lower, then upper case.
EXTENSIONS: tuple[str, ...] = tuple(e for s in SUFFIXES for e in (s, s.upper()))


class ImageStatus(StrEnum):
    """What became of a tweet's image; the string values are stored in the feature cache."""

    OK = "ok"
    MISSING = "missing"  # no file for the id
    UNREADABLE = "unreadable"  # exists but cannot be decoded (general case)
    EMPTY = "empty"  # zero bytes
    TRUNCATED = "truncated"  # the decoder ran out of data
    TOO_LARGE = "too_large"  # more pixels than the decompression-bomb guard allows
    NOT_IMAGE = "not_image"  # not an image format PIL knows (e.g. an HTML error page)
    OUTSIDE = "outside"  # a symlink resolving outside the images folder (not followed)

    @property
    def usable(self) -> bool:
        """True only for :attr:`OK`."""
        return self is ImageStatus.OK

    @property
    def broken(self) -> bool:
        """True for a file that exists but cannot be used (everything but ok and missing)."""
        return self not in (ImageStatus.OK, ImageStatus.MISSING)


def is_image_name(name: str) -> bool:
    """Whether a file name carries one of :data:`EXTENSIONS` (the one naming rule)."""
    return any(name.endswith(ext) and len(name) > len(ext) for ext in EXTENSIONS)


def find_image(images_dir: str | os.PathLike, image_id: str) -> Path | None:
    """The image file of ``image_id`` in ``images_dir``, or None when there is none.

    Args:
        images_dir: Folder holding ``<id><ext>`` files (``ext`` in :data:`EXTENSIONS`).
        image_id: The id from the tweet's IMGID line.

    Returns:
        The first existing file among ``<id>`` + :data:`EXTENSIONS`, else None. A
        symlink is returned as found; :func:`check_image` / :func:`outside` tell whether
        it leaves the folder.
    """
    base = Path(images_dir)
    for ext in EXTENSIONS:
        candidate = base / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def list_image_files(images_dir: str | os.PathLike) -> list[Path]:
    """Every image file of a folder by the same rule as :func:`find_image`, sorted by name.

    Broken symlinks and symlinks to files are included (their status tells what they
    are); sub-folders are not.
    """
    base = Path(images_dir)
    return sorted(p for p in base.iterdir()
                  if is_image_name(p.name) and (p.is_file() or p.is_symlink()) and not p.is_dir())


def outside(images_dir: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Where ``path`` really leads when that is outside ``images_dir``, else None.

    The folder itself is resolved first, so a symlinked images folder works; a file
    that is a symlink (or sits under a symlinked sub-folder) resolving elsewhere is
    reported with its target.
    """
    root = Path(images_dir).resolve()
    target = Path(path).resolve()
    try:
        target.relative_to(root)
    except ValueError:
        return target
    return None


def check_image(path: str | os.PathLike | None, *, max_pixels: int | None = None,
                images_dir: str | os.PathLike | None = None,
                follow_symlinks: bool = False) -> ImageStatus:
    """Classify an image file by fully decoding it.

    Args:
        path: The file (None means missing, as returned by :func:`find_image`).
        max_pixels: Decompression-bomb guard; defaults to PIL's ``Image.MAX_IMAGE_PIXELS``.
        images_dir: The folder the file was found in; with it, a symlink resolving
            outside that folder is :attr:`ImageStatus.OUTSIDE` (unless ``follow_symlinks``).
        follow_symlinks: Accept symlinks that leave ``images_dir``.

    Returns:
        :class:`ImageStatus` of the file. The pixel data is decoded (``load()``, JPEGs at
        reduced scale), so a JPEG cut short is TRUNCATED rather than passing a header-only
        check.
    """
    if path is None:
        return ImageStatus.MISSING
    path = Path(path)
    if images_dir is not None and not follow_symlinks and outside(images_dir, path) is not None:
        return ImageStatus.OUTSIDE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ImageStatus.MISSING
    if size == 0:
        return ImageStatus.EMPTY
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if limit is not None and im.width * im.height > limit:
                    return ImageStatus.TOO_LARGE
                # JPEGs decode at 1/8 scale: several times faster, and the whole entropy
                # stream is still read, so a cut-off file is still caught.
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return ImageStatus.TOO_LARGE
    except UnidentifiedImageError:
        return ImageStatus.NOT_IMAGE
    except OSError as exc:
        if "truncated" in str(exc).lower():
            return ImageStatus.TRUNCATED
        return ImageStatus.UNREADABLE
    except (ValueError, SyntaxError):  # PIL plugins raise these on corrupt headers
        return ImageStatus.UNREADABLE
    return ImageStatus.OK
