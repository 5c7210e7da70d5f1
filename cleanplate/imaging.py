"""Image I/O and mask handling: decode (any mode, EXIF, ICC, 16-bit), masks, encode, atomic writes (the crop
and the paste-back are :mod:`cleanplate.compositing`).

Conventions: sizes are ``(width, height)`` tuples, arrays are ``(H, W[, C])``, colour arrays are
RGB (never BGR), masks are ``bool`` with True meaning "remove this pixel". Every distance is in
source pixels (px). Client mistakes raise :class:`~cleanplate.errors.InputError` with a ``code``;
programming mistakes (wrong dtype from our own model code) raise plain ``ValueError``.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from cleanplate.errors import CleanplateError, ErrorCode, InputError

DEFAULT_MAX_PIXELS: int = 64_000_000  # decompression-bomb limit
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})  # what folders are read for
WRITABLE_SUFFIXES = IMAGE_SUFFIXES - {".bmp"}  # what outputs can be (see format_for_path)

_ORIENTATION = 0x0112


class ImageFormat(str, Enum):
    """The formats cleanplate writes, the one list: ``cleanplate batch run --format``, the gateway's
    ``output_format`` (less TIFF), :func:`encode_image`, :func:`format_for_path`. A member is its slug
    (``ImageFormat.jpeg == "jpeg"``)."""

    png = "png"
    jpeg = "jpeg"
    webp = "webp"
    tiff = "tiff"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"

    @property
    def suffix(self) -> str:
        """The file suffix an output of this format gets when none is given (``.jpg``, ``.tif``)."""
        return {"jpeg": ".jpg", "tiff": ".tif"}.get(self.value, f".{self.value}")


_WRITABLE = {f.value: f.value.upper() for f in ImageFormat}  # slug -> Pillow's format name
MEDIA_TYPES = {f.value: f.media_type for f in ImageFormat}
# Other names of the writable formats: file suffixes and Pillow's names of what it decoded (MPO is a JPEG).
_ALIASES = {"jpg": "jpeg", "jpe": "jpeg", "mpo": "jpeg", "tif": "tiff"}
# Exceptions Pillow/OpenCV raise on corrupt input (Pillow is not consistent about which).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  TypeError, KeyError, ZeroDivisionError, cv2.error, ImageCms.PyCMSError)


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make generated __eq__ ambiguous
class DecodedImage:
    """A decoded image at native depth, EXIF orientation already applied.

    Attributes:
        pixels: ``(H, W, C)`` with C in {1, 3}, uint8 or uint16 (16-bit PNG/TIFF stay 16-bit), RGB.
        alpha: ``(H, W)`` with the dtype of ``pixels``, or None.
        mode: the original Pillow mode ("RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", ...).
        format: the container format as Pillow reports it ("PNG", "JPEG", ...), or None.
        exif: raw EXIF (``b"Exif\\0\\0"`` + TIFF data) with orientation reset to 1, or None.
        icc_profile: ICC profile bytes matching ``pixels`` (RGB or gray), or None.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    mode: str
    format: str | None
    exif: bytes | None
    icc_profile: bytes | None

    @property
    def rgb(self) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB for the model: gray replicated, 16-bit as ``round(v / 257)``.

        Returns ``pixels`` itself (no copy) when it already is 8-bit RGB."""
        return to_rgb8(self.pixels)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in px."""
        return self.width, self.height

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """``(H, W[, 1|3])`` uint8/uint16 native pixels -> ``(H, W, 3)`` uint8 RGB (gray replicated, 16-bit as
    ``round(v / 257)``); no copy when already 8-bit RGB."""
    px = _to8(pixels if pixels.ndim == 3 else pixels[..., None])
    return np.repeat(px, 3, axis=2) if px.shape[2] == 1 else px


def _to8(a: np.ndarray) -> np.ndarray:
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8) if a.dtype == np.uint16 else a


def _half(dtype: np.dtype) -> int:
    return (int(np.iinfo(dtype).max) + 1) // 2  # 128 for uint8, 32768 for uint16


