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

import numpy as np
import pytest
from conftest import CPU_BF16, RTAB, rtab_frame

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


def test_help_listing_and_input_errors_answer_without_torch(tmp_path: Path) -> None:
    """Importing torch and torchvision costs 5-10 s on a 2-core CPU: --help, `models list` and a mistake in the
    arguments are answered before it (the commands import their heavy parts after checking their inputs)."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    frame, missing = str(rtab_frame(1)), str(tmp_path / "missing")
    probe = (
        "import sys\nfrom pnv_ros.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    rc = e.code\nprint('rc', rc, 'torch' in sys.modules)"
    )
    cases = [
        (["--help"], 0),
        (["extract", "--help"], 0),
        (["models", "list"], 0),
        (["extract", "--out", str(folder), frame], 1),
        (["extract", "--checkpoint", missing, "--out", str(tmp_path / "x.npz"), frame], 1),
        (["match", "--db", missing, "--queries", missing, "--out", str(folder)], 1),
        (["match-two", frame, frame, "--out", str(folder)], 1),
        (["match-two", frame, frame, "--camera", missing, "--json"], 1),
        (["bench", frame, "--out", str(folder)], 1),
        (["eval", missing, "--gt", missing, "--out", str(tmp_path / "run")], 1),
        (["match", "--db", missing, "--queries", missing, "--top-n", "0"], 2),
    ]
    for args, rc in cases:
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert r.stdout.splitlines()[-1] == f"rc {rc} False", (args, r.stdout[-500:], r.stderr[-1000:])


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
    assert res["query"] == "42.jpg" and len(res["global"]) == 3 and sorted(res["reranked"]) == sorted(res["global"])
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
def test_default_model_rtabmap_loop(tmp_path: Path, default_extractor, rtab_features: list) -> None:
    """The default model's features (the session's extraction, as ``pnv extract`` writes them: the extract
    command itself is tested above) through ``pnv match``. Frames 1-40 database, 41-84 queries."""
    from pnv_ros.features import FeatureSet

    for name, frames in (("db", range(1, 41)), ("q", range(41, 85))):
        fs = FeatureSet.from_places(
            [f"{i}.jpg" for i in frames],
            [rtab_features[i - 1] for i in frames],
            default_extractor.preset,
            default_extractor.info.identity,
        )
        fs.save(tmp_path / f"{name}.npz")
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
        "20",
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
    args = ["match", "-q", "--db", str(tmp_path / "db.npz"), "--queries", str(tmp_path / "q.npz"), "--top-n", "20"]
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
    bf16 = fast and CPU_BF16  # elsewhere refused (test_extract), checked below
    extra = ["--fast-products", *(["--bf16"] if bf16 else [])] if fast else []
    if fast and not bf16:
        r = run("bench", "-q", "--checkpoint", str(random_ckpt), "--bf16", "--out", str(out), *frames)
        assert r.returncode != 0 and "no bfloat16 instructions" in r.stderr and not out.exists(), r.stderr
    r = run(
        "bench",
        "-q",
        "--checkpoint",
        str(random_ckpt),
        "--preset",
        "speed",
        "--top-n",
        "4",
        "--repeats",
        "1",
        "--out",
        str(out),
        *extra,
        *frames,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["products"] == ("onednn" if fast else "exact") and res["matcher"] == "rapid" and res["bf16"] is bf16
    assert 0 < res["seconds_per_image"] < 60 and 0 < res["ms_per_candidate"] < 1000
    assert res["patch_dtype"] == "float16"
    assert 936 * 64 * 2 <= res["bytes_per_keyframe"] < 2 * 936 * 64 * 2  # float16 patches dominate a keyframe
    assert set(res["global_search_ms_by_map_size"]) == {"1000", "10000"}


def _numeric_actions():
    """(command, option, action) for every option of every command whose value is a number."""
    import argparse

    from pnv_ros.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from walk(sub, f"{path} {name}".strip())
            elif a.option_strings:
                yield path, a.option_strings[-1], a

    return list(walk(build_parser(), ""))


def test_every_numeric_option_is_range_checked(capsys: pytest.CaptureFixture) -> None:
    """Kind: numeric options not range-checked (`pnv match --top-n 0` became 100)."""
    from pnv_ros.cli import Number, main

    actions = _numeric_actions()
    numeric = [(c, o, a) for c, o, a in actions if a.type is not None]
    assert len(numeric) >= 15  # top-n, rates, thresholds, radii ... of every command
    for cmd, opt, a in numeric:
        assert isinstance(a.type, Number), f"pnv {cmd} {opt}: type {a.type} has no range"
        if a.default is not None:  # the default itself lies in the range
            assert a.type(str(a.default)) == a.default, (cmd, opt)
    # plain int/float without a range nowhere (store_true etc. have no type)
    assert not [o for _, o, a in actions if a.type in (int, float)]
    cases = [
        (["match", "--db", "a", "--queries", "b", "--out", "o", "--top-n", "0"], "--top-n", "from 1 to"),
        (["eval", "b", "--gt", "g", "--out", "o", "--threshold", "1.5"], "--threshold", "from 0 to 1"),
        (["eval", "b", "--gt", "g", "--out", "o", "--exclude-recent", "nan"], "--exclude-recent", "out of range"),
        (["eval", "b", "--gt", "g", "--out", "o", "--top-n", "2.5"], "--top-n", "not a whole number"),
        (["bag", "make", "d", "--out", "o", "--rate", "0"], "--rate", "from 0.001"),
        (["bench", "x.jpg", "--out", "o", "--repeats", "-1"], "--repeats", "from 1 to 1000"),
    ]
    for argv, opt, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert opt in err and msg in err, err


def test_eval_sets_every_detector_setting_by_its_parameter_name(capsys: pytest.CaptureFixture) -> None:
    """Kind: settings written twice (--threshold for min_score, literal defaults) and some not settable at
    all (temporal_k, min_texture ...). pnv eval's detector options are generated from DetectorParams: one
    per field, named as the node's parameter; the older spellings set the same field, with a note."""
    from dataclasses import fields

    from pnv_ros.cli import build_parser
    from pnv_ros.cli.detector_options import detector_params
    from pnv_ros.config import DetectorParams

    base = ["eval", "b.bag", "--gt", "g.csv", "--out", "run"]
    assert detector_params(build_parser().parse_args(base)) == DetectorParams()  # the defaults are the node's
    changed = {
        "top_n": 7,
        "matcher": "ransac",
        "min_score": 0.3,
        "exclude_recent_s": 2.5,
        "exclude_recent_keyframes": 3,
        "min_interval_s": 0.5,
        "min_travel_m": 1.5,
        "min_rotation_rad": 0.2,
        "min_visual_change": 0.1,
        "min_texture": 6.0,
        "temporal_k": 3,
        "temporal_tolerance": 5,
        "fast_products": True,
    }
    assert set(changed) == {f.name for f in fields(DetectorParams)}  # all of them, every default changed
    argv = list(base)
    for name, v in changed.items():
        opt = "--" + name.replace("_", "-")
        argv += [opt] if v is True else [opt, str(v)]
    assert detector_params(build_parser().parse_args(argv)) == DetectorParams(**changed)
    old = {
        "--threshold": "min_score",
        "--exclude-recent": "exclude_recent_s",
        "--min-interval": "min_interval_s",
        "--min-travel": "min_travel_m",
    }
    capsys.readouterr()
    for opt, name in old.items():
        p = detector_params(build_parser().parse_args([*base, opt, "0.25"]))
        assert getattr(p, name) == 0.25, opt
        assert f"{opt} is deprecated: use --{name.replace('_', '-')}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*base, "--temporal-k", "0"])
    assert e.value.code == 2 and "--temporal-k" in capsys.readouterr().err


