"""Robust image decoding for stage one: every file becomes an RGB image or a status.

Tweets come with whatever their authors uploaded, and crawled copies of Twitter-2015/2017
contain every kind of damage: missing files, zero-byte files, downloads cut short,
HTML error pages saved as ``.jpg``, CMYK and 16-bit scans, transparent PNGs, animated
GIFs, phone photos stored sideways with an EXIF orientation, and now and then a
gigapixel panorama. :func:`load_image` turns each into either an RGB ``PIL.Image`` or
a :class:`mner.data.images.ImageStatus` with a one-line reason, and never raises for a
bad file, so one broken image cannot stop an extraction run.

Decisions:

* Truncated files are reported as ``truncated`` and **not used**. Pillow's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (it would silently fill the missing
  part with grey for every library in the process). A file counts as truncated when
  Pillow says it ran out of data, or when it carries a known signature (JPEG, PNG, GIF,
  WebP) but fails to decode and lacks its format's end marker or declared length. A
  file whose pixels decode completely is ``ok`` even if a trailing marker is missing.
* Size is checked from the header, before any pixel is decoded: more than
  ``max_pixels`` pixels is ``too_large``. Pillow's own decompression-bomb guard
  (``Image.MAX_IMAGE_PIXELS``, raised at twice that) still applies and is reported the
  same way.
* Colour: everything is converted to 8-bit RGB. Transparency (RGBA, LA, PA, palette
  images with a transparent index) is composited on white, as a viewer shows it;
  16-bit and 32-bit greyscale are rescaled to 8 bits rather than clipped; CMYK uses
  Pillow's conversion (which already handles Adobe's inverted CMYK JPEGs).
* Animated images (GIF, APNG, WebP) use their first frame.
* The EXIF orientation is applied (``ImageOps.exif_transpose``), so a portrait photo
  stored sideways comes out portrait; a broken EXIF block is ignored with a note.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mner.data.images import ImageStatus

DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's default ``Image.MAX_IMAGE_PIXELS`` (about 9459 x 9459)."""

# Format signatures (first bytes) and the end markers a complete file carries.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"RIFF", "WEBP"),  # confirmed by bytes 8..12 == b"WEBP" in _sniff
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_PNG_END = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class DecodedImage:
    """The outcome of decoding one image file.

    Attributes:
        image: an RGB image (mode ``"RGB"``, EXIF orientation applied) when ``status``
            is ``ok``, else None.
        status: what happened (:class:`mner.data.images.ImageStatus`).
        message: one human line, e.g. ``"ok (RGBA composited on white)"`` or
            ``"truncated JPEG: 2140 bytes, no end-of-image marker"``.
    """

    image: Image.Image | None
    status: ImageStatus
    message: str

    @property
    def ok(self) -> bool:
        """True when ``image`` is usable."""
        return self.status == ImageStatus.OK


