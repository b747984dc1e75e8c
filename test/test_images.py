"""Input rules (issue #15): 16-bit data by its real bit depth, one decoder with one EXIF-orientation rule for
files and CompressedImage, images of any size. Real repo images, real model, no mocks."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import rtab_frame
from PIL import Image

from pnv_ros.errors import ImageError
from pnv_ros.image_msgs import compressed_to_array, decode_image, image_to_array
from pnv_ros.images import MAX_PIXELS, decode_bytes, load_image, png_significant_bits, to_uint8
from pnv_ros.matching import PatchMatcher

FRAME = 10


def rgb8() -> np.ndarray:
    return np.asarray(Image.open(rtab_frame(FRAME)).convert("RGB"))


def to12(a8: np.ndarray) -> np.ndarray:
    """A 12-bit camera's values for an 8-bit picture (0..4095), in uint16."""
    return np.rint(a8.astype(np.float64) * 4095 / 255).astype(np.uint16)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_sbit(png: bytes, bits: int, channels: int) -> bytes:
    """The PNG with an sBIT chunk right after IHDR (where the specification puts it)."""
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + png_chunk(b"sBIT", bytes([bits] * channels)) + png[ihdr_end:]


def png16(arr: np.ndarray) -> bytes:
    """uint16 grey (H, W) or RGB (H, W, 3) as 16-bit PNG bytes (OpenCV writes 16-bit colour, Pillow cannot)."""
    ok, buf = cv2.imencode(".png", arr if arr.ndim == 2 else np.ascontiguousarray(arr[:, :, ::-1]))
    assert ok
    data = buf.tobytes()
    assert data[24] == 16  # IHDR bit depth: a real 16-bit PNG
    return data


def msg16(arr: np.ndarray, encoding: str, big_endian: bool = False) -> SimpleNamespace:
    """A sensor_msgs/Image-like object: the fields image_to_array reads."""
    h, w = arr.shape[:2]
    ch = 1 if arr.ndim == 2 else arr.shape[2]
    data = arr.astype(">u2" if big_endian else "<u2").tobytes()
    return SimpleNamespace(
        height=h, width=w, encoding=encoding, is_bigendian=int(big_endian), step=w * ch * 2, data=data
    )


