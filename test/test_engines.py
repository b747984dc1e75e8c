"""Inference engines (pnv_ros.engines): ONNX export, onnxruntime and OpenVINO against torch, int8 calibration,
identity tags, refusals, and the CLI and node flags.

Kept cheap for CI (about a minute on 2 cores): the VGG-16 family as a random-weight model at 96 x 128 (the
engines see the same graph as at 480 x 640), the DINOv2 family as the built model at its own 322 x 434, a few
real images; everything built once per session in a temporary engine cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORRIDOR, CPU_BF16, REPO, rtab_frame

from pnv_ros.config import get_preset
from pnv_ros.engines import (
    ENGINES,
    FP32_TOLERANCE,
    PRECISIONS,
    EngineError,
    calibration_paths,
    check_engine,
    load_engine,
    model_cache_dir,
    rounding_floor,
    variant,
)
from pnv_ros.errors import ConfigError, FeaturesError, MapError
from pnv_ros.export import export_checked
from pnv_ros.extract import FeatureExtractor
from pnv_ros.model.checkpoint import load_checkpoint
from pnv_ros.model.registry import resolve_checkpoint

IMAGES = [rtab_frame(i) for i in (1, 42)] + [CORRIDOR / "query" / "0000000.jpg"]
SMALL = dataclasses.replace(
    get_preset("speed"), image_height=96, image_width=128, patch_sizes=(3,), strides=(1,), patch_weights=(1.0,)
)


def max_diff(a: list, b: list) -> float:
    """Max abs difference of two PlaceFeatures lists' global and patch descriptors."""
    out = 0.0
    for x, y in zip(a, b):
        out = max(out, float(np.abs(x.global_desc - y.global_desc).max()))
        out = max([out] + [float(np.abs(p - q).max()) for p, q in zip(x.patches, y.patches)])
    return out


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def vgg(random_ckpt: Path):
    return load_checkpoint(random_ckpt)


@pytest.fixture(scope="session")
def vgg_torch(vgg) -> list:
    model, info = vgg
    return FeatureExtractor(model, info, SMALL, device="cpu").extract(IMAGES)


def vgg_engine(vgg, cache: Path, engine: str, precision: str = "fp32", **kw) -> FeatureExtractor:
    model, info = vgg
    return FeatureExtractor(
        model, info, SMALL, device="cpu", engine=engine, precision=precision, engine_cache=cache, **kw
    )


def files_digest(path: Path) -> dict[str, str]:
    """SHA-256 of an engine file, or of every file of an engine folder (by name)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------------------------------------- refusals


def test_engine_and_precision_refusals_name_what_works() -> None:
    assert ENGINES == ("torch", "onnxruntime", "openvino", "tensorrt") and "int8" in PRECISIONS
    for engine in ("torch", "onnxruntime", "openvino"):
        check_engine(engine, "fp32")  # each fp32 engine runs here (openvino is installed: requirements.txt)
    check_engine("onnxruntime", "int8")
    check_engine("openvino", "int8")
    cases = {
        ("tflite", "fp32"): "unknown engine 'tflite': choose one of torch, onnxruntime, openvino, tensorrt",
        ("torch", "int4"): "unknown precision 'int4'",
        ("torch", "int8"): "torch has no int8 path here: use onnxruntime or openvino int8",
        ("onnxruntime", "fp16"): "choose fp32 or int8",
        ("onnxruntime", "bf16"): "no bfloat16 kernels",
        ("torch", "fp16"): "choose fp32 or bf16" if CPU_BF16 else "slower than float32, not faster\\): choose fp32$",
    }
    if not CPU_BF16:  # torch's bfloat16 here would be a reference path: refused, saying why
        cases[("torch", "bf16")] = "no bfloat16 instructions for oneDNN .*hundreds of times slower"
    for (engine, precision), text in cases.items():
        with pytest.raises(EngineError, match=text.replace("(", r"\(")):
            check_engine(engine, precision)
    assert issubclass(EngineError, ConfigError)  # the CLI and the node print it as one line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message; a GPU machine runs gpu_check.py")
def test_tensorrt_without_a_gpu_is_a_clear_error(vgg, cache: Path) -> None:
    for device in ("cpu", "cuda"):
        with pytest.raises(
            EngineError,
            match="engine tensorrt needs an NVIDIA GPU .* has no CUDA GPU; on a CPU use onnxruntime or openvino",
        ):
            check_engine("tensorrt", "fp16", device)
    with pytest.raises(EngineError, match="needs an NVIDIA GPU"):
        vgg_engine(vgg, cache, "tensorrt", "fp16")


def test_bad_combinations_in_the_extractor(vgg, cache: Path, tmp_path: Path) -> None:
    with pytest.raises(
        EngineError, match="bf16 .* is engine torch at precision bf16; it cannot go with engine onnxruntime"
    ):
        vgg_engine(vgg, cache, "onnxruntime", bf16=True)
    with pytest.raises(EngineError, match="engine_file is for the onnxruntime, openvino and tensorrt engines"):
        vgg_engine(vgg, cache, "torch", engine_file=IMAGES[0])
    with pytest.raises(EngineError, match="does not exist"):
        vgg_engine(vgg, cache, "onnxruntime", engine_file=tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="onnxruntime cannot load"):
        vgg_engine(vgg, cache, "onnxruntime", engine_file=junk)
    if CPU_BF16:
        ex = FeatureExtractor(*vgg, SMALL, device="cpu", bf16=True)  # the alias still works
        assert (ex.engine_name, ex.precision, ex.bf16, ex.backend) == ("torch", "bf16", True, None)
    else:  # a CPU without bfloat16 instructions refuses it by either name (test_extract)
        with pytest.raises(EngineError, match="no bfloat16 instructions"):
            FeatureExtractor(*vgg, SMALL, device="cpu", bf16=True)


# ---------------------------------------------------------------------------------------------- float32 engines


def test_vgg_export_round_trip_and_float32_engines_match_torch(
    vgg, vgg_torch: list, cache: Path, tmp_path: Path
) -> None:
    model, info = vgg
    check = export_checked(model, info, SMALL, tmp_path / "vgg.onnx", IMAGES[:2])
    assert check.ok and (tmp_path / "vgg.onnx").is_file()
    whats = ["backbone features", "global descriptors", "patch descriptors", "dynamic axes: one batch of 2 at 96x64"]
    assert [r[0].split(",")[0] for r in check.rows] == whats
    assert all(d < FP32_TOLERANCE for _, d, _ in check.rows)  # random weights: well-conditioned patches too
    import onnx

    dims = onnx.load(str(tmp_path / "vgg.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    for engine in ("onnxruntime", "openvino"):
        ex = vgg_engine(vgg, cache, engine)
        assert ex.backend is not None and ex.info.identity == info.identity  # float32: the same model
        d = max_diff(vgg_torch, ex.extract(IMAGES))
        assert d < FP32_TOLERANCE, (engine, d)
        # the node extracts from its worker and from query_place at once: one engine object, four threads
        with ThreadPoolExecutor(4) as pool:
            d = max_diff(vgg_torch * 6, list(pool.map(ex.extract_one, IMAGES * 6)))
        assert d < FP32_TOLERANCE, (engine, "concurrent", d)
    # the cached backbone ONNX was built once, with its record beside it
    folder = model_cache_dir(info, cache)
    assert [p.name for p in folder.glob("backbone-*.onnx")] == ["backbone-fp32-v1.onnx"]
    assert (folder / "backbone-fp32-v1.onnx.json").is_file()


# ---------------------------------------------------------------------------------------------- int8


@pytest.fixture(scope="session")
def int8_builds(vgg, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each int8 engine built twice from scratch (two caches) and loaded a third time from the first cache."""
    model, info = vgg
    other = tmp_path_factory.mktemp("engines_again")
    out: dict = {}
    for engine in ("onnxruntime", "openvino"):
        logs: list[str] = []
        first = vgg_engine(vgg, cache, engine, "int8", log=logs.append)
        second = vgg_engine(vgg, other, engine, "int8")
        logs_cached: list[str] = []
        third = vgg_engine(vgg, cache, engine, "int8", log=logs_cached.append)
        name = f"{engine}-int8-96x128-v1" + (".onnx" if engine == "onnxruntime" else "")
        out[engine] = {
            "extractors": (first, second, third),
            "logs": (logs, logs_cached),
            "files": (model_cache_dir(info, cache) / name, model_cache_dir(info, other) / name),
        }
    return out


