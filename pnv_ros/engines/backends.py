"""What runs where (:func:`supported_precisions`, :func:`check_engine`) and the backbones that run:
``__call__(images (B, 3, H, W) float32) -> (B, C, h, w) float32`` on the extractor's device.

onnxruntime, openvino and tensorrt are imported inside the engine that needs them, never at the top.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from pnv_ros.engines.spec import ENGINES, PACKAGES, PRECISIONS
from pnv_ros.errors import EngineError
from pnv_ros.model.backbone import BlockedBackbone

#: the backbone graph's input and output names (``build.export_backbone_onnx``)
INPUT_NAME = "images"
OUTPUT_NAME = "features"


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
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if self.device.type == "cuda"
            else ["CPUExecutionProvider"]
        )
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
            self.compiled = core.compile_model(
                model,
                "CPU",
                {
                    "INFERENCE_NUM_THREADS": _threads(threads),
                    "NUM_STREAMS": 1,
                    "PERFORMANCE_HINT": "LATENCY",
                    "INFERENCE_PRECISION_HINT": hint,
                },
            )
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
            raise EngineError(
                f"TensorRT engine {self.files[0]}: tensor {name} is {dt}; a backbone engine takes and "
                "gives float32 or float16"
            )
        return kinds[dt]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self._torch_dtype(self.input)).contiguous()
        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            raise EngineError(f"TensorRT engine {self.files[0]} does not take input shape {list(x.shape)}")
        out = torch.empty(
            tuple(self.context.get_tensor_shape(self.output)), device=self.device, dtype=self._torch_dtype(self.output)
        )
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT engine {self.files[0]} failed to run")
        return out.float()
