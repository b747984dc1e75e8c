"""pnv_ros.pose_graph: the GTSAM backend on a synthetic drive with a seeded odometry drift.

The camera drives 1.25 laps of a 2 m square (50 keyframes, 0.2 m apart); odometry has a yaw bias, a scale error
and noise (seeded), so the position error after a lap is tens of centimetres. Loops between the second pass and
the first carry the true relative pose plus noise drawn from their own covariance. Position ATE is evo's (APE of
the translation part after SE(3) Umeyama alignment), as ``pnv eval`` reports it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from pnv_ros.errors import ConfigError, MapError, UnknownPlaceError
from pnv_ros.geometry import PoseType, RelativePose, rotation_exp, rotation_log, tangent_basis
from pnv_ros.pose_graph import PoseGraph, PoseGraphSettings, kernel_k
from pnv_ros.trajectory import Trajectory, ate_rmse

PER_LAP = 40
N = 50
SIDE_M = 2.0
#: camera optical axes in a z-up body frame: x right = -y body, y down = -z body, z forward = x body
R_BODY_CAM = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
ROT_SIGMA = 0.005  # rad, a loop's rotation sigma (METRIC's calibrated floor is 0.004)
TRANS_SIGMA = 0.01  # m, a loop's translation sigma (fr1/desk's METRIC median error is 1.0 cm)


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _pose(r: np.ndarray, t: np.ndarray) -> np.ndarray:
    p = np.eye(4)
    p[:3, :3] = r
    p[:3, 3] = t
    return p


def _ground_truth() -> list[np.ndarray]:
    """Camera poses along the square, heading along the side, turning at the corners."""
    step = 4 * SIDE_M / PER_LAP
    out = []
    for k in range(N):
        s = (k % PER_LAP) * step
        side, along = int(s // SIDE_M), s % SIDE_M
        heading = side * np.pi / 2
        corner = np.array([[0, 0], [SIDE_M, 0], [SIDE_M, SIDE_M], [0, SIDE_M]][side], float)
        xy = corner + along * np.array([np.cos(heading), np.sin(heading)])
        out.append(_pose(_rz(heading) @ R_BODY_CAM, np.array([xy[0], xy[1], 0.0])))
    return out


def _odometry(gt: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Drifted odometry: each true step scaled by 1.04, yawed by a 0.012 rad bias, plus seeded noise."""
    rng = np.random.default_rng(seed)
    out = [gt[0].copy()]
    for a, b in zip(gt, gt[1:]):
        step = np.linalg.inv(a) @ b
        bias = R_BODY_CAM.T @ _rz(0.012) @ R_BODY_CAM  # a yaw about the body's z axis, in camera axes
        noisy = _pose(
            rotation_exp(rng.normal(0, 0.002, 3)) @ bias @ step[:3, :3], 1.04 * step[:3, 3] + rng.normal(0, 0.003, 3)
        )
        out.append(out[-1] @ noisy)
    return out


def _relative(kind: PoseType, rotation: np.ndarray, t: np.ndarray, cov: np.ndarray) -> RelativePose:
    """A RelativePose of ``kind`` (t: METRIC the translation, ROTATION_AND_DIRECTION the direction)."""
    if kind == PoseType.ROTATION_ONLY:
        return RelativePose(
            rotation, np.zeros(3), cov, np.zeros((3, 3)), 200, 0.5, cov, np.zeros((3, 2)), 0.5, 0.1, kind
        )
    d = t / np.linalg.norm(t)
    b = tangent_basis(d)
    if kind == PoseType.METRIC:
        p = (np.eye(3) - np.outer(d, d)) / np.linalg.norm(t)
        return RelativePose(
            rotation, d, cov[:3, :3], p @ cov[3:, 3:] @ p.T, 200, 0.5, cov, b, 0.5, 20.0, kind, t, cov[3:, 3:]
        )
    return RelativePose(rotation, d, cov[:3, :3], b @ cov[3:, 3:] @ b.T, 200, 0.5, cov, b, 0.5, 20.0, kind)


