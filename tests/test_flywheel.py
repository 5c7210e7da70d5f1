"""The data flywheel (RORem's human-in-the-loop loop): generate candidates, label them (store, API, a real
headless Chromium on the labeling page), export, train the discriminator on the export, autolabel."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import serve_in_thread
from PIL import Image

from cleanplate.errors import InputError
from cleanplate.imaging import dilate_mask
from cleanplate.training.common import read_meta
from cleanplate.training.flywheel import (
    CANDIDATES_FILE,
    Candidate,
    agreement,
    autolabel,
    generate,
    load_pairs,
    read_candidates,
)
from cleanplate.training.label_server import create_app
from cleanplate.training.label_store import LabelStore


@pytest.fixture(scope="module")
def fly(tmp_path_factory: pytest.TempPathFactory, gated_bundle: Path, synth_data: Path) -> Path:
    """A flywheel directory: the tiny gated bundle over the first 6 synthetic pairs (round 1)."""
    out = tmp_path_factory.mktemp("fly") / "fw"
    result = generate(load_pairs(synth_data)[:6], out, bundle=gated_bundle)
    assert (result.generated, result.failed) == (6, 0)
    return out


def _copy(fly: Path, dst: Path) -> Path:
    shutil.copytree(fly, dst)
    return dst


def _png(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


# --------------------------------------------------------------------------------------------- generate
def test_generate_stores_candidates_and_resumes_without_redoing(tmp_path, gated_bundle, synth_data, monkeypatch):
    from cleanplate import remover

    removed: list[int] = []
    real = remover.remove_batch
    monkeypatch.setattr(remover, "remove_batch", lambda pipe, reqs, **kw: removed.append(len(reqs)) or real(pipe, reqs, **kw))
    pairs = load_pairs(synth_data)
    out = tmp_path / "fw"
    first = generate(pairs[:3], out, bundle=gated_bundle, batch_size=2)
    assert (first.generated, first.already, first.failed, sum(removed)) == (3, 0, 0, 3)
    cands = read_candidates(out)
    assert [c.round for c in cands] == [1, 1, 1] and len({c.id for c in cands}) == 3
    for c, pair in zip(cands, pairs, strict=False):
        src = np.asarray(Image.open(out / c.source))
        res = np.asarray(Image.open(out / c.result))
        mask = np.asarray(Image.open(out / c.mask))
        assert src.shape == res.shape == (64, 64, 3) and mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(src, np.asarray(Image.open(pair.source).convert("RGB")))
        far = ~dilate_mask(mask > 127, c.dilate_px)
        np.testing.assert_array_equal(res[far], src[far])  # bit-exact outside the dilated mask
        assert 0.0 <= c.score <= 1.0 and c.threshold == 0.5 and c.seed == 0 and c.bundle == "tiny"
        assert (out / c.gt).resolve() == pair.gt.resolve()

    # a run killed mid-write: the last candidate's line is half written
    lines = (out / CANDIDATES_FILE).read_text().splitlines(keepends=True)
    (out / CANDIDATES_FILE).write_text("".join(lines[:2]) + lines[2][:25])
    removed.clear()
    again = generate(pairs[:5], out, bundle=gated_bundle, batch_size=2)
    assert (again.generated, again.already, sum(removed)) == (3, 2, 3)  # the cut one + 2 new, not the 2 done
    text = (out / CANDIDATES_FILE).read_text()
    assert all(json.loads(line) for line in text.splitlines()) and text.endswith("\n")
    assert [c.id for c in read_candidates(out)][:2] == [c.id for c in cands[:2]] and len(read_candidates(out)) == 5

    removed.clear()
    assert generate(pairs[:5], out, bundle=gated_bundle).generated == 0 and removed == []
    # a new round (or more seeds per pair) makes new candidates of the same pairs
    r2 = generate(pairs[:2], out, bundle=gated_bundle, round=2, per_pair=2, seed=7)
    assert r2.generated == 4
    new = [c for c in read_candidates(out) if c.round == 2]
    assert sorted(c.seed for c in new) == [7, 7, 8, 8] and all(c.id.startswith("r2-") for c in new)


def test_generate_from_a_folder_cli_and_bad_input(cli, tmp_path, gated_bundle, photos):
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    for name, img in (("cat", photos["chelsea"]), ("coffee", photos["coffee"])):
        _png(imgs / f"{name}.jpg", img)
        m = np.zeros(img.shape[:2], np.uint8)
        m[40:90, 60:140] = 255
        _png(masks / f"{name}.png", m)
    _png(imgs / "empty.png", photos["astronaut"][:64, :64])
    _png(masks / "empty.png", np.zeros((64, 64), np.uint8))  # nothing to remove: that pair fails, others go on
    r = cli("flywheel", "generate", imgs, "--masks", masks, "-o", tmp_path / "fw", "--bundle", gated_bundle)
    assert r.code == 1, r.err
    assert "error:" in r.err and "empty" in r.err and "generated 2, already there 0, failed 1" in r.err
    cands = read_candidates(tmp_path / "fw")
    assert len(cands) == 2 and {c.width for c in cands} == {451, 600}

    for args, message in (
        ((imgs, "-o", tmp_path / "x"), "needs --masks"),
        ((tmp_path / "nope.json", "-o", tmp_path / "x"), "no such file"),
        ((imgs, "--masks", masks, "-o", tmp_path / "x", "--per-pair", "0"), "per_pair"),
    ):
        r = cli("flywheel", "generate", *args, "--bundle", gated_bundle)
        assert r.code == 2 and r.err.strip().splitlines()[-1].startswith("error:") and message in r.err, r.err
    (tmp_path / "bad.json").write_text(json.dumps([{"source": "a.png"}]))
    r = cli("flywheel", "generate", tmp_path / "bad.json", "-o", tmp_path / "x")
    assert r.code == 2 and "entry 0" in r.err


def _held_out(name: str, size: int = 512) -> np.ndarray:
    import cv2

    from cleanplate.training import synth

    return cv2.resize(synth.load_photo(name), (size, size), interpolation=cv2.INTER_AREA)


def test_generate_on_a_plain_folder_with_auto_mask(cli, tmp_path, gated_bundle, photos):
    """A folder of photos without masks: a held-out 512 px photo (never trained on) with promo text drawn by data
    synth gets the shipped detector's mask, a transparent cut-out its alpha hole, a photo with a mask file in
    --masks that file (the rule file > alpha > auto), and a clean photo (product print only) is skipped and
    counted."""
    import shutil

    from cleanplate.bundle import DETECTOR_DIR, attach_detector, default_bundle_path
    from cleanplate.detector import Detector
    from cleanplate.masks import bundle_detector
    from cleanplate.training import synth

    bundle = tmp_path / "bundle"  # the tiny remover with the shipped detector: real masks, fast removals
    shutil.copytree(gated_bundle, bundle)
    attach_detector(bundle, Detector.from_dir(default_bundle_path() / DETECTOR_DIR))
    promo, gt, kind = synth.add_overlay(_held_out("rocket"), np.random.default_rng([99, 2]))
    assert kind == "text"
    cutout = np.dstack([photos["coffee"][:96, :128], np.full((96, 128), 255, np.uint8)])
    cutout[30:60, 40:90, 3] = 0
    imgs, masks = tmp_path / "photos", tmp_path / "masks"
    _png(imgs / "promo.png", promo)
    # a held-out photo with the maker's print on it ("YAMAHA"), which must stay: a harder clean photo than the
    # astronaut, whose silver suit ring an earlier detector took for text
    _png(imgs / "clean.png", _held_out("stereo_motorcycle"))
    _png(imgs / "cutout.png", cutout)
    _png(imgs / "drawn.png", photos["chelsea"][:80, :120])
    drawn = np.zeros((80, 120), np.uint8)
    drawn[10:30, 20:70] = 255
    _png(masks / "drawn.png", drawn)

    r = cli("flywheel", "generate", imgs, "--auto-mask", "--masks", masks, "-o", tmp_path / "fw", "--bundle", bundle)
    assert r.code == 0, r.err
    assert "generated 3, already there 0, failed 0; auto masks on 2 photos, 1 skipped (nothing detected)" in r.err
    cands = {Path(c.pair_source).stem: c for c in read_candidates(tmp_path / "fw")}
    assert sorted(cands) == ["cutout", "drawn", "promo"]
    fw = tmp_path / "fw"
    auto, expected = cands["promo"], bundle_detector(bundle).detect(promo).mask > 0
    assert (auto.mask_source, auto.pair_mask) == ("auto", None) and auto.detections >= 1
    stored = np.asarray(Image.open(fw / auto.mask)) > 127
    np.testing.assert_array_equal(stored, expected)
    # the text, and nothing away from it (the detector's mask also takes a drop shadow's band the text lacks)
    assert (stored & gt).sum() > 0.9 * gt.sum() and (stored & ~dilate_mask(gt, 6)).sum() < 0.01 * stored.sum()
    far = ~dilate_mask(stored, auto.dilate_px)
    np.testing.assert_array_equal(np.asarray(Image.open(fw / auto.result))[far], promo[far])
    assert cands["cutout"].mask_source == "alpha" and cands["cutout"].detections is None
    np.testing.assert_array_equal(np.asarray(Image.open(fw / cands["cutout"].mask)) > 127, cutout[..., 3] == 0)
    assert cands["drawn"].mask_source == "file" and Path(cands["drawn"].pair_mask) == (masks / "drawn.png").resolve()

    again = cli("flywheel", "generate", imgs, "--auto-mask", "--masks", masks, "-o", fw, "--bundle", bundle)
    assert again.code == 0 and "generated 0, already there 3, failed 0" in again.err, again.err

    no_detector = cli("flywheel", "generate", imgs, "--auto-mask", "-o", tmp_path / "x", "--bundle", gated_bundle)
    assert no_detector.code == 2 and "no overlay detector" in no_detector.err, no_detector.err
    plain = cli("flywheel", "generate", imgs, "-o", tmp_path / "x", "--bundle", bundle)
    assert plain.code == 2 and "--auto-mask" in plain.err, plain.err
    # a meta.json entry without a mask: auto with --auto-mask (its GT kept as the reference), else an error
    (tmp_path / "meta.json").write_text(json.dumps([{"source": "photos/promo.png", "GT": "photos/clean.png"}]))
    (pair,) = load_pairs(tmp_path / "meta.json", auto_mask=True)
    assert pair.mask is None and pair.gt == tmp_path / "photos" / "clean.png"
    with pytest.raises(InputError, match="--auto-mask"):
        load_pairs(tmp_path / "meta.json")


# --------------------------------------------------------------------------------------------- label store
def _store_with_items(root: Path, n: int) -> tuple[LabelStore, list[str]]:
    """A flywheel directory holding ``n`` hand-made candidates (64 px) of round 1 in candidates.jsonl."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    with open(root / CANDIDATES_FILE, "w") as f:
        for i in range(n):
            cid = f"r1-item{i}-s0"
            src = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            mask[20:40, 16:48] = 255
            res = src.copy()
            res[20:40, 16:48] = 128
            rel = f"candidates/{cid}"
            for name, arr in (("source", src), ("mask", mask), ("result", res)):
                _png(root / rel / f"{name}.png", arr)
            c = Candidate(id=cid, source=f"{rel}/source.png", mask=f"{rel}/mask.png", result=f"{rel}/result.png",
                          seed=0, round=1, bundle="tiny", dilate_px=2)
            f.write(json.dumps(c.to_json()) + "\n")
            ids.append(cid)
    store = LabelStore(root)
    assert store.sync() == n and store.sync() == 0
    return store, ids


