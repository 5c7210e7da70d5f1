"""Progress of a batch run: a bar on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

from .report import ReportRecord

log = logging.getLogger("cleanplate.batch")



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

    def update(self, record: ReportRecord | dict[str, Any]) -> None:
        """Count one finished item (a dict is read through :class:`ReportRecord`)."""
        if not isinstance(record, ReportRecord):
            record = ReportRecord.model_validate(record)
        self.done += 1
        if record.ok:
            self.ok += 1
            if record.passed is not None:
                self.gated += 1
                self.passed += bool(record.passed)
        else:
            self.errors += 1
            err = record.error
            self.say(f"failed {record.key}: {err and err.code}: {err and err.message}")
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
