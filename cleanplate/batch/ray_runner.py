"""The batch run on a Ray cluster (``cleanplate batch run ... --ray [ADDRESS]``): the same items, options, gate,
outputs, report lines and review queue as :func:`.runner.run_batch`, executed as a Ray Data pipeline
(https://docs.ray.io/en/latest/data/, ``Dataset.map`` and ``Dataset.map_batches`` over an actor pool):

    from_items(todo) -> map(decode)           CPU tasks: read the image and mask (path or URL), decode
                     -> map_batches(_Model)   one engine per actor (``workers`` actors, ``num_gpus`` each),
                                              ``batch_size`` items at once through removal.run_removal
                                              (prepare, model, composite, gate: the gateway's removal)
                     -> map(encode + write)   CPU tasks: encode, write the output and review copies whole,
                                              build the item's ReportRecord
                     -> driver                appends each record to the report, shows progress

The driver plans exactly as the local runner (``plan``: resume from the report, one listing of the output
prefix), holds the local output folder's lock, and is the report's one writer. Rows carry only plain types
(decoded images travel pickled), so the stages can run on any node; a worker that dies mid-item has its
task retried by Ray (actors are restarted), and an output is written only by the stage after the model, whole,
before its report line: a rerun skips every item with a line and redoes the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import CleanplateError, ErrorCode, InputError, require_extra
from .backends import InProcessBackend, encode_item, load_item
from .items import BatchItem, ItemOptions, MaskChannel
from .progress import Progress
from .report import ReportError, ReportRecord, last_records, open_report_writer, read_records
from .runner import (
    REPORT_NAME,
    REVIEW_NAME,
    BatchResult,
    _remove_stale_temp_files,
    check_layout,
    out_lock,
    plan,
    save_outputs,
)

log = logging.getLogger("cleanplate.batch")


# -- rows: plain types only ------------------------------------------------------------------------------
def _item_row(i: int, item: BatchItem) -> dict[str, Any]:
    return {"i": i, "key": item.key, "image": str(item.image), "mask": "" if item.mask is None else str(item.mask),
            "options": item.options.model_dump_json(exclude_none=True), "origin": item.origin,
            "problem": "" if item.problem is None else json.dumps([item.problem[0].value, item.problem[1]]),
            "auto_mask": item.auto_mask,
            "t0": time.time(), "timings": "{}", "error": "", "loaded": b"", "inferred": b"", "engine": ""}


def _absolute(loc: storage.Loc, cwd: str) -> storage.Loc:
    return loc if not isinstance(loc, Path) or loc.is_absolute() else Path(cwd) / loc


def _row_item(row: dict[str, Any], cwd: str) -> BatchItem:
    """The row's item, its local paths made absolute against the driver's folder ``cwd``."""
    problem = None
    if row["problem"]:
        code, message = json.loads(row["problem"])
        problem = (ErrorCode(code), message)
    mask = _absolute(storage.as_loc(row["mask"]), cwd) if row["mask"] else None
    return BatchItem(row["key"], _absolute(storage.as_loc(row["image"]), cwd), mask,
                     ItemOptions.model_validate_json(row["options"]), row["origin"], problem, bool(row["auto_mask"]))


def _fail(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """Record an item's error in its row (as the local runner records it in the line)."""
    if isinstance(exc, CleanplateError):
        row["error"] = json.dumps([exc.code.value, str(exc)])
    else:
        log.exception("item %s failed", row["key"])
        row["error"] = json.dumps([ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}"])
    row["loaded"] = row["inferred"] = b""
    return row


def _lap(row: dict[str, Any], stage: str, since: float) -> float:
    now = time.perf_counter()
    timings = json.loads(row["timings"])
    timings[stage] = round((now - since) * 1000, 2)
    row["timings"] = json.dumps(timings)
    return now


# -- stages ------------------------------------------------------------------------------------------------
def decode_stage(row: dict[str, Any], *, mask_channel: MaskChannel, cwd: str) -> dict[str, Any]:
    """Read and decode one item (a Ray task). Errors become the row's ``error``."""
    t = time.perf_counter()
    row["t0"] = time.time()  # the item's start, as the local runner's: its total excludes waiting to start
    try:
        item = _row_item(row, cwd)
        if item.problem is not None:
            raise InputError(item.problem[1], code=item.problem[0])
        row["loaded"] = pickle.dumps(load_item(item, mask_channel), protocol=5)
        _lap(row, "load", t)
        row["t_loaded"] = time.time()
    except Exception as exc:
        _fail(row, exc)
        row["t_loaded"] = time.time()
    return row


class ModelStage:
    """One engine per Ray actor (:func:`cleanplate.engines.make_engine` in
    :class:`~.backends.InProcessBackend`); a call runs a batch of rows through ``removal.run_removal``
    concurrently, so the engine's micro-batcher can batch them.

    Args:
        engine_options: :class:`cleanplate.engines.EngineOptions` fields; defaults_json: the run's
        :class:`~.items.ItemOptions` (``quality_gate`` None = on when the engine has a discriminator).
    """

    def __init__(self, engine_options: dict[str, Any], defaults_json: str) -> None:
        import threading

        from ..engines import EngineOptions, make_engine

        # The engine lives on one event loop in its own thread; Ray may call from any thread.
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="cleanplate-ray-engine", daemon=True).start()
        self.backend = InProcessBackend(make_engine(EngineOptions(**engine_options)))
        self._run(self.backend.start())
        defaults = ItemOptions.model_validate_json(defaults_json)
        if defaults.quality_gate is None:
            defaults = defaults.model_copy(update={"quality_gate": self.backend.has_gate})
        self.defaults = defaults

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        rows = batch.to_dict("records")
        return pd.DataFrame(self._run(self._batch(rows)))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._one(row) for row in rows)))

    async def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        row["engine"] = self.backend.name
        if row["error"]:
            return row
        timings = json.loads(row["timings"])
        timings["queue"] = round(max(0.0, time.time() - float(row["t_loaded"])) * 1000, 2)
        try:
            item = _row_item(row, "/")
            loaded = pickle.loads(row["loaded"])
            inferred = await self.backend.infer(item, loaded, item.options.over(self.defaults))
        except Exception as exc:
            return _fail(row, exc)
        timings.update({stage: round(ms, 2) for stage, ms in inferred.timings_ms.items()})
        row["timings"] = json.dumps(timings)
        row["inferred"] = pickle.dumps(inferred, protocol=5)
        return row


