"""The fleet store's tables in PostgreSQL + pgvector, versioned. No ROS.

Everything lives in the PostgreSQL schema ``pnv_fleet`` (so a database shared with other applications keeps its
names apart):

- ``meta``: one row: ``schema_version`` (:data:`SCHEMA_VERSION`), the descriptor dimension ``dim``.
- ``models``: the model the store was made for: identity (``name:dim:sha256-prefix``), dimension, the full preset
  as JSON, the patch dtype. The first writer binds it; a store of another model is refused (as ``.npz`` maps are:
  :func:`pnv_ros.features.check_fits`). Every keyframe row names its model.
- ``keyframes``: ``id`` (the fleet-wide keyframe id), ``robot_id``, ``session`` (one robot run), ``seq`` (the
  keyframe's number in its session: the recency exclusion and the outbox's idempotent upload both key on
  ``(robot_id, session, seq)``, never on clocks of two robots), ``stamp_ns`` (the robot's ROS time),
  ``received`` (the server's clock at insert), optional odometry ``position`` (3) / ``orientation`` (x, y, z, w),
  the image size, and ``global`` as ``vector(dim)`` with an HNSW index (L2, as the local FAISS map).
- ``keyframe_data``: one row per keyframe, written in the same transaction: ``patches`` (bytea: per scale the
  (P_s, D) little-endian float16/float32 array, C order, scales in preset order, as the ``.npz`` map's
  ``patches_p<size>`` rows) and ``local`` (bytea: the keyframe's :data:`pnv_ros.place_map.LOCAL_RECORD` rows, 160
  bytes a keypoint, with ``local_flags`` as the map's). Stored ``EXTERNAL`` (out of line, uncompressed: float
  descriptors do not compress and the attempt costs insert time). Never pickled.
- ``loop_edges``: one row per unordered pair of keyframes (unique ``(lo, hi)`` = (least, greatest) id):
  ``query_id`` / ``match_id`` as first reported (the relative pose's parent / child), score, method, reporter.
"""

from __future__ import annotations

from pnv_ros.errors import FleetError

#: The version of the tables below; a store of another version is refused (no migration exists yet).
SCHEMA_VERSION = 1
#: The PostgreSQL schema (namespace) of the tables.
NAMESPACE = "pnv_fleet"
#: HNSW build parameters: m 24, ef_construction 100, from benchmarks/fleet_scale.py at 1M keyframes (real
#: descriptors of the project's image sets and synthetic ones around them; docs/fleet.md, "Scale"). pgvector's
#: defaults (m 16, ef_construction 64) topped out at Recall@1 0.925 / 0.955 (ef_search 400 / 800) for queries
#: among the keyframes and 0.970 / 0.980 for revisits; m 24 / ef_construction 100 gives 0.990 / 0.990 and
#: 0.985 / 0.995 for ~2 ms more a query (15.4 / 18.7 ms at 400 / 800), the same index size (2.73 GB: three
#: nodes an 8 kB page either way) and a build of 15.4 min instead of 9.5 (2 shared cores, one parallel worker).
HNSW_M, HNSW_EF_CONSTRUCTION = 24, 100
#: pgvector's HNSW limit for ``vector`` columns (4,000 for ``halfvec``): index a PCA-reduced descriptor.
MAX_INDEXED_DIM = 2000
#: The advisory lock key that serialises schema creation (any fixed 64-bit number; this is "pnvfleet" as ASCII).
INIT_LOCK = 0x706E76666C656574


