"""FleetStore: many robots' keyframes in one PostgreSQL + pgvector database. No ROS.

What the detector needs of a map, over the network: add a keyframe with its patches and local features (one
transaction), the top-N global search that leaves out a robot's own recent keyframes by sequence number, the
candidates' patches and local features for re-ranking, and the loop edges (one per unordered pair). The tables
are :mod:`pnv_ros.fleet.schema`'s.

- **Model identity.** A store holds one model's descriptors. :meth:`FleetStore.open` binds an empty store to
  the caller's model (identity, dimension, preset, patch dtype) and refuses a store of another model or patch
  layout with :func:`pnv_ros.features.check_fits`'s message, as :meth:`pnv_ros.place_map.PlaceMap.load` does.
- **Idempotent adds.** A keyframe is keyed by ``(robot_id, session, seq)``; adding it again returns the stored
  id and changes nothing, so an outbox that re-sends after a lost reply makes no duplicate.
- **Errors.** A malformed DSN, a database without the store, another schema version or model: FleetError. A
  database that cannot be reached (down, restarting, the connection lost mid-call): FleetUnavailableError; the
  call did not happen (its transaction rolled back) and the next call reconnects.
- **Planner settings per query.** ``hnsw.ef_search`` and ``hnsw.iterative_scan`` are set with ``SET LOCAL``
  (``set_config(..., true)``) inside the search's transaction; the connection has ``prepare_threshold=None``:
  psycopg prepares a statement after 5 runs by default, and the per-query switches would then silently stop
  applying (issue 30).

Not thread-safe: one owner serialises calls (as :class:`~pnv_ros.place_map.PlaceMap`); open one store per thread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from pnv_ros.config import Preset
from pnv_ros.errors import FleetError, FleetUnavailableError, MapError
from pnv_ros.features import PlaceFeatures, check_fits
from pnv_ros.fleet.schema import NAMESPACE, check_version, init_schema, read_meta
from pnv_ros.local_features import LocalFeatures
from pnv_ros.place_map import HAS_LOCAL, HAS_POINTS, HAS_RAYS, LOCAL_RECORD, local_record

#: HNSW search breadth by default: 800, from benchmarks/fleet_scale.py at 1M keyframes (real descriptors of the
#: project's image sets and synthetic ones around them; docs/fleet.md, "Scale"). With the schema's m 24 /
#: ef_construction 100, Recall@1 against exact top-20 search is 0.975 / 0.980 / 0.990 / 0.990 at ef_search
#: 100 / 200 / 400 / 800 for queries among the keyframes and still rises from 400 to 800 for revisits (0.985 ->
#: 0.995), for 15.4 -> 18.7 ms median, small beside re-ranking a candidate. (With m 16 / ef_construction 64 it
#: rose up to 800 for both: 0.885 / 0.910 / 0.925 / 0.955 among keyframes; at 100k every ef_search >= 200
#: gave 0.995-1.000 in 1.7-3.7 ms. Issue 30's random 512-d vectors: 0.36-0.50 at 40, 0.90 at 400.)
DEFAULT_EF_SEARCH = 800
#: Seconds to wait for a connection (libpq ``connect_timeout``): the caller (an outbox thread) retries later.
DEFAULT_CONNECT_TIMEOUT_S = 5
_KF, _DATA, _EDGES, _MODELS = (f"{NAMESPACE}.{t}" for t in ("keyframes", "keyframe_data", "loop_edges", "models"))


@dataclass(frozen=True)
class RecentExclusion:
    """Leave out one robot's own recent keyframes: those of ``robot_id``'s ``session`` with ``seq >= from_seq``.
    Sequence numbers, never clocks (two robots' clocks are not comparable); other sessions of the same robot
    and every other robot stay candidates. ``from_seq=0`` leaves out the whole session."""

    robot_id: str
    session: str
    from_seq: int


@dataclass(frozen=True)
class FleetHit:
    """A global-search result: the keyframe's fleet id, origin, and L2 distance of the descriptors."""

    id: int
    robot_id: str
    session: str
    seq: int
    stamp_ns: int
    distance: float


@dataclass(frozen=True)
class FleetKeyframe:
    """A stored keyframe with its features (global (D,), patches per scale (P_s, D) as stored, image size,
    local features or None), its odometry pose ((3,) / (4,) x, y, z, w, or None) and the server's receive time."""

    id: int
    robot_id: str
    session: str
    seq: int
    stamp_ns: int
    features: PlaceFeatures
    position: np.ndarray | None
    orientation: np.ndarray | None
    received: datetime


@dataclass(frozen=True)
class LoopEdge:
    """A loop stored once per unordered pair: query (parent of the relative pose) and match as first reported."""

    query_id: int
    match_id: int
    score: float
    method: str
    reporter: str
    created: datetime


def redact(dsn: str) -> str:
    """The DSN without its password, for messages (a malformed one is shown as given, password or not)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - psycopg raises ProgrammingError for bad syntax; show nothing of it then
        return "(unparsable DSN)"
    parts.pop("password", None)
    return make_conninfo(**{k: v for k, v in parts.items() if v is not None}) or "(libpq's defaults: PG* variables)"


def connect(dsn: str, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S):
    """A psycopg connection (autocommit: transactions are explicit; ``prepare_threshold=None``: see the module
    docstring). Raises FleetError for a malformed DSN, FleetUnavailableError when the server cannot be reached."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise FleetError(f"bad fleet DSN (a libpq connection string or postgresql:// URI): {e}") from None
    try:
        return psycopg.connect(
            dsn, autocommit=True, prepare_threshold=None, connect_timeout=max(1, int(round(connect_timeout_s)))
        )
    except psycopg.OperationalError as e:
        raise FleetUnavailableError(f"cannot reach the fleet database {redact(dsn)}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def init_store(dsn: str, dim: int = 512) -> bool:
    """Create the store's tables (``pnv fleet init``). Returns False when they exist already. Raises FleetError
    (another version or dimension, no pgvector on the server), FleetUnavailableError."""
    import psycopg

    with connect(dsn) as conn:
        try:
            return init_schema(conn, dim)
        except psycopg.errors.FeatureNotSupported as e:  # pragma: no cover - a server without pgvector
            raise FleetError(f"the server cannot create the pgvector extension: {_first_line(e)}") from None
        except (psycopg.errors.UndefinedFile, psycopg.errors.InsufficientPrivilege) as e:
            raise FleetError(
                f"cannot create the store in {redact(dsn)}: {_first_line(e)} (the server needs pgvector, and "
                "the user the right to CREATE EXTENSION vector / CREATE SCHEMA once)"
            ) from None
        except psycopg.OperationalError as e:
            raise FleetUnavailableError(f"lost the fleet database {redact(dsn)}: {_first_line(e)}") from None


class FleetStore:
    """A connection to one fleet store, bound to one model; a context manager (closes the connection).

    Use :meth:`open`. Args of open: dsn (libpq string or URI), dim (D), preset (the patch layout), model_id
    (``name:dim:sha256-prefix``), patch_dtype ('float16' default, as the local map: the stored patches),
    connect_timeout_s, ef_search (HNSW search breadth, :data:`DEFAULT_EF_SEARCH`).
    """

    def __init__(self, dsn: str, dim: int, preset: Preset, model_id: str, patch_dtype: str, **options: Any) -> None:
        if preset.selects_patches:
            raise FleetError(
                f"the fleet store keeps every patch of a keyframe, and preset {preset.name!r} keeps "
                f"{preset.patch_keep:g} of them (patch_keep < 1): run the fleet with patch_keep 1"
            )
        self.dsn, self.dim, self.preset, self.model_id = dsn, int(dim), preset, model_id
        self.patch_dtype = np.dtype(patch_dtype).newbyteorder("<")
        self.connect_timeout_s = float(options.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S))
        self.ef_search = int(options.get("ef_search", DEFAULT_EF_SEARCH))
        self.shapes = [(preset.num_patches(s), self.dim) for s in range(len(preset.patch_sizes))]
        self.model_ref: int | None = None
        self._conn = None

    @classmethod
    def open(
        cls,
        dsn: str,
        dim: int,
        preset: Preset,
        model_id: str,
        patch_dtype: str = "float16",
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> FleetStore:
        """Connect, check the schema version and the model (binding an empty store to this one). Raises
        FleetError (bad DSN, no store: run ``pnv fleet init``, other version, other model or layout, a preset
        with patch selection: ``patch_keep`` < 1 is not stored by the fleet), FleetUnavailableError."""
        if patch_dtype not in ("float16", "float32"):
            raise FleetError(f"patch_dtype {patch_dtype!r}: use float16 or float32")
        s = cls(dsn, dim, preset, model_id, patch_dtype, connect_timeout_s=connect_timeout_s, ef_search=ef_search)
        s._connection()
        return s

    # -- the connection ------------------------------------------------------------------------------------
    def _connection(self):
        """The open connection, made (and the store checked) when there is none or the last one broke."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self._conn = None
        conn = connect(self.dsn, self.connect_timeout_s)
        try:
            self.model_ref = self._check(conn)
            from pgvector.psycopg import register_vector

            register_vector(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _check(self, conn) -> int:
        """The schema version, dimension and model of the store; binds an empty one. Returns the model row id."""
        import psycopg

        try:
            meta = read_meta(conn)
            if meta is None:
                raise FleetError(f"{redact(self.dsn)} holds no fleet store: run pnv fleet init DSN first")
            version, dim = meta
            check_version(version)
            cols = "id, identity, dim, preset, patch_dtype"
            row = conn.execute(f"SELECT {cols} FROM {_MODELS} ORDER BY id").fetchone()
            if row is None:  # an unbound store: bind it (a read-only role with a bound store never locks)
                with conn.transaction():
                    conn.execute("LOCK TABLE " + _MODELS + " IN SHARE ROW EXCLUSIVE MODE")  # one binder at a time
                    row = (
                        conn.execute(f"SELECT {cols} FROM {_MODELS} ORDER BY id").fetchone()
                        or conn.execute(
                            f"INSERT INTO {_MODELS} (identity, dim, preset, patch_dtype) VALUES (%s, %s, %s, %s) "
                            f"RETURNING {cols}",
                            (self.model_id, self.dim, json.dumps(self.preset.to_dict()), self.patch_dtype.name),
                        ).fetchone()
                    )
        except psycopg.OperationalError as e:
            raise FleetUnavailableError(f"lost the fleet database {redact(self.dsn)}: {_first_line(e)}") from None
        except psycopg.Error as e:  # a refusal (no privilege, ...): no retry mends it
            raise FleetError(f"the fleet database {redact(self.dsn)} refused: {_first_line(e)}") from None
        ref, identity, model_dim, preset, patch_dtype = row
        stored = Preset.from_dict(preset if isinstance(preset, dict) else json.loads(preset))
        check_fits(
            FleetError,
            f"the fleet store {redact(self.dsn)}",
            identity,
            int(model_dim),
            stored,
            self.model_id or identity,
            self.dim,
            self.preset,
            "use a store made with the same checkpoint and preset, or a new database (pnv fleet init)",
        )
        if dim != self.dim:
            raise FleetError(f"the fleet store holds {dim}-d descriptors, this model makes {self.dim}-d")
        if patch_dtype != self.patch_dtype.name:
            raise FleetError(f"the fleet store keeps {patch_dtype} patches, not {self.patch_dtype.name}")
        return int(ref)

    def _run(self, what: str, fn):
        """fn(connection) with connection loss turned into FleetUnavailableError (the connection is dropped and
        the next call reconnects) and any other database error (no privilege, ...) into FleetError."""
        import psycopg

        conn = self._connection()
        try:
            return fn(conn)
        except psycopg.OperationalError as e:
            self.close()
            raise FleetUnavailableError(
                f"{what}: lost the fleet database {redact(self.dsn)}: {_first_line(e)}"
            ) from None
        except psycopg.Error as e:  # a refusal (no privilege, a constraint): the call did not happen
            raise FleetError(f"{what}: the fleet database {redact(self.dsn)} refused: {_first_line(e)}") from None

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------------------------------
    def _encode(self, features: PlaceFeatures) -> tuple[np.ndarray, bytes, int, bytes, tuple[int, int]]:
        glob = np.asarray(features.global_desc, np.float32).reshape(-1)
        if glob.shape != (self.dim,) or not np.isfinite(glob).all():
            raise FleetError(f"global descriptor of shape {glob.shape} is not {self.dim} finite numbers")
        if len(features.patches) != len(self.shapes):
            raise FleetError(f"{len(features.patches)} patch scales for a store of {len(self.shapes)}")
        blobs = []
        for p, shape in zip(features.patches, self.shapes):
            if tuple(np.shape(p)) != shape:
                raise FleetError(f"patches of shape {tuple(np.shape(p))} do not fit this store's {shape}")
            blobs.append(np.ascontiguousarray(p, self.patch_dtype).tobytes())
        try:
            flags, records = local_record(features.local)
        except MapError as e:  # the map's own checks: the same rule, this store's error
            raise FleetError(str(e)) from None
        w, h = (int(v) for v in features.image_size)
        if w < 1 or h < 1:
            raise FleetError(f"image size {features.image_size} is not positive (width, height)")
        return glob, b"".join(blobs), flags, records.tobytes(), (w, h)

    def add(
        self,
        features: PlaceFeatures,
        *,
        robot_id: str,
        session: str,
        seq: int,
        stamp_ns: int,
        position: np.ndarray | None = None,
        orientation: np.ndarray | None = None,
    ) -> tuple[int, bool]:
        """Store a keyframe, its patches and local features in one transaction. Returns (fleet id, whether it is
        new): a keyframe already stored under (robot_id, session, seq) keeps its row and id.

        features: global (D,), patches (P_s, D) per scale, image size (w, h), local features or None; position
        (3,) m and orientation (4,) quaternion x, y, z, w in the robot's odometry frame, or None. Raises
        FleetError (features that do not fit, an empty robot id or session, a negative seq),
        FleetUnavailableError (nothing was stored)."""
        glob, patches, flags, local, (w, h) = self._encode(features)
        if not robot_id or not session or int(seq) < 0:
            raise FleetError(f"robot_id {robot_id!r} and session {session!r} must be named and seq {seq} >= 0")
        pos = None if position is None else [float(v) for v in np.asarray(position, np.float64).reshape(3)]
        ori = None if orientation is None else [float(v) for v in np.asarray(orientation, np.float64).reshape(4)]

        def write(conn) -> tuple[int, bool]:
            with conn.transaction():
                row = conn.execute(
                    f"INSERT INTO {_KF} (robot_id, session, seq, stamp_ns, position, orientation, image_width, "
                    "image_height, model, global) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %b) "
                    "ON CONFLICT (robot_id, session, seq) DO NOTHING RETURNING id",
                    (robot_id, session, int(seq), int(stamp_ns), pos, ori, w, h, self.model_ref, glob),
                ).fetchone()
                if row is None:
                    old = conn.execute(
                        f"SELECT id FROM {_KF} WHERE robot_id = %s AND session = %s AND seq = %s",
                        (robot_id, session, int(seq)),
                    ).fetchone()
                    return int(old[0]), False
                conn.execute(
                    f"INSERT INTO {_DATA} (keyframe_id, patches, local_flags, local) VALUES (%s, %b, %s, %b)",
                    (row[0], patches, flags, local),
                )
                return int(row[0]), True

        return self._run("adding a keyframe", write)

    def add_loop_edge(self, query_id: int, match_id: int, score: float, *, method: str, reporter: str) -> bool:
        """Store a loop between two fleet keyframes once per unordered pair; True when it is new (a loop
        already stored either way round keeps its first report). Raises FleetError (a keyframe with itself,
        unknown ids), FleetUnavailableError."""
        import psycopg

        if int(query_id) == int(match_id):
            raise FleetError(f"a loop joins two keyframes, not keyframe {query_id} with itself")

        def write(conn) -> bool:
            try:
                with conn.transaction():
                    cur = conn.execute(
                        f"INSERT INTO {_EDGES} (query_id, match_id, score, method, reporter) VALUES (%s, %s, %s, %s, "
                        "%s) ON CONFLICT (lo, hi) DO NOTHING",
                        (int(query_id), int(match_id), float(score), method, reporter),
                    )
                    return cur.rowcount == 1
            except psycopg.errors.ForeignKeyViolation:
                raise FleetError(f"loop {query_id} - {match_id}: no such keyframe in the fleet store") from None

        return self._run("adding a loop edge", write)

    # -- reads ---------------------------------------------------------------------------------------------
    def count(self) -> int:
        """Keyframes stored (every robot, every session)."""
        return int(self._run("counting", lambda c: c.execute(f"SELECT count(*) FROM {_KF}").fetchone()[0]))

    def search(
        self,
        global_desc: np.ndarray,
        top_n: int,
        *,
        exclude: RecentExclusion | Sequence[RecentExclusion] | None = None,
        exact: bool = False,
        ef_search: int | None = None,
    ) -> list[FleetHit]:
        """The ``top_n`` keyframes nearest (L2) to a global descriptor (D,), nearest first, without ``exclude``'s
        (one :class:`RecentExclusion` or several).

        Approximate (default): the HNSW index, always (``enable_seqscan`` off: pgvector's cost estimate grows
        with ef_search, and at 10k rows the planner chose a 35 ms sequential scan over a 2 ms index scan at
        ef_search 800; benchmarks/fleet_scale.py), ``hnsw.ef_search`` = max(``ef_search`` or the store's,
        top_n), and pgvector's iterative scan (``relaxed_order``) so that a filter leaves top_n when there are
        more (up to ``hnsw.max_scan_tuples``, 20,000 by default); results re-sorted by distance. ``exact``: a
        sequential scan (the recall benchmark's reference). Raises FleetError, FleetUnavailableError."""
        sql, args, settings = self._search_query(global_desc, top_n, exclude, exact, ef_search)
        if args is None:
            return []

        rows = self._run("searching", lambda conn: _with_settings(conn, settings, sql, args))
        hits = [FleetHit(int(i), r, s, int(n), int(t), float(d)) for i, r, s, n, t, d in rows]
        return sorted(hits, key=lambda h: h.distance)  # relaxed_order may return near-ties out of order

    def explain(
        self,
        global_desc: np.ndarray,
        top_n: int,
        *,
        exclude: RecentExclusion | Sequence[RecentExclusion] | None = None,
        exact: bool = False,
        ef_search: int | None = None,
    ) -> str:
        """PostgreSQL's plan (``EXPLAIN``) of :meth:`search` with the same arguments and settings."""
        sql, args, settings = self._search_query(global_desc, top_n, exclude, exact, ef_search)
        if args is None:
            return ""
        rows = self._run("explaining", lambda conn: _with_settings(conn, settings, "EXPLAIN " + sql, args))
        return "\n".join(r[0] for r in rows)

    def _search_query(self, global_desc, top_n, exclude, exact, ef_search):
        """(SQL, its arguments or None when nothing is asked, the SET LOCAL settings) of a search."""
        q = np.asarray(global_desc, np.float32).reshape(-1)
        if q.shape != (self.dim,) or not np.isfinite(q).all():
            raise FleetError(f"query descriptor of shape {q.shape} is not {self.dim} finite numbers")
        k = int(top_n)
        rules = [exclude] if isinstance(exclude, RecentExclusion) else list(exclude or ())
        where = " AND ".join(["NOT (robot_id = %s AND session = %s AND seq >= %s)"] * len(rules))
        where = f"WHERE {where}" if rules else ""
        extra = [v for e in rules for v in (e.robot_id, e.session, int(e.from_seq))]
        sql = (
            f"SELECT id, robot_id, session, seq, stamp_ns, global <-> %b AS d FROM {_KF} {where} "
            "ORDER BY global <-> %b LIMIT %s"
        )
        if exact:
            settings = [("enable_indexscan", "off")]
        else:
            ef = max(int(ef_search or self.ef_search), k)
            settings = [
                ("enable_seqscan", "off"),
                ("hnsw.ef_search", str(ef)),
                ("hnsw.iterative_scan", "relaxed_order"),
            ]
        return sql, ((q, *extra, q, k) if k > 0 else None), settings

    def fetch(self, ids: list[int]) -> list[FleetKeyframe]:
        """The keyframes with these fleet ids (in the order given) with global descriptor, patches, local
        features and pose. Raises FleetError (an unknown id, a blob that does not fit the layout),
        FleetUnavailableError."""
        want = [int(i) for i in ids]
        if not want:
            return []

        def read(conn):
            return conn.execute(
                f"SELECT k.id, k.robot_id, k.session, k.seq, k.stamp_ns, k.position, k.orientation, k.image_width, "
                f"k.image_height, k.global, k.received, d.patches, d.local_flags, d.local FROM {_KF} k "
                f"JOIN {_DATA} d ON d.keyframe_id = k.id WHERE k.id = ANY(%s)",
                (want,),
            ).fetchall()

        rows = {int(r[0]): r for r in self._run("fetching keyframes", read)}
        missing = [i for i in want if i not in rows]
        if missing:
            raise FleetError(f"no keyframe {missing} in the fleet store")
        return [self._keyframe(rows[i]) for i in want]

    def _keyframe(self, row) -> FleetKeyframe:
        kid, robot, session, seq, stamp, pos, ori, w, h, glob, received, patches, flags, local = row
        blob = bytes(patches)
        size = sum(p * d for p, d in self.shapes) * self.patch_dtype.itemsize
        if len(blob) != size:
            raise FleetError(f"keyframe {kid}: {len(blob)} bytes of patches, the layout needs {size}")
        arrays, at = [], 0
        for p, d in self.shapes:
            n = p * d * self.patch_dtype.itemsize
            arrays.append(np.frombuffer(blob, self.patch_dtype, p * d, at).reshape(p, d))
            at += n
        features = PlaceFeatures(
            np.asarray(glob.to_numpy(), np.float32), arrays, (int(w), int(h)), _decode_local(int(flags), bytes(local))
        )
        return FleetKeyframe(
            int(kid),
            robot,
            session,
            int(seq),
            int(stamp),
            features,
            None if pos is None else np.array(pos, np.float64),
            None if ori is None else np.array(ori, np.float64),
            received,
        )

    def loop_edges(self, robot_id: str | None = None) -> list[LoopEdge]:
        """The stored loops (oldest first), or those with a keyframe of ``robot_id`` on either side."""
        where, args = "", ()
        if robot_id is not None:
            where = f"WHERE EXISTS (SELECT 1 FROM {_KF} k WHERE k.id IN (e.query_id, e.match_id) AND k.robot_id = %s)"
            args = (robot_id,)
        sql = (
            f"SELECT query_id, match_id, score, method, reporter, created FROM {_EDGES} e {where} ORDER BY created, lo"
        )
        rows = self._run("listing loop edges", lambda c: c.execute(sql, args).fetchall())
        return [LoopEdge(int(q), int(m), float(s), me, r, c) for q, m, s, me, r, c in rows]


def _with_settings(conn, settings: list[tuple[str, str]], sql: str, args: tuple) -> list[tuple]:
    """The rows of ``sql`` in a transaction with the ``settings`` (SET LOCAL through ``set_config``)."""
    with conn.transaction():
        for name, value in settings:
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        return conn.execute(sql, args).fetchall()


def _decode_local(flags: int, blob: bytes) -> LocalFeatures | None:
    """A keyframe's local features from its :data:`LOCAL_RECORD` bytes and flags (the map's layout)."""
    if not flags & HAS_LOCAL:
        return None
    if len(blob) % LOCAL_RECORD.itemsize:
        raise FleetError(f"local features of {len(blob)} bytes are not whole {LOCAL_RECORD.itemsize}-byte records")
    r = np.frombuffer(blob, LOCAL_RECORD)
    c = np.ascontiguousarray
    return LocalFeatures(
        c(r["kp"], np.float32),
        c(r["desc"], np.uint8),
        c(r["ray"], np.float32) if flags & HAS_RAYS else None,
        c(r["pt"], np.float32) if flags & HAS_POINTS else None,
    )
