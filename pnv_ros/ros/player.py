"""Publish a bag's messages over ROS 2 (for machines without ``ros2 bag play``).

Raw CDR bytes from the bag are published as they are. ``play`` keeps the
bag's timing (scaled by ``rate``); ``lockstep`` publishes each image only
after the loop-closure node acknowledged the previous one on
``<node>/processed``, so no frame is dropped however slow the machine.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header

from pnv_ros.bags import BagError


def _msg_class(msgtype: str):  # type: ignore[no-untyped-def]
    pkg, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError):
        raise BagError(f"message type {msgtype} is not available in this ROS installation") from None


class BagPlayer:
    """Publishers for a bag's topics on one rclpy node (rclpy must be initialised)."""

    def __init__(self, bag: Path, remap: dict[str, str] | None = None, topics: list[str] | None = None) -> None:
        from rosbags.rosbag2 import Reader

        if not Path(bag).exists():
            raise BagError(f"bag {bag} does not exist")
        try:
            self._reader = Reader(bag)
            self._reader.open()
        except Exception as e:  # noqa: BLE001
            raise BagError(f"bag {bag} cannot be read: {type(e).__name__}: {e}") from None
        self.remap = remap or {}
        self.node: Node = rclpy.create_node("pnv_bag_player")
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.conns = [c for c in self._reader.connections if topics is None or c.topic in topics]
        self.pubs = {c.topic: self.node.create_publisher(_msg_class(c.msgtype), self.remap.get(c.topic, c.topic), qos)
                     for c in self.conns}  # fmt: skip

    def messages(self):  # type: ignore[no-untyped-def]
        for c, t, raw in self._reader.messages(connections=self.conns):
            yield c.topic, c.msgtype, t, bytes(raw)

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

    def lockstep(self, image_topic: str, node_name: str = "loop_closure", timeout: float = 120.0,
                 resend_s: float = 10.0, progress: Callable[[int], None] | None = None) -> int:  # fmt: skip
        """Publish messages in order; after each image wait for the node's
        acknowledgement of that image's stamp. An image with no answer after
        ``resend_s`` is sent again (it may have raced discovery); the detector
        skips stamps it has seen, so a re-send never adds a keyframe twice."""
        from rclpy.serialization import deserialize_message

        self.acks: list[Header] = []
        self.node.create_subscription(Header, f"/{node_name}/processed", self.acks.append, 100)
        end = time.time() + timeout
        while self.node.count_publishers(f"/{node_name}/processed") == 0:
            if time.time() > end:
                raise BagError(f"node {node_name} publishes no /{node_name}/processed acknowledgements")
            rclpy.spin_once(self.node, timeout_sec=0.05)
        image_cls = self.pubs[image_topic].msg_type
        acked: set[tuple[int, int]] = set()
        n = 0
        for topic, _, _, raw in self.messages():
            self.pubs[topic].publish(raw)
            if topic != image_topic:
                rclpy.spin_once(self.node, timeout_sec=0.0)
                continue
            st = deserialize_message(raw, image_cls).header.stamp
            key = (st.sec, st.nanosec)
            end, resend = time.time() + timeout, time.time() + resend_s
            while key not in acked:
                rclpy.spin_once(self.node, timeout_sec=0.02)
                acked.update((a.stamp.sec, a.stamp.nanosec) for a in self.acks)
                if time.time() > end:
                    raise BagError(f"node {node_name} did not acknowledge image {n} within {timeout:.0f} s")
                if time.time() > resend:
                    self.pubs[topic].publish(raw)
                    resend = time.time() + resend_s
            n += 1
            if progress:
                progress(n)
        return n

    def close(self) -> None:
        self.node.destroy_node()
        self._reader.close()
