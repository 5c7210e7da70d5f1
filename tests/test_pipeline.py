"""Tests for cleanplate.pipeline (the 4-step LCM inpainting call) and cleanplate.remover (end to end)."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VAE
from PIL import Image

from cleanplate.bundle import SDXL_INPAINT_UNET_CONFIG, Bundle, BundleConfig, NullConditioning
from cleanplate.errors import InputError
from cleanplate.imaging import DecodedImage, decode_image
from cleanplate.pipeline import RemovalPipeline
from cleanplate.remover import RemovalRequest, remove, remove_batch
from cleanplate.sampling import sampling_noise

R = 64  # tiny bundle resolution (conftest), VAE factor 2 -> 32x32 latents


@pytest.fixture(scope="module")
def pipe(tiny_bundle: Path) -> RemovalPipeline:
    return RemovalPipeline.from_bundle(tiny_bundle)


@contextmanager
def record_calls(module: torch.nn.Module):
    """Record (args, kwargs) of every forward call of ``module``."""
    calls: list[tuple[tuple, dict]] = []
    handle = module.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _inputs(batch: int, seed: int = 0, res: int = R) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(batch, 3, res, res, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, res, res)
    for i in range(batch):  # a different, odd-edged box per item
        mask[i, :, 9 + 3 * i:37 + i, 15:50 - 2 * i] = 1
    return source, mask


# -- the batch call --------------------------------------------------------------------------------------


def test_output_contract(pipe: RemovalPipeline) -> None:
    source, mask = _inputs(2)
    out = pipe(source, mask, seeds=[0, 1])
    assert out.shape == (2, 3, R, R) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    assert out.std() > 1e-3  # not a constant image


def test_seeds(pipe: RemovalPipeline) -> None:
    source, mask = _inputs(1)
    a = pipe(source, mask, seeds=[5])
    assert torch.equal(a, pipe(source, mask, seeds=[5]))
    assert (a - pipe(source, mask, seeds=[6])).abs().max() > 1e-3


def test_batch_independence(pipe: RemovalPipeline) -> None:
    source, mask = _inputs(2, seed=3)
    both = pipe(source, mask, seeds=[11, 12])
    for i, s in enumerate([11, 12]):
        alone = pipe(source[i:i + 1], mask[i:i + 1], seeds=[s])
        torch.testing.assert_close(both[i:i + 1], alone, atol=1e-5, rtol=0)
    # swapping the items swaps the outputs
    swapped = pipe(source.flip(0), mask.flip(0), seeds=[12, 11])
    torch.testing.assert_close(swapped.flip(0), both, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_steps_count_unet_calls(pipe: RemovalPipeline, steps: int) -> None:
    source, mask = _inputs(1)
    with record_calls(pipe.unet) as calls:
        out = pipe(source, mask, seeds=[0], steps=steps)
    assert len(calls) == steps
    assert len({int(c[0][1]) for c in calls}) == steps  # distinct timesteps
    assert torch.isfinite(out).all()


def test_default_steps_is_the_bundles(pipe: RemovalPipeline) -> None:
    source, mask = _inputs(1)
    with record_calls(pipe.unet) as calls:
        pipe(source, mask, seeds=[0])
    assert len(calls) == pipe.config.steps == 4


@pytest.mark.parametrize("steps", [0, 51, -1])
def test_bad_steps(pipe: RemovalPipeline, steps: int) -> None:
    source, mask = _inputs(1)
    with pytest.raises(InputError, match="steps"):
        pipe(source, mask, seeds=[0], steps=steps)


def test_bad_seed_count_and_shapes(pipe: RemovalPipeline) -> None:
    source, mask = _inputs(2)
    with record_calls(pipe.unet) as calls:
        with pytest.raises(InputError, match="seeds"):
            pipe(source, mask, seeds=[0])
        with pytest.raises(InputError, match="seeds"):
            pipe(source, mask, seeds=[0, 1, 2])
        with pytest.raises(InputError):
            pipe(source, mask[:1], seeds=[0, 1])
        with pytest.raises(InputError):
            pipe(source[:, :1], mask, seeds=[0, 1])
    assert calls == []


def test_unet_inputs(pipe: RemovalPipeline) -> None:
    source, mask = _inputs(2, seed=7)
    seeds = [21, 22]
    with record_calls(pipe.unet) as calls:
        pipe(source, mask, seeds=seeds, steps=2)
    assert len(calls) == 2
    args, kwargs = calls[0]
    x = args[0]
    c = pipe.vae.config.latent_channels
    assert x.shape == (2, 2 * c + 1, R // 2, R // 2) == (2, 9, 32, 32)
    # channel C: the mask, nearest-resized (factor 2: every other pixel from the top-left)
    assert torch.equal(x[:, c:c + 1], mask[:, :, ::2, ::2])
    # channels C+1..2C: the latent of the masked source x_s * (1 - m)
    masked = pipe.encode(source * (1 - mask))
    torch.testing.assert_close(x[:, c + 1:], masked, atol=1e-6, rtol=0)
    assert not torch.allclose(x[:, c + 1:], pipe.encode(source), atol=1e-3)
    # channels 0..C-1 at the first step: item i's initial noise, sampling_noise(seeds[i])[0] (numpy PCG64)
    for i, s in enumerate(seeds):
        noise = torch.from_numpy(sampling_noise(s, 2, (c, R // 2, R // 2))[0])
        torch.testing.assert_close(x[i, :c], noise, atol=1e-6, rtol=0)
    # text conditioning: the bundle's constant empty-prompt embeddings, expanded over the batch
    cond = pipe.conditioning
    assert torch.equal(kwargs["encoder_hidden_states"], cond.prompt_embeds.expand(2, -1, -1))
    added = kwargs["added_cond_kwargs"]
    assert torch.equal(added["text_embeds"], cond.pooled_prompt_embeds.expand(2, -1))
    assert added["time_ids"].tolist() == [[R, R, 0, 0, R, R]] * 2
    # the second step's mask/masked-source channels are the same
    assert torch.equal(calls[1][0][0][:, c:], x[:, c:])




def test_sdxl_inpaint_unet_config_and_conditioning_shapes() -> None:
    """The SDXL-inpainting UNet layout and conditioning sizes (2048 / 1280 + 6x256 = 2816), at toy width."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**SDXL_INPAINT_UNET_CONFIG, "block_out_channels": [40, 80, 160],
                                             "layers_per_block": 1, "transformer_layers_per_block": 1,
                                             "norm_num_groups": 8, "sample_size": 16})
    cond = NullConditioning(torch.randn(1, 77, 2048), torch.randn(1, 1280))
    bundle = Bundle(None, BundleConfig(resolution=64), unet.eval(), AutoencoderKL(**TINY_VAE).eval(), cond)
    sdxl = RemovalPipeline.from_bundle(bundle)
    source, mask = _inputs(1)  # 64 px (the smallest bundle resolution) -> 32x32 latents -> 8x8 at the bottom
    with record_calls(sdxl.unet) as calls:
        out = sdxl(source, mask, seeds=[0], steps=1)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    (x, _), kwargs = calls[0][0][:2], calls[0][1]
    assert x.shape == (1, 9, 32, 32)
    assert kwargs["encoder_hidden_states"].shape == (1, 77, 2048)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (1, 1280)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


