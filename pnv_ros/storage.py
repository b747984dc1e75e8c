"""The project's files on disk: ``.npz`` written atomically, read without pickle."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pnv_ros.errors import PnvError


def write_npz_atomic(path: Path, arrays: dict[str, Any], sync: bool = False) -> None:
    """Write to a temp file beside ``path``, then rename: a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_npz(path: Path, error: type[PnvError], what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All arrays of an ``.npz`` and its JSON ``meta`` entry; never unpickles.

    Raises ``error`` naming ``what`` and the file when it is missing or unreadable.
    """
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data["meta"]))
    except KeyError:
        raise error(f"{what} {path} lacks its 'meta' entry: not a pnv_ros file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise error(f"{what} {path} is corrupt or cannot be read: {e}") from None
    if not isinstance(meta, dict):
        raise error(f"{what} {path} has a bad 'meta' entry")
    return data, meta
