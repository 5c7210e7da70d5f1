"""`cleanplate train rwd`: reward-weighted LCM distillation.

The LCM-LoRA distillation of :mod:`.lcm` (Luo et al., arXiv 2310.04378, Alg. 1), with each item's
consistency loss weighted by a removal-quality score s_i in [0,1], in the manner of reward-weighted
regression (Peters & Schaal 2007; advantage-weighted regression, Peng et al. 2019): the student imitates
the teacher more where the removal is judged good, and not at all below a threshold.

    w_i = 1[s_i >= threshold] · exp(s_i / τ) / Z,      Z = mean_j 1[s_j >= threshold] · exp(s_j / τ)
    L   = mean_i w_i · d(f_θ(z_{t_{n+k}}), stopgrad f_θ(ẑ_{t_n}))_i

Z is taken over the global batch (gathered from every process), so the weights average to 1 and the
loss keeps LCM's scale; ``temperature`` None gives uniform weights among the kept items (pure filter),
``threshold`` None keeps every item (pure weighting); a batch with nothing kept contributes zero loss.

Scores (``reward``):

* ``label``: the meta.json entry's ``score`` (a human label, or the data flywheel's auto-label);
* ``data``: the RORem discriminator's score of the item's result (its ``GT``) for (source, mask);
* ``target``: the discriminator's score of the distillation target itself, f_θ(ẑ_{t_n}, t_n) decoded and
  composited into the source (the teacher's one-step estimate is judged: distil it where it is good);
* ``auto`` (default): ``label`` when every item has a score, else ``data``.

The discriminator is that of ``reward_bundle`` (default: ``bundle``). The output is an LCM bundle as
``train lcm`` writes it (the SFT UNet + ``lcm_lora/``). The consistency terms are :mod:`.lcm`'s, which read
the UNet's output as the bundle's ``scheduler.prediction_type`` says (ε, x0 or v); the distillation target
scored by ``target`` is a clean-latent estimate whatever the type, and the output keeps the type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from cleanplate.bundle import read_config
from cleanplate.errors import ErrorCode, InputError
from cleanplate.pipeline import RemovalPipeline

from .common import TrainingRun, read_meta
from .lcm import ConsistencyTerms, LCMConfig, distill
from .rl_common import discriminator_scorer


class RWDConfig(LCMConfig):
    reward: Literal["auto", "label", "data", "target"] = Field(
        "auto", description="label: meta.json score; data: discriminator on GT; target: on the distillation target")
    temperature: float | None = Field(0.25, gt=0, description="τ of exp(s/τ); None: uniform weights (filter only)")
    threshold: float | None = Field(None, ge=0, le=1, description="items scoring below get weight 0; None: keep all")
    reward_bundle: Path | None = Field(None, description="bundle whose discriminator scores (default: bundle)")
    name: str = "cleanplate-rwd"


def reward_weights(scores: torch.Tensor, temperature: float | None, threshold: float | None,
                   population: torch.Tensor | None = None) -> torch.Tensor:
    """Self-normalised reward weights (see the module docstring).

    Args:
        scores: (B,) float in [0,1], the items to weigh.
        temperature: τ > 0, or None for uniform weights among kept items.
        threshold: items with s < threshold get 0; None keeps all.
        population: (M,) scores the normaliser Z is taken over (the global batch; default ``scores``).
    Returns:
        (B,) float32 >= 0; non-decreasing in the score; mean 1 over ``population`` when anything is kept
        there, all zeros otherwise.
    """
    s = scores.float()
    pop = s if population is None else population.float().to(s.device)
    shift = pop.max() if temperature is not None else 0.0  # exp((s - max)/τ): no overflow, same ratios

    def unnormalised(x: torch.Tensor) -> torch.Tensor:
        e = torch.exp((x - shift) / temperature) if temperature is not None else torch.ones_like(x)
        return e * (x >= threshold).float() if threshold is not None else e

    z = unnormalised(pop).mean()
    if z <= 0:
        return torch.zeros_like(s)
    return unnormalised(s) / z


class _Weigher:
    """Scores a batch, turns the scores into weights and records both (``history``)."""

    def __init__(self, cfg: RWDConfig, mode: str) -> None:
        self.cfg, self.mode = cfg, mode
        self.scorer: RemovalPipeline | None = None  # built on the first call, on the run's device
        self.history: dict[str, list] = {"scores": [], "weights": []}

    def scores(self, batch: dict, pipe: RemovalPipeline, terms: ConsistencyTerms) -> torch.Tensor:
        if self.mode == "label":
            return batch["score"].float()
        source, mask = batch["source"], batch["mask"]
        if self.mode == "data":
            result = batch["gt"]
        else:
            with torch.no_grad():
                decoded = pipe.decode(terms.target).to(source.device)
            result = decoded * mask + source * (1.0 - mask)
        return self.scorer.score(result, source, mask).clone().to(source.device)

    def __call__(self, batch: dict, pipe: RemovalPipeline, terms: ConsistencyTerms, run: TrainingRun) -> torch.Tensor:
        if self.mode != "label" and self.scorer is None:
            self.scorer = discriminator_scorer(self.cfg.reward_bundle or self.cfg.bundle, run.accelerator.device,
                                               f"reward {self.mode!r}")
        s = self.scores(batch, pipe, terms)
        everyone = run.accelerator.gather(s.to(run.accelerator.device))
        w = reward_weights(s, self.cfg.temperature, self.cfg.threshold, everyone)
        self.history["scores"].append(s.tolist())
        self.history["weights"].append(w.tolist())
        if (run.step + 1) % self.cfg.log_every == 0:
            run.accelerator.log({"rwd/score": everyone.mean().item(), "rwd/weight_max": w.max().item(),
                                 "rwd/kept": (w > 0).float().mean().item()}, step=run.step + 1)
        return w


def train_rwd(cfg: RWDConfig) -> dict:
    """Reward-weighted LCM distillation; writes an LCM bundle to ``cfg.out``.

    Returns {"losses": per step, "scores"/"weights": per step the (B,) lists of this process}.
    Raises InputError: ``label`` scores missing from the meta.json, or no discriminator for ``data``/``target``.
    """
    items = read_meta(cfg.meta)
    mode = cfg.reward
    if mode == "auto":
        mode = "label" if all(item.score is not None for item in items) else "data"
    if mode == "label" and any(item.score is None for item in items):
        raise InputError("reward 'label' needs a 'score' on every meta.json entry", code=ErrorCode.BAD_OPTION)
    judge = cfg.reward_bundle or cfg.bundle
    if mode != "label" and not read_config(judge).discriminator:  # fail before training starts
        raise InputError(f"reward {mode!r} needs a bundle with a discriminator; {judge} has none (set "
                         "reward_bundle)", code=ErrorCode.BAD_OPTION)
    weigh = _Weigher(cfg, mode)
    result: dict[str, Any] = distill(cfg, "rwd", weigh)
    return {**result, **weigh.history, "reward": mode}
