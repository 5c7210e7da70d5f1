"""RORem removal on a batch of square crops: masked source -> VAE encode -> LCM steps -> VAE decode.

Semantics (RORem, arXiv 2501.00740, on SDXL-inpainting): the UNet input is the concatenation of the
noisy latent (C), the mask resized to latent size (1) and the latent of the masked source (C):
``x_s * (1 - m)`` for RORem, or the hole pre-filled by Telea when the bundle says ``masked_source:
telea`` (:mod:`cleanplate.masked_source`); the UNet predicts ε, x0 or v as the bundle's scheduler
``prediction_type`` says (:mod:`cleanplate.sampling`); the prompt is empty and guidance is 1, so the text conditioning is the bundle's
precomputed constant. The 4-step sampler is diffusers' ``LCMScheduler`` (Luo et al., LCM-LoRA,
arXiv 2311.05556), run through :mod:`cleanplate.sampling` so that every engine draws the same noise. The same UNet class and call serve a real SDXL-inpainting/RORem UNet unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import options
from .bundle import Bundle, BundleConfig, NullConditioning, load_bundle
from .errors import ErrorCode, InputError
from .masked_source import masked_source
from .sampling import LCMStep, lcm_schedule, lcm_step, sampling_noise

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_STEPS = options.MAX_STEPS  # declared with the other removal options (cleanplate/options.py)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU. Raises InputError for CUDA on a machine without it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA device is available", code=ErrorCode.BAD_OPTION)
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"fp32" | "fp16" | "bf16" (or a torch dtype). fp16 on CPU is refused (slow and unsupported ops)."""
    resolved = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in DTYPES.values():
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}", code=ErrorCode.BAD_OPTION)
    if resolved is torch.float16 and device.type == "cpu":
        raise InputError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU", code=ErrorCode.BAD_OPTION)
    return resolved


def _no_stage(name: str) -> None:
    return None


