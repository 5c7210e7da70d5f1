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
from cleanplate.discriminator import (
    PIXEL_STAT_NAMES,
    STAT_NAMES,
    UNCHANGED_LOGIT,
    Discriminator,
    StatsHead,
    gate_statistics,
    pixel_statistics,
)
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


def test_trainer_fits_a_pixel_statistics_head_from_the_latent_cache(tmp_path: Path) -> None:
    """pixel_stats: the head is fitted on the cache's precomputed pixel statistics, and the calibration's scores
    (from the cache) are the scores RemovalPipeline.score gives the same crops (pixel statistics in the graph).
    Without a statistics head pixel_stats is refused."""
    from cleanplate.errors import InputError
    from cleanplate.training.common import read_meta
    from cleanplate.training.discriminator import DiscriminatorDataset, encode_candidates, score_latents

    gated = make_tiny_gated_bundle(tmp_path / "gated")
    meta = _labelled_set(tmp_path / "data", 24)
    d = load_bundle(gated).config.dilate_px  # the calibration cuts as serving does: fit on the same cut
    cfg = DiscriminatorConfig(meta=[meta], val_meta=[meta], bundle=gated, init_discriminator=gated,
                              out=tmp_path / "out", max_steps=0, stats_hidden=0, pixel_stats=True,
                              latent_cache=True, dilate_range=(d, d))
    cal = train_discriminator(cfg)["calibration"]
    assert cal["stats_head_fit"]["train_roc_auc"] > 0.95 and cal["roc_auc"] > 0.95
    disc = load_bundle(tmp_path / "out").discriminator
    assert disc.pixel_stats and disc.stats_head.net.in_features == len(STAT_NAMES) + 1 + len(PIXEL_STAT_NAMES)
    pipe = RemovalPipeline.from_bundle(tmp_path / "out")
    dataset = DiscriminatorDataset(read_meta([meta])[:4], 64, (d, d), flip=False)
    cached, _ = score_latents(disc, encode_candidates(pipe, dataset, dtype=torch.float32))
    items = [dataset[i] for i in range(4)]
    direct = pipe.score(torch.stack([x["result"] for x in items]), torch.stack([x["source"] for x in items]),
                        torch.stack([x["mask"] for x in items]))
    np.testing.assert_allclose(cached, direct.numpy(), atol=1e-5)
    with pytest.raises(InputError, match="stats_hidden"):
        train_discriminator(cfg.model_copy(update={"stats_hidden": None}))


def test_encode_candidates_encodes_a_shared_source_once(tmp_path: Path) -> None:
    """Candidates of one photo share its source crop: the VAE sees each source once, and every candidate gets
    the latent a direct encode gives."""
    from cleanplate.training.common import read_meta
    from cleanplate.training.discriminator import DiscriminatorDataset, encode_candidates

    pipe = RemovalPipeline.from_bundle(make_tiny_gated_bundle(tmp_path / "gated"))
    items = read_meta([_labelled_set(tmp_path / "data", 4)])
    dataset = DiscriminatorDataset(items * 3, 64, (0, 0), flip=False)  # 12 candidates, 4 sources
    seen: list[int] = []
    encode = pipe.encode
    pipe.encode = lambda x: (seen.append(len(x)), encode(x))[1]  # type: ignore[method-assign]
    latents = encode_candidates(pipe, dataset, batch_size=5, dtype=torch.float32)
    assert sum(seen) == 12 + 4
    with torch.no_grad():
        direct = encode(torch.stack([dataset[i]["source"] for i in range(12)]))
    torch.testing.assert_close(latents["source"], direct, atol=1e-5, rtol=1e-5)


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


def test_pixel_statistics_tell_a_flat_fill_from_the_gt_on_a_real_texture(photos) -> None:
    """A 12 px band across the cat's fur (chelsea), filled flat with the ring's mean: at pixel scale 1 the fill
    has less texture than its ring and no spread, the GT keeps both; every scale is a column block of
    PIXEL_STAT_NAMES; the statistics do not change under a horizontal flip (the latent cache flips latents
    and keeps them)."""
    rgb = photos["chelsea"][150:214, 250:314]
    gt = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 26:38, 8:56] = 1
    flat = gt * (1 - mask) + mask * (gt * (1 - mask)).sum((2, 3), keepdim=True) / (1 - mask).sum()
    images, masks, source = torch.cat([flat, gt]), mask.expand(2, -1, -1, -1), torch.zeros(2, 3, 64, 64)
    stats = pixel_statistics(images, masks, source)
    assert stats.shape == (2, len(PIXEL_STAT_NAMES)) and torch.isfinite(stats).all()

    def col(name: str) -> torch.Tensor:
        return stats[:, PIXEL_STAT_NAMES.index(name)]

    assert col("px1_texture_gap")[0] < -0.25 and abs(float(col("px1_texture_gap")[1])) < 0.1
    assert col("px1_fill_spread")[0] < 0.05 and col("px1_fill_spread")[1] > 0.3
    assert col("px4_fill_spread")[0] < col("px4_fill_spread")[1]
    torch.testing.assert_close(pixel_statistics(images.flip(-1), masks.flip(-1), source), stats, atol=1e-5, rtol=1e-5)


