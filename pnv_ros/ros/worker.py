"""A latest-wins worker thread (no rclpy: testable alone).

A camera publishes faster than a keyframe can be extracted. :meth:`offer`
puts a frame in a one-place slot; a frame still waiting there is replaced
(dropped and counted), never queued, so the node always works on the newest
frame and memory stays flat however fast frames arrive. One thread takes
frames from the slot and hands them to ``handle``; whatever ``handle`` raises
goes to ``on_error`` with its traceback and the thread carries on.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any


class LatestWinsWorker:
    """Args:
    handle: called with each frame taken, on the worker thread.
    on_error: called with (frame, exception, traceback text) when ``handle`` raises.
    on_drop: called with each frame replaced in the slot or throttled (may be None).
    max_rate_hz: a callable giving the current cap on frames handled per second (0 = none).
    """

    def __init__(
        self,
        handle: Callable[[Any], None],
        on_error: Callable[[Any, BaseException, str], None],
        on_drop: Callable[[Any], None] | None = None,
        max_rate_hz: Callable[[], float] = lambda: 0.0,
        name: str = "pnv-worker",
    ) -> None:
        self._handle, self._on_error, self._on_drop, self._max_rate = handle, on_error, on_drop, max_rate_hz
        self._cv = threading.Condition()
        self._slot: Any = None
        self._has = False
        self._stop = False
        self._busy = False
        self._last = float("-inf")
        self.counts = {"received": 0, "dropped": 0, "handled": 0, "errors": 0}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, frame: Any) -> None:
        """Put a frame in the slot (any thread); a frame still waiting is dropped."""
        dropped = None
        with self._cv:
            self.counts["received"] += 1
            if self._has:
                dropped = self._slot
                self.counts["dropped"] += 1
            self._slot, self._has = frame, True
            self._cv.notify()
        if dropped is not None and self._on_drop:
            self._on_drop(dropped)

    @property
    def busy(self) -> bool:
        """Whether a frame is being handled now."""
        return self._busy

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._has and not self._stop:
                    self._cv.wait(0.2)
                if self._stop:
                    return
                frame, self._slot, self._has = self._slot, None, False
                rate = float(self._max_rate())
                throttled = rate > 0 and time.monotonic() - self._last < 1.0 / rate
                if throttled:
                    self.counts["dropped"] += 1
                else:
                    self._last, self._busy = time.monotonic(), True
            if throttled:
                if self._on_drop:
                    self._on_drop(frame)
                continue
            try:
                self._handle(frame)
            except BaseException as e:  # noqa: BLE001 - one frame never stops the worker
                with self._cv:
                    self.counts["errors"] += 1
                self._on_error(frame, e, traceback.format_exc())
            finally:
                with self._cv:
                    self.counts["handled"] += 1
                    self._busy = False

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop after the frame in hand; True when the thread ended within ``timeout``."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self) -> dict[str, int]:
        with self._cv:
            return dict(self.counts)
