"""The project's files on disk: one container for feature files and maps.

Both are uncompressed ``.npz`` archives (readable by ``numpy.load`` with
``allow_pickle=False``) holding a JSON ``meta`` entry and plain arrays; never
pickled. Writes stream array blocks into a temp file beside the target, fsync
it and rename it over the target, so a crash (or ``kill -9``) at any moment
leaves either the old file or the new one, and a large map is never stacked
in RAM to be saved. Reads can memory-map the large arrays in place (members
are stored, not deflated), so a loaded map costs page cache, not RAM.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pnv_ros.errors import OutputError, PnvError

#: Arrays smaller than this are read into RAM even when memory-mapping is
#: asked for: each memory map holds a file descriptor.
MMAP_MIN_BYTES = 1 << 20


class NpzWriter:
    """Atomic, streaming writer of an uncompressed ``.npz``; a context manager.

    ``with NpzWriter(path) as w: w.add("a", arr); w.add_blocks("p", shape, dtype, blocks)``.
    Nothing appears at ``path`` unless the block exits without an exception;
    the temp file is removed on any error (``OSError`` from a full disk included).
    """

    def __init__(self, path: str | Path, sync: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a folder: give a file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # as a plain open() would make it (mkstemp's 0600 would hide maps from other users)
        self._file = os.fdopen(fd, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def __enter__(self) -> NpzWriter:
        return self

    def add(self, name: str, array: Any) -> None:
        """One whole array (small ones: metadata, stamps, global descriptors)."""
        a = np.asarray(array)
        if a.dtype.hasobject:
            raise TypeError(f"array {name!r} holds Python objects; only plain arrays are written")
        self.add_blocks(name, a.shape, a.dtype, [a])

    def add_blocks(self, name: str, shape: tuple[int, ...], dtype: Any, blocks: Iterable[np.ndarray]) -> None:
        """An array of ``shape`` written from ``blocks`` (its rows in order, any split), converted to ``dtype``."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        written = 0
        with self._zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for b in blocks:
                b = np.ascontiguousarray(b, dtype=dtype)
                f.write(memoryview(b.reshape(-1)).cast("B") if b.size else b"")
                written += b.nbytes
        if written != want:
            raise ValueError(f"array {name!r}: {written} bytes written for shape {tuple(shape)} ({want} bytes)")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            try:
                self._zip.close()
                if exc_type is None:
                    self._file.flush()
                    if self.sync:
                        os.fsync(self._file.fileno())
                self._file.close()
                if exc_type is None:
                    os.replace(self._tmp, self.path)
                    if self.sync:
                        _fsync_dir(self.path.parent)
            except OSError as e:
                if exc is None:
                    raise _write_error(self.path, e) from e
        finally:
            Path(self._tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, PnvError):  # a write inside the block failed
            raise _write_error(self.path, exc) from exc


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second (``2026-12-02T15:42:36+00:00``): model files' "built"."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_error(path: Path, e: OSError) -> OutputError:
    """'cannot write out/db.npz: No space left on device' (nothing was left behind)."""
    return OutputError(f"cannot write {path}: {e.strerror or e}; nothing was written")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some file systems refuse
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def check_output(
    path: str | Path, *, folder: bool = False, what: str = "output", inputs: Iterable[str | Path] = ()
) -> Path:
    """Check, before any work, that ``path`` can be written; return it.

    A file output must not be an existing folder, a folder output not an existing file; the nearest
    existing parent must be a folder this process may write (and, where it does not exist yet, the
    missing folders are made now). A probe file is created and removed beside the target, which also
    catches read-only file systems. An existing target that is not a regular file (a device such as
    ``/dev/null``, a pipe: the atomic rename would replace it) is refused, and so is a target that is
    one of the command's ``inputs`` or, for a folder, holds one. Raises :class:`OutputError` saying
    what is wrong. A full disk can still strike later: every writer here writes atomically and leaves
    no temp file.
    """
    p = Path(path)
    if not str(path).strip():
        raise OutputError(f"{what}: empty path")
    if not folder and p.is_dir():
        raise OutputError(f"{what} {p} is a folder: give a file name")
    if folder and p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p} is a file: give a folder name")
    if not folder and p.exists() and not p.is_file():
        raise OutputError(f"{what} {p} is not a regular file (a device or a pipe): give a file name")
    for given in inputs:
        q = Path(given)
        if not q.exists():
            continue
        if p.exists() and os.path.samefile(p, q):
            raise OutputError(f"{what} {p} is an input of this command: writing it would destroy the input")
        if folder and p.exists() and Path(os.path.realpath(q)).is_relative_to(os.path.realpath(p)):
            raise OutputError(f"{what} {p} holds the input {q}: replacing it would destroy the input")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what} {p}: {_first_file(parent)} is a file, not a folder") from None
    except OSError as e:
        raise OutputError(f"{what} {p}: cannot make folder {parent}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {p}: cannot write in {parent}: {e.strerror or e}") from None
    return p


