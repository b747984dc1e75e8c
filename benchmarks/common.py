"""What every benchmark shares: where results go, the machine it ran on, the run header, writing pages.

Benchmarks run as scripts (``.venv/bin/python benchmarks/NAME.py``): their own folder is then first on
``sys.path``, so ``import common`` and a sibling's ``import eval_default_model`` work without path changes, and
``pnv_ros`` comes from the environment (the venv has it installed). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pnv_ros.storage import utc_now, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
#: where generated benchmark pages, numbers and plots go (``--docs`` / ``--md`` / ``--out`` defaults)
RESULTS = REPO / "docs" / "results"
#: the repository's image sets
DATA = REPO / "data"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def machine() -> dict[str, Any]:
    """The machine a run measured: CPU, cores, torch threads (when torch is loaded), Python, torch, numpy and
    faiss versions, the platform and the load average at the start (1, 5, 15 min)."""
    torch = sys.modules.get("torch")
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "faiss": _version("faiss-cpu"),
        "platform": platform.platform(),
        "load_avg_start": list(os.getloadavg()),
    }


def machine_line(m: dict[str, Any] | None = None) -> str:
    """One line for a page: ``CPU, N cores (T torch threads), Python x, torch y``."""
    m = m or machine()
    threads = m.get("torch_threads", m.get("threads"))
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
        + (f" ({threads} torch threads)" if threads else "")
        + f", Python {m.get('python', '?')}, torch {m.get('torch', '?')}"
    )


def command(prefix: str = "") -> str:
    """This run's command line as a reader reruns it from the repository root: ``.venv/bin/python
    benchmarks/NAME.py ARGS`` (``prefix``: environment settings in front, e.g. ``OMP_WAIT_POLICY=PASSIVE``)."""
    line = ".venv/bin/python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    return f"{prefix} {line}" if prefix else line


def header(*, prefix: str = "", **extra: Any) -> dict[str, Any]:
    """A run's record before its results: the command line (:func:`command`), the date (UTC), the machine,
    then ``extra``."""
    return {"command": command(prefix), "date": utc_now(), "machine": machine(), **extra}


def write_md(path: str | Path, lines: Iterable[str]) -> Path:
    """Write a generated page (its lines, newline-terminated) atomically, creating its folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines).rstrip("\n") + "\n")
    return path


def _finite(x: Any) -> Any:
    """The record with every NaN or infinite float as None (null): JSON (RFC 8259) has no NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str | Path, record: Any) -> Path:
    """Write a run's numbers as indented JSON atomically, creating its folder (NaN and inf as null: strict JSON
    that any reader takes). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(_finite(record), indent=1, allow_nan=False) + "\n")
    return path


__all__ = [
    "DATA",
    "REPO",
    "RESULTS",
    "command",
    "cpu_name",
    "header",
    "machine",
    "machine_line",
    "write_json",
    "write_md",
]
