"""``pnv export``: the model's backbone as ONNX, checked against the torch path before it is written.

Above the engines and the extractor (it runs both): the exported graph is loaded as an onnxruntime engine
through a :class:`~pnv_ros.extract.FeatureExtractor` and compared, image by image, with the model's own
torch code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pnv_ros.config import Preset
from pnv_ros.engines.build import FP32_TOLERANCE, _atomic_target, export_backbone_onnx, rounding_floor
from pnv_ros.errors import EngineError
from pnv_ros.extract import FeatureExtractor, preset_size
from pnv_ros.images import ImageSource, load_image
from pnv_ros.model.families import family_of
from pnv_ros.model.model_file import ModelInfo
from pnv_ros.model.netvlad import PatchNetVLADModel
from pnv_ros.preprocess import input_transform


@dataclasses.dataclass
class ExportCheck:
    """What ``pnv export`` checked: the exported ONNX (run by onnxruntime) against the model's torch path.

    ``rows``: (what was compared, max abs difference, the limit it must keep)."""

    path: Path
    input_size: tuple[int, int]
    images: list[str]
    rows: list[tuple[str, float, float]]

    @property
    def ok(self) -> bool:
        return all(d <= limit for _, d, limit in self.rows)


def _other_size(model: PatchNetVLADModel, input_size: tuple[int, int]) -> tuple[int, int]:
    """A second input size for the dynamic-shape check: about 3/4 of the model's, a multiple of its family's
    stride (``families.FAMILIES``: 14 px per ViT token; 16 px per VGG-16 conv5_3 cell)."""
    step = family_of(model).stride
    h, w = (max(step * 4, (3 * s // 4) // step * step) for s in input_size)
    return h, w


def export_checked(
    model: PatchNetVLADModel,
    info: ModelInfo,
    preset: Preset,
    out: str | Path,
    images: Sequence[ImageSource],
    progress: Callable[[str, int, int], None] | None = None,
) -> ExportCheck:
    """``pnv export``: the model's backbone as ONNX at ``out`` (input ``images`` (B, 3, H, W) float32,
    ImageNet-normalised; output ``features`` (B, C, h, w); batch, height and width dynamic; opset 17),
    checked on ``images`` before it is moved into place, with onnxruntime against the torch path at the
    model's input size:

    1. backbone feature maps: max abs difference / the largest value <= :data:`FP32_TOLERANCE`;
    2. global descriptors (unit norm): max abs difference <= FP32_TOLERANCE;
    3. patch descriptors (``preset``'s patch sizes): max abs difference <= the larger of FP32_TOLERANCE and
       twice torch's own one-rounding-step sensitivity (:func:`rounding_floor`);
    4. the dynamic axes: all images as one batch at about 3/4 of the input size, global descriptors <=
       FP32_TOLERANCE.

    Raises EngineError when a check fails (``out`` is then not written) and ImageError for an image that
    cannot be read; returns the check for printing."""
    out = Path(out)
    if not images:
        raise EngineError("pnv export checks the export on real images: give at least one")
    torch_ex = FeatureExtractor(model, info, preset, device="cpu")
    size, pre = preset_size(torch_ex.preset), torch_ex.preset
    tmp = _atomic_target(out)
    total = len(images) + 3

    def tick(stage: str, i: int) -> None:
        if progress:
            progress(stage, i, total)

    try:
        export_backbone_onnx(model, tmp, size)
        tick("export", 1)
        ort_ex = FeatureExtractor(model, info, preset, device="cpu", engine="onnxruntime", engine_file=tmp)
        feat = glob = patch = floor = 0.0
        for i, img in enumerate(images):
            x = torch_ex.preprocess(img)[0].unsqueeze(0)
            with torch.inference_mode():
                want, got = model.backbone(x).float(), ort_ex.backend(x).float()
                feat = max(feat, float((want - got).abs().max() / want.abs().max().clamp(min=1e-30)))
                (ga, pa), (gb, pb) = (model._pool(f, pre.patch_sizes, pre.strides) for f in (want, got))
            glob = max(glob, float((ga - gb).abs().max()))
            patch = max([patch] + [float((a - b).abs().max()) for a, b in zip(pa, pb)])
            floor = max(floor, rounding_floor(model, want, pre.patch_sizes, pre.strides))
            tick("check", 2 + i)
        h2, w2 = _other_size(model, size)
        batch = torch.stack([input_transform(h2, w2)(load_image(img)) for img in images])
        with torch.inference_mode():
            want = model._pool(model.backbone(batch).float(), (), ())[0]
            got = model._pool(ort_ex.backend(batch).float(), (), ())[0]
        tick("dynamic", total - 1)
        tol = FP32_TOLERANCE
        rows = [
            (f"backbone features, {len(images)} image(s) at {size[1]}x{size[0]} (relative to the largest)", feat, tol),
            ("global descriptors", glob, tol),
            (
                f"patch descriptors, patch sizes {', '.join(map(str, pre.patch_sizes))} (limit: the larger of "
                f"{tol:g} and twice torch's own change under one float32 rounding step, {floor:.1e})",
                patch,
                max(tol, 2 * floor),
            ),
            (
                f"dynamic axes: one batch of {len(images)} at {w2}x{h2}, global descriptors",
                float((want - got).abs().max()),
                tol,
            ),
        ]
        check = ExportCheck(out, size, [str(i) for i in images], rows)
        if not check.ok:
            bad = "; ".join(f"{w}: {d:.2e} > {lim:.1e}" for w, d, lim in rows if d > lim)
            raise EngineError(
                f"the ONNX export of {Path(info.path).name} does not match torch ({bad}); {out} not written"
            )
        os.replace(tmp, out)
        tick("done", total)
        return check
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["ExportCheck", "export_checked"]
