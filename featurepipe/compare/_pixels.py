"""Classical features for the from-scratch arms: downscaled raw pixels and HOG.

Both come from one decode of each image through the same :class:`~featurepipe.decode.DecodePolicy`
the embedding uses, so every arm sees the same pixels. Nothing here is fitted, so computing the
features of all images before the train/test split leaks nothing. Results are cached in the
compare folder, keyed by the images' ids and fingerprints and the settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featurepipe.atomic import atomic_write
from featurepipe.decode import DecodePolicy
from featurepipe.exceptions import ConfigError, DecodeError
from featurepipe.sources import ImageSource

PIXEL_MODES = ("auto", "gray", "rgb")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class PixelSpec:
    """How raw-pixel and HOG features are made.

    Parameters
    ----------
    size : int
        Images are resized to ``size x size`` for the raw-pixel arms (32 by default; use the
        native size for small images such as Fashion-MNIST's 28).
    mode : {"auto", "gray", "rgb"}
        ``auto`` keeps one channel when every image is gray (R = G = B), else RGB.
    hog_size : int
        Side of the grayscale image HOG is computed on.
    hog_cell : int
        HOG cell side in pixels (blocks are 2x2 cells, 9 orientations, L2-Hys).
    """

    size: int = 32
    mode: str = "auto"
    hog_size: int = 64
    hog_cell: int = 8

    def validate(self) -> PixelSpec:
        if self.mode not in PIXEL_MODES:
            raise ConfigError(f"pixel mode must be one of {', '.join(PIXEL_MODES)}; "
                              f"got {self.mode!r}")
        for name in ("size", "hog_size", "hog_cell"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"pixel {name} must be an integer >= 2; got {value!r}")
        if self.hog_size < 2 * self.hog_cell:
            raise ConfigError(f"hog_size ({self.hog_size}) must be at least 2 * hog_cell "
                              f"({self.hog_cell}): HOG blocks are 2x2 cells")
        return self


@dataclass
class PixelFeatures:
    """Raw-pixel and HOG rows for the images of one source that decoded."""

    indices: np.ndarray          # positions in the source
    pixels: np.ndarray           # (n, size*size[*3]) uint8
    hog: np.ndarray | None       # (n, d) float32, or None when not asked for
    bad: dict[int, str]          # position -> decode failure reason
    mode: str                    # "gray" or "rgb" actually used
    seconds: float               # extraction time (0 on a cache hit is replaced by the recorded)


def _hog(gray: np.ndarray, cell: int) -> np.ndarray:
    from skimage.feature import hog

    return hog(gray, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2),
               block_norm="L2-Hys", feature_vector=True).astype(np.float32)


def _cache_path(folder: Path, source: ImageSource, indices: Sequence[int], spec: PixelSpec,
                with_hog: bool, policy: DecodePolicy) -> Path:
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, asdict(spec), with_hog, policy.to_dict()],
                             sort_keys=True, default=str).encode())
    ids = source.ids
    for i in indices:
        digest.update(f"{ids[i]}\t{source.fingerprint(i)}\n".encode())
    return folder / f"pixels-{digest.hexdigest()[:16]}.npz"


def pixel_features(source: ImageSource, indices: Sequence[int], spec: PixelSpec, *,
                   with_hog: bool = True, cache_dir: str | os.PathLike | None = None,
                   policy: DecodePolicy | None = None,
                   log: Callable[[str], None] | None = None) -> PixelFeatures:
    """Decode ``source[indices]`` once; return downscaled pixels and (optionally) HOG features.

    Parameters
    ----------
    source : ImageSource
    indices : sequence of int
        Positions to extract, in order.
    spec : PixelSpec
    with_hog : bool
        Also compute HOG (the slow part: about a millisecond per image).
    cache_dir : path, optional
        Folder for the ``pixels-<digest>.npz`` cache.
    policy : DecodePolicy, optional
        Decode policy (the default one, as :func:`featurepipe.embed.embed` uses).

    Returns
    -------
    PixelFeatures
    """
    spec.validate()
    policy = policy or DecodePolicy()
    indices = [int(i) for i in indices]
    cache = (_cache_path(Path(cache_dir), source, indices, spec, with_hog, policy)
             if cache_dir is not None else None)
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            cached_bad = dict(zip(z["bad_idx"].tolist(), z["bad_reason"].tolist(), strict=True))
            return PixelFeatures(z["indices"], z["pixels"], z["hog"] if with_hog else None,
                                 cached_bad, str(z["mode"]), float(z["seconds"]))
    if log:
        log(f"extracting {spec.size}px pixels{' and HOG' if with_hog else ''} "
            f"of {len(indices)} images")
    t0 = time.perf_counter()
    good: list[int] = []
    pixels: list[np.ndarray] = []
    hogs: list[np.ndarray] = []
    bad: dict[int, str] = {}
    gray_everywhere = True
    for i in indices:
        try:
            image = source.load(i, policy)
        except DecodeError as exc:
            bad[i] = exc.reason
            continue
        small = np.asarray(image.resize((spec.size, spec.size), Image.Resampling.BILINEAR))
        gray_everywhere = gray_everywhere and bool(
            (small[..., 0] == small[..., 1]).all() and (small[..., 1] == small[..., 2]).all())
        pixels.append(small)
        if with_hog:
            g = image.convert("L").resize((spec.hog_size, spec.hog_size),
                                          Image.Resampling.BILINEAR)
            hogs.append(_hog(np.asarray(g, dtype=np.float32) / 255.0, spec.hog_cell))
        good.append(i)
    mode = spec.mode if spec.mode != "auto" else ("gray" if gray_everywhere else "rgb")
    if pixels:
        stack = np.stack(pixels)
        stack = stack[..., 0] if mode == "gray" else stack
        flat = stack.reshape(len(stack), -1)
    else:
        flat = np.zeros((0, spec.size * spec.size * (1 if mode == "gray" else 3)), np.uint8)
    hog_arr = (np.stack(hogs) if hogs else np.zeros((0, 1), np.float32)) if with_hog else None
    result = PixelFeatures(np.asarray(good, dtype=np.int64), flat, hog_arr, bad, mode,
                           time.perf_counter() - t0)
    if cache is not None:
        _save(cache, result)
    return result


def _save(path: Path, r: PixelFeatures) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: np.savez(
        fh, indices=r.indices, pixels=r.pixels,
        hog=r.hog if r.hog is not None else np.zeros((0, 1), np.float32),
        bad_idx=np.asarray(list(r.bad), dtype=np.int64),
        bad_reason=np.asarray(list(r.bad.values()), dtype=str), mode=r.mode,
        seconds=r.seconds))