def _measured(gt: list[np.ndarray], q: int, m: int, kind: PoseType, rng: np.random.Generator) -> RelativePose:
    """The loop (q, m) with the true relative pose perturbed by noise drawn from its covariance."""
    true = np.linalg.inv(gt[q]) @ gt[m]
    w = rng.normal(0, ROT_SIGMA, 3)
    r = rotation_exp(w) @ true[:3, :3]
    if kind == PoseType.METRIC:
        dt = rng.normal(0, TRANS_SIGMA, 3)
        return _relative(kind, r, true[:3, 3] + dt, np.diag([ROT_SIGMA**2] * 3 + [TRANS_SIGMA**2] * 3))
    if kind == PoseType.ROTATION_AND_DIRECTION:
        d = true[:3, 3] / np.linalg.norm(true[:3, 3])
        a = rng.normal(0, 0.02, 2)
        d = d + tangent_basis(d) @ a
        return _relative(kind, r, d / np.linalg.norm(d), np.diag([ROT_SIGMA**2] * 3 + [0.02**2] * 2))
    return _relative(kind, r, np.zeros(3), np.eye(3) * ROT_SIGMA**2)


def _ate(gt: list[np.ndarray], est: np.ndarray) -> float:
    """Position ATE RMSE (m) after SE(3) alignment (:func:`pnv_ros.trajectory.ate_rmse`: evo's), poses 1 s apart."""
    stamps = np.arange(len(gt), dtype=float)
    return ate_rmse(Trajectory.from_matrices(stamps, np.array(gt)), Trajectory.from_matrices(stamps, np.array(est)))


#: loops of the second pass onto the first: keyframe k (k >= PER_LAP + 2) saw keyframe k - PER_LAP - 1, one step
#: (0.2 m) behind it (a direction needs a baseline)
LOOPS = [(k, k - PER_LAP - 1) for k in range(PER_LAP + 2, N)]


def _graph(kind: PoseType | None = PoseType.METRIC, settings: PoseGraphSettings | None = None, wrong_at: int = -1):
    gt, odom = _ground_truth(), _odometry(_ground_truth())
    rng = np.random.default_rng(1)
    g = PoseGraph(settings)
    loops = dict(LOOPS)
    for k in range(N):
        g.add_keyframe(k, 500_000_000 * k, odom[k])
        if kind is not None and k in loops:
            g.add_loop(k, loops[k], _measured(gt, k, loops[k], kind, rng))
        if k == wrong_at:  # a wrong loop: keyframe k claims to see keyframe 10 (2 m away) 0.5 m ahead
            wrong = _relative(
                PoseType.METRIC,
                np.eye(3),
                np.array([0.0, 0.0, 0.5]),
                np.diag([ROT_SIGMA**2] * 3 + [TRANS_SIGMA**2] * 3),
            )
            g.add_loop(k, 10, wrong)
    return gt, odom, g


def test_without_loops_the_graph_keeps_the_odometry() -> None:
    _gt, odom, g = _graph(kind=None)
    assert g.ids == list(range(N))
    np.testing.assert_allclose(g.optimized_poses(), np.array(odom), atol=1e-6)
    np.testing.assert_allclose(g.map_to_odom(), np.eye(4), atol=1e-6)
    np.testing.assert_array_equal(g.stamps, 500_000_000 * np.arange(N))


def test_metric_loops_remove_most_of_the_drift() -> None:
    gt, odom, g = _graph(PoseType.METRIC)
    before, after = _ate(gt, np.array(odom)), _ate(gt, g.optimized_poses())
    assert before >= 0.15, f"the drift model is too weak for the test: ATE {before:.3f} m"
    assert after <= 0.4 * before, f"ATE {before:.3f} m -> {after:.3f} m"
    # Every loop agrees with the optimum within its kernel's k (none is taken for wrong).
    assert np.all(g.loop_errors() < kernel_k(6)), g.loop_errors()
    # map -> odom is the newest keyframe's correction.
    np.testing.assert_allclose(g.map_to_odom() @ odom[-1], g.pose(N - 1), atol=1e-9)


