"""`cleanplate train discriminator`: RORem's quality discriminator, trained on yes/no labels, then calibrated.

Model (RORem, arXiv 2501.00740, sec. 3.2; :mod:`cleanplate.discriminator`): the remover UNet's conv_in +
down + mid blocks, frozen, with a rank-4 LoRA, and a small conv head; input (result latent, mask, source
latent). Loss: binary cross-entropy on the label (``score`` of the meta.json entry, 1 = good removal), the
positive class weighted by n_neg / n_pos so an unbalanced label set does not bias the gate.

Data: RORem ``meta.json`` entries where ``GT`` is the *result being judged* and ``score`` its label
(``cleanplate data disc-labels`` makes synthetic ones). Each item is cut exactly as serving cuts it: the
mask is dilated, the context window around it is cropped and resized to the bundle resolution.

Calibration (:func:`calibrate`): the scores are not probabilities, so after training the held-out split
(``val_meta``, photos never trained on) is scored and the pass threshold chosen for the gate's two fixed
points. When the split has ``gt`` and ``source`` candidates (``cleanplate data disc-labels --bundle`` gives
every item one of each): the thresholds at which at least ``gt_pass_min`` (90%) of the GT passes (with
``gt_pass_confidence``, 95%: a Clopper-Pearson lower bound on the GT pass rate must reach it, so the target
holds on new photos and not only on the few dozen held-out ones) and at most ``source_pass_max`` (2%) of the
sources (nothing removed) pass form an interval, and the threshold in
it with the largest Youden's J (TPR - FPR over all held-out candidates) is chosen. J does not depend on the
share of good candidates, which the label generator's rebalancing moves, where F1 and precision do. If no
threshold meets both targets, the lowest one with source pass <= ``source_pass_max`` is taken (passing an
untouched overlay is the worse error: a failed GT goes to review, a passed source ships), and
``targets_met`` is false. Without those kinds (e.g. human labels only) the rule is the earlier one: the
lowest score whose precision reaches ``target_precision``, else the F1-best. Precision, recall, F1 and
accuracy at the threshold are reported in every case; the threshold and the report are stored with the
discriminator in the bundle.

Statistics head (:class:`cleanplate.discriminator.StatsHead`, ``stats_hidden``): after the conv training (or
instead of it: ``init_discriminator`` + ``max_steps: 0`` keeps a trained discriminator as it is), a small MLP
over :func:`cleanplate.discriminator.gate_statistics` and the conv logit is fitted full-batch with L-BFGS
(:func:`fit_stats_head`) on the training candidates; the threshold is then calibrated with it in the score.
With ``pixel_stats`` the head also gets the crops' pixel statistics, which the latent cache stores.
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

from cleanplate import compositing, imaging
from cleanplate.bundle import attach_discriminator, load_bundle
from cleanplate.discriminator import Discriminator, StatsHead, pixel_statistics
from cleanplate.errors import ErrorCode, InputError
from cleanplate.pipeline import RemovalPipeline
from cleanplate.remover import crops_to_tensors, masks_to_tensor, score_crops

from .common import (
    CachedLatents,
    TrainConfig,
    Triplet,
    cached_tensors,
    make_accelerator,
    rate_lower_bound,
    read_meta,
    start_training,
)

# RORem puts its LoRA on the UNet; here on every layer of the encoder half: attention, feed-forward, convs.
LORA_TARGETS = (r".*(conv_in|to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2"
                r"|conv_shortcut|downsamplers\.0\.conv|time_emb_proj)$")


class DiscriminatorConfig(TrainConfig):
    bundle: Path = Field(description="the remover bundle: the discriminator starts from its UNet and uses its VAE")
    val_meta: list[Path] = Field(default_factory=list, description="held-out labelled meta.json for calibration")
    lora_rank: int = Field(4, ge=0, description="RORem uses 4; 0 trains the whole encoder (cheap for a small UNet; "
                                                "on our data it fit the training photos better and unseen ones "
                                                "worse: benchmarks/results/gate_full_finetune.md)")
    latent_cache: bool = Field(False, description="encode every candidate's source and result crops through the "
                                                  "frozen VAE once (cache_variants random dilations each), then train "
                                                  "on the latents; the held-out split is encoded once too")
    cache_variants: int = Field(1, ge=1, description="random dilations cached per candidate")
    cache_dir: Path | None = Field(None, description="where the latent cache lives (default: work_dir)")
    head_channels: int = Field(128, ge=8)
    target_precision: float = Field(0.9, gt=0, le=1, description="without gt/source kinds in val_meta: precision "
                                                                 "of 'passed' the threshold must reach")
    gt_pass_min: float = Field(0.9, ge=0, le=1, description="share of held-out GT candidates that must pass")
    gt_pass_confidence: float | None = Field(0.95, gt=0, lt=1, description="confidence that the GT pass rate on "
                                                                         "new photos is >= gt_pass_min (one-sided "
                                                                         "Clopper-Pearson bound); None: the "
                                                                         "held-out share itself")
    source_pass_max: float = Field(0.02, ge=0, le=1, description="share of held-out source candidates (nothing "
                                                                 "removed) that may pass")
    lr: float = 1e-4
    batch_size: int = 16
    max_steps: int = Field(1000, ge=0, description="conv training steps; 0 (with init_discriminator) keeps its "
                                                  "encoder and conv head and only fits the statistics head")
    init_discriminator: Path | None = Field(None, description="a bundle whose discriminator/ (encoder and conv head; "
                                                              "a statistics head is dropped) to start from instead "
                                                              "of the remover UNet")
    stats_hidden: int | None = Field(None, ge=0, description="fit a statistics head (cleanplate.discriminator."
                                                            "StatsHead) with this hidden width (0 = logistic "
                                                            "regression) on the training candidates; None: none")
    pixel_stats: bool = Field(False, description="the statistics head also sees the crops' pixel statistics "
                                                 "(cleanplate.discriminator.pixel_statistics); the discriminator "
                                                 "then takes the crops as well as their latents")
    stats_l2: float = Field(1e-3, ge=0, description="L2 penalty on the statistics head's weights")


class DiscriminatorDataset(torch.utils.data.Dataset):
    """Labelled (source, result, mask) cut as serving cuts them (dilate, context window, resize to R).

    Items: ``source``/``result`` (3,R,R) float in [-1,1], ``mask`` (1,R,R) float in {0,1}, ``score`` () float.
    """

    def __init__(self, items: Sequence[Triplet], resolution: int, dilate_range: tuple[int, int], flip: bool) -> None:
        if any(item.score is None for item in items):
            raise InputError("discriminator training needs a 'score' (0 or 1) on every meta.json entry",
                             code=ErrorCode.BAD_OPTION)
        self.items, self.resolution, self.dilate_range, self.flip = list(items), resolution, dilate_range, flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        source = imaging.decode_image(item.source).rgb
        result = imaging.decode_image(item.gt).rgb
        dilated = imaging.dilate_mask(imaging.decode_mask(item.mask), random.randint(*self.dilate_range))
        box = compositing.context_crop_box(dilated, self.resolution)
        src, res, mask = score_crops(source, result, dilated, box, self.resolution)
        if self.flip and random.random() < 0.5:
            src, res, mask = src[:, ::-1], res[:, ::-1], mask[:, ::-1]
        return {"source": crops_to_tensors([src])[0], "result": crops_to_tensors([res])[0],
                "mask": masks_to_tensor([mask])[0], "score": torch.tensor(float(item.score > 0.5))}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC = P(score of a good > score of a bad), ties counted half (Mann-Whitney U / (n_pos n_neg)).

    scores (N,) float, labels (N,) {0,1}. Raises InputError without both labels."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"ROC AUC needs both labels; got {n_pos} positives and {n_neg} negatives",
                         code=ErrorCode.BAD_OPTION)
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def calibrate(scores: np.ndarray, labels: np.ndarray, target_precision: float = 0.9, *,
              kinds: Sequence[str | None] | None = None, gt_pass_min: float = 0.9,
              gt_pass_confidence: float | None = None, source_pass_max: float = 0.02) -> dict[str, Any]:
    """Pick the pass threshold on held-out scores (module docstring: the rule and why).

    Args:
        scores: (N,) float in [0,1]; labels: (N,) {0,1}, 1 = good removal. "Passed" means ``score >= t``;
            the candidate thresholds are the distinct scores.
        target_precision: the fallback rule's precision target (used without ``gt``/``source`` kinds).
        kinds: (N,) ``label_kind`` per item (None entries allowed), or None.
        gt_pass_min: share in [0,1] of ``gt`` items that must pass; source_pass_max: share of ``source``
            items that may pass.
        gt_pass_confidence: when set, the GT target is met where the Clopper-Pearson lower bound of the GT pass
            count (:func:`cleanplate.training.common.rate_lower_bound`) is >= ``gt_pass_min`` (a margin for the sampling error of a few dozen GTs), not the
            observed share. The source target has no such bound: 60 sources cannot show a 2% rate with
            95% confidence even when none passes (that needs 149).
    Returns:
        dict: threshold, rule, targets_met (None for the fallback rule), precision, recall, f1, accuracy,
        pass_rate, youden_j at it; gt_pass_rate, gt_pass_bound, source_pass_rate and the feasible ``interval``
        [lowest, highest] (None when empty) with the kinds; the same metrics at 0.5 (``at_0.5``), roc_auc, n_pos,
        n_neg.
    Raises:
        InputError: fewer than one item of either label, or kinds of another length.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"calibration needs both labels; got {n_pos} positives and {n_neg} negatives",
                         code=ErrorCode.BAD_OPTION)
    kind = np.asarray([str(k) for k in kinds]) if kinds is not None else None
    if kind is not None and kind.shape != scores.shape:
        raise InputError(f"{len(kind)} kinds for {len(scores)} scores", code=ErrorCode.BAD_OPTION)
    gt = kind == "gt" if kind is not None else np.zeros_like(labels)
    src = kind == "source" if kind is not None else np.zeros_like(labels)

    def at(t: float) -> dict[str, Any]:
        passed = scores >= t
        tp = int((passed & labels).sum())
        precision = tp / max(1, int(passed.sum()))
        recall = tp / n_pos
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        row = {"threshold": float(t), "precision": precision, "recall": recall, "f1": f1,
               "accuracy": float((passed == labels).mean()), "pass_rate": float(passed.mean()),
               "youden_j": recall - int((passed & ~labels).sum()) / n_neg}
        if gt.any() and src.any():
            row |= {"gt_pass_rate": float(passed[gt].mean()), "source_pass_rate": float(passed[src].mean()),
                    "gt_pass_bound": rate_lower_bound(int(passed[gt].sum()), int(gt.sum()), gt_pass_confidence)}
        return row

    candidates = [at(t) for t in np.unique(scores)]  # ascending thresholds
    extra: dict[str, Any] = {}
    if gt.any() and src.any():
        gt_ok = [c for c in candidates if c["gt_pass_bound"] >= gt_pass_min]
        src_ok = [c for c in candidates if c["source_pass_rate"] <= source_pass_max]
        feasible = [c for c in gt_ok if c["source_pass_rate"] <= source_pass_max]
        gt_target = (f"GT pass >= {gt_pass_min:g}" if gt_pass_confidence is None else
                     f"GT pass >= {gt_pass_min:g} with {gt_pass_confidence:.0%} confidence")
        targets = f"{gt_target}, source pass <= {source_pass_max:g}"
        if feasible:
            best = max(feasible, key=lambda c: (c["youden_j"], c["threshold"]))
            rule, met = f"max Youden's J with {targets}", True
        else:
            # src_ok is empty only when sources hold the top scores: the highest threshold comes closest
            best = src_ok[0] if src_ok else candidates[-1]
            rule, met = f"lowest threshold with source pass <= {source_pass_max:g} ({targets} not reachable)", False
        extra = {"targets_met": met, "interval": [feasible[0]["threshold"], feasible[-1]["threshold"]] if feasible
                 else None, "gt_pass_min": gt_pass_min, "gt_pass_confidence": gt_pass_confidence,
                 "source_pass_max": source_pass_max}
    else:
        reaching = [c for c in candidates if c["precision"] >= target_precision]
        if reaching:
            best, rule = reaching[0], f"lowest threshold with precision >= {target_precision}"
        else:
            best, rule = max(candidates, key=lambda c: c["f1"]), f"best F1 (precision {target_precision} not reachable)"
        extra = {"targets_met": None}
    return {**best, "rule": rule, **extra, "at_0.5": at(0.5), "roc_auc": roc_auc(scores, labels), "n_pos": n_pos,
            "n_neg": n_neg}


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
def encode_candidates(pipe: RemovalPipeline, dataset: DiscriminatorDataset, variants: int = 1, seed: int = 0,
                      batch_size: int = 16, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The frozen-VAE view of every candidate, ``variants`` times (random dilations drawn from ``seed``).

    Returns ``result`` and ``source`` (N·variants, C, h, w) latents in ``dtype`` (fp16 for a cache on disk),
    ``mask`` (N·variants, 1, h, w) uint8 at latent size (:meth:`Discriminator.mask_to_latent`), ``score``
    (N·variants,) float32 labels and ``pixel_stats`` (N·variants, len(PIXEL_STAT_NAMES)) float32, the crops'
    :func:`~cleanplate.discriminator.pixel_statistics` (flip-invariant, so a flipped latent keeps them),
    variant-major. The dataset's flip is off while encoding (:class:`CachedLatents`
    flips latents); ``random`` is reseeded per variant, as SFT's latent cache does. A source crop shared by
    several candidates (every candidate of a photo, at the same dilation) is encoded once: about half of the
    VAE's work with ``disc-labels --bundle`` sets (~9 candidates per source)."""
    import hashlib

    from tqdm.auto import tqdm

    parts: dict[str, list[torch.Tensor]] = {"result": [], "source": [], "mask": [], "score": [], "pixel_stats": []}
    source_latents: dict[bytes, torch.Tensor] = {}  # digest of a source crop -> its latent

    def encode_sources(crops: list[torch.Tensor]) -> torch.Tensor:
        keys = [hashlib.sha1(c.numpy().tobytes()).digest() for c in crops]
        new = {k: c for k, c in zip(keys, crops, strict=True) if k not in source_latents}
        if new:
            latents = pipe.encode(torch.stack(list(new.values()))).to("cpu", dtype)
            source_latents.update(zip(new, latents, strict=True))
        return torch.stack([source_latents[k] for k in keys])

    flip, dataset.flip = dataset.flip, False
    with tqdm(total=variants * len(dataset), desc="discriminator latents", mininterval=10) as bar:
        for v in range(variants):
            random.seed(seed * 1000 + v)
            for start in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                parts["result"].append(pipe.encode(torch.stack([it["result"] for it in items])).to("cpu", dtype))
                parts["source"].append(encode_sources([it["source"] for it in items]))
                pixel_mask = torch.stack([it["mask"] for it in items])
                mask = Discriminator.mask_to_latent(pixel_mask, pipe.vae_scale_factor)
                parts["mask"].append(mask.to(torch.uint8))
                parts["pixel_stats"].append(pixel_statistics(torch.stack([it["result"] for it in items]), pixel_mask,
                                                             torch.stack([it["source"] for it in items])))
                parts["score"].append(torch.stack([it["score"] for it in items]))
                bar.update(len(items))
    dataset.flip = flip
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def score_latents(disc: Discriminator, latents: dict[str, torch.Tensor], device: Any = "cpu",
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) in [0,1] and labels (N,) of :func:`encode_candidates`' tensors, in order."""
    scores = []
    for start in range(0, len(latents["score"]), batch_size):
        part = {k: v[start:start + batch_size].to(device).float() for k, v in latents.items()}
        logit = disc.logit_from(part["result"], part["mask"], part["source"], part.get("pixel_stats"))
        scores.append(torch.sigmoid(logit).float().cpu())
    return torch.cat(scores).numpy(), latents["score"].float().numpy()


