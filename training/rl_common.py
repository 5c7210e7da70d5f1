"""Pieces the RL trainers share (`train dpo`, `train rwd`, `train grpo`): the policy LoRA and its frozen
reference, the bundle they write, RePainter's spatial-matting attention, Gaussian log-probabilities of the
stochastic LCM step, group-relative normalisation and the local-global composite reward.

Policy and reference. Every trainer adds a LoRA (peft, the targets of :data:`.lcm.LORA_TARGETS`) to the
UNet that the starting bundle serves (an ``lcm_lora/`` in it is fused first). peft initialises B = 0, so
at step 0 the policy *is* the reference; the reference is the same module with its adapters disabled
(:func:`reference_model`), as in diffusers' Diffusion-DPO LoRA recipe: no second copy of the UNet.

Output. :func:`save_policy_bundle` fuses the trained LoRA into the UNet (W + BA) and writes a complete
bundle (``lcm_lora`` "fused" when the starting bundle had an LCM-LoRA, else "none"; the starting bundle's
discriminator and its calibration carried over), so ``cleanplate remove --bundle OUT``, the gateway and
``cleanplate export onnx OUT`` load it unchanged.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from cleanplate.bundle import DISCRIMINATOR_DIR, BundleConfig, attach_discriminator, load_bundle, save_bundle
from cleanplate.pipeline import RemovalPipeline

from .common import TrainConfig
from .lcm import LORA_TARGETS

LOG_2PI = math.log(2 * math.pi)


class RLConfig(TrainConfig):
    """Fields the RL trainers share (on top of :class:`.common.TrainConfig`)."""

    bundle: Path = Field(description="starting bundle: the policy's base and, LoRA disabled, the reference")
    lora_rank: int = Field(16, ge=1, description="rank of the trained LoRA (fused into the UNet of the output)")
    lora_alpha: int | None = Field(None, description="default: = rank (scale 1)")
    name: str = "cleanplate-rl"
    resolution: int = Field(256, ge=64, description="training crop side in px; also the output bundle's (>= 64)")
    lr: float = 1e-5


# -- policy / reference ------------------------------------------------------------------------------
def add_policy_lora(unet: Any, rank: int, alpha: int | None) -> None:
    """Freeze ``unet`` and add a trainable peft LoRA (B = 0 at init: the policy starts as the reference)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))


@contextmanager
def reference_model(raw_unet: Any) -> Iterator[None]:
    """Within the block the UNet (unwrapped, carrying the policy LoRA) runs as the frozen reference."""
    raw_unet.disable_adapters()
    try:
        yield
    finally:
        raw_unet.enable_adapters()


def save_policy_bundle(cfg: RLConfig, raw_unet: Any, config: BundleConfig) -> Path:
    """Fuse the trained LoRA of ``raw_unet`` into the starting bundle's UNet and write ``cfg.out``.

    The fused UNet computes what the policy computed in training (within float rounding); ``config`` is
    written as given except ``lcm_lora`` ("fused" if the starting bundle had an LCM-LoRA, else "none").
    A discriminator of the starting bundle is copied with its calibration.
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from cleanplate.bundle import load_lora_into_unet

    lora = get_peft_model_state_dict(raw_unet)
    scale = (cfg.lora_alpha or cfg.lora_rank) / cfg.lora_rank
    if scale != 1:  # loaded at scale 1 below: fold alpha/r into B
        lora = {k: v * scale if ".lora_B." in k else v for k, v in lora.items()}
    base = load_bundle(cfg.bundle)  # fused: the UNet the policy started from
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(lora))
        load_lora_into_unet(base.unet, tmp, adapter_name="policy")
    base.unet.fuse_lora(lora_scale=1.0)
    base.unet.unload_lora()
    lcm = "fused" if base.config.lcm_lora != "none" else "none"
    out = save_bundle(cfg.out, config=config.model_copy(update={"lcm_lora": lcm}), unet=base.unet, vae=base.vae,
                      conditioning=base.conditioning, detector=base.detector)
    if base.discriminator is not None:
        disc_config = json.loads((Path(cfg.bundle) / DISCRIMINATOR_DIR / "config.json").read_text())
        attach_discriminator(out, base.discriminator, disc_config.get("calibration") or {})
    return out


def discriminator_scorer(bundle_dir: str | Path, device: torch.device | str, what: str) -> RemovalPipeline:
    """A pipeline holding only a bundle's VAE and discriminator on ``device``, for
    :meth:`RemovalPipeline.score` (no UNet is moved). Raises InputError when the bundle has no
    discriminator (``what`` names the option that needs it)."""
    from cleanplate.errors import ErrorCode, InputError

    b = load_bundle(bundle_dir)
    if b.discriminator is None:
        raise InputError(f"{what} needs a bundle with a discriminator; {bundle_dir} has none (set reward_bundle)",
                         code=ErrorCode.BAD_OPTION)
    device = torch.device(device)
    return RemovalPipeline(None, b.vae.to(device), b.conditioning, b.config, device, torch.float32, torch.float32,
                           b.discriminator.to(device))


def unet_output(pipe: RemovalPipeline, latents: torch.Tensor, t: torch.Tensor | int,
                mask_latent: torch.Tensor, masked_latents: torch.Tensor,
                matting_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's output (B,C,h,w) as :meth:`RemovalPipeline.unet_forward` (ε, x0 or v, as
    ``pipe.prediction_type`` says), with the spatial-matting mask (B,1,h,w) in {0,1} handed to the attention
    processors (``cross_attention_kwargs``, which diffusers also passes through gradient checkpointing).
    None = no matting bias."""
    kwargs = {"matting_mask": matting_mask} if matting_mask is not None else None
    return pipe.unet_forward(latents, t, mask_latent, masked_latents, cross_attention_kwargs=kwargs)


