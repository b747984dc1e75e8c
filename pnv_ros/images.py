"""Image input: paths, encoded bytes, arrays or PIL images in any common mode, to RGB PIL.

One decoder for encoded pictures, one converter for pixel values; every input
path (``pnv`` commands, bag readers, the ROS node) goes through them:

* **Encoded pictures** (files, ``sensor_msgs/CompressedImage`` bytes) are
  decoded by :func:`decode_bytes` (Pillow; OpenCV only for 16-bit colour PNG
  and TIFF, whose low bytes Pillow drops). The **EXIF orientation is applied**
  (Pillow's ``ImageOps.exif_transpose`` table), so a picture is seen as image
  viewers show it. Raw pixel buffers (numpy arrays, ``sensor_msgs/Image``)
  carry no EXIF and are taken as they are; an in-memory PIL image keeps its
  EXIF and gets the same rule (``exif_transpose`` removes the tag, so an image
  already turned is not turned twice).
* **Pixel values** go to 8 bits by :func:`to_uint8`. 8-bit data is taken as it
  is. 16-bit data (and other integer arrays with values in 0..65535) is scaled
  by its real range, ``round(v * 255 / (2**b - 1))``, where the bit depth ``b``
  is, in this order: the ``bit_depth`` the caller gives; the PNG's ``sBIT``
  chunk (significant bits), when the values fit it (larger values mean the
  samples were scaled up to 16 bits, as the PNG specification prescribes, and
  the full range is used); else the smallest of 8, 10, 12, 14 and 16 bits that
  holds the largest value present (the sensor depths of machine-vision and
  robot cameras). A 12-bit camera frame stored in a 16-bit container (values up
  to 4095) thus keeps its brightness instead of coming out nearly black; the
  inferred depth is per image, so a stream whose frames may all be dark should
  pass ``bit_depth``. Float images are taken as [0, 1] when no value exceeds
  1.0, and as [0, 255] (an 8-bit image cast to float) when the largest value is
  from 2 to 255; a maximum between 1 and 2, above 255, or values below -1 (a
  normalised tensor, not an image) are an ImageError rather than a silently
  blank or white picture.

Arrays are taken as RGB (or grey / RGBA); a caller holding BGR (OpenCV, ROS
``bgr8``) reverses the channels first. Alpha is dropped, not composited.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from pnv_ros.errors import ImageError

ImageSource = Union[str, Path, np.ndarray, Image.Image]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp")

#: Refuse absurd inputs before they exhaust memory (a 1 Gpx frame is no camera).
MAX_PIXELS = 100_000_000

#: Bit depths inferred for integer data without a stated depth: the ADC depths of machine-vision and robot
#: cameras (8, 10, 12 and 14 bit sensors, e.g. Sony Pregius / STARVIS) and the full 16-bit range.
INFERRED_BIT_DEPTHS = (8, 10, 12, 14, 16)

#: Pillow's ``ImageOps.exif_transpose`` table: EXIF Orientation (tag 0x0112) -> the transpose that shows the
#: picture as viewers do. 1 (or no tag) is upright.
EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pillow warns where this package already decides: pictures between its 89 Mpx warning and MAX_PIXELS are
# accepted here, and a corrupt EXIF block shows the picture as stored (as viewers do). Only these two are quieted.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# What Pillow raises on bytes that are not a readable picture (truncated, garbage, bombs).
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)


def _bit_depth(hi: int, what: str, bit_depth: int | None, significant_bits: int | None) -> int:
    """The bit depth 16-bit data is scaled by (see the module docstring for the rule)."""
    if bit_depth is not None:
        if isinstance(bit_depth, bool) or not isinstance(bit_depth, (int, np.integer)) or not 1 <= bit_depth <= 16:
            raise ImageError(f"{what}: bit_depth {bit_depth!r} is not a bit depth (give an integer from 1 to 16)")
        if hi > (1 << int(bit_depth)) - 1:
            raise ImageError(
                f"{what}: values up to {hi} do not fit the given bit depth {bit_depth} "
                f"(at most {(1 << int(bit_depth)) - 1}); give the camera's real bit depth, or none to infer it"
            )
        return int(bit_depth)
    if significant_bits is not None and 1 <= significant_bits <= 16:
        # Values within sBIT: the sensor's own values (how cameras write them). Larger: scaled to 16 bits (PNG spec).
        return significant_bits if hi <= (1 << significant_bits) - 1 else 16
    return next(b for b in INFERRED_BIT_DEPTHS if hi <= (1 << b) - 1)


def to_uint8(
    arr: np.ndarray,
    what: str = "array",
    *,
    bit_depth: int | None = None,
    significant_bits: int | None = None,
) -> np.ndarray:
    """Pixel values of any supported type to uint8, same shape: the one bit-depth rule of this package.

    uint8 is returned as it is; integer data (uint16 and any integer array with values in 0..65535) is scaled by
    its bit depth: ``bit_depth`` when given, else ``significant_bits`` (a PNG's sBIT) when the values fit it, else
    the smallest of :data:`INFERRED_BIT_DEPTHS` holding the maximum; floats are [0, 1] or [0, 255]; bool is
    0 / 255. ImageError says why an array cannot be an image.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 0xFFFF:
            raise ImageError(
                f"{what}: {arr.dtype} values from {lo} to {hi} are not pixel values (need 0..65535: 8 to 16 bits)"
            )
        b = _bit_depth(hi, what, bit_depth, significant_bits)
        if bit_depth is None and significant_bits is not None and b == significant_bits < 16 and hi > 0:
            # A PNG writer that follows the spec shifts sBIT-bit samples up to 16 bits: a very dark frame then
            # stays within the sBIT range, but every value is a multiple of 2**(16 - sBIT). Read it as shifted.
            if not (arr.astype(np.uint32) & ((1 << (16 - b)) - 1)).any():
                b = 16
        top = (1 << b) - 1
        # round(v * 255 / top), half up, exactly in integers (v * 510 < 2**25 fits uint32).
        return ((arr.astype(np.uint32) * 510 + top) // (2 * top)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{what}: float image holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1.0:
            raise ImageError(
                f"{what}: float values down to {lo:.3g} are not pixel values; floats are taken as [0, 1] or "
                "[0, 255] (undo any normalisation first)"
            )
        if hi <= 1.0:
            scale = 255.0
        elif 2.0 <= hi <= 255.0:
            scale = 1.0
        else:
            raise ImageError(
                f"{what}: float values up to {hi:.6g} fit neither [0, 1] nor [0, 255] (the two float "
                "conventions taken); rescale to one of them or give uint8 / uint16"
            )
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    raise ImageError(f"{what}: pixel type {arr.dtype} is not supported (use uint8, uint16 or float)")


def _array_to_rgb(
    arr: np.ndarray, what: str, *, bit_depth: int | None = None, significant_bits: int | None = None
) -> Image.Image:
    if arr.size == 0 or arr.ndim not in (2, 3) or min(arr.shape[:2]) == 0:
        raise ImageError(f"{what}: array of shape {arr.shape} is not an image (need H x W [x 1|3|4], non-empty)")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{what}: {arr.shape[2]} channels; need 1 (grey), 3 (RGB) or 4 (RGBA)")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha is dropped before the bit depth is read: an opaque 65535 is no pixel value
    a8 = to_uint8(arr, what, bit_depth=bit_depth, significant_bits=significant_bits)
    if a8.ndim == 3 and a8.shape[2] == 1:
        a8 = a8[:, :, 0]
    if a8.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a8), mode="L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(a8[:, :, :3]), mode="RGB")


def _transpose_of(img: Image.Image) -> Image.Transpose | None:
    """The transpose its EXIF orientation asks for (None: upright, no tag, or unreadable EXIF, as viewers do)."""
    try:
        return _TRANSPOSE.get(int(img.getexif().get(EXIF_ORIENTATION, 1)))
    except Exception:  # noqa: BLE001 - a malformed EXIF block shows the picture as stored, as viewers do
        return None


def _pil_to_rgb(
    img: Image.Image, what: str, *, bit_depth: int | None = None, significant_bits: int | None = None
) -> Image.Image:
    """A loaded PIL image to RGB by the bit-depth rule (its EXIF orientation is the caller's business)."""
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{what}: image has zero size")
    if img.mode == "RGB":
        return img
    if img.mode in _GREY16_MODES or img.mode in ("I", "F"):
        arr = np.asarray(img)
        arr = arr.astype(np.float32 if img.mode == "F" else arr.dtype.newbyteorder("="))
        return _array_to_rgb(arr, what, bit_depth=bit_depth, significant_bits=significant_bits)
    return img.convert("RGB")


def png_significant_bits(data: bytes) -> int | None:
    """The significant bits a PNG's ``sBIT`` chunk states for its colour channels, or None.

    A tiny reader of the chunks before the first IDAT (where sBIT must stand; PNG specification, section 11.3.3.4)
    over the file's bytes: Pillow does not expose sBIT. Alpha's entry is ignored.
    """
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 33:
        return None
    colour_type = data[25]  # IHDR is first: length 4, "IHDR" 4, width 4, height 4, bit depth 1, colour type 1
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if ctype in (b"IDAT", b"IEND") or pos + 12 + length > len(data):
            return None
        if ctype == b"sBIT":
            body = data[pos + 8 : pos + 8 + length]
            n = {0: 1, 4: 1, 2: 3, 3: 3, 6: 3}.get(colour_type, 0)  # grey, grey+alpha, RGB, palette, RGBA
            if n == 0 or len(body) < n:
                return None
            bits = max(body[:n])
            return bits if 1 <= bits <= 16 else None
        pos += 12 + length
    return None


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw mode ('RGB;16B' for a 16-bit colour PNG), '' when unknown."""
    try:
        args = img.tile[0].args if img.tile else None
    except (AttributeError, IndexError):
        return ""
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else ""


def _undecodable(what: str, reason: str) -> ImageError:
    """The one wording of undecodable data, for files and messages alike."""
    reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", reason)
    return ImageError(
        f"{what}: cannot decode image ({reason}); the data cannot be decoded as JPEG, PNG or another format "
        "Pillow reads"
    )


def _decode_16bit_colour(data: bytes, what: str) -> np.ndarray:
    """16-bit colour PNG / TIFF to uint16 RGB(A): Pillow keeps only the high bytes of these, OpenCV all."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)  # UNCHANGED: no EXIF turn
    if arr is None:
        raise _undecodable(what, "16-bit colour data is truncated or corrupt")
    if arr.ndim == 3 and arr.shape[2] == 2:  # grey + alpha
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, [2, 1, 0] + ([3] if arr.shape[2] == 4 else [])]  # OpenCV's BGR(A) to RGB(A)
    return arr


