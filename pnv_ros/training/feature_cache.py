"""The frozen part of the backbone, run once per training image and memory-mapped.

``pnv train`` trains only what comes after a frozen prefix of the network: the NetVLAD layer
(``layers="netvlad"``: the whole VGG-16 encoder frozen, conv5_3 maps cached) or conv5_1-conv5_3
and the NetVLAD layer (``layers="conv5"``: the authors' freezing in ``get_backend``, everything up to
pool4 frozen, pool4 maps cached). With no data augmentation (the authors use none) the frozen
layers give the same output every epoch, so computing them once is exact, and on a CPU it is what
makes training feasible: the frozen prefix is ~90% of VGG-16's arithmetic.

Both maps are (512, 30, 40) for the 480 x 640 training input (the authors' ``imageresizeh/w``).
They are stored as float16 in a ``.npy`` file (memory-mapped: 1.2 MB per image, so a long bag
fits on disk, not in memory) under a key made of the model's weights, the frozen prefix and the
images, so a resumed run or a second run on the same data reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pnv_ros.errors import ConfigError, ImageError
from pnv_ros.model.netvlad import PatchNetVLADModel

#: trainable layer sets: what follows the cached prefix
LAYERS = ("netvlad", "conv5")
#: ``vgg16().features`` index of conv5_1: the authors train from here on (``get_backend``: ``layers[:-5]`` frozen)
CONV5_START = 24
STORE_DTYPE = np.float16


def trainable_head(model: PatchNetVLADModel, layers: str) -> nn.Module | None:
    """The trainable encoder layers after the cached prefix: conv5_1..conv5_3 (sharing ``model``'s
    parameters) for ``layers="conv5"``, None for ``"netvlad"``. ConfigError for an unknown choice or for
    conv5 on a model that is not VGG-16."""
    if layers not in LAYERS:
        raise ConfigError(f"trainable layers {layers!r}: choose one of {', '.join(LAYERS)}")
    if layers == "netvlad":
        return None
    if model.backbone_name != "vgg16":
        raise ConfigError(
            f"--layers conv5 trains VGG-16's conv5 block; this model's backbone is frozen "
            f"({model.backbone_name}): use --layers netvlad"
        )
    return nn.Sequential(*list(model.encoder.children())[CONV5_START:])


def frozen_prefix(model: PatchNetVLADModel, layers: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, H, W) input -> (B, C, h, w) maps of the frozen prefix, without gradients (the blocked CPU
    path where it applies: same values, sooner)."""
    from pnv_ros.model.backbone import BlockedBackbone

    if trainable_head(model, layers) is None:
        return model.backbone
    prefix = nn.Sequential(*list(model.encoder.children())[:CONV5_START])
    blocked: list[BlockedBackbone | None] = [None]

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and BlockedBackbone.available():
            blocked[0] = BlockedBackbone.for_module(prefix, blocked[0])
            return blocked[0](x)
        return prefix(x)

    return run


@dataclass
class FeatureCache:
    """maps: (N, C, h, w) float16, memory-mapped; valid: (N,) bool (False: the image could not be decoded or
    its maps do not fit float16; ``errors`` says why, by index)."""

    path: Path
    maps: np.ndarray
    valid: np.ndarray
    errors: dict[int, str]

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def get(self, index: Sequence[int] | np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        """(n, C, h, w) float32 maps of these images."""
        idx = np.asarray(index, dtype=np.int64)
        return torch.from_numpy(np.asarray(self.maps[idx], dtype=np.float32)).to(device)


def cache_key(model_identity: str, layers: str, image_ids: Iterable[str]) -> str:
    h = hashlib.sha256(json.dumps([model_identity, layers, CONV5_START, str(STORE_DTYPE)]).encode())
    for s in image_ids:
        h.update(s.encode() + b"\0")
    return h.hexdigest()[:20]


def build_cache(
    images: Iterable[Any],
    count: int,
    folder: Path,
    key: str,
    prefix: Callable[[torch.Tensor], torch.Tensor],
    to_tensor: Callable[[Any], torch.Tensor],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureCache:
    """The frozen maps of ``count`` images (paths, arrays, or Undecodable markers), computed now or found
    under ``folder`` by ``key``. Written atomically: an interrupted run leaves neither a cache nor a temp
    file. An image that cannot be decoded is marked invalid, not fatal."""
    folder.mkdir(parents=True, exist_ok=True)
    path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        maps = np.load(path, mmap_mode="r")
        if maps.shape[0] == count:
            errors = {int(k): v for k, v in meta["errors"].items()}
            valid = np.ones(count, dtype=bool)
            valid[list(errors)] = False
            if progress:
                progress(count, count)
            return FeatureCache(path, maps, valid, errors)
    tmp = folder / f".{key}.npy.tmp"
    try:
        return _compute(images, count, path, meta_path, tmp, prefix, to_tensor, progress)
    except BaseException:  # an interrupted or failed build leaves no 1.2 MB-per-image temp file behind
        tmp.unlink(missing_ok=True)
        raise


def _compute(
    images: Iterable[Any],
    count: int,
    path: Path,
    meta_path: Path,
    tmp: Path,
    prefix: Callable[[torch.Tensor], torch.Tensor],
    to_tensor: Callable[[Any], torch.Tensor],
    progress: Callable[[int, int], None] | None,
) -> FeatureCache:
    maps = None
    errors: dict[int, str] = {}
    with torch.inference_mode():
        for i, img in enumerate(images):
            if i >= count:
                break
            try:
                fm = prefix(to_tensor(img))[0].float().numpy()
            except ImageError as e:
                errors[i] = str(e)
                fm = None
            if fm is not None and not np.isfinite(fm.astype(STORE_DTYPE)).all():
                errors[i] = "its feature maps overflow float16"
                fm = None
            if maps is None and fm is not None:
                maps = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORE_DTYPE, shape=(count, *fm.shape))
                for j in errors:
                    maps[j] = 0
            if fm is not None and maps is not None:
                maps[i] = fm
            if progress:
                progress(i + 1, count)
    if maps is None:
        first = next(iter(errors.values()), "")
        raise ImageError(f"none of the {count} training images can be decoded; the first: {first}")
    maps.flush()
    del maps
    tmp.replace(path)
    meta_path.write_text(json.dumps({"count": count, "errors": {str(k): v for k, v in errors.items()}}))
    valid = np.ones(count, dtype=bool)
    valid[list(errors)] = False
    return FeatureCache(path, np.load(path, mmap_mode="r"), valid, errors)
