"""Synthetic e-commerce training triplets for object removal, in RORem's ``meta.json`` format.

Each item is a ``(source, mask, GT)`` triplet of ``size x size`` images:

* **GT**: a clean "product photo". Either a procedural studio shot (a gradient, textured or flat
  backdrop, one or two shaded products such as boxes, bottles, cylinders, spheres or shoe-like
  blobs, soft contact shadows and sensor noise) or a random crop of a photo bundled with
  scikit-image (none of them needs a download).
* **source**: GT with what storefronts paste on top: promo text, semi-transparent watermarks
  (tiled or diagonal), badges / stickers with drop shadows, corner logos, or a mix of two.
* **mask**: every pixel the overlay touched (alpha > 8/255, drop shadows included), dilated by
  1-2 px. Outside the mask ``source == GT`` exactly.

Determinism: item ``i`` depends only on ``(seed, i, cfg)`` (its RNG is seeded with ``[seed, i]``),
so a seed gives byte-identical files whatever ``n`` is, *on one machine*. The fonts found under
``/usr/share/fonts`` (plus Pillow's built-in scalable font) are part of the input: a machine with
other fonts, or other Pillow / FreeType / OpenCV builds, produces other pixels.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cleanplate import imaging
from cleanplate.errors import ErrorCode, InputError

TRAIN_PHOTOS: tuple[str, ...] = (
    "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
    "coins", "camera", "moon", "brick", "grass", "gravel", "clock", "page",
)
DEV_PHOTOS: tuple[str, ...] = ("astronaut", "rocket", "stereo_motorcycle")
OVERLAY_KINDS: tuple[str, ...] = ("text", "watermark", "badge", "logo", "mixed")
_KIND_P = (0.4, 0.2, 0.2, 0.1, 0.1)
_FONT_DIRS = ("/usr/share/fonts",)
_BICUBIC, _BOX = Image.Resampling.BICUBIC, Image.Resampling.BOX

PROMO_WORDS = (
    "SALE", "-50%", "NEW", "FREE SHIPPING", "BEST PRICE", "$19.99", "LIMITED", "HOT", "BUY 1 GET 1",
    "ONLY TODAY", "20% OFF", "-30%", "MEGA SALE", "€9.99", "CLEARANCE", "TOP SELLER", "70% OFF",
    "BLACK FRIDAY", "DEAL", "NEW ARRIVAL", "$4.50", "2 FOR 1", "LAST CHANCE", "In stock",
)
BADGE_WORDS = ("SALE", "-30%", "NEW", "HOT", "$9.99", "BEST\nSELLER", "TOP", "-15%", "50%\nOFF",
               "FREE", "NEW\nIN", "ECO", "€29", "1+1")
WATERMARK_WORDS = ("SAMPLE", "© shopname", "PREVIEW", "www.bestdeals.com", "STOCK PHOTO",
                   "watermark", "@myshop", "DO NOT COPY", "© 2024 Market")
BRANDS = ("ACME", "nordic", "Lumo", "VELTA", "kiko&co", "ORBIS", "Zenit")


@dataclass(frozen=True)
class SynthConfig:
    size: int = 256  # output square side in px
    photo_fraction: float = 0.5  # share of backgrounds cropped from real photos
    photos: tuple[str, ...] = TRAIN_PHOTOS

    def __post_init__(self) -> None:
        if not 64 <= int(self.size) <= 4096:
            raise InputError(f"size must be in 64..4096, got {self.size}", code=ErrorCode.BAD_OPTION)
        if not 0.0 <= self.photo_fraction <= 1.0:
            raise InputError("photo_fraction must be in [0, 1]", code=ErrorCode.BAD_OPTION)
        if self.photo_fraction > 0 and not self.photos:
            raise InputError("photo_fraction > 0 needs at least one photo", code=ErrorCode.BAD_OPTION)


# ---------------------------------------------------------------- resources
@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """An skimage.data photo as (H, W, 3) uint8 (gray -> RGB, RGBA -> RGB, stereo pair -> left)."""
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if name.startswith("_") or not callable(fn):
        raise InputError(f"unknown skimage.data photo {name!r}", code=ErrorCode.BAD_OPTION)
    img = fn()
    img = img[0] if isinstance(img, tuple) else img
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


@lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    """Fonts used for text; ``""`` is Pillow's built-in scalable font (always present)."""
    found: list[str] = []
    for base in _FONT_DIRS:
        for root, _, files in os.walk(base):
            found += [os.path.join(root, f) for f in files if f.lower().endswith((".ttf", ".otf"))]
    return ("",) + tuple(sorted(found))


