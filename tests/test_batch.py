"""`cleanplate batch`: folder and manifest runs on real photos, broken inputs, resume after SIGKILL and
SIGINT, format/alpha/EXIF/ICC kept, the gateway path (same pixels as in-process), the client's retries.

Runs use the tiny gated bundle (random weights, discriminator threshold 0.5) and 96x128 crops of
scikit-image photos, so a removal costs tens of ms; the kill tests run the console script as a process.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from conftest import serve_in_thread
from PIL import Image, ImageCms

from cleanplate.batch import (
    BatchAborted,
    BatchItem,
    GatewayBackend,
    ItemOptions,
    Progress,
    ReportWriter,
    load_items,
    read_report,
    run_batch,
    summarize,
)
from cleanplate.imaging import decode_image, dilate_mask

DILATE = 2
H, W = 96, 128


def rect(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def save_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def crop(photos, i: int) -> np.ndarray:
    """A different 96x128 RGB piece of a real photo for each i."""
    name = ["coffee", "chelsea", "astronaut"][i % 3]
    y, x = 20 + 3 * (i // 3), 40 + 2 * (i // 3)
    return np.ascontiguousarray(photos[name][y:y + H, x:x + W])


def item_mask(i: int) -> np.ndarray:
    return rect(30 + i % 20, 50 + i % 20, 40, 70)


def lines_by_key(report: Path) -> dict[str, list[dict]]:
    records, _ = read_report(report)
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["key"], []).append(r)
    return out


def assert_one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


# -- formats ---------------------------------------------------------------------------------------------
EXIF_TAGS = {0x010F: "Cleanplate Cam", 0x0110: "Model 7", 0x0132: "2024:05:01 12:00:00"}
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif() -> Image.Exif:
    e = Image.Exif()
    for k, v in EXIF_TAGS.items():
        e[k] = v
    return e


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, photos) -> tuple[Path, Path]:
    """Images in every format and mode we keep, and their masks: name -> how it was written."""
    root = tmp_path_factory.mktemp("mixed")
    images, masks = root / "images", root / "masks"
    (images / "sub").mkdir(parents=True)
    rgb = [crop(photos, i) for i in range(7)]
    Image.fromarray(rgb[0]).save(images / "a.jpg", quality=92, exif=exif(), icc_profile=SRGB)
    alpha = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))  # includes fully transparent pixels
    Image.fromarray(np.dstack([rgb[1], alpha]), "RGBA").save(images / "b.png", exif=exif(), icc_profile=SRGB)
    Image.fromarray(photos["camera"][100:100 + H, 200:200 + W]).save(images / "c.png")  # gray L
    cv2.imwrite(str(images / "d.png"), cv2.cvtColor(rgb[3].astype(np.uint16) * 257 + 3, cv2.COLOR_RGB2BGR))
    Image.fromarray(rgb[4]).save(images / "e.webp", lossless=True, exif=exif())
    Image.fromarray(rgb[5]).save(images / "f.tif", icc_profile=SRGB, compression="tiff_lzw")
    Image.fromarray(rgb[6]).save(images / "sub" / "g.png")
    for i, name in enumerate(["a", "b", "c", "d", "e", "f", "sub/g"]):
        save_mask(masks / f"{name}.png", item_mask(i))
    return images, masks


def test_folder_run_keeps_format_mode_alpha_exif_icc(cli, gated_bundle, mixed_folder, tmp_path):
    images, masks = mixed_folder
    out = tmp_path / "out"
    r = cli("batch", "run", images, "--masks", masks, "-o", out, "--bundle", gated_bundle, "--dilate-px", DILATE,
            "--concurrency", 3, "--max-batch", 1)
    assert r.code == 0, r.err
    assert "7 ok" in r.err.strip().splitlines()[-1]
    lines = lines_by_key(out / "report.jsonl")
    keys = ["a.jpg", "b.png", "c.png", "d.png", "e.webp", "f.tif", "sub/g.png"]
    assert sorted(lines) == keys
    for i, key in enumerate(keys):
        (rec,) = lines[key]
        assert rec["status"] == "ok" and rec["error"] is None
        assert rec["bytes"] == (out / key).stat().st_size
        assert rec["score"] is not None and rec["passed"] is (rec["score"] >= 0.5)  # the gate ran
        assert rec["width"] == W and rec["height"] == H
        assert {"load", "model", "gate", "encode", "write", "total"} <= set(rec["timings_ms"])
        src, res = Image.open(images / key), Image.open(out / key)
        assert (res.format, res.mode, res.size) == (src.format, src.mode, src.size)
        before, after = decode_image(images / key), decode_image(out / key)
        assert after.pixels.dtype == before.pixels.dtype
        assert after.icc_profile == before.icc_profile
        if before.alpha is not None:
            np.testing.assert_array_equal(after.alpha, before.alpha)
        else:
            assert after.alpha is None
        for tag, value in (EXIF_TAGS.items() if key in ("a.jpg", "b.png", "e.webp") else ()):
            assert res.getexif().get(tag) == value, (key, tag)
        mask = item_mask(i)
        outside = ~dilate_mask(mask, DILATE)
        if key in ("a.jpg", "e.webp"):  # JPEG and WEBP (lossy unless the input is a PNG) re-encode: close
            diff = after.pixels[outside].astype(float) - before.pixels[outside]
            assert 10 * np.log10(255**2 / np.mean(diff**2)) > 35
        else:  # lossless formats: bit-exact outside the dilated mask
            np.testing.assert_array_equal(after.pixels[outside], before.pixels[outside])
        assert not np.array_equal(after.pixels[mask], before.pixels[mask])
    assert not (out / "review").exists() or all(
        lines[p.name][0]["passed"] is False for p in (out / "review").iterdir())
    # --format converts every output, keeping size and alpha (PNG)
    out_png = tmp_path / "png"
    r = cli("batch", "run", images, "--masks", masks, "-o", out_png, "--bundle", gated_bundle, "--format", "png",
            "--no-quality-gate")
    assert r.code == 0, r.err
    got = sorted(str(p.relative_to(out_png)) for p in out_png.rglob("*.png"))
    assert got == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "sub/g.png"]
    assert Image.open(out_png / "b.png").mode == "RGBA" and Image.open(out_png / "a.png").format == "PNG"
    assert all(r["passed"] is None and r["score"] is None for r in read_report(out_png / "report.jsonl")[0])


# -- manifests -------------------------------------------------------------------------------------------
@pytest.fixture
def small_set(tmp_path, photos) -> Path:
    """img/0.png .. img/5.png with masks mask/0.png ..."""
    for i in range(6):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(crop(photos, i)).save(tmp_path / "img" / f"{i}.png")
        save_mask(tmp_path / "mask" / f"{i}.png", item_mask(i))
    return tmp_path


def test_jsonl_manifest_per_item_options_and_review(cli, gated_bundle, small_set):
    entries = [
        {"image": "img/0.png", "mask": "mask/0.png", "output": "clean/zero.png", "threshold": 0.0, "seed": 7},
        {"image": "img/1.png", "mask": "mask/1.png", "threshold": 1.0, "max_attempts": 2},  # can never pass
        {"image": "img/2.png", "mask": "mask/2.png", "output": "two.jpg", "quality_gate": False, "steps": 2},
    ]
    manifest = small_set / "list.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries) + "\n")
    out = small_set / "out"
    r = cli("batch", "run", manifest, "-o", out, "--bundle", gated_bundle, "--dilate-px", DILATE)
    assert r.code == 0, r.err  # a gate failure is not an error: it goes to review
    lines = {k: v[0] for k, v in lines_by_key(out / "report.jsonl").items()}
    assert sorted(lines) == ["clean/zero.png", "img/1.png", "two.jpg"]
    zero, one, two = lines["clean/zero.png"], lines["img/1.png"], lines["two.jpg"]
    assert (zero["passed"], zero["seed"], zero["attempts"], zero["threshold"]) == (True, 7, 1, 0.0)
    assert (one["passed"], one["attempts"], one["threshold"]) == (False, 2, 1.0)
    assert two["passed"] is None and two["score"] is None
    assert Image.open(out / "two.jpg").format == "JPEG"
    assert zero["review"] is None and two["review"] is None
    review = out / "review" / "img" / "1.png"
    assert one["review"] == str(review)
    assert sorted(p.name for p in review.iterdir()) == ["item.json", "mask.png", "result.png", "source.png"]
    assert (review / "source.png").read_bytes() == (small_set / "img" / "1.png").read_bytes()
    assert (review / "mask.png").read_bytes() == (small_set / "mask" / "1.png").read_bytes()
    assert (review / "result.png").read_bytes() == (out / "img" / "1.png").read_bytes()
    assert json.loads((review / "item.json").read_text())["score"] == one["score"]
    assert sorted(p.name for p in (out / "review").rglob("*") if p.is_dir()) == ["1.png", "img"]


def test_csv_and_meta_json_manifests(cli, small_set):
    with open(small_set / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "output", "seed", "dilate_px"])
        w.writerow(["img/0.png", "mask/0.png", "", "3", ""])
        w.writerow(["img/1.png", "mask/1.png", "b.webp", "", "4"])
    meta = [{"source": f"img/{i}.png", "mask": f"mask/{i}.png", "GT": f"gt/{i}.png", "kind": "text"}
            for i in (2, 3)]
    (small_set / "meta.json").write_text(json.dumps(meta))
    for manifest, keys in (("list.csv", ["b.webp", "img/0.png"]), ("meta.json", ["img/2.png", "img/3.png"])):
        out = small_set / f"out_{manifest}"
        r = cli("batch", "run", small_set / manifest, "-o", out, "--engine", "opencv", "--concurrency", 2)
        assert r.code == 0, r.err
        lines = {k: v[0] for k, v in lines_by_key(out / "report.jsonl").items()}
        assert sorted(lines) == keys
        assert all(rec["status"] == "ok" and rec["engine"] == "opencv" for rec in lines.values())
        for key in keys:
            assert decode_image(out / key).size == (W, H)
    assert Image.open(small_set / "out_list.csv" / "b.webp").format == "WEBP"


# -- broken inputs, resume ---------------------------------------------------------------------------------
def test_broken_inputs_are_reported_and_good_ones_done(cli, gated_bundle, photos, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    good = ["good0.png", "good1.jpg", "good2.png"]
    for i, name in enumerate(good):
        Image.fromarray(crop(photos, i)).save(images / name)
        save_mask(masks / f"{Path(name).stem}.png", item_mask(i))
    (images / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    save_mask(masks / "garbage.png", item_mask(0))
    buf = io.BytesIO()
    Image.fromarray(crop(photos, 4)).save(buf, "JPEG")
    (images / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    save_mask(masks / "truncated.png", item_mask(0))
    Image.fromarray(crop(photos, 5)).save(images / "mismatch.png")
    save_mask(masks / "mismatch.png", rect(0, 10, 0, 10, h=50, w=50))
    Image.fromarray(crop(photos, 6)).save(images / "empty.png")
    save_mask(masks / "empty.png", np.zeros((H, W), bool))
    Image.fromarray(crop(photos, 7)).save(images / "nomask.png")
    out = tmp_path / "out"
    args = ["batch", "run", images, "--masks", masks, "-o", out, "--bundle", gated_bundle, "--concurrency", 2]
    r = cli(*args)
    assert r.code == 1, r.err  # some items errored
    assert "3 ok" in r.err and "5 errors" in r.err
    lines = {k: v[0] for k, v in lines_by_key(out / "report.jsonl").items()}
    codes = {k: (v["error"] or {}).get("code") for k, v in lines.items()}
    assert codes == {"good0.png": None, "good1.jpg": None, "good2.png": None, "garbage.png": "unreadable_image",
                     "truncated.jpg": "unreadable_image", "mismatch.png": "size_mismatch",
                     "empty.png": "empty_mask", "nomask.png": "missing_mask"}
    assert all(lines[k]["error"]["message"] for k in codes if codes[k])
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".jpg")) == good
    s = summarize(out / "report.jsonl")
    assert (s["items"], s["ok"], s["errors"]) == (8, 3, 5)
    assert s["errors_by_code"] == {"empty_mask": 1, "missing_mask": 1, "size_mismatch": 1, "unreadable_image": 2}
    assert s["latency_ms"]["p50"] > 0 and s["gated"] == 3

    # a rerun does nothing (finished items skipped, failed ones not retried) and still exits 1
    r = cli(*args)
    assert r.code == 1 and "3 done before" in r.err and "5 failed before" in r.err
    assert sum(map(len, lines_by_key(out / "report.jsonl").values())) == 8
    # an output that went missing is redone; a report cut mid-line (a kill) is tolerated
    (out / "good1.jpg").unlink()
    with open(out / "report.jsonl", "ab") as f:
        f.write(b'{"key": "good2.png", "status": "o')
    # fix two broken items and retry the failed ones
    save_mask(masks / "nomask.png", item_mask(1))
    save_mask(masks / "empty.png", item_mask(2))
    r = cli(*args, "--retry-failed")
    assert r.code == 1, r.err  # garbage, truncated, mismatch still fail
    by_key = lines_by_key(out / "report.jsonl")
    assert [len(by_key[k]) for k in good] == [1, 2, 1]
    assert by_key["nomask.png"][-1]["status"] == by_key["empty.png"][-1]["status"] == "ok"
    assert all(len(by_key[k]) == 2 for k in ("garbage.png", "truncated.jpg", "mismatch.png", "nomask.png"))
    assert decode_image(out / "good1.jpg").size == (W, H)
    s = summarize(out / "report.jsonl")
    assert (s["items"], s["ok"], s["errors"], s["bad_lines"]) == (8, 5, 3, 1)


def test_transparency_and_alpha_masks(cli, gated_bundle, photos, tmp_path):
    """No --masks: each image's transparent pixels are its mask (output opaque). --mask-channel alpha: a mask
    file's opaque pixels mark the removal, whatever their colour."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(2):
        hole = item_mask(i)
        Image.fromarray(np.dstack([crop(photos, i), np.where(hole, 0, 255).astype(np.uint8)]), "RGBA").save(
            images / f"{i}.png")
        black = np.zeros((H, W, 4), np.uint8)
        black[..., 3] = hole * 255
        Image.fromarray(black, "RGBA").save(masks / f"{i}.png")
    r = cli("batch", "run", images, "-o", tmp_path / "holes", "--bundle", gated_bundle, "--dilate-px", DILATE)
    assert r.code == 0, r.err
    after = decode_image(tmp_path / "holes" / "0.png")
    assert after.alpha is None and after.size == (W, H)
    outside = ~dilate_mask(item_mask(0), DILATE)
    np.testing.assert_array_equal(after.pixels[outside], crop(photos, 0)[outside])
    r = cli("batch", "run", images, "--masks", masks, "--mask-channel", "alpha", "-o", tmp_path / "alpha",
            "--bundle", gated_bundle)
    assert r.code == 0, r.err
    assert decode_image(tmp_path / "alpha" / "1.png").alpha is not None  # the image's own alpha is kept
    r = cli("batch", "run", images, "--masks", masks, "-o", tmp_path / "luma", "--bundle", gated_bundle)
    assert r.code == 1  # read as luma, the black masks are empty
    assert {rec["error"]["code"] for rec in read_report(tmp_path / "luma" / "report.jsonl")[0]} == {"empty_mask"}


