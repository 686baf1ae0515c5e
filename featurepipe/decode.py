"""The one place images are opened: format allowlist, size limit, EXIF, pixel modes, clear errors.

Every image featurepipe embeds, fine-tunes on or predicts goes through :func:`decode_image` (files)
or :func:`array_to_image` (arrays) or :func:`image_to_rgb` (in-memory PIL images), so training and
inference see identical pixels
(:func:`decode_image_tensor`, the engines' fast path, gives the same pixels), and a bad file
always surfaces as a :class:`~featurepipe.exceptions.DecodeError` with a short, stable ``reason``
that the feature store records in its skipped-file list:

``missing``, ``not a regular file``, ``symlink loop``, ``empty file``, ``not an image``,
``truncated``, ``too large (W x H pixels > LIMIT)``, ``aspect ratio W:H over the limit (R:1)``,
``content is X, extension says Y``, ``unsupported format X``, ``unsupported mode X``,
``unreadable: <detail>``.

Hostile files: a file is checked with ``os.stat`` (a regular file, not empty) before it is
opened, and opened without blocking, so a FIFO or device named ``x.jpg`` is refused instead of
hanging the run. Its content must match its extension (a TIFF named ``.png`` is refused). A
one-scan JPEG cut short and given a fresh end-of-image marker (which libjpeg decodes without
error, filling the rest grey) reads ``truncated``: Pillow decodes it with the final marker
replaced by padding, so a scan that lacks data runs out of input instead (only a cut inside
the last few bytes of the scan, part of the last block, can pass unnoticed; progressive JPEGs
are not checked this way, as their later scans only refine an already complete image).

Decisions that change pixels (and therefore features) live in :class:`DecodePolicy`, whose
:meth:`DecodePolicy.to_dict` is part of the feature-store entry key.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import re
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featurepipe.exceptions import ConfigError, DecodeError

__all__ = [
    "DEFAULT_FORMATS",
    "DRAFT_GAP",
    "EXTENSION_FORMATS",
    "IMAGE_EXTENSIONS",
    "DecodePolicy",
    "array_to_image",
    "decode_image",
    "decode_image_tensor",
    "image_to_rgb",
    "is_plain_jpeg",
    "read_jpeg_bytes",
    "to_rgb",
]

#: PIL format names decoded by default: common photo/bitmap formats with mature, safe decoders.
DEFAULT_FORMATS: tuple[str, ...] = (
    "BMP", "GIF", "ICO", "JPEG", "MPO", "PNG", "PPM", "TIFF", "WEBP",
)

#: Lower-case file suffixes a folder scan picks up (the files of :data:`DEFAULT_FORMATS`).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".apng", ".bmp", ".gif", ".ico", ".jfif", ".jpe", ".jpeg", ".jpg", ".mpo",
    ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tif", ".tiff", ".webp",
})

#: With ``reduce_on_load``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose
#: shorter side is still >= DRAFT_GAP x the target size. 2.0 is Pillow's own ``thumbnail``
#: default: the final resize then sees enough pixels that the result stays close to a
#: full-size decode, while large photos still decode several times faster.
#: Changing it changes features, so it must go with a feature-format version bump.
DRAFT_GAP = 2.0

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
_JPEG_SOS = b"\xff\xda"
# Stands in for a one-scan JPEG's final EOI marker (see decode_image): stuffed 0xFF bytes are
# one-bits to the entropy decoder, enough for libjpeg-turbo's bit-buffer read-ahead (up to
# 57 bits) past the last block, so an intact scan completes while a cut one runs dry.
_JPEG_TAIL_PAD = b"\xff\x00" * 8

#: PIL formats a file's extension allows: content that disagrees is refused, so a file is
#: decoded by the decoder its name promises (and a TIFF named .png does not slip past a review).
EXTENSION_FORMATS: dict[str, frozenset[str]] = {
    **dict.fromkeys((".jpg", ".jpeg", ".jpe", ".jfif", ".mpo"), frozenset({"JPEG", "MPO"})),
    **dict.fromkeys((".png", ".apng"), frozenset({"PNG"})),
    **dict.fromkeys((".tif", ".tiff"), frozenset({"TIFF"})),
    **dict.fromkeys((".pbm", ".pgm", ".ppm", ".pnm"), frozenset({"PPM"})),
    ".bmp": frozenset({"BMP", "DIB"}),
    ".gif": frozenset({"GIF"}),
    ".ico": frozenset({"ICO"}),
    ".webp": frozenset({"WEBP"}),
}
_EXIF_ORIENTATION = 0x0112

# Leading bytes of formats we know, so a file cut inside its header reads "truncated",
# not "not an image".
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00",
          b"MM\x00*")

# Modes whose pixels carry alpha, after which we composite on the background.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# Values tolerated just outside [0, 1] in float arrays (rounding noise), then clipped.
_FLOAT_SLACK = 1e-3


@dataclass(frozen=True)
class DecodePolicy:
    """How files become RGB pixels; every field changes features, so all go into the store key.

    Parameters
    ----------
    background : tuple of 3 ints, default (255, 255, 255)
        Colour transparent pixels are composited over (alpha blend), white by default.
    max_pixels : int, default 64_000_000
        Images with more pixels (width x height, checked before any pixel data is decoded) are
        refused as ``too large``: a guard against decompression bombs and out-of-memory workers.
        Pillow's own hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies above it.
    exif_transpose : bool, default True
        Apply the EXIF orientation tag, so phone photos come out upright.
    formats : tuple of str
        PIL format names allowed (upper case); a file of another format is refused as
        ``unsupported format X``. Stored sorted, so equal sets give equal keys.
    reduce_on_load : bool, default True
        Let JPEGs decode at a reduced DCT scale when the caller passes ``target_size``
        (see :data:`DRAFT_GAP`); the result is never smaller than the target.
    max_aspect_ratio : float or None, default 100.0
        Images whose longer side exceeds this many times the shorter one are refused as
        ``aspect ratio W:H over the limit`` (checked from the header, like ``max_pixels``).
        Preprocessing scales the *shorter* side to the crop size, so a 1,000,000 x 1 image
        under the pixel limit would otherwise ask for a buffer a million crops wide; with the
        limit, the resized image is at most this many crops wide. None: no limit. It enters
        :meth:`to_dict` only when not the default, so existing store keys stay valid.

    Examples
    --------
    >>> DecodePolicy(max_pixels=10_000).to_dict()["max_pixels"]
    10000
    """

    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 64_000_000
    exif_transpose: bool = True
    formats: tuple[str, ...] = DEFAULT_FORMATS
    reduce_on_load: bool = True
    max_aspect_ratio: float | None = 100.0

    def __post_init__(self) -> None:
        bg = tuple(self.background)
        if len(bg) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in bg):
            raise ConfigError(f"DecodePolicy.background must be 3 ints in 0..255; "
                              f"got {self.background!r}")
        if not _is_int(self.max_pixels) or self.max_pixels < 1:
            raise ConfigError(f"DecodePolicy.max_pixels must be a positive int; "
                              f"got {self.max_pixels!r}")
        if isinstance(self.formats, str) or not all(isinstance(f, str) for f in self.formats):
            raise ConfigError(f"DecodePolicy.formats must be a sequence of PIL format names; "
                              f"got {self.formats!r}")
        ratio = self.max_aspect_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not ratio >= 1 or ratio == float("inf")):
            raise ConfigError(f"DecodePolicy.max_aspect_ratio must be a finite number >= 1 or "
                              f"None; got {ratio!r}")
        # Frozen: normalise through object.__setattr__ so equal policies hash and key equally.
        object.__setattr__(self, "background", tuple(int(c) for c in bg))
        object.__setattr__(self, "max_pixels", int(self.max_pixels))
        object.__setattr__(self, "formats", tuple(sorted({f.upper() for f in self.formats})))
        if ratio is not None:
            object.__setattr__(self, "max_aspect_ratio", float(ratio))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that goes into the feature-store entry key.

        Returns
        -------
        dict
            ``background`` (list), ``max_pixels``, ``exif_transpose``, ``formats`` (sorted list),
            ``reduce_on_load``; ``max_aspect_ratio`` only when it differs from the default, so
            the default policy keys stores exactly as before the field existed.
        """
        parts: dict[str, Any] = {
            "background": list(self.background),
            "max_pixels": self.max_pixels,
            "exif_transpose": bool(self.exif_transpose),
            "formats": list(self.formats),
            "reduce_on_load": bool(self.reduce_on_load),
        }
        if self.max_aspect_ratio != _DEFAULT_ASPECT_RATIO:
            parts["max_aspect_ratio"] = self.max_aspect_ratio
        return parts


