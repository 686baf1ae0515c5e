"""``Backbone`` and ``load_backbone``: a network, its feature extractor and its preprocessing."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from featurepipe.backbones._build import build
from featurepipe.backbones._describe import describe
from featurepipe.backbones._extract import (
    MultiLayerPooled,
    default_extractor,
    default_feature_dim,
    layer_extractor,
)
from featurepipe.backbones._layers import layer_label
from featurepipe.backbones._spec import BackboneSpec, PreprocessSpec, resolve_spec
from featurepipe.exceptions import BackboneError, ConfigError


@dataclass(frozen=True, eq=False)
class Backbone:
    """A loaded backbone: everything the embedding engines and the fine-tuner need.

    Attributes
    ----------
    spec : BackboneSpec
        The canonical request this was built from.
    model : nn.Module
        The full classifier network (eval mode, CPU); fine-tuning trains this.
    extractor : nn.Module
        ``(B, 3, H, W) -> (B, feature_dim)``; shares ``model``'s parameters.
    preprocess : PreprocessSpec
        Evaluation preprocessing of the weights (with the ``image_size`` override applied).
    feature_dim : int
        Width of the extractor output.
    weights_sha256 : str
        sha256 of the weights file, ``"random:seed0"``, or a hub identifier when no file is
        known (e.g. ``"torchvision:ResNet50_Weights.IMAGENET1K_V2"``).
    family : str
        ``"timm"`` or ``"torchvision"``: which layouts ``reset_classifier`` and layers follow.
    class_names : tuple of str or None
        Output classes of a fine-tuned export; None for hub/offline backbones.
    layer_dims : tuple of int
        Width of each layer's block of the extractor output, in order: ``(feature_dim,)`` for
        one layer, one width per layer for :func:`load_layers`.
    """

    spec: BackboneSpec
    model: nn.Module = field(repr=False)
    extractor: nn.Module = field(repr=False)
    preprocess: PreprocessSpec
    feature_dim: int
    weights_sha256: str
    family: str
    class_names: tuple[str, ...] | None = None
    layer_dims: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.layer_dims:
            object.__setattr__(self, "layer_dims", (self.feature_dim,))


def _fits_fixed_size(model: nn.Module, preprocess: PreprocessSpec) -> bool:
    """False when the network is built for another fixed input size than the crop.

    torchvision ViTs record ``image_size``: a random ``vit_h_14`` is built for 224 while the
    preprocessing of its default weights crops 518.
    """
    fixed = getattr(model, "image_size", None)
    return not isinstance(fixed, int) or (fixed, fixed) == preprocess.input_size


def _probe_dim(
    extractor: nn.Module,
    preprocess: PreprocessSpec,
    spec: BackboneSpec,
    known: int | None = None,
) -> int:
    """Feature width; one dummy forward only where the model does not tell it.

    ``known`` is the width read from the model for the default extractor (None where it is
    unknown or the network is built for another fixed size than the crop). It is used as is
    when the network runs at its weights' own input size. A dummy forward still runs for
    named layers (their width is the layer's output), unknown widths and ``image_size``
    overrides; there it also proves the network accepts the input size, failing here with a
    message rather than mid-way through an embedding run.
    """
    if known is not None and spec.image_size is None:
        return known
    height, width = preprocess.input_size
    try:
        with torch.no_grad():
            out = extractor(torch.zeros(1, 3, height, width))
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - shape errors come as RuntimeError/AssertionError...
        raise BackboneError(
            f"{spec.name} fails on a {height}x{width} input ({type(exc).__name__}: {exc}); "
            "try another image_size or layer"
        ) from exc
    if out.ndim != 2 or out.shape[0] != 1:
        raise BackboneError(f"extractor output has shape {tuple(out.shape)}, expected (1, D)")
    return int(out.shape[1])


def _probe_dims(extractor: MultiLayerPooled, preprocess: PreprocessSpec, spec: BackboneSpec
                ) -> tuple[int, ...]:
    """Each layer's width, from one dummy forward (which also proves the input size fits)."""
    height, width = preprocess.input_size
    try:
        with torch.no_grad():
            blocks = extractor.pooled(torch.zeros(1, 3, height, width))
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in _probe_dim
        raise BackboneError(
            f"{spec.name} fails on a {height}x{width} input ({type(exc).__name__}: {exc}); "
            "try another image_size or layer"
        ) from exc
    for layer, block in zip(extractor.layers, blocks, strict=True):
        if block.ndim != 2 or block.shape[0] != 1:
            raise BackboneError(f"layer {layer_label(layer)} gives shape {tuple(block.shape)}, "
                                "expected (1, D)")
    return tuple(int(block.shape[1]) for block in blocks)


def load_backbone(spec: BackboneSpec | str | os.PathLike[str]) -> Backbone:
    """Build a backbone: network, weights, extractor, preprocessing (the expensive step).

    Call once per process or Ray actor. ``weights="random"`` is seeded (the same network
    every call) without disturbing the caller's RNG. Nothing is downloaded unless the spec
    asks for hub weights (``torchvision:``/``timm:`` with ``weights=None`` or an identifier).

    Parameters
    ----------
    spec : BackboneSpec, str or path-like
        A spec, or a name (see :func:`resolve_spec`) loaded with its default weights.

    Returns
    -------
    Backbone

    Raises
    ------
    BackboneError
        Unknown name or layer, weights that do not fit, or weights that need a download
        which failed (the message suggests ``--weights FILE`` or the offline default).

    Examples
    --------
    >>> bb = load_backbone("efficientnet_lite0")
    >>> bb.feature_dim, bb.preprocess.input_size
    (1280, (224, 224))
    """
    spec = resolve_spec(spec)
    built = build(spec)
    # After the build: hub weights it fetched are now cached, so this is the key a later
    # describe_backbone(spec) gives too. Identity and preprocessing come only from here.
    described = describe(spec, fetch=False)
    model = built.model
    if spec.layer is None:
        extractor = default_extractor(model, built.family)
        known = default_feature_dim(model, built.family)
    else:
        extractor = layer_extractor(model, spec.layer, built.family)
        known = None
    extractor.eval()
    preprocess = described.preprocess
    if not _fits_fixed_size(model, preprocess):
        known = None  # let the probe fail with a message
    return Backbone(
        spec=spec,
        model=model,
        extractor=extractor,
        preprocess=preprocess,
        feature_dim=_probe_dim(extractor, preprocess, spec, known),
        weights_sha256=described.weights_sha256,
        family=built.family,
        class_names=built.class_names,
    )


def load_layers(specs: Sequence[BackboneSpec]) -> Backbone:
    """One network whose extractor gives several layers' pooled features from one forward.

    Parameters
    ----------
    specs : sequence of BackboneSpec
        Single-layer specs of one backbone (same name, weights and image_size) that differ only
        in ``layer`` (None = the pooled penultimate layer), each layer once.

    Returns
    -------
    Backbone
        ``extractor`` maps ``(B, 3, H, W)`` to the layers' pooled outputs concatenated in the
        order of ``specs`` (float32, width ``feature_dim = sum(layer_dims)``); each block equals
        what ``load_backbone(spec).extractor`` gives for its layer. ``spec`` is ``specs[0]``.
        One spec gives :func:`load_backbone` of it.

    Raises
    ------
    ConfigError
        No specs, specs of different backbones, weights or sizes, or a layer given twice.
    BackboneError
        As :func:`load_backbone`, e.g. an unknown layer name (the message lists valid names).

    Examples
    --------
    >>> from featurepipe.backbones import resolve_spec
    >>> specs = [resolve_spec("efficientnet_lite0", layer=name) for name in ("blocks.5", None)]
    >>> load_layers(specs).layer_dims  # doctest: +SKIP
    (192, 1280)
    """
    specs = [resolve_spec(s) for s in specs]
    if not specs:
        raise ConfigError("load_layers needs at least one spec")
    base = dataclasses.replace(specs[0], layer=None)
    for other in specs[1:]:
        if dataclasses.replace(other, layer=None) != base:
            raise ConfigError(f"load_layers takes specs that differ only in layer; {other} "
                              f"differs from {specs[0]} in more")
    layers = [s.layer for s in specs]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"a layer is given twice in {[layer_label(x) for x in layers]}")
    if len(specs) == 1:
        return load_backbone(specs[0])
    built = build(specs[0])
    described = describe(specs[0], fetch=False)
    model = built.model
    penultimate = default_extractor(model, built.family) if None in layers else None
    extractor = MultiLayerPooled(model, layers, built.family, penultimate)
    extractor.eval()
    dims = _probe_dims(extractor, described.preprocess, specs[0])
    return Backbone(
        spec=specs[0],
        model=model,
        extractor=extractor,
        preprocess=described.preprocess,
        feature_dim=sum(dims),
        weights_sha256=described.weights_sha256,
        family=built.family,
        class_names=built.class_names,
        layer_dims=dims,
    )
