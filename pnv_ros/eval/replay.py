"""A bag through the loop-closure detector: in-process, or through a live node.

Both modes use the same detector code and record, per keyframe, its best
re-ranked candidate with its absolute score (acceptance threshold applied
afterwards), so the precision-recall curve covers every threshold and the two
modes can be compared loop by loop.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pnv_ros.bags import IMAGE_TYPES, INFO_TYPE, ODOM_TYPE, BagError, BagReader
from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.extract import FeatureExtractor
from pnv_ros.geometry import RelativePose
from pnv_ros.trajectory import Trajectory

#: a frame takes the bag's depth image nearest its stamp within this (ns): the node's depth_tolerance_s default
#: (0.02 s, TUM RGB-D's associate.py)
DEPTH_TOLERANCE_NS = 20_000_000


#: which loops a replay's pose graph gets (metrics.json ``trajectory.pose_graph.loops_rule``)
ACCEPTED_LOOPS_RULE = (
    "the accepted loops: score >= min_score (the loop node's own rule; with temporal_k > 1 those the detector "
    "published at its real min_score); a loop whose relative pose is NONE adds nothing"
)
#: the loop node's keyframes topic (its ``~/keyframes``; the node is named ``loop_closure``)
LOOP_NODE_KEYFRAMES = "/loop_closure/keyframes"
#: where a replay relays the loop node's accepted loops to ``pose_graph_node`` (its ``loop_closures`` remapped): the
#: loop node runs with min_score 0 for the precision-recall curve, so its own topic carries rejected loops too
EVAL_LOOPS_TOPIC = "/pnv_eval/accepted_loop_closures"
#: the pose graph's optimised keyframe poses (camera optical frame; latched nav_msgs/Path)
GRAPH_KEYFRAME_POSES = "/pose_graph/keyframe_poses"
#: the node's inputs that a replay subscribes ``reliable`` (their ``<name>_qos`` parameters): the node's default,
#: sensor-data QoS (best effort), loses a whole raw frame when one of its UDP fragments is lost, which is every
#: 640x480 rgb8 frame under Fast DDS's default 512 kB shared-memory segment (docs/node.md); the lockstep player
#: would then wait for an acknowledgement that never comes
RELIABLE_INPUTS = ("image", "depth", "camera_info", "odom")


@dataclass
class KeyframeRecord:
    """One keyframe's outcome. frame: index in the bag; match_frame -1 = no candidate."""

    frame: int
    stamp_ns: int
    match_frame: int
    score: float
    global_distance: float
    num_matches: int
    num_inliers: int
    top_frames: list[int] = field(default_factory=list)
    t_extract: float = float("nan")
    t_rerank: float = float("nan")
    t_total: float = float("nan")
    #: the loop's relative pose (query camera = parent), None without a loop, a camera or evidence
    relative_pose: RelativePose | None = None


@dataclass
class SkippedFrame:
    """A frame the detector never saw because it cannot be decoded (the node skips it too)."""

    frame: int
    stamp_ns: int
    reason: str


@dataclass
class PoseGraphOutput:
    """A pose graph's answer to a replay (``pose_graph_node`` through ``--node``, or
    :func:`pnv_ros.eval.trajectory_eval.optimize_in_process`).

    trajectory: the optimised keyframe poses (camera optical frame in the map frame, stamps in seconds, in
        keyframe order), None when the graph gave none.
    loops: the loops given to the graph, (query frame, match frame) bag indices, in the order given.
    keyframes: keyframes in the graph.
    source: what optimised it ("pose_graph_node" or "in-process PoseGraph").
    loops_rule: which loops the graph got (the accepted ones: how they were chosen).
    """

    trajectory: Trajectory | None
    loops: list[tuple[int, int]]
    keyframes: int
    source: str
    loops_rule: str = ""
    #: loops published to the graph besides the detector's (a test's wrong loop)
    injected: int = 0


