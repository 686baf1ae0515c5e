"""Image files of every awkward kind, made on the fly, and the tiny test backbone."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: A tiny random timm network: fast, deterministic, no download (weights don't matter).
TINY = {"backbone": "timm:test_efficientnet", "weights": "random", "image_size": 32}


def _noise(rng: np.random.Generator, h: int, w: int, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)


def write_good_images(
    folder: Path, n: int, seed: int, size: tuple[int, int] = (40, 48)
) -> list[Path]:
    """n small RGB JPEG/PNG files with distinct random content."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = _noise(rng, size[0], size[1])
        ext = "jpg" if i % 2 == 0 else "png"
        p = folder / f"img_{i:03d}.{ext}"
        Image.fromarray(arr).save(p, quality=90) if ext == "jpg" else Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def write_odd_images(folder: Path, seed: int = 1) -> dict[str, str | None]:
    """Odd-but-valid and broken files: file name -> expected skip reason prefix (None = good)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    Image.fromarray(_noise(rng, 30, 30, 4), "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = None
    Image.fromarray(_noise(rng, 30, 30, 1)[..., 0], "L").save(folder / "gray.png")
    expected["gray.png"] = None
    Image.fromarray(_noise(rng, 30, 30, 1)[..., 0], "L").convert("P").save(folder / "palette.gif")
    expected["palette.gif"] = None
    Image.fromarray(_noise(rng, 30, 30, 4), "RGBA").convert("CMYK").save(folder / "cmyk.jpg")
    expected["cmyk.jpg"] = None
    deep = (rng.integers(0, 65536, size=(30, 30))).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    expected["deep16.png"] = None

    (folder / "zero.jpg").write_bytes(b"")
    expected["zero.jpg"] = "empty"
    buf = io.BytesIO()
    Image.fromarray(_noise(rng, 64, 64)).save(buf, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected["truncated.jpg"] = "truncated"
    (folder / "notes.jpg").write_text("this is not an image\n")
    expected["notes.jpg"] = "not an image"
    return expected
