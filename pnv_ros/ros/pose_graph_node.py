"""pose_graph_node: the reference backend, ROS plumbing around :class:`pnv_ros.pose_graph.PoseGraph`.

Inputs: ``keyframes`` (pnv_ros/Keyframe, the loop-closure node's ``~/keyframes``), ``loop_closures``
(pnv_ros/LoopClosure) and ``odom`` (nav_msgs/Odometry: the base frame in the odometry frame). A keyframe of the
loop-closure node carries the odometry message it was paired with (``has_odometry``: pose, covariance, frames,
stamp): the node takes that, with no pairing of its own and so no race between two topics. A keyframe without
(a third-party source) takes the ``odom`` pose nearest its stamp within ``odom_tolerance_s`` once the odometry has
reached its stamp; until then it waits (at most ``odom_wait_s`` wall seconds), and the keyframes behind it wait in
order (the odometry factors chain consecutive keyframes). The pose is composed with the ``camera_extrinsic``
parameter into the camera's; a loop whose keyframes are not in the graph yet waits (at most :data:`MAX_PENDING`).
An odometry reset (the keyframe's odometry frame_id changed, or its odometry stamp went back) starts a new segment
(:meth:`PoseGraph.add_keyframe`'s ``new_segment``). Outputs after every change: ``~/path`` (nav_msgs/Path of the
optimised base poses in ``map_frame``, one per keyframe, stamped with its image's stamp), ``~/keyframe_poses`` (the
same for the camera optical frame: what a TUM ground truth describes), ``~/map_to_odom``
(geometry_msgs/TransformStamped) and the same transform on ``/tf`` (stamped with the newest odometry stamp, re-sent
at :data:`TF_RATE_HZ` as the odometry moves on, never twice with one stamp; tf2_msgs comes with every ROS 2 install,
and scripts/setup.sh builds vendor/tf2_msgs into the pip venv). Services ``~/save_map`` and ``~/load_map``
(pnv_ros/MapCommand) write and read ``<map_dir>/<name>.graph.npz``; after a load (at start with ``load_map``, or by
the service) the next keyframe starts a new segment (a new odometry frame: no odometry factor to the loaded
keyframes, a weak prior until a loop ties it to the map).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, TransformStamped
from nav_msgs.msg import Odometry
from nav_msgs.msg import Path as PathMsg
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile
from scipy.spatial.transform import Rotation

from pnv_ros.errors import PnvError
from pnv_ros.geometry import PoseType
from pnv_ros.msg import Keyframe as KeyframeMsg
from pnv_ros.msg import LoopClosure
from pnv_ros.pose_graph import LOOP_DIMS, Loop, PoseGraph, odometry_step_covariance, pose_matrix
from pnv_ros.ros import conversions as C
from pnv_ros.ros import pose_graph_params as G
from pnv_ros.ros.odometry import OdometryBuffer, OdometrySample, valid_pose
from pnv_ros.ros.params import map_file_name
from pnv_ros.ros.profiles import descriptor, qos
from pnv_ros.srv import MapCommand

try:  # every ROS 2 install has it; PyPI has no wheel of it (scripts/setup.sh builds vendor/tf2_msgs there)
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - depends on the install
    TFMessage = None

#: Loops kept while their keyframes have not arrived (the oldest dropped beyond): keyframes and loops come on
#: two topics, and a loop can overtake its query keyframe.
MAX_PENDING = 1000
#: How often map -> odom is re-sent on /tf (Hz), as SLAM nodes do (slam_toolbox: 50 Hz by default; 20 is enough
#: for a transform that changes only with a loop).
TF_RATE_HZ = 20.0


def loop_from_msg(msg: LoopClosure) -> Loop | None:
    """The graph's :class:`Loop` of a LoopClosure message; None when its relative pose is NONE.

    Raises:
        PnvError: a covariance whose size does not fit the pose's type.
    """
    rp = msg.relative_pose
    kind = PoseType(int(rp.type))
    if kind == PoseType.NONE:
        return None
    dim = LOOP_DIMS[kind]
    cov = np.asarray(rp.covariance, dtype=np.float64)
    if cov.size != dim * dim:
        raise PnvError(f"loop {msg.query_id}->{msg.match_id}: a {kind.name} pose with {cov.size} covariance values")
    q = rp.rotation
    rot = pose_matrix(np.zeros(3), [q.x, q.y, q.z, q.w])[:3, :3]
    vec = {
        PoseType.METRIC: [rp.translation.x, rp.translation.y, rp.translation.z],
        PoseType.ROTATION_AND_DIRECTION: [rp.direction.x, rp.direction.y, rp.direction.z],
        PoseType.ROTATION_ONLY: [0.0, 0.0, 0.0],
    }[kind]
    return Loop(int(msg.query_id), int(msg.match_id), kind, rot, np.array(vec), cov.reshape(dim, dim))


def _transform(parent: str, child: str, stamp, t: np.ndarray) -> TransformStamped:
    m = TransformStamped()
    m.header.frame_id, m.header.stamp, m.child_frame_id = parent, stamp, child
    m.transform.translation.x, m.transform.translation.y, m.transform.translation.z = (float(v) for v in t[:3, 3])
    x, y, z, w = Rotation.from_matrix(t[:3, :3]).as_quat()
    m.transform.rotation.x, m.transform.rotation.y, m.transform.rotation.z, m.transform.rotation.w = x, y, z, w
    return m


def _pose_stamped(frame: str, stamp_ns: int, t: np.ndarray) -> PoseStamped:
    m = PoseStamped()
    m.header.frame_id, m.header.stamp = frame, C.ns_to_stamp(stamp_ns)
    p, o = m.pose.position, m.pose.orientation
    p.x, p.y, p.z = (float(v) for v in t[:3, 3])
    o.x, o.y, o.z, o.w = (float(v) for v in Rotation.from_matrix(t[:3, :3]).as_quat())
    return m


class PoseGraphNode(Node):
    """The ``pose_graph`` node: parameters, topics and services around one :class:`PoseGraph`."""

    def __init__(self) -> None:
        super().__init__("pose_graph")
        for p in G.TABLE:
            self.declare_parameter(p.name, p.default, descriptor(p))
        for p in G.TABLE:  # a bad value stops the start with a reason
            G.check(p.name, self._value(p.name))
        self.log = self.get_logger()
        self.settings = G.settings(self._value)
        self.extrinsic = G.extrinsic(self._value("camera_extrinsic"))
        self.map_dir = Path(self._value("map_dir"))
        self.stats = {
            "keyframes_without_odometry": 0,
            "duplicate_keyframes": 0,
            "loops_without_pose": 0,
            "fleet_loops_ignored": 0,
        }
        self.stats.update({"bad_loops": 0, "pending_dropped": 0, "bad_odom": 0, "odometry_resets": 0})
        self.stats["rejected_loops"] = self.stats["id_restarts"] = self.stats["bad_keyframes"] = 0
        self._lock = threading.Lock()  # the graph and both queues
        self._pending: deque[tuple[Loop, int, int]] = deque(maxlen=MAX_PENDING)  # (loop, query / match stamp ns)
        self._tf_stamp: int | None = None  # the stamp (ns) of the last map -> odom sent
        self._offset = 0  # graph key = loop-closure node's keyframe id + offset (moved when its ids restart)
        self._key_by_stamp: dict[int, int] = {}  # image stamp (ns) -> graph key
        self._waiting: deque[tuple[KeyframeMsg, float]] = deque()  # keyframes in order, (msg, monotonic arrival)
        self._odom = OdometryBuffer(capacity=20000)
        self._odom_stamp = None  # the newest odometry stamp (builtin_interfaces/Time)
        self._last: OdometrySample | None = None  # the odometry of the newest keyframe in the graph
        self._last_stamp: int | None = None  # the newest keyframe's stamp (ns)
        self.graph = PoseGraph(self.settings)
        self._new_segment = False  # the next keyframe starts a segment: its odometry frame is not the graph's
        if self._value("load_map"):
            self._load(self._value("load_map"))

        inputs = MutuallyExclusiveCallbackGroup()  # keyframes and loops in order; odometry beside them
        q = qos(self._value("odom_qos"), self._value("odom_qos_depth"))
        self.create_subscription(Odometry, "odom", self._on_odom, q, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_subscription(KeyframeMsg, "keyframes", self._on_keyframe, 100, callback_group=inputs)
        self.create_subscription(LoopClosure, "loop_closures", self._on_loop, 100, callback_group=inputs)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)  # a late rviz gets the last one
        self.pub_path = self.create_publisher(PathMsg, "~/path", latched)
        self.pub_cam = self.create_publisher(PathMsg, "~/keyframe_poses", latched)
        self.pub_tf_stamped = self.create_publisher(TransformStamped, "~/map_to_odom", 10)
        self.pub_tf = self.create_publisher(TFMessage, "/tf", 100) if TFMessage is not None else None
        services = ReentrantCallbackGroup()
        for name, fn in (("save_map", self._srv_save), ("load_map", self._srv_load)):
            self.create_service(MapCommand, f"~/{name}", self._service(name, fn), callback_group=services)
        steady = Clock(clock_type=ClockType.STEADY_TIME)  # with use_sim_time and no /clock it still runs
        self.create_timer(1.0 / TF_RATE_HZ, self._tick, callback_group=services, clock=steady)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 5)
        self.create_timer(1.0, self._diagnose, callback_group=services, clock=steady)
        if self.pub_tf is None:
            self.log.warning("tf2_msgs is not installed: map -> odom goes to ~/map_to_odom only, not to /tf")
        self.add_on_set_parameters_callback(self._check_parameters)
        if len(self.graph):
            self._publish()  # the loaded graph's path (latched)
        self.log.info(f"pose graph ready: {len(self.graph)} keyframes, {len(self.graph.loops)} loops")

    def _value(self, name: str):
        v = self.get_parameter(name).value
        return float(v) if isinstance(G.BY_NAME[name].default, float) else v

    def _check_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Refuse a change whose value is out of its range or choices (save_map_on_shutdown: not a map name)."""
        try:
            for p in params:
                G.check(p.name, p.value)
        except PnvError as e:
            return SetParametersResult(successful=False, reason=str(e))
        return SetParametersResult(successful=True)

    # -- inputs -----------------------------------------------------------------------------------
    def _on_odom(self, msg: Odometry) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        pose = np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w])
        stamp = C.stamp_to_ns(msg.header.stamp)
        if not valid_pose(pose):
            self.stats["bad_odom"] += 1
        elif self._odom.add(stamp, pose, msg.header.frame_id, msg.pose.covariance, msg.child_frame_id):
            self._odom_stamp = msg.header.stamp
            if self._waiting and stamp >= C.stamp_to_ns(self._waiting[0][0].header.stamp):
                self._drain()  # the first waiting keyframe's odometry has come

    def _on_keyframe(self, msg: KeyframeMsg) -> None:
        with self._lock:
            if len(self._waiting) >= MAX_PENDING:
                self.stats["keyframes_without_odometry"] += 1
                self.log.warning(f"keyframe {self._waiting.popleft()[0].id}: {MAX_PENDING} wait; left out")
            self._waiting.append((msg, time.monotonic()))
        self._drain()

    def _drain(self) -> None:
        """Add the waiting keyframes, in order, whose odometry is settled, and the loops they complete."""
        with self._lock:
            n = len(self.graph)
            while self._waiting:
                msg, arrived = self._waiting[0]
                od = self._odometry_of(msg, time.monotonic() - arrived > self._value("odom_wait_s"))
                if od is False:
                    break  # its odometry is still to come: it, and the keyframes behind it, wait
                self._waiting.popleft()
                if od is None:
                    self.stats["keyframes_without_odometry"] += 1
                    self.log.warning(f"keyframe {msg.id}: no odometry within odom_tolerance_s of its stamp; left out")
                else:
                    try:
                        self._add_keyframe(msg, od)
                    except PnvError as e:  # the graph refused it (and stays as it was): the node goes on
                        self.stats["bad_keyframes"] += 1
                        self.log.error(f"keyframe {msg.id} left out: {e}")
            added = len(self.graph) - n
            if added:
                self._add_pending()
        if added:
            self._publish()

    def _odometry_of(self, msg: KeyframeMsg, timed_out: bool) -> OdometrySample | None | bool:
        """The keyframe's own odometry (has_odometry), else the odom topic's pose nearest its stamp within
        odom_tolerance_s once a pose at or after the stamp has come (or ``timed_out``); None: none; False: wait."""
        if msg.has_odometry:
            o = msg.odometry
            p, q = o.pose.pose.position, o.pose.pose.orientation
            pose = np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w])
            if not valid_pose(pose):
                self.stats["bad_odom"] += 1
                return None
            cov = np.asarray(o.pose.covariance, np.float64).reshape(6, 6)
            stamp = C.stamp_to_ns(o.header.stamp)
            return OdometrySample(stamp, pose[:3], pose[3:], cov, o.header.frame_id, msg.odometry_child_frame_id)
        stamp, newest = C.stamp_to_ns(msg.header.stamp), self._odom.newest_stamp
        # The keyframes' clock went back (a restart, a bag loop): the odometry from before is stale until the
        # odometry's clock has gone back too (OdometryBuffer then drops it).
        stale = self._last_stamp is not None and stamp < self._last_stamp and (newest or 0) >= self._last_stamp
        if stale:
            return None if timed_out else False
        if not timed_out and (newest is None or newest < stamp):
            return False
        return self._odom.sample(stamp, int(self._value("odom_tolerance_s") * 1e9), wait=False)

    def _add_keyframe(self, msg: KeyframeMsg, od: OdometrySample) -> None:
        """One keyframe into the graph (under the lock); an odometry reset (its frame changed, its stamp went
        back) starts a new segment."""
        stamp = C.stamp_to_ns(msg.header.stamp)
        key = self._offset + msg.id
        if key in self.graph:
            if self.graph.stamp(key) == stamp:
                self.stats["duplicate_keyframes"] += 1
                self.log.warning(f"keyframe {msg.id} (stamp {stamp / 1e9:.3f} s) is already in the graph; ignored")
                return
            # Same id, another image: the loop-closure node started a new map (reset_map, load_map of another map,
            # a respawn: ids count from 0 per map). Its keyframes become new graph keys after every existing one;
            # loops find their keyframes by stamp, so none attaches to an old keyframe that had the same id.
            self._offset = max(self.graph.ids) + 1 - msg.id
            key = self._offset + msg.id
            self.stats["id_restarts"] += 1
            self.log.warning(
                f"keyframe id {msg.id} came again with another stamp: the loop-closure node started a new map; "
                f"its keyframes are graph keys from {key} on (the odometry chain goes on)"
            )
        last, segment = self._last, self._new_segment
        if last is not None and (od.frame_id != last.frame_id or od.stamp_ns < last.stamp_ns):
            self.stats["odometry_resets"] += 1
            segment = True
            self.log.warning(
                f"keyframe {msg.id}: odometry reset (frame {last.frame_id!r} -> {od.frame_id!r}, stamp "
                f"{last.stamp_ns / 1e9:.3f} -> {od.stamp_ns / 1e9:.3f} s): a new segment"
            )
        cam = pose_matrix(od.position, od.orientation) @ self.extrinsic
        step = None  # the message's covariance growth since the last keyframe, else the drift model
        if last is not None and not segment:
            step = odometry_step_covariance(last.covariance, od.covariance, cam[:3, :3])
        try:
            self.graph.add_keyframe(key, stamp, cam, covariance=step, new_segment=segment)
        except PnvError as e:
            if step is None:
                raise
            self.log.warning(f"keyframe {msg.id}: odometry covariance refused ({e}); the drift model instead")
            self.graph.add_keyframe(key, stamp, cam, covariance=None, new_segment=segment)
        self._key_by_stamp[stamp] = key
        self._new_segment, self._last, self._last_stamp = False, od, stamp
        if msg.has_odometry and (self._odom_stamp is None or segment or od.stamp_ns > C.stamp_to_ns(self._odom_stamp)):
            self._odom_stamp = msg.odometry.header.stamp

    def _on_loop(self, msg: LoopClosure) -> None:
        if msg.match_from_fleet:  # another robot's keyframe (or an earlier session's): not in this robot's graph
            self.stats["fleet_loops_ignored"] += 1
            return
        try:
            loop = loop_from_msg(msg)
        except PnvError as e:
            self.stats["bad_loops"] += 1
            self.log.warning(str(e))
            return
        if loop is None:
            self.stats["loops_without_pose"] += 1
            return
        with self._lock:
            if len(self._pending) == self._pending.maxlen:
                self.stats["pending_dropped"] += 1
            self._pending.append((loop, C.stamp_to_ns(msg.query_stamp), C.stamp_to_ns(msg.match_stamp)))
            added = self._add_pending()
        if added:
            self._publish()

    def _add_pending(self) -> int:
        """Add the waiting loops whose keyframes are in the graph (under the lock); returns how many."""
        added, keep = 0, deque(maxlen=MAX_PENDING)
        for item in self._pending:
            loop, query_stamp, match_stamp = item
            # the keyframes by their image stamps (ids repeat across the loop node's maps); ids when a
            # third-party loop gives no stamps
            q = self._key_by_stamp.get(query_stamp) if query_stamp else self._offset + loop.query_id
            m = self._key_by_stamp.get(match_stamp) if match_stamp else self._offset + loop.match_id
            if q is not None and m is not None and q in self.graph and m in self.graph:
                loop = dataclasses.replace(loop, query_id=q, match_id=m)
                try:
                    before = len(self.graph.rejected_loops)
                    kept = self.graph.add_loop(loop.query_id, loop.match_id, loop)
                    added += 1
                    self.log.info(f"loop {loop.query_id} -> {loop.match_id} ({loop.type.name}) in the graph")
                    for bad in self.graph.rejected_loops[before:]:
                        self.stats["rejected_loops"] += 1
                        self.log.warning(
                            f"loop {bad.query_id} -> {bad.match_id} removed: its error at the optimum is above "
                            f"max_loop_error ({self.settings.max_loop_error:g} sigmas); a wrong loop"
                            + ("" if kept else " (the new one)")
                        )
                except PnvError as e:
                    self.stats["bad_loops"] += 1
                    self.log.warning(f"loop {loop.query_id} -> {loop.match_id} refused: {e}")
            else:
                keep.append(item)
        self._pending = keep
        return added

    # -- outputs ----------------------------------------------------------------------------------
    def _frames(self) -> tuple[str, str]:
        last = self._last.frame_id if self._last is not None else ""
        return self._value("map_frame"), self._value("odom_frame") or last or self._odom.frame_id or "odom"

    def _publish(self) -> None:
        with self._lock:
            stamps, cams = self.graph.stamps, self.graph.optimized_poses()
        map_frame, _ = self._frames()
        now = self.get_clock().now().to_msg()
        base_from_cam = np.linalg.inv(self.extrinsic)
        for pub, poses in ((self.pub_path, cams @ base_from_cam), (self.pub_cam, cams)):
            msg = PathMsg()
            msg.header.frame_id, msg.header.stamp = map_frame, now
            msg.poses = [_pose_stamped(map_frame, int(s), t) for s, t in zip(stamps, poses)]
            pub.publish(msg)
        self._publish_tf(changed=True)

    def _tick(self) -> None:
        """The timer: keyframes whose odometry wait ran out, and map -> odom re-sent."""
        if self._waiting:
            self._drain()
        self._publish_tf(changed=False)

    def _publish_tf(self, changed: bool) -> None:
        """map -> odom, stamped with the newest odometry stamp. Never twice with one stamp (tf2 drops a repeat and
        warns TF_REPEATED_DATA): the timer re-sends only when the odometry moved on; a changed transform (a loop)
        before the odometry moved on goes out 1 microsecond after the last one sent."""
        if self._odom_stamp is None:
            return
        stamp = C.stamp_to_ns(self._odom_stamp)
        if self._tf_stamp is not None and stamp <= self._tf_stamp:
            if not changed:
                return
            stamp = self._tf_stamp + 1000
        self._tf_stamp = stamp
        with self._lock:
            t = self.graph.map_to_odom()
        map_frame, odom_frame = self._frames()
        m = _transform(map_frame, odom_frame, C.ns_to_stamp(stamp), t)
        self.pub_tf_stamped.publish(m)
        if self.pub_tf is not None:
            self.pub_tf.publish(TFMessage(transforms=[m]))

    def _diagnose(self) -> None:
        """/diagnostics at 1 Hz: the graph's size and every counter; WARN while keyframes were lost (left out for
        want of odometry, refused by the graph) or loops dropped from a full queue, naming them."""
        with self._lock:
            values = {"keyframes": len(self.graph), "loops": len(self.graph.loops), "pending_loops": len(self._pending)}
            values.update(self.stats)
        lost = {k: values[k] for k in ("keyframes_without_odometry", "bad_keyframes", "pending_dropped") if values[k]}
        level = DiagnosticStatus.WARN if lost else DiagnosticStatus.OK
        message = ", ".join(f"{k} {v}" for k, v in lost.items()) or f"{values['keyframes']} keyframes"
        st = DiagnosticStatus(level=level, name="pnv_ros: pose_graph", message=message, hardware_id="pnv_ros")
        st.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(arr)

    # -- files and services -----------------------------------------------------------------------
    def graph_path(self, name: str) -> Path:
        """``<map_dir>/<name>.graph.npz`` (the name checked as a map name)."""
        return self.map_dir / (map_file_name(name)[: -len(".npz")] + ".graph.npz")

    def _load(self, name: str) -> None:
        path = self.graph_path(name)
        try:
            graph = PoseGraph.load(path, self.settings)
        except PnvError as e:
            self.log.error(f"graph {path} not loaded: {e}; starting an empty graph")
            return
        with self._lock:
            self._adopt(graph)
            self._last = self._last_stamp = None
        self.log.info(f"graph {path} loaded: {len(graph)} keyframes, {len(graph.loops)} loops")

    def _adopt(self, graph: PoseGraph) -> None:
        """Make a loaded graph this node's (under the lock): its keys are the ids of the loop-closure node's map
        saved with it; the next keyframe starts a new segment (a new odometry frame)."""
        self.graph, self._pending, self._new_segment = graph, deque(maxlen=MAX_PENDING), len(graph) > 0
        self._offset = 0
        self._key_by_stamp = {int(t): k for k, t in zip(graph.ids, graph.stamps)}

    def _service(self, name: str, fn):
        def handler(req, resp):
            try:
                resp.message = fn(req.name)
                resp.success = True
            except PnvError as e:
                resp.success, resp.message = False, str(e)
            except Exception as e:  # noqa: BLE001 - a request never stops the node
                self.log.error(f"{name} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                resp.success, resp.message = False, f"{name} failed: {type(e).__name__}: {e}"
            resp.keyframes = len(self.graph)
            return resp

        return handler

    def _srv_save(self, name: str) -> str:
        path = self.graph_path(name)
        with self._lock:
            self.graph.save(path)
            n = len(self.graph)
        return f"graph saved to {path}: {n} keyframes"

    def _srv_load(self, name: str) -> str:
        path = self.graph_path(name)
        graph = PoseGraph.load(path, self.settings)
        with self._lock:
            self._adopt(graph)
            self._last = self._last_stamp = None
        self._publish()
        return f"graph {path} loaded: {len(graph)} keyframes, {len(graph.loops)} loops"

    def shutdown(self) -> None:
        """Save the graph if save_map_on_shutdown names a map."""
        name = self._value("save_map_on_shutdown")
        if name:
            t0 = time.monotonic()
            try:
                msg = self._srv_save(name)
                self.log.info(f"{msg} ({time.monotonic() - t0:.2f} s)")
            except PnvError as e:
                self.log.error(f"graph not saved at shutdown: {e}")


def main(argv: list[str] | None = None) -> int:
    """Run the node until SIGINT or SIGTERM (:func:`pnv_ros.ros.run.run`)."""
    from pnv_ros.ros.run import run

    return run(PoseGraphNode, argv)
