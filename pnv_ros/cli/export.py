"""``pnv export``: a model's backbone to ONNX, checked against torch before it is moved into place."""

from __future__ import annotations

import argparse
import time
from typing import Any

from pnv_ros.cli.common import model_path, preset_of, say

_DESCRIPTION = (
    "Writes MODEL's backbone (VGG-16 conv5_3, or the DINOv2 layer and facet) as ONNX: input 'images' (batch, 3, "
    "height, width) float32, ImageNet-normalised; output 'features' (batch, C, h, w); batch and image size dynamic. "
    "NetVLAD pooling, patches and WPCA stay in pnv_ros, so an engine built from this file serves every preset. "
    "Before the file is moved into place, onnxruntime runs it on real images and the descriptors are compared "
    "with the torch path (float32: within 1e-4); the check is printed. Then e.g. trtexec --onnx=OUT "
    "--saveEngine=PLAN --fp16 with the printed shapes, and --engine tensorrt --engine-file PLAN (node: engine, "
    "engine_file)."
)


def register(sub: Any) -> None:
    """Add ``export`` to the ``pnv`` subparsers ``sub``."""
    sp = sub.add_parser(
        "export",
        help="a model's backbone to ONNX (for TensorRT, onnxruntime, OpenVINO), checked",
        description=_DESCRIPTION,
    )
    sp.add_argument("model", metavar="MODEL", help="default, dinov2_vlad, an official model's name, or a model file")
    sp.add_argument("--out", required=True, help="the ONNX file to write (.onnx)")
    sp.add_argument(
        "--images",
        nargs="+",
        default=None,
        metavar="IMAGE_OR_DIR",
        help="images to check the export on (default: 3 frames of the corridor set)",
    )
    sp.add_argument("--preset", default=None, help="whose patch sizes the check compares (default: speed)")
    sp.add_argument("--config", default=None, help="override file for the preset")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Export, check and print the check and the TensorRT command line."""
    from pnv_ros.export import export_checked
    from pnv_ros.images import list_images
    from pnv_ros.model.checkpoint import load_checkpoint
    from pnv_ros.storage import check_output

    src = model_path(args.model, announce=say)
    check_output(args.out, what="--out", inputs=[src])
    if args.images:
        images = list_images(args.images)
    else:  # three frames of the corridor set's queries (a set the package ships)
        from pnv_ros.model.default_model import find_fitting_set

        images = list_images([find_fitting_set()[1]])[:3]
    model, info = load_checkpoint(src)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(images) + 3, desc="export", unit="step")

    def progress(stage: str, i: int, n: int) -> None:
        if bar is not None:
            bar.set_description(stage, refresh=False)
            bar.n = i
            bar.refresh()

    t0 = time.perf_counter()
    try:
        check = export_checked(model, info, preset_of(args), args.out, images, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    h, w = check.input_size
    print(
        f"wrote {check.path} in {time.perf_counter() - t0:.0f} s: the backbone of {src.name} "
        f"(input 'images' Bx3xHxW float32, ImageNet-normalised, batch and size dynamic; model input {w}x{h}; "
        f"output 'features'), opset 17"
    )
    print(f"checked against torch on {len(check.images)} image(s), onnxruntime, float32:")
    for what, d, limit in check.rows:
        print(f"  {what}: max |diff| {d:.2e} <= {limit:.1e}  ok")
    print(
        f"TensorRT: trtexec --onnx={check.path} --saveEngine=backbone_fp16.plan --fp16 "
        f"--minShapes=images:1x3x{h}x{w} --optShapes=images:1x3x{h}x{w} --maxShapes=images:8x3x{h}x{w}"
    )
    return 0