def test_labels_are_stored_with_labeler_and_time(tmp_path):
    store, ids = _store_with_items(tmp_path / "fw", 3)
    before = datetime.now(timezone.utc)
    store.add_label(ids[0], "yes", "alice")
    store.add_label(ids[0], "no", "bob")
    store.add_label(ids[1], "skip", "alice")
    after = datetime.now(timezone.utc)
    labels = store.labels()
    assert [(lab.item_id, lab.label, lab.labeler, lab.round) for lab in labels] == [
        (ids[0], "yes", "alice", 1), (ids[0], "no", "bob", 1), (ids[1], "skip", "alice", 1)]
    for lab in labels:
        t = datetime.fromisoformat(lab.created_at)
        assert t.tzinfo is not None and before - timedelta(seconds=1) <= t <= after + timedelta(seconds=1)
    # the same rows, read with plain sqlite3 from the file
    with sqlite3.connect(tmp_path / "fw" / "labels.sqlite") as db:
        rows = db.execute("SELECT item_id, label, labeler FROM labels ORDER BY id").fetchall()
    assert rows == [(ids[0], "yes", "alice"), (ids[0], "no", "bob"), (ids[1], "skip", "alice")]
    # each labeler walks the items in order; a skip moves them on
    assert store.next_item("alice").id == ids[2] and store.next_item("bob").id == ids[1]
    assert store.progress("alice") == {"total": 3, "labeled": 1, "done": 2, "remaining": 1, "yes": 1, "no": 0,
                                       "skip": 1}
    assert store.undo("alice").label == "skip" and store.next_item("alice").id == ids[1]
    assert store.undo("carol") is None
    store.add_label(ids[1], "yes", "alice")
    store.add_label(ids[2], "no", "alice")
    assert store.next_item("alice") is None
    for args, code in ((("nope", "yes", "alice"), "unknown_item"), ((ids[0], "maybe", "alice"), "bad_label"),
                       ((ids[0], "yes", "  "), "bad_labeler")):
        with pytest.raises(InputError) as err:
            store.add_label(*args)
        assert err.value.code == code


