"""Shared pieces of the trainers: config files, RORem ``meta.json`` data, accelerate loop with checkpoints.

Every trainer reads one config format: a JSON file whose keys are the fields of its pydantic config
class, with command-line options overriding single keys. Runs are resumable: ``work_dir/checkpoints/
step_N`` holds accelerate state (model, optimizer, LR scheduler, RNG) and the next run of the same
command continues from the newest one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cleanplate import compositing, imaging
from cleanplate.errors import ErrorCode, InputError

log = logging.getLogger("cleanplate.training")
CONFIG_DIR = Path(__file__).parent / "configs"


class TrainConfig(BaseModel):
    """Fields every trainer shares."""

    model_config = ConfigDict(extra="forbid")

    meta: list[Path] = Field(description="one or more RORem meta.json files")
    out: Path = Field(description="output directory (a bundle, or a vae/ directory for `train vae`)")
    work_dir: Path | None = Field(None, description="checkpoints and TensorBoard logs; default: OUT + '.work'")
    resolution: int = Field(256, ge=32, description="training crop side in px")
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(1000, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(20, ge=1)
    num_workers: int = Field(0, ge=0)
    dilate_range: tuple[int, int] = Field((0, 8), description="random mask dilation in px, as serving dilates")
    crop_window: Literal["random", "serving"] = Field(
        "random", description="random: a random square of the image's short side; serving: the context window "
                              "that serving cuts around the dilated mask (compositing.context_crop_box)")

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.out.with_name(self.out.name + ".work")


def load_config(cls: type[BaseModel], path: Path | None, overrides: dict[str, Any]) -> Any:
    """Config from a JSON file (optional) with non-None overrides on top. Raises InputError on bad fields."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read config {path}: {exc}", code=ErrorCode.BAD_OPTION) from exc
    data.update({k: v for k, v in overrides.items() if v is not None and v != []})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"config: {'.'.join(map(str, err['loc']))}: {err['msg']}", code=ErrorCode.BAD_OPTION) from exc


def rate_lower_bound(hits: int, n: int, confidence: float | None) -> float:
    """One-sided Clopper-Pearson lower confidence bound on a rate (Clopper & Pearson 1934): the
    ``1 - confidence`` quantile of Beta(hits, n - hits + 1); 0 when ``hits`` is 0; ``hits / n`` when
    ``confidence`` is None. A threshold set where exactly 90% of 60 held-out GTs pass passes about 90% of new
    GTs half the time; requiring this bound >= 90% keeps it there with the given confidence.

    Args:
        hits: items counted, 0..n; n: items (> 0); confidence: in (0, 1), or None.
    Returns:
        float in [0, 1].
    """
    if confidence is None:
        return hits / n
    if hits == 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(1.0 - confidence, hits, n - hits + 1))


def rate_upper_bound(hits: int, n: int, confidence: float | None) -> float:
    """One-sided Clopper-Pearson upper confidence bound on a rate: 1 - :func:`rate_lower_bound` of the misses
    (the ``confidence`` quantile of Beta(hits + 1, n - hits)); ``hits / n`` when ``confidence`` is None. With 169
    held-out clean photos, 3 detected (1.8%) bounds the rate on new photos by 4.5% with 95% confidence, 5 (3.0%)
    only by 6.1%. Arguments as :func:`rate_lower_bound`; returns a float in [0, 1]."""
    if confidence is None:
        return hits / n
    return 1.0 - rate_lower_bound(n - hits, n, confidence)


def alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 (float32, (T,)) of the bundle's noise schedule, via diffusers' DDPMScheduler."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config}).alphas_cumprod


def load_model_config(path_or_name: str | Path) -> dict[str, Any]:
    """A diffusers model config: a JSON path, or the name of one in ``training/configs`` (e.g. "tiny_unet")."""
    path = Path(path_or_name)
    if not path.exists():
        path = CONFIG_DIR / f"{path_or_name}.json"
    if not path.exists():
        raise InputError(f"model config not found: {path_or_name}", code=ErrorCode.BAD_OPTION)
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


# -- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Triplet:
    """One RORem training item; ``score`` is the human/auto label (1 = good removal) when present."""

    source: Path
    mask: Path
    gt: Path
    score: float | None = None