@dataclass
class ReplayResult:
    records: list[KeyframeRecord]
    n_frames: int
    stamps_ns: list[int]
    wall_s: float
    peak_rss_mb: float
    map_bytes_per_keyframe: float
    thumbnails: dict[int, np.ndarray]
    skipped: list[SkippedFrame] = field(default_factory=list)
    #: the run's exclusion window (which earlier keyframes a keyframe could match)
    exclude_recent_s: float = 0.0
    exclude_recent_keyframes: int = 0
    #: through a node: its last /diagnostics key/values (latency_<stage>_p50_ms per stage ...); in-process: empty
    node_diagnostics: dict[str, str] = field(default_factory=dict)
    #: through a node with its pose graph (``pose_graph_node``): the graph's answer; else None
    pose_graph: PoseGraphOutput | None = None


def _thumb(rgb: np.ndarray, width: int = 320) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(rgb if rgb.ndim == 3 else np.stack([rgb] * 3, -1))
    return np.asarray(im.resize((width, max(1, round(im.height * width / im.width)))))


def _rerank_s(timings: dict[str, float]) -> float:
    """A keyframe's search in the map (seconds): the FAISS top-n and its re-ranking, without the wait for the
    fleet (what ``KeyframeRecord.t_rerank`` has always held); NaN for a frame that was not a keyframe."""
    if "retrieval" not in timings or "rerank" not in timings:
        return float("nan")
    return timings["retrieval"] - timings.get("fleet", 0.0) + timings["rerank"]


def replay_in_process(
    bag: Path,
    extractor: FeatureExtractor,
    params: DetectorParams,
    topic: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Every image of the bag through a LoopClosureDetector in this process, with the bag's odometry pose
    (position and orientation), its camera (the first camera_info) and, for admitted frames, its registered depth
    image nearest the frame's stamp (within ``DEPTH_TOLERANCE_NS``), as the node gets them."""
    det = LoopClosureDetector(extractor, params.replace(min_score=0.0))
    records: list[KeyframeRecord] = []
    kf_frame: list[int] = []
    stamps: list[int] = []
    thumbs: dict[int, np.ndarray] = {}
    skipped: list[SkippedFrame] = []
    t0 = time.perf_counter()
    with BagReader(bag, topic, bit_depth=extractor.bit_depth) as r:
        total = r.count
        camera = r.camera_model()
        for fr in r.frames():
            stamps.append(fr.stamp_ns)
            if fr.rgb is None:  # as the node: logged, skipped, the run goes on
                skipped.append(SkippedFrame(fr.index, fr.stamp_ns, fr.error or "cannot be decoded"))
                if progress:
                    progress(fr.index + 1, total)
                continue
            res = det.process(
                fr.rgb,
                fr.stamp_ns,
                fr.position,
                camera=camera,
                orientation=fr.orientation,
                depth=lambda s=fr.stamp_ns: r.depth_at(s, DEPTH_TOLERANCE_NS),
            )
            if res.keyframe_id is not None:
                kf_frame.append(fr.index)
                thumbs[fr.index] = _thumb(fr.rgb)
                c = max(res.candidates, key=lambda x: x.score) if res.candidates else None  # the node's loop
                records.append(
                    KeyframeRecord(
                        fr.index,
                        fr.stamp_ns,
                        kf_frame[c.id] if c else -1,
                        c.score if c else 0.0,
                        c.global_distance if c else float("nan"),
                        c.num_matches if c else 0,
                        c.num_inliers if c else 0,
                        [kf_frame[x.id] for x in res.candidates],
                        res.timings.get("extract", np.nan),
                        _rerank_s(res.timings),
                        res.timings.get("total", np.nan),
                        res.loop.relative_pose
                        if res.loop is not None and c is not None and res.loop.match_id == c.id
                        else None,
                    )
                )
            if progress:
                progress(fr.index + 1, total)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return ReplayResult(
        records,
        len(stamps),
        stamps,
        wall,
        rss,
        det.map.nbytes_per_keyframe(),
        thumbs,
        skipped,
        det.params.exclude_recent_s,
        det.params.exclude_recent_keyframes,
    )


@dataclass
class _BagScan:
    """What :func:`replay_through_node` reads from the bag before playing it."""

    image_topic: str
    #: image messages on the topic
    total: int
    compressed: bool
    #: odometry topics in the bag, sorted
    odom_topics: list[str]
    #: every image message's stamp, ns, in bag order (undecodable ones included: indices stay aligned)
    stamps: list[int] = field(default_factory=list)
    #: small pictures of the decodable frames, by frame index
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)
    skipped: dict[int, SkippedFrame] = field(default_factory=dict)
    #: bag times (ns) of messages that cannot be deserialised: never published
    undeserialisable: set[int] = field(default_factory=set)
    #: the depth topic (16UC1 / 32FC1 Image) and the camera_info topic, remapped to the node's when present
    depth_topic: str | None = None
    info_topic: str | None = None


