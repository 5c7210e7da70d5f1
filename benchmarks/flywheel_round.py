"""One short round of RORem's data flywheel (``cleanplate bench flywheel``): generate -> label -> train the
discriminator -> autolabel, with the counts of each step.

1. ``cleanplate data synth``: ``pairs`` synthetic pairs (``size``², seed 7000: never used to build the
   default bundle), split in two halves, round 1 and round 2, plus ``cal_pairs`` more for calibration.
2. ``flywheel generate``: the bundle over both halves (rounds 1 and 2, one candidate per pair).
3. Labels by script. **A stand-in for a person, not one**: the scripted labeler "script-psnr" says *yes*
   when the candidate's PSNR against the pair's GT inside the mask is at least ``psnr_yes`` dB, else
   *no*. It labels the first ``label_r1`` candidates of round 1 (the labels the discriminator learns
   from) and the first ``label_r2`` of round 2 (a spot check the discriminator never sees in training:
   the overlap set on which autolabel's agreement is measured). The default bundle fills masks with
   smudges (README: 10.4 dB in-mask PSNR on the dev set), so a person would reject nearly every candidate;
   the 12 dB cut was picked after looking at these candidates' spread (about 7-22 dB, median 10) so that
   both labels occur. A yes here means "closer to GT than most", not "a good removal".
4. ``label export --round 1`` -> the human labels in RORem's discriminator format (GT = candidate, score).
5. ``train discriminator`` from the bundle (a fresh discriminator on its UNet, as the trainer always
   does), briefly on the CPU: the round-1 labels mixed with synthetic labels (``data disc-labels``) of the
   round-1 pairs, calibrated on synthetic labels of the calibration pairs (target precision 0.9).
6. ``flywheel autolabel``: round 1 and round 2 with the new discriminator at its calibrated threshold
   (round 1's overlap is its own training labels, so its agreement is optimistic; round 2's is held out),
   and round 2 judged by the starting bundle's own gate for comparison (nothing written).

Scratch files go to ``work`` (reused by a rerun unless ``fresh``); the plot shows the candidates' in-mask
PSNR against the scripted labeler's cut.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import environment, pyplot, save_figure, with_environment

LABELER = "script-psnr"
Say = Callable[[str], None]


def psnr_in_mask(directory: Path, cand: Any) -> float:
    """PSNR (dB, 8-bit RGB, :func:`cleanplate.metrics.psnr`) of the candidate's result against the pair's GT
    over the mask's pixels (mask > 127)."""
    from PIL import Image

    from cleanplate.metrics import psnr

    def rgb(name: str) -> np.ndarray:
        return np.asarray(Image.open(directory / name).convert("RGB"))

    mask = np.asarray(Image.open(directory / cand.mask).convert("L")) > 127
    return psnr(rgb(cand.result), rgb(cand.gt), mask)


