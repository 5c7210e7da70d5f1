"""Tests for the synthetic e-commerce triplet generator (cleanplate.training.synth)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

synth = pytest.importorskip("cleanplate.training.synth")

from cleanplate.errors import InputError  # noqa: E402

CFG = synth.SynthConfig(size=128)


@pytest.fixture(scope="module")
def items():
    return [synth.make_triplet(0, i, CFG) for i in range(40)]


def test_same_seed_is_identical_and_other_seed_differs():
    a = synth.make_triplet(3, 5, CFG)
    b = synth.make_triplet(3, 5, CFG)
    for x, y in zip(a[:3], b[:3], strict=False):
        assert np.array_equal(x, y)
    assert a[3] == b[3]
    c = synth.make_triplet(4, 5, CFG)
    assert not np.array_equal(a[0], c[0])


def test_triplet_invariants(items):
    for src, mask, gt, info in items:
        assert src.shape == gt.shape == (128, 128, 3)
        assert src.dtype == gt.dtype == np.uint8
        assert mask.shape == (128, 128) and mask.dtype == bool
        assert 0 < mask.mean() <= 0.6
        assert np.array_equal(src[~mask], gt[~mask])
        assert (src[mask] != gt[mask]).any()
        assert info["kind"] in synth.OVERLAY_KINDS
        assert isinstance(info["background"], str) and info["background"]


def test_every_overlay_kind_and_background_type_appears(items):
    kinds = Counter(info["kind"] for *_, info in items)
    assert set(kinds) == set(synth.OVERLAY_KINDS), kinds
    backgrounds = {info["background"].split(":")[0] for *_, info in items}
    assert {"photo", "studio"} <= backgrounds


def test_add_overlay_and_make_background_public_api():
    rng = np.random.default_rng(1)
    bg = synth.make_background(rng, CFG)
    assert bg.shape == (128, 128, 3) and bg.dtype == np.uint8
    src, mask, kind = synth.add_overlay(bg, rng)
    assert kind in synth.OVERLAY_KINDS
    assert np.array_equal(src[~mask], bg[~mask]) and mask.any()


def test_dataset_layout_independent_of_n_and_resumes(tmp_path):
    meta_path = synth.synth_dataset(tmp_path / "a", 4, seed=7, cfg=CFG, progress=False)
    assert meta_path == tmp_path / "a" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert len(meta) == 4
    for entry in meta:
        assert {"source", "mask", "GT", "kind", "background"} <= set(entry)
        for key, mode in (("source", "RGB"), ("mask", "L"), ("GT", "RGB")):
            assert not os.path.isabs(entry[key])
            with Image.open(meta_path.parent / entry[key]) as im:
                assert im.size == (128, 128) and im.mode == mode
        m = np.asarray(Image.open(meta_path.parent / entry["mask"]))
        assert set(np.unique(m)) <= {0, 255}

    # item i is the same whatever n is
    meta_b = synth.synth_dataset(tmp_path / "b", 2, seed=7, cfg=CFG, progress=False)
    for i in range(2):
        for key in ("source", "mask", "GT"):
            assert (tmp_path / "a" / meta[i][key]).read_bytes() == (meta_b.parent / meta[i][key]).read_bytes()

    # resume: existing files are not rewritten, missing ones are, meta.json matches
    first = tmp_path / "a" / meta[0]["source"]
    os.utime(first, (1_000_000, 1_000_000))
    missing = tmp_path / "a" / meta[1]["GT"]
    before = missing.read_bytes()
    missing.unlink()
    synth.synth_dataset(tmp_path / "a", 4, seed=7, cfg=CFG, progress=False)
    assert first.stat().st_mtime == 1_000_000
    assert missing.read_bytes() == before
    assert json.loads(meta_path.read_text()) == meta
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_resume_without_meta_json_recovers_info(tmp_path):
    meta_path = synth.synth_dataset(tmp_path, 2, seed=1, cfg=CFG, progress=False)
    text = meta_path.read_text()
    meta_path.unlink()
    assert synth.synth_dataset(tmp_path, 2, seed=1, cfg=CFG, progress=False).read_text() == text


@pytest.mark.parametrize("n", [0, -3])
def test_bad_n_raises(tmp_path, n):
    with pytest.raises(InputError) as exc:
        synth.synth_dataset(tmp_path, n, progress=False)
    assert exc.value.code == "bad_option"


def test_photo_lists_disjoint_and_load_offline():
    assert set(synth.TRAIN_PHOTOS).isdisjoint(synth.DEV_PHOTOS)
    assert "astronaut" in synth.DEV_PHOTOS and len(synth.DEV_PHOTOS) >= 3
    for name in synth.TRAIN_PHOTOS + synth.DEV_PHOTOS:
        img = synth.load_photo(name)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        assert min(img.shape[:2]) >= 64
    color = [n for n in synth.DEV_PHOTOS if np.ptp(synth.load_photo(n).astype(int).std(axis=2)) > 0]
    assert len(color) >= 3


def test_dev_photo_config():
    cfg = synth.SynthConfig(size=96, photo_fraction=1.0, photos=synth.DEV_PHOTOS)
    src, mask, gt, info = synth.make_triplet(0, 0, cfg)
    assert info["background"].split(":")[1] in synth.DEV_PHOTOS
    assert src.shape == (96, 96, 3)
    with pytest.raises(InputError):
        synth.SynthConfig(size=8)
