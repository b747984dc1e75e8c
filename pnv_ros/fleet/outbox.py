"""The outbox: a robot's keyframes go to the fleet store without ever holding up a frame on the network. No ROS.

The local :class:`~pnv_ros.place_map.PlaceMap` already holds everything an upload needs (global descriptor,
patches, local features, stamp, position), so the outbox keeps no copy: it is a **watermark** per map
generation (keyframe ids from ``start`` below ``next`` are in the fleet store). One uploader thread, with its own
:class:`~pnv_ros.fleet.store.FleetStore`, copies the next keyframe under the map owner's lock (a memory copy,
about 1 MB), uploads it outside the lock, then advances the watermark. The producer's :meth:`Outbox.add` takes
only that lock and a condition variable: it never waits for the network.

- **Keys.** A keyframe is ``(robot_id, session, seq)`` with ``seq = id - start``; ``session`` is a UUID per map
  generation (a new map after a reset or a load is a new session). :meth:`FleetStore.add` is idempotent on that
  key, so a re-send (a COMMIT whose reply was lost when the server died, or an uploader restarted from an older
  watermark) makes no duplicate; such answers are counted as ``duplicates``.
- **Unavailable database.** On :class:`~pnv_ros.errors.FleetUnavailableError` the uploader backs off (1 s
  doubling to 30 s by default: short against a restart of a few seconds, long enough not to flood a server's
  log) and retries the same keyframe; :meth:`Outbox.status` says WARN with the
  pending count and the oldest pending keyframe's age. Any other :class:`~pnv_ros.errors.FleetError` (another
  model in the store, no store yet, a missing privilege): ERROR, retried at the longest backoff; the producer
  carries on, local only.
- **Generations.** :meth:`Outbox.track` starts a new map generation; the uploader first finishes the older
  generations' pending keyframes under their own sessions (it keeps a reference to their map objects).
- **Loop edges** (:meth:`Outbox.add_loop_edge`) wait in memory until both ends are stored (their fleet ids
  known), then go up after the pending keyframes, once per unordered pair (the store's primary key).
- **Loss.** Keyframes not uploaded when the process ends are lost unless the map is saved: :meth:`watermarks`
  says what a saved map records, and a run that loads it :meth:`track` s the rest with an ``end``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pnv_ros.errors import FleetError, FleetUnavailableError
from pnv_ros.features import PlaceFeatures
from pnv_ros.fleet.store import FleetStore
from pnv_ros.place_map import PlaceMap

#: Seconds of the first wait after the database was unreachable, and the most: 1 s doubling to 30 s
#: (a local server restarts in ~3 s here, LocalServer after kill -9; 30 s bounds a long outage's retry rate).
DEFAULT_BACKOFF_S = (1.0, 30.0)
#: Seconds a keyframe may wait before the outbox says WARN even when no error came back: an upload takes ~10 ms
#: (benchmarks/fleet_scale.py: 8.8 ms p50 with blobs), so 10 s of waiting means the upload is stuck (a frozen
#: server holding the connection open: nothing fails, nothing moves).
DEFAULT_STALL_S = 10.0
#: Seconds the idle uploader sleeps between looks at the map when no :meth:`Outbox.added` woke it (keyframes
#: added to the map by other code are picked up within this time).
IDLE_POLL_S = 0.5


@dataclass(frozen=True)
class OutboxStatus:
    """What the outbox is doing, for diagnostics.

    state: 'idle' (nothing pending), 'uploading', 'unavailable' (backing off after the database could not be
    reached), 'failed' (a FleetError other than unavailability: no store (``pnv fleet init``), another model, a
    missing privilege; tried again at the longest backoff, so a store its admin mends is used without a restart),
    'closed'. pending: keyframes not yet confirmed by the store; uploaded: keyframes the store confirmed
    (``duplicates`` of them were stored already: re-sends); failures: tries that found the database unreachable
    or were refused;
    oldest_pending_s: seconds since the oldest pending keyframe was added (0 when none or unknown);
    retry_in_s: seconds until the next try while backing off; last_error: the last failure's message;
    edges_pending / edges_uploaded: loop edges waiting / confirmed (new or stored already); edges_dropped: loop
    edges the store refused (a fleet id it does not hold); stalled: the oldest pending keyframe has waited longer
    than the outbox's ``stall_s``."""

    state: str
    pending: int
    uploaded: int
    duplicates: int
    failures: int
    oldest_pending_s: float
    retry_in_s: float
    last_error: str
    edges_pending: int = 0
    edges_uploaded: int = 0
    edges_dropped: int = 0
    stalled: bool = False

    @property
    def level(self) -> str:
        """'OK', 'WARN' (the database unreachable, or the oldest keyframe waiting longer than the stall time:
        keyframes wait) or 'ERROR' (uploads stopped)."""
        if self.state == "failed":
            return "ERROR"
        return "WARN" if self.state == "unavailable" or self.stalled else "OK"


