"""The benchmark harnesses (``cleanplate bench ...``): they time the production code path, their reports hold
what they promise, and their metrics are right. No assertion here depends on how fast anything ran."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import serve_in_thread
from PIL import Image

from cleanplate.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- the pipeline's timing hook ----------------------------------------------------------------------------
def test_stage_hook_names_every_stage_and_keeps_the_result(tiny_bundle: Path) -> None:
    from cleanplate.pipeline import RemovalPipeline

    pipe = RemovalPipeline.from_bundle(tiny_bundle)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 16:40, 20:50] = 1
    seen: list[str] = []
    with_hook = pipe(source, mask, seeds=[3, 4], steps=3, on_stage=seen.append)
    assert seen == ["vae_encode", "noise", "unet_step_1", "unet_step_2", "unet_step_3", "vae_decode"]
    assert torch.equal(with_hook, pipe(source, mask, seeds=[3, 4], steps=3))


# -- latency -----------------------------------------------------------------------------------------------
def test_latency_torch_times_the_production_path(gated_bundle: Path) -> None:
    from cleanplate import imaging
    from cleanplate.benchmarks.common import StageClock, promo_payload
    from cleanplate.benchmarks.latency import _torch_rep, run_latency
    from cleanplate.pipeline import RemovalPipeline
    from cleanplate.remover import remove

    report = run_latency("torch", bundle=gated_bundle, resolutions=[64], batches=[1, 2], steps=2, warmup=0,
                         repeats=2, plain_repeats=1)
    assert report["settings"]["gate"] is True  # the bundle has a discriminator
    assert [(c["resolution"], c["batch"]) for c in report["cases"]] == [(64, 1), (64, 2)]
    for case in report["cases"]:
        assert list(case["stages_ms"]) == ["decode", "crop", "vae_encode", "noise", "unet_step_1", "unet_step_2",
                                           "vae_decode", "readback", "composite", "gate"]
        total = case["total_ms"]
        assert total["n"] == 2 and case["plain_total_ms"]["n"] == 1
        # the stages tile the end-to-end interval: each repetition's stages add up to its total
        assert case["stage_sum_ms_median"] == pytest.approx(total["median"], rel=1e-9)
        assert total["min"] <= total["median"] <= total["p95"] <= total["p99"] <= total["max"]
        assert case["images_per_s"] == pytest.approx(1000 * case["batch"] / total["median"])
    env = report["environment"]
    for key in ("cpu", "cpu_count", "load_avg_1_5_15", "torch_threads", "gpus", "versions", "time_utc"):
        assert key in env
    assert env["versions"]["torch"] == torch.__version__ and env["gpus"] == []  # no GPU on the test machine

    # what a repetition computes is the remover's own result for the same request and seed
    pipe = RemovalPipeline.from_bundle(gated_bundle)
    image_bytes, mask_bytes = promo_payload(64)
    image, mask = imaging.decode_image(image_bytes), imaging.decode_mask(mask_bytes)
    timed = _torch_rep(pipe, image_bytes, mask_bytes, 1, 2, False, StageClock(), seed=5)[0]
    np.testing.assert_array_equal(timed, remove(pipe, image, mask, seed=5, steps=2).pixels)


def test_latency_opencv_engine_and_report(tmp_path: Path) -> None:
    from cleanplate.benchmarks import latency

    report = latency.run_latency("opencv", resolutions=[64, 128], batches=[1, 3], warmup=1, repeats=2)
    assert len(report["cases"]) == 4 and report["settings"]["gate"] is False
    for case in report["cases"]:
        assert list(case["stages_ms"]) == ["decode", "crop", "inpaint", "composite"]
        assert case["stage_sum_ms_median"] == pytest.approx(case["total_ms"]["median"], rel=1e-9)
    md = latency.to_markdown(report, "cleanplate bench latency --engine opencv")
    assert "| 128 | 3 | 128 |" in md and "| inpaint |" in md
    # the auto mask's stage: the default bundle's detector on the same photo, once per image size, beside the sum
    by_size = {c["image_size"]: c["detect_ms"] for c in report["cases"]}
    for case in report["cases"]:
        assert case["detect_ms"] is by_size[case["image_size"]] and case["detect_ms"]["n"] == 2
        assert case["detect_over_removal"] == pytest.approx(case["detect_ms"]["median"] / case["per_image_ms"])
    assert "| detect (auto mask only; per image, not in the sum) |" in md and "| **detect / one removal**" in md
    paths = latency.plot(report, tmp_path / "lat")
    assert [p.name for p in paths] == ["lat.png", "lat_stages.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_triton_statistics_delta_per_request() -> None:
    from cleanplate.benchmarks.latency import _stats_delta

    def row(count: int, execs: int, infer: int, ns: int) -> dict[str, int]:
        return {"inference_count": infer, "execution_count": execs, "success_count": count, "success_ns": ns,
                "queue_count": count, "queue_ns": ns // 10, "compute_input_count": count, "compute_input_ns": 0,
                "compute_infer_count": count, "compute_infer_ns": ns // 2, "compute_output_count": count,
                "compute_output_ns": 0}

    before = {"unet": row(4, 4, 4, 4_000_000), "idle": row(1, 1, 1, 1_000_000)}
    after = {"unet": row(12, 8, 20, 20_000_000), "idle": row(1, 1, 1, 1_000_000)}
    delta = _stats_delta(before, after)
    assert list(delta) == ["unet"]  # models with no request in the window are left out
    assert delta["unet"]["requests"] == 8 and delta["unet"]["mean_batch"] == 4.0
    assert delta["unet"]["success_ms"] == pytest.approx(2.0) and delta["unet"]["queue_ms"] == pytest.approx(0.2)
    assert delta["unet"]["compute_infer_ms"] == pytest.approx(1.0)


# -- quality -----------------------------------------------------------------------------------------------
def test_quality_metrics(gated_bundle: Path, synth_data: Path, tmp_path: Path) -> None:
    from cleanplate import imaging
    from cleanplate.benchmarks import quality
    from cleanplate.training.common import read_meta

    a = np.full((8, 8, 3), 100, np.uint8)
    assert quality.psnr(a, a) == quality.PSNR_CAP_DB
    assert quality.psnr(a + 1, a) == pytest.approx(20 * np.log10(255))  # MSE 1
    m = np.zeros((8, 8), bool)
    m[2:4, 2:4] = True
    b = a.copy()
    b[m] = 110
    assert quality.psnr(b, a, m) == pytest.approx(20 * np.log10(255 / 10)) and quality.psnr(b, a, ~m) == 100.0

    report = quality.run_quality(synth_data, engines=["torch", "opencv"], bundle=gated_bundle, limit=3)
    assert report["n"] == 3 and set(report["summary"]) == {"identity", "telea", "vae_ceiling", "torch", "opencv", "gt"}
    items = read_meta([synth_data])[:3]
    for row, item in zip(report["items"], items, strict=False):
        src = imaging.decode_image(item.source).rgb
        gt = imaging.decode_image(item.gt).rgb
        mask = imaging.decode_mask(item.mask)
        ident = row["methods"]["identity"]
        # "leave it as is" is the source: its in-mask PSNR is that of source vs GT, and it is bit-exact
        assert ident["psnr_mask_db"] == pytest.approx(quality.psnr(src, gt, mask))
        assert (ident["ssim_mask"], ident["ssim"]) == pytest.approx(quality.ssim(src, gt, mask))
        for m_ in row["methods"].values():
            assert -1 <= m_["ssim_mask"] <= 1 and 0 <= m_["score"] <= 1
            assert m_["passed"] == (m_["score"] >= report["settings"]["threshold"])
    s = report["summary"]
    assert s["identity"]["bit_exact_rate"] == 1.0
    assert s["torch"]["bit_exact_rate"] == 1.0 and s["opencv"]["bit_exact_rate"] == 1.0  # the composite's promise
    assert s["torch"]["success_rate"] == np.mean([r["methods"]["torch"]["passed"] for r in report["items"]])
    assert s["identity"]["psnr_mask_db_mean"] == pytest.approx(
        np.mean([r["methods"]["identity"]["psnr_mask_db"] for r in report["items"]]))
    md = quality.to_markdown(report, "cmd")
    assert "| leave as is |" in md and "| cleanplate, torch engine |" in md
    assert quality.plot(report, tmp_path / "q")[0].read_bytes()[:8] == PNG_MAGIC


def test_quality_runs_the_onnxruntime_engine_on_an_export(gated_bundle: Path, gated_onnx: Path,
                                                          synth_data: Path) -> None:
    """bench quality runs the onnxruntime engine on an ONNX export of the bundle (`--onnx-dir`; without it,
    a fresh one); its removals score as the torch engine's (same removal within the graph tolerance) and keep
    the pixels outside the dilated mask."""
    from cleanplate.benchmarks import quality

    report = quality.run_quality(synth_data, engines=["torch", "onnxruntime"], bundle=gated_bundle, limit=2,
                                 onnx_dir=gated_onnx)
    s = report["summary"]
    assert s["onnxruntime"]["bit_exact_rate"] == 1.0
    assert s["onnxruntime"]["psnr_mask_db_mean"] == pytest.approx(s["torch"]["psnr_mask_db_mean"], abs=0.1)
    assert "| cleanplate, onnxruntime engine |" in quality.to_markdown(report, "cmd")


# -- the quality gate --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gate_labels(gated_bundle: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out labelled candidates of 3 synthetic items: anchors, Telea, 2 removals, 1 synthetic each."""
    from cleanplate.training.disc_labels import make_disc_labels

    return make_disc_labels([synth_data], tmp_path_factory.mktemp("gate") / "labels", bundle=gated_bundle,
                            removals_per_item=2, per_item=1, seed=3, limit=3, psnr_good=20.0, ssim_good=0.5)