def _scan_bag(bag: Path, topic: str | None, bit_depth: int | None) -> _BagScan:
    """Stamps, thumbnails and skipped frames of the bag's image topic; frames are not kept.

    Raises:
        BagError: the bag or its image topic cannot be read.
    """
    with BagReader(bag, topic, bit_depth=bit_depth) as r:  # stamps and small pictures only: frames are not kept
        scan = _BagScan(
            r.topic,
            r.count,
            r.msgtype == IMAGE_TYPES[1],
            sorted({t for t, ty in r.topics().items() if ty == ODOM_TYPE}),
            depth_topic=r.depth_topic,
            info_topic=min((t for t, ty in r.topics().items() if ty == INFO_TYPE), default=None),
        )
        for f in r.frames():
            scan.stamps.append(f.stamp_ns)
            if f.rgb is None:  # the node acknowledges it as "error"; the stamp keeps the indices aligned
                scan.skipped[f.index] = SkippedFrame(f.index, f.stamp_ns, f.error or "cannot be decoded")
                if "cannot be deserialised" in (f.error or ""):
                    scan.undeserialisable.add(f.stamp_ns)  # a bag time: the header is unreadable
            else:
                scan.thumbs[f.index] = _thumb(f.rgb)
    return scan


def _node_command(
    scan: _BagScan,
    preset_name: str,
    checkpoint: str | None,
    params: DetectorParams,
    config_file: str | None,
    bf16: bool,
    bit_depth: int | None,
    engine: str,
    precision: str | None,
    engine_file: str | None,
    min_score: float = 0.0,
) -> list[str]:
    """The loop_closure_node command line: remaps so the node hears exactly what the bag holds
    for it (the image topic, raw or compressed, and odometry when there is one odometry topic),
    and every detector parameter typed as the node declares it, with ``min_score`` (0: every keyframe's best
    candidate is published, for the precision-recall curve)."""
    exe = str(Path(sys.executable).parent / "loop_closure_node")
    compressed = scan.compressed
    args = [
        exe,
        "--ros-args",
        "-r",
        f"{'image/compressed' if compressed else 'image'}:={scan.image_topic}",
        "-p",
        f"compressed:={str(compressed).lower()}",
        "-p",
        f"preset:={preset_name}",
        "-p",
        f"bfloat16:={str(bf16).lower()}",
        "-p",
        f"bit_depth:={bit_depth or 0}",
        "-p",
        f"engine:={engine}",
    ]
    if precision:
        args += ["-p", f"precision:={precision}"]
    if engine_file:
        args += ["-p", f"engine_file:={engine_file}"]
    for name in RELIABLE_INPUTS:  # lockstep: every message counts, and a lost fragment is resent
        args += ["-p", f"{name}_qos:=reliable"]
    if len(scan.odom_topics) == 1:
        args += ["-r", f"odom:={scan.odom_topics[0]}"]
    if scan.depth_topic:
        args += ["-r", f"depth:={scan.depth_topic}"]
    if scan.info_topic:
        args += ["-r", f"camera_info:={scan.info_topic}"]
    defaults = DetectorParams()
    for name, value in params.replace(min_score=min_score).__dict__.items():
        if name == "matcher" and not value:
            continue
        kind = type(getattr(defaults, name))  # ROS parameters are typed: 10 is not 10.0
        args += ["-p", f"{name}:={str(value).lower() if kind is bool else kind(value)}"]
    if checkpoint:
        args += ["-p", f"checkpoint:={checkpoint}"]
    if config_file:
        args += ["-p", f"config_file:={config_file}"]
    return args


