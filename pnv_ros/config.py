"""Presets: the reference's performance / speed / storage settings.

A :class:`Preset` holds everything that shapes extraction and matching except
the descriptor dimension, which always comes from the checkpoint (any preset
runs with any checkpoint, as in the reference). Presets are frozen; derive a
variant with :func:`dataclasses.replace` or :func:`load_preset` with an
override file (TOML, JSON, or the reference's own ``.ini``).
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from pnv_ros.errors import ConfigError

#: VGG-16 conv5_3 has four 2x2 max-pools before it: one feature per 16 pixels.
BACKBONE_STRIDE = 16


@dataclass(frozen=True)
class BackboneGeometry:
    """Where a backbone's feature cells sit in the network input.

    stride: input pixels per feature cell; rf_size, rf_padding: the receptive field of one cell
    (cell c sees pixels stride*c - rf_padding .. + rf_size - 1), which places patch keypoints;
    channels: feature channels.
    """

    stride: int
    rf_size: int
    rf_padding: int
    channels: int


#: The backbones a preset can describe. vgg16: conv5_3, receptive field 196 px with padding 90 (the
#: reference's keypoint rule). dinov2_vits14: ViT-S/14 tokens, one per 14x14 pixel patch, no overlap.
BACKBONES: dict[str, BackboneGeometry] = {
    "vgg16": BackboneGeometry(stride=BACKBONE_STRIDE, rf_size=196, rf_padding=90, channels=512),
    "dinov2_vits14": BackboneGeometry(stride=14, rf_size=14, rf_padding=0, channels=384),
}


#: Inference engines and precisions (:mod:`pnv_ros.engines` makes them; here so that a parser needs no torch).
ENGINES = ("torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class Matcher(str, Enum):
    """How two images' patch sets are scored."""

    RANSAC = "ransac"  # homography inliers over mutual matches (performance)
    RAPID = "rapid"  # rapid spatial scoring (speed, storage)

    @classmethod
    def parse(cls, value: str | Matcher) -> Matcher:
        """Accept our names and the reference's (``RANSAC``, ``spatialApproximator``)."""
        if isinstance(value, Matcher):
            return value
        key = str(value).strip().lower()
        aliases = {"ransac": cls.RANSAC, "rapid": cls.RAPID, "spatialapproximator": cls.RAPID}
        if key not in aliases:
            raise ConfigError(f"unknown matcher {value!r}: use 'ransac' or 'rapid'")
        return aliases[key]


