"""The outbox (pnv_ros.fleet.outbox) on a real PostgreSQL + pgvector: keyframes of a real PlaceMap go up while
the database is up; a ``kill -9`` of the server mid-stream and a restart lose none and duplicate none, and the
producer's ``add`` never waits for the network. Random unit descriptors: only the bookkeeping is tested."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fleet_database
from test_fleet_store import RANDOM_MODEL, SPEED, random_features, server_processes

from pnv_ros.errors import FleetError
from pnv_ros.features import PlaceFeatures
from pnv_ros.fleet.outbox import Outbox
from pnv_ros.fleet.store import FleetStore, init_store
from pnv_ros.place_map import PlaceMap

#: Short waits for the tests (the defaults are 1 s doubling to 30 s): a restart is retried within a second.
BACKOFF = (0.2, 1.0)


@pytest.fixture
def outbox_db(fleet_server) -> str:
    """A new database with an empty store on the session's server; its DSN. Dropped afterwards."""
    with fleet_database(fleet_server, "o", init=True) as dsn:
        yield dsn


def keyframes(rng: np.random.Generator, n: int) -> list[PlaceFeatures]:
    """n keyframes with distinct random global descriptors and local features; patches from a pool of 3 (random
    ~1 MB float16 patch sets are slow to draw; the upload does not look at them)."""
    pool = [random_features(rng, 0).patches for _ in range(3)]
    out = []
    for i in range(n):
        f = random_features(rng, 8)
        out.append(PlaceFeatures(f.global_desc, pool[i % 3], f.image_size, f.local))
    return out


def new_map() -> PlaceMap:
    return PlaceMap(512, SPEED, RANDOM_MODEL)


def opener(dsn: str):
    return lambda: FleetStore.open(dsn, 512, SPEED, RANDOM_MODEL, connect_timeout_s=2)


def stored_rows(dsn: str) -> list[tuple[str, str, int]]:
    import psycopg

    with psycopg.connect(dsn) as c:
        return c.execute("SELECT robot_id, session, seq FROM pnv_fleet.keyframes ORDER BY session, seq").fetchall()


def test_the_outbox_uploads_each_generation_under_its_session_and_a_resend_stores_nothing(outbox_db, rng) -> None:
    lock = threading.RLock()
    feats = keyframes(rng, 8)
    first, second = new_map(), new_map()
    with Outbox(opener(outbox_db), "A", lock, first, session="s1", backoff_s=BACKOFF) as box:
        for i, f in enumerate(feats[:5]):
            assert box.add(f, 1000 + i, np.array([i, 0.0, 0.0])) == i
        box.add_loop_edge(4, 0.7, "rapid", match_id=0)  # queued before either end is stored
        with pytest.raises(FleetError, match="keyframe 9 is not one of this run's"):
            box.add_loop_edge(9, 0.7, "rapid", match_id=0)
        with pytest.raises(FleetError, match="match_id .* or match_fleet_id"):
            box.add_loop_edge(4, 0.7, "rapid")
        assert box.track(second, "s2") == "s2" == box.session  # a reset: a new map is a new session
        for i, f in enumerate(feats[5:]):
            box.add(f, 2000 + i)
        assert box.flush(30)
        s1_first = stored_ids(outbox_db, "s1")[1]
        box.add_loop_edge(2, 0.6, "rapid", match_fleet_id=s1_first)  # to a keyframe of the earlier session
        box.add_loop_edge(2, 0.6, "rapid", match_fleet_id=10**9)  # a fleet id the store does not hold
        assert box.flush(30)
        st = box.status()
        assert (st.state, st.level, st.pending, st.uploaded, st.duplicates, st.failures) == ("idle", "OK", 0, 8, 0, 0)
        assert (st.edges_pending, st.edges_uploaded, st.edges_dropped) == (0, 2, 1)
        assert "no such keyframe" in st.last_error
        ids = [box.fleet_id("s2", seq) for seq in range(3)]
    assert stored_rows(outbox_db) == [("A", "s1", i) for i in range(5)] + [("A", "s2", i) for i in range(3)]
    s1 = stored_ids(outbox_db, "s1")
    with FleetStore.open(outbox_db, 512, SPEED, RANDOM_MODEL) as s:
        edges = [(e.query_id, e.match_id, e.reporter) for e in s.loop_edges()]
    assert edges == [(s1[4], s1[0], "A"), (ids[2], s1[1], "A")]
    with FleetStore.open(outbox_db, 512, SPEED, RANDOM_MODEL) as s:
        got = s.fetch([i for i in ids if i is not None])
    assert len(got) == 3
    for k, f in zip(got, feats[5:]):
        np.testing.assert_array_equal(k.features.global_desc, f.global_desc)
        np.testing.assert_array_equal(k.features.patches[0], np.asarray(f.patches[0], np.float16))
        np.testing.assert_array_equal(k.features.local.descriptors, f.local.descriptors)
        assert k.position is None
    # an uploader restarted from an older watermark (a crash before it was saved): everything again, nothing new
    with Outbox(opener(outbox_db), "A", lock, first, session="s1", backoff_s=BACKOFF) as box:
        assert box.flush(30)
        assert (box.status().uploaded, box.status().duplicates) == (5, 5)
    assert len(stored_rows(outbox_db)) == 8


