"""Batch cleaning throughput (``cleanplate bench batch``): images/s against ``--concurrency``, in process,
through the gateway and on a Ray cluster.

The catalog is a RORem ``meta.json`` of ``images`` held-out dev photos (scikit-image's astronaut, rocket and
stereo motorcycle, ``size`` x ``size`` PNG) with synthetic promo overlays and their masks (as ``cleanplate
data synth --dev`` makes them). For each concurrency level the whole catalog is cleaned into a fresh folder
with :func:`cleanplate.batch.run_batch`, the code behind ``cleanplate batch run``:

* ``in-process``: the torch engine in this process (the default bundle unless ``bundle``), built from the
  same settings ``cleanplate batch run`` uses;
* ``gateway``: ``cleanplate serve`` started on 127.0.0.1 as a child process (same bundle and torch
  threads), driven by the batch job's gateway client; stopped at the end;
* ``ray``: :func:`cleanplate.batch.ray_runner.run_batch_ray`, the code behind ``batch run --ray``, on a
  one-machine Ray cluster started once for the benchmark, with ``ray_workers`` model actors (same engine
  options, one engine each) and the concurrency level as the actor's batch size, so at one worker the Ray
  runner and the in-process runner hold the same number of items in one engine: their ratio is the cost
  of the Ray Data pipeline (tasks, object store, pickled rows, actor calls).

Both use the quality gate with ``max_attempts`` attempts per image (by default one removal and one
discriminator score), so every image costs the same. Modes alternate at each level, so load from other work
on the machine hits both alike. Throughput is images / (last item's end - first item's start), read from the
job's report, so model loading and process start-up are not counted. The Ray runner starts its actors (and
loads their models) while the first items are decoded, so the steady rate is reported too: the slope of
completions over time after the first quarter of the items, which leaves start-up and the pipeline's fill
out for every mode alike. Each run also keeps the median time of each stage of its report lines; the
markdown turns them into a scaling estimate for N GPU workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

MODES = ("in-process", "gateway", "ray")
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
    stages = {stage: float(np.median([r.timings_ms.get(stage, 0.0) for r in ok]))
              for stage in dict.fromkeys(k for r in ok for k in r.timings_ms)}
    return {"images": len(records), "ok": len(ok), "errors": len(records) - len(ok), "span_s": span,
            "images_per_s": len(ok) / span, "steady_images_per_s": steady_rate(ends),
            "item_ms": {"p50": float(np.percentile(totals, 50)), "p95": float(np.percentile(totals, 95))},
            "model_ms_p50": float(np.percentile(model, 50)), "stages_ms_p50": stages,
            "passed": sum(1 for r in ok if r.passed)}


def steady_rate(ends: np.ndarray, skip: float = 0.25) -> float | None:
    """Images/s once running: the least-squares slope of the completion count against the end times
    (seconds), after the first ``skip`` of the items; None with fewer than 4 items left. A slope, not a
    count over a window, because a batch's items finish together: a window edge inside a burst would
    count it wrongly."""
    t = np.sort(np.asarray(ends, dtype=float))[int(len(ends) * skip):]
    if len(t) < 4 or np.ptp(t) <= 0:
        return None
    return float(np.polyfit(t - t[0], np.arange(len(t), dtype=float), 1)[0])


def driver_ms_per_record(report: Path, repeats: int = 5) -> float:
    """What the Ray runner's driver spends on one item: parse the record a write task returns and append it
    to a report (a scratch copy of ``report``), in ms, the best of ``repeats`` passes."""
    from cleanplate.batch import read_records
    from cleanplate.batch.report import ReportRecord, open_report_writer

    lines = [json.dumps(r.to_json()) for r in read_records(report)[0]]
    best = float("inf")
    with tempfile.TemporaryDirectory(prefix="cleanplate-driver-") as tmp:
        for i in range(repeats):
            writer = open_report_writer(Path(tmp) / f"report-{i}.jsonl", "bench")
            t = time.perf_counter()
            for line in lines:
                writer.append(ReportRecord.model_validate_json(line))
            writer.close()
            best = min(best, (time.perf_counter() - t) * 1000 / max(1, len(lines)))
    return best


async def _one_run(items: list, backend: Any, out: Path, concurrency: int, max_attempts: int) -> dict[str, Any]:
    from cleanplate.batch import ItemOptions, run_batch

    t0 = time.perf_counter()
    result = await run_batch(items, backend, out, concurrency=concurrency,
                             defaults=ItemOptions(seed=0, quality_gate=True, max_attempts=max_attempts))
    stats = measure(out / "report.jsonl")
    stats.update(concurrency=concurrency, wall_s_with_startup=time.perf_counter() - t0, exit_code=result.exit_code)
    return stats


def _ray_run(items: list, engine_options: dict[str, Any], out: Path, workers: int, batch_size: int,
             max_attempts: int) -> dict[str, Any]:
    from cleanplate.batch import ItemOptions
    from cleanplate.batch.ray_runner import run_batch_ray

    t0 = time.perf_counter()
    result = run_batch_ray(items, engine_options, out, workers=workers, batch_size=batch_size,
                           defaults=ItemOptions(seed=0, quality_gate=True, max_attempts=max_attempts),
                           handle_signals=False)
    stats = measure(out / "report.jsonl")
    stats.update(concurrency=batch_size, wall_s_with_startup=time.perf_counter() - t0, exit_code=result.exit_code,
                 driver_ms_per_record=driver_ms_per_record(out / "report.jsonl"))
    return stats


def run_batch_throughput(*, images: int = 32, concurrency: Sequence[int] = (1, 2, 4, 8),
                         modes: Sequence[str] = MODES[:2], ray_workers: Sequence[int] = (1,),
                         bundle: str | None = None, threads: int = 1, max_attempts: int = 1, size: int = 512,
                         say: Say = lambda m: None) -> dict[str, Any]:
    """Clean the catalog once per mode and concurrency level (and, for ``ray``, per count of model actors in
    ``ray_workers``, the level being each actor's batch size); return the report (runs ordered by mode, workers,
    then concurrency; each with the counts and times of :func:`measure`).

    Raises:
        InputError: fewer than 1 image, a level or worker count < 1, an unknown or repeated mode,
            ``max_attempts`` < 1; MissingDependency: ``ray`` among the modes without the ray extra.
    """
    from cleanplate.batch import GatewayBackend, InProcessBackend, load_items
    from cleanplate.engines import EngineOptions, make_engine
    from cleanplate.errors import require_extra
    from cleanplate.serving.settings import load_settings

    from .load import local_gateway

    if (images < 1 or not concurrency or any(c < 1 for c in concurrency) or max_attempts < 1
            or not ray_workers or any(w < 1 for w in ray_workers)):
        raise InputError("need --images >= 1, concurrency levels >= 1, --ray-workers >= 1 and --max-attempts >= 1",
                         code=ErrorCode.BAD_OPTION)
    if not modes or len(set(modes)) != len(modes) or set(modes) - set(MODES):
        raise InputError(f"modes must be distinct, from {MODES}; got {list(modes)}", code=ErrorCode.BAD_OPTION)
    if "ray" in modes:
        require_extra("ray", "ray")
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    ray_cpus = max(ray_workers) + 1
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cleanplate-batch-bench-",
                                                                    ignore_cleanup_errors=True)))
        say(f"making a catalog of {images} {size}x{size} photos")
        items = load_items(make_catalog(work / "catalog", images, size=size))
        if "gateway" in modes:
            say("starting a local gateway")
            _, url = stack.enter_context(local_gateway({"CLEANPLATE_TORCH_THREADS": str(threads)}, bundle))
        if "ray" in modes:
            import ray

            from cleanplate.batch.ray_runner import connect

            # One cluster for every Ray run. Each actor reserves 1 logical CPU and the decode and write tasks
            # need some too, so the cluster has one logical CPU more than the most actors (the cores are shared).
            say(f"starting a local Ray cluster ({ray_cpus} logical CPUs)")
            if connect(None, num_cpus=ray_cpus):
                stack.callback(ray.shutdown)
        for c in concurrency:
            for mode in modes:
                options = EngineOptions(bundle=bundle, torch_threads=threads, max_queue=max(64, 2 * c))
                for workers in ray_workers if mode == "ray" else [1]:
                    out = work / f"{mode}-{workers}-{c}"
                    if mode == "ray":
                        stats = _ray_run(items, options.model_dump(mode="json", exclude_unset=True), out, workers,
                                         c, max_attempts)
                    else:
                        if mode == "gateway":
                            backend: Any = GatewayBackend(url, concurrency=c)
                        else:
                            backend = InProcessBackend(make_engine(load_settings(**options.model_dump(
                                exclude_unset=True))))
                        stats = asyncio.run(_one_run(items, backend, out, c, max_attempts))
                    stats.update(mode=mode, workers=workers)
                    runs.append(stats)
                    say(f"{mode}, {workers} worker(s), concurrency {c}: {stats['ok']} ok, {stats['errors']} errors, "
                        f"{stats['images_per_s']:.2f} images/s (steady {fmt_rate(stats['steady_images_per_s'])}), "
                        f"item p50 {fmt_ms(stats['item_ms']['p50'])} ms")
    runs.sort(key=lambda r: (list(modes).index(r["mode"]), r["workers"], r["concurrency"]))
    settings = {"images": images, "image": f"{size}x{size} PNG, synthetic promo overlay on a dev photo",
                "bundle": bundle or "default", "torch_threads": threads, "gate": f"on, max_attempts {max_attempts}"}
    if "ray" in modes:
        settings["ray"] = {"workers": list(ray_workers), "logical_cpus": ray_cpus, "version": ray.__version__}
    return {"harness": "batch", "settings": settings,
            "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "runs": runs, "wall_s": time.perf_counter() - t_start, "environment": environment()}


def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def failed(report: dict[str, Any]) -> bool:
    """Whether any run left an item undone or in error."""
    return any(r["errors"] or r["ok"] != report["settings"]["images"] for r in report["runs"])


# Stages of a Ray report line that run outside the model actor, in CPU tasks (read + decode, encode, write).
CPU_STAGES = ("load", "encode", "write")


def _label(run: dict[str, Any]) -> str:
    return f"ray, {run['workers']} worker(s)" if run["mode"] == "ray" else run["mode"]


def ray_comparison(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per concurrency level with both: the Ray runner at one worker vs the in-process runner (one engine
    each, the level = items in the engine at once): steady and span images/s and their ratios."""
    runs = report["runs"]
    rows = []
    for local in (r for r in runs if r["mode"] == "in-process"):
        ray = next((r for r in runs if r["mode"] == "ray" and r["workers"] == 1
                    and r["concurrency"] == local["concurrency"]), None)
        if ray is None:
            continue
        steady = (ray["steady_images_per_s"] / local["steady_images_per_s"]
                  if ray["steady_images_per_s"] and local["steady_images_per_s"] else None)
        span = ray["images_per_s"] / local["images_per_s"] if local["images_per_s"] else None
        rows.append({"concurrency": local["concurrency"], "local_steady": local["steady_images_per_s"],
                     "ray_steady": ray["steady_images_per_s"], "steady_ratio": steady,
                     "local_span": local["images_per_s"], "ray_span": ray["images_per_s"], "span_ratio": span})
    return rows


