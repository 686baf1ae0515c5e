"""What is trained when: stage grouping, freezing strategies, BatchNorm policy, parameter groups.

A network is cut into *stages*, input side first, classifier head last (:func:`stage_groups`).
A strategy says, per epoch, how many of the top backbone stages are unfrozen
(:func:`unfrozen_stages`):

``head``
    only the new classifier head is trained.
``partial``
    the last ``unfreeze_stages`` backbone stages plus the head.
``full``
    everything.
``gradual``
    the head alone first; every ``gradual_every`` epochs the next stage down is unfrozen.

BatchNorm policy: BN layers in frozen stages are kept in eval mode during training (their
running mean/var stay those of the pretrained weights, which the frozen convolutions were trained
with); BN layers in unfrozen stages train normally.

Discriminative learning rates: one optimizer param group per stage (split into decay / no-decay,
biases and norm weights get no weight decay). The head learns at ``lr``; a backbone stage ``d``
stages below the head at ``lr * backbone_lr_factor * stage_lr_decay ** (d - 1)``. Every stage is
in the optimizer from the start; frozen parameters have ``requires_grad=False`` and no gradient,
which AdamW skips (no update, no weight decay, no state), so a stage joins its group the epoch it
is unfrozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from featurepipe.exceptions import ConfigError

__all__ = [
    "STRATEGIES",
    "apply_freeze",
    "param_groups",
    "set_bn_policy",
    "stage_groups",
    "stage_names",
    "unfrozen_stages",
]

STRATEGIES = ("head", "partial", "full", "gradual")
# Top-level containers whose children are the stages (torchvision efficientnet/mobilenet/convnext,
# efficientnet-lite style models); other containers (resnet's layer1..4) are one stage each.
_EXPANDED_CONTAINERS = ("features", "blocks", "_blocks")


def stage_groups(model: nn.Module, family: str | None = None) -> list[list[str]]:
    """Parameter names per stage, input side first, classifier head last.

    Parameters
    ----------
    model : torch.nn.Module
        Full classifier network.
    family : str, optional
        ``"timm"`` uses the model's ``group_matcher(coarse=True)`` (stem / blocks.N / head);
        anything else (``"torchvision"``) uses the top-level children in order: leading layers
        (conv, bn) form the stem, ``features.N`` / ``blocks.N`` or ``layer1..4`` are one stage each,
        the last child with parameters is the head. A model with ``group_matcher`` is treated as
        timm whatever ``family`` says.

    Returns
    -------
    list of list of str
        Every parameter name appears in exactly one stage; no stage is empty.
    """
    if hasattr(model, "group_matcher"):
        groups = _timm_groups(model)
    else:
        groups = _children_groups(model)
    groups = [g for g in groups if g]
    names = [n for n, _ in model.named_parameters()]
    flat = [n for g in groups for n in g]
    if sorted(flat) != sorted(names) or len(groups) < 2:
        raise ConfigError(
            f"cannot split {type(model).__name__} into stages: got {len(groups)} groups covering "
            f"{len(set(flat))} of {len(names)} parameters"
        )
    return groups


def _timm_groups(model: nn.Module) -> list[list[str]]:
    from timm.models import group_parameters

    matcher: Any = model.group_matcher
    grouped = group_parameters(model, matcher(coarse=True))
    groups = [list(grouped[k]) for k in sorted(grouped)]
    head = set(_head_param_names(model))
    if head and not head.issubset(groups[-1]):
        # The classifier must be a stage of its own: pull it out of whatever group matched it.
        groups = [[n for n in g if n not in head] for g in groups] + [sorted(head)]
    return groups


def _head_param_names(model: nn.Module) -> list[str]:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return []
    head = get()
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _children_groups(model: nn.Module) -> list[list[str]]:
    units: list[tuple[str, nn.Module, bool]] = []  # (prefix, module, is_container)
    for name, child in model.named_children():
        if name in _EXPANDED_CONTAINERS and len(list(child.children())) > 1:
            units.extend((f"{name}.{n}", c, True) for n, c in child.named_children())
        else:
            units.append((name, child, len(list(child.children())) > 0))
    units = [u for u in units if any(True for _ in u[1].parameters())]
    if len(units) < 2:
        return [[n for n, _ in model.named_parameters()]]
    groups: list[list[str]] = []
    stem_open = True
    for prefix, module, is_container in units[:-1]:
        names = [f"{prefix}.{n}" for n, _ in module.named_parameters()]
        if stem_open and not is_container and groups:
            groups[0].extend(names)  # conv1 + bn1 of a resnet form one stem stage
        else:
            groups.append(names)
        stem_open = stem_open and not is_container
    prefix, module, _ = units[-1]
    groups.append([f"{prefix}.{n}" for n, _ in module.named_parameters()])
    return groups


def stage_names(n_stages: int) -> list[str]:
    """Readable names for :func:`stage_groups` output: ``stem``, ``stage1`` ..., ``head``."""
    return ["stem"] + [f"stage{i}" for i in range(1, n_stages - 1)] + ["head"]


def unfrozen_stages(
    strategy: str, n_stages: int, epoch: int, unfreeze_stages: int = 2, gradual_every: int = 1
) -> list[int]:
    """Indices of the stages trained at ``epoch`` (0-based) under ``strategy``.

    The head (index ``n_stages - 1``) is always trained. ``gradual`` trains the head alone for the
    first ``gradual_every`` epochs and adds one stage below every ``gradual_every`` epochs after.
    """
    n_backbone = n_stages - 1
    if strategy == "head":
        k = 0
    elif strategy == "partial":
        k = unfreeze_stages
    elif strategy == "full":
        k = n_backbone
    elif strategy == "gradual":
        k = epoch // max(1, gradual_every)
    else:
        raise ConfigError(f"strategy={strategy!r}; expected one of {', '.join(STRATEGIES)}")
    k = max(0, min(int(k), n_backbone))
    return list(range(n_stages - 1 - k, n_stages))


def apply_freeze(model: nn.Module, groups: Sequence[Sequence[str]], unfrozen: Sequence[int]) -> int:
    """Set ``requires_grad`` per stage; return the number of trainable parameter elements."""
    params = dict(model.named_parameters())
    keep = set(unfrozen)
    n_trainable = 0
    for i, names in enumerate(groups):
        for name in names:
            p = params[name]
            p.requires_grad_(i in keep)
            if i in keep:
                n_trainable += p.numel()
            else:
                p.grad = None
    return n_trainable


def set_bn_policy(model: nn.Module) -> int:
    """Put BatchNorm layers whose parameters are all frozen in eval mode; return how many.

    Call after ``model.train()``. A BN layer without affine parameters follows its parent module.
    """
    modules = dict(model.named_modules())
    n = 0
    for name, m in modules.items():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        owner = m
        if m.weight is None and "." in name:
            owner = modules[name.rsplit(".", 1)[0]]
        params = list(owner.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
            n += 1
    return n


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    groups: Sequence[Sequence[str]],
    lr: float,
    backbone_lr_factor: float,
    weight_decay: float,
    stage_lr_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer param groups, one (decay, no-decay) pair per stage.

    Each group dict carries ``stage`` (its readable name) and ``lr`` as described in the module
    docstring; empty groups are left out.
    """
    params = dict(model.named_parameters())
    names = stage_names(len(groups))
    last = len(groups) - 1
    out: list[dict[str, Any]] = []
    for i, stage in enumerate(groups):
        distance = last - i
        if distance == 0:
            stage_lr = lr
        else:
            stage_lr = lr * backbone_lr_factor * stage_lr_decay ** (distance - 1)
        decay = [params[n] for n in stage if not _no_decay(n, params[n])]
        no_decay = [params[n] for n in stage if _no_decay(n, params[n])]
        for plist, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if plist:
                out.append({"params": plist, "lr": stage_lr, "weight_decay": wd, "stage": names[i]})
    return out
