"""The launch files run for real: ROS 2 launch (upstream launch and launch_ros; scripts/install_launch.sh
installs them in the pip mode) starts the node from launch/loop_closure.launch.py and .launch.xml under
the namespace robot1, with an image remap and a parameters file. The test finds the node on the ROS graph,
reads parameters from the file back through its get_parameters service, feeds it frames, and stops the
launch with SIGINT to its whole process group, as Ctrl-C in a terminal does: the node saves its map at
shutdown and exits within the timeouts the launch files give launch (sigterm_timeout, sigkill_timeout),
before any SIGTERM.

Run as a script (``python test/test_launch.py LAUNCH_FILE name:=value ...``) this file is the launch
process: a LaunchService including the launch file with the arguments, as ``ros2 launch`` does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

if TYPE_CHECKING:
    from launch.events import Shutdown
    from rclpy.node import Node

    from launch import LaunchContext

REPO = Path(__file__).resolve().parent.parent
RTAB = REPO / "data" / "rtabmap_samples_loop84" / "images"
#: launch's timeouts as the launch files declare them (test_packaging checks the two files agree)
SIGTERM_TIMEOUT, SIGKILL_TIMEOUT = 60, 240  # seconds
TIMEOUTS_LINE = "launch timeouts: sigterm_timeout={} sigkill_timeout={}"
NAMESPACE, IMAGE, DEPTH = "/robot1", "/cameras/front/image_rect", "/cameras/front/depth_registered/image_rect"
FRAMES = (1, 20, 40)  # RTAB-Map frames that differ enough to be keyframes without odometry


def run_launch(launch_file: str, arguments: list[str]) -> int:
    """The launch process: include ``launch_file`` with ``name:=value`` arguments and run until it ends
    (SIGINT: launch's shutdown). At shutdown, prints launch's sigterm/sigkill timeouts as launch reads them
    (the launch configurations of those names). Returns launch's exit code."""
    from launch.actions import IncludeLaunchDescription, RegisterEventHandler
    from launch.event_handlers import OnShutdown
    from launch.launch_description_sources import AnyLaunchDescriptionSource

    from launch import LaunchDescription, LaunchService

    def report(event: Shutdown, context: LaunchContext) -> None:
        cfg = context.launch_configurations
        print(TIMEOUTS_LINE.format(cfg.get("sigterm_timeout"), cfg.get("sigkill_timeout")), flush=True)

    pairs = [tuple(a.split(":=", 1)) for a in arguments]
    service = LaunchService(argv=arguments)
    include = IncludeLaunchDescription(AnyLaunchDescriptionSource(launch_file), launch_arguments=pairs)
    service.include_launch_description(
        LaunchDescription([include, RegisterEventHandler(OnShutdown(on_shutdown=report))])
    )
    return service.run()


def test_launch_is_installed() -> None:
    """ROS 2's launch, not PyPI's unrelated 'launch' (scripts/install_launch.sh; never skipped)."""
    hint = "scripts/install_launch.sh installs ROS 2 launch (sources: ../shared/ros/launch_src or $PNV_LAUNCH_SRC)"
    try:
        import launch_ros  # noqa: F401
        import launch_xml  # noqa: F401

        import launch
    except ImportError as e:
        pytest.fail(f"{e}: {hint}")
    assert hasattr(launch, "LaunchService"), f"{launch.__file__} is not ROS 2's launch: {hint}"


def test_executables_are_where_launch_ros_looks() -> None:
    """launch_ros runs <prefix>/lib/pnv_ros/<executable>: CMakeLists.txt installs the node wrappers there (colcon),
    scripts/install_launch.sh links setup.cfg's console scripts there (pip mode); the three name the same set."""
    cmake = set(
        re.findall(
            r"install\(PROGRAMS scripts/(\S+) DESTINATION lib/\$\{PROJECT_NAME\}\)",
            (REPO / "CMakeLists.txt").read_text(),
        )
    )
    m = re.search(r"^EXECUTABLES=\(([^)]*)\)", (REPO / "scripts" / "install_launch.sh").read_text(), re.M)
    assert m, "scripts/install_launch.sh: EXECUTABLES=(...) not found"
    linked = set(m.group(1).split())
    scripts = set(re.findall(r"^\s+(\S+) = pnv_ros\.ros\.", (REPO / "setup.cfg").read_text(), re.M))
    assert cmake == linked == scripts == {"loop_closure_node", "pose_graph_node"}
    for exe in linked:
        path = Path(sys.prefix) / "lib" / "pnv_ros" / exe
        assert os.access(path, os.X_OK), f"{path} missing: run scripts/install_launch.sh"
        assert path.resolve() == (Path(sys.prefix) / "bin" / exe).resolve()


def test_the_package_share_is_where_the_launch_files_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """params_file's default is $(find-pkg-share pnv_ros)/config/<preset>.yaml: the ament index finds pnv_ros in
    the venv (scripts/build_interfaces.sh's cmake install, as colcon's), with the launch files and presets."""
    from ament_index_python.packages import get_package_share_directory

    monkeypatch.setenv("AMENT_PREFIX_PATH", sys.prefix)
    share = Path(get_package_share_directory("pnv_ros"))
    for name in ("loop_closure.launch.py", "loop_closure.launch.xml"):
        assert (share / "launch" / name).is_file()
    for preset in ("performance", "speed", "storage"):
        assert (share / "config" / f"{preset}.yaml").is_file()


@pytest.fixture(scope="module")
def ros() -> Iterator[Node]:
    """An rclpy node in this process (conftest set the loopback profile and a domain of our own)."""
    rclpy = pytest.importorskip("rclpy")  # test_node.test_rclpy_is_installed_in_ci fails loudly where absent
    rclpy.init()
    node = rclpy.create_node("pnv_launch_test")
    yield node
    node.destroy_node()
    rclpy.try_shutdown()


def _spin_until(
    node: Node, cond: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> bool:
    """Spin ``node`` until ``cond()`` holds (True) or ``timeout`` seconds pass (False); fails the test at once if
    the launch process ``proc`` ends meanwhile, with the tail of its ``log``."""
    import rclpy

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"launch ended early ({proc.returncode}):\n{log.read_text()[-4000:] if log else ''}")
    return False


def _params_file(tmp_path: Path, map_dir: Path) -> tuple[Path, dict]:
    """config/speed.yaml with a map folder, a shutdown map and a top_n of the test's own."""
    params = yaml.safe_load((REPO / "config" / "speed.yaml").read_text())
    mine = {"map_dir": str(map_dir), "save_map_on_shutdown": "shutdown_map", "top_n": 7}
    params["/**"]["ros__parameters"].update(mine)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path, mine


def launch(launch_file: Path, args: list[str], log: Path) -> subprocess.Popen:
    """``launch_file`` with launch arguments ``args`` in its own process group (this file run as a script), its
    output to ``log``."""
    env = os.environ.copy()  # conftest's loopback profile, domain and log folder; PYTHONPATH (this checkout)
    # launch and launch_ros find themselves and pnv_ros (share/, lib/pnv_ros) through the ament index
    env["AMENT_PREFIX_PATH"] = os.pathsep.join(p for p in (sys.prefix, env.get("AMENT_PREFIX_PATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with log.open("w") as out:  # a file, not a pipe: nothing blocks on a full pipe while the node logs
        return subprocess.Popen(
            [sys.executable, __file__, str(launch_file), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def interrupt(proc: subprocess.Popen) -> float:
    """Ctrl-C: SIGINT to the launch's process group; the seconds until it exited."""
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=SIGTERM_TIMEOUT + 30)
    return time.monotonic() - t0


def kill_left(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of a launch still running (a test that failed before ``interrupt``)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _start_launch(launch_file: Path, params: Path, log: Path) -> subprocess.Popen:
    args = [f"namespace:={NAMESPACE.strip('/')}", f"image:={IMAGE}", f"params_file:={params}", f"depth:={DEPTH}"]
    args.append("image_rectified:=true")  # an image_rect topic: camera_info's P, no distortion
    return launch(launch_file, args, log)


def _get_parameters(node: Node, names: list[str], proc: subprocess.Popen, log: Path) -> dict:
    """The launched node's parameters ``names`` through its get_parameters service, as Python values."""
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python

    client = node.create_client(GetParameters, f"{NAMESPACE}/loop_closure/get_parameters")
    try:
        assert _spin_until(node, client.service_is_ready, 60, proc, log), "no get_parameters service"
        fut = client.call_async(GetParameters.Request(names=names))
        assert _spin_until(node, fut.done, 30, proc, log), "get_parameters timed out"
        return {n: parameter_value_to_python(v) for n, v in zip(names, fut.result().values)}
    finally:
        node.destroy_client(client)


def _feed_frames(node: Node, proc: subprocess.Popen, log: Path) -> list[int]:
    """Publish FRAMES on the remapped image topic, each after the node announced the one before as a keyframe;
    returns the keyframe ids announced."""
    from pnv_ros.msg import Keyframe
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from pnv_ros.ros.conversions import array_to_image

    keyframes: list[int] = []
    pub = node.create_publisher(Image, IMAGE, QoSProfile(depth=10))
    sub = node.create_subscription(
        Keyframe, f"{NAMESPACE}/loop_closure/keyframes", lambda m: keyframes.append(m.id), 10
    )
    try:
        assert _spin_until(node, lambda: pub.get_subscription_count() > 0, 30, proc, log), "node not subscribed"
        # and ours matched to its keyframe publisher: a keyframe announced before that is lost (volatile QoS)
        assert _spin_until(node, lambda: sub.get_publisher_count() > 0, 30, proc, log), "keyframes not matched"
        for n, i in enumerate(FRAMES, 1):
            arr = np.asarray(PILImage.open(RTAB / f"{i}.jpg").convert("RGB"))
            header = Header(frame_id="camera")
            header.stamp.sec = i  # one frame a (simulated) second, as the RTAB-Map set was taken
            pub.publish(array_to_image(arr, header))
            assert _spin_until(node, lambda n=n: len(keyframes) >= n, 60, proc, log), f"frame {i}: no keyframe"
        return keyframes
    finally:
        node.destroy_publisher(pub)
        node.destroy_subscription(sub)


@pytest.mark.slow
@pytest.mark.parametrize("launch_file", ["loop_closure.launch.py", "loop_closure.launch.xml"])
def test_launch_file_runs_the_node(ros: Node, tmp_path: Path, launch_file: str) -> None:
    map_dir = tmp_path / "maps"
    params, mine = _params_file(tmp_path, map_dir)
    log = tmp_path / "launch.log"
    proc = _start_launch(REPO / "launch" / launch_file, params, log)
    try:
        # -- on the graph: under /robot1, the image remapped, the rest in the namespace -----------
        found = lambda: ("loop_closure", NAMESPACE) in ros.get_node_names_and_namespaces()  # noqa: E731
        assert _spin_until(ros, found, 120, proc, log), f"node not up:\n{log.read_text()[-4000:]}"
        subs: dict = {}

        def subscribed() -> bool:
            subs.update(ros.get_subscriber_names_and_types_by_node("loop_closure", NAMESPACE))
            # every subscription, not only the first seen: discovery reports them one by one
            return all(t in subs for t in (IMAGE, DEPTH, f"{NAMESPACE}/camera_info", f"{NAMESPACE}/odom"))

        assert _spin_until(ros, subscribed, 30, proc, log), subs
        assert subs[IMAGE] == ["sensor_msgs/msg/Image"] and subs.get(DEPTH) == ["sensor_msgs/msg/Image"], subs
        assert f"{NAMESPACE}/camera_info" in subs and f"{NAMESPACE}/odom" in subs, subs
        assert f"{NAMESPACE}/image" not in subs
        # -- parameters: the file's, and the launch arguments' (preset, compressed, image_rectified) over it --
        got = _get_parameters(ros, [*mine, "preset", "compressed", "image_rectified"], proc, log)
        assert got == {**mine, "preset": "speed", "compressed": False, "image_rectified": True}
        assert _feed_frames(ros, proc, log) == [0, 1, 2]
        # -- Ctrl-C: SIGINT to the launch's process group ------------------------------------
        stopped_s = interrupt(proc)
    finally:
        kill_left(proc)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert TIMEOUTS_LINE.format(SIGTERM_TIMEOUT, SIGKILL_TIMEOUT) in out, out[-4000:]
    saved = map_dir / "shutdown_map.npz"
    assert f"saved {len(FRAMES)} keyframes to {saved}" in out, out[-4000:]
    assert saved.is_file()
    assert re.search(r"\[loop_closure_node-1\]: process has finished cleanly", out), out[-4000:]
    assert "escalating" not in out and stopped_s < SIGTERM_TIMEOUT, (stopped_s, out[-4000:])


if __name__ == "__main__":
    sys.exit(run_launch(sys.argv[1], sys.argv[2:]))
