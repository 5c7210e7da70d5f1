"""The quality discriminator: model, bundle round trip, calibration, trainer and `cleanplate score`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_bundle
from PIL import Image

from cleanplate.bundle import attach_discriminator, load_bundle, read_config
from cleanplate.discriminator import Discriminator, UNetEncoder, load_discriminator
from cleanplate.errors import BundleError, InputError
from cleanplate.pipeline import RemovalPipeline
from cleanplate.training.common import read_meta
from cleanplate.training.discriminator import (
    DiscriminatorConfig,
    DiscriminatorDataset,
    calibrate,
    encode_candidates,
    score_dataset,
    score_latents,
    train_discriminator,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("d") / "b"))


def test_encoder_matches_the_unet_first_half(tiny) -> None:
    """UNetEncoder computes exactly what the UNet computes up to its mid block (same weights, t = 0)."""
    unet = tiny.unet
    captured = {}
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    x = torch.randn(2, 9, 16, 16)
    hidden = tiny.conditioning.prompt_embeds.expand(2, -1, -1)
    added = {"text_embeds": tiny.conditioning.pooled_prompt_embeds.expand(2, -1),
             "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32)}
    with torch.no_grad():
        unet(x, torch.zeros(2), encoder_hidden_states=hidden, added_cond_kwargs=added)
        ours = UNetEncoder(unet)(x, hidden, added["text_embeds"], added["time_ids"])
    handle.remove()
    torch.testing.assert_close(ours, captured["mid"])


@pytest.mark.parametrize(("batch", "side"), [(1, 16), (3, 16), (2, 24), (1, 40)])
def test_one_score_per_item_any_batch_and_resolution(tiny, batch: int, side: int) -> None:
    disc = Discriminator.from_unet(tiny.unet, tiny.conditioning, vae_scale_factor=2, head_channels=16).eval()
    z = torch.randn(batch, 4, side, side)
    mask = (torch.rand(batch, 1, side, side) > 0.5).float()
    source = torch.linspace(-1, 1, z.numel()).reshape(z.shape)
    with torch.no_grad():
        logits = disc(z, mask, source)
        alone = disc(z[:1], mask[:1], source[:1])
    assert logits.shape == (batch,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(alone[0], logits[0], atol=1e-5, rtol=1e-5)  # items do not see each other


def test_save_load_round_trip_and_bundle_flag(tmp_path: Path) -> None:
    path = make_tiny_bundle(tmp_path / "b")
    b = load_bundle(path)
    assert b.discriminator is None and not read_config(path).discriminator
    torch.manual_seed(3)
    disc = Discriminator.from_unet(b.unet, b.conditioning, vae_scale_factor=2, head_channels=16)
    disc.threshold = 0.37
    attach_discriminator(path, disc, {"precision": 0.9})
    assert read_config(path).discriminator
    loaded = load_bundle(path).discriminator
    assert loaded.threshold == 0.37 and not any(p.requires_grad for p in loaded.parameters())
    z, m = torch.randn(2, 4, 16, 16), torch.ones(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, m, z), disc.eval()(z, m, z))
    assert json.loads((path / "discriminator" / "config.json").read_text())["calibration"] == {"precision": 0.9}
    pipe = RemovalPipeline.from_bundle(path)
    crops = torch.rand(2, 3, 64, 64) * 2 - 1
    scores = pipe.score(crops, crops.flip(0), torch.ones(2, 1, 64, 64))
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all() and pipe.threshold == 0.37
    (path / "discriminator" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors"):
        load_discriminator(path / "discriminator")


def test_score_without_discriminator_is_an_input_error(tiny_bundle: Path) -> None:
    pipe = RemovalPipeline.from_bundle(tiny_bundle)
    with pytest.raises(InputError, match="no discriminator"):
        pipe.score(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64), torch.ones(1, 1, 64, 64))


def test_calibrate_picks_the_lowest_threshold_reaching_the_precision() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    labels = np.array([0, 0, 1, 0, 0, 1, 0, 1, 1, 1])
    cal = calibrate(scores, labels, target_precision=0.8)
    # >= 0.6 passes labels 1,0,1,1,1: precision 4/5; lower thresholds let in more negatives
    assert cal["threshold"] == pytest.approx(0.6) and cal["precision"] == pytest.approx(0.8)
    assert cal["recall"] == pytest.approx(4 / 5)  # 4 of the 5 positives pass
    assert cal["rule"].startswith("lowest threshold")
    separable = calibrate(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]), 0.99)
    assert separable["roc_auc"] == 1.0 and separable["threshold"] == pytest.approx(0.8) and separable["recall"] == 1
    impossible = calibrate(np.array([0.9, 0.1, 0.5]), np.array([0, 1, 1]), 0.99)
    assert impossible["rule"].startswith("best F1")
    with pytest.raises(InputError, match="both labels"):
        calibrate(np.array([0.1, 0.2]), np.array([1, 1]))


def test_calibrate_serves_the_gt_and_source_targets() -> None:
    """With gt/source kinds: the threshold lies where >= 90% of GT and <= 2% of sources pass, and is the one
    with the largest Youden's J there; precision is still reported."""
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.6, 1.0, 50)          # 50 GT: 90% pass at t <= their 10th percentile
    source = rng.uniform(0.0, 0.5, 50)      # 50 sources: <= 1 may pass
    good = rng.uniform(0.4, 0.9, 100)       # good removals, overlapping the bad ones
    bad = rng.uniform(0.2, 0.7, 100)
    scores = np.r_[gt, source, good, bad]
    labels = np.r_[np.ones(50), np.zeros(50), np.ones(100), np.zeros(100)]
    kinds = ["gt"] * 50 + ["source"] * 50 + ["removal"] * 200
    cal = calibrate(scores, labels, kinds=kinds)
    t = cal["threshold"]
    assert cal["targets_met"] is True and cal["rule"].startswith("max Youden's J")
    assert np.mean(gt >= t) >= 0.9 and np.mean(source >= t) <= 0.02
    assert cal["gt_pass_rate"] == np.mean(gt >= t) and cal["source_pass_rate"] == np.mean(source >= t)
    lo, hi = cal["interval"]
    feasible = [u for u in np.unique(scores) if np.mean(gt >= u) >= 0.9 and np.mean(source >= u) <= 0.02]
    assert (lo, hi) == (min(feasible), max(feasible)) and lo <= t <= hi

    def youden(u: float) -> float:
        return np.mean(scores[labels == 1] >= u) - np.mean(scores[labels == 0] >= u)

    assert cal["youden_j"] == pytest.approx(youden(t)) and youden(t) == max(youden(u) for u in feasible)
    passed = scores >= t
    assert cal["precision"] == pytest.approx(labels[passed].mean()) and cal["recall"] == pytest.approx(
        passed[labels == 1].mean())
    # Youden's J does not depend on the share of good candidates: twice each good one, same threshold
    pos = labels == 1
    doubled = calibrate(np.r_[scores, scores[pos]], np.r_[labels, labels[pos]],
                        kinds=kinds + [k for k, p in zip(kinds, pos, strict=False) if p])
    assert doubled["threshold"] == t and doubled["precision"] > cal["precision"]

    # GT and source overlap: no threshold meets both targets; the source target wins
    overlap = calibrate(np.r_[gt - 0.3, source], np.r_[np.ones(50), np.zeros(50)], kinds=["gt"] * 50 + ["source"] * 50)
    assert overlap["targets_met"] is False and overlap["interval"] is None
    assert overlap["source_pass_rate"] <= 0.02 and overlap["gt_pass_rate"] < 0.9
    lowest = min(u for u in np.unique(np.r_[gt - 0.3, source]) if np.mean(source >= u) <= 0.02)
    assert overlap["threshold"] == lowest
    # without the kinds the precision rule applies as before
    assert calibrate(scores, labels)["rule"].startswith("lowest threshold with precision")
    assert calibrate(scores, labels)["targets_met"] is None
    with pytest.raises(InputError, match="kinds"):
        calibrate(scores, labels, kinds=kinds[:3])


