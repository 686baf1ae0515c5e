"""JPEG decoding on the GPU (nvjpeg through ``torchvision.io.decode_jpeg(device="cuda")``).

On a GPU machine the forward pass outruns CPU decoding by an order of magnitude, and nvjpeg
decodes JPEGs about as fast as the forward pass runs (measured in
``benchmarks/results/decode_probe-gpu.md`` and ``benchmarks/results/nvjpeg_probe-gpu.md``;
torchvision uses nvjpeg's hardware backend for baseline JPEGs where the GPU has JPEG engines,
as the H100 does). So with
``decoder="nvjpeg"`` DataLoader workers only read the files and vet their headers;
whole batches are decoded on the GPU with one call and resized and cropped there with
torchvision's ``Resize`` + ``CenterCrop`` (what ``ResizeCenterCrop`` does with tensors; on
the CPU it calls torch's uint8 kernel, on the GPU torchvision goes through float).

Only plain files nvjpeg handles exactly like Pillow go this way: a baseline or progressive
JPEG, RGB or grey, within ``max_pixels``, with no EXIF rotation and intact (ends with the EOI
marker). Everything else -- other formats, CMYK, rotated phone photos, truncated or broken
files, arrays -- goes through the CPU decoder in the same batch, so skip reasons and the
decode policy are exactly those of the CPU path. The pixels differ slightly from Pillow's
(another IDCT and resampling kernel), so the decoder is part of the store key.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DECODERS", "EncodedBatch", "GPUDecodeLoader", "check_decoder", "nvjpeg_eligible",
           "resize_grouped"]

DECODERS = ("pil", "nvjpeg")


def check_decoder(decoder: str, device: torch.device) -> None:
    """``pil`` anywhere; ``nvjpeg`` only on CUDA (one clear line otherwise)."""
    from featurepipe.exceptions import ConfigError

    if decoder not in DECODERS:
        raise ConfigError(f"decoder={decoder!r}; expected one of {', '.join(DECODERS)}")
    if decoder == "nvjpeg" and device.type != "cuda":
        raise ConfigError(f"decoder='nvjpeg' decodes on a CUDA GPU; the device is {device} "
                          "(use decoder='pil', or --device cuda on a machine with a GPU)")


def nvjpeg_eligible(data: bytes | bytearray, max_pixels: int) -> bool:
    """True when nvjpeg gives what Pillow would: an intact RGB/grey JPEG, upright, not too big
    (:func:`featurepipe.decode.is_plain_jpeg`; only the header is parsed)."""
    from featurepipe.decode import is_plain_jpeg

    return is_plain_jpeg(data, _policy(max_pixels))


@lru_cache(maxsize=4)
def _policy(max_pixels: int) -> Any:
    """One DecodePolicy per limit, not a freshly validated one per file."""
    from featurepipe.decode import DecodePolicy

    return DecodePolicy(max_pixels=max_pixels)


def resize_grouped(images: Sequence[torch.Tensor], resize: Any) -> list[torch.Tensor]:
    """``[resize(im) for im in images]``, with one call per group of equal shapes.

    A resize is a handful of kernel launches plus Python dispatch; per image that host work
    outweighs the arithmetic, so images of one size (most datasets have few sizes) are resized as
    one batch. The result equals resizing each image alone (tested).
    """
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(k)
    for positions in groups.values():
        batch = resize(torch.stack([images[k] for k in positions]))
        for k, crop in zip(positions, batch.unbind(0), strict=True):
            out[k] = crop
    return out  # type: ignore[return-value]


class _EncodedFiles(Dataset):
    """Per file, in a DataLoader worker: its bytes when nvjpeg may take it, else Pillow's crop.

    The per-image host work (reading, parsing the header, the odd file's CPU decode) is Python
    that holds the GIL; in worker processes it runs on every core without stalling the thread
    that feeds the GPU.
    """

    def __init__(self, dataset: Any, paths: Sequence[str] | None, max_pixels: int) -> None:
        self.dataset, self.paths, self.max_pixels = dataset, paths, max_pixels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pos: int) -> tuple[int, bytearray | None, torch.Tensor | None, str]:
        data = self._read(pos)
        if data is not None:
            return pos, data, None, ""
        _, crop, reason = self.dataset[pos]
        return pos, None, crop, reason

    def _read(self, pos: int) -> bytearray | None:
        if self.paths is None:
            return None
        from featurepipe.decode import read_jpeg_bytes

        # Other formats are not read here, only by the CPU decoder (an error is named there).
        data = read_jpeg_bytes(self.paths[pos])
        if data is None or not nvjpeg_eligible(data, self.max_pixels):
            return None
        return data


class EncodedBatch(NamedTuple):
    """One batch as it crosses from a worker: the JPEGs' bytes in one buffer (one shared-memory
    segment, not one per file), plus the crops Pillow made for every other file."""

    positions: list[int]
    jpeg_bytes: torch.Tensor  # uint8, the eligible files' bytes end to end
    jpeg_sizes: list[int]
    jpeg_slots: list[int]  # where in the batch each JPEG goes
    crops: torch.Tensor | None  # uint8 (n, 3, H, W): the files Pillow decoded
    crop_slots: list[int]
    reasons: list[str]


def _collate_encoded(items: list[tuple[int, bytearray | None, torch.Tensor | None, str]]
                     ) -> EncodedBatch:
    jpeg_slots = [k for k, item in enumerate(items) if item[1] is not None]
    crop_slots = [k for k, item in enumerate(items) if item[1] is None]
    blobs = [items[k][1] for k in jpeg_slots]
    joined = bytearray().join(blobs)  # type: ignore[arg-type]
    jpeg_bytes = (torch.frombuffer(joined, dtype=torch.uint8) if joined
                  else torch.zeros(0, dtype=torch.uint8))
    crops = torch.stack([items[k][2] for k in crop_slots]) if crop_slots else None  # type: ignore[misc]
    return EncodedBatch([item[0] for item in items], jpeg_bytes,
                        [len(b) for b in blobs], jpeg_slots,  # type: ignore[arg-type]
                        crops, crop_slots, [item[3] for item in items])


class GPUDecodeLoader:
    """Yields ``(source indices, uint8 batch on the GPU (B, 3, H, W) channels_last, reasons)``.

    DataLoader worker processes read the files and vet their headers (:class:`_EncodedFiles`)
    ahead of time; each step decodes one batch's JPEGs with one nvjpeg call and resizes and
    crops them on the GPU. It all runs in the caller's thread: the engine keeps one forward pass
    in flight, so the GPU computes batch n while nvjpeg decodes batch n+1 (torchvision's
    decode releases the GIL: checked on the CPU decoder, the same op dispatch). A producer
    thread was slower (``benchmarks/results/nvjpeg_probe-gpu.md``): it and the thread
    launching the forward pass convoyed on the GIL.
    ``batches`` hold positions into ``indices`` (source rows), ``paths`` (their files, None for
    arrays) and ``dataset``, the engine's CPU :class:`~featurepipe.embedding.pixels.Pixels`
    over the same positions (the fallback decoder). ``workers=0`` reads in the caller's
    process (tests).
    """

    def __init__(self, dataset: Any, indices: Sequence[int], paths: Sequence[str] | None,
                 batches: Iterable[list[int]], preprocess: Any, max_pixels: int,
                 device: torch.device, workers: int = 8, timeout: float = 0) -> None:
        from featurepipe.backbones import ResizeCenterCrop

        self.dataset, self.indices, self.paths = dataset, list(indices), paths
        self.batches = batches
        self.device, self.workers = device, workers
        self.timeout = timeout  # seconds to wait for one batch from the workers (0: forever)
        self.max_pixels = max_pixels
        # On tensors this is torchvision's Resize + CenterCrop, batched or not.
        self.resize = ResizeCenterCrop(preprocess.resize_size, preprocess.input_size,
                                       preprocess.interpolation_mode)
        self.n_gpu = self.n_cpu = 0  # images decoded by each path (the tests read them)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        encoded = DataLoader(
            _EncodedFiles(self.dataset, self.paths, self.max_pixels),
            batch_sampler=self.batches, num_workers=self.workers,
            collate_fn=_collate_encoded, prefetch_factor=4 if self.workers else None,
            timeout=self.timeout if self.workers else 0)
        if self.device.type != "cuda":  # tests: torchvision decodes JPEG batches on the CPU too
            for batch in encoded:
                yield self._batch(batch)
            return
        # nvjpeg writes its output on a stream of its own, into memory the caching allocator
        # hands out for the *current* stream. On the stream of the forward pass that memory may
        # still be read by queued work (the last batch's resize, behind the forward pass): a
        # race, measured as corrupted features. So decoding and resizing get a side stream, and
        # the host waits for that stream's few pending kernels before each decode.
        side = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        for batch in encoded:
            side.synchronize()
            with torch.cuda.stream(side):
                idx, x, reasons = self._batch(batch)
            main.wait_stream(side)
            x.record_stream(main)
            yield idx, x, reasons

    # ----------------------------------------------------------------- one batch

    def _batch(self, batch: EncodedBatch) -> tuple[list[int], torch.Tensor, list[str]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        crops: list[torch.Tensor | None] = [None] * len(batch.positions)
        reasons = list(batch.reasons)
        if batch.jpeg_slots:
            encoded = list(batch.jpeg_bytes.split(batch.jpeg_sizes))
            try:
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad stream fails the whole call: go one by one
                images = [self._decode_one(e) for e in encoded]
            decoded = [(k, img) for k, img in zip(batch.jpeg_slots, images, strict=True)
                       if img is not None]
            resized = resize_grouped([img for _, img in decoded], self.resize)
            for (k, _), crop in zip(decoded, resized, strict=True):
                crops[k] = crop
        if batch.crops is not None:
            pillow = batch.crops.to(self.device, non_blocking=True)
            for k, crop in zip(batch.crop_slots, pillow.unbind(0), strict=True):
                crops[k] = crop
        missed = [k for k, c in enumerate(crops) if c is None]  # nvjpeg refused it after all
        for k in missed:
            _, tensor, reasons[k] = self.dataset[batch.positions[k]]
            crops[k] = tensor.to(self.device)
        n_cpu = len(batch.crop_slots) + len(missed)
        self.n_gpu += len(crops) - n_cpu
        self.n_cpu += n_cpu
        x = torch.stack(crops).contiguous(memory_format=torch.channels_last)  # type: ignore[arg-type]
        return [self.indices[p] for p in batch.positions], x, reasons

    def _decode_one(self, encoded: torch.Tensor) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None