def score_dataset(pipe: RemovalPipeline, disc: Discriminator, dataset: DiscriminatorDataset,
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) in [0,1] and labels (N,) of a dataset, in order."""
    latents = encode_candidates(pipe, dataset, batch_size=batch_size, dtype=torch.float32)
    return score_latents(disc, latents, pipe.device)


def _entries(meta: Sequence[Path]) -> list[dict[str, Any]]:
    """The raw entries of meta.json files, in :func:`read_meta` order (for label_kind and the metrics)."""
    entries: list[dict[str, Any]] = []
    for path in meta:
        entries.extend(json.loads(Path(path).read_text()))
    return entries


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (``scipy.stats.spearmanr``; ties get average ranks); None for fewer than
    3 pairs or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def pass_rates_by_kind(scores: np.ndarray, kinds: Sequence[str | None], threshold: float) -> dict[str, float]:
    """Share of ``score >= threshold`` per label kind (sorted by kind)."""
    by_kind: dict[str, list[bool]] = {}
    for kind, s in zip(kinds, scores, strict=True):
        by_kind.setdefault(str(kind), []).append(bool(s >= threshold))
    return {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}


def _cache_path(cfg: DiscriminatorConfig, resolution: int, meta: Sequence[Path], dilate: tuple[int, int],
                variants: int) -> Path:
    """The cache file of these candidates as this bundle's VAE sees them at ``resolution`` (the bundle's): named
    by a digest of the meta.json files and the VAE weights, so new labels or a new VAE never reuse stale latents."""
    import hashlib

    digest = hashlib.sha256()
    for path in [*meta, Path(cfg.bundle) / "vae" / "diffusion_pytorch_model.safetensors"]:
        digest.update(Path(path).read_bytes())
    # "px": the cache holds pixel_stats too (caches written before them lack the key)
    name = f"disc_latents_px_r{resolution}_d{dilate[0]}-{dilate[1]}_x{variants}_s{cfg.seed}_{digest.hexdigest()[:12]}"
    return (cfg.cache_dir or cfg.resolved_work_dir) / f"{name}.safetensors"


def _train_conv(accelerator: Any, cfg: DiscriminatorConfig, pipe: RemovalPipeline, disc: Discriminator,
                dataset: torch.utils.data.Dataset, pos_weight: torch.Tensor) -> tuple[Discriminator, list[float], int, Any]:
    """RORem's training of the encoder (LoRA or whole) and conv head: (model, losses, steps, final loss)."""
    run = start_training(accelerator, cfg, disc, dataset, "discriminator")
    while run.step < cfg.max_steps:
        batch = next(run.batches)
        if cfg.latent_cache:
            z_res, z_src, mask = batch["result"], batch["source"], batch["mask"]
        else:
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
    return accelerator.unwrap_model(run.model), run.losses, run.step, run.final_loss


