"""Auto-mask (issue 17): the shipped overlay detector's mask through every path that takes a mask. On a real
photo with a drawn promo overlay, ``cleanplate detect``, ``remove --auto-mask``, the gateway's ``/v1/detect``
and mask-less ``/v1/remove``, the opencv engine and ``batch run --auto-mask`` (in-process and through the
gateway) give the same mask; the rule file > alpha > auto holds; bad input to ``/v1/detect`` is a 4xx
problem+json; a model without a detector answers ``no_detector``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from conftest import serve_in_thread
from PIL import Image

from cleanplate import imaging
from cleanplate.errors import EngineUnavailable, ErrorCode, InputError
from cleanplate.serving.app import create_app
from cleanplate.serving.settings import Settings
from cleanplate.training import synth

LIMIT = 4 * 1024 * 1024


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def read_mask(data: bytes | Path) -> np.ndarray:
    return imaging.decode_mask(data)


@pytest.fixture(scope="module")
def photo() -> dict[str, np.ndarray]:
    """A held-out photo (never trained on) at 512 px with promo text drawn by ``data synth`` ("overlaid", its
    GT mask "gt"), and another one left clean ("clean")."""
    def load(name: str) -> np.ndarray:
        return cv2.resize(synth.load_photo(name), (512, 512), interpolation=cv2.INTER_AREA)

    src, gt, kind = synth.add_overlay(load("astronaut"), np.random.default_rng([99, 3]))
    assert kind == "text"
    return {"overlaid": src, "gt": gt, "clean": load("rocket")}


@pytest.fixture(scope="module")
def expected(photo) -> np.ndarray:
    """The shipped detector's mask of the overlaid photo: what every path must give."""
    from cleanplate.masks import bundle_detector

    mask = bundle_detector(None).detect(photo["overlaid"]).mask > 0
    gt = photo["gt"]
    assert (mask & gt).sum() > 0.5 * gt.sum() and (mask & ~gt).sum() < 0.3 * mask.sum()  # finds the text (growth adds a margin)
    return mask