def _write_meta(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return path


def _rebase(meta: Path, out_dir: Path) -> list[dict]:
    """Entries of ``meta`` with paths made relative to ``out_dir`` (to merge several meta.json files)."""
    entries = json.loads(meta.read_text())
    for e in entries:
        for k in ("source", "mask", "GT"):
            e[k] = Path(os.path.relpath((meta.parent / e[k]).resolve(), out_dir.resolve())).as_posix()
    return entries


def run_flywheel_round(work: Path, *, bundle: str | Path | None = None, pairs: int = 40, cal_pairs: int = 8,
                       seed: int = 7000, size: int = 256, label_r1: int = 12, label_r2: int = 8,
                       psnr_yes: float = 12.0, human_repeat: int = 2, disc_steps: int = 60, fresh: bool = False,
                       say: Say = lambda m: None) -> dict[str, Any]:
    """Run the round (see the module docstring) in ``work`` and return the report.

    Raises:
        InputError: ``pairs`` < 2, ``cal_pairs``, ``human_repeat`` or ``disc_steps`` < 1, or a negative label count.
    """
    import torch

    from cleanplate.bundle import default_bundle_path
    from cleanplate.errors import ErrorCode, InputError
    from cleanplate.training.common import load_config
    from cleanplate.training.disc_labels import make_disc_labels
    from cleanplate.training.discriminator import DiscriminatorConfig, train_discriminator
    from cleanplate.training.flywheel import autolabel, generate, load_pairs, read_candidates
    from cleanplate.training.label_store import LabelStore
    from cleanplate.training.synth import SynthConfig, synth_dataset

    if pairs < 2 or cal_pairs < 1 or human_repeat < 1 or disc_steps < 1 or min(label_r1, label_r2) < 0:
        raise InputError("need --pairs >= 2, --cal-pairs, --human-repeat and --disc-steps >= 1, and label counts "
                         ">= 0", code=ErrorCode.BAD_OPTION)
    config = {"work": str(work), "bundle": str(bundle) if bundle else None, "pairs": pairs, "cal_pairs": cal_pairs,
              "seed": seed, "size": size, "label_r1": label_r1, "label_r2": label_r2, "psnr_yes": psnr_yes,
              "human_repeat": human_repeat, "disc_steps": disc_steps, "fresh": fresh}
    bundle = bundle or default_bundle_path()
    torch.manual_seed(0)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    say(f"synth: {pairs} + {cal_pairs} pairs")
    n_half = pairs // 2
    meta = synth_dataset(work / "pairs", pairs + cal_pairs, seed=seed, cfg=SynthConfig(size=size), progress=False)
    entries = json.loads(meta.read_text())
    splits = {"round1": entries[:n_half], "round2": entries[n_half:pairs], "cal": entries[pairs:]}
    split_meta = {k: _write_meta(work / "pairs" / f"{k}.json", v) for k, v in splits.items()}
    timings["synth_s"] = time.perf_counter() - t

    fw = work / "flywheel"
    t = time.perf_counter()
    gen = {}
    for rnd, key in ((1, "round1"), (2, "round2")):
        say(f"generate: round {rnd}")
        res = generate(load_pairs(split_meta[key]), fw, bundle=bundle, round=rnd, seed=0, batch_size=4)
        gen[str(rnd)] = {"generated": res.generated, "already": res.already, "failed": res.failed}
    timings["generate_s"] = time.perf_counter() - t
    cands = read_candidates(fw)

    # scripted labels: the stand-in for a person (see the module docstring)
    t = time.perf_counter()
    store = LabelStore(fw)
    store.sync()
    labeled_ids = {lab.item_id for lab in store.labels(labeler=LABELER)}
    psnr = {c.id: psnr_in_mask(fw, c) for c in cands}
    for rnd, count in ((1, label_r1), (2, label_r2)):
        for cand in [c for c in cands if c.round == rnd][:count]:
            if cand.id not in labeled_ids:
                store.add_label(cand.id, "yes" if psnr[cand.id] >= psnr_yes else "no", LABELER)
    all_psnr = list(psnr.values())
    label_counts = {r: store.decisions("majority", rounds=[r])[1] for r in (1, 2)}
    human_meta = work / "labels_round1.json"
    store.export(human_meta, "majority", rounds=[1])
    timings["label_s"] = time.perf_counter() - t

    # the discriminator: round-1 human labels + synthetic labels of the round-1 pairs; calibration pairs held out
    t = time.perf_counter()
    say(f"train discriminator: {disc_steps} steps")
    synth_labels = make_disc_labels([split_meta["round1"]], work / "disc_synth", per_item=2, seed=1)
    cal_labels = make_disc_labels([split_meta["cal"]], work / "disc_cal", per_item=4, seed=2)
    train_meta = _write_meta(work / "disc_train.json",
                             _rebase(human_meta, work) * human_repeat + _rebase(synth_labels, work))
    cfg = load_config(DiscriminatorConfig, None, {
        "meta": [train_meta], "val_meta": [cal_labels], "bundle": bundle, "out": work / "bundle_r1",
        "max_steps": disc_steps, "batch_size": 8, "lr": 2e-3, "warmup_steps": 10, "checkpoint_every": 1000,
        "seed": 0, "dilate_range": (0, 8)})
    shutil.rmtree(cfg.resolved_work_dir, ignore_errors=True)  # a fresh run every time, never a resumed one
    trained = train_discriminator(cfg)
    cal = trained["calibration"]
    timings["train_discriminator_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("autolabel: rounds 1 and 2")
    reports = {
        "round1_new_gate": autolabel(fw, bundle=cfg.out, round=1),
        "round2_new_gate": autolabel(fw, bundle=cfg.out, round=2),
        "round2_default_gate": autolabel(fw, bundle=bundle, round=2, write=False),
    }
    timings["autolabel_s"] = time.perf_counter() - t

    return {
        "harness": "flywheel",
        "config": config,
        "generate": gen,
        "candidates": len(cands),
        "psnr_in_mask_db": {"all_candidates": {"min": min(all_psnr), "median": float(np.median(all_psnr)),
                                               "max": max(all_psnr)}, "yes_at": psnr_yes, "per_candidate": all_psnr},
        "scripted_labels": {str(r): {k: label_counts[r][k] for k in ("items", "decided", "yes", "no")}
                            for r in (1, 2)},
        "discriminator": {"train_items": cal.get("train_items"), "train_positives": cal.get("train_positives"),
                          "human_labels_in_train": label_counts[1]["decided"], "human_repeat": human_repeat,
                          "synthetic_labels_in_train": len(json.loads(synth_labels.read_text())),
                          "steps": cal.get("steps"), "final_loss": cal.get("final_loss"),
                          "threshold": cal.get("threshold"), "rule": cal.get("rule"),
                          "val_roc_auc": cal.get("roc_auc"), "val_precision": cal.get("precision"),
                          "val_recall": cal.get("recall"), "val_items": (cal.get("n_pos", 0) + cal.get("n_neg", 0))},
        "autolabel": reports,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "environment": environment("cpu"),
    }


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def to_markdown(res: dict[str, Any], command: str) -> str:
    d, p, c = res["discriminator"], res["psnr_in_mask_db"], res["config"]
    gen = res["generate"]
    lines = [
        "# One flywheel round (generate -> label -> train the discriminator -> autolabel)",
        "",
        f"`{command}`",
        "",
        (f"{c['pairs']} synthetic pairs ({c['size']}², seed {c['seed']}), bundle `{c['bundle'] or 'default'}`, CPU "
         f"({res['environment']['torch_threads']} torch thread(s))."),
        "",
        ("**The labels are scripted, a stand-in for a person**: yes when the candidate's PSNR against GT inside "
         f"the mask is >= {p['yes_at']} dB. The candidates span {p['all_candidates']['min']:.1f}-"
         f"{p['all_candidates']['max']:.1f} dB (median {p['all_candidates']['median']:.1f}); the default bundle's "
         "fills are smudges a person would reject, so a yes means \"closer to GT than most\", not \"good\"."),
        "",
        "| step | counts |",
        "|---|---|",
        (f"| generate | round 1: {gen['1']['generated']} candidates, round 2: {gen['2']['generated']} "
         f"(failed: {sum(g['failed'] for g in gen.values())}) |"),
    ]
    for r in ("1", "2"):
        s = res["scripted_labels"][r]
        lines.append(f"| label round {r} (script) | {s['decided']} labeled: {s['yes']} yes, {s['no']} no |")
    lines += [
        (f"| train discriminator | {d['train_items']} items ({d['human_labels_in_train']} round-1 scripted labels x "
         f"{d['human_repeat']}, {d['synthetic_labels_in_train']} synthetic), {d['steps']} steps; threshold "
         f"{_fmt(d['threshold'], 3)} ({d['rule']}); on {d['val_items']} held-out synthetic labels: ROC AUC "
         f"{_fmt(d['val_roc_auc'])}, precision {_fmt(d['val_precision'])}, recall {_fmt(d['val_recall'])} |"),
        "",
        ("| autolabel | gate | threshold | candidates | accepted by the gate | added to train_meta (gate / people) "
         "| overlap with labels | precision | recall | accuracy | Cohen's kappa |"),
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    names = {"round1_new_gate": ("round 1", "retrained (its overlap = its own training labels)"),
             "round2_new_gate": ("round 2", "retrained (overlap held out)"),
             "round2_default_gate": ("round 2", "the starting bundle's, before retraining (dry run)")}
    for key, (rnd, gate) in names.items():
        r = res["autolabel"][key]
        a, added = r["agreement_on_overlap"], r["added"]
        added_text = ("not written" if key == "round2_default_gate"
                      else f"{added['total']} ({added['by_discriminator']} / {added['by_human']})")
        lines.append(f"| {rnd} | {gate} | {_fmt(r['threshold'], 3)} ({r['threshold_source']}) | {r['candidates']} | "
                     f"{r['disc_accepted']} | {added_text} | {a['n']} | {_fmt(a['precision'])} | {_fmt(a['recall'])} | "
                     f"{_fmt(a['accuracy'])} | {_fmt(a['kappa'])} |")
    t = res["timings_s"]
    n_overlap = res["autolabel"]["round2_new_gate"]["agreement_on_overlap"]["n"]
    lines += [
        "",
        "Timings (s): " + ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in t.items()) + ".",
        "",
        ("Read with care: a few scripted labels, a discriminator trained for a few CPU steps, and a remover whose "
         f"outputs are nearly all poor. On an overlap of {n_overlap} items one disagreement moves accuracy by "
         f"{1 / max(1, n_overlap):.3f}"
         + (f"; a held-out ROC AUC of {d['val_roc_auc']:.2f} on the synthetic labels says the calibrated threshold "
            "is close to arbitrary" if (d["val_roc_auc"] or 0.0) < 0.6 else "")
         + ". The table shows that the loop runs end to end and what each step counts, not how good a gate a real "
         "labelled round would give."),
    ]
    return with_environment(lines, res["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: the candidates' in-mask PSNR (histogram) and the scripted labeler's yes cut."""
    plt = pyplot()
    p = report["psnr_in_mask_db"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(p["per_candidate"], bins=20, color="C0")
    ax.axvline(p["yes_at"], color="C3", ls="--", label=f"scripted yes at {p['yes_at']:g} dB")
    ax.set(xlabel="PSNR against GT inside the mask (dB)", ylabel="candidates",
           title=f"{report['candidates']} candidates of the bundle")
    ax.legend()
    return [save_figure(fig, out.with_suffix(".png"))]


