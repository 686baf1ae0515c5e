"""Feature extractors: ``(B, 3, H, W) -> (B, D)`` modules sharing the classifier's parameters.

Every extractor holds the classifier's own submodules (no copies), so moving or loading weights
into ``Backbone.model`` is seen by ``Backbone.extractor`` and vice versa.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from featurepipe.backbones._classifier import torchvision_head_path
from featurepipe.exceptions import BackboneError


def pool_features(x: Any, channels_last: bool = False) -> torch.Tensor:
    """Global average pooling to ``(B, D)``: 4D maps over H, W; 3D token sequences over tokens."""
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise BackboneError(
            f"layer output is a {type(x).__name__}, not a tensor; pick another layer"
        )
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x.mean(dim=1)
    if x.ndim == 4:
        return x.mean(dim=(1, 2) if channels_last else (2, 3))
    raise BackboneError(f"cannot pool a layer output of shape {tuple(x.shape)}; pick another layer")


class Pooled(nn.Module):
    """Run ``inner`` and globally average-pool its output to ``(B, D)``."""

    def __init__(self, inner: nn.Module, channels_last: bool = False, key: str | None = None):
        super().__init__()
        self.inner = inner
        self.channels_last = channels_last
        self.key = key  # fx extractors return {key: tensor}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.key is not None:
            out = out[self.key]
        return pool_features(out, self.channels_last)


class TimmPreLogits(nn.Module):
    """timm pooled pre-logits features: ``forward_head(forward_features(x), pre_logits=True)``.

    Pre-logits rather than "replace the head" because timm applies the head norm / pooling /
    pre-logits MLP inside ``forward_head``; this keeps them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model: Any = self.model
        return pool_features(model.forward_head(model.forward_features(x), pre_logits=True))


class _StopForward(Exception):
    """Raised by a capture hook to skip the rest of the network once the layer has run."""


class HookCapture(nn.Module):
    """Output of one named module, captured by a forward hook (fallback when fx cannot trace).

    The hook lives only during this module's own forward, so ``model(x)`` stays untouched.
    """

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, x: torch.Tensor) -> Any:
        captured: list[Any] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output)
            raise _StopForward

        handle = self.model.get_submodule(self.layer).register_forward_hook(hook)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise BackboneError(f"layer {self.layer!r} did not run during the forward pass")
        return captured[0]


