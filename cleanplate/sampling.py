"""The LCM sampler's arithmetic and its noise, shared by every engine.

One definition of "seed S, N steps" for the in-process torch engine and the Triton BLS model, so both
give the same removal (within float rounding) on any device:

* the schedule (timesteps, ᾱ, boundary-condition scalings) comes from diffusers' ``LCMScheduler``
  (:func:`lcm_schedule`), computed once and stored as plain numbers;
* one step is :func:`lcm_step`, the arithmetic of ``LCMScheduler.step`` (Luo et al., "Latent
  Consistency Models", arXiv 2310.04378, eq. 9 with the c_skip/c_out of the consistency boundary
  condition, sigma_data = 0.5) for each of diffusers' prediction types: ``epsilon`` (the UNet predicts
  the noise ε), ``sample`` (it predicts x0) and ``v_prediction`` (v = √ᾱ·ε − √(1−ᾱ)·x0, Salimans & Ho,
  "Progressive Distillation", arXiv 2202.00512, sec. 4); the conversions are :func:`predicted_x0` and,
  for the trainers, :func:`training_target`;
* the noise is :func:`sampling_noise`: numpy's PCG64 seeded with S, so it does not depend on torch's
  generator, the device or the batch.

Only numpy is imported at module level: this file is copied as-is into the Triton model repository,
whose python backend has no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SIGMA_DATA = 0.5  # LCM's boundary-condition constant (diffusers: LCMScheduler.sigma_data)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' names for what the UNet predicts


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predicted_x0(sample: Any, model_output: Any, sqrt_alpha: Any, sqrt_beta: Any, prediction_type: str = "epsilon") -> Any:
    """The clean-latent estimate x̂0 from the UNet's output at x_t, as ``LCMScheduler.step`` computes it.

    Args:
        sample: (B,C,h,w) x_t, numpy or torch.
        model_output: (B,C,h,w) what the UNet predicts, per ``prediction_type``.
        sqrt_alpha, sqrt_beta: √ᾱ_t and √(1−ᾱ_t), scalars or arrays broadcasting to (B,1,1,1).
        prediction_type: "epsilon": x̂0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ; "sample": x̂0 = output;
            "v_prediction": x̂0 = √ᾱ·x_t − √(1−ᾱ)·v̂.
    Returns:
        (B,C,h,w) x̂0, same type as ``sample``.
    Raises:
        ValueError: an unknown prediction type.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (sample - sqrt_beta * model_output) / sqrt_alpha
    if prediction_type == "sample":
        return model_output
    return sqrt_alpha * sample - sqrt_beta * model_output


