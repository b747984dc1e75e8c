"""The node with a depth camera, as a user runs it: its executable in a separate process, fr1/desk's colour
frames, registered depth (16UC1 millimetres) and camera_info (raw images: K and D) published over
loopback-only DDS. A revisit gets a METRIC relative pose; bad depth (all NaN, another size, an rgb8 image on
the depth topic) costs no keyframe and stops nothing: the node warns once, counts the skips and reports them
in its diagnostics."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

rclpy = pytest.importorskip("rclpy")  # test_node.test_rclpy_is_installed_in_ci fails loudly where absent
from pnv_ros.msg import RelativePose  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from test_node import Client, start_node, stop_node  # noqa: E402

TUM = Path(__file__).resolve().parent.parent / "data" / "tum_fr1_desk_pairs"
#: the revisit of pairs.txt whose patch score (0.21, default model, speed preset) passes the default min_score
QUERY, MATCH = "1305031468.727785", "1305031454.459913"
FILLER = "1305031457.291656"  # a keyframe between the two
BAD_AFTER = ("1305031469.527622", "1305031471.127663", "1305031471.927651")  # frames given bad depth


def _stamp(msg, stamp: str) -> None:
    sec, frac = stamp.split(".")
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(sec), int(frac.ljust(9, "0"))
    msg.header.frame_id = "camera_rgb_optical_frame"


def _image(arr: np.ndarray, encoding: str, stamp: str) -> Image:
    m = Image(height=arr.shape[0], width=arr.shape[1], encoding=encoding, step=arr.shape[1] * arr[0, 0].nbytes)
    m.data = np.ascontiguousarray(arr).tobytes()
    _stamp(m, stamp)
    return m


def _camera_info(stamp: str) -> CameraInfo:
    y = yaml.safe_load((TUM / "camera.yaml").read_text())
    info = CameraInfo(width=y["image_width"], height=y["image_height"], distortion_model=y["distortion_model"])
    info.k, info.d = y["camera_matrix"]["data"], y["distortion_coefficients"]["data"]
    info.p, info.r = y["projection_matrix"]["data"], y["rectification_matrix"]["data"]
    _stamp(info, stamp)
    return info


def _depth_of(rgb_stamp: str) -> tuple[str, np.ndarray]:
    """(depth stamp, 16UC1 millimetres) of a colour frame: associations.txt's depth PNG (5000 units a metre)."""
    for line in (TUM / "associations.txt").read_text().splitlines():
        f = line.split()
        if f and f[0] == rgb_stamp:
            png = cv2.imread(str(TUM / f[3]), cv2.IMREAD_UNCHANGED)
            assert abs(float(f[2]) - float(f[0])) <= 0.02  # within the default depth_tolerance_s
            return f[2], (png.astype(np.uint32) // 5).astype(np.uint16)
    raise AssertionError(rgb_stamp)


def _start_with_depth(ros: Client, tmp_path: Path):
    """The node (every frame a keyframe candidate, no recency exclusion) and this side's depth and camera_info
    publishers and /diagnostics list."""
    from diagnostic_msgs.msg import DiagnosticArray

    node = start_node(
        tmp_path, "-p", "image_qos:=reliable", "-p", "min_visual_change:=0.0", "-p", "exclude_recent_keyframes:=0"
    )
    n = ros.node
    pub_depth = n.create_publisher(Image, "depth", 10)
    pub_info = n.create_publisher(CameraInfo, "camera_info", 10)
    diags: list[DiagnosticArray] = []
    n.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 50)
    return node, pub_depth, pub_info, diags


