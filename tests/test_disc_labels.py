"""Tests for the discriminator label generator (cleanplate.training.disc_labels)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cleanplate import imaging
from cleanplate.errors import InputError
from cleanplate.training import disc_labels as disc
from cleanplate.training.common import read_meta

pytestmark = pytest.mark.slow

N_ITEMS, PER_ITEM, SIZE = 8, 8, 64


def _png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_input(root: Path, n: int = N_ITEMS, empty_mask_at: int | None = None) -> Path:
    """RORem triplets of SIZE² px: GT a gradient with a coloured square, source GT plus a bright box."""
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    entries = []
    for i in range(n):
        gt = np.stack([xx * 3, yy * 3, (xx + yy) + 40], axis=2).astype(np.uint8)
        sx, sy = rng.integers(0, SIZE - 16, 2)
        gt[sy:sy + 16, sx:sx + 16] = rng.integers(0, 256, 3)
        src, mask = gt.copy(), np.zeros((SIZE, SIZE), bool)
        if i != empty_mask_at:
            x0, y0 = rng.integers(4, 28, 2)
            x1, y1 = x0 + rng.integers(12, 30), y0 + rng.integers(10, 26)
            src[y0:y1, x0:x1] = (255, 255, 0) if i % 2 else (255, 40, 200)
            src[y0 + 3:y1 - 3:4, x0 + 2:x1 - 2] = 0  # stripes, so the box is not flat
            mask[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = True  # the box dilated by 1 px
        rel = {k: f"{k}/{i:03d}.png" for k in ("source", "mask", "GT")}
        _png(src, root / rel["source"])
        _png(mask.astype(np.uint8) * 255, root / rel["mask"])
        _png(gt, root / rel["GT"])
        entries.append(rel)
    (root / "meta.json").write_text(json.dumps(entries))
    return root / "meta.json"


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def data_meta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_input(tmp_path_factory.mktemp("in") / "data")


@pytest.fixture(scope="module")
def run(data_meta: Path, tmp_path_factory: pytest.TempPathFactory):
    """(meta path, entries, input triplets) of one run with per_item=PER_ITEM."""
    meta = disc.make_disc_labels([data_meta], tmp_path_factory.mktemp("out") / "a", per_item=PER_ITEM, seed=0)
    return meta, json.loads(meta.read_text()), read_meta([data_meta])


def candidates(run, kind: str | None = None):
    """(entry, source, mask, GT, candidate) for each output entry (of one kind)."""
    meta, entries, triplets = run
    for e in entries:
        if kind is None or e["label_kind"] == kind:
            t = triplets[e["item"]]
            mask = np.asarray(Image.open(t.mask)) > 127
            yield e, load(t.source), mask, load(t.gt), load(meta.parent / e["GT"])


def test_label_kinds():
    kinds = disc.label_kinds()
    assert {k for k, s in kinds.items() if s == 1} == {"gt", "gt_jpeg", "gt_noise"}
    assert {k for k, s in kinds.items() if s == 0} == {"source", "partial", "blur", "smear", "redrawn"}


def test_output_shape_and_fields(run):
    meta, entries, _ = run
    assert len(entries) == N_ITEMS * PER_ITEM
    assert [e["GT"] for e in entries] == [f"result/{n:06d}.png" for n in range(len(entries))]
    assert Counter(e["item"] for e in entries) == {i: PER_ITEM for i in range(N_ITEMS)}
    kinds = disc.label_kinds()
    for e in entries:
        assert set(e) == {"source", "mask", "GT", "score", "label_kind", "item", "psnr_mask_db", "ssim_mask",
                          "cast_mask"}
        assert e["score"] == kinds[e["label_kind"]]
    assert not list(meta.parent.glob("*.tmp")) and not list((meta.parent / "result").glob("*.tmp"))
    assert (meta.parent / disc.JOURNAL).exists()


def test_outside_mask_every_candidate_equals_source(run):
    n = 0
    for e, src, mask, _gt, cand in candidates(run):
        assert cand.shape == src.shape and cand.dtype == np.uint8
        assert np.array_equal(cand[~mask], src[~mask]), e
        n += 1
    assert n == N_ITEMS * PER_ITEM


def test_source_and_gt_kinds_are_exact(run):
    n_src = n_gt = 0
    for e, src, _mask, _gt, cand in candidates(run, "source"):
        assert np.array_equal(cand, src), e
        n_src += 1
    for e, _src, _mask, gt, cand in candidates(run, "gt"):
        assert np.array_equal(cand, gt), e
        n_gt += 1
    assert n_src and n_gt


def test_positives_are_close_to_gt_and_negatives_are_not(run):
    for e, _src, mask, gt, cand in candidates(run):
        level = disc.defect_level(cand, gt, mask)
        if e["score"] == 1:
            assert level < 8, e
        else:
            assert level >= disc.MIN_DEFECT, e
    for kind in ("gt_jpeg", "gt_noise"):
        diffs = [not np.array_equal(c[m], g[m]) for _, _, m, g, c in candidates(run, kind)]
        assert diffs and all(diffs), kind  # a degraded copy, not GT itself


def test_partial_mixes_source_and_gt_inside_the_mask(run):
    n = 0
    for e, src, mask, gt, cand in candidates(run, "partial"):
        inside = mask & (np.abs(src.astype(int) - gt).max(axis=2) > 3)
        is_src = (cand == src).all(axis=2) & inside
        is_gt = (cand == gt).all(axis=2) & inside
        assert (is_src | is_gt)[inside].all()  # every masked pixel is taken from one of the two
        assert is_src.sum() >= 0.3 * inside.sum(), e  # enough of the object is left
        assert is_gt.sum() > 0, e
        assert not np.array_equal(cand[mask], src[mask]) and not np.array_equal(cand[mask], gt[mask])
        n += 1
    assert n


def test_every_kind_occurs_and_both_labels_do(run):
    _, entries, _ = run
    kinds = Counter(e["label_kind"] for e in entries)
    assert set(kinds) == set(disc.label_kinds()), kinds
    scores = Counter(e["score"] for e in entries)
    assert scores[0] >= 0.25 * len(entries) and scores[1] >= 0.25 * len(entries), scores


def test_same_seed_is_identical_and_other_seed_differs(data_meta: Path, tmp_path: Path):
    # sibling output dirs, so the relative source/mask paths in meta.json are the same too
    a = disc.make_disc_labels([data_meta], tmp_path / "a", per_item=3, seed=5, limit=4)
    b = disc.make_disc_labels([data_meta], tmp_path / "b", per_item=3, seed=5, limit=4)
    c = disc.make_disc_labels([data_meta], tmp_path / "c", per_item=3, seed=6, limit=4)
    assert a.read_bytes() == b.read_bytes()
    names = sorted(p.name for p in (a.parent / "result").iterdir())
    assert len(names) == 12 and names == sorted(p.name for p in (b.parent / "result").iterdir())
    for name in names:
        assert (a.parent / "result" / name).read_bytes() == (b.parent / "result" / name).read_bytes()
    differ = a.read_bytes() != c.read_bytes() or any(
        (a.parent / "result" / n).read_bytes() != (c.parent / "result" / n).read_bytes() for n in names)
    assert differ


def test_positive_fraction_extremes(data_meta: Path, tmp_path: Path):
    pos = json.loads(disc.make_disc_labels([data_meta], tmp_path / "p", positive_fraction=1.0,
                                           per_item=4).read_text())
    assert {e["score"] for e in pos} == {1}
    neg = json.loads(disc.make_disc_labels([data_meta], tmp_path / "n", positive_fraction=0.0,
                                           per_item=4).read_text())
    assert {e["score"] for e in neg} == {0}


@pytest.mark.parametrize("kw", [{"per_item": 0}, {"per_item": -1}, {"positive_fraction": 1.5},
                                {"positive_fraction": -0.1}, {"positive_fraction": math.nan},
                                {"seed": -1}, {"limit": 0}])
def test_bad_options_raise(data_meta: Path, tmp_path: Path, kw):
    with pytest.raises(InputError, match=next(iter(kw))) as err:  # the message names the option
        disc.make_disc_labels([data_meta], tmp_path / "x", **kw)
    assert err.value.code == "bad_option"
    assert not (tmp_path / "x" / "meta.json").exists()


def test_paths_resolve_and_read_meta_reads_output(run, data_meta: Path):
    meta, entries, triplets = run
    assert not (meta.parent / "source").exists()  # inputs are referenced, not copied
    for e in entries:
        assert not os.path.isabs(e["source"]) and not os.path.isabs(e["mask"])
        assert (meta.parent / e["source"]).resolve() == triplets[e["item"]].source.resolve()
        assert (meta.parent / e["mask"]).resolve() == triplets[e["item"]].mask.resolve()
    out = read_meta([meta])
    assert len(out) == len(entries)
    for t, e in zip(out, entries, strict=False):
        assert t.score == e["score"] and t.gt == meta.parent / e["GT"]
        assert load(t.source).shape == load(t.gt).shape == (SIZE, SIZE, 3)


def test_limit_and_empty_masks_are_skipped(tmp_path: Path):
    src_meta = make_input(tmp_path / "in", n=5, empty_mask_at=1)
    entries = json.loads(disc.make_disc_labels([src_meta], tmp_path / "out", per_item=2, limit=3).read_text())
    assert [e["item"] for e in entries] == [0, 0, 2, 2]
    only_empty = make_input(tmp_path / "in2", n=1, empty_mask_at=0)
    with pytest.raises(InputError):
        disc.make_disc_labels([only_empty], tmp_path / "out2")


# -- metrics and the agreement rule --------------------------------------------------------------------------
def test_mask_metrics_and_the_agreement_rule(photos) -> None:
    from cleanplate.metrics import psnr, ssim

    gt = np.ascontiguousarray(photos["astronaut"][:200, :240])
    mask = np.zeros(gt.shape[:2], bool)
    mask[60:110, 80:170] = True
    shifted = gt.astype(int)
    shifted[mask] += (0, 12, -5)  # a green cast over the fill
    shifted = np.clip(shifted, 0, 255).astype(np.uint8)
    m = disc.mask_metrics(shifted, gt, mask)
    clipped = np.abs(shifted[mask].astype(float).mean(0) - gt[mask].astype(float).mean(0)).max()
    assert m["cast_mask"] == pytest.approx(clipped, abs=0.01) and 11 < m["cast_mask"] <= 12
    assert m["psnr_mask_db"] == pytest.approx(psnr(shifted, gt, mask), abs=1e-3)
    # SSIM on the mask's box equals the whole image's map inside the mask
    assert m["ssim_mask"] == pytest.approx(ssim(shifted, gt, mask)[0], abs=1e-4)
    # high PSNR and SSIM, yet the cast is visible: the rule says bad unless the cast limit allows it
    assert m["psnr_mask_db"] > 24 and m["ssim_mask"] > 0.7
    assert not disc.agrees_with_gt(m) and disc.agrees_with_gt(m, max_cast=12.0)
    same = disc.mask_metrics(gt, gt, mask)
    assert same == {"psnr_mask_db": 100.0, "ssim_mask": 1.0, "cast_mask": 0.0} and disc.agrees_with_gt(same)
    assert not disc.agrees_with_gt(same, psnr_good=100.5)


# -- labels from the bundle's own removals -------------------------------------------------------------------
K, SYN = 2, 3  # removals and synthetic candidates per item
RULE = {"psnr_good": 20.0, "ssim_good": 0.5, "max_cast": 8.0}


@pytest.fixture(scope="module")
def real(synth_data: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """(meta path, entries, input triplets) of 4 synthetic 64 px items with the tiny bundle's removals."""
    out = tmp_path_factory.mktemp("real") / "a"
    meta = disc.make_disc_labels([synth_data], out, bundle=tiny_bundle, removals_per_item=K, per_item=SYN, seed=7,
                                 limit=4, **RULE)
    return meta, json.loads(meta.read_text()), read_meta([synth_data])


