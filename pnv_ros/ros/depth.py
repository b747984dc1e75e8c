"""The depth input: recent depth images, paired with a colour frame by stamp, decoded only for admitted frames.
No rclpy: the node hands the messages (anything with sensor_msgs/Image's fields) to :class:`DepthInput`.

A depth image registered to the colour camera (``depth``: ``16UC1`` millimetres or ``32FC1`` metres, REP 118;
a RealSense's ``aligned_depth_to_color``, an OAK-D's or ZED's ``depth/image``) lets each keyframe keep the 3-D
points of its local features, and a loop's relative pose becomes METRIC. Colour and depth come on two topics
(separate queues): the frame takes the depth image nearest its stamp within ``depth_tolerance_s``, waiting for
it as :class:`~pnv_ros.ros.odometry.OdometryBuffer` waits for odometry, and the message is decoded only when
the detector admitted the frame (a callable, :meth:`LoopClosureDetector.process`'s ``depth``).
A depth camera streams faster than a keyframe is extracted (a RealSense: 30 Hz, ``capacity`` 8 = 0.27 s), so
the node :meth:`DepthInput.pin` s each colour frame's stamp when the frame arrives: the nearest depth image to
a pinned stamp is kept beyond the ring until that frame is handled (or :data:`MAX_PINS` newer frames came).

Bad depth never costs the keyframe: a wrong encoding, a size other than the colour image's, an image without
one valid depth (all zero, all NaN), or a malformed buffer is skipped (the keyframe is made without 3-D
points), counted under its kind (:data:`SKIPS`) and said in a warning, once per kind until good depth comes.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from pnv_ros.errors import ImageError
from pnv_ros.image_msgs import depth_to_array
from pnv_ros.local_features import MM_PER_M, depth_in_metres

#: skip kinds, the diagnostics' event names: what each means
SKIPS = {
    "depth_encoding": "depth images of an encoding other than 16UC1 / 32FC1 skipped",
    "depth_size": "depth images of another size than the colour image skipped",
    "depth_empty": "depth images without one valid depth (all zero / NaN) skipped",
    "depth_malformed": "depth images whose buffer does not fit their size skipped",
    "depth_unmatched": "frames without a depth image within depth_tolerance_s of their stamp",
}
#: colour frames pinned at once: the worker's one-place slot, the frame in hand and spare (pins of frames the
#: worker dropped are released by newer ones)
MAX_PINS = 4


@dataclass
class DepthAnswer:
    """What :meth:`DepthInput.for_frame` found: the depth in metres (or None), the skip kind (a key of
    :data:`SKIPS`, or None) and a warning to log (or None)."""

    depth_m: np.ndarray | None = None
    skip: str | None = None
    warning: str | None = None


class DepthInput:
    """Recent depth messages (a small ring, newest last), looked up by the nearest stamp; thread-safe.

    Args:
        capacity: depth messages kept (a few frames' worth: a depth camera at 30 Hz against a colour frame
            taken after at most a tolerance's wait).
        scale: units of a 16UC1 image per metre (REP 118: 1000).
    """

    def __init__(self, capacity: int = 8, scale: float = MM_PER_M) -> None:
        self._cond = threading.Condition()
        self._ring: deque[tuple[int, Any]] = deque(maxlen=capacity)
        self._warned: set[str] = set()
        self._frames_warned: set[tuple[str, str]] = set()  # (colour frame, depth frame) pairs said
        self._pins: dict[int, tuple[int, Any] | None] = {}  # colour stamp -> (stamp, msg) nearest it so far
        self.scale = scale
        self.counts = {k: 0 for k in SKIPS}

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, stamp_ns: int, msg: Any) -> None:
        """Keep a depth message (not decoded); a stamp older than the newest (a clock reset) drops the others."""
        with self._cond:
            if self._ring and stamp_ns < self._ring[-1][0]:
                self._ring.clear()
            self._ring.append((stamp_ns, msg))
            for want, best in self._pins.items():
                if best is None or abs(stamp_ns - want) < abs(best[0] - want):
                    self._pins[want] = (stamp_ns, msg)
            self._cond.notify_all()

    def pin(self, stamp_ns: int) -> None:
        """A colour frame of this stamp arrived (to be handled later): keep the depth message nearest it, from
        the ring now and from those still to come, until :meth:`nearest` is asked for it (or :data:`MAX_PINS`
        newer frames are pinned)."""
        with self._cond:
            best = min(self._ring, key=lambda e: abs(e[0] - stamp_ns)) if self._ring else None
            self._pins[stamp_ns] = best
            while len(self._pins) > MAX_PINS:
                del self._pins[next(iter(self._pins))]

    def nearest(self, stamp_ns: int, tolerance_ns: int) -> Any | None:
        """The message nearest the stamp within the tolerance, or None. When the newest is older than the stamp
        by at most the tolerance (depth flowing, this instant's not yet here), waits up to the tolerance (wall
        seconds) for a newer one."""

        def settled() -> bool:
            return not self._ring or not 0 < stamp_ns - self._ring[-1][0] <= tolerance_ns

        with self._cond:
            self._cond.wait_for(settled, timeout=tolerance_ns / 1e9)
            pinned = self._pins.get(stamp_ns)
            for want in [w for w in self._pins if w <= stamp_ns]:  # this frame's and older (dropped) frames'
                del self._pins[want]
            candidates = [*self._ring, *([pinned] if pinned else [])]
            if not candidates:
                return None
            s, msg = min(candidates, key=lambda e: abs(e[0] - stamp_ns))
        return msg if abs(s - stamp_ns) <= tolerance_ns else None

    def for_frame(
        self, stamp_ns: int, tolerance_ns: int, image_shape: tuple[int, ...], image_frame: str = ""
    ) -> DepthAnswer:
        """The depth (H, W) float32 metres (NaN = none) for the colour frame of this stamp and shape, or why
        not. No depth ever received is no skip (a camera without depth): an empty answer. A depth image whose
        header.frame_id is not the colour image's ``image_frame`` is used, with a warning once per pair of
        frames: registered depth carries the colour camera's frame (a RealSense's aligned_depth_to_color,
        depth_image_proc's register); the depth camera's own (``depth/image_rect_raw``) is not registered, and
        its points would make wrong METRIC poses (some recorded sets, TUM's bags, keep the depth frame's name on
        registered depth: hence a warning, not a skip)."""
        if not len(self):
            return DepthAnswer()
        msg = self.nearest(stamp_ns, tolerance_ns)
        if msg is None:
            return self._skip("depth_unmatched", "no depth image within depth_tolerance_s of the frame's stamp")
        try:
            raw, enc = depth_to_array(msg)
        except ImageError as e:
            return self._skip("depth_encoding" if "encoding" in str(e) else "depth_malformed", str(e))
        h, w = image_shape[:2]
        if raw.shape != (h, w):
            return self._skip(
                "depth_size", f"the depth image is {raw.shape[1]} x {raw.shape[0]}, the colour image {w} x {h}"
            )
        depth_m = depth_in_metres(raw, "16UC1" if enc == "mono16" else enc, self.scale)
        if not np.isfinite(depth_m).any():
            return self._skip(
                "depth_empty", f"the {enc} depth image has no valid depth (all zero, NaN or out of range)"
            )
        self._warned.clear()  # good depth again: the next trouble is said again
        frame = str(getattr(getattr(msg, "header", None), "frame_id", "") or "")
        if not image_frame or not frame or frame == image_frame or (image_frame, frame) in self._frames_warned:
            return DepthAnswer(depth_m)
        self._frames_warned.add((image_frame, frame))
        return DepthAnswer(
            depth_m,
            warning=f"the depth image's frame_id {frame!r} is not the colour image's {image_frame!r}: depth must be "
            "registered to the colour camera (a RealSense's aligned_depth_to_color/image_raw, depth_image_proc's "
            "register); unregistered depth makes wrong METRIC poses",
        )

    def _skip(self, kind: str, reason: str) -> DepthAnswer:
        self.counts[kind] += 1
        warning = None
        if kind not in self._warned:
            self._warned.add(kind)
            warning = f"depth skipped: {reason}; keyframes are made without 3-D points (no METRIC pose)"
        return DepthAnswer(None, kind, warning)
