"""The node's parts that need no ROS (pnv_ros.ros.odometry, diagnostics, map_files, camera), tested alone:
no rclpy, no model. test_node runs them inside the node."""

from __future__ import annotations

import calendar
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pnv_ros.errors import MapError
from pnv_ros.ros import diagnostics as D
from pnv_ros.ros.camera import CameraMatrix, is_camera_matrix
from pnv_ros.ros.map_files import MapFiles
from pnv_ros.ros.odometry import OdometryBuffer, valid_pose


# -- conversions (pnv_ros.ros.conversions: needs the built messages, not rclpy) ---------------------------------
def _pose(kind: int):
    """A RelativePose of each type as pnv_ros.loop_pose builds them (values made up, shapes and conventions real)."""
    from scipy.spatial.transform import Rotation

    from pnv_ros.geometry import PoseType, RelativePose, tangent_basis

    r = Rotation.from_rotvec([0.1, -0.2, 0.05]).as_matrix()
    n = {PoseType.ROTATION_ONLY: 3, PoseType.ROTATION_AND_DIRECTION: 5, PoseType.METRIC: 6}[PoseType(kind)]
    a = np.arange(1.0, n * n + 1).reshape(n, n) / 100.0
    cov = a @ a.T + np.eye(n) * 1e-3  # symmetric positive definite, every entry different
    t = np.array([0.3, -0.1, 0.2]) if kind == PoseType.METRIC else None
    d = (
        np.zeros(3)
        if kind == PoseType.ROTATION_ONLY
        else np.array([0.6, 0.0, 0.8])
        if t is None
        else t / np.linalg.norm(t)
    )
    b = np.zeros((3, 2)) if kind == PoseType.ROTATION_ONLY else tangent_basis(d)
    dcov = b @ cov[3:5, 3:5] @ b.T if kind == PoseType.ROTATION_AND_DIRECTION else np.zeros((3, 3))
    tcov = cov[3:, 3:] if kind == PoseType.METRIC else None
    return RelativePose(r, d, cov[:3, :3], dcov, 57, 0.8, cov, b, 0.9, 12.0, PoseType(kind), t, tcov)


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_relative_pose_msg_for_each_type(kind: int) -> None:
    from pnv_ros.msg import RelativePose as Msg
    from scipy.spatial.transform import Rotation

    from pnv_ros.ros.conversions import relative_pose_msg

    rp = _pose(kind)
    m = relative_pose_msg(rp, "cam_q", "cam_m")
    assert m.type == kind and (m.parent_frame_id, m.child_frame_id) == ("cam_q", "cam_m")
    q = [m.rotation.x, m.rotation.y, m.rotation.z, m.rotation.w]
    assert np.allclose(Rotation.from_quat(q).as_matrix(), rp.rotation)
    n = {Msg.ROTATION_ONLY: 3, Msg.ROTATION_AND_DIRECTION: 5, Msg.METRIC: 6}[kind]
    assert len(m.covariance) == n * n and np.array_equal(np.reshape(m.covariance, (n, n)), rp.covariance)
    assert np.array_equal(np.reshape(m.rotation_covariance, (3, 3)), rp.covariance[:3, :3])
    assert np.allclose([m.direction.x, m.direction.y, m.direction.z], rp.direction)
    assert np.allclose(np.reshape(m.direction_covariance, (3, 3)), rp.direction_covariance)
    t = [m.translation.x, m.translation.y, m.translation.z]
    if kind == Msg.METRIC:
        assert np.allclose(t, [0.3, -0.1, 0.2]) and np.array_equal(
            np.reshape(m.translation_covariance, (3, 3)), rp.covariance[3:, 3:]
        )
    else:
        assert t == [0.0, 0.0, 0.0] and not any(m.translation_covariance)
    assert m.inliers == 57 and abs(m.rms_error_px - 0.8) < 1e-6


