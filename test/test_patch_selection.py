"""Patch selection (``Preset.patch_keep`` < 1): counts, grid order, files, matching, maps, refusals.

Real RTAB-Map frames through the default model (speed preset, CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rtab_frame

from pnv_ros.config import Matcher, get_preset, load_preset
from pnv_ros.errors import ConfigError, FeaturesError, FleetError, MapError
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import FeatureSet, patch_keypoints
from pnv_ros.matching import PatchMatcher
from pnv_ros.patch_selection import CRITERIA, distinctiveness, select_patches
from pnv_ros.place_map import PlaceMap

SPEED = get_preset("speed")
HALF = dataclasses.replace(SPEED, patch_keep=0.5)
FRAMES = (1, 2, 45, 60)


@pytest.fixture(scope="module")
def full(default_extractor) -> list:
    """Features of four RTAB-Map frames with every patch (keep 1)."""
    return default_extractor.extract([rtab_frame(i) for i in FRAMES])


@pytest.fixture(scope="module")
def half(full) -> list:
    return [select_patches(f, HALF) for f in full]


def test_preset_field_validated_and_settable(tmp_path: Path) -> None:
    assert SPEED.patch_keep == 1.0 and not SPEED.selects_patches
    assert "patch_keep" not in SPEED.to_dict()  # files of all patches as before the field
    p = load_preset("speed", {"patch_keep": "0.25"})
    assert p.patch_keep == 0.25 and p.kept_patches(0) == int(np.ceil(0.25 * SPEED.num_patches(0)))
    assert type(p).from_dict(p.to_dict()) == p
    (tmp_path / "keep.toml").write_text('preset = "performance"\npatch_keep = 0.5\n')
    p = load_preset("speed", tmp_path / "keep.toml")  # an override file, as the node's config_file
    assert p.patch_keep == 0.5 and p.patch_sizes == (2, 5, 8)
    for bad in (0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="patch_keep"):
            dataclasses.replace(SPEED, patch_keep=bad)


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.25])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_selection_keeps_count_in_grid_order(full, keep: float, criterion: str) -> None:
    preset = dataclasses.replace(SPEED, patch_keep=keep)
    want = int(np.ceil(keep * SPEED.num_patches(0)))
    for f in full:
        s = select_patches(f, preset, criterion)
        (idx,) = s.patch_index
        assert idx.dtype == np.int16 and idx.shape == (want,) == (preset.kept_patches(0),)
        assert (np.diff(idx) > 0).all() and idx.min() >= 0 and idx.max() < SPEED.num_patches(0)
        np.testing.assert_array_equal(s.patches[0], f.patches[0][idx])
        assert s.patches[0].flags.c_contiguous
        np.testing.assert_array_equal(s.global_desc, f.global_desc)


def test_burstiness_keeps_the_least_repeated(full) -> None:
    """The kept patches are those whose best non-overlapping look-alike in the image is least similar."""
    f = full[0]
    score = distinctiveness(f.patches[0], HALF, 0, "burstiness")
    (idx,) = select_patches(f, HALF, "burstiness").patch_index
    dropped = np.setdiff1d(np.arange(SPEED.num_patches(0)), idx)
    assert score[idx].max() <= score[dropped].min()
    assert score[dropped].min() > score[idx].min()  # the scores separate something on a real image


def test_keep_one_is_todays_features(default_extractor, full) -> None:
    assert all(select_patches(f, SPEED) is f and f.patch_index is None for f in full)
    assert full[0].patches[0].shape == (SPEED.num_patches(0), default_extractor.dim)


def test_extraction_selects_after_the_descriptors(default_extractor, full, half) -> None:
    ex = FeatureExtractor(default_extractor.model, default_extractor.info, HALF, device="cpu")
    got = ex.extract([rtab_frame(i) for i in FRAMES[:2]])
    for g, h in zip(got, half):
        np.testing.assert_array_equal(g.patch_index[0], h.patch_index[0])
        np.testing.assert_array_equal(g.patches[0], h.patches[0])


def test_feature_set_round_trip(default_extractor, half, full, tmp_path: Path) -> None:
    fs = FeatureSet.from_places(list(map(str, FRAMES)), half, HALF, default_extractor.info.identity)
    fs.save(tmp_path / "half.npz")
    back = FeatureSet.load(tmp_path / "half.npz")
    assert back.preset == HALF
    np.testing.assert_array_equal(back.patches[0], fs.patches[0])
    np.testing.assert_array_equal(back.patch_index[0], np.stack([h.patch_index[0] for h in half]))
    np.testing.assert_array_equal(back.item(2).patch_index[0], half[2].patch_index[0])
    all_kept = FeatureSet.from_places(list(map(str, FRAMES)), full, SPEED, default_extractor.info.identity)
    with pytest.raises(FeaturesError, match="keeping 0.5 of the patches"):
        back.check_compatible(all_kept)
    with pytest.raises(FeaturesError, match="lacks the patch indices"):
        FeatureSet.from_places(["a"], full[:1], HALF, "")


@pytest.mark.parametrize("matcher", ["rapid", "ransac"])
def test_self_match_reports_grid_indices(half, matcher: str) -> None:
    pm = PatchMatcher(HALF, matcher)
    sc = pm.score(half[0], [half[0]], details=True)
    d = sc.details[0][0]
    np.testing.assert_array_equal(d.db_idx, half[0].patch_index[0])
    np.testing.assert_array_equal(d.query_idx, half[0].patch_index[0])
    assert sc.num_matches[0, 0] == HALF.kept_patches(0)
    if Matcher.parse(matcher) is Matcher.RAPID:
        assert pm.absolute(sc.raw)[0] == pytest.approx(1.0)
    else:  # the identity homography on the kept patches' own keypoints
        assert d.num_inliers == HALF.kept_patches(0)
        np.testing.assert_allclose(d.homography, np.eye(3), atol=1e-6)
    kp = patch_keypoints(HALF, 0)[d.db_idx]
    np.testing.assert_allclose(half[0].keypoints(HALF)[0], (kp + 0.5) * np.array(half[0].image_size) / (640, 480) - 0.5)


def test_vectorised_rapid_scoring_uses_grid_indices(half) -> None:
    """The GPU path's vectorised rapid scoring agrees with the per-pair exact scoring on selected patches."""
    pm = PatchMatcher(HALF)
    q = torch.as_tensor(half[2].patches[0])
    dbs = torch.as_tensor(np.stack([h.patches[0] for h in half]))
    fw, mutual = pm._mutual(q, dbs)
    dbi = np.stack([h.patch_index[0] for h in half])
    got = pm._rapid(
        fw,
        mutual,
        0,
        q.shape[0],
        torch.as_tensor(dbi, dtype=torch.int64),
        torch.as_tensor(half[2].patch_index[0], dtype=torch.int64),
    )
    want = pm.score(half[2], half).raw[:, 0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert want[2] == want.min()  # itself best


def test_place_map_keep_half_saves_and_loads(default_extractor, half, full, tmp_path: Path) -> None:
    m = PlaceMap(default_extractor.dim, HALF, default_extractor.info.identity)
    for i, h in enumerate(half):
        assert m.add(h, (i + 1) * 10**9) == i
    assert m.patches(0)[0].shape == (HALF.kept_patches(0), default_extractor.dim)
    with pytest.raises(MapError, match="lacks the patch indices|do not fit"):
        m.add(full[0], 99)
    assert len(m) == len(half)
    m.save(tmp_path / "m.npz")
    back = PlaceMap.load(tmp_path / "m.npz", expect_preset=HALF, expect_model_id=default_extractor.info.identity)
    for i, h in enumerate(half):
        np.testing.assert_array_equal(back.patch_index(i)[0], h.patch_index[0])
        np.testing.assert_array_equal(back.patches(i)[0], h.patches[0].astype(np.float16))
        np.testing.assert_array_equal(back.get(i).features.patch_index[0], h.patch_index[0])
    with pytest.raises(MapError, match="keeping 0.5 of the patches"):
        PlaceMap.load(tmp_path / "m.npz", expect_preset=SPEED)
    quarter = dataclasses.replace(SPEED, patch_keep=0.25)
    with pytest.raises(MapError, match="keeping 0.25 of the patches"):
        PlaceMap.load(tmp_path / "m.npz", expect_preset=quarter)


def test_map_bytes_per_keyframe_shrink(default_extractor, half, full) -> None:
    sizes = []
    for preset, feats in ((SPEED, full), (HALF, half)):
        m = PlaceMap(default_extractor.dim, preset, default_extractor.info.identity)
        m.add(feats[0], 1)
        sizes.append(m.nbytes_per_keyframe())
    patch_bytes = SPEED.num_patches(0) * default_extractor.dim * 2
    assert sizes[1] == pytest.approx(sizes[0] - patch_bytes + HALF.kept_patches(0) * (default_extractor.dim * 2 + 2))


def test_detector_with_selection_finds_itself(default_extractor, half) -> None:
    from pnv_ros.detector import DetectorParams, LoopClosureDetector

    ex = FeatureExtractor(default_extractor.model, default_extractor.info, HALF, device="cpu")
    det = LoopClosureDetector(ex, DetectorParams(exclude_recent_s=0.0, exclude_recent_keyframes=0))
    for i, h in enumerate(half):
        det.process(h, (i + 1) * 10**9)
    feats = det.features_of(1)
    np.testing.assert_array_equal(feats.patch_index[0], half[1].patch_index[0])
    best = det.query(feats, top_n=4)[0]
    assert best.id == 1 and best.score == pytest.approx(1.0)


def test_fleet_store_refuses_selection() -> None:
    from pnv_ros.fleet.store import FleetStore

    with pytest.raises(FleetError, match="patch_keep"):
        FleetStore.open("postgresql:///nowhere?host=/nonexistent", 512, HALF, "m:512:abc")