def load_image(path: Path | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode one image file into RGB, or say why it cannot be used.

    Args:
        path: the image file; None when the dataset has no image for the tweet.
        max_pixels: images with more pixels (width x height, read from the header)
            are ``too_large`` and never decoded.

    Returns:
        A :class:`DecodedImage`; ``image`` is set only when ``status`` is ``ok``. Never
        raises for a bad or unreadable file.
    """
    if path is None:
        return _fail(ImageStatus.MISSING, "no image file for this tweet")
    path = Path(path)
    try:
        if not path.exists():
            return _fail(ImageStatus.MISSING, f"no such file: {path}")
        if not path.is_file():
            return _fail(ImageStatus.UNREADABLE, f"not a regular file: {path}")
        size = path.stat().st_size
        if size == 0:
            return _fail(ImageStatus.EMPTY, "empty file (0 bytes)")
        with path.open("rb") as fh:
            head = fh.read(32)
    except OSError as exc:  # permissions, broken symlink, I/O error
        return _fail(ImageStatus.UNREADABLE, f"cannot read file: {exc.strerror or exc}")

    try:
        return _decode(path, size, head, max_pixels)
    except MemoryError:
        return _fail(ImageStatus.TOO_LARGE, "out of memory while decoding")
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop a run
        return _fail(ImageStatus.UNREADABLE, f"cannot decode: {type(exc).__name__}: {exc}")


def _fail(status: ImageStatus, message: str) -> DecodedImage:
    return DecodedImage(image=None, status=status, message=message)


def _decode(path: Path, size: int, head: bytes, max_pixels: int) -> DecodedImage:
    kind = _sniff(head)
    notes: list[str] = []
    with warnings.catch_warnings():
        # We check the size ourselves; Pillow's bomb warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            return _fail(ImageStatus.TOO_LARGE, f"too large: {exc}")
        except (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError) as exc:
            if kind is None:
                return _fail(ImageStatus.NOT_IMAGE, f"not an image: starts with {_preview(head)}")
            return _damaged(path, size, kind, exc)

        with im:
            fmt = im.format or kind or "image"
            width, height = im.size
            if width * height > max_pixels:
                return _fail(
                    ImageStatus.TOO_LARGE,
                    f"too large: {fmt} {width}x{height} = {width * height:,} pixels "
                    f"exceeds max_pixels={max_pixels:,}",
                )
            if width == 0 or height == 0:
                return _fail(ImageStatus.UNREADABLE, f"{fmt} with zero size {width}x{height}")
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                im.seek(0)
                notes.append(f"animated {fmt}: first of {frames} frames")
            try:
                im.load()
            except (OSError, SyntaxError, EOFError, ValueError) as exc:
                return _damaged(path, size, kind or fmt, exc)
            if kind == "PNG" and _tail(path, size, len(_PNG_END)) != _PNG_END:
                notes.append("PNG end marker missing, pixel data complete")

            try:
                orientation = im.getexif().get(0x0112, 1)
                oriented = ImageOps.exif_transpose(im)
            except Exception as exc:  # noqa: BLE001 - malformed EXIF is common in the wild
                oriented = im.copy()
                notes.append(f"EXIF orientation ignored ({type(exc).__name__})")
            else:
                if orientation in (2, 3, 4, 5, 6, 7, 8):
                    notes.append(f"EXIF orientation {orientation} applied")

        rgb, note = _to_rgb(oriented)
        if note:
            notes.append(note)
    message = "ok" + (f" ({'; '.join(notes)})" if notes else "")
    return DecodedImage(image=rgb, status=ImageStatus.OK, message=message)


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str]:
    """Convert any Pillow mode to 8-bit RGB; returns the image and a note (or "")."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im, ""
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_grey_to_rgb(im), f"{mode} rescaled to 8-bit RGB"
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in im.info)
        or (mode in ("L", "RGB") and "transparency" in im.info)
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} composited on white"
    return im.convert("RGB"), f"{mode} converted to RGB"


def _wide_grey_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit or float greyscale -> 8-bit RGB by scaling, not Pillow's clipping."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        grey = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    else:
        a = arr.astype(np.float64)
        peak = a.max(initial=0)
        # Float images are usually in [0, 1]; 32-bit ints usually hold 16-bit data.
        if im.mode == "F" and peak <= 1.0:
            top = 1.0
        else:
            top = 255.0 if peak <= 255 else 65535.0
        grey = np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.stack([grey] * 3, axis=-1)))


def _sniff(head: bytes) -> str | None:
    """The format a file's first bytes announce, or None."""
    for sig, fmt in _SIGNATURES:
        if head.startswith(sig):
            if fmt == "WEBP" and head[8:12] != b"WEBP":
                continue
            return fmt
    return None


def _damaged(path: Path, size: int, kind: str, exc: BaseException) -> DecodedImage:
    """Classify a decoding failure of a file that looks like an image."""
    text = str(exc)
    reason = _truncation(path, size, kind)
    said_truncated = "truncated" in text.lower() or isinstance(exc, EOFError)
    if reason is None and said_truncated:
        reason = f"{size:,} bytes, decoder ran out of data"
    if reason is not None:
        return _fail(ImageStatus.TRUNCATED, f"truncated {kind}: {reason}")
    return _fail(
        ImageStatus.UNREADABLE, f"corrupt {kind} ({size:,} bytes): {text or type(exc).__name__}"
    )


def _truncation(path: Path, size: int, kind: str) -> str | None:
    """Why a file of a known format looks cut short, or None if its end looks intact."""
    if kind == "JPEG":
        if _tail(path, size, 2) != b"\xff\xd9":
            return f"{size:,} bytes, no end-of-image marker"
    elif kind == "PNG":
        if _tail(path, size, len(_PNG_END)) != _PNG_END:
            return f"{size:,} bytes, no IEND chunk"
    elif kind == "GIF":
        if _tail(path, size, 1) != b";":
            return f"{size:,} bytes, no trailer"
    elif kind == "WEBP":
        with path.open("rb") as fh:
            riff = fh.read(8)
        if len(riff) == 8:
            declared = struct.unpack("<I", riff[4:8])[0] + 8
            if size < declared:
                return f"{size:,} of {declared:,} bytes"
    return None


def _tail(path: Path, size: int, n: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(max(0, size - n))
        return fh.read(n)


def _preview(head: bytes) -> str:
    """The first bytes as text when printable (an HTML error page), else hex."""
    sample = head[:16]
    text = sample.decode("ascii", errors="replace")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return repr(text.strip() or text)
    return sample.hex(" ", 1)
