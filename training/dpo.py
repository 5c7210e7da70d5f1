"""`cleanplate train dpo`: Diffusion-DPO on removal preference pairs; `cleanplate data dpo-pairs` builds pairs.

Objective (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", arXiv
2311.12908, eq. 14, in the form of diffusers' ``train_diffusion_dpo_sdxl.py``): for a pair of results of
one (source, mask), x^w preferred and x^l rejected, one timestep t ~ U{0..T-1} and one noise ε shared by
both, z^*_t = sqrt(ᾱ_t) E(x^*) + sqrt(1-ᾱ_t) ε and

    e^*_θ = ||y^* - f_θ(z^*_t, t)||²,   e^*_ref = ||y^* - f_ref(z^*_t, t)||²   (means over latent cells)
    L = -log σ( -β/2 · [ (e^w_θ - e^w_ref) - (e^l_θ - e^l_ref) ] )

with f the UNet's output and y^* its training target (:func:`cleanplate.sampling.training_target`) for the
bundle's ``scheduler.prediction_type``: y = ε for ε-models, which is the paper's loss exactly. The paper
defines it on the ε error only; for x0- and v-models the errors of the declared parameterisation (the
model's own training loss) are the standard generalisation. Since x̂0 − x0 = −(ε̂ − ε)/√SNR_t and
v̂ − v = (ε̂ − ε)/√ᾱ_t, they are the ε errors weighted per timestep by 1/SNR_t (x0) or 1/ᾱ_t (v) (Kingma &
Gao, "Understanding Diffusion Objectives", arXiv 2303.00848: weighted ELBOs), so ``beta``, tuned for ε
errors, may need retuning for them.

β absorbs the paper's T (β T in eq. 14): 5000 is diffusers' SDXL default (2500 for SD 1.5). The reference
is the starting (SFT) model: the UNet with the trained LoRA disabled (:mod:`.rl_common`). The implicit
accuracy is the share of pairs with a positive logit -β/2·[...], i.e. where the policy has moved its
denoising error toward the preferred result more than the reference; it starts at 0 (policy = reference,
ties) and rises as the pairs are learnt. With ``mask_loss`` the errors e are means over the masked latent
cells only (the region the pair differs in; outside it both results equal the source).

The UNet conditioning is the same as SFT's: (noisy latent, mask, latent of the masked source), empty prompt.

Pairs: a meta.json list of {"source", "mask", "preferred", "rejected"} (paths relative to the file).
``make_dpo_pairs`` builds synthetic ones from RORem triplets: preferred = GT, rejected = a failed removal
from :func:`.disc_labels.make_candidate` (source left in, partial removal, blurred or smeared fill,
re-drawn text). Pairs are images, so they serve a bundle of any prediction type.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from cleanplate import compositing, imaging
from cleanplate.bundle import load_bundle
from cleanplate.errors import ErrorCode, InputError
from cleanplate.pipeline import RemovalPipeline
from cleanplate.sampling import training_target

from .common import alphas_cumprod, make_accelerator, read_meta, read_meta_entries, start_training, to_tensor
from .rl_common import RLConfig, add_policy_lora, reference_model, region_mean, save_policy_bundle

_STREAM = 0xD1D0  # RNG stream tag of make_dpo_pairs (see disc_labels._STREAM)


class DPOConfig(RLConfig):
    meta: list[Path] = Field(description='preference pairs: meta.json lists of {"source","mask","preferred","rejected"}')
    beta: float = Field(5000.0, gt=0, description="β of Diffusion-DPO (absorbs T); 5000 = diffusers' SDXL default")
    mask_loss: bool = Field(False, description="denoising errors over the masked latent cells only")
    name: str = "cleanplate-dpo"


# -- data ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    source: Path
    mask: Path
    preferred: Path
    rejected: Path


def read_pairs(paths: Sequence[str | Path]) -> list[Pair]:
    """Read preference meta.json files (paths relative to each file). Raises InputError naming a bad entry."""
    return [Pair(*files) for files, _ in read_meta_entries(paths, ("source", "mask", "preferred", "rejected"),
                                                           "preference pairs")]


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs at ``resolution``, cut as :class:`.common.TripletDataset` cuts triplets (one random
    square crop resized to R, the same for all four images, random mask dilation, optional flip).

    Items: ``source``/``preferred``/``rejected`` (3,R,R) float32 in [-1,1], ``mask`` (1,R,R) float32 {0,1}.
    """

    def __init__(self, pairs: Sequence[Pair], resolution: int, dilate_range: tuple[int, int] = (0, 0),
                 flip: bool = True) -> None:
        self.pairs, self.resolution, self.dilate_range, self.flip = list(pairs), resolution, dilate_range, flip

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pair = self.pairs[i]
        mask = imaging.decode_mask(pair.mask)
        h, w = mask.shape
        side = min(h, w)
        box = compositing.CropBox(random.randint(0, w - side), random.randint(0, h - side), side)
        out: dict[str, np.ndarray] = {}
        for key in ("source", "preferred", "rejected"):
            rgb = np.asarray(Image.open(getattr(pair, key)).convert("RGB"))
            if rgb.shape[:2] != (h, w):
                raise InputError(f"{getattr(pair, key)}: size {rgb.shape[1]}x{rgb.shape[0]} differs from the "
                                 f"mask's {w}x{h}", code=ErrorCode.SIZE_MISMATCH)
            out[key], crop_mask = compositing.crop_to_model(rgb, mask, box, self.resolution)
        m = imaging.dilate_mask(crop_mask, random.randint(*self.dilate_range))
        if self.flip and random.random() < 0.5:
            out = {k: v[:, ::-1] for k, v in out.items()}
            m = m[:, ::-1]
        item = {k: to_tensor(v) for k, v in out.items()}
        item["mask"] = torch.from_numpy(np.ascontiguousarray(m)).float()[None]
        return item