def training_target(x0: Any, noise: Any, sqrt_alpha: Any, sqrt_beta: Any, prediction_type: str = "epsilon") -> Any:
    """What the UNet should output for x_t = √ᾱ·x0 + √(1−ᾱ)·ε (inverse of :func:`predicted_x0`).

    "epsilon" -> ε; "sample" -> x0; "v_prediction" -> v = √ᾱ·ε − √(1−ᾱ)·x0 (as diffusers'
    ``DDPMScheduler.get_velocity``). Shapes as :func:`predicted_x0`. Raises ValueError for an unknown type.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return sqrt_alpha * noise - sqrt_beta * x0


@dataclass(frozen=True)
class LCMStep:
    """One step of the LCM schedule, all scalars (float64).

    Attributes:
        timestep: the discrete timestep t in [0, num_train_timesteps) that the UNet sees.
        sqrt_alpha, sqrt_beta: sqrt(ᾱ_t) and sqrt(1 - ᾱ_t).
        c_skip, c_out: consistency boundary-condition scalings at t (LCM eq. 9, timestep scaled).
        sqrt_alpha_prev, sqrt_beta_prev: sqrt(ᾱ) and sqrt(1 - ᾱ) at the next timestep, for the re-noising.
        last: no re-noising after the last step.
        prediction_type: what the UNet predicts ("epsilon", "v_prediction" or "sample"), from the
            bundle's scheduler config, so every engine that holds the schedule reads the output alike.
    """

    timestep: int
    sqrt_alpha: float
    sqrt_beta: float
    c_skip: float
    c_out: float
    sqrt_alpha_prev: float
    sqrt_beta_prev: float
    last: bool
    prediction_type: str = "epsilon"


def lcm_step(step: LCMStep, sample: Any, model_output: Any, noise: Any = None) -> Any:
    """x_t -> x_{t_prev}: ``LCMScheduler.step`` (any of its prediction types), on numpy arrays or torch tensors.

    Args:
        step: the schedule entry of this step (its ``prediction_type`` says how to read ``model_output``).
        sample: (B,C,h,w) the current latent x_t.
        model_output: (B,C,h,w) the UNet's output at t: ε̂, x̂0 or v̂.
        noise: (B,C,h,w) standard normal, required unless ``step.last``.
    Returns:
        (B,C,h,w): the denoised latent after the last step, else it re-noised to the next timestep.
    Raises:
        ValueError: no noise for a step that needs it, or an unknown prediction type.
    """
    x0 = predicted_x0(sample, model_output, step.sqrt_alpha, step.sqrt_beta, step.prediction_type)
    denoised = step.c_out * x0 + step.c_skip * sample
    if step.last:
        return denoised
    if noise is None:
        raise ValueError(f"the step at t={step.timestep} re-noises and needs noise")
    return step.sqrt_alpha_prev * denoised + step.sqrt_beta_prev * noise


def sampling_noise(seed: int, steps: int, shape: Sequence[int]) -> np.ndarray:
    """All the noise one item uses: (steps, *shape) float32, standard normal.

    ``[0]`` is the initial latent (LCM starts from pure noise, strength 1), ``[k]`` the re-noising after
    step k-1. Drawn from ``np.random.Generator(np.random.PCG64(seed))``, so it is the same on every
    engine, device and batch composition. Raises ValueError for a negative seed.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    return rng.standard_normal((steps, *shape), dtype=np.float32)


def lcm_schedule(scheduler_config: dict[str, Any], steps: int) -> list[LCMStep]:
    """The N-step schedule of diffusers' ``LCMScheduler`` built from ``scheduler_config`` (needs diffusers).

    Raises ValueError: a config this sampler does not implement (a prediction type outside
    :data:`PREDICTION_TYPES`, clipping or thresholding on, or init_noise_sigma != 1).
    """
    import torch
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_config(scheduler_config)
    cfg = sched.config
    if cfg.prediction_type not in PREDICTION_TYPES or cfg.clip_sample or cfg.thresholding or sched.init_noise_sigma != 1.0:
        raise ValueError(f"only {'/'.join(PREDICTION_TYPES)} without clipping or thresholding is implemented "
                         f"(prediction_type={cfg.prediction_type}, clip_sample={cfg.clip_sample}, "
                         f"thresholding={cfg.thresholding})")
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    alphas = sched.alphas_cumprod.to(torch.float64)
    final = float(sched.final_alpha_cumprod)
    out = []
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        prev = t if last else timesteps[i + 1]
        a_t = float(alphas[t])
        a_prev = float(alphas[prev]) if prev >= 0 else final
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        out.append(LCMStep(t, a_t ** 0.5, (1 - a_t) ** 0.5, float(c_skip), float(c_out), a_prev ** 0.5,
                           (1 - a_prev) ** 0.5, last, str(cfg.prediction_type)))
    return out


def schedule_table_json(scheduler_config: dict[str, Any], max_steps: int) -> str:
    """``{"1": [step, ...], ..., str(max_steps): [...]}`` as JSON: every schedule a server may need."""
    return json.dumps({str(n): [asdict(s) for s in lcm_schedule(scheduler_config, n)] for n in range(1, max_steps + 1)})


def load_schedule_table(text: str) -> dict[int, list[LCMStep]]:
    """Inverse of :func:`schedule_table_json`."""
    return {int(n): [LCMStep(**s) for s in steps] for n, steps in json.loads(text).items()}
