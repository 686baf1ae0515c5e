"""The parts of GPU decoding that run anywhere: which files nvjpeg may take, and the guards."""

from __future__ import annotations

import io
import multiprocessing
import time

import numpy as np
import pytest
import torch
from PIL import Image

from featurepipe.embed import embed, key_parts
from featurepipe.exceptions import ConfigError
from featurepipe.gpu_decode import check_decoder, nvjpeg_eligible, resize_grouped
from tests.helpers import TINY, write_odd_images


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **save)
    return buf.getvalue()


def test_only_intact_upright_rgb_or_grey_jpegs_go_to_nvjpeg(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    assert nvjpeg_eligible(_jpeg(rgb), max_pixels=10_000)
    assert nvjpeg_eligible(_jpeg(rgb.convert("L")), max_pixels=10_000)
    assert nvjpeg_eligible(_jpeg(rgb, progressive=True), max_pixels=10_000)
    assert not nvjpeg_eligible(_jpeg(rgb), max_pixels=40 * 60 - 1)  # the policy's pixel limit
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: Pillow's path applies it
    assert not nvjpeg_eligible(_jpeg(rgb, exif=exif), max_pixels=10_000)
    whole = _jpeg(rgb)
    assert not nvjpeg_eligible(whole[: len(whole) // 2], max_pixels=10_000)  # truncated
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    assert not nvjpeg_eligible(png.getvalue(), max_pixels=10_000)
    write_odd_images(tmp_path)
    assert not nvjpeg_eligible((tmp_path / "cmyk.jpg").read_bytes(), max_pixels=10_000)
    assert not nvjpeg_eligible(b"", max_pixels=10_000)


def test_nvjpeg_needs_cuda_and_a_known_name(tmp_path):
    check_decoder("pil", torch.device("cpu"))
    with pytest.raises(ConfigError, match="CUDA GPU; the device is cpu"):
        check_decoder("nvjpeg", torch.device("cpu"))
    with pytest.raises(ConfigError, match="decoder='turbo'"):
        check_decoder("turbo", torch.device("cuda"))
    with pytest.raises(ConfigError, match="CUDA"):
        embed(np.zeros((2, 8, 8), np.uint8), tmp_path / "s.h5", device="cpu",
              decoder="nvjpeg", **TINY)


def test_decoder_enters_the_key_only_when_not_pillow():
    from featurepipe.backbones import describe_backbone, resolve_spec
    from featurepipe.decode import DecodePolicy

    desc = describe_backbone(resolve_spec(TINY["backbone"], weights="random", image_size=32))
    default = key_parts(desc, DecodePolicy(), "fp32", "float16")
    assert "decoder" not in default  # stores made before the option keep their keys
    assert default == key_parts(desc, DecodePolicy(), "fp32", "float16", "pil")
    assert key_parts(desc, DecodePolicy(), "fp32", "float16", "nvjpeg")["decoder"] == "nvjpeg"


def test_grouped_resize_equals_one_image_at_a_time():
    from torchvision.transforms import v2

    rng = np.random.default_rng(1)
    shapes = [(3, 375, 500), (3, 500, 375), (3, 375, 500), (3, 90, 120), (3, 375, 500)]
    images = [torch.from_numpy(rng.integers(0, 256, s, dtype=np.uint8)) for s in shapes]
    resize = v2.Compose([v2.Resize(64, interpolation=v2.InterpolationMode.BICUBIC,
                                   antialias=True), v2.CenterCrop(56)])
    got = resize_grouped(images, resize)
    assert len(got) == len(images)
    for im, crop in zip(images, got, strict=True):
        assert crop.dtype == torch.uint8 and crop.shape == (3, 56, 56)
        torch.testing.assert_close(crop, resize(im), rtol=0, atol=0)


# ----------------------------------------------------------------- the loader, run on the CPU
# torchvision decodes JPEG batches on the CPU too, so the loader's routing, ordering, fallback
# and thread hand-off are tested here; tests/test_gpu.py runs it on CUDA.


def _loader(root, batch: int = 4, workers: int = 0):
    from featurepipe.backbones import PreprocessSpec
    from featurepipe.decode import DecodePolicy
    from featurepipe.embedding.pixels import Pixels
    from featurepipe.gpu_decode import GPUDecodeLoader
    from featurepipe.sources import open_source

    pre = PreprocessSpec((32, 32), 36, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
    source = open_source(root)
    flat = list(range(len(source)))
    policy = DecodePolicy()
    dataset = Pixels(source, pre.decode_transform(), policy, pre.input_size, pre.resize_size,
                     fill_dtype=torch.uint8)
    batches = [flat[s:s + batch] for s in range(0, len(flat), batch)]
    loader = GPUDecodeLoader(dataset, flat, source.paths, batches, pre, policy.max_pixels,
                             torch.device("cpu"), workers=workers)
    return loader, dataset, source


def test_loader_routes_jpegs_and_keeps_every_other_file_on_pillow(mixed_folder):
    root, expected = mixed_folder
    loader, dataset, source = _loader(root, workers=2)  # worker processes, shared memory
    seen = []
    for idx, x, reasons in loader:
        assert x.dtype == torch.uint8 and x.shape == (len(idx), 3, 32, 32)
        for k, i in enumerate(idx):
            _, cpu_crop, cpu_reason = dataset[i]
            assert reasons[k] == cpu_reason  # same skip reasons as the CPU decoder
            name = source.samples[i].id
            if name.endswith(".jpg") and "img_" in name:  # good RGB JPEGs: decoded by the loader
                diff = (x[k].int() - cpu_crop.int()).abs().float()
                assert diff.max() <= 2 and diff.mean() < 0.5  # tensor vs Pillow resampling
            else:  # PNG, GIF, CMYK, broken files: Pillow's own crop (or the zero fill)
                torch.testing.assert_close(x[k], cpu_crop, rtol=0, atol=0)
            seen.append(i)
    assert seen == list(range(len(source)))  # every row once, in order
    n_jpeg = sum(1 for s in source.samples if s.id.endswith(".jpg") and "img_" in s.id)
    assert (loader.n_gpu, loader.n_cpu) == (n_jpeg, len(source) - n_jpeg)
    assert sorted(s.id for s, r in zip(source.samples, [dataset[i][2] for i in seen],
                                       strict=True) if r) == sorted(
        k for k, why in expected.items() if why)


def test_loader_shuts_its_worker_processes_down_when_the_consumer_stops_early(mixed_folder):
    root, _ = mixed_folder
    loader, _, _ = _loader(root, batch=2, workers=2)
    it = iter(loader)
    next(it)
    assert multiprocessing.active_children()  # the readers are running
    it.close()  # what a ``break`` or an exception in the forward pass does
    deadline = time.monotonic() + 60  # only how long a broken shutdown is waited for
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()
