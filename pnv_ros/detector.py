"""LoopClosureDetector: frames in, loop closures out. No ROS.

The one object the ROS node, the CLI and the bag evaluator share. It owns a
lock: every method may be called from any thread; extraction runs outside the
lock, so queries are answered while a keyframe is being extracted.

Per frame (:meth:`LoopClosureDetector.process`, the one frame pipeline: the
node gives it a ROS message and a decode callable; or :meth:`admit` +
:meth:`look` + extraction + :meth:`commit` where the caller extracts):

1. **Time.** A stamp equal to the previous frame's is a duplicate; one up to
   ``OUT_OF_ORDER_S`` older is out of order; both are skipped and counted. A
   stamp further back (a clock reset, ``use_sim_time`` restarting at 0, a
   looping bag) is a *time jump*: logged once by the caller, counted, and the
   session clock carries on from where it was, so nothing freezes.
2. **Keyframe policy.** With a pose (odometry): a keyframe when the robot
   moved ``min_travel_m`` or turned ``min_rotation_rad`` since the last one
   (RTAB-Map's ``RGBD/LinearUpdate`` / ``RGBD/AngularUpdate``). Without: a
   keyframe when the picture changed by at least ``min_visual_change``
   (:func:`visual_change`, before any extraction) since the last keyframe, so
   a camera that does not move adds nothing and costs no extraction.
   ``min_interval_s`` applies to both.
3. **Retrieval.** The top ``top_n`` among keyframes that are neither within
   ``exclude_recent_s`` (session clock) nor among the last
   ``exclude_recent_keyframes`` keyframes of this run; keyframes of earlier
   runs (a loaded map) are always candidates.
4. **Re-ranking and acceptance.** Candidates are re-ranked by the fused
   patch score (the reference's order); the loop is the candidate with the
   highest absolute score (0..1, the number that is thresholded and
   published), accepted when it is at least ``min_score`` and, with
   ``temporal_k`` > 1, consistent over k keyframes.
5. The keyframe joins the map (transactional: see :class:`PlaceMap`), with its
   local features (OpenCV SIFT keypoints, descriptors, rays and, with a
   registered depth image, 3-D points: :mod:`pnv_ros.local_features`),
   extracted with the patches, outside the lock.
6. **Relative pose.** An accepted loop's pose comes from the local features
   of the two keyframes, matched near the patch correspondences that verified
   the place (:func:`pnv_ros.loop_pose.estimate_loop_pose`): ``METRIC`` when either
   keyframe has depth points (the match's, else the query's, inverted), else ``ROTATION_AND_DIRECTION`` or
   ``ROTATION_ONLY``; None without a camera, local features, rays, evidence, or
   when the two images differ in size. Parent = query camera, child = matched
   camera (see :class:`pnv_ros.geometry.RelativePose`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pnv_ros.camera_model import CameraModel
from pnv_ros.config import DetectorParams, Matcher, Preset
from pnv_ros.errors import ConfigError, ImageError
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import PlaceFeatures, patch_keypoints, to_image_pixels
from pnv_ros.geometry import RelativePose
from pnv_ros.images import ImageSource, load_image
from pnv_ros.local_features import LocalFeatures, extract_local_features
from pnv_ros.loop_pose import estimate_loop_pose
from pnv_ros.matching import PatchMatcher, ScaleMatch, rerank_order
from pnv_ros.place_map import PlaceMap

if TYPE_CHECKING:  # the fleet's modules are imported by whoever makes a FleetMember
    from pnv_ros.fleet.member import FleetCandidate, FleetMember

#: A stamp at most this much older than the previous frame's is out of order (skipped);
#: further back it is a clock jump (new session segment). 1 s: well above the reordering
#: of multi-threaded camera drivers, well below any clock reset or bag loop.
OUT_OF_ORDER_S = 1.0

#: Seconds a service query (:meth:`LoopClosureDetector.query`) waits for the fleet's candidates: 5 s, longer
#: than a frame's deadline (a graph optimizer asking is not the camera's frame rate), within a service timeout.
SERVICE_WAIT_S = 5.0

#: L2 distance at or below which two global descriptors (unit, float32) are the same keyframe's: 1e-4. The
#: closest two different frames of the RTAB-Map loop (default model, speed preset) are 0.43 apart (median
#: nearest 0.63); a descriptor read back from the fleet store is bit-identical (float32 in, float32 out).
SAME_DESCRIPTOR = 1e-4

#: What a frame's camera may be: a CameraModel, a (3, 3) camera matrix K (no distortion), or a callable that
#: gives one (or None) for the image size (width, height), passed as one tuple.
CameraArg = CameraModel | np.ndarray | Callable[[tuple[int, int]], "CameraModel | np.ndarray | None"] | None
#: What a frame's depth may be: (H, W) float32 metres registered to the colour image (NaN = no measurement;
#: see :func:`pnv_ros.local_features.depth_in_metres`), or a callable giving that (or None), called only for an
#: admitted frame, after decoding.
DepthArg = np.ndarray | Callable[[], "np.ndarray | None"] | None


@dataclass
class Candidate:
    """A re-ranked candidate. score: absolute 0..1, higher better; counts from ``patch_size``'s scale.

    A candidate from the fleet store (:attr:`from_fleet`: another robot's keyframe or an earlier session of this
    robot) has ``id`` -1 and its origin in ``robot_id``, ``session``, ``seq`` and ``fleet_id`` (the store's id);
    a local one has ``fleet_id`` -1 and empty origin fields.
    """

    id: int
    stamp_ns: int
    score: float
    fused: float
    global_distance: float
    num_matches: int
    num_inliers: int
    patch_size: int
    details: list[ScaleMatch] | None = None
    fleet_id: int = -1
    robot_id: str = ""
    session: str = ""
    seq: int = -1

    @property
    def from_fleet(self) -> bool:
        return self.id < 0


@dataclass
class LoopClosure:
    """An accepted loop closure between the query keyframe and an older one.

    relative_pose: the match camera in the query camera from the two keyframes' local features
    (:func:`pnv_ros.loop_pose.estimate_loop_pose`): METRIC (rotation, translation in metres, (6, 6)
    covariance) when either keyframe has depth points, else ROTATION_AND_DIRECTION or ROTATION_ONLY; None
    without a camera, local features (or their rays), evidence, or for images of two sizes.
    match_from_loaded_map: the matched keyframe came with a loaded map (an earlier run), not
    from this run: its stamp is that run's clock, which may overlap this one's after a restart.
    match_from_fleet: the match came from the fleet store (another robot, or an earlier session of this robot;
    ``match_id`` is then 0 and the match is not in the local map). match_robot_id, match_session, match_seq: the
    match's key in the fleet (robot, session = one map generation of that robot, number in that session; for a
    local match of this run: this robot, its current session, ``match_id`` minus the run's first id; empty / -1
    without a fleet or for a match from a loaded map). match_fleet_id: the store's id, -1 while not stored.
    """

    query_id: int
    query_stamp_ns: int
    match_id: int
    match_stamp_ns: int
    score: float
    global_distance: float
    num_matches: int
    num_inliers: int
    patch_size: int
    method: str
    relative_pose: RelativePose | None = None
    details: list[ScaleMatch] | None = None  # per scale, the patch matches behind the score
    match_from_loaded_map: bool = False
    match_from_fleet: bool = False
    match_robot_id: str = ""
    match_session: str = ""
    match_seq: int = -1
    match_fleet_id: int = -1


@dataclass
class FrameResult:
    """What happened to one frame.

    status: 'keyframe', or why it was skipped: 'duplicate', 'out_of_order', 'too_soon',
    'no_motion', 'no_information', 'no_visual_change', 'map_changed' (reset/load while it was extracted).
    time_jump: this frame's stamp went back in time (new session segment).
    timings: seconds per stage of a keyframe: ``decode`` (the image to an array) and ``look`` (the picture
    tests) of a frame given as an image; the extractor's ``preprocess``, ``backbone``, ``pooling`` and
    ``patch_descriptors`` where it reports them (:func:`extractor_stages`); ``local_features``; ``extract``
    (patches + local features); ``retrieval`` (the fleet's candidates, ``fleet``, and the FAISS top-n);
    ``rerank`` (patch matching); ``map_add``; ``pose`` (an accepted loop's); ``commit`` (retrieval to pose);
    ``total`` = extract + commit (decode and look not included).
    generation: of a keyframe, the map generation it joined (bumped by reset and load; see
    :attr:`LoopClosureDetector.generation`); None for a skipped frame.
    """

    keyframe_id: int | None
    status: str = "keyframe"
    candidates: list[Candidate] = field(default_factory=list)
    loop: LoopClosure | None = None
    timings: dict[str, float] = field(default_factory=dict)
    time_jump: bool = False
    generation: int | None = None


@dataclass
class Admission:
    """:meth:`LoopClosureDetector.admit`'s answer: extract this frame, or why not."""

    extract: bool
    status: str
    stamp_ns: int
    session_ns: int = 0
    generation: int = 0
    position: np.ndarray | None = None
    orientation: np.ndarray | None = None
    time_jump: bool = False
    thumb: np.ndarray | None = None  # (24, 32) grey thumbnail when the picture was looked at


@dataclass
class _LastKeyframe:
    session_ns: int
    thumb: np.ndarray | None
    position: np.ndarray | None
    orientation: np.ndarray | None


#: Thumbnail size (width, height) of the visual-change test: 16x16-pixel block means of a
#: 512x384 frame, which average sensor noise away (sigma 20 -> 1.3 grey levels).
THUMB_SIZE = (32, 24)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """(24, 32) float64 grey thumbnail (box-filtered) of an RGB or grey image (H, W[, C])."""
    from PIL import Image

    from pnv_ros.images import to_uint8

    a = to_uint8(np.asarray(image), "frame")  # the package's one bit-depth rule: a dark frame stays dark
    if a.ndim == 3:
        a = a[:, :, 0] if a.shape[2] == 1 else a[:, :, :3]
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).convert("L").resize(THUMB_SIZE, Image.BOX), np.float64)


