"""One removal through an engine, with the optional quality gate (docs/DESIGN.md, "One removal"): what the
gateway, ``cleanplate batch`` and ``cleanplate bench quality`` run for each image.

CPU-bound pre/post-processing runs in worker threads so the event loop keeps accepting requests;
the model work runs in the engine. The gate scores the result exactly as ``POST /v1/score`` (and
``cleanplate score``) would score the returned image: the removal's context window cut from the
source and the composited result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from anyio import to_thread

from . import imaging
from .engines import Engine
from .errors import ErrorCode, InputError
from .imaging import DecodedImage
from .options import RemovalOptions, resolved_field
from .remover import RemovalRequest, composite, prepare, score_crops


class RemoveOptions(RemovalOptions):
    """:func:`run_removal`'s options: :class:`~cleanplate.options.RemovalOptions` with the seed, the gate and
    its attempts resolved; None = the engine's (bundle's) default. No upper bound on ``max_attempts`` here: the
    gateway's is its ``max_attempts_limit`` setting."""

    seed: int = resolved_field("seed", 0)
    quality_gate: bool = resolved_field("quality_gate", False)
    max_attempts: int = resolved_field("max_attempts", 1, upper=False)


@dataclass
class Outcome:
    """pixels: (H,W,C) native dtype, the best attempt; score/passed: None without the gate;
    attempts: model runs made; seed: the returned attempt's seed; timings_ms: per stage, summed over attempts."""

    pixels: np.ndarray
    score: float | None
    passed: bool | None
    attempts: int
    threshold: float | None
    seed: int
    timings_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def unchanged(cls, image: DecodedImage, seed: int = 0) -> Outcome:
        """The image as it is, no model run (``attempts`` 0): what an auto mask that found nothing gives
        (:mod:`cleanplate.masks`)."""
        return cls(image.pixels, None, None, 0, None, seed, {})


def _add(timings: dict[str, float], stage: str, t0: float) -> float:
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + (now - t0) * 1000
    return now


async def run_removal(engine: Engine, image: DecodedImage, mask: np.ndarray, opts: RemoveOptions) -> Outcome:
    """Remove ``mask`` (H,W) bool from ``image``; with the gate, retry with seeds seed+1, seed+2, ... until a
    result scores >= threshold or ``max_attempts`` runs are made, and return the best-scoring attempt.

    Raises:
        InputError: bad mask or options; "no_discriminator" when the gate is asked of an engine without one.
        QueueFull, EngineUnavailable: from the engine.
    """
    threshold = None
    if opts.quality_gate:
        if engine.threshold is None:
            raise InputError(f"the {engine.name} engine has no discriminator, so the quality gate is unavailable",
                             code=ErrorCode.NO_DISCRIMINATOR)
        threshold = engine.threshold if opts.threshold is None else opts.threshold
    steps = engine.default_steps if opts.steps is None else opts.steps
    timings: dict[str, float] = {}
    t = time.perf_counter()
    request = RemovalRequest(image, mask, opts.dilate_px, opts.seed, steps)
    prep = await to_thread.run_sync(prepare, request, engine.resolution, engine.default_dilate_px)
    t = _add(timings, "prepare", t)
    # One full-size result at a time: the best attempt is kept as its model crop and composited again at the
    # end if a later attempt scored lower (a 40 MP result is 120 MB; the crop is R x R).
    best: tuple[float, int, np.ndarray] | None = None  # score, attempt, crop
    attempts = opts.max_attempts if opts.quality_gate else 1
    pixels: np.ndarray | None = None
    for attempt in range(attempts):
        pixels = None  # the previous attempt's result goes before the next is made
        crop = await engine.inpaint(prep.crop, prep.crop_mask, seed=opts.seed + attempt, steps=steps)
        t = _add(timings, "model", t)
        pixels = await to_thread.run_sync(composite, request, prep, crop, engine.paste_prefill)
        t = _add(timings, "composite", t)
        if threshold is None:
            return Outcome(pixels, None, None, 1, None, opts.seed, timings)
        _, result_crop, _ = await to_thread.run_sync(
            score_crops, image.rgb, imaging.to_rgb8(pixels), prep.dilated, prep.box, engine.resolution)
        score = await engine.score(prep.crop, result_crop, prep.crop_mask)
        t = _add(timings, "gate", t)
        if best is None or score > best[0]:
            best = (score, attempt, crop)
        if score >= threshold:
            break
    assert best is not None and pixels is not None
    score, chosen, crop = best
    if chosen != attempt:
        pixels = None
        pixels = await to_thread.run_sync(composite, request, prep, crop, engine.paste_prefill)
        _add(timings, "composite", t)
    return Outcome(pixels, score, score >= threshold, attempt + 1, threshold, opts.seed + chosen, timings)


async def run_score(engine: Engine, source: DecodedImage, result: DecodedImage, mask: np.ndarray,
                    dilate_px: int | None) -> float:
    """Discriminator score in [0,1] of a finished removal, cut as :func:`run_removal` cuts it."""
    from .remover import ScoreRequest, prepare_score

    if engine.threshold is None:
        raise InputError(f"the {engine.name} engine has no discriminator, so scoring is unavailable",
                         code=ErrorCode.NO_DISCRIMINATOR)
    src, res, crop_mask = await to_thread.run_sync(
        prepare_score, ScoreRequest(source, result, mask, dilate_px), engine.resolution, engine.default_dilate_px)
    return await engine.score(src, res, crop_mask)
