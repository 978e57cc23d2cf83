"""Finding a tweet's image and telling whether it can be used.

A tweet's image is ``IMAGES_DIR/<id>.jpg`` (or ``.jpeg``, ``.png``). A missing or broken
image is reported as such, never replaced by a stock picture: the models are told, through
an image mask, that there is no image.
"""

from __future__ import annotations

import os
import warnings
from enum import StrEnum
from pathlib import Path

from PIL import Image, UnidentifiedImageError

#: Extensions tried, in order, for ``<id>``.
EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


class ImageStatus(StrEnum):
    """What became of a tweet's image; the string values are stored in the feature cache."""

    OK = "ok"
    MISSING = "missing"  # no file for the id
    UNREADABLE = "unreadable"  # exists but cannot be decoded (general case)
    EMPTY = "empty"  # zero bytes
    TRUNCATED = "truncated"  # the decoder ran out of data
    TOO_LARGE = "too_large"  # more pixels than the decompression-bomb guard allows
    NOT_IMAGE = "not_image"  # not an image format PIL knows (e.g. an HTML error page)

    @property
    def usable(self) -> bool:
        """True only for :attr:`OK`."""
        return self is ImageStatus.OK

    @property
    def broken(self) -> bool:
        """True for a file that exists but cannot be used (everything but ok and missing)."""
        return self not in (ImageStatus.OK, ImageStatus.MISSING)


def find_image(images_dir: str | os.PathLike, image_id: str) -> Path | None:
    """The image file of ``image_id`` in ``images_dir``, or None when there is none.

    Args:
        images_dir: Folder holding ``<id>.jpg`` / ``.jpeg`` / ``.png`` files.
        image_id: The id from the tweet's IMGID line.

    Returns:
        The first existing file among ``<id>`` + :data:`EXTENSIONS`, else None.
    """
    base = Path(images_dir)
    for ext in EXTENSIONS:
        candidate = base / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def check_image(path: str | os.PathLike | None, *, max_pixels: int | None = None) -> ImageStatus:
    """Classify an image file by fully decoding it.

    Args:
        path: The file (None means missing, as returned by :func:`find_image`).
        max_pixels: Decompression-bomb guard; defaults to PIL's ``Image.MAX_IMAGE_PIXELS``.

    Returns:
        :class:`ImageStatus` of the file. The pixel data is decoded (``load()``, JPEGs at
        reduced scale), so a JPEG cut short is TRUNCATED rather than passing a header-only
        check.
    """
    if path is None:
        return ImageStatus.MISSING
    path = Path(path)
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
