"""One robot in a fleet: its keyframes go up through the outbox, its queries search the fleet store. No ROS.

:class:`FleetMember` is what a :class:`~pnv_ros.detector.LoopClosureDetector` holds when it has a fleet
(``fleet_dsn``): the detector's map stays the robot's own, in process, and the fleet adds

- **uploads**: every keyframe of the local map, through an :class:`~pnv_ros.fleet.outbox.Outbox` (a watermark
  and one thread; never a wait for the network), and every accepted loop as a loop edge;
- **queries**: the global descriptor of a new keyframe is searched in the fleet store, leaving out this robot's
  current session (its keyframes are in the local map already: the recency rules there apply), so the hits are
  other robots' keyframes and this robot's earlier sessions; the hits' patches and local features are fetched
  (cached: rows never change) and re-ranked with the local candidates by the same matcher.

A frame never waits for the network longer than ``deadline_s``: the search and fetch run in one query thread;
a frame whose fleet answer is late (or finds the thread still busy with a late one, or the database
unreachable) is answered from the local map alone and counted (``fleet_late`` / ``fleet_unavailable``). A late
answer's keyframes still land in the cache for the next frame.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from pnv_ros.config import Preset
from pnv_ros.errors import FleetError, FleetUnavailableError
from pnv_ros.fleet.outbox import Outbox, OutboxStatus
from pnv_ros.fleet.store import DEFAULT_EF_SEARCH, FleetKeyframe, FleetStore, RecentExclusion
from pnv_ros.place_map import PlaceMap

#: Fleet candidates re-ranked per keyframe besides the local ones: 10. Each costs a fetch of its patches (~1 MB
#: with the speed preset, float16; cached) and a re-rank. On the RTAB-Map loop (robot B's lap against robot A's,
#: test_fleet_detector) 5 left frame 73's revisit out and a wrong keyframe was accepted (score 0.149); 10 and 20
#: gave the same 39 loops, all true.
DEFAULT_TOP_N = 10
#: Seconds a frame waits for the fleet's answer (search + fetch) before going on with its local candidates:
#: 0.3 s. On one machine an answer takes ~10-40 ms (search 1-4 ms, fetch ~1 MB a keyframe); the deadline
#: bounds a slow link or a busy server, never the frame rate by more than this.
DEFAULT_DEADLINE_S = 0.3
#: Megabytes of fetched fleet keyframes kept (an LRU cache): 256, ~250 keyframes of the speed preset.
DEFAULT_CACHE_MB = 256.0
#: Seconds the query side waits after finding the database unreachable before it tries again: 2 s (the
#: connection attempt itself may take libpq's connect_timeout, 2 s, in the query thread, not in a frame).
RETRY_S = 2.0
#: Recent frame queries whose outcomes the status looks at: 20; WARN when more than half of them (and at least
#: :data:`LATE_MIN`) were late: the fleet then adds nothing to the frames (a link too slow for ``deadline_s``: ten
#: candidates are ~10 MB to fetch, ~2 s at 50 Mbit/s), which the counts alone never flagged.
LATE_WINDOW, LATE_MIN = 20, 5


@dataclass(frozen=True)
class FleetSettings:
    """How a robot takes part in a fleet.

    dsn: libpq connection string (or URI) of the fleet store (``pnv fleet init`` made it). robot_id: this robot's
    name, unique in the fleet. top_n: fleet candidates per query, :data:`DEFAULT_TOP_N`. deadline_s: seconds a
    frame waits for them, :data:`DEFAULT_DEADLINE_S`. cache_mb: fetched keyframes kept, :data:`DEFAULT_CACHE_MB`.
    ef_search: HNSW search breadth (:data:`pnv_ros.fleet.store.DEFAULT_EF_SEARCH`).
    """

    dsn: str
    robot_id: str
    top_n: int = DEFAULT_TOP_N
    deadline_s: float = DEFAULT_DEADLINE_S
    cache_mb: float = DEFAULT_CACHE_MB
    ef_search: int = DEFAULT_EF_SEARCH

    def __post_init__(self) -> None:
        if not self.dsn:
            raise FleetError("a fleet needs a DSN (fleet_dsn)")
        if not self.robot_id or not self.robot_id.strip():
            raise FleetError("a robot in a fleet needs a robot_id (a name unique in the fleet)")
        if self.top_n < 1 or self.deadline_s <= 0 or self.cache_mb < 0 or self.ef_search < 1:
            raise FleetError(
                f"fleet settings out of range: top_n {self.top_n} (>= 1), deadline_s {self.deadline_s} (> 0), "
                f"cache_mb {self.cache_mb} (>= 0), ef_search {self.ef_search} (>= 1)"
            )


def _nbytes(kf: FleetKeyframe) -> int:
    """Bytes a fetched keyframe holds in the cache: its patches and global descriptor."""
    return sum(p.nbytes for p in kf.features.patches) + kf.features.global_desc.nbytes


class _QueryThread:
    """One daemon thread that runs submitted calls in order, each answered through a Future. Not a
    ``ThreadPoolExecutor``: its worker is joined at shutdown and at interpreter exit, so a query stuck on a hung
    database (no answer, no error: a frozen server or a dead link) held the node's shutdown forever."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args: object) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter through the future
                fut.set_exception(e)

    def shutdown(self, timeout_s: float) -> bool:
        """Cancel the calls not started, stop after the running one; True when the thread ended within
        ``timeout_s`` (else it is left running, a daemon, on its stuck call)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


@dataclass(frozen=True)
class FleetCandidate:
    """A fleet keyframe found for a query: the stored keyframe (features, origin) and its global L2 distance."""

    keyframe: FleetKeyframe
    distance: float


class FleetMember:
    """This robot's uploads (:class:`Outbox`) and fleet queries, for one model.

    Args: settings; dim, preset, model_id, patch_dtype: the detector's model and map layout (a store of another
    model is refused, as a ``.npz`` map is); lock: the lock that guards the local map (the detector's);
    open_store: makes a :class:`FleetStore` (default: ``FleetStore.open`` of the settings; tests pass their own).

    Nothing connects in the constructor: the outbox and the query thread connect in their own threads, so a
    database that is down at start costs nothing but a WARN. Raises FleetError for bad settings. Close it.
    """

    def __init__(
        self,
        settings: FleetSettings,
        *,
        dim: int,
        preset: Preset,
        model_id: str,
        patch_dtype: str,
        lock: threading.RLock,
        open_store: Callable[[], FleetStore] | None = None,
    ) -> None:
        self.settings = settings
        self.robot_id, self.dim = settings.robot_id, int(dim)

        def default_open() -> FleetStore:
            return FleetStore.open(
                settings.dsn, dim, preset, model_id, patch_dtype, connect_timeout_s=2, ef_search=settings.ef_search
            )

        self._open_store = open_store or default_open
        self.outbox = Outbox(self._open_store, settings.robot_id, lock)
        self._pool = _QueryThread(f"fleet-query-{settings.robot_id}")
        self._store: FleetStore | None = None  # the query thread's own
        self._busy: Future | None = None
        self._cache: OrderedDict[int, FleetKeyframe] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._query_error = ""
        self._query_failed = False  # the last query met a FleetError other than unavailability
        self.counts = dict.fromkeys(("queries", "answered", "late", "unavailable", "candidates", "loops"), 0)
        self._recent: deque[bool] = deque(maxlen=LATE_WINDOW)  # queries: True = late
        self._current: tuple[str, PlaceMap, int] | None = None  # this process's session: (id, map, first id)
        self._earlier: list[tuple[str, int]] = []  # this process's ended sessions: (id, keyframes)

    # -- uploads (the outbox) --------------------------------------------------------------------------------
    def track(self, place_map: PlaceMap, start: int) -> str:
        """Upload ``place_map``'s keyframes from ``start`` (this run's first) as a new session; returns it. The
        session it ends (a reset or load) is remembered with its length, for :meth:`lookup`'s recency rule."""
        with self._lock:
            if self._current is not None:
                session, old_map, old_start = self._current
                self._earlier.append((session, len(old_map) - old_start))
            session = self.outbox.track(place_map, None, start)
            self._current = (session, place_map, start)
        return session

    def resume(self, place_map: PlaceMap, saved: object, start: int) -> int:
        """A loaded map: first send what its file says an earlier run of this robot had not uploaded (``saved``:
        the file's ``fleet`` note, :meth:`watermarks` of that run; generations of another robot are not this
        robot's to send), under their own sessions; then follow the map from ``start`` as a new session.
        Returns the keyframes still to send from earlier runs."""
        left = 0
        for g in saved if isinstance(saved, list) else []:
            try:
                robot, session, first, end, done = g["robot_id"], g["session"], g["start"], g["end"], g["uploaded"]
                ok = robot == self.robot_id and isinstance(session, str) and 0 <= first <= done <= end <= start
            except (KeyError, TypeError):
                ok = False
            if ok and done < end:
                self.outbox.track(place_map, session, int(first), int(done), int(end))
                left += int(end) - int(done)
        self.track(place_map, start)
        return left

    def watermarks(self, place_map: PlaceMap) -> list[dict]:
        """What a saved ``place_map`` records of its uploads (:meth:`Outbox.watermarks`)."""
        return self.outbox.watermarks(place_map)

    @property
    def session(self) -> str:
        """The current session (a UUID per map generation: the node's start, each reset and load)."""
        return self.outbox.session

    def added(self, kf_id: int, place_map: PlaceMap) -> None:
        """Keyframe ``kf_id`` joined ``place_map``: queue it (no network)."""
        self.outbox.added(kf_id, place_map)

    def loop(self, query_id: int, score: float, method: str, *, match_id: int = -1, match_fleet_id: int = -1) -> bool:
        """Queue an accepted loop's edge: to keyframe ``match_id`` of this run, or to ``match_fleet_id``. Returns
        False when it cannot be stored (a match from a loaded map, whose fleet id is not known here)."""
        with self._lock:
            self.counts["loops"] += 1
        try:
            if match_fleet_id >= 0:
                self.outbox.add_loop_edge(query_id, score, method, match_fleet_id=match_fleet_id)
            else:
                self.outbox.add_loop_edge(query_id, score, method, match_id=match_id)
        except FleetError:
            return False
        return True

    def fleet_id(self, seq: int) -> int:
        """The fleet id of this session's keyframe number ``seq``, -1 while it is not stored."""
        found = self.outbox.fleet_id(self.session, seq)
        return -1 if found is None else found

    # -- queries ----------------------------------------------------------------------------------------------
    def lookup(
        self, global_desc: np.ndarray, top_n: int | None = None, wait_s: float | None = None, recent: int = 0
    ) -> list:
        """Fleet candidates for a query descriptor (D,): :class:`FleetCandidate` s nearest first, at most
        ``top_n`` (default the settings'), without this robot's current session nor the last ``recent``
        keyframes of each earlier session of this process (before a reset or load: the robot was there seconds
        ago; the detector passes its ``exclude_recent_keyframes``). Waits at most ``wait_s``
        (default ``deadline_s``) and returns [] when the answer is late, the query thread is still busy with a
        late one, or the database is unreachable (each counted); never raises for the network. Raises
        FleetError only for a descriptor of the wrong shape."""
        n = int(top_n or self.settings.top_n)
        q = np.asarray(global_desc, np.float32).reshape(-1).copy()
        if q.shape != (self.dim,):
            raise FleetError(f"query descriptor of shape {np.shape(global_desc)} is not ({self.dim},)")
        with self._lock:
            self.counts["queries"] += 1
            if self._busy is not None and not self._busy.done():
                self.counts["late"] += 1
                self._recent.append(True)
                return []
            if time.monotonic() < self._retry_at:
                self.counts["unavailable"] += 1
                return []
            rules = [RecentExclusion(self.robot_id, self.session, 0)]
            rules += [RecentExclusion(self.robot_id, s, max(0, end - recent)) for s, end in self._earlier]
            fut = self._busy = self._pool.submit(self._answer, q, n, rules)
        try:
            found = fut.result(timeout=self.settings.deadline_s if wait_s is None else wait_s)
        except FutureTimeout:
            with self._lock:
                self.counts["late"] += 1
                self._recent.append(True)
            return []
        except FleetUnavailableError:
            with self._lock:
                self.counts["unavailable"] += 1
            return []
        except FleetError:  # another model in the store, no store: said by status() (ERROR)
            return []
        with self._lock:
            self.counts["answered"] += 1
            self._recent.append(False)
            self.counts["candidates"] += len(found)
        return found

    def keyframe(self, fleet_id: int, wait_s: float = 10.0) -> FleetKeyframe:
        """One fleet keyframe (cached), for services (verify_pair). Raises FleetError (unknown id, no store),
        FleetUnavailableError (unreachable, or no answer within ``wait_s``)."""
        fut = self._pool.submit(self._fetch, [int(fleet_id)])
        try:
            return fut.result(timeout=wait_s)[0]
        except FutureTimeout:
            raise FleetUnavailableError(f"the fleet store did not answer within {wait_s:g} s") from None

    def _answer(self, q: np.ndarray, n: int, rules: list[RecentExclusion]) -> list[FleetCandidate]:
        """In the query thread: search (without the ``rules``' keyframes) and fetch the hits' keyframes."""
        try:
            hits = self._query_store().search(q, n, exclude=rules)
            kfs = self._fetch([h.id for h in hits])
        except FleetUnavailableError as e:
            self._note_error(e, unavailable=True)
            raise
        except FleetError as e:
            self._note_error(e, unavailable=False)
            raise
        except Exception as e:  # noqa: BLE001 - anything else: reported, never raised into the caller's frame
            self._note_error(FleetError(f"{type(e).__name__}: {e}"), unavailable=False)
            raise FleetError(f"fleet query failed: {type(e).__name__}: {e}") from None
        with self._lock:
            self._query_error, self._query_failed = "", False
        return [FleetCandidate(kf, h.distance) for h, kf in zip(hits, kfs)]

    def _note_error(self, e: FleetError, unavailable: bool) -> None:
        with self._lock:
            self._query_error, self._query_failed = str(e), not unavailable
            self._retry_at = time.monotonic() + RETRY_S

    def _query_store(self) -> FleetStore:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def _fetch(self, ids: list[int]) -> list[FleetKeyframe]:
        """Keyframes by fleet id: from the cache, the rest in one fetch (then cached). In the query thread."""
        with self._lock:
            have = {i: self._cache[i] for i in ids if i in self._cache}
            for i in have:
                self._cache.move_to_end(i)
        missing = [i for i in ids if i not in have]
        if missing:
            for kf in self._query_store().fetch(missing):
                have[kf.id] = kf
                self._remember(kf)
        return [have[i] for i in ids]

    def _remember(self, kf: FleetKeyframe) -> None:
        size, budget = _nbytes(kf), self.settings.cache_mb * 1e6
        with self._lock:
            if kf.id in self._cache or size > budget:
                return
            self._cache[kf.id] = kf
            self._cache_bytes += size
            while self._cache_bytes > budget:
                self._cache_bytes -= _nbytes(self._cache.popitem(last=False)[1])

    # -- state --------------------------------------------------------------------------------------------------
    def status(self) -> tuple[str, str, dict[str, str]]:
        """(level 'OK' | 'WARN' | 'ERROR', problem text or '', key-values for diagnostics: the outbox's
        ``fleet_*`` counts and the queries')."""
        ob: OutboxStatus = self.outbox.status()
        with self._lock:
            counts, error, failed = dict(self.counts), self._query_error, self._query_failed
            cached = len(self._cache)
            late, asked = sum(self._recent), len(self._recent)
        values = {
            "fleet_robot_id": self.robot_id,
            "fleet_session": self.session,
            "fleet_upload_state": ob.state,
            "fleet_pending": str(ob.pending),
            "fleet_uploaded": str(ob.uploaded),
            "fleet_oldest_pending_s": f"{ob.oldest_pending_s:.1f}",
            "fleet_edges_uploaded": str(ob.edges_uploaded),
            "fleet_cached_keyframes": str(cached),
            **{f"fleet_{k}": str(v) for k, v in counts.items()},
        }
        levels, problems = [ob.level], []
        if ob.level != "OK":
            why = "stalled" if ob.stalled else ob.state
            problems.append(f"fleet uploads {why}: {ob.pending} keyframes pending ({ob.last_error or 'no error'})")
        if error:
            levels.append("ERROR" if failed else "WARN")
            problems.append(f"fleet queries: {error}")
        if late >= LATE_MIN and 2 * late > asked:
            levels.append("WARN")
            problems.append(
                f"fleet queries: {late} of the last {asked} late (over fleet_deadline_s "
                f"{self.settings.deadline_s:g} s): the frames go on without the fleet"
            )
        level = "ERROR" if "ERROR" in levels else "WARN" if "WARN" in levels else "OK"
        return level, "; ".join(problems), values

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the outbox (what is pending stays unsent) and the query thread, each waited for at most
        ``timeout_s`` (a call stuck on a hung database is left to its daemon thread); close the stores."""
        self.outbox.close(timeout_s)
        if self._pool.shutdown(timeout_s) and self._store is not None:
            self._store.close()
