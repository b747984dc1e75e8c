"""Patch selection (issue #31): map bytes per keyframe, re-rank time and recall at keep fractions.

Extracts every shared set once with the speed preset and every patch kept (``patch_keep`` 1), then derives
each keep fraction's features from those (selection runs after extraction, ``pnv_ros.patch_selection``),
per criterion (uniform, burstiness, typicality); re-ranks the global top 20 (the node's count) and reports Recall@1/5, the median re-rank time
per query and, on the RTAB-Map loop bag, the in-process replay's precision / recall / F1 at threshold 0.12 (as
benchmarks/engines.py's ``sequence``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/patch_selection.py --data ../shared/data --cache /tmp/psel \\
        --docs docs/results/patch_selection.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from engines import THRESHOLD, Memo, detector_params, pixels_key, rtab_bag  # noqa: E402
from eval_default_model import sets  # noqa: E402

from pnv_ros.engines.spec import RuntimeSpec  # noqa: E402
from pnv_ros.eval.ground_truth import GroundTruth, load_ground_truth, load_sequence_gt, recall_at_n  # noqa: E402
from pnv_ros.extract import open_extractor  # noqa: E402
from pnv_ros.features import FeatureSet  # noqa: E402
from pnv_ros.index import GlobalIndex  # noqa: E402
from pnv_ros.matching import PatchMatcher  # noqa: E402
from pnv_ros.patch_selection import CRITERIA, DEFAULT_CRITERION, select_patches  # noqa: E402

#: candidates re-ranked per query: the node's default top_n (config.DetectorParams)
TOP_N = 20


def selected(fs: FeatureSet, keep: float, criterion: str) -> FeatureSet:
    """The set's features with each image's patches selected at this keep fraction."""
    if keep >= 1.0:
        return fs
    preset = dataclasses.replace(fs.preset, patch_keep=keep)
    places = [select_patches(fs.item(i), preset, criterion) for i in range(len(fs))]
    return FeatureSet.from_places(fs.names, places, preset, fs.model_id)


def patch_bytes(preset, dim: int) -> int:
    """Bytes of one keyframe's patches in a map: float16 descriptors plus int16 grid indices when selected."""
    n = sum(preset.kept_patches(s) for s in range(len(preset.patch_sizes)))
    return n * dim * 2 + (n * 2 if preset.selects_patches else 0)


