"""The overlay detector: which pixels of a product photo did a storefront add (promo text, watermarks,
badges, logos)? Its mask is a removal mask (issue 17, "Auto-mask").

Model: a small fully convolutional segmentation net (:class:`DetectorNet`, ~0.5 M parameters): a
stride-2 encoder of five stages (1/2 .. 1/32), an FPN-style top-down decoder back to 1/2, and a
full-resolution head that also sees the input pixels, so thin strokes keep their edges. It gives per
pixel one logit "storefront overlay" and ``len(kinds)`` kind logits (text, watermark, badge, logo).

Inference (:meth:`Detector.detect`): the photo is resized so its long side is ``working_size`` (area
down, linear up), padded to a multiple of 32 by edge replication, run, cropped and resized back;
``probability >= threshold`` gives the seeds, seed components smaller than ``min_area`` (px at the
working size) are dropped, and with a ``grow_threshold`` each kept seed grows into the pixels of
``probability >= grow_threshold`` connected to it (hysteresis thresholding, as in Canny, IEEE TPAMI 1986):
a confident core decides *whether* something is there, the weaker evidence around it decides *how far*
it reaches. With a :class:`ComponentRule` in the config (``components``), a second stage decides instead:
every component of ``probability >= candidate_threshold`` is a candidate, and a logistic regression over its
statistics (size, confidence, kind probabilities, shape: :func:`component_features`) keeps or drops it whole,
so a large, uniformly likely watermark counts although no pixel of it is near-certain, and a small confident
patch of product print does not. Each final component becomes a :class:`Detection` (box, kind, score).
``threshold``, ``min_area``, ``grow_threshold`` and the rule are calibrated on held-out photos
(``cleanplate train detector``).

Text prior (``text_prior: true``): the network also sees a fourth input channel, the text probability map of
PP-OCRv4's text detector (DB, Liao et al., "Real-time Scene Text Detection with Differentiable
Binarization", AAAI 2020; the ONNX file ``ch_PP-OCRv4_det_infer.onnx`` from the ``rapidocr-onnxruntime``
wheel, Apache-2.0, run by ONNX Runtime: :class:`TextPrior`). It finds text of any contrast, faint watermarks
included, but also the product's own print; the detector decides which text a storefront added.

Bundle layout: ``detector/config.json`` (:class:`DetectorConfig`), ``detector/model.safetensors`` and, with a
text prior, ``detector/text_detector.onnx`` plus its licence ``detector/TEXT_DETECTOR_LICENSE``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from .errors import BundleError, ErrorCode, InputError
from .imaging import write_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_DETECTOR_FILE = "text_detector.onnx"
TEXT_DETECTOR_LICENSE = "TEXT_DETECTOR_LICENSE"
KINDS: tuple[str, ...] = ("text", "watermark", "badge", "logo")
STRIDE = 32  # the encoder's total downsampling; inputs are padded to a multiple of it


COMPONENT_FEATURES: tuple[str, ...] = (
    "log_area", "max", "mean", "q90", "log1p_px_097", "share_090", "text", "watermark", "badge", "logo", "fill")


class ComponentRule(BaseModel):
    """Which candidate components to keep: a logistic regression over each candidate's statistics.

    Candidates are the 8-connected components of ``overlay >= candidate_threshold`` with at least ``min_area``
    px (at the working size). Each gets the :data:`COMPONENT_FEATURES` of :func:`component_features`,
    standardised by ``mean`` and ``scale``; its score is ``sigmoid(coef . x + intercept)`` in [0, 1] and it
    is kept when the score is ``>= threshold``. Fitted and thresholded on held-out photos by
    ``cleanplate train detector`` (:func:`cleanplate.training.detector.fit_component_rule`): a second stage
    that judges a whole region (how confident, how large, which kind) where the seed rule looks only at its
    most confident pixels."""

    model_config = ConfigDict(extra="forbid")

    candidate_threshold: float = Field(gt=0.0, lt=1.0, description="overlay probability of a candidate's pixels")
    min_area: int = Field(16, ge=1, description="smallest candidate in px at the working size")
    mean: tuple[float, ...] = Field(description="feature means (standardisation)")
    scale: tuple[float, ...] = Field(description="feature standard deviations (standardisation)")
    coef: tuple[float, ...] = Field(description="logistic-regression weights, one per feature")
    intercept: float
    threshold: float = Field(gt=0.0, lt=1.0, description="score at or above which a candidate is kept")

    def model_post_init(self, _: Any) -> None:
        n = len(COMPONENT_FEATURES)
        if not len(self.mean) == len(self.scale) == len(self.coef) == n:
            raise ValueError(f"mean, scale and coef need {n} values each ({', '.join(COMPONENT_FEATURES)})")


class DetectorConfig(BaseModel):
    """Contents of ``detector/config.json``."""

    model_config = ConfigDict(extra="forbid")

    widths: tuple[int, ...] = Field((16, 32, 64, 96, 128), min_length=5, max_length=5,
                                    description="channels of the encoder stages at 1/2, 1/4, 1/8, 1/16, 1/32")
    decoder_channels: int = Field(32, ge=4, description="channels of the top-down decoder")
    head_channels: int = Field(12, ge=4, description="channels of the head (at 1/2, then at full resolution)")
    kinds: tuple[str, ...] = Field(KINDS, description="names of the kind logits, in order")
    working_size: int = Field(512, ge=64, le=4096, description="long side in px the photo is resized to")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="probability at or above which a pixel is overlay")
    min_area: int = Field(0, ge=0, description="seed components smaller than this (px at working_size) are dropped")
    grow_threshold: float | None = Field(None, gt=0.0, lt=1.0,
                                         description="kept seeds grow into connected pixels of at least this "
                                                     "probability (hysteresis); None: no growth")
    text_prior: bool = Field(False, description="the network also takes the text detector's probability map "
                                                "(a fourth input channel; needs text_detector.onnx)")
    flip_average: bool = Field(False, description="average the network's logits over the photo and its "
                                                  "mirror image (test-time augmentation; twice the network's "
                                                  "cost, the text prior runs once)")
    components: ComponentRule | None = Field(None, description="when set, this rule decides which candidate "
                                                               "components are kept, instead of the seed rule "
                                                               "(threshold, min_area, grow_threshold)")
    calibration: dict[str, Any] = Field(default_factory=dict, description="how threshold, min_area, grow_threshold and components were picked")

    def rule_text(self) -> str:
        """How this config decides the mask, in words (reports and the trainer's summary line)."""
        rule = self.components
        if rule is not None:
            return (f"component rule (candidates at overlay probability >= {rule.candidate_threshold:g}, "
                    f">= {rule.min_area} px, kept at score >= {rule.threshold:g})")
        grow = "" if self.grow_threshold is None else f", growth to {self.grow_threshold:g}"
        return f"threshold {self.threshold:g}, min_area {self.min_area} px{grow}"

    @property
    def in_channels(self) -> int:
        """Input channels of :class:`DetectorNet`: RGB, plus the text prior when on."""
        return 3 + int(self.text_prior)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def network_logits(net: nn.Module, x: torch.Tensor, flip_average: bool) -> torch.Tensor:
    """The detector network at inference: ``net(x)``, or with ``flip_average`` the mean of ``net(x)`` and the
    mirrored ``net`` of the mirrored ``x`` (horizontal-flip test-time augmentation, as in Simonyan & Zisserman,
    ICLR 2015, sec. 3.2). x (B, C, H, W) -> (B, 1+K, H, W) logits. Averaging logits rather than probabilities
    keeps the whole of it inside the exported graph. The one home of this rule: the torch engine and the ONNX
    export both call it, and training calls the bare ``net``."""
    if not flip_average:
        return net(x)
    return (net(x) + net(x.flip(-1)).flip(-1)) / 2


class DetectorNet(nn.Module):
    """(B,C,H,W) float in [0,1], C = ``config.in_channels`` (RGB, then the text prior's probability when on),
    H and W multiples of 32 -> (B,1+K,H,W) float logits: channel 0 is "overlay", channels 1..K the kinds
    (meaningful on overlay pixels only)."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        w, d, c = config.widths, config.decoder_channels, config.in_channels
        self.stages = nn.ModuleList(
            nn.Sequential(_conv(c if i == 0 else w[i - 1], w[i], 2), _conv(w[i], w[i])) for i in range(len(w)))
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in w)
        self.smooth = nn.ModuleList(_conv(d, d) for _ in w[1:-1])  # at 1/4 .. 1/16
        h = config.head_channels
        self.coarse = _conv(d, h)  # at 1/2
        self.head = nn.Sequential(_conv(h + c, h), nn.Conv2d(h, 1 + len(config.kinds), 1))  # full resolution
        self.register_buffer("mean", torch.full((1, c, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, c, 1, 1), 0.25))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        p = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            p = F.interpolate(p, size=feats[i].shape[-2:], mode="nearest") + self.lateral[i](feats[i])
            p = self.smooth[i - 1](p) if i > 0 else self.coarse(p)
        p = F.interpolate(p, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([p, (image - self.mean) / self.std], dim=1))


@dataclass(frozen=True)
class Detection:
    """One connected component of the mask.

    Attributes:
        box: (x0, y0, x1, y1) in source px, x1/y1 exclusive.
        kind: the kind with the largest mean probability over the component (one of the config's kinds).
        score: mean overlay probability over the component, in [0, 1].
        area: component area in source px.
    """

    box: tuple[int, int, int, int]
    kind: str
    score: float
    area: int

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "kind": self.kind, "score": round(self.score, 4), "area": self.area}


@dataclass(frozen=True)
class DetectionResult:
    """mask: (H, W) uint8 in {0, 255} at the source size; detections: one per kept component."""

    mask: np.ndarray
    detections: list[Detection]


def probabilities_of(logits: np.ndarray, working: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(overlay (h, w), kinds (K, h, w)) float32 probabilities from one image's (1+K, h', w') logits, cropped
    to the working size (h, w): sigmoid of channel 0, softmax over the kind channels."""
    h, w = working
    z = np.asarray(logits, dtype=np.float32)[:, :h, :w]
    overlay = 1.0 / (1.0 + np.exp(-z[0]))
    k = np.exp(z[1:] - z[1:].max(axis=0, keepdims=True))
    return overlay.astype(np.float32), (k / k.sum(axis=0, keepdims=True)).astype(np.float32)


def overlay_mask(overlay: np.ndarray, threshold: float, min_area: int = 0, grow_threshold: float | None = None
                 ) -> np.ndarray:
    """The detector's mask from its overlay probabilities: (h, w) float32 in [0, 1] -> (h, w) bool.

    Seeds are ``overlay >= threshold``; 8-connected seed components under ``min_area`` px are dropped; with
    ``grow_threshold`` (< threshold) each kept seed is grown to its 8-connected component of
    ``overlay >= grow_threshold`` (hysteresis thresholding). The one home of this rule: engines and
    calibration both call it."""
    import cv2

    seeds = (overlay >= threshold).astype(np.uint8)
    if min_area > 0:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(seeds, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        seeds = keep[labels].astype(np.uint8)
    if grow_threshold is None or grow_threshold >= threshold or not seeds.any():
        return seeds > 0
    n, labels = cv2.connectedComponents((overlay >= grow_threshold).astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[labels[seeds > 0]] = True
    keep[0] = False
    return keep[labels]


def candidate_components(overlay: np.ndarray, candidate_threshold: float, min_area: int
                         ) -> list[tuple[slice, slice, np.ndarray]]:
    """Candidates of :class:`ComponentRule`: the 8-connected components of ``overlay >= candidate_threshold``
    ((h, w) float32) with at least ``min_area`` px, each as its (rows, cols) bbox slices and its (bbox-shaped)
    bool footprint. Candidates are disjoint."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats((overlay >= candidate_threshold).astype(np.uint8),
                                                           connectivity=8)
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i, :5])
        if area >= min_area:
            rows, cols = slice(y, y + h), slice(x, x + w)
            out.append((rows, cols, labels[rows, cols] == i))
    return out


def component_features(overlay: np.ndarray, kinds: np.ndarray,
                       candidates: list[tuple[slice, slice, np.ndarray]]) -> np.ndarray:
    """(n, len(COMPONENT_FEATURES)) float64 statistics of each candidate from :func:`candidate_components`:
    log area (px), max / mean / 90th percentile of the overlay probability, log(1 + px at >= 0.97), share of
    px at >= 0.9, mean probability of each kind (``kinds`` (K, h, w) in the order of :data:`KINDS`, K = 4), and
    fill (area / bbox area)."""
    feats = np.zeros((len(candidates), len(COMPONENT_FEATURES)))
    for j, (rows, cols, foot) in enumerate(candidates):
        p = overlay[rows, cols][foot].astype(np.float64)
        feats[j, :6] = (np.log(p.size), p.max(), p.mean(), np.quantile(p, 0.9), np.log1p((p >= 0.97).sum()),
                        (p >= 0.9).mean())
        feats[j, 6:10] = kinds[:, rows, cols][:, foot].mean(axis=1)
        feats[j, 10] = p.size / foot.size
    return feats


def component_scores(rule: ComponentRule, features: np.ndarray) -> np.ndarray:
    """(n,) float64 scores in [0, 1] of :class:`ComponentRule` for (n, F) :func:`component_features`."""
    x = (features - np.asarray(rule.mean)) / np.asarray(rule.scale)
    return 1.0 / (1.0 + np.exp(-(x @ np.asarray(rule.coef) + rule.intercept)))


def component_mask(overlay: np.ndarray, kinds: np.ndarray, rule: ComponentRule) -> np.ndarray:
    """The detector's mask under a :class:`ComponentRule`: (h, w) float32 overlay and (K, h, w) kind
    probabilities -> (h, w) bool, the union of the kept candidates."""
    cands = candidate_components(overlay, rule.candidate_threshold, rule.min_area)
    mask = np.zeros(overlay.shape, bool)
    if not cands:
        return mask
    keep = component_scores(rule, component_features(overlay, kinds, cands)) >= rule.threshold
    for (rows, cols, foot), k in zip(cands, keep, strict=True):
        if k:
            mask[rows, cols] |= foot
    return mask


class TextPrior:
    """PP-OCRv4's text detector (DB) as the detector's text prior, run by ONNX Runtime on the CPU.

    ``TextPrior(path)(x)``: x (B, 3, H, W) float32 RGB in [0, 1], H and W multiples of 32 (what
    :meth:`DetectorIO.preprocess` makes) -> (B, 1, H, W) float32 text probability in [0, 1]. The model takes
    BGR normalized to [-1, 1] (PaddleOCR's ``DetResizeForTest`` + ``NormalizeImage`` with mean = std = 0.5).
    The session is made on first use with ``threads`` intra-op threads (default: torch's thread count).
    Raises BundleError when the file is missing or is not a loadable ONNX model.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"detector text prior is missing: {self.path}")
        self.threads = threads
        self._session: Any = None

    def _get_session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            try:
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BundleError(f"cannot load the detector's text prior {self.path}: {exc}") from exc
        return self._session

    def __call__(self, x: np.ndarray) -> np.ndarray:
        session = self._get_session()
        bgr = np.ascontiguousarray(np.asarray(x, dtype=np.float32)[:, ::-1]) * 2.0 - 1.0
        return session.run(None, {session.get_inputs()[0].name: bgr})[0].astype(np.float32)


def _check_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise InputError(f"image must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}", code=ErrorCode.BAD_INPUT)
    return arr


class DetectorIO:
    """The detector's pixels in and mask out, without its network: what every engine runs around its own
    network call (torch :class:`Detector`, ONNX Runtime, Triton), so all give the same mask. Needs only the
    :class:`DetectorConfig` (working size, threshold, min_area, kinds)."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config

    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the photo is resized to: long side ``working_size``, aspect kept, each side >= 1."""
        k = self.config.working_size / max(height, width)
        return max(1, round(height * k)), max(1, round(width * k))

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The network input for an (H, W, 3) uint8 RGB photo: (1, 3, h', w') float32 in [0, 1], the photo
        resized to :meth:`working_shape` (h, w) and edge-padded to multiples of 32; also returns (h, w).
        Every engine (torch, ONNX Runtime, Triton) feeds exactly this. Raises InputError for a bad image."""
        import cv2

        arr = _check_image(image)
        h, w = self.working_shape(*arr.shape[:2])
        interp = cv2.INTER_AREA if h < arr.shape[0] else cv2.INTER_LINEAR
        small = arr if (h, w) == arr.shape[:2] else cv2.resize(arr, (w, h), interpolation=interp)
        padded = np.pad(small, ((0, -h % STRIDE), (0, -w % STRIDE), (0, 0)), mode="edge")
        return np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0, (h, w)

    def postprocess(self, logits: np.ndarray, working: tuple[int, int], source: tuple[int, int], *,
                    threshold: float | None = None, min_area: int | None = None) -> DetectionResult:
        """:class:`DetectionResult` from one image's network output: ``logits`` (1+K, h', w') float32 as
        :meth:`Detector.logits` (or the ONNX/Triton model) returns them, ``working`` the (h, w) of :meth:`preprocess`,
        ``source`` the photo's (H, W). Threshold and min_area as in :meth:`Detector.detect`."""
        import cv2

        H, W = source
        t = self.config.threshold if threshold is None else float(threshold)
        amin = self.config.min_area if min_area is None else int(min_area)
        overlay, kinds = probabilities_of(logits, working)
        h, w = overlay.shape
        rule = self.config.components
        if rule is not None and threshold is None and min_area is None:
            small = component_mask(overlay, kinds, rule).astype(np.uint8)
        else:  # the seed rule (also when a caller sets its threshold or min_area)
            small = overlay_mask(overlay, t, amin, self.config.grow_threshold).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(small, connectivity=8)
        mask = small if (h, w) == (H, W) else cv2.resize(small, (W, H), interpolation=cv2.INTER_NEAREST)
        sx, sy = W / w, H / h
        detections = []
        for i in range(1, n):  # every component of the final mask (0 is the background)
            x, y, bw, bh, area = (int(v) for v in stats[i, :5])
            comp = labels[y:y + bh, x:x + bw] == i
            kind = int(kinds[:, y:y + bh, x:x + bw][:, comp].mean(axis=1).argmax())
            box = (int(np.floor(x * sx)), int(np.floor(y * sy)), min(W, int(np.ceil((x + bw) * sx))),
                   min(H, int(np.ceil((y + bh) * sy))))
            detections.append(Detection(box, self.config.kinds[kind], float(overlay[y:y + bh, x:x + bw][comp].mean()),
                                        int(round(area * sx * sy))))
        detections.sort(key=lambda d: -d.area)
        return DetectionResult((mask * 255).astype(np.uint8), detections)


class Detector(nn.Module):
    """The overlay detector. Build with ``Detector(DetectorConfig(...))`` (training) or :meth:`from_dir`.

    Attributes:
        config: the :class:`DetectorConfig` (threshold, min_area, working size, kinds).
        net: the :class:`DetectorNet`.
        text_prior: the :class:`TextPrior` when ``config.text_prior`` (from ``text_detector``), else None.
    """

    def __init__(self, config: DetectorConfig | None = None, text_detector: str | Path | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        self.net = DetectorNet(self.config)
        if self.config.text_prior and text_detector is None:
            raise BundleError("this detector's config has text_prior on: it needs the text detector's ONNX file")
        self.text_prior = TextPrior(text_detector) if self.config.text_prior else None
        # A frozen detector's CPU copy of the network with batch norm folded into the convolutions, in
        # channels-last layout: 26% less time at 512 px on one thread (:meth:`freeze`). Not a submodule, so
        # not in the state dict.
        object.__setattr__(self, "_cpu_net", None)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) float in [0,1] (C = ``config.in_channels``: RGB, then the text prior; H, W multiples of 32)
        -> (B,1+K,H,W) float logits."""
        return self.net(image)

    def with_text_prior(self, x: np.ndarray) -> np.ndarray:
        """The network's input for :meth:`preprocess`'s (B, 3, h', w') float32 RGB: the same with the text
        prior's (B, 1, h', w') probability appended as channel 3 when ``config.text_prior``, else ``x``."""
        if self.text_prior is None:
            return x
        return np.concatenate([x, self.text_prior(x)], axis=1)

    # -- inference ---------------------------------------------------------------------------------
    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        """:meth:`DetectorIO.working_shape` with this detector's config."""
        return DetectorIO(self.config).working_shape(height, width)

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """:meth:`DetectorIO.preprocess` with this detector's config."""
        return DetectorIO(self.config).preprocess(image)

    @torch.inference_mode()
    def logits(self, x: np.ndarray) -> np.ndarray:
        """The torch network on :meth:`preprocess`'s output: (B, 3, h', w') float32 -> (B, 1+K, h', w') float32
        logits (the same function the exported ONNX model computes: :func:`network_logits`, so averaged over
        the mirror image when ``config.flip_average``)."""
        param = next(self.parameters())
        x = torch.from_numpy(self.with_text_prior(x)).to(param.device, param.dtype)
        net = self.net
        if self._cpu_net is not None and param.device.type == "cpu" and param.dtype == torch.float32:
            net, x = self._cpu_net, x.contiguous(memory_format=torch.channels_last)
        return network_logits(net, x, self.config.flip_average).float().cpu().contiguous().numpy()

    def probabilities(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel probabilities at the working size for an (H, W, 3) uint8 RGB photo.

        Returns ``(overlay, kinds)``: overlay (h, w) float32 in [0, 1] and kinds (K, h, w) float32 (softmax
        over the kinds), (h, w) = :meth:`working_shape`. Raises InputError for a non-(H, W, 3) uint8 input.
        """
        x, (h, w) = self.preprocess(image)
        return probabilities_of(self.logits(x)[0], (h, w))

    def detect(self, image: np.ndarray, *, threshold: float | None = None, min_area: int | None = None
               ) -> DetectionResult:
        """Mask and detections for an (H, W, 3) uint8 RGB photo.

        ``threshold`` (probability in (0, 1)) and ``min_area`` (px at the working size) default to the
        calibrated values in the config. The mask is (H, W) uint8 in {0, 255}; boxes are in source px.
        Raises InputError for a non-(H, W, 3) uint8 input.
        """
        arr = _check_image(image)
        x, (h, w) = self.preprocess(arr)
        return self.postprocess(self.logits(x)[0], (h, w), arr.shape[:2], threshold=threshold, min_area=min_area)

    def postprocess(self, logits: np.ndarray, working: tuple[int, int], source: tuple[int, int], *,
                    threshold: float | None = None, min_area: int | None = None) -> DetectionResult:
        """:meth:`DetectorIO.postprocess` with this detector's config."""
        return DetectorIO(self.config).postprocess(logits, working, source, threshold=threshold, min_area=min_area)

    # -- files -------------------------------------------------------------------------------------
    def save(self, directory: str | Path, *, calibration: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created; files replaced
        atomically), and with a text prior its ONNX file and licence; ``calibration`` replaces the config's
        record when given. Returns the directory. Raises BundleError when a text prior's ONNX file has no
        ``TEXT_DETECTOR_LICENSE`` beside it."""
        import shutil

        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.text_prior is not None:
            licence = self.text_prior.path.with_name(TEXT_DETECTOR_LICENSE)
            if not licence.is_file():  # the model is redistributed under Apache-2.0: its notice goes with it
                raise BundleError(f"the text prior {self.text_prior.path} has no {TEXT_DETECTOR_LICENSE} beside it")
            for src, name in ((self.text_prior.path, TEXT_DETECTOR_FILE), (licence, TEXT_DETECTOR_LICENSE)):
                if src.resolve() != (out / name).resolve():
                    shutil.copyfile(src, out / (name + ".tmp"))
                    os.replace(out / (name + ".tmp"), out / name)
        if calibration is not None:
            self.config = self.config.model_copy(update={"calibration": calibration})
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out / WEIGHTS_FILE)
        write_atomic(out / CONFIG_FILE, (self.config.model_dump_json(indent=2) + "\n").encode())
        return out

    @classmethod
    def from_dir(cls, directory: str | Path) -> Detector:
        """Load ``detector/`` (float32, CPU, eval mode). Raises BundleError naming a missing or bad file."""
        from safetensors.torch import load_file

        root = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (root / name).exists():
                raise BundleError(f"detector is missing {name}: {root / name}")
        try:
            config = DetectorConfig.model_validate(json.loads((root / CONFIG_FILE).read_text()))
            det = cls(config, root / TEXT_DETECTOR_FILE if config.text_prior else None)
            det.net.load_state_dict(load_file(str(root / WEIGHTS_FILE)), strict=True)
        except (ValidationError, ValueError, RuntimeError, OSError) as exc:
            raise BundleError(f"cannot load detector from {root}: {exc}") from exc
        return det.freeze()

    def freeze(self) -> Detector:
        """Eval mode, no gradients, and the fast CPU copy of the network that :meth:`logits` uses on a float32
        CPU detector (batch norm folded by ``torch.fx.experimental.optimization.fuse``, channels-last; logits
        equal to the plain network's within 1e-3). Weights changed afterwards are not seen by that copy:
        freeze once training is over. Returns self."""
        import copy

        from torch.fx.experimental.optimization import fuse

        self.eval().requires_grad_(False)
        cpu = copy.deepcopy(self.net).float().cpu()
        object.__setattr__(self, "_cpu_net", fuse(cpu).to(memory_format=torch.channels_last))
        return self


def load_detector(directory: str | Path) -> Detector:
    """:meth:`Detector.from_dir` (the bundle loader's name for it, like ``load_discriminator``)."""
    return Detector.from_dir(directory)
