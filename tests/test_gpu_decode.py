"""The parts of GPU decoding that run anywhere: which files nvjpeg may take, and the guards."""

from __future__ import annotations

import io

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