def test_relative_pose_msg_none_and_a_covariance_of_the_wrong_size() -> None:
    import dataclasses

    from pnv_ros.msg import RelativePose as Msg

    from pnv_ros.geometry import PoseType
    from pnv_ros.ros.conversions import relative_pose_msg

    m = relative_pose_msg(None, "a", "b")
    assert m.type == Msg.NONE and len(m.covariance) == 0 and m.rotation.w == 1.0 and not any(m.rotation_covariance)
    assert Msg.NONE == PoseType.NONE and Msg.METRIC == PoseType.METRIC and Msg.ROTATION_ONLY == PoseType.ROTATION_ONLY
    with pytest.raises(ValueError, match="METRIC pose has a \\(6, 6\\)"):
        relative_pose_msg(dataclasses.replace(_pose(PoseType.METRIC), covariance=np.eye(5)), "a", "b")


# -- odometry ----------------------------------------------------------------------------------------------------
def test_a_frame_waits_for_the_odometry_of_its_instant() -> None:
    """The worker can take a frame before the odometry published with it: the pose from before the robot
    moved would make it 'no_motion' and the keyframe of that place would come later, from wherever the
    robot then is. The lookup waits (at most the tolerance) for the pose of the frame's instant."""
    odom, ms = OdometryBuffer(), 1_000_000
    tol = 500 * ms  # generous against a loaded CI machine's thread scheduling
    before, after = np.r_[0.0, 0, 0, 0, 0, 0, 1], np.r_[1.0, 0, 0, 0, 0, 0, 1]
    odom.add(1000 * ms, before, "odom")
    threading.Timer(0.03, odom.add, (1060 * ms, after, "odom")).start()  # 30 ms late, 10 ms from the frame
    t = time.monotonic()
    pos, _ = odom.at(1050 * ms, tol)
    assert pos is not None and pos[0] == 1.0 and time.monotonic() - t < 0.45
    # Odometry that stopped (newest ~2 s older than the frame): no pose and no wait.
    t = time.monotonic()
    assert odom.at(3000 * ms, tol) == (None, None) and time.monotonic() - t < 0.3
    # Flowing but the next pose never comes: after the tolerance, the nearest within it.
    t = time.monotonic()
    pos, _ = odom.at(1100 * ms, tol)
    assert pos is not None and pos[0] == 1.0 and time.monotonic() - t >= 0.45


def test_odometry_at_the_camera_rate_is_waited_for_though_the_pose_before_is_out_of_tolerance() -> None:
    """TUM fr1/desk at 10 Hz: odometry at each colour stamp, 100.01 ms apart, tolerance 0.1 s. A frame taken
    before its own pose arrived found the pose before it 100.01 ms old: not waited for (odometry counted as
    stopped), no pose within the tolerance, so the frame was admitted by sight: ``pnv eval --node`` made 91
    keyframes where in process 64 under a load that delayed the node's odometry callback. Here scaled to a
    300 ms tolerance (poses 300.03 ms apart) against a loaded machine's scheduling."""
    odom, ms, q = OdometryBuffer(), 1_000_000, [0.0, 0, 0, 1]
    tol, period = 300 * ms, 300 * ms + 30_000  # the period just above the tolerance, as 100.01 ms against 0.1 s
    for k in range(3):
        odom.add(1000 * ms + k * period, np.r_[k, 0, 0, q], "odom")
    frame = 1000 * ms + 3 * period
    threading.Timer(0.03, odom.add, (frame, np.r_[3.0, 0, 0, q], "odom")).start()  # 30 ms after the frame
    s = odom.sample(frame, tol)
    assert s is not None and s.stamp_ns == frame and s.position[0] == 3.0
    # Odometry that stopped three periods before the frame: no pose and no wait.
    t = time.monotonic()
    assert odom.sample(frame + 3 * period, tol) is None and time.monotonic() - t < 0.2
    # The first frames: no pose yet while odometry has a publisher (``expected``), then one pose (no period yet).
    first = OdometryBuffer()
    assert first.sample(frame, tol, wait=True) is None  # nothing expected: no wait
    threading.Timer(0.03, first.add, (frame - period, np.r_[2.0, 0, 0, q], "odom")).start()
    s = first.sample(frame - period, tol, expected=True)
    assert s is not None and s.position[0] == 2.0
    threading.Timer(0.03, first.add, (frame, np.r_[3.0, 0, 0, q], "odom")).start()
    s = first.sample(frame, tol)
    assert s is not None and s.position[0] == 3.0
    # Slow odometry (2 s apart): the wait covers one period up to the tolerance, not the whole period.
    slow = OdometryBuffer()
    for k in range(2):
        slow.add(1000 * ms + k * 2000 * ms, np.r_[k, 0, 0, q], "odom")
    t = time.monotonic()
    assert slow.sample(3000 * ms + 2 * tol + 50 * ms, tol) is None and time.monotonic() - t < 0.2


