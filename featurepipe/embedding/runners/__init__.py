"""Runners: one module per way of decoding and embedding planned batches.

Each module defines ``RUNNER``, a :class:`~featurepipe.embedding.runners.base.Runner` subclass;
:func:`featurepipe.embedding.choose.choose_runner` names the module for a run.
"""

from featurepipe.embedding.runners.base import Batch, Provenance, Runner, Work

__all__ = ["Batch", "Provenance", "Runner", "Work"]
