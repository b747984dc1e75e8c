"""Inference engines for the backbone: torch (exact, the default), onnxruntime, OpenVINO, TensorRT.

An engine replaces only the backbone: a normalised image batch (B, 3, H, W) float32 in, the feature map
(B, C, h, w) float32 out (VGG-16 conv5_3, or a DINOv2 layer's token grid). NetVLAD pooling, the patch box
sums and WPCA stay the model's own torch code (``PatchNetVLADModel._pool``), so every engine gives the same
descriptor format and maps and matching are unchanged. A float32 engine's feature maps (relative to their
largest value) and global descriptors agree with torch's within 1e-4 (``pnv export`` and test/test_engines.py
check it); its patch descriptors agree as closely as torch's own agree with themselves after one float32
rounding step of the feature map (:func:`rounding_floor`: a trained vocabulary makes them that sensitive).
int8 engines also run the patch WPCA product in bfloat16 where the CPU has AMX or AVX-512 BF16
(``FeatureExtractor.projection``); their features carry a tagged model identity (:func:`variant`).

Engines and precisions (:func:`check_engine` refuses the rest, naming what works):

=============  ==================================  ============================================================
engine         precisions                          where
=============  ==================================  ============================================================
torch          fp32 (exact, default), bf16; fp16   any; fp16 on CUDA only (autocast); bf16 = the old ``--bf16``
onnxruntime    fp32, int8                          CPU (``onnxruntime``; the CUDA provider when installed, fp32)
openvino       fp32, int8; bf16/fp16 where the     CPU (``pip install openvino``; int8 also ``nncf``)
               CPU has them (AVX-512 BF16, AMX)
tensorrt       fp32, fp16                          CUDA GPU + ``pip install tensorrt`` (or a Jetson's TensorRT)
=============  ==================================  ============================================================

Engine files are built once and cached in the model cache (``models_dir()/engines/<model>-<sha256[:16]>/``):
the backbone's ONNX (float32, dynamic batch, height and width; keyed by the model file's hash), and per engine,
precision and input size the int8 ONNX (onnxruntime static quantisation, QDQ, per channel), the int8 OpenVINO IR
(NNCF post-training quantisation) or the TensorRT plan (also keyed by GPU and TensorRT version). Each is written
to a temporary name and renamed into place, so an interrupted build leaves nothing half-written that looks done.

int8 calibration is reproducible: the same :data:`CALIBRATION_IMAGES` images (a seeded choice from the
repository's corridor set, ``data/corridor_vprbench/ref``, the default model's fitting set), preprocessed as the
extractor does, fed in name order to a deterministic calibration (min/max). Each built file has a ``.json``
beside it recording the images, the tool versions and the build time.

Nothing here imports onnxruntime, openvino, nncf or tensorrt until an engine that needs it is made: the default
torch path pays nothing for the others.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
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

from pnv_ros.config import ENGINES, PRECISIONS
from pnv_ros.errors import EngineError
from pnv_ros.storage import utc_now

#: calibration images for int8: how many, and the seed of their choice from the corridor set's ref images
CALIBRATION_IMAGES = 32
CALIBRATION_SEED = 0
#: bumped when the engine files' recipe changes: older cached files are then not used
CACHE_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "features"
OPSET = 17
#: the pip package that brings each engine
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}

Log = Callable[[str], None]
_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# What runs where


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _openvino_cpu_caps() -> tuple[str, ...]:
    import openvino as ov

    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def supported_precisions(engine: str, device: str | torch.device = "cpu") -> tuple[str, ...]:
    """The precisions ``engine`` runs on ``device`` here (packages not checked; see :func:`check_engine`)."""
    dev = torch.device(device).type
    if engine == "torch":
        if dev == "cuda":
            return ("fp32", "fp16", "bf16")
        from pnv_ros.model.backbone import BlockedBackbone

        return ("fp32", "bf16") if BlockedBackbone.available(torch.bfloat16) else ("fp32",)
    if engine == "onnxruntime":
        return ("fp32",) if dev == "cuda" else ("fp32", "int8")
    if engine == "openvino":
        if dev != "cpu":
            return ()
        extra: tuple[str, ...] = ()
        if _have("openvino"):
            caps = _openvino_cpu_caps()
            extra = tuple(p for p, cap in (("bf16", "BF16"), ("fp16", "FP16")) if cap in caps)
        return ("fp32", "int8", *extra)
    if engine == "tensorrt":
        return ("fp32", "fp16") if dev == "cuda" else ()
    return ()


def check_engine(engine: str, precision: str, device: str | torch.device = "cpu") -> None:
    """Raise EngineError when ``engine`` at ``precision`` cannot run on ``device`` here, saying why and what does."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if engine == "tensorrt":
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise EngineError(
                "engine tensorrt needs an NVIDIA GPU (CUDA) and device cuda: this machine "
                + ("has no CUDA GPU" if not torch.cuda.is_available() else f"was given device {dev}")
                + "; on a CPU use onnxruntime or openvino"
            )
        if not _have("tensorrt"):
            raise EngineError(
                "engine tensorrt needs the tensorrt package (pip install tensorrt, or JetPack's python3-libnvinfer "
                "on a Jetson); it is not installed here"
            )
    elif engine in PACKAGES and not _have(PACKAGES[engine]):
        raise EngineError(f"engine {engine} needs the {PACKAGES[engine]} package (pip install {PACKAGES[engine]})")
    if engine == "openvino" and precision == "int8" and not _have("nncf"):
        raise EngineError("engine openvino at int8 needs nncf for its post-training quantisation (pip install nncf)")
    if engine == "onnxruntime" and dev.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(
                "engine onnxruntime on cuda needs onnxruntime-gpu (the CUDA provider); this onnxruntime has "
                f"{', '.join(ort.get_available_providers())}: use device cpu, or engine tensorrt / torch on the GPU"
            )
    ok = supported_precisions(engine, dev)
    if not ok:
        raise EngineError(f"engine {engine} does not run on {dev.type} (OpenVINO here: CPU only)")
    if precision not in ok:
        why = {
            ("torch", "fp16"): "float16 convolutions on a CPU are slower than float32, not faster",
            ("torch", "int8"): "torch has no int8 path here: use onnxruntime or openvino int8",
            ("torch", "bf16"): "this CPU has no bfloat16 instructions for oneDNN (AVX-512 BF16 or AMX): torch's "
            "bfloat16 convolutions take a reference path there, hundreds of times slower than fp32 (one VGG-16 "
            "pass: about 10 min against 1.5 s on an AVX2-only AMD EPYC)",
            ("onnxruntime", "fp16"): "onnxruntime's CPU provider has no float16 kernels for these layers",
            ("onnxruntime", "bf16"): "onnxruntime's CPU provider has no bfloat16 kernels for these layers",
            ("openvino", "bf16"): "this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX)",
            ("openvino", "fp16"): "this CPU has no float16 arithmetic (AMX-FP16)",
            ("tensorrt", "bf16"): "use fp16",
            ("tensorrt", "int8"): "TensorRT int8 needs its own calibration, not built here: use fp16",
        }.get((engine, precision), "")
        raise EngineError(
            f"engine {engine} does not run {precision} on {dev.type}"
            + (f" ({why})" if why else "")
            + f": choose {' or '.join(ok)}"
        )


