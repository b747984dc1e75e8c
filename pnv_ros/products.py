"""Matrix-product precision on the fast paths: whether a device has fast bfloat16 products, and oneDNN's bf16
"fpmath" mode (bfloat16-rounded inputs, float32 results) for float32 products, set around a product.

The fpmath setting is the process's (``torch.backends.mkldnn.matmul.fp32_precision``), not a thread's: every
change of it and every block of float32 products that must stay float32 while another thread might set it
(``float32_products``: the fast pooling's norms and global descriptor) hold one lock, so a product never runs in a
mode it did not ask for.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_FPMATH_LOCK = threading.RLock()


def bf16_products(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are fast on ``device``: a CUDA GPU, or a CPU whose oneDNN has AMX or
    AVX-512 BF16 kernels (``torch.backends.mkldnn``'s bf16 support)."""
    if device.type == "cuda":
        return True
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


@contextlib.contextmanager
def bf16_fpmath(device: torch.device) -> Iterator[None]:
    """float32 matrix products computed from bfloat16-rounded inputs with float32 results while inside, on a CPU
    (oneDNN's AMX / AVX-512 BF16 kernels; ~2.5x sooner than float32, results within ~5e-4 for unit vectors of
    512 dimensions). On other devices it changes nothing. Holds the module's lock: keep the block short."""
    if device.type != "cpu":
        yield
        return
    with _FPMATH_LOCK:
        old = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            yield
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = old


@contextlib.contextmanager
def float32_products() -> Iterator[None]:
    """float32 products inside stay float32 while another thread would enter :func:`bf16_fpmath` (it waits)."""
    with _FPMATH_LOCK:
        yield
