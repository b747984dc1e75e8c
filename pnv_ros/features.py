"""Place features: what extraction produces and matching consumes.

:class:`PlaceFeatures` is one image's global descriptor and per-scale patch
descriptors; :class:`FeatureSet` is many images' worth, stored as an ``.npz``
(never pickled) with the preset and model identity, so that files made with
another preset or model are refused rather than silently mis-matched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pnv_ros.config import Preset
from pnv_ros.errors import FeaturesError
from pnv_ros.local_features import LocalFeatures
from pnv_ros.storage import read_npz, write_npz_atomic

FORMAT = "pnv_ros.features"
FORMAT_VERSION = 1


def patch_grid(preset: Preset, scale: int) -> np.ndarray:
    """Feature-space index (col, row) of every patch of one scale.

    Returns (P, 2) int64, row-major over the patch grid, as the reference's
    ``indices`` used by rapid spatial scoring.
    """
    rows, cols = preset.grid_shape(scale)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([c.ravel(), r.ravel()], axis=1).astype(np.int64)


def patch_keypoints(preset: Preset, scale: int) -> np.ndarray:
    """Patch centres in network-input pixels, as the reference computes them.

    Returns (P, 2) int64 (x, y): the middle of the receptive-field boxes of
    the patch's first and last cell, truncated (VGG-16: x = 16c + 39 for p = 5;
    DINOv2 tokens: the middle of the window, x = 14c + 34 for p = 5).
    """
    p, s = preset.patch_sizes[scale], preset.strides[scale]
    g = preset.geometry
    grid = patch_grid(preset, scale) * s  # top-left cell of each patch
    lo = g.stride * grid - g.rf_padding
    hi = g.stride * (grid + p - 1) - g.rf_padding + g.rf_size - 1
    return np.trunc((lo + hi) / 2.0).astype(np.int64)


def to_image_pixels(keypoints: np.ndarray, preset: Preset, image_size: tuple[int, int]) -> np.ndarray:
    """Network-input keypoints (P, 2) to the original image's pixels (P, 2) float32.

    image_size: (width, height) of the original image.
    """
    sx = image_size[0] / preset.image_width
    sy = image_size[1] / preset.image_height
    return (keypoints.astype(np.float32) + 0.5) * np.array([sx, sy], np.float32) - 0.5


def same_model(a: str, b: str) -> bool:
    """Whether two model identities (``name:dim:sha256-prefix``) name the same weights.

    The file name does not count (a renamed copy is the same model); an empty
    identity (unknown) matches anything.
    """
    if not a or not b:
        return True
    return a.split(":")[-2:] == b.split(":")[-2:]


def layout(preset: Preset) -> tuple:
    """What of a preset shapes stored descriptors: patch sizes, strides, input size, backbone, kept fraction."""
    return (
        tuple(preset.patch_sizes),
        tuple(preset.strides),
        preset.image_width,
        preset.image_height,
        preset.backbone,
        preset.patch_keep,
    )


def describe_layout(preset: Preset) -> str:
    keep = f", keeping {preset.patch_keep:g} of the patches" if preset.selects_patches else ""
    return (
        f"preset {preset.name!r} (patch sizes {list(preset.patch_sizes)}, strides {list(preset.strides)}, "
        f"{preset.image_width}x{preset.image_height}, {preset.backbone} features{keep})"
    )


def grid_indices(patch_index: list[np.ndarray] | None, scale: int, count: int) -> np.ndarray:
    """Grid indices (count,) of an image's stored patches of one scale: its ``patch_index[scale]``, or
    0..count-1 when it keeps every patch (``patch_index`` None)."""
    return np.arange(count) if patch_index is None else np.asarray(patch_index[scale])


def check_patch_index(patch_index: list[np.ndarray] | None, preset: Preset, what: str, n: int | None = None) -> None:
    """Raise FeaturesError unless ``patch_index`` fits the preset: None when it keeps every patch; else per
    scale ((n,) +) (kept_patches(s),) integers, strictly increasing, within the grid."""
    if not preset.selects_patches:
        if patch_index is not None:
            raise FeaturesError(f"{what} has patch indices but its preset keeps every patch")
        return
    if patch_index is None or len(patch_index) != len(preset.patch_sizes):
        raise FeaturesError(f"{what} lacks the patch indices of its selected patches (preset patch_keep < 1)")
    for s, idx in enumerate(patch_index):
        idx = np.asarray(idx)
        want = (preset.kept_patches(s),) if n is None else (n, preset.kept_patches(s))
        if idx.shape != want or idx.dtype.kind not in "iu":
            raise FeaturesError(f"{what}: patch indices of scale {s} are {idx.dtype} {idx.shape}, expected int {want}")
        if idx.size and (
            idx.min() < 0 or idx.max() >= preset.num_patches(s) or (np.diff(idx.astype(np.int64), axis=-1) <= 0).any()
        ):
            raise FeaturesError(
                f"{what}: patch indices of scale {s} must increase strictly within 0..{preset.num_patches(s) - 1}"
            )


def check_fits(
    error: type[FeaturesError] | type,
    what: str,
    model_id: str,
    dim: int,
    preset: Preset,
    want_model_id: str,
    want_dim: int,
    want_preset: Preset,
    advice: str,
) -> None:
    """Raise ``error`` naming both sides when stored descriptors come from another model or layout."""
    if dim != want_dim or not same_model(model_id, want_model_id):
        rebuilt, name = "", model_id.split(":")[0]
        if name == want_model_id.split(":")[0] and dim == want_dim:
            rebuilt = (
                f" (two builds of {name} with different weights: an offline-built model depends "
                "on the CPU that built it, so take the model file that made this one, with its .json, and run "
                "with --checkpoint FILE / checkpoint:=FILE)"
            )
        raise error(
            f"{what} comes from model {model_id or '?'} ({dim}-d), but this one runs {want_model_id or '?'} "
            f"({want_dim}-d): {advice}{rebuilt}"
        )
    if layout(preset) != layout(want_preset):
        raise error(
            f"{what} was made with {describe_layout(preset)}, but this one runs {describe_layout(want_preset)}: "
            + advice
        )


@dataclass
class PlaceFeatures:
    """One image's descriptors.

    Attributes:
        global_desc: (D,) float32, unit length.
        patches: per scale, (P_s, D) float32 unit rows, row-major patch order.
        image_size: (width, height) of the original image.
        local: the image's local features (SIFT keypoints, rays, depth points) for the relative pose of
            its loops (:mod:`pnv_ros.local_features`), or None. Stored with a keyframe in the map; feature
            files (:class:`FeatureSet`) do not keep them.
        patch_index: per scale, (P'_s,) int16 grid indices (into :func:`patch_grid`'s rows, ascending) of
            the patches kept by patch selection (``Preset.patch_keep`` < 1, :mod:`pnv_ros.patch_selection`);
            None when every patch is kept (row i is grid patch i).
    """

    global_desc: np.ndarray
    patches: list[np.ndarray]
    image_size: tuple[int, int]
    local: LocalFeatures | None = None
    patch_index: list[np.ndarray] | None = None

    def grid_index(self, scale: int) -> np.ndarray:
        """(P'_s,) grid indices of this image's stored patches of one scale."""
        return grid_indices(self.patch_index, scale, len(self.patches[scale]))

    def keypoints(self, preset: Preset) -> list[np.ndarray]:
        """Per scale, patch centres (P'_s, 2) of the stored patches in this image's original pixels."""
        return [
            to_image_pixels(patch_keypoints(preset, i)[self.grid_index(i)], preset, self.image_size)
            for i in range(len(self.patches))
        ]


@dataclass
class FeatureSet:
    """Features of many images, as written by ``pnv extract``.

    Attributes:
        names: unique image identities (paths relative to the inputs' common folder, see
            ``extract.image_identities``), in input order. Files written before names were unique
            (by file stem) still load unless two names repeat: then FeaturesError (re-extract).
        global_descs: (N, D) float32.
        patches: per scale, (N, P_s, D) float32 (or float16).
        image_sizes: (N, 2) int (width, height) of the original images.
        preset: the preset the patches were extracted with.
        model_id: identity of the checkpoint (name:dim:sha256 prefix).
        patch_index: per scale, (N, P'_s) int16 grid indices of the kept patches (``preset.patch_keep``
            < 1), or None when every image keeps every patch. Stored as ``patch_index_p{size}``.
    """

    names: list[str]
    global_descs: np.ndarray
    patches: list[np.ndarray]
    image_sizes: np.ndarray
    preset: Preset
    model_id: str
    patch_index: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        seen: set[str] = set()
        repeated = [n for n in self.names if n in seen or seen.add(n)]
        if repeated:
            raise FeaturesError(
                f"image names repeat ({', '.join(sorted(set(repeated))[:3])}): results could not say which image "
                f"was retrieved; re-extract with this version of pnv, which names images by relative path"
            )

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.global_descs.shape[1])

    def item(self, i: int) -> PlaceFeatures:
        """Image i as PlaceFeatures."""
        w, h = (int(v) for v in self.image_sizes[i])
        idx = None if self.patch_index is None else [a[i] for a in self.patch_index]
        return PlaceFeatures(self.global_descs[i], [p[i] for p in self.patches], (w, h), patch_index=idx)

    @classmethod
    def from_places(cls, names: list[str], places: list[PlaceFeatures], preset: Preset, model_id: str) -> FeatureSet:
        if not places:
            raise FeaturesError("no features to collect")
        index = None
        if preset.selects_patches:
            for p in places:
                check_patch_index(p.patch_index, preset, "an image's features")
            index = [np.stack([p.patch_index[s] for p in places]) for s in range(len(preset.patch_sizes))]
        return cls(
            names=list(names),
            global_descs=np.stack([p.global_desc for p in places]).astype(np.float32),
            patches=[np.stack([p.patches[s] for p in places]) for s in range(len(preset.patch_sizes))],
            image_sizes=np.array([p.image_size for p in places], dtype=np.int64),
            preset=preset,
            model_id=model_id,
            patch_index=index,
        )

    def save(self, path: str | Path) -> None:
        """Write the .npz atomically (temp file, then rename)."""
        path = Path(path)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "preset": self.preset.to_dict(),
            "model_id": self.model_id,
            "dim": self.dim,
        }
        arrays: dict[str, Any] = {
            "names": np.array(self.names, dtype=np.str_),
            "global": self.global_descs.astype(np.float32),
            "image_sizes": self.image_sizes.astype(np.int64),
            "meta": np.array(json.dumps(meta)),
        }
        for s, size in enumerate(self.preset.patch_sizes):
            arrays[f"patches_p{size}"] = self.patches[s]
            arrays[f"keypoints_p{size}"] = patch_keypoints(self.preset, s)
            if self.patch_index is not None:
                arrays[f"patch_index_p{size}"] = np.asarray(self.patch_index[s], np.int16)
        write_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        """Read a features file, checking its format and internal consistency."""
        path = Path(path)
        data, meta = read_npz(path, FeaturesError, "features file")
        try:
            if meta.get("format") != FORMAT:
                raise FeaturesError(f"features file {path} is not a pnv_ros features file")
            if meta.get("version") != FORMAT_VERSION:
                raise FeaturesError(
                    f"features file {path} has format version {meta.get('version')}, this pnv_ros reads "
                    f"version {FORMAT_VERSION}: extract the features again"
                )
            preset = Preset.from_dict(meta["preset"])
            names = [str(n) for n in data["names"]]
            glob = data["global"]
            patches = [data[f"patches_p{s}"] for s in preset.patch_sizes]
            index = [data[f"patch_index_p{s}"] for s in preset.patch_sizes] if preset.selects_patches else None
            sizes = data["image_sizes"]
        except KeyError as e:
            raise FeaturesError(f"features file {path} lacks entry {e.args[0]!r}") from None
        except (ValueError, TypeError) as e:
            if isinstance(e, FeaturesError):
                raise
            raise FeaturesError(f"features file {path} has a bad 'meta' entry: {e}") from None
        n, d = len(names), glob.shape[1] if glob.ndim == 2 else -1
        if glob.shape != (n, d) or d != meta.get("dim") or sizes.shape != (n, 2):
            raise FeaturesError(f"features file {path}: global descriptors {glob.shape} do not fit {n} names")
        for s, arr in enumerate(patches):
            want = (n, preset.kept_patches(s), d)
            if arr.shape != want:
                raise FeaturesError(
                    f"features file {path}: patches_p{preset.patch_sizes[s]} has shape {arr.shape}, expected {want}"
                )
        check_patch_index(index, preset, f"features file {path}", n)
        try:
            return cls(names, glob.astype(np.float32), patches, sizes, preset, str(meta.get("model_id", "")), index)
        except FeaturesError as e:
            raise FeaturesError(f"features file {path}: {e}") from None

    def check_compatible(self, other: FeatureSet, what: str = "database", other_what: str = "queries") -> None:
        """Refuse to match files from different models (families included) or presets."""
        if self.dim != other.dim or not same_model(self.model_id, other.model_id):
            raise FeaturesError(
                f"{what} features come from model {self.model_id!r} ({self.dim}-d) but {other_what} from "
                f"{other.model_id!r} ({other.dim}-d): extract both with the same checkpoint"
            )
        if layout(self.preset) != layout(other.preset):
            raise FeaturesError(
                f"{what} features were extracted with {describe_layout(self.preset)} but {other_what} with "
                f"{describe_layout(other.preset)}: extract both with the same preset"
            )

    def check_preset(self, preset: Preset, what: str = "features") -> None:
        """Refuse a preset whose patch layout differs from the file's."""
        if layout(preset) != layout(self.preset):
            raise FeaturesError(
                f"{what} were extracted with {describe_layout(self.preset)} and cannot be matched with "
                f"{describe_layout(preset)}: extract again with --preset {preset.name} or match with --preset "
                f"{self.preset.name}"
            )
