"""Labelled candidates for training a removal-quality discriminator (RORem, arXiv 2501.00740).

RORem trains its discriminator on human yes/no labels of its remover's outputs ("is the object gone and
the fill plausible?"). This module stands in for those labels: from existing RORem ``(source, mask, GT)``
triplets it builds *candidate results* and labels them without a person, in two ways.

**Real removals, labelled by agreement with GT** (``bundle=...``, ``cleanplate data disc-labels --bundle``).
For every item, in this order:

* ``gt`` (score 1) and ``source`` (score 0): anchors, so every held-out item measures the gate's two fixed
  points (GT must pass, the untouched overlay must not).
* ``telea``: OpenCV Telea (:func:`cleanplate.metrics.telea`, radius 3) with the mask as given.
* ``removal`` x K: the bundle's own removal through the production path
  (:func:`cleanplate.remover.remove_batch`: dilate, context window, the bundle's LCM steps, feathered
  paste-back), seeds ``seed .. seed + K - 1``; each entry records its ``seed``.

``telea`` and ``removal`` are labelled 1 when they agree with the GT inside the mask (as given, not
dilated), the judgement a person would otherwise give::

    psnr_mask_db >= psnr_good (24 dB)  and  ssim_mask >= ssim_good (0.7)  and  cast_mask <= max_cast (8)

``psnr_mask_db`` / ``ssim_mask`` are :func:`cleanplate.metrics.psnr` / :func:`cleanplate.metrics.ssim`
inside the mask; ``cast_mask`` is the mean colour shift inside the mask, ``max_c |mean(cand_c) -
mean(GT_c)|`` in 0..255 levels. Why these defaults (measured on the 100 held-out dev photos,
``runs/data/dev``, 512 px; crops looked at by eye):

* The source scores PSNR 8.4 dB median (90th percentile 17.4; faint watermarks up to 27) and SSIM 0.24;
  the default bundle's removals 10.1 dB / 0.17 (none above 13 dB); GT re-encoded as JPEG or with mild
  noise >= 36 dB / 0.91. Any threshold in 20-30 dB separates these.
* Telea, the classical baseline, has a median of 20.3 dB / 0.71 and passes 24 dB / 0.7 in 36% of items:
  fills at 23 dB still show smear edges and smudged faces; from ~25 dB they look clean. 24 / 0.7 puts the
  line there, so the same rule splits Telea (and a remover of Telea's quality) into good and bad fills.
* PSNR and SSIM miss colour casts: the GT itself through the default bundle's VAE (4 latent channels,
  plain decode, as shipped when this was measured), pasted back as a removal is, shows a green ghost of the mask's shape on dark backgrounds at 26.9 dB / SSIM 0.98 (SSIM
  hardly weighs dark, flat regions). Its cast is 12-20 levels there, Telea's 2.7 median (90th percentile
  13.9, the smeared badge fills). ``max_cast`` 8 rejects the ghosts and costs Telea none of its passes;
  with it, 28% (without it 62%) of VAE-ceiling fills pass: the best the default bundle's VAE can do is
  visibly off on most items, and its labels say so.

Limits of the rule: "good" means "agrees with GT", not "plausible": a different but clean fill of a
textured region scores low. A result that leaves a faint watermark in place can still reach 24 dB (the
``source`` anchor is labelled 0 whatever its metrics).

**Synthetic corruptions, labelled by construction** (always; ``per_item`` per item):

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

With a bundle the synthetic draw leaves out ``gt`` and ``source`` (the anchors already hold them). Outside
the mask every synthetic, ``gt``, ``source`` and ``telea`` candidate equals the source exactly; a
``removal`` equals it outside the *dilated* mask (the feathered paste-back changes the ring between).
Synthetic labels are not rewritten by the metric rule: on the dev set some corruptions reach 24 dB / 0.7
(before the ``MIN_DEFECT`` rule below: smear 27%, mostly flat fills of thin text; redrawn 7%, small
re-drawn words a person would still reject; blur 5%; partial 4%); their metrics are recorded like every
candidate's.

**Rebalancing.** With a bundle, the labels of the real candidates depend on the bundle: an early bundle's
removals are nearly all bad, a good bundle's nearly all good. So the ``per_item`` synthetic candidates of
an item are not drawn with ``positive_fraction`` but chosen to balance that item (``balance``, default
on): as many of them are positive as bring the item's ``telea`` + ``removal`` + synthetic candidates
closest to half good (``ceil((n_real + per_item) / 2) - n_real_good``, clipped to ``0..per_item``). Each
photo then comes with good and bad versions of itself, so the gate cannot score photos instead of fills,
and the global ratio stays near 1:1 as the bundle improves; ``cleanplate train discriminator`` weights
what is left (``pos_weight = n_neg / n_pos``). For held-out sets (calibration, ``cleanplate bench gate``)
turn it off (``--no-balance``): with a bad bundle the balance makes every synthetic candidate a GT variant,
and neither the calibration rule (Youden's J, per-kind pass rates) nor the benchmark needs a 1:1 ratio,
but both want every kind present.

Limits of the synthetic labels, read before trusting a discriminator trained on them alone:

* A rule can produce a "bad" candidate that is in fact a fine removal, e.g. a flat fill of thin text
  strokes on a flat backdrop. A ``partial``, ``blur``, ``smear`` or ``redrawn`` candidate whose
  :func:`defect_level` is below ``MIN_DEFECT`` is therefore replaced by the ``source`` candidate, and so
  is a ``partial`` whose mask has fewer than ``MIN_PARTIAL_PX`` pixels where source and GT differ;
  ``label_kind`` in the output names the kind actually written. The ``source`` candidate itself is kept
  even when the overlay is faint (the input data defines what has to go).
* Without real removals the discriminator learns only these failure modes, not the artefacts of the
  remover it will judge: trained on them alone, the default bundle's gate scored its own smudges (0.684)
  above the GT (0.534).

Determinism and resume: synthetic candidate ``v`` of input item ``i`` depends only on ``(seed, i, v)``
(its RNG is ``np.random.default_rng([_STREAM, seed, i, v])``), the input images and, for ``redrawn``, the
fonts under ``/usr/share/fonts`` and the Pillow / FreeType / OpenCV / libjpeg builds of the machine; with
a bundle also on the removal labels of the item (through the balance). Removal ``s`` of an item depends on
the bundle, the seed ``s`` and the device/dtype (:func:`cleanplate.sampling.sampling_noise` noise).
Finished items are journalled in ``OUT/labels.jsonl``; a rerun with the same options continues after the
last finished item and writes the same files as one uninterrupted run.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw

from cleanplate import imaging
from cleanplate.errors import ErrorCode, InputError
from cleanplate.locks import exclusive
from cleanplate.metrics import psnr, ssim, telea

from .common import Triplet, read_meta
from .synth import font_paths, load_font, save_png, write_meta

log = logging.getLogger("cleanplate.training")

POSITIVE_KINDS: tuple[str, ...] = ("gt", "gt_jpeg", "gt_noise")
NEGATIVE_KINDS: tuple[str, ...] = ("source", "partial", "blur", "smear", "redrawn")
ANCHOR_KINDS: tuple[str, ...] = ("gt", "source")  # with a bundle: one of each for every item
METRIC_KINDS: tuple[str, ...] = ("telea", "removal")  # labelled by agreement with GT (agrees_with_gt)
# Defaults of the agreement rule; the module docstring says why (dev-set distributions).
PSNR_GOOD_DB = 24.0
SSIM_GOOD = 0.7
MAX_CAST = 8.0
DEFAULT_REMOVALS_PER_ITEM = 2
JOURNAL = "labels.jsonl"
_LOCK = ".disc-labels.lock"
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


def colour_cast(candidate: Rgb, gt: Rgb, mask: Mask) -> float:
    """Mean colour shift of ``candidate`` from ``gt`` inside ``mask``: ``max_c |mean(cand_c) - mean(gt_c)|``
    in 0..255 levels (0.0 for an empty mask). Images (H, W, 3) uint8, mask (H, W) bool.

    A shift of the whole fill shows as a ghost of the mask's shape against the untouched surroundings
    even where PSNR and SSIM are high (module docstring)."""
    if not mask.any():
        return 0.0
    diff = candidate[mask].astype(np.float64).mean(axis=0) - gt[mask].astype(np.float64).mean(axis=0)
    return float(np.abs(diff).max())


def mask_metrics(candidate: Rgb, gt: Rgb, mask: Mask) -> dict[str, float]:
    """``{"psnr_mask_db", "ssim_mask", "cast_mask"}`` of ``candidate`` against ``gt`` inside ``mask``, rounded
    as written to meta.json (3, 4 and 2 decimals), so a label recomputed from meta.json is the same.

    PSNR in dB capped at 100 (:func:`cleanplate.metrics.psnr`), SSIM in [-1, 1] (the mean of the SSIM map
    over the mask, :func:`cleanplate.metrics.ssim`), cast in 0..255 (:func:`colour_cast`). Images
    (H, W, 3) uint8, mask (H, W) bool, not empty. SSIM is computed on the mask's bounding box plus 8 px,
    which holds every 7x7 window over a masked pixel, so it equals the whole image's map there (up to
    float rounding) at a fraction of the cost on large photos."""
    ys, xs = np.nonzero(mask)
    pad = 8
    box = (slice(max(0, ys.min() - pad), ys.max() + pad + 1), slice(max(0, xs.min() - pad), xs.max() + pad + 1))
    return {"psnr_mask_db": round(psnr(candidate, gt, mask), 3),
            "ssim_mask": round(ssim(candidate[box], gt[box], mask[box])[0], 4),
            "cast_mask": round(colour_cast(candidate, gt, mask), 2)}


def agrees_with_gt(metrics: dict[str, float], psnr_good: float = PSNR_GOOD_DB, ssim_good: float = SSIM_GOOD,
                   max_cast: float = MAX_CAST) -> bool:
    """The label of a ``telea`` / ``removal`` candidate: PSNR >= psnr_good and SSIM >= ssim_good and
    cast <= max_cast, on the :func:`mask_metrics` dict (a missing ``cast_mask`` counts as 0)."""
    return (metrics["psnr_mask_db"] >= psnr_good and metrics["ssim_mask"] >= ssim_good
            and metrics.get("cast_mask", 0.0) <= max_cast)


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
                   positive_fraction: float = 0.5, *, positive_kinds: Sequence[str] = POSITIVE_KINDS,
                   negative_kinds: Sequence[str] = NEGATIVE_KINDS) -> tuple[Rgb, str]:
    """One labelled candidate: ``((H, W, 3) uint8 image, kind)``; its score is ``label_kinds()[kind]``.

    ``src``/``gt`` are (H, W, 3) uint8, ``mask`` (H, W) bool and not empty. The candidate is positive with
    probability ``positive_fraction``, its kind then uniform among that label's kinds (``positive_kinds`` /
    ``negative_kinds``, subsets of :data:`POSITIVE_KINDS` / :data:`NEGATIVE_KINDS`). Outside the mask the
    candidate equals ``src``. A negative that comes out too close to GT (see module docstring) is replaced
    by the source, and the returned kind says so.
    """
    positive = rng.random() < positive_fraction
    kinds = positive_kinds if positive else negative_kinds
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
        raise InputError(f"item {index}: cannot read image: {exc}", code=ErrorCode.BAD_INPUT) from exc
    mask = imaging.decode_mask(item.mask)
    if not src.shape == gt.shape == mask.shape + (3,):
        raise InputError(f"item {index} ({item.source}): source {src.shape[:2]}, GT {gt.shape[:2]} and mask "
                         f"{mask.shape} sizes differ", code=ErrorCode.SIZE_MISMATCH)
    return src, mask, gt


def summarize_labels(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``label_kind``: ``{"n", "good", "psnr_mask_db_median"}`` of meta.json entries (sorted by kind)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({str(e.get("label_kind")) for e in entries}):
        rows = [e for e in entries if str(e.get("label_kind")) == kind]
        values = [e["psnr_mask_db"] for e in rows if e.get("psnr_mask_db") is not None]
        out[kind] = {"n": len(rows), "good": sum(1 for e in rows if e["score"] > 0.5),
                     "psnr_mask_db_median": float(np.median(values)) if values else None}
    return out


def _bundle_fingerprint(bundle: Path) -> dict[str, str]:
    """What the removals depend on: the bundle's path, its bundle.json (without the discriminator flag) and
    the names, sizes and mtimes of its other files outside ``discriminator/`` (cheap: no weights are read)."""
    root = bundle.resolve()
    digest = hashlib.sha256()
    config = json.loads((root / "bundle.json").read_text())
    config.pop("discriminator", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if f.is_file() and rel.parts[0] != "bundle.json" and not rel.parts[0].startswith("discriminator"):
            st = f.stat()
            digest.update(f"{rel.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(root), "digest": digest.hexdigest()[:16]}


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, dict[int, list[dict[str, Any]]]]:
    """(options of the header line, {item: entries}) of a journal; a line that does not parse (a killed
    writer's last line) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None, {}
    header: dict[str, Any] | None = None
    done: dict[int, list[dict[str, Any]]] = {}
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a line that does not parse", path, n + 1)
            continue
        if n == 0:
            header = record.get("options")
        elif isinstance(record, dict) and "item" in record:
            done[int(record["item"])] = list(record.get("entries", []))
    return header, done


def _check_options(per_item: int, seed: int, positive_fraction: float, limit: int | None, bundle: Any,
                   removals_per_item: int | None, psnr_good: float, ssim_good: float, max_cast: float) -> int:
    """Validate; return K (0 without a bundle). Raises InputError ("bad_option") naming the option."""
    low = 0 if bundle is not None else 1
    if int(per_item) != per_item or per_item < low:
        raise InputError(f"per_item must be an integer >= {low}, got {per_item}", code=ErrorCode.BAD_OPTION)
    if not 0.0 <= positive_fraction <= 1.0:
        raise InputError(f"positive_fraction must be in [0, 1], got {positive_fraction}", code=ErrorCode.BAD_OPTION)
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed}", code=ErrorCode.BAD_OPTION)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}", code=ErrorCode.BAD_OPTION)
    if not (math.isfinite(psnr_good) and 0 < psnr_good <= 100):
        raise InputError(f"psnr_good must be in (0, 100] dB, got {psnr_good}", code=ErrorCode.BAD_OPTION)
    if not -1.0 <= ssim_good <= 1.0:
        raise InputError(f"ssim_good must be in [-1, 1], got {ssim_good}", code=ErrorCode.BAD_OPTION)
    if not (math.isfinite(max_cast) and max_cast >= 0):
        raise InputError(f"max_cast must be >= 0 levels (255 turns it off), got {max_cast}", code=ErrorCode.BAD_OPTION)
    if bundle is None:
        if removals_per_item is not None:
            raise InputError("removals_per_item needs a bundle (--bundle) whose removals to label",
                             code=ErrorCode.BAD_OPTION)
        return 0
    k = DEFAULT_REMOVALS_PER_ITEM if removals_per_item is None else removals_per_item
    if int(k) != k or k < 1:
        raise InputError(f"removals_per_item must be an integer >= 1, got {k}", code=ErrorCode.BAD_OPTION)
    return int(k)


