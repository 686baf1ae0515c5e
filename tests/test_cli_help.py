"""The CLI's help is complete, and its output ends quietly when the reader goes away."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featurepipe.cli import build_parser, main
from featurepipe.cli_common import has_default

REPO = Path(__file__).resolve().parents[1]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = sorted(_subparsers())


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    sub = _subparsers()[name]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{label} has no help text"
        if has_default(action):
            shown = formatter._expand_help(action)
            assert "default" in shown.lower(), f"{label}: help does not show its default"
            assert (str(action.default) in shown or "(default:" in shown
                    or "default" in action.help), label


@pytest.mark.parametrize("name", ["embed", "inspect", "models", "demo", "compare", "finetune",
                                  "export", "layers"])
def test_quiet_and_json_on_every_command(name: str) -> None:
    flags = {s for a in _subparsers()[name]._actions for s in a.option_strings}
    assert {"--quiet", "--json"} <= flags


def _closed_pipe_run(args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with stdout on a pipe whose reader is already gone (`... | head` after exit)."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-m", "featurepipe.cli", *args], stdout=write_fd,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    finally:
        os.close(write_fd)


def test_broken_pipe_ends_quietly(tmp_path: Path) -> None:
    done = _closed_pipe_run(["models", "--json"])
    assert done.returncode in (0, 141), done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    assert done.stderr == ""


def test_broken_pipe_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    out = os.fdopen(write_fd, "w")
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["models", "--json"]) == 141
    finally:
        monkeypatch.undo()
        out.close()
