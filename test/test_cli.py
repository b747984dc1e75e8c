"""The pnv command, run as a user runs it: the installed console script."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import RTAB, rtab_frame

PNV = str(Path(sys.executable).parent / "pnv")


def run(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([PNV, *args], capture_output=True, text=True, timeout=timeout, env=e)


def test_help_documents_commands() -> None:
    r = run("--help")
    assert r.returncode == 0
    for c in ("extract", "match", "match-two", "models"):
        assert c in r.stdout
    r = run("match", "--help")
    assert "--gt" in r.stdout and "--top-n" in r.stdout and "--matcher" in r.stdout


def test_user_errors_are_one_line(tmp_path: Path, random_ckpt: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (
            ["extract", "--checkpoint", str(random_ckpt), "--out", str(tmp_path / "x.npz"), str(empty)],
            "folder holds no images",
        ),
        (
            ["extract", "--checkpoint", str(tmp_path / "no.pth"), "--out", str(tmp_path / "x.npz"), str(RTAB)],
            "does not exist",
        ),
        (["extract", "--preset", "turbo", "--out", str(tmp_path / "x.npz"), str(RTAB)], "unknown preset"),
        (
            ["match", "--db", str(tmp_path / "a.npz"), "--queries", str(tmp_path / "b.npz"), "--out", "o.json"],
            "does not exist",
        ),
    ]
    for args, msg in cases:
        r = run(*args)
        assert r.returncode == 1, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and msg in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_extract_match_and_preset_mismatch(tmp_path: Path, random_ckpt: Path) -> None:
    db, q = tmp_path / "db.npz", tmp_path / "q.npz"
    frames = [str(rtab_frame(i)) for i in (1, 2, 3, 4)]
    assert run("extract", "-q", "--checkpoint", str(random_ckpt), "--out", str(db), *frames).returncode == 0
    assert run("extract", "-q", "--checkpoint", str(random_ckpt), "--out", str(q), str(rtab_frame(42))).returncode == 0
    out = tmp_path / "r.json"
    r = run("match", "-q", "--db", str(db), "--queries", str(q), "--top-n", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["queries"][0]
    assert res["query"] == "42" and len(res["global"]) == 3 and sorted(res["reranked"]) == sorted(res["global"])
    perf = tmp_path / "perf.npz"
    assert (
        run(
            "extract", "-q", "--preset", "performance", "--checkpoint", str(random_ckpt), "--out", str(perf), frames[0]
        ).returncode
        == 0
    )
    r = run("match", "--db", str(db), "--queries", str(perf), "--out", str(out))
    assert r.returncode == 1 and "extract both with the same preset" in r.stderr


@pytest.mark.slow
def test_default_model_rtabmap_loop(tmp_path: Path, default_ckpt: Path) -> None:
    """No --checkpoint: the default model. Frames 1-40 database, 41-84 queries."""
    db, qd = tmp_path / "db", tmp_path / "q"
    db.mkdir()
    qd.mkdir()
    for i in range(1, 85):
        (db if i <= 40 else qd).joinpath(f"{i}.jpg").symlink_to(rtab_frame(i))
    r = run("extract", "-q", "--out", str(tmp_path / "db.npz"), str(db))
    assert r.returncode == 0 and "using the default model" in r.stderr
    assert run("extract", "-q", "--out", str(tmp_path / "q.npz"), str(qd)).returncode == 0
    out = tmp_path / "r.json"
    gt = RTAB.parent / "gt.csv"
    r = run(
        "match",
        "-q",
        "--db",
        str(tmp_path / "db.npz"),
        "--queries",
        str(tmp_path / "q.npz"),
        "--top-n",
        "40",
        "--gt",
        str(gt),
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())["recall"]
    assert rec["reranked"]["1"] >= 0.95
    assert rec["reranked"]["1"] >= rec["global"]["1"]
    fast = tmp_path / "fast.json"
    args = ["match", "-q", "--db", str(tmp_path / "db.npz"), "--queries", str(tmp_path / "q.npz"), "--top-n", "40"]
    r = run(*args, "--gt", str(gt), "--fast-products", "--out", str(fast))
    assert r.returncode == 0, r.stderr
    exact_q, fast_q = json.loads(out.read_text())["queries"], json.loads(fast.read_text())["queries"]
    same_top1 = sum(a["reranked"][0] == b["reranked"][0] for a, b in zip(exact_q, fast_q))
    assert same_top1 >= len(exact_q) - 1  # rounding-level differences: at most one near-tie flips a top-1
    assert json.loads(fast.read_text())["recall"]["reranked"]["1"] >= 0.95
    pic = tmp_path / "m.png"
    r = run("match-two", str(rtab_frame(62)), str(rtab_frame(21)), "--out", str(pic))
    assert r.returncode == 0 and pic.stat().st_size > 10_000 and "score" in r.stdout


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    sha = ""
    served_ranges: list = []

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/api/models/"):
            body = json.dumps(
                [{"path": "pitts_WPCA128.pth.tar", "lfs": {"oid": self.sha, "size": len(self.payload)}}]
            ).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        _Handler.served_ranges.append(start)
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])


def test_models_download_resumes_and_checks(tmp_path: Path) -> None:
    from conftest import make_random_checkpoint

    ck = make_random_checkpoint(tmp_path / "src.pth.tar", num_clusters=8, num_pcs=128)
    _Handler.payload = ck.read_bytes()
    _Handler.sha = hashlib.sha256(_Handler.payload).hexdigest()
    _Handler.served_ranges = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cache = tmp_path / "cache"
    part = cache / "models" / "pitts_WPCA128.pth.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(_Handler.payload[:1000])  # an interrupted download
    env = {"PNV_MODELS_URL": f"http://127.0.0.1:{srv.server_port}", "PNV_CACHE_DIR": str(cache)}
    try:
        r = run("models", "download", "pitts_WPCA128", "-q", env=env)
        assert r.returncode == 0, r.stderr
        assert _Handler.served_ranges == [1000]
        assert (cache / "models" / "pitts_WPCA128.pth.tar").read_bytes() == _Handler.payload
        _Handler.sha = "0" * 64  # now the listed checksum disagrees
        (cache / "models" / "pitts_WPCA128.pth.tar").unlink()
        r = run("models", "download", "pitts_WPCA128", "-q", env=env)
        assert r.returncode == 1 and "checksum mismatch" in r.stderr
        assert not part.exists()
    finally:
        srv.shutdown()


def test_models_download_offline_fails_fast(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t = time.time()
    r = run(
        "models",
        "download",
        "mapillary_WPCA512",
        env={"PNV_MODELS_URL": f"http://127.0.0.1:{port}", "PNV_CACHE_DIR": str(tmp_path)},
    )
    assert r.returncode == 1 and "looks offline" in r.stderr
    assert time.time() - t < 20
    r = run("models", "list", env={"PNV_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0 and "pitts_WPCA4096" in r.stdout and "not built" in r.stdout


@pytest.mark.parametrize("fast", [False, True])
def test_bench_reports_costs(tmp_path: Path, random_ckpt: Path, fast: bool) -> None:
    out = tmp_path / "bench.json"
    frames = [str(rtab_frame(i)) for i in (1, 2)]
    extra = ["--fast-products", "--bf16"] if fast else []
    r = run("bench", "-q", "--checkpoint", str(random_ckpt), "--preset", "speed", "--top-n", "4", "--repeats", "1",
            "--out", str(out), *extra, *frames)  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["products"] == ("onednn" if fast else "exact") and res["matcher"] == "rapid" and res["bf16"] is fast
    assert 0 < res["seconds_per_image"] < 60 and 0 < res["ms_per_candidate"] < 1000
    assert res["patch_dtype"] == "float16"
    assert 936 * 64 * 2 <= res["bytes_per_keyframe"] < 2 * 936 * 64 * 2  # float16 patches dominate a keyframe
    assert set(res["global_search_ms_by_map_size"]) == {"1000", "10000"}
