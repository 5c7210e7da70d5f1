"""Admission by a memory budget: requests (or batch items) in flight may together hold at most a fixed
number of bytes, each charged what its images will cost before any pixel is decoded.

A 40 MP photo costs about 440 MiB on its way through decode, prepare, model, composite and encode
(:func:`removal_cost`); without admission, 16 of them at once take 7 GiB and a pod with a 4 GiB limit is
OOM-killed with every request in flight on it. :class:`MemoryBudget` admits work first-come first-served
while the sum of admitted costs fits the capacity; the rest waits in a bounded queue (full: ``QueueFull``,
HTTP 429); a single cost larger than the whole capacity can never run (``InputError`` "over_budget", 413).

The allocator matters as much as the budget: glibc keeps freed memory in per-thread arenas, so after a
burst of big images a process stays gigabytes resident. :func:`tune_allocator` makes big buffers come from
(and go back to) the OS directly, and the budget calls :func:`release_free_memory` whenever it drains.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import platform
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from .errors import ErrorCode, InputError, QueueFull
from .imaging import ImageHeader

log = logging.getLogger("cleanplate.admission")
MiB = 1024 * 1024

# Bytes per pixel a removal holds at its peak on top of 2 copies of the native pixels (the decoded source
# and the composited result): the mask and its dilation (1 + 1), the context window's float mask
# (up to 4, transient) or Pillow's working copy at decode/encode (4). Measured with
# `cleanplate bench memory` (stage peaks of a 40 MP RGB photo: decode 9.5, prepare 10.6, encode 10.0 B/px).
EXTRA_BYTES_PER_PIXEL = 5


def removal_cost(image: ImageHeader, *, extra_images: tuple[ImageHeader, ...] = (), encoded_bytes: int = 0) -> int:
    """Peak bytes one removal (or score) of ``image`` holds, from headers alone.

    ``pixels x (2 x native bytes per pixel + EXTRA_BYTES_PER_PIXEL)`` for the image, plus 3 bytes per pixel
    when the model's 8-bit RGB view is a copy (gray or 16-bit natives, :attr:`DecodedImage.rgb`), plus each
    extra image's native size (a mask, a result to score), plus twice the encoded bytes (the upload and the
    response).
    An upper bound for masks whose context window fits inside the photo; larger windows are blended in
    strips (:func:`cleanplate.compositing.paste_back`), so they add little.
    """
    native = image.channels * image.bytes_per_sample
    rgb_copy = 0 if image.channels in (3, 4) and image.bytes_per_sample == 1 else 3
    cost = image.pixels * (2 * native + rgb_copy + EXTRA_BYTES_PER_PIXEL)
    cost += sum(h.pixels * h.channels * h.bytes_per_sample for h in extra_images)
    return cost + 2 * encoded_bytes


class MemoryBudget:
    """A byte budget shared by the work in flight on one event loop, granted first-come first-served.

    Args:
        capacity_bytes: the most bytes admitted at once (>= 1).
        max_waiting: the most reservations waiting for memory; one more gets ``QueueFull``.
        on_drain: called (on the loop) each time the last reservation is released, e.g. to give memory back.

    FIFO order means a large request is never starved by a stream of small ones.
    """

    def __init__(self, capacity_bytes: int, *, max_waiting: int = 64, retry_after_s: int = 1,
                 on_drain: Callable[[], None] | None = None) -> None:
        if capacity_bytes < 1:
            raise InputError(f"the memory budget must be positive, got {capacity_bytes} bytes",
                             code=ErrorCode.BAD_OPTION)
        self.capacity, self.max_waiting, self.retry_after_s = capacity_bytes, max_waiting, retry_after_s
        self.in_use = 0
        self.on_drain = on_drain
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Reservations waiting for memory now."""
        return len(self._waiters)

    def check(self, cost: int, what: str = "this request") -> None:
        """Raise InputError "over_budget" (HTTP 413) when ``cost`` bytes could never be admitted."""
        if cost > self.capacity:
            raise InputError(f"{what} needs about {cost / MiB:.0f} MiB of working memory, more than this server's "
                             f"whole budget of {self.capacity / MiB:.0f} MiB; send a smaller image",
                             code=ErrorCode.OVER_BUDGET)

    @asynccontextmanager
    async def reserve(self, cost: int, what: str = "this request") -> AsyncIterator[None]:
        """Hold ``cost`` bytes for the duration; waits while they do not fit.

        Raises:
            InputError: "over_budget" when ``cost`` exceeds the capacity.
            QueueFull: ``max_waiting`` reservations are already waiting.
        """
        self.check(cost, what)
        if not self._waiters and self.in_use + cost <= self.capacity:
            self.in_use += cost
        else:
            if len(self._waiters) >= self.max_waiting:
                raise QueueFull(f"{self.waiting} requests are already waiting for memory "
                                f"({self.in_use / MiB:.0f} of {self.capacity / MiB:.0f} MiB in use); retry later",
                                self.retry_after_s)
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (cost, granted)
            self._waiters.append(entry)
            try:
                await granted
            except asyncio.CancelledError:  # a deadline or a disconnect while waiting
                if granted.done() and not granted.cancelled():
                    self._release(cost)  # granted in the same tick it was cancelled
                else:
                    self._waiters.remove(entry)
                    self._grant()  # it may have been the head blocking smaller ones
                raise
        try:
            yield
        finally:
            self._release(cost)

    def _release(self, cost: int) -> None:
        self.in_use -= cost
        self._grant()
        if self.in_use == 0 and self.on_drain is not None:
            self.on_drain()

    def _grant(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            cost, granted = self._waiters.popleft()
            self.in_use += cost
            granted.set_result(None)


# -- the allocator ---------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc <malloc.h>


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_allocator(*, mmap_threshold: int = 1 * MiB, trim_threshold: int = 8 * MiB, arena_max: int = 2) -> bool:
    """Make glibc give big buffers back to the OS (``mallopt(3)``); call once, early, in a server process.

    - ``M_MMAP_THRESHOLD`` fixed at 1 MiB: image-sized buffers are mmapped and unmapped on free. glibc's
      default threshold grows with each freed buffer up to 32 MiB, after which crops and strips of big
      photos live in arenas and stay resident.
    - ``M_ARENA_MAX`` 2: every thread of a pool would otherwise get an arena (8 per core) and keep its own
      free memory.
    - ``M_TRIM_THRESHOLD`` 8 MiB: the top of the heap is returned once that much is free.

    Returns False (and does nothing) off glibc. Equivalent environment: ``MALLOC_MMAP_THRESHOLD_=1048576
    MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=8388608``.
    """
    libc = _glibc()
    if libc is None:
        return False
    # a list, not a generator: one refused setting must not skip the others
    ok = all([libc.mallopt(param, value) == 1 for param, value in
              ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_ARENA_MAX, arena_max))])
    if not ok:
        log.warning("mallopt refused a setting; memory may stay resident after bursts")
    return ok


def release_free_memory() -> None:
    """Return free heap memory of every arena to the OS (glibc ``malloc_trim(0)``); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_free_memory_soon() -> None:
    """:func:`release_free_memory` on the running loop's default executor (``malloc_trim`` walks every arena,
    so it stays off the event loop); the ``on_drain`` of the gateway's and the batch job's budgets."""
    asyncio.get_running_loop().run_in_executor(None, release_free_memory)
