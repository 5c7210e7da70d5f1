"""``cleanplate train detector``: train the overlay detector (:mod:`cleanplate.detector`) on synthetic data
and calibrate its threshold on held-out photos.

Data (made on first run, resumable, by :func:`training.detector_data.synth_detector_dataset`):

* training: ``train_n`` items at ``train_size`` px on the training photos (``synth.TRAIN_PHOTOS``) and
  procedural scenes, with in-scene marks and clean negatives;
* calibration: ``cal_n`` items at ``cal_size`` px on the held-out photos (``synth.DEV_PHOTOS``, another
  seed than any dev set: the convention of ``build_default_bundle.sh``), half of them negatives.

Training: random crops of ``crop`` px after a random downscale in ``scale_range`` (never upscaled: an
upscaled overlay looks blurred, which is what in-scene print looks like), flips; loss = BCE + soft Dice on
the overlay logit + cross-entropy of the kind logits on overlay pixels. One torch thread is enough.
Checkpoints (model, optimizer, step, RNG) go to ``work_dir/checkpoints/step_N``; a rerun resumes from
the newest. ``init_from`` fine-tunes a calibrated detector instead of starting from random weights (with
``kind_p`` and ``overlay_weights`` to favour kinds). Calibration (:func:`calibrate`) then picks ``threshold``,
``min_area`` and ``grow_threshold``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from cleanplate.detector import (
    COMPONENT_FEATURES,
    TEXT_DETECTOR_LICENSE,
    ComponentRule,
    Detector,
    DetectorConfig,
    TextPrior,
    candidate_components,
    component_features,
    component_scores,
    overlay_mask,
)
from cleanplate.errors import BundleError, ErrorCode, InputError

from . import synth
from .common import rate_upper_bound
from .detector_data import DetectorSynthConfig, synth_detector_dataset

log = logging.getLogger("cleanplate.training.detector")


class DetectorTrainConfig(BaseModel):
    """``cleanplate train detector`` config (JSON keys = fields)."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="output detector/ directory (config.json, model.safetensors)")
    work_dir: Path | None = Field(None, description="data, checkpoints and log; default: OUT + '.work'")
    model: DetectorConfig = Field(default_factory=DetectorConfig, description="network and working size")
    init_from: Path | None = Field(None, description="a detector/ directory whose weights start the run "
                                                     "(fine-tuning; its network must equal `model`'s, except that "
                                                     "`model` may add the text prior, whose input weights start at "
                                                     "0); its calibration record is kept as `init` in the new one")
    text_detector: Path | None = Field(None, description="the text prior's ONNX file (PP-OCRv4 det; needed when "
                                                         "model.text_prior; copied into the detector with the "
                                                         "TEXT_DETECTOR_LICENSE beside it)")
    train_n: int = Field(1600, ge=1)
    train_seed: int = Field(100, ge=0)
    train_size: int = Field(512, ge=64)
    photo_fraction: float = Field(0.6, ge=0, le=1)
    clean_fraction: float = Field(0.2, ge=0, le=1)
    scene_fraction: float = Field(0.45, ge=0, le=1)
    kind_p: tuple[float, float, float, float] = Field(
        (0.4, 0.2, 0.2, 0.2), description="training data: probabilities of text, watermark, badge, logo per overlay")
    cal_n: int = Field(120, ge=1)
    cal_seed: int = Field(200, ge=0)
    cal_size: int = Field(512, ge=64)
    crop: int = Field(256, ge=32, description="training crop side in px (a multiple of 32)")
    scale_range: tuple[float, float] = Field((0.5, 1.0), description="random downscale before cropping")
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(2000, ge=0, description="0: no training, only calibrate `init_from` as `model` "
                                                   "configures it (e.g. after turning on flip_average)")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 1e-4
    warmup_steps: int = Field(50, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    kind_weight: float = Field(0.3, ge=0)
    overlay_weights: dict[str, float] = Field(
        default_factory=dict, description="BCE weight of each kind's pixels (default 1): faint kinds such as "
                                          "watermarks need more than their share of the gradient")
    boundary_weight: float = Field(1.0, ge=1, description="BCE weight of the pixels within boundary_px of an "
                                                            "overlay's edge, on either side (1: off): a mask 1 px "
                                                            "too wide or too narrow is what costs a removal most")
    boundary_px: int = Field(2, ge=1, le=16, description="half-width of that band in px (of the training crop)")
    void_levels: int = Field(0, ge=0, le=255, description="overlay pixels the overlay changed by fewer 8-bit levels "
                                                         "than this (in every channel) are left out of the loss: "
                                                         "no detector can see them (0: off)")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(20, ge=1)
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    max_fp_image_rate: float = Field(0.05, ge=0, le=1, description="calibration: share of held-out negatives "
                                                                     "with any detection allowed")
    fp_image_confidence: float | None = Field(None, gt=0, lt=1, description="calibration: when set, the "
                                              "one-sided Clopper-Pearson upper bound of that share (at this "
                                              "confidence) must stay within max_fp_image_rate, not the share "
                                              "itself, so the limit holds on new photos; None: the share")
    max_fp_area: float = Field(0.003, ge=0, le=1, description="calibration: mean false-positive area allowed on "
                                                               "held-out negatives (fraction of pixels)")

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.out.with_name(self.out.name + ".work")


# ---------------------------------------------------------------- data
def ensure_data(cfg: DetectorTrainConfig) -> tuple[Path | None, Path]:
    """Make (or finish) the training and calibration sets under ``work_dir/data``; their meta.json paths (no
    training set when ``max_steps`` is 0)."""
    root = cfg.resolved_work_dir / "data"
    train = None if cfg.max_steps == 0 else synth_detector_dataset(
        root / "train", cfg.train_n, seed=cfg.train_seed, progress=False,
        cfg=DetectorSynthConfig(size=cfg.train_size, photo_fraction=cfg.photo_fraction, photos=synth.TRAIN_PHOTOS,
                                clean_fraction=cfg.clean_fraction, scene_fraction=cfg.scene_fraction,
                                kind_p=cfg.kind_p))
    cal = synth_detector_dataset(
        root / "cal", cfg.cal_n, seed=cfg.cal_seed, progress=False,
        cfg=DetectorSynthConfig(size=cfg.cal_size, photo_fraction=1.0, photos=synth.DEV_PHOTOS,
                                clean_fraction=0.5, scene_fraction=0.5))
    return train, cal


def ensure_text_maps(meta: Path, prior: TextPrior) -> None:
    """Write the text prior's probability map of every item of a detector data set as ``text/<name>.png``
    (uint8, probability x 255, the item's size; sides padded to a multiple of 32 for the model and cropped
    back); items whose map exists are skipped, so a rerun resumes. Training crops take them as channel 3."""
    from cleanplate.detector import STRIDE

    root = Path(meta).parent
    (root / "text").mkdir(exist_ok=True)
    for e in read_items(meta):
        out = root / "text" / Path(e["source"]).name
        if out.exists():
            continue
        src = _load(e["source"])[..., :3]
        h, w = src.shape[:2]
        padded = np.pad(src, ((0, -h % STRIDE), (0, -w % STRIDE), (0, 0)), mode="edge")
        prob = prior(padded.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)[0, 0, :h, :w]
        synth.save_png(np.round(prob * 255).astype(np.uint8), out, compress_level=1)


def read_items(meta: Path) -> list[dict[str, Any]]:
    """The entries of a detector meta.json with paths made absolute. Raises InputError if unreadable."""
    try:
        entries = json.loads(Path(meta).read_text())
        return [{**e, **{k: str(Path(meta).parent / e[k]) for k in ("source", "mask", "GT", "kind_map")}}
                for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read detector meta {meta}: {exc}", code=ErrorCode.BAD_OPTION) from exc


def _load(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


VOID = 255  # kind-map value of a void pixel: an overlay pixel no detector can see, left out of the loss


def void_pixels(source: np.ndarray, gt_photo: np.ndarray, gt_mask: np.ndarray, levels: int) -> np.ndarray:
    """(H, W) bool: the ``gt_mask`` pixels whose (H, W, C) uint8 ``source`` differs from the ``gt_photo`` by
    fewer than ``levels`` 8-bit levels in every colour channel: the overlay did not visibly change them (a white
    glyph over white, an anti-aliased rim), so no detector can see them ("void", as in Cityscapes, Cordts et
    al., CVPR 2016)."""
    diff = np.abs(source[..., :3].astype(np.int16) - gt_photo[..., :3].astype(np.int16)).max(axis=-1)
    return gt_mask & (diff < levels)


def void_kinds(kind_map: np.ndarray, source: np.ndarray, gt_photo: np.ndarray, levels: int) -> np.ndarray:
    """``kind_map`` (H, W) uint8 with its :func:`void_pixels` set to :data:`VOID`; ``levels`` 0 changes
    nothing."""
    if levels <= 0:
        return kind_map
    return np.where(void_pixels(source, gt_photo, kind_map > 0, levels), np.uint8(VOID), kind_map).astype(np.uint8)


class CropSampler:
    """Random training crops: ``batch(n)`` -> images (n,C,c,c) float in [0,1], mask (n,1,c,c) float {0,1},
    kinds (n,c,c) int64 (0 = none, 1..K, :data:`VOID` = left out of the loss) from items held in memory as
    uint8. C is 3, or 4 with ``text_prior`` (channel 3: the item's ``text/`` map from :func:`ensure_text_maps`,
    cropped alike). ``void_levels`` > 0 marks the overlay pixels the overlay changed by fewer levels void
    (:func:`void_kinds`)."""

    def __init__(self, items: list[dict[str, Any]], crop: int, scale_range: tuple[float, float], seed: int,
                 text_prior: bool = False, void_levels: int = 0) -> None:
        def source(e: dict[str, Any]) -> np.ndarray:
            src = _load(e["source"])[..., :3]
            if not text_prior:
                return src
            text = _load(str(Path(e["source"]).parent.parent / "text" / Path(e["source"]).name))
            return np.concatenate([src, text[..., None]], axis=2)

        def kinds(e: dict[str, Any], src: np.ndarray) -> np.ndarray:
            kind_map = _load(e["kind_map"])
            return void_kinds(kind_map, src, _load(e["GT"]), void_levels) if void_levels > 0 else kind_map

        self.items = [(src, kinds(e, src)) for e in items for src in (source(e),)]
        self.crop, self.scale_range = crop, scale_range
        self.rng = np.random.default_rng(seed)

    def one(self) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        src, kinds = self.items[int(self.rng.integers(len(self.items)))]
        k = self.rng.uniform(*self.scale_range)
        h, w = src.shape[:2]
        nh, nw = max(self.crop, round(h * k)), max(self.crop, round(w * k))
        if (nh, nw) != (h, w):
            src = cv2.resize(src, (nw, nh), interpolation=cv2.INTER_AREA)
            kinds = cv2.resize(kinds, (nw, nh), interpolation=cv2.INTER_NEAREST)
        y, x = int(self.rng.integers(nh - self.crop + 1)), int(self.rng.integers(nw - self.crop + 1))
        src, kinds = src[y:y + self.crop, x:x + self.crop], kinds[y:y + self.crop, x:x + self.crop]
        if self.rng.random() < 0.5:
            src, kinds = src[:, ::-1], kinds[:, ::-1]
        return src, kinds

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = [self.one() for _ in range(n)]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float().div_(255)
        kinds = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        return images, ((kinds > 0) & (kinds != VOID)).float()[:, None], kinds


def boundary_band(mask: torch.Tensor, px: int) -> torch.Tensor:
    """(B,1,H,W) bool: the pixels whose (2·px+1)² neighbourhood holds both mask and non-mask pixels, i.e. within
    ``px`` px (Chebyshev) of the edge of ``mask`` ((B,1,H,W) {0,1} float), on either side."""
    k = 2 * px + 1
    dilated = F.max_pool2d(mask, k, stride=1, padding=px)
    eroded = -F.max_pool2d(-mask, k, stride=1, padding=px)
    return dilated > eroded


def detector_loss(logits: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor, *, dice_weight: float = 1.0,
                  kind_weight: float = 0.3, overlay_weights: tuple[float, ...] | None = None,
                  boundary_weight: float = 1.0, boundary_px: int = 2) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss for logits (B,1+K,H,W), mask (B,1,H,W) {0,1}, kinds (B,H,W) int64 in 0..K or :data:`VOID`: BCE +
    dice_weight · soft Dice (over the batch) on channel 0 + kind_weight · cross-entropy of channels 1..K on mask
    pixels; void pixels count in none of them. ``overlay_weights`` (K floats, kind order) weight the BCE of each
    kind's pixels (background pixels 1); ``boundary_weight`` multiplies the BCE weight of the pixels in
    :func:`boundary_band` (``boundary_px``), as U-Net's weight map weights the borders between cells
    (Ronneberger et al., MICCAI 2015, eq. 2). Returns (scalar loss, its parts as floats)."""
    overlay = logits[:, :1]
    valid = (kinds != VOID)[:, None].to(overlay.dtype)
    weight = valid
    if overlay_weights is not None:
        table = torch.tensor((1.0, *overlay_weights), dtype=overlay.dtype, device=overlay.device)
        weight = valid * table[kinds.clamp(max=len(overlay_weights))][:, None]
    if boundary_weight != 1.0:
        weight = weight * torch.where(boundary_band(mask, boundary_px), boundary_weight, 1.0).to(overlay.dtype)
    bce = F.binary_cross_entropy_with_logits(overlay, mask, weight=weight, reduction="sum") / valid.sum().clamp(min=1)
    p = torch.sigmoid(overlay) * valid
    dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    on = (kinds > 0) & (kinds != VOID)
    ce = F.cross_entropy(logits[:, 1:].permute(0, 2, 3, 1)[on], kinds[on] - 1) if on.any() else logits.sum() * 0
    loss = bce + dice_weight * dice + kind_weight * ce
    return loss, {"bce": bce.item(), "dice": dice.item(), "kind_ce": ce.item()}


# ---------------------------------------------------------------- checkpoints
def _checkpoints(work: Path) -> list[Path]:
    found = [p for p in (work / "checkpoints").glob("step_*") if (p / "done").exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(work: Path, step: int, model: Detector, opt: torch.optim.Optimizer, sampler: CropSampler,
                     keep: int) -> None:
    path = work / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "rng": sampler.rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, path / "state.pt")
    (path / "done").write_text(str(step))
    for old in _checkpoints(work)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _lr_factor(cfg: DetectorTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ---------------------------------------------------------------- calibration
def evaluate_items(detector: Detector, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per item, for :func:`calibrate`: ``prob`` (h, w) float32 overlay and ``kinds`` (K, h, w) float16 kind
    probabilities at the working size, ``gt`` the GT mask resized to them, ``negative`` (no GT pixel)."""
    import cv2

    out = []
    for e in items:
        src = _load(e["source"])
        prob, kinds = detector.probabilities(src)
        gt = _load(e["mask"]) > 127
        if gt.shape != prob.shape:
            gt = cv2.resize(gt.astype(np.uint8), prob.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        out.append({"prob": prob, "kinds": kinds.astype(np.float16), "gt": gt, "negative": not gt.any()})
    return out


def _logistic_regression(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """(weights (F,), intercept) minimising the mean log loss + ``l2`` / (2 n) * |w|^2 of (n, F) standardised
    features ``x`` and (n,) bool labels ``y`` (scikit-learn's ``LogisticRegression(C=1/l2)`` objective), by
    L-BFGS (``torch.optim.LBFGS``)."""
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xt @ w[:-1] + w[-1], yt) + l2 / (2 * len(y)) * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    v = w.detach().numpy()
    return v[:-1], float(v[-1])


def fit_component_rule(evals: list[dict[str, Any]], *, max_fp_image_rate: float, max_fp_area: float,
                       fp_image_confidence: float | None = None,
                       candidate_thresholds: tuple[float, ...] = (0.2, 0.3, 0.5), min_area: int = 16,
                       scores: tuple[float, ...] = tuple(np.round(np.arange(0.05, 0.99, 0.025), 3)),
                       l2: float = 1.0) -> dict[str, Any] | None:
    """Fit a :class:`cleanplate.detector.ComponentRule` on :func:`evaluate_items` records (items with
    ``kinds``): per candidate threshold, a candidate is labelled overlay when at least half its pixels are
    GT; a logistic regression learns that label from :func:`cleanplate.detector.component_features`; then
    the score threshold with the best pixel F1 on the positives among those whose negatives have ≤
    ``max_fp_image_rate`` images with any detection (its upper bound at ``fp_image_confidence``, as
    :func:`calibrate`) and ≤ ``max_fp_area`` mean detected area. Returns {"components" (the rule as a dict),
    "f1", "fp_image_rate", "fp_image_bound", "fp_area", "ok"} for the best candidate threshold, or None when
    no candidate threshold gives both labels."""
    best: dict[str, Any] | None = None
    n_neg = sum(e["negative"] for e in evals)
    for g in candidate_thresholds:
        feats, labels, item_of, hits, areas = [], [], [], [], []
        for i, e in enumerate(evals):
            cands = candidate_components(e["prob"], g, min_area)
            if not cands:
                continue
            feats.append(component_features(e["prob"], e["kinds"].astype(np.float32), cands))
            for rows, cols, foot in cands:
                hit = int((foot & e["gt"][rows, cols]).sum())
                labels.append(2 * hit >= foot.sum())
                item_of.append(i)
                hits.append(hit)
                areas.append(int(foot.sum()))
        y = np.asarray(labels, bool)
        if not len(y) or y.all() or not y.any():
            continue
        x = np.concatenate(feats)
        mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        coef, intercept = _logistic_regression((x - mean) / scale, y, l2)
        fitted = ComponentRule(candidate_threshold=g, min_area=min_area, mean=tuple(mean), scale=tuple(scale),
                               coef=tuple(coef), intercept=intercept, threshold=0.5)
        s = component_scores(fitted, x)
        item_of_a, hits_a, areas_a = np.asarray(item_of), np.asarray(hits), np.asarray(areas)
        negative = np.array([evals[i]["negative"] for i in item_of_a], bool)
        share = areas_a / np.array([evals[i]["prob"].size for i in item_of_a])  # of its photo
        gt_px = sum(int(e["gt"].sum()) for e in evals if not e["negative"])
        for tau in scores:
            keep = s >= tau
            tp = int(hits_a[keep & ~negative].sum())
            fp = int((areas_a - hits_a)[keep & ~negative].sum())
            f1 = 2 * tp / max(1, tp + fp + gt_px)  # 2 tp / (2 tp + fp + fn)
            # candidates are disjoint, so a negative's detected area is the sum of its kept candidates
            detected = len(set(item_of_a[keep & negative].tolist()))
            rate = detected / max(1, n_neg)
            bound = rate_upper_bound(detected, max(1, n_neg), fp_image_confidence)
            area = float(share[keep & negative].sum() / max(1, n_neg))
            ok = bound <= max_fp_image_rate and area <= max_fp_area
            row = {"f1": f1, "fp_image_rate": rate, "fp_image_bound": bound, "fp_area": area, "ok": ok}
            if best is None or (ok, f1) > (best["ok"], best["f1"]):
                rule = fitted.model_copy(update={"threshold": float(tau)})
                best = {"components": rule.model_dump(), **row, "features": list(COMPONENT_FEATURES)}
    return best


def calibrate(evals: list[dict[str, Any]], *, max_fp_image_rate: float, max_fp_area: float,
              fp_image_confidence: float | None = None,
              thresholds: tuple[float, ...] = (*np.round(np.arange(0.3, 0.96, 0.05), 2), 0.97, 0.98, 0.99, 0.995),
              min_areas: tuple[int, ...] = (0, 16, 48, 96, 160, 256, 384, 512, 768),
              grow_thresholds: tuple[float | None, ...] = (None, 0.7, 0.5, 0.3), components: bool = True
              ) -> dict[str, Any]:
    """Pick (threshold, min_area, grow_threshold) for :func:`cleanplate.detector.overlay_mask`: among the
    triples whose held-out negatives have ≤ ``max_fp_image_rate`` images with any detection and ≤
    ``max_fp_area`` mean detected area, the one with the best pixel F1 on the positives; when none meets
    both, the triple with the fewest negative images detected (then best F1). Growth never detects an
    image that its seeds did not, so it trades only area for recall. With ``fp_image_confidence`` the image
    limit applies to the one-sided Clopper-Pearson upper bound of the detected share
    (:func:`cleanplate.training.common.rate_upper_bound`), so it holds on new photos with that confidence:
    with 169 negatives, 5% at 95% allows 3 detected (1.8%), where the bare share would allow 8.

    With ``components`` (and records that carry ``kinds``), a :class:`~cleanplate.detector.ComponentRule` is
    also fitted (:func:`fit_component_rule`); it replaces the seed rule when it meets both limits with a
    better F1. Returns the record stored in the config's ``calibration``: the seed rule's ``threshold``,
    ``min_area`` and ``grow_threshold`` (also the fallback), ``components`` (the rule as a dict, or None),
    and ``f1``, ``fp_image_rate``, ``fp_image_bound``, ``fp_area`` of the rule in use (``seed_*``: the seed
    rule's, when replaced)."""
    pos = [e for e in evals if not e["negative"]]
    neg = [e for e in evals if e["negative"]]
    rows = []
    for t in thresholds:
        for a in min_areas:
            for g in grow_thresholds:
                if g is not None and g >= t:
                    continue
                tp = fp = fn = 0
                for e in pos:
                    m = overlay_mask(e["prob"], t, a, g)
                    tp += int((m & e["gt"]).sum())
                    fp += int((m & ~e["gt"]).sum())
                    fn += int((~m & e["gt"]).sum())
                f1 = 2 * tp / max(1, 2 * tp + fp + fn)
                neg_masks = [overlay_mask(e["prob"], t, a, g) for e in neg]
                detected = sum(bool(m.any()) for m in neg_masks)
                rate = detected / len(neg) if neg else 0.0
                bound = rate_upper_bound(detected, len(neg), fp_image_confidence) if neg else 0.0
                area = float(np.mean([m.mean() for m in neg_masks])) if neg else 0.0
                rows.append({"threshold": float(t), "min_area": int(a), "grow_threshold": g, "f1": f1,
                             "fp_image_rate": rate, "fp_image_bound": bound, "fp_area": area,
                             "ok": bound <= max_fp_image_rate and area <= max_fp_area})
    ok = [r for r in rows if r["ok"]]
    best = max(ok, key=lambda r: r["f1"]) if ok else min(rows, key=lambda r: (r["fp_image_rate"], -r["f1"]))
    limits = ("best F1 within the false-positive limits" if fp_image_confidence is None else
              f"best F1 within the false-positive limits (image share bounded with {fp_image_confidence:.0%} "
              "confidence)")
    record = {**best, "rule": limits if ok else "fewest negatives detected",
              "targets_met": bool(ok), "n_positive": len(pos), "n_negative": len(neg),
              "max_fp_image_rate": max_fp_image_rate, "fp_image_confidence": fp_image_confidence,
              "max_fp_area": max_fp_area, "components": None}
    if components and pos and neg and all("kinds" in e for e in evals):
        fitted = fit_component_rule(evals, max_fp_image_rate=max_fp_image_rate, max_fp_area=max_fp_area,
                                    fp_image_confidence=fp_image_confidence)
        if fitted is not None and fitted["ok"] and fitted["f1"] > (best["f1"] if ok else -1.0):
            seed = {f"seed_{k}": best[k] for k in ("f1", "fp_image_rate", "fp_image_bound", "fp_area")}
            record.update(fitted, **seed, rule=f"component rule: {limits}",
                          targets_met=True)
    return record


# ---------------------------------------------------------------- training
_NETWORK_FIELDS = ("widths", "decoder_channels", "head_channels", "kinds")


def _init_detector(cfg: DetectorTrainConfig) -> Detector:
    """The detector in ``cfg.init_from``; InputError if unreadable or its network differs from ``cfg.model``."""
    assert cfg.init_from is not None
    try:
        init = Detector.from_dir(cfg.init_from)
    except BundleError as exc:
        raise InputError(f"cannot load init_from detector {cfg.init_from}: {exc}", code=ErrorCode.BAD_OPTION) from exc
    differ = [f for f in _NETWORK_FIELDS if getattr(init.config, f) != getattr(cfg.model, f)]
    if init.config.text_prior and not cfg.model.text_prior:
        differ.append("text_prior")
    if differ:
        raise InputError(f"init_from {cfg.init_from} has another network ({', '.join(differ)} differ from the "
                         "config's model)", code=ErrorCode.BAD_OPTION)
    return init


def load_init_weights(model: Detector, init: Detector) -> None:
    """``init``'s weights into ``model``. When ``model`` adds the text prior to an RGB-only ``init``, the
    weights that read the new input channel (the first conv and the full-resolution head) start at zero,
    so the fine-tune starts from exactly ``init``'s logits."""
    theirs = init.net.state_dict()
    mine = model.net.state_dict()
    for name, value in theirs.items():
        target = mine[name]
        if value.shape == target.shape:
            target.copy_(value)
        elif name in ("mean", "std"):
            target[:, :value.shape[1]] = value
        else:  # a conv weight (out, in, k, k) that reads the input: the text channel is the last one
            target.zero_()
            target[:, :value.shape[1]] = value
    model.net.load_state_dict(mine)


def train_detector(cfg: DetectorTrainConfig) -> dict[str, Any]:
    """Train, calibrate on the held-out split and write ``cfg.out``; returns {"calibration", "steps", "loss"}.

    Starts from ``init_from``'s weights when given, but resumes from the newest checkpoint in
    ``work_dir/checkpoints`` when there is one. Raises InputError for a crop that is not a multiple of 32, a text
    prior without its ONNX file,
    ``overlay_weights`` naming a kind the model does not have, or an ``init_from`` that cannot be loaded or
    has another network.
    """
    if cfg.crop % 32:
        raise InputError(f"crop must be a multiple of 32, got {cfg.crop}", code=ErrorCode.BAD_OPTION)
    if cfg.model.text_prior and (cfg.text_detector is None or not Path(cfg.text_detector).is_file()):
        raise InputError(f"model.text_prior needs text_detector, the text detector's ONNX file (got "
                         f"{cfg.text_detector})", code=ErrorCode.BAD_OPTION)
    if cfg.model.text_prior and not Path(cfg.text_detector).with_name(TEXT_DETECTOR_LICENSE).is_file():
        # saving copies the notice beside the model (Apache-2.0): fail now, not after the training
        raise InputError(f"the text prior {cfg.text_detector} has no {TEXT_DETECTOR_LICENSE} beside it",
                         code=ErrorCode.BAD_OPTION)
    if cfg.max_steps == 0 and cfg.init_from is None:
        raise InputError("max_steps 0 only calibrates, so it needs init_from", code=ErrorCode.BAD_OPTION)
    unknown = set(cfg.overlay_weights) - set(cfg.model.kinds)
    if unknown:
        raise InputError(f"overlay_weights names unknown kinds {sorted(unknown)}; kinds are {list(cfg.model.kinds)}",
                         code=ErrorCode.BAD_OPTION)
    overlay_weights = tuple(cfg.overlay_weights.get(k, 1.0) for k in cfg.model.kinds)
    init = _init_detector(cfg) if cfg.init_from is not None else None
    torch.set_num_threads(cfg.threads)
    work = cfg.resolved_work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_meta, cal_meta = ensure_data(cfg)
    log.info("data ready in %.0f s", time.time() - t0)
    torch.manual_seed(cfg.seed)
    model = Detector(cfg.model, cfg.text_detector)
    if model.text_prior is not None:
        for meta in (train_meta, cal_meta):
            if meta is not None:
                ensure_text_maps(meta, model.text_prior)
        log.info("text maps ready in %.0f s", time.time() - t0)
    if init is not None:
        load_init_weights(model, init)
    step = 0
    history: list[float] = []
    found = [] if train_meta is None else _checkpoints(work)  # max_steps 0: calibrate init_from as it is
    if train_meta is not None:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sampler = CropSampler(read_items(train_meta), cfg.crop, cfg.scale_range, cfg.seed, cfg.model.text_prior,
                              cfg.void_levels)
    if found:
        state = torch.load(found[-1] / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sampler.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        log.info("resumed from %s (step %d)", found[-1], step)
    model.train()
    with (work / "train_log.jsonl").open("a") as journal:
        while step < cfg.max_steps:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, step)
            images, mask, kinds = sampler.batch(cfg.batch_size)
            loss, parts = detector_loss(model(images), mask, kinds, dice_weight=cfg.dice_weight,
                                        kind_weight=cfg.kind_weight, overlay_weights=overlay_weights,
                                        boundary_weight=cfg.boundary_weight, boundary_px=cfg.boundary_px)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            history.append(loss.item())
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                line = {"step": step, "loss": float(np.mean(history[-cfg.log_every:])), **parts,
                        "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 1)}
                journal.write(json.dumps(line) + "\n")
                journal.flush()
                log.info("%s", line)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                _save_checkpoint(work, step, model, opt, sampler, cfg.keep_checkpoints)
    model.freeze()
    cal = calibrate(evaluate_items(model, read_items(cal_meta)), max_fp_image_rate=cfg.max_fp_image_rate,
                    max_fp_area=cfg.max_fp_area, fp_image_confidence=cfg.fp_image_confidence)
    model.config = model.config.model_copy(update={
        **{k: cal[k] for k in ("threshold", "min_area", "grow_threshold")},
        "components": None if cal["components"] is None else ComponentRule(**cal["components"])})
    trained = train_meta is not None
    provenance = {**cal, "train_steps": step, "train_items": cfg.train_n if trained else 0,
                  "train_seed": cfg.train_seed if trained else None,
                  "cal_items": cfg.cal_n, "cal_seed": cfg.cal_seed, "cal_photos": list(synth.DEV_PHOTOS)}
    if init is not None:
        provenance["init"] = {"from": str(cfg.init_from), **init.config.calibration}
    model.save(cfg.out, calibration=provenance)
    return {"calibration": cal, "steps": step, "loss": float(np.mean(history[-50:])) if history else None}
