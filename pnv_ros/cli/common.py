"""What the ``pnv`` commands share: messages, range-checked number types, the model options and the
one place that assembles a feature extractor from them.

Nothing here imports torch at module level: ``pnv --help`` and input errors answer before it loads.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pnv_ros.config import ENGINES, PRECISIONS
from pnv_ros.engines.spec import RuntimeSpec

if TYPE_CHECKING:
    from pnv_ros.config import Preset
    from pnv_ros.extract import FeatureExtractor

BF16_HELP = "the same as --engine torch --precision bf16 (kept for older scripts)"
ENGINE_HELP = (
    "what runs the backbone: torch (the model itself, exact; default), onnxruntime or openvino (CPU), tensorrt "
    "(NVIDIA GPU, --device cuda); engine files are built once and cached beside the models (see "
    "docs/engines.md)"
)
PRECISION_HELP = (
    "fp32 (default; the other engines within 1e-4 of torch), bf16 (torch, openvino; CPUs with AVX-512 BF16 or "
    "AMX, and GPUs), fp16 (tensorrt; torch on CUDA), int8 (onnxruntime, openvino: post-training quantisation "
    "calibrated once on 32 images of the corridor set; int8 features are kept apart from float32 ones)"
)
ENGINE_FILE_HELP = (
    "a ready engine file instead of the cached build: a TensorRT plan (trtexec --saveEngine), or an ONNX / "
    "OpenVINO .xml of the backbone as 'pnv export' writes it"
)
FAST_PRODUCTS_HELP = (
    "re-rank with oneDNN's similarity products on CPU: ~1.6x faster re-ranking; float32-rounding differences "
    "from the reference can flip near-tied matches (default: the reference's exact products)"
)
BIT_DEPTH_HELP = (
    "significant bits of 16-bit images (e.g. 12 for a 12-bit camera); default: a PNG's sBIT, else the smallest "
    "of 8/10/12/14/16 bits holding each image's maximum"
)


def say(msg: str) -> None:
    """A progress or note line on stderr (``pnv: ...``), apart from the command's output."""
    print(f"pnv: {msg}", file=sys.stderr)


class Number:
    """An argparse ``type``: a finite int or float within [lo, hi] (None: unbounded on that side).

    ``--top-n 0`` is refused at parse time with the allowed range in the message, not turned into a
    default. Every numeric option of every command uses one (test_cli checks the whole parser).
    """

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None) -> None:
        self.kind, self.lo, self.hi = kind, lo, hi
        self.__name__ = "whole number" if kind is int else "number"  # argparse names the type with it

    @classmethod
    def detector(cls, name: str) -> Number:
        """The range of a DetectorParams field (one source for the node, the library and the CLI)."""
        from pnv_ros.config import DetectorParams

        lo, hi = DetectorParams.RANGES[name]
        return cls(type(lo), lo, hi)

    def range_text(self) -> str:
        """'from 1 to 1000', 'at least 0' or 'at most 5'."""
        if self.lo is not None and self.hi is not None:
            return f"from {self.lo:g} to {self.hi:g}"
        return f"at least {self.lo:g}" if self.lo is not None else f"at most {self.hi:g}"

    def __call__(self, text: str) -> int | float:
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {self.__name__} ({self.range_text()})") from None
        if not math.isfinite(v) or (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a {self.__name__} {self.range_text()}")
        return v


#: Positive counts and quantities the library has no range table for.
COUNT = Number(int, 1, 100_000)
POSITIVE = Number(float, 1e-9, 1e9)
NON_NEGATIVE = Number(float, 0.0, 1e9)


def add_common_options(sp: argparse.ArgumentParser, model: bool = True) -> None:
    """--preset, --config, -q; with ``model``, the options that choose and run a model (--checkpoint,
    --device, --engine, --precision, --engine-file, --bf16, --bit-depth), read by :func:`open_extractor`."""
    sp.add_argument(
        "--preset", default=None, help="performance | speed | storage (default: speed, or the features file's)"
    )
    sp.add_argument("--config", default=None, help="override file (.toml, .json, or the reference's .ini)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    if not model:
        return
    sp.add_argument(
        "--checkpoint", default=None, help="checkpoint path or official model name (default: the offline default)"
    )
    sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    sp.add_argument("--engine", choices=ENGINES, default="torch", help=ENGINE_HELP)
    sp.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    sp.add_argument("--engine-file", default=None, metavar="FILE", help=ENGINE_FILE_HELP)
    sp.add_argument("--bf16", action="store_true", help=BF16_HELP)
    sp.add_argument("--bit-depth", type=Number(int, 1, 16), default=None, help=BIT_DEPTH_HELP)


def preset_of(args: argparse.Namespace) -> Preset:
    """The preset that --preset and --config name (raises ConfigError)."""
    from pnv_ros.config import load_preset

    return load_preset(args.preset, args.config)


class Parser(argparse.ArgumentParser):
    """argparse's parser, where an abbreviation that matches several spellings of ONE option is that option.

    ``pnv eval`` keeps older option names beside the current ones (``--min-travel`` and ``--min-travel-m``
    set the same field), and plain argparse calls ``--min-trav`` ambiguous although both mean the same
    setting; before the older names were kept, the prefix was unique and worked. Subparsers inherit the class.
    """

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        tuples = super()._get_option_tuples(option_string)
        return tuples[:1] if len({id(t[0]) for t in tuples}) == 1 else tuples


def runtime_spec(args: argparse.Namespace) -> RuntimeSpec:
    """The runtime the model options ask for (--device, --engine, --precision, --engine-file, --bf16,
    --bit-depth). Raises EngineError for an unknown engine or precision."""
    return RuntimeSpec(
        device=args.device,
        engine=args.engine,
        precision=args.precision,
        engine_file=args.engine_file,
        bit_depth=args.bit_depth,
        bf16=args.bf16,
    )


def open_extractor(args: argparse.Namespace, preset: Preset) -> FeatureExtractor:
    """The feature extractor the model options ask for (see :func:`add_common_options`), through the library's
    :func:`pnv_ros.extract.open_extractor`: a missing model fails before torch loads.
    Raises CheckpointError, EngineError, ConfigError.
    """
    from pnv_ros.model.registry import resolve_checkpoint

    runtime = runtime_spec(args)
    path = resolve_checkpoint(args.checkpoint, announce=say)  # a missing model fails here, before torch loads
    from pnv_ros.extract import open_extractor as open_model

    return open_model(path, preset, runtime, log=say)


def model_path(model: str, announce: Any = None) -> Path:
    """A MODEL argument (``default``, a model name, or a file) as the model file's path (registry rule)."""
    from pnv_ros.model.registry import resolve_checkpoint

    return resolve_checkpoint(None if model == "default" and not Path(model).is_file() else model, announce=announce)


class StageBars:
    """One tqdm bar per build stage (backbone, k-means, vlad, pca); nothing when quiet.

    ``update(stage, i, n)`` is the library's progress callback (i of n done in ``stage``).
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def update(self, stage: str, i: int, n: int) -> None:
        """Move ``stage``'s bar to i of n (a new bar when the stage starts a new round)."""
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None or bar.total != n or i < bar.n:  # a new round of the stage (pnv train: every epoch)
            if bar is not None:
                bar.close()
            bar = self.bars[stage] = tqdm(total=n, desc=stage, unit="img" if n > 1 else "step", leave=False)
        bar.n = i
        bar.refresh()

    def write(self, message: str) -> None:
        """A line of output that does not break the bars."""
        from tqdm import tqdm

        tqdm.write(message)

    def close(self) -> None:
        """Close every bar."""
        for b in self.bars.values():
            b.close()
