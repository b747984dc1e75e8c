"""pnv_ros.geometry.relative_pose on synthetic two-view scenes with known ground truth."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from pnv_ros import geometry
from pnv_ros.geometry import RelativePose, relative_pose, rotation_exp, rotation_log

W, H, F = 512, 384, 400.0
K = np.array([[F, 0.0, W / 2], [0.0, F, H / 2], [0.0, 0.0, 1.0]])
AXIS = np.array([0.3, 1.0, 0.1]) / np.linalg.norm([0.3, 1.0, 0.1])
R_TRUE = rotation_exp(np.deg2rad(15.0) * AXIS)
T_TRUE = np.array([0.8, 0.1, 0.6]) / np.linalg.norm([0.8, 0.1, 0.6])


def make_scene(rng, n: int, rotation=R_TRUE, direction=T_TRUE, baseline: float = 1.0, depth=(4.0, 12.0)):
    """n points seen by both cameras: noise-free pixels (pts_query, pts_match), X_q = R X_m + b t."""
    k_inv = np.linalg.inv(K)
    pq, pm = [], []
    while len(pq) < n:
        u = rng.uniform([0.0, 0.0], [W, H])
        xq = rng.uniform(*depth) * (k_inv @ np.array([u[0], u[1], 1.0]))
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


def todays_pose(q, m):
    """What pnv_ros/detector.py does today: RANSAC essential matrix + cv2.recoverPose."""
    e, mask = cv2.findEssentialMat(m, q, K, method=cv2.RANSAC, prob=0.999, threshold=8.0)
    n, r, t, _ = cv2.recoverPose(e[:3], m, q, K, mask=mask)
    return n, r, t.ravel() / np.linalg.norm(t)


def test_recovers_known_pose_with_noise_and_outliers(rng) -> None:
    pq, pm = make_scene(rng, 300)
    q, m, out = noisy(rng, pq, pm, 1.0, 0.2)
    est = relative_pose(q, m, K)
    assert isinstance(est, RelativePose)
    print(
        f"rotation error {rot_err_deg(est.rotation):.3f} deg, direction error {dir_err_deg(est.direction):.2f} deg, "
        f"inliers {est.inliers}/{300 - out.size}, rms {est.rms_error_px:.2f} px"
    )
    assert rot_err_deg(est.rotation) < 1.0
    assert dir_err_deg(est.direction) < 3.0
    assert est.inliers >= 0.8 * (300 - out.size)
    assert est.inliers <= 300 - out.size + 0.1 * out.size  # few random matches land near their epipolar line
    assert 0.7 < est.rms_error_px < 1.3  # a Sampson distance has the per-coordinate noise std (1 px)
    assert 0.8 < est.sigma_px < 1.3
    e = rotation_log(est.rotation @ R_TRUE.T)
    assert e @ est.rotation_information @ e < 16.0  # the claimed uncertainty covers the actual error


def test_more_accurate_than_todays_ransac_pose(rng) -> None:
    """The refinement is worth having: today's RANSAC + recoverPose pose is several times worse."""
    pq, pm = make_scene(rng, 200)
    ours, today = [], []
    for _ in range(10):
        q, m, _ = noisy(rng, pq, pm, 1.0, 0.2)
        ours.append(rot_err_deg(relative_pose(q, m, K).rotation))
        today.append(rot_err_deg(todays_pose(q, m)[1]))
    print(f"mean rotation error: ours {np.mean(ours):.3f} deg, today's {np.mean(today):.3f} deg")
    assert np.mean(ours) < 0.5 * np.mean(today)