def test_real_candidates_of_each_kind_in_order(real) -> None:
    meta, entries, triplets = real
    assert {e["item"] for e in entries} == {0, 1, 2, 3}
    for i in range(4):
        kinds = [e["label_kind"] for e in entries if e["item"] == i]
        assert kinds[:3 + K] == ["gt", "source", "telea"] + ["removal"] * K
        synthetic = kinds[3 + K:]
        assert len(synthetic) == SYN and "gt" not in synthetic  # anchors are not drawn again
        assert set(synthetic) <= set(disc.label_kinds())
        assert [e["seed"] for e in entries if e["item"] == i and e["label_kind"] == "removal"] == [7, 8]
    assert [e["GT"] for e in entries] == [f"result/{n:06d}.png" for n in range(len(entries))]


def test_removals_and_telea_are_the_production_outputs(real, tiny_bundle: Path) -> None:
    from cleanplate.metrics import telea
    from cleanplate.pipeline import RemovalPipeline
    from cleanplate.remover import remove

    meta, entries, triplets = real
    pipe = RemovalPipeline.from_bundle(tiny_bundle)
    t = triplets[1]
    src = load(t.source)
    mask = np.asarray(Image.open(t.mask)) > 127
    image = imaging.decode_image(t.source)
    for e in (e for e in entries if e["item"] == 1):
        cand = load(meta.parent / e["GT"])
        if e["label_kind"] == "removal":
            expected = imaging.to_rgb8(remove(pipe, image, mask, seed=e["seed"]).pixels)
            assert np.abs(cand.astype(int) - expected).max() <= 1  # batch of K vs one: float rounding only
        elif e["label_kind"] == "telea":
            assert np.array_equal(cand, telea(src, mask))
        elif e["label_kind"] == "gt":
            assert np.array_equal(cand, load(t.gt))
        elif e["label_kind"] == "source":
            assert np.array_equal(cand, src)