def stored_ids(dsn: str, session: str) -> list[int]:
    """The fleet ids of a session's keyframes in seq order."""
    import psycopg

    with psycopg.connect(dsn) as c:
        sql = "SELECT id FROM pnv_fleet.keyframes WHERE session = %s ORDER BY seq"
        return [r[0] for r in c.execute(sql, (session,)).fetchall()]


def test_a_store_of_another_model_stops_the_uploads_not_the_producer(outbox_db, rng) -> None:
    FleetStore.open(outbox_db, 512, SPEED, "other:512:fedcba987654").close()  # bound to another model
    lock = threading.RLock()
    with Outbox(opener(outbox_db), "A", lock, new_map(), backoff_s=BACKOFF) as box:
        feats = keyframes(rng, 3)
        box.add(feats[0], 1)
        assert not box.flush(10)
        for i, f in enumerate(feats[1:]):
            box.add(f, 2 + i)  # the local map goes on
        st = box.status()
    assert (st.state, st.level, st.pending, st.uploaded) == ("failed", "ERROR", 3, 0)
    assert "comes from model other:512:fedcba987654" in st.last_error
    assert stored_rows(outbox_db) == []


def test_uploads_refused_for_want_of_a_store_go_on_once_the_admin_makes_it(fleet_server, rng) -> None:
    """A robot started before ``pnv fleet init``: ERROR (no store) while the map goes on; once the store is made,
    the pending keyframes go up without a restart (before, the uploader thread ended at the first refusal)."""
    with fleet_database(fleet_server, "o", init=False) as dsn:
        with Outbox(opener(dsn), "A", threading.RLock(), new_map(), session="s1", backoff_s=BACKOFF) as box:
            feats = keyframes(rng, 4)
            for i, f in enumerate(feats[:2]):
                box.add(f, i + 1)
            assert not box.flush(5)
            st = box.status()
            assert (st.state, st.level, st.pending) == ("failed", "ERROR", 2) and "pnv fleet init" in st.last_error
            init_store(dsn)
            for i, f in enumerate(feats[2:], 2):
                box.add(f, i + 1)
            deadline = time.monotonic() + 30  # flush answers False at once while the state is still 'failed'
            while box.status().pending and time.monotonic() < deadline:
                time.sleep(0.2)
            st = box.status()
        assert (st.level, st.pending, st.uploaded) == ("OK", 0, 4), st
        assert stored_rows(dsn) == [("A", "s1", i) for i in range(4)]


def test_a_database_that_hangs_never_holds_up_the_producer(rng) -> None:
    """A server that takes the TCP connection and never answers (a hung host): each connection attempt of the
    uploader waits out its 2 s timeout, meanwhile the producer's adds take only their memory copies."""
    import socket

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the handshakes; nothing ever answers the startup packet
        dsn = f"host=127.0.0.1 port={hung.getsockname()[1]} dbname=x user=u connect_timeout=2"
        lock = threading.RLock()
        feats = keyframes(rng, 30)
        with Outbox(opener(dsn), "A", lock, new_map(), backoff_s=BACKOFF) as box:
            durations = []
            for i, f in enumerate(feats):
                t0 = time.perf_counter()
                box.add(f, i + 1)
                durations.append(time.perf_counter() - t0)
                time.sleep(0.1)
            st = box.status()
        assert (st.state, st.level, st.pending, st.uploaded) == ("unavailable", "WARN", 30, 0)
        assert st.failures >= 1 and "cannot reach the fleet database" in st.last_error
        assert st.oldest_pending_s > 2.5
        print(f"add while the database hangs: max {max(durations) * 1e3:.2f} ms, failures {st.failures}")
        assert max(durations) < 0.15, durations  # the connect attempts take 2 s each: never waited for


