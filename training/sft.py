"""`cleanplate train sft`: supervised fine-tuning of the inpainting UNet on (source, mask, GT) triplets.

Loss (RORem, arXiv 2501.00740, eq. 1, generalised to diffusers' prediction types):
    L = E_{t, ε} w_snr(t) · Σ_cells w_m · || y − f_θ( cat(z_t, m↓, E(x̃_s)), t, c_∅ ) ||² / Σ_cells w_m
with z_t = √ᾱ_t E(x_gt) + √(1−ᾱ_t) ε, m↓ the mask at latent size, x̃_s the masked source
(:mod:`cleanplate.masked_source`), c_∅ the empty-prompt conditioning and the target y = ε, x0 or
v = √ᾱ·ε − √(1−ᾱ)·x0 (:func:`cleanplate.sampling.training_target`). The defaults are RORem's objective
(ε, w_m = 1, t uniform, w_snr = 1); each departure is a config key:

* ``prediction_type`` (``sample`` = x0): at the first LCM timestep (t = 999, √ᾱ ≈ 0.068) an ε-model's x0
  estimate (x_t − √(1−ᾱ)·ε̂)/√ᾱ multiplies any error in ε̂ by ~15; an x0-model's does not.
* ``mask_weight``: latent cells touched by the mask (max-pooled) weigh ``mask_weight`` times the others,
  which the model can mostly copy from the conditioning.
* ``timesteps: sampler``: t drawn from the N-step LCM schedule's timesteps (± ``timestep_jitter``), the only
  ones the served sampler visits.
* ``min_snr_gamma``: Min-SNR-γ weighting (Hang et al., arXiv 2303.09556): w = min(SNR, γ) / SNR for ε,
  min(SNR, γ) for x0, min(SNR, γ) / (SNR + 1) for v.
* ``ema_decay``: an exponential moving average of the UNet weights (diffusers' ``EMAModel``) is evaluated
  and exported.

``latent_cache`` encodes GT and masked source once through the frozen VAE (``cache_variants`` random crops
and dilations per item, horizontal flips applied to the latents), so a step is the UNet alone.
``eval_every`` runs real removals through the production path (:func:`cleanplate.remover.remove`: dilate,
crop, N-step sampler, paste-back) on the first ``eval_items`` items of ``eval_meta``, logs in-mask PSNR/SSIM
to TensorBoard and keeps the best bundle, which becomes ``out``.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from cleanplate import imaging
from cleanplate.bundle import BundleConfig, NullConditioning, load_bundle, save_bundle
from cleanplate.errors import ErrorCode, InputError
from cleanplate.imaging import write_atomic
from cleanplate.masked_source import CLASSICAL_FILLS
from cleanplate.metrics import psnr, ssim
from cleanplate.pipeline import RemovalPipeline
from cleanplate.sampling import PREDICTION_TYPES, lcm_schedule, training_target

from .common import (
    CachedLatents,
    TrainConfig,
    Triplet,
    TripletDataset,
    alphas_cumprod,
    cached_tensors,
    load_model_config,
    make_accelerator,
    read_meta,
    start_training,
)

PredictionType = Literal["epsilon", "v_prediction", "sample"]
assert set(PredictionType.__args__) == set(PREDICTION_TYPES)


class SFTConfig(TrainConfig):
    init_bundle: Path | None = Field(None, description="bundle to fine-tune (e.g. one made by bundle from-rorem)")
    unet_config: str | None = Field(None, description="train from scratch: UNet config (JSON path or configs/ name)")
    vae: Path | None = Field(None, description="with unet_config: a vae/ directory from `train vae`")
    name: str = "cleanplate-sft"
    resolution: int = Field(256, ge=64, description="training crop side in px; also the bundle's (>= 64)")
    lr: float = 1e-4
    # What the bundle declares (None: the starting bundle's, or RORem's for a new one).
    prediction_type: PredictionType | None = Field(None, description="what the UNet predicts (scheduler config)")
    masked_source: Literal["zero", "telea", "ns"] | None = Field(None, description="the UNet's conditioning fill")
    dilate_px: int | None = Field(None, ge=0, description="the bundle's default serving dilation in px")
    decode_residual: bool | None = Field(None, description="the bundle decodes x̃_s + D(ẑ) − D(E(x̃_s))")
    # The objective (defaults: RORem's).
    mask_weight: float = Field(1.0, ge=1.0, description="loss weight of latent cells the mask touches (others 1)")
    timesteps: Literal["uniform", "sampler"] = "uniform"
    timestep_jitter: int = Field(20, ge=0, description="with timesteps=sampler: ± this many around each one")
    min_snr_gamma: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Cost and evaluation.
    latent_cache: bool = False
    cache_variants: int = Field(1, ge=1, description="random crops/dilations cached per item")
    cache_dir: Path | None = Field(None, description="where the latent cache lives (default: work_dir), so "
                                                     "runs on the same data, VAE and fill can share it")
    eval_meta: list[Path] = Field(default_factory=list, description="held-out meta.json for evaluation")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: never)")
    eval_items: int = Field(16, ge=1)


def build_pipeline(cfg: SFTConfig) -> tuple[RemovalPipeline, BundleConfig]:
    """The starting UNet/VAE/conditioning, from a bundle or from configs (zero text conditioning), with the
    config's prediction type, masked-source fill and dilation applied to the bundle config."""
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
        raise InputError("train sft needs init_bundle, or unet_config and vae", code=ErrorCode.BAD_OPTION)
    if unet.config.in_channels != 2 * vae.config.latent_channels + 1:
        raise InputError(f"UNet in_channels {unet.config.in_channels} does not fit VAE latent_channels "
                         f"{vae.config.latent_channels} (needs 2C+1)", code=ErrorCode.BAD_OPTION)
    update: dict[str, Any] = {}
    if cfg.prediction_type is not None:
        update["scheduler"] = {**bundle_cfg.scheduler, "prediction_type": cfg.prediction_type}
    if cfg.masked_source is not None:
        update["masked_source"] = cfg.masked_source
    if cfg.dilate_px is not None:
        update["dilate_px"] = cfg.dilate_px
    if cfg.decode_residual is not None:
        update["decode_residual"] = cfg.decode_residual
    bundle_cfg = bundle_cfg.model_copy(update=update)
    vae.requires_grad_(False).eval()
    unet.requires_grad_(True).train()  # load_bundle freezes it
    return RemovalPipeline(unet, vae, cond, bundle_cfg, torch.device("cpu"), torch.float32, torch.float32), bundle_cfg