@dataclass
class RemovalPipeline:
    """A bundle's UNet and VAE on one device, ready to remove on batches of crops.

    Create with :meth:`from_bundle`. Thread-safe for concurrent calls (a fresh scheduler per call,
    no mutable state on ``self`` during a call).
    """

    unet: Any
    vae: Any
    conditioning: NullConditioning
    config: BundleConfig
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    discriminator: Any = None  # cleanplate.discriminator.Discriminator, when the bundle has one
    _schedules: dict[int, list[LCMStep]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | str | Path | None = None,
        *,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "fp32",
        channels_last: bool = False,
    ) -> RemovalPipeline:
        """Load (if given a path or None = default bundle) and place the models.

        fp16 runs the VAE in fp32 when its config says ``force_upcast`` (the SDXL VAE overflows in fp16).
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        vae_dt = torch.float32 if dt is torch.float16 and b.vae.config.get("force_upcast", False) else dt
        # Cast only when needed: diffusers warns on every .to(dtype), even a no-op one.
        unet = b.unet.to(dev) if b.unet.dtype == dt else b.unet.to(dev, dt)
        vae = b.vae.to(dev) if b.vae.dtype == vae_dt else b.vae.to(dev, vae_dt)
        disc = b.discriminator.to(dev, dt) if b.discriminator is not None else None
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
            vae = vae.to(memory_format=torch.channels_last)
            disc = disc.to(memory_format=torch.channels_last) if disc is not None else None
        return cls(unet, vae, b.conditioning, b.config, dev, dt, vae_dt, disc)

    @property
    def resolution(self) -> int:
        """Model input side R in px (square crops of R x R)."""
        return self.config.resolution

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis: 8 for SDXL's VAE, 4 for the default bundle's."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- VAE ---------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> scaled latents (B,C,H/f,W/f) in the UNet dtype (posterior mode)."""
        dist = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist
        latents = dist.mode()
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B,C,h,w) -> images (B,3,h*f,w*f) float32 in [-1,1]."""
        shift = self.vae.config.get("shift_factor") or 0.0
        z = latents.to(self.vae_dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    # -- UNet ----------------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon", "v_prediction" or "sample" (the bundle's scheduler config)."""
        return str(self.config.scheduler.get("prediction_type", "epsilon"))

    def masked_image(self, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The conditioning image (B,3,H,W) in [-1,1] of the bundle's ``masked_source`` fill.

        source (B,3,H,W) in [-1,1] (uint8 crops scaled, so the round trip to uint8 is exact), mask
        (B,1,H,W) in {0,1}. ``zero`` stays in torch (differentiable); ``telea`` / ``ns`` run
        :func:`cleanplate.masked_source.masked_source` on the CPU, as the Triton model does.
        """
        if self.config.masked_source == "zero":
            return source * (1.0 - mask)  # RORem: x_s * (1 - m); masked pixels become 0 (mid-grey)
        crops = ((source.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        filled = masked_source(crops.permute(0, 2, 3, 1).cpu().numpy(), mask[:, 0].detach().cpu().numpy() > 0.5,
                               self.config.masked_source)
        return torch.from_numpy(filled).permute(0, 3, 1, 2).to(source.device, source.dtype)

    def condition_inputs(self, source: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask at latent size (B,1,h,w) and masked-source latent (B,C,h,w), as SDXL-inpainting expects.

        source (B,3,H,W) in [-1,1], mask (B,1,H,W) in {0,1} (1 = remove); see :meth:`masked_image`.
        """
        masked_latents = self.encode(self.masked_image(source, mask))
        mask_latent = F.interpolate(mask.float(), size=masked_latents.shape[-2:])  # nearest, as diffusers
        return mask_latent.to(self.device, self.dtype), masked_latents

    def unet_forward(
        self, latents: torch.Tensor, t: torch.Tensor | int, mask_latent: torch.Tensor, masked_latents: torch.Tensor,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """One UNet output (B,C,h,w): UNet(cat(latent, mask, masked latent), t, empty-prompt conditioning);
        ε, x0 or v as :attr:`prediction_type` says.

        ``cross_attention_kwargs`` go to the attention processors (the RL trainers' spatial matting)."""
        batch = latents.shape[0]
        cond = self.conditioning
        hidden = cond.prompt_embeds.to(self.device, self.dtype).expand(batch, -1, -1)
        added = {
            "text_embeds": cond.pooled_prompt_embeds.to(self.device, self.dtype).expand(batch, -1),
            "time_ids": NullConditioning.add_time_ids(self.resolution).to(self.device, self.dtype).expand(batch, -1),
        }
        x = torch.cat([latents, mask_latent, masked_latents], dim=1)
        extra = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs is not None else {}
        return self.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False, **extra)[0]

    @property
    def threshold(self) -> float | None:
        """The discriminator's calibrated pass threshold on the score, None without a discriminator."""
        return None if self.discriminator is None else float(self.discriminator.threshold)

    @torch.inference_mode()
    def score(self, result: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Discriminator scores of removal results (RORem's quality discriminator).

        Args:
            result: (B,3,R,R) float in [-1,1], the cleaned crops.
            source: (B,3,R,R) float in [-1,1], the crops before removal.
            mask: (B,1,R,R) float in {0,1}, 1 = removed region (the dilated mask).
        Returns:
            (B,) float32 scores in [0,1] on the CPU; higher = cleaner removal, not a probability.
        Raises:
            InputError: the bundle has no discriminator, or the shapes disagree.
        """
        if self.discriminator is None:
            raise InputError("this bundle has no discriminator, so nothing can be scored",
                             code=ErrorCode.NO_DISCRIMINATOR)
        if result.shape != source.shape or result.ndim != 4 or mask.shape != (result.shape[0], 1, *result.shape[2:]):
            raise InputError(f"expected result and source (B,3,H,W) and mask (B,1,H,W), got {tuple(result.shape)}, "
                             f"{tuple(source.shape)} and {tuple(mask.shape)}", code=ErrorCode.BAD_OPTION)
        z_result = self.encode(result.to(self.device))
        z_source = self.encode(source.to(self.device))
        mask_latent = self.discriminator.mask_to_latent(mask.to(self.device), self.vae_scale_factor).to(self.dtype)
        crops = [x.to(self.device, self.dtype) for x in (result, mask, source)] if self.discriminator.takes_crops else []
        return torch.sigmoid(self.discriminator(z_result, mask_latent, z_source, *crops)).float().cpu()

    def schedule(self, steps: int) -> list[LCMStep]:
        """The ``steps``-step LCM schedule of the bundle's scheduler config (cached)."""
        if steps not in self._schedules:
            self._schedules[steps] = lcm_schedule(self.config.scheduler, steps)
        return self._schedules[steps]

    @torch.inference_mode()
    def __call__(
        self,
        source: torch.Tensor,
        mask: torch.Tensor,
        *,
        seeds: Sequence[int],
        steps: int | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> torch.Tensor:
        """Remove the masked region from a batch of model-size crops.

        Args:
            source: (B,3,R,R) float in [-1,1], R = bundle resolution (any multiple of the VAE factor works).
            mask: (B,1,R,R) float in {0,1}; 1 marks pixels to remove.
            seeds: B ints >= 0; item i's noise is ``sampling_noise(seeds[i], ...)`` (numpy PCG64), so a
                result does not depend on batch composition, device or engine (Triton draws the same).
            steps: LCM steps, 1..50 (default: the bundle's: 4 for RORem, 1 for the default bundle).
            on_stage: optional timing hook, called with the name of each stage as it ends: "vae_encode",
                "noise", "unet_step_1" .. "unet_step_N" (UNet + LCM update), "vae_decode". It does not
                change the result (``cleanplate bench latency`` synchronises the device and reads a clock in it).
        Returns:
            (B,3,R,R) float32 in [-1,1] on the pipeline device: the decoded latent, or with the bundle's
            ``decode_residual`` the conditioning image plus the decoded correction x̃_s + s·(D(ẑ) − D(E(x̃_s)))
            (s = the bundle's ``residual_scale``).
            Outside the mask it is not the source, so callers composite it back
            (see :func:`cleanplate.remover.remove`).
        Raises:
            InputError: bad steps, seed count or shapes.
        """
        steps = self.config.steps if steps is None else int(steps)
        if not 1 <= steps <= MAX_STEPS:
            raise InputError(f"steps must be in 1..{MAX_STEPS}, got {steps}", code=ErrorCode.BAD_OPTION)
        if source.ndim != 4 or source.shape[1] != 3 or mask.shape != (source.shape[0], 1, *source.shape[2:]):
            raise InputError(f"expected source (B,3,H,W) and mask (B,1,H,W), got {tuple(source.shape)} and "
                             f"{tuple(mask.shape)}", code=ErrorCode.BAD_OPTION)
        if len(seeds) != source.shape[0] or any(int(s) < 0 for s in seeds):
            raise InputError(f"need {source.shape[0]} seeds >= 0 for a batch of {source.shape[0]}, got {list(seeds)}",
                             code=ErrorCode.BAD_OPTION)

        mark = on_stage or _no_stage
        source, mask = source.to(self.device), mask.to(self.device)
        masked = self.masked_image(source, mask)
        masked_latents = self.encode(masked)
        mask_latent = F.interpolate(mask.float(), size=masked_latents.shape[-2:]).to(self.dtype)  # as condition_inputs
        mark("vae_encode")
        noise = np.stack([sampling_noise(int(s), steps, masked_latents.shape[1:]) for s in seeds], axis=1)
        noise = torch.from_numpy(noise).to(self.device, self.dtype)  # (steps, B, C, h, w)
        mark("noise")
        latents = noise[0]  # LCM starts from pure noise (strength 1, init_noise_sigma 1)
        for k, step in enumerate(self.schedule(steps)):
            output = self.unet_forward(latents, step.timestep, mask_latent, masked_latents)
            latents = lcm_step(step, latents, output, None if step.last else noise[k + 1])
            mark(f"unet_step_{k + 1}")
        if self.config.decode_residual:
            # x̃_s + D(ẑ) − D(E(x̃_s)): the VAE's reconstruction error of the conditioning image cancels
            fill, recon = self.decode(torch.cat([latents, masked_latents])).chunk(2)
            images = (masked.float() + self.config.residual_scale * (fill - recon)).clamp(-1, 1)
        else:
            images = self.decode(latents)
        mark("vae_decode")
        return images
