"""LoopClosureDetector without ROS, on synthetic features (fast) and its policies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pnv_ros.config import get_preset
from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import PlaceFeatures
from pnv_ros.model.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def extractor(random_ckpt: Path) -> FeatureExtractor:
    model, info = load_checkpoint(random_ckpt)
    return FeatureExtractor(model, info, get_preset("speed"), device="cpu")


def _place(rng, base=None, noise: float = 0.0) -> PlaceFeatures:
    if base is None:
        g, p = rng.standard_normal(64), rng.standard_normal((936, 64))
    else:
        g = base.global_desc + noise * rng.standard_normal(64)
        p = base.patches[0] + noise * rng.standard_normal((936, 64))
    g, p = g.astype(np.float32), p.astype(np.float32)
    return PlaceFeatures(g / np.linalg.norm(g), [p / np.linalg.norm(p, axis=1, keepdims=True)], (640, 480))


def test_revisit_is_detected_and_recent_frames_excluded(extractor: FeatureExtractor, rng) -> None:
    det = LoopClosureDetector(extractor, DetectorParams(exclude_recent_s=5.0, min_score=0.5))
    places = [_place(rng) for _ in range(10)]
    for i, p in enumerate(places):
        r = det.process(p, (i + 1) * 10**9)
        assert r.keyframe_id == i and r.loop is None  # nothing older than 5 s looks alike
    r = det.process(_place(rng, places[8], 0.01), 12 * 10**9)  # frame 9 at t=9 s is only 3 s old: excluded
    assert r.loop is None and all(c.id < 7 for c in r.candidates)
    r = det.process(_place(rng, places[2], 0.01), 13 * 10**9)
    assert r.loop is not None and r.loop.match_id == 2 and r.loop.score > 0.5 and r.loop.method == "rapid"


def test_keyframe_policy(extractor: FeatureExtractor, rng) -> None:
    det = LoopClosureDetector(extractor, DetectorParams(min_interval_s=1.0, min_travel_m=2.0))
    assert det.process(_place(rng), 10**9, np.zeros(3)).keyframe_id == 0
    assert det.process(_place(rng), int(1.5e9), np.array([5.0, 0, 0])).keyframe_id is None  # too soon
    assert det.process(_place(rng), 3 * 10**9, np.array([1.0, 0, 0])).keyframe_id is None  # too close
    assert det.process(_place(rng), 4 * 10**9, np.array([3.0, 0, 0])).keyframe_id == 1
    assert det.process(_place(rng), 4 * 10**9, np.array([9.0, 0, 0])).keyframe_id is None  # repeated stamp
    det.reset()
    assert len(det.map) == 0 and det.process(_place(rng), 10**9).keyframe_id == 0


def test_temporal_consistency(extractor: FeatureExtractor, rng) -> None:
    det = LoopClosureDetector(extractor, DetectorParams(exclude_recent_s=1.0, min_score=0.5, temporal_k=2))
    places = [_place(rng) for _ in range(6)]
    for i, p in enumerate(places):
        det.process(p, (i + 1) * 10**9)
    first = det.process(_place(rng, places[1], 0.01), 20 * 10**9)
    second = det.process(_place(rng, places[2], 0.01), 21 * 10**9)
    assert first.loop is None and first.candidates[0].id == 1  # one match is not yet consistent
    assert second.loop is not None and second.loop.match_id == 2


def test_reset_keeps_storage_options(extractor: FeatureExtractor) -> None:
    det = LoopClosureDetector(extractor, index_kind="hnsw", patch_dtype="float32", memory_budget_mb=1.5)
    det.reset()
    m = det.map
    assert (m.index_kind, m.patch_dtype.name, m.memory_budget) == ("hnsw", "float32", int(1.5 * 2**20))
