"""Trajectory metrics of an evaluation run (``pnv eval BAG --gt-poses FILE``): the odometry (and, with a pose graph,
the optimised trajectory) against ground truth at the keyframes, and the accepted METRIC loops' relative poses
against the ground-truth relative pose. No ROS.

Ground-truth poses (``--gt-poses``): a TUM trajectory file (``t tx ty tz qx qy qz qw``; any name not ending in
``.csv``), sampled at the keyframes' stamps (linear / slerp between its poses: :meth:`Trajectory.at`); or a CSV
``name,x,y[,z]`` with one row per bag frame in frame order (positions only: no orientation, so no loop poses
are scored and the ATE is of positions, which is all it ever measures).

metrics.json gets (:func:`trajectory_metrics`):

- ``trajectory``: ``keyframes`` (with odometry and ground truth), ``ate_rmse_m_odometry`` (position ATE after the
  SE(3) alignment, evo), ``rpe_odometry`` (evo's RPE over ``delta_m`` of path), ``ate_rmse_m_optimized`` and
  ``rpe_optimized`` of the pose graph's keyframe poses (:func:`optimize_in_process`, or ``pose_graph_node``'s
  through ``--node``; None without one), ``pose_graph`` (which graph, its keyframes and loops);
- ``loop_transforms``: ``count`` (accepted loops with a METRIC pose), ``median_translation_error_m``,
  ``median_rotation_error_deg``, ``p95_translation_error_m``, ``p95_rotation_error_deg``, ``nees_mean`` and
  ``pose_types`` (accepted loops by pose type).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from pnv_ros.bags import BagReader
from pnv_ros.errors import GroundTruthError
from pnv_ros.eval.ground_truth import SequenceGT
from pnv_ros.eval.replay import ACCEPTED_LOOPS_RULE, PoseGraphOutput, ReplayResult
from pnv_ros.geometry import PoseType
from pnv_ros.pose_graph import Loop, PoseGraph, PoseGraphSettings
from pnv_ros.trajectory import (
    RPE_DELTA_M,
    Trajectory,
    ate_rmse,
    loop_transform_error,
    loop_transform_summary,
    rpe,
)
from pnv_ros.tum import read_trajectory

#: a keyframe takes the bag's odometry nearest its stamp within this (ns): the node's odom_tolerance_s default
ODOM_TOLERANCE_NS = 100_000_000
#: a frame's ground truth is interpolated only between poses at most this far apart (s): a motion-capture
#: dropout is refused, not bridged (TUM RGB-D's ground truth is 100 Hz; the shared fr1/desk subset's per-frame
#: file is ~10 Hz: 0.25 s is 2.5 of its steps; a 3.7 s dropout made up poses 0.33 m / 57 deg off, NEES 29,933)
MAX_GAP_S = 0.25


class GroundTruthPoses:
    """Ground-truth poses of a bag's frames: ``at(frames, stamps_ns)`` gives a Trajectory (stamps in seconds);
    ``oriented``: whether orientations are known (a TUM file) or only positions (a CSV)."""

    def __init__(self, path: str | Path, n_frames: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GroundTruthError(f"ground-truth poses {self.path} do not exist")
        self.oriented = self.path.suffix.lower() != ".csv"
        self._traj = read_trajectory(self.path) if self.oriented else None
        self._xyz = None if self.oriented else _positions_csv(self.path, n_frames)

    def at(self, frames: list[int], stamps_ns: list[int]) -> Trajectory:
        """The poses of these bag frames (indices) at their stamps (ns).

        Raises:
            TrajectoryError: stamps outside a TUM file's time or in a gap of it wider than :data:`MAX_GAP_S`.
        """
        t = np.asarray(stamps_ns, np.float64) / 1e9
        if self._traj is not None:
            return self._traj.at(t, max_gap_s=MAX_GAP_S)
        xyz = np.zeros((0, 3)) if self._xyz is None else self._xyz
        return Trajectory(t, xyz[frames], np.tile([0.0, 0.0, 0.0, 1.0], (len(frames), 1)))

    def matrices(self, frames: list[int], stamps_ns: list[int]) -> np.ndarray:
        """(N, 4, 4) world-from-camera poses of these frames, in any order (repeats allowed)."""
        order = sorted(set(zip(stamps_ns, frames)))
        at = self.at([f for _, f in order], [s for s, _ in order]).matrices()
        where = {sf: k for k, sf in enumerate(order)}
        return np.stack([at[where[(s, f)]] for s, f in zip(stamps_ns, frames)]) if frames else np.zeros((0, 4, 4))


def loop_positives(gt: GroundTruthPoses, stamps_ns: list[int], radius: float, min_gap_s: float) -> SequenceGT:
    """Loop ground truth from poses: frame j < i is a positive of frame i when their camera centres are within
    ``radius`` metres and their stamps at least ``min_gap_s`` apart (``pnv eval --gt-poses`` without ``--gt``).

    Raises:
        GroundTruthError: no frame has a positive; TrajectoryError: stamps outside a TUM file's time.
    """
    frames = list(range(len(stamps_ns)))
    xyz = gt.matrices(frames, list(stamps_ns))[:, :3, 3]
    st = np.asarray(stamps_ns, np.float64) / 1e9
    out = []
    for i in frames:
        d = np.linalg.norm(xyz[:i] - xyz[i], axis=1)
        out.append(set(np.flatnonzero((d <= radius) & (st[i] - st[:i] >= min_gap_s)).tolist()))
    if not any(out):
        raise GroundTruthError(
            f"ground-truth poses {gt.path}: no frame comes within {radius:g} m of a frame {min_gap_s:g} s older "
            f"(a larger --gt-radius?)"
        )
    return SequenceGT(out)


def _positions_csv(path: Path, n_frames: int) -> np.ndarray:
    """(n_frames, 3) positions of a ``name,x,y[,z]`` CSV, one row per frame in bag order."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        xyz = np.array([[float(r["x"]), float(r["y"]), float(r.get("z") or 0.0)] for r in rows])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise GroundTruthError(
            f"ground-truth poses {path}: need columns name,x,y[,z] ({type(e).__name__}: {e})"
        ) from None
    if len(xyz) != n_frames:
        raise GroundTruthError(f"ground-truth poses {path} have {len(xyz)} rows but the bag has {n_frames} frames")
    if not np.isfinite(xyz).all():
        raise GroundTruthError(f"ground-truth poses {path}: a position is not finite")
    return xyz