_DEFAULT_ASPECT_RATIO = DecodePolicy.max_aspect_ratio


def decode_image(
    path: str | os.PathLike[str],
    policy: DecodePolicy | None = None,
    target_size: int | Sequence[int] | None = None,
) -> Image.Image:
    """Open one image file as a fully loaded RGB image, or raise a :class:`DecodeError`.

    Parameters
    ----------
    path : str or PathLike
        The file to read. The file is closed when this returns.
    policy : DecodePolicy, optional
        Allowlist, size limit, EXIF and background; ``DecodePolicy()`` by default.
    target_size : int or (int, int), optional
        The shorter side the caller will resize to (a pair: its larger value). With
        ``policy.reduce_on_load`` a JPEG is decoded at a reduced scale whose shorter side stays
        >= ``DRAFT_GAP * target_size`` (never below ``target_size``). None decodes at full size.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, EXIF orientation applied, alpha composited on ``policy.background``,
        first frame of animated images.

    Raises
    ------
    DecodeError
        ``.reason`` is one of the short reasons listed in this module's docstring.

    Examples
    --------
    >>> import tempfile, os
    >>> from PIL import Image
    >>> p = os.path.join(tempfile.mkdtemp(), "x.png")
    >>> Image.new("LA", (4, 2)).save(p)
    >>> img = decode_image(p)
    >>> img.mode, img.size
    ('RGB', (4, 2))
    """
    policy = DecodePolicy() if policy is None else policy
    path_str = os.fspath(path)
    target = None if target_size is None else _shorter_side(target_size)
    with _quiet_pil(), _decode_errors(path_str):
        with _open_regular(path_str) as fh, Image.open(_strict_jpeg(fh)) as img:
            _check_header(path_str, img, policy)
            if policy.reduce_on_load and target is not None:
                _draft(img, target)
            img.load()
            if policy.exif_transpose:
                _apply_exif(img)
            try:
                rgb = to_rgb(img, policy)
            except ConfigError:
                raise DecodeError(path_str, f"unsupported mode {img.mode}") from None
            rgb.load()
    return rgb


