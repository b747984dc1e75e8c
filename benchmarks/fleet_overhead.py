"""What a fleet costs a keyframe, and that without one nothing changed: the detector per keyframe on the RTAB-Map
loop, side by side in one run.

The loop's 84 frames are extracted once (default model, speed preset, ``pnv extract`` into ``--out``); then, on
those features (no extraction in the timings), :meth:`LoopClosureDetector.process` per keyframe, the median of
``timings['commit']`` (retrieval, re-ranking, acceptance, map add):

- **base**: the code of ``--base`` (default: the commit before the fleet joined the detector), run from a
  temporary ``git worktree`` in a subprocess;
- **now, no fleet**: this checkout without ``fleet_dsn`` (the claim: the same as base);
- **now, in a fleet**: robot A drives the first lap into a local PostgreSQL + pgvector (``LocalServer``, Unix
  socket), robot B the second; B's commit, of which ``fleet`` = the wait for the fleet's candidates (search +
  fetch of ``fleet_top_n``, 10), and the loops B found to A.

Each variant runs ``--repeats`` times (alternating), the median of the per-run medians is reported with the ratio
to base. Writes ``docs/results/fleet_overhead.md``.

    .venv/bin/python benchmarks/fleet_overhead.py --out out/fleet_overhead
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import DATA, REPO, RESULTS, machine_line
from common import write_md as write_page

#: The commit before the fleet joined the detector (issue 30's node integration).
BASE = "febb712"
RTAB_IMAGES = DATA / "rtabmap_samples_loop84" / "images"

#: Runs in a subprocess with the code under test first on sys.path: the detector on the loop's features,
#: optionally as robot B in a fleet (argv: features file, DSN or '', which lap); prints JSON timings.
RUNNER = r"""
import json, sys, time
import numpy as np
from pnv_ros.config import get_preset
from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import FeatureSet
from pnv_ros.model.checkpoint import load_checkpoint
from pnv_ros.model.registry import default_checkpoint_path

feats_path, dsn, lap = sys.argv[1], sys.argv[2], sys.argv[3]
fs = FeatureSet.load(feats_path)
order = sorted(range(len(fs)), key=lambda i: int(fs.names[i].rsplit("/", 1)[-1].split(".")[0]))  # frame 1..84
feats = [fs.item(i) for i in order]
model, info = load_checkpoint(default_checkpoint_path())
ex = FeatureExtractor(model, info, get_preset("speed"), device="cpu")

def detector(robot):
    det = LoopClosureDetector(ex, DetectorParams())
    if dsn:
        from pnv_ros.fleet.member import FleetMember, FleetSettings
        det.join_fleet(FleetMember(FleetSettings(dsn, robot), dim=ex.dim, preset=det.preset,
                                   model_id=det.model_id, patch_dtype="float16", lock=det.lock))
    return det

frames = range(84) if lap == "all" else range(40, 84)
if lap == "second":  # robot A's first lap goes into the fleet first
    a = detector("A")
    for i in range(40):
        a.process(feats[i], (i + 1) * 10**9)
    assert a.fleet.outbox.flush(120)
    a.fleet.close()
det = detector("B")
commit, fleet, loops = [], [], 0
for i in frames:
    r = det.process(feats[i], (i + 1) * 10**9)
    commit.append(r.timings["commit"])
    fleet.append(r.timings.get("fleet", 0.0))
    loops += r.loop is not None and getattr(r.loop, "match_from_fleet", False)
if getattr(det, "fleet", None) is not None:
    det.fleet.close()
print(json.dumps({"commit_ms": 1e3 * float(np.median(commit)), "fleet_ms": 1e3 * float(np.median(fleet)),
                  "fleet_p95_ms": 1e3 * float(np.percentile(fleet, 95)), "loops_to_fleet": int(loops)}))
"""


def features_file(out: Path) -> Path:
    """The loop's features, extracted once with ``pnv extract`` (speed preset, default model)."""
    path = out / "rtab_speed.npz"
    if not path.is_file():
        cmd = [sys.executable, "-m", "pnv_ros.cli", "extract", "--preset", "speed", "--out", str(path)]
        subprocess.run([*cmd, str(RTAB_IMAGES)], check=True)
    return path


def run(code: Path, feats: Path, dsn: str, lap: str) -> dict:
    """The runner in a subprocess with ``code`` first on the path; its JSON."""
    import os

    r = subprocess.run(
        [sys.executable, "-c", RUNNER, str(feats), dsn, lap],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(code)},
        check=False,
    )
    if r.returncode != 0:
        raise SystemExit(f"run in {code} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fresh_store(server, n: int) -> str:
    """A new database with an empty fleet store on the local server; its DSN."""
    import psycopg

    from pnv_ros.fleet.store import init_store

    with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "bench_{n}"')
    init_store(server.dsn(f"bench_{n}"))
    return server.dsn(f"bench_{n}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "out" / "fleet_overhead"))
    ap.add_argument("--base", default=BASE, help="the code before the fleet (a git revision)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--md", default=str(RESULTS / "fleet_overhead.md"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    feats = features_file(out)

    from pnv_ros.fleet.server import LocalServer

    tmp = Path(tempfile.mkdtemp(prefix="pnv_fleet_overhead_"))
    tmp.chmod(0o755)  # the server's user (nobody, under root) passes through
    base_code = tmp / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_code), args.base], check=True)
    server = LocalServer(tmp / "db")
    rows: dict[str, list[dict]] = {"base": [], "now": [], "fleet": []}
    try:
        server.start()
        for k in range(args.repeats):
            rows["base"].append(run(base_code, feats, "", "all"))
            rows["now"].append(run(REPO, feats, "", "all"))
            rows["fleet"].append(run(REPO, feats, fresh_store(server, k), "second"))
            print(f"repeat {k + 1}: " + ", ".join(f"{n} {r[-1]['commit_ms']:.1f} ms" for n, r in rows.items()))
    finally:
        server.stop()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_code)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: float(np.median([r["commit_ms"] for r in rs])) for n, rs in rows.items()}
    fl = rows["fleet"]
    lines = [
        "# What a fleet costs a keyframe",
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/fleet_overhead.py', *(argv or sys.argv[1:])])}`; "
        f"{machine_line()}; median of {args.repeats} runs' medians, alternating.",
        "",
        "Per keyframe on the RTAB-Map loop's features (default model, speed preset; no extraction): "
        "`LoopClosureDetector.process`'s commit (retrieval, re-ranking, acceptance, map add).",
        "",
        "| code | commit p50 (ms) | vs base |",
        "|---|---|---|",
        f"| base `{args.base}` (before the fleet), 84 keyframes | {med['base']:.1f} | 1.00 |",
        f"| now, no `fleet_dsn`, 84 keyframes | {med['now']:.1f} | {med['now'] / med['base']:.2f} |",
        f"| now, robot B in a fleet (lap 2, 44 keyframes; local PostgreSQL) | {med['fleet']:.1f} | "
        f"{med['fleet'] / med['base']:.2f} |",
        "",
        f"In the fleet: the wait for the fleet's candidates (search + fetch of 10, cached) "
        f"{np.median([r['fleet_ms'] for r in fl]):.1f} ms p50, {np.median([r['fleet_p95_ms'] for r in fl]):.1f} ms "
        f"p95; B's loops to robot A: {', '.join(str(r['loops_to_fleet']) for r in fl)} (runs). The fleet re-ranks "
        "up to 10 more candidates than the local 20 (B's commit includes them).",
    ]
    write_page(args.md, lines)
    (out / "fleet_overhead.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
