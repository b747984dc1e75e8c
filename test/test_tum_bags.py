"""``pnv bag make --tum`` and ``pnv eval --gt-poses`` on TUM fr1/desk's 16 real RGB-D frames (data/tum_fr1_desk_pairs,
laid out as TUM does: rgb.txt + depth.txt), through the real CLI: the bag's colour, 16UC1 depth, camera_info and
odometry read back; the drift model's odometry; trajectory and loop pose metrics of an in-process evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_tum import PAIRS, tum_copy

from pnv_ros.bags import BagReader
from pnv_ros.camera_model import CameraModel
from pnv_ros.errors import GroundTruthError
from pnv_ros.eval.ground_truth import load_sequence_gt
from pnv_ros.eval.trajectory_eval import GroundTruthPoses, loop_positives
from pnv_ros.trajectory import DriftModel, Trajectory, ate_rmse
from pnv_ros.tum import DEPTH_UNITS_PER_M, read_associations, read_trajectory

PNV = str(Path(sys.executable).parent / "pnv")
CAMERA = PAIRS / "camera.yaml"
GT = PAIRS / "groundtruth_at_rgb.txt"


def pnv(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PNV, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


@pytest.fixture(scope="module")
def tum_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tum_copy(tmp_path_factory.mktemp("tum") / "fr1_desk")


def _make_drifted(tum_dir: Path, bag: Path, spec: str):
    """``pnv bag make TUM_DIR --tum --camera --poses GT --drift SPEC --out BAG`` (the completed process)."""
    return pnv(
        "bag",
        "make",
        str(tum_dir),
        "--tum",
        "--camera",
        str(CAMERA),
        "--poses",
        str(GT),
        "--drift",
        spec,
        "--out",
        str(bag),
    )


def _odometry(bag: Path) -> Trajectory:
    with BagReader(bag) as r:
        odom = r.odometry_poses()
    return Trajectory([s / 1e9 for s, _, _ in odom], [p for _, p, _ in odom], [q for _, _, q in odom])


def test_bag_make_tum_holds_colour_depth_camera_and_odometry(tum_dir: Path, tmp_path: Path) -> None:
    bag = tmp_path / "fr1.bag"
    r = pnv("bag", "make", str(tum_dir), "--tum", "--camera", str(CAMERA), "--poses", str(GT), "--out", str(bag))
    assert r.returncode == 0, r.stderr
    assert "64 messages, 16 frames" in r.stdout
    frames = read_associations(PAIRS / "associations.txt")
    with BagReader(bag) as b:  # one image topic: the depth topic is not one
        assert (b.topic, b.depth_topic, b.count) == ("/camera/image", "/camera/depth", 16)
        assert b.topics()["/camera/camera_info"] == "sensor_msgs/msg/CameraInfo"
        cam, ref = b.camera_model(), CameraModel.load_yaml(CAMERA)
        assert cam is not None and np.array_equal(cam.matrix, ref.matrix)
        assert np.array_equal(cam.distortion, ref.distortion) and cam.size == (640, 480)
        got = list(b.frames())
        # header stamps are the dataset's, to the nanosecond (TUM stamps have microseconds)
        assert [f.stamp_ns for f in got] == [round(f.stamp * 1e6) * 1000 for f in frames]
        colour = cv2.cvtColor(cv2.imread(str(frames[4].rgb)), cv2.COLOR_BGR2RGB)
        assert np.abs(got[4].rgb.astype(int) - colour).mean() < 2  # the JPEG as decoded by two decoders
        depth = b.depth_at(got[4].stamp_ns, 20_000_000)
        raw = cv2.imread(str(frames[4].depth), cv2.IMREAD_UNCHANGED)
        assert depth is not None and depth.dtype == np.float32 and depth.shape == (480, 640)
        mm = np.round(raw * 1000.0 / DEPTH_UNITS_PER_M)
        assert np.array_equal(np.isnan(depth), (mm < 100) | (mm > 20000))  # 0 = none; local_features' 0.1-20 m
        ok = ~np.isnan(depth)
        assert np.abs(depth[ok] - raw[ok] / DEPTH_UNITS_PER_M).max() <= 0.0005 + 1e-6  # millimetres
        assert b.depth_at(got[4].stamp_ns + 60_000_000, 20_000_000) is None  # no depth that close
        assert got[4].orientation is not None
    odom, gt = _odometry(bag), read_trajectory(GT)
    assert np.allclose(odom.positions, gt.positions) and np.allclose(
        np.abs((odom.quaternions * gt.quaternions).sum(1)), 1
    )


def test_bag_make_tum_drift_is_the_seeded_model(tum_dir: Path, tmp_path: Path) -> None:
    spec = "yaw_per_m=0.1,scale_error=0.05,seed=2"
    outs = []
    for name in ("a", "b"):
        bag = tmp_path / name
        r = _make_drifted(tum_dir, bag, spec)
        assert r.returncode == 0, r.stderr
        outs.append((_odometry(bag), r.stdout))
    (a, text), (b, _) = outs
    assert np.array_equal(a.positions, b.positions)
    gt = read_trajectory(GT)
    want = DriftModel.parse(spec).apply(gt)
    assert np.allclose(a.positions, want.positions) and np.allclose(
        np.abs((a.quaternions * want.quaternions).sum(1)), 1
    )
    ate = ate_rmse(gt, a)
    assert ate > 0.02 and f"position ATE {ate:.3f} m" in text


def test_bag_make_tum_errors(tum_dir: Path, tmp_path: Path) -> None:
    def err(r: subprocess.CompletedProcess, text: str) -> None:
        assert r.returncode == 1 and text in r.stderr and "Traceback" not in r.stderr, r.stderr

    out = str(tmp_path / "x")
    err(pnv("bag", "make", str(tum_dir), "--tum", "--out", out), "--tum needs --camera")
    err(pnv("bag", "make", str(tum_dir), "--tum", "--camera", str(CAMERA), "--drift", "--out", out), "--drift makes")
    err(pnv("bag", "make", str(tum_dir), "--camera", str(CAMERA), "--out", out), "options of --tum")
    small = tmp_path / "small.yaml"
    small.write_text(CAMERA.read_text().replace("image_width: 640", "image_width: 320"))
    err(pnv("bag", "make", str(tum_dir), "--tum", "--camera", str(small), "--out", out), "is for 320x480 images")
    broken = tum_copy(tmp_path / "broken")
    (broken / (broken / "depth.txt").read_text().splitlines()[4].split()[1]).unlink()
    err(pnv("bag", "make", str(broken), "--tum", "--camera", str(CAMERA), "--out", out), "depth.txt:5:")
    late = tmp_path / "late.txt"
    late.write_text("\n".join(GT.read_text().splitlines()[5:]) + "\n")  # starts after the first frames
    err(
        pnv("bag", "make", str(tum_dir), "--tum", "--camera", str(CAMERA), "--poses", str(late), "--out", out),
        "outside the trajectory's time",
    )
    assert not Path(out).exists() and not list(tmp_path.glob(".x.*")), "no half bag"


@pytest.mark.slow
def test_eval_gt_poses_reports_trajectory_and_loop_poses(tum_dir: Path, tmp_path: Path) -> None:
    """In process, the bag's depth and camera reach the detector: the accepted revisits get METRIC poses, scored
    against the ground truth; the odometry's ATE is the drift model's at the keyframes."""
    bag = tmp_path / "fr1.bag"
    spec = "seed=1"
    r = _make_drifted(tum_dir, bag, spec)
    assert r.returncode == 0, r.stderr
    gt = read_trajectory(GT)
    out = tmp_path / "run"
    loop_gt = ["--gt-radius", "0.5", "--gt-min-gap", "8"]  # no --gt: the loops of --gt-poses
    every = ["--min-travel-m", "0", "--exclude-recent-s", "5", "--exclude-recent-keyframes", "0"]  # 16 keyframes
    r = pnv("eval", str(bag), *loop_gt, "--gt-poses", str(GT), "--out", str(out), "-q", *every)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    tr, lt = m["trajectory"], m["loop_transforms"]
    kf = tr["keyframes_with_odometry"]
    assert kf == m["keyframes"] == 16
    assert tr["ate_rmse_m_odometry"] > 0.01 and tr["ate_rmse_m_optimized"] < tr["ate_rmse_m_odometry"]  # PoseGraph
    # the same ATE from the drift model at the keyframes' frames (independently of the bag and the replay)
    with open(out / "loop_closures.csv") as f:
        kf_frames = [int(line.split(",")[0]) for line in list(f)[1:]]
    odom = DriftModel.parse(spec).apply(gt)
    sel = np.array(kf_frames)
    at = Trajectory(gt.stamps[sel], gt.positions[sel], gt.quaternions[sel])
    est = Trajectory(odom.stamps[sel], odom.positions[sel], odom.quaternions[sel])
    assert tr["ate_rmse_m_odometry"] == pytest.approx(ate_rmse(at, est), rel=1e-6)
    assert lt["pose_types"]["METRIC"] == lt["count"] >= 1, lt  # depth reached the detector
    assert lt["median_translation_error_m"] < 0.1 and lt["median_rotation_error_deg"] < 3.0, lt
    assert 0 < lt["nees_mean"] < 100
    assert (out / "trajectory.png").is_file() and "## Trajectory" in (out / "report.md").read_text()
    assert "trajectory: odometry ATE" in r.stdout
    assert m["at_threshold"]["precision"] == 1.0 and m["ground_truth"]["frames_with_positives"] >= 4


def test_loop_positives_of_poses_equal_the_positions_csv_reading(tmp_path: Path) -> None:
    gt = read_trajectory(GT)
    positions = tmp_path / "positions.csv"
    positions.write_text("name,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in enumerate(gt.positions)))
    stamps = [round(t * 1e6) * 1000 for t in gt.stamps]
    got = loop_positives(GroundTruthPoses(GT, 16), stamps, 0.5, 8.0)
    want = load_sequence_gt(positions, 16, stamps_ns=stamps, radius=0.5, min_gap_s=8.0)
    assert got == want and sum(map(bool, got)) >= 4
    assert loop_positives(GroundTruthPoses(positions, 16), stamps, 0.5, 8.0) == want
    with pytest.raises(GroundTruthError, match="no frame comes within 0.01 m"):
        loop_positives(GroundTruthPoses(GT, 16), stamps, 0.01, 8.0)
    with pytest.raises(GroundTruthError, match="have 16 rows but the bag has 15 frames"):
        GroundTruthPoses(positions, 15)


def test_bag_make_image_folder_with_tum_poses(tmp_path: Path) -> None:
    bag = tmp_path / "b"
    r = pnv("bag", "make", str(PAIRS / "rgb"), "--poses", str(GT), "--out", str(bag))
    assert r.returncode == 0, r.stderr
    odom, gt = _odometry(bag), read_trajectory(GT)  # images named by their stamps: the poses there
    assert np.allclose(odom.positions, gt.positions) and np.allclose(
        np.abs((odom.quaternions * gt.quaternions).sum(1)), 1
    )
    named = tmp_path / "named"
    named.mkdir()
    for k, f in enumerate(sorted((PAIRS / "rgb").glob("*.jpg"))[:3]):
        (named / f"{k}.jpg").symlink_to(f)
    r = pnv("bag", "make", str(named), "--poses", str(GT), "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "outside the trajectory's time" in r.stderr, r.stderr  # stems 0, 1, 2 are stamps
    (named / "x.jpg").symlink_to(sorted((PAIRS / "rgb").glob("*.jpg"))[3])
    r = pnv("bag", "make", str(named), "--poses", str(GT), "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "must be named by their stamps" in r.stderr, r.stderr


def test_eval_gt_poses_bad_file_fails_before_the_replay(tmp_path: Path) -> None:
    bad = tmp_path / "gt.txt"
    bad.write_text("1305031453.359684 1 2 3 0 0 0\n")
    positions = tmp_path / "p.csv"
    gt = read_trajectory(GT)
    positions.write_text("name,x,y,z\n" + "".join(f"{k},{p[0]},{p[1]},{p[2]}\n" for k, p in enumerate(gt.positions)))
    bag = tmp_path / "b"
    r = pnv("bag", "make", str(PAIRS / "rgb"), "--out", str(bag))
    assert r.returncode == 0, r.stderr
    r = pnv(
        "eval",
        str(bag),
        "--gt",
        str(positions),
        "--gt-radius",
        "1",
        "--gt-poses",
        str(bad),
        "--out",
        str(tmp_path / "run"),
        timeout=120,
    )
    assert r.returncode == 1 and "gt.txt:1: a TUM trajectory line" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
