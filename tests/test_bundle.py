"""Tests for cleanplate.bundle: save/load, clear errors, LCM-LoRA fusing, the RORem converter and its CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET, TINY_VAE

from cleanplate.bundle import (
    BUNDLE_JSON,
    LORA_WEIGHTS,
    NULL_CONDITIONING,
    SDXL_LCM_SCHEDULER,
    BundleConfig,
    NullConditioning,
    from_rorem,
    load_bundle,
    read_config,
    save_bundle,
)
from cleanplate.errors import BundleError

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def _tiny_modules(seed: int = 0, **unet_overrides):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **unet_overrides}), AutoencoderKL(**TINY_VAE)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _unet_inputs(unet, seed: int = 123, res: int = 8):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(1, cfg.in_channels, res, res, generator=g)
    hidden = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled_dim, generator=g),
             "time_ids": NullConditioning.add_time_ids(res * 2)}
    return sample, hidden, added


@torch.no_grad()
def _unet_out(unet, inputs) -> torch.Tensor:
    sample, hidden, added = inputs
    return unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


def _lora_layers(module: torch.nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer) or "lora" in n.lower()]


def _make_lora_dir(base_unet, out: Path, seed: int = 7):
    """Attach a non-zero peft LoRA to a copy of ``base_unet`` and save it in diffusers format.

    Returns the UNet carrying the (un-fused) adapter.
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(base_unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    # peft's "gaussian" init draws A but zeroes B (the LoRA starts as a no-op): draw B too.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n_b = 0
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                n_b += 1
    assert n_b > 0
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        str(out), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    assert (out / LORA_WEIGHTS).exists()
    return unet.eval()


# -- save / load ----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    unet, vae = _tiny_modules(seed=3)
    cond = NullConditioning(torch.randn(1, 77, 16), torch.randn(1, 16))
    cfg = BundleConfig(name="roundtrip", resolution=96, steps=6, dilate_px=5,
                       provenance={"from": "test"}, extra_field="kept")
    out = save_bundle(tmp_path / "b", config=cfg, unet=unet, vae=vae, conditioning=cond)
    assert out == tmp_path / "b"
    b = load_bundle(out)
    assert b.path == out
    assert (b.config.name, b.config.resolution, b.config.steps, b.config.dilate_px, b.config.strength) == \
        ("roundtrip", 96, 6, 5, 1.0)
    assert b.config.provenance == {"from": "test"}
    assert b.config.model_extra == {"extra_field": "kept"}
    assert b.config.scheduler == SDXL_LCM_SCHEDULER
    assert b.config.lcm_lora == "none"
    _assert_same_weights(b.unet, unet)
    _assert_same_weights(b.vae, vae)
    assert torch.equal(b.conditioning.prompt_embeds, cond.prompt_embeds)
    assert torch.equal(b.conditioning.pooled_prompt_embeds, cond.pooled_prompt_embeds)
    assert b.unet.dtype == torch.float32 and not b.unet.training
    assert not any(p.requires_grad for p in b.unet.parameters())


def test_save_replaces_existing_bundle(tmp_path: Path) -> None:
    unet, vae = _tiny_modules(seed=1)
    cond = NullConditioning(torch.zeros(1, 77, 16), torch.zeros(1, 16))
    out = tmp_path / "b"
    save_bundle(out, config=BundleConfig(name="first"), unet=unet, vae=vae, conditioning=cond)
    (out / "stale.txt").write_text("x")
    # lcm_lora "separate" without a lora_dir must not be written as "separate" (no lcm_lora/ is written).
    save_bundle(out, config=BundleConfig(name="second", lcm_lora="separate"), unet=unet, vae=vae,
                conditioning=cond)
    assert read_config(out).name == "second"
    assert read_config(out).lcm_lora == "none"
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    load_bundle(out)


# -- clear errors ---------------------------------------------------------------------------------------


def _break(root: Path, what: str) -> str:
    """Damage a bundle copy; returns the text the error message must contain."""
    if what == "bundle.json":
        (root / BUNDLE_JSON).unlink()
        return BUNDLE_JSON
    if what == "unet":
        (root / "unet" / "config.json").unlink()
        return "unet/config.json"
    if what == "vae":
        (root / "vae" / "config.json").unlink()
        return "vae/config.json"
    if what == "null":
        (root / NULL_CONDITIONING).unlink()
        return NULL_CONDITIONING
    if what == "lora":
        cfg = json.loads((root / BUNDLE_JSON).read_text())
        cfg["lcm_lora"] = "separate"
        (root / BUNDLE_JSON).write_text(json.dumps(cfg))
        return f"lcm_lora/{LORA_WEIGHTS}"
    if what == "resolution":
        cfg = json.loads((root / BUNDLE_JSON).read_text())
        cfg["resolution"] = -3
        (root / BUNDLE_JSON).write_text(json.dumps(cfg))
        return "resolution"
    if what == "version":
        cfg = json.loads((root / BUNDLE_JSON).read_text())
        cfg["format_version"] = 99
        (root / BUNDLE_JSON).write_text(json.dumps(cfg))
        return "format_version 99"
    if what == "null_tensors":
        from safetensors.torch import save_file

        save_file({"prompt_embeds": torch.zeros(1, 77, 16)}, str(root / NULL_CONDITIONING))
        return "pooled_prompt_embeds"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["bundle.json", "unet", "vae", "null", "lora", "resolution", "version",
                                  "null_tensors"])
