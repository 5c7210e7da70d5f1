"""Batch catalog cleaning: a folder or a manifest of (image, mask) pairs, resumable, with a review queue.

A run takes :class:`BatchItem`\\ s (:func:`load_items`), skips the ones an earlier run finished, and cleans
the rest through a :class:`Backend` (an in-process engine, or a running gateway) with a bounded number of
items in flight. Decoding and encoding run on worker threads, so the engine is fed while files are read
and written. Every finished item appends one JSON line to the report; items whose result fails the quality
gate are copied to the review folder for a person.

Layout of a run with ``-o OUT`` (defaults)::

    OUT/<key>                       the cleaned image; <key> = the item's output name (may hold folders)
    OUT/report.jsonl                one line per item and run, appended and fsynced (see REPORT FIELDS)
    OUT/review/<key>/source<ext>    the input image, as it was
    OUT/review/<key>/mask<ext>      the mask file (absent when the mask was the image's transparency)
    OUT/review/<key>/result<ext>    the cleaned image that failed the gate (also at OUT/<key>)
    OUT/review/<key>/item.json      the item's report line

Resume: an item is *done* when its last report line says ``"status": "ok"`` and ``OUT/<key>`` exists with
the size the line records. A rerun skips done items, skips items whose last line is an error unless
``retry_failed``, and processes everything else once. Outputs are written atomically (temp file + rename)
before their report line, so a run killed at any point leaves no truncated output, and an item whose line
did not make it to disk is simply done again. A truncated last report line (SIGKILL mid-write) is ignored.

REPORT FIELDS (one JSON object per line): ``key``, ``status`` ("ok" | "error"), ``passed`` (true/false with
the gate, null without), ``score``, ``threshold``, ``attempts``, ``seed``, ``output``, ``bytes`` (output
size), ``review`` (the item's review folder or null), ``width``, ``height``, ``image``, ``mask``,
``engine``, ``timings_ms`` (per stage and ``total``, in ms), ``error`` (null or ``{"code", "message"}``),
``run`` (run id), ``time`` (UTC, ISO 8601).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import csv
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import imaging
from .admission import MemoryBudget, MiB, release_free_memory, removal_cost
from .errors import CleanplateError, InputError, QueueFull
from .locks import exclusive

log = logging.getLogger("cleanplate.batch")

REPORT_NAME = "report.jsonl"
REVIEW_NAME = "review"
LOCK_NAME = ".cleanplate-batch.lock"
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".json")
# write_atomic's temp files: ".<name>.<random>.tmp"; a SIGKILL can leave one behind.
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
_FORMAT_SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tif"}
MaskChannel = Literal["luma", "alpha"]


class ItemOptions(BaseModel):
    """Per-item removal options; None = the run's option (``cleanplate batch run --seed ...``), then the
    engine's default. Same ranges as the gateway's form fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="noise seed of the first attempt")
    steps: int | None = Field(None, ge=1, le=50, description="LCM steps")
    dilate_px: int | None = Field(None, ge=0, le=512, description="mask dilation radius in px")
    quality_gate: bool | None = Field(None, description="score with the discriminator, retry, review")
    threshold: float | None = Field(None, ge=0, le=1, description="gate threshold (default: calibrated)")
    max_attempts: int | None = Field(None, ge=1, le=16, description="gate attempts, seed+1 each")

    def over(self, base: ItemOptions) -> ItemOptions:
        """These options with the unset ones taken from ``base``."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


OPTION_FIELDS = tuple(ItemOptions.model_fields)


@dataclass(frozen=True)
class BatchItem:
    """One image to clean.

    Attributes:
        key: the output name, relative to the output folder, POSIX separators ("shoes/123.jpg"); unique
            in a run and the item's identity in the report (resume matches on it).
        image: the source image file.
        mask: the mask file, or None when the image's transparent pixels are the mask.
        options: per-item options (manifest columns).
        origin: where the item came from, for messages ("photos/a.jpg", "list.jsonl:12").
        problem: ``(code, message)`` when the listing already knows the item cannot run (no mask found);
            the run reports it as an error without reading anything.
    """

    key: str
    image: Path
    mask: Path | None
    options: ItemOptions = field(default_factory=ItemOptions)
    origin: str = ""
    problem: tuple[str, str] | None = None

    @property
    def fmt(self) -> str:
        """The output format ("png", "jpeg", "webp", "tiff"), from the key's suffix."""
        return imaging.format_for_path(self.key)


