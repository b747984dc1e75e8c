"""The node's executor: rclpy's MultiThreadedExecutor without its busy spin (ros2/rclpy#1452).

rclpy 9.1 (ROS 2 Kilted) yields every callback that has not started yet on each turn of its spin loop, so while
a callback waits in the thread pool queue the spin thread turns without waiting and holds the GIL (fixed
upstream by ros2/rclpy#1547, after that release). Measured (``benchmarks/node_load.py``): the node idle but for
100 Hz odometry burned a whole core. Submitting each callback and returning only once it runs keeps the
upstream loop and removes the spin.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import rclpy
from rclpy.executors import MultiThreadedExecutor


class StartedPool(ThreadPoolExecutor):
    """A thread pool whose :meth:`submit` returns once the callable has started on a pool thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        started = threading.Event()

        def run() -> Any:
            started.set()
            return fn(*args, **kwargs)

        future = super().submit(run)
        while not started.wait(0.05) and not future.done():  # done: cancelled by a shutdown
            pass
        return future


class Executor(MultiThreadedExecutor):
    """rclpy's MultiThreadedExecutor whose callbacks are each handed to the pool once (see the module)."""

    def __init__(self, num_threads: int, *, context: rclpy.context.Context | None = None) -> None:
        super().__init__(num_threads=num_threads, context=context)
        self._executor.shutdown(wait=False)
        self._executor = StartedPool(num_threads)
