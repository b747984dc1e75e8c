"""The fleet store at scale (issue 30), side by side with the local FAISS map: insert rate, filtered top-N
latency, Recall@1 / Recall@N of HNSW against exact search at several ``ef_search``, bytes per keyframe.

Descriptors: real ones (``--features``, a ``pnv extract`` file; default: the RTAB-Map loop's 84 frames with the
default model and speed preset, extracted once into ``--out``), then synthetic ones drawn around them: a real
global descriptor plus Gaussian noise of ``--spread`` times the median distance between consecutive real frames,
renormalised. Keyframes are spread over ``--robots`` robots, one session each, numbered in order.

- **Insert.** The first ``--blob-sample`` keyframes go through :meth:`FleetStore.add` with their seed's real
  patches and SIFT local features (one transaction each): ms per keyframe, and bytes per keyframe in the
  database (every relation of the store: heap, TOAST, indexes) over those. The rest are bulk-loaded (COPY,
  global descriptors only: the HNSW index is maintained as rows arrive) to reach the size; their rate is given
  apart. (At 1M keyframes full patches are ~1 TB: the bytes per keyframe say what a site needs.)
- **Search.** ``--queries`` real descriptors plus small noise (revisits), asked by robot 0, whose own newest
  ``--exclude-recent`` keyframes are left out (:class:`RecentExclusion`): exact (sequential scan) is the
  reference; HNSW at each ``--ef``; median and p95 ms.
- **Local map.** The same descriptors in :class:`pnv_ros.index.GlobalIndex` (flat and hnsw, the node's
  settings), one query at a time, and :meth:`PlaceMap.nbytes_per_keyframe` with the same patches.

    .venv/bin/python benchmarks/fleet_scale.py --sizes 10000 --out out/fleet_scale
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np

from pnv_ros.features import FeatureSet, PlaceFeatures
from pnv_ros.fleet.server import LocalServer
from pnv_ros.fleet.store import FleetStore, RecentExclusion, init_store
from pnv_ros.index import GlobalIndex

RTAB_IMAGES = common.DATA / "rtabmap_samples_loop84" / "images"


def seed_features(path: str | None, out: Path) -> FeatureSet:
    """The real descriptors: ``path``, or the RTAB-Map loop extracted once with ``pnv extract`` into ``out``."""
    if path:
        return FeatureSet.load(path)
    cached = out / "rtab_speed.npz"
    if not cached.is_file():
        cmd = [sys.executable, "-m", "pnv_ros.cli", "extract", "--preset", "speed", "--out", str(cached)]
        subprocess.run([*cmd, str(RTAB_IMAGES)], check=True)
    return FeatureSet.load(cached)


def step_of(seeds: np.ndarray) -> float:
    """The median distance between consecutive real frames: the unit of the synthetic spread."""
    return float(np.median(np.linalg.norm(np.diff(seeds, axis=0), axis=1)))


def around(seeds: np.ndarray, which: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit descriptors (len(which), D): seeds[which] plus Gaussian noise of expected norm sigma, renormalised."""
    d = seeds.shape[1]
    x = seeds[which] + rng.standard_normal((len(which), d)).astype(np.float32) * np.float32(sigma / np.sqrt(d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def local_of(fs: FeatureSet, i: int):
    """SIFT local features of seed i's image (no camera: keypoints and descriptors), for realistic blobs."""
    from pnv_ros.images import load_image
    from pnv_ros.local_features import extract_local_features

    path = RTAB_IMAGES / fs.names[i]
    return extract_local_features(np.asarray(load_image(path))) if path.is_file() else None


def store_bytes(store: FleetStore) -> int:
    """Bytes of every relation in the store's schema (heap, TOAST, indexes)."""
    sql = (
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'pnv_fleet' AND c.relkind = 'r'"
    )
    return int(store._run("sizing", lambda c: c.execute(sql).fetchone()[0]))


def fill(store: FleetStore, fs: FeatureSet, descs: np.ndarray, which: np.ndarray, a) -> dict:
    """Insert the keyframes: a sample through add() with real blobs, the rest by COPY. Returns the timings."""
    robots = a.robots
    seq = np.zeros(robots, np.int64)
    locals_ = {}
    add_ms = []
    k = min(a.blob_sample, len(descs))
    for i in range(k):
        r, j = i % robots, int(which[i])
        if j not in locals_:
            locals_[j] = local_of(fs, j)
        f = PlaceFeatures(descs[i], [p[j] for p in fs.patches], tuple(fs.image_sizes[j]), locals_[j])
        t = time.perf_counter()
        store.add(f, robot_id=f"r{r}", session="s0", seq=int(seq[r]), stamp_ns=i)
        add_ms.append(1000 * (time.perf_counter() - t))
        seq[r] += 1
    per_kf = store_bytes(store) / max(1, k)
    t = time.perf_counter()

    def copy(conn) -> None:
        cols = "robot_id, session, seq, stamp_ns, image_width, image_height, model, global"
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY pnv_fleet.keyframes ({cols}) FROM STDIN WITH (FORMAT BINARY)") as cp:
                cp.set_types(["text", "text", "int8", "int8", "int4", "int4", "int2", "vector"])
                for i in range(k, len(descs)):
                    r = i % robots
                    cp.write_row([f"r{r}", "s0", int(seq[r]), i, 640, 480, store.model_ref, descs[i]])
                    seq[r] += 1

    store._run("bulk load", copy)
    bulk_s = time.perf_counter() - t
    return {
        "add_ms_p50": float(np.median(add_ms)) if add_ms else None,
        "add_ms_p95": float(np.percentile(add_ms, 95)) if add_ms else None,
        "blob_sample": k,
        "bytes_per_keyframe_db": per_kf,
        "bulk_ms_per_keyframe": 1000 * bulk_s / max(1, len(descs) - k),
        "last_seq_robot0": int(seq[0]) - 1,
    }


def plan(explained: str) -> str:
    """What answered a search: the HNSW index or a scan of the table."""
    return "hnsw" if "keyframes_global_hnsw" in explained else "seq scan"


def fleet_search(store: FleetStore, queries: np.ndarray, a, last_seq: int) -> dict:
    """Exact reference, then HNSW at each ef: latency and recall."""
    ex = RecentExclusion("r0", "s0", max(0, last_seq - a.exclude_recent + 1))
    out, truth, lat = {}, [], []
    for q in queries:
        t = time.perf_counter()
        truth.append([h.id for h in store.search(q, a.top_n, exclude=ex, exact=True)])
        lat.append(1000 * (time.perf_counter() - t))
    out["exact"] = {
        "p50_ms": float(np.median(lat)),
        "p95_ms": float(np.percentile(lat, 95)),
        "plan": plan(store.explain(queries[0], a.top_n, exclude=ex, exact=True)),
    }
    for ef in a.ef:
        lat, r1, rn = [], [], []
        for q, tr in zip(queries, truth):
            t = time.perf_counter()
            got = [h.id for h in store.search(q, a.top_n, exclude=ex, ef_search=ef)]
            lat.append(1000 * (time.perf_counter() - t))
            r1.append(bool(got) and got[0] == tr[0])
            rn.append(len(set(got) & set(tr)) / max(1, len(tr)))
        out[f"hnsw_ef{ef}"] = {
            "p50_ms": float(np.median(lat)),
            "p95_ms": float(np.percentile(lat, 95)),
            "recall_at_1": float(np.mean(r1)),
            f"recall_at_{a.top_n}": float(np.mean(rn)),
            "plan": plan(store.explain(queries[0], a.top_n, exclude=ex, ef_search=ef)),
        }
    return out


def local_side(fs: FeatureSet, descs: np.ndarray, sets: dict[str, np.ndarray], a) -> dict:
    """The node's local FAISS index on the same descriptors, per query set; the local map's bytes per keyframe."""
    from pnv_ros.place_map import PlaceMap

    res: dict = {}
    flat_ids: dict[str, np.ndarray] = {}
    for kind in ("flat", "hnsw"):
        gi = GlobalIndex(descs.shape[1], kind)
        t = time.perf_counter()
        for d in descs:  # one keyframe at a time, as the node adds them
            gi.add(d)
        res[f"{kind}_add_ms"] = 1000 * (time.perf_counter() - t) / len(descs)
        for name, queries in sets.items():
            lat, ids = [], []
            for q in queries:
                t = time.perf_counter()
                ids.append(gi.search(q, a.top_n)[1][0])
                lat.append(1000 * (time.perf_counter() - t))
            ids = np.array(ids)
            flat_ids.setdefault(name, ids)
            res.setdefault(name, {})[kind] = {
                "p50_ms": float(np.median(lat)),
                "p95_ms": float(np.percentile(lat, 95)),
                "recall_at_1": float(np.mean(ids[:, 0] == flat_ids[name][:, 0])),
            }
    m = PlaceMap(fs.dim, fs.preset, fs.model_id)
    for j in range(min(8, len(fs))):
        patches = [p[j] for p in fs.patches]
        m.add(PlaceFeatures(fs.global_descs[j], patches, tuple(fs.image_sizes[j]), local_of(fs, j)), j)
    res["bytes_per_keyframe"] = m.nbytes_per_keyframe()
    return res


def run_size(n: int, fs: FeatureSet, a, rng: np.random.Generator, root: Path) -> dict:
    seeds = np.asarray(fs.global_descs, np.float32)
    step = step_of(seeds)
    which = rng.integers(0, len(seeds), n)
    descs = around(seeds, which, a.spread * step, rng)
    sets = {
        f"queries at spread {q:g}": around(seeds, rng.integers(0, len(seeds), a.queries), q * step, rng)
        for q in a.query_spreads
    }
    server = None if a.dsn else LocalServer(root / f"db{n}")
    try:
        dsn = a.dsn or server.start()
        init_store(dsn, fs.dim)
        with FleetStore.open(dsn, fs.dim, fs.preset, fs.model_id) as store:
            ins = fill(store, fs, descs, which, a)
            found = {name: fleet_search(store, q, a, ins["last_seq_robot0"]) for name, q in sets.items()}
    finally:
        if server is not None:
            server.stop()
    return {"n": n, "insert": ins, "fleet": found, "local": local_side(fs, descs, sets, a)}


def page(rec: dict) -> list[str]:
    lines = ["# Fleet store at scale (PostgreSQL + pgvector) vs the local FAISS map", ""]
    lines += [f"`{rec['command']}`", "", f"{rec['date']}, {common.machine_line(rec['machine'])}", ""]
    for r in rec["rows"]:
        ins, loc = r["insert"], r["local"]
        lines += [f"## {r['n']} keyframes", ""]
        lines.append(
            f"Insert with blobs: {ins['add_ms_p50']:.1f} ms/keyframe (p95 {ins['add_ms_p95']:.1f}) over "
            f"{ins['blob_sample']}; bulk (descriptors only): {ins['bulk_ms_per_keyframe']:.2f} ms/keyframe. "
            f"Bytes per keyframe: database {ins['bytes_per_keyframe_db'] / 1e6:.2f} MB, local map "
            f"{loc['bytes_per_keyframe'] / 1e6:.2f} MB. Local FAISS add (descriptor only, one at a time): flat "
            f"{loc['flat_add_ms']:.3f} ms, hnsw {loc['hnsw_add_ms']:.2f} ms."
        )
        for name, found in r["fleet"].items():
            head = "| search | planner | p50 ms | p95 ms | Recall@1 vs exact | Recall@N vs exact |"
            lines += ["", f"### {name}", "", head, "|---|---|---|---|---|---|"]
            for k, v in found.items():
                rn = next((x for key, x in v.items() if key.startswith("recall_at_") and key != "recall_at_1"), None)
                r1 = v.get("recall_at_1")
                lines.append(
                    f"| fleet {k} | {v.get('plan', 'seq scan')} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | "
                    f"{'' if r1 is None else f'{r1:.3f}'} | {'' if rn is None else f'{rn:.3f}'} |"
                )
            for k in ("flat", "hnsw"):
                v = loc[name][k]
                lines.append(
                    f"| local FAISS {k} | | {v['p50_ms']:.3f} | {v['p95_ms']:.3f} | {v['recall_at_1']:.3f} | |"
                )
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000")
    ap.add_argument("--features", help="a pnv extract .npz (default: the RTAB-Map loop, extracted once)")
    ap.add_argument("--dsn", help="an existing server's database (default: a local server per size)")
    ap.add_argument("--robots", type=int, default=10)
    ap.add_argument("--blob-sample", type=int, default=200)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--exclude-recent", type=int, default=50)
    ap.add_argument("--ef", type=lambda s: [int(x) for x in s.split(",")], default=[40, 100, 200, 400, 800])
    ap.add_argument("--spread", type=float, default=1.0, help="synthetic noise, times the consecutive-frame step")
    ap.add_argument(
        "--query-spreads",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.3, 1.0],
        help="query noise per query set, same unit (0.3: revisits near a real frame; 1.0: among the synthetic ones)",
    )
    ap.add_argument("--out", default="out/fleet_scale")
    ap.add_argument("--md", help="also write the page here (e.g. docs/results/fleet_scale.md)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    fs = seed_features(a.features, out)
    rec = common.header(seeds=len(fs), model_id=fs.model_id, preset=fs.preset.name, args=vars(a))
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="pnv_fleet_bench_"))
    root.chmod(0o755)  # open to pass for the server's user (see pnv_ros.fleet.server)
    try:
        rec["rows"] = [run_size(int(s), fs, a, rng, root) for s in a.sizes.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    common.write_json(out / "fleet_scale.json", rec)
    lines = page(rec)
    common.write_md(out / "fleet_scale.md", lines)
    if a.md:
        common.write_md(a.md, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
