"""Engine files, built once and cached: the backbone's ONNX (float32, dynamic sizes), int8 quantisations
(onnxruntime, OpenVINO/NNCF) calibrated on fixed images, TensorRT plans; and :func:`load_engine`, which
finds or builds them and returns the backbone that runs them (see the package docstring for the layout).

onnxruntime, openvino, nncf and tensorrt are imported inside the step that needs them, never at the top.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pnv_ros.engines.backends import (
    INPUT_NAME,
    OUTPUT_NAME,
    Backbone,
    OnnxRuntimeBackbone,
    OpenVinoBackbone,
    TensorRtBackbone,
    _have,
    check_engine,
)
from pnv_ros.errors import EngineError
from pnv_ros.images import list_images, load_image
from pnv_ros.model.families import family_of
from pnv_ros.model.fitting import find_fitting_set
from pnv_ros.model.model_file import ModelInfo
from pnv_ros.model.netvlad import PatchNetVLADModel
from pnv_ros.model.registry import models_dir
from pnv_ros.preprocess import input_transform
from pnv_ros.storage import utc_now

#: calibration images for int8: how many, and the seed of their choice from the corridor set's ref images
CALIBRATION_IMAGES = 32
CALIBRATION_SEED = 0
#: bumped when the engine files' recipe changes: older cached files are then not used
CACHE_VERSION = 1
OPSET = 17

Log = Callable[[str], None]
_logger = logging.getLogger("pnv_ros.engines")


# ----------------------------------------------------------------------------------------------------------------
# The backbone as a traceable module, and its ONNX


def backbone_module(model: PatchNetVLADModel) -> nn.Module:
    """The model's backbone as a plain module (images -> (B, C, h, w)) that the ONNX exporter can trace
    (``traceable_backbone`` of its class). VGG-16: the encoder (``model.backbone`` takes oneDNN's
    blocked-layout path on CPU, which does not trace). DINOv2: the ViT run to the model's layer and facet,
    tokens as a grid."""
    return model.traceable_backbone()


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def torch_onnx_export(
    module: nn.Module,
    path: Path,
    example: torch.Tensor,
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    """``torch.onnx.export`` with the TorchScript exporter (opset 17), written atomically to ``path``.

    torch 2.14's default exporter (``dynamo=True``) needs onnxscript, which this project does not install; the
    TorchScript one traces these models (convolutions, attention, bicubic resize, cumulative sums, strided
    slices) with symbolic batch, height and width (checked against torch in test/test_engines.py)."""
    tmp = _atomic_target(path)
    try:
        module = copy.deepcopy(module).cpu().eval()  # a copy: the caller's model stays on its device
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings (checked by value)
            torch.onnx.export(
                module,
                (example.cpu(),),
                str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_backbone_onnx(model: PatchNetVLADModel, path: Path, input_size: tuple[int, int]) -> Path:
    """The backbone as ONNX at ``path``: input ``images`` (batch, 3, height, width), output ``features``
    (batch, C, h, w), all sizes symbolic (any batch, any input size the model takes)."""
    h, w = input_size
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "h", 3: "w"}}
    return torch_onnx_export(backbone_module(model), path, torch.zeros(1, 3, h, w), [OUTPUT_NAME], axes)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where engine files are kept: ``cache_dir``, else the model cache's ``engines/`` folder."""
    return Path(cache_dir) if cache_dir is not None else models_dir() / "engines"


def model_cache_dir(info: ModelInfo, cache_dir: str | Path | None = None) -> Path:
    """Where one model file's engine files live: ``<cache>/engines/<file stem>-<sha256[:16]>``."""
    stem = Path(info.path).name.split(".")[0]
    return cache_root(cache_dir) / f"{stem}-{info.sha256[:16]}"


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "cache_version": str(CACHE_VERSION)}
    for mod in ("onnx", "onnxruntime", "openvino", "nncf", "tensorrt"):
        if _have(mod):
            try:
                from importlib.metadata import version

                out[mod] = version(mod)
            except Exception:  # noqa: BLE001 - a package without metadata
                pass
    return out


