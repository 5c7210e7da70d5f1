"""``cleanplate bench detect``: how well the overlay detector's masks match the overlays, on photos it never
trained on, and what it costs on a CPU.

Data (made on first run under ``--work``, by :func:`cleanplate.training.detector_data.synth_detector_dataset`,
at 512 px on ``synth.DEV_PHOTOS`` only, seeds apart from the calibration split's):

* **dev** (``--dev-n``, default 240): every item has 1-2 overlays (text, watermark, badge, logo), 30% also
  carry in-scene marks in the GT (which must stay out of the mask);
* **negatives** (``--neg-n``, default 120): no overlay; half clean photo crops, half with in-scene text and
  marks printed on the scene.

Metrics (the detector's own :meth:`Detector.detect`, calibrated threshold and ``min_area``; masks compared at
the source size):

* pixel precision, recall, F1 and IoU summed over all dev pixels; per kind on the items whose overlays are
  all of that kind, plus each kind's pixel recall over every item (from the kind map); the median per-item F1;
  and, as a diagnostic beside them (not the bar), the same over the *visible* overlay pixels: GT-mask pixels
  where the source differs from the GT photo by fewer than ``INVISIBLE_LEVELS`` levels in every channel (a
  white watermark glyph over white, an anti-aliased rim) are left out of the count, as "void" pixels are in
  segmentation benchmarks (Cityscapes, Cordts et al., CVPR 2016): no detector can see them, and leaving them
  costs a removal nothing;
* on negatives: mean false-positive area (share of pixels detected) and the share of images with any
  detection, for clean and in-scene-text photos apart and together;
* CPU latency of ``detect`` on a 512 x 512 photo (median, p95 over ``--repeats`` runs after 2 warm-ups;
  torch threads as given, default 1), of the network forward alone and of its text prior alone;
* **end to end** (on by default, ``--no-e2e`` skips it): every dev item removed twice by the bundle's torch
  engine through the gateway's path (:func:`cleanplate.removal.run_removal`, seed ``--seed``): once with the
  GT mask, once with the detector's mask (a mask that finds nothing leaves the photo unchanged, as the
  product does); PSNR against the GT photo inside the GT mask (:func:`cleanplate.metrics.psnr`) for both and
  for leaving the photo as it is, the gap (GT mask - auto mask, target <= 1 dB), the share of items where the
  detector found nothing, and whole-image PSNR (which also charges what an auto mask removed outside the GT
  mask). With ``--detector DIR`` the auto masks are that detector's; the removals are always the bundle's.

The report: ``OUT.json``, ``OUT.md``, ``OUT.png`` (per-kind P/R/F1 bars, FP-area histogram, and per item the
in-mask PSNR with the auto mask against that with the GT mask); the run also
writes ``OUT_examples.png`` (source | GT mask | predicted mask for a few dev and negative items).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import environment, pyplot, save_figure, summarize_ms, with_environment

HARNESS = "detect"
TARGETS = {"f1_min": 0.85, "fp_area_max": 0.005, "fp_image_rate_max": 0.05, "latency_512_ms_max": 1400.0,
           "e2e_gap_db_max": 1.0}
KINDS = ("text", "watermark", "badge", "logo")
DEV_SEED, NEG_SEED = 300, 400
INVISIBLE_LEVELS = 5  # 8-bit levels: a GT-mask pixel that changed less than this in every channel is void
Say = Callable[[str], None]


def make_sets(work: Path, dev_n: int, neg_n: int, size: int = 512) -> tuple[Path, Path]:
    """The dev and negative sets (made or finished under ``work``); their meta.json paths."""
    from cleanplate.training.detector_data import DetectorSynthConfig, synth_detector_dataset
    from cleanplate.training.synth import DEV_PHOTOS

    dev = synth_detector_dataset(work / "dev", dev_n, seed=DEV_SEED, progress=False, cfg=DetectorSynthConfig(
        size=size, photo_fraction=1.0, photos=DEV_PHOTOS, clean_fraction=0.0, scene_fraction=0.3))
    neg = synth_detector_dataset(work / "negatives", neg_n, seed=NEG_SEED, progress=False, cfg=DetectorSynthConfig(
        size=size, photo_fraction=1.0, photos=DEV_PHOTOS, clean_fraction=1.0, scene_fraction=0.5))
    return dev, neg


def void_pixels(source: np.ndarray, gt_photo: np.ndarray, gt_mask: np.ndarray) -> np.ndarray:
    """:func:`cleanplate.training.detector.void_pixels` at :data:`INVISIBLE_LEVELS`: (H, W) bool."""
    from cleanplate.training.detector import void_pixels as void_at

    return void_at(source, gt_photo, gt_mask, INVISIBLE_LEVELS)


def _prf(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    return {"precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn), "f1": 2 * tp / max(1, 2 * tp + fp + fn),
            "iou": tp / max(1, tp + fp + fn), "tp": tp, "fp": fp, "fn": fn}


def load_detector_from(bundle: str | Path | None, detector: str | Path | None) -> tuple[Any, str]:
    """The detector of ``--detector DIR``, else of the bundle (default: the bundled one); (detector, where)."""
    from cleanplate.bundle import DETECTOR_DIR, default_bundle_path, read_config
    from cleanplate.detector import Detector
    from cleanplate.errors import BundleError

    if detector is not None:
        return Detector.from_dir(detector), str(detector)
    root = Path(bundle) if bundle is not None else default_bundle_path()
    if not read_config(root).detector:
        raise BundleError(f"bundle {root} has no detector/ (train one with `cleanplate train detector`)")
    return Detector.from_dir(root / DETECTOR_DIR), str(root / DETECTOR_DIR)


def run_detect(work: str | Path, *, bundle: str | Path | None = None, detector: str | Path | None = None,
               dev_n: int = 240, neg_n: int = 120, repeats: int = 10, threads: int = 1, examples: Path | None = None,
               e2e: bool = True, seed: int = 0, say: Say = print) -> dict[str, Any]:
    """Measure the detector (module docstring); returns the report dict (``e2e``: the end-to-end section)."""
    import torch

    from cleanplate.training.detector import read_items

    torch.set_num_threads(threads)
    det, where = load_detector_from(bundle, detector)
    work = Path(work)
    dev_meta, neg_meta = make_sets(work, dev_n, neg_n)
    say(f"sets ready: {dev_meta}, {neg_meta}")
    totals = {"all": [0, 0, 0], **{k: [0, 0, 0] for k in KINDS}}
    visible = {"all": [0, 0, 0], **{k: [0, 0, 0] for k in KINDS}}  # the same with void pixels left out
    void_share = {k: [0, 0] for k in KINDS}
    kind_recall = {k: [0, 0] for k in KINDS}
    items, shown, dev_preds = [], [], []
    for e in read_items(dev_meta):
        src = _png(e["source"])
        pred = det.detect(src).mask > 0
        dev_preds.append((e, pred))
        gt = _png(e["mask"]) > 127
        kmap = _png(e["kind_map"])
        tp, fp, fn = int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum())
        void = void_pixels(src, _png(e["GT"]), gt)
        seen = (int((pred & gt & ~void).sum()), fp, int((~pred & gt & ~void).sum()))
        groups = ["all"] + ([e["kinds"][0]] if len(set(e["kinds"])) == 1 else [])
        for g in groups:
            totals[g] = [a + b for a, b in zip(totals[g], (tp, fp, fn), strict=True)]
            visible[g] = [a + b for a, b in zip(visible[g], seen, strict=True)]
        for i, k in enumerate(KINDS, start=1):
            on = kmap == i
            kind_recall[k][0] += int((pred & on).sum())
            kind_recall[k][1] += int(on.sum())
            void_share[k][0] += int((void & on).sum())
            void_share[k][1] += int(on.sum())
        items.append({"set": "dev", "kind": e["kind"], "scene_marks": e["scene_marks"],
                      "f1": _prf(tp, fp, fn)["f1"], "gt_area": float(gt.mean()), "pred_area": float(pred.mean())})
        if len(shown) < 6:
            shown.append((src, gt, pred))
    neg_rows = []
    for e in read_items(neg_meta):
        src = _png(e["source"])
        pred = det.detect(src).mask > 0
        group = "scene_text" if e["scene_marks"] else "clean"
        neg_rows.append({"set": "negative", "group": group, "fp_area": float(pred.mean()), "any": bool(pred.any())})
        if len(shown) < 9 and (group == "scene_text" or len(shown) < 7):
            shown.append((src, _png(e["mask"]) > 127, pred))
    negatives = {}
    for group in ("clean", "scene_text", "all"):
        rows = [r for r in neg_rows if group == "all" or r["group"] == group]
        negatives[group] = {"n": len(rows), "fp_area_mean": float(np.mean([r["fp_area"] for r in rows])) if rows else None,
                            "image_rate": float(np.mean([r["any"] for r in rows])) if rows else None}
    latency = _latency(det, read_items(dev_meta)[0]["source"], repeats)
    overall = _prf(*totals["all"])
    visible_report = {"invisible_levels": INVISIBLE_LEVELS,
                      "void_share": {k: v[0] / max(1, v[1]) for k, v in void_share.items()},
                      **{g: _prf(*v) for g, v in visible.items()}}
    per_kind = {k: {**_prf(*totals[k]), "n_items": sum(1 for r in items if r["kind"] == k),
                    "recall_all_items": kind_recall[k][0] / max(1, kind_recall[k][1])} for k in KINDS}
    targets = [
        {"name": "pixel F1 over all overlays (dev)", "value": overall["f1"], "op": ">=", "target": TARGETS["f1_min"]},
        {"name": "mean false-positive area (negatives)", "value": negatives["all"]["fp_area_mean"], "op": "<=",
         "target": TARGETS["fp_area_max"]},
        {"name": "images with any detection (negatives)", "value": negatives["all"]["image_rate"], "op": "<=",
         "target": TARGETS["fp_image_rate_max"]},
        {"name": "detect at 512 px, CPU median (ms)", "value": latency["detect_ms"]["median"], "op": "<=",
         "target": TARGETS["latency_512_ms_max"]},
    ]
    e2e_report = None
    if e2e:
        e2e_report, e2e_rows = end_to_end(dev_preds, bundle=bundle, threads=threads, seed=seed, say=say)
        for row, extra in zip(items, e2e_rows, strict=True):
            row["e2e"] = extra
        targets.append({"name": "end to end: in-mask PSNR, GT mask - auto mask (dB, dev)",
                        "value": e2e_report["gap_db"], "op": "<=", "target": TARGETS["e2e_gap_db_max"]})
    for t in targets:
        t["met"] = t["value"] >= t["target"] if t["op"] == ">=" else t["value"] <= t["target"]
    report = {"harness": HARNESS, "detector": where, "config": det.config.model_dump(mode="json"),
              "dev_meta": str(dev_meta), "neg_meta": str(neg_meta), "n_dev": len(items), "n_negative": len(neg_rows),
              "overall": overall, "per_kind": per_kind, "visible": visible_report, "median_item_f1": float(np.median([r["f1"] for r in items])),
              "negatives": negatives, "latency": latency, "e2e": e2e_report, "targets": targets,
              "items": items + neg_rows,
              "environment": environment("cpu")}
    if examples is not None:
        _examples(shown, examples)
    return report


def end_to_end(dev: list[tuple[dict[str, Any], np.ndarray]], *, bundle: str | Path | None = None, threads: int = 1,
               seed: int = 0, say: Say = print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Remove each dev item with its GT mask and with its auto mask, and score both against the GT photo.

    Args:
        dev: (detector meta entry with absolute ``source``/``mask``/``GT`` paths, the detector's (H, W) bool
            mask of that source) per item.
        bundle: the bundle whose torch engine removes (None: the default bundle), on the CPU in float32.
        threads: the engine's torch threads. seed: the removals' noise seed.
    Returns:
        (summary, one row per item). Summary: ``n``; for ``gt_mask``, ``auto_mask`` and ``identity`` (leave as
        is) the mean and median PSNR (dB) inside the GT mask and the mean whole-image PSNR; ``gap_db`` (mean
        in-mask PSNR with the GT mask minus with the auto mask); ``gap_db_when_found`` (the same over the items
        where the detector found something); ``nothing_found_rate``; ``per_kind`` (the item's ``kind``: the
        overlay kind, or "mixed"); ``removal_ms`` (the GT-mask removals' wall times, one at a time).
        Rows: ``psnr_mask_db`` and ``psnr_db`` per mask, ``auto_empty``, ``auto_area``.
    """
    return asyncio.run(_end_to_end(dev, bundle, threads, seed, say))


