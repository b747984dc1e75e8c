"""The node's process: rclpy up, the node spun until SIGINT or SIGTERM, then an orderly exit.

Kept apart from :mod:`pnv_ros.ros.node` (which holds only the node's ROS plumbing); ``loop_closure_node``
runs :func:`pnv_ros.ros.node.main`, which hands its node class to :func:`run`.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.signals import SignalHandlerOptions

from pnv_ros.errors import PnvError
from pnv_ros.ros.executor import Executor


def run(make_node: Callable[[], Any], argv: list[str] | None = None) -> int:
    """Run the node ``make_node()`` builds until SIGINT or SIGTERM; then finish the frame in hand (published),
    save the map if asked (the node's ``shutdown()``), and exit 0 (1 with one ``error:`` line when the node
    cannot start: a PnvError). ROS is shut down only after that, and further signals during the shutdown (a
    second Ctrl-C, launch's SIGTERM after SIGINT) do not cut it short."""
    rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    node, ex, spinner = None, None, None
    try:
        node = make_node()
        ex = Executor(num_threads=4)
        ex.add_node(node)
        spinner = threading.Thread(target=ex.spin, name="pnv-executor", daemon=True)
        spinner.start()
        while not stop.wait(0.5) and spinner.is_alive():
            pass
    except PnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # ignored from here: a late Ctrl-C must not kill the exit
            signal.signal(sig, signal.SIG_IGN)  # (Python restores SIG_DFL at exit for its handlers, not SIG_IGN)
        if node is not None:
            node.shutdown()  # with ROS still up: the frame in hand is published, the map saved
        if ex is not None:
            ex.shutdown(timeout_sec=5)
        if spinner is not None:  # out of rclpy's C++ first: a daemon thread still in it at interpreter exit is
            spinner.join(timeout=5)  # killed there, an abort ("terminate called without an active exception")
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0 if stop.is_set() else 1  # not stopped by a signal: the executor died (a callback raised)