def make_dpo_pairs(meta: Sequence[str | Path], out_dir: str | Path, *, per_item: int = 1, seed: int = 0,
                   limit: int | None = None) -> Path:
    """Synthetic preference pairs from RORem triplets; returns the written ``meta.json``.

    For input item i and v < ``per_item``: preferred = the item's GT, rejected = a failed removal made by
    :func:`.disc_labels.make_candidate` with ``positive_fraction=0`` and the RNG
    ``np.random.default_rng([_STREAM, seed, i, v])`` (so the pair depends only on seed, i, v and the images).
    Writes ``rejected/NNNNNN.png`` ((H,W,3) uint8 RGB) and ``meta.json``: a list of {"source", "mask",
    "preferred", "rejected", "rejected_kind", "item"}, paths relative to it. Items with an empty mask
    are skipped. Raises InputError for per_item < 1, seed < 0, limit < 1 or no usable item.
    """
    from .disc_labels import _load, make_candidate

    if int(per_item) != per_item or per_item < 1:
        raise InputError(f"per_item must be an integer >= 1, got {per_item}", code=ErrorCode.BAD_OPTION)
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed}", code=ErrorCode.BAD_OPTION)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}", code=ErrorCode.BAD_OPTION)
    items = read_meta(meta)[:limit]
    out = Path(out_dir)
    (out / "rejected").mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    for i, item in enumerate(items):
        src, mask, gt = _load(item, i)
        if not mask.any():
            continue
        rel = {k: Path(os.path.relpath(p, out)).as_posix()
               for k, p in (("source", item.source), ("mask", item.mask), ("preferred", item.gt))}
        for v in range(int(per_item)):
            rejected, kind = make_candidate(src, mask, gt, np.random.default_rng([_STREAM, int(seed), i, v]), 0.0)
            name = f"rejected/{len(entries):06d}.png"
            tmp = out / (name + ".tmp")
            Image.fromarray(rejected).save(tmp, format="PNG")
            os.replace(tmp, out / name)
            entries.append({**rel, "rejected": name, "rejected_kind": kind, "item": i})
    if not entries:
        raise InputError("no input item has a non-empty mask", code=ErrorCode.BAD_OPTION)
    path = out / "meta.json"
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# -- objective -------------------------------------------------------------------------------------------
def dpo_loss(model_err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO loss (eq. 14) from denoising errors.

    Args:
        model_err, ref_err: (2B,) float, the per-item denoising errors ||y - f(z_t, t)||² (y = ε, x0 or v,
            see the module docstring) of the policy and of the reference: the B preferred items first, then
            their B rejected partners.
        beta: β > 0 (absorbing T).
    Returns:
        (loss () float, logits (B,) float): loss = mean(-log σ(logits)), logits = -β/2 ·
        [(e^w_θ - e^w_ref) - (e^l_θ - e^l_ref)]; logits > 0 counts toward the implicit accuracy.
    """
    model_w, model_l = model_err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    logits = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return -torch.nn.functional.logsigmoid(logits).mean(), logits


def dpo_errors(pipe: RemovalPipeline, batch: dict[str, torch.Tensor], alphas: torch.Tensor, raw_unet: Any,
               accelerator: Any, mask_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoising errors (2B,) float32 of the policy (with grad) and of the reference (no grad) on a pair
    batch (:class:`PairDataset` items): ||y − f(z_t, t)||² with y the training target of
    ``pipe.prediction_type`` (ε, x0 or v) for that item's latent; one t and one ε per pair (torch's global
    RNG), shared by its preferred and rejected result; order: the B preferred, then the B rejected. With
    ``mask_loss`` the errors average over latent cells under the mask (max-pooled to latent size, so thin
    strokes count)."""
    from cleanplate.discriminator import Discriminator

    with torch.no_grad():
        latents = pipe.encode(torch.cat([batch["preferred"], batch["rejected"]]))
        mask_latent, masked_latents = pipe.condition_inputs(batch["source"], batch["mask"])
    b = mask_latent.shape[0]
    noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)
    t = torch.randint(0, len(alphas), (b,), device=latents.device).repeat(2)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = training_target(latents, noise, a.sqrt(), (1 - a).sqrt(), pipe.prediction_type)
    mask_latent, masked_latents = mask_latent.repeat(2, 1, 1, 1), masked_latents.repeat(2, 1, 1, 1)
    if mask_loss:
        region = Discriminator.mask_to_latent(batch["mask"].to(latents.device), pipe.vae_scale_factor).repeat(2, 1, 1, 1)
    else:
        region = torch.ones_like(mask_latent)
    with accelerator.autocast():
        output = pipe.unet_forward(noisy, t, mask_latent, masked_latents).float()
    model_err = region_mean((output - target) ** 2, region)
    with torch.no_grad(), accelerator.autocast(), reference_model(raw_unet):
        ref = pipe.unet_forward(noisy, t, mask_latent, masked_latents).float()
    return model_err, region_mean((ref - target) ** 2, region)