async def _end_to_end(dev: list[tuple[dict[str, Any], np.ndarray]], bundle: str | Path | None, threads: int,
                      seed: int, say: Say) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import statistics

    from cleanplate import imaging
    from cleanplate.metrics import psnr
    from cleanplate.removal import RemoveOptions, run_removal

    from .quality import _engine

    engine = _engine("torch", bundle, "cpu", "fp32", threads, None, None)
    await asyncio.wait_for(engine.start(), 600)
    opts = RemoveOptions(seed=seed)
    rows, removal_ms = [], []
    try:
        for i, (e, auto) in enumerate(dev):
            src = imaging.decode_image(e["source"])
            gt, gt_mask = imaging.decode_image(e["GT"]).rgb, imaging.decode_mask(e["mask"])
            t0 = time.perf_counter()
            with_gt = imaging.to_rgb8((await run_removal(engine, src, gt_mask, opts)).pixels)
            removal_ms.append((time.perf_counter() - t0) * 1000)
            # nothing found: the photo comes back unchanged (cleanplate.masks), so it scores as left as is
            with_auto = src.rgb if not auto.any() else imaging.to_rgb8((await run_removal(engine, src, auto, opts)).pixels)
            results = {"gt_mask": with_gt, "auto_mask": with_auto, "identity": src.rgb}
            rows.append({"kind": e["kind"], "auto_empty": not bool(auto.any()), "auto_area": float(auto.mean()),
                         "psnr_mask_db": {k: psnr(r, gt, gt_mask) for k, r in results.items()},
                         "psnr_db": {k: psnr(r, gt) for k, r in results.items()}})
            if (i + 1) % 20 == 0 or i + 1 == len(dev):
                say(f"end to end: {i + 1}/{len(dev)}")
    finally:
        await engine.close()

    def means(group: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(group)}
        for k in ("gt_mask", "auto_mask", "identity"):
            vals = [r["psnr_mask_db"][k] for r in group]
            out[k] = {"psnr_mask_db_mean": statistics.fmean(vals), "psnr_mask_db_median": statistics.median(vals),
                      "psnr_db_mean": statistics.fmean(r["psnr_db"][k] for r in group)}
        out["gap_db"] = out["gt_mask"]["psnr_mask_db_mean"] - out["auto_mask"]["psnr_mask_db_mean"]
        out["nothing_found_rate"] = sum(r["auto_empty"] for r in group) / len(group)
        return out

    summary = means(rows)
    found = [r for r in rows if not r["auto_empty"]]
    summary["gap_db_when_found"] = means(found)["gap_db"] if found else None
    summary["n_found"] = len(found)
    summary["per_kind"] = {k: means([r for r in rows if r["kind"] == k])
                           for k in sorted({r["kind"] for r in rows})}
    summary["removal_ms"] = summarize_ms(removal_ms)
    summary["settings"] = {"engine": "torch", "bundle": str(bundle) if bundle else "default", "seed": seed,
                           "threads": threads, "device": "cpu", "dtype": "fp32"}
    return summary, rows


