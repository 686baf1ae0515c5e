"""Embedding engines beyond the local one in :mod:`featurepipe.embed`.

Every engine plans, keys and commits the store through :func:`featurepipe.embedding.run_embed`, so a
store made by one engine is re-used by any other. Engines with optional dependencies import them
only when called: importing this package works without Ray installed, and :func:`embed_ray`
then raises :class:`~featurepipe.exceptions.MissingDependencyError` naming the install command.
"""

from __future__ import annotations

from featurepipe.engines.ray import embed_ray

#: Engine names the CLI accepts (``featurepipe embed --engine``).
ENGINES: tuple[str, ...] = ("local", "ray")

__all__ = ["ENGINES", "embed_ray"]
