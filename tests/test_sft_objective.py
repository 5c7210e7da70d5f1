"""The removal objective: the masked-source fills, the residual decode, the SFT loss terms, the serving crop
window and the evaluation hook that keeps the best bundle."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cleanplate import compositing, imaging
from cleanplate.bundle import BundleConfig, load_bundle, read_config
from cleanplate.masked_source import masked_source
from cleanplate.metrics import psnr
from cleanplate.pipeline import RemovalPipeline
from cleanplate.remover import RemovalRequest, prepare, remove
from cleanplate.sampling import lcm_schedule
from cleanplate.training.common import TripletDataset, read_meta
from cleanplate.training.sft import (
    SFTConfig,
    evaluate_removals,
    mask_cells,
    sample_timesteps,
    sft_loss,
    snr_weights,
    train_sft,
)


def _crops(seed: int = 0, b: int = 2, r: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8)
    masks = np.zeros((b, r, r), bool)
    masks[:, 8:20, 4:28] = True
    return images, masks


def test_zero_fill_is_rorem_masked_source() -> None:
    images, masks = _crops()
    out = masked_source(images, masks, "zero")
    expected = (images.astype(np.float32) / 127.5 - 1) * (1 - masks[..., None])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(("fill", "flag"), [("telea", cv2.INPAINT_TELEA), ("ns", cv2.INPAINT_NS)])
def test_classical_fill_is_opencv_inpaint_and_keeps_the_rest(fill: str, flag: int) -> None:
    images, masks = _crops()
    out = masked_source(images, masks, fill)
    for img, m, o in zip(images, masks, out, strict=False):
        bgr = cv2.inpaint(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), m.astype(np.uint8) * 255, 3, flag)
        np.testing.assert_array_equal(np.round((o + 1) * 127.5).astype(np.uint8), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        np.testing.assert_array_equal(o[~m], img[~m].astype(np.float32) / 127.5 - 1)
    with pytest.raises(ValueError, match="fill"):
        masked_source(images, masks, "lama")
    with pytest.raises(ValueError, match="uint8"):
        masked_source(images.astype(np.float32), masks, "zero")


def _pipe(tiny_bundle: Path, **update) -> RemovalPipeline:
    pipe = RemovalPipeline.from_bundle(tiny_bundle)
    pipe.config = pipe.config.model_copy(update=update)
    return pipe


def _batch(r: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = _crops(3, 2, r)
    source = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return source, torch.from_numpy(masks)[:, None].float()


def test_residual_decode_returns_the_prefill_for_a_zero_correction(tiny_bundle: Path, monkeypatch) -> None:
    """An x0-model that predicts the conditioning latent itself (no correction) gives back the Telea prefill
    exactly with decode_residual, and only its VAE reconstruction without."""
    source, mask = _batch()
    sched = {**read_config(tiny_bundle).scheduler, "prediction_type": "sample"}
    for residual in (True, False):
        pipe = _pipe(tiny_bundle, scheduler=sched, masked_source="telea", decode_residual=residual)
        monkeypatch.setattr(pipe, "unet_forward", lambda z, t, m, cond: cond)
        out = pipe(source, mask, seeds=[0, 1], steps=4)
        prefill = pipe.masked_image(source, mask)
        recon = pipe.decode(pipe.encode(prefill))
        if residual:
            torch.testing.assert_close(out, prefill.clamp(-1, 1), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(out, recon, atol=1e-5, rtol=0)
            assert (out - prefill).abs().max() > 0.05  # the random VAE does not reconstruct


def test_sft_loss_weights_the_masked_cells() -> None:
    b, c, h = 2, 4, 8
    cells = torch.zeros(b, 1, h, h)
    cells[:, :, :2] = 1  # 16 of 64 cells masked
    target = torch.zeros(b, c, h, h)
    inside = cells.expand(b, c, h, h).clone()  # error 1 in the masked cells only
    ones = torch.ones(b)
    n_in, n_out = 16, 48
    for w in (1.0, 4.0):
        loss_in = sft_loss(inside, target, cells, w, ones)
        loss_out = sft_loss(1 - inside, target, cells, w, ones)
        torch.testing.assert_close(loss_in, torch.full((b,), w * n_in / (w * n_in + n_out)))
        torch.testing.assert_close(loss_out, torch.full((b,), n_out / (w * n_in + n_out)))
    rand = torch.randn(b, c, h, h)
    torch.testing.assert_close(sft_loss(rand, target, cells, 1.0, ones), (rand**2).mean((1, 2, 3)))
    torch.testing.assert_close(sft_loss(rand, target, cells, 1.0, torch.tensor([0.5, 2.0])),
                               (rand**2).mean((1, 2, 3)) * torch.tensor([0.5, 2.0]))


def test_mask_cells_marks_any_masked_pixel() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 5, 6] = 1  # one pixel, not on the nearest-neighbour grid
    cells = mask_cells(mask, 4)
    assert cells.shape == (1, 1, 2, 2) and cells.sum() == 1 and cells[0, 0, 1, 1] == 1


def test_min_snr_weights() -> None:
    a = torch.tensor([0.9, 0.5, 0.01])  # SNR 9, 1, ~0.0101
    snr = a / (1 - a)
    clipped = snr.clamp(max=5.0)
    torch.testing.assert_close(snr_weights(a, 5.0, "epsilon"), clipped / snr)
    torch.testing.assert_close(snr_weights(a, 5.0, "sample"), clipped)
    torch.testing.assert_close(snr_weights(a, 5.0, "v_prediction"), clipped / (snr + 1))
    torch.testing.assert_close(snr_weights(a, None, "sample"), torch.ones(3))


def test_sampler_timesteps_stay_near_the_ones_served() -> None:
    cfg = SFTConfig(meta=[Path("x")], out=Path("y"), timesteps="sampler", timestep_jitter=5)
    bundle_cfg = BundleConfig(steps=4)
    visited = np.array([s.timestep for s in lcm_schedule(bundle_cfg.scheduler, 4)])
    t = sample_timesteps(cfg, bundle_cfg, 4000, 1000).numpy()
    assert np.abs(t[:, None] - visited[None]).min(1).max() <= 5
    assert len({int(np.abs(x - visited).argmin()) for x in t}) == 4  # every served timestep is trained
    uniform = sample_timesteps(cfg.model_copy(update={"timesteps": "uniform"}), bundle_cfg, 4000, 1000).numpy()
    assert uniform.min() < 50 and uniform.max() > 950


def test_serving_crop_window_is_what_serving_cuts(synth_data: Path) -> None:
    items = read_meta([synth_data])[:3]
    ds = TripletDataset(items, 32, (2, 2), flip=False, crop_window="serving")
    for i, item in enumerate(items):
        got = ds[i]
        req = RemovalRequest(imaging.decode_image(item.source), imaging.decode_mask(item.mask))
        prep = prepare(req, 32, 2)
        np.testing.assert_array_equal(np.round((got["source"].permute(1, 2, 0).numpy() + 1) * 127.5), prep.crop)
        np.testing.assert_array_equal(got["mask"][0].numpy() > 0.5, prep.crop_mask)


def test_evaluate_removals_is_the_production_path(tiny_bundle: Path, synth_data: Path) -> None:
    items = read_meta([synth_data])[:2]
    pipe = RemovalPipeline.from_bundle(tiny_bundle)
    result = evaluate_removals(pipe, items)
    expected = []
    for item in items:
        out = remove(pipe, imaging.decode_image(item.source), imaging.decode_mask(item.mask), seed=0)
        expected.append(psnr(imaging.to_rgb8(out.pixels), imaging.decode_image(item.gt).rgb,
                             imaging.decode_mask(item.mask)))
    assert result["n"] == 2
    assert result["psnr_mask_db"] == pytest.approx(np.mean(expected))


def test_sft_keeps_the_best_evaluated_bundle(tiny_bundle: Path, synth_data: Path, tmp_path: Path) -> None:
    """x0 + Telea + residual SFT with a latent cache and evaluation every step: out is the best-scoring
    step's bundle, its config declares what was trained, and a rerun resumes without retraining."""
    cfg = SFTConfig(meta=[synth_data], out=tmp_path / "sft", init_bundle=tiny_bundle, resolution=64, batch_size=4,
                    max_steps=3, lr=5e-3, warmup_steps=1, checkpoint_every=1, log_every=1, dilate_range=(0, 2),
                    crop_window="serving", prediction_type="sample", masked_source="telea", decode_residual=True,
                    mask_weight=3.0, timesteps="sampler", latent_cache=True, eval_meta=[synth_data], eval_every=1,
                    eval_items=3)
    result = train_sft(cfg)
    evals = result["evals"]
    assert [e["step"] for e in evals] == [1, 2, 3]
    best = max(evals, key=lambda e: e["psnr_mask_db"])
    config = read_config(cfg.out)
    assert config.scheduler["prediction_type"] == "sample" and config.masked_source == "telea"
    assert config.decode_residual and config.provenance["sft"]["steps"] == best["step"]
    assert json.loads((tmp_path / "sft.work" / "best.json").read_text())["psnr_mask_db"] == best["psnr_mask_db"]
    assert list((tmp_path / "sft.work").glob("latents_serving_telea_*.safetensors"))
    again = evaluate_removals(RemovalPipeline.from_bundle(load_bundle(cfg.out)), read_meta([synth_data])[:3])
    assert again["psnr_mask_db"] == pytest.approx(best["psnr_mask_db"], abs=1e-6)
    assert train_sft(cfg)["losses"] == []  # resumed at max_steps: nothing left to train