def _pose_graph_command(odom_topic: str) -> list[str]:
    """The pose_graph_node command line (the installed executable beside this Python, else the repository's
    ``scripts/pose_graph_node`` run by it): the bag's odometry, the loop node's ``~/keyframes``, and the loops
    the replay relays (:data:`EVAL_LOOPS_TOPIC`) for ``loop_closures``; every other parameter its default."""
    exe = Path(sys.executable).parent / "pose_graph_node"
    cmd = (
        [str(exe)]
        if exe.is_file()
        else [sys.executable, str(Path(__file__).parents[2] / "scripts" / "pose_graph_node")]
    )
    return [
        *cmd,
        "--ros-args",
        "-r",
        f"odom:={odom_topic}",
        "-r",
        f"keyframes:={LOOP_NODE_KEYFRAMES}",
        "-r",
        f"loop_closures:={EVAL_LOOPS_TOPIC}",
    ]


class _GraphSide:
    """``pose_graph_node`` beside the loop node during a lockstep replay: started here, fed the loop node's loops
    that pass ``relay_min_score`` (relayed on :data:`EVAL_LOOPS_TOPIC`) and, after the ``n``-th acknowledged image,
    ``inject[n]`` (LoopClosure messages: a test's wrong loop); its latched ``~/keyframe_poses`` collected."""

    def __init__(self, node, args: list[str], relay_min_score: float, inject: dict[int, list] | None) -> None:
        from nav_msgs.msg import Path as PathMsg
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        from pnv_ros.msg import LoopClosure

        self.node, self.min_score, self.inject = node, relay_min_score, inject or {}
        self._log = tempfile.TemporaryFile("w+")  # not a pipe: a node that logs much would block on a full one
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        self.relay = node.create_publisher(
            LoopClosure, EVAL_LOOPS_TOPIC, QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        )
        self.relayed: list = []
        self.injected = 0
        self.path = None
        self.changed = time.monotonic()  # the last relayed loop or path
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(PathMsg, GRAPH_KEYFRAME_POSES, self._on_path, latched)

    def _on_path(self, msg) -> None:
        self.path, self.changed = msg, time.monotonic()

    def on_loop(self, msg) -> None:
        """A loop of the loop node: relayed to the graph when it is accepted."""
        if float(msg.score) >= self.min_score:
            self.relay.publish(msg)
            self.relayed.append(msg)
            self.changed = time.monotonic()

    def after_image(self, n: int) -> None:
        for msg in self.inject.get(n, []):
            self.relay.publish(msg)
            self.injected += 1

    def wait_ready(self, odom_pub, timeout_s: float) -> None:
        """Until the graph hears odometry, keyframes and relayed loops and publishes its keyframe poses.

        Raises:
            BagError: it did not within ``timeout_s`` (its output said), or it exited.
        """
        end = time.time() + timeout_s
        while time.time() < end and self.proc.poll() is None:
            if (
                self.relay.get_subscription_count() > 0
                and odom_pub.get_subscription_count() > 1  # the loop node's and the graph's
                and self.node.count_subscribers(LOOP_NODE_KEYFRAMES) > 0
                and self.node.count_publishers(GRAPH_KEYFRAME_POSES) > 0
            ):
                return
            _spin(self.node, 0.05)
        raise BagError(f"pose_graph_node did not start within {timeout_s:.0f} s: {self.output()[-1500:] or '(none)'}")

    def settle(self, keyframes: int, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
        """Spin until the graph's keyframe poses hold ``keyframes`` poses and nothing changed for ``quiet_s``
        (a keyframe the graph left out for want of odometry: until ``timeout_s``)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            _spin(self.node, 0.05)
            full = self.path is not None and len(self.path.poses) >= keyframes
            if full and time.monotonic() - self.changed >= quiet_s:
                return

    def output(self) -> str:
        """The node's output, once it is stopped (stopped here)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.seek(0)
        return self._log.read().strip()

    def result(self, frame_of: dict[int, int], rule: str) -> PoseGraphOutput:
        """The graph's answer: its last keyframe poses, the loops relayed (bag frame pairs)."""
        from pnv_ros.ros.conversions import stamp_to_ns

        traj = None
        if self.path is not None and self.path.poses:
            ps = self.path.poses
            traj = Trajectory(
                np.array([stamp_to_ns(p.header.stamp) for p in ps], np.float64) / 1e9,
                np.array([[p.pose.position.x, p.pose.position.y, p.pose.position.z] for p in ps]),
                np.array(
                    [
                        [p.pose.orientation.x, p.pose.orientation.y, p.pose.orientation.z, p.pose.orientation.w]
                        for p in ps
                    ]
                ),
            )
        loops = [
            (frame_of.get(stamp_to_ns(m.query_stamp), -1), frame_of.get(stamp_to_ns(m.match_stamp), -1))
            for m in self.relayed
        ]
        n = 0 if traj is None else len(traj)
        return PoseGraphOutput(traj, loops, n, "pose_graph_node", rule, self.injected)


def _spin(node, timeout_s: float) -> None:
    import rclpy  # not at the top: the in-process replay runs without ROS

    rclpy.spin_once(node, timeout_sec=timeout_s)


@dataclass
class _NodeRun:
    """What the node said during a lockstep replay."""

    #: every LoopClosure message received, in arrival order
    loops: list
    #: the node's last /diagnostics key/values
    diags: dict[str, str]
    #: stamps (ns) the node acknowledged as keyframes
    keyframes: set[int]
    #: stamps (ns) the node acknowledged only as errors
    errors: set[int]
    #: seconds from starting the player to the end of the late-message wait
    wall: float
    #: the pose graph's answer (None without one)
    pose_graph: PoseGraphOutput | None = None


def _play_into_node(
    bag: Path,
    scan: _BagScan,
    args: list[str],
    progress: Callable[[int, int], None] | None,
    node_timeout_s: float,
    graph: tuple[list[str], float, dict[int, list] | None] | None = None,
) -> _NodeRun:
    """Start the node (``args``), play the bag into it in lockstep and collect its output;
    the node and rclpy are shut down whatever happens. ``graph``: (pose_graph_node's command, the relay's
    min_score, loops to inject: :class:`_GraphSide`) to run the pose graph beside it.

    Raises:
        BagError: the node did not subscribe to the image topic within ``node_timeout_s`` s, or the pose graph
            node did not start.
    """
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray

    from pnv_ros.msg import LoopClosure
    from pnv_ros.ros.conversions import stamp_to_ns
    from pnv_ros.ros.player import BagPlayer

    image_topic, undeserialisable = scan.image_topic, scan.undeserialisable
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    rclpy.init()
    loops: list = []
    diags: dict[str, str] = {}
    player = side = None
    t0 = time.perf_counter()
    try:
        extra = [t for t in (scan.depth_topic, scan.info_topic) if t]
        player = BagPlayer(bag, topics=[image_topic, *scan.odom_topics[:1], *extra])  # not /tf, /rosout...
        if undeserialisable:  # neither the player nor the node's middleware can read these: not sent
            every = player.messages
            player.messages = lambda: (m for m in every() if not (m[0] == image_topic and m[2] in undeserialisable))
        if graph is not None:
            side = _GraphSide(player.node, *graph)
        on_loop = loops.append if side is None else (lambda m: (loops.append(m), side.on_loop(m)))
        player.node.create_subscription(LoopClosure, "loop_closures", on_loop, 1000)
        player.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: _diagnostics(m, diags), 10)
        if not player.wait_for_subscribers(node_timeout_s, alive=lambda: proc.poll() is None):
            out = proc.communicate(timeout=10)[0] if proc.poll() is not None else ""
            raise BagError(
                f"loop_closure_node did not subscribe to {image_topic}: " + (out.strip()[-600:] or "timed out")
            )
        if side is not None:
            side.wait_ready(player.pubs[scan.odom_topics[0]], node_timeout_s)
        total = scan.total

        def step(n: int) -> None:
            if side is not None:
                side.after_image(n)
            if progress:
                progress(n, total)

        try:
            player.lockstep(image_topic, progress=step)
        except BagError as e:  # say what the node said: its log is the only clue to why it stopped answering
            out = _stop(proc)
            raise BagError(f"{e}; the node's last output: {(out or '').strip()[-1500:] or '(none)'}") from None
        keyframes = {stamp_to_ns(a.stamp) for a in player.acks if a.frame_id == "keyframe"}  # first ack per stamp wins
        errors = {stamp_to_ns(a.stamp) for a in player.acks if a.frame_id == "error"} - keyframes
        end = time.time() + 5  # late loop closures, and a diagnostics message (1 Hz) after the last keyframe
        while time.time() < end:
            rclpy.spin_once(player.node, timeout_sec=0.05)
        if side is not None:
            side.settle(len(keyframes))
        wall = time.perf_counter() - t0
        frame_of = {s: i for i, s in enumerate(scan.stamps) if i not in scan.skipped}
        graph_out = None if side is None else side.result(frame_of, ACCEPTED_LOOPS_RULE)
    finally:
        if side is not None:
            side.output()
        if player is not None:
            player.close()
        rclpy.try_shutdown()
        _stop(proc)
    return _NodeRun(loops, diags, keyframes, errors, wall, graph_out)


