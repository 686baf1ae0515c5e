"""The one place a sample becomes a uint8 crop (or a reason it cannot).

Every runner decodes through :class:`Pixels`: the source's decode policy, the backbone's own
transform, and one rule for bad files (a zero crop plus a reason, never an exception). Crops are
uint8 and are normalised inside the model (:class:`featurepipe.embedding.forward.NormalizedInput`),
bit-equal to the per-image float ``eval_transform``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from featurepipe.backbones import Backbone, PreprocessSpec, ResizeCenterCrop
from featurepipe.decode import DecodePolicy
from featurepipe.exceptions import DecodeError
from featurepipe.sources import ImageSource

__all__ = ["Pixels", "collate", "empty_batch"]


def empty_batch(n: int, input_size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``(n, 3, H, W)`` batch laid out channels-last (the layout the forward
    pass runs in), for decoders to write crops into."""
    return torch.empty((n, *input_size, 3), dtype=dtype).permute(0, 3, 1, 2)


class Pixels(Dataset):
    """Sample ``i`` of ``source`` as ``(i, crop, reason)``; a bad file is zeros plus a reason.

    Indexed by source index. Samples are decoded to uint8 tensors
    (:meth:`ImageSource.load_tensor`: plain JPEGs skip Pillow), so ``transform`` takes tensors.
    The zero crop has ``fill_dtype`` so that it stacks with the good ones (uint8 for
    :meth:`~PreprocessSpec.decode_transform`, float32 for ``eval_transform``).
    """

    def __init__(self, source: ImageSource, transform: Callable, policy: DecodePolicy,
                 input_size: tuple[int, int], target_size: int | None,
                 fill_dtype: torch.dtype = torch.uint8) -> None:
        self.source = source
        self.transform = transform
        self.policy = policy
        self.input_size = input_size
        self.target_size = target_size
        self.fill_dtype = fill_dtype

    @classmethod
    def for_backbone(cls, source: ImageSource, backbone: Backbone | PreprocessSpec,
                     policy: DecodePolicy) -> Pixels:
        """uint8 crops made with the backbone's own preprocessing (what every runner uses)."""
        pre = backbone if isinstance(backbone, PreprocessSpec) else backbone.preprocess
        return cls(source, pre.decode_transform(), policy, pre.input_size,
                   pre.resize_size if policy.reduce_on_load else None, fill_dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        crop, reason = self._guarded(i, self.transform)
        if crop is None:
            crop = torch.zeros(3, *self.input_size, dtype=self.fill_dtype)
        return i, crop, reason

    def decode_into(self, i: int, out: torch.Tensor) -> tuple[int, str]:
        """``self[i]`` written into ``out``, a ``(3, H, W)`` slot of a batch: the index and
        the reason it failed ("" when it did not; the slot is then zeros)."""
        transform = self.transform
        if isinstance(transform, ResizeCenterCrop):
            _, reason = self._guarded(i, lambda image: transform(image, out=out))
        else:
            _, reason = self._guarded(i, lambda image: out.copy_(transform(image)))
        if reason:
            out.zero_()
        return i, reason

    def _guarded(self, i: int, finish: Callable[[Any], torch.Tensor]
                 ) -> tuple[torch.Tensor | None, str]:
        """Sample ``i`` decoded and passed to ``finish``; a failure of either becomes a reason."""
        try:
            image = self.source.load_tensor(i, self.policy, target_size=self.target_size)
            return finish(image), ""
        except DecodeError as exc:
            return None, exc.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must never kill a long run
            return None, f"failed: {type(exc).__name__}: {exc}"


def collate(batch: list[tuple[int, torch.Tensor, str]]
            ) -> tuple[list[int], torch.Tensor, list[str]]:
    """Stack into ``(B, 3, H, W)`` laid out channels_last, the layout the forward pass runs in.

    Decoded crops are HWC in memory already (:class:`ResizeCenterCrop`), so this is one copy.
    (Decode threads skip it: :meth:`Pixels.decode_into` writes into the batch.)
    """
    idx, tensors, reasons = zip(*batch, strict=True)
    x = torch.stack([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2)
    return list(idx), x.as_subclass(torch.Tensor), list(reasons)