# -- listing -------------------------------------------------------------------------------------------
def load_items(source: str | os.PathLike, *, masks: str | os.PathLike | None = None, fmt: str | None = None,
               exclude: Sequence[str | os.PathLike] = ()) -> list[BatchItem]:
    """The items of a folder or a manifest.

    Args:
        source: a folder of images (searched recursively; hidden files skipped), or a manifest:
            ``.jsonl`` (one object per line), ``.csv`` (a header row) or a RORem ``meta.json`` (a list of
            {"source", "mask", ...}; other keys such as "GT" are ignored). Manifest fields: ``image``
            (or ``source``), ``mask`` (optional: absent/empty = the image's transparency), ``output``
            (optional output name), and the :class:`ItemOptions` fields. Relative paths are relative to
            the manifest's folder.
        masks: with a folder, a folder of masks with the same relative names and any image suffix
            (``photos/a/b.jpg`` -> ``masks/a/b.png``); None = each image's transparency is its mask.
        fmt: output format for every item whose output name is not given ("png", "jpeg", "webp", "tiff");
            None = the input's (inputs we cannot write, such as BMP, become PNG).
        exclude: folders to leave out of a folder walk (the output folder when it lies inside).

    Returns:
        Items in listing order (sorted for folders, file order for manifests), keys unique.

    Raises:
        InputError: "bad_option" for a missing source, an unknown suffix or format, no images;
            "bad_manifest" for a manifest line that does not parse, an unknown field, an option out of
            range, an unsafe or unwritable output name, or two items with one output name.
    """
    src = Path(source)
    if fmt is not None:
        fmt = imaging.format_for_path("x." + fmt)
    if src.is_dir():
        items = _folder_items(src, None if masks is None else Path(masks), fmt, [Path(p) for p in exclude])
    elif not src.exists():
        raise InputError(f"no such file or folder: {src}", code="bad_option")
    elif masks is not None:
        raise InputError("--masks goes with a folder of images; a manifest names each item's mask",
                         code="bad_option")
    elif src.suffix.lower() == ".jsonl":
        items = _jsonl_items(src, fmt)
    elif src.suffix.lower() == ".csv":
        items = _csv_items(src, fmt)
    elif src.suffix.lower() == ".json":
        items = _meta_items(src, fmt)
    else:
        raise InputError(f"{src}: give a folder or a manifest ({', '.join(MANIFEST_SUFFIXES)})", code="bad_option")
    if not items:
        raise InputError(f"no images in {src}", code="bad_option")
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise InputError(f"{item.origin} and {seen[item.key]} both write {item.key!r}; give one an output "
                             f"name", code="bad_manifest")
        seen[item.key] = item.origin
    return items


def _output_key(name: str, fmt: str | None, *, explicit: bool) -> str:
    """Normalise an output name: relative, no "..", a writable suffix (``fmt`` replaces a default one)."""
    parts = PurePosixPath(name.replace("\\", "/"))
    if not name or parts.is_absolute() or ".." in parts.parts or name.startswith("~"):
        raise InputError(f"output name {name!r} must be a relative path inside the output folder",
                         code="bad_manifest")
    key = str(parts)
    suffix = parts.suffix.lower()
    if explicit:
        if suffix not in imaging.WRITABLE_SUFFIXES:
            raise InputError(f"output name {name!r}: use .png, .jpg, .jpeg, .webp, .tif or .tiff",
                             code="bad_manifest")
        return key
    writable = suffix in imaging.WRITABLE_SUFFIXES
    if fmt is not None:  # keep a suffix that already names the format (.jpeg stays .jpeg)
        return key if writable and imaging.format_for_path(key) == fmt else str(parts.with_suffix(_FORMAT_SUFFIX[fmt]))
    return key if writable else str(parts.with_suffix(".png"))


