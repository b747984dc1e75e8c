"""PlaceMap: the keyframes a loop closer has seen, searchable, that cannot disagree with itself.

One store holds, per keyframe id (0, 1, 2, ... in insertion order): the
global descriptor (in the FAISS index only, not twice), the per-scale patch
descriptors, the ROS stamp, the image size, an optional position and the
optional local features (:class:`~pnv_ros.local_features.LocalFeatures`:
SIFT keypoints, descriptors, rays, depth points; a ragged number per
keyframe) that the relative pose of a later loop to this keyframe needs.

- **Transactional adds.** :meth:`PlaceMap.add` checks and converts
  everything first, adds to FAISS last of what can fail, then commits the
  rest together; an exception leaves the map exactly as it was, so ids in the
  index, the stamp array and the patch store never drift apart.
  :meth:`check` asserts that invariant (run after every change when
  ``PNV_CHECK_INVARIANTS=1``, as the tests do).
- **Patches per scale in a handful of arrays**: the loaded map's arrays
  (memory-mapped from its file), one append-only spill file per scale
  (memory-mapped), and RAM for the newest keyframes. With a memory budget the
  oldest RAM keyframes move to the spill files; a failed spill (disk full, no
  file descriptors) keeps them in RAM, is counted and reported by
  :attr:`trouble`, and loses nothing. Local features are stored the same way
  (loaded file | one spill file of 160-byte keypoint records | RAM), count in
  the same budget and spill with their keyframe's patches.
- **Files** (``.npz``, uncompressed, never pickled; see :mod:`pnv_ros.storage`)
  record the model identity (checkpoint hash), the full preset and input
  size; :meth:`load` memory-maps the patches, so the budget holds after a
  load, and refuses a map from another model or layout naming both.
  :meth:`snapshot` takes what a save needs in O(keyframes) small copies (for
  use under a lock) and :meth:`MapSnapshot.write` streams the patches to disk
  afterwards, so a save never stacks the map in RAM nor holds a lock for it.
  Local features are six optional arrays (``local_offsets``, ``local_flags``,
  ``local_keypoints``, ``local_descriptors``, ``local_rays``, ``local_points``;
  see :class:`_LocalColumn`): maps written before them (no such arrays) load
  with no local features, and an older pnv_ros reads a newer map and ignores
  them, so the file version stays 2.
- **Patch selection** (``Preset.patch_keep`` < 1): each keyframe stores its
  kept patches (P'_s per scale) and their grid indices, (P'_s,) int16 per
  scale, held in RAM (2 bytes a patch) and saved as ``patch_index_p{size}``
  (N, P'_s); the preset in the file records the fraction, so a map of another
  fraction is refused, and an older pnv_ros refuses the preset's unknown field.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pnv_ros.config import Preset
from pnv_ros.errors import FeaturesError, MapError, UnknownPlaceError
from pnv_ros.features import PlaceFeatures, check_fits, check_patch_index
from pnv_ros.index import GlobalIndex
from pnv_ros.local_features import LocalFeatures
from pnv_ros.storage import NpzWriter, read_npz

FORMAT = "pnv_ros.place_map"
VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Spill at least this many keyframes at once when over budget (one re-map per batch, not per keyframe).
SPILL_BATCH = 8


#: Default spill folders: ``<temp>/pnv_map_spill_<pid>_<random>`` (the owner's pid, for :func:`remove_stale_spills`).
SPILL_PREFIX = "pnv_map_spill_"


def remove_stale_spills(temp_dir: str | Path | None = None) -> list[Path]:
    """Remove the default spill folders (in ``temp_dir``, default the system temp folder) whose owner process is
    gone: a node killed (SIGKILL, power loss) never removes its own, and each can hold gigabytes. Folders of
    live processes, of other users' processes and without a pid in their name are kept. Returns those removed."""
    import shutil

    removed = []
    for d in Path(temp_dir or tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*_*"):
        pid = d.name[len(SPILL_PREFIX) :].split("_", 1)[0]
        if pid.isdigit() and d.is_dir() and not d.is_symlink() and not _process_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: the existence and permission check only
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_invariants_enabled() -> bool:
    return os.environ.get("PNV_CHECK_INVARIANTS", "") not in ("", "0")


@dataclass
class Keyframe:
    """One stored keyframe. stamp_ns: ROS time in nanoseconds; position: (3,) or None."""

    id: int
    stamp_ns: int
    features: PlaceFeatures
    position: np.ndarray | None = None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:  # pragma: no cover - already gone; a memory map may still hold the inode
        pass


def _spill_file(owner: object, folder: Path, prefix: str) -> Path:
    """A new empty spill file in folder, removed when owner is collected (a file of its own: ids of dead
    objects are reused)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".bin")
    os.close(fd)
    path = Path(name)
    weakref.finalize(owner, _unlink, path)
    return path


def _append_and_map(path: Path, rows: list[np.ndarray], dtype, shape: tuple[int, ...]) -> np.memmap:
    """Append the rows' bytes to a spill file and map the whole file read-only as ``shape`` of ``dtype``; on any
    error the file is cut back to its old length (nothing changes) and the error goes on."""
    size = path.stat().st_size
    try:
        with open(path, "ab") as f:
            for r in rows:
                f.write(memoryview(np.ascontiguousarray(r).reshape(-1)).cast("B"))
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    except BaseException:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise


class _Column:
    """Patches (N, P, D) of one scale: [loaded file | spill file | RAM], in id order."""

    def __init__(self, num_patches: int, dim: int, dtype: np.dtype) -> None:
        self.p, self.d, self.dtype = num_patches, dim, dtype
        self.base: np.ndarray = np.empty((0, num_patches, dim), dtype)  # loaded map (memory-mapped)
        self.spill: np.ndarray = np.empty((0, num_patches, dim), dtype)  # spill file (memory-mapped)
        self.spill_path: Path | None = None
        self.ram: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.base) + len(self.spill) + len(self.ram)

    def row(self, i: int) -> np.ndarray:
        nb, ns = len(self.base), len(self.spill)
        if i < nb:
            return self.base[i]
        if i < nb + ns:
            return self.spill[i - nb]
        return self.ram[i - nb - ns]

    def segments(self) -> list[np.ndarray]:
        """The stored rows as arrays (N_k, P, D) in id order (references, not copies)."""
        return [a for a in (self.base, self.spill) if len(a)] + [r[None] for r in self.ram]

    def spill_oldest(self, k: int, folder: Path) -> None:
        """Append the k oldest RAM rows to this scale's spill file and map it; on error nothing changes."""
        rows = self.ram[:k]
        if self.spill_path is None:  # a file of its own (ids of dead objects are reused), removed with the column
            self.spill_path = _spill_file(self, folder, f"patches_{self.p}x{self.d}_")
        n = len(self.spill) + len(rows)
        self.spill = _append_and_map(self.spill_path, rows, self.dtype, (n, self.p, self.d))
        del self.ram[:k]


#: One local-feature keypoint as stored in RAM and in the spill file: keypoint (x, y) px, SIFT descriptor, ray,
#: 3-D point (metres); NaN ray / point where the keyframe has none. 8 + 128 + 12 + 12 = 160 bytes.
LOCAL_RECORD = np.dtype([("kp", "<f4", (2,)), ("desc", "u1", (128,)), ("ray", "<f4", (3,)), ("pt", "<f4", (3,))])
#: Per-keyframe flags of the local features (``local_flags`` in the file).
HAS_LOCAL, HAS_RAYS, HAS_POINTS = 1, 2, 4
#: The local-feature arrays of a map file: name -> (row shape, dtype); rows are keypoints of all keyframes in id
#: order, keyframe i's at ``local_offsets[i]:local_offsets[i + 1]``.
LOCAL_ARRAYS = {
    "local_keypoints": ((2,), np.dtype("float32")),
    "local_descriptors": ((128,), np.dtype("uint8")),
    "local_rays": ((3,), np.dtype("float32")),
    "local_points": ((3,), np.dtype("float32")),
}


def local_record(local: LocalFeatures | None) -> tuple[int, np.ndarray]:
    """A keyframe's local features as (flags, read-only records (N,) of :data:`LOCAL_RECORD`).

    Raises MapError: keypoints not (N, 2) finite, descriptors not (N, 128) uint8, rays not (N, 3) finite, points
    not (N, 3) finite or NaN."""
    if local is None:
        return 0, np.empty(0, LOCAL_RECORD)
    kp, desc = np.asarray(local.keypoints), np.asarray(local.descriptors)
    n = kp.shape[0] if kp.ndim == 2 else -1
    if kp.shape != (n, 2) or not np.isfinite(kp).all():
        raise MapError(f"local keypoints of shape {kp.shape} are not (N, 2) finite pixels")
    if desc.shape != (n, 128) or desc.dtype != np.uint8:
        raise MapError(f"local descriptors {desc.shape} {desc.dtype} do not fit {n} keypoints: (N, 128) uint8")
    rec = np.empty(n, LOCAL_RECORD)
    rec["kp"], rec["desc"], flags = kp, desc, HAS_LOCAL
    for name, key, bit in (("rays", "ray", HAS_RAYS), ("points", "pt", HAS_POINTS)):
        a = getattr(local, name)
        if a is None:
            rec[key] = np.nan
            continue
        a = np.asarray(a)
        if a.shape != (n, 3) or np.isinf(a).any() or (name == "rays" and not np.isfinite(a).all()):
            raise MapError(f"local {name} of shape {a.shape} do not fit {n} keypoints: (N, 3) finite")
        rec[key], flags = a, flags | bit
    rec.setflags(write=False)
    return flags, rec


def _unpack(flags: int, kp, desc, rays, pts) -> LocalFeatures | None:
    if not flags & HAS_LOCAL:
        return None
    c = np.ascontiguousarray
    return LocalFeatures(
        c(kp, np.float32),
        c(desc, np.uint8),
        c(rays, np.float32) if flags & HAS_RAYS else None,
        c(pts, np.float32) if flags & HAS_POINTS else None,
    )


class _LocalColumn:
    """Local features of every keyframe: [loaded file | spill file | RAM], in id order, like :class:`_Column`.

    Loaded: the file's four ``local_*`` arrays (memory-mapped) with offsets (nb + 1,) and flags (nb,). Spill:
    one append-only file of :data:`LOCAL_RECORD` rows (memory-mapped), made at the first keypoint to spill.
    RAM: (flags, records) per keyframe.
    """

    def __init__(self) -> None:
        self.base: dict[str, np.ndarray] = {k: np.empty((0, *r), d) for k, (r, d) in LOCAL_ARRAYS.items()}
        self.base_offsets, self.base_flags = np.zeros(1, np.int64), np.zeros(0, np.uint8)
        self.spill: np.ndarray = np.empty(0, LOCAL_RECORD)
        self.spill_offsets, self.spill_flags = np.zeros(1, np.int64), np.zeros(0, np.uint8)
        self.spill_path: Path | None = None
        self.ram: list[tuple[int, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self.base_flags) + len(self.spill_flags) + len(self.ram)

    @property
    def ram_bytes(self) -> int:
        return sum(r.nbytes for _, r in self.ram)

    @property
    def keypoints(self) -> int:
        """Keypoints stored, of all keyframes."""
        return int(self.base_offsets[-1] + self.spill_offsets[-1]) + sum(len(r) for _, r in self.ram)

    def get(self, i: int) -> LocalFeatures | None:
        nb, ns = len(self.base_flags), len(self.spill_flags)
        if i < nb:
            a, b = self.base_offsets[i], self.base_offsets[i + 1]
            return _unpack(int(self.base_flags[i]), *(self.base[k][a:b] for k in LOCAL_ARRAYS))
        if i < nb + ns:
            a, b = self.spill_offsets[i - nb], self.spill_offsets[i - nb + 1]
            r = self.spill[a:b]
            return _unpack(int(self.spill_flags[i - nb]), r["kp"], r["desc"], r["ray"], r["pt"])
        flags, r = self.ram[i - nb - ns]
        return _unpack(flags, r["kp"], r["desc"], r["ray"], r["pt"])

    def spill_oldest(self, k: int, folder: Path) -> None:
        """Append the k oldest RAM keyframes' records to the spill file and map it; on error nothing changes."""
        rows = self.ram[:k]
        n_new = sum(len(r) for _, r in rows)
        total = len(self.spill) + n_new
        if n_new and self.spill_path is None:
            self.spill_path = _spill_file(self, folder, "local_features_")
        mapped = self.spill
        if n_new:
            mapped = _append_and_map(self.spill_path, [r for _, r in rows], LOCAL_RECORD, (total,))
        counts = np.array([len(r) for _, r in rows], np.int64)
        self.spill_offsets = np.concatenate([self.spill_offsets, self.spill_offsets[-1] + np.cumsum(counts)])
        self.spill_flags = np.concatenate([self.spill_flags, np.array([f for f, _ in rows], np.uint8)])
        self.spill = mapped
        del self.ram[:k]

    def snapshot(self, n: int) -> _LocalSnapshot:
        """What a save of the first n keyframes needs: small copies, references to immutable rows."""
        return _LocalSnapshot(
            dict(self.base),
            self.base_offsets.copy(),
            self.base_flags.copy(),
            self.spill,
            self.spill_offsets.copy(),
            self.spill_flags.copy(),
            list(self.ram),
            n,
        )

    def load(self, path: Path, data: dict[str, np.ndarray], count: int) -> None:
        """Take a map file's local arrays (none: no keyframe has local features). Raises MapError when they are
        partial, of the wrong shape or dtype, inconsistent with each other or hold impossible values."""
        names = ["local_offsets", "local_flags", *LOCAL_ARRAYS]
        have = [k for k in names if k in data]
        if not have:
            self.base_offsets, self.base_flags = np.zeros(count + 1, np.int64), np.zeros(count, np.uint8)
            return
        if len(have) != len(names):
            raise MapError(
                f"map file {path} has {', '.join(have)} but lacks {', '.join(sorted(set(names) - set(have)))}"
            )
        off, flags = data["local_offsets"], data["local_flags"]
        if (
            off.shape != (count + 1,)
            or off.dtype.kind not in "iu"
            or flags.shape != (count,)
            or flags.dtype != np.uint8
        ):
            raise MapError(
                f"map file {path}: local_offsets {off.shape} {off.dtype} / local_flags {flags.shape} {flags.dtype} "
                f"do not fit {count} keyframes ((count + 1,) integers, (count,) uint8)"
            )
        off, flags = np.asarray(off, np.int64), np.asarray(flags, np.uint8)
        total = len(data["local_keypoints"])
        counts = np.diff(off)
        if off[0] != 0 or (counts < 0).any() or off[-1] != total:
            raise MapError(f"map file {path}: local_offsets are not 0 .. {total} in ascending order")
        without = (flags & HAS_LOCAL) == 0
        if (flags & ~np.uint8(HAS_LOCAL | HAS_RAYS | HAS_POINTS)).any() or (
            without & ((counts > 0) | (flags > 0))
        ).any():
            raise MapError(f"map file {path}: local_flags hold unknown bits or keypoints of a keyframe without them")
        for k, (row, dtype) in LOCAL_ARRAYS.items():
            a = data[k]
            if a.shape != (total, *row) or a.dtype != dtype:
                raise MapError(f"map file {path}: '{k}' is {a.shape} {a.dtype}, expected {(total, *row)} {dtype}")
        rays_kept = np.repeat(flags & HAS_RAYS > 0, counts)
        if not np.isfinite(data["local_keypoints"]).all() or not np.isfinite(data["local_rays"][rays_kept]).all():
            raise MapError(f"map file {path}: local keypoints or rays hold NaN or infinity")
        if np.isinf(data["local_points"]).any():
            raise MapError(f"map file {path}: local points hold infinity")
        self.base = {k: data[k] for k in LOCAL_ARRAYS}
        self.base_offsets, self.base_flags = off, flags


@dataclass
class _LocalSnapshot:
    """The local features of a map snapshot; :meth:`write` streams them into its file."""

    base: dict[str, np.ndarray]
    base_offsets: np.ndarray
    base_flags: np.ndarray
    spill: np.ndarray
    spill_offsets: np.ndarray
    spill_flags: np.ndarray
    ram: list[tuple[int, np.ndarray]]
    n: int

    def _parts(self) -> tuple[np.ndarray, np.ndarray, int, int, int]:
        nb, ns = len(self.base_flags), len(self.spill_flags)
        kb, ks, kr = min(self.n, nb), min(max(self.n - nb, 0), ns), max(self.n - nb - ns, 0)
        counts = np.concatenate(
            [np.diff(self.base_offsets)[:kb], np.diff(self.spill_offsets)[:ks], [len(r) for _, r in self.ram[:kr]]]
        ).astype(np.int64)
        flags = np.concatenate([self.base_flags[:kb], self.spill_flags[:ks], [f for f, _ in self.ram[:kr]]])
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), flags.astype(np.uint8), kb, ks, kr

    def write(self, w: NpzWriter) -> None:
        offsets, flags, kb, ks, kr = self._parts()
        w.add("local_offsets", offsets)
        w.add("local_flags", flags)
        fields = {"local_keypoints": "kp", "local_descriptors": "desc", "local_rays": "ray", "local_points": "pt"}
        for k, (row, dtype) in LOCAL_ARRAYS.items():
            f = fields[k]
            blocks = [
                *_blocks(self.base[k], int(self.base_offsets[kb])),
                *_blocks(self.spill[f], int(self.spill_offsets[ks])),
                *(r[f] for _, r in self.ram[:kr]),
            ]
            w.add_blocks(k, (int(offsets[-1]), *row), dtype, blocks)


def _blocks(a: np.ndarray, n: int, block: int = 1 << 16):
    """The first n rows of a in blocks of at most ``block`` rows."""
    return (a[i : min(n, i + block)] for i in range(0, n, block))


class PlaceMap:
    """Incremental keyframe map. Ids are 0, 1, 2, ... in insertion order.

    Args:
        dim: descriptor dimension D.
        preset: the layout (patch sizes, strides, input size) of the stored patches.
        model_id: identity of the checkpoint (``name:dim:sha256-prefix``).
        index_kind: 'flat' (exact) or 'hnsw' (see :class:`GlobalIndex`).
        patch_dtype: float16 (default: half the memory; re-ranking decisions on
            the RTAB-Map loop unchanged, see test/test_place_map.py) or float32.
        memory_budget_mb: MB of patches and local features kept in RAM (0 = no
            limit); beyond it the oldest keyframes' patches and local features go
            to memory-mapped spill files in ``spill_dir`` (a temp folder by
            default), one per scale and one for local features.

    Not thread-safe: one owner (the detector) serialises calls.
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
        if patch_dtype not in ("float16", "float32"):
            raise MapError(f"patch_dtype {patch_dtype!r}: use float16 or float32")
        if not memory_budget_mb >= 0:
            raise MapError(f"memory_budget_mb {memory_budget_mb} must be >= 0")
        self.dim, self.preset, self.model_id, self.index_kind = int(dim), preset, model_id, index_kind
        self.patch_dtype = np.dtype(patch_dtype)
        self.memory_budget = int(memory_budget_mb * 2**20)
        self._spill_dir = Path(spill_dir) if spill_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.index = GlobalIndex(dim, index_kind)
        self._cols = [
            _Column(preset.kept_patches(s), self.dim, self.patch_dtype) for s in range(len(preset.patch_sizes))
        ]
        #: per scale (capacity, P'_s) int16 grid indices of the kept patches (patch selection), else None
        self._pidx: list[np.ndarray] | None = None
        if preset.selects_patches:
            self._pidx = [np.zeros((0, c.p), np.int16) for c in self._cols]
        self._local = _LocalColumn()
        self._n = 0
        self._stamps = np.zeros(0, np.int64)
        self._positions = np.zeros((0, 3), np.float64)
        self._sizes = np.zeros((0, 2), np.int64)
        self.ram_patch_bytes = 0  # RAM bytes of the stored patches (the loaded and spilled ones are on disk)
        self.ram_local_bytes = 0  # RAM bytes of the stored local features; the budget holds for the two together
        self.spill_failures = 0
        self.trouble: str | None = None  # the store's problem now (a spill failing), for diagnostics
        #: what the owner noted in the file this map was loaded from (``MapSnapshot.notes``; {} for a new map)
        self.notes: dict = {}

    def __len__(self) -> int:
        return self._n

    @property
    def stamps(self) -> np.ndarray:
        """(N,) int64 ROS stamps in id order (a read-only view)."""
        v = self._stamps[: self._n]
        v.flags.writeable = False
        return v

    @property
    def positions(self) -> np.ndarray:
        """(N, 3) float64 positions in id order, NaN where unknown (a read-only view)."""
        v = self._positions[: self._n]
        v.flags.writeable = False
        return v

    @property
    def keyframes_on_disk(self) -> int:
        """Keyframes whose patches (and local features) are memory-mapped (loaded or spilled), not in RAM."""
        c = self._cols[0]
        return len(c.base) + len(c.spill)

    # -- changes --------------------------------------------------------------------------
    def add(self, features: PlaceFeatures, stamp_ns: int, position: np.ndarray | None = None) -> int:
        """Store a keyframe; returns its id. All or nothing: on any error the map is unchanged.

        features: global (D,), patches per scale (P_s, D), optional local features (``features.local``: keypoints
        (N, 2), descriptors (N, 128) uint8, rays (N, 3) or None, points (N, 3) or None; stored as copies);
        position: (3,) or None. Raises MapError when the features do not fit this map.
        """
        glob = self.check_fits(features)
        patches = [np.array(p, dtype=self.patch_dtype, order="C", copy=True) for p in features.patches]
        local = local_record(features.local)
        pos = np.full(3, np.nan) if position is None else np.asarray(position, np.float64).reshape(3)
        size = np.asarray(features.image_size, np.int64).reshape(2)
        self._reserve(self._n + 1)
        self.index.add(glob)  # the last step that can fail; everything after it cannot
        for c, p in zip(self._cols, patches):
            c.ram.append(p)
        self._local.ram.append(local)
        i = self._n
        self._stamps[i], self._positions[i], self._sizes[i] = int(stamp_ns), pos, size
        if self._pidx is not None:
            for a, idx in zip(self._pidx, features.patch_index):
                a[i] = idx
        self._n = i + 1
        self.ram_patch_bytes += sum(p.nbytes for p in patches)
        self.ram_local_bytes += local[1].nbytes
        self._enforce_budget()
        if check_invariants_enabled():
            self.check()
        return i

    def check_fits(self, features: PlaceFeatures) -> np.ndarray:
        """Raise MapError unless the features have this map's shapes (global (D,) finite, patches
        (P_s, D) per scale); returns the global descriptor as float32 (D,)."""
        glob = np.asarray(features.global_desc, np.float32).reshape(-1)
        if glob.shape != (self.dim,) or not np.isfinite(glob).all():
            raise MapError(
                f"global descriptor of shape {glob.shape} (finite: {np.isfinite(glob).all()}) "
                f"does not fit this {self.dim}-d map"
            )
        if len(features.patches) != len(self._cols):
            raise MapError(f"{len(features.patches)} patch scales for a map of {len(self._cols)}")
        for c, p in zip(self._cols, features.patches):
            if tuple(np.shape(p)) != (c.p, c.d):
                raise MapError(f"patches of shape {tuple(np.shape(p))} do not fit this map's ({c.p}, {c.d})")
        try:
            check_patch_index(features.patch_index, self.preset, "a keyframe's features")
        except FeaturesError as e:
            raise MapError(str(e)) from None
        return glob

    def _reserve(self, n: int) -> None:
        cap = len(self._stamps)
        if n <= cap:
            return
        cap = max(n, 2 * cap, 64)
        stamps, pos, sizes = np.zeros(cap, np.int64), np.full((cap, 3), np.nan), np.zeros((cap, 2), np.int64)
        stamps[: self._n], pos[: self._n], sizes[: self._n] = (
            self._stamps[: self._n],
            self._positions[: self._n],
            self._sizes[: self._n],
        )
        self._stamps, self._positions, self._sizes = stamps, pos, sizes
        if self._pidx is not None:
            grown = [np.zeros((cap, a.shape[1]), np.int16) for a in self._pidx]
            for g, a in zip(grown, self._pidx):
                g[: self._n] = a[: self._n]
            self._pidx = grown

    def _enforce_budget(self) -> None:
        """Move the oldest RAM keyframes' patches and local features to the spill files; a failure keeps them in
        RAM."""
        ram = self.ram_patch_bytes + self.ram_local_bytes
        if not self.memory_budget or ram <= self.memory_budget:
            return
        cols = [*self._cols, self._local]
        ram_rows = min(len(c.ram) for c in cols)
        per_kf = sum(c.p * c.d for c in self._cols) * self.patch_dtype.itemsize  # RAM rows are patch_dtype
        per_kf += self.ram_local_bytes // max(1, len(self._local.ram))  # the mean of the RAM keyframes
        keep = ram_rows - min(ram_rows - 1, max(SPILL_BATCH, -(-(ram - self.memory_budget) // per_kf)))
        if keep >= ram_rows:
            return
        try:
            folder = self._spill_folder()
            for c in cols:  # a column left longer by an earlier failed try catches up here
                if len(c.ram) > keep:
                    c.spill_oldest(len(c.ram) - keep, folder)
            self.trouble = None  # recovered (disk space freed): the failures stay counted
        except (OSError, ValueError, MemoryError) as e:
            self.spill_failures += 1
            self.trouble = f"patch spill to disk failed ({type(e).__name__}: {e}); keeping them in RAM"
        finally:
            self.ram_patch_bytes = sum(r.nbytes for c in self._cols for r in c.ram)
            self.ram_local_bytes = self._local.ram_bytes

    def _spill_folder(self) -> Path:
        if self._spill_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{SPILL_PREFIX}{os.getpid()}_")
            self._spill_dir = Path(self._tmp.name)
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        return self._spill_dir

    def check(self) -> None:
        """Assert the store's invariant: every part holds exactly N keyframes. Raises MapError."""
        n = self._n
        lens = {
            "faiss": len(self.index),
            **{f"patches_p{s}": len(c) for s, c in zip(self.preset.patch_sizes, self._cols)},
            "local_features": len(self._local),
        }
        bad = {k: v for k, v in lens.items() if v != n}
        if bad or len(self._stamps) < n:
            raise MapError(f"map store out of step: {n} keyframes but {bad}")

    # -- reads ----------------------------------------------------------------------------
    def _check_id(self, kf_id: int) -> int:
        i = int(kf_id)
        if not 0 <= i < self._n:
            held = f"ids 0..{self._n - 1}" if self._n else "no keyframes"
            raise UnknownPlaceError(f"unknown keyframe id {kf_id}: the map holds {held}")
        return i

    def patches(self, kf_id: int) -> list[np.ndarray]:
        """Per scale (P_s, D) patch descriptors of one keyframe (views; memory-mapped ones read-only)."""
        i = self._check_id(kf_id)
        return [c.row(i) for c in self._cols]

    def patch_index(self, kf_id: int) -> list[np.ndarray] | None:
        """Per scale (P'_s,) int16 grid indices of one keyframe's stored patches (read-only views), or None when
        the map keeps every patch (``preset.patch_keep`` 1). Raises UnknownPlaceError."""
        i = self._check_id(kf_id)
        if self._pidx is None:
            return None
        out = [a[i] for a in self._pidx]
        for v in out:
            v.flags.writeable = False
        return out

    def local_features(self, kf_id: int) -> LocalFeatures | None:
        """A keyframe's local features (contiguous copies, safe to use outside the owner's lock), or None when it
        has none (added without, or from a map written before local features). Raises UnknownPlaceError."""
        return self._local.get(self._check_id(kf_id))

    def image_size(self, kf_id: int) -> tuple[int, int]:
        """(width, height) of a keyframe's original image. Raises UnknownPlaceError."""
        i = self._check_id(kf_id)
        return int(self._sizes[i, 0]), int(self._sizes[i, 1])

    def get(self, kf_id: int) -> Keyframe:
        """One keyframe (global descriptor from the index, local features copied). Raises UnknownPlaceError."""
        i = self._check_id(kf_id)
        pos = self._positions[i]
        f = PlaceFeatures(
            self.index.reconstruct(i),
            [c.row(i) for c in self._cols],
            self.image_size(i),
            self._local.get(i),
            self.patch_index(i),
        )
        return Keyframe(i, int(self._stamps[i]), f, None if np.isnan(pos).any() else pos.copy())

    def by_stamp(self, stamp_ns: int, tolerance_ns: int = 1_000_000) -> Keyframe:
        """The keyframe with this stamp (within tolerance, default 1 ms); the newest when a reset
        clock made stamps repeat. Raises UnknownPlaceError."""
        if self._n:
            d = np.abs(self._stamps[: self._n] - int(stamp_ns))
            best = d.min()
            if best <= tolerance_ns:
                return self.get(int(np.flatnonzero(d == best)[-1]))
        raise UnknownPlaceError(f"no keyframe with stamp {stamp_ns / 1e9:.6f} s (within {tolerance_ns / 1e6:g} ms)")

    def nbytes_per_keyframe(self) -> float:
        """Bytes one keyframe takes: global float32 + patches at patch_dtype + stamp + the mean of its local
        features (:data:`LOCAL_RECORD`, 160 bytes a keypoint)."""
        if not self._n:
            return 0.0
        local = self._local.keypoints * LOCAL_RECORD.itemsize / self._n
        index = sum(c.p for c in self._cols) * 2 if self._pidx is not None else 0  # int16 grid indices
        return float(self.dim * 4 + sum(c.p * c.d for c in self._cols) * self.patch_dtype.itemsize + 8 + index) + local

    # -- persistence ----------------------------------------------------------------------
    def snapshot(self) -> MapSnapshot:
        """What a save needs, taken now (small copies and references to immutable patch rows)."""
        n = self._n
        glob = np.zeros((n, self.dim), np.float32)
        for a in range(0, n, 65536):
            glob[a : min(n, a + 65536)] = self.index.reconstruct_n(a, min(n, a + 65536) - a)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dim": self.dim,
            "preset": self.preset.to_dict(),
            "model_id": self.model_id,
            "index_kind": self.index_kind,
            "count": n,
            "patch_dtype": self.patch_dtype.name,
        }
        return MapSnapshot(
            meta,
            self._stamps[:n].copy(),
            self._positions[:n].copy(),
            self._sizes[:n].copy(),
            glob,
            [c.segments() for c in self._cols],
            list(self.preset.patch_sizes),
            [(c.p, c.d) for c in self._cols],
            self.patch_dtype,
            self._local.snapshot(n),
            None if self._pidx is None else [a[:n].copy() for a in self._pidx],
        )

    def save(self, path: str | Path) -> None:
        """Write the map atomically to ``path`` (.npz). Raises OSError (the old file stays)."""
        self.snapshot().write(path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        expect_dim: int | None = None,
        expect_preset: Preset | None = None,
        memory_budget_mb: float = 0.0,
        spill_dir: str | Path | None = None,
        *,
        expect_model_id: str = "",
        index_kind: str | None = None,
        patch_dtype: str | None = None,
    ) -> PlaceMap:
        """Read a map, its patches memory-mapped. Raises MapError for anything wrong with the file
        or when it comes from another model (``expect_model_id``, ``expect_dim``) or patch layout
        (``expect_preset``). index_kind / patch_dtype: the caller's choice (default: the file's)."""
        path = Path(path)
        data, meta = read_npz(path, MapError, "map file", mmap_keys=_patch_keys(path), mmap_min_bytes=1)
        try:
            return cls._from_arrays(
                path,
                data,
                meta,
                expect_dim,
                expect_preset,
                memory_budget_mb,
                spill_dir,
                expect_model_id,
                index_kind,
                patch_dtype,
            )
        except MapError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a malformed file makes go wrong is a MapError
            raise MapError(f"map file {path} is inconsistent: {type(e).__name__}: {e}") from None

    @classmethod
    def _from_arrays(
        cls, path, data, meta, expect_dim, expect_preset, budget, spill_dir, expect_model_id, index_kind, patch_dtype
    ) -> PlaceMap:
        if meta.get("format") != FORMAT:
            raise MapError(f"map file {path} is not a pnv_ros map")
        if meta.get("version") not in READABLE_VERSIONS:
            raise MapError(
                f"map file {path} has version {meta.get('version')}; this pnv_ros reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        for key in ("dim", "preset", "count"):
            if key not in meta:
                raise MapError(f"map file {path} lacks '{key}' in its metadata")
        preset = Preset.from_dict(meta["preset"])
        dim, count, model_id = int(meta["dim"]), int(meta["count"]), str(meta.get("model_id", ""))
        if expect_dim is not None and dim != expect_dim:
            raise MapError(
                f"map file {path} holds {dim}-d descriptors, the loaded model makes {expect_dim}-d "
                f"(map model {model_id or '?'}, running {expect_model_id or '?'})"
            )
        check_fits(
            MapError,
            f"map file {path}",
            model_id,
            dim,
            preset,
            expect_model_id or model_id,
            expect_dim if expect_dim is not None else dim,
            expect_preset or preset,
            "load a map made with the same checkpoint and preset",
        )
        want = {"stamps": (count,), "global": (count, dim), "image_sizes": (count, 2), "positions": (count, 3)}
        for s, size in enumerate(preset.patch_sizes):
            want[f"patches_p{size}"] = (count, preset.kept_patches(s), dim)
        for k, shape in want.items():
            if k not in data:
                raise MapError(f"map file {path} lacks its '{k}' array")
            if tuple(data[k].shape) != shape:
                raise MapError(
                    f"map file {path}: '{k}' has shape {tuple(data[k].shape)}, expected {shape} for {count} keyframes"
                )
        dtypes = {str(data[f"patches_p{s}"].dtype) for s in preset.patch_sizes}
        if not dtypes <= {"float16", "float32"}:
            raise MapError(f"map file {path}: patches of dtype {sorted(dtypes)}; expected float16 or float32")
        glob = np.asarray(data["global"], np.float32)
        if not np.isfinite(glob).all():
            raise MapError(f"map file {path}: global descriptors hold NaN or infinity")
        sizes = data["image_sizes"]
        if sizes.dtype.kind not in "iu" or (count and sizes.min() < 1):
            raise MapError(f"map file {path}: image sizes must be positive integers ({sizes.dtype})")
        if str(meta.get("patch_dtype", "float32")) not in ("float16", "float32"):
            raise MapError(f"map file {path}: patch_dtype {meta.get('patch_dtype')!r}; expected float16 or float32")
        m = cls(
            dim,
            expect_preset or preset,
            model_id,
            index_kind or str(meta.get("index_kind", "flat")),
            patch_dtype or str(meta.get("patch_dtype", "float32")),
            budget,
            spill_dir,
        )
        m._reserve(count)
        m._stamps[:count] = np.asarray(data["stamps"], np.int64)
        m._positions[:count] = np.asarray(data["positions"], np.float64)
        m._sizes[:count] = np.asarray(data["image_sizes"], np.int64)
        for c, size in zip(m._cols, preset.patch_sizes):
            c.base = data[f"patches_p{size}"]
        if m._pidx is not None:
            try:
                index = [np.asarray(data[f"patch_index_p{size}"]) for size in preset.patch_sizes]
                check_patch_index(index, preset, f"map file {path}", count)
            except KeyError as e:
                raise MapError(f"map file {path} lacks its {e.args[0]!r} array (patch_keep < 1)") from None
            except FeaturesError as e:
                raise MapError(str(e)) from None
            for a, idx in zip(m._pidx, index):
                a[:count] = idx
        m._local.load(path, data, count)
        # One add for all: an HNSW graph is rebuilt, not stored (0.14 ms a keyframe at 100k;
        # benchmarks/scale_index.py --one-at-a-time measured the same one by one).
        m.index.add(glob)
        m._n = count
        notes = meta.get("notes", {})
        m.notes = notes if isinstance(notes, dict) else {}
        m.check()
        return m


def _patch_keys(path: Path) -> list[str]:
    """Names of the patch and local-feature arrays in a map file, to memory-map (unknown names are harmless)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.startswith("patches_p") or n[:-4] in LOCAL_ARRAYS]
    except (OSError, zipfile.BadZipFile):
        return []


@dataclass
class MapSnapshot:
    """A map as of :meth:`PlaceMap.snapshot`; :meth:`write` streams it to a file."""

    meta: dict
    stamps: np.ndarray
    positions: np.ndarray
    image_sizes: np.ndarray
    global_descs: np.ndarray
    segments: list[list[np.ndarray]]  # per scale, arrays (N_k, P, D) in id order
    patch_sizes: list[int]
    shapes: list[tuple[int, int]] = field(default_factory=list)
    patch_dtype: np.dtype = field(default_factory=lambda: np.dtype("float16"))
    local: _LocalSnapshot | None = None
    patch_index: list[np.ndarray] | None = None  # per scale (N, P'_s) int16 grid indices (patch selection)

    def note(self, key: str, value: object) -> None:
        """Record an owner's note in the file's metadata (JSON; e.g. the fleet's upload watermarks), read back
        as :attr:`PlaceMap.notes` after a load; the map's own keys are not affected."""
        self.meta.setdefault("notes", {})[key] = value

    def write(self, path: str | Path) -> None:
        """Write atomically (temp file, fsync, rename); patches streamed segment by segment.
        Raises OSError / IsADirectoryError; the previous file at ``path`` then stays as it was."""
        import json

        n = len(self.stamps)
        with NpzWriter(Path(path), sync=True) as w:
            w.add("meta", np.array(json.dumps(self.meta)))
            w.add("stamps", self.stamps)
            w.add("global", self.global_descs)
            w.add("image_sizes", self.image_sizes)
            w.add("positions", self.positions)
            for size, (p, d), segs in zip(self.patch_sizes, self.shapes, self.segments):
                w.add_blocks(f"patches_p{size}", (n, p, d), self.patch_dtype, _rows(segs, n))
            for size, idx in zip(self.patch_sizes, self.patch_index or []):
                w.add(f"patch_index_p{size}", np.asarray(idx[:n], np.int16))
            if self.local is not None:
                self.local.write(w)


def _rows(segments: list[np.ndarray], n: int, block: int = 16):
    """The first n rows of the segments, in blocks of at most ``block`` rows."""
    left = n
    for seg in segments:
        for a in range(0, len(seg), block):
            if left <= 0:
                return
            b = seg[a : a + min(block, left)]
            left -= len(b)
            yield b
