"""The model families, in one table: which family a model file or a model is, and how to open it.

As LightGlue's ``features`` dict or hloc's ``dynamic_load``: everything that differs between families and
is needed above the model layer (opening a file, the feature grid's stride, whether int8 quantises matrix
products or convolutions, the fitting input) is a field of :class:`Family`, looked up by name
(:data:`FAMILIES`), by file (:func:`family_of_file`) or by model (:func:`family_of`); nothing above asks
``isinstance`` or writes a stride.

==============  ================  ======  ================================================================
family          backbone          stride  model files
==============  ================  ======  ================================================================
netvlad_vgg16   vgg16 (conv5_3)   16 px   the authors' checkpoints (official, offline default, refits)
dinov2_vlad     dinov2_vits14     14 px   ``{"family": "dinov2_vlad", ...}`` (``model/dinov2_vlad.py``)
==============  ================  ======  ================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pnv_ros.config import BACKBONES
from pnv_ros.errors import CheckpointError
from pnv_ros.model import dinov2_vlad
from pnv_ros.model.backbone import ENCODER_DIM
from pnv_ros.model.model_file import ModelInfo, vgg_info, vgg_model, vgg_state
from pnv_ros.model.netvlad import PatchNetVLADModel
from pnv_ros.preprocess import FIT_SIZE, fit_tensor
from pnv_ros.storage import file_sha256


@dataclass(frozen=True)
class Family:
    """One model family.

    ``owns(raw)``: whether a model file's dict (``model_file.read_raw``) is of this family.
    ``read(raw, path)``: (model on the CPU in eval mode, its identity); raises CheckpointError.
    ``info(raw, path)``: the identity alone, checked as ``read`` checks, without building the model.
    ``backbone``: the feature grid's name in ``config.BACKBONES`` (its geometry, :attr:`stride`).
    ``transformer``: int8 quantises matrix products (a ViT), not convolutions.
    ``model_class``: the class its models are (the most derived is matched first).
    ``fit_size(model)``: the (height, width) its vocabulary is fitted at."""

    name: str
    backbone: str
    transformer: bool
    model_class: type[PatchNetVLADModel]
    owns: Callable[[dict[str, Any]], bool]
    read: Callable[[dict[str, Any], Path], tuple[PatchNetVLADModel, ModelInfo]]
    info: Callable[[dict[str, Any], Path], ModelInfo]
    fit_size: Callable[[PatchNetVLADModel], tuple[int, int]]

    @property
    def stride(self) -> int:
        """Input pixels per feature-grid cell (``config.BACKBONES``, the one source the presets' geometry uses)."""
        return BACKBONES[self.backbone].stride

    def fit_input(self, model: PatchNetVLADModel) -> Callable[[Any], torch.Tensor]:
        """The fitting images' tensor for ``model``: image -> (1, 3, H, W) at :attr:`fit_size`."""
        height, width = self.fit_size(model)
        return lambda source: fit_tensor(source, height, width)


def _vgg_read(raw: dict[str, Any], path: Path) -> tuple[PatchNetVLADModel, ModelInfo]:
    state, k, d, v2 = vgg_state(raw, path)
    model = vgg_model(state, k, d, v2)
    return model, vgg_info(path, k, model.dim, v2)


def _vgg_info(raw: dict[str, Any], path: Path) -> ModelInfo:
    _, k, d, v2 = vgg_state(raw, path)
    return vgg_info(path, k, d if d > 0 else k * ENCODER_DIM, v2)


def _dino_info_from(path: Path, k: int, d: int, cfg: dict[str, Any]) -> ModelInfo:
    return ModelInfo(
        path=str(path),
        sha256=file_sha256(path),
        num_clusters=k,
        dim=d,
        vladv2=False,
        family=dinov2_vlad.FAMILY,
        backbone=dinov2_vlad.BACKBONE,
        input_size=(cfg["input_height"], cfg["input_width"]),
        global_weight=cfg["global_weight"],
    )


def _dino_read(raw: dict[str, Any], path: Path) -> tuple[PatchNetVLADModel, ModelInfo]:
    state, cfg, k, d = dinov2_vlad.read_dinov2_vlad(raw, path)
    return dinov2_vlad.build_from(state, cfg, k, d), _dino_info_from(path, k, d, cfg)


def _dino_info(raw: dict[str, Any], path: Path) -> ModelInfo:
    _, cfg, k, d = dinov2_vlad.read_dinov2_vlad(raw, path)
    return _dino_info_from(path, k, d, cfg)


def _dino_fit_size(model: PatchNetVLADModel) -> tuple[int, int]:
    assert isinstance(model, dinov2_vlad.DinoVLADModel)
    return model.input_size


#: The families by name. The VGG-16 family owns every file no other family claims (the authors' files carry
#: no family tag), so it is asked last.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            dinov2_vlad.FAMILY,
            dinov2_vlad.BACKBONE,
            True,
            dinov2_vlad.DinoVLADModel,
            dinov2_vlad.is_dinov2_vlad,
            _dino_read,
            _dino_info,
            _dino_fit_size,
        ),
        Family(
            "netvlad_vgg16",
            "vgg16",
            False,
            PatchNetVLADModel,
            lambda raw: True,
            _vgg_read,
            _vgg_info,
            lambda model: FIT_SIZE,
        ),
    )
}
DEFAULT_FAMILY = "netvlad_vgg16"


def family_of_file(raw: dict[str, Any]) -> Family:
    """The family of a model file's dict (``model_file.read_raw``): the first in :data:`FAMILIES` that owns it."""
    return next(f for f in FAMILIES.values() if f.owns(raw))


def family_of(model: torch.nn.Module) -> Family:
    """The family of a built model (the first whose ``model_class`` it is an instance of). Raises
    CheckpointError for a module of no family."""
    for fam in FAMILIES.values():
        if isinstance(model, fam.model_class):
            return fam
    raise CheckpointError(f"{type(model).__name__} is not a model of any family ({', '.join(FAMILIES)})")


def family_named(name: str) -> Family:
    """A family by name (``ModelInfo.family``); CheckpointError for an unknown one."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"unknown model family {name!r}: one of {', '.join(FAMILIES)}") from None


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Family", "family_named", "family_of", "family_of_file"]
