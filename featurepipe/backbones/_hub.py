"""Hugging Face hub lookups that fail at once, in one line, when the hub cannot be reached.

``timm.create_model(pretrained=True)`` asks the hub for each candidate file with five retries and
growing waits, even when the file is cached; offline that is a minute of retry messages before
the real error. Here the build runs against the local cache only when the weights are there, and
otherwise one request without retries decides whether the hub answers at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from featurepipe.backbones._build import timm_cached_file, timm_pretrained_cfg
from featurepipe.backbones._spec import OFFLINE_DEFAULT, RANDOM, BackboneSpec, is_weights_file
from featurepipe.exceptions import BackboneError

__all__ = ["PROBE_TIMEOUT", "hub_fast_fail"]

#: Seconds the single reachability request may take.
PROBE_TIMEOUT = 5.0


def _offline_env() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in ("1", "on", "yes", "true") or bool(constants.HF_HUB_OFFLINE)


def _unreachable(spec: BackboneSpec, why: str) -> BackboneError:
    return BackboneError(
        f"{spec.name} pretrained weights needs a download (not in the local cache) and {why}; "
        f"pass a local state dict with --weights FILE (weights=path), or use the offline "
        f"default {OFFLINE_DEFAULT!r} (see `featurepipe models`)")


def _probe(spec: BackboneSpec, hf_id: str, filename: str) -> None:
    """One HEAD request, no retries: raise unless the hub answers (any HTTP status will do)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(hf_id, filename), timeout=PROBE_TIMEOUT)
    except HfHubHTTPError as exc:
        if getattr(exc, "response", None) is None:
            raise _unreachable(spec, f"the hub cannot be reached ({type(exc).__name__})"
                               ) from exc
    except Exception as exc:  # noqa: BLE001 - DNS, connection and timeout errors alike
        raise _unreachable(spec, f"the hub cannot be reached ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


@contextlib.contextmanager
def _cache_only() -> Iterator[None]:
    """Make huggingface_hub use its cache without asking the hub (it reads this flag per call)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def hub_fast_fail(spec: BackboneSpec) -> Iterator[None]:
    """Context for building ``spec``: cached hub weights load offline, missing ones fail fast.

    Only ``timm:`` names with hub weights are affected; local files, ``random`` and the other
    families pass straight through.
    """
    if not spec.name.startswith("timm:") or spec.weights == RANDOM or is_weights_file(
            spec.weights):
        yield
        return
    cfg: dict[str, Any] = timm_pretrained_cfg(spec.name.partition(":")[2])
    hf_id = str(cfg.get("hf_hub_id") or "").split("@")[0]
    if not hf_id:  # weights from a plain URL: torch.hub tries once, no retries to cut short
        yield
        return
    if timm_cached_file(cfg) is not None:
        with _cache_only():
            yield
        return
    if _offline_env():
        raise _unreachable(spec, "HF_HUB_OFFLINE is set")
    _probe(spec, hf_id, str(cfg.get("hf_hub_filename") or "model.safetensors"))
    yield
