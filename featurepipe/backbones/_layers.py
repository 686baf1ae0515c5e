"""Layer lists: ``"blocks.4,blocks.5,penultimate"`` -> ``("blocks.4", "blocks.5", None)``.

No torch here: the CLI and ``featurepipe fit`` parse layer lists before any network is built.
"""

from __future__ import annotations

from collections.abc import Sequence

from featurepipe.exceptions import ConfigError

__all__ = ["PENULTIMATE", "layer_label", "parse_layers"]

#: How a layer list spells the pooled penultimate (pre-logits) features, i.e. ``layer=None``.
PENULTIMATE = "penultimate"


def parse_layers(layers: str | Sequence[str | None]) -> tuple[str | None, ...]:
    """Read a layer list: comma-separated text or a sequence of names.

    Parameters
    ----------
    layers : str or sequence of (str or None)
        ``"blocks.4,blocks.5,penultimate"``, or ``["blocks.4", None]``. ``"penultimate"`` and
        None both name the pooled penultimate layer (the default of ``layer=``).

    Returns
    -------
    tuple of (str or None)
        One entry per layer, in the order given.

    Raises
    ------
    ConfigError
        An empty list, an empty name, or a layer named twice (it would be one store entry).

    Examples
    --------
    >>> parse_layers("blocks.4, blocks.5,penultimate")
    ('blocks.4', 'blocks.5', None)
    """
    items = layers.split(",") if isinstance(layers, str) else list(layers)
    parsed: list[str | None] = []
    for item in items:
        if item is not None and not isinstance(item, str):
            raise ConfigError(f"layer names must be strings or None; got {item!r}")
        name = None if item is None else item.strip()
        if name == "":
            raise ConfigError(f"empty layer name in {layers!r}; give names separated by commas, "
                              f"e.g. blocks.4,{PENULTIMATE}")
        parsed.append(None if name == PENULTIMATE else name)
    if not parsed:
        raise ConfigError(f"no layers given in {layers!r}; e.g. blocks.4,{PENULTIMATE}")
    twice = sorted({layer_label(p) for p in parsed if parsed.count(p) > 1})
    if twice:
        raise ConfigError(f"layer(s) named more than once in {layers!r}: {', '.join(twice)}")
    return tuple(parsed)


def layer_label(layer: str | None) -> str:
    """How a layer is shown: its module name, or ``"penultimate"`` for None."""
    return PENULTIMATE if layer is None else layer
