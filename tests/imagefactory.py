"""Small test images of every kind the decoder must handle, written with Pillow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def gradient(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 with structure in every channel, so a transposed or flipped image differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=2)
    return np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)


def save_rgb(path: Path, h: int, w: int, seed: int = 0, **kw) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = gradient(h, w, seed)
    Image.fromarray(arr).save(path, **kw)
    return arr


def save_exif_rotated(path: Path, h: int, w: int, orientation: int = 6) -> np.ndarray:
    """Stores an (h, w) picture with an EXIF orientation tag; returns the stored pixels."""
    arr = gradient(h, w, 3)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=100, subsampling=0)
    return np.asarray(Image.open(path).convert("RGB"))


def save_16bit_gray(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)


def save_animation(path: Path, h: int, w: int) -> None:
    first = Image.new("RGB", (w, h), (255, 0, 0))
    second = Image.new("RGB", (w, h), (0, 0, 255))
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)


def truncated_jpeg(path: Path, h: int = 40, w: int = 56) -> None:
    buf = io.BytesIO()
    Image.fromarray(gradient(h, w)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def mixed_folder(root: Path) -> dict[str, tuple[int, int]]:
    """A folder of every mode, nested, at odd sizes; returns rel path -> (H, W) as displayed."""
    (root / "nested" / "deep").mkdir(parents=True)
    save_rgb(root / "rgb.jpg", 37, 53)
    Image.fromarray(gradient(30, 41)[:, :, 0]).save(root / "gray.png")
    rgba = np.dstack([gradient(33, 33), np.full((33, 33), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "nested" / "alpha.png")
    Image.fromarray(gradient(29, 31)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    save_16bit_gray(root / "nested" / "deep" / "sixteen.png", np.arange(25 * 27).reshape(25, 27) * 97)
    Image.fromarray(gradient(34, 46)).convert("CMYK").save(root / "cmyk.JPG")
    save_exif_rotated(root / "rotated.jpeg", 24, 40)
    save_rgb(root / "tiny.png", 1, 1)
    return {
        "rgb.jpg": (37, 53),
        "gray.png": (30, 41),
        "nested/alpha.png": (33, 33),
        "palette.png": (29, 31),
        "nested/deep/sixteen.png": (25, 27),
        "cmyk.JPG": (34, 46),
        "rotated.jpeg": (40, 24),
        "tiny.png": (1, 1),
    }


def save_png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit colour PNG (Pillow cannot write one): (h, w, 3 or 4) uint16, written by hand."""
    import struct
    import zlib

    h, w, c = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 6, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)


def save_corrupt_exif_jpeg(path: Path, h: int = 6, w: int = 8) -> None:
    """A JPEG whose EXIF block names a tag's data past its end: Pillow warns while reading it."""
    ifd = (1).to_bytes(2, "little") + (0x010E).to_bytes(2, "little") + (2).to_bytes(2, "little")
    ifd += (100).to_bytes(4, "little") + (1000).to_bytes(4, "little") + (0).to_bytes(4, "little")
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + ifd
    Image.new("RGB", (w, h), (10, 20, 30)).save(path, exif=b"Exif\x00\x00" + tiff)


def eps_named_jpg(path: Path) -> None:
    """A PostScript file with an image extension: Pillow would pass it to Ghostscript."""
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
