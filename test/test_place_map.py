"""PlaceMap: the keyframe store. Real FAISS, real files in tmp_path, synthetic features
(the store's bookkeeping does not depend on what the descriptors look like)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pnv_ros.storage
from pnv_ros.config import get_preset
from pnv_ros.errors import MapError, UnknownPlaceError
from pnv_ros.features import PlaceFeatures
from pnv_ros.matching import PatchMatcher
from pnv_ros.place_map import PlaceMap, check_invariants_enabled

SPEED, PERF = get_preset("speed"), get_preset("performance")
#: Bytes of one keyframe's speed-preset patches at float16 and D = 16.
KF16 = 936 * 16 * 2


def _ident(name: str, dim: int, weights: bytes) -> str:
    """A model identity as checkpoints make them: name:dim:sha256-prefix."""
    return f"{name}:{dim}:{hashlib.sha256(weights).hexdigest()[:12]}"


MODEL = _ident("rand_WPCA16.pth.tar", 16, b"weights A")


def _feat(rng, d: int = 16, preset=SPEED) -> PlaceFeatures:
    g = rng.standard_normal(d).astype(np.float32)
    ps = []
    for s in range(len(preset.patch_sizes)):
        p = rng.standard_normal((preset.num_patches(s), d)).astype(np.float32)
        ps.append(p / np.linalg.norm(p, axis=1, keepdims=True))
    return PlaceFeatures(g / np.linalg.norm(g), ps, (640, 480))


def _fill(m: PlaceMap, feats: list[PlaceFeatures], t0: int = 0) -> None:
    for i, f in enumerate(feats):
        assert m.add(f, (t0 + i + 1) * 10**9, np.array([i, 0.0, 0.0]) if i % 2 else None) == t0 + i


def _same_patches(m: PlaceMap, i: int, f: PlaceFeatures) -> bool:
    return all(np.array_equal(np.asarray(a), b.astype(m.patch_dtype)) for a, b in zip(m.patches(i), f.patches))


def _finds_itself(m: PlaceMap, feats: list[PlaceFeatures], first_id: int = 0) -> None:
    _, ids = m.index.search(np.stack([f.global_desc for f in feats]), 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(first_id, first_id + len(feats)))


def _tmp_files(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


@pytest.fixture
def pmap(rng) -> PlaceMap:
    m = PlaceMap(16, SPEED, MODEL)
    for i in range(5):
        m.add(_feat(rng), (i + 1) * 1_000_000_000, np.array([i, 0.0, 0.0]) if i % 2 else None)
    return m


# -- 1. ids, stamps, lookups ------------------------------------------------------------------
def test_ids_stamps_dtype_and_lookup_errors(pmap: PlaceMap, rng) -> None:
    empty = PlaceMap(16, SPEED, MODEL)
    assert len(empty) == 0 and empty.nbytes_per_keyframe() == 0.0 and empty.stamps.shape == (0,)
    with pytest.raises(UnknownPlaceError, match="unknown keyframe id 0: the map holds no keyframes"):
        empty.get(0)
    with pytest.raises(UnknownPlaceError, match="no keyframe with stamp 1.000000 s"):
        empty.by_stamp(10**9)

    assert len(pmap) == 5 and pmap.get(3).id == 3 and pmap.get(3).stamp_ns == 4 * 10**9
    np.testing.assert_array_equal(pmap.stamps, np.arange(1, 6) * 10**9)
    assert pmap.stamps.dtype == np.int64 and not pmap.stamps.flags.writeable
    with pytest.raises(ValueError):
        pmap.stamps[0] = 7  # a read-only view: the store's own array cannot be changed through it
    assert pmap.get(0).features.patches[0].dtype == np.float16
    assert pmap.get(0).features.global_desc.dtype == np.float32
    np.testing.assert_array_equal(pmap.get(1).position, [1, 0, 0])
    assert pmap.get(0).position is None and np.isnan(pmap.positions[0]).all()
    assert pmap.nbytes_per_keyframe() == 16 * 4 + 936 * 16 * 2 + 8
    assert PlaceMap(16, SPEED, MODEL, patch_dtype="float32").nbytes_per_keyframe() == 0.0
    assert pmap.by_stamp(3_000_400_000).id == 2  # within 1 ms
    assert pmap.by_stamp(3_002_000_000, tolerance_ns=3_000_000).id == 2
    for bad in (7, -1, 5):
        with pytest.raises(UnknownPlaceError, match=f"unknown keyframe id {bad}: the map holds ids 0..4"):
            pmap.get(bad)
    with pytest.raises(UnknownPlaceError, match="unknown keyframe id 5"):
        pmap.patches(5)
    with pytest.raises(UnknownPlaceError, match="no keyframe with stamp 9.000000 s"):
        pmap.by_stamp(9_000_000_000)
    with pytest.raises(UnknownPlaceError, match=r"within 1 ms"):
        pmap.by_stamp(3_002_000_000)
    with pytest.raises(KeyError):  # UnknownPlaceError is a KeyError too, for callers that catch that
        pmap.get(99)

    # a clock reset: stamps repeat; by_stamp answers the newest keyframe with that stamp
    assert pmap.add(_feat(rng), 2 * 10**9) == 5
    assert pmap.add(_feat(rng), 3 * 10**9) == 6
    assert pmap.by_stamp(2 * 10**9).id == 5 and pmap.by_stamp(3_000_400_000).id == 6
    assert pmap.by_stamp(5 * 10**9).id == 4  # unique stamps are still found
    np.testing.assert_array_equal(pmap.stamps, np.array([1, 2, 3, 4, 5, 2, 3]) * 10**9)


# -- 2. save / load -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_roundtrip_memory_maps_patches(kind: str, tmp_path: Path, rng) -> None:
    feats = [_feat(rng) for _ in range(40)]  # 40 x 30 KB: above storage.MMAP_MIN_BYTES, so memory-mapped
    m = PlaceMap(16, SPEED, MODEL, index_kind=kind)
    _fill(m, feats)
    path = tmp_path / "m.npz"
    m.save(path)
    back = PlaceMap.load(path, expect_dim=16, expect_preset=SPEED, expect_model_id=MODEL, memory_budget_mb=0.1)
    assert len(back) == 40 and back.index.kind == kind and back.model_id == MODEL
    assert back.patch_dtype == np.float16 and back.dim == 16
    back.check()
    np.testing.assert_array_equal(back.stamps, m.stamps)
    np.testing.assert_array_equal(back.positions, m.positions)  # NaN where unknown, in the same places
    assert back.get(0).position is None and list(back.get(1).position) == [1, 0, 0]
    assert back.get(7).features.image_size == (640, 480)
    for i in (0, 17, 39):
        for a, b in zip(back.patches(i), m.patches(i)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(back.get(i).features.global_desc, m.get(i).features.global_desc)
    _finds_itself(back, feats)
    # the patches stay in the file: memory-mapped, read-only, no RAM counted: the budget holds after a load
    p = back.patches(3)[0]
    assert isinstance(p, np.memmap) and not p.flags.writeable
    assert back.ram_patch_bytes == 0 and back.keyframes_on_disk == 40
    with pytest.raises(ValueError):
        p[0, 0] = 1.0
    # more keyframes after a load: the next ids, the budget kept
    more = [_feat(rng) for _ in range(12)]
    for j, f in enumerate(more):
        assert back.add(f, (100 + j) * 10**9) == 40 + j
        assert back.ram_patch_bytes <= back.memory_budget
    _finds_itself(back, feats + more)
    assert all(_same_patches(back, 40 + j, f) for j, f in enumerate(more))
    assert _same_patches(back, 5, feats[5])
    # and it saves again (loaded + spilled + RAM segments), over the file it is mapped from
    back.save(path)
    again = PlaceMap.load(path)
    assert len(again) == 52 and again.stamps[45] == 105 * 10**9
    assert all(_same_patches(again, i, f) for i, f in enumerate(feats + more))


def test_load_refuses_another_model_layout_or_dimension(pmap: PlaceMap, tmp_path: Path, random_ckpt: Path) -> None:
    from pnv_ros.model.checkpoint import checkpoint_info, file_sha256

    path = tmp_path / "m.npz"
    pmap.save(path)
    other = _ident("other_WPCA16.pth.tar", 16, b"weights B")  # same dimension, other weights
    with pytest.raises(MapError) as e:
        PlaceMap.load(path, 16, SPEED, expect_model_id=other)
    assert MODEL in str(e.value) and other in str(e.value) and "two builds" not in str(e.value)
    renamed = _ident("renamed_copy.pth.tar", 16, b"weights A")  # same hash: the same model
    assert len(PlaceMap.load(path, 16, SPEED, expect_model_id=renamed)) == 5
    with pytest.raises(MapError) as e:
        PlaceMap.load(path, 16, PERF, expect_model_id=MODEL)
    assert "'speed'" in str(e.value) and "'performance'" in str(e.value)
    with pytest.raises(MapError, match="16-d descriptors, the loaded model makes 512-d"):
        PlaceMap.load(path, expect_dim=512)
    with pytest.raises(MapError, match="16-d"):
        PlaceMap.load(path, expect_dim=64, expect_model_id=_ident("x.pth.tar", 64, b"weights A"))

    # real checkpoint identities: a renamed copy of a checkpoint is the same model
    info = checkpoint_info(random_ckpt)
    copy = tmp_path / "renamed.pth.tar"
    shutil.copy(random_ckpt, copy)
    copy_id = dataclasses.replace(info, path=str(copy), sha256=file_sha256(copy)).identity
    assert copy_id != info.identity and copy_id.startswith("renamed.pth.tar:")
    real = PlaceMap(info.dim, SPEED, info.identity)
    real.add(_feat(np.random.default_rng(1), info.dim), 1)
    real.save(tmp_path / "real.npz")
    assert len(PlaceMap.load(tmp_path / "real.npz", info.dim, SPEED, expect_model_id=copy_id)) == 1
    stranger = _ident(Path(random_ckpt).name, info.dim, b"other weights")  # same name and dim, other hash
    with pytest.raises(MapError) as e:
        PlaceMap.load(tmp_path / "real.npz", info.dim, SPEED, expect_model_id=stranger)
    assert info.identity in str(e.value) and stranger in str(e.value)
    assert "two builds of" in str(e.value) and "--checkpoint FILE" in str(e.value)  # rebuilt on another CPU: say so


# -- 3. atomic saves ----------------------------------------------------------------------------
@pytest.mark.parametrize("fail_at", ["second_array", "midway_through_patches"])
def test_failed_save_leaves_previous_file(fail_at: str, pmap: PlaceMap, tmp_path: Path, monkeypatch, rng) -> None:
    path = tmp_path / "m.npz"
    pmap.save(path)
    before = path.read_bytes()
    for i in range(20):
        pmap.add(_feat(rng), (50 + i) * 10**9)
    real_add_blocks = pnv_ros.storage.NpzWriter.add_blocks
    calls = []

    def failing(self, name, shape, dtype, blocks):
        calls.append(name)
        if fail_at == "second_array" and len(calls) == 2:
            raise OSError(28, "No space left on device (simulated)")
        if fail_at == "midway_through_patches" and name.startswith("patches_"):

            def first_block_then_full(it):
                yield next(it)
                raise OSError(28, "No space left on device (simulated)")

            blocks = first_block_then_full(iter(blocks))
        return real_add_blocks(self, name, shape, dtype, blocks)

    monkeypatch.setattr(pnv_ros.storage.NpzWriter, "add_blocks", failing)
    with pytest.raises(OSError, match="No space left"):
        pmap.save(path)
    assert len(calls) >= 2
    assert path.read_bytes() == before and _tmp_files(tmp_path) == []
    monkeypatch.undo()
    assert len(PlaceMap.load(path)) == 5
    with pytest.raises(OSError, match="No space left"):  # a first save that fails leaves nothing at all
        monkeypatch.setattr(pnv_ros.storage.NpzWriter, "add_blocks", failing)
        calls.clear()
        pmap.save(tmp_path / "new.npz")
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_save_to_a_folder_raises_and_leaves_nothing(pmap: PlaceMap, tmp_path: Path) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        pmap.save(folder)
    assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == ["maps"]
    with pytest.raises(MapError, match="does not exist.*folder"):
        PlaceMap.load(folder)


def test_snapshot_writes_exactly_its_own_keyframes(tmp_path: Path, rng) -> None:
    feats = [_feat(rng) for _ in range(30)]
    m = PlaceMap(16, SPEED, MODEL, memory_budget_mb=0.1, spill_dir=tmp_path / "spill")
    _fill(m, feats[:13])
    snap = m.snapshot()
    assert snap.meta["count"] == 13
    _fill(m, feats[13:], t0=13)  # more keyframes, and spills that move the snapshot's RAM rows to disk
    assert len(m) == 30 and m.keyframes_on_disk > 13
    snap.write(tmp_path / "snap.npz")
    back = PlaceMap.load(tmp_path / "snap.npz")
    assert len(back) == 13 and list(back.stamps) == [(i + 1) * 10**9 for i in range(13)]
    assert all(_same_patches(back, i, f) for i, f in enumerate(feats[:13]))
    _finds_itself(back, feats[:13])


def test_spill_folders_of_dead_processes_are_removed(tmp_path: Path, rng, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node killed mid-run (SIGKILL, power loss) leaves its default spill folder behind, gigabytes each; the next
    start removes those whose process is gone and keeps the live ones."""
    from pnv_ros.place_map import SPILL_PREFIX, remove_stale_spills

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    m = PlaceMap(16, SPEED, MODEL, memory_budget_mb=0.1)  # the default spill folder, in the (patched) temp folder
    feats = [_feat(rng) for _ in range(20)]
    _fill(m, feats)
    assert m.keyframes_on_disk > 0
    (own,) = tmp_path.glob(f"{SPILL_PREFIX}*")
    assert own.name.startswith(f"{SPILL_PREFIX}{os.getpid()}_")
    gone_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    gone, unnamed = tmp_path / f"{SPILL_PREFIX}{gone_pid}_x1", tmp_path / f"{SPILL_PREFIX}nopid"
    for d in (gone, unnamed):
        d.mkdir()
        (d / "patches_0.f16").write_bytes(b"\0" * 64)
    assert remove_stale_spills() == [gone]
    assert not gone.exists() and own.is_dir() and unnamed.is_dir()
    assert len(m) == 20 and all(_same_patches(m, i, f) for i, f in enumerate(feats))  # spilled ones read back


