"""docs/parameters.md is generated from the parameter tables; it must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "parameters.md"


def test_parameters_doc_is_current() -> None:
    """Kind: a parameter (its default, range or help) changed and the reference did not."""
    from pnv_ros.ros.params import TABLE, markdown

    want = markdown()
    assert DOC.read_text() == want, (
        "docs/parameters.md is not current: run `python -m pnv_ros.ros.params --markdown > docs/parameters.md`"
    )
    for p in TABLE:  # every parameter is in it, by name
        assert f"| `{p.name}` |" in want, p.name


def test_markdown_entry_point_prints_the_doc() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pnv_ros.ros.params", "--markdown"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == DOC.read_text()
