"""Two robots share one place map through the fleet store, in process (the library: LoopClosureDetector with a
FleetMember; no ROS): robot A drives the RTAB-Map loop's first lap, robot B the second. The node's test with real
processes is test_fleet_node. Real PostgreSQL + pgvector (the session's ``fleet_server``), the default model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RTAB, fleet_database

from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.fleet.member import FleetMember, FleetSettings
from pnv_ros.fleet.store import FleetStore

G = np.load(RTAB.parent / "gt_matrix.npy")  # G[i, j] = 1: frame i + 1 revisits frame j + 1
LAP1, LAP2 = range(0, 40), range(40, 84)  # indices into rtab_features (frame = index + 1)


def robot(extractor, dsn: str, robot_id: str, **settings) -> LoopClosureDetector:
    det = LoopClosureDetector(extractor, DetectorParams())
    member = FleetMember(
        FleetSettings(dsn, robot_id, **settings),
        dim=extractor.dim,
        preset=det.preset,
        model_id=det.model_id,
        patch_dtype="float16",
        lock=det.lock,
    )
    det.join_fleet(member)
    return det


def drive(det: LoopClosureDetector, features: list, frames: range) -> list:
    """Each frame one (simulated) second apart, stamped by its frame number; the accepted loops."""
    loops = []
    for i in frames:
        r = det.process(features[i], (i + 1) * 10**9)
        assert r.keyframe_id is not None, r.status
        if r.loop is not None:
            loops.append((i, r.loop))
    return loops


def scored(loops: list, robot_id: str, frames: range) -> tuple[float, float, int]:
    """(precision, recall over the frames' revisits of lap 1, loops) of the loops matched to ``robot_id``'s lap 1."""
    to_lap1 = [(i, lc) for i, lc in loops if lc.match_from_fleet and lc.match_robot_id == robot_id]
    correct = sum(int(G[i, lc.match_seq]) for i, lc in to_lap1)
    revisits = int(G[list(frames)][:, : len(LAP1)].any(axis=1).sum())
    return correct / max(1, len(to_lap1)), correct / revisits, len(to_lap1)


@pytest.mark.slow
def test_robot_b_closes_loops_to_robot_a_and_a_restarted_robot_to_its_earlier_session(
    fleet_server, default_extractor, rtab_features
) -> None:
    with fleet_database(fleet_server, "d", init=True) as dsn:
        a = robot(default_extractor, dsn, "A")
        drive(a, rtab_features, LAP1)
        assert a.fleet.outbox.flush(120), a.fleet.outbox.status()
        a.fleet.close()
        store = FleetStore.open(dsn, default_extractor.dim, a.preset, a.model_id)
        assert store.count() == 40

        b = robot(default_extractor, dsn, "B")
        loops = drive(b, rtab_features, LAP2)
        precision, recall, n = scored(loops, "A", LAP2)
        print(f"\nB -> A: {n} loops, precision {precision:.3f}, recall {recall:.3f}; fleet {b.fleet.counts}")
        assert precision == 1.0 and recall >= 0.8
        for _, lc in loops:
            if lc.match_from_fleet:
                assert lc.match_id == 0 and lc.match_fleet_id > 0 and lc.match_session == a.fleet.session
            else:  # B's own map: its own robot and session, never a keyframe within the recency windows
                assert lc.match_robot_id == "B" and lc.match_session == b.fleet.session
        assert b.fleet.outbox.flush(120)
        edges = store.loop_edges()
        assert len(edges) == len({frozenset((e.query_id, e.match_id)) for e in edges}) == len(loops)
        b.fleet.close()
        store.close()

    # A robot restarted with the same robot_id and an empty map, in a store of its own (robot B's copies of lap 2
    # would otherwise be the better matches): lap 2 closes loops against its earlier session, lap 1
    with fleet_database(fleet_server, "r", init=True) as dsn:
        a = robot(default_extractor, dsn, "A")
        drive(a, rtab_features, LAP1)
        assert a.fleet.outbox.flush(120)
        a.fleet.close()
        a2 = robot(default_extractor, dsn, "A")
        assert a2.fleet.session != a.fleet.session
        loops = drive(a2, rtab_features, LAP2)
        precision, recall, n = scored(loops, "A", LAP2)
        print(f"A again -> A's first session: {n} loops, precision {precision:.3f}, recall {recall:.3f}")
        assert precision == 1.0 and recall >= 0.8
        assert all(lc.match_session == a.fleet.session for _, lc in loops if lc.match_from_fleet)
        a2.fleet.close()


def stored(dsn: str) -> list[tuple[str, str, int]]:
    import psycopg

    with psycopg.connect(dsn) as c:
        return c.execute("SELECT robot_id, session, seq FROM pnv_fleet.keyframes ORDER BY id").fetchall()


@pytest.mark.slow
def test_keyframes_pending_when_the_map_is_saved_go_up_when_it_is_loaded(
    fleet_server, default_extractor, rtab_features, tmp_path
) -> None:
    """Robot A maps while its database is unreachable, saves its map and stops; the next run loads the map with
    the database up and sends the six keyframes under their first session, then its own under a new one. Loading
    the file again re-sends six keyframes the store has: no new row. Robot B loading A's map sends none of them."""
    with fleet_database(fleet_server, "p", init=True) as dsn:
        away = robot(default_extractor, f"host={tmp_path / 'nowhere'} dbname=x", "A")  # no server there
        drive(away, rtab_features, range(0, 6))
        st = away.fleet.outbox.status()
        assert (st.pending, st.uploaded, st.level) == (6, 0, "WARN"), st
        first = away.fleet.session
        assert away.save_map(tmp_path / "a.npz") == 6
        away.fleet.close()

        a = robot(default_extractor, dsn, "A")
        assert a.load_map(tmp_path / "a.npz") == 6
        drive(a, rtab_features, range(6, 9))
        assert a.fleet.outbox.flush(60), a.fleet.outbox.status()
        second = a.fleet.session
        assert stored(dsn) == [("A", first, i) for i in range(6)] + [("A", second, i) for i in range(3)]
        assert a.load_map(tmp_path / "a.npz") == 6  # the file still says six were not sent: re-sent, stored once
        assert a.fleet.outbox.flush(60)
        assert len(stored(dsn)) == 9 and a.fleet.outbox.status().duplicates == 6
        a.fleet.close()

        b = robot(default_extractor, dsn, "B")
        assert b.load_map(tmp_path / "a.npz") == 6
        assert b.fleet.outbox.flush(30) and all(r == "A" for r, _, _ in stored(dsn))  # A's keyframes are A's
        b.fleet.close()


@pytest.mark.slow
def test_no_fleet_loop_to_the_keyframes_just_before_a_reset_nor_to_copies_of_a_loaded_map(
    fleet_server, default_extractor, rtab_features, tmp_path
) -> None:
    """After reset_map, the previous session's last exclude_recent_keyframes keyframes (the robot was there
    seconds ago) are no fleet candidates: frames 21-30 close no loop (none revisits frames 1-20). Robot B starting
    from robot A's saved map finds A's fleet keyframes in its own map (the same global descriptors): they are
    left out of the fleet's candidates, and B's loops come from its own map (the loaded lap 1, and its own lap for
    frames 81-84), as without a fleet."""
    with fleet_database(fleet_server, "x", init=True) as dsn:
        a = robot(default_extractor, dsn, "A")
        drive(a, rtab_features, range(0, 20))
        assert a.fleet.outbox.flush(60)
        a.reset()
        assert drive(a, rtab_features, range(20, 30)) == []
        drive(a, rtab_features, range(30, 40))
        assert a.fleet.outbox.flush(60)
        a.reset()
        a.load_map(save_lap1(default_extractor, rtab_features, tmp_path))
        assert a.fleet.outbox.flush(60)
        a.fleet.close()

        b = robot(default_extractor, dsn, "B")
        b.load_map(tmp_path / "lap1.npz")
        loops, fleet_candidates = [], 0
        for i in LAP2:
            r = b.process(rtab_features[i], (i + 1) * 10**9)
            fleet_candidates += sum(c.from_fleet for c in r.candidates)
            if r.loop is not None:
                loops.append((i, r.loop))
        assert fleet_candidates == 0 and b.fleet.counts["candidates"] > 0  # found in the fleet, left out as copies
        correct = sum(int(G[i, lc.match_id]) for i, lc in loops)  # B's ids: the map's 0-39, then 40.. = frames
        assert not any(lc.match_from_fleet for _, lc in loops) and correct == len(loops)
        assert sum(lc.match_from_loaded_map for _, lc in loops) >= 30
        b.fleet.close()


def save_lap1(extractor, features: list, folder) -> str:
    """Lap 1 as a map saved without a fleet (frames 1-40, stamps 1-40 s); its path."""
    det = LoopClosureDetector(extractor, DetectorParams())
    drive(det, features, LAP1)
    path = folder / "lap1.npz"
    det.save_map(path)
    return str(path)
