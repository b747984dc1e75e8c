"""GPU check (one script, a few minutes): extraction throughput and top-100
re-ranking on the device, with descriptors checked against the CPU; then the
TensorRT fp16 engine (issue #13): keyframes/s through the extractor, and its
descriptors against torch float32 on the same device.

    python benchmarks/gpu_check.py [--checkpoint C] [--device cuda] [--seconds 20] [--out gpu.json]

Targets (issue #6): >= 60 keyframes/s extracted at 640x480; top-100 re-ranked
in < 5 ms per query (candidates already on the device). Runs with random
weights when no checkpoint is present (timings do not depend on the weights;
the random model is saved to a temporary file so that the TensorRT engine has
a model file to be cached under). TensorRT needs ``pip install tensorrt`` (or
JetPack's); without it, or without CUDA, that part prints why it did not run.
On a machine without CUDA the rest runs on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pnv_ros.config import get_preset
from pnv_ros.matching import PatchMatcher
from pnv_ros.model.netvlad import PatchNetVLADModel


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget per measurement")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="extraction dtypes (bfloat16 under autocast; on a CPU without native bfloat16, e.g. AVX2-only "
        "AMD EPYC, one bfloat16 VGG-16 pass takes minutes: give float32)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--trt-batch", type=int, default=8, help="batch of the TensorRT measurement (1..8)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    from pnv_ros.model.checkpoint import load_checkpoint, save_checkpoint

    ckpt = a.checkpoint
    if not ckpt:
        torch.manual_seed(0)
        model = PatchNetVLADModel(64, 512)
        with torch.no_grad():
            model.pool.centroids.normal_()
            model.pool.conv.weight.normal_()
            model.WPCA[0].weight.normal_(std=0.01)
        ckpt = str(Path(tempfile.mkdtemp(prefix="gpu_check.")) / "random_WPCA512.pth.tar")
        save_checkpoint(model.state_dict(), ckpt, 512)
    model, info = load_checkpoint(ckpt, device="cpu")
    report: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "extract": {}}
    x_cpu = torch.randn(2, 3, 480, 640)
    with torch.inference_mode():
        g_cpu, p_cpu = model(x_cpu, (5,), (1,))
    model = model.to(dev)
    for preset_name in ("speed", "performance"):
        preset = get_preset(preset_name)
        for bs in [int(b) for b in a.batches.split(",")]:
            for dtype in [getattr(torch, d) for d in a.dtypes.split(",")]:
                x = torch.randn(bs, 3, 480, 640, device=dev)
                try:
                    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                        model(x, preset.patch_sizes, preset.strides)
                        _sync(dev)
                        n, t0 = 0, time.perf_counter()
                        while time.perf_counter() - t0 < a.seconds / 6 or n == 0:
                            model(x, preset.patch_sizes, preset.strides)
                            _sync(dev)
                            n += bs
                        kps = n / (time.perf_counter() - t0)
                except torch.OutOfMemoryError:
                    kps = float("nan")
                key = f"{preset_name}/batch{bs}/{str(dtype).split('.')[-1]}"
                report["extract"][key] = kps
                print(f"extract {key}: {kps:.1f} keyframes/s", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    with torch.inference_mode():
        g_dev, p_dev = model(x_cpu.to(dev), (5,), (1,))
    report["max_abs_diff_vs_cpu"] = float(
        max((g_dev.cpu() - g_cpu).abs().max(), (p_dev[0].cpu() - p_cpu[0]).abs().max())
    )
    print(f"descriptors vs CPU: max |diff| {report['max_abs_diff_vs_cpu']:.2e}")
    report["rerank_ms_per_query_top100"] = {}
    for preset_name in ("speed", "performance"):
        preset = get_preset(preset_name)
        pm = PatchMatcher(preset, device=dev)
        q = [
            torch.nn.functional.normalize(torch.randn(preset.num_patches(s), model.dim, device=dev), dim=1)
            for s in range(len(preset.patch_sizes))
        ]
        dbs = [
            torch.nn.functional.normalize(torch.randn(100, preset.num_patches(s), model.dim, device=dev), dim=2)
            for s in range(len(preset.patch_sizes))
        ]
        pm.score_stacked(q, dbs)
        _sync(dev)
        ts = []
        t_end = time.perf_counter() + a.seconds / 4
        while time.perf_counter() < t_end or not ts:
            t = time.perf_counter()
            pm.fuse(pm.score_stacked(q, dbs).raw)
            _sync(dev)
            ts.append(time.perf_counter() - t)
        ms = 1000 * float(np.median(ts))
        report["rerank_ms_per_query_top100"][preset_name] = ms
        print(f"re-rank top-100 {preset_name} ({pm.matcher.value}): {ms:.2f} ms/query", flush=True)
    report["tensorrt_fp16"] = tensorrt_check(ckpt, dev, a.seconds, a.trt_batch)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


def tensorrt_check(ckpt: str, dev: torch.device, seconds: float, batch: int) -> dict:
    """TensorRT fp16 (the backbone; pooling and WPCA in torch float32 on the GPU) through the FeatureExtractor:
    keyframes/s at ``batch`` (the engine is built for 1..8), descriptors against torch float32 on ``dev``."""
    from pnv_ros.engines.spec import RuntimeSpec
    from pnv_ros.errors import EngineError
    from pnv_ros.extract import open_extractor

    runtime = RuntimeSpec(device=str(dev), batch_size=batch)
    try:
        t0 = time.perf_counter()
        trt = open_extractor(ckpt, "speed", runtime.replace(engine="tensorrt", precision="fp16"), log=print)
        build_s = time.perf_counter() - t0
    except EngineError as e:
        print(f"tensorrt fp16: not run ({e})")
        return {"error": str(e)}
    ref = open_extractor(ckpt, "speed", runtime)
    x = torch.randn(batch, 3, 480, 640, device=dev)
    out: dict = {"engine_file": str(trt.backend.files[0]), "build_or_load_s": build_s, "batch": batch}
    for name, ex in (("torch_fp32", ref), ("tensorrt_fp16", trt)):
        ex.extract_tensors(x)
        _sync(dev)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4 or n == 0:
            ex.extract_tensors(x)
            _sync(dev)
            n += batch
        out[f"{name}_keyframes_per_s"] = n / (time.perf_counter() - t0)
        print(f"extract speed preset batch {batch}, {name}: {out[f'{name}_keyframes_per_s']:.1f} keyframes/s")
    (g_ref, p_ref), (g_trt, p_trt) = ref.extract_tensors(x), trt.extract_tensors(x)
    out["global_max_abs_diff"] = float(np.abs(g_ref - g_trt).max())
    out["patch_cosine_median"] = float(np.median(np.sum(p_ref[0] * p_trt[0], axis=-1)))
    print(
        f"tensorrt fp16 vs torch fp32: global max |diff| {out['global_max_abs_diff']:.2e}, patch cosine median "
        f"{out['patch_cosine_median']:.5f}"
    )
    return out


if __name__ == "__main__":
    main()