def test_one_wrong_loop_barely_changes_the_map_under_the_cauchy_kernel() -> None:
    gt, _odom, right = _graph(PoseType.METRIC, PoseGraphSettings(max_loop_error=0.0))
    _gt, _odom, wrong = _graph(PoseType.METRIC, PoseGraphSettings(max_loop_error=0.0), wrong_at=30)
    clean, bent = _ate(gt, right.optimized_poses()), _ate(gt, wrong.optimized_poses())
    assert abs(bent - clean) < 0.1 * clean, f"ATE {clean:.4f} m -> {bent:.4f} m with one wrong loop"
    errors = wrong.loop_errors()
    assert errors[-1 - sum(k > 30 for k, _ in LOOPS)] > 10 * kernel_k(6)  # the wrong loop, told apart
    assert wrong.rejected_loops == []  # max_loop_error 0: nothing removed
    # Without the kernel the same wrong loop bends the map: the kernel is what protects it.
    _gt, _odom, plain = _graph(
        PoseType.METRIC, PoseGraphSettings(robust_kernel="none", max_loop_error=0.0), wrong_at=30
    )
    assert _ate(gt, plain.optimized_poses()) > 2 * clean


def test_a_wrong_loop_is_removed_and_leaves_the_map_as_without_it() -> None:
    gt, _odom, right = _graph(PoseType.METRIC)
    _gt, _odom, wrong = _graph(PoseType.METRIC, wrong_at=30)
    assert [(lp.query_id, lp.match_id) for lp in wrong.rejected_loops] == [(30, 10)]
    assert right.rejected_loops == [] and len(wrong.loops) == len(right.loops) == len(LOOPS)
    assert max(right.loop_errors()) < PoseGraphSettings().max_loop_error  # no right loop comes near the gate
    np.testing.assert_allclose(wrong.optimized_poses(), right.optimized_poses(), atol=1e-4)
    assert abs(_ate(gt, wrong.optimized_poses()) - _ate(gt, right.optimized_poses())) < 1e-4


def test_monocular_loops_correct_the_drift_as_far_as_they_constrain() -> None:
    gt, odom, g = _graph(PoseType.ROTATION_AND_DIRECTION)
    before, after = _ate(gt, np.array(odom)), _ate(gt, g.optimized_poses())
    assert after <= 0.7 * before, f"ATE {before:.3f} m -> {after:.3f} m"
    _gt, _odom, rot = _graph(PoseType.ROTATION_ONLY)
    assert _ate(gt, rot.optimized_poses()) < before  # the yaw drift is corrected, the scale is not


def test_a_rotation_only_loop_moves_the_rotation_and_keeps_the_translation() -> None:
    g = PoseGraph()
    a = _pose(np.eye(3), np.zeros(3))
    b = _pose(rotation_exp([0.0, 0.3, 0.0]), np.array([0.5, 0.0, 1.0]))
    g.add_keyframe(0, 0, a)
    g.add_keyframe(1, 10**9, b)
    measured = rotation_exp([0.0, 0.25, 0.0])  # rotation of camera 1 in camera 0 (between(0, 1))
    g.add_loop(0, 1, _relative(PoseType.ROTATION_ONLY, measured, np.zeros(3), np.eye(3) * 0.001**2))
    rel = np.linalg.inv(g.pose(0)) @ g.pose(1)
    # The loop (1 mrad) outweighs odometry (the default model: ~0.06 rad for this step) on the rotation ...
    assert np.linalg.norm(rotation_log(rel[:3, :3].T @ measured)) < 0.005
    # ... and says nothing of the translation: the odometry's stays.
    np.testing.assert_allclose(rel[:3, 3], b[:3, 3], atol=1e-6)


