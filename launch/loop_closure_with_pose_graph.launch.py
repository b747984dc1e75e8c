"""ros2 launch pnv_ros loop_closure_with_pose_graph.launch.py image:=/camera/image_rect image_rectified:=true
odom:=/odom depth:=/camera/depth/image_rect map_dir:=/data/maps save_map_on_shutdown:=lab

loop_closure_node and the reference backend pose_graph_node in one namespace, wired: the backend reads the
loop-closure node's ``loop_closure/keyframes`` (each carries its odometry) and ``loop_closures`` and the same
odometry topic, and publishes ``pose_graph/path``, ``pose_graph/keyframe_poses`` and map -> odom on ``/tf``.
Every argument of loop_closure.launch.py and pose_graph.launch.py (one ``namespace``, ``odom`` and
``use_sim_time`` for both; the backend's parameters file is ``pose_graph_params_file``), and ``map_dir``,
``load_map``, ``save_map_on_shutdown`` given to both nodes over their parameters files (empty: the files' own),
so that the map ``<name>.npz`` and its graph ``<name>.graph.npz`` are saved and loaded together.
"""

import importlib.util
from pathlib import Path

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def _launch_module(name: str):
    """The launch file ``name`` beside this one, as a module (its ARGUMENTS and its node: one source for both)."""
    spec = importlib.util.spec_from_file_location(name.replace(".", "_"), Path(__file__).resolve().with_name(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOOP = _launch_module("loop_closure.launch.py")
GRAPH = _launch_module("pose_graph.launch.py")
#: the map shared by both nodes: name, description
MAP_ARGUMENTS = (
    ("map_dir", "folder of the maps and their graphs ('' = the parameters files')"),
    ("load_map", "map name loaded at start by both nodes: <name>.npz and <name>.graph.npz ('' = the files')"),
    ("save_map_on_shutdown", "map name both nodes save at shutdown ('' = the parameters files')"),
)


def _nodes(context) -> list[Node]:
    shared = {n: v for n, _ in MAP_ARGUMENTS if (v := LaunchConfiguration(n).perform(context))}
    return [
        LOOP.loop_closure_node(LaunchConfiguration("params_file"), shared),
        GRAPH.pose_graph_node(LaunchConfiguration("pose_graph_params_file"), shared),
    ]


def generate_launch_description() -> LaunchDescription:
    arg = LaunchConfiguration
    arguments = {n: (d, text) for n, d, text in LOOP.ARGUMENTS}
    for n, d, text in GRAPH.ARGUMENTS:  # namespace, odom and use_sim_time: the loop-closure node's
        arguments.setdefault(n, (d, text))
    arguments.update({n: ("", text) for n, text in MAP_ARGUMENTS})
    declared = [DeclareLaunchArgument(n, default_value=d, description=text) for n, (d, text) in arguments.items()]
    declared.append(
        DeclareLaunchArgument(
            "params_file",
            default_value=[FindPackageShare("pnv_ros"), "/config/", arg("preset"), ".yaml"],
            description="loop_closure_node's parameters file (default: the preset's, in share/pnv_ros/config)",
        )
    )
    declared.append(
        DeclareLaunchArgument(
            "pose_graph_params_file",
            default_value=[FindPackageShare("pnv_ros"), "/config/pose_graph.yaml"],
            description="pose_graph_node's parameters file (default: share/pnv_ros/config/pose_graph.yaml)",
        )
    )
    return LaunchDescription([*declared, OpaqueFunction(function=_nodes)])
