"""Every import points down: each pnv_ros module sits in a layer (LAYERS, one line per module; docs/architecture.md
draws the same table) and imports only modules of its own layer or below. Function-level imports count (the AST
is walked whole, ``if TYPE_CHECKING:`` blocks included), so a circle cannot hide in a function body. Within a
layer the imports form no circle either. Nothing below the ROS layer imports pnv_ros.ros, the generated
interfaces (pnv_ros.msg / pnv_ros.srv) or rclpy. Pure AST: nothing is imported, no torch, no ROS.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "pnv_ros"

#: Layers, bottom to top. A module name ending in ".*" covers a package's modules (and the package itself) that
#: have no line of their own; the longest match wins. Every module must match a line.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundation",
        [
            "pnv_ros",  # the package: version only
            "pnv_ros.errors",  # the error hierarchy
            "pnv_ros.storage",  # atomic files, hashes, times
            "pnv_ros.config",  # presets, detector settings, engine and precision names (torch-free)
            "pnv_ros.engines.spec",  # engine names, RuntimeSpec, the identity tag (torch-free)
            "pnv_ros.geometry",  # relative pose from matched keypoints
            "pnv_ros.camera_model",  # camera_info's K, D, model and size: undistortion, rays
            "pnv_ros.trajectory",  # stamped poses, the odometry drift model, ATE / RPE (evo), loop pose errors
            "pnv_ros.index",  # the FAISS global index
            "pnv_ros.products",  # matrix-product precision: where bfloat16 products are fast
            "pnv_ros.eval.ground_truth",  # ground-truth files and tolerances (pure)
            "pnv_ros.eval.metrics",  # recall and precision (pure)
            "pnv_ros.fleet",  # the fleet store's package (docstring only)
            "pnv_ros.fleet.schema",  # the fleet store's versioned tables (PostgreSQL + pgvector DDL)
            "pnv_ros.fleet.server",  # a local PostgreSQL + pgvector, unprivileged, Unix socket only
        ],
    ),
    (
        "data",
        [
            "pnv_ros.images",  # decoding images of any depth
            "pnv_ros.image_msgs",  # sensor_msgs/Image fields to arrays (no ROS import)
            "pnv_ros.tum",  # TUM RGB-D folders (rgb.txt, depth.txt, associations) and trajectory files
            "pnv_ros.bags",  # ROS 1 / ROS 2 bags through rosbags (no ROS install)
            "pnv_ros.features",  # PlaceFeatures, FeatureSet and their files
            "pnv_ros.patch_selection",  # keeping an image's most distinctive patches (Preset.patch_keep)
            "pnv_ros.matching",  # patch matching and re-ranking
            "pnv_ros.local_features",  # SIFT keypoints, rays and depth points of a keyframe
            "pnv_ros.loop_pose",  # a loop's relative pose from local features (METRIC with depth)
            "pnv_ros.pose_graph",  # the reference GTSAM backend: keyframes, odometry and loop factors, iSAM2
            "pnv_ros.retrieval",  # global retrieval then re-ranking
            "pnv_ros.place_map",  # the keyframe map and its file
            "pnv_ros.fleet.store",  # FleetStore: many robots' keyframes in PostgreSQL + pgvector
            "pnv_ros.fleet.outbox",  # the outbox: a robot's keyframes to the fleet store in a thread, never blocking
            "pnv_ros.fleet.member",  # FleetMember: a robot's uploads and fleet queries (with a deadline)
            "pnv_ros.viz",  # match images
        ],
    ),
    (
        "preprocess",
        [
            "pnv_ros.preprocess",  # the network input: input_transform, ImageNet mean/std, fit_tensor
        ],
    ),
    (
        "model parts",
        [
            "pnv_ros.model.backbone",  # VGG-16 to conv5_3 and its blocked CPU path
            "pnv_ros.model.netvlad",  # NetVLAD pooling, patch descriptors, WPCA: PatchNetVLADModel
            "pnv_ros.model.model_file",  # ModelInfo, safe reading, the authors' VGG-16 format, saving
            "pnv_ros.model.registry",  # the model cache, official downloads, pinned wheels
            "pnv_ros.model.dinov2",  # the DINOv2 ViT-S/14 from its pinned ONNX
        ],
    ),
    (
        "fitting",
        [
            "pnv_ros.model.fitting",  # k-means, VLAD and WPCA fitting for any backbone; the fitting set
        ],
    ),
    (
        "families",
        [
            "pnv_ros.model.default_model",  # the VGG-16 family's offline build (the default model)
            "pnv_ros.model.dinov2_vlad",  # the DINOv2 family: model class, file format, build
        ],
    ),
    (
        "model",
        [
            "pnv_ros.model.families",  # the family table: file ownership, stride, fitting input
            "pnv_ros.model.checkpoint",  # load_checkpoint / checkpoint_info through the table
            "pnv_ros.model",  # the package (PEP 562: names load on first use)
            "pnv_ros.model.refit",  # refit a model's vocabulary on the user's images
        ],
    ),
    (
        "engines",
        [
            "pnv_ros.engines.backends",  # what runs where; the onnxruntime / OpenVINO / TensorRT backbones
            "pnv_ros.engines.build",  # ONNX export, int8 calibration, TensorRT plans, the cache, load_engine
            "pnv_ros.engines",  # the package (PEP 562)
        ],
    ),
    (
        "extract",
        [
            "pnv_ros.extract",  # FeatureExtractor and open_extractor
        ],
    ),
    (
        "applications",
        [
            "pnv_ros.export",  # pnv export: the backbone ONNX checked against torch
            "pnv_ros.detector",  # LoopClosureDetector
            "pnv_ros.bench",  # pnv bench timings
        ],
    ),
    (
        "ros",
        [
            "pnv_ros.ros.*",  # the node and its parts (the only rclpy users with eval.replay)
            "pnv_ros.msg.*",  # generated interfaces
            "pnv_ros.srv.*",
        ],
    ),
    (
        "tools",
        [
            "pnv_ros.eval.*",  # replay through the node, reports
            "pnv_ros.training.*",  # training and its data
        ],
    ),
    (
        "cli",
        [
            "pnv_ros.cli.*",  # pnv: imports anything, lazily (it is the top)
        ],
    ),
]

#: Imports that point up on purpose: (importer, imported). None: the CLI is the top layer, so its deliberate
#: lazy imports point down, and the PEP 562 loaders of pnv_ros.model and pnv_ros.engines import their own
#: submodules through importlib (no import statement).
ALLOWED_UPWARD: set[tuple[str, str]] = set()

#: The layer at and above which ROS may be imported.
ROS_LAYER = "ros"
ROS_NAMES = ("pnv_ros.ros", "pnv_ros.msg", "pnv_ros.srv", "rclpy")


def _layer_index() -> dict[str, int]:
    return {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> int | None:
    """The layer number of a module: its own line, else the longest ``pkg.*`` line that covers it."""
    table = _layer_index()
    if module in table:
        return table[module]
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n]) + ".*"
        if key in table:
            return table[key]
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``module`` imports (anywhere in the file), resolved: ``from pkg import sub`` names the
    submodule when ``pkg.sub`` is a module, else the package."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in _modules() if layer_of(m) is None)
    assert not missing, f"give these modules a line in LAYERS (and docs/architecture.md): {missing}"


def test_table_lines_name_real_modules() -> None:
    mods = _modules()
    stale = [n for n in _layer_index() if not n.endswith(".*") and n not in mods]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_every_import_points_down() -> None:
    upward = []
    for module, imported in _graph().items():
        mine = layer_of(module)
        assert mine is not None
        for target in sorted(imported):
            if not (target == "pnv_ros" or target.startswith("pnv_ros.")) or (module, target) in ALLOWED_UPWARD:
                continue
            theirs = layer_of(target)
            if theirs is None or theirs > mine:
                up = "?" if theirs is None else LAYERS[theirs][0]
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({up})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    graph = {m: {t for t in ts if layer_of(t) is not None and t in _modules() and t != m} for m, ts in _graph().items()}
    # a package's __init__ may name its own modules (lazy loaders); a circle is between distinct modules
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


def test_the_core_imports_no_ros() -> None:
    ros = next(i for i, (name, _) in enumerate(LAYERS) if name == ROS_LAYER)
    bad = [
        f"{module} imports {target}"
        for module, imported in _graph().items()
        if (layer_of(module) or 0) < ros
        for target in imported
        if any(target == n or target.startswith(n + ".") for n in ROS_NAMES)
    ]
    assert not bad, "the core (below the ROS layer) must run without ROS:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    """The walk finds imports inside functions and TYPE_CHECKING blocks, and resolves relative ones."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pnv_ros.extract import X\n"
        "def f():\n    from pnv_ros.model import checkpoint\n    import pnv_ros.cli\n"
    )
    found = _imports("pnv_ros.model.fitting", src, set(_modules()))
    assert {"pnv_ros.extract", "pnv_ros.model.checkpoint", "pnv_ros.cli"} <= found
    assert layer_of("pnv_ros.extract") > layer_of("pnv_ros.model.fitting")


#: The size rules of the house (issue 27): the node wires ROS only and each CLI module holds one command group.
MAX_MODULE_LINES = {"pnv_ros/ros/node.py": 400, "pnv_ros/cli/*.py": 400}
MAX_FUNCTION_LINES = 120  # outside tests


def test_node_and_cli_modules_and_functions_stay_small() -> None:
    """node.py and each cli module under 400 lines; no function (methods and nested ones included) over 120
    lines in pnv_ros/, benchmarks/ or scripts/."""
    for pattern, limit in MAX_MODULE_LINES.items():
        paths = sorted(REPO.glob(pattern))
        assert paths, pattern
        for p in paths:
            n = len(p.read_text().splitlines())
            assert n < limit, f"{p.relative_to(REPO)}: {n} lines (limit {limit})"
    long = []
    for root in ("pnv_ros", "benchmarks", "scripts"):
        for p in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text(), str(p))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
