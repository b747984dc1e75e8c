"""Refitting a model's vocabulary and whitening PCA on the user's images (issue #12): both families, folders
and bags, the CLI, the node's vocabulary_images, and the errors. Real models and real RTAB-Map frames; the
refits run on 12 images (a few seconds each on the 2-core test machine), so small dimensions keep the PCA valid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RTAB, rtab_frame
from PIL import Image

from pnv_ros.config import get_preset
from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.errors import CheckpointError, ConfigError, ImageError, MapError, OutputError
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import FeatureSet
from pnv_ros.model import refit
from pnv_ros.model.checkpoint import checkpoint_info, file_sha256, load_checkpoint
from pnv_ros.model.dinov2_vlad import FAMILY, DinoVLADModel

BIN = Path(sys.executable).parent
PNV = str(BIN / "pnv")
FRAMES = [1, 8, 15, 22, 29, 36, 43, 50, 57, 64, 71, 78]  # spread over the RTAB-Map loop


@pytest.fixture(scope="module")
def twelve(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("twelve")
    for i in FRAMES:
        (d / f"{i}.jpg").symlink_to(rtab_frame(i))
    return d


@pytest.fixture(scope="module")
def dinov2_ckpt() -> Path:
    """The built DINOv2 model; the README's set-up builds it. Missing = failure, not skip."""
    from pnv_ros.model.registry import built_model_path

    p = built_model_path("dinov2_vlad")
    assert p.is_file(), f"dinov2_vlad model missing at {p}: run scripts/setup.sh (pnv models build dinov2_vlad)"
    return p


def meta_of(path: Path) -> dict:
    return json.loads(refit.metadata_path(path).read_text())


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PNV, *args], capture_output=True, text=True, timeout=900, env=env)


# -- sampling and the errors found before any work ------------------------------------------------------------


def test_evenly_spaced_covers_the_whole_recording() -> None:
    assert refit.evenly_spaced(5, 300) == [0, 1, 2, 3, 4]
    got = refit.evenly_spaced(108_000, 300)  # an hour at 30 Hz
    assert len(got) == len(set(got)) == 300 and got[0] == 0 and got[-1] == 107_999
    gaps = np.diff(got)
    assert gaps.min() >= 361 and gaps.max() <= 362
    assert refit.evenly_spaced(84, 12) == [0, 8, 15, 23, 30, 38, 45, 53, 60, 68, 75, 83]
    assert refit.evenly_spaced(10, 1) == [0]
    s = refit.folder_images([RTAB], 12)
    assert len(s) == 12 and s.images[0] == RTAB / "1.jpg" and s.images[-1] == RTAB / "84.jpg"
    assert s.source == {"kind": "images", "paths": [str(RTAB)], "available": 84, "sampled": 12}


