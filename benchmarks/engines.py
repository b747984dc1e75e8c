"""Inference engines side by side: latency per keyframe against re-ranked Recall@1, descriptor differences,
sequence F1 and the live node, in one run.

For one model (default: the VGG-16 default; ``--checkpoint dinov2_vlad`` for the other family) and every engine
and precision asked for (``--engines``; default all that run here of torch fp32, onnxruntime fp32 / int8,
openvino fp32 / int8):

- extraction per image, speed preset (what the node extracts per keyframe), the engines alternating image by
  image on the same images, so their ratios are fair on a busy machine; medians, ratio vs torch fp32;
- descriptor differences vs torch fp32 (max abs; global and patch apart, with torch's own one-float32-step
  sensitivity of patch descriptors, ``engines.rounding_floor``, for scale);
- retrieval Recall@1/5 on each shared set (``eval_default_model.sets``), global and re-ranked (speed preset:
  rapid scoring, top ``--top-n`` = 20 as the node; re-ranking is the exact float32 path for every engine);
- the RTAB-Map loop as a sequence through the detector: what ``pnv eval`` does in-process (its default detector
  settings), per engine: precision, recall, F1 at 0.12, AP, and which accepted loops differ from torch fp32's.
  The bag's frames are the rtabmap set's images, so their features come from the retrieval step (matched by
  pixel content; a frame not found is extracted);
- the node end to end per keyframe (extraction + top-20 re-rank + map add: its ``latency_total``), speed
  preset, the fastest int8 engine: the bag replayed through a live ``loop_closure_node`` (``pnv eval --node``'s
  lockstep replay); its median over the run's keyframes, from the node's diagnostics.

Engine files (ONNX, int8 calibrations) are built before the timing, once, in the model cache.

``--node-stages`` measures only the live node instead, per stage: the RTAB-Map bag through ``loop_closure_node``
(``replay_through_node``, speed preset, ``--node-engine``, default openvino:int8) for each model family
(``--families``, default the VGG-16 default and ``dinov2_vlad``), from two trees in turn: today's code (``--base``,
default ``859e467``, a temporary ``git worktree`` first on the node's ``PYTHONPATH``) and this checkout, alternating
(base, new, base, new ...; ``--repeats`` each) so the ratios are fair on a busy machine. Per tree the median over
runs of the node's per-stage medians (``/diagnostics`` ``latency_<stage>_p50_ms``; today's code reports only
extract / commit / total), their ratio, and the node's F1 on the loop. After each node run, the same tree's
extraction stages and re-ranking timed in process (:data:`STAGES_SCRIPT`, the first ``--stage-frames`` of the
bag's images; 0: none): they fill today's stages its node does not report (marked in process) and stand beside
this checkout's node medians. Writes ``node_stages.{md,json}`` under ``--docs``:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/engines.py --node-stages [--repeats 3]
        [--families default,dinov2_vlad] [--node-engine openvino:int8] [--base 859e467] [--stage-frames 84]

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/engines.py [--sets rtabmap,corridor,gardenspoint]
        [--engines torch:fp32,openvino:int8,...] [--checkpoint dinov2_vlad] [--data ../shared/data] [--docs docs]

Writes docs/results/engines.{md,json,png} (``--docs``); the bag and node logs under ``--out``. About 25 minutes for the
default model, all sets and the five default engines on a 2-core machine; ``--sets`` / ``--engines`` run parts.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # = common.REPO (common imports pnv_ros: after the DDS setting)
# Before rclpy is imported anywhere: loopback-only DDS, a domain of this script's own.
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(ROOT / "test" / "fastdds_loopback.xml")
os.environ.setdefault("ROS_DOMAIN_ID", "61")
os.environ.setdefault("ROS_LOG_DIR", str(ROOT / "out" / "ros_logs"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: the machine is shared

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, header, write_json  # noqa: E402
from common import write_md as write_page  # noqa: E402
from eval_default_model import sets  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pnv_ros.engines.backends import check_engine  # noqa: E402
from pnv_ros.engines.build import rounding_floor  # noqa: E402
from pnv_ros.engines.spec import EngineError, RuntimeSpec  # noqa: E402
from pnv_ros.eval.ground_truth import GroundTruth, load_ground_truth, load_sequence_gt, recall_at_n  # noqa: E402
from pnv_ros.extract import FeatureExtractor, open_extractor  # noqa: E402
from pnv_ros.features import FeatureSet  # noqa: E402
from pnv_ros.images import image_identities, load_image  # noqa: E402
from pnv_ros.model.registry import resolve_checkpoint  # noqa: E402
from pnv_ros.retrieval import two_stage  # noqa: E402
from pnv_ros.ros.diagnostics import STAGES as DIAGNOSTIC_STAGES  # noqa: E402

#: (engine, precision) run by default, in this order (the first is the reference)
DEFAULT_ENGINES = ("torch:fp32", "onnxruntime:fp32", "openvino:fp32", "onnxruntime:int8", "openvino:int8")
REFERENCE = "torch:fp32"
SET_KEYS = {"rtabmap": "rtabmap_loop84", "corridor": "corridor_vprbench", "gardenspoint": "gardenspoint10"}
RTAB = ROOT / "data" / "rtabmap_samples_loop84"
#: pnv eval's defaults (cli.py): acceptance threshold, candidates re-ranked, seconds of recent keyframes excluded
THRESHOLD, TOP_N, EXCLUDE_RECENT_S = 0.12, 20, 10.0
#: targets of issue #13 on this machine (ratios vs torch fp32)
TARGETS = {"fp32_diff": 1e-4, "fp32_speedup": 1.5, "int8_speedup": 3.0, "int8_drop": 0.02, "node_s": 0.3}


def med(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def one(fs: FeatureSet, i: int) -> FeatureSet:
    """Image i of a FeatureSet as a one-image FeatureSet (a query timed on its own)."""
    return FeatureSet(
        [fs.names[i]],
        fs.global_descs[i : i + 1],
        [p[i : i + 1] for p in fs.patches],
        fs.image_sizes[i : i + 1],
        fs.preset,
        fs.model_id,
    )


def recall(ids: list, gt: GroundTruth) -> dict[str, float]:
    return {str(n): v for n, v in recall_at_n(ids, gt, (1, 5)).items()}


def label(key: str) -> str:
    return key.replace(":", " ")


def shared_sets(data_dirs: list[Path], wanted: list[str]):
    """eval_default_model.sets over each data folder in turn (the first that has a set wins), filtered."""
    seen = set()
    for d in data_dirs:
        for name, db, q, gt, role in sets(d):
            key = name.split()[0]
            if key in seen or (wanted and not any(SET_KEYS.get(w, w) == key for w in wanted)):
                continue
            seen.add(key)
            yield name, db, q, gt, role


def pixels_key(source) -> str:
    """The decoded RGB pixels of an image (a path or an array) as a hash: a bag frame finds its file."""
    arr = np.ascontiguousarray(np.asarray(load_image(source)))
    return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()


class Memo:
    """An extractor whose extract_one returns features already computed for the same pixels (else extracts)."""

    def __init__(self, ex: FeatureExtractor, known: dict) -> None:
        self.ex, self.known, self.hits, self.misses = ex, known, 0, 0

    def __getattr__(self, name: str):
        return getattr(self.ex, name)

    def extract_one(self, image):
        f = self.known.get(pixels_key(image))
        if f is None:
            self.misses += 1
            return self.ex.extract_one(image)
        self.hits += 1
        return f


def build(checkpoint: Path, keys: list[str], log) -> dict:
    """One speed-preset extractor per engine key (engine files built now, outside the timing)."""
    out = {}
    for k in keys:
        engine, precision = k.split(":")
        t = time.perf_counter()
        out[k] = open_extractor(
            checkpoint, "speed", RuntimeSpec(device="cpu", engine=engine, precision=precision), log=log
        )
        tqdm.write(
            f"{label(k)}: ready in {time.perf_counter() - t:.0f} s"
            + (f" ({out[k].backend.describe()})" if out[k].backend else "")
        )
    return out


def diffs(ref: list, got: list) -> dict:
    g = max(float(np.abs(a.global_desc - b.global_desc).max()) for a, b in zip(ref, got))
    p = max(float(np.abs(x - y).max()) for a, b in zip(ref, got) for x, y in zip(a.patches, b.patches))
    cos = [float(np.median(np.sum(x * y, axis=1))) for a, b in zip(ref, got) for x, y in zip(a.patches, b.patches)]
    return {"global_max_abs": g, "patch_max_abs": p, "patch_cosine_median": float(np.median(cos))}


def retrieval(exs: dict, data_dirs: list[Path], wanted: list[str], top_n: int) -> tuple[list[dict], dict]:
    """Per set: every engine's features of every image (engines alternating per image), recall, re-rank time.
    Also returns {pixels key: {engine: PlaceFeatures}} of the rtabmap images (the sequence step's frames)."""
    rows, memo = [], {}
    for name, db_imgs, q_imgs, gt_path, role in shared_sets(data_dirs, wanted):
        imgs = list(db_imgs) + list(q_imgs)
        places: dict[str, list] = {k: [] for k in exs}
        t_img: dict[str, list[float]] = {k: [] for k in exs}
        rtab = name.startswith("rtabmap")
        for p in tqdm(imgs, desc=f"extract {name.split()[0]}", unit="img"):
            for k, ex in exs.items():
                t = time.perf_counter()
                places[k].append(ex.extract_one(p))
                t_img[k].append(time.perf_counter() - t)
            if rtab:
                memo[pixels_key(p)] = {k: places[k][-1] for k in exs}
        names = image_identities(imgs)
        n_db = len(db_imgs)
        gt = None
        row: dict = {
            "set": name,
            "role": role,
            "db": n_db,
            "queries": len(q_imgs),
            "top_n": min(top_n, n_db),
            "engines": {},
        }
        for k, ex in exs.items():
            fs = FeatureSet.from_places(names, places[k], ex.preset, ex.info.identity)
            idx = np.arange(len(imgs))
            db, q = (
                FeatureSet(
                    [names[i] for i in ii],
                    fs.global_descs[ii],
                    [p[ii] for p in fs.patches],
                    fs.image_sizes[ii],
                    fs.preset,
                    fs.model_id,
                )
                for ii in (idx[:n_db], idx[n_db:])
            )
            if gt is None:
                gt = (
                    GroundTruth([{i} for i in range(len(q_imgs))])
                    if gt_path is None
                    else load_ground_truth(gt_path, q.names, db.names)
                )
            res, t_q = [], []
            for i in range(len(q)):
                t = time.perf_counter()
                (r,) = two_stage(
                    db, one(q, i), ex.preset, top_n=min(top_n, n_db), matcher="rapid", bf16=ex.pooling == "fast"
                )
                t_q.append(time.perf_counter() - t)
                res.append(r)
            row["engines"][k] = {
                "extract_s_median": med(t_img[k]),
                "extract_s": [round(t, 4) for t in t_img[k]],
                "global": recall([r.global_ids for r in res], gt),
                "reranked": recall([r.reranked_ids for r in res], gt),
                "rerank_ms_median": 1000 * med(t_q),
            }
            if k != REFERENCE and REFERENCE in places:
                row["engines"][k]["diff_vs_torch_fp32"] = diffs(places[REFERENCE], places[k])
        row["queries_with_positives"] = int(gt.has_positive().sum()) if gt is not None else 0
        tqdm.write(
            json.dumps(
                {
                    "set": name,
                    **{
                        k: {"extract_ms": round(1000 * e["extract_s_median"]), "R@1": e["reranked"]["1"]}
                        for k, e in row["engines"].items()
                    },
                }
            )
        )
        rows.append(row)
    return rows, memo


def floor_of(model, ex: FeatureExtractor, images: list[Path]) -> float:
    """torch's own patch-descriptor change under one float32 rounding step (max over a few images)."""
    out = 0.0
    for p in images:
        with torch.inference_mode():
            feats = model.backbone(ex.preprocess(p)[0].unsqueeze(0)).float()
        out = max(out, rounding_floor(model, feats, ex.preset.patch_sizes, ex.preset.strides))
    return out


def floors(res: dict, model, ex: FeatureExtractor, data_dirs: list[Path], wanted: list[str]) -> None:
    """torch's own patch-descriptor rounding floor per set (3 evenly spaced database images), and the largest."""
    per = {}
    for name, db_imgs, _, _, _ in shared_sets(data_dirs, wanted):
        pick = np.linspace(0, len(db_imgs) - 1, 3).astype(int)
        per[name.split()[0]] = floor_of(model, ex, [db_imgs[i] for i in pick])
    res["rounding_floor_per_set"] = per
    res["rounding_floor"] = max(per.values())


def rtab_bag(out: Path) -> Path:
    from pnv_ros.bags import make_bag

    bag = out / "rtabmap_loop84_bag"
    if not (bag / "metadata.yaml").is_file():
        if bag.exists():
            raise RuntimeError(f"{bag} is an unfinished bag: remove it")
        make_bag(RTAB / "images", bag, rate=1.0)
    return bag


def detector_params():
    from pnv_ros.detector import DetectorParams

    return DetectorParams(
        top_n=TOP_N,
        matcher="",
        min_score=THRESHOLD,
        exclude_recent_s=EXCLUDE_RECENT_S,
        min_interval_s=0.0,
        fast_products=False,
    )


def accepted(records) -> set[tuple[int, int]]:
    return {(r.frame, r.match_frame) for r in records if r.match_frame >= 0 and r.score >= THRESHOLD}


def sequence(exs: dict, memo: dict, bag: Path) -> dict:
    """pnv eval in-process on the RTAB-Map loop bag, per engine; accepted loops compared with torch fp32's."""
    from pnv_ros.eval.replay import replay_in_process
    from pnv_ros.eval.report import compute_metrics

    positives = load_sequence_gt(RTAB / "gt_matrix.npy", 84)
    out, loops = {}, {}
    for k, ex in tqdm(list(exs.items()), desc="sequence rtabmap_loop84", unit="engine"):
        m_ex = Memo(ex, {h: f[k] for h, f in memo.items() if k in f})
        res = replay_in_process(bag, m_ex, detector_params())
        m = compute_metrics(res, positives, THRESHOLD)
        at = m["at_threshold"]
        loops[k] = accepted(res.records)
        commit = [r.t_total - r.t_extract for r in res.records if not np.isnan(r.t_total)]
        out[k] = {
            "keyframes": m["keyframes"],
            "precision": at["precision"],
            "recall": at["recall"],
            "f1": at["f1"],
            "average_precision": m["average_precision"],
            "accepted_loops": len(loops[k]),
            "commit_ms_median": 1000 * med(commit),
            "features_reused": m_ex.hits,
            "features_extracted": m_ex.misses,
        }
    if REFERENCE in loops:
        for k in out:
            out[k]["loops_same_as_torch_fp32"] = len(loops[k] & loops[REFERENCE])
            out[k]["loops_only_here"] = sorted(loops[k] - loops[REFERENCE])
            out[k]["loops_only_torch_fp32"] = sorted(loops[REFERENCE] - loops[k])
    return out


def node_run(key: str, checkpoint: str | None, bag: Path) -> dict:
    """The bag through a live loop_closure_node with this engine (speed preset, pnv eval's settings)."""
    from pnv_ros.eval.replay import replay_through_node
    from pnv_ros.eval.report import compute_metrics

    engine, precision = key.split(":")
    bar = tqdm(total=84, desc=f"node {label(key)}", unit="frame")

    def progress(i: int, n: int) -> None:
        bar.n = i
        bar.refresh()

    t = time.perf_counter()
    res = replay_through_node(
        bag,
        "speed",
        str(resolve_checkpoint(checkpoint)),
        detector_params(),
        progress=progress,
        engine=engine,
        precision=precision,
    )
    bar.close()
    d = res.node_diagnostics
    m = compute_metrics(res, load_sequence_gt(RTAB / "gt_matrix.npy", 84), THRESHOLD)

    def ms(name: str) -> float | None:
        return float(d[name]) if name in d else None

    return {
        "engine": key,
        "keyframes": m["keyframes"],
        "f1": m["at_threshold"]["f1"],
        "total_p50_ms": ms("latency_total_p50_ms"),
        "extract_p50_ms": ms("latency_extract_p50_ms"),
        "commit_p50_ms": ms("latency_commit_p50_ms"),
        "total_max_ms": ms("latency_total_max_ms"),
        "wall_s": time.perf_counter() - t,
        "diagnostics": d,
    }


# ---------------------------------------------------------------------------------------------- report


#: today's code for ``--node-stages``: the commit before the node's per-stage timings (issue #31)
NODE_STAGES_BASE = "859e467"
#: the stages ``--node-stages`` reports, in pipeline order (``pnv_ros.ros.diagnostics.STAGES`` names)
NODE_STAGES = tuple(k for k in DIAGNOSTIC_STAGES if k not in ("fleet", "pose"))  # no fleet, no camera: no pose


def node_run_from(code: Path, key: str, checkpoint: str | None, bag: Path) -> dict:
    """:func:`node_run` with the node's code from ``code`` (first on its PYTHONPATH); the per-stage medians (ms)
    it reported under ``stages_ms``."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(code)
    try:
        r = node_run(key, checkpoint, bag)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    d = r["diagnostics"]
    r["stages_ms"] = {s: float(d[f"latency_{s}_p50_ms"]) for s in NODE_STAGES if f"latency_{s}_p50_ms" in d}
    return r


#: ``--node-stages``' in-process timing, run as ``python -c`` with one tree first on PYTHONPATH (argv: checkpoint
#: or "", engine, precision, frames, images folder, candidates): per frame preprocess / backbone / pooling
#: (``_pool`` with no patch scales: the global descriptor and what it needs) / patch descriptors (the full ``_pool``
#: less that), then re-ranking (the tree's detector's PatchMatcher, exact products; bfloat16 ones where the
#: extractor is on a fast path and the tree has them) of a few frames against ``candidates`` others held as the
#: map holds them (float16 patches). Prints the medians (ms) as one JSON line.
STAGES_SCRIPT = """
import inspect, json, statistics, sys, time
from pathlib import Path
import numpy as np, torch
from pnv_ros.engines.spec import RuntimeSpec
from pnv_ros.extract import open_extractor
from pnv_ros.features import PlaceFeatures
from pnv_ros.matching import PatchMatcher
ck, engine, precision, n, folder, n_cand = sys.argv[1:7]
torch.set_num_threads(2)  # as the node: torch's default on the 2-core machine
ex = open_extractor(ck or None, "speed", RuntimeSpec(device="cpu", engine=engine, precision=precision))
sizes, strides = ex.preset.patch_sizes, ex.preset.strides
paths = sorted(Path(folder).iterdir(), key=lambda q: (len(q.stem), q.stem))[: int(n)]
clock, t, feats = time.perf_counter, {k: [] for k in ("preprocess", "backbone", "pooling", "pool_all")}, []
with torch.inference_mode():
    for i, path in enumerate([paths[0], *paths]):  # the first: a warm-up, not counted
        t0 = clock()
        x, size = ex.preprocess(path)
        t1 = clock()
        f = ex.backend(x[None]) if ex.backend is not None else ex.model.backbone(x[None])
        t2 = clock()
        ex.model._pool(f.to(torch.float32), (), (), ex.projection)
        t3 = clock()
        g, ps = ex.model._pool(f.to(torch.float32), sizes, strides, ex.projection)
        t4 = clock()
        if i:
            for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                t[k].append(v * 1e3)
            feats.append(PlaceFeatures(g[0].float().numpy(), [p[0].float().contiguous().numpy() for p in ps], size))
    fast = getattr(ex, "pooling", "exact") == "fast"
    bf16 = {"bf16": fast} if "bf16" in inspect.signature(PatchMatcher).parameters else {}
    pm = PatchMatcher(ex.preset, exact=True, **bf16)
    stored = [PlaceFeatures(q.global_desc, [p.astype(np.float16) for p in q.patches], q.image_size) for q in feats]
    m, rr = len(feats), []
    for i in range(min(m, 6)):  # the first: a warm-up, not counted
        cands = [stored[(i + 1 + j % (m - 1)) % m] for j in range(int(n_cand))]
        t0 = clock()
        pm.score(feats[i], cands)
        if i:
            rr.append((clock() - t0) * 1e3)
med = {k: statistics.median(v) for k, v in t.items()}
med["patch_descriptors"] = med.pop("pool_all") - med["pooling"]
med.update(rerank=statistics.median(rr), frames=m, queries=len(rr), projection=ex.projection)
med["matcher_bf16"] = bool(getattr(pm, "bf16", False))
print(json.dumps(med))
"""


def stages_in_process(code: Path, key: str, checkpoint: str | None, frames: int) -> dict:
    """:data:`STAGES_SCRIPT` with ``code`` first on PYTHONPATH, the node's engine and the first ``frames`` of the
    bag's images, re-ranking against ``TOP_N`` candidates: its medians (ms) and counts. Raises
    CalledProcessError when the script fails."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(code), "OMP_WAIT_POLICY": "PASSIVE"}
    engine, precision = key.split(":")
    argv = [checkpoint or "", engine, precision, str(frames), str(RTAB / "images"), str(TOP_N)]
    # cwd = code: ``python -c`` puts its working folder before PYTHONPATH
    cmd = [sys.executable, "-c", STAGES_SCRIPT, *argv]
    out = subprocess.run(cmd, env=env, cwd=code, check=True, stdout=subprocess.PIPE)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def node_stages(a: argparse.Namespace) -> dict:
    """``--node-stages``: per family, today's code and this checkout alternating through the live node."""
    import shutil
    import subprocess
    import tempfile

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bag = rtab_bag(out)
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="pnv_node_stages_"))
    base_code = tmp / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_code), a.base], check=True)
    res: dict = {**header(prefix="OMP_WAIT_POLICY=PASSIVE"), "base": a.base, "engine": a.node_engine, "runs": {}}
    try:
        for k in range(a.repeats):
            for fam in families:
                ck = None if fam == "default" else fam
                for tree, code in (("base", base_code), ("new", ROOT)):
                    r = node_run_from(code, a.node_engine, ck, bag)
                    r.pop("diagnostics")
                    res["runs"].setdefault(fam, {"base": [], "new": []})[tree].append(r)
                    tqdm.write(f"repeat {k + 1} {fam} {tree}: F1 {_f(r['f1'])}, stages (ms) {r['stages_ms']}")
                    if a.stage_frames > 0:
                        r["in_process_ms"] = stages_in_process(code, a.node_engine, ck, a.stage_frames)
                        tqdm.write(f"  in process (ms): {r['in_process_ms']}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_code)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    return res


#: the stages :data:`STAGES_SCRIPT` times in process
IN_PROCESS = ("preprocess", "backbone", "pooling", "patch_descriptors", "rerank")


def node_stages_md(res: dict) -> list[str]:
    """The ``--node-stages`` page: per family a table of stage medians, today's code against this checkout;
    where the node of today's code does not report a stage, its in-process median (dagger)."""
    m = res["machine"]
    L = [
        "# The live node per stage: today's code against this checkout",
        "",
        f"Generated by `{res['command']}` on {res['date']}. Machine: {m['cpu']}, {m['cores']} cores; load average "
        f"{m['load_avg_start'][0]:.1f} at the start, {m['load_avg_end'][0]:.1f} at the end.",
        "",
        f"The RTAB-Map loop bag (84 frames) through a live `loop_closure_node` in lockstep (`pnv eval --node`'s "
        f"replay: speed preset, {label(res['engine'])}, threshold {THRESHOLD}, top {TOP_N}, exclude recent "
        f"{EXCLUDE_RECENT_S:g} s), from two trees alternating: today's code `{res['base']}` and this checkout. Per "
        "stage the median over runs of the node's own median over its keyframes (`/diagnostics` "
        "`latency_<stage>_p50_ms`, ms); n/a: a stage that code does not report (today's: only extract, commit, "
        "total). Ratio = this checkout / today's.",
    ]
    for fam, trees in res["runs"].items():
        base, new = trees["base"], trees["new"]

        def st(runs: list[dict], s: str, key: str = "stages_ms") -> float:
            return med([r[key][s] for r in runs if s in r.get(key, {})])

        L += [
            "",
            f"## {fam} ({len(base)} + {len(new)} runs)",
            "",
            f"| stage | today's `{res['base']}` | this checkout | ratio | this checkout in process \u2020 |",
            "|---|---|---|---|---|",
        ]
        for s in NODE_STAGES:
            a, b, c = st(base, s), st(new, s), st(new, s, "in_process_ms")
            ai = st(base, s, "in_process_ms")
            ip = bool(np.isnan(a) and not np.isnan(ai))  # today's node has no such stage: in process, like with like
            cell, num, den = (f"{ai:.1f} \u2020", c, ai) if ip else (_f(a, ".1f"), b, a)
            ratio = _f(num / den if den > 0 else float("nan"), ".2f") + (" \u2020" if ip else "")
            L.append(f"| {s} | {cell} | {_f(b, '.1f')} | {ratio} | {_f(c, '.1f')} |")
        fa, fb = med([r["f1"] for r in base]), med([r["f1"] for r in new])
        L.append(f"| F1 on the loop (threshold {THRESHOLD}) | {_f(fa)} | {_f(fb)} | | |")
        L.append(
            f"| keyframes | {', '.join(str(r['keyframes']) for r in base)} | "
            f"{', '.join(str(r['keyframes']) for r in new)} | | |"
        )
        ipb, ipn = (
            [r["in_process_ms"] for r in base if "in_process_ms" in r],
            [r["in_process_ms"] for r in new if "in_process_ms" in r],
        )
        if ipb or ipn:

            def how(ip: list[dict]) -> str:
                return ", ".join(f"`{r['projection']}`, {r['frames']} frames, {r['queries']} queries" for r in ip)

            L.append(f"| \u2020 pooling path, frames, re-ranked queries per run | {how(ipb)} | | | {how(ipn)} |")
    L += [
        "",
        "Stages: decode (the image message to an array), look (the picture tests), the extractor's preprocess / "
        "backbone / pooling (global VLAD) / patch_descriptors, local_features (none without camera_info), "
        "retrieval (FAISS top-n, fleet included), rerank (patch matching), map_add; extract = preprocess to "
        "patch descriptors and local features, commit = retrieval to map add (and a loop's pose), total = extract "
        "+ commit.",
        "",
        "\u2020 in process, not the node: after each node run, a subprocess with that tree first on its "
        '`PYTHONPATH` opens the same extractor (`open_extractor(checkpoint, "speed", RuntimeSpec(device="cpu", '
        "engine, precision))`, torch threads 2 as the node, `OMP_WAIT_POLICY=PASSIVE`, under `torch.inference_mode`) "
        "and times per RTAB-Map frame (the bag's images, the first of them once more as an uncounted warm-up): "
        "preprocess (`ex.preprocess`), backbone (`ex.backend`, or the model's backbone on the torch engine), "
        "pooling (`model._pool` with no patch scales: the global descriptor and what it must build) and "
        "patch_descriptors (the full `model._pool` less that pooling); rerank: `PatchMatcher.score` of a frame "
        f"against {TOP_N} others of the timed frames (repeated when fewer; patches float16 as the map holds them), "
        "the matcher as that tree's detector builds it (exact products; this checkout: bfloat16 products on a fast "
        "pooling path), median over the first 6 frames as queries less one warm-up. Medians over frames, then over runs. In a row whose today's cell is in "
        "process, the ratio is of the two in-process medians (like with like); the last column sets this "
        "checkout's in-process medians beside its node's.",
        "",
    ]
    return L


def _f(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def summary(res: dict) -> dict:
    """Per engine: latency, speed ratio, diffs, R@1 per set, F1, against torch fp32 and the targets."""
    keys = res["engines"]
    out: dict = {}
    t_all = {k: [t for r in res["retrieval"] for t in r["engines"][k]["extract_s"]] for k in keys}
    ref_t = med(t_all[REFERENCE]) if REFERENCE in keys else float("nan")
    for k in keys:
        s = {
            "extract_ms_median": 1000 * med(t_all[k]),
            "speedup": ref_t / med(t_all[k]),
            "r1": {r["set"].split()[0]: r["engines"][k]["reranked"]["1"] for r in res["retrieval"]},
        }
        ds = [r["engines"][k].get("diff_vs_torch_fp32") for r in res["retrieval"]]
        ds = [d for d in ds if d]
        if ds:
            s["global_max_abs"] = max(d["global_max_abs"] for d in ds)
            s["patch_max_abs"] = max(d["patch_max_abs"] for d in ds)
            s["patch_cosine_median"] = float(np.median([d["patch_cosine_median"] for d in ds]))
        if k in res.get("sequence", {}):
            s["f1"] = res["sequence"][k]["f1"]
        out[k] = s
    return out


def _headline_lines(res: dict) -> list[str]:
    """The page's title, the run and machine description, and the headline table: per engine its
    median extraction time per keyframe (ms), speed ratio and largest global / patch descriptor
    differences against torch fp32, re-ranked Recall@1 per set and the RTAB loop's F1."""
    m, keys, summ = res["machine"], res["engines"], res["summary"]
    L = [
        "# Inference engines: latency against accuracy",
        "",
        f"Generated by `{res['command']}` on {res['date']} in {res['wall_s'] / 60:.0f} min.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}; load "
        f"average {m['load_avg_start'][0]:.1f} at the start, {m['load_avg_end'][0]:.1f} at the end (a shared "
        "machine: absolute times move; the engines alternate image by image, so their ratios are fair).",
        "",
        f"Model: `{res['model']}`, speed preset ({res['input']} input, patch size 5, rapid scoring, top "
        f"{res['top_n']} re-ranked as the node). Each engine runs only the backbone; NetVLAD pooling, patch "
        "descriptors and re-ranking are pnv_ros's float32 torch code for all (int8: the patch WPCA product in "
        "bfloat16 where the CPU has AMX / AVX-512 BF16). int8 = post-training quantisation calibrated on 32 "
        "seeded corridor_vprbench ref images (onnxruntime `quantize_static` QDQ per-channel; OpenVINO NNCF).",
        "",
        "## Headline (ratios vs torch fp32)",
        "",
        "| engine | extraction per keyframe (median) | speed vs torch fp32 | max abs diff, global / patch | "
        + " | ".join(f"R@1 {s}" for s in next(iter(summ.values()))["r1"])
        + " | F1 RTAB loop |",
        "|---|---|---|---|" + "---|" * len(next(iter(summ.values()))["r1"]) + "---|",
    ]
    for k in keys:
        s = summ[k]
        d = (
            "reference"
            if k == REFERENCE
            else f"{_f(s.get('global_max_abs'), '.1e')} / {_f(s.get('patch_max_abs'), '.1e')}"
        )
        L.append(
            f"| {label(k)} | {s['extract_ms_median']:.0f} ms | {s['speedup']:.2f}x | {d} | "
            + " | ".join(f"{v:.3f}" for v in s["r1"].values())
            + f" | {_f(s.get('f1'))} |"
        )
    return L


def _node_lines(n: dict) -> list[str]:
    """The paragraph on the live node's median end-to-end time per keyframe (ms), from ``res["node"]``."""
    return [
        "",
        f"**Node end to end per keyframe** (extraction + top-{TOP_N} re-rank + map add; live "
        f"`loop_closure_node`, speed preset, {label(n['engine'])}, the RTAB-Map bag in lockstep, "
        f"{n['keyframes']} keyframes): median **{_f(n['total_p50_ms'], '.0f')} ms** (extraction "
        f"{_f(n['extract_p50_ms'], '.0f')} ms, re-rank + map add {_f(n['commit_p50_ms'], '.0f')} ms; max "
        f"{_f(n['total_max_ms'], '.0f')} ms); F1 {_f(n['f1'])}.",
    ]


def _fp32_target_rows(res: dict, fp32: list[str]) -> list[str]:
    """Target rows for the float32 engines ``fp32`` (non-empty): global and patch descriptors within
    ``TARGETS['fp32_diff']`` of torch, and the fastest one's speed-up against ``TARGETS['fp32_speedup']``."""
    summ = res["summary"]
    L = []
    worst = max(summ[k].get("global_max_abs", 0) for k in fp32)
    L.append(
        f"| fp32 engines within 1e-4 of torch (global descriptors) | max {worst:.1e} | "
        f"{'yes' if worst <= TARGETS['fp32_diff'] else 'no'} |"
    )
    worst_p = max(summ[k].get("patch_max_abs", 0) for k in fp32)
    near = worst_p <= 2 * res["rounding_floor"]
    met = "yes" if worst_p <= TARGETS["fp32_diff"] else "no: within twice torch's own float32 floor" if near else "no"
    L.append(
        f"| fp32 engines within 1e-4 of torch (patch descriptors) | max {worst_p:.1e} (torch's own change "
        f"under one float32 rounding step: up to {res['rounding_floor']:.1e}) | {met} |"
    )
    best = max(fp32, key=lambda k: summ[k]["speedup"])
    sp = summ[best]["speedup"]
    L.append(
        f"| fastest fp32 engine >= 1.5x torch fp32 | {label(best)} {sp:.2f}x | "
        f"{'yes' if sp >= TARGETS['fp32_speedup'] else 'no'} |"
    )
    return L


def _int8_target_rows(s: dict, ref: dict, k: str) -> list[str]:
    """Target rows for the int8 engine ``k`` (its summary ``s``; ``ref``: torch fp32's summary): speed-up
    against ``TARGETS['int8_speedup']``, and re-ranked R@1 per set and sequence F1 at most
    ``TARGETS['int8_drop']`` below torch fp32."""
    L = []
    sp = s["speedup"]
    L.append(f"| {label(k)} >= 3x torch fp32 | {sp:.2f}x | {'yes' if sp >= TARGETS['int8_speedup'] else 'no'} |")
    drops = {st: ref.get("r1", {}).get(st, np.nan) - v for st, v in s["r1"].items()}
    worst = max(drops.values())
    L.append(
        f"| {label(k)} re-ranked R@1 at most 0.02 below fp32 on each set | "
        + ", ".join(f"{st} {s['r1'][st]:.3f} vs {ref['r1'][st]:.3f}" for st in drops)
        + f" | {'yes' if worst <= TARGETS['int8_drop'] + 1e-9 else 'no'} |"
    )
    if "f1" in s and "f1" in ref:
        d = ref["f1"] - s["f1"]
        L.append(
            f"| {label(k)} sequence F1 (RTAB loop) at most 0.02 below fp32 | {s['f1']:.3f} vs {ref['f1']:.3f} "
            f"| {'yes' if d <= TARGETS['int8_drop'] + 1e-9 else 'no'} |"
        )
    return L


def _target_lines(res: dict) -> list[str]:
    """The "Against the targets" section: one row per target in ``TARGETS``, measured and met or not."""
    keys, summ = res["engines"], res["summary"]
    ref = summ.get(REFERENCE, {})
    L = ["", "## Against the targets", "", "| target | measured | met |", "|---|---|---|"]
    fp32 = [k for k in keys if k.endswith(":fp32") and k != REFERENCE]
    int8 = [k for k in keys if k.endswith(":int8")]
    if fp32:
        L += _fp32_target_rows(res, fp32)
    for k in int8:
        L += _int8_target_rows(summ[k], ref, k)
    if res.get("node") and res["node"]["total_p50_ms"] is not None:
        v = res["node"]["total_p50_ms"] / 1000
        L.append(f"| node end to end <= 0.3 s median | {v:.3f} s | {'yes' if v <= TARGETS['node_s'] else 'no'} |")
    return L


def _retrieval_lines(res: dict) -> list[str]:
    """The "Retrieval per set" table: per set and engine, extraction and re-rank medians (ms), global and
    re-ranked Recall@1/5, and the descriptor differences against torch fp32."""
    L = [
        "",
        "## Retrieval per set",
        "",
        "| set | role | queries / db | engine | extraction median | global R@1 / R@5 | re-ranked R@1 / R@5 | "
        "re-rank median | max abs diff global / patch | patch cosine median |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["retrieval"]:
        for k in res["engines"]:
            e = r["engines"][k]
            d = e.get("diff_vs_torch_fp32")
            L.append(
                f"| {r['set']} | {r['role']} | {r['queries']} / {r['db']} | {label(k)} | "
                f"{1000 * e['extract_s_median']:.0f} ms | {e['global']['1']:.3f} / {e['global']['5']:.3f} | "
                f"{e['reranked']['1']:.3f} / {e['reranked']['5']:.3f} | {e['rerank_ms_median']:.0f} ms | "
                + (
                    f"{d['global_max_abs']:.1e} / {d['patch_max_abs']:.1e} | {d['patch_cosine_median']:.6f}"
                    if d
                    else "reference | 1"
                )
                + " |"
            )
    return L


def _sequence_lines(res: dict) -> list[str]:
    """The RTAB-Map loop table (``res["sequence"]``, non-empty): per engine the detector's precision,
    recall, F1, AP and accepted loops, and how its loops compare with torch fp32's."""
    L = [
        "",
        f"## RTAB-Map loop through the detector (`pnv eval` in-process: threshold {THRESHOLD}, top {TOP_N}, "
        f"exclude recent {EXCLUDE_RECENT_S:g} s)",
        "",
        "| engine | keyframes | precision | recall | F1 | AP | accepted loops | same as torch fp32 | only here | "
        "only torch fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in res["engines"]:
        s = res["sequence"].get(k)
        if s:
            L.append(
                f"| {label(k)} | {s['keyframes']} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} | "
                f"{_f(s['average_precision'])} | {s['accepted_loops']} | {s.get('loops_same_as_torch_fp32', '')} | "
                f"{s.get('loops_only_here', '')} | {s.get('loops_only_torch_fp32', '')} |"
            )
    return L


def _notes_lines(res: dict) -> list[str]:
    """The closing notes: the float32 engines' Recall@1 spread per set (the comparison's noise floor),
    torch's own patch-descriptor rounding floor, and what extraction and the node's time consist of."""
    keys = res["engines"]
    fl = res.get("rounding_floor_per_set", {})
    spread = {}
    for r in res["retrieval"]:
        v = [r["engines"][k]["reranked"]["1"] for k in keys if k.endswith(":fp32")]
        spread[r["set"].split()[0]] = (min(v), max(v))
    return [
        "",
        "## Notes",
        "",
        "- Re-ranked Recall@1 of the float32 engines alone (same backbone to 1e-6; patch descriptors apart by "
        "float32 rounding only): "
        + ", ".join(f"{s} {a:.3f}-{b:.3f}" for s, (a, b) in spread.items())
        + ". That spread is the noise floor of a Recall@1 comparison between implementations on these sets; "
        "an int8 engine inside it lost nothing measurable.",
        f"- Patch descriptors: torch's own patch descriptors move by up to {res['rounding_floor']:.1e} when its "
        "feature map moves by one float32 rounding step (`engines.rounding_floor`"
        + (", per set: " + ", ".join(f"{k} {v:.1e}" for k, v in fl.items()) if fl else "")
        + "; 3 images each): a trained vocabulary's sharp "
        "soft-assignment leaves words with almost no mass in a window, whose intra-normalised residual sum is "
        "rounding noise at unit norm. No other float32 arithmetic can reproduce them to 1e-4; the fp32 engines' "
        "backbone features (relative) and global descriptors do, and `pnv export` checks exactly that.",
        "- Extraction = backbone + NetVLAD pooling + patch WPCA (the pooling is the same torch code for every "
        "engine), so an engine's speed-up of the whole is smaller than of its backbone. At fp32, torch's CPU "
        "backbone already runs oneDNN's blocked-layout convolutions (`model/backbone.py`), the kernels the other "
        "engines use too: they gain little. int8 quantises the backbone (VGG-16's convolutions: ~10x sooner "
        "with OpenVINO on an AMX CPU); what is left is the pooling (the residual integral over 64 x 512 "
        "channels, memory-bound) and the patch WPCA product (bfloat16 for int8).",
        "- The node's time per keyframe is extraction plus the exact top-20 re-rank and map add, which no "
        "engine changes; both are measured on the machine's load at the time (the load average above).",
        "",
        "Numbers: `engines.json`; plot: `engines.png`.",
        "",
    ]


def write_md(res: dict, path: Path) -> None:
    """Write the engines page (Markdown) for a run's record ``res`` (as in ``engines.json``, with its
    ``summary``) to ``path``: headline, node end to end, targets, retrieval per set, RTAB loop, notes."""
    L = _headline_lines(res)
    if res.get("node"):
        L += _node_lines(res["node"])
    L += _target_lines(res)
    L += _retrieval_lines(res)
    if res.get("sequence"):
        L += _sequence_lines(res)
    L += _notes_lines(res)
    write_page(path, L)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["retrieval"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4.2), squeeze=False)
    markers = {"fp32": "o", "int8": "s", "bf16": "^", "fp16": "v"}
    colors = {"torch": "tab:blue", "onnxruntime": "tab:green", "openvino": "tab:purple", "tensorrt": "tab:red"}
    for ax, r in zip(axes[0], rows):
        for k in res["engines"]:
            e = r["engines"][k]
            engine, precision = k.split(":")
            x, y = 1000 * e["extract_s_median"], e["reranked"]["1"]
            ax.scatter(
                [x], [y], marker=markers.get(precision, "o"), color=colors.get(engine, "k"), s=60, label=label(k)
            )
        ax.set_xlabel("extraction per keyframe, median (ms)")
        ax.set_ylabel("re-ranked Recall@1")
        ax.set_title(f"{r['set']} ({r['queries']} q / {r['db']} db)", fontsize=9)
        ax.set_xlim(0, 1.2 * max(1000 * e["extract_s_median"] for e in r["engines"].values()))
        ax.grid(alpha=0.3)
        lo, hi = (
            min(e["reranked"]["1"] for e in r["engines"].values()),
            max(e["reranked"]["1"] for e in r["engines"].values()),
        )
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.05) + 0.005)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"{res['model'].split(':')[0].split('.')[0]}, speed preset", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="the model (default: the VGG-16 default; or dinov2_vlad)")
    ap.add_argument(
        "--engines",
        default=",".join(DEFAULT_ENGINES),
        help="engine:precision list, torch:fp32 first as the reference (default: %(default)s; "
        "also torch:bf16, openvino:bf16, openvino:fp16)",
    )
    ap.add_argument("--sets", default="rtabmap,corridor,gardenspoint", help="which shared sets (comma list)")
    ap.add_argument(
        "--data",
        default=str(ROOT.parent / "shared" / "data"),
        help="folder of the shared sets (the repository's data/ is looked in after it)",
    )
    ap.add_argument("--top-n", type=int, default=TOP_N, help="candidates re-ranked per query (default: the node's)")
    ap.add_argument("--no-sequence", action="store_true", help="skip the RTAB-Map loop through the detector")
    ap.add_argument("--no-node", action="store_true", help="skip the live node run")
    ap.add_argument("--out", default="out/engines", help="the bag and logs")
    ap.add_argument("--docs", default=str(RESULTS), help="where engines.{json,md,png} go")
    ap.add_argument("--node-stages", action="store_true", help="only the live node per stage, base vs this tree")
    ap.add_argument("--node-engine", default="openvino:int8", help="--node-stages: engine:precision")
    ap.add_argument("--families", default="default,dinov2_vlad", help="--node-stages: checkpoints (default = VGG-16)")
    ap.add_argument("--base", default=NODE_STAGES_BASE, help="--node-stages: today's code (a git revision)")
    ap.add_argument("--repeats", type=int, default=1, help="--node-stages: runs per tree and family, alternating")
    ap.add_argument(
        "--stage-frames",
        type=int,
        default=84,
        help="--node-stages: frames of each tree's in-process stage timing after each node run (0: none)",
    )
    ap.add_argument("--from-json", default=None, help="only redraw the .md and .png from this engines.json")
    ap.add_argument(
        "--floors",
        action="store_true",
        help="with --from-json: first (re)compute torch's rounding floors (torch only, a minute) into it",
    )
    a = ap.parse_args()
    docs = Path(a.docs)
    if a.node_stages:
        res = node_stages(a)
        write_json(docs / "node_stages.json", res)
        write_page(docs / "node_stages.md", node_stages_md(res))
        print(f"wrote {docs / 'node_stages.md'}, .json")
        return
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        if a.floors:
            ex = open_extractor(res["checkpoint"], "speed", RuntimeSpec(device="cpu"))
            floors(res, ex.model, ex, [Path(a.data), ROOT / "data"], [w.strip() for w in a.sets.split(",") if w])
            Path(a.from_json).write_text(json.dumps(res, indent=1))
        write_md(res, docs / "engines.md")
        plot(res, docs / "engines.png")
        return
    t0 = time.perf_counter()
    keys = [k.strip() for k in a.engines.split(",") if k.strip()]
    if keys[0] != REFERENCE:
        keys = [REFERENCE, *[k for k in keys if k != REFERENCE]]
    runnable = []
    for k in keys:
        try:
            check_engine(*k.split(":"))
            runnable.append(k)
        except (EngineError, TypeError) as e:
            tqdm.write(f"{k}: not run here ({e})")
    ck = resolve_checkpoint(a.checkpoint)
    exs = build(ck, runnable, tqdm.write)
    ref = exs[REFERENCE]
    model, info = ref.model, ref.info
    res: dict = {
        **header(prefix="OMP_WAIT_POLICY=PASSIVE"),
        "model": info.identity,
        "checkpoint": str(ck),
        "engines": runnable,
        "input": f"{ref.preset.image_width}x{ref.preset.image_height}",
        "top_n": a.top_n,
        "engine_files": {k: ex.backend.describe() if ex.backend else "torch" for k, ex in exs.items()},
    }
    wanted = [w.strip() for w in a.sets.split(",") if w.strip()]
    res["retrieval"], memo = retrieval(exs, [Path(a.data), ROOT / "data"], wanted, a.top_n)
    floors(res, model, ref, [Path(a.data), ROOT / "data"], wanted)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.no_sequence or not a.no_node:
        bag = rtab_bag(out)
    if not a.no_sequence:
        res["sequence"] = sequence(exs, memo, bag)
    del memo
    res["summary"] = summary(res)
    int8 = [k for k in runnable if k.endswith(":int8")]
    if not a.no_node and int8:
        fastest = min(int8, key=lambda k: res["summary"][k]["extract_ms_median"])
        del exs, ref
        res["node"] = node_run(fastest, a.checkpoint, bag)
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - t0
    res = json.loads(json.dumps(res))  # Recall@N keys as strings, as in the file
    write_json(docs / "engines.json", res)
    write_md(res, docs / "engines.md")
    plot(res, docs / "engines.png")
    print(f"wrote {docs / 'engines.md'}, .json, .png in {res['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