def test_gate_report(gated_bundle: Path, gate_labels: Path, tmp_path: Path) -> None:
    from scipy.stats import spearmanr

    from cleanplate import imaging
    from cleanplate.benchmarks import discriminator
    from cleanplate.pipeline import RemovalPipeline
    from cleanplate.remover import ScoreRequest, score_batch

    entries = json.loads(gate_labels.read_text())
    report = discriminator.run_gate(gate_labels, bundle=gated_bundle, batch_size=3)
    assert report["harness"] == "gate" and report["n"] == len(entries) == 3 * 6
    items, t = report["items"], report["threshold"]
    assert t == 0.5 and [r["label_kind"] for r in items] == [e["label_kind"] for e in entries]
    # each score is the gateway's: the production scoring path on that one candidate
    pipe = RemovalPipeline.from_bundle(gated_bundle)
    e = entries[4]
    one = score_batch(pipe, [ScoreRequest(imaging.decode_image(gate_labels.parent / e["source"]),
                                          imaging.decode_image(gate_labels.parent / e["GT"]),
                                          imaging.decode_mask(gate_labels.parent / e["mask"]))])[0]
    assert items[4]["score"] == pytest.approx(one, abs=1e-6)
    scores = np.array([r["score"] for r in items])
    labels = np.array([r["label"] for r in items]) == 1
    pairs = [(p > n) + 0.5 * (p == n) for p in scores[labels] for n in scores[~labels]]
    assert report["summary"]["roc_auc"] == pytest.approx(np.mean(pairs))
    assert list(report["by_kind"])[:4] == ["gt", "source", "telea", "removal"]
    for kind, row in report["by_kind"].items():
        mine = [r for r in items if r["label_kind"] == kind]
        assert row["n"] == len(mine) and row["good"] == sum(r["label"] for r in mine)
        assert row["pass_rate"] == pytest.approx(np.mean([r["score"] >= t for r in mine]))
    removal = [r for r in items if r["label_kind"] == "removal"]
    rho = spearmanr([r["score"] for r in removal], [r["psnr_mask_db"] for r in removal]).statistic
    assert report["removal_spearman"]["n"] == 6 and report["removal_spearman"]["psnr"] == pytest.approx(rho)
    targets = {row["name"]: row for row in report["targets"]}
    gt_row = targets["GT pass rate"]
    assert gt_row["value"] == report["by_kind"]["gt"]["pass_rate"] and gt_row["met"] == (gt_row["value"] >= 0.9)
    md = discriminator.to_markdown(report, "cleanplate bench gate X")
    assert "| removal | 6 |" in md and "| source pass rate |" in md and "Spearman" in md
    assert report["labels"]["removals_per_item"] == 2 and "2 removals per item by" in md  # how they were made
    assert discriminator.plot(report, tmp_path / "g")[0].read_bytes()[:8] == PNG_MAGIC


