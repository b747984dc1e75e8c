"""Side-by-side with the reference (patchnetvlad==0.1.8), in one run, same
checkpoint, images and machine. Prints medians, ratios and the floors.

    .venv/bin/python benchmarks/compare_reference.py [--checkpoint C] [--images DIR] [--repeats 3] [--out bench.json]

Measures, per preset (speed, performance):
- extraction per image: the reference as its feature_extract.py computes it
  (in memory), this project's FeatureExtractor; the floor: VGG-16 conv5_3
  alone, float32, as ``nn.Sequential`` runs it (the reference's way) and in
  oneDNN's blocked layout (ours; bit-identical), and bfloat16 for information;
- re-ranking per candidate (top N batched): the reference PatchMatcher called
  per candidate as local_matcher.py does (features in memory), this project's
  PatchMatcher with exact products (default) and with oneDNN products
  (exact=False), on the same float32 features, and (exact) on the candidates
  as the node's map stores them (float16, converted on the fly); the floors: the bare similarity products for the same shapes,
  as torch.matmul computes them (MKL; batched over all candidates, and one
  product per candidate, the faster of the two is the floor) and as oneDNN
  does, plus the RANSAC calls alone (the reference's cv2.findHomography on the
  same matches, one core), which both sides must pay;
- equivalence: max |difference| of global and patch descriptors, max relative
  difference of raw scores (exact and fast products);
- peak memory (max RSS) of each side, each measured in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import REPO, cpu_name

from pnv_ros.bench import median_time, stored_candidates


def measure(side: str, preset_name: str, ckpt: str, images: list[str], repeats: int, n_cand: int, tmp: Path) -> dict:
    """One side's numbers (run in a subprocess so that max RSS is its own)."""
    from reference import reference_extract, reference_matcher, reference_model, reference_raw_scores

    from pnv_ros.config import get_preset
    from pnv_ros.engines.spec import RuntimeSpec
    from pnv_ros.extract import open_extractor
    from pnv_ros.matching import PatchMatcher
    from pnv_ros.model.checkpoint import load_checkpoint

    preset = get_preset(preset_name)
    out: dict = {"side": side, "preset": preset_name}
    if side != "ours":  # ours loads it through open_extractor (one model in memory either way)
        model, info = load_checkpoint(ckpt)
    if side == "reference":
        ref, dim = reference_model(Path(ckpt), preset.patch_sizes, preset.strides)
        feats = [reference_extract(ref, dim, Path(p)) for p in images]
        out["extract_s"] = float(
            np.median([median_time(lambda p=p: reference_extract(ref, dim, Path(p)), repeats) for p in images[:2]])
        )
        cands = [f[1] for f in (feats * (n_cand // len(feats) + 1))[:n_cand]]
        matcher = "ransac" if preset.matcher.value == "ransac" else "rapid"
        rpm = reference_matcher(matcher, preset)  # keypoints computed once, as local_matcher.py does
        q_t = [torch.tensor(a).T for a in feats[0][1]]
        db_t = [[torch.tensor(a) for a in c] for c in cands]  # features in memory (its script reads .npy files)
        t = median_time(lambda: [rpm.match(q_t, db) for db in db_t], repeats)
        out["rerank_ms_per_candidate"] = 1000 * t / n_cand
        out["raw"] = reference_raw_scores(matcher, preset, feats[0][1], cands).tolist()
        out["global"] = [f[0].tolist() for f in feats]
        np.savez(tmp / f"reference_{preset_name}.npz", *[p.T for f in feats for p in f[1]])
    elif side == "ours":
        ex = open_extractor(ckpt, preset, RuntimeSpec(device="cpu"))
        model, info = ex.model, ex.info
        feats = ex.extract(images)
        out["extract_s"] = float(np.median([median_time(lambda p=p: ex.extract_one(p), repeats) for p in images[:2]]))
        cands = (feats * (n_cand // len(feats) + 1))[:n_cand]
        pm, fast = PatchMatcher(preset), PatchMatcher(preset, exact=False)
        t = median_time(lambda: pm.score(feats[0], cands), repeats)
        out["rerank_ms_per_candidate"] = 1000 * t / n_cand
        t = median_time(lambda: fast.score(feats[0], cands), repeats)
        out["rerank_fast_ms_per_candidate"] = 1000 * t / n_cand
        # the same candidates as the node's map keeps them (float16 patches)
        _, stored = stored_candidates(feats, model.dim, preset, info.identity, n_cand)
        t = median_time(lambda: pm.score(feats[0], stored), repeats)
        out["rerank_map_ms_per_candidate"] = 1000 * t / n_cand
        out["raw"] = pm.score(feats[0], cands).raw.tolist()
        out["raw_fast"] = fast.score(feats[0], cands).raw.tolist()
        out["global"] = [f.global_desc.tolist() for f in feats]
        np.savez(tmp / f"ours_{preset_name}.npz", *[p for f in feats for p in f.patches])
    else:  # floors
        x = torch.stack(_inputs(preset, images[:1]))
        with torch.inference_mode():
            out["backbone_s"] = median_time(lambda: model.encoder(x), repeats)
            out["backbone_blocked_s"] = median_time(lambda: model.backbone(x), repeats)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out["backbone_bf16_s"] = median_time(lambda: model.encoder(x), repeats)
            d = model.dim
            batched, single, onednn = 0.0, 0.0, 0.0
            for s in range(len(preset.patch_sizes)):
                p = preset.num_patches(s)
                q = torch.nn.functional.normalize(torch.randn(p, d), dim=1)
                db = torch.nn.functional.normalize(torch.randn(n_cand, p, d), dim=2)
                batched += median_time(lambda q=q, db=db: torch.matmul(q, db.transpose(1, 2)), repeats)
                buf = torch.empty(p, p)
                single += median_time(lambda q=q, db=db, buf=buf: [torch.mm(q, b.T, out=buf) for b in db], repeats)
                qm, dbm = q.to_mkldnn(), [b.to_mkldnn() for b in db]
                onednn += median_time(
                    lambda qm=qm, dbm=dbm: [torch._C._nn.mkldnn_linear(qm, b, None) for b in dbm], repeats
                )
            out["matmul_batched_ms_per_candidate"] = 1000 * batched / n_cand
            out["matmul_single_ms_per_candidate"] = 1000 * single / n_cand
            out["matmul_floor_ms_per_candidate"] = 1000 * min(batched, single) / n_cand
            out["onednn_floor_ms_per_candidate"] = 1000 * onednn / n_cand
            if preset.matcher.value == "ransac":
                out["ransac_ms_per_candidate"] = _ransac_alone(preset, model, info, images, n_cand, repeats)
    import resource

    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _ransac_alone(preset, model, info, images, n_cand: int, repeats: int) -> float:
    """ms per candidate of the RANSAC calls alone, serially, on the matches the matcher finds."""
    import cv2

    from pnv_ros.config import BACKBONE_STRIDE
    from pnv_ros.extract import FeatureExtractor
    from pnv_ros.matching import PatchMatcher

    feats = FeatureExtractor(model, info, preset, device="cpu").extract(images)
    cands = (feats * (n_cand // len(feats) + 1))[:n_cand]
    pm = PatchMatcher(preset)
    det = pm.score(feats[0], cands, details=True).details
    calls = [
        (pm.keypoints[s][m.db_idx], pm.keypoints[s][m.query_idx], BACKBONE_STRIDE * preset.strides[s] * 1.5)
        for per in det
        for s, m in enumerate(per)
        if m.num_matches > 3
    ]
    t = median_time(
        lambda: [cv2.findHomography(a, b, cv2.RANSAC, ransacReprojThreshold=r) for a, b, r in calls], repeats
    )
    return 1000 * t / n_cand


def _inputs(preset, images):
    from pnv_ros.images import load_image
    from pnv_ros.preprocess import input_transform

    t = input_transform(preset.image_height, preset.image_width)
    return [t(load_image(p)) for p in images]


def _max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-12)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the offline default model")
    ap.add_argument("--images", default=str(REPO / "data" / "rtabmap_samples_loop84" / "images"))
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="speed,performance")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_preset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_tmp", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from pnv_ros.images import list_images
    from pnv_ros.model.registry import resolve_checkpoint

    ckpt = str(resolve_checkpoint(a.checkpoint))
    images = [str(p) for p in list_images([a.images])[: a.n_images]]
    if a._side:
        print(json.dumps(measure(a._side, a._preset, ckpt, images, a.repeats, a.candidates, Path(a._tmp))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="pnv_compare_"))
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        "checkpoint": ckpt,
        "images": images,
        "candidates": a.candidates,
        "presets": {},
    }
    for preset in a.presets.split(","):
        sides = {}
        for side in ("reference", "ours", "floor"):
            cmd = [
                sys.executable,
                __file__,
                "--_side",
                side,
                "--_preset",
                preset,
                "--checkpoint",
                ckpt,
                "--images",
                a.images,
                "--n-images",
                str(a.n_images),
                "--candidates",
                str(a.candidates),
                "--repeats",
                str(a.repeats),
                "--_tmp",
                str(tmp),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
            sides[side] = json.loads(r.stdout.strip().splitlines()[-1])
        ref, ours, floor = sides["reference"], sides["ours"], sides["floor"]
        raw_r, raw_o, raw_f = np.array(ref["raw"]), np.array(ours["raw"]), np.array(ours["raw_fast"])
        pr, po = np.load(tmp / f"reference_{preset}.npz"), np.load(tmp / f"ours_{preset}.npz")
        patch_diff = max(float(np.abs(pr[k] - po[k]).max()) for k in pr.files)
        floor_mm = floor["matmul_floor_ms_per_candidate"]
        row = {
            "extract_s": {
                "reference": ref["extract_s"],
                "ours": ours["extract_s"],
                "speedup": ref["extract_s"] / ours["extract_s"],
                "floor_backbone_fp32": floor["backbone_s"],
                "floor_backbone_blocked": floor["backbone_blocked_s"],
                "floor_backbone_bf16": floor["backbone_bf16_s"],
            },
            "rerank_ms_per_candidate": {
                "reference": ref["rerank_ms_per_candidate"],
                "ours": ours["rerank_ms_per_candidate"],
                "ours_fast_products": ours["rerank_fast_ms_per_candidate"],
                "ours_from_float16_map": ours["rerank_map_ms_per_candidate"],
                "speedup": ref["rerank_ms_per_candidate"] / ours["rerank_ms_per_candidate"],
                "speedup_fast": ref["rerank_ms_per_candidate"] / ours["rerank_fast_ms_per_candidate"],
                "floor_matmul": floor_mm,
                "floor_matmul_batched": floor["matmul_batched_ms_per_candidate"],
                "floor_matmul_per_candidate": floor["matmul_single_ms_per_candidate"],
                "floor_onednn": floor["onednn_floor_ms_per_candidate"],
                "ransac_alone": floor.get("ransac_ms_per_candidate", 0.0),
                "ours_over_floor": ours["rerank_ms_per_candidate"] / floor_mm,
                "fast_over_floor": ours["rerank_fast_ms_per_candidate"] / floor_mm,
                "fast_over_onednn_floor": ours["rerank_fast_ms_per_candidate"] / floor["onednn_floor_ms_per_candidate"],
            },
            "max_rss_mb": {"reference": ref["max_rss_mb"], "ours": ours["max_rss_mb"]},
            "equivalence": {
                "global_max_abs": float(np.abs(np.array(ref["global"]) - np.array(ours["global"])).max()),
                "patch_max_abs": patch_diff,
                "raw_score_max_rel": _max_rel(raw_o, raw_r),
                "raw_score_fast_max_rel": _max_rel(raw_f, raw_r),
            },
        }
        report["presets"][preset] = row
        e, r = row["extract_s"], row["rerank_ms_per_candidate"]
        q = row["equivalence"]
        print(
            f"[{preset}] extraction: reference {e['reference']:.3f} s, ours {e['ours']:.3f} s -> {e['speedup']:.2f}x; "
            f"floor backbone {e['floor_backbone_fp32']:.3f} s as nn.Sequential, {e['floor_backbone_blocked']:.3f} s blocked "
            f"(bf16 {e['floor_backbone_bf16']:.3f} s)"
        )
        print(
            f"[{preset}] re-rank/candidate: reference {r['reference']:.2f} ms, ours {r['ours']:.2f} ms -> "
            f"{r['speedup']:.2f}x (fast products {r['ours_fast_products']:.2f} ms -> {r['speedup_fast']:.2f}x; "
            f"candidates from the float16 map, as the node re-ranks, {r['ours_from_float16_map']:.2f} ms); "
            f"matmul floor {r['floor_matmul']:.2f} ms (batched {r['floor_matmul_batched']:.2f}, per candidate "
            f"{r['floor_matmul_per_candidate']:.2f}), oneDNN {r['floor_onednn']:.2f} ms, RANSAC calls alone "
            f"{r['ransac_alone']:.2f} ms; ours/floor {r['ours_over_floor']:.2f}, fast/floor {r['fast_over_floor']:.2f}, "
            f"fast/oneDNN floor {r['fast_over_onednn_floor']:.2f}"
        )
        print(
            f"[{preset}] max RSS: reference {row['max_rss_mb']['reference']:.0f} MB, ours {row['max_rss_mb']['ours']:.0f} MB; "
            f"equivalence: global {q['global_max_abs']:.1e}, patches {q['patch_max_abs']:.1e}, raw scores "
            f"{q['raw_score_max_rel']:.1e} rel (fast products {q['raw_score_fast_max_rel']:.1e})"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
