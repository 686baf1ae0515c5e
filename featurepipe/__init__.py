"""featurepipe: transfer learning on images with cached pretrained features and scikit-learn heads."""

from __future__ import annotations

__version__ = "0.1.0"

from featurepipe.exceptions import (
    BackboneError,
    ConfigError,
    DecodeError,
    FeaturePipeError,
    FeaturePipeWarning,
    MissingDependencyError,
    SourceError,
    SpecMismatchError,
    StoreError,
    StoreLockedError,
)

__all__ = [
    "BackboneError",
    "ConfigError",
    "DecodeError",
    "FeaturePipeError",
    "FeaturePipeWarning",
    "MissingDependencyError",
    "SourceError",
    "SpecMismatchError",
    "StoreError",
    "StoreLockedError",
    "__version__",
]