def _stop(proc: subprocess.Popen) -> str:
    """SIGTERM to the node (SIGKILL after 30 s); its output (empty once read)."""
    proc.terminate()
    try:
        return proc.communicate(timeout=30)[0] or ""
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0] or ""


def replay_through_node(
    bag: Path,
    preset_name: str,
    checkpoint: str | None,
    params: DetectorParams,
    topic: str | None = None,
    config_file: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    node_timeout_s: float = 180.0,
    bf16: bool = False,
    bit_depth: int | None = None,
    engine: str = "torch",
    precision: str | None = None,
    engine_file: str | None = None,
    pose_graph: bool = False,
    inject_loops: dict[int, list] | None = None,
) -> ReplayResult:
    """Play the bag into a live loop_closure_node (lockstep) and record its output.

    The node runs with min_score 0 so that every keyframe's best candidate is
    published; thresholds are applied afterwards, as in-process. ``engine``,
    ``precision``, ``engine_file``: the node's parameters of those names.
    The node's last /diagnostics values (its per-keyframe latency medians and maxima over
    its last 100 keyframes, per stage: ``latency_<stage>_p50_ms`` / ``_max_ms`` for the stages of
    :data:`pnv_ros.ros.diagnostics.STAGES` it measured, e.g. decode, backbone, pooling, patch_descriptors,
    retrieval, rerank, map_add, extract, commit, total) come back in ``ReplayResult.node_diagnostics``.

    ``pose_graph`` (with one odometry topic in the bag): ``pose_graph_node`` runs beside it on the same odometry
    and the node's ``~/keyframes``; the replay relays it the node's accepted loops (score >= ``params.min_score``,
    the node's own rule) on :data:`EVAL_LOOPS_TOPIC`; with ``temporal_k`` > 1, whose consistency depends on which
    candidates pass, the node runs with the real min_score instead (then only accepted loops are published and
    the precision-recall curve covers scores above it) and every loop is relayed. Its optimised keyframe poses
    come back in ``ReplayResult.pose_graph``. ``inject_loops``: {n: [LoopClosure messages]} published to the graph
    (not the detector's records) after the n-th image is acknowledged (a wrong loop, in tests).

    Raises:
        BagError: the bag cannot be read or played, the node (or the pose graph node) did not start or stopped
            answering (its output in the message).
    """
    from pnv_ros.ros.conversions import stamp_to_ns

    scan = _scan_bag(bag, topic, bit_depth)
    stamps, skipped = scan.stamps, scan.skipped
    frame_of = {s: i for i, s in enumerate(stamps) if i not in skipped}
    graph = None
    node_min_score = 0.0
    if pose_graph and len(scan.odom_topics) == 1:
        node_min_score = params.min_score if params.temporal_k > 1 else 0.0
        relay_min = 0.0 if params.temporal_k > 1 else params.min_score
        graph = (_pose_graph_command(scan.odom_topics[0]), relay_min, inject_loops)
    args = _node_command(
        scan,
        preset_name,
        checkpoint,
        params,
        config_file,
        bf16,
        bit_depth,
        engine,
        precision,
        engine_file,
        node_min_score,
    )
    node = _play_into_node(bag, scan, args, progress, node_timeout_s, graph)
    for i, s in enumerate(stamps):  # frames the node could not use though they decode here
        if s in node.errors and i not in skipped:
            skipped[i] = SkippedFrame(i, s, "the node reported an error for it (see its log)")
    best: dict[int, object] = {}
    for lc in node.loops:
        best[stamp_to_ns(lc.query_stamp)] = lc
    records = []
    for i, s in enumerate(stamps):
        if s not in node.keyframes or i in skipped:
            continue
        lc = best.get(s)
        m = frame_of.get(stamp_to_ns(lc.match_stamp), -1) if lc is not None else -1
        records.append(
            KeyframeRecord(
                i,
                s,
                m,
                float(lc.score) if lc else 0.0,
                float(lc.global_distance) if lc else float("nan"),
                int(lc.num_matches) if lc else 0,
                int(lc.num_inliers) if lc else 0,
                [m] if m >= 0 else [],
                relative_pose=metric_pose_of(lc.relative_pose) if lc else None,
            )
        )
    return ReplayResult(
        records,
        len(stamps),
        stamps,
        node.wall,
        float("nan"),
        float("nan"),
        scan.thumbs,
        [skipped[i] for i in sorted(skipped)],
        params.exclude_recent_s,
        params.exclude_recent_keyframes,
        dict(node.diags),
        node.pose_graph,
    )