def test_export_policies_and_the_meta_json_they_write(tmp_path):
    store, ids = _store_with_items(tmp_path / "fw", 7)
    for item, label, who in ((0, "yes", "alice"),
                             (1, "yes", "alice"), (1, "no", "bob"),
                             (2, "no", "alice"), (2, "no", "bob"), (2, "yes", "carol"),
                             (3, "yes", "alice"), (3, "no", "alice"),    # alice changed her mind
                             (4, "skip", "alice"),
                             (5, "yes", "bob"), (5, "skip", "bob")):     # bob's latest word is a skip
        store.add_label(ids[item], label, who)
    decided, counts = store.decisions("majority")
    assert {d.item.id: d.score for d in decided} == {ids[0]: 1, ids[2]: 0, ids[3]: 0}
    assert counts == {"items": 7, "decided": 3, "yes": 1, "no": 2, "ties": 1, "too_few_votes": 0, "unlabeled": 3}
    decided, counts = store.decisions("latest")
    assert {d.item.id: d.score for d in decided} == {ids[0]: 1, ids[1]: 0, ids[2]: 1, ids[3]: 0}
    decided, counts = store.decisions("majority", min_votes=2)
    assert {d.item.id: d.score for d in decided} == {ids[2]: 0} and counts["too_few_votes"] == 2
    decided, _ = store.decisions("majority", labelers=["alice"])
    assert {d.item.id: d.score for d in decided} == {ids[0]: 1, ids[1]: 1, ids[2]: 0, ids[3]: 0}

    out = tmp_path / "elsewhere" / "meta.json"
    out.parent.mkdir()
    assert store.export(out)["decided"] == 3
    entries = json.loads(out.read_text())
    assert [(e["item"], e["score"], e["votes"]) for e in entries] == [
        (ids[0], 1, {"yes": 1, "no": 0}), (ids[2], 0, {"yes": 1, "no": 2}), (ids[3], 0, {"yes": 0, "no": 1})]
    assert entries[1]["labelers"] == ["alice", "bob", "carol"] and entries[0]["label_kind"] == "remover"
    triplets = read_meta([out])  # paths are relative to the meta.json, GT is the candidate judged
    assert triplets[0].gt.resolve() == (tmp_path / "fw" / f"candidates/{ids[0]}/result.png").resolve()
    assert [t.score for t in triplets] == [1, 0, 0]
    empty, _ = _store_with_items(tmp_path / "empty", 1)
    with pytest.raises(InputError, match="no labelled item"):
        empty.export(tmp_path / "e.json")


