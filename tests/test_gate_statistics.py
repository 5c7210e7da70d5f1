"""The discriminator's statistics head: the statistics, the bundle round trip, its fit, and its ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_bundle, make_tiny_gated_bundle
from test_discriminator import _labelled_set

from cleanplate.bundle import attach_discriminator, load_bundle
from cleanplate.discriminator import STAT_NAMES, UNCHANGED_LOGIT, Discriminator, StatsHead, gate_statistics
from cleanplate.errors import BundleError
from cleanplate.pipeline import RemovalPipeline
from cleanplate.training.discriminator import DiscriminatorConfig, train_discriminator


def _stat(stats: torch.Tensor, name: str) -> torch.Tensor:
    return stats[:, STAT_NAMES.index(name)]


def test_statistics_compare_the_fill_with_its_ring() -> None:
    """A flat fill in a textured latent has far less texture than its ring; a fill that keeps the texture does
    not; a result equal to the source changed nothing; the area is the hole's share."""
    torch.manual_seed(0)
    textured = torch.randn(1, 4, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    flat = textured * (1 - mask) + mask * textured.mean()
    stats = gate_statistics(torch.cat([flat, textured]), mask.expand(2, -1, -1, -1), textured.expand(2, -1, -1, -1))
    assert stats.shape == (2, len(STAT_NAMES)) and torch.isfinite(stats).all()
    assert _stat(stats, "texture_gap")[0] < -1.0 and abs(float(_stat(stats, "texture_gap")[1])) < 0.1
    assert _stat(stats, "fill_spread")[0] < 0.2 < _stat(stats, "fill_spread")[1]
    assert _stat(stats, "change")[0] > 0.5 and _stat(stats, "change")[1] == 0
    torch.testing.assert_close(_stat(stats, "log_area"), torch.full((2,), float(np.log(0.25))))


def test_statistics_head_round_trip_and_refuses_other_statistics(tmp_path: Path) -> None:
    path = make_tiny_bundle(tmp_path / "b")
    b = load_bundle(path)
    torch.manual_seed(3)
    disc = Discriminator.from_unet(b.unet, b.conditioning, vae_scale_factor=2, head_channels=16)
    disc.stats_head = StatsHead(len(STAT_NAMES) + 1, hidden=4)
    disc.stats_head.mean.normal_()
    attach_discriminator(path, disc, {})
    loaded = load_bundle(path).discriminator
    z, m = torch.randn(2, 4, 16, 16), torch.zeros(2, 1, 16, 16)
    m[..., 4:10, 4:10] = 1
    with torch.no_grad():
        expected = disc.eval()(z, m, z.flip(0))
        torch.testing.assert_close(loaded(z, m, z.flip(0)), expected)
        assert not torch.allclose(expected, disc.conv_logit(z, m, z.flip(0)))  # the head is in the score
        assert (expected > UNCHANGED_LOGIT).all()
        # nothing removed (result = source) fails, whatever the head says
        assert (torch.sigmoid(loaded(z, m, z)) < 1e-9).all()
    config_path = path / "discriminator" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["stats_head"] == {"hidden": 4, "statistics": [*STAT_NAMES, "conv_logit"]}
    config["stats_head"]["statistics"] = config["stats_head"]["statistics"][::-1]
    config_path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match="statistics head was fitted on"):
        load_bundle(path)


def test_trainer_fits_a_statistics_head_onto_an_existing_discriminator(tmp_path: Path) -> None:
    """init_discriminator + max_steps 0: the encoder and conv head are kept bit for bit, the statistics head is
    fitted on the training candidates and the threshold calibrated with it in the score."""
    gated = make_tiny_gated_bundle(tmp_path / "gated")
    meta = _labelled_set(tmp_path / "data", 24)
    cfg = DiscriminatorConfig(meta=[meta], val_meta=[meta], bundle=gated, init_discriminator=gated,
                              out=tmp_path / "out", max_steps=0, stats_hidden=0, dilate_range=(0, 0))
    result = train_discriminator(cfg)
    assert result["losses"] == []
    cal = result["calibration"]
    assert cal["stats_head_fit"]["n"] == 24 and cal["stats_head_fit"]["train_roc_auc"] > 0.95
    assert cal["roc_auc"] > 0.95 and cal["steps"] == 0
    before, after = load_bundle(gated).discriminator, load_bundle(tmp_path / "out").discriminator
    assert before.stats_head is None and after.stats_head is not None and after.threshold == cal["threshold"]
    kept = {k: v for k, v in before.state_dict().items()}
    for key, value in after.state_dict().items():
        if not key.startswith("stats_head."):
            assert torch.equal(value, kept[key]), key
    pipe = RemovalPipeline.from_bundle(tmp_path / "out")
    crops = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 16:40, 16:40] = 1
    scores = pipe.score(crops, crops.flip(0), mask)
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_onnx_export_of_a_discriminator_with_statistics_head_matches_torch(tmp_path: Path) -> None:
    """The statistics are ordinary graph ops: the exported discriminator scores as PyTorch does (export's own
    parity check at two batch sizes, plus masks with holes, which the parity inputs may not have)."""
    import onnxruntime as ort

    from cleanplate.export.onnx import export_onnx

    path = make_tiny_gated_bundle(tmp_path / "b")
    disc = load_bundle(path).discriminator
    torch.manual_seed(4)
    disc.stats_head = StatsHead(len(STAT_NAMES) + 1, hidden=8)
    disc.stats_head.std.uniform_(0.5, 2.0)
    attach_discriminator(path, disc, {})
    export_onnx(path, tmp_path / "onnx", graphs=["discriminator"], buckets=[64], max_batch=4, seed=2)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "discriminator.onnx"), providers=["CPUExecutionProvider"])
    z, s = torch.randn(3, 4, 32, 32), torch.randn(3, 4, 32, 32)
    m = torch.zeros(3, 1, 32, 32)
    m[0, :, 4:12, 4:20], m[1, :, 20:30, 2:6], m[2, :, 10:22, 10:22] = 1, 1, 1
    got = session.run(None, {"result_latent": z.numpy(), "mask_latent": m.numpy(), "source_latent": s.numpy()})[0]
    with torch.no_grad():
        want = torch.sigmoid(disc.eval()(z, m, s)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
