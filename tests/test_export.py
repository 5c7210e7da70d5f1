"""ONNX export with parity, the TensorRT profile plan, and Triton model repositories (no server here; the
real Triton runs in tests/test_triton.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import bundle_variant, overlaid_photos
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from cleanplate.errors import ExportError, InputError
from cleanplate.export.onnx import export_onnx, graph_specs
from cleanplate.export.tensorrt import default_ranges, parse_profile, plan_profiles, profiles_for_graph
from cleanplate.export.triton import RepositoryOptions, export_triton, validate_repository

CLEANPLATE = Path(__file__).parents[1] / "cleanplate"


@pytest.fixture(scope="module")
def onnx_dir(gated_onnx: Path) -> Path:
    return gated_onnx


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_export_writes_graphs_manifest_and_parity(onnx_dir: Path) -> None:
    for graph in ("unet", "vae_encoder", "vae_decoder", "discriminator"):
        assert (onnx_dir / f"{graph}.onnx").stat().st_size > 1000
    manifest = json.loads((onnx_dir / "export.json").read_text())
    assert manifest["buckets"] == [64, 128] and manifest["max_batch"] == 4 and manifest["vae_scale_factor"] == 2
    assert manifest["threshold"] == 0.5 and manifest["steps"] == 4
    assert manifest["prediction_type"] == "epsilon" and manifest["masked_source"] == "zero"  # the bundle defaults
    assert [t["name"] for t in manifest["graphs"]["unet"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    parity = json.loads((onnx_dir / "parity.json").read_text())
    assert parity["ok"] and parity["seed"] == 11
    # every graph x output at batch 1 and 3, at both buckets
    assert {(r["graph"], r["batch"], r["resolution"]) for r in parity["results"]} == {
        (g, b, r) for g in ("unet", "vae_encoder", "vae_decoder", "discriminator") for b in (1, 3) for r in (64, 128)}
    assert all(0 <= r["max_abs"] <= r["limit"] for r in parity["results"])
    assert "| unet | noise_pred | 3 | 128 |" in (onnx_dir / "parity.md").read_text()


def test_onnx_graphs_have_dynamic_batch_and_size(onnx_dir: Path, gated_bundle: Path) -> None:
    """The VAE round trip through ONNX at a batch and size never exported equals PyTorch's."""
    from cleanplate.pipeline import RemovalPipeline

    pipe = RemovalPipeline.from_bundle(gated_bundle)
    images = torch.rand((4, 3, 96, 96)) * 2 - 1
    latent = _session(onnx_dir / "vae_encoder.onnx").run(None, {"image": images.numpy()})[0]
    assert latent.shape == (4, 4, 48, 48)
    np.testing.assert_allclose(latent, pipe.encode(images).numpy(), atol=1e-4)
    decoded = _session(onnx_dir / "vae_decoder.onnx").run(None, {"latent": latent})[0]
    np.testing.assert_allclose(decoded, pipe.decode(torch.from_numpy(latent)).numpy(), atol=1e-4)
    score = _session(onnx_dir / "discriminator.onnx").run(None, {
        "result_latent": latent, "mask_latent": np.ones((4, 1, 48, 48), np.float32), "source_latent": latent})[0]
    assert score.shape == (4,) and ((score > 0) & (score < 1)).all()


def test_parity_beyond_tolerance_fails_with_the_worst_output(gated_bundle: Path, tmp_path: Path, cli) -> None:
    with pytest.raises(ExportError, match=r"parity beyond tolerance: \w+\.\w+ max \|ONNX - PyTorch\|"):
        export_onnx(gated_bundle, tmp_path, graphs=["vae_decoder"], atol=0.0, rtol=0.0)
    report = json.loads((tmp_path / "parity.json").read_text())  # written even so, for the post-mortem
    assert report["ok"] is False and any(not r["ok"] for r in report["results"])
    run = cli("export", "onnx", gated_bundle, "--out", tmp_path / "cli", "--graph", "vae_decoder", "--atol", "0",
              "--rtol", "0")
    assert run.code == 1 and run.err.splitlines()[-1].startswith("error: parity beyond tolerance: vae_decoder.image")