def _candidates(src: Rgb, mask: Mask, gt: Rgb, i: int, *, pipe: Any, seeds: Sequence[int], per_item: int,
                seed: int, positive_fraction: float, balance: bool, rule: dict[str, float],
                ) -> list[tuple[Rgb, str, int, dict[str, Any]]]:
    """An item's candidates in output order: ``(image, label_kind, score, extra fields)``.

    Raises InputError ("full_mask") when the bundle cannot remove this mask."""
    out: list[tuple[Rgb, str, int, dict[str, Any]]] = []

    def add(img: Rgb, kind: str, score: int | None, extra: dict[str, Any] | None = None) -> None:
        metrics = mask_metrics(img, gt, mask)
        if score is None:
            score = int(agrees_with_gt(metrics, **rule))
        out.append((img, kind, score, {**metrics, **(extra or {})}))

    pos_kinds, neg_kinds = POSITIVE_KINDS, NEGATIVE_KINDS
    positives = None
    if pipe is not None:
        from cleanplate.imaging import DecodedImage
        from cleanplate.remover import RemovalRequest, remove_batch

        image = DecodedImage(src, None, "RGB", "PNG", None, None)
        removed = remove_batch(pipe, [RemovalRequest(image, mask, seed=s) for s in seeds], max_batch=len(seeds))
        add(_MAKERS["gt"](src, mask, gt, None), "gt", 1)
        add(src.copy(), "source", 0)
        add(telea(src, mask), "telea", None)
        for s, result in zip(seeds, removed, strict=True):
            add(imaging.to_rgb8(result.pixels), "removal", None, {"seed": int(s)})
        pos_kinds = tuple(k for k in POSITIVE_KINDS if k not in ANCHOR_KINDS)
        neg_kinds = tuple(k for k in NEGATIVE_KINDS if k not in ANCHOR_KINDS)
        if balance:
            real = [score for _, kind, score, _ in out if kind in METRIC_KINDS]
            positives = min(per_item, max(0, math.ceil((len(real) + per_item) / 2) - sum(real)))
    for v in range(int(per_item)):
        fraction = positive_fraction if positives is None else float(v < positives)
        cand, kind = make_candidate(src, mask, gt, np.random.default_rng([_STREAM, int(seed), i, v]), fraction,
                                    positive_kinds=pos_kinds, negative_kinds=neg_kinds)
        add(cand, kind, label_kinds()[kind])
    return out


