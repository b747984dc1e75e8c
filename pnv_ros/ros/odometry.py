"""Recent odometry poses, looked up by the stamp of a frame. No rclpy: the node converts messages.

Why here and not in the core: only the node has odometry as a stream beside its frames (the library and the
evaluator get a pose with each frame), and the waiting rule below is about two ROS topics served by separate
queues; like :mod:`pnv_ros.ros.worker` it is plain Python so that tests need no ROS.
"""

from __future__ import annotations

import threading

import numpy as np


class OdometryBuffer:
    """Recent odometry poses (a fixed ring), looked up by nearest stamp; thread-safe.

    A pose is (7,) float: position x, y, z (m) then orientation quaternion x, y, z, w, in the odometry frame
    ``frame_id`` (that of the newest pose). A frame can reach the worker before the odometry of its own
    instant (the two topics are separate queues; a loaded machine serves them late): :meth:`at` then waits,
    at most the tolerance in wall time, for a pose at or after the frame's stamp, rather than take the pose
    from before the robot moved.
    """

    #: a stamp this far (ns) behind the newest is a clock that went back (a restart, a bag loop): the older poses
    #: no longer apply; less behind, it is one late message (two publishers, a reordering link) and is dropped
    CLOCK_RESET_NS = 10**9

    def __init__(self, capacity: int = 5000) -> None:
        self._cond = threading.Condition()
        self._stamps = np.zeros(capacity, np.int64)
        self._poses = np.zeros((capacity, 7))
        self._n = self._head = 0
        self.frame_id = ""

    def __len__(self) -> int:
        return self._n

    def _newest(self) -> int | None:
        return int(self._stamps[(self._head - 1) % len(self._stamps)]) if self._n else None

    def add(self, stamp_ns: int, pose: np.ndarray, frame_id: str) -> bool:
        """Store a pose (7,); False (not stored) for one older than the newest by less than CLOCK_RESET_NS."""
        with self._cond:
            last = self._newest()
            if last is not None and stamp_ns < last:
                if last - stamp_ns < self.CLOCK_RESET_NS:
                    return False
                self._n = self._head = 0
            self._stamps[self._head], self._poses[self._head] = stamp_ns, pose
            self._head = (self._head + 1) % len(self._stamps)
            self._n = min(self._n + 1, len(self._stamps))
            self.frame_id = frame_id
            self._cond.notify_all()
        return True

    def at(self, stamp_ns: int, tolerance_ns: int) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """(position (3,), quaternion xyzw (4,)) nearest the stamp within tolerance, or (None, None).

        When the newest pose is older than the stamp by at most the tolerance (odometry flowing, this
        instant's pose not yet here), waits up to the tolerance (wall seconds) for a newer one; odometry
        that stopped longer ago than the tolerance is not waited for.
        """

        def settled() -> bool:
            n = self._newest()
            return n is None or not 0 < stamp_ns - n <= tolerance_ns

        with self._cond:
            self._cond.wait_for(settled, timeout=tolerance_ns / 1e9)
            if not self._n:
                return None, None
            d = np.abs(self._stamps[: self._n] - stamp_ns)
            i = int(np.argmin(d))
            if d[i] > tolerance_ns:
                return None, None
            pose = self._poses[i].copy()
        return pose[:3], pose[3:]


def valid_pose(pose: np.ndarray) -> bool:
    """Whether a (7,) pose can be used: finite, and a quaternion that is not zero."""
    return bool(np.isfinite(pose).all() and np.linalg.norm(pose[3:]) > 0)
