"""The backend on real loops, in process: fr1/desk's frames as keyframes, odometry = ground truth with a seeded
drift, METRIC loops from estimate_loop_pose on the revisit pairs of benchmarks/loop_poses.py (the loops the
detector would find when it finds them all), one wrong loop; position ATE (evo) before and after.

    .venv/bin/python benchmarks/pose_graph_fr1_desk.py --data ../shared/data/tum_rgbd_fr1_desk

Not the issue's acceptance run (that goes through the live nodes, ``pnv eval --node``): a check of the graph and
its settings on the real loop poses and covariances.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_poses import build_pairs, load_local, load_set, without_depth  # noqa: E402

from pnv_ros.geometry import PoseType, rotation_exp  # noqa: E402
from pnv_ros.loop_pose import estimate_loop_pose  # noqa: E402
from pnv_ros.pose_graph import PoseGraph, PoseGraphSettings  # noqa: E402
from pnv_ros.trajectory import Trajectory, ate_rmse  # noqa: E402


def drifted(gt: list[np.ndarray], yaw_per_m: float, scale: float, seed: int) -> list[np.ndarray]:
    """Odometry: each true step's translation scaled by ``scale``, its rotation turned about the camera's y axis
    (down: a yaw for an upright camera) by ``yaw_per_m`` rad per metre moved, plus noise (1 mm, 1 mrad)."""
    rng = np.random.default_rng(seed)
    out = [gt[0].copy()]
    for a, b in zip(gt, gt[1:]):
        step = np.linalg.inv(a) @ b
        d = float(np.linalg.norm(step[:3, 3]))
        s = np.eye(4)
        s[:3, :3] = rotation_exp(rng.normal(0, 0.001, 3) + [0.0, yaw_per_m * d, 0.0]) @ step[:3, :3]
        s[:3, 3] = scale * step[:3, 3] + rng.normal(0, 0.001, 3)
        out.append(out[-1] @ s)
    return out


def ate(gt: list[np.ndarray], est: np.ndarray) -> float:
    """Position ATE RMSE (m) after SE(3) alignment: :func:`pnv_ros.trajectory.ate_rmse` (evo's APE)."""
    stamps = np.arange(len(gt), dtype=float)
    return ate_rmse(Trajectory.from_matrices(stamps, np.array(gt)), Trajectory.from_matrices(stamps, np.array(est)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--yaw-per-m", type=float, default=0.15, help="odometry yaw bias, rad per metre")
    ap.add_argument("--scale", type=float, default=1.05, help="odometry scale error")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-depth", action="store_true", help="monocular loops (the features without depth)")
    args = ap.parse_args()
    frames, camera = load_set(args.data)
    gt = [f.pose for f in frames]
    odom = drifted(gt, args.yaw_per_m, args.scale, args.seed)
    revisits, _ = build_pairs(frames)
    need = sorted({i for p in revisits for i in p})
    t = time.perf_counter()
    feats = {i: load_local(frames[i], camera)[0] for i in need}
    if args.no_depth:
        feats = {i: without_depth(f) for i, f in feats.items()}
    poses = {(q, m): estimate_loop_pose(feats[q], feats[m], camera) for q, m in revisits}
    print(f"{len(revisits)} revisits, {len(need)} frames' features, {time.perf_counter() - t:.1f} s")
    metric = {p: v for p, v in poses.items() if v is not None and v.type != PoseType.NONE}
    kinds = [v.type.name for v in metric.values()]
    print({k: kinds.count(k) for k in sorted(set(kinds))})
    by_query = {q: (m, metric[(q, m)]) for q, m in metric}
    wrong_q = sorted(by_query)[len(by_query) // 2]
    before = ate(gt, np.array(odom))
    settings_list = [
        ("default", PoseGraphSettings()),
        ("matched", PoseGraphSettings(translation_per_m=args.scale - 1 + 0.02, rotation_per_m=args.yaw_per_m)),
    ]
    for name, settings in settings_list:
        for wrong in (False, True):
            g = PoseGraph(settings)
            t = time.perf_counter()
            for k, pose in enumerate(odom):
                g.add_keyframe(k, k, pose)
                if k in by_query:
                    g.add_loop(k, by_query[k][0], by_query[k][1])
                if wrong and k == wrong_q:  # the METRIC pose of another pair: a confident, wrong loop
                    far = max(range(k), key=lambda m: np.linalg.norm(gt[m][:3, 3] - gt[k][:3, 3]))
                    g.add_loop(k, far, by_query[k][1])
            el = time.perf_counter() - t
            after = ate(gt, g.optimized_poses())
            errors = g.loop_errors()
            removed = [(lp.query_id, lp.match_id) for lp in g.rejected_loops]
            told = f", removed {removed}" if removed else ""
            print(
                f"{name:8s} wrong={wrong!s:5s} loops {len(g.loops):3d}  ATE odometry {before:.3f} m -> "
                f"optimised {after:.3f} m ({100 * (1 - after / before):.0f} % less), {el:.2f} s, "
                f"loop error median {np.median(errors):.1f}{told}"
            )


if __name__ == "__main__":
    main()
