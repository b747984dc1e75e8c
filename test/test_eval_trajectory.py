"""``pnv eval --gt-poses`` closes the loop in a pose graph, in process (:class:`pnv_ros.pose_graph.PoseGraph`) and
through the live nodes (``loop_closure_node`` and ``pose_graph_node``, real processes), on TUM fr1/desk's 16 real
RGB-D frames (data/tum_fr1_desk_pairs) with the seeded drift model's odometry: both optimise the same accepted
loops to the same trajectory, better than the odometry; one wrong loop published into the live graph barely moves
it (issue 29's "Done when")."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_tum import PAIRS, tum_copy

from pnv_ros.config import DetectorParams
from pnv_ros.geometry import PoseType
from pnv_ros.tum import read_trajectory

PNV = str(Path(sys.executable).parent / "pnv")
GT = PAIRS / "groundtruth_at_rgb.txt"
#: every frame a keyframe (16), revisits of frames at least 5 s older: 3 accepted loops at min_score 0.12
EVERY = ["--min-travel-m", "0", "--exclude-recent-s", "5", "--exclude-recent-keyframes", "0"]
LOOP_GT = ["--gt-radius", "0.5", "--gt-min-gap", "8"]


def pnv(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PNV, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


@pytest.fixture(scope="session")
def drifted_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 16 frames with colour, depth, camera_info and odometry drifted by the seeded model (seed 1)."""
    d = tmp_path_factory.mktemp("tum_graph")
    tum = tum_copy(d / "fr1_desk")
    bag = d / "fr1.bag"
    r = pnv(
        "bag",
        "make",
        str(tum),
        "--tum",
        "--camera",
        str(PAIRS / "camera.yaml"),
        "--poses",
        str(GT),
        "--drift",
        "seed=1",
        "--out",
        str(bag),
    )
    assert r.returncode == 0, r.stderr
    return bag


def _run(bag: Path, out: Path, *extra: str) -> tuple[dict, list[dict[str, str]], str]:
    r = pnv("eval", str(bag), *LOOP_GT, "--gt-poses", str(GT), "--out", str(out), "-q", *EVERY, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "loop_closures.csv") as f:
        rows = list(csv.DictReader(f))
    return json.loads((out / "metrics.json").read_text()), rows, r.stdout


@pytest.fixture(scope="session")
def runs(drifted_bag: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, list, str, Path]]:
    """``pnv eval --gt-poses`` in process and with ``--node`` (metrics, loop_closures.csv rows, stdout, folder)."""
    out = {}
    for mode, extra in (("in-process", []), ("node", ["--node"])):
        folder = tmp_path_factory.mktemp("graph_runs") / mode
        out[mode] = (*_run(drifted_bag, folder, *extra), folder)
    return out


@pytest.mark.slow
def test_in_process_and_node_pose_graphs_agree_and_beat_odometry(runs) -> None:
    accepted = {}
    optimised = {}
    for mode, (m, rows, stdout, folder) in runs.items():
        tr = m["trajectory"]
        assert m["mode"] == mode and tr["keyframes_with_odometry"] == 16
        graph = tr["pose_graph"]
        assert graph["source"] == ("pose_graph_node" if mode == "node" else "in-process PoseGraph")
        assert graph["keyframes"] == 16 and "score >= min_score" in graph["loops_rule"]
        accepted[mode] = [(int(r["frame"]), int(r["match_frame"])) for r in rows if r["accepted"] == "1"]
        assert graph["loops"] == len(accepted[mode]) >= 2  # every accepted loop has a METRIC pose here (depth)
        assert m["loop_transforms"]["pose_types"]["METRIC"] == graph["loops"]
        ate_o, ate = tr["ate_rmse_m_odometry"], tr["ate_rmse_m_optimized"]
        assert ate_o > 0.05 and ate < 0.6 * ate_o, (mode, ate_o, ate)
        assert tr["rpe_optimized"]["rotation_rmse_deg"] < tr["rpe_odometry"]["rotation_rmse_deg"]
        optimised[mode] = ate
        report = (folder / "report.md").read_text()
        assert (
            "## Trajectory" in report
            and "| ATE RMSE, optimised by " in report
            and "| RPE over 1 m, optimised" in report
        )
        assert (folder / "trajectory.png").stat().st_size > 10_000
        assert f"optimised {ate:.3f} m ({graph['loops']} loops in the pose graph)" in stdout
    assert accepted["in-process"] == accepted["node"]  # the same loops
    # the same graph: the node's adds each loop when the relay delivers it (maybe after the next keyframe), in
    # process right after its keyframe; iSAM2 converges to the same optimum (measured: equal to 1e-9 m)
    assert optimised["node"] == pytest.approx(optimised["in-process"], abs=1e-3)