def test_a_direction_loop_turns_the_translation_and_keeps_its_length() -> None:
    # No kernel: the loop (1 mrad) is 200 sigmas from the odometry's direction at the start, where Cauchy
    # would take it for wrong; this test is about what the factor constrains.
    g = PoseGraph(PoseGraphSettings(translation_per_m=0.3, robust_kernel="none"))
    b = _pose(np.eye(3), np.array([0.0, 0.0, 1.0]))
    g.add_keyframe(0, 0, np.eye(4))
    g.add_keyframe(1, 10**9, b)
    d = np.array([0.2, 0.0, 1.0]) / np.linalg.norm([0.2, 0.0, 1.0])
    cov = np.diag([1e-6] * 3 + [1e-6] * 2)
    g.add_loop(0, 1, _relative(PoseType.ROTATION_AND_DIRECTION, np.eye(3), d, cov))
    t = (np.linalg.inv(g.pose(0)) @ g.pose(1))[:3, 3]
    assert np.degrees(np.arccos(np.clip(t @ d / np.linalg.norm(t), -1, 1))) < 0.5
    assert abs(np.linalg.norm(t) - 1.0) < 0.05  # no scale from a direction: the odometry's length


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    gt, odom, g = _graph(PoseType.METRIC, wrong_at=30)
    path = tmp_path / "graph.npz"
    g.save(path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickle
        assert {"keyframe_ids", "odometry", "loop_type", "optimized"} <= set(z.files)
    h = PoseGraph.load(path)
    assert h.ids == g.ids and len(h.loops) == len(g.loops)
    assert h.settings == g.settings
    np.testing.assert_array_equal(h.stamps, g.stamps)
    np.testing.assert_allclose(h.odometry_poses(), g.odometry_poses(), atol=0)
    # The loaded graph, rebuilt in another order from the saved optimum, converges to the same optimum.
    np.testing.assert_allclose(h.optimized_poses(), g.optimized_poses(), atol=1e-5)
    np.testing.assert_allclose(h.loop_errors(), g.loop_errors(), rtol=0.01, atol=0.01)
    # The loaded graph goes on: a new keyframe and a new loop.
    step = _pose(np.eye(3), np.array([0.0, 0.0, 0.2]))
    h.add_keyframe(N, 500_000_000 * N, odom[-1] @ step)
    assert h.add_loop(N, 11, _measured(gt + [gt[-1] @ step], N, 11, PoseType.ROTATION_ONLY, np.random.default_rng(2)))
    assert len(h) == N + 1 and len(h.loops) == len(g.loops) + 1
    assert [(lp.query_id, lp.match_id) for lp in g.rejected_loops] == [(30, 10)]  # the wrong loop: not saved
    # Another kernel on load; the file's odometry covariances stay.
    assert PoseGraph.load(path, PoseGraphSettings(robust_kernel="huber")).settings.robust_kernel == "huber"


def test_a_restart_continues_the_loaded_graph_in_a_new_odometry_frame(tmp_path: Path) -> None:
    """The first lap is saved; after a 'restart' the odometry starts again from the identity (a new frame) and
    the second pass's loops tie the new segment to the loaded map."""
    gt, odom = _ground_truth(), _odometry(_ground_truth())
    first = PoseGraph()
    for k in range(PER_LAP):
        first.add_keyframe(k, k, odom[k])
    first.save(tmp_path / "lap.npz")
    h = PoseGraph.load(tmp_path / "lap.npz")
    rng = np.random.default_rng(3)
    restart = np.linalg.inv(odom[PER_LAP])  # the new odometry frame: the restart pose is its origin
    loops = dict(LOOPS)
    for k in range(PER_LAP, N):
        h.add_keyframe(k, k, restart @ odom[k], new_segment=k == PER_LAP)
        if k in loops:
            h.add_loop(k, loops[k], _measured(gt, k, loops[k], PoseType.METRIC, rng))
        if k == PER_LAP + 1:  # before its first loop the weak prior holds the segment at its odometry poses
            np.testing.assert_allclose(h.pose(k), restart @ odom[k], atol=1e-6)
            np.testing.assert_allclose(h.map_to_odom(), np.eye(4), atol=1e-6)
    assert h.segment_starts == [0, PER_LAP]
    est = h.optimized_poses()
    # The new segment sits where the map says: within 5 cm of the first lap's poses of the same places.
    for k, m in LOOPS:
        true = np.linalg.inv(gt[k]) @ gt[m]
        got = np.linalg.inv(est[k]) @ est[m]
        assert np.linalg.norm(got[:3, 3] - true[:3, 3]) < 0.05, (k, m)


def _rewrite(src: Path, dst: Path, **changes: np.ndarray) -> Path:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(dst, **arrays)
    return dst


def test_bad_graph_files_raise_map_error(tmp_path: Path) -> None:
    _gt, _odom, g = _graph(PoseType.METRIC)
    good = tmp_path / "graph.npz"
    g.save(good)
    with np.load(good, allow_pickle=False) as z:
        odom, ids, lq, lt = z["odometry"].copy(), z["keyframe_ids"].copy(), z["loop_query"].copy(), z["loop_type"]
    nan = odom.copy()
    nan[3, 0, 3] = np.nan
    skew = odom.copy()
    skew[4, :3, :3] *= 1.1
    dup = ids.copy()
    dup[5] = dup[4]
    unknown = lq.copy()
    unknown[0] = 999
    bad = {
        "missing": tmp_path / "none.npz",
        "folder": tmp_path,
        "nan odometry": _rewrite(good, tmp_path / "nan.npz", odometry=nan),
        "not a rotation": _rewrite(good, tmp_path / "skew.npz", odometry=skew),
        "duplicate ids": _rewrite(good, tmp_path / "dup.npz", keyframe_ids=dup),
        "loop to an unknown keyframe": _rewrite(good, tmp_path / "unknown.npz", loop_query=unknown),
        "loop type NONE": _rewrite(good, tmp_path / "none_type.npz", loop_type=np.zeros_like(lt)),
        "short stamps": _rewrite(good, tmp_path / "stamps.npz", stamps=np.zeros(3, np.int64)),
        "float stamps": _rewrite(good, tmp_path / "fstamps.npz", stamps=np.zeros(N)),
        "another format": _rewrite(good, tmp_path / "format.npz", meta=np.array('{"format": "x", "version": 1}')),
    }
    (tmp_path / "text.npz").write_text("not a zip")
    bad["not a zip"] = tmp_path / "text.npz"
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad["truncated"] = truncated
    nometa = tmp_path / "nometa.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(nometa, "w") as zout:
        for info in zin.infolist():
            if info.filename != "meta.npy":
                zout.writestr(info, zin.read(info))
    bad["no meta"] = nometa
    for what, path in bad.items():
        with pytest.raises(MapError):
            PoseGraph.load(path)
            pytest.fail(f"{what}: loaded")


def test_wrong_inputs_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="robust_kernel"):
        PoseGraphSettings(robust_kernel="tukey")
    with pytest.raises(ConfigError, match="translation_per_m"):
        PoseGraphSettings(translation_per_m=-1.0)
    g = PoseGraph()
    g.add_keyframe(0, 0, np.eye(4))
    with pytest.raises(MapError, match="already"):
        g.add_keyframe(0, 10**9, np.eye(4))
    with pytest.raises(ConfigError, match="rigid"):
        g.add_keyframe(1, 10**9, np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ConfigError, match="positive definite"):
        g.add_keyframe(1, 10**9, np.eye(4), covariance=-np.eye(6))
    loop = _relative(PoseType.ROTATION_ONLY, np.eye(3), np.zeros(3), np.eye(3) * 1e-4)
    with pytest.raises(UnknownPlaceError, match="keyframe 7"):
        g.add_loop(7, 0, loop)
    g.add_keyframe(1, 10**9, np.eye(4))
    with pytest.raises(ConfigError, match="positive definite"):
        g.add_loop(1, 0, _relative(PoseType.ROTATION_ONLY, np.eye(3), np.zeros(3), -np.eye(3)))
    assert len(g.loops) == 0 and len(g) == 2