def test_labels_follow_the_recorded_metrics(real) -> None:
    from cleanplate.metrics import psnr

    meta, entries, triplets = real
    metric = [e for e in entries if e["label_kind"] in disc.METRIC_KINDS]
    assert len(metric) == 4 * (1 + K)
    for e in entries:
        t = triplets[e["item"]]
        cand, gt = load(meta.parent / e["GT"]), load(t.gt)
        mask = np.asarray(Image.open(t.mask)) > 127
        assert e["psnr_mask_db"] == pytest.approx(psnr(cand, gt, mask), abs=1e-3)
        good = e["psnr_mask_db"] >= RULE["psnr_good"] and e["ssim_mask"] >= RULE["ssim_good"] \
            and e["cast_mask"] <= RULE["max_cast"]
        if e["label_kind"] in disc.METRIC_KINDS:
            assert e["score"] == int(good), e
        else:
            assert e["score"] == disc.label_kinds()[e["label_kind"]], e
    # a random-weight bundle removes nothing well; Telea fills the smooth synthetic backgrounds well
    assert {e["score"] for e in metric if e["label_kind"] == "removal"} == {0}
    assert any(e["score"] for e in metric if e["label_kind"] == "telea")


def test_synthetic_labels_balance_each_item(real) -> None:
    _, entries, _ = real
    for i in range(4):
        rows = [e for e in entries if e["item"] == i]
        real_scores = [e["score"] for e in rows if e["label_kind"] in disc.METRIC_KINDS]
        synthetic = [e["score"] for e in rows[3 + K:]]
        want = min(SYN, max(0, math.ceil((len(real_scores) + SYN) / 2) - sum(real_scores)))
        assert sum(synthetic) == want, (i, real_scores, synthetic)


