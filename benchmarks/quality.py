"""Removal quality on RORem-format triplets (``cleanplate bench quality SET``): how close to the GT, how often
it passes the discriminator, and whether everything outside the dilated mask stayed bit-exact.

Methods, every one on the full-size image and judged the same way:

* ``identity``: leave the image as it is (the floor; bit-exact everywhere by definition);
* ``telea``: OpenCV's Telea inpainting (``cv2.inpaint``, radius 3) on the whole image with the mask as
  given (the classical baseline);
* ``vae_ceiling``: the GT itself through the bundle's VAE (encode, decode) on the removal's context window,
  pasted back as a removal is: the best any fill of this bundle can score, since every fill is decoded by
  that VAE at that crop scale;
* each engine asked for (:data:`cleanplate.engines.ENGINE_NAMES`: ``torch``, ``opencv``, ``triton``,
  ``onnxruntime``): the gateway's own removal
  (:func:`cleanplate.removal.run_removal`: dilate, crop, engine, feathered paste-back) with the
  engine that ``cleanplate serve --engine NAME`` builds from the same settings. ``opencv`` is Telea on
  the dilated context crop; ``torch``, ``triton`` and ``onnxruntime`` are cleanplate's diffusion remover
  (``onnxruntime`` on an ONNX export of the bundle made for the run, as ``bench latency`` does).

Metrics per item, summarised per method (mean, median):

* PSNR (dB) and SSIM against the GT inside the mask (as given, undilated) and on the whole image. SSIM is
  scikit-image's (Gaussian-free 7x7 window, per channel); "inside the mask" is the mean of its SSIM map
  over the mask pixels. PSNR of identical pixels is capped at 100 dB.
* bit-exact outside the dilated mask: every pixel outside the mask dilated by the bundle's ``dilate_px``
  equals the source's.
* discriminator success: the bundle's discriminator (the quality gate) scores the result as the gateway
  scores it (the removal's context window of source and result); success = score >= the bundle's
  calibrated threshold. The GT's own success rate is reported as the ceiling the judge allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cleanplate.engines import ENGINE_NAMES
from cleanplate.errors import ErrorCode, InputError
from cleanplate.metrics import PSNR_CAP_DB, psnr, ssim, telea

from .common import environment, fmt_ms, pyplot, save_figure, with_environment

ENGINES = ENGINE_NAMES
LABELS = {"identity": "leave as is", "telea": "OpenCV Telea (whole image, mask as given)",
          "vae_ceiling": "ceiling: GT through the bundle's VAE, crop and paste-back",
          "opencv": "opencv engine (Telea on the dilated crop)", "torch": "cleanplate, torch engine",
          "triton": "cleanplate, triton engine", "onnxruntime": "cleanplate, onnxruntime engine",
          "gt": "GT (the judge's ceiling)"}
Say = Callable[[str], None]


def find_meta(set_path: str | Path) -> Path:
    """``SET/meta.json`` for a folder, or the file itself. Raises InputError when there is none."""
    p = Path(set_path)
    meta = p / "meta.json" if p.is_dir() else p
    if not meta.is_file():
        raise InputError(f"no RORem meta.json at {meta} (make a set with `cleanplate data synth`)", code=ErrorCode.BAD_OPTION)
    return meta


def _decoded(pixels: np.ndarray) -> Any:
    from cleanplate.imaging import DecodedImage

    return DecodedImage(pixels, None, "RGB", None, None, None)


def _engine(name: str, bundle: Any, device: str, dtype: str, threads: int | None, triton_url: str | None,
            onnx_dir: Path | None) -> Any:
    from cleanplate.bundle import default_bundle_path
    from cleanplate.engines import EngineOptions, make_engine

    # the resolved bundle, so the opencv engine dilates as the bundle does (without one it uses its own 8 px)
    options = EngineOptions(engine=name, bundle=bundle or default_bundle_path(), device=device, dtype=dtype,
                            torch_threads=threads, max_batch=1, batch_window_ms=0, max_queue=1024,
                            triton_url=triton_url or "127.0.0.1:8001", triton_timeout_s=600, onnx_dir=onnx_dir,
                            onnx_threads=threads)
    return make_engine(options)


async def _remove_all(engines: dict[str, Any], items: list[Any], dilate_px: int, seed: int, say: Say,
                      ) -> tuple[list[dict[str, np.ndarray]], dict[str, list[float]]]:
    """Every method's result for every item (full-size RGB uint8) and each engine's per-item wall ms."""
    from cleanplate import imaging
    from cleanplate.removal import RemoveOptions, run_removal

    for eng in engines.values():
        await asyncio.wait_for(eng.start(), 600)
    outputs, times = [], {n: [] for n in engines}
    try:
        for i, item in enumerate(items):
            src = imaging.decode_image(item.source)
            mask = imaging.decode_mask(item.mask)
            out = {"identity": src.rgb, "telea": telea(src.rgb, mask)}
            for name, eng in engines.items():
                t0 = time.perf_counter()
                res = await run_removal(eng, src, mask, RemoveOptions(seed=seed))
                times[name].append((time.perf_counter() - t0) * 1000)
                out[name] = imaging.to_rgb8(res.pixels)
            outputs.append(out)
            if (i + 1) % 10 == 0 or i + 1 == len(items):
                say(f"removed {i + 1}/{len(items)}")
    finally:
        for eng in engines.values():
            await eng.close()
    return outputs, times


def run_quality(set_path: str | Path, *, engines: Sequence[str] = ("torch", "opencv"), bundle: str | Path | None = None,
                device: str = "cpu", dtype: str = "fp32", limit: int | None = None, seed: int = 0,
                triton_url: str | None = None, threads: int | None = None, onnx_dir: str | Path | None = None,
                say: Say = lambda m: None) -> dict[str, Any]:
    """Score every method on the triplets of ``set_path`` (a folder with meta.json, or the meta.json).

    The onnxruntime engine runs ``onnx_dir`` (a ``cleanplate export onnx`` of the bundle) when given, else a
    fresh export at the bundle's resolution.

    Returns the report: per-item metrics and a per-method summary (see the module docstring).
    Raises:
        InputError: no meta.json, an unknown engine, limit < 1, an unreadable item.
    """
    import torch

    from cleanplate import imaging
    from cleanplate.bundle import default_bundle_path, read_config
    from cleanplate.remover import ScoreRequest, score_batch
    from cleanplate.training.common import read_meta

    meta = find_meta(set_path)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or len(set(engines)) != len(engines):
        raise InputError(f"engines must be distinct names from {ENGINES}, got {list(engines)}", code=ErrorCode.BAD_OPTION)
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}", code=ErrorCode.BAD_OPTION)
    if threads:
        torch.set_num_threads(threads)
    config = read_config(bundle or default_bundle_path())
    items = read_meta([meta])[:limit]
    t_start = time.perf_counter()

    from cleanplate.pipeline import RemovalPipeline

    pipe = RemovalPipeline.from_bundle(bundle, device=device, dtype=dtype)
    judge = pipe if config.discriminator else None

    def measure(triton: str | None, onnx_dir: Path | None) -> tuple[list[dict[str, np.ndarray]], dict[str, list[float]]]:
        built = {e: _engine(e, bundle, device, dtype, threads, triton, onnx_dir) for e in engines}
        return asyncio.run(_remove_all(built, items, config.dilate_px, seed, say))

    with contextlib.ExitStack() as stack:
        onnx_dir = Path(onnx_dir) if onnx_dir is not None else None
        if "onnxruntime" in engines and onnx_dir is None:
            from cleanplate.export.onnx import export_onnx

            onnx_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cleanplate-quality-onnx-")))
            say(f"exporting the bundle to ONNX for {config.resolution} px")
            export_onnx(bundle, onnx_dir, buckets=[config.resolution], max_batch=2)  # dynamic batch needs >= 2
        triton_where = triton_url
        if "triton" in engines and not triton_url:
            from .latency import local_triton

            server = stack.enter_context(local_triton(bundle, [config.resolution], 8,
                                                      threads or torch.get_num_threads(), say))
            triton_url, triton_where = server.grpc_url, "local tritonserver (python backend, onnxruntime)"
        outputs, times = measure(triton_url, onnx_dir)

    for item, out in zip(items, outputs, strict=False):
        out["vae_ceiling"] = vae_ceiling(pipe, imaging.decode_image(item.source), imaging.decode_image(item.gt).rgb,
                                         imaging.decode_mask(item.mask))
    methods = ["identity", "telea", "vae_ceiling", *engines]
    per_item: list[dict[str, Any]] = []
    for item, out in zip(items, outputs, strict=False):
        src = imaging.decode_image(item.source)
        gt = imaging.decode_image(item.gt).rgb
        mask = imaging.decode_mask(item.mask)
        if gt.shape != src.rgb.shape or mask.shape != gt.shape[:2]:
            raise InputError(f"{item.source}: source, mask and GT sizes differ", code=ErrorCode.SIZE_MISMATCH)
        dilated = imaging.dilate_mask(mask, config.dilate_px)
        row: dict[str, Any] = {"source": str(item.source), "mask_fraction": float(mask.mean()), "methods": {}}
        scores = [None] * (len(methods) + 1)
        if judge is not None:
            reqs = [ScoreRequest(src, _decoded(out[m]), mask) for m in methods] + [ScoreRequest(src, _decoded(gt), mask)]
            scores = score_batch(judge, reqs)
        for m, score in zip(methods, scores, strict=False):
            res = out[m]
            s_in, s_all = ssim(res, gt, mask)
            row["methods"][m] = {
                "psnr_mask_db": psnr(res, gt, mask), "psnr_db": psnr(res, gt), "ssim_mask": s_in, "ssim": s_all,
                "bit_exact_outside": bool(np.array_equal(res[~dilated], src.rgb[~dilated])),
                "score": score, "passed": None if score is None else bool(score >= judge.threshold)}
        row["gt_score"] = scores[-1]
        per_item.append(row)

    summary = {m: _summarize([r["methods"][m] for r in per_item], times.get(m)) for m in methods}
    gt_scores = [r["gt_score"] for r in per_item if r["gt_score"] is not None]
    summary["gt"] = {"n": len(per_item), "score_mean": statistics.fmean(gt_scores) if gt_scores else None,
                     "success_rate": (sum(s >= judge.threshold for s in gt_scores) / len(gt_scores)) if gt_scores else None}
    return {
        "harness": "quality", "set": str(meta), "n": len(per_item),
        "settings": {"bundle": str(bundle or default_bundle_path()), "engines": list(engines), "seed": seed,
                     "dilate_px": config.dilate_px, "steps": config.steps, "device": device, "dtype": dtype,
                     "threshold": judge.threshold if judge is not None else None,
                     "triton": triton_where if "triton" in engines else None, "psnr_cap_db": PSNR_CAP_DB},
        "summary": summary, "items": per_item, "wall_s": time.perf_counter() - t_start,
        "environment": environment(device),
    }


def vae_ceiling(pipe: Any, source: Any, gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The GT's context window through the bundle's VAE, pasted back over ``source`` as a removal is.

    source: the DecodedImage; gt: (H,W,3) uint8; mask: (H,W) bool as given. Returns (H,W,3) uint8 RGB.
    """
    import torch

    from cleanplate import compositing, imaging
    from cleanplate.remover import RemovalRequest, composite, crops_to_tensors, prepare, to_uint8_crops

    req = RemovalRequest(source, mask)
    prep = prepare(req, pipe.resolution, pipe.config.dilate_px)
    gt_crop, _ = compositing.crop_to_model(gt, prep.dilated, prep.box, pipe.resolution)
    with torch.inference_mode():
        recon = pipe.decode(pipe.encode(crops_to_tensors([gt_crop])))
    return imaging.to_rgb8(composite(req, prep, to_uint8_crops(recon)[0]))


