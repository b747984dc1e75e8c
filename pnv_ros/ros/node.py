"""loop_closure_node: ROS plumbing around LoopClosureDetector, and nothing else.

Frames arrive on ``image`` (sensor_msgs/Image) or ``image/compressed``, by default with sensor-data QoS (best
effort, depth 1: what camera drivers publish; a best-effort subscription also hears reliable publishers). A
latest-wins worker (:mod:`~pnv_ros.ros.worker`) takes the newest frame and hands it, with the odometry pose
of its stamp, to the detector's one frame pipeline (:meth:`LoopClosureDetector.process`: admitted before
anything is decoded, extracted outside its lock). Accepted loops go to ``loop_closures``. Services only
translate messages: every failure is an answer with ``success: false`` and the reason (traceback in the
log), never a stopped node. What needs no rclpy lives beside it in ``pnv_ros.ros``: odometry, depth, diagnostics,
map_files, camera, params, startup; the executor in executor, the process in run. An optional ``depth``
image (:mod:`~pnv_ros.ros.depth`) makes loops' relative poses METRIC.
"""

from __future__ import annotations

import threading
import time
import traceback

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from pnv_ros.camera_model import CameraModel
from pnv_ros.config import DetectorParams
from pnv_ros.errors import PnvError
from pnv_ros.msg import Keyframe as KeyframeMsg
from pnv_ros.msg import LoopClosure
from pnv_ros.ros import conversions as C
from pnv_ros.ros import diagnostics as D
from pnv_ros.ros import params as P
from pnv_ros.ros.camera import CameraMatrix
from pnv_ros.ros.depth import DepthInput
from pnv_ros.ros.map_files import MapFiles
from pnv_ros.ros.odometry import OdometryBuffer, valid_pose
from pnv_ros.ros.profiles import descriptor, qos
from pnv_ros.ros.startup import close_fleet, detector_from_parameters, fleet_from_parameters, ready_message
from pnv_ros.ros.viz import Thumbnails, clear_markers, loop_marker, match_picture
from pnv_ros.ros.worker import LatestWinsWorker
from pnv_ros.srv import MapCommand, QueryPlace, VerifyPair


