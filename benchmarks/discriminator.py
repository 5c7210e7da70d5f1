"""How the bundle's quality gate judges: its calibration, and its verdicts on real removals.

1. Calibration, from ``discriminator/config.json`` (made by ``cleanplate train discriminator``): the
   threshold, precision/recall/ROC AUC on the held-out labelled split, the pass rate per label kind.
2. Verdicts on the held-out dev set (``meta.json`` with source, mask, GT): the gate's pass rate and mean
   score for the GT itself, the source left as it is, OpenCV Telea, and the bundle's own 4-step removal.
   Scores are taken as the gateway takes them (the removal's context window, dilated mask).

Writes ``discriminator.json`` and ``discriminator.md`` under ``--out``.

Usage::

    python -m cleanplate.benchmarks.discriminator --bundle cleanplate/default_bundle --set runs/data/dev/meta.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cleanplate import imaging
from cleanplate.bundle import default_bundle_path
from cleanplate.imaging import DecodedImage
from cleanplate.pipeline import RemovalPipeline
from cleanplate.remover import ScoreRequest, remove, score_batch
from cleanplate.training.common import read_meta

from .default_bundle import telea


def _as_image(rgb: np.ndarray) -> DecodedImage:
    return DecodedImage(rgb, None, "RGB", "PNG", None, None)


def verdicts(pipe: RemovalPipeline, meta: Path, limit: int | None) -> dict[str, dict[str, float]]:
    """Per method: mean score and pass rate (score >= the bundle threshold) over the set."""
    items = read_meta([meta])[:limit]
    scores: dict[str, list[float]] = {"GT": [], "source (nothing removed)": [], "OpenCV Telea": [],
                                      "cleanplate 4 steps": []}
    for i, item in enumerate(tqdm(items, desc="gate verdicts", mininterval=5)):
        source = imaging.decode_image(item.source)
        gt = imaging.decode_image(item.gt).rgb
        mask = imaging.decode_mask(item.mask)
        dilated = imaging.dilate_mask(mask, pipe.config.dilate_px)
        results = {
            "GT": gt,
            "source (nothing removed)": source.rgb,
            "OpenCV Telea": telea(source.rgb, dilated),
            "cleanplate 4 steps": remove(pipe, source, mask, seed=i).pixels,
        }
        values = score_batch(pipe, [ScoreRequest(source, _as_image(r), mask) for r in results.values()])
        for name, value in zip(results, values, strict=True):
            scores[name].append(value)
    threshold = pipe.threshold
    return {name: {"mean_score": float(np.mean(v)), "pass_rate": float(np.mean(np.asarray(v) >= threshold)),
                   "n": len(v)} for name, v in scores.items()}


def to_markdown(report: dict) -> str:
    cal = report["calibration"]
    lines = ["# Quality gate (discriminator)", "", f"`{report['command']}`", "",
             f"Bundle `{report['bundle']}`: threshold **{cal['threshold']:.4f}** ({cal['rule']}).", "",
             "## Calibration on the held-out labelled split", "",
             "| | threshold | precision | recall | F1 | accuracy | pass rate |", "|---|---|---|---|---|---|---|"]
    for name, row in (("chosen", cal), ("at 0.5", cal["at_0.5"])):
        lines.append(f"| {name} | {row['threshold']:.4f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                     f"{row['f1']:.3f} | {row['accuracy']:.3f} | {row['pass_rate']:.3f} |")
    lines += ["", f"ROC AUC {cal['roc_auc']:.3f}; {cal['n_pos']} good and {cal['n_neg']} bad held-out candidates; "
              f"trained {cal['steps']} steps on {cal['train_items']} labelled items.", "",
              "Pass rate by synthetic label kind (held-out):", "", "| kind | label | pass rate |", "|---|---|---|"]
    good = {"gt", "gt_jpeg", "gt_noise"}
    for kind, rate in cal.get("pass_rate_by_kind", {}).items():
        lines.append(f"| {kind} | {'good' if kind in good else 'bad'} | {rate:.3f} |")
    if report.get("verdicts"):
        lines += ["", f"## Verdicts on {report['set']} (held-out photos)", "",
                  "| result judged | mean score | pass rate |", "|---|---|---|"]
        for name, row in report["verdicts"].items():
            lines.append(f"| {name} | {row['mean_score']:.3f} | {row['pass_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=default_bundle_path())
    parser.add_argument("--set", type=Path, default=None, help="dev meta.json (source, mask, GT) for verdicts")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    config = json.loads((args.bundle / "discriminator" / "config.json").read_text())
    pipe = RemovalPipeline.from_bundle(args.bundle)
    report = {"command": "python -m cleanplate.benchmarks.discriminator " + " ".join(argv or __import__("sys").argv[1:]),
              "bundle": str(args.bundle), "set": str(args.set),
              "calibration": {k: v for k, v in config["calibration"].items() if k != "config"},
              "verdicts": verdicts(pipe, args.set, args.limit) if args.set else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "discriminator.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "discriminator.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
