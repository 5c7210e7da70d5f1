"""Engines: what turns a model crop into a cleaned crop, behind one async interface (docs/DESIGN.md, "Engines").

The callers (the gateway, ``cleanplate batch``, the benchmarks; :func:`cleanplate.removal.run_removal`) do
the pre- and post-processing (decode, dilate, crop, paste-back, encode) and hand each engine square crops
at its ``resolution``. :data:`ENGINES` names every engine; :func:`make_engine` builds one from
:class:`EngineOptions`:

* ``torch``: the bundle in-process; requests that arrive within ``batch_window_ms`` of each other run as
  one batch of up to ``max_batch`` (:class:`MicroBatcher`), on one model thread.
* ``opencv``: Telea inpainting (Telea 2004, ``cv2.inpaint``), no model and no discriminator; a baseline. Its
  automatic masks come from the bundle's (default: the shipped bundle's) overlay detector.
* ``onnxruntime``: the ``cleanplate export onnx`` graphs in-process through ONNX Runtime
  (:class:`cleanplate.onnxruntime_engine.OnnxRuntimeEngine`), the same numpy removal as Triton's BLS model.
* ``triton``: a Triton Inference Server with the ``cleanplate export triton`` repository
  (:class:`cleanplate.triton_engine.TritonEngine`); Triton's dynamic batcher makes the batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import cv2
import numpy as np
from pydantic import BaseModel, Field

from .errors import EngineUnavailable, ErrorCode, InputError, QueueFull

if TYPE_CHECKING:
    from .detector import DetectionResult

T = TypeVar("T")
R = TypeVar("R")

ENGINE_NAMES = ("torch", "opencv", "triton", "onnxruntime")  # what :func:`make_engine` builds


class EngineOptions(BaseModel):
    """How to build an engine: the name and every engine's options (the gateway's ``Settings`` inherits them,
    so ``CLEANPLATE_MAX_BATCH`` and ``--max-batch`` mean the same everywhere)."""

    engine: Literal[ENGINE_NAMES] = Field("torch", description="what runs the removal")
    bundle: Path | None = Field(None, description="bundle directory; default: the bundled model")
    device: str = Field("cpu", description="torch engine: cpu, cuda, cuda:N or auto")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")

    max_batch: int = Field(8, ge=1, le=256, description="micro-batch bound; 1 turns micro-batching off")
    batch_window_ms: float = Field(10.0, ge=0, le=1000, description="how long a batch waits for company")
    max_queue: int = Field(64, ge=1, description="removals waiting for the engine before 429")
    opencv_radius: int = Field(5, ge=1, le=64, description="opencv engine: Telea radius in px")
    opencv_resolution: int = Field(512, ge=64, le=4096, description="opencv engine: crop side in px")
    triton_url: str = Field("127.0.0.1:8001", description="triton engine: host:port of Triton's gRPC or HTTP endpoint")
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="triton engine: client protocol")
    triton_timeout_s: float = Field(30.0, gt=0, description="triton engine: per-call timeout")
    triton_retries: int = Field(2, ge=0, le=10, description="triton engine: retries on transient errors")
    onnx_dir: Path | None = Field(None, description="onnxruntime engine: a `cleanplate export onnx` directory of "
                                                    "the bundle")
    onnx_threads: int | None = Field(None, ge=1, description="onnxruntime engine: intra-op threads (default: its own)")


class Engine(Protocol):
    """One removal backend. Crops are (R,R,3) uint8 RGB; masks (R,R) bool, True = remove."""

    name: str
    resolution: int  # crop side R in px
    default_dilate_px: int
    default_steps: int
    threshold: float | None  # calibrated gate threshold; None = no discriminator
    paste_prefill: str | None  # the fill paste-back computes at full resolution (BundleConfig.paste_prefill)

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def ready(self) -> bool: ...
    def queue_depth(self) -> int: ...
    async def inpaint(self, crop: np.ndarray, mask: np.ndarray, *, seed: int, steps: int) -> np.ndarray: ...
    async def score(self, source: np.ndarray, result: np.ndarray, mask: np.ndarray) -> float: ...
    # The overlay detector (cleanplate.detector, issue 17): image (H,W,3) uint8 RGB -> DetectionResult (mask (H,W)
    # uint8 {0,255} at the source size, detections). Every engine runs Detector.preprocess / .postprocess around
    # its own network call, so all give the same mask. Raises InputError(code=NO_DETECTOR) without a detector.
    has_detector: bool
    async def detect(self, image: np.ndarray) -> DetectionResult: ...


@dataclass
class _Job(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class MicroBatcher(Generic[T, R]):
    """Runs ``run_batch`` on groups of items submitted close together (dynamic batching).

    A worker takes the first waiting item, then collects more until ``max_batch`` items or until
    ``window_ms`` has passed since it took the first; items queued while a batch runs join the next
    one at once. Items whose caller has gone (cancelled by a deadline) are dropped before running.
    ``run_batch(items) -> results`` (same length and order) runs on ``executor``.

    Raises (from :meth:`submit`): QueueFull when ``max_queue`` items are already waiting;
    EngineUnavailable after :meth:`close`.
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], *, max_batch: int, window_ms: float,
                 max_queue: int, executor: concurrent.futures.Executor,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.run_batch, self.max_batch, self.window_s = run_batch, max_batch, window_ms / 1000
        self.max_queue, self.executor, self.on_batch = max_queue, executor, on_batch
        self._queue: asyncio.Queue[_Job[T, R]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._running = 0
        self._batch_s = 0.5  # moving average of batch time, for Retry-After
        self._closed = False

    def depth(self) -> int:
        """Items waiting plus items running."""
        return self._queue.qsize() + self._running

    async def submit(self, item: T) -> R:
        if self._closed:
            raise EngineUnavailable("the engine is shutting down")
        if self._queue.qsize() >= self.max_queue:
            batches_ahead = math.ceil((self._queue.qsize() + 1) / self.max_batch)
            raise QueueFull(f"the queue is full ({self.max_queue} waiting)",
                            retry_after_s=max(1, math.ceil(batches_ahead * self._batch_s)))
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        job: _Job[T, R] = _Job(item, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(EngineUnavailable("the engine shut down"))

    async def _collect(self) -> list[_Job[T, R]]:
        jobs = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.window_s
        while len(jobs) < self.max_batch:
            if not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [j for j in jobs if not j.future.done()]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            if not jobs:
                continue
            self._running = len(jobs)
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [j.item for j in jobs])
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
            else:
                for j, r in zip(jobs, results, strict=True):
                    if not j.future.done():
                        j.future.set_result(r)
            finally:
                self._running = 0
            elapsed = time.perf_counter() - t0
            self._batch_s = 0.8 * self._batch_s + 0.2 * elapsed
            if self.on_batch is not None:
                self.on_batch(len(jobs), elapsed)


@dataclass(frozen=True)
class InpaintItem:
    crop: np.ndarray
    mask: np.ndarray
    seed: int
    steps: int


@dataclass(frozen=True)
class ScoreItem:
    source: np.ndarray
    result: np.ndarray
    mask: np.ndarray


class BatchedEngine:
    """What the in-process model engines share: loading in :meth:`start` on one model thread (a server answers
    /healthz while a big model loads), every batch on that thread, two :class:`MicroBatcher` queues (inpaint,
    score), and batches split by step count.

    A subclass sets ``name``, ``resolution``, ``default_dilate_px``, ``default_steps`` and ``paste_prefill``
    and implements ``_load() -> (model, threshold or None)``, ``_remove(crops (B,R,R,3) uint8, masks (B,R,R)
    bool, seeds (B,) int, steps) -> (B,R,R,3) uint8`` and ``_score(sources, results, masks) -> (B,) floats``,
    each run on the model thread.
    """

    name = "batched"

    def __init__(self, *, max_batch: int, window_ms: float, max_queue: int,
                 on_batch: Callable[[str, int, float], None] | None) -> None:
        self.threshold: float | None = None
        self.model: Any = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cleanplate-model")
        report = on_batch or (lambda queue, n, s: None)
        self._inpaint = MicroBatcher(self._run_inpaint, max_batch=max_batch, window_ms=window_ms,
                                     max_queue=max_queue, executor=self._executor,
                                     on_batch=lambda n, s: report("inpaint", n, s))
        self._score = MicroBatcher(self._run_score, max_batch=max_batch, window_ms=window_ms,
                                   max_queue=max_queue, executor=self._executor,
                                   on_batch=lambda n, s: report("score", n, s))

    def _load(self) -> tuple[Any, float | None]:
        raise NotImplementedError

    def _remove(self, crops: np.ndarray, masks: np.ndarray, seeds: np.ndarray, steps: int) -> np.ndarray:
        raise NotImplementedError

    def _score_batch(self, sources: np.ndarray, results: np.ndarray, masks: np.ndarray) -> Sequence[float]:
        raise NotImplementedError

    async def start(self) -> None:
        self.model, self.threshold = await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def close(self) -> None:
        await self._inpaint.close()
        await self._score.close()
        self._executor.shutdown(wait=True)

    def ready(self) -> bool:
        return self.model is not None

    def queue_depth(self) -> int:
        return self._inpaint.depth() + self._score.depth()

    async def inpaint(self, crop: np.ndarray, mask: np.ndarray, *, seed: int, steps: int) -> np.ndarray:
        from .pipeline import MAX_STEPS

        if self.model is None:
            raise EngineUnavailable("the model is still loading")
        if not 1 <= steps <= MAX_STEPS:  # here, not in the batch: a bad request must not fail its batch-mates
            raise InputError(f"steps must be in 1..{MAX_STEPS}, got {steps}", code=ErrorCode.BAD_OPTION)
        return await self._inpaint.submit(InpaintItem(crop, mask, seed, steps))

    async def score(self, source: np.ndarray, result: np.ndarray, mask: np.ndarray) -> float:
        if self.model is None:
            raise EngineUnavailable("the model is still loading")
        if self.threshold is None:
            raise InputError("this model has no discriminator, so the quality gate and scoring are unavailable",
                             code=ErrorCode.NO_DISCRIMINATOR)
        return await self._score.submit(ScoreItem(source, result, mask))

    def _run_inpaint(self, items: list[InpaintItem]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(items)
        by_steps: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_steps.setdefault(item.steps, []).append(i)
        for steps, idx in by_steps.items():
            result = self._remove(np.stack([items[i].crop for i in idx]), np.stack([items[i].mask for i in idx]),
                                  np.array([items[i].seed for i in idx]), steps)
            for i, crop in zip(idx, result, strict=True):
                out[i] = crop
        return out  # type: ignore[return-value]

    def _run_score(self, items: list[ScoreItem]) -> list[float]:
        scores = self._score_batch(np.stack([i.source for i in items]), np.stack([i.result for i in items]),
                                   np.stack([i.mask for i in items]))
        return [float(s) for s in scores]


class TorchEngine(BatchedEngine):
    """The bundle in-process (:class:`cleanplate.pipeline.RemovalPipeline`) with micro-batching; one model
    thread runs every batch (torch already uses all cores inside an op), and the bundle's overlay detector
    (:meth:`detect`, float32 on the engine's device) when it has one."""

    name = "torch"

    def __init__(self, bundle: str | Path | None = None, *, device: str = "cpu", dtype: str = "fp32", max_batch: int = 8,
                 window_ms: float = 10.0, max_queue: int = 64, torch_threads: int | None = None,
                 on_batch: Callable[[str, int, float], None] | None = None) -> None:
        from .bundle import default_bundle_path, read_config

        self._bundle, self._device, self._dtype, self._threads = bundle, device, dtype, torch_threads
        config = read_config(bundle or default_bundle_path())  # fail fast on a bad path, before any load
        self.resolution, self.default_dilate_px, self.default_steps = config.resolution, config.dilate_px, config.steps
        self.paste_prefill = config.paste_prefill
        self.has_detector = config.detector
        self.detector: Any = None  # cleanplate.detector.Detector, loaded with the model when the bundle has one
        super().__init__(max_batch=max_batch, window_ms=window_ms, max_queue=max_queue, on_batch=on_batch)

    @property
    def pipe(self) -> Any:
        """The loaded :class:`~cleanplate.pipeline.RemovalPipeline` (None before :meth:`start`)."""
        return self.model

    def _load(self) -> tuple[Any, float | None]:
        import torch

        from .bundle import load_bundle
        from .pipeline import RemovalPipeline

        if self._threads:
            torch.set_num_threads(self._threads)
        bundle = load_bundle(self._bundle)
        pipe = RemovalPipeline.from_bundle(bundle, device=self._device, dtype=self._dtype)
        # float32 whatever the engine's dtype: the mask must not depend on it (the calibrated threshold is near 1)
        self.detector = None if bundle.detector is None else bundle.detector.to(pipe.device)
        return pipe, pipe.threshold

    async def detect(self, image: np.ndarray) -> DetectionResult:
        """The bundle's overlay detector on an (H, W, 3) uint8 RGB photo, on the model thread (between batches,
        so it never runs beside a removal). Raises InputError "no_detector" without one, "bad_input" for a
        bad array; EngineUnavailable while loading."""
        if not self.has_detector:
            raise InputError(f"the {self.name} engine's bundle has no overlay detector", code=ErrorCode.NO_DETECTOR)
        if self.model is None:
            raise EngineUnavailable("the model is still loading")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.detector.detect, image)

    def _remove(self, crops: np.ndarray, masks: np.ndarray, seeds: np.ndarray, steps: int) -> np.ndarray:
        from .remover import crops_to_tensors, masks_to_tensor, to_uint8_crops

        return to_uint8_crops(self.model(crops_to_tensors(list(crops)), masks_to_tensor(list(masks)),
                                         seeds=[int(s) for s in seeds], steps=steps))

    def _score_batch(self, sources: np.ndarray, results: np.ndarray, masks: np.ndarray) -> Sequence[float]:
        from .remover import crops_to_tensors, masks_to_tensor

        return self.model.score(crops_to_tensors(list(results)), crops_to_tensors(list(sources)),
                                masks_to_tensor(list(masks)))


class OpenCVEngine:
    """Telea inpainting (``cv2.inpaint(..., cv2.INPAINT_TELEA)``) on the crop; no model, no discriminator.

    Runs on a small thread pool (OpenCV releases the GIL); there is no queue to fill, so no 429. Automatic
    masks come from the overlay detector of ``bundle`` (None = the default bundle, which ships one), loaded
    on the first :meth:`detect`: the Telea baseline with ``--auto-mask`` removes what the torch engine would.
    """

    name = "opencv"

    def __init__(self, *, radius: int = 5, resolution: int = 512, dilate_px: int = 8, workers: int = 2,
                 bundle: str | Path | None = None) -> None:
        from .bundle import default_bundle_path, read_config

        self.radius, self.resolution, self.default_dilate_px, self.default_steps = radius, resolution, dilate_px, 1
        self.threshold: float | None = None
        self.paste_prefill: str | None = None
        self._bundle = Path(bundle) if bundle is not None else default_bundle_path()
        self.has_detector = read_config(self._bundle).detector
        self._detector: Any = None
        self._detector_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cleanplate-cv")
        self._running = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._executor.shutdown(wait=True)

    def ready(self) -> bool:
        return True

    def queue_depth(self) -> int:
        return self._running

    def _telea(self, crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
        bgr = cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)
        out = cv2.inpaint(bgr, mask.astype(np.uint8) * 255, self.radius, cv2.INPAINT_TELEA)
        return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)

    async def inpaint(self, crop: np.ndarray, mask: np.ndarray, *, seed: int, steps: int) -> np.ndarray:
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._telea, crop, mask)
        finally:
            self._running -= 1

    async def score(self, source: np.ndarray, result: np.ndarray, mask: np.ndarray) -> float:
        raise InputError("the opencv engine has no discriminator, so the quality gate and scoring are unavailable",
                         code=ErrorCode.NO_DISCRIMINATOR)

    def _detect(self, image: np.ndarray) -> DetectionResult:
        with self._detector_lock:  # one load, and one forward at a time (torch threads are shared anyway)
            if self._detector is None:
                from .masks import bundle_detector

                self._detector = bundle_detector(self._bundle)
            return self._detector.detect(image)

    async def detect(self, image: np.ndarray) -> DetectionResult:
        """The bundle's overlay detector on an (H, W, 3) uint8 RGB photo, on the engine's thread pool. Raises
        InputError "no_detector" when the bundle has none, "bad_input" for a bad array."""
        if not self.has_detector:
            raise InputError(f"the opencv engine's bundle {self._bundle} has no overlay detector",
                             code=ErrorCode.NO_DETECTOR)
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._detect, image)
        finally:
            self._running -= 1


