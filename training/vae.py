"""`cleanplate train vae`: a small AutoencoderKL for bundles trained from scratch.

A real deployment reuses SDXL's VAE (``bundle from-rorem``); the default bundle is trained here on CPU,
so it needs its own. Loss: L1 + MSE reconstruction of the posterior mode (a plain autoencoder; no KL term, which
a short CPU run cannot afford: Rombach et al. also keep the KL weight tiny, 1e-6). The latent scaling factor is
set to 1/std of the latents afterwards, as Rombach et al. (LDM, sec. 3.1 / app. G) do.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from pydantic import Field

from .common import TrainConfig, TripletDataset, load_model_config, make_accelerator, read_meta, start_training


class VAEConfig(TrainConfig):
    vae_config: str = Field("tiny_vae", description="diffusers AutoencoderKL config: JSON path or configs/ name")
    crop: int = Field(128, ge=16, description="random crop side for training (the VAE is convolutional)")
    lr: float = 1e-3


def _random_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if side >= min(h, w):
        return x
    y, xx = random.randint(0, h - side), random.randint(0, w - side)
    return x[..., y : y + side, xx : xx + side]


def train_vae(cfg: VAEConfig) -> dict:
    """Train, then write ``cfg.out`` as a diffusers ``AutoencoderKL`` directory. Returns {"losses": [...]}."""
    from diffusers import AutoencoderKL

    accelerator = make_accelerator(cfg, "vae")
    vae = AutoencoderKL.from_config(load_model_config(cfg.vae_config))
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    dataset = TripletDataset(read_meta(cfg.meta), cfg.resolution, cfg.dilate_range)
    run = start_training(accelerator, cfg, vae, dataset, "vae")
    vae = run.model
    vae.train()
    while run.step < cfg.max_steps:
        batch = next(run.batches)
        # The encoder must also see what the remover feeds it: the source with the mask greyed out.
        masked = batch["source"] * (1 - batch["mask"])
        images = torch.cat([batch["gt"], batch["source"], masked])[torch.randperm(3 * len(batch["gt"]))[: cfg.batch_size]]
        images = _random_crop(images, cfg.crop)
        with accelerator.autocast():
            # forward() (not encode/decode) so DDP sees the call and syncs gradients. The posterior mode,
            # not a sample: at init the posterior std is ~1 and drowns the signal, which stalls a short run.
            recon = vae(images, sample_posterior=False).sample
            loss_rec = F.l1_loss(recon.float(), images) + F.mse_loss(recon.float(), images)
        run.update(loss_rec)
    run.bar.close()

    vae = accelerator.unwrap_model(vae).eval()
    if accelerator.is_main_process:
        with torch.no_grad():
            sample = torch.cat([dataset[i]["gt"][None] for i in range(min(64, len(dataset)))])
            std = vae.encode(sample).latent_dist.mode().std().item()
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        vae.save_pretrained(cfg.out, safe_serialization=True)
    accelerator.end_training()
    return {"losses": run.losses, "scaling_factor": vae.config.scaling_factor}
