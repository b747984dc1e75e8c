"""The node's parameters as tables: name, default, description, range, and where it goes.

Detector parameters map one to one onto :class:`DetectorParams`' fields
(their defaults, help, ranges and choices are its field metadata), so the
node, the CLI (``pnv eval``'s generated options) and the evaluator validate
the same way; the node's own parameters (inputs, QoS, engine, maps) are
:data:`NODE_TABLE`. No rclpy here: the node turns :data:`TABLE` into
``ParameterDescriptor`` s, and the tests read it directly.

``python -m pnv_ros.ros.params --markdown > docs/parameters.md`` writes the
parameter reference (test_parameters_doc checks that the committed file is
current).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pnv_ros.config import ENGINES, PRECISIONS, DetectorParams
from pnv_ros.errors import ConfigError
from pnv_ros.fleet.member import DEFAULT_DEADLINE_S, DEFAULT_TOP_N

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


def fields_table(settings: type, kind: str) -> tuple[Param, ...]:
    """One :class:`Param` of ``kind`` per field of the dataclass ``settings``: its default, and the help, range
    and choices of its metadata (the one source of a node's table, the CLI's options and the docs)."""
    return tuple(
        Param(f.name, f.default, f.metadata["help"], kind, f.metadata.get("range"), f.metadata.get("choices"))
        for f in fields(settings)
    )


def _detector_table() -> tuple[Param, ...]:
    """The detector's parameters, from :class:`DetectorParams`' fields: default, help, range and choices."""
    return fields_table(DetectorParams, "detector")


#: The node's own parameters (inputs, QoS, engine, maps): read-only at start, then the changeable ones.
NODE_TABLE: tuple[Param, ...] = (
    Param("preset", "speed", "performance | speed | storage", choices=("performance", "speed", "storage")),
    Param("config_file", "", "override file (.toml/.json/.ini) for the preset"),
    Param("checkpoint", "", "checkpoint path or official model name; '' = offline default"),
    Param(
        "vocabulary_images",
        "",
        "a folder of images or a ROS bag of this environment: at start the checkpoint's "
        "vocabulary and whitening PCA are refitted on it (at most 300 evenly spaced frames; cached in the model "
        "cache, so a restart with the same model and files reuses it); '' = off",
    ),
    Param("vocabulary_topic", "", "the image topic of a vocabulary_images bag; '' = its only image topic"),
    Param("device", "", "cpu | cuda | cuda:N; '' = cuda when present"),
    Param("bfloat16", False, "the same as engine torch, precision bf16 (kept for older launch files)"),
    Param(
        "engine",
        "torch",
        "what runs the backbone: torch (exact) | onnxruntime | openvino (CPU) | tensorrt "
        "(NVIDIA GPU, device cuda); engine files are built at start once and cached beside the models",
        choices=ENGINES,
    ),
    Param(
        "precision",
        "",
        "fp32 | bf16 | fp16 | int8 as the engine allows ('' = fp32; bf16 with bfloat16): int8 "
        "= onnxruntime or openvino post-training quantisation; its maps are kept apart from float32 ones",
        choices=("", *PRECISIONS),
    ),
    Param(
        "engine_file",
        "",
        "a ready engine file instead of the cached build: a TensorRT plan (trtexec "
        "--saveEngine from 'pnv export' ONNX), or an ONNX / OpenVINO .xml of the backbone; '' = build and cache",
    ),
    Param("compressed", False, "subscribe to image/compressed instead of image"),
    Param(
        "image_rectified",
        False,
        "false: the images are raw (image_raw), camera_info's K and D (distortion_model: plumb_bob, "
        "rational_polynomial, equidistant) apply; true: they are rectified (image_rect), P applies and D is ignored",
    ),
    Param(
        "bit_depth",
        0,
        "significant bits of a 16-bit camera (e.g. 12 for a 12-bit sensor in mono16); 0 = "
        "per frame: a PNG's sBIT, else the smallest of 8/10/12/14/16 bits holding the frame's maximum",
        range=(0, 16),
    ),
    Param(
        "image_qos",
        "sensor_data",
        "image QoS: sensor_data (best effort, what drivers publish) | reliable | "
        "best_effort | system_default; a best-effort subscription also receives reliable publishers",
        choices=QOS_CHOICES,
    ),
    Param("image_qos_depth", 1, "image queue depth (latest wins: 1 is enough)", range=(1, 1000)),
    Param("camera_info_qos", "sensor_data", "camera_info QoS (as image_qos)", choices=QOS_CHOICES),
    Param("camera_info_qos_depth", 1, "camera_info queue depth", range=(1, 1000)),
    Param(
        "odom_qos",
        "sensor_data",
        "odometry QoS (as image_qos; best effort hears both kinds of publisher, and a lost pose costs nothing)",
        choices=QOS_CHOICES,
    ),
    Param("odom_qos_depth", 50, "odometry queue depth", range=(1, 10000)),
    Param(
        "depth_qos",
        "sensor_data",
        "depth image QoS (as image_qos); the optional depth topic: 16UC1 millimetres or 32FC1 metres, "
        "registered to the colour camera (same size and pixels)",
        choices=QOS_CHOICES,
    ),
    Param("depth_qos_depth", 2, "depth image queue depth", range=(1, 1000)),
    Param(
        "depth_tolerance_s",
        0.02,
        "a frame takes the depth image nearest its stamp within this (s; 0.02 = TUM RGB-D's associate.py); when "
        "the depth of its instant is late, it waits for it as long (wall seconds)",
        range=(0.0, 1.0),
    ),
    Param(
        "odom_tolerance_s",
        0.1,
        "an image takes the odometry pose nearest its stamp within this (s); when "
        "the odometry of its instant is late, it waits for it as long (wall seconds)",
        range=(0.0, 10.0),
    ),
    Param("index_kind", "flat", "FAISS index: flat (exact) | hnsw (maps of 100k+ keyframes)", choices=("flat", "hnsw")),
    Param(
        "patch_dtype", "float16", "patch storage: float16 (half the memory) | float32", choices=("float16", "float32")
    ),
    Param(
        "memory_budget_mb",
        4096.0,
        "patch MB kept in RAM; beyond it older keyframes' patches go to memory-mapped "
        "files in the temp folder (0 = no limit). 4096: about 4,000 keyframes of the speed preset (1 MB each), an "
        "hour or more of driving, before a robot's RAM fills",
        range=(0.0, 1e7),
    ),
    Param(
        "fleet_dsn",
        "",
        "a fleet store shared by many robots (PostgreSQL + pgvector; libpq connection string, e.g. from pnv fleet "
        "serve): every keyframe is uploaded, every query also searches other robots' keyframes and this robot's "
        "earlier sessions; '' = this node's map only",
    ),
    Param("robot_id", "", "this robot's name in the fleet (unique per robot; required with fleet_dsn)"),
    Param(
        "fleet_top_n",
        DEFAULT_TOP_N,
        "fleet candidates re-ranked per keyframe besides the local top_n (each costs a ~1 MB fetch, then cached)",
        range=(1, 100),
    ),
    Param(
        "fleet_deadline_s",
        DEFAULT_DEADLINE_S,
        "seconds a keyframe waits for the fleet's candidates before going on with its local ones (counted late)",
        range=(0.01, 10.0),
    ),
    Param("map_dir", str(Path.home() / ".ros" / "pnv_maps"), "folder for saved maps"),
    Param("load_map", "", "map name (in map_dir) to load at start"),
    Param(
        "max_rate_hz",
        0.0,
        "process at most this many frames per second (0 = as fast as extraction goes)",
        "node",
        (0.0, 1000.0),
    ),
    Param("save_map_on_shutdown", "", "map name to save at shutdown ('' = don't)", "node"),
    Param("thumbnail_cache", 500, "keyframe thumbnails kept for match images (oldest dropped)", "node", (0, 100000)),
)

#: The detector's parameters: DetectorParams' fields (defaults, help, ranges and choices from its metadata).
DETECTOR_TABLE: tuple[Param, ...] = _detector_table()

#: Every parameter, in the order the node declares them: startup, detector, changeable node parameters.
TABLE: tuple[Param, ...] = (
    *(p for p in NODE_TABLE if p.kind == "startup"),
    *DETECTOR_TABLE,
    *(p for p in NODE_TABLE if p.kind != "startup"),
)
BY_NAME = {p.name: p for p in TABLE}
DETECTOR_NAMES = tuple(p.name for p in TABLE if p.kind == "detector")


def check(name: str, value: Any, by_name: dict[str, Param] | None = None) -> None:
    """Raise ConfigError when a value is outside its parameter's range or choices (``by_name``: another node's
    table by name, e.g. :data:`pnv_ros.ros.pose_graph_params.BY_NAME`; default this node's)."""
    p = (BY_NAME if by_name is None else by_name).get(name)
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