def make_engine(options: EngineOptions, on_batch: Callable[[str, int, float], None] | None = None) -> Engine:
    """The engine ``options.engine`` names (one of :data:`ENGINE_NAMES`), not started yet.

    ``on_batch(queue, size, seconds)`` is told about every micro-batch (torch engine). Raises BundleError
    early for a bundle path that is wrong.
    """
    if options.engine == "triton":
        from .triton_engine import TritonEngine

        return TritonEngine(options.triton_url, protocol=options.triton_protocol, timeout_s=options.triton_timeout_s,
                            retries=options.triton_retries, max_inflight=options.max_queue)
    if options.engine == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        if options.onnx_dir is None:
            raise InputError("the onnxruntime engine needs onnx_dir: a `cleanplate export onnx BUNDLE DIR` directory",
                             code=ErrorCode.BAD_OPTION)
        return OnnxRuntimeEngine(options.onnx_dir, options.bundle, threads=options.onnx_threads,
                                 max_batch=options.max_batch, window_ms=options.batch_window_ms,
                                 max_queue=options.max_queue, on_batch=on_batch)
    if options.engine == "opencv":
        dilate = 8
        if options.bundle is not None:
            from .bundle import read_config

            dilate = read_config(options.bundle).dilate_px
        return OpenCVEngine(radius=options.opencv_radius, resolution=options.opencv_resolution, dilate_px=dilate,
                            bundle=options.bundle)
    return TorchEngine(options.bundle, device=options.device, dtype=options.dtype, max_batch=options.max_batch,
                       window_ms=options.batch_window_ms, max_queue=options.max_queue,
                       torch_threads=options.torch_threads, on_batch=on_batch)