def _one_error_line(r: subprocess.CompletedProcess, msg: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0], r.stderr


def test_output_path_checked_before_the_work(tmp_path: Path) -> None:
    """Kind: write errors surfaced after the work. The checkpoint given does not exist, so an error
    about --out proves the output was checked before anything else was loaded."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (tmp_path / "a_file").write_text("x")
    missing = str(tmp_path / "no_such.pth")
    frame = str(rtab_frame(1))
    _one_error_line(run("extract", "--checkpoint", missing, "--out", str(folder), frame), "is a folder")
    _one_error_line(
        run("extract", "--checkpoint", missing, "--out", str(tmp_path / "a_file" / "x.npz"), frame),
        "is a file, not a folder",
    )
    _one_error_line(run("match", "--db", missing, "--queries", missing, "--out", str(folder)), "is a folder")
    _one_error_line(run("match-two", "--checkpoint", missing, frame, frame, "--out", str(folder)), "is a folder")
    _one_error_line(run("bench", "--checkpoint", missing, frame, "--out", str(folder)), "is a folder")
    _one_error_line(run("eval", missing, "--gt", missing, "--out", str(tmp_path / "a_file"), "--force"), "is a file")
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # root writes anywhere: this case needs a normal user
            _one_error_line(run("extract", "--checkpoint", missing, "--out", str(ro / "x.npz"), frame), "cannot write")
    finally:
        ro.chmod(0o755)


def test_full_disk_is_one_error_line_and_leaves_nothing(tmp_path: Path, random_ckpt: Path) -> None:
    """`ulimit -f` stands in for a full disk: the write fails (EFBIG, as ENOSPC would) after the work."""
    frames = [str(rtab_frame(i)) for i in (1, 2, 3)]
    out = tmp_path / "out"
    out.mkdir()

    def limited(kb: int, *args: str) -> subprocess.CompletedProcess:
        cmd = " ".join(["ulimit", "-f", str(kb), ";", "exec", PNV, *args])
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600)

    r = limited(16, "extract", "-q", "--checkpoint", str(random_ckpt), "--out", str(out / "db.npz"), *frames)
    _one_error_line(r, f"cannot write {out / 'db.npz'}: File too large")
    assert list(out.iterdir()) == []  # no .tmp, no partial file
    db = tmp_path / "db.npz"
    assert run("extract", "-q", "--checkpoint", str(random_ckpt), "--out", str(db), *frames).returncode == 0
    r = limited(1, "match", "-q", "--db", str(db), "--queries", str(db), "--out", str(out / "r.json"))
    _one_error_line(r, f"cannot write {out / 'r.json'}: File too large")
    assert list(out.iterdir()) == []


def test_identity_is_the_relative_path(tmp_path: Path, random_ckpt: Path) -> None:
    """Kind: identity by file stem. ref/1.jpg and query/1.jpg stay two images with two names."""
    ref, query = tmp_path / "ref", tmp_path / "query"
    ref.mkdir()
    query.mkdir()
    for i in (1, 2):
        (ref / f"{i}.jpg").symlink_to(rtab_frame(i))
        (query / f"{i}.jpg").symlink_to(rtab_frame(40 + i))
    both = tmp_path / "both.npz"
    r = run("extract", "-q", "--checkpoint", str(random_ckpt), "--out", str(both), str(ref), str(query))
    assert r.returncode == 0, r.stderr
    from pnv_ros.features import FeatureSet

    assert FeatureSet.load(both).names == ["ref/1.jpg", "ref/2.jpg", "query/1.jpg", "query/2.jpg"]
    one = tmp_path / "ref.npz"
    assert run("extract", "-q", "--checkpoint", str(random_ckpt), "--out", str(one), str(ref)).returncode == 0
    assert FeatureSet.load(one).names == ["1.jpg", "2.jpg"]
    out = tmp_path / "r.json"
    r = run("match", "-q", "--db", str(both), "--queries", str(one), "--top-n", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    q = json.loads(out.read_text())["queries"]
    assert q[0]["query"] == "1.jpg" and "ref/1.jpg" in q[0]["global"] and len(set(q[0]["global"])) == 4
    r = run("extract", "--checkpoint", str(random_ckpt), "--out", str(tmp_path / "x.npz"), str(ref), str(ref / "1.jpg"))
    _one_error_line(r, "is given twice")
    assert not (tmp_path / "x.npz").exists()


def test_match_two_says_when_an_image_has_no_information(tmp_path: Path, random_ckpt: Path) -> None:
    """Kind: frames with no information still score. match-two shows the score and says the detector
    would never take such a frame (the information test, DetectorParams.min_texture)."""
    from PIL import Image

    blank = tmp_path / "cap.png"
    Image.fromarray(np.full((120, 160, 3), 2, np.uint8)).save(blank)
    r = run("match-two", "--checkpoint", str(random_ckpt), str(blank), str(blank))
    assert r.returncode == 0 and "score" in r.stdout
    assert r.stdout.count("has no information (texture 0.0 < 4") == 2, r.stdout
    r = run("match-two", "--checkpoint", str(random_ckpt), str(rtab_frame(1)), str(rtab_frame(2)))
    assert r.returncode == 0 and "no information" not in r.stdout


def test_bag_make_leaves_no_half_bag(tmp_path: Path) -> None:
    """A bad image met half-way: one error line, no bag folder, no temp folder."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in (1, 2):
        (imgs / f"{i}.png").write_bytes(rtab_frame(i).read_bytes())  # a JPEG named .png: PIL reads by content
    (imgs / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 11)  # 19 bytes of a broken PNG
    out = tmp_path / "bags" / "b"
    _one_error_line(run("bag", "make", str(imgs), "--out", str(out)), "3.png")
    assert list((tmp_path / "bags").iterdir()) == []
    _one_error_line(run("bag", "make", str(imgs), "--out", str(imgs)), "exists")


