"""The REST gateway (FastAPI): ``POST /v1/remove``, ``POST /v1/detect``, ``POST /v1/score``, health, readiness
and metrics.

Every error a client can cause is a 4xx ``application/problem+json`` body (RFC 9457) with a stable
``code``; limits are enforced before work is done: body size (413) and upload time (408) while the body
is read, pixel count from the image header (413), a bounded engine queue (429 + Retry-After), and a
per-request deadline (504). Use :func:`create_app` (tests, custom servers) or ``cleanplate serve``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from enum import Enum
from http import HTTPStatus
from typing import Annotated, Any

import numpy as np
from anyio import to_thread
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cleanplate import __version__, imaging
from cleanplate.admission import MemoryBudget, release_free_memory_soon, removal_cost
from cleanplate.engines import Engine, EngineUnavailable, make_engine
from cleanplate.errors import CleanplateError, ErrorCode, InputError, QueueFull
from cleanplate.masks import MaskSource, detect, detections_json, encode_mask, resolve_mask
from cleanplate.options import form_bounds
from cleanplate.removal import Outcome, RemoveOptions, run_removal, run_score

from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("cleanplate.serving")
PROBLEM = "application/problem+json"
ENDPOINTS = ("/v1/remove", "/v1/detect", "/v1/score", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


# The gateway's output_format: imaging.ImageFormat less TIFF (browsers do not show it; a TIFF input still
# gets a TIFF back by default).
OutputFormat = Enum("OutputFormat", {f.name: f.value for f in imaging.ImageFormat if f is not imaging.ImageFormat.tiff},
                    type=str)


class Problem(BaseModel):
    """RFC 9457 problem details, plus ``code`` (stable, for machines) and ``errors`` (validation details)."""

    type: str = Field(examples=["urn:cleanplate:problem:size_mismatch"])
    title: str = Field(examples=["Unprocessable Content"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["mask is 100x100 but the image is 600x400"])
    code: str = Field(examples=["size_mismatch"])
    instance: str = Field(examples=["/v1/remove"])
    errors: list[dict[str, Any]] | None = None


class Detection(BaseModel):
    """One overlay the detector found (a connected component of its mask)."""

    box: list[int] = Field(description="[x0, y0, x1, y1] in source px, x1/y1 exclusive", examples=[[40, 12, 220, 64]])
    kind: str = Field(description="text, watermark, badge or logo", examples=["text"])
    score: float = Field(description="mean overlay probability over the component, in [0, 1]")
    area: int = Field(description="component area in source px")


class DetectResult(BaseModel):
    """``POST /v1/detect`` with ``Accept: application/json``."""

    width: int
    height: int
    detections: list[Detection] = Field(description="largest first; [] for a clean photo")
    mask_pixels: int = Field(description="pixels in the mask (the union of the detections)")
    timings_ms: dict[str, float]


class RemoveResult(BaseModel):
    """``POST /v1/remove`` with ``Accept: application/json``."""

    image: str = Field(description="the cleaned image, base64 (same size and mode as the input)")
    media_type: str = Field(examples=["image/png"])
    width: int
    height: int
    score: float | None = Field(description="discriminator score in [0,1] of the returned attempt (gate on)")
    passed: bool | None = Field(description="score >= threshold (gate on)")
    threshold: float | None
    attempts: int = Field(description="model runs made (> 1 when the gate retried)")
    seed: int = Field(description="seed of the returned attempt")
    timings_ms: dict[str, float]
    mask_source: MaskSource = Field(description="where the mask came from: file (the mask part), alpha (the "
                                                "image's transparent pixels) or auto (the overlay detector)")
    mask: str | None = Field(None, description="with return_mask: the mask used, base64 PNG (white = removed)")
    detections: list[Detection] | None = Field(None, description="auto mask: what the detector found; [] means "
                                                                 "nothing, and the image is returned unchanged")


class ScoreResult(BaseModel):
    score: float = Field(description="discriminator score in [0,1]; higher = cleaner")
    threshold: float = Field(description="the pass threshold used (calibrated default or the request's)")
    passed: bool


def problem(code: ErrorCode, detail: str, instance: str = "", headers: dict[str, str] | None = None,
            errors: list[dict[str, Any]] | None = None, status: int | None = None) -> JSONResponse:
    """An RFC 9457 ``application/problem+json`` response; ``type`` is ``urn:cleanplate:problem:<code>``,
    the status ``code.http_status`` unless ``status`` is given (Starlette's own HTTP errors)."""
    status = code.http_status if status is None else status
    body = {"type": f"urn:cleanplate:problem:{code.value}", "title": HTTPStatus(status).phrase, "status": status,
            "detail": detail, "code": code.value, "instance": instance}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    # ``model`` puts Problem in the components (and, FastAPI's doing, under application/json); the bodies are
    # application/problem+json, so that is where the schema must be for clients and validators to see it.
    ref = {"$ref": "#/components/schemas/Problem"}
    return {s: {"model": Problem, "description": HTTPStatus(s).phrase, "content": {PROBLEM: {"schema": ref}}}
            for s in statuses}


# OpenAPI of the multipart fields. An upload must be a non-empty file: a 0-byte part is answered 400
# unreadable_image. ``format: binary`` beside FastAPI's contentMediaType tells OpenAPI 3.0 tools it is a file.
_FILE_PART = {"format": "binary", "minLength": 1}


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """Pop ``anyOf`` of an ``X | None`` field's schema; return the X branch."""
    (branch,) = [s for s in schema.pop("anyOf") if s != {"type": "null"}]
    return branch


def _omittable(schema: dict[str, Any]) -> None:
    """``json_schema_extra`` of an optional form field: a client sends it or leaves it out, but cannot send
    null (a part is text, and the text "null" is refused), so the null branch of ``X | None`` goes. An empty
    part counts as left out (FastAPI's rule for form fields, as HTML forms send empty inputs), so the document
    says so: the value, or the empty string."""
    empty = {"type": "string", "maxLength": 0, "description": "the same as leaving it out"}
    schema["anyOf"] = [_non_null(schema), empty]


def _omittable_file(schema: dict[str, Any]) -> None:
    schema.update(_non_null(schema))
    schema.update(_FILE_PART)


_RESULT_HEADERS = {
    "X-Cleanplate-Score": {"description": "discriminator score of the returned attempt (gate on)",
                           "schema": {"type": "number"}},
    "X-Cleanplate-Passed": {"description": "true/false (gate on)", "schema": {"type": "string"}},
    "X-Cleanplate-Attempts": {"description": "model runs made", "schema": {"type": "integer"}},
    "X-Cleanplate-Mask-Source": {"description": "file, alpha or auto (see mask_source)", "schema": {"type": "string"}},
    "X-Cleanplate-Detections": {"description": "auto mask: overlays the detector found (0: image returned unchanged)",
                                "schema": {"type": "integer"}},
    "Server-Timing": {"description": "per-stage time in ms (decode, detect, prepare, model, composite, gate, encode)",
                      "schema": {"type": "string"}},
}
_DETECT_HEADERS = {
    "X-Cleanplate-Detections": {"description": "overlays found", "schema": {"type": "integer"}},
    "Server-Timing": {"description": "per-stage time in ms (decode, detect, encode)", "schema": {"type": "string"}},
}


class Guard:
    """Pure-ASGI middleware in front of the routes: metrics, draining (503), API keys (401), content type
    (415), body size (413) and upload time (408) while buffering the body, and the deadline (504)."""

    def __init__(self, app: Callable, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings: Settings = self.state.settings
        metrics: Metrics = self.state.metrics
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 500, "started": False}

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        t0 = time.perf_counter()
        metrics.in_flight.inc()
        try:
            early = self._refuse(scope, path, settings)
            if early is not None:
                return await early(scope, receive, send_tracked)
            if path.startswith("/v1/") and scope["method"] == "POST":
                body = await self._read_body(scope, receive, settings)
                if isinstance(body, Response):
                    return await body(scope, receive, send_tracked)
                receive = _replay(body, receive)
            try:
                await asyncio.wait_for(self.app(scope, receive, send_tracked), settings.request_timeout_s)
            except asyncio.TimeoutError:
                if status["started"]:
                    raise
                detail = f"the request took longer than the {settings.request_timeout_s:g} s deadline"
                await problem(ErrorCode.DEADLINE, detail, path)(scope, receive, send_tracked)
        finally:
            metrics.in_flight.dec()
            code = str(status["code"])
            metrics.requests.labels(endpoint, code).inc()
            metrics.latency.labels(endpoint, code).observe(time.perf_counter() - t0)

    def _refuse(self, scope: dict, path: str, settings: Settings) -> Response | None:
        if self.state.draining and path not in ("/healthz", "/metrics"):
            return problem(ErrorCode.DRAINING, "the server is shutting down; retry on another replica", path,
                           headers={"Retry-After": "1", "Connection": "close"})
        if not path.startswith("/v1/"):
            return None
        if settings.api_keys and not _authorized(scope, settings):
            return problem(ErrorCode.UNAUTHORIZED, "a valid API key is required: Authorization: Bearer <key>", path,
                           headers={"WWW-Authenticate": 'Bearer realm="cleanplate"'})
        if scope["method"] == "POST":
            ctype = _header(scope, b"content-type").split(";")[0].strip().lower()
            if ctype != "multipart/form-data":
                return problem(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                               f"send multipart/form-data, not {ctype or 'no content type'}", path,
                               headers={"Accept-Post": "multipart/form-data"})
        return None

    async def _read_body(self, scope: dict, receive: Callable, settings: Settings) -> bytes | Response:
        path, limit = scope["path"], settings.max_upload_bytes
        too_large = problem(ErrorCode.TOO_LARGE, f"the request body is over the limit of {limit} bytes", path,
                            headers={"Connection": "close"})
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionAbortedError
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise OverflowError
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(read(), settings.body_timeout_s)
        except OverflowError:
            return too_large
        except asyncio.TimeoutError:
            return problem(ErrorCode.BODY_TIMEOUT,
                           f"the request body was not received within {settings.body_timeout_s:g} s", path,
                           headers={"Connection": "close"})
        except ConnectionAbortedError:
            return Response(status_code=499)  # nobody is listening; logged as client-closed
        return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as Starlette expects

    return replay


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def _authorized(scope: dict, settings: Settings) -> bool:
    scheme, _, token = _header(scope, b"authorization").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.strip().encode()
    # compare against every key (constant time each) so timing does not reveal which prefix matched
    return any([hmac.compare_digest(given, k.get_secret_value().encode()) for k in settings.api_keys])


def _output_format(requested: OutputFormat | None, decoded: imaging.DecodedImage) -> str:
    return requested.value if requested is not None else imaging.output_format(decoded)


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{k};dur={v:.1f}" for k, v in timings.items())


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The gateway app. ``engine`` defaults to the one ``settings`` name; it loads in the background at
    start-up (``/readyz`` says when it is ready). Raises BundleError early for a bundle path that is wrong."""
    settings = settings or Settings()
    metrics = Metrics()
    engine = engine or make_engine(settings, on_batch=metrics.observe_batch)

    budget = MemoryBudget(settings.memory_budget_bytes, max_waiting=settings.max_queue,
                          on_drain=release_free_memory_soon)
    metrics.memory_budget.set(budget.capacity)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        app.state.load_error = None

        async def load() -> None:
            try:
                await engine.start()
            except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log
                app.state.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("engine %s failed to load", engine.name)

        app.state.loader = asyncio.create_task(load())
        yield
        app.state.draining = True
        app.state.loader.cancel()
        await engine.close()

    app = FastAPI(title="cleanplate", version=__version__, lifespan=lifespan,
                  description="Removes promo text, watermarks, stickers and stray objects from product photos "
                              "(RORem-style 4-step diffusion remover with a discriminator quality gate).")
    app.state.settings, app.state.metrics, app.state.engine, app.state.budget = settings, metrics, engine, budget
    app.state.draining, app.state.load_error = False, None
    app.add_middleware(Guard, state=app.state)

    # -- errors -------------------------------------------------------------------------------------
    @app.exception_handler(CleanplateError)
    async def cleanplate_error(request: Request, exc: CleanplateError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
        if isinstance(exc, EngineUnavailable):
            headers = {"Retry-After": "5"}
        return problem(exc.code, str(exc), request.url.path, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query"))
        return problem(ErrorCode.INVALID_FIELD, f"{field}: {first['msg']}" if field else first["msg"],
                       request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: ErrorCode.BAD_MULTIPART, 404: ErrorCode.NOT_FOUND,
                405: ErrorCode.METHOD_NOT_ALLOWED}.get(exc.status_code, ErrorCode.HTTP_ERROR)
        return problem(code, str(exc.detail), request.url.path, dict(exc.headers or {}) or None,
                       status=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem(ErrorCode.INTERNAL, "internal error; it has been logged", request.url.path)

    # -- routes -------------------------------------------------------------------------------------
    async def read(upload: UploadFile | None, what: str) -> tuple[bytes, imaging.ImageHeader] | None:
        """An upload's bytes and header, checked against the pixel limit before anything is decoded."""
        if upload is None:
            return None
        data = await upload.read()
        if not data:
            raise InputError(f"{what} is empty (0 bytes)", code=ErrorCode.UNREADABLE_IMAGE)
        header = imaging.read_header(data)
        if header.pixels > settings.max_pixels:
            raise InputError(f"{what} is {header.width}x{header.height} = {header.pixels} pixels, over the limit "
                             f"of {settings.max_pixels}", code=ErrorCode.TOO_MANY_PIXELS)
        return data, header

    @asynccontextmanager
    async def admitted(image: tuple[bytes, imaging.ImageHeader], *others: tuple[bytes, imaging.ImageHeader] | None):
        """Hold the request's working memory (cutting the image's :func:`removal_cost` from the budget) until
        the response is made; waits behind earlier requests while the budget is spent."""
        extra = tuple(o[1] for o in others if o is not None)
        cost = removal_cost(image[1], extra_images=extra,
                            encoded_bytes=len(image[0]) + sum(len(o[0]) for o in others if o is not None))
        metrics.admission_waiting.set(budget.waiting + 1)
        try:
            async with budget.reserve(cost):
                metrics.memory_reserved.set(budget.in_use)
                metrics.admission_waiting.set(budget.waiting)
                yield
        finally:
            metrics.memory_reserved.set(budget.in_use)
            metrics.admission_waiting.set(budget.waiting)

    async def decode(upload: tuple[bytes, imaging.ImageHeader]) -> imaging.DecodedImage:
        return await to_thread.run_sync(lambda: imaging.decode_image(upload[0], max_pixels=settings.max_pixels))

    def check_ready() -> None:
        if not engine.ready():
            detail = app.state.load_error or "the model is still loading"
            raise EngineUnavailable(f"engine {engine.name} is not ready: {detail}")

    @app.post(
        "/v1/remove", response_model=None, summary="Remove the masked region from a photo",
        responses={200: {"model": RemoveResult, "headers": _RESULT_HEADERS,
                         "description": "the cleaned image (same size and mode as the input) or, with "
                                        "Accept: application/json, a JSON body",
                         "content": {m: {"schema": {"type": "string", "format": "binary"}}
                                     for m in imaging.MEDIA_TYPES.values()}},
                   **_problem_responses(400, 401, 408, 413, 415, 422, 429, 503, 504)},
    )
    async def remove(
        request: Request,
        image: Annotated[UploadFile, File(description="the photo (PNG, JPEG, WEBP, TIFF, ...)",
                                          json_schema_extra=_FILE_PART)],
        mask: Annotated[UploadFile | None, File(description="mask, white = remove; omit to use the image's "
                                                             "transparent pixels, or (without any) the overlay "
                                                             "detector's mask (auto_mask)",
                                                json_schema_extra=_omittable_file)] = None,
        # Ranges and descriptions: cleanplate.options.RemovalOptions. max_attempts' upper bound is the
        # max_attempts_limit setting (checked below).
        dilate_px: Annotated[int | None, Form(**form_bounds("dilate_px"), json_schema_extra=_omittable)] = None,
        steps: Annotated[int | None, Form(**form_bounds("steps"), json_schema_extra=_omittable)] = None,
        seed: Annotated[int, Form(**form_bounds("seed"))] = 0,
        quality_gate: Annotated[bool | None, Form(**form_bounds("quality_gate"), json_schema_extra=_omittable)] = None,
        threshold: Annotated[float | None, Form(**form_bounds("threshold"), json_schema_extra=_omittable)] = None,
        max_attempts: Annotated[int | None, Form(**form_bounds("max_attempts", upper=False),
                                                 json_schema_extra=_omittable)] = None,
        output_format: Annotated[OutputFormat | None, Form(description="default: the input's format",
                                                           json_schema_extra=_omittable)] = None,
        auto_mask: Annotated[bool, Form(description="with no mask part and no transparent pixels, remove what the "
                                                    "overlay detector finds (promo text, watermarks, badges, logos; "
                                                    "nothing found: the image comes back unchanged); false: 422 "
                                                    "no_alpha instead")] = True,
        return_mask: Annotated[bool, Form(description="answer with the JSON body (as Accept: application/json) "
                                                      "carrying the mask used as a base64 PNG")] = False,
    ) -> Response:
        check_ready()
        attempts = settings.max_attempts if max_attempts is None else max_attempts
        if attempts > settings.max_attempts_limit:
            raise InputError(f"max_attempts: at most {settings.max_attempts_limit}", code=ErrorCode.INVALID_FIELD)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        image_upload, mask_upload = await read(image, "image"), await read(mask, "mask")
        async with admitted(image_upload, mask_upload):
            decoded = await decode(image_upload)
            given = None
            if mask_upload is not None:
                given = await to_thread.run_sync(imaging.binarize_mask, await decode(mask_upload))
            del image_upload, mask_upload  # the encoded bytes are not needed past decode
            timings["decode"] = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            used = await resolve_mask(engine, decoded, given, auto=auto_mask)  # the rule: cleanplate.masks
            del given
            if used.source is MaskSource.auto:
                timings["detect"] = (time.perf_counter() - t1) * 1000
            opts = RemoveOptions(dilate_px=dilate_px, steps=steps, seed=seed, threshold=threshold, max_attempts=attempts,
                                 quality_gate=settings.quality_gate if quality_gate is None else quality_gate)
            if used.nothing_found:
                outcome = Outcome.unchanged(decoded, seed)
            else:
                outcome = await run_removal(engine, decoded, used.mask, opts)
            timings.update(outcome.timings_ms)
            fmt = _output_format(output_format, decoded)
            t1 = time.perf_counter()
            # A mask given as transparency is filled in, so the result is opaque.
            data = await to_thread.run_sync(functools.partial(
                imaging.encode_image, outcome.pixels, decoded, fmt=fmt,
                alpha=None if used.source is MaskSource.alpha else "keep"))
            mask_png = await to_thread.run_sync(encode_mask, used.mask) if return_mask else None
            width, height = decoded.width, decoded.height
            del decoded, outcome.pixels
        timings["encode"] = (time.perf_counter() - t1) * 1000
        timings["total"] = (time.perf_counter() - t0) * 1000
        for stage, ms in timings.items():
            if stage != "total":
                metrics.stage.labels(stage).observe(ms / 1000)
        if outcome.passed is not None:
            metrics.observe_gate(outcome.passed, outcome.attempts)
        metrics.queue_depth.set(engine.queue_depth())
        headers = {"X-Cleanplate-Attempts": str(outcome.attempts), "Server-Timing": _server_timing(timings),
                   "X-Cleanplate-Mask-Source": used.source.value}
        if used.detections is not None:
            headers["X-Cleanplate-Detections"] = str(len(used.detections))
        if outcome.score is not None:
            headers.update({"X-Cleanplate-Score": f"{outcome.score:.6f}",
                            "X-Cleanplate-Passed": str(outcome.passed).lower(),
                            "X-Cleanplate-Threshold": f"{outcome.threshold:.6f}"})
        if return_mask or "application/json" in request.headers.get("accept", ""):
            body = RemoveResult(image=base64.b64encode(data).decode(), media_type=imaging.MEDIA_TYPES[fmt],
                                width=width, height=height, score=outcome.score,
                                passed=outcome.passed, threshold=outcome.threshold, attempts=outcome.attempts,
                                seed=outcome.seed,
                                timings_ms={k: round(v, 2) for k, v in timings.items()}, mask_source=used.source,
                                mask=None if mask_png is None else base64.b64encode(mask_png).decode(),
                                detections=None if used.detections is None else detections_json(used.detections))
            return JSONResponse(body.model_dump(mode="json"), headers=headers)
        return Response(data, media_type=imaging.MEDIA_TYPES[fmt], headers=headers)

    @app.post(
        "/v1/detect", response_model=None, summary="Find the overlays a storefront added (auto-mask)",
        responses={200: {"model": DetectResult, "headers": _DETECT_HEADERS,
                         "description": "the removal mask as a PNG (same size as the photo, white = overlay) or, "
                                        "with Accept: application/json, the detections",
                         "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                   **_problem_responses(400, 401, 408, 413, 415, 422, 429, 503, 504)},
    )
    async def detect_overlays(
        request: Request,
        image: Annotated[UploadFile, File(description="the photo (PNG, JPEG, WEBP, TIFF, ...)",
                                          json_schema_extra=_FILE_PART)],
    ) -> Response:
        check_ready()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        upload = await read(image, "image")
        async with admitted(upload):
            decoded = await decode(upload)
            del upload
            timings["decode"] = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            found = await detect(engine, decoded)
            timings["detect"] = (time.perf_counter() - t1) * 1000
            width, height = decoded.width, decoded.height
            del decoded
            as_json = "application/json" in request.headers.get("accept", "")
            t1 = time.perf_counter()
            data = None if as_json else await to_thread.run_sync(encode_mask, found.mask)
            timings["encode"] = (time.perf_counter() - t1) * 1000
            mask_pixels = int(np.count_nonzero(found.mask))
        timings["total"] = (time.perf_counter() - t0) * 1000
        for stage, ms in timings.items():
            if stage != "total":
                metrics.stage.labels(stage).observe(ms / 1000)
        headers = {"X-Cleanplate-Detections": str(len(found.detections)), "Server-Timing": _server_timing(timings)}
        if as_json:
            body = DetectResult(width=width, height=height, detections=detections_json(found.detections),
                                mask_pixels=mask_pixels, timings_ms={k: round(v, 2) for k, v in timings.items()})
            return JSONResponse(body.model_dump(), headers=headers)
        return Response(data, media_type="image/png", headers=headers)

    @app.post("/v1/score", response_model=ScoreResult, summary="Score a finished removal with the discriminator",
              responses=_problem_responses(400, 401, 408, 413, 415, 422, 429, 503, 504))
    async def score(
        source: Annotated[UploadFile, File(description="the photo before removal", json_schema_extra=_FILE_PART)],
        result: Annotated[UploadFile, File(description="the photo after removal (same size)",
                                           json_schema_extra=_FILE_PART)],
        mask: Annotated[UploadFile, File(description="the removal's mask, white = removed",
                                         json_schema_extra=_FILE_PART)],
        dilate_px: Annotated[int | None, Form(**form_bounds("dilate_px"), json_schema_extra=_omittable)] = None,
        threshold: Annotated[float | None, Form(**{**form_bounds("threshold"),
                                                   "description": "pass threshold (default: calibrated)"},
                                                json_schema_extra=_omittable)] = None,
    ) -> ScoreResult:
        check_ready()
        uploads = [await read(part, what) for part, what in ((source, "source"), (result, "result"), (mask, "mask"))]
        async with admitted(*uploads):
            src, res = await decode(uploads[0]), await decode(uploads[1])
            mask_array = await to_thread.run_sync(imaging.binarize_mask, await decode(uploads[2]))
            value = await run_score(engine, src, res, mask_array, dilate_px)
        limit = engine.threshold if threshold is None else threshold
        return ScoreResult(score=value, threshold=limit, passed=value >= limit)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model loaded and engine reachable",
             responses=_problem_responses(503))
    async def readyz() -> dict[str, Any]:
        check_ready()
        metrics.ready.set(1)
        return {"status": "ready", "engine": engine.name, "resolution": engine.resolution,
                "quality_gate": engine.threshold is not None, "threshold": engine.threshold,
                "detector": bool(getattr(engine, "has_detector", False))}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain; version=0.0.4": {}}}})
    async def prometheus() -> Response:
        metrics.queue_depth.set(engine.queue_depth())
        metrics.ready.set(int(engine.ready()))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

