"""Where a batch item is removed: an engine in this process (:class:`InProcessBackend`) or a running gateway
(:class:`GatewayBackend`, with retries), behind one :class:`Backend` protocol."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import imaging, masks, storage
from ..admission import removal_cost
from ..errors import BatchAborted, ErrorCode, GatewayError, InputError, QueueFull
from ..masks import MaskSource
from .items import BatchItem, ItemOptions, MaskChannel

log = logging.getLogger("cleanplate.batch")



# -- backends ------------------------------------------------------------------------------------------
@dataclass
class Inferred:
    """What the engine made of one item: either native ``pixels`` ((H,W,C), the input's dtype) or already
    ``encoded`` image bytes (``media_type``), plus the gate's view and per-stage times in ms."""

    pixels: np.ndarray | None
    encoded: bytes | None
    media_type: str | None
    score: float | None
    passed: bool | None
    threshold: float | None
    attempts: int
    seed: int
    width: int
    height: int
    timings_ms: dict[str, float]
    mask_source: str | None = None  # file, alpha or auto (cleanplate.masks.MaskSource)
    detections: int | None = None  # auto mask: overlays found (0: the output is the input, unchanged)
    mask_png: bytes | None = None  # auto mask: the mask used, PNG, for the review folder


class Backend(Protocol):
    """Where the removal runs. ``cost`` (bytes an item holds in this process, from headers; see
    :mod:`cleanplate.admission`), ``load`` and ``finish`` are called on worker threads, ``infer`` on the
    event loop (it must not block). ``has_gate`` is known after :meth:`start`."""

    name: str
    has_gate: bool

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def cost(self, item: BatchItem, mask_channel: MaskChannel) -> int: ...
    def load(self, item: BatchItem, mask_channel: MaskChannel) -> Any: ...
    async def infer(self, item: BatchItem, loaded: Any, opts: ItemOptions) -> Inferred: ...
    def finish(self, item: BatchItem, loaded: Any, inferred: Inferred) -> bytes: ...


_HEAD_BYTES = 1 << 20  # enough of a URL's object for its image header (EXIF and ICC included)


def _readable(loc: storage.Loc) -> Path | bytes:
    """What :mod:`cleanplate.imaging` decodes: a local path itself (its messages name the file), or the
    bytes of a URL's object.

    Raises:
        InputError: "unreadable_image" when the object cannot be read.
    """
    if isinstance(loc, Path):
        return loc
    try:
        return storage.read_bytes(loc)
    except OSError as exc:
        raise InputError(f"cannot read {loc!r}: {type(exc).__name__}: {exc}", code=ErrorCode.UNREADABLE_IMAGE) from exc


def _header(loc: storage.Loc) -> imaging.ImageHeader:
    """An image's header: a local file's own, a URL's from its first MiB (the whole object if that is short)."""
    if isinstance(loc, Path):
        return imaging.read_header(loc)
    try:
        head = storage.read_head(loc, _HEAD_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read {loc!r}: {type(exc).__name__}: {exc}", code=ErrorCode.UNREADABLE_IMAGE) from exc
    try:
        return imaging.read_header(head)
    except InputError:
        if len(head) < _HEAD_BYTES:
            raise
        return imaging.read_header(_readable(loc))


def _mask_file(item: BatchItem, channel: MaskChannel) -> np.ndarray | None:
    """(H,W) bool mask of an item's mask file (its luma, or its alpha), or None without one."""
    if item.mask is None:
        return None
    if channel == "luma":
        return imaging.decode_mask(_readable(item.mask))
    return _alpha_mask(item.mask)


def _alpha_mask(path: storage.Loc) -> np.ndarray:
    """(H,W) bool, True where a mask file's alpha is >= 50% (``--mask-channel alpha``)."""
    decoded = imaging.decode_image(_readable(path))
    if decoded.alpha is None:
        raise InputError(f"mask {path} has no alpha channel (--mask-channel alpha)", code=ErrorCode.NO_ALPHA)
    return decoded.alpha >= (int(np.iinfo(decoded.alpha.dtype).max) + 1) // 2


def _file_size(path: storage.Loc | None) -> int:
    return 0 if path is None else (storage.size(path) or 0)  # unreadable: load() reports it


@dataclass
class _Loaded:
    image: imaging.DecodedImage
    mask: np.ndarray | None  # None: the engine's detector makes it (MaskSource.auto)
    source: MaskSource


class InProcessBackend:
    """An engine in this process (``torch`` or ``opencv`` from :func:`cleanplate.engines.make_engine`);
    each item goes through :func:`cleanplate.removal.run_removal`, the gateway's own removal and
    quality gate, so results equal the gateway's for the same options."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.name = engine.name
        self.has_gate = False

    async def start(self) -> None:
        await self.engine.start()
        self.has_gate = self.engine.threshold is not None

    async def close(self) -> None:
        await self.engine.close()

    def cost(self, item: BatchItem, mask_channel: MaskChannel) -> int:
        """The removal's :func:`~cleanplate.admission.removal_cost` from the image's and the mask's headers."""
        masks = () if item.mask is None else (_header(item.mask),)
        return removal_cost(_header(item.image), extra_images=masks,
                            encoded_bytes=_file_size(item.image) + _file_size(item.mask))

    def load(self, item: BatchItem, mask_channel: MaskChannel) -> _Loaded:
        return load_item(item, mask_channel)

    async def infer(self, item: BatchItem, loaded: _Loaded, opts: ItemOptions) -> Inferred:
        from ..removal import Outcome, RemoveOptions, run_removal

        ropts = RemoveOptions(dilate_px=opts.dilate_px, steps=opts.steps, seed=opts.seed or 0,
                              quality_gate=bool(opts.quality_gate), threshold=opts.threshold,
                              max_attempts=opts.max_attempts or 1)
        mask, detections, mask_png, t0 = loaded.mask, None, None, time.perf_counter()
        if mask is None:
            found = await self._retrying(lambda: masks.detect(self.engine, loaded.image))
            mask, detections = masks.auto_mask_of(found), len(found.detections)
            mask_png = await asyncio.to_thread(masks.encode_mask, mask)
        t_detect = (time.perf_counter() - t0) * 1000
        if detections == 0:
            out = Outcome.unchanged(loaded.image, ropts.seed)
        else:
            out = await self._retrying(lambda: run_removal(self.engine, loaded.image, mask, ropts))
        timings = dict(out.timings_ms)
        if loaded.source is MaskSource.auto:
            timings = {"detect": t_detect, **timings}
        return Inferred(out.pixels, None, None, out.score, out.passed, out.threshold, out.attempts, out.seed,
                        loaded.image.width, loaded.image.height, timings, loaded.source.value, detections, mask_png)

    async def _retrying(self, call: Any) -> Any:
        while True:
            try:
                return await call()
            except QueueFull as exc:  # only if the engine's queue is smaller than the concurrency
                await asyncio.sleep(min(exc.retry_after_s, 5))

    def finish(self, item: BatchItem, loaded: _Loaded, inferred: Inferred) -> bytes:
        return encode_item(item, loaded, inferred)


def load_item(item: BatchItem, mask_channel: MaskChannel) -> _Loaded:
    """Decode an item's image and its (H,W) bool mask, chosen by :func:`cleanplate.masks.choose_mask` (an
    in-process engine's input; the Ray runner's decode stage). An auto mask is left to :meth:`InProcessBackend.infer`
    (the engine's detector).

    Raises:
        InputError: as :func:`cleanplate.imaging.decode_image` ("unreadable_image", ...), "no_alpha".
    """
    image = imaging.decode_image(_readable(item.image))
    choice = masks.choose_mask(image, _mask_file(item, mask_channel), auto=item.auto_mask)
    return _Loaded(image, choice.mask, choice.source)


def encode_item(item: BatchItem, loaded: _Loaded, inferred: Inferred) -> bytes:
    """The output file's bytes: the engine's pixels in the item's format, with the input's metadata
    (:func:`cleanplate.imaging.encode_image`)."""
    assert inferred.pixels is not None
    # A mask given as transparency is filled in, so the result is opaque (as `cleanplate remove`).
    return imaging.encode_image(inferred.pixels, loaded.image, fmt=item.fmt,
                                alpha=None if loaded.source is MaskSource.alpha else "keep")




def _sniff(raw: bytes) -> str | None:
    if raw.startswith(b"\x89PNG"):
        return "png"
    if raw.startswith(b"\xff\xd8"):
        return "jpeg"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    if raw[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


@dataclass
class _Upload:
    image: bytes
    mask: bytes | None
    fmt_field: str | None  # output_format to ask for (None: the input's, which is what we want)


class GatewayBackend:
    """A running ``cleanplate serve`` (``POST /v1/remove`` with ``Accept: application/json``).

    429 (queue full) and 503 (loading, draining) are retried after the server's Retry-After, connection
    failures with exponential backoff (0.5 s doubling to 30 s, with jitter), for up to ``max_wait_s`` per
    item; then the item is an error ("gateway_busy", "gateway_unreachable"). Other 4xx/5xx answers are
    the item's error with the gateway's problem ``code`` ("gateway_error" when this client does not know it,
    the code then in the message). 401/403 abort the run (:class:`BatchAborted`).

    Args:
        url: base URL ("http://host:8080"); api_key: sent as ``Authorization: Bearer``;
        concurrency: connection pool size; timeout_s: one request's limit (s);
        transport: an httpx transport (tests).
    """

    def __init__(self, url: str, *, api_key: str | None = None, concurrency: int = 4, timeout_s: float = 300.0,
                 max_wait_s: float = 600.0, ready_timeout_s: float = 120.0, transport: Any = None) -> None:
        self.url, self.api_key, self.concurrency = url.rstrip("/"), api_key, concurrency
        self.timeout_s, self.max_wait_s, self.ready_timeout_s = timeout_s, max_wait_s, ready_timeout_s
        self.transport = transport
        self.name = f"gateway {self.url}"
        self.has_gate = False
        self.client: Any = None

    async def start(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=self.timeout_s, limits=limits,
                                        transport=self.transport)
        deadline = time.monotonic() + self.ready_timeout_s
        last = ""
        while True:
            try:
                r = await self.client.get("/readyz")
                if r.status_code == 200:
                    body = r.json()
                    self.has_gate = bool(body.get("quality_gate"))
                    self.name = f"gateway {self.url} ({body.get('engine', '?')})"
                    return
                last = f"/readyz answered {r.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                await self.client.aclose()
                raise InputError(f"the gateway at {self.url} is not ready after {self.ready_timeout_s:g} s ({last})",
                                 code=ErrorCode.GATEWAY_UNREACHABLE)
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def cost(self, item: BatchItem, mask_channel: MaskChannel) -> int:
        """The files and the response held here; the gateway decodes (under its own budget). An alpha
        mask is decoded here to be sent as luma."""
        alpha_mask = item.mask is not None and mask_channel == "alpha"
        decoded = removal_cost(_header(item.mask)) if alpha_mask else 0
        return 2 * (_file_size(item.image) + _file_size(item.mask)) + decoded

    def load(self, item: BatchItem, mask_channel: MaskChannel) -> _Upload:
        try:
            raw = storage.read_bytes(item.image)
        except OSError as exc:
            raise InputError(f"cannot read image {str(item.image)!r}: {exc.strerror or exc}",
                             code=ErrorCode.UNREADABLE_IMAGE) from exc
        mask = None
        if item.mask is not None:
            if mask_channel == "alpha":  # the gateway reads luma; send the alpha as a white-on-black PNG
                mask = masks.encode_mask(_alpha_mask(item.mask))
            else:
                try:
                    mask = storage.read_bytes(item.mask)
                except OSError as exc:
                    raise InputError(f"cannot read mask {str(item.mask)!r}: {exc.strerror or exc}",
                                     code=ErrorCode.UNREADABLE_IMAGE) from exc
        fmt = item.fmt
        # The gateway writes png/jpeg/webp on request, and the input's own format by default (TIFF included).
        fmt_field = None if _sniff(raw) == fmt else (fmt if fmt != "tiff" else "png")
        return _Upload(raw, mask, fmt_field)

    async def infer(self, item: BatchItem, loaded: _Upload, opts: ItemOptions) -> Inferred:
        import base64

        import httpx

        data: dict[str, str] = {"seed": str(opts.seed or 0), "quality_gate": str(bool(opts.quality_gate)).lower(),
                                "auto_mask": str(item.auto_mask).lower()}
        if item.auto_mask and loaded.mask is None:  # the review folder keeps an auto mask
            data["return_mask"] = "true"
        for name in ("steps", "dilate_px", "threshold"):
            if getattr(opts, name) is not None:
                data[name] = str(getattr(opts, name))
        if opts.quality_gate and opts.max_attempts is not None:
            data["max_attempts"] = str(opts.max_attempts)
        if loaded.fmt_field:
            data["output_format"] = loaded.fmt_field
        files = {"image": (storage.name(item.image), loaded.image)}
        if loaded.mask is not None:
            files["mask"] = ("mask.png", loaded.mask)
        t0 = time.monotonic()
        backoff = 0.5
        while True:
            try:
                r = await self.client.post("/v1/remove", files=files, data=data,
                                           headers={"Accept": "application/json"})
            except httpx.HTTPError as exc:
                wait, why = backoff, (ErrorCode.GATEWAY_UNREACHABLE, f"{type(exc).__name__}: {exc}")
                backoff = min(backoff * 2, 30.0)
            else:
                if r.status_code == 200:
                    break
                problem = _problem(r)
                if r.status_code in (401, 403):
                    raise BatchAborted(f"the gateway refused the request ({r.status_code} {problem[0]}): "
                                       f"{problem[1]}; check --api-key")
                if r.status_code not in (429, 503):
                    code = _error_code(problem[0])
                    unknown = "" if code.value == problem[0] else f" (code {problem[0]})"
                    raise GatewayError(f"gateway answered {r.status_code}: {problem[1]}{unknown}", code=code)
                wait = max(0.1, _retry_after(r, backoff))  # "Retry-After: 0" must not become a hot loop
                why = (ErrorCode.GATEWAY_BUSY,
                       f"gateway answered {r.status_code} ({problem[0]}) for {self.max_wait_s:g} s")
                backoff = min(backoff * 2, 30.0)
            if time.monotonic() - t0 + wait > self.max_wait_s:
                raise GatewayError(why[1], code=why[0])
            await asyncio.sleep(wait * random.uniform(0.8, 1.2))
        body = r.json()
        timings = {"request": (time.monotonic() - t0) * 1000}
        timings.update({f"server_{k}": float(v) for k, v in (body.get("timings_ms") or {}).items()})
        source, detections = body.get("mask_source"), body.get("detections")
        auto = source == MaskSource.auto.value and body.get("mask")
        return Inferred(None, base64.b64decode(body["image"]), body.get("media_type"), body.get("score"),
                        body.get("passed"), body.get("threshold"), int(body.get("attempts", 1)),
                        int(body.get("seed", opts.seed or 0)), int(body["width"]), int(body["height"]), timings,
                        source, None if detections is None else len(detections),
                        base64.b64decode(body["mask"]) if auto else None)

    def finish(self, item: BatchItem, loaded: _Upload, inferred: Inferred) -> bytes:
        assert inferred.encoded is not None
        if inferred.media_type == imaging.MEDIA_TYPES[item.fmt]:
            return inferred.encoded
        result = imaging.decode_image(inferred.encoded)  # e.g. TIFF asked of a PNG input: re-encode here
        return imaging.encode_image(result.pixels, result, fmt=item.fmt, alpha="keep")


def _problem(r: Any) -> tuple[str, str]:
    try:
        body = r.json()
        return str(body.get("code") or f"http_{r.status_code}"), str(body.get("detail") or r.reason_phrase)
    except (ValueError, AttributeError):
        return f"http_{r.status_code}", (r.text[:200] or r.reason_phrase)


def _error_code(code: str) -> ErrorCode:
    """The gateway's problem ``code`` as an :class:`ErrorCode`; ``GATEWAY_ERROR`` for a string that is none
    (``http_<status>`` from :func:`_problem`, or a newer gateway's code)."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.GATEWAY_ERROR


def _retry_after(r: Any, default: float) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", default)))
    except ValueError:
        return default
