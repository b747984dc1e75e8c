"""Opening a model file of any family: :func:`load_checkpoint` (the model and its identity) and
:func:`checkpoint_info` (the identity alone).

Files load with ``torch.load(weights_only=True)`` (``model_file.read_raw``): nothing but tensors and plain
containers is ever unpickled. The family is the table's (``model/families.py``): a ``dinov2_vlad`` file says
so, any other file is the authors' VGG-16 NetVLAD format (``model/model_file.py``, whose names are re-exported
here: ``ModelInfo``, ``read_raw``, ``read_state_dict``, ``expected_shapes``, ``save_checkpoint``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pnv_ros.model.families import family_of_file
from pnv_ros.model.model_file import (  # noqa: F401  (re-exported: the names callers import from here)
    ModelInfo,
    expected_shapes,
    read_raw,
    read_state_dict,
    save_checkpoint,
)
from pnv_ros.model.netvlad import PatchNetVLADModel
from pnv_ros.storage import file_sha256  # noqa: F401  (re-exported)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[PatchNetVLADModel, ModelInfo]:
    """Build the model from a model file of either family: the authors' checkpoint format (VGG-16
    NetVLAD; clusters and dimension from the tensors) or a ``dinov2_vlad`` file (its family and
    choices recorded in it, see ``model/dinov2_vlad.py``). The model is in eval mode on ``device``.
    Raises CheckpointError for a missing, corrupt or mismatched file."""
    path = Path(path)
    raw = read_raw(path)
    model, info = family_of_file(raw).read(raw, path)
    model.eval().to(device)
    return model, info


def checkpoint_info(path: str | Path) -> ModelInfo:
    """A model file's identity without building the model (checked like load_checkpoint)."""
    path = Path(path)
    raw = read_raw(path)
    return family_of_file(raw).info(raw, path)


__all__ = ["ModelInfo", "checkpoint_info", "load_checkpoint", "read_raw", "read_state_dict", "save_checkpoint"]
