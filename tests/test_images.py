"""Robust image decoding: every damaged or unusual file gets the right status."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mner.data.images import ImageStatus
from mner.extract.images import DecodedImage, load_image


def noisy(w=96, h=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def encoded(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def assert_ok(d: DecodedImage, size):
    assert d.status is ImageStatus.OK, d.message
    assert d.ok
    assert d.image is not None
    assert d.image.mode == "RGB"
    assert d.image.size == size
    return np.asarray(d.image)


def assert_failed(d: DecodedImage, status):
    assert d.status is status, d.message
    assert d.image is None
    assert not d.ok
    assert d.message and "\n" not in d.message


def test_plain_rgb_jpeg_is_ok(tmp_path):
    d = load_image(write(tmp_path, "a.jpg", encoded(noisy(), "JPEG")))
    assert_ok(d, (96, 64))
    assert d.message == "ok"


def test_missing_and_none(tmp_path):
    assert_failed(load_image(None), ImageStatus.MISSING)
    d = load_image(tmp_path / "nope.jpg")
    assert_failed(d, ImageStatus.MISSING)
    assert "nope.jpg" in d.message


def test_directory_is_unreadable(tmp_path):
    assert_failed(load_image(tmp_path), ImageStatus.UNREADABLE)


def test_zero_bytes_is_empty(tmp_path):
    d = load_image(write(tmp_path, "e.jpg", b""))
    assert_failed(d, ImageStatus.EMPTY)
    assert "0 bytes" in d.message


@pytest.mark.parametrize("keep", [0.02, 0.1, 0.5, 0.99])
def test_truncated_jpeg(tmp_path, keep):
    data = encoded(noisy(), "JPEG", quality=90)
    cut = data[: int(len(data) * keep)]
    d = load_image(write(tmp_path, "t.jpg", cut))
    assert_failed(d, ImageStatus.TRUNCATED)
    assert d.message.startswith("truncated JPEG")
    assert f"{len(cut):,} bytes" in d.message
    # Detected without switching Pillow's global lenience on.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.95])
def test_truncated_png(tmp_path, keep):
    data = encoded(noisy(), "PNG")
    d = load_image(write(tmp_path, "t.png", data[: int(len(data) * keep)]))
    assert_failed(d, ImageStatus.TRUNCATED)
    assert d.message.startswith("truncated PNG")


def test_truncated_webp_reports_declared_length(tmp_path):
    data = encoded(noisy(), "WEBP")
    cut = data[: len(data) // 2]
    d = load_image(write(tmp_path, "t.webp", cut))
    assert_failed(d, ImageStatus.TRUNCATED)
    assert f"{len(cut):,} of {len(data):,} bytes" in d.message


def test_png_missing_only_its_end_marker_is_ok_with_a_note(tmp_path):
    data = encoded(noisy(), "PNG")
    d = load_image(write(tmp_path, "p.png", data[:-2]))
    assert_ok(d, (96, 64))
    assert "end marker missing" in d.message


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "<!DOCTYPE html"),
        (bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8)), None),
        (b"just some text\n", "just some text"),
    ],
)
def test_not_an_image(tmp_path, data, shown):
    d = load_image(write(tmp_path, "x.jpg", data))
    assert_failed(d, ImageStatus.NOT_IMAGE)
    if shown:
        assert shown in d.message


def test_corrupt_jpeg_with_intact_end_is_unreadable(tmp_path):
    # JPEG signature and end marker, garbage in between: damaged, not truncated.
    data = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + bytes(200) + b"\xff\xd9"
    d = load_image(write(tmp_path, "c.jpg", data))
    assert d.status in (ImageStatus.UNREADABLE,), d.message
    assert d.image is None


@pytest.mark.parametrize(
    ("mode", "fmt", "colour"),
    [
        ("CMYK", "JPEG", (0, 0, 0, 0)),  # CMYK white
        ("L", "PNG", 200),
        ("1", "PNG", 1),
        ("I;16", "PNG", 65535),
        ("P", "PNG", 5),
        ("LA", "PNG", (90, 255)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, fmt, colour):
    im = Image.new(mode, (30, 20), colour)
    d = load_image(write(tmp_path, f"m.{fmt.lower()}", encoded(im, fmt)))
    arr = assert_ok(d, (30, 20))
    assert arr.dtype == np.uint8 and arr.shape == (20, 30, 3)
    if mode in ("CMYK", "1", "I;16"):
        assert np.all(arr >= 250), arr[0, 0]  # white stays white (16-bit is rescaled, not clipped)
    if mode == "L":
        assert arr[0, 0].tolist() == [200, 200, 200]
    if mode == "LA":
        assert arr[0, 0].tolist() == [90, 90, 90]  # opaque: composited colour unchanged


def test_sixteen_bit_grey_is_rescaled_not_clipped(tmp_path):
    arr16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    d = load_image(write(tmp_path, "g.png", encoded(Image.fromarray(arr16), "PNG")))
    arr = assert_ok(d, (3, 1))
    assert arr[0, :, 0].tolist() == [0, 100, 255]  # Pillow's convert would give 0, 255, 255


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    im.putpixel((1, 0), (0, 0, 255, 128))  # half blue over white
    d = load_image(write(tmp_path, "a.png", encoded(im, "PNG")))
    arr = assert_ok(d, (10, 10))
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[5, 5].tolist() == [255, 0, 0]
    r, g, b = arr[0, 1].tolist()
    assert b == 255 and 125 <= r <= 128 and r == g
    assert "composited on white" in d.message


def test_palette_with_transparent_index(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 255, 0] + [255, 0, 0] * 255)  # index 0 green, others red
    im.putpixel((3, 3), 1)
    d = load_image(write(tmp_path, "p.png", encoded(im, "PNG", transparency=0)))
    arr = assert_ok(d, (8, 8))
    assert arr[0, 0].tolist() == [255, 255, 255]  # transparent green -> white
    assert arr[3, 3].tolist() == [255, 0, 0]


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    d = load_image(write(tmp_path, "anim.gif", buf.getvalue()))
    arr = assert_ok(d, (12, 12))
    assert arr[6, 6].tolist() == [255, 0, 0]
    assert "first of 3 frames" in d.message


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    d = load_image(write(tmp_path, "r.jpg", encoded(im, "JPEG", exif=exif, quality=95)))
    arr = assert_ok(d, (20, 40))
    assert "EXIF orientation 6" in d.message
    # Clockwise rotation takes the stored left edge to the top.
    assert arr[2, 10, 0] > 200 and arr[2, 10, 2] < 60
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


def test_too_large_by_max_pixels_is_not_decoded(tmp_path):
    p = write(tmp_path, "big.png", encoded(noisy(100, 50), "PNG"))
    d = load_image(p, max_pixels=4999)
    assert_failed(d, ImageStatus.TOO_LARGE)
    assert "100x50" in d.message
    assert_ok(load_image(p, max_pixels=5000), (100, 50))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width, height):
    """A PNG whose IHDR claims ``width x height`` followed by a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(64))  # one scanline would need 3 * width + 1 bytes
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)


