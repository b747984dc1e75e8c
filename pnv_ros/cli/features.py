"""``pnv extract`` and ``pnv match``: features of images, retrieval (``pnv match-two``: cli.match_two)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from pnv_ros.cli import match_two
from pnv_ros.cli.common import (
    COUNT,
    FAST_PRODUCTS_HELP,
    POSITIVE,
    Number,
    add_common_options,
    open_extractor,
    preset_of,
)


def register(sub: Any) -> None:
    """Add extract, match and match-two to the ``pnv`` subparsers ``sub``."""
    _register_extract(sub)
    _register_match(sub)
    match_two.register(sub)


def _register_extract(sub: Any) -> None:
    sp = sub.add_parser(
        "extract",
        help="images to a features .npz",
        description=(
            "Extract global and patch descriptors. Writes an .npz (never pickled) with names, global (N x D), "
            "patches_pS (N x P x D), keypoints_pS (P x 2, x y in network-input pixels; scale by image_sizes / "
            "input size for original pixels), image_sizes (N x 2) and meta (JSON: preset, model id)."
        ),
    )
    add_common_options(sp)
    sp.add_argument("--out", required=True, help="output features file (.npz)")
    sp.add_argument(
        "images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (numeric names in frame order)"
    )
    sp.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    """Extract the images' features into one .npz."""
    from pnv_ros.images import image_identities, list_images
    from pnv_ros.storage import check_output

    check_output(args.out, what="--out", inputs=args.images)
    preset = preset_of(args)
    paths = list_images(args.images)
    image_identities(paths)  # a file given twice fails now, not after the extraction
    ex = open_extractor(args, preset)
    t0 = time.perf_counter()
    fs = ex.extract_set(paths, progress=not args.quiet)
    dt = time.perf_counter() - t0
    fs.save(args.out)
    print(f"wrote {args.out}: {len(fs)} images, {fs.dim}-d, preset {preset.name}, {dt / len(fs):.2f} s/image")
    return 0


def add_gt_csv_options(sp: argparse.ArgumentParser) -> None:
    """--gt-positives and --gt-index-base: how a ground-truth CSV reads (pnv match, pnv eval)."""
    sp.add_argument(
        "--gt-positives",
        choices=["names", "indices"],
        default=None,
        help="how a GT CSV's bare 'positives' column reads (positive_names/_indices say it)",
    )
    sp.add_argument(
        "--gt-index-base",
        type=Number(int, 0, 1),
        default=None,
        help="GT CSV indices count from 0 or 1 (default: the file numbers a query_file column pairs with "
        "query_index, else 0)",
    )


def _register_match(sub: Any) -> None:
    sp = sub.add_parser(
        "match",
        help="two-stage retrieval of queries against a database",
        description=(
            "Global FAISS search (flat L2), then patch re-ranking of the top N. Writes JSON with per-query "
            "stage-1 and re-ranked database names and scores, and Recall@N with --gt."
        ),
    )
    add_common_options(sp, model=False)
    sp.add_argument("--db", required=True, help="database features (.npz from pnv extract)")
    sp.add_argument("--queries", required=True, help="query features (.npz from pnv extract)")
    sp.add_argument("--top-n", type=COUNT, default=None, help="candidates to re-rank, 1.. (default: preset's, 100)")
    sp.add_argument("--matcher", choices=["ransac", "rapid"], default=None, help="override the preset's matcher")
    sp.add_argument("--fast-products", action="store_true", help=FAST_PRODUCTS_HELP)
    sp.add_argument(
        "--gt", default=None, help="ground truth: matrix (.npy/.bmp/.png), CSV of positives, or CSV of positions"
    )
    sp.add_argument("--gt-radius", type=POSITIVE, default=None, help="positive radius for a positions CSV")
    add_gt_csv_options(sp)
    sp.add_argument("--out", required=True, help="result JSON")
    sp.set_defaults(func=cmd_match)


def cmd_match(args: argparse.Namespace) -> int:
    """Retrieve and re-rank each query against the database; write the results (and recall with --gt)."""
    from pnv_ros.storage import check_output, to_json, write_text_atomic

    check_output(args.out, what="--out", inputs=[args.db, args.queries] + ([args.gt] if args.gt else []))
    from pnv_ros.config import load_preset
    from pnv_ros.eval.ground_truth import N_VALUES, load_ground_truth, recall_at_n
    from pnv_ros.features import FeatureSet
    from pnv_ros.retrieval import two_stage

    db = FeatureSet.load(args.db)
    qs = FeatureSet.load(args.queries)
    preset = load_preset(args.preset or "speed", args.config) if (args.preset or args.config) else db.preset
    if db.preset.backbone != preset.backbone:  # a model with its own backbone and input size (DINOv2)
        preset = dataclasses.replace(
            preset,
            backbone=db.preset.backbone,
            image_height=db.preset.image_height,
            image_width=db.preset.image_width,
        )
    if preset.global_weight == 0.0 and db.preset.global_weight:  # the model's re-ranking order, as extracted
        preset = dataclasses.replace(preset, global_weight=db.preset.global_weight)
    if not preset.selects_patches and db.preset.selects_patches:  # the patches the files kept, as extracted
        preset = dataclasses.replace(preset, patch_keep=db.preset.patch_keep)
    gt = None
    if args.gt:
        gt = load_ground_truth(
            args.gt,
            qs.names,
            db.names,
            args.gt_radius,
            positives_as=args.gt_positives,
            index_base=args.gt_index_base,
        )
    t0 = time.perf_counter()
    results = two_stage(
        db, qs, preset, top_n=args.top_n, matcher=args.matcher, progress=not args.quiet, exact=not args.fast_products
    )
    dt = time.perf_counter() - t0
    out: dict[str, Any] = {
        "db": str(args.db),
        "queries_file": str(args.queries),
        "preset": preset.to_dict(),
        "matcher": args.matcher or preset.matcher.value,
        "top_n": args.top_n if args.top_n is not None else preset.top_n,
        "model_id": db.model_id,
        "seconds_per_query": dt / max(1, len(qs)),
        "queries": [
            {
                "query": qs.names[i],
                "global": [db.names[j] for j in r.global_ids],
                "global_distances": [round(float(d), 6) for d in r.global_dists],
                "reranked": [db.names[j] for j in r.reranked_ids],
                "scores": [round(float(s), 6) for s in r.scores],
            }
            for i, r in enumerate(results)
        ],
    }
    if gt is not None:
        out["recall"] = {
            "global": {str(k): v for k, v in recall_at_n([r.global_ids for r in results], gt, N_VALUES).items()},
            "reranked": {str(k): v for k, v in recall_at_n([r.reranked_ids for r in results], gt, N_VALUES).items()},
            "queries_with_positives": int(gt.has_positive().sum()),
        }
    write_text_atomic(args.out, to_json(out))
    print(f"wrote {args.out}: {len(qs)} queries against {len(db)} images, {dt / max(1, len(qs)):.3f} s/query")
    if gt is not None:
        for stage in ("global", "reranked"):
            r = out["recall"][stage]
            print(f"  {stage:9s} " + "  ".join(f"R@{k}={v:.3f}" for k, v in r.items()))
    return 0