# ----------------------------------------------------------------------------------------------------------------
# docs/parameters.md


def _cell(text: str) -> str:
    """Text for a Markdown table cell ('|' escaped)."""
    return text.replace("|", "\\|")


def _value(v: Any) -> str:
    """A default as a ROS parameters file writes it; the home folder as ~ (the file is the same on every machine)."""
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, str):
        home = str(Path.home())
        return f"`{'~' + v[len(home) :] if v.startswith(home + '/') else v}`" if v else "`''`"
    if isinstance(v, float):
        return f"`{v:.1f}`" if v.is_integer() and abs(v) < 1e16 else f"`{v!r}`"
    return f"`{v}`"


def _allowed(p: Param) -> str:
    if p.choices is not None:
        return ", ".join(f"`{c}`" if c else "`''`" for c in p.choices)
    if p.range is not None:
        return f"{_value(p.range[0])} .. {_value(p.range[1])}"
    return ""


def table_row(p: Param, note: str = "") -> str:
    """``| name | default | range or choices | description |`` of a parameter, Markdown (``note`` after the
    description)."""
    return f"| `{p.name}` | {_value(p.default)} | {_allowed(p)} | {_cell(p.description)}{note} |"


def cli_option(name: str) -> str:
    """The ``pnv eval`` option of a detector parameter: ``min_score`` -> ``--min-score``."""
    return "--" + name.replace("_", "-")


