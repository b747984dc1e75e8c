"""The run folder of an evaluation (``pnv eval``): checked before the work, written as one transaction.

A run folder holds metrics.json, loop_closures.csv, plots, report.md and example pictures
(:func:`pnv_ros.eval.report.write_run`). It appears complete or not at all: the files are written into
a temp folder beside it, which is renamed into place, so nothing partial ever looks like a finished
run. No torch and no ROS here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from pnv_ros.errors import OutputError
from pnv_ros.storage import check_output

T = TypeVar("T")


def check_run_folder(out: Path, *, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, a run folder that cannot or must not be written.

    An existing ``out`` needs ``force``, and then only an earlier run folder (one with metrics.json) is
    replaced, never another folder. ``inputs``: the run's input files (the folder must not be or hold
    one). Raises :class:`OutputError` saying what to change.
    """
    if out.exists() and not force:
        raise OutputError(f"{out} exists: choose a new run folder or pass --force")
    check_output(out, folder=True, what="--out", inputs=inputs)
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise OutputError(
            f"{out} is not a run folder of pnv eval (no metrics.json): --force replaces only earlier runs"
        )


def write_run_folder(out: Path, write: Callable[[Path], T]) -> T:
    """Call ``write(folder)`` on a fresh temp folder beside ``out``, then move it into place; return its result.

    An earlier run folder at ``out`` is replaced only once the new one is complete; on any error (or an
    interrupt) the temp folder is removed and ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)  # as mkdir would make it (mkdtemp's 0700 would hide the run from other users)
    try:
        result = write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing partial looks like a finished run
        raise
    return result


def node_model_id(checkpoint: Path, engine: str, precision: str | None) -> str:
    """The model identity a node's features carry when it runs ``checkpoint`` on ``engine`` at ``precision``.

    The checkpoint's identity (``name:dim:sha``), tagged ``+{engine}-int8`` where the engine changes the
    descriptors (:func:`pnv_ros.engines.variant`); ``precision`` None or '' is fp32. Reads the
    checkpoint's metadata (torch is imported).
    """
    from pnv_ros.engines import variant
    from pnv_ros.model.checkpoint import checkpoint_info

    tag = variant(engine, precision or "fp32")
    return checkpoint_info(checkpoint).identity + (f"+{tag}" if tag else "")