# -- kills -------------------------------------------------------------------------------------------------
N_KILL = 40


@pytest.fixture
def kill_catalog(tmp_path, photos) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    for i in range(N_KILL):
        Image.fromarray(crop(photos, i)).save(images / f"{i:03d}.png")
        save_mask(masks / f"{i:03d}.png", item_mask(i))
    return images, masks


def _script() -> list[str]:
    script = Path(sys.executable).with_name("cleanplate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cleanplate.cli"]


def _start(args: list, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    err = open(tmp_path / f"stderr{time.monotonic_ns()}.txt", "w+")  # noqa: SIM115 - read by _stderr later
    proc = subprocess.Popen([*_script(), *map(str, args), "--progress", "log"], stdout=subprocess.DEVNULL,
                            stderr=err, env=env, text=True)
    proc.err_file = err  # type: ignore[attr-defined]
    return proc


def _wait_lines(proc: subprocess.Popen, report: Path, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if report.exists() and report.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, "the batch ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("no report lines")


def _stderr(proc: subprocess.Popen) -> str:
    proc.err_file.seek(0)  # type: ignore[attr-defined]
    return proc.err_file.read()  # type: ignore[attr-defined]


def _check_complete(images: Path, out: Path) -> dict[str, list[dict]]:
    by_key = lines_by_key(out / "report.jsonl")
    names = sorted(p.name for p in images.iterdir())
    assert sorted(by_key) == names
    for name in names:
        ok = [r for r in by_key[name] if r["status"] == "ok"]
        assert len(ok) == 1, (name, by_key[name])  # done exactly once
        assert decode_image(out / name).size == (W, H)
    assert not [p for p in out.rglob(".*.tmp")]  # no temp file left behind
    return by_key


def _interrupted_run(kill_catalog: tuple[Path, Path], bundle: Path, tmp_path: Path, after_lines: int,
                     sig: int) -> tuple[subprocess.Popen, Path, list]:
    """``batch run`` over the kill catalog (2 items in flight) sent ``sig`` once its report has ``after_lines``
    lines; returns the process, the output folder and the arguments (to run it again)."""
    images, masks = kill_catalog
    out = tmp_path / "out"
    args = ["batch", "run", images, "--masks", masks, "-o", out, "--bundle", bundle, "--concurrency", 2]
    proc = _start(args, tmp_path)
    _wait_lines(proc, out / "report.jsonl", after_lines)
    proc.send_signal(sig)
    return proc, out, args


def test_sigkill_midway_then_resume_does_each_item_once(gated_bundle, kill_catalog, tmp_path):
    proc, out, args = _interrupted_run(kill_catalog, gated_bundle, tmp_path, 4, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    first = lines_by_key(out / "report.jsonl")
    assert 4 <= len(first) < N_KILL, "the kill did not land midway"
    for p in out.glob("*.png"):  # whatever is on disk is a whole image, never a truncated one
        assert decode_image(p).size == (W, H)
    proc = _start(args, tmp_path)
    assert proc.wait(300) == 0, _stderr(proc)
    assert f"{len(first)} done before" in _stderr(proc)
    by_key = _check_complete(kill_catalog[0], out)
    for key, recs in first.items():  # items finished before the kill were not touched again
        assert by_key[key] == recs


def test_sigint_finishes_in_flight_items_then_resume(gated_bundle, kill_catalog, tmp_path):
    proc, out, args = _interrupted_run(kill_catalog, gated_bundle, tmp_path, 3, signal.SIGINT)
    assert proc.wait(60) == 130
    err = _stderr(proc)
    assert "Traceback" not in err and "stopped by SIGINT" in err.strip().splitlines()[-1]
    records, bad = read_report(out / "report.jsonl")
    assert bad == 0 and len(records) < N_KILL  # every line complete; stopped early
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["key"] for r in records)  # in flight finished
    proc = _start(args, tmp_path)
    assert proc.wait(300) == 0, _stderr(proc)
    _check_complete(kill_catalog[0], out)


# -- gateway -----------------------------------------------------------------------------------------------
def test_gateway_run_equals_in_process(cli, gated_bundle, mixed_folder, tmp_path):
    from cleanplate.serving.app import create_app
    from cleanplate.serving.settings import Settings

    images, masks = mixed_folder
    settings = Settings(bundle=gated_bundle, max_batch=1, api_keys=["secret"])
    with serve_in_thread(create_app(settings)) as url:
        r = cli("batch", "run", images, "--masks", masks, "-o", tmp_path / "bad", "--url", url, "--api-key", "nope")
        assert r.code == 2
        assert "401" in assert_one_error_line(r.err)
        r = cli("batch", "run", images, "--masks", masks, "-o", tmp_path / "gw", "--url", url, "--api-key",
                "secret", "--concurrency", 3, "--dilate-px", DILATE, "--max-attempts", 2, "--format", "tiff")
        assert r.code == 0, r.err
    r = cli("batch", "run", images, "--masks", masks, "-o", tmp_path / "local", "--bundle", gated_bundle,
            "--max-batch", 1, "--dilate-px", DILATE, "--max-attempts", 2, "--format", "tiff")
    assert r.code == 0, r.err
    gw, local = (lines_by_key(tmp_path / d / "report.jsonl") for d in ("gw", "local"))
    assert sorted(gw) == sorted(local) == ["a.tif", "b.tif", "c.tif", "d.tif", "e.tif", "f.tif", "sub/g.tif"]
    for key in gw:
        (g,), (loc,) = gw[key], local[key]
        assert g["engine"].startswith("gateway") and loc["engine"] == "torch"
        assert (g["score"], g["passed"], g["attempts"], g["seed"]) == pytest.approx(
            (loc["score"], loc["passed"], loc["attempts"], loc["seed"]))
        a, b = decode_image(tmp_path / "gw" / key), decode_image(tmp_path / "local" / key)
        assert Image.open(tmp_path / "gw" / key).format == "TIFF"
        np.testing.assert_array_equal(a.pixels, b.pixels)
        assert (a.alpha is None) == (b.alpha is None)


def _png_b64(h: int = 4, w: int = 4) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_gateway_client_retries_busy_answers_and_aborts_on_401(tmp_path):
    src = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(src)
    mask = save_mask(tmp_path / "m.png", rect(1, 2, 1, 2, 4, 4))
    item = BatchItem("x.png", src, mask)
    answers: list[httpx.Response] = []
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"engine": "torch", "quality_gate": True})
        return answers.pop(0) if len(answers) > 1 else answers[0]  # the last answer repeats

    ok = httpx.Response(200, json={"image": _png_b64(), "media_type": "image/png", "width": 4, "height": 4,
                                   "score": 0.9, "passed": True, "threshold": 0.5, "attempts": 1, "seed": 0,
                                   "timings_ms": {"model": 1.0}})
    busy = httpx.Response(429, headers={"Retry-After": "0"}, json={"code": "queue_full", "detail": "full"})
    draining = httpx.Response(503, headers={"Retry-After": "0"}, json={"code": "draining", "detail": "bye"})

    def run(out: str, **kw) -> object:
        backend = GatewayBackend("http://gw", transport=httpx.MockTransport(handler), **kw)
        return asyncio.run(run_batch([item], backend, tmp_path / out, handle_signals=False))

    answers[:] = [busy, draining, ok]
    result = run("ok")
    assert (result.ok, result.errors, calls.count("/v1/remove")) == (1, 0, 3)
    (rec,) = read_report(tmp_path / "ok" / "report.jsonl")[0]
    assert rec["passed"] is True and rec["timings_ms"]["server_model"] == 1.0

    answers[:] = [busy]
    result = run("busy", max_wait_s=0.3)
    (rec,) = read_report(tmp_path / "busy" / "report.jsonl")[0]
    assert result.errors == 1 and rec["error"]["code"] == "gateway_busy"

    answers[:] = [httpx.Response(422, json={"code": "empty_mask", "detail": "mask is empty"})]
    run("422")
    assert read_report(tmp_path / "422" / "report.jsonl")[0][0]["error"]["code"] == "empty_mask"

    answers[:] = [httpx.Response(401, json={"code": "unauthorized", "detail": "key"})]
    with pytest.raises(BatchAborted):
        run("401")
    assert read_report(tmp_path / "401" / "report.jsonl") == ([], 0)  # not the item's fault: no line