def top(db: FeatureSet, q: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """Global top 20 per query: distances and ids (Q, 20); selection leaves the global descriptors alone."""
    index = GlobalIndex(db.dim, "flat")
    index.add(db.global_descs)
    return index.search(q.global_descs, min(TOP_N, len(db)))


def rerank_eval(db: FeatureSet, q: FeatureSet, gt: GroundTruth) -> dict:
    """Recall@1/5 after re-ranking the global top 20 (and of the global order alone)."""
    dists, ids = top(db, q)
    pm = PatchMatcher(db.preset)
    items = [db.item(i) for i in range(len(db))]
    ranked = []
    for qi in range(len(q)):
        order, _, _ = pm.rerank(q.item(qi), [items[c] for c in ids[qi]], dists[qi])
        ranked.append(ids[qi][order])
    return {"recall": recall_at_n(ranked, gt, (1, 5)), "global_recall": recall_at_n(list(ids), gt, (1, 5))}


def rerank_times(pairs: dict[float, tuple[FeatureSet, FeatureSet]], queries: int, rounds: int) -> dict[float, float]:
    """Median re-rank time per query (ms, top 20) per keep fraction, the fractions interleaved query by query
    (a shared machine's load drifts; interleaving gives every fraction the same load)."""
    db0, q0 = next(iter(pairs.values()))
    dists, ids = top(db0, q0)
    setup = {}
    for keep, (db, q) in pairs.items():
        items = [db.item(i) for i in range(len(db))]
        setup[keep] = (PatchMatcher(db.preset), items, q)
    times: dict[float, list[float]] = {k: [] for k in pairs}
    for _ in range(rounds):
        for qi in range(min(queries, len(q0))):
            for keep, (pm, items, q) in setup.items():
                query, cands = q.item(qi), [items[c] for c in ids[qi]]
                t = time.perf_counter()
                pm.rerank(query, cands, dists[qi])
                times[keep].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def load_or_extract(ex, name: str, db_imgs, q_imgs, cache: Path) -> tuple[FeatureSet, FeatureSet]:
    key = "".join(c if c.isalnum() else "_" for c in name)
    out = []
    for part, imgs in (("db", db_imgs), ("q", q_imgs)):
        path = cache / f"{key}_{part}.npz"
        fs = FeatureSet.load(path) if path.is_file() else None
        if fs is None or fs.model_id != ex.info.identity or len(fs) != len(imgs):
            fs = ex.extract_set(imgs, progress=True)
            fs.save(path)
        out.append(fs)
    return out[0], out[1]


def sequence(ex, rtab: tuple, keep: float, criterion: str, bag: Path) -> dict:
    """The RTAB-Map loop bag through the detector in-process at this keep fraction (features from the set)."""
    from pnv_ros.eval.replay import replay_in_process
    from pnv_ros.eval.report import compute_metrics

    db, q, db_imgs, q_imgs = rtab
    known = {}
    for fs, imgs in ((db, db_imgs), (q, q_imgs)):
        sel = selected(fs, keep, criterion)
        for i, img in enumerate(imgs):
            known[pixels_key(img)] = sel.item(i)
    ex_k = copy.copy(ex)
    ex_k.preset = dataclasses.replace(ex.preset, patch_keep=keep)
    memo = Memo(ex_k, known)
    res = replay_in_process(bag, memo, detector_params())
    m = compute_metrics(
        res, load_sequence_gt(ROOT / "data" / "rtabmap_samples_loop84" / "gt_matrix.npy", 84), THRESHOLD
    )
    at = m["at_threshold"]
    return {
        "precision": at["precision"],
        "recall": at["recall"],
        "f1": at["f1"],
        "average_precision": m["average_precision"],
        "features_extracted": memo.misses,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| set | criterion | keep | patch bytes / keyframe | re-rank ms / query (top 20, burstiness) | R@1 | R@5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['criterion']} | {r['keep']:g} | {r['patch_bytes']:,} | {r['rerank_ms']:.1f} | "
            f"{r['recall'][1]:.3f} | {r['recall'][5]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data"))
    ap.add_argument("--keeps", default="1,0.75,0.5,0.25")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--cache", default="/tmp/patch_selection", help="folder for the keep-1 features and the bag")
    ap.add_argument("--no-sequence", action="store_true")
    ap.add_argument("--time-queries", type=int, default=20, help="queries per set timed (interleaved keeps)")
    ap.add_argument("--time-rounds", type=int, default=3)
    ap.add_argument("--out", default="patch_selection.json")
    ap.add_argument("--docs", default="", help="write the markdown table here")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    keeps = [float(k) for k in a.keeps.split(",")]
    criteria = a.criteria.split(",")
    ex = open_extractor(a.checkpoint, "speed", RuntimeSpec(device="cpu"))
    found, seen = [], set()
    for folder in (Path(a.data), ROOT / "data"):
        for s in sets(folder) if folder.is_dir() else []:
            if s[0] not in seen:
                seen.add(s[0])
                found.append(s)
    rows, rtab = [], None
    for name, db_imgs, q_imgs, gt_path, _ in found:
        db, q = load_or_extract(ex, name, db_imgs, q_imgs, cache)
        gt = (
            GroundTruth([{i} for i in range(len(q))])
            if gt_path is None
            else load_ground_truth(gt_path, q.names, db.names)
        )
        if name.startswith("rtabmap"):
            rtab = (db, q, db_imgs, q_imgs)
        timed = {}
        for criterion in criteria:
            for keep in keeps:
                if keep >= 1.0 and criterion != criteria[0]:
                    continue
                d2, q2 = selected(db, keep, criterion), selected(q, keep, criterion)
                if criterion == DEFAULT_CRITERION or keep >= 1.0:
                    timed[keep] = (d2, q2)
                r = rerank_eval(d2, q2, gt)
                row = {"set": name, "criterion": criterion if keep < 1 else "(all)", "keep": keep}
                row.update(patch_bytes=patch_bytes(d2.preset, d2.dim), **r)
                print(json.dumps(row), flush=True)
                rows.append(row)
        ms = rerank_times(timed, a.time_queries, a.time_rounds)
        for row in rows:
            if row["set"] == name:
                row["rerank_ms"] = ms[row["keep"]]
        print(json.dumps({"set": name, "rerank_ms": ms}), flush=True)
    seq = []
    if rtab is not None and not a.no_sequence:
        bag = rtab_bag(cache)
        for criterion in criteria[:2]:  # the default (uniform) and burstiness
            for keep in keeps:
                if keep >= 1.0 and criterion != criteria[0]:
                    continue
                r = {"criterion": criterion, "keep": keep, **sequence(ex, rtab, keep, criterion, bag)}
                print(json.dumps(r), flush=True)
                seq.append(r)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU"
    Path(a.out).write_text(json.dumps({"model": ex.info.identity, "machine": machine, "rows": rows, "sequence": seq}))
    if a.docs:
        lines = [table(rows), "", "| criterion | keep | precision | recall | F1 | AP |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {r['criterion']} | {r['keep']:g} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
            f"{r['average_precision']:.3f} |"
            for r in seq
        ]
        Path(a.docs + ".tables").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