@pytest.mark.slow
def test_a_frozen_server_is_a_stall_warning_and_nothing_is_lost(own_server_dir: Path, rng) -> None:
    """The server's processes stopped (SIGSTOP) with the uploader's connection open: its upload neither fails nor
    ends; after the stall time the status says WARN while the producer goes on; resumed (SIGCONT), all arrive."""
    from pnv_ros.fleet.server import LocalServer

    server = LocalServer(own_server_dir / "db")
    feats = keyframes(rng, 8)
    try:
        dsn = server.start()
        init_store(dsn)
        with Outbox(opener(dsn), "A", threading.RLock(), new_map(), backoff_s=BACKOFF, stall_s=1.0) as box:
            for i, f in enumerate(feats[:3]):
                box.add(f, i + 1)
            assert box.flush(30) and box.status().level == "OK"
            frozen = server_processes(server.pid)
            for pid in frozen:  # the postmaster first: it starts no process after
                os.kill(pid, signal.SIGSTOP)
            try:
                t0 = time.perf_counter()
                for i, f in enumerate(feats[3:], 3):
                    box.add(f, i + 1)
                worst = time.perf_counter() - t0
                time.sleep(1.5)
                st = box.status()
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            assert st.stalled and st.level == "WARN" and st.pending == 5 and st.oldest_pending_s > 1.0, st
            assert worst < 0.5  # five adds while the upload hangs
            assert box.flush(60), box.status()
            st = box.status()
        assert (st.level, st.pending, st.uploaded, st.stalled) == ("OK", 0, 8, False)
        assert stored_rows(dsn) == [("A", stored_rows(dsn)[0][1], i) for i in range(8)]
    finally:
        server.stop()


@pytest.mark.slow
def test_a_member_closes_in_bounded_time_while_its_query_hangs_on_a_frozen_server(own_server_dir: Path, rng) -> None:
    """The server frozen (SIGSTOP) with the member's query connection open: lookups answer [] within the deadline,
    the status says WARN once most recent queries were late (before, it stayed OK while the fleet added nothing),
    and close() returns within its timeouts leaving no thread that would hold the interpreter's exit (before, the
    query thread was a ThreadPoolExecutor's: close() and the node's shutdown waited for the hung query forever)."""
    from pnv_ros.fleet.member import FleetMember, FleetSettings
    from pnv_ros.fleet.server import LocalServer

    server = LocalServer(own_server_dir / "db")
    try:
        dsn = server.start()
        init_store(dsn)
        settings = FleetSettings(dsn, "A", deadline_s=0.3)
        member = FleetMember(
            settings, dim=512, preset=SPEED, model_id=RANDOM_MODEL, patch_dtype="float16", lock=threading.RLock()
        )
        member.track(new_map(), 0)
        assert member.lookup(random_features(rng).global_desc, wait_s=30) == []  # connected: an empty store
        assert member.counts["answered"] == 1
        frozen = server_processes(server.pid)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            assert member.lookup(random_features(rng).global_desc) == []
            assert member.lookup(random_features(rng).global_desc) == []  # the first is still running: at once
            waited = time.perf_counter() - t0
            assert member.status()[0] == "OK"  # 2 late: too few to say
            for _ in range(3):
                assert member.lookup(random_features(rng).global_desc) == []
            level, problem, _ = member.status()
            assert level == "WARN" and "5 of the last 6 late" in problem, (level, problem)
            t0 = time.perf_counter()
            member.close(timeout_s=1.0)
            closing = time.perf_counter() - t0
            stuck = [t.name for t in threading.enumerate() if t.name.startswith("fleet-") and not t.daemon]
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        print(f"lookups while frozen: {waited:.2f} s; close: {closing:.2f} s")
        assert member.counts["late"] == 5 and waited < 0.6
        assert closing < 3.0 and stuck == [], (closing, stuck)
    finally:
        server.stop()