def test_same_options_resume_to_the_same_files(real, synth_data: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    meta_a, _, _ = real
    out = meta_a.parent.parent / f"resume-{tmp_path.name}"  # run A's sibling: the same relative input paths
    kw = dict(bundle=tiny_bundle, removals_per_item=K, per_item=SYN, seed=7, **RULE)
    disc.make_disc_labels([synth_data], out, limit=2, **kw)  # "killed" after two items
    with open(out / disc.JOURNAL, "a") as f:
        f.write('{"item": 2, "entries": [{"trunc')  # and mid-line
    meta_b = disc.make_disc_labels([synth_data], out, limit=4, **kw)
    assert meta_b.read_bytes() == meta_a.read_bytes()
    for e in json.loads(meta_a.read_text()):
        assert (out / e["GT"]).read_bytes() == (meta_a.parent / e["GT"]).read_bytes(), e
    # a finished run is not redone: nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in (out / "result").iterdir()}
    disc.make_disc_labels([synth_data], out, limit=4, **kw)
    assert {p: p.stat().st_mtime_ns for p in (out / "result").iterdir()} == before
    # other thresholds: starts over, and every real candidate now fails
    strict = json.loads(disc.make_disc_labels([synth_data], out, limit=4, **{**kw, "psnr_good": 99.0}).read_text())
    assert {e["score"] for e in strict if e["label_kind"] in disc.METRIC_KINDS} == {0}


@pytest.mark.parametrize(("kw", "message"), [
    ({"removals_per_item": 2}, "needs a bundle"),
    ({"bundle": "B", "removals_per_item": 0}, "removals_per_item"),
    ({"bundle": "B", "psnr_good": 0.0}, "psnr_good"),
    ({"bundle": "B", "ssim_good": 1.5}, "ssim_good"),
    ({"bundle": "B", "max_cast": -1.0}, "max_cast"),
    ({"bundle": "B", "per_item": -1}, "per_item"),
])
def test_bad_real_options_raise(data_meta: Path, tiny_bundle: Path, tmp_path: Path, kw, message) -> None:
    kw = {k: tiny_bundle if v == "B" else v for k, v in kw.items()}
    with pytest.raises(InputError, match=message) as err:
        disc.make_disc_labels([data_meta], tmp_path / "x", **kw)
    assert err.value.code == "bad_option" and not (tmp_path / "x").exists()


def test_cli_writes_real_labels_and_rejects_bad_options(cli, synth_data: Path, tiny_bundle: Path,
                                                       tmp_path: Path) -> None:
    r = cli("data", "disc-labels", "--meta", synth_data, "--out", tmp_path / "o", "--bundle", tiny_bundle,
            "--removals-per-item", 1, "--per-item", 0, "--limit", 2)
    assert r.code == 0, r.err
    entries = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert [e["label_kind"] for e in entries] == ["gt", "source", "telea", "removal"] * 2
    assert "removal" in r.err and "good" in r.err
    r = cli("data", "disc-labels", "--meta", synth_data, "--out", tmp_path / "p", "--removals-per-item", 2)
    assert r.code == 2 and r.err.strip().splitlines()[-1].startswith("error: ") and "bundle" in r.err
    assert not (tmp_path / "p").exists()