def test_exported_labels_train_the_discriminator_unchanged(cli, fly, gated_bundle, tmp_path):
    fw = _copy(fly, tmp_path / "fw")
    store = LabelStore(fw)
    store.sync()
    for k, item in enumerate(store.items()):
        store.add_label(item.id, "yes" if k % 2 else "no", "alice")
    r = cli("label", "export", fw, "-o", tmp_path / "labels" / "meta.json")
    assert r.code == 0 and "6 items (yes 3, no 3)" in r.err, r.err
    meta = tmp_path / "labels" / "meta.json"
    r = cli("train", "discriminator", "--meta", meta, "--val-meta", meta, "--bundle", gated_bundle, "--out",
            tmp_path / "disc", "--max-steps", "2", "--batch-size", "4")
    assert r.code == 0, r.err
    assert "threshold" in r.err and (tmp_path / "disc" / "discriminator" / "model.safetensors").exists()
    r = cli("label", "export", tmp_path / "missing", "-o", tmp_path / "m.json")
    assert r.code == 2 and r.err.startswith("error: no such flywheel directory")


# --------------------------------------------------------------------------------------------- autolabel
def test_agreement_numbers():
    acc = [True, True, False, False, True, False, False, False]
    hum = [True, False, True, False, True, False, False, False]
    a = agreement(acc, hum)
    assert (a["n"], a["tp"], a["fp"], a["fn"], a["tn"]) == (8, 2, 1, 1, 4)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert a["accuracy"] == pytest.approx(6 / 8)
    # p_o = 48/64, p_e = (3/8)(3/8) + (5/8)(5/8) = 34/64 -> kappa = 14/30
    assert a["kappa"] == pytest.approx(14 / 30)
    assert agreement([True, True], [True, True])["kappa"] is None  # one answer from both raters: undefined
    assert agreement([False, False], [True, False])["precision"] is None
    assert agreement([], [])["accuracy"] is None