# -- devices and dtypes -----------------------------------------------------------------------------------


def test_bf16_on_cpu(tiny_bundle: Path, pipe: RemovalPipeline) -> None:
    bf16 = RemovalPipeline.from_bundle(tiny_bundle, dtype="bf16")
    assert bf16.unet.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    assert pipe.unet.dtype == torch.float32  # loading by path leaves other pipelines alone
    source, mask = _inputs(2)
    out = bf16(source, mask, seeds=[0, 1])
    ref = pipe(source, mask, seeds=[0, 1])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    assert (out - ref).abs().mean() < 0.1
    assert not torch.equal(out, ref)  # it really ran in bf16


def test_fp16_on_cpu_refused(tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match="fp16") as info:
        RemovalPipeline.from_bundle(tiny_bundle, device="cpu", dtype="fp16")
    assert info.value.code == "bad_option"
    with pytest.raises(InputError):
        RemovalPipeline.from_bundle(tiny_bundle, dtype="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_refused(tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match="cuda") as info:
        RemovalPipeline.from_bundle(tiny_bundle, device="cuda")
    assert info.value.code == "bad_option"
    assert RemovalPipeline.from_bundle(tiny_bundle, device="auto").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda(tiny_bundle: Path, pipe: RemovalPipeline) -> None:
    fp16 = RemovalPipeline.from_bundle(tiny_bundle, device="cuda", dtype="fp16")
    source, mask = _inputs(2)
    out = fp16(source, mask, seeds=[0, 1])
    assert out.device.type == "cuda" and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out.cpu() - pipe(source, mask, seeds=[0, 1])).abs().mean() < 0.1


# -- remover: one image end to end ---------------------------------------------------------------------------


def _decoded(pixels: np.ndarray) -> DecodedImage:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return decode_image(buf.getvalue())


def _box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _check_result(image: DecodedImage, mask: np.ndarray, result) -> None:
    native = image.pixels
    assert result.pixels.shape == native.shape and result.pixels.dtype == native.dtype
    assert result.dilated.shape == mask.shape and result.dilated.dtype == bool
    assert (result.dilated | ~mask).all()  # dilated covers the mask
    outside = ~result.dilated
    assert np.array_equal(result.pixels[outside], native[outside])
    changed = (result.pixels != native).any(axis=-1)[mask]
    assert changed.mean() > 0.5, changed.mean()
    ys, xs = np.nonzero(result.dilated)
    box = result.box
    assert box.x0 <= xs.min() and xs.max() < box.x1 and box.y0 <= ys.min() and ys.max() < box.y1
    assert set(result.timings_ms) == {"crop", "model", "composite"}


@pytest.mark.parametrize("name,box", [("astronaut", (180, 230, 300, 370)), ("coffee", (100, 160, 200, 290)),
                                      ("camera", (60, 120, 250, 300))])