def write_stage(row: dict[str, Any], *, out: str, review: str, cwd: str, run_id: str) -> dict[str, Any]:
    """Encode and write one item (whole files or objects), then its :class:`~.report.ReportRecord` as the
    row (``{"record": json}``); the review folder gets ``item.json`` = the line."""
    out_loc, review_loc = storage.as_loc(out), storage.as_loc(review)
    item = _row_item(row, cwd)
    record = ReportRecord(key=row["key"], image=row["image"], mask=row["mask"] or None,
                          engine=row["engine"] or None)
    try:
        if row["error"]:
            code, message = json.loads(row["error"])
            raise _ItemError(code, message)
        loaded, inferred = pickle.loads(row["loaded"]), pickle.loads(row["inferred"])
        t = time.perf_counter()
        data = encode_item(item, loaded, inferred)
        t = _lap(row, "encode", t)
        folder = save_outputs(_absolute(out_loc, cwd), _absolute(review_loc, cwd), item, data, inferred.passed,
                              inferred.mask_png)
        _lap(row, "write", t)
        record = record.model_copy(update=dict(
            status="ok", passed=inferred.passed, score=inferred.score, threshold=inferred.threshold,
            attempts=inferred.attempts, seed=inferred.seed, output=str(storage.join(out_loc, item.key)),
            bytes=len(data), review=None if folder is None else str(storage.join(review_loc, item.key)),
            width=inferred.width, height=inferred.height, mask_source=inferred.mask_source,
            detections=inferred.detections))
    except _ItemError as exc:
        record.error = ReportError(code=exc.code_slug, message=exc.message)
    except Exception as exc:
        _fail(row, exc)
        code, message = json.loads(row["error"])
        record.error = ReportError(code=code, message=message)
    timings = json.loads(row["timings"])
    timings["total"] = round((time.time() - float(row["t0"])) * 1000, 2)
    record.timings_ms = timings
    record.run, record.time = run_id, datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    if record.ok and record.review is not None:
        storage.write_bytes(storage.join(_absolute(storage.as_loc(record.review), cwd), "item.json"),
                            json.dumps(record.to_json(), indent=1).encode() + b"\n")
    return {"record": json.dumps(record.to_json())}


class _ItemError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code_slug, self.message = code, message


