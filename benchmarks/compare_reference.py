"""Side-by-side with the reference (patchnetvlad==0.1.8), in one run, same
checkpoint, images and machine. Prints medians, ratios and the floors.

    .venv/bin/python benchmarks/compare_reference.py [--checkpoint C] [--images DIR] [--repeats 3] [--out bench.json]

Measures, per preset (speed, performance):
- extraction per image: the reference as its feature_extract.py computes it
  (in memory), this project's FeatureExtractor; the floor: VGG-16 conv5_3
  alone (float32, and bfloat16 autocast for information);
- re-ranking per candidate (top N batched): the reference PatchMatcher called
  per candidate as local_matcher.py does (features in memory), this project's
  PatchMatcher; the floor: the bare similarity products for the same shapes;
- equivalence: max |difference| of descriptors, max relative difference of raw scores;
- peak memory (max RSS) of each side, each measured in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from pnv_ros.bench import median_time

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "test"))


def measure(side: str, preset_name: str, ckpt: str, images: list[str], repeats: int, n_cand: int) -> dict:
    """One side's numbers (run in a subprocess so that max RSS is its own)."""
    from oracle import reference_extract, reference_matcher, reference_model, reference_raw_scores

    from pnv_ros.config import get_preset
    from pnv_ros.extract import FeatureExtractor
    from pnv_ros.matching import PatchMatcher
    from pnv_ros.model.checkpoint import load_checkpoint

    preset = get_preset(preset_name)
    out: dict = {"side": side, "preset": preset_name}
    model, info = load_checkpoint(ckpt)
    if side == "reference":
        ref, dim = reference_model(Path(ckpt), preset.patch_sizes, preset.strides)
        feats = [reference_extract(ref, dim, Path(p)) for p in images]
        out["extract_s"] = float(np.median([median_time(lambda p=p: reference_extract(ref, dim, Path(p)), repeats)
                                            for p in images[:2]]))  # fmt: skip
        cands = [f[1] for f in (feats * (n_cand // len(feats) + 1))[:n_cand]]
        matcher = "ransac" if preset.matcher.value == "ransac" else "rapid"
        rpm = reference_matcher(matcher, preset)  # keypoints computed once, as local_matcher.py does
        q_t = [torch.tensor(a).T for a in feats[0][1]]
        db_t = [[torch.tensor(a) for a in c] for c in cands]  # features in memory (its script reads .npy files)
        t = median_time(lambda: [rpm.match(q_t, db) for db in db_t], repeats)
        out["rerank_ms_per_candidate"] = 1000 * t / n_cand
        out["raw"] = reference_raw_scores(matcher, preset, feats[0][1], cands).tolist()
        out["global"] = [f[0].tolist() for f in feats]
    elif side == "ours":
        ex = FeatureExtractor(model, info, preset, device="cpu")
        feats = ex.extract(images)
        out["extract_s"] = float(np.median([median_time(lambda p=p: ex.extract_one(p), repeats) for p in images[:2]]))
        cands = (feats * (n_cand // len(feats) + 1))[:n_cand]
        pm = PatchMatcher(preset)
        t = median_time(lambda: pm.score(feats[0], cands), repeats)
        out["rerank_ms_per_candidate"] = 1000 * t / n_cand
        out["raw"] = pm.score(feats[0], cands).raw.tolist()
        out["global"] = [f.global_desc.tolist() for f in feats]
    else:  # floors
        x = torch.stack(_inputs(preset, images[:1]))
        with torch.inference_mode():
            out["backbone_s"] = median_time(lambda: model.encoder(x), repeats)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out["backbone_bf16_s"] = median_time(lambda: model.encoder(x), repeats)
            d = model.dim
            t_total = 0.0
            for s in range(len(preset.patch_sizes)):
                p = preset.num_patches(s)
                q = torch.nn.functional.normalize(torch.randn(p, d), dim=1)
                db = torch.nn.functional.normalize(torch.randn(n_cand, p, d), dim=2)
                t_total += median_time(lambda q=q, db=db: torch.matmul(q, db.transpose(1, 2)), repeats)
            out["matmul_floor_ms_per_candidate"] = 1000 * t_total / n_cand
    import resource

    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _inputs(preset, images):  # type: ignore[no-untyped-def]
    from pnv_ros.extract import input_transform
    from pnv_ros.images import load_image

    t = input_transform(preset.image_height, preset.image_width)
    return [t(load_image(p)) for p in images]


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
    a = ap.parse_args()
    from pnv_ros.images import list_images
    from pnv_ros.model.registry import resolve_checkpoint

    ckpt = str(resolve_checkpoint(a.checkpoint))
    images = [str(p) for p in list_images([a.images])[: a.n_images]]
    if a._side:
        print(json.dumps(measure(a._side, a._preset, ckpt, images, a.repeats, a.candidates)))
        return
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads", "checkpoint": ckpt, "images": images,
              "candidates": a.candidates, "presets": {}}  # fmt: skip
    for preset in a.presets.split(","):
        sides = {}
        for side in ("reference", "ours", "floor"):
            cmd = [sys.executable, __file__, "--_side", side, "--_preset", preset, "--checkpoint", ckpt,
                   "--images", a.images, "--n-images", str(a.n_images), "--candidates", str(a.candidates),
                   "--repeats", str(a.repeats)]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
            sides[side] = json.loads(r.stdout.strip().splitlines()[-1])
        ref, ours, floor = sides["reference"], sides["ours"], sides["floor"]
        raw_r, raw_o = np.array(ref["raw"]), np.array(ours["raw"])
        row = {
            "extract_s": {"reference": ref["extract_s"], "ours": ours["extract_s"],
                          "speedup": ref["extract_s"] / ours["extract_s"],
                          "floor_backbone_fp32": floor["backbone_s"], "floor_backbone_bf16": floor["backbone_bf16_s"]},
            "rerank_ms_per_candidate": {"reference": ref["rerank_ms_per_candidate"], "ours": ours["rerank_ms_per_candidate"],
                                        "speedup": ref["rerank_ms_per_candidate"] / ours["rerank_ms_per_candidate"],
                                        "floor_matmul": floor["matmul_floor_ms_per_candidate"],
                                        "ours_over_floor": ours["rerank_ms_per_candidate"] / floor["matmul_floor_ms_per_candidate"]},
            "max_rss_mb": {"reference": ref["max_rss_mb"], "ours": ours["max_rss_mb"]},
            "equivalence": {"global_max_abs": float(np.abs(np.array(ref["global"]) - np.array(ours["global"])).max()),
                            "raw_score_max_rel": float(np.max(np.abs(raw_o - raw_r) / np.maximum(np.abs(raw_r), 1e-12)))},
        }  # fmt: skip
        report["presets"][preset] = row
        e, r = row["extract_s"], row["rerank_ms_per_candidate"]
        print(f"[{preset}] extraction: reference {e['reference']:.3f} s, ours {e['ours']:.3f} s -> {e['speedup']:.2f}x; "
              f"floor backbone {e['floor_backbone_fp32']:.3f} s (bf16 {e['floor_backbone_bf16']:.3f} s)")  # fmt: skip
        print(f"[{preset}] re-rank/candidate: reference {r['reference']:.2f} ms, ours {r['ours']:.2f} ms -> "
              f"{r['speedup']:.2f}x; matmul floor {r['floor_matmul']:.2f} ms (ours/floor {r['ours_over_floor']:.2f})")  # fmt: skip
        print(f"[{preset}] max RSS: reference {row['max_rss_mb']['reference']:.0f} MB, ours {row['max_rss_mb']['ours']:.0f} MB; "
              f"equivalence: global {row['equivalence']['global_max_abs']:.1e}, raw scores "
              f"{row['equivalence']['raw_score_max_rel']:.1e} rel")  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