def test_onnx_bad_options_exit_2(tiny_bundle: Path, gated_bundle: Path, tmp_path: Path, cli) -> None:
    run = cli("export", "onnx", gated_bundle, "--out", tmp_path, "--resolution", "66")
    assert run.code == 2 and "multiples of 4 px" in run.err  # VAE factor 2 x one UNet downsampling
    run = cli("export", "onnx", tiny_bundle, "--out", tmp_path, "--graph", "discriminator")
    assert run.code == 2 and run.err == "error: the bundle has no discriminator\n"
    run = cli("export", "onnx", gated_bundle, "--out", tmp_path, "--graph", "text_encoder")
    assert run.code == 2 and "unknown graphs" in run.err
    run = cli("export", "onnx", tmp_path / "nope", "--out", tmp_path)
    assert run.code == 2 and run.err.startswith("error: ")


# -- the overlay detector -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default bundle's trained detector alone (``--graph detector``), batch <= 2, parity seed 5."""
    out = tmp_path_factory.mktemp("detector_onnx")
    export_onnx(None, out, graphs=["detector"], max_batch=2, seed=5)
    return out


def test_detector_onnx_equals_torch(detector_onnx: Path) -> None:
    """detector.onnx is Detector.logits at any batch and any sides that are multiples of 32 (non-square, one
    stride, above the working size), and the manifest carries the config that turns its logits into the mask."""
    from cleanplate.bundle import load_bundle
    from cleanplate.export.tensorrt import plan_profiles

    detector = load_bundle().detector
    manifest = json.loads((detector_onnx / "export.json").read_text())
    assert list(manifest["graphs"]) == ["detector"] and manifest["graphs"]["detector"]["files"] == ["detector.onnx"]
    assert manifest["detector"]["config"] == detector.config.model_dump(mode="json")
    assert (manifest["detector"]["stride"], manifest["detector"]["side"]) == (32, 512)
    assert manifest["graphs"]["detector"]["outputs"] == [{"name": "logits", "dims": ["B", 5, "H", "W"], "dtype": "FP32"}]
    parity = json.loads((detector_onnx / "parity.json").read_text())
    assert parity["ok"] and {(r["graph"], r["output"], r["batch"], r["resolution"]) for r in parity["results"]} == {
        ("detector", "logits", 1, 512), ("detector", "logits", 2, 512)}
    session = _session(detector_onnx / "detector.onnx")
    rng = np.random.default_rng(0)
    for shape in ((2, 3, 352, 512), (1, 3, 32, 128), (1, 3, 576, 608)):
        x = rng.random(shape, dtype=np.float32)
        ours, ref = session.run(["logits"], {"image": x})[0], detector.logits(x)
        assert ours.shape == ref.shape == (shape[0], 5, *shape[2:])
        assert np.abs(ours - ref).max() <= 1e-3 + 1e-3 * np.abs(ref).max(), shape  # the export's own tolerance
    # TensorRT gets one profile over every side preprocess makes, whatever the buckets
    (profile,) = plan_profiles(detector_onnx)["detector"]
    assert profile.shapes["image"] == ((1, 3, 32, 32), (1, 3, 512, 512), (2, 3, 512, 512))


def test_onnxruntime_engine_detects_as_torch(detector_onnx: Path, gated_bundle: Path, gated_onnx: Path,
                                             photos) -> None:
    """The onnxruntime engine's mask and detections equal Detector.detect's on real photos with drawn overlays
    (found) and on a clean one (left clean); an export without detector.onnx says so (no_detector)."""
    from cleanplate.bundle import load_bundle
    from cleanplate.onnxruntime_engine import OnnxRuntimeEngine

    detector = load_bundle().detector

    async def run() -> None:
        engine = OnnxRuntimeEngine(detector_onnx, threads=1)
        assert engine.has_detector
        await engine.start()
        try:
            for name, image in overlaid_photos(photos).items():
                ours, ref = await engine.detect(image), detector.detect(image)
                assert ours.mask.shape == image.shape[:2] and ours.mask.dtype == np.uint8
                assert np.array_equal(ours.mask, ref.mask), name
                assert [d.to_dict() for d in ours.detections] == [d.to_dict() for d in ref.detections], name
                assert (ours.mask > 0).mean() > 0.002 if "overlay" in name else not ours.mask.any(), name
            with pytest.raises(InputError) as bad:
                await engine.detect(np.zeros((8, 8), np.uint8))
            assert bad.value.code == "bad_input"
        finally:
            await engine.close()
        without = OnnxRuntimeEngine(gated_onnx, gated_bundle)
        assert not without.has_detector
        with pytest.raises(InputError) as none:
            await without.detect(photos["chelsea"])
        assert none.value.code == "no_detector"

    asyncio.run(run())