def read_meta_entries(paths: Sequence[str | Path], keys: Sequence[str],
                      what: str) -> list[tuple[list[Path], dict[str, Any]]]:
    """Read meta.json files (JSON lists of objects) whose ``keys`` hold paths relative to the file.

    Returns per entry, in file order: the paths under ``keys`` (resolved against the file's folder, in the
    order of ``keys``) and the entry itself. Raises InputError naming the file and entry on a missing key,
    naming the file when it does not read, and naming ``what`` ("training items") when there is no entry.
    """
    need = ", ".join(keys[:-1]) + " and " + keys[-1]
    out: list[tuple[list[Path], dict[str, Any]]] = []
    for meta in map(Path, paths):
        try:
            entries = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {meta}: {exc}", code=ErrorCode.BAD_OPTION) from exc
        for i, e in enumerate(entries):
            try:
                out.append(([meta.parent / e[k] for k in keys], e))
            except (KeyError, TypeError) as exc:
                raise InputError(f"{meta} entry {i}: needs {need}", code=ErrorCode.BAD_OPTION) from exc
    if not out:
        raise InputError(f"no {what} in {', '.join(map(str, paths))}", code=ErrorCode.BAD_OPTION)
    return out


def read_meta(paths: Sequence[str | Path]) -> list[Triplet]:
    """Read RORem ``meta.json`` files: JSON lists of {"source","mask","GT"[,"score"]}, paths relative to the file.

    Raises InputError naming the file and entry on a missing key.
    """
    return [Triplet(*files, e.get("score"))
            for files, e in read_meta_entries(paths, ("source", "mask", "GT"), "training items")]


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 -> (3,H,W) float32 in [-1,1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0


class TripletDataset(torch.utils.data.Dataset):
    """(source, mask, GT) at ``resolution``: a square crop resized as serving resizes, flip, mask dilation.

    Items: dict of ``source``/``gt`` (3,R,R) float in [-1,1], ``mask`` (1,R,R) float in {0,1}, and
    ``score`` () float when the item has a label.
    The random dilation mirrors serving, where the model sees the dilated mask. ``crop_window``:
    "random" cuts a random square of the image's short side and dilates in crop pixels; "serving" dilates
    the full-size mask and cuts the context window serving cuts (:func:`cleanplate.compositing.context_crop_box`:
    1:1 around small masks, shrunk for large ones), so training sees what the served model sees.
    """

    def __init__(self, items: Sequence[Triplet], resolution: int, dilate_range: tuple[int, int] = (0, 0),
                 flip: bool = True, crop_window: str = "random") -> None:
        if crop_window not in ("random", "serving"):
            raise InputError(f"crop_window must be random or serving, got {crop_window!r}", code=ErrorCode.BAD_OPTION)
        self.items, self.resolution, self.dilate_range, self.flip = list(items), resolution, dilate_range, flip
        self.crop_window = crop_window

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        source = np.asarray(Image.open(item.source).convert("RGB"))
        gt = np.asarray(Image.open(item.gt).convert("RGB"))
        mask = imaging.decode_mask(item.mask)
        if self.crop_window == "serving":
            dilated = imaging.dilate_mask(mask, random.randint(*self.dilate_range))
            box = compositing.context_crop_box(dilated, self.resolution)
            source, mask = compositing.crop_to_model(source, dilated, box, self.resolution)
            gt, _ = compositing.crop_to_model(gt, dilated, box, self.resolution)
        else:
            h, w = mask.shape
            side = min(h, w)
            box = compositing.CropBox(random.randint(0, w - side), random.randint(0, h - side), side)
            source, crop_mask = compositing.crop_to_model(source, mask, box, self.resolution)
            gt, _ = compositing.crop_to_model(gt, mask, box, self.resolution)
            mask = imaging.dilate_mask(crop_mask, random.randint(*self.dilate_range))
        if self.flip and random.random() < 0.5:
            source, gt, mask = source[:, ::-1], gt[:, ::-1], mask[:, ::-1]
        out = {
            "source": to_tensor(source),
            "gt": to_tensor(gt),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).float()[None],  # bool -> {0., 1.}
        }
        if item.score is not None:
            out["score"] = torch.tensor(float(item.score))
        return out


def infinite_loader(dataset: torch.utils.data.Dataset, cfg: TrainConfig, accelerator: Any) -> Iterator[dict]:
    """Endless shuffled batches in a seeded order (a resumed run reshuffles; it does not replay the epoch)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) >= cfg.batch_size,
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
    )
    loader = accelerator.prepare(loader)
    while True:
        yield from loader


# -- accelerate loop ---------------------------------------------------------------------------------
def make_accelerator(cfg: TrainConfig, project: str) -> Any:
    """An ``accelerate.Accelerator`` (mixed precision, TensorBoard under ``work_dir/logs``), seeded; saves the config."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    work = cfg.resolved_work_dir
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(work), logging_dir=str(work / "logs")),
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(cfg.model_dump_json(indent=2))
        accelerator.init_trackers(project)
    return accelerator


