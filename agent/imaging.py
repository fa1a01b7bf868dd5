"""Decoding X-ray images safely: 8/16-bit grey PNG, TIFF, JPEG, with size limits.

Used by the agent's sources and by the export stage's dataset readers, so training, evaluation and
the device read pixels the same way.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np

from lineside.agent.errors import ImageDecodeError

DEFAULT_MAX_PIXELS = 64_000_000  # 8k x 8k: far beyond any detector panel, well below a bomb
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# JPEG start-of-frame markers are 0xC0-0xCF (baseline, progressive, lossless, arithmetic) except these
# three, which share the range: define Huffman tables, reserved, define arithmetic conditioning.
_JPEG_NOT_SOF = (0xC4, 0xC8, 0xCC)


def image_format(data: bytes) -> str | None:
    """'png', 'jpeg' or 'tiff' by the file's magic bytes (never by its name); None for anything else."""
    if data[:8] == _PNG_MAGIC:
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] in _TIFF_MAGICS:
        return "tiff"
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the JPEG frame header, walking the marker segments; None when there is none."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in _JPEG_NOT_SOF:
            if i + 9 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height) if width and height else None  # height 0 (DNL) is not accepted
        if length < 2:
            return None
        i += 2 + length
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG or JPEG from its header, without decoding; None when it has none."""
    kind = image_format(data)
    if kind == "png":
        return _png_size(data)
    if kind == "jpeg":
        return _jpeg_size(data)
    return None


def _decode_tiff(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            pixels = int(np.prod(page.shape[:2]))
            if pixels > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"{name}: image of {page.shape} ({pixels} pixels) exceeds the limit of {max_pixels}"
                )
            return np.asarray(page.asarray())
    except ImageDecodeError:
        raise
    except Exception as err:  # tifffile raises many types for corrupt files
        raise ImageDecodeError("decode_failed", f"{name}: not a readable TIFF ({err})") from err


def decode_image(data: bytes, name: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a 2-D uint8 or uint16 grey array.

    Colour images are converted to grey only when all channels are equal (a grey image saved as RGB);
    a real colour image is refused, since X-ray detectors deliver grey. Raises ImageDecodeError with
    a stable code: empty, too_large, decode_failed, bad_channels, bad_dtype.
    """
    if not data:
        raise ImageDecodeError("empty", f"{name}: file is empty (0 bytes)")
    # The size is read from the header of every accepted format before anything is decoded, so a
    # decompression bomb is refused without costing memory; other formats are refused outright.
    kind = image_format(data)
    if kind is None:
        raise ImageDecodeError(
            "decode_failed", f"{name}: not a PNG, TIFF or JPEG image (starts with {data[:8].hex(' ')})"
        )
    if kind == "tiff":
        image = _decode_tiff(data, name, max_pixels)
    else:
        size = header_size(data)
        if size is None:
            raise ImageDecodeError("decode_failed", f"{name}: {kind.upper()} header without an image size")
        if size[0] * size[1] > max_pixels:
            raise ImageDecodeError(
                "too_large", f"{name}: image of {size[0]}x{size[1]} pixels exceeds the limit of {max_pixels}"
            )
        buffer = np.frombuffer(data, dtype=np.uint8)
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ImageDecodeError("decode_failed", f"{name}: not a decodable PNG/TIFF/JPEG image or truncated")
    if image.ndim == 3:
        channels = image.shape[2]
        if channels in (3, 4):
            colour = image[:, :, :3]
            if not (
                np.array_equal(colour[:, :, 0], colour[:, :, 1]) and np.array_equal(colour[:, :, 0], colour[:, :, 2])
            ):
                raise ImageDecodeError(
                    "bad_channels",
                    f"{name}: expected a grey X-ray image, found {channels} distinct colour channels",
                )
            image = colour[:, :, 0]
        else:
            raise ImageDecodeError("bad_channels", f"{name}: expected 1 channel, found {channels}")
    elif image.ndim != 2:
        raise ImageDecodeError("bad_channels", f"{name}: expected a 2-D image, found shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError("bad_dtype", f"{name}: expected 8- or 16-bit pixels, found {image.dtype}")
    if min(image.shape) < 8:
        raise ImageDecodeError("too_small", f"{name}: image of {image.shape} is too small to inspect")
    return np.ascontiguousarray(image)


def read_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file (see decode_image)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageDecodeError("unreadable", f"{path}: cannot read file ({err.strerror})") from err
    return decode_image(data, str(path), max_pixels=max_pixels)


def to_unit_range(image: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
    """Map uint8/uint16 pixels to float32 in [0, 1]. `bits_stored` handles 12-bit data in 16-bit words."""
    if image.dtype == np.uint8:
        full = 255.0
    elif image.dtype == np.uint16:
        full = float(2 ** (bits_stored or 16) - 1)
    else:
        raise ImageDecodeError("bad_dtype", f"expected uint8 or uint16 pixels, found {image.dtype}")
    # A true division, not a product with 1/full: v / 255 and (257 v) / 65535 are then the same float32
    # (both correctly rounded from the same quotient), so an 8-bit image and its 16-bit copy score alike.
    out = image.astype(np.float32) / np.float32(full)
    if image.dtype == np.uint16 and bits_stored and bits_stored < 16:
        np.minimum(out, 1.0, out=out)
    return out
