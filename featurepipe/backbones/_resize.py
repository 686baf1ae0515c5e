"""The resize + centre crop of evaluation preprocessing, on torch tensors (imports torch)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

__all__ = ["ResizeCenterCrop"]


@lru_cache(maxsize=1)
def _native_aa_out_ops() -> dict[str, Any]:
    """ATen's antialiased uint8 resizes that write into a given tensor, by interpolation mode."""
    ops = {}
    names = {"bilinear": "_upsample_bilinear2d_aa", "bicubic": "_upsample_bicubic2d_aa"}
    for mode, name in names.items():
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and "out" in packet.overloads():
            ops[mode] = packet.out
    return ops


class ResizeCenterCrop:
    """``v2.Resize(resize_size)`` then ``v2.CenterCrop(crop_size)``, on uint8 tensors.

    A PIL image becomes a uint8 ``(3, H, W)`` tensor first, so every path (engines,
    ``eval_transform``, fine-tuning, prediction) resizes the same tensor with the same kernel and
    agrees bit for bit. Bilinear and bicubic resizes of CPU uint8 tensors always call torch's
    native uint8 antialiased kernel, which gives the same bits on every CPU (AVX512, AVX2, the
    generic kernel of ARM and older x86: tested with ``ATEN_CPU_CAPABILITY``); torchvision's own
    ``Resize`` takes a float detour for bilinear on CPUs without AVX2, whose rounding differs.
    It is also several times cheaper than Pillow's resize of the crop box
    (``docs/performance.md``). Other tensors (float, CUDA) and other filters take torchvision's
    ``Resize``. Picklable.

    ``out``: a ``(3, h, w)`` uint8 tensor to write the crop into, such as one slot of a batch
    (:meth:`featurepipe.embedding.pixels.Pixels.decode_into`): one copy from the resized image
    into the batch, instead of a crop tensor that is then copied again by ``torch.stack``.
    """

    def __init__(self, resize_size: int | tuple[int, ...], crop_size: tuple[int, int],
                 interpolation: Any) -> None:
        from torchvision.transforms import InterpolationMode

        self.resize_size, self.crop_size = resize_size, tuple(crop_size)
        self.interpolation = interpolation
        native = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
        self._native_mode = interpolation.value if interpolation in native else None

    def __call__(self, img: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        from torchvision.transforms import v2

        if not isinstance(img, torch.Tensor):
            img = v2.functional.pil_to_tensor(img)
        mode = self._native_mode
        native = img.dtype == torch.uint8 and img.device.type == "cpu" and img.ndim in (3, 4)
        if native and mode is not None:
            batch = img if img.ndim == 4 else img[None]
            resized = self._resize_native(batch, self._resized_size(img.shape[-2:]), mode)
            img = resized if img.ndim == 4 else resized[0]
        else:
            native = False
            img = v2.functional.resize(img, self.resize_size, self.interpolation, antialias=True)
        crop = self._center_crop(img)
        if out is not None:
            return out.copy_(crop)
        if native and crop.ndim == 3:
            # Channels-last memory, the layout batches are stacked in: this thread's copy, not a
            # transposing stack in the thread that runs the forward pass.
            crop = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return crop

    def _resize_native(self, batch: torch.Tensor, size: tuple[int, int], mode: str
                       ) -> torch.Tensor:
        """torch's uint8 antialiased resize, into a channels-last tensor.

        ``interpolate`` returns a planar (NCHW) image, which its AVX kernel fills by unpacking
        its interleaved result, and the crop is then a transposing copy. Given a channels-last
        output, the kernel writes its result as it is and the crop copies whole rows: faster
        (``docs/performance.md``), the same bits.
        """
        n, c = batch.shape[:2]
        op = _native_aa_out_ops().get(mode)
        # Only from channels-last input (decoders give that): torch 2.14's AVX kernel fails an
        # internal assert when it has to unpack planar RGB into a channels-last output.
        if op is None or c != 3 or not batch.is_contiguous(memory_format=torch.channels_last):
            return torch.nn.functional.interpolate(batch, size=size, mode=mode,
                                                   align_corners=False, antialias=True)
        out = torch.empty((n, size[0], size[1], c), dtype=batch.dtype).permute(0, 3, 1, 2)
        return op(batch, list(size), False, None, None, out=out)

    def _center_crop(self, img: torch.Tensor) -> torch.Tensor:
        """``v2.functional.center_crop``: a view when the crop fits (the same offsets, without
        the dispatch of torchvision's kernel registry), its zero padding when it does not."""
        height, width = img.shape[-2:]
        ch, cw = self.crop_size
        if ch > height or cw > width:
            from torchvision.transforms import v2

            return v2.functional.center_crop(img, list(self.crop_size))
        top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
        return img[..., top:top + ch, left:left + cw]

    def _resized_size(self, size: Any) -> tuple[int, int]:
        """``(height, width)`` after the resize, computed as torchvision's ``Resize`` does."""
        h, w = int(size[0]), int(size[1])
        target = self.resize_size
        if isinstance(target, (tuple, list)):
            if len(target) == 2:
                return int(target[0]), int(target[1])
            target = target[0]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = int(target), int(int(target) * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
