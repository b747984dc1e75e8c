"""VGG-16 up to conv5_3 (before its ReLU): the Patch-NetVLAD backbone."""

from __future__ import annotations

from torch import nn
from torchvision.models import vgg16

#: ``vgg16().features`` indices of the 13 convolutions (the checkpoint's
#: ``encoder.{i}.weight`` / ``encoder.{i}.bias`` keys).
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
#: Output channels of conv5_3.
ENCODER_DIM = 512


def make_backbone() -> nn.Sequential:
    """``vgg16().features`` without its last two modules (ReLU, max-pool).

    Input (B, 3, H, W) ImageNet-normalised RGB; output (B, 512, H//16, W//16),
    conv5_3 before ReLU. Weights are uninitialised (random) until a
    checkpoint is loaded.
    """
    layers = list(vgg16(weights=None).features.children())[:-2]
    return nn.Sequential(*layers)
