"""One writer per folder: the advisory lock that batch runs, `flywheel generate` and `data disc-labels` take on
their output folder (filelock; the kernel drops it if the process dies, so a killed run never leaves a
stale lock behind)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import ErrorCode, InputError


@contextmanager
def exclusive(directory: str | Path, lock_name: str, busy: str) -> Iterator[None]:
    """Hold ``directory/lock_name`` for the duration, without waiting (the folder is created).

    Raises:
        InputError: code "busy" with the message ``busy`` when another process holds it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / lock_name, timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise InputError(busy, code=ErrorCode.BUSY) from exc
    try:
        yield
    finally:
        lock.release()
