"""featurepipe: transfer learning on images with cached pretrained features and scikit-learn heads.

Names are imported lazily (PEP 562), so ``import featurepipe`` and the CLI's ``--help`` stay fast
and do not import torch until a feature is actually used.

Examples
--------
>>> from sklearn.linear_model import LogisticRegression
>>> from sklearn.pipeline import make_pipeline
>>> from featurepipe import ImageEmbedder
>>> clf = make_pipeline(ImageEmbedder(cache="feats.h5"), LogisticRegression(max_iter=1000))
>>> clf.fit(train_paths, y_train)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from featurepipe.exceptions import (
    BackboneError as BackboneError,
)
from featurepipe.exceptions import (
    ConfigError as ConfigError,
)
from featurepipe.exceptions import (
    DecodeError as DecodeError,
)
from featurepipe.exceptions import (
    FeaturePipeError as FeaturePipeError,
)
from featurepipe.exceptions import (
    FeaturePipeWarning as FeaturePipeWarning,
)
from featurepipe.exceptions import (
    MissingDependencyError as MissingDependencyError,
)
from featurepipe.exceptions import (
    SourceError as SourceError,
)
from featurepipe.exceptions import (
    SpecMismatchError as SpecMismatchError,
)
from featurepipe.exceptions import (
    StoreError as StoreError,
)
from featurepipe.exceptions import (
    StoreLockedError as StoreLockedError,
)

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first access). Functions named like their
#: module (embed, compare, finetune) are not re-exported: the name would shadow the submodule.
#: Use ``from featurepipe.embed import embed`` and so on.
_LAZY = {
    "BackboneSpec": "featurepipe.backbones",
    "DecodePolicy": "featurepipe.decode",
    "EmbedReport": "featurepipe.embed",
    "FeatureSet": "featurepipe.store",
    "FeatureStore": "featurepipe.store",
    "FineTuneClassifier": "featurepipe.finetune",
    "HEAD_PRESETS": "featurepipe.heads",
    "ImageClassifier": "featurepipe.model",
    "ImageEmbedder": "featurepipe.estimators",
    "ImageSource": "featurepipe.sources",
    "OutOfCoreSGDClassifier": "featurepipe.heads",
    "PreprocessSpec": "featurepipe.backbones",
    "fit_head": "featurepipe.heads",
    "list_backbones": "featurepipe.backbones",
    "load_backbone": "featurepipe.backbones",
    "load_model": "featurepipe.model",
    "make_head": "featurepipe.heads",
    "open_source": "featurepipe.sources",
    "resolve_spec": "featurepipe.backbones",
    "save_model": "featurepipe.model",
}

__all__ = sorted(
    [
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
        *_LAZY,
    ]
)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featurepipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