# -- 4. malformed files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    m = PlaceMap(16, SPEED, MODEL)
    _fill(m, [_feat(rng) for _ in range(40)])  # large enough that the patches get memory-mapped
    path = tmp_path_factory.mktemp("good") / "good.npz"
    m.save(path)
    return path


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    b = io.BytesIO()
    np.savez(b, **arrays)
    return b.getvalue()


def _with_meta(path: Path, **changes: object) -> bytes:
    a = _arrays(path)
    meta = json.loads(str(a["meta"]))
    for k, v in changes.items():
        if v is _DROP:
            meta.pop(k)
        else:
            meta[k] = v
    a["meta"] = np.array(json.dumps(meta))
    return _npz(a)


def _with_array(path: Path, name: str, value: np.ndarray | None) -> bytes:
    a = _arrays(path)
    if value is None:
        a.pop(name)
    else:
        a[name] = value
    return _npz(a)


def _with_object_array(path: Path) -> bytes:
    """The map with a pickled object array for its stamps (written by hand: savez would refuse nothing)."""
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w") as z:
        for k, v in _arrays(path).items():
            with z.open(k + ".npy", "w") as f:
                v = np.array([{"evil": i} for i in range(40)], dtype=object) if k == "stamps" else v
                np.lib.format.write_array(f, v, allow_pickle=True)
    return b.getvalue()


