"""Where does the nvjpeg path's time go? Whole runs (marginal rate), the loader alone, its
DataLoader alone, decode + resize alone, and the forward pass alone, on one GPU machine.

``python -m benchmarks.nvjpeg_probe [FOLDER]`` (default /tmp/imgs; 16,384 photos are written
there if missing). Prints one line per measurement; results: ``results/nvjpeg_probe-gpu.md``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

import featurepipe.embed as engine
from benchmarks.common import make_photo_folder
from featurepipe.backbones import load_backbone, resolve_spec
from featurepipe.decode import DecodePolicy
from featurepipe.embedding.pixels import Pixels
from featurepipe.gpu_decode import GPUDecodeLoader, _collate_encoded, _EncodedFiles
from featurepipe.sources import open_source

BATCH = 256


def whole_run(paths: list[str], decoder: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine.embed(paths, Path(tmp) / "s.h5", "efficientnet_lite0", batch_size=BATCH,
                     decoder=decoder, progress=False, compile="off")
        return time.perf_counter() - t0


def main() -> None:
    root = make_photo_folder(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/imgs"), 16384)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    dev = torch.device("cuda")
    whole_run(paths[:512], "nvjpeg")  # cuDNN and nvjpeg start-up
    for decoder in ("nvjpeg", "pil"):
        a, b = whole_run(paths[:4096], decoder), whole_run(paths, decoder)
        print(f"{decoder}: 4096 in {a:.2f}s, {len(paths)} in {b:.2f}s, "
              f"marginal {(len(paths) - 4096) / (b - a):.0f} img/s", flush=True)

    bb = load_backbone(resolve_spec("efficientnet_lite0"))
    pre, policy, src = bb.preprocess, DecodePolicy(), open_source(paths)
    flat = list(range(len(src)))
    ds = Pixels.for_backbone(src, bb, policy)
    batches = [flat[s:s + BATCH] for s in range(0, len(flat), BATCH)]
    for workers in (15, 8, 4):
        loader = GPUDecodeLoader(ds, flat, src.paths, batches, pre, policy.max_pixels, dev,
                                 workers=workers)
        t0, n = time.perf_counter(), 0
        for idx, _, _ in loader:
            n += len(idx)
        torch.cuda.synchronize()
        print(f"loader alone, {workers} workers: {n / (time.perf_counter() - t0):.0f} img/s",
              flush=True)
    files = _EncodedFiles(ds, src.paths, policy.max_pixels)
    t0, n = time.perf_counter(), 0
    for batch in DataLoader(files, batch_sampler=batches, num_workers=15,
                            collate_fn=_collate_encoded, prefetch_factor=4):
        n += len(batch.positions)
    print(f"encoded DataLoader alone (15 workers): {n / (time.perf_counter() - t0):.0f} img/s")

    encoded = list(DataLoader(files, batch_sampler=batches[:32], num_workers=8,
                              collate_fn=_collate_encoded))
    loader = GPUDecodeLoader(ds, flat, src.paths, batches, pre, policy.max_pixels, dev, workers=0)
    loader._batch(encoded[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in encoded:
        loader._batch(batch)
    torch.cuda.synchronize()
    print(f"decode + resize + stack alone: {32 * BATCH / (time.perf_counter() - t0):.0f} img/s")
    t0 = time.perf_counter()
    for batch in encoded:
        decode_jpeg(list(batch.jpeg_bytes.split(batch.jpeg_sizes)), device=dev,
                    mode=ImageReadMode.RGB)
    torch.cuda.synchronize()
    print(f"nvjpeg decode alone: {32 * BATCH / (time.perf_counter() - t0):.0f} img/s")

    model = engine.prepare_model(bb, dev)
    x = torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        engine.start_forward(model, x, dev, "bf16")()
    t0, pending = time.perf_counter(), None
    for _ in range(32):
        launched = engine.start_forward(model, x, dev, "bf16")
        if pending is not None:
            pending()
        pending = launched
    pending()  # type: ignore[misc]
    print(f"forward, one batch in flight: {32 * BATCH / (time.perf_counter() - t0):.0f} img/s")
    t0 = time.perf_counter()
    for _ in range(32):
        engine.start_forward(model, x, dev, "bf16")()
    print(f"forward, waiting on each batch: {32 * BATCH / (time.perf_counter() - t0):.0f} img/s")


if __name__ == "__main__":
    main()
