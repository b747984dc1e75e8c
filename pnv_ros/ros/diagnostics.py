"""The node's health, assessed without rclpy: recent events in, a level and the problems out.

The node records what happens (a frame's status, a dropped frame, bad odometry, an incompatible QoS, ...) as
events in an :class:`EventLog`; once a second it counts those of the last :data:`DIAG_WINDOW_S` seconds, asks
:func:`assess` for a level and a list of problems, and only converts the answer (and :func:`report_values`) to
a ``diagnostic_msgs/DiagnosticArray``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from pnv_ros.ros.depth import SKIPS

#: Diagnostics look back this far (s) for rising bad, dropped or skipped frames.
DIAG_WINDOW_S = 10.0
#: Statuses of frames the worker took (not dropped), for the diagnostics window.
TAKEN = (
    "keyframe",
    "error",
    "duplicate",
    "out_of_order",
    "too_soon",
    "no_motion",
    "no_information",
    "no_visual_change",
    "map_changed",
)
#: Warn when no image has arrived for this long (s): a wrong topic or incompatible QoS.
NO_INPUT_WARN_S = 5.0
#: Input troubles that are each a warning: event kind -> what it means.
WARNINGS = {
    "bad_odom": "odometry with NaN or a zero quaternion ignored",
    "bad_camera_info": "camera_info that is not a camera matrix ignored",
    "camera_info_size": "frames not of camera_info's size (no relative pose)",
    "late_odom": "odometry older than the newest dropped (two publishers?)",
    "odom_unmatched": "frames without odometry within odom_tolerance_s of their stamp "
    "(odometry stopped, or stamped on another clock?)",
    **SKIPS,  # depth images skipped: keyframes without 3-D points (pnv_ros.ros.depth)
}


#: A keyframe's stages the node reports (``latency_<stage>_p50_ms`` / ``_max_ms``), from
#: :class:`pnv_ros.detector.FrameResult`'s timings: decoding the message, the picture tests, the extractor's own
#: stages (where it reports them), local features, retrieval (FAISS top-n, the fleet's wait included), re-ranking
#: (patch matching), the map add, an accepted loop's pose; and the sums ``extract``, ``commit`` and ``total``.
STAGES = (
    "decode",
    "look",
    "preprocess",
    "backbone",
    "pooling",
    "patch_descriptors",
    "local_features",
    "retrieval",
    "fleet",
    "rerank",
    "map_add",
    "pose",
    "extract",
    "commit",
    "total",
)


class Latency:
    """The last ``maxlen`` keyframes' seconds per stage (:data:`STAGES`); :meth:`add` and :meth:`snapshot`
    from any thread. A stage a keyframe did not report (no extractor stages, no loop's pose) is not recorded."""

    def __init__(self, maxlen: int = 100) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, deque[float]] = {k: deque(maxlen=maxlen) for k in STAGES}

    def add(self, timings: Mapping[str, float]) -> None:
        """One keyframe's timings (seconds by stage name; other names ignored)."""
        with self._lock:
            for k, d in self._series.items():
                if k in timings:
                    d.append(float(timings[k]))

    def snapshot(self) -> dict[str, list[float]]:
        """Seconds per stage, oldest first (copies: safe while keyframes are added)."""
        with self._lock:
            return {k: list(d) for k, d in self._series.items()}


class Level(IntEnum):
    """diagnostic_msgs/DiagnosticStatus levels (the message's byte values)."""

    OK = 0
    WARN = 1
    ERROR = 2


@dataclass
class Assessment:
    """The worst level found and one sentence per problem (empty when all is well)."""

    level: Level = Level.OK
    problems: list[str] = field(default_factory=list)

    def flag(self, level: Level, text: str) -> None:
        self.level = max(self.level, level)
        self.problems.append(text)


class EventLog:
    """(monotonic time, kind) of recent events, at most ``maxlen``; :meth:`add` from any thread."""

    def __init__(self, maxlen: int = 10000) -> None:
        self._events: deque[tuple[float, str]] = deque(maxlen=maxlen)

    def add(self, kind: str) -> None:
        self._events.append((time.monotonic(), kind))

    def recent(self, now: float, window_s: float = DIAG_WINDOW_S) -> dict[str, int]:
        """Events per kind in the ``window_s`` seconds up to ``now`` (time.monotonic())."""
        counts: dict[str, int] = {}
        for t, kind in list(self._events):
            if now - t <= window_s:
                counts[kind] = counts.get(kind, 0) + 1
        return counts


