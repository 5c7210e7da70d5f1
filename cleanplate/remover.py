"""One removal, step by step (DESIGN.md): decode -> dilate -> context crop -> model -> feathered paste-back.

Every pixel outside the dilated mask is bit-exact the input; images of any size go through the model
only as a square crop at the bundle resolution, never whole.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from . import compositing, imaging
from .compositing import CropBox
from .errors import ErrorCode, InputError
from .imaging import DecodedImage
from .pipeline import RemovalPipeline


@dataclass
class RemovalRequest:
    """One image to clean; ``dilate_px``, ``seed`` and ``steps`` mean what :class:`cleanplate.options.RemovalOptions`
    declares (a positional dataclass: its callers build many at once).

    Attributes:
        image: the decoded source.
        mask: (H,W) bool, True = remove; same size as the image.
        dilate_px: dilation radius in source px (None: the bundle's default).
        seed: noise seed of this item.
        steps: LCM steps (None: the bundle's default).
    """

    image: DecodedImage
    mask: np.ndarray
    dilate_px: int | None = None
    seed: int = 0
    steps: int | None = None


@dataclass
class RemovalResult:
    """pixels: (H,W,C) with the input's dtype and channels; box: the context window used;
    timings_ms: per stage wall time in ms (crop, model, composite)."""

    pixels: np.ndarray
    box: CropBox
    dilated: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Prepared:
    """A validated request cut for the model.

    Attributes:
        crop: (R,R,3) uint8 RGB context window; crop_mask: (R,R) bool (dilated mask in the window);
        box: the window in source px; dilated: (H,W) bool; dilate_px: the radius used.
    """

    crop: np.ndarray
    crop_mask: np.ndarray
    box: CropBox
    dilated: np.ndarray
    dilate_px: int


def prepare(req: RemovalRequest, resolution: int, default_dilate_px: int) -> Prepared:
    """Validate the mask, dilate it and cut the model crop (DESIGN.md steps 1-4).

    Raises InputError: mask size mismatch, empty mask, or a dilated mask that covers the whole image.
    """
    mask = imaging.validate_mask(req.mask, req.image.size)
    dilate_px = default_dilate_px if req.dilate_px is None else req.dilate_px
    dilated = imaging.dilate_mask(mask, dilate_px)
    if dilated.all():
        raise InputError("the dilated mask covers the whole image; nothing is left to fill from",
                         code=ErrorCode.FULL_MASK)
    box = compositing.context_crop_box(dilated, resolution)
    crop, crop_mask = compositing.crop_to_model(req.image.rgb, dilated, box, resolution)
    return Prepared(crop, crop_mask, box, dilated, dilate_px)


# Windows up to this many times the model side get the full-resolution prefill; larger ones (huge masks on
# huge photos) paste the plain upsampled fill, which bounds Telea's time and memory.
MAX_PREFILL_UPSCALE = 4


def full_resolution_fill(req: RemovalRequest, prep: Prepared, result_crop: np.ndarray, prefill: str) -> np.ndarray:
    """The fill of the whole window at source scale: the prefill computed there plus the model's correction.

    For a bundle whose fill is its prefill plus a learned correction (``BundleConfig.paste_prefill``), the
    model crop is ``P(crop) + Δ``. Upsampling that whole crop to a window larger than the model side blurs
    the prefill too; instead the correction ``result_crop − P(crop)`` is upsampled (bilinear) and added to
    ``P`` computed on the window at full resolution. At 1:1 scale this equals ``result_crop`` exactly.

    Args:
        result_crop: (R,R,3) uint8 model output for ``prep``; prefill: a :mod:`cleanplate.masked_source` fill.
    Returns:
        (S,S,3) uint8, S = ``prep.box.size``.
    """
    from .masked_source import masked_source

    size, r = prep.box.size, result_crop.shape[0]
    window, window_mask = compositing.crop_to_model(req.image.rgb, prep.dilated, prep.box, size)
    full = masked_source(window[None], window_mask[None], prefill)[0]
    small = masked_source(prep.crop[None], prep.crop_mask[None], prefill)[0]
    correction = (result_crop.astype(np.float32) / 127.5 - 1.0) - small
    if size != r:
        correction = cv2.resize(correction, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.round((full + correction + 1.0) * 127.5), 0, 255).astype(np.uint8)


def composite(req: RemovalRequest, prep: Prepared, result_crop: np.ndarray, prefill: str | None = None) -> np.ndarray:
    """Feathered paste-back of the (R,R,3) uint8 model output; native dtype/channels, bit-exact outside
    the dilated mask (DESIGN.md step 5). With ``prefill`` (the engine's ``paste_prefill``) and a window of
    at most :data:`MAX_PREFILL_UPSCALE` × R, the fill is :func:`full_resolution_fill`."""
    fill = result_crop
    if prefill is not None and result_crop.shape[0] < prep.box.size <= MAX_PREFILL_UPSCALE * result_crop.shape[0]:
        fill = full_resolution_fill(req, prep, result_crop, prefill)
    return compositing.paste_back(req.image, fill, prep.box, req.mask, prep.dilated,
                                  feather_px=max(1.0, prep.dilate_px / 2))


def to_uint8_crops(result: torch.Tensor) -> np.ndarray:
    """(B,3,R,R) float in [-1,1] -> (B,R,R,3) uint8."""
    return ((result + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def remove_batch(pipe: RemovalPipeline, requests: Sequence[RemovalRequest], *, max_batch: int = 8) -> list[RemovalResult]:
    """Clean several images, running the model on up to ``max_batch`` crops at a time.

    Items with different ``steps`` run in separate model calls. Raises InputError (before any model
    work) if any request is invalid; callers that need per-item errors call this per item.
    """
    t0 = time.perf_counter()
    prepared = [prepare(r, pipe.resolution, pipe.config.dilate_px) for r in requests]
    crop_ms = (time.perf_counter() - t0) * 1000 / max(1, len(requests))
    outputs: list[np.ndarray | None] = [None] * len(requests)
    model_ms = [0.0] * len(requests)
    by_steps: dict[int | None, list[int]] = {}
    for i, r in enumerate(requests):
        by_steps.setdefault(r.steps, []).append(i)
    for steps, indices in by_steps.items():
        for start in range(0, len(indices), max_batch):
            chunk = indices[start : start + max_batch]
            t1 = time.perf_counter()
            source = crops_to_tensors([prepared[i].crop for i in chunk])
            mask = masks_to_tensor([prepared[i].crop_mask for i in chunk])
            result = pipe(source, mask, seeds=[requests[i].seed for i in chunk], steps=steps)
            result = to_uint8_crops(result)
            elapsed = (time.perf_counter() - t1) * 1000 / len(chunk)
            for j, i in enumerate(chunk):
                outputs[i] = result[j]
                model_ms[i] = elapsed
    results = []
    for i, (req, prep) in enumerate(zip(requests, prepared, strict=True)):
        t2 = time.perf_counter()
        pixels = composite(req, prep, outputs[i], pipe.config.paste_prefill)
        timings = {"crop": crop_ms, "model": model_ms[i], "composite": (time.perf_counter() - t2) * 1000}
        results.append(RemovalResult(pixels, prep.box, prep.dilated, timings))
    return results


def remove(pipe: RemovalPipeline, image: DecodedImage, mask: np.ndarray, *, dilate_px: int | None = None,
           seed: int = 0, steps: int | None = None) -> RemovalResult:
    """Clean one image; see :func:`remove_batch`. ``mask`` is (H,W) bool, True = remove."""
    return remove_batch(pipe, [RemovalRequest(image, mask, dilate_px, seed, steps)])[0]


@dataclass
class ScoreRequest:
    """One (source, result, mask) to judge; ``result`` has the source's size (a cleaned image)."""

    source: DecodedImage
    result: DecodedImage
    mask: np.ndarray
    dilate_px: int | None = None


def score_crops(source: np.ndarray, result: np.ndarray, mask: np.ndarray, box: CropBox, resolution: int,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The discriminator's view of a removal: the removal's context window cut from source and result.

    Args:
        source, result: (H,W,3) uint8 RGB of the same size.
        mask: (H,W) bool, the *dilated* mask used for the removal; box: its context window.
    Returns:
        (source crop, result crop, crop mask): (R,R,3) uint8, (R,R,3) uint8, (R,R) bool.
    """
    src_crop, crop_mask = compositing.crop_to_model(source, mask, box, resolution)
    res_crop, _ = compositing.crop_to_model(result, mask, box, resolution)
    return src_crop, res_crop, crop_mask


def crops_to_tensors(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """(R,R,3) uint8 crops -> (B,3,R,R) float32 in [-1,1]."""
    # np.require copies only read-only or strided crops (e.g. a Triton response); torch needs writable memory
    return torch.stack([torch.from_numpy(np.require(c, requirements=["C", "W"])).permute(2, 0, 1)
                        for c in crops]).float() / 127.5 - 1


def masks_to_tensor(masks: Sequence[np.ndarray]) -> torch.Tensor:
    """(R,R) bool masks -> (B,1,R,R) float32 in {0,1}."""
    return torch.stack([torch.from_numpy(np.ascontiguousarray(m))[None] for m in masks]).float()


def prepare_score(req: ScoreRequest, resolution: int, default_dilate_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one :class:`ScoreRequest` and cut its crops as :func:`score_crops` (same window as removal).

    Raises InputError: sizes differ, or the mask is empty/full.
    """
    if req.result.size != req.source.size:
        raise InputError(f"result is {req.result.width}x{req.result.height} but the source is "
                         f"{req.source.width}x{req.source.height}", code=ErrorCode.SIZE_MISMATCH)
    mask = imaging.validate_mask(req.mask, req.source.size)
    dilated = imaging.dilate_mask(mask, default_dilate_px if req.dilate_px is None else req.dilate_px)
    box = compositing.context_crop_box(dilated, resolution)
    return score_crops(req.source.rgb, req.result.rgb, dilated, box, resolution)


def score_batch(pipe: RemovalPipeline, requests: Sequence[ScoreRequest], *, max_batch: int = 8) -> list[float]:
    """Discriminator scores in [0,1] (higher = cleaner) for full-size images; see :meth:`RemovalPipeline.score`.

    Raises InputError: bad sizes or masks, or a bundle without a discriminator.
    """
    prepared = [prepare_score(r, pipe.resolution, pipe.config.dilate_px) for r in requests]
    scores: list[float] = []
    for start in range(0, len(prepared), max_batch):
        chunk = prepared[start:start + max_batch]
        out = pipe.score(crops_to_tensors([c[1] for c in chunk]), crops_to_tensors([c[0] for c in chunk]),
                         masks_to_tensor([c[2] for c in chunk]))
        scores.extend(float(s) for s in out)
    return scores