@dataclass
class _Generation:
    """One map generation: its map object, session, first id and watermark."""

    map: PlaceMap
    session: str
    start: int
    next: int
    end: int | None = None  # the generation's last id + 1 when it is closed (a loaded map's earlier session)
    added_at: dict[int, float] = field(default_factory=dict)  # id -> monotonic time of its add (pending only)
    fleet_ids: dict[int, int] = field(default_factory=dict)  # seq -> fleet id of the confirmed keyframes

    def pending(self) -> int:
        return max(0, (len(self.map) if self.end is None else min(self.end, len(self.map))) - self.next)


@dataclass
class _Edge:
    """A loop edge waiting for its ends' fleet ids: the query is a keyframe of ``gen``; the match is one too
    (``match_id``) or a keyframe already in the fleet store (``match_fleet_id``)."""

    gen: _Generation
    query_id: int
    match_id: int | None
    match_fleet_id: int | None
    score: float
    method: str

    def ends(self) -> tuple[int, int] | None:
        """(query, match) fleet ids once both are known, else None."""
        q = self.gen.fleet_ids.get(self.query_id - self.gen.start)
        m = self.match_fleet_id if self.match_id is None else self.gen.fleet_ids.get(self.match_id - self.gen.start)
        return None if q is None or m is None else (q, m)