def assess(
    recent: Mapping[str, int],
    *,
    silent_s: float,
    image_topic: str,
    store_trouble: str = "",
    unloadable: str | None = None,
    last_error: str = "",
    fleet: tuple[str, str] | None = None,
) -> Assessment:
    """The node's level and problems.

    recent: events per kind in the last :data:`DIAG_WINDOW_S` s (frame statuses, 'dropped', 'time_jump',
    'qos_incompatible' and the kinds of :data:`WARNINGS`). silent_s: seconds since the last image (since the
    start when none came). image_topic: the resolved image topic, for the no-input warning. store_trouble: the
    map store's trouble ('' = none). unloadable: the map file that failed to load at start, if any.
    last_error: the reason of the last bad frame. fleet: the fleet member's (level 'OK' | 'WARN' | 'ERROR',
    problem) (:meth:`pnv_ros.fleet.member.FleetMember.status`), None without a fleet.
    """
    a = Assessment()
    if fleet is not None and fleet[0] != "OK":
        a.flag(Level.ERROR if fleet[0] == "ERROR" else Level.WARN, fleet[1])
    if store_trouble:
        a.flag(Level.ERROR, f"map store: {store_trouble}")
    if unloadable is not None:
        a.flag(Level.ERROR, f"load_map: {unloadable} failed to load at start (see the log); the map started empty")
    if recent.get("qos_incompatible"):
        a.flag(Level.ERROR, "incompatible QoS: no messages arrive (see the log)")
    taken = sum(recent.get(k, 0) for k in TAKEN)
    if recent.get("error"):
        a.flag(
            Level.ERROR if recent["error"] == taken else Level.WARN,
            f"{recent['error']} bad frames in {DIAG_WINDOW_S:.0f} s: {last_error}",
        )
    if recent.get("duplicate") and recent["duplicate"] == taken:
        a.flag(Level.ERROR, "every frame repeats the previous stamp: does the camera driver stamp its images?")
    elif recent.get("time_jump") or recent.get("out_of_order") or recent.get("duplicate"):
        a.flag(Level.WARN, "stamps out of order, repeated or jumping back (see time_jumps)")
    for kind, text in WARNINGS.items():
        if recent.get(kind):
            a.flag(Level.WARN, f"{recent[kind]} x {text}")
    if recent.get("dropped", 0) > 20 * max(1, taken):
        a.flag(Level.WARN, "most frames are dropped: consider max_rate_hz or a lighter preset")
    if silent_s > NO_INPUT_WARN_S:
        a.flag(Level.WARN, f"no image on {image_topic} for {NO_INPUT_WARN_S:.0f} s (topic, QoS?)")
    return a


def time_jump_warning(stamp_ns: int, jumps: int) -> str:
    """The log line for a frame whose stamp (ns) went back: the ``jumps``-th time jump, a new session segment."""
    return (
        f"time went back: frame stamped {stamp_ns / 1e9:.3f} s after newer frames (clock reset, use_sim_time "
        f"restart or a looping bag); a new session segment starts (time jump {jumps})"
    )


def report_values(
    detector: Mapping[str, object],
    worker: Mapping[str, int],
    node: Mapping[str, int],
    recent: Mapping[str, int],
    latency: Mapping[str, Sequence[float]],
) -> dict[str, str]:
    """The key-value pairs of the status: the detector's, worker's (``worker_``) and node's counters, the
    window's events (``recent_``), latency median and maximum (``latency_<stage>_p50_ms``/``_max_ms``, from
    seconds) and the process's peak memory (``max_rss_mb``)."""
    import numpy as np

    vals = {
        **{k: str(v) for k, v in detector.items()},
        **{f"worker_{k}": str(v) for k, v in worker.items()},
        **{k: str(v) for k, v in node.items()},
        **{f"recent_{k}": str(v) for k, v in recent.items()},
    }
    for k, d in latency.items():
        if d:
            vals[f"latency_{k}_p50_ms"] = f"{1000 * float(np.median(d)):.1f}"
            vals[f"latency_{k}_max_ms"] = f"{1000 * float(np.max(d)):.1f}"
    try:
        import resource

        vals["max_rss_mb"] = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
    except ImportError:  # pragma: no cover
        pass
    return vals