def test_the_parameter_table_in_docs_is_current() -> None:
    from pnv_ros.ros.pose_graph_params import markdown

    text = (Path(__file__).resolve().parents[1] / "docs" / "pose_graph.md").read_text()
    start = text.index("-->\n", text.index("<!-- parameters:")) + 4
    assert text[start : text.index("<!-- /parameters -->")] == markdown(), "regenerate docs/pose_graph.md's table"


def test_odometry_step_covariance_from_message_covariances() -> None:
    from pnv_ros.pose_graph import odometry_step_covariance

    r = _rz(np.pi / 2) @ R_BODY_CAM  # the camera's rotation in the odometry frame
    grow = np.diag([1.0, 4.0, 9.0, 0.01, 0.04, 0.09]) * 1e-4  # ROS order: x y z (m^2), rx ry rz (rad^2)
    prev = np.diag([5.0, 5.0, 5.0, 0.1, 0.1, 0.1]) * 1e-4
    c = odometry_step_covariance(prev, prev + grow, r)
    # Pose3 order (rotation, translation), each block in the camera's axes: R^T C R.
    np.testing.assert_allclose(c[:3, :3], r.T @ grow[3:, 3:] @ r, atol=1e-15)
    np.testing.assert_allclose(c[3:, 3:], r.T @ grow[:3, :3] @ r, atol=1e-15)
    np.testing.assert_allclose(c[:3, 3:], 0.0, atol=1e-15)
    # No covariance, a constant one, or one that shrank: None (the drift model applies).
    assert odometry_step_covariance(np.zeros((6, 6)), np.zeros((6, 6)), r) is None
    assert odometry_step_covariance(prev, prev, r) is None
    assert odometry_step_covariance(prev + grow, prev, r) is None
    # The graph takes it as the step's covariance.
    g = PoseGraph()
    g.add_keyframe(0, 0, np.eye(4))
    g.add_keyframe(1, 1, _pose(r, np.array([0.1, 0.0, 0.0])), covariance=c)
    np.testing.assert_allclose(g._odometry_cov[1], c)