class Outbox:
    """Uploads a robot's keyframes from its local map to the fleet store in one background thread.

    Args:
        open_store: makes the uploader's FleetStore (called in its thread, again after an unreachable database:
            e.g. ``lambda: FleetStore.open(dsn, dim, preset, model_id)``).
        robot_id: this robot's name in the fleet (non-empty).
        lock: the lock that guards the map (the detector's ``lock``); held only to add and to copy a keyframe.
        place_map: the map to follow from the start (or call :meth:`track`); session: its session (default: a
            new UUID); start: its first keyframe id of this run (earlier ones came from a loaded map).
        backoff_s: (first, most) seconds to wait after the database could not be reached.
        stall_s: seconds a keyframe may wait before :meth:`status` says stalled (WARN), :data:`DEFAULT_STALL_S`.

    Raises FleetError for an empty robot id. Close it (or use it as a context manager) to stop the thread.
    """

    def __init__(
        self,
        open_store: Callable[[], FleetStore],
        robot_id: str,
        lock: Any,
        place_map: PlaceMap | None = None,
        *,
        session: str | None = None,
        start: int = 0,
        backoff_s: tuple[float, float] = DEFAULT_BACKOFF_S,
        stall_s: float = DEFAULT_STALL_S,
    ) -> None:
        if not robot_id:
            raise FleetError("the outbox needs a robot_id")
        self.robot_id, self._open_store, self.lock = robot_id, open_store, lock
        self.backoff_s = (float(backoff_s[0]), float(backoff_s[1]))
        self.stall_s = float(stall_s)
        self._cv = threading.Condition()
        self._gens: list[_Generation] = []
        self._edges: list[_Edge] = []
        self._edges_uploaded = self._edges_dropped = 0
        self._state, self._last_error = "idle", ""
        self._uploaded = self._duplicates = self._failures = 0
        self._delay, self._retry_at, self._closed = 0.0, 0.0, False
        if place_map is not None:
            self.track(place_map, session, start)
        self._thread = threading.Thread(target=self._run, name=f"fleet-outbox-{robot_id}", daemon=True)
        self._thread.start()

    # -- the producer's side (never waits for the network) -------------------------------------------------
    def track(
        self,
        place_map: PlaceMap,
        session: str | None = None,
        start: int = 0,
        uploaded: int | None = None,
        end: int | None = None,
    ) -> str:
        """Follow a (new) map generation: keyframes ``start``.. (up to ``end``, default: all that come) go up as
        seq 0.. of ``session`` (default: a new UUID), from ``uploaded`` (default ``start``: none confirmed yet).
        Earlier generations' pending keyframes are uploaded first. Returns the session."""
        session = session or str(uuid.uuid4())
        first = int(start if uploaded is None else uploaded)
        gen = _Generation(place_map, session, int(start), first, None if end is None else int(end))
        with self._cv:
            self._gens.append(gen)
            self._cv.notify_all()
        return session

    @property
    def session(self) -> str:
        """The current generation's session ('' before :meth:`track`)."""
        with self._cv:
            return self._gens[-1].session if self._gens else ""

    def add(self, features: PlaceFeatures, stamp_ns: int, position: np.ndarray | None = None) -> int:
        """Add a keyframe to the current map (under ``lock``) and queue it; returns its id. Raises MapError
        (features that do not fit the map: nothing is queued), FleetError (no map tracked)."""
        with self._cv:
            if not self._gens:
                raise FleetError("the outbox follows no map: call track first")
            gen = self._gens[-1]
        with self.lock:
            kf_id = gen.map.add(features, stamp_ns, position)
        self.added(kf_id, gen.map)
        return kf_id

    def added(self, kf_id: int, place_map: PlaceMap | None = None) -> None:
        """Note that keyframe ``kf_id`` was added to ``place_map`` (default: the current map) by its owner and
        wake the uploader."""
        now = time.monotonic()
        with self._cv:
            for gen in reversed(self._gens):
                if place_map is None or gen.map is place_map:
                    gen.added_at.setdefault(int(kf_id), now)
                    break
            self._cv.notify_all()

    def add_loop_edge(
        self,
        query_id: int,
        score: float,
        method: str,
        *,
        match_id: int | None = None,
        match_fleet_id: int | None = None,
    ) -> None:
        """Queue a loop from keyframe ``query_id`` of the current map to keyframe ``match_id`` of the same map or
        to ``match_fleet_id`` (another robot's or an earlier session's keyframe, from a fleet search); sent once
        both ends are in the store (:meth:`FleetStore.add_loop_edge`: once per unordered pair, reporter =
        robot_id). Raises FleetError (neither or both matches given, an id not of this run, no map tracked)."""
        if (match_id is None) == (match_fleet_id is None):
            raise FleetError("give the loop's match as match_id (this map) or match_fleet_id (the fleet store)")
        with self._cv:
            if not self._gens:
                raise FleetError("the outbox follows no map: call track first")
            gen = self._gens[-1]
            mid = None if match_id is None else int(match_id)
            fid = None if match_fleet_id is None else int(match_fleet_id)
            for kf in (int(query_id), mid):
                if kf is not None and not gen.start <= kf < len(gen.map):
                    raise FleetError(f"keyframe {kf} is not one of this run's ({gen.start}..{len(gen.map) - 1})")
            self._edges.append(_Edge(gen, int(query_id), mid, fid, float(score), method))
            self._cv.notify_all()

    # -- what it is doing ----------------------------------------------------------------------------------
    def status(self) -> OutboxStatus:
        """A snapshot of the counts (cheap: no lock of the map, no network)."""
        now = time.monotonic()
        with self._cv:
            pending = sum(g.pending() for g in self._gens)
            busy = pending or self._edges
            oldest = min((t for g in self._gens for i, t in g.added_at.items() if i >= g.next), default=None)
            waited = 0.0 if oldest is None or not pending else now - oldest
            return OutboxStatus(
                self._state if busy or self._state in ("failed", "closed") else "idle",
                pending,
                self._uploaded,
                self._duplicates,
                self._failures,
                waited,
                max(0.0, self._retry_at - now) if self._state == "unavailable" else 0.0,
                self._last_error,
                len(self._edges),
                self._edges_uploaded,
                self._edges_dropped,
                waited > self.stall_s,
            )

    def watermarks(self, place_map: PlaceMap) -> list[dict]:
        """The generations that upload ``place_map``'s keyframes, oldest first, as JSON-able dicts (robot_id,
        session, start, end, uploaded): what a saved map records so that a run that loads it sends the rest
        (:meth:`track` with these values)."""
        with self._cv:
            return [
                {
                    "robot_id": self.robot_id,
                    "session": g.session,
                    "start": g.start,
                    "end": len(g.map) if g.end is None else g.end,
                    "uploaded": g.next,
                }
                for g in self._gens
                if g.map is place_map
            ]

    def fleet_id(self, session: str, seq: int) -> int | None:
        """The fleet id of a confirmed keyframe of a tracked generation, or None (pending, or unknown)."""
        with self._cv:
            for gen in self._gens:
                if gen.session == session:
                    return gen.fleet_ids.get(int(seq))
        return None

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is pending (True), uploads failed or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._edges or any(g.pending() for g in self._gens):
                left = deadline - time.monotonic()
                if left <= 0 or self._state in ("failed", "closed"):
                    return False
                self._cv.wait(min(left, IDLE_POLL_S))
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the uploader (a keyframe being sent is finished or abandoned within ``timeout_s``; the rest stays
        pending) and close its store."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout_s)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the uploader thread -------------------------------------------------------------------------------
    def _next(self) -> tuple[_Generation, int] | _Edge | None:
        """The next thing to send (under ``_cv``): the oldest generation's watermark keyframe, else the first loop
        edge whose ends are both stored. Finished older generations are dropped (their queued edges keep them)."""
        while len(self._gens) > 1 and not self._gens[0].pending():
            self._gens.pop(0)
        for gen in self._gens:
            if gen.pending():
                return gen, gen.next
        return next((e for e in self._edges if e.ends() is not None), None)

    def _run(self) -> None:
        store: FleetStore | None = None
        try:
            while True:
                with self._cv:
                    if self._closed:
                        self._state = "closed"
                        return
                    wait = self._retry_at - time.monotonic()
                    job = self._next() if wait <= 0 else None
                    if job is None:
                        self._cv.wait(wait if wait > 0 else IDLE_POLL_S)
                        continue
                try:
                    store = store or self._open_store()
                    if isinstance(job, _Edge):
                        self._send_edge(store, job)
                        continue
                    gen, kf_id = job
                    fid, new = self._send(store, gen, kf_id)
                except FleetUnavailableError as e:
                    if store is not None:
                        store.close()  # reconnects (and re-checks the store) on the next try
                    self._backoff(e)
                    continue
                except Exception as e:  # noqa: BLE001 - FleetError and anything else: report, keep the producer going
                    if store is not None:
                        store.close()
                    store = None  # the next try opens (and checks) the store again: an admin may have mended it
                    with self._cv:
                        self._state, self._last_error = "failed", f"{type(e).__name__}: {e}"
                        self._failures += 1
                        self._retry_at = time.monotonic() + self.backoff_s[1]
                        self._cv.notify_all()
                    continue
                with self._cv:
                    gen.fleet_ids[kf_id - gen.start] = fid
                    gen.added_at.pop(kf_id, None)
                    gen.next = kf_id + 1
                    self._uploaded += 1
                    self._duplicates += not new
                    self._state, self._delay, self._retry_at = "uploading", 0.0, 0.0
                    self._cv.notify_all()
        finally:
            if store is not None:
                store.close()

    def _send(self, store: FleetStore, gen: _Generation, kf_id: int) -> tuple[int, bool]:
        """Copy a keyframe under the map lock, send it outside it. Returns (fleet id, new)."""
        with self.lock:
            kf = gen.map.get(kf_id)
            f = kf.features
            features = PlaceFeatures(
                np.array(f.global_desc, np.float32), [np.array(p) for p in f.patches], f.image_size, f.local
            )
        return store.add(
            features,
            robot_id=self.robot_id,
            session=gen.session,
            seq=kf_id - gen.start,
            stamp_ns=kf.stamp_ns,
            position=kf.position,
        )

    def _send_edge(self, store: FleetStore, edge: _Edge) -> None:
        """Send a loop edge whose ends are stored; a refused one is dropped (counted), the others go on."""
        q, m = edge.ends() or (0, 0)
        try:
            store.add_loop_edge(q, m, edge.score, method=edge.method, reporter=self.robot_id)
            dropped, error = False, ""
        except FleetUnavailableError:
            raise
        except FleetError as e:
            dropped, error = True, str(e)
        with self._cv:
            self._edges.remove(edge)
            self._edges_dropped += dropped
            self._edges_uploaded += not dropped
            self._last_error = error or self._last_error
            self._state, self._delay, self._retry_at = "uploading", 0.0, 0.0
            self._cv.notify_all()

    def _backoff(self, e: FleetUnavailableError) -> None:
        with self._cv:
            first, most = self.backoff_s
            self._delay = min(most, self._delay * 2 if self._delay else first)
            self._retry_at = time.monotonic() + self._delay
            self._failures += 1
            self._state, self._last_error = "unavailable", str(e)
            self._cv.notify_all()
