"""Error codes: one enum, its HTTP statuses (through the real gateway app) and CLI exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cleanplate.engines import EngineUnavailable
from cleanplate.errors import (
    FAILURES,
    HTTP_STATUS,
    BundleError,
    CleanplateError,
    ErrorCode,
    ExportError,
    InputError,
    QueueFull,
)
from cleanplate.serving.app import create_app
from cleanplate.serving.settings import Settings


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client():
    """The real gateway app on the opencv engine (no model to load), plus one route outside ``/v1/`` that
    raises ``CleanplateError(code=<path>)``, so every code goes through the app's own error handler."""
    app = create_app(Settings(engine="opencv", opencv_resolution=64, max_pixels=10_000, api_keys=["k1"]))

    @app.get("/raise/{code}")
    async def raise_code(code: str) -> None:
        if code == "queue_full":
            raise QueueFull("the queue is full", retry_after_s=7)
        if code == "engine_unavailable":
            raise EngineUnavailable("loading")
        raise CleanplateError(f"raised {code}", code=code)

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_every_code_has_a_slug_status_and_exit_code() -> None:
    slugs = [c.value for c in ErrorCode]
    assert len(slugs) == len(set(slugs))
    for code in ErrorCode:
        assert code.value == code.name.lower()  # BAD_OPTION <-> "bad_option"
        assert str(code) == f"{code}" == "{}".format(code) == code.value
        assert json.dumps({"code": code}) == json.dumps({"code": code.value})
        assert 400 <= code.http_status <= 599 and code.http_status == HTTP_STATUS.get(code, 422)
        assert code.exit_code == (1 if code in FAILURES else 2)
    assert str(ErrorCode.BAD_OPTION) == "bad_option" and f"{ErrorCode.EMPTY_MASK:>12}" == "  empty_mask"


def test_statuses_and_exit_codes_of_representative_codes() -> None:
    expected = {ErrorCode.BAD_OPTION: (422, 2), ErrorCode.SIZE_MISMATCH: (422, 2),
                ErrorCode.UNREADABLE_IMAGE: (400, 2), ErrorCode.UNSUPPORTED_IMAGE: (415, 2),
                ErrorCode.TOO_MANY_PIXELS: (413, 2), ErrorCode.OVER_BUDGET: (413, 2), ErrorCode.QUEUE_FULL: (429, 2),
                ErrorCode.ENGINE_UNAVAILABLE: (503, 2), ErrorCode.UNKNOWN_ITEM: (404, 2),
                ErrorCode.NO_LABELS: (409, 2), ErrorCode.EXPORT_FAILED: (422, 1), ErrorCode.INTERNAL: (500, 1)}
    for code, (status, exit_code) in expected.items():
        assert (code.http_status, code.exit_code) == (status, exit_code), code


def test_exception_classes_default_to_members_and_coerce_strings() -> None:
    assert (CleanplateError("x").code, InputError("x").code, BundleError("x").code, ExportError("x").code,
            QueueFull("x", 1).code, EngineUnavailable("x").code) == (
        ErrorCode.ERROR, ErrorCode.BAD_INPUT, ErrorCode.BAD_BUNDLE, ErrorCode.EXPORT_FAILED, ErrorCode.QUEUE_FULL,
        ErrorCode.ENGINE_UNAVAILABLE)
    err = InputError("x", code=ErrorCode.EMPTY_MASK)
    assert err.code is ErrorCode.EMPTY_MASK and err.code == "empty_mask"
    assert InputError("x", code="size_mismatch").code is ErrorCode.SIZE_MISMATCH  # a known slug is coerced


def test_unknown_code_string_is_refused() -> None:
    with pytest.raises(ValueError, match="bad_optoin"):
        InputError("x", code="bad_optoin")
    with pytest.raises(ValueError):
        ErrorCode("not_a_code")


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_gateway_answers_each_raised_code_with_its_status(client: TestClient, code: ErrorCode) -> None:
    r = client.get(f"/raise/{code}")
    assert r.status_code == code.http_status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert (body["status"], body["code"], body["type"]) == (code.http_status, code.value,
                                                            f"urn:cleanplate:problem:{code.value}")
    if code == ErrorCode.QUEUE_FULL:
        assert r.headers["retry-after"] == "7"
    if code == ErrorCode.ENGINE_UNAVAILABLE:
        assert r.headers["retry-after"] == "5"


def test_gateway_statuses_of_real_requests_follow_the_mapping(client: TestClient) -> None:
    """Codes raised (or answered) by the gateway's own checks, on real requests."""
    auth = {"Authorization": "Bearer k1"}
    image = png(np.full((40, 60, 3), 120, np.uint8))
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 10:20] = 255
    big = png(np.zeros((200, 200, 3), np.uint8))  # 40,000 px over max_pixels 10,000
    requests = {
        ErrorCode.UNAUTHORIZED: client.post("/v1/remove", files={"image": image, "mask": png(mask)}),
        ErrorCode.UNSUPPORTED_MEDIA_TYPE: client.post("/v1/remove", json={"image": "x"}, headers=auth),
        ErrorCode.UNREADABLE_IMAGE: client.post("/v1/remove", files={"image": b"", "mask": png(mask)}, headers=auth),
        ErrorCode.TOO_MANY_PIXELS: client.post("/v1/remove", files={"image": big, "mask": png(mask)}, headers=auth),
        ErrorCode.EMPTY_MASK: client.post("/v1/remove", files={"image": image, "mask": png(mask * 0)}, headers=auth),
        ErrorCode.NO_DISCRIMINATOR: client.post("/v1/score", files={"source": image, "result": image,
                                                                    "mask": png(mask)}, headers=auth),
        ErrorCode.INVALID_FIELD: client.post("/v1/remove", files={"image": image, "mask": png(mask)},
                                             data={"steps": "four"}, headers=auth),
        ErrorCode.NOT_FOUND: client.get("/v1/nothing", headers=auth),
        ErrorCode.METHOD_NOT_ALLOWED: client.get("/v1/remove", headers=auth),
    }
    for code, r in requests.items():
        assert (r.status_code, r.json()["code"]) == (code.http_status, code.value), (code, r.text[:300])
    ok = client.post("/v1/remove", files={"image": image, "mask": png(mask)}, headers=auth)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_cli_exit_code_comes_from_the_code(cli, tmp_path: Path) -> None:
    r = cli("batch", "summarize", tmp_path / "missing.jsonl")  # InputError bad_option
    assert r.code == ErrorCode.BAD_OPTION.exit_code == 2 and r.err.startswith("error: "), r.err
    (tmp_path / "repo").mkdir()
    r = cli("triton", "serve", tmp_path / "repo")  # ExportError export_failed: the repository holds no models
    assert r.code == ErrorCode.EXPORT_FAILED.exit_code == 1 and r.err.strip().endswith("holds no models"), r.err