def test_gt_target_with_confidence_leaves_a_margin() -> None:
    """With gt_pass_confidence the GT target is met only where the Clopper-Pearson lower bound of the GT pass
    rate reaches it: the bound equals scipy's exact binomial interval, and the threshold moves down to where
    more than 90% of the held-out GT passes."""
    from scipy.stats import binomtest

    from cleanplate.training.common import rate_lower_bound

    for k, n in [(59, 60), (58, 60), (1, 10), (100, 100)]:  # one-sided 95% = the lower end of a two-sided 90%
        assert rate_lower_bound(k, n, 0.95) == pytest.approx(
            binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").low)
    assert rate_lower_bound(0, 60, 0.95) == 0.0 and rate_lower_bound(54, 60, None) == 0.9
    assert rate_lower_bound(59, 60, 0.95) > 0.9 > rate_lower_bound(58, 60, 0.95)

    rng = np.random.default_rng(1)
    gt, source = rng.uniform(0.3, 1.0, 60), rng.uniform(0.0, 0.2, 60)
    removal = rng.uniform(0.0, 1.0, 200)
    scores = np.r_[gt, source, removal]
    labels = np.r_[np.ones(60), np.zeros(60), removal > 0.7]
    kinds = ["gt"] * 60 + ["source"] * 60 + ["removal"] * 200
    plain = calibrate(scores, labels, kinds=kinds)
    sure = calibrate(scores, labels, kinds=kinds, gt_pass_confidence=0.95)
    assert plain["targets_met"] and sure["targets_met"] and "95% confidence" in sure["rule"]
    assert plain["gt_pass_rate"] >= 0.9 and plain["gt_pass_bound"] == plain["gt_pass_rate"]
    assert sure["threshold"] < plain["threshold"] and sure["gt_pass_rate"] >= 59 / 60
    assert sure["gt_pass_bound"] >= 0.9 and sure["gt_pass_confidence"] == 0.95
    assert sure["source_pass_rate"] <= 0.02


def test_roc_auc_and_spearman() -> None:
    from cleanplate.training.discriminator import roc_auc, spearman

    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5  # ties count half
    assert spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def _labelled_set(root: Path, n: int) -> Path:
    """A learnable toy problem: good = the masked square filled with the background, bad = a bright square."""
    rng = np.random.default_rng(0)
    entries = []
    for d in ("source", "mask", "result"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg = np.full((64, 64, 3), rng.integers(40, 120, 3), np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(8, 40, 2)
        mask[y:y + 16, x:x + 16] = 255
        source = bg.copy()
        source[mask > 0] = (250, 240, 20)
        Image.fromarray(source).save(root / "source" / f"{i}.png")
        Image.fromarray(mask).save(root / "mask" / f"{i}.png")
        good = i % 2 == 0
        Image.fromarray(bg if good else source).save(root / "result" / f"{i}.png")
        entries.append({"source": f"source/{i}.png", "mask": f"mask/{i}.png", "GT": f"result/{i}.png",
                        "score": int(good), "label_kind": "gt" if good else "source"})
    (root / "meta.json").write_text(json.dumps(entries))
    return root / "meta.json"


def test_trainer_learns_calibrates_and_writes_a_bundle(tmp_path: Path, tiny_bundle: Path) -> None:
    meta = _labelled_set(tmp_path / "data", 24)
    cfg = DiscriminatorConfig(meta=[meta], val_meta=[meta], bundle=tiny_bundle, out=tmp_path / "out", max_steps=40,
                              batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=20, dilate_range=(0, 2))
    result = train_discriminator(cfg)
    losses = result["losses"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    cal = result["calibration"]
    assert cal["roc_auc"] > 0.8 and 0 <= cal["threshold"] <= 1
    assert set(cal["pass_rate_by_kind"]) == {"gt", "source"}
    assert cal["pass_rate_by_kind"]["gt"] > cal["pass_rate_by_kind"]["source"]
    bundle = load_bundle(tmp_path / "out")
    assert bundle.discriminator.threshold == cal["threshold"]
    assert not (tiny_bundle / "discriminator").exists()  # the input bundle is left alone
    # resuming a finished run trains no further and writes the same discriminator
    again = train_discriminator(cfg)
    assert again["losses"] == []


def test_trainer_on_cached_latents_trains_the_whole_encoder(tmp_path: Path, tiny_bundle: Path) -> None:
    """latent_cache encodes each candidate once (reused by a second run) and scores the held-out split from its
    own cache exactly as from the images; lora_rank 0 fine-tunes every encoder weight."""
    meta = _labelled_set(tmp_path / "data", 24)
    cfg = DiscriminatorConfig(meta=[meta], val_meta=[meta], bundle=tiny_bundle, out=tmp_path / "out", max_steps=40,
                              batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=20, dilate_range=(0, 2),
                              lora_rank=0, latent_cache=True, cache_variants=2, cache_dir=tmp_path / "cache")
    result = train_discriminator(cfg)
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(caches) == 2 and not any(name.endswith(".tmp") for name in caches)  # training x2, held-out x1
    from safetensors.torch import load_file

    train_cache = load_file(str(tmp_path / "cache" / next(n for n in caches if "_x2_" in n)))
    assert train_cache["result"].shape[0] == 48 and train_cache["result"].dtype == torch.float16
    losses = result["losses"]
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    assert result["calibration"]["roc_auc"] > 0.8
    bundle = load_bundle(tmp_path / "out")
    base = load_bundle(tiny_bundle)
    changed = [k for k, v in bundle.discriminator.encoder.state_dict().items()
               if not torch.equal(v, base.unet.state_dict()[k])]
    assert any("down_blocks.0.resnets.0.conv1" in k for k in changed)  # not only LoRA targets merged back
    # the cached held-out scores are the uncached ones (latents stored in fp16)
    pipe = RemovalPipeline.from_bundle(bundle)
    val = DiscriminatorDataset(read_meta([meta]), bundle.config.resolution, (bundle.config.dilate_px,) * 2, flip=False)
    cached, labels = score_latents(bundle.discriminator, encode_candidates(pipe, val), pipe.device)
    direct, _ = score_dataset(pipe, bundle.discriminator, val)
    np.testing.assert_allclose(cached, direct, atol=5e-3)
    assert labels.tolist() == [float(i % 2 == 0) for i in range(24)]
    again = train_discriminator(cfg)  # finished: resumes without training or re-encoding
    assert again["losses"] == [] and sorted(p.name for p in (tmp_path / "cache").iterdir()) == caches


def test_trainer_refuses_unlabelled_data(tmp_path: Path, tiny_bundle: Path, synth_data: Path) -> None:
    cfg = DiscriminatorConfig(meta=[synth_data], bundle=tiny_bundle, out=tmp_path / "o", max_steps=1)
    with pytest.raises(InputError, match="score"):
        train_discriminator(cfg)


def test_score_cli(tmp_path: Path, gated_bundle: Path, tiny_bundle: Path, photos) -> None:
    img = photos["chelsea"]
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[100:150, 200:260] = 255
    for name, arr in (("src.png", img), ("res.png", img[:, ::-1]), ("mask.png", mask)):
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp_path / name)
    cmd = [sys.executable, "-m", "cleanplate.cli", "score", str(tmp_path / "src.png"), str(tmp_path / "res.png"),
           str(tmp_path / "mask.png"), "--bundle", str(gated_bundle)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert 0 <= out["score"] <= 1 and out["threshold"] == 0.5 and out["passed"] == (out["score"] >= 0.5)
    r = subprocess.run(cmd[:-1] + [str(tiny_bundle)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "discriminator" in r.stderr
    Image.fromarray(img[:50]).save(tmp_path / "res.png")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: result is")


def test_synthetic_labels_do_not_follow_the_synth_background(tmp_path: Path) -> None:
    """Regression: with the same seed, disc-labels once replayed synth's RNG stream (numpy ignores trailing
    zeros in a seed), so every photo item became a positive and every studio item a negative."""
    from cleanplate.training.disc_labels import make_disc_labels
    from cleanplate.training.synth import SynthConfig, synth_dataset

    meta = synth_dataset(tmp_path / "synth", 40, seed=0, cfg=SynthConfig(size=64), progress=False)
    labels = json.loads(make_disc_labels([meta], tmp_path / "labels", per_item=1, seed=0).read_text())
    backgrounds = [e["background"].startswith("photo") for e in json.loads(meta.read_text())]
    pairs = {(backgrounds[e["item"]], e["score"]) for e in labels}
    assert pairs == {(True, 0), (True, 1), (False, 0), (False, 1)}