def test_outputs_never_destroy_inputs_or_devices(tmp_path: Path, random_ckpt: Path) -> None:
    """Found by trying it out: --out naming the command's own input, a device, or (eval --force) any folder."""
    img = tmp_path / "a.jpg"
    img.write_bytes(rtab_frame(1).read_bytes())
    _one_error_line(run("extract", "--checkpoint", str(random_ckpt), "--out", str(img), str(img)), "is an input")
    assert img.read_bytes() == rtab_frame(1).read_bytes()
    db = tmp_path / "db.npz"
    assert run("extract", "-q", "--checkpoint", str(random_ckpt), "--out", str(db), str(img)).returncode == 0
    before = db.read_bytes()
    _one_error_line(run("match", "--db", str(db), "--queries", str(db), "--out", str(db)), "is an input")
    assert db.read_bytes() == before
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    _one_error_line(run("match", "--db", str(db), "--queries", str(db), "--out", str(fifo)), "not a regular file")
    assert fifo.is_fifo()
    # eval --force replaces earlier runs only: not a folder of other things, not the folder holding the bag
    victim = tmp_path / "notes"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    bag = tmp_path / "bags" / "b"
    assert run("bag", "make", str(tmp_path / "imgs_missing"), "--out", str(bag)).returncode == 1
    gt = tmp_path / "gt.npy"
    np.save(gt, np.tril(np.ones((3, 3)), -1))
    _one_error_line(run("eval", str(bag), "--gt", str(gt), "--out", str(victim), "--force"), "not a run folder")
    assert (victim / "notes.txt").read_text() == "precious"
    _one_error_line(run("eval", str(gt), "--gt", str(gt), "--out", str(tmp_path), "--force"), "holds the input")