@pytest.mark.parametrize("side", [10_000, 60_000])
def test_enormous_header_is_too_large_without_decoding(tmp_path, side):
    # No pixel data follows the header: decoding would report truncation, so
    # too_large proves the size was judged from the header alone. 60000^2 also trips
    # Pillow's own decompression-bomb error at open time.
    d = load_image(write(tmp_path, "bomb.png", png_header_only(side, side)))
    assert_failed(d, ImageStatus.TOO_LARGE)
    assert "too large" in d.message
    # The same file at a modest size is decoded, and found truncated.
    small = load_image(write(tmp_path, "small.png", png_header_only(100, 100)))
    assert_failed(small, ImageStatus.TRUNCATED)


def test_never_raises_on_odd_inputs(tmp_path):
    for i, data in enumerate([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM" + bytes(10)]):
        d = load_image(write(tmp_path, f"odd{i}.bin", data))
        assert d.image is None
        assert d.status in (ImageStatus.TRUNCATED, ImageStatus.UNREADABLE, ImageStatus.NOT_IMAGE)


def test_rgb_colour_key_transparency(tmp_path):
    im = Image.new("RGB", (6, 6), (10, 20, 30))
    im.putpixel((0, 0), (255, 0, 0))
    d = load_image(write(tmp_path, "k.png", encoded(im, "PNG", transparency=(255, 0, 0))))
    arr = assert_ok(d, (6, 6))
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[3, 3].tolist() == [10, 20, 30]


def test_float_tiff_in_unit_range(tmp_path):
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    d = load_image(write(tmp_path, "f.tiff", encoded(im, "TIFF")))
    arr = assert_ok(d, (3, 1))
    assert arr[0, :, 1].tolist() == [0, 128, 255]


# -- one rule for finding image files; symlinks -------------------------------------------


def test_find_image_and_the_folder_scan_accept_the_same_files(tmp_path):
    from mner.data.images import find_image, list_image_files

    frames = [noisy(seed=1), noisy(seed=2)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    noisy().save(tmp_path / "upper.PNG")
    noisy().save(tmp_path / "b.webp")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "mixed.Jpg").write_bytes(encoded(noisy(), "JPEG"))  # neither rule accepts it
    (tmp_path / "sub.jpg").mkdir()
    listed = list_image_files(tmp_path)
    assert [p.name for p in listed] == ["anim.gif", "b.webp", "upper.PNG"]
    for p in listed:
        assert find_image(tmp_path, p.stem) == p
    assert find_image(tmp_path, "mixed") is None and find_image(tmp_path, "notes") is None
    assert find_image(tmp_path, "sub") is None


def test_symlinks_leaving_the_folder_are_refused_unless_allowed(tmp_path):
    from mner.data.images import check_image, find_image, outside

    elsewhere = tmp_path / "private"
    elsewhere.mkdir()
    noisy().save(elsewhere / "secret.png")
    d = tmp_path / "images"
    d.mkdir()
    noisy().save(d / "real.png")
    (d / "out.png").symlink_to(elsewhere / "secret.png")
    (d / "in.png").symlink_to(d / "real.png")
    link_dir = tmp_path / "linked_images"
    link_dir.symlink_to(d, target_is_directory=True)

    assert check_image(find_image(d, "out"), images_dir=d) is ImageStatus.OUTSIDE
    assert outside(d, d / "out.png") == (elsewhere / "secret.png").resolve()
    assert check_image(find_image(d, "out"), images_dir=d, follow_symlinks=True) is ImageStatus.OK
    assert check_image(find_image(d, "in"), images_dir=d) is ImageStatus.OK
    # a symlinked images folder is resolved first: its files are inside it
    assert check_image(find_image(link_dir, "real"), images_dir=link_dir) is ImageStatus.OK
    assert check_image(find_image(link_dir, "out"), images_dir=link_dir) is ImageStatus.OUTSIDE
    assert check_image(find_image(d, "out")) is ImageStatus.OK  # no folder given: not judged
    assert ImageStatus.OUTSIDE.broken and not ImageStatus.OUTSIDE.usable
