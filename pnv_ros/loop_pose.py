"""A loop's relative pose from the local features of its two keyframes. No ROS.

Patch-NetVLAD verifies the place; the pose comes from the keyframes' SIFT features
(:mod:`pnv_ros.local_features`), matched (mutual nearest neighbours + Lowe's ratio test), optionally only
near the verified patch correspondences, then:

- the match keyframe has 3-D points (depth): ``METRIC`` by ``cv2.solvePnPRansac`` (match points, query ideal
  pixels) refined by Gauss-Newton on the reprojection error, 6x6 covariance of ``(w, dt)``; else the query
  keyframe's points in the match image, the result :func:`inverted` (a match made before depth arrived);
- no depth, enough parallax: ``ROTATION_AND_DIRECTION`` by :func:`pnv_ros.geometry.relative_pose` on ideal
  pixels, its (5, 5) covariance of ``(w, a)``;
- no depth, too little parallax: ``ROTATION_ONLY``, the rotation that maps match bearings onto query bearings
  (RANSAC on 2-point Kabsch fits, Gauss-Newton on pixel residuals), (3, 3) covariance of ``w``.

Convention (docs/poses.md): parent = query camera, child = matched camera, optical frames;
``X_parent = R X_child + t``; ``R_true = exp([w]x) R`` (w about the parent axes, rad), ``t_true = t + dt``
(parent axes, m); the METRIC covariance is of ``(w, dt)``, rotation first.

Covariances are ``sigma^2 inv(J^T J)`` at the optimum (J in pixels per parameter, ideal pixels of the query
camera), sigma the inliers' residual standard deviation floored at ``SIGMA_FLOOR_PX``, then calibrated
against ground truth as ``D C D + diag(floor^2)`` (:func:`calibrated`; ``METRIC_*``, ``DIRECTION_*``,
``ROTATION_*``, fitted by benchmarks/loop_poses.py --calibrate); constants below give their sources.
When the match has depth but PnP finds too few inliers, the monocular path is tried (it needs more inliers).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pnv_ros.camera_model import CameraModel
from pnv_ros.errors import ConfigError
from pnv_ros.geometry import (
    PoseType,
    RelativePose,
    relative_pose,
    rotation_exp,
    tangent_basis,
)
from pnv_ros.local_features import LocalFeatures

# -- matching ---------------------------------------------------------------------------------
#: Lowe's ratio test: best / second-best descriptor distance below this (Lowe, IJCV 2004: 0.8). Measured on
#: fr1/desk's 69 revisits (unguided, depth / no depth without a pose): 0.7 -> 3 / 14, 0.8 -> 0 / 3,
#: 0.9 -> 0 / 5 with a monocular rotation p90 of 2.8 deg (1.9 at 0.8) and 2-3x the time
RATIO = 0.8
#: patch guidance radius, image pixels: a local match is kept when a verified patch correspondence has its
#: query centre within this of the query keypoint and its match centre within this of the match keypoint.
#: Patch centres land 16 px (median) from where the ground truth puts them on fr1/desk (issue 28), and a
#: speed-preset patch (5 x 5 cells of 16 network px) spans ~90 image px. Measured on fr1/desk's 69 revisits
#: (docs/results/loop_poses.md, --radii 24,48,96,160): 24 px leaves 5 (depth) / 18 (no depth) without a pose,
#: 48 px 0 / 6, 96 px 0 / 4 with the unguided errors (rotation 0.72 deg median, translation 1.0 / 2.1 cm);
#: guidance does not improve accuracy there (SIFT's ratio test already rejects most wrong matches) but
#: halves the time spent on non-revisits. 96 keeps the evidence and the speed-up
GUIDANCE_RADIUS_PX = 96.0
# -- evidence ----------------------------------------------------------------------------------
#: fewest PnP inliers for METRIC. Measured on fr1/desk (benchmarks/loop_poses.py, 69 revisits, 20 controls):
#: no control reaches 8 PnP inliers; revisits have 16-241 (the one with 16 is right: 1.3 deg, 2 cm)
MIN_METRIC_INLIERS = 15
#: fewest epipolar / rotation inliers for a monocular pose. Measured on fr1/desk: no control reaches 8; two
#: revisits with 22 and 28 inliers were wrong by 15 and 26 deg (a near-planar desk view), the next with 34
#: was right; 30 keeps 66 of 69 revisits
MIN_MONO_INLIERS = 30
#: fewest matches with a 3-D point to try METRIC (EPnP needs 4 a sample; below MIN_METRIC_INLIERS no
#: result can pass anyway, this only skips the RANSAC early)
MIN_METRIC_POINTS = 15
# -- METRIC ------------------------------------------------------------------------------------
#: RANSAC reprojection threshold (ideal pixels) of cv2.solvePnPRansac (EPnP samples). Measured on fr1/desk's
#: 69 revisits: 2 px -> 2 without a pose, 4 px -> 0, 8 px -> 0 with the same errors (rotation 0.71-0.73 deg
#: median, translation 1.0 cm); inlier residual sigmas are 0.8-1.8 px. The final inliers are chosen by the
#: data's own noise (INLIER_SIGMAS). 500 iterations at confidence 0.999: OpenCV's default 100 stops early
#: when a quarter of 30 matches are inliers
PNP_THRESHOLD_PX = 4.0
PNP_ITERATIONS = 500
PNP_CONFIDENCE = 0.999
#: final METRIC inliers: reprojection residual within this many robust sigmas (3: 99.7 % of a Gaussian)
INLIER_SIGMAS = 3.0
MAD_TO_SIGMA = 1.4826
#: residual sigma floor per feature type (ideal pixels): SIFT's sub-pixel keypoint localisation is good to
#: ~0.3-0.5 px on sharp images; the floor only matters for (near) noise-free data
SIGMA_FLOOR_PX = 0.5
#: Calibration of the covariances on fr1/desk against ground truth (benchmarks/loop_poses.py --calibrate): the
#: reported covariance is ``D C D + diag(floor^2)``, C the residual covariance above, D = diag(sqrt(scale)) per
#: block (rotation, translation / direction), fitted by maximum likelihood of the revisit pairs' errors
#: (Gaussian, e ~ N(0, D C D + F)). The scales (variance, ~20-50) say the keypoint residuals are not
#: independent: errors shared by all points of an image (rolling shutter of the moving Kinect, the published
#: fr1 intrinsics and distortion, 0-20 ms colour-depth offset, depth noise) do not average out over n points.
#: The floors are what no residual shows (ground truth interpolated at the colour stamp, motion blur).
#: Two-fold cross-validation (fit on even pairs, test on odd and back) gives METRIC NEES means 7.0 and 5.2.
#: ROTATION_ONLY: fitted on fr1/desk's consecutive frames (0.1 s apart, 14 of 190 rotation-only; no revisit
#: is): the fit puts the scale at 0 and the floor at 0.0135 rad; the scale is kept at 1 so that a bad fit
#: (large residuals) still widens the covariance. Numbers and the fit: docs/poses.md.
METRIC_SCALE = (23.0, 18.0)  # variance factors of (w, dt)
METRIC_FLOOR = (0.0040, 0.0035)  # rad, m
DIRECTION_SCALE = (30.0, 48.0)  # variance factors of (w, a)
DIRECTION_FLOOR = (0.0047, 0.0090)  # rad, rad
ROTATION_SCALE = 1.0  # variance factor of w (ROTATION_ONLY)
ROTATION_FLOOR = 0.0135  # rad
# -- monocular ---------------------------------------------------------------------------------
#: RANSAC threshold (ideal pixels) for the essential matrix and the rotation-only fit. Measured on fr1/desk's
#: revisits without depth: 1.5 px -> 5 without a pose, 3 px -> 3 (rotation p90 1.9 deg), 6 px -> 4 with a
#: rotation p90 of 4.7 deg and direction p90 of 23 deg (wrong matches pass)
MONO_THRESHOLD_PX = 3.0
#: a ROTATION_AND_DIRECTION pose needs this many residual sigmas of median rotation-compensated parallax
#: (geometry.MIN_PARALLAX_SIGMAS, 10, was measured on synthetic scenes); below it: ROTATION_ONLY
MIN_PARALLAX_SIGMAS = 10.0
#: 2-point samples of the rotation-only RANSAC: with 50 % inliers 200 samples miss all-inlier ones with
#: probability 0.75^200 ~ 1e-25
ROTATION_RANSAC_ITERATIONS = 200
#: seeded RANSAC: the same pair gives the same pose (numpy Generator seed)
RANSAC_SEED = 0
#: Gauss-Newton steps per refinement (the start is within a RANSAC threshold: 2-4 steps converge)
GN_MAX_ITERS = 10


def _as_features(name: str, f: LocalFeatures) -> None:
    if not isinstance(f, LocalFeatures):
        raise ConfigError(f"{name} must be LocalFeatures, got {type(f).__name__}")
    n = len(f)
    if f.keypoints.shape != (n, 2) or f.descriptors.shape != (n, 128):
        raise ConfigError(
            f"{name}: keypoints {f.keypoints.shape} and descriptors {f.descriptors.shape} must be (N, 2), (N, 128)"
        )
    if f.rays is not None and f.rays.shape != (n, 3):
        raise ConfigError(f"{name}: rays {f.rays.shape} must be ({n}, 3)")
    if f.points is not None and f.points.shape != (n, 3):
        raise ConfigError(f"{name}: points {f.points.shape} must be ({n}, 3)")


def match_descriptors(
    query: np.ndarray, match: np.ndarray, ratio: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours passing Lowe's ratio test (L2 on SIFT descriptors).

    Args:
        query, match: (Nq, 128), (Nm, 128) uint8 descriptors; ratio: None = ``RATIO``.

    Returns:
        ``(iq, im)``: (K,) int index arrays into query and match.
    """
    import cv2

    ratio = RATIO if ratio is None else float(ratio)
    if len(query) < 2 or len(match) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    bf = cv2.BFMatcher(cv2.NORM_L2)
    q = np.ascontiguousarray(query, np.float32)
    m = np.ascontiguousarray(match, np.float32)
    fwd = bf.knnMatch(q, m, k=2)
    back = bf.match(m, q)
    best_back = np.full(len(m), -1, int)
    for b in back:
        best_back[b.queryIdx] = b.trainIdx
    iq, im = [], []
    for pair in fwd:
        if len(pair) < 2:
            continue
        a, b = pair
        if a.distance < ratio * b.distance and best_back[a.trainIdx] == a.queryIdx:
            iq.append(a.queryIdx)
            im.append(a.trainIdx)
    return np.asarray(iq, int), np.asarray(im, int)


