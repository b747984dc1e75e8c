"""PlaceMap: the keyframes a loop closer has seen, searchable.

Holds the global FAISS index, every keyframe's patch descriptors (float32 in
memory), ids and stamps. Saves to one ``.npz`` (never pickled), written to a
temp file and renamed, so a crash during a save leaves the previous map.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pnv_ros.config import Preset
from pnv_ros.errors import MapError, UnknownPlaceError
from pnv_ros.features import PlaceFeatures
from pnv_ros.index import GlobalIndex
from pnv_ros.storage import read_npz, write_npz_atomic

FORMAT = "pnv_ros.place_map"
VERSION = 1


@dataclass
class Keyframe:
    """One stored keyframe. stamp_ns: ROS time in nanoseconds; position: (3,) or None."""

    id: int
    stamp_ns: int
    features: PlaceFeatures
    position: np.ndarray | None = None


class PlaceMap:
    """Incremental keyframe map. Ids are 0, 1, 2, ... in insertion order.

    Patch descriptors are stored as ``patch_dtype`` (float16 by default: half
    the memory; re-ranking decisions on the RTAB-Map loop are unchanged, see
    test/test_place_map.py); global descriptors stay float32 in FAISS.
    """

    def __init__(
        self,
        dim: int,
        preset: Preset,
        model_id: str,
        index_kind: str = "flat",
        patch_dtype: str = "float16",
        memory_budget_mb: float = 0.0,
        spill_dir: str | Path | None = None,
    ) -> None:
        """memory_budget_mb: patch bytes kept in RAM (0 = no limit); beyond it the
        oldest keyframes' patches move to ``spill_dir`` (a temp folder by default)
        as memory-mapped files, read on demand when they are candidates."""
        if patch_dtype not in ("float16", "float32"):
            raise MapError(f"patch_dtype {patch_dtype!r}: use float16 or float32")
        if memory_budget_mb < 0:
            raise MapError(f"memory_budget_mb {memory_budget_mb} must be >= 0")
        self.dim, self.preset, self.model_id, self.index_kind = dim, preset, model_id, index_kind
        self.patch_dtype = np.dtype(patch_dtype)
        self.memory_budget = int(memory_budget_mb * 2**20)
        self._spill_dir = Path(spill_dir) if spill_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.ram_patch_bytes = 0
        self.spilled = 0  # keyframes [0, spilled) have their patches on disk
        self.index = GlobalIndex(dim, index_kind)
        self.keyframes: list[Keyframe] = []

    def __len__(self) -> int:
        return len(self.keyframes)

    def add(self, features: PlaceFeatures, stamp_ns: int, position: np.ndarray | None = None) -> int:
        kf_id = self._store(features, stamp_ns, position)
        self.index.add(features.global_desc)
        return kf_id

    def _store(self, features: PlaceFeatures, stamp_ns: int, position: np.ndarray | None) -> int:
        """Keep a keyframe (patches as ``patch_dtype``, within the budget); the caller indexes its global descriptor."""
        stored = PlaceFeatures(
            np.asarray(features.global_desc, np.float32),
            [np.ascontiguousarray(p, dtype=self.patch_dtype) for p in features.patches],
            features.image_size,
        )
        kf = Keyframe(len(self.keyframes), int(stamp_ns), stored, position)
        self.keyframes.append(kf)
        self.ram_patch_bytes += sum(p.nbytes for p in stored.patches)
        if self.memory_budget:
            self._enforce_budget()
        return kf.id

    def _enforce_budget(self) -> None:
        """Move the oldest in-RAM keyframes' patches to memory-mapped files."""
        while self.ram_patch_bytes > self.memory_budget and self.spilled < len(self.keyframes) - 1:
            if self._spill_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="pnv_map_spill_")
                self._spill_dir = Path(self._tmp.name)
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            kf = self.keyframes[self.spilled]
            mapped = []
            for s, p in enumerate(kf.features.patches):
                f = self._spill_dir / f"kf{kf.id:08d}_s{s}.npy"
                np.save(f, p, allow_pickle=False)
                mapped.append(np.load(f, mmap_mode="r"))
                self.ram_patch_bytes -= p.nbytes
            kf.features = PlaceFeatures(kf.features.global_desc, mapped, kf.features.image_size)
            self.spilled += 1

    def get(self, kf_id: int) -> Keyframe:
        if not 0 <= int(kf_id) < len(self.keyframes):
            raise UnknownPlaceError(f"unknown keyframe id {kf_id}: the map holds ids 0..{len(self.keyframes) - 1}")
        return self.keyframes[int(kf_id)]

    def by_stamp(self, stamp_ns: int, tolerance_ns: int = 1_000_000) -> Keyframe:
        """The keyframe with this stamp (within tolerance, default 1 ms)."""
        if self.keyframes:
            stamps = np.array([k.stamp_ns for k in self.keyframes])
            i = int(np.argmin(np.abs(stamps - stamp_ns)))
            if abs(int(stamps[i]) - stamp_ns) <= tolerance_ns:
                return self.keyframes[i]
        raise UnknownPlaceError(f"no keyframe with stamp {stamp_ns / 1e9:.6f} s (within {tolerance_ns / 1e6:g} ms)")

    def nbytes_per_keyframe(self) -> float:
        if not self.keyframes:
            return 0.0
        f = self.keyframes[0].features
        return float(f.global_desc.nbytes + sum(p.nbytes for p in f.patches) + 8)

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        meta = {"format": FORMAT, "version": VERSION, "dim": self.dim, "preset": self.preset.to_dict(),
                "model_id": self.model_id, "index_kind": self.index_kind, "count": len(self),
                "patch_dtype": self.patch_dtype.name}  # fmt: skip
        n = len(self)
        arrays = {
            "meta": np.array(json.dumps(meta)),
            "stamps": np.array([k.stamp_ns for k in self.keyframes], dtype=np.int64),
            "global": np.stack([k.features.global_desc for k in self.keyframes])
            if n
            else np.zeros((0, self.dim), np.float32),
            "image_sizes": np.array([k.features.image_size for k in self.keyframes], dtype=np.int64).reshape(n, 2),
            "positions": np.array(
                [k.position if k.position is not None else [np.nan] * 3 for k in self.keyframes], dtype=np.float64
            ).reshape(n, 3),
        }
        for s, size in enumerate(self.preset.patch_sizes):
            arrays[f"patches_p{size}"] = (
                np.stack([k.features.patches[s] for k in self.keyframes])
                if n
                else np.zeros((0, self.preset.num_patches(s), self.dim), self.patch_dtype)
            )
        write_npz_atomic(path, arrays, sync=True)

    @classmethod
    def load(
        cls,
        path: str | Path,
        expect_dim: int | None = None,
        expect_preset: Preset | None = None,
        memory_budget_mb: float = 0.0,
        spill_dir: str | Path | None = None,
    ) -> PlaceMap:
        path = Path(path)
        data, meta = read_npz(path, MapError, "map file")
        if meta.get("format") != FORMAT:
            raise MapError(f"map file {path} is not a pnv_ros map")
        if meta.get("version") != VERSION:
            raise MapError(f"map file {path} has version {meta.get('version')}; this pnv_ros reads {VERSION}")
        preset = Preset.from_dict(meta["preset"])
        if expect_dim is not None and meta["dim"] != expect_dim:
            raise MapError(f"map file {path} holds {meta['dim']}-d descriptors, the loaded model makes {expect_dim}-d")
        if expect_preset is not None and (preset.patch_sizes, preset.strides) != (
            expect_preset.patch_sizes,
            expect_preset.strides,
        ):
            raise MapError(
                f"map file {path} was made with patch sizes {list(preset.patch_sizes)}, the node runs "
                f"{list(expect_preset.patch_sizes)}: use the same preset"
            )
        m = cls(meta["dim"], expect_preset or preset, meta.get("model_id", ""), meta.get("index_kind", "flat"),
                meta.get("patch_dtype", "float32"), memory_budget_mb, spill_dir)  # fmt: skip
        try:
            count = int(meta["count"])
            patches = [data[f"patches_p{s}"] for s in preset.patch_sizes]
            global_descs = np.asarray(data["global"], np.float32)
            if global_descs.shape != (count, m.dim):
                raise ValueError(f"global descriptors of shape {global_descs.shape} for {count} keyframes")
            for i in range(count):
                pos = data["positions"][i]
                f = PlaceFeatures(
                    global_descs[i], [p[i] for p in patches], tuple(int(v) for v in data["image_sizes"][i])
                )
                m._store(f, int(data["stamps"][i]), None if np.isnan(pos).any() else pos)
        except (KeyError, IndexError, ValueError) as e:
            raise MapError(f"map file {path} is inconsistent: {e}") from None
        # One add for all, after the file has been read whole and checked. An
        # HNSW graph is rebuilt, not stored: about its build time (0.14 ms a
        # keyframe at 100k; one at a time measured the same, 0.13 ms:
        # benchmarks/scale_index.py --one-at-a-time).
        m.index.add(global_descs)
        return m