def test_a_long_straight_run_without_loops_stays_solvable() -> None:
    """600 m straight, a keyframe every 0.5 m, default drift model, no loop: the lateral uncertainty grows to
    hundreds of metres against the gauge prior (GTSAM's Cholesky called this system indeterminate at 504 m)."""
    g = PoseGraph()
    for k in range(1200):
        g.add_keyframe(k, k, _pose(np.eye(3), np.array([0.5 * k, 0.0, 0.0])))
    assert abs(g.pose(1199)[0, 3] - 599.5) < 1e-6


def test_a_loop_claiming_an_impossible_precision_is_refused_and_the_graph_goes_on() -> None:
    gt, _odom, g = _graph(PoseType.METRIC)
    before = g.optimized_poses()
    loop = _relative(PoseType.METRIC, np.eye(3), np.array([0.0, 0.0, 0.5]), np.diag([1e-20] + [1e-4] * 5))
    with pytest.raises(ConfigError, match="MIN_SIGMA"):
        g.add_loop(N - 1, 0, loop)
    np.testing.assert_allclose(g.optimized_poses(), before, atol=1e-9)
    g.add_keyframe(N, 500_000_000 * N, g.odometry_poses()[-1])
    assert len(g) == N + 1


def test_a_rebuilt_graph_is_the_same_graph() -> None:
    """The recovery after a GTSAM error (an iSAM2 rebuilt from the stored keyframes and loops) changes nothing."""
    _gt, _odom, g = _graph(PoseType.METRIC, wrong_at=30)
    before, loops = g.optimized_poses(), [(lp.query_id, lp.match_id) for lp in g.loops]
    g._rebuild()
    np.testing.assert_allclose(g.optimized_poses(), before, atol=1e-5)
    assert [(lp.query_id, lp.match_id) for lp in g.loops] == loops and len(g.rejected_loops) == 1
