"""RL trainers after SFT (issue 6, part B): the math of their pieces on fixed tensors, apart from the trainers
(tests/test_rl.py): the stochastic LCM step's log-probability, group normalisation and composite rewards,
the region split of advantages, spatial matting, the DPO loss and the RWD weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cleanplate.bundle import default_bundle_path, read_config
from cleanplate.sampling import lcm_schedule, lcm_step, training_target
from cleanplate.training.dpo import dpo_loss
from cleanplate.training.grpo import (
    GRPOConfig,
    region_masks,
    region_policy_loss,
    step_distribution,
)
from cleanplate.training.rl_common import (
    SpatialMattingProcessor,
    combine_rewards,
    gaussian_log_prob,
    global_fidelity,
    group_normalize,
    nothing_reinserted,
    region_mean,
)
from cleanplate.training.rwd import reward_weights

pytestmark = pytest.mark.slow

DEFAULT = default_bundle_path()


# -- math of the pieces -----------------------------------------------------------------------------------
def test_stochastic_lcm_step_log_prob_is_the_gaussian_of_lcm_step() -> None:
    """The sampler's re-noising step is N(sqrt(ᾱ') f, 1-ᾱ'): x drawn by lcm_step has exactly that log-density."""
    steps = lcm_schedule(read_config(DEFAULT).scheduler, 4)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for step in steps[:-1]:
        mean, std = step_distribution(step, x, eps, last_step_std=0.0)
        sample = lcm_step(step, x, eps, noise)
        torch.testing.assert_close(sample, mean + std * noise)
        expected = torch.distributions.Normal(mean, std).log_prob(sample)
        torch.testing.assert_close(gaussian_log_prob(sample, mean, std), expected.float(), rtol=1e-5, atol=1e-5)
    last = steps[-1]
    assert step_distribution(last, x, eps, 0.0)[1] is None  # deterministic: no log-probability
    mean, std = step_distribution(last, x, eps, 0.05)
    torch.testing.assert_close(mean, lcm_step(last, x, eps))
    assert std == 0.05
    with pytest.raises(ValueError):
        gaussian_log_prob(x, x, 0.0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_step_distribution_reads_the_declared_prediction_type(prediction_type) -> None:
    """An x0- or v-model's sampler step has the same Gaussian as the ε-model predicting the same thing."""
    config = read_config(DEFAULT).scheduler
    eps_steps = lcm_schedule({**config, "prediction_type": "epsilon"}, 4)
    steps = lcm_schedule({**config, "prediction_type": prediction_type}, 4)
    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for eps_step, step in zip(eps_steps, steps, strict=True):
        x0 = (x - step.sqrt_beta * eps) / step.sqrt_alpha
        output = training_target(x0, eps, step.sqrt_alpha, step.sqrt_beta, prediction_type)
        for std in (0.0, 0.05):
            mean, sigma = step_distribution(step, x, output, std)
            mean_eps, sigma_eps = step_distribution(eps_step, x, eps, std)
            torch.testing.assert_close(mean, mean_eps)
            assert sigma == sigma_eps
        if step.timestep > 500:  # read as ε (the old assumption) the x0/v output gives another step
            wrong = step_distribution(eps_step, x, output, 0.0)[0]
            assert (wrong - mean_eps).abs().max() > 0.1


def test_group_normalize_and_composite_reward_normalise_each_term_within_its_group() -> None:
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    z = group_normalize(r, 4)
    torch.testing.assert_close(z[:4].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(z[:4].std(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert torch.equal(z[4:], torch.zeros(4))  # a group of equal rewards carries no signal
    g = torch.Generator().manual_seed(0)
    terms = {k: torch.randn(8, generator=g) for k in ("global", "local", "reinsert")}
    regions = {"global": "preserve", "local": "edit", "reinsert": "edit"}
    weights = {"global": 1.0, "local": 1.0, "reinsert": 0.5}
    a = combine_rewards(terms, weights, regions, 4)
    # a term's units do not matter: scaling one term by 1000 leaves the composite unchanged
    b = combine_rewards({**terms, "global": 1000 * terms["global"]}, weights, regions, 4)
    for region in ("edit", "preserve"):
        torch.testing.assert_close(a[region], b[region], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a["edit"], group_normalize(terms["local"], 4) + 0.5 * group_normalize(terms["reinsert"], 4))
    assert set(combine_rewards(terms, weights, None, 4)) == {"all"}
    with pytest.raises(KeyError):
        combine_rewards(terms, {"missing": 1.0}, None, 4)


def test_reward_terms() -> None:
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    flat = source * (1 - mask)  # the masked part filled with flat grey
    assert torch.equal(global_fidelity(source, source, mask), torch.zeros(2))
    assert (global_fidelity(flat - 0.5 * (1 - mask), source, mask) < 0).all()  # changes outside cost
    # re-inserting the removed content (the source itself) scores -1, a flat fill 0
    torch.testing.assert_close(nothing_reinserted(source, source, mask), -torch.ones(2), atol=1e-4, rtol=0)
    assert torch.equal(nothing_reinserted(flat, source, mask), torch.zeros(2))


def test_region_split_gives_each_region_only_its_own_advantage() -> None:
    """Edit-GRPO: with advantage only in the edit region, no gradient reaches the preserved cells' log-probs."""
    mask = torch.zeros(4, 1, 8, 8)
    mask[..., 2:5, 2:6] = 1
    regions = region_masks(mask, split=True)
    mean = torch.zeros(4, 4, 8, 8, requires_grad=True)
    sample = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    lp = gaussian_log_prob(sample, mean, 0.7)
    old = {r: region_mean(lp.detach(), m) for r, m in regions.items()}
    adv = {"edit": torch.tensor([1.0, -1.0, 0.5, -0.5]), "preserve": torch.zeros(4)}
    loss, ratios = region_policy_loss(lp, old, adv, regions, {"edit": 1.0, "preserve": 1.0}, 1e-4)
    loss.backward()
    assert all(torch.allclose(r, torch.ones(4)) for r in ratios.values())  # on-policy
    grad = mean.grad
    assert grad[:, :, 2:5, 2:6].abs().sum() > 0
    assert grad.masked_select(mask.expand_as(grad) == 0).abs().max() == 0
    # positive advantage: the gradient step moves the mean toward the sample (raises its log-prob)
    step = -grad[0, :, 2:5, 2:6]
    assert (step * (sample[0, :, 2:5, 2:6] - 0)).sum() > 0
    with pytest.raises(ValueError):
        GRPOConfig(meta=[Path("m.json")], out=Path("o"), bundle=DEFAULT, reward_weights={"toy": 1.0})


def test_spatial_matting_biases_masked_queries_toward_background() -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    x = torch.randn(2, 16, 8)  # 4x4 tokens
    mask = torch.zeros(2, 1, 8, 8)  # latent grid 8x8 -> max-pooled to the 4x4 token grid
    mask[..., :4, :4] = 1
    m = SpatialMattingProcessor.token_mask(mask, 16)
    assert m.shape == (2, 16) and m.sum().item() == 2 * 4
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, x)
        torch.testing.assert_close(SpatialMattingProcessor(0.0)(attn, x, matting_mask=mask), plain)
        torch.testing.assert_close(SpatialMattingProcessor(3.0)(attn, x), plain)  # no mask: plain SDPA
        strong = SpatialMattingProcessor(60.0)(attn, x, matting_mask=mask)
        # cross-attention is left alone
        ctx = torch.randn(2, 5, 8)
        torch.testing.assert_close(SpatialMattingProcessor(1e4)(attn, x, ctx, matting_mask=mask),
                                   AttnProcessor2_0()(attn, x, ctx))
        # a huge bias = masked queries attend to background keys only; background queries are unchanged
        masked_q = m[0].bool()
        keys_bg = ~masked_q
        q = attn.to_q(x[0]).view(16, 2, 4).transpose(0, 1)
        k = attn.to_k(x[0]).view(16, 2, 4).transpose(0, 1)
        v = attn.to_v(x[0]).view(16, 2, 4).transpose(0, 1)
        w = (q @ k.transpose(1, 2) / 2.0).masked_fill(~keys_bg[None, None, :], float("-inf")).softmax(-1)
        expected = attn.to_out[0]((w @ v).transpose(0, 1).reshape(16, 8))
        torch.testing.assert_close(strong[0][masked_q], expected[masked_q], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(strong[0][keys_bg], plain[0][keys_bg])
    with pytest.raises(ValueError):
        SpatialMattingProcessor.token_mask(mask, 15)


def test_dpo_loss() -> None:
    e = torch.tensor([0.5, 0.5, 0.7, 0.7])
    loss, logits = dpo_loss(e, e, 5000.0)
    assert torch.equal(logits, torch.zeros(2)) and loss.item() == pytest.approx(math.log(2))
    # the policy lowered its error on the preferred result (item 0) and raised it on the rejected one
    model = torch.tensor([0.49, 0.5, 0.7, 0.71])
    loss, logits = dpo_loss(model, e, 5000.0)
    assert logits[0].item() == pytest.approx(25.0) and logits[1].item() == pytest.approx(25.0)
    assert loss.item() < 1e-6


def test_rwd_weights_follow_scores() -> None:
    s = torch.tensor([0.1, 0.4, 0.5, 0.9])
    w = reward_weights(s, 0.25, None)
    assert (w[1:] > w[:-1]).all() and w.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(w[3] / w[0], torch.exp(torch.tensor(0.8 / 0.25)))
    uniform = reward_weights(s, None, None)
    assert torch.equal(uniform, torch.ones(4))
    filtered = reward_weights(s, None, 0.45)
    assert torch.equal(filtered, torch.tensor([0.0, 0.0, 2.0, 2.0]))  # mean 1, below threshold dropped
    both = reward_weights(s, 0.25, 0.45)
    assert both[:2].eq(0).all() and both[3] > both[2] > 0 and both.mean().item() == pytest.approx(1.0)
    assert torch.equal(reward_weights(s, 0.25, 0.95), torch.zeros(4))  # nothing kept: no loss
    # normalised over the global batch (other processes' scores): local weights need not average 1
    local = reward_weights(s[:2], 0.25, None, population=s)
    torch.testing.assert_close(local, w[:2])
    big = reward_weights(torch.tensor([1e3, 0.0]), 1e-3, None)  # no overflow
    assert torch.isfinite(big).all() and big[1] == 0