def create_statements(dim: int) -> list[str]:
    """The DDL of a new store for ``dim``-d descriptors, in order. Raises FleetError for a dimension HNSW
    cannot index."""
    if not 0 < int(dim) <= MAX_INDEXED_DIM:
        raise FleetError(
            f"{dim}-d descriptors: pgvector's HNSW indexes at most {MAX_INDEXED_DIM} dimensions; use a model "
            "with a PCA (WPCA) of at most that many (the default model's is 512)"
        )
    n = NAMESPACE
    return [
        "CREATE EXTENSION IF NOT EXISTS vector",
        f"CREATE SCHEMA {n}",
        f"""CREATE TABLE {n}.meta (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            schema_version integer NOT NULL,
            dim integer NOT NULL,
            created timestamptz NOT NULL DEFAULT now())""",
        f"INSERT INTO {n}.meta (schema_version, dim) VALUES ({SCHEMA_VERSION}, {int(dim)})",
        f"""CREATE TABLE {n}.models (
            id smallint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            identity text NOT NULL,
            dim integer NOT NULL,
            preset jsonb NOT NULL,
            patch_dtype text NOT NULL CHECK (patch_dtype IN ('float16', 'float32')),
            created timestamptz NOT NULL DEFAULT now())""",
        f"""CREATE TABLE {n}.keyframes (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            robot_id text NOT NULL CHECK (robot_id <> ''),
            session text NOT NULL CHECK (session <> ''),
            seq bigint NOT NULL CHECK (seq >= 0),
            stamp_ns bigint NOT NULL,
            received timestamptz NOT NULL DEFAULT clock_timestamp(),
            position double precision[] CHECK (cardinality(position) = 3),
            orientation double precision[] CHECK (cardinality(orientation) = 4),
            image_width integer NOT NULL CHECK (image_width > 0),
            image_height integer NOT NULL CHECK (image_height > 0),
            model smallint NOT NULL REFERENCES {n}.models (id),
            global vector({int(dim)}) NOT NULL,
            UNIQUE (robot_id, session, seq))""",
        f"""CREATE INDEX keyframes_global_hnsw ON {n}.keyframes USING hnsw (global vector_l2_ops)
            WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})""",
        f"""CREATE TABLE {n}.keyframe_data (
            keyframe_id bigint PRIMARY KEY REFERENCES {n}.keyframes (id) ON DELETE CASCADE,
            patches bytea NOT NULL,
            local_flags smallint NOT NULL DEFAULT 0,
            local bytea NOT NULL DEFAULT ''::bytea)""",
        f"ALTER TABLE {n}.keyframe_data ALTER COLUMN patches SET STORAGE EXTERNAL",
        f"ALTER TABLE {n}.keyframe_data ALTER COLUMN local SET STORAGE EXTERNAL",
        f"""CREATE TABLE {n}.loop_edges (
            query_id bigint NOT NULL REFERENCES {n}.keyframes (id) ON DELETE CASCADE,
            match_id bigint NOT NULL REFERENCES {n}.keyframes (id) ON DELETE CASCADE,
            lo bigint GENERATED ALWAYS AS (least(query_id, match_id)) STORED,
            hi bigint GENERATED ALWAYS AS (greatest(query_id, match_id)) STORED,
            score real NOT NULL,
            method text NOT NULL,
            reporter text NOT NULL,
            created timestamptz NOT NULL DEFAULT clock_timestamp(),
            CHECK (query_id <> match_id),
            PRIMARY KEY (lo, hi))""",
    ]


def init_schema(conn, dim: int) -> bool:
    """Create the store's tables in one transaction on an open psycopg connection (autocommit off or on).
    Returns False when a store of this version and dimension is there already (nothing changed). Raises
    FleetError for a store of another version or dimension."""
    statements = create_statements(dim)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (INIT_LOCK,))  # two robots' first start at once
        found = read_meta(conn)
        if found is not None:
            version, have_dim = found
            check_version(version)
            if have_dim != int(dim):
                raise FleetError(f"the database holds a fleet store of {have_dim}-d descriptors, not {dim}-d")
            return False
        for sql in statements:
            conn.execute(sql)
    return True


def read_meta(conn) -> tuple[int, int] | None:
    """(schema version, dim) of the store in this database, or None when it has none."""
    row = conn.execute("SELECT to_regclass(%s)", (f"{NAMESPACE}.meta",)).fetchone()
    if row is None or row[0] is None:
        return None
    version, dim = conn.execute(f"SELECT schema_version, dim FROM {NAMESPACE}.meta").fetchone()
    return int(version), int(dim)


def check_version(version: int) -> None:
    """Raise FleetError unless ``version`` is :data:`SCHEMA_VERSION`."""
    if version != SCHEMA_VERSION:
        raise FleetError(
            f"the fleet store has schema version {version}; this pnv_ros uses version {SCHEMA_VERSION} "
            "(no migration exists: use a pnv_ros of that version or a new database)"
        )