def changes_descriptors(engine: str, precision: str) -> bool:
    """Whether features of this engine and precision must be kept apart from float32 ones (see :func:`variant`)."""
    return precision == "int8"


def variant(engine: str, precision: str) -> str:
    """The tag added to the model identity in feature and map files: '' for the float engines (float32 within
    1e-4 of torch; bfloat16 / float16 move descriptors by about 1e-3, as torch's --bf16 always has, and are
    the same model), ``{engine}-int8`` for int8 (descriptors move by far more, and each quantisation
    differently): int8 features never meet float32 ones or another engine's int8 in one map or match."""
    return f"{engine}-{precision}" if changes_descriptors(engine, precision) else ""


# ----------------------------------------------------------------------------------------------------------------
# The backbone as a traceable module, and its ONNX


class _DinoBackbone(nn.Module):
    def __init__(self, encoder: nn.Module, layer: int, facet: str) -> None:
        super().__init__()
        self.encoder, self.layer, self.facet = encoder, layer, facet

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(images, self.layer, self.facet).permute(0, 3, 1, 2)


def backbone_module(model: nn.Module) -> nn.Module:
    """The model's backbone as a plain module (images -> (B, C, h, w)) that the ONNX exporter can trace.

    VGG-16: the encoder (``model.backbone`` takes oneDNN's blocked-layout path on CPU, which does not trace).
    DINOv2: the ViT run to the model's layer and facet, tokens as a grid."""
    from pnv_ros.model.dinov2_vlad import DinoVLADModel

    if isinstance(model, DinoVLADModel):
        return _DinoBackbone(model.encoder, model.layer, model.facet).eval()
    return model.encoder.eval()


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def torch_onnx_export(module: nn.Module, path: Path, example: torch.Tensor, output_names: Sequence[str],
                      dynamic_axes: dict[str, dict[int, str]]) -> Path:  # fmt: skip
    """``torch.onnx.export`` with the TorchScript exporter (opset 17), written atomically to ``path``.

    torch 2.14's default exporter (``dynamo=True``) needs onnxscript, which this project does not install; the
    TorchScript one traces these models (convolutions, attention, bicubic resize, cumulative sums, strided
    slices) with symbolic batch, height and width (checked against torch in test/test_engines.py)."""
    tmp = _atomic_target(path)
    try:
        module = copy.deepcopy(module).cpu().eval()  # a copy: the caller's model stays on its device
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings (checked by value)
            torch.onnx.export(module, (example.cpu(),), str(tmp), dynamo=False, input_names=[INPUT_NAME],
                              output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=OPSET,
                              do_constant_folding=True)  # fmt: skip
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_backbone_onnx(model: nn.Module, path: Path, input_size: tuple[int, int]) -> Path:
    """The backbone as ONNX at ``path``: input ``images`` (batch, 3, height, width), output ``features``
    (batch, C, h, w), all sizes symbolic (any batch, any input size the model takes)."""
    h, w = input_size
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "h", 3: "w"}}
    return torch_onnx_export(backbone_module(model), path, torch.zeros(1, 3, h, w), [OUTPUT_NAME], axes)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    from pnv_ros.model.registry import models_dir

    return Path(cache_dir) if cache_dir is not None else models_dir() / "engines"


