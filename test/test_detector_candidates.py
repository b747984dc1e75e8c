"""The detector's candidate stage against a brute-force reference (issue #13): 1200 keyframes,
a loaded map, exclusion by time and by keyframe count (changed during the run), clock resets, the
``exclude_id`` of the query service; flat and HNSW (exact at this size with efSearch 2048).

The map holds 512-d-like global descriptors on a random walk (consecutive keyframes look alike, so the
nearest neighbours of a new keyframe are the recent ones the windows exclude) with occasional revisits,
and tiny placeholder patches (a 2x3-cell input, 6 patches per keyframe) so that re-ranking is cheap."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pnv_ros.config import Matcher, Preset
from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.features import PlaceFeatures

TINY = Preset(
    name="tiny",
    patch_sizes=(1,),
    strides=(1,),
    patch_weights=(1.0,),
    matcher=Matcher.RAPID,
    image_height=32,
    image_width=48,
    top_n=8,
)
D, S = 48, 10**9


def _detector(kind: str, params: DetectorParams) -> LoopClosureDetector:
    ext = SimpleNamespace(preset=TINY, dim=D, info=None, device="cpu")  # the detector's only use of an extractor
    return LoopClosureDetector(ext, params, index_kind=kind)


def _feats(g: np.ndarray, rng: np.random.Generator) -> PlaceFeatures:
    p = rng.standard_normal((TINY.num_patches(0), D)).astype(np.float32)
    return PlaceFeatures(
        (g / np.linalg.norm(g)).astype(np.float32),
        [p / np.linalg.norm(p, axis=1, keepdims=True)],
        (TINY.image_width, TINY.image_height),
    )


def _reference(descs: np.ndarray, q: np.ndarray, eligible: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the n eligible ids nearest to q (exact L2 in float64), nearest first, and their distances."""
    ids = np.flatnonzero(eligible)
    d = np.sqrt(((descs[ids].astype(np.float64) - q.astype(np.float64)) ** 2).sum(axis=1))
    order = np.argsort(d, kind="stable")[:n]
    return ids[order], d[order]


def _check(cands, descs: np.ndarray, q: np.ndarray, eligible: np.ndarray, n: int, what: str) -> None:
    ref_ids, ref_d = _reference(descs, q, eligible, n)
    by_distance = sorted(cands, key=lambda c: c.global_distance)  # re-ranking reorders; retrieval is by distance
    got_ids = np.array([c.id for c in by_distance], np.int64)
    assert got_ids.tolist() == ref_ids.tolist(), what
    np.testing.assert_allclose([c.global_distance for c in by_distance], ref_d, rtol=1e-4, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_candidates_match_brute_force(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    params = DetectorParams(
        top_n=8, exclude_recent_s=10.0, exclude_recent_keyframes=12, min_score=1.0, min_visual_change=0.0
    )
    descs = np.zeros((0, D), np.float32)
    cur = rng.standard_normal(D).astype(np.float32)

    def next_desc() -> np.ndarray:
        nonlocal cur
        if len(descs) > 50 and rng.random() < 0.15:  # a revisit of an older place
            return descs[rng.integers(0, len(descs) - 50)] + 0.05 * rng.standard_normal(D).astype(np.float32)
        cur = cur + 0.3 * rng.standard_normal(D).astype(np.float32)  # the robot moves on
        return cur.copy()

    # a first run, saved: its keyframes are always candidates after a load
    first = _detector(kind, params.replace(exclude_recent_s=1e6))
    stamp = 1000 * S
    for _ in range(200):
        stamp += int(rng.uniform(0.1, 2.0) * S)
        f = _feats(next_desc(), rng)
        assert first.process(f, stamp).status == "keyframe"
        descs = np.vstack([descs, f.global_desc[None]])
    first.save_map(tmp_path / "first.npz")
    det = _detector(kind, params)
    run_start = det.load_map(tmp_path / "first.npz")
    assert run_start == 200

    session = np.zeros(0, np.int64)  # session clock of this run's keyframes, as the detector admitted them
    checked = {"excluded_nearest": 0, "jumps": 0}
    stamp = 0
    for i in range(1000):
        if i == 350:
            stamp = 5 * S  # the clock resets (a restarted simulator)
        elif i == 650:
            stamp -= 60 * S  # and jumps back a minute (a bag played again)
        else:
            stamp += int(rng.uniform(0.05, 3.0) * S)
        if i == 450:
            det.params = det.params.replace(exclude_recent_s=0.0)  # count window only
        elif i == 550:
            det.params = det.params.replace(exclude_recent_s=30.0, exclude_recent_keyframes=0)  # time window only
        elif i == 750:
            det.params = det.params.replace(exclude_recent_s=2.5, exclude_recent_keyframes=40)
        elif i == 900:
            det.params = det.params.replace(exclude_recent_s=0.0, exclude_recent_keyframes=0)  # nothing excluded
        p = det.params
        f = _feats(next_desc(), rng)
        adm = det.admit(stamp)
        assert adm.extract, adm.status
        checked["jumps"] += adm.time_jump
        n = len(descs)
        eligible = np.zeros(n, bool)
        eligible[:run_start] = True
        ours = np.arange(run_start, n)
        eligible[ours] = (session <= adm.session_ns - int(p.exclude_recent_s * 1e9)) & (
            ours < n - p.exclude_recent_keyframes
        )
        r = det.commit(adm, f)
        assert r.status == "keyframe" and r.keyframe_id == n
        _check(r.candidates, descs, f.global_desc, eligible, p.top_n, f"keyframe {n}")
        nearest_all = int(np.argmin(((descs - f.global_desc) ** 2).sum(axis=1)))
        checked["excluded_nearest"] += not eligible[nearest_all]
        descs = np.vstack([descs, f.global_desc[None]])
        session = np.append(session, adm.session_ns)
        if i % 47 == 0:  # the query service: a stored keyframe against the whole map but itself
            k = int(rng.integers(0, len(descs)))
            every = np.ones(len(descs), bool)
            every[k] = False
            _check(det.query(det.features_of(k), top_n=5, exclude_id=k), descs, descs[k], every, 5, f"query {k}")
    assert checked["jumps"] == 2
    assert checked["excluded_nearest"] > 400  # the windows mattered: the nearest keyframe was often excluded
