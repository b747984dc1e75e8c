"""Equivalence with the reference patchnetvlad==0.1.8 on real frames."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from conftest import rtab_frame
from oracle import reference_extract, reference_model, reference_order, reference_raw_scores

from pnv_ros.config import get_preset
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import PlaceFeatures
from pnv_ros.matching import PatchMatcher
from pnv_ros.model.checkpoint import load_checkpoint

FRAMES = [3, 20, 45, 61, 62, 70]  # query 62 revisits frames 20-24


@functools.cache  # both sides extract once per (model, preset) in a session: the matching tests reuse it
def _both(ckpt: Path, preset_name: str):
    preset = get_preset(preset_name)
    model, info = load_checkpoint(ckpt)
    ours = FeatureExtractor(model, info, preset, device="cpu").extract([rtab_frame(i) for i in FRAMES])
    ref_model, dim = reference_model(ckpt, preset.patch_sizes, preset.strides)
    refs = [reference_extract(ref_model, dim, rtab_frame(i)) for i in FRAMES]
    return preset, ours, refs


@pytest.mark.parametrize("preset_name", ["performance", "speed"])
def test_extraction_matches_reference(random_ckpt: Path, preset_name: str) -> None:
    preset, ours, refs = _both(random_ckpt, preset_name)
    for o, (g, patches) in zip(ours, refs):
        assert np.abs(o.global_desc - g).max() < 1e-4
        for s, p in enumerate(patches):
            assert o.patches[s].shape == (preset.num_patches(s), 64)
            assert np.abs(o.patches[s] - p.T).max() < 1e-4  # same order: row-major over the grid


@pytest.mark.parametrize("matcher", ["ransac", "rapid"])
def test_matching_matches_reference_on_same_features(random_ckpt: Path, matcher: str) -> None:
    preset, _, refs = _both(random_ckpt, "performance")
    feats = [PlaceFeatures(g, [p.T.copy() for p in ps], (512, 384)) for g, ps in refs]
    q = 4
    want = reference_raw_scores(matcher, preset, refs[q][1], [r[1] for r in refs])
    pm = PatchMatcher(preset, matcher)
    got = pm.score(feats[q], feats).raw
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert (pm.rerank(feats[q], feats)[0] == reference_order(want, preset.patch_weights)).all()


@pytest.mark.slow
@pytest.mark.parametrize("preset_name,matcher", [("performance", "ransac"), ("speed", "rapid")])
def test_default_model_end_to_end_matches_reference(default_ckpt: Path, preset_name: str, matcher: str) -> None:
    """A trained-style model: each side extracts its own features and matches them."""
    preset, ours, refs = _both(default_ckpt, preset_name)
    for o, (g, patches) in zip(ours, refs):
        assert np.abs(o.global_desc - g).max() < 1e-4
        assert max(np.abs(o.patches[s] - p.T).max() for s, p in enumerate(patches)) < 1e-4
    q = 4
    want = reference_raw_scores(matcher, preset, refs[q][1], [r[1] for r in refs])
    pm = PatchMatcher(preset, matcher)
    got = pm.score(ours[q], ours).raw
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (pm.rerank(ours[q], ours)[0] == reference_order(want, preset.patch_weights)).all()
