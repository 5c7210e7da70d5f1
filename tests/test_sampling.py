"""cleanplate.sampling: the shared LCM arithmetic equals diffusers' LCMScheduler, and the noise is the
same however the batch is made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from cleanplate.bundle import SDXL_LCM_SCHEDULER
from cleanplate.pipeline import RemovalPipeline
from cleanplate.sampling import (
    lcm_schedule,
    lcm_step,
    load_schedule_table,
    predicted_x0,
    sampling_noise,
    schedule_table_json,
    training_target,
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_step_equals_diffusers_scheduler(steps: int, prediction_type: str) -> None:
    """A whole N-step trajectory with a fixed fake model: ours (numpy and torch) vs LCMScheduler.step,
    for each prediction type the bundle may declare."""
    shape = (2, 4, 8, 8)
    out_of = lambda x, t: torch.tanh(x) * 0.5 + t / 2000.0  # noqa: E731 - a deterministic stand-in for the UNet
    config = {**SDXL_LCM_SCHEDULER, "prediction_type": prediction_type}

    sched = LCMScheduler.from_config(config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(3)
    x_ref = torch.randn(shape, generator=gen)
    noise = [x_ref.clone()]
    probe = torch.Generator().manual_seed(3)
    torch.randn(shape, generator=probe)
    for t in sched.timesteps:
        x_ref = sched.step(out_of(x_ref, int(t)), t, x_ref, generator=gen, return_dict=False)[0]
    for _ in range(steps - 1):  # the re-noising draws LCMScheduler made, replayed from the same generator
        noise.append(torch.randn(shape, generator=probe))

    schedule = lcm_schedule(config, steps)
    assert [s.timestep for s in schedule] == [int(t) for t in sched.timesteps]
    assert [s.last for s in schedule] == [False] * (steps - 1) + [True]
    assert {s.prediction_type for s in schedule} == {prediction_type}
    x, x_np = noise[0].clone(), noise[0].numpy().astype(np.float64)
    for k, step in enumerate(schedule):
        nk = None if step.last else noise[k + 1]
        x = lcm_step(step, x, out_of(x, step.timestep), nk)
        x_np = lcm_step(step, x_np, out_of(torch.from_numpy(x_np), step.timestep).numpy(),
                        None if nk is None else nk.numpy())
    torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(x_np, x_ref.numpy(), atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_inverts_predicted_x0(prediction_type: str) -> None:
    """The trainers' target is what makes the sampler's x0 estimate exact, and v matches diffusers' velocity."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((3, 4, 8, 8), generator=g), torch.randn((3, 4, 8, 8), generator=g)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([10, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = training_target(x0, noise, a.sqrt(), (1 - a).sqrt(), prediction_type)
    torch.testing.assert_close(predicted_x0(x_t, target, a.sqrt(), (1 - a).sqrt(), prediction_type), x0,
                               atol=1e-4, rtol=1e-4)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, sched.get_velocity(x0, noise, t))
    with pytest.raises(ValueError, match="prediction_type"):
        predicted_x0(x_t, target, a.sqrt(), (1 - a).sqrt(), "x0")


def test_lcm_step_needs_noise_before_the_last_step() -> None:
    first = lcm_schedule(SDXL_LCM_SCHEDULER, 4)[0]
    with pytest.raises(ValueError, match="needs noise"):
        lcm_step(first, np.zeros(3), np.zeros(3))


def test_schedule_refuses_configs_it_does_not_implement() -> None:
    with pytest.raises(ValueError, match="prediction_type=x0"):
        lcm_schedule({**SDXL_LCM_SCHEDULER, "prediction_type": "x0"}, 4)
    with pytest.raises(ValueError, match="clip_sample=True"):
        lcm_schedule({**SDXL_LCM_SCHEDULER, "clip_sample": True}, 4)


def test_schedule_table_round_trips() -> None:
    table = load_schedule_table(schedule_table_json(SDXL_LCM_SCHEDULER, 6))
    assert sorted(table) == [1, 2, 3, 4, 5, 6]
    assert table[4] == lcm_schedule(SDXL_LCM_SCHEDULER, 4)


def test_noise_depends_on_seed_only() -> None:
    a = sampling_noise(7, 4, (4, 16, 16))
    assert a.shape == (4, 4, 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, sampling_noise(7, 4, (4, 16, 16)))
    assert not np.allclose(a, sampling_noise(8, 4, (4, 16, 16)))
    assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 1) < 0.05
    with pytest.raises(ValueError):
        sampling_noise(-1, 4, (4, 2, 2))


def test_pipeline_result_does_not_depend_on_batch(tiny_bundle: Path) -> None:
    """Item i's result is the same alone or in a batch, and seeds are per item."""
    pipe = RemovalPipeline.from_bundle(tiny_bundle)
    g = torch.Generator().manual_seed(0)
    source = torch.rand((3, 3, 64, 64), generator=g) * 2 - 1
    mask = torch.zeros((3, 1, 64, 64))
    mask[:, :, 16:40, 20:44] = 1
    together = pipe(source, mask, seeds=[5, 6, 5], steps=3)
    alone = pipe(source[1:2], mask[1:2], seeds=[6], steps=3)
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[0], pipe(source[:1], mask[:1], seeds=[5], steps=3)[0], atol=1e-5, rtol=0)
