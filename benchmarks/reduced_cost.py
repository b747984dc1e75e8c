"""Reduced-cost modes for CPU robots: speed-up and Recall@1 change of each,
measured on the real sets, speed preset, default model, in one run.

    .venv/bin/python benchmarks/reduced_cost.py --out out/bench/reduced_cost.json

Sets: RTAB-Map loop (db 1-40, queries 41-84; held out from the default
model's fitting), Gardens Point day vs night (shared data, 10 pairs, hard GT
same index; held out), corridor (the default model's fitting set: read its
changes as relative only). Every query re-ranks all of its database (top
N = database size) except in the "top 10" mode.

Modes: the float32 baseline (exact products); oneDNN similarity products
(``exact=False``); the backbone in bfloat16 (``bf16``: pooling and WPCA stay
float32); 320 x 240 input; patch stride 2; top 10 candidates. Modes that do
not change extraction reuse the baseline's features and report extraction
x1.00.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from common import REPO

from pnv_ros.config import Preset, get_preset
from pnv_ros.engines.backends import supported_precisions
from pnv_ros.engines.spec import RuntimeSpec
from pnv_ros.eval.ground_truth import GroundTruth, load_ground_truth, recall_at_n
from pnv_ros.extract import open_extractor
from pnv_ros.images import list_images
from pnv_ros.model.registry import resolve_checkpoint
from pnv_ros.retrieval import two_stage


def sets(data: Path):
    rt = REPO / "data" / "rtabmap_samples_loop84"
    imgs = list_images([rt / "images"])
    yield "rtabmap", imgs[:40], imgs[40:], rt / "gt.csv"
    gp = data / "gardenspoint_walking_subset10"
    if gp.is_dir():
        yield "gardenspoint", list_images([gp / "ref"]), list_images([gp / "query"]), None
    co = REPO / "data" / "corridor_vprbench"
    yield "corridor", list_images([co / "ref"]), list_images([co / "query"]), co / "gt.csv"


@dataclasses.dataclass(frozen=True)
class Mode:
    preset: Preset
    bf16: bool = False
    top_n: int | None = None
    exact: bool = True
    reuse_baseline_features: bool = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--modes", default=None, help="comma-separated substrings of mode names to run (baseline always)")
    a = ap.parse_args()
    checkpoint = resolve_checkpoint(a.checkpoint)
    base = get_preset("speed")
    modes = {
        "float32 640x480 (baseline)": Mode(base),
        "oneDNN products": Mode(base, exact=False, reuse_baseline_features=True),
        "bfloat16 backbone": Mode(base, bf16=True),
        "input 320x240": Mode(dataclasses.replace(base, name="speed-320", image_height=240, image_width=320)),
        "patch stride 2": Mode(dataclasses.replace(base, name="speed-s2", strides=(2,))),
        "top 10 candidates": Mode(base, top_n=10, reuse_baseline_features=True),
    }
    if "bf16" not in supported_precisions("torch", "cpu"):  # refused there: oneDNN's reference path, ~400x slower
        print("bfloat16 backbone: not run (this CPU has no bfloat16 instructions for oneDNN)", flush=True)
        del modes["bfloat16 backbone"]
    if a.modes:
        keep = [m.strip() for m in a.modes.split(",")]
        modes = {k: v for i, (k, v) in enumerate(modes.items()) if i == 0 or any(m in k for m in keep)}
    set_list = list(sets(Path(a.data)))
    baseline_feats: dict[str, tuple] = {}
    report: dict[str, dict] = {}
    for name, mode in modes.items():
        ex = open_extractor(checkpoint, mode.preset, RuntimeSpec(device="cpu", bf16=mode.bf16))
        row: dict = {}
        t_ex, n_img, t_rr, n_q = 0.0, 0, 0.0, 0
        for set_name, db_imgs, q_imgs, gt_path in set_list:
            if mode.reuse_baseline_features:
                db, q = baseline_feats[set_name]
            else:
                t = time.perf_counter()
                db, q = ex.extract_set(db_imgs), ex.extract_set(q_imgs)
                t_ex += time.perf_counter() - t
                n_img += len(db) + len(q)
                if not baseline_feats.get(set_name):
                    baseline_feats[set_name] = (db, q)
            gt = load_ground_truth(gt_path, q.names, db.names) if gt_path else GroundTruth([{i} for i in range(len(q))])
            t = time.perf_counter()
            res = two_stage(db, q, mode.preset, top_n=mode.top_n or len(db), exact=mode.exact)
            t_rr += time.perf_counter() - t
            n_q += len(q)
            row[set_name] = {
                "global_r1": recall_at_n([r.global_ids for r in res], gt, (1,))[1],
                "reranked_r1": recall_at_n([r.reranked_ids for r in res], gt, (1,))[1],
            }
        row["s_per_image"] = t_ex / n_img if n_img else None
        row["ms_per_query_rerank"] = 1000 * t_rr / n_q
        report[name] = row
        print(name, json.dumps(row), flush=True)
    b = report["float32 640x480 (baseline)"]
    names = [s[0] for s in set_list]
    print(f"\n| mode | extraction speed-up | re-ranking speed-up | Recall@1 change ({', '.join(names)}) |")
    print("|---|---|---|---|")
    for name, row in report.items():
        row["extract_speedup"] = b["s_per_image"] / row["s_per_image"] if row["s_per_image"] else 1.0
        row["rerank_speedup"] = b["ms_per_query_rerank"] / row["ms_per_query_rerank"]
        row["delta_r1"] = {s: row[s]["reranked_r1"] - b[s]["reranked_r1"] for s in names}
        deltas = ", ".join(f"{row['delta_r1'][s]:+.3f}" for s in names)
        print(f"| {name} | x{row['extract_speedup']:.2f} | x{row['rerank_speedup']:.2f} | {deltas} |")
    print("\nbaseline Recall@1 (re-ranked): " + ", ".join(f"{s} {b[s]['reranked_r1']:.3f}" for s in names))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
