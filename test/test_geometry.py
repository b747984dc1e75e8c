"""pnv_ros.geometry.relative_pose on synthetic two-view scenes with known ground truth."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pnv_ros.geometry import RelativePose, relative_pose, rotation_exp, rotation_log

W, H, F = 512, 384, 400.0
K = np.array([[F, 0.0, W / 2], [0.0, F, H / 2], [0.0, 0.0, 1.0]])
R_TRUE = rotation_exp(np.deg2rad(15.0) * np.array([0.3, 1.0, 0.1]) / np.linalg.norm([0.3, 1.0, 0.1]))
T_TRUE = np.array([0.8, 0.1, 0.6]) / np.linalg.norm([0.8, 0.1, 0.6])


def make_scene(rng, n: int, rotation=R_TRUE, direction=T_TRUE, baseline: float = 1.0):
    """n points seen by both cameras: noise-free pixels (pts_query, pts_match), X_q = R X_m + b t."""
    k_inv = np.linalg.inv(K)
    pq, pm = [], []
    while len(pq) < n:
        u = rng.uniform([0.0, 0.0], [W, H])
        xq = rng.uniform(4.0, 12.0) * (k_inv @ np.array([u[0], u[1], 1.0]))
        xm = rotation.T @ (xq - baseline * direction)
        if xm[2] < 0.5:
            continue
        v = K @ xm
        v = v[:2] / v[2]
        if 0 <= v[0] < W and 0 <= v[1] < H:
            pq.append(u)
            pm.append(v)
    return np.array(pq), np.array(pm)


def noisy(rng, pq, pm, sigma: float, outlier_frac: float = 0.0):
    """Gaussian pixel noise on both images; a fraction of matches replaced by random pixels."""
    q = pq + rng.normal(0.0, sigma, pq.shape)
    m = pm + rng.normal(0.0, sigma, pm.shape)
    out = rng.choice(len(pq), int(round(outlier_frac * len(pq))), replace=False)
    m[out] = rng.uniform([0.0, 0.0], [W, H], (out.size, 2))
    return q, m, out


def rot_err_deg(r: np.ndarray, r_true: np.ndarray = R_TRUE) -> float:
    return float(np.rad2deg(np.linalg.norm(rotation_log(r @ r_true.T))))


def dir_err_deg(d: np.ndarray, d_true: np.ndarray = T_TRUE) -> float:
    return float(np.rad2deg(np.arccos(np.clip(d @ d_true, -1.0, 1.0))))


def test_recovers_known_pose_with_noise_and_outliers(rng) -> None:
    pq, pm = make_scene(rng, 300)
    q, m, out = noisy(rng, pq, pm, 1.0, 0.2)
    est = relative_pose(q, m, K)
    assert isinstance(est, RelativePose)
    assert rot_err_deg(est.rotation) < 1.0
    assert dir_err_deg(est.direction) < 3.0
    assert est.inliers >= 0.8 * (300 - out.size)
    assert est.inliers <= 300 - out.size + 0.1 * out.size  # few random matches fall near their epipolar line
    assert 0.7 < est.rms_error_px < 1.5  # Sampson distance has the per-coordinate noise std (1 px)
    # the claimed uncertainty is consistent with the actual error (3-sigma-ish, one draw)
    e = rotation_log(est.rotation @ R_TRUE.T)
    assert e @ est.rotation_information @ e < 16.0


def test_refinement_beats_the_ransac_model_alone(rng, monkeypatch) -> None:
    """The Gauss-Newton steps are worth having: without them the rotation error is several times larger."""
    import pnv_ros.geometry as geometry

    pq, pm = make_scene(rng, 200)
    draws = [noisy(rng, pq, pm, 1.0, 0.2)[:2] for _ in range(10)]
    refined = np.mean([rot_err_deg(relative_pose(q, m, K).rotation) for q, m in draws])
    monkeypatch.setattr(geometry, "GN_MAX_ITERS", 0)
    raw = np.mean([rot_err_deg(relative_pose(q, m, K).rotation) for q, m in draws])
    assert refined < 0.5 * raw


@pytest.mark.parametrize("outlier_frac", [0.0, 0.2])
def test_covariance_is_calibrated(rng, outlier_frac: float) -> None:
    """Monte-Carlo: same scene, 150 noise draws; predicted vs empirical rotation and direction error."""
    pq, pm = make_scene(rng, 120)
    rot_e, rot_cov, rot_nees, dir_e, dir_cov, dir_nees = [], [], [], [], [], []
    for _ in range(150):
        q, m, _ = noisy(rng, pq, pm, 1.0, outlier_frac)
        est = relative_pose(q, m, K)
        assert est is not None
        e = rotation_log(est.rotation @ R_TRUE.T)  # left perturbation, parent (query) axes
        rot_e.append(e)
        rot_cov.append(est.rotation_covariance)
        rot_nees.append(e @ est.rotation_information @ e)
        d = est.tangent_basis.T @ (T_TRUE - est.direction)  # first-order tangent coordinates
        dir_e.append(est.tangent_basis @ d)
        dir_cov.append(est.direction_covariance)
        dir_nees.append(d @ np.linalg.inv(est.covariance[3:, 3:]) @ d)
    rot_e, dir_e = np.array(rot_e), np.array(dir_e)
    rot_ratio = np.trace(rot_e.T @ rot_e / len(rot_e)) / np.trace(np.mean(rot_cov, axis=0))
    dir_ratio = np.trace(dir_e.T @ dir_e / len(dir_e)) / np.trace(np.mean(dir_cov, axis=0))
    print(
        f"outliers {outlier_frac}: rotation trace emp/pred {rot_ratio:.2f} NEES {np.mean(rot_nees):.2f}; "
        f"direction trace emp/pred {dir_ratio:.2f} NEES {np.mean(dir_nees):.2f}"
    )
    assert 0.5 < rot_ratio < 2.0
    assert 0.5 < dir_ratio < 2.0
    # chi^2_3 (resp. chi^2_2) means: 3 (2), standard error of a 150-draw mean 0.2 (0.16)
    assert 2.2 < np.mean(rot_nees) < 4.5
    assert 1.4 < np.mean(dir_nees) < 3.0


def test_covariance_follows_the_evidence(rng) -> None:
    few_pts = make_scene(rng, 30)
    many_pts = make_scene(rng, 300)
    few = relative_pose(*noisy(rng, *few_pts, 1.0)[:2], K)
    many = relative_pose(*noisy(rng, *many_pts, 1.0)[:2], K)
    assert few.inliers < 40 < 250 < many.inliers
    rot_shrink = np.trace(few.rotation_covariance) / np.trace(many.rotation_covariance)
    dir_shrink = np.trace(few.direction_covariance) / np.trace(many.direction_covariance)
    assert rot_shrink > 3.0 and dir_shrink > 3.0  # ~10x expected from 10x the points

    pq, pm = make_scene(rng, 150)
    quiet = relative_pose(*noisy(rng, pq, pm, 0.5)[:2], K)
    loud = relative_pose(*noisy(rng, pq, pm, 3.0)[:2], K)
    rot_grow = np.trace(loud.rotation_covariance) / np.trace(quiet.rotation_covariance)
    dir_grow = np.trace(loud.direction_covariance) / np.trace(quiet.direction_covariance)
    assert rot_grow > 15.0 and dir_grow > 15.0  # (3 / 0.5)^2 = 36 expected
    assert 0.4 < quiet.sigma_px < 0.65 and 2.5 < loud.sigma_px < 3.5
    print(f"trace few/many rot {rot_shrink:.1f} dir {dir_shrink:.1f}; loud/quiet rot {rot_grow:.1f} dir {dir_grow:.1f}")


def test_noise_free_data_is_floored_not_zero(rng) -> None:
    est = relative_pose(*make_scene(rng, 100), K)
    assert est.rms_error_px < 1e-3
    assert est.sigma_px == pytest.approx(0.5)
    assert np.linalg.eigvalsh(est.rotation_covariance)[0] > 0
    assert rot_err_deg(est.rotation) < 1e-3 and dir_err_deg(est.direction) < 1e-3


def test_little_parallax_gives_a_large_direction_covariance(rng) -> None:
    """Far points, tiny baseline: the rotation stays sharp, the direction is (honestly) vague."""
    good = relative_pose(*noisy(rng, *make_scene(rng, 200), 1.0)[:2], K)
    weak = relative_pose(*noisy(rng, *make_scene(rng, 200, baseline=0.02), 1.0)[:2], K)
    assert weak is not None
    assert np.trace(weak.direction_covariance) > 20 * np.trace(good.direction_covariance)
    assert rot_err_deg(weak.rotation) < 1.0


def test_too_few_or_degenerate_gives_none(rng) -> None:
    pq, pm = make_scene(rng, 100)
    assert relative_pose(pq[:7], pm[:7], K) is None  # fewer than min_inliers = 8
    assert relative_pose(pq[:20], pm[:20], K, min_inliers=30) is None
    assert relative_pose(np.zeros((0, 2)), np.zeros((0, 2)), K) is None
    same = np.tile([[100.0, 100.0]], (50, 1))
    assert relative_pose(same, same, K) is None  # one point repeated
    # no motion at all, noise-free: any direction explains the data (J^T J singular)
    assert relative_pose(pq, pq.copy(), K) is None
    # pure noise: no consistent geometry with 8 inliers of 8 px... random matches rarely give one
    q, m = rng.uniform([0, 0], [W, H], (40, 2)), rng.uniform([0, 0], [W, H], (40, 2))
    est = relative_pose(q, m, K, threshold_px=1.0, min_inliers=30)
    assert est is None


def test_bad_input_raises(rng) -> None:
    pq, pm = make_scene(rng, 20)
    with pytest.raises(ValueError, match="pts_query"):
        relative_pose(np.zeros((20, 3)), pm, K)
    with pytest.raises(ValueError, match="pts_match"):
        relative_pose(pq, pm.ravel(), K)
    with pytest.raises(ValueError, match="same shape"):
        relative_pose(pq, pm[:-1], K)
    bad = pq.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        relative_pose(bad, pm, K)
    with pytest.raises(ValueError, match="intrinsics"):
        relative_pose(pq, pm, np.eye(3)[:2])
    with pytest.raises(ValueError, match="intrinsics"):
        relative_pose(pq, pm, np.diag([-400.0, 400.0, 1.0]))
    with pytest.raises(ValueError, match="intrinsics"):
        relative_pose(pq, pm, np.full((3, 3), np.inf))
    with pytest.raises(ValueError, match="threshold_px"):
        relative_pose(pq, pm, K, threshold_px=0.0)
    with pytest.raises(ValueError, match="min_inliers"):
        relative_pose(pq, pm, K, min_inliers=5)


def test_result_is_a_proper_rotation_and_unit_direction(rng) -> None:
    for _ in range(5):
        axis = rng.normal(size=3)
        r_true = rotation_exp(np.deg2rad(rng.uniform(5.0, 20.0)) * axis / np.linalg.norm(axis))
        t_true = rng.normal(size=3)
        t_true /= np.linalg.norm(t_true)
        pq, pm = make_scene(rng, 150, rotation=r_true, direction=t_true)
        est = relative_pose(*noisy(rng, pq, pm, 1.0, 0.2)[:2], K)
        assert est.rotation.shape == (3, 3) and est.rotation.dtype == np.float64
        assert np.linalg.det(est.rotation) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(est.rotation.T @ est.rotation, np.eye(3), atol=1e-12)
        assert est.direction.shape == (3,) and np.linalg.norm(est.direction) == pytest.approx(1.0, abs=1e-12)
        assert rot_err_deg(est.rotation, r_true) < 1.0 and dir_err_deg(est.direction, t_true) < 5.0
        # covariances: symmetric PSD; direction's is rank 2 and tangent to the sphere
        for c in (est.rotation_covariance, est.direction_covariance, est.covariance):
            np.testing.assert_allclose(c, c.T, atol=1e-15)
            assert np.linalg.eigvalsh(c)[0] > -1e-15
        np.testing.assert_allclose(est.direction_covariance @ est.direction, 0.0, atol=1e-12)
        assert np.linalg.matrix_rank(est.direction_covariance, tol=1e-9 * np.trace(est.direction_covariance)) == 2
        np.testing.assert_allclose(est.tangent_basis.T @ est.tangent_basis, np.eye(2), atol=1e-12)
        np.testing.assert_allclose(est.information @ est.covariance, np.eye(5), atol=1e-6)
        with pytest.raises(ValueError):
            est.rotation[0, 0] = 2.0  # read-only


def test_convention_matches_recover_pose_and_frames() -> None:
    """The matched camera sits 1 m to the right (+x) of the query camera, both looking +z:
    X_query = X_match + (1, 0, 0), so the direction is +x and the rotation identity."""
    rng = np.random.default_rng(7)
    pq, pm = make_scene(rng, 100, rotation=np.eye(3), direction=np.array([1.0, 0.0, 0.0]))
    # a point straight ahead of the query camera appears left of centre in the matched camera
    centre = np.argmin(np.abs(pq[:, 0] - W / 2))
    assert pm[centre, 0] < W / 2
    est = relative_pose(pq, pm, K)
    np.testing.assert_allclose(est.direction, [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(est.rotation, np.eye(3), atol=1e-6)


def test_runtime_on_300_points(rng) -> None:
    pq, pm = make_scene(rng, 300)
    q, m, _ = noisy(rng, pq, pm, 1.0, 0.2)
    relative_pose(q, m, K)  # warm-up (OpenCV import, first call)
    t0 = time.perf_counter()
    for _ in range(5):
        relative_pose(q, m, K)
    dt = (time.perf_counter() - t0) / 5
    print(f"relative_pose on 300 points (20% outliers): {dt * 1e3:.1f} ms")
    assert dt < 0.2  # generous bound for a loaded CI runner