def _folder_items(folder: Path, masks: Path | None, fmt: str | None, exclude: list[Path]) -> list[BatchItem]:
    if masks is not None and not masks.is_dir():
        raise InputError(f"--masks must be a folder: {masks}", code="bad_option")
    skip = {p.resolve() for p in [*exclude, *([masks] if masks is not None else [])]}
    mask_index: dict[str, Path] = {}
    if masks is not None:  # one listing of the mask folder, not one glob per image
        for path in _walk_images(masks, set()):
            stem = str(path.relative_to(masks).with_suffix("").as_posix())
            old = mask_index.get(stem)
            if old is None or (path.suffix.lower() == ".png" and old.suffix.lower() != ".png"):
                mask_index[stem] = path  # a .png wins over other suffixes of the same name
    items = []
    for path in _walk_images(folder, skip):
        rel = path.relative_to(folder).as_posix()
        problem = mask = None
        if masks is not None:
            mask = mask_index.get(str(PurePosixPath(rel).with_suffix("")))
            if mask is None:
                problem = ("missing_mask", f"no mask named {PurePosixPath(rel).with_suffix('')}.* in {masks}")
        items.append(BatchItem(_output_key(rel, fmt, explicit=False), path, mask, origin=rel, problem=problem))
    return items


def _walk_images(root: Path, skip: set[Path]) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip)
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in imaging.IMAGE_SUFFIXES:
                yield here / name


def _manifest_item(fields: dict[str, Any], root: Path, where: str, fmt: str | None) -> BatchItem:
    fields = dict(fields)
    image = fields.pop("image", None)
    source = fields.pop("source", None)
    if image is None:
        image = source
    elif source is not None:
        raise InputError(f"{where}: give image or source, not both", code="bad_manifest")
    if not isinstance(image, str) or not image:
        raise InputError(f"{where}: needs an image path (field image or source)", code="bad_manifest")
    mask = fields.pop("mask", None)
    if mask is not None and not isinstance(mask, str):
        raise InputError(f"{where}: mask must be a path", code="bad_manifest")
    output = fields.pop("output", None)
    if output is not None and not isinstance(output, str):
        raise InputError(f"{where}: output must be a file name", code="bad_manifest")
    try:
        options = ItemOptions(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(map(str, err["loc"]))
        hint = f" (fields: image, mask, output, {', '.join(OPTION_FIELDS)})" if err["type"] == "extra_forbidden" else ""
        raise InputError(f"{where}: {name}: {err['msg']}{hint}", code="bad_manifest") from exc
    image_path = root / image
    if output:
        key = _output_key(output, fmt, explicit=True)
    else:
        try:  # the image's path relative to the manifest, or its file name when it lies elsewhere
            default = image_path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            default = image_path.name
        key = _output_key(default, fmt, explicit=False)
    return BatchItem(key, image_path, root / mask if mask else None, options, where)


def _jsonl_items(path: Path, fmt: str | None) -> list[BatchItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not JSON: {exc.msg}", code="bad_manifest") from exc
            if not isinstance(fields, dict):
                raise InputError(f"{where}: each line must be a JSON object", code="bad_manifest")
            items.append(_manifest_item(fields, path.parent, where, fmt))
    return items


def _csv_items(path: Path, fmt: str | None) -> list[BatchItem]:
    items = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            if None in row:
                raise InputError(f"{where}: more cells than header columns", code="bad_manifest")
            fields = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
            items.append(_manifest_item({k: v for k, v in fields.items() if v not in ("", None)},
                                        path.parent, where, fmt))
    return items


def _meta_items(path: Path, fmt: str | None) -> list[BatchItem]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path.name}: not JSON: {exc.msg} (line {exc.lineno})", code="bad_manifest") from exc
    if not isinstance(entries, list):
        raise InputError(f"{path.name}: a RORem meta.json is a JSON list of {{source, mask, ...}}",
                         code="bad_manifest")
    items = []
    for i, entry in enumerate(entries):
        where = f"{path.name}[{i}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: must be an object", code="bad_manifest")
        keep = {"image", "source", "mask", "output", *OPTION_FIELDS}  # RORem's GT, score, ... are not ours
        items.append(_manifest_item({k: v for k, v in entry.items() if k in keep}, path.parent, where, fmt))
    return items


