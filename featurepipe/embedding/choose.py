"""Which runner embeds a run: a pure table, first matching row wins.

A new runner is one module under :mod:`featurepipe.embedding.runners` (defining ``RUNNER``)
plus one row here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["RUNNER_TABLE", "RunnerChoice", "choose_runner", "make_runner"]


@dataclass(frozen=True)
class RunnerChoice:
    """The facts a runner is chosen on (all resolved: no "auto" left)."""

    device: str  # "cpu", "cuda", "mps", ...
    workers: int | None  # decode processes asked for; None = the runner's default
    decoder: str  # "pil" or "nvjpeg"
    compile: bool  # the run compiles its network (``compiling.should_compile``)
    engine: str = "local"  # "local" or "ray"


#: (runner module, condition) rows; the module is ``featurepipe.embedding.runners.<name>``.
RUNNER_TABLE: tuple[tuple[str, Callable[[RunnerChoice], bool]], ...] = (
    ("ray", lambda c: c.engine == "ray"),
    ("nvjpeg", lambda c: c.decoder == "nvjpeg"),
    ("cpu_streams", lambda c: c.device == "cpu" and c.workers is None and c.compile),
    ("threads", lambda c: c.device == "cpu" and c.workers is None),
    ("processes", lambda c: True),
)


def choose_runner(choice: RunnerChoice) -> str:
    """The name of the runner module for ``choice`` (see :data:`RUNNER_TABLE`).

    Examples
    --------
    >>> choose_runner(RunnerChoice("cpu", None, "pil", compile=True))
    'cpu_streams'
    >>> choose_runner(RunnerChoice("cuda", None, "pil", compile=False))
    'processes'
    """
    return next(name for name, matches in RUNNER_TABLE if matches(choice))


def make_runner(name: str, *args: Any, **kwargs: Any) -> Any:
    """A new runner of the module ``name`` (its ``RUNNER`` class called with the arguments)."""
    module = importlib.import_module(f"featurepipe.embedding.runners.{name}")
    return module.RUNNER(*args, **kwargs)
