"""RORem's quality discriminator: is this removal result good?

Design (RORem, arXiv 2501.00740, sec. 3.2): the remover UNet's ``conv_in`` + down blocks + mid block
(initialised from the remover, adapted with a rank-4 LoRA) and a small convolutional head. Its input is
the concatenation ``(result latent, mask at latent size, source latent)`` -- the same 2C+1 channels as
the inpainting UNet's ``conv_in`` -- and it gives one logit per item. Our head also takes
``|result - source|`` inside the mask, pooled to the encoder's output grid (a departure from RORem: with
small data the frozen encoder's features alone did not learn the comparison). Scores are ``sigmoid(logit)`` in
[0, 1]; they are not calibrated probabilities, so each bundle stores a threshold calibrated on held-out
data (``cleanplate train discriminator``).

Bundle layout: ``discriminator/config.json`` (the UNet config, head width, VAE factor) and
``discriminator/model.safetensors`` (the encoder with its LoRA merged, the head, and the empty-prompt
conditioning), self-contained so that export can trace it with three tensor inputs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BundleError
from .imaging import write_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class UNetEncoder(nn.Module):
    """The contracting half of an SDXL-style ``UNet2DConditionModel``: conv_in, down blocks, mid block.

    Built from a UNet instance by taking (not copying) its modules, so parameter names equal the UNet's
    and a UNet state dict loads into it. The timestep is fixed at 0: the discriminator judges clean
    latents.
    """

    def __init__(self, unet: Any) -> None:
        super().__init__()
        cfg = unet.config
        if cfg.addition_embed_type not in (None, "text_time") or cfg.class_embed_type is not None:
            raise BundleError(f"discriminator needs an SDXL-style UNet (addition_embed_type text_time or none), "
                              f"got {cfg.addition_embed_type!r}")
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.add_time_proj = getattr(unet, "add_time_proj", None)
        self.add_embedding = getattr(unet, "add_embedding", None)
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        self.out_channels: int = cfg.block_out_channels[-1]
        self.norm_num_groups: int = cfg.norm_num_groups

    def forward(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor,
                time_ids: torch.Tensor) -> torch.Tensor:
        """sample (B,2C+1,h,w) -> features (B,C_mid,h/2^(n-1),w/2^(n-1)) (same computation as the UNet's first half)."""
        batch = sample.shape[0]
        t_emb = self.time_proj(torch.zeros(batch, device=sample.device)).to(sample.dtype)
        emb = self.time_embedding(t_emb)
        if self.add_embedding is not None:
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(batch, -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        x = self.conv_in(sample)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, _ = block(hidden_states=x, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                x, _ = block(hidden_states=x, temb=emb)
        if getattr(self.mid_block, "has_cross_attention", False):
            return self.mid_block(x, emb, encoder_hidden_states=encoder_hidden_states)
        return self.mid_block(x, emb)


class ScoreHead(nn.Module):
    """Small conv head: GroupNorm-SiLU on the encoder features, concatenated with ``extra`` maps, then
    Conv3x3-SiLU-Conv1x1 to a logit map and an attention map; the item logit is the attention-weighted
    mean of the logit map (softmax over positions), so it works at any resolution and can focus on the
    filled region."""

    def __init__(self, in_channels: int, extra_channels: int = 0, hidden: int = 128, groups: int = 32) -> None:
        super().__init__()
        self.norm = nn.Sequential(nn.GroupNorm(math.gcd(groups, in_channels), in_channels), nn.SiLU())
        self.net = nn.Sequential(nn.Conv2d(in_channels + extra_channels, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, 2, 1))

    def forward(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(B,C,h,w) features [+ (B,E,h,w) extra] -> (B,) logits."""
        x = self.norm(features)
        out = self.net(x if extra is None else torch.cat([x, extra], dim=1)).flatten(2)
        return (out[:, 0] * out[:, 1].softmax(dim=-1)).sum(dim=-1)


class Discriminator(nn.Module):
    """Scores removal results. Build with :meth:`from_unet` (training) or :func:`load_discriminator`.

    Attributes:
        vae_scale_factor: pixels per latent cell (8 for SDXL's VAE); used for the SDXL time_ids.
        threshold: calibrated pass threshold on the score (``score >= threshold`` passes).
    """

    def __init__(self, encoder: UNetEncoder, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                 *, unet_config: dict[str, Any], vae_scale_factor: int, head_channels: int = 128,
                 threshold: float = 0.5) -> None:
        super().__init__()
        self.encoder = encoder
        self.latent_channels = (int(unet_config["in_channels"]) - 1) // 2
        # The head also sees |result - source| inside the mask, pooled to the feature grid: the frozen
        # encoder's features alone were too weak a comparison signal to learn from on our small data.
        self.head = ScoreHead(encoder.out_channels, self.latent_channels + 1, head_channels, encoder.norm_num_groups)
        self.register_buffer("prompt_embeds", prompt_embeds.detach().float().clone())
        self.register_buffer("pooled_prompt_embeds", pooled_prompt_embeds.detach().float().clone())
        self.unet_config = dict(unet_config)
        self.vae_scale_factor = vae_scale_factor
        self.head_channels = head_channels
        self.threshold = threshold

    @classmethod
    def from_unet(cls, unet: Any, conditioning: Any, *, vae_scale_factor: int, head_channels: int = 128) -> Discriminator:
        """Initialise from a remover UNet (deep-copied; RORem starts the discriminator from the remover)."""
        import copy

        unet = copy.deepcopy(unet)
        return cls(UNetEncoder(unet), conditioning.prompt_embeds, conditioning.pooled_prompt_embeds,
                   unet_config=dict(unet.config), vae_scale_factor=vae_scale_factor, head_channels=head_channels)

    def forward(self, result_latent: torch.Tensor, mask_latent: torch.Tensor, source_latent: torch.Tensor) -> torch.Tensor:
        """Logits (B,) float for result latents (B,C,h,w), mask (B,1,h,w) in {0,1}, source latents (B,C,h,w)."""
        batch, _, h, w = result_latent.shape
        dtype = result_latent.dtype
        sample = torch.cat([result_latent, mask_latent.to(dtype), source_latent], dim=1)
        f = self.vae_scale_factor
        time_ids = torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]], device=sample.device, dtype=dtype)
        features = self.encoder(
            sample,
            self.prompt_embeds.to(dtype).expand(batch, -1, -1),
            self.pooled_prompt_embeds.to(dtype).expand(batch, -1),
            time_ids.expand(batch, -1),
        )
        masked_diff = (result_latent - source_latent).abs() * mask_latent.to(dtype)
        size = features.shape[-2:]
        extra = torch.cat([F.adaptive_avg_pool2d(masked_diff, size), F.adaptive_avg_pool2d(mask_latent.to(dtype), size)], 1)
        return self.head(features, extra).float()

    @staticmethod
    def mask_to_latent(mask: torch.Tensor, factor: int) -> torch.Tensor:
        """(B,1,H,W) {0,1} -> (B,1,H/f,W/f): a latent cell counts as masked if any of its pixels is (max-pool),
        so thin strokes of text survive the downsampling."""
        return F.max_pool2d(mask.float(), kernel_size=factor)

    def save(self, directory: str | Path, *, calibration: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created; files replaced atomically)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out / WEIGHTS_FILE)
        config = {"unet": self.unet_config, "vae_scale_factor": self.vae_scale_factor,
                  "head_channels": self.head_channels, "threshold": self.threshold, "calibration": calibration or {}}
        write_atomic(out / CONFIG_FILE, (json.dumps(config, indent=2, default=str) + "\n").encode())
        return out


def load_discriminator(directory: str | Path) -> Discriminator:
    """Load ``discriminator/`` (float32, CPU, eval mode). Raises BundleError naming a missing or bad file."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    root = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).exists():
            raise BundleError(f"discriminator is missing {name}: {root / name}")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
        unet_config = {k: v for k, v in config["unet"].items() if not k.startswith("_")}
        # The up blocks are never used: build the UNet on the meta device so they are not allocated (torch alone,
        # so the base install needs no accelerate); the encoder's tensors are assigned from the file below.
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
        tensors = load_file(str(root / WEIGHTS_FILE))
        disc = Discriminator(
            UNetEncoder(unet), tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], unet_config=config["unet"],
            vae_scale_factor=int(config["vae_scale_factor"]), head_channels=int(config["head_channels"]),
            threshold=float(config["threshold"]),
        )
        disc.load_state_dict(tensors, strict=True, assign=True)
        empty = [name for name, t in [*disc.named_parameters(), *disc.named_buffers()] if t.is_meta]
        if empty:
            raise ValueError(f"no weights in the file for {', '.join(empty[:3])}")
    except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot load discriminator from {root}: {exc}") from exc
    return disc.eval().requires_grad_(False)
