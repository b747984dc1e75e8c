"""The DINOv2 ViT-S/14 backbone (pnv_ros.model.dinov2) on the CPU: time per image, torch vs onnxruntime (float32
and int8 dynamic quantisation), and a place-recognition sanity check of its layers and facets (AnyLoc-style
hard-assignment VLAD) on the RTAB-Map loop.

    .venv/bin/python benchmarks/dinov2_backbone.py [--threads 2] [--reps 7] [--md docs/results/dinov2_backbone.md]

Timing: batch 1, one image, median of --reps runs after one warm-up, torch.set_num_threads and onnxruntime
intra_op_num_threads both --threads. "full" = the 12 layers and the final LayerNorm; "to L/value" = only what
layer L's value facet needs (the torch module stops early, the ONNX graph is cut there).

Recall: queries = frames 41-84, database = frames 1-40 (data/rtabmap_samples_loop84; gt_matrix.npy G[i, j] = 1
when frame i+1 revisits frame j+1; every query has a positive in 1-40). Per (layer, facet): patch tokens
L2-normalised, k = 32 spherical k-means (faiss, seed 0, 100 iterations) fitted on the database tokens, hard
assignment, residual sums per cluster, intra-normalised then L2-normalised (AnyLoc, Keetha et al. 2023, with its
vocabulary fitted on the database as there); global Recall@1/@5 by inner product. Baselines: the final CLS token
and the mean of the final patch tokens (both L2-normalised). Images resized with the project's input_transform
(PIL bilinear, ImageNet mean/std) to H x W keeping the 4:3 frames' aspect (224 x 294 -> 16 x 21 tokens,
322 x 434 -> 23 x 31).
Needs onnxruntime (pip install onnxruntime) and faiss.
"""

from __future__ import annotations

import os

# Set before torch loads libgomp. On the shared 2-core machine, OpenMP's default active waiting made torch's
# 2-thread forward 8-10x slower under others' load (1.6-2.0 s vs 0.21 s passive at 224 x 294, load average 4.7;
# 1 thread: 0.18-0.27 s either way). OMP_WAIT_POLICY=ACTIVE in the environment measures the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, RESULTS, cpu_name
from common import write_md as write_page

from pnv_ros.images import load_image
from pnv_ros.model import dinov2 as d
from pnv_ros.preprocess import input_transform

RTAB = REPO / "data" / "rtabmap_samples_loop84"
SIZES = ((224, 294), (322, 434))
K = 32
SEED = 0
N_DB = 40  # frames 1-40; queries 41-84


def frames(size: tuple[int, int]) -> torch.Tensor:
    tf = input_transform(*size)
    return torch.stack([tf(load_image(RTAB / "images" / f"{i}.jpg")) for i in range(1, 85)])


def ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # no spinning after a run: spinning threads take the 2 cores from torch's threads between runs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def quantised(cut, tmp: Path, name: str) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp / f"{name}.onnx", tmp / f"{name}_int8.onnx"
    src.write_bytes(cut.SerializeToString())
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def median_times(fns: dict[str, object], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds (one warm-up call each first),
    so that a busy neighbour slows every variant alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def vlad(tokens: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """tokens (N, C) L2-normalised, centroids (K, C) -> (K*C,) hard-assignment VLAD, intra- then L2-normalised."""
    assign = np.argmax(tokens @ centroids.T, axis=1)
    v = np.zeros_like(centroids)
    np.add.at(v, assign, tokens - centroids[assign])
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    v = v.ravel()
    return v / max(np.linalg.norm(v), 1e-12)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def recall(desc: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """desc (84, D): rows 0-39 database, 40-83 queries -> Recall@1, Recall@5."""
    sims = desc[N_DB:] @ desc[:N_DB].T
    order = np.argsort(-sims, axis=1)
    pos = gt[N_DB:, :N_DB].astype(bool)
    hit1 = pos[np.arange(len(pos)), order[:, 0]]
    hit5 = np.take_along_axis(pos, order[:, :5], axis=1).any(axis=1)
    return float(hit1.mean()), float(hit5.mean())


def vlad_recall(grids: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """grids (84, h, w, C) float -> Recall@1/@5 of AnyLoc VLAD with K clusters fitted on the database."""
    import faiss

    toks = l2n(grids.reshape(grids.shape[0], -1, grids.shape[-1]).astype(np.float32))
    km = faiss.Kmeans(toks.shape[-1], K, niter=100, seed=SEED, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(toks[:N_DB].reshape(-1, toks.shape[-1])))
    cents = np.asarray(km.centroids, dtype=np.float32)
    return recall(np.stack([vlad(t, cents) for t in toks]), gt)


def report_lines(args: argparse.Namespace, timing: dict, recalls: dict, int8_err: dict, tl: int, loads: list,
                 seconds: tuple, ort_version: str) -> list[str]:
    """The page: the run line, time per image per runtime and size, int8 error, RTAB-Map recall per descriptor.
    ``seconds``: (fetch, torch module load, int8 quantisation or 0)."""
    fetch_s, load_s, quant_s = seconds
    lines = ["# DINOv2 ViT-S/14 backbone: CPU time and a place-recognition sanity check", ""]
    lines.append(
        f"`benchmarks/dinov2_backbone.py`; {cpu_name()}, {args.threads} threads; "
        f"torch {torch.__version__}, onnxruntime {ort_version}; weights: {d.SOURCE}. "
        f"Fetch (cached) {fetch_s:.2f} s; torch module from the .onnx {load_s:.2f} s"
        + (f"; int8 dynamic quantisation of both cuts {quant_s:.1f} s" if quant_s else "")
        + f". OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; onnxruntime without spinning"
        + f". Load average (1 min) around the timings: {', '.join(f'{v:.1f}' for v in loads)} on {os.cpu_count()} CPUs"
        + " (others' jobs running: a timing is only comparable with its neighbours in the same column)."
    )
    lines += [
        "",
        "## Time per image (batch 1, median)",
        "",
        "| runtime, graph | " + " | ".join(f"{h} x {w}" for h, w in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
    ]
    rows = sorted({k.rsplit(" @ ", 1)[0] for k in timing})
    for r in rows:
        lines.append(
            f"| {r} | " + " | ".join(f"{timing[f'{r} @ {h}x{w}']['s'] * 1000:.0f} ms" for h, w in SIZES) + " |"
        )
    if int8_err:
        lines += [
            "",
            f"int8 vs float32, layer {tl} value tokens of frame 1: max abs diff / max abs value "
            + ", ".join(
                f"{int8_err[f'{h}x{w}']:.3f} (mean token cosine {int8_err[f'{h}x{w} token cosine']:.4f}) at {h} x {w}"
                for h, w in SIZES
            )
            + ".",
        ]
    lines += [
        "",
        "## RTAB-Map loop, global Recall@1 / @5 (queries 41-84 vs database 1-40)",
        "",
        "| descriptor | " + " | ".join(f"{h} x {w}" for h, w in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
    ]
    for name in recalls.get(f"{SIZES[0][0]}x{SIZES[0][1]}", {}):
        lines.append(
            f"| {name} | " + " | ".join("{:.3f} / {:.3f}".format(*recalls[f"{h}x{w}"][name]) for h, w in SIZES) + " |"
        )
    lines += [
        "",
        "For scale: the default Patch-NetVLAD model (VGG-16, 480 x 640) has global Recall@1 0.909 on this split "
        "(README, Evaluation). 44 queries: one query is 0.023.",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 7, 8, 9, 10, 11])
    ap.add_argument("--timing-layer", type=int, default=9, help="the layer of the 'to L/value' timings and int8 recall")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="skip the recall check (the report then has no table)")
    ap.add_argument("--md", type=Path, default=RESULTS / "dinov2_backbone.md")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    t0 = time.perf_counter()
    onnx_path = d.fetch_dinov2_onnx()
    fetch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = d.DinoV2ViTS14.from_onnx(onnx_path)
    load_s = time.perf_counter() - t0
    gt = np.load(RTAB / "gt_matrix.npy")
    tl = args.timing_layer
    cuts = {
        "full": d.backbone_onnx(onnx_path),
        f"to {tl}/value": d.backbone_onnx(onnx_path, [d.facet_output_name(tl, "value")]),
    }
    tmp = Path(tempfile.mkdtemp(prefix="dinov2_bench_"))
    sessions = {("onnxruntime", c): ort_session(m, args.threads) for c, m in cuts.items()}
    quant_s = None
    if not args.no_int8:
        t0 = time.perf_counter()
        for c, m in cuts.items():
            sessions[("onnxruntime int8", c)] = ort_session(
                quantised(m, tmp, c.replace(" ", "_").replace("/", "_")), args.threads
            )
        quant_s = time.perf_counter() - t0

    timing: dict[str, dict[str, float]] = {}
    loads: list[float] = []  # 1-minute load average around the timings (2 cores here: above 2 = contended)
    recalls: dict[str, dict[str, tuple[float, float]]] = {}
    int8_err: dict[str, float] = {}
    facets = [(layer, f) for layer in args.layers for f in d.FACETS]
    for size in SIZES:
        sk = f"{size[0]}x{size[1]}"
        x = frames(size)
        one = x[:1]
        # --- timings
        fns = {
            f"torch float32, full @ {sk}": lambda o=one: model(o),
            f"torch float32, to {tl}/value @ {sk}": lambda o=one: model.features(o, tl, "value"),
        }
        feed = {d.INPUT_NAME: one.numpy()}
        for (rt, c), sess in sessions.items():
            fns[f"{rt}, {c} @ {sk}"] = lambda s=sess, f=feed: s.run(None, f)
        loads.append(os.getloadavg()[0])
        with torch.inference_mode():
            timing.update({k: {"s": v} for k, v in median_times(fns, args.reps).items()})
        loads.append(os.getloadavg()[0])
        if args.timing_only:
            continue
        # --- features of all 84 frames (kept as float16 to bound memory)
        grids: dict[tuple[int, str], list[np.ndarray]] = {p: [] for p in facets}
        cls, gap = [], []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(x.shape[0]):
                xi = x[i : i + 1]
                got = model.facets(xi, facets)
                for p in facets:
                    grids[p].append(got[p][0].numpy().astype(np.float16))
                fin = model(xi)[0]
                cls.append(fin[0].numpy())
                gap.append(fin[1:].mean(0).numpy())
        extract_s = (time.perf_counter() - t0) / x.shape[0]
        rec = {
            "final CLS token": recall(l2n(np.stack(cls)), gt),
            "final patch tokens, mean": recall(l2n(np.stack(gap)), gt),
        }
        for p in facets:
            rec[f"layer {p[0]} {p[1]}, VLAD k={K}"] = vlad_recall(np.stack(grids.pop(p)), gt)
        if not args.no_int8:
            # int8 onnxruntime features of the timing layer's value facet, same VLAD
            sess = sessions[("onnxruntime int8", f"to {tl}/value")]
            g8 = []
            with torch.inference_mode():
                fp = model.features(x[:1], tl, "value")[0].numpy()
            for i in range(x.shape[0]):
                out = sess.run(None, {d.INPUT_NAME: x[i : i + 1].numpy()})[0][0, 1:]
                g8.append(out.reshape(size[0] // 14, size[1] // 14, -1))
            ref = fp
            int8_err[sk] = float(np.abs(g8[0] - ref).max() / np.abs(ref).max())
            cos = float(
                np.mean(np.sum(l2n(g8[0].reshape(-1, ref.shape[-1])) * l2n(ref.reshape(-1, ref.shape[-1])), axis=1))
            )
            int8_err[sk + " token cosine"] = cos
            rec[f"layer {tl} value, VLAD k={K}, onnxruntime int8"] = vlad_recall(np.stack(g8), gt)
        recalls[sk] = rec
        timing[f"torch float32, {len(facets)} facets + final of 84 frames, per frame @ {sk}"] = {"s": extract_s}
        print(f"done {sk}", flush=True)

    lines = report_lines(args, timing, recalls, int8_err, tl, loads, (fetch_s, load_s, quant_s), ort.__version__)
    shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    write_page(args.md, lines)
    if args.json:
        args.json.write_text(json.dumps({"timing": timing, "recall": recalls, "int8": int8_err}, indent=2))


if __name__ == "__main__":
    main()