def _png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _latency(det: Any, path: str, repeats: int) -> dict[str, Any]:
    """ms of ``detect`` on a 512 x 512 photo, of the network forward alone (``forward_ms``: with a text prior,
    prior + network, as :meth:`Detector.logits`) and of the text prior alone (``text_prior_ms``, or None)."""
    import cv2
    import torch

    img = _png(path)
    if img.shape[:2] != (512, 512):
        img = cv2.resize(img, (512, 512), interpolation=cv2.INTER_AREA)
    x, _ = det.preprocess(img)
    full, net, prior = [], [], []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        det.detect(img)
        t1 = time.perf_counter()
        det.logits(x)
        t2 = time.perf_counter()
        if det.text_prior is not None:
            det.text_prior(x)
        t3 = time.perf_counter()
        if i >= 2:
            full.append((t1 - t0) * 1000)
            net.append((t2 - t1) * 1000)
            prior.append((t3 - t2) * 1000)
    return {"size": [512, 512], "threads": torch.get_num_threads(), "detect_ms": summarize_ms(full),
            "forward_ms": summarize_ms(net), "text_prior_ms": summarize_ms(prior) if det.text_prior is not None else None}


def _examples(shown: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path) -> Path:
    from PIL import Image

    def gray(m: np.ndarray) -> np.ndarray:
        return np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=2)

    rows = [np.concatenate([s, gray(g), gray(p)], axis=1) for s, g, p in shown]
    grid = np.concatenate(rows, axis=0)
    img = Image.fromarray(grid)
    img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _rule_text(config: dict[str, Any]) -> str:
    from cleanplate.detector import DetectorConfig

    return DetectorConfig.model_validate(config).rule_text()