@pytest.fixture
def own_server_dir():
    root = Path(tempfile.mkdtemp(prefix="pnv_fleet_outbox_"))
    root.chmod(0o755)  # open to pass for the server's user (see conftest's fleet_server)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_kill_9_of_the_database_mid_stream_loses_nothing_duplicates_nothing_and_never_blocks(
    own_server_dir: Path, rng
) -> None:
    """A producer adds a keyframe every 50 ms (a fast keyframe rate); the server is killed with SIGKILL after 15,
    stays down for 25 more (WARN: pending keyframes, failures), and is restarted while 20 more arrive. Afterwards
    the store holds exactly seq 0..59 of the session, each the map's keyframe; the longest ``add`` while the
    database was down stays far below the connect timeout and the first backoff (it never waited for them)."""
    from pnv_ros.fleet.server import LocalServer

    server = LocalServer(own_server_dir / "db")
    n, kill_at, restart_at = 60, 15, 40
    feats = keyframes(rng, n)
    lock = threading.RLock()
    place_map = new_map()
    try:
        dsn = server.start()
        init_store(dsn)
        box = Outbox(opener(dsn), "A", lock, place_map, session="run1", backoff_s=BACKOFF)
        durations, down_status, restarter = [], None, None
        try:
            for i, f in enumerate(feats):
                if i == kill_at:
                    os.kill(server.pid, signal.SIGKILL)
                    assert server.wait(10) == -signal.SIGKILL
                if i == restart_at:
                    down_status = box.status()
                    restarter = threading.Thread(target=server.start)
                    restarter.start()
                t0 = time.perf_counter()
                assert box.add(f, 10**9 * (i + 1), np.array([float(i), 0.0, 0.0])) == i
                durations.append(time.perf_counter() - t0)
                if i % 10 == 9:
                    box.add_loop_edge(i, 0.5, "rapid", match_id=i - 9)  # loops found while up, down, restarting
                time.sleep(0.05)
            restarter.join(60)
            assert server.pid is not None
            assert box.flush(60), box.status()
            st = box.status()
        finally:
            box.close()
        assert down_status.state == "unavailable" and down_status.level == "WARN", down_status
        assert down_status.pending >= restart_at - kill_at - 1 and down_status.failures >= 1
        assert down_status.oldest_pending_s > 0.5  # down for 25 x 50 ms: the oldest waits since the kill
        assert "fleet database" in down_status.last_error  # "lost the ..." or "cannot reach the ..."
        assert (st.state, st.level, st.pending, st.uploaded) == ("idle", "OK", 0, n)
        assert (st.edges_pending, st.edges_uploaded, st.edges_dropped) == (0, n // 10, 0)
        assert stored_rows(dsn) == [("A", "run1", i) for i in range(n)]  # nothing lost, nothing twice
        ids = stored_ids(dsn, "run1")
        with FleetStore.open(dsn, 512, SPEED, RANDOM_MODEL) as s:
            edges = sorted((e.query_id, e.match_id) for e in s.loop_edges())
        assert edges == [(ids[i], ids[i - 9]) for i in range(9, n, 10)]
        with FleetStore.open(dsn, 512, SPEED, RANDOM_MODEL) as s:
            got = s.fetch([box.fleet_id("run1", i) for i in range(n)])
        for i, k in enumerate(got):
            np.testing.assert_array_equal(k.features.global_desc, feats[i].global_desc)
            assert k.stamp_ns == 10**9 * (i + 1) and k.position[0] == i
        worst_down = max(durations[kill_at:])
        print(
            f"add while down: max {worst_down * 1e3:.2f} ms, p50 {np.median(durations[kill_at:]) * 1e3:.2f} ms; "
            f"while up: max {max(durations[:kill_at]) * 1e3:.2f} ms; failures {st.failures}, re-sends {st.duplicates}"
        )
        assert worst_down < 0.15  # the first backoff is 0.2 s, the connect timeout 2 s: never waited for them
    finally:
        server.stop()