def test_one_late_odometry_message_is_dropped_a_clock_reset_clears() -> None:
    """Two publishers on odom, or a reordering link: a pose a few ms older than the newest is dropped, not taken
    for a clock reset that would clear every pose (frames would then go without odometry); a jump back of a
    second or more is a reset."""
    odom, ms, q = OdometryBuffer(), 1_000_000, [0.0, 0, 0, 1]
    for t in range(0, 100, 10):
        assert odom.add(5000 * ms + t * ms, np.r_[t, 0, 0, q], "odom")
    assert not odom.add(5085 * ms, np.r_[-1.0, 0, 0, q], "odom")  # 5 ms late
    pos, _ = odom.at(5050 * ms, 20 * ms)
    assert pos is not None and pos[0] == 50.0  # the history is still there
    assert odom.add(1000 * ms, np.r_[7.0, 0, 0, q], "odom")  # 4 s back: the clock restarted
    assert odom.at(5050 * ms, 20 * ms) == (None, None) and odom.at(1000 * ms, 20 * ms)[0][0] == 7.0


def test_a_sample_is_the_whole_odometry_message_a_keyframe_carries() -> None:
    """sample(): the stored message nearest the stamp with its covariance and frames (what pnv_ros/Keyframe
    carries); wait=False answers at once even while odometry flows behind the stamp."""
    odom, ms, q = OdometryBuffer(capacity=4), 1_000_000, [0.0, 0, 0, 1]
    cov = np.diag([1.0, 2, 3, 4, 5, 6])
    for t in range(6):  # more than the capacity: the ring keeps the newest four
        odom.add(1000 * ms + t * 100 * ms, np.r_[t, 0, 0, q], "odom", cov * t, "base_link")
    s = odom.sample(1290 * ms, 20 * ms)
    assert s.stamp_ns == 1300 * ms and s.position[0] == 3.0 and (s.frame_id, s.child_frame_id) == ("odom", "base_link")
    np.testing.assert_array_equal(s.covariance, cov * 3)
    assert odom.newest_stamp == 1500 * ms and odom.sample(1100 * ms, 20 * ms) is None  # left the ring
    t = time.monotonic()
    assert odom.sample(1550 * ms, 100 * ms, wait=False).stamp_ns == 1500 * ms and time.monotonic() - t < 0.05
    odom.add(1600 * ms, np.r_[9.0, 0, 0, q], "odom")  # no covariance given: zeros
    assert not odom.sample(1600 * ms, 0).covariance.any()


def test_a_pose_needs_finite_values_and_a_quaternion() -> None:
    assert valid_pose(np.r_[1.0, 2, 3, 0, 0, 0, 1])
    assert not valid_pose(np.r_[np.nan, 0, 0, 0, 0, 0, 1])
    assert not valid_pose(np.r_[0.0, 0, 0, 0, 0, 0, 0])
    assert not valid_pose(np.r_[0.0, 0, 0, 0, 0, np.inf, 1])


# -- diagnostics -------------------------------------------------------------------------------------------------
def _assess(recent: dict[str, int] | None = None, **kw: object) -> D.Assessment:
    args: dict = {"silent_s": 0.0, "image_topic": "/cam/image", **kw}
    return D.assess(recent or {}, **args)


def test_diagnostics_all_well() -> None:
    a = _assess({"keyframe": 5, "no_motion": 20, "dropped": 100})  # dropped: at most 20 per frame taken
    assert a.level == D.Level.OK and a.problems == []


