"""Where a removal's mask comes from: the one rule for ``cleanplate remove``, ``cleanplate batch run`` (local
and Ray runners, in-process engines and ``--url``), ``cleanplate flywheel generate --auto-mask`` and the gateway's
``POST /v1/remove`` (issue 17, "Auto-mask").

The rule (:func:`choose_mask`), first match wins:

1. **file**: a mask file was given (``--mask``, ``--masks``, a manifest's ``mask``, the gateway's ``mask``
   part): its white pixels (or its alpha with ``--mask-channel alpha``), whatever the image holds;
2. **alpha**: the image has an alpha channel with at least one pixel under 50% opacity: those pixels;
3. **auto**: auto-masking is on (``--auto-mask``; the gateway's ``auto_mask`` field, on by default): the
   overlay detector's mask (:mod:`cleanplate.detector`), run by the engine (:meth:`Engine.detect
   <cleanplate.engines.Engine.detect>`) or, in ``cleanplate remove``, by the bundle's detector;
4. otherwise the alpha rule's error: "no_alpha" without an alpha channel, "empty_mask" for an opaque one.

An auto mask that selects nothing (a clean photo) is no error: the image comes back unchanged, without a model
run (``attempts`` 0, :meth:`cleanplate.removal.Outcome.unchanged`). Every path detects on the same pixels
(:attr:`DecodedImage.rgb <cleanplate.imaging.DecodedImage.rgb>`) with the same pre- and post-processing, so one
image gets one mask everywhere.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import EngineUnavailable, ErrorCode, InputError
from .imaging import DecodedImage, mask_from_alpha

if TYPE_CHECKING:
    from .detector import Detection, Detector


class MaskSource(str, Enum):
    """Where a removal's mask came from (the report's ``mask_source``, the gateway's
    ``X-Cleanplate-Mask-Source``)."""

    file = "file"
    alpha = "alpha"
    auto = "auto"


@dataclass(frozen=True)
class MaskChoice:
    """The rule's answer: ``source``, and ``mask`` (H, W) bool (True = remove) for a file or alpha source;
    None for auto (the detector makes it)."""

    source: MaskSource
    mask: np.ndarray | None


@dataclass(frozen=True)
class ResolvedMask:
    """The mask a removal uses: (H, W) bool ``mask``, its ``source``, and for an auto mask the detector's
    ``detections`` (boxes in source px, kinds, scores, areas). ``nothing_found``: an auto mask that is empty."""

    source: MaskSource
    mask: np.ndarray
    detections: list[Detection] | None = field(default=None)

    @property
    def nothing_found(self) -> bool:
        return self.source is MaskSource.auto and not self.mask.any()


def has_transparency(image: DecodedImage) -> bool:
    """True when ``image`` has an alpha channel with at least one pixel under 50% opacity."""
    return image.alpha is not None and bool(mask_from_alpha(image).any())


def choose_mask(image: DecodedImage, given: np.ndarray | None, *, auto: bool) -> MaskChoice:
    """Apply the module's rule: ``given`` is the decoded mask file ((H, W) bool) or None; ``auto`` whether
    the detector may make the mask.

    Raises:
        InputError: "no_alpha" when no file is given, the image has no alpha channel and ``auto`` is off.
    """
    if given is not None:
        return MaskChoice(MaskSource.file, given)
    if has_transparency(image) or not auto:
        return MaskChoice(MaskSource.alpha, mask_from_alpha(image))  # no_alpha / an empty mask fail as before
    return MaskChoice(MaskSource.auto, None)


def no_detector(what: str) -> InputError:
    """The "no_detector" error for an automatic mask asked of ``what`` (an engine or a bundle)."""
    return InputError(f"no mask was given and the image has no transparent pixels, but {what} has no overlay "
                      f"detector to find what to remove (give a mask, or use a bundle with detector/)",
                      code=ErrorCode.NO_DETECTOR)


def auto_mask_of(result: Any) -> np.ndarray:
    """(H, W) bool from a :class:`~cleanplate.detector.DetectionResult`'s uint8 {0, 255} mask."""
    return np.asarray(result.mask) > 0


async def detect(engine: Any, image: DecodedImage) -> Any:
    """``engine.detect`` on the image's RGB pixels: a :class:`~cleanplate.detector.DetectionResult`.

    Raises:
        EngineUnavailable: the engine is not ready (a Triton engine knows whether its repository has a
            detector only once connected, so an outage must not read as "no_detector").
        InputError: "no_detector" when the engine has none (engines that predate the detector included).
    """
    if not engine.ready():
        raise EngineUnavailable(f"the {engine.name} engine is not ready")
    if not getattr(engine, "has_detector", False):
        raise no_detector(f"the {engine.name} engine")
    return await engine.detect(image.rgb)


async def resolve_mask(engine: Any, image: DecodedImage, given: np.ndarray | None, *, auto: bool) -> ResolvedMask:
    """The mask a removal through ``engine`` uses (:func:`choose_mask`, then :func:`detect` for auto).

    Raises:
        InputError: "no_alpha" as :func:`choose_mask`; "no_detector" as :func:`detect`.
    """
    choice = choose_mask(image, given, auto=auto)
    if choice.mask is not None:
        return ResolvedMask(choice.source, choice.mask)
    result = await detect(engine, image)
    return ResolvedMask(MaskSource.auto, auto_mask_of(result), list(result.detections))


def bundle_detector(bundle: str | Path | None) -> Detector:
    """The overlay detector of ``bundle`` (None = the default bundle), float32 on the CPU.

    Raises:
        InputError: "no_detector" when the bundle has no ``detector/``; BundleError for a bad bundle.
    """
    from .bundle import DETECTOR_DIR, default_bundle_path, read_config
    from .detector import Detector

    root = Path(bundle) if bundle is not None else default_bundle_path()
    if not read_config(root).detector:
        raise no_detector(f"the bundle {root}")
    return Detector.from_dir(root / DETECTOR_DIR)


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) bool or uint8 mask (nonzero = remove) -> 8-bit grey PNG bytes, white = remove (what every mask
    input reads back as the same mask)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255).save(buf, "PNG")
    return buf.getvalue()


def detections_json(detections: list[Detection]) -> list[dict[str, Any]]:
    """Detections as JSON objects: ``box`` [x0, y0, x1, y1] (source px, x1/y1 exclusive), ``kind``, ``score``
    (mean overlay probability, 4 decimals), ``area`` (px)."""
    return [d.to_dict() for d in detections]


def resolve_mask_with(detector: Detector | None, image: DecodedImage, given: np.ndarray | None, *, auto: bool,
                      what: str = "the bundle") -> ResolvedMask:
    """:func:`resolve_mask` with a :class:`~cleanplate.detector.Detector` in this thread instead of an engine
    (``cleanplate remove``); ``detector`` None = none (``what`` names whose, for the error).

    Raises:
        InputError: "no_alpha" as :func:`choose_mask`; "no_detector" when the detector is needed and None.
    """
    choice = choose_mask(image, given, auto=auto)
    if choice.mask is not None:
        return ResolvedMask(choice.source, choice.mask)
    if detector is None:
        raise no_detector(what)
    result = detector.detect(image.rgb)
    return ResolvedMask(MaskSource.auto, auto_mask_of(result), list(result.detections))
