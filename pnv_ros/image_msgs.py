"""Image messages (sensor_msgs/Image, CompressedImage) to uint8 arrays, without ROS.

Works on any object with the messages' fields: rclpy messages in the node,
rosbags messages in the bag reader. (cv_bridge is used by the node where it
works; these few lines cover the encodings accepted here.)

The rules are :mod:`pnv_ros.images`' own, so a frame gives the same pixels
from a file, a raw message or a compressed one: ``mono16`` / ``16UC1`` /
``rgb16`` / ``bgr16`` data goes to 8 bits by its real bit depth
(:func:`pnv_ros.images.to_uint8`: the ``bit_depth`` given, else the smallest of
8/10/12/14/16 bits holding the largest value), and CompressedImage bytes are
decoded by :func:`pnv_ros.images.decode_bytes` (EXIF orientation applied, a
16-bit PNG's sBIT chunk counts). Raw buffers carry no EXIF: taken as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pnv_ros.errors import ImageError
from pnv_ros.images import MAX_PIXELS, decode_bytes, to_uint8

# encoding -> (channels, dtype, is_bgr)
ENCODINGS = {
    "rgb8": (3, np.uint8, False),
    "bgr8": (3, np.uint8, True),
    "rgba8": (4, np.uint8, False),
    "bgra8": (4, np.uint8, True),
    "mono8": (1, np.uint8, False),
    "8uc1": (1, np.uint8, False),
    "8uc3": (3, np.uint8, True),
    "mono16": (1, np.uint16, False),
    "16uc1": (1, np.uint16, False),
    "rgb16": (3, np.uint16, False),
    "bgr16": (3, np.uint16, True),
}


def image_to_array(msg, *, bit_depth: int | None = None) -> np.ndarray:
    """sensor_msgs/Image to a uint8 RGB (grey, RGBA) array; ImageError says what is wrong.

    16-bit encodings follow the bit-depth rule; ``bit_depth`` states the camera's (e.g. 12).
    """
    enc = (msg.encoding or "").lower()
    if enc not in ENCODINGS:
        raise ImageError(f"unsupported image encoding {msg.encoding!r}: use one of {', '.join(sorted(ENCODINGS))}")
    ch, dtype, bgr = ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h == 0 or w == 0:
        raise ImageError(f"image has zero size ({w}x{h})")
    if h * w > MAX_PIXELS:
        raise ImageError(f"image of {w}x{h} exceeds {MAX_PIXELS} pixels")
    item = np.dtype(dtype).itemsize
    if step < w * ch * item:
        raise ImageError(f"step {step} is smaller than width x channels x bytes = {w * ch * item}")
    try:  # the message's own buffer (rclpy: array.array; rosbags: ndarray), not a copy of it
        data = np.frombuffer(msg.data, dtype=np.uint8)
    except (TypeError, ValueError):  # a list of ints, a non-contiguous array
        data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if len(data) < h * step:
        raise ImageError(f"image data has {len(data)} bytes, height x step needs {h * step}")
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    rows = data[: h * step].reshape(h, step)[:, : w * ch * item]
    pix = np.ascontiguousarray(rows).view(dt).reshape(h, w, ch)  # a view of the message when rows are unpadded
    # one copy, which owns its pixels (the message may go): reordered for BGR, converted for the other byte order
    arr = pix[:, :, [2, 1, 0] + ([3] if ch == 4 else [])] if bgr else pix.copy()
    arr = arr.astype(dtype, copy=False)
    arr = to_uint8(arr, f"{msg.encoding} image", bit_depth=bit_depth)
    return arr[:, :, 0] if ch == 1 else arr


def compressed_to_array(msg, *, bit_depth: int | None = None) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG, PNG, any format Pillow reads) to uint8 RGB.

    The same decoder as image files (:func:`pnv_ros.images.decode_bytes`): EXIF orientation applied, 16-bit PNG
    by the bit-depth rule; empty or undecodable bytes are an ImageError naming the format and size.
    """
    data = bytes(msg.data)
    what = f"compressed image ({msg.format or 'unknown format'}, {len(data)} bytes)"
    return np.array(decode_bytes(data, what, bit_depth=bit_depth))


def decode_image(msg, compressed: bool, *, bit_depth: int | None = None) -> np.ndarray:
    """Either kind of image message to a uint8 RGB (or grey / RGBA) array."""
    return compressed_to_array(msg, bit_depth=bit_depth) if compressed else image_to_array(msg, bit_depth=bit_depth)


#: depth encodings taken (REP 118: 16UC1 millimetres, 32FC1 metres; mono16 is read as 16UC1) -> their dtype
DEPTH_ENCODINGS = {"16UC1": np.uint16, "mono16": np.uint16, "32FC1": np.float32}


def depth_to_array(msg: Any) -> tuple[np.ndarray, str]:
    """(the (H, W) array as its encoding stores it, the encoding) of a sensor_msgs/Image depth message (an rclpy
    message or a rosbags one: only its fields are read).

    Raises:
        ImageError: an encoding not in :data:`DEPTH_ENCODINGS`, or a buffer that does not fit height, width and
            step.
    """
    enc = str(msg.encoding)
    if enc not in DEPTH_ENCODINGS:
        raise ImageError(f"depth encoding {enc!r} is not 16UC1 (millimetres) or 32FC1 (metres)")
    dtype = np.dtype(DEPTH_ENCODINGS[enc]).newbyteorder(">" if msg.is_bigendian else "<")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = msg.data if isinstance(msg.data, (bytes, bytearray, memoryview)) else np.asarray(msg.data, np.uint8)
    size = data.size if isinstance(data, np.ndarray) else len(data)
    if h <= 0 or w <= 0 or step < w * dtype.itemsize or size < step * h:
        raise ImageError(f"malformed depth image: {w} x {h}, step {step}, {size} bytes")
    rows = np.frombuffer(data, np.uint8, count=step * h).reshape(h, step)[:, : w * dtype.itemsize]
    return rows.copy().view(dtype).reshape(h, w).astype(dtype.newbyteorder("="), copy=False), enc