def decode_bytes(data: bytes, what: str = "image data", *, bit_depth: int | None = None) -> Image.Image:
    """Encoded picture bytes (JPEG, PNG, any format Pillow reads) to an RGB PIL image: the one decoder.

    The EXIF orientation is applied, 16-bit data follows the bit-depth rule (the PNG's sBIT chunk counts), and
    empty, truncated or garbage bytes, pictures over :data:`MAX_PIXELS` and decompression bombs are an
    ImageError naming ``what``.
    """
    if not data:
        raise _undecodable(what, "empty: 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{what}: {im.width}x{im.height} exceeds {MAX_PIXELS} pixels")
            sbit = png_significant_bits(data)
            if _rawmode(im).endswith((";16B", ";16L", ";16N")) and im.mode not in _GREY16_MODES:
                rgb = _array_to_rgb(_decode_16bit_colour(data, what), what, bit_depth=bit_depth, significant_bits=sbit)
            else:
                im.load()
                rgb = _pil_to_rgb(im, what, bit_depth=bit_depth, significant_bits=sbit)
                if rgb is im:
                    rgb = im.copy()
            method = _transpose_of(im)
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise _undecodable(what, str(e)) from None
    return rgb.transpose(method) if method is not None else rgb


def load_image(source: ImageSource, *, bit_depth: int | None = None) -> Image.Image:
    """Any supported source to an RGB PIL image, or ImageError saying why not.

    Files go through :func:`decode_bytes` (EXIF orientation applied); arrays are taken as they are. ``bit_depth``
    states the bit depth of 16-bit data (else the sBIT chunk or the data's maximum decides; see the module).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        what = str(path)
        if not path.is_file():
            raise ImageError(f"{what}: no such file")
        # No picture of MAX_PIXELS pixels, 4 channels of 16 bits uncompressed, is larger: refuse before reading.
        if path.stat().st_size > 8 * MAX_PIXELS:
            raise ImageError(f"{what}: {path.stat().st_size} bytes is too large for an image of {MAX_PIXELS} pixels")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"{what}: cannot read file ({e})") from None
        return decode_bytes(data, what, bit_depth=bit_depth)
    if isinstance(source, Image.Image):
        if source.width * source.height > MAX_PIXELS:
            raise ImageError(f"image: {source.width}x{source.height} exceeds {MAX_PIXELS} pixels")
        rgb = _pil_to_rgb(source, "image", bit_depth=bit_depth)
        method = _transpose_of(source)
        return rgb.transpose(method) if method is not None else rgb
    if isinstance(source, np.ndarray):
        if source.size > 4 * MAX_PIXELS:
            raise ImageError(f"array of shape {source.shape} is too large")
        return _array_to_rgb(source, "array", bit_depth=bit_depth)
    raise ImageError(f"unsupported image source of type {type(source).__name__}: give a path, array or PIL image")


def _natural_key(p: Path) -> tuple:
    """Frame order: digit runs compare as numbers ('frame2' before 'frame10', '2.jpg' before '10.jpg'),
    the rest case-insensitively; ties ('1.jpg', '01.jpg', '1.png') by the exact name, never by listing order."""
    parts = tuple((0, int(t), "") if t.isdecimal() else (1, 0, t.lower()) for t in re.split(r"(\d+)", p.stem) if t)
    return parts, p.suffix.lower(), p.name


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into image paths, each folder's images in natural (frame) order.

    A folder contributes its files with an image suffix (any case), hidden files excepted (``.*``: macOS's
    ``._name.jpg`` resource forks, editors' temp files); sub-folders are not entered. ImageError for a
    folder without images, a path that does not exist, or a folder given where an image is expected.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                (
                    f
                    for f in p.iterdir()
                    if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()
                ),
                key=_natural_key,
            )
            if not found:
                raise ImageError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ImageError(f"{p}: no such file or folder")
    if not out:
        raise ImageError("no images given")
    return out


def image_identities(paths: Sequence[str | Path]) -> list[str]:
    """Unique names of image files: each path relative to the deepest folder holding them all,
    POSIX separators, suffix kept.

    ``pnv extract images/`` names ``1.jpg, 2.jpg, ...``; ``pnv extract ref/ query/`` names
    ``ref/1.jpg, query/1.jpg, ...``, so files that share a name in different folders stay apart
    and results say which one was retrieved. The same file given twice is an ImageError.
    """
    import os

    absolute = [os.path.abspath(p) for p in paths]
    if not absolute:
        return []
    base = os.path.commonpath([os.path.dirname(a) for a in absolute])
    names = [Path(os.path.relpath(a, base)).as_posix() for a in absolute]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise ImageError(f"{paths[i]} is given twice (as {paths[seen[n]]} too): each image once")
        seen[n] = i
    return names
