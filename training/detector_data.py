"""Synthetic data for the overlay detector (:mod:`cleanplate.detector`), built on :mod:`training.synth`.

Each item is ``(source, mask, GT, kind_map)`` at ``size x size``:

* **GT**: a clean product photo from :mod:`training.synth` (procedural studio shot or a crop of a
  scikit-image photo), which may carry **in-scene marks**: text and logos that belong to the product
  (a brand on a bottle, a label on a box), perspective-warped, shaded by the scene's light, blurred and
  of lower contrast (:func:`add_scene_marks`). They are part of the GT and never part of the mask.
* **source**: GT with 0, 1 or 2 storefront overlays (promo text, watermark, badge, logo), drawn by the
  same renderers as ``data synth``; items with no overlay are negatives (source == GT, empty mask).
* **mask**: every pixel an overlay touched (alpha > 8/255, dilated 1-2 px), exactly as ``data synth``.
* **kind_map**: (H, W) uint8, 0 outside the mask and :data:`KIND_LABELS` ``[kind]`` on each overlay's
  mask (a later overlay wins where two overlap), so metrics can be split per kind.

Item ``i`` depends only on ``(seed, i, cfg)``; its RNG stream differs from ``data synth``'s, so the same
seed gives other images than :func:`training.synth.make_triplet`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from cleanplate.errors import ErrorCode, InputError

from . import synth

DETECTOR_KINDS: tuple[str, ...] = ("text", "watermark", "badge", "logo")
KIND_LABELS: dict[str, int] = {k: i + 1 for i, k in enumerate(DETECTOR_KINDS)}
SCENE_WORDS = (
    "ORGANIC", "500 ml", "Net wt 250 g", "PURE\nWATER", "Since 1984", "100% cotton", "EXTRA\nVIRGIN",
    "Made in Italy", "Ingredients: water,\nsugar, salt", "LOT 2231", "SPF 30", "COFFEE", "hand made",
    "Premium", "No. 5", "ESPRESSO", "fresh", "1 L", "Serial 55-A7", "CLASSIC", "Original recipe",
) + synth.BRANDS
_STREAM = 0xD37EC7  # third RNG seed word: keeps these items apart from data synth's


@dataclass(frozen=True)
class DetectorSynthConfig:
    """What a detector data set draws from.

    Attributes:
        size: output square side in px (64..4096).
        photo_fraction: share of backgrounds cropped from ``photos`` (the rest are procedural scenes).
        photos: scikit-image photo names (:data:`training.synth.TRAIN_PHOTOS` for training,
            :data:`training.synth.DEV_PHOTOS` for calibration and dev).
        clean_fraction: share of items with no overlay (empty mask).
        scene_fraction: share of items whose GT carries 1-3 in-scene marks (kept in GT, not in the mask).
        two_overlay_fraction: share of overlay items with two overlays of different kinds.
        kind_p: probabilities of text, watermark, badge, logo for each overlay.
    """

    size: int = 384
    photo_fraction: float = 0.6
    photos: tuple[str, ...] = synth.TRAIN_PHOTOS
    clean_fraction: float = 0.2
    scene_fraction: float = 0.4
    two_overlay_fraction: float = 0.2
    kind_p: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)

    def __post_init__(self) -> None:
        for name in ("clean_fraction", "scene_fraction", "two_overlay_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1]", code=ErrorCode.BAD_OPTION)
        if len(self.kind_p) != 4 or min(self.kind_p) < 0 or not np.isclose(sum(self.kind_p), 1.0):
            raise InputError("kind_p must be 4 probabilities summing to 1", code=ErrorCode.BAD_OPTION)
        self.background_config()  # validates size, photo_fraction, photos

    def background_config(self) -> synth.SynthConfig:
        return synth.SynthConfig(size=self.size, photo_fraction=self.photo_fraction, photos=tuple(self.photos))


# ---------------------------------------------------------------- in-scene marks (negatives)
def _scene_patch(rng: np.random.Generator, s: int) -> Image.Image:
    """An RGBA mark that could be printed on a product: text (maybe on a paper label) or a logo."""
    if rng.random() < 0.3:  # a logo drawn by the overlay renderer, cut out of its layer
        layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
        synth._logo(layer, rng)
        box = layer.getchannel("A").getbbox()
        if box is not None:
            return layer.crop(box)
    text = synth._pick(rng, SCENE_WORDS)
    color = synth._text_color(rng) if rng.random() < 0.5 else tuple(int(c) for c in rng.integers(0, 90, 3))
    font, _ = synth._fit_text(text, synth._pick(rng, synth.font_paths()), int(s * rng.uniform(0.05, 0.14)), s * 0.6)
    patch = synth._text_patch(text, font, color + (255,), pad=4)
    if rng.random() < 0.35:  # printed label: the paper is part of the product too
        paper = tuple(int(c) for c in synth._pastel(rng))
        label = Image.new("RGBA", (patch.width + 16, patch.height + 12), paper + (255,))
        label.alpha_composite(patch, (8, 6))
        patch = label
    return patch


def _scene_quad(rng: np.random.Generator, w: float, h: float, W: int, H: int) -> np.ndarray:
    """Where a (w, h) patch lands: a rotated rectangle with perspective foreshortening, (4, 2) float32."""
    cx, cy = rng.uniform(0.15, 0.85) * W, rng.uniform(0.15, 0.85) * H
    quad = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], np.float32)
    k = rng.uniform(0.65, 0.95)  # one side further away than the other
    if rng.random() < 0.5:
        quad[[1, 2], 1] *= k  # right side shorter
    else:
        quad[[0, 1], 0] *= k  # top side shorter
    quad[:, 0] += quad[:, 1] * rng.uniform(-0.25, 0.25)  # shear
    a = np.deg2rad(rng.uniform(-20, 20))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
    return (quad @ rot.T + [cx, cy]).astype(np.float32)


def add_scene_marks(gt: np.ndarray, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    """``gt`` with ``n`` (default 1-3) in-scene marks: (H, W, 3) uint8 in, (H, W, 3) uint8 out.

    A mark is warped in perspective, lit by the scene (its colour follows the local luminance of ``gt``
    and a shading gradient), blurred (sigma 0.5-1.6 px), of reduced contrast (alpha 0.55-0.95, colour
    pulled towards the local background) and carries the photo's noise: a print on the product, not an
    overlay. Raises InputError when ``gt`` is not (H, W, 3) uint8.
    """
    gt = np.asarray(gt)
    if gt.dtype != np.uint8 or gt.ndim != 3 or gt.shape[2] != 3:
        raise InputError(f"gt must be (H, W, 3) uint8, got {gt.shape} {gt.dtype}", code=ErrorCode.BAD_INPUT)
    H, W = gt.shape[:2]
    s = min(H, W)
    out = gt.astype(np.float32)
    light = cv2.GaussianBlur(out.mean(axis=2), (0, 0), s * 0.04)
    local = cv2.GaussianBlur(out, (0, 0), s * 0.03)
    for _ in range(int(rng.integers(1, 4)) if n is None else n):
        patch = _scene_patch(rng, s)
        width = s * rng.uniform(0.12, 0.45)
        k = min(width / patch.width, s * 0.3 / patch.height)
        w, h = patch.width * k, patch.height * k
        rgba = np.asarray(patch).astype(np.float32) / 255
        prem = np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], axis=2)
        src = np.array([[0, 0], [patch.width, 0], [patch.width, patch.height], [0, patch.height]], np.float32)
        M = cv2.getPerspectiveTransform(src, _scene_quad(rng, w, h, W, H))
        warped = cv2.warpPerspective(prem, M, (W, H), flags=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        sigma = rng.uniform(0.5, 1.6)
        warped = cv2.GaussianBlur(warped, (0, 0), sigma)
        alpha = np.clip(warped[..., 3], 0, 1) * rng.uniform(0.55, 0.95)
        if not (alpha > 0.05).any():
            continue
        color = warped[..., :3] / np.maximum(warped[..., 3:], 1e-4) * 255
        pull = rng.uniform(0.0, 0.35)
        color = color * (1 - pull) + local * pull
        region = alpha > 0.05
        shade = np.clip(light / max(float(light[region].mean()), 1.0), 0.5, 1.6) ** rng.uniform(0.4, 1.0)
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) / s
        ang = rng.uniform(0, 2 * np.pi)
        shade = shade * (1 + rng.uniform(-0.25, 0.25) * np.sin(3 * (xx * np.cos(ang) + yy * np.sin(ang))))
        color = color * shade[..., None] + rng.normal(0, rng.uniform(1, 3), color.shape).astype(np.float32)
        out = out * (1 - alpha[..., None]) + color * alpha[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- items
def _overlay(src32: np.ndarray, kind: str, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray] | None:
    """One overlay of ``kind`` over src32 ((H, W, 3) int32): (source int32, mask bool), or None if it
    stayed invisible after 30 tries."""
    H, W = src32.shape[:2]
    for _ in range(30):
        layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
        synth._RENDER[kind](layer, rng)
        done = synth.composite_layer(src32, layer, rng)
        if done is None:
            continue
        out, core, mask, visible = done
        if visible >= 0.4 * core.sum() and mask.mean() <= 0.6:
            return out, mask
    return None


def make_detector_item(seed: int, index: int, cfg: DetectorSynthConfig = DetectorSynthConfig()
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Item ``index`` of the stream for ``seed``: ``(source, mask, GT, kind_map, info)``.

    source and GT are (size, size, 3) uint8, mask (size, size) bool, kind_map (size, size) uint8 in
    0..4 (:data:`KIND_LABELS`); outside the mask source == GT. info: ``kinds`` (list of overlay kinds,
    empty for a negative), ``kind`` (the one kind, ``mixed``, or ``none``), ``background``, ``scene_marks``
    (number of in-scene marks in GT). Raises InputError for a negative seed or index.
    """
    if seed < 0 or index < 0:
        raise InputError("seed and index must be >= 0", code=ErrorCode.BAD_OPTION)
    rng = np.random.default_rng([int(seed), int(index), _STREAM])
    gt, background = synth._background(rng, cfg.background_config())
    marks = 0
    if rng.random() < cfg.scene_fraction:
        marks = int(rng.integers(1, 4))
        gt = add_scene_marks(gt, rng, marks)
    H, W = gt.shape[:2]
    src32, mask, kind_map = gt.astype(np.int32), np.zeros((H, W), bool), np.zeros((H, W), np.uint8)
    kinds: list[str] = []
    if rng.random() >= cfg.clean_fraction:
        n_parts = 2 if rng.random() < cfg.two_overlay_fraction else 1
        parts = [str(k) for k in rng.choice(DETECTOR_KINDS, n_parts, replace=False, p=cfg.kind_p)]
        for kind in sorted(parts, key=lambda q: q != "watermark"):  # watermark underneath, as data synth
            done = _overlay(src32, kind, rng)
            if done is None or (mask | done[1]).mean() > 0.6:
                continue
            src32, part = done
            mask |= part
            kind_map[part] = KIND_LABELS[kind]
            kinds.append(kind)
    kind = kinds[0] if len(kinds) == 1 else "mixed" if kinds else "none"
    info = {"kind": kind, "kinds": kinds, "background": background, "scene_marks": marks}
    return src32.astype(np.uint8), mask, gt, kind_map, info


