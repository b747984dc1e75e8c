"""ROS messages to and from arrays (decoding lives in pnv_ros.image_msgs)."""

from __future__ import annotations

from functools import cache

import numpy as np

from pnv_ros.errors import ImageError
from pnv_ros.image_msgs import ENCODINGS, compressed_to_array, decode_image, image_to_array

__all__ = [
    "ENCODINGS",
    "array_to_image",
    "compressed_to_array",
    "decode_image",
    "frame_to_array",
    "image_to_array",
    "keyframe_msg",
    "loop_closure_msg",
    "ns_to_stamp",
    "relative_pose_msg",
    "stamp_to_ns",
]


def array_to_image(arr: np.ndarray, header=None):
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


def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int):
    from builtin_interfaces.msg import Time

    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def loop_closure_msg(lc, header):
    """A :class:`pnv_ros.detector.LoopClosure` to pnv_ros/LoopClosure with the query frame's header (whose frame
    is the relative pose's, both ways)."""
    from pnv_ros.msg import LoopClosure

    frame = header.frame_id
    return LoopClosure(
        header=header,
        query_id=lc.query_id,
        match_id=lc.match_id,
        method=lc.method,
        query_stamp=ns_to_stamp(lc.query_stamp_ns),
        match_stamp=ns_to_stamp(lc.match_stamp_ns),
        match_from_loaded_map=lc.match_from_loaded_map,
        match_from_fleet=lc.match_from_fleet,
        match_robot_id=lc.match_robot_id,
        match_session=lc.match_session,
        match_seq=max(lc.match_seq, 0),
        match_fleet_id=lc.match_fleet_id,
        score=float(lc.score),
        global_distance=float(lc.global_distance),
        patch_size=lc.patch_size,
        num_matches=lc.num_matches,
        num_inliers=lc.num_inliers,
        relative_pose=relative_pose_msg(lc.relative_pose, frame, frame),
    )


def fill_candidates(resp, cands) -> None:
    """QueryPlace's response from re-ranked :class:`pnv_ros.detector.Candidate` s (best first): ids (0 for a fleet
    candidate), stamps, scores, distances and each one's fleet origin."""
    resp.ids = [max(c.id, 0) for c in cands]
    resp.stamps = [ns_to_stamp(c.stamp_ns) for c in cands]
    resp.scores = [float(c.score) for c in cands]
    resp.global_distances = [float(c.global_distance) for c in cands]
    resp.from_fleet = [c.from_fleet for c in cands]
    resp.robot_ids, resp.sessions = [c.robot_id for c in cands], [c.session for c in cands]
    resp.seqs, resp.fleet_ids = [max(c.seq, 0) for c in cands], [c.fleet_id for c in cands]
    resp.message = f"{len(cands)} candidates"


def keyframe_msg(header, kf_id: int, map_keyframes: int, odom=None):
    """pnv_ros/Keyframe with the image's header and, when ``odom`` (a
    :class:`pnv_ros.ros.odometry.OdometrySample`) is given, the odometry pose paired with it (has_odometry)."""
    from pnv_ros.msg import Keyframe

    msg = Keyframe(header=header, id=int(kf_id), map_keyframes=int(map_keyframes))
    if odom is not None:
        msg.has_odometry, msg.odometry_child_frame_id = True, odom.child_frame_id
        msg.odometry.header.stamp, msg.odometry.header.frame_id = ns_to_stamp(odom.stamp_ns), odom.frame_id
        p, q = msg.odometry.pose.pose.position, msg.odometry.pose.pose.orientation
        p.x, p.y, p.z = (float(v) for v in odom.position)
        q.x, q.y, q.z, q.w = (float(v) for v in odom.orientation)
        msg.odometry.pose.covariance = np.asarray(odom.covariance, np.float64).reshape(36)
    return msg


def relative_pose_msg(rp, parent_frame: str, child_frame: str):
    """A :class:`pnv_ros.geometry.RelativePose` (or None) to pnv_ros/RelativePose, for every type.

    ``type`` is the pose's (None: NONE, identity rotation, empty ``covariance``). ``covariance`` is the
    joint matrix row-major: 9 (ROTATION_ONLY), 25 (ROTATION_AND_DIRECTION) or 36 (METRIC) values;
    ``translation`` and ``translation_covariance`` are set for METRIC only (zero otherwise).

    Raises:
        ValueError: a joint covariance whose size does not fit the pose's type.
    """
    from scipy.spatial.transform import Rotation

    from pnv_ros.geometry import PoseType
    from pnv_ros.msg import RelativePose

    m = RelativePose(parent_frame_id=parent_frame, child_frame_id=child_frame)
    m.rotation.w = 1.0
    if rp is None or PoseType(rp.type) == PoseType.NONE:
        m.type = RelativePose.NONE
        return m
    kind = PoseType(rp.type)
    cov = np.asarray(rp.covariance, np.float64)
    want = {PoseType.ROTATION_ONLY: 3, PoseType.ROTATION_AND_DIRECTION: 5, PoseType.METRIC: 6}[kind]
    if cov.shape != (want, want):
        raise ValueError(f"a {kind.name} pose has a ({want}, {want}) covariance, got {cov.shape}")
    m.type = int(kind)
    m.rotation.x, m.rotation.y, m.rotation.z, m.rotation.w = (
        float(v) for v in Rotation.from_matrix(rp.rotation).as_quat()
    )
    m.direction.x, m.direction.y, m.direction.z = (float(v) for v in rp.direction)
    m.rotation_covariance = np.asarray(rp.rotation_covariance, np.float64).ravel().tolist()
    m.direction_covariance = np.asarray(rp.direction_covariance, np.float64).ravel().tolist()
    if kind == PoseType.METRIC:
        m.translation.x, m.translation.y, m.translation.z = (float(v) for v in rp.translation)
        m.translation_covariance = np.asarray(rp.translation_covariance, np.float64).ravel().tolist()
    m.covariance = cov.ravel().tolist()
    m.inliers, m.rms_error_px = int(rp.inliers), float(rp.rms_error_px)
    return m


@cache
def _bridge():
    """cv_bridge's converter where it works, else None (looked for once)."""
    try:  # on robots: cv_bridge widens the accepted encodings (bayer, yuv, ...)
        from cv_bridge import CvBridge

        return CvBridge()
    except Exception:  # noqa: BLE001 - absent here, or the ROS 1 PyPI build that breaks on numpy 2
        return None


def frame_to_array(msg, bit_depth: int | None = None) -> np.ndarray:
    """The node's decoder for sensor_msgs/Image or CompressedImage: an RGB (or grey / RGBA) uint8 array (H, W[, C]).

    Our checked decoding first (clear errors; the package's one decoder and bit-depth rule); cv_bridge for
    other encodings where present. Raises ImageError.
    """
    from sensor_msgs.msg import CompressedImage

    if isinstance(msg, CompressedImage):
        return compressed_to_array(msg, bit_depth=bit_depth)
    try:
        return image_to_array(msg, bit_depth=bit_depth)
    except ImageError as e:
        bridge = _bridge()
        if bridge is None or "unsupported image encoding" not in str(e):
            raise
        try:
            return np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
        except Exception as e2:  # noqa: BLE001
            raise ImageError(f"{e}; cv_bridge could not convert it either: {e2}") from None