@pytest.mark.parametrize(
    ("recent", "kw", "level", "needle"),
    [
        ({}, {"store_trouble": "disk full"}, D.Level.ERROR, "map store: disk full"),
        ({}, {"unloadable": "site.npz"}, D.Level.ERROR, "load_map: site.npz failed to load at start"),
        ({"qos_incompatible": 1}, {}, D.Level.ERROR, "incompatible QoS"),
        ({"error": 3}, {"last_error": "bad jpeg"}, D.Level.ERROR, "3 bad frames in 10 s: bad jpeg"),  # every frame
        ({"error": 1, "keyframe": 4}, {"last_error": "x"}, D.Level.WARN, "1 bad frames in 10 s: x"),  # some frames
        ({"duplicate": 4}, {}, D.Level.ERROR, "every frame repeats the previous stamp"),
        ({"duplicate": 1, "keyframe": 1}, {}, D.Level.WARN, "stamps out of order, repeated or jumping back"),
        ({"out_of_order": 1, "keyframe": 1}, {}, D.Level.WARN, "stamps out of order, repeated or jumping back"),
        ({"time_jump": 1, "keyframe": 1}, {}, D.Level.WARN, "stamps out of order, repeated or jumping back"),
        ({"bad_odom": 2}, {}, D.Level.WARN, "2 x odometry with NaN or a zero quaternion ignored"),
        ({"bad_camera_info": 1}, {}, D.Level.WARN, "1 x camera_info that is not a camera matrix ignored"),
        ({"camera_info_size": 3}, {}, D.Level.WARN, "3 x frames not of camera_info's size"),
        ({"late_odom": 1}, {}, D.Level.WARN, "1 x odometry older than the newest dropped"),
        ({"odom_unmatched": 3}, {}, D.Level.WARN, "3 x frames without odometry within odom_tolerance_s"),
        ({"dropped": 21}, {}, D.Level.WARN, "most frames are dropped"),  # nothing taken: more than 20
        ({"dropped": 41, "keyframe": 2}, {}, D.Level.WARN, "most frames are dropped"),
        ({}, {"silent_s": 5.5}, D.Level.WARN, "no image on /cam/image for 5 s (topic, QoS?)"),
    ],
)
def test_each_diagnostics_rule(recent: dict[str, int], kw: dict, level: D.Level, needle: str) -> None:
    a = _assess(recent, **kw)
    assert a.level == level and len(a.problems) == 1 and needle in a.problems[0], a


def test_diagnostics_just_below_each_threshold_and_the_worst_level() -> None:
    assert _assess({"dropped": 40, "keyframe": 2}, silent_s=5.0).problems == []
    a = _assess({"bad_odom": 1, "qos_incompatible": 1}, unloadable="a.npz")
    assert a.level == D.Level.ERROR and len(a.problems) == 3  # warnings and errors together: the worst


def test_event_log_counts_the_window() -> None:
    log = D.EventLog(maxlen=5)
    for kind in ("keyframe", "dropped", "dropped"):
        log.add(kind)
    now = time.monotonic()
    assert log.recent(now) == {"keyframe": 1, "dropped": 2}
    assert log.recent(now + D.DIAG_WINDOW_S + 1) == {}
    for _ in range(10):
        log.add("error")
    assert log.recent(time.monotonic()) == {"error": 5}  # at most maxlen kept


def test_report_values() -> None:
    vals = D.report_values(
        {"loops": 2}, {"dropped": 1}, {"bad": 0}, {"keyframe": 3}, {"extract": [0.1, 0.3, 0.2], "commit": []}
    )
    assert vals["loops"] == "2" and vals["worker_dropped"] == "1" and vals["bad"] == "0"
    assert vals["recent_keyframe"] == "3" and vals["latency_extract_p50_ms"] == "200.0"
    assert vals["latency_extract_max_ms"] == "300.0" and "latency_commit_p50_ms" not in vals
    assert float(vals["max_rss_mb"]) > 0