def test_errors_before_the_work(random_ckpt: Path, twelve: Path, tmp_path: Path) -> None:
    imgs = refit.folder_images([twelve])
    out = tmp_path / "m.pth.tar"
    with pytest.raises(CheckpointError, match="at least 10 fitting images, got 9"):
        refit.refit_model(random_ckpt, imgs.images[:9], out)
    with pytest.raises(ConfigError, match=r"300 PCA samples \(25 per image\).*400 dimensions.*at least 17 images"):
        refit.refit_model(random_ckpt, imgs, out, num_pcs=400)
    with pytest.raises(ConfigError, match=r"1 to 8192 \(K x C = 16 x 512\)"):
        refit.refit_model(random_ckpt, imgs, out, num_pcs=9000)
    with pytest.raises(ConfigError, match="1200 local descriptors, fewer than the 2000 clusters"):
        refit.refit_model(random_ckpt, imgs, out, num_clusters=2000)
    with pytest.raises(CheckpointError, match="does not exist"):
        refit.refit_model(tmp_path / "missing.pth.tar", imgs, out)
    # outputs: a folder, the source model itself, a name whose metadata would overwrite it
    with pytest.raises(OutputError, match="is a folder"):
        refit.refit_model(random_ckpt, imgs, tmp_path)
    with pytest.raises(OutputError, match="is an input of this command"):
        refit.refit_model(random_ckpt, imgs, random_ckpt)
    with pytest.raises(OutputError, match="metadata would overwrite the model file"):
        refit.refit_model(random_ckpt, imgs, tmp_path / "m.json")
    # undecodable images are skipped and counted; too few left is an error as soon as that is certain
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("0.jpg", "1.png"):
        (bad / name).write_bytes(b"\xff\xd8\xff\xe0 not an image")
    for i in FRAMES[:9]:
        (bad / f"{i + 1}.jpg").symlink_to(rtab_frame(i))
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=r"at most 9 of the 11 images can be decoded, 10 are needed; 2 cannot"):
        refit.refit_model(random_ckpt, refit.folder_images([bad]), out)
    assert time.perf_counter() - t0 < 30  # the two bad files come first: no backbone pass for the nine after them
    assert not out.exists() and not refit.metadata_path(out).exists()
    with pytest.raises(ConfigError, match="a folder of images, not a bag"):
        refit.fitting_images(twelve, topic="/camera/image")


