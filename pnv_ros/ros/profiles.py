"""ROS objects built from the node's parameter table: QoS profiles and parameter descriptors."""

from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.qos import QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data, qos_profile_system_default

from pnv_ros.ros import params as P


def qos(kind: str, depth: int) -> QoSProfile:
    """A QoS profile from a parameter choice (see pnv_ros.ros.params.QOS_CHOICES)."""
    base = {"sensor_data": qos_profile_sensor_data, "system_default": qos_profile_system_default}.get(kind)
    q = QoSProfile(depth=depth)
    if base is not None:
        q.reliability, q.durability, q.history = base.reliability, base.durability, base.history
    if kind == "reliable":
        q.reliability = QoSReliabilityPolicy.RELIABLE
    elif kind == "best_effort":
        q.reliability = QoSReliabilityPolicy.BEST_EFFORT
    return q


def descriptor(p: P.Param) -> ParameterDescriptor:
    """The ROS descriptor of a parameter of the table: description (with the choices), read-only, range."""
    text = p.description + (f" (one of {', '.join(repr(c) for c in p.choices)})" if p.choices else "")
    # Float parameters take integers too (YAML's `exclude_recent_s: 30`, `-p min_score:=1`): typed by
    # P.check, converted by the node.
    d = ParameterDescriptor(description=text, read_only=p.read_only, dynamic_typing=isinstance(p.default, float))
    if p.range is not None and not isinstance(p.default, bool):
        if isinstance(p.default, int):
            d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=1)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]), to_value=float(p.range[1]))]
    return d