def markdown() -> str:
    """docs/parameters.md: every parameter of the node, the detector's with their ``pnv eval`` options."""
    out = [
        "# Parameters",
        "",
        "<!-- Generated by `python -m pnv_ros.ros.params --markdown > docs/parameters.md` from the parameter "
        "tables (pnv_ros/ros/params.py; the detector's from DetectorParams in pnv_ros/config.py). "
        "test/test_parameters_doc.py fails when this file is not current. -->",
        "",
        "The loop-closure node's ROS parameters. Set them in a parameters file (`config/params.yaml`), on the "
        "command line (`--ros-args -p name:=value`) or, where changeable, at run time (`ros2 param set`); a "
        "value outside its range or choices is refused with the reason.",
        "",
        "## Detector",
        "",
        "Changeable at run time. `pnv eval` takes the same settings as options of the same names, with the "
        "same defaults and ranges.",
        "",
        "| parameter | `pnv eval` option | default | range or choices | description |",
        "|---|---|---|---|---|",
    ]
    for p in DETECTOR_TABLE:
        old = ", ".join(f"`{o}`" for o in _aliases(p.name))
        opts = f"`{cli_option(p.name)}`" + (f" (older name {old})" if old else "")
        out.append(f"| `{p.name}` | {opts} | {_value(p.default)} | {_allowed(p)} | {_cell(p.description)} |")
    for title, kind in (("Node, set at start (read-only)", "startup"), ("Node, changeable at run time", "node")):
        out += ["", f"## {title}", "", "| parameter | default | range or choices | description |", "|---|---|---|---|"]
        for p in NODE_TABLE:
            if p.kind == kind:
                out.append(table_row(p))
    return "\n".join(out) + "\n"


def _aliases(name: str) -> tuple[str, ...]:
    """Older ``pnv eval`` spellings of a detector option (DetectorParams' ``aliases`` metadata), kept working."""
    return next(tuple(f.metadata["aliases"]) for f in fields(DetectorParams) if f.name == name)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pnv_ros.ros.params", description="the node's parameter reference")
    ap.add_argument("--markdown", action="store_true", help="print docs/parameters.md")
    args = ap.parse_args(argv)
    if not args.markdown:
        ap.error("nothing to do: give --markdown")
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
