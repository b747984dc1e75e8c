"""``pnv bag make`` and ``pnv bag play``: image folders to ROS 2 bags, and bags played over ROS 2."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pnv_ros.cli.common import Number
from pnv_ros.errors import PnvError


def register(sub: Any) -> None:
    """Add ``bag`` (make, play) to the ``pnv`` subparsers ``sub``."""
    sp = sub.add_parser("bag", help="make ROS 2 bags from image folders, or play them")
    bsub = sp.add_subparsers(dest="bag_cmd", required=True, metavar="ACTION")
    b = bsub.add_parser("make", help="an image folder (or a TUM RGB-D folder: --tum) to a ROS 2 bag (mcap or sqlite3)")
    b.add_argument(
        "images",
        metavar="IMAGES_DIR",
        help="images in frame order (numeric names sort numerically); with --tum: a TUM RGB-D folder (TUM_DIR)",
    )
    b.add_argument("--out", required=True, help="bag folder to create")
    b.add_argument("--format", choices=["mcap", "sqlite3"], default="mcap")
    b.add_argument(
        "--rate", type=Number(float, 1e-3, 1e4), default=1.0, help="frames per second of the timestamps (default 1)"
    )
    b.add_argument("--compressed", action="store_true", help="sensor_msgs/CompressedImage (jpeg) instead of Image")
    b.add_argument("--topic", default="/camera/image", help="image topic (default /camera/image)")
    b.add_argument(
        "--poses",
        default=None,
        help="CSV name,x,y[,z] (name = image stem), or a TUM trajectory file (t tx ty tz qx qy qz qw; images named "
        "by their stamps, or --tum): adds nav_msgs/Odometry on /odom",
    )
    t = b.add_argument_group("TUM RGB-D (--tum)")
    t.add_argument(
        "--tum",
        action="store_true",
        help="IMAGES_DIR is a TUM RGB-D folder (rgb.txt + depth.txt, or associations.txt): colour, 16UC1 depth (mm), "
        "camera_info at the dataset's stamps",
    )
    t.add_argument("--camera", default=None, help="camera_info YAML (camera_calibration's layout); needed with --tum")
    t.add_argument(
        "--drift",
        nargs="?",
        const="",
        default=None,
        metavar="KEY=VALUE,...",
        help="odometry from --poses (ground truth) by the seeded drift model (pnv_ros.trajectory.DriftModel): keys "
        "yaw_per_m, scale_error, sigma_m, sigma_yaw, seed, up; bare --drift: the defaults",
    )
    b.set_defaults(func=cmd_bag_make)
    b = bsub.add_parser("play", help="publish a bag over ROS 2 with its timing (where ros2 bag play is missing)")
    b.add_argument("bag", metavar="BAG")
    b.add_argument("--rate", type=Number(float, 1e-3, 1e3), default=1.0, help="speed factor")
    b.add_argument("--remap", action="append", default=[], metavar="FROM:=TO", help="topic remapping (repeatable)")
    b.add_argument(
        "--wait", type=Number(float, 0.0, 3600.0), default=5.0, help="seconds to wait for subscribers before playing"
    )
    b.set_defaults(func=cmd_bag_play)


def cmd_bag_make(args: argparse.Namespace) -> int:
    """Write the image folder as a bag (and odometry from --poses)."""
    from pnv_ros.bags import make_bag
    from pnv_ros.storage import check_output

    if Path(args.out).exists():
        raise PnvError(f"{args.out} exists: choose a new bag path")
    check_output(args.out, folder=True, what="--out", inputs=[args.images])
    poses = Path(args.poses) if args.poses else None
    if args.tum or args.camera or args.drift is not None:
        return _make_tum(args, poses)
    n = make_bag(
        Path(args.images),
        Path(args.out),
        fmt=args.format,
        rate=args.rate,
        compressed=args.compressed,
        topic=args.topic,
        poses=poses,
    )
    print(f"wrote {args.out}: {n} messages ({args.format}, {args.rate:g} Hz, topic {args.topic})")
    return 0


def _make_tum(args: argparse.Namespace, poses: Path | None) -> int:
    """``pnv bag make TUM_DIR --tum --camera CAMERA.yaml [--poses ODOM.txt [--drift ...]]``."""
    from pnv_ros.bags import make_tum_bag
    from pnv_ros.trajectory import DriftModel, ate_rmse
    from pnv_ros.tum import read_trajectory

    if not args.tum:
        raise PnvError("--camera and --drift are options of --tum (a TUM RGB-D folder)")
    if not args.camera:
        raise PnvError("--tum needs --camera CAMERA.yaml (the camera_info YAML of the colour camera)")
    if args.drift is not None and poses is None:
        raise PnvError("--drift makes odometry from --poses: give the ground truth as --poses FILE")
    drift = DriftModel.parse(args.drift) if args.drift is not None else None
    r = make_tum_bag(
        Path(args.images),
        Path(args.out),
        Path(args.camera),
        poses=poses,
        drift=drift,
        fmt=args.format,
        compressed=args.compressed,
        topics={"image": args.topic},
    )
    print(
        f"wrote {args.out}: {r.messages} messages, {r.frames} frames ({args.format}, topic {args.topic})"
        + (f"; {r.unpaired} colour image(s) without depth within 0.02 s left out" if r.unpaired else "")
    )
    if drift is not None and poses is not None and r.odometry is not None and len(r.odometry) >= 3:
        truth = read_trajectory(poses).at(r.odometry.stamps)
        print(f"odometry: {drift}; position ATE {ate_rmse(truth, r.odometry):.3f} m against {poses}")
    return 0


def cmd_bag_play(args: argparse.Namespace) -> int:
    """Publish the bag's messages over ROS 2 with their timing."""
    remap = {}
    for r in args.remap:
        if ":=" not in r:
            raise PnvError(f"bad --remap {r!r}: use FROM:=TO")
        a, b = r.split(":=", 1)
        remap[a] = b
    import rclpy

    from pnv_ros.ros.player import BagPlayer

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