def texture(image: np.ndarray) -> float:
    """The information test's measure: standard deviation (grey levels, 0..255) of the
    :func:`thumbnail` of an image (H, W[, C]). A lens cap, darkness or a white-out measures
    under 1; see ``DetectorParams.min_texture`` for the threshold and its source."""
    return float(thumbnail(image).std())


def visual_change(a: np.ndarray, b: np.ndarray) -> float:
    """How much a picture changed between two thumbnails: 1 - their normalised cross-correlation.

    0 = the same picture (whatever the exposure), 1 = unrelated, up to 2 = inverted. Two flat
    (textureless) thumbnails count as unchanged; one flat and one textured as changed (1).
    """
    a, b = a - a.mean(), b - b.mean()
    na, nb = float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    flat = 1e-6 * a.size
    if na < flat or nb < flat:
        return 0.0 if (na < flat and nb < flat) else 1.0
    return 1.0 - float((a * b).sum()) / (na * nb)


class Session:
    """Per-run state, apart from the map: cleared on reset and load.

    run_start: first keyframe id of this run; the map's keyframes before it come from
    earlier runs (a loaded map). times: session clock (ns, never decreasing) of this
    run's keyframes, sorted, for the recent-time exclusion.
    """

    def __init__(self, run_start: int = 0, history: int = 20) -> None:
        self.run_start = run_start
        self.times = np.zeros(0, np.int64)
        self.n = 0
        self.last_stamp: int | None = None
        self.last_session: int = 0
        self.offset = 0
        self.last_wall = 0.0
        self.last_kf: _LastKeyframe | None = None
        self.history: deque[int | None] = deque(maxlen=history)

    def clock(self, stamp_ns: int) -> tuple[int, bool]:
        """Session time of a new (not duplicate) stamp, and whether it jumped back."""
        if self.last_stamp is None or stamp_ns > self.last_stamp:
            return stamp_ns + self.offset, False
        elapsed = max(1, int((time.monotonic() - self.last_wall) * 1e9))
        return self.last_session + elapsed, True

    def see(self, stamp_ns: int, session_ns: int) -> None:
        self.offset = session_ns - stamp_ns
        self.last_stamp, self.last_session, self.last_wall = stamp_ns, session_ns, time.monotonic()

    def add(self, session_ns: int) -> None:
        if self.n == len(self.times):
            grown = np.zeros(max(64, 2 * self.n), np.int64)
            grown[: self.n] = self.times[: self.n]
            self.times = grown
        self.times[self.n] = session_ns
        self.n += 1


