"""Choosing the dinov2_vlad model's settings by measurement: layer, vocabulary size, vocabulary fitting set,
patch window sizes, matcher, and how the patch score and the global similarity combine.

For every shared set (split as ``eval_default_model.sets`` splits them) and the RTAB-Map loop, the ViT tokens are
computed once per input size (all candidate layers in one pass, value facet) and cached under ``--cache``; every
configuration then fits its vocabulary and whitening PCA exactly as ``pnv models build dinov2_vlad`` does
(``fitting.fit_vocabulary``: seeded k-means, NetVLAD initialisation, WPCA on global and sampled patch VLADs)
and pools with the model's own code (``DinoVLADModel._pool``), so each row is what a built model would give.

Vocabulary fitting sets: ``corridor`` = the generic model's (data/corridor_vprbench ref + query, what
``pnv models build dinov2_vlad`` fits on); ``own db`` = the set's own database images (what ``pnv models refit``
does on a robot's map: AnyLoc's advice). Re-ranking: top N = min(100, database) as benchmarks/model_families.py;
rapid spatial scoring for single window sizes, RANSAC for the performance preset's three. ``fused w`` re-orders the
top N by the fused patch score + w x the z-scored global distance (the global stage as one more scale).

Writes docs/results/dinov2_patch_sweep.md and .json. A full grid costs hours on 2 cores (the re-ranking of 111
corridor queries dominates); runs of parts of it (``--layers/--ks/--sizes/--fits/--windows``) can be merged:

    .venv/bin/python benchmarks/dinov2_patch_sweep.py [--data ../shared/data] [--cache out/dinov2_sweep] --docs D1
    .venv/bin/python benchmarks/dinov2_patch_sweep.py --merge D1/dinov2_patch_sweep.json D2/... [--docs docs]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see dinov2_backbone.py: busy-wait under others' load

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, RESULTS, write_json
from common import write_md as write_page
from eval_default_model import sets
from tqdm import tqdm

from pnv_ros.config import Matcher, get_preset, validate  # noqa: E402
from pnv_ros.eval.ground_truth import GroundTruth, load_ground_truth, recall_at_n  # noqa: E402
from pnv_ros.features import PlaceFeatures  # noqa: E402
from pnv_ros.images import image_identities, load_image  # noqa: E402
from pnv_ros.index import GlobalIndex  # noqa: E402
from pnv_ros.matching import PatchMatcher  # noqa: E402
from pnv_ros.model import dinov2_vlad as dv  # noqa: E402
from pnv_ros.model.dinov2 import load_dinov2  # noqa: E402
from pnv_ros.model.fitting import SEED, fit_vocabulary  # noqa: E402
from pnv_ros.preprocess import input_transform  # noqa: E402
from pnv_ros.storage import utc_now  # noqa: E402

ROOT = REPO
LAYERS = (8, 9, 10)
FACET = "value"
SIZES = ((322, 434),)
KS = (16, 32, 64)
WINDOWS = (3, 4, 5, 6)
FUSE_W = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
CORRIDOR = "corridor_vprbench"


def token_cache(model, paths: list[Path], size: tuple[int, int], cache: Path) -> dict[int, torch.Tensor]:
    """Value tokens of LAYERS for every image: {layer: (N, 384, h, w)} float32, cached as .npy."""
    files = {layer: cache / f"{size[0]}x{size[1]}_L{layer}_{FACET}_{len(paths)}.npy" for layer in LAYERS}
    if all(f.is_file() for f in files.values()):
        return {la: torch.from_numpy(np.load(f)) for la, f in files.items()}
    tf = input_transform(*size)
    out: dict[int, list[torch.Tensor]] = {la: [] for la in LAYERS}
    with torch.inference_mode():
        for p in tqdm(paths, desc=f"ViT {size[0]}x{size[1]}", unit="img"):
            got = model.facets(tf(load_image(p)).unsqueeze(0), [(la, FACET) for la in LAYERS])
            for la in LAYERS:
                out[la].append(got[(la, FACET)][0].permute(2, 0, 1).contiguous())
    cache.mkdir(parents=True, exist_ok=True)
    res = {}
    for la in LAYERS:
        arr = torch.stack(out[la])
        np.save(files[la], arr.numpy())
        res[la] = arr
    return res


def fitted_model(maps: torch.Tensor, k: int, layer: int, size: tuple[int, int]) -> dv.DinoVLADModel:
    """A DinoVLADModel (encoder unused) whose vocabulary and WPCA are fitted on ``maps`` as the builder does."""
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    m = dv.DinoVLADModel(k, 0, layer, FACET, size)
    # enough patch VLADs for the PCA on a small map: at least 2 x NUM_PCS samples in all
    per = max(8, -(-2 * dv.NUM_PCS // (len(maps) * len(dv.PCA_PATCH_SIZES))))
    fit = fit_vocabulary(
        m,
        list(maps),
        rng,
        k,
        dv.NUM_PCS,
        descs_per_image=dv.DESCS_PER_IMAGE,
        patch_sizes=dv.PCA_PATCH_SIZES,
        patches_per_image=per,
    )
    final = dv.DinoVLADModel(k, dv.NUM_PCS, layer, FACET, size)
    state = {n: v for n, v in m.state_dict().items() if not n.startswith("WPCA")}
    state["WPCA.0.weight"] = torch.from_numpy(fit.wpca_weight)[:, :, None, None]
    state["WPCA.0.bias"] = torch.from_numpy(fit.wpca_bias)
    final.load_state_dict(state, strict=True)
    return final.eval()


def preset_for(name: str, size: tuple[int, int], windows: tuple[int, ...], matcher: str):
    base = get_preset(name)
    p = dataclasses.replace(
        base,
        backbone=dv.BACKBONE,
        image_height=size[0],
        image_width=size[1],
        patch_sizes=windows,
        strides=(1,) * len(windows),
        patch_weights=(1.0 / len(windows),) * len(windows) if len(windows) > 1 else (1.0,),
        matcher=Matcher.parse(matcher),
    )
    if name == "performance" and windows == base.patch_sizes:
        p = dataclasses.replace(p, patch_weights=base.patch_weights)
    validate(p)
    return p


def features(model, maps: torch.Tensor, windows: tuple[int, ...], image_sizes) -> list[PlaceFeatures]:
    out = []
    with torch.inference_mode():
        for i in range(maps.shape[0]):
            g, ps = model._pool(maps[i : i + 1], windows, (1,) * len(windows))
            out.append(PlaceFeatures(g[0].numpy(), [p[0].contiguous().numpy() for p in ps], image_sizes[i]))
    return out


def evaluate(db: list[PlaceFeatures], q: list[PlaceFeatures], gt: GroundTruth, preset, top_n: int) -> dict:
    """Global and re-ranked Recall@1/5, the re-ranked order also fused with the global similarity."""
    index = GlobalIndex(db[0].global_desc.shape[0], "flat")
    index.add(np.stack([d.global_desc for d in db]))
    dists, ids = index.search(np.stack([d.global_desc for d in q]), top_n)
    pm = PatchMatcher(preset)
    glob, fused = [], {w: [] for w in FUSE_W}
    for qi in range(len(q)):
        cand = ids[qi]
        _, score, _ = pm.rerank(q[qi], [db[c] for c in cand])
        d = dists[qi].astype(np.float64)  # global L2 distance: z-scored across the candidates like each scale
        zd = (d - d.mean()) / d.std() if d.std() > 0 else np.zeros_like(d)
        glob.append(cand)
        for w in FUSE_W:
            fused[w].append(cand[np.argsort(score + w * zd, kind="stable")])
    res = {"global": recall_at_n(glob, gt, (1, 5))}
    for w in FUSE_W:
        res[f"fused{w}"] = recall_at_n(fused[w], gt, (1, 5))
    return res


#: The VGG-16 default's re-ranked Recall@1 on the same splits (docs/results/model_families.md, same protocol: rapid top
#: min(100, db); RANSAC there re-ranks top min(100, db), here top 20) for the comparison column.
VGG_RERANKED = {
    "rtabmap_loop84": {"rapid": 0.955, "ransac": 0.977},
    "corridor_vprbench": {"rapid": 0.757, "ransac": 0.766},
    "gardenspoint10": {"rapid": 0.3, "ransac": 0.4},
}


def write_md(runs: list[dict], path: Path) -> None:
    """One table: per configuration and set, global Recall@1 and the re-ranked one at each fusion weight."""
    rows = [r for run in runs for r in run["rows"]]
    ws = sorted({float(k[5:]) for r in rows for k in r if k.startswith("fused")})
    head = (
        "| set | input | layer | K | vocabulary | windows | matcher | top N | VGG re-ranked | global | "
        + " | ".join(f"w={w:g}" for w in ws)
        + " |"
    )
    lines = [
        "# DINOv2 patch stage: layer, vocabulary, windows and the global weight",
        "",
        f"Generated by `benchmarks/dinov2_patch_sweep.py` ({', '.join(run['generated'] for run in runs)}; "
        f"{sum(run['wall_s'] for run in runs) // 60} min of runs in all).",
        "",
        "Recall@1 per configuration. *global*: the VLAD descriptor alone; *w=x*: the top N re-ranked by the fused "
        "patch score plus x times the z-scored global distance (w=0: the paper's patch-only order). Vocabulary "
        "*corridor*: fitted on the corridor set (the generic model's fitting set, so its corridor rows are not a "
        "hold-out); *own*: on the set's own database images (what `pnv models refit` does). VGG re-ranked: the VGG-16 "
        "default on the same split (docs/results/model_families.md). Gardens Point has 10 queries: one query is 0.1.",
        "",
        head,
        "|" + "---|" * (10 + len(ws)),
    ]
    for r in rows:
        set_ = r["set"].split()[0]
        vgg = VGG_RERANKED.get(set_, {}).get(r["matcher"])
        fused = " | ".join(f"{r[f'fused{w}']['1']:.3f}" if f"fused{w}" in r else "" for w in ws)
        lines.append(
            f"| {set_} | {r['size'][1]}x{r['size'][0]} | {r['layer']} | {r['k']} | {r['fit']} | "
            f"{','.join(map(str, r['windows']))} | {r['matcher']} | {r.get('top_n', '')} | "
            f"{'' if vgg is None else f'{vgg:.3f}'} | {r['global']['1']:.3f} | {fused} |"
        )
    write_page(path, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merge", nargs="+", default=None, help="only merge these JSONs into the docs' .md and .json")
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data"))
    ap.add_argument("--cache", default=str(ROOT / "out" / "dinov2_sweep"))
    ap.add_argument("--docs", default=str(RESULTS))
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)))
    ap.add_argument("--sizes", default=",".join(f"{h}x{w}" for h, w in SIZES), help="input sizes HxW (multiples of 14)")
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--windows", default=",".join(map(str, WINDOWS)))
    ap.add_argument("--fits", default="corridor,own")
    ap.add_argument("--ransac", action="store_true", help="also RANSAC with the performance preset's windows")
    ap.add_argument("--ransac-top", type=int, default=20, help="candidates RANSAC re-ranks (default 20, as the node)")
    ap.add_argument("--sets", default="", help="evaluate only these sets (comma-separated keys, e.g. gardenspoint10)")
    a = ap.parse_args()
    if a.merge:
        runs = [json.loads(Path(f).read_text()) for f in a.merge]
        write_json(Path(a.docs, "dinov2_patch_sweep.json"), {"runs": runs})
        write_md(runs, Path(a.docs) / "dinov2_patch_sweep.md")
        return
    cache = Path(a.cache)
    torch.manual_seed(SEED)
    vit = load_dinov2()
    t0 = time.time()
    data = list(sets(Path(a.data)))
    rows = []
    for size in [tuple(int(v) for v in x.split("x")) for x in a.sizes.split(",")]:
        per_set = {}
        for name, db_imgs, q_imgs, gt_path, role in data:
            imgs = list(db_imgs) + list(q_imgs)
            key = name.split()[0]
            maps = token_cache(vit, imgs, size, cache / key)
            sizes = [load_image(p).size for p in imgs]
            names = image_identities(imgs)
            if gt_path is None:
                gt = GroundTruth([{i} for i in range(len(q_imgs))])
            else:
                gt = load_ground_truth(gt_path, names[len(db_imgs) :], names[: len(db_imgs)])
            per_set[key] = (maps, sizes, len(db_imgs), gt, role)
        corridor_key = next(k for k in per_set if k.startswith(CORRIDOR))
        jobs = list(
            itertools.product(
                [int(x) for x in a.layers.split(",")], [int(x) for x in a.ks.split(",")], a.fits.split(",")
            )
        )
        for layer, k, fit in tqdm(jobs, desc="configs", unit="cfg"):
            fitted = {}
            for key, (maps, sizes, n_db, gt, role) in per_set.items():
                if a.sets and key not in a.sets.split(","):
                    continue
                src = per_set[corridor_key][0][layer] if fit == "corridor" else maps[layer][:n_db]
                if fit == "own" and key == corridor_key:
                    src = maps[layer][:n_db]
                cache_key = ("corridor",) if fit == "corridor" else (key,)
                if cache_key not in fitted:
                    if src.shape[0] < 10:  # too few images for a vocabulary: fit on db + queries? no: say so
                        fitted[cache_key] = None
                    else:
                        fitted[cache_key] = fitted_model(src, k, layer, size)
                model = fitted[cache_key]
                if model is None:
                    continue
                windows = tuple(int(x) for x in a.windows.split(","))
                all_w = tuple(sorted(set(windows) | ({2, 5, 8} if a.ransac else set())))
                feats = features(model, maps[layer], all_w, sizes)
                top_n = min(100, n_db)
                for wsize in windows:
                    i = all_w.index(wsize)
                    sub = [PlaceFeatures(f.global_desc, [f.patches[i]], f.image_size) for f in feats]
                    pr = preset_for("speed", size, (wsize,), "rapid")
                    r = evaluate(sub[:n_db], sub[n_db:], gt, pr, top_n)
                    rows.append(
                        {
                            "set": key,
                            "role": role,
                            "size": list(size),
                            "layer": layer,
                            "k": k,
                            "fit": fit,
                            "windows": [wsize],
                            "matcher": "rapid",
                            "top_n": top_n,
                            **r,
                        }
                    )
                    tqdm.write(json.dumps(rows[-1]))
                if a.ransac:
                    idx = [all_w.index(s) for s in (2, 5, 8)]
                    sub = [PlaceFeatures(f.global_desc, [f.patches[i] for i in idx], f.image_size) for f in feats]
                    pr = preset_for("performance", size, (2, 5, 8), "ransac")
                    r = evaluate(sub[:n_db], sub[n_db:], gt, pr, min(a.ransac_top, n_db))
                    rows.append(
                        {
                            "set": key,
                            "role": role,
                            "size": list(size),
                            "layer": layer,
                            "k": k,
                            "fit": fit,
                            "windows": [2, 5, 8],
                            "matcher": "ransac",
                            "top_n": min(a.ransac_top, n_db),
                            **r,
                        }
                    )
                    tqdm.write(json.dumps(rows[-1]))
            out = Path(a.docs) / "dinov2_patch_sweep.json"
            out.write_text(
                json.dumps({"generated": utc_now(), "wall_s": round(time.time() - t0), "rows": rows}, indent=1)
            )
            write_md([json.loads(out.read_text())], Path(a.docs) / "dinov2_patch_sweep.md")


if __name__ == "__main__":
    main()