@dataclass(frozen=True)
class Preset:
    """Extraction and matching settings.

    Attributes:
        name: preset name, for logs and features files.
        patch_sizes: square patch sizes in feature-map cells (one per scale).
        strides: patch strides in feature-map cells, one per patch size.
        patch_weights: weight of each scale in multi-scale fusion.
        matcher: ransac (performance) or rapid spatial scoring.
        image_height: network input height in pixels (images are resized).
        image_width: network input width in pixels.
        top_n: candidates retrieved by the global stage and re-ranked.
        backbone: the feature grid the patch sizes count in (see :data:`BACKBONES`); set from the
            model by the extractor (a DINOv2 model brings its own backbone and input size).
        global_weight: weight of the global stage in the re-ranking order: the candidates' global
            descriptor distances, z-scored across them as each patch scale's scores are, are added
            to the fused patch score with this weight (:meth:`PatchMatcher.fuse`). 0 (the default)
            is the paper's patch-only order, bit-compatible with the reference; a DINOv2 model
            brings its own measured value (``dinov2_vlad.GLOBAL_WEIGHT``).
        patch_keep: fraction of each scale's patches an image keeps, in (0, 1]: extraction keeps the
            ``ceil(patch_keep * P_s)`` patches :mod:`pnv_ros.patch_selection` chooses (evenly spaced), so maps
            store fewer and re-ranking matches fewer. 1.0 (the default) keeps all, today's features bit for
            bit. Recorded in features and map files with the preset, so files of another fraction are refused.
    """

    name: str
    patch_sizes: tuple[int, ...]
    strides: tuple[int, ...]
    patch_weights: tuple[float, ...]
    matcher: Matcher
    image_height: int = 480
    image_width: int = 640
    top_n: int = 100
    backbone: str = "vgg16"
    global_weight: float = 0.0
    patch_keep: float = 1.0

    def __post_init__(self) -> None:
        validate(self)

    @property
    def geometry(self) -> BackboneGeometry:
        """Stride, receptive field and channels of this preset's backbone."""
        return BACKBONES[self.backbone]

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(h, w) of the backbone's feature map for this input size."""
        stride = self.geometry.stride
        return self.image_height // stride, self.image_width // stride

    def grid_shape(self, scale: int) -> tuple[int, int]:
        """(rows, cols) of the patch grid of scale index ``scale``."""
        h, w = self.feature_shape
        p, s = self.patch_sizes[scale], self.strides[scale]
        return (h - p) // s + 1, (w - p) // s + 1

    def num_patches(self, scale: int) -> int:
        """Number of patches of scale index ``scale`` per image."""
        rows, cols = self.grid_shape(scale)
        return rows * cols

    def kept_patches(self, scale: int) -> int:
        """Patches of scale index ``scale`` an image keeps: ``ceil(patch_keep * num_patches)``, at least 1."""
        return max(1, math.ceil(self.patch_keep * self.num_patches(scale) - 1e-9))

    @property
    def selects_patches(self) -> bool:
        """Whether images keep fewer than all their patches (``patch_keep`` < 1)."""
        return self.patch_keep < 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for features files, maps and run folders)."""
        d = dataclasses.asdict(self)
        d["matcher"] = self.matcher.value
        d["patch_sizes"] = list(self.patch_sizes)
        d["strides"] = list(self.strides)
        d["patch_weights"] = list(self.patch_weights)
        if not self.selects_patches:  # all patches kept: the dict (and files) of presets before the field
            del d["patch_keep"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return _build(d.get("name", "custom"), d)


def validate(p: Preset) -> None:
    """Cross-field checks, with messages that say what to change."""
    if not p.patch_sizes:
        raise ConfigError("patch_sizes is empty: give at least one patch size, e.g. [5]")
    if len(p.strides) != len(p.patch_sizes):
        raise ConfigError(
            f"{len(p.patch_sizes)} patch sizes {list(p.patch_sizes)} but {len(p.strides)} strides "
            f"{list(p.strides)}: give one stride per patch size"
        )
    if len(p.patch_weights) != len(p.patch_sizes):
        raise ConfigError(
            f"{len(p.patch_sizes)} patch sizes but {len(p.patch_weights)} patch weights "
            f"{list(p.patch_weights)}: give one weight per patch size"
        )
    if len(set(p.patch_sizes)) != len(p.patch_sizes):
        raise ConfigError(f"patch sizes {list(p.patch_sizes)} repeat a size: each scale needs its own size")
    if any(s < 1 for s in p.strides):
        raise ConfigError(f"strides {list(p.strides)} must all be >= 1")
    if any(w < 0 for w in p.patch_weights) or sum(p.patch_weights) <= 0:
        raise ConfigError(f"patch weights {list(p.patch_weights)} must be >= 0 with a positive sum")
    if p.backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {p.backbone!r}: use one of {', '.join(BACKBONES)}")
    stride = BACKBONES[p.backbone].stride
    if p.image_height < stride or p.image_width < stride:
        raise ConfigError(
            f"image size {p.image_width}x{p.image_height} is below one backbone cell ({stride} px): "
            f"use at least 160x120"
        )
    if p.top_n < 1:
        raise ConfigError(f"top_n is {p.top_n}: it must be at least 1")
    if not 0.0 <= p.global_weight < float("inf"):
        raise ConfigError(f"global_weight is {p.global_weight}: it must be a finite number >= 0 (0 = patch-only order)")
    if isinstance(p.patch_keep, bool) or not isinstance(p.patch_keep, numbers.Real) or not 0.0 < p.patch_keep <= 1.0:
        raise ConfigError(
            f"patch_keep is {p.patch_keep!r}: it must be a fraction in (0, 1] (1 = keep every patch, 0.5 = half of "
            "them)"
        )
    h, w = p.feature_shape
    for size in p.patch_sizes:
        if size < 1 or size > min(h, w):
            raise ConfigError(
                f"patch size {size} does not fit the {h}x{w} feature map of a "
                f"{p.image_width}x{p.image_height} input: use patch sizes from 1 to {min(h, w)} "
                f"or a larger image size"
            )


PRESETS: dict[str, Preset] = {
    "performance": Preset(
        name="performance",
        patch_sizes=(2, 5, 8),
        strides=(1, 1, 1),
        patch_weights=(0.45, 0.15, 0.40),
        matcher=Matcher.RANSAC,
    ),
    "speed": Preset(name="speed", patch_sizes=(5,), strides=(1,), patch_weights=(1.0,), matcher=Matcher.RAPID),
    "storage": Preset(name="storage", patch_sizes=(5,), strides=(1,), patch_weights=(1.0,), matcher=Matcher.RAPID),
}

#: Descriptor dimension of the authors' checkpoint that goes with each preset.
PRESET_CHECKPOINT_DIM = {"performance": 4096, "speed": 512, "storage": 128}

_FIELDS = {f.name for f in dataclasses.fields(Preset)}


def get_preset(name: str) -> Preset:
    """The named built-in preset; an unknown name lists the valid ones."""
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def _ints(v: Any) -> tuple[int, ...]:
    if isinstance(v, str):
        v = [x for x in v.replace(" ", "").split(",") if x]
    if isinstance(v, (int, float)):
        v = [v]
    return tuple(int(x) for x in v)


def _floats(v: Any) -> tuple[float, ...]:
    if isinstance(v, str):
        v = [x for x in v.replace(" ", "").split(",") if x]
    if isinstance(v, (int, float)):
        v = [v]
    return tuple(float(x) for x in v)


def _build(name: str, values: dict[str, Any], base: Preset | None = None) -> Preset:
    unknown = set(values) - _FIELDS
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)}: valid settings are {sorted(_FIELDS)}")
    merged: dict[str, Any] = dataclasses.asdict(base) if base else {}
    merged.update(values)
    merged["name"] = str(merged.get("name", name))
    try:
        merged["patch_sizes"] = _ints(merged["patch_sizes"])
        merged["strides"] = _ints(merged.get("strides", (1,) * len(merged["patch_sizes"])))
        merged["patch_weights"] = _floats(merged.get("patch_weights", (1.0,) * len(merged["patch_sizes"])))
        merged["matcher"] = Matcher.parse(merged["matcher"])
        for key in ("image_height", "image_width", "top_n"):
            if key in merged:
                merged[key] = int(merged[key])
        for key in ("global_weight", "patch_keep"):
            if key in merged:
                merged[key] = float(merged[key])
    except KeyError as e:
        raise ConfigError(f"setting {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"bad value in settings: {e}") from None
    return Preset(**merged)


def _read_ini(path: Path) -> dict[str, Any]:
    """Map the reference's .ini keys onto ours."""
    cp = configparser.ConfigParser()
    cp.read(path)
    out: dict[str, Any] = {}
    g, fm, fe = "global_params", "feature_match", "feature_extract"
    if cp.has_option(g, "patch_sizes"):
        out["patch_sizes"] = cp.get(g, "patch_sizes")
    if cp.has_option(g, "strides"):
        out["strides"] = cp.get(g, "strides")
    if cp.has_option(fm, "patchweights2use"):
        out["patch_weights"] = cp.get(fm, "patchweights2use")
    if cp.has_option(fm, "matcher"):
        out["matcher"] = cp.get(fm, "matcher")
    for sec in (fe, fm):
        if cp.has_option(sec, "imageresizeh"):
            out["image_height"] = cp.getint(sec, "imageresizeh")
        if cp.has_option(sec, "imageresizew"):
            out["image_width"] = cp.getint(sec, "imageresizew")
    return out


