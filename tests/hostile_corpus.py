"""A generated corpus of hostile dataset files (nothing binary is committed) and the outcome defined for each.

`EXPECTED` maps a file name to ("used", note or None) or ("skipped", reason fragment).
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

NON_UTF8_NAME = b"bad_\xff\xfe_name.png"
LONG_NAME = "L" * 240 + ".png"

EXPECTED = {
    "zero.png": ("skipped", "zero-byte file"),
    "truncated.png": ("skipped", "cannot decode"),
    "truncated.jpg": ("skipped", "cannot decode"),
    "png_named.jpg": ("used", None),
    "bomb.png": ("skipped", "too large to decode safely"),
    "one_pixel.png": ("used", None),
    "strip_20000x16.png": ("skipped", "aspect ratio 20000x16 is beyond 4:1"),
    "sixteen_bit.png": ("used", None),
    "palette.png": ("used", None),
    "cmyk.jpg": ("used", None),
    "animated.gif": ("skipped", "unsupported file type .gif"),
    "animated.webp": ("used", "animated (2 frames): the first frame is used"),
    "exif_rotated.jpg": ("used", None),
    "bad_\\xff\\xfe_name.png": ("used", None),
    LONG_NAME: ("used", None),
    "caption_empty.png": ("used", "empty caption"),
    "caption_huge.png": ("used", "caption cut from"),
    "caption_binary.png": ("skipped", "is not UTF-8 text"),
    "caption_latin1.png": ("skipped", "is not UTF-8 text"),
    "caption_control.png": ("used", "control characters removed"),
    "good.png": ("used", None),
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 1-bit pixels."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def write_hostile_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))

    def caption(name: str, text: str | bytes = "a test image") -> None:
        target = root / Path(name).with_suffix(".txt")
        target.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)

    def encoded(image: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt)
        return buf.getvalue()

    (root / "zero.png").write_bytes(b"")
    png, jpg = encoded(noise, "PNG"), encoded(noise, "JPEG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "png_named.jpg").write_bytes(png)
    (root / "bomb.png").write_bytes(decompression_bomb_png(40000, 40000))
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.new("RGB", (20000, 16), (10, 200, 10)).save(root / "strip_20000x16.png")
    Image.fromarray((rng.random((32, 32)) * 65535).astype(np.uint16)).save(root / "sixteen_bit.png")
    noise.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    noise.convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    frames[0].save(root / "animated.webp", save_all=True, append_images=frames[1:])
    rotated = Image.new("RGB", (64, 32), (1, 2, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(root / "exif_rotated.jpg", exif=exif)
    os.symlink(root, root / "loop", target_is_directory=True)
    raw_root = os.fsencode(root)
    with open(raw_root + b"/" + NON_UTF8_NAME, "wb") as f:
        f.write(png)
    with open(raw_root + b"/" + NON_UTF8_NAME[:-4] + b".txt", "wb") as f:
        f.write(b"a file whose name is not UTF-8")
    noise.save(root / LONG_NAME)
    for name in ("caption_empty.png", "caption_huge.png", "caption_binary.png", "caption_latin1.png",
                 "caption_control.png", "good.png"):
        noise.save(root / name)
    for name in EXPECTED:
        if name.endswith((".png", ".jpg", ".webp", ".gif")) and "caption_" not in name and "\\x" not in name:
            caption(name)
    caption("caption_empty.png", "")
    caption("caption_huge.png", "word " * 200_000)
    caption("caption_binary.png", bytes(range(256)) * 8)
    caption("caption_latin1.png", "caf\u00e9 cr\u00e8me".encode("latin-1"))
    caption("caption_control.png", "a\x07 red\x1b[31m dog\x7f on grass")
    return root
