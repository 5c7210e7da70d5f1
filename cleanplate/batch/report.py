"""The batch report: one JSON line per item and run (appended, fsynced), read back for resume, and summarized
(counts, gate pass rate, latency percentiles)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import storage
from ..errors import ErrorCode, InputError

log = logging.getLogger("cleanplate.batch")


# -- the record ----------------------------------------------------------------------------------------
class ReportError(BaseModel):
    """A failed item's error: its :class:`~cleanplate.errors.ErrorCode` slug and message."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str = ""


class ReportRecord(BaseModel):
    """One line of ``report.jsonl``: what happened to one item in one run. Every line is written and read
    through this model (fields in this order); fields a newer cleanplate adds are kept (``extra="allow"``).

    Attributes:
        key: the item's output name (its identity for resume); status: "ok" or "error".
        passed, score, threshold: the gate's verdict (None without the gate); attempts: model runs made;
        seed: the returned attempt's seed. output, bytes: the written file and its size (resume checks it);
        review: the review folder of a gate failure. width, height: the image's. image, mask: the inputs;
        mask_source: where the mask came from (file, alpha, auto: :mod:`cleanplate.masks`); detections: an
        auto mask's overlay count (0: nothing found, the output is the input). engine: the backend's name. timings_ms: per stage and ``total``; error: a failure's code and message.
        run: the run's id; time: when the line was written (UTC, ISO 8601).
    """

    model_config = ConfigDict(extra="allow")

    key: str
    status: str = "error"
    passed: bool | None = None
    score: float | None = None
    threshold: float | None = None
    attempts: int = Field(0, description="model runs made")
    seed: int | None = None
    output: str | None = None
    bytes: int | None = Field(None, description="the output's size; resume compares it with the file's")
    review: str | None = None
    width: int | None = None
    height: int | None = None
    image: str | None = None
    mask: str | None = None
    mask_source: str | None = Field(None, description="file, alpha or auto (cleanplate.masks.MaskSource)")
    detections: int | None = Field(None, description="auto mask: overlays the detector found")
    engine: str | None = Field(None, description="the backend's name")
    timings_ms: dict[str, float] = Field(default_factory=dict)
    error: ReportError | None = None
    run: str | None = None
    time: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """The line's JSON object."""
        return self.model_dump(mode="json")


# -- report --------------------------------------------------------------------------------------------
PARTS_SUFFIX = ".parts"  # an object-store report's fragments: <report>.parts/<run>-<seq>.jsonl


def read_records(path: str | os.PathLike) -> tuple[list[ReportRecord], int]:
    """All complete lines of a report as :class:`ReportRecord`, in order, and the number of lines skipped
    because they do not parse (a line cut short by a kill) or are no record. A missing report is empty.
    ``path`` is a local path or a URL (:mod:`cleanplate.storage`); a URL's report is its object followed by
    the fragments a run has not merged yet (:class:`ObjectReportWriter`).

    Returns:
        ``(records, bad_lines)``.
    """
    records: list[ReportRecord] = []
    bad = 0
    loc = storage.as_loc(path)
    if isinstance(loc, Path):
        if not os.path.exists(loc):
            return records, 0
        with open(loc, "rb") as f:
            chunks: Iterable[bytes] = list(f)
    else:
        chunks = [line for blob in _object_report_blobs(loc) for line in blob.splitlines()]
    for raw in chunks:
        if not raw.strip():
            continue
        try:
            records.append(ReportRecord.model_validate_json(raw))
        except ValidationError:  # not JSON, not an object, no key, a field of the wrong type
            bad += 1
    return records, bad


def _fragments(url: str) -> list[str]:
    """The unmerged fragments of a URL's report, in name order (= run, then sequence)."""
    return [str(loc) for loc, rel in storage.walk_files(url + PARTS_SUFFIX, recursive=False) if rel.endswith(".jsonl")]


def _object_report_blobs(url: str) -> list[bytes]:
    blobs = []
    try:
        blobs.append(storage.read_bytes(url))
    except FileNotFoundError:
        pass
    return blobs + [storage.read_bytes(f) for f in _fragments(url)]


def report_exists(path: str | os.PathLike) -> bool:
    """A local report file, or a URL's report object or unmerged fragments."""
    loc = storage.as_loc(path)
    if isinstance(loc, Path):
        return loc.is_file()
    return storage.exists(loc) or bool(_fragments(loc))


