"""The fleet store at scale (issue 30), side by side with the local FAISS map: insert rate, filtered top-N
latency, Recall@1 / Recall@N of HNSW against exact search at several ``ef_search``, bytes per keyframe.

Descriptors: real ones, then synthetic ones drawn around them. Real: ``--features`` (``pnv extract`` files), by
default the project's image sets with the default model and the speed preset, each extracted once into ``--out``
(:data:`SEED_SETS`: the RTAB-Map loop, the VPR-Bench corridor's reference and query frames, the TUM fr1/desk
pairs). Synthetic: a real global descriptor plus Gaussian noise of ``--spread`` times the median distance between
consecutive real frames of a set, renormalised. Keyframe i belongs to robot ``i % --robots`` (one session each)
with sequence number ``i // --robots``.

- **Insert.** All keyframes but the last ``--blob-sample`` are bulk-loaded by COPY (global descriptors only). With
  ``--index after`` (default) the store's HNSW index is dropped first and built again after the load, with
  ``--maintenance-work-mem``, as PostgreSQL's documentation advises for bulk loads; ``--index during`` keeps it
  maintained row by row; either way the index is made with ``--hnsw-m`` / ``--hnsw-ef-construction`` (default:
  the schema's). The last ``--blob-sample`` keyframes then go through :meth:`FleetStore.add` with their
  seed's real patches and SIFT local features (one transaction each, the index maintained): ms per keyframe at
  that size. Finally (after the searches) ``--probe`` more rows are COPYed with the index maintained and rolled
  back: the row-by-row rate at that size, to compare with the build.
- **Bytes.** Descriptor rows and index: every relation of the store over the bulk keyframes; patches and local
  features: ``keyframe_data`` over the blob sample. Their sum is a keyframe's cost at that size (at 1M full
  patches are ~1 TB, so only the sample carries them).
- **Search.** ``--queries`` per query set: a real descriptor plus noise of each ``--query-spreads`` step,
  asked by robot 0, whose own newest ``--exclude-recent`` keyframes are left out (:class:`RecentExclusion`).
  Reference: the exact filtered top-N over the same descriptors in numpy (float32 dot products: the vectors are
  unit); the database's exact search (sequential scan) on the first ``--exact-queries`` for its latency and its
  agreement with that reference. HNSW at each ``--ef``: median and p95 ms, Recall@1 and Recall@N.
- **Local map.** The same descriptors in :class:`pnv_ros.index.GlobalIndex` (``--local-kinds``: flat, hnsw;
  the node's settings), loaded in one add but the last ``--one-at-a-time`` (added as the node adds keyframes,
  timed), one query at a time (flat: the first ``--exact-queries``), Recall@1 against numpy's unfiltered exact
  top-1 (a robot's local map holds no exclusion by robot); :meth:`PlaceMap.nbytes_per_keyframe` with real patches.
  ``--no-local`` leaves it out (a fleet-only run: at 1M the local HNSW build is most of the time).
- **One size again.** ``--draw-only`` sizes are drawn but not measured, so a later size gets an earlier run's
  descriptors and queries (docs/results/fleet_hnsw_params.md: ``--sizes 100000,1000000 --draw-only 100000``).

Writes fleet_scale.{json,md,png} into ``--out`` and, with ``--docs DIR``, into DIR (docs/results)::

    nice -n 10 .venv/bin/python benchmarks/fleet_scale.py --sizes 100000,1000000 --out out/fleet_scale \
        --docs docs/results
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np

from pnv_ros.features import FeatureSet, PlaceFeatures
from pnv_ros.fleet.schema import HNSW_EF_CONSTRUCTION, HNSW_M
from pnv_ros.fleet.server import LocalServer
from pnv_ros.fleet.store import DEFAULT_EF_SEARCH, FleetStore, RecentExclusion, init_store
from pnv_ros.index import GlobalIndex

#: The project's image sets (data/), extracted once each into --out: (file stem, image folder).
SEED_SETS = (
    ("rtab_speed", common.DATA / "rtabmap_samples_loop84" / "images"),
    ("corridor_ref_speed", common.DATA / "corridor_vprbench" / "ref"),
    ("corridor_query_speed", common.DATA / "corridor_vprbench" / "query"),
    ("tum_pairs_speed", common.DATA / "tum_fr1_desk_pairs" / "rgb"),
)
CHUNK = 50_000  # rows per numpy block (generation, exact reference): bounds the temporaries at ~100 MB
HNSW_INDEX = "keyframes_global_hnsw"


@dataclass
class Seeds:
    """The real keyframes: global descriptors (S, D), their sets, and the step unit of the synthetic spread."""

    sets: list[tuple[FeatureSet, Path | None]]
    globals_: np.ndarray
    origin: np.ndarray  # (S, 2) int: set index, row in that set
    step: float

    def features(self, j: int, global_desc: np.ndarray) -> PlaceFeatures:
        """Seed j's real patches, image size and SIFT local features (when its image is at hand) with another
        global descriptor."""
        fs, images = self.sets[self.origin[j, 0]]
        r = int(self.origin[j, 1])
        return PlaceFeatures(global_desc, [p[r] for p in fs.patches], tuple(fs.image_sizes[r]), local_of(images, fs, r))


def local_of(images: Path | None, fs: FeatureSet, r: int):
    """SIFT local features of row r's image (keypoints and descriptors, no camera), or None without the image."""
    from pnv_ros.images import load_image
    from pnv_ros.local_features import extract_local_features

    path = None if images is None else images / fs.names[r]
    return extract_local_features(np.asarray(load_image(path))) if path is not None and path.is_file() else None


