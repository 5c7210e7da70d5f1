"""Synthetic labelled candidates for training a removal-quality discriminator (RORem, arXiv 2501.00740).

RORem trains a discriminator on human yes/no labels of its remover's outputs ("is the object gone and
the fill plausible?"). This module stands in for those labels: from existing RORem ``(source, mask, GT)``
triplets it builds *candidate results* by rule and labels them by construction.

Good removals (score 1), all close to GT inside the mask:

* ``gt``: GT itself.
* ``gt_jpeg``: GT re-encoded as JPEG (quality 70-90, no chroma subsampling), pasted back inside the mask.
* ``gt_noise``: GT plus mild Gaussian noise (sigma 1-3 on 0..255) inside the mask only.

Bad removals (score 0):

* ``source``: the source itself (nothing removed).
* ``partial``: GT in a random part of the mask (split by a half-plane or by random blobs), the source in
  the rest, which keeps 30-70% of the masked pixels where source and GT differ.
* ``blur``: a heavy Gaussian blur (sigma 4-10 px) of the *source* inside the mask: a smeared ghost.
* ``smear``: a flat fill with the mean colour of a 3-px ring around the mask or, for masks that are large
  (> 3% of the image) and thick, streaks from ``cv2.inpaint`` (Navier-Stokes or Telea, radius 8-15 px).
* ``redrawn``: GT with new promo text ("SALE", "-20%", ...) in a bright colour, fit to the mask's bounding
  box and clipped to the mask (the remover hallucinated new overlay content).

Outside the mask every candidate equals the source exactly (it is composited from the source there).

Limits, read before trusting a discriminator trained on this:

* No model output is used. The discriminator learns the failure modes listed above, not the artefacts of
  the remover it will judge (texture seams, colour shifts, hallucinated objects that are not text...).
  Mixing in human- or metric-labelled remover outputs, as RORem does, fixes that.
* A rule can produce a "bad" candidate that is in fact a fine removal, e.g. a flat fill of thin text
  strokes on a flat backdrop. A ``partial``, ``blur``, ``smear`` or ``redrawn`` candidate whose
  :func:`defect_level` is below ``MIN_DEFECT`` is therefore replaced by the ``source`` candidate, and so
  is a ``partial`` whose mask has fewer than ``MIN_PARTIAL_PX`` pixels where source and GT differ;
  ``label_kind`` in the output names the kind actually written. The ``source`` candidate itself is kept
  even when the overlay is faint (the input data defines what has to go).
* Positives are GT up to mild degradations, so "good" means "matches GT", not "plausible": a different
  but plausible fill is never shown as positive.

Determinism: candidate ``v`` of input item ``i`` depends only on ``(seed, i, v)`` (its RNG is
``np.random.default_rng([_STREAM, seed, i, v])``), the input images and, for ``redrawn``, the fonts under
``/usr/share/fonts`` and the Pillow / FreeType / OpenCV / libjpeg builds of the machine.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from cleanplate import imaging
from cleanplate.errors import InputError

from .common import Triplet, read_meta
from .synth import font_paths, load_font

log = logging.getLogger("cleanplate.training")

POSITIVE_KINDS: tuple[str, ...] = ("gt", "gt_jpeg", "gt_noise")
NEGATIVE_KINDS: tuple[str, ...] = ("source", "partial", "blur", "smear", "redrawn")
# a negative needs defect_level >= this to count as bad; positives measure <= ~3, flat fills of thin
# strokes on smooth backdrops (fine removals) 1-11, visible streaks, ghosts and text > 15
MIN_DEFECT = 12.0
MIN_PARTIAL_PX = 16  # differing masked pixels needed to split a mask into a GT part and a source part
_DIFF_LEVEL = 3  # a pixel "differs" when some channel of source and GT differs by more than this
_RING_PX = 3
_INPAINT_MIN_AREA = 0.03  # inpainting only on masks covering more than this share of the image...
_INPAINT_MIN_RADIUS = 4.0  # ...that are also this thick (px); thin strokes inpaint almost perfectly
# Leading stream tag: numpy's SeedSequence ignores trailing zeros, so [seed, i, 0] would replay synth.py's
# [seed, i] stream and the first draw (good or bad) would copy synth's first draw (photo or studio background).
_STREAM = 0xD15C
_WORDS = ("SALE", "-20%", "NEW", "HOT", "-50%", "$9.99", "DEAL", "FREE", "TOP", "BUY", "OFF", "-30%", "2+1")

Rgb = np.ndarray  # (H, W, 3) uint8
Mask = np.ndarray  # (H, W) bool


def label_kinds() -> dict[str, int]:
    """Every candidate kind mapped to its score: 1 = good removal, 0 = bad removal."""
    return {**{k: 1 for k in POSITIVE_KINDS}, **{k: 0 for k in NEGATIVE_KINDS}}


# ---------------------------------------------------------------- candidates
def _paste(base: Rgb, inside: Rgb, mask: Mask) -> Rgb:
    return np.where(mask[..., None], inside, base)


def defect_level(candidate: Rgb, gt: Rgb, mask: Mask) -> float:
    """How visibly ``candidate`` departs from ``gt`` inside ``mask``, in 0..255 levels.

    The 95th percentile over masked pixels of the largest per-channel difference after a Gaussian blur
    (sigma 1.5 px) of both. The blur discounts sensor noise and fine texture, which a raw mean difference
    does not (mild noise on GT scores as high as a flat fill there); the percentile lets a defect that
    covers only part of the mask (text strokes, a streak) count. Images (H, W, 3) uint8, mask (H, W) bool.
    """
    if not mask.any():
        return 0.0
    ys, xs = np.nonzero(mask)
    pad = 6  # the blur's reach (4 sigma), so the crop gives the same values as the full image
    y0, y1 = max(0, ys.min() - pad), ys.max() + pad + 1
    x0, x1 = max(0, xs.min() - pad), xs.max() + pad + 1
    blur = [cv2.GaussianBlur(a[y0:y1, x0:x1].astype(np.float32), (0, 0), 1.5) for a in (candidate, gt)]
    diff = np.abs(blur[0] - blur[1]).max(axis=2)[mask[y0:y1, x0:x1]]
    return float(np.percentile(diff, 95))


def _gt_jpeg(src: Rgb, mask: Mask, gt: Rgb, rng: np.random.Generator) -> Rgb:
    buf = io.BytesIO()
    # 4:4:4: chroma subsampling bleeds saturated edges by 10+ levels, more than a "good" result should
    Image.fromarray(gt).save(buf, format="JPEG", quality=int(rng.integers(70, 91)), subsampling=0)
    buf.seek(0)
    return _paste(src, np.asarray(Image.open(buf).convert("RGB")), mask)


def _gt_noise(src: Rgb, mask: Mask, gt: Rgb, rng: np.random.Generator) -> Rgb:
    noisy = gt + rng.normal(0.0, rng.uniform(1.0, 3.0), gt.shape)
    return _paste(src, np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mask)


def _partial(src: Rgb, mask: Mask, gt: Rgb, rng: np.random.Generator) -> Rgb | None:
    """GT in part of the mask, source in the rest; None when the mask is too small to split."""
    differs = mask & (np.abs(src.astype(np.int16) - gt).max(axis=2) > _DIFF_LEVEL)
    n = int(differs.sum())
    if n < MIN_PARTIAL_PX:
        return None
    h, w = mask.shape
    for _ in range(4):  # ties in the split field (thin or axis-aligned masks) can unbalance a split
        if rng.random() < 0.5:  # half-plane
            theta = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[0:h, 0:w]
            field = xx * np.cos(theta) + yy * np.sin(theta)
        else:  # random blobs: smooth noise on a coarse grid
            cells = int(rng.integers(3, 8))
            coarse = rng.random((cells, cells)).astype(np.float32)
            field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        # the source part takes a 30-70% quantile of the differing pixels, so both parts are visible
        keep = mask & (field <= np.quantile(field[differs], rng.uniform(0.3, 0.7)))
        kept = int((keep & differs).sum())
        if 0.3 * n <= kept <= n - max(1, int(0.1 * n)):
            return _paste(src, _paste(gt, src, keep), mask)
    return None


def _blur(src: Rgb, mask: Mask, gt: Rgb, rng: np.random.Generator) -> Rgb:
    return _paste(src, cv2.GaussianBlur(src, (0, 0), rng.uniform(4.0, 10.0)), mask)


def _smear(src: Rgb, mask: Mask, gt: Rgb, rng: np.random.Generator) -> Rgb:
    m8 = mask.astype(np.uint8)
    thick = cv2.distanceTransform(np.pad(m8, 1), cv2.DIST_L2, 3).max() >= _INPAINT_MIN_RADIUS
    if mask.mean() > _INPAINT_MIN_AREA and thick and rng.random() < 0.5:
        flag = cv2.INPAINT_NS if rng.random() < 0.5 else cv2.INPAINT_TELEA
        return _paste(src, cv2.inpaint(src, m8, float(rng.integers(8, 16)), flag), mask)
    ring = cv2.dilate(m8, np.ones((2 * _RING_PX + 1,) * 2, np.uint8)).astype(bool) & ~mask
    colour = src[ring].mean(axis=0) if ring.any() else src.reshape(-1, 3).mean(axis=0)
    return _paste(src, np.full_like(src, np.rint(colour).astype(np.uint8)), mask)


def _redrawn(src: Rgb, mask: Mask, gt: Rgb, rng: np.random.Generator) -> Rgb:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bw, bh = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
    text = _WORDS[int(rng.integers(len(_WORDS)))]
    fonts = font_paths()
    path = fonts[int(rng.integers(len(fonts)))]
    fill = rng.uniform(0.6, 1.0)
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    size = max(6, bh)
    while True:  # largest size that fits `fill` of the box (shrinks 10% a step)
        font = load_font(path, size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        if (tw <= bw * fill and th <= bh * fill) or size <= 6:
            break
        size = max(6, int(size * 0.9))
    # a random saturated, bright colour
    colour = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
    layer = Image.fromarray(gt)
    x = x0 + (bw - tw) / 2 + rng.uniform(-0.5, 0.5) * max(0, bw - tw) - left
    y = y0 + (bh - th) / 2 + rng.uniform(-0.5, 0.5) * max(0, bh - th) - top
    ImageDraw.Draw(layer).text((x, y), text, font=font, fill=tuple(round(c * 255) for c in colour))
    return _paste(src, np.asarray(layer), mask)  # text outside the mask is dropped


_Maker = Callable[[Rgb, Mask, Rgb, np.random.Generator], "Rgb | None"]
_MAKERS: dict[str, _Maker] = {
    "gt": lambda src, mask, gt, rng: _paste(src, gt, mask),
    "gt_jpeg": _gt_jpeg,
    "gt_noise": _gt_noise,
    "source": lambda src, mask, gt, rng: src.copy(),
    "partial": _partial,
    "blur": _blur,
    "smear": _smear,
    "redrawn": _redrawn,
}


def make_candidate(src: Rgb, mask: Mask, gt: Rgb, rng: np.random.Generator,
                   positive_fraction: float = 0.5) -> tuple[Rgb, str]:
    """One labelled candidate: ``((H, W, 3) uint8 image, kind)``; its score is ``label_kinds()[kind]``.

    ``src``/``gt`` are (H, W, 3) uint8, ``mask`` (H, W) bool and not empty. The candidate is positive with
    probability ``positive_fraction``, its kind then uniform among that label's kinds. Outside the mask the
    candidate equals ``src``. A negative that comes out too close to GT (see module docstring) is replaced
    by the source, and the returned kind says so.
    """
    positive = rng.random() < positive_fraction
    kinds = POSITIVE_KINDS if positive else NEGATIVE_KINDS
    kind = kinds[int(rng.integers(len(kinds)))]
    out = _MAKERS[kind](src, mask, gt, rng)
    if kind != "source" and not positive and out is not None and defect_level(out, gt, mask) < MIN_DEFECT:
        out = None
    if out is None:
        return src.copy(), "source"
    return out, kind


# ---------------------------------------------------------------- dataset
def _load(item: Triplet, index: int) -> tuple[Rgb, Mask, Rgb]:
    try:
        src = np.asarray(Image.open(item.source).convert("RGB"))
        gt = np.asarray(Image.open(item.gt).convert("RGB"))
    except OSError as exc:
        raise InputError(f"item {index}: cannot read image: {exc}", code="bad_input") from exc
    mask = imaging.decode_mask(item.mask)
    if not src.shape == gt.shape == mask.shape + (3,):
        raise InputError(f"item {index} ({item.source}): source {src.shape[:2]}, GT {gt.shape[:2]} and mask "
                         f"{mask.shape} sizes differ", code="size_mismatch")
    return src, mask, gt


def _save_png(arr: Rgb, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def make_disc_labels(meta: Sequence[str | Path], out_dir: str | Path, *, per_item: int = 2, seed: int = 0,
                     positive_fraction: float = 0.5, limit: int | None = None) -> Path:
    """Write labelled discriminator candidates built from RORem triplets; return the new ``meta.json`` path.

    Args:
        meta: RORem ``meta.json`` files (lists of {"source","mask","GT"}, paths relative to the file;
            source and GT RGB images of one size, mask white = remove, ``source == GT`` outside the mask).
        out_dir: created if needed; receives ``result/NNNNNN.png`` (one (H, W, 3) uint8 RGB PNG per
            candidate, numbered in output order) and ``meta.json``. The input files are not copied.
        per_item: candidates per input item (>= 1); candidate ``v`` of item ``i`` uses the RNG
            ``np.random.default_rng([_STREAM, seed, i, v])``.
        seed: >= 0.
        positive_fraction: probability in [0, 1] that a candidate is a good removal (score 1).
        limit: use only the first ``limit`` input items (>= 1); None for all.

    Output ``meta.json``: a list of ``{"source", "mask", "GT", "score", "label_kind", "item"}`` in RORem's
    discriminator format: ``GT`` is the *candidate* being judged, ``score`` 1 (good) or 0 (bad),
    ``label_kind`` one of :func:`label_kinds` (see the module docstring), ``item`` the index of the input
    item in the concatenated ``meta`` lists. ``source``/``mask``/``GT`` are relative to the new meta.json,
    so :func:`cleanplate.training.common.read_meta` reads it. Items with an empty mask are skipped. The
    file is written atomically at the end; a stale ``result/`` from an earlier, larger run is not cleared.

    Raises:
        InputError: code "bad_option" for per_item < 1, positive_fraction outside [0, 1], seed < 0,
            limit < 1, unreadable meta files or no item with a non-empty mask; "size_mismatch" when an
            item's images differ in size; "bad_input" for an unreadable image.
    """
    if int(per_item) != per_item or per_item < 1:
        raise InputError(f"per_item must be an integer >= 1, got {per_item}", code="bad_option")
    if not 0.0 <= positive_fraction <= 1.0:
        raise InputError(f"positive_fraction must be in [0, 1], got {positive_fraction}", code="bad_option")
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed}", code="bad_option")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}", code="bad_option")
    from tqdm.auto import tqdm

    items = read_meta(meta)[:limit]
    out = Path(out_dir)
    (out / "result").mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    skipped = 0
    for i, item in enumerate(tqdm(items, desc="disc labels", unit="item", mininterval=5)):
        src, mask, gt = _load(item, i)
        if not mask.any():
            skipped += 1
            continue
        rel = {"source": Path(os.path.relpath(item.source, out)).as_posix(),
               "mask": Path(os.path.relpath(item.mask, out)).as_posix()}
        for v in range(int(per_item)):
            cand, kind = make_candidate(src, mask, gt, np.random.default_rng([_STREAM, int(seed), i, v]),
                                        positive_fraction)
            name = f"result/{len(entries):06d}.png"
            _save_png(cand, out / name)
            entries.append({**rel, "GT": name, "score": label_kinds()[kind], "label_kind": kind, "item": i})
    if skipped:
        log.warning("disc labels: skipped %d of %d items with an empty mask", skipped, len(items))
    if not entries:
        raise InputError("no input item has a non-empty mask", code="bad_option")
    meta_path = out / "meta.json"
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    os.replace(tmp, meta_path)
    return meta_path