def test_latency_keeps_the_stages_each_keyframe_reports() -> None:
    lat = D.Latency(maxlen=3)
    lat.add({"extract": 0.2, "commit": 0.05, "total": 0.25, "decode": 0.001, "not_a_stage": 1.0})
    lat.add({"extract": 0.3, "commit": 0.06, "total": 0.36, "backbone": 0.1})
    snap = lat.snapshot()
    assert snap["extract"] == [0.2, 0.3] and snap["decode"] == [0.001] and snap["backbone"] == [0.1]
    assert "not_a_stage" not in snap and snap["pose"] == []
    for _ in range(5):
        lat.add({"extract": 1.0})
    assert lat.snapshot()["extract"] == [1.0] * 3 and snap["extract"] == [0.2, 0.3]  # at most maxlen; a copy
    vals = D.report_values({}, {}, {}, {}, lat.snapshot())
    assert vals["latency_extract_p50_ms"] == "1000.0" and vals["latency_backbone_p50_ms"] == "100.0"
    assert "latency_pose_p50_ms" not in vals


# -- map files ---------------------------------------------------------------------------------------------------
class _Owner:
    """A detector's map side: a save writes the keyframe count, a load takes a file that holds one."""

    def __init__(self, n: int = 3) -> None:
        self.map = list(range(n))

    def save_map(self, path: str | Path) -> int:
        Path(path).write_text(str(len(self.map)))
        return len(self.map)

    def load_map(self, path: str | Path) -> int:
        try:
            n = int(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise MapError(f"{Path(path).name} is corrupt or missing: {e}") from None
        self.map = list(range(n))
        return n


def _maps(tmp_path: Path, caplog: pytest.LogCaptureFixture, owner: _Owner | None = None) -> MapFiles:
    caplog.set_level(logging.INFO, "maps")
    return MapFiles(tmp_path / "maps", owner or _Owner(), logging.getLogger("maps"))


def test_map_names_saves_and_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loads: list[int] = []
    maps = MapFiles(tmp_path, _Owner(), logging.getLogger("maps"), on_load=lambda: loads.append(1))
    assert maps.path("run1") == tmp_path / "run1.npz" and maps.path("run1.npz") == tmp_path / "run1.npz"
    for bad in ("../evil", "a/b", ""):
        ok, msg, n = maps.save(bad)
        assert not ok and "bad map name" in msg and n == 3
        assert not maps.exists(bad)
    assert maps.save("run1") == (True, f"saved 3 keyframes to {tmp_path / 'run1.npz'}", 3) and maps.exists("run1")
    (tmp_path / "corrupt.npz").write_text("not a map")
    ok, msg, n = maps.load("corrupt")
    assert not ok and "corrupt" in msg and n == 3 and not loads
    assert maps.load("run1") == (True, f"loaded 3 keyframes from {tmp_path / 'run1.npz'}", 3) and loads == [1]
    ok, msg, _ = MapFiles(tmp_path / "file.npz" / "sub", _Owner(), logging.getLogger("maps")).save("x")
    assert not ok and msg.startswith("save failed: ")  # an OSError, answered


def test_map_dir_checked_and_left_overs_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    maps = _maps(tmp_path, caplog)
    assert maps.check_writable() and maps.map_dir.is_dir()
    old, fresh = maps.map_dir / ".run1.npz.123.tmp", maps.map_dir / ".run2.npz.456.tmp"
    for f in (old, fresh):
        f.write_bytes(b"half a map")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    spills = tmp_path / "tmp"
    spills.mkdir()
    maps.remove_left_overs(temp_dir=spills)
    assert not old.exists() and fresh.exists()  # a save in progress keeps its temp file
    assert f"removed {old.name}, left by a save that did not finish" in caplog.text
    (tmp_path / "taken").write_text("a file where map_dir should be")
    assert not MapFiles(tmp_path / "taken", _Owner(), logging.getLogger("maps")).check_writable()
    assert "cannot be written: save_map will fail until it can" in caplog.text


def test_a_map_that_fails_to_load_at_start_is_never_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    maps = _maps(tmp_path, caplog)
    maps.map_dir.mkdir()
    site = maps.map_dir / "site.npz"
    site.write_text("another model's map")
    assert not maps.load_at_start("missing") and maps.unloadable is None  # no file: nothing to protect
    assert not maps.load_at_start("site") and maps.unloadable == "site.npz"
    assert "site.npz is kept as it is" in caplog.text
    when = calendar.timegm((2026, 12, 7, 10, 0, 0))
    assert maps.shutdown_name("other") == "other" and maps.shutdown_name("") == ""
    assert maps.shutdown_name("site.npz", when) == "site_unsaved_20261207T100000Z"
    long = "s" * 100
    maps.unloadable = f"{long}.npz"
    assert maps.shutdown_name(long, when) == "s" * 75 + "_unsaved_20261207T100000Z"  # within the name limit
    maps.unloadable = "site.npz"
    maps.save_on_shutdown("site")
    assert site.read_text() == "another model's map" and len(list(maps.map_dir.glob("site_unsaved_*.npz"))) == 1
    assert "not replacing site.npz, which failed to load at start" in caplog.text
    assert maps.save("site")[0] and maps.unloadable is None  # an explicit save_map of it: this run's map now
    maps.unloadable = "site.npz"
    assert maps.load("site")[0] and maps.unloadable is None  # it loads after all


# -- camera_info -------------------------------------------------------------------------------------------------
K = [400.0, 0.0, 256.0, 0.0, 400.0, 192.0, 0.0, 0.0, 1.0]
P_RECT = [410.0, 0.0, 250.0, 0.0, 0.0, 410.0, 190.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_camera_matrix_from_camera_info() -> None:
    assert is_camera_matrix(np.reshape(K, (3, 3))) and not is_camera_matrix(np.zeros((3, 3)))
    cam = CameraMatrix()
    assert cam.for_sizes((512, 384)) == (None, False, None)
    assert cam.update(P_RECT, K, 512, 384, rectified=True) == (True, None)
    m, other, warning = cam.for_sizes((512, 384))
    assert m is not None and m.matrix[0, 0] == 410.0 and not other and warning is None  # P (rectified) before K
    assert cam.update([0.0] * 12, K, 0, 0, rectified=True) == (True, None)  # P empty: K; no size given: any size
    assert cam.for_sizes((10, 10))[0].matrix[0, 0] == 400.0
    bad = [400.0, 0.0, float("nan"), 0.0, 400.0, 192.0, 0.0, 0.0, 1.0]
    ok, warning = cam.update([0.0] * 12, bad, 512, 384)
    assert not ok and warning and "camera_info ignored" in warning and cam.for_sizes((512, 384))[0] is None
    assert cam.update([0.0] * 12, bad, 512, 384) == (False, None)  # said once
    cam.update(P_RECT, K, 512, 384)
    assert cam.update([0.0] * 12, bad, 512, 384)[1] is not None  # again after a good one


def test_raw_images_take_k_and_d_rectified_ones_p() -> None:
    """image_rectified false (raw images): K and D, so the distortion moves keypoints; true: P, D ignored.
    fr1/desk's camera (data/tum_fr1_desk_pairs/camera.yaml): k1 0.2624 moves a corner pixel by pixels."""
    import yaml

    y = yaml.safe_load((Path(__file__).parent.parent / "data" / "tum_fr1_desk_pairs" / "camera.yaml").read_text())
    k, d, p = y["camera_matrix"]["data"], y["distortion_coefficients"]["data"], y["projection_matrix"]["data"]
    cam = CameraMatrix()
    assert cam.update(p, k, 640, 480, d, "plumb_bob") == (True, None)
    raw = cam.for_sizes((640, 480))[0]
    assert raw.distorted and np.allclose(raw.matrix.ravel(), k) and raw.size == (640, 480)
    corner = np.array([[5.0, 5.0]])
    assert np.linalg.norm(raw.undistort(corner) - corner) > 5.0  # D applied
    assert cam.update(p, k, 640, 480, d, "plumb_bob", rectified=True) == (True, None)
    rect = cam.for_sizes((640, 480))[0]
    assert not rect.distorted and np.allclose(rect.matrix, np.reshape(p, (3, 4))[:, :3])
    assert np.allclose(rect.undistort(corner), corner)
    ok, warning = cam.update(p, k, 640, 480, d, "fisheye_of_my_own")  # a model not applied, D not zero
    assert not ok and "camera_info ignored" in warning and "fisheye_of_my_own" in warning
    assert cam.update(P_RECT, [0.0] * 9, 512, 384, [0.0] * 5, "plumb_bob") == (True, None)  # K empty, no D: P
    assert cam.for_sizes((512, 384))[0].matrix[0, 0] == 410.0


def test_camera_matrix_only_for_its_image_size() -> None:
    cam = CameraMatrix()
    cam.update([0.0] * 12, K, 1024, 768)
    m, other, warning = cam.for_sizes((512, 384))
    assert m is None and other and warning
    assert "camera_info is for 1024 x 768 images but the image is 512 x 384" in warning
    assert cam.for_sizes((512, 384)) == (None, True, None)  # said once per size
    assert cam.for_sizes((1024, 768), (1024, 768))[0] is not None
    assert cam.for_sizes((1024, 768), (640, 480))[0] is None  # every size given must be camera_info's


# -- depth -------------------------------------------------------------------------------------------------------
def _depth_msg(arr: np.ndarray, encoding: str, big_endian: bool = False):
    """An object with sensor_msgs/Image's fields (what the node hands DepthInput)."""
    from types import SimpleNamespace

    a = arr.astype(arr.dtype.newbyteorder(">" if big_endian else "<"))
    return SimpleNamespace(
        height=a.shape[0],
        width=a.shape[1],
        encoding=encoding,
        is_bigendian=int(big_endian),
        step=a.shape[1] * a.itemsize,
        data=a.tobytes(),
    )


def test_depth_pairs_by_stamp_and_skips_bad_depth() -> None:
    """fr1/desk's registered depth (16-bit PNG, 5000 units a metre) as 16UC1 and as 32FC1 metres: paired with
    the frame nearest its stamp within the tolerance; bad depth is a counted skip with one warning a kind."""
    import cv2

    from pnv_ros.ros.depth import DepthInput

    tum = Path(__file__).parent.parent / "data" / "tum_fr1_desk_pairs"
    png = cv2.imread(str(next((tum / "depth").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == (480, 640)
    ms, shape = 1_000_000, (480, 640, 3)
    inp = DepthInput(scale=5000.0)
    assert inp.for_frame(0, 20 * ms, shape).skip is None and inp.for_frame(0, 20 * ms, shape).depth_m is None
    inp.add(1000 * ms, _depth_msg(png, "16UC1", big_endian=True))
    metres = png.astype(np.float32) / 5000
    metres[png == 0] = np.nan
    inp.add(1100 * ms, _depth_msg(metres, "32FC1"))
    a = inp.for_frame(1010 * ms, 20 * ms, shape)  # the 16UC1 one, 10 ms away
    want = np.where(png > 0, png / 5000.0, np.nan)
    assert a.skip is None and np.allclose(a.depth_m, want, equal_nan=True)
    b = inp.for_frame(1095 * ms, 20 * ms, shape)  # the 32FC1 one
    assert b.skip is None and np.allclose(b.depth_m, want, equal_nan=True, atol=1e-6)
    c = inp.for_frame(1050 * ms, 20 * ms, shape)  # 50 ms from either
    assert c.depth_m is None and c.skip == "depth_unmatched" and c.warning
    bad = (
        ("depth_empty", _depth_msg(np.full((480, 640), np.nan, np.float32), "32FC1")),
        ("depth_empty", _depth_msg(np.zeros((480, 640), np.uint16), "16UC1")),
        ("depth_size", _depth_msg(png[:240, :320], "16UC1")),
        ("depth_encoding", _depth_msg(np.zeros((480, 640, 3), np.uint8).reshape(480, -1), "rgb8")),
    )
    warnings = []
    for i, (kind, msg) in enumerate(bad):
        inp.add((2000 + 100 * i) * ms, msg)
        r = inp.for_frame((2000 + 100 * i) * ms, 20 * ms, shape)
        assert r.depth_m is None and r.skip == kind, (kind, r)
        warnings.append(r.warning)
    assert warnings[0] and warnings[1] is None and warnings[2] and warnings[3]  # once per kind
    assert "rgb8" in warnings[3] and "320 x 240" in warnings[2]
    assert inp.counts["depth_empty"] == 2 and inp.counts["depth_size"] == inp.counts["depth_encoding"] == 1
    msg = _depth_msg(png, "16UC1")
    msg.data = msg.data[:1000]
    inp.add(3000 * ms, msg)
    assert inp.for_frame(3000 * ms, 20 * ms, shape).skip == "depth_malformed"


def test_depth_of_a_pinned_frame_outlives_the_ring() -> None:
    """A depth camera streams at 30 Hz while a keyframe takes longer than the ring (8 messages, 0.27 s) to
    extract: the depth image nearest a frame pinned on arrival is still found when the frame is handled; an
    unpinned frame's is gone (depth_unmatched), and pins are bounded (MAX_PINS)."""
    import cv2

    from pnv_ros.ros.depth import MAX_PINS, DepthInput

    tum = Path(__file__).parent.parent / "data" / "tum_fr1_desk_pairs"
    png = cv2.imread(str(next((tum / "depth").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    ms, shape, period = 1_000_000, (480, 640, 3), 33_333_333
    own = _depth_msg(png, "16UC1")
    filler = _depth_msg(np.full_like(png, 5000), "16UC1")  # 1 m everywhere: not the frame's depth
    inp = DepthInput(scale=5000.0)
    inp.add(995 * ms, own)  # the frame's depth, 5 ms before its colour image
    inp.pin(1000 * ms)  # the colour frame arrives
    for i in range(1, 31):  # one second of depth while the frame waits and is extracted
        inp.add(995 * ms + i * period, filler)
    a = inp.for_frame(1000 * ms, 20 * ms, shape)
    assert a.skip is None and np.allclose(a.depth_m, np.where(png > 0, png / 5000.0, np.nan), equal_nan=True)
    late = DepthInput(scale=5000.0)  # the same stream, no pin: what the ring alone keeps
    late.add(995 * ms, own)
    for i in range(1, 31):
        late.add(995 * ms + i * period, filler)
    assert late.for_frame(1000 * ms, 20 * ms, shape).skip == "depth_unmatched"
    # a depth image arriving after its pinned frame is taken when nearer; pins stay bounded
    inp.pin(5000 * ms)
    inp.add(5010 * ms, own)
    for i in range(1, 31):
        inp.add(5010 * ms + i * period, filler)
    assert np.allclose(inp.for_frame(5000 * ms, 20 * ms, shape).depth_m, a.depth_m, equal_nan=True)
    for i in range(MAX_PINS + 3):
        inp.pin((6000 + i) * ms)
    assert len(inp._pins) == MAX_PINS


def test_depth_of_another_frame_id_is_used_with_one_warning() -> None:
    """A depth image whose frame_id is not the colour image's (a RealSense's unaligned depth/image_rect_raw is
    640 x 480 like its colour stream) is used but said, once per pair of frames; registered depth (the colour
    camera's frame_id) is said nothing."""
    from types import SimpleNamespace

    import cv2

    from pnv_ros.ros.depth import DepthInput

    tum = Path(__file__).parent.parent / "data" / "tum_fr1_desk_pairs"
    png = cv2.imread(str(next((tum / "depth").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    ms, shape, colour = 1_000_000, (480, 640, 3), "camera_color_optical_frame"
    inp = DepthInput()
    answers = []
    for i, frame in enumerate((colour, "camera_depth_optical_frame", "camera_depth_optical_frame", colour)):
        msg = _depth_msg(png, "16UC1")
        msg.header = SimpleNamespace(frame_id=frame)
        inp.add((1000 + 100 * i) * ms, msg)
        answers.append(inp.for_frame((1000 + 100 * i) * ms, 20 * ms, shape, colour))
    assert all(a.depth_m is not None and a.skip is None for a in answers)
    assert [a.warning is not None for a in answers] == [False, True, False, False]
    assert "'camera_depth_optical_frame' is not the colour image's 'camera_color_optical_frame'" in answers[1].warning
