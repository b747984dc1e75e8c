"""launch/loop_closure_with_pose_graph.launch.py run for real, as test_launch.py runs loop_closure.launch.py: ROS 2
launch (the launch process is test_launch.py run as a script) starts loop_closure_node and pose_graph_node under
the namespace robot1 with an image remap, the shared map arguments and both parameters files. The test finds both
nodes and the wiring on the ROS graph, feeds frames with odometry: each keyframe reaches the backend with the
odometry it was paired with and the optimised path has one pose per keyframe at its odometry pose (no loops);
then SIGINT to the launch's process group: both nodes save the same map name in the same folder
(``<name>.npz`` and ``<name>.graph.npz``) and finish cleanly."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from test_launch import (  # noqa: F401 - ros: the fixture
    FRAMES,
    IMAGE,
    NAMESPACE,
    RTAB,
    SIGTERM_TIMEOUT,
    _params_file,
    _spin_until,
    interrupt,
    kill_left,
    launch,
    ros,
)

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "loop_closure_with_pose_graph.launch.py"


def _start(map_dir: Path, params: Path, log: Path) -> subprocess.Popen:
    args = [
        f"namespace:={NAMESPACE.strip('/')}",
        f"image:={IMAGE}",
        f"params_file:={params}",
        f"pose_graph_params_file:={REPO / 'config' / 'pose_graph.yaml'}",
        f"map_dir:={map_dir}",
        "save_map_on_shutdown:=both",  # over the loop-closure node's file (shutdown_map) and the backend's ('')
        "image_rectified:=true",
    ]
    return launch(LAUNCH, args, log)


@pytest.mark.slow
def test_combined_launch_wires_the_backend_to_the_loop_closure_node(ros, tmp_path: Path) -> None:  # noqa: F811
    from nav_msgs.msg import Odometry
    from nav_msgs.msg import Path as PathMsg
    from pnv_ros.msg import Keyframe
    from rclpy.qos import DurabilityPolicy, QoSProfile
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from pnv_ros.ros.conversions import array_to_image

    map_dir = tmp_path / "maps"
    params, _ = _params_file(tmp_path, tmp_path / "not_this_one")  # the launch argument map_dir wins
    log = tmp_path / "launch.log"
    proc = _start(map_dir, params, log)
    keyframes: list[Keyframe] = []
    paths: list[PathMsg] = []
    try:
        names = lambda: set(ros.get_node_names_and_namespaces())  # noqa: E731
        up = lambda: {("loop_closure", NAMESPACE), ("pose_graph", NAMESPACE)} <= names()  # noqa: E731
        assert _spin_until(ros, up, 120, proc, log), f"nodes not up:\n{log.read_text()[-4000:]}"
        subs: dict = {}

        topics = [f"{NAMESPACE}/{t}" for t in ("loop_closure/keyframes", "loop_closures", "odom")]

        def wired() -> bool:  # discovery reports a node's subscriptions one by one: wait for all three
            subs.update(ros.get_subscriber_names_and_types_by_node("pose_graph", NAMESPACE))
            return all(t in subs for t in topics)

        assert _spin_until(ros, wired, 30, proc, log), subs
        assert subs[f"{NAMESPACE}/loop_closure/keyframes"] == ["pnv_ros/msg/Keyframe"]
        assert subs[f"{NAMESPACE}/loop_closures"] == ["pnv_ros/msg/LoopClosure"]
        assert subs[f"{NAMESPACE}/odom"] == ["nav_msgs/msg/Odometry"]

        pub = ros.create_publisher(Image, IMAGE, QoSProfile(depth=10))
        odom = ros.create_publisher(Odometry, f"{NAMESPACE}/odom", QoSProfile(depth=10))
        ros.create_subscription(Keyframe, f"{NAMESPACE}/loop_closure/keyframes", keyframes.append, 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        ros.create_subscription(PathMsg, f"{NAMESPACE}/pose_graph/path", paths.append, latched)
        for p in (pub, odom):
            assert _spin_until(ros, lambda p=p: p.get_subscription_count() > 0, 30, proc, log)
        for n, i in enumerate(FRAMES, 1):
            o = Odometry()
            o.header.stamp.sec, o.header.frame_id, o.child_frame_id = i, "odom", "camera"
            o.pose.pose.position.x = float(n)  # a metre between frames: each a keyframe by motion too
            odom.publish(o)
            _spin_until(ros, lambda: False, 0.2)
            arr = np.asarray(PILImage.open(RTAB / f"{i}.jpg").convert("RGB"))
            pub.publish(array_to_image(arr, Header(frame_id="camera", stamp=o.header.stamp)))
            assert _spin_until(ros, lambda n=n: len(keyframes) >= n, 60, proc, log), f"frame {i}: no keyframe"
        want = [float(n) for n in range(1, len(FRAMES) + 1)]
        done = lambda: paths and len(paths[-1].poses) == len(FRAMES)  # noqa: E731
        assert _spin_until(ros, done, 30, proc, log), f"no path of {len(FRAMES)} poses:\n{log.read_text()[-3000:]}"
        assert all(k.has_odometry for k in keyframes) and [k.odometry.pose.pose.position.x for k in keyframes] == want
        assert [p.pose.position.x for p in paths[-1].poses] == pytest.approx(want, abs=1e-6)
        assert [p.header.stamp.sec for p in paths[-1].poses] == list(FRAMES)
        stopped_s = interrupt(proc)
    finally:
        kill_left(proc)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert (map_dir / "both.npz").is_file() and (map_dir / "both.graph.npz").is_file(), out[-4000:]
    assert not (tmp_path / "not_this_one").exists() or not any((tmp_path / "not_this_one").iterdir())
    for exe in ("loop_closure_node", "pose_graph_node"):
        assert re.search(rf"\[{exe}-\d\]: process has finished cleanly", out), out[-4000:]
    assert "escalating" not in out and stopped_s < SIGTERM_TIMEOUT, (stopped_s, out[-4000:])
