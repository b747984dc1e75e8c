"""The DINOv2 model family (issue #12): recorded in model, feature and map files, checked on load,
never mixed with the VGG-16 family, and end to end on real images with the built model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rtab_frame
from PIL import Image

from pnv_ros.config import get_preset
from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.errors import CheckpointError, FeaturesError, MapError
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import FeatureSet, patch_keypoints
from pnv_ros.matching import PatchMatcher
from pnv_ros.model.checkpoint import checkpoint_info, load_checkpoint
from pnv_ros.model.dinov2_vlad import FAMILY, DinoVLADModel
from pnv_ros.place_map import PlaceMap

PNV = str(Path(sys.executable).parent / "pnv")


@pytest.fixture(scope="session")
def dinov2_ckpt() -> Path:
    """The built DINOv2 model; the README's set-up builds it. Missing = failure, not skip."""
    from pnv_ros.model.registry import built_model_path

    p = built_model_path("dinov2_vlad")
    assert p.is_file(), f"dinov2_vlad model missing at {p}: run scripts/setup.sh (pnv models build dinov2_vlad)"
    return p


@pytest.fixture(scope="session")
def dino(dinov2_ckpt: Path) -> FeatureExtractor:
    model, info = load_checkpoint(dinov2_ckpt)
    return FeatureExtractor(model, info, get_preset("speed"), device="cpu")


def test_family_is_recorded_and_sets_the_preset(dino: FeatureExtractor, dinov2_ckpt: Path) -> None:
    info = checkpoint_info(dinov2_ckpt)
    assert (info.family, info.backbone, info.input_size, info.dim) == (FAMILY, "dinov2_vits14", (322, 434), 512)
    assert isinstance(dino.model, DinoVLADModel)
    p = dino.preset
    assert (p.backbone, p.image_height, p.image_width, p.feature_shape) == ("dinov2_vits14", 322, 434, (23, 31))
    f = dino.extract_one(rtab_frame(10))
    assert f.global_desc.shape == (512,) and f.patches[0].shape == (19 * 27, 512)  # 5x5 windows of 23x31 tokens
    assert np.isclose(np.linalg.norm(f.global_desc), 1, atol=1e-5)
    kp = patch_keypoints(p, 0)
    assert kp[0].tolist() == [34, 34] and kp[-1].tolist() == [14 * 26 + 34, 14 * 18 + 34]  # window centres


def test_families_never_meet(dino: FeatureExtractor, default_extractor, tmp_path: Path) -> None:
    """Feature files, maps and queries of one family refuse the other, naming both."""
    frames = [rtab_frame(i) for i in (1, 2)]
    a = dino.extract_set(frames)
    b = default_extractor.extract_set(frames)
    a.save(tmp_path / "d.npz")
    back = FeatureSet.load(tmp_path / "d.npz")
    assert back.preset.backbone == "dinov2_vits14" and back.model_id == a.model_id
    with pytest.raises(FeaturesError, match="same checkpoint"):
        back.check_compatible(b)
    det = LoopClosureDetector(default_extractor, DetectorParams(min_travel_m=0.0, min_visual_change=0.0))
    det.process(np.asarray(Image.open(rtab_frame(1)).convert("RGB")), 10**9)
    det.save_map(tmp_path / "vgg_map.npz")
    dino_det = LoopClosureDetector(dino, DetectorParams())
    with pytest.raises(MapError, match="dinov2_vlad"):
        dino_det.load_map(tmp_path / "vgg_map.npz")
    m = PlaceMap(512, default_extractor.preset, default_extractor.info.identity)
    with pytest.raises(MapError, match="dinov2_vlad"):  # a VGG map file loaded for the DINOv2 model
        PlaceMap.load(tmp_path / "vgg_map.npz", 512, dino.preset, expect_model_id=dino.info.identity)
    assert len(m) == 0


def test_corrupt_or_mismatched_model_files(dinov2_ckpt: Path, tmp_path: Path) -> None:
    raw = torch.load(dinov2_ckpt, map_location="cpu", weights_only=True)
    bad = dict(raw, dinov2=dict(raw["dinov2"], input_height=300))  # not a multiple of 14
    torch.save(bad, tmp_path / "b1.pth.tar")
    with pytest.raises(CheckpointError, match="multiples of 14"):
        load_checkpoint(tmp_path / "b1.pth.tar")
    state = dict(raw["state_dict"])
    state["pool.centroids"] = state["pool.centroids"][:, :100]
    torch.save(dict(raw, state_dict=state), tmp_path / "b2.pth.tar")
    with pytest.raises(CheckpointError, match="pool.centroids"):
        load_checkpoint(tmp_path / "b2.pth.tar")
    from pnv_ros.model.checkpoint import read_state_dict

    with pytest.raises(CheckpointError, match="dinov2_vlad.*family"):
        read_state_dict(dinov2_ckpt)  # the VGG reader refuses it by name, not by a missing key


def test_loop_closure_end_to_end(dino: FeatureExtractor) -> None:
    """The RTAB-Map corridor: frames 1-8 then their revisit 41-48 (GT: 41 ~ 1-3); loops found, all correct."""
    g = np.load(Path(__file__).resolve().parent.parent / "data" / "rtabmap_samples_loop84" / "gt_matrix.npy")
    det = LoopClosureDetector(
        dino, DetectorParams(min_travel_m=0.0, min_visual_change=0.0, exclude_recent_s=1.0, exclude_recent_keyframes=1)
    )
    frames = list(range(1, 9)) + list(range(41, 49))
    loops = []
    for k, fr in enumerate(frames):
        r = det.process(np.asarray(Image.open(rtab_frame(fr)).convert("RGB")), (k + 1) * 10**9)
        if r.loop is not None:
            loops.append((fr, frames[r.loop.match_id]))
    assert len(loops) >= 5, loops
    assert all(g[q - 1, m - 1] for q, m in loops), loops