#: The extractor's own stages, as its ``last_timings`` names them (seconds of the calling thread's last
#: ``extract_one``): what :meth:`LoopClosureDetector.process` reports beside its own.
EXTRACTOR_STAGES = ("preprocess", "backbone", "pooling", "patch_descriptors")


def extractor_stages(extractor: Any) -> dict[str, float]:
    """The extractor's stage seconds of this thread's last ``extract_one`` (:data:`EXTRACTOR_STAGES`, from its
    ``last_timings``: a mapping of stage name to seconds, this thread's); those it does not report are left out
    (an extractor without ``last_timings``, or with one that is not a mapping: none)."""
    last = getattr(extractor, "last_timings", None)
    if not isinstance(last, Mapping):
        return {}
    return {k: float(last[k]) for k in EXTRACTOR_STAGES if k in last}


def _rotation_angle(q1: np.ndarray, q2: np.ndarray) -> float:
    """Angle (rad) between two orientations given as quaternions (x, y, z, w)."""
    d = abs(float(np.dot(q1 / np.linalg.norm(q1), q2 / np.linalg.norm(q2))))
    return 2.0 * float(np.arccos(min(1.0, d)))


class LoopClosureDetector:
    """Keyframe map plus loop detection with one extractor and preset; thread-safe."""

    COUNTERS = (
        "frames",
        "keyframes",
        "loops",
        "duplicate",
        "out_of_order",
        "time_jumps",
        "too_soon",
        "no_motion",
        "no_information",
        "no_visual_change",
        "map_changed",
        "bad_depth",  # a keyframe's depth image not used: another size, not (H, W) float32, no valid depth
        "bad_camera",  # a keyframe's camera not used: for another image size, or not a camera matrix
    )

    def __init__(
        self,
        extractor: FeatureExtractor,
        params: DetectorParams | None = None,
        index_kind: str = "flat",
        patch_dtype: str = "float16",
        memory_budget_mb: float = 0.0,
        spill_dir: str | Path | None = None,
    ):
        self.extractor = extractor
        self.preset: Preset = extractor.preset
        self._params = params or DetectorParams()
        self.lock = threading.RLock()
        self._matchers: dict[tuple[Matcher, bool], PatchMatcher] = {}
        self.map_options = {
            "index_kind": index_kind,
            "patch_dtype": patch_dtype,
            "memory_budget_mb": memory_budget_mb,
            "spill_dir": spill_dir,
        }
        self.map = self.new_map()
        self.session = Session()
        self.generation = 0  # bumped by reset and load: frames admitted before are dropped
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self.fleet: FleetMember | None = None

    def join_fleet(self, member: FleetMember) -> None:
        """Take part in a fleet: keyframes of this run (and every later map) go up through ``member``'s outbox,
        and each query also searches the fleet store (:class:`~pnv_ros.fleet.member.FleetMember`)."""
        with self.lock:
            self.fleet = member
            member.track(self.map, self.session.run_start)

    @property
    def model_id(self) -> str:
        return self.extractor.info.identity if self.extractor.info else ""

    def new_map(self) -> PlaceMap:
        """An empty map with this detector's model, preset and storage options."""
        return PlaceMap(self.extractor.dim, self.preset, self.model_id, **self.map_options)

    # -- configuration ------------------------------------------------------------------
    @property
    def params(self) -> DetectorParams:
        return self._params

    @params.setter
    def params(self, value: DetectorParams) -> None:
        with self.lock:  # a frame in progress keeps the params it started with
            self._params = value

    def matcher_for(self, name: str | None = None) -> PatchMatcher:
        """The (cached) matcher for a name, '' or None = the params' or preset's.
        Matchers hold work buffers: use under the lock. An extractor on a fast path (any precision but fp32:
        ``FeatureExtractor.pooling`` "fast") re-ranks with bfloat16 similarity products where the device has
        them (``PatchMatcher`` ``bf16``)."""
        m = Matcher.parse(name or self._params.matcher or self.preset.matcher)
        exact = not self._params.fast_products
        bf16 = getattr(self.extractor, "pooling", "exact") == "fast"  # the fast paths' products: bfloat16
        if (m, exact, bf16) not in self._matchers:
            self._matchers[(m, exact, bf16)] = PatchMatcher(
                self.preset, m, device=self.extractor.device, exact=exact, bf16=bf16
            )
        return self._matchers[(m, exact, bf16)]

    def reset(self) -> None:
        """Empty the map (same storage options) and start a new session."""
        with self.lock:
            self.map = self.new_map()
            self._new_session(0)
            if self.fleet is not None:
                self.fleet.track(self.map, 0)

    def load_map(self, path: str | Path) -> int:
        """Replace the map by a saved one (checked against this model and preset); a new run
        starts after its keyframes. Returns the keyframe count. Raises MapError; the current map
        stays on any error."""
        o = self.map_options
        m = PlaceMap.load(
            path,
            self.extractor.dim,
            self.preset,
            o["memory_budget_mb"],
            o["spill_dir"],
            expect_model_id=self.model_id,
            index_kind=o["index_kind"],
            patch_dtype=o["patch_dtype"],
        )
        with self.lock:
            self.map = m
            self._new_session(len(m))
            if self.fleet is not None:  # what an earlier run of this robot left unsent goes first
                self.fleet.resume(m, m.notes.get("fleet"), len(m))
        return len(m)

    def save_map(self, path: str | Path) -> int:
        """Save the map atomically; the lock is held only to take a snapshot. Returns the count. In a fleet the
        file also records which keyframes are not uploaded yet (:meth:`FleetMember.watermarks`), which
        :meth:`load_map` sends. Raises OSError (the previous file stays)."""
        with self.lock:
            snap = self.map.snapshot()
            if self.fleet is not None:  # the uploads' watermarks: a run that loads the file sends the rest
                snap.note("fleet", self.fleet.watermarks(self.map))
        snap.write(path)
        return len(snap.stamps)

    def _new_session(self, run_start: int) -> None:
        self.session = Session(run_start)
        self.generation += 1

    # -- per frame ------------------------------------------------------------------------
    def admit(
        self, stamp_ns: int, position: np.ndarray | None = None, orientation: np.ndarray | None = None
    ) -> Admission:
        """Time checks and the odometry keyframe policy, before any extraction.

        position: (3,) metres, orientation: quaternion (x, y, z, w), both in the odometry frame
        (or None). Frames not admitted are counted; admitted ones must go to :meth:`commit`.
        """
        stamp_ns = int(stamp_ns)
        with self.lock:
            s, p = self.session, self._params
            self.counts["frames"] += 1
            if s.last_stamp is not None and stamp_ns == s.last_stamp:
                return self._skip("duplicate", stamp_ns)
            if s.last_stamp is not None and 0 < s.last_stamp - stamp_ns <= OUT_OF_ORDER_S * 1e9:
                return self._skip("out_of_order", stamp_ns)
            now, jump = s.clock(stamp_ns)
            s.see(stamp_ns, now)
            self.counts["time_jumps"] += int(jump)
            pos = None if position is None else np.asarray(position, np.float64).reshape(3)
            ori = None if orientation is None else np.asarray(orientation, np.float64).reshape(4)
            last = s.last_kf
            if last is not None:
                if (now - last.session_ns) / 1e9 < p.min_interval_s:
                    return self._skip("too_soon", stamp_ns, jump)
                if pos is not None and last.position is not None:
                    moved = float(np.linalg.norm(pos - last.position)) >= p.min_travel_m
                    turned = (
                        ori is not None
                        and last.orientation is not None
                        and _rotation_angle(ori, last.orientation) >= p.min_rotation_rad
                    )
                    if not (moved or turned):
                        return self._skip("no_motion", stamp_ns, jump)
            return Admission(True, "extract", stamp_ns, now, self.generation, pos, ori, jump)

    def look(self, adm: Admission, image: np.ndarray) -> Admission:
        """The picture tests of an admitted frame (decoded image (H, W[, C])), before extraction.

        Information: a frame whose grey thumbnail varies less than ``min_texture`` (a lens cap,
        darkness, a white-out) is never a keyframe ('no_information'): two such frames look alike
        wherever they are taken. Visual change, when the pose did not decide (no odometry for this
        frame or the last keyframe): 'no_visual_change' below ``min_visual_change``.
        Returns the admission to extract, or one with the reason it is not.
        """
        if not adm.extract:
            return adm
        thumb = thumbnail(image)
        with self.lock:
            last, p = self.session.last_kf, self._params
            if float(thumb.std()) < p.min_texture:  # texture(image), without a second thumbnail
                return self._skip("no_information", adm.stamp_ns, adm.time_jump)
            adm = replace(adm, thumb=thumb)
            pose_decided = adm.position is not None and last is not None and last.position is not None
            if last is None or pose_decided or last.thumb is None or p.min_visual_change <= 0:
                return adm
            if visual_change(thumb, last.thumb) < p.min_visual_change:
                return self._skip("no_visual_change", adm.stamp_ns, adm.time_jump)
            return adm

    def _skip(self, status: str, stamp_ns: int, jump: bool = False) -> Admission:
        self.counts[status] += 1
        return Admission(False, status, stamp_ns, time_jump=jump)

    def commit(
        self, adm: Admission, features: PlaceFeatures, camera: CameraModel | np.ndarray | None = None
    ) -> FrameResult:
        """An admitted frame's features: visual-change test, retrieval, acceptance, map add, the loop's pose.

        features: with ``features.local`` (or None) stored with the keyframe. camera: the query image's
        :class:`CameraModel` (or a (3, 3) K without distortion) for the relative pose, or None (no pose).
        Raises MapError when the features do not fit the map (nothing is then changed).
        """
        t0 = time.perf_counter()
        recent = self._params.exclude_recent_keyframes
        remote = self._fleet_lookup(features.global_desc, recent=recent)  # outside the lock: at most the deadline
        t_fleet = time.perf_counter() - t0
        with self.lock:
            s, p = self.session, self._params
            if adm.generation != self.generation:
                self.counts["map_changed"] += 1
                return FrameResult(
                    None, "map_changed", timings={"commit": time.perf_counter() - t0}, time_jump=adm.time_jump
                )
            self.map.check_fits(features)  # a MapError before anything is matched or changed
            limit = self._limit(adm.session_ns, p)
            stages: dict[str, float] = {}
            cands = self._candidates(features, limit, p.top_n, None, None, True, remote, stages)
            t1 = time.perf_counter()
            kf_id = self.map.add(features, adm.stamp_ns, adm.position)
            if self.fleet is not None:
                self.fleet.added(kf_id, self.map)
            s.add(adm.session_ns)
            s.last_kf = _LastKeyframe(adm.session_ns, adm.thumb, adm.position, adm.orientation)
            self.counts["keyframes"] += 1
            t_add = time.perf_counter() - t1
            best = max(cands, key=lambda c: c.score) if cands else None  # ties: the re-ranked order
            best = best if best is not None and best.score >= p.min_score else None
            s.history.append(None if best is None else self._history_key(best))
            result = FrameResult(
                kf_id,
                "keyframe",
                cands,
                timings={
                    "retrieval": t_fleet + stages.get("retrieval", 0.0),
                    "rerank": stages.get("rerank", 0.0),
                    "fleet": t_fleet,
                    "map_add": t_add,
                },
                time_jump=adm.time_jump,
                generation=adm.generation,
            )
            if best is not None and self._consistent(p):
                self.counts["loops"] += 1
                result.loop = self._loop(kf_id, adm.stamp_ns, best, Matcher.parse(p.matcher or self.preset.matcher))
                if best.from_fleet:
                    match = next(r.keyframe.features for r in remote if r.keyframe.id == best.fleet_id)
                else:
                    size, local = self.map.image_size(best.id), self.map.local_features(best.id)
                    match = PlaceFeatures(np.empty(0), [], size, local)
        if result.loop is not None and best is not None and best.details:
            t2 = time.perf_counter()
            cam = self._camera(camera, features.image_size)[0]
            result.loop.relative_pose = self._pose(features, match, best.details, cam)
            result.timings["pose"] = time.perf_counter() - t2
        result.timings["commit"] = time.perf_counter() - t0
        return result

    def process(
        self,
        image: ImageSource | PlaceFeatures | Any,
        stamp_ns: int,
        position: np.ndarray | None = None,
        camera: CameraArg = None,
        orientation: np.ndarray | None = None,
        decode: Callable[[Any], np.ndarray] | None = None,
        depth: DepthArg = None,
    ) -> FrameResult:
        """One frame, the one pipeline: :meth:`admit`, decoding and :meth:`look` (images only), extraction
        of the patches and the local features (outside the lock), :meth:`commit`.

        image: a path, array or PIL image; features already extracted (no picture tests, and only their own
        ``local`` features, then); or whatever ``decode`` turns into an image array (H, W[, C]), such as the
        node's ROS message. Only an admitted frame is decoded; what ``decode`` raises (ImageError for a bad
        message) goes to the caller.
        camera: the image's :class:`CameraModel`, a (3, 3) camera matrix K (no distortion), or a callable
            giving either (or None) for the image size (width, height) as one tuple, called after decoding.
            Without one (None, or a callable answering None), no local features are extracted (no pose could
            use them: ~0.15 s a 640 x 480 frame saved) and loops have no pose. A camera for another image size
            (its ``size``) or a matrix that is not one is not used and is counted (``bad_camera``): the
            keyframe keeps local features without rays.
        depth: (H, W) float32 metres registered to the colour image (NaN = none), or a callable giving it (or
            None), called only for an admitted frame with a camera, after decoding; what it raises goes to
            the caller. A
            depth image of another size, not float32 (H, W), or without one valid depth is not used and is
            counted (``bad_depth``): the keyframe is kept without 3-D points.
        """
        adm = self.admit(stamp_ns, position, orientation)
        before: dict[str, float] = {}
        if adm.extract and not isinstance(image, PlaceFeatures):
            t = time.perf_counter()
            image = decode(image) if decode is not None else np.asarray(load_image(image))
            t_decoded = time.perf_counter()
            adm = self.look(adm, image)
            before = {"decode": t_decoded - t, "look": time.perf_counter() - t_decoded}
        if not adm.extract:
            return FrameResult(None, adm.status, time_jump=adm.time_jump)
        t0 = time.perf_counter()
        if isinstance(image, PlaceFeatures):
            feats, t_local = image, 0.0
            cam, _ = self._camera(camera, feats.image_size)
        else:
            feats = self.extractor.extract_one(image)
            t1 = time.perf_counter()
            before.update(extractor_stages(self.extractor))
            cam, rejected = self._camera(camera, feats.image_size)
            if cam is not None or rejected:  # no camera at all: no pose can use them, so none are extracted
                feats = replace(feats, local=self._local_features(image, cam, depth))
            t_local = time.perf_counter() - t1
        t_extract = time.perf_counter() - t0
        result = self.commit(adm, feats, cam)
        result.timings.update(before)
        result.timings["extract"] = t_extract
        result.timings["local_features"] = t_local
        result.timings["total"] = t_extract + result.timings["commit"]
        return result

    def _camera(self, camera: CameraArg, size: tuple[int, int]) -> tuple[CameraModel | None, bool]:
        """The CameraModel of an image of ``size`` (width, height) from :meth:`process`'s ``camera`` (or None),
        and whether one was given but rejected: one that does not fit (another size, not a camera matrix) is
        counted as ``bad_camera``."""
        c = camera(tuple(size)) if callable(camera) else camera
        if c is None:
            return None, False
        try:
            model = c if isinstance(c, CameraModel) else CameraModel(np.asarray(c, np.float64).reshape(3, 3))
        except (ConfigError, ValueError):
            model = None
        if model is None or (model.size is not None and tuple(model.size) != tuple(size)):
            with self.lock:
                self.counts["bad_camera"] += 1
            return None, True
        return model, False

    def _local_features(self, image: np.ndarray, camera: CameraModel | None, depth: DepthArg) -> LocalFeatures:
        """SIFT keypoints, rays and depth points of an admitted frame (outside the lock); an unusable depth
        image is counted (``bad_depth``) and left out."""
        from pnv_ros.images import to_uint8

        a = to_uint8(np.asarray(image), "frame")  # the package's one bit-depth rule, as the thumbnail's
        if a.ndim == 3 and a.shape[2] not in (1, 3):
            a = a[:, :, :3]  # RGBA: the colour
        d = depth() if callable(depth) else depth
        if d is not None:
            d = np.asarray(d)
            size = a.shape[:2]
            if d.shape != size or d.dtype != np.float32 or not np.isfinite(d).any():
                with self.lock:
                    self.counts["bad_depth"] += 1
                d = None
        return extract_local_features(a, camera, d)

    def _limit(self, session_ns: int, p: DetectorParams) -> int:
        """Keyframe ids below this are candidates: older than the time and count windows of this run."""
        s, n = self.session, len(self.map)
        by_time = s.run_start + int(
            np.searchsorted(s.times[: s.n], session_ns - int(p.exclude_recent_s * 1e9), "right")
        )
        by_count = max(s.run_start, n - p.exclude_recent_keyframes)
        return min(by_time, by_count)

    def _consistent(self, p: DetectorParams) -> bool:
        """The last k keyframes' best candidates are of one origin (this map, or one fleet session) and within
        ``temporal_tolerance`` of each other (keyframe ids, or sequence numbers in that session)."""
        k = p.temporal_k
        recent = list(self.session.history)[-k:]
        if len(recent) < k or any(r is None for r in recent):
            return False
        return all(a[0] == b[0] and abs(a[1] - b[1]) <= p.temporal_tolerance for a, b in zip(recent, recent[1:]))

    @staticmethod
    def _history_key(c: Candidate) -> tuple[tuple[str, str], int]:
        """A candidate's place in its own sequence: ((robot, session), seq) from the fleet, (('', ''), id) here."""
        return ((c.robot_id, c.session), c.seq) if c.from_fleet else (("", ""), c.id)

    def _loop(self, kf_id: int, stamp_ns: int, best: Candidate, matcher: Matcher) -> LoopClosure:
        """The accepted loop to ``best`` with the match's origin (under the lock); its edge queued for the fleet."""
        run_start, fleet = self.session.run_start, self.fleet
        lc = LoopClosure(
            kf_id,
            stamp_ns,
            max(best.id, 0),
            best.stamp_ns,
            best.score,
            best.global_distance,
            best.num_matches,
            best.num_inliers,
            best.patch_size,
            matcher.value,
            None,
            best.details,
            0 <= best.id < run_start,
        )
        if best.from_fleet:
            lc.match_from_fleet, lc.match_robot_id, lc.match_session = True, best.robot_id, best.session
            lc.match_seq, lc.match_fleet_id = best.seq, best.fleet_id
        elif fleet is not None:
            lc.match_robot_id = fleet.robot_id
            if best.id >= run_start:
                lc.match_session, lc.match_seq = fleet.session, best.id - run_start
                lc.match_fleet_id = fleet.fleet_id(lc.match_seq)
        if fleet is not None:
            fleet.loop(kf_id, lc.score, lc.method, match_id=best.id, match_fleet_id=best.fleet_id)
        return lc

    def _fleet_lookup(
        self, global_desc: np.ndarray, wait_s: float | None = None, recent: int = 0
    ) -> list[FleetCandidate]:
        """Fleet candidates for a descriptor (none without a fleet, or when its answer is late: see
        :meth:`FleetMember.lookup`). Called outside the lock."""
        fleet = self.fleet
        return [] if fleet is None else fleet.lookup(global_desc, wait_s=wait_s, recent=recent)

    # -- retrieval and verification -------------------------------------------------------
    def query(
        self,
        features: PlaceFeatures,
        top_n: int | None = None,
        matcher: str | None = None,
        exclude_id: int | None = None,
        limit: int | None = None,
    ) -> list[Candidate]:
        """Re-ranked candidates (best first by fused score) among keyframe ids < limit (all when None), and with a
        fleet its candidates too (:meth:`join_fleet`; waiting up to :data:`SERVICE_WAIT_S` for them)."""
        remote = self._fleet_lookup(features.global_desc, wait_s=SERVICE_WAIT_S)
        with self.lock:
            n = len(self.map) if limit is None else limit
            return self._candidates(features, n, top_n or self._params.top_n, matcher, exclude_id, remote=remote)

    def query_image(self, image: np.ndarray, top_n: int | None = None, matcher: str | None = None) -> list[Candidate]:
        """:meth:`query` for an image (H, W[, C]) that is not in the map (extracted outside the lock).

        Raises ImageError when it has no information (texture under ``min_texture``: a lens cap, darkness, a
        white-out): its candidates would be noise (two blank frames score 0.22), as it would never be a keyframe.
        """
        t, least = texture(image), self._params.min_texture
        if t < least:
            raise ImageError(
                f"the image has no information (texture {t:.1f} < min_texture {least:g} grey levels: "
                f"a lens cap, darkness or a white-out); it is never a keyframe and is not queried"
            )
        return self.query(self.extractor.extract_one(image), top_n, matcher)

    def query_keyframe(
        self,
        kf_id: int | None = None,
        stamp_ns: int | None = None,
        top_n: int | None = None,
        matcher: str | None = None,
    ) -> list[Candidate]:
        """:meth:`query` for a stored keyframe, given by id or else by stamp (itself excluded).
        Raises UnknownPlaceError; ValueError when given neither."""
        if kf_id is None and stamp_ns is None:
            raise ValueError("query_keyframe needs a keyframe id or a stamp")
        with self.lock:
            kf = self.map.get(kf_id) if kf_id is not None else self.map.by_stamp(int(stamp_ns or 0))
            feats = self.features_of(kf.id)
        return self.query(feats, top_n, matcher, kf.id)

    def features_of(self, kf_id: int) -> PlaceFeatures:
        """A stored keyframe's features (copies: safe to use outside the lock). Raises UnknownPlaceError."""
        with self.lock:
            f = self.map.get(kf_id).features  # local features: copies already
            index = None if f.patch_index is None else [np.array(i) for i in f.patch_index]
            return PlaceFeatures(
                f.global_desc.copy(), [np.array(p, np.float32) for p in f.patches], f.image_size, f.local, index
            )

    def _nearest(self, global_desc: np.ndarray, limit: int, n: int, exclude_id: int | None) -> list[tuple[int, float]]:
        """The global stage: up to ``n`` (id, L2 distance) of keyframes with id < ``limit`` but ``exclude_id``,
        nearest first. One FAISS search restricted to the id range; no per-keyframe Python work."""
        if limit <= 0 or len(self.map) == 0:
            return []
        k = n + (1 if exclude_id is not None else 0)
        dists, ids = self.map.index.search(global_desc, k, limit)
        return [(int(i), float(d)) for i, d in zip(ids[0], dists[0]) if 0 <= i < limit and i != exclude_id][:n]

    def _candidates(
        self,
        features: PlaceFeatures,
        limit: int,
        n: int,
        matcher: str | None,
        exclude_id: int | None,
        details: bool = False,
        remote: list[FleetCandidate] | tuple = (),
        timings: dict[str, float] | None = None,
    ) -> list[Candidate]:
        """The local top ``n`` below ``limit`` and the fleet's ``remote`` candidates, re-ranked together by one
        matcher (under the lock). Fleet keyframes of this robot that the local map holds (a loaded map that was
        uploaded) are left out: the local copy answers. ``timings``, when given, gets the seconds of the global
        stage (``retrieval``: FAISS top-n and the held-locally check) and of the re-ranking (``rerank``)."""
        t0 = time.perf_counter()
        pairs = self._nearest(features.global_desc, limit, n, exclude_id)
        remote = self._not_held_locally(remote)
        t1 = time.perf_counter()
        if timings is not None:
            timings["retrieval"] = t1 - t0
        if not pairs and not remote:
            return []
        pm = self.matcher_for(matcher)
        dbs = [
            PlaceFeatures(np.empty(0), self.map.patches(i), (0, 0), patch_index=self.map.patch_index(i))
            for i, _ in pairs
        ]
        dbs += [
            PlaceFeatures(np.empty(0), f.patches, (0, 0), patch_index=f.patch_index)
            for f in (r.keyframe.features for r in remote)
        ]
        sc = pm.score(features, dbs, details=details)
        dists = [d for _, d in pairs] + [r.distance for r in remote]
        fused = pm.fuse(sc.raw, np.array(dists))
        absolute, dom = pm.absolute(sc.raw), pm.dominant_scale(sc.raw)
        stamps = self.map.stamps
        origins = [(i, int(stamps[i]), -1, "", "", -1) for i, _ in pairs]
        origins += [(-1, k.stamp_ns, k.id, k.robot_id, k.session, k.seq) for k in (r.keyframe for r in remote)]
        out = [
            Candidate(
                i,
                stamp,
                float(absolute[j]),
                float(fused[j]),
                dists[j],
                int(sc.num_matches[j, dom[j]]),
                int(sc.num_inliers[j, dom[j]]),
                int(self.preset.patch_sizes[dom[j]]),
                sc.details[j] if details else None,
                fleet_id,
                robot,
                session,
                seq,
            )
            for j, (i, stamp, fleet_id, robot, session, seq) in enumerate(origins)
        ]
        order = [out[j] for j in rerank_order(fused)]
        if timings is not None:
            timings["rerank"] = time.perf_counter() - t1
        return order

    def _not_held_locally(self, remote: list[FleetCandidate] | tuple) -> list[FleetCandidate]:
        """The fleet candidates the local map does not hold too. A held one is the same keyframe (a loaded map
        that was uploaded, by this robot or the one whose map it is): a local keyframe with the same global
        descriptor, found by one batched search of the whole map (under the lock). Not by stamp: a robot whose
        clock restarts at 0 repeats stamps in other places."""
        if not remote or len(self.map) == 0:
            return list(remote)
        dists, _ = self.map.index.search(np.stack([r.keyframe.features.global_desc for r in remote]), 1)
        return [r for r, d in zip(remote, dists) if not (d.size and float(d[0]) <= SAME_DESCRIPTOR)]

    def verify(
        self,
        a: PlaceFeatures,
        b: PlaceFeatures,
        matcher: str | None = None,
        camera: CameraModel | np.ndarray | None = None,
    ) -> tuple[float, int, int, RelativePose | None]:
        """Score one pair: (absolute score, matches, inliers (dominant scale), relative pose or None).

        The pose (a = query = parent, b = match = child) comes from ``a.local`` and ``b.local`` as a loop's
        (see :meth:`commit`); None when the score is below ``params.min_score`` (not a loop: the detector
        would never publish one), without ``camera`` (a :class:`CameraModel` or (3, 3) K), local features,
        rays, evidence, or for images of two sizes.
        """
        with self.lock:
            pm = self.matcher_for(matcher)
            sc = pm.score(a, [b], details=True)
            s = int(pm.dominant_scale(sc.raw)[0])
            score = float(pm.absolute(sc.raw)[0])
            least = self._params.min_score
        cam = self._camera(camera, a.image_size)[0]
        pose = self._pose(a, b, sc.details[0], cam) if score >= least else None
        return score, int(sc.num_matches[0, s]), int(sc.num_inliers[0, s]), pose

    def patch_pairs(
        self, query_size: tuple[int, int], match_size: tuple[int, int], details: list[ScaleMatch]
    ) -> np.ndarray:
        """(M, 4) float64 image pixels (xq, yq, xm, ym) of the verified patch correspondences of the scale with
        the most inliers (all its mutual matches when it has none): where the local features are matched."""
        s = int(np.argmax([d.num_inliers for d in details]))
        d = details[s]
        sel = d.inliers if d.inliers.any() else np.ones(d.num_matches, bool)
        kp = patch_keypoints(self.preset, s)
        pq = to_image_pixels(kp, self.preset, query_size)[d.query_idx[sel]]
        pm = to_image_pixels(kp, self.preset, match_size)[d.db_idx[sel]]
        return np.hstack([pq, pm]).astype(np.float64).reshape(-1, 4)

    def _pose(
        self, query: PlaceFeatures, match: PlaceFeatures, details: list[ScaleMatch], camera: CameraModel | None
    ) -> RelativePose | None:
        """The loop's pose from the two keyframes' local features, or None: no camera, no local features or
        rays on either side, images of two sizes (one camera cannot describe both), or no evidence. Bad input
        costs the pose, never the keyframe or its loop."""
        ql, ml = query.local, match.local
        if camera is None or ql is None or ml is None or ql.rays is None or ml.rays is None:
            return None
        if tuple(query.image_size) != tuple(match.image_size):
            return None
        try:
            pairs = self.patch_pairs(query.image_size, match.image_size, details)
            return estimate_loop_pose(ql, ml, camera, pairs)
        except (ConfigError, ValueError, cv2.error, np.linalg.LinAlgError):
            return None

    def stats(self) -> dict[str, int | str]:
        """Counters since start (frames, keyframes, loops, skips by reason, time jumps) and map state."""
        with self.lock:
            return {
                **self.counts,
                "map_keyframes": len(self.map),
                "run_start": self.session.run_start,
                "spill_failures": self.map.spill_failures,
                "keyframes_on_disk": self.map.keyframes_on_disk,
                "ram_patch_bytes": self.map.ram_patch_bytes,
                "ram_local_bytes": self.map.ram_local_bytes,
                "bytes_per_keyframe": int(self.map.nbytes_per_keyframe()),
                "store_trouble": self.map.trouble or "",
                **({} if self.fleet is None else self.fleet.status()[2]),
            }
