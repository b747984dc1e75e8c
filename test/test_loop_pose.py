"""estimate_loop_pose on real fr1/desk frames (data/tum_fr1_desk_pairs) against motion-capture ground truth.

Bounds are loose multiples of benchmarks/loop_poses.py's numbers on the 69 revisits of the full set (docs/poses.md:
METRIC rotation 0.7 deg median / 1.3 p90, translation 1.0 / 2.2 cm; monocular rotation 0.8 / 1.9 deg).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from pnv_ros import loop_pose as lp
from pnv_ros.camera_model import CameraModel
from pnv_ros.errors import ConfigError
from pnv_ros.geometry import PoseType, rotation_exp, rotation_log, tangent_basis
from pnv_ros.local_features import LocalFeatures, depth_in_metres, extract_local_features

DATA = Path(__file__).resolve().parents[1] / "data" / "tum_fr1_desk_pairs"


@cache
def _set():
    from scipy.spatial.transform import Rotation

    gt = {}
    for line in (DATA / "groundtruth_at_rgb.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        v = line.split()
        t = np.eye(4)
        t[:3, :3] = Rotation.from_quat([float(x) for x in v[4:8]]).as_matrix()
        t[:3, 3] = [float(x) for x in v[1:4]]
        gt[v[0]] = t
    files = {}
    for line in (DATA / "associations.txt").read_text().splitlines():
        if not line.startswith("#") and line.strip():
            v = line.split()
            files[v[0]] = (DATA / v[1], DATA / v[3])
    pairs = [
        line.split()
        for line in (DATA / "pairs.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return gt, files, pairs, CameraModel.load_yaml(DATA / "camera.yaml")


def _image(stamp: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(_set()[1][stamp][0])), cv2.COLOR_BGR2RGB)


@cache
def _features(stamp: str) -> LocalFeatures:
    gt, files, _pairs, cam = _set()
    depth = depth_in_metres(cv2.imread(str(files[stamp][1]), cv2.IMREAD_UNCHANGED), "16UC1", 5000.0)
    return extract_local_features(_image(stamp), cam, depth)


def _mono(f: LocalFeatures) -> LocalFeatures:
    return LocalFeatures(f.keypoints, f.descriptors, f.rays, None)


def _truth(q: str, m: str) -> np.ndarray:
    gt = _set()[0]
    return np.linalg.inv(gt[q]) @ gt[m]


def _pairs(kind: str) -> list[tuple[str, str]]:
    return [(q, m) for q, m, k in _set()[2] if k == kind]


def _rot_err_deg(truth: np.ndarray, r: np.ndarray) -> float:
    return float(np.degrees(np.linalg.norm(rotation_log(truth[:3, :3] @ r.T))))


def test_revisits_with_depth_are_metric() -> None:
    cam = _set()[3]
    rot, trans = [], []
    for q, m in _pairs("revisit"):
        pose = lp.estimate_loop_pose(_features(q), _features(m), cam)
        assert pose is not None and pose.type == PoseType.METRIC, (q, m)
        truth = _truth(q, m)
        rot.append(_rot_err_deg(truth, pose.rotation))
        trans.append(float(np.linalg.norm(truth[:3, 3] - pose.translation)))
        assert pose.covariance.shape == (6, 6) and pose.inliers >= lp.MIN_METRIC_INLIERS
        np.testing.assert_array_equal(pose.rotation_covariance, pose.covariance[:3, :3])
        np.testing.assert_array_equal(pose.translation_covariance, pose.covariance[3:, 3:])
        assert np.all(np.linalg.eigvalsh(pose.covariance) > 0)
        t = pose.translation
        d = t / np.linalg.norm(t)
        np.testing.assert_allclose(pose.direction, d)
        p = (np.eye(3) - np.outer(d, d)) / np.linalg.norm(t)
        np.testing.assert_allclose(pose.direction_covariance, p @ pose.translation_covariance @ p.T, atol=1e-15)
        np.testing.assert_allclose(pose.tangent_basis, tangent_basis(d))
    assert len(rot) == 6
    assert max(rot) < 4.0 and np.median(rot) < 2.0, rot
    assert max(trans) < 0.08 and np.median(trans) < 0.05, trans


def test_revisits_without_depth_are_monocular() -> None:
    cam = _set()[3]
    got = 0
    for q, m in _pairs("revisit"):
        pose = lp.estimate_loop_pose(_mono(_features(q)), _mono(_features(m)), cam)
        if pose is None:
            continue
        got += 1
        truth = _truth(q, m)
        assert pose.type in (PoseType.ROTATION_AND_DIRECTION, PoseType.ROTATION_ONLY)
        assert pose.translation is None and pose.translation_covariance is None
        assert _rot_err_deg(truth, pose.rotation) < 5.0
        if pose.type == PoseType.ROTATION_AND_DIRECTION:
            assert pose.covariance.shape == (5, 5)
            d = truth[:3, 3] / np.linalg.norm(truth[:3, 3])
            assert np.degrees(np.arccos(np.clip(d @ pose.direction, -1, 1))) < 15.0
    assert got >= 5


def test_controls_give_no_pose() -> None:
    cam = _set()[3]
    for q, m in _pairs("control"):
        assert lp.estimate_loop_pose(_features(q), _features(m), cam) is None
        assert lp.estimate_loop_pose(_features(q), _mono(_features(m)), cam) is None
        assert lp.estimate_loop_pose(_mono(_features(q)), _mono(_features(m)), cam) is None


def test_pure_rotation_gives_rotation_only() -> None:
    """A real frame and its warp by K R K^-1 (a camera turned in place by a known R): no parallax."""
    stamp = _pairs("revisit")[0][0]
    img = _image(stamp)
    cam = CameraModel(_set()[3].matrix)  # the warp is a pinhole homography: take the pixels as ideal
    r_true = rotation_exp(np.radians([1.5, -3.0, 2.0]))
    h = cam.matrix @ r_true @ np.linalg.inv(cam.matrix)
    warped = cv2.warpPerspective(img, h, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR)
    pose = lp.estimate_loop_pose(extract_local_features(warped, cam), extract_local_features(img, cam), cam)
    assert pose is not None and pose.type == PoseType.ROTATION_ONLY
    assert np.degrees(np.linalg.norm(rotation_log(r_true @ pose.rotation.T))) < 0.1
    assert pose.covariance.shape == (3, 3) and pose.translation is None
    np.testing.assert_array_equal(pose.direction, np.zeros(3))
    np.testing.assert_array_equal(pose.tangent_basis, np.zeros((3, 2)))
    assert np.all(np.linalg.eigvalsh(pose.rotation_covariance) >= lp.ROTATION_FLOOR**2 * (1 - 1e-9))


def test_patch_guidance_keeps_matches_near_patch_pairs() -> None:
    kq = np.array([[100.0, 100.0], [300.0, 200.0], [500.0, 400.0]])
    km = kq + [10.0, -5.0]
    pairs = np.array([[110.0, 95.0, 115.0, 90.0], [500.0, 400.0, 200.0, 100.0]])
    np.testing.assert_array_equal(lp.guided(kq, km, pairs, 20.0), [True, False, False])
    q, m = _pairs("revisit")[1]
    cam = _set()[3]
    far = np.array([[0.0, 0.0, 639.0, 479.0]])  # one patch pair at opposite corners: nothing near it
    assert lp.estimate_loop_pose(_features(q), _features(m), cam, far) is None
    with pytest.raises(ConfigError, match=r"\(M, 4\)"):
        lp.estimate_loop_pose(_features(q), _features(m), cam, np.zeros((3, 3)))


def test_metric_jacobian_is_the_documented_perturbation() -> None:
    """The covariance is sigma^2 (J^T J)^-1 with J in (w, dt): R_true = exp([w]x) R, t_true = t + dt."""
    rng = np.random.default_rng(1)
    k = _set()[3].matrix
    pts = rng.uniform([-1, -1, 1], [1, 1, 3], (20, 3))
    rot, t = rotation_exp([0.1, -0.2, 0.05]), np.array([0.1, -0.05, 0.2])
    uv = rng.uniform(0, 500, (20, 2))
    _r, jac = lp._project_residuals(rot, t, pts, uv, k)
    h = 1e-6
    for i in range(6):
        p = np.zeros(6)
        p[i] = h
        plus = lp._project_residuals(rotation_exp(p[:3]) @ rot, t + p[3:], pts, uv, k)[0]
        minus = lp._project_residuals(rotation_exp(-p[:3]) @ rot, t - p[3:], pts, uv, k)[0]
        np.testing.assert_allclose(jac[:, i], (plus - minus) / (2 * h), rtol=1e-5, atol=1e-4)


def test_backend_conversions() -> None:
    """Sampled poses (w, dt) ~ N(0, C) about a METRIC estimate: their Pose3 local coordinates
    xi = (Log(R^T R_true), R^T (t_true - t)) have the covariance gtsam_pose3_covariance documents."""
    q, m = _pairs("revisit")[0]
    pose = lp.estimate_loop_pose(_features(q), _features(m), _set()[3])
    assert pose is not None and pose.type == PoseType.METRIC
    ros = lp.ros_pose_covariance(pose)
    np.testing.assert_array_equal(ros[:3, :3], pose.translation_covariance)
    np.testing.assert_array_equal(ros[3:, 3:], pose.rotation_covariance)
    np.testing.assert_array_equal(ros[:3, 3:], pose.covariance[3:, :3])
    g = lp.gtsam_pose3_covariance(pose)
    rng = np.random.default_rng(0)
    samples = rng.multivariate_normal(np.zeros(6), pose.covariance, 4000)
    xi = np.array(
        [
            np.r_[rotation_log(pose.rotation.T @ rotation_exp(s[:3]) @ pose.rotation), pose.rotation.T @ s[3:]]
            for s in samples
        ]
    )
    emp = np.cov(xi.T)
    sd = np.sqrt(np.diag(g))
    np.testing.assert_allclose(emp / np.outer(sd, sd), g / np.outer(sd, sd), atol=0.08)
    mono = lp.estimate_loop_pose(_features(q), _mono(_features(m)), _set()[3]) or pose
    if mono.type != PoseType.METRIC:
        with pytest.raises(ConfigError, match="no 6x6"):
            lp.gtsam_pose3_covariance(mono)


def test_bad_inputs_raise() -> None:
    q, m = _pairs("revisit")[0]
    cam = _set()[3]
    with pytest.raises(ConfigError, match="LocalFeatures"):
        lp.estimate_loop_pose(np.zeros((3, 2)), _features(m), cam)
    with pytest.raises(ConfigError, match="CameraModel"):
        lp.estimate_loop_pose(_features(q), _features(m), cam.matrix)
    f = _features(q)
    with pytest.raises(ConfigError, match="descriptors"):
        lp.estimate_loop_pose(LocalFeatures(f.keypoints, f.descriptors[:5]), _features(m), cam)
    empty = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    assert lp.estimate_loop_pose(empty, _features(m), cam) is None


def test_depth_points_follow_the_depth_image() -> None:
    """3-D points: z is the PNG depth / 5000 at the keypoint (median of a smooth window), x/z and y/z the ray's."""
    from pnv_ros.errors import ImageError

    q = _pairs("revisit")[0][0]
    f = _features(q)
    raw = cv2.imread(str(_set()[1][q][1]), cv2.IMREAD_UNCHANGED)
    ok = np.isfinite(f.points).all(axis=1)
    assert f.has_depth and ok.sum() > 0.5 * len(f)
    kp = np.rint(f.keypoints[ok]).astype(int)
    z_png = raw[kp[:, 1], kp[:, 0]] / 5000.0
    valid = z_png > 0
    np.testing.assert_allclose(f.points[ok][valid, 2], z_png[valid], rtol=0.06)  # DEPTH_EDGE_REL 5 % of the median
    np.testing.assert_allclose(
        f.points[ok][:, :2] / f.points[ok][:, 2:], f.rays[ok][:, :2] / f.rays[ok][:, 2:], rtol=1e-5
    )
    with pytest.raises(ImageError, match="not 16UC1"):
        depth_in_metres(raw, "8UC1")
    with pytest.raises(ImageError, match="uint16"):
        depth_in_metres(raw.astype(np.float32), "16UC1")
    with pytest.raises(ImageError, match=r"\(H, W\)"):
        depth_in_metres(raw[None], "16UC1")
    with pytest.raises(ImageError, match="depth image"):
        extract_local_features(_image(q), _set()[3], np.zeros((10, 10), np.float32))
    q2, m2 = _pairs("revisit")[2]
    raw2 = cv2.imread(str(_set()[1][m2][1]), cv2.IMREAD_UNCHANGED)
    none = extract_local_features(_image(m2), _set()[3], depth_in_metres(np.zeros_like(raw2), "16UC1", 5000.0))
    assert none.points is not None and not none.has_depth
    pose = lp.estimate_loop_pose(_mono(_features(q2)), none, _set()[3])  # all-zero depth: the monocular pose
    assert pose is not None and pose.type != PoseType.METRIC


