"""decode_image_tensor: plain JPEGs skip Pillow, and every file still gets Pillow's exact pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import featurepipe.decode as decode_mod
from featurepipe.decode import DecodePolicy, decode_image, decode_image_tensor, is_plain_jpeg
from featurepipe.exceptions import DecodeError
from tests.helpers import write_odd_images

PHOTO = data.chelsea()  # 300 x 451 RGB: real textures exercise the IDCT and the upsampling


def _pillow_tensor(path: Path, policy: DecodePolicy, target: int | None) -> torch.Tensor:
    return torch.from_numpy(np.array(decode_image(path, policy, target))).permute(2, 0, 1)


@pytest.fixture
def counted_pillow(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every file that went through Pillow's decode_image."""
    calls: list[str] = []
    original = decode_mod.decode_image

    def spy(path, *args, **kwargs):
        calls.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(decode_mod, "decode_image", spy)
    return calls


PLAIN = {
    "420.jpg": dict(subsampling=2, quality=90),
    "422.jpg": dict(subsampling=1, quality=75),
    "444.jpg": dict(subsampling=0, quality=97),
    "progressive.jpg": dict(progressive=True, quality=85),
    "optimized.jpg": dict(optimize=True, quality=60),
    "restart.jpg": dict(quality=90, restart_marker_blocks=4),
}


@pytest.mark.filterwarnings("error")  # a warning would send the file to Pillow: counted below
@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("crop", [(0, 0, 451, 300), (3, 1, 336, 258)])  # odd sizes too
def test_plain_jpegs_decode_without_pillow_to_pillows_pixels(tmp_path, counted_pillow, name,
                                                             crop):
    path = tmp_path / name
    Image.fromarray(PHOTO).crop(crop).save(path, **PLAIN[name])
    policy = DecodePolicy()
    assert is_plain_jpeg(path.read_bytes(), policy, 256)
    got = decode_image_tensor(path, policy, 256)
    assert counted_pillow == []  # the fast path decoded it
    assert got.dtype == torch.uint8 and got.shape == (3, crop[3] - crop[1], crop[2] - crop[0])
    assert torch.equal(got, _pillow_tensor(path, policy, 256))


def test_grey_jpeg_becomes_three_equal_channels_like_pillow(tmp_path, counted_pillow):
    path = tmp_path / "grey.jpg"
    Image.fromarray(PHOTO).convert("L").save(path, quality=90)
    got = decode_image_tensor(path)
    assert counted_pillow == []
    assert torch.equal(got, _pillow_tensor(path, DecodePolicy(), None))
    assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])


