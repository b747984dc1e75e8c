"""ros2 launch pnv_ros pose_graph.launch.py odom:=/odom

The reference pose-graph backend (pose_graph_node) beside a loop_closure node in the same namespace: it reads
that node's ``loop_closure/keyframes`` and ``loop_closures`` and the odometry, and publishes
``pose_graph/path``, ``pose_graph/keyframe_poses``, ``pose_graph/map_to_odom`` and map -> odom on ``/tf``.
Parameters (frames, the camera extrinsic, the odometry drift model, the robust kernel, graph files) are in
``params_file`` (default share/pnv_ros/config/pose_graph.yaml).
"""

from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

# name, default, description
ARGUMENTS = (
    ("namespace", "", "namespace of the node and its topics (the loop_closure node's)"),
    ("odom", "odom", "odometry topic (nav_msgs/Odometry)"),
    ("keyframes", "loop_closure/keyframes", "the loop_closure node's keyframes (pnv_ros/Keyframe)"),
    ("loop_closures", "loop_closures", "loop closures (pnv_ros/LoopClosure)"),
    ("use_sim_time", "false", "use /clock (bag replay, simulation)"),
)
REMAPS = (("odom", "odom"), ("keyframes", "keyframes"), ("loop_closures", "loop_closures"))


def pose_graph_node(params_file, *more: dict) -> Node:
    """The node, its arguments' remaps and ``use_sim_time`` over ``params_file``, then the ``more`` parameters
    (loop_closure_with_pose_graph.launch.py adds the map arguments it shares)."""
    arg = LaunchConfiguration
    return Node(
        package="pnv_ros",
        executable="pose_graph_node",
        name="pose_graph",
        namespace=arg("namespace"),
        output="screen",
        parameters=[params_file, {"use_sim_time": ParameterValue(arg("use_sim_time"), value_type=bool)}, *more],
        remappings=[(topic, arg(name)) for topic, name in REMAPS],
    )


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(n, default_value=d, description=text) for n, d, text in ARGUMENTS]
    declared.append(
        DeclareLaunchArgument(
            "params_file",
            default_value=[FindPackageShare("pnv_ros"), "/config/pose_graph.yaml"],
            description="parameters file (default: share/pnv_ros/config/pose_graph.yaml)",
        )
    )
    return LaunchDescription([*declared, pose_graph_node(LaunchConfiguration("params_file"))])
