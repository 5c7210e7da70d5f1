"""Batch cleaning throughput: images/s vs ``--concurrency``, in-process and through the gateway.

The catalog is a RORem ``meta.json`` of ``--n`` held-out dev photos (scikit-image's astronaut, rocket and
stereo motorcycle, 512x512 PNG) with synthetic promo overlays and their masks (``cleanplate data synth
--dev``). For each concurrency level the whole catalog is cleaned into a fresh folder with
:func:`cleanplate.batch.run_batch`:

* ``in-process``: the torch engine in this process (default bundle unless ``--bundle``), built from the
  same settings ``cleanplate batch run`` uses;
* ``gateway``: ``cleanplate serve`` started on 127.0.0.1 as a child process (same bundle and torch
  threads), driven by the batch job's gateway client; stopped at the end.

Both use the quality gate with one attempt per image (one removal + one discriminator score), so every
image costs the same. Throughput is images / (last item's end - first item's start), read from the
report, so model loading and process start-up are not counted. Writes
``benchmarks/results/batch_throughput.{json,md}``.

Usage::

    OMP_NUM_THREADS=1 python -m cleanplate.benchmarks.batch_throughput --n 32 --concurrency 1 2 4 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


def make_catalog(folder: Path, n: int, seed: int = 2024) -> Path:
    """``n`` dev photos with promo overlays (512x512 PNG) and masks; returns the meta.json path."""
    from cleanplate.training.synth import DEV_PHOTOS, SynthConfig, synth_dataset

    return synth_dataset(folder, n, seed=seed, cfg=SynthConfig(size=512, photos=DEV_PHOTOS, photo_fraction=1.0),
                         progress=False)


def measure(report: Path) -> dict[str, Any]:
    """Throughput and latency of one run from its report (each line: end time and total ms)."""
    from cleanplate.batch import read_report

    records, _ = read_report(report)
    ok = [r for r in records if r["status"] == "ok"]
    ends = np.array([datetime.fromisoformat(r["time"]).timestamp() for r in ok])
    totals = np.array([r["timings_ms"]["total"] for r in ok])
    span = float(ends.max() - (ends - totals / 1000).min()) if ok else float("nan")
    model = [r["timings_ms"].get("model", r["timings_ms"].get("server_model", 0.0)) for r in ok]
    return {"images": len(records), "ok": len(ok), "errors": len(records) - len(ok), "span_s": span,
            "images_per_s": len(ok) / span if ok else 0.0,
            "item_ms": {"p50": float(np.percentile(totals, 50)), "p95": float(np.percentile(totals, 95))},
            "model_ms_p50": float(np.percentile(model, 50)),
            "passed": sum(1 for r in ok if r["passed"])}


async def one_run(items: list, backend: Any, out: Path, concurrency: int, max_attempts: int) -> dict[str, Any]:
    from cleanplate.batch import ItemOptions, run_batch

    t0 = time.perf_counter()
    result = await run_batch(items, backend, out, concurrency=concurrency,
                             defaults=ItemOptions(seed=0, quality_gate=True, max_attempts=max_attempts))
    stats = measure(out / "report.jsonl")
    stats.update(concurrency=concurrency, wall_s_with_startup=time.perf_counter() - t0, exit_code=result.exit_code)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="images in the catalog")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", choices=["in-process", "gateway"], default=["in-process", "gateway"])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--max-attempts", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_throughput")
    args = parser.parse_args(argv)

    from cleanplate.batch import GatewayBackend, InProcessBackend, load_items
    from cleanplate.benchmarks.load import start_server
    from cleanplate.engines import make_engine
    from cleanplate.serving.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="cleanplate-batch-bench-"))
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    proc = url = None
    try:
        meta = make_catalog(work / "catalog", args.n)
        items = load_items(meta)
        if "gateway" in args.modes:
            proc, url = start_server({"CLEANPLATE_TORCH_THREADS": str(args.torch_threads)}, args.bundle)
        # Modes alternate at each level, so load from other work on the machine hits both alike.
        for c in args.concurrency:
            for mode in args.modes:
                if mode == "gateway":
                    backend: Any = GatewayBackend(url, concurrency=c)
                else:
                    settings = load_settings(bundle=args.bundle, torch_threads=args.torch_threads,
                                             max_queue=max(64, 2 * c))
                    backend = InProcessBackend(make_engine(settings))
                stats = asyncio.run(one_run(items, backend, work / f"{mode}-{c}", c, args.max_attempts))
                stats["mode"] = mode
                runs.append(stats)
                print(json.dumps({k: stats[k] for k in ("mode", "concurrency", "ok", "errors", "images_per_s",
                                                        "item_ms")}), flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        shutil.rmtree(work, ignore_errors=True)
    runs.sort(key=lambda r: (args.modes.index(r["mode"]), r["concurrency"]))

    import torch

    report = {
        "command": (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '<unset>')} python -m "
                    f"cleanplate.benchmarks.batch_throughput {' '.join(argv or sys.argv[1:])}"),
        "environment": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                        "torch": torch.__version__, "torch_threads": args.torch_threads,
                        "bundle": args.bundle or "default", "images": args.n,
                        "image": "512x512 PNG, synthetic promo overlay on a dev photo",
                        "gate": f"on, max_attempts {args.max_attempts}",
                        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 1 if any(r["errors"] or r["ok"] != args.n for r in runs) else 0


def to_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Batch cleaning throughput",
        "",
        f"`{report['command']}`  ",
        (f"{env['cpus']} CPUs ({env['machine']}), torch {env['torch']} with {env['torch_threads']} intra-op "
         f"thread(s), bundle `{env['bundle']}`; catalog: {env['images']} images ({env['image']}); quality gate "
         f"{env['gate']}. Machine load average (1 min) before/after: {env['loadavg_1m_before_after']} (the "
         f"machine is shared; other work running at the same time lowers these figures)."),
        "",
        "| engine | concurrency | images/s | item p50 ms | item p95 ms | model p50 ms | ok | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['item_ms']['p50']:.0f} | "
                     f"{r['item_ms']['p95']:.0f} | {r['model_ms_p50']:.0f} | {r['ok']} | {r['errors']} |")
    lines += ["", ("images/s = images / (last item's end - first item's start), from the report: model loading "
                   "and start-up are not counted. Item time is one item's wall time in the job (decode, wait for "
                   "the engine, removal, gate, encode, write); it grows with concurrency once the engine is the "
                   "bottleneck, since items queue for it. Model time includes the wait in the engine's micro-batch "
                   "queue and the whole batch's run, so it grows too. Reproduce with the command above.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