def synth_detector_dataset(out_dir: str | os.PathLike, n: int, *, seed: int = 0,
                           cfg: DetectorSynthConfig = DetectorSynthConfig(), progress: bool = True) -> Path:
    """Write ``n`` detector items and ``meta.json`` under ``out_dir``; return the meta.json path.

    Folders ``source/``, ``mask/`` (0/255), ``GT/``, ``kinds/`` (kind_map) of PNGs; each meta entry has the
    four relative paths (keys ``source``, ``mask``, ``GT``, ``kind_map``) and the item's info. Resumable:
    items whose PNGs exist and whose info is in the old meta.json are not redrawn (same seed and cfg
    assumed). Raises InputError for n <= 0 or seed < 0.
    """
    if int(n) <= 0:
        raise InputError(f"n must be positive, got {n}", code=ErrorCode.BAD_OPTION)
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}", code=ErrorCode.BAD_OPTION)
    out = Path(out_dir)
    dirs = {"source": "source", "mask": "mask", "GT": "GT", "kind_map": "kinds"}
    for sub in dirs.values():
        (out / sub).mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    try:
        old = {e["source"]: e for e in json.loads(meta_path.read_text())}
    except (OSError, ValueError, TypeError, KeyError):
        old = {}
    items = range(int(n))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="synth detector", unit="img")
    entries = []
    for i in items:
        rel = {k: f"{d}/{i:06d}.png" for k, d in dirs.items()}
        prev = old.get(rel["source"], {})
        if all((out / r).is_file() for r in rel.values()) and "kinds" in prev:
            info = {k: prev[k] for k in ("kind", "kinds", "background", "scene_marks")}
        else:
            src, mask, gt, kind_map, info = make_detector_item(seed, i, cfg)
            for key, arr in (("source", src), ("mask", mask.astype(np.uint8) * 255), ("GT", gt),
                             ("kind_map", kind_map)):
                # zlib level 1: four files per item, and level 6 made saving cost more than drawing
                synth.save_png(arr, out / rel[key], compress_level=1)
        entries.append({**rel, **info})
    return synth.write_meta(meta_path, entries)
