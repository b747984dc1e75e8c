"""pose_graph_node's parameters as a table, in :mod:`pnv_ros.ros.params`' style (its :class:`Param`). No rclpy.

The backend's settings map one to one onto :class:`pnv_ros.pose_graph.PoseGraphSettings`' fields (defaults, help,
ranges and choices from their metadata); the node's own parameters (frames, the camera extrinsic, inputs, files)
are :data:`NODE_TABLE`. ``map_dir``, ``load_map`` and ``save_map_on_shutdown`` have the loop-closure node's names
and defaults, so one parameters file (or launch argument) gives both nodes the same map: the graph is the file
``<map name>.graph.npz`` beside the loop-closure node's ``<map name>.npz``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pnv_ros.errors import ConfigError
from pnv_ros.pose_graph import PoseGraphSettings, pose_matrix
from pnv_ros.ros import params as P
from pnv_ros.ros.params import Param

#: The node's own parameters: read-only at start, then the changeable ones.
NODE_TABLE: tuple[Param, ...] = (
    Param("map_frame", "map", "the optimised poses' frame (the parent of odom on /tf)"),
    Param("odom_frame", "", "the odometry frame (the child of map on /tf); '' = the odometry messages' frame_id"),
    Param(
        "camera_extrinsic",
        "0 0 0 0 0 0 1",
        "the camera optical frame in the odometry's child (base) frame: 'x y z qx qy qz qw' (m, unit quaternion); "
        "the default identity is for odometry of the camera itself (TUM RGB-D's ground truth)",
    ),
    Param(
        "odom_qos",
        "reliable",
        "odometry QoS (as the loop-closure node's image_qos): reliable by default, every pose counts here",
        choices=P.QOS_CHOICES,
    ),
    Param("odom_qos_depth", 100, "odometry queue depth", range=(1, 10000)),
    Param(
        "odom_tolerance_s",
        0.1,
        "a keyframe that carries no odometry (has_odometry false: not from loop_closure_node) takes the pose of "
        "the odom topic nearest its stamp within this (s); without one it is left out of the graph (its loops too)",
        range=(0.0, 10.0),
    ),
    Param(
        "odom_wait_s",
        2.0,
        "such a keyframe waits (wall s) for odometry at or after its stamp, and the keyframes and loops behind it "
        "wait with it; then it takes the nearest pose there is",
        range=(0.0, 60.0),
    ),
    Param("map_dir", P.BY_NAME["map_dir"].default, "folder of the maps; the graph is <map name>.graph.npz there"),
    Param("load_map", "", "map name whose graph (<name>.graph.npz in map_dir) is loaded at start; '' = none"),
    Param("save_map_on_shutdown", "", "map name whose graph is saved at shutdown ('' = don't)", "node"),
)


#: Every parameter, in the order the node declares them.
#: The backend's settings, from :class:`PoseGraphSettings`' fields (read at start).
SETTINGS_TABLE: tuple[Param, ...] = P.fields_table(PoseGraphSettings, "startup")
TABLE: tuple[Param, ...] = (
    *(p for p in NODE_TABLE if p.kind == "startup"),
    *SETTINGS_TABLE,
    *(p for p in NODE_TABLE if p.kind != "startup"),
)
BY_NAME = {p.name: p for p in TABLE}


def check(name: str, value: Any) -> None:
    """Raise ConfigError when a value is outside its parameter's range or choices (or, for camera_extrinsic,
    not seven numbers with a non-zero quaternion)."""
    P.check(name, value, BY_NAME)
    if name == "camera_extrinsic":
        extrinsic(value)


def settings(get: Any) -> PoseGraphSettings:
    """PoseGraphSettings from the parameters (``get(name)`` gives a value). Raises ConfigError."""
    return PoseGraphSettings(**{p.name: get(p.name) for p in SETTINGS_TABLE})


def extrinsic(text: str) -> np.ndarray:
    """(4, 4) ``T_base_cam`` from 'x y z qx qy qz qw'. Raises ConfigError."""
    try:
        v = np.array([float(x) for x in str(text).split()])
    except ValueError:
        v = np.zeros(0)
    if v.shape != (7,) or not np.all(np.isfinite(v)) or np.linalg.norm(v[3:]) < 1e-9:
        raise ConfigError(f"camera_extrinsic = {text!r}: give 'x y z qx qy qz qw' (seven numbers, a unit quaternion)")
    return pose_matrix(v[:3], v[3:])


def markdown() -> str:
    """The parameter section of docs/pose_graph.md (between its ``<!-- parameters -->`` markers)."""
    out = ["| parameter | default | range or choices | description |", "|---|---|---|---|"]
    for p in TABLE:
        out.append(P.table_row(p, " (changeable at run time)" if p.kind == "node" else ""))
    return "\n".join(out) + "\n"