@pytest.mark.slow
def test_node_depth_metric_loop_and_bad_depth(ros: Client, tmp_path: Path) -> None:
    node, pub_depth, pub_info, diags = _start_with_depth(ros, tmp_path)
    ros.loops.clear()
    ros.keyframes.clear()
    ros.acks.clear()

    def feed(stamp: str, depth: Image | None) -> str:
        pub_info.publish(_camera_info(stamp))
        if depth is not None:
            pub_depth.publish(depth)
        ros.spin_until(lambda: False, 0.2)  # depth and camera_info before the frame
        rgb = np.asarray(PILImage.open(TUM / "rgb" / f"{stamp}.jpg").convert("RGB"))
        ros.pub.publish(_image(rgb, "rgb8", stamp))
        mine = lambda a: f"{a.stamp.sec}.{a.stamp.nanosec:09d}".startswith(stamp)  # noqa: E731
        assert ros.spin_until(lambda: any(map(mine, ros.acks)), 120), f"no answer for {stamp}"
        return next(a.frame_id for a in ros.acks if mine(a))

    try:
        ros.wait_ready()
        assert ros.spin_until(lambda: pub_depth.get_subscription_count() > 0, 30)
        assert ros.spin_until(lambda: pub_info.get_subscription_count() > 0, 30)
        for stamp in (MATCH, FILLER, QUERY):
            d_stamp, mm = _depth_of(stamp)
            assert feed(stamp, _image(mm, "16UC1", d_stamp)) == "keyframe"
        assert ros.spin_until(lambda: ros.loops, 10), "no loop"
        lc = ros.loops[-1]
        assert (lc.query_id, lc.match_id) == (2, 0), (lc.query_id, lc.match_id, lc.score)
        rp = lc.relative_pose
        assert rp.type == RelativePose.METRIC, rp.type
        t = np.array([rp.translation.x, rp.translation.y, rp.translation.z])
        assert 0.0 < np.linalg.norm(t) < 1.0  # a revisit: camera centres within 0.5 m (pairs.txt)
        assert len(rp.covariance) == 36 and np.all(np.diag(np.reshape(rp.covariance, (6, 6))) > 0)
        # -- bad depth: each frame is still a keyframe (without 3-D points); the node warns and counts ----------
        _, mm = _depth_of(BAD_AFTER[0])
        bad = (
            _image(np.full(mm.shape, np.nan, np.float32), "32FC1", BAD_AFTER[0]),
            _image(mm[::2, ::2], "16UC1", BAD_AFTER[1]),
            _image(np.zeros((*mm.shape, 3), np.uint8), "rgb8", BAD_AFTER[2]),
        )
        for stamp, depth in zip(BAD_AFTER, bad):
            assert feed(stamp, depth) == "keyframe", stamp
        kinds = ("depth_empty", "depth_size", "depth_encoding")

        def reported() -> bool:
            vals = [{kv.key: kv.value for kv in s.values} for d in diags for s in d.status]
            return any(all(v.get(k) == "1" for k in kinds) for v in vals)

        assert ros.spin_until(reported, 10), [s.message for d in diags[-3:] for s in d.status]
        assert any("depth images" in s.message for d in diags for s in d.status)
        assert node.poll() is None  # still running
    finally:
        out = stop_node(node)
    assert node.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for needle in ("no valid depth", "the depth image is 320 x 240, the colour image 640 x 480", "'rgb8'"):
        assert out.count(needle) == 1, (needle, out[-3000:])


@pytest.mark.slow
def test_node_depth_streamed_at_30_hz(ros: Client, tmp_path: Path) -> None:
    """A RealSense streams depth at 30 Hz whether or not the node is busy: each colour frame's depth image comes
    just before it, then more keep coming while the keyframe is extracted (longer than the node's 8-message
    depth ring lasts, 0.27 s, on a CPU). The frame still gets its own depth, and the revisit is METRIC."""
    node, pub_depth, pub_info, diags = _start_with_depth(ros, tmp_path)
    ros.loops.clear()
    ros.acks.clear()
    try:
        ros.wait_ready()
        assert ros.spin_until(lambda: pub_depth.get_subscription_count() and pub_info.get_subscription_count(), 30)
        sent = []
        for stamp in (MATCH, FILLER, QUERY):
            d_stamp, mm = _depth_of(stamp)
            sec, frac = d_stamp.split(".")
            t0 = int(sec) * 10**9 + int(frac.ljust(9, "0"))
            pub_info.publish(_camera_info(stamp))
            pub_depth.publish(_image(mm, "16UC1", d_stamp))
            ros.pub.publish(
                _image(np.asarray(PILImage.open(TUM / "rgb" / f"{stamp}.jpg").convert("RGB")), "rgb8", stamp)
            )
            mine = lambda a, stamp=stamp: f"{a.stamp.sec}.{a.stamp.nanosec:09d}".startswith(stamp)  # noqa: E731
            k = 0
            while not any(map(mine, ros.acks)) and k < 30 * 120:
                k += 1
                t = t0 + k * 33_333_333  # the stream goes on: later depth images, the same picture
                pub_depth.publish(_image(mm, "16UC1", f"{t // 10**9}.{t % 10**9:09d}"))
                ros.spin_until(lambda: False, 1 / 30)
            sent.append(k)
            assert next(a.frame_id for a in ros.acks if mine(a)) == "keyframe"
        assert ros.spin_until(lambda: ros.loops, 10), "no loop"
        assert ros.loops[-1].relative_pose.type == RelativePose.METRIC, (ros.loops[-1].relative_pose.type, sent)

        def unmatched() -> str | None:
            vals = [{kv.key: kv.value for kv in s.values} for d in diags for s in d.status]
            return next((v["depth_unmatched"] for v in reversed(vals) if "depth_unmatched" in v), None)

        assert ros.spin_until(lambda: unmatched() is not None, 10)
        assert unmatched() == "0", (unmatched(), sent)
    finally:
        out = stop_node(node)
    assert node.returncode == 0, out[-3000:]