@lru_cache(maxsize=1024)
def load_font(path: str, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A font from :func:`font_paths` at ``size`` px; "" or an unreadable file gives Pillow's built-in font."""
    if path:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size=size)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _vivid(rng) -> tuple[int, int, int]:
    h, s, v = rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))


def _pastel(rng) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.82, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def _contrast(rgb) -> tuple[int, int, int]:
    return (20, 20, 20) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (255, 255, 255)


def _text_color(rng) -> tuple[int, int, int]:
    r = rng.random()
    if r < 0.5:
        return (255, 255, 255) if r < 0.2 else (15, 15, 15) if r < 0.35 else (225, 20, 30)
    return _vivid(rng)


# ---------------------------------------------------------------- backgrounds
def _noise(rng, s: int, cells: int) -> np.ndarray:
    return cv2.resize(rng.random((cells, cells), dtype=np.float32), (s, s), interpolation=cv2.INTER_CUBIC)


def _texture(rng, s: int) -> tuple[np.ndarray, str]:
    """(s, s, 3) float32 wood / fabric / marble."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    if rng.random() < 0.5:
        yy, xx = xx, yy
    kind = _pick(rng, ("wood", "fabric", "marble"))
    if kind == "wood":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * rng.uniform(6, 18) + _noise(rng, s, 5) * rng.uniform(1, 3)))
        grain = cv2.GaussianBlur(rng.random((s, s), dtype=np.float32), (0, 0), sigmaX=8, sigmaY=0.6)
        t = np.clip(t ** 1.5 * 0.8 + (grain - 0.5) * 3, 0, 1)
        base = np.array([rng.uniform(90, 140), rng.uniform(55, 85), rng.uniform(25, 50)], np.float32)
        c0, c1 = base, np.minimum(base * rng.uniform(1.5, 1.9), 255)
    elif kind == "fabric":
        f = rng.uniform(40, 90)
        weave = 0.5 + 0.25 * (np.sin(2 * np.pi * xx * f) * np.sin(2 * np.pi * yy * f))
        streak = cv2.GaussianBlur(rng.random((s, s), dtype=np.float32), (0, 0), sigmaX=5, sigmaY=0.5)
        t = np.clip(weave + (streak - 0.5) * 3 + (_noise(rng, s, 4) - 0.5) * 0.3, 0, 1)
        c1 = np.array(_vivid(rng), np.float32) * rng.uniform(0.5, 1.0) if rng.random() < 0.5 else _pastel(rng)
        c0 = c1 * 0.7
    else:
        turb = sum(np.abs(_noise(rng, s, 3 * 2 ** o) - 0.5) / 2 ** o for o in range(4))
        phase = xx * rng.uniform(1, 3) + yy * rng.uniform(0, 2) + turb * 3
        t = (0.5 + 0.5 * np.sin(2 * np.pi * phase)) ** 4
        c0 = _pastel(rng) * rng.uniform(0.95, 1.0)
        c1 = c0 * rng.uniform(0.45, 0.8)
    return c0 * (1 - t[..., None]) + c1 * t[..., None], kind


def _backdrop(rng, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    top, bottom = _pastel(rng), _pastel(rng) * rng.uniform(0.8, 1.0)
    if rng.random() < 0.5:
        t = yy ** rng.uniform(0.7, 1.6)
    else:
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.6)
        t = np.clip(np.hypot(xx - cx, yy - cy) / rng.uniform(0.6, 1.0), 0, 1)
    return top * (1 - t[..., None]) + bottom * t[..., None]


def _product(rng, img: np.ndarray) -> None:
    """Draw one shaded product with a contact shadow into img (float32, in place)."""
    s = img.shape[0]
    kind = _pick(rng, ("box", "bottle", "cylinder", "sphere", "shoe"))
    h = s * rng.uniform(0.3, 0.65)
    w = h * (rng.uniform(1.1, 1.8) if kind == "shoe" else 1.0 if kind == "sphere" else rng.uniform(0.35, 0.9))
    cx, bot = s * rng.uniform(0.25, 0.75), s * rng.uniform(0.72, 0.93)
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, bot - h, bot
    m = np.zeros((s, s), np.uint8)
    r = int(min(w, h) * rng.uniform(0.05, 0.2))
    P = lambda x, y: (int(round(x)), int(round(y)))  # noqa: E731
    if kind in ("box", "cylinder", "bottle"):
        top = y0 + (h * 0.3 if kind == "bottle" else 0)
        cv2.rectangle(m, P(x0 + r, top), P(x1 - r, y1), 255, -1)
        cv2.rectangle(m, P(x0, top + r), P(x1, y1 - r), 255, -1)
        for px, py in ((x0 + r, top + r), (x1 - r, top + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
            cv2.circle(m, P(px, py), r, 255, -1)
        if kind == "cylinder":
            cv2.ellipse(m, P(cx, y1 - w * 0.12), P(w / 2, w * 0.12), 0, 0, 360, 255, -1)
        if kind == "bottle":
            nw = w * rng.uniform(0.25, 0.45)
            cv2.rectangle(m, P(cx - nw / 2, y0 + h * 0.05), P(cx + nw / 2, top + r + 2), 255, -1)
            cv2.ellipse(m, P(cx, top + r), P(w / 2, r + 2), 0, 180, 360, 255, -1)
    elif kind == "sphere":
        cv2.circle(m, P(cx, y1 - h / 2), int(h / 2), 255, -1)
    else:
        ang = np.sort(rng.uniform(0, 2 * np.pi, 9))
        px = cx + np.cos(ang) * w / 2 * rng.uniform(0.6, 1, 9)
        pts = np.stack([px, y1 - h * 0.35 + np.sin(ang) * h * 0.35], 1)
        pts[:, 1] = np.minimum(pts[:, 1], y1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 255)
        m = ((cv2.GaussianBlur(m, (0, 0), max(2, w / 12)) > 127) * 255).astype(np.uint8)
    a = cv2.GaussianBlur(m.astype(np.float32) / 255, (0, 0), 0.7)
    rows = np.flatnonzero(m.any(axis=1))
    y1 = float(rows[-1]) if rows.size else y1
    # contact shadow first, then the object
    sh = np.zeros((s, s), np.float32)
    cv2.ellipse(sh, P(cx + s * rng.uniform(-0.04, 0.04), y1), P(w * 0.6, h * 0.06 + 3), 0, 0, 360, 1.0, -1)
    sh = np.maximum(cv2.GaussianBlur(sh, (0, 0), s * 0.02), 0.5 * cv2.GaussianBlur(a, (0, 0), s * 0.03))
    img *= (1 - rng.uniform(0.25, 0.5) * sh)[..., None]
    u = np.clip((np.arange(s, dtype=np.float32) - x0) / max(w, 1), 0, 1)[None, :]
    v = np.clip((np.arange(s, dtype=np.float32) - y0) / max(h, 1), 0, 1)[:, None]
    if kind == "sphere":
        d = np.hypot(u - 0.5, v - 0.5) * 2
        shade = 0.35 + 0.75 * np.sqrt(np.clip(1 - d ** 2, 0, 1))
        spec = 0.7 * np.exp(-(np.hypot(u - 0.35, v - 0.33) / 0.12) ** 2)
    elif kind in ("cylinder", "bottle"):
        shade = 0.5 + 0.55 * np.sin(np.pi * u) + 0 * v
        spec = 0.5 * np.exp(-((u - rng.uniform(0.2, 0.35)) / 0.05) ** 2) + 0 * v
    else:
        shade = 1.0 - 0.25 * v - 0.15 * (u > rng.uniform(0.6, 0.8)) + 0 * u
        spec = 0 * shade
    if rng.random() < 0.25:
        fill = _texture(rng, s)[0]
    else:
        c = _vivid(rng) if rng.random() < 0.6 else tuple(_pastel(rng) * rng.uniform(0.2, 1.0))
        fill = np.broadcast_to(np.array(c, np.float32), (s, s, 3))
    obj = np.clip(fill * shade[..., None] + 255 * spec[..., None], 0, 255)
    img[:] = img * (1 - a[..., None]) + obj * a[..., None]


def _background(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, str]:
    s = int(cfg.size)
    if rng.random() < cfg.photo_fraction:
        name = _pick(rng, cfg.photos)
        ph = load_photo(name)
        side = max(16, int(min(ph.shape[:2]) * rng.uniform(0.4, 1.0)))
        y, x = int(rng.integers(ph.shape[0] - side + 1)), int(rng.integers(ph.shape[1] - side + 1))
        crop = ph[y:y + side, x:x + side]
        out = cv2.resize(crop, (s, s), interpolation=cv2.INTER_AREA if side > s else cv2.INTER_CUBIC)
        return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out), f"photo:{name}"
    r = rng.random()
    if r < 0.55:
        img, btype, n_obj = _backdrop(rng, s), "studio", 1 + int(rng.random() < 0.3)
    elif r < 0.8:
        (img, tex), n_obj = _texture(rng, s), int(rng.random() < 0.7)
        btype = f"texture:{tex}"
    else:
        c = _pastel(rng) if rng.random() < 0.6 else np.array(_vivid(rng), np.float32)
        img, btype, n_obj = np.broadcast_to(c, (s, s, 3)).copy(), "flat", int(rng.random() < 0.6)
    img = np.ascontiguousarray(img, dtype=np.float32)
    for _ in range(n_obj):
        _product(rng, img)
    img += rng.normal(0, rng.uniform(0.5, 3.0), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), btype


def make_background(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """A clean (size, size, 3) uint8 product-photo-like image (the GT)."""
    return _background(rng, cfg)[0]


# ---------------------------------------------------------------- overlays
def _text_patch(text: str, font, fill, stroke: int = 0, stroke_fill=None, pad: int = 2) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, t, r, b = probe.textbbox((0, 0), text, font=font, stroke_width=stroke, align="center")
    left, t, r, b = int(np.floor(left)), int(np.floor(t)), int(np.ceil(r)), int(np.ceil(b))
    im = Image.new("RGBA", (r - left + 2 * pad, b - t + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((pad - left, pad - t), text, font=font, fill=fill, stroke_width=stroke,
                            stroke_fill=stroke_fill, align="center")
    return im


def _rotate(im: Image.Image, deg: float) -> Image.Image:
    return im if abs(deg) < 0.5 else im.convert("RGBa").rotate(deg, _BICUBIC, expand=True).convert("RGBA")


def _fade(im: Image.Image, alpha: float) -> Image.Image:
    arr = np.array(im)
    arr[..., 3] = (arr[..., 3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


def _shadowed(im: Image.Image, rng) -> Image.Image:
    """im with a soft drop shadow behind it (the shadow is part of the overlay)."""
    blur, dx, dy = rng.uniform(1.5, 4), int(rng.integers(1, 6)), int(rng.integers(2, 7))
    pad = int(blur * 3) + 7
    out = Image.new("RGBA", (im.width + 2 * pad, im.height + 2 * pad), (0, 0, 0, 0))
    sh = Image.new("RGBA", im.size, (0, 0, 0, 0))
    sh.putalpha(im.getchannel("A").point(lambda v: int(v * 0.55)))
    out.alpha_composite(sh, (pad + dx, pad + dy))
    out = out.filter(ImageFilter.GaussianBlur(blur))
    out.alpha_composite(im, (pad, pad))
    return out


def _place(layer: Image.Image, patch: Image.Image, rng, corner: bool = False) -> None:
    W, H = layer.size
    if patch.width > W or patch.height > H:
        k = min(W / patch.width, H / patch.height) * 0.95
        patch = patch.convert("RGBa").resize((max(1, int(patch.width * k)), max(1, int(patch.height * k))),
                                             _BICUBIC).convert("RGBA")
    if corner:
        m = int(min(W, H) * rng.uniform(0.02, 0.06))
        x = min(m, W - patch.width) if rng.random() < 0.5 else max(0, W - patch.width - m)
        y = min(m, H - patch.height) if rng.random() < 0.5 else max(0, H - patch.height - m)
    else:
        x, y = int(rng.integers(W - patch.width + 1)), int(rng.integers(H - patch.height + 1))
    layer.alpha_composite(patch, (x, y))


def _fit_text(text: str, font_path: str, px: int, max_w: float, stroke_k: float = 0.0, max_h: float = 1e9):
    while True:
        font, stroke = load_font(font_path, px), int(px * stroke_k)
        left, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox(
            (0, 0), text, font=font, stroke_width=stroke, align="center")
        if (r - left <= max_w and b - t <= max_h) or px <= 8:
            return font, stroke
        px = max(8, int(px * 0.85))


def _promo_text(layer: Image.Image, rng) -> None:
    s = min(layer.size)
    i, j = rng.choice(len(PROMO_WORDS), 2, replace=False)
    text = PROMO_WORDS[i] + ("\n" + PROMO_WORDS[j] if rng.random() < 0.15 else "")
    px = int(s * (rng.uniform(0.06, 0.10) if rng.random() < 0.25 else rng.uniform(0.12, 0.25)))
    color = _text_color(rng)
    r = rng.random()  # plain / outlined / fake-bold
    if r < 0.4:
        k, sfill = 0.0, None
    else:
        k, sfill = (rng.uniform(0.04, 0.1), _contrast(color)) if r < 0.75 else (0.04, color)
    font, stroke = _fit_text(text, _pick(rng, font_paths()), px, s * 0.9, k)
    patch = _text_patch(text, font, color, stroke, sfill)
    if rng.random() < 0.2:  # solid banner behind the text
        band = Image.new("RGBA", (patch.width + 12, patch.height + 8), _contrast(color) + (255,))
        band.alpha_composite(patch, (6, 4))
        patch = band
    if rng.random() < 0.3:
        patch = _shadowed(patch, rng)
    _place(layer, _rotate(patch, rng.uniform(-20, 20) if rng.random() < 0.5 else 0.0), rng)


def _watermark(layer: Image.Image, rng) -> None:
    W, H = layer.size
    s = min(W, H)
    text = _pick(rng, WATERMARK_WORDS)
    color = _pick(rng, ((255, 255, 255), (128, 128, 128), (0, 0, 0), (200, 200, 200)))
    alpha, fpath = rng.uniform(0.25, 0.6), _pick(rng, font_paths())
    if rng.random() < 0.5:  # tiled
        font, _ = _fit_text(text, fpath, int(s * rng.uniform(0.05, 0.09)), s * 0.6)
        patch = _text_patch(text, font, color + (255,))
        big = Image.new("RGBA", (int(W * 1.6), int(H * 1.6)), color + (0,))
        sx, sy = int(patch.width * rng.uniform(1.2, 1.8)), int(patch.height * rng.uniform(2.2, 4.0))
        for j, y in enumerate(range(0, big.height, sy)):
            for x in range(-(j % 2) * sx // 2, big.width, sx):
                big.alpha_composite(patch, (max(0, x), y))
        big = _rotate(big, rng.uniform(-40, 40))
        ox, oy = (big.width - W) // 2, (big.height - H) // 2
        layer.alpha_composite(_fade(big.crop((ox, oy, ox + W, oy + H)), alpha))
    else:  # one diagonal line across the image
        deg = rng.uniform(20, 45) * (1 if rng.random() < 0.5 else -1)
        font, _ = _fit_text(text, fpath, int(s * 0.3), np.hypot(W, H) * rng.uniform(0.5, 0.8))
        patch = _rotate(_text_patch(text, font, color + (255,)), deg)
        _place(layer, _fade(patch, alpha), rng)


def _badge(layer: Image.Image, rng) -> None:
    s, ss = min(layer.size), 3  # supersampled for anti-aliased edges
    shape = _pick(rng, ("circle", "star", "rrect", "ribbon"))
    d = int(s * rng.uniform(0.2, 0.38)) * ss
    w, h = (d, d) if shape in ("circle", "star") else (int(d * 1.5), int(d * 0.6))
    classic = ((220, 20, 30), (250, 200, 0), (20, 20, 20), (240, 110, 0))
    fill = _pick(rng, classic) if rng.random() < 0.5 else _vivid(rng)
    im = Image.new("RGBA", (w, h), fill + (0,))
    dr = ImageDraw.Draw(im)
    bw = int(rng.integers(1, 3)) * ss if rng.random() < 0.5 else 0
    border = (255, 255, 255) if rng.random() < 0.7 else (230, 190, 60)
    if shape == "circle":
        dr.ellipse((0, 0, w - 1, h - 1), fill=fill, outline=border if bw else None, width=bw)
    elif shape == "star":
        n = int(rng.integers(12, 25))
        ang = np.arange(2 * n) * np.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.78, 0.9)) * (w / 2 - 1)
        pts = list(zip(w / 2 + rad * np.cos(ang), h / 2 + rad * np.sin(ang), strict=False))
        dr.polygon(pts, fill=fill, outline=border if bw else None, width=bw)
    elif shape == "rrect":
        dr.rounded_rectangle((0, 0, w - 1, h - 1), radius=int(h * rng.uniform(0.1, 0.5)), fill=fill,
                             outline=border if bw else None, width=bw)
    else:
        nt = int(h * 0.35)
        dr.polygon([(0, 0), (w, 0), (w - nt, h / 2), (w, h), (0, h), (nt, h / 2)], fill=fill)
    text = _pick(rng, BADGE_WORDS)
    max_w = w * 0.8 if shape in ("rrect", "ribbon") else w * 0.68
    font, stroke = _fit_text(text, _pick(rng, font_paths()), int(h * rng.uniform(0.35, 0.6)), max_w,
                             rng.uniform(0, 0.05), h * 0.8)
    tcol = _contrast(fill)
    tp = _text_patch(text, font, tcol, stroke, tcol)
    im.alpha_composite(tp, (max(0, (w - tp.width) // 2), max(0, (h - tp.height) // 2)))
    im = im.convert("RGBa").resize((w // ss, h // ss), _BOX).convert("RGBA")
    im = _rotate(im, rng.uniform(-25, 25) if rng.random() < 0.5 else 0.0)
    _place(layer, _shadowed(im, rng) if rng.random() < 0.6 else im, rng, corner=rng.random() < 0.6)


def _logo(layer: Image.Image, rng) -> None:
    s, ss = min(layer.size), 3
    d = int(s * rng.uniform(0.08, 0.16)) * ss
    col = _pick(rng, ((255, 255, 255), (20, 20, 20))) if rng.random() < 0.5 else _vivid(rng)
    im = Image.new("RGBA", (d, d), col + (0,))
    dr, lw = ImageDraw.Draw(im), max(ss, d // 12)
    mark = _pick(rng, ("circle", "triangle", "rings", "square"))
    if mark == "triangle":
        pts = [(d / 2, 0), (d - 1, d - 1), (0, d - 1)]
        dr.polygon(pts, fill=col) if rng.random() < 0.5 else dr.polygon(pts, outline=col, width=lw)
    elif mark == "rings":
        r = d * 0.3
        for cx, cy in ((0.32, 0.38), (0.68, 0.38), (0.5, 0.66)):
            dr.ellipse((cx * d - r, cy * d - r, cx * d + r, cy * d + r), outline=col, width=lw)
    else:
        box = (0, 0, d - 1, d - 1)
        dr.ellipse(box, fill=col) if mark == "circle" else dr.rounded_rectangle(box, d // 6, fill=col)
        letter = chr(int(rng.integers(65, 91)))
        font, _ = _fit_text(letter, _pick(rng, font_paths()), int(d * 0.6), d * 0.6)
        tp = _text_patch(letter, font, _contrast(col) + (255,))
        im.alpha_composite(tp, ((d - tp.width) // 2, (d - tp.height) // 2))
    im = im.convert("RGBa").resize((d // ss, d // ss), _BOX).convert("RGBA")
    if rng.random() < 0.5:  # word mark next to the symbol
        brand = _pick(rng, BRANDS)
        font, _ = _fit_text(brand, _pick(rng, font_paths()), int(im.height * 0.6), s * 0.45)
        tp = _text_patch(brand, font, col + (255,))
        both = Image.new("RGBA", (im.width + 4 + tp.width, max(im.height, tp.height)), col + (0,))
        both.alpha_composite(im, (0, (both.height - im.height) // 2))
        both.alpha_composite(tp, (im.width + 4, (both.height - tp.height) // 2))
        im = both
    _place(layer, im if rng.random() < 0.5 else _fade(im, rng.uniform(0.4, 0.85)), rng, corner=True)


_RENDER = {"text": _promo_text, "watermark": _watermark, "badge": _badge, "logo": _logo}


def composite_layer(bg32: np.ndarray, layer: Image.Image, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Alpha-composite an RGBA overlay ``layer`` (W x H) over ``bg32`` ((H, W, 3) int32 in 0..255).

    Returns ``(source, core, mask, visible)``: source (H, W, 3) int32 in 0..255; core (H, W) bool, the pixels
    with alpha > 8/255; mask = core dilated by a random 1-2 px ellipse (one draw from ``rng``); visible, the
    number of pixels the overlay changed by more than 20 levels. None (no draw) when the layer is empty.
    """
    rgba = np.asarray(layer).astype(np.int32)
    a = rgba[..., 3:4] * (rgba[..., 3:4] > 8)
    core = a[..., 0] > 0
    if not core.any():
        return None
    src = (bg32 * (255 - a) + rgba[..., :3] * a + 127) // 255
    visible = int((np.abs(src - bg32).max(axis=2) > 20).sum())
    r = int(rng.integers(1, 3))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    mask = cv2.dilate(core.astype(np.uint8), kernel) > 0
    return src, core, mask, visible


