"""Finding and replacing the final classification layer of timm and torchvision networks."""

from __future__ import annotations

from torch import nn

from featurepipe.exceptions import BackboneError

FAMILIES = ("timm", "torchvision")

# Auxiliary heads torchvision trains with (inception_v3, googlenet); reset with the main one so an
# exported state dict always matches the rebuilt architecture.
_AUX_HEADS = ("AuxLogits.fc", "aux1.fc2", "aux2.fc2")


def torchvision_head_path(model: nn.Module) -> str:
    """Dotted name of the final classification layer of a torchvision classifier.

    Covers ``fc`` (resnet, regnet, googlenet, shufflenet ...), ``heads.head`` (vit), ``head``
    (swin), ``classifier`` as a Linear (densenet) or as a Sequential whose last Linear/Conv2d is
    the classifier (efficientnet, mobilenet, convnext, vgg, maxvit, squeezenet ...).
    """
    modules = dict(model.named_modules())
    for path in ("heads.head", "fc", "head", "classifier"):
        module = modules.get(path)
        if isinstance(module, nn.Linear):
            return path
        if isinstance(module, nn.Sequential):
            for child_name, child in reversed(list(module.named_children())):
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    return f"{path}.{child_name}"
    raise BackboneError(
        f"cannot find the classification layer of {type(model).__name__} "
        "(looked for fc, heads.head, head, classifier)"
    )


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (``nn.Module.set_submodule`` needs torch>=2.4)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def _new_layer(old: nn.Module, num_classes: int) -> nn.Module:
    weight = next(old.parameters())
    if isinstance(old, nn.Linear):
        layer: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d) and old.kernel_size == (1, 1):
        layer = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    else:
        raise BackboneError(f"cannot replace classification layer {old!r}")
    return layer.to(device=weight.device, dtype=weight.dtype)


def reset_classifier(model: nn.Module, num_classes: int, family: str) -> nn.Module:
    """Replace the final classification layer by a fresh one with ``num_classes`` outputs.

    Parameters
    ----------
    model : nn.Module
        A timm or torchvision classifier; modified in place.
    num_classes : int
        Number of outputs of the new layer (>= 1).
    family : {"timm", "torchvision"}
        How to find the layer: timm's ``reset_classifier``, or the torchvision layouts.

    Returns
    -------
    nn.Module
        ``model`` itself, for chaining.

    Raises
    ------
    BackboneError
        Unknown family, bad ``num_classes``, or a torchvision layout without a known head.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise BackboneError(f"num_classes must be a positive integer, got {num_classes!r}")
    if family not in FAMILIES:
        raise BackboneError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "timm":
        reset = getattr(model, "reset_classifier", None)
        if not callable(reset):
            raise BackboneError(f"{type(model).__name__} is not a timm model (no reset_classifier)")
        reset(num_classes)
        return model
    modules = dict(model.named_modules())
    for path in (torchvision_head_path(model), *_AUX_HEADS):
        old = modules.get(path)
        if old is not None:
            set_submodule(model, path, _new_layer(old, num_classes))
    if isinstance(getattr(model, "num_classes", None), int):  # squeezenet keeps a copy
        setattr(model, "num_classes", num_classes)  # noqa: B010 - typed Tensor|Module by torch
    return model