def decode_image_tensor(
    path: str | os.PathLike[str],
    policy: DecodePolicy | None = None,
    target_size: int | Sequence[int] | None = None,
) -> Any:
    """:func:`decode_image` as a uint8 ``torch.Tensor`` ``(3, H, W)``: the same pixels, faster.

    A plain JPEG -- RGB or grey, upright, intact, not reduced on load -- is decoded by the
    operator behind ``torchvision.io.decode_jpeg`` straight into the tensor. It is libjpeg-turbo
    with the settings Pillow uses, so the pixels are Pillow's bit for bit
    (``tests/test_decode_tensor.py`` pins that), without Pillow's Python-level work and the copy
    out of a PIL image (measured in ``docs/performance.md``), and the decoder releases the GIL
    for the whole call. Any other file -- or any error -- goes through
    :func:`decode_image`, which names the problem. So does a JPEG whose bottom-right pixel is
    what a block with no data decodes to (grey 128, or any grey for a colour JPEG, whose
    missing chroma is neutral): libjpeg fills a scan cut short that way without an error
    Python could see, and :func:`decode_image` tells a cut file from a genuinely grey corner.
    """
    import torch

    policy = DecodePolicy() if policy is None else policy
    path_str = os.fspath(path)
    data = read_jpeg_bytes(path_str)
    target = None if target_size is None else _shorter_side(target_size)
    decode_jpeg = _torchvision_decode_jpeg()
    if data is not None and decode_jpeg is not None and is_plain_jpeg(data, policy, target):
        with contextlib.suppress(Exception):  # decode_image names whatever went wrong
            pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8))
            if not _may_be_cut(pixels, data):
                return pixels
    rgb = decode_image(path_str, policy, target_size)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def is_plain_jpeg(data: bytes | bytearray, policy: DecodePolicy, target: int | None = None
                  ) -> bool:
    """True when libjpeg-turbo alone, at full scale, gives what :func:`decode_image` would.

    That is: an allowed JPEG (not MPO), 8-bit Huffman-coded, RGB or grey, within
    ``max_pixels`` and ``max_aspect_ratio``, intact (ends with the EOI marker; a cut file must
    read "truncated"), upright (no EXIF or XMP orientation to apply) and, with
    ``reduce_on_load`` and a ``target``, too small for a reduced-scale decode. Only the
    header's markers are read, in plain Python: Pillow's ``Image.open`` holds the GIL, which
    decode threads would queue on. Anything unexpected answers False, and
    :func:`decode_image` takes the file. Used by
    :func:`decode_image_tensor` and the GPU decoder.
    """
    if not data.startswith(_JPEG_SOI) or "JPEG" not in policy.formats:
        return False
    if not bytes(data[-16:]).rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
        return False
    frame = _plain_jpeg_size(data, policy.exif_transpose)
    if frame is None:
        return False
    size = frame[:2]
    if size[0] * size[1] > policy.max_pixels or _aspect_over(size, policy):
        return False
    return not (policy.reduce_on_load and target is not None
                and _draft_factor("JPEG", size, target) > 1)


