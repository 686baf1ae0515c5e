"""Backbone registry: name -> network + weights + preprocessing spec + feature extractor.

``resolve_spec`` validates a request cheaply; ``describe_backbone`` gives what identifies its
features (weights sha256, preprocessing, width when known) without building the network;
``load_backbone`` builds it. Preprocessing always comes from the weights' own config (timm
``pretrained_cfg``, torchvision ``Weights.transforms()``).
The offline default ``efficientnet_lite0`` maps the bundled lukemelas-format checkpoint onto
timm's ``tf_efficientnet_lite0``. Fine-tuned networks round-trip through ``export_finetuned``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> private module that defines it. Imported on first use (PEP 562), so a spec or
#: a description does not import torch: ``featurepipe fit`` and saved models stay light.
_WHERE = {
    "file_sha256": "_build",
    "backbone_layers": "_catalog",
    "list_backbones": "_catalog",
    "reset_classifier": "_classifier",
    "torchvision_head_path": "_classifier",
    "BackboneDescription": "_describe",
    "describe_backbone": "_describe",
    "export_finetuned": "_export",
    "layer_names": "_extract",
    "parse_layers": "_layers",
    "pool_features": "_extract",
    "Backbone": "_load",
    "load_backbone": "_load",
    "load_layers": "_load",
    "ResizeCenterCrop": "_resize",
    "EXPORT_CONFIG_NAME": "_spec",
    "EXPORT_FORMAT": "_spec",
    "EXPORT_WEIGHTS_NAME": "_spec",
    "OFFLINE_DEFAULT": "_spec",
    "BackboneSpec": "_spec",
    "PreprocessSpec": "_spec",
    "resolve_spec": "_spec",
}

if TYPE_CHECKING:
    from featurepipe.backbones._build import file_sha256
    from featurepipe.backbones._catalog import backbone_layers, list_backbones
    from featurepipe.backbones._classifier import reset_classifier, torchvision_head_path
    from featurepipe.backbones._describe import BackboneDescription, describe_backbone
    from featurepipe.backbones._export import export_finetuned
    from featurepipe.backbones._extract import layer_names, pool_features
    from featurepipe.backbones._layers import parse_layers
    from featurepipe.backbones._load import Backbone, load_backbone, load_layers
    from featurepipe.backbones._resize import ResizeCenterCrop
    from featurepipe.backbones._spec import (
        EXPORT_CONFIG_NAME,
        EXPORT_FORMAT,
        EXPORT_WEIGHTS_NAME,
        OFFLINE_DEFAULT,
        BackboneSpec,
        PreprocessSpec,
        resolve_spec,
    )


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"featurepipe.backbones.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "EXPORT_CONFIG_NAME",
    "EXPORT_FORMAT",
    "EXPORT_WEIGHTS_NAME",
    "OFFLINE_DEFAULT",
    "Backbone",
    "BackboneDescription",
    "BackboneSpec",
    "PreprocessSpec",
    "ResizeCenterCrop",
    "backbone_layers",
    "describe_backbone",
    "export_finetuned",
    "file_sha256",
    "layer_names",
    "list_backbones",
    "load_backbone",
    "load_layers",
    "parse_layers",
    "pool_features",
    "reset_classifier",
    "resolve_spec",
    "torchvision_head_path",
]
