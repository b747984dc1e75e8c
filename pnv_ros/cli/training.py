"""``pnv train`` (the authors' training, CPU-feasible) and ``pnv add-pca`` (a whitening PCA for a model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pnv_ros.cli.common import Number, StageBars, model_path, say
from pnv_ros.cli.models import add_fitting_inputs, refit
from pnv_ros.errors import PnvError

_TRAIN_DESCRIPTION = (
    "Trains the NetVLAD layer (--layers netvlad, the default: a CPU adapts it in minutes; either family, --init "
    "dinov2_vlad included) or conv5 and the NetVLAD layer (--layers conv5: the authors' freezing; VGG-16) of a "
    "model with the authors' triplet loss, hard-negative mining, optimiser and schedule, on cached frozen "
    "features; keeps the checkpoint with the best validation Recall@5 (the last --holdout share of places, never "
    "trained on), fits its whitening PCA (pnv add-pca) and writes OUT in the official format. WORK_DIR holds "
    "checkpoint.pth.tar (--resume), model_best.pth.tar, history.json and training.png."
)
_ADD_PCA_DESCRIPTION = (
    "Keeps CHECKPOINT's backbone and NetVLAD layer (a training checkpoint from pnv train, an official one, or any "
    "model file) and fits the whitening PCA layer on your images: the rule of the authors' add_pca.py, which made "
    "the official WPCA512/WPCA4096 checkpoints, and of pnv's model builders (global VLADs plus 8 patch VLADs per "
    "patch size and image; --patches-per-image 0 gives the authors' global-only samples). Seeded: from the images "
    "the default model was built on (the repo's corridor set, ref then query) it gives the default model's WPCA "
    "bit for bit. Writes the official format and NAME.json beside it."
)

#: Training choices a --resume keeps (the run's own); only --epochs and --dims may change.
_FIXED_ON_RESUME = ("layers", "lr", "batch_size", "negatives", "margin", "holdout", "patience", "seed", "recluster")


def register(sub: Any) -> None:
    """Add ``train`` and ``add-pca`` to the ``pnv`` subparsers ``sub``."""
    _register_train(sub)
    sp = sub.add_parser(
        "add-pca",
        help="fit a whitening PCA to a model and append it (the authors' add_pca.py)",
        description=_ADD_PCA_DESCRIPTION,
    )
    sp.add_argument(
        "model", metavar="CHECKPOINT", help="the model: a file, default, dinov2_vlad or an official model's name"
    )
    add_fitting_inputs(sp, "")
    sp.add_argument(
        "--dims",
        type=Number(int, 1, 65536),
        default=512,
        help="output dimensions (the official models: 512 or 4096; default 512); more images than dimensions / 25 "
        "are needed",
    )
    sp.add_argument(
        "--patches-per-image",
        type=Number(int, 0, 1000),
        default=None,
        help="patch VLAD samples per patch size and image (default 8, the builders'; 0: global VLADs only, as the "
        "authors' add_pca.py)",
    )
    sp.set_defaults(func=cmd_add_pca)


def cmd_add_pca(args: argparse.Namespace) -> int:
    """Fit the whitening PCA of a model on images, keeping its backbone and vocabulary."""
    return refit(args, keep_vocabulary=True)


def _register_train(sub: Any) -> None:
    sp = sub.add_parser(
        "train",
        help="train or adapt a NetVLAD model on your own data (the authors' train.py, CPU-feasible)",
        description=_TRAIN_DESCRIPTION,
    )
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--pairs",
        nargs=2,
        metavar=("REF_DIR", "QUERY_DIR"),
        help="two traversals of the same places, with --gt (the shared sets' layout)",
    )
    src.add_argument("--images", metavar="DIR", help="one image sequence, with --positions")
    src.add_argument("--bag", metavar="BAG", help="a ROS 1 or ROS 2 bag with images and nav_msgs/Odometry")
    src.add_argument("--msls", metavar="ROOT", help="Mapillary SLS (train_val/<city>/{query,database})")
    src.add_argument("--pittsburgh", metavar="ROOT", help="Pittsburgh 30k/250k (datasets/pitts30k_train.mat)")
    sp.add_argument("--gt", help="--pairs' ground truth: a matrix (.npy/.bmp/.png) or CSV, as pnv match --gt")
    sp.add_argument("--positions", help="--images' positions CSV name,x,y[,z] (metres)")
    sp.add_argument("--topic", default=None, help="the bag's image topic (default: its only one)")
    sp.add_argument(
        "--pos-radius",
        type=Number(float, 0.0, None),
        default=10.0,
        help="positives within this distance, metres (default 10, as MSLS)",
    )
    sp.add_argument(
        "--neg-radius",
        type=Number(float, 0.0, None),
        default=25.0,
        help="negatives beyond this distance, metres (default 25, as MSLS)",
    )
    sp.add_argument(
        "--min-gap",
        type=Number(int, 0, None),
        default=None,
        help="sequences: frames this close in order are neither positives nor negatives",
    )
    sp.add_argument("--out", required=True, help="the trained model file (NAME.pth.tar; NAME.json beside it)")
    sp.add_argument(
        "--init",
        default=None,
        help="the model to start from: default (ImageNet VGG-16 + k-means clusters), dinov2_vlad, an official "
        "model's name or a file (default: default)",
    )
    sp.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue from WORK_DIR/checkpoint.pth.tar (same data; --epochs may extend it)",
    )
    _add_train_choices(sp)
    sp.add_argument("--device", default="cpu", help="torch device (cpu, cuda; default cpu)")
    sp.add_argument("--work-dir", default=None, help="checkpoints and curves (default: OUT's name + _training)")
    sp.add_argument("--cache-dir", default=None, help="frozen features cache (default ~/.cache/pnv_ros/training)")
    sp.add_argument("--force", action="store_true", help="replace a finished or interrupted run in WORK_DIR")
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.set_defaults(func=cmd_train)


def _add_train_choices(sp: argparse.ArgumentParser) -> None:
    """The TrainConfig options (None: TrainConfig's default)."""
    sp.add_argument(
        "--layers",
        choices=["netvlad", "conv5"],
        default=None,
        help="what is trained: netvlad (CPU mode, default) or conv5 + netvlad (the authors')",
    )
    sp.add_argument(
        "--epochs",
        type=Number(int, 0, 10000),
        default=None,
        help="epochs (default 30, as theirs; 0: the start model with its WPCA refitted on the training images, a "
        "control)",
    )
    sp.add_argument("--lr", type=Number(float, 1e-12, 10.0), default=None, help="SGD learning rate (default 1e-4)")
    sp.add_argument("--batch-size", type=Number(int, 1, 1024), default=None, help="queries per batch (default 4)")
    sp.add_argument(
        "--negatives",
        type=Number(int, 1, 100),
        default=None,
        help="hardest negatives per query (default 5, as their MSLS loader)",
    )
    sp.add_argument(
        "--margin",
        type=Number(float, 1e-6, 4.0),
        default=None,
        help="triplet margin (default 0.1; the loss uses its root on L2 distances, as theirs)",
    )
    sp.add_argument(
        "--holdout",
        type=Number(float, 0.01, 0.9),
        default=None,
        help="share of the queries (the last places) kept for validation (default 0.2)",
    )
    sp.add_argument(
        "--patience",
        type=Number(int, 0, 10000),
        default=None,
        help="stop after this many epochs without a better Recall@5 (default 10)",
    )
    sp.add_argument("--dims", type=Number(int, 1, 65536), default=None, help="WPCA dimensions (default 512)")
    sp.add_argument("--seed", type=Number(int, 0, None), default=None, help="random seed (default 123, as theirs)")
    sp.add_argument(
        "--recluster",
        action="store_true",
        default=None,
        help="refit the NetVLAD clusters on the training images first (their get_clusters)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume training) a model on the given data; print the best epoch's validation recall."""
    from pnv_ros.training.datasets import load_training_set
    from pnv_ros.training.trainer import TrainConfig, train_model

    if args.resume and args.init:
        raise PnvError("--resume continues a run with its own model and choices: give --resume or --init, not both")
    if args.resume and any(getattr(args, f) is not None for f in _FIXED_ON_RESUME):
        given = [f"--{f.replace('_', '-')}" for f in _FIXED_ON_RESUME if getattr(args, f) is not None]
        raise PnvError(
            f"--resume keeps the run's training choices; {', '.join(given)} cannot change (only --epochs and --dims "
            "can): start a new run to change them"
        )
    data = load_training_set(
        pairs=args.pairs or None,
        gt=args.gt,
        images=args.images,
        positions=args.positions,
        bag=args.bag,
        topic=args.topic,
        msls=args.msls,
        pittsburgh=args.pittsburgh,
        pos_radius=args.pos_radius,
        neg_radius=args.neg_radius,
        **({"min_gap": args.min_gap} if args.min_gap is not None else {}),
    )
    dropped = f" ({data.dropped} without one left out)" if data.dropped else ""
    say(f"training data: {data.name}: {len(data.images)} images, {len(data.queries)} queries with a positive{dropped}")
    defaults = TrainConfig()
    cfg = TrainConfig(
        **{
            f: getattr(args, f) if getattr(args, f, None) is not None else getattr(defaults, f)
            for f in defaults.__dataclass_fields__
        }
    )
    init = None if args.resume else model_path(args.init or "default", announce=say)
    bars = StageBars(args.quiet)
    try:
        res = train_model(
            data,
            Path(args.out),
            init=init,
            resume=args.resume and Path(args.resume),
            config=cfg,
            work_dir=args.work_dir,
            cache_dir=args.cache_dir,
            device=args.device,
            progress=bars.update,
            log=bars.write,
            force=args.force,
        )
    finally:
        bars.close()
    best, first = res.history[res.best_epoch], res.history[0]
    print(
        f"wrote {res.out} in {res.seconds['total']:.0f} s (features {res.seconds['features']:.0f} s, training "
        f"{res.seconds['train']:.0f} s): best epoch {res.best_epoch}, validation Recall@1/5 "
        f"{best.recalls[1]:.3f}/{best.recalls[5]:.3f} (epoch 0: {first.recalls[1]:.3f}/{first.recalls[5]:.3f}); "
        f"curves: {res.work_dir / 'training.png'}; use it with --checkpoint {res.out}"
    )
    return 0