# -- the objective -----------------------------------------------------------------------------------
def mask_cells(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B,1,H,W) {0,1} pixel mask -> (B,1,H/f,W/f) {0,1}: 1 where any pixel of the cell is masked (max-pool)."""
    return F.max_pool2d(mask.float(), factor)


def sample_timesteps(cfg: SFTConfig, bundle_cfg: BundleConfig, batch: int, num_train: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) int64 training timesteps: uniform on [0, T), or the bundle's N-step LCM timesteps ± jitter."""
    if cfg.timesteps == "uniform":
        return torch.randint(0, num_train, (batch,), device=device)
    visited = torch.tensor([s.timestep for s in lcm_schedule(bundle_cfg.scheduler, bundle_cfg.steps)])
    t = visited[torch.randint(0, len(visited), (batch,))]
    t = t + torch.randint(-cfg.timestep_jitter, cfg.timestep_jitter + 1, (batch,))
    return t.clamp(0, num_train - 1).to(device)


def snr_weights(alpha_bar: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 7 and its x0/v forms) for ᾱ_t (B,); ones when γ is None."""
    if gamma is None:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    return clipped / (snr + 1)


def sft_loss(output: torch.Tensor, target: torch.Tensor, cells: torch.Tensor, mask_weight: float,
             weights: torch.Tensor) -> torch.Tensor:
    """Per-item weighted MSE (B,): Σ w_m·(output − target)² / Σ w_m over cells and channels, times ``weights``.

    output, target: (B,C,h,w); cells: (B,1,h,w) {0,1} (1 = masked cell, :func:`mask_cells`); w_m =
    ``mask_weight`` on masked cells, 1 elsewhere; weights: (B,) (Min-SNR, :func:`snr_weights`).
    """
    w = 1.0 + (mask_weight - 1.0) * cells
    err = ((output.float() - target.float()) ** 2 * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * output.shape[1])
    return err * weights


# -- latent cache ------------------------------------------------------------------------------------
class LatentCache(CachedLatents):
    """SFT's cached latents. Items: ``gt`` and ``cond`` (C,h,w) float32 (GT latent, masked-source latent),
    ``mask`` (1,h,w) {0,1} (as the UNet sees it, nearest) and ``cells`` (1,h,w) {0,1} (max-pool), flipped
    together (:class:`CachedLatents`)."""

    KEYS = ("gt", "cond", "mask", "cells")


@torch.no_grad()
def build_latent_cache(pipe: RemovalPipeline, dataset: TripletDataset, path: Path, variants: int, seed: int,
                       batch_size: int = 16) -> LatentCache:
    """Encode ``variants`` random views of every item once (fp16 on disk at ``path``, reused when present)."""
    return LatentCache(cached_tensors(path, lambda: _encode_views(pipe, dataset, variants, seed, batch_size)))


def _encode_views(pipe: RemovalPipeline, dataset: TripletDataset, variants: int, seed: int,
                  batch_size: int) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in LatentCache.KEYS}
    flip, dataset.flip = dataset.flip, False  # flips are applied to the latents at load time
    f = pipe.vae_scale_factor
    with tqdm(total=variants * len(dataset), desc="latent cache", mininterval=10) as bar:
        for v in range(variants):
            random.seed(seed * 1000 + v)
            for start in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                source = torch.stack([it["source"] for it in items])
                mask = torch.stack([it["mask"] for it in items])
                mask_latent, cond = pipe.condition_inputs(source, mask)
                parts["gt"].append(pipe.encode(torch.stack([it["gt"] for it in items])).half())
                parts["cond"].append(cond.half())
                parts["mask"].append(mask_latent.to(torch.uint8))
                parts["cells"].append(mask_cells(mask, f).to(torch.uint8))
                bar.update(len(items))
    dataset.flip = flip
    return {k: torch.cat(v) for k, v in parts.items()}


# -- evaluation --------------------------------------------------------------------------------------
def evaluate_removals(pipe: RemovalPipeline, items: list[Triplet], seed: int = 0) -> dict[str, float]:
    """Mean in-mask PSNR (dB) and SSIM of real removals through the production path.

    Each item: :func:`cleanplate.remover.remove` (the bundle's dilation, the context crop, the N-step sampler,
    the feathered paste-back) on the full-size source, judged against the GT inside the mask as given, as
    ``cleanplate bench quality`` judges it. Returns {"psnr_mask_db", "ssim_mask", "n"}.
    """
    from cleanplate.remover import remove

    psnrs, ssims = [], []
    for item in items:
        src = imaging.decode_image(item.source)
        gt = imaging.decode_image(item.gt).rgb
        mask = imaging.decode_mask(item.mask)
        out = imaging.to_rgb8(remove(pipe, src, mask, seed=seed).pixels)
        psnrs.append(psnr(out, gt, mask))
        ssims.append(ssim(out, gt, mask)[0])
    return {"psnr_mask_db": float(np.mean(psnrs)), "ssim_mask": float(np.mean(ssims)), "n": len(items)}


def _ema(cfg: SFTConfig, unet: Any) -> Any:
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT and write a bundle to ``cfg.out`` (the best evaluated one when ``eval_every`` > 0).

    Returns {"losses": [...per step], "evals": [{"step", "psnr_mask_db", "ssim_mask", "n"}, ...]}.
    Raises InputError: a bad config (no starting model, channels that do not fit, eval without eval_meta).
    """
    if cfg.eval_every and not cfg.eval_meta:
        raise InputError("eval_every needs eval_meta", code=ErrorCode.BAD_OPTION)
    pipe, bundle_cfg = build_pipeline(cfg)
    accelerator = make_accelerator(cfg, "sft")
    pipe.device = accelerator.device
    pipe.vae.to(accelerator.device)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    work = cfg.resolved_work_dir
    triplets = TripletDataset(read_meta(cfg.meta), cfg.resolution, cfg.dilate_range, crop_window=cfg.crop_window)
    dataset: torch.utils.data.Dataset = triplets
    if cfg.latent_cache:
        cache_path = (cfg.cache_dir or work) / (f"latents_{cfg.crop_window}_{bundle_cfg.masked_source}_r{cfg.resolution}"
                                                f"_d{cfg.dilate_range[0]}-{cfg.dilate_range[1]}_x{cfg.cache_variants}"
                                                f"_s{cfg.seed}.safetensors")
        dataset = build_latent_cache(pipe, triplets, cache_path, cfg.cache_variants, cfg.seed)
    ema = _ema(cfg, pipe.unet) if cfg.ema_decay else None
    run = start_training(accelerator, cfg, pipe.unet, dataset, "sft", checkpointed=[ema] if ema else [])
    pipe.unet = run.model
    alphas = alphas_cumprod(bundle_cfg.scheduler).to(accelerator.device)
    ptype = pipe.prediction_type
    f = pipe.vae_scale_factor
    eval_items = read_meta(cfg.eval_meta)[: cfg.eval_items] if cfg.eval_every else []
    best_path, best_dir = work / "best.json", work / "best"
    best = json.loads(best_path.read_text()) if best_path.is_file() and best_dir.is_dir() else None
    evals: list[dict[str, Any]] = list(best["history"]) if best else []

    def export(unet: Any, out: Path, extra: dict[str, Any]) -> None:
        provenance = {**bundle_cfg.provenance, "sft": {"config": cfg.model_dump(mode="json"), **extra}}
        save_bundle(out, config=bundle_cfg.model_copy(update={"provenance": provenance, "name": cfg.name}),
                    unet=unet, vae=pipe.vae.to("cpu"), conditioning=pipe.conditioning)
        pipe.vae.to(accelerator.device)

    def evaluate() -> None:
        nonlocal best
        raw = accelerator.unwrap_model(run.model)
        if ema is not None:
            ema.store(raw.parameters())
            ema.copy_to(raw.parameters())
        raw.eval()
        result = {"step": run.step, **evaluate_removals(pipe, eval_items)}
        evals.append(result)
        accelerator.log({"sft/eval_psnr_mask_db": result["psnr_mask_db"], "sft/eval_ssim_mask": result["ssim_mask"]},
                        step=run.step)
        run.bar.write(f"step {run.step}: eval PSNR in mask {result['psnr_mask_db']:.2f} dB, "
                      f"SSIM {result['ssim_mask']:.3f} on {result['n']} items")
        if best is None or result["psnr_mask_db"] > best["psnr_mask_db"]:
            export(raw, best_dir, {"steps": run.step, "eval": result})
            best = {**result}
        best["history"] = evals
        write_atomic(best_path, json.dumps(best, indent=1).encode())
        if ema is not None:
            ema.restore(raw.parameters())
        raw.train()

    while run.step < cfg.max_steps:
        batch = next(run.batches)
        if cfg.latent_cache:
            latents, cond, mask_latent, cells = batch["gt"], batch["cond"], batch["mask"], batch["cells"]
        else:
            with torch.no_grad():
                latents = pipe.encode(batch["gt"])
                mask_latent, cond = pipe.condition_inputs(batch["source"], batch["mask"])
            cells = mask_cells(batch["mask"], f)
        noise = torch.randn_like(latents)
        t = sample_timesteps(cfg, bundle_cfg, latents.shape[0], len(alphas), latents.device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with accelerator.autocast():
            output = pipe.unet_forward(noisy, t, mask_latent, cond)
        target = training_target(latents, noise, a.sqrt(), (1 - a).sqrt(), ptype)
        per_item = sft_loss(output, target, cells, cfg.mask_weight, snr_weights(alphas[t], cfg.min_snr_gamma, ptype))
        run.update(per_item.mean())
        if ema is not None:
            ema.step(accelerator.unwrap_model(run.model).parameters())
        if accelerator.is_main_process and cfg.eval_every and (
                run.step % cfg.eval_every == 0 or run.step == cfg.max_steps):
            evaluate()
    run.bar.close()

    if accelerator.is_main_process:
        if best is not None:
            tmp = cfg.out.with_name(cfg.out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(best_dir, tmp)
            if cfg.out.exists():
                shutil.rmtree(cfg.out)
            tmp.rename(cfg.out)
        else:
            final = accelerator.unwrap_model(run.model).eval()
            if ema is not None:
                ema.copy_to(final.parameters())
            export(final, cfg.out, {"steps": run.step, "final_loss": run.final_loss})
    accelerator.end_training()
    return {"losses": run.losses, "evals": evals}


def tune_bundle(bundle_dir: Path, meta: list[Path], *, dilations: list[int], scales: list[float],
                steps: list[int] | None = None, fills: list[str] | None = None, limit: int = 24,
                say: Any = print) -> dict[str, Any]:
    """Pick the bundle's serving ``dilate_px``, ``residual_scale``, default ``steps`` and classical prefill
    (``masked_source``) on held-out triplets.

    Every (fill, dilation, scale, steps) combination is judged by :func:`evaluate_removals` (the production
    path, seed 0) on the first ``limit`` items of ``meta``; the one with the highest mean in-mask PSNR is written into
    ``bundle.json`` (atomically) with the whole grid appended to the list ``provenance.tune`` (earlier
    tunes of the bundle stay there, in order; a single earlier record is kept as the list's first). ``scales`` other than [1]
    need ``decode_residual``; ``steps`` defaults to the bundle's; ``fills`` (the bundle's by default) must be
    classical fills (:data:`masked_source.CLASSICAL_FILLS`) of a bundle that already has one: the UNet then sees
    another prefill than it was trained on, so only a held-out measurement can say whether that pays.
    Returns {"grid": [...], "best": {...}}.
    Raises InputError: empty grid, a scale outside [0, 1] or without decode_residual, steps outside 1..50, a
    fill that is not classical or a bundle trained on the zero fill.
    """
    from cleanplate.bundle import BUNDLE_JSON, read_config

    config = read_config(bundle_dir)
    if not dilations or not scales or any(not 0 <= s <= 1 for s in scales) or any(d < 0 for d in dilations):
        raise InputError("tune needs dilations >= 0 and scales in [0, 1]", code=ErrorCode.BAD_OPTION)
    if not config.decode_residual and scales != [1.0]:
        raise InputError("residual_scale needs a bundle with decode_residual", code=ErrorCode.BAD_OPTION)
    steps = steps or [config.steps]
    if any(not 1 <= n <= 50 for n in steps):
        raise InputError("steps must be in 1..50", code=ErrorCode.BAD_OPTION)
    fills = fills or [config.masked_source]
    if fills != [config.masked_source] and (config.masked_source not in CLASSICAL_FILLS
                                            or not set(fills) <= set(CLASSICAL_FILLS)):
        raise InputError(f"masked_source can be tuned among {CLASSICAL_FILLS} for a bundle trained on one of them, "
                         f"not {fills} for a bundle trained on {config.masked_source!r}", code=ErrorCode.BAD_OPTION)
    pipe = RemovalPipeline.from_bundle(bundle_dir)
    items = read_meta(meta)[:limit]
    grid = []
    for fill, d, s, n in itertools.product(fills, dilations, scales, steps):
        pipe.config = config.model_copy(update={"masked_source": fill, "dilate_px": d, "residual_scale": s, "steps": n})
        result = {"masked_source": fill, "dilate_px": d, "residual_scale": s, "steps": n,
                  **evaluate_removals(pipe, items)}
        say(f"{fill} fill, dilate {d} px, residual_scale {s:g}, {n} steps: PSNR in mask "
            f"{result['psnr_mask_db']:.2f} dB, SSIM {result['ssim_mask']:.3f}")
        grid.append(result)
    best = max(grid, key=lambda r: r["psnr_mask_db"])
    earlier = config.provenance.get("tune", [])
    runs = [*(earlier if isinstance(earlier, list) else [earlier]),
            {"meta": [str(m) for m in meta], "limit": limit, "grid": grid, "best": best}]
    provenance = {**config.provenance, "tune": runs}
    tuned = config.model_copy(update={"masked_source": best["masked_source"], "dilate_px": best["dilate_px"],
                                      "residual_scale": best["residual_scale"], "steps": best["steps"],
                                      "provenance": provenance})
    write_atomic(Path(bundle_dir) / BUNDLE_JSON, (json.dumps(tuned.model_dump(), indent=2) + "\n").encode())
    return {"grid": grid, "best": best}
