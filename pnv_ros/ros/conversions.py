"""ROS messages to and from arrays. Uses cv_bridge where it works, else the
few lines below (cv_bridge is not installable here; rosbags-image is the
documented substitute, but plain numpy covers the encodings we accept)."""

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


def array_to_image(arr: np.ndarray, header=None):  # type: ignore[no-untyped-def]
    """RGB uint8 array (H, W, 3) to sensor_msgs/Image rgb8."""
    from sensor_msgs.msg import Image

    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = "rgb8"
    msg.step = int(arr.shape[1] * 3)
    msg.data = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    return msg


def stamp_to_ns(stamp) -> int:  # type: ignore[no-untyped-def]
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int):  # type: ignore[no-untyped-def]
    from builtin_interfaces.msg import Time

    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def pose_msg(rt, covariance_translation: float = 1e6, covariance_rotation: float = 0.01):  # type: ignore[no-untyped-def]
    """(R, unit t) to geometry_msgs/PoseWithCovariance; scale unknown -> large translation covariance."""
    from geometry_msgs.msg import PoseWithCovariance
    from scipy.spatial.transform import Rotation

    p = PoseWithCovariance()
    r, t = rt
    q = Rotation.from_matrix(r).as_quat()  # x y z w
    p.pose.position.x, p.pose.position.y, p.pose.position.z = (float(v) for v in t)
    p.pose.orientation.x, p.pose.orientation.y, p.pose.orientation.z, p.pose.orientation.w = (float(v) for v in q)
    cov = np.zeros((6, 6))
    cov[:3, :3] = np.eye(3) * covariance_translation
    cov[3:, 3:] = np.eye(3) * covariance_rotation
    p.covariance = cov.ravel().tolist()
    return p