def test_remove_on_photos(pipe: RemovalPipeline, photos: dict[str, np.ndarray], name: str, box) -> None:
    image = _decoded(photos[name])
    assert image.pixels.shape[:2] == photos[name].shape[:2]
    if name == "camera":
        assert image.pixels.shape[2] == 1
    mask = _box_mask(image.height, image.width, *box)
    result = remove(pipe, image, mask, seed=1)
    _check_result(image, mask, result)
    assert np.array_equal(remove(pipe, image, mask, seed=1).pixels, result.pixels)


def test_remove_mask_in_the_corner(pipe: RemovalPipeline, photos: dict[str, np.ndarray]) -> None:
    image = _decoded(photos["coffee"])  # 400x600
    h, w = image.height, image.width
    for box in [(0, 25, 0, 30), (h - 20, h, w - 40, w)]:
        mask = _box_mask(h, w, *box)
        _check_result(image, mask, remove(pipe, image, mask, seed=2, dilate_px=3))


def test_big_image_small_mask_runs_at_model_resolution(pipe: RemovalPipeline, photos: dict[str, np.ndarray]
                                                       ) -> None:
    big = np.tile(photos["chelsea"], (5, 5, 1))[:1500, :2000]
    image = _decoded(np.ascontiguousarray(big))
    assert image.size == (2000, 1500)
    mask = _box_mask(1500, 2000, 700, 740, 1000, 1030)
    with record_calls(pipe.unet) as unet_calls, record_calls(pipe.vae.encoder) as enc_calls, \
            record_calls(pipe.vae.decoder) as dec_calls:
        result = remove(pipe, image, mask, seed=0)
    _check_result(image, mask, result)
    assert len(unet_calls) == 4
    assert {tuple(c[0][0].shape) for c in unet_calls} == {(1, 9, R // 2, R // 2)}
    assert [tuple(c[0][0].shape) for c in enc_calls] == [(1, 3, R, R)]
    assert [tuple(c[0][0].shape[-2:]) for c in dec_calls] == [(R // 2, R // 2)]
    assert result.box.size < 200  # a local window, not the whole photo


def test_remove_batch_equals_single_removes(pipe: RemovalPipeline, photos: dict[str, np.ndarray]) -> None:
    requests = [
        RemovalRequest(_decoded(photos["astronaut"]), _box_mask(512, 512, 200, 260, 100, 150), seed=3),
        RemovalRequest(_decoded(photos["coffee"]), _box_mask(400, 600, 50, 90, 400, 470), seed=4,
                       dilate_px=5),
        RemovalRequest(_decoded(photos["camera"]), _box_mask(512, 512, 300, 330, 300, 380), seed=5),
    ]
    with record_calls(pipe.unet) as calls:
        batch = remove_batch(pipe, requests, max_batch=2)
    assert [c[0][0].shape[0] for c in calls] == [2] * 4 + [1] * 4
    for req, got in zip(requests, batch, strict=False):
        alone = remove(pipe, req.image, req.mask, dilate_px=req.dilate_px, seed=req.seed)
        assert got.box == alone.box
        assert np.array_equal(got.dilated, alone.dilated)
        # batched float results agree to ~1e-6; allow a rare one-level rounding flip after uint8 quantisation
        diff = np.abs(got.pixels.astype(int) - alone.pixels.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        _check_result(req.image, req.mask, got)


def test_remove_batch_groups_by_steps(pipe: RemovalPipeline, photos: dict[str, np.ndarray]) -> None:
    image = _decoded(photos["coffee"])
    mask = _box_mask(400, 600, 100, 140, 100, 160)
    requests = [RemovalRequest(image, mask, seed=0, steps=2), RemovalRequest(image, mask, seed=1, steps=1),
                RemovalRequest(image, mask, seed=2, steps=2)]
    with record_calls(pipe.unet) as calls:
        results = remove_batch(pipe, requests)
    assert sorted(c[0][0].shape[0] for c in calls) == [1, 2, 2]
    assert len(results) == 3


def test_remove_input_errors(pipe: RemovalPipeline, photos: dict[str, np.ndarray]) -> None:
    image = _decoded(photos["coffee"])
    h, w = image.height, image.width
    cases = {
        "empty_mask": np.zeros((h, w), bool),
        "full_mask": ~_box_mask(h, w, 200, 201, 300, 301),  # all but one pixel: dilation covers everything
        "size_mismatch": np.ones((w, h), bool),
    }
    with record_calls(pipe.unet) as calls:
        for code, mask in cases.items():
            with pytest.raises(InputError) as info:
                remove(pipe, image, mask, dilate_px=2)
            assert info.value.code == code, code
        # one bad request fails the whole batch before any model work
        good = RemovalRequest(image, _box_mask(h, w, 10, 20, 10, 20))
        with pytest.raises(InputError) as info:
            remove_batch(pipe, [good, RemovalRequest(image, cases["empty_mask"])])
        assert info.value.code == "empty_mask"
    assert calls == []
    # the same almost-full mask without dilation leaves one pixel to fill from: accepted
    assert remove(pipe, image, cases["full_mask"], dilate_px=0).pixels.shape == image.pixels.shape