def test_autolabel_counts_and_agreement_on_a_constructed_case(tmp_path):
    store, ids = _store_with_items(tmp_path / "fw", 6)
    # the discriminator's view: items 0, 1, 2 pass 0.9; 3, 4, 5 do not
    scores = dict(zip(ids, [0.95, 0.91, 0.90, 0.5, 0.2, 0.89], strict=True))
    scorer = lambda cands: [scores[c.id] for c in cands]
    # people: 0 yes (agree), 1 no (disagree: the discriminator accepts), 3 yes (disagree), 4 no (agree)
    for i, label in ((0, "yes"), (1, "no"), (3, "yes"), (4, "no")):
        store.add_label(ids[i], label, "alice")
    rep = autolabel(tmp_path / "fw", scorer=scorer, threshold=0.9)
    assert (rep["candidates"], rep["disc_accepted"], rep["threshold_source"]) == (6, 3, "option")
    assert rep["human_decisions"] == {"n": 4, "yes": 2, "no": 2, "policy": "majority", "min_votes": 1}
    # added: 2 (discriminator, unlabeled and >= 0.9) + 0 and 3 (human yes); 1 is out (human no beats 0.91)
    assert rep["added"] == {"total": 3, "by_discriminator": 1, "by_human": 2}
    a = rep["agreement_on_overlap"]
    assert (a["n"], a["tp"], a["fp"], a["fn"], a["tn"]) == (4, 1, 1, 1, 1)
    assert a["accuracy"] == 0.5 and a["kappa"] == pytest.approx(0.0)
    meta = tmp_path / "fw" / "train_meta.json"
    entries = json.loads(meta.read_text())
    assert {(e["item"], e["labeled_by"]) for e in entries} == {(ids[0], "human"), (ids[2], "discriminator"),
                                                               (ids[3], "human")}
    assert all(e["score"] == 1 and e["round"] == 1 for e in entries)
    assert {t.gt.resolve() for t in read_meta([meta])} == {
        (tmp_path / "fw" / f"candidates/{ids[i]}/result.png").resolve() for i in (0, 2, 3)}
    # a rerun of the round replaces its entries; without human labels the discriminator alone decides
    rep = autolabel(tmp_path / "fw", scorer=scorer, threshold=0.9, use_human_labels=False)
    assert rep["added"] == {"total": 3, "by_discriminator": 3, "by_human": 0} and rep["train_meta_total"] == 3
    assert {e["item"] for e in json.loads(meta.read_text())} == set(ids[:3])
    report = json.loads((tmp_path / "fw" / "autolabel_report.json").read_text())
    assert list(report["rounds"]) == ["1"] and report["rounds"]["1"]["added"]["by_discriminator"] == 3
    assert autolabel(tmp_path / "fw", scorer=scorer, write=False)["threshold"] == 0.9  # RORem's default
    with pytest.raises(InputError, match="round 3"):
        autolabel(tmp_path / "fw", scorer=scorer, round=3)