def model_cache_dir(info: Any, cache_dir: str | Path | None = None) -> Path:
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


def _meta(info: Any, engine: str, precision: str, input_size: tuple[int, int] | None, **extra: Any) -> dict:
    return {"model": Path(info.path).name, "sha256": info.sha256, "family": getattr(info, "family", ""),
            "engine": engine, "precision": precision,
            "input_size": list(input_size) if input_size else "dynamic",
            "built": utc_now(), "versions": _versions(),
            **extra}  # fmt: skip


def _say(log: Log | None, msg: str) -> None:
    (log or _logger.warning)(msg)


def backbone_onnx_path(model: nn.Module, info: Any, input_size: tuple[int, int], *,
                       cache_dir: str | Path | None = None, log: Log | None = None) -> Path:  # fmt: skip
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


def calibration_paths(n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED,
                      folder: str | Path | None = None) -> list[Path]:  # fmt: skip
    """The int8 calibration images: ``n`` of the corridor set's ref images (``data/corridor_vprbench/ref``,
    found as ``pnv models build-default`` finds it), chosen by a seeded generator, in name order."""
    from pnv_ros.images import list_images

    if folder is None:
        from pnv_ros.model.default_model import find_fitting_set

        folder = find_fitting_set()[0]
    images = list_images([Path(folder)])
    if len(images) < n:
        raise EngineError(f"int8 calibration needs {n} images, {folder} has {len(images)}")
    pick = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return [images[i] for i in sorted(pick)]


