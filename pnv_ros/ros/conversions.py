"""ROS messages to and from arrays (decoding lives in pnv_ros.image_msgs)."""

from __future__ import annotations

import numpy as np

from pnv_ros.image_msgs import ENCODINGS, compressed_to_array, decode_image, image_to_array

__all__ = [
    "ENCODINGS",
    "array_to_image",
    "compressed_to_array",
    "decode_image",
    "image_to_array",
    "ns_to_stamp",
    "pose_msg",
    "stamp_to_ns",
]


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