def make_disc_labels(meta: Sequence[str | Path], out_dir: str | Path, *, per_item: int = 2, seed: int = 0,
                     positive_fraction: float = 0.5, limit: int | None = None, bundle: str | Path | None = None,
                     removals_per_item: int | None = None, psnr_good: float = PSNR_GOOD_DB,
                     ssim_good: float = SSIM_GOOD, max_cast: float = MAX_CAST, balance: bool = True,
                     device: str = "cpu", dtype: str = "fp32") -> Path:
    """Write labelled discriminator candidates built from RORem triplets; return the new ``meta.json`` path.

    Args:
        meta: RORem ``meta.json`` files (lists of {"source","mask","GT"}, paths relative to the file;
            source and GT RGB images of one size, mask white = remove, ``source == GT`` outside the mask).
        out_dir: created if needed; receives ``result/NNNNNN.png`` (one (H, W, 3) uint8 RGB PNG per
            candidate, numbered in output order), ``meta.json`` and the journal ``labels.jsonl``. The input
            files are not copied.
        per_item: synthetic candidates per input item (>= 1; >= 0 with a bundle); candidate ``v`` of item
            ``i`` uses the RNG ``np.random.default_rng([_STREAM, seed, i, v])``.
        seed: >= 0; also the first removal seed.
        positive_fraction: probability in [0, 1] that a synthetic candidate is a good removal (score 1);
            with a bundle and ``balance`` the item's balance decides instead (module docstring).
        limit: use only the first ``limit`` input items (>= 1); None for all.
        bundle: a remover bundle directory: adds the ``gt``/``source`` anchors, a ``telea`` fill and
            ``removals_per_item`` removals per item, labelled by :func:`agrees_with_gt`. None: synthetic only.
        removals_per_item: K >= 1 removals per item with seeds ``seed .. seed + K - 1`` (default 2); only
            with a bundle.
        psnr_good, ssim_good, max_cast: the agreement rule (dB in (0, 100], SSIM in [-1, 1], levels >= 0).
        balance: with a bundle, choose the synthetic labels per item to balance it (module docstring).
        device, dtype: where the bundle runs ("cpu", "cuda", "auto"; "fp32", "bf16", "fp16" on CUDA).

    Output ``meta.json``: a list of ``{"source", "mask", "GT", "score", "label_kind", "item",
    "psnr_mask_db", "ssim_mask", "cast_mask"}`` (``removal`` entries also ``"seed"``) in RORem's
    discriminator format: ``GT`` is the *candidate* being judged, ``score`` 1 (good) or 0 (bad),
    ``label_kind`` one of :func:`label_kinds` or :data:`METRIC_KINDS`, ``item`` the index of the input item
    in the concatenated ``meta`` lists, the metrics those of :func:`mask_metrics` against the item's GT.
    ``source``/``mask``/``GT`` are relative to the new meta.json, so
    :func:`cleanplate.training.common.read_meta` reads it. Items with an empty mask (or, with a bundle, a
    dilated mask covering the whole image) are skipped. Each finished item is appended to ``labels.jsonl``
    (its PNGs written first); a rerun with the same options (``limit`` and ``device`` aside) resumes after
    the last journalled item, one with other options starts over. ``meta.json`` is written atomically at
    the end; a stale ``result/`` from an earlier, larger run is not cleared.

    Raises:
        InputError: code "bad_option" for per_item, positive_fraction, seed, limit, removals_per_item (or
            it without a bundle), psnr_good, ssim_good or max_cast out of range, unreadable meta files or
            no item with a usable mask; "size_mismatch" when an item's images differ in size; "bad_input"
            for an unreadable image; "busy" while another run writes to ``out_dir``.
        BundleError: the bundle cannot be read.
    """
    k = _check_options(per_item, seed, positive_fraction, limit, bundle, removals_per_item, psnr_good, ssim_good,
                       max_cast)
    from tqdm.auto import tqdm

    from .flywheel import _append_line

    options: dict[str, Any] = {
        "format": 1, "meta": [str(Path(m).resolve()) for m in meta], "seed": int(seed), "per_item": int(per_item),
        "positive_fraction": float(positive_fraction), "bundle": None, "removals_per_item": k,
        "psnr_good": float(psnr_good), "ssim_good": float(ssim_good), "max_cast": float(max_cast),
        "balance": bool(balance), "dtype": dtype,
    }
    if bundle is not None:
        from cleanplate.bundle import read_config
        from cleanplate.pipeline import resolve_device, resolve_dtype

        read_config(bundle)  # a bad bundle fails before anything is written
        resolve_dtype(dtype, resolve_device(device))
        options["bundle"] = _bundle_fingerprint(Path(bundle))
    items = read_meta(meta)[:limit]
    out = Path(out_dir)
    (out / "result").mkdir(parents=True, exist_ok=True)
    journal = out / JOURNAL
    rule = {"psnr_good": psnr_good, "ssim_good": ssim_good, "max_cast": max_cast}
    entries: list[dict] = []
    skipped = 0
    with exclusive(out, _LOCK, f"another `data disc-labels` is writing to {out}"):
        header, done = _read_journal(journal)
        if header != options:
            if header is not None:
                changed = sorted(key for key in options if header.get(key) != options[key])
                log.warning("disc labels: %s was made with other options (%s); starting over", out, ", ".join(changed))
            done = {}
            imaging.write_atomic(journal, (json.dumps({"options": options}) + "\n").encode())
        number = sum(len(v) for v in done.values())
        pipe = None
        for i, item in enumerate(tqdm(items, desc="disc labels", unit="item", mininterval=5)):
            if i in done:
                entries.extend(done[i])
                skipped += not done[i]
                continue
            src, mask, gt = _load(item, i)
            reason = None if mask.any() else "empty mask"
            cands: list[tuple[Rgb, str, int, dict[str, Any]]] = []
            if reason is None:
                if bundle is not None and pipe is None:
                    from cleanplate.pipeline import RemovalPipeline

                    pipe = RemovalPipeline.from_bundle(bundle, device=device, dtype=dtype)
                try:
                    cands = _candidates(src, mask, gt, i, pipe=pipe, seeds=range(seed, seed + k), per_item=per_item,
                                        seed=seed, positive_fraction=positive_fraction, balance=balance, rule=rule)
                except InputError as exc:
                    if exc.code != ErrorCode.FULL_MASK:
                        raise
                    reason = str(exc)
            rel = {"source": Path(os.path.relpath(item.source, out)).as_posix(),
                   "mask": Path(os.path.relpath(item.mask, out)).as_posix()}
            item_entries = []
            for cand, kind, score, extra in cands:
                name = f"result/{number:06d}.png"
                number += 1
                save_png(cand, out / name)
                item_entries.append({**rel, "GT": name, "score": score, "label_kind": kind, "item": i, **extra})
            _append_line(journal, {"item": i, "entries": item_entries, **({"skipped": reason} if reason else {})})
            entries.extend(item_entries)
            skipped += reason is not None
    if skipped:
        log.warning("disc labels: skipped %d of %d items (empty mask, or a dilated mask covering the image)",
                    skipped, len(items))
    if not entries:
        raise InputError("no input item has a usable (non-empty) mask", code=ErrorCode.BAD_OPTION)
    meta_path = out / "meta.json"
    return write_meta(meta_path, entries)
