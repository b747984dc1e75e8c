"""The Patch-NetVLAD network: VGG-16 backbone, NetVLAD/patch pooling, WPCA."""

from pnv_ros.model.checkpoint import load_checkpoint, save_checkpoint
from pnv_ros.model.netvlad import PatchNetVLADModel

__all__ = ["PatchNetVLADModel", "load_checkpoint", "save_checkpoint"]
