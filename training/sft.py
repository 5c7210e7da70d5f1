"""`cleanplate train sft`: RORem's supervised fine-tuning of the inpainting UNet.

Loss (RORem, arXiv 2501.00740, eq. 1; the DDPM ε-objective of Ho et al. 2020):
    L = E_{t, ε} || ε - ε_θ( cat(z_t, m↓, E(x_s ⊙ (1 - m))), t, c_∅ ) ||²
with z_t = sqrt(ᾱ_t) E(x_gt) + sqrt(1 - ᾱ_t) ε, m↓ the mask at latent size, c_∅ the empty-prompt
conditioning. The VAE is frozen. Start from a bundle (RORem starts from SDXL-inpainting) or, for the
small default model, from a UNet config plus a VAE trained by `cleanplate train vae`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from cleanplate.bundle import BundleConfig, NullConditioning, load_bundle, save_bundle
from cleanplate.errors import InputError
from cleanplate.pipeline import RemovalPipeline

from .common import (
    TrainConfig, TripletDataset, alphas_cumprod, load_model_config, make_accelerator, read_meta, start_training,
)


class SFTConfig(TrainConfig):
    init_bundle: Path | None = Field(None, description="bundle to fine-tune (e.g. one made by bundle from-rorem)")
    unet_config: str | None = Field(None, description="train from scratch: UNet config (JSON path or configs/ name)")
    vae: Path | None = Field(None, description="with unet_config: a vae/ directory from `train vae`")
    name: str = "cleanplate-sft"
    resolution: int = Field(256, ge=64, description="training crop side in px; also the bundle's (>= 64)")
    lr: float = 1e-4


def build_pipeline(cfg: SFTConfig) -> tuple[RemovalPipeline, BundleConfig]:
    """The starting UNet/VAE/conditioning, from a bundle or from configs (zero text conditioning)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if cfg.init_bundle is not None:
        b = load_bundle(cfg.init_bundle)
        unet, vae, cond = b.unet, b.vae, b.conditioning
        bundle_cfg = b.config.model_copy(update={"lcm_lora": "none", "resolution": cfg.resolution})
    elif cfg.unet_config is not None and cfg.vae is not None:
        torch.manual_seed(cfg.seed)  # the initial weights follow the seed (make_accelerator seeds only later)
        unet = UNet2DConditionModel.from_config(load_model_config(cfg.unet_config))
        vae = AutoencoderKL.from_pretrained(cfg.vae)
        # A model trained without text encoders: the "empty prompt" is all zeros of the right shapes.
        text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond = NullConditioning(torch.zeros(1, 77, unet.config.cross_attention_dim), torch.zeros(1, text_dim))
        bundle_cfg = BundleConfig(name=cfg.name, resolution=cfg.resolution)
    else:
        raise InputError("train sft needs init_bundle, or unet_config and vae", code="bad_option")
    if unet.config.in_channels != 2 * vae.config.latent_channels + 1:
        raise InputError(f"UNet in_channels {unet.config.in_channels} does not fit VAE latent_channels "
                         f"{vae.config.latent_channels} (needs 2C+1)", code="bad_option")
    vae.requires_grad_(False).eval()
    unet.requires_grad_(True).train()  # load_bundle freezes it
    return RemovalPipeline(unet, vae, cond, bundle_cfg, torch.device("cpu"), torch.float32, torch.float32), bundle_cfg


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT and write a bundle to ``cfg.out``. Returns {"losses": [...per step]}."""
    pipe, bundle_cfg = build_pipeline(cfg)
    accelerator = make_accelerator(cfg, "sft")
    pipe.device = accelerator.device
    pipe.vae.to(accelerator.device)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    dataset = TripletDataset(read_meta(cfg.meta), cfg.resolution, cfg.dilate_range)
    run = start_training(accelerator, cfg, pipe.unet, dataset, "sft")
    pipe.unet = run.model
    alphas = alphas_cumprod(bundle_cfg.scheduler).to(accelerator.device)
    while run.step < cfg.max_steps:
        batch = next(run.batches)
        with torch.no_grad():
            latents = pipe.encode(batch["gt"])
            mask_latent, masked_latents = pipe.condition_inputs(batch["source"], batch["mask"])
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(alphas), (latents.shape[0],), device=latents.device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with accelerator.autocast():
            eps = pipe.unet_forward(noisy, t, mask_latent, masked_latents)
        loss = F.mse_loss(eps.float(), noise)
        run.update(loss)
    run.bar.close()

    if accelerator.is_main_process:
        final = accelerator.unwrap_model(run.model).eval()
        provenance = {**bundle_cfg.provenance, "sft": {"config": cfg.model_dump(mode="json"), "steps": run.step,
                                                        "final_loss": run.final_loss}}
        save_bundle(cfg.out, config=bundle_cfg.model_copy(update={"provenance": provenance, "name": cfg.name}),
                    unet=final, vae=pipe.vae.to("cpu"), conditioning=pipe.conditioning)
    accelerator.end_training()
    return {"losses": run.losses}
