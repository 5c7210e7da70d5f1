"""`cleanplate train lcm`: LCM-LoRA distillation of an SFT bundle into a few-step remover.

Latent consistency distillation (Luo et al., LCM arXiv 2310.04378, Alg. 1; LCM-LoRA arXiv 2311.05556),
as RORem-4S does, with guidance 1 (no CFG, empty prompt):

* skipping-step DDIM solver: N = ``num_ddim_timesteps`` teacher steps, skip k = T / N;
  t_{n+k} ~ U{τ_1..τ_N}, ẑ_{t_n} = √ᾱ_{t_n}·x̂0_teacher + √(1−ᾱ_{t_n})·ε̂_teacher (DDIM, t_{n+k} → t_n);
* consistency function f(z, t) = c_skip(t) z + c_out(t) x̂0(z, t) with the boundary scalings
  c_skip = σ_d² / ((s t)² + σ_d²), c_out = s t / sqrt((s t)² + σ_d²), σ_d = 0.5, s = timestep_scaling;
* loss d(f_θ(z_{t_{n+k}}, t_{n+k}), stopgrad f_θ(ẑ_{t_n}, t_n)), d = l2 or pseudo-Huber.

Prediction types: the UNet's output (ε, x0 or v, the bundle's ``scheduler.prediction_type``) is read
through :func:`cleanplate.sampling.predicted_x0`, as the served sampler reads it, for student, teacher
and target alike; the solver's ε̂ is the output itself for ε-models and ε̂ = (z − √ᾱ·x̂0)/√(1−ᾱ) otherwise
(:func:`predicted_noise`, as diffusers' ``train_lcm_distill_lora_sdxl.py``). The written bundle keeps the
teacher's scheduler config, so it is served with the type it was trained with.

The teacher is the same UNet with the LoRA disabled, and (as in LCM-LoRA) the target uses the student
itself without an EMA copy. The LoRA is written to the bundle's ``lcm_lora/`` in diffusers format.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from cleanplate.bundle import BundleConfig, load_bundle, save_bundle
from cleanplate.pipeline import RemovalPipeline
from cleanplate.sampling import predicted_x0

from .common import (
    TrainConfig,
    TrainingRun,
    TripletDataset,
    alphas_cumprod,
    make_accelerator,
    read_meta,
    start_training,
)

LORA_TARGETS = [  # diffusers' LCM-LoRA SDXL recipe: attention, feed-forward, resnet convs and time projections
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


class LCMConfig(TrainConfig):
    bundle: Path = Field(description="the SFT bundle to distill")
    lora_rank: int = Field(64, ge=1, description="RORem-4S uses 64")
    lora_alpha: int | None = Field(None, description="default: = rank (scale 1)")
    num_ddim_timesteps: int = Field(50, ge=2)
    loss: Literal["l2", "huber"] = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    name: str = "cleanplate-lcm"
    resolution: int = Field(256, ge=64, description="training crop side in px; also the bundle's (>= 64)")
    lr: float = 1e-4


def boundary_scalings(t: torch.Tensor, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary-condition scalings (c_skip, c_out) for integer timesteps t (B,); f(z, 0) = z."""
    st = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def predicted_noise(z: torch.Tensor, model_output: torch.Tensor, sqrt_alpha: torch.Tensor,
                    sqrt_beta: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise estimate ε̂ (B,C,h,w) at z = x_t from the UNet's output there, for the DDIM solver step.

    "epsilon": the output itself; otherwise ε̂ = (z − √ᾱ·x̂0)/√(1−ᾱ) with x̂0 =
    :func:`cleanplate.sampling.predicted_x0` (for "v_prediction" this is √(1−ᾱ)·z + √ᾱ·v̂).
    z, model_output: (B,C,h,w); sqrt_alpha, sqrt_beta: √ᾱ_t, √(1−ᾱ_t) broadcasting to (B,1,1,1), with
    √(1−ᾱ_t) > 0 (true at every t of a DDPM schedule with β > 0). Raises ValueError for an unknown type.
    """
    if prediction_type == "epsilon":
        return model_output
    x0 = predicted_x0(z, model_output, sqrt_alpha, sqrt_beta, prediction_type)
    return (z - sqrt_alpha * x0) / sqrt_beta


@dataclass
class ConsistencyTerms:
    """One LCM distillation step on a batch: the per-item loss and the (no-grad) consistency target.

    Attributes:
        loss: (B,) float32, d(f_θ(z_{t_{n+k}}), stopgrad f_θ(ẑ_{t_n})) averaged over each item's latent.
        target: (B,C,h,w) float32, the target f_θ(ẑ_{t_n}, t_n): the student's clean-latent estimate one DDIM
            step closer to t = 0 (scaled latent space, decodable with ``RemovalPipeline.decode``).
    """

    loss: torch.Tensor
    target: torch.Tensor


def consistency_terms(cfg: LCMConfig, pipe: RemovalPipeline, raw: Any, latents: torch.Tensor,
                      mask_latent: torch.Tensor, masked_latents: torch.Tensor, alphas: torch.Tensor,
                      ddim_timesteps: torch.Tensor, skip: int, accelerator: Any) -> ConsistencyTerms:
    """The LCD loss of LCM Alg. 1 per item (see the module docstring), for clean latents (B,C,h,w).

    ``pipe.unet`` is the student (LoRA on); ``raw`` its unwrapped module, whose adapters are switched off
    for the teacher. Every UNet output is read as ``pipe.prediction_type`` says (ε, x0 or v). Draws the
    DDIM step and the noise from torch's global RNG.
    """
    b = latents.shape[0]
    num_ddim = len(ddim_timesteps)
    ptype = pipe.prediction_type
    idx = torch.randint(0, num_ddim, (b,), device=latents.device)
    t_start = ddim_timesteps[idx]
    t_prev = (t_start - skip).clamp(min=0)
    a_start = alphas[t_start].view(-1, 1, 1, 1)
    a_prev = alphas[t_prev].view(-1, 1, 1, 1)  # t_prev = 0 at the first DDIM step, as diffusers' DDIMSolver
    sa_s, sb_s = a_start.sqrt(), (1 - a_start).sqrt()
    sa_p, sb_p = a_prev.sqrt(), (1 - a_prev).sqrt()
    noise = torch.randn_like(latents)
    z_start = sa_s * latents + sb_s * noise
    c_skip_s, c_out_s = boundary_scalings(t_start, cfg.timestep_scaling)
    c_skip_p, c_out_p = boundary_scalings(t_prev, cfg.timestep_scaling)

    with accelerator.autocast():
        out_student = pipe.unet_forward(z_start, t_start, mask_latent, masked_latents)
    pred = c_skip_s * z_start + c_out_s * predicted_x0(z_start, out_student.float(), sa_s, sb_s, ptype)
    with torch.no_grad(), accelerator.autocast():
        raw.disable_adapters()  # teacher = the SFT UNet
        out_teacher = pipe.unet_forward(z_start, t_start, mask_latent, masked_latents).float()
        raw.enable_adapters()
        x0_teacher = predicted_x0(z_start, out_teacher, sa_s, sb_s, ptype)
        eps_teacher = predicted_noise(z_start, out_teacher, sa_s, sb_s, ptype)
        z_prev = sa_p * x0_teacher + sb_p * eps_teacher  # one DDIM step
        out_target = pipe.unet_forward(z_prev, t_prev, mask_latent, masked_latents).float()
        target = c_skip_p * z_prev + c_out_p * predicted_x0(z_prev, out_target, sa_p, sb_p, ptype)
    if cfg.loss == "l2":
        per_item = ((pred - target) ** 2).flatten(1).mean(1)
    else:
        per_item = (torch.sqrt((pred - target) ** 2 + cfg.huber_c**2) - cfg.huber_c).flatten(1).mean(1)
    return ConsistencyTerms(per_item, target.float())


# weigh(batch, pipe, terms, run) -> (B,) weights of the per-item losses (reward-weighted distillation, rwd.py);
# run is the TrainingRun (accelerator, step), for gathering across processes and logging
Weigher = Callable[[dict, RemovalPipeline, ConsistencyTerms, TrainingRun], torch.Tensor]


def train_lcm(cfg: LCMConfig) -> dict:
    """Distill and write a bundle (the SFT UNet + ``lcm_lora/``) to ``cfg.out``. Returns {"losses": [...]}."""
    return distill(cfg, "lcm")


def distill(cfg: LCMConfig, tag: str, weigh: Weigher | None = None) -> dict:
    """The LCM-LoRA distillation loop; the loss is ``mean_i w_i · loss_i`` with ``w = weigh(...)`` (1 without).

    Logs and checkpoints under ``tag``; the bundle's provenance records the run under ``tag``.
    """
    from peft import LoraConfig

    bundle = load_bundle(cfg.bundle)  # any earlier LoRA is fused: we distill what the bundle serves
    accelerator = make_accelerator(cfg, tag)
    unet, vae = bundle.unet, bundle.vae.to(accelerator.device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    config = bundle.config.model_copy(update={"resolution": cfg.resolution})
    dataset = TripletDataset(read_meta(cfg.meta), cfg.resolution, cfg.dilate_range)
    run = start_training(accelerator, cfg, unet, dataset, tag)
    unet = run.model
    pipe = RemovalPipeline(unet, vae, bundle.conditioning, config, accelerator.device, torch.float32, torch.float32)

    alphas = alphas_cumprod(config.scheduler).to(accelerator.device)
    total_t = len(alphas)
    skip = total_t // cfg.num_ddim_timesteps
    ddim_timesteps = torch.arange(1, cfg.num_ddim_timesteps + 1, device=accelerator.device) * skip - 1
    raw = accelerator.unwrap_model(unet)
    while run.step < cfg.max_steps:
        batch = next(run.batches)
        with torch.no_grad():
            latents = pipe.encode(batch["gt"])
            mask_latent, masked_latents = pipe.condition_inputs(batch["source"], batch["mask"])
        terms = consistency_terms(cfg, pipe, raw, latents, mask_latent, masked_latents, alphas, ddim_timesteps,
                                  skip, accelerator)
        if weigh is None:
            loss = terms.loss.mean()
        else:
            loss = (weigh(batch, pipe, terms, run).to(terms.loss) * terms.loss).mean()
        run.update(loss)
    run.bar.close()

    if accelerator.is_main_process:
        provenance = {**config.provenance, tag: {"config": cfg.model_dump(mode="json"), "steps": run.step,
                                                 "final_loss": run.final_loss}}
        save_lcm_bundle(cfg, raw, config.model_copy(update={"provenance": provenance, "name": cfg.name}))
    accelerator.end_training()
    return {"losses": run.losses}


def save_lcm_bundle(cfg: LCMConfig, raw: Any, config: BundleConfig) -> None:
    """Write ``cfg.out``: the bundle ``cfg.bundle``'s (fused) UNet, VAE and conditioning, and the student's
    LoRA (peft state of ``raw``, alpha/r folded into B) as ``lcm_lora/`` in diffusers format. ``config`` is
    written as given: :func:`distill` passes the teacher's, so its scheduler (prediction type) is kept."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    lora = get_peft_model_state_dict(raw)
    scale = (cfg.lora_alpha or cfg.lora_rank) / cfg.lora_rank
    if scale != 1:  # the file carries no alphas and loads at scale 1: fold alpha/r into B
        lora = {k: v * scale if ".lora_B." in k else v for k, v in lora.items()}
    lora = convert_state_dict_to_diffusers(lora)
    base = load_bundle(cfg.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, unet_lora_layers=lora)
        save_bundle(cfg.out, config=config, unet=base.unet, vae=base.vae, conditioning=base.conditioning,
                    lora_dir=Path(tmp), detector=base.detector)