def _write_meta(artifact: Path, meta: dict[str, Any]) -> None:
    side = artifact.with_name(artifact.name + ".json")
    tmp = _atomic_target(side)
    try:
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, side)
    finally:
        tmp.unlink(missing_ok=True)


def _meta(info: ModelInfo, engine: str, precision: str, input_size: tuple[int, int] | None, **extra: Any) -> dict:
    return {
        "model": Path(info.path).name,
        "sha256": info.sha256,
        "family": info.family,
        "engine": engine,
        "precision": precision,
        "input_size": list(input_size) if input_size else "dynamic",
        "built": utc_now(),
        "versions": _versions(),
        **extra,
    }


def _say(log: Log | None, msg: str) -> None:
    (log or _logger.warning)(msg)


def backbone_onnx_path(
    model: PatchNetVLADModel,
    info: ModelInfo,
    input_size: tuple[int, int],
    *,
    cache_dir: str | Path | None = None,
    log: Log | None = None,
) -> Path:
    """The model's float32 backbone ONNX in the cache (dynamic sizes: one file for every input size), built
    once (a few seconds)."""
    path = model_cache_dir(info, cache_dir) / f"backbone-fp32-v{CACHE_VERSION}.onnx"
    if path.is_file():
        return path
    _say(log, f"exporting the backbone of {Path(info.path).name} to ONNX (once; cached in {path.parent})")
    t0 = time.perf_counter()
    export_backbone_onnx(model, path, input_size)
    _write_meta(path, _meta(info, "onnx", "fp32", None, seconds=round(time.perf_counter() - t0, 1)))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Calibration


def calibration_paths(
    n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED, folder: str | Path | None = None
) -> list[Path]:
    """The int8 calibration images: ``n`` of the corridor set's ref images (``data/corridor_vprbench/ref``,
    found as ``pnv models build-default`` finds it), chosen by a seeded generator, in name order."""
    if folder is None:
        folder = find_fitting_set()[0]
    images = list_images([Path(folder)])
    if len(images) < n:
        raise EngineError(f"int8 calibration needs {n} images, {folder} has {len(images)}")
    pick = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return [images[i] for i in sorted(pick)]


def calibration_batches(paths: Sequence[Path], input_size: tuple[int, int]) -> list[np.ndarray]:
    """The calibration images as the extractor feeds them: (1, 3, H, W) float32 each."""
    tf = input_transform(*input_size)
    return [tf(load_image(p)).unsqueeze(0).numpy() for p in paths]


def _calibration_record(paths: Sequence[Path]) -> dict[str, Any]:
    return {
        "images": [p.name for p in paths],
        "folder": str(Path(paths[0]).parent) if paths else "",
        "seed": CALIBRATION_SEED,
        "count": len(paths),
    }


# ----------------------------------------------------------------------------------------------------------------
# Building (once) and loading