# -- TensorRT profile plan --------------------------------------------------------------------------------
def test_parse_profile() -> None:
    assert parse_profile("1024:1-4-8") == parse_profile(" 1024:1-4-8 ")
    r = parse_profile("512:2-2-16")
    assert (r.resolution, r.min, r.opt, r.max) == (512, 2, 2, 16)
    for bad in ("1024", "1024:1-4", "x:1-2-3", "512:0-1-2", "512:4-2-8", "512:1-8-4"):
        with pytest.raises(InputError):
            parse_profile(bad)
    with pytest.raises(InputError, match="above the export's max_batch 8"):
        parse_profile("512:1-4-16", max_batch=8)


def test_profile_plan_from_an_export(onnx_dir: Path, cli) -> None:
    plan = plan_profiles(onnx_dir)
    assert sorted(plan) == ["discriminator", "unet", "vae_decoder", "vae_encoder"]
    unet = plan["unet"]
    assert [p.resolution for p in unet] == [64, 128]  # one profile per bucket, in order
    assert unet[1].shapes["sample"] == ((1, 9, 64, 64), (2, 9, 64, 64), (4, 9, 64, 64))
    assert unet[0].shapes["timestep"] == ((1,), (2,), (4,))
    assert plan["vae_encoder"][0].shapes["image"][2] == (4, 3, 64, 64)
    custom = plan_profiles(onnx_dir, ["128:1-1-2"], graphs=["vae_decoder"])
    assert list(custom) == ["vae_decoder"] and custom["vae_decoder"][0].shapes["latent"] == (
        (1, 4, 64, 64), (1, 4, 64, 64), (2, 4, 64, 64))
    with pytest.raises(InputError, match="not one of the exported buckets"):
        plan_profiles(onnx_dir, ["256:1-2-4"])
    with pytest.raises(InputError, match="above the export's max_batch"):
        plan_profiles(onnx_dir, ["64:1-2-8"])
    run = cli("export", "tensorrt", onnx_dir, "--plan-only", "--profiles", "64:1-2-3")
    assert run.code == 0 and json.loads(run.out)["unet"][0]["shapes"]["sample"]["max"] == [3, 9, 32, 32]