class MultiLayerPooled(nn.Module):
    """Several layers' pooled outputs from one forward pass, concatenated in the given order.

    A named layer is captured by a forward hook, as :class:`HookCapture` does, and pooled by
    :func:`pool_features` inside that hook, so its full-size activation is dropped at once and
    a later in-place operation cannot change what is pooled. ``None`` in ``layers`` takes the
    output of ``penultimate`` (the default extractor, which then runs the whole network);
    without it the forward stops once every named layer has run. The layer outputs and the
    pooling are those of the single-layer extractors, so every block of the result equals
    what that layer's own extractor gives.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str | None], family: str,
                 penultimate: nn.Module | None = None) -> None:
        super().__init__()
        for layer in layers:
            if layer is not None and layer not in dict(model.named_modules()):
                raise _unknown_layer(model, layer)
        if None in layers and penultimate is None:
            raise BackboneError("the penultimate layer needs the default extractor")
        self.model = model
        self.layers = tuple(layers)
        self.channels_last = channels_last_outputs(model, family)
        self.penultimate = penultimate if None in layers else None

    def pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One ``(B, D_i)`` tensor per layer, from one forward pass."""
        names = [layer for layer in dict.fromkeys(self.layers) if layer is not None]
        found: dict[str, torch.Tensor] = {}

        def capture(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if name not in found:  # a module run twice: its first output, as HookCapture
                    found[name] = pool_features(output, self.channels_last)
                if self.penultimate is None and len(found) == len(names):
                    raise _StopForward

            return hook

        handles = [self.model.get_submodule(name).register_forward_hook(capture(name))
                   for name in names]
        last: torch.Tensor | None = None
        try:
            if self.penultimate is not None:
                last = self.penultimate(x)
            else:
                self.model(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in names if name not in found]
        if missing:
            raise BackboneError(f"layer(s) {', '.join(map(repr, missing))} did not run during "
                                "the forward pass")
        return [found[layer] if layer is not None else cast(torch.Tensor, last)
                for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([block.float() for block in self.pooled(x)], dim=1)


def _shallow(module: nn.Module) -> nn.Module:
    """A copy with its own child table but the same children, parameters and buffers."""
    clone = copy.copy(module)
    clone._modules = type(module._modules)(module._modules)
    return clone


def torchvision_penultimate(model: nn.Module) -> nn.Module:
    """The network with its final classification layer replaced by Identity, sharing weights.

    Working on a shallow view keeps each model's own forward (ViT class token, ConvNeXt's
    LayerNorm before the head, MobileNetV3's hidden Linear) so the output is exactly the input
    to the classifier, while ``model`` itself keeps its head.
    """
    parts = torchvision_head_path(model).split(".")
    view = _shallow(model)
    parent = view
    for part in parts[:-1]:
        child = _shallow(parent.get_submodule(part))
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = nn.Identity()
    return Pooled(view)


def channels_last_outputs(model: nn.Module, family: str) -> bool:
    """Whether intermediate 4D outputs are NHWC (timm ``output_fmt``, torchvision Swin)."""
    if family == "timm":
        return str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")
    return type(model).__name__.startswith("SwinTransformer")


def layer_names(backbone_or_model: Any, depth: int = 2) -> list[str]:
    """Module names usable as ``layer=``, up to ``depth`` levels deep (stages, blocks).

    Parameters
    ----------
    backbone_or_model : Backbone or nn.Module
        A loaded backbone (its ``model`` is used) or any module.
    depth : int
        ``1`` = top-level modules only; ``2`` adds their children (``blocks.5``, ``layer3.1``).

    Returns
    -------
    list of str
        In registration order (input to output). Any name of ``model.named_modules()`` works.
    """
    model = getattr(backbone_or_model, "model", backbone_or_model)
    return [name for name, _ in model.named_modules() if name and name.count(".") < depth]


def _unknown_layer(model: nn.Module, layer: str) -> BackboneError:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(layer, names, n=5)
    shown = layer_names(model)
    listed = ", ".join(shown[:40]) + (", ..." if len(shown) > 40 else "")
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return BackboneError(
        f"unknown layer {layer!r} for {type(model).__name__}.{hint} Valid names include: "
        f"{listed} (all: featurepipe.backbones.layer_names(backbone, depth=...))"
    )


def _graph_builder(family: str) -> Callable[..., nn.Module]:
    """fx ``create_feature_extractor``; timm's version knows timm's untraceable leaf modules."""
    if family == "timm":
        import timm.layers

        return timm.layers.create_feature_extractor
    import torchvision.models.feature_extraction

    return torchvision.models.feature_extraction.create_feature_extractor


def layer_extractor(model: nn.Module, layer: str, family: str) -> nn.Module:
    """Named module's output, globally average-pooled; fx graph first, forward hook fallback.

    The fx graph stops at the layer (no wasted compute past it). Models fx cannot trace fall
    back to a hook that aborts the forward right after the layer.
    """
    if layer not in dict(model.named_modules()):
        raise _unknown_layer(model, layer)
    channels_last = channels_last_outputs(model, family)
    try:
        graph = _graph_builder(family)(model, return_nodes={layer: "features"})
    except Exception:  # noqa: BLE001 - any tracing failure means "use the hook"
        return Pooled(HookCapture(model, layer), channels_last)
    graph.eval()
    return Pooled(graph, channels_last, key="features")


def default_feature_dim(model: nn.Module, family: str) -> int | None:
    """Output width of :func:`default_extractor`, read from the model (no forward pass).

    timm: ``head_hidden_size`` (the width ``forward_head(pre_logits=True)`` returns, which
    differs from ``num_features`` when the head has a pre-logits MLP), else ``num_features``.
    torchvision: the input width of the final classification layer that the extractor replaces
    by Identity (``in_features`` of a Linear, ``in_channels`` of a 1x1 Conv2d). None when the
    model does not say.
    """
    if family == "timm":
        dim = getattr(model, "head_hidden_size", None)
        if not isinstance(dim, int) or isinstance(dim, bool):
            dim = getattr(model, "num_features", None)
    else:
        try:
            head = model.get_submodule(torchvision_head_path(model))
        except BackboneError:
            return None
        if isinstance(head, nn.Linear):
            dim = head.in_features
        elif isinstance(head, nn.Conv2d):
            dim = head.in_channels
        else:
            dim = None
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        return None
    return dim


def default_extractor(model: nn.Module, family: str) -> nn.Module:
    """Pooled penultimate (pre-logits) features for a timm or torchvision classifier."""
    if family == "timm":
        return TimmPreLogits(model)
    return torchvision_penultimate(model)
