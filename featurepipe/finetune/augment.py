"""Training transforms built from the backbone's own preprocessing spec.

Crop size, interpolation, mean and std all come from the weights' config (the backbone's
``PreprocessSpec``), so the network sees training images normalised exactly like at prediction time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from featurepipe.exceptions import ConfigError

__all__ = ["AUGMENTS", "input_hw", "interpolation_mode", "train_transform"]

AUGMENTS = ("basic", "trivial", "randaugment", "erasing", None)
#: Area fraction range of RandomResizedCrop: milder than ImageNet's (0.08, 1) because fine-tuning
#: sets are small and objects are often not centred crops of a large scene.
CROP_SCALE = (0.5, 1.0)


def input_hw(preprocess: Any) -> tuple[int, int]:
    """``(H, W)`` of the network input from a ``PreprocessSpec`` (int, (H, W) or (C, H, W))."""
    size = preprocess.input_size
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[-2], size[-1]) if len(size) >= 2 else (size[0], size[0])


def interpolation_mode(preprocess: Any) -> InterpolationMode:
    """The weights' interpolation as a torchvision ``InterpolationMode`` (bilinear if unknown)."""
    mode = getattr(preprocess, "interpolation", "bilinear")
    if isinstance(mode, InterpolationMode):
        return mode
    try:
        return InterpolationMode(str(mode).lower())
    except ValueError:
        return InterpolationMode.BILINEAR


def train_transform(preprocess: Any, augment: str | Callable | None = "basic") -> Callable:
    """PIL RGB image -> normalised float32 tensor ``(3, H, W)`` with training augmentation.

    Parameters
    ----------
    preprocess : PreprocessSpec
        The backbone's preprocessing (input size, interpolation, mean, std).
    augment : {"basic", "trivial", "randaugment", "erasing"}, callable or None
        ``basic``: RandomResizedCrop(scale=(0.5, 1)) + horizontal flip. ``trivial`` adds
        TrivialAugmentWide, ``randaugment`` adds RandAugment, ``erasing`` adds RandomErasing
        (p=0.5, on the normalised tensor: the erased box becomes the mean colour; it regularises
        small, centred images such as Fashion-MNIST). ``None`` is the eval transform (no
        augmentation). A callable is used as is (it must return the normalised tensor).
    """
    if callable(augment):
        return augment
    if augment is None:
        return preprocess.eval_transform()
    if augment not in AUGMENTS:
        raise ConfigError(
            f"augment={augment!r}; expected one of 'basic', 'trivial', 'randaugment', 'erasing', "
            "None or a callable"
        )
    interp = interpolation_mode(preprocess)
    # Geometry and auto-augment run on the PIL image: PIL supports every interpolation mode
    # (tensor affine ops refuse bicubic), and the output is the same tensor pipeline as eval.
    steps: list[Callable] = [
        v2.RandomResizedCrop(input_hw(preprocess), scale=CROP_SCALE, interpolation=interp,
                             antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augment == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=interp))
    elif augment == "randaugment":
        steps.append(v2.RandAugment(interpolation=interp))
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)),
    ]
    if augment == "erasing":
        steps.append(v2.RandomErasing(p=0.5, value=0))
    return v2.Compose(steps)