def read_override_file(path: str | Path) -> dict[str, Any]:
    """Read an override file (.toml, .json or the reference's .ini) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".ini":
            return _read_ini(path)
        if suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(path.read_text())
        else:
            raise ConfigError(f"config file {path}: use a .toml, .json or .ini file")
    except (ValueError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config file {path} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return data


def load_preset(name: str = "speed", override: str | Path | dict[str, Any] | None = None) -> Preset:
    """A built-in preset with optional overrides from a file or a dict.

    An override file may name its own base with ``preset = "performance"``.
    """
    values: dict[str, Any] = {}
    if override is not None:
        values = dict(override) if isinstance(override, dict) else read_override_file(override)
    name = str(values.pop("preset", name))
    base = get_preset(name)
    if not values:
        return base
    values.setdefault("name", f"{base.name}+override")
    return _build(base.name, values, base)


def _setting(
    default: Any,
    text: str,
    bounds: tuple[float, float] | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A :class:`DetectorParams` field with its metadata: ``help`` (one line, for the node's parameter
    descriptions, ``pnv eval --help`` and docs/parameters.md), ``range`` ((low, high), inclusive; ints
    for whole numbers; None: not a number), ``choices`` (allowed strings, or None) and ``aliases`` (older
    ``pnv eval`` option names of the setting, kept working)."""
    return field(default=default, metadata={"help": text, "range": bounds, "choices": choices, "aliases": aliases})