def test_cli_gate_writes_reports_and_report_rebuilds_them(cli, gated_bundle: Path, gate_labels: Path,
                                                          tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "res" / "gate"
    r = cli("bench", "gate", gate_labels, "--bundle", gated_bundle, "--limit", 12, "--out", out)
    assert r.code == 0, r.err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["n"] == 12 and report["command"].startswith("cleanplate bench gate")
    md = out.with_suffix(".md").read_text()
    assert md in r.out and out.with_suffix(".png").exists()
    out.with_suffix(".md").unlink()
    out.with_suffix(".png").unlink()
    r = cli("bench", "report", out.with_suffix(".json"))
    assert r.code == 0, r.err
    assert out.with_suffix(".md").read_text() == md and out.with_suffix(".png").exists()
    for args, message in ((["/no/such/meta.json"], "meta.json"), ([gate_labels, "--limit", 0], "limit"),
                          ([gate_labels, "--bundle", tiny_bundle], "discriminator")):
        r = cli("bench", "gate", *args, "--out", tmp_path / "bad" / "x")
        assert r.code == 2 and r.err.startswith("error: ") and message in r.err, r.err
        assert not (tmp_path / "bad").exists()


# -- load --------------------------------------------------------------------------------------------------
def test_load_counts_answers_by_status(tmp_path: Path) -> None:
    from cleanplate.benchmarks import load
    from cleanplate.serving.app import create_app
    from cleanplate.serving.settings import Settings

    with serve_in_thread(create_app(Settings(engine="opencv", opencv_resolution=64))) as url:
        report = load.run_load_levels(url, concurrency=[1, 2], duration_s=0.6, warmup_requests=1)
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert lv["lost"] == 0 and set(lv["by_status"]) == {"200"} and lv["answered"] == lv["sent"]
        # the gateway's own /metrics saw exactly the answers this client counted in this level
        assert lv["server"]["requests_by_status"] == {"200": lv["by_status"]["200"]}
        assert lv["latency_ms"]["p50"] <= lv["latency_ms"]["p99"]
    assert load.plot(report, tmp_path / "load")[0].read_bytes()[:8] == PNG_MAGIC

    with serve_in_thread(create_app(Settings(engine="opencv", api_keys=["k1"]))) as url:
        report = load.run_load_levels(url, concurrency=[2], duration_s=0.3, warmup_requests=0, api_key="wrong")
    lv = report["levels"][0]
    assert set(lv["by_status"]) == {"401"} and lv["problem_codes"] == {"unauthorized": lv["by_status"]["401"]}
    assert lv["throughput_rps"] == 0 and "401: " in load.to_markdown(report, "cmd")


# -- reference comparison ------------------------------------------------------------------------------------
def test_reference_runs_both_pipelines_on_the_same_parts() -> None:
    from cleanplate.benchmarks.reference import run_reference

    report = run_reference(arch="tiny", device="cpu", warmup=0, repeats=1, image_size=80)
    s = report["settings"]
    assert (s["resolution"], s["image_size"], s["steps"], s["dtype"]) == (64, 80, 4, "fp32")
    assert report["diffusers"]["output_shape"] == report["cleanplate"]["output_shape"] == [80, 80, 3]
    d_stages = list(report["diffusers"]["stages_ms"])
    assert d_stages == ["resize_in", "setup", "text_encoders", "preprocess_vae_encode", "unet_step_1", "unet_step_2",
                        "unet_step_3", "unet_step_4", "vae_decode_postprocess", "resize_back"]
    assert "text_encoders" not in report["cleanplate"]["stages_ms"]
    assert report["ratio_median"] == pytest.approx(report["diffusers"]["total_ms"]["median"]
                                                   / report["cleanplate"]["total_ms"]["median"])


def test_full_size_sdxl_parts_fit_together() -> None:
    """What ``--arch sdxl`` builds on a GPU, built on the meta device (shapes only): SDXL-inpainting's sizes,
    and diffusers' own check that the text encoders fit the UNet's added-time embedding passes."""
    from cleanplate.benchmarks.models import build_parts
    from cleanplate.benchmarks.reference import diffusers_pipeline

    parts = build_parts("sdxl", device="meta", dtype="fp16")
    assert parts.parameters["unet"] == pytest.approx(2.567e9, rel=1e-3)
    assert parts.parameters["text_encoder"] == pytest.approx(123e6, rel=1e-2)
    assert parts.parameters["text_encoder_2"] == pytest.approx(695e6, rel=1e-2)
    assert parts.unet.dtype == torch.float16 and parts.vae.dtype == torch.float32  # SDXL's VAE must upcast
    pipe = diffusers_pipeline(parts)
    assert pipe.vae_scale_factor == 8
    ids, _ = pipe._get_add_time_ids((512, 512), (0, 0), (512, 512), 6.0, 2.5, (512, 512), (0, 0), (512, 512),
                                    dtype=torch.float16, text_encoder_projection_dim=1280)
    assert ids.tolist() == [[512, 512, 0, 0, 512, 512]]
    with pytest.raises(InputError, match="CUDA"):
        build_parts("sdxl", device="cpu", dtype="fp32")


# -- CLI -----------------------------------------------------------------------------------------------------
def test_expand_multi_values() -> None:
    from cleanplate.benchmarks.cli import expand_multi

    assert expand_multi(["--resolution", "256", "512", "--batch", "1", "2", "--steps", "4"]) == [
        "--resolution", "256", "--resolution", "512", "--batch", "1", "--batch", "2", "--steps", "4"]
    assert expand_multi(["--engine", "torch", "opencv", "runs/dev"]) == [
        "--engine", "torch", "--engine", "opencv", "runs/dev"]


def test_cli_latency_writes_reports(cli, tmp_path: Path) -> None:
    out = tmp_path / "res" / "lat"
    r = cli("bench", "latency", "--engine", "opencv", "--resolution", "64", "96", "--batch", "1", "2",
            "--warmup", "0", "--repeats", "2", "--no-detect", "--out", out)
    assert r.code == 0, r.err
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(c["resolution"], c["batch"]) for c in report["cases"]] == [(64, 1), (64, 2), (96, 1), (96, 2)]
    assert not any("detect_ms" in c for c in report["cases"]) and "| detect" not in r.out
    assert report["command"].startswith("cleanplate bench latency --engine opencv")
    assert out.with_suffix(".md").read_text() in r.out
    assert (tmp_path / "res" / "lat.png").exists() and (tmp_path / "res" / "lat_stages.png").exists()

    # `bench report` rebuilds the markdown and plots from the JSON alone (e.g. one brought back from a GPU)
    md = out.with_suffix(".md").read_text()
    for p in (tmp_path / "res").glob("lat*.[mp]*"):
        p.unlink()
    r = cli("bench", "report", out.with_suffix(".json"))
    assert r.code == 0, r.err
    assert out.with_suffix(".md").read_text() == md and (tmp_path / "res" / "lat_stages.png").exists()
    out.with_suffix(".json").write_text("{}")
    r = cli("bench", "report", out.with_suffix(".json"))
    assert r.code == 2 and r.err.startswith("error: ")


