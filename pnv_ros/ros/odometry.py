"""Recent odometry poses, looked up by the stamp of a frame. No rclpy: the node converts messages.

Why here and not in the core: only the node has odometry as a stream beside its frames (the library and the
evaluator get a pose with each frame), and the waiting rule below is about two ROS topics served by separate
queues; like :mod:`pnv_ros.ros.worker` it is plain Python so that tests need no ROS.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OdometrySample:
    """One stored odometry message: what a keyframe carries (pnv_ros/Keyframe's odometry fields).

    stamp_ns: its stamp (integer ns); position (3,) m and orientation (4,) quaternion x, y, z, w: the base frame
    ``child_frame_id`` in the odometry frame ``frame_id``; covariance (6, 6) as nav_msgs/Odometry's pose
    covariance (x, y, z, rot x, rot y, rot z; m^2, rad^2; zeros when the message gave none).
    """

    stamp_ns: int
    position: np.ndarray
    orientation: np.ndarray
    covariance: np.ndarray
    frame_id: str
    child_frame_id: str


class OdometryBuffer:
    """Recent odometry poses (a fixed ring), looked up by nearest stamp; thread-safe.

    A pose is (7,) float: position x, y, z (m) then orientation quaternion x, y, z, w, in the odometry frame
    ``frame_id`` (that of the newest pose). A frame can reach the worker before the odometry of its own
    instant (the two topics are separate queues; a loaded machine serves them late): :meth:`at` then waits,
    at most the tolerance in wall time, for a pose at or after the frame's stamp, rather than take the pose
    from before the robot moved, or none at all: with odometry at the camera's rate (TUM's 10 Hz, stamps
    100.01 ms apart against the default 0.1 s tolerance) the pose before is more than the tolerance older,
    so odometry that flows is one whose newest pose is at most the tolerance plus one odometry period
    (capped at the tolerance) older than the frame.
    """

    #: a stamp this far (ns) behind the newest is a clock that went back (a restart, a bag loop): the older poses
    #: no longer apply; less behind, it is one late message (two publishers, a reordering link) and is dropped
    CLOCK_RESET_NS = 10**9

    def __init__(self, capacity: int = 5000) -> None:
        self._cond = threading.Condition()
        self._stamps = np.zeros(capacity, np.int64)
        self._poses = np.zeros((capacity, 7))
        self._cov = np.zeros((capacity, 36))
        self._frames: list[tuple[str, str]] = [("", "")] * capacity  # (frame_id, child_frame_id) per pose
        self._n = self._head = 0
        self.frame_id = ""

    def __len__(self) -> int:
        return self._n

    def _newest(self) -> int | None:
        return int(self._stamps[(self._head - 1) % len(self._stamps)]) if self._n else None

    def _period(self) -> int | None:
        """ns between the two newest poses (None with fewer than two)."""
        if self._n < 2:
            return None
        return int(
            self._stamps[(self._head - 1) % len(self._stamps)] - self._stamps[(self._head - 2) % len(self._stamps)]
        )

    @property
    def newest_stamp(self) -> int | None:
        """The newest pose's stamp (ns), None when empty."""
        with self._cond:
            return self._newest()

    def add(
        self, stamp_ns: int, pose: np.ndarray, frame_id: str, covariance: np.ndarray | None = None, child_frame_id=""
    ) -> bool:
        """Store a pose (7,) (and its message's (36,) or (6, 6) covariance, zeros when None, and child frame);
        False (not stored) for one older than the newest by less than CLOCK_RESET_NS."""
        with self._cond:
            last = self._newest()
            if last is not None and stamp_ns < last:
                if last - stamp_ns < self.CLOCK_RESET_NS:
                    return False
                self._n = self._head = 0
            self._stamps[self._head], self._poses[self._head] = stamp_ns, pose
            self._cov[self._head] = 0.0 if covariance is None else np.asarray(covariance, np.float64).reshape(36)
            self._frames[self._head] = (frame_id, child_frame_id)
            self._head = (self._head + 1) % len(self._stamps)
            self._n = min(self._n + 1, len(self._stamps))
            self.frame_id = frame_id
            self._cond.notify_all()
        return True

    def at(self, stamp_ns: int, tolerance_ns: int) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """(position (3,), quaternion xyzw (4,)) nearest the stamp within tolerance, or (None, None).

        When the newest pose is older than the stamp by at most the tolerance plus the odometry's period
        (the interval between its two newest poses, up to the tolerance; the tolerance while there is only
        one pose): odometry flowing, this
        instant's pose not yet here; waits up to the tolerance (wall seconds) for a pose at or after the
        stamp. Odometry that stopped longer ago is not waited for.
        """
        s = self.sample(stamp_ns, tolerance_ns)
        return (None, None) if s is None else (s.position, s.orientation)

    def sample(
        self, stamp_ns: int, tolerance_ns: int, wait: bool = True, expected: bool = False
    ) -> OdometrySample | None:
        """The stored message nearest the stamp within tolerance (None when none); waits as :meth:`at` does
        unless ``wait`` is False, and with ``expected`` (odometry has a publisher) also for a first pose."""

        def settled() -> bool:
            n, period = self._newest(), self._period()
            if n is None:
                return not expected
            return not 0 < stamp_ns - n <= tolerance_ns + min(tolerance_ns, tolerance_ns if period is None else period)

        with self._cond:
            if wait:
                self._cond.wait_for(settled, timeout=tolerance_ns / 1e9)
            if not self._n:
                return None
            d = np.abs(self._stamps[: self._n] - stamp_ns)
            i = int(np.argmin(d))
            if d[i] > tolerance_ns:
                return None
            pose, cov, frames = self._poses[i].copy(), self._cov[i].reshape(6, 6).copy(), self._frames[i]
            return OdometrySample(int(self._stamps[i]), pose[:3], pose[3:], cov, *frames)


def valid_pose(pose) -> bool:
    """Whether a (7,) pose (an array or 7 numbers) can be used: finite, and a quaternion that is not zero.

    Plain floats, no numpy: it runs for every odometry message (100 Hz and more), where numpy's per-call cost
    was most of the node's own work per message (``benchmarks/node_overhead.py``).
    """
    v = [float(x) for x in pose]
    return all(map(math.isfinite, v)) and sum(x * x for x in v[3:]) > 0