def train_dpo(cfg: DPOConfig) -> dict:
    """Run Diffusion-DPO and write a bundle (the LoRA fused into the UNet) to ``cfg.out``.

    Logs ``dpo/loss``, ``dpo/implicit_acc`` (share of pairs with logit > 0), ``dpo/logit`` and
    ``dpo/margin_policy`` (e^l_θ - e^w_θ) to TensorBoard. Returns {"losses", "implicit_acc",
    "logits": per-step lists (this process)}.
    """
    bundle = load_bundle(cfg.bundle)
    accelerator = make_accelerator(cfg, "dpo")
    unet, vae = bundle.unet, bundle.vae.to(accelerator.device)
    add_policy_lora(unet, cfg.lora_rank, cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    config = bundle.config.model_copy(update={"resolution": cfg.resolution})
    dataset = PairDataset(read_pairs(cfg.meta), cfg.resolution, cfg.dilate_range)
    run = start_training(accelerator, cfg, unet, dataset, "dpo")
    pipe = RemovalPipeline(run.model, vae, bundle.conditioning, config, accelerator.device, torch.float32,
                           torch.float32)
    raw = accelerator.unwrap_model(run.model)
    alphas = alphas_cumprod(config.scheduler).to(accelerator.device)
    accs: list[float] = []
    mean_logits: list[float] = []
    while run.step < cfg.max_steps:
        batch = next(run.batches)
        model_err, ref_err = dpo_errors(pipe, batch, alphas, raw, accelerator, cfg.mask_loss)
        loss, logits = dpo_loss(model_err, ref_err, cfg.beta)
        acc = (logits.detach() > 0).float().mean().item()
        accs.append(acc)
        mean_logits.append(logits.detach().mean().item())
        if (run.step + 1) % cfg.log_every == 0:
            model_w, model_l = model_err.detach().chunk(2)
            accelerator.log({"dpo/implicit_acc": sum(accs[-cfg.log_every:]) / len(accs[-cfg.log_every:]),
                             "dpo/logit": mean_logits[-1],
                             "dpo/margin_policy": (model_l - model_w).mean().item()}, step=run.step + 1)
        run.update(loss)
    run.bar.close()

    if accelerator.is_main_process:
        provenance = {**config.provenance, "dpo": {"config": cfg.model_dump(mode="json"), "steps": run.step,
                                                   "final_loss": run.final_loss,
                                                   "final_implicit_acc": sum(accs[-50:]) / max(1, len(accs[-50:])),
                                                   "num_processes": accelerator.num_processes}}
        save_policy_bundle(cfg, raw, config.model_copy(update={"provenance": provenance, "name": cfg.name}))
    accelerator.end_training()
    return {"losses": run.losses, "implicit_acc": accs, "logits": mean_logits}
