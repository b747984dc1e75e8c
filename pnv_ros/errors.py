"""The project's exception hierarchy.

Every error the library raises on purpose derives from :class:`PnvError`, so a
caller (the CLI, the node) can catch one type, print its message and go on.
Messages say what is wrong and, where possible, what to change.
"""

from __future__ import annotations


class PnvError(Exception):
    """Base class of every error raised on purpose by pnv_ros."""


class ConfigError(PnvError, ValueError):
    """A preset, override file or option is invalid or contradicts another."""


class ImageError(PnvError, ValueError):
    """An image cannot be read or used (corrupt, empty, wrong shape or type)."""


class CheckpointError(PnvError):
    """A checkpoint file is missing, corrupt, or not in the expected format."""


class FeaturesError(PnvError):
    """A features file is corrupt or does not fit the preset or the other file."""


class GroundTruthError(PnvError):
    """Ground truth cannot be read or does not fit the data it describes."""


class MapError(PnvError):
    """A place map file is corrupt, of another version, or does not fit."""


class OutputError(PnvError, OSError):
    """An output file or folder cannot be written (a folder where a file is wanted, no permission,
    a missing drive, a full disk)."""


class DownloadError(PnvError):
    """A model download failed (offline, bad checksum, server error)."""


class EngineError(ConfigError):
    """An inference engine or precision that cannot run here (unknown, an unsupported combination, its package
    or GPU missing), or an engine file that cannot be built or read (``pnv_ros.engines``)."""


class UnknownPlaceError(PnvError, KeyError):
    """A keyframe id or stamp that the map does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FleetError(PnvError):
    """The fleet store (:mod:`pnv_ros.fleet`) cannot be used: a bad connection string, a database without the
    schema or with another schema version, a store of another model, a local server that will not start."""


class FleetUnavailableError(FleetError):
    """The fleet database cannot be reached now (down, restarting, network gone, connection lost mid-call):
    the operation did not happen and may be retried later (the node's outbox keeps keyframes meanwhile)."""
