"""Trainers (VAE, SFT, LCM-LoRA) on tiny models and synthetic 64 px data, and the LCM math."""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, TINY_VAE
from PIL import Image

from cleanplate.bundle import load_bundle
from cleanplate.imaging import decode_image, dilate_mask
from cleanplate.training import common, lcm, sft
from cleanplate.training.lcm import LCMConfig, boundary_scalings, predicted_x0, train_lcm
from cleanplate.training.sft import SFTConfig, train_sft
from cleanplate.training.vae import VAEConfig, train_vae

RES = 64  # bundles need >= 64 px
BATCH = 2


def mean(xs) -> float:
    return float(np.mean(xs))


@pytest.fixture(scope="module")
def no_flip():
    """A truly fixed batch: the trainers' datasets without the random horizontal flip."""
    with pytest.MonkeyPatch.context() as mp:
        fixed = functools.partial(common.TripletDataset, flip=False)
        mp.setattr(sft, "TripletDataset", fixed)
        mp.setattr(lcm, "TripletDataset", fixed)
        yield


@pytest.fixture(scope="module")
def fixed_meta(synth_data, tmp_path_factory) -> Path:
    """A meta.json with exactly BATCH items (absolute paths), so every batch holds the same images."""
    root = synth_data.parent
    entries = [{k: str(root / e[k]) for k in ("source", "mask", "GT")}
               for e in json.loads(synth_data.read_text())]
    path = tmp_path_factory.mktemp("fixed") / "meta.json"
    path.write_text(json.dumps(entries[:BATCH]))
    return path


@pytest.fixture(scope="module")
def scratch_parts(tmp_path_factory) -> dict[str, Path]:
    """From-scratch inputs: a UNet config JSON (conftest's TINY_UNET) and a saved tiny VAE."""
    from diffusers import AutoencoderKL

    d = tmp_path_factory.mktemp("scratch")
    (d / "unet.json").write_text(json.dumps(TINY_UNET))
    (d / "vae_config.json").write_text(json.dumps(TINY_VAE))
    torch.manual_seed(1)
    AutoencoderKL(**TINY_VAE).save_pretrained(d / "vae")
    return {"unet_config": d / "unet.json", "vae": d / "vae", "vae_config": d / "vae_config.json"}


def _train_kw(meta: Path, out: Path, **kw) -> dict:
    base = dict(meta=[meta], out=out, resolution=RES, batch_size=BATCH, lr=1e-3, warmup_steps=1,
                dilate_range=(0, 0), checkpoint_every=1000, log_every=10)
    return {**base, **kw}


def _assert_removes_with(bundle: Path, cli, photos, tmp_path) -> None:
    """`cleanplate remove --bundle BUNDLE` runs on a real photo and keeps the outside pixels."""
    rgb = photos["chelsea"][:120, :160]
    Image.fromarray(rgb).save(tmp_path / "in.png")
    mask = np.zeros(rgb.shape[:2], bool)
    mask[40:70, 60:100] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    out = tmp_path / "out.png"
    run = cli("remove", tmp_path / "in.png", "--mask", tmp_path / "m.png", "-o", out, "--bundle", bundle,
              "--dilate-px", 2)
    assert run.code == 0, run.err
    got = decode_image(out).pixels
    outside = ~dilate_mask(mask, 2)
    np.testing.assert_array_equal(got[outside], rgb[outside])
    assert not np.array_equal(got[mask], rgb[mask])


def _unet_max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


