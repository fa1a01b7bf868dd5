"""Image decoding guards: the size is read from the header of every accepted format before decoding."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import tifffile

from lineside.agent.errors import ImageDecodeError
from lineside.agent.imaging import decode_image, header_size, image_format


def _encode(suffix: str, image: np.ndarray) -> bytes:
    if suffix == ".tif":
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, image, compression="zlib")
        return buffer.getvalue()
    ok, encoded = cv2.imencode(suffix, image)
    assert ok
    return encoded.tobytes()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any attempt to decode pixels (OpenCV or tifffile) instead of performing it."""
    calls: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append("decoded")
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    return calls


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_an_image_beyond_the_pixel_limit_is_refused_before_decoding(suffix: str, no_decoding: list[str]) -> None:
    # given a real, valid image of 300x200 and a limit of 50,000 pixels
    data = _encode(suffix, np.full((200, 300), 128, np.uint8))

    # when / then: refused as too large, named, without decoding a pixel
    with pytest.raises(ImageDecodeError, match=r"300.200|\(200, 300\)") as caught:
        decode_image(data, f"part{suffix}", max_pixels=50_000)
    assert caught.value.code == "too_large"
    assert "part" in str(caught.value)
    assert no_decoding == []


def test_a_jpeg_named_png_is_judged_by_its_content(no_decoding: list[str]) -> None:
    # given a JPEG bomb in miniature, saved under a .png name (decoders go by content)
    data = _encode(".jpg", np.zeros((400, 400), np.uint8))

    # when / then
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, "looks-like.png", max_pixels=100_000)
    assert caught.value.code == "too_large"
    assert image_format(data) == "jpeg"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_header_size_reads_width_and_height(suffix: str) -> None:
    # given
    data = _encode(suffix, np.zeros((123, 457), np.uint8))

    # when / then
    assert header_size(data) == (457, 123)


@pytest.mark.parametrize("suffix", [".bmp", ".webp"])
def test_formats_other_than_png_jpeg_tiff_are_refused_without_decoding(suffix: str, no_decoding: list[str]) -> None:
    # given an image OpenCV could decode, in a format whose size we do not check
    ok, encoded = cv2.imencode(suffix, np.zeros((16, 16), np.uint8))
    assert ok

    # when / then
    with pytest.raises(ImageDecodeError, match="not a PNG, TIFF or JPEG") as caught:
        decode_image(encoded.tobytes(), f"x{suffix}")
    assert caught.value.code == "decode_failed"
    assert no_decoding == []


def test_a_jpeg_without_a_frame_header_is_refused() -> None:
    # given the first bytes of a JPEG, cut before its frame header
    data = _encode(".jpg", np.zeros((64, 64), np.uint8))[:20]

    # when / then
    with pytest.raises(ImageDecodeError, match="header without an image size") as caught:
        decode_image(data, "cut.jpg")
    assert caught.value.code == "decode_failed"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_images_within_the_limit_decode_to_their_size(suffix: str) -> None:
    # given
    image = np.zeros((40, 60), np.uint8)
    image[10:20, 10:30] = 200

    # when
    decoded = decode_image(_encode(suffix, image), f"ok{suffix}", max_pixels=2400)

    # then
    assert decoded.shape == (40, 60) and decoded.dtype == np.uint8
    assert decoded[15, 20] > 150


@pytest.mark.parametrize("kind", ["png", "jpeg", "tiff"])
def test_a_real_bomb_is_refused_at_the_default_limit_without_decoding(
    kind: str, bombs: dict[str, bytes], no_decoding: list[str]
) -> None:
    # given a valid image of 72-100 M pixels compressed into well under a megabyte
    data = bombs[kind]

    # when / then: refused as too large from its header, not a pixel decoded
    with pytest.raises(ImageDecodeError, match="exceeds") as caught:
        decode_image(data, f"bomb.{kind}")
    assert caught.value.code == "too_large"
    assert no_decoding == []
