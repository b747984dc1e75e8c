"""The ``pnv`` command: parsing and printing only; the library does the work.

One module per command group, each with its options beside its handler (``register(sub)`` adds them):

=======================================  ===========================================
command                                  module
=======================================  ===========================================
extract, match                           :mod:`pnv_ros.cli.features`
match-two (score, relative pose, JSON)   :mod:`pnv_ros.cli.match_two`
bag make, bag play                       :mod:`pnv_ros.cli.bag`
eval                                     :mod:`pnv_ros.cli.evaluate` (+ :mod:`~pnv_ros.cli.detector_options`)
bench                                    :mod:`pnv_ros.cli.bench`
export                                   :mod:`pnv_ros.cli.export`
train, add-pca                           :mod:`pnv_ros.cli.training`
models list/download/build/refit/...     :mod:`pnv_ros.cli.models`
fleet init, fleet serve                  :mod:`pnv_ros.cli.fleet`
=======================================  ===========================================

:mod:`pnv_ros.cli.common` holds the shared options, number types and the one extractor assembly.
User errors print one ``error: ...`` line and exit 1, never a traceback. Heavy imports (torch) happen
inside the handlers, after the inputs are checked: ``pnv --help`` and input errors answer without them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pnv_ros import __version__
from pnv_ros.cli import bag, bench, evaluate, export, features, fleet, models, training
from pnv_ros.cli.common import Number, Parser
from pnv_ros.errors import PnvError

__all__ = ["Number", "build_parser", "main"]

#: The command groups in the order ``pnv --help`` lists them.
_GROUPS = (features, bag, evaluate, bench, export, training, models, fleet)


def build_parser() -> argparse.ArgumentParser:
    """The ``pnv`` parser with every command (each group's ``register``)."""
    p = Parser(
        prog="pnv",
        description="Patch-NetVLAD place recognition and loop closure (compatible with the authors' checkpoints).",
    )
    p.add_argument("--version", action="version", version=f"pnv_ros {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return p


def _os_message(e: OSError) -> str:
    """'No space left on device: out/db.npz' rather than '[Errno 28] ...'."""
    if not e.strerror:
        return str(e)
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    return f"{e.strerror}: {where}" if where else e.strerror


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pnv`` with ``argv`` (default: the command line); the exit status (argparse exits 2 itself)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", "x") is None and args.cmd != "match":
        args.preset = "speed"
    try:
        return int(args.func(args))
    except PnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into head and closed
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except (OSError, ValueError) as e:  # a user's file, disk or value: one line; PNV_DEBUG=1 shows the traceback
        if os.environ.get("PNV_DEBUG"):
            raise
        print(f"error: {_os_message(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try fewer images per run or a smaller preset)", file=sys.stderr)
        return 1
