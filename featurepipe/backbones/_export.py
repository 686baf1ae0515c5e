"""Writing fine-tuned exports: the one implementation shared by the fine-tuner and the loader."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from featurepipe.atomic import atomic_write, atomic_write_text, fsync_dir, temp_name
from featurepipe.backbones._build import family_of
from featurepipe.backbones._classifier import torchvision_head_path
from featurepipe.backbones._spec import (
    EXPORT_CONFIG_NAME,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS_NAME,
    BackboneSpec,
    PreprocessSpec,
    resolve_spec,
)
from featurepipe.exceptions import BackboneError, ConfigError


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside ``torch.compile`` / DataParallel / DDP wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = cast(nn.Module, model.module)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def _output_classes(model: nn.Module, family: str) -> int | None:
    """Number of classifier outputs, when the layout makes it known."""
    if family == "timm":
        value = getattr(model, "num_classes", None)
        return value if isinstance(value, int) else None
    try:
        head = model.get_submodule(torchvision_head_path(model))
    except BackboneError:
        return None
    return getattr(head, "out_features", None) or getattr(head, "out_channels", None)


def _check_target(out: Path) -> None:
    """Only an empty folder or a previous export may be replaced: never a user's other files."""
    if not out.exists():
        return
    if out.is_dir() and (not any(out.iterdir()) or (out / EXPORT_CONFIG_NAME).is_file()):
        return
    raise ConfigError(
        f"{out} exists and is not a featurepipe export; choose a new or empty directory"
    )


def export_finetuned(
    model: nn.Module,
    base_spec: BackboneSpec | str,
    class_names: Sequence[str],
    preprocess: PreprocessSpec | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write a fine-tuned network as a directory :func:`load_backbone` reads back.

    The directory holds ``featurepipe_backbone.json`` (format, base spec, class names,
    preprocessing) and ``weights.pt`` (the full state dict after :func:`reset_classifier`).
    It is written to a temporary sibling and renamed into place, so a reader never sees half
    an export; an existing export at ``out_dir`` is replaced.

    Parameters
    ----------
    model : nn.Module
        The fine-tuned classifier with ``len(class_names)`` outputs (compile/DDP wrappers are
        unwrapped).
    base_spec : BackboneSpec or str
        The backbone fine-tuning started from (its weights may be ``"random"``).
    class_names : sequence of str
        Output index -> class name.
    preprocess : PreprocessSpec or dict
        The evaluation preprocessing the model was trained for.
    out_dir : path-like
        Target directory: new, empty, or an earlier export.

    Returns
    -------
    Path
        The absolute export directory.

    Raises
    ------
    BackboneError
        The model's outputs do not match ``class_names``, or the base spec is invalid.
    ConfigError
        ``out_dir`` holds something other than an export.
    """
    base = resolve_spec(base_spec)
    names = [str(c) for c in class_names]
    if not names:
        raise BackboneError("class_names is empty; an export needs at least one class")
    net = _unwrap(model)
    outputs = _output_classes(net, family_of(base))
    if outputs is not None and outputs != len(names):
        raise BackboneError(
            f"the model has {outputs} outputs but {len(names)} class names were given; "
            "call reset_classifier(model, len(class_names), family) before training"
        )
    spec = (
        preprocess
        if isinstance(preprocess, PreprocessSpec)
        else PreprocessSpec.from_dict(preprocess)
    )
    config = {
        "format": EXPORT_FORMAT,
        "base": base.to_dict(),
        "num_classes": len(names),
        "class_names": names,
        "preprocess": spec.to_dict(),
    }
    state = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_target(out)
    tmp = temp_name(out)
    tmp.mkdir()
    try:
        atomic_write(tmp / EXPORT_WEIGHTS_NAME, lambda f: torch.save(state, f))
        atomic_write_text(tmp / EXPORT_CONFIG_NAME,
                          json.dumps(config, indent=2, sort_keys=True))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """``os.replace`` a finished directory onto ``out`` (an old export is moved aside first)."""
    if out.exists() and any(out.iterdir()):
        old = temp_name(out)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
