"""Serve a fine-tuned network through the same predict/evaluate path as a saved head.

A fine-tuned export (``featurepipe finetune --out DIR`` writes ``DIR/model``) is a backbone whose
pre-logits features feed its own final linear layer. That layer is lifted into
:class:`LinearHead`, a fitted scikit-learn classifier, so ``featurepipe predict DIR ...`` and
``featurepipe evaluate DIR ...`` reuse :class:`~featurepipe.model.ImageClassifier` unchanged:
embedding, bad-file reporting, top-k and metrics are the same code for both kinds of model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from featurepipe.backbones import EXPORT_CONFIG_NAME, BackboneSpec, load_backbone, resolve_spec
from featurepipe.exceptions import ConfigError

__all__ = ["LinearHead", "export_dir", "final_linear", "load_finetuned"]


class LinearHead(ClassifierMixin, BaseEstimator):
    """A linear layer taken from a trained network: scores = X @ coef.T + intercept.

    It is fitted by construction (the network trained it); ``fit`` is refused so a grid search
    cannot silently replace the fine-tuned weights.
    """

    def __init__(self, coef: np.ndarray | None = None, intercept: np.ndarray | None = None,
                 classes: np.ndarray | None = None) -> None:
        self.coef = coef
        self.intercept = intercept
        self.classes = classes

    def __sklearn_is_fitted__(self) -> bool:
        return self.coef is not None

    @property
    def classes_(self) -> np.ndarray:
        return np.asarray(self.classes)

    def fit(self, X: Any, y: Any = None) -> LinearHead:
        raise ConfigError("LinearHead holds a fine-tuned network's layer; it is not re-fitted")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        return X @ np.asarray(self.coef, np.float32).T + np.asarray(self.intercept, np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        scores -= scores.max(axis=1, keepdims=True)
        exp = np.exp(scores)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def export_dir(path: str | os.PathLike) -> Path:
    """The export folder inside a `featurepipe finetune` output folder, or the folder itself."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / EXPORT_CONFIG_NAME).is_file():
            return candidate
    raise ConfigError(f"{path} is neither a model file nor a fine-tuned model folder "
                      f"(no {EXPORT_CONFIG_NAME} in it or in its model/ subfolder)")


def final_linear(backbone: Any) -> Any:
    """The network's last classification layer (timm ``get_classifier``; torchvision head path)."""
    import torch.nn as nn

    model = backbone.model
    if backbone.family == "timm":
        layer = model.get_classifier()
    else:
        from featurepipe.backbones import torchvision_head_path

        layer = model.get_submodule(torchvision_head_path(model))
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"cannot serve this fine-tuned network: its last layer is "
                          f"{type(layer).__name__}, not Linear; use FineTuneClassifier.predict")
    return layer


def load_finetuned(path: str | os.PathLike) -> tuple[LinearHead, BackboneSpec, list[str]]:
    """The head, backbone spec and class names of a fine-tuned export folder, ready for
    :class:`~featurepipe.model.ImageClassifier` (which :func:`featurepipe.model.load_model`
    builds from them)."""
    folder = export_dir(path)
    spec = resolve_spec(str(folder))
    backbone = load_backbone(spec)
    layer = final_linear(backbone)
    names = list(backbone.class_names or [str(i) for i in range(layer.out_features)])
    head = LinearHead(layer.weight.detach().cpu().numpy().astype(np.float32),
                      layer.bias.detach().cpu().numpy().astype(np.float32)
                      if layer.bias is not None else np.zeros(layer.out_features, np.float32),
                      np.arange(len(names)))
    return head, spec, names