def test_cli_latency_compares_engines_in_one_run(cli, gated_bundle: Path, gated_onnx: Path, tmp_path: Path) -> None:
    """Several --engine: each runs with the same options, back to back; one JSON keeps each engine's report
    and a comparison, whose table and ratios come from the per-engine medians; `bench report` rebuilds it."""
    from cleanplate.benchmarks.common import fmt_ms

    out = tmp_path / "res" / "cmp"
    r = cli("bench", "latency", "--engine", "torch", "--engine", "onnxruntime", "--bundle", gated_bundle,
            "--onnx-dir", gated_onnx, "--resolution", "64", "--steps", "2", "--warmup", "0", "--repeats", "2",
            "--out", out)
    assert r.code == 0, r.err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["harness"] == "latency_compare" and report["engines"] == ["torch", "onnxruntime"]
    assert report["command"].startswith("cleanplate bench latency --engine torch --engine onnxruntime")
    per_engine = {e: report["reports"][e]["cases"][0]["per_image_ms"] for e in ("torch", "onnxruntime")}
    for e in per_engine:
        sub = report["reports"][e]
        assert sub["engine"] == e and sub["settings"]["steps"] == 2 and sub["settings"]["repeats"] == 2
        assert [(c["resolution"], c["batch"]) for c in sub["cases"]] == [(64, 1)]
    [row] = report["comparison"]
    assert (row["resolution"], row["batch"]) == (64, 1) and row["per_image_ms"] == per_engine
    ratio = per_engine["onnxruntime"] / per_engine["torch"]
    assert row["ratio_to_first"] == {"torch": 1.0, "onnxruntime": pytest.approx(ratio)}

    md = out.with_suffix(".md").read_text()
    assert md in r.out
    assert "| resolution | batch | torch ms/image | onnxruntime ms/image | onnxruntime ÷ torch |" in md
    assert f"| 64 | 1 | {fmt_ms(per_engine['torch'])} | {fmt_ms(per_engine['onnxruntime'])} | {ratio:.2f}× |" in md
    assert "## Latency: torch engine" in md and "## Latency: onnxruntime engine" in md
    assert (tmp_path / "res" / "cmp.png").read_bytes()[:8] == PNG_MAGIC

    for p in (tmp_path / "res").glob("cmp.[mp]*"):
        p.unlink()
    r = cli("bench", "report", out.with_suffix(".json"))
    assert r.code == 0, r.err
    assert out.with_suffix(".md").read_text() == md and (tmp_path / "res" / "cmp.png").exists()


