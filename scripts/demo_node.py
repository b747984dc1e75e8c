"""The demo: the RTAB-Map loop, replayed as a ROS 2 bag through the live
loop_closure_node. Prints each loop closure as it arrives, precision/recall
against the ground truth at the end, and saves the node's match images.

Runs with the loopback-only DDS profile of this repo (these machines must not
multicast); on a robot, use ros2 launch and ros2 bag play instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "test" / "fastdds_loopback.xml")
os.environ.setdefault("ROS_DOMAIN_ID", "57")
os.environ.setdefault("ROS_LOG_DIR", str(REPO / "out" / "ros_logs"))

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from pnv_ros.msg import LoopClosure  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from pnv_ros.bags import make_bag  # noqa: E402
from pnv_ros.ros.conversions import image_to_array, stamp_to_ns  # noqa: E402
from pnv_ros.ros.player import BagPlayer  # noqa: E402


def main() -> int:
    out = Path(os.environ.get("OUT_DIR", REPO / "out" / "demo"))
    (out / "matches").mkdir(parents=True, exist_ok=True)
    data = REPO / "data" / "rtabmap_samples_loop84"
    bag = out / "rtabmap_loop84.bag"
    if not bag.exists():
        n = make_bag(data / "images", bag, rate=1.0)
        print(f"made {bag} ({n} images at 1 Hz)")
    gt = np.load(data / "gt_matrix.npy")
    node = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "loop_closure_node"),
            "--ros-args",
            "-r",
            "image:=/camera/image",
            "-p",
            "preset:=speed",
        ]
    )
    rclpy.init()
    player = BagPlayer(bag)
    t0_ns = None
    loops: list[tuple[int, int, float]] = []
    images: list[Image] = []

    def on_loop(lc: LoopClosure) -> None:
        q = (stamp_to_ns(lc.query_stamp) - t0_ns) // 1_000_000_000
        m = (stamp_to_ns(lc.match_stamp) - t0_ns) // 1_000_000_000
        ok = bool(gt[q, m])
        loops.append((q, m, lc.score))
        print(
            f"  loop: frame {q + 1:2d} -> frame {m + 1:2d}  score {lc.score:.3f}  matches {lc.num_matches:3d}  "
            f"{'correct' if ok else 'WRONG'}",
            flush=True,
        )

    player.node.create_subscription(LoopClosure, "loop_closures", on_loop, 100)
    player.node.create_subscription(Image, "loop_closure/match_image", images.append, 100)
    try:
        first = next(player.messages())
        t0_ns = first[2]
        if not player.wait_for_subscribers(120):
            print("error: the node did not come up", file=sys.stderr)
            return 1
        print("replaying 84 frames through loop_closure_node (one at a time; ~1 s each on 2 CPU cores)")
        player.lockstep("/camera/image")
        end = time.time() + 5
        while time.time() < end:
            rclpy.spin_once(player.node, timeout_sec=0.05)
    finally:
        player.close()
        rclpy.try_shutdown()
        node.send_signal(signal.SIGINT)
        node.wait(timeout=60)
    match_of = {q: m for q, m, _ in loops}
    for msg in images:  # the match image carries the query frame's header
        q = (stamp_to_ns(msg.header.stamp) - t0_ns) // 1_000_000_000
        name = f"loop_{q + 1:02d}_{match_of.get(q, -2) + 1:02d}.png"
        PILImage.fromarray(image_to_array(msg)).save(out / "matches" / name)
    correct = sum(bool(gt[q, m]) for q, m, _ in loops)
    revisits = int(gt.any(axis=1).sum())
    p = correct / len(loops) if loops else 1.0
    print(
        f"\n{len(loops)} loop closures, {correct} correct: precision {p:.3f}, recall {correct / revisits:.3f} "
        f"({revisits} revisiting frames); match images in {out / 'matches'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