def _truncated(fraction: float):
    return lambda p: p.read_bytes()[: int(len(p.read_bytes()) * fraction)]


_DROP = object()
_MALFORMED = {
    "garbage": lambda p: b"\x00not a zip at all\xff" * 50,
    "empty": lambda p: b"",
    "zip_magic_then_garbage": lambda p: b"PK\x03\x04garbage",
    **{f"truncated_{int(f * 1000)}permille": _truncated(f) for f in (0.001, 0.1, 0.5, 0.9, 0.99)},
    "truncated_last_byte": lambda p: p.read_bytes()[:-1],
    "truncated_end_record": lambda p: p.read_bytes()[:-22],
    "zip_without_meta": lambda p: _with_array(p, "meta", None),
    "meta_not_json": lambda p: _with_array(p, "meta", np.array("{not json")),
    "meta_a_list": lambda p: _with_array(p, "meta", np.array("[1, 2]")),
    "meta_a_number": lambda p: _with_array(p, "meta", np.array(5)),
    "meta_not_npy": lambda p: _zip_with({"meta.npy": b"hello"}),
    "other_format": lambda p: _with_meta(p, format="something.else"),
    "no_count": lambda p: _with_meta(p, count=_DROP),
    "no_preset": lambda p: _with_meta(p, preset=_DROP),
    "no_dim": lambda p: _with_meta(p, dim=_DROP),
    "count_not_a_number": lambda p: _with_meta(p, count="forty"),
    "count_null": lambda p: _with_meta(p, count=None),
    "count_negative": lambda p: _with_meta(p, count=-1),
    "dim_a_list": lambda p: _with_meta(p, dim=[16]),
    "preset_a_number": lambda p: _with_meta(p, preset=5),
    "preset_without_sizes": lambda p: _with_meta(p, preset={"name": "x"}),
    "unknown_index_kind": lambda p: _with_meta(p, index_kind="ivf"),
    "bad_patch_dtype_in_meta": lambda p: _with_meta(p, patch_dtype="int8"),
    "version_99": lambda p: _with_meta(p, version=99),
    "no_version": lambda p: _with_meta(p, version=_DROP),
    "global_wrong_dim": lambda p: _with_array(p, "global", _arrays(p)["global"][:, :8]),
    "stamps_too_few": lambda p: _with_array(p, "stamps", _arrays(p)["stamps"][:5]),
    "positions_2d": lambda p: _with_array(p, "positions", np.zeros((40, 2))),
    "image_sizes_missing": lambda p: _with_array(p, "image_sizes", None),
    "patches_wrong_count": lambda p: _with_array(p, "patches_p5", _arrays(p)["patches_p5"][:, :100]),
    "patches_missing": lambda p: _with_array(p, "patches_p5", None),
    "object_array": _with_object_array,
    "nan_global": lambda p: _with_array(p, "global", np.where(np.eye(40, 16, dtype=bool), np.nan, 0.1)),
    "patches_int16": lambda p: _with_array(p, "patches_p5", _arrays(p)["patches_p5"].astype(np.int16)),
    "nan_image_sizes": lambda p: _with_array(p, "image_sizes", np.full((40, 2), np.nan)),
    "zero_image_sizes": lambda p: _with_array(p, "image_sizes", np.zeros((40, 2), np.int64)),
    "patch_dtype_int8": lambda p: _with_meta(p, patch_dtype="int8"),
}