def test_cli_takes_the_model_by_name(dinov2_ckpt: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [
            PNV,
            "match-two",
            "--checkpoint",
            "dinov2_vlad",
            str(rtab_frame(62)),
            str(rtab_frame(21)),
            "--out",
            str(tmp_path / "m.png"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    revisit = float(r.stdout.split()[1])
    r = subprocess.run(
        [PNV, "match-two", "--checkpoint", "dinov2_vlad", str(rtab_frame(62)), str(rtab_frame(5))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    other = float(r.stdout.split()[1])
    assert revisit > 1.5 * other, (revisit, other)  # a revisit against an unrelated place (0.12 vs 0.063 measured)
    r = subprocess.run([PNV, "models", "list"], capture_output=True, text=True, timeout=120)
    assert "dinov2_vlad" in r.stdout and "present" in r.stdout.split("dinov2_vlad")[1].splitlines()[0]


def test_matching_is_the_vgg_familys(dino: FeatureExtractor) -> None:
    """Re-ranking uses the same matcher; RANSAC finds inliers between a frame and its revisit."""
    perf = FeatureExtractor(dino.model, dino.info, get_preset("performance"), device="cpu")
    assert perf.preset.patch_sizes == (2, 5, 8) and perf.preset.backbone == "dinov2_vits14"
    a, b, c = perf.extract([rtab_frame(62), rtab_frame(21), rtab_frame(5)])
    pm = PatchMatcher(perf.preset, "ransac")
    sc = pm.score(a, [b, c])
    assert sc.num_inliers[0].max() >= 10 and pm.absolute(sc.raw)[0] > pm.absolute(sc.raw)[1]


def test_global_weight_is_recorded_and_joins_the_re_ranking_order(
    dino: FeatureExtractor, dinov2_ckpt: Path, tmp_path: Path
) -> None:
    """The model's measured global weight (dinov2_vlad.GLOBAL_WEIGHT) is in its file, reaches the preset and
    feature files, and fuses the z-scored global distance into the order; a file without it (older builds)
    keeps the paper's patch-only order; a bad value is refused."""
    from pnv_ros.model import dinov2_vlad
    from pnv_ros.retrieval import two_stage

    assert checkpoint_info(dinov2_ckpt).global_weight == dinov2_vlad.GLOBAL_WEIGHT > 0
    assert dino.preset.global_weight == dinov2_vlad.GLOBAL_WEIGHT
    raw = torch.load(dinov2_ckpt, map_location="cpu", weights_only=True)
    assert raw["dinov2"]["global_weight"] == dinov2_vlad.GLOBAL_WEIGHT
    old = {k: v for k, v in raw["dinov2"].items() if k != "global_weight"}
    torch.save(dict(raw, dinov2=old), tmp_path / "old.pth.tar")
    model, info = load_checkpoint(tmp_path / "old.pth.tar")
    assert info.global_weight == 0.0
    assert FeatureExtractor(model, info, get_preset("speed"), device="cpu").preset.global_weight == 0.0
    torch.save(dict(raw, dinov2=dict(raw["dinov2"], global_weight=-1.0)), tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError, match="global_weight"):
        load_checkpoint(tmp_path / "bad.pth.tar")

    # the order: fused patch score + w x z-scored global distance; w = 0 is the patch-only fusion, bit for bit
    frames = [rtab_frame(i) for i in (62, 21, 5, 40, 70)]
    fs = dino.extract_set(frames)
    fs.save(tmp_path / "f.npz")
    assert FeatureSet.load(tmp_path / "f.npz").preset.global_weight == dinov2_vlad.GLOBAL_WEIGHT
    q, cands = fs.item(0), [fs.item(i) for i in range(1, 5)]
    dist = np.array([np.linalg.norm(q.global_desc - c.global_desc) for c in cands], np.float64)
    patch_only = PatchMatcher(dataclasses.replace(dino.preset, global_weight=0.0))
    raw_scores = patch_only.score(q, cands).raw
    base = patch_only.fuse(raw_scores, dist)
    assert np.array_equal(base, patch_only.fuse(raw_scores))  # weight 0: the distances are ignored
    z = (dist - dist.mean()) / dist.std()
    fused = PatchMatcher(dino.preset).fuse(raw_scores, dist)
    np.testing.assert_allclose(fused, base + dinov2_vlad.GLOBAL_WEIGHT * z, rtol=1e-10, atol=1e-12)
    huge = PatchMatcher(dataclasses.replace(dino.preset, global_weight=1e6))
    assert huge.rerank(q, cands, dist)[0].tolist() == np.argsort(dist).tolist()  # a huge weight: the global order
    # pnv match's two_stage passes the distances: its scores are the fused ones
    one = dataclasses.replace(
        fs,
        names=["query"],
        global_descs=fs.global_descs[:1],
        patches=[p[:1] for p in fs.patches],
        image_sizes=fs.image_sizes[:1],
    )
    (res,) = two_stage(fs, one, fs.preset, top_n=5)
    expect = PatchMatcher(fs.preset).fuse(
        patch_only.score(q, [fs.item(int(i)) for i in res.global_ids]).raw, res.global_dists
    )
    np.testing.assert_allclose(np.sort(res.scores), np.sort(expect), rtol=1e-10, atol=1e-12)
