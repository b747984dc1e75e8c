"""pnv eval on a real bag: in-process and through a live node give the same loops."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RTAB, rtab_frame

from pnv_ros.bags import make_bag
from pnv_ros.eval.metrics import Decision, pr_curve, precision_recall

PNV = str(Path(sys.executable).parent / "pnv")
FRAMES = list(range(1, 13)) + list(range(41, 53))  # first lap start, then its revisit


def test_metrics_small() -> None:
    ds = [Decision(0, -1, 0.0, False, False), Decision(1, 0, 0.5, True, True), Decision(2, 0, 0.3, False, True),
          Decision(3, 1, 0.2, True, True)]  # fmt: skip
    at = precision_recall(ds, 0.25)
    assert (at["precision"], at["recall"]) == (0.5, 1 / 3)
    c = pr_curve(ds)
    assert c["precision"] == [1.0, 0.5, 2 / 3] and c["recall_at_100_precision"] == pytest.approx(1 / 3)
    assert c["average_precision"] == pytest.approx(1 / 3 + 2 / 3 * 1 / 3)


@pytest.fixture(scope="module")
def short_bag(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("seq")
    imgs = d / "imgs"
    imgs.mkdir()
    for k, f in enumerate(FRAMES):
        (imgs / f"{k}.jpg").symlink_to(rtab_frame(f))
    bag = d / "short.bag"
    make_bag(imgs, bag, rate=1.0)
    g = np.load(RTAB.parent / "gt_matrix.npy")
    idx = np.array(FRAMES) - 1
    gt = d / "gt.npy"
    np.save(gt, g[np.ix_(idx, idx)])
    return bag, gt


@pytest.mark.slow
def test_eval_in_process_and_node_agree(short_bag: tuple[Path, Path], tmp_path: Path) -> None:
    bag, gt = short_bag
    runs = {}
    for mode in ("in-process", "node"):
        out = tmp_path / mode
        args = [PNV, "eval", str(bag), "--gt", str(gt), "--out", str(out), "-q", "--exclude-recent", "5"]
        r = subprocess.run(args + (["--node"] if mode == "node" else []), capture_output=True, text=True,
                           timeout=900, env=os.environ.copy())  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        for f in ("metrics.json", "loop_closures.csv", "pr_curve.png", "latency.png", "report.md"):
            assert (out / f).is_file(), f
        with open(out / "loop_closures.csv") as f:
            runs[mode] = [(int(r["frame"]), int(r["match_frame"]), float(r["score"])) for r in csv.DictReader(f)]
        m = json.loads((out / "metrics.json").read_text())
        assert m["mode"] == mode and m["keyframes"] == len(FRAMES)
        assert m["at_threshold"]["precision"] >= 0.9 and m["at_threshold"]["recall"] >= 0.5
    ids = {mode: json.loads((tmp_path / mode / "metrics.json").read_text())["model"] for mode in runs}
    assert ids["in-process"] == ids["node"] and ":512:" in ids["node"]
    a, b = runs["in-process"], runs["node"]
    assert [(f, m) for f, m, _ in a] == [(f, m) for f, m, _ in b]
    np.testing.assert_allclose([s for *_, s in a], [s for *_, s in b], atol=1e-5)
    assert not list(tmp_path.glob(".*")), "no partial run folder may be left"


def test_eval_bad_inputs(short_bag: tuple[Path, Path], tmp_path: Path) -> None:
    bag, gt = short_bag
    full_gt = str(RTAB.parent / "gt_matrix.npy")
    r = subprocess.run([PNV, "eval", str(bag), "--gt", full_gt, "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and "(84, 84) matrix but the sequence has 24 frames" in r.stderr
    r = subprocess.run([PNV, "eval", str(bag), "--gt", str(gt), "--topic", "/nope", "--out", str(tmp_path / "y")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and "its topics: /camera/image" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_eval_node_on_a_compressed_bag_with_odometry(tmp_path: Path) -> None:
    """--node subscribes to what the bag holds: image/compressed and its odometry topic (remapped)."""
    frames = [1, 2, 3, 41, 42, 43]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k, f in enumerate(frames):
        (imgs / f"{k}.jpg").symlink_to(rtab_frame(f))
    poses = tmp_path / "poses.csv"
    poses.write_text("name,x,y\n" + "".join(f"{k},{float(k % 3)},{float(k // 3)}\n" for k in range(len(frames))))
    bag = tmp_path / "c.bag"
    make_bag(imgs, bag, rate=1.0, compressed=True, poses=poses, topic="/cam/image/compressed", odom_topic="/robot/odom")
    g = np.load(RTAB.parent / "gt_matrix.npy")
    np.save(tmp_path / "gt.npy", g[np.ix_(np.array(frames) - 1, np.array(frames) - 1)])
    out = tmp_path / "run"
    args = [PNV, "eval", str(bag), "--gt", str(tmp_path / "gt.npy"), "--out", str(out), "-q", "--node",
            "--exclude-recent", "1", "--exclude-recent-keyframes", "1"]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "node" and m["keyframes"] == len(frames), m["keyframes"]  # 1 m apart: each a keyframe
    with open(out / "loop_closures.csv") as f:
        rows = {int(r["frame"]): int(r["match_frame"]) for r in csv.DictReader(f)}
    assert all(g[frames[q] - 1, frames[rows[q]] - 1] for q in (3, 4, 5)), rows  # 41-43 revisit frames 1-3
