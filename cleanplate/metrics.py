"""Removal quality against the GT: PSNR and SSIM over the whole image or inside the mask, and the Telea
baseline. One home for the benchmarks, the SFT evaluation hook and the quality gate's labels.
"""

from __future__ import annotations

import cv2
import numpy as np

PSNR_CAP_DB = 100.0


def psnr(result: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images (H,W,3) over all pixels or the ``mask`` (H,W) bool ones; capped at 100 dB."""
    a, b = (result, gt) if mask is None else (result[mask], gt[mask])
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * float(np.log10(255.0**2 / mse)))


def ssim(result: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(SSIM inside ``mask``, SSIM of the whole image) of uint8 RGB images (H,W,3), in [-1, 1].

    Wang et al. 2004 via ``skimage.metrics.structural_similarity`` (7x7 window, data range 255, per
    channel); inside the mask = the mean of the SSIM map over the mask's pixels and channels.
    """
    from skimage.metrics import structural_similarity

    whole, smap = structural_similarity(gt, result, channel_axis=2, data_range=255, full=True)
    return float(smap[mask].mean()), float(whole)


def telea(source: np.ndarray, mask: np.ndarray, radius: int = 3) -> np.ndarray:
    """OpenCV Telea inpainting (Telea 2004, ``cv2.inpaint``): (H,W,3) uint8 RGB, (H,W) bool -> uint8 RGB.

    Telea weighs each channel's neighbours by geometry only, so RGB needs no conversion to BGR."""
    return cv2.inpaint(np.ascontiguousarray(source), mask.astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
