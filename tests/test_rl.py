"""RL trainers after SFT (issue 6, part B): Diffusion-DPO, reward-weighted LCM distillation, GRPO.

Small fixed problems on the shipped default bundle run at 64 px (a trained VAE and UNet, so outputs react
to the policy; its discriminator gives the 'local' reward) and on two synthetic 64 px items: each trainer
moves its objective the right way, writes a bundle that serving loads, resumes a crashed run to the same
weights, and GRPO runs under `accelerate launch` with two CPU processes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cleanplate.bundle import default_bundle_path, load_bundle, read_config, save_bundle
from cleanplate.pipeline import RemovalPipeline
from cleanplate.sampling import training_target
from cleanplate.training import common, lcm
from cleanplate.training.common import alphas_cumprod
from cleanplate.training.dpo import DPOConfig, PairDataset, dpo_errors, dpo_loss, read_pairs, train_dpo
from cleanplate.training.grpo import GRPOConfig, train_grpo
from cleanplate.training.rwd import RWDConfig, reward_weights, train_rwd

pytestmark = pytest.mark.slow

RES = 64
DEFAULT = default_bundle_path()
# what the RL trainers write as lcm_lora when they start from the default bundle: its LCM-LoRA fused in, or
# none when the default bundle has none (an x0 model trained at the served timesteps needs no LCM-LoRA)
DEFAULT_MERGED = "none" if read_config(DEFAULT).lcm_lora == "none" else "fused"


def _kw(meta: Path, out: Path, **kw) -> dict:
    base = {"meta": [meta], "out": out, "bundle": DEFAULT, "resolution": RES, "batch_size": 2, "lr": 1e-3,
            "warmup_steps": 1, "dilate_range": (0, 0), "checkpoint_every": 1000, "log_every": 5, "lora_rank": 4}
    return {**base, **kw}


@pytest.fixture(scope="module")
def items2(synth_data, tmp_path_factory) -> Path:
    """The first two synthetic triplets (absolute paths), scored 0.9 and 0.2."""
    root = synth_data.parent
    entries = json.loads(synth_data.read_text())[:2]
    out = tmp_path_factory.mktemp("items") / "meta.json"
    out.write_text(json.dumps([{**{k: str(root / e[k]) for k in ("source", "mask", "GT")}, "score": s}
                               for e, s in zip(entries, (0.9, 0.2), strict=True)]))
    return out


@pytest.fixture(scope="module")
def pairs2(synth_data, tmp_path_factory) -> Path:
    """Two preference pairs made by `cleanplate data dpo-pairs` semantics (make_dpo_pairs)."""
    from cleanplate.training.dpo import make_dpo_pairs

    return make_dpo_pairs([synth_data], tmp_path_factory.mktemp("pairs"), per_item=1, seed=0, limit=2)


def _assert_serves(out: Path, lcm_lora: str) -> None:
    """The output is a bundle serving loads unchanged, and it removes (finite, in range, right shape)."""
    config = read_config(out)
    assert config.lcm_lora == lcm_lora and config.resolution == RES
    pipe = RemovalPipeline.from_bundle(out)
    src = torch.rand(1, 3, RES, RES) * 2 - 1
    mask = torch.zeros(1, 1, RES, RES)
    mask[..., 16:40, 20:44] = 1
    got = pipe(src, mask, seeds=[3])
    assert got.shape == (1, 3, RES, RES) and torch.isfinite(got).all() and got.abs().max() <= 1


def _unet_diff(a: Path, b: Path) -> float:
    sa, sb = load_bundle(a).unet.state_dict(), load_bundle(b).unet.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


# -- trainers on small fixed problems ----------------------------------------------------------------------
def test_data_dpo_pairs_cli(synth_data, cli, tmp_path) -> None:
    run = cli("data", "dpo-pairs", "--meta", synth_data, "--out", tmp_path / "p", "--limit", 3, "--seed", 4)
    assert run.code == 0, run.err
    entries = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert len(entries) == 3 and {"source", "mask", "preferred", "rejected", "rejected_kind"} <= set(entries[0])
    from cleanplate.imaging import decode_mask

    for e in entries:
        root = tmp_path / "p"
        src, rej, pref = (np.asarray(Image.open(root / e[k]).convert("RGB")) for k in ("source", "rejected", "preferred"))
        mask = decode_mask(root / e["mask"])
        np.testing.assert_array_equal(rej[~mask], src[~mask])  # outside the mask every result is the source
        assert not np.array_equal(rej[mask], pref[mask])  # the rejected fill is not the GT
    again = cli("data", "dpo-pairs", "--meta", synth_data, "--out", tmp_path / "q", "--limit", 3, "--seed", 4)
    assert again.code == 0
    for e in entries:
        assert (tmp_path / "p" / e["rejected"]).read_bytes() == (tmp_path / "q" / e["rejected"]).read_bytes()


@torch.no_grad()
def _dpo_eval(policy: Path, meta: Path, beta: float, draws: int = 12) -> tuple[float, float]:
    """Implicit accuracy and mean logit of ``policy`` vs the reference (the starting bundle) on fixed (t, ε)."""
    pol = RemovalPipeline.from_bundle(policy)
    ref_bundle = load_bundle(DEFAULT)
    ref_bundle.config = ref_bundle.config.model_copy(update={"resolution": RES})  # same time_ids as training
    ref = RemovalPipeline.from_bundle(ref_bundle)
    ds = PairDataset(read_pairs([meta]), RES, flip=False)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ds[0]}
    alphas = alphas_cumprod(pol.config.scheduler)
    latents = pol.encode(torch.cat([batch["preferred"], batch["rejected"]]))
    mask_latent, masked = (x.repeat(2, 1, 1, 1) for x in pol.condition_inputs(batch["source"], batch["mask"]))
    g = torch.Generator().manual_seed(123)
    logits = []
    for _ in range(draws):
        b = len(ds)
        noise = torch.randn(latents[:b].shape, generator=g).repeat(2, 1, 1, 1)
        t = torch.randint(0, len(alphas), (b,), generator=g).repeat(2)
        a = alphas[t].view(-1, 1, 1, 1)
        z = a.sqrt() * latents + (1 - a).sqrt() * noise
        y = training_target(latents, noise, a.sqrt(), (1 - a).sqrt(), pol.prediction_type)
        err = [((p.unet_forward(z, t, mask_latent, masked) - y) ** 2).flatten(1).mean(1) for p in (pol, ref)]
        logits.append(dpo_loss(err[0], err[1], beta)[1])
    logits = torch.cat(logits)
    return (logits > 0).float().mean().item(), logits.mean().item()


@torch.no_grad()
def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, 16, generator=g)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, text_dim, generator=g), "time_ids": torch.full((2, 6), 64.0)}
    return unet(x, torch.tensor([999, 499]), encoder_hidden_states=cond, added_cond_kwargs=added).sample


def test_dpo_implicit_accuracy_rises(pairs2, tmp_path) -> None:
    import peft.utils

    out = tmp_path / "dpo"
    seen = {}
    real = peft.utils.get_peft_model_state_dict

    def spy(model, *args, **kwargs):  # the trained policy UNet, as save_policy_bundle exports it
        seen["out"] = _unet_out(model)
        return real(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peft.utils, "get_peft_model_state_dict", spy)
        result = train_dpo(DPOConfig(**_kw(pairs2, out, max_steps=12), lora_alpha=8))  # alpha/r = 2 folded in
    acc, losses = result["implicit_acc"], result["losses"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert acc[0] == 0.0 and losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at start
    assert np.mean(acc[-5:]) >= 0.8 and np.mean(losses[-5:]) < math.log(2)
    # on fixed (t, ε) draws the written policy prefers the preferred results more than the reference does
    eval_acc, eval_logit = _dpo_eval(out, pairs2, 5000.0)
    assert eval_acc >= 0.75 and eval_logit > 0
    _assert_serves(out, DEFAULT_MERGED)  # the default bundle's LCM-LoRA (if any) stays fused in
    b = load_bundle(out)
    torch.testing.assert_close(_unet_out(b.unet), seen["out"], rtol=1e-4, atol=1e-5)  # serves what was trained
    assert (_unet_out(load_bundle(DEFAULT).unet) - seen["out"]).abs().max() > 1e-4
    assert b.discriminator is not None  # the quality gate is carried over, calibration included
    assert json.loads((out / "discriminator" / "config.json").read_text())["calibration"]
    assert b.config.provenance["dpo"]["steps"] == 12


class _OraclePipe:
    """Stands in for the policy pipeline in :func:`dpo_errors`: a latent is the image at half size with
    channels (r, g, b, r), and the UNet is an oracle that knows the preferred latents and outputs their
    exact training target (ε, x0 or v) for its declared prediction type: its error on preferred items is 0."""

    vae_scale_factor = 2

    def __init__(self, prediction_type: str, alphas: torch.Tensor) -> None:
        self.prediction_type, self.alphas = prediction_type, alphas
        self.preferred: torch.Tensor | None = None

    @staticmethod
    def encode(images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(images, 2).repeat(1, 2, 1, 1)[:, :4]

    def condition_inputs(self, source, mask):
        return torch.nn.functional.max_pool2d(mask, 2), self.encode(source * (1 - mask))

    def unet_forward(self, z, t, mask_latent, masked_latents):
        a = self.alphas[t].view(-1, 1, 1, 1)
        x0 = self.preferred.repeat(2, 1, 1, 1)
        eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
        return training_target(x0, eps, a.sqrt(), (1 - a).sqrt(), self.prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_dpo_errors_compare_with_the_declared_training_target(prediction_type) -> None:
    import contextlib

    alphas = alphas_cumprod(read_config(DEFAULT).scheduler)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for k in ("source", "preferred", "rejected")}
    batch["mask"] = torch.zeros(2, 1, 16, 16)
    batch["mask"][..., 4:12, 4:12] = 1
    pipe = _OraclePipe(prediction_type, alphas)
    pipe.preferred = pipe.encode(batch["preferred"])
    raw = types.SimpleNamespace(disable_adapters=lambda: None, enable_adapters=lambda: None)
    accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext)
    torch.manual_seed(0)
    model_err, ref_err = dpo_errors(pipe, batch, alphas, raw, accelerator, mask_loss=False)
    assert model_err.shape == ref_err.shape == (4,)
    torch.testing.assert_close(model_err[:2], torch.zeros(2), rtol=0, atol=1e-8)  # the preferred: exact
    assert (model_err[2:] > 1e-3).all()  # the rejected results differ from the preferred ones


class _FixedDraws(types.SimpleNamespace):
    """``torch`` for lcm.py with the DDIM step and noise fixed, so a fixed batch gives a fixed objective."""

    def __getattr__(self, name):
        return getattr(torch, name)

    def randint(self, low, high, size, device=None):
        return torch.full(size, high - 5, dtype=torch.long, device=device)

    def randn_like(self, x):
        g = torch.Generator().manual_seed(0)
        return torch.randn((1, *x.shape[1:]), generator=g).expand_as(x).to(x)


def test_rwd_weights_follow_scores_in_training(items2, tmp_path) -> None:
    out = tmp_path / "rwd"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lcm, "torch", _FixedDraws())
        mp.setattr(lcm, "TripletDataset", lambda *a, **k: common.TripletDataset(*a, **{**k, "flip": False}))
        result = train_rwd(RWDConfig(**_kw(items2, out, max_steps=12)))
    assert result["reward"] == "label"  # every item has a score
    for scores, weights in zip(result["scores"], result["weights"], strict=True):
        s, w = torch.tensor(scores), torch.tensor(weights)
        torch.testing.assert_close(w, reward_weights(s, 0.25, None))
        assert w[s.argmax()] > w[s.argmin()]  # the 0.9 item weighs more than the 0.2 one
    losses = result["losses"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # the weighted consistency loss falls
    _assert_serves(out, "separate")  # an LCM bundle, as train lcm writes


def test_rwd_discriminator_scores_and_filter(items2, tmp_path) -> None:
    """reward 'target': the discriminator judges the decoded distillation target; the threshold filters."""
    out = tmp_path / "rwd_t"
    result = train_rwd(RWDConfig(**_kw(items2, out, max_steps=2), reward="target", threshold=0.5,
                                 temperature=None))
    for scores, weights in zip(result["scores"], result["weights"], strict=True):
        assert all(0.0 <= x <= 1.0 for x in scores)
        kept = [x >= 0.5 for x in scores]
        assert [w > 0 for w in weights] == kept
    assert read_config(out).lcm_lora == "separate"


def _toy_brightness(result, source, mask) -> dict[str, torch.Tensor]:
    """A monotone toy reward: the mean brightness of the result inside the mask."""
    return {"toy": ((result.mean(1, keepdim=True) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)).cpu()}


def test_grpo_mean_reward_rises_on_a_monotone_toy_reward(items2, tmp_path) -> None:
    out = tmp_path / "grpo"
    cfg = GRPOConfig(**_kw(items2, out, max_steps=18, lr=2e-3, warmup_steps=5), group_size=4, sampler_steps=2,
                     reward_weights={"toy": 1.0}, reward_regions={"toy": "edit"})
    result = train_grpo(cfg, reward_fn=_toy_brightness)
    rewards = result["reward"]
    assert len(rewards) == 18 and all(result["log_prob_finite"])
    assert all(math.isfinite(x) for x in result["log_prob_min"])
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.2
    assert max(result["ratio_max_dev"]) < 1e-3  # one update per rollout batch: on-policy, ratio 1
    _assert_serves(out, DEFAULT_MERGED)
    # the served (fused, default-attention) bundle is brighter in the mask than the start, on fixed seeds
    ds = common.TripletDataset(common.read_meta([items2]), RES, flip=False)
    src, mask = torch.stack([ds[i]["source"] for i in range(2)]), torch.stack([ds[i]["mask"] for i in range(2)])
    before_bundle = load_bundle(DEFAULT)
    # residual_scale 1: judge the policy's own change, undamped by the default bundle's serving scale
    before_bundle.config = before_bundle.config.model_copy(update={"resolution": RES, "steps": 2, "residual_scale": 1.0})
    after_bundle = load_bundle(out)
    after_bundle.config = after_bundle.config.model_copy(update={"steps": 2, "residual_scale": 1.0})
    before = _toy_brightness(RemovalPipeline.from_bundle(before_bundle)(src, mask, seeds=[0, 1]), src, mask)
    after = _toy_brightness(RemovalPipeline.from_bundle(after_bundle)(src, mask, seeds=[0, 1]), src, mask)
    assert after["toy"].mean() > before["toy"].mean() + 0.2


def test_grpo_composite_reward_matting_region_split_kl(items2, tmp_path) -> None:
    """The default path: RePainter's composite reward (the bundle's discriminator inside the mask), spatial
    matting, Edit-GRPO's split, KL to the reference, a sampled last step, two updates per rollout batch,
    gradient checkpointing; metrics in TensorBoard."""
    out = tmp_path / "grpo_full"
    cfg = GRPOConfig(**_kw(items2, out, max_steps=4, log_every=1), group_size=2, kl_coef=0.1, last_step_std=0.05,
                     inner_epochs=2, gradient_checkpointing=True, clip_range=1e-3)
    result = train_grpo(cfg)
    assert set(result["terms"]) == {"global", "local", "reinsert"} and len(result["reward"]) == 2
    assert all(0 <= x <= 1 for x in result["terms"]["local"])
    assert all(result["log_prob_finite"]) and len(result["losses"]) == 4
    assert all(math.isfinite(x) for x in result["losses"])
    assert all(k >= 0 and math.isfinite(k) for k in result["kl"]) and max(result["kl"]) > 0  # moved off the ref
    assert max(result["ratio_max_dev"]) > 0  # the second update of a batch is off-policy
    _assert_serves(out, DEFAULT_MERGED)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "grpo_full.work" / "logs" / "grpo")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"grpo/loss", "grpo/reward", "grpo/kl", "grpo/reward_local", "grpo/clip_frac"} <= tags


@pytest.fixture(scope="module")
def x0_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny random bundle (64 px, no LCM-LoRA, no discriminator), declaring prediction_type "sample"."""
    b = load_bundle(tiny_bundle)
    scheduler = {**b.config.scheduler, "prediction_type": "sample"}
    return save_bundle(tmp_path_factory.mktemp("x0") / "bundle", config=b.config.model_copy(
        update={"scheduler": scheduler}), unet=b.unet, vae=b.vae, conditioning=b.conditioning)