def test_cli_errors(twelve: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pnv_ros.cli import main

    def err(*argv: str, code: int = 1) -> str:
        try:
            got = main(["models", "refit", *argv])
        except SystemExit as e:
            got = e.code
        assert got == code, argv
        return " ".join(capsys.readouterr().err.split())

    e = err("no_such_model", "--images", str(twelve), "--out", str(tmp_path / "m.pth.tar"))
    assert e.startswith("error: checkpoint no_such_model does not exist"), e
    e = err("default", "--images", str(twelve), "--topic", "/cam", "--out", str(tmp_path / "m"))
    assert e == "error: --topic and --bit-depth apply to --bag only", e
    assert "is a folder" in err("default", "--images", str(twelve), "--out", str(tmp_path), "-q")
    assert "not allowed with argument" in err("default", "--images", str(twelve), "--bag", "x", "--out", "m", code=2)
    assert "--clusters: 1 is out of range" in err("default", "--images", "d", "--out", "m", "--clusters", "1", code=2)
    assert "one of the arguments --images --bag is required" in err("default", "--out", "m", code=2)
    with pytest.raises(SystemExit):
        main(["models", "refit", "--help"])
    assert f"default {refit.MAX_IMAGES}" in " ".join(capsys.readouterr().out.split())


# -- the VGG-16 family: folders and bags, the same file; maps refuse the other vocabulary ----------------------


@pytest.mark.slow
def test_vgg_refit_from_a_folder_and_from_a_bag_is_the_same_file(
    random_ckpt: Path, twelve: Path, tmp_path: Path
) -> None:
    from pnv_ros.bags import make_bag

    a = refit.refit_model(random_ckpt, refit.folder_images([twelve]), tmp_path / "a.pth.tar")
    bag = tmp_path / "bag"
    make_bag(twelve, bag, compressed=True)  # the jpeg bytes as they are: the same pixels as the files
    b = refit.refit_model(random_ckpt, refit.bag_images(bag), tmp_path / "b.pth.tar")
    assert a.read_bytes() == b.read_bytes()  # the same images through two paths: byte-identical
    src, src_info = load_checkpoint(random_ckpt)
    model, info = load_checkpoint(a)
    assert (info.family, info.backbone, info.num_clusters, info.dim) == ("netvlad_vgg16", "vgg16", 16, 64)
    assert info.sha256 != src_info.sha256
    for name, t in src.encoder.state_dict().items():  # the backbone is kept, bit for bit
        assert torch.equal(t, model.encoder.state_dict()[name]), name
    assert not torch.equal(src.pool.centroids, model.pool.centroids)
    raw = torch.load(a, map_location="cpu", weights_only=True)
    assert set(raw) == {"num_pcs", "state_dict"} and raw["num_pcs"] == 64  # the authors' format
    ma, mb = meta_of(a), meta_of(b)
    assert ma["sha256"] == file_sha256(a) and ma["refit_of"]["sha256"] == src_info.sha256
    assert (ma["family"], ma["num_clusters"], ma["dim"], ma["fitting"]["images"]) == ("netvlad_vgg16", 16, 64, 12)
    assert ma["fitting"]["source"] == {"kind": "images", "paths": [str(twelve)], "available": 12, "sampled": 12}
    assert mb["fitting"]["source"] == {
        "kind": "bag",
        "path": str(bag),
        "topic": "/camera/image",
        "available": 12,
        "sampled": 12,
    }
    assert ma["fitting"]["pca"]["samples"] == 12 * 25 and ma["features"]["input_height"] == 480

    # A map made with the refitted vocabulary refuses the original model (same 64 dimensions: by the hash),
    # and the other way round.
    params = DetectorParams(min_travel_m=0.0, min_visual_change=0.0)
    frame = np.asarray(Image.open(rtab_frame(1)).convert("RGB"))
    refitted = LoopClosureDetector(FeatureExtractor(model, info, get_preset("speed"), device="cpu"), params)
    original = LoopClosureDetector(FeatureExtractor(src, src_info, get_preset("speed"), device="cpu"), params)
    for det, name in ((refitted, "refitted"), (original, "original")):
        det.process(frame, 10**9)
        det.save_map(tmp_path / f"{name}.npz")
    with pytest.raises(MapError, match=f"{info.sha256[:12]}.*{src_info.sha256[:12]}"):
        original.load_map(tmp_path / "refitted.npz")
    with pytest.raises(MapError, match=src_info.sha256[:12]):
        refitted.load_map(tmp_path / "original.npz")
    assert refitted.load_map(tmp_path / "refitted.npz") == 1


@pytest.mark.slow
def test_cli_refits_the_default_model_by_name_and_extract_takes_it(default_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "site.pth.tar"
    r = run(
        "models",
        "refit",
        "default",
        "--images",
        str(RTAB),
        "--max-images",
        "12",
        "--dims",
        "32",
        "--out",
        str(out),
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "on 12 images (12 of 84 sampled), 64 words, 32 dimensions" in r.stdout
    info = checkpoint_info(out)
    assert (info.family, info.num_clusters, info.dim) == ("netvlad_vgg16", 64, 32)
    assert meta_of(out)["refit_of"]["sha256"] == file_sha256(default_ckpt)
    r = run(
        "extract",
        "--checkpoint",
        str(out),
        "--out",
        str(tmp_path / "f.npz"),
        "-q",
        str(rtab_frame(3)),
        str(rtab_frame(44)),
    )
    assert r.returncode == 0, r.stderr
    fs = FeatureSet.load(tmp_path / "f.npz")
    assert fs.dim == 32 and fs.model_id == info.identity and fs.preset.backbone == "vgg16"


# -- the DINOv2 family ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dinov2_refit_keeps_layer_facet_input_and_is_reproducible(
    dinov2_ckpt: Path, twelve: Path, tmp_path: Path
) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in twelve.iterdir():
        (imgs / f.name).symlink_to(f.resolve())
    (imgs / "99.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # skipped and counted
    out = tmp_path / "dino_site.pth.tar"
    r = run(
        "models",
        "refit",
        "dinov2_vlad",
        "--images",
        str(imgs),
        "--clusters",
        "16",
        "--dims",
        "32",
        "--out",
        str(out),
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert "12 images (13 of 13 sampled, 1 undecodable skipped), 16 words, 32 dimensions" in r.stdout, r.stdout
    src, src_info = load_checkpoint(dinov2_ckpt)
    model, info = load_checkpoint(out)
    assert isinstance(model, DinoVLADModel) and info.family == FAMILY and info.backbone == "dinov2_vits14"
    assert (model.layer, model.facet, model.input_size) == (src.layer, src.facet, src.input_size)
    assert (info.num_clusters, info.dim, info.input_size) == (16, 32, src_info.input_size)
    for name, t in src.encoder.state_dict().items():
        assert torch.equal(t, model.encoder.state_dict()[name]), name
    m = meta_of(out)
    assert m["fitting"]["undecodable"] == 1 and "99.png" in m["fitting"]["undecodable_first"][0]
    assert m["features"] == src.config() and m["refit_of"]["sha256"] == src_info.sha256
    # the same inputs again (through the library): byte-identical
    again = refit.refit_model(
        dinov2_ckpt, refit.folder_images([imgs]), tmp_path / "again.pth.tar", num_clusters=16, num_pcs=32
    )
    assert again.read_bytes() == out.read_bytes()
    other = refit.refit_model(
        dinov2_ckpt, refit.folder_images([imgs]), tmp_path / "other.pth.tar", num_clusters=16, num_pcs=32, seed=1
    )
    assert other.read_bytes() != out.read_bytes() and meta_of(other)["fitting"]["kmeans"]["seed"] == 1
    assert m["fitting"]["kmeans"]["seed"] == 0  # the default: the builders' seed
    r = run("extract", "--checkpoint", str(out), "--out", str(tmp_path / "f.npz"), "-q", str(rtab_frame(5)))
    assert r.returncode == 0, r.stderr
    fs = FeatureSet.load(tmp_path / "f.npz")
    assert fs.dim == 32 and fs.preset.backbone == "dinov2_vits14" and fs.model_id == info.identity
    assert (fs.preset.image_height, fs.preset.image_width) == src.input_size


# -- the node: vocabulary_images at start, cached ------------------------------------------------------------


def _node_until_ready(env: dict, *params: str, timeout: float = 600) -> tuple[int | None, str]:
    """Start loop_closure_node, wait until it says it is ready (or exits), SIGINT it; (exit code, output)."""
    args = [str(BIN / "loop_closure_node"), "--ros-args", *(x for p in params for x in ("-p", p))]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    end = time.time() + timeout
    while time.time() < end and p.poll() is None and not any("loop_closure ready" in ln for ln in lines):
        time.sleep(0.2)
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    reader.join(10)
    return p.returncode, "".join(lines)


@pytest.mark.slow
def test_node_refits_at_start_once(random_ckpt: Path, twelve: Path, tmp_path: Path) -> None:
    assert os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE") and os.environ.get("ROS_DOMAIN_ID")  # conftest's
    env = dict(os.environ, PNV_CACHE_DIR=str(tmp_path / "cache"))
    common = (f"checkpoint:={random_ckpt}", f"map_dir:={tmp_path / 'maps'}", f"vocabulary_images:={twelve}")
    rc, out = _node_until_ready(env, *common)
    assert rc == 0, out[-3000:]
    assert "refitting the vocabulary of" in out and "on 12 images of" in out, out[-3000:]
    assert "vocabulary refitted in" in out and "16 words, 64 dimensions" in out, out[-3000:]
    cached = list((tmp_path / "cache" / "models" / "refit").glob("rand_WPCA64.refit-*.pth.tar"))
    assert len(cached) == 1 and f"model {cached[0].name}:64:" in out
    rc, out = _node_until_ready(env, *common)  # a restart: from the cache, no refit
    assert rc == 0 and "vocabulary from the cache in" in out and "refitting" not in out, out[-3000:]
    assert f"model {cached[0].name}:64:{file_sha256(cached[0])[:12]}" in out
    rc, out = _node_until_ready(env, *common[:2], f"vocabulary_images:={tmp_path / 'nowhere'}")
    assert rc == 1 and "do not exist" in out, out[-3000:]
