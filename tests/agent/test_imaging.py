"""Image decoding guards: the size is read from the header of every accepted format before decoding."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from lineside.agent.errors import ImageDecodeError
from lineside.agent.imaging import decode_image, header_size, image_format, read_image, to_unit_range


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


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def _jpeg_header(sof: int, width: int = 640, height: int = 480, *, prefix: bytes = b"") -> bytes:
    """SOI, an APP0 and a DHT segment, then a frame header with marker `sof`: a JPEG's head, no pixels."""
    frame = bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    return (
        b"\xff\xd8" + prefix + _segment(0xE0, b"JFIF\0" + bytes(9)) + _segment(0xC4, bytes(20)) + _segment(sof, frame)
    )


@pytest.mark.parametrize("marker", range(0xBE, 0xD0))
def test_every_jpeg_frame_header_kind_gives_the_size_and_tables_do_not(marker: int) -> None:
    # given a JPEG head whose frame marker is one of 0xC0-0xCF
    data = _jpeg_header(marker, 1234, 567)

    # when / then: frame headers (all but DHT, JPG and DAC) carry the size; the others are skipped over
    expected = None if marker in (0xBE, 0xBF, 0xC4, 0xC8, 0xCC) else (1234, 567)
    assert header_size(data) == expected


def test_fill_bytes_and_restart_markers_are_walked_over() -> None:
    # given fill bytes and stand-alone markers (TEM, RST0) before the segments
    data = _jpeg_header(0xC2, 300, 200, prefix=b"\xff\xff\xff\x01\xff\xd0")

    # when / then
    assert header_size(data) == (300, 200)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xd8\x00\x00\x00\x00\x00\x00", "no marker where a segment starts"),
        (b"\xff\xd8\xff\xd9\x00\x00", "end of image before a frame header"),
        (b"\xff\xd8\xff\xda\x00\x08", "scan before a frame header"),
        (b"\xff\xd8\xff\xe0\x00\x01\x00\x00", "a segment length below 2"),
        (b"\xff\xd8\xff\xc0\x00\x11\x08\x01", "a frame header cut short"),
    ],
)
def test_a_jpeg_head_without_a_usable_size_is_none(data: bytes, why: str) -> None:
    assert header_size(data) is None, why


def test_a_jpeg_of_height_zero_is_refused() -> None:
    # given a frame header that leaves the height to a later DNL marker
    data = _jpeg_header(0xC0, 640, 0)

    # when / then
    assert header_size(data) is None
    with pytest.raises(ImageDecodeError, match="header without an image size"):
        decode_image(data + b"\xff\xd9", "dnl.jpg")