@pytest.mark.parametrize("engines, args, message", [
    (["torch", "onnxruntime"], ["--arch", "sdxl"], "torch engine only"),
    (["onnxruntime", "torch"], ["--dtype", "fp16"], "fp16"),
    (["torch", "torch"], [], "each engine once"),
])
def test_cli_latency_several_engines_refuses_before_running(cli, tmp_path: Path, engines: list[str],
                                                            args: list[str], message: str) -> None:
    r = cli("bench", "latency", *[a for e in engines for a in ("--engine", e)], *args, "--out", tmp_path / "x")
    assert r.code == 2 and r.err.startswith("error: ") and message in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args, message", [
    (["latency", "--repeats", "0"], "repeats"),
    (["latency", "--dtype", "fp16"], "fp16"),
    (["latency", "--engine", "opencv", "--arch", "sdxl"], "torch engine only"),
    (["quality", "/no/such/set"], "meta.json"),
    (["quality", "SET", "--limit", "0"], "limit"),
    (["load", "--concurrency", "0"], "concurrency"),
    (["load", "--image", "x.jpg"], "--mask"),
    (["reference", "--arch", "sdxl", "--device", "cpu"], "CUDA GPU"),
    (["batch", "--concurrency", "0"], "concurrency"),
    (["flywheel", "--pairs", "1"], "pairs"),
])
def test_cli_bad_input_exits_2(cli, synth_data: Path, tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(synth_data) if a == "SET" else a for a in args]
    r = cli("bench", *args, "--out", tmp_path / "x")
    assert r.code == 2 and r.err.startswith("error: ") and message in r.err, r.err
    assert not list(tmp_path.iterdir())  # nothing written


