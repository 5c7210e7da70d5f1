"""Bad-input sweep against a real server: every case gets a 4xx problem+json, and the server stays healthy."""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import serve_in_thread
from PIL import Image

from cleanplate.serving.app import create_app
from cleanplate.serving.settings import Settings

H, W = 96, 128
LIMIT = 2 * 1024 * 1024


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h, with one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photo(photos) -> np.ndarray:
    return np.ascontiguousarray(photos["chelsea"][:H, :W])


@pytest.fixture(scope="module")
def good_mask() -> bytes:
    mask = np.zeros((H, W), np.uint8)
    mask[30:60, 40:80] = 255
    return encode(mask)


@pytest.fixture(scope="module")
def server(gated_bundle: Path):
    s = Settings(bundle=gated_bundle, torch_threads=1, max_upload_bytes=LIMIT, body_timeout_s=1.0,
                 max_pixels=4_000_000)
    with serve_in_thread(create_app(s)) as url:
        yield url


def cases(photo: np.ndarray, good_mask: bytes) -> dict[str, tuple[dict, int, str]]:
    """name -> (httpx request kwargs, expected status, expected problem code)."""
    png, jpeg = encode(photo), encode(photo, "JPEG")
    gray_mask = np.zeros((H, W), np.uint8)
    gray_mask[30:60, 40:80] = 100  # a soft mask whose every value is under 50%: empty once binarized
    return {
        "truncated png": ({"files": {"image": png[: len(png) // 2], "mask": good_mask}}, 400, "unreadable_image"),
        "truncated jpeg": ({"files": {"image": jpeg[: len(jpeg) // 3], "mask": good_mask}}, 400, "unreadable_image"),
        "corrupt png header": ({"files": {"image": png[:29] + bytes(4) + png[33:], "mask": good_mask}}, 400,
                               "unreadable_image"),
        "corrupt jpeg header": ({"files": {"image": jpeg[:2] + bytes(40) + jpeg[42:], "mask": good_mask}}, 400,
                                "unreadable_image"),
        "text as image": ({"files": {"image": b"hello, I am not a picture", "mask": good_mask}}, 415,
                          "unsupported_image"),
        "corrupt mask": ({"files": {"image": png, "mask": b"\x00\x01garbage"}}, 415, "unsupported_image"),
        "zero-byte image": ({"files": {"image": b"", "mask": good_mask}}, 400, "unreadable_image"),
        "json body": ({"json": {"image": "x"}}, 415, "unsupported_media_type"),
        "urlencoded body": ({"data": {"image": "x"}}, 415, "unsupported_media_type"),
        "plain text body": ({"content": b"image", "headers": {"content-type": "text/plain"}}, 415,
                            "unsupported_media_type"),
        "no content type": ({"content": b"image"}, 415, "unsupported_media_type"),
        "multipart without boundary": ({"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
                                       400, "bad_multipart"),
        "missing image field": ({"files": {"mask": good_mask}}, 422, "invalid_field"),
        "20000x20000 image": ({"files": {"image": png_header_only(20000, 20000), "mask": good_mask}}, 413,
                              "too_many_pixels"),
        "20000x20000 mask": ({"files": {"image": png, "mask": png_header_only(20000, 20000)}}, 413,
                             "too_many_pixels"),
        "body over limit": ({"files": {"image": bytes(LIMIT + 10), "mask": good_mask}}, 413, "too_large"),
        "mismatched mask size": ({"files": {"image": png, "mask": encode(np.zeros((H // 2, W), np.uint8))}}, 422,
                                 "size_mismatch"),
        "empty mask": ({"files": {"image": png, "mask": encode(np.zeros((H, W), np.uint8))}}, 422, "empty_mask"),
        "soft mask under 50%": ({"files": {"image": png, "mask": encode(gray_mask)}}, 422, "empty_mask"),
        "full mask": ({"files": {"image": png, "mask": encode(np.full((H, W), 255, np.uint8))}}, 422, "full_mask"),
        "opaque image, no mask": ({"files": {"image": png}, "data": {"auto_mask": "false"}}, 422, "no_alpha"),
        "opaque image, no mask, no detector": ({"files": {"image": png}}, 422, "no_detector"),
        "auto_mask not a bool": ({"files": {"image": png}, "data": {"auto_mask": "maybe"}}, 422, "invalid_field"),
        "huge form field": ({"files": {"image": png, "mask": good_mask}, "data": {"seed": "9" * 1_500_000}}, 400,
                            "bad_multipart"),
        "form field over body limit": ({"files": {"image": png, "mask": good_mask}, "data": {"seed": "9" * (LIMIT + 1)}},
                                       413, "too_large"),
        "negative seed": ({"files": {"image": png, "mask": good_mask}, "data": {"seed": "-1"}}, 422, "invalid_field"),
        "steps not a number": ({"files": {"image": png, "mask": good_mask}, "data": {"steps": "four"}}, 422,
                               "invalid_field"),
        "steps 0": ({"files": {"image": png, "mask": good_mask}, "data": {"steps": "0"}}, 422, "invalid_field"),
        "threshold 2": ({"files": {"image": png, "mask": good_mask}, "data": {"threshold": "2"}}, 422,
                        "invalid_field"),
        "too many attempts": ({"files": {"image": png, "mask": good_mask},
                               "data": {"quality_gate": "true", "max_attempts": "1000"}}, 422, "invalid_field"),
        "unknown output format": ({"files": {"image": png, "mask": good_mask}, "data": {"output_format": "gif"}},
                                  422, "invalid_field"),
        "dilation too large": ({"files": {"image": png, "mask": good_mask}, "data": {"dilate_px": "100000"}}, 422,
                               "invalid_field"),
    }


CASE_NAMES = list(cases(np.zeros((H, W, 3), np.uint8), b"").keys())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_4xx_problem(server: str, photo: np.ndarray, good_mask: bytes, name: str) -> None:
    kwargs, status, code = cases(photo, good_mask)[name]
    r = httpx.post(server + "/v1/remove", timeout=60, **kwargs)
    assert r.status_code == status, (name, r.text[:300])
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["code"] == code and body["detail"] and body["instance"] == "/v1/remove"


def test_score_bad_input(server: str, photo: np.ndarray, good_mask: bytes) -> None:
    png = encode(photo)
    smaller = encode(photo[: H // 2])
    r = httpx.post(server + "/v1/score", files={"source": png, "result": smaller, "mask": good_mask})
    assert r.status_code == 422 and r.json()["code"] == "size_mismatch"
    r = httpx.post(server + "/v1/score", files={"source": png, "result": b"nope", "mask": good_mask})
    assert r.status_code == 415


def test_slow_client_gets_408(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/remove HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\n")
        t0 = time.monotonic()
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert time.monotonic() - t0 < 5


def test_unknown_route_and_method(server: str) -> None:
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = httpx.get(server + "/v1/remove")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


def test_server_is_healthy_after_the_sweep(server: str, photo: np.ndarray, good_mask: bytes) -> None:
    """No case caused a 5xx on /v1/ (/readyz answers 503 while the model loads), and a good request still works."""
    for name in CASE_NAMES:  # run the whole sweep again, in one go, to be independent of test order
        kwargs, status, _ = cases(photo, good_mask)[name]
        assert httpx.post(server + "/v1/remove", timeout=60, **kwargs).status_code == status, name
    assert httpx.get(server + "/healthz").status_code == 200
    assert httpx.get(server + "/readyz").status_code == 200
    r = httpx.post(server + "/v1/remove", files={"image": encode(photo), "mask": good_mask}, timeout=60)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (W, H)
    text = httpx.get(server + "/metrics").text
    fivexx = [line for line in text.splitlines()
              if line.startswith("cleanplate_requests_total{") and 'status="5' in line and "/v1/" in line]
    assert fivexx == []