@pytest.mark.parametrize("trainer", ["dpo", "rwd", "grpo"])
def test_trainers_keep_an_x0_bundle_x0(trainer, x0_bundle, items2, pairs2, tmp_path) -> None:
    """Each trainer runs two steps on an x0-prediction bundle; its output declares x0 and serves."""
    out = tmp_path / trainer
    kw = _kw(pairs2 if trainer == "dpo" else items2, out, max_steps=2, bundle=x0_bundle)
    if trainer == "dpo":
        result = train_dpo(DPOConfig(**kw))
    elif trainer == "rwd":
        result = train_rwd(RWDConfig(**kw, reward="label"))
    else:
        result = train_grpo(GRPOConfig(**kw, group_size=2, sampler_steps=2, reward_weights={"toy": 1.0},
                                       reward_regions={"toy": "edit"}), reward_fn=_toy_brightness)
        assert all(result["log_prob_finite"])
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert read_config(out).scheduler["prediction_type"] == "sample"
    assert _unet_diff(out, x0_bundle) > 0  # trained
    _assert_serves(out, "separate" if trainer == "rwd" else "none")


# -- resume, CLI, accelerate -------------------------------------------------------------------------------
class _Crash(Exception):
    pass


@pytest.mark.parametrize("trainer", ["dpo", "rwd", "grpo"])
def test_crashed_run_resumes_to_the_same_weights(trainer, items2, pairs2, tmp_path) -> None:
    """Crash after the step-2 checkpoint, rerun: the result equals an uninterrupted 4-step run."""

    def run(name: str):
        kw = _kw(pairs2 if trainer == "dpo" else items2, tmp_path / name, max_steps=4, checkpoint_every=2,
                 work_dir=tmp_path / (name + ".work"))
        if trainer == "dpo":
            return train_dpo(DPOConfig(**kw))
        if trainer == "rwd":
            return train_rwd(RWDConfig(**kw))
        return train_grpo(GRPOConfig(**kw, group_size=2, sampler_steps=2, reward_weights={"toy": 1.0},
                                     reward_regions={"toy": "edit"}), reward_fn=_toy_brightness)

    run("straight")
    real = common.optimizer_step

    def crash_at_3(accelerator, cfg, loss, params, optimizer, scheduler, step, *rest):
        if step == 2:
            raise _Crash
        return real(accelerator, cfg, loss, params, optimizer, scheduler, step, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "optimizer_step", crash_at_3)
        with pytest.raises(_Crash):
            run("crashed")
    assert not (tmp_path / "crashed").exists()
    assert [p.name for p in (tmp_path / "crashed.work" / "checkpoints").iterdir()] == ["step_2"]
    resumed = run("crashed")
    assert len(resumed["losses"]) == 2  # steps 3 and 4 only
    assert _unet_diff(tmp_path / "straight", tmp_path / "crashed") == 0.0