# -- batch throughput -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_batch_cleans_the_catalog_in_each_mode(cli, gated_bundle: Path, tmp_path: Path) -> None:
    """`bench batch` at toy size: every level of both modes cleans the whole catalog once through the batch job
    (in process, and through a real local gateway), and the report's rates are its own counts over its span."""
    out = tmp_path / "res" / "batch"
    r = cli("bench", "batch", "--images", 3, "--concurrency", 1, 2, "--size", 64, "--bundle", gated_bundle,
            "--out", out)
    assert r.code == 0, r.err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["command"].startswith("cleanplate bench batch") and report["settings"]["images"] == 3
    assert [(x["mode"], x["concurrency"]) for x in report["runs"]] == [
        ("in-process", 1), ("in-process", 2), ("gateway", 1), ("gateway", 2)]
    for run in report["runs"]:
        assert (run["images"], run["ok"], run["errors"], run["exit_code"]) == (3, 3, 0, 0)
        assert 0 <= run["passed"] <= 3  # the gate ran; a random discriminator passes what it passes
        assert run["images_per_s"] == pytest.approx(3 / run["span_s"])
        assert 0 < run["item_ms"]["p50"] <= run["item_ms"]["p95"]
        assert run["span_s"] <= run["wall_s_with_startup"]
    md = out.with_suffix(".md").read_text()
    assert md in r.out and "| gateway | 1 | 2 |" in md and out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    out.with_suffix(".md").unlink()
    r = cli("bench", "report", out.with_suffix(".json"))
    assert r.code == 0, r.err
    assert out.with_suffix(".md").read_text() == md