# -- VAE -----------------------------------------------------------------------------------------------
def test_train_vae(synth_data, scratch_parts, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    cfg = VAEConfig(meta=[synth_data], out=out, resolution=32, crop=32, batch_size=4, max_steps=30, lr=2e-3,
                    warmup_steps=1, checkpoint_every=1000, vae_config=str(scratch_parts["vae_config"]))
    result = train_vae(cfg)
    losses = result["losses"]
    assert len(losses) == 30
    assert mean(losses[-5:]) < mean(losses[:5])
    vae = AutoencoderKL.from_pretrained(out)
    sf = vae.config.scaling_factor
    assert sf != 1.0 and sf == result["scaling_factor"]
    # the scaling factor makes the data's latents unit-variance (LDM recipe)
    ds = common.TripletDataset(common.read_meta([synth_data]), 32, flip=False)
    with torch.no_grad():
        z = vae.encode(torch.stack([ds[i]["gt"] for i in range(len(ds))])).latent_dist.mode()
    assert 0.9 < (z * sf).std().item() < 1.1
    assert (tmp_path / "vae.work" / "checkpoints" / "step_30" / "done").exists()


# -- SFT -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_scratch(no_flip, fixed_meta, scratch_parts, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sft") / "bundle"
    cfg = SFTConfig(**_train_kw(fixed_meta, out, max_steps=40), unet_config=str(scratch_parts["unet_config"]),
                    vae=scratch_parts["vae"], name="scratch-test")
    return out, train_sft(cfg)


def test_sft_from_scratch(sft_scratch, scratch_parts, cli, photos, tmp_path):
    out, result = sft_scratch
    losses = result["losses"]
    assert len(losses) == 40
    assert mean(losses[-8:]) < mean(losses[:8])
    b = load_bundle(out)
    assert b.config.resolution == RES and b.config.name == "scratch-test" and b.config.lcm_lora == "none"
    assert b.config.provenance["sft"]["steps"] == 40
    assert b.unet.config.in_channels == 9
    # zero "empty prompt" conditioning of the UNet's shapes; the VAE is frozen
    assert b.conditioning.prompt_embeds.shape == (1, 77, TINY_UNET["cross_attention_dim"])
    assert not b.conditioning.prompt_embeds.any() and not b.conditioning.pooled_prompt_embeds.any()
    from diffusers import AutoencoderKL

    assert _unet_max_diff(b.vae, AutoencoderKL.from_pretrained(scratch_parts["vae"])) == 0
    _assert_removes_with(out, cli, photos, tmp_path)


def test_sft_from_scratch_follows_the_seed(no_flip, fixed_meta, scratch_parts, tmp_path):
    def run(name: str, seed: int):
        train_sft(SFTConfig(**_train_kw(fixed_meta, tmp_path / name, max_steps=1, seed=seed),
                            unet_config=str(scratch_parts["unet_config"]), vae=scratch_parts["vae"]))
        return load_bundle(tmp_path / name).unet

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert _unet_max_diff(a, b) == 0
    assert _unet_max_diff(a, c) > 0


def test_sft_from_bundle(no_flip, fixed_meta, tiny_bundle, cli, photos, tmp_path):
    out = tmp_path / "ft"
    result = train_sft(SFTConfig(**_train_kw(fixed_meta, out, max_steps=30), init_bundle=tiny_bundle))
    losses = result["losses"]
    assert len(losses) == 30
    assert mean(losses[-8:]) < mean(losses[:8])
    base, b = load_bundle(tiny_bundle), load_bundle(out)
    assert b.config.dilate_px == base.config.dilate_px == 2  # the init bundle's settings carry over
    assert _unet_max_diff(b.unet, base.unet) > 0  # fine-tuned
    assert _unet_max_diff(b.vae, base.vae) == 0  # frozen
    assert torch.equal(b.conditioning.prompt_embeds, base.conditioning.prompt_embeds)
    _assert_removes_with(out, cli, photos, tmp_path)


def test_sft_resumes_from_checkpoint(fixed_meta, tiny_bundle, tmp_path):
    out, work = tmp_path / "b", tmp_path / "work"
    kw = dict(init_bundle=tiny_bundle, work_dir=work, checkpoint_every=5, keep_checkpoints=2)
    first = train_sft(SFTConfig(**_train_kw(fixed_meta, out, max_steps=10, **kw)))
    assert len(first["losses"]) == 10
    ckpts = work / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_10", "step_5"]
    second = train_sft(SFTConfig(**_train_kw(fixed_meta, out, max_steps=15, **kw)))
    assert len(second["losses"]) == 5  # resumed at step 10
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_10", "step_15"]  # step_5 pruned
    assert (ckpts / "step_15" / "done").read_text() == "15"
    assert load_bundle(out).config.provenance["sft"]["steps"] == 15


# -- LCM -----------------------------------------------------------------------------------------------
class _FixedDraws(types.SimpleNamespace):
    """``torch`` for lcm.py with the timestep and noise fixed: a fixed batch then gives a fixed objective."""

    def __getattr__(self, name):
        return getattr(torch, name)

    def randint(self, low, high, size, device=None):
        return torch.full(size, high - 5, dtype=torch.long, device=device)  # a high-noise DDIM step

    def randn_like(self, x):
        g = torch.Generator().manual_seed(0)
        return torch.randn((1, *x.shape[1:]), generator=g).expand_as(x).to(x)


def _spy_trained_unet(mp: pytest.MonkeyPatch) -> dict:
    """Keep the LoRA-carrying UNet train_lcm exports (it calls peft.utils.get_peft_model_state_dict on it)."""
    import peft.utils

    seen: dict = {}
    real = peft.utils.get_peft_model_state_dict

    def spy(model, *args, **kwargs):
        seen["unet"] = model
        return real(model, *args, **kwargs)

    mp.setattr(peft.utils, "get_peft_model_state_dict", spy)
    return seen


@torch.no_grad()
def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, 16, generator=g)
    cond = torch.randn(2, 77, TINY_UNET["cross_attention_dim"], generator=g)
    added = {"text_embeds": torch.randn(2, 16, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return unet(x, torch.tensor([999, 499]), encoder_hidden_states=cond, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def lcm_run(no_flip, sft_scratch, fixed_meta, tmp_path_factory) -> tuple[Path, dict, torch.Tensor]:
    out = tmp_path_factory.mktemp("lcm") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lcm, "torch", _FixedDraws())
        seen = _spy_trained_unet(mp)
        cfg = LCMConfig(**_train_kw(fixed_meta, out, max_steps=30), bundle=sft_scratch[0], lora_rank=4)
        result = train_lcm(cfg)
    return out, result, _unet_out(seen["unet"])


def test_lcm_distillation(lcm_run, sft_scratch, cli, photos, tmp_path):
    out, result, trained_out = lcm_run
    losses = result["losses"]
    assert len(losses) == 30
    assert mean(losses[-8:]) < mean(losses[:8])
    assert (out / "lcm_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "bundle.json").read_text())["lcm_lora"] == "separate"
    fused, teacher = load_bundle(out), load_bundle(sft_scratch[0])
    assert not any("lora" in k for k in fused.unet.state_dict())  # merged into the plain weights
    assert _unet_max_diff(fused.unet, teacher.unet) > 0
    # serving the bundle runs exactly the student that was trained
    torch.testing.assert_close(_unet_out(fused.unet), trained_out, rtol=1e-4, atol=1e-5)
    assert (_unet_out(teacher.unet) - trained_out).abs().max() > 1e-4
    # the bundle itself stores the SFT UNet unchanged next to the LoRA
    unfused = load_bundle(out, fuse_lora=False)
    assert any("lora" in k for k in unfused.unet.state_dict())
    _assert_removes_with(out, cli, photos, tmp_path)


def test_lcm_lora_alpha_is_kept_in_the_bundle(sft_scratch, fixed_meta, tmp_path):
    """lora_alpha != rank scales the LoRA by alpha/r in training; the served (fused) UNet must match."""
    out = tmp_path / "lcm_alpha"
    with pytest.MonkeyPatch.context() as mp:
        seen = _spy_trained_unet(mp)
        train_lcm(LCMConfig(**_train_kw(fixed_meta, out, max_steps=2, lr=1e-2), bundle=sft_scratch[0],
                            lora_rank=2, lora_alpha=8))
    fused = load_bundle(out).unet
    torch.testing.assert_close(_unet_out(fused), _unet_out(seen["unet"]), rtol=1e-4, atol=1e-5)


def test_boundary_scalings():
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    c_skip, c_out = boundary_scalings(t, timestep_scaling=10.0)
    assert c_skip.shape == c_out.shape == (6, 1, 1, 1)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(z, 0) = z
    cs, co = c_skip.flatten(), c_out.flatten()
    assert (cs[1:] < cs[:-1]).all()  # c_skip decreases with t
    assert (co[1:] >= co[:-1]).all() and co[1] > co[0]  # c_out grows to 1 (saturates in float32)
    assert cs[-1] < 1e-5 and co[-1] > 0.999
    # closed form at one point: s t = 10, sigma_data = 0.5
    one_s, one_o = boundary_scalings(torch.tensor([1]), 10.0)
    assert one_s.item() == pytest.approx(0.25 / 100.25)
    assert one_o.item() == pytest.approx(10 / 100.25**0.5)


def test_predicted_x0_inverts_forward_noising():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    alphas = common.alphas_cumprod({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                    "beta_schedule": "scaled_linear"})
    a = alphas[torch.tensor([0, 250, 600, 999])].double().view(-1, 1, 1, 1)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(predicted_x0(z, eps, a), x0, rtol=0, atol=1e-10)


# -- CLI -----------------------------------------------------------------------------------------------
def _sft_config_file(tmp_path: Path, meta: Path, parts: dict, out: Path, **fields) -> Path:
    config = tmp_path / "sft.json"
    fields = {"meta": [str(meta)], "out": str(out), "unet_config": str(parts["unet_config"]), **fields}
    config.write_text(json.dumps({"vae": str(parts["vae"]), "resolution": RES, **fields}))
    return config


def test_cli_train_sft_with_config_file(fixed_meta, scratch_parts, cli, tmp_path):
    out = tmp_path / "cli_sft"
    config = _sft_config_file(tmp_path, fixed_meta, scratch_parts, out, name="from-file", batch_size=BATCH,
                              max_steps=50, warmup_steps=1)
    run = cli("train", "sft", "--config", config, "--max-steps", 2)
    code, err = run.code, run.err
    assert code == 0, err
    b = load_bundle(out)
    assert b.config.name == "from-file"
    assert b.config.provenance["sft"]["steps"] == 2  # the option overrides the file
    assert (tmp_path / "cli_sft.work" / "checkpoints" / "step_2" / "done").exists()


@pytest.mark.parametrize(("extra", "expected"),
                         [({"bogus_key": 1}, "bogus_key"), ({"resolution": 32}, "resolution")])
def test_cli_train_sft_bad_config_exits_2(fixed_meta, scratch_parts, cli, tmp_path, extra,
                                          expected):
    out = tmp_path / "cli_sft"
    config = _sft_config_file(tmp_path, fixed_meta, scratch_parts, out, **extra)
    run = cli("train", "sft", "--config", config, "--max-steps", 2)
    code, err = run.code, run.err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not out.exists() and not (tmp_path / "cli_sft.work").exists()
