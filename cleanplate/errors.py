"""Errors a caller can cause, kept apart from bugs, and the one list of their codes.

Every exception a client can trigger derives from :class:`CleanplateError`, whose ``code`` is an
:class:`ErrorCode`. The code decides how the error leaves the process: :attr:`ErrorCode.http_status` is the
gateway's (and the label server's) HTTP status for a problem+json body, :attr:`ErrorCode.exit_code` the
CLI's exit status (2 for a caller's mistake, 1 when the input was fine and the work failed).
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Every error code cleanplate emits: in ``CleanplateError.code``, the problem+json ``code`` and
    ``type`` (``urn:cleanplate:problem:<code>``) of the gateway, the batch report's ``error.code``.

    ``str(code)``, f-strings and JSON give the bare slug (``"bad_option"``). ``ErrorCode("typo")`` raises
    ``ValueError``, so an unknown code fails where it is written.
    """

    # -- caller errors raised as exceptions (CLI exit 2) ----------------------------------------------
    ERROR = "error"  # CleanplateError's default; every raise names a more specific code
    BAD_INPUT = "bad_input"  # InputError's default: an unusable image, mask or value
    BAD_OPTION = "bad_option"  # an option (CLI, config, request, function argument) out of range or inconsistent
    BAD_MANIFEST = "bad_manifest"  # a batch manifest line or field is unusable (the command stops before work)
    BAD_BUNDLE = "bad_bundle"  # BundleError's default: a bundle directory misses a file or is inconsistent
    BAD_EXPORT = "bad_export"  # a directory is not a `cleanplate export onnx` output
    UNREADABLE_IMAGE = "unreadable_image"  # a missing, empty or corrupt image or mask file (HTTP 400)
    UNSUPPORTED_IMAGE = "unsupported_image"  # an image format the decoders do not read (HTTP 415)
    TOO_MANY_PIXELS = "too_many_pixels"  # the header says more pixels than the limit (HTTP 413)
    OVER_BUDGET = "over_budget"  # one image costs more memory than the whole admission budget (HTTP 413)
    SIZE_MISMATCH = "size_mismatch"  # mask (or GT) size differs from the image's
    EMPTY_MASK = "empty_mask"  # the mask selects nothing
    FULL_MASK = "full_mask"  # the (dilated) mask covers the whole image
    NO_ALPHA = "no_alpha"  # the mask is to come from an alpha channel the image lacks
    MISSING_MASK = "missing_mask"  # a folder listing found no mask for an image
    NO_DISCRIMINATOR = "no_discriminator"  # scoring or gating asked of a model without a discriminator
    NO_DETECTOR = "no_detector"  # an automatic mask asked of a model without an overlay detector
    INVALID_FIELD = "invalid_field"  # a request form field fails validation (gateway)
    BUSY = "busy"  # another process holds the folder's lock
    MISSING_DEPENDENCY = "missing_dependency"  # an optional package the command needs is not installed
    INVALID_MANIFEST = "invalid_manifest"  # `deploy render --check`: a rendered object fails validation
    LINT = "lint"  # `deploy lint`: helm lint reported a warning or error
    UNKNOWN_ITEM = "unknown_item"  # label store / server: no such item or file kind (HTTP 404)
    NO_LABELS = "no_labels"  # label export with nothing labelled (HTTP 409)
    BAD_LABEL = "bad_label"  # a label outside the store's choices
    BAD_LABELER = "bad_labeler"  # an unusable labeler name
    QUEUE_FULL = "queue_full"  # QueueFull: a bounded queue is full; retry later (HTTP 429 + Retry-After)
    ENGINE_UNAVAILABLE = "engine_unavailable"  # the engine is loading, stopped or unreachable (HTTP 503)
    TENSORRT_UNAVAILABLE = "tensorrt_unavailable"  # no tensorrt package or no CUDA GPU here
    TRITON_UNAVAILABLE = "triton_unavailable"  # the Triton environment is missing or the server did not start
    GATEWAY_UNREACHABLE = "gateway_unreachable"  # batch: the gateway is not ready in time, or a request failed
    GATEWAY_BUSY = "gateway_busy"  # batch: the gateway kept answering 429/503 past the item's wait limit
    GATEWAY_ERROR = "gateway_error"  # batch: the gateway answered with a code this client does not know
    ABORTED = "aborted"  # batch: the gateway refused the API key; the run stops
    # -- refusals the gateway answers itself (problem+json, no exception) -------------------------------
    UNAUTHORIZED = "unauthorized"  # missing or wrong API key (HTTP 401)
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # the request body is not multipart/form-data (HTTP 415)
    TOO_LARGE = "too_large"  # the request body is over max_upload_bytes (HTTP 413)
    BODY_TIMEOUT = "body_timeout"  # the body did not arrive within body_timeout_s (HTTP 408)
    DEADLINE = "deadline"  # the request ran past request_timeout_s (HTTP 504)
    DRAINING = "draining"  # the server is shutting down (HTTP 503)
    BAD_MULTIPART = "bad_multipart"  # Starlette could not parse the multipart body (HTTP 400)
    NOT_FOUND = "not_found"  # no such route (HTTP 404)
    METHOD_NOT_ALLOWED = "method_not_allowed"  # wrong method for the route (HTTP 405)
    HTTP_ERROR = "http_error"  # any other Starlette HTTP error (its own status)
    # -- failures of the work, not the input (CLI exit 1) -----------------------------------------------
    EXPORT_FAILED = "export_failed"  # ExportError's default: an export failed or does not match PyTorch
    INTERNAL = "internal"  # a bug: HTTP 500 (logged), a batch item's error line

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def http_status(self) -> int:
        """The HTTP status of a problem+json answer with this code: :data:`HTTP_STATUS`, else 422."""
        return HTTP_STATUS.get(self, 422)

    @property
    def exit_code(self) -> int:
        """The CLI's exit status for an error with this code: 1 for :data:`FAILURES`, else 2."""
        return 1 if self in FAILURES else 2


