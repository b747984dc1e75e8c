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
    "relative_pose_msg",
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


def relative_pose_msg(rp, parent_frame: str, child_frame: str):  # type: ignore[no-untyped-def]
    """A :class:`pnv_ros.geometry.RelativePose` (or None) to pnv_ros/RelativePose."""
    from scipy.spatial.transform import Rotation

    from pnv_ros.msg import RelativePose

    m = RelativePose(parent_frame_id=parent_frame, child_frame_id=child_frame)
    m.rotation.w = 1.0
    if rp is None:
        m.type = RelativePose.NONE
        return m
    m.type = RelativePose.ROTATION_AND_DIRECTION
    m.rotation.x, m.rotation.y, m.rotation.z, m.rotation.w = (
        float(v) for v in Rotation.from_matrix(rp.rotation).as_quat()
    )
    m.direction.x, m.direction.y, m.direction.z = (float(v) for v in rp.direction)
    m.rotation_covariance = np.asarray(rp.rotation_covariance, np.float64).ravel().tolist()
    m.direction_covariance = np.asarray(rp.direction_covariance, np.float64).ravel().tolist()
    m.covariance = np.asarray(rp.covariance, np.float64).ravel().tolist()
    m.inliers, m.rms_error_px = int(rp.inliers), float(rp.rms_error_px)
    return m
