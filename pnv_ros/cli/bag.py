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
    b = bsub.add_parser("make", help="an image folder to a ROS 2 bag (mcap or sqlite3)")
    b.add_argument("images", metavar="IMAGES_DIR", help="images in frame order (numeric names sort numerically)")
    b.add_argument("--out", required=True, help="bag folder to create")
    b.add_argument("--format", choices=["mcap", "sqlite3"], default="mcap")
    b.add_argument(
        "--rate", type=Number(float, 1e-3, 1e4), default=1.0, help="frames per second of the timestamps (default 1)"
    )
    b.add_argument("--compressed", action="store_true", help="sensor_msgs/CompressedImage (jpeg) instead of Image")
    b.add_argument("--topic", default="/camera/image", help="image topic (default /camera/image)")
    b.add_argument(
        "--poses", default=None, help="CSV name,x,y[,z] (name = image stem): adds nav_msgs/Odometry on /odom"
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