def test_broken_bundle_errors_name_the_problem(tiny_bundle: Path, tmp_path: Path, what: str) -> None:
    root = tmp_path / "broken"
    shutil.copytree(tiny_bundle, root)
    load_bundle(root)  # the intact copy loads
    expected = _break(root, what)
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    assert expected in str(info.value)
    assert info.value.code == "bad_bundle"
    if what == "resolution":
        assert BUNDLE_JSON in str(info.value)


def test_missing_bundle_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


def test_in_channels_mismatch(tmp_path: Path) -> None:
    unet, vae = _tiny_modules(in_channels=5)
    cond = NullConditioning(torch.zeros(1, 77, 16), torch.zeros(1, 16))
    out = save_bundle(tmp_path / "b", config=BundleConfig(), unet=unet, vae=vae, conditioning=cond)
    with pytest.raises(BundleError) as info:
        load_bundle(out)
    msg = str(info.value)
    assert "5 channels" in msg and "needs 9" in msg


# -- LCM-LoRA -------------------------------------------------------------------------------------------


def test_lora_is_fused_on_load(tmp_path: Path) -> None:
    base, vae = _tiny_modules(seed=11)
    lora_unet = _make_lora_dir(base, tmp_path / "lora")
    cond = NullConditioning(torch.randn(1, 77, 16), torch.randn(1, 16))
    out = save_bundle(tmp_path / "b", config=BundleConfig(), unet=base, vae=vae, conditioning=cond,
                      lora_dir=tmp_path / "lora")
    assert read_config(out).lcm_lora == "separate"
    assert (out / "lcm_lora" / LORA_WEIGHTS).exists()

    inputs = _unet_inputs(base)
    base_out, lora_out = _unet_out(base.eval(), inputs), _unet_out(lora_unet, inputs)
    assert (base_out - lora_out).abs().max() > 1e-2  # the adapter does something

    fused = load_bundle(out).unet
    assert _lora_layers(fused) == []
    fused_out = _unet_out(fused, inputs)
    torch.testing.assert_close(fused_out, lora_out, atol=1e-4, rtol=0)
    assert (fused_out - base_out).abs().max() > 1e-2

    # fuse_lora=False keeps the adapter attached, with the same output.
    unfused = load_bundle(out, fuse_lora=False).unet
    assert _lora_layers(unfused)
    torch.testing.assert_close(_unet_out(unfused, inputs), lora_out, atol=1e-4, rtol=0)


# -- RORem converter ------------------------------------------------------------------------------------

# SDXL's scheduler/scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0 and the inpainting model).
SDXL_EULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
BASE_UNET = {**TINY_UNET, "cross_attention_dim": 32 + 64, "projection_class_embeddings_input_dim": 6 * 4 + 64}
VOCAB = ["!", "a", "b", "c", "o", "t", "a</w>", "b</w>", "c</w>", "o</w>", "t</w>", "ca", "cat</w>",
         "<|startoftext|>", "<|endoftext|>"]