@torch.no_grad()
def stats_inputs_of(disc: Discriminator, latents: dict[str, torch.Tensor], device: Any = "cpu",
                    batch_size: int = 64) -> torch.Tensor:
    """(N, len(STAT_NAMES) + 1) float32 on the CPU: :meth:`Discriminator.stats_inputs` of every candidate in
    :func:`encode_candidates`' tensors, in order (what the statistics head is fitted on)."""
    inputs = []
    for start in range(0, len(latents["score"]), batch_size):
        z = {k: latents[k][start:start + batch_size].to(device).float() for k in ("result", "mask", "source")}
        pixels = latents["pixel_stats"][start:start + batch_size].to(device).float() if disc.pixel_stats else None
        logit = disc.conv_logit(z["result"], z["mask"], z["source"])
        inputs.append(disc.stats_inputs(z["result"], z["mask"], z["source"], logit, pixels).float().cpu())
    return torch.cat(inputs)


def fit_stats_head(inputs: torch.Tensor, labels: torch.Tensor, hidden: int, *, l2: float = 1e-3,
                   max_iter: int = 500, seed: int = 0) -> tuple[StatsHead, dict[str, Any]]:
    """Fit a statistics head on labelled candidates.

    Args:
        inputs: (N, K) float32 (:func:`stats_inputs_of`); labels: (N,) {0,1}, 1 = good.
        hidden: the head's hidden width, 0 for logistic regression.
        l2: penalty on the weights (not the biases); max_iter: L-BFGS iterations (full batch).
    Returns:
        The head (eval mode, frozen, CPU) and {"n", "positives", "train_roc_auc", "final_loss", "hidden", "l2"}.
    Raises:
        InputError: the candidates carry only one label.
    Loss: binary cross-entropy with the positive class weighted n_neg / n_pos, as the conv head's training.
    """
    x, y = inputs.float(), labels.float()
    n_pos = int((y > 0.5).sum())
    if n_pos in (0, len(y)):
        raise InputError(f"the statistics head needs both labels; got {n_pos} of {len(y)} positive",
                         code=ErrorCode.BAD_OPTION)
    torch.manual_seed(seed)
    head = StatsHead(x.shape[1], hidden)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp_min(1e-6))
    pos_weight = torch.tensor((len(y) - n_pos) / n_pos)
    weights = [p for name, p in head.named_parameters() if name.endswith("weight")]
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x), y, pos_weight=pos_weight)
        loss = loss + l2 * sum(w.square().sum() for w in weights)
        loss.backward()
        return loss

    final_loss = float(optimizer.step(closure).detach())
    head.eval().requires_grad_(False)
    with torch.no_grad():
        train_auc = roc_auc(head(x).numpy(), y.numpy())
    return head, {"n": len(y), "positives": n_pos, "train_roc_auc": train_auc, "final_loss": final_loss,
                  "hidden": hidden, "l2": l2}


