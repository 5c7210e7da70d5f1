"""Several engines' latency in one run (``cleanplate bench latency --engine torch --engine onnxruntime``).

:func:`cleanplate.benchmarks.latency.run_latency` runs once per engine, back to back in the same process
with the same options; :func:`compare` puts the per-engine reports side by side (``reports``, each as
``bench latency`` writes it for one engine) and adds, per case (resolution x batch), each engine's median
ms per image and its ratio to the first engine's (``comparison``). The JSON's ``harness`` is
``latency_compare``, so ``cleanplate bench report`` rebuilds its markdown and plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import latency
from .common import environment, fmt_ms, pyplot, save_figure, with_environment

HARNESS = "latency_compare"


def compare(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One report from per-engine latency reports (same cases, distinct engines; the first is the baseline).

    ``comparison``: a row per case of the first report, ``{resolution, batch, per_image_ms: {engine: ms},
    ratio_to_first: {engine: ms / first engine's ms}}`` (None where an engine lacks the case or a median).

    Raises:
        ValueError: an engine appears twice (the CLI refuses that as exit 2 before anything runs)."""
    engines = [r["engine"] for r in reports]
    if len(set(engines)) != len(engines):
        raise ValueError(f"each engine once, got {engines}")
    by = {r["engine"]: {(c["resolution"], c["batch"]): c for c in r["cases"]} for r in reports}
    first = engines[0]
    rows = []
    for case in reports[0]["cases"]:
        key = (case["resolution"], case["batch"])
        per_image = {e: (by[e][key]["per_image_ms"] if key in by[e] else None) for e in engines}
        base = per_image[first]
        rows.append({"resolution": key[0], "batch": key[1], "per_image_ms": per_image,
                     "ratio_to_first": {e: (v / base if v is not None and base else None)
                                        for e, v in per_image.items()}})
    return {"harness": HARNESS, "engines": engines, "baseline": first,
            "reports": {r["engine"]: r for r in reports}, "comparison": rows,
            "wall_s": sum(r.get("wall_s", 0.0) for r in reports),
            "environment": environment(reports[0]["environment"].get("device"))}


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def to_markdown(report: dict[str, Any], command: str) -> str:
    """The comparison table (median ms per image per engine and each engine's ratio to the first), then each
    engine's own ``bench latency`` report as a section; ``command`` is shown once, at the top."""
    engines, first = report["engines"], report["baseline"]
    s = report["reports"][first]["settings"]
    lines = [f"# Latency: {' vs '.join(engines)}", "", f"`{command}`", "",
             f"The engines ran back to back in one process with the same options ({s['steps']} steps, "
             f"{s['warmup']} warm-up + {s['repeats']} measured repetitions per case). Median ms per image "
             f"(median end-to-end time of a call / batch); *÷ {first}*: an engine's median over {first}'s "
             f"(below 1: faster than {first}).", "",
             "| resolution | batch | " + " | ".join(f"{e} ms/image" for e in engines) + " | "
             + " | ".join(f"{e} ÷ {first}" for e in engines[1:]) + " |",
             "|---:|---:|" + "---:|" * (2 * len(engines) - 1)]
    for row in report["comparison"]:
        lines.append(f"| {row['resolution']} | {row['batch']} | "
                     + " | ".join(fmt_ms(row["per_image_ms"][e]) for e in engines) + " | "
                     + " | ".join(_ratio(row["ratio_to_first"][e]) for e in engines[1:]) + " |")
    for e in engines:
        sub = report["reports"][e]
        title, _, _cmd, *body = latency.markdown_lines(sub, sub.get("command", command))  # the command once
        lines += ["", "#" + title, *body]  # each engine's report as a section
    return with_environment(lines, report["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: median ms per image per case (resolution x batch), a bar per engine, bar to p95."""
    plt = pyplot()
    engines, rows = report["engines"], report["comparison"]
    labels = [f"R{r['resolution']}\nb{r['batch']}" for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * len(engines) + 2), 4.2))
    cmap = plt.get_cmap("tab10")
    for i, e in enumerate(engines):
        cases = {(c["resolution"], c["batch"]): c for c in report["reports"][e]["cases"]}
        vals, err = [], []
        for r in rows:
            c = cases.get((r["resolution"], r["batch"]))
            med = r["per_image_ms"][e] or 0.0
            p95 = c["total_ms"]["p95"] / c["batch"] if c and c["total_ms"]["p95"] is not None else med
            vals.append(med)
            err.append(max(0.0, p95 - med))
        ax.bar(x + (i - (len(engines) - 1) / 2) * width, vals, width, yerr=[[0] * len(vals), err], capsize=3,
               label=e, color=cmap(i % 10))
    ax.set_xticks(x, labels)
    ax.set(ylabel="ms per image, median (bar to p95)", title="latency per engine")
    vals = [v for r in rows for v in r["per_image_ms"].values() if v]
    if vals and max(vals) / min(vals) > 20:
        ax.set_yscale("log")
    ax.legend()
    return [save_figure(fig, out.with_suffix(".png"))]
