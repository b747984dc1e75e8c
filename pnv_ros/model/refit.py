"""Refit a model's NetVLAD vocabulary and whitening PCA on images of the user's own environment.

AnyLoc (Keetha et al., RA-L 2023) fits its VLAD vocabulary on images of the environment the robot works
in, not on a generic set. :func:`refit_model` does that for a model of either family (the VGG-16 NetVLAD
checkpoints, official or offline-built, and ``dinov2_vlad`` files): it keeps the model's backbone and its
choices (VGG-16: conv5_3 of a 480 x 640 input, as the default model's build; DINOv2: the file's layer,
facet and input size), recomputes the backbone's feature maps of the given images and refits the
vocabulary (seeded k-means, the NetVLAD initialisation) and the whitening PCA with the builders' own code
(``model.fitting.fit_vocabulary`` through each family's fitting helpers). The result is a model file of
the same family and format, written by the family's own saver (atomically), with a metadata JSON beside
it; the same inputs on the same CPU give a byte-identical model file. It works as ``--checkpoint FILE`` everywhere. Its
hash differs from the source model's, so maps and feature files made with one are refused by the other.

Images come from folders (:func:`folder_images`) or from a ROS 1 / ROS 2 bag (:func:`bag_images`); both
take at most ``max_images`` evenly spaced frames (see :func:`evenly_spaced` for why). The node's
``vocabulary_images`` parameter goes through :func:`refit_cached`, which keeps the result in the model
cache keyed by the source model and the input files. No ROS imports here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pnv_ros.errors import CheckpointError, ConfigError, ImageError, OutputError
from pnv_ros.storage import check_output, file_sha256, utc_now, write_text_atomic

if TYPE_CHECKING:
    from pnv_ros.model.netvlad import PatchNetVLADModel

#: Fewer fitting images are refused (as the builders do).
MIN_IMAGES = 10
#: At most this many (evenly spaced) frames of a folder or bag are used by default: see evenly_spaced.
MAX_IMAGES = 300
#: Part of the node's cache key: a change of the fitting code that changes its output bumps it.
REFIT_VERSION = 1
BAG_SUFFIXES = (".bag", ".mcap", ".db3")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Undecodable:
    """A frame that cannot be decoded (a bag message): skipped and counted by :func:`refit_model`."""

    what: str
    error: str


@dataclass
class FittingImages:
    """Images to fit on (paths, arrays, or :class:`Undecodable` markers; a sized iterable) and where they
    came from, for the metadata: ``source`` = {"kind": "images" | "bag", ...}."""

    images: Any
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.images)


def evenly_spaced(n: int, m: int) -> list[int]:
    """Indices of ``m`` evenly spaced items of ``n`` (all of them when ``n <= m``), first and last included.

    Why a bound at all: every fitting image costs a backbone pass (1-2 s on a small CPU) and keeps its
    feature map and ~25 VLAD vectors in memory until the PCA (about 10 MB per image for the VGG-16 family
    at K = 64), so an hour-long bag at 30 Hz must not become 100 000 fitting images. Why evenly spaced:
    consecutive frames of a bag are near duplicates, so frames spread over the whole recording cover the
    places it visits, where the first N frames would cover only its start.
    """
    if n <= m:
        return list(range(n))
    if m == 1:
        return [0]
    return [(j * (n - 1) + (m - 1) // 2) // (m - 1) for j in range(m)]


def folder_images(inputs: Sequence[str | Path], max_images: int = MAX_IMAGES) -> FittingImages:
    """Image files of folders (or files; ``images.list_images``: natural order), at most ``max_images``
    evenly spaced ones. ImageError for a folder without images or a missing path."""
    from pnv_ros.images import list_images

    paths = list_images(list(inputs))
    pick = evenly_spaced(len(paths), max_images)
    return FittingImages(
        [paths[i] for i in pick],
        {"kind": "images", "paths": [str(p) for p in inputs], "available": len(paths), "sampled": len(pick)},
    )


class _BagFrames:
    """The chosen frames of a bag's image topic as RGB arrays (or Undecodable), read when iterated."""

    def __init__(self, path: Path, topic: str, bit_depth: int | None, pick: list[int]) -> None:
        self.path, self.topic, self.bit_depth, self.pick = path, topic, bit_depth, pick

    def __len__(self) -> int:
        return len(self.pick)

    def __iter__(self) -> Iterator[np.ndarray | Undecodable]:
        from pnv_ros.bags import BagReader

        with BagReader(self.path, self.topic, bit_depth=self.bit_depth) as r:
            for fr in r.frames(only=set(self.pick)):
                if fr.rgb is None:
                    yield Undecodable(f"bag {self.path} frame {fr.index} ({self.topic})", fr.error or "no image")
                else:
                    yield fr.rgb


