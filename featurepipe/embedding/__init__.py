"""The embedding engine, built as plan -> runner -> sink.

- :mod:`~featurepipe.embedding.plan` (pure): what is new, changed, deleted; shards and batches.
- :mod:`~featurepipe.embedding.pixels`: the one place a sample becomes a uint8 crop.
- :mod:`~featurepipe.embedding.forward`: a batch through the network.
- :mod:`~featurepipe.embedding.runners`: eager threads, worker processes, compiled CPU streams,
  nvjpeg and Ray, one :class:`Runner` interface; :func:`choose_runner` picks one (a table).
- :mod:`~featurepipe.embedding.sink`: finished batches into store shards.
- :mod:`~featurepipe.embedding.engine`: the driver (plan, run, sink, commit) and the in-memory
  path of the estimators.
- :mod:`~featurepipe.embedding.multi`: the driver for several layers from one pass (one entry
  per layer).

The public entry point is :func:`featurepipe.embed.embed`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> submodule. Imported on first use (PEP 562): the plan and the options import no
#: torch, so ``from featurepipe.embedding import EmbedOptions`` stays light.
_WHERE = {
    "RunnerChoice": "choose", "choose_runner": "choose", "make_runner": "choose",
    "canonical_spec": "engine", "embed_in_memory": "engine", "refuse_other_specs": "engine",
    "resolve_backbone": "engine", "run_embed": "engine", "store_attrs": "engine",
    "make_work": "engine", "run_embed_layers": "multi",
    "EmbedOptions": "options", "EmbedReport": "options",
    "Plan": "plan", "Shard": "plan", "make_plan": "plan",
    "Provenance": "runners.base", "Runner": "runners.base", "Work": "runners.base",
}

if TYPE_CHECKING:
    from featurepipe.embedding.choose import RunnerChoice, choose_runner, make_runner
    from featurepipe.embedding.engine import (
        canonical_spec,
        embed_in_memory,
        make_work,
        refuse_other_specs,
        resolve_backbone,
        run_embed,
        store_attrs,
    )
    from featurepipe.embedding.multi import run_embed_layers
    from featurepipe.embedding.options import EmbedOptions, EmbedReport
    from featurepipe.embedding.plan import Plan, Shard, make_plan
    from featurepipe.embedding.runners.base import Provenance, Runner, Work

__all__ = ["EmbedOptions", "EmbedReport", "Plan", "Provenance", "Runner", "RunnerChoice",
           "Shard", "Work", "canonical_spec", "choose_runner", "embed_in_memory", "make_plan",
           "make_runner", "make_work", "refuse_other_specs", "resolve_backbone", "run_embed",
           "run_embed_layers", "store_attrs"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"featurepipe.embedding.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
