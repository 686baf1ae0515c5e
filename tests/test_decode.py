"""decode.py: every mode, format and failure a user's image folder can throw at us."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from featurepipe.decode import (
    DRAFT_GAP,
    EXTENSION_FORMATS,
    IMAGE_EXTENSIONS,
    DecodePolicy,
    array_to_image,
    decode_image,
    decode_image_tensor,
    is_plain_jpeg,
    read_jpeg_bytes,
    to_rgb,
)
from featurepipe.exceptions import ConfigError, DecodeError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def close(pixel, expected, tol=2):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def reason(path, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(path, **kwargs)
    assert info.value.path == str(path)
    return info.value.reason


def save(img: Image.Image, path: pathlib.Path, **kwargs) -> pathlib.Path:
    img.save(path, **kwargs)
    return path


# -- modes ---------------------------------------------------------------------------------


def test_rgb_jpeg(tmp_path):
    path = save(Image.new("RGB", (32, 16), RED), tmp_path / "red.jpg", quality=95)
    img = decode_image(path)
    assert img.mode == "RGB" and img.size == (32, 16)
    assert close(img.getpixel((5, 5)), RED, tol=4)


def test_rgba_png_composited_on_white(tmp_path):
    path = save(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), tmp_path / "a.png")
    # alpha blend: 255 * 128/255 + 255 * 127/255 for red, 0 + 255 * 127/255 for green/blue
    assert close(decode_image(path).getpixel((0, 0)), (255, 127, 127), tol=1)
    black = decode_image(path, DecodePolicy(background=(0, 0, 0)))
    assert close(black.getpixel((0, 0)), (128, 0, 0), tol=1)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    path = save(img, tmp_path / "p.png", transparency=0)
    out = decode_image(path)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == RED


def test_la_l_and_1bit(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (0, 255))
    out = decode_image(save(la, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == (0, 0, 0)

    gray = decode_image(save(Image.new("L", (3, 3), 100), tmp_path / "l.png"))
    assert gray.getpixel((1, 1)) == (100, 100, 100)

    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    out = decode_image(save(bits, tmp_path / "b.png"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == WHITE


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
def test_16bit_scaled_by_range_not_clipped(tmp_path, suffix):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = decode_image(save(Image.fromarray(values), tmp_path / f"g16{suffix}"))
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"
    img = decode_image(path)
    r, g, b = img.getpixel((4, 4))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_float_and_int32_modes_via_to_rgb():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32))
    assert f.mode == "F"
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(5)] == [0, 128, 255, 255, 0]
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    assert [to_rgb(i32).getpixel((x, 0))[0] for x in range(2)] == [0, 255]
    big_endian = Image.frombytes("I;16B", (3, 1), bytes([0, 0, 128, 0, 255, 255]))
    assert [to_rgb(big_endian).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_ycbcr_and_rgb_passthrough():
    rgb = Image.new("RGB", (2, 2), RED)
    assert to_rgb(rgb) is rgb
    assert close(to_rgb(rgb.convert("YCbCr")).getpixel((0, 0)), RED, tol=3)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = decode_image(path)
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 2)), RED, tol=8)  # the left edge is now on top
    assert close(out.getpixel((10, 37)), BLUE, tol=8)
    assert decode_image(path, DecodePolicy(exif_transpose=False)).size == (40, 20)


def test_animated_gif_and_apng_use_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), RED), Image.new("RGB", (6, 6), BLUE)]
    gif = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    png = save(frames[0], tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    with Image.open(gif) as stored:
        assert stored.n_frames == 2
    assert close(decode_image(gif).getpixel((3, 3)), RED)
    assert close(decode_image(png).getpixel((3, 3)), RED)


def test_pathlike_and_file_closed(tmp_path):
    path = save(Image.new("RGB", (8, 8)), tmp_path / "x.png")
    decode_image(pathlib.Path(path))
    if os.path.isdir("/proc/self/fd"):
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        assert str(path) not in targets


# -- failures ------------------------------------------------------------------------------


def test_missing_empty_directory_and_not_an_image(tmp_path):
    assert reason(tmp_path / "nope.jpg") == "missing"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason(tmp_path / "empty.jpg") == "empty file"
    assert reason(tmp_path) == "not a regular file"
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    assert reason(tmp_path / "text.jpg") == "not an image"


def test_decode_error_is_oserror(tmp_path):
    with pytest.raises(OSError, match="missing"):
        decode_image(tmp_path / "nope.png")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated(tmp_path, suffix, keep):
    rng = np.random.default_rng(0)
    full = save(
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        tmp_path / f"full{suffix}",
    )
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert reason(cut) == "truncated"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_cut_inside_header_is_truncated(tmp_path, suffix):
    full = save(Image.new("RGB", (16, 16), RED), tmp_path / f"full{suffix}")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[:20])
    assert reason(cut) == "truncated"


def test_too_large_checked_before_decoding(tmp_path):
    path = save(Image.new("RGB", (20, 10)), tmp_path / "big.png")
    assert reason(path, policy=DecodePolicy(max_pixels=199)) == "too large (20 x 10 pixels > 199)"
    assert decode_image(path, DecodePolicy(max_pixels=200)).size == (20, 10)


def test_pil_decompression_bomb_handled(tmp_path, monkeypatch):
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; under
    # filterwarnings=error the warning must not escape, and the error becomes a DecodeError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warned = save(Image.new("RGB", (12, 12)), tmp_path / "warned.png")
    assert decode_image(warned).size == (12, 12)
    refused = save(Image.new("RGB", (20, 20)), tmp_path / "refused.png")
    assert reason(refused).startswith("too large (400 pixels > 200)")


def test_unsupported_format(tmp_path):
    path = save(Image.new("RGB", (8, 8)), tmp_path / "x.jpg")
    assert reason(path, policy=DecodePolicy(formats=("png",))) == "unsupported format JPEG"
    bmp = save(Image.new("RGB", (8, 8)), tmp_path / "x.tga")
    assert reason(bmp) == "unsupported format TGA"


# -- reduce on load ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> pathlib.Path:
    y, x = np.mgrid[0:1200, 0:1600]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.mark.parametrize("target", [64, 100, 150, 224, 300, 599, 600, 1200, 5000])
def test_reduce_on_load_keeps_shorter_side(big_jpeg, target):
    img = decode_image(big_jpeg, target_size=target)
    assert img.mode == "RGB"
    assert min(img.size) >= min(target * DRAFT_GAP, 1200)
    assert min(img.size) >= min(target, 1200)
    if target * DRAFT_GAP * 2 <= 1200:
        assert img.size[0] < 1600  # it did reduce
    assert img.size[0] * 3 == img.size[1] * 4  # aspect kept


def test_reduce_on_load_off_and_pairs(big_jpeg):
    assert decode_image(big_jpeg, DecodePolicy(reduce_on_load=False), target_size=64).size == (
        1600,
        1200,
    )
    assert min(decode_image(big_jpeg, target_size=(64, 100)).size) >= 100 * DRAFT_GAP
    with pytest.raises(ConfigError):
        decode_image(big_jpeg, target_size=0)


def test_reduce_on_load_ignored_for_png(tmp_path):
    path = save(Image.new("RGB", (400, 300)), tmp_path / "x.png")
    assert decode_image(path, target_size=32).size == (400, 300)


# -- arrays --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 1), (4, 5, 3)])
def test_array_shapes(shape):
    img = array_to_image(np.full(shape, 77, dtype=np.uint8))
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (77, 77, 77)


def test_array_rgba_composited():
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 255)
    img = array_to_image(arr)
    assert img.getpixel((0, 0)) == RED and img.getpixel((1, 1)) == WHITE


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0, 32768, 65535]], dtype=np.uint16), [0, 128, 255]),
        (np.array([[-128, 0, 127]], dtype=np.int8), [0, 128, 255]),
        (np.array([[False, True, True]]), [0, 255, 255]),
        (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),
        (np.array([[-1e-4, 0.25, 1.0004]], dtype=np.float64), [0, 64, 255]),
    ],
)
def test_array_dtypes_scaled(values, expected):
    img = array_to_image(values)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == expected


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.zeros((4, 5, 2), dtype=np.uint8), r"shape \(4, 5, 2\)"),
        (np.zeros((3, 4, 5), dtype=np.uint8), "channels first"),
        (np.zeros((2, 2), dtype=np.int64), "int64"),
        (np.full((2, 2), 200.0), r"\[0, 1\].*divide"),
        (np.full((2, 2), np.nan), r"\[0, 1\]"),
        (np.zeros((2, 2), dtype=np.complex64), "complex64"),
    ],
)
def test_array_refused(arr, match):
    with pytest.raises(ConfigError, match=match):
        array_to_image(arr)


# -- policy --------------------------------------------------------------------------------


def test_policy_to_dict_and_normalisation():
    policy = DecodePolicy(formats=["png", "JPEG", "png"], background=[0, 0, 0])
    d = policy.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["formats"] == ["JPEG", "PNG"] and d["background"] == [0, 0, 0]
    assert policy == DecodePolicy(formats=("JPEG", "PNG"), background=(0, 0, 0))
    assert hash(policy) == hash(DecodePolicy(formats=("PNG", "JPEG"), background=(0, 0, 0)))
    assert set(DecodePolicy().to_dict()) == {
        "background",
        "max_pixels",
        "exif_transpose",
        "formats",
        "reduce_on_load",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_pixels = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [{"background": (0, 0)}, {"background": (0, 0, 300)}, {"max_pixels": 0}, {"formats": "JPEG"}],
)
def test_policy_validation(kwargs):
    with pytest.raises(ConfigError):
        DecodePolicy(**kwargs)


def test_image_extensions_cover_default_formats():
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
    registered = Image.registered_extensions()
    assert {registered[e] for e in IMAGE_EXTENSIONS} <= set(DecodePolicy().formats)


# -- hostile files -------------------------------------------------------------------------


def _jpeg_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


@pytest.mark.timeout(60)
def test_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    assert reason(fifo) == "not a regular file"
    with pytest.raises(DecodeError, match="not a regular file"):
        decode_image_tensor(fifo)
    assert read_jpeg_bytes(fifo) is None


def test_symlink_loop_is_a_reason(tmp_path):
    os.symlink(tmp_path / "b.jpg", tmp_path / "a.jpg")
    os.symlink(tmp_path / "a.jpg", tmp_path / "b.jpg")
    assert reason(tmp_path / "a.jpg") == "symlink loop"


def test_extreme_aspect_ratio_is_refused_from_the_header(tmp_path):
    # Under the pixel limit, yet a resize of the short side to the crop size would need a
    # buffer hundreds of crops wide.
    wide = save(Image.new("RGB", (20_000, 10)), tmp_path / "wide.png")
    assert reason(wide) == "aspect ratio 20000:10 over the limit (100:1)"
    tall = save(Image.new("L", (3, 301)), tmp_path / "tall.png")
    assert reason(tall) == "aspect ratio 3:301 over the limit (100:1)"
    assert decode_image(save(Image.new("RGB", (1000, 10)), tmp_path / "ok.png")).size == (1000, 10)
    assert decode_image(wide, DecodePolicy(max_aspect_ratio=None)).size == (20_000, 10)
    jpeg = tmp_path / "wide.jpg"
    jpeg.write_bytes(_jpeg_bytes(np.zeros((8, 1600, 3), dtype=np.uint8)))
    assert not is_plain_jpeg(jpeg.read_bytes(), DecodePolicy())  # the fast path checks it too
    with pytest.raises(DecodeError, match="aspect ratio 1600:8 over the limit"):
        decode_image_tensor(jpeg)
    with pytest.raises(ConfigError, match="max_aspect_ratio"):
        DecodePolicy(max_aspect_ratio=0.5)


def test_default_policy_keys_stores_as_before_the_aspect_limit():
    # The store key hashes to_dict(): the default must stay byte-identical to older releases.
    assert json.dumps(DecodePolicy().to_dict(), sort_keys=True) == (
        '{"background": [255, 255, 255], "exif_transpose": true, "formats": ["BMP", "GIF", '
        '"ICO", "JPEG", "MPO", "PNG", "PPM", "TIFF", "WEBP"], "max_pixels": 64000000, '
        '"reduce_on_load": true}')
    assert DecodePolicy(max_aspect_ratio=20).to_dict()["max_aspect_ratio"] == 20.0
    assert DecodePolicy(max_aspect_ratio=None).to_dict()["max_aspect_ratio"] is None


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_jpeg_cut_short_and_given_an_end_marker_reads_truncated(tmp_path, mode, fraction):
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    data = _jpeg_bytes(arr if mode == "RGB" else arr[..., 0], quality=90)
    path = tmp_path / "cut.jpg"
    # libjpeg decodes this without an error, filling the rest of the image grey.
    path.write_bytes(data[: int(len(data) * fraction)] + b"\xff\xd9")
    assert reason(path) == "truncated"
    with pytest.raises(DecodeError, match="truncated"):
        decode_image_tensor(path)  # the torchvision fast path must not hide it either


def test_intact_jpeg_with_a_grey_corner_still_decodes(tmp_path):
    arr = np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    arr[-16:, -16:] = 128  # what a block without data decodes to: a suspect, not a cut
    path = tmp_path / "corner.jpg"
    path.write_bytes(_jpeg_bytes(arr, quality=95))
    pil = np.asarray(decode_image(path))
    assert pil.shape == (64, 80, 3)
    assert np.array_equal(decode_image_tensor(path).permute(1, 2, 0).numpy(), pil)


def _other_format(allowed: frozenset[str]) -> str:
    return "TIFF" if "TIFF" not in allowed else "PNG"


@pytest.mark.parametrize("ext", sorted(EXTENSION_FORMATS))
def test_content_must_match_the_extension(tmp_path, ext):
    fmt = _other_format(EXTENSION_FORMATS[ext])
    path = save(Image.new("RGB", (8, 8), RED), tmp_path / f"x{ext}", format=fmt)
    assert reason(path) == f"content is {fmt}, extension says {ext[1:].upper()}"
    with pytest.raises(DecodeError, match=f"content is {fmt}"):
        decode_image_tensor(path)


def test_unknown_extension_is_not_checked(tmp_path):
    path = save(Image.new("RGB", (8, 8), RED), tmp_path / "x.data", format="PNG")
    assert decode_image(path).getpixel((0, 0)) == RED