def calibration_batches(paths: Sequence[Path], input_size: tuple[int, int]) -> list[np.ndarray]:
    """The calibration images as the extractor feeds them: (1, 3, H, W) float32 each."""
    from pnv_ros.extract import input_transform
    from pnv_ros.images import load_image

    tf = input_transform(*input_size)
    return [tf(load_image(p)).unsqueeze(0).numpy() for p in paths]


def _calibration_record(paths: Sequence[Path]) -> dict[str, Any]:
    return {"images": [p.name for p in paths], "folder": str(Path(paths[0]).parent) if paths else "",
            "seed": CALIBRATION_SEED, "count": len(paths)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Engines


class Backbone:
    """An engine's backbone: ``__call__(images (B, 3, H, W) float32) -> (B, C, h, w) float32`` on the
    extractor's device. ``files``: the engine files it runs (for logs and reports)."""

    name = "?"
    precision = "fp32"
    files: tuple[Path, ...] = ()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} {self.precision}" + (f" ({self.files[0]})" if self.files else "")


def _threads(threads: int | None) -> int:
    return max(1, int(threads)) if threads else max(1, torch.get_num_threads())


class OnnxRuntimeBackbone(Backbone):
    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, threads: int | None = None, device: torch.device | None = None):
        import onnxruntime as ort

        self.precision, self.files = precision, (path,)
        self.device = device or torch.device("cpu")
        so = ort.SessionOptions()
        so.intra_op_num_threads = _threads(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Threads sleep between runs instead of spinning: on a shared robot CPU (and this 2-core machine) a
        # spinning pool takes cores from the rest of the pipeline and from other processes.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else \
            ["CPUExecutionProvider"]  # fmt: skip
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise EngineError(f"onnxruntime cannot load {path}: {e}") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return torch.from_numpy(out).to(self.device)


class OpenVinoBackbone(Backbone):
    name = "openvino"

    def __init__(self, model_path: Path, precision: str, input_size: tuple[int, int], threads: int | None = None):
        import openvino as ov

        self.precision, self.files = precision, (model_path,)
        core = ov.Core()
        try:
            model = core.read_model(str(model_path))
            # Spatial size fixed (the preset's), batch free: OpenVINO plans its kernels for the static size.
            model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, *input_size])})
            hint = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": _threads(threads),
                                                              "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                                                              "INFERENCE_PRECISION_HINT": hint})  # fmt: skip
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError for everything
            raise EngineError(f"OpenVINO cannot load {model_path}: {e}") from None
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.outputs[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        out = self.request.infer({0: x})[self.output]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))


class TensorRtBackbone(Backbone):
    """A TensorRT engine (a plan built here from the backbone ONNX, or a user's ``trtexec --saveEngine`` file)
    run on the extractor's CUDA stream with torch tensors as its buffers."""

    name = "tensorrt"

    def __init__(self, plan: bytes, path: Path, precision: str, device: torch.device) -> None:
        import tensorrt as trt

        self.precision, self.files, self.device = precision, (path,), device
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"TensorRT cannot deserialise {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise EngineError(f"{path}: a backbone engine has one input and one output, this one {ins} / {outs}")
        self.input, self.output = ins[0], outs[0]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        dt = self.engine.get_tensor_dtype(name)
        kinds = {trt.float32: torch.float32, trt.float16: torch.float16}
        if hasattr(trt, "bfloat16"):  # TensorRT 9+ (JetPack 5's 8.5 has none)
            kinds[trt.bfloat16] = torch.bfloat16
        if dt not in kinds:
            raise EngineError(f"TensorRT engine {self.files[0]}: tensor {name} is {dt}; a backbone engine takes and "
                              "gives float32 or float16")  # fmt: skip
        return kinds[dt]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self._torch_dtype(self.input)).contiguous()
        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            raise EngineError(f"TensorRT engine {self.files[0]} does not take input shape {list(x.shape)}")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device=self.device,
                          dtype=self._torch_dtype(self.output))  # fmt: skip
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT engine {self.files[0]} failed to run")
        return out.float()


