"""Image messages (sensor_msgs/Image, CompressedImage) to arrays, without ROS.

Works on any object with the messages' fields: rclpy messages in the node,
rosbags messages in the bag reader. (cv_bridge is used by the node where it
works; these few lines cover the encodings accepted here.)
"""

from __future__ import annotations

import numpy as np

from pnv_ros.errors import ImageError
from pnv_ros.images import MAX_PIXELS

# encoding -> (channels, dtype, is_bgr)
ENCODINGS = {
    "rgb8": (3, np.uint8, False), "bgr8": (3, np.uint8, True), "rgba8": (4, np.uint8, False),
    "bgra8": (4, np.uint8, True), "mono8": (1, np.uint8, False), "8uc1": (1, np.uint8, False),
    "8uc3": (3, np.uint8, True), "mono16": (1, np.uint16, False), "16uc1": (1, np.uint16, False),
    "rgb16": (3, np.uint16, False), "bgr16": (3, np.uint16, True),
}  # fmt: skip


def image_to_array(msg) -> np.ndarray:  # type: ignore[no-untyped-def]
    """sensor_msgs/Image to an RGB (or grey) array; ImageError says what is wrong."""
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
    data = bytes(msg.data) if not isinstance(msg.data, (bytes, bytearray)) else msg.data
    if len(data) < h * step:
        raise ImageError(f"image data has {len(data)} bytes, height x step needs {h * step}")
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    rows = np.frombuffer(data, dtype=np.uint8, count=h * step).reshape(h, step)[:, : w * ch * item]
    arr = rows.copy().view(dt).reshape(h, w, ch).astype(dtype)
    if bgr:
        arr = arr[:, :, [2, 1, 0] + ([3] if ch == 4 else [])]
    return arr[:, :, 0] if ch == 1 else arr


def compressed_to_array(msg) -> np.ndarray:  # type: ignore[no-untyped-def]
    """sensor_msgs/CompressedImage (jpeg/png) to RGB."""
    import cv2

    buf = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if buf.size == 0:
        raise ImageError("compressed image is empty")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ImageError(f"compressed image ({msg.format or 'unknown format'}, {buf.size} bytes) cannot be decoded")
    return img[:, :, ::-1].copy()


def decode_image(msg, compressed: bool) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Either kind of image message to RGB (or grey) uint8/uint16."""
    return compressed_to_array(msg) if compressed else image_to_array(msg)
