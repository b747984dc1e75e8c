"""loop_closure_node: ROS plumbing around LoopClosureDetector.

Frames arrive on ``image`` (sensor_msgs/Image) or ``image/compressed``; a
worker thread takes the latest one (older pending frames are dropped and
counted, never queued), extracts off the executor, and under a lock queries and
extends the map. Accepted loops go to ``loop_closures``. Services answer
while a frame is being extracted.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, UInt32
from visualization_msgs.msg import Marker, MarkerArray

from pnv_ros.config import load_preset
from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.errors import ImageError, PnvError
from pnv_ros.extract import FeatureExtractor
from pnv_ros.model.checkpoint import load_checkpoint
from pnv_ros.model.registry import resolve_checkpoint
from pnv_ros.msg import LoopClosure as LoopClosureMsg
from pnv_ros.place_map import PlaceMap
from pnv_ros.ros.conversions import (
    array_to_image,
    compressed_to_array,
    image_to_array,
    ns_to_stamp,
    pose_msg,
    stamp_to_ns,
)
from pnv_ros.srv import MapCommand, QueryPlace, VerifyPair

MAP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def _desc(text: str, read_only: bool = False, frange=None, irange=None) -> ParameterDescriptor:
    d = ParameterDescriptor(description=text, read_only=read_only)
    if frange:
        d.floating_point_range = [FloatingPointRange(from_value=frange[0], to_value=frange[1], step=0.0)]
    if irange:
        d.integer_range = [IntegerRange(from_value=irange[0], to_value=irange[1], step=1)]
    return d


class LoopClosureNode(Node):
    def __init__(self) -> None:
        super().__init__("loop_closure")
        dp = DetectorParams()
        P = self.declare_parameter  # noqa: N806
        P("preset", "speed", _desc("performance | speed | storage", read_only=True))
        P("config_file", "", _desc("override file (.toml/.json/.ini) for the preset", read_only=True))
        P("checkpoint", "", _desc("checkpoint path or official model name; '' = offline default", read_only=True))
        P("device", "", _desc("cpu | cuda; '' = cuda when present", read_only=True))
        bf16_text = "backbone in bfloat16 (pooling float32): faster extraction on AVX-512 BF16/AMX CPUs and GPUs"
        P("bfloat16", False, _desc(bf16_text, read_only=True))
        P("compressed", False, _desc("subscribe to image/compressed instead of image", read_only=True))
        P("index_kind", "flat", _desc("FAISS index: flat | hnsw", read_only=True))
        P("patch_dtype", "float16", _desc("patch storage: float16 (half the memory) | float32", read_only=True))
        budget_text = "patch MB kept in RAM; beyond it older keyframes' patches are memory-mapped files (0 = no limit)"
        P("memory_budget_mb", 0.0, _desc(budget_text, read_only=True, frange=(0.0, 1e7)))
        P("top_n", dp.top_n, _desc("candidates re-ranked per keyframe", irange=(1, 1000)))
        P("matcher", "", _desc("'' (preset's), ransac or rapid"))
        P("min_score", dp.min_score, _desc("accept loops with absolute score >= this (0..1)", frange=(0.0, 1.0)))
        P(
            "exclude_recent_s",
            dp.exclude_recent_s,
            _desc("keyframes newer than this are not candidates", frange=(0.0, 1e6)),
        )
        P("min_interval_s", dp.min_interval_s, _desc("minimum time between keyframes", frange=(0.0, 3600.0)))
        P("min_travel_m", dp.min_travel_m, _desc("minimum travel between keyframes (odometry)", frange=(0.0, 1e4)))
        P("max_rate_hz", 0.0, _desc("at most this many frames per second processed; 0 = no cap", frange=(0.0, 1000.0)))
        P("temporal_k", dp.temporal_k, _desc("consecutive consistent keyframes required (1 = off)", irange=(1, 20)))
        fast_text = "oneDNN similarity products on CPU: faster re-ranking, float32 rounding differs from the reference"
        P("fast_products", dp.fast_products, _desc(fast_text))
        P("map_dir", str(Path.home() / ".ros" / "pnv_maps"), _desc("folder for saved maps", read_only=True))
        P("load_map", "", _desc("map name to load at start", read_only=True))
        P("save_map_on_shutdown", "", _desc("map name to save at shutdown ('' = don't)"))
        self.add_on_set_parameters_callback(self._on_set)

        g = self.get_parameter
        preset = load_preset(g("preset").value, g("config_file").value or None)
        ckpt = resolve_checkpoint(g("checkpoint").value or None, announce=self.get_logger().info)
        device = g("device").value or None
        model, info = load_checkpoint(ckpt, device=device or "cpu")
        self.detector = LoopClosureDetector(
            FeatureExtractor(model, info, preset, device=device, bf16=g("bfloat16").value),
            self._params(),
            index_kind=g("index_kind").value,
            patch_dtype=g("patch_dtype").value,
            memory_budget_mb=g("memory_budget_mb").value,
        )
        self.map_dir = Path(g("map_dir").value)
        self.lock = threading.Lock()
        self.stats = {"received": 0, "dropped": 0, "bad": 0, "keyframes": 0, "loops": 0}
        self.latency: dict[str, deque] = {k: deque(maxlen=100) for k in ("extract", "rerank", "total")}
        self._slot: tuple | None = None
        self._slot_cv = threading.Condition()
        self._last_processed = 0.0
        self._intrinsics: np.ndarray | None = None
        self._odom: deque = deque(maxlen=400)
        self._stop = False

        if g("load_map").value:
            ok, msg, _ = self._load(g("load_map").value)
            (self.get_logger().info if ok else self.get_logger().error)(msg)

        sensors = MutuallyExclusiveCallbackGroup()
        services = ReentrantCallbackGroup()
        if g("compressed").value:
            self.create_subscription(
                CompressedImage, "image/compressed", self._on_compressed, 5, callback_group=sensors
            )
        else:
            self.create_subscription(Image, "image", self._on_image, 5, callback_group=sensors)
        self.create_subscription(CameraInfo, "camera_info", self._on_info, 5, callback_group=sensors)
        self.create_subscription(Odometry, "odom", self._on_odom, 50, callback_group=sensors)
        self.pub_loop = self.create_publisher(LoopClosureMsg, "loop_closures", 10)
        self.pub_kf = self.create_publisher(UInt32, "~/keyframes", 10)
        # One acknowledgement per frame taken from the slot (stamp = the frame's;
        # frame_id = keyframe | skipped | error): lets replays run in lockstep.
        self.pub_done = self.create_publisher(Header, "~/processed", 100)
        self.pub_img = self.create_publisher(Image, "~/match_image", 2)
        self.pub_markers = self.create_publisher(MarkerArray, "~/loop_markers", 2)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 5)
        self.create_service(QueryPlace, "~/query_place", self._srv_query, callback_group=services)
        self.create_service(VerifyPair, "~/verify_pair", self._srv_verify, callback_group=services)
        self.create_service(MapCommand, "~/save_map", self._srv_save, callback_group=services)
        self.create_service(MapCommand, "~/load_map", self._srv_load, callback_group=services)
        self.create_service(MapCommand, "~/reset_map", self._srv_reset, callback_group=services)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=services)
        self._edges: list[tuple[int, int]] = []
        self._thumbs: dict[int, bytes] = {}  # keyframe id -> small JPEG, for match images
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()
        self.get_logger().info(
            f"loop_closure ready: preset {preset.name}, model {info.identity}, "
            + ("compressed" if g("compressed").value else "raw")
            + " images"
            + (", bfloat16 backbone" if g("bfloat16").value else "")
        )

    # -- parameters ---------------------------------------------------------------------------
    def _params(self, override: dict | None = None) -> DetectorParams:
        v = {n: self.get_parameter(n).value for n in ("top_n", "matcher", "min_score", "exclude_recent_s",
                                                      "min_interval_s", "min_travel_m", "temporal_k",
                                                      "fast_products")}  # fmt: skip
        v.update(override or {})
        return DetectorParams(**v)

    def _on_set(self, params) -> SetParametersResult:  # type: ignore[no-untyped-def]
        changes = {p.name: p.value for p in params}
        if "matcher" in changes and changes["matcher"] not in ("", "ransac", "rapid"):
            return SetParametersResult(successful=False, reason="matcher must be '', 'ransac' or 'rapid'")
        if (
            "save_map_on_shutdown" in changes
            and changes["save_map_on_shutdown"]
            and not MAP_NAME.match(changes["save_map_on_shutdown"])
        ):
            return SetParametersResult(successful=False, reason="map names use letters, digits, '_', '-', '.' only")
        keys = set(DetectorParams.__dataclass_fields__)
        if hasattr(self, "detector") and keys & set(changes):
            self.detector.params = self._params({k: v for k, v in changes.items() if k in keys})
        return SetParametersResult(successful=True)

    # -- inputs ------------------------------------------------------------------------------
    def _offer(self, kind: str, msg) -> None:  # type: ignore[no-untyped-def]
        self.stats["received"] += 1
        with self._slot_cv:
            if self._slot is not None:
                self.stats["dropped"] += 1  # latest wins
            self._slot = (kind, msg)
            self._slot_cv.notify()

    def _on_image(self, msg: Image) -> None:
        self._offer("raw", msg)

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._offer("compressed", msg)

    def _on_info(self, msg: CameraInfo) -> None:
        k = np.array(msg.k, dtype=np.float64).reshape(3, 3)
        self._intrinsics = k if k[0, 0] > 0 and k[1, 1] > 0 else None

    def _on_odom(self, msg: Odometry) -> None:
        p = msg.pose.pose.position
        self._odom.append((stamp_to_ns(msg.header.stamp), np.array([p.x, p.y, p.z])))

    def _position_at(self, stamp_ns: int, tolerance_ns: int = 100_000_000) -> np.ndarray | None:
        """Odometry position nearest the image stamp (the time-sync substitute)."""
        if not self._odom:
            return None
        s, pos = min(self._odom, key=lambda e: abs(e[0] - stamp_ns))
        return pos if abs(s - stamp_ns) <= tolerance_ns else None

    # -- the worker --------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop:
            with self._slot_cv:
                while self._slot is None and not self._stop:
                    self._slot_cv.wait(0.2)
                if self._stop:
                    return
                kind, msg = self._slot
                self._slot = None
            rate = self.get_parameter("max_rate_hz").value
            if rate > 0 and time.monotonic() - self._last_processed < 1.0 / rate:
                self.stats["dropped"] += 1
                self.pub_done.publish(Header(stamp=msg.header.stamp, frame_id="dropped"))
                continue
            self._last_processed = time.monotonic()
            status = "error"
            try:
                status = "keyframe" if self._process(kind, msg) else "skipped"
            except PnvError as e:
                self.stats["bad"] += 1
                self.get_logger().warning(
                    f"frame at {msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d} skipped: {e}"
                )
            except Exception as e:  # keep running whatever one frame does
                self.stats["bad"] += 1
                self.get_logger().error(f"frame skipped: {type(e).__name__}: {e}")
            self.pub_done.publish(Header(stamp=msg.header.stamp, frame_id=status))

    def _process(self, kind: str, msg) -> bool:  # type: ignore[no-untyped-def]
        """One frame; True when it became a keyframe."""
        stamp = stamp_to_ns(msg.header.stamp)
        pos = self._position_at(stamp)
        if not self.detector.is_keyframe(stamp, pos):
            return False
        arr = _decode(kind, msg)
        t0 = time.perf_counter()
        feats = self.detector.extractor.extract_one(arr)  # off the executor, outside the lock
        t_extract = time.perf_counter() - t0
        with self.lock:
            res = self.detector.process(feats, stamp, pos, self._intrinsics)
        if res.keyframe_id is None:
            return False
        self.stats["keyframes"] += 1
        self.latency["extract"].append(t_extract)
        self.latency["rerank"].append(res.timings.get("rerank", 0.0))
        self.latency["total"].append(t_extract + res.timings.get("total", 0.0))
        self._thumbs[res.keyframe_id] = _thumbnail(arr)
        self.pub_kf.publish(UInt32(data=res.keyframe_id))
        if res.loop is None:
            return True
        lc = res.loop
        self.stats["loops"] += 1
        out = LoopClosureMsg()
        out.header = msg.header
        out.query_id, out.match_id = lc.query_id, lc.match_id
        out.query_stamp, out.match_stamp = ns_to_stamp(lc.query_stamp_ns), ns_to_stamp(lc.match_stamp_ns)
        out.score, out.global_distance = float(lc.score), float(lc.global_distance)
        out.num_matches, out.num_inliers, out.method = lc.num_matches, lc.num_inliers, lc.method
        if lc.relative_pose is not None:
            out.has_relative_pose = True
            out.relative_pose = pose_msg(lc.relative_pose)
        self.pub_loop.publish(out)
        self.get_logger().info(f"loop: keyframe {lc.query_id} -> {lc.match_id}, score {lc.score:.3f}")
        if self.pub_img.get_subscription_count() > 0:
            self._publish_match_image(arr, lc, msg.header)
        if pos is not None:
            self._edges.append((lc.query_id, lc.match_id))
            self._publish_markers(msg.header.frame_id)
        return True

    def _publish_match_image(self, query_rgb: np.ndarray, lc, header) -> None:  # type: ignore[no-untyped-def]
        import io

        from PIL import Image as PILImage

        from pnv_ros.viz import match_image

        q = self.detector.map.get(lc.query_id).features
        m = self.detector.map.get(lc.match_id).features
        if lc.match_id not in self._thumbs:
            return  # keyframe from a loaded map: no pixels kept
        with self.lock:
            sc = self.detector.matcher_for().score(q, [m], details=True)
        qi = PILImage.open(io.BytesIO(self._thumbs[lc.query_id])).resize(q.image_size)
        mi = PILImage.open(io.BytesIO(self._thumbs[lc.match_id])).resize(m.image_size)
        canvas = match_image(qi, mi, self.detector.preset, sc.details[0], lc.score,
                             title=f"kf {lc.query_id} -> {lc.match_id}")  # fmt: skip
        self.pub_img.publish(array_to_image(canvas, header))

    def _publish_markers(self, frame_id: str) -> None:
        m = Marker()
        m.header.frame_id = frame_id or "odom"
        m.ns, m.id, m.type, m.action = "loops", 0, Marker.LINE_LIST, Marker.ADD
        m.scale.x = 0.05
        m.color.r, m.color.g, m.color.a = 1.0, 0.2, 1.0
        from geometry_msgs.msg import Point

        for a, b in self._edges:
            pa, pb = self.detector.map.get(a).position, self.detector.map.get(b).position
            if pa is None or pb is None:
                continue
            m.points.append(Point(x=float(pa[0]), y=float(pa[1]), z=float(pa[2])))
            m.points.append(Point(x=float(pb[0]), y=float(pb[1]), z=float(pb[2])))
        self.pub_markers.publish(MarkerArray(markers=[m]))

    def _publish_diagnostics(self) -> None:
        st = DiagnosticStatus(level=DiagnosticStatus.OK, name="pnv_ros: loop_closure", hardware_id="pnv_ros")
        st.message = f"{len(self.detector.map)} keyframes, {self.stats['loops']} loops"
        vals = {**{k: str(v) for k, v in self.stats.items()},
                "map_keyframes": str(len(self.detector.map)),
                "bytes_per_keyframe": f"{self.detector.map.nbytes_per_keyframe():.0f}",
                "ram_patch_bytes": str(self.detector.map.ram_patch_bytes),
                "keyframes_on_disk": str(self.detector.map.spilled)}  # fmt: skip
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

    # -- services ----------------------------------------------------------------------------
    def _srv_query(self, req, resp):  # type: ignore[no-untyped-def]
        try:
            if req.mode == QueryPlace.Request.BY_IMAGE:
                feats = self.detector.extractor.extract_one(image_to_array(req.image))
                exclude, before = None, None
            else:
                with self.lock:
                    kf = (self.detector.map.get(req.keyframe_id) if req.mode == QueryPlace.Request.BY_ID
                          else self.detector.map.by_stamp(stamp_to_ns(req.stamp)))  # fmt: skip
                feats, exclude, before = kf.features, kf.id, None
            with self.lock:
                cands = self.detector.candidates(feats, before, req.top_n or None, req.matcher or None, exclude)
            resp.ids = [c.id for c in cands]
            resp.stamps = [ns_to_stamp(c.stamp_ns) for c in cands]
            resp.scores = [float(c.score) for c in cands]
            resp.global_distances = [float(c.global_distance) for c in cands]
            resp.success, resp.message = True, f"{len(cands)} candidates"
        except PnvError as e:
            resp.success, resp.message = False, str(e)
        return resp

    def _srv_verify(self, req, resp):  # type: ignore[no-untyped-def]
        try:
            with self.lock:
                a, b = self.detector.map.get(req.id_a).features, self.detector.map.get(req.id_b).features
                score, nm, ni, pose = self.detector.verify(a, b, req.matcher or None, self._intrinsics)
            resp.score, resp.num_matches, resp.num_inliers = score, nm, ni
            if pose is not None:
                resp.has_relative_pose, resp.relative_pose = True, pose_msg(pose)
            resp.success, resp.message = True, "ok"
        except PnvError as e:
            resp.success, resp.message = False, str(e)
        return resp

    def _map_path(self, name: str) -> Path:
        if not MAP_NAME.match(name or "") or ".." in name:
            raise PnvError(f"bad map name {name!r}: use letters, digits, '_', '-', '.' (no '/' or '..')")
        return self.map_dir / (name if name.endswith(".npz") else name + ".npz")

    def _save(self, name: str) -> tuple[bool, str, int]:
        try:
            path = self._map_path(name)
            with self.lock:
                self.detector.map.save(path)
                n = len(self.detector.map)
            return True, f"saved {n} keyframes to {path}", n
        except (PnvError, OSError) as e:
            return False, str(e), len(self.detector.map)

    def _load(self, name: str) -> tuple[bool, str, int]:
        try:
            path = self._map_path(name)
            budget = self.detector.map_options["memory_budget_mb"]
            m = PlaceMap.load(path, self.detector.extractor.dim, self.detector.preset, memory_budget_mb=budget)
            with self.lock:
                self.detector.map = m
                self.detector._history.clear()
            return True, f"loaded {len(m)} keyframes from {path}", len(m)
        except PnvError as e:
            return False, str(e), len(self.detector.map)

    def _srv_save(self, req, resp):  # type: ignore[no-untyped-def]
        resp.success, resp.message, resp.keyframes = self._save(req.name)
        return resp

    def _srv_load(self, req, resp):  # type: ignore[no-untyped-def]
        resp.success, resp.message, resp.keyframes = self._load(req.name)
        return resp

    def _srv_reset(self, req, resp):  # type: ignore[no-untyped-def]
        with self.lock:
            self.detector.reset()
        resp.success, resp.message, resp.keyframes = True, "map reset", 0
        return resp

    def shutdown(self) -> None:
        self._stop = True
        with self._slot_cv:
            self._slot_cv.notify()
        self.worker.join(timeout=30)
        name = self.get_parameter("save_map_on_shutdown").value
        if name:
            ok, msg, _ = self._save(name)
            (self.get_logger().info if ok else self.get_logger().error)(msg)


try:  # on robots: cv_bridge widens the accepted encodings (bayer, yuv, ...)
    from cv_bridge import CvBridge

    _BRIDGE = CvBridge()
except Exception:  # noqa: BLE001 - absent here, or the ROS 1 PyPI build that breaks on numpy 2
    _BRIDGE = None


def _decode(kind: str, msg) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Our checked decoding first (clear errors); cv_bridge for other encodings where present."""
    if kind == "compressed":
        return compressed_to_array(msg)
    try:
        return image_to_array(msg)
    except ImageError as e:
        if _BRIDGE is None or "unsupported image encoding" not in str(e):
            raise
        try:
            return np.asarray(_BRIDGE.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
        except Exception as e2:  # noqa: BLE001
            raise ImageError(f"{e}; cv_bridge could not convert it either: {e2}") from None


def _thumbnail(arr: np.ndarray, width: int = 320) -> bytes:
    import io

    from pnv_ros.images import load_image

    im = load_image(arr)
    im = im.resize((width, max(1, round(im.height * width / im.width))))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv if argv is not None else sys.argv)
    node = None
    try:
        node = LoopClosureNode()
        ex = MultiThreadedExecutor(num_threads=4)
        ex.add_node(node)
        ex.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except PnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()
    return 0