class _Reader:
    """onnxruntime's CalibrationDataReader over fixed arrays, in order."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self.batches, self.i = list(batches), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {INPUT_NAME: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def quantize_onnx_int8(src: Path, dst: Path, batches: Sequence[np.ndarray], transformer: bool = False) -> Path:
    """onnxruntime post-training static quantisation of ``src`` to ``dst`` (atomically): QDQ format, weights
    int8 per output channel, activations uint8 per tensor from min/max over ``batches``. Convolutions (VGG)
    or matrix products (ViT) are quantised; normalisations, softmax and GELU stay float32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tmp = _atomic_target(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".calib.") as work:
        pre = Path(work) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=transformer)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation: quantise the model as it is
            shutil.copyfile(src, pre)
        try:
            quantize_static(
                str(pre),
                str(tmp),
                _Reader(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=["MatMul", "Gemm"] if transformer else ["Conv"],
                # Without VNNI, u8 x s8 products saturate in 16 bits (VPMADDUBSW): 7-bit weights avoid it.
                reduce_range=not _cpu_has_vnni(),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    return dst


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantize_openvino_int8(
    src: Path, dst_dir: Path, batches: Sequence[np.ndarray], input_size: tuple[int, int], transformer: bool = False
) -> Path:
    """NNCF post-training quantisation of the ONNX ``src`` for OpenVINO, saved as IR ``dst_dir/model.xml``
    (+ ``.bin``); the folder is built under a temporary name and renamed into place."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src))
    model.reshape({model.inputs[0]: ov.PartialShape([1, 3, *input_size])})
    dataset = nncf.Dataset(list(batches))
    options: dict[str, Any] = {"subset_size": len(batches), "preset": nncf.QuantizationPreset.PERFORMANCE}
    if transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(model, dataset, **options)
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst_dir.parent, prefix=f".{dst_dir.name}."))
    try:
        ov.save_model(quantized, str(tmp / "model.xml"), compress_to_fp16=False)
        if dst_dir.exists():  # built meanwhile by another process: keep that one
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, dst_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst_dir / "model.xml"


def _build_trt_plan(onnx_path: Path, dst: Path, precision: str, input_size: tuple[int, int], max_batch: int) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # required by 8.x, implied by 10
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    h, w = input_size
    profile.set_shape(INPUT_NAME, (1, 3, h, w), (max_batch, 3, h, w), (max_batch, 3, h, w))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path}")
    data = bytes(plan)
    tmp = _atomic_target(dst)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return data


def load_engine(
    model: PatchNetVLADModel,
    info: ModelInfo,
    input_size: tuple[int, int],
    engine: str = "torch",
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    *,
    engine_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    max_batch: int = 8,
    log: Log | None = None,
) -> Backbone | None:
    """The engine's backbone for ``model`` at ``input_size`` (H, W); None for ``torch`` (the model runs itself).

    Engine files come from the cache, built there once when missing (a log line says so: seconds for an ONNX
    export, a minute or two for an int8 calibration). ``engine_file``: a ready engine file to run instead
    (a TensorRT plan from ``trtexec --saveEngine``, an ONNX file for onnxruntime, an OpenVINO IR ``.xml``);
    it must take ``images`` (B, 3, H, W) and give the backbone's features (B, C, h, w), as ``pnv export
    --backbone`` writes. Raises EngineError (see :func:`check_engine`)."""
    dev = torch.device(device)
    check_engine(engine, precision, dev)
    if engine == "torch":
        if engine_file:
            raise EngineError("engine_file is for the onnxruntime, openvino and tensorrt engines, not torch")
        return None
    if engine_file:
        path = Path(engine_file)
        if not path.is_file():
            raise EngineError(f"engine file {path} does not exist")
        if engine == "onnxruntime":
            return OnnxRuntimeBackbone(path, precision, threads, dev)
        if engine == "openvino":
            return OpenVinoBackbone(path, precision, input_size, threads)
        return TensorRtBackbone(path.read_bytes(), path, precision, dev)
    h, w = input_size
    folder = model_cache_dir(info, cache_dir)
    tag = f"{precision}-{h}x{w}-v{CACHE_VERSION}"
    transformer = family_of(model).transformer
    if engine == "onnxruntime" and precision == "fp32":
        return OnnxRuntimeBackbone(
            backbone_onnx_path(model, info, input_size, cache_dir=cache_dir, log=log), precision, threads, dev
        )
    if engine == "openvino" and precision in ("fp32", "bf16", "fp16"):
        src = backbone_onnx_path(model, info, input_size, cache_dir=cache_dir, log=log)
        return OpenVinoBackbone(src, precision, input_size, threads)
    if engine in ("onnxruntime", "openvino"):  # int8: quantised once, calibrated, cached
        ort = engine == "onnxruntime"
        artifact = folder / (f"onnxruntime-{tag}.onnx" if ort else f"openvino-{tag}")
        ready = artifact if ort else artifact / "model.xml"
        if not ready.is_file():
            src = backbone_onnx_path(model, info, input_size, cache_dir=cache_dir, log=log)
            paths = calibration_paths()
            how = "onnxruntime int8 engine" if ort else "OpenVINO int8 engine"
            step = "calibrating on" if ort else "NNCF calibration on"
            _say(
                log,
                f"building the {how} for {Path(info.path).name} at {w}x{h}: {step} {len(paths)} images of "
                f"{paths[0].parent} (once, a minute or two; cached in {folder})",
            )
            t0 = time.perf_counter()
            batches = calibration_batches(paths, input_size)
            if ort:
                quantize_onnx_int8(src, artifact, batches, transformer)
            else:
                quantize_openvino_int8(src, artifact, batches, input_size, transformer)
            _write_meta(
                artifact,
                _meta(
                    info,
                    engine,
                    precision,
                    input_size,
                    calibration=_calibration_record(paths),
                    seconds=round(time.perf_counter() - t0, 1),
                ),
            )
            _say(log, f"built {artifact} in {time.perf_counter() - t0:.0f} s")
        if ort:
            return OnnxRuntimeBackbone(ready, precision, threads, dev)
        return OpenVinoBackbone(ready, precision, input_size, threads)
    # tensorrt
    import tensorrt as trt

    gpu = torch.cuda.get_device_name(dev).replace(" ", "_").replace("/", "_")
    dst = folder / f"tensorrt-{tag}-b{max_batch}-{gpu}-trt{trt.__version__}.plan"
    if dst.is_file():
        return TensorRtBackbone(dst.read_bytes(), dst, precision, dev)
    src = backbone_onnx_path(model, info, input_size, cache_dir=cache_dir, log=log)
    _say(
        log,
        f"building the TensorRT {precision} engine for {Path(info.path).name} at {w}x{h} on {gpu} "
        f"(once, minutes; cached in {folder})",
    )
    t0 = time.perf_counter()
    plan = _build_trt_plan(src, dst, precision, input_size, max_batch)
    _write_meta(dst, _meta(info, engine, precision, input_size, gpu=gpu, seconds=round(time.perf_counter() - t0, 1)))
    return TensorRtBackbone(plan, dst, precision, dev)


# ----------------------------------------------------------------------------------------------------------------
# Float32 agreement

#: float32 engines agree with torch to this: max abs difference of unit-norm global descriptors, and of backbone
#: feature maps relative to their largest value
FP32_TOLERANCE = 1e-4


def rounding_floor(
    model: PatchNetVLADModel, feats: torch.Tensor, patch_sizes: Sequence[int], strides: Sequence[int], seed: int = 0
) -> float:
    """How far torch's own patch descriptors move when its feature map ``feats`` (1, C, h, w) moves by one
    float32 rounding step (each value times 1 +- 2**-23, signs seeded): max abs difference.

    Patch descriptors intra-normalise each word's residual sum over a window; for a word with almost no mass
    there (a trained vocabulary's sharp soft-assignment leaves weights near 1e-20) that sum is rounding noise
    scaled to unit norm. The default VGG-16 model's patches move by ~4e-2 (median ~5e-3) under this one-ulp
    change, so no other float32 arithmetic (another engine, another CPU, torch at another batch size) can
    reproduce them to 1e-4; global descriptors and the feature maps can, and are checked to it."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, feats.shape, generator=g).to(feats.device, feats.dtype) * 2 - 1
    with torch.inference_mode():
        _, a = model._pool(feats, tuple(patch_sizes), tuple(strides))
        _, b = model._pool(feats * (1 + signs * 2.0**-23), tuple(patch_sizes), tuple(strides))
    return max((float((x - y).abs().max()) for x, y in zip(a, b)), default=0.0)
