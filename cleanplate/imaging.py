"""Image I/O, mask handling, model crops and exact compositing.

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
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from cleanplate.errors import CleanplateError, InputError

DEFAULT_MAX_PIXELS: int = 64_000_000  # decompression-bomb limit
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})  # what folders are read for
WRITABLE_SUFFIXES = IMAGE_SUFFIXES - {".bmp"}  # what outputs can be (see format_for_path)

_ORIENTATION = 0x0112
_WRITABLE = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "tiff": "TIFF"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "tiff": "image/tiff"}  # of _WRITABLE
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


@dataclass(frozen=True)
class CropBox:
    """Square window ``[x0, x0 + size) x [y0, y0 + size)`` in source px; may extend past the image."""

    x0: int
    y0: int
    size: int

    @property
    def x1(self) -> int:
        return self.x0 + self.size

    @property
    def y1(self) -> int:
        return self.y0 + self.size


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
            raise InputError(f"{name} is too large to decode: {e}", code="too_many_pixels") from e
        except UnidentifiedImageError as e:
            if raw.startswith(_SIGNATURES) or raw[8:12] == b"WEBP":
                raise InputError(f"cannot read {name}: its header is corrupt", code="unreadable_image") from e
            raise InputError(f"cannot read {name}: not an image format this server reads (PNG, JPEG, WEBP, TIFF, "
                             f"BMP, GIF)", code="unsupported_image") from e
        except _DECODE_ERRORS as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise InputError(f"cannot read {name}: {reason}", code="unreadable_image") from e


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
                             code="too_many_pixels")
        tile = im.tile[0].args if im.tile else None  # before getexif(): it may load (PNG) and clear tile
        rawmode = tile[0] if isinstance(tile, tuple) else tile
        orientation, exif = _exif(im)
        if im.mode in ("RGB", "RGBA") and isinstance(rawmode, str) and ";16" in rawmode:
            # Pillow would silently drop to 8 bits per channel; OpenCV keeps 16.
            arr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is None or arr.ndim != 3:
                raise InputError(f"cannot read {name}: OpenCV could not decode it", code="unreadable_image")
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
                         code="no_alpha")
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
        raise InputError(f"mask is {got} but the image is {w}x{h}", code="size_mismatch")
    mask = mask if mask.dtype == bool else mask != 0
    if not mask.any():
        raise InputError("mask is empty: nothing to remove", code="empty_mask")
    if mask.all():
        raise InputError("mask covers the whole image: nothing left to fill from", code="full_mask")
    return mask


def dilate_mask(mask: np.ndarray, dilate_px: int, kernel: Literal["disc", "square"] = "disc") -> np.ndarray:
    """Grow a ``(H, W)`` bool mask by ``dilate_px`` px (structuring element ``2r+1`` wide: an
    ellipse for "disc", a rectangle for "square"). Returns a new ``(H, W)`` bool array.

    Raises:
        InputError: "bad_option" for a negative or non-integer radius or an unknown kernel.
    """
    if isinstance(dilate_px, bool) or not isinstance(dilate_px, (int, np.integer)) or dilate_px < 0:
        raise InputError(f"dilation must be a whole number of pixels >= 0, got {dilate_px!r}", code="bad_option")
    if kernel not in ("disc", "square"):
        raise InputError(f"unknown dilation kernel {kernel!r} (disc or square)", code="bad_option")
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


def context_crop_box(mask: np.ndarray, resolution: int, *, margin: float = 0.25,
                     min_margin_px: int = 16) -> CropBox:
    """Square window (px) around the bbox of a ``(H, W)`` bool mask, for a model of ``resolution``.

    ``side = ceil(m + 2 * max(margin * m, min_margin_px))`` with ``m`` the longer bbox side, then at
    least ``min(resolution, max(H, W))`` so small masks run at 1:1 scale with more context. Centred on
    the bbox, shifted inside the image on each axis at least ``side`` long, else centred on the
    image on that axis (padded later). Always contains the whole bbox.

    Raises:
        InputError: "empty_mask"; "bad_option" for resolution < 1 or negative margins.
    """
    if resolution < 1 or margin < 0 or min_margin_px < 0:
        raise InputError(f"bad crop options: resolution={resolution}, margin={margin}, "
                         f"min_margin_px={min_margin_px}", code="bad_option")
    if not mask.any():
        raise InputError("mask is empty: nothing to remove", code="empty_mask")
    h, w = mask.shape
    bx, by, bw, bh = cv2.boundingRect(mask.astype(np.uint8))
    m = max(bw, bh)
    side = int(np.ceil(m + 2 * max(margin * m, min_margin_px)))
    side = max(side, min(resolution, max(h, w)))

    def place(start: int, length: int, extent: int) -> int:
        if extent >= side:
            return min(max(start - (side - length) // 2, 0), extent - side)
        return -((side - extent) // 2)

    return CropBox(place(bx, bw, w), place(by, bh, h), side)


def _resize_square(img: np.ndarray, size: int, *, shrink: int = cv2.INTER_AREA,
                   enlarge: int = cv2.INTER_CUBIC) -> np.ndarray:
    if img.shape[0] == size:
        return img
    return cv2.resize(img, (size, size), interpolation=shrink if size < img.shape[0] else enlarge)


class _Enlarged:
    """Row strips of ``cv2.resize(img, (size, size), INTER_CUBIC)`` without the whole ``size``-square image.

    The horizontal pass is one float ``cv2.resize`` to ``(R, size)``; the vertical pass is done per strip with
    OpenCV's bicubic taps (A = -0.75, edge rows clamped; ``resize.cpp``). Equal to the uint8 ``cv2.resize``
    up to OpenCV's fixed-point rounding (at most 1 level); memory is ``R x size`` floats plus one strip.
    """

    def __init__(self, img: np.ndarray, size: int, cols: tuple[int, int]) -> None:
        wide = cv2.resize(img.astype(np.float32), (size, img.shape[0]), interpolation=cv2.INTER_CUBIC)
        self.wide, self.size = np.ascontiguousarray(wide[:, cols[0]:cols[1]]), size

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop-1`` (``(stop - start, cols, 3)`` uint8)."""
        a, src = -0.75, self.wide.shape[0]
        pos = (np.arange(start, stop, dtype=np.float64) + 0.5) * (src / self.size) - 0.5
        base = np.floor(pos)
        t = pos - base
        taps = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1]
        taps.append(1 - taps[0] - taps[1] - taps[2])
        out = np.zeros((stop - start, *self.wide.shape[1:]), np.float32)
        for k, w in enumerate(taps):
            out += w.astype(np.float32)[:, None, None] * self.wide[np.clip(base.astype(np.int64) - 1 + k, 0, src - 1)]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def crop_to_model(rgb: np.ndarray, mask: np.ndarray, box: CropBox, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``box`` out of ``rgb`` ``(H, W, 3)`` uint8 and ``mask`` ``(H, W)`` bool and resize to the model.

    Window parts outside the image are reflected (BORDER_REFLECT_101; replicated for 1 px images)
    in ``rgb`` and unmasked in ``mask``. The mask is resized as float and thresholded at > 0, so any
    partial coverage counts as masked.

    Returns:
        ``(crop, crop_mask)``: ``(R, R, 3)`` uint8 and ``(R, R)`` bool with ``R = resolution``.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or mask.shape != rgb.shape[:2]:
        raise ValueError(f"crop_to_model wants (H,W,3) uint8 + (H,W) mask, got {rgb.shape} {rgb.dtype}, {mask.shape}")
    h, w = mask.shape
    ix0, iy0, ix1, iy1 = max(box.x0, 0), max(box.y0, 0), min(box.x1, w), min(box.y1, h)
    if ix0 >= ix1 or iy0 >= iy1:
        raise ValueError(f"crop box {box} does not overlap the {w}x{h} image")
    pads = (iy0 - box.y0, box.y1 - iy1, ix0 - box.x0, box.x1 - ix1)  # top, bottom, left, right
    region = rgb[iy0:iy1, ix0:ix1]
    border = cv2.BORDER_REFLECT_101 if min(region.shape[:2]) > 1 else cv2.BORDER_REPLICATE
    crop = cv2.copyMakeBorder(region, *pads, border)
    cmask = cv2.copyMakeBorder(mask[iy0:iy1, ix0:ix1].astype(np.float32), *pads, cv2.BORDER_CONSTANT, value=0)
    crop = _resize_square(crop, resolution)
    cmask = _resize_square(cmask, resolution, enlarge=cv2.INTER_LINEAR) > 0
    return crop, cmask


def feather_alpha(mask: np.ndarray, dilated: np.ndarray, feather_px: float) -> np.ndarray:
    """Blend weights, ``(H, W)`` float32 in [0, 1].

    0 outside ``dilated | mask``; inside, ``min(1, d / feather_px)`` with ``d`` the exact L2
    distance (px) to the nearest pixel outside it; 1 on ``mask``. ``feather_px <= 0`` gives a hard
    edge. Image borders do not count as "outside".
    """
    region = dilated | mask
    if feather_px <= 0:
        return region.astype(np.float32)
    dist = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    alpha = np.minimum(dist / np.float32(feather_px), 1).astype(np.float32)
    alpha[mask] = 1
    return alpha


_BLEND_ROWS = 256  # rows blended in float at a time by paste_back


def _bbox(region: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]] | tuple[None, None]:
    """Row and column bounds ``(first, last + 1)`` of the True pixels of a 2-D bool array, or (None, None)."""
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return None, None
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def paste_back(image: DecodedImage | np.ndarray, result_crop: np.ndarray, box: CropBox, mask: np.ndarray,
               dilated: np.ndarray, *, feather_px: float | None = None) -> np.ndarray:
    """Blend the model output back over the native pixels.

    Args:
        image: a DecodedImage (its ``pixels`` are used) or an ``(H, W[, C])`` uint8/uint16 array.
        result_crop: ``(R, R, 3)`` uint8 RGB model output for ``box``.
        box: the window given to :func:`crop_to_model`.
        mask, dilated: ``(H, W)`` bool; the fill is feathered over ``feather_px`` px (default 4)
            inside ``dilated`` and fully opaque on ``mask``.

    Gray natives get the ITU-R 601 luma of the fill (as Pillow's "L"); uint16 natives get
    ``fill * 257``. Pixels with zero weight (outside ``dilated`` or outside the window) are copied
    bit-exactly. Only the window is blended, so memory stays small on huge photos.

    Returns:
        A new array with the shape and dtype of the native pixels.
    """
    native = image.pixels if isinstance(image, DecodedImage) else np.asarray(image)
    nat = native if native.ndim == 3 else native[..., None]
    h, w, c = nat.shape
    if nat.dtype not in (np.uint8, np.uint16) or c not in (1, 3):
        raise ValueError(f"native pixels must be (H,W,1|3) uint8/uint16, got {native.shape} {native.dtype}")
    if result_crop.dtype != np.uint8 or result_crop.ndim != 3 or result_crop.shape[2] != 3 \
            or result_crop.shape[0] != result_crop.shape[1]:
        raise ValueError(f"result_crop must be (R,R,3) uint8, got {result_crop.shape} {result_crop.dtype}")
    if mask.shape != (h, w) or dilated.shape != (h, w):
        raise ValueError(f"mask {mask.shape} / dilated {dilated.shape} do not match pixels {(h, w)}")
    out = nat.copy()
    ix0, iy0, ix1, iy1 = max(box.x0, 0), max(box.y0, 0), min(box.x1, w), min(box.y1, h)
    if ix0 >= ix1 or iy0 >= iy1:
        return out.reshape(native.shape)
    # Only the bbox of the fill region (+1 px, so the distance transform sees the zeros around it)
    # goes through float, in row strips: a big mask on a 40 MP photo stays a few MiB of float.
    ys, xs = _bbox(dilated[iy0:iy1, ix0:ix1] | mask[iy0:iy1, ix0:ix1])
    if ys is None:
        return out.reshape(native.shape)
    # Grow the window by 1 px inside the image, marked unfilled, so the feather fades to 0 at a
    # window edge that cuts through `dilated` instead of ending in a hard seam.
    gx0, gy0, gx1, gy1 = max(ix0 - 1, 0), max(iy0 - 1, 0), min(ix1 + 1, w), min(iy1 + 1, h)
    sx0, sy0 = max(ix0 + xs[0] - 1, gx0), max(iy0 + ys[0] - 1, gy0)
    sx1, sy1 = min(ix0 + xs[1] + 1, gx1), min(iy0 + ys[1] + 1, gy1)
    inside = np.zeros((sy1 - sy0, sx1 - sx0), bool)
    inside[max(iy0 - sy0, 0):iy1 - sy0, max(ix0 - sx0, 0):ix1 - sx0] = True
    m = mask[sy0:sy1, sx0:sx1] & inside
    alpha = feather_alpha(m, dilated[sy0:sy1, sx0:sx1] & inside, 4.0 if feather_px is None else feather_px)
    # the filled part: the sub-box clipped to the window
    fx0, fy0, fx1, fy1 = max(sx0, ix0), max(sy0, iy0), min(sx1, ix1), min(sy1, iy1)
    alpha = alpha[fy0 - sy0:fy1 - sy0, fx0 - sx0:fx1 - sx0]
    # An enlarged fill is made strip by strip (a 40 MP window would be 120 MB of uint8 at once).
    if box.size > result_crop.shape[0]:
        enlarged = _Enlarged(result_crop, box.size, (fx0 - box.x0, fx1 - box.x0))
        fill_rows = lambda r0, r1: enlarged.rows(fy0 - box.y0 + r0, fy0 - box.y0 + r1)  # noqa: E731
    else:
        fill = _resize_square(result_crop, box.size)[fy0 - box.y0:fy1 - box.y0, fx0 - box.x0:fx1 - box.x0]
        fill_rows = lambda r0, r1: fill[r0:r1]  # noqa: E731
    scale, top = (257 if nat.dtype == np.uint16 else 1), float(np.iinfo(nat.dtype).max)
    for r0 in range(0, fy1 - fy0, _BLEND_ROWS):
        a = alpha[r0:r0 + _BLEND_ROWS, :, None]
        f = fill_rows(r0, r0 + a.shape[0])
        if c == 1:
            f = np.asarray(Image.fromarray(np.ascontiguousarray(f)).convert("L"))[..., None]
        region = out[fy0 + r0:fy0 + r0 + a.shape[0], fx0:fx1]
        base = region.astype(np.float32)
        blended = np.clip(np.rint(base + a * (f.astype(np.float32) * scale - base)), 0, top).astype(nat.dtype)
        region[...] = np.where(a > 0, blended, region)
    return out.reshape(native.shape)


def _norm_format(fmt: str) -> str | None:
    f = fmt.lower().lstrip(".")
    f = _ALIASES.get(f, f)
    return f if f in _WRITABLE else None


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
    f = (_norm_format(like.format or "") or "png") if fmt is None else _norm_format(fmt)
    if f is None:
        raise InputError(f"cannot write format {fmt!r} (png, jpeg, webp, tiff)", code="bad_option")
    if not 1 <= quality <= 100:
        raise InputError(f"quality must be 1..100, got {quality}", code="bad_option")
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
                         "(use .png, .jpg, .jpeg, .webp, .tif or .tiff)", code="bad_option")
    return f