def _write_base(root: Path) -> Path:
    """A tiny diffusers SDXL-inpainting directory (random weights, no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {t: i for i, t in enumerate(VOCAB)}
    raw = root / "raw_tok"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=77,
                      pad_token=pad).save_pretrained(root / sub)
    ids = dict(vocab_size=len(VOCAB), max_position_embeddings=77, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=37, bos_token_id=vocab["<|startoftext|>"],
               eos_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, pad_token_id=vocab["<|endoftext|>"], **ids)).save_pretrained(
        root / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, projection_dim=64, pad_token_id=0, **ids)
                                ).save_pretrained(root / "text_encoder_2")
    UNet2DConditionModel(**BASE_UNET).save_pretrained(root / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_EULER))
    shutil.rmtree(raw)
    return root


@pytest.fixture(scope="module")
def rorem(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from diffusers import UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("rorem")
    base = _write_base(tmp / "sdxl-inpainting")
    torch.manual_seed(99)
    rorem_unet = UNet2DConditionModel(**BASE_UNET)
    rorem_unet.save_pretrained(tmp / "RORem" / "unet")  # given as the parent dir below
    lora_unet = _make_lora_dir(rorem_unet, tmp / "lcm-lora")
    return {"base": base, "unet": tmp / "RORem", "lora": tmp / "lcm-lora", "tmp": tmp, "lora_unet": lora_unet}


@pytest.fixture(scope="module")
def converted(rorem: dict[str, Path]) -> Path:
    return from_rorem(rorem["base"], rorem["unet"], rorem["tmp"] / "bundle", resolution=64)


@torch.no_grad()
def _diffusers_null_conditioning(base: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    pipe = StableDiffusionXLInpaintPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(base / "tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(base / "unet"),
        scheduler=EulerDiscreteScheduler.from_pretrained(base / "scheduler"),
    )
    embeds, _, pooled, _ = pipe.encode_prompt("", device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


def test_from_rorem_bundle(rorem: dict, converted: Path) -> None:
    from diffusers import UNet2DConditionModel

    from cleanplate.pipeline import RemovalPipeline

    b = load_bundle(converted)
    assert b.config.resolution == 64 and b.config.lcm_lora == "none"

    # Null conditioning == diffusers' own SDXL encode_prompt("") on the same parts.
    embeds, pooled = _diffusers_null_conditioning(rorem["base"])
    assert b.conditioning.prompt_embeds.shape == (1, 77, 96)
    assert b.conditioning.pooled_prompt_embeds.shape == (1, 64)
    torch.testing.assert_close(b.conditioning.prompt_embeds, embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.conditioning.pooled_prompt_embeds, pooled, atol=1e-5, rtol=0)

    # The UNet is RORem's, not the base's.
    _assert_same_weights(b.unet, UNet2DConditionModel.from_pretrained(rorem["unet"] / "unet"))
    base_unet = UNet2DConditionModel.from_pretrained(rorem["base"] / "unet")
    assert not torch.equal(b.unet.conv_in.weight, base_unet.conv_in.weight)

    # The scheduler config comes from the base (set_alpha_to_one False is SDXL's, not the LCM default).
    sched = b.config.scheduler
    assert sched["set_alpha_to_one"] is False
    for key in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing", "steps_offset",
                "num_train_timesteps", "prediction_type"):
        assert sched[key] == SDXL_EULER[key], key
    assert not any(k.startswith("_") for k in sched)
    assert b.config.provenance["converted_from"]["unet"] == str(rorem["unet"] / "unet")

    pipe = RemovalPipeline.from_bundle(converted)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 20:44] = 1
    out = pipe(source, mask, seeds=[0], steps=4)
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1


def test_from_rorem_cli_with_lora(rorem: dict, converted: Path) -> None:
    from typer.testing import CliRunner

    from cleanplate.cli import app

    out = rorem["tmp"] / "bundle_lora"
    result = CliRunner().invoke(app, ["bundle", "from-rorem", "--base", str(rorem["base"]),
                                      "--unet", str(rorem["unet"] / "unet"), "--out", str(out),
                                      "--lora", str(rorem["lora"]), "--resolution", "64"])
    assert result.exit_code == 0, result.output
    assert (out / "lcm_lora" / LORA_WEIGHTS).exists()
    b = load_bundle(out)
    assert b.config.lcm_lora == "separate" and b.config.resolution == 64
    assert _lora_layers(b.unet) == []
    plain = load_bundle(converted)
    torch.testing.assert_close(b.conditioning.prompt_embeds, plain.conditioning.prompt_embeds, atol=0, rtol=0)
    # The fused UNet == the RORem UNet with the LoRA attached, != the plain RORem UNet.
    inputs = _unet_inputs(plain.unet)
    fused_out = _unet_out(b.unet, inputs)
    torch.testing.assert_close(fused_out, _unet_out(rorem["lora_unet"], inputs), atol=1e-4, rtol=0)
    assert (fused_out - _unet_out(plain.unet, inputs)).abs().max() > 1e-2


def test_from_rorem_missing_pieces(rorem: dict, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="RORem UNet config.json"):
        from_rorem(rorem["base"], tmp_path, tmp_path / "out")
    with pytest.raises(BundleError, match=LORA_WEIGHTS):
        from_rorem(rorem["base"], rorem["unet"], tmp_path / "out", lora_dir=tmp_path, resolution=64)
    assert not (tmp_path / "out").exists()


def test_cli_missing_text_encoder_exits_2(rorem: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The console entry point (``cleanplate = cleanplate.cli:main``), run in-process (a subprocess would
    spend ~10 s importing torch/diffusers here): one ``error:`` line naming the missing encoder, exit 2."""
    from cleanplate.cli import main

    base = tmp_path / "base"
    base.mkdir()
    for sub in ("tokenizer", "tokenizer_2", "text_encoder", "vae", "scheduler"):
        os.symlink(rorem["base"] / sub, base / sub)
    monkeypatch.setattr(sys, "argv", ["cleanplate", "bundle", "from-rorem", "--base", str(base), "--unet",
                                      str(rorem["unet"]), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:")
    assert "text_encoder_2" in lines[-1]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
