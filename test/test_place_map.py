from pathlib import Path

import numpy as np
import pytest

from pnv_ros.config import get_preset
from pnv_ros.errors import MapError, UnknownPlaceError
from pnv_ros.features import PlaceFeatures
from pnv_ros.place_map import PlaceMap


def _feat(rng, d: int = 16) -> PlaceFeatures:
    g = rng.standard_normal(d).astype(np.float32)
    p = rng.standard_normal((936, d)).astype(np.float32)
    return PlaceFeatures(g / np.linalg.norm(g), [p / np.linalg.norm(p, axis=1, keepdims=True)], (640, 480))


@pytest.fixture
def pmap(rng) -> PlaceMap:
    m = PlaceMap(16, get_preset("speed"), "m:16:abc")
    for i in range(5):
        m.add(_feat(rng), (i + 1) * 1_000_000_000, np.array([i, 0.0, 0.0]) if i % 2 else None)
    return m


def test_ids_stamps_and_dtype(pmap: PlaceMap) -> None:
    assert len(pmap) == 5 and pmap.get(3).id == 3
    assert pmap.get(0).features.patches[0].dtype == np.float16
    assert pmap.nbytes_per_keyframe() == 16 * 4 + 936 * 16 * 2 + 8
    assert pmap.by_stamp(3_000_400_000).id == 2  # within 1 ms
    with pytest.raises(UnknownPlaceError, match="unknown keyframe id 7: the map holds ids 0..4"):
        pmap.get(7)
    with pytest.raises(UnknownPlaceError, match="no keyframe with stamp 9.000000"):
        pmap.by_stamp(9_000_000_000)


def test_save_load_roundtrip(pmap: PlaceMap, tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    pmap.save(path)
    back = PlaceMap.load(path, expect_dim=16, expect_preset=get_preset("speed"))
    assert len(back) == 5 and back.patch_dtype == np.float16
    np.testing.assert_array_equal(back.get(4).features.patches[0], pmap.get(4).features.patches[0])
    np.testing.assert_array_equal(back.get(1).position, [1, 0, 0])
    assert back.get(0).position is None
    q = pmap.get(2).features.global_desc
    assert back.index.search(q, 1)[1][0, 0] == 2
    with pytest.raises(MapError, match="16-d descriptors, the loaded model makes 512-d"):
        PlaceMap.load(path, expect_dim=512)
    with pytest.raises(MapError, match="patch sizes"):
        PlaceMap.load(path, expect_preset=get_preset("performance"))


def test_failed_save_keeps_previous_map(pmap: PlaceMap, tmp_path: Path, monkeypatch, rng) -> None:
    path = tmp_path / "m.npz"
    pmap.save(path)
    before = path.read_bytes()
    pmap.add(_feat(rng), 99_000_000_000)

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        pmap.save(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp"))
    monkeypatch.undo()
    assert len(PlaceMap.load(path)) == 5


def test_corrupt_and_foreign_files(pmap: PlaceMap, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(MapError, match="is corrupt or cannot be read"):
        PlaceMap.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array('{"format": "something", "version": 1}'))
    with pytest.raises(MapError, match="not a pnv_ros map"):
        PlaceMap.load(other)
    newer = tmp_path / "newer.npz"
    np.savez(newer, meta=np.array('{"format": "pnv_ros.place_map", "version": 99}'))
    with pytest.raises(MapError, match="version 99"):
        PlaceMap.load(newer)


def test_memory_budget_spills_to_disk_with_same_answers(rng, tmp_path: Path) -> None:
    from pnv_ros.matching import PatchMatcher

    preset = get_preset("speed")
    feats = [_feat(rng) for _ in range(12)]
    full = PlaceMap(16, preset, "m")
    small = PlaceMap(16, preset, "m", memory_budget_mb=0.1, spill_dir=tmp_path / "spill")  # ~3 keyframes of patches
    for i, f in enumerate(feats):
        full.add(f, i)
        small.add(f, i)
    assert small.ram_patch_bytes <= 0.1 * 2**20 and small.spilled == 12 - small.ram_patch_bytes // (936 * 16 * 2)
    assert isinstance(small.get(0).features.patches[0], np.memmap)
    assert len(list((tmp_path / "spill").glob("*.npy"))) == small.spilled
    pm = PatchMatcher(preset)
    a = pm.score(feats[5], [k.features for k in full.keyframes]).raw
    b = pm.score(feats[5], [k.features for k in small.keyframes]).raw
    np.testing.assert_array_equal(a, b)
    small.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(
        PlaceMap.load(tmp_path / "m.npz").get(0).features.patches[0], full.get(0).features.patches[0]
    )


def test_hnsw_map_loads_in_one_batch_with_same_ids(rng, tmp_path: Path) -> None:
    preset = get_preset("speed")
    m = PlaceMap(16, preset, "m", index_kind="hnsw")
    feats = [_feat(rng) for _ in range(300)]
    for i, f in enumerate(feats):
        m.add(f, i)
    m.save(tmp_path / "m.npz")
    back = PlaceMap.load(tmp_path / "m.npz")
    assert back.index.kind == "hnsw" and len(back.index) == len(back) == 300
    queries = np.stack([f.global_desc for f in feats])
    _, ids = back.index.search(queries, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(300))  # each keyframe finds itself: ids follow insertion
    _, first = back.index.search(queries[:50], 1, limit=100)  # the node's "older than" limit still applies
    assert (first[:, 0] < 100).all() and (first[:50, 0] == np.arange(50)).all()
    back.add(_feat(rng), 300)
    assert back.index.search(back.get(300).features.global_desc, 1)[1][0, 0] == 300
