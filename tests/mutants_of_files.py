"""Damaged copies of valid files, as a client's broken upload or an attacker makes them: every prefix (each byte offset
truncated), one bit flipped at every byte, one format's header on another's body, and headers declaring huge
dimensions (checksums fixed, so the header itself parses). tests/test_decoders.py sends them everywhere."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

HEADERS = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff\xe0", "gif": b"GIF89a", "bmp": b"BM",
           "webp": b"RIFF\x00\x00\x00\x00WEBPVP8 ", "tiff": b"II*\x00"}


def png(h=12, w=10, mode="L", seed=0) -> bytes:
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(h=12, w=10, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png(h, w, "RGB", seed))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def truncations(data: bytes, step: int = 1) -> list[tuple[str, bytes]]:
    return [(f"truncated at {k}", data[:k]) for k in range(0, len(data), step)]


def bit_flips(data: bytes, step: int = 1) -> list[tuple[str, bytes]]:
    out = []
    for i in range(0, len(data), step):
        b = bytearray(data)
        b[i] ^= 1 << (i % 8)
        out.append((f"bit {i % 8} of byte {i} flipped", bytes(b)))
    return out


def swapped_headers(valid: dict) -> list[tuple[str, bytes]]:
    """Each format's signature on each other format's body (the body without its own signature)."""
    out = []
    for fmt, data in valid.items():
        body = data[len(HEADERS[fmt]):]
        out += [(f"{other} header, {fmt} body", head + body) for other, head in HEADERS.items() if other != fmt]
    return out


def huge_png(width=100_000, height=100_000) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (CRC fixed) over a tiny image's data."""
    data = bytearray(png())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def huge_jpeg(width=65_000, height=65_000) -> bytes:
    """A JPEG whose SOF0 frame header declares ``width`` x ``height``."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def images(step: int = 1) -> list[tuple[str, bytes]]:
    """Every damaged image (``step``: every n-th offset, for the slower paths through a server)."""
    valid = {"png": png(), "jpeg": jpeg()}
    out = []
    for fmt, data in valid.items():
        out += [(f"{fmt} {d}", b) for d, b in truncations(data, step) + bit_flips(data, step)]
    out += swapped_headers(valid)
    out += [("png declaring 100000x100000", huge_png()), ("png declaring 1x4000000000", huge_png(1, 4_000_000_000)),
            ("jpeg declaring 65000x65000", huge_jpeg()), ("png declaring 0x0", huge_png(0, 0))]
    return out


TEXT = "Ce médicament m'a aidé — 頭痛が治った 👍; no side effects at all."


def texts(step: int = 1) -> list[tuple[str, bytes]]:
    data = TEXT.encode()
    return [(f"text {d}", b) for d, b in truncations(data, step)[1:] + bit_flips(data, step)]