# -- the run -----------------------------------------------------------------------------------------------
def loopback_only() -> None:
    """Make a Ray cluster this process starts listen on 127.0.0.1 only. Ray resolves even an explicit
    ``_node_ip_address="127.0.0.1"`` to the host's routable address (``ray._private.services
    .resolve_ip_for_localhost``) and its servers then listen on every interface; the node address is
    127.0.0.1 when ``ray_constants.ENABLE_RAY_CLUSTER`` is off (its macOS/Windows default, env
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and GCS, raylet and workers bind to it."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # a Ray without it: its default binding
        log.warning("cannot keep the local Ray cluster on 127.0.0.1 with this Ray version")


def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join or start a Ray cluster (``ray.init``): None or "local" = a new one-machine cluster on 127.0.0.1
    (:func:`loopback_only`, no dashboard), "auto" = the running cluster this machine belongs to, anything
    else an address ("host:6379", "ray://head:10001"). A session this process already holds is used as it is.

    Returns:
        True when this call started the session (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        loopback_only()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        ray.init(address=address)
    return True


class _Stopped(Exception):
    pass


def run_batch_ray(items: Sequence[BatchItem], engine_options: dict[str, Any], out_dir: str | os.PathLike, *,
                  address: str | None = None, workers: int = 1, batch_size: int = 4,
                  num_gpus_per_worker: float = 0.0, defaults: ItemOptions | None = None,
                  report_path: str | os.PathLike | None = None, review_dir: str | os.PathLike | None = None,
                  retry_failed: bool = False, mask_channel: MaskChannel = "luma",
                  progress: Progress | None = None, handle_signals: bool = True) -> BatchResult:
    """Clean ``items`` into ``out_dir`` on a Ray cluster; layout, report lines, review and resume as
    :func:`.runner.run_batch` (see :mod:`cleanplate.batch`).

    Args:
        engine_options: :class:`cleanplate.engines.EngineOptions` fields for each actor's engine (torch,
            opencv, onnxruntime, or triton against a Triton service).
        address: see :func:`connect`; workers: model actors (>= 1); batch_size: items per actor call;
        num_gpus_per_worker: GPUs each actor reserves (0 = CPU).
        handle_signals: SIGINT/SIGTERM stop the run (the items whose lines were written stay done; the
            rest are done by the next run).

    Raises:
        InputError: workers or batch_size < 1, another run holds a local ``out_dir``, an output name on the
            report or in the review folder.
        MissingDependency: ray is not installed (``pip install "cleanplate[ray]"``).
    """
    if workers < 1 or batch_size < 1:
        raise InputError("--workers and --batch-size must be >= 1", code=ErrorCode.BAD_OPTION)
    require_extra("ray", "ray")
    out = storage.as_loc(out_dir)
    report_file = storage.as_loc(report_path) if report_path is not None else storage.join(out, REPORT_NAME)
    review = storage.as_loc(review_dir) if review_dir is not None else storage.join(out, REVIEW_NAME)
    check_layout(items, out, report_file, review)
    progress = progress or Progress("off")
    result = BatchResult(total=len(items), report=report_file)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}-ray"
    t_start = time.monotonic()
    with out_lock(out):
        if storage.relative_inside(review, out) is None:
            _remove_stale_temp_files(out, review)
        else:
            _remove_stale_temp_files(out)
        records, _ = read_records(report_file)
        todo, result.done_before, result.failed_before = plan(items, last_records(records), out,
                                                             retry_failed=retry_failed)
        del records
        result.not_started = len(todo)
        if todo:
            _execute(todo, engine_options, out, review, report_file, run_id, result, progress,
                     address=address, workers=workers, batch_size=batch_size, num_gpus=num_gpus_per_worker,
                     defaults=defaults or ItemOptions(), mask_channel=mask_channel, handle_signals=handle_signals)
    result.elapsed_s = time.monotonic() - t_start
    return result


def _execute(todo: list[BatchItem], engine_options: dict[str, Any], out: storage.Loc, review: storage.Loc,
             report_file: storage.Loc, run_id: str, result: BatchResult, progress: Progress, *,
             address: str | None, workers: int, batch_size: int, num_gpus: float, defaults: ItemOptions,
             mask_channel: MaskChannel, handle_signals: bool) -> None:
    import ray
    import ray.data

    started = connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the one progress display
    cwd = os.getcwd()
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        result.stopped_by = signal.Signals(signum).name
        raise _Stopped

    try:
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous[sig] = signal.signal(sig, on_signal)
                except ValueError:  # not the main thread
                    pass
        rows = [_item_row(i, item) for i, item in enumerate(todo)]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 10_000)))
        ds = ds.map(decode_stage, fn_kwargs={"mask_channel": mask_channel, "cwd": cwd}, num_cpus=0.5)
        ds = ds.map_batches(ModelStage, fn_constructor_kwargs={"engine_options": engine_options,
                                                               "defaults_json": defaults.model_dump_json()},
                            batch_size=batch_size, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_gpus=num_gpus or None, num_cpus=1)
        ds = ds.map(write_stage, fn_kwargs={"out": str(out), "review": str(review), "cwd": cwd, "run_id": run_id},
                    num_cpus=0.5)
        writer = open_report_writer(report_file, run_id)
        progress.start(len(todo), result.done_before)
        result.not_started = 0
        finished = 0
        try:
            for row in ds.iter_rows():
                record = ReportRecord.model_validate_json(row["record"])
                writer.append(record)
                finished += 1
                if record.ok:
                    result.ok += 1
                    result.passed += record.passed is True
                    result.rejected += record.passed is False
                else:
                    result.errors += 1
                progress.update(record)
        except _Stopped:
            progress.say(f"batch: {result.stopped_by}: stopping; the items not reported are done next run")
        finally:
            result.not_started = len(todo) - finished
            writer.close()
            progress.close()
    except _Stopped:
        result.not_started = len(todo)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            ray.shutdown()