def read_report(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """:func:`read_records` as JSON objects (each line as the model reads it), for scripts and tests."""
    records, bad = read_records(path)
    return [r.to_json() for r in records], bad


def last_records(records: Iterable[ReportRecord]) -> dict[str, ReportRecord]:
    """key -> the last line about it (a later run's line replaces an earlier one)."""
    return {r.key: r for r in records}


def encode_line(record: ReportRecord | dict[str, Any]) -> bytes:
    """One report line: compact JSON of the record and a newline (a dict is read through :class:`ReportRecord`
    first, so missing fields get defaults). Raises pydantic.ValidationError for a dict that is no record."""
    if not isinstance(record, ReportRecord):
        record = ReportRecord.model_validate(record)
    return json.dumps(record.to_json(), separators=(",", ":"), allow_nan=False).encode() + b"\n"


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

    def append(self, record: ReportRecord | dict[str, Any]) -> None:
        """Write one line; a dict is read through :class:`ReportRecord` first (missing fields get defaults)."""
        line = encode_line(record)
        with self._lock:
            self._f.write(line)
            self._f.flush()
            if self._fsync:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()


class ObjectReportWriter:
    """:class:`ReportWriter` for a report on an object store, where nothing can be appended to.

    Lines are buffered and written as whole fragment objects, ``<report>.parts/<run>-<seq>.jsonl``, every
    ``flush_lines`` lines or ``flush_every_s`` seconds (checked on append) and at :meth:`close`; close then
    merges: the report object is rewritten whole as itself plus every fragment in name order (an earlier,
    killed run's too), and the fragments are deleted. :func:`read_records` reads the report and any
    fragments left, so a killed run loses at most its unflushed lines (those items are done again). A
    kill between the merge's write and the deletes leaves lines twice; each item's last line still wins.
    """

    def __init__(self, url: str, run_id: str, *, flush_lines: int = 256, flush_every_s: float = 2.0) -> None:
        self.url, self.run_id = url, run_id
        self.flush_lines, self.flush_every_s = flush_lines, flush_every_s
        self._lock = threading.Lock()
        self._buf: list[bytes] = []
        self._seq = 0
        self._last = time.monotonic()

    def append(self, record: ReportRecord | dict[str, Any]) -> None:
        """Buffer one line (a dict is read through :class:`ReportRecord`); write a fragment when due."""
        line = encode_line(record)
        with self._lock:
            self._buf.append(line)
            if len(self._buf) >= self.flush_lines or time.monotonic() - self._last >= self.flush_every_s:
                self._flush()

    def _flush(self) -> None:
        if self._buf:
            storage.write_bytes(f"{self.url}{PARTS_SUFFIX}/{self.run_id}-{self._seq:08d}.jsonl", b"".join(self._buf))
            self._seq += 1
            self._buf = []
        self._last = time.monotonic()

    def close(self) -> None:
        """Write the last fragment, then merge the fragments into the report object."""
        with self._lock:
            self._flush()
            merge_fragments(self.url)


def merge_fragments(url: str) -> None:
    """Rewrite a URL's report object as itself plus its fragments (name order), then delete the fragments."""
    fragments = _fragments(url)
    if not fragments:
        return
    try:
        base = storage.read_bytes(url)
    except FileNotFoundError:
        base = b""
    parts = [base] if base else []
    for f in fragments:
        blob = storage.read_bytes(f)
        parts.append(blob)
    data = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)
    storage.write_bytes(url, data)
    for f in fragments:
        storage.remove(f)


def open_report_writer(path: storage.Loc, run_id: str) -> ReportWriter | ObjectReportWriter:
    """The report's writer: :class:`ReportWriter` (append + fsync) for a local file, :class:`ObjectReportWriter`
    for a URL."""
    return ReportWriter(path) if isinstance(path, Path) else ObjectReportWriter(path, run_id)


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
    path = storage.as_loc(report_path)
    if not report_exists(path):
        raise InputError(f"no report at {path}", code=ErrorCode.BAD_OPTION)
    records, bad = read_records(path)
    last = last_records(records)
    ok = [r for r in last.values() if r.ok]
    errs = [r for r in last.values() if not r.ok]
    by_code: dict[str, int] = {}
    for r in errs:
        code = r.error.code if r.error is not None else "?"
        by_code[code] = by_code.get(code, 0) + 1
    gated = [r for r in ok if r.passed is not None]
    passed = sum(1 for r in gated if r.passed)
    totals = [float(r.timings_ms["total"]) for r in ok if "total" in r.timings_ms]
    stages: dict[str, list[float]] = {}
    for r in ok:
        for stage, ms in r.timings_ms.items():
            if stage != "total":
                stages.setdefault(stage, []).append(float(ms))

    def pct(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {k: None for k in ("p50", "p90", "p95", "p99", "max", "mean")}
        a = np.asarray(values)
        return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
                "mean": float(a.mean())}

    return {"report": str(path), "lines": len(records), "bad_lines": bad, "runs": len({r.run for r in records}),
            "items": len(last), "ok": len(ok), "errors": len(errs), "errors_by_code": dict(sorted(by_code.items())),
            "gated": len(gated), "passed": passed, "rejected": len(gated) - passed,
            "pass_rate": passed / len(gated) if gated else None,
            "attempts_mean": float(np.mean([r.attempts or 0 for r in ok])) if ok else None,
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