def scaling_estimate(report: dict[str, Any]) -> dict[str, Any] | None:
    """What bounds the Ray runner with N model workers, from the Ray runs' stage medians: the CPU time per item
    outside the actor (``CPU_STAGES``, ms; each item's share runs as a Ray task on any node's CPUs), the driver's
    time per record (ms, one process for the whole run), and the per-actor steady rate measured here (images/s).
    None without Ray runs."""
    ray = [r for r in report["runs"] if r["mode"] == "ray" and r["ok"]]
    if not ray:
        return None
    one = max((r for r in ray if r["workers"] == 1), key=lambda r: r["steady_images_per_s"] or 0, default=ray[0])
    cpu_ms = float(np.median([sum(r["stages_ms_p50"].get(s, 0.0) for s in CPU_STAGES) for r in ray]))
    driver_ms = float(min(r["driver_ms_per_record"] for r in ray))
    return {"cpu_ms_per_item": cpu_ms, "images_per_s_per_cpu": 1000 / cpu_ms if cpu_ms else None,
            "driver_ms_per_record": driver_ms, "driver_images_per_s": 1000 / driver_ms if driver_ms else None,
            "actor_images_per_s": one["steady_images_per_s"], "actor_batch": one["concurrency"],
            "by_workers": {str(w): max((r["steady_images_per_s"] or 0) for r in ray if r["workers"] == w)
                           for w in sorted({r["workers"] for r in ray})}}