@pytest.mark.parametrize("outlier_frac", [0.0, 0.2])
def test_covariance_is_calibrated(rng, outlier_frac: float) -> None:
    """Monte-Carlo: one scene, 100 noise draws; predicted vs empirical rotation and direction error."""
    pq, pm = make_scene(rng, 120)
    rot_e, rot_cov, rot_nees, dir_e, dir_cov, dir_nees = [], [], [], [], [], []
    for _ in range(100):
        q, m, _ = noisy(rng, pq, pm, 1.0, outlier_frac)
        est = relative_pose(q, m, K)
        assert est is not None
        e = rotation_log(est.rotation @ R_TRUE.T)  # left perturbation, parent (query) axes
        rot_e.append(e)
        rot_cov.append(est.rotation_covariance)
        rot_nees.append(e @ est.rotation_information @ e)
        a = est.tangent_basis.T @ (T_TRUE - est.direction)  # tangent coordinates, first order
        dir_e.append(est.tangent_basis @ a)
        dir_cov.append(est.direction_covariance)
        dir_nees.append(a @ np.linalg.inv(est.covariance[3:, 3:]) @ a)
    rot_e, dir_e = np.array(rot_e), np.array(dir_e)
    rot_ratio = np.trace(rot_e.T @ rot_e / len(rot_e)) / np.trace(np.mean(rot_cov, axis=0))
    dir_ratio = np.trace(dir_e.T @ dir_e / len(dir_e)) / np.trace(np.mean(dir_cov, axis=0))
    print(
        f"outliers {outlier_frac}: rotation trace empirical/predicted {rot_ratio:.2f}, "
        f"NEES mean {np.mean(rot_nees):.2f} median {np.median(rot_nees):.2f}; "
        f"direction trace empirical/predicted {dir_ratio:.2f}, "
        f"NEES mean {np.mean(dir_nees):.2f} median {np.median(dir_nees):.2f}"
    )
    assert 0.5 < rot_ratio < 2.0
    assert 0.5 < dir_ratio < 2.0
    rot_nees, dir_nees = np.array(rot_nees), np.array(dir_nees)
    if outlier_frac == 0.0:
        # ideal means 3 (rotation, chi^2_3) and 2 (direction, chi^2_2); standard error of a
        # 100-draw mean 0.24 (0.2)
        assert 2.2 < rot_nees.mean() < 4.2
        assert 1.4 < dir_nees.mean() < 3.0
    else:
        # A wrong match that lands within the noise band of its epipolar line cannot be
        # rejected; now and then a few of them make one draw's covariance far too small, and
        # one such draw moves a 100-draw mean by up to ~5. Check the bulk (medians; ideal
        # 2.37 and 1.39) and that the tail beyond the chi^2 99.9 % points stays rare.
        assert 1.6 < np.median(rot_nees) < 3.6
        assert 0.9 < np.median(dir_nees) < 2.2
        assert np.mean(rot_nees > 16.27) <= 0.03 and np.mean(dir_nees > 13.82) <= 0.03


def test_covariance_follows_the_evidence(rng) -> None:
    few = relative_pose(*noisy(rng, *make_scene(rng, 30), 1.0)[:2], K)
    many = relative_pose(*noisy(rng, *make_scene(rng, 300), 1.0)[:2], K)
    assert few.inliers < 40 < 250 < many.inliers
    rot_shrink = np.trace(few.rotation_covariance) / np.trace(many.rotation_covariance)
    dir_shrink = np.trace(few.direction_covariance) / np.trace(many.direction_covariance)

    pq, pm = make_scene(rng, 150)
    quiet = relative_pose(*noisy(rng, pq, pm, 0.5)[:2], K)
    loud = relative_pose(*noisy(rng, pq, pm, 3.0)[:2], K)
    rot_grow = np.trace(loud.rotation_covariance) / np.trace(quiet.rotation_covariance)
    dir_grow = np.trace(loud.direction_covariance) / np.trace(quiet.direction_covariance)
    print(f"trace 30/300 points: rot {rot_shrink:.1f}, dir {dir_shrink:.1f}")
    print(f"trace 3/0.5 px noise: rot {rot_grow:.1f}, dir {dir_grow:.1f}")
    assert rot_shrink > 3.0 and dir_shrink > 3.0  # ~10x expected from 10x the points
    assert rot_grow > 15.0 and dir_grow > 15.0  # (3 / 0.5)^2 = 36 expected
    assert 0.4 < quiet.sigma_px < 0.65 and 2.5 < loud.sigma_px < 3.5