def to_markdown(report: dict[str, Any], command: str) -> str:
    o, neg, lat = report["overall"], report["negatives"], report["latency"]
    lines = [f"# Overlay detector on held-out photos (`{report['detector']}`)", "", f"`{command}`", "",
             f"{report['n_dev']} dev items (1-2 overlays each on crops of photos never used in training) and "
             f"{report['n_negative']} negatives (clean crops and crops with in-scene text); {_rule_text(report['config'])} "
             f"at {report['config']['working_size']} px.", "",
             "| target | value | goal | met |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        if "dB" in t["name"]:
            v, goal = f"{t['value']:.2f}", f"{t['target']:g}"
        elif "ms" in t["name"]:
            v, goal = f"{t['value']:.0f}", f"{t['target']:.0f}"
        elif t["op"] == "<=":
            v, goal = _pct(t["value"], 2), _pct(t["target"])
        else:
            v, goal = f"{t['value']:.3f}", f"{t['target']:g}"
        lines.append(f"| {t['name']} | {v} | {t['op']} {goal} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "| overlays | items | pixel precision | recall | F1 | IoU | recall over all items |",
              "|---|---:|---:|---:|---:|---:|---:|",
              f"| all | {report['n_dev']} | {o['precision']:.3f} | {o['recall']:.3f} | {o['f1']:.3f} | {o['iou']:.3f} | - |"]
    for k, r in report["per_kind"].items():
        lines.append(f"| {k} only | {r['n_items']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{r['iou']:.3f} | {r['recall_all_items']:.3f} |")
    vis = report.get("visible")
    if vis:
        lines += ["", f"Diagnostic, not the bar: the same with the *void* overlay pixels left out (GT-mask pixels the "
                  f"overlay changed by fewer than {vis['invisible_levels']} levels in every channel; no detector can "
                  f"see them). Void share of each kind's GT pixels: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in vis["void_share"].items()) + ".", "",
                  "| overlays | visible precision | recall | F1 |", "|---|---:|---:|---:|"]
        for g in ("all", *KINDS):
            lines.append(f"| {g if g == 'all' else g + ' only'} | {vis[g]['precision']:.3f} | {vis[g]['recall']:.3f} "
                         f"| {vis[g]['f1']:.3f} |")
    lines += ["", f"Median per-item F1 {report['median_item_f1']:.3f}.", "",
              "| negatives | images | mean false-positive area | images with any detection |", "|---|---:|---:|---:|"]
    for g, r in neg.items():
        lines.append(f"| {g.replace('_', '-')} | {r['n']} | {_pct(r['fp_area_mean'], 3)} | {_pct(r['image_rate'])} |")
    d, f = lat["detect_ms"], lat["forward_ms"]
    lines += ["", f"CPU latency at 512 x 512, {lat['threads']} torch thread(s): `detect` median {d['median']:.0f} ms "
              f"(p95 {d['p95']:.0f}, n {d['n']}), network forward alone {f['median']:.0f} ms"
              + (f" (of which the text prior {lat['text_prior_ms']['median']:.0f} ms)." if lat.get("text_prior_ms") else ".")]
    if report.get("e2e"):
        lines += ["", *_e2e_markdown(report["e2e"])]
    return with_environment(lines, report["environment"])


E2E_LABELS = {"gt_mask": "removal with the GT mask", "auto_mask": "removal with the auto mask (detector)",
              "identity": "leave as is"}


def _e2e_markdown(e: dict[str, Any]) -> list[str]:
    st, r = e["settings"], e["removal_ms"]
    when_found = "-" if e["gap_db_when_found"] is None else f"{e['gap_db_when_found']:.2f} dB"
    lines = ["## End to end: removal with the auto mask vs with the GT mask", "",
             f"Every dev item removed by the {st['engine']} engine of bundle `{st['bundle']}` (CPU, {st['dtype']}, "
             f"seed {st['seed']}, the gateway's removal path) with its GT mask and with the detector's mask; PSNR "
             "against the GT photo inside the GT mask. An auto mask that finds nothing leaves the photo unchanged, "
             "so those items score as *leave as is*.", "",
             "| mask | items | PSNR in GT mask, mean (dB) | median (dB) | PSNR whole image, mean (dB) |",
             "|---|---:|---:|---:|---:|"]
    for k, label in E2E_LABELS.items():
        v = e[k]
        lines.append(f"| {label} | {e['n']} | {v['psnr_mask_db_mean']:.2f} | {v['psnr_mask_db_median']:.2f} | "
                     f"{v['psnr_db_mean']:.2f} |")
    lines += ["", f"Gap (GT mask - auto mask): **{e['gap_db']:.2f} dB** (target <= {TARGETS['e2e_gap_db_max']:g} dB); "
              f"the detector found nothing on {_pct(e['nothing_found_rate'])} of the items; over the "
              f"{e['n_found']} items where it found something the gap is {when_found}. One removal with the GT mask: "
              f"median {r['median']:.0f} ms (p95 {r['p95']:.0f}) on {st['threads']} torch thread(s).", "",
              "| item kind | items | GT mask (dB) | auto mask (dB) | leave as is (dB) | gap (dB) | nothing found |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in e["per_kind"].items():
        lines.append(f"| {k} | {v['n']} | {v['gt_mask']['psnr_mask_db_mean']:.2f} | "
                     f"{v['auto_mask']['psnr_mask_db_mean']:.2f} | {v['identity']['psnr_mask_db_mean']:.2f} | "
                     f"{v['gap_db']:.2f} | {_pct(v['nothing_found_rate'])} |")
    return lines


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: pixel precision / recall / F1 per kind (and all), the false-positive area per negative, and
    (with the end-to-end section) each dev item's in-mask PSNR with the auto mask against that with the GT mask."""
    plt = pyplot()
    e2e = [r["e2e"] for r in report["items"] if r.get("e2e")]
    fig, axes = plt.subplots(1, 3 if e2e else 2, figsize=(18 if e2e else 12, 4.8))
    ax, hist = axes[0], axes[1]
    names = ["all", *report["per_kind"]]
    rows = [report["overall"], *report["per_kind"].values()]
    x = np.arange(len(names))
    for j, key in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (j - 1) * 0.27, [r[key] for r in rows], 0.27, label=key)
    ax.axhline(TARGETS["f1_min"], color="k", ls="--", lw=1, label=f"F1 target {TARGETS['f1_min']}")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pixel metric on dev")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"dev: {report['n_dev']} items")
    neg = [r for r in report["items"] if r["set"] == "negative"]
    for group in ("clean", "scene_text"):
        vals = [100 * r["fp_area"] for r in neg if r["group"] == group]
        hist.hist(vals, bins=20, alpha=0.6, label=f"{group} ({len(vals)})")
    hist.axvline(100 * TARGETS["fp_area_max"], color="k", ls="--", lw=1, label="mean FP area target")
    hist.set_xlabel("false-positive area (% of pixels)")
    hist.set_ylabel("images")
    hist.set_yscale("log")
    hist.legend(fontsize=8)
    hist.set_title("negatives")
    if e2e:
        sc = axes[2]
        for empty, label, color in ((False, "auto mask found something", "tab:blue"),
                                    (True, "found nothing (left as is)", "tab:red")):
            pts = [(r["psnr_mask_db"]["gt_mask"], r["psnr_mask_db"]["auto_mask"]) for r in e2e if r["auto_empty"] == empty]
            if pts:
                sc.scatter(*zip(*pts, strict=True), s=10, alpha=0.6, color=color, label=f"{label} ({len(pts)})")
        lo = min(min(r["psnr_mask_db"].values()) for r in e2e)
        hi = max(r["psnr_mask_db"]["gt_mask"] for r in e2e)
        sc.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="equal")
        sc.plot([lo, hi], [lo - TARGETS["e2e_gap_db_max"], hi - TARGETS["e2e_gap_db_max"]], "k--", lw=0.8,
                label="1 dB below")
        s = report["e2e"]
        sc.set_title(f"end to end: mean {s['gt_mask']['psnr_mask_db_mean']:.2f} (GT mask) vs "
                     f"{s['auto_mask']['psnr_mask_db_mean']:.2f} dB (auto), gap {s['gap_db']:.2f} dB")
        sc.set_xlabel("PSNR in GT mask, removal with the GT mask (dB)")
        sc.set_ylabel("... with the auto mask (dB)")
        sc.legend(fontsize=8, loc="upper left")
    return [save_figure(fig, Path(out).with_suffix(".png"))]