def test_autolabel_cli_scores_with_the_bundle_discriminator(cli, fly, gated_bundle, tiny_bundle, tmp_path):
    fw = _copy(fly, tmp_path / "fw")
    r = cli("flywheel", "autolabel", fw, "--bundle", gated_bundle, "--threshold", "0.5", "--report",
            tmp_path / "r.json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep == json.loads((tmp_path / "r.json").read_text())
    cands = read_candidates(fw)
    # the same scores as the gate gave at generation time (same crops, same discriminator)
    assert rep["disc_accepted"] == sum(c.score >= 0.5 for c in cands) and rep["candidates"] == 6
    assert rep["threshold_source"] == "option" and "round 1: 6 candidates" in r.err
    r = cli("flywheel", "autolabel", fw, "--bundle", gated_bundle)  # random-init gate: not calibrated -> 0.9
    assert r.code == 0 and json.loads(r.out)["threshold"] == 0.9 and json.loads(r.out)["threshold_source"] == "rorem_default"
    r = cli("flywheel", "autolabel", fw, "--bundle", tiny_bundle)
    assert r.code == 2 and "no discriminator" in r.err
    r = cli("flywheel", "autolabel", tmp_path / "nothing")
    assert r.code == 2 and r.err.startswith("error: no candidates")


# --------------------------------------------------------------------------------------------- the page
def test_label_api(fly, tmp_path):
    fw = _copy(fly, tmp_path / "fw")
    ids = [c.id for c in read_candidates(fw)]
    with serve_in_thread(create_app(fw)) as url, httpx.Client(base_url=url) as http:
        page = http.get("/")
        assert page.status_code == 200 and "source" in page.text and "<script" in page.text
        assert "http://" not in page.text.replace(url, "") and "https://" not in page.text  # nothing from outside
        nxt = http.get("/api/next", params={"labeler": "ann"}).json()
        assert nxt["item"]["id"] == ids[0] and nxt["progress"]["total"] == 6 and nxt["progress"]["done"] == 0
        png = http.get(nxt["item"]["urls"]["result"])
        assert png.headers["content-type"] == "image/png"
        assert png.content == (fw / read_candidates(fw)[0].result).read_bytes()
        r = http.post("/api/label", json={"item_id": ids[0], "label": "yes", "labeler": "ann"})
        assert r.status_code == 200 and r.json()["progress"]["yes"] == 1
        assert r.json()["label"]["labeler"] == "ann" and r.json()["label"]["created_at"].endswith("+00:00")
        assert http.get("/api/next", params={"labeler": "ann"}).json()["item"]["id"] == ids[1]
        assert http.get("/api/next", params={"labeler": "ben"}).json()["item"]["id"] == ids[0]
        r = http.post("/api/label", json={"item_id": ids[1], "label": "no", "labeler": "ann"})
        undone = http.post("/api/undo", json={"labeler": "ann"}).json()["undone"]
        assert (undone["item_id"], undone["label"]) == (ids[1], "no")
        r = http.post("/api/label", json={"item_id": ids[1], "label": "maybe", "labeler": "ann"})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "bad_label"
        assert http.post("/api/label", json={"item_id": "nope", "label": "yes", "labeler": "ann"}).status_code == 404
        assert http.get("/files/nope/source").status_code == 404
        assert http.get(f"/files/{ids[0]}/..%2Flabels.sqlite").status_code == 404
        exported = http.get("/api/export").json()
        assert [(e["item"], e["score"]) for e in exported] == [(ids[0], 1)]
        assert (fw / exported[0]["GT"]).exists()
        r = http.post("/api/export", json={}).json()
        assert r["counts"]["decided"] == 1 and Path(r["path"]) == fw / "labels_meta.json"


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    path = os.environ.get("CLEANPLATE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(f"Chromium not found ({path}): the labeling page test needs Debian's chromium "
                    f"(apt-get install -y chromium; .ci/run installs it) or CLEANPLATE_CHROMIUM=/path/to/chromium")
    return path


@pytest.mark.browser
def test_label_page_in_a_real_browser(fly, tmp_path):
    """Three items labeled with the keyboard (Y, N, S then U to undo the skip, Y), exported with E, read back
    from SQLite and from the exported meta.json."""
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]'")
    fw = _copy(fly, tmp_path / "fw")
    ids = [c.id for c in read_candidates(fw)]
    with serve_in_thread(create_app(fw)) as url, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{url}/?labeler=tester")
            page.wait_for_selector("body[data-state=ready]")
            # all three panels loaded real images of the item
            for kind in ("source", "mask", "result"):
                page.wait_for_function(f"document.getElementById('img-{kind}').naturalWidth === 64")

            def press(key: str, expect_id: str) -> None:
                page.keyboard.press(key)
                page.wait_for_function("([id]) => document.body.dataset.state === 'ready' && "
                                       "document.getElementById('item-id').textContent === id", arg=[expect_id])

            assert page.text_content("#item-id") == ids[0]
            press("y", ids[1])
            press("n", ids[2])
            press("s", ids[3])
            press("u", ids[2])  # undo the skip: item 3 comes back
            press("Y", ids[3])
            assert page.text_content("#progress-text").startswith("3 / 6 labeled by you (yes 2, no 1, skip 0)")
            page.keyboard.press("e")
            page.wait_for_function("document.body.dataset.exported !== undefined")
            assert "exported 3 labels" in page.text_content("#status")
        finally:
            ctx.close()
    with sqlite3.connect(fw / "labels.sqlite") as db:
        rows = db.execute("SELECT item_id, label, labeler FROM labels ORDER BY id").fetchall()
    assert rows == [(ids[0], "yes", "tester"), (ids[1], "no", "tester"), (ids[2], "yes", "tester")]
    exported = json.loads((fw / "labels_meta.json").read_text())
    assert [(e["item"], e["score"], e["labelers"]) for e in exported] == [
        (ids[0], 1, ["tester"]), (ids[1], 0, ["tester"]), (ids[2], 1, ["tester"])]
    assert [t.score for t in read_meta([fw / "labels_meta.json"])] == [1, 0, 1]