def within_one_level(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


# -- 1. 16-bit data by its real bit depth ------------------------------------------------------------------------


def test_12bit_png_files_with_and_without_sbit(tmp_path: Path) -> None:
    a8 = rgb8()
    grey8, g12, c12 = a8[:, :, 1], to12(a8[:, :, 1]), to12(a8)
    assert g12.max() == 4095
    for name, data, want in (
        ("grey12.png", png16(g12), np.dstack([grey8] * 3)),
        ("grey12_sbit.png", with_sbit(png16(g12), 12, 1), np.dstack([grey8] * 3)),
        ("rgb12.png", png16(c12), a8),
        ("rgb12_sbit.png", with_sbit(png16(c12), 12, 3), a8),
    ):
        p = tmp_path / name
        p.write_bytes(data)
        assert png_significant_bits(data) == (12 if "sbit" in name else None)
        within_one_level(np.asarray(load_image(p)), want)  # was 1/16 of the brightness (x / 257)
    # sBIT with values above it: samples scaled up to 16 bits as the PNG specification says -> full range
    scaled = (c12 << 4) | (c12 >> 8)
    p = tmp_path / "rgb12_spec.png"
    p.write_bytes(with_sbit(png16(scaled), 12, 3))
    within_one_level(np.asarray(load_image(p)), a8)
    # an explicit bit depth wins; one the data exceeds is a clear error, never a blank picture
    within_one_level(np.asarray(load_image(tmp_path / "rgb12.png", bit_depth=12)), a8)
    dim = np.asarray(load_image(tmp_path / "rgb12.png", bit_depth=16))
    assert dim.max() == 16  # what the caller asked for: 4095 / 257
    with pytest.raises(ImageError, match=r"rgb12.png: values up to 4095 do not fit the given bit depth 10"):
        load_image(tmp_path / "rgb12.png", bit_depth=10)


def test_12bit_messages_arrays_and_compressed() -> None:
    a8 = rgb8()
    grey8, g12, c12 = a8[:, :, 1], to12(a8[:, :, 1]), to12(a8)
    for enc in ("mono16", "16UC1"):
        for be in (False, True):
            within_one_level(image_to_array(msg16(g12, enc, be)), grey8)
    within_one_level(image_to_array(msg16(c12, "rgb16")), a8)
    within_one_level(decode_image(msg16(np.ascontiguousarray(c12[:, :, ::-1]), "bgr16", True), compressed=False), a8)
    within_one_level(np.asarray(load_image(c12)), a8)
    within_one_level(np.asarray(load_image(g12)), np.dstack([grey8] * 3))
    for data in (png16(c12), with_sbit(png16(c12), 12, 3)):
        within_one_level(compressed_to_array(SimpleNamespace(format="png", data=data)), a8)
    # the rule's other depths: 10 and 14 bit, and the full 16-bit range (x / 257, exactly as before)
    for bits in (10, 14, 16):
        v = np.rint(a8.astype(np.float64) * ((1 << bits) - 1) / 255).astype(np.uint16)
        within_one_level(to_uint8(v), a8)
    np.testing.assert_array_equal(to_uint8(a8.astype(np.uint16) * 257), a8)
    np.testing.assert_array_equal(to_uint8(a8.astype(np.uint16)), a8)  # values within 8 bits: as they are
    np.testing.assert_array_equal(to_uint8(a8.astype(np.int64)), a8)  # any integer array in 0..65535
    with pytest.raises(ImageError, match="do not fit the given bit depth 8"):
        image_to_array(msg16(g12, "mono16"), bit_depth=8)
    with pytest.raises(ImageError, match="not pixel values"):
        to_uint8(np.array([[-1, 3]]))


def test_float_images() -> None:
    a8 = rgb8()
    np.testing.assert_array_equal(np.asarray(load_image(a8.astype(np.float32) / 255)), a8)  # [0, 1]
    np.testing.assert_array_equal(np.asarray(load_image(a8.astype(np.float32))), a8)  # [0, 255]: img.astype(float)
    assert np.asarray(load_image(np.zeros((4, 4), np.float32))).max() == 0  # black is black
    assert np.asarray(load_image(np.ones((4, 4), np.float64))).min() == 255
    with pytest.raises(ImageError, match=r"up to 1.5 fit neither \[0, 1\] nor \[0, 255\]"):
        load_image(np.full((4, 4), 1.5, np.float32))
    with pytest.raises(ImageError, match="up to 300 fit neither"):
        load_image(np.full((4, 4), 300.0, np.float32))
    with pytest.raises(ImageError, match="undo any normalisation"):
        load_image(((a8.astype(np.float32) / 255) - 0.45) / 0.225)  # an ImageNet-normalised tensor


# -- 2. one decoder, one orientation rule -----------------------------------------------------------------------


def exif6_jpeg(path: Path) -> None:
    """Frame stored sideways (turned 90 degrees anticlockwise) with EXIF Orientation 6: viewers show it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(rtab_frame(FRAME)).transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif.tobytes())


def test_exif_orientation_files_and_compressed(tmp_path: Path) -> None:
    a8 = rgb8()
    p = tmp_path / "sideways.jpg"
    exif6_jpeg(p)
    stored = Image.open(p)
    assert stored.size == (384, 512) and stored.getexif()[0x0112] == 6
    for got in (
        np.asarray(load_image(p)),
        np.asarray(decode_bytes(p.read_bytes(), "bytes")),
        compressed_to_array(SimpleNamespace(format="jpeg", data=p.read_bytes())),
        decode_image(SimpleNamespace(format="jpeg", data=list(p.read_bytes())), compressed=True),
        np.asarray(load_image(Image.open(p))),  # a PIL image opened by the caller: the same rule
    ):
        assert got.shape == a8.shape and got.dtype == np.uint8  # upright, as the original
        assert np.abs(got.astype(int) - a8).mean() < 1.5  # same pixels but for one more JPEG pass
    # turned already (exif_transpose drops the tag): not turned twice
    from PIL import ImageOps

    assert np.asarray(load_image(ImageOps.exif_transpose(Image.open(p)))).shape == a8.shape
    # raw buffers carry no EXIF: taken as they are
    side = np.asarray(Image.open(p))
    assert np.asarray(load_image(side)).shape == (512, 384, 3)
    m = SimpleNamespace(height=512, width=384, encoding="rgb8", is_bigendian=0, step=384 * 3, data=side.tobytes())
    assert image_to_array(m).shape == (512, 384, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 108 Mpx: over Pillow's 89 Mpx warning
def test_bad_bytes_are_clear_errors(tmp_path: Path) -> None:
    jpg = rtab_frame(FRAME).read_bytes()
    c12 = to12(rgb8())
    cases = {
        "empty": b"",
        "garbage": b"\xff\xd8\xff\xe0 definitely not a jpeg",
        "head": jpg[:200],
        "half": jpg[: len(jpg) // 2],
        "png16_half": png16(c12)[:5000],  # 16-bit colour: the OpenCV path
        "png16g_half": png16(c12[:, :, 0])[:5000],
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.png"
        p.write_bytes(data)
        with pytest.raises(ImageError, match=rf"{name}.png: cannot decode image"):
            load_image(p)
        with pytest.raises(ImageError, match=rf"compressed image \(jpeg, {len(data)} bytes\).*cannot be decoded"):
            compressed_to_array(SimpleNamespace(format="jpeg", data=data))
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.jpg")

    def header_only_png(w: int, h: int) -> bytes:
        ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        return b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")

    big = header_only_png(12_000, 9_000)
    assert 12_000 * 9_000 > MAX_PIXELS
    with pytest.raises(ImageError, match=f"12000x9000 exceeds {MAX_PIXELS} pixels"):
        compressed_to_array(SimpleNamespace(format="png", data=big))
    with pytest.raises(ImageError, match="decompression bomb"):  # Pillow's own guard, above 2 x 89 Mpx
        decode_bytes(header_only_png(30_000, 30_000), "bomb.png")


# -- end to end with the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_scores_and_small_images_with_the_default_model(default_extractor, tmp_path: Path) -> None:
    a8 = rgb8()
    p12 = tmp_path / "rgb12.png"
    p12.write_bytes(png16(to12(a8)))
    side = tmp_path / "sideways.jpg"
    exif6_jpeg(side)
    small, tiny = a8[::12, ::8].copy(), a8[:1, :1].copy()
    assert small.shape[:2] == (32, 64)
    feats = default_extractor.extract([rtab_frame(FRAME), p12, side, small, tiny])
    pm = PatchMatcher(default_extractor.preset)

    def score(a: int, b: int) -> float:  # as `pnv match-two` scores a pair
        return float(pm.absolute(pm.score(feats[a], [feats[b]]).raw)[0])

    assert score(0, 0) == pytest.approx(1.0)
    assert score(0, 1) > 0.95  # 12-bit PNG vs the 8-bit original: 1.0 measured (0.03-0.04 before: nearly black)
    assert score(0, 2) > 0.9  # EXIF-6 JPEG vs its upright copy: 1.0 measured (0.03 before: seen sideways)
    # 64x32 (Nordland-style) and 1x1 run like a full frame: resized to the preset's input size first
    full = feats[0]
    for f, size in ((feats[3], (64, 32)), (feats[4], (1, 1))):
        assert f.image_size == size and f.global_desc.shape == full.global_desc.shape
        assert [p.shape for p in f.patches] == [p.shape for p in full.patches]
        assert np.isfinite(f.global_desc).all() and all(np.isfinite(p).all() for p in f.patches)


# -- found by trying it out: alpha, spec-shifted dark frames, folder order ------------------------------------------


def test_alpha_does_not_decide_the_bit_depth(tmp_path: Path) -> None:
    """An opaque 16-bit alpha (65535) read the 12-bit colour as 16-bit: the picture came out black (mean 6.7)."""
    a8 = rgb8()
    c12 = to12(a8)
    alpha = np.full(c12.shape[:2] + (1,), 65535, np.uint16)
    rgba = np.concatenate([c12, alpha], axis=2)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]]))
    assert ok
    within_one_level(np.asarray(decode_bytes(buf.tobytes(), "rgba16")), a8)
    within_one_level(np.asarray(load_image(rgba)), a8)  # arrays too
    grey = np.asarray(Image.fromarray(a8).convert("L"))
    la = np.stack([to12(grey), np.full(grey.shape, 65535, np.uint16)], -1)
    within_one_level(np.asarray(load_image(la[:, :, :1]))[:, :, 0], grey)


def test_spec_shifted_dark_frame_with_sbit() -> None:
    """sBIT 12 with samples shifted to 16 bits (the PNG spec's way): a very dark frame stayed within 0..4095
    and was read unshifted, 16x too bright."""
    dark12 = np.minimum(to12(rgb8()[:, :, 0]) // 20, 4095).astype(np.uint16)  # values up to ~205 of 4095
    shifted = (dark12 << 4).astype(np.uint16)
    got = np.asarray(decode_bytes(with_sbit(png16(shifted), 12, 1), "dark"))[:, :, 0]
    want = np.rint(dark12 * 255 / 4095).astype(int)
    assert np.abs(got.astype(int) - want).max() <= 1 and got.mean() < 15


def test_folder_order_is_natural_and_skips_hidden_files(tmp_path: Path) -> None:
    from pnv_ros.images import list_images

    for name in ("frame10.png", "frame2.png", "frame1.png", "frame20.png", "._frame3.png", ".~frame4.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()  # a folder named like an image
    assert [p.name for p in list_images([tmp_path])] == ["frame1.png", "frame2.png", "frame10.png", "frame20.png"]
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("1.png", "01.jpg", "1.JPG", "².jpg", "10.jpg", "2.jpg"):
        (odd / name).write_bytes(b"x")
    order = [p.name for p in list_images([odd])]
    assert order == [p.name for p in list_images([odd])]  # the same every time, whatever the file system lists
    assert order.index("2.jpg") < order.index("10.jpg") and "².jpg" in order