def test_steady_rate_is_the_slope_of_completions() -> None:
    """Bursts of 4 items every 2 s are 2 images/s wherever the first quarter ends; a start-up gap before the
    first burst does not count."""
    from cleanplate.benchmarks.batch_throughput import steady_rate

    ends = np.repeat(30.0 + 2.0 * np.arange(10), 4) + np.tile([0, 0.01, 0.02, 0.03], 10)
    assert steady_rate(ends) == pytest.approx(2.0, rel=0.05)
    assert steady_rate(np.array([1.0, 2.0, 3.0])) is None


# -- a flywheel round -------------------------------------------------------------------------------------------
def test_cli_flywheel_round_counts_each_step(cli, gated_bundle: Path, tmp_path: Path) -> None:
    """`bench flywheel` at toy size: the scripted labels follow the PSNR cut, the discriminator trains on them
    and the synthetic labels, and autolabel judges both rounds; report, markdown and plot written."""
    out = tmp_path / "res" / "fw"
    r = cli("bench", "flywheel", "--work", tmp_path / "work", "--bundle", gated_bundle, "--pairs", 4, "--cal-pairs", 2,
            "--size", 64, "--label-r1", 2, "--label-r2", 1, "--psnr-yes", 10, "--disc-steps", 2, "--out", out)
    assert r.code == 0, r.err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["harness"] == "flywheel" and report["command"].startswith("cleanplate bench flywheel")
    assert report["generate"] == {"1": {"generated": 2, "already": 0, "failed": 0},
                                  "2": {"generated": 2, "already": 0, "failed": 0}}
    psnr = report["psnr_in_mask_db"]["per_candidate"]  # candidates in file order: round 1, then round 2
    assert report["candidates"] == len(psnr) == 4
    for rnd, labeled in (("1", psnr[:2]), ("2", psnr[2:3])):
        s = report["scripted_labels"][rnd]
        assert s["decided"] == len(labeled) and s["yes"] == sum(v >= 10 for v in labeled)
        assert s["yes"] + s["no"] == s["decided"]
    d = report["discriminator"]
    assert d["steps"] == 2 and d["human_labels_in_train"] == 2
    assert d["train_items"] == 2 * d["human_repeat"] + d["synthetic_labels_in_train"]
    for key in ("round1_new_gate", "round2_new_gate", "round2_default_gate"):
        assert report["autolabel"][key]["candidates"] == 2
    md = out.with_suffix(".md").read_text()
    assert md in r.out and "| label round 1 (script) | 2 labeled:" in md
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_memory_harness_end_to_end(tmp_path) -> None:
    """`bench memory` at toy sizes: a real server, a burst, a soak and a batch run; every answer counted,
    RSS sampled, the report, markdown and plot written."""
    from cleanplate.benchmarks import memory
    from cleanplate.benchmarks.common import write_report

    report = memory.run_memory(megapixels=0.3, burst=3, soak_clients=1, soak_minutes=0.1, soak_from_minute=0.02,
                               settle_s=1, idle_s=1, batch_items=2, batch_concurrency=2, batch_budget_mib=64)
    g = report["gateway"]
    assert g["burst"]["final_status"] == {"200": 3} and g["burst"]["5xx"] == 0
    assert g["budget_mib"] == 1024 and g["burst_peak_rss_mib"] >= g["rss_before_mib"] > 100
    assert g["soak"]["lost"] == 0 and set(g["soak"]["by_status"]) == {"200"}
    assert report["batch"]["ok"] == 2 and report["batch"]["exit_code"] == 0 and report["batch"]["peak_rss_mib"] > 100
    assert report["request"]["estimated_cost_mib"] > 0
    markdown = memory.to_markdown(report, "cleanplate bench memory ...")
    assert "peak RSS, 3 uploads at once" in markdown and "batch: 2 photos" in markdown
    paths = write_report(tmp_path / "memory", report, markdown) + memory.plot(report, tmp_path / "memory")
    assert all(p.stat().st_size > 0 for p in paths) and len(paths) == 3