def _summarize(rows: list[dict[str, Any]], times: list[float] | None) -> dict[str, Any]:
    def col(key: str) -> list[float]:
        return [r[key] for r in rows]

    scores = [r["score"] for r in rows if r["score"] is not None]
    out: dict[str, Any] = {"n": len(rows)}
    for key in ("psnr_mask_db", "psnr_db", "ssim_mask", "ssim"):
        out[f"{key}_mean"] = statistics.fmean(col(key))
        out[f"{key}_median"] = statistics.median(col(key))
    out["bit_exact_rate"] = sum(col("bit_exact_outside")) / len(rows)
    out["score_mean"] = statistics.fmean(scores) if scores else None
    out["success_rate"] = sum(r["passed"] for r in rows) / len(rows) if scores else None
    out["ms_per_item_median"] = statistics.median(times) if times else None
    return out


def to_markdown(report: dict[str, Any], command: str) -> str:
    s, summ = report["settings"], report["summary"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    threshold = "-" if s["threshold"] is None else f"{s['threshold']:.3f}"
    g = summ["gt"]
    gt_score = "-" if g["score_mean"] is None else f"{g['score_mean']:.3f}"
    lines = [f"# Removal quality on `{report['set']}`", "", f"`{command}`", "",
             f"{report['n']} RORem triplets; bundle `{s['bundle']}` ({s['steps']} steps, seed {s['seed']}, dilation "
             f"{s['dilate_px']} px, device {s['device']}); discriminator threshold "
             f"{threshold}. Higher is better everywhere; PSNR and SSIM "
             "against the GT; *in mask* = the mask as given; bit-exact = every pixel outside the dilated mask equals "
             "the source's.", "",
             "| method | PSNR in mask (dB) | SSIM in mask | PSNR whole (dB) | SSIM whole | bit-exact outside | "
             "discriminator success | mean score | ms per image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, v in summ.items():
        if m == "gt":
            continue
        score = "-" if v["score_mean"] is None else f"{v['score_mean']:.3f}"
        lines.append(f"| {LABELS.get(m, m)} | {v['psnr_mask_db_mean']:.2f} | {v['ssim_mask_mean']:.3f} | "
                     f"{v['psnr_db_mean']:.2f} | {v['ssim_mean']:.3f} | {pct(v['bit_exact_rate'])} | "
                     f"{pct(v['success_rate'])} | {score} | {fmt_ms(v['ms_per_item_median'])} |")
    lines += ["", f"Means over items (medians in the JSON). The GT itself passes the discriminator in "
              f"{pct(g['success_rate'])} of items (mean score "
              f"{gt_score}): the ceiling this judge allows. "
              "*ms per image* is the wall time of one gateway-path removal (decode excluded), one at a time."]
    return with_environment(lines, report["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: bars per method of PSNR in mask, SSIM in mask and discriminator success rate."""
    plt = pyplot()
    summ = {m: v for m, v in report["summary"].items() if m != "gt"}
    names = list(summ)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = plt.get_cmap("tab10")(np.arange(len(names)))
    panels = [("psnr_mask_db_mean", "PSNR in mask (dB)", 1), ("ssim_mask_mean", "SSIM in mask", 1),
              ("success_rate", "discriminator success (%)", 100)]
    for ax, (key, title, k) in zip(axes, panels, strict=False):
        vals = [(summ[m][key] or 0.0) * k for m in names]
        bars = ax.bar(range(len(names)), vals, color=colors)
        ax.bar_label(bars, fmt="%.2f" if k == 1 else "%.0f", fontsize=8)
        ax.set_xticks(range(len(names)), [m for m in names], rotation=20)
        ax.set_title(title)
    if report["summary"]["gt"]["success_rate"] is not None:
        axes[2].axhline(100 * report["summary"]["gt"]["success_rate"], color="k", ls="--", lw=1, label="GT")
        axes[2].legend(fontsize=8)
    fig.suptitle(f"quality on {Path(report['set']).parent.name} ({report['n']} items)")
    return [save_figure(fig, out.with_suffix(".png"))]


def panel(set_path: str | Path, bundles: Sequence[str | Path], out: Path, *, limit: int = 8, seed: int = 0,
          tile: int = 256, labels: Sequence[str] | None = None) -> Path:
    """A side-by-side PNG: one row per item, columns source | Telea | each bundle's removal | GT.

    Every removal goes through the production path (:func:`cleanplate.remover.remove`, the bundle's own
    dilation); Telea is the quality table's (whole image, mask as given). Tiles are ``tile`` px squares
    (aspect kept, letterboxed); the mask is outlined in red on the source column.
    Raises InputError: no meta.json, no bundle, limit < 1.
    """
    from cleanplate import imaging
    from cleanplate.pipeline import RemovalPipeline
    from cleanplate.remover import remove
    from cleanplate.training.common import read_meta

    if not bundles or limit < 1:
        raise InputError("panel needs at least one bundle and limit >= 1", code=ErrorCode.BAD_OPTION)
    names = list(labels) if labels else [Path(b).name for b in bundles]
    pipes = [RemovalPipeline.from_bundle(b) for b in bundles]

    def fit(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        k = tile / max(h, w)
        small = cv2.resize(rgb, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
        canvas = np.full((tile, tile, 3), 255, np.uint8)
        y, x = (tile - small.shape[0]) // 2, (tile - small.shape[1]) // 2
        canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
        return canvas

    header = ["source + mask", "OpenCV Telea", *names, "GT"]
    rows = [np.concatenate([_label(h, tile) for h in header], axis=1)]
    for item in read_meta([find_meta(set_path)])[:limit]:
        src = imaging.decode_image(item.source)
        mask = imaging.decode_mask(item.mask)
        outlined = src.rgb.copy()
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outlined, contours, -1, (255, 0, 0), 2)
        cells = [outlined, telea(src.rgb, mask)]
        cells += [imaging.to_rgb8(remove(p, src, mask, seed=seed).pixels) for p in pipes]
        cells.append(imaging.decode_image(item.gt).rgb)
        rows.append(np.concatenate([fit(c) for c in cells], axis=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    imaging.write_atomic(out, cv2.imencode(".png", cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR))[1].tobytes())
    return out


def _label(text: str, width: int) -> np.ndarray:
    strip = np.full((28, width, 3), 255, np.uint8)
    cv2.putText(strip, text[:30], (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return strip
