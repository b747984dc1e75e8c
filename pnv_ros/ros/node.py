"""loop_closure_node: ROS plumbing around LoopClosureDetector.

Frames arrive on ``image`` (sensor_msgs/Image) or ``image/compressed``, by
default with sensor-data QoS (best effort, depth 1: what camera drivers
publish; a best-effort subscription also hears reliable publishers). A
latest-wins worker (:mod:`pnv_ros.ros.worker`) takes the newest frame; the
detector admits it (time checks, keyframe policy) before anything is decoded,
extracts outside its lock and commits. Accepted loops go to
``loop_closures``. Services only translate messages: every failure is an
answer with ``success: false`` and the reason (traceback in the log), never
a stopped node.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data, qos_profile_system_default
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from pnv_ros.config import DetectorParams, load_preset
from pnv_ros.detector import Admission, LoopClosureDetector, texture
from pnv_ros.errors import ImageError, PnvError
from pnv_ros.extract import FeatureExtractor
from pnv_ros.model.checkpoint import load_checkpoint
from pnv_ros.model.registry import resolve_checkpoint
from pnv_ros.msg import Keyframe as KeyframeMsg
from pnv_ros.msg import LoopClosure as LoopClosureMsg
from pnv_ros.place_map import remove_stale_spills
from pnv_ros.ros import params as P
from pnv_ros.ros.conversions import (
    array_to_image,
    compressed_to_array,
    image_to_array,
    ns_to_stamp,
    relative_pose_msg,
    stamp_to_ns,
)
from pnv_ros.ros.viz import Thumbnails, clear_markers, loop_marker, match_picture
from pnv_ros.ros.worker import LatestWinsWorker
from pnv_ros.srv import MapCommand, QueryPlace, VerifyPair

#: Diagnostics look back this far (s) for rising bad, dropped or skipped frames.
DIAG_WINDOW_S = 10.0
#: Statuses of frames the worker took (not dropped), for the diagnostics window.
TAKEN = ("keyframe", "error", "duplicate", "out_of_order", "too_soon", "no_motion", "no_information",
         "no_visual_change", "map_changed")  # fmt: skip
#: Warn when no image has arrived for this long (s): a wrong topic or incompatible QoS.
NO_INPUT_WARN_S = 5.0


def qos(kind: str, depth: int) -> QoSProfile:
    """A QoS profile from a parameter choice (see pnv_ros.ros.params.QOS_CHOICES)."""
    base = {"sensor_data": qos_profile_sensor_data, "system_default": qos_profile_system_default}.get(kind)
    q = QoSProfile(depth=depth)
    if base is not None:
        q.reliability, q.durability, q.history = base.reliability, base.durability, base.history
    if kind == "reliable":
        q.reliability = QoSReliabilityPolicy.RELIABLE
    elif kind == "best_effort":
        q.reliability = QoSReliabilityPolicy.BEST_EFFORT
    return q


def _descriptor(p: P.Param) -> ParameterDescriptor:
    text = p.description + (f" (one of {', '.join(repr(c) for c in p.choices)})" if p.choices else "")
    # Float parameters take integers too (YAML's `exclude_recent_s: 30`, `-p min_score:=1`): typed by
    # P.check, converted by _value.
    d = ParameterDescriptor(description=text, read_only=p.read_only, dynamic_typing=isinstance(p.default, float))
    if p.range is not None and not isinstance(p.default, bool):
        if isinstance(p.default, int):
            d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=1)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]), to_value=float(p.range[1]))]
    return d


class _StartedPool(ThreadPoolExecutor):
    """A thread pool whose :meth:`submit` returns once the callable has started on a pool thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[no-untyped-def, override]
        started = threading.Event()

        def run():  # type: ignore[no-untyped-def]
            started.set()
            return fn(*args, **kwargs)

        future = super().submit(run)
        while not started.wait(0.05) and not future.done():  # done: cancelled by a shutdown
            pass
        return future


class Executor(MultiThreadedExecutor):
    """rclpy's MultiThreadedExecutor without its busy loop.

    rclpy 9.1 (ROS 2 Kilted) yields every callback that has not started yet on each turn of its spin
    loop, so while a callback waits in the thread pool queue the spin thread turns without waiting and
    holds the GIL (ros2/rclpy#1452; fixed upstream by ros2/rclpy#1547, after that release). Measured here
    (``benchmarks/node_load.py``): the node idle but for 100 Hz odometry burned a whole core. Submitting
    each callback and returning only once it runs keeps the upstream loop and removes the spin.
    """

    def __init__(self, num_threads: int, *, context: rclpy.context.Context | None = None) -> None:
        super().__init__(num_threads=num_threads, context=context)
        self._executor.shutdown(wait=False)
        self._executor = _StartedPool(num_threads)


