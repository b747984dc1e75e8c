"""Recall@1/5/10 of a checkpoint on the shared real sets: global retrieval and
re-ranking with each preset, and the time per image. Extracts once with the
performance preset (its p=5 scale is the speed/storage preset's scale).

    .venv/bin/python benchmarks/eval_default_model.py [--checkpoint C] [--data ../shared/data] --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pnv_ros.config import get_preset
from pnv_ros.engines.spec import RuntimeSpec
from pnv_ros.eval.ground_truth import load_ground_truth, recall_at_n
from pnv_ros.extract import open_extractor
from pnv_ros.features import FeatureSet
from pnv_ros.images import list_images
from pnv_ros.retrieval import two_stage


def sets(data: Path):
    rt = data / "rtabmap_samples_loop84"
    if rt.is_dir():
        imgs = list_images([rt / "images"])
        yield "rtabmap_loop84 (db 1-40, q 41-84)", imgs[:40], imgs[40:], rt / "gt.csv", "hold-out"
    co = data / "corridor_vprbench"
    if co.is_dir():
        yield "corridor_vprbench", list_images([co / "ref"]), list_images([co / "query"]), co / "gt.csv", "FITTING SET"
    gp = data / "gardenspoint_walking_subset10"
    if gp.is_dir():
        yield "gardenspoint10 (hard GT)", list_images([gp / "ref"]), list_images([gp / "query"]), None, "hold-out"


def scale_only(fs: FeatureSet, preset) -> FeatureSet:
    s = fs.preset.patch_sizes.index(preset.patch_sizes[0])
    return FeatureSet(fs.names, fs.global_descs, [fs.patches[s]], fs.image_sizes, preset, fs.model_id)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    ap.add_argument("--out", default="eval_default_model.json")
    ap.add_argument("--sets", default="", help="comma-separated name prefixes to run (default: all)")
    a = ap.parse_args()
    ex = open_extractor(a.checkpoint, "performance", RuntimeSpec(device="cpu"))
    info = ex.info
    results = []
    for name, db_imgs, q_imgs, gt_path, role in sets(Path(a.data)):
        if a.sets and not any(name.startswith(p) for p in a.sets.split(",")):
            continue
        t = time.perf_counter()
        db = ex.extract_set(db_imgs, progress=True)
        q = ex.extract_set(q_imgs, progress=True)
        per_img = (time.perf_counter() - t) / (len(db) + len(q))
        if gt_path is None:  # same index = same place
            from pnv_ros.eval.ground_truth import GroundTruth

            gt = GroundTruth([{i} for i in range(len(q))])
        else:
            gt = load_ground_truth(gt_path, q.names, db.names)
        row = {
            "set": name,
            "role": role,
            "queries": int(gt.has_positive().sum()),
            "db": len(db),
            "s_per_image_performance_extract": round(per_img, 3),
        }
        for pname, matcher in (("performance", "ransac"), ("speed", "rapid")):
            pr = (
                db.preset
                if pname == "performance"
                else dataclasses.replace(
                    db.preset,
                    **{
                        k: getattr(get_preset(pname), k)
                        for k in ("name", "patch_sizes", "strides", "patch_weights", "matcher")
                    },
                )
            )
            d2, q2 = (db, q) if pname == "performance" else (scale_only(db, pr), scale_only(q, pr))
            t = time.perf_counter()
            res = two_stage(d2, q2, pr, top_n=min(100, len(db)), matcher=matcher)
            row[f"ms_per_query_{pname}"] = round(1000 * (time.perf_counter() - t) / len(q2), 1)
            row["global"] = recall_at_n([r.global_ids for r in res], gt, (1, 5, 10))
            row[f"reranked_{pname}"] = recall_at_n([r.reranked_ids for r in res], gt, (1, 5, 10))
        print(json.dumps(row))
        results.append(row)
    Path(a.out).write_text(json.dumps({"model": info.identity, "results": results}, indent=1))


if __name__ == "__main__":
    main()