def bag_images(
    bag: str | Path, topic: str | None = None, *, max_images: int = MAX_IMAGES, bit_depth: int | None = None
) -> FittingImages:
    """At most ``max_images`` evenly spaced frames of a bag's image topic (its only one when ``topic`` is
    None); only those frames are decoded. BagError for an unreadable bag or a missing or ambiguous topic."""
    from pnv_ros.bags import BagReader

    bag = Path(bag)
    with BagReader(bag, topic, bit_depth=bit_depth) as r:
        count, topic = r.count, r.topic
    pick = evenly_spaced(count, max_images)
    source = {"kind": "bag", "path": str(bag), "topic": topic, "available": count, "sampled": len(pick)}
    return FittingImages(_BagFrames(bag, topic, bit_depth, pick), source)


def is_bag(path: str | Path) -> bool:
    """Whether a path is a bag (a ROS 2 bag folder with metadata.yaml, or a .bag / .mcap / .db3 file)
    rather than a folder of images."""
    p = Path(path)
    return (p / "metadata.yaml").is_file() if p.is_dir() else p.suffix.lower() in BAG_SUFFIXES


def fitting_images(
    path: str | Path, *, topic: str | None = None, max_images: int = MAX_IMAGES, bit_depth: int | None = None
) -> FittingImages:
    """A folder of images or a bag (see :func:`is_bag`), sampled as :func:`folder_images` / :func:`bag_images`."""
    if is_bag(path):
        return bag_images(path, topic, max_images=max_images, bit_depth=bit_depth)
    if topic:
        raise ConfigError(f"{path} is a folder of images, not a bag: an image topic applies to bags only")
    return folder_images([path], max_images)


def metadata_path(out: str | Path) -> Path:
    """Where the metadata JSON of a model file goes, as the builders put it: NAME.pth.tar -> NAME.json."""
    out = Path(out)
    return out.with_suffix("").with_suffix(".json")


def _pca_samples_per_image(grid: tuple[int, int], patch_sizes: Sequence[int], patches_per_image: int) -> int:
    """What fit_vocabulary takes per image for the PCA: the global VLAD and sampled patch VLADs."""
    h, w = grid
    return 1 + sum(min(patches_per_image, (h - s + 1) * (w - s + 1)) for s in patch_sizes if s <= min(h, w))