def nearest_odometry(odom: list[tuple[int, np.ndarray, np.ndarray]], stamps_ns: list[int]) -> list[int | None]:
    """For each stamp, the index into ``odom`` (``BagReader.odometry_poses``) nearest within ``ODOM_TOLERANCE_NS``,
    or None."""
    if not odom:
        return [None] * len(stamps_ns)
    ostamps = np.array([s for s, _, _ in odom], np.int64)
    out: list[int | None] = []
    for s in stamps_ns:
        j = int(np.argmin(np.abs(ostamps - s)))
        out.append(j if abs(int(ostamps[j]) - s) <= ODOM_TOLERANCE_NS else None)
    return out


def keyframe_odometry(bag: Path, result: ReplayResult, topic: str | None = None) -> list[np.ndarray | None]:
    """Each keyframe record's odometry pose (4, 4; the bag's odometry nearest its stamp within
    ``ODOM_TOLERANCE_NS``, taken as the camera optical frame's pose: TUM bags' odometry is the camera's own, as
    ``pose_graph_node``'s default ``camera_extrinsic``), or None."""
    with BagReader(bag, topic) as r:
        odom = r.odometry_poses()
    idx = nearest_odometry(odom, [x.stamp_ns for x in result.records])
    out: list[np.ndarray | None] = []
    for j in idx:
        if j is None:
            out.append(None)
            continue
        out.append(Trajectory(np.zeros(1), odom[j][1][None], odom[j][2][None]).matrices()[0])
    return out


