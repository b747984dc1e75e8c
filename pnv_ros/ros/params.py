"""The node's parameters as one table: name, default, description, range, and where it goes.

Detector parameters map one to one onto :class:`DetectorParams` (their
defaults and ranges come from it), so the node, the CLI and the evaluator
validate the same way. No rclpy here: the node turns the table into
``ParameterDescriptor`` s, and the tests read it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pnv_ros.config import ENGINES, PRECISIONS, DetectorParams
from pnv_ros.errors import ConfigError

#: QoS choices for the inputs. sensor_data = best effort, volatile, keep last (what camera drivers
#: publish with); reliable / best_effort = that reliability with the given depth.
QOS_CHOICES = ("sensor_data", "reliable", "best_effort", "system_default")


@dataclass(frozen=True)
class Param:
    """One node parameter. kind: 'detector' (DetectorParams field), 'node' (changeable), 'startup' (read-only)."""

    name: str
    default: Any
    description: str
    kind: str = "startup"
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def read_only(self) -> bool:
        return self.kind == "startup"


_DP = DetectorParams()
_DETECTOR_TEXT = {
    "top_n": "candidates retrieved and re-ranked per keyframe",
    "matcher": "'' (the preset's), ransac or rapid",
    "min_score": "accept a loop when its absolute score (0..1) is at least this",
    "exclude_recent_s": "keyframes newer than this (s, session clock) are never candidates",
    "exclude_recent_keyframes": "the last this-many keyframes of this run are never candidates",
    "min_interval_s": "minimum time between keyframes (s)",
    "min_travel_m": "with odometry: a keyframe after this much travel (m) ...",
    "min_rotation_rad": "... or this much rotation (rad) since the last keyframe",
    "min_visual_change": "without odometry: a keyframe when the picture changed this much (1 - normalised "
    "cross-correlation of 32x24 grey thumbnails, 0..1) since the last keyframe; 0 = every frame",
    "min_texture": "a frame whose 32x24 grey thumbnail varies less than this (std, grey levels) is never a keyframe "
    "(lens cap, darkness, white-out)",
    "temporal_k": "consecutive consistent keyframes required before a loop is published (1 = off)",
    "temporal_tolerance": "keyframe ids consecutive best matches may move and still be consistent",
    "fast_products": "oneDNN similarity products on CPU: faster re-ranking, float32 rounding differs from the "
    "reference",
}

TABLE: tuple[Param, ...] = (
    Param("preset", "speed", "performance | speed | storage", choices=("performance", "speed", "storage")),
    Param("config_file", "", "override file (.toml/.json/.ini) for the preset"),
    Param("checkpoint", "", "checkpoint path or official model name; '' = offline default"),
    Param("vocabulary_images", "", "a folder of images or a ROS bag of this environment: at start the checkpoint's "
          "vocabulary and whitening PCA are refitted on it (at most 300 evenly spaced frames; cached in the model "
          "cache, so a restart with the same model and files reuses it); '' = off"),
    Param("vocabulary_topic", "", "the image topic of a vocabulary_images bag; '' = its only image topic"),
    Param("device", "", "cpu | cuda | cuda:N; '' = cuda when present"),
    Param("bfloat16", False, "the same as engine torch, precision bf16 (kept for older launch files)"),
    Param("engine", "torch", "what runs the backbone: torch (exact) | onnxruntime | openvino (CPU) | tensorrt "
          "(NVIDIA GPU, device cuda); engine files are built at start once and cached beside the models",
          choices=ENGINES),
    Param("precision", "", "fp32 | bf16 | fp16 | int8 as the engine allows ('' = fp32; bf16 with bfloat16): int8 "
          "= onnxruntime or openvino post-training quantisation; its maps are kept apart from float32 ones",
          choices=("", *PRECISIONS)),
    Param("engine_file", "", "a ready engine file instead of the cached build: a TensorRT plan (trtexec "
          "--saveEngine from 'pnv export' ONNX), or an ONNX / OpenVINO .xml of the backbone; '' = build and cache"),
    Param("compressed", False, "subscribe to image/compressed instead of image"),
    Param("bit_depth", 0, "significant bits of a 16-bit camera (e.g. 12 for a 12-bit sensor in mono16); 0 = "
          "per frame: a PNG's sBIT, else the smallest of 8/10/12/14/16 bits holding the frame's maximum",
          range=(0, 16)),
    Param("image_qos", "sensor_data", "image QoS: sensor_data (best effort, what drivers publish) | reliable | "
          "best_effort | system_default; a best-effort subscription also receives reliable publishers",
          choices=QOS_CHOICES),
    Param("image_qos_depth", 1, "image queue depth (latest wins: 1 is enough)", range=(1, 1000)),
    Param("camera_info_qos", "sensor_data", "camera_info QoS (as image_qos)", choices=QOS_CHOICES),
    Param("camera_info_qos_depth", 1, "camera_info queue depth", range=(1, 1000)),
    Param("odom_qos", "sensor_data", "odometry QoS (as image_qos; best effort hears both kinds of publisher, "
          "and a lost pose costs nothing)", choices=QOS_CHOICES),
    Param("odom_qos_depth", 50, "odometry queue depth", range=(1, 10000)),
    Param("odom_tolerance_s", 0.1, "an image takes the odometry pose nearest its stamp within this (s); when "
          "the odometry of its instant is late, it waits for it as long (wall seconds)",
          range=(0.0, 10.0)),
    Param("index_kind", "flat", "FAISS index: flat (exact) | hnsw (maps of 100k+ keyframes)", choices=("flat", "hnsw")),
    Param("patch_dtype", "float16", "patch storage: float16 (half the memory) | float32",
          choices=("float16", "float32")),
    Param("memory_budget_mb", 4096.0, "patch MB kept in RAM; beyond it older keyframes' patches go to memory-mapped "
          "files in the temp folder (0 = no limit). 4096: about 4,000 keyframes of the speed preset (1 MB each), an "
          "hour or more of driving, before a robot's RAM fills", range=(0.0, 1e7)),
    Param("map_dir", str(Path.home() / ".ros" / "pnv_maps"), "folder for saved maps"),
    Param("load_map", "", "map name (in map_dir) to load at start"),
    *(
        Param(f.name, getattr(_DP, f.name), _DETECTOR_TEXT[f.name], "detector", DetectorParams.RANGES.get(f.name),
              ("", "ransac", "rapid") if f.name == "matcher" else None)
        for f in fields(DetectorParams)
    ),
    Param("max_rate_hz", 0.0, "process at most this many frames per second (0 = as fast as extraction goes)",
          "node", (0.0, 1000.0)),
    Param("save_map_on_shutdown", "", "map name to save at shutdown ('' = don't)", "node"),
    Param("thumbnail_cache", 500, "keyframe thumbnails kept for match images (oldest dropped)", "node", (0, 100000)),
)  # fmt: skip

BY_NAME = {p.name: p for p in TABLE}
DETECTOR_NAMES = tuple(p.name for p in TABLE if p.kind == "detector")


def check(name: str, value: Any) -> None:
    """Raise ConfigError when a value is outside its parameter's range or choices."""
    p = BY_NAME.get(name)
    if p is None:
        return  # parameters of ROS itself (use_sim_time, ...)
    want = type(p.default)
    if want is float:  # integers too (dynamically typed in the node): 30 for 30.0
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{name} = {value!r}: must be a {'number' if want is float else want.__name__}")
    if p.choices is not None and value not in p.choices:
        raise ConfigError(f"{name} = {value!r}: choose one of {', '.join(repr(c) for c in p.choices)}")
    if p.range is not None and not (p.range[0] <= value <= p.range[1]):
        raise ConfigError(f"{name} = {value!r}: must be from {p.range[0]} to {p.range[1]}")
    if name in ("save_map_on_shutdown", "load_map") and value:
        map_file_name(value)


def detector_params(values: dict[str, Any], base: DetectorParams | None = None) -> DetectorParams:
    """DetectorParams from parameter values (only the detector's names are taken). Raises ConfigError."""
    changes = {k: v for k, v in values.items() if k in DETECTOR_NAMES}
    for k, v in changes.items():
        check(k, v)
    return (base or DetectorParams()).replace(**changes)


def map_file_name(name: str) -> str:
    """A map name as a file name inside map_dir; refuses paths. Raises ConfigError."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", name or "") or ".." in name or name.endswith("."):
        raise ConfigError(f"bad map name {name!r}: use letters, digits, '_', '-', '.' (no '/' or '..')")
    return name if name.endswith(".npz") else name + ".npz"