class LoopClosureNode(Node):
    """The ``loop_closure`` node: parameters, topics and services around one LoopClosureDetector."""

    def __init__(self) -> None:
        super().__init__("loop_closure")
        for p in P.TABLE:
            self.declare_parameter(p.name, p.default, descriptor(p))
        g = self._value
        for p in P.TABLE:  # a bad value from a params file or the command line stops the start with a reason
            P.check(p.name, g(p.name))
        self.log = self.get_logger()
        self.detector = detector_from_parameters(g, self.log.info)
        self.fleet = fleet_from_parameters(self.detector, g)  # None without fleet_dsn
        self.stats = {"bad": 0, "qos_incompatible": 0, "service_errors": 0}
        self._stats_lock = threading.Lock()
        self.latency = D.Latency()  # the last 100 keyframes' seconds per stage (D.STAGES)
        self._events = D.EventLog()  # (time, kind) for the diagnostics window
        self._last_input: float | None = None  # monotonic time of the last image
        self._camera_frame = ""  # frame_id of the last image: the relative poses' frames
        self._started = time.monotonic()
        self._camera = CameraMatrix()  # camera_info's
        self._depth = DepthInput()  # recent depth images, paired with frames by stamp
        self._odom = OdometryBuffer()
        self._thumbs = Thumbnails(g("thumbnail_cache"))
        self._marker_id = 0
        self._jumps_seen = 0  # the detector's time jumps already logged
        self._last_error = ""
        # Parameters change once the detector exists: checked in one callback, applied after they are set.
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        sensors = MutuallyExclusiveCallbackGroup()
        services = ReentrantCallbackGroup()
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos)
        self.image_topic = "image/compressed" if g("compressed") else "image"
        subs = {}
        for msg_type, topic, fn, name, group in (
            (CompressedImage if g("compressed") else Image, self.image_topic, self._worker_offer, "image", sensors),
            (CameraInfo, "camera_info", self._on_info, "camera_info", sensors),
            (Odometry, "odom", self._on_odom, "odom", MutuallyExclusiveCallbackGroup()),
            (Image, "depth", self._on_depth, "depth", MutuallyExclusiveCallbackGroup()),
        ):
            q = qos(g(f"{name}_qos"), g(f"{name}_qos_depth"))
            subs[name] = self.create_subscription(msg_type, topic, fn, q, callback_group=group, event_callbacks=events)
        self._odom_sub = subs["odom"]  # its publisher count: whether a frame waits for the first pose
        self.pub_loop = self.create_publisher(LoopClosure, "loop_closures", 10)
        self.pub_kf = self.create_publisher(KeyframeMsg, "~/keyframes", 10)
        # One acknowledgement per frame taken from the slot (stamp = the frame's; frame_id =
        # keyframe | the skip reason | dropped | error): lets replays run in lockstep.
        self.pub_done = self.create_publisher(Header, "~/processed", 100)
        self.pub_img = self.create_publisher(Image, "~/match_image", 2)
        self.pub_markers = self.create_publisher(MarkerArray, "~/loop_markers", 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 5)
        for name, srv, fn in (
            ("query_place", QueryPlace, self._query),
            ("verify_pair", VerifyPair, self._verify),
            ("save_map", MapCommand, self._map_command("save")),
            ("load_map", MapCommand, self._map_command("load")),
            ("reset_map", MapCommand, self._srv_reset),
        ):
            self.create_service(srv, f"~/{name}", self._service(name, fn), callback_group=services)
        # Diagnostics on the steady clock: with use_sim_time and no /clock they still come.
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=services, clock=steady)
        self.maps = MapFiles(g("map_dir"), self.detector, self.log, on_load=self._clear_markers)
        self.maps.check_writable()
        self.maps.remove_left_overs()
        if g("load_map"):
            self.maps.load_at_start(g("load_map"))
        self.worker = LatestWinsWorker(self._handle, self._on_frame_error, self._on_drop, lambda: g("max_rate_hz"))
        self.worker.start()
        self.log.info(ready_message(self.detector, g, self.image_topic))

    def _value(self, name: str):
        v = self.get_parameter(name).value
        return float(v) if isinstance(P.BY_NAME[name].default, float) else v

    # -- parameters ---------------------------------------------------------------------------
    def _check_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Refuse the whole change when one value is out of its range or choices (or the detector's rules)."""
        changes = {p.name: p.value for p in params}
        try:
            for k, v in changes.items():
                P.check(k, v)
            P.detector_params(changes, self.detector.params)
        except PnvError as e:
            return SetParametersResult(successful=False, reason=str(e))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        """Changes that were accepted (and set) take effect: the detector's and the thumbnail cache's."""
        changes = {p.name: p.value for p in params}
        if set(changes) & set(P.DETECTOR_NAMES):
            self.detector.params = P.detector_params(changes, self.detector.params)
        if "thumbnail_cache" in changes:
            self._thumbs.capacity = int(changes["thumbnail_cache"])

    # -- inputs ------------------------------------------------------------------------------
    def _worker_offer(self, msg: Image | CompressedImage) -> None:
        self._last_input = time.monotonic()
        self._camera_frame = msg.header.frame_id
        self._depth.pin(C.stamp_to_ns(msg.header.stamp))  # its depth outlives the ring while the frame waits
        self.worker.offer(msg)

    def _on_drop(self, msg: Image | CompressedImage) -> None:
        self._events.add("dropped")
        self._ack(msg.header.stamp, "dropped")

    def _on_incompatible_qos(self, event) -> None:
        self._count("qos_incompatible")
        self._events.add("qos_incompatible")
        self.log.error(
            f"a publisher's QoS is incompatible with this node's subscription (policy {event.last_policy_kind}): "
            "no messages will arrive; set image_qos / camera_info_qos / odom_qos / depth_qos to match the publisher"
        )

    def _on_info(self, msg: CameraInfo) -> None:
        rect = self._value("image_rectified")
        ok, warning = self._camera.update(msg.p, msg.k, msg.width, msg.height, msg.d, msg.distortion_model, rect)
        if not ok:
            self._events.add("bad_camera_info")
        if warning:
            self.log.warning(warning)

    def _on_odom(self, msg: Odometry) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        pose = (p.x, p.y, p.z, q.x, q.y, q.z, q.w)  # floats: numpy per message costs more than it saves
        if not valid_pose(pose):
            self._events.add("bad_odom")
        elif not self._odom.add(
            C.stamp_to_ns(msg.header.stamp), pose, msg.header.frame_id, msg.pose.covariance, msg.child_frame_id
        ):
            self._events.add("late_odom")

    def _on_depth(self, msg: Image) -> None:
        self._depth.add(C.stamp_to_ns(msg.header.stamp), msg)

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    # -- the worker --------------------------------------------------------------------------
    def _handle(self, msg: Image | CompressedImage) -> None:
        try:
            status = self._process(msg)
        finally:  # before the frame's own error, if any
            self._note_time_jump(msg)
        self._events.add(status)
        self._ack(msg.header.stamp, status)

    def _ack(self, stamp, status: str) -> None:
        try:
            self.pub_done.publish(Header(stamp=stamp, frame_id=status))
        except Exception:  # noqa: BLE001 - ROS already shut down under this frame
            pass

    def _on_frame_error(self, msg, e: BaseException, tb: str) -> None:
        self._count("bad")
        self._events.add("error")
        st, ours = msg.header.stamp, isinstance(e, PnvError)  # ours: a bad frame, said in a line; else a traceback
        self._last_error = str(e) if ours else f"{type(e).__name__}: {e}"
        text = f"frame at {st.sec}.{st.nanosec:09d} skipped: {self._last_error}"
        (self.log.warning if ours else self.log.error)(text if ours else f"{text}\n{tb}")
        self._ack(st, "error")

    def _process(self, msg: Image | CompressedImage) -> str:
        """One frame through the detector's pipeline; returns its status ('keyframe' or why it was skipped)."""
        stamp = C.stamp_to_ns(msg.header.stamp)
        tol, expected = int(self._value("odom_tolerance_s") * 1e9), self._odom_sub.get_publisher_count() > 0
        odom = self._odom.sample(stamp, tol, expected=expected)  # the keyframe carries it
        pos, ori = (None, None) if odom is None else (odom.position, odom.orientation)
        if pos is None and len(self._odom):  # odometry flows but not at this instant: keyframes by sight alone
            self._events.add("odom_unmatched")
        decoded: list[np.ndarray] = []  # the frame, once admitted and decoded: for the match pictures

        def decode(m: Image | CompressedImage) -> np.ndarray:
            decoded.append(C.frame_to_array(m, self._value("bit_depth") or None))
            return decoded[0]

        def depth() -> np.ndarray | None:  # called for an admitted frame, after decode
            tol = int(self._value("depth_tolerance_s") * 1e9)
            a = self._depth.for_frame(stamp, tol, decoded[0].shape, msg.header.frame_id)
            if a.skip:
                self._events.add(a.skip)
            if a.warning:
                self.log.warning(a.warning)
            return a.depth_m

        res = self.detector.process(msg, stamp, pos, self._camera_for, ori, decode=decode, depth=depth)
        if res.keyframe_id is None:
            return res.status
        self.latency.add(res.timings)
        arr = decoded[0]
        self._thumbs.put(res.generation, res.keyframe_id, arr)  # always: a late ~/match_image subscriber sees old loops
        self.pub_kf.publish(C.keyframe_msg(msg.header, res.keyframe_id, res.keyframe_id + 1, odom))
        if res.loop is not None:
            self._publish_loop(msg, res.loop, (int(arr.shape[1]), int(arr.shape[0])), res.generation, pos)
        return "keyframe"

    def _camera_for(self, *sizes) -> CameraModel | None:
        """camera_info's camera when it is for every image size given ((width, height) each, or one as two
        numbers), else None (loops go without a relative pose)."""
        sizes = ((sizes[0], sizes[1]),) if len(sizes) == 2 and np.isscalar(sizes[0]) else sizes
        cam, other_size, warning = self._camera.for_sizes(*sizes)
        if other_size:
            self._events.add("camera_info_size")
        if warning:
            self.log.warning(warning)
        return cam

    def _note_time_jump(self, msg: Image | CompressedImage) -> None:
        """Log once when this frame's stamp went back (counted by the detector): a new session segment."""
        jumps = self.detector.counts["time_jumps"]
        if jumps != self._jumps_seen:
            self._jumps_seen = jumps
            self._events.add("time_jump")
            self.log.warning(D.time_jump_warning(C.stamp_to_ns(msg.header.stamp), jumps))

    def _publish_loop(self, msg, lc, query_size, gen: int, pos) -> None:
        self.pub_loop.publish(C.loop_closure_msg(lc, msg.header))
        if lc.match_from_fleet:  # not in this map: no thumbnail, and its position is in another odometry frame
            where = f"robot {lc.match_robot_id} session {lc.match_session[:8]} keyframe {lc.match_seq}"
            self.log.info(f"loop: keyframe {lc.query_id} -> {where} (fleet), score {lc.score:.3f}")
            return
        self.log.info(f"loop: keyframe {lc.query_id} -> {lc.match_id}, score {lc.score:.3f}")
        if self.pub_img.get_subscription_count() > 0:
            with self.detector.lock:
                match_size = self.detector.map.image_size(lc.match_id)
            pic = match_picture(self._thumbs, gen, lc, self.detector.preset, query_size, match_size)
            if pic is not None:
                self.pub_img.publish(C.array_to_image(pic, msg.header))
        if pos is None or self.pub_markers.get_subscription_count() == 0:
            return
        with self.detector.lock:
            pm = self.detector.map.positions[lc.match_id] if lc.match_id < len(self.detector.map) else None
        if pm is not None and np.isfinite(pm).all():
            self._marker_id += 1
            self.pub_markers.publish(loop_marker(self._marker_id, self._odom.frame_id, pos, pm, msg.header.stamp))

    def _clear_markers(self) -> None:
        self.pub_markers.publish(clear_markers(self._odom.frame_id, self.get_clock().now().to_msg()))

    # -- diagnostics: the assessment is pnv_ros.ros.diagnostics'; here only the message ------------------
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        recent = self._events.recent(now)
        det = self.detector.stats()
        silent_s = now - (self._last_input if self._last_input is not None else self._started)
        a = D.assess(
            recent,
            silent_s=silent_s,
            image_topic=self.resolve_topic_name(self.image_topic),
            store_trouble=str(det["store_trouble"]),
            fleet=None if self.fleet is None else self.fleet.status()[:2],
            unloadable=self.maps.unloadable,
            last_error=self._last_error,
        )
        st = DiagnosticStatus(level=bytes([a.level]), name="pnv_ros: loop_closure", hardware_id="pnv_ros")
        st.message = "; ".join(a.problems) or f"{det['map_keyframes']} keyframes, {det['loops']} loops"
        counts = {**self.stats, **self._depth.counts}
        vals = D.report_values(det, self.worker.snapshot(), counts, recent, self.latency.snapshot())
        st.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(arr)

    # -- services: translate messages, nothing else -------------------------------------------
    def _service(self, name: str, fn):
        def handler(req, resp):
            try:
                fn(req, resp)
                resp.success = True
            except PnvError as e:
                resp.success, resp.message = False, str(e)
            except Exception as e:  # noqa: BLE001 - a request never stops the node
                self._count("service_errors")
                self.log.error(f"{name} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                resp.success, resp.message = False, f"{name} failed: {type(e).__name__}: {e}"
            if hasattr(resp, "keyframes"):
                resp.keyframes = len(self.detector.map)
            return resp

        return handler

    def _query(self, req, resp) -> None:
        det, high = self.detector, DetectorParams.RANGES["top_n"][1]
        top_n, matcher = req.top_n or None, req.matcher or None
        if req.top_n > high:  # the whole map re-ranked under the detector's lock would stall keyframes meanwhile
            raise PnvError(f"top_n {req.top_n} is above {high} (the top_n parameter's range); 0 = the parameter")
        if req.mode == QueryPlace.Request.BY_IMAGE:
            rgb = C.image_to_array(req.image, bit_depth=self._value("bit_depth") or None)
            cands = det.query_image(rgb, top_n, matcher)
        elif req.mode == QueryPlace.Request.BY_ID:
            cands = det.query_keyframe(req.keyframe_id, top_n=top_n, matcher=matcher)
        elif req.mode == QueryPlace.Request.BY_STAMP:
            cands = det.query_keyframe(stamp_ns=C.stamp_to_ns(req.stamp), top_n=top_n, matcher=matcher)
        else:
            raise PnvError(f"unknown mode {req.mode}: use BY_ID (0), BY_STAMP (1) or BY_IMAGE (2)")
        C.fill_candidates(resp, cands)

    def _verify(self, req, resp) -> None:
        det = self.detector
        if req.fleet_id_b > 0:  # another robot's keyframe (query_place's fleet_ids)
            if self.fleet is None:
                raise PnvError(f"fleet_id_b {req.fleet_id_b}: this node has no fleet (fleet_dsn is empty)")
            a, b = det.features_of(req.id_a), self.fleet.keyframe(req.fleet_id_b).features
        elif req.id_a == req.id_b:
            raise PnvError(f"id_a and id_b are both {req.id_a}: give two different keyframes")
        else:
            a, b = det.features_of(req.id_a), det.features_of(req.id_b)
        score, nm, ni, pose = det.verify(a, b, req.matcher or None, self._camera_for(a.image_size, b.image_size))
        resp.score, resp.num_matches, resp.num_inliers = score, nm, ni
        resp.relative_pose = C.relative_pose_msg(pose, self._camera_frame, self._camera_frame)
        resp.message = "ok"

    def _map_command(self, name: str):
        """save_map or load_map: MapFiles' answer, a failure as the service's."""

        def run(req, resp) -> None:
            ok, resp.message, _ = getattr(self.maps, name)(req.name)
            if not ok:
                raise PnvError(resp.message)

        return run

    def _srv_reset(self, req, resp) -> None:
        self.detector.reset()
        self._clear_markers()
        resp.message = "map reset"

    def shutdown(self) -> None:
        """Finish the frame in hand (published), then save the map if save_map_on_shutdown names one."""
        if not self.worker.stop(timeout=30):
            self.log.warning("the worker did not finish its frame within 30 s")
        if self.fleet is not None:  # uploads first: the saved map then records what is still unsent
            close_fleet(self.fleet, self.log.warning)
        self.maps.save_on_shutdown(self._value("save_map_on_shutdown"))


def main(argv: list[str] | None = None) -> int:
    """Run the node until SIGINT or SIGTERM, then exit in order (:func:`pnv_ros.ros.run.run`)."""
    from pnv_ros.ros.run import run

    return run(LoopClosureNode, argv)
