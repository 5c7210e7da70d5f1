"""`cleanplate train grpo`: GRPO on the 4-step LCM sampler, with RePainter's composite reward and spatial
matting and Edit-GRPO's region split.

Policy. The bundle's sampler (:mod:`cleanplate.sampling`: LCMScheduler for the bundle's prediction type,
ε, x0 or v, each step read by :func:`cleanplate.sampling.lcm_step`) with a trainable LoRA on the served
UNet. Each non-final step is Gaussian given its input:

    x_{k+1} = sqrt(ᾱ_{k+1}) f_θ(x_k, t_k) + sqrt(1-ᾱ_{k+1}) ε   ~   N(μ_θ(x_k), σ_k²),
    μ_θ(x_k) = sqrt(ᾱ_{k+1}) f_θ(x_k, t_k),   σ_k = sqrt(1-ᾱ_{k+1})     (f_θ: LCM's consistency function)

so its log-probability is exact (:func:`.rl_common.gaussian_log_prob`); the initial noise does not
depend on θ. The last step is deterministic (x_0 = f_θ(x_{K-1})). Choice made here: by default
(``last_step_std`` 0) it carries no log-probability and is excluded from the policy loss, so the rollouts
are exactly what serving samples; the same UNet is trained through the K-1 stochastic steps. With
``last_step_std`` > 0 the rollouts sample x_0 ~ N(f_θ(x_{K-1}), last_step_std²) (latent units) and that
step joins the loss. Log-probabilities are means over latent elements (as Flow-GRPO, Liu et al. 2025,
arXiv 2505.05470), so ratios stay near 1 and ``clip_range`` is small (Flow-GRPO uses 1e-4).

GRPO (Shao et al. 2024, arXiv 2402.03300; DanceGRPO/Flow-GRPO for diffusion). Per iteration each process
takes ``batch_size`` (source, mask) items and samples ``group_size`` rollouts of each (fresh noise).
Rewards → advantages normalised within each group (Â = (r - mean_g)/std_g, clipped to ±``adv_clip``).
Per stochastic step k and region ρ, with ratio r_k = exp(log π_θ - log π_old):

    L = Σ_ρ w_ρ · mean_k mean_i max(-Â_{i,ρ} r_{k,ρ}, -Â_{i,ρ} clip(r_{k,ρ}, 1-ε, 1+ε))
        + kl_coef · mean_k ||μ_θ - μ_ref||² / (2σ_k²)

where the KL is the exact KL of the two Gaussians (same σ) to the reference (LoRA disabled).

Reward (RePainter, Guo et al. 2025, arXiv 2510.07721: the local-global composite reward). Terms
(:class:`.rl_common.CompositeReward`): ``global`` fidelity outside the mask, ``local`` quality inside it
(the bundle's RORem discriminator), ``reinsert`` ("nothing re-inserted"). Each term is normalised within
its group before weighting (``reward_weights``), so the sum cannot be dominated by one term's units, which
resists reward hacking through any single term.

Edit-GRPO region split (``region_split``): the edit region is the mask (max-pooled to latent cells), the
preserved region the rest. ``reward_regions`` assigns each term to a region; each region gets its own
composite reward and group-normalised advantage, and its own policy loss from the log-probability terms
of its latent cells only (``region_weights``). Without the split: one advantage, the whole latent.

Spatial matting (RePainter): :class:`.rl_common.SpatialMattingProcessor` on every attention layer, the
same instance in rollouts, in the update and for the reference, biases self-attention from masked queries
toward background keys by ``matting_bias`` (0 turns it off). It is a training-time prior: the bundle that
serving loads runs diffusers' default attention (a bias of 0).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from cleanplate.bundle import load_bundle
from cleanplate.discriminator import Discriminator
from cleanplate.errors import ErrorCode, InputError
from cleanplate.pipeline import RemovalPipeline
from cleanplate.sampling import LCMStep, lcm_schedule, lcm_step

from .common import TripletDataset, make_accelerator, read_meta, start_training
from .rl_common import (
    CompositeReward,
    RewardFn,
    RLConfig,
    SpatialMattingProcessor,
    add_policy_lora,
    combine_rewards,
    discriminator_scorer,
    gaussian_log_prob,
    group_normalize,
    reference_model,
    region_mean,
    save_policy_bundle,
    unet_output,
)

Region = Literal["edit", "preserve"]


class GRPOConfig(RLConfig):
    batch_size: int = Field(2, ge=1, description="(source, mask) items per process per iteration")
    group_size: int = Field(4, ge=2, description="rollouts per item (the GRPO group)")
    sampler_steps: int | None = Field(None, ge=1, le=50, description="LCM steps of a rollout (default: bundle's)")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip ε (ratios of per-element mean log-probs)")
    adv_clip: float = Field(5.0, gt=0)
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL to the reference (LoRA disabled); 0 = off")
    last_step_std: float = Field(0.0, ge=0, description="0: the deterministic last step is excluded; > 0: sampled")
    inner_epochs: int = Field(1, ge=1, description="optimizer steps per rollout batch")
    reward_weights: dict[str, float] = Field(default_factory=lambda: {"global": 1.0, "local": 1.0, "reinsert": 0.5})
    reward_regions: dict[str, Region] = Field(
        default_factory=lambda: {"global": "preserve", "local": "edit", "reinsert": "edit"})
    region_split: bool = Field(True, description="Edit-GRPO: separate advantages and losses per region")
    region_weights: dict[Region, float] = Field(default_factory=lambda: {"edit": 1.0, "preserve": 1.0})
    matting_bias: float = Field(2.0, description="spatial-matting logit bias (masked query -> background key)")
    reward_bundle: Path | None = Field(None, description="bundle whose discriminator gives 'local' (default: bundle)")
    name: str = "cleanplate-grpo"
    lr: float = 1e-4

    @model_validator(mode="after")
    def _regions_cover_weights(self) -> GRPOConfig:
        if self.region_split:
            missing = [k for k, w in self.reward_weights.items() if w and k not in self.reward_regions]
            if missing:
                raise ValueError(f"reward_regions lacks a region for {missing}")
        return self


@dataclass
class Transition:
    """One stochastic sampler step of a rollout batch (N = items × group_size).

    Attributes:
        k: step index; x: (N,C,h,w) its input x_k; sample: (N,C,h,w) the drawn x_{k+1}; std: σ_k;
        log_prob_old: {region: (N,)} the sampling policy's mean log-density of ``sample`` over the region.
    """

    k: int
    x: torch.Tensor
    sample: torch.Tensor
    std: float
    log_prob_old: dict[str, torch.Tensor]


def step_distribution(step: LCMStep, x: torch.Tensor, model_output: torch.Tensor, last_step_std: float
                      ) -> tuple[torch.Tensor, float | None]:
    """(mean, std) of the sampler's next latent given x (B,C,h,w) and the UNet's output at x (B,C,h,w): ε,
    x0 or v as ``step.prediction_type`` says (f(x) below: :func:`cleanplate.sampling.lcm_step`'s denoised
    latent).

    Non-final step: (sqrt(ᾱ_prev)·f(x), sqrt(1-ᾱ_prev)), exactly ``lcm_step``'s re-noising distribution.
    Final step: (f(x), ``last_step_std``), or std None when it is 0 (deterministic, no log-probability).
    """
    if step.last:
        return lcm_step(step, x, model_output), (last_step_std if last_step_std > 0 else None)
    return lcm_step(step, x, model_output, torch.zeros_like(x)), step.sqrt_beta_prev


def region_masks(region_latent: torch.Tensor, split: bool) -> dict[str, torch.Tensor]:
    """{"edit": m, "preserve": 1 - m} for the latent-size mask m (N,1,h,w) {0,1}, or {"all": 1}."""
    if split:
        return {"edit": region_latent, "preserve": 1.0 - region_latent}
    return {"all": torch.ones_like(region_latent)}


@torch.no_grad()
def rollout(pipe: RemovalPipeline, schedule: list[LCMStep], mask_latent: torch.Tensor, masked_latents: torch.Tensor,
            matting_mask: torch.Tensor | None, regions: dict[str, torch.Tensor], last_step_std: float,
            accelerator: Any) -> tuple[torch.Tensor, list[Transition]]:
    """Sample the LCM chain from fresh noise (torch's global RNG); returns the final latent (N,C,h,w) and
    the stochastic transitions with their old log-probabilities per region."""
    x = torch.randn(masked_latents.shape, device=masked_latents.device, dtype=masked_latents.dtype)
    transitions: list[Transition] = []
    for k, step in enumerate(schedule):
        with accelerator.autocast():
            output = unet_output(pipe, x, step.timestep, mask_latent, masked_latents, matting_mask)
        mean, std = step_distribution(step, x.float(), output.float(), last_step_std)
        if std is None:
            x = mean.to(x.dtype)
            continue
        sample = mean + std * torch.randn_like(mean)
        lp = gaussian_log_prob(sample, mean, std)
        transitions.append(Transition(k, x, sample.to(x.dtype), std,
                                      {r: region_mean(lp, m) for r, m in regions.items()}))
        x = sample.to(x.dtype)
    return x, transitions


def policy_loss(ratio: torch.Tensor, advantage: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO/GRPO clipped surrogate, mean over items: mean(max(-Â r, -Â clip(r, 1-ε, 1+ε))). (N,) -> ()."""
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def region_policy_loss(log_prob: torch.Tensor, log_prob_old: dict[str, torch.Tensor],
                       advantages: dict[str, torch.Tensor], regions: dict[str, torch.Tensor],
                       region_weights: dict[str, float], clip_range: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Edit-GRPO's per-region clipped surrogate for one sampler step.

    Args:
        log_prob: (N,C,h,w) elementwise log-density of the sampled latent under the current policy.
        log_prob_old: {region: (N,)} the sampling policy's region means (from :func:`rollout`).
        advantages: {region: (N,)} group-normalised advantages; regions: {region: (N,1,h,w) in [0,1]}.
        region_weights: {region: w} (missing: 1); clip_range: ε.
    Returns:
        (loss (), {region: (N,) detached ratios}): Σ_ρ w_ρ · :func:`policy_loss` of the ratio of region
        means exp(mean_ρ log π_θ - log π_old,ρ); the log-probability terms of a region's cells only receive
        that region's advantage.
    """
    loss = torch.zeros((), device=log_prob.device)
    ratios = {}
    for r, m in regions.items():
        ratio = torch.exp(region_mean(log_prob, m) - log_prob_old[r])
        ratios[r] = ratio.detach()
        loss = loss + region_weights.get(r, 1.0) * policy_loss(ratio, advantages[r], clip_range)
    return loss, ratios


def make_reward(cfg: GRPOConfig, device: torch.device) -> RewardFn:
    """The default :class:`.rl_common.CompositeReward`; its ``local`` term needs a discriminator
    (``reward_bundle`` or ``bundle``). Raises InputError when a weighted 'local' has none."""
    scorer = None
    if cfg.reward_weights.get("local", 0):
        scorer = discriminator_scorer(cfg.reward_bundle or cfg.bundle, device, "grpo's 'local' reward")
    return CompositeReward(scorer)


def train_grpo(cfg: GRPOConfig, reward_fn: RewardFn | None = None) -> dict:
    """Run GRPO and write a bundle (the LoRA fused into the UNet) to ``cfg.out``.

    Args:
        cfg: the config.
        reward_fn: (result, source, mask) -> {term: (N,) float} with result/source (N,3,R,R) in [-1,1] and
            mask (N,1,R,R) {0,1}; default :func:`make_reward`. Its terms are weighted by
            ``cfg.reward_weights`` and placed by ``cfg.reward_regions``.
    Returns:
        per-iteration lists (this process): "reward" (mean over rollouts of Σ_term w·raw term), "terms"
        ({term: mean raw value}), "log_prob_finite" (every log-probability of the iteration, old and new,
        finite), "log_prob_min", "ratio_max_dev" (max |ratio - 1| seen in the updates), "kl"; and "losses"
        per optimizer step.
    TensorBoard: grpo/loss, grpo/lr, grpo/reward, grpo/reward_<term>, grpo/kl, grpo/clip_frac, grpo/log_prob.
    """
    bundle = load_bundle(cfg.bundle)
    accelerator = make_accelerator(cfg, "grpo")
    device = accelerator.device
    unet, vae = bundle.unet, bundle.vae.to(device)
    add_policy_lora(unet, cfg.lora_rank, cfg.lora_alpha)
    matting = SpatialMattingProcessor(cfg.matting_bias)
    unet.set_attn_processor(matting)  # one instance everywhere: rollout, update and reference
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    config = bundle.config.model_copy(update={"resolution": cfg.resolution})
    schedule = lcm_schedule(config.scheduler, cfg.sampler_steps or config.steps)
    if len(schedule) < 2 and cfg.last_step_std == 0:
        raise InputError("the sampler has no stochastic step: use sampler_steps >= 2 or last_step_std > 0",
                         code=ErrorCode.BAD_OPTION)
    reward = reward_fn or make_reward(cfg, device)
    dataset = TripletDataset(read_meta(cfg.meta), cfg.resolution, cfg.dilate_range)
    run = start_training(accelerator, cfg, unet, dataset, "grpo")
    raw = accelerator.unwrap_model(run.model)
    policy = RemovalPipeline(run.model, vae, bundle.conditioning, config, device, torch.float32, torch.float32)
    sampler = RemovalPipeline(raw, vae, bundle.conditioning, config, device, torch.float32, torch.float32)
    g = cfg.group_size
    history: dict[str, Any] = {"reward": [], "terms": {}, "log_prob_finite": [], "log_prob_min": [],
                               "ratio_max_dev": [], "kl": []}
    while run.step < cfg.max_steps:
        batch = next(run.batches)
        with torch.no_grad():
            mask_b, masked_b = policy.condition_inputs(batch["source"], batch["mask"])
        mask_latent, masked_latents = mask_b.repeat_interleave(g, 0), masked_b.repeat_interleave(g, 0)
        source, mask = batch["source"].repeat_interleave(g, 0), batch["mask"].repeat_interleave(g, 0)
        region_latent = Discriminator.mask_to_latent(mask, policy.vae_scale_factor).to(device)
        matting_mask = region_latent if cfg.matting_bias != 0 else None
        regions = region_masks(region_latent, cfg.region_split)
        raw.eval()
        final, transitions = rollout(sampler, schedule, mask_latent, masked_latents, matting_mask, regions,
                                     cfg.last_step_std, accelerator)
        with torch.no_grad():
            result = sampler.decode(final)
        raw.train()
        terms = reward(result, source, mask)
        weights = {k: w for k, w in cfg.reward_weights.items() if w}
        region_rewards = combine_rewards(terms, weights, dict(cfg.reward_regions) if cfg.region_split else None, g)
        advantages = {r: group_normalize(v, g).clamp(-cfg.adv_clip, cfg.adv_clip).to(device)
                      for r, v in region_rewards.items()}
        raw_total = sum(w * terms[k].float() for k, w in weights.items())
        history["reward"].append(raw_total.mean().item())
        for k, v in terms.items():
            history["terms"].setdefault(k, []).append(v.float().mean().item())
        finite = all(torch.isfinite(lp).all().item() for t in transitions for lp in t.log_prob_old.values())
        lp_min = min(lp.min().item() for t in transitions for lp in t.log_prob_old.values())
        max_dev, kls, clip_fracs = 0.0, [], []

        for _ in range(cfg.inner_epochs):
            if run.step >= cfg.max_steps:
                break
            done = torch.zeros((), device=device)
            for i, tr in enumerate(transitions):
                step = schedule[tr.k]
                last = i == len(transitions) - 1
                ctx = accelerator.no_sync(run.model) if not last else nullcontext()
                with ctx:
                    with accelerator.autocast():
                        output = unet_output(policy, tr.x, step.timestep, mask_latent, masked_latents,
                                             matting_mask)
                    mean, _ = step_distribution(step, tr.x.float(), output.float(), cfg.last_step_std)
                    lp = gaussian_log_prob(tr.sample, mean, tr.std)
                    loss, ratios = region_policy_loss(lp, tr.log_prob_old, advantages, regions, cfg.region_weights,
                                                      cfg.clip_range)
                    for ratio in ratios.values():
                        finite = finite and bool(torch.isfinite(ratio).all())
                        max_dev = max(max_dev, (ratio - 1).abs().max().item())
                        clip_fracs.append(((ratio - 1).abs() > cfg.clip_range).float().mean().item())
                    if cfg.kl_coef > 0:
                        with torch.no_grad(), accelerator.autocast(), reference_model(raw):
                            out_ref = unet_output(sampler, tr.x, step.timestep, mask_latent, masked_latents,
                                                  matting_mask)
                        mean_ref, _ = step_distribution(step, tr.x.float(), out_ref.float(),
                                                        cfg.last_step_std)
                        kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * tr.std**2)
                        kls.append(kl.mean().item())
                        loss = loss + cfg.kl_coef * kl.mean()
                    loss = loss / len(transitions)
                    if not last:
                        accelerator.backward(loss)
                        done = done + loss.detach()
            run.update(loss + done)  # backward of the last step's loss; logs the sum over steps
        history["log_prob_finite"].append(finite)
        history["log_prob_min"].append(lp_min)
        history["ratio_max_dev"].append(max_dev)
        history["kl"].append(sum(kls) / len(kls) if kls else 0.0)
        if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
            stats = {"grpo/reward": history["reward"][-1], "grpo/log_prob": lp_min,
                     "grpo/clip_frac": sum(clip_fracs) / max(1, len(clip_fracs)), "grpo/kl": history["kl"][-1]}
            stats.update({f"grpo/reward_{k}": v[-1] for k, v in history["terms"].items()})
            accelerator.log(stats, step=run.step)
    run.bar.close()

    if accelerator.is_main_process:
        n = min(10, len(history["reward"]))
        provenance = {**config.provenance, "grpo": {
            "config": cfg.model_dump(mode="json"), "steps": run.step, "final_loss": run.final_loss,
            "final_reward": sum(history["reward"][-n:]) / max(1, n), "num_processes": accelerator.num_processes,
            "note": f"trained with spatial matting (bias {cfg.matting_bias:g}); served with default attention"}}
        save_policy_bundle(cfg, raw, config.model_copy(update={"provenance": provenance, "name": cfg.name}))
    accelerator.end_training()
    history["losses"] = run.losses
    return history