def _pixel_gated(path: Path, seed: int = 5) -> Discriminator:
    """The tiny gated bundle at ``path`` with a random pixel-statistics head attached; returns it."""
    make_tiny_gated_bundle(path)
    disc = load_bundle(path).discriminator
    torch.manual_seed(seed)
    disc.pixel_stats = True
    disc.stats_head = StatsHead(len(disc.stat_columns), hidden=8)
    disc.stats_head.std.uniform_(0.5, 2.0)
    attach_discriminator(path, disc, {})
    return disc.eval()


def test_pixel_statistics_head_round_trip_and_needs_the_crops(tmp_path: Path) -> None:
    """A head over latent and pixel statistics is saved with its column names and loaded as it was; scoring
    without the crops is refused; RemovalPipeline.score feeds them."""
    disc = _pixel_gated(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "discriminator" / "config.json").read_text())
    assert config["stats_head"]["statistics"] == [*STAT_NAMES, "conv_logit", *PIXEL_STAT_NAMES]
    loaded = load_bundle(tmp_path / "b").discriminator
    assert loaded.pixel_stats and loaded.stat_columns == disc.stat_columns
    torch.manual_seed(0)
    x, s = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    m = torch.zeros(2, 1, 64, 64)
    m[..., 10:30, 12:40] = 1
    zx, zs, zm = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32), Discriminator.mask_to_latent(m, 2)
    with torch.no_grad():
        want = disc(zx, zm, zs, x, m, s)
        torch.testing.assert_close(loaded(zx, zm, zs, x, m, s), want)
        # the pixels are in the score, and logit_from with precomputed statistics is the same function
        assert not torch.allclose(want, disc(zx, zm, zs, x.flip(0), m, s))
        torch.testing.assert_close(disc.logit_from(zx, zm, zs, pixel_statistics(x, m, s)), want)
        with pytest.raises(ValueError, match="needs the result, mask and source crops"):
            disc(zx, zm, zs)
    pipe = RemovalPipeline.from_bundle(tmp_path / "b")
    scores = pipe.score(x, s, m)
    with torch.no_grad():
        z = pipe.encode(torch.cat([x, s]))
        expected = torch.sigmoid(loaded(z[:2], zm, z[2:], x, m, s))
    torch.testing.assert_close(scores, expected)


def test_onnx_export_and_graph_removal_score_with_pixel_statistics(tmp_path: Path, photos) -> None:
    """The exported discriminator takes the crops as three more inputs and scores as PyTorch does (export's
    parity check); ``GraphRemoval.score`` on the ONNX Runtime sessions, told by export.json, equals
    ``RemovalPipeline.score`` on real photo crops."""
    import onnxruntime as ort

    from cleanplate.export.onnx import export_onnx, read_manifest
    from cleanplate.graph_removal import GraphRemoval, gate_pixels
    from cleanplate.remover import crops_to_tensors, masks_to_tensor

    _pixel_gated(tmp_path / "b")
    export_onnx(tmp_path / "b", tmp_path / "onnx", graphs=["vae_encoder", "discriminator"], buckets=[64], max_batch=4,
                seed=3)
    manifest = read_manifest(tmp_path / "onnx")
    assert gate_pixels(manifest)
    assert [t["name"] for t in manifest["graphs"]["discriminator"]["inputs"]][3:] == [
        "result_image", "mask_image", "source_image"]
    sessions = {g: ort.InferenceSession(str(tmp_path / "onnx" / f"{g}.onnx"), providers=["CPUExecutionProvider"])
                for g in ("vae_encoder", "discriminator")}
    removal = GraphRemoval(lambda g, inputs, out: sessions[g].run([out], inputs)[0], vae_scale_factor=2,
                           gate_pixels=True)
    source = np.stack([photos["coffee"][100:164, 200:264], photos["chelsea"][50:114, 100:164]])
    result = source.copy()
    mask = np.zeros((2, 64, 64), np.uint8)
    mask[:, 20:40, 10:50] = 1
    result[mask > 0] = 128
    got = removal.score(source, result, mask)
    pipe = RemovalPipeline.from_bundle(tmp_path / "b")
    want = pipe.score(crops_to_tensors(list(result)), crops_to_tensors(list(source)),
                      masks_to_tensor(list(mask > 0))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