def guided(kq: np.ndarray, km: np.ndarray, patch_pairs: np.ndarray, radius_px: float) -> np.ndarray:
    """(K,) bool: local matches (kq, km: (K, 2) image px) with a patch pair (M, 4: xq, yq, xm, ym) whose query
    centre is within ``radius_px`` of kq and match centre within ``radius_px`` of km."""
    pp = np.asarray(patch_pairs, np.float64).reshape(-1, 4)
    if len(pp) == 0 or len(kq) == 0:
        return np.zeros(len(kq), bool)
    r2 = radius_px**2
    dq = ((kq[:, None, :] - pp[None, :, :2]) ** 2).sum(-1) <= r2
    dm = ((km[:, None, :] - pp[None, :, 2:]) ** 2).sum(-1) <= r2
    return (dq & dm).any(axis=1)


def _ideal(rays: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(N, 3) rays with z > 0 -> (N, 2) ideal pixels of K."""
    h = rays @ k.T
    return h[:, :2] / h[:, 2:3]


def _robust_sigma(r: np.ndarray) -> float:
    return max(MAD_TO_SIGMA * float(np.median(np.abs(r))), SIGMA_FLOOR_PX)


def calibrated(cov: np.ndarray, blocks: tuple[int, ...], scale: tuple[float, ...], floor: tuple[float, ...]):
    """``D C D + diag(floor^2)`` of a (n, n) covariance C whose coordinates come in blocks of the given sizes,
    D = diag(sqrt(scale)) blockwise; floor in the coordinates' units (rad, m). Stays symmetric positive
    (semi)definite: a congruence plus a non-negative diagonal."""
    d = np.concatenate([np.full(b, np.sqrt(s)) for b, s in zip(blocks, scale, strict=True)])
    f = np.concatenate([np.full(b, fl**2) for b, fl in zip(blocks, floor, strict=True)])
    out = d[:, None] * cov * d[None, :] + np.diag(f)
    return 0.5 * (out + out.T)


# -- METRIC ------------------------------------------------------------------------------------
def _project_residuals(rot: np.ndarray, t: np.ndarray, pts: np.ndarray, uv: np.ndarray, k: np.ndarray):
    """Reprojection residuals (2n,) px of ``pi(K (R X + t)) - uv`` and their Jacobian (2n, 6) in (w, dt)."""
    x = pts @ rot.T + t
    z = x[:, 2]
    fx, fy, s = k[0, 0], k[1, 1], k[0, 1]
    u = fx * x[:, 0] / z + s * x[:, 1] / z + k[0, 2]
    v = fy * x[:, 1] / z + k[1, 2]
    r = np.column_stack([u - uv[:, 0], v - uv[:, 1]]).ravel()
    n = len(pts)
    dproj = np.zeros((n, 2, 3))
    dproj[:, 0, 0] = fx / z
    dproj[:, 0, 1] = s / z
    dproj[:, 0, 2] = -(fx * x[:, 0] + s * x[:, 1]) / z**2
    dproj[:, 1, 1] = fy / z
    dproj[:, 1, 2] = -fy * x[:, 1] / z**2
    rx = pts @ rot.T  # d(exp(w) R X)/dw = -[R X]x
    hat = np.zeros((n, 3, 3))
    hat[:, 0, 1], hat[:, 0, 2] = -rx[:, 2], rx[:, 1]
    hat[:, 1, 0], hat[:, 1, 2] = rx[:, 2], -rx[:, 0]
    hat[:, 2, 0], hat[:, 2, 1] = -rx[:, 1], rx[:, 0]
    dx = np.concatenate([-hat, np.broadcast_to(np.eye(3), (n, 3, 3))], axis=2)  # (n, 3, 6)
    jac = np.einsum("nij,njk->nik", dproj, dx).reshape(2 * n, 6)
    return r, jac


def _gauss_newton_pnp(rot, t, pts, uv, k):
    for _ in range(GN_MAX_ITERS):
        r, jac = _project_residuals(rot, t, pts, uv, k)
        try:
            step = -np.linalg.solve(jac.T @ jac, jac.T @ r)
        except np.linalg.LinAlgError:
            break
        rot = rotation_exp(step[:3]) @ rot
        t = t + step[3:]
        if np.linalg.norm(step) < 1e-10:
            break
    return rot, t


def _metric_pose(pts: np.ndarray, uv: np.ndarray, k: np.ndarray) -> RelativePose | None:
    """PnP RANSAC + Gauss-Newton + covariance; pts (n, 3) match metres, uv (n, 2) query ideal px."""
    import cv2

    if len(pts) < MIN_METRIC_POINTS:
        return None
    ok, rvec, tvec, inl = cv2.solvePnPRansac(
        pts.astype(np.float64),
        uv.astype(np.float64),
        k,
        None,
        iterationsCount=PNP_ITERATIONS,
        reprojectionError=PNP_THRESHOLD_PX,
        confidence=PNP_CONFIDENCE,
        flags=cv2.SOLVEPNP_EPNP,
    )
    if not ok or inl is None or len(inl) < MIN_METRIC_INLIERS:
        return None
    rot = cv2.Rodrigues(rvec)[0]
    t = tvec.ravel().astype(np.float64)
    sel = np.zeros(len(pts), bool)
    sel[inl.ravel()] = True
    for _ in range(3):
        rot, t = _gauss_newton_pnp(rot, t, pts[sel], uv[sel], k)
        r_all, _ = _project_residuals(rot, t, pts, uv, k)
        e = np.linalg.norm(r_all.reshape(-1, 2), axis=1)
        new_sel = e <= max(INLIER_SIGMAS * _robust_sigma(r_all.reshape(-1, 2)[sel].ravel()), SIGMA_FLOOR_PX)
        new_sel &= (pts @ rot.T + t)[:, 2] > 0
        if new_sel.sum() < MIN_METRIC_INLIERS:
            return None
        if np.array_equal(new_sel, sel):
            break
        sel = new_sel
    rot, t = _gauss_newton_pnp(rot, t, pts[sel], uv[sel], k)
    r, jac = _project_residuals(rot, t, pts[sel], uv[sel], k)
    n = int(sel.sum())
    sigma2 = max(float(r @ r) / (r.size - 6), SIGMA_FLOOR_PX**2)
    try:
        cov = calibrated(sigma2 * np.linalg.inv(jac.T @ jac), (3, 3), METRIC_SCALE, METRIC_FLOOR)
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(cov).all():
        return None
    x = pts[sel] @ rot.T + t
    par = np.linalg.norm(_ideal(x, k) - _ideal(pts[sel] @ rot.T, k), axis=1)
    return _metric_result(rot, t, cov, n, float(np.sqrt(np.mean(r**2))), float(np.sqrt(sigma2)), float(np.median(par)))


def _metric_result(
    rot: np.ndarray, t: np.ndarray, cov: np.ndarray, n: int, rms_px: float, sigma_px: float, parallax_px: float
) -> RelativePose:
    """A METRIC RelativePose from (R, t) and the (6, 6) covariance of (w, dt); the direction fields follow."""
    norm = float(np.linalg.norm(t))
    d = t / norm if norm > 1e-9 else np.zeros(3)
    basis = tangent_basis(d) if norm > 1e-9 else np.zeros((3, 2))
    proj = (np.eye(3) - np.outer(d, d)) / max(norm, 1e-9)
    return RelativePose(
        rotation=rot,
        direction=d,
        rotation_covariance=cov[:3, :3],
        direction_covariance=proj @ cov[3:, 3:] @ proj.T if norm > 1e-9 else np.zeros((3, 3)),
        inliers=n,
        rms_error_px=rms_px,
        covariance=cov,
        tangent_basis=basis,
        sigma_px=sigma_px,
        parallax_px=parallax_px,
        type=PoseType.METRIC,
        translation=t,
        translation_covariance=cov[3:, 3:],
    )


def inverted(pose: RelativePose) -> RelativePose:
    """The METRIC pose the other way round: (R, t) -> (R^T, -R^T t), its covariance carried to first order.

    With ``R_true = exp([w]x) R`` and ``t_true = t + dt``, the inverse's perturbation is ``w' = -R^T w`` and
    ``dt' = -R^T [t]x w - R^T dt``: ``C' = J C J^T`` with ``J = [[-R^T, 0], [-R^T [t]x, -R^T]]``.

    Raises:
        ConfigError: a pose that is not METRIC.
    """
    if pose.type != PoseType.METRIC or pose.translation is None:
        raise ConfigError(f"only a METRIC pose is inverted here, not {pose.type.name}")
    rt, t = pose.rotation.T, pose.translation
    tx = np.array([[0.0, -t[2], t[1]], [t[2], 0.0, -t[0]], [-t[1], t[0], 0.0]])
    jac = np.block([[-rt, np.zeros((3, 3))], [-rt @ tx, -rt]])
    cov = jac @ pose.covariance @ jac.T
    cov = 0.5 * (cov + cov.T)
    return _metric_result(rt, -rt @ t, cov, pose.inliers, pose.rms_error_px, pose.sigma_px, pose.parallax_px)


# -- ROTATION_ONLY -----------------------------------------------------------------------------
def _kabsch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation R minimising sum |a_i - R b_i|^2 (a, b: (n, 3))."""
    u, _, vt = np.linalg.svd(a.T @ b)
    return u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt


def _rotation_residuals(rot, rq, rm, uvq, k):
    """Pixel residuals (2n,) of pi(K R rm) - uvq and Jacobian (2n, 3) in w."""
    pts = rm / rm[:, 2:3]  # depth-free: any positive scale
    r, jac = _project_residuals(rot, np.zeros(3), pts, uvq, k)
    return r, jac[:, :3]


def _rotation_only(rq: np.ndarray, rm: np.ndarray, k: np.ndarray) -> RelativePose | None:
    """Rotation mapping match rays rm onto query rays rq (n, 3), RANSAC + Gauss-Newton, (3, 3) covariance."""
    n = len(rq)
    if n < MIN_MONO_INLIERS:
        return None
    f = 0.5 * (k[0, 0] + k[1, 1])
    thr = MONO_THRESHOLD_PX / f  # radians, about
    rng = np.random.default_rng(RANSAC_SEED)
    best, best_count = None, 0
    for _ in range(ROTATION_RANSAC_ITERATIONS):
        i = rng.choice(n, 2, replace=False)
        rot = _kabsch(rq[i], rm[i])
        count = int((np.linalg.norm(rq - rm @ rot.T, axis=1) < thr).sum())
        if count > best_count:
            best, best_count = rot, count
    if best is None or best_count < MIN_MONO_INLIERS:
        return None
    sel = np.linalg.norm(rq - rm @ best.T, axis=1) < thr
    rot = _kabsch(rq[sel], rm[sel])
    uvq = _ideal(rq, k)
    for _ in range(3):
        for _ in range(GN_MAX_ITERS):
            r, jac = _rotation_residuals(rot, rq[sel], rm[sel], uvq[sel], k)
            step = -np.linalg.solve(jac.T @ jac, jac.T @ r)
            rot = rotation_exp(step) @ rot
            if np.linalg.norm(step) < 1e-10:
                break
        r_all, _ = _rotation_residuals(rot, rq, rm, uvq, k)
        e = np.linalg.norm(r_all.reshape(-1, 2), axis=1)
        new_sel = e <= INLIER_SIGMAS * _robust_sigma(r_all.reshape(-1, 2)[sel].ravel())
        if new_sel.sum() < MIN_MONO_INLIERS:
            return None
        if np.array_equal(new_sel, sel):
            break
        sel = new_sel
    r, jac = _rotation_residuals(rot, rq[sel], rm[sel], uvq[sel], k)
    sigma2 = max(float(r @ r) / (r.size - 3), SIGMA_FLOOR_PX**2)
    cov = calibrated(sigma2 * np.linalg.inv(jac.T @ jac), (3,), (ROTATION_SCALE,), (ROTATION_FLOOR,))
    return RelativePose(
        rotation=rot,
        direction=np.zeros(3),
        rotation_covariance=cov,
        direction_covariance=np.zeros((3, 3)),
        inliers=int(sel.sum()),
        rms_error_px=float(np.sqrt(np.mean(r**2))),
        covariance=cov,
        tangent_basis=np.zeros((3, 2)),
        sigma_px=float(np.sqrt(sigma2)),
        parallax_px=float(np.median(np.abs(r))),
        type=PoseType.ROTATION_ONLY,
    )


def _monocular(rq: np.ndarray, rm: np.ndarray, k: np.ndarray) -> RelativePose | None:
    uvq, uvm = _ideal(rq, k), _ideal(rm, k)
    pose = relative_pose(
        uvq, uvm, k, threshold_px=MONO_THRESHOLD_PX, min_inliers=MIN_MONO_INLIERS, min_parallax_sigmas=0
    )
    if pose is not None and pose.parallax_px >= MIN_PARALLAX_SIGMAS * pose.sigma_px:
        cov = calibrated(pose.covariance, (3, 2), DIRECTION_SCALE, DIRECTION_FLOOR)
        b = pose.tangent_basis
        return dataclasses.replace(
            pose, covariance=cov, rotation_covariance=cov[:3, :3], direction_covariance=b @ cov[3:, 3:] @ b.T
        )
    return _rotation_only(rq, rm, k)


def estimate_loop_pose(
    query: LocalFeatures,
    match: LocalFeatures,
    camera: CameraModel,
    patch_pairs: np.ndarray | None = None,
) -> RelativePose | None:
    """The matched (child) camera in the query (parent) camera, or None.

    Args:
        query, match: the two keyframes' local features. Rays are taken from the features, or computed with
            ``camera`` from the keypoints when None. ``match.points`` (metres, NaN rows) gives METRIC, else
            ``query.points`` (the pose :func:`inverted`).
        camera: the query's camera; its ``matrix`` scales pixel residuals (ideal pixels).
        patch_pairs: (M, 4) float image pixels (xq, yq, xm, ym) of the verified patch correspondences
            (inliers of the dominant scale), or None: local matches are kept only within
            ``GUIDANCE_RADIUS_PX`` of one of them in both images.

    Returns:
        A :class:`RelativePose` of type METRIC (``translation`` metres, (6, 6) covariance of (w, dt)),
        ROTATION_AND_DIRECTION ((5, 5) of (w, a)) or ROTATION_ONLY ((3, 3) of w); None when there are fewer
        than ``MIN_METRIC_INLIERS`` (with depth) or ``MIN_MONO_INLIERS`` (without) geometrically consistent
        matches (not the same place, or too little overlap).

    Raises:
        ConfigError: inputs that are not LocalFeatures of consistent shapes, a camera that is not a
            CameraModel, patch_pairs that are not (M, 4).
    """
    _as_features("query", query)
    _as_features("match", match)
    if not isinstance(camera, CameraModel):
        raise ConfigError(f"camera must be a CameraModel, got {type(camera).__name__}")
    if patch_pairs is not None:
        pp = np.asarray(patch_pairs, np.float64)
        if pp.ndim != 2 or pp.shape[1] != 4 or not np.isfinite(pp).all():
            raise ConfigError(f"patch_pairs must be a finite (M, 4) array, got shape {pp.shape}")
    iq, im = match_descriptors(query.descriptors, match.descriptors)
    if patch_pairs is not None and len(iq):
        keep = guided(
            query.keypoints[iq].astype(np.float64), match.keypoints[im].astype(np.float64), pp, GUIDANCE_RADIUS_PX
        )
        iq, im = iq[keep], im[keep]
    if len(iq) < min(MIN_METRIC_INLIERS, MIN_MONO_INLIERS):
        return None
    k = camera.matrix
    rq = (query.rays if query.rays is not None else camera.rays(query.keypoints))[iq].astype(np.float64)
    rm = (match.rays if match.rays is not None else camera.rays(match.keypoints))[im].astype(np.float64)
    front = (rq[:, 2] > 1e-6) & (rm[:, 2] > 1e-6)  # ideal pixels exist (fisheye rays may point sideways)
    iq, im, rq, rm = iq[front], im[front], rq[front], rm[front]
    # METRIC from the side with depth: the match's points seen in the query image; else the query's points
    # seen in the match image, inverted (a match keyframe made before depth arrived, or looking at a wall
    # beyond the sensor's range while the query is near it)
    for points, idx, rays, flip in ((match.points, im, rq, False), (query.points, iq, rm, True)):
        if points is None:
            continue
        pts = points[idx].astype(np.float64)
        ok = np.isfinite(pts).all(axis=1)
        if ok.sum() >= MIN_METRIC_POINTS:
            pose = _metric_pose(pts[ok], _ideal(rays[ok], k), k)
            if pose is not None:
                return inverted(pose) if flip else pose
    return _monocular(rq, rm, k)


def ros_pose_covariance(pose: RelativePose) -> np.ndarray:
    """(6, 6) covariance of a METRIC pose in ROS ``PoseWithCovariance`` order (x, y, z, rx, ry, rz): the
    contract's (w, dt) reordered to (dt, w); both are about the parent (query) camera's axes.

    Raises:
        ConfigError: a pose that is not METRIC.
    """
    if pose.type != PoseType.METRIC:
        raise ConfigError(f"a {pose.type.name} pose has no 6x6 covariance")
    order = [3, 4, 5, 0, 1, 2]
    return pose.covariance[np.ix_(order, order)].copy()


def gtsam_pose3_covariance(pose: RelativePose) -> np.ndarray:
    """(6, 6) covariance of a METRIC pose for GTSAM ``Pose3`` ``between(query, match) = Pose3(Rot3(R), t)``,
    in Pose3's tangent order (omega_body, v_body): ``blockdiag(R^T, R^T) C blockdiag(R, R)`` (to first
    order, ``T_true = T Exp(xi)`` with xi = (R^T w, R^T dt)); feed it to ``noiseModel.Gaussian.Covariance``.

    Raises:
        ConfigError: a pose that is not METRIC.
    """
    if pose.type != PoseType.METRIC:
        raise ConfigError(f"a {pose.type.name} pose has no 6x6 covariance")
    a = np.zeros((6, 6))
    a[:3, :3] = a[3:, 3:] = pose.rotation.T
    return a @ pose.covariance @ a.T
