"""``pnv models``: list, download, build and refit models; the refit shared with ``pnv add-pca``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pnv_ros.cli.common import Number, StageBars, model_path
from pnv_ros.errors import PnvError

_BUILD_DESCRIPTION = (
    "Builds offline from the pinned PyPI wheel (hash-checked); the vocabulary and PCA are fitted on --fit images: "
    "the repository's corridor set by default, or a robot's own map images (AnyLoc's advice: fit on the "
    "environment). The same inputs give the same file on the same CPU (another CPU rounds the backbone's floats "
    "differently: a different file; move maps with their model file)."
)
_REFIT_DESCRIPTION = (
    "Keeps MODEL's backbone and its choices (VGG-16: 480x640 input; DINOv2: layer, facet, input size) and refits "
    "its NetVLAD vocabulary (seeded k-means) and whitening PCA on your images, as AnyLoc advises (fit on the "
    "environment). Writes a model file of the same family and a metadata JSON beside it (NAME.pth.tar -> "
    "NAME.json); the same inputs on the same CPU give the same file. Use it with --checkpoint FILE."
)


def register(sub: Any) -> None:
    """Add ``models`` (list, download, build, refit, build-default) to the ``pnv`` subparsers ``sub``."""
    sp = sub.add_parser("models", help="list, download or build checkpoints")
    msub = sp.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    m = msub.add_parser("list", help="official checkpoints and the default model, and which are present")
    m.set_defaults(func=cmd_models_list, quiet=False)
    m = msub.add_parser("download", help="download official checkpoints (resumable, checksum-checked)")
    m.add_argument("name", nargs="?", help="model name (see list)")
    m.add_argument("--all", action="store_true", help="all six")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_models_download)
    m = msub.add_parser(
        "build",
        help="build an offline model: dinov2_vlad (DINOv2 ViT-S/14 + VLAD, ~2 min)",
        description=_BUILD_DESCRIPTION,
    )
    m.add_argument("name", choices=["dinov2_vlad"], help="the model to build")
    m.add_argument("--fit", nargs="+", default=None, help="fitting image folders (default: the repo's corridor set)")
    m.add_argument("--out", default=None, help="model file to write (default: the cache, as NAME resolves)")
    m.add_argument("--force", action="store_true", help="rebuild even if present")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_models_build)
    m = msub.add_parser(
        "refit",
        help="refit a model's vocabulary and whitening PCA on images of your environment",
        description=_REFIT_DESCRIPTION,
    )
    m.add_argument(
        "model", metavar="MODEL", help="the model to refit: default, dinov2_vlad, an official model's name, or a file"
    )
    add_fitting_inputs(m, " of the environment")
    m.add_argument(
        "--clusters", type=Number(int, 2, 1024), default=None, help="vocabulary size K (default: the model's)"
    )
    m.add_argument(
        "--dims",
        type=Number(int, 1, 65536),
        default=None,
        help="output dimensions of the whitening PCA (default: the model's)",
    )
    m.set_defaults(func=cmd_models_refit)
    m = msub.add_parser("build-default", help="build the offline default model from registry weights (~5 min)")
    m.add_argument("--fit", nargs="+", default=None, help="fitting image folders (default: the repo's corridor set)")
    m.add_argument("--force", action="store_true", help="rebuild even if present")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_models_build)


def cmd_models_list(args: argparse.Namespace) -> int:
    """Print the model cache and which models are present."""
    from pnv_ros.model import registry

    print(f"cache: {registry.models_dir()}")
    d = registry.default_checkpoint_path()
    print(
        f"  {'default (offline-built)':24s}  512-d  VGG-16 + NetVLAD, offline-built     "
        + ("present" if d.is_file() else "not built: pnv models build-default")
    )
    for name in registry.BUILT_MODELS:
        have = registry.built_model_path(name).is_file()
        print(
            f"  {name:24s}  512-d  DINOv2 ViT-S/14 + VLAD, offline-built "
            + ("present" if have else f"not built: pnv models build {name}")
        )
    for m in registry.OFFICIAL_MODELS.values():
        have = (registry.models_dir() / m.filename).is_file()
        print(
            f"  {m.name:24s} {m.dim:4d}-d  {m.trained_on:15s} ~{m.approx_mb} MB  "
            + ("present" if have else "not downloaded")
        )
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    """Download one official model, or all of them."""
    from pnv_ros.model import registry

    if not args.all and not args.name:
        raise PnvError("give a model name or --all (see 'pnv models list')")
    names = list(registry.OFFICIAL_MODELS) if args.all else [args.name]
    for n in names:
        print(f"downloaded {registry.download(n, progress=not args.quiet)}")
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    """``models build NAME`` and ``models build-default``: build an offline model from pinned weights."""
    from pnv_ros.images import list_images
    from pnv_ros.model import registry
    from pnv_ros.model.default_model import build_default_model, find_fitting_set
    from pnv_ros.model.dinov2_vlad import build_dinov2_vlad

    default = args.models_cmd == "build-default"
    name = "default model" if default else args.name
    given = getattr(args, "out", None)
    if given:
        out = Path(given)
    else:
        out = registry.default_checkpoint_path() if default else registry.built_model_path(args.name)
    if out.is_file() and not args.force and not given:
        print(f"{name} present: {out} (--force rebuilds)")
        return 0
    # --fit, else the corridor set: source tree, pip's share/, then the ament index (colcon).
    fit = [Path(p) for p in args.fit] if args.fit else find_fitting_set()
    images = list_images(fit)
    bars = StageBars(args.quiet)
    t0 = time.perf_counter()
    build = build_default_model if default else build_dinov2_vlad
    path = build(images, out, fit_set_name=", ".join(str(p) for p in fit), progress=bars.update)
    bars.close()
    print(f"built {path} in {time.perf_counter() - t0:.0f} s from {len(images)} fitting images")
    return 0


def cmd_models_refit(args: argparse.Namespace) -> int:
    """Refit a model's vocabulary and whitening PCA on images of the environment."""
    return refit(args)