# ----------------------------------------------------------------------------------------------------------------
# Building (once) and loading


def _is_transformer(model: nn.Module) -> bool:
    from pnv_ros.model.dinov2_vlad import DinoVLADModel

    return isinstance(model, DinoVLADModel)


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
                str(pre), str(tmp), _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=["MatMul", "Gemm"] if transformer else ["Conv"],
                # Without VNNI, u8 x s8 products saturate in 16 bits (VPMADDUBSW): 7-bit weights avoid it.
                reduce_range=not _cpu_has_vnni(),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )  # fmt: skip
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


def quantize_openvino_int8(src: Path, dst_dir: Path, batches: Sequence[np.ndarray], input_size: tuple[int, int],
                           transformer: bool = False) -> Path:  # fmt: skip
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
    model: nn.Module,
    info: Any,
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
    transformer = _is_transformer(model)
    if engine == "onnxruntime" and precision == "fp32":
        return OnnxRuntimeBackbone(backbone_onnx_path(model, info, input_size, cache_dir=cache_dir, log=log),
                                   precision, threads, dev)  # fmt: skip
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
            _write_meta(artifact, _meta(info, engine, precision, input_size, calibration=_calibration_record(paths),
                                        seconds=round(time.perf_counter() - t0, 1)))  # fmt: skip
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
    _say(log, f"building the TensorRT {precision} engine for {Path(info.path).name} at {w}x{h} on {gpu} "
              f"(once, minutes; cached in {folder})")  # fmt: skip
    t0 = time.perf_counter()
    plan = _build_trt_plan(src, dst, precision, input_size, max_batch)
    _write_meta(dst, _meta(info, engine, precision, input_size, gpu=gpu, seconds=round(time.perf_counter() - t0, 1)))
    return TensorRtBackbone(plan, dst, precision, dev)


# ----------------------------------------------------------------------------------------------------------------
# pnv export: the backbone ONNX, checked against torch

#: float32 engines agree with torch to this: max abs difference of unit-norm global descriptors, and of backbone
#: feature maps relative to their largest value
FP32_TOLERANCE = 1e-4


def rounding_floor(model: nn.Module, feats: torch.Tensor, patch_sizes: Sequence[int], strides: Sequence[int],
                   seed: int = 0) -> float:  # fmt: skip
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


@dataclasses.dataclass
class ExportCheck:
    """What ``pnv export`` checked: the exported ONNX (run by onnxruntime) against the model's torch path.

    ``rows``: (what was compared, max abs difference, the limit it must keep)."""

    path: Path
    input_size: tuple[int, int]
    images: list[str]
    rows: list[tuple[str, float, float]]

    @property
    def ok(self) -> bool:
        return all(d <= limit for _, d, limit in self.rows)