@pytest.fixture(scope="module")
def files(photo, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("auto")
    (root / "photos").mkdir()
    paths = {"overlaid": root / "photos" / "overlaid.png", "clean": root / "photos" / "clean.png"}
    for name, path in paths.items():
        path.write_bytes(png(photo[name]))
    return paths


@pytest.fixture(scope="module")
def server():
    """The gateway on the default bundle (torch engine, its detector), one per module."""
    with serve_in_thread(create_app(Settings(torch_threads=1, batch_window_ms=0, max_upload_bytes=LIMIT,
                                             max_pixels=4_000_000))) as url:
        yield url


def post(url: str, path: str, files: dict, data: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(url + path, files=files, data=data or {}, timeout=120, **kw)


# -- the CLI --------------------------------------------------------------------------------------------------
def test_cli_detect_writes_the_mask_and_prints_detections(cli, files, expected, tmp_path):
    r = cli("detect", files["overlaid"], "-o", tmp_path / "mask.png", "--json")
    assert r.code == 0, r.err
    assert np.array_equal(read_mask(tmp_path / "mask.png"), expected)
    body = json.loads(r.out)
    assert (body["width"], body["height"], body["mask_pixels"]) == (512, 512, int(expected.sum()))
    assert body["detections"] and {d["kind"] for d in body["detections"]} <= {"text", "watermark", "badge", "logo"}
    for d in body["detections"]:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512 and 0 < d["score"] <= 1 and d["area"] > 0
        assert expected[y0:y1, x0:x1].any()  # each box holds part of the mask
    assert cli("detect", files["overlaid"]).code == 2  # neither -o nor --json
    bad = cli("detect", files["overlaid"], "-o", tmp_path / "mask.jpg")
    assert bad.code == 2 and bad.err.count("\n") == 1 and "PNG" in bad.err


def test_cli_remove_auto_mask_removes_what_detect_finds(cli, files, photo, expected, tmp_path):
    out, used = tmp_path / "out.png", tmp_path / "used.png"
    r = cli("remove", files["overlaid"], "-o", out, "--auto-mask", "--save-mask", used)
    assert r.code == 0, r.err
    assert np.array_equal(read_mask(used), expected)
    result = imaging.decode_image(out).pixels
    src = photo["overlaid"]
    assert np.array_equal(result[~expected], src[~expected])  # the default bundle dilates by 0 px
    assert np.abs(result[expected].astype(int) - src[expected]).mean() > 10  # the text is painted over


def test_cli_remove_auto_mask_leaves_a_clean_photo_unchanged(cli, files, photo, tmp_path):
    out = tmp_path / "clean.png"
    r = cli("remove", files["clean"], "-o", out, "--auto-mask", "--save-mask", tmp_path / "m.png")
    assert r.code == 0, r.err
    assert "found nothing" in r.err
    assert np.array_equal(imaging.decode_image(out).pixels, photo["clean"])
    assert not read_mask(tmp_path / "m.png").any()


def test_cli_without_detector_says_so(cli, files, tiny_bundle, tmp_path):
    r = cli("detect", files["overlaid"], "-o", tmp_path / "m.png", "--bundle", tiny_bundle)
    assert r.code == 2 and r.err.startswith("error:") and "no overlay detector" in r.err
    r = cli("remove", files["overlaid"], "-o", tmp_path / "o.png", "--auto-mask", "--bundle", tiny_bundle)
    assert r.code == 2 and "no overlay detector" in r.err


# -- the rule -------------------------------------------------------------------------------------------------
def test_rule_file_then_alpha_then_auto(photo):
    from cleanplate.masks import MaskSource, choose_mask

    src = photo["overlaid"]
    opaque = imaging.decode_image(png(src))
    hole = np.zeros(src.shape[:2], bool)
    hole[10:40, 10:40] = True
    rgba = imaging.decode_image(png(np.dstack([src, np.where(hole, 0, 255).astype(np.uint8)])))
    opaque_rgba = imaging.decode_image(png(np.dstack([src, np.full(src.shape[:2], 255, np.uint8)])))
    given = np.zeros(src.shape[:2], bool)
    given[100:120, 100:120] = True
    assert choose_mask(rgba, given, auto=True).source is MaskSource.file
    choice = choose_mask(rgba, None, auto=True)
    assert choice.source is MaskSource.alpha and np.array_equal(choice.mask, hole)
    assert choose_mask(opaque_rgba, None, auto=True) == choose_mask(opaque, None, auto=True)
    assert choose_mask(opaque, None, auto=True).source is MaskSource.auto
    assert not choose_mask(opaque_rgba, None, auto=False).mask.any()  # empty: the removal says empty_mask
    with pytest.raises(InputError) as err:
        choose_mask(opaque, None, auto=False)
    assert err.value.code is ErrorCode.NO_ALPHA


# -- engines --------------------------------------------------------------------------------------------------
def test_opencv_engine_detects_with_the_default_bundles_detector(photo, expected, tiny_bundle):
    from cleanplate.engines import OpenCVEngine

    async def run(engine):
        try:
            return await engine.detect(photo["overlaid"])
        finally:
            await engine.close()

    engine = OpenCVEngine()
    assert engine.has_detector
    assert np.array_equal(asyncio.run(run(engine)).mask > 0, expected)
    bare = OpenCVEngine(bundle=tiny_bundle)
    assert not bare.has_detector
    with pytest.raises(InputError) as err:
        asyncio.run(run(bare))
    assert err.value.code is ErrorCode.NO_DETECTOR


def test_engine_without_detect_is_no_detector(photo):
    """An engine that predates the detector (no has_detector) is refused the same way, not a crash."""
    from cleanplate.masks import resolve_mask

    class Old:
        name = "old"
        up = True

        def ready(self) -> bool:
            return self.up

    image = imaging.decode_image(png(photo["clean"]))
    with pytest.raises(InputError) as err:
        asyncio.run(resolve_mask(Old(), image, None, auto=True))
    assert err.value.code is ErrorCode.NO_DETECTOR
    # An engine that is not ready (a Triton engine learns of its detector on connecting) is unavailable (503),
    # not "no_detector" (a 4xx the client would not retry).
    old = Old()
    old.up = False
    with pytest.raises(EngineUnavailable):
        asyncio.run(resolve_mask(old, image, None, auto=True))


# -- the gateway ----------------------------------------------------------------------------------------------
def test_gateway_detect_png_and_json(server, photo, expected):
    image = {"image": ("p.png", png(photo["overlaid"]))}
    r = post(server, "/v1/detect", image)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and int(r.headers["x-cleanplate-detections"]) >= 1
    assert "detect;dur=" in r.headers["server-timing"]
    assert np.array_equal(read_mask(r.content), expected)
    j = post(server, "/v1/detect", image, headers={"Accept": "application/json"})
    assert j.status_code == 200 and j.headers["content-type"] == "application/json"
    body = j.json()
    assert (body["width"], body["height"], body["mask_pixels"]) == (512, 512, int(expected.sum()))
    assert len(body["detections"]) == int(r.headers["x-cleanplate-detections"])
    assert all(set(d) == {"box", "kind", "score", "area"} for d in body["detections"])
    clean = post(server, "/v1/detect", {"image": ("c.png", png(photo["clean"]))}, headers={"Accept": "application/json"})
    assert clean.json()["detections"] == [] and clean.json()["mask_pixels"] == 0


def test_gateway_remove_without_mask_uses_the_auto_mask(server, files, photo, expected, cli, tmp_path):
    image = {"image": ("p.png", png(photo["overlaid"]))}
    r = post(server, "/v1/remove", image, {"return_mask": "true"})
    assert r.status_code == 200, r.text
    assert r.headers["x-cleanplate-mask-source"] == "auto"
    body = r.json()  # return_mask answers with the JSON body
    assert body["mask_source"] == "auto" and len(body["detections"]) == int(r.headers["x-cleanplate-detections"]) >= 1
    assert np.array_equal(read_mask(base64.b64decode(body["mask"])), expected)
    result = imaging.decode_image(base64.b64decode(body["image"])).pixels
    assert np.array_equal(result[~expected], photo["overlaid"][~expected])
    # The same removal as the CLI's, pixel for pixel (same mask, seed and bundle).
    assert cli("remove", files["overlaid"], "-o", tmp_path / "cli.png", "--auto-mask").code == 0
    assert np.array_equal(imaging.decode_image(tmp_path / "cli.png").pixels, result)
    plain = post(server, "/v1/remove", image)
    assert plain.headers["content-type"] == "image/png" and plain.content == base64.b64decode(body["image"])
    # auto_mask=false: the old answer
    r = post(server, "/v1/remove", image, {"auto_mask": "false"})
    assert r.status_code == 422 and r.json()["code"] == "no_alpha"


def test_gateway_rule_and_clean_photo(server, photo):
    src = photo["overlaid"]
    given = np.zeros(src.shape[:2], np.uint8)
    given[200:240, 200:260] = 255
    r = post(server, "/v1/remove", {"image": png(src), "mask": png(given)}, {"return_mask": "true"})
    assert r.status_code == 200 and r.json()["mask_source"] == "file" and r.json()["detections"] is None
    assert np.array_equal(read_mask(base64.b64decode(r.json()["mask"])), given > 0)
    hole = given > 0
    r = post(server, "/v1/remove", {"image": png(np.dstack([src, np.where(hole, 0, 255).astype(np.uint8)]))},
             headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.json()["mask_source"] == "alpha"
    r = post(server, "/v1/remove", {"image": png(photo["clean"])})
    assert r.status_code == 200 and r.headers["x-cleanplate-detections"] == "0"
    assert r.headers["x-cleanplate-attempts"] == "0"  # nothing found: no model run, the photo as it was
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), photo["clean"])


def _png_header_only(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _detect_cases(good: bytes) -> dict[str, tuple[dict, int, str]]:
    return {
        "truncated png": ({"files": {"image": good[: len(good) // 2]}}, 400, "unreadable_image"),
        "zero-byte image": ({"files": {"image": b""}}, 400, "unreadable_image"),
        "text as image": ({"files": {"image": b"not a picture at all"}}, 415, "unsupported_image"),
        "missing image": ({"files": {"mask": good}}, 422, "invalid_field"),
        "json body": ({"json": {"image": "x"}}, 415, "unsupported_media_type"),
        "20000x20000 image": ({"files": {"image": _png_header_only(20000, 20000)}}, 413, "too_many_pixels"),
        "body over limit": ({"files": {"image": bytes(LIMIT + 10)}}, 413, "too_large"),
    }


@pytest.mark.parametrize("name", list(_detect_cases(b"x")))
def test_gateway_detect_bad_input_is_4xx_problem(server, photo, name):
    kwargs, status, code = _detect_cases(png(photo["clean"][:64, :64]))[name]
    r = httpx.post(server + "/v1/detect", timeout=60, **kwargs)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["instance"] == "/v1/detect"


def test_gateway_detect_metrics_and_openapi(server, photo):
    def count(status: str) -> float:
        lines = httpx.get(server + "/metrics").text.splitlines()
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("cleanplate_requests_total{")
                   and 'endpoint="/v1/detect"' in x and f'status="{status}"' in x)

    before_ok, before_bad = count("200"), count("415")
    post(server, "/v1/detect", {"image": png(photo["clean"][:64, :64])})
    post(server, "/v1/detect", {"image": b"garbage"})
    assert (count("200"), count("415")) == (before_ok + 1, before_bad + 1)
    assert 'cleanplate_stage_duration_seconds_count{stage="detect"}' in httpx.get(server + "/metrics").text
    spec = httpx.get(server + "/openapi.json").json()
    op = spec["paths"]["/v1/detect"]["post"]
    assert {"200", "413", "415", "422"} <= set(op["responses"])
    assert "application/problem+json" in op["responses"]["422"]["content"]
    remove_form = spec["paths"]["/v1/remove"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = spec["components"]["schemas"][remove_form["$ref"].rsplit("/", 1)[1]]["properties"]
    assert {"auto_mask", "return_mask"} <= set(fields)
    assert httpx.get(server + "/readyz").json()["detector"] is True


def test_gateway_without_detector_is_no_detector(gated_bundle, photo):
    with serve_in_thread(create_app(Settings(bundle=gated_bundle, torch_threads=1))) as url:
        assert httpx.get(url + "/readyz").json()["detector"] is False
        for path in ("/v1/detect", "/v1/remove"):
            r = post(url, path, {"image": png(photo["clean"][:96, :128])})
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", path
            assert r.json()["code"] == "no_detector", path


# -- batch ----------------------------------------------------------------------------------------------------
def _lines(out: Path) -> dict[str, dict]:
    return {json.loads(x)["key"]: json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()}


@pytest.mark.parametrize("via", ["engine", "gateway"])
def test_batch_auto_mask_keeps_the_mask_used_in_review(cli, server, files, photo, expected, tmp_path, via):
    """threshold 1 sends every removal to review, so the review folder shows the mask next to the result."""
    where = ["--url", server] if via == "gateway" else ["--torch-threads", "1"]
    out = tmp_path / "out"
    r = cli("batch", "run", files["overlaid"].parent, "-o", out, "--auto-mask", "--threshold", "1",
            "--max-attempts", "1", "--progress", "off", *where)
    assert r.code == 0, r.err
    lines = _lines(out)
    over, clean = lines["overlaid.png"], lines["clean.png"]
    assert over["status"] == "ok" and over["mask_source"] == "auto" and over["detections"] >= 1
    assert over["passed"] is False and over["review"]
    review = Path(over["review"])
    assert np.array_equal(read_mask(review / "mask.png"), expected)
    assert (review / "result.png").read_bytes() == (out / "overlaid.png").read_bytes()
    # the detector found nothing on the clean photo: ok, no model run, the photo as it was, not in review
    assert clean["status"] == "ok" and clean["detections"] == 0 and clean["attempts"] == 0
    assert clean["review"] is None and clean["passed"] is None
    assert np.array_equal(imaging.decode_image(out / "clean.png").pixels, photo["clean"])
    # without --auto-mask, the opaque photos still need masks
    r = cli("batch", "run", files["overlaid"].parent, "-o", tmp_path / "plain", "--progress", "off", *where)
    assert r.code == 1 and {x["error"]["code"] for x in _lines(tmp_path / "plain").values()} == {"no_alpha"}


def test_batch_auto_mask_fills_in_for_missing_mask_files(cli, files, tmp_path):
    """--masks with a file for one photo: that photo uses it, the other is auto-masked instead of missing_mask."""
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((512, 512), np.uint8)
    m[300:340, 300:360] = 255
    (masks / "clean.png").write_bytes(png(m))
    out = tmp_path / "out"
    r = cli("batch", "run", files["overlaid"].parent, "-o", out, "--masks", masks, "--auto-mask", "--engine", "opencv",
            "--progress", "off")
    assert r.code == 0, r.err
    lines = _lines(out)
    assert lines["clean.png"]["mask_source"] == "file" and lines["clean.png"]["detections"] is None
    assert lines["overlaid.png"]["mask_source"] == "auto" and lines["overlaid.png"]["detections"] >= 1
