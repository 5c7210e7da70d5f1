"""Tests for cleanplate.imaging on scikit-image's sample photos."""

from __future__ import annotations

import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps
from skimage import data as skdata

from cleanplate.compositing import CropBox, context_crop_box, crop_to_model, feather_alpha, paste_back
from cleanplate.errors import InputError
from cleanplate.imaging import (
    DecodedImage,
    decode_image,
    decode_mask,
    dilate_mask,
    encode_image,
    format_for_path,
    mask_from_alpha,
    validate_mask,
    write_atomic,
)

ASTRONAUT = skdata.astronaut()  # 512x512 RGB
COFFEE = skdata.coffee()  # 400x600 RGB
CHELSEA = skdata.chelsea()  # 300x451 RGB
CAMERA = skdata.camera()  # 512x512 gray
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def pil_bytes(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def cv2_png(rgb16: np.ndarray) -> bytes:
    code = cv2.COLOR_RGBA2BGRA if rgb16.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb16, code))
    assert ok
    return buf.tobytes()


def ramp_alpha(h: int, w: int) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))


def rgb16(img8: np.ndarray, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 257, img8.shape)
    return (img8.astype(np.uint32) * 257 - noise).clip(0, 65535).astype(np.uint16)  # uses the low byte


class _Raises:
    """pytest.raises(InputError) that also checks the error's code."""

    def __init__(self, code: str) -> None:
        self.code, self.ctx = code, pytest.raises(InputError)

    def __enter__(self):
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc: object) -> bool:
        handled = self.ctx.__exit__(*exc)
        assert self.info.value.code == self.code, (self.info.value.code, str(self.info.value))
        return handled


# ---------------------------------------------------------------- decoding


def test_decode_rgb_jpeg() -> None:
    img = decode_image(pil_bytes(Image.fromarray(ASTRONAUT), "JPEG", quality=95))
    assert (img.mode, img.format, img.size, img.alpha) == ("RGB", "JPEG", (512, 512), None)
    assert img.pixels.shape == (512, 512, 3) and img.pixels.dtype == np.uint8
    assert np.abs(img.pixels.astype(int) - ASTRONAUT).mean() < 3  # RGB order, not BGR
    assert img.rgb is img.pixels


def test_decode_rgba_png_exact() -> None:
    a = ramp_alpha(*COFFEE.shape[:2])
    img = decode_image(pil_bytes(Image.fromarray(np.dstack([COFFEE, a])), "PNG"))
    assert (img.mode, img.format, img.size) == ("RGBA", "PNG", (600, 400))
    assert np.array_equal(img.pixels, COFFEE) and np.array_equal(img.alpha, a)


def test_decode_gray_png_and_rgb_view() -> None:
    img = decode_image(pil_bytes(Image.fromarray(CAMERA), "PNG"))
    assert img.mode == "L" and img.pixels.shape == (512, 512, 1)
    assert np.array_equal(img.pixels[..., 0], CAMERA)
    assert img.rgb.shape == (512, 512, 3) and all(np.array_equal(img.rgb[..., i], CAMERA) for i in range(3))


def test_decode_cmyk_jpeg_becomes_rgb() -> None:
    img = decode_image(pil_bytes(Image.fromarray(CHELSEA).convert("CMYK"), "JPEG", quality=95))
    assert img.mode == "CMYK" and img.pixels.shape == (300, 451, 3) and img.icc_profile is None
    assert np.abs(img.pixels.astype(int) - CHELSEA).mean() < 4