def test_int8_calibration_is_reproducible_and_cached(int8_builds: dict, vgg_torch: list) -> None:
    assert len(calibration_paths()) == 32 and calibration_paths() == calibration_paths()
    assert all(p.parent == CORRIDOR / "ref" for p in calibration_paths())
    for engine, b in int8_builds.items():
        a, c = b["files"]
        da, dc = files_digest(a), files_digest(c)
        if engine == "openvino":  # the IR's .xml numbers its nodes with a process-wide counter: weights compared
            da, dc = da["model.bin"], dc["model.bin"]
        assert da == dc, f"{engine}: two calibrations gave different files"
        first, second, third = b["extractors"]
        logs, logs_cached = b["logs"]
        assert any("calibrating" in m or "NNCF calibration" in m for m in logs), logs
        assert not logs_cached, f"{engine}: rebuilt although cached: {logs_cached}"
        outs = [ex.extract(IMAGES) for ex in (first, second, third)]
        assert max_diff(outs[0], outs[1]) == 0.0 and max_diff(outs[0], outs[2]) == 0.0, engine
        # int8 moves descriptors (that is why they are tagged) but keeps them close to float32's
        d = max_diff(vgg_torch, outs[0])
        cos = min(float(x.global_desc @ y.global_desc) for x, y in zip(vgg_torch, outs[0]))
        assert 0.0 < d and cos > 0.95, (engine, d, cos)
        meta = (a.with_name(a.name + ".json")).read_text()
        assert '"count": 32' in meta and '"seed": 0' in meta


def test_int8_features_are_refused_next_to_float32_ones(int8_builds: dict, vgg, tmp_path: Path) -> None:
    from pnv_ros.features import FeatureSet
    from pnv_ros.place_map import PlaceMap

    model, info = vgg
    fp32 = FeatureExtractor(model, info, SMALL, device="cpu")
    ort8 = int8_builds["onnxruntime"]["extractors"][0]
    ov8 = int8_builds["openvino"]["extractors"][0]
    assert ort8.info.identity == info.identity + "+onnxruntime-int8" and variant("onnxruntime", "int8")
    assert ov8.info.identity == info.identity + "+openvino-int8" and variant("openvino", "fp32") == ""
    names = [p.name for p in IMAGES[:2]]
    sets = {
        k: FeatureSet.from_places(names, ex.extract(IMAGES[:2]), ex.preset, ex.info.identity)
        for k, ex in (("fp32", fp32), ("ort8", ort8), ("ov8", ov8))
    }
    for a, b in (("fp32", "ort8"), ("ort8", "ov8")):
        with pytest.raises(FeaturesError, match=r"\+onnxruntime-int8"):
            sets[a].check_compatible(sets[b])
    sets["ort8"].check_compatible(sets["ort8"])
    pmap = PlaceMap(fp32.dim, fp32.preset, info.identity)
    for i, f in enumerate(fp32.extract(IMAGES[:2])):
        pmap.add(f, i)
    pmap.save(tmp_path / "fp32_map.npz")
    with pytest.raises(MapError, match="int8"):
        PlaceMap.load(tmp_path / "fp32_map.npz", expect_model_id=ort8.info.identity)


def test_load_engine_torch_is_the_model_itself(vgg) -> None:
    model, info = vgg
    assert load_engine(model, info, (96, 128)) is None


# ---------------------------------------------------------------------------------------------- CLI and node


def pnv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "pnv"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        timeout=600,
    )