#: Start-of-frame markers: 8-bit Huffman baseline / extended / progressive are what Pillow and
#: torchvision both hand to libjpeg-turbo unchanged; the others (lossless, arithmetic, 12-bit
#: hierarchical) are left to Pillow.
_SOF_PLAIN = frozenset({0xC0, 0xC1, 0xC2})
_SOF_OTHER = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_XMP = b"http://ns.adobe.com/xap/1.0/"


def _plain_jpeg_size(data: bytes | bytearray, exif_transpose: bool
                     ) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from the markers before the first scan, or None unless
    the header is plain (see :func:`is_plain_jpeg`): one 8-bit Huffman frame of 1 or 3
    components, no MPO index, and -- when ``exif_transpose`` -- EXIF orientation 1 or none and
    no XMP orientation (Pillow reads XMP's when EXIF has none)."""
    pos, end = 2, len(data)
    size: tuple[int, int, int] | None = None
    exif_seen = False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return size
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # no standalone markers belong here
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return None
        segment = data[pos + 4:pos + 2 + length]
        if marker in _SOF_PLAIN:
            if size is not None or len(segment) < 6 or segment[0] != 8 or segment[5] not in (1, 3):
                return None
            height = int.from_bytes(segment[1:3], "big")
            width = int.from_bytes(segment[3:5], "big")
            if not (height and width):
                return None
            size = (width, height, segment[5])
        elif marker in _SOF_OTHER:
            return None
        elif marker == 0xE1 and exif_transpose:
            if segment[:6] == b"Exif\0\0" and not exif_seen:  # Pillow reads the first one
                exif_seen = True
                if _exif_orientation(segment[6:]) != 1:
                    return None
            elif segment.startswith(_XMP) and b"Orientation" in segment:
                return None
        elif marker == 0xE2 and segment[:4] == b"MPF\0":  # Pillow opens these as MPO
            return None
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes | bytearray) -> int | None:
    """The orientation tag of a TIFF-structured EXIF block's first IFD (1 when it has none);
    None when the block cannot be read."""
    order: Literal["little", "big"]
    if tiff[:2] == b"II":
        order = "little"
    elif tiff[:2] == b"MM":
        order = "big"
    else:
        return None

    def number(start: int, width: int) -> int:
        return int.from_bytes(tiff[start:start + width], order)

    ifd = number(4, 4)
    if len(tiff) < 8 or ifd + 2 > len(tiff):
        return None
    for k in range(number(ifd, 2)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            return None
        if number(entry, 2) == _EXIF_ORIENTATION:
            width = {3: 2, 4: 4}.get(number(entry + 2, 2))  # SHORT or LONG
            return None if width is None else number(entry + 8, width)
    return 1


@functools.lru_cache(maxsize=1)
def _torchvision_decode_jpeg() -> Any:
    """torchvision's CPU JPEG decoder to RGB (``bytes tensor -> (3, H, W)``), or None.

    This is the operator behind ``torchvision.io.decode_jpeg``, called directly: since 0.29 that
    function warns on every call that torchvision's codecs are deprecated in favour of TorchCodec,
    a warning featurepipe's users could do nothing about. Where torchvision no longer has the
    operator, every file goes through Pillow (the same pixels, slower).
    """
    import torch

    try:
        from torchvision.io import ImageReadMode

        op = torch.ops.image.decode_jpeg
    except (ImportError, AttributeError, RuntimeError):
        return None
    rgb = ImageReadMode.RGB.value
    return lambda data: op(data, rgb, False)


def read_jpeg_bytes(path: str | os.PathLike[str]) -> bytearray | None:
    """The file's bytes when it is a regular file that starts like a JPEG, else None (without
    reading the rest; a FIFO or device is never opened, so this cannot block)."""
    try:
        with _open_regular(os.fspath(path)) as fh:
            head = fh.read(3)
            if head != _JPEG_SOI:
                return None
            # A writable buffer: torch.frombuffer warns on read-only ones.
            return bytearray(head) + fh.read()
    except (OSError, DecodeError):
        return None  # decode_image names the problem


def _open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading only when it is a non-empty regular file, else DecodeError.

    ``os.stat`` comes first, so a FIFO (whose open blocks until a writer appears) or a device
    is never opened; the open itself is non-blocking and checked again with ``fstat``, so a
    file swapped for a FIFO in between cannot hang the caller either.
    """
    _check_file(path)
    try:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        raise _stat_error(path, exc) from None
    try:
        _check_mode(path, os.fstat(fd))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_file(path: str) -> None:
    """Cheap checks before Pillow sees the file: it exists, is a regular file, is not empty."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _stat_error(path, exc) from None
    _check_mode(path, st)


def _check_mode(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a directory cannot be decoded
        raise DecodeError(path, "not a regular file")
    if st.st_size == 0:
        raise DecodeError(path, "empty file")


def _stat_error(path: str, exc: OSError) -> DecodeError:
    if isinstance(exc, FileNotFoundError):
        return DecodeError(path, "missing")
    if exc.errno == errno.ELOOP:
        return DecodeError(path, "symlink loop")
    return DecodeError(path, f"unreadable: {_detail(exc)}")


def _strict_jpeg(fh: BinaryIO) -> BinaryIO:
    """What Pillow should read: for a one-scan sequential JPEG, its bytes with the final EOI
    marker replaced by padding, so a scan cut short fails as truncated (see the module
    docstring); any other file as it is."""
    if fh.read(3) != _JPEG_SOI:
        fh.seek(0)
        return fh
    data = _JPEG_SOI + fh.read()
    eoi = _one_scan_eoi(data)
    if eoi is None:
        return io.BytesIO(data)
    return io.BytesIO(data[:eoi] + _JPEG_TAIL_PAD)


def _one_scan_eoi(data: bytes) -> int | None:
    """Offset of the final EOI of a sequential (baseline or extended) JPEG with one scan, or
    None (progressive, several scans or images, data after the EOI, unparsable header)."""
    end = len(data.rstrip(b"\x00\r\n "))
    if data[end - 2:end] != _JPEG_EOI:
        return None
    pos, sequential = 2, False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xDA:
            one_scan = data.find(_JPEG_SOS, pos + 2, end) == -1
            return end - 2 if sequential and one_scan else None
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            return None
        if marker in (0xC0, 0xC1):
            sequential = True
        elif marker in _SOF_OTHER or marker == 0xC2:
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _may_be_cut(pixels: Any, data: bytes | bytearray) -> bool:
    """True when a fast-path decode may hide a cut scan: its bottom-right pixel is what a block
    without data decodes to (all coefficients zero: grey 128; in a colour JPEG, whose luma may
    have arrived before the chroma ran out, any neutral grey)."""
    r, g, b = pixels[:, -1, -1].tolist()
    if not r == g == b:
        return False
    frame = _plain_jpeg_size(data, False)
    return r == 128 or frame is None or frame[2] == 3


def _aspect_over(size: tuple[int, int], policy: DecodePolicy) -> bool:
    limit = policy.max_aspect_ratio
    return limit is not None and max(size) > limit * min(size)


@contextlib.contextmanager
def _quiet_pil() -> Iterator[None]:
    """Silence Pillow's per-file warnings while one file is decoded.

    ``DecompressionBombWarning`` is replaced by our own ``max_pixels`` check, and Pillow's
    UserWarnings (corrupt EXIF, odd metadata) concern the file, not the program; under
    ``filterwarnings = error`` they would otherwise turn a usable image into an exception.
    Note: ``warnings.catch_warnings`` swaps a process-global filter list, so threads decoding
    at the same moment may briefly share these filters; worker processes are unaffected.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
        yield


@contextlib.contextmanager
def _decode_errors(path: str) -> Iterator[None]:
    """Turn what Pillow raises into a DecodeError with a stable reason."""
    try:
        yield
    except (DecodeError, ConfigError):
        raise
    except UnidentifiedImageError:
        reason = "truncated" if _has_known_magic(path) else "not an image"
        raise DecodeError(path, reason) from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(path, _bomb_reason(str(exc))) from None
    except FileNotFoundError:  # removed between our stat and Pillow's open
        raise DecodeError(path, "missing") from None
    except (OSError, SyntaxError, EOFError, ValueError, TypeError, IndexError, KeyError,
            MemoryError) as exc:
        # Pillow reports broken data with many exception types; a truncated stream says so.
        text = str(exc).lower()
        if isinstance(exc, EOFError) or "truncated" in text:
            raise DecodeError(path, "truncated") from None
        raise DecodeError(path, f"unreadable: {_detail(exc)}") from None


def _check_header(path: str, img: Image.Image, policy: DecodePolicy) -> None:
    """Refuse content that is not what the extension says, disallowed formats, oversized and
    overly elongated images, before any pixel data is decoded."""
    fmt = img.format or "unknown"
    ext = os.path.splitext(path)[1].lower()
    if ext in EXTENSION_FORMATS and fmt not in EXTENSION_FORMATS[ext]:
        raise DecodeError(path, f"content is {fmt}, extension says {ext[1:].upper()}")
    if fmt not in policy.formats:
        raise DecodeError(path, f"unsupported format {fmt}")
    _check_size(path, img.size, policy)


def _check_size(path: str, size: tuple[int, int], policy: DecodePolicy) -> None:
    """Refuse oversized and overly elongated images (files and in-memory images alike)."""
    width, height = size
    if width * height > policy.max_pixels:
        raise DecodeError(path, f"too large ({width} x {height} pixels > {policy.max_pixels})")
    if _aspect_over(size, policy):
        raise DecodeError(path, f"aspect ratio {width}:{height} over the limit "
                                f"({policy.max_aspect_ratio:g}:1)")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _shorter_side(target_size: int | Sequence[int]) -> int:
    """The shorter side an image must keep for a resize to ``target_size``."""
    if isinstance(target_size, (int, np.integer)) and not isinstance(target_size, bool):
        size = int(target_size)
    elif isinstance(target_size, Sequence) and not isinstance(target_size, str) and target_size:
        size = max(int(s) for s in target_size)
    else:
        raise ConfigError(f"target_size must be an int or a pair of ints; got {target_size!r}")
    if size < 1:
        raise ConfigError(f"target_size must be positive; got {target_size!r}")
    return size


def _draft(img: Image.Image, target: int) -> None:
    """Let the JPEG decoder downscale by 2/4/8 while the shorter side stays >= DRAFT_GAP x target.

    Pillow's JPEG ``draft`` picks the largest scale ``s`` with ``s <= min(W // g, H // g)`` for a
    requested ``(g, g)``, so ``ceil(min(W, H) / s) >= g``: the image never ends below ``g``.
    Other formats ignore ``draft``.
    """
    if _draft_factor(img.format, img.size, target) > 1:
        need = int(np.ceil(DRAFT_GAP * target))
        img.draft("RGB", (need, need))


def _draft_factor(fmt: str | None, size: tuple[int, int], target: int) -> int:
    """The factor :func:`_draft` lets the JPEG decoder shrink an image by (1 = full size)."""
    need = int(np.ceil(DRAFT_GAP * target))
    if fmt not in ("JPEG", "MPO") or min(size) < 2 * need:
        return 1
    scale = min(size[0] // need, size[1] // need)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def _apply_exif(img: Image.Image) -> None:
    """Rotate/flip per the EXIF orientation tag, in place.

    A corrupt EXIF block leaves the image as stored rather than losing a readable image.
    """
    with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError):
        ImageOps.exif_transpose(img, in_place=True)


def to_rgb(img: Image.Image, policy: DecodePolicy | None = None) -> Image.Image:
    """Convert any Pillow mode to RGB the same way for every source.

    Alpha (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) is alpha-blended over
    ``policy.background``. 16-bit and 32-bit integer modes (``I;16*``, ``I``) are scaled by
    the 16-bit range, 0..65535 -> 0..255 (values outside it are clipped), instead of Pillow's
    default conversion, which clips everything above 255 to white. ``F`` (float) images are
    taken to be in [0, 1], clipped and scaled. CMYK, YCbCr, 1 and L use Pillow's conversion.

    Parameters
    ----------
    img : PIL.Image.Image
        A loaded image, any mode.
    policy : DecodePolicy, optional
        Supplies ``background``; ``DecodePolicy()`` by default.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``: ``img`` itself when it already is RGB, otherwise a new image.

    Raises
    ------
    ConfigError
        For a mode Pillow cannot convert to RGB.
    """
    background = (DecodePolicy() if policy is None else policy).background
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or ("transparency" in img.info and mode in ("P", "L", "RGB")):
        return _composite(img.convert("RGBA"), background)
    if mode in _INT_MODES:
        return _gray_array_to_rgb(_scale_to_uint8(np.asarray(img), 0.0, 65535.0))
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return _gray_array_to_rgb(_scale_to_uint8(values, 0.0, 1.0))
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot convert image mode {mode} to RGB: {exc}") from None


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-blend an RGBA image over a solid background colour."""
    base = Image.new("RGB", rgba.size, background)
    base.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return base


def _scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 with rounding, clipping what lies outside."""
    x = np.clip(values.astype(np.float32), lo, hi)
    return np.rint((x - lo) * np.float32(255.0 / (hi - lo))).astype(np.uint8)


def _gray_array_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def array_to_image(arr: Any, policy: DecodePolicy | None = None) -> Image.Image:
    """Turn one image array into an RGB image with the same rules as files.

    Parameters
    ----------
    arr : array_like
        Shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (the last is RGBA,
        composited on ``policy.background``). dtype: ``uint8`` as is; ``bool`` (True -> 255);
        ``uint16``, ``uint32``, ``int8``, ``int16`` scaled from their full range to 0..255;
        floats must lie in [0, 1] (tiny rounding overshoot is clipped).
        ``int32``/``int64``/``uint64`` are refused: ``int64`` is numpy's default integer type, so
        its range says nothing about the pixel range; cast to ``uint8``/``uint16`` first.
    policy : DecodePolicy, optional
        Supplies the background for RGBA arrays.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``.

    Raises
    ------
    ConfigError
        For other shapes or dtypes, or floats outside [0, 1]; the message names shape and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> array_to_image(np.full((2, 3), 65535, dtype=np.uint16)).getpixel((0, 0))
    (255, 255, 255)
    """
    a = np.asarray(arr)
    check_image_array(a, batched=False)
    u8 = pixels_to_uint8(a)
    if u8.ndim == 3 and u8.shape[2] == 1:
        u8 = u8[:, :, 0]
    if u8.ndim == 2:
        return _gray_array_to_rgb(u8)
    if u8.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(u8), mode="RGB")
    background = (DecodePolicy() if policy is None else policy).background
    return _composite(Image.fromarray(np.ascontiguousarray(u8), mode="RGBA"), background)


def image_to_rgb(img: Image.Image, policy: DecodePolicy | None = None,
                 name: str = "image") -> Image.Image:
    """Turn an in-memory PIL image into RGB with the same rules as files.

    The policy's size and aspect-ratio limits, its format allowlist (for an image that still
    carries the format of the file it was opened from), EXIF/XMP orientation (when the image
    has such a tag) and :func:`to_rgb`'s mode conversion apply, so an image passed in memory
    gives the pixels of the same image read from a file. ``img`` itself is never modified
    (a lazily opened image is loaded).

    Parameters
    ----------
    img : PIL.Image.Image
        Any mode and size.
    policy : DecodePolicy, optional
        ``DecodePolicy()`` by default.
    name : str, default "image"
        How errors name the image (say ``"X[3]"``).

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``: ``img`` itself when it already is plain RGB and upright.

    Raises
    ------
    DecodeError
        With the short reasons of :func:`decode_image` (``unsupported mode X``, ``too large
        (...)``, ``truncated`` for a lazily opened file cut short, ...).

    Examples
    --------
    >>> from PIL import Image
    >>> image_to_rgb(Image.new("LA", (4, 2))).mode
    'RGB'
    """
    policy = DecodePolicy() if policy is None else policy
    with _quiet_pil(), _decode_errors(name):
        if img.format is not None and img.format not in policy.formats:
            raise DecodeError(name, f"unsupported format {img.format}")
        _check_size(name, img.size, policy)
        img.load()
        if policy.exif_transpose and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, KeyError,
                                     IndexError):
                img = ImageOps.exif_transpose(img) or img  # a copy: the caller's stays as is
        try:
            rgb = to_rgb(img, policy)
        except ConfigError:
            raise DecodeError(name, f"unsupported mode {img.mode}") from None
        rgb.load()
    return rgb


def check_image_array(a: np.ndarray, *, batched: bool) -> None:
    """Raise ConfigError unless ``a`` has an image shape (``batched``: a leading N axis) and dtype.

    Shared with :mod:`featurepipe.sources`, which checks a whole ``(N, ...)`` array once up front.
    """
    shape = a.shape[1:] if batched else a.shape
    expected = ("(N, H, W) or (N, H, W, C) with C in 1, 3, 4" if batched
                else "(H, W) or (H, W, C) with C in 1, 3, 4")
    ok_shape = (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))) \
        and all(s > 0 for s in shape)
    if not ok_shape:
        hint = ""
        if a.ndim == (4 if batched else 3) and a.shape[-3] in (1, 3, 4):
            hint = " (channels first? move them last with np.moveaxis(arr, -3, -1))"
        raise ConfigError(f"image array must be {expected}; got shape {a.shape} "
                          f"dtype {a.dtype}{hint}")
    _integer_range(a.dtype, a.shape)  # raises for unsupported dtypes
    if a.dtype.kind == "f" and a.size:
        _check_float_range(a)


def pixels_to_uint8(a: np.ndarray) -> np.ndarray:
    """Convert pixel values to uint8 by the dtype's rule (see :func:`array_to_image`)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype.kind == "f":
        return _scale_to_uint8(np.nan_to_num(a, nan=0.0), 0.0, 1.0)
    lo, hi = _integer_range(a.dtype, a.shape)
    return _scale_to_uint8(a, lo, hi)


def _integer_range(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[float, float]:
    """The value range an integer dtype is scaled from; ConfigError for dtypes we refuse."""
    if dtype == np.bool_ or dtype == np.uint8 or dtype.kind == "f":
        return 0.0, 255.0
    if dtype in (np.uint16, np.uint32, np.int8, np.int16):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    hint = " (cast to uint8 for 0..255 data, uint16 for 0..65535, or float in [0, 1])" \
        if dtype.kind in "iu" else ""
    raise ConfigError(f"unsupported image array dtype {dtype} (shape {shape}); expected uint8, "
                      f"uint16, uint32, int8, int16, bool or float in [0, 1]{hint}")


def _check_float_range(a: np.ndarray) -> None:
    lo, hi = float(np.min(a)), float(np.max(a))
    if np.isnan(lo) or np.isnan(hi) or lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
        hint = " (divide 0..255 data by 255)" if hi > 1.0 + _FLOAT_SLACK else ""
        raise ConfigError(f"float image values must lie in [0, 1]; got {lo:g}..{hi:g} "
                          f"(shape {a.shape}, dtype {a.dtype}){hint}")


def _has_known_magic(path: str) -> bool:
    """True if the file starts like an image format we know (so a failed open means truncation)."""
    try:
        with _open_regular(path) as fh:
            head = fh.read(16)
    except (OSError, DecodeError):
        return False
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _bomb_reason(message: str) -> str:
    """``too large (...)`` from Pillow's DecompressionBombError message."""
    numbers = re.findall(r"\d+", message)
    if len(numbers) >= 2:
        return f"too large ({numbers[0]} pixels > {numbers[1]})"
    return "too large"


def _detail(exc: BaseException) -> str:
    """A short one-line description of an exception for ``unreadable: ...`` reasons."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, PermissionError):
        first = "permission denied"
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return detail[:120]