# -- report --------------------------------------------------------------------------------------------
def read_report(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """All complete lines of a report, in order, and the number of lines skipped because they do not
    parse (a line cut short by a kill). A missing report is empty.

    Returns:
        ``(records, bad_lines)``.
    """
    records: list[dict[str, Any]] = []
    bad = 0
    if not os.path.exists(path):
        return records, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                records.append(record)
            else:
                bad += 1
    return records, bad


def last_records(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """key -> the last line about it (a later run's line replaces an earlier one)."""
    return {r["key"]: r for r in records}


class ReportWriter:
    """Appends one JSON line per call, flushed and fsynced before :meth:`append` returns; thread-safe.

    Opening an existing report whose last line was cut short (a kill mid-write) first ends that line,
    so the fragment stays one unparseable line and the next record starts clean.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._f = open(self.path, "ab")  # noqa: SIM115 - open for the writer's life; closed by close()
        if self._f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self._f.write(b"\n")

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            if self._fsync:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()


# -- backends ------------------------------------------------------------------------------------------
class BatchAborted(CleanplateError):
    """A problem no item can get past (the gateway refuses the API key): the run stops after the items
    in flight, and the CLI exits 2."""

    code = "aborted"


class GatewayError(CleanplateError):
    """The gateway answered an item with an error (its problem+json ``code``) or could not be reached."""

    code = "gateway_error"


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


def _mask_array(item: BatchItem, image: imaging.DecodedImage, channel: MaskChannel) -> np.ndarray:
    """(H,W) bool mask of an item: the image's transparency, the mask file's luma, or its alpha."""
    if item.mask is None:
        return imaging.mask_from_alpha(image)
    if channel == "luma":
        return imaging.decode_mask(item.mask)
    return _alpha_mask(item.mask)


def _alpha_mask(path: Path) -> np.ndarray:
    """(H,W) bool, True where a mask file's alpha is >= 50% (``--mask-channel alpha``)."""
    decoded = imaging.decode_image(path)
    if decoded.alpha is None:
        raise InputError(f"mask {path} has no alpha channel (--mask-channel alpha)", code="no_alpha")
    return decoded.alpha >= (int(np.iinfo(decoded.alpha.dtype).max) + 1) // 2


def _file_size(path: Path | None) -> int:
    try:
        return 0 if path is None else path.stat().st_size
    except OSError:
        return 0  # unreadable: load() reports it


@dataclass
class _Loaded:
    image: imaging.DecodedImage
    mask: np.ndarray


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
        masks = () if item.mask is None else (imaging.read_header(item.mask),)
        return removal_cost(imaging.read_header(item.image), extra_images=masks,
                            encoded_bytes=_file_size(item.image) + _file_size(item.mask))

    def load(self, item: BatchItem, mask_channel: MaskChannel) -> _Loaded:
        image = imaging.decode_image(item.image)
        return _Loaded(image, _mask_array(item, image, mask_channel))

    async def infer(self, item: BatchItem, loaded: _Loaded, opts: ItemOptions) -> Inferred:
        from .removal import RemoveOptions, run_removal

        ropts = RemoveOptions(dilate_px=opts.dilate_px, steps=opts.steps, seed=opts.seed or 0,
                              quality_gate=bool(opts.quality_gate), threshold=opts.threshold,
                              max_attempts=opts.max_attempts or 1)
        while True:
            try:
                out = await run_removal(self.engine, loaded.image, loaded.mask, ropts)
                break
            except QueueFull as exc:  # only if the engine's queue is smaller than the concurrency
                await asyncio.sleep(min(exc.retry_after_s, 5))
        return Inferred(out.pixels, None, None, out.score, out.passed, out.threshold, out.attempts, out.seed,
                        loaded.image.width, loaded.image.height, dict(out.timings_ms))

    def finish(self, item: BatchItem, loaded: _Loaded, inferred: Inferred) -> bytes:
        assert inferred.pixels is not None
        # A mask given as transparency is filled in, so the result is opaque (as `cleanplate remove`).
        return imaging.encode_image(inferred.pixels, loaded.image, fmt=item.fmt,
                                    alpha=None if item.mask is None else "keep")




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
    the item's error with the gateway's problem ``code``. 401/403 abort the run (:class:`BatchAborted`).

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
                                 code="gateway_unreachable")
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def cost(self, item: BatchItem, mask_channel: MaskChannel) -> int:
        """The files and the response held here; the gateway decodes (under its own budget). An alpha
        mask is decoded here to be sent as luma."""
        alpha_mask = item.mask is not None and mask_channel == "alpha"
        decoded = removal_cost(imaging.read_header(item.mask)) if alpha_mask else 0
        return 2 * (_file_size(item.image) + _file_size(item.mask)) + decoded

    def load(self, item: BatchItem, mask_channel: MaskChannel) -> _Upload:
        try:
            raw = item.image.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read image {str(item.image)!r}: {exc.strerror or exc}",
                             code="unreadable_image") from exc
        mask = None
        if item.mask is not None:
            if mask_channel == "alpha":  # the gateway reads luma; send the alpha as a white-on-black PNG
                m = _alpha_mask(item.mask)
                buf = io.BytesIO()
                from PIL import Image

                Image.fromarray(m.astype(np.uint8) * 255).save(buf, "PNG")
                mask = buf.getvalue()
            else:
                try:
                    mask = item.mask.read_bytes()
                except OSError as exc:
                    raise InputError(f"cannot read mask {str(item.mask)!r}: {exc.strerror or exc}",
                                     code="unreadable_image") from exc
        fmt = item.fmt
        # The gateway writes png/jpeg/webp on request, and the input's own format by default (TIFF included).
        fmt_field = None if _sniff(raw) == fmt else (fmt if fmt != "tiff" else "png")
        return _Upload(raw, mask, fmt_field)

    async def infer(self, item: BatchItem, loaded: _Upload, opts: ItemOptions) -> Inferred:
        import base64

        import httpx

        data: dict[str, str] = {"seed": str(opts.seed or 0), "quality_gate": str(bool(opts.quality_gate)).lower()}
        for name in ("steps", "dilate_px", "threshold"):
            if getattr(opts, name) is not None:
                data[name] = str(getattr(opts, name))
        if opts.quality_gate and opts.max_attempts is not None:
            data["max_attempts"] = str(opts.max_attempts)
        if loaded.fmt_field:
            data["output_format"] = loaded.fmt_field
        files = {"image": (item.image.name, loaded.image)}
        if loaded.mask is not None:
            files["mask"] = ("mask.png", loaded.mask)
        t0 = time.monotonic()
        backoff = 0.5
        while True:
            try:
                r = await self.client.post("/v1/remove", files=files, data=data,
                                           headers={"Accept": "application/json"})
            except httpx.HTTPError as exc:
                wait, why = backoff, ("gateway_unreachable", f"{type(exc).__name__}: {exc}")
                backoff = min(backoff * 2, 30.0)
            else:
                if r.status_code == 200:
                    break
                problem = _problem(r)
                if r.status_code in (401, 403):
                    raise BatchAborted(f"the gateway refused the request ({r.status_code} {problem[0]}): "
                                       f"{problem[1]}; check --api-key")
                if r.status_code not in (429, 503):
                    raise GatewayError(f"gateway answered {r.status_code}: {problem[1]}", code=problem[0])
                wait = max(0.1, _retry_after(r, backoff))  # "Retry-After: 0" must not become a hot loop
                why = ("gateway_busy", f"gateway answered {r.status_code} ({problem[0]}) for {self.max_wait_s:g} s")
                backoff = min(backoff * 2, 30.0)
            if time.monotonic() - t0 + wait > self.max_wait_s:
                raise GatewayError(why[1], code=why[0])
            await asyncio.sleep(wait * random.uniform(0.8, 1.2))
        body = r.json()
        timings = {"request": (time.monotonic() - t0) * 1000}
        timings.update({f"server_{k}": float(v) for k, v in (body.get("timings_ms") or {}).items()})
        return Inferred(None, base64.b64decode(body["image"]), body.get("media_type"), body.get("score"),
                        body.get("passed"), body.get("threshold"), int(body.get("attempts", 1)),
                        int(body.get("seed", opts.seed or 0)), int(body["width"]), int(body["height"]), timings)

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


