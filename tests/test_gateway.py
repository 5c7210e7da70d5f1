"""The REST gateway over real HTTP: uvicorn on 127.0.0.1, tiny bundles built in the tests, real photos."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import serve_in_thread
from PIL import Image

from cleanplate import imaging
from cleanplate.engines import TorchEngine
from cleanplate.serving.app import create_app
from cleanplate.serving.settings import Settings, load_settings


def png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt)
    return buf.getvalue()


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture(scope="module")
def coffee(photos) -> tuple[np.ndarray, np.ndarray]:
    """coffee (400x600 RGB) with a white "sticker" pasted in a box, and that box as the mask."""
    img = photos["coffee"].copy()
    mask = box_mask(400, 600, 150, 210, 250, 350)
    img[mask] = 255
    return img, mask


def settings(bundle: Path, **kw) -> Settings:
    return Settings(bundle=bundle, torch_threads=1, **kw)


class SlowEngine(TorchEngine):
    """The real torch engine with a fixed extra delay per batch, to fill queues and pass deadlines."""

    delay_s = 0.5

    def _run_inpaint(self, items):
        time.sleep(self.delay_s)
        return super()._run_inpaint(items)


@pytest.fixture(scope="module")
def server(gated_bundle: Path):
    with serve_in_thread(create_app(settings(gated_bundle, batch_window_ms=50))) as url:
        yield url


def post_remove(url: str, image: bytes, mask: bytes | None, data: dict | None = None, **kw) -> httpx.Response:
    files = {"image": ("image", image)}
    if mask is not None:
        files["mask"] = ("mask", mask)
    return httpx.post(url + "/v1/remove", files=files, data=data or {}, timeout=60, **kw)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- removal ---------------------------------------------------------------------------------------------
def test_remove_real_photo_bit_exact_outside_dilated_mask(server: str, coffee) -> None:
    img, mask = coffee
    r = post_remove(server, png(img), png(mask.astype(np.uint8) * 255), {"dilate_px": "6", "seed": "3"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-cleanplate-attempts"] == "1" and "x-cleanplate-score" not in r.headers
    stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert {"decode", "prepare", "model", "composite", "encode", "total"} <= stages.keys()
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    assert out.shape == img.shape and out.dtype == np.uint8
    dilated = imaging.dilate_mask(mask, 6)
    assert np.array_equal(out[~dilated], img[~dilated])
    assert np.abs(out[mask].astype(int) - 255).mean() > 20  # the white sticker is gone


def test_same_request_same_bytes_and_json_matches_image(server: str, coffee) -> None:
    img, mask = coffee
    args = (server, png(img), png(mask.astype(np.uint8) * 255), {"seed": "7"})
    first, second = post_remove(*args), post_remove(*args)
    as_json = post_remove(*args, headers={"Accept": "application/json"})
    assert first.content == second.content
    assert as_json.headers["content-type"] == "application/json"
    body = as_json.json()
    assert base64.b64decode(body["image"]) == first.content
    assert (body["width"], body["height"], body["media_type"], body["attempts"], body["seed"]) == (600, 400, "image/png", 1, 7)
    assert body["score"] is None and body["passed"] is None
    other_seed = post_remove(server, png(img), png(mask.astype(np.uint8) * 255), {"seed": "8"})
    assert other_seed.content != first.content


@pytest.mark.parametrize("case", ["jpeg", "webp_out", "gray", "rgba_keep_alpha", "alpha_mask"])
def test_format_mode_and_alpha(server: str, coffee, case: str) -> None:
    img, mask = coffee
    mask_png = png(mask.astype(np.uint8) * 255)
    data: dict = {}
    if case == "jpeg":
        image, want_type, want_mode = png(img, fmt="JPEG"), "image/jpeg", "RGB"
    elif case == "webp_out":
        image, want_type, want_mode = png(img), "image/webp", "RGB"
        data["output_format"] = "webp"
    elif case == "gray":
        image, want_type, want_mode = png(img[..., 1]), "image/png", "L"
    elif case == "rgba_keep_alpha":
        alpha = np.full(img.shape[:2], 200, np.uint8)
        image, want_type, want_mode = png(np.dstack([img, alpha])), "image/png", "RGBA"
    else:  # the mask is the transparent region; the result is opaque
        alpha = np.where(mask, 0, 255).astype(np.uint8)
        image, want_type, want_mode, mask_png = png(np.dstack([img, alpha])), "image/png", "RGB", None
    r = post_remove(server, image, mask_png, data)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == want_type
    out = Image.open(io.BytesIO(r.content))
    assert out.size == (600, 400) and out.mode == want_mode
    if case == "rgba_keep_alpha":
        assert (np.asarray(out)[..., 3] == 200).all()


# -- quality gate and scoring ---------------------------------------------------------------------------
def test_gate_retries_until_max_attempts_and_reports(server: str, coffee) -> None:
    img, mask = coffee
    gated = {"quality_gate": "true", "threshold": "1.0", "max_attempts": "3", "seed": "10"}
    before = metric(server, "cleanplate_gate_results_total", passed="false")
    r = post_remove(server, png(img), png(mask.astype(np.uint8) * 255), gated, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["attempts"] == 3 and body["passed"] is False and body["threshold"] == 1.0
    assert 0.0 <= body["score"] < 1.0 and 10 <= body["seed"] <= 12
    assert r.headers["x-cleanplate-passed"] == "false" and r.headers["x-cleanplate-attempts"] == "3"
    assert "gate" in r.headers["server-timing"]
    assert metric(server, "cleanplate_gate_results_total", passed="false") == before + 1
    # The returned attempt is the best-scoring of the three seeds.
    scores = []
    for seed in (10, 11, 12):
        one = post_remove(server, png(img), png(mask.astype(np.uint8) * 255),
                          {"quality_gate": "true", "threshold": "0", "seed": str(seed)})
        assert one.headers["x-cleanplate-attempts"] == "1" and one.headers["x-cleanplate-passed"] == "true"
        scores.append(float(one.headers["x-cleanplate-score"]))
    assert body["score"] == pytest.approx(max(scores), abs=1e-6)
    assert body["seed"] == 10 + int(np.argmax(scores))


def test_score_endpoint_agrees_with_gate(server: str, coffee) -> None:
    img, mask = coffee
    mask_png = png(mask.astype(np.uint8) * 255)
    r = post_remove(server, png(img), mask_png, {"quality_gate": "true", "threshold": "0"})
    score = float(r.headers["x-cleanplate-score"])
    s = httpx.post(server + "/v1/score", files={"source": png(img), "result": r.content, "mask": mask_png},
                   data={"threshold": "0.25"}, timeout=60)
    assert s.status_code == 200, s.text
    assert s.json()["score"] == pytest.approx(score, abs=1e-5)
    assert s.json()["threshold"] == 0.25 and s.json()["passed"] == (score >= 0.25)
    # the source itself (nothing removed) is a different removal, with a different score
    same = httpx.post(server + "/v1/score", files={"source": png(img), "result": png(img), "mask": mask_png}, timeout=60)
    assert same.status_code == 200 and same.json()["score"] != pytest.approx(score, abs=1e-6)


def test_gate_without_discriminator_is_422(tiny_bundle: Path, coffee) -> None:
    img, mask = coffee
    with serve_in_thread(create_app(settings(tiny_bundle))) as url:
        r = post_remove(url, png(img), png(mask.astype(np.uint8) * 255), {"quality_gate": "true"})
        assert r.status_code == 422 and r.json()["code"] == "no_discriminator"
        s = httpx.post(url + "/v1/score", files={"source": png(img), "result": png(img),
                                                 "mask": png(mask.astype(np.uint8) * 255)})
        assert s.status_code == 422 and s.headers["content-type"] == "application/problem+json"
        assert httpx.get(url + "/readyz").json()["quality_gate"] is False


# -- micro-batching --------------------------------------------------------------------------------------
def test_micro_batching_groups_concurrent_requests_without_changing_results(gated_bundle: Path, coffee) -> None:
    img, mask = coffee
    image, mask_png = png(img), png(mask.astype(np.uint8) * 255)

    async def burst(url: str, n: int) -> list[bytes]:
        async with httpx.AsyncClient(timeout=60) as client:
            rs = await asyncio.gather(*[client.post(url + "/v1/remove", files={"image": image, "mask": mask_png},
                                                    data={"seed": str(i)}) for i in range(n)])
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.content for r in rs]

    with serve_in_thread(create_app(settings(gated_bundle, max_batch=4, batch_window_ms=300))) as url:
        batched = asyncio.run(burst(url, 4))
        n_batches = metric(url, "cleanplate_batch_size_count", queue="inpaint")
        items = metric(url, "cleanplate_batch_size_sum", queue="inpaint")
        assert items == 4 and n_batches < 4  # at least two requests shared a batch
    with serve_in_thread(create_app(settings(gated_bundle, max_batch=1))) as url:
        single = asyncio.run(burst(url, 4))
        assert metric(url, "cleanplate_batch_size_count", queue="inpaint") == 4
    # per-item seeds: a batch does not change anyone's result (beyond float summation order, +-1 level)
    for a, b in zip(batched, single, strict=True):
        diff = np.abs(np.asarray(Image.open(io.BytesIO(a)), int) - np.asarray(Image.open(io.BytesIO(b)), int))
        assert diff.max() <= 2 and diff.mean() < 0.01


# -- limits and errors -----------------------------------------------------------------------------------
def test_queue_full_is_429_with_retry_after(gated_bundle: Path, coffee) -> None:
    img, mask = coffee
    image, mask_png = png(img), png(mask.astype(np.uint8) * 255)
    s = settings(gated_bundle, max_batch=1, max_queue=2)

    async def flood(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(url + "/v1/remove", files={"image": image, "mask": mask_png})
                                          for _ in range(8)])

    with serve_in_thread(create_app(s, engine=SlowEngine(gated_bundle, max_batch=1, max_queue=2, torch_threads=1))) as url:
        rs = asyncio.run(flood(url))
        codes = sorted(r.status_code for r in rs)
        assert set(codes) == {200, 429} and codes.count(200) >= 3  # 1 running + 2 queued at least
        limited = next(r for r in rs if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["code"] == "queue_full"
        assert metric(url, "cleanplate_requests_total", endpoint="/v1/remove", status="429") == codes.count(429)


def test_deadline_is_504_and_the_server_recovers(gated_bundle: Path, coffee) -> None:
    img, mask = coffee
    s = settings(gated_bundle, request_timeout_s=0.2)
    with serve_in_thread(create_app(s, engine=SlowEngine(gated_bundle, torch_threads=1))) as url:
        r = post_remove(url, png(img), png(mask.astype(np.uint8) * 255))
        assert r.status_code == 504 and r.json()["code"] == "deadline"
        # Recovery, not speed, is under test here: the next request gets a deadline no machine misses
        # (the guard reads the setting per request), and must still be served while the timed-out
        # batch may hold the model thread.
        s.request_timeout_s = 60.0
        ok = post_remove(url, png(img), png(mask.astype(np.uint8) * 255))
        assert ok.status_code == 200, ok.text
        assert metric(url, "cleanplate_requests_total", endpoint="/v1/remove", status="504") == 1


def test_api_keys(gated_bundle: Path, coffee) -> None:
    img, mask = coffee
    with serve_in_thread(create_app(settings(gated_bundle, api_keys=["k-one", "k-two"]))) as url:
        files = {"image": png(img), "mask": png(mask.astype(np.uint8) * 255)}
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k-one"}):
            r = httpx.post(url + "/v1/remove", files=files, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["content-type"] == "application/problem+json"
        assert httpx.post(url + "/v1/remove", files=files, headers={"Authorization": "Bearer k-two"}).status_code == 200
        assert httpx.get(url + "/healthz").status_code == 200  # probes need no key
        assert httpx.get(url + "/metrics").status_code == 200


def test_draining_answers_503_but_stays_alive(gated_bundle: Path, coffee) -> None:
    img, mask = coffee
    app = create_app(settings(gated_bundle))
    with serve_in_thread(app) as url:
        app.state.draining = True
        r = post_remove(url, png(img), png(mask.astype(np.uint8) * 255))
        assert r.status_code == 503 and r.json()["code"] == "draining" and r.headers["retry-after"] == "1"
        assert httpx.get(url + "/readyz").status_code == 503
        assert httpx.get(url + "/healthz").status_code == 200


def test_sigterm_finishes_in_flight_requests(coffee) -> None:
    """`cleanplate serve` with the default bundle: a 50-step removal in flight when SIGTERM arrives
    still gets its 200, and the process then shuts down cleanly."""
    img, mask = coffee
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cleanplate.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**_env(), "CLEANPLATE_TORCH_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

        async def in_flight() -> httpx.Response:
            async with httpx.AsyncClient(timeout=120) as client:
                task = asyncio.create_task(client.post(url + "/v1/remove", data={"steps": "50"},
                                                       files={"image": png(img), "mask": png(mask.astype(np.uint8) * 255)}))
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                return await task

        r = asyncio.run(in_flight())
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (600, 400)
        # uvicorn re-raises the signal once shutdown is complete, so the exit status is "killed by SIGTERM"
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert b"Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CLEANPLATE_")}


# -- metrics, docs, settings ------------------------------------------------------------------------------
def test_metrics_move(server: str, coffee) -> None:
    img, mask = coffee
    before = metric(server, "cleanplate_requests_total", endpoint="/v1/remove", status="200")
    bad_before = metric(server, "cleanplate_requests_total", endpoint="/v1/remove", status="422")
    post_remove(server, png(img), png(mask.astype(np.uint8) * 255))
    post_remove(server, png(img), png(np.zeros((400, 600), np.uint8)))  # empty mask: 422
    assert metric(server, "cleanplate_requests_total", endpoint="/v1/remove", status="200") == before + 1
    assert metric(server, "cleanplate_requests_total", endpoint="/v1/remove", status="422") == bad_before + 1
    assert metric(server, "cleanplate_request_duration_seconds_count", endpoint="/v1/remove", status="200") >= 1
    assert metric(server, "cleanplate_stage_duration_seconds_count", stage="model") >= 1
    assert metric(server, "cleanplate_engine_ready") == 1
    text = httpx.get(server + "/metrics").text
    for name in ("cleanplate_queue_depth", "cleanplate_batch_size_bucket", "cleanplate_gate_pass_rate"):
        assert name in text


def test_openapi_matches_responses(server: str) -> None:
    spec = httpx.get(server + "/openapi.json").json()
    remove = spec["paths"]["/v1/remove"]["post"]
    ok = remove["responses"]["200"]
    assert {"image/png", "image/jpeg", "image/webp", "application/json"} <= ok["content"].keys()
    assert ok["content"]["application/json"]["schema"]["$ref"].endswith("/RemoveResult")
    assert {"X-Cleanplate-Score", "X-Cleanplate-Passed", "X-Cleanplate-Attempts", "Server-Timing"} <= ok["headers"].keys()
    for status in ("400", "401", "408", "413", "415", "422", "429", "503", "504"):
        assert "application/problem+json" in remove["responses"][status]["content"], status
    form = remove["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    fields = spec["components"]["schemas"][form]["properties"].keys()
    assert {"image", "mask", "dilate_px", "steps", "seed", "quality_gate", "threshold", "max_attempts",
            "output_format"} <= fields
    assert spec["paths"]["/v1/score"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] \
        .endswith("/ScoreResult")
    assert httpx.get(server + "/docs").status_code == 200


def test_settings_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('max_batch = 4\nmax_queue = 9\napi_keys = ["sekrit-key-1"]\n')
    monkeypatch.delenv("CLEANPLATE_CONFIG", raising=False)
    monkeypatch.setenv("CLEANPLATE_MAX_QUEUE", "17")
    s = load_settings(config, port=9000)
    assert (s.max_batch, s.max_queue, s.port) == (4, 17, 9000)  # file < env < explicit
    assert [k.get_secret_value() for k in s.api_keys] == ["sekrit-key-1"] and "sekrit" not in repr(s)
    from cleanplate.errors import InputError

    with pytest.raises(InputError, match="max_batch"):
        load_settings(None, max_batch=0)
    monkeypatch.setenv("CLEANPLATE_ENGINE", "tensorflow")
    with pytest.raises(InputError, match="engine"):
        load_settings(None)


def test_serve_bad_settings_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "cleanplate.cli", "serve", "--max-batch", "0"], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: settings: max_batch")
    r = subprocess.run([sys.executable, "-m", "cleanplate.cli", "serve", "--bundle", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and "bundle" in r.stderr.strip().splitlines()[-1]


def test_opencv_engine(coffee) -> None:
    img, mask = coffee
    with serve_in_thread(create_app(Settings(engine="opencv"))) as url:
        assert httpx.get(url + "/readyz").json()["engine"] == "opencv"
        r = post_remove(url, png(img), png(mask.astype(np.uint8) * 255), {"dilate_px": "4"})
        assert r.status_code == 200
        out = np.asarray(Image.open(io.BytesIO(r.content)))
        dilated = imaging.dilate_mask(mask, 4)
        assert np.array_equal(out[~dilated], img[~dilated])
        assert np.abs(out[mask].astype(int) - 255).mean() > 50  # Telea fills from the coffee around it
        gated = post_remove(url, png(img), png(mask.astype(np.uint8) * 255), {"quality_gate": "true"})
        assert gated.status_code == 422 and json.loads(gated.text)["code"] == "no_discriminator"