def _icc_fits(icc: bytes | None, channels: int) -> bool:
    # Bytes 16..20 of an ICC header name its colour space; a CMYK profile on RGB pixels is wrong.
    return icc is not None and len(icc) >= 20 and icc[16:20] == (b"GRAY" if channels == 1 else b"RGB ")


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an (H, W[, C]) array, like ImageOps.exif_transpose."""
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.swapaxes(0, 1), 6: lambda x: np.rot90(x, -1),
           7: lambda x: x.swapaxes(0, 1)[::-1, ::-1], 8: lambda x: np.rot90(x, 1)}
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"II*\x00", b"MM\x00*", b"BM")


@contextmanager
def _decoding(name: str, raw: bytes = b"") -> Iterator[None]:
    """Turn Pillow/OpenCV failures into one-line InputErrors; ``raw`` (the encoded bytes) tells a
    corrupt file of a known format ("unreadable_image") from data of no known format ("unsupported_image")."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except CleanplateError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"{name} is too large to decode: {e}", code=ErrorCode.TOO_MANY_PIXELS) from e
        except UnidentifiedImageError as e:
            if raw.startswith(_SIGNATURES) or raw[8:12] == b"WEBP":
                raise InputError(f"cannot read {name}: its header is corrupt", code=ErrorCode.UNREADABLE_IMAGE) from e
            raise InputError(f"cannot read {name}: not an image format this server reads (PNG, JPEG, WEBP, TIFF, "
                             f"BMP, GIF)", code=ErrorCode.UNSUPPORTED_IMAGE) from e
        except _DECODE_ERRORS as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise InputError(f"cannot read {name}: {reason}", code=ErrorCode.UNREADABLE_IMAGE) from e


