"""Errors a caller can cause, kept apart from bugs.

Every exception a client can trigger derives from :class:`CleanplateError`; the CLI turns them into
exit code 2 with one line, and the gateway into an HTTP 4xx problem+json body.
"""

from __future__ import annotations


class CleanplateError(Exception):
    """Base of every error cleanplate raises on purpose.

    Attributes:
        code: a short stable slug (``"empty_mask"``, ``"size_mismatch"``...) for machines.
    """

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InputError(CleanplateError, ValueError):
    """The image, the mask or an option is unusable (unreadable file, size mismatch, empty mask,
    mask covering everything, too many pixels, out-of-range option)."""

    code = "bad_input"


class BundleError(CleanplateError):
    """A model bundle directory is missing a file or holds something inconsistent."""

    code = "bad_bundle"


class ExportError(CleanplateError):
    """An export (ONNX, TensorRT, Triton repository) failed or does not match PyTorch; the CLI exits 1."""

    code = "export_failed"


class QueueFull(CleanplateError):
    """A bounded queue (the engine's, or requests waiting for memory) is full; retry after
    ``retry_after_s`` seconds (HTTP 429 with Retry-After)."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