def test_cli_train_dpo_config_file_and_bad_config(pairs2, items2, tiny_bundle, cli, tmp_path) -> None:
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({"meta": [str(pairs2)], "out": str(tmp_path / "o"), "bundle": str(DEFAULT),
                                  "resolution": RES, "batch_size": 2, "max_steps": 50, "lora_rank": 2,
                                  "mask_loss": True, "beta": 2500}))
    run = cli("train", "dpo", "--config", config, "--max-steps", 1)
    assert run.code == 0, run.err
    prov = read_config(tmp_path / "o").provenance["dpo"]
    assert prov["steps"] == 1 and prov["config"]["mask_loss"] and prov["config"]["beta"] == 2500
    bad = cli("train", "grpo", "--config", config, "--max-steps", 1)  # beta and mask_loss are no GRPO keys
    assert bad.code == 2 and bad.err.strip().startswith("error: config: ") and len(bad.err.strip().splitlines()) == 1
    assert "Extra inputs are not permitted" in bad.err
    no_disc = cli("train", "rwd", "--meta", items2, "--out", tmp_path / "r", "--bundle", tiny_bundle, "--reward", "data")
    assert no_disc.code == 2 and "needs a bundle with a discriminator" in no_disc.err.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpo_under_accelerate_launch_with_two_cpu_processes(items2, tmp_path) -> None:
    config = tmp_path / "grpo.json"
    out = tmp_path / "mp"
    config.write_text(json.dumps({
        "meta": [str(items2)], "out": str(out), "bundle": str(DEFAULT), "resolution": RES, "batch_size": 1,
        "group_size": 2, "sampler_steps": 2, "max_steps": 2, "checkpoint_every": 2, "lr": 1e-3,
        "warmup_steps": 1, "dilate_range": [0, 0], "lora_rank": 2, "log_every": 1}))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "cleanplate.cli", "train", "grpo", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"wrote {out}") == 1  # one process writes and reports
    assert read_config(out).provenance["grpo"]["num_processes"] == 2
    ckpt = tmp_path / "mp.work" / "checkpoints" / "step_2"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    _assert_serves(out, DEFAULT_MERGED)


@pytest.mark.parametrize(("name", "cls"), [("dpo", DPOConfig), ("rwd", RWDConfig), ("grpo", GRPOConfig)])
def test_shipped_configs_are_valid(name, cls) -> None:
    cfg = common.load_config(cls, common.CONFIG_DIR / f"default_{name}.json", {})
    assert cfg.out == Path(f"runs/default/{name}")