class _Odometry:
    """Recent odometry poses (a fixed ring), looked up by nearest stamp; thread-safe.

    A frame can reach the worker before the odometry of its own instant (the two topics are separate
    queues; a loaded machine serves them late): :meth:`at` then waits, at most the tolerance in wall
    time, for a pose at or after the frame's stamp, rather than take the pose from before the robot moved.
    """

    def __init__(self, capacity: int = 5000) -> None:
        self._cond = threading.Condition()
        self._stamps = np.zeros(capacity, np.int64)
        self._poses = np.zeros((capacity, 7))
        self._n = self._head = 0
        self.frame_id = ""

    def __len__(self) -> int:
        return self._n

    def _newest(self) -> int | None:
        return int(self._stamps[(self._head - 1) % len(self._stamps)]) if self._n else None

    #: a stamp this far (ns) behind the newest is a clock that went back (a restart, a bag loop): the older poses
    #: no longer apply; less behind, it is one late message (two publishers, a reordering link) and is dropped
    CLOCK_RESET_NS = 10**9

    def add(self, stamp_ns: int, pose: np.ndarray, frame_id: str) -> bool:
        """Store a pose; False (not stored) for one older than the newest by less than CLOCK_RESET_NS."""
        with self._cond:
            last = self._newest()
            if last is not None and stamp_ns < last:
                if last - stamp_ns < self.CLOCK_RESET_NS:
                    return False
                self._n = self._head = 0
            self._stamps[self._head], self._poses[self._head] = stamp_ns, pose
            self._head = (self._head + 1) % len(self._stamps)
            self._n = min(self._n + 1, len(self._stamps))
            self.frame_id = frame_id
            self._cond.notify_all()
        return True

    def at(self, stamp_ns: int, tolerance_ns: int) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """(position (3,), quaternion xyzw (4,)) nearest the stamp within tolerance, or (None, None).

        When the newest pose is older than the stamp by at most the tolerance (odometry flowing, this
        instant's pose not yet here), waits up to the tolerance (wall seconds) for a newer one; odometry
        that stopped longer ago than the tolerance is not waited for.
        """
        with self._cond:
            self._cond.wait_for(lambda: (n := self._newest()) is None or not 0 < stamp_ns - n <= tolerance_ns,
                                timeout=tolerance_ns / 1e9)  # fmt: skip
            if not self._n:
                return None, None
            d = np.abs(self._stamps[: self._n] - stamp_ns)
            i = int(np.argmin(d))
            if d[i] > tolerance_ns:
                return None, None
            pose = self._poses[i].copy()
        return pose[:3], pose[3:]