def test_residual_scale_damps_the_correction(tiny_bundle: Path) -> None:
    """residual_scale s gives x̃_s + s·(D(ẑ) − D(E(x̃_s))): the correction at s is s times the one at 1."""
    source, mask = _batch()
    sched = {**read_config(tiny_bundle).scheduler, "prediction_type": "sample"}
    outs = {}
    for s in (1.0, 0.5, 0.0):
        pipe = _pipe(tiny_bundle, scheduler=sched, masked_source="telea", decode_residual=True, residual_scale=s)
        outs[s] = pipe(source, mask, seeds=[0, 1], steps=2)
    prefill = pipe.masked_image(source, mask)
    inside = (outs[1.0].abs() < 0.99) & (prefill.abs() < 0.99)  # where no clamp acted
    torch.testing.assert_close((outs[0.5] - prefill)[inside], 0.5 * (outs[1.0] - prefill)[inside], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0.0], prefill, atol=1e-6, rtol=0)


def test_tune_writes_the_best_dilation_and_scale(tiny_bundle: Path, synth_data: Path, tmp_path: Path) -> None:
    from cleanplate.bundle import BUNDLE_JSON
    from cleanplate.errors import InputError
    from cleanplate.training.sft import tune_bundle

    bundle = tmp_path / "b"
    import shutil

    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(InputError, match="decode_residual"):
        tune_bundle(bundle, [synth_data], dilations=[0], scales=[0.0, 1.0], limit=2)
    config = json.loads((bundle / BUNDLE_JSON).read_text())
    config.update(decode_residual=True, masked_source="telea", scheduler={**config["scheduler"], "prediction_type": "sample"})
    (bundle / BUNDLE_JSON).write_text(json.dumps(config))
    result = tune_bundle(bundle, [synth_data], dilations=[0, 2], scales=[0.0, 1.0], steps=[1, 4], limit=2,
                         say=lambda m: None)
    assert len(result["grid"]) == 8
    best = max(result["grid"], key=lambda r: r["psnr_mask_db"])
    tuned = read_config(bundle)
    assert (tuned.dilate_px, tuned.residual_scale, tuned.steps) == (best["dilate_px"], best["residual_scale"],
                                                                    best["steps"])
    assert tuned.provenance["tune"][-1]["best"] == best
    pipe = RemovalPipeline.from_bundle(bundle)
    assert evaluate_removals(pipe, read_meta([synth_data])[:2])["psnr_mask_db"] == pytest.approx(best["psnr_mask_db"])
    # a second tune keeps the first one's grid; the prefill can be tuned among the classical fills
    second = tune_bundle(bundle, [synth_data], dilations=[best["dilate_px"]], scales=[0.5], fills=["telea", "ns"],
                         limit=2, say=lambda m: None)
    runs = read_config(bundle).provenance["tune"]
    assert [len(r["grid"]) for r in runs] == [8, 2] and read_config(bundle).residual_scale == 0.5
    assert read_config(bundle).masked_source == second["best"]["masked_source"]
    assert {r["masked_source"] for r in second["grid"]} == {"telea", "ns"}
    assert second["grid"][0]["psnr_mask_db"] != second["grid"][1]["psnr_mask_db"]  # the fill is really swapped
    with pytest.raises(InputError, match="masked_source"):
        tune_bundle(bundle, [synth_data], dilations=[0], scales=[0.5], fills=["zero"], limit=2)


