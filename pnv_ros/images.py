"""Image input: paths, arrays or PIL images in any common mode, to RGB PIL.

Arrays are taken as RGB (or grey / RGBA); a caller holding BGR (OpenCV, ROS
``bgr8``) reverses the channels first. 16-bit data is scaled to 8 bits by
its full range (x / 257), floats are taken as [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from pnv_ros.errors import ImageError

ImageSource = Union[str, Path, np.ndarray, Image.Image]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp")

#: Refuse absurd inputs before they exhaust memory (a 1 Gpx frame is no camera).
MAX_PIXELS = 100_000_000


def _array_to_rgb(arr: np.ndarray, what: str) -> Image.Image:
    if arr.size == 0 or arr.ndim not in (2, 3) or min(arr.shape[:2]) == 0:
        raise ImageError(f"{what}: array of shape {arr.shape} is not an image (need H x W [x 1|3|4], non-empty)")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{what}: {arr.shape[2]} channels; need 1 (grey), 3 (RGB) or 4 (RGBA)")
    if arr.dtype == np.uint8:
        a8 = arr
    elif arr.dtype == np.uint16:
        a8 = (arr.astype(np.uint32) // 257).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{what}: float image holds NaN or infinite values")
        a8 = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype == bool:
        a8 = arr.astype(np.uint8) * 255
    else:
        raise ImageError(f"{what}: pixel type {arr.dtype} is not supported (use uint8, uint16 or float)")
    if a8.ndim == 3 and a8.shape[2] == 1:
        a8 = a8[:, :, 0]
    if a8.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a8), mode="L").convert("RGB")
    if a8.shape[2] == 4:
        return Image.fromarray(np.ascontiguousarray(a8[:, :, :3]), mode="RGB")
    return Image.fromarray(np.ascontiguousarray(a8), mode="RGB")


def _pil_to_rgb(img: Image.Image, what: str) -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{what}: image has zero size")
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(img).astype(np.uint16 if img.mode != "F" else np.float32), what)
    return img.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """Any supported source to an RGB PIL image, or ImageError saying why not."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        what = str(path)
        if not path.is_file():
            raise ImageError(f"{what}: no such file")
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"{what}: {im.width}x{im.height} exceeds {MAX_PIXELS} pixels")
                im.load()
                return _pil_to_rgb(im, what).copy() if im.mode == "RGB" else _pil_to_rgb(im, what)
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{what}: cannot decode image ({e})") from None
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, "image")
    if isinstance(source, np.ndarray):
        if source.size > 4 * MAX_PIXELS:
            raise ImageError(f"array of shape {source.shape} is too large")
        return _array_to_rgb(source, "array")
    raise ImageError(f"unsupported image source of type {type(source).__name__}: give a path, array or PIL image")


def _numeric_key(p: Path) -> tuple[int, int | str]:
    """Sort '2.jpg' before '10.jpg' (frame numbers), else by name."""
    return (0, int(p.stem)) if p.stem.isdigit() else (1, p.name)


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into image paths, folders in numeric-aware order."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=_numeric_key)
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