class LoopClosureNode(Node):
    def __init__(self) -> None:
        super().__init__("loop_closure")
        for p in P.TABLE:
            self.declare_parameter(p.name, p.default, _descriptor(p))
        g = self._value
        for p in P.TABLE:  # a bad value from a params file or the command line stops the start with a reason
            P.check(p.name, g(p.name))
        self.add_on_set_parameters_callback(self._on_set)

        preset = load_preset(g("preset"), g("config_file") or None)
        ckpt = resolve_checkpoint(g("checkpoint") or None, announce=self.get_logger().info)
        if g("vocabulary_images"):
            ckpt = self._refit_vocabulary(ckpt)
        device = g("device") or None
        model, info = load_checkpoint(ckpt, device=device or "cpu")
        self.detector = LoopClosureDetector(
            FeatureExtractor(
                model,
                info,
                preset,
                device=device,
                bf16=g("bfloat16"),
                engine=g("engine"),
                precision=g("precision") or None,
                engine_file=g("engine_file") or None,
                log=self.get_logger().info,
            ),
            P.detector_params({n: g(n) for n in P.DETECTOR_NAMES}),
            index_kind=g("index_kind"),
            patch_dtype=g("patch_dtype"),
            memory_budget_mb=g("memory_budget_mb"),
        )
        self.map_dir = Path(g("map_dir"))
        self.log = self.get_logger()
        self.stats = {"bad": 0, "qos_incompatible": 0, "service_errors": 0}
        self._stats_lock = threading.Lock()
        self.latency: dict[str, deque] = {k: deque(maxlen=100) for k in ("extract", "commit", "total")}
        self._events: deque[tuple[float, str]] = deque(maxlen=10000)  # (time, kind) for the diagnostics window
        self._last_input = None  # monotonic time of the last image
        self._camera_frame = ""  # frame_id of the last image: the relative poses' frames
        self._warned_info = False
        self._started = time.monotonic()
        # camera_info's camera matrix and the (width, height) it is for (None if not given), set together
        self._camera: tuple[np.ndarray, tuple[int, int] | None] | None = None
        self._warned_size: tuple[int, int] | None = None
        self._odom = _Odometry()
        self._thumbs = Thumbnails(g("thumbnail_cache"))
        self._marker_id = 0
        self._jump_logged_for = -1
        self._last_error = ""

        sensors = MutuallyExclusiveCallbackGroup()
        services = ReentrantCallbackGroup()
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos)
        self.image_topic = "image/compressed" if g("compressed") else "image"
        self.create_subscription(CompressedImage if g("compressed") else Image, self.image_topic, self._worker_offer,
                                 qos(g("image_qos"), g("image_qos_depth")), callback_group=sensors,
                                 event_callbacks=events)  # fmt: skip
        self.create_subscription(CameraInfo, "camera_info", self._on_info,
                                 qos(g("camera_info_qos"), g("camera_info_qos_depth")), callback_group=sensors,
                                 event_callbacks=events)  # fmt: skip
        self.create_subscription(Odometry, "odom", self._on_odom, qos(g("odom_qos"), g("odom_qos_depth")),
                                 callback_group=MutuallyExclusiveCallbackGroup(), event_callbacks=events)  # fmt: skip
        self.pub_loop = self.create_publisher(LoopClosureMsg, "loop_closures", 10)
        self.pub_kf = self.create_publisher(KeyframeMsg, "~/keyframes", 10)
        # One acknowledgement per frame taken from the slot (stamp = the frame's; frame_id =
        # keyframe | the skip reason | dropped | error): lets replays run in lockstep.
        self.pub_done = self.create_publisher(Header, "~/processed", 100)
        self.pub_img = self.create_publisher(Image, "~/match_image", 2)
        self.pub_markers = self.create_publisher(MarkerArray, "~/loop_markers", 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 5)
        for name, srv, fn in (("query_place", QueryPlace, self._query), ("verify_pair", VerifyPair, self._verify),
                              ("save_map", MapCommand, self._srv_save), ("load_map", MapCommand, self._srv_load),
                              ("reset_map", MapCommand, self._srv_reset)):  # fmt: skip
            self.create_service(srv, f"~/{name}", self._service(name, fn), callback_group=services)
        # Diagnostics on the steady clock: with use_sim_time and no /clock they still come.
        self.create_timer(1.0, self._publish_diagnostics, callback_group=services,
                          clock=Clock(clock_type=ClockType.STEADY_TIME))  # fmt: skip
        self._check_map_dir()
        self._remove_stale_temp_maps()
        for d in remove_stale_spills():
            self.log.info(f"removed {d}, the patch spill of a map store whose process is gone")
        self._unloadable: str | None = None  # a map file of map_dir that failed to load at start: kept as it is
        if g("load_map"):
            ok, msg, _ = self._load(g("load_map"))
            (self.log.info if ok else self.log.error)(msg)
            if not ok and self._exists(g("load_map")):
                self._unloadable = P.map_file_name(g("load_map"))
                self.log.error(f"the map runs empty; {self._unloadable} is kept as it is: save_map_on_shutdown "
                               "will not replace it (it saves beside it)")  # fmt: skip
        self.worker = LatestWinsWorker(self._handle, self._on_frame_error, self._on_drop, lambda: g("max_rate_hz"))
        self.worker.start()
        self.log.info(
            f"loop_closure ready: preset {preset.name}, model {info.identity}, {self.image_topic} "
            f"({g('image_qos')}, depth {g('image_qos_depth')})"
            + (", bfloat16 backbone" if g("bfloat16") else "")
            + (f", backbone on {self._backbone_text()}" if g("engine") != "torch" else "")
        )

    def _backbone_text(self) -> str:
        ex = self.detector.extractor
        return ex.backend.describe() if ex.backend is not None else f"torch {ex.precision}"

    def _refit_vocabulary(self, ckpt: Path) -> Path:
        """The checkpoint with its vocabulary refitted on vocabulary_images (cached: once per model and files)."""
        from pnv_ros.model.refit import refit_cached

        log = self.get_logger()
        r = refit_cached(ckpt, self._value("vocabulary_images"), topic=self._value("vocabulary_topic") or None,
                         bit_depth=self._value("bit_depth") or None, log=log.info)  # fmt: skip
        log.info(f"vocabulary {'refitted' if r.refitted else 'from the cache'} in {r.seconds:.1f} s: "
                 f"{Path(ckpt).name} on {r.describe()}")  # fmt: skip
        return r.path

    def _value(self, name: str):  # type: ignore[no-untyped-def]
        v = self.get_parameter(name).value
        return float(v) if isinstance(P.BY_NAME[name].default, float) else v

    # -- parameters ---------------------------------------------------------------------------
    def _on_set(self, params) -> SetParametersResult:  # type: ignore[no-untyped-def]
        changes = {p.name: p.value for p in params}
        try:
            for k, v in changes.items():
                P.check(k, v)
            if hasattr(self, "detector") and set(changes) & set(P.DETECTOR_NAMES):
                self.detector.params = P.detector_params(changes, self.detector.params)
        except PnvError as e:
            return SetParametersResult(successful=False, reason=str(e))
        if "thumbnail_cache" in changes and hasattr(self, "_thumbs"):
            self._thumbs.capacity = int(changes["thumbnail_cache"])
        return SetParametersResult(successful=True)

    # -- inputs ------------------------------------------------------------------------------
    def _worker_offer(self, msg) -> None:  # type: ignore[no-untyped-def]
        self._last_input = time.monotonic()
        self._camera_frame = msg.header.frame_id
        self.worker.offer(msg)

    def _on_drop(self, msg) -> None:  # type: ignore[no-untyped-def]
        self._event("dropped")
        self._ack(msg.header.stamp, "dropped")

    def _on_incompatible_qos(self, event) -> None:  # type: ignore[no-untyped-def]
        self._count("qos_incompatible")
        self._event("qos_incompatible")
        self.log.error(
            f"a publisher's QoS is incompatible with this node's subscription (policy {event.last_policy_kind}): "
            "no messages will arrive; set image_qos / camera_info_qos / odom_qos to match the publisher"
        )

    def _on_info(self, msg: CameraInfo) -> None:
        # The rectified camera P (left 3 x 3), as image_proc and RTAB-Map read it: the node takes rectified images;
        # K when P is empty (a camera_info with K alone, a camera without distortion).
        p = np.array(msg.p, dtype=np.float64).reshape(3, 4)[:, :3]
        k = p if _is_camera_matrix(p) else np.array(msg.k, np.float64).reshape(3, 3)
        ok = _is_camera_matrix(k)
        if not ok:
            self._event("bad_camera_info")
            if self._camera is not None or not self._warned_info:
                self.log.warning(f"camera_info ignored: {k.ravel().tolist()} (P, or K when P is empty) is not a "
                                 "camera matrix (finite, fx, fy > 0, last row 0 0 1); loops go without a relative "
                                 "pose")  # fmt: skip
                self._warned_info = True
        self._camera = (k, (int(msg.width), int(msg.height)) if msg.width and msg.height else None) if ok else None

    def _on_odom(self, msg: Odometry) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        pose = np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w])
        if not np.isfinite(pose).all() or not np.linalg.norm(pose[3:]) > 0:
            self._event("bad_odom")
            return
        if not self._odom.add(stamp_to_ns(msg.header.stamp), pose, msg.header.frame_id):
            self._event("late_odom")

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _event(self, kind: str) -> None:
        self._events.append((time.monotonic(), kind))

    # -- the worker --------------------------------------------------------------------------
    def _handle(self, msg) -> None:  # type: ignore[no-untyped-def]
        status = self._process(msg)
        self._event(status)
        self._ack(msg.header.stamp, status)

    def _ack(self, stamp, status: str) -> None:  # type: ignore[no-untyped-def]
        try:
            self.pub_done.publish(Header(stamp=stamp, frame_id=status))
        except Exception:  # noqa: BLE001 - ROS already shut down under this frame
            pass

    def _on_frame_error(self, msg, e: BaseException, tb: str) -> None:  # type: ignore[no-untyped-def]
        self._count("bad")
        self._event("error")
        st = msg.header.stamp
        if isinstance(e, PnvError):
            self._last_error = str(e)
            self.log.warning(f"frame at {st.sec}.{st.nanosec:09d} skipped: {e}")
        else:
            self._last_error = f"{type(e).__name__}: {e}"
            self.log.error(f"frame at {st.sec}.{st.nanosec:09d} skipped: {type(e).__name__}: {e}\n{tb}")
        self._ack(st, "error")

    def _process(self, msg) -> str:  # type: ignore[no-untyped-def]
        """One frame; returns its status ('keyframe' or the reason it was skipped)."""
        stamp = stamp_to_ns(msg.header.stamp)
        pos, ori = self._odom.at(stamp, int(self._value("odom_tolerance_s") * 1e9))
        if pos is None and len(self._odom):  # odometry flows but not at this instant: keyframes by sight alone
            self._event("odom_unmatched")
        adm = self.detector.admit(stamp, pos, ori)
        if adm.time_jump:
            self._log_jump(adm)
        if not adm.extract:
            return adm.status
        arr = _decode(msg, self._value("bit_depth") or None)
        adm = self.detector.look(adm, arr)
        if not adm.extract:
            return adm.status
        t0 = time.perf_counter()
        feats = self.detector.extractor.extract_one(arr)  # outside the detector's lock
        t_extract = time.perf_counter() - t0
        res = self.detector.commit(adm, feats, self._camera_matrix((int(arr.shape[1]), int(arr.shape[0]))))
        if res.keyframe_id is None:
            return res.status
        self.latency["extract"].append(t_extract)
        self.latency["commit"].append(res.timings["commit"])
        self.latency["total"].append(t_extract + res.timings["commit"])
        gen = adm.generation
        self._thumbs.put(gen, res.keyframe_id, arr)
        self.pub_kf.publish(KeyframeMsg(header=msg.header, id=res.keyframe_id, map_keyframes=res.keyframe_id + 1))
        if res.loop is not None:
            self._publish_loop(msg, res.loop, feats.image_size, gen, pos)
        return "keyframe"

    def _camera_matrix(self, *sizes: tuple[int, int]) -> np.ndarray | None:
        """camera_info's camera matrix when it is for every image size given ((width, height) each); None (loops
        go without a relative pose) when camera_info describes another size (a full-resolution camera_info
        beside a resized or binned image)."""
        cam = self._camera  # one read: the matrix and its size together
        if cam is None:
            return None
        k, size = cam
        other = next((im for im in sizes if size is not None and tuple(im) != size), None)
        if other is None:
            return k
        self._event("camera_info_size")
        if self._warned_size != size:
            self._warned_size = size
            self.log.warning(f"camera_info is for {size[0]} x {size[1]} images but the image is {other[0]} x "
                             f"{other[1]}: loops go without a relative pose until they agree")  # fmt: skip
        return None

    def _log_jump(self, adm: Admission) -> None:
        self._event("time_jump")
        jumps = self.detector.counts["time_jumps"]
        if jumps != self._jump_logged_for:
            self._jump_logged_for = jumps
            self.log.warning(
                f"time went back: frame stamped {adm.stamp_ns / 1e9:.3f} s after newer frames (clock reset, "
                f"use_sim_time restart or a looping bag); a new session segment starts (time jump {jumps})"
            )

    def _publish_loop(self, msg, lc, query_size, gen: int, pos) -> None:  # type: ignore[no-untyped-def]
        frame = msg.header.frame_id
        out = LoopClosureMsg(header=msg.header, query_id=lc.query_id, match_id=lc.match_id, method=lc.method,
                             query_stamp=ns_to_stamp(lc.query_stamp_ns), match_stamp=ns_to_stamp(lc.match_stamp_ns),
                             match_from_loaded_map=lc.match_from_loaded_map,
                             score=float(lc.score), global_distance=float(lc.global_distance),
                             patch_size=lc.patch_size, num_matches=lc.num_matches, num_inliers=lc.num_inliers,
                             relative_pose=relative_pose_msg(lc.relative_pose, frame, frame))  # fmt: skip
        self.pub_loop.publish(out)
        self.log.info(f"loop: keyframe {lc.query_id} -> {lc.match_id}, score {lc.score:.3f}")
        if self.pub_img.get_subscription_count() > 0:
            with self.detector.lock:
                match_size = self.detector.map.image_size(lc.match_id)
            pic = match_picture(self._thumbs, gen, lc, self.detector.preset, query_size, match_size)
            if pic is not None:
                self.pub_img.publish(array_to_image(pic, msg.header))
        with self.detector.lock:
            pm = self.detector.map.positions[lc.match_id] if lc.match_id < len(self.detector.map) else None
        if pos is not None and pm is not None and np.isfinite(pm).all():
            self._marker_id += 1
            self.pub_markers.publish(loop_marker(self._marker_id, self._odom.frame_id, pos, pm, msg.header.stamp))

    # -- diagnostics -------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        recent: dict[str, int] = {}
        for t, kind in list(self._events):
            if now - t <= DIAG_WINDOW_S:
                recent[kind] = recent.get(kind, 0) + 1
        det = self.detector.stats()
        w = self.worker.snapshot()
        level, problems = DiagnosticStatus.OK, []

        def flag(lvl: bytes, text: str) -> None:
            nonlocal level
            level = max(level, lvl)
            problems.append(text)

        if det["store_trouble"]:
            flag(DiagnosticStatus.ERROR, f"map store: {det['store_trouble']}")
        if self._unloadable is not None:
            flag(DiagnosticStatus.ERROR, f"load_map: {self._unloadable} failed to load at start (see the log); "
                                         "the map started empty")  # fmt: skip
        if recent.get("qos_incompatible"):
            flag(DiagnosticStatus.ERROR, "incompatible QoS: no messages arrive (see the log)")
        taken = sum(recent.get(k, 0) for k in TAKEN)
        if recent.get("error"):
            flag(DiagnosticStatus.ERROR if recent["error"] == taken else DiagnosticStatus.WARN,
                 f"{recent['error']} bad frames in {DIAG_WINDOW_S:.0f} s: {self._last_error}")  # fmt: skip
        if recent.get("duplicate") and recent["duplicate"] == taken:
            flag(
                DiagnosticStatus.ERROR,
                "every frame repeats the previous stamp: does the camera driver stamp its images?",
            )
        elif recent.get("time_jump") or recent.get("out_of_order") or recent.get("duplicate"):
            flag(DiagnosticStatus.WARN, "stamps out of order, repeated or jumping back (see time_jumps)")
        for kind, text in (("bad_odom", "odometry with NaN or a zero quaternion ignored"),
                           ("bad_camera_info", "camera_info that is not a camera matrix ignored"),
                           ("camera_info_size", "frames not of camera_info's size (no relative pose)"),
                           ("late_odom", "odometry older than the newest dropped (two publishers?)"),
                           ("odom_unmatched", "frames without odometry within odom_tolerance_s of their stamp "
                                              "(odometry stopped, or stamped on another clock?)")):  # fmt: skip
            if recent.get(kind):
                flag(DiagnosticStatus.WARN, f"{recent[kind]} x {text}")
        if recent.get("dropped", 0) > 20 * max(1, taken):
            flag(DiagnosticStatus.WARN, "most frames are dropped: consider max_rate_hz or a lighter preset")
        last = self._last_input
        if (last is None and now - self._started > NO_INPUT_WARN_S) or (
            last is not None and now - last > NO_INPUT_WARN_S
        ):
            flag(DiagnosticStatus.WARN, f"no image on {self.resolve_topic_name(self.image_topic)} for "
                                        f"{NO_INPUT_WARN_S:.0f} s (topic, QoS?)")  # fmt: skip
        st = DiagnosticStatus(level=level, name="pnv_ros: loop_closure", hardware_id="pnv_ros")
        st.message = "; ".join(problems) or f"{det['map_keyframes']} keyframes, {det['loops']} loops"
        vals = {**{k: str(v) for k, v in det.items()}, **{f"worker_{k}": str(v) for k, v in w.items()},
                **{k: str(v) for k, v in self.stats.items()},
                **{f"recent_{k}": str(v) for k, v in recent.items()}}  # fmt: skip
        for k, d in self.latency.items():
            if d:
                vals[f"latency_{k}_p50_ms"] = f"{1000 * float(np.median(d)):.1f}"
                vals[f"latency_{k}_max_ms"] = f"{1000 * float(np.max(d)):.1f}"
        try:
            import resource

            vals["max_rss_mb"] = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
        except ImportError:  # pragma: no cover
            pass
        st.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(arr)

    # -- services: translate messages, nothing else -------------------------------------------
    def _service(self, name: str, fn):  # type: ignore[no-untyped-def]
        def handler(req, resp):  # type: ignore[no-untyped-def]
            try:
                fn(req, resp)
                resp.success = True
            except PnvError as e:
                resp.success, resp.message = False, str(e)
            except Exception as e:  # noqa: BLE001 - a request never stops the node
                import traceback

                self._count("service_errors")
                self.log.error(f"{name} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                resp.success, resp.message = False, f"{name} failed: {type(e).__name__}: {e}"
            if hasattr(resp, "keyframes"):
                resp.keyframes = len(self.detector.map)
            return resp

        return handler

    def _query(self, req, resp) -> None:  # type: ignore[no-untyped-def]
        det, high = self.detector, DetectorParams.RANGES["top_n"][1]
        if req.top_n > high:  # the whole map re-ranked under the detector's lock would stall keyframes meanwhile
            raise PnvError(f"top_n {req.top_n} is above {high} (the top_n parameter's range); 0 = the parameter")
        if req.mode == QueryPlace.Request.BY_IMAGE:
            rgb = image_to_array(req.image, bit_depth=self._value("bit_depth") or None)
            t, least = texture(rgb), det.params.min_texture
            if t < least:  # no information: its candidates would be noise (two blank frames score 0.22)
                raise PnvError(
                    f"the image has no information (texture {t:.1f} < min_texture {least:g} grey levels: "
                    f"a lens cap, darkness or a white-out); it is never a keyframe and is not queried"
                )
            feats, exclude = det.extractor.extract_one(rgb), None
        elif req.mode in (QueryPlace.Request.BY_ID, QueryPlace.Request.BY_STAMP):
            with det.lock:
                kf = det.map.get(req.keyframe_id) if req.mode == QueryPlace.Request.BY_ID else \
                    det.map.by_stamp(stamp_to_ns(req.stamp))  # fmt: skip
                feats, exclude = det.features_of(kf.id), kf.id
        else:
            raise PnvError(f"unknown mode {req.mode}: use BY_ID (0), BY_STAMP (1) or BY_IMAGE (2)")
        cands = det.query(feats, req.top_n or None, req.matcher or None, exclude)
        resp.ids = [c.id for c in cands]
        resp.stamps = [ns_to_stamp(c.stamp_ns) for c in cands]
        resp.scores = [float(c.score) for c in cands]
        resp.global_distances = [float(c.global_distance) for c in cands]
        resp.message = f"{len(cands)} candidates"

    def _verify(self, req, resp) -> None:  # type: ignore[no-untyped-def]
        det = self.detector
        if req.id_a == req.id_b:
            raise PnvError(f"id_a and id_b are both {req.id_a}: give two different keyframes")
        a, b = det.features_of(req.id_a), det.features_of(req.id_b)
        score, nm, ni, pose = det.verify(a, b, req.matcher or None, self._camera_matrix(a.image_size, b.image_size))
        resp.score, resp.num_matches, resp.num_inliers = score, nm, ni
        resp.relative_pose = relative_pose_msg(pose, self._camera_frame, self._camera_frame)
        resp.message = "ok"

    def _check_map_dir(self) -> None:
        """Say at start, not at the first save, when map_dir cannot take maps."""
        try:
            self.map_dir.mkdir(parents=True, exist_ok=True)
            ok = os.access(self.map_dir, os.W_OK)
        except OSError:
            ok = False
        if not ok:
            self.log.warning(f"map_dir {self.map_dir} cannot be written: save_map will fail until it can")

    def _remove_stale_temp_maps(self, older_than_s: float = 600.0) -> None:
        """Temp files of saves that a crash (kill -9, power loss) cut short: never a map, only disk."""
        for tmp in self.map_dir.glob(".*.npz.*.tmp") if self.map_dir.is_dir() else []:
            try:
                if time.time() - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    self.log.info(f"removed {tmp.name}, left by a save that did not finish")
            except OSError:
                pass

    def _map_path(self, name: str) -> Path:
        return self.map_dir / P.map_file_name(name)

    def _exists(self, name: str) -> bool:
        try:
            return self._map_path(name).is_file()
        except (PnvError, OSError):
            return False

    def _save(self, name: str) -> tuple[bool, str, int]:
        try:
            path = self._map_path(name)
            n = self.detector.save_map(path)
            if self._unloadable == path.name:  # replaced on purpose (save_map): that file is this run's map now
                self._unloadable = None
            return True, f"saved {n} keyframes to {path}", n
        except (PnvError, OSError) as e:
            return False, f"save failed: {e}", len(self.detector.map)

    def _load(self, name: str) -> tuple[bool, str, int]:
        try:
            path = self._map_path(name)
            n = self.detector.load_map(path)
            if self._unloadable == path.name:  # loaded after all (the file or the model fixed): saves go to it again
                self._unloadable = None
            self.pub_markers.publish(clear_markers(self._odom.frame_id, self.get_clock().now().to_msg()))
            return True, f"loaded {n} keyframes from {path}", n
        except PnvError as e:
            return False, str(e), len(self.detector.map)

    def _srv_save(self, req, resp) -> None:  # type: ignore[no-untyped-def]
        ok, resp.message, _ = self._save(req.name)
        if not ok:
            raise PnvError(resp.message)

    def _srv_load(self, req, resp) -> None:  # type: ignore[no-untyped-def]
        ok, resp.message, _ = self._load(req.name)
        if not ok:
            raise PnvError(resp.message)

    def _srv_reset(self, req, resp) -> None:  # type: ignore[no-untyped-def]
        self.detector.reset()
        self.pub_markers.publish(clear_markers(self._odom.frame_id, self.get_clock().now().to_msg()))
        resp.message = "map reset"

    def shutdown(self) -> None:
        if not self.worker.stop(timeout=30):
            self.log.warning("the worker did not finish its frame within 30 s")
        name = self._value("save_map_on_shutdown")
        if name and self._unloadable is not None and P.map_file_name(name) == self._unloadable:
            # The file holds a map this run could not load (another model, a damaged file): replacing it with
            # this run's map would lose it. The run's map goes beside it.
            # map names are at most 100 characters (params.map_file_name): room for the 25 added
            name = f"{name.removesuffix('.npz')[:75]}_unsaved_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            self.log.error(f"not replacing {self._unloadable}, which failed to load at start; this run's map is "
                           f"saved as {P.map_file_name(name)} instead")  # fmt: skip
        if name:
            ok, msg, _ = self._save(name)
            (self.log.info if ok else self.log.error)(msg)


