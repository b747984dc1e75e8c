"""The detector's settings as command-line options, generated from :class:`DetectorParams`' fields.

Each field ``name`` becomes ``--name-with-dashes`` (``min_score`` -> ``--min-score``, the node's
parameter of the same name) with the field's default, range, choices and help; a field's ``aliases``
metadata keeps older spellings working (``--threshold`` for ``--min-score``, ``--exclude-recent`` for
``--exclude-recent-s``, ``--min-interval``, ``--min-travel``): they set the same field, with a note on
stderr. :func:`detector_params` reads them back as one validated :class:`DetectorParams`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from pnv_ros.cli.common import Number, say
from pnv_ros.config import DetectorParams


class _Setting(argparse.Action):
    """Stores one DetectorParams value; given by an older spelling, it also says the current one."""

    def __init__(self, option_strings: Sequence[str], dest: str, aliases: Sequence[str] = (), **kw: Any) -> None:
        self.aliases = tuple(aliases)
        super().__init__(option_strings, dest, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string in self.aliases:
            say(f"{option_string} is deprecated: use {self.option_strings[0]} (the same setting)")
        setattr(namespace, self.dest, values)


def option_name(field_name: str) -> str:
    """The option of a DetectorParams field: ``min_score`` -> ``--min-score``."""
    return "--" + field_name.replace("_", "-")


def add_detector_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per DetectorParams field (all of them), in an argument group of their own."""
    group = parser.add_argument_group(
        "detector settings", "the loop-closure node's parameters of the same names (see docs/parameters.md)"
    )
    for f in fields(DetectorParams):
        meta, names = f.metadata, [option_name(f.name), *f.metadata["aliases"]]
        old = f" ({', '.join(meta['aliases'])}: the older name, deprecated)" if meta["aliases"] else ""
        if isinstance(f.default, bool):
            group.add_argument(*names, dest=f.name, action="store_true", help=f"{meta['help']}{old}")
        elif meta["choices"] is not None:
            choices = [c for c in meta["choices"] if c]  # '' (the default) is not typed on a command line
            group.add_argument(*names, dest=f.name, choices=choices, default=f.default, help=f"{meta['help']}{old}")
        else:
            group.add_argument(
                *names,
                dest=f.name,
                action=_Setting,
                aliases=meta["aliases"],
                type=Number.detector(f.name),
                metavar="N" if isinstance(f.default, int) else "X",
                default=f.default,
                help=f"{meta['help']} (default {f.default:g}){old}",
            )


def detector_params(args: argparse.Namespace) -> DetectorParams:
    """The DetectorParams that the options of :func:`add_detector_options` give (raises ConfigError)."""
    return DetectorParams(**{f.name: getattr(args, f.name) for f in fields(DetectorParams)})
