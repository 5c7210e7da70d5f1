"""Trainers (VAE, SFT, LCM-LoRA) on tiny models and synthetic 64 px data, and the LCM math."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, TINY_VAE
from PIL import Image

from cleanplate.bundle import SDXL_LCM_SCHEDULER, load_bundle, read_config, save_bundle
from cleanplate.imaging import decode_image, dilate_mask
from cleanplate.sampling import training_target
from cleanplate.training import common, lcm, sft
from cleanplate.training.lcm import (
    LCMConfig,
    boundary_scalings,
    consistency_terms,
    predicted_noise,
    train_lcm,
)
from cleanplate.training.sft import SFTConfig, train_sft
from cleanplate.training.vae import VAEConfig, train_vae

pytestmark = pytest.mark.slow

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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_noise_recovers_the_noise(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    alphas = common.alphas_cumprod(SDXL_LCM_SCHEDULER)
    a = alphas[torch.tensor([0, 250, 600, 999])].double().view(-1, 1, 1, 1)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    output = training_target(x0, eps, a.sqrt(), (1 - a).sqrt(), prediction_type)  # a perfect model
    torch.testing.assert_close(predicted_noise(z, output, a.sqrt(), (1 - a).sqrt(), prediction_type), eps,
                               rtol=0, atol=1e-9)


class _GivenDraws(types.SimpleNamespace):
    """``torch`` for lcm.py whose DDIM-step indices (``idx``) and noise (``noise``) are given."""

    def __getattr__(self, name):
        return getattr(torch, name)

    def randint(self, low, high, size, device=None):
        return self.idx.to(device)

    def randn_like(self, x):
        return self.noise.to(x)


class _FakeUNet:
    """One deterministic ε-model of (z, t), served as the ε-, x0- or v-model predicting the same thing.

    Plays both ``pipe`` (``prediction_type``, ``unet_forward``) and ``raw`` (adapters) for
    :func:`consistency_terms`: the "LoRA" adds ``w``·flip(z) to the student's ε, the teacher lacks it.
    ``serves`` is what it outputs; ``prediction_type`` what it declares (they differ only to show a misread).
    """

    def __init__(self, alphas: torch.Tensor, serves: str, declares: str | None = None) -> None:
        self.alphas, self.serves, self.prediction_type = alphas, serves, declares or serves
        self.w = torch.tensor(0.3, requires_grad=True)
        self.adapters = True

    def disable_adapters(self) -> None:
        self.adapters = False

    def enable_adapters(self) -> None:
        self.adapters = True

    def eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas[t].view(-1, 1, 1, 1)
        e = 0.7 * torch.tanh(z) + 0.2 * a
        return e + self.w * z.flip(-1) if self.adapters else e

    def unet_forward(self, z, t, mask_latent, masked_latents):
        a = self.alphas[t].view(-1, 1, 1, 1).double()
        e = self.eps(z, t).double()
        x0 = (z.double() - (1 - a).sqrt() * e) / a.sqrt()
        return training_target(x0, e, a.sqrt(), (1 - a).sqrt(), self.serves).float()


def test_consistency_terms_agree_for_every_prediction_type(tmp_path):
    """LCM's loss, target and gradient for x0- and v-models equal the ε-model formula (LCM Alg. 1, written
    out below) when all three predict the same thing; reading an x0-model as ε does not."""
    alphas = common.alphas_cumprod(SDXL_LCM_SCHEDULER)
    num_ddim, skip = 50, 20
    ddim = torch.arange(1, num_ddim + 1) * skip - 1
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    draws = _GivenDraws(idx=torch.tensor([0, 10, 30, 49]), noise=torch.randn(4, 4, 8, 8, generator=g))
    cfg = LCMConfig(meta=[tmp_path / "m.json"], out=tmp_path / "o", bundle=tmp_path / "b")  # huber, s = 10
    accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext)
    unused = torch.zeros(4, 1, 8, 8)

    # the ε-model formula, by hand
    ref = _FakeUNet(alphas, "epsilon")
    t_s = ddim[draws.idx]
    t_p = (t_s - skip).clamp(min=0)
    a_s, a_p = alphas[t_s].view(-1, 1, 1, 1), alphas[t_p].view(-1, 1, 1, 1)
    z = a_s.sqrt() * latents + (1 - a_s).sqrt() * draws.noise
    (cs_s, co_s), (cs_p, co_p) = boundary_scalings(t_s, 10.0), boundary_scalings(t_p, 10.0)
    pred = cs_s * z + co_s * (z - (1 - a_s).sqrt() * ref.eps(z, t_s)) / a_s.sqrt()
    with torch.no_grad():
        ref.adapters = False
        e_teacher = ref.eps(z, t_s)
        ref.adapters = True
        z_prev = a_p.sqrt() * (z - (1 - a_s).sqrt() * e_teacher) / a_s.sqrt() + (1 - a_p).sqrt() * e_teacher
        target = cs_p * z_prev + co_p * (z_prev - (1 - a_p).sqrt() * ref.eps(z_prev, t_p)) / a_p.sqrt()
    loss = (torch.sqrt((pred - target) ** 2 + cfg.huber_c**2) - cfg.huber_c).flatten(1).mean(1)
    (grad,) = torch.autograd.grad(loss.sum(), ref.w)
    assert (target - z_prev)[0].abs().max() == 0  # t_prev = 0: f(z, 0) = z
    assert loss.min() > 0 and grad != 0

    def run(model: _FakeUNet):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lcm, "torch", draws)
            terms = consistency_terms(cfg, model, model, latents, unused, latents, alphas, ddim, skip,
                                      accelerator)
        return terms, torch.autograd.grad(terms.loss.sum(), model.w)[0]

    for ptype in ("epsilon", "v_prediction", "sample"):
        terms, got_grad = run(_FakeUNet(alphas, ptype))
        torch.testing.assert_close(terms.target, target, rtol=1e-4, atol=1e-4, msg=ptype)
        torch.testing.assert_close(terms.loss, loss, rtol=1e-3, atol=1e-6, msg=ptype)
        torch.testing.assert_close(got_grad, grad, rtol=1e-3, atol=1e-6, msg=ptype)
    misread, _ = run(_FakeUNet(alphas, "sample", declares="epsilon"))  # the old ε-only reading
    assert (misread.target - target).abs().max() > 0.1


# -- prediction types end to end -------------------------------------------------------------------------
def _with_prediction_type(bundle: Path, prediction_type: str, out: Path) -> Path:
    """A copy of ``bundle`` (same weights) whose bundle.json declares ``prediction_type``."""
    b = load_bundle(bundle)
    scheduler = {**b.config.scheduler, "prediction_type": prediction_type}
    return save_bundle(out, config=b.config.model_copy(update={"scheduler": scheduler}), unet=b.unet,
                       vae=b.vae, conditioning=b.conditioning)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_lcm_distills_an_x0_or_v_bundle(prediction_type, fixed_meta, tiny_bundle, cli, photos, tmp_path):
    teacher = _with_prediction_type(tiny_bundle, prediction_type, tmp_path / "teacher")
    out = tmp_path / "lcm"
    result = train_lcm(LCMConfig(**_train_kw(fixed_meta, out, max_steps=2), bundle=teacher, lora_rank=4))
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    config = read_config(out)
    assert config.scheduler["prediction_type"] == prediction_type and config.lcm_lora == "separate"
    assert _unet_max_diff(load_bundle(out).unet, load_bundle(teacher).unet) > 0  # the LoRA moved
    _assert_removes_with(out, cli, photos, tmp_path)


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
