"""Image decoding (kdprune.data.decode_image): every mode a user's files come in decodes to what a viewer shows,
and files at unexpected depths of an image folder are an error naming them."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_imagefolder, make_tar
from kdprune import config, data
from kdprune.errors import KdpruneError


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): H x W x 3 uint16."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def palette(transparent: bool) -> bytes:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red
    image.putpixel((1, 0), 1)
    return encoded(image, transparency=0) if transparent else encoded(image)


def grey16() -> bytes:
    return encoded(Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)))


def cmyk(fmt: str) -> bytes:
    return encoded(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), fmt)  # full magenta + yellow = red


def exif_rotated() -> bytes:
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encoded(image, "JPEG", exif=exif)


# format -> (bytes, expected uint8 C x H x W as nested lists, or a (shape, first pixel, tolerance) for lossy files)
MATRIX = {
    "palette (red index 1)": (palette(False), [[[0, 255]], [[0, 0]], [[0, 0]]]),
    "palette + transparency": (palette(True), [[[0, 255]], [[0, 0]], [[0, 0]]]),
    "grey + alpha (LA)": (encoded(Image.new("LA", (2, 1), (200, 10))), [[[200, 200]]]),
    "RGBA": (encoded(Image.new("RGBA", (1, 1), (10, 20, 30, 0))), [[[10]], [[20]], [[30]]]),
    "16-bit grey PNG": (grey16(), [[[0, 1, 128, 255]]]),
    "16-bit RGB PNG": (png_rgb16(np.array([[[0, 0x8080, 0xFFFF]]], dtype=np.uint16)), [[[0]], [[128]], [[255]]]),
    "CMYK TIFF": (cmyk("TIFF"), [[[255, 255]] * 2, [[0, 0]] * 2, [[0, 0]] * 2]),
    "CMYK JPEG": (cmyk("JPEG"), ((3, 2, 2), (255, 0, 0), 3)),
    "1-bit": (encoded(Image.new("1", (1, 1), 1)), [[[255]]]),
    "grey (L)": (encoded(Image.new("L", (1, 1), 77)), [[[77]]]),
    "EXIF-rotated JPEG": (exif_rotated(), ((3, 4, 2), (0, 0, 255), 3)),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_decode_matrix(name):
    payload, expected = MATRIX[name]
    image = data.decode_image(payload, f"{name}.png")
    assert image.dtype == torch.uint8
    if isinstance(expected, tuple):
        shape, pixel, tolerance = expected
        assert tuple(image.shape) == shape
        assert (image[:, 0, 0].int() - torch.tensor(pixel)).abs().max() <= tolerance, image[:, 0, 0]
    else:
        assert image.tolist() == expected


def test_mixed_bit_depths_and_modes_make_one_dataset(tmp_path):
    root = make_imagefolder(tmp_path / "images", per_class={"train": 2, "test": 1}, size=(2, 2))
    (root / "train" / "cat" / "0.png").write_bytes(encoded(Image.fromarray(np.full((2, 2), 65535, np.uint16))))
    (root / "train" / "dog" / "0.png").write_bytes(encoded(Image.new("P", (2, 2))))  # palette: black
    (root / "test" / "dog" / "0.png").write_bytes(encoded(Image.new("RGB", (2, 2), (255, 0, 0))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warnings from a decoder on its way out
        train_x, _, test_x, _, _ = data.load_imagefolder_source(root)
    assert all(x.shape == (3, 2, 2) for x in train_x + test_x)  # any colour image makes the dataset RGB
    assert train_x[0].tolist() == [[[255, 255]] * 2] * 3  # white 16-bit grey stays white in all three channels
    assert test_x[1][:, 0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("payload", [b"not an image", palette(False)[:40], b""], ids=["junk", "truncated", "empty"])
def test_decode_failure_is_one_line_naming_the_file(payload):
    with pytest.raises(KdpruneError) as info:
        data.decode_image(payload, "train/cat/bad.png")
    message = str(info.value)
    assert message.startswith("train/cat/bad.png: unreadable image") and "\n" not in message


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_files_at_unexpected_depths_are_an_error_naming_them(tmp_path, archive):
    root = make_imagefolder(tmp_path / "images")
    (root / "train" / "cat" / "more").mkdir()
    (root / "train" / "cat" / "more" / "x.png").write_bytes(encoded(Image.new("L", (8, 8))))
    (root / "train" / "stray.png").write_bytes(encoded(Image.new("L", (8, 8))))
    source = make_tar(root, tmp_path / "images.tar.gz", top="images") if archive else root
    with pytest.raises(KdpruneError) as info:
        data.load_imagefolder_source(source)
    message = str(info.value)
    assert "2 file(s) not at <split>/<class>/<file>" in message
    assert "train/cat/more/x.png" in message and "train/stray.png" in message


def test_only_the_first_three_misplaced_files_are_named(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    for i in range(5):
        (root / "test" / f"stray{i}.png").write_bytes(encoded(Image.new("L", (8, 8))))
    with pytest.raises(KdpruneError, match=r"5 file\(s\) .*stray2\.png and 2 more") as info:
        data.load_imagefolder_source(root)
    assert "stray3" not in str(info.value)


def test_files_beside_the_splits_are_ignored(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    (root / "README.md").write_text("my dataset")
    (root / "LICENSE").write_text("CC-BY")
    params = config.parse({"data": {"source": "imagefolder", "path": str(root)}}).data
    assert len(data.prepare(params, seed=0)["classes"]) == 2
