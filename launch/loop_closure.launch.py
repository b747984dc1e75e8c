"""ros2 launch pnv_ros loop_closure.launch.py image:=/camera/image_rect image_rectified:=true preset:=speed

The same arguments as loop_closure.launch.xml. ``compressed``, ``image_rectified``, ``use_sim_time``,
``preset``, ``checkpoint``, ``fleet_dsn`` and ``robot_id`` override the parameters file. An image_rect topic needs
``image_rectified:=true`` (camera_info's P, no distortion); a raw image (image_raw) keeps the default false (K
and D). ``depth`` names an optional depth image registered to the colour camera (16UC1 mm or 32FC1 m): with
it, loops' relative poses are METRIC. The inputs' QoS is set in the parameters file (``image_qos``,
``camera_info_qos``, ``odom_qos``, ``depth_qos``: sensor_data | reliable | best_effort | system_default, and
their ``*_qos_depth``).
"""

from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

# name, default, description (params_file's default is the preset's file, below)
ARGUMENTS = (
    ("namespace", "", "namespace of the node and its topics"),
    ("image", "image", "image topic (sensor_msgs/Image), with compressed:=false"),
    ("compressed_image", "image/compressed", "compressed image topic (sensor_msgs/CompressedImage)"),
    ("camera_info", "camera_info", "camera info topic"),
    ("odom", "odom", "odometry topic (nav_msgs/Odometry)"),
    ("depth", "depth", "depth image topic registered to the colour camera (16UC1 mm or 32FC1 m); optional"),
    ("image_rectified", "false", "true for an image_rect topic (camera_info's P); false for raw images (K and D)"),
    ("compressed", "false", "subscribe to compressed_image instead of image"),
    ("use_sim_time", "false", "use /clock (bag replay, simulation)"),
    ("preset", "speed", "performance | speed | storage"),
    ("checkpoint", "", "checkpoint path or official model name; '' = the offline default model"),
    ("fleet_dsn", "", "a fleet store shared by many robots (libpq connection string); '' = this node's map only"),
    ("robot_id", "", "this robot's name in the fleet (unique per robot; required with fleet_dsn)"),
    # launch's own names (ExecuteLocal reads these launch configurations; its defaults are 5 s and 5 s): seconds
    # from Ctrl-C to SIGTERM, then to SIGKILL. save_map_on_shutdown writes the whole map (about 1 MB a keyframe,
    # speed preset) and a SIGKILL mid-save keeps only the previous file: room for a large map on slow storage.
    ("sigterm_timeout", "60", "seconds from SIGINT to SIGTERM at shutdown (the node saves its map meanwhile)"),
    ("sigkill_timeout", "240", "seconds from SIGTERM to SIGKILL (a kill mid-save keeps only the previous map)"),
)
REMAPS = (  # the node's topic name -> the argument that names the real topic
    ("image", "image"),
    ("image/compressed", "compressed_image"),
    ("camera_info", "camera_info"),
    ("odom", "odom"),
    ("depth", "depth"),
)


#: launch arguments that override the parameters file, typed (an empty checkpoint stays '': untyped, YAML would
#: read it as null)
TYPED = (
    ("preset", str),
    ("checkpoint", str),
    ("fleet_dsn", str),
    ("robot_id", str),
    ("compressed", bool),
    ("image_rectified", bool),
    ("use_sim_time", bool),
)


def loop_closure_node(params_file, *more: dict) -> Node:
    """The node, its arguments' remaps and typed overrides over ``params_file``, then the ``more`` parameters
    (loop_closure_with_pose_graph.launch.py adds the map arguments it shares)."""
    arg = LaunchConfiguration
    return Node(
        package="pnv_ros",
        executable="loop_closure_node",
        name="loop_closure",
        namespace=arg("namespace"),
        output="screen",
        parameters=[params_file, {n: ParameterValue(arg(n), value_type=t) for n, t in TYPED}, *more],
        remappings=[(topic, arg(name)) for topic, name in REMAPS],
    )


def generate_launch_description() -> LaunchDescription:
    arg = LaunchConfiguration
    declared = [DeclareLaunchArgument(n, default_value=d, description=text) for n, d, text in ARGUMENTS]
    declared.append(
        DeclareLaunchArgument(
            "params_file",
            default_value=[FindPackageShare("pnv_ros"), "/config/", arg("preset"), ".yaml"],
            description="parameters file (default: the preset's, in share/pnv_ros/config)",
        )
    )
    return LaunchDescription([*declared, loop_closure_node(arg("params_file"))])