def to_markdown(report: dict[str, Any], command: str) -> str:
    s = report["settings"]
    ray_note = ""
    if "ray" in s:
        ray_note = (f" Ray {s['ray']['version']}: one local cluster on 127.0.0.1 with {s['ray']['logical_cpus']} "
                    "logical CPUs (each model actor reserves 1; the decode and write tasks 0.5), started once; for "
                    "`ray` rows the concurrency is the actor's batch size (items per actor call).")
    lines = [
        "# Batch cleaning throughput", "", f"`{command}`", "",
        (f"Bundle `{s['bundle']}`, {s['torch_threads']} torch thread(s); catalog: {s['images']} images ({s['image']}); "
         f"quality gate {s['gate']}. Machine load average (1 min) before/after: {report['loadavg_1m_before_after']} "
         "(on a shared machine, other work running at the same time lowers these figures)." + ray_note),
        "",
        "| engine | workers | concurrency | images/s | steady images/s | item p50 ms | item p95 ms | model p50 ms "
        "| ok | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['mode']} | {r.get('workers', 1)} | {r['concurrency']} | {r['images_per_s']:.2f} | "
                     f"{fmt_rate(r.get('steady_images_per_s'))} | {fmt_ms(r['item_ms']['p50'])} | "
                     f"{fmt_ms(r['item_ms']['p95'])} | {fmt_ms(r['model_ms_p50'])} | {r['ok']} | {r['errors']} |")
    lines += ["", ("images/s = images / (last item's end - first item's start), from the report: model loading "
                   "and start-up are not counted, except that the Ray runner's first items are decoded while its "
                   "actors start. Steady images/s = the slope of completions over time after the first quarter of "
                   "the items (start-up and pipeline fill left out). Item time is one item's wall time in the job "
                   "(decode, wait for the engine, removal, gate, encode, write); it grows with concurrency once the "
                   "engine is the bottleneck, since items queue for it. Model time includes the wait in the "
                   "engine's micro-batch queue and the whole batch's run, so it grows too.")]
    comparison = ray_comparison(report)
    if comparison:
        lines += ["", "## Ray runner vs local runner, one model worker each", "",
                  "| concurrency | local steady images/s | Ray steady images/s | Ray / local (steady) "
                  "| Ray / local (span) |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['concurrency']} | {fmt_rate(c['local_steady'])} | {fmt_rate(c['ray_steady'])} | "
                  f"{fmt_rate(c['steady_ratio'])} | {fmt_rate(c['span_ratio'])} |" for c in comparison]
        lines += ["", ("Same engine options, catalog and gate; at one worker both runners hold `concurrency` items "
                       "in one engine, so the ratio is the cost of running the job as a Ray Data pipeline on this "
                       "machine (its decode/write tasks, object store, pickled rows and actor calls share the same "
                       "cores as the model).")]
    est = scaling_estimate(report)
    if est:
        stages = [r for r in report["runs"] if r["mode"] == "ray" and r["ok"]]
        names = list(dict.fromkeys(k for r in stages for k in r["stages_ms_p50"]))
        lines += ["", "## Stages of the Ray runs (median ms per item)", "",
                  "| run | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {r['workers']} worker(s), batch {r['concurrency']} | "
                  + " | ".join(fmt_ms(r["stages_ms_p50"].get(n)) for n in names) + " |" for r in stages]
        workers = ", ".join(f"{w}: {fmt_rate(v)}" for w, v in est["by_workers"].items())
        lines += ["", "## Scaling estimate for N GPU workers", "",
                  (f"Each item costs {est['cpu_ms_per_item']:.0f} ms of CPU outside the model actor (load + encode + "
                   f"write, medians of the runs above): Ray runs that as tasks on any node, so one CPU core feeds "
                   f"about {fmt_rate(est['images_per_s_per_cpu'])} images/s. The driver, one process, parses and "
                   f"appends each report line in {est['driver_ms_per_record']:.3f} ms, a ceiling of about "
                   f"{est['driver_images_per_s']:.0f} images/s. The model actor is the rest: here on CPU one actor "
                   f"gives {fmt_rate(est['actor_images_per_s'])} images/s at batch {est['actor_batch']} (best steady "
                   f"rate by workers: {workers}; a second actor on 2 cores only shares them). Inside the actor, "
                   "prepare and composite run on its CPU beside the GPU's model and gate."),
                  "",
                  ("With N GPU workers of g images/s each (measure g on the GPU: `cleanplate bench latency --device "
                   "cuda`), throughput ~ min(N x g, C x "
                   f"{fmt_rate(est['images_per_s_per_cpu'])}, {est['driver_images_per_s']:.0f}) images/s for C CPU "
                   "cores free for tasks in the cluster: it grows linearly in N until the CPU tasks or the driver "
                   f"bind. For example at g = 20 images/s, a cluster needs about {20 / est['images_per_s_per_cpu']:.1f} "
                   "task CPUs per GPU worker to keep it fed, and the driver caps the run at about "
                   f"{est['driver_images_per_s'] / 20:.0f} such workers; past that, split the catalog into several "
                   "runs (one driver each, separate outputs). Object-store reads and writes add latency per item "
                   "but run in the tasks, in parallel, so they raise C rather than lower the ceiling.")]
    return with_environment(lines, report["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: images/s (steady where measured) and item p50 latency against concurrency, a line per mode
    (and per worker count for Ray)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(_label(r) for r in report["runs"]):
        runs = [r for r in report["runs"] if _label(r) == label]
        xs = [r["concurrency"] for r in runs]
        a.plot(xs, [r.get("steady_images_per_s") or r["images_per_s"] for r in runs], marker="o", label=label)
        b.plot(xs, [np.nan if r["item_ms"]["p50"] is None else r["item_ms"]["p50"] for r in runs], marker="o",
               label=label)
    a.set(xlabel="concurrency (items in flight; Ray: batch per actor)", ylabel="images/s (steady)",
          title="batch throughput")
    b.set(xlabel="concurrency (items in flight; Ray: batch per actor)", ylabel="item time, median (ms)",
          title="time per item")
    for ax in (a, b):
        ax.set_xticks(sorted({r["concurrency"] for r in report["runs"]}))
        ax.set_ylim(bottom=0)
        ax.legend()
    return [save_figure(fig, out.with_suffix(".png"))]