def train_discriminator(cfg: DiscriminatorConfig) -> dict[str, Any]:
    """Train, calibrate on ``val_meta`` (or report uncalibrated at 0.5 without one) and write the bundle.

    ``cfg.out`` receives a copy of ``cfg.bundle`` with ``discriminator/`` added (it may be ``cfg.bundle``
    itself). Returns {"losses": [...], "calibration": {...}}.
    """
    from peft import LoraConfig, LoraModel

    if cfg.pixel_stats and cfg.stats_hidden is None:
        raise InputError("pixel_stats feeds the statistics head: set stats_hidden too", code=ErrorCode.BAD_OPTION)
    bundle = load_bundle(cfg.bundle)
    accelerator = make_accelerator(cfg, "discriminator")
    pipe = RemovalPipeline.from_bundle(bundle, device=accelerator.device)
    resolution = bundle.config.resolution
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:  # set on the UNet's blocks, which the encoder takes over
        bundle.unet.enable_gradient_checkpointing()
    if cfg.init_discriminator is not None:
        disc = load_bundle(cfg.init_discriminator).discriminator
        if disc is None:
            raise InputError(f"init_discriminator {cfg.init_discriminator} has no discriminator/", code=ErrorCode.BAD_OPTION)
        disc.requires_grad_(False).stats_head = None
        disc.pixel_stats = False
        disc.head.requires_grad_(True)
    else:
        disc = Discriminator.from_unet(bundle.unet, bundle.conditioning, vae_scale_factor=pipe.vae_scale_factor,
                                       head_channels=cfg.head_channels)
    disc.encoder.requires_grad_(not cfg.lora_rank)  # the bundle's UNet comes frozen
    if cfg.lora_rank and cfg.max_steps:
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS,
                          init_lora_weights="gaussian")
        disc.encoder = LoraModel(disc.encoder, lora, "default")
    disc.to(pipe.device).train()
    items = read_meta(cfg.meta)
    dataset: torch.utils.data.Dataset = DiscriminatorDataset(items, resolution, cfg.dilate_range, flip=True)
    train_latents: dict[str, torch.Tensor] | None = None
    if cfg.latent_cache:
        path = _cache_path(cfg, resolution, cfg.meta, cfg.dilate_range, cfg.cache_variants)
        train_latents = cached_tensors(path, lambda: encode_candidates(pipe, dataset, cfg.cache_variants, cfg.seed))
        dataset = CachedLatents(train_latents)
    n_pos = sum(1 for item in items if item.score > 0.5)
    pos_weight = torch.tensor((len(items) - n_pos) / max(1, n_pos))
    losses: list[float] = []
    steps, final_loss, final = 0, None, disc
    if cfg.max_steps:
        final, losses, steps, final_loss = _train_conv(accelerator, cfg, pipe, disc, dataset, pos_weight)

    calibration: dict[str, Any] = {}
    if accelerator.is_main_process:
        if cfg.lora_rank and cfg.max_steps:
            final.encoder = final.encoder.merge_and_unload()
        final.eval().requires_grad_(False)
        if cfg.stats_hidden is not None:
            if train_latents is None:
                train_latents = encode_candidates(pipe, DiscriminatorDataset(items, resolution, cfg.dilate_range,
                                                                             flip=False), dtype=torch.float32)
            final.pixel_stats = cfg.pixel_stats
            head, stats_fit = fit_stats_head(stats_inputs_of(final, train_latents, pipe.device),
                                             train_latents["score"], cfg.stats_hidden, l2=cfg.stats_l2, seed=cfg.seed)
            final.stats_head = head.to(pipe.device)
        if cfg.val_meta:
            d = bundle.config.dilate_px
            val = DiscriminatorDataset(read_meta(cfg.val_meta), resolution, (d, d), flip=False)
            if cfg.latent_cache:
                path = _cache_path(cfg, resolution, cfg.val_meta, (d, d), 1)
                latents = cached_tensors(path, lambda: encode_candidates(pipe, val))
                scores, labels = score_latents(final, latents, pipe.device)
            else:
                scores, labels = score_dataset(pipe, final, val)
            entries = _entries(cfg.val_meta)
            kinds = [e.get("label_kind") for e in entries]
            calibration = calibrate(scores, labels, cfg.target_precision, kinds=kinds if any(kinds) else None,
                                    gt_pass_min=cfg.gt_pass_min, gt_pass_confidence=cfg.gt_pass_confidence,
                                    source_pass_max=cfg.source_pass_max)
            final.threshold = calibration["threshold"]
            if any(kinds):
                calibration["pass_rate_by_kind"] = pass_rates_by_kind(scores, kinds, final.threshold)
            removals = [(s, e["psnr_mask_db"]) for s, e in zip(scores, entries, strict=True)
                        if e.get("label_kind") == "removal" and e.get("psnr_mask_db") is not None]
            if removals:  # does the gate rank the bundle's own removals as their agreement with GT does?
                calibration["removal_spearman_psnr"] = spearman(*zip(*removals, strict=False))
                calibration["removal_n"] = len(removals)
        if cfg.stats_hidden is not None:
            calibration["stats_head_fit"] = stats_fit
        calibration.update({"train_items": len(items), "train_positives": n_pos, "steps": steps,
                            "final_loss": final_loss,
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
    return {"losses": losses, "calibration": calibration}
