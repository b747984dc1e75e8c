"""ros2 launch pnv_ros loop_closure.launch.py image:=/camera/image_raw preset:=speed"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("pnv_ros")
    preset = LaunchConfiguration("preset")
    return LaunchDescription(
        [
            DeclareLaunchArgument("image", default_value="image", description="image topic"),
            DeclareLaunchArgument("preset", default_value="speed", description="performance | speed | storage"),
            DeclareLaunchArgument("checkpoint", default_value="", description="checkpoint path or official name"),
            DeclareLaunchArgument(
                "params_file",
                default_value=PythonExpression(
                    ["'", os.path.join(share, "config", ""), "' + '", preset, "' + '.yaml'"]
                ),
                description="parameters file",
            ),
            Node(
                package="pnv_ros",
                executable="loop_closure_node",
                name="loop_closure",
                output="screen",
                parameters=[
                    LaunchConfiguration("params_file"),
                    {"preset": preset, "checkpoint": LaunchConfiguration("checkpoint")},
                ],
                remappings=[("image", LaunchConfiguration("image"))],
            ),
        ]
    )
