"""Extraction: images to global and multi-scale patch descriptors.

Preprocessing is the reference's exactly (PIL bilinear resize to the preset's
input size, ImageNet normalisation), so the same checkpoint and image give the
same descriptors as ``patchnetvlad==0.1.8``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pnv_ros.config import Preset, get_preset
from pnv_ros.engines.build import load_engine
from pnv_ros.engines.spec import RuntimeSpec, variant
from pnv_ros.errors import EngineError
from pnv_ros.features import FeatureSet, PlaceFeatures
from pnv_ros.images import ImageSource, image_identities, load_image
from pnv_ros.model.checkpoint import load_checkpoint
from pnv_ros.model.model_file import ModelInfo
from pnv_ros.model.netvlad import PatchNetVLADModel
from pnv_ros.model.registry import resolve_checkpoint
from pnv_ros.patch_selection import select_patches
from pnv_ros.preprocess import IMAGENET_MEAN, IMAGENET_STD, input_transform  # noqa: F401  (re-exported)
from pnv_ros.products import bf16_products


@dataclasses.dataclass(frozen=True)
class EngineModelInfo(ModelInfo):
    """A model's identity as an engine that changes its descriptors runs it (int8): ``name:dim:sha+engine-int8``.
    ``features.same_model`` compares the last two fields, so such features and maps are refused next to the
    float32 ones of the same file, naming both identities."""

    variant: str = ""

    @property
    def identity(self) -> str:
        base = super().identity
        return f"{base}+{self.variant}" if self.variant else base


#: the pooling arithmetics a FeatureExtractor takes (``pooling``)
POOLINGS = ("auto", "exact", "fast")


def preset_size(preset: Preset) -> tuple[int, int]:
    """(height, width) of a preset's network input."""
    return preset.image_height, preset.image_width


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureExtractor:
    """Turns images into :class:`PlaceFeatures` with one model and preset.

    Args:
        model: a loaded :class:`PatchNetVLADModel` (see ``load_checkpoint``).
        info: the model's identity.
        preset: patch sizes, strides and input size.
        device: where to run; default CUDA if present, else CPU.
        batch_size: images per forward pass; default 1 on CPU (measured faster
            per image than 4 on a 2-core machine), 8 on CUDA. Descriptors do not
            depend on it on CPU (bit-identical, tested): pooling runs per image.
        bf16: run the backbone in bfloat16 (faster on CPUs with AVX-512
            BF16 / AMX and on GPUs); pooling and WPCA stay float32.
            Descriptors differ slightly from float32 (patch cosine ~0.9997),
            so off by default: see benchmarks/reduced_cost.py.
        bit_depth: significant bits of 16-bit images (e.g. 12); None = the
            package's rule (``images.to_uint8``: sBIT, else the image's maximum).
        engine: what runs the backbone (``pnv_ros.engines``): ``torch`` (the
            model itself, exact; default), ``onnxruntime``, ``openvino`` or
            ``tensorrt``. Pooling and WPCA are the model's torch code whatever
            the engine, so descriptors keep their format; float32 engines agree
            with torch to 1e-4.
        precision: ``fp32`` (default), ``fp16``, ``bf16`` or ``int8``, as the
            engine and device allow (``engines.check_engine`` refuses the rest).
            ``bf16=True`` is ``engine="torch", precision="bf16"``. int8 features
            carry a tagged model identity (``engines.variant``): maps and feature
            files keep them apart from float32 ones. Every precision but fp32
            pools with the fast pooling (``pooling``).
        engine_file: a ready engine file (a TensorRT plan from ``trtexec``, an
            ONNX or OpenVINO IR file of the backbone) instead of the cached build.
        engine_cache: where engine files are built and kept (default: the
            model cache's ``engines/`` folder, ``engines.cache_root``).
        threads: engine threads (onnxruntime, OpenVINO); default torch's thread count.
        log: where engine builds are announced (default: the module logger).
        reference_arithmetic: pool and project with the reference's order of operations
            (``projection`` "reference", ``PatchNetVLADModel._pool_reference``): on CPU float32 the global and
            patch descriptors are bit-identical to ``patchnetvlad==0.1.8``'s, at a cost (measured +40% of the
            extraction with the performance preset, +17% speed; docs/results/pooling_exact.md). Off: they agree
            with it to ~2e-6.
        pooling: "exact" (the float32 integral, as the reference computes it), "fast" (the same descriptors
            from small products, no integral: ``PatchNetVLADModel._pool_fast``; bfloat16 products where the
            device has fast ones; closer to float64 than "exact", not the reference's float32 rounding; see
            docs/results/pooling_fast.md) or "auto" (default): "exact" at fp32, "fast" at every other
            precision. Raises EngineError for another value.
    """

    def __init__(
        self,
        model: PatchNetVLADModel,
        info: ModelInfo,
        preset: Preset,
        *,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        bf16: bool = False,
        bit_depth: int | None = None,
        engine: str = "torch",
        precision: str | None = None,
        engine_file: str | Path | None = None,
        engine_cache: str | Path | None = None,
        threads: int | None = None,
        log: Callable[[str], None] | None = None,
        reference_arithmetic: bool = False,
        pooling: str = "auto",
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.info = info
        # A model that brings its own backbone and input size (the DINOv2 family) sets them in the preset:
        # files and maps record the preset, so features of the two families never meet.
        if info.backbone != preset.backbone or (info.input_size and info.input_size != preset_size(preset)):
            h, w = info.input_size or preset_size(preset)
            preset = dataclasses.replace(preset, backbone=info.backbone, image_height=h, image_width=w)
        # Its re-ranking order too, unless the preset asks for a global weight of its own.
        if info.global_weight and not preset.global_weight:
            preset = dataclasses.replace(preset, global_weight=info.global_weight)
        self.preset = preset
        if bf16:  # the old switch: an alias of engine torch, precision bf16
            if engine != "torch" or precision not in (None, "bf16"):
                raise EngineError(
                    f"bf16 (--bf16, the node's bfloat16) is engine torch at precision bf16; it cannot go with engine "
                    f"{engine}"
                    + (f" at precision {precision}" if precision else "")
                    + ": give the engine and precision alone"
                )
            precision = "bf16"
        self.engine_name, self.precision = engine, precision or "fp32"
        self.backend = load_engine(
            model,
            info,
            preset_size(preset),
            engine,
            self.precision,
            self.device,
            engine_file=engine_file,
            cache_dir=engine_cache,
            threads=threads,
            log=log,
        )
        # One inference at a time through an engine: OpenVINO's InferRequest and TensorRT's execution context are
        # not reentrant, and the node extracts from its worker and from query_place (BY_IMAGE) concurrently.
        self._backend_lock = threading.Lock()
        tag = variant(engine, self.precision)
        if tag:  # int8: features of another model as far as files and maps go (see engines.variant)
            self.info = EngineModelInfo(
                **{f.name: getattr(info, f.name) for f in dataclasses.fields(info)}, variant=tag
            )
        if pooling not in POOLINGS:
            raise EngineError(f"pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        if pooling == "auto":
            pooling = "exact" if self.precision == "fp32" else "fast"
        #: how pooling and patch descriptors are computed (``PatchNetVLADModel._pool``'s ``projection``): the
        #: float32 path the exact arithmetic (bit-compatible with the reference: ``reference_arithmetic``
        #: ``reference``), every other one ``fast`` (``_pool_fast``: no residual integral, bfloat16 products
        #: where the device has fast ones, else float32 ``fast32``)
        self.pooling = pooling
        self.projection = pooling
        if pooling == "fast" and not bf16_products(self.device):
            self.projection = "fast32"
        if reference_arithmetic:  # the reference's own arithmetic: an exact path whatever the precision
            self.pooling, self.projection = "exact", "reference"
        #: the stages' seconds of this thread's last extraction (``last_timings``)
        self._timings = threading.local()
        self.bf16 = engine == "torch" and self.precision == "bf16"
        self._autocast = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision) if engine == "torch" else None
        )
        self.bit_depth = bit_depth
        self.batch_size = max(1, int(batch_size)) if batch_size else (8 if self.device.type == "cuda" else 1)
        self._transform = input_transform(preset.image_height, preset.image_width)

    @property
    def dim(self) -> int:
        return self.model.dim

    def preprocess(self, image: ImageSource) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image to a (3, H, W) normalised tensor and its original (width, height).

        Every image, of any size down to 1x1 (Nordland's 64x32 included), is resized to the preset's input size
        before the network, as ``patchnetvlad==0.1.8`` does: the network never sees the original size, so no
        size is refused here. Every preset has an input size that holds its patches (``config.validate``; the
        reference's native-resolution setting, a resize of 0, is refused there).
        """
        t = time.perf_counter()
        pil: Image.Image = load_image(image, bit_depth=self.bit_depth)
        out = self._transform(pil), (pil.width, pil.height)
        self._timings.value = {"preprocess": time.perf_counter() - t}
        return out

    @property
    def last_timings(self) -> dict[str, float]:
        """Seconds of this thread's last extraction per stage: ``preprocess`` (decoding and resizing),
        ``backbone``, ``pooling`` (assignment and global descriptor) and ``patch_descriptors`` (all scales,
        WPCA included); empty before the first. Batched extraction: the whole batch's backbone and pooling,
        the last image's preprocess."""
        return dict(getattr(self._timings, "value", {}))

    @torch.inference_mode()
    def extract_tensors(self, batch: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the network on a preprocessed batch.

        batch: (B, 3, H, W). Returns global (B, D) and per scale (B, P_s, D), float32,
        C-contiguous (the model's patches are a transposed view; each keyframe's
        (P_s, D) rows in order make re-ranking's stacking a plain copy).
        """
        t0 = time.perf_counter()
        if self.backend is not None:  # the engine runs the backbone; pooling and WPCA are the model's
            with self._backend_lock:
                feats = self.backend(batch)
        else:  # the model's forward, with the stages apart: only the backbone under autocast
            with torch.autocast(self.device.type, dtype=self._autocast or torch.bfloat16, enabled=bool(self._autocast)):
                feats = self.model.backbone(batch.to(self.device))
        stages = {"backbone": time.perf_counter() - t0}
        with torch.autocast(self.device.type, enabled=False):
            glob, patches = self.model._pool(
                feats.to(self.device, torch.float32),
                self.preset.patch_sizes,
                self.preset.strides,
                self.projection,
                timings=stages,
            )
        out = glob.float().cpu().numpy(), [p.float().cpu().contiguous().numpy() for p in patches]
        prev = getattr(self._timings, "value", {})
        self._timings.value = {"preprocess": prev.get("preprocess", 0.0), **stages}
        return out

    def extract(self, images: Sequence[ImageSource]) -> list[PlaceFeatures]:
        """Features of every image, batched. Raises ImageError naming a bad one."""
        return list(self.iter_extract(images))

    def extract_one(self, image: ImageSource) -> PlaceFeatures:
        """Features of one image."""
        return self.extract([image])[0]

    def iter_extract(self, images: Iterable[ImageSource]) -> Iterator[PlaceFeatures]:
        """Yield features image by image, running the network in batches."""
        pending: list[tuple[torch.Tensor, tuple[int, int]]] = []
        for image in images:
            pending.append(self.preprocess(image))
            if len(pending) == self.batch_size:
                yield from self._run(pending)
                pending = []
        if pending:
            yield from self._run(pending)

    def _run(self, pending: list[tuple[torch.Tensor, tuple[int, int]]]) -> Iterator[PlaceFeatures]:
        glob, patches = self.extract_tensors(torch.stack([t for t, _ in pending]))
        for i, (_, size) in enumerate(pending):
            yield select_patches(PlaceFeatures(glob[i], [p[i] for p in patches], size), self.preset)

    def extract_set(self, paths: Sequence[Path], progress: bool = False) -> FeatureSet:
        """Features of image files as a FeatureSet named by :func:`image_identities` (unique
        relative paths). Raises ImageError for a bad image or a file given twice."""
        names = image_identities(paths)
        it: Iterable[PlaceFeatures] = self.iter_extract(paths)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(paths), desc="extract", unit="img")
        places = list(it)
        return FeatureSet.from_places(names, places, self.preset, self.info.identity)


def open_extractor(
    model: str | Path | None,
    preset: Preset | str,
    runtime: RuntimeSpec | None = None,
    *,
    log: Callable[[str], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> FeatureExtractor:
    """A :class:`FeatureExtractor` from a model name or file, a preset and a runtime: resolve, load, assemble.

    model: a model file, an official or built model's name, or None / "" (the offline default; ``announce``
    hears once per process that it is used), as ``registry.resolve_checkpoint`` takes it.
    preset: a :class:`Preset` or a built-in preset's name. runtime: device, engine, precision, engine file,
    bit depth, threads, batch size (default: :class:`RuntimeSpec`'s, torch fp32 on CUDA if present, else CPU).
    log: where engine builds are announced. A missing model fails (CheckpointError) before torch loads it;
    an engine that cannot run here raises EngineError."""
    runtime = runtime or RuntimeSpec()
    path = resolve_checkpoint(model, announce=announce)
    if isinstance(preset, str):
        preset = get_preset(preset)
    net, info = load_checkpoint(path, device=runtime.device or "cpu")
    return FeatureExtractor(
        net,
        info,
        preset,
        device=runtime.device,
        batch_size=runtime.batch_size,
        bf16=runtime.bf16,
        bit_depth=runtime.bit_depth,
        engine=runtime.engine,
        precision=runtime.precision,
        engine_file=runtime.engine_file,
        threads=runtime.threads,
        log=log,
    )
