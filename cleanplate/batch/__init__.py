"""Batch catalog cleaning: a folder or a manifest of (image, mask) pairs, resumable, with a review queue.

A run takes :class:`BatchItem`\\ s (:func:`load_items`), skips the ones an earlier run finished, and cleans
the rest through a :class:`Backend` (an in-process engine, or a running gateway) with a bounded number of
items in flight. Decoding and encoding run on worker threads, so the engine is fed while files are read
and written. Every finished item appends one JSON line to the report; items whose result fails the quality
gate are copied to the review folder for a person.

The package: :mod:`.items` (options, listing), :mod:`.backends`, :mod:`.runner`, :mod:`.report`,
:mod:`.progress`. Layout of a run with ``-o OUT`` (defaults)::

    OUT/<key>                       the cleaned image; <key> = the item's output name (may hold folders)
    OUT/report.jsonl                one line per item and run, appended and fsynced (see REPORT FIELDS)
    OUT/review/<key>/source<ext>    the input image, as it was
    OUT/review/<key>/mask<ext>      the mask file, or mask.png: the detector's (--auto-mask); absent when the
                                    mask was the image's transparency
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
``mask_source`` ("file", "alpha" or "auto": :mod:`cleanplate.masks`), ``detections`` (auto: overlays found;
0 = nothing to remove, the output is the input unchanged), ``engine``, ``timings_ms`` (per stage and ``total``, in ms), ``error`` (null or ``{"code", "message"}``),
``run`` (run id), ``time`` (UTC, ISO 8601); declared once, :class:`.report.ReportRecord`, through which every
line is written and read.
"""

from .backends import Backend, BatchAborted, GatewayBackend, GatewayError, Inferred, InProcessBackend
from .items import BatchItem, ItemOptions, MaskChannel, load_items
from .progress import Progress
from .report import (
    ReportError,
    ReportRecord,
    ReportWriter,
    format_summary,
    last_records,
    read_records,
    read_report,
    summarize,
)
from .runner import REPORT_NAME, REVIEW_NAME, BatchResult, plan, run_batch

__all__ = ["REPORT_NAME", "REVIEW_NAME", "Backend", "BatchAborted", "BatchItem", "BatchResult", "GatewayBackend",
           "GatewayError", "InProcessBackend", "Inferred", "ItemOptions", "MaskChannel", "Progress", "ReportError",
           "ReportRecord", "ReportWriter", "format_summary", "last_records", "load_items", "plan", "read_records",
           "read_report", "run_batch", "summarize"]
