"""``pnv eval``: a bag through the loop-closure detector (in-process or a live node), a run folder out.

The detector's settings are the generated option group (:mod:`pnv_ros.cli.detector_options`): every
:class:`DetectorParams` field, named as the node's parameters.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pnv_ros.cli.common import NON_NEGATIVE, POSITIVE, add_common_options, open_extractor, preset_of, say
from pnv_ros.cli.detector_options import add_detector_options, detector_params
from pnv_ros.cli.features import add_gt_csv_options
from pnv_ros.errors import PnvError

if TYPE_CHECKING:
    from pnv_ros.config import DetectorParams, Preset
    from pnv_ros.eval.replay import ReplayResult


def register(sub: Any) -> None:
    """Add ``eval`` to the ``pnv`` subparsers ``sub``."""
    sp = sub.add_parser(
        "eval",
        help="replay a bag through the loop-closure detector and report",
        description=(
            "Runs the detector over a bag (in-process, or through a live node with --node) and writes RUN_DIR with "
            "metrics.json, loop_closures.csv, pr_curve.png, latency.png, report.md and example pictures."
        ),
    )
    add_common_options(sp)
    sp.add_argument("bag", metavar="BAG")
    sp.add_argument(
        "--gt",
        default=None,
        help="GT matrix (.npy/.bmp/.png, frames x frames), CSV of positives, or positions CSV; without it, the loops "
        "of --gt-poses: frames within --gt-radius and at least --gt-min-gap s apart",
    )
    sp.add_argument("--gt-radius", type=POSITIVE, default=None, help="distance threshold for a positions GT")
    sp.add_argument("--gt-min-gap", type=NON_NEGATIVE, default=0.0, help="minimum time gap (s) for a positions GT")
    add_gt_csv_options(sp)
    sp.add_argument(
        "--gt-poses",
        default=None,
        metavar="FILE",
        help="ground-truth poses: a TUM trajectory file (t tx ty tz qx qy qz qw) or a CSV name,x,y[,z] with a row per "
        "frame; adds 'trajectory' (odometry and pose-graph-optimised ATE / RPE at the keyframes, evo; the pose graph "
        "is pose_graph_node with --node, pnv_ros.pose_graph in process) and 'loop_transforms' (METRIC loop poses "
        "against it) to metrics.json, and trajectory.png",
    )
    sp.add_argument("--out", required=True, metavar="RUN_DIR")
    sp.add_argument("--force", action="store_true", help="replace an existing RUN_DIR")
    sp.add_argument("--node", action="store_true", help="through a live loop_closure_node (bag played in lockstep)")
    sp.add_argument("--topic", default=None, help="image topic (default: the bag's only image topic)")
    add_detector_options(sp)
    sp.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Replay the bag, score the detector's answers against the ground truth, write RUN_DIR."""
    from pnv_ros.bags import BagReader
    from pnv_ros.eval.ground_truth import load_sequence_gt
    from pnv_ros.eval.run_folder import check_run_folder, write_run_folder

    out = Path(args.out)
    if args.gt is None and (args.gt_poses is None or args.gt_radius is None):
        raise PnvError("give the loop ground truth: --gt FILE, or --gt-poses FILE with --gt-radius")
    extra_inputs = [p for p in (args.gt, args.config, args.gt_poses) if p]
    check_run_folder(out, force=args.force, inputs=[args.bag, *extra_inputs])
    preset = preset_of(args)
    with BagReader(Path(args.bag), args.topic) as r:  # fail early: topic, count
        n_frames, topic = r.count, r.topic
        stamps = r.stamps() if args.gt is None else []
    if args.gt_poses:
        from pnv_ros.eval.trajectory_eval import GroundTruthPoses, loop_positives

        gt_poses = GroundTruthPoses(args.gt_poses, n_frames)  # a bad file fails before the replay
    if args.gt is None:
        positives = loop_positives(gt_poses, stamps, args.gt_radius, args.gt_min_gap)
    else:
        positives = load_sequence_gt(
            args.gt,
            n_frames,
            radius=args.gt_radius,
            min_gap_s=args.gt_min_gap,
            positives_as=args.gt_positives,
            index_base=args.gt_index_base,
        )
    params = detector_params(args)
    from pnv_ros.eval.report import write_run  # torch: after the input checks

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=n_frames, desc="replay", unit="frame")

    def progress(i: int, n: int) -> None:
        if bar is not None:
            bar.n = i
            bar.refresh()

    from pnv_ros.model.registry import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint, announce=say)
    result, preset, model_id = _replay(args, ckpt, preset, params, topic, progress)
    if bar is not None:
        bar.close()
    info = {
        "mode": "node" if args.node else "in-process",
        "bag": str(args.bag),
        "topic": topic,
        "gt": str(args.gt) if args.gt else f"--gt-poses within {args.gt_radius:g} m, {args.gt_min_gap:g} s apart",
        "model": model_id,
        "checkpoint": str(ckpt),
        "preset": preset.to_dict(),
        "params": params.__dict__,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    if args.gt_poses:
        info["gt_poses"] = str(args.gt_poses)

    def write(folder: Path) -> dict[str, Any]:
        if args.gt_poses:
            from pnv_ros.eval.trajectory_eval import optimize_in_process, trajectory_metrics

            bag, plot = Path(args.bag), folder / "trajectory.png"
            graph = result.pose_graph if args.node else optimize_in_process(bag, result, params.min_score, topic)
            info.update(
                trajectory_metrics(bag, result, args.gt_poses, params.min_score, topic, plot=plot, pose_graph=graph)
            )
        return write_run(folder, result, positives, params.min_score, info, title=Path(args.bag).name)

    m = write_run_folder(out, write)
    at, skipped = m["at_threshold"], m["skipped_frames"]["count"]
    print(
        f"wrote {out}: {m['keyframes']} keyframes, precision {at['precision']:.3f}, recall {at['recall']:.3f}, "
        f"F1 {at['f1']:.3f} at {params.min_score:.2f}; AP {m['average_precision']:.3f}, "
        f"R@100%P {m['recall_at_100_precision']:.3f}"
        + (f"; {skipped} frame(s) skipped (cannot be decoded: see report.md)" if skipped else "")
    )
    if "trajectory" in m:
        tr, lt = m["trajectory"], m["loop_transforms"]
        ate, opt = (
            "-" if v is None else format(v, ".3f") for v in (tr["ate_rmse_m_odometry"], tr["ate_rmse_m_optimized"])
        )
        print(
            f"trajectory: odometry ATE {ate} m at {tr['keyframes_with_odometry']} keyframes, optimised {opt} m "
            f"({tr.get('pose_graph', {}).get('loops', 0)} loops in the pose graph); {lt['count']} METRIC "
            f"loop pose(s): median {lt['median_translation_error_m']:.3f} m / "
            f"{lt['median_rotation_error_deg']:.2f} deg, NEES mean {lt['nees_mean']:.1f}"
        )
    return 0


def _replay(
    args: argparse.Namespace,
    ckpt: Path,
    preset: Preset,
    params: DetectorParams,
    topic: str,
    progress: Callable[[int, int], None],
) -> tuple[ReplayResult, Preset, str]:
    """(replay result, the preset as run, the model identity) of the in-process or --node replay."""
    from pnv_ros.eval.replay import replay_in_process, replay_through_node

    if args.node:
        from pnv_ros.eval.run_folder import node_model_id

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
            pose_graph=bool(args.gt_poses),
        )
        return result, preset, node_model_id(ckpt, args.engine, args.precision)  # int8: the node's features tagged
    ex = open_extractor(args, preset)
    result = replay_in_process(Path(args.bag), ex, params, topic, progress)
    return result, ex.preset, ex.info.identity  # recorded as run: a DINOv2 model's backbone and input size