def test_tangent_basis_follows_the_recipe_of_the_message() -> None:
    """RelativePose.msg and docs/poses.md spell out the direction covariance's basis B for backends outside
    Python (i = the smallest |d_k|, first on ties; b1 = normalize(d x e_i); b2 = d x b1): it is
    geometry.tangent_basis, orthonormal and orthogonal to d, on random and tied directions."""
    rng = np.random.default_rng(7)
    dirs = [*rng.normal(size=(50, 3)), [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, -1.0, 0.0]]
    for v in dirs:
        d = np.asarray(v, float) / np.linalg.norm(v)
        i = int(np.argmin(np.abs(d)))
        b1 = np.cross(d, np.eye(3)[i])
        b1 /= np.linalg.norm(b1)
        recipe = np.column_stack([b1, np.cross(d, b1)])
        got = tangent_basis(d)
        assert np.allclose(got, recipe, atol=1e-12), (d, got, recipe)
        assert np.allclose(got.T @ got, np.eye(2)) and np.allclose(d @ got, 0.0)


def test_depth_on_the_query_side_only_is_metric() -> None:
    """A match keyframe without depth (made before the depth driver started) and a query with it: the query's
    points seen in the match image, inverted; as close to ground truth as the other way round."""
    cam = _set()[3]
    for q, m in _pairs("revisit"):
        pose = lp.estimate_loop_pose(_features(q), _mono(_features(m)), cam)
        assert pose is not None and pose.type == PoseType.METRIC, (q, m)
        truth = _truth(q, m)
        assert _rot_err_deg(truth, pose.rotation) < 4.0
        assert np.linalg.norm(truth[:3, 3] - pose.translation) < 0.08
        # the roles swapped (the ratio test is one-sided, so the matches differ a little): the same pose
        swapped = lp.inverted(lp.estimate_loop_pose(_mono(_features(m)), _features(q), cam))
        assert _rot_err_deg(pose.rotation, swapped.rotation) < 2.0
        assert np.linalg.norm(pose.translation - swapped.translation) < 0.03


