"""JPEG decoding on the GPU (nvjpeg through ``torchvision.io.decode_jpeg(device="cuda")``).

On a GPU machine the forward pass outruns CPU decoding by an order of magnitude: measured on an
H100 with 16 cores (``benchmarks/results/throughput-gpu.md``), Pillow decode + resize of 500x375
JPEGs in 15 processes gave ~2,000 img/s while the lite0 forward pass runs at ~19,000. nvjpeg
decodes the same files at ~19,000 img/s, so ``decoder="nvjpeg"`` reads the bytes in threads,
decodes whole batches on the GPU, and resizes and crops there with torchvision's ``Resize`` +
``CenterCrop`` (what ``ResizeCenterCrop`` does with tensors; on the CPU it resizes the crop box
of a PIL image instead).

Only plain files nvjpeg handles exactly like Pillow go this way: a baseline or progressive
JPEG, RGB or grey, within ``max_pixels``, with no EXIF rotation and intact (ends with the EOI
marker). Everything else -- other formats, CMYK, rotated phone photos, truncated or broken
files, arrays -- goes through the CPU decoder in the same batch, so skip reasons and the
decode policy are exactly those of the CPU path. The pixels differ slightly from Pillow's
(another IDCT and resampling kernel), so the decoder is part of the store key.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["DECODERS", "GPUDecodeLoader", "check_decoder", "nvjpeg_eligible", "resize_grouped"]

DECODERS = ("pil", "nvjpeg")
_SOI, _EOI = b"\xff\xd8\xff", b"\xff\xd9"


def check_decoder(decoder: str, device: torch.device) -> None:
    """``pil`` anywhere; ``nvjpeg`` only on CUDA (one clear line otherwise)."""
    from featurepipe.exceptions import ConfigError

    if decoder not in DECODERS:
        raise ConfigError(f"decoder={decoder!r}; expected one of {', '.join(DECODERS)}")
    if decoder == "nvjpeg" and device.type != "cuda":
        raise ConfigError(f"decoder='nvjpeg' decodes on a CUDA GPU; the device is {device} "
                          "(use decoder='pil', or --device cuda on a machine with a GPU)")


def nvjpeg_eligible(data: bytes, max_pixels: int) -> bool:
    """True when nvjpeg gives what Pillow would: an intact RGB/grey JPEG, upright, not too big.

    Only the header is parsed (Pillow reads no pixel data here).
    """
    if not data.startswith(_SOI) or not data.rstrip(b"\x00\r\n ").endswith(_EOI):
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            if img.size[0] * img.size[1] > max_pixels:
                return False
            return img.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001 - anything odd goes to the CPU decoder, which names it
        return False


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


class GPUDecodeLoader:
    """Yields ``(source indices, uint8 batch on the GPU (B, 3, H, W) channels_last, reasons)``.

    A producer thread reads, decodes and resizes the next batches on its own CUDA stream while
    the caller runs the forward pass of the current one. ``batches`` hold positions into
    ``indices`` (source rows), ``paths`` (their files, None for arrays) and ``dataset``, the
    engine's CPU ``_SourceDataset`` over the same positions (the fallback decoder).
    """

    def __init__(self, dataset: Any, indices: Sequence[int], paths: Sequence[str] | None,
                 batches: Iterable[list[int]], preprocess: Any, max_pixels: int,
                 device: torch.device, threads: int = 8, prefetch: int = 3) -> None:
        from featurepipe.backbones._spec import ResizeCenterCrop

        self.dataset, self.indices, self.paths = dataset, list(indices), paths
        self.batches = batches
        self.device, self.threads, self.prefetch = device, threads, prefetch
        self.max_pixels = max_pixels
        # On tensors this is torchvision's Resize + CenterCrop, batched or not.
        self.resize = ResizeCenterCrop(preprocess.resize_size, preprocess.input_size,
                                       preprocess.interpolation_mode)
        self.n_gpu = self.n_cpu = 0  # images decoded by each path (the tests read them)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        # On a CPU device (tests: torchvision decodes JPEG batches there too) no stream is needed.
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def produce() -> None:
            try:
                pool = ThreadPoolExecutor(self.threads, thread_name_prefix="featurepipe-read")
                with pool, (torch.cuda.stream(stream) if cuda else contextlib.nullcontext()):
                    for batch in self.batches:
                        if stop.is_set():
                            return
                        item = self._batch(batch, pool)
                        done = torch.cuda.Event() if cuda else None
                        if done is not None:
                            done.record(stream)
                        q.put((item, done))
                q.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                q.put(exc)

        worker = threading.Thread(target=produce, name="featurepipe-gpu-decode", daemon=True)
        worker.start()
        try:
            while (got := q.get()) is not None:
                if isinstance(got, BaseException):
                    raise got
                (idx, x, reasons), done = got
                if done is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(done)
                    x.record_stream(current)
                yield idx, x, reasons
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            worker.join()

    # ----------------------------------------------------------------- one batch

    def _read(self, pos: int) -> bytes | None:
        """The file's bytes when nvjpeg may take it, else None (the CPU decoder will)."""
        if self.paths is None:
            return None
        try:
            with open(self.paths[pos], "rb") as fh:
                data = fh.read()
        except OSError:
            return None
        return data if nvjpeg_eligible(data, self.max_pixels) else None

    def _batch(self, batch: list[int], pool: ThreadPoolExecutor
               ) -> tuple[list[int], torch.Tensor, list[str]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        datas = list(pool.map(self._read, batch))
        gpu_pos = [k for k, d in enumerate(datas) if d is not None]
        crops: list[torch.Tensor | None] = [None] * len(batch)
        if gpu_pos:
            encoded = [torch.frombuffer(bytearray(datas[k]), dtype=torch.uint8)  # type: ignore[arg-type]
                       for k in gpu_pos]
            try:
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                images = [self._decode_one(e) for e in encoded]
            decoded = [(k, img) for k, img in zip(gpu_pos, images, strict=True)
                       if img is not None]
            resized = resize_grouped([img for _, img in decoded], self.resize)
            for (k, _), crop in zip(decoded, resized, strict=True):
                crops[k] = crop
        reasons = [""] * len(batch)
        cpu_pos = [k for k, c in enumerate(crops) if c is None]
        if cpu_pos:
            for k, (_, tensor, reason) in zip(
                    cpu_pos, pool.map(self.dataset.__getitem__, [batch[k] for k in cpu_pos]),
                    strict=True):
                crops[k], reasons[k] = tensor.to(self.device, non_blocking=True), reason
        self.n_gpu += len(batch) - len(cpu_pos)
        self.n_cpu += len(cpu_pos)
        x = torch.stack(crops).contiguous(memory_format=torch.channels_last)  # type: ignore[arg-type]
        return [self.indices[p] for p in batch], x, reasons

    def _decode_one(self, encoded: torch.Tensor) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None


def default_read_threads() -> int:
    """Threads reading files and parsing headers (I/O and GIL-free Pillow work)."""
    return max(2, min(16, os.cpu_count() or 1))