# -- spatial matting (RePainter) ----------------------------------------------------------------------
class SpatialMattingProcessor:
    """Attention processor for diffusers' ``Attention``: SDPA as ``AttnProcessor2_0``, plus RePainter's
    spatial matting (Guo et al. 2025, arXiv 2510.07721) in self-attention layers.

    For a query token inside the mask and a key token outside it, ``bias`` is added to the attention logit:
        logits[b, :, q, k] += bias · m_q · (1 - m_k)
    (softmax is shift-invariant per query, so this equals lowering the logits of masked keys by ``bias``):
    the fill attends to the background instead of re-creating the masked content. ``m`` is the matting
    mask (B,1,h,w) at latent size, max-pooled to each layer's token grid (a token is masked when any
    latent cell under it is). Cross-attention (the constant empty prompt) and calls without a mask run
    plain SDPA. Set one instance on every attention layer (``unet.set_attn_processor(proc)``) for rollouts
    and updates alike, so the log-probability of the update is that of the policy that sampled.
    Memory: a (B,1,N,N) bias per self-attention layer with N tokens (N = 4096 at SDXL's 64² level).
    """

    def __init__(self, bias: float) -> None:
        self.bias = float(bias)

    @staticmethod
    def token_mask(matting_mask: torch.Tensor, tokens: int) -> torch.Tensor:
        """(B,1,h,w) {0,1} -> (B,N) {0,1} on the token grid of N = ceil(h/s)·ceil(w/s) tokens (s a power of 2).

        Raises ValueError when no power-of-two downsampling of (h, w) has N cells.
        """
        h, w = matting_mask.shape[-2:]
        s = 1
        while s <= max(h, w):
            size = (math.ceil(h / s), math.ceil(w / s))
            if size[0] * size[1] == tokens:
                return F.adaptive_max_pool2d(matting_mask.float(), size).flatten(1)
            s *= 2
        raise ValueError(f"no token grid of {tokens} tokens for a {h}x{w} matting mask")

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 matting_mask: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        self_attention = encoder_hidden_states is None
        batch_size, sequence_length, _ = hidden_states.shape if self_attention else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if self_attention and matting_mask is not None and self.bias != 0.0:
            m = self.token_mask(matting_mask, hidden_states.shape[1]).to(hidden_states.dtype)
            matting = (self.bias * m[:, None, :, None] * (1.0 - m[:, None, None, :]))  # (B,1,N,N)
            attention_mask = matting if attention_mask is None else attention_mask + matting
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# -- log-probabilities and advantages -------------------------------------------------------------------
def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Elementwise log N(x; mean, std²): -(x - mean)²/(2 std²) - log std - log(2π)/2, float32, x's shape.

    The stochastic LCM step x_{t'} = sqrt(ᾱ_{t'}) f_θ(x_t, t) + sqrt(1 - ᾱ_{t'}) ε (LCMScheduler.step) is
    exactly this Gaussian with mean sqrt(ᾱ_{t'}) f_θ(x_t, t) and std sqrt(1 - ᾱ_{t'}). std must be > 0.
    """
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    diff = x.float() - mean.float()
    return -(diff**2) / (2 * std**2) - math.log(std) - 0.5 * LOG_2PI


def region_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean of (N,C,h,w) ``values`` over the cells where ``region`` (N,1,h,w) in [0,1] is on -> (N,)
    (0 where a region is empty)."""
    weight = region.to(values.dtype).expand_as(values)
    return (values * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


def group_normalize(values: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-relative normalisation (Shao et al. 2024, DeepSeekMath, eq. 3's Â):
    (r - mean_group) / (std_group + eps) for (N,) values laid out as N/G consecutive groups of G.
    A group whose values are all equal gets 0."""
    groups = values.float().view(-1, group_size)
    mean = groups.mean(1, keepdim=True)
    std = groups.std(1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


# -- the local-global composite reward (RePainter) -----------------------------------------------------
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
REWARD_TERMS = ("global", "local", "reinsert")


def global_fidelity(result: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global term: minus the mean squared error to the source *outside* the mask, (N,) in [-4, 0].

    result/source (N,3,R,R) in [-1,1], mask (N,1,R,R) {0,1}. ``result`` is the decoded model output before
    compositing (after compositing it would be exact outside the mask): it rewards a policy that keeps the
    background, so the feathered seam and the context it reads stay intact.
    """
    keep = (1.0 - mask).expand_as(result)
    return -(((result - source) ** 2) * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1.0)


def _high_pass(x: torch.Tensor) -> torch.Tensor:
    grey = x.mean(1, keepdim=True)
    return grey - F.avg_pool2d(grey, 5, stride=1, padding=2, count_include_pad=False)


def nothing_reinserted(result: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """"Nothing re-inserted" term: minus the positive part of the normalised cross-correlation of the
    high-pass (5x5 box) luminance of result and source inside the mask (eroded by the filter's 2 px, unless
    that empties it), (N,) in [-1, 0].

    A fill that re-draws the removed overlay (its strokes and edges) correlates with the source there and
    scores near -1; a background fill scores near 0. A stand-in for RePainter's semantic term (which asks a
    vision-language model whether the object is still there); no such model is loaded here.
    """
    a, b = _high_pass(result), _high_pass(source)
    m = mask.float()
    # the 5x5 filter reads 2 px across the mask edge, where any fill meets the background: leave that out
    inner = -F.max_pool2d(-m, 5, stride=1, padding=2)
    m = torch.where(inner.flatten(1).sum(1).view(-1, 1, 1, 1) > 0, inner, m)
    n = m.flatten(1).sum(1).clamp_min(1.0)
    a = a - ((a * m).flatten(1).sum(1) / n).view(-1, 1, 1, 1)
    b = b - ((b * m).flatten(1).sum(1) / n).view(-1, 1, 1, 1)
    cov = (a * b * m).flatten(1).sum(1)
    var = ((a * a * m).flatten(1).sum(1) * (b * b * m).flatten(1).sum(1)).sqrt()
    return -(cov / (var + 1e-8)).clamp_min(0.0)


class CompositeReward:
    """RePainter's local-global composite reward (Guo et al. 2025, arXiv 2510.07721), as three terms:

    * ``global``: :func:`global_fidelity` outside the mask;
    * ``local``: the RORem discriminator's score in [0,1] of the composited result (result inside the
      mask, source outside, as the quality gate scores a served removal);
    * ``reinsert``: :func:`nothing_reinserted` inside the mask.

    Calling it on (result, source, mask) — (N,3,R,R) in [-1,1], (N,3,R,R) in [-1,1], (N,1,R,R) {0,1} —
    returns {term: (N,) float32 on the CPU}. The trainer normalises each term within its group before
    weighting (:func:`combine_rewards`), so no term's scale dominates by units alone.
    """

    def __init__(self, scorer: RemovalPipeline | None) -> None:
        self.scorer = scorer  # a pipeline with a discriminator (its VAE and discriminator are used)

    def __call__(self, result: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"global": global_fidelity(result, source, mask).float().cpu(),
               "reinsert": nothing_reinserted(result, source, mask).float().cpu()}
        if self.scorer is not None:
            composited = result * mask + source * (1.0 - mask)
            out["local"] = self.scorer.score(composited, source, mask).clone()  # clone: leave inference mode
        return out


def combine_rewards(terms: dict[str, torch.Tensor], weights: dict[str, float], regions: dict[str, str] | None,
                    group_size: int) -> dict[str, torch.Tensor]:
    """Composite reward per region: Σ_term w_term · group_normalize(term), summed over the terms of each region.

    Args:
        terms: {name: (N,) raw values}, N = groups × group_size, groups consecutive.
        weights: {name: weight}; terms without a weight are ignored, weighted terms must be present.
        regions: {name: "edit" | "preserve"} for Edit-GRPO's region split, or None for one region "all".
        group_size: G.
    Returns:
        {region: (N,) float32} ("edit" and "preserve", or "all"); a region without terms gets zeros.
    Raises:
        KeyError: a weighted term is missing from ``terms`` or from ``regions``.
    """
    n = len(next(iter(terms.values())))
    out = {r: torch.zeros(n) for r in (("edit", "preserve") if regions is not None else ("all",))}
    for name, w in weights.items():
        if w == 0:
            continue
        if name not in terms:
            raise KeyError(f"reward term {name!r} has a weight but the reward function gave {sorted(terms)}")
        region = "all" if regions is None else regions[name]
        out[region] = out[region] + w * group_normalize(terms[name].float().cpu(), group_size)
    return out