def test_bag_make_checks_what_it_copies(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "1.jpg").write_bytes(rtab_frame(1).read_bytes())
    (imgs / "2.jpg").write_bytes(rtab_frame(2).read_bytes()[:3000])  # truncated: copied as is before
    _one_error_line(run("bag", "make", str(imgs), "--out", str(tmp_path / "b"), "--compressed"), "2.jpg")
    assert not (tmp_path / "b").exists()
    (imgs / "2.jpg").unlink()
    for topic in ("", "a b", "/1bad"):
        _one_error_line(
            run("bag", "make", str(imgs), "--out", str(tmp_path / "c"), "--topic", topic), "is not a ROS topic name"
        )
    assert run("bag", "make", str(imgs), "--out", str(tmp_path / "d"), "--topic", "/cam_0/image_raw").returncode == 0


def test_eval_run_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """The run-folder transaction (library: pnv_ros.eval.run_folder): a failed write leaves the earlier run
    and no temp folder; only earlier runs are replaced, and only with --force."""
    from pnv_ros.errors import OutputError
    from pnv_ros.eval.run_folder import check_run_folder, write_run_folder

    out = tmp_path / "run"
    check_run_folder(out, force=False)

    def write(folder: Path, text: str) -> int:
        (folder / "metrics.json").write_text(text)
        return len(text)

    assert write_run_folder(out, lambda f: write(f, "{}")) == 2
    with pytest.raises(OutputError, match="pass --force"):
        check_run_folder(out, force=False)
    check_run_folder(out, force=True)

    def fail(folder: Path) -> None:
        write(folder, "partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_run_folder(out, fail)
    assert (out / "metrics.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert write_run_folder(out, lambda f: write(f, "{ }")) == 3 and (out / "metrics.json").read_text() == "{ }"
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    with pytest.raises(OutputError, match="not a run folder"):
        check_run_folder(other, force=True)


def test_an_abbreviation_of_one_setting_under_two_names_is_that_setting() -> None:
    """--min-trav matches --min-travel-m and its older name --min-travel: one setting, not ambiguous (it
    worked before the older names were kept); a prefix of two settings stays an error."""
    from pnv_ros.cli import build_parser

    p = build_parser()
    base = ["eval", "run.bag", "--gt", "gt.txt", "--out", "run"]
    args = p.parse_args([*base, "--min-trav", "1.5", "--min-int", "2"])
    assert (args.min_travel_m, args.min_interval_s) == (1.5, 2.0)
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--min-t", "1"])  # --min-travel-m or --min-texture


# -- match-two's relative pose ----------------------------------------------------------------------------------
TUM = RTAB.parent.parent / "tum_fr1_desk_pairs"
#: a revisit of pairs.txt (camera centres within 0.5 m and 20 deg) whose patch score passes min_score
TUM_QUERY, TUM_MATCH = "1305031468.727785", "1305031454.459913"


def _tum_depth(rgb_stamp: str) -> str:
    """associations.txt's depth PNG of a colour frame."""
    for line in (TUM / "associations.txt").read_text().splitlines():
        f = line.split()
        if f and f[0] == rgb_stamp:
            return str(TUM / f[3])
    raise AssertionError(rgb_stamp)


@pytest.mark.slow
def test_match_two_json_pose_with_and_without_depth() -> None:
    """fr1/desk's camera (raw images: K and D) and its registered depth (5000 units a metre): METRIC with depth,
    a monocular type without; one JSON object on stdout; parent = IMAGE_A (the query)."""
    a, b = (str(TUM / "rgb" / f"{s}.jpg") for s in (TUM_QUERY, TUM_MATCH))
    cam = ["--camera", str(TUM / "camera.yaml")]
    depth = ["--depth", _tum_depth(TUM_QUERY), _tum_depth(TUM_MATCH), "--depth-scale", "5000"]
    r = run("match-two", "-q", a, b, *cam, *depth, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rp = out["relative_pose"]
    assert out["score"] >= 0.12 and rp["type"] == "METRIC", out
    t = np.array(rp["translation"])
    assert 0 < np.linalg.norm(t) < 1.0 and "direction" not in rp  # a revisit: centres within 0.5 m
    assert np.linalg.norm(rp["rotation_xyzw"]) == pytest.approx(1.0)
    assert np.shape(rp["rotation_covariance"]) == np.shape(rp["translation_covariance"]) == (3, 3)
    c = np.reshape(rp["covariance"], (6, 6))
    assert np.allclose(c[:3, :3], rp["rotation_covariance"]) and np.allclose(c[3:, 3:], rp["translation_covariance"])
    assert rp["inliers"] >= 20
    r = run("match-two", "-q", a, b, *cam, "--json")
    assert r.returncode == 0, r.stderr
    mono = json.loads(r.stdout)["relative_pose"]
    assert mono["type"] in ("ROTATION_AND_DIRECTION", "ROTATION_ONLY") and "translation" not in mono, mono
    assert len(mono["covariance"]) == (25 if mono["type"] == "ROTATION_AND_DIRECTION" else 9)
    if mono["type"] == "ROTATION_AND_DIRECTION":
        assert np.linalg.norm(mono["direction"]) == pytest.approx(1.0)
    r = run("match-two", "-q", a, b, *cam, *depth)  # for a person: the pose too
    assert r.returncode == 0 and "relative pose (parent = IMAGE_A, child = IMAGE_B): METRIC" in r.stdout, r.stdout


def _tum_pose(parent: str, child: str) -> np.ndarray:
    """(4, 4) ground truth of the child camera in the parent camera (groundtruth_at_rgb.txt: optical centres in
    the world, tx ty tz qx qy qz qw): X_parent = R X_child + t."""
    from scipy.spatial.transform import Rotation

    gt = {}
    for line in (TUM / "groundtruth_at_rgb.txt").read_text().splitlines():
        f = line.split()
        if f and not f[0].startswith("#"):
            m = np.eye(4)
            m[:3, :3], m[:3, 3] = Rotation.from_quat([float(v) for v in f[4:8]]).as_matrix(), [float(v) for v in f[1:4]]
            gt[f[0]] = m
    return np.linalg.inv(gt[parent]) @ gt[child]


@pytest.mark.slow
def test_match_two_min_score_gives_the_pose_of_a_low_scoring_revisit() -> None:
    """pairs.txt's first revisit scores below min_score with the default model: NONE with the reason by default;
    --min-score 0 gives its METRIC pose, which agrees with the ground truth within its covariance (chi-square,
    6 DoF, 0.999: 22.46)."""
    from scipy.spatial.transform import Rotation

    q, m = next(f[:2] for f in map(str.split, (TUM / "pairs.txt").read_text().splitlines()) if f[-1:] == ["revisit"])
    args = [str(TUM / "rgb" / f"{s}.jpg") for s in (q, m)] + ["--camera", str(TUM / "camera.yaml"), "--json"]
    args += ["--depth", _tum_depth(q), _tum_depth(m), "--depth-scale", "5000"]
    r = run("match-two", "-q", *args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["score"] < 0.12 and out["relative_pose"]["type"] == "NONE", out
    assert "below min_score 0.12" in out["relative_pose"]["reason"]
    r = run("match-two", "-q", *args, "--min-score", "0")
    assert r.returncode == 0, r.stderr
    rp = json.loads(r.stdout)["relative_pose"]
    assert rp["type"] == "METRIC", rp
    want = _tum_pose(q, m)
    w = Rotation.from_matrix(want[:3, :3] @ Rotation.from_quat(rp["rotation_xyzw"]).as_matrix().T).as_rotvec()
    e = np.concatenate([w, want[:3, 3] - np.array(rp["translation"])])
    assert e @ np.linalg.solve(np.reshape(rp["covariance"], (6, 6)), e) < 22.46, e
    assert run("match-two", "-q", *args, "--min-score", "1.5").returncode == 2  # out of range: argparse


def test_match_two_bad_camera_or_depth_is_one_error_line(tmp_path: Path) -> None:
    """A missing, corrupt or mis-sized depth image, a camera YAML that is none, --depth without --camera: one
    ``error:`` line, exit 1 (before any model loads: no checkpoint is needed to say so)."""
    a, b = (str(TUM / "rgb" / f"{s}.jpg") for s in (TUM_QUERY, TUM_MATCH))
    cam = str(TUM / "camera.yaml")
    da, db = _tum_depth(TUM_QUERY), _tum_depth(TUM_MATCH)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Path(da).read_bytes()[:200])
    notyaml = tmp_path / "camera.yaml"
    notyaml.write_text("camera_matrix: {data: [1, 2]}\n")
    missing = str(tmp_path / "missing.png")
    nope = ["--checkpoint", str(tmp_path / "no_model.pth")]
    for args, msg in (
        (["--camera", cam, "--depth", missing, db], "no such depth image"),
        (["--camera", cam, "--depth", str(corrupt), db], "cannot read it as an image"),
        (["--camera", cam, "--depth", a, db], "one channel of 16-bit"),  # a colour JPEG as depth
        (["--camera", str(notyaml)], "not a camera_info YAML"),
        (["--camera", str(tmp_path / "none.yaml")], "not a camera_info YAML"),
        (["--depth", da, db], "--depth needs --camera"),
    ):
        _one_error_line(run("match-two", *nope, a, b, *args, "--json"), msg)
