"""VGG-16 up to conv5_3 (before its ReLU): the Patch-NetVLAD backbone."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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


def _weights_key(seq: nn.Sequential) -> tuple[tuple[int, int], ...]:
    """Identity of the current weights: storage and in-place version of each."""
    return tuple((p.data_ptr(), p._version) for p in seq.parameters())


class BlockedBackbone:
    """The backbone on CPU with activations kept in oneDNN's blocked layout.

    ``nn.Conv2d`` on a plain NCHW tensor already runs oneDNN's blocked-layout
    kernel, but reorders the weights and converts the activations to and from
    the blocked layout around every convolution. Here the weights are
    reordered once and the activations stay blocked from the first
    convolution to the last, so the same kernel does the same arithmetic:
    outputs are bit-identical to ``seq(x)`` (tested), about 1.4x sooner on a
    2-core AVX-512 machine (benchmarks/compare_reference.py).

    ``dtype=torch.bfloat16`` runs the convolutions in bfloat16 (float32
    biases and accumulation), as bfloat16 autocast does, about 2x sooner
    again on a CPU with AVX-512 BF16; its output is bfloat16.

    Build with :meth:`for_module`, which rebuilds when the weights change
    (a checkpoint loaded into the module).
    """

    def __init__(self, seq: nn.Sequential, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.key = (dtype, _weights_key(seq))
        self.layers: list[tuple[str, Any]] = []
        for m in seq:
            if isinstance(m, nn.Conv2d):
                geometry = (list(m.padding), list(m.stride), list(m.dilation), m.groups)
                weight = m.weight.detach().float().to_mkldnn(dtype)
                weight = torch._C._nn.mkldnn_reorder_conv2d_weight(weight, *geometry)
                bias = m.bias.detach().float().to_mkldnn() if m.bias is not None else None
                self.layers.append(("conv", (weight, bias, *geometry)))
            elif isinstance(m, nn.ReLU):
                self.layers.append(("relu", None))
            elif isinstance(m, nn.MaxPool2d):
                self.layers.append(("pool", (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)))
            else:
                raise TypeError(f"no blocked-layout form for {type(m).__name__}")

    @staticmethod
    def available(dtype: torch.dtype = torch.float32) -> bool:
        """oneDNN is built into this torch (and, for bfloat16, this CPU has bfloat16 support)."""
        if not torch.backends.mkldnn.is_available():
            return False
        return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    @classmethod
    def for_module(
        cls, seq: nn.Sequential, cached: BlockedBackbone | None, dtype: torch.dtype = torch.float32
    ) -> BlockedBackbone:
        """``cached`` if it was built from the module's current weights in ``dtype``, else a new one."""
        if cached is not None and cached.key == (dtype, _weights_key(seq)):
            return cached
        return cls(seq, dtype)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) float32 on CPU -> (B, 512, H//16, W//16) dense (in ``dtype``), as ``seq(images)``."""
        x = images.contiguous().to(self.dtype).to_mkldnn()
        for kind, args in self.layers:
            if kind == "conv":
                x = torch.mkldnn_convolution(x, *args)
            elif kind == "relu":
                x = torch.relu_(x)
            else:
                kernel, stride, padding, dilation, ceil_mode = args
                x = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
        return x.to_dense()
