"""The ``triton`` engine: removals and scores run by a Triton Inference Server holding the repository that
``cleanplate export triton`` writes (its ``cleanplate_remove`` and ``cleanplate_score`` BLS models).

The gateway keeps the pre/post-processing (decode, dilate, crop, paste-back, encode); each request
sends one model crop and Triton's dynamic batcher makes the batches. The bundle facts the gateway
needs (resolution, default steps and dilation, gate threshold) come from the BLS models' config
``parameters``, so the gateway holds no weights.

Errors: Triton unreachable or not ready -> :class:`EngineUnavailable` (503), after ``retries`` retries
with exponential backoff on transient failures (UNAVAILABLE, connection refused or reset); Triton's
queue full or this engine's ``max_inflight`` reached -> :class:`QueueFull` (429); a call past
``timeout_s`` -> :class:`EngineUnavailable`. Readiness (``/readyz``) follows a health check every
``health_interval_s``; when Triton comes back after an outage its parameters are read again
(a rolled-out repository may have a new resolution or threshold).

The overlay detector (:meth:`TritonEngine.detect`, when the repository has the ``detector`` model): the
gateway runs :meth:`cleanplate.detector.Detector.preprocess` and :meth:`~cleanplate.detector.Detector.postprocess`
with the ``detector_config`` parameter of that model, and Triton the network, so the mask is the torch engine's.
A maskless removal is therefore two calls (detect, then remove): ``cleanplate_remove`` takes the model crop the
gateway cuts around the mask.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .engines import EngineUnavailable
from .errors import ErrorCode, InputError, QueueFull
from .masked_source import CLASSICAL_FILLS

if TYPE_CHECKING:
    from .detector import DetectionResult

log = logging.getLogger("cleanplate.triton")
# as cleanplate.export.triton
REMOVE_MODEL, SCORE_MODEL, DETECTOR_MODEL = "cleanplate_remove", "cleanplate_score", "detector"


class TritonEngine:
    """Client of a Triton server; implements :class:`cleanplate.engines.Engine`.

    Args:
        url: ``host:port`` of Triton's gRPC (default 8001) or HTTP (8000) endpoint.
        protocol: "grpc" or "http" (tritonclient's asyncio clients).
        timeout_s: per Triton call, seconds.
        retries: extra attempts on transient errors (0 = none).
        max_inflight: calls this gateway keeps open at once before answering 429.
        health_interval_s: seconds between readiness checks.

    ``has_detector`` is whether the repository's ``detector_model`` was ready when the parameters were read.
    """

    name = "triton"

    def __init__(self, url: str = "127.0.0.1:8001", *, protocol: Literal["grpc", "http"] = "grpc",
                 remove_model: str = REMOVE_MODEL, score_model: str = SCORE_MODEL,
                 detector_model: str = DETECTOR_MODEL, timeout_s: float = 30.0,
                 retries: int = 2, max_inflight: int = 64, health_interval_s: float = 2.0) -> None:
        if protocol not in ("grpc", "http"):
            raise InputError(f"triton protocol must be grpc or http, got {protocol!r}", code=ErrorCode.BAD_OPTION)
        self.url, self.protocol = url, protocol
        self.remove_model, self.score_model, self.detector_model = remove_model, score_model, detector_model
        self.timeout_s, self.retries, self.max_inflight = timeout_s, retries, max_inflight
        self.health_interval_s = health_interval_s
        self.resolution, self.default_dilate_px, self.default_steps = 0, 0, 4
        self.threshold: float | None = None
        self.paste_prefill: str | None = None
        self.buckets: list[int] = []
        self.has_detector = False
        self._detector: Any = None  # cleanplate.detector.DetectorIO of the repository's detector_config
        self._client: Any = None
        self._mod: Any = None
        self._configured = False
        self._healthy = False
        self._inflight = 0
        self._watcher: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, wait until Triton and the BLS models are ready, read their parameters, then keep
        checking health in the background. Retries forever (the gateway's /readyz says 503 meanwhile)."""
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as mod
        else:
            import tritonclient.http.aio as mod
        self._mod = mod
        self._client = mod.InferenceServerClient(self.url)
        delay = 0.25
        while not self._configured:
            try:
                await self._configure()
            except Exception as exc:  # noqa: BLE001 - any failure here means "not there yet"
                log.info("waiting for Triton at %s: %s", self.url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._healthy = True
        self._watcher = asyncio.create_task(self._watch())

    async def _configure(self) -> None:
        if not await self._client.is_model_ready(self.remove_model):
            raise EngineUnavailable(f"model {self.remove_model} is not ready")
        params = await self._parameters(self.remove_model)
        self.resolution = int(params["resolution"])
        self.buckets = [int(r) for r in params.get("buckets", str(self.resolution)).split(",")]
        self.default_steps = int(params["default_steps"])
        self.default_dilate_px = int(params["dilate_px"])
        residual = params.get("decode_residual", "0") == "1"
        fill = params.get("masked_source", "zero")
        self.paste_prefill = fill if residual and fill in CLASSICAL_FILLS else None
        self.threshold = None
        if "threshold" in params and await self._client.is_model_ready(self.score_model):
            self.threshold = float(params["threshold"])
        self._detector = await self._detector_of_repository()
        self.has_detector = self._detector is not None
        self._configured = True

    async def _detector_of_repository(self) -> Any:
        """The :class:`~cleanplate.detector.DetectorIO` of the detector model's ``detector_config``, or None
        when the repository has no ready detector model."""
        from .detector import DetectorConfig, DetectorIO

        try:
            if not await self._client.is_model_ready(self.detector_model):
                return None
        except Exception:  # noqa: BLE001 - Triton answers a model it does not know with an error, not False
            return None
        params = await self._parameters(self.detector_model)
        return DetectorIO(DetectorConfig.model_validate_json(params["detector_config"]))

    async def _parameters(self, model: str) -> dict[str, str]:
        config = await self._client.get_model_config(model, as_json=True) if self.protocol == "grpc" \
            else await self._client.get_model_config(model)
        config = config.get("config", config)
        return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                ok = bool(await self._client.is_model_ready(self.remove_model))
                if ok and not self._healthy:  # back after an outage, maybe with a new repository: re-read it
                    await self._configure()
                self._healthy = ok
            except Exception:  # noqa: BLE001 - unreachable counts as not ready
                self._healthy = False

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._client is not None:
            await self._client.close()

    def ready(self) -> bool:
        return self._configured and self._healthy

    def queue_depth(self) -> int:
        return self._inflight

    # -- calls ------------------------------------------------------------------------------------------
    def _input(self, name: str, value: np.ndarray, datatype: str) -> Any:
        tensor = self._mod.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(value))
        return tensor

    async def _infer(self, model: str, inputs: list[Any], output: str) -> np.ndarray:
        if not self._configured:
            raise EngineUnavailable("Triton is not connected yet")
        if self._inflight >= self.max_inflight:
            raise QueueFull(f"{self._inflight} removals are already waiting for Triton", retry_after_s=1)
        outputs = [self._mod.InferRequestedOutput(output)]
        self._inflight += 1
        try:
            for attempt in range(self.retries + 1):
                try:
                    if self.protocol == "grpc":
                        result = await self._client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s)
                    else:  # the HTTP client's ``timeout`` is a server-side hint in µs; bound the call here
                        result = await asyncio.wait_for(self._client.infer(model, inputs, outputs=outputs),
                                                        self.timeout_s)
                    return result.as_numpy(output)
                except Exception as exc:  # noqa: BLE001 - classified below
                    kind = self._classify(exc)
                    if kind == "queue_full":
                        raise QueueFull(f"Triton's queue for {model} is full", retry_after_s=1) from exc
                    if kind == "timeout":
                        raise EngineUnavailable(f"Triton did not answer {model} within {self.timeout_s:g} s") from exc
                    if kind == "transient" and attempt < self.retries:
                        await asyncio.sleep(0.1 * 2 ** attempt)
                        continue
                    if kind == "transient":
                        self._healthy = False
                        raise EngineUnavailable(f"Triton at {self.url} is unavailable: {exc}") from exc
                    if kind == "invalid":
                        raise InputError(f"Triton refused the request to {model}: {_message(exc)}",
                                         code=ErrorCode.BAD_OPTION) from exc
                    raise
            raise AssertionError("unreachable")
        finally:
            self._inflight -= 1

    @staticmethod
    def _classify(exc: Exception) -> str:
        """"queue_full" | "timeout" | "transient" | "invalid" | "fatal" for an exception from tritonclient or the
        transport. "invalid" is the model's own verdict on the request (gRPC INVALID_ARGUMENT, HTTP 400)."""
        text = str(exc).lower()
        status = ""
        with contextlib.suppress(Exception):
            status = str(exc.status() or "").lower()  # type: ignore[attr-defined]
        if "invalid_argument" in status or status == "400":
            return "invalid"
        if "queue size" in text or "exceeds maximum queue" in text:
            return "queue_full"
        if "deadline" in status or "deadline" in text or isinstance(exc, asyncio.TimeoutError):
            return "timeout"
        if "unavailable" in status or status in ("502", "503", "504") or isinstance(exc, (ConnectionError, OSError)) \
                or "connect" in text or "unavailable" in text:
            return "transient"
        return "fatal"

    def _check(self, crop: np.ndarray, mask: np.ndarray) -> None:
        r = self.resolution
        if crop.shape != (r, r, 3) or crop.dtype != np.uint8 or mask.shape != (r, r):
            raise InputError(f"triton engine needs ({r},{r},3) uint8 crops and ({r},{r}) masks, got {crop.shape} "
                             f"{crop.dtype} and {mask.shape}", code=ErrorCode.BAD_OPTION)

    async def inpaint(self, crop: np.ndarray, mask: np.ndarray, *, seed: int, steps: int) -> np.ndarray:
        self._check(crop, mask)
        inputs = [self._input("image", crop[None], "UINT8"), self._input("mask", mask[None].astype(np.uint8), "UINT8"),
                  self._input("seed", np.array([[seed]], np.int64), "INT64"),
                  self._input("steps", np.array([[steps]], np.int32), "INT32")]
        return (await self._infer(self.remove_model, inputs, "result"))[0]

    async def score(self, source: np.ndarray, result: np.ndarray, mask: np.ndarray) -> float:
        if self.threshold is None:
            raise InputError("this Triton repository has no discriminator, so the quality gate and scoring are "
                             "unavailable", code=ErrorCode.NO_DISCRIMINATOR)
        self._check(source, mask)
        self._check(result, mask)
        inputs = [self._input("source", source[None], "UINT8"), self._input("result", result[None], "UINT8"),
                  self._input("mask", mask[None].astype(np.uint8), "UINT8")]
        return float((await self._infer(self.score_model, inputs, "score")).reshape(-1)[0])


    async def detect(self, image: np.ndarray) -> DetectionResult:
        """The repository's overlay detector on an (H, W, 3) uint8 RGB photo: (H, W) uint8 {0, 255} mask and
        detections, as :meth:`cleanplate.detector.Detector.detect`. Pre- and postprocessing run here on a worker
        thread; the ``detector`` model gets (1, 3, h', w') FP32 ``image`` and answers (1, 1+K, h', w') ``logits``.

        Raises InputError "no_detector" when the repository has no detector model, "bad_input" for a bad array;
        EngineUnavailable / QueueFull as every call.
        """
        if not self._configured:
            raise EngineUnavailable("Triton is not connected yet")
        if self._detector is None:
            raise InputError(f"the Triton repository at {self.url} has no {self.detector_model} model (export a "
                             "bundle with an overlay detector)", code=ErrorCode.NO_DETECTOR)
        detector, loop = self._detector, asyncio.get_running_loop()
        x, working = await loop.run_in_executor(None, detector.preprocess, image)
        logits = await self._infer(self.detector_model, [self._input("image", x, "FP32")], "logits")
        return await loop.run_in_executor(None, detector.postprocess, logits[0], working, np.shape(image)[:2])


def _message(exc: Exception) -> str:
    """tritonclient's message without its status prefix."""
    with contextlib.suppress(Exception):
        return str(exc.message())  # type: ignore[attr-defined]
    return str(exc)