def optimize_in_process(
    bag: Path,
    result: ReplayResult,
    threshold: float,
    topic: str | None = None,
    settings: PoseGraphSettings | None = None,
    inject_loops: dict[int, list[Loop]] | None = None,
) -> PoseGraphOutput:
    """An in-process replay's keyframes and accepted loops through :class:`pnv_ros.pose_graph.PoseGraph` (the
    settings ``pose_graph_node`` has by default unless given), as the node's would be: keyframes in their order
    at their odometry pose (:func:`keyframe_odometry`; one without odometry is left out, with its loops), each
    keyframe's accepted loop (``score >= threshold``, a relative pose that is not NONE) right after it.
    ``inject_loops``: {keyframe number: loops (graph keys = keyframe numbers)} added right after that keyframe, as
    :func:`~pnv_ros.eval.replay.replay_through_node`'s (a test's wrong loop); not counted in the output's loops.

    Raises:
        ConfigError: a loop pose whose covariance is not symmetric positive definite (the detector never makes one).
    """
    graph = PoseGraph(settings or PoseGraphSettings())
    kf_of = {x.frame: k for k, x in enumerate(result.records)}  # a fresh detector numbers keyframes 0, 1, ...
    loops: list[tuple[int, int]] = []
    for k, (x, pose) in enumerate(zip(result.records, keyframe_odometry(bag, result, topic))):
        if pose is None:
            continue
        graph.add_keyframe(k, x.stamp_ns, pose)
        for loop in (inject_loops or {}).get(k, []):
            graph.add_loop(loop.query_id, loop.match_id, loop)
        rp, m = x.relative_pose, kf_of.get(x.match_frame)
        if x.match_frame < 0 or x.score < threshold or rp is None or rp.type == PoseType.NONE or m is None:
            continue
        if m not in graph:  # its match had no odometry
            continue
        graph.add_loop(k, m, rp)
        loops.append((x.frame, x.match_frame))
    traj = None
    if len(graph):
        traj = Trajectory.from_matrices(graph.stamps / 1e9, graph.optimized_poses())
    return PoseGraphOutput(traj, loops, len(graph), "in-process PoseGraph", ACCEPTED_LOOPS_RULE)


def trajectory_metrics(
    bag: Path,
    result: ReplayResult,
    gt_poses: str | Path,
    threshold: float,
    topic: str | None = None,
    optimized: Trajectory | None = None,
    plot: Path | None = None,
    pose_graph: PoseGraphOutput | None = None,
) -> dict[str, Any]:
    """``{"trajectory": ..., "loop_transforms": ...}`` of a replay (the module doc says what each holds).

    optimized: the pose graph's keyframe poses (stamps in seconds, those of keyframes), or None.
    pose_graph: the graph's answer (its trajectory is ``optimized`` when that is None); described in
        ``trajectory.pose_graph`` (source, keyframes, loops given, which loops).
    plot: a PNG path for :func:`top_view` (drawn when there is odometry at 3 keyframes or more).

    Raises:
        GroundTruthError, TumError, TrajectoryError: ground-truth poses that cannot be read or do not cover the
            keyframes.
    """
    gt = GroundTruthPoses(gt_poses, result.n_frames)
    recs = result.records
    if optimized is None and pose_graph is not None:
        optimized = pose_graph.trajectory
    with BagReader(bag, topic) as r:
        odom = r.odometry_poses()
    idx = nearest_odometry(odom, [x.stamp_ns for x in recs])
    with_odom = [(x, j) for x, j in zip(recs, idx) if j is not None]
    traj: dict[str, Any] = {
        "keyframes": len(recs),
        "keyframes_with_odometry": len(with_odom),
        "alignment": "SE(3) Umeyama of the estimate onto the ground truth, no scale (evo APE, translation part)",
        "ate_rmse_m_odometry": None,
        "rpe_odometry": None,
        "ate_rmse_m_optimized": None,
        "rpe_optimized": None,
        "rpe_delta_m": RPE_DELTA_M,
        "ground_truth": str(gt_poses),
    }
    if pose_graph is not None:
        traj["pose_graph"] = {
            "source": pose_graph.source,
            "keyframes": pose_graph.keyframes,
            "loops": len(pose_graph.loops),
            "loops_rule": pose_graph.loops_rule,
        }
    truth = est = None
    if len(with_odom) >= 3:
        truth = gt.at([x.frame for x, _ in with_odom], [x.stamp_ns for x, _ in with_odom])
        est = Trajectory(
            truth.stamps, np.array([odom[j][1] for _, j in with_odom]), np.array([odom[j][2] for _, j in with_odom])
        )
        traj["ate_rmse_m_odometry"] = ate_rmse(truth, est)
        traj["rpe_odometry"] = rpe(truth, est) if gt.oriented else None
        if plot is not None:
            loops = [(x.frame, x.match_frame) for x in recs if x.match_frame >= 0 and x.score >= threshold]
            top_view(plot, truth, est, optimized, loops, {x.frame: x.stamp_ns for x in recs}, result.stamps_ns)
    if optimized is not None and len(optimized) >= 3:
        kf_ns = np.array([x.stamp_ns for x in recs], np.int64)  # seconds as float64 lose ~100 ns: the nearest
        near = [int(np.argmin(np.abs(kf_ns - t * 1e9))) for t in optimized.stamps]
        truth = gt.at([recs[k].frame for k in near], [int(kf_ns[k]) for k in near])
        traj["ate_rmse_m_optimized"] = ate_rmse(truth, optimized)
        traj["rpe_optimized"] = rpe(truth, optimized) if gt.oriented else None
    return {"trajectory": traj, "loop_transforms": _loop_transforms(result, gt, threshold)}


