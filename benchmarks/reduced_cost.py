"""Reduced-cost modes for CPU robots: speed-up and Recall@1 change of each,
measured on real sets (rtabmap loop: db 1-40, queries 41-84; Gardens Point
day vs night where ../shared/data has it), speed preset, default model.

    .venv/bin/python benchmarks/reduced_cost.py --out out/bench/reduced_cost.json

Modes: float32 640x480 (baseline), bfloat16 autocast, 320x240 input, patch
stride 2, and fewer candidates (top 10 instead of all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pnv_ros.config import get_preset
from pnv_ros.eval.ground_truth import GroundTruth, load_ground_truth, recall_at_n
from pnv_ros.extract import FeatureExtractor
from pnv_ros.images import list_images
from pnv_ros.model.checkpoint import load_checkpoint
from pnv_ros.model.registry import resolve_checkpoint
from pnv_ros.retrieval import two_stage

REPO = Path(__file__).resolve().parents[1]


def sets(data: Path):
    """rtabmap (held out from the default model's fitting) and, where the shared
    data is present, Gardens Point day/night (hard GT: same index)."""
    rt = REPO / "data" / "rtabmap_samples_loop84"
    imgs = list_images([rt / "images"])
    yield "rtabmap", imgs[:40], imgs[40:], rt / "gt.csv"
    gp = data / "gardenspoint_walking_subset10"
    if gp.is_dir():
        yield "gardenspoint", list_images([gp / "ref"]), list_images([gp / "query"]), None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    a = ap.parse_args()
    model, info = load_checkpoint(resolve_checkpoint(a.checkpoint))
    base = get_preset("speed")
    modes = {
        "float32 640x480 (baseline)": (base, False, None),
        "bfloat16 autocast": (base, True, None),
        "input 320x240": (
            dataclasses.replace(base, name="speed-320", image_height=240, image_width=320),
            False,
            None,
        ),
        "patch stride 2": (dataclasses.replace(base, name="speed-s2", strides=(2,)), False, None),
        "top 10 candidates": (base, False, 10),
    }
    report = {}
    for name, (preset, bf16, top_n) in modes.items():
        ex = FeatureExtractor(model, info, preset, device="cpu", bf16=bf16)
        row = {}
        t_ex, n_img, t_rr, n_q = 0.0, 0, 0.0, 0
        for set_name, db_imgs, q_imgs, gt_path in sets(Path(a.data)):
            t = time.perf_counter()
            db, q = ex.extract_set(db_imgs), ex.extract_set(q_imgs)
            t_ex += time.perf_counter() - t
            n_img += len(db) + len(q)
            gt = load_ground_truth(gt_path, q.names, db.names) if gt_path else GroundTruth([{i} for i in range(len(q))])
            t = time.perf_counter()
            res = two_stage(db, q, preset, top_n=top_n or len(db))
            t_rr += time.perf_counter() - t
            n_q += len(q)
            row[set_name] = {"global_r1": recall_at_n([r.global_ids for r in res], gt, (1,))[1],
                             "reranked_r1": recall_at_n([r.reranked_ids for r in res], gt, (1,))[1]}  # fmt: skip
        row["s_per_image"] = t_ex / n_img
        row["ms_per_query_rerank"] = 1000 * t_rr / n_q
        report[name] = row
        print(name, json.dumps(row), flush=True)
    b = report["float32 640x480 (baseline)"]
    for name, row in report.items():
        row["extract_speedup"] = b["s_per_image"] / row["s_per_image"]
        row["rerank_speedup"] = b["ms_per_query_rerank"] / row["ms_per_query_rerank"]
        row["delta_r1"] = {s: row[s]["reranked_r1"] - b[s]["reranked_r1"] for s in ("rtabmap", "corridor")}
        print(
            f"{name:28s} extract x{row['extract_speedup']:.2f}, re-rank x{row['rerank_speedup']:.2f}, "
            f"R@1 change rtabmap {row['delta_r1']['rtabmap']:+.3f}, corridor {row['delta_r1']['corridor']:+.3f}"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
