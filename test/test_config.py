from pathlib import Path

import pytest

from pnv_ros.config import PRESETS, Matcher, Preset, get_preset, load_preset, read_override_file
from pnv_ros.errors import ConfigError


def _reference_ini(name: str) -> Path:
    import patchnetvlad

    return Path(patchnetvlad.__file__).parent / "configs" / f"{name}.ini"


@pytest.mark.parametrize("name", ["performance", "speed", "storage"])
def test_presets_equal_reference_ini(name: str) -> None:
    ref = read_override_file(_reference_ini(name))
    p = get_preset(name)
    assert list(p.patch_sizes) == [int(x) for x in ref["patch_sizes"].split(",")]
    assert list(p.strides) == [int(x) for x in ref["strides"].split(",")]
    assert list(p.patch_weights) == [float(x) for x in ref["patch_weights"].split(",")]
    assert p.matcher is Matcher.parse(ref["matcher"])
    assert (p.image_height, p.image_width) == (ref["image_height"], ref["image_width"]) == (480, 640)


def test_reference_ini_loads_as_override() -> None:
    p = load_preset("speed", _reference_ini("performance"))
    assert p.patch_sizes == (2, 5, 8) and p.matcher is Matcher.RANSAC


def test_speed_grid_is_936_patches() -> None:
    p = get_preset("speed")
    assert p.feature_shape == (30, 40)
    assert p.grid_shape(0) == (26, 36) and p.num_patches(0) == 936


def test_unknown_preset_lists_valid() -> None:
    with pytest.raises(ConfigError, match="choose one of performance, speed, storage"):
        get_preset("fast")


def test_patch_too_big_for_image_says_what_to_change() -> None:
    with pytest.raises(ConfigError, match=r"patch size 12 does not fit the 10x13 feature map.*larger image size"):
        load_preset("speed", {"patch_sizes": [12], "image_height": 160, "image_width": 208})


def test_mismatched_lengths() -> None:
    with pytest.raises(ConfigError, match="one stride per patch size"):
        load_preset("performance", {"strides": [1, 1]})
    with pytest.raises(ConfigError, match="one weight per patch size"):
        load_preset("performance", {"patch_weights": [1.0]})


def test_override_files(tmp_path: Path) -> None:
    t = tmp_path / "o.toml"
    t.write_text('preset = "performance"\nmatcher = "rapid"\ntop_n = 20\n')
    p = load_preset("speed", t)
    assert p.patch_sizes == (2, 5, 8) and p.matcher is Matcher.RAPID and p.top_n == 20
    j = tmp_path / "o.json"
    j.write_text('{"patch_sizes": [4], "strides": [2]}')
    assert load_preset("speed", j).strides == (2,)
    bad = tmp_path / "bad.json"
    bad.write_text('{"patch_size": [4]}')
    with pytest.raises(ConfigError, match="unknown setting"):
        load_preset("speed", bad)
    with pytest.raises(ConfigError, match="unknown matcher"):
        load_preset("speed", {"matcher": "sift"})


def test_roundtrip_dict() -> None:
    for p in PRESETS.values():
        assert Preset.from_dict(p.to_dict()) == p


def test_detector_settings_have_one_source() -> None:
    """Kind: a setting's range or help written twice (config, node table, CLI) and drifting apart."""
    from dataclasses import fields

    from pnv_ros.config import DetectorParams
    from pnv_ros.ros import params

    d = DetectorParams()
    assert [p.name for p in params.DETECTOR_TABLE] == [f.name for f in fields(DetectorParams)]
    assert params.DETECTOR_NAMES == tuple(f.name for f in fields(DetectorParams))
    for f in fields(DetectorParams):
        p = params.BY_NAME[f.name]
        assert f.metadata["help"] and p.description == f.metadata["help"], f.name
        assert p.kind == "detector" and p.default == getattr(d, f.name)
        assert p.range == f.metadata["range"] and p.choices == f.metadata["choices"]
        if p.range is not None:  # the default lies in its range, and the range is what validation uses
            assert p.range[0] <= p.default <= p.range[1] and DetectorParams.RANGES[f.name] == p.range
            with pytest.raises(ConfigError, match=f.name):
                DetectorParams(**{f.name: p.range[1] + 1})
        if p.choices is not None:
            assert p.default in p.choices
    assert set(DetectorParams.RANGES) == {f.name for f in fields(DetectorParams) if f.metadata["range"]}
    assert not {p.name for p in params.NODE_TABLE} & set(params.DETECTOR_NAMES)
    assert len(params.TABLE) == len(params.NODE_TABLE) + len(params.DETECTOR_TABLE)
