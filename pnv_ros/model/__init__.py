"""The Patch-NetVLAD network: VGG-16 backbone, NetVLAD/patch pooling, WPCA.

The names below load on first use (PEP 562), so that reading model metadata (``pnv models list``) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PatchNetVLADModel", "load_checkpoint", "save_checkpoint"]
_WHERE = {"PatchNetVLADModel": "netvlad", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"pnv_ros.model.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pnv_ros.model' has no attribute {name!r}")