def metric_pose_of(msg) -> RelativePose | None:
    """The :class:`RelativePose` of a METRIC pnv_ros/RelativePose message (rotation, translation, 6x6 covariance of
    (w, dt)); None for the other types (the trajectory metrics score METRIC poses only)."""
    from scipy.spatial.transform import Rotation

    from pnv_ros.geometry import PoseType, tangent_basis

    if int(msg.type) != int(PoseType.METRIC) or len(msg.covariance) != 36:
        return None
    q, t = msg.rotation, np.array([msg.translation.x, msg.translation.y, msg.translation.z])
    cov = np.asarray(msg.covariance, np.float64).reshape(6, 6)
    d = np.array([msg.direction.x, msg.direction.y, msg.direction.z])
    return RelativePose(
        rotation=Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix(),
        direction=d,
        rotation_covariance=cov[:3, :3],
        direction_covariance=np.asarray(msg.direction_covariance, np.float64).reshape(3, 3),
        inliers=int(msg.inliers),
        rms_error_px=float(msg.rms_error_px),
        covariance=cov,
        tangent_basis=tangent_basis(d) if np.linalg.norm(d) > 0 else np.zeros((3, 2)),
        sigma_px=float("nan"),
        parallax_px=float("nan"),
        type=PoseType.METRIC,
        translation=t,
        translation_covariance=cov[3:, 3:],
    )


def _diagnostics(msg, into: dict[str, str]) -> None:
    """The loop_closure node's key/values of one DiagnosticArray (others' statuses ignored)."""
    for st in msg.status:
        if "loop_closure" in st.name:
            into.update({kv.key: kv.value for kv in st.values})
