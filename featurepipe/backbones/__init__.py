"""Backbone registry: name -> network + weights + preprocessing spec + feature extractor.

``resolve_spec`` validates a request cheaply; ``describe_backbone`` gives what identifies its
features (weights sha256, preprocessing, width when known) without building the network;
``load_backbone`` builds it. Preprocessing always comes from the weights' own config (timm
``pretrained_cfg``, torchvision ``Weights.transforms()``).
The offline default ``efficientnet_lite0`` maps the bundled lukemelas-format checkpoint onto
timm's ``tf_efficientnet_lite0``. Fine-tuned networks round-trip through ``export_finetuned``.
"""

from __future__ import annotations

from featurepipe.backbones._build import file_sha256
from featurepipe.backbones._catalog import backbone_layers, list_backbones
from featurepipe.backbones._classifier import reset_classifier
from featurepipe.backbones._describe import BackboneDescription, describe_backbone
from featurepipe.backbones._export import export_finetuned
from featurepipe.backbones._extract import layer_names, pool_features
from featurepipe.backbones._load import Backbone, load_backbone
from featurepipe.backbones._spec import (
    EXPORT_CONFIG_NAME,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS_NAME,
    OFFLINE_DEFAULT,
    BackboneSpec,
    PreprocessSpec,
    resolve_spec,
)

__all__ = [
    "EXPORT_CONFIG_NAME",
    "EXPORT_FORMAT",
    "EXPORT_WEIGHTS_NAME",
    "OFFLINE_DEFAULT",
    "Backbone",
    "BackboneDescription",
    "BackboneSpec",
    "PreprocessSpec",
    "backbone_layers",
    "describe_backbone",
    "export_finetuned",
    "file_sha256",
    "layer_names",
    "list_backbones",
    "load_backbone",
    "pool_features",
    "reset_classifier",
    "resolve_spec",
]