def add_fitting_inputs(p: argparse.ArgumentParser, of: str) -> None:
    """The image options of the commands that fit a model on images (``models refit``, ``add-pca``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="DIR", help=f"folders (or files) of images{of}")
    src.add_argument("--bag", metavar="BAG", help=f"a ROS 1 or ROS 2 bag{of}")
    p.add_argument("--topic", default=None, help="the bag's image topic (default: its only one)")
    p.add_argument("--out", required=True, help="model file to write (NAME.pth.tar; NAME.json beside it)")
    p.add_argument(
        "--max-images",
        type=Number(int, 10, 1_000_000),
        default=None,
        help="use at most this many evenly spaced images or frames (default 300: time and memory grow with each)",
    )
    p.add_argument(
        "--bit-depth",
        type=Number(int, 1, 16),
        default=None,
        help="significant bits of the bag's 16-bit frames (default: as pnv extract)",
    )
    p.add_argument("-q", "--quiet", action="store_true")


def refit(args: argparse.Namespace, *, keep_vocabulary: bool = False) -> int:
    """``pnv models refit`` (vocabulary and WPCA) and ``pnv add-pca`` (the WPCA only, ``keep_vocabulary``)."""
    import json

    from pnv_ros.model import refit as fitting
    from pnv_ros.storage import check_output

    if (args.topic or args.bit_depth) and not args.bag:
        raise PnvError("--topic and --bit-depth apply to --bag only")
    src = model_path(args.model)
    check_output(args.out, what="--out", inputs=[src])  # before the images are looked at
    n = args.max_images or fitting.MAX_IMAGES
    if args.bag:
        images = fitting.bag_images(Path(args.bag), args.topic, max_images=n, bit_depth=args.bit_depth)
    else:
        images = fitting.folder_images([Path(p) for p in args.images], n)
    bars = StageBars(args.quiet)
    t0 = time.perf_counter()
    try:
        out = fitting.refit_model(
            src,
            images,
            Path(args.out),
            num_clusters=getattr(args, "clusters", None),
            num_pcs=args.dims,
            progress=bars.update,
            keep_vocabulary=keep_vocabulary,
            patches_per_image=getattr(args, "patches_per_image", None),
        )
    finally:
        bars.close()
    meta = json.loads(fitting.metadata_path(out).read_text())
    f = meta["fitting"]
    skipped = f", {f['undecodable']} undecodable skipped" if f["undecodable"] else ""
    what = "given a whitening PCA fitted" if keep_vocabulary else "refitted"
    print(
        f"wrote {out} in {time.perf_counter() - t0:.0f} s: {src.name} {what} on {f['images']} images "
        f"({f['source']['sampled']} of {f['source']['available']} sampled{skipped}), {meta['num_clusters']} words, "
        f"{meta['dim']} dimensions; use it with --checkpoint {out}"
    )
    return 0