def add_overlay(background: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Composite a random storefront overlay over ``background``: (source, mask, kind)."""
    bg = np.asarray(background)
    if bg.dtype != np.uint8 or bg.ndim != 3 or bg.shape[2] != 3:
        raise InputError(f"background must be (H, W, 3) uint8, got {bg.shape} {bg.dtype}", code=ErrorCode.BAD_INPUT)
    H, W = bg.shape[:2]
    bg32 = bg.astype(np.int32)
    chosen = str(rng.choice(OVERLAY_KINDS, p=_KIND_P))  # retry the same kind so _KIND_P holds
    for attempt in range(60):
        kind = chosen if attempt < 30 else "badge"
        parts = list(rng.choice(4, 2, replace=False)) if kind == "mixed" else [OVERLAY_KINDS.index(kind)]
        layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
        for p in sorted(parts, key=lambda q: q != 1):  # watermark underneath
            _RENDER[OVERLAY_KINDS[p]](layer, rng)
        composited = composite_layer(bg32, layer, rng)
        if composited is None:
            continue
        src, core, mask, visible = composited
        if visible < 0.4 * core.sum() or mask.mean() > 0.6:
            continue
        return src.astype(np.uint8), mask, kind
    raise RuntimeError("could not place a visible overlay")  # pragma: no cover


def make_triplet(seed: int, index: int, cfg: SynthConfig = SynthConfig()
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Item ``index`` of the stream for ``seed``: (source, mask, GT, info)."""
    if seed < 0 or index < 0:
        raise InputError("seed and index must be >= 0", code=ErrorCode.BAD_OPTION)
    rng = np.random.default_rng([int(seed), int(index)])
    gt, btype = _background(rng, cfg)
    src, mask, kind = add_overlay(gt, rng)
    return src, mask, gt, {"kind": kind, "background": btype}


def save_png(arr: np.ndarray, path: Path, compress_level: int = 6) -> None:
    """Write (H,W) or (H,W,3) uint8 ``arr`` as a PNG, atomically (:func:`cleanplate.imaging.write_atomic`); the
    data-set generators' one image writer. ``compress_level``: zlib level 0-9 (PIL's; 6 is its default)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    imaging.write_atomic(path, buf.getvalue())


def write_meta(meta_path: Path, entries: list[dict]) -> Path:
    """Write a data set's ``meta.json`` (a JSON list, one entry per item) atomically; return its path."""
    imaging.write_atomic(meta_path, (json.dumps(entries, indent=1) + "\n").encode())
    return meta_path


def synth_dataset(out_dir: str | os.PathLike, n: int, *, seed: int = 0, cfg: SynthConfig = SynthConfig(),
                  progress: bool = True) -> Path:
    """Write ``n`` triplets and ``meta.json`` under ``out_dir``; return the meta.json path.

    Resumable: items whose three PNGs exist are not rewritten (assumes the same seed and cfg).
    """
    if int(n) <= 0:
        raise InputError(f"n must be positive, got {n}", code=ErrorCode.BAD_OPTION)
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}", code=ErrorCode.BAD_OPTION)
    out = Path(out_dir)
    for sub in ("source", "mask", "GT"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    old: dict[str, dict] = {}
    try:
        old = {e["source"]: e for e in json.loads(meta_path.read_text())}
    except (OSError, ValueError, TypeError, KeyError):
        pass
    items = range(int(n))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="synth", unit="img")
    entries = []
    for i in items:
        rel = {k: f"{k}/{i:06d}.png" for k in ("source", "mask", "GT")}
        done = all((out / r).is_file() for r in rel.values())
        prev = old.get(rel["source"], {})
        if done and "kind" in prev and "background" in prev:
            info = {"kind": prev["kind"], "background": prev["background"]}
        else:
            src, mask, gt, info = make_triplet(seed, i, cfg)
            if not done:
                save_png(src, out / rel["source"])
                save_png(mask.astype(np.uint8) * 255, out / rel["mask"])
                save_png(gt, out / rel["GT"])
        entries.append({**rel, **info})
    return write_meta(meta_path, entries)
