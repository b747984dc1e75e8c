"""The two model families side by side: VGG-16 (the offline default) and dinov2_vlad.

In one run, for both models, on every shared set:

- retrieval Recall@1/5 with both stages (global, re-ranked) and both presets (speed: rapid
  spatial scoring; performance: RANSAC), the sets split as ``eval_default_model.sets`` splits them;
- sequences through the detector: ``pnv eval`` (in-process, default detector settings and what
  ``run_all.sh`` step 3 passes) on the bags of ``sequence_sets.py`` + ``pnv bag make``;
- costs: extraction time per image and re-ranking time per query (medians; the two models
  alternate image by image and query by query, so their ratio is fair on a busy machine), and
  bytes per keyframe per preset as the node stores them (float16 patches, as ``pnv bench`` counts them).

Writes docs/results/model_families.json, .md and .png (``--docs``); bags and runs under ``--out``.

    .venv/bin/python benchmarks/model_families.py [--data ../shared/data] [--out out/model_families] [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, header, write_json
from common import write_md as write_page
from eval_default_model import scale_only, sets
from tqdm import tqdm

from pnv_ros import cli  # noqa: E402
from pnv_ros.bench import stored_candidates  # noqa: E402
from pnv_ros.engines.spec import RuntimeSpec  # noqa: E402
from pnv_ros.eval.ground_truth import GroundTruth, load_ground_truth, recall_at_n  # noqa: E402
from pnv_ros.extract import open_extractor  # noqa: E402
from pnv_ros.features import FeatureSet  # noqa: E402
from pnv_ros.images import image_identities  # noqa: E402
from pnv_ros.model.registry import resolve_checkpoint  # noqa: E402
from pnv_ros.retrieval import two_stage  # noqa: E402

ROOT = REPO
#: (key, label, --checkpoint value: None = the VGG-16 default)
MODELS = [("vgg16", "VGG-16 default", None), ("dinov2_vlad", "DINOv2 VLAD", "dinov2_vlad")]
PRESETS = (("speed", "rapid"), ("performance", "ransac"))
SEQUENCES = ("rtabmap_loop84", "corridor", "gardenspoint10")
#: the fitting set of both models (vocabulary, WPCA): `pnv models build(-default)` default, data/corridor_vprbench
FITTING = "corridor"
BENCH_IMAGES = ["data/rtabmap_samples_loop84/images/1.jpg"]


def one(fs: FeatureSet, i: int) -> FeatureSet:
    """Image i of a FeatureSet as a one-image FeatureSet (a query timed on its own)."""
    return FeatureSet(
        [fs.names[i]],
        fs.global_descs[i : i + 1],
        [p[i : i + 1] for p in fs.patches],
        fs.image_sizes[i : i + 1],
        fs.preset,
        fs.model_id,
    )


def med(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def retrieval(models: dict, identities: dict[str, str], data: Path, partial: Path | None = None) -> list[dict]:
    """Recall per set, stage, preset and model; per-image and per-query times, models alternating.
    ``partial``: rows of finished sets are kept there, and read back (``--resume``) when they name ``identities``."""
    done = {r["set"]: r for r in json.loads(partial.read_text())} if partial and partial.is_file() else {}
    rows = []
    for name, db_imgs, q_imgs, gt_path, role in sets(data):
        if name in done and done[name].get("identities") == identities:
            tqdm.write(f"{name}: resumed from {partial}")
            rows.append(done[name])
            continue
        if name in done:
            tqdm.write(f"{name}: {partial} holds another model's rows ({done[name].get('identities')}): re-running")
        if FITTING in name and role != "FITTING SET":
            raise RuntimeError(f"{name}: eval_default_model no longer marks the fitting set")
        imgs = list(db_imgs) + list(q_imgs)
        places: dict[str, list] = {k: [] for k in models}
        t_img: dict[str, list[float]] = {k: [] for k in models}
        for p in tqdm(imgs, desc=f"extract {name.split()[0]}", unit="img"):
            for k, m in models.items():  # alternate: both models see the same load
                t = time.perf_counter()
                places[k].append(m["perf"].extract_one(p))
                t_img[k].append(time.perf_counter() - t)
        names = image_identities(imgs)
        feats = {}
        for k, m in models.items():
            fs = FeatureSet.from_places(names, places[k], m["perf"].preset, m["perf"].info.identity)
            idx = np.arange(len(imgs))
            sub = [
                FeatureSet(
                    [names[i] for i in ii],
                    fs.global_descs[ii],
                    [p[ii] for p in fs.patches],
                    fs.image_sizes[ii],
                    fs.preset,
                    fs.model_id,
                )
                for ii in (idx[: len(db_imgs)], idx[len(db_imgs) :])
            ]
            feats[k] = sub
        del places
        db_names, q_names = feats["vgg16"][0].names, feats["vgg16"][1].names
        if gt_path is None:  # same index = same place (as eval_default_model)
            gt = GroundTruth([{i} for i in range(len(q_imgs))])
        else:
            gt = load_ground_truth(gt_path, q_names, db_names)
        top_n = min(100, len(db_imgs))
        row = {
            "set": name,
            "role": role,
            "queries": int(gt.has_positive().sum()),
            "db": len(db_imgs),
            "top_n": top_n,
            "identities": identities,
            "models": {
                k: {"extract_s_per_image_median": med(t_img[k]), "extract_s_per_image": [round(t, 4) for t in t_img[k]]}
                for k in models
            },
        }
        for pname, matcher in PRESETS:
            res: dict[str, list] = {k: [] for k in models}
            t_q: dict[str, list[float]] = {k: [] for k in models}
            pairs = {}
            for k, m in models.items():
                db, q = feats[k]
                pr = m["perf"].preset if pname == "performance" else m["speed"].preset  # effective presets
                pairs[k] = (db, q, pr) if pname == "performance" else (scale_only(db, pr), scale_only(q, pr), pr)
            for i in tqdm(range(len(q_imgs)), desc=f"re-rank {pname} {name.split()[0]}", unit="query"):
                for k in models:
                    db, q, pr = pairs[k]
                    t = time.perf_counter()
                    (r,) = two_stage(db, one(q, i), pr, top_n=top_n, matcher=matcher)
                    t_q[k].append(time.perf_counter() - t)
                    res[k].append(r)
            for k in models:
                mr = row["models"][k]
                mr["global"] = recall_at_n([r.global_ids for r in res[k]], gt, (1, 5, 10))
                mr[f"reranked_{pname}"] = recall_at_n([r.reranked_ids for r in res[k]], gt, (1, 5, 10))
                mr[f"rerank_ms_per_query_median_{pname}"] = 1000 * med(t_q[k])
                mr[f"rerank_ms_per_query_{pname}"] = [round(1000 * t, 2) for t in t_q[k]]
        tqdm.write(
            json.dumps(
                {
                    "set": name,
                    **{k: {x: v for x, v in m.items() if not isinstance(v, list)} for k, m in row["models"].items()},
                }
            )
        )
        rows.append(row)
        if partial:
            partial.write_text(json.dumps(rows))
    return rows


def sequences(data: Path, out: Path, identities: dict[str, str], resume: bool = False) -> list[dict]:
    """run_all.sh step 3 for each model: sequence_sets.py, pnv bag make (cached), pnv eval in-process.
    ``resume`` keeps a finished run only when its metrics.json names the model in ``identities`` (key -> identity)."""
    seq = out / "sequences"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sequence_sets.py"), "--data", str(data), "--out", str(seq)],
        check=True,
    )
    rows = []
    jobs = [(s, k, c) for s in SEQUENCES if (seq / s).is_dir() for k, _, c in MODELS]
    for s, k, ck in tqdm(jobs, desc="pnv eval", unit="run"):
        bag = seq / s / "bag"
        if not (bag / "metadata.yaml").is_file():
            if bag.exists():
                raise RuntimeError(f"{bag} is an unfinished bag: remove it")
            rc = cli.main(["bag", "make", str(seq / s / "images"), "--out", str(bag)])
            if rc:
                raise RuntimeError(f"pnv bag make {seq / s / 'images'} failed ({rc})")
        run = out / "runs" / s / k
        argv = ["eval", "-q", str(bag), "--gt", str(seq / s / "gt.npy"), "--out", str(run), "--force"]
        argv += ["--checkpoint", ck] if ck else []
        done = resume and (run / "metrics.json").is_file()
        if done and json.loads((run / "metrics.json").read_text()).get("model") != identities[k]:
            tqdm.write(f"{run}: another model's run ({identities[k]} expected): re-running")
            done = False
        rc = 0 if done else cli.main(argv)
        if rc:
            raise RuntimeError(f"pnv {' '.join(argv)} failed ({rc})")
        m = json.loads((run / "metrics.json").read_text())
        at = m["at_threshold"]
        rows.append(
            {
                "sequence": s,
                "model": k,
                "command": "pnv " + " ".join(argv),
                "frames": m["frames"],
                "keyframes": m["keyframes"],
                "threshold": m["threshold"],
                "precision": at["precision"],
                "recall": at["recall"],
                "f1": at["f1"],
                "average_precision": m["average_precision"],
                "recall_at_100_precision": m["recall_at_100_precision"],
                "retrieval_recall_at_n": m["retrieval_recall_at_n"],
                "extract_p50_ms": m["latency"]["extract"]["p50_ms"],
                "rerank_p50_ms": m["latency"]["rerank"]["p50_ms"],
                "map_bytes_per_keyframe": m["map_bytes_per_keyframe"],
                "preset": m["preset"]["name"],
                "model_id": m["model"],
            }
        )
    return rows


def storage(models: dict) -> dict:
    """Bytes per keyframe as the node stores them (float16 patches; pnv_ros.bench.stored_candidates)."""
    img = ROOT / BENCH_IMAGES[0]
    out: dict = {}
    for pname, _ in PRESETS:
        for k, m in models.items():
            ex = m["perf" if pname == "performance" else "speed"]
            pmap, _ = stored_candidates(ex.extract([img]), ex.dim, ex.preset, ex.info.identity, 1)
            out.setdefault(pname, {})[k] = {
                "bytes_per_keyframe": pmap.nbytes_per_keyframe(),
                "patch_dtype": pmap.patch_dtype.name,
                "patches_per_keyframe": sum(ex.preset.num_patches(i) for i in range(len(ex.preset.patch_sizes))),
            }
    return out


def _r(d: dict, n: int) -> str:
    return f"{d[str(n)]:.3f}"


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def write_md(res: dict, path: Path) -> None:
    m = res["machine"]
    keys = [k for k, _, _ in MODELS]
    lab = {k: lb for k, lb, _ in MODELS}
    L = [
        "# Model families: VGG-16 default vs dinov2_vlad",
        "",
        f"Generated by `{res['command']}` on {res['date']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), Python {m['python']}, "
        f"torch {m['torch']}; load average {m['load_avg_start'][0]:.1f} at the start, "
        f"{m['load_avg_end'][0]:.1f} at the end (a shared machine: absolute times move, the ratios come from "
        "one run with the two models alternating image by image and query by query).",
        "",
        "Models: "
        + "; ".join(
            f"**{lab[k]}** `{res['models'][k]['identity']}` "
            f"({res['models'][k]['input']}, {res['models'][k]['backbone']})"
            for k in keys
        )
        + ". Both are fitted (vocabulary and WPCA) on **corridor_vprbench** (ref + query, 222 images): "
        "its rows are the fitting set, not a hold-out.",
        "",
        "## Retrieval Recall@1 / @5",
        "",
        "Speed preset: patch size 5, rapid spatial scoring; performance preset: patch sizes 2, 5, 8, RANSAC. "
        "Top-N re-ranked = min(100, database).",
        "",
        "| set | role | queries / db | stage | " + " | ".join(f"{lab[k]} R@1 / R@5" for k in keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for row in res["retrieval"]:
        for stage, sl in (
            ("global", "global"),
            ("reranked_speed", "re-ranked, speed (rapid)"),
            ("reranked_performance", "re-ranked, performance (RANSAC)"),
        ):
            cells = [f"{_r(row['models'][k][stage], 1)} / {_r(row['models'][k][stage], 5)}" for k in keys]
            role = "**fitting set**" if row["role"] == "FITTING SET" else row["role"]
            L.append(f"| {row['set']} | {role} | {row['queries']} / {row['db']} | {sl} | " + " | ".join(cells) + " |")
    L += [
        "",
        "## Sequences through the detector (`pnv eval`, in-process)",
        "",
        "Bags from `benchmarks/sequence_sets.py` + `pnv bag make` (1 Hz); `pnv eval -q BAG --gt gt.npy "
        "[--checkpoint dinov2_vlad]`: speed preset, default detector settings (threshold 0.12, top 20, "
        "exclude recent 10 s). Precision / recall at the threshold; AP = area under the PR curve; "
        "R@100%P = recall at 100 % precision. corridor is the fitting set of both models.",
        "",
        "| sequence | frames | model | precision | recall | AP | R@100%P | extract p50 | re-rank p50 (top 20) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for s in res["sequences"]:
        undefined = s["recall"] is None  # no keyframe had a positive it could return: AP, R@100%P mean nothing
        ap, r100 = (None, None) if undefined else (s["average_precision"], s["recall_at_100_precision"])
        L.append(
            f"| {s['sequence']} | {s['frames']} | {lab[s['model']]} | {_f(s['precision'])} | "
            f"{_f(s['recall'])} | {_f(ap)} | {_f(r100)} | "
            f"{s['extract_p50_ms']:.0f} ms | {s['rerank_p50_ms']:.1f} ms |"
        )
        if undefined and s["sequence"] not in notes:
            notes.append(s["sequence"])
    for s in notes:
        L += [
            "",
            f"{s}: n/a = no keyframe had a revisit the detector could return: every positive lies inside the "
            "exclusion window (default detector settings), so recall, AP and R@100%P are undefined.",
        ]
    a, b = keys
    L += [
        "",
        "## Cost (medians, same run)",
        "",
        f"| measure | {lab[a]} | {lab[b]} | ratio {lab[b]} / {lab[a]} |",
        "|---|---|---|---|",
    ]
    for row in res["retrieval"]:
        x, y = (row["models"][k]["extract_s_per_image_median"] for k in keys)
        L.append(
            f"| extraction per image, performance preset, {row['set'].split()[0]} "
            f"({len(row['models'][a]['extract_s_per_image'])} images) | {1000 * x:.0f} ms | {1000 * y:.0f} ms | {y / x:.2f} |"
        )
    x, y = (med([t for row in res["retrieval"] for t in row["models"][k]["extract_s_per_image"]]) for k in keys)
    n_all = sum(len(row["models"][a]["extract_s_per_image"]) for row in res["retrieval"])
    L.append(
        f"| **extraction per image, performance preset, all {n_all} images** | **{1000 * x:.0f} ms** | "
        f"**{1000 * y:.0f} ms** | **{y / x:.2f}** |"
    )
    for pname, mt in PRESETS:
        for row in res["retrieval"]:
            x, y = (row["models"][k][f"rerank_ms_per_query_median_{pname}"] for k in keys)
            L.append(
                f"| re-ranking per query, {pname} ({mt}), {row['set'].split()[0]}, top {row['top_n']} "
                f"(float32) | {x:.0f} ms | {y:.0f} ms | {y / x:.2f} |"
            )
    for pname, _ in PRESETS:
        bx, by = (res["storage"][pname][k] for k in keys)
        L.append(
            f"| bytes per keyframe, {pname} preset ({bx['patches_per_keyframe']} / {by['patches_per_keyframe']} "
            f"patches, {bx['patch_dtype']}, as the node stores them) | {bx['bytes_per_keyframe'] / 1e6:.2f} MB | "
            f"{by['bytes_per_keyframe'] / 1e6:.2f} MB | {by['bytes_per_keyframe'] / bx['bytes_per_keyframe']:.2f} |"
        )
    for s in SEQUENCES:
        r = {x["model"]: x for x in res["sequences"] if x["sequence"] == s}
        if len(r) == 2:
            x, y = r[a]["extract_p50_ms"], r[b]["extract_p50_ms"]
            L.append(
                f"| `pnv eval` {s}: extraction p50, speed preset (separate runs, not alternating) | "
                f"{x:.0f} ms | {y:.0f} ms | {y / x:.2f} |"
            )
    L += [
        "",
        f"Wall time of the run: {res['wall_s'] / 60:.0f} min. Plot: `model_families.png`; numbers: "
        "`model_families.json`.",
        "",
    ]
    write_page(path, L)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _, _ in MODELS]
    lab = {k: lb for k, lb, _ in MODELS}
    colors = {"vgg16": "tab:blue", "dinov2_vlad": "tab:orange"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    rows = res["retrieval"]
    x = np.arange(len(rows))
    w = 0.2
    for j, (k, pname) in enumerate((k, p) for k in keys for p, _ in PRESETS):
        v = [r["models"][k][f"reranked_{pname}"]["1"] for r in rows]
        bars = ax.bar(
            x + (j - 1.5) * w,
            v,
            w,
            color=colors[k],
            hatch="//" if pname == "speed" else None,
            edgecolor="white",
            label=f"{lab[k]}, {pname}",
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(
        x,
        [r["set"].replace(" (", "\n(") + ("\n[fitting set]" if r["role"] == "FITTING SET" else "") for r in rows],
        fontsize=8,
    )
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("re-ranked Recall@1")
    ax.set_title("Retrieval: re-ranked Recall@1 (hatched: speed/rapid, solid: performance/RANSAC)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    seqs = [s for s in SEQUENCES if any(r["sequence"] == s for r in res["sequences"])]
    xs = np.arange(len(seqs))
    for j, k in enumerate(keys):
        runs = [next(r for r in res["sequences"] if r["sequence"] == s and r["model"] == k) for s in seqs]
        v = [r["average_precision"] if r["recall"] is not None else 0.0 for r in runs]
        bars = bx.bar(xs + (j - 0.5) * 0.35, v, 0.35, color=colors[k], label=lab[k])
        bx.bar_label(
            bars, labels=[f"{x:.2f}" if r["recall"] is not None else "n/a" for x, r in zip(v, runs)], fontsize=7
        )
    bx.set_xticks(xs, [s + ("\n[fitting set]" if s == FITTING else "") for s in seqs], fontsize=8)
    bx.set_ylim(0, 1.3)
    bx.set_ylabel("average precision")
    bx.set_title("Sequences through the detector (pnv eval, speed preset): AP", fontsize=9)
    bx.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default="out/model_families", help="bags and pnv eval runs (bags are reused)")
    ap.add_argument("--docs", default=str(RESULTS), help="where model_families.{json,md,png} go")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep sets and pnv eval runs finished by an interrupted run (timings: alternating per set)",
    )
    ap.add_argument("--from-json", default=None, help="only redraw the .md and .png from this model_families.json")
    a = ap.parse_args()
    docs = Path(a.docs)
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        write_md(res, docs / "model_families.md")
        plot(res, docs / "model_families.png")
        return
    import faulthandler

    faulthandler.enable()  # a crash in native code leaves a traceback in the log
    os.environ.setdefault("PNV_DEBUG", "1")  # a library error in pnv eval shows its traceback
    t0 = time.perf_counter()
    res: dict = header(models={})
    models = {}
    for k, _, ck in MODELS:
        perf = open_extractor(ck, "performance", RuntimeSpec(device="cpu"))
        speed = open_extractor(ck, "speed", RuntimeSpec(device="cpu"))
        info = perf.info
        models[k] = {"perf": perf, "speed": speed}  # .preset: the effective preset (DINOv2 sets backbone, size)
        p = perf.preset
        res["models"][k] = {
            "checkpoint": str(resolve_checkpoint(ck)),
            "identity": info.identity,
            "dim": perf.dim,
            "backbone": p.backbone,
            "input": f"{p.image_width}x{p.image_height}",
            "num_clusters": info.num_clusters,
        }
    res["storage"] = storage(models)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    partial = Path(a.out) / "retrieval_partial.json"
    if not a.resume and partial.exists():
        partial.unlink()
    res["resumed"] = bool(a.resume)
    identities = {k: m["perf"].info.identity for k, m in models.items()}
    res["retrieval"] = retrieval(models, identities, Path(a.data), partial)
    del models
    res["sequences"] = sequences(Path(a.data), Path(a.out), identities, a.resume)
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - t0
    res = json.loads(json.dumps(res))  # Recall@N keys as strings, as in the file
    write_json(docs / "model_families.json", res)
    write_md(res, docs / "model_families.md")
    plot(res, docs / "model_families.png")
    print(f"wrote {docs / 'model_families.md'}, .json, .png in {res['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