def _loop_transforms(result: ReplayResult, gt: GroundTruthPoses, threshold: float) -> dict[str, Any]:
    """Errors of the accepted loops' METRIC poses (score >= threshold) against the ground truth."""
    accepted = [x for x in result.records if x.match_frame >= 0 and x.score >= threshold]
    types: dict[str, int] = {t.name: 0 for t in PoseType}
    for x in accepted:
        types[x.relative_pose.type.name if x.relative_pose is not None else PoseType.NONE.name] += 1
    metric = [x for x in accepted if x.relative_pose is not None and x.relative_pose.type == PoseType.METRIC]
    errors = []
    if gt.oriented and metric:
        stamps = result.stamps_ns
        q = gt.matrices([x.frame for x in metric], [x.stamp_ns for x in metric])
        m = gt.matrices([x.match_frame for x in metric], [stamps[x.match_frame] for x in metric])
        errors = [loop_transform_error(x.relative_pose, a, b) for x, a, b in zip(metric, q, m) if x.relative_pose]
    out: dict[str, Any] = dict(loop_transform_summary(errors))
    out["pose_types"] = types
    if not gt.oriented:
        out["note"] = "the ground truth has no orientations (a positions CSV): no loop pose is scored"
    return out


def _aligned(truth: Trajectory, est: Trajectory) -> np.ndarray:
    """(N, 3) positions of ``est`` after the SE(3) alignment onto ``truth`` (the ATE's)."""
    from pnv_ros.trajectory import to_evo

    e = to_evo(est)
    e.align(to_evo(truth), correct_scale=False)
    return np.asarray(e.positions_xyz)


def top_view(
    path: Path,
    truth: Trajectory,
    odometry: Trajectory,
    optimized: Trajectory | None,
    loops: list[tuple[int, int]],
    kf_stamps: dict[int, int],
    frame_stamps: list[int],
) -> None:
    """A top view (world x-y) of the ground truth, the odometry and the optimised trajectory (each aligned onto the
    ground truth as the ATE aligns it) at the keyframes, with the accepted loops drawn between the ground-truth
    positions of their two frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    where = {round(t * 1e6): p for t, p in zip(truth.stamps, truth.positions)}  # microseconds: float-safe keys
    for q, m in loops:
        a = where.get(round(kf_stamps.get(q, -1) / 1e3))
        b = where.get(round(frame_stamps[m] / 1e3)) if m < len(frame_stamps) else None
        if a is not None and b is not None:
            ax.plot([a[0], b[0]], [a[1], b[1]], "-", color="tab:orange", lw=0.8, alpha=0.7)
    ax.plot(truth.positions[:, 0], truth.positions[:, 1], "k-", lw=1.5, label="ground truth")
    o = _aligned(truth, odometry)
    ax.plot(o[:, 0], o[:, 1], "-", color="tab:red", lw=1, label="odometry (aligned)")
    if optimized is not None and len(optimized) >= 3:
        t = truth.at(optimized.stamps) if len(optimized) != len(truth) else truth
        p = _aligned(t, optimized)
        ax.plot(p[:, 0], p[:, 1], "-", color="tab:blue", lw=1, label="optimised (aligned)")
    ax.plot([], [], "-", color="tab:orange", lw=0.8, label=f"accepted loops ({len(loops)})")
    ax.set(xlabel="x (m)", ylabel="y (m)", title="top view at the keyframes")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