@pytest.mark.parametrize("magic", [b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"])
def test_every_tiff_byte_order_and_bigtiff_is_recognised(magic: bytes) -> None:
    assert image_format(magic + bytes(12)) == "tiff"


def test_magic_bytes_decide_the_format() -> None:
    assert image_format(b"\x89PNG\r\n\x1a\n" + bytes(16)) == "png"
    assert image_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert image_format(b"\xff\xd8\xfe\x00") is None  # SOI without a marker after it
    assert image_format(b"\xff\xd9\xff\xe0") is None  # EOI, not SOI
    assert image_format(b"\xff\xff\xff\xff") is None
    assert image_format(b"GIF89a") is None


def test_the_png_size_needs_the_whole_ihdr() -> None:
    # given the first 24 bytes of a real PNG: signature, IHDR length and name, width, height
    head = _encode(".png", np.zeros((37, 53), np.uint8))[:24]

    # when / then: exactly enough to read the size; a byte less, or another first chunk, is not
    assert header_size(head) == (53, 37)
    assert header_size(head[:23]) is None
    assert header_size(head[:12] + b"IDAT" + head[16:]) is None


def test_the_default_limit_is_64_megapixels() -> None:
    # given PNG heads of exactly 8000 x 8000 and of one row more (no pixel data: decoding would fail)
    at_limit = _encode(".png", np.zeros((8, 8), np.uint8))
    for height, code in ((8000, "decode_failed"), (8001, "too_large")):
        head = at_limit[:16] + (8000).to_bytes(4, "big") + height.to_bytes(4, "big") + at_limit[24:]

        # when / then: the size alone decides, before any decoding
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(head, "big.png")
        assert caught.value.code == code, height


def test_an_unknown_format_is_named_by_its_first_bytes() -> None:
    with pytest.raises(ImageDecodeError, match="starts with 47 49 46 38 39 61 00 00"):
        decode_image(b"GIF89a" + bytes(10), "x.gif")


@pytest.mark.parametrize("marker", [0xD9, 0xDA])
def test_the_jpeg_walk_stops_at_end_of_image_or_scan(marker: int) -> None:
    # given an end-of-image or start-of-scan marker (with a length-like field) before a frame header
    data = b"\xff\xd8" + bytes([0xFF, marker, 0x00, 0x02]) + _jpeg_header(0xC0, 640, 480)[2:]

    # when / then: the walk stops there; nothing after it is taken for the image size
    assert header_size(data) is None


def test_empty_jpeg_segments_and_a_frame_header_that_ends_the_data_are_read() -> None:
    # given a zero-length APP1 segment (length field 2) and a head that ends right after the width
    data = b"\xff\xd8\xff\xe1\x00\x02" + _jpeg_header(0xC1, 321, 123)[2:]
    cut = data[: data.index(b"\xff\xc1") + 9]

    # when / then
    assert header_size(data) == (321, 123)
    assert header_size(cut) == (321, 123)
    assert header_size(cut[:-1]) is None


def test_boolean_pixels_are_refused() -> None:
    with pytest.raises(ImageDecodeError) as caught:
        to_unit_range(np.zeros((4, 4), bool))
    assert caught.value.code == "bad_dtype"


def test_the_pixel_limit_is_inclusive() -> None:
    # given a 50 x 40 image: exactly 2000 pixels
    data = _encode(".png", np.zeros((40, 50), np.uint8))

    # when / then: at the limit it decodes, one pixel below it is refused
    assert decode_image(data, "limit.png", max_pixels=2000).shape == (40, 50)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, "limit.png", max_pixels=1999)
    assert caught.value.code == "too_large"


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_the_limit_holds_for_sixteen_bit_images_too(suffix: str) -> None:
    data = _encode(suffix, np.zeros((40, 50), np.uint16))
    assert decode_image(data, "x", max_pixels=2000).dtype == np.uint16
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(data, "x", max_pixels=1999)


def test_an_empty_file_is_refused_as_empty() -> None:
    with pytest.raises(ImageDecodeError, match="0 bytes") as caught:
        decode_image(b"", "empty.png")
    assert caught.value.code == "empty"


def test_a_png_header_without_ihdr_is_refused() -> None:
    with pytest.raises(ImageDecodeError, match="PNG header without an image size") as caught:
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(8), "short.png")
    assert caught.value.code == "decode_failed"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_truncated_image_is_refused_as_undecodable(suffix: str) -> None:
    rng = np.random.default_rng(0)
    whole = _encode(suffix, rng.integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(whole[: len(whole) // 3], f"cut{suffix}")
    assert caught.value.code == "decode_failed"


def test_a_corrupt_tiff_is_refused_naming_it() -> None:
    with pytest.raises(ImageDecodeError, match=r"bad\.tif: not a readable TIFF") as caught:
        decode_image(b"II*\x00" + b"\xff" * 40, "bad.tif")
    assert caught.value.code == "decode_failed"


def test_a_grey_image_saved_as_colour_is_accepted_as_grey() -> None:
    # given grey pixels stored as BGR and as BGRA
    grey = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    for image in (np.dstack([grey] * 3), np.dstack([grey] * 3 + [np.full_like(grey, 255)])):
        # when / then
        decoded = decode_image(_encode(".png", image), "grey-rgb.png")
        assert decoded.ndim == 2 and np.array_equal(decoded, grey)


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_a_real_colour_image_is_refused(channel: int) -> None:
    # given an image one of whose channels differs from the other two
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., channel] = 90
    with pytest.raises(ImageDecodeError, match="3 distinct colour channels") as caught:
        decode_image(_encode(".png", image), "colour.png")
    assert caught.value.code == "bad_channels"


def test_a_two_channel_tiff_is_refused() -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((32, 32, 2), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageDecodeError, match="expected 1 channel, found 2") as caught:
        decode_image(buffer.getvalue(), "two.tif")
    assert caught.value.code == "bad_channels"


def test_floating_point_pixels_are_refused() -> None:
    with pytest.raises(ImageDecodeError, match="expected 8- or 16-bit pixels, found float32") as caught:
        decode_image(_encode(".tif", np.zeros((32, 32), np.float32)), "float.tif")
    assert caught.value.code == "bad_dtype"


def test_images_smaller_than_eight_pixels_are_refused() -> None:
    assert decode_image(_encode(".png", np.zeros((8, 8), np.uint8)), "8.png").shape == (8, 8)
    for shape in ((7, 8), (8, 7)):
        with pytest.raises(ImageDecodeError, match="too small") as caught:
            decode_image(_encode(".png", np.zeros(shape, np.uint8)), "7.png")
        assert caught.value.code == "too_small"


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"absent\.png: cannot read file") as caught:
        read_image(tmp_path / "absent.png")
    assert caught.value.code == "unreadable"


def test_unit_range_scales_by_the_stored_bits() -> None:
    # given 8-bit, 16-bit and 12-bit-in-16 pixels
    assert to_unit_range(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
    assert to_unit_range(np.array([[0, 65535]], np.uint16)).tolist() == [[0.0, 1.0]]
    twelve = to_unit_range(np.array([[0, 2048, 4095, 5000]], np.uint16), bits_stored=12)
    # then values above the stored range saturate instead of passing 1
    assert twelve[0, 0] == 0.0 and twelve[0, 1] == pytest.approx(2048 / 4095) and twelve[0, 2:].tolist() == [1.0, 1.0]
    with pytest.raises(ImageDecodeError) as caught:
        to_unit_range(np.zeros((2, 2), np.float32))
    assert caught.value.code == "bad_dtype"