def test_tensorrt_build_without_tensorrt_exits_2(onnx_dir: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are here: the build itself is the GPU check")
    except ImportError:
        pass
    run = cli("export", "tensorrt", onnx_dir, "--out", tmp_path, "--fp16")
    assert run.code == 2 and run.err.count("\n") == 1 and "--plan-only" in run.err
    assert not list(tmp_path.iterdir())
    run = cli("export", "tensorrt", onnx_dir, "--out", tmp_path, "--fp16", "--bf16")
    assert run.code == 2 and run.err == "error: give --fp16 or --bf16, not both\n"


def test_sdxl_inpainting_unet_shapes_and_profile_plan() -> None:
    """Full-size SDXL-inpainting UNet (2.6 B parameters, on the meta device: no memory, no weights):
    the graph wrapper's output shapes at every bucket, and the TensorRT profile plan for them."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from cleanplate.bundle import SDXL_INPAINT_UNET_CONFIG
    from cleanplate.export.onnx import UNetGraph

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL_INPAINT_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) > 2.5e9
    specs = graph_specs(4, 2048, 1280)
    graph = UNetGraph(unet).eval()
    for resolution in (512, 768, 1024):
        inputs = [torch.empty(t.shape(2, resolution, 8), device="meta") for t in specs["unet"].inputs]
        with torch.no_grad():
            out = graph(*inputs)
        assert out.shape == specs["unet"].outputs[0].shape(2, resolution, 8) == (2, 4, resolution // 8, resolution // 8)
    plan = profiles_for_graph("unet", specs["unet"].inputs, default_ranges([512, 1024], 8), 8)
    assert plan[1].shapes["sample"] == ((1, 9, 128, 128), (4, 9, 128, 128), (8, 9, 128, 128))
    assert plan[1].shapes["encoder_hidden_states"][2] == (8, 77, 2048)
    assert plan[0].shapes["text_embeds"][0] == (1, 1280) and plan[0].shapes["time_ids"][1] == (4, 6)


# -- Triton model repositories --------------------------------------------------------------------------
def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_triton_repository(onnx_dir: Path, gated_bundle: Path, tmp_path: Path, backend: str) -> None:
    opts = RepositoryOptions(backend=backend, max_batch=4, queue_delay_us=500, instances=2, max_queue=16)
    models = export_triton(gated_bundle, tmp_path, opts, onnx_dir=onnx_dir)
    assert models == ["cleanplate_remove", "cleanplate_score", "discriminator", "unet", "vae_decoder", "vae_encoder"]
    unet = _config(tmp_path / "unet" / "config.pbtxt")
    assert unet.max_batch_size == 4 and unet.dynamic_batching.max_queue_delay_microseconds == 500
    assert unet.dynamic_batching.default_queue_policy.max_queue_size == 16
    assert unet.instance_group[0].count == 2
    sample = {t.name: t for t in unet.input}["sample"]
    assert list(sample.dims) == [9, -1, -1] and sample.data_type == mc.TYPE_FP32
    timestep = {t.name: t for t in unet.input}["timestep"]
    assert list(timestep.dims) == [1] and timestep.HasField("reshape") == (backend == "onnxruntime")
    if backend == "python":
        assert unet.backend == "python" and (tmp_path / "unet/1/model.py").exists()
        assert unet.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    else:
        assert unet.backend == "onnxruntime" and not (tmp_path / "unet/1/model.py").exists()
    assert (tmp_path / "unet/1/model.onnx").read_bytes() == (onnx_dir / "unet.onnx").read_bytes()
    remove = _config(tmp_path / "cleanplate_remove" / "config.pbtxt")
    params = {k: v.string_value for k, v in remove.parameters.items()}
    assert params["mode"] == "remove" and params["resolution"] == "64" and params["buckets"] == "64,128"
    assert params["default_steps"] == "4" and params["dilate_px"] == "2" and params["threshold"] == "0.5"
    assert params["masked_source"] == "zero" and params["prediction_type"] == "epsilon"
    for name in ("model.py", "sampling.py", "masked_source.py", "graph_removal.py", "schedules.json",
                 "null_conditioning.npz"):
        assert (tmp_path / "cleanplate_remove" / "1" / name).exists()
    # the BLS model runs the package's own sampler, conditioning fill and graph removal, byte for byte
    for module in ("sampling.py", "masked_source.py", "graph_removal.py"):
        assert (tmp_path / "cleanplate_remove/1" / module).read_bytes() == (CLEANPLATE / module).read_bytes()
    cond = np.load(tmp_path / "cleanplate_remove/1/null_conditioning.npz")
    assert cond["prompt_embeds"].shape == (1, 77, 16) and cond["pooled_prompt_embeds"].shape == (1, 16)
    assert _config(tmp_path / "cleanplate_score" / "config.pbtxt").output[0].name == "score"


def test_triton_repository_follows_the_bundle(onnx_dir: Path, gated_bundle: Path, tmp_path: Path, cli) -> None:
    """The bundle's prediction_type and masked_source reach the BLS model (its parameters and every step of
    schedules.json, which the sampler reads) and the ONNX manifest, even when the graphs come from
    another export of the same weights."""
    from cleanplate.sampling import load_schedule_table

    prediction_type = "v_prediction"
    bundle = bundle_variant(gated_bundle, tmp_path / "b", prediction_type=prediction_type, masked_source="telea")
    export_triton(bundle, tmp_path / "repo", RepositoryOptions(backend="python", max_batch=2), onnx_dir=onnx_dir)
    params = {k: v.string_value for k, v in _config(tmp_path / "repo/cleanplate_remove/config.pbtxt").parameters.items()}
    assert params["masked_source"] == "telea" and params["prediction_type"] == prediction_type
    table = load_schedule_table((tmp_path / "repo/cleanplate_remove/1/schedules.json").read_text())
    assert sorted(table) == list(range(1, 51))
    assert {step.prediction_type for steps in table.values() for step in steps} == {prediction_type}
    assert "masked_source" not in _config(tmp_path / "repo/cleanplate_score/config.pbtxt").parameters
    run = cli("export", "onnx", bundle, "--out", tmp_path / "onnx", "--graph", "vae_decoder")
    assert run.code == 0, run.err
    manifest = json.loads((tmp_path / "onnx/export.json").read_text())
    assert manifest["prediction_type"] == prediction_type and manifest["masked_source"] == "telea"


def test_triton_tensorrt_repository(onnx_dir: Path, gated_bundle: Path, tmp_path: Path, cli) -> None:
    """Plans are built on a GPU; here stand-in plan files check the repository side: platform, GPU instances
    and every optimization profile listed for each instance."""
    run = cli("export", "triton", gated_bundle, "--out", tmp_path / "r0", "--backend", "tensorrt",
              "--onnx", onnx_dir)
    assert run.code == 2 and "--plans" in run.err
    plans = tmp_path / "plans"
    plans.mkdir()
    for graph in ("unet", "vae_encoder", "vae_decoder", "discriminator"):
        (plans / f"{graph}.plan").write_bytes(b"stand-in")
    (plans / "profiles.json").write_text(json.dumps(
        {g: [p.as_dict() for p in ps] for g, ps in plan_profiles(onnx_dir).items()}))
    export_triton(gated_bundle, tmp_path / "repo", RepositoryOptions(backend="tensorrt", max_batch=4),
                  onnx_dir=onnx_dir, plan_dir=plans)
    unet = _config(tmp_path / "repo/unet/config.pbtxt")
    assert unet.platform == "tensorrt_plan" and (tmp_path / "repo/unet/1/model.plan").read_bytes() == b"stand-in"
    assert unet.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert list(unet.instance_group[0].profile) == ["0", "1"]
    (plans / "vae_decoder.plan").unlink()
    run = cli("export", "triton", gated_bundle, "--out", tmp_path / "r1", "--backend", "tensorrt", "--onnx", onnx_dir,
              "--plans", plans, "--max-batch", "4")
    assert run.code == 2 and "vae_decoder.plan missing in" in run.err and not (tmp_path / "r1").exists()


def test_validate_repository_reports_every_problem(onnx_dir: Path, gated_bundle: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    export_triton(gated_bundle, repo, RepositoryOptions(backend="python", max_batch=4), onnx_dir=onnx_dir)
    assert validate_repository(repo)[0] == "cleanplate_remove"
    text = (repo / "unet/config.pbtxt").read_text()
    (repo / "unet/config.pbtxt").write_text(text.replace("max_batch_size: 4", "max_batch_size: 2"))
    (repo / "vae_decoder/config.pbtxt").write_text(text.replace('name: "unet"', 'name: "decoder"'))
    (repo / "vae_encoder/1/model.py").unlink()
    shutil.rmtree(repo / "discriminator")
    (repo / "stray").mkdir()
    (repo / "cleanplate_score/config.pbtxt").write_text("name: 'cleanplate_score' max_batch_size: [")
    with pytest.raises(ExportError) as err:
        validate_repository(repo)
    message = str(err.value)
    for expected in ("unet max_batch_size 2 < graph_max_batch 4", "name 'decoder' != directory 'vae_decoder'",
                     "vae_encoder: 1/model.py is missing", "calls 'discriminator', which is not in the repository",
                     "stray: no config.pbtxt", "cleanplate_score/config.pbtxt:"):
        assert expected in message, (expected, message)


def test_triton_export_cli_end_to_end(tiny_bundle: Path, tmp_path: Path, cli) -> None:
    """`cleanplate export triton` without --onnx exports (and parity-checks) the graphs itself; a bundle
    without a discriminator gets no gate: no cleanplate_score model and no threshold."""
    run = cli("export", "triton", tiny_bundle, "--out", tmp_path / "repo", "--backend", "python", "--max-batch", "2")
    assert run.code == 0, run.err
    assert "all config.pbtxt valid" in run.err
    assert validate_repository(tmp_path / "repo") == ["cleanplate_remove", "unet", "vae_decoder", "vae_encoder"]
    assert "threshold" not in _config(tmp_path / "repo/cleanplate_remove/config.pbtxt").parameters
    run = cli("export", "triton", tiny_bundle, "--out", tmp_path / "repo2", "--max-batch", "0")
    assert run.code == 2 and "max_batch must be >= 1" in run.err