@dataclass(frozen=True)
class DetectorParams:
    """Loop-closure settings (the node's parameters and ``pnv eval``'s options of the same names).

    Each field's help, range and choices are its metadata (:func:`dataclasses.fields`): the one source
    from which the node's parameter table (:mod:`pnv_ros.ros.params`), the CLI's option group and
    docs/parameters.md are built. Validated on creation (a value out of range is a ConfigError).

    Why the defaults are what they are:
        min_score 0.12: precision 1.0 on the RTAB-Map loop with the default model (README), a starting
            point for other data.
        exclude_recent_keyframes: with sparse keyframes, time alone would let the previous one or two in.
        min_visual_change 0.2: on the RTAB-Map loop, consecutive frames of a walk 1 s apart change by 0.36
            or more; the same view with pixel noise of sigma 20, a 6 px shake or a 30 % exposure change by
            0.12 at most (benchmarks/visual_change.py).
        min_texture 4.0: two black, white or lens-capped frames scored 0.136 as a loop, above min_score;
            flat frames with sensor noise (sigma 8) measure 0.5 at most; the least textured RTAB-Map
            frames (a blank wall up close) 21.8; the corridor set 52.
        fast_products False: oneDNN's float32-rounding differences from the reference can flip near-tied
            matches (see PatchMatcher).
    """

    top_n: int = _setting(20, "candidates retrieved and re-ranked per keyframe", (1, 1000))
    matcher: str = _setting("", "'' (the preset's), ransac or rapid", choices=("", "ransac", "rapid"))
    min_score: float = _setting(
        0.12, "accept a loop when its absolute score (0..1) is at least this", (0.0, 1.0), aliases=("--threshold",)
    )
    exclude_recent_s: float = _setting(
        10.0,
        "keyframes newer than this (s, session clock) are never candidates",
        (0.0, 1e7),
        aliases=("--exclude-recent",),
    )
    exclude_recent_keyframes: int = _setting(
        10, "the last this-many keyframes of this run are never candidates", (0, 100000)
    )
    min_interval_s: float = _setting(
        0.0, "minimum time between keyframes (s)", (0.0, 3600.0), aliases=("--min-interval",)
    )
    min_travel_m: float = _setting(
        0.5, "with odometry: a keyframe after this much travel (m) ...", (0.0, 1e4), aliases=("--min-travel",)
    )
    min_rotation_rad: float = _setting(0.35, "... or this much rotation (rad) since the last keyframe", (0.0, 7.0))
    min_visual_change: float = _setting(
        0.2,
        "without odometry: a keyframe when the picture changed this much (1 - normalised cross-correlation of "
        "32x24 grey thumbnails, 0..1) since the last keyframe; 0 = every frame",
        (0.0, 1.0),
    )
    min_texture: float = _setting(
        4.0,
        "a frame whose 32x24 grey thumbnail varies less than this (std, grey levels) is never a keyframe "
        "(lens cap, darkness, white-out)",
        (0.0, 128.0),
    )
    temporal_k: int = _setting(
        1, "consecutive consistent keyframes required before a loop is published (1 = off)", (1, 20)
    )
    temporal_tolerance: int = _setting(
        3, "keyframe ids consecutive best matches may move and still be consistent", (0, 1000)
    )
    fast_products: bool = _setting(
        False, "oneDNN similarity products on CPU: faster re-ranking, float32 rounding differs from the reference"
    )

    #: (low, high) of each numeric field, inclusive (from the fields' metadata; set below the class).
    RANGES: ClassVar[dict[str, tuple[float, float]]]

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self.RANGES:
                lo, hi = self.RANGES[f.name]
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= v <= hi:
                    raise ConfigError(f"{f.name} = {v!r}: must be a number from {lo} to {hi}")
                if isinstance(lo, int) and not isinstance(v, numbers.Integral):
                    raise ConfigError(f"{f.name} = {v!r}: must be a whole number")
                object.__setattr__(self, f.name, int(v) if isinstance(lo, int) else float(v))  # numpy scalars too
        if self.matcher:
            Matcher.parse(self.matcher)

    def replace(self, **changes: object) -> DetectorParams:
        """A validated copy with some fields changed; unknown names are a ConfigError."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown detector parameter(s) {sorted(unknown)}")
        return replace(self, **changes)


DetectorParams.RANGES = {f.name: f.metadata["range"] for f in fields(DetectorParams) if f.metadata["range"]}