def load_seeds(paths: list[str] | None, out: Path) -> Seeds:
    """``paths``, or :data:`SEED_SETS` extracted once with ``pnv extract`` into ``out``. Exits when the sets
    come from different models or presets."""
    sets: list[tuple[FeatureSet, Path | None]] = []
    if paths:
        sets = [(FeatureSet.load(p), None) for p in paths]
    else:
        for stem, images in SEED_SETS:
            cached = out / f"{stem}.npz"
            if not cached.is_file():
                cmd = [sys.executable, "-m", "pnv_ros.cli", "extract", "-q", "--preset", "speed"]
                subprocess.run([*cmd, "--out", str(cached), str(images)], check=True)
            sets.append((FeatureSet.load(cached), images))
    first = sets[0][0]
    for fs, _ in sets[1:]:
        if (fs.model_id, fs.preset, fs.dim) != (first.model_id, first.preset, first.dim):
            raise SystemExit(f"seed sets of different models or presets: {first.model_id} vs {fs.model_id}")
    glob = [np.asarray(fs.global_descs, np.float32) for fs, _ in sets]
    steps = np.concatenate([np.linalg.norm(np.diff(g, axis=0), axis=1) for g in glob if len(g) > 1])
    origin = np.concatenate([np.stack([np.full(len(g), k), np.arange(len(g))], 1) for k, g in enumerate(glob)])
    return Seeds(sets, np.concatenate(glob), origin, float(np.median(steps)))