def test_detect_void_pixels_are_the_overlay_pixels_nobody_can_see() -> None:
    """A white glyph's pixels over white are void (the overlay changed them by nothing); over a dark ground they
    count; pixels outside the GT mask are never void."""
    from cleanplate.benchmarks.detect import INVISIBLE_LEVELS, void_pixels

    gt_photo = np.zeros((8, 8, 3), np.uint8)
    gt_photo[:, :4] = 255  # white left half, black right half
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True  # a glyph across both halves
    source = gt_photo.copy()
    source[mask] = 255 - (INVISIBLE_LEVELS - 1)  # near-white overlay
    void = void_pixels(source, gt_photo, mask)
    assert void[2:6, 2:4].all() and not void[2:6, 4:6].any() and not void[~mask].any()


# -- detect: the end-to-end section ---------------------------------------------------------------------------
def test_detect_end_to_end_scores_auto_masks_against_gt_mask_removals(gated_bundle: Path, tmp_path: Path) -> None:
    """An auto mask equal to the GT mask removes exactly as the GT mask does (gap 0 dB); one that found nothing
    scores as leaving the photo as it is; the report says both."""
    from cleanplate.benchmarks import detect
    from cleanplate.metrics import psnr
    from cleanplate.training.detector import read_items
    from cleanplate.training.detector_data import DetectorSynthConfig, synth_detector_dataset

    meta = synth_detector_dataset(tmp_path / "dev", 2, seed=3, progress=False, cfg=DetectorSynthConfig(
        size=64, photo_fraction=1.0, clean_fraction=0.0, scene_fraction=0.0))
    items = read_items(meta)
    gt_masks = [np.asarray(Image.open(e["mask"])) > 127 for e in items]
    summary, rows = detect.end_to_end([(items[0], gt_masks[0]), (items[1], np.zeros_like(gt_masks[1]))],
                                      bundle=gated_bundle)
    same, empty = rows
    assert same["psnr_mask_db"]["auto_mask"] == same["psnr_mask_db"]["gt_mask"] and not same["auto_empty"]
    src, gt = (np.asarray(Image.open(items[1][k]).convert("RGB")) for k in ("source", "GT"))
    assert empty["auto_empty"] and empty["psnr_mask_db"]["auto_mask"] == empty["psnr_mask_db"]["identity"] == psnr(
        src, gt, gt_masks[1])
    assert summary["n"] == 2 and summary["nothing_found_rate"] == 0.5 and summary["n_found"] == 1
    assert summary["gap_db_when_found"] == 0.0
    assert summary["gap_db"] == pytest.approx(
        (empty["psnr_mask_db"]["gt_mask"] - empty["psnr_mask_db"]["identity"]) / 2)
    text = "\n".join(detect._e2e_markdown(summary))
    assert f"**{summary['gap_db']:.2f} dB**" in text and "found nothing on 50.0% of the items" in text
