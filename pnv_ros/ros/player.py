"""Publish a bag's messages over ROS 2 (for machines without ``ros2 bag play``).

A ROS 2 bag's raw CDR bytes are published as they are; a ROS 1 bag's
messages are converted to CDR on the way (``pnv_ros.bags.cdr_converter``).
Topics whose types this ROS installation lacks (ROS 1's rosgraph_msgs/Log,
custom types) are skipped with a warning. ``play`` keeps the
bag's timing (scaled by ``rate``); ``lockstep`` publishes each image only
after the loop-closure node acknowledged the previous one on
``<node>/processed``, so no frame is dropped however slow the machine.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header

from pnv_ros.bags import BagError, cdr_converter, open_bag, read_messages

#: seconds a lockstep replay leaves between the messages of an image's instant and the image: the node is idle then
#: (it acknowledged the previous image) and its executor takes a message off its queue within milliseconds.
#: Without it TUM fr1/desk (10 Hz odometry, stored after each image at its stamp) gave the node 40 keyframes
#: (frames without odometry admitted by sight), where in process (and with it) 24. (Waiting for reliable
#: acknowledgements took ~1.5 s per image: Fast DDS acknowledges on its heartbeat period.)
SETTLE_S = 0.03


def _msg_class(msgtype: str):
    pkg, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError):
        raise BagError(f"message type {msgtype} is not available in this ROS installation") from None


class BagPlayer:
    """Publishers for a bag's topics on one rclpy node (rclpy must be initialised)."""

    def __init__(self, bag: Path, remap: dict[str, str] | None = None, topics: list[str] | None = None) -> None:
        """All topics of a ROS 1 or ROS 2 ``bag``, or only ``topics`` (then a
        type that is not installed is a BagError); ``remap`` renames topics."""
        self.path = Path(bag)
        self._reader = open_bag(self.path)
        _, self._to_cdr = cdr_converter(self._reader, self.path)
        self.remap = remap or {}
        self.node: Node = rclpy.create_node("pnv_bag_player")
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.conns: list = []
        self.pubs: dict = {}
        self.skipped: dict[str, str] = {}  # topic -> message type not installed here
        for c in self._reader.connections:
            if topics is not None and c.topic not in topics:
                continue
            if c.topic not in self.pubs:
                try:
                    cls = _msg_class(c.msgtype)
                except BagError as e:
                    if topics is not None:
                        self.close()
                        raise
                    self.skipped[c.topic] = c.msgtype
                    self.node.get_logger().warning(f"not publishing {c.topic}: {e}")
                    continue
                self.pubs[c.topic] = self.node.create_publisher(cls, self.remap.get(c.topic, c.topic), qos)
            self.conns.append(c)

    def messages(self):
        """(topic, msgtype, bag time ns, ROS 2 CDR bytes) of the published topics, in time order."""
        for c, t, raw in read_messages(self._reader, self.conns, self.path):
            yield c.topic, c.msgtype, t, self._to_cdr(raw, c.msgtype)

    def wait_for_subscribers(self, timeout: float = 30.0, alive: Callable[[], bool] = lambda: True) -> bool:
        """True once every topic has a subscriber; False on timeout or when ``alive()`` turns False."""
        end = time.time() + timeout
        while time.time() < end and alive():
            if all(p.get_subscription_count() > 0 for p in self.pubs.values()):
                return True
            rclpy.spin_once(self.node, timeout_sec=0.05)
        return False

    def play(self, rate: float = 1.0, progress: Callable[[int], None] | None = None) -> int:
        """Publish every message at the bag's timing / rate; returns the count."""
        start_wall, start_bag, n = time.monotonic(), None, 0
        for topic, _, t, raw in self.messages():
            start_bag = t if start_bag is None else start_bag
            delay = (t - start_bag) / 1e9 / rate - (time.monotonic() - start_wall)
            if delay > 0:
                time.sleep(delay)
            self.pubs[topic].publish(raw)
            n += 1
            if progress:
                progress(n)
        return n

    def lockstep(
        self,
        image_topic: str,
        node_name: str = "loop_closure",
        timeout: float = 120.0,
        resend_s: float = 10.0,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Publish messages in order; an image goes out only after the node acknowledged the one before
        it, and after the messages between it and the next image (odometry, depth, camera_info of its
        instant, which a bag may store after it at the same time), so the node has them before it starts
        on the image (the node also waits, up to ``odom_tolerance_s``, for a pose still on its way). An image with
        no answer after
        ``resend_s`` is sent again (it may have raced discovery); the detector skips stamps it has
        seen, so a re-send never adds a keyframe twice."""
        self.acks: list[Header] = []
        self.node.create_subscription(Header, f"/{node_name}/processed", self.acks.append, 100)
        end = time.time() + timeout
        while self.node.count_publishers(f"/{node_name}/processed") == 0:
            if time.time() > end:
                raise BagError(f"node {node_name} publishes no /{node_name}/processed acknowledgements")
            rclpy.spin_once(self.node, timeout_sec=0.05)
        acked: set[tuple[int, int]] = set()
        n = 0  # images acknowledged
        for raw, key in self._images_then_theirs(image_topic):
            end, resend = time.time() + timeout, time.time() + resend_s
            while key not in acked:
                rclpy.spin_once(self.node, timeout_sec=0.02)
                acked.update((a.stamp.sec, a.stamp.nanosec) for a in self.acks)
                if time.time() > end:
                    raise BagError(f"node {node_name} did not acknowledge image {n} within {timeout:.0f} s")
                if time.time() > resend:
                    self.pubs[image_topic].publish(raw)
                    resend = time.time() + resend_s
            n += 1
            if progress:
                progress(n)
        return n

    def _images_then_theirs(self, image_topic: str) -> Iterator[tuple[bytes, tuple[int, int]]]:
        """Publish the bag in order, but each image only after the messages that follow it up to the next image,
        yielding it (raw CDR, (sec, nanosec)) once published; the next image goes out only when the caller asks
        for it."""
        from rclpy.serialization import deserialize_message

        image_cls = self.pubs[image_topic].msg_type
        pending, used = None, set()
        for topic, _, _, raw in self.messages():
            if topic != image_topic:
                self.pubs[topic].publish(raw)
                used.add(topic)
                rclpy.spin_once(self.node, timeout_sec=0.0)
                continue
            if pending is not None:
                self._settle(used)
                self.pubs[image_topic].publish(pending[0])
                yield pending
            st = deserialize_message(raw, image_cls).header.stamp
            pending, used = (raw, (st.sec, st.nanosec)), set()
        if pending is not None:
            self._settle(used)
            self.pubs[image_topic].publish(pending[0])
            yield pending

    def _settle(self, topics: set[str]) -> None:
        """:data:`SETTLE_S` for the node's executor to hand what went out on ``topics`` to its callbacks, when
        anything did: an image whose odometry sits unread in the node's queue waits for it (up to
        ``odom_tolerance_s``, :class:`pnv_ros.ros.odometry.OdometryBuffer`), and is handled without it after."""
        if topics:
            time.sleep(SETTLE_S)

    def close(self) -> None:
        self.node.destroy_node()
        try:
            self._reader.close()
        except Exception:  # noqa: BLE001, S110 - closing a closed reader
            pass
