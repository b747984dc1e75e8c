"""LoopClosureDetector: keyframes in, loop closures out. No ROS.

The one object the ROS node, the CLI and the bag evaluator share. Per frame:
keyframe policy (minimum interval, minimum travel with odometry), extraction,
retrieval of the top N among keyframes older than a recent-time exclusion
window, re-ranking, acceptance by an absolute score threshold, optional
temporal consistency over k keyframes, then the keyframe joins the map.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import numpy as np

from pnv_ros.config import Matcher, Preset
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import PlaceFeatures, patch_keypoints, to_image_pixels
from pnv_ros.images import ImageSource
from pnv_ros.matching import PatchMatcher, rerank_order
from pnv_ros.place_map import PlaceMap


@dataclass(frozen=True)
class DetectorParams:
    """Loop-closure settings (the node's parameters of the same names).

    Attributes:
        top_n: candidates retrieved and re-ranked per keyframe.
        matcher: override of the preset's matcher ('' keeps the preset's).
        min_score: accept when the absolute score (0..1) is at least this.
        exclude_recent_s: keyframes newer than this are never candidates.
        min_interval_s: minimum time between keyframes.
        min_travel_m: minimum travel between keyframes when positions are given.
        temporal_k: accept only when k consecutive keyframes match consistently (1 = off).
        temporal_tolerance: how many ids a consistent match may move between keyframes.
        fast_products: re-rank with oneDNN's similarity products on a CPU (faster; float32-rounding
            differences from the reference can flip near-tied matches; see PatchMatcher).
    """

    top_n: int = 20
    matcher: str = ""
    min_score: float = 0.12
    exclude_recent_s: float = 10.0
    min_interval_s: float = 0.0
    min_travel_m: float = 0.0
    temporal_k: int = 1
    temporal_tolerance: int = 3
    fast_products: bool = False


@dataclass
class Candidate:
    """A re-ranked candidate. score: absolute 0..1, higher better."""

    id: int
    stamp_ns: int
    score: float
    fused: float
    global_distance: float
    num_matches: int
    num_inliers: int


@dataclass
class LoopClosure:
    """An accepted loop closure between the query keyframe and an older one."""

    query_id: int
    query_stamp_ns: int
    match_id: int
    match_stamp_ns: int
    score: float
    global_distance: float
    num_matches: int
    num_inliers: int
    method: str
    relative_pose: tuple[np.ndarray, np.ndarray] | None = None  # (R 3x3, unit t 3) match camera in query camera


@dataclass
class FrameResult:
    """What happened to one frame."""

    keyframe_id: int | None
    candidates: list[Candidate] = field(default_factory=list)
    loop: LoopClosure | None = None
    timings: dict[str, float] = field(default_factory=dict)


class LoopClosureDetector:
    """Keyframe map plus loop detection with one extractor and preset."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        params: DetectorParams | None = None,
        index_kind: str = "flat",
        patch_dtype: str = "float16",
        memory_budget_mb: float = 0.0,
    ):
        self.extractor = extractor
        self.preset: Preset = extractor.preset
        self.params = params or DetectorParams()
        self._matchers: dict[tuple[Matcher, bool], PatchMatcher] = {}
        self.map_options = {"index_kind": index_kind, "patch_dtype": patch_dtype, "memory_budget_mb": memory_budget_mb}
        self.map = self.new_map()
        self._history: list[int | None] = []  # best candidate id of recent keyframes (None: no candidate)

    def new_map(self) -> PlaceMap:
        """An empty map with this detector's model, preset and storage options."""
        model_id = self.extractor.info.identity if self.extractor.info else ""
        return PlaceMap(self.extractor.dim, self.preset, model_id, **self.map_options)  # type: ignore[arg-type]

    # -- configuration ------------------------------------------------------------------
    def matcher_for(self, name: str | None = None) -> PatchMatcher:
        """The (cached) matcher for a name, '' or None = the params' or preset's.
        Matchers hold work buffers: use one from one thread at a time."""
        m = Matcher.parse(name or self.params.matcher or self.preset.matcher)
        exact = not self.params.fast_products
        if (m, exact) not in self._matchers:
            self._matchers[(m, exact)] = PatchMatcher(self.preset, m, device=self.extractor.device, exact=exact)
        return self._matchers[(m, exact)]

    def reset(self) -> None:
        """Empty the map, keeping its index kind, patch storage and memory budget."""
        m = self.map
        self.map = PlaceMap(m.dim, self.preset, m.model_id, m.index_kind, m.patch_dtype.name, m.memory_budget / 2**20)
        self._history.clear()

    # -- keyframe policy ------------------------------------------------------------------
    def is_keyframe(self, stamp_ns: int, position: np.ndarray | None = None) -> bool:
        if not self.map.keyframes:
            return True
        last = self.map.keyframes[-1]
        if stamp_ns <= last.stamp_ns:  # a repeated or out-of-order frame (re-sent, or a looping bag)
            return False
        if (stamp_ns - last.stamp_ns) / 1e9 < self.params.min_interval_s:
            return False
        if self.params.min_travel_m > 0 and position is not None and last.position is not None:
            return float(np.linalg.norm(np.asarray(position) - last.position)) >= self.params.min_travel_m
        return True

    # -- retrieval and re-ranking -----------------------------------------------------------
    def candidates(
        self,
        features: PlaceFeatures,
        before_ns: int | None,
        top_n: int | None = None,
        matcher: str | None = None,
        exclude_id: int | None = None,
    ) -> list[Candidate]:
        """Re-ranked candidates among keyframes with stamp <= before_ns (all when None)."""
        stamps = [k.stamp_ns for k in self.map.keyframes]
        limit = len(stamps) if before_ns is None else bisect.bisect_right(stamps, before_ns)
        n = top_n or self.params.top_n
        dists, ids = self.map.index.search(features.global_desc, n + (1 if exclude_id is not None else 0), limit)
        pairs = [(int(i), float(d)) for i, d in zip(ids[0], dists[0]) if i != exclude_id][:n]
        if not pairs:
            return []
        pm = self.matcher_for(matcher)
        kfs = [self.map.get(i) for i, _ in pairs]
        sc = pm.score(features, [k.features for k in kfs])
        fused = pm.fuse(sc.raw)
        absolute = pm.absolute(sc.raw)
        best_scale = sc.num_matches.argmax(axis=1)
        out = [
            Candidate(kf.id, kf.stamp_ns, float(absolute[j]), float(fused[j]), pairs[j][1],
                      int(sc.num_matches[j, best_scale[j]]), int(sc.num_inliers[j].max()))
            for j, kf in enumerate(kfs)
        ]  # fmt: skip
        return [out[j] for j in rerank_order(fused)]

    def verify(
        self, a: PlaceFeatures, b: PlaceFeatures, matcher: str | None = None, intrinsics: np.ndarray | None = None
    ):
        """Score one pair: (absolute score, matches, inliers, relative pose or None)."""
        pm = self.matcher_for(matcher)
        sc = pm.score(a, [b], details=True)
        best = int(np.argmax([d.num_matches for d in sc.details[0]]))
        pose = self.relative_pose(a, b, sc.details[0], intrinsics) if intrinsics is not None else None
        return float(pm.absolute(sc.raw)[0]), int(sc.num_matches[0, best]), int(sc.num_inliers[0].max()), pose

    def relative_pose(self, query: PlaceFeatures, match: PlaceFeatures, details, intrinsics: np.ndarray):
        """Rotation and unit translation of the match camera in the query camera,
        from the essential matrix of the patch correspondences, or None."""
        import cv2

        s = int(np.argmax([d.num_inliers for d in details]))
        d = details[s]
        sel = d.inliers if d.inliers.any() else np.ones(d.num_matches, bool)
        if sel.sum() < 8:
            return None
        kp = patch_keypoints(self.preset, s)
        pq = to_image_pixels(kp, self.preset, query.image_size)[d.query_idx[sel]].astype(np.float64)
        pm = to_image_pixels(kp, self.preset, match.image_size)[d.db_idx[sel]].astype(np.float64)
        e, mask = cv2.findEssentialMat(pm, pq, intrinsics, method=cv2.RANSAC, prob=0.999, threshold=8.0)
        if e is None or e.shape != (3, 3):
            return None
        n, r, t, _ = cv2.recoverPose(e, pm, pq, intrinsics, mask=mask)
        if n < 8:
            return None
        return r, t.ravel() / max(np.linalg.norm(t), 1e-12)

    # -- the per-frame step ----------------------------------------------------------------
    def process(
        self,
        image: ImageSource | PlaceFeatures,
        stamp_ns: int,
        position: np.ndarray | None = None,
        intrinsics: np.ndarray | None = None,
    ) -> FrameResult:
        """One frame: maybe a keyframe, maybe a loop closure."""
        if not self.is_keyframe(stamp_ns, position):
            return FrameResult(None)
        t0 = time.perf_counter()
        feats = image if isinstance(image, PlaceFeatures) else self.extractor.extract_one(image)
        t1 = time.perf_counter()
        before = stamp_ns - int(self.params.exclude_recent_s * 1e9)
        cands = self.candidates(feats, before)
        t2 = time.perf_counter()
        kf_id = self.map.add(feats, stamp_ns, None if position is None else np.asarray(position, float))
        result = FrameResult(kf_id, cands, timings={"extract": t1 - t0, "rerank": t2 - t1})
        best = cands[0] if cands and cands[0].score >= self.params.min_score else None
        self._history.append(best.id if best else None)
        if best is not None and self._consistent():
            pose = None
            if intrinsics is not None:
                _, _, _, pose = self.verify(feats, self.map.get(best.id).features, intrinsics=intrinsics)
            result.loop = LoopClosure(
                kf_id, stamp_ns, best.id, best.stamp_ns, best.score, best.global_distance,
                best.num_matches, best.num_inliers, (self.params.matcher or self.preset.matcher.value), pose,
            )  # fmt: skip
        result.timings["total"] = time.perf_counter() - t0
        return result

    def _consistent(self) -> bool:
        k = max(1, self.params.temporal_k)
        recent = self._history[-k:]
        if len(recent) < k or any(r is None for r in recent):
            return False
        tol = self.params.temporal_tolerance
        return all(abs(a - b) <= tol * 2 for a, b in zip(recent, recent[1:]))  # type: ignore[operator]