def _wrong_loop(query: int, match: int):
    """A LoopClosure claiming keyframe ``match``'s camera is where keyframe ``query``'s is (identity, 1 cm and
    0.6 deg sigmas: as confident as the real loops here)."""
    from pnv_ros.msg import LoopClosure

    msg = LoopClosure(query_id=query, match_id=match, score=0.9)
    rp = msg.relative_pose
    rp.type = int(PoseType.METRIC)
    rp.rotation.w = 1.0
    rp.covariance = np.diag([0.01**2] * 3 + [0.01**2] * 3).ravel().tolist()
    return msg


def _graph_ate(bag: Path, res, truth, settings=None, wrong=None, wrong_after: int = -1) -> float:
    """ATE of the in-process graph (:func:`optimize_in_process`, ``settings``, None: the defaults) over a replay's
    keyframes and accepted loops, with ``wrong`` (a :class:`Loop`) added after keyframe ``wrong_after``."""
    from pnv_ros.eval.trajectory_eval import optimize_in_process
    from pnv_ros.trajectory import ate_rmse

    inject = {wrong_after: [wrong]} if wrong is not None else None
    out = optimize_in_process(bag, res, DetectorParams().min_score, settings=settings, inject_loops=inject)
    return ate_rmse(truth, out.trajectory)


@pytest.mark.slow
def test_node_pose_graph_shrugs_off_a_wrong_loop(drifted_bag: Path, runs) -> None:
    """One wrong loop published into the live graph (a test's LoopClosure, relayed with the node's) changes the
    optimised ATE by less than 10 %: keyframe 15 claims the keyframe farthest from it (0.96 m) is where it is,
    as confident as the real loops. The hard case, a wrong loop before any true one (keyframe 8 and the farthest,
    1.56 m), in :class:`PoseGraph` over the same replay (the node's graph is the same: test above): with the
    default settings it is removed (``max_loop_error``) and the ATE is that without it; under the Cauchy kernel
    alone it kept a pull of 12 % (measured 26.4 -> 23.2 mm); with neither it bends the map (414 mm)."""
    from pnv_ros.eval.replay import replay_through_node
    from pnv_ros.eval.trajectory_eval import trajectory_metrics
    from pnv_ros.model.registry import resolve_checkpoint
    from pnv_ros.pose_graph import Loop, PoseGraphSettings

    clean = runs["node"][0]["trajectory"]["ate_rmse_m_optimized"]
    gt = read_trajectory(GT)
    far = int(np.argmax(np.linalg.norm(gt.positions[:15] - gt.positions[15], axis=1)))
    assert np.linalg.norm(gt.positions[far] - gt.positions[15]) > 0.5  # wrong by more than half a metre
    params = DetectorParams().replace(min_travel_m=0.0, exclude_recent_s=5.0, exclude_recent_keyframes=0)
    res = replay_through_node(
        drifted_bag,
        "speed",  # pnv eval's default preset
        str(resolve_checkpoint(None)),
        params,
        pose_graph=True,
        inject_loops={16: [_wrong_loop(15, far)]},  # after the 16th image is acknowledged
    )
    assert res.pose_graph is not None and res.pose_graph.injected == 1 and res.pose_graph.keyframes == 16
    tr = trajectory_metrics(drifted_bag, res, GT, params.min_score, pose_graph=res.pose_graph)["trajectory"]
    wrong = tr["ate_rmse_m_optimized"]
    assert abs(wrong - clean) < 0.1 * clean, (clean, wrong)
    assert wrong < 0.6 * tr["ate_rmse_m_odometry"]

    truth = gt.at([x.stamp_ns / 1e9 for x in res.records])
    early = int(np.argmax(np.linalg.norm(truth.positions[:8] - truth.positions[8], axis=1)))
    loop = Loop(8, early, PoseType.METRIC, np.eye(3), np.zeros(3), np.diag([0.01**2] * 6))
    base = _graph_ate(drifted_bag, res, truth)
    assert base == pytest.approx(clean, abs=1e-4)  # the node's graph, rebuilt
    removed = _graph_ate(drifted_bag, res, truth, None, loop, 8)
    bare = _graph_ate(drifted_bag, res, truth, PoseGraphSettings(robust_kernel="none", max_loop_error=0.0), loop, 8)
    assert abs(removed - base) < 0.1 * base, (base, removed, bare)  # the rule, on the hard case
    assert bare > 5 * base