def _rotated_jpeg(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(PHOTO).save(path, quality=90, exif=exif.tobytes())


def test_files_the_fast_path_cannot_match_go_through_pillow(tmp_path, counted_pillow):
    _rotated_jpeg(tmp_path / "rotated.jpg")
    Image.fromarray(PHOTO).convert("CMYK").save(tmp_path / "cmyk.jpg")
    big = Image.fromarray(PHOTO).resize((2400, 1600))
    big.save(tmp_path / "big.jpg", quality=90)  # decoded at 1/2 scale for a 256 target
    Image.fromarray(PHOTO).save(tmp_path / "photo.png")
    jpeg = io.BytesIO()
    Image.fromarray(PHOTO).save(jpeg, format="JPEG", quality=90)
    (tmp_path / "trailing.jpg").write_bytes(jpeg.getvalue() + b"garbage after the image")
    policy = DecodePolicy()
    for name in ("rotated.jpg", "cmyk.jpg", "big.jpg", "photo.png", "trailing.jpg"):
        path = tmp_path / name
        assert not is_plain_jpeg(path.read_bytes(), policy, 256), name
        got = decode_image_tensor(path, policy, 256)
        assert torch.equal(got, _pillow_tensor(path, policy, 256)), name
    assert counted_pillow == ["rotated.jpg", "cmyk.jpg", "big.jpg", "photo.png", "trailing.jpg"]
    rotated = decode_image_tensor(tmp_path / "rotated.jpg")
    assert rotated.shape == (3, 451, 300)  # the EXIF rotation was applied
    assert decode_image_tensor(tmp_path / "big.jpg", policy, 256).shape == (3, 800, 1200)
    # Without a target (or without reduce_on_load) the big JPEG is plain again: full scale.
    assert is_plain_jpeg((tmp_path / "big.jpg").read_bytes(), policy)
    assert decode_image_tensor(tmp_path / "big.jpg").shape == (3, 1600, 2400)


def test_policy_decides_what_counts_as_plain(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(PHOTO).save(path, quality=90)
    raw = path.read_bytes()
    assert is_plain_jpeg(raw, DecodePolicy())
    assert not is_plain_jpeg(raw, DecodePolicy(formats=("PNG",)))
    assert not is_plain_jpeg(raw, DecodePolicy(max_pixels=1000))
    with pytest.raises(DecodeError, match="too large"):
        decode_image_tensor(path, DecodePolicy(max_pixels=1000))
    with pytest.raises(DecodeError, match="unsupported format JPEG"):
        decode_image_tensor(path, DecodePolicy(formats=("PNG",)))
    _rotated_jpeg(tmp_path / "rotated.jpg")
    upright = DecodePolicy(exif_transpose=False)
    assert is_plain_jpeg((tmp_path / "rotated.jpg").read_bytes(), upright)
    assert decode_image_tensor(tmp_path / "rotated.jpg", upright).shape == (3, 300, 451)


def test_bad_files_get_the_same_reasons_as_pillow(tmp_path):
    expected = write_odd_images(tmp_path, seed=3)
    for name, reason in expected.items():
        path = tmp_path / name
        if reason is None:
            assert torch.equal(decode_image_tensor(path), _pillow_tensor(path, DecodePolicy(),
                                                                         None)), name
            continue
        with pytest.raises(DecodeError) as fast:
            decode_image_tensor(path)
        with pytest.raises(DecodeError) as slow:
            decode_image(path)
        assert fast.value.reason == slow.value.reason and fast.value.reason.startswith(reason)
        assert fast.value.path == str(path)
    with pytest.raises(DecodeError, match="missing"):
        decode_image_tensor(tmp_path / "nowhere.jpg")


def _pillow_says_plain(data: bytes, policy: DecodePolicy) -> bool:
    """The same question answered by Pillow's parser (what is_plain_jpeg replaced)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            return not policy.exif_transpose or img.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001
        return False


def _big_endian_exif(orientation: int) -> bytes:
    ifd = (1).to_bytes(2, "big") + (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big")
    ifd += (1).to_bytes(4, "big") + orientation.to_bytes(2, "big") + b"\0\0" + b"\0\0\0\0"
    return b"MM\0*" + (8).to_bytes(4, "big") + ifd


def _headers(tmp_path: Path) -> dict[str, tuple[bytes, bool]]:
    """JPEG files -> (bytes, plain?) covering what the marker scan must tell apart."""
    photo = Image.fromarray(PHOTO)
    out: dict[str, tuple[bytes, bool]] = {}

    def save(name: str, plain: bool, img: Image.Image = photo, **kw) -> None:
        buf = io.BytesIO()
        img.save(buf, format=kw.pop("format", "JPEG"), **kw)
        out[name] = (buf.getvalue(), plain)

    for name, kw in PLAIN.items():
        save(name, True, **kw)
    save("grey", True, photo.convert("L"))
    upright = Image.Exif()
    upright[0x0112] = 1
    upright[0x010F] = "camera maker"
    save("exif upright", True, exif=upright.tobytes())
    no_orientation = Image.Exif()
    no_orientation[0x0110] = "model"
    save("exif without orientation", True, exif=no_orientation.tobytes())
    for value in (3, 6, 8):
        rotated = Image.Exif()
        rotated[0x0112] = value
        save(f"exif orientation {value}", False, exif=rotated.tobytes())
    save("big-endian exif orientation 3", False, exif=b"Exif\0\0" + _big_endian_exif(3))
    save("big-endian exif orientation 1", True, exif=b"Exif\0\0" + _big_endian_exif(1))
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
           b'02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
           b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    save("xmp orientation", False, xmp=xmp)
    save("cmyk", False, photo.convert("CMYK"))
    save("mpo", False, format="MPO", save_all=True, append_images=[photo.rotate(90)])
    return out


def test_marker_scan_agrees_with_pillow(tmp_path):
    policy = DecodePolicy()
    for name, (raw, plain) in _headers(tmp_path).items():
        assert _pillow_says_plain(raw, policy) == plain, name  # the fixture itself
        assert is_plain_jpeg(raw, policy) == plain, name
        # Off-policy: with exif_transpose off, orientation no longer matters.
        relaxed = DecodePolicy(exif_transpose=False)
        assert is_plain_jpeg(raw, relaxed) == _pillow_says_plain(raw, relaxed), name


def test_marker_scan_refuses_what_it_cannot_read():
    buf = io.BytesIO()
    Image.fromarray(PHOTO).save(buf, format="JPEG")
    raw = buf.getvalue()
    policy = DecodePolicy()
    assert is_plain_jpeg(raw, policy)
    sof = raw.index(b"\xff\xc0")
    broken = {
        "12-bit": raw[:sof + 4] + b"\x0c" + raw[sof + 5:],
        "zero height": raw[:sof + 5] + b"\0\0" + raw[sof + 7:],
        "four components": raw[:sof + 9] + b"\x04" + raw[sof + 10:],
        "arithmetic coding": raw[:sof + 1] + b"\xc9" + raw[sof + 2:],
        "segment longer than the file": raw[:sof + 2] + b"\xff\xff" + raw[sof + 4:],
        "no frame": raw[:sof] + raw[sof + 2 + int.from_bytes(raw[sof + 2:sof + 4], "big"):],
        "garbage exif": raw[:2] + b"\xff\xe1\x00\x0cExif\0\0XXXX" + raw[2:],
    }
    for name, header in broken.items():
        assert not is_plain_jpeg(header, policy), name