def _pil_array(im: Image.Image) -> np.ndarray:
    """Pixels of a Pillow image as (H, W, C) uint8/uint16; alpha, if any, is the last channel."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)[..., None]
    if im.mode == "CMYK":
        icc = im.info.get("icc_profile")
        try:  # colour-manage when the file says how; Pillow's plain convert is a naive formula
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, TypeError):  # no or unusable profile
            im = im.convert("RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode == "La":
        im = im.convert("LA")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):  # P, PA, RGBa, YCbCr, LAB, ...
        im = im.convert("RGBA" if im.has_transparency_data else "RGB")
    a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def _exif(im: Image.Image) -> tuple[int, bytes | None]:
    """EXIF orientation (1..8) and the EXIF bytes with orientation reset to 1."""
    try:
        exif = im.getexif()
        orientation = exif.get(_ORIENTATION, 1)
        if _ORIENTATION in exif:
            exif[_ORIENTATION] = 1
        return (orientation if orientation in range(1, 9) else 1), (exif.tobytes() if len(exif) else None)
    except _DECODE_ERRORS:  # broken EXIF should not make the photo unusable
        return 1, None


def _read(data: bytes | str | os.PathLike) -> tuple[bytes, str]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), f"image ({len(data)} bytes)"
    name = f"image {os.fspath(data)!r}"
    with _decoding(name), open(data, "rb") as f:
        return f.read(), name


def decode_image(data: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an encoded image (bytes or a path) at native bit depth.

    The header is read first: images with ``width * height > max_pixels`` are refused before
    any pixel is decoded (Pillow's own bomb check is honoured too). RGB/RGBA/L/LA stay as they
    are, P and PA become RGB or RGBA, CMYK becomes sRGB (mode stays "CMYK"), 1 becomes L,
    16-bit gray (I;16*, I) becomes uint16 C=1, 16-bit RGB(A) PNG/TIFF is decoded by OpenCV to
    uint16. EXIF orientation is applied. 16-bit gray+alpha PNGs come back as 8-bit LA (Pillow).

    Returns:
        DecodedImage (see its attributes for shapes and dtypes).

    Raises:
        InputError: code "too_many_pixels" over the limit; "unreadable_image" for a missing file,
            truncated or corrupt data; "unsupported_image" for data no decoder recognises.
    """
    raw, name = _read(data)
    with _decoding(name, raw):
        im = Image.open(io.BytesIO(raw))
        w, h = im.size
        if w * h > max_pixels:
            raise InputError(f"{name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
                             code=ErrorCode.TOO_MANY_PIXELS)
        tile = im.tile[0].args if im.tile else None  # before getexif(): it may load (PNG) and clear tile
        rawmode = tile[0] if isinstance(tile, tuple) else tile
        orientation, exif = _exif(im)
        if im.mode in ("RGB", "RGBA") and isinstance(rawmode, str) and ";16" in rawmode:
            # Pillow would silently drop to 8 bits per channel; OpenCV keeps 16.
            arr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is None or arr.ndim != 3:
                raise InputError(f"cannot read {name}: OpenCV could not decode it", code=ErrorCode.UNREADABLE_IMAGE)
            arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        else:
            im.load()
            arr = _pil_array(im)
        arr = _orient(arr, orientation)
    c = 1 if arr.shape[2] <= 2 else 3
    icc = im.info.get("icc_profile")
    alpha = np.ascontiguousarray(arr[..., c]) if arr.shape[2] in (2, 4) else None
    return DecodedImage(pixels=np.ascontiguousarray(arr[..., :c]), alpha=alpha, mode=im.mode, format=im.format,
                        exif=exif, icc_profile=icc if _icc_fits(icc, c) else None)


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding a pixel.

    Attributes:
        width, height: px, as stored (before EXIF orientation); channels: samples per pixel after
            :func:`decode_image` (alpha included, 1..4); bytes_per_sample: 1 or 2; format: as Pillow names it.
    """

    width: int
    height: int
    channels: int
    bytes_per_sample: int
    format: str | None

    @property
    def pixels(self) -> int:
        return self.width * self.height


_HEADER_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1, "I": 1, "F": 1, "LA": 2,
                    "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "CMYK": 3}


def read_header(data: bytes | str | os.PathLike) -> ImageHeader:
    """The size and sample layout of an encoded image (bytes or a path) from its header alone.

    Raises:
        InputError: as :func:`decode_image` for data no decoder recognises or a corrupt header.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw, name = bytes(data), f"image ({len(data)} bytes)"
    else:  # only the header is read, not the whole file
        raw, name = b"", f"image {os.fspath(data)!r}"
    with _decoding(name, raw):
        with Image.open(io.BytesIO(raw) if raw else data) as im:
            tile = im.tile[0].args if im.tile else None
            rawmode = tile[0] if isinstance(tile, tuple) else tile
            wide = im.mode.startswith("I") or (isinstance(rawmode, str) and ";16" in rawmode)
            channels = _HEADER_CHANNELS.get(im.mode, 4)  # P, PA, RGBA, RGBa: up to RGBA
            return ImageHeader(im.width, im.height, channels, 2 if wide else 1, im.format)


