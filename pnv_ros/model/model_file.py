"""Model files: what a model is (:class:`ModelInfo`), reading one safely, and the authors' VGG-16 format.

The authors' PCA step saves ``{'num_pcs': int, 'state_dict': {...}}`` with
``torch.save``; their training step adds epoch, recalls and optimizer state,
which are ignored here. Files load with ``torch.load(weights_only=True)``:
nothing but tensors and plain containers is ever unpickled.

This module knows one family's layout (VGG-16 NetVLAD); which family a file is, and opening a file of any
family, is ``model/families.py``'s table (``model/checkpoint.py``: ``load_checkpoint``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pnv_ros.errors import CheckpointError
from pnv_ros.model.backbone import CONV_INDICES, ENCODER_DIM
from pnv_ros.model.netvlad import PatchNetVLADModel
from pnv_ros.storage import file_sha256

#: (in, out) channels of each VGG-16 convolution, in CONV_INDICES order.
_VGG_CHANNELS = (
    (3, 64),
    (64, 64),
    (64, 128),
    (128, 128),
    (128, 256),
    (256, 256),
    (256, 256),
    (256, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
)


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint is: enough to tell two models apart in files and logs."""

    path: str
    sha256: str
    num_clusters: int
    dim: int
    vladv2: bool
    #: the model family: "netvlad_vgg16" (the authors' checkpoints, the offline default) or "dinov2_vlad"
    family: str = "netvlad_vgg16"
    #: the feature grid the model pools (``config.BACKBONES``)
    backbone: str = "vgg16"
    #: (height, width) the model needs its input resized to; None: the preset's
    input_size: tuple[int, int] | None = None
    #: the model's weight of the global distance in the re-ranking order (``Preset.global_weight``); None: the
    #: preset's (the VGG-16 family: 0, the paper's patch-only order)
    global_weight: float | None = None

    @property
    def identity(self) -> str:
        """Short id stored in features and map files: name, dimension, hash prefix."""
        return f"{Path(self.path).name}:{self.dim}:{self.sha256[:12]}"


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """Rename DataParallel keys (``encoder.module.0.weight``) to plain ones."""
    out = {}
    for key, value in state.items():
        key = key.replace(".module.", ".")
        if key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def expected_shapes(num_clusters: int, num_pcs: int, vladv2: bool) -> dict[str, tuple[int, ...]]:
    """Every key a checkpoint must hold, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for idx, (cin, cout) in zip(CONV_INDICES, _VGG_CHANNELS):
        shapes[f"encoder.{idx}.weight"] = (cout, cin, 3, 3)
        shapes[f"encoder.{idx}.bias"] = (cout,)
    shapes["pool.centroids"] = (num_clusters, ENCODER_DIM)
    shapes["pool.conv.weight"] = (num_clusters, ENCODER_DIM, 1, 1)
    if vladv2:
        shapes["pool.conv.bias"] = (num_clusters,)
    if num_pcs > 0:
        shapes["WPCA.0.weight"] = (num_pcs, num_clusters * ENCODER_DIM, 1, 1)
        shapes["WPCA.0.bias"] = (num_pcs,)
    return shapes


def read_raw(path: Path) -> dict[str, Any]:
    """The dict a checkpoint file holds, read with ``torch.load(weights_only=True)``; CheckpointError when the file
    is missing, unsafe or unreadable, or holds something else."""
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist: run 'pnv models list' for the official ones "
            f"or 'pnv models build-default' for the offline default"
        )
    # Training checkpoints may hold numpy scalars (best_score); allow just those.
    safe = [np.dtype, np.float64, np.float32, np.int64]
    try:
        safe.append(np._core.multiarray.scalar)  # numpy >= 2
    except AttributeError:  # pragma: no cover
        safe.append(np.core.multiarray.scalar)
    for dt in ("Float64DType", "Float32DType", "Int64DType"):
        if hasattr(np.dtypes, dt):
            safe.append(getattr(np.dtypes, dt))
    try:
        with torch.serialization.safe_globals(safe):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {msg}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(raw).__name__}, not a dict with 'state_dict'")
    return raw


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], int, int, bool]:
    """Read and check a checkpoint's state dict (the VGG-16 NetVLAD family).

    Returns (state_dict, num_clusters, num_pcs, vladv2); num_pcs is 0 when the
    file has no WPCA layer. Raises CheckpointError naming the first bad key.
    """
    path = Path(path)
    return vgg_state(read_raw(path), path)


def vgg_state(raw: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], int, int, bool]:
    """:func:`read_state_dict` of a dict already read (``read_raw``)."""
    if raw.get("family") not in (None, "netvlad_vgg16"):
        raise CheckpointError(
            f"checkpoint {path} is of the {raw.get('family')!r} family, not a VGG-16 NetVLAD checkpoint"
        )
    state = raw.get("state_dict", raw if "pool.centroids" in raw else None)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} has no 'state_dict' entry (keys: {sorted(raw)[:8]})")
    state = _strip_wrappers(state)
    for key in ("pool.centroids",):
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: missing key {key!r}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: key {key!r} is a {type(value).__name__}, not a tensor")
    num_clusters = int(state["pool.centroids"].shape[0])
    num_pcs = int(state["WPCA.0.bias"].shape[0]) if "WPCA.0.bias" in state else 0
    vladv2 = "pool.conv.bias" in state
    if "num_pcs" in raw and num_pcs and int(raw["num_pcs"]) != num_pcs:
        raise CheckpointError(
            f"checkpoint {path}: 'num_pcs' says {int(raw['num_pcs'])} but WPCA.0.bias has {num_pcs} values"
        )
    shapes = expected_shapes(num_clusters, num_pcs, vladv2)
    for key, shape in shapes.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: missing key {key!r} (expected shape {list(shape)})")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"checkpoint {path}: key {key!r} has shape {list(state[key].shape)}, expected {list(shape)}"
            )
        if not torch.isfinite(state[key]).all():
            raise CheckpointError(f"checkpoint {path}: key {key!r} holds NaN or infinite values")
    unexpected = sorted(set(state) - set(shapes))
    if unexpected:
        raise CheckpointError(f"checkpoint {path}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all)")
    return {k: state[k].float() for k in shapes}, num_clusters, num_pcs, vladv2


def vgg_info(path: str | Path, num_clusters: int, dim: int, vladv2: bool) -> ModelInfo:
    """The identity of a VGG-16 NetVLAD file (its hash read from disk)."""
    return ModelInfo(path=str(path), sha256=file_sha256(path), num_clusters=num_clusters, dim=dim, vladv2=vladv2)


def vgg_model(state: dict[str, torch.Tensor], num_clusters: int, num_pcs: int, vladv2: bool) -> PatchNetVLADModel:
    """A VGG-16 NetVLAD model holding a checked state dict (:func:`read_state_dict`), in eval mode on the CPU."""
    model = PatchNetVLADModel(num_clusters=num_clusters, num_pcs=num_pcs, vladv2=vladv2)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path, num_pcs: int) -> None:
    """Write ``{'num_pcs', 'state_dict'}`` as the authors' PCA step does, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        # Through a file object: the zip's inner folder is then "archive", not the random temp file's name,
        # so the same state dict gives the same bytes.
        with open(fd, "wb") as f:
            torch.save({"num_pcs": int(num_pcs), "state_dict": {k: v.contiguous() for k, v in state_dict.items()}}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