def test_paste_back_adds_the_correction_to_a_full_resolution_prefill(photos) -> None:
    """A window larger than the model side gets Telea computed at full resolution plus the upsampled
    correction: a zero correction pastes full-resolution Telea, a 1:1 window pastes the model crop as is."""
    from cleanplate.masked_source import masked_source
    from cleanplate.remover import MAX_PREFILL_UPSCALE, composite

    rgb = np.ascontiguousarray(photos["astronaut"])  # 512²
    image = imaging.DecodedImage(rgb, None, "RGB", None, None, None)
    big = np.zeros(rgb.shape[:2], bool)
    big[100:400, 120:380] = True  # the window is larger than 128, so the crop is shrunk
    req = RemovalRequest(image, big)
    prep = prepare(req, 128, 0)
    assert 128 < prep.box.size <= MAX_PREFILL_UPSCALE * 128
    prefilled_crop = np.round((masked_source(prep.crop[None], prep.crop_mask[None], "telea")[0] + 1) * 127.5)
    out = composite(req, prep, prefilled_crop.astype(np.uint8), "telea")
    window, window_mask = compositing.crop_to_model(rgb, prep.dilated, prep.box, prep.box.size)
    telea_full = np.round((masked_source(window[None], window_mask[None], "telea")[0] + 1) * 127.5).astype(np.uint8)
    y0, x0 = prep.box.y0, prep.box.x0
    inside = big[max(y0, 0):, max(x0, 0):][: telea_full.shape[0], : telea_full.shape[1]]
    np.testing.assert_array_equal(out[max(y0, 0):, max(x0, 0):][: telea_full.shape[0], : telea_full.shape[1]][inside],
                                  telea_full[max(-y0, 0):, max(-x0, 0):][: inside.shape[0], : inside.shape[1]][inside])
    plain = composite(req, prep, prefilled_crop.astype(np.uint8))
    assert np.abs(plain[big].astype(int) - out[big].astype(int)).mean() > 1  # the plain paste is the blurred one
    small = np.zeros(rgb.shape[:2], bool)
    small[200:230, 200:260] = True
    req1 = RemovalRequest(image, small)
    prep1 = prepare(req1, 128, 0)
    assert prep1.box.size == 128
    crop = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    np.testing.assert_array_equal(composite(req1, prep1, crop, "telea"), composite(req1, prep1, crop))
