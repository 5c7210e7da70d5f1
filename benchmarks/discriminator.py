"""``cleanplate bench gate HELDOUT_META``: how well the bundle's quality gate judges held-out removals.

Input: a labelled meta.json as ``cleanplate data disc-labels --bundle B`` writes it for photos the gate
never trained on (``source``, ``mask``, ``GT`` = the candidate judged, ``score`` 1/0, ``label_kind``,
``psnr_mask_db``, ``ssim_mask``; :mod:`cleanplate.training.disc_labels`). Every candidate is scored as the
gateway scores a removal (:func:`cleanplate.remover.score_batch`: the bundle's dilation and context
window, the bundle's discriminator) and passes when ``score >=`` the bundle's calibrated threshold.

The report (``OUT.json``, ``OUT.md``, ``OUT.png``; ``cleanplate bench report OUT.json`` rebuilds the last
two from the first):

* ROC AUC of the score against the label over all candidates (Mann-Whitney; ties count half), and
  precision / recall / F1 / accuracy at the threshold;
* per ``label_kind`` (``gt``, ``source``, ``telea``, ``removal``, each synthetic kind): candidates, good
  labels, mean score, pass rate;
* across the ``removal`` candidates (the bundle's own removals): Spearman's rank correlation of the score
  with in-mask PSNR (and with in-mask SSIM), ``scipy.stats.spearmanr``;
* the quality-gate targets: ROC AUC >= 0.95, GT pass >= 90%, source pass <= 2%, removal Spearman with
  PSNR >= 0.6, each with its value and met / not met;
* the calibration stored in the bundle (``discriminator/config.json``: rule, interval, held-out rates);
* per item (kind, label, score, metrics), for re-plotting; the environment.

The plot: score against in-mask PSNR per candidate, coloured by kind, with the threshold (PSNR above 60
dB, i.e. the GT's 100, is drawn at 60), and the ROC curve.

This replaces the earlier ``python -m cleanplate.benchmarks.discriminator --set DEV``, whose verdicts on
GT, source, Telea and the bundle's removal are now the ``gt``, ``source``, ``telea`` and ``removal`` rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cleanplate.errors import ErrorCode, InputError

from .common import environment, pyplot, save_figure, with_environment

TARGETS = {"roc_auc_min": 0.95, "gt_pass_min": 0.90, "source_pass_max": 0.02, "removal_spearman_psnr_min": 0.6}
PLOT_PSNR_CAP = 60.0
# kinds in report order: the anchors, the metric-labelled real candidates, then the synthetic ones
KIND_ORDER = ("gt", "source", "telea", "removal", "remover", "gt_jpeg", "gt_noise", "partial", "blur", "smear",
              "redrawn")
KIND_COLORS = {"gt": "tab:blue", "source": "tab:red", "telea": "tab:purple", "removal": "tab:orange",
               "remover": "tab:brown", "gt_jpeg": "tab:cyan", "gt_noise": "tab:olive", "partial": "tab:pink",
               "blur": "tab:gray", "smear": "tab:green", "redrawn": "black"}
Say = Callable[[str], None]


def _read(meta: Path, limit: int | None) -> list[dict[str, Any]]:
    """The labelled entries, with absolute paths; raises InputError for a missing/unlabelled file."""
    if not meta.is_file():
        raise InputError(f"no labelled meta.json at {meta} (make one with `cleanplate data disc-labels --bundle`)",
                         code=ErrorCode.BAD_OPTION)
    try:
        entries = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {meta}: {exc}", code=ErrorCode.BAD_OPTION) from exc
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{meta}: expected a non-empty JSON list", code=ErrorCode.BAD_OPTION)
    out = []
    for i, e in enumerate(entries[:limit]):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("source", "mask", "GT")) \
                or e.get("score") is None:
            raise InputError(f"{meta} entry {i}: needs source, mask, GT and a score (0/1)", code=ErrorCode.BAD_OPTION)
        out.append({**e, **{k: meta.parent / e[k] for k in ("source", "mask", "GT")}})
    return out


def run_gate(meta: str | Path, *, bundle: str | Path | None = None, device: str = "cpu", dtype: str = "fp32",
             limit: int | None = None, threads: int | None = None, batch_size: int = 8,
             say: Say = lambda m: None) -> dict[str, Any]:
    """Score every labelled candidate of ``meta`` with ``bundle``'s gate and build the report (module docstring).

    Raises:
        InputError: no/unreadable meta.json, an entry without score, limit < 1, only one label among the
            candidates, a bundle without a discriminator.
    """
    import torch

    from cleanplate import imaging
    from cleanplate.bundle import default_bundle_path, read_config
    from cleanplate.pipeline import RemovalPipeline
    from cleanplate.remover import ScoreRequest, score_batch
    from cleanplate.training.discriminator import pass_rates_by_kind, roc_auc, spearman

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}", code=ErrorCode.BAD_OPTION)
    entries = _read(Path(meta), limit)
    labels = np.asarray([float(e["score"]) > 0.5 for e in entries])
    if labels.all() or not labels.any():
        raise InputError(f"{meta}: the gate needs good and bad candidates; all {len(labels)} are "
                         f"{'good' if labels.all() else 'bad'}", code=ErrorCode.BAD_OPTION)
    root = Path(bundle) if bundle is not None else default_bundle_path()
    if not read_config(root).discriminator:
        raise InputError(f"bundle {root} has no discriminator, so there is no gate to measure",
                         code=ErrorCode.NO_DISCRIMINATOR)
    if threads:
        torch.set_num_threads(threads)
    pipe = RemovalPipeline.from_bundle(root, device=device, dtype=dtype)
    threshold = float(pipe.threshold)
    scores: list[float] = []
    cache: dict[tuple[Path, Path], tuple[Any, np.ndarray]] = {}
    for start in range(0, len(entries), batch_size):
        requests = []
        for e in entries[start:start + batch_size]:
            key = (e["source"], e["mask"])
            if key not in cache:
                cache.clear()  # candidates of one item are consecutive: keep one item's source and mask
                cache[key] = (imaging.decode_image(e["source"]), imaging.decode_mask(e["mask"]))
            source, mask = cache[key]
            requests.append(ScoreRequest(source, imaging.decode_image(e["GT"]), mask))
        scores.extend(score_batch(pipe, requests, max_batch=batch_size))
        if (start // batch_size) % 25 == 24 or start + batch_size >= len(entries):
            say(f"scored {min(start + batch_size, len(entries))}/{len(entries)}")
    s = np.asarray(scores)
    kinds = [str(e.get("label_kind")) for e in entries]
    passed = s >= threshold
    tp = int((passed & labels).sum())
    summary = {"roc_auc": roc_auc(s, labels), "precision": tp / max(1, int(passed.sum())), "recall": tp / int(labels.sum()),
               "accuracy": float((passed == labels).mean()), "pass_rate": float(passed.mean()),
               "n_pos": int(labels.sum()), "n_neg": int((~labels).sum())}
    summary["f1"] = 2 * summary["precision"] * summary["recall"] / max(1e-12, summary["precision"] + summary["recall"])
    rates = pass_rates_by_kind(s, kinds, threshold)
    by_kind = {}
    for kind in sorted(set(kinds), key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        psnrs = [entries[i]["psnr_mask_db"] for i in idx if entries[i].get("psnr_mask_db") is not None]
        by_kind[kind] = {"n": len(idx), "good": int(labels[idx].sum()), "mean_score": float(s[idx].mean()),
                         "pass_rate": rates[kind], "psnr_mask_db_median": float(np.median(psnrs)) if psnrs else None}
    removal = [i for i, k in enumerate(kinds) if k == "removal" and entries[i].get("psnr_mask_db") is not None
               and entries[i].get("ssim_mask") is not None]
    spear = {"n": len(removal),
             "psnr": spearman(s[removal], [entries[i]["psnr_mask_db"] for i in removal]) if removal else None,
             "ssim": spearman(s[removal], [entries[i]["ssim_mask"] for i in removal]) if removal else None}
    config = json.loads((root / "discriminator" / "config.json").read_text())
    report = {
        "harness": "gate", "meta": str(meta), "n": len(entries), "bundle": str(root.resolve()),
        "threshold": threshold, "labels": _label_options(Path(meta)),
        "settings": {"device": device, "dtype": dtype, "limit": limit, "threads": threads},
        "summary": summary, "by_kind": by_kind, "removal_spearman": spear,
        "targets": _targets(summary, by_kind, spear),
        "calibration": {k: v for k, v in (config.get("calibration") or {}).items() if k != "config"},
        "items": [{"item": e.get("item"), "label_kind": k, "label": int(lab), "score": float(v),
                   "psnr_mask_db": e.get("psnr_mask_db"), "ssim_mask": e.get("ssim_mask")}
                  for e, k, lab, v in zip(entries, kinds, labels, s, strict=True)],
        "environment": environment(pipe.device),
    }
    return report


def _label_options(meta: Path) -> dict[str, Any] | None:
    """How the labels were made: the options line of ``disc-labels``' journal next to the meta.json, if any."""
    from cleanplate.training.disc_labels import JOURNAL

    try:
        with open(meta.parent / JOURNAL) as f:
            return json.loads(f.readline()).get("options")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _targets(summary: dict[str, Any], by_kind: dict[str, Any], spear: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [("ROC AUC, all candidates", summary["roc_auc"], ">=", TARGETS["roc_auc_min"]),
            ("GT pass rate", by_kind.get("gt", {}).get("pass_rate"), ">=", TARGETS["gt_pass_min"]),
            ("source pass rate", by_kind.get("source", {}).get("pass_rate"), "<=", TARGETS["source_pass_max"]),
            ("Spearman(score, in-mask PSNR), removals", spear["psnr"], ">=", TARGETS["removal_spearman_psnr_min"])]
    return [{"name": n, "value": v, "op": op, "target": t,
             "met": None if v is None else bool(v >= t if op == ">=" else v <= t)} for n, v, op, t in rows]


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _labels_line(lab: dict[str, Any] | None) -> list[str]:
    """How the labels were made (the disc-labels journal's options), as a paragraph; [] when unknown."""
    if not lab:
        return []
    made = (f"Labels: `cleanplate data disc-labels` on {', '.join(f'`{m}`' for m in lab.get('meta', []))}, seed "
            f"{lab.get('seed')}, {lab.get('per_item')} synthetic per item")
    if lab.get("bundle"):
        made += (f", {lab.get('removals_per_item')} removals per item by `{lab['bundle']['path']}`, good when PSNR >= "
                 f"{lab.get('psnr_good')} dB, SSIM >= {lab.get('ssim_good')} and cast <= {lab.get('max_cast')}"
                 f"{'' if lab.get('balance') else ', not balanced'}")
    return [made + ".", ""]


def _calibration_lines(cal: dict[str, Any]) -> list[str]:
    """The calibration stored in the bundle's ``discriminator/config.json``, as a paragraph; [] when absent."""
    if cal.get("threshold") is None:
        return []
    where = ("" if cal.get("gt_pass_rate") is None else
             f", GT pass {100 * cal['gt_pass_rate']:.1f}%, source pass {100 * cal['source_pass_rate']:.1f}%")
    return ["", f"Calibration stored in the bundle: threshold {cal['threshold']:.4f} ({cal.get('rule', '?')}) on "
            f"{cal.get('n_pos', '?')} good + {cal.get('n_neg', '?')} bad calibration candidates{where}, ROC AUC "
            f"{_f(cal.get('roc_auc'))}; trained {cal.get('steps', '?')} steps on {cal.get('train_items', '?')} "
            "labelled items."]


def to_markdown(report: dict[str, Any], command: str) -> str:
    s, sp, cal = report["summary"], report["removal_spearman"], report.get("calibration") or {}
    lines = [f"# Quality gate on `{report['meta']}`", "", f"`{command}`", "",
             f"{report['n']} held-out labelled candidates ({s['n_pos']} good, {s['n_neg']} bad); bundle "
             f"`{report['bundle']}`, threshold **{report['threshold']:.4f}**"
             + (f" ({cal['rule']})" if cal.get("rule") else "") + "; scored as the gateway scores.", "",
             *_labels_line(report.get("labels")),
             "| target | value | goal | met |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {_f(t['value'])} | {t['op']} {t['target']:g} | {met} |")
    lines += ["", "| kind | candidates | good (label) | mean score | pass rate | median PSNR in mask (dB) |",
              "|---|---:|---:|---:|---:|---:|"]
    for kind, row in report["by_kind"].items():
        lines.append(f"| {kind} | {row['n']} | {row['good']} | {row['mean_score']:.3f} | {100 * row['pass_rate']:.1f}% "
                     f"| {_f(row['psnr_mask_db_median'], '.1f')} |")
    lines += ["", f"At the threshold: precision {s['precision']:.3f}, recall {s['recall']:.3f}, F1 {s['f1']:.3f}, "
              f"accuracy {s['accuracy']:.3f}, pass rate {s['pass_rate']:.3f}; ROC AUC {s['roc_auc']:.3f}. Across "
              f"the bundle's {sp['n']} removals, Spearman's rho of the score with in-mask PSNR {_f(sp['psnr'])}, "
              f"with in-mask SSIM {_f(sp['ssim'])}."]
    lines += _calibration_lines(cal)
    return with_environment(lines, report["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: score vs in-mask PSNR per candidate coloured by kind (threshold line), and the ROC curve."""
    items, kinds = report["items"], list(report["by_kind"])
    colors = {k: KIND_COLORS.get(k, "tab:brown") for k in kinds}
    fig, (ax, roc) = pyplot().subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    for kind in kinds:
        rows = [r for r in items if r["label_kind"] == kind and r["psnr_mask_db"] is not None]
        if not rows:
            continue
        x = np.minimum([r["psnr_mask_db"] for r in rows], PLOT_PSNR_CAP)
        y = [r["score"] for r in rows]
        marker = "o" if kind in ("removal", "telea", "gt", "source") else "."
        ax.scatter(x, y, s=18 if marker == "o" else 10, color=colors[kind], marker=marker, alpha=0.75,
                   label=f"{kind} ({len(rows)})")
    ax.axhline(report["threshold"], color="k", ls="--", lw=1, label=f"threshold {report['threshold']:.3f}")
    ax.set_xlabel(f"PSNR in mask vs GT (dB; >= {PLOT_PSNR_CAP:.0f} drawn at {PLOT_PSNR_CAP:.0f})")
    ax.set_ylabel("gate score")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    rho = report["removal_spearman"]["psnr"]
    ax.set_title(f"score vs in-mask PSNR (removals: Spearman {_f(rho, '.2f')})")
    s = np.asarray([r["score"] for r in items])
    lab = np.asarray([r["label"] for r in items]) > 0
    thresholds = np.r_[np.inf, np.unique(s)[::-1]]
    tpr = [float((s[lab] >= t).mean()) for t in thresholds]
    fpr = [float((s[~lab] >= t).mean()) for t in thresholds]
    roc.plot(fpr, tpr, color="C0")
    roc.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    at = s >= report["threshold"]
    roc.scatter([float(at[~lab].mean())], [float(at[lab].mean())], color="k", zorder=3, label="threshold")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.set_title(f"ROC (AUC {report['summary']['roc_auc']:.3f})")
    roc.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"quality gate on {Path(report['meta']).parent.name} ({report['n']} candidates)")
    return [save_figure(fig, Path(out).with_suffix(".png"))]