# -- command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing_source", "bad_json", "unknown_field", "bad_option_value",
                                  "duplicate_output", "escaping_output", "url_and_triton", "concurrency0"])
def test_bad_command_exits_2(cli, small_set, case):
    manifest = small_set / "m.jsonl"
    lines, extra, expected = [{"image": "img/0.png", "mask": "mask/0.png"}], [], ""
    if case == "missing_source":
        manifest, expected = small_set / "nope.jsonl", "nope.jsonl"
    elif case == "bad_json":
        lines.append("{not json")
        expected = "m.jsonl:2"
    elif case == "unknown_field":
        lines.append({"image": "img/1.png", "dilate": 3})
        expected = "dilate"
    elif case == "bad_option_value":
        lines.append({"image": "img/1.png", "steps": 0})
        expected = "steps"
    elif case == "duplicate_output":
        lines.append({"image": "img/1.png", "output": "img/0.png"})
        expected = "img/0.png"
    elif case == "escaping_output":
        lines.append({"image": "img/1.png", "output": "../../etc/x.png"})
        expected = "relative"
    elif case == "url_and_triton":
        extra, expected = ["--url", "http://x", "--triton-url", "http://y"], "--triton-url"
    elif case == "concurrency0":
        extra, expected = ["--concurrency", 0, "--engine", "opencv"], "concurrency"
    if case != "missing_source":
        manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = small_set / "out"
    r = cli("batch", "run", manifest, "-o", out, *extra)
    assert r.code == 2, r.err
    assert expected in assert_one_error_line(r.err)
    assert not (out / "report.jsonl").exists()


