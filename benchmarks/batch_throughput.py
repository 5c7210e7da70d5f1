"""Batch cleaning throughput (``cleanplate bench batch``): images/s against ``--concurrency``, in process and
through the gateway.

The catalog is a RORem ``meta.json`` of ``images`` held-out dev photos (scikit-image's astronaut, rocket and
stereo motorcycle, ``size`` x ``size`` PNG) with synthetic promo overlays and their masks (as ``cleanplate
data synth --dev`` makes them). For each concurrency level the whole catalog is cleaned into a fresh folder
with :func:`cleanplate.batch.run_batch`, the code behind ``cleanplate batch run``:

* ``in-process``: the torch engine in this process (the default bundle unless ``bundle``), built from the
  same settings ``cleanplate batch run`` uses;
* ``gateway``: ``cleanplate serve`` started on 127.0.0.1 as a child process (same bundle and torch
  threads), driven by the batch job's gateway client; stopped at the end.

Both use the quality gate with ``max_attempts`` attempts per image (by default one removal and one
discriminator score), so every image costs the same. Modes alternate at each level, so load from other work
on the machine hits both alike. Throughput is images / (last item's end - first item's start), read from the
job's report, so model loading and process start-up are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cleanplate.errors import ErrorCode, InputError

from .common import environment, fmt_ms, pyplot, save_figure, with_environment

MODES = ("in-process", "gateway")
Say = Callable[[str], None]


def make_catalog(folder: Path, n: int, *, size: int = 512, seed: int = 2024) -> Path:
    """``n`` dev photos (``size`` x ``size`` PNG) with promo overlays, and their masks; returns the meta.json."""
    from cleanplate.training.synth import DEV_PHOTOS, SynthConfig, synth_dataset

    return synth_dataset(folder, n, seed=seed, cfg=SynthConfig(size=size, photos=DEV_PHOTOS, photo_fraction=1.0),
                         progress=False)


def measure(report: Path) -> dict[str, Any]:
    """Counts, throughput (images/s over the span of the ok items) and item / model time percentiles (ms,
    None without ok items) of one run, from its ``report.jsonl`` (each line: end time and total ms)."""
    from cleanplate.batch import read_records

    records, _ = read_records(report)
    ok = [r for r in records if r.ok]
    if not ok:
        return {"images": len(records), "ok": 0, "errors": len(records), "span_s": None, "images_per_s": 0.0,
                "item_ms": {"p50": None, "p95": None}, "model_ms_p50": None, "passed": 0}
    ends = np.array([datetime.fromisoformat(r.time).timestamp() for r in ok])
    totals = np.array([r.timings_ms["total"] for r in ok])
    span = float(ends.max() - (ends - totals / 1000).min())
    model = [r.timings_ms.get("model", r.timings_ms.get("server_model", 0.0)) for r in ok]
    return {"images": len(records), "ok": len(ok), "errors": len(records) - len(ok), "span_s": span,
            "images_per_s": len(ok) / span,
            "item_ms": {"p50": float(np.percentile(totals, 50)), "p95": float(np.percentile(totals, 95))},
            "model_ms_p50": float(np.percentile(model, 50)), "passed": sum(1 for r in ok if r.passed)}


async def _one_run(items: list, backend: Any, out: Path, concurrency: int, max_attempts: int) -> dict[str, Any]:
    from cleanplate.batch import ItemOptions, run_batch

    t0 = time.perf_counter()
    result = await run_batch(items, backend, out, concurrency=concurrency,
                             defaults=ItemOptions(seed=0, quality_gate=True, max_attempts=max_attempts))
    stats = measure(out / "report.jsonl")
    stats.update(concurrency=concurrency, wall_s_with_startup=time.perf_counter() - t0, exit_code=result.exit_code)
    return stats


def run_batch_throughput(*, images: int = 32, concurrency: Sequence[int] = (1, 2, 4, 8),
                         modes: Sequence[str] = MODES, bundle: str | None = None, threads: int = 1,
                         max_attempts: int = 1, size: int = 512, say: Say = lambda m: None) -> dict[str, Any]:
    """Clean the catalog once per mode and concurrency level; return the report (runs ordered by mode, then
    concurrency; each with the counts and times of :func:`measure`).

    Raises:
        InputError: fewer than 1 image, a level < 1, an unknown or repeated mode, ``max_attempts`` < 1.
    """
    from cleanplate.batch import GatewayBackend, InProcessBackend, load_items
    from cleanplate.engines import make_engine
    from cleanplate.serving.settings import load_settings

    from .load import local_gateway

    if images < 1 or not concurrency or any(c < 1 for c in concurrency) or max_attempts < 1:
        raise InputError("need --images >= 1, concurrency levels >= 1 and --max-attempts >= 1",
                         code=ErrorCode.BAD_OPTION)
    if not modes or len(set(modes)) != len(modes) or set(modes) - set(MODES):
        raise InputError(f"modes must be distinct, from {MODES}; got {list(modes)}", code=ErrorCode.BAD_OPTION)
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cleanplate-batch-bench-",
                                                                    ignore_cleanup_errors=True)))
        say(f"making a catalog of {images} {size}x{size} photos")
        items = load_items(make_catalog(work / "catalog", images, size=size))
        if "gateway" in modes:
            say("starting a local gateway")
            _, url = stack.enter_context(local_gateway({"CLEANPLATE_TORCH_THREADS": str(threads)}, bundle))
        for c in concurrency:
            for mode in modes:
                if mode == "gateway":
                    backend: Any = GatewayBackend(url, concurrency=c)
                else:
                    settings = load_settings(bundle=bundle, torch_threads=threads, max_queue=max(64, 2 * c))
                    backend = InProcessBackend(make_engine(settings))
                stats = asyncio.run(_one_run(items, backend, work / f"{mode}-{c}", c, max_attempts))
                stats["mode"] = mode
                runs.append(stats)
                say(f"{mode}, concurrency {c}: {stats['ok']} ok, {stats['errors']} errors, "
                    f"{stats['images_per_s']:.2f} images/s, item p50 {fmt_ms(stats['item_ms']['p50'])} ms")
    runs.sort(key=lambda r: (list(modes).index(r["mode"]), r["concurrency"]))
    return {"harness": "batch", "settings": {
                "images": images, "image": f"{size}x{size} PNG, synthetic promo overlay on a dev photo",
                "bundle": bundle or "default", "torch_threads": threads, "gate": f"on, max_attempts {max_attempts}"},
            "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "runs": runs, "wall_s": time.perf_counter() - t_start, "environment": environment()}


def failed(report: dict[str, Any]) -> bool:
    """Whether any run left an item undone or in error."""
    return any(r["errors"] or r["ok"] != report["settings"]["images"] for r in report["runs"])


def to_markdown(report: dict[str, Any], command: str) -> str:
    s = report["settings"]
    lines = [
        "# Batch cleaning throughput", "", f"`{command}`", "",
        (f"Bundle `{s['bundle']}`, {s['torch_threads']} torch thread(s); catalog: {s['images']} images ({s['image']}); "
         f"quality gate {s['gate']}. Machine load average (1 min) before/after: {report['loadavg_1m_before_after']} "
         "(on a shared machine, other work running at the same time lowers these figures)."),
        "",
        "| engine | concurrency | images/s | item p50 ms | item p95 ms | model p50 ms | ok | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['images_per_s']:.2f} | {fmt_ms(r['item_ms']['p50'])} | "
                     f"{fmt_ms(r['item_ms']['p95'])} | {fmt_ms(r['model_ms_p50'])} | {r['ok']} | {r['errors']} |")
    lines += ["", ("images/s = images / (last item's end - first item's start), from the report: model loading "
                   "and start-up are not counted. Item time is one item's wall time in the job (decode, wait for "
                   "the engine, removal, gate, encode, write); it grows with concurrency once the engine is the "
                   "bottleneck, since items queue for it. Model time includes the wait in the engine's micro-batch "
                   "queue and the whole batch's run, so it grows too.")]
    return with_environment(lines, report["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: images/s and item p50 latency against concurrency, a line per mode."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r["mode"] for r in report["runs"]):
        runs = [r for r in report["runs"] if r["mode"] == mode]
        xs = [r["concurrency"] for r in runs]
        a.plot(xs, [r["images_per_s"] for r in runs], marker="o", label=mode)
        b.plot(xs, [np.nan if r["item_ms"]["p50"] is None else r["item_ms"]["p50"] for r in runs], marker="o",
               label=mode)
    a.set(xlabel="concurrency (items in flight)", ylabel="images/s", title="batch throughput")
    b.set(xlabel="concurrency (items in flight)", ylabel="item time, median (ms)", title="time per item")
    for ax in (a, b):
        ax.set_ylim(bottom=0)
        ax.legend()
    return [save_figure(fig, out.with_suffix(".png"))]
