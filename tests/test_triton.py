"""A real Triton Inference Server (the nvidia-pytriton wheel's tritonserver, python backend, CPU) serving
the default bundle's exported repository: the triton engine equals the torch engine on real photos,
the gateway serves through it, and Triton's own /metrics count the requests. A second server holds tiny
bundles of every prediction type and masked-source fill, each equal to its torch engine.

Makes Triton's environment on first use (`cleanplate triton setup`; see the triton_env fixture)."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import bundle_variant, overlaid_photos, serve_in_thread
from PIL import Image

from cleanplate.bundle import default_bundle_path, read_config
from cleanplate.engines import EngineUnavailable, TorchEngine
from cleanplate.errors import InputError
from cleanplate.export.triton import RepositoryOptions, export_triton
from cleanplate.export.triton_server import TritonServer, default_env_path, setup_env
from cleanplate.imaging import decode_image, decode_mask, dilate_mask
from cleanplate.remover import RemovalRequest, prepare
from cleanplate.serving.app import create_app
from cleanplate.serving.settings import Settings
from cleanplate.triton_engine import TritonEngine

pytestmark = pytest.mark.triton

EXAMPLES = Path(__file__).parents[1] / "examples"
# The tolerance between engines: ONNX Runtime and PyTorch differ by ~1e-6 per graph call, which after
# 4 steps and the VAE decoder moves a few pixels by one uint8 level.
MAX_LEVELS, MAX_MEAN_LEVELS = 2, 0.05


@pytest.fixture(scope="session")
def triton_env() -> Path:
    """Triton's own environment, made on first use (`cleanplate triton setup`: ~580 MB from the package
    registry, a few minutes once; then a no-op), so installing cleanplate to remove one overlay does not wait
    for it."""
    return setup_env(default_env_path())


@pytest.fixture(scope="session")
def default_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    export_triton(None, repo, RepositoryOptions(backend="python", max_batch=4, bls_instances=1, intra_op_threads=1))
    return repo


@pytest.fixture(scope="session")
def triton(default_repo: Path, triton_env: Path):
    server = TritonServer(default_repo, env=triton_env)
    server.start(timeout_s=180)
    yield server
    assert server.stop() == 0, server.log_tail()


def _crops(photos: dict[str, np.ndarray], resolution: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Model crops of real photos with a text-sized mask, cut as the gateway cuts them."""
    out = []
    for name in ("coffee", "chelsea", "astronaut"):
        rgb = photos[name]
        h, w = rgb.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[h // 3: h // 3 + h // 8, w // 4: w // 4 + w // 3] = True
        prep = prepare(RemovalRequest(decode_image(_png(rgb)), mask), resolution, 8)
        out.append((name, prep.crop, prep.crop_mask))
    return out


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


async def _both(engine: TritonEngine, torch_engine: TorchEngine, crop, mask, seed: int, steps: int):
    return await engine.inpaint(crop, mask, seed=seed, steps=steps), await torch_engine.inpaint(crop, mask, seed=seed,
                                                                                                  steps=steps)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_engine_equals_torch_engine_on_real_photos(triton: TritonServer, photos, protocol: str) -> None:
    url = triton.grpc_url if protocol == "grpc" else triton.http_url

    async def run() -> None:
        engine, torch_engine = TritonEngine(url, protocol=protocol), TorchEngine(None, max_batch=1)
        await asyncio.wait_for(engine.start(), 30)
        await torch_engine.start()
        try:
            assert engine.ready() and engine.resolution == torch_engine.resolution == 256
            assert engine.default_steps == torch_engine.default_steps
            assert engine.default_dilate_px == torch_engine.default_dilate_px
            assert engine.paste_prefill == torch_engine.paste_prefill
            assert engine.threshold == pytest.approx(torch_engine.threshold)
            for i, (name, crop, mask) in enumerate(_crops(photos, engine.resolution)):
                steps = (4, 2, 1)[i]
                ours, ref = await _both(engine, torch_engine, crop, mask, seed=10 + i, steps=steps)
                assert ours.shape == ref.shape == (256, 256, 3) and ours.dtype == np.uint8
                diff = np.abs(ours.astype(int) - ref.astype(int))
                assert diff.max() <= MAX_LEVELS and diff.mean() <= MAX_MEAN_LEVELS, (name, diff.max(), diff.mean())
                # the seed reaches Triton's noise: another seed gives another removal, the one torch gives with it
                # (the default bundle damps its learned correction to x0.1, so seeds move a few levels only)
                other, other_ref = await _both(engine, torch_engine, crop, mask, seed=99, steps=steps)
                assert np.abs(other.astype(int) - ours.astype(int)).max() > 0
                assert np.abs(other.astype(int) - other_ref.astype(int)).max() <= MAX_LEVELS
                # the discriminator inside Triton scores as the torch engine does
                s_triton = await engine.score(crop, ours, mask)
                s_torch = await torch_engine.score(crop, ours, mask)
                assert s_triton == pytest.approx(s_torch, abs=1e-4)
            # a request the model refuses is the caller's error (typed status), not an engine failure
            with pytest.raises(InputError, match="steps must be one value") as refused:
                await engine.inpaint(crop, mask, seed=0, steps=51)
            assert refused.value.code == "bad_option" and engine.ready()
        finally:
            await engine.close()
            await torch_engine.close()

    asyncio.run(run())


def test_triton_engine_detects_as_torch(triton: TritonServer, default_repo: Path, photos) -> None:
    """The repository's detector model, between Detector.preprocess / postprocess in the engine with the model's
    detector_config, gives the shipped detector's mask and detections on real photos with drawn overlays (found)
    and on a clean one (left clean), over gRPC and HTTP."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from cleanplate.bundle import DETECTOR_DIR
    from cleanplate.detector import Detector, DetectorConfig

    detector = Detector.from_dir(default_bundle_path() / DETECTOR_DIR)
    config = text_format.Parse((default_repo / "detector/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert DetectorConfig.model_validate_json(config.parameters["detector_config"].string_value) == detector.config
    images = overlaid_photos(photos)

    async def run(url: str, protocol: str) -> None:
        engine = TritonEngine(url, protocol=protocol)
        await asyncio.wait_for(engine.start(), 30)
        try:
            assert engine.has_detector
            for name, image in images.items():
                ours, ref = await engine.detect(image), detector.detect(image)
                assert ours.mask.shape == image.shape[:2] and np.array_equal(ours.mask, ref.mask), (protocol, name)
                assert [d.to_dict() for d in ours.detections] == [d.to_dict() for d in ref.detections], (protocol, name)
                assert (ours.mask > 0).mean() > 0.002 if "overlay" in name else not ours.mask.any(), (protocol, name)
        finally:
            await engine.close()

    asyncio.run(run(triton.grpc_url, "grpc"))
    asyncio.run(run(triton.http_url, "http"))


# Bundles that predict each kind of output and fill the masked source with Telea (one with zero fill, one with
# Navier-Stokes): (prediction_type, masked_source, decode_residual with this residual_scale, or None).
VARIANTS = (("epsilon", "telea", None), ("v_prediction", "telea", None), ("sample", "telea", None),
            ("sample", "zero", None), ("sample", "telea", 1.0), ("sample", "telea", 0.4), ("sample", "ns", 0.4))


def _variant_model(prediction_type: str, fill: str, residual: float | None) -> str:
    return f"cleanplate_remove_{prediction_type}_{fill}" + ("" if residual is None else f"_residual{round(residual * 100)}")


@pytest.fixture(scope="module")
def variants(triton_env: Path, gated_bundle: Path, gated_onnx: Path, tmp_path_factory: pytest.TempPathFactory):
    """One Triton for every variant of the tiny gated bundle (same weights, so one ONNX export): the graph
    models and cleanplate_score of one export, and each variant's cleanplate_remove renamed
    ``cleanplate_remove_<prediction_type>_<fill>``, all calling the same graph models.
    Yields (server, {variant: bundle path})."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from cleanplate.export.triton import validate_repository

    root = tmp_path_factory.mktemp("variants")
    merged = root / "repo"
    bundles = {}
    opts = RepositoryOptions(backend="python", max_batch=2, bls_instances=1, intra_op_threads=1)
    for i, variant in enumerate(VARIANTS):
        prediction_type, fill, residual = variant
        name = _variant_model(*variant)
        bundles[variant] = bundle_variant(gated_bundle, root / name, prediction_type=prediction_type,
                                          masked_source=fill, decode_residual=residual is not None,
                                          residual_scale=residual)
        repo = root / f"repo_{name}"
        export_triton(bundles[variant], repo, opts, onnx_dir=gated_onnx)
        if i == 0:
            shutil.copytree(repo, merged, ignore=shutil.ignore_patterns("cleanplate_remove"))
        shutil.copytree(repo / "cleanplate_remove", merged / name)
        config = text_format.Parse((merged / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        config.name = name
        (merged / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    validate_repository(merged)
    server = TritonServer(merged, env=triton_env)
    server.start(timeout_s=180)
    yield server, bundles
    assert server.stop() == 0, server.log_tail()


@pytest.mark.parametrize("variant", VARIANTS, ids=["_".join(map(str, v)) for v in VARIANTS])
def test_triton_engine_follows_prediction_type_and_masked_source(variants, photos,
                                                                 variant: tuple[str, str, float | None]) -> None:
    """For a bundle predicting ε, v or x0 with a Telea-, NS- or zero-filled masked source, with or without the
    residual decode, the Triton repository removes as the torch engine does; every other variant gives
    another removal, so the comparison sees the prediction type, the fill and the decode."""
    server, bundles = variants

    async def run() -> None:
        engines = {v: TritonEngine(server.grpc_url, remove_model=_variant_model(*v)) for v in VARIANTS}
        torch_engine = TorchEngine(bundles[variant], max_batch=1)
        await asyncio.gather(*(asyncio.wait_for(e.start(), 30) for e in engines.values()))
        await torch_engine.start()
        try:
            assert engines[variant].resolution == torch_engine.resolution == 64
            expected_prefill = variant[1] if variant[2] is not None and variant[1] != "zero" else None
            assert engines[variant].paste_prefill == torch_engine.paste_prefill == expected_prefill
            assert not engines[variant].has_detector  # the tiny bundle has no detector, so neither has its repository
            with pytest.raises(InputError) as no_detector:
                await engines[variant].detect(photos["chelsea"])
            assert no_detector.value.code == "no_detector"
            for i, (name, crop, mask) in enumerate(_crops(photos, 64)):
                steps = (4, 2, 1)[i]
                ours, ref = await _both(engines[variant], torch_engine, crop, mask, seed=20 + i, steps=steps)
                diff = np.abs(ours.astype(int) - ref.astype(int))
                assert diff.max() <= MAX_LEVELS and diff.mean() <= MAX_MEAN_LEVELS, (name, diff.max(), diff.mean())
                for other in VARIANTS:
                    if other != variant:
                        theirs = await engines[other].inpaint(crop, mask, seed=20 + i, steps=steps)
                        assert np.abs(theirs.astype(int) - ours.astype(int)).max() > 10, (name, other)
        finally:
            for engine in engines.values():
                await engine.close()
            await torch_engine.close()

    asyncio.run(run())


def test_bls_batches_requests_and_isolates_bad_ones(triton: TritonServer, photos) -> None:
    """Three crops in one request equal three single requests; a crop at an unexported size fails alone."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(triton.grpc_url)
    crops = _crops(photos, 256)

    def infer(images, masks, seeds, steps=4):
        inputs = [grpc.InferInput("image", list(images.shape), "UINT8"), grpc.InferInput("mask", list(masks.shape), "UINT8"),
                  grpc.InferInput("seed", [len(seeds), 1], "INT64"), grpc.InferInput("steps", [len(seeds), 1], "INT32")]
        for t, v in zip(inputs, (images, masks, np.array(seeds, np.int64)[:, None],
                                 np.full((len(seeds), 1), steps, np.int32)), strict=True):
            t.set_data_from_numpy(v)
        return client.infer("cleanplate_remove", inputs).as_numpy("result")

    try:
        images = np.stack([c[1] for c in crops])
        masks = np.stack([c[2] for c in crops]).astype(np.uint8)
        together = infer(images, masks, [1, 2, 3])
        for i in range(3):
            alone = infer(images[i:i + 1], masks[i:i + 1], [i + 1])
            assert np.abs(alone[0].astype(int) - together[i].astype(int)).max() <= 1
        with pytest.raises(Exception, match=r"R in \[256\]"):
            infer(np.zeros((1, 200, 200, 3), np.uint8), np.ones((1, 200, 200), np.uint8), [0])
        with pytest.raises(Exception, match="steps must be one value in 1..50") as refused:
            infer(images[:1], masks[:1], [0], steps=0)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"  # typed, so clients need not parse text
        assert infer(images[:1], masks[:1], [1]).shape == (1, 256, 256, 3)  # the server is fine after bad requests
    finally:
        client.close()


def _metric(text: str, name: str, model: str) -> float:
    m = re.search(rf'^{name}{{model="{model}",version="1"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_gateway_with_triton_engine(triton: TritonServer, tmp_path: Path) -> None:
    """`engine=triton` through real HTTP: the same bytes as the torch gateway within the stated tolerance,
    bit-exact outside the dilated mask, the gate works, /readyz is ready, Triton's /metrics count it."""
    image_bytes = (EXAMPLES / "coffee_sale.jpg").read_bytes()
    mask_bytes = (EXAMPLES / "coffee_sale_mask.png").read_bytes()
    files = {"image": ("a.jpg", image_bytes, "image/jpeg"), "mask": ("m.png", mask_bytes, "image/png")}
    data = {"output_format": "png", "seed": "3"}
    metrics_before = httpx.get(f"http://{triton.metrics_url}/metrics").text

    results = {}
    for engine in ("triton", "torch"):
        settings = Settings(engine=engine, triton_url=triton.grpc_url, max_batch=1)
        with serve_in_thread(create_app(settings)) as url:
            ready = httpx.get(url + "/readyz").json()
            assert ready["engine"] == engine and ready["resolution"] == 256 and ready["quality_gate"] is True
            r = httpx.post(url + "/v1/remove", files=files, data=data, timeout=120)
            assert r.status_code == 200, r.text
            results[engine] = np.asarray(Image.open(io.BytesIO(r.content)))
            if engine == "triton":
                gated = httpx.post(url + "/v1/remove", files=files, timeout=120, headers={"Accept": "application/json"},
                                   data={**data, "quality_gate": "true", "threshold": "1.0", "max_attempts": "2"})
                assert gated.status_code == 200, gated.text
                body = gated.json()
                assert body["attempts"] == 2 and body["passed"] is False and 0 < body["score"] < 1
    source = np.asarray(decode_image(image_bytes).rgb)
    diff = np.abs(results["triton"].astype(int) - results["torch"].astype(int))
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MAX_MEAN_LEVELS
    outside = ~dilate_mask(decode_mask(mask_bytes), 8)
    assert np.array_equal(results["triton"][outside], source[outside])
    metrics_after = httpx.get(f"http://{triton.metrics_url}/metrics").text
    for model, calls in (("cleanplate_remove", 3), ("cleanplate_score", 2)):
        done = _metric(metrics_after, "nv_inference_request_success", model) - \
            _metric(metrics_before, "nv_inference_request_success", model)
        assert done == calls, (model, done)
    # each removal of N steps (the bundle's default) ran the UNet N times inside Triton (BLS -> unet)
    unet_runs = _metric(metrics_after, "nv_inference_request_success", "unet") - \
        _metric(metrics_before, "nv_inference_request_success", "unet")
    assert unet_runs == 3 * read_config(default_bundle_path()).steps


def _wait_readyz(url: str, status: int, timeout_s: float = 10.0) -> None:
    """Poll the gateway's /readyz until it answers ``status`` (the engine's health check runs every 0.2 s)."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(url + "/readyz").status_code != status and time.monotonic() < deadline:
        time.sleep(0.1)


def _check_serves_while_up(server: TritonServer, url: str, resolution: int, files: dict) -> None:
    """Start ``server``: the gateway at ``url`` gets ready at ``resolution`` and removes; then stop it."""
    server.start(timeout_s=120)
    try:
        _wait_readyz(url, 200)
        assert httpx.get(url + "/readyz").json()["resolution"] == resolution
        assert httpx.post(url + "/v1/remove", files=files, timeout=60).status_code == 200
    finally:
        server.stop()


def test_readiness_follows_triton(triton_env: Path, gated_bundle: Path, gated_onnx: Path, tmp_path: Path) -> None:
    """/readyz is 503 until Triton is up, 200 while it is, 503 after it stops (requests then get 503), and
    200 again when a Triton with a changed repository comes back, whose parameters the engine re-reads."""
    repo = tmp_path / "repo"
    export_triton(gated_bundle, repo, RepositoryOptions(backend="python", max_batch=2, bls_instances=1),
                  onnx_dir=gated_onnx)
    server = TritonServer(repo, env=triton_env, exit_timeout_s=3)  # the gateway keeps its channel open
    settings = Settings(engine="triton", triton_url=server.grpc_url, triton_retries=1)
    app = create_app(settings)
    app.state.engine.health_interval_s = 0.2
    files = {"image": ("a.png", _png(np.full((64, 64, 3), 120, np.uint8)), "image/png"),
             "mask": ("m.png", _png(np.pad(np.full((16, 16, 3), 255, np.uint8), ((24, 24), (24, 24), (0, 0)))),
                      "image/png")}
    with serve_in_thread(app, timeout_s=3) as url:
        assert httpx.get(url + "/readyz").status_code == 503
        assert httpx.post(url + "/v1/remove", files=files).status_code == 503
        _check_serves_while_up(server, url, 64, files)
        _wait_readyz(url, 503)
        assert httpx.get(url + "/readyz").status_code == 503
        r = httpx.post(url + "/v1/remove", files=files, timeout=60)
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        # A new repository rolls out (here: the 128 px bucket becomes the serving resolution) on the same
        # address: the gateway is ready again and serves at the new resolution without a restart.
        config = repo / "cleanplate_remove" / "config.pbtxt"
        config.write_text(config.read_text().replace('string_value: "64"\n', 'string_value: "128"\n', 1))
        assert 'key: "resolution"\n  value {\n    string_value: "128"' in config.read_text()
        again = TritonServer(repo, env=triton_env, http_port=server.http_port, grpc_port=server.grpc_port,
                             metrics_port=server.metrics_port, exit_timeout_s=3)
        _check_serves_while_up(again, url, 128, files)


def test_unreachable_triton_is_engine_unavailable() -> None:
    """A call to a Triton that went away is retried, then answered as EngineUnavailable (503), not a crash."""
    from cleanplate.export.triton_server import free_port

    async def run() -> None:
        engine = TritonEngine(f"127.0.0.1:{free_port()}", retries=2, timeout_s=2)
        engine._configured, engine.resolution = True, 64  # as if it had been up  # noqa: SLF001
        import tritonclient.grpc.aio as mod

        engine._mod, engine._client = mod, mod.InferenceServerClient(engine.url)  # noqa: SLF001
        try:
            with pytest.raises(EngineUnavailable, match="unavailable"):
                await engine.inpaint(np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), bool), seed=0, steps=1)
            assert not engine.ready()
        finally:
            await engine.close()

    asyncio.run(run())


def test_error_classification() -> None:
    from tritonclient.utils import InferenceServerException

    classify = TritonEngine._classify  # noqa: SLF001
    assert classify(InferenceServerException("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE")) == "queue_full"
    assert classify(InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")) == "timeout"
    assert classify(InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")) == "transient"
    assert classify(ConnectionRefusedError()) == "transient"
    assert classify(InferenceServerException("image must be (B,R,R,3)", status="StatusCode.INTERNAL")) == "fatal"


def test_servers_on_one_machine_name_their_shared_memory_apart(triton_env: Path, tmp_path: Path) -> None:
    """Two servers (two test workers, or a restart while the old stubs exit) with one python-backend shm
    prefix abort with boost::interprocess::lock_exception; each server gets its own."""
    prefixes = [next(a for a in TritonServer(tmp_path, env=triton_env).command()[0] if "shm-region-prefix-name" in a)
                for _ in range(2)]
    assert prefixes[0] != prefixes[1] and all(p.startswith("--backend-config=python,") for p in prefixes)


def test_triton_setup_is_idempotent(triton_env: Path) -> None:
    from cleanplate.export.triton_server import setup_env

    said: list[str] = []
    assert setup_env(triton_env, progress=said.append) == triton_env
    assert said == [f"Triton environment is ready: {triton_env}"]  # nothing reinstalled


def test_triton_serve_cli(default_repo: Path, triton_env: Path, tmp_path: Path) -> None:
    """`cleanplate triton serve` validates the repository, starts Triton on 127.0.0.1, says when it is ready,
    and stops it cleanly on SIGTERM; an invalid repository exits 1 before anything starts."""
    import signal
    import subprocess
    import sys

    from cleanplate.export.triton_server import free_port

    exe = [sys.executable, "-m", "cleanplate.cli", "triton", "serve"]
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([*exe, default_repo, "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                             "--metrics-port", str(ports[2]), "--env", triton_env, "--exit-timeout-s", "3"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"Triton ready: http 127.0.0.1:{ports[0]}"), line
        assert httpx.get(f"http://127.0.0.1:{ports[0]}/v2/health/ready").status_code == 200
        assert "nv_inference_request_success" in httpx.get(f"http://127.0.0.1:{ports[2]}/metrics").text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "Triton stopped (0)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    (tmp_path / "bad").mkdir()
    done = subprocess.run([*exe, tmp_path, "--env", triton_env], capture_output=True, text=True)
    assert done.returncode == 1 and "error: invalid Triton model repository:\n  bad: no config.pbtxt" in done.stderr
