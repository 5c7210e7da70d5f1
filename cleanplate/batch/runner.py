"""The batch run: plan (what is done already), one writer per output folder, the pipeline load -> engine ->
encode + write -> report line under the memory budget, signals, and the result."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from .. import storage
from ..admission import MemoryBudget, MiB, release_free_memory_soon
from ..errors import CleanplateError, ErrorCode, InputError
from ..locks import exclusive
from .backends import Backend, BatchAborted
from .items import BatchItem, ItemOptions, MaskChannel
from .progress import Progress
from .report import (
    ObjectReportWriter,
    ReportError,
    ReportRecord,
    ReportWriter,
    last_records,
    open_report_writer,
    read_records,
)

log = logging.getLogger("cleanplate.batch")

REPORT_NAME = "report.jsonl"
REVIEW_NAME = "review"
LOCK_NAME = ".cleanplate-batch.lock"
# write_atomic's temp files: ".<name>.<random>.tmp"; a SIGKILL can leave one behind.
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


# -- the run -------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """Counts of one run. ``exit_code``: 130/143 when stopped by SIGINT/SIGTERM, else 1 when any item
    errored (in this run, or earlier and not retried), else 0 (gate failures are not errors)."""

    total: int = 0
    done_before: int = 0
    failed_before: int = 0
    ok: int = 0
    passed: int = 0
    rejected: int = 0
    errors: int = 0
    not_started: int = 0
    stopped_by: str | None = None
    elapsed_s: float = 0.0
    report: storage.Loc | None = None

    @property
    def exit_code(self) -> int:
        if self.stopped_by is not None:
            return 128 + int(getattr(signal, self.stopped_by))
        return 1 if self.errors or self.failed_before else 0

    def line(self) -> str:
        done = self.ok + self.errors
        rate = done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        parts = [(f"batch: {self.total} items: {self.ok} ok ({self.passed} passed the gate, {self.rejected} to "
                  f"review), {self.errors} errors"), f"{self.done_before} done before"]
        if self.failed_before:
            parts.append(f"{self.failed_before} failed before (rerun with --retry-failed)")
        if self.stopped_by:
            parts.append(f"stopped by {self.stopped_by}, {self.not_started} not started (rerun to resume)")
        return "; ".join(parts) + f"; {self.elapsed_s:.1f} s, {rate:.2f} img/s; report {self.report}"


def plan(items: Sequence[BatchItem], report: dict[str, ReportRecord], out_dir: storage.Loc, *,
         retry_failed: bool) -> tuple[list[BatchItem], int, int]:
    """Which items to run: ``(todo, done_before, failed_before)``. Done = last line ok and the output on
    disk with the recorded size; failed = last line error (run again only with ``retry_failed``).
    ``out_dir``: a local folder (one stat per finished item) or a URL (one listing of it)."""
    todo, done, failed = [], 0, 0
    listed: dict[str, int] | None = None
    for item in items:
        last = report.get(item.key)
        if last is not None and last.status == "ok":
            if isinstance(out_dir, Path):
                size = storage.size(out_dir / item.key)
            else:
                listed = storage.sizes_under(out_dir) if listed is None else listed
                size = listed.get(item.key)
            if size is not None and size == last.bytes:
                done += 1
                continue
        elif last is not None and last.status == "error" and not retry_failed:
            failed += 1
            continue
        todo.append(item)
    return todo, done, failed


def _remove_stale_temp_files(*folders: storage.Loc) -> int:
    removed = 0
    for folder in folders:
        if not isinstance(folder, Path):  # object stores never hold a partial object
            continue
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                if _TEMP_FILE.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
    return removed


def check_layout(items: Sequence[BatchItem], out: storage.Loc, report_file: storage.Loc,
                 review: storage.Loc) -> None:
    """Refuse an output name that would land on the report or in the review folder.

    Raises:
        InputError: "bad_option", naming the item.
    """
    review_rel, report_rel = storage.relative_inside(review, out), storage.relative_inside(report_file, out)
    for item in items:
        if item.key == report_rel or (review_rel is not None and (item.key + "/").startswith(review_rel + "/")):
            raise InputError(f"{item.origin}: output {item.key!r} would land on the report or in the review "
                             f"folder; rename it or use --report/--review elsewhere", code=ErrorCode.BAD_OPTION)


def out_lock(out: storage.Loc) -> Any:
    """The one-writer lock of a local output folder (:func:`cleanplate.locks.exclusive`); an object store
    has none (one run per output prefix is the operator's to keep)."""
    if isinstance(out, Path):
        return exclusive(out, LOCK_NAME, f"another cleanplate batch is running on {out}")
    return contextlib.nullcontext()


def save_outputs(out: storage.Loc, review_root: storage.Loc, item: BatchItem, data: bytes,
                 passed: bool | None, mask_png: bytes | None = None) -> str | None:
    """Write an item's output whole (:func:`cleanplate.storage.write_bytes`); for a gate failure
    (``passed`` False) also its review copies (``source``, ``mask``, ``result``; the mask is the item's mask
    file, else ``mask_png``, the detector's mask of an auto-masked item, as ``mask.png``). Returns the review
    folder (as a string) or None; a passing item's stale review folder from an earlier attempt is removed."""
    storage.write_bytes(storage.join(out, item.key), data)
    folder = storage.join(review_root, item.key)
    if passed is not False:
        if storage.isdir(folder):  # an earlier attempt of this item went to review; this one passed
            storage.remove_tree(folder)
        return None
    storage.write_bytes(storage.join(folder, f"source{storage.suffix(item.image)}"), storage.read_bytes(item.image))
    if item.mask is not None:
        storage.write_bytes(storage.join(folder, f"mask{storage.suffix(item.mask)}"), storage.read_bytes(item.mask))
    elif mask_png is not None:
        storage.write_bytes(storage.join(folder, "mask.png"), mask_png)
    storage.write_bytes(storage.join(folder, f"result{PurePosixPath(item.key).suffix.lower()}"), data)
    return str(folder)


def write_review_record(record: ReportRecord) -> None:
    """The item's report line as ``item.json`` in its review folder."""
    assert record.review is not None
    storage.write_bytes(storage.join(storage.as_loc(record.review), "item.json"),
                        json.dumps(record.to_json(), indent=1).encode() + b"\n")


async def run_batch(items: Sequence[BatchItem], backend: Backend, out_dir: str | os.PathLike, *,
                    defaults: ItemOptions | None = None, concurrency: int = 4, report_path: str | os.PathLike | None = None,
                    review_dir: str | os.PathLike | None = None, retry_failed: bool = False,
                    mask_channel: MaskChannel = "luma", progress: Progress | None = None,
                    io_workers: int | None = None, handle_signals: bool = True,
                    stop: asyncio.Event | None = None, memory_budget_bytes: int = 1024 * MiB) -> BatchResult:
    """Clean ``items`` into ``out_dir``; see the module docstring for the layout, report and resume rules.

    Args:
        out_dir, report_path, review_dir: local paths or fsspec URLs (:mod:`cleanplate.storage`); on an
            object store outputs are written whole and the report as fragments merged at the end
            (:class:`~.report.ObjectReportWriter`), and there is no one-writer lock.
        defaults: options for items that do not set their own; ``quality_gate=None`` means on when the
            backend has a discriminator. Unset seed = 0, unset max_attempts = 1.
        concurrency: items in the engine at once (>= 1). Up to ``concurrency + io_workers`` items are in
            the pipeline, decoding ahead and encoding behind.
        report_path: default ``out_dir/report.jsonl``; review_dir: default ``out_dir/review``.
        mask_channel: "luma" (white = remove) or "alpha" (opaque = remove) for mask files.
        io_workers: decode/encode/write threads (default ``min(8, concurrency + 1)``).
        handle_signals: on SIGINT/SIGTERM (main thread only) stop taking items, finish those in the
            engine, and return with ``stopped_by`` set; a second signal abandons the items in flight (their
            outputs are never half-written and they have no report line, so the next run does them).
        stop: set it to stop as a signal would (for callers that manage signals themselves).
        memory_budget_bytes: working memory of the items in flight (decoded, in the engine, encoding),
            charged by ``backend.cost`` before an item is read (:class:`cleanplate.admission.MemoryBudget`):
            a catalog of 40 MP photos runs in a fixed amount of memory whatever the concurrency. An item
            that alone exceeds it fails with "over_budget".

    Raises:
        InputError: concurrency < 1, another run holds ``out_dir``, an output name inside the review folder.
        BatchAborted: the backend refused every item (e.g. the gateway's 401), after the in-flight ones.
        Errors of one item never raise: they become its ``"status": "error"`` line.
    """
    if concurrency < 1:
        raise InputError(f"--concurrency must be >= 1, got {concurrency}", code=ErrorCode.BAD_OPTION)
    out = storage.as_loc(out_dir)
    report_file = storage.as_loc(report_path) if report_path is not None else storage.join(out, REPORT_NAME)
    review = storage.as_loc(review_dir) if review_dir is not None else storage.join(out, REVIEW_NAME)
    check_layout(items, out, report_file, review)
    review_rel = storage.relative_inside(review, out)
    result = BatchResult(total=len(items), report=report_file)
    run = _Run(backend, out, review, defaults or ItemOptions(), concurrency, mask_channel,
               progress or Progress("off"), io_workers or min(8, concurrency + 1), stop or asyncio.Event(), result,
               memory_budget_bytes)
    t_start = time.monotonic()
    with out_lock(out), run.signals(handle_signals):
        _remove_stale_temp_files(out, *([review] if review_rel is None else []))
        records, _ = read_records(report_file)
        todo, result.done_before, result.failed_before = plan(items, last_records(records), out,
                                                             retry_failed=retry_failed)
        del records
        result.not_started = len(todo)
        if todo and not run.stop.is_set():  # with nothing to do, load no model and wait for no server
            try:
                if await run.start_backend():
                    result.not_started = 0
                    if run.defaults.quality_gate is None:
                        run.defaults = run.defaults.model_copy(update={"quality_gate": backend.has_gate})
                    with contextlib.closing(open_report_writer(report_file, run.run_id)) as writer:
                        await run.go(todo, writer)
            finally:
                await backend.close()
    result.elapsed_s = time.monotonic() - t_start
    if run.aborted is not None:
        raise run.aborted
    return result


class _Run:
    """One run's pipeline: load (thread) -> engine (bounded) -> encode + write (thread) -> report line."""

    def __init__(self, backend: Backend, out: storage.Loc, review: storage.Loc, defaults: ItemOptions, concurrency: int,
                 mask_channel: MaskChannel, progress: Progress, io_workers: int, stop: asyncio.Event,
                 result: BatchResult, memory_budget_bytes: int) -> None:
        self.backend, self.out, self.review = backend, out, review
        self.defaults, self.concurrency, self.mask_channel = defaults, concurrency, mask_channel
        self.progress, self.io_workers, self.stop, self.result = progress, io_workers, stop, result
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}"
        self.aborted: BatchAborted | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # Every item in flight waits here, so the queue never refuses; the window semaphore bounds it.
        self.budget = MemoryBudget(memory_budget_bytes, max_waiting=sys.maxsize, on_drain=release_free_memory_soon)

    async def start_backend(self) -> bool:
        """Start the backend unless a signal comes first (a Triton engine waits for its server forever).
        Returns False when stopped before it was up."""
        starting = asyncio.ensure_future(self.backend.start())
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            return False
        try:
            starting.result()
        except CleanplateError:
            raise
        except Exception as exc:  # e.g. a bundle that fails to load: one line and exit 2, not a traceback
            raise InputError(f"the {self.backend.name} engine did not start: {type(exc).__name__}: {exc}",
                             code=ErrorCode.ENGINE_UNAVAILABLE) from exc
        return True

    async def go(self, todo: list[BatchItem], writer: ReportWriter | ObjectReportWriter) -> None:
        loop = asyncio.get_running_loop()
        self.writer = writer
        self.pool = concurrent.futures.ThreadPoolExecutor(self.io_workers, thread_name_prefix="cleanplate-batch-io")
        self.engine_slots = asyncio.Semaphore(self.concurrency)
        window = asyncio.Semaphore(self.concurrency + self.io_workers)

        def finished(task: asyncio.Task[None]) -> None:
            self.tasks.discard(task)
            window.release()
            if task.cancelled():  # abandoned by a second signal: no line, done again next run
                self.result.not_started += 1

        self.progress.start(len(todo), self.result.done_before)
        started = 0
        try:
            for item in todo:
                await window.acquire()
                if self.stop.is_set():
                    window.release()
                    break
                started += 1
                task = loop.create_task(self._one(item))
                self.tasks.add(task)
                task.add_done_callback(finished)
            while self.tasks:  # not gather: a second signal cancels some of these, and that is no error
                await asyncio.wait(set(self.tasks))
        except asyncio.CancelledError:
            for task in self.tasks:
                task.cancel()
            raise
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.progress.close()
        self.result.not_started += len(todo) - started

    @contextlib.contextmanager
    def signals(self, enabled: bool) -> Any:
        """SIGINT/SIGTERM handlers on the running loop for the duration (main thread only; else none)."""
        loop = asyncio.get_running_loop()
        installed = []

        def on_signal(sig: signal.Signals) -> None:
            if not self.stop.is_set():
                self.result.stopped_by = self.result.stopped_by or sig.name
                self.stop.set()
                self.progress.say(f"batch: {sig.name}: stopping after the items in the engine "
                                  f"(again to abandon them)")
            else:
                self.progress.say(f"batch: {sig.name} again: abandoning the items in flight")
                for task in list(self.tasks):
                    task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM) if enabled else ():
            try:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append((sig, previous))
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
                pass
        try:
            yield
        finally:
            for sig, previous in installed:
                loop.remove_signal_handler(sig)
                # remove_signal_handler leaves the default handler, not the one that was there before
                signal.signal(sig, signal.SIG_DFL if previous is None else previous)

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _one(self, item: BatchItem) -> None:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        record = ReportRecord(key=item.key, image=str(item.image), mask=None if item.mask is None else str(item.mask),
                              engine=self.backend.name)

        def lap(stage: str, since: float) -> float:
            now = time.perf_counter()
            timings[stage] = round((now - since) * 1000, 2)
            return now

        try:
            if item.problem is not None:
                raise InputError(item.problem[1], code=item.problem[0])
            cost = await self._thread(self.backend.cost, item, self.mask_channel)
            async with self.budget.reserve(cost, f"item {item.key!r}"):
                t = lap("admit", t0)
                loaded = await self._thread(self.backend.load, item, self.mask_channel)
                t = lap("load", t)
                async with self.engine_slots:
                    if self.stop.is_set():  # decoded but not started: left for the next run
                        self.result.not_started += 1
                        return
                    t = lap("queue", t)
                    opts = item.options.over(self.defaults)
                    inferred = await self.backend.infer(item, loaded, opts)
                for stage, ms in inferred.timings_ms.items():
                    timings[stage] = round(ms, 2)
                t = time.perf_counter()
                data = await self._thread(self.backend.finish, item, loaded, inferred)
                del loaded  # the budget is released below: free the pixels first
                inferred.pixels = None
                t = lap("encode", t)
            review = await self._thread(save_outputs, self.out, self.review, item, data, inferred.passed,
                                        inferred.mask_png)
            lap("write", t)
            record = record.model_copy(update=dict(
                status="ok", passed=inferred.passed, score=inferred.score, threshold=inferred.threshold,
                attempts=inferred.attempts, seed=inferred.seed, output=str(storage.join(self.out, item.key)), bytes=len(data),
                review=review, width=inferred.width, height=inferred.height, mask_source=inferred.mask_source,
                detections=inferred.detections))
        except BatchAborted as exc:
            if self.aborted is None:
                self.aborted = exc
                self.stop.set()
            self.result.not_started += 1  # not the item's fault: no report line
            return
        except CleanplateError as exc:
            record.error = ReportError(code=exc.code.value, message=str(exc))
        except Exception as exc:  # one bad item must not end an overnight run
            log.exception("item %s failed", item.key)
            record.error = ReportError(code=ErrorCode.INTERNAL.value, message=f"{type(exc).__name__}: {exc}")
        timings["total"] = round((time.perf_counter() - t0) * 1000, 2)
        record.timings_ms = timings
        record.run, record.time = self.run_id, datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        if record.ok and record.review is not None:
            await self._thread(write_review_record, record)
        await self._thread(self.writer.append, record)
        if record.ok:
            self.result.ok += 1
            self.result.passed += record.passed is True
            self.result.rejected += record.passed is False
        else:
            self.result.errors += 1
        self.progress.update(record)