def lr_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to 10% (per optimizer step)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def checkpoints(cfg: TrainConfig) -> list[Path]:
    root = cfg.resolved_work_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "done").exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resume(accelerator: Any, cfg: TrainConfig) -> int:
    """Load the newest complete checkpoint; returns the step to continue from (0 if none)."""
    found = checkpoints(cfg)
    if not found:
        return 0
    accelerator.load_state(str(found[-1]))
    step = int(found[-1].name.split("_")[1])
    accelerator.print(f"resumed from {found[-1]} (step {step})")
    return step


def save_checkpoint(accelerator: Any, cfg: TrainConfig, step: int) -> None:
    """accelerate state under ``step_N``; a ``done`` marker makes a checkpoint count, old ones are pruned.

    Every process calls ``save_state`` (the main one writes model, optimizer and scheduler; each process
    its own RNG state, ``random_states_<rank>.pkl``, so a resumed multi-process run restores them all).
    """
    accelerator.wait_for_everyone()
    path = cfg.resolved_work_dir / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    (path / "done").write_text(str(step))
    for old in checkpoints(cfg)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def optimizer_step(accelerator: Any, cfg: TrainConfig, loss: torch.Tensor, params: Any, optimizer: Any,
                   scheduler: Any, step: int, losses: list[float], bar: Any, tag: str) -> int:
    """Backward, clip, update, then log (``{tag}/loss``: mean of the last ``log_every`` losses) and
    checkpoint on schedule. Appends the loss to ``losses``; returns the new step count."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    losses.append(loss.item())
    bar.update(1)
    if step % cfg.log_every == 0:
        recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
        accelerator.log({f"{tag}/loss": recent, f"{tag}/lr": scheduler.get_last_lr()[0]}, step=step)
        bar.set_postfix(loss=f"{recent:.5f}")
    if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
        save_checkpoint(accelerator, cfg, step)
    return step


class CachedLatents(torch.utils.data.Dataset):
    """Items of a latent cache: ``{key: tensors[key][i] as float32}``; with ``flip``, a random horizontal flip
    of every per-item map (rank >= 2 per item: latents, masks) together (the VAE is convolutional, so this
    approximates encoding the flipped image); per-item scalars and vectors are returned as they are."""

    def __init__(self, tensors: dict[str, torch.Tensor], flip: bool = True) -> None:
        self.tensors, self.flip = tensors, flip

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        flip = self.flip and random.random() < 0.5
        return {k: (v[i].flip(-1) if flip and v.ndim >= 3 else v[i]).float() for k, v in self.tensors.items()}


def cached_tensors(path: Path, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors in the safetensors file ``path``, or ``build()``'s, written there atomically first.

    The trainers' latent caches (frozen-VAE latents encoded once; SFT and the discriminator) live here, so a
    killed build leaves no half-written cache that a rerun would trust."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(str(path))
    tensors = {k: v.contiguous() for k, v in build().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return tensors


def progress(accelerator: Any, start: int, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True, mininterval=5)


@dataclass
class TrainingRun:
    """The state of one trainer's loop, from :func:`start_training`; :meth:`update` takes one step."""

    accelerator: Any
    cfg: TrainConfig
    tag: str
    model: Any  # prepared by accelerate (wrapped under DDP)
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    step: int
    batches: Iterator[dict]
    bar: Any
    losses: list[float] = field(default_factory=list)

    def update(self, loss: torch.Tensor) -> None:
        """Backward, optimizer step, logging and checkpoints (:func:`optimizer_step`)."""
        self.step = optimizer_step(self.accelerator, self.cfg, loss, self.params, self.optimizer, self.scheduler,
                                   self.step, self.losses, self.bar, self.tag)

    @property
    def final_loss(self) -> float:
        """Mean of the last 50 losses (0 if none)."""
        return sum(self.losses[-50:]) / max(1, len(self.losses[-50:]))


def start_training(accelerator: Any, cfg: TrainConfig, model: torch.nn.Module, dataset: torch.utils.data.Dataset,
                   tag: str, checkpointed: Sequence[Any] = ()) -> TrainingRun:
    """AdamW over ``model``'s trainable parameters with :func:`lr_schedule`, prepared by accelerate,
    resumed from the newest checkpoint; endless batches of ``dataset`` and a progress bar named ``tag``.
    ``checkpointed``: more objects with ``state_dict``/``load_state_dict`` (e.g. EMA weights) saved and
    restored with the checkpoints."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(cfg, optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(scheduler)
    for obj in checkpointed:
        accelerator.register_for_checkpointing(obj)
    step = resume(accelerator, cfg)
    batches = infinite_loader(dataset, cfg, accelerator)
    return TrainingRun(accelerator, cfg, tag, model, params, optimizer, scheduler, step, batches,
                       progress(accelerator, step, cfg.max_steps, tag))
