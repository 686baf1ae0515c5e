"""Pieces every subcommand shares: the help formatter, the output flags, the --out check."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from featurepipe.exceptions import ConfigError

__all__ = ["DefaultsHelpFormatter", "add_output_args", "check_output", "has_default"]


def has_default(action: argparse.Action) -> bool:
    """Whether an option has a default worth showing (flags and unset options do not)."""
    default = action.default
    return (bool(action.option_strings) and default is not None and default is not False
            and default is not argparse.SUPPRESS and default != [])


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append ``(default: X)`` to an option's help unless its text already names the default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (has_default(action) and "%(default)" not in text
                and "default" not in text.lower()):
            text += " (default: %(default)s)"
        return text


def add_output_args(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--quiet`` and ``--json``, the same on every command."""
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or stage messages on stderr")
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def check_output(path: str | os.PathLike[str], flag: str = "--out", folder: bool = False) -> None:
    """Fail before any work when ``path`` cannot be written, in one line naming it and the fix.

    ``folder=False``: ``path`` is a file; ``folder=True``: a folder. Missing folders are fine
    (the commands create them); the nearest existing ancestor must be a folder that takes new
    entries. Writing
    a probe file is the only check that holds for root and for file systems like /proc, where
    permission bits say yes and creating a file fails.
    """
    target = Path(path).expanduser().absolute()
    if folder and target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    if not folder and target.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    parent = target if folder else target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".featurepipe-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {parent} "
                          f"({exc.strerror or type(exc).__name__})") from None