def _retry_after(r: Any, default: float) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", default)))
    except ValueError:
        return default


# -- progress ------------------------------------------------------------------------------------------
class Progress:
    """Counts finished items and shows them: a tqdm bar (items/s, ETA, pass rate) on a terminal, a plain
    log line every ``every_s`` seconds otherwise, or nothing (``mode="off"``)."""

    def __init__(self, mode: Literal["auto", "bar", "log", "off"] = "auto", *, every_s: float = 10.0,
                 stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode, self.every_s = mode, every_s
        self.total = self.done = self.ok = self.errors = self.gated = self.passed = 0
        self._bar: Any = None
        self._t0 = self._last = time.monotonic()

    def start(self, total: int, skipped: int) -> None:
        self.total = total
        self._t0 = self._last = time.monotonic()
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.05)
        elif self.mode == "log":
            self.say(f"batch: {total} items to do, {skipped} skipped (done before)")

    def say(self, line: str) -> None:
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _rates(self) -> str:
        rate = f"pass {100 * self.passed / self.gated:.0f}%" if self.gated else "pass -"
        return f"{rate}, errors {self.errors}"

    def update(self, record: dict[str, Any]) -> None:
        self.done += 1
        if record["status"] == "ok":
            self.ok += 1
            if record.get("passed") is not None:
                self.gated += 1
                self.passed += bool(record["passed"])
        else:
            self.errors += 1
            err = record.get("error") or {}
            self.say(f"failed {record['key']}: {err.get('code')}: {err.get('message')}")
        if self._bar is not None:
            self._bar.set_postfix_str(self._rates(), refresh=False)
            self._bar.update(1)
        elif self.mode == "log" and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.say(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _hms(left / rate) if rate > 0 else "?"
        pct = 100 * self.done / self.total if self.total else 100.0
        return f"batch: {self.done}/{self.total} ({pct:.1f}%), {rate:.2f} img/s, ETA {eta}, {self._rates()}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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
    report: Path | None = None

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


def plan(items: Sequence[BatchItem], report: dict[str, dict[str, Any]], out_dir: Path, *,
         retry_failed: bool) -> tuple[list[BatchItem], int, int]:
    """Which items to run: ``(todo, done_before, failed_before)``. Done = last line ok and the output on
    disk with the recorded size; failed = last line error (run again only with ``retry_failed``)."""
    todo, done, failed = [], 0, 0
    for item in items:
        last = report.get(item.key)
        if last is not None and last.get("status") == "ok":
            try:
                if (out_dir / item.key).stat().st_size == last.get("bytes"):
                    done += 1
                    continue
            except OSError:
                pass
        elif last is not None and last.get("status") == "error" and not retry_failed:
            failed += 1
            continue
        todo.append(item)
    return todo, done, failed


def _remove_stale_temp_files(*folders: Path) -> int:
    removed = 0
    for folder in folders:
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                if _TEMP_FILE.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
    return removed


def _relative_inside(path: Path, folder: Path) -> str | None:
    """``path`` relative to ``folder`` (POSIX) when it lies inside it, else None."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


async def run_batch(items: Sequence[BatchItem], backend: Backend, out_dir: str | os.PathLike, *,
                    defaults: ItemOptions | None = None, concurrency: int = 4, report_path: str | os.PathLike | None = None,
                    review_dir: str | os.PathLike | None = None, retry_failed: bool = False,
                    mask_channel: MaskChannel = "luma", progress: Progress | None = None,
                    io_workers: int | None = None, handle_signals: bool = True,
                    stop: asyncio.Event | None = None, memory_budget_bytes: int = 1024 * MiB) -> BatchResult:
    """Clean ``items`` into ``out_dir``; see the module docstring for the layout, report and resume rules.

    Args:
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
        raise InputError(f"--concurrency must be >= 1, got {concurrency}", code="bad_option")
    out = Path(out_dir)
    report_file = Path(report_path) if report_path is not None else out / REPORT_NAME
    review = Path(review_dir) if review_dir is not None else out / REVIEW_NAME
    review_rel, report_rel = _relative_inside(review, out), _relative_inside(report_file, out)
    for item in items:
        if item.key == report_rel or (review_rel is not None and (item.key + "/").startswith(review_rel + "/")):
            raise InputError(f"{item.origin}: output {item.key!r} would land on the report or in the review "
                             f"folder; rename it or use --report/--review elsewhere", code="bad_option")
    result = BatchResult(total=len(items), report=report_file)
    run = _Run(backend, out, review, defaults or ItemOptions(), concurrency, mask_channel,
               progress or Progress("off"), io_workers or min(8, concurrency + 1), stop or asyncio.Event(), result,
               memory_budget_bytes)
    t_start = time.monotonic()
    with exclusive(out, LOCK_NAME, f"another cleanplate batch is running on {out}"), run.signals(handle_signals):
        _remove_stale_temp_files(out, *([review] if review_rel is None else []))
        records, _ = read_report(report_file)
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
                    with contextlib.closing(ReportWriter(report_file)) as writer:
                        await run.go(todo, writer)
            finally:
                await backend.close()
    result.elapsed_s = time.monotonic() - t_start
    if run.aborted is not None:
        raise run.aborted
    return result


class _Run:
    """One run's pipeline: load (thread) -> engine (bounded) -> encode + write (thread) -> report line."""

    def __init__(self, backend: Backend, out: Path, review: Path, defaults: ItemOptions, concurrency: int,
                 mask_channel: MaskChannel, progress: Progress, io_workers: int, stop: asyncio.Event,
                 result: BatchResult, memory_budget_bytes: int) -> None:
        self.backend, self.out, self.review = backend, out, review
        self.defaults, self.concurrency, self.mask_channel = defaults, concurrency, mask_channel
        self.progress, self.io_workers, self.stop, self.result = progress, io_workers, stop, result
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}"
        self.aborted: BatchAborted | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # Every item in flight waits here, so the queue never refuses; the window semaphore bounds it.
        self.budget = MemoryBudget(memory_budget_bytes, max_waiting=sys.maxsize,
                                   on_drain=lambda: asyncio.get_running_loop().run_in_executor(None, release_free_memory))

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
                             code="engine_unavailable") from exc
        return True

    async def go(self, todo: list[BatchItem], writer: ReportWriter) -> None:
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
        record: dict[str, Any] = {"key": item.key, "status": "error", "passed": None, "score": None,
                                  "threshold": None, "attempts": 0, "seed": None, "output": None, "bytes": None,
                                  "review": None, "width": None, "height": None, "image": str(item.image),
                                  "mask": None if item.mask is None else str(item.mask),
                                  "engine": self.backend.name, "timings_ms": timings, "error": None}

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
            review = await self._thread(self._save, item, data, inferred)
            lap("write", t)
            record.update(status="ok", passed=inferred.passed, score=inferred.score, threshold=inferred.threshold,
                          attempts=inferred.attempts, seed=inferred.seed, output=str(self.out / item.key),
                          bytes=len(data), review=review, width=inferred.width, height=inferred.height)
        except BatchAborted as exc:
            if self.aborted is None:
                self.aborted = exc
                self.stop.set()
            self.result.not_started += 1  # not the item's fault: no report line
            return
        except CleanplateError as exc:
            record["error"] = {"code": exc.code, "message": str(exc)}
        except Exception as exc:  # one bad item must not end an overnight run
            log.exception("item %s failed", item.key)
            record["error"] = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
        timings["total"] = round((time.perf_counter() - t0) * 1000, 2)
        record.update(run=self.run_id, time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
        if record["status"] == "ok" and record["review"] is not None:
            await self._thread(self._write_review_record, record)
        await self._thread(self.writer.append, record)
        if record["status"] == "ok":
            self.result.ok += 1
            self.result.passed += record["passed"] is True
            self.result.rejected += record["passed"] is False
        else:
            self.result.errors += 1
        self.progress.update(record)

    def _save(self, item: BatchItem, data: bytes, inferred: Inferred) -> str | None:
        """Write the output; for a gate failure also the review copies. Returns the review folder or None."""
        imaging.write_atomic(self.out / item.key, data)
        folder = self.review / item.key
        if inferred.passed is not False:
            if folder.is_dir():  # an earlier attempt of this item went to review; this one passed
                shutil.rmtree(folder, ignore_errors=True)
            return None
        imaging.write_atomic(folder / f"source{item.image.suffix.lower()}", item.image.read_bytes())
        if item.mask is not None:
            imaging.write_atomic(folder / f"mask{item.mask.suffix.lower()}", item.mask.read_bytes())
        imaging.write_atomic(folder / f"result{PurePosixPath(item.key).suffix.lower()}", data)
        return str(folder)

    def _write_review_record(self, record: dict[str, Any]) -> None:
        imaging.write_atomic(Path(record["review"]) / "item.json", json.dumps(record, indent=1).encode() + b"\n")


# -- summary -------------------------------------------------------------------------------------------
def summarize(report_path: str | os.PathLike) -> dict[str, Any]:
    """Counts, pass rate and latency percentiles of a report (each item's last line counts).

    Returns a dict: ``items``, ``ok``, ``errors``, ``errors_by_code``, ``gated`` (ok items scored by the
    gate), ``passed``, ``rejected``, ``pass_rate`` (passed / gated, or None), ``attempts_mean``,
    ``latency_ms`` (p50/p90/p95/p99/max/mean of ``timings_ms.total`` of ok items), ``stage_ms_p50`` (per
    stage), ``lines``, ``bad_lines``, ``runs`` (distinct run ids).

    Raises:
        InputError: "bad_option" when the report does not exist.
    """
    path = Path(report_path)
    if not path.is_file():
        raise InputError(f"no report at {path}", code="bad_option")
    records, bad = read_report(path)
    last = last_records(records)
    ok = [r for r in last.values() if r.get("status") == "ok"]
    errs = [r for r in last.values() if r.get("status") != "ok"]
    by_code: dict[str, int] = {}
    for r in errs:
        code = (r.get("error") or {}).get("code", "?")
        by_code[code] = by_code.get(code, 0) + 1
    gated = [r for r in ok if r.get("passed") is not None]
    passed = sum(1 for r in gated if r["passed"])
    totals = [float(r["timings_ms"]["total"]) for r in ok if "total" in (r.get("timings_ms") or {})]
    stages: dict[str, list[float]] = {}
    for r in ok:
        for stage, ms in (r.get("timings_ms") or {}).items():
            if stage != "total":
                stages.setdefault(stage, []).append(float(ms))

    def pct(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {k: None for k in ("p50", "p90", "p95", "p99", "max", "mean")}
        a = np.asarray(values)
        return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
                "mean": float(a.mean())}

    return {"report": str(path), "lines": len(records), "bad_lines": bad, "runs": len({r.get("run") for r in records}),
            "items": len(last), "ok": len(ok), "errors": len(errs), "errors_by_code": dict(sorted(by_code.items())),
            "gated": len(gated), "passed": passed, "rejected": len(gated) - passed,
            "pass_rate": passed / len(gated) if gated else None,
            "attempts_mean": float(np.mean([r.get("attempts") or 0 for r in ok])) if ok else None,
            "latency_ms": pct(totals),
            "stage_ms_p50": {k: float(np.percentile(v, 50)) for k, v in sorted(stages.items())}}


def format_summary(s: dict[str, Any]) -> str:
    """:func:`summarize`'s dict as a few human lines."""
    lat = s["latency_ms"]
    ms = (lambda v: "-" if v is None else f"{v:.0f}")
    rate = "-" if s["pass_rate"] is None else f"{100 * s['pass_rate']:.1f}%"
    unreadable = f", {s['bad_lines']} unreadable lines" if s["bad_lines"] else ""
    attempts = "" if s["attempts_mean"] is None else f", {s['attempts_mean']:.2f} attempts per item"
    lines = [(f"{s['report']}: {s['items']} items, {s['ok']} ok, {s['errors']} errors "
              f"({s['lines']} lines, {s['runs']} runs{unreadable})"),
             (f"quality gate: {s['gated']} scored, {s['passed']} passed, {s['rejected']} to review, "
              f"pass rate {rate}{attempts}"),
             (f"latency ms (ok items): p50 {ms(lat['p50'])}, p90 {ms(lat['p90'])}, p95 {ms(lat['p95'])}, "
              f"p99 {ms(lat['p99'])}, max {ms(lat['max'])}")]
    if s["stage_ms_p50"]:
        lines.append("stage p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in s["stage_ms_p50"].items()))
    if s["errors_by_code"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in s["errors_by_code"].items()))
    return "\n".join(lines)


__all__ = ["Backend", "BatchAborted", "BatchItem", "BatchResult", "GatewayBackend", "GatewayError", "InProcessBackend",
           "Inferred", "ItemOptions", "Progress", "ReportWriter", "format_summary", "last_records", "load_items", "plan",
           "read_report", "run_batch", "summarize"]