def test_inverted_carries_the_covariance() -> None:
    """inverted(): the covariance of the inverse pose matches the spread of inverses of poses sampled in the
    documented perturbation (R_true = exp([w]x) R, t_true = t + dt)."""
    q, m = _pairs("revisit")[0]
    pose = lp.estimate_loop_pose(_features(q), _features(m), _set()[3])
    inv = lp.inverted(pose)
    np.testing.assert_allclose(inv.rotation, pose.rotation.T)
    np.testing.assert_allclose(inv.translation, -pose.rotation.T @ pose.translation)
    rng = np.random.default_rng(0)
    samples = rng.multivariate_normal(np.zeros(6), pose.covariance, 20000)
    err = []
    for x in samples:
        r = rotation_exp(x[:3]) @ pose.rotation
        t = pose.translation + x[3:]
        ri, ti = r.T, -r.T @ t
        err.append(np.concatenate([rotation_log(ri @ inv.rotation.T), ti - inv.translation]))
    emp = np.cov(np.array(err).T)
    scale = np.sqrt(np.outer(np.diag(inv.covariance), np.diag(inv.covariance)))
    np.testing.assert_allclose(emp / scale, inv.covariance / scale, atol=0.05)
    mono = [lp.estimate_loop_pose(_mono(_features(a)), _mono(_features(b)), _set()[3]) for a, b in _pairs("revisit")]
    with pytest.raises(ConfigError, match="METRIC"):
        lp.inverted(next(p for p in mono if p is not None))
