"""``cleanplate train dpo|rwd|grpo`` and ``cleanplate data dpo-pairs`` (registered in :mod:`cleanplate.cli`).

Each trainer reads its JSON config (the fields of its pydantic config class), with these options
overriding single keys; bad input exits 2 with one line ``error: ...``. Under ``accelerate launch`` they
run on several processes (``python -m cleanplate.cli`` as the module).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cleanplate.cli_options import BatchOpt, ConfigOpt, LrOpt, MetaOpt, ResOpt, SeedOpt, StepsOpt, WorkOpt, say

OutOpt = Annotated[Optional[Path], typer.Option(help="output bundle directory")]
BundleOpt = Annotated[Optional[Path], typer.Option(help="starting bundle (policy base; LoRA disabled = reference)")]
RankOpt = Annotated[Optional[int], typer.Option(help="LoRA rank")]


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch, once
        say(message)


def _overrides(**kw: object) -> dict:
    return kw


def train_dpo_cmd(config: ConfigOpt = None, meta: MetaOpt = None, out: OutOpt = None, max_steps: StepsOpt = None,
                  batch_size: BatchOpt = None, lr: LrOpt = None, resolution: ResOpt = None, seed: SeedOpt = None,
                  work_dir: WorkOpt = None, bundle: BundleOpt = None, lora_rank: RankOpt = None,
                  beta: Annotated[Optional[float], typer.Option(help="DPO β (absorbs T); SDXL default 5000")] = None,
                  mask_loss: Annotated[Optional[bool], typer.Option("--mask-loss/--no-mask-loss",
                                                                    help="denoising errors inside the mask only")] = None,
                  ) -> None:
    """Diffusion-DPO on preference pairs {source, mask, preferred, rejected}; reference = the starting bundle.
    Writes a bundle (LoRA fused). Resumable."""
    from .common import load_config
    from .dpo import DPOConfig, train_dpo

    cfg = load_config(DPOConfig, config, _overrides(
        meta=meta, out=out, max_steps=max_steps, batch_size=batch_size, lr=lr, resolution=resolution, seed=seed,
        work_dir=work_dir, bundle=bundle, lora_rank=lora_rank, beta=beta, mask_loss=mask_loss))
    result = train_dpo(cfg)
    acc = result["implicit_acc"][-50:]
    _say(f"wrote {cfg.out} (implicit accuracy {sum(acc) / max(1, len(acc)):.3f} over the last {len(acc)} steps)")


def train_rwd_cmd(config: ConfigOpt = None, meta: MetaOpt = None, out: OutOpt = None, max_steps: StepsOpt = None,
                  batch_size: BatchOpt = None, lr: LrOpt = None, resolution: ResOpt = None, seed: SeedOpt = None,
                  work_dir: WorkOpt = None,
                  bundle: Annotated[Optional[Path], typer.Option(help="SFT bundle to distill (the teacher)")] = None,
                  lora_rank: RankOpt = None,
                  reward: Annotated[Optional[str], typer.Option(help="auto | label | data | target")] = None,
                  temperature: Annotated[Optional[float], typer.Option(help="τ of the weights exp(s/τ)")] = None,
                  threshold: Annotated[Optional[float], typer.Option(help="weight 0 below this score")] = None,
                  ) -> None:
    """Reward-weighted LCM distillation: discriminator scores (or labels) weight or filter the consistency
    loss. Writes an LCM bundle (lcm_lora/). Resumable."""
    from .common import load_config
    from .rwd import RWDConfig, train_rwd

    cfg = load_config(RWDConfig, config, _overrides(
        meta=meta, out=out, max_steps=max_steps, batch_size=batch_size, lr=lr, resolution=resolution, seed=seed,
        work_dir=work_dir, bundle=bundle, lora_rank=lora_rank, reward=reward, temperature=temperature,
        threshold=threshold))
    result = train_rwd(cfg)
    _say(f"wrote {cfg.out} (scores: {result['reward']})")


def train_grpo_cmd(config: ConfigOpt = None, meta: MetaOpt = None, out: OutOpt = None, max_steps: StepsOpt = None,
                   batch_size: BatchOpt = None, lr: LrOpt = None, resolution: ResOpt = None, seed: SeedOpt = None,
                   work_dir: WorkOpt = None, bundle: BundleOpt = None, lora_rank: RankOpt = None,
                   group_size: Annotated[Optional[int], typer.Option(help="rollouts per (image, mask)")] = None,
                   kl_coef: Annotated[Optional[float], typer.Option(help="KL-to-reference weight (0 = off)")] = None,
                   matting_bias: Annotated[Optional[float], typer.Option(help="spatial-matting bias (0 = off)")] = None,
                   reward_bundle: Annotated[Optional[Path], typer.Option(help="bundle whose discriminator scores "
                                                                              "(default: --bundle)")] = None,
                   ) -> None:
    """GRPO on the LCM sampler with RePainter's composite reward and spatial matting and Edit-GRPO's region
    split. Writes a bundle (LoRA fused). Resumable."""
    from .common import load_config
    from .grpo import GRPOConfig, train_grpo

    cfg = load_config(GRPOConfig, config, _overrides(
        meta=meta, out=out, max_steps=max_steps, batch_size=batch_size, lr=lr, resolution=resolution, seed=seed,
        work_dir=work_dir, bundle=bundle, lora_rank=lora_rank, group_size=group_size, kl_coef=kl_coef,
        matting_bias=matting_bias, reward_bundle=reward_bundle))
    result = train_grpo(cfg)
    tail = result["reward"][-10:]
    _say(f"wrote {cfg.out} (mean reward {sum(tail) / max(1, len(tail)):.4f} over the last {len(tail)} iterations)")


def data_dpo_pairs_cmd(
    meta: Annotated[list[Path], typer.Option(help="RORem meta.json with (source, mask, GT) (repeatable)")],
    out: Annotated[Path, typer.Option(help="output directory (meta.json, rejected/)")],
    per_item: Annotated[int, typer.Option(help="pairs per input item")] = 1,
    seed: Annotated[int, typer.Option(help="seed; same seed, same pairs")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N input items")] = None,
) -> None:
    """Synthetic preference pairs for `train dpo`: preferred = GT, rejected = a failed removal (source left
    in, partial, blurred or smeared fill, re-drawn text)."""
    from .dpo import make_dpo_pairs

    _say(f"wrote {make_dpo_pairs(meta, out, per_item=per_item, seed=seed, limit=limit)}")
