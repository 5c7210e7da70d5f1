"""`cleanplate train discriminator`: RORem's quality discriminator, trained on yes/no labels, then calibrated.

Model (RORem, arXiv 2501.00740, sec. 3.2; :mod:`cleanplate.discriminator`): the remover UNet's conv_in +
down + mid blocks, frozen, with a rank-4 LoRA, and a small conv head; input (result latent, mask, source
latent). Loss: binary cross-entropy on the label (``score`` of the meta.json entry, 1 = good removal), the
positive class weighted by n_neg / n_pos so an unbalanced label set does not bias the gate.

Data: RORem ``meta.json`` entries where ``GT`` is the *result being judged* and ``score`` its label
(``cleanplate data disc-labels`` makes synthetic ones). Each item is cut exactly as serving cuts it: the
mask is dilated, the context window around it is cropped and resized to the bundle resolution.

Calibration: the scores are not probabilities, so after training the held-out split (``val_meta``) is
scored and the pass threshold is the lowest score whose precision (share of real good removals among
passes) reaches ``target_precision``; if none does, the F1-best one. The threshold and the report are
stored with the discriminator in the bundle.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from cleanplate import imaging
from cleanplate.bundle import attach_discriminator, load_bundle
from cleanplate.discriminator import Discriminator
from cleanplate.errors import InputError
from cleanplate.pipeline import RemovalPipeline
from cleanplate.remover import crops_to_tensors, masks_to_tensor, score_crops

from .common import (
    TrainConfig, Triplet, make_accelerator, read_meta, start_training,
)

# RORem puts its LoRA on the UNet; here on every layer of the encoder half: attention, feed-forward, convs.
LORA_TARGETS = (r".*(conv_in|to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2"
                r"|conv_shortcut|downsamplers\.0\.conv|time_emb_proj)$")


class DiscriminatorConfig(TrainConfig):
    bundle: Path = Field(description="the remover bundle: the discriminator starts from its UNet and uses its VAE")
    val_meta: list[Path] = Field(default_factory=list, description="held-out labelled meta.json for calibration")
    lora_rank: int = Field(4, ge=1, description="RORem uses 4")
    head_channels: int = Field(128, ge=8)
    target_precision: float = Field(0.9, gt=0, le=1, description="precision of 'passed' the threshold must reach")
    lr: float = 1e-4
    batch_size: int = 16


class DiscriminatorDataset(torch.utils.data.Dataset):
    """Labelled (source, result, mask) cut as serving cuts them (dilate, context window, resize to R).

    Items: ``source``/``result`` (3,R,R) float in [-1,1], ``mask`` (1,R,R) float in {0,1}, ``score`` () float.
    """

    def __init__(self, items: Sequence[Triplet], resolution: int, dilate_range: tuple[int, int], flip: bool) -> None:
        if any(item.score is None for item in items):
            raise InputError("discriminator training needs a 'score' (0 or 1) on every meta.json entry",
                             code="bad_option")
        self.items, self.resolution, self.dilate_range, self.flip = list(items), resolution, dilate_range, flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        source = imaging.decode_image(item.source).rgb
        result = imaging.decode_image(item.gt).rgb
        dilated = imaging.dilate_mask(imaging.decode_mask(item.mask), random.randint(*self.dilate_range))
        box = imaging.context_crop_box(dilated, self.resolution)
        src, res, mask = score_crops(source, result, dilated, box, self.resolution)
        if self.flip and random.random() < 0.5:
            src, res, mask = src[:, ::-1], res[:, ::-1], mask[:, ::-1]
        return {"source": crops_to_tensors([src])[0], "result": crops_to_tensors([res])[0],
                "mask": masks_to_tensor([mask])[0], "score": torch.tensor(float(item.score > 0.5))}


def calibrate(scores: np.ndarray, labels: np.ndarray, target_precision: float = 0.9) -> dict[str, Any]:
    """Pick the pass threshold on held-out scores.

    Args:
        scores: (N,) float in [0,1]; labels: (N,) {0,1}, 1 = good removal. "Passed" means ``score >= t``.
        target_precision: the threshold is the lowest t whose precision >= this (the most recall at that
            precision); if no t reaches it, the t with the best F1 ("rule" says which).
    Returns:
        dict: threshold, rule, precision, recall, f1, accuracy at it, the same at 0.5, ROC AUC, counts.
    Raises:
        InputError: fewer than one item of either label.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"calibration needs both labels; got {n_pos} positives and {n_neg} negatives",
                         code="bad_option")

    def at(t: float) -> dict[str, float]:
        passed = scores >= t
        tp = int((passed & labels).sum())
        precision = tp / max(1, int(passed.sum()))
        recall = tp / n_pos
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        return {"threshold": float(t), "precision": precision, "recall": recall, "f1": f1,
                "accuracy": float((passed == labels).mean()), "pass_rate": float(passed.mean())}

    candidates = [at(t) for t in np.unique(scores)]
    reaching = [c for c in candidates if c["precision"] >= target_precision]
    if reaching:
        best, rule = min(reaching, key=lambda c: c["threshold"]), f"lowest threshold with precision >= {target_precision}"
    else:
        best, rule = max(candidates, key=lambda c: c["f1"]), f"best F1 (precision {target_precision} not reachable)"
    # ROC AUC = P(score_pos > score_neg) (Mann-Whitney U), ties counted half.
    ranks = _average_ranks(scores)
    auc = (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {**best, "rule": rule, "at_0.5": at(0.5), "roc_auc": float(auc), "n_pos": n_pos, "n_neg": n_neg}


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


@torch.no_grad()
def score_dataset(pipe: RemovalPipeline, disc: Discriminator, dataset: DiscriminatorDataset,
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) in [0,1] and labels (N,) of a dataset, in order."""
    scores, labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        z_res, z_src = pipe.encode(batch["result"]), pipe.encode(batch["source"])
        mask = disc.mask_to_latent(batch["mask"].to(pipe.device), pipe.vae_scale_factor)
        scores.append(torch.sigmoid(disc(z_res, mask, z_src)).float().cpu())
        labels.append(batch["score"])
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def _kinds(meta: Sequence[Path]) -> list[str | None]:
    kinds: list[str | None] = []
    for path in meta:
        kinds.extend(e.get("label_kind") for e in json.loads(Path(path).read_text()))
    return kinds


def train_discriminator(cfg: DiscriminatorConfig) -> dict[str, Any]:
    """Train, calibrate on ``val_meta`` (or report uncalibrated at 0.5 without one) and write the bundle.

    ``cfg.out`` receives a copy of ``cfg.bundle`` with ``discriminator/`` added (it may be ``cfg.bundle``
    itself). Returns {"losses": [...], "calibration": {...}}.
    """
    from peft import LoraConfig, LoraModel

    bundle = load_bundle(cfg.bundle)
    accelerator = make_accelerator(cfg, "discriminator")
    pipe = RemovalPipeline.from_bundle(bundle, device=accelerator.device)
    resolution = bundle.config.resolution
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:  # set on the UNet's blocks, which the encoder takes over
        bundle.unet.enable_gradient_checkpointing()
    disc = Discriminator.from_unet(bundle.unet, bundle.conditioning, vae_scale_factor=pipe.vae_scale_factor,
                                   head_channels=cfg.head_channels)
    disc.encoder.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS,
                      init_lora_weights="gaussian")
    disc.encoder = LoraModel(disc.encoder, lora, "default")
    disc.train()
    items = read_meta(cfg.meta)
    dataset = DiscriminatorDataset(items, resolution, cfg.dilate_range, flip=True)
    n_pos = sum(1 for item in items if item.score > 0.5)
    pos_weight = torch.tensor((len(items) - n_pos) / max(1, n_pos))
    run = start_training(accelerator, cfg, disc, dataset, "discriminator")
    while run.step < cfg.max_steps:
        batch = next(run.batches)
        with torch.no_grad():
            z_res, z_src = pipe.encode(batch["result"]), pipe.encode(batch["source"])
            mask = Discriminator.mask_to_latent(batch["mask"], pipe.vae_scale_factor)
        with accelerator.autocast():
            logits = run.model(z_res, mask, z_src)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch["score"], pos_weight=pos_weight.to(logits.device))
        if (run.step + 1) % cfg.log_every == 0:
            accuracy = ((logits > 0).float() == batch["score"]).float().mean().item()
            accelerator.log({"discriminator/accuracy": accuracy}, step=run.step + 1)
        run.update(loss)
    run.bar.close()

    calibration: dict[str, Any] = {}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(run.model)
        final.encoder = final.encoder.merge_and_unload()
        final.eval().requires_grad_(False)
        if cfg.val_meta:
            d = bundle.config.dilate_px
            val = DiscriminatorDataset(read_meta(cfg.val_meta), resolution, (d, d), flip=False)
            scores, labels = score_dataset(pipe, final, val)
            calibration = calibrate(scores, labels, cfg.target_precision)
            final.threshold = calibration["threshold"]
            kinds = _kinds(cfg.val_meta)
            if any(kinds):
                by_kind: dict[str, list[bool]] = {}
                for kind, s in zip(kinds, scores, strict=True):
                    by_kind.setdefault(str(kind), []).append(bool(s >= final.threshold))
                calibration["pass_rate_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
        calibration.update({"train_items": len(items), "train_positives": n_pos, "steps": run.step,
                            "final_loss": run.final_loss,
                            "config": cfg.model_dump(mode="json")})
        out = Path(cfg.out)
        if out.resolve() != Path(cfg.bundle).resolve():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(cfg.bundle, tmp, ignore=shutil.ignore_patterns("discriminator*"))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        attach_discriminator(out, final.to("cpu"), calibration)
    accelerator.end_training()
    return {"losses": run.losses, "calibration": calibration}
