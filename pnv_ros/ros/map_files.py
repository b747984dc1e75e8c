"""The node's map files in ``map_dir``: names, saves and loads, left-overs, and the map it will not replace.

No rclpy: the node gives its detector and its logger.

- Names: a map name is a file name inside ``map_dir`` (``.npz`` added; paths refused:
  :func:`pnv_ros.ros.params.map_file_name`).
- Saves and loads answer (ok, message, keyframes); a failure leaves the detector's map as it was.
- Left-overs: temp files of saves a crash cut short, and patch spill folders of map stores whose process is
  gone (:func:`pnv_ros.place_map.remove_stale_spills`), are removed at start.
- The unloadable-map protection: when ``load_map`` names a file that exists but fails to load at start
  (another model, a damaged file), the node runs on an empty map and that file is kept as it is: the shutdown
  save goes beside it (``<name>_unsaved_<UTC time>.npz``) until a load or an explicit save of that name
  makes it this run's map again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Protocol

from pnv_ros.errors import PnvError
from pnv_ros.ros.params import map_file_name

#: Temp files of unfinished saves older than this (s) are left-overs of a crash, not a save in progress.
STALE_TEMP_S = 600.0


class Log(Protocol):
    """What is logged to: rclpy's node logger, or a :class:`logging.Logger`."""

    def info(self, message: str) -> object: ...
    def warning(self, message: str) -> object: ...
    def error(self, message: str) -> object: ...


class MapOwner(Protocol):
    """The part of :class:`pnv_ros.detector.LoopClosureDetector` that maps are saved from and loaded into."""

    @property
    def map(self) -> Sized: ...  # len(): the keyframe count

    def save_map(self, path: str | Path) -> int: ...
    def load_map(self, path: str | Path) -> int: ...


class MapFiles:
    """The maps of one node: ``map_dir`` and the detector they are saved from and loaded into.

    on_load: called after each map loaded (the node clears its loop markers).
    """

    def __init__(self, map_dir: str | Path, owner: MapOwner, log: Log, on_load: Callable[[], object] | None = None):
        self.map_dir = Path(map_dir)
        self.owner, self.log, self._on_load = owner, log, on_load
        #: a map file of map_dir that failed to load at start: kept as it is (file name, or None)
        self.unloadable: str | None = None

    def path(self, name: str) -> Path:
        """The file of a map name. Raises ConfigError for a bad name."""
        return self.map_dir / map_file_name(name)

    def exists(self, name: str) -> bool:
        try:
            return self.path(name).is_file()
        except (PnvError, OSError):
            return False

    def _keyframes(self) -> int:
        return len(self.owner.map)

    # -- at start -------------------------------------------------------------------------------
    def check_writable(self) -> bool:
        """Say at start, not at the first save, when map_dir cannot take maps."""
        try:
            self.map_dir.mkdir(parents=True, exist_ok=True)
            ok = os.access(self.map_dir, os.W_OK)
        except OSError:
            ok = False
        if not ok:
            self.log.warning(f"map_dir {self.map_dir} cannot be written: save_map will fail until it can")
        return ok

    def remove_left_overs(self, older_than_s: float = STALE_TEMP_S, temp_dir: str | Path | None = None) -> None:
        """Remove temp files of saves that a crash (kill -9, power loss) cut short (never a map, only disk) and
        the patch spill folders (in ``temp_dir``, default the system's) of map stores whose process is gone."""
        from pnv_ros.place_map import remove_stale_spills

        for tmp in self.map_dir.glob(".*.npz.*.tmp") if self.map_dir.is_dir() else []:
            try:
                if time.time() - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    self.log.info(f"removed {tmp.name}, left by a save that did not finish")
            except OSError:
                pass
        for d in remove_stale_spills(temp_dir):
            self.log.info(f"removed {d}, the patch spill of a map store whose process is gone")

    def load_at_start(self, name: str) -> bool:
        """Load the map ``name`` (logged); when its file exists but does not load, run empty and protect it."""
        ok, msg, _ = self.load(name)
        (self.log.info if ok else self.log.error)(msg)
        if not ok:
            self.protect(name)
        return ok

    def protect(self, name: str) -> None:
        """After a failed load at start: keep the file of ``name``, when there is one, as it is."""
        if self.exists(name):
            self.unloadable = map_file_name(name)
            self.log.error(
                f"the map runs empty; {self.unloadable} is kept as it is: save_map_on_shutdown "
                "will not replace it (it saves beside it)"
            )

    # -- saves and loads ------------------------------------------------------------------------
    def save(self, name: str) -> tuple[bool, str, int]:
        """Save the detector's map as ``name``: (ok, message, keyframes)."""
        try:
            path = self.path(name)
            n = self.owner.save_map(path)
            if self.unloadable == path.name:  # replaced on purpose (save_map): that file is this run's map now
                self.unloadable = None
            return True, f"saved {n} keyframes to {path}", n
        except (PnvError, OSError) as e:
            return False, f"save failed: {e}", self._keyframes()

    def load(self, name: str) -> tuple[bool, str, int]:
        """Load the map ``name`` into the detector: (ok, message, keyframes); the map stays on failure."""
        try:
            path = self.path(name)
            n = self.owner.load_map(path)
            if self.unloadable == path.name:  # loaded after all (the file or the model fixed): saves go to it again
                self.unloadable = None
            if self._on_load is not None:
                self._on_load()
            return True, f"loaded {n} keyframes from {path}", n
        except PnvError as e:
            return False, str(e), self._keyframes()

    def shutdown_name(self, name: str, now: float | None = None) -> str:
        """The name the shutdown save goes to: ``name``, or beside it when it is the protected file."""
        if name and self.unloadable is not None and map_file_name(name) == self.unloadable:
            # The file holds a map this run could not load (another model, a damaged file): replacing it with
            # this run's map would lose it. The run's map goes beside it.
            # map names are at most 100 characters (params.map_file_name): room for the 25 added
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
            name = f"{name.removesuffix('.npz')[:75]}_unsaved_{stamp}"
            self.log.error(
                f"not replacing {self.unloadable}, which failed to load at start; this run's map is "
                f"saved as {map_file_name(name)} instead"
            )
        return name

    def save_on_shutdown(self, name: str) -> None:
        """The shutdown save of ``name`` ('' = none), logged, beside the protected file when it is that one."""
        name = self.shutdown_name(name)
        if name:
            ok, msg, _ = self.save(name)
            (self.log.info if ok else self.log.error)(msg)
