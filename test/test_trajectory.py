"""Trajectories (pnv_ros.trajectory): interpolation, the seeded drift model, ATE / RPE through evo checked against
independent computations, and the loop pose errors with their NEES. Ground truth: TUM fr1/desk's 16 frames of
data/tum_fr1_desk_pairs (real motion capture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pnv_ros.geometry import PoseType, RelativePose, rotation_exp, tangent_basis
from pnv_ros.trajectory import (
    DriftModel,
    LoopTransformError,
    Trajectory,
    TrajectoryError,
    ate_rmse,
    loop_transform_error,
    loop_transform_summary,
    rpe,
)
from pnv_ros.tum import read_trajectory

PAIRS = Path(__file__).resolve().parents[1] / "data" / "tum_fr1_desk_pairs"


@pytest.fixture(scope="module")
def gt() -> Trajectory:
    return read_trajectory(PAIRS / "groundtruth_at_rgb.txt")


def _transformed(traj: Trajectory, rot: Rotation, shift: np.ndarray) -> Trajectory:
    return Trajectory(
        traj.stamps, rot.apply(np.array(traj.positions)) + shift, (rot * Rotation.from_quat(traj.quaternions)).as_quat()
    )


def _kabsch_rmse(ref: np.ndarray, est: np.ndarray) -> float:
    """Position RMSE after the best rigid fit of est onto ref (scipy's Kabsch: an independent computation)."""
    rot, _ = Rotation.align_vectors(ref - ref.mean(0), est - est.mean(0))
    moved = rot.apply(est - est.mean(0)) + ref.mean(0)
    return float(np.sqrt(np.mean(np.sum((moved - ref) ** 2, axis=1))))


def test_ate_of_a_rigidly_moved_trajectory_is_zero_after_alignment(gt: Trajectory) -> None:
    moved = _transformed(gt, Rotation.from_euler("zyx", [40, -10, 5], degrees=True), np.array([3.0, -1.0, 0.5]))
    assert np.linalg.norm(moved.positions - gt.positions, axis=1).min() > 1.0  # far apart before alignment
    assert ate_rmse(gt, moved) < 1e-9


def test_ate_matches_an_independent_rigid_fit(gt: Trajectory, rng: np.random.Generator) -> None:
    noisy = Trajectory(gt.stamps, gt.positions + rng.normal(0, 0.03, gt.positions.shape), gt.quaternions)
    moved = _transformed(noisy, Rotation.from_rotvec([0.2, -0.1, 0.7]), np.array([1.0, 2.0, 3.0]))
    ate = ate_rmse(gt, moved)
    assert 0.01 < ate < 0.06
    assert ate == pytest.approx(_kabsch_rmse(gt.positions, moved.positions), rel=1e-6)


def test_ate_needs_the_same_stamps(gt: Trajectory) -> None:
    with pytest.raises(TrajectoryError, match="same stamps"):
        ate_rmse(gt, gt.at(gt.stamps[:-1]))
    two = gt.at(gt.stamps[:2])
    with pytest.raises(TrajectoryError, match="at least 3 poses"):
        ate_rmse(two, two)


def test_interpolation_between_and_outside_the_poses(gt: Trajectory) -> None:
    mid = 0.5 * (gt.stamps[3] + gt.stamps[4])
    p = gt.at([mid])
    assert np.allclose(p.positions[0], 0.5 * (gt.positions[3] + gt.positions[4]))
    r3, r4, rm = (Rotation.from_quat(q) for q in (gt.quaternions[3], gt.quaternions[4], p.quaternions[0]))
    assert (r3.inv() * rm).magnitude() == pytest.approx((r3.inv() * r4).magnitude() / 2, abs=1e-9)
    assert np.allclose(gt.at(gt.stamps).positions, gt.positions)
    assert np.allclose(gt.at([gt.stamps[0] - 0.01]).positions, gt.positions[:1])  # within the end tolerance
    with pytest.raises(TrajectoryError, match="outside the trajectory's time"):
        gt.at([gt.stamps[-1] + 1.0])


def test_trajectory_checks_its_arrays() -> None:
    with pytest.raises(TrajectoryError, match="must increase"):
        Trajectory([0.0, 0.0], np.zeros((2, 3)), [[0, 0, 0, 1]] * 2)
    with pytest.raises(TrajectoryError, match="norm"):
        Trajectory([0.0], np.zeros((1, 3)), [[0, 0, 0, 3]])
    with pytest.raises(TrajectoryError, match="needs"):
        Trajectory([0.0, 1.0], np.zeros((3, 3)), [[0, 0, 0, 1]] * 2)


def test_drift_model_is_seeded_and_without_drift_gives_the_truth(gt: Trajectory) -> None:
    a, b = DriftModel(seed=3).apply(gt), DriftModel(seed=3).apply(gt)
    assert np.array_equal(a.positions, b.positions) and np.array_equal(a.quaternions, b.quaternions)
    c = DriftModel(seed=4).apply(gt)
    assert not np.allclose(a.positions, c.positions)
    none = DriftModel(yaw_per_m=0, scale_error=0, sigma_m=0, sigma_yaw=0).apply(gt)
    assert np.allclose(none.positions, gt.positions) and np.allclose(
        np.abs((none.quaternions * gt.quaternions).sum(1)), 1
    )
    assert ate_rmse(gt, none) < 1e-9


def test_drift_model_yaw_and_scale_grow_with_the_distance(gt: Trajectory) -> None:
    length = gt.path_length()
    scale = DriftModel(yaw_per_m=0, scale_error=0.1, sigma_m=0, sigma_yaw=0).apply(gt)
    assert scale.path_length() == pytest.approx(1.1 * length)
    yaw = DriftModel(yaw_per_m=0.05, scale_error=0, sigma_m=0, sigma_yaw=0).apply(gt)
    assert yaw.path_length() == pytest.approx(length)
    # the last orientation is turned about +z by yaw_per_m times the path length
    turn = Rotation.from_quat(yaw.quaternions[-1]) * Rotation.from_quat(gt.quaternions[-1]).inv()
    assert np.allclose(turn.as_rotvec(), [0, 0, 0.05 * length], atol=1e-9)
    ates = [ate_rmse(gt, DriftModel(yaw_per_m=y, sigma_m=0, sigma_yaw=0).apply(gt)) for y in (0.0, 0.05, 0.1)]
    assert ates[0] < ates[1] < ates[2]


def test_drift_spec_parsing() -> None:
    m = DriftModel.parse("yaw_per_m=0.1, scale_error=0.02,seed=7,up=0:1:0")
    assert (m.yaw_per_m, m.scale_error, m.seed, m.up) == (0.1, 0.02, 7, (0.0, 1.0, 0.0))
    assert DriftModel.parse("") == DriftModel()
    with pytest.raises(TrajectoryError, match="unknown key 'yaw'"):
        DriftModel.parse("yaw=0.1")
    with pytest.raises(TrajectoryError, match="is not an integer"):
        DriftModel.parse("seed=1.5")
    with pytest.raises(TrajectoryError, match="is not a number"):
        DriftModel.parse("sigma_m=x")
    with pytest.raises(TrajectoryError, match="finite"):
        DriftModel.parse("yaw_per_m=nan")
    with pytest.raises(TrajectoryError, match=r"scale_error must be in \(-1, 1\)"):
        DriftModel.parse("scale_error=-2")
    with pytest.raises(TrajectoryError, match="up must be"):
        DriftModel.parse("up=0:0:0")


def test_rpe_of_a_scale_error_on_a_straight_line() -> None:
    n = 41  # 4 m along x in 0.1 m steps
    truth = Trajectory(np.arange(n) * 0.1, np.c_[np.arange(n) * 0.1, np.zeros(n), np.zeros(n)], [[0, 0, 0, 1]] * n)
    odom = DriftModel(yaw_per_m=0, scale_error=0.05, sigma_m=0, sigma_yaw=0).apply(truth)
    r = rpe(truth, odom, delta_m=1.0)
    assert r["pairs"] > 20 and r["translation_rmse_m"] == pytest.approx(0.05, rel=0.01)  # pairs of 1.0-1.1 m
    assert r["rotation_rmse_deg"] == pytest.approx(0.0, abs=1e-6)
    assert rpe(truth, truth)["translation_rmse_m"] == pytest.approx(0.0, abs=1e-12)


def _metric(rot: np.ndarray, t: np.ndarray, cov: np.ndarray) -> RelativePose:
    d = t / np.linalg.norm(t)
    return RelativePose(
        rotation=rot,
        direction=d,
        rotation_covariance=cov[:3, :3],
        direction_covariance=np.zeros((3, 3)),
        inliers=50,
        rms_error_px=1.0,
        covariance=cov,
        tangent_basis=tangent_basis(d),
        sigma_px=1.0,
        parallax_px=10.0,
        type=PoseType.METRIC,
        translation=t,
        translation_covariance=cov[3:, 3:],
    )


def test_loop_transform_error_against_the_ground_truth_relative_pose(gt: Trajectory) -> None:
    m = gt.matrices()
    q, k = m[12], m[2]  # two frames of the set, 9 s apart
    true = np.linalg.inv(q) @ k  # match camera in query camera
    cov = np.diag([1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4])
    exact = loop_transform_error(_metric(true[:3, :3], true[:3, 3], cov), q, k)
    assert exact.translation_error_m < 1e-12 and exact.rotation_error_deg < 1e-5 and exact.nees < 1e-12
    w, dt = np.array([0.01, -0.02, 0.005]), np.array([0.03, 0.0, -0.04])
    # R_true = exp([w]x) R and t_true = t + dt: the estimate is R = exp(-[w]x) R_true, t = t_true - dt
    est = _metric(rotation_exp(-w) @ true[:3, :3], true[:3, 3] - dt, cov)
    e = loop_transform_error(est, q, k)
    assert e.translation_error_m == pytest.approx(0.05)
    assert e.rotation_error_deg == pytest.approx(np.degrees(np.linalg.norm(w)))
    x = np.r_[w, dt]
    assert e.nees == pytest.approx(x @ np.linalg.inv(cov) @ x, rel=1e-6)
    mono = RelativePose(np.eye(3), [0, 0, 1], np.eye(3), np.zeros((3, 3)), 30, 1, np.eye(5), np.zeros((3, 2)), 1, 1)
    with pytest.raises(TrajectoryError, match="ROTATION_AND_DIRECTION loop pose has no translation"):
        loop_transform_error(mono, q, k)


def test_loop_transform_summary() -> None:
    errs = [LoopTransformError(0.01 * i, 0.5 * i, float(i)) for i in range(1, 21)]
    s = loop_transform_summary(errs)
    assert s["count"] == 20 and s["nees_mean"] == pytest.approx(10.5)
    assert s["median_translation_error_m"] == pytest.approx(0.105)
    assert s["median_rotation_error_deg"] == pytest.approx(5.25)
    assert s["p95_translation_error_m"] == pytest.approx(np.percentile(np.arange(1, 21) * 0.01, 95))
    empty = loop_transform_summary([])
    assert empty["count"] == 0 and np.isnan(empty["nees_mean"])


def test_a_gap_in_the_ground_truth_is_refused_not_bridged() -> None:
    """A motion-capture dropout: 0.0-1.0 s at 100 Hz, then nothing until 4.0 s."""
    t = np.r_[np.arange(0.0, 1.0, 0.01), np.arange(4.0, 5.0, 0.01)]
    traj = Trajectory(t, np.c_[t, np.zeros((len(t), 2))], np.tile([0.0, 0.0, 0.0, 1.0], (len(t), 1)))
    assert traj.at([0.505, 4.5], max_gap_s=0.25).positions[:, 0] == pytest.approx([0.505, 4.5])
    assert traj.at([2.0]).positions[0, 0] == pytest.approx(2.0)  # without max_gap_s: interpolated
    with pytest.raises(TrajectoryError, match=r"gaps of the trajectory wider than 0.25 s, e.g. 2.000000 in 0.99"):
        traj.at([0.5, 2.0], max_gap_s=0.25)
    assert traj.at([0.995, 4.005], max_gap_s=0.25).positions[:, 0] == pytest.approx([0.995, 4.005])  # at a pose