def around(seeds: np.ndarray, which: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit descriptors (len(which), D) float32: seeds[which] plus Gaussian noise of expected norm sigma,
    renormalised; made in blocks of :data:`CHUNK` rows."""
    d = seeds.shape[1]
    out = np.empty((len(which), d), np.float32)
    for s in range(0, len(which), CHUNK):
        w = which[s : s + CHUNK]
        x = seeds[w] + rng.standard_normal((len(w), d), dtype=np.float32) * np.float32(sigma / np.sqrt(d))
        out[s : s + len(w)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top(descs: np.ndarray, queries: np.ndarray, k: int, excluded: np.ndarray | None) -> np.ndarray:
    """Indices (Q, k) of the k nearest descriptors (L2 = largest dot product: all are unit) per query, nearest
    first, leaving out the ``excluded`` rows."""
    best_i = np.zeros((len(queries), 0), np.int64)
    best_s = np.zeros((len(queries), 0), np.float32)
    for s in range(0, len(descs), CHUNK):
        sim = queries @ descs[s : s + CHUNK].T
        if excluded is not None:
            sim[:, excluded[(excluded >= s) & (excluded < s + CHUNK)] - s] = -np.inf
        kk = min(k, sim.shape[1])
        part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        best_i = np.concatenate([best_i, part + s], 1)
        best_s = np.concatenate([best_s, np.take_along_axis(sim, part, 1)], 1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_i, best_s = np.take_along_axis(best_i, keep, 1), np.take_along_axis(best_s, keep, 1)
    return best_i


def _sql(store: FleetStore, what: str, sql: str, fetch: bool = False):
    return store._run(what, lambda c: c.execute(sql).fetchone() if fetch else c.execute(sql))


def relation_bytes(store: FleetStore, only: str | None = None) -> int:
    """Bytes of every table of the store's schema with its TOAST and indexes (or of table ``only``)."""
    sql = (
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'pnv_fleet' AND c.relkind = 'r'"
    )
    if only:
        sql += f" AND c.relname = '{only}'"
    return int(_sql(store, "sizing", sql, fetch=True)[0])


def copy_rows(conn, store: FleetStore, descs: np.ndarray, start: int, robots: int) -> None:
    """COPY keyframes start .. start+len(descs)-1 (global descriptors only) in the caller's transaction."""
    cols = "robot_id, session, seq, stamp_ns, image_width, image_height, model, global"
    with conn.cursor() as cur:
        with cur.copy(f"COPY pnv_fleet.keyframes ({cols}) FROM STDIN WITH (FORMAT BINARY)") as cp:
            cp.set_types(["text", "text", "int8", "int8", "int4", "int4", "int2", "vector"])
            for i, d in enumerate(descs, start):
                cp.write_row([f"r{i % robots}", "s0", i // robots, i, 640, 480, store.model_ref, d])


def fill(store: FleetStore, seeds: Seeds, descs: np.ndarray, which: np.ndarray, a) -> dict:
    """Bulk-load all but the blob sample (index built after, or maintained), then the sample through add()."""
    n = len(descs)
    k = min(a.blob_sample, n)
    bulk = n - k
    res: dict = {"blob_sample": k, "bulk": bulk, "index": a.index}
    indexdef = _sql(store, "index", f"SELECT indexdef FROM pg_indexes WHERE indexname = '{HNSW_INDEX}'", True)[0]
    indexdef = re.sub(r"WITH \(.*\)$", f"WITH (m = {a.hnsw_m}, ef_construction = {a.hnsw_ef_construction})", indexdef)
    res["indexdef"] = indexdef
    _sql(store, "index", f"DROP INDEX pnv_fleet.{HNSW_INDEX}")
    if a.index == "during":
        _sql(store, "index", indexdef)  # this run's m / ef_construction, maintained row by row
    t = time.perf_counter()

    def load(conn) -> None:
        for s in range(0, bulk, CHUNK):
            with conn.transaction():
                copy_rows(conn, store, descs[s : min(bulk, s + CHUNK)], s, a.robots)

    store._run("bulk load", load)
    res["copy_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if a.index == "after":
        _sql(store, "settings", f"SET maintenance_work_mem = '{a.maintenance_work_mem}'")
        _sql(store, "index", indexdef)
    _sql(store, "analyze", "ANALYZE pnv_fleet.keyframes")
    res["index_build_s"] = time.perf_counter() - t
    res["bulk_ms_per_keyframe"] = 1000 * (res["copy_s"] + res["index_build_s"]) / max(1, bulk)
    res["descriptor_bytes_per_keyframe"] = relation_bytes(store) / max(1, bulk)
    res["hnsw_index_bytes"] = int(_sql(store, "sizing", f"SELECT pg_relation_size('pnv_fleet.{HNSW_INDEX}')", 1)[0])
    add_ms = []
    for i in range(bulk, n):
        f = seeds.features(int(which[i]), descs[i])
        t = time.perf_counter()
        store.add(f, robot_id=f"r{i % a.robots}", session="s0", seq=i // a.robots, stamp_ns=i)
        add_ms.append(1000 * (time.perf_counter() - t))
    res["add_ms_p50"] = float(np.median(add_ms)) if add_ms else None
    res["add_ms_p95"] = float(np.percentile(add_ms, 95)) if add_ms else None
    res["blob_bytes_per_keyframe"] = relation_bytes(store, "keyframe_data") / max(1, k) if k else None
    res["bytes_per_keyframe_db"] = res["descriptor_bytes_per_keyframe"] + (res["blob_bytes_per_keyframe"] or 0.0)
    res["last_seq_robot0"] = (n - 1) // a.robots
    return res


def probe(store: FleetStore, descs: np.ndarray, a) -> float | None:
    """ms per keyframe of COPY with the HNSW index maintained, at the store's size; rolled back."""
    import psycopg

    if not a.probe:
        return None
    extra = around(descs, np.arange(a.probe) % len(descs), 0.1, np.random.default_rng(1))

    def run(conn) -> float:
        t = time.perf_counter()
        with conn.transaction():
            copy_rows(conn, store, extra, len(descs), a.robots)
            ms = 1000 * (time.perf_counter() - t) / len(extra)
            raise psycopg.Rollback()  # the transaction ends here, rolled back, and swallows it
        return ms

    return store._run("probe", run)


def plan(explained: str) -> str:
    """What answered a search: the HNSW index or a scan of the table."""
    return "hnsw" if HNSW_INDEX in explained else "seq scan"


def fleet_search(store: FleetStore, queries: np.ndarray, truth: np.ndarray, a, last_seq: int) -> dict:
    """The database's exact search on the first queries, then HNSW at each ef: latency and recall against
    ``truth`` (Q, top_n) row indices (row i = robot i % robots, seq i // robots)."""
    ex = RecentExclusion("r0", "s0", max(0, last_seq - a.exclude_recent + 1))

    def rows(hits) -> list[int]:
        return [h.seq * a.robots + int(h.robot_id[1:]) for h in hits]

    out, lat, agree = {}, [], []
    for q, tr in zip(queries[: a.exact_queries], truth):
        t = time.perf_counter()
        got = rows(store.search(q, a.top_n, exclude=ex, exact=True))
        lat.append(1000 * (time.perf_counter() - t))
        agree.append(bool(got) and got[0] == tr[0])
    out["exact"] = {
        "p50_ms": float(np.median(lat)),
        "p95_ms": float(np.percentile(lat, 95)),
        "queries": len(lat),
        "recall_at_1": float(np.mean(agree)),
        "plan": plan(store.explain(queries[0], a.top_n, exclude=ex, exact=True)),
    }
    for ef in a.ef:
        lat, r1, rn = [], [], []
        for q, tr in zip(queries, truth):
            t = time.perf_counter()
            got = rows(store.search(q, a.top_n, exclude=ex, ef_search=ef))
            lat.append(1000 * (time.perf_counter() - t))
            r1.append(bool(got) and got[0] == tr[0])
            rn.append(len(set(got) & set(tr.tolist())) / len(tr))
        out[f"hnsw_ef{ef}"] = {
            "ef_search": ef,
            "p50_ms": float(np.median(lat)),
            "p95_ms": float(np.percentile(lat, 95)),
            "recall_at_1": float(np.mean(r1)),
            "recall_at_n": float(np.mean(rn)),
            "plan": plan(store.explain(queries[0], a.top_n, exclude=ex, ef_search=ef)),
        }
    return out


def local_side(seeds: Seeds, descs: np.ndarray, sets: dict[str, np.ndarray], a) -> dict:
    """The node's local FAISS index on the same descriptors, per query set; the local map's bytes per keyframe."""
    from pnv_ros.place_map import PlaceMap

    res: dict = {}
    top1 = {name: exact_top(descs, q, 1, None)[:, 0] for name, q in sets.items()}
    for kind in a.local_kinds:
        gi = GlobalIndex(descs.shape[1], kind)
        single = min(a.one_at_a_time, len(descs))
        t = time.perf_counter()
        if single < len(descs):
            gi.add(descs[: len(descs) - single])
        res[f"{kind}_build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for d in descs[len(descs) - single :]:  # one keyframe at a time, as the node adds them
            gi.add(d)
        res[f"{kind}_add_ms"] = 1000 * (time.perf_counter() - t) / max(1, single)
        for name, queries in sets.items():
            lat, r1 = [], []
            for q, tr in zip(queries[: a.exact_queries] if kind == "flat" else queries, top1[name]):
                t = time.perf_counter()
                got = gi.search(q, a.top_n)[1][0]
                lat.append(1000 * (time.perf_counter() - t))
                r1.append(len(got) > 0 and got[0] == tr)
            res.setdefault(name, {})[kind] = {
                "p50_ms": float(np.median(lat)),
                "p95_ms": float(np.percentile(lat, 95)),
                "queries": len(lat),
                "recall_at_1": float(np.mean(r1)),
            }
        del gi
    fs = seeds.sets[0][0]
    m = PlaceMap(fs.dim, fs.preset, fs.model_id)
    for j in range(min(8, len(seeds.globals_))):
        m.add(seeds.features(j, seeds.globals_[j]), j)
    res["bytes_per_keyframe"] = m.nbytes_per_keyframe()
    return res


def configure(server: LocalServer, dsn: str, a) -> None:
    """The local server's memory settings for this run (ALTER SYSTEM, then a restart)."""
    from pnv_ros.fleet.store import connect

    with connect(dsn) as conn:
        conn.execute(f"ALTER SYSTEM SET shared_buffers = '{a.shared_buffers}'")
        conn.execute(f"ALTER SYSTEM SET max_parallel_maintenance_workers = {int(a.parallel_workers)}")
        conn.execute("ALTER SYSTEM SET max_wal_size = '8GB'")  # no checkpoint storm during the bulk load
    server.stop()
    server.start()


def draw(n: int, seeds: Seeds, a, rng: np.random.Generator):
    """One size's random draws, in order: the seeds of the n keyframes (n,), their descriptors (n, D) and the
    query sets ({name: (Q, D)})."""
    which = rng.integers(0, len(seeds.globals_), n)
    descs = around(seeds.globals_, which, a.spread * seeds.step, rng)
    sets = {
        f"queries at spread {q:g}": around(
            seeds.globals_, rng.integers(0, len(seeds.globals_), a.queries), q * seeds.step, rng
        )
        for q in a.query_spreads
    }
    return which, descs, sets


def run_size(n: int, seeds: Seeds, a, rng: np.random.Generator, root: Path, done=None) -> dict:
    """One size: the fleet store's measures, then the local map's (unless ``--no-local``). ``done(row)`` is
    called with the row after each of the two (the row's ``local`` empty the first time), so a long local build
    loses nothing."""
    fs = seeds.sets[0][0]
    t0 = time.perf_counter()
    which, descs, sets = draw(n, seeds, a, rng)
    last_seq = (n - 1) // a.robots  # robot 0's newest keyframe
    from_seq = max(0, last_seq - a.exclude_recent + 1)
    excluded = np.arange(from_seq, last_seq + 1) * a.robots
    truth = {name: exact_top(descs, q, a.top_n, excluded) for name, q in sets.items()}
    server = None if a.dsn else LocalServer(root / f"db{n}")
    try:
        dsn = a.dsn or server.start()
        if server is not None:
            configure(server, dsn, a)
        init_store(dsn, fs.dim)
        with FleetStore.open(dsn, fs.dim, fs.preset, fs.model_id) as store:
            ins = fill(store, seeds, descs, which, a)
            print(f"{n}: loaded {ins}", flush=True)
            found = {name: fleet_search(store, q, truth[name], a, last_seq) for name, q in sets.items()}
            ins["probe_ms_per_keyframe"] = probe(store, descs, a)
    finally:
        if server is not None:
            server.stop()
    row = {"n": n, "insert": ins, "fleet": found, "local": {}, "wall_s": time.perf_counter() - t0}
    if done is not None:
        done(row)
    if a.no_local:
        return row
    row["local"] = local_side(seeds, descs, sets, a)
    row["wall_s"] = time.perf_counter() - t0
    if done is not None:
        done(row)
    return row


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def page(rec: dict) -> list[str]:
    a = rec["args"]
    lines = ["# Fleet store at scale (PostgreSQL + pgvector) vs the local FAISS map", ""]
    lines += [f"`{rec['command']}`", "", f"{rec['date']}, {common.machine_line(rec['machine'])}, "]
    lines[-1] += f"load average at start {rec['machine'].get('load_avg_start')}."
    lines += [
        "",
        f"Seeds: {rec['seeds']} real keyframes ({', '.join(rec['seed_sets'])}; {rec['model_id']}, preset "
        f"{rec['preset']}); synthetic ones around them at spread {a['spread']:g} x the median consecutive-frame "
        f"step. {a['robots']} robots; top-{a['top_n']}; robot 0's newest {a['exclude_recent']} keyframes left out. "
        f"Recall against numpy's exact filtered search; the database's own exact search on the first "
        f"{a['exact_queries']} queries. PostgreSQL shared_buffers {a['shared_buffers']}, HNSW m "
        f"{a.get('hnsw_m', 16)}, ef_construction {a.get('hnsw_ef_construction', 64)}, built {a['index']} the bulk load.",
        "",
        "| keyframes | COPY ms/kf | index build s | ms/kf (COPY + build) | ms/kf COPY, index maintained | "
        "add with blobs ms p50 / p95 | descriptor + index B/kf | blobs B/kf | total MB/kf | local map MB/kf |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        i, loc = r["insert"], r["local"]
        lines.append(
            f"| {r['n']:,} | {1000 * i['copy_s'] / max(1, i['bulk']):.3f} | {i['index_build_s']:.1f} | "
            f"{i['bulk_ms_per_keyframe']:.3f} | {_f(i.get('probe_ms_per_keyframe'), '.3f')} | "
            f"{_f(i['add_ms_p50'], '.1f')} / {_f(i['add_ms_p95'], '.1f')} | "
            f"{i['descriptor_bytes_per_keyframe']:,.0f} | {_f(i['blob_bytes_per_keyframe'], ',.0f')} | "
            f"{i['bytes_per_keyframe_db'] / 1e6:.3f} | {_f(loc.get('bytes_per_keyframe', None) and loc['bytes_per_keyframe'] / 1e6, '.3f')} |"
        )
    names = list(rec["rows"][0]["fleet"]) if rec["rows"] else []
    for name in names:
        lines += ["", f"## Search, {name}", ""]
        lines += [
            "| keyframes | search | plan | p50 ms | p95 ms | Recall@1 | Recall@N |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rec["rows"]:
            for k, v in r["fleet"][name].items():
                label = f"fleet {k} ({v['queries']} queries)" if k == "exact" else f"fleet {k}"
                lines.append(
                    f"| {r['n']:,} | {label} | {v['plan']} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | "
                    f"{v['recall_at_1']:.3f} | {_f(v.get('recall_at_n'), '.3f')} |"
                )
            for kind, v in r["local"].get(name, {}).items():
                lines.append(
                    f"| {r['n']:,} | local FAISS {kind} ({v['queries']} queries) | | {v['p50_ms']:.2f} | "
                    f"{v['p95_ms']:.2f} | {v['recall_at_1']:.3f} | |"
                )
    lines += ["", "Local FAISS, ms per keyframe added one at a time at that size / one-add build s:", ""]
    for r in rec["rows"]:
        loc = r["local"]
        kinds = [k for k in rec["args"]["local_kinds"] if k + "_add_ms" in loc]
        parts = [f"{k} {loc[k + '_add_ms']:.3f} ms / {loc[k + '_build_s']:.1f} s" for k in kinds] or ["not measured"]
        lines.append(f"- {r['n']:,}: {', '.join(parts)}; whole size run {r['wall_s'] / 60:.1f} min")
    return lines


def plot(rec: dict, path: Path) -> None:
    """Latency (p50) vs size, and Recall@1 vs ef_search per size: fleet HNSW / exact, local FAISS flat / hnsw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rec["rows"]
    ns = [r["n"] for r in rows]
    name = list(rows[0]["fleet"])[-1]  # the hardest query set (widest spread)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ef_default = f"hnsw_ef{DEFAULT_EF_SEARCH}"
    for key, style, label in (("exact", "o-", "fleet exact (seq scan)"), (ef_default, "s-", None)):
        if all(key in r["fleet"][name] for r in rows):
            lab = label or f"fleet HNSW ef_search {DEFAULT_EF_SEARCH}"
            ax.loglog(ns, [r["fleet"][name][key]["p50_ms"] for r in rows], style, label=lab)
    for kind, style in (("flat", "^--"), ("hnsw", "v--")):
        if all(kind in r["local"].get(name, {}) for r in rows):
            ax.loglog(ns, [r["local"][name][kind]["p50_ms"] for r in rows], style, label=f"local FAISS {kind}")
    ax.set(xlabel="keyframes", ylabel="ms per query (median)", title=f"Top-{rec['args']['top_n']} latency, {name}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    for r, color in zip(rows, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for qname, style in zip(r["fleet"], (":", "-")):
            hn = [v for k, v in r["fleet"][qname].items() if k != "exact"]
            bx.semilogx(
                [v["ef_search"] for v in hn],
                [v["recall_at_1"] for v in hn],
                "o" + style,
                color=color,
                label=f"fleet {r['n']:,}, {qname}",
            )
            if "hnsw" in r["local"].get(qname, {}):
                bx.plot([2048], [r["local"][qname]["hnsw"]["recall_at_1"]], "v", color=color)
    bx.set(
        xlabel="ef_search (local FAISS hnsw: efSearch 2048, triangles)",
        ylabel="Recall@1 vs exact",
        title="Fleet HNSW recall vs ef_search",
    )
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000", help="comma-separated keyframe counts")
    ap.add_argument("--features", nargs="+", help="pnv extract .npz files (default: SEED_SETS, extracted once)")
    ap.add_argument("--dsn", help="an existing server's empty database (default: a local server per size)")
    ap.add_argument("--robots", type=int, default=10)
    ap.add_argument("--blob-sample", type=int, default=200)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=20, help="queries the database's exact search answers")
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--exclude-recent", type=int, default=50)
    ap.add_argument("--ef", type=lambda s: [int(x) for x in s.split(",")], default=[40, 100, 200, 400, 800])
    ap.add_argument("--index", choices=("after", "during"), default="after", help="HNSW built after the load or kept")
    ap.add_argument("--hnsw-m", type=int, default=HNSW_M, help="HNSW m of the rebuilt index (default: the schema's)")
    ap.add_argument(
        "--hnsw-ef-construction",
        type=int,
        default=HNSW_EF_CONSTRUCTION,
        help="HNSW ef_construction of the rebuilt index (default: the schema's)",
    )
    ap.add_argument("--maintenance-work-mem", default="6GB", help="for the index build (the graph must fit)")
    ap.add_argument("--parallel-workers", type=int, default=1, help="max_parallel_maintenance_workers")
    ap.add_argument("--shared-buffers", default="1GB", help="the local server's shared_buffers")
    ap.add_argument("--probe", type=int, default=2000, help="rows COPYed with the index maintained, rolled back")
    ap.add_argument("--no-local", action="store_true", help="leave out the local FAISS side")
    ap.add_argument(
        "--draw-only",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[],
        help="sizes whose descriptors are drawn but not measured (an earlier run's random stream: its --sizes "
        "before the one measured again)",
    )
    ap.add_argument("--local-kinds", type=lambda s: s.split(","), default=["flat", "hnsw"])
    ap.add_argument("--one-at-a-time", type=int, default=1000, help="local keyframes added singly (timed)")
    ap.add_argument("--spread", type=float, default=1.0, help="synthetic noise, times the consecutive-frame step")
    ap.add_argument(
        "--query-spreads",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.3, 1.0],
        help="query noise per query set, same unit (0.3: revisits near a real frame; 1.0: among the synthetic ones)",
    )
    ap.add_argument("--out", default="out/fleet_scale")
    ap.add_argument("--docs", help="also write fleet_scale.{json,md,png} here (docs/results)")
    ap.add_argument("--from-json", help="only redraw the .md and .png of this fleet_scale.json (into --docs)")
    a = ap.parse_args()
    if a.from_json:
        rec = json.loads(Path(a.from_json).read_text())
        common.write_md(Path(a.docs or a.out) / "fleet_scale.md", page(rec))
        plot(rec, Path(a.docs or a.out) / "fleet_scale.png")
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = load_seeds(a.features, out)
    fs = seeds.sets[0][0]
    names = [Path(p).stem for p in a.features] if a.features else [s for s, _ in SEED_SETS]
    rec = common.header(
        seeds=len(seeds.globals_), seed_sets=names, model_id=fs.model_id, preset=fs.preset.name, args=vars(a)
    )
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="pnv_fleet_bench_"))
    root.chmod(0o755)  # open to pass for the server's user (see pnv_ros.fleet.server)
    rec["rows"] = []
    folders = [out] + ([Path(a.docs)] if a.docs else [])

    def done(row: dict) -> None:
        rec["rows"][-1] = row
        write(rec, folders)  # each size as soon as it is measured, the local map's part when it comes

    try:
        for s in a.sizes.split(","):
            if int(s) in a.draw_only:
                draw(int(s), seeds, a, rng)
                continue
            rec["rows"].append(None)
            run_size(int(s), seeds, a, rng, root, done)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(page(rec)))


def write(rec: dict, folders: list[Path]) -> None:
    lines = page(rec)
    for d in folders:
        common.write_json(d / "fleet_scale.json", rec)
        common.write_md(d / "fleet_scale.md", lines)
        plot(rec, d / "fleet_scale.png")


if __name__ == "__main__":
    main()