# HTTP status of every code that is not 422 (ErrorCode.http_status). HTTP_ERROR carries Starlette's status;
# 400 is what it gets when none is given.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.UNREADABLE_IMAGE: 400, ErrorCode.BAD_MULTIPART: 400, ErrorCode.HTTP_ERROR: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.UNKNOWN_ITEM: 404, ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.BODY_TIMEOUT: 408,
    ErrorCode.NO_LABELS: 409,
    ErrorCode.TOO_LARGE: 413, ErrorCode.TOO_MANY_PIXELS: 413, ErrorCode.OVER_BUDGET: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415, ErrorCode.UNSUPPORTED_IMAGE: 415,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.ENGINE_UNAVAILABLE: 503, ErrorCode.DRAINING: 503,
    ErrorCode.DEADLINE: 504,
}

# Codes that mean the input was fine and the work failed: CLI exit 1 (ErrorCode.exit_code); the rest exit 2.
FAILURES: frozenset[ErrorCode] = frozenset({ErrorCode.EXPORT_FAILED, ErrorCode.INTERNAL})


class CleanplateError(Exception):
    """Base of every error cleanplate raises on purpose.

    Attributes:
        code: an :class:`ErrorCode` (``ErrorCode.EMPTY_MASK``...): the class's default, or the ``code``
            given to the constructor.

    Raises:
        ValueError: ``code`` is a string that is no :class:`ErrorCode` value (a typo fails at the raise).
    """

    code: ErrorCode = ErrorCode.ERROR

    def __init__(self, message: str, *, code: ErrorCode | str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)


class InputError(CleanplateError, ValueError):
    """The image, the mask or an option is unusable (unreadable file, size mismatch, empty mask,
    mask covering everything, too many pixels, out-of-range option)."""

    code = ErrorCode.BAD_INPUT


class BundleError(CleanplateError):
    """A model bundle directory is missing a file or holds something inconsistent."""

    code = ErrorCode.BAD_BUNDLE


class ExportError(CleanplateError):
    """An export (ONNX, TensorRT, Triton repository) failed or does not match PyTorch; the CLI exits 1."""

    code = ErrorCode.EXPORT_FAILED


class QueueFull(CleanplateError):
    """A bounded queue (the engine's, or requests waiting for memory) is full; retry after
    ``retry_after_s`` seconds (HTTP 429 with Retry-After)."""

    code = ErrorCode.QUEUE_FULL

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(CleanplateError):
    """The engine is loading, stopped or unreachable (HTTP 503)."""

    code = ErrorCode.ENGINE_UNAVAILABLE


class BatchAborted(CleanplateError):
    """A problem no item can get past (the gateway refuses the API key): the run stops after the items
    in flight, and the CLI exits 2."""

    code = ErrorCode.ABORTED


class GatewayError(CleanplateError):
    """The gateway answered an item with an error (its problem+json ``code``, or ``GATEWAY_ERROR`` when
    that is no :class:`ErrorCode`, e.g. a proxy's non-JSON 502) or could not be reached."""

    code = ErrorCode.GATEWAY_ERROR


class TritonUnavailable(CleanplateError):
    """The Triton environment is missing, or the server did not start (CLI exit 2)."""

    code = ErrorCode.TRITON_UNAVAILABLE


class TensorRTUnavailable(CleanplateError):
    """No ``tensorrt`` package or no CUDA GPU here (CLI exit 2)."""

    code = ErrorCode.TENSORRT_UNAVAILABLE


# -- optional dependencies -------------------------------------------------------------------------------
# The extra (pyproject.toml [project.optional-dependencies]) that installs each optional top-level module.
# The base install is what `cleanplate remove` needs; every other command's imports are lazy, so a missing
# module surfaces as a ModuleNotFoundError that :func:`missing_extra` turns into one line (CLI exit 2).
EXTRA_OF_MODULE: dict[str, str] = {
    "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve",
    "prometheus_client": "serve", "httpx": "serve",
    "onnx": "export", "onnxscript": "export", "tritonclient": "export",
    "accelerate": "train", "peft": "train", "tensorboard": "train", "transformers": "train",
    "skimage": "train", "scipy": "train",
    "matplotlib": "bench",
    "helm_python": "deploy", "kubernetes_validate": "deploy", "jsonschema": "deploy",
    "s3fs": "storage", "ray": "ray",
}


class MissingDependency(CleanplateError):
    """An optional package the command needs is not installed; the message names the extra to install."""

    code = ErrorCode.MISSING_DEPENDENCY


def missing_extra(exc: ImportError) -> MissingDependency | None:
    """The :class:`MissingDependency` for an ImportError of a module an extra installs, else None (a module
    of the base install that fails to import is a broken install, not a missing extra)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    return MissingDependency(f"this command needs {name}, which the base install leaves out: "
                             f'pip install "cleanplate[{extra}]"')


def require_extra(extra: str, *modules: str) -> None:
    """Raise :class:`MissingDependency` (naming ``extra``) unless every top-level module in ``modules`` is
    installed: a command group checks before it starts, so the error is not wrapped in its own (an export that
    fails)."""
    from importlib.util import find_spec

    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise MissingDependency(f"this command needs {', '.join(missing)}, which the base install leaves out: "
                                f'pip install "cleanplate[{extra}]"')