def decode_mask(data: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask image of any mode to ``(H, W)`` bool (True = remove), EXIF orientation applied.

    A pixel is masked when its luma is >= 50% of full scale (>= 128 for 8-bit, >= 32768 for
    16-bit) and, if the image has a not fully opaque alpha channel, its alpha is >= 50% too.

    Raises:
        InputError: as :func:`decode_image`.
    """
    return binarize_mask(decode_image(data, max_pixels=max_pixels))


def binarize_mask(img: DecodedImage) -> np.ndarray:
    """A decoded mask image -> ``(H, W)`` bool, binarized at 50% as :func:`decode_mask` describes."""
    px = img.pixels
    luma = px[..., 0] if px.shape[2] == 1 else cv2.cvtColor(px, cv2.COLOR_RGB2GRAY)
    half = _half(px.dtype)
    mask = luma >= half
    if img.alpha is not None and (img.alpha < np.iinfo(px.dtype).max).any():
        mask &= img.alpha >= half
    return mask


def mask_from_alpha(image: DecodedImage) -> np.ndarray:
    """``(H, W)`` bool, True where alpha < 50% (transparent marks what to remove, as in OpenAI's edit API).

    Raises:
        InputError: code "no_alpha" when the image has no alpha channel.
    """
    if image.alpha is None:
        raise InputError(f"the image (mode {image.mode}) has no alpha channel to take the mask from",
                         code=ErrorCode.NO_ALPHA)
    return image.alpha < _half(image.alpha.dtype)


def validate_mask(mask: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Check a ``(H, W)`` mask against ``image_size = (width, height)``; returns it as bool
    (non-bool masks count non-zero as masked).

    Raises:
        InputError: "size_mismatch", "empty_mask" (nothing masked), "full_mask" (everything masked).
    """
    mask = np.asarray(mask)
    w, h = image_size
    if mask.ndim != 2 or mask.shape != (h, w):
        got = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else f"shape {mask.shape}"
        raise InputError(f"mask is {got} but the image is {w}x{h}", code=ErrorCode.SIZE_MISMATCH)
    mask = mask if mask.dtype == bool else mask != 0
    if not mask.any():
        raise InputError("mask is empty: nothing to remove", code=ErrorCode.EMPTY_MASK)
    if mask.all():
        raise InputError("mask covers the whole image: nothing left to fill from", code=ErrorCode.FULL_MASK)
    return mask


def dilate_mask(mask: np.ndarray, dilate_px: int, kernel: Literal["disc", "square"] = "disc") -> np.ndarray:
    """Grow a ``(H, W)`` bool mask by ``dilate_px`` px (structuring element ``2r+1`` wide: an
    ellipse for "disc", a rectangle for "square"). Returns a new ``(H, W)`` bool array.

    Raises:
        InputError: "bad_option" for a negative or non-integer radius or an unknown kernel.
    """
    if isinstance(dilate_px, bool) or not isinstance(dilate_px, (int, np.integer)) or dilate_px < 0:
        raise InputError(f"dilation must be a whole number of pixels >= 0, got {dilate_px!r}",
                         code=ErrorCode.BAD_OPTION)
    if kernel not in ("disc", "square"):
        raise InputError(f"unknown dilation kernel {kernel!r} (disc or square)", code=ErrorCode.BAD_OPTION)
    r = int(dilate_px)
    if r == 0 or not mask.any():
        return mask.astype(bool, copy=True)
    # Dilate only the bbox grown by r: cheap on 50-megapixel photos with a small mask.
    x, y, bw, bh = cv2.boundingRect(mask.astype(np.uint8))
    h, w = mask.shape
    x0, y0, x1, y1 = max(x - r, 0), max(y - r, 0), min(x + bw + r, w), min(y + bh + r, h)
    se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE if kernel == "disc" else cv2.MORPH_RECT, (2 * r + 1,) * 2)
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = cv2.dilate(mask[y0:y1, x0:x1].astype(np.uint8), se) > 0
    return out


def _norm_format(fmt: str) -> str | None:
    f = fmt.lower().lstrip(".")
    f = _ALIASES.get(f, f)
    return f if f in _WRITABLE else None


def output_format(like: DecodedImage) -> str:
    """The format a result of ``like`` is written in when none is asked for: the input's, or PNG when
    cleanplate cannot write that (BMP, GIF, ...)."""
    return _norm_format(like.format or "") or "png"


def encode_image(pixels: np.ndarray, like: DecodedImage, *, fmt: str | None = None,
                 alpha: np.ndarray | None | Literal["keep"] = "keep", quality: int = 95) -> bytes:
    """Encode ``(H, W[, C])`` uint8/uint16 pixels (C in {1, 3}, RGB) with ``like``'s metadata.

    Args:
        fmt: "png", "jpeg"/"jpg", "webp" or "tiff" (any case); default ``like.format``, or PNG when
            we cannot write that format.
        alpha: "keep" re-attaches ``like.alpha``, None drops it, an ``(H, W)`` array is used.
        quality: 1..100 for JPEG and lossy WEBP (WEBP is lossless when ``like`` was a PNG).

    Gray stays gray, RGB stays RGB, alpha stays alpha (JPEG drops it). CMYK and P sources are
    written as RGB/RGBA, since ``pixels`` already are. 16-bit PNG/TIFF are written at 16 bits
    by OpenCV (16-bit gray+alpha as 16-bit RGBA; TIFF then loses EXIF/ICC, which OpenCV cannot
    write); JPEG/WEBP get 8 bits. EXIF and a matching ICC profile are kept.

    Raises:
        InputError: "bad_option" for an unknown format or quality out of range.
    """
    f = output_format(like) if fmt is None else _norm_format(fmt)
    if f is None:
        raise InputError(f"cannot write format {fmt!r} (png, jpeg, webp, tiff)", code=ErrorCode.BAD_OPTION)
    if not 1 <= quality <= 100:
        raise InputError(f"quality must be 1..100, got {quality}", code=ErrorCode.BAD_OPTION)
    px = pixels if pixels.ndim == 3 else pixels[..., None]
    if px.dtype not in (np.uint8, np.uint16) or px.shape[2] not in (1, 3):
        raise ValueError(f"pixels must be (H,W,1|3) uint8/uint16, got {pixels.shape} {pixels.dtype}")
    a = like.alpha if isinstance(alpha, str) else alpha
    if a is not None and f != "jpeg":
        if a.shape != px.shape[:2]:
            raise ValueError(f"alpha {a.shape} does not match pixels {px.shape[:2]}")
        if a.dtype != px.dtype:  # rescale to the pixels' depth
            a = _to8(a) if px.dtype == np.uint8 else a.astype(np.uint16) * 257
        px = np.dstack([px, a])
    if px.dtype == np.uint16 and f in ("jpeg", "webp"):
        px = _to8(px)
    icc = like.icc_profile if _icc_fits(like.icc_profile, 1 if px.shape[2] <= 2 else 3) else None
    if px.dtype == np.uint16:
        if px.shape[2] == 2:  # OpenCV writers have no gray+alpha
            px = px[..., [0, 0, 0, 1]]
        if px.shape[2] > 1:
            px = cv2.cvtColor(px, cv2.COLOR_RGBA2BGRA if px.shape[2] == 4 else cv2.COLOR_RGB2BGR)
        meta = [(cv2.IMAGE_METADATA_EXIF, like.exif.removeprefix(b"Exif\x00\x00")) if like.exif else None,
                (cv2.IMAGE_METADATA_ICCP, icc) if icc else None]
        meta = [m for m in meta if m is not None and f == "png"]
        if meta:
            ok, buf = cv2.imencodeWithMetadata(".png", px, [t for t, _ in meta],
                                               [np.frombuffer(d, np.uint8) for _, d in meta])
        else:
            ok, buf = cv2.imencode("." + f, px)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {px.shape} {px.dtype} {f}")
        return buf.tobytes()
    opts: dict[str, object] = {"PNG": {}, "JPEG": {"quality": quality},
                               "WEBP": {"quality": quality, "lossless": like.format == "PNG", "exact": True},  # exact: keep RGB under alpha 0
                               "TIFF": {"compression": "tiff_lzw"}}[_WRITABLE[f]]
    if like.exif:
        opts["exif"] = like.exif
    if icc:
        opts["icc_profile"] = icc
    out = io.BytesIO()
    Image.fromarray(px[..., 0] if px.shape[2] == 1 else px).save(out, _WRITABLE[f], **opts)
    return out.getvalue()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename).

    Parent directories are created. An existing file is replaced and keeps its permission bits;
    a new file gets 0o644 (not the temp file's 0o600). The temp file is removed on failure.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        perms = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        perms = 0o644
    tmp = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, perms)
        os.replace(tmp.name, path)
    except BaseException:
        try:
            os.unlink(tmp.name)
        except FileNotFoundError:
            pass
        raise


def format_for_path(path: str | os.PathLike) -> str:
    """"png", "jpeg", "webp" or "tiff" from the file extension (any case).

    Raises:
        InputError: "bad_option" for any other extension.
    """
    ext = os.path.splitext(os.fspath(path))[1]
    f = _norm_format(ext) if ext else None
    if f is None:
        raise InputError(f"cannot tell the image format from {os.fspath(path)!r} "
                         "(use .png, .jpg, .jpeg, .webp, .tif or .tiff)", code=ErrorCode.BAD_OPTION)
    return f