def test_noise_free_data_is_floored_not_zero(rng) -> None:
    est = relative_pose(*make_scene(rng, 100), K)
    assert est.rms_error_px < 1e-3
    assert est.sigma_px == pytest.approx(geometry.SIGMA_FLOOR_PX)
    assert np.linalg.eigvalsh(est.rotation_covariance)[0] > 0
    assert rot_err_deg(est.rotation) < 1e-3 and dir_err_deg(est.direction) < 1e-3


def test_low_parallax_is_refused(rng) -> None:
    """Far points, a 5 cm baseline: ~2 px of parallax at 1 px noise; the direction is not
    observable and the estimate would be unreliable, so no pose unless asked for."""
    q, m, _ = noisy(rng, *make_scene(rng, 200, baseline=0.05), 1.0)
    assert relative_pose(q, m, K) is None
    weak = relative_pose(q, m, K, min_parallax_sigmas=0.0)
    assert weak is not None and weak.parallax_px < 5.0
    good = relative_pose(*noisy(rng, *make_scene(rng, 200), 1.0)[:2], K)
    assert good.parallax_px > 10 * good.sigma_px
    # no translation at all: refused too
    q, m, _ = noisy(rng, *make_scene(rng, 200, baseline=1e-9), 1.0)
    assert relative_pose(q, m, K) is None


def test_far_scene_keeps_its_points(rng) -> None:
    """Depths of 55-80 baselines. cv2.recoverPose's default distance limit (50 baselines) treats
    such points as 'at infinity' and drops them from the cheirality count, which then picks
    among the decompositions on almost no evidence; here every point counts."""
    d = np.array([1.0, 0.0, 0.2]) / np.linalg.norm([1.0, 0.0, 0.2])
    pq, pm = make_scene(rng, 150, direction=d, depth=(55.0, 80.0))
    q, m, _ = noisy(rng, pq, pm, 0.1)
    n_today, r_today, t_today = todays_pose(q, m)
    est = relative_pose(q, m, K, min_parallax_sigmas=5.0)
    print(
        f"far scene: today's pose {n_today}/150 points, errors {rot_err_deg(r_today):.2f} / "
        f"{dir_err_deg(t_today, d):.1f} deg; ours {est.inliers}/150, "
        f"{rot_err_deg(est.rotation):.3f} / {dir_err_deg(est.direction, d):.1f} deg"
    )
    assert est.inliers >= 140
    assert rot_err_deg(est.rotation) < 0.2 and dir_err_deg(est.direction, d) < 5.0


def test_too_few_or_degenerate_gives_none(rng) -> None:
    pq, pm = make_scene(rng, 100)
    assert relative_pose(pq[:7], pm[:7], K) is None  # fewer than min_inliers = 8
    assert relative_pose(pq[:20], pm[:20], K, min_inliers=30) is None
    assert relative_pose(np.zeros((0, 2)), np.zeros((0, 2)), K) is None
    same = np.tile([[100.0, 100.0]], (50, 1))
    assert relative_pose(same, same, K) is None  # one point repeated
    assert relative_pose(pq, pq.copy(), K) is None  # no motion at all, noise-free
    q, m = rng.uniform([0, 0], [W, H], (40, 2)), rng.uniform([0, 0], [W, H], (40, 2))
    assert relative_pose(q, m, K, min_inliers=30) is None  # unrelated points


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
    with pytest.raises(ValueError, match="min_parallax_sigmas"):
        relative_pose(pq, pm, K, min_parallax_sigmas=-1.0)


