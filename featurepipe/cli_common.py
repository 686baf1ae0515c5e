"""Pieces every subcommand's parser shares: the help formatter and the output flags."""

from __future__ import annotations

import argparse

__all__ = ["DefaultsHelpFormatter", "add_output_args", "has_default"]


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