def test_decode_palette_with_transparency() -> None:
    p = Image.fromarray(ASTRONAUT).quantize(32)
    idx = np.asarray(p)
    transparent = int(np.bincount(idx.ravel()).argmax())
    encoded = pil_bytes(p, "PNG", transparency=transparent)
    img = decode_image(encoded)
    assert img.mode == "P" and img.pixels.shape == (512, 512, 3) and img.alpha is not None
    assert np.array_equal(img.alpha == 0, idx == transparent)
    assert np.array_equal(img.pixels, np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")))
    opaque = decode_image(pil_bytes(p, "PNG"))  # no transparency -> plain RGB
    assert opaque.alpha is None and opaque.pixels.shape == (512, 512, 3)


def test_decode_bilevel_becomes_gray() -> None:
    img = decode_image(pil_bytes(Image.fromarray(CAMERA > 100), "PNG"))
    assert img.mode == "1" and img.pixels.dtype == np.uint8
    assert np.array_equal(img.pixels[..., 0], np.where(CAMERA > 100, 255, 0))


def test_decode_16bit_gray_png() -> None:
    g16 = rgb16(CAMERA)
    im = Image.fromarray(g16)
    assert im.mode == "I;16"
    img = decode_image(pil_bytes(im, "PNG"))
    assert img.pixels.dtype == np.uint16 and img.pixels.shape == (512, 512, 1)
    assert np.array_equal(img.pixels[..., 0], g16)
    assert np.array_equal(img.rgb[..., 1], np.round(g16 / 257).astype(np.uint8))


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_decode_16bit_rgb_and_rgba(ext: str) -> None:
    c16 = rgb16(CHELSEA)
    a16 = rgb16(ramp_alpha(300, 451), seed=1)
    for arr in (c16, np.dstack([c16, a16])):
        code = cv2.COLOR_RGBA2BGRA if arr.shape[2] == 4 else cv2.COLOR_RGB2BGR
        img = decode_image(cv2.imencode(ext, cv2.cvtColor(arr, code))[1].tobytes())
        assert img.pixels.dtype == np.uint16 and np.array_equal(img.pixels, c16)
        assert (img.alpha is None) if arr.shape[2] == 3 else np.array_equal(img.alpha, a16)


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestCam"
    return exif


def test_exif_orientation_6_jpeg() -> None:
    img = decode_image(pil_bytes(Image.fromarray(COFFEE), "JPEG", quality=95, exif=exif_with(6)))
    assert img.size == (400, 600) and img.pixels.shape == (600, 400, 3)
    assert np.abs(img.pixels.astype(int) - np.rot90(COFFEE, -1)).mean() < 3  # 90 degrees clockwise
    kept = Image.Exif()
    kept.load(img.exif)
    assert kept[0x0112] == 1 and kept[0x010F] == "TestCam"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation: int) -> None:
    small = CHELSEA[::4, ::4]
    encoded = pil_bytes(Image.fromarray(small), "PNG", exif=exif_with(orientation))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))))
    assert np.array_equal(decode_image(encoded).pixels, expected)
    # The OpenCV 16-bit path orients by itself; Pillow reads the same file as 8-bit (high byte).
    c16 = rgb16(small)
    enc16 = cv2.imencodeWithMetadata(".png", cv2.cvtColor(c16, cv2.COLOR_RGB2BGR), [cv2.IMAGE_METADATA_EXIF],
                                     [np.frombuffer(exif_with(orientation).tobytes()[6:], np.uint8)])[1].tobytes()
    img16 = decode_image(enc16)
    assert img16.pixels.dtype == np.uint16
    assert np.array_equal(img16.pixels >> 8, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(enc16)))))
    assert np.array_equal(np.sort(img16.pixels, axis=None), np.sort(c16, axis=None))  # low bytes kept


def test_icc_profile_kept_through_decode_and_encode() -> None:
    img = decode_image(pil_bytes(Image.fromarray(ASTRONAUT), "PNG", icc_profile=SRGB_ICC))
    assert img.icc_profile == SRGB_ICC
    for fmt in ("png", "jpeg", "webp", "tiff"):
        assert decode_image(encode_image(img.pixels, img, fmt=fmt)).icc_profile == SRGB_ICC, fmt