def _first_file(folder: Path) -> Path:
    """The first existing non-folder on the way to ``folder`` (why mkdir failed)."""
    for q in reversed([folder, *folder.parents]):
        if q.exists() and not q.is_dir():
            return q
    return folder


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", sync: bool = True) -> Iterator[Any]:
    """``with atomic_file(p, "w") as f: f.write(...)``: ``f`` is a temp file beside ``p``, renamed over
    ``p`` (mode 0644) only when the block ends without an exception; removed otherwise, so a full disk
    or an error leaves the old file (or none) and no ``.tmp``. A failed write (full disk, file size
    limit) raises :class:`OutputError` naming ``path``."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p} is a folder: give a file name")
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(p, e) from e
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, mode) as f:
            try:
                yield f
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            except OSError as e:
                if isinstance(e, PnvError):
                    raise
                raise _write_error(p, e) from e
        os.replace(tmp, p)
    except OSError as e:
        if isinstance(e, PnvError):
            raise
        raise _write_error(p, e) from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def to_json(obj: Any, indent: int | None = 1) -> str:
    """Strict JSON (RFC 8259) of results: NaN and infinities, which ``json.dumps`` would write as the
    invalid tokens ``NaN`` / ``Infinity``, become ``null`` (an undefined recall, a latency never
    measured); numpy scalars and arrays become numbers and lists."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.ndarray):
            return clean(v.tolist())
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not np.isfinite(v):
            return None
        return v

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "w") as f:
        f.write(text)


def write_npz_atomic(path: Path, arrays: dict[str, Any], sync: bool = False) -> None:
    """Write whole arrays to ``path`` atomically (see :class:`NpzWriter`)."""
    with NpzWriter(path, sync=sync) as w:
        for name, a in arrays.items():
            w.add(name, a)


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes


def _member(f: Any, path: Path, info: zipfile.ZipInfo, mmap_it: bool, min_bytes: int) -> np.ndarray:
    """One stored ``.npy`` member, memory-mapped in place or read into RAM."""
    f.seek(info.header_offset)
    sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if sig != b"PK\x03\x04":
        raise ValueError(f"entry {info.filename!r} has a bad local header")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    f.seek(start)
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise ValueError(f"entry {info.filename!r} has .npy version {version}")
    shape, fortran, dtype = read_header[version](f, max_header_size=100_000)
    if dtype.hasobject:
        raise ValueError(f"entry {info.filename!r} holds Python objects (pickled data is never read)")
    offset = f.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset - start + nbytes != info.file_size:
        raise ValueError(f"entry {info.filename!r} is truncated or padded ({info.file_size} bytes for shape {shape})")
    order = "F" if fortran else "C"
    if nbytes == 0:
        return np.empty(shape, dtype, order=order)
    if mmap_it and nbytes >= min_bytes:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    buf = np.empty(shape, dtype, order=order)
    view = memoryview(buf.reshape(-1, order="A")).cast("B")
    if f.readinto(view) != nbytes:
        raise ValueError(f"entry {info.filename!r} ends early")
    return buf


def read_npz(
    path: Path, error: type[PnvError], what: str, mmap_keys: Iterable[str] = (), mmap_min_bytes: int = MMAP_MIN_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All arrays of an ``.npz`` and its JSON ``meta`` entry; never unpickles.

    mmap_keys: arrays to memory-map read-only (when stored uncompressed and
    at least ``mmap_min_bytes``); the rest are read into RAM.
    Raises ``error`` naming ``what`` and the file when it is missing,
    unreadable, truncated, holds objects, or lacks a valid ``meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    mmap_keys = set(mmap_keys)
    data: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            for info in z.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.compress_type != zipfile.ZIP_STORED:  # e.g. np.savez_compressed: read whole
                    with z.open(info) as m:
                        data[name] = np.lib.format.read_array(m, allow_pickle=False)
                else:
                    data[name] = _member(f, path, info, name in mmap_keys, mmap_min_bytes)
        meta = json.loads(str(data["meta"]))
    except KeyError:
        raise error(f"{what} {path} lacks its 'meta' entry: not a pnv_ros file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, struct.error) as e:
        raise error(f"{what} {path} is corrupt or cannot be read: {e}") from None
    if not isinstance(meta, dict):
        raise error(f"{what} {path} has a bad 'meta' entry")
    return data, meta
