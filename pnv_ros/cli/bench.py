"""``pnv bench``: this project's in-process costs (extraction, re-ranking, global search, memory)."""

from __future__ import annotations

import argparse
from typing import Any

from pnv_ros.cli.common import COUNT, FAST_PRODUCTS_HELP, Number, add_common_options, open_extractor, preset_of


def register(sub: Any) -> None:
    """Add ``bench`` to the ``pnv`` subparsers ``sub``."""
    sp = sub.add_parser("bench", help="this project's in-process costs (medians)")
    add_common_options(sp)
    sp.add_argument("--out", required=True, help="BENCH.json")
    sp.add_argument("--top-n", type=COUNT, default=100, help="candidates re-ranked per query (batched)")
    sp.add_argument("--repeats", type=Number(int, 1, 1000), default=3, help="timed repeats (median reported)")
    sp.add_argument("--fast-products", action="store_true", help=FAST_PRODUCTS_HELP)
    sp.add_argument("images", nargs="+", metavar="IMAGE")
    sp.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time the extractor and the matcher on the images; write the medians as JSON."""
    from pnv_ros.images import list_images
    from pnv_ros.storage import check_output, to_json, write_text_atomic

    check_output(args.out, what="--out", inputs=args.images)
    from pnv_ros.bench import run_bench

    ex = open_extractor(args, preset_of(args))
    preset = ex.preset
    res = run_bench(ex, list_images(args.images), top_n=args.top_n, repeats=args.repeats, exact=not args.fast_products)
    write_text_atomic(args.out, to_json(res))
    search = ", ".join(f"{v:.2f} ms @ {k}" for k, v in res["global_search_ms_by_map_size"].items())
    print(
        f"{preset.name} on {res['device']} ({res['engine']} {res['precision']}): "
        f"{res['seconds_per_image']:.3f} s/image, "
        f"{res['ms_per_candidate']:.2f} ms/candidate ({res['matcher']}, {res['products']} products, "
        f"top {args.top_n} batched), "
        f"global search {search}, "
        f"{res['bytes_per_keyframe'] / 1e6:.2f} MB/keyframe ({res['patch_dtype']}); wrote {args.out}"
    )
    return 0
