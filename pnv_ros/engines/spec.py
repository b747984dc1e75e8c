"""The engine settings, torch-free: names, checks of names, and the runtime an extractor runs with.

:class:`RuntimeSpec` is one value for the settings that travel together from the CLI, the node, the evaluator
and the benchmarks to ``extract.open_extractor`` (device, engine, precision, engine file, bit depth, threads).
Checking here needs no torch; what a machine can run is ``backends.check_engine``'s (it imports torch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pnv_ros.config import ENGINES, PRECISIONS
from pnv_ros.errors import EngineError

#: the pip package that brings each engine
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


def changes_descriptors(engine: str, precision: str) -> bool:
    """Whether features of this engine and precision must be kept apart from float32 ones (see :func:`variant`)."""
    return precision == "int8"


def variant(engine: str, precision: str) -> str:
    """The tag added to the model identity in feature and map files: '' for the float engines (float32 within
    1e-4 of torch; bfloat16 / float16 move descriptors by about 1e-3, as torch's --bf16 always has, and are
    the same model), ``{engine}-int8`` for int8 (descriptors move by far more, and each quantisation
    differently): int8 features never meet float32 ones or another engine's int8 in one map or match."""
    return f"{engine}-{precision}" if changes_descriptors(engine, precision) else ""


@dataclass(frozen=True)
class RuntimeSpec:
    """How an extractor runs (``extract.open_extractor``), as the CLI, node, evaluator and benchmarks give it.

    device: ``cpu``, ``cuda``, ``cuda:1``...; None = CUDA when present, else CPU.
    engine / precision: one of :data:`ENGINES` / :data:`PRECISIONS` (precision None = fp32).
    engine_file: a ready engine file instead of the cached build (not for ``torch``).
    bit_depth: significant bits of 16-bit images (e.g. 12); None = the images' own rule.
    threads: engine threads (onnxruntime, OpenVINO); None = torch's thread count.
    bf16: the old switch (``--bf16``, the node's ``bfloat16``): engine torch at precision bf16.
    batch_size: images per forward pass; None = the extractor's default (1 on CPU, 8 on CUDA).
    """

    device: str | None = None
    engine: str = "torch"
    precision: str | None = None
    engine_file: str | None = None
    bit_depth: int | None = None
    threads: int | None = None
    bf16: bool = False
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise EngineError for an unknown engine or precision (no torch; whether this machine runs them is
        ``backends.check_engine``'s, when the extractor opens). Numbers are checked where they are used (a bad
        bit depth by ``images``), as before the spec existed."""
        if self.engine not in ENGINES:
            raise EngineError(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise EngineError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    def replace(self, **changes: object) -> RuntimeSpec:
        """A copy with ``changes`` (checked)."""
        return dataclasses.replace(self, **changes)


__all__ = ["ENGINES", "PACKAGES", "PRECISIONS", "EngineError", "RuntimeSpec", "changes_descriptors", "variant"]
