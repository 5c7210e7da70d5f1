"""The onnxruntime engine: the exported graphs in-process give the torch engine's removal within the engines'
tolerance (the one the Triton tests use) and its gate scores; the gateway and the batch job pick it up by
name; a missing or mismatched export is a clear error."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_tiny_bundle, serve_in_thread
from PIL import Image

from cleanplate import imaging
from cleanplate.bundle import read_config
from cleanplate.engines import EngineOptions, make_engine
from cleanplate.errors import BundleError, InputError
from cleanplate.remover import RemovalRequest, prepare
from cleanplate.serving.app import create_app
from cleanplate.serving.settings import Settings

# ONNX Runtime and PyTorch differ by ~1e-6 per graph call, which moves a few pixels by one uint8 level.
MAX_LEVELS, MAX_MEAN_LEVELS = 2, 0.05


def crops(photos, resolution: int, n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for i, name in enumerate(["coffee", "chelsea", "astronaut"][:n]):
        img = imaging.DecodedImage(photos[name], None, "RGB", "PNG", None, None)
        mask = np.zeros(photos[name].shape[:2], bool)
        mask[100 + 10 * i:160 + 10 * i, 150:260] = True
        prep = prepare(RemovalRequest(img, mask), resolution, 2)
        out.append((prep.crop, prep.crop_mask))
    return out


async def run_both(torch_engine, ort_engine, items, steps: int) -> tuple[list, list, list, list]:
    await torch_engine.start()
    await ort_engine.start()
    try:
        a = await asyncio.gather(*[torch_engine.inpaint(c, m, seed=i, steps=steps) for i, (c, m) in enumerate(items)])
        b = await asyncio.gather(*[ort_engine.inpaint(c, m, seed=i, steps=steps) for i, (c, m) in enumerate(items)])
        sa = [await torch_engine.score(c, r, m) for (c, m), r in zip(items, a, strict=True)]
        sb = [await ort_engine.score(c, r, m) for (c, m), r in zip(items, a, strict=True)]
    finally:
        await torch_engine.close()
        await ort_engine.close()
    return a, b, sa, sb


def test_same_removal_and_scores_as_the_torch_engine(gated_bundle: Path, gated_onnx: Path, photos) -> None:
    torch_engine = make_engine(EngineOptions(engine="torch", bundle=gated_bundle, torch_threads=1, max_batch=4))
    ort_engine = make_engine(EngineOptions(engine="onnxruntime", bundle=gated_bundle, onnx_dir=gated_onnx,
                                           onnx_threads=1, max_batch=4))
    assert ort_engine.name == "onnxruntime"
    assert (ort_engine.resolution, ort_engine.default_steps) == (torch_engine.resolution, torch_engine.default_steps)
    items = crops(photos, torch_engine.resolution)
    a, b, sa, sb = asyncio.run(run_both(torch_engine, ort_engine, items, torch_engine.default_steps))
    for x, y in zip(a, b, strict=True):
        diff = np.abs(x.astype(int) - y.astype(int))
        assert x.shape == y.shape and x.dtype == y.dtype == np.uint8
        assert diff.max() <= MAX_LEVELS and diff.mean() <= MAX_MEAN_LEVELS, (diff.max(), diff.mean())
    assert not np.array_equal(a[0], items[0][0])  # it did change the crop
    np.testing.assert_allclose(sb, sa, atol=1e-3)
    assert ort_engine.threshold == torch_engine.threshold


def test_gateway_serves_the_onnxruntime_engine_by_name(gated_bundle: Path, gated_onnx: Path, photos) -> None:
    img = photos["coffee"]
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[150:210, 250:350] = 255
    files = {}
    for name, array in (("image", img), ("mask", mask)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG")
        files[name] = buf.getvalue()
    settings = Settings(engine="onnxruntime", bundle=gated_bundle, onnx_dir=gated_onnx, onnx_threads=1)
    with serve_in_thread(create_app(settings)) as url:
        assert httpx.get(url + "/readyz").json()["engine"] == "onnxruntime"
        r = httpx.post(url + "/v1/remove", files=files, data={"quality_gate": "true"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["x-cleanplate-passed"] in ("true", "false")
        out = np.asarray(Image.open(io.BytesIO(r.content)))
        outside = ~imaging.dilate_mask(mask > 0, read_config(gated_bundle).dilate_px)
        assert out.shape == img.shape and np.array_equal(out[outside], img[outside])
        assert not np.array_equal(out[mask > 0], img[mask > 0])


def test_missing_or_mismatched_exports_are_clear_errors(gated_bundle: Path, gated_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="needs onnx_dir"):
        make_engine(EngineOptions(engine="onnxruntime", bundle=gated_bundle))
    with pytest.raises(InputError, match="not an ONNX export directory"):
        make_engine(EngineOptions(engine="onnxruntime", bundle=gated_bundle, onnx_dir=tmp_path))
    other = make_tiny_bundle(tmp_path / "b128", resolution=128)
    with pytest.raises(BundleError, match="exported at 64 px"):
        make_engine(EngineOptions(engine="onnxruntime", bundle=other, onnx_dir=gated_onnx))