def fitting_geometry(model: PatchNetVLADModel) -> tuple[tuple[int, int], int, tuple[int, ...]]:
    """How the builders fit a model of either family: its feature grid (h, w) at the fitting input size
    (the family's ``fit_size`` over its ``stride``), the local descriptors sampled per image for k-means,
    and the patch sizes sampled for the PCA."""
    from pnv_ros.model import dinov2_vlad
    from pnv_ros.model.families import family_of
    from pnv_ros.model.fitting import DESCS_PER_IMAGE, PCA_PATCH_SIZES

    fam = family_of(model)
    height, width = fam.fit_size(model)
    grid = (height // fam.stride, width // fam.stride)
    if fam.name == dinov2_vlad.FAMILY:
        return grid, dinov2_vlad.DESCS_PER_IMAGE, tuple(dinov2_vlad.PCA_PATCH_SIZES)
    return grid, DESCS_PER_IMAGE, tuple(PCA_PATCH_SIZES)


def _check_counts(
    n: int,
    k: int,
    d: int,
    grid: tuple[int, int],
    descs_per_image: int,
    patch_sizes: Sequence[int],
    what: str,
    patches_per_image: int,
) -> None:
    """Refuse, before the work, image counts too small for the k-means or the PCA."""
    if n < MIN_IMAGES:
        raise CheckpointError(f"need at least {MIN_IMAGES} fitting images, got {n}{what}")
    per = _pca_samples_per_image(grid, patch_sizes, patches_per_image)
    if n * per <= d:
        raise ConfigError(
            f"{n} images{what} give {n * per} PCA samples ({per} per image), but whitening to {d} dimensions "
            f"needs more than {d}: give at least {d // per + 1} images, or fewer dimensions (--dims "
            f"{n * per - 1} at most)"
        )
    descs = n * min(descs_per_image, grid[0] * grid[1])
    if descs < k:
        raise ConfigError(
            f"{n} images{what} give {descs} local descriptors, fewer than the {k} clusters asked for: "
            "give more images or fewer clusters (--clusters)"
        )


def _prepare(
    checkpoint: Path, images: Any, out: Path, source: dict[str, Any] | None
) -> tuple[Any, dict[str, Any], Path, int | None]:
    """refit_model's inputs checked before any work: (images, source record, metadata path, image count or
    None for an iterable of unknown length). Raises OutputError, CheckpointError as refit_model."""
    if isinstance(images, FittingImages):
        source = images.source if source is None else source
        images = images.images
    meta_path = metadata_path(out)
    check_output(out, what="--out", inputs=[checkpoint])
    if meta_path == out:
        raise OutputError(f"--out {out}: the metadata would overwrite the model file: give a name like NAME.pth.tar")
    check_output(meta_path, what=f"the metadata file of --out {out}", inputs=[checkpoint])
    total = len(images) if isinstance(images, Sized) else None
    if total is not None and total < MIN_IMAGES:
        raise CheckpointError(f"need at least {MIN_IMAGES} fitting images, got {total}")
    if source is None:
        paths = [p for p in images if isinstance(p, (str, Path))] if isinstance(images, (list, tuple)) else []
        source = (
            {"kind": "images", "paths": sorted({str(Path(p).parent) for p in paths})} if paths else {"kind": "arrays"}
        )
    return images, source, meta_path, total


def _refit_meta(
    out: Path,
    checkpoint: Path,
    info: Any,
    features: dict[str, Any],
    source: dict[str, Any],
    fit: Any,
    fitted: dict[str, Any],
) -> dict[str, Any]:
    """The metadata JSON of a refitted model file (``fitted``: what refit_model fitted with)."""
    k, d, seed, per_image = fitted["k"], fitted["d"], fitted["seed"], fitted["per_image"]
    keep_vocabulary, bad, patch_sizes = fitted["keep_vocabulary"], fitted["undecodable"], fitted["patch_sizes"]
    return {
        "model": out.name,
        "family": info.family,
        "sha256": file_sha256(out),
        "dim": d,
        "num_clusters": k,
        "built": utc_now(),
        "refit_of": {
            "model": str(checkpoint),
            "sha256": info.sha256,
            "identity": info.identity,
            "num_clusters": info.num_clusters,
            "dim": info.dim,
        },
        "features": features,
        "fitting": {
            "source": source,
            "images": fitted["images"],
            "undecodable": len(bad),
            "undecodable_first": bad[:5],
            "kmeans": "kept from the model"
            if keep_vocabulary
            else {"k": k, "seed": seed, "descriptors": int(fit.descs.shape[0]), "niter": 100},
            "pca": {
                "dim": d,
                "samples": int(sum(v.shape[0] for v in fit.vecs)),
                "patch_sizes": list(patch_sizes) if per_image else [],
                "patches_per_image": per_image,
            },
        },
        "note": "Whitening PCA fitted on the images above (pnv add-pca); backbone and NetVLAD layer unchanged."
        if keep_vocabulary
        else "Vocabulary and whitening PCA refitted on the images above (pnv models refit); backbone unchanged.",
    }


def refit_model(
    checkpoint: str | Path,
    images: FittingImages | Sequence[Any] | Iterable[Any],
    out: str | Path,
    *,
    num_clusters: int | None = None,
    num_pcs: int | None = None,
    progress: Progress | None = None,
    source: dict[str, Any] | None = None,
    keep_vocabulary: bool = False,
    patches_per_image: int | None = None,
    seed: int | None = None,
) -> Path:
    """Refit the vocabulary and whitening PCA of the model file ``checkpoint`` on ``images`` and write the
    result to ``out`` (same family and format; metadata JSON beside it, see :func:`metadata_path`).

    images: a :class:`FittingImages` (from :func:`folder_images`, :func:`bag_images`), or image paths, or
    (H, W, 3) uint8 arrays; at least 10. num_clusters / num_pcs: vocabulary size K and output dimension D
    (default: the model's; D = 512 for a VGG-16 checkpoint without WPCA). The assignment weights are the
    NetVLAD (vladv1) initialisation of the new words, as the builders make them, also for a vladv2 source.
    Runs on the CPU; everything is seeded: the same inputs on the same CPU give a byte-identical model file.

    keep_vocabulary: keep the model's NetVLAD layer and fit only the whitening PCA (``pnv add-pca``, the
    authors' ``add_pca.py``): from the images the default model was built on, the default model's WPCA comes
    back bit for bit. patches_per_image: patch VLADs per image and patch size in the PCA's samples (default
    8, the builders'; 0 = global VLADs only, the authors' ``add_pca.py`` rule). seed: of torch, the sampling and
    the k-means (default ``default_model.SEED``, the builders').

    Raises OutputError (``out`` or its metadata path cannot be written, or is the source model),
    CheckpointError (a missing or bad model file; fewer than 10 images), ConfigError (too few images for
    the k-means or the PCA; D above K x C), ImageError (too few images can be decoded: undecodable ones
    are skipped and counted in the metadata). Returns ``out``.
    """
    # torch loads here, not when the module is imported: the CLI checks its inputs first
    from pnv_ros.model import dinov2_vlad
    from pnv_ros.model.checkpoint import load_checkpoint
    from pnv_ros.model.default_model import NUM_PCS, vgg_fitted_state, vgg_fitting_model
    from pnv_ros.model.families import family_of
    from pnv_ros.model.fitting import PATCHES_PER_IMAGE, SEED, backbone_maps
    from pnv_ros.model.model_file import save_checkpoint
    from pnv_ros.preprocess import FIT_SIZE

    checkpoint, out = Path(checkpoint), Path(out)
    images, source, meta_path, total = _prepare(checkpoint, images, out, source)

    model, info = load_checkpoint(checkpoint)
    dinov2 = info.family == dinov2_vlad.FAMILY
    if keep_vocabulary and num_clusters and num_clusters != info.num_clusters:
        raise ConfigError(f"{checkpoint} has {info.num_clusters} clusters: adding a PCA keeps them (no --clusters)")
    k = int(num_clusters or info.num_clusters)
    per_image = PATCHES_PER_IMAGE if patches_per_image is None else int(patches_per_image)
    if per_image < 0:
        raise ConfigError(f"patches per image must be 0 or more, got {per_image}")
    d = int(num_pcs or (model.num_pcs if model.num_pcs > 0 else NUM_PCS))
    channels = int(model.pool.dim)
    if k < 2:
        raise ConfigError(f"a vocabulary needs at least 2 clusters, got {k}")
    if not 1 <= d <= k * channels:
        raise ConfigError(f"{d} dimensions: the whitening PCA gives 1 to {k * channels} (K x C = {k} x {channels})")
    grid, descs_per_image, patch_sizes = fitting_geometry(model)
    if total is not None:
        _check_counts(total, k, d, grid, descs_per_image, patch_sizes, "", per_image)

    seed = SEED if seed is None else int(seed)
    rng = np.random.default_rng(seed)
    to_tensor = family_of(model).fit_input(model)
    if dinov2:
        fitting = dinov2_vlad.fitting_model(
            model.encoder, k, model.layer, model.facet, model.input_size, model.global_weight, seed=seed
        )
    else:
        encoder = {f"encoder.{n}": t.detach() for n, t in model.encoder.state_dict().items()}
        fitting = vgg_fitting_model(encoder, k, seed)
    if keep_vocabulary:
        fitting.pool = model.pool  # the model's own words and assignment (a vladv2 bias too)

    def tensor(src: Any) -> Any:
        if isinstance(src, Undecodable):
            raise ImageError(f"{src.what}: {src.error}")
        return to_tensor(src)

    bad: list[str] = []

    def on_error(i: int, e: ImageError) -> None:
        bad.append(str(e))
        if total is not None and total - len(bad) < MIN_IMAGES:
            raise ImageError(
                f"at most {total - len(bad)} of the {total} images can be decoded, {MIN_IMAGES} are "
                f"needed; {len(bad)} cannot, the first: {bad[0]}"
            )

    maps = backbone_maps(fitting, images, tensor, total=total or 0, progress=progress, on_error=on_error)
    skipped = f" ({len(bad)} undecodable skipped; the first: {bad[0]})" if bad else ""
    if len(maps) < MIN_IMAGES and bad:
        raise ImageError(f"only {len(maps)} images can be decoded, {MIN_IMAGES} are needed{skipped}")
    _check_counts(len(maps), k, d, grid, descs_per_image, patch_sizes, skipped, per_image)
    fit_options = {"fit_clusters": not keep_vocabulary, "patches_per_image": per_image}
    if dinov2:
        final, fit = dinov2_vlad.fitted_model(fitting, maps, rng, d, progress=progress, seed=seed, **fit_options)
        dinov2_vlad.save_dinov2_vlad(final, out)
        features = final.config()
    else:
        state, fit = vgg_fitted_state(encoder, fitting, maps, rng, d, progress=progress, seed=seed, **fit_options)
        save_checkpoint(state, out, d)
        features = {"backbone": "vgg16 conv5_3", "input_height": FIT_SIZE[0], "input_width": FIT_SIZE[1]}
    fitted = {
        "images": len(maps),
        "undecodable": bad,
        "k": k,
        "d": d,
        "seed": seed,
        "per_image": per_image,
        "patch_sizes": patch_sizes,
        "keep_vocabulary": keep_vocabulary,
    }
    meta = _refit_meta(out, checkpoint, info, features, source, fit, fitted)
    write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    return out


# -- the node's cached refit ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedRefit:
    """What :func:`refit_cached` did: the model file to use, whether it was fitted now or found in the
    cache, the seconds it took, and its metadata (empty when the cache lost the JSON)."""

    path: Path
    refitted: bool
    seconds: float
    meta: dict[str, Any]

    def describe(self) -> str:
        f = self.meta.get("fitting", {})
        src = f.get("source", {})
        where = (
            f"bag {src.get('path')} ({src.get('topic')})"
            if src.get("kind") == "bag"
            else ", ".join(src.get("paths", [])) or "?"
        )
        skipped = f", {f['undecodable']} undecodable skipped" if f.get("undecodable") else ""
        return (
            f"{f.get('images', '?')} images of {where}{skipped}: {self.meta.get('num_clusters', '?')} words, "
            f"{self.meta.get('dim', '?')} dimensions, model {self.path}"
        )


def _input_files(path: Path) -> list[Path]:
    if is_bag(path):
        return sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    from pnv_ros.images import list_images

    return list_images([path])


def cache_key(
    checkpoint: str | Path,
    vocabulary: str | Path,
    *,
    topic: str | None = None,
    bit_depth: int | None = None,
    max_images: int = MAX_IMAGES,
) -> str:
    """SHA-256 (hex) of what a refit depends on: the source model's hash, every input file's path, size and
    modification time (an image folder's images; all files of a bag), the topic, bit depth, image bound and
    :data:`REFIT_VERSION`. A changed, added or removed input gives another key, so a restart refits only then."""
    files = []
    for f in _input_files(Path(vocabulary)):
        st = f.stat()
        files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    what = {
        "version": REFIT_VERSION,
        "model": file_sha256(checkpoint),
        "inputs": files,
        "topic": topic or "",
        "bit_depth": bit_depth or 0,
        "max_images": max_images,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def refit_cached(
    checkpoint: str | Path,
    vocabulary: str | Path,
    *,
    topic: str | None = None,
    bit_depth: int | None = None,
    cache_dir: str | Path | None = None,
    max_images: int = MAX_IMAGES,
    log: Callable[[str], None] | None = None,
) -> CachedRefit:
    """The model ``checkpoint`` with its vocabulary refitted on ``vocabulary`` (a folder of images or a bag),
    from the cache (``cache_dir``, default ``<model cache>/refit``) when the same model and inputs were
    fitted before (see :func:`cache_key`), else fitted now and cached. ``log`` hears what is about to happen
    before a (long) fit. Raises as :func:`refit_model`, and BagError / ImageError for a bad source."""
    from pnv_ros.model.checkpoint import checkpoint_info
    from pnv_ros.model.registry import models_dir

    t0 = time.perf_counter()
    vocabulary = Path(vocabulary)
    if not vocabulary.exists():
        raise ConfigError(f"vocabulary images {vocabulary} do not exist (give a folder of images or a bag)")
    key = cache_key(checkpoint, vocabulary, topic=topic, bit_depth=bit_depth, max_images=max_images)
    stem = Path(checkpoint).name.removesuffix(".tar").removesuffix(".pth")
    folder = Path(cache_dir) if cache_dir is not None else models_dir() / "refit"
    out = folder / f"{stem}.refit-{key[:16]}.pth.tar"

    def meta() -> dict[str, Any]:
        try:
            return json.loads(metadata_path(out).read_text())
        except (OSError, ValueError):
            return {}

    if out.is_file():
        try:
            checkpoint_info(out)
            return CachedRefit(out, False, time.perf_counter() - t0, meta())
        except CheckpointError:
            pass  # a damaged cache file: fit again
    imgs = fitting_images(vocabulary, topic=topic, max_images=max_images, bit_depth=bit_depth)
    if log:
        log(f"refitting the vocabulary of {checkpoint} on {len(imgs)} images of {vocabulary} (once: cached as {out})")
    refit_model(checkpoint, imgs, out)
    return CachedRefit(out, True, time.perf_counter() - t0, meta())
