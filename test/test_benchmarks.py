"""The GPU check script runs end to end (on the CPU here: no GPU in CI), so it
works the first time a device is lent to measure it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_cpu(random_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks/gpu_check.py"),
        "--device",
        "cpu",
        "--checkpoint",
        str(random_ckpt),
        "--seconds",
        "0.1",
        "--batches",
        "1",
        "--dtypes",
        "float32",
        "--out",
        str(out),
    ]
    # float32 only: bfloat16 autocast on a CPU without native bfloat16 (the AVX2-only AMD EPYC CI machines) takes
    # minutes per VGG-16 pass; the GPU run measures both
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    keys = {f"{p}/batch1/float32" for p in ("speed", "performance")}
    assert set(report["extract"]) == keys
    assert all(v > 0 for v in report["extract"].values())
    assert report["max_abs_diff_vs_cpu"] == 0.0  # the same device: the same descriptors
    assert set(report["rerank_ms_per_query_top100"]) == {"speed", "performance"}
    assert all(v > 0 for v in report["rerank_ms_per_query_top100"].values())
    assert "re-rank top-100 speed (rapid)" in r.stdout


def test_loop_poses_benchmark_on_the_shipped_pairs(tmp_path: Path) -> None:
    """benchmarks/loop_poses.py end to end on data/tum_fr1_desk_pairs (the full fr1/desk set is not in a clone):
    every revisit METRIC with depth and close to ground truth, no control posed, strict JSON."""
    md, js = tmp_path / "poses.md", tmp_path / "poses.json"
    cmd = [sys.executable, str(REPO / "benchmarks/loop_poses.py"), "--data", str(REPO / "data/tum_fr1_desk_pairs")]
    r = subprocess.run([*cmd, "--no-model", "--md", str(md), "--json", str(js)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    text = js.read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = {s["method"]: s for s in json.loads(text)["summaries"]}
    metric = rec["revisit: local, depth"]
    assert metric["pairs"] >= 5 and metric["METRIC"] == metric["pairs"] and metric["none"] == 0
    assert metric["trans_cm"][0] < 5.0 and metric["rot_deg"][0] < 2.0
    assert 1.0 < metric["nees6"] < 20.0
    for name in ("control: local, depth", "control: local, no depth"):
        assert rec[name]["pairs"] >= 2 and rec[name]["none"] == rec[name]["pairs"]
    assert "revisit: local, depth" in md.read_text()