def test_result_is_a_proper_rotation_and_unit_direction(rng) -> None:
    for _ in range(5):
        axis = rng.normal(size=3)
        r_true = rotation_exp(np.deg2rad(rng.uniform(5.0, 20.0)) * axis / np.linalg.norm(axis))
        t_true = rng.normal(size=3) * [1.0, 1.0, 0.3]  # mostly sideways: enough parallax
        t_true /= np.linalg.norm(t_true)
        pq, pm = make_scene(rng, 150, rotation=r_true, direction=t_true)
        est = relative_pose(*noisy(rng, pq, pm, 1.0, 0.2)[:2], K)
        assert est.rotation.shape == (3, 3) and est.rotation.dtype == np.float64
        assert np.linalg.det(est.rotation) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(est.rotation.T @ est.rotation, np.eye(3), atol=1e-12)
        assert est.direction.shape == (3,) and np.linalg.norm(est.direction) == pytest.approx(1.0, abs=1e-12)
        assert rot_err_deg(est.rotation, r_true) < 2.0 and dir_err_deg(est.direction, t_true) < 5.0
        # covariances: symmetric PSD; the direction's is rank 2 and tangent to the sphere
        for c in (est.rotation_covariance, est.direction_covariance, est.covariance):
            np.testing.assert_allclose(c, c.T, atol=1e-15)
            assert np.linalg.eigvalsh(c)[0] > -1e-15
        np.testing.assert_allclose(est.direction_covariance @ est.direction, 0.0, atol=1e-12)
        assert np.linalg.matrix_rank(est.direction_covariance, tol=1e-9 * np.trace(est.direction_covariance)) == 2
        np.testing.assert_allclose(est.tangent_basis.T @ est.tangent_basis, np.eye(2), atol=1e-12)
        np.testing.assert_allclose(est.tangent_basis.T @ est.direction, 0.0, atol=1e-12)
        np.testing.assert_allclose(est.information @ est.covariance, np.eye(5), atol=1e-6)
        info = est.direction_information  # a pseudo-inverse: P C P = P
        np.testing.assert_allclose(info @ est.direction_covariance @ info, info, atol=1e-6 * np.abs(info).max())
        with pytest.raises(ValueError):
            est.rotation[0, 0] = 2.0  # read-only


def test_convention_matches_recover_pose_and_frames() -> None:
    """The matched camera sits 1 m to the right (+x) of the query camera, both looking along +z:
    X_query = X_match + (1, 0, 0), so direction = +x and rotation = identity; a point straight
    ahead of the query camera appears left of centre in the matched image."""
    rng = np.random.default_rng(7)
    pq, pm = make_scene(rng, 100, rotation=np.eye(3), direction=np.array([1.0, 0.0, 0.0]))
    centre = np.argmin(np.abs(pq[:, 0] - W / 2))
    assert pm[centre, 0] < W / 2
    est = relative_pose(pq, pm, K)
    np.testing.assert_allclose(est.direction, [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(est.rotation, np.eye(3), atol=1e-6)
    _, r, t = todays_pose(pq, pm)  # the same convention as cv2.recoverPose(E, match, query)
    np.testing.assert_allclose(t, est.direction, atol=1e-3)
    np.testing.assert_allclose(r, est.rotation, atol=1e-3)


def test_analytic_jacobian_matches_central_differences(rng) -> None:
    q, m, _ = noisy(rng, *make_scene(rng, 50), 1.0, 0.2)
    hq, hm = np.column_stack([q, np.ones(50)]), np.column_stack([m, np.ones(50)])
    d = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    r = rotation_exp([0.1, 0.2, -0.1])
    res, jac, basis = geometry._residuals_and_jacobian(r, d, hq, hm, np.linalg.inv(K))
    np.testing.assert_allclose(res, geometry.sampson_px(r, d, hq, hm, np.linalg.inv(K)), atol=1e-9)
    num = geometry._numerical_jacobian(r, d, hq, hm, np.linalg.inv(K))
    np.testing.assert_allclose(jac, num, atol=1e-6 * np.abs(num).max())


def test_runtime_on_300_points(rng) -> None:
    q, m, _ = noisy(rng, *make_scene(rng, 300), 1.0, 0.2)
    relative_pose(q, m, K)  # warm-up
    t0 = time.perf_counter()
    for _ in range(5):
        relative_pose(q, m, K)
    dt = (time.perf_counter() - t0) / 5
    print(f"relative_pose on 300 points (20% outliers): {dt * 1e3:.1f} ms")
    assert dt < 0.5  # generous for a loaded CI runner
