"""Matrix-product precision on the fast paths: whether a device has fast bfloat16 products.

The fast paths make their operands bfloat16 explicitly (never through a process-wide setting such as oneDNN's
``fp32_precision``, which would change the float32 products of every other thread and node in the process).
"""

from __future__ import annotations

import torch


def bf16_products(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are fast on ``device``: a CUDA GPU with native bfloat16 (Ampere or later;
    not emulated), or a CPU whose oneDNN has AMX or AVX-512 BF16 kernels (``torch.backends.mkldnn``'s bf16
    support)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )
