"""Model crops and exact compositing: the context window around a mask, the crop the model sees, and the
feathered paste-back that leaves every pixel outside the dilated mask bit-exact (docs/DESIGN.md, "One
removal", steps 3 and 5).

Conventions as :mod:`cleanplate.imaging`: arrays are ``(H, W[, C])`` RGB, masks are ``bool`` (True =
remove), distances are source pixels (px).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .errors import ErrorCode, InputError
from .imaging import DecodedImage


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
                         f"min_margin_px={min_margin_px}", code=ErrorCode.BAD_OPTION)
    if not mask.any():
        raise InputError("mask is empty: nothing to remove", code=ErrorCode.EMPTY_MASK)
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
    bit-exactly. The fill is ``result_crop`` resized to the window (``cv2.resize``: area when shrinking;
    bicubic when enlarging, made strip by strip by :class:`_Enlarged`, within 1 level of ``cv2.resize``).
    Only the bbox of the filled pixels goes through float, in strips of 256 rows, so a big mask on a 40 MP
    photo costs a few MiB beyond the output copy.

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
