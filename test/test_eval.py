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
    ds = [
        Decision(0, -1, 0.0, False, False),
        Decision(1, 0, 0.5, True, True),
        Decision(2, 0, 0.3, False, True),
        Decision(3, 1, 0.2, True, True),
    ]
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
        r = subprocess.run(
            args + (["--node"] if mode == "node" else []),
            capture_output=True,
            text=True,
            timeout=900,
            env=os.environ.copy(),
        )
        assert r.returncode == 0, r.stderr[-3000:]
        for f in ("metrics.json", "loop_closures.csv", "pr_curve.png", "latency.png", "report.md"):
            assert (out / f).is_file(), f
        with open(out / "loop_closures.csv") as f:
            runs[mode] = [(int(r["frame"]), int(r["match_frame"]), float(r["score"])) for r in csv.DictReader(f)]
        m = json.loads((out / "metrics.json").read_text(), parse_constant=_not_json)  # strict: no NaN tokens
        assert m["mode"] == mode and m["keyframes"] == len(FRAMES)
        assert m["peak_rss_mb"] is None if mode == "node" else m["peak_rss_mb"] > 0  # not measured: null
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
    r = subprocess.run(
        [PNV, "eval", str(bag), "--gt", full_gt, "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert r.returncode == 1 and "(84, 84) matrix but the sequence has 24 frames" in r.stderr
    r = subprocess.run(
        [PNV, "eval", str(bag), "--gt", str(gt), "--topic", "/nope", "--out", str(tmp_path / "y")],
        capture_output=True,
        text=True,
    )
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
    args = [
        PNV,
        "eval",
        str(bag),
        "--gt",
        str(tmp_path / "gt.npy"),
        "--out",
        str(out),
        "-q",
        "--node",
        "--exclude-recent",
        "1",
        "--exclude-recent-keyframes",
        "1",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "node" and m["keyframes"] == len(frames), m["keyframes"]  # 1 m apart: each a keyframe
    with open(out / "loop_closures.csv") as f:
        rows = {int(r["frame"]): int(r["match_frame"]) for r in csv.DictReader(f)}
    assert all(g[frames[q] - 1, frames[rows[q]] - 1] for q in (3, 4, 5)), rows  # 41-43 revisit frames 1-3


def _bag_with_bad_frames(path: Path, frames: list, topic: str = "/cam/image/compressed") -> None:
    """A compressed-image bag at 1 Hz; an int is that RTAB-Map frame, b"..." a CompressedImage with these
    bytes, and ("cdr", b"...") raw bytes that are no CDR message at all."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from pnv_ros.bags import T0_NS, _typestore

    ts = _typestore()
    T = ts.types  # noqa: N806
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection(topic, "sensor_msgs/msg/CompressedImage", typestore=ts)
        for k, f in enumerate(frames):
            t = T0_NS + k * 10**9
            if isinstance(f, tuple):
                w.write(conn, t, f[1])
                continue
            data = rtab_frame(f).read_bytes() if isinstance(f, int) else f
            header = T["std_msgs/msg/Header"](
                stamp=T["builtin_interfaces/msg/Time"](sec=t // 10**9, nanosec=0), frame_id="cam"
            )
            msg = T["sensor_msgs/msg/CompressedImage"](header=header, format="jpeg", data=np.frombuffer(data, np.uint8))
            w.write(conn, t, ts.serialize_cdr(msg, "sensor_msgs/msg/CompressedImage"))


BAD = [1, 2, b"not a jpeg at all!!", ("cdr", b"\x00\x01\x02"), 41]  # 19 garbage bytes; then CDR garbage
BAD_GT = [1, 2, 0, 0, 41]  # RTAB-Map frame per bag frame (0: none)


def _bad_gt(path: Path) -> Path:
    g = np.load(RTAB.parent / "gt_matrix.npy")
    m = np.zeros((len(BAD_GT), len(BAD_GT)), np.uint8)
    for i, a in enumerate(BAD_GT):
        for j, b in enumerate(BAD_GT):
            m[i, j] = bool(a and b and g[a - 1, b - 1])
    np.save(path, m)
    return path


def test_bad_frames_do_not_end_the_iteration(tmp_path: Path) -> None:
    from pnv_ros.bags import T0_NS, BagReader

    _bag_with_bad_frames(tmp_path / "b", BAD)
    with BagReader(tmp_path / "b") as r:
        fr = list(r.frames())
    assert [f.index for f in fr] == [0, 1, 2, 3, 4] and [f.rgb is None for f in fr] == [False, False, True, True, False]
    assert fr[2].error.startswith("compressed image (jpeg, 19 bytes)") and "decode" in fr[2].error  # decode_image's
    assert fr[2].stamp_ns == T0_NS + 2 * 10**9
    assert "cannot be deserialised" in fr[3].error and fr[3].stamp_ns == T0_NS + 3 * 10**9  # the bag time
    assert fr[4].rgb.shape == (384, 512, 3)


def _check_bad_run(out: Path) -> None:
    from pnv_ros.bags import T0_NS

    m = json.loads((out / "metrics.json").read_text())
    sk = m["skipped_frames"]
    assert sk["count"] == 2 and [f["frame"] for f in sk["frames"]] == [2, 3]
    assert sk["frames"][0]["stamp_ns"] == T0_NS + 2 * 10**9
    assert sk["frames"][0]["reason"].startswith("compressed image (jpeg, 19 bytes)")
    assert "cannot be deserialised" in sk["frames"][1]["reason"]
    assert m["frames"] == 5 and m["keyframes"] == 3
    with open(out / "loop_closures.csv") as f:
        rows = {int(r["frame"]): int(r["match_frame"]) for r in csv.DictReader(f)}
    assert set(rows) == {0, 1, 4} and rows[4] in (0, 1)  # frame 41 revisits 1 and 2: indices stay the bag's
    assert m["at_threshold"]["positives"] == 1 and m["at_threshold"]["true_positives"] == 1
    report = (out / "report.md").read_text()
    assert "## Skipped frames (2)" in report and "| 2 | " in report and "19 bytes" in report


def test_eval_skips_bad_frames_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A frame that cannot be decoded is skipped, counted and named, as the node does (issue #15, kind 3)."""
    from pnv_ros.cli import main

    bag, out = tmp_path / "bad", tmp_path / "run"
    _bag_with_bad_frames(bag, BAD)
    args = [
        "eval",
        str(bag),
        "--gt",
        str(_bad_gt(tmp_path / "gt.npy")),
        "--out",
        str(out),
        "-q",
        "--exclude-recent",
        "1",
        "--exclude-recent-keyframes",
        "1",
        "--min-visual-change",
        "0",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert "2 frame(s) skipped" in capsys.readouterr().out
    _check_bad_run(out)


@pytest.mark.slow
def test_eval_node_skips_bad_frames(tmp_path: Path) -> None:
    """--node: the node acknowledges the bad jpeg as "error"; the CDR garbage is not sent (nothing could take it)."""
    bag, out = tmp_path / "bad", tmp_path / "run"
    _bag_with_bad_frames(bag, BAD)
    args = [
        PNV,
        "eval",
        str(bag),
        "--gt",
        str(_bad_gt(tmp_path / "gt.npy")),
        "--out",
        str(out),
        "-q",
        "--node",
        "--exclude-recent",
        "1",
        "--exclude-recent-keyframes",
        "1",
        "--min-visual-change",
        "0",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 frame(s) skipped" in r.stdout
    _check_bad_run(out)


def _not_json(token: str) -> None:
    raise AssertionError(f"metrics.json holds {token}, which is not JSON (RFC 8259)")