@pytest.fixture(scope="session")
def dino_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`pnv export dinov2_vlad` (the built DINOv2 model, its own 322 x 434 input), checked on two images."""
    out = tmp_path_factory.mktemp("export") / "dinov2_backbone.onnx"
    r = pnv("export", "dinov2_vlad", "--out", str(out), "--images", *map(str, IMAGES[:2]), "-q")
    return out, r


def test_cli_export_dinov2_checks_against_torch(dino_export) -> None:
    out, r = dino_export
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.is_file()
    lines = r.stdout.splitlines()
    assert "batch and size dynamic; model input 434x322" in lines[0]
    assert "checked against torch on 2 image(s), onnxruntime, float32:" in lines[1]
    checks = {
        ln.split(":")[0].strip().split(",")[0]: float(ln.split("max |diff| ")[1].split()[0])
        for ln in lines
        if "max |diff|" in ln and ln.endswith("ok")
    }
    assert set(checks) == {"backbone features", "global descriptors", "patch descriptors", "dynamic axes"}
    for what in ("backbone features", "global descriptors", "dynamic axes"):
        assert checks[what] < FP32_TOLERANCE, (what, checks[what])
    assert "dynamic axes: one batch of 2 at 322x238" in r.stdout
    assert "trtexec --onnx=" in r.stdout and "--minShapes=images:1x3x322x434" in r.stdout


def test_cli_engine_flags_end_to_end(dino_export, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """pnv extract with --engine openvino --engine-file (the exported ONNX) against torch; refusals as one line.
    (In this process, through the CLI's entry point: the subprocess path is test_cli_export_dinov2's.)"""
    from pnv_ros.cli import main
    from pnv_ros.features import FeatureSet

    onnx_path, r = dino_export
    assert r.returncode == 0, r.stderr[-3000:]
    img = str(IMAGES[0])
    base = ["extract", "-q", "--checkpoint", "dinov2_vlad", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "torch.npz"), img]) == 0
    assert (
        main(
            [
                *base,
                "--engine",
                "openvino",
                "--precision",
                "fp32",
                "--engine-file",
                str(onnx_path),
                "--out",
                str(tmp_path / "ov.npz"),
                img,
            ]
        )
        == 0
    )
    ft, fo = FeatureSet.load(tmp_path / "torch.npz"), FeatureSet.load(tmp_path / "ov.npz")
    assert ft.model_id == fo.model_id  # float32: the same model; maps and files mix
    assert float(np.abs(ft.global_descs - fo.global_descs).max()) < FP32_TOLERANCE
    # Patch descriptors: as close as torch is to itself under one float32 rounding step of its feature map
    # (a trained vocabulary makes them that sensitive: engines.rounding_floor).
    model, info = load_checkpoint(resolve_checkpoint("dinov2_vlad"))
    ex = FeatureExtractor(model, info, get_preset("speed"), device="cpu")
    with torch.inference_mode():
        feats = model.backbone(ex.preprocess(img)[0].unsqueeze(0))
    floor = rounding_floor(model, feats, ex.preset.patch_sizes, ex.preset.strides)
    patch = max(float(np.abs(p - q).max()) for p, q in zip(ft.patches, fo.patches))
    assert 0 < patch <= max(FP32_TOLERANCE, 2 * floor), (patch, floor)
    capsys.readouterr()
    for args, text in (
        (("--engine", "onnxruntime", "--bf16"), "error: bf16 (--bf16, the node's bfloat16) is engine torch"),
        (("--engine", "tensorrt", "--precision", "fp16"), "error: engine tensorrt needs an NVIDIA GPU"),
        (("--precision", "int8"), "error: engine torch does not run int8 on cpu"),
    ):
        assert main([*base, *args, "--out", str(tmp_path / "x.npz"), img]) == 1
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        main(["extract", "--engine", "tflite", "--out", str(tmp_path / "x.npz"), img])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_every_extracting_command_takes_the_engine_flags() -> None:
    from pnv_ros.cli import build_parser

    p = build_parser()
    for cmd in (
        ["extract", "--out", "x.npz", "a.jpg"],
        ["match-two", "a.jpg", "b.jpg"],
        ["eval", "bag", "--gt", "g.npy", "--out", "run"],
        ["bench", "--out", "b.json", "a.jpg"],
    ):
        args = p.parse_args([*cmd, "--engine", "openvino", "--precision", "int8", "--engine-file", "f.xml"])
        assert (args.engine, args.precision, args.engine_file) == ("openvino", "int8", "f.xml"), cmd
        assert p.parse_args([*cmd, "--bf16"]).bf16


def test_node_parameters_and_a_refused_engine_at_start(random_ckpt: Path, tmp_path: Path) -> None:
    from pnv_ros.ros import params

    for name, default in (("engine", "torch"), ("precision", ""), ("engine_file", "")):
        assert params.BY_NAME[name].default == default and params.BY_NAME[name].read_only
    params.check("engine", "openvino")
    with pytest.raises(ConfigError, match="choose one of"):
        params.check("precision", "int4")
    node = str(Path(sys.executable).parent / "loop_closure_node")
    r = subprocess.run(
        [
            node,
            "--ros-args",
            "-p",
            f"checkpoint:={random_ckpt}",
            "-p",
            f"map_dir:={tmp_path}",
            "-p",
            "engine:=tensorrt",
            "-p",
            "precision:=fp16",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "error: engine tensorrt needs an NVIDIA GPU" in out, out[-3000:]


def test_requirements_name_the_engines() -> None:
    reqs = (REPO / "requirements.txt").read_text()
    for pkg in ("onnxruntime", "openvino", "nncf"):
        assert any(line.split("#")[0].strip().startswith(pkg) for line in reqs.splitlines()), pkg