try:  # on robots: cv_bridge widens the accepted encodings (bayer, yuv, ...)
    from cv_bridge import CvBridge

    _BRIDGE = CvBridge()
except Exception:  # noqa: BLE001 - absent here, or the ROS 1 PyPI build that breaks on numpy 2
    _BRIDGE = None


def _is_camera_matrix(m: np.ndarray) -> bool:
    """A 3 x 3 pinhole camera matrix: finite, fx and fy > 0, last row 0 0 1."""
    return bool(np.isfinite(m).all() and m[0, 0] > 0 and m[1, 1] > 0 and abs(m[2, 2] - 1.0) < 1e-6
                and not m[2, :2].any())  # fmt: skip


def _decode(msg, bit_depth: int | None = None) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Our checked decoding first (clear errors; the package's one decoder and bit-depth rule);
    cv_bridge for other encodings where present."""
    if isinstance(msg, CompressedImage):
        return compressed_to_array(msg, bit_depth=bit_depth)
    try:
        return image_to_array(msg, bit_depth=bit_depth)
    except ImageError as e:
        if _BRIDGE is None or "unsupported image encoding" not in str(e):
            raise
        try:
            return np.asarray(_BRIDGE.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
        except Exception as e2:  # noqa: BLE001
            raise ImageError(f"{e}; cv_bridge could not convert it either: {e2}") from None


def main(argv: list[str] | None = None) -> int:
    """Run the node until SIGINT or SIGTERM; then finish the frame in hand (published), save the map if
    asked, and exit 0. ROS is shut down only after that, and further signals during the shutdown (a second
    Ctrl-C, launch's SIGTERM after SIGINT) do not cut it short."""
    import signal

    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    node, ex = None, None
    try:
        node = LoopClosureNode()
        ex = Executor(num_threads=4)
        ex.add_node(node)
        spinner = threading.Thread(target=ex.spin, name="pnv-executor", daemon=True)
        spinner.start()
        while not stop.wait(0.5) and spinner.is_alive():
            pass
    except PnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.shutdown()  # with ROS still up: the frame in hand is published, the map saved
        if ex is not None:
            ex.shutdown(timeout_sec=5)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