def _zip_with(members: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    return b.getvalue()


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_map_files_raise_map_error(case: str, good_map: Path, tmp_path: Path) -> None:
    bad = tmp_path / f"{case}.npz"
    bad.write_bytes(_MALFORMED[case](good_map))
    with pytest.raises(MapError) as e:  # never KeyError / ValueError / TypeError / zipfile's errors
        PlaceMap.load(bad, expect_dim=16, expect_preset=SPEED, expect_model_id=MODEL)
    assert type(e.value) is MapError
    if case != "bad_patch_dtype_in_meta":  # (this one's message names the setting, not the file)
        assert bad.name in str(e.value)


def test_malformed_cases_start_from_a_good_file(good_map: Path, tmp_path: Path) -> None:
    assert len(PlaceMap.load(good_map, 16, SPEED, expect_model_id=MODEL)) == 40
    with pytest.raises(MapError, match="does not exist"):
        PlaceMap.load(tmp_path / "missing.npz")
    with pytest.raises(MapError, match="version 99"):
        p = tmp_path / "v99.npz"
        p.write_bytes(_MALFORMED["version_99"](good_map))
        PlaceMap.load(p)
    with pytest.raises(MapError, match="lacks 'count'"):
        p = tmp_path / "nocount.npz"
        p.write_bytes(_MALFORMED["no_count"](good_map))
        PlaceMap.load(p)


# -- 5. spill to disk ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", [SPEED, PERF], ids=["speed", "performance"])
def test_memory_budget_spills_with_same_answers(preset, tmp_path: Path, rng) -> None:
    feats = [_feat(rng, 16, preset) for _ in range(30)]
    per_kf = sum(p.size for p in feats[0].patches) * 2
    budget_mb = 4 * per_kf / 2**20  # room for 4 keyframes' patches
    full = PlaceMap(16, preset, MODEL)
    small = PlaceMap(16, preset, MODEL, memory_budget_mb=budget_mb, spill_dir=tmp_path / "spill")
    for i, f in enumerate(feats):
        full.add(f, i)
        small.add(f, i)
        assert small.ram_patch_bytes <= small.memory_budget
    assert small.spill_failures == 0 and small.trouble is None
    on_disk = small.keyframes_on_disk
    assert 20 <= on_disk < 30 and small.ram_patch_bytes == (30 - on_disk) * per_kf
    files = os.listdir(tmp_path / "spill")
    assert 1 <= len(files) <= len(preset.patch_sizes)  # one append-only file per scale, not one per keyframe
    assert isinstance(small.patches(0)[0], np.memmap) and not isinstance(small.patches(29)[0], np.memmap)
    pm = PatchMatcher(preset)
    ids = [0, 7, 19, 28, 29]  # spilled (early and late in the spill file) and in RAM
    q = PlaceFeatures(
        feats[7].global_desc,
        [p + 0.05 * rng.standard_normal(p.shape).astype(np.float32) for p in feats[7].patches],
        (640, 480),
    )
    a = pm.score(q, [full.get(i).features for i in ids]).raw
    b = pm.score(q, [small.get(i).features for i in ids]).raw
    np.testing.assert_array_equal(a, b)
    assert np.argmin(pm.fuse(b)) == 1  # the revisited keyframe wins, from the spill file
    assert all(_same_patches(small, i, f) for i, f in enumerate(feats))
    small.save(tmp_path / "m.npz")
    back = PlaceMap.load(tmp_path / "m.npz")
    assert all(_same_patches(back, i, f) for i, f in enumerate(feats))


def test_maps_sharing_a_spill_dir_keep_their_own_patches(tmp_path: Path, rng) -> None:
    # Spill files were once named after id(column): a later map in the same spill_dir (reset() keeps it) whose
    # column got a recycled id() appended to the dead map's file and read the old map's patches.
    spill = tmp_path / "spill"
    for run in range(30):
        m = PlaceMap(16, SPEED, MODEL, memory_budget_mb=0.1, spill_dir=spill)
        feats = [_feat(rng) for _ in range(14)]
        _fill(m, feats)
        assert m.keyframes_on_disk > 0
        wrong = [i for i, f in enumerate(feats) if not _same_patches(m, i, f)]
        assert wrong == [], f"map {run} in a shared spill_dir reads other patches for ids {wrong}"
        del m
        gc.collect()


# -- 6. file descriptors --------------------------------------------------------------------------
_FD_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    import numpy as np
    from pnv_ros.config import get_preset
    from pnv_ros.features import PlaceFeatures
    from pnv_ros.place_map import PlaceMap

    def fds():
        return len(os.listdir("/proc/self/fd"))

    folder = sys.argv[1]
    rng = np.random.default_rng(0)
    preset = get_preset("speed")
    m = PlaceMap(16, preset, "m:16:abc", patch_dtype="float16", memory_budget_mb=1, spill_dir=folder + "/spill")
    globs = rng.standard_normal((2000, 16)).astype(np.float32)
    start, most = fds(), 0
    for i in range(2000):
        p = rng.standard_normal((936, 16)).astype(np.float32)
        assert m.add(PlaceFeatures(globs[i], [p], (640, 480)), (i + 1) * 10**8) == i
        most = max(most, fds())
    m.check()
    _, ids = m.index.search(globs, 1)
    out = {"n": len(m), "spill_failures": m.spill_failures, "trouble": m.trouble, "on_disk": m.keyframes_on_disk,
           "ram": m.ram_patch_bytes, "budget": m.memory_budget, "own_ids": bool((ids[:, 0] == np.arange(2000)).all()),
           "stamps_ok": bool((m.stamps == (np.arange(2000) + 1) * 10**8).all()), "fds_start": start,
           "fds_max": most, "spill_files": len(os.listdir(folder + "/spill"))}
    m.save(folder + "/m.npz")
    back = PlaceMap.load(folder + "/m.npz", memory_budget_mb=1, spill_dir=folder + "/spill2")
    back.check()
    _, ids = back.index.search(globs, 1)
    out.update(loaded=len(back), loaded_own_ids=bool((ids[:, 0] == np.arange(2000)).all()),
               loaded_patch_ok=bool(np.array_equal(back.patches(1234)[0], m.patches(1234)[0])),
               loaded_ram=back.ram_patch_bytes, fds_after_load=fds())
    for i in range(100):
        back.add(PlaceFeatures(globs[i], [rng.standard_normal((936, 16)).astype(np.float32)], (1, 1)), i)
    out.update(after_more=len(back), fds_end=fds(), more_failures=back.spill_failures)
    print(json.dumps(out))
    """
)


def test_two_thousand_spilled_keyframes_under_256_file_descriptors(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _FD_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(
        f"\nfd counts: start {out['fds_start']}, max while adding {out['fds_max']}, "
        f"after load {out['fds_after_load']}, end {out['fds_end']}"
    )
    assert out["n"] == 2000 and out["spill_failures"] == 0 and out["trouble"] is None
    assert out["own_ids"] and out["stamps_ok"]  # ids never shift
    assert out["ram"] <= out["budget"] and out["on_disk"] >= 2000 - out["budget"] // KF16
    assert out["spill_files"] == 1
    assert out["fds_max"] - out["fds_start"] <= 8 and out["fds_max"] < 64  # far below 256
    assert out["loaded"] == 2000 and out["loaded_own_ids"] and out["loaded_patch_ok"] and out["loaded_ram"] == 0
    assert out["after_more"] == 2100 and out["more_failures"] == 0 and out["fds_end"] < 64


# -- 7. a failed spill keeps everything ------------------------------------------------------------
def test_failed_spill_keeps_ids_stamps_and_patches(tmp_path: Path, rng) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a regular file where the spill folder should be")
    m = PlaceMap(16, SPEED, MODEL, memory_budget_mb=0.1, spill_dir=blocker)
    feats = [_feat(rng) for _ in range(20)]
    stamps = [int(s) for s in rng.integers(1, 10**12, 20)]
    for i, (f, s) in enumerate(zip(feats, stamps)):
        assert m.add(f, s) == i  # every add succeeds
    assert m.spill_failures > 0 and "spill" in m.trouble and "FileExistsError" in m.trouble
    m.check()
    assert len(m) == 20 and m.keyframes_on_disk == 0 and m.ram_patch_bytes == 20 * KF16  # all kept in RAM
    assert list(m.stamps) == stamps and all(m.get(i).stamp_ns == s for i, s in enumerate(stamps))
    _finds_itself(m, feats)
    assert all(_same_patches(m, i, f) for i, f in enumerate(feats))
    # the disk comes back: the next add spills, and nothing was lost
    blocker.unlink()
    m.add(_feat(rng), 1)
    assert m.keyframes_on_disk > 0 and m.ram_patch_bytes <= m.memory_budget
    assert m.trouble is None and m.spill_failures > 0  # recovered; the failures stay counted
    assert all(_same_patches(m, i, f) for i, f in enumerate(feats))
    _finds_itself(m, feats)


def test_spill_failing_for_one_scale_loses_nothing(tmp_path: Path, rng, monkeypatch) -> None:
    import pnv_ros.place_map as place_map

    real = place_map._Column.spill_oldest
    failed = []

    def second_scale_fails_twice(self, k, folder):
        if self.p == PERF.num_patches(1) and len(failed) < 2:
            failed.append(k)
            raise OSError(24, "Too many open files (simulated)")
        return real(self, k, folder)

    monkeypatch.setattr(place_map._Column, "spill_oldest", second_scale_fails_twice)
    feats = [_feat(rng, 8, PERF) for _ in range(40)]
    per_kf = sum(p.size for p in feats[0].patches) * 2
    m = PlaceMap(8, PERF, MODEL, memory_budget_mb=4 * per_kf / 2**20, spill_dir=tmp_path / "spill")
    troubles = []
    for i, f in enumerate(feats):
        assert m.add(f, (i + 1) * 10**9) == i
        troubles.append(m.trouble)
    assert len(failed) == 2 and m.spill_failures == 2
    assert sum("Too many open files" in (t or "") for t in troubles) >= 1  # reported while it lasted
    assert m.trouble is None  # the next spill caught the second scale up
    m.check()
    assert all(_same_patches(m, i, f) for i, f in enumerate(feats))
    assert m.ram_patch_bytes <= m.memory_budget
    _finds_itself(m, feats)
    m.save(tmp_path / "m.npz")
    assert all(_same_patches(PlaceMap.load(tmp_path / "m.npz"), i, f) for i, f in enumerate(feats))


# -- 8. transactional add ----------------------------------------------------------------------------
def test_add_is_all_or_nothing(pmap: PlaceMap, rng, monkeypatch) -> None:
    before = (len(pmap), pmap.stamps.copy(), len(pmap.index), pmap.ram_patch_bytes)
    real_add = pmap.index.add
    fails = [1]

    def faiss_fails_once(descs):
        if fails:
            fails.pop()
            raise RuntimeError("Error in faiss::IndexFlat::add (simulated)")
        return real_add(descs)

    monkeypatch.setattr(pmap.index, "add", faiss_fails_once)

    def unchanged() -> None:
        pmap.check()
        assert (len(pmap), len(pmap.index), pmap.ram_patch_bytes) == (before[0], before[2], before[3])
        np.testing.assert_array_equal(pmap.stamps, before[1])

    with pytest.raises(RuntimeError, match="simulated"):
        pmap.add(_feat(rng), 77 * 10**9)
    unchanged()
    f = _feat(rng)
    assert pmap.add(f, 78 * 10**9, np.array([1.0, 2.0, 3.0])) == 5
    pmap.check()
    assert pmap.stamps[5] == 78 * 10**9 and pmap.get(5).stamp_ns == 78 * 10**9
    assert list(pmap.get(5).position) == [1, 2, 3]
    assert _same_patches(pmap, 5, f) and pmap.index.search(f.global_desc, 1)[1][0, 0] == 5

    before = (len(pmap), pmap.stamps.copy(), len(pmap.index), pmap.ram_patch_bytes)
    good = _feat(rng)
    bad_inputs = {
        "patches of another size": PlaceFeatures(good.global_desc, [good.patches[0][:900]], (640, 480)),
        "patches of another dim": PlaceFeatures(good.global_desc, [np.zeros((936, 8), np.float32)], (640, 480)),
        "two scales for one": PlaceFeatures(good.global_desc, [good.patches[0]] * 2, (640, 480)),
        "no scales": PlaceFeatures(good.global_desc, [], (640, 480)),
        "global of another dim": PlaceFeatures(np.ones(32, np.float32), good.patches, (640, 480)),
        "NaN global": PlaceFeatures(np.full(16, np.nan, np.float32), good.patches, (640, 480)),
    }
    for what, feats in bad_inputs.items():
        with pytest.raises(MapError):
            pmap.add(feats, 99 * 10**9)
            pytest.fail(f"{what} was accepted")
        unchanged()
    assert pmap.add(good, 100 * 10**9) == 6 and _same_patches(pmap, 6, good)


# -- 9. invariant checks on every change -------------------------------------------------------------
def test_invariant_check_runs_after_every_add(pmap: PlaceMap, rng) -> None:
    assert os.environ.get("PNV_CHECK_INVARIANTS") == "1" and check_invariants_enabled()  # set by conftest
    pmap.check()
    pmap.index.add(_feat(rng).global_desc)  # a part changed behind the store's back
    with pytest.raises(MapError, match="out of step: 5 keyframes but {'faiss': 6}"):
        pmap.check()
    with pytest.raises(MapError, match="out of step"):  # the next add notices it at once
        pmap.add(_feat(rng), 10**12)


# -- 10. the previous file format ---------------------------------------------------------------------
@pytest.mark.parametrize("patch_dtype", ["float16", "float32"])
def test_version_1_map_still_loads(patch_dtype: str, tmp_path: Path, rng) -> None:
    n = 40
    feats = [_feat(rng) for _ in range(n)]
    meta = {
        "format": "pnv_ros.place_map",
        "version": 1,
        "dim": 16,
        "preset": SPEED.to_dict(),
        "model_id": MODEL,
        "index_kind": "flat",
        "count": n,
        "patch_dtype": patch_dtype,
    }
    positions = np.full((n, 3), np.nan)
    positions[1] = [1, 2, 3]
    path = tmp_path / "v1.npz"
    with open(path, "wb") as f:  # what pnv_ros wrote before: np.savez of whole arrays
        np.savez(
            f,
            meta=np.array(json.dumps(meta)),
            stamps=np.arange(n, dtype=np.int64) * 10**9,
            **{"global": np.stack([x.global_desc for x in feats])},
            image_sizes=np.tile(np.array([[512, 384]], np.int64), (n, 1)),
            positions=positions,
            patches_p5=np.stack([x.patches[0] for x in feats]).astype(patch_dtype),
        )
    m = PlaceMap.load(path, 16, SPEED, expect_model_id=MODEL)
    assert len(m) == n and m.patch_dtype == np.dtype(patch_dtype) and m.model_id == MODEL
    assert list(m.stamps) == [i * 10**9 for i in range(n)] and m.get(3).features.image_size == (512, 384)
    assert list(m.get(1).position) == [1, 2, 3] and m.get(2).position is None
    assert all(_same_patches(m, i, f) for i, f in enumerate(feats))
    _finds_itself(m, feats)
    assert m.add(_feat(rng), 10**12) == n
    m.save(tmp_path / "v2.npz")
    assert json.loads(str(_arrays(tmp_path / "v2.npz")["meta"]))["version"] == 2
    assert len(PlaceMap.load(tmp_path / "v2.npz")) == n + 1


# -- 11. local features (real SIFT of fr1/desk frames) -------------------------------------------------
FR1 = Path(__file__).resolve().parents[1] / "data" / "tum_fr1_desk_pairs"


@pytest.fixture(scope="module")
def fr1_locals() -> list:
    """Local features of four fr1/desk frames as keyframes get them: camera and depth (two), camera only (no
    depth points), neither (no rays); and None (a keyframe without local features)."""
    from PIL import Image

    from pnv_ros.camera_model import CameraModel
    from pnv_ros.local_features import depth_in_metres, extract_local_features

    cam = CameraModel.load_yaml(FR1 / "camera.yaml")
    rows = [ln.split() for ln in (FR1 / "associations.txt").read_text().splitlines() if not ln.startswith("#")]
    out = []
    for j, (_, rgb, _, depth) in enumerate(rows[:4]):
        image = np.asarray(Image.open(FR1 / rgb).convert("RGB"))
        d = depth_in_metres(np.asarray(Image.open(FR1 / depth)), "16UC1", 5000.0) if j < 2 else None
        out.append(extract_local_features(image, cam if j < 3 else None, d))
    assert out[0].has_depth and out[2].rays is not None and out[2].points is None and out[3].rays is None
    return [*out, None]


def _same_local(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    parts = ("keypoints", "descriptors", "rays", "points")
    return all(
        (getattr(a, k) is None and getattr(b, k) is None)
        or (getattr(b, k) is not None and np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True))
        for k in parts
    )


def _with_local(rng, local) -> PlaceFeatures:
    return dataclasses.replace(_feat(rng), local=local)


def test_local_features_stored_saved_spilled_and_loaded(fr1_locals: list, tmp_path: Path, rng) -> None:
    locs = [fr1_locals[i % 5] for i in range(12)]
    feats = [_with_local(rng, loc) for loc in locs]
    per_kf = KF16 + 1000 * 160  # patches + ~1000 SIFT keypoints of 160 bytes
    m = PlaceMap(16, SPEED, MODEL, memory_budget_mb=3 * per_kf / 2**20, spill_dir=tmp_path / "spill")
    _fill(m, feats)
    m.check()
    assert m.keyframes_on_disk >= 6 and m.ram_patch_bytes + m.ram_local_bytes <= m.memory_budget
    assert "local_features_" in " ".join(os.listdir(tmp_path / "spill"))  # spilled with their patches
    assert all(_same_local(m.local_features(i), loc) for i, loc in enumerate(locs))
    assert _same_local(m.get(2).features.local, locs[2]) and m.local_features(4) is None
    got = m.local_features(0)
    assert got.keypoints.dtype == np.float32 and got.descriptors.dtype == np.uint8 and got.keypoints.flags.c_contiguous
    assert m.nbytes_per_keyframe() > 16 * 4 + KF16 + 8 + 500 * 160  # the local features count
    with pytest.raises(UnknownPlaceError, match="unknown keyframe id 12"):
        m.local_features(12)
    path = tmp_path / "m.npz"
    m.save(path)
    back = PlaceMap.load(path, 16, SPEED, expect_model_id=MODEL, memory_budget_mb=3 * per_kf / 2**20)
    back.check()
    assert back.ram_local_bytes == 0 and all(_same_local(back.local_features(i), loc) for i, loc in enumerate(locs))
    more = [_with_local(rng, fr1_locals[i]) for i in (1, 4, 3, 0)]
    _fill(back, more, t0=12)
    back.save(path)  # loaded + spilled + RAM local features, over the file they are mapped from
    again = PlaceMap.load(path)
    assert len(again) == 16 and all(_same_local(again.local_features(i), loc) for i, loc in enumerate(locs))
    assert all(_same_local(again.local_features(12 + j), f.local) for j, f in enumerate(more))


def test_a_map_without_local_features_loads_with_none(fr1_locals: list, tmp_path: Path, rng) -> None:
    plain = PlaceMap(16, SPEED, MODEL)
    _fill(plain, [_feat(rng) for _ in range(3)])
    plain.save(tmp_path / "plain.npz")
    assert all(PlaceMap.load(tmp_path / "plain.npz").local_features(i) is None for i in range(3))
    # what pnv_ros wrote before local features: the same file without the local_* arrays
    m = PlaceMap(16, SPEED, MODEL)
    _fill(m, [_with_local(rng, fr1_locals[0]), _feat(rng)])
    m.save(tmp_path / "with.npz")
    a = {k: v for k, v in _arrays(tmp_path / "with.npz").items() if not k.startswith("local_")}
    (tmp_path / "old.npz").write_bytes(_npz(a))
    old = PlaceMap.load(tmp_path / "old.npz", 16, SPEED, expect_model_id=MODEL)
    assert len(old) == 2 and old.local_features(0) is None and old.local_features(1) is None
    assert old.add(_with_local(rng, fr1_locals[1]), 10**12) == 2 and _same_local(old.local_features(2), fr1_locals[1])


@pytest.fixture(scope="module")
def local_map(fr1_locals: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    m = PlaceMap(16, SPEED, MODEL)
    _fill(m, [_with_local(rng, fr1_locals[i % 5]) for i in range(10)])
    path = tmp_path_factory.mktemp("local") / "local.npz"
    m.save(path)
    return path


def _local_changed(name: str, change):
    return lambda p: _with_array(p, name, change(_arrays(p)[name]))


def _nan_row(a: np.ndarray, row: int = 0) -> np.ndarray:
    a = a.copy()
    a[row] = np.nan
    return a


_LOCAL_MALFORMED = {
    "offsets_missing": lambda p: _with_array(p, "local_offsets", None),
    "descriptors_missing": lambda p: _with_array(p, "local_descriptors", None),
    "offsets_short": _local_changed("local_offsets", lambda a: a[:-1]),
    "offsets_descending": _local_changed("local_offsets", lambda a: np.r_[a[:3], a[2] - 1, a[4:]]),
    "offsets_past_the_end": _local_changed("local_offsets", lambda a: np.r_[a[:-1], a[-1] + 5]),
    "offsets_not_from_zero": _local_changed("local_offsets", lambda a: a + 1),
    "offsets_float": _local_changed("local_offsets", lambda a: a.astype(np.float64)),
    "flags_unknown_bit": _local_changed("local_flags", lambda a: a | np.uint8(64)),
    "flags_int64": _local_changed("local_flags", lambda a: a.astype(np.int64)),
    "keypoints_without_the_flag": _local_changed("local_flags", lambda a: np.r_[np.uint8(0), a[1:]]),
    "keypoints_nan": _local_changed("local_keypoints", _nan_row),
    "keypoints_3d": _local_changed("local_keypoints", lambda a: np.zeros((len(a), 3), np.float32)),
    "keypoints_one_short": _local_changed("local_keypoints", lambda a: a[:-1]),
    "descriptors_float": _local_changed("local_descriptors", lambda a: a.astype(np.float32)),
    "descriptors_64": _local_changed("local_descriptors", lambda a: a[:, :64]),
    "rays_nan_where_kept": _local_changed("local_rays", _nan_row),
    "rays_float64": _local_changed("local_rays", lambda a: a.astype(np.float64)),
    "points_inf": _local_changed("local_points", lambda a: np.full_like(a, np.inf)),
}


@pytest.mark.parametrize("case", sorted(_LOCAL_MALFORMED))
def test_corrupt_local_feature_arrays_raise_map_error(case: str, local_map: Path, tmp_path: Path) -> None:
    assert len(PlaceMap.load(local_map, 16, SPEED, expect_model_id=MODEL)) == 10  # the good file loads
    bad = tmp_path / f"{case}.npz"
    bad.write_bytes(_LOCAL_MALFORMED[case](local_map))
    with pytest.raises(MapError) as e:
        PlaceMap.load(bad, expect_dim=16, expect_preset=SPEED, expect_model_id=MODEL)
    assert type(e.value) is MapError and bad.name in str(e.value)


def test_add_with_local_features_is_all_or_nothing(fr1_locals: list, pmap: PlaceMap, rng, monkeypatch) -> None:
    from pnv_ros.local_features import LocalFeatures

    good = fr1_locals[0]
    assert pmap.add(_with_local(rng, good), 50 * 10**9) == 5
    before = (len(pmap), len(pmap.index), pmap.ram_patch_bytes, pmap.ram_local_bytes)

    def unchanged() -> None:
        pmap.check()
        assert (len(pmap), len(pmap.index), pmap.ram_patch_bytes, pmap.ram_local_bytes) == before
        assert _same_local(pmap.local_features(5), good)
        with pytest.raises(UnknownPlaceError):
            pmap.local_features(6)

    n = len(good)
    bad_locals = {
        "keypoints (N, 3)": LocalFeatures(np.zeros((n, 3), np.float32), good.descriptors),
        "NaN keypoint": LocalFeatures(_nan_row(good.keypoints), good.descriptors),
        "float descriptors": LocalFeatures(good.keypoints, good.descriptors.astype(np.float32)),
        "descriptors for other keypoints": LocalFeatures(good.keypoints, good.descriptors[:-1]),
        "rays of another length": LocalFeatures(good.keypoints, good.descriptors, good.rays[:-1]),
        "NaN ray": LocalFeatures(good.keypoints, good.descriptors, _nan_row(good.rays)),
        "infinite point": LocalFeatures(good.keypoints, good.descriptors, good.rays, np.full((n, 3), np.inf)),
    }
    for what, loc in bad_locals.items():
        with pytest.raises(MapError):
            pmap.add(_with_local(rng, loc), 99 * 10**9)
            pytest.fail(f"{what} was accepted")
        unchanged()

    real_add = pmap.index.add

    def faiss_fails(descs):
        raise RuntimeError("Error in faiss::IndexFlat::add (simulated)")

    monkeypatch.setattr(pmap.index, "add", faiss_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        pmap.add(_with_local(rng, good), 77 * 10**9)
    unchanged()
    monkeypatch.setattr(pmap.index, "add", real_add)
    assert pmap.add(_with_local(rng, fr1_locals[2]), 78 * 10**9) == 6 and _same_local(
        pmap.local_features(6), fr1_locals[2]
    )


def test_a_failed_local_spill_loses_nothing(fr1_locals: list, tmp_path: Path, rng, monkeypatch) -> None:
    import pnv_ros.place_map as place_map

    real = place_map._LocalColumn.spill_oldest
    failed = []

    def fails_twice(self, k, folder):
        if len(failed) < 2:
            failed.append(k)
            raise OSError(28, "No space left on device (simulated)")
        return real(self, k, folder)

    monkeypatch.setattr(place_map._LocalColumn, "spill_oldest", fails_twice)
    locs = [fr1_locals[i % 4] for i in range(20)]
    m = PlaceMap(16, SPEED, MODEL, memory_budget_mb=4 * (KF16 + 160_000) / 2**20, spill_dir=tmp_path / "spill")
    _fill(m, [_with_local(rng, loc) for loc in locs])
    assert len(failed) == 2 and m.spill_failures == 2 and m.trouble is None  # caught up by a later spill
    m.check()
    assert m.ram_patch_bytes + m.ram_local_bytes <= m.memory_budget
    assert all(_same_local(m.local_features(i), loc) for i, loc in enumerate(locs))
    m.save(tmp_path / "m.npz")
    assert all(_same_local(PlaceMap.load(tmp_path / "m.npz").local_features(i), loc) for i, loc in enumerate(locs))