def test_second_run_on_the_same_output_is_refused(cli, small_set):
    import fcntl

    out = small_set / "out"
    out.mkdir()
    with open(out / ".cleanplate-batch.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        r = cli("batch", "run", small_set / "img", "--masks", small_set / "mask", "-o", out, "--engine", "opencv")
    assert r.code == 2
    assert "another cleanplate batch" in assert_one_error_line(r.err)


def test_summarize_command(cli, tmp_path):
    report = tmp_path / "report.jsonl"
    writer = ReportWriter(report, fsync=False)
    for i in range(10):
        ok = i < 8
        writer.append({"key": f"{i}.png", "status": "ok" if ok else "error", "passed": (i % 2 == 0) if ok else None,
                       "score": 0.5, "attempts": 1 + i % 3 if ok else 0, "run": "r1",
                       "timings_ms": {"model": 10.0 * (i + 1), "total": 100.0 * (i + 1)},
                       "error": None if ok else {"code": "empty_mask", "message": "empty"}})
    writer.close()
    with open(report, "ab") as f:
        f.write(b'{"key": "cut')  # a line cut short by a kill
    r = cli("batch", "summarize", report, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert (s["items"], s["ok"], s["errors"], s["bad_lines"]) == (10, 8, 2, 1)
    assert (s["gated"], s["passed"], s["rejected"], s["pass_rate"]) == (8, 4, 4, 0.5)
    assert s["latency_ms"]["p50"] == pytest.approx(450.0) and s["latency_ms"]["max"] == 800.0
    assert s["errors_by_code"] == {"empty_mask": 2}
    r = cli("batch", "summarize", report)
    assert r.code == 0 and "pass rate 50.0%" in r.out and "p50 450" in r.out
    r = cli("batch", "summarize", tmp_path / "none.jsonl")
    assert r.code == 2 and "no report" in assert_one_error_line(r.err)


def test_load_items_folder_keys_and_format(tmp_path):
    (tmp_path / "in" / "deep").mkdir(parents=True)
    for name in ("a.JPG", "b.bmp", "deep/c.png", ".hidden.png", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"x")
    items = load_items(tmp_path / "in")
    assert [(i.key, i.mask, i.fmt) for i in items] == [("a.JPG", None, "jpeg"), ("b.png", None, "png"),
                                                       ("deep/c.png", None, "png")]
    assert [i.key for i in load_items(tmp_path / "in", fmt="jpeg")] == ["a.JPG", "b.jpg", "deep/c.jpg"]
    assert ItemOptions(seed=3).over(ItemOptions(seed=0, steps=2)) == ItemOptions(seed=3, steps=2)


def test_progress_log_lines(tmp_path):
    stream = io.StringIO()
    p = Progress("log", every_s=0, stream=stream)
    p.start(3, 1)
    p.update({"key": "a", "status": "ok", "passed": True})
    p.update({"key": "b", "status": "error", "error": {"code": "empty_mask", "message": "empty"}})
    text = stream.getvalue()
    assert "3 items to do, 1 skipped" in text and "failed b: empty_mask" in text
    assert "batch: 2/3 (66.7%)" in text and "pass 100%, errors 1" in text