def _other_size(model: nn.Module, input_size: tuple[int, int]) -> tuple[int, int]:
    """A second input size for the dynamic-shape check: about 3/4 of the model's, a multiple of its stride
    (14 px per ViT token; 16 px per VGG-16 conv5_3 cell)."""
    step = 14 if _is_transformer(model) else 16
    return tuple(max(step * 4, (3 * s // 4) // step * step) for s in input_size)  # type: ignore[return-value]


def export_checked(model: nn.Module, info: Any, preset: Any, out: str | Path, images: Sequence[Any],
                   progress: Callable[[str, int, int], None] | None = None) -> ExportCheck:  # fmt: skip
    """``pnv export``: the model's backbone as ONNX at ``out`` (input ``images`` (B, 3, H, W) float32,
    ImageNet-normalised; output ``features`` (B, C, h, w); batch, height and width dynamic; opset 17),
    checked on ``images`` before it is moved into place, with onnxruntime against the torch path at the
    model's input size:

    1. backbone feature maps: max abs difference / the largest value <= :data:`FP32_TOLERANCE`;
    2. global descriptors (unit norm): max abs difference <= FP32_TOLERANCE;
    3. patch descriptors (``preset``'s patch sizes): max abs difference <= the larger of FP32_TOLERANCE and
       twice torch's own one-rounding-step sensitivity (:func:`rounding_floor`);
    4. the dynamic axes: all images as one batch at about 3/4 of the input size, global descriptors <=
       FP32_TOLERANCE.

    Raises EngineError when a check fails (``out`` is then not written) and ImageError for an image that
    cannot be read; returns the check for printing."""
    from pnv_ros.extract import FeatureExtractor, input_transform, preset_size
    from pnv_ros.images import load_image

    out = Path(out)
    if not images:
        raise EngineError("pnv export checks the export on real images: give at least one")
    torch_ex = FeatureExtractor(model, info, preset, device="cpu")
    size, pre = preset_size(torch_ex.preset), torch_ex.preset
    tmp = _atomic_target(out)
    total = len(images) + 3

    def tick(stage: str, i: int) -> None:
        if progress:
            progress(stage, i, total)

    try:
        export_backbone_onnx(model, tmp, size)
        tick("export", 1)
        ort_ex = FeatureExtractor(model, info, preset, device="cpu", engine="onnxruntime", engine_file=tmp)
        feat = glob = patch = floor = 0.0
        for i, img in enumerate(images):
            x = torch_ex.preprocess(img)[0].unsqueeze(0)
            with torch.inference_mode():
                want, got = model.backbone(x).float(), ort_ex.backend(x).float()
                feat = max(feat, float((want - got).abs().max() / want.abs().max().clamp(min=1e-30)))
                (ga, pa), (gb, pb) = (model._pool(f, pre.patch_sizes, pre.strides) for f in (want, got))
            glob = max(glob, float((ga - gb).abs().max()))
            patch = max([patch] + [float((a - b).abs().max()) for a, b in zip(pa, pb)])
            floor = max(floor, rounding_floor(model, want, pre.patch_sizes, pre.strides))
            tick("check", 2 + i)
        h2, w2 = _other_size(model, size)
        batch = torch.stack([input_transform(h2, w2)(load_image(img)) for img in images])
        with torch.inference_mode():
            want = model._pool(model.backbone(batch).float(), (), ())[0]
            got = model._pool(ort_ex.backend(batch).float(), (), ())[0]
        tick("dynamic", total - 1)
        tol = FP32_TOLERANCE
        rows = [(f"backbone features, {len(images)} image(s) at {size[1]}x{size[0]} (relative to the largest)",
                 feat, tol),
                ("global descriptors", glob, tol),
                (f"patch descriptors, patch sizes {', '.join(map(str, pre.patch_sizes))} (limit: the larger of "
                 f"{tol:g} and twice torch's own change under one float32 rounding step, {floor:.1e})",
                 patch, max(tol, 2 * floor)),
                (f"dynamic axes: one batch of {len(images)} at {w2}x{h2}, global descriptors",
                 float((want - got).abs().max()), tol)]  # fmt: skip
        check = ExportCheck(out, size, [str(i) for i in images], rows)
        if not check.ok:
            bad = "; ".join(f"{w}: {d:.2e} > {lim:.1e}" for w, d, lim in rows if d > lim)
            raise EngineError(f"the ONNX export of {Path(info.path).name} does not match torch ({bad}); "
                              f"{out} not written")  # fmt: skip
        os.replace(tmp, out)
        tick("done", total)
        return check
    finally:
        tmp.unlink(missing_ok=True)


__all__ = [
    "CALIBRATION_IMAGES",
    "ENGINES",
    "PRECISIONS",
    "Backbone",
    "EngineError",
    "ExportCheck",
    "FP32_TOLERANCE",
    "backbone_module",
    "backbone_onnx_path",
    "calibration_paths",
    "changes_descriptors",
    "check_engine",
    "export_backbone_onnx",
    "export_checked",
    "rounding_floor",
    "load_engine",
    "supported_precisions",
    "variant",
]
