"""What makes two sets of features comparable: format version, key parts, entry key, spec checks.

A store entry, an in-memory embedder and a saved model all name their features by the same
*key parts* (backbone spec, weights hash, preprocessing, decode policy, dtype, precision and the
feature-format version); the entry key is a hash of them. Everything here is plain data and
standard library, so the store, saved models and ``featurepipe fit`` use it without importing
torch.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from featurepipe.exceptions import ConfigError, SpecMismatchError

__all__ = [
    "FEATURE_FORMAT_VERSION",
    "KEY_PART_NAMES",
    "SPEC_PARTS",
    "VERSIONED_PACKAGES",
    "canonical",
    "check_same_spec",
    "closest_entry",
    "differing_parts",
    "entry_key",
    "featurepipe_version",
    "key_parts",
    "key_parts_from_attrs",
    "library_versions",
]

#: Bumped when the same image and spec give other feature values: 2 = the resize computes only
#: the centre crop (``ResizeCenterCrop``), 1-level pixel differences from version 1; 3 = the
#: resize is torch's native uint8 kernel on tensors instead of Pillow's (a few levels).
FEATURE_FORMAT_VERSION: int = 3

#: Key parts that change what a feature *means*; a head only accepts features that agree on all.
SPEC_PARTS = ("backbone", "spec", "weights_sha256", "layer", "preprocess", "decode_policy",
              "feature_format_version")
#: All key parts; ``dtype`` and ``precision`` only round the same features differently.
KEY_PART_NAMES = (*SPEC_PARTS, "dtype", "precision")
#: Distributions whose versions are recorded with every store entry and saved model.
VERSIONED_PACKAGES = ("featurepipe", "torch", "torchvision", "timm", "numpy", "h5py", "pillow",
                      "scikit-learn")


class _Spec(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def layer(self) -> str | None: ...

    def to_dict(self) -> dict[str, Any]: ...


class _Preprocess(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class _Described(Protocol):
    """What :func:`key_parts` reads of a backbone (loaded or only described)."""

    @property
    def spec(self) -> _Spec: ...
    @property
    def weights_sha256(self) -> str: ...
    @property
    def preprocess(self) -> _Preprocess: ...


class _Policy(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def key_parts(backbone: _Described, policy: _Policy, precision: str, dtype: str,
              decoder: str = "pil") -> dict[str, Any]:
    """Everything that changes a feature value; hashed into the store's entry key.

    ``decoder`` enters only when it is not the default Pillow path, so existing keys stay valid.
    The backbone's spec should be canonical already (an ``image_size`` equal to the backbone's
    default is ``None``; see :func:`featurepipe.embedding.canonical_spec`), so both spellings
    of one spec name one entry.
    """
    extra = {} if decoder == "pil" else {"decoder": decoder}
    return {**extra,
        "backbone": backbone.spec.name,
        "spec": backbone.spec.to_dict(),
        "weights_sha256": backbone.weights_sha256,
        "layer": backbone.spec.layer,
        "preprocess": backbone.preprocess.to_dict(),
        "decode_policy": policy.to_dict(),
        "dtype": dtype,
        "precision": precision,
        "feature_format_version": FEATURE_FORMAT_VERSION,
    }


def entry_key(parts: Mapping[str, Any]) -> str:
    """Hash the parts that change a feature into a short, stable entry key.

    Parameters
    ----------
    parts : mapping
        JSON-able description (backbone spec, weights hash, preprocessing, decode policy,
        dtype, precision, feature-format version ...).

    Returns
    -------
    str
        First 16 hex digits of the sha256 of the canonical JSON (sorted keys, no spaces).

    Examples
    --------
    >>> entry_key({"b": 1, "a": [1, 2]}) == entry_key({"a": (1, 2), "b": 1})
    True
    """
    try:
        text = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"entry key parts must be JSON-serialisable: {exc}") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def key_parts_from_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The key parts of a feature-store entry, from its attributes (``FeatureStore.attrs``)."""
    return {name: attrs.get(name) for name in KEY_PART_NAMES}


def canonical(value: Any) -> str:
    """JSON text that compares equal exactly when two attribute values mean the same."""
    return json.dumps(value, sort_keys=True, default=str)


def differing_parts(expected: Mapping[str, Any], actual: Mapping[str, Any],
                    names: Iterable[str] | None = None) -> list[str]:
    """Names among ``names`` (default: every part of ``expected``) on which two sets of key
    parts disagree. The one comparison behind every spec refusal (stores and models)."""
    names = list(expected) if names is None else list(names)
    return [name for name in names if canonical(expected.get(name)) != canonical(actual.get(name))]


def closest_entry(parts: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]]
                  ) -> tuple[str, list[str]] | None:
    """The entry whose key parts differ from ``parts`` in the fewest places, and those places.

    Ties go to the first key in sorted order, so the message is the same on every run.
    Returns None when ``entries`` is empty.
    """
    best: tuple[str, list[str]] | None = None
    for key in sorted(entries):
        differs = differing_parts(parts, entries[key])
        if best is None or len(differs) < len(best[1]):
            best = (key, differs)
    return best


def check_same_spec(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str) -> None:
    """Raise SpecMismatchError naming every spec part where ``actual`` differs from ``expected``.

    Parameters
    ----------
    expected : mapping
        Key parts the head was trained on.
    actual : mapping
        Key parts of the features offered.
    what : str
        Names the features in the message, e.g. ``"test store b.h5"``.
    """
    differs = differing_parts(expected, actual, SPEC_PARTS)
    if differs:
        detail = "; ".join(f"{name}: {_short(expected.get(name))} vs {_short(actual.get(name))}"
                           for name in differs)
        raise SpecMismatchError(
            f"{what} were made with another spec than the model's ({detail}); re-embed them "
            f"with backbone {_short(expected.get('spec'))}")


def _short(value: Any, limit: int = 80) -> str:
    text = canonical(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def library_versions() -> dict[str, str]:
    """Versions recorded with every store entry (read from package metadata: no heavy imports)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in VERSIONED_PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def featurepipe_version() -> str:
    """This featurepipe's version, from its package metadata ("unknown" when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("featurepipe")
    except metadata.PackageNotFoundError:
        return "unknown"
