"""One removal, step by step (DESIGN.md): decode -> dilate -> context crop -> model -> feathered paste-back.

Every pixel outside the dilated mask is bit-exact the input; images of any size go through the model
only as a square crop at the bundle resolution, never whole.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import imaging
from .errors import InputError
from .imaging import CropBox, DecodedImage
from .pipeline import RemovalPipeline


@dataclass
class RemovalRequest:
    """One image to clean.

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
class _Prepared:
    crop: np.ndarray
    crop_mask: np.ndarray
    box: CropBox
    dilated: np.ndarray
    dilate_px: int


def _prepare(req: RemovalRequest, pipe: RemovalPipeline) -> _Prepared:
    mask = imaging.validate_mask(req.mask, req.image.size)
    dilate_px = pipe.config.dilate_px if req.dilate_px is None else req.dilate_px
    dilated = imaging.dilate_mask(mask, dilate_px)
    if dilated.all():
        raise InputError("the dilated mask covers the whole image; nothing is left to fill from", code="full_mask")
    box = imaging.context_crop_box(dilated, pipe.resolution)
    crop, crop_mask = imaging.crop_to_model(req.image.rgb, dilated, box, pipe.resolution)
    return _Prepared(crop, crop_mask, box, dilated, dilate_px)


def remove_batch(pipe: RemovalPipeline, requests: Sequence[RemovalRequest], *, max_batch: int = 8) -> list[RemovalResult]:
    """Clean several images, running the model on up to ``max_batch`` crops at a time.

    Items with different ``steps`` run in separate model calls. Raises InputError (before any model
    work) if any request is invalid; callers that need per-item errors call this per item.
    """
    t0 = time.perf_counter()
    prepared = [_prepare(r, pipe) for r in requests]
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
            source = torch.stack([torch.from_numpy(prepared[i].crop).permute(2, 0, 1) for i in chunk]).float() / 127.5 - 1
            mask = torch.stack([torch.from_numpy(prepared[i].crop_mask)[None] for i in chunk]).float()
            result = pipe(source, mask, seeds=[requests[i].seed for i in chunk], steps=steps)
            result = ((result + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            elapsed = (time.perf_counter() - t1) * 1000 / len(chunk)
            for j, i in enumerate(chunk):
                outputs[i] = result[j]
                model_ms[i] = elapsed
    results = []
    for i, (req, prep) in enumerate(zip(requests, prepared, strict=True)):
        t2 = time.perf_counter()
        pixels = imaging.paste_back(req.image, outputs[i], prep.box, req.mask, prep.dilated,
                                    feather_px=max(1.0, prep.dilate_px / 2))
        timings = {"crop": crop_ms, "model": model_ms[i], "composite": (time.perf_counter() - t2) * 1000}
        results.append(RemovalResult(pixels, prep.box, prep.dilated, timings))
    return results


def remove(pipe: RemovalPipeline, image: DecodedImage, mask: np.ndarray, *, dilate_px: int | None = None,
           seed: int = 0, steps: int | None = None) -> RemovalResult:
    """Clean one image; see :func:`remove_batch`. ``mask`` is (H,W) bool, True = remove."""
    return remove_batch(pipe, [RemovalRequest(image, mask, dilate_px, seed, steps)])[0]
