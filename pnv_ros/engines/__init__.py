"""Inference engines for the backbone: torch (exact, the default), onnxruntime, OpenVINO, TensorRT.

An engine replaces only the backbone: a normalised image batch (B, 3, H, W) float32 in, the feature map
(B, C, h, w) float32 out (VGG-16 conv5_3, or a DINOv2 layer's token grid). NetVLAD pooling, the patch box
sums and WPCA stay the model's own torch code (``PatchNetVLADModel._pool``), so every engine gives the same
descriptor format and maps and matching are unchanged. A float32 engine's feature maps (relative to their
largest value) and global descriptors agree with torch's within 1e-4 (``pnv export`` and test/test_engines.py
check it); its patch descriptors agree as closely as torch's own agree with themselves after one float32
rounding step of the feature map (:func:`rounding_floor`: a trained vocabulary makes them that sensitive).
At every precision but fp32 the pooling is the fast one (``FeatureExtractor.pooling``: no integral image,
bfloat16 products where the device has them); int8 features carry a tagged model identity (:func:`variant`).

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

Modules: ``spec`` (torch-free: the engine and precision names, :class:`~pnv_ros.engines.spec.RuntimeSpec`, the
identity tag), ``backends`` (what runs where, and the backbones that run), ``build`` (the backbone's ONNX, int8
calibration, TensorRT plans, the cache, :func:`load_engine`). The names below load on first use (PEP 562), so
that the torch-free ``spec`` is importable without torch. ``pnv export``'s check is ``pnv_ros.export``.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    **dict.fromkeys(
        ("ENGINES", "PRECISIONS", "PACKAGES", "EngineError", "RuntimeSpec", "changes_descriptors", "variant"), "spec"
    ),
    **dict.fromkeys(
        (
            "INPUT_NAME",
            "OUTPUT_NAME",
            "Backbone",
            "OnnxRuntimeBackbone",
            "OpenVinoBackbone",
            "TensorRtBackbone",
            "check_engine",
            "supported_precisions",
        ),
        "backends",
    ),
    **dict.fromkeys(
        (
            "CACHE_VERSION",
            "CALIBRATION_IMAGES",
            "CALIBRATION_SEED",
            "FP32_TOLERANCE",
            "OPSET",
            "backbone_module",
            "backbone_onnx_path",
            "cache_root",
            "calibration_batches",
            "calibration_paths",
            "export_backbone_onnx",
            "load_engine",
            "model_cache_dir",
            "quantize_onnx_int8",
            "quantize_openvino_int8",
            "rounding_floor",
            "torch_onnx_export",
        ),
        "build",
    ),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"pnv_ros.engines.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pnv_ros.engines' has no attribute {name!r}")