def png_with_size(width: int, height: int) -> bytes:
    png = pil_bytes(Image.new("RGB", (1, 1)), "PNG")
    ihdr = png[12:29]  # type + data of the first chunk
    assert ihdr[:4] == b"IHDR"
    body = ihdr[:4] + struct.pack(">II", width, height) + ihdr[12:]
    return png[:12] + body + struct.pack(">I", zlib.crc32(body)) + png[33:]


@pytest.mark.parametrize(("w", "h", "limit"), [(9000, 8000, None), (10000, 10000, 200_000_000),
                                               (100000, 100000, 10**12), (600, 400, 1000)])
def test_too_many_pixels(w: int, h: int, limit: int | None) -> None:
    kw = {} if limit is None else {"max_pixels": limit}
    data = png_with_size(w, h) if limit != 1000 else pil_bytes(Image.fromarray(COFFEE), "PNG")
    with _Raises("too_many_pixels") as info:
        decode_image(data, **kw)
    if limit in (None, 1000):  # our own check: names the size and the limit
        assert f"{w}x{h}" in str(info.value) and str(limit or 64_000_000) in str(info.value)


def test_unreadable_inputs(tmp_path) -> None:
    good = pil_bytes(Image.fromarray(ASTRONAUT), "PNG")
    for bad, code in ((b"not an image at all", "unsupported_image"), (b"", "unsupported_image"),
                      (good[: len(good) // 2], "unreadable_image")):
        with _Raises(code) as info:
            decode_image(bad)
        assert "\n" not in str(info.value)
    missing = tmp_path / "nope.png"
    with _Raises("unreadable_image") as info:
        decode_image(missing)
    assert "nope.png" in str(info.value)
    path = tmp_path / "ok.png"
    path.write_bytes(good)
    assert decode_image(str(path)).size == (512, 512)


# ---------------------------------------------------------------- masks


def test_decode_mask_threshold_8_and_16_bit() -> None:
    vals = np.array([[0, 127, 128, 255]], np.uint8)
    assert decode_mask(pil_bytes(Image.fromarray(vals), "PNG")).tolist() == [[False, False, True, True]]
    v16 = np.array([[0, 32767, 32768, 65535]], np.uint16)
    assert decode_mask(pil_bytes(Image.fromarray(v16), "PNG")).tolist() == [[False, False, True, True]]
    rgb = np.dstack([vals] * 3)
    assert decode_mask(pil_bytes(Image.fromarray(rgb), "JPEG", quality=100)).tolist() == [[False, False, True, True]]


def test_decode_mask_alpha() -> None:
    lum = np.full((2, 4), 255, np.uint8)
    alpha = np.array([[0, 127, 128, 255]] * 2, np.uint8)
    m = decode_mask(pil_bytes(Image.fromarray(np.dstack([lum, alpha])), "PNG"))
    assert m.dtype == bool and m.tolist() == [[False, False, True, True]] * 2
    opaque = np.dstack([np.array([[0, 255]], np.uint8), np.full((1, 2), 255, np.uint8)])
    assert decode_mask(pil_bytes(Image.fromarray(opaque), "PNG")).tolist() == [[False, True]]


def test_mask_from_alpha() -> None:
    a = ramp_alpha(300, 451)
    img = decode_image(pil_bytes(Image.fromarray(np.dstack([CHELSEA, a])), "PNG"))
    assert np.array_equal(mask_from_alpha(img), a < 128)
    with _Raises("no_alpha"):
        mask_from_alpha(decode_image(pil_bytes(Image.fromarray(CHELSEA), "PNG")))


def test_validate_mask() -> None:
    m = np.zeros((400, 600), bool)
    m[10:20, 30:40] = True
    assert validate_mask(m, (600, 400)) is m
    assert validate_mask(m.astype(np.uint8) * 255, (600, 400)).dtype == bool
    with _Raises("size_mismatch") as info:
        validate_mask(m, (400, 600))
    assert "600x400" in str(info.value) and "400x600" in str(info.value)
    with _Raises("empty_mask"):
        validate_mask(np.zeros((400, 600), bool), (600, 400))
    with _Raises("full_mask"):
        validate_mask(np.ones((400, 600), bool), (600, 400))


@pytest.mark.parametrize("r", [1, 5, 10, 25])
def test_dilate_disc_and_square_geometry(r: int) -> None:
    m = np.zeros((101, 101), bool)
    m[50, 50] = True
    disc = dilate_mask(m, r)
    # OpenCV's digital ellipse is a little fat; the relative error shrinks like perimeter/area
    assert abs(disc.sum() - np.pi * r * r) / (np.pi * r * r) < 1.5 / r
    assert disc[50, 50 - r : 51 + r].all() and not disc[50, 49 - r] and not disc[50, 51 + r]
    assert disc[50 - r : 51 + r, 50].all() and not disc[49 - r, 50] and not disc[51 + r, 50]
    square = dilate_mask(m, r, "square")
    assert square.sum() == (2 * r + 1) ** 2 and square[50 - r : 51 + r, 50 - r : 51 + r].all()


def test_dilate_matches_full_image_dilation() -> None:
    rng = np.random.default_rng(3)
    m = np.zeros((120, 90), bool)
    m[rng.integers(0, 120, 15), rng.integers(0, 90, 15)] = True
    m[0, 0] = m[119, 89] = True  # corners: the bbox shortcut must handle edges
    for r, kind, shape in ((7, "disc", cv2.MORPH_ELLIPSE), (4, "square", cv2.MORPH_RECT)):
        se = cv2.getStructuringElement(shape, (2 * r + 1, 2 * r + 1))
        assert np.array_equal(dilate_mask(m, r, kind), cv2.dilate(m.astype(np.uint8), se) > 0)
    zero = dilate_mask(m, 0)
    assert np.array_equal(zero, m) and zero is not m
    with _Raises("bad_option"):
        dilate_mask(m, -1)


# ---------------------------------------------------------------- crops


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_context_crop_box_properties() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        h, w = rng.integers(20, 1500, 2)
        res = int(rng.choice([256, 512, 1024]))
        m = np.zeros((h, w), bool)
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        m[y0 : y0 + rng.integers(1, h), x0 : x0 + rng.integers(1, w)] = True
        box = context_crop_box(m, res)
        bx0, by0, bx1, by1 = bbox(m)
        assert box.x0 <= bx0 and box.y0 <= by0 and box.x1 >= bx1 and box.y1 >= by1
        assert box.size >= min(res, max(h, w)) and box.size >= max(bx1 - bx0, by1 - by0) + 32
        for start, end, extent in ((box.x0, box.x1, w), (box.y0, box.y1, h)):
            if extent >= box.size:
                assert 0 <= start and end <= extent
            else:  # centred, overhanging both edges by the same amount (+-1)
                assert abs(-start - (end - extent)) <= 1
    with _Raises("empty_mask"):
        context_crop_box(np.zeros((10, 10), bool), 512)


def test_context_crop_box_values() -> None:
    m = np.zeros((400, 600), bool)
    m[100:140, 200:300] = True  # 100 x 40 bbox
    assert context_crop_box(m, 128) == CropBox(175, 45, 150)  # 100 + 2 * 25, centred on the bbox
    assert context_crop_box(m, 512) == CropBox(0, -56, 512)  # grown to 512, x shifted in, y centred
    corner = np.zeros((400, 600), bool)
    corner[:5, :5] = True
    assert context_crop_box(corner, 64) == CropBox(0, 0, 64)  # shifted back inside the image


def test_crop_to_model_shapes_and_exact_1to1() -> None:
    m = np.zeros((400, 600), bool)
    m[100:140, 200:300] = True
    box = context_crop_box(m, 256)
    assert box.size == 256
    crop, cm = crop_to_model(COFFEE, m, box, 256)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8 and cm.shape == (256, 256) and cm.dtype == bool
    assert np.array_equal(crop, COFFEE[box.y0 : box.y1, box.x0 : box.x1])
    assert np.array_equal(cm, m[box.y0 : box.y1, box.x0 : box.x1])


def test_crop_to_model_mask_is_conservative() -> None:
    rng = np.random.default_rng(5)
    m = np.zeros((512, 512), bool)
    m[rng.integers(0, 512, 40), rng.integers(0, 512, 40)] = True  # isolated pixels survive shrinking
    box = CropBox(0, 0, 512)
    for res in (200, 333):
        _, cm = crop_to_model(ASTRONAUT, m, box, res)
        ys, xs = np.nonzero(m)
        assert cm[(ys * res) // 512, (xs * res) // 512].all()
    _, big = crop_to_model(ASTRONAUT, m, box, 1024)
    assert big[np.nonzero(m)[0] * 2, np.nonzero(m)[1] * 2].all() and big.sum() >= 4 * m.sum()


def test_crop_to_model_pads_small_image() -> None:
    small = COFFEE[:60, :100]
    m = np.zeros((60, 100), bool)
    m[20:30, 40:50] = True
    box = context_crop_box(m, 512)
    assert box == CropBox(0, -20, 100)
    crop, cm = crop_to_model(small, m, box, 100)
    assert np.array_equal(crop, cv2.copyMakeBorder(small, 20, 20, 0, 0, cv2.BORDER_REFLECT_101))
    assert not cm[:20].any() and not cm[80:].any() and np.array_equal(cm[20:80], m)
    one = crop_to_model(small[:1, :1], np.ones((1, 1), bool), CropBox(-3, -3, 7), 7)[0]
    assert (one == small[0, 0]).all()


# ---------------------------------------------------------------- compositing


def test_feather_alpha_values() -> None:
    dilated = np.zeros((50, 50), bool)
    dilated[10:40, 10:40] = True
    mask = np.zeros_like(dilated)
    mask[24:26, 24:26] = True
    a = feather_alpha(mask, dilated, 4.0)
    assert a.dtype == np.float32 and (a[~dilated] == 0).all() and (a[mask] == 1).all()
    assert a[25, 10] == pytest.approx(0.25) and a[25, 11] == pytest.approx(0.5) and a[25, 20] == 1
    assert np.array_equal(feather_alpha(mask, dilated, 0), dilated.astype(np.float32))


def _native_case(name: str) -> DecodedImage:
    if name == "astronaut":
        return decode_image(pil_bytes(Image.fromarray(ASTRONAUT), "PNG"))
    if name == "coffee":
        return decode_image(pil_bytes(Image.fromarray(COFFEE), "PNG"))
    if name == "camera":
        return decode_image(pil_bytes(Image.fromarray(CAMERA), "PNG"))
    if name == "chelsea_rgba":
        return decode_image(pil_bytes(Image.fromarray(np.dstack([CHELSEA, ramp_alpha(300, 451)])), "PNG"))
    if name == "camera16":
        return decode_image(pil_bytes(Image.fromarray(rgb16(CAMERA)), "PNG"))
    if name == "chelsea16_rgba":
        return decode_image(cv2_png(np.dstack([rgb16(CHELSEA), rgb16(ramp_alpha(300, 451), 2)])))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "camera", "chelsea_rgba", "camera16", "chelsea16_rgba"])
@pytest.mark.parametrize(("res", "dil"), [(128, 6), (256, 3), (640, 9), (96, 60)])
def test_paste_back_exact_and_round_trip(name: str, res: int, dil: int) -> None:
    img = _native_case(name)
    h, w = img.height, img.width
    rng = np.random.default_rng(res + dil)
    mask = np.zeros((h, w), bool)
    cv2.ellipse(mask.view(np.uint8), (w // 3, h // 2), (w // 8, h // 12), 30, 0, 360, 1, -1)
    mask[h - 20 : h - 5, w - 70 : w - 2] = True  # near a corner, far from the ellipse
    mask = validate_mask(mask, img.size)
    dilated = dilate_mask(mask, dil)
    box = context_crop_box(mask, res)
    crop, cmask = crop_to_model(img.rgb, mask, box, res)
    assert crop.shape == (res, res, 3)
    fill = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    out = paste_back(img, fill, box, mask, dilated, feather_px=3.0)
    assert out.shape == img.pixels.shape and out.dtype == img.pixels.dtype
    assert np.array_equal(out[~dilated], img.pixels[~dilated])
    inside = np.zeros((h, w), bool)
    inside[max(box.y0, 0) : box.y1, max(box.x0, 0) : box.x1] = True
    assert np.array_equal(out[~inside], img.pixels[~inside])
    # alpha 1 on the mask: the fill, resized the documented way and brought to native depth
    interp = cv2.INTER_AREA if box.size < res else cv2.INTER_CUBIC
    big = fill if box.size == res else cv2.resize(fill, (box.size, box.size), interpolation=interp)
    padded = np.zeros((h + 2 * box.size, w + 2 * box.size, 3), np.uint8)
    padded[box.y0 + box.size : box.y1 + box.size, box.x0 + box.size : box.x1 + box.size] = big
    expected = padded[box.size : box.size + h, box.size : box.size + w]
    if img.pixels.shape[2] == 1:
        expected = ((expected.astype(np.int64) @ np.array([19595, 38470, 7471]) + 0x8000) >> 16)[..., None]
    expected = expected.astype(np.int64) * (257 if img.pixels.dtype == np.uint16 else 1)
    assert np.array_equal(out[mask], expected[mask])
    changed = dilated & ~mask
    assert (out[changed] != img.pixels[changed]).any()  # the feather band really blends

    back = decode_image(encode_image(out, img))  # PNG keeps every bit and the alpha channel
    assert (back.size, back.mode, back.pixels.dtype) == (img.size, img.mode, img.pixels.dtype)
    assert np.array_equal(back.pixels, out)
    assert (back.alpha is None) == (img.alpha is None)
    if img.alpha is not None:
        assert np.array_equal(back.alpha, img.alpha)


def test_paste_back_plain_array_and_window_edge() -> None:
    mask = np.zeros((400, 600), bool)
    mask[150:250, 250:350] = True
    dilated = dilate_mask(mask, 40)  # reaches past the 150 px window
    box = context_crop_box(mask, 64)
    assert box.x0 > 210  # the window cuts through `dilated`
    out = paste_back(COFFEE, np.zeros((64, 64, 3), np.uint8), box, mask, dilated)
    assert np.array_equal(out[:, : box.x0], COFFEE[:, : box.x0])
    fade = np.abs(out[200, box.x0 : box.x0 + 10].astype(int) - COFFEE[200, box.x0 : box.x0 + 10]).sum(axis=1)
    assert fade[0] < fade[3] <= fade[9]  # weight ramps up from the window edge
    small = np.zeros((512, 512), bool)
    small[30:34, 30:34] = True
    gray = paste_back(CAMERA, np.full((64, 64, 3), 255, np.uint8), CropBox(0, 0, 64), small, small)
    assert gray.shape == (512, 512) and np.array_equal(gray[small], np.full(16, 255))
    assert np.array_equal(gray[~small], CAMERA[~small])


# ---------------------------------------------------------------- encoding and files


def test_encode_modes_and_formats() -> None:
    a = ramp_alpha(300, 451)
    rgba = decode_image(pil_bytes(Image.fromarray(np.dstack([CHELSEA, a])), "PNG"))
    jpg = decode_image(encode_image(rgba.pixels, rgba, fmt="JPG", quality=90))
    assert jpg.format == "JPEG" and jpg.mode == "RGB" and jpg.alpha is None
    webp = decode_image(encode_image(rgba.pixels, rgba, fmt="webp"))  # lossless: the source was PNG
    assert webp.mode == "RGBA" and np.array_equal(webp.pixels, CHELSEA) and np.array_equal(webp.alpha, a)
    dropped = decode_image(encode_image(rgba.pixels, rgba, alpha=None))
    assert dropped.mode == "RGB" and dropped.alpha is None
    other = decode_image(encode_image(rgba.pixels[..., :1], rgba, alpha=255 - a, fmt="tiff"))
    assert other.mode == "LA" and np.array_equal(other.alpha, 255 - a)

    gray = decode_image(pil_bytes(Image.fromarray(CAMERA), "JPEG"))
    assert decode_image(encode_image(gray.pixels, gray)).mode == "L"
    cmyk = decode_image(pil_bytes(Image.fromarray(CHELSEA).convert("CMYK"), "JPEG"))
    assert decode_image(encode_image(cmyk.pixels, cmyk)).mode == "RGB"
    gif = decode_image(pil_bytes(Image.fromarray(CHELSEA).quantize(64), "GIF"))
    assert gif.format == "GIF" and decode_image(encode_image(gif.pixels, gif)).format == "PNG"
    with _Raises("bad_option"):
        encode_image(gray.pixels, gray, fmt="bmp")


def test_encode_16bit_keeps_depth_and_metadata() -> None:
    c16 = rgb16(COFFEE)
    src = cv2.imencodeWithMetadata(".png", cv2.cvtColor(c16, cv2.COLOR_RGB2BGR),
                                   [cv2.IMAGE_METADATA_EXIF, cv2.IMAGE_METADATA_ICCP],
                                   [np.frombuffer(exif_with(6).tobytes()[6:], np.uint8), np.frombuffer(SRGB_ICC, np.uint8)])
    img = decode_image(src[1].tobytes())
    assert img.size == (400, 600) and img.icc_profile == SRGB_ICC
    back = decode_image(encode_image(img.pixels, img))
    assert np.array_equal(back.pixels, img.pixels) and back.icc_profile == SRGB_ICC
    exif = Image.Exif()
    exif.load(back.exif)
    assert exif[0x0112] == 1 and exif[0x010F] == "TestCam"  # not rotated twice
    tif = decode_image(encode_image(img.pixels, img, fmt="tiff"))
    assert tif.pixels.dtype == np.uint16 and np.array_equal(tif.pixels, img.pixels)
    jpg = decode_image(encode_image(img.pixels, img, fmt="jpeg"))
    assert jpg.pixels.dtype == np.uint8 and np.abs(jpg.pixels.astype(int) - img.rgb).mean() < 3
    g16 = decode_image(pil_bytes(Image.fromarray(rgb16(CAMERA)), "PNG"))
    with_alpha = decode_image(encode_image(g16.pixels, g16, alpha=ramp_alpha(512, 512)))
    assert with_alpha.pixels.dtype == np.uint16 and np.array_equal(with_alpha.alpha, ramp_alpha(512, 512).astype(np.uint16) * 257)


def test_write_atomic(tmp_path) -> None:
    target = tmp_path / "a" / "b" / "out.png"
    write_atomic(target, b"first")
    os.chmod(target, 0o640)
    write_atomic(str(target), b"second")
    assert target.read_bytes() == b"second" and (target.stat().st_mode & 0o777) == 0o640
    assert os.listdir(target.parent) == ["out.png"]
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert os.listdir(target.parent) == ["out.png"] and target.read_bytes() == b"second"


def test_format_for_path() -> None:
    assert [format_for_path(p) for p in ("x.PNG", "a/b.jpg", "c.jpeg", "d.webp", "e.tif", "f.TIFF")] == \
        ["png", "jpeg", "jpeg", "webp", "tiff", "tiff"]
    for bad in ("x.bmp", "noext", "dir.png/"):
        with _Raises("bad_option"):
            format_for_path(bad)
