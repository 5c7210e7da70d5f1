"""RORem's quality discriminator: is this removal result good?

Design (RORem, arXiv 2501.00740, sec. 3.2): the remover UNet's ``conv_in`` + down blocks + mid block
(initialised from the remover, adapted with a rank-4 LoRA) and a small convolutional head. Its input is
the concatenation ``(result latent, mask at latent size, source latent)`` -- the same 2C+1 channels as
the inpainting UNet's ``conv_in`` -- and it gives one logit per item. Our head also takes
``|result - source|`` inside the mask, pooled to the encoder's output grid (a departure from RORem: with
small data the frozen encoder's features alone did not learn the comparison). Scores are ``sigmoid(logit)`` in
[0, 1]; they are not calibrated probabilities, so each bundle stores a threshold calibrated on held-out
data (``cleanplate train discriminator``).

Optional **statistics head** (ours, not RORem's): :func:`gate_statistics` measures, on the latents, how the
fill compares with the ring of context around it (gradient energy, spread and colour inside vs around the
hole, the seam, the hole's area, how much changed from the source), and a small MLP (:class:`StatsHead`) maps
those statistics plus the conv head's logit to the final logit. Why: judged on held-out photos, the conv
head alone did not rank the bundle's own fills (Spearman with in-mask PSNR -0.11), while the texture around
the hole predicts how well a fill worked (benchmarks/results/gate_features_probe.md). A result whose hole did
not change (nothing removed) fails outright (:data:`UNCHANGED_CHANGE`). With ``pixel_stats`` the head also
sees the same statistics measured on the crops' pixels (:func:`pixel_statistics`, three scales): then the
discriminator takes the crops (result, mask, source) as well as their latents. All of it is in the graph, so
ONNX export (three more inputs), Triton and ONNX Runtime score with it unchanged.

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


# Names of gate_statistics' columns, in order (stored in config.json so a reordering is caught at load).
STAT_NAMES = ("ring_texture", "fill_texture", "texture_gap", "abs_texture_gap", "log_area", "change",
              "change_x_ring_texture", "source_fill_texture", "colour_gap", "fill_spread", "ring_spread",
              "spread_gap", "seam", "seam_gap", "source_gap")
RING_CELLS = 2  # the context ring's width in latent cells (8 px at the default bundle's factor 4)
# With a statistics head, a hole whose latents changed less than this (gate_statistics' ``change``, log(1 + mean
# L1 distance)) scores sigmoid(UNCHANGED_LOGIT) ~ 0: an untouched source is exactly 0, every GT and removal on
# the calibration photos at least 0.28.
UNCHANGED_CHANGE = 0.05
UNCHANGED_LOGIT = -30.0
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
# Pixel statistics (a statistics head with ``pixel_stats``): gate_statistics on the crops themselves, at these
# average-pooled scales, each with an 8 px ring. The VAE's latents (1/4 size) blur a flat NS fill on a
# textured ground into its ring; the pixels keep it (held-out ROC AUC 0.85 -> 0.95, README).
PIXEL_SCALES = (1, 2, 4)
PIXEL_RING_PX = 8
PIXEL_STAT_NAMES = tuple(f"px{scale}_{name}" for scale in PIXEL_SCALES for name in STAT_NAMES)


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of (B,1,h,w) ``x`` under (B,1,h,w) ``weight`` in {0,1}, per item -> (B,); 0 for an empty weight."""
    return (x * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


def _gradient_magnitude(z: torch.Tensor) -> torch.Tensor:
    """(B,C,h,w) -> (B,1,h,w): Sobel gradient magnitude, L2 over x, y and channels (edges replicated)."""
    c = z.shape[1]
    kx = torch.tensor(_SOBEL_X, dtype=z.dtype, device=z.device).expand(c, 1, 3, 3)
    padded = F.pad(z, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx, groups=c), F.conv2d(padded, kx.transpose(-1, -2), groups=c)
    return (gx.square() + gy.square()).sum(1, keepdim=True).sqrt()


def gate_statistics(result_latent: torch.Tensor, mask_latent: torch.Tensor, source_latent: torch.Tensor,
                    ring_cells: int = RING_CELLS) -> torch.Tensor:
    """No-reference statistics of a removal in latent space, one row per item, columns :data:`STAT_NAMES`.

    Args:
        result_latent, source_latent: (B,C,h,w) latents of the result and source crops.
        mask_latent: (B,1,h,w) in {0,1}, the hole at latent size (:meth:`Discriminator.mask_to_latent`).
        ring_cells: width of the context ring around the hole (dilation by a square of side 2r+1, minus the hole).

    Returns:
        (B, len(STAT_NAMES)) in the latents' dtype. Texture = log(1 + mean Sobel magnitude), spread =
        log(1 + RMS distance from the region's mean latent), colour gap = log(1 + L1 distance of the mean
        latents in hole and ring), seam = texture on the hole's one-cell border, log_area = log of the hole's
        share (floored at 1e-4), change = log(1 + mean L1 |result - source| in the hole); ``*_gap`` are
        differences hole - ring. The features of benchmarks/results/gate_features_probe.md, measured on latents.
    """
    m = mask_latent.to(result_latent.dtype)
    ring = F.max_pool2d(m, 2 * ring_cells + 1, 1, ring_cells) - m
    border = F.max_pool2d(m, 3, 1, 1) + F.max_pool2d(-m, 3, 1, 1)  # dilation minus erosion
    grad = _gradient_magnitude(result_latent)
    ring_texture, fill_texture = _masked_mean(grad, ring).log1p(), _masked_mean(grad, m).log1p()
    source_texture = _masked_mean(_gradient_magnitude(source_latent), m).log1p()
    change = _masked_mean((result_latent - source_latent).abs().sum(1, keepdim=True), m).log1p()
    area = m.flatten(1).mean(1).clamp_min(1e-4).log()

    def region_mean(w: torch.Tensor) -> torch.Tensor:  # (B,C,1,1)
        return ((result_latent * w).flatten(2).sum(2) / w.flatten(2).sum(2).clamp_min(1.0))[..., None, None]

    fill_mean, ring_mean = region_mean(m), region_mean(ring)
    colour_gap = (fill_mean - ring_mean).abs().sum(1).flatten().log1p()
    fill_spread = _masked_mean((result_latent - fill_mean).square().sum(1, keepdim=True), m).sqrt().log1p()
    ring_spread = _masked_mean((result_latent - ring_mean).square().sum(1, keepdim=True), ring).sqrt().log1p()
    seam = _masked_mean(grad, border).log1p()
    texture_gap = fill_texture - ring_texture
    return torch.stack([ring_texture, fill_texture, texture_gap, texture_gap.abs(), area, change, change * ring_texture,
                        source_texture, colour_gap, fill_spread, ring_spread, fill_spread - ring_spread, seam,
                        seam - ring_texture, source_texture - fill_texture], dim=1)


def pixel_statistics(result: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """:func:`gate_statistics` of the crops' pixels at each of :data:`PIXEL_SCALES` (average-pooled images, the
    mask max-pooled so a thin stroke stays a hole; ring :data:`PIXEL_RING_PX` px), one row per item.

    Args:
        result, source: (B,3,R,R) float in [-1,1], R divisible by max(PIXEL_SCALES); mask: (B,1,R,R) in {0,1}.
    Returns:
        (B, len(PIXEL_STAT_NAMES)) in the images' dtype, columns :data:`PIXEL_STAT_NAMES`.
    """
    mask = mask.to(result.dtype)
    rows = []
    for scale in PIXEL_SCALES:
        r, s, m = ((result, source, mask) if scale == 1 else
                   (F.avg_pool2d(result, scale), F.avg_pool2d(source, scale), F.max_pool2d(mask, scale)))
        rows.append(gate_statistics(r, m, s, ring_cells=PIXEL_RING_PX // scale))
    return torch.cat(rows, dim=1)


class StatsHead(nn.Module):
    """Standardise ``inputs`` (stored mean and std, fitted on the training candidates), then a linear map
    (``hidden`` = 0, logistic regression) or Linear-SiLU-Linear to one logit. (B,N) -> (B,)."""

    def __init__(self, n_inputs: int, hidden: int = 0) -> None:
        super().__init__()
        self.hidden = hidden
        self.register_buffer("mean", torch.zeros(n_inputs))
        self.register_buffer("std", torch.ones(n_inputs))
        self.net = (nn.Linear(n_inputs, 1) if hidden == 0 else
                    nn.Sequential(nn.Linear(n_inputs, hidden), nn.SiLU(), nn.Linear(hidden, 1)))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net((inputs - self.mean.to(inputs.dtype)) / self.std.to(inputs.dtype)).squeeze(1)


class Discriminator(nn.Module):
    """Scores removal results. Build with :meth:`from_unet` (training) or :func:`load_discriminator`.

    Attributes:
        vae_scale_factor: pixels per latent cell (8 for SDXL's VAE); used for the SDXL time_ids.
        threshold: calibrated pass threshold on the score (``score >= threshold`` passes).
        stats_head: the optional :class:`StatsHead` over :func:`gate_statistics` and the conv head's logit
            (and with ``pixel_stats`` :func:`pixel_statistics` of the crops); None scores with the conv head
            alone (RORem's design).
        pixel_stats: the statistics head also sees the crops' pixels, so :meth:`forward` needs them.
    """

    def __init__(self, encoder: UNetEncoder, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                 *, unet_config: dict[str, Any], vae_scale_factor: int, head_channels: int = 128,
                 threshold: float = 0.5, stats_hidden: int | None = None, pixel_stats: bool = False) -> None:
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
        self.pixel_stats = pixel_stats
        self.stats_head = None if stats_hidden is None else StatsHead(len(self.stat_columns), stats_hidden)

    @property
    def takes_crops(self) -> bool:
        """Whether scoring needs the crops as well as their latents (a statistics head with ``pixel_stats``)."""
        return self.stats_head is not None and self.pixel_stats

    @property
    def stat_columns(self) -> list[str]:
        """Names of the statistics head's inputs, in order (stored with the head; checked at load)."""
        return [*STAT_NAMES, "conv_logit", *(PIXEL_STAT_NAMES if self.pixel_stats else ())]

    @classmethod
    def from_unet(cls, unet: Any, conditioning: Any, *, vae_scale_factor: int, head_channels: int = 128) -> Discriminator:
        """Initialise from a remover UNet (deep-copied; RORem starts the discriminator from the remover)."""
        import copy

        unet = copy.deepcopy(unet)
        return cls(UNetEncoder(unet), conditioning.prompt_embeds, conditioning.pooled_prompt_embeds,
                   unet_config=dict(unet.config), vae_scale_factor=vae_scale_factor, head_channels=head_channels)

    def forward(self, result_latent: torch.Tensor, mask_latent: torch.Tensor, source_latent: torch.Tensor,
                result: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B,) float for result latents (B,C,h,w), mask (B,1,h,w) in {0,1}, source latents (B,C,h,w):
        the conv head's, or with a statistics head, that head's over (:func:`gate_statistics`, conv logit[,
        :func:`pixel_statistics`]). ``result``/``source`` (B,3,H,W) in [-1,1] and ``mask`` (B,1,H,W) are the
        crops themselves, needed (and only used) with ``pixel_stats``; ValueError without them."""
        pixels = None
        if self.takes_crops:
            if result is None or mask is None or source is None:
                raise ValueError("this discriminator's statistics head needs the result, mask and source crops")
            pixels = pixel_statistics(result.to(result_latent.dtype), mask, source.to(result_latent.dtype))
        return self.logit_from(result_latent, mask_latent, source_latent, pixels)

    def logit_from(self, result_latent: torch.Tensor, mask_latent: torch.Tensor, source_latent: torch.Tensor,
                   pixels: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` with the crops' :func:`pixel_statistics` given ((B, len(PIXEL_STAT_NAMES)), or None
        without ``pixel_stats``): training's latent caches keep those, not the crops."""
        logit = self.conv_logit(result_latent, mask_latent, source_latent)
        if self.stats_head is None:
            return logit
        inputs = self.stats_inputs(result_latent, mask_latent, source_latent, logit, pixels)
        # Nothing removed fails, whatever the head makes of the rest: an MLP need not be monotone in the
        # change, and on held-out photos it passed two untouched overlays.
        unchanged = inputs[:, STAT_NAMES.index("change")] < UNCHANGED_CHANGE
        scored = self.stats_head(inputs)
        return torch.where(unchanged, torch.full_like(scored, UNCHANGED_LOGIT), scored).float()

    def stats_inputs(self, result_latent: torch.Tensor, mask_latent: torch.Tensor, source_latent: torch.Tensor,
                     conv_logit: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, len(stat_columns)): :func:`gate_statistics`, the conv head's logit, then ``pixels``
        (:func:`pixel_statistics`, (B, len(PIXEL_STAT_NAMES)); required with ``pixel_stats``, else ignored)."""
        stats = gate_statistics(result_latent, mask_latent, source_latent)
        parts = [stats, conv_logit.to(stats.dtype)[:, None]]
        if self.pixel_stats:
            if pixels is None:
                raise ValueError("this discriminator's statistics head needs pixel_statistics of the crops")
            parts.append(pixels.to(stats.dtype))
        return torch.cat(parts, dim=1)

    def conv_logit(self, result_latent: torch.Tensor, mask_latent: torch.Tensor,
                   source_latent: torch.Tensor) -> torch.Tensor:
        """(B,) float: RORem's part, the encoder and the conv head (shapes as :meth:`forward`)."""
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
                  "head_channels": self.head_channels, "threshold": self.threshold, "calibration": calibration or {},
                  "stats_head": None if self.stats_head is None else
                  {"hidden": self.stats_head.hidden, "statistics": self.stat_columns}}
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
        stats = config.get("stats_head")
        pixel_stats = stats is not None and len(stats.get("statistics", [])) > len(STAT_NAMES) + 1
        known = [*STAT_NAMES, "conv_logit", *(PIXEL_STAT_NAMES if pixel_stats else ())]
        if stats is not None and list(stats.get("statistics", [])) != known:
            raise ValueError(f"its statistics head was fitted on {stats.get('statistics')}, this code computes "
                             f"{known}")
        disc = Discriminator(
            UNetEncoder(unet), tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], unet_config=config["unet"],
            vae_scale_factor=int(config["vae_scale_factor"]), head_channels=int(config["head_channels"]),
            threshold=float(config["threshold"]), stats_hidden=None if stats is None else int(stats["hidden"]),
            pixel_stats=pixel_stats,
        )
        disc.load_state_dict(tensors, strict=True, assign=True)
        empty = [name for name, t in [*disc.named_parameters(), *disc.named_buffers()] if t.is_meta]
        if empty:
            raise ValueError(f"no weights in the file for {', '.join(empty[:3])}")
    except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot load discriminator from {root}: {exc}") from exc
    return disc.eval().requires_grad_(False)
