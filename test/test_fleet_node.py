"""A fleet of real loop_closure_node processes on a real PostgreSQL + pgvector over loopback TCP.

Robot A (namespace /robot_a) drives the RTAB-Map loop's first lap, robot B (/robot_b) the second, each a frame a
simulated second, in lockstep (each frame's ~/processed answer before the next). The database is killed with
SIGKILL in the middle of A's lap and restarted ten frames later: both nodes keep answering every frame, A says
WARN on /diagnostics meanwhile, and A's outbox uploads every keyframe once when the database is back. B's loops
to A's keyframes arrive with match_robot_id A (precision 1.0, recall >= 0.8 of the revisits); no robot closes a
loop to its own recent keyframes; every loop is one row of loop_edges. Then A restarts with the same robot_id and
an empty map and drives the start of its lap again: loops to its earlier session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import RTAB, rtab_frame
from PIL import Image as PILImage

rclpy = pytest.importorskip("rclpy")  # installed by scripts/setup.sh; CI fails loudly in test_node if absent
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from pnv_ros.msg import LoopClosure  # noqa: E402
from pnv_ros.srv import QueryPlace, VerifyPair  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from test_node import image_msg, stop_node  # noqa: E402

NODE = str(Path(sys.executable).parent / "loop_closure_node")
G = np.load(RTAB.parent / "gt_matrix.npy")  # G[i, j] = 1: frame i + 1 revisits frame j + 1
EXCLUDE_RECENT_S = 10  # the nodes' exclude_recent_s (as test_node's)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Robot:
    """A loop_closure_node process in namespace /<name> and this test's client of it (in the test's rclpy node)."""

    def __init__(self, client, name: str, dsn: str, map_dir: Path) -> None:
        self.name, self.client = name, client
        ns = f"/{name}"
        args = [NODE, "--ros-args", "-r", f"__ns:={ns}", "-p", f"map_dir:={map_dir}"]
        for k, v in (("exclude_recent_s", f"{EXCLUDE_RECENT_S}.0"), ("fleet_dsn", dsn), ("robot_id", name)):
            args += ["-p", f"{k}:={v}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pub = client.create_publisher(Image, f"{ns}/image", 10)
        self.loops: list[LoopClosure] = []
        self.acks: dict[int, str] = {}
        client.create_subscription(LoopClosure, f"{ns}/loop_closures", self.loops.append, 100)
        client.create_subscription(Header, f"{ns}/loop_closure/processed", self._ack, 1000)
        self.query = client.create_client(QueryPlace, f"{ns}/loop_closure/query_place")
        self.verify = client.create_client(VerifyPair, f"{ns}/loop_closure/verify_pair")

    def _ack(self, h: Header) -> None:
        self.acks[h.stamp.sec] = h.frame_id

    def wait_ready(self) -> None:
        assert self.query.wait_for_service(timeout_sec=180), f"{self.name} did not come up"
        assert spin_until(self.client, lambda: self.pub.get_subscription_count() > 0, 30)

    def drive(self, frame: int) -> str:
        """Frame ``frame`` of the RTAB-Map loop stamped ``frame`` s; its answer on ~/processed."""
        self.pub.publish(image_msg(np.asarray(PILImage.open(rtab_frame(frame)).convert("RGB")), frame))
        assert spin_until(self.client, lambda: frame in self.acks, 120), f"{self.name}: frame {frame} unanswered"
        return self.acks[frame]

    def call(self, cli, req):
        fut = cli.call_async(req)
        assert spin_until(self.client, fut.done, 60)
        return fut.result()

    def stop(self) -> str:
        return stop_node(self.proc)


def spin_until(node, cond, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
        if cond():
            return True
    return False


def rows(dsn: str, sql: str, args=()) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn) as c:
        return c.execute(sql, args).fetchall()


def fleet_values(diags: list[DiagnosticArray], robot: str) -> list[dict]:
    """The loop-closure statuses of ``robot`` (its fleet_robot_id value) seen on /diagnostics, oldest first."""
    out = []
    for arr in diags:
        for st in arr.status:
            values = {kv.key: kv.value for kv in st.values}
            if values.get("fleet_robot_id") == robot:
                out.append(
                    {"level": st.level[0] if isinstance(st.level, bytes) else st.level, "message": st.message, **values}
                )
    return out


def scored(loops: list[LoopClosure], robot: str, frames: range) -> tuple[float, float, int]:
    """(precision, recall over the frames' revisits of lap 1 (frames 1-40), count) of the loops to ``robot``."""
    to_lap1 = [lc for lc in loops if lc.match_from_fleet and lc.match_robot_id == robot]
    correct = sum(int(G[lc.query_stamp.sec - 1, lc.match_seq]) for lc in to_lap1)
    revisits = int(G[[f - 1 for f in frames]][:, :40].any(axis=1).sum())
    return correct / max(1, len(to_lap1)), correct / revisits, len(to_lap1)


@pytest.mark.slow
def test_two_robots_share_a_fleet_map_through_a_database_killed_mid_run(tmp_path: Path) -> None:
    from pnv_ros.fleet.server import LocalServer
    from pnv_ros.fleet.store import init_store

    root = Path(tempfile.mkdtemp(prefix="pnv_fleet_node_"))
    root.chmod(0o755)  # open to pass for the server's user (see conftest's fleet_server)
    server = LocalServer(root / "db", port=free_port(), tcp=True)
    rclpy.init()
    client = rclpy.create_node("pnv_fleet_test_client")
    diags: list[DiagnosticArray] = []
    client.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 100)
    robots: list[Robot] = []
    try:
        server.start()
        dsn, local_dsn = server.tcp_dsn(), server.dsn()
        assert "127.0.0.1" in dsn
        init_store(dsn)
        a = Robot(client, "robot_a", dsn, tmp_path / "a")
        b = Robot(client, "robot_b", dsn, tmp_path / "b")
        robots += [a, b]
        a.wait_ready()
        b.wait_ready()

        # -- robot A's lap; the database dies at frame 15 and comes back at frame 25 ------------------------
        for f in range(1, 41):
            if f == 15:
                os.kill(server.pid, signal.SIGKILL)
                assert server.wait(10) == -signal.SIGKILL
            if f == 25:
                down = fleet_values(diags, "robot_a")[-1]
                server.start()
            assert a.drive(f) == "keyframe"
        assert down["level"] == 1 and "fleet" in down["message"], down  # WARN while the database was away
        assert int(down["fleet_pending"]) >= 5
        assert a.proc.poll() is None and b.proc.poll() is None  # both nodes ran through it
        stored = lambda: rows(local_dsn, "SELECT seq FROM pnv_fleet.keyframes WHERE robot_id = 'robot_a'")  # noqa: E731
        assert spin_until(client, lambda: len(stored()) >= 40, 90), len(stored())
        assert sorted(s for (s,) in stored()) == list(range(40))  # every keyframe once: nothing lost, no duplicate
        (session_a,) = rows(local_dsn, "SELECT DISTINCT session FROM pnv_fleet.keyframes WHERE robot_id = 'robot_a'")

        # -- robot B's lap: loops to robot A's keyframes ----------------------------------------------------
        for f in range(41, 85):
            assert b.drive(f) == "keyframe"
        precision, recall, n = scored(b.loops, "robot_a", range(41, 85))
        print(f"\nB -> A: {n} loops, precision {precision:.3f}, recall {recall:.3f}")
        assert precision == 1.0 and recall >= 0.8
        assert all(lc.match_session == session_a[0] and lc.match_fleet_id > 0 for lc in b.loops if lc.match_from_fleet)
        r = b.call(b.query, QueryPlace.Request(mode=QueryPlace.Request.BY_ID, keyframe_id=21, top_n=5))  # frame 62
        assert r.success and r.from_fleet[0] and r.robot_ids[0] == "robot_a" and G[61, r.seqs[0]] == 1, r
        v = b.call(b.verify, VerifyPair.Request(id_a=21, fleet_id_b=r.fleet_ids[0]))
        assert v.success and v.score >= 0.12, v.message

        # -- every loop is one loop edge; none to a robot's own recent keyframes ----------------------------
        time.sleep(2.0)  # the outboxes send edges once both ends are stored
        edges = rows(
            local_dsn,
            "SELECT q.robot_id, q.seq, m.robot_id, m.seq FROM pnv_fleet.loop_edges e "
            "JOIN pnv_fleet.keyframes q ON q.id = e.query_id JOIN pnv_fleet.keyframes m ON m.id = e.match_id",
        )
        published = [(r.name, lc.query_id, lc.match_robot_id, lc.match_seq) for r in robots for lc in r.loops]
        assert sorted(edges) == sorted(published) and len(set(edges)) == len(edges)
        for r in robots:
            for lc in r.loops:
                if lc.match_robot_id == r.name and not lc.match_from_fleet:
                    assert lc.query_stamp.sec - lc.match_stamp.sec >= EXCLUDE_RECENT_S

        # -- robot A restarts with the same robot_id and an empty map and drives its first lap's start again
        # (robot B's keyframes hold every place of lap 2, and the same frames there would match B's copies):
        # loops to its earlier session, which the fleet search leaves in (only the current session is left out)
        out = a.stop()
        assert a.proc.returncode == 0, out[-3000:]
        a2 = Robot(client, "robot_a", dsn, tmp_path / "a")
        robots[0] = a2
        a2.wait_ready()
        for f in range(1, 13):
            assert a2.drive(f) == "keyframe"
        again = [lc for lc in a2.loops if lc.match_from_fleet]
        print(f"A restarted -> {[(lc.query_stamp.sec, lc.match_robot_id, lc.match_seq + 1) for lc in again]}")
        assert len(again) >= 10 and all(lc.match_robot_id == "robot_a" for lc in again)
        assert all(lc.match_session == session_a[0] and lc.match_seq == lc.query_stamp.sec - 1 for lc in again)
    finally:
        outs = [r.stop() for r in robots]
        client.destroy_node()
        rclpy.shutdown()
        server.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    for r, out in zip(robots, outs):
        assert r.proc.returncode == 0, out[-3000:]
