"""RORem's human-in-the-loop data flywheel (arXiv 2501.00740, sec. 3.2): generate -> label -> train -> autolabel.

RORem runs its remover over unlabeled (image, mask) pairs, has people judge a share of the results, trains
the discriminator on those judgements, lets the discriminator accept further results above a threshold
(0.9 in the paper) into the remover's training set, and repeats. Here:

* :func:`generate` (``cleanplate flywheel generate``): the current bundle over (source, mask) pairs; each
  result is a *candidate* stored under ``DIR`` (layout below), with the bundle's discriminator score when
  it has one. With ``--auto-mask`` a plain folder of photos is enough: a photo without a mask file gets
  the mask ``cleanplate remove --auto-mask`` would use (:mod:`cleanplate.masks`: transparent pixels, else
  the bundle's overlay detector), and a photo where the detector finds nothing is skipped (counted).
* :mod:`cleanplate.training.label_store` / :mod:`cleanplate.training.label_server` (``cleanplate label
  serve`` / ``export``): people say yes/no/skip; the export is a discriminator ``meta.json`` (``score``).
* ``cleanplate train discriminator`` on that export (unchanged).
* :func:`autolabel` (``cleanplate flywheel autolabel``): the discriminator scores a round's candidates;
  those at or above the threshold join the training ``meta.json``; the report gives the counts and the
  agreement with the human labels on the items both judged.

Layout of a flywheel directory ``DIR``::

    DIR/candidates.jsonl              one JSON line per candidate (CANDIDATE FIELDS), appended and fsynced
    DIR/candidates/<id>/source.png    the source as the remover saw it (8-bit RGB)
    DIR/candidates/<id>/mask.png      the mask (L, 0/255, not dilated)
    DIR/candidates/<id>/result.png    the removal (8-bit RGB, same size)
    DIR/labels.sqlite                 the label store
    DIR/train_meta.json               autolabel's training set (RORem meta.json), one ``round`` per entry
    DIR/autolabel_report.json         autolabel's per-round reports

CANDIDATE FIELDS: ``id`` (``r<round>-<stem>-<hash of the pair's paths>-s<seed>``), ``source``, ``mask``,
``result`` (relative to DIR), ``gt`` (the pair's reference GT relative to DIR, or null: never used by the
loop, only by scripted stand-in labelers), ``pair_source``/``pair_mask`` (the input files), ``seed``,
``round``, ``bundle`` (its name), ``bundle_path``, ``score``/``threshold`` (the generating bundle's
discriminator, or null), ``dilate_px``, ``steps``, ``width``, ``height``, ``time`` (UTC), ``mask_source``
(``file``, ``alpha`` or ``auto``: :class:`cleanplate.masks.MaskSource`; ``pair_mask`` is null unless
``file``) and ``detections`` (overlays the detector found, auto masks only).

Resume: a candidate is done when its line is in ``candidates.jsonl``; its PNGs are written (atomically)
before the line, so a killed run redoes at most the candidates whose line had not been written. A truncated
last line is dropped. A photo skipped because the detector found nothing leaves no line, so a rerun detects
on it again (and skips it again: the detector is deterministic). One ``generate`` at a time per directory (a lock file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cleanplate import imaging
from cleanplate.batch.items import pair_folder
from cleanplate.errors import CleanplateError, ErrorCode, InputError
from cleanplate.locks import exclusive

log = logging.getLogger("cleanplate.training")

CANDIDATES_FILE = "candidates.jsonl"
CANDIDATES_DIR = "candidates"
TRAIN_META = "train_meta.json"
AUTOLABEL_REPORT = "autolabel_report.json"
LOCK_FILE = ".flywheel-generate.lock"
ROREM_THRESHOLD = 0.9  # RORem's auto-labelling threshold (sec. 3.2), used when a gate has no calibration
_STEM = re.compile(r"[^A-Za-z0-9_.-]+")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ------------------------------------------------------------------------------------------ pairs
@dataclass(frozen=True)
class Pair:
    """One unlabeled input: a source image and its mask (white = remove; None: the mask rule of
    :mod:`cleanplate.masks` makes it, from transparent pixels or the overlay detector), optionally a reference GT."""

    source: Path
    mask: Path | None
    gt: Path | None = None

    def key(self) -> str:
        """``<stem>-<8 hex of sha1(resolved source, resolved mask or "auto")>``: stable across runs and cwd."""
        mask = "auto" if self.mask is None else self.mask.resolve()
        digest = hashlib.sha1(f"{self.source.resolve()}\0{mask}".encode()).hexdigest()[:8]
        stem = _STEM.sub("_", self.source.stem)[:40] or "img"
        return f"{stem}-{digest}"


def load_pairs(source: str | os.PathLike, masks: str | os.PathLike | None = None, *,
               auto_mask: bool = False) -> list[Pair]:
    """Unlabeled (image, mask) pairs from a RORem ``meta.json`` or a folder.

    Args:
        source: a ``.json`` file holding a list of ``{"source", "mask"[, "GT"]}`` (paths relative to the
            file; GT optional and kept only as a reference), or a folder of images.
        masks: with a folder, the folder of masks with the same stems (``a.jpg`` -> ``masks/a.png``), paired
            as every folder is (:func:`cleanplate.batch.items.pair_folder`).
        auto_mask: an image without a mask file (a folder without ``masks``, an image missing from ``masks``,
            an entry without "mask") is kept with ``mask`` None, for :func:`generate` to mask by the rule of
            :mod:`cleanplate.masks`; without it, that is an error.
    Returns:
        Pairs in file order (sorted by name for a folder).
    Raises:
        InputError ("bad_option"): missing file or folder, unreadable JSON, an entry without source (or,
            without ``auto_mask``, mask), a folder without ``masks`` or ``auto_mask``, an image without a mask
            (without ``auto_mask``), nothing found.
    """
    src = Path(source)
    if src.is_dir():
        if masks is None and not auto_mask:
            raise InputError("a folder of images needs --masks (a folder of same-named masks), or --auto-mask to "
                             "let the overlay detector make them", code=ErrorCode.BAD_OPTION)
        mdir = None if masks is None else Path(masks)
        if mdir is not None and not mdir.is_dir():
            raise InputError(f"--masks must be a folder: {mdir}", code=ErrorCode.BAD_OPTION)
        pairs = []
        for pair in pair_folder(src, mdir, recursive=False):  # the batch job's pairing rule, this folder only
            if pair.mask is None and not auto_mask:
                raise InputError(pair.missing_mask(mdir), code=ErrorCode.BAD_OPTION)
            pairs.append(Pair(pair.image, pair.mask))
    elif not src.exists():
        raise InputError(f"no such file or folder: {src}", code=ErrorCode.BAD_OPTION)
    else:
        if masks is not None:
            raise InputError("--masks goes with a folder of images; a meta.json names each mask",
                             code=ErrorCode.BAD_OPTION)
        try:
            entries = json.loads(src.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {src} as a RORem meta.json: {exc}", code=ErrorCode.BAD_OPTION) from exc
        if not isinstance(entries, list):
            raise InputError(f"{src}: a RORem meta.json is a JSON list", code=ErrorCode.BAD_OPTION)
        pairs = []
        for i, e in enumerate(entries):
            mask = e.get("mask") if isinstance(e, dict) else None
            if (not isinstance(e, dict) or not isinstance(e.get("source"), str)
                    or not (isinstance(mask, str) or (auto_mask and mask is None))):
                raise InputError(f"{src} entry {i}: needs \"source\" and \"mask\" paths"
                                 + ("" if auto_mask else " (or --auto-mask)"), code=ErrorCode.BAD_OPTION)
            gt = e.get("GT")
            pairs.append(Pair(src.parent / e["source"], None if mask is None else src.parent / mask,
                              src.parent / gt if isinstance(gt, str) else None))
    if not pairs:
        raise InputError(f"no (image, mask) pairs in {src}", code=ErrorCode.BAD_OPTION)
    return pairs


# ------------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """One line of ``candidates.jsonl`` (see CANDIDATE FIELDS in the module docstring)."""

    id: str
    source: str
    mask: str
    result: str
    seed: int
    round: int
    bundle: str
    gt: str | None = None
    pair_source: str | None = None
    pair_mask: str | None = None
    bundle_path: str | None = None
    score: float | None = None
    threshold: float | None = None
    dilate_px: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    time: str | None = None
    mask_source: str | None = None
    detections: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data

    def as_record(self) -> dict[str, Any]:
        """The fields the label store keeps."""
        return {"id": self.id, "source": self.source, "mask": self.mask, "result": self.result, "gt": self.gt,
                "seed": self.seed, "bundle": self.bundle, "round": self.round}


def read_candidates(directory: str | os.PathLike) -> list[Candidate]:
    """The candidates of ``DIR/candidates.jsonl`` in file order ([] when there is none). A line that does not
    parse (a truncated last line after a kill) is skipped; a repeated id keeps its first line."""
    path = Path(directory) / CANDIDATES_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out: dict[str, Candidate] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            cand = Candidate.from_json(json.loads(line))
        except (json.JSONDecodeError, TypeError) as exc:
            log.warning("%s:%d: skipping a line that does not parse (%s)", path, n, exc)
            continue
        out.setdefault(cand.id, cand)
    return list(out.values())


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync; first cut a partial last line (a killed writer) so lines stay whole."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size:
            f.seek(max(0, size - 65536))
            tail = f.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut < 0 and size > len(tail):  # a partial line longer than the tail: look at everything
                    f.seek(0)
                    tail = f.read()
                    cut = tail.rfind(b"\n")
                f.truncate(size - len(tail) + cut + 1)
        f.seek(0, os.SEEK_END)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _rgb_image(rgb: np.ndarray) -> imaging.DecodedImage:
    return imaging.DecodedImage(rgb, None, "RGB", "PNG", None, None)


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class GenerateResult:
    """What :func:`generate` did: candidate counts, the photos whose mask the detector made (``auto_masked``)
    and those of them it found nothing on (``nothing_found``, skipped: no candidate), and the per-pair errors
    (``(pair source, message)``)."""

    generated: int = 0
    already: int = 0
    failed: int = 0
    auto_masked: int = 0
    nothing_found: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    candidates_file: Path | None = None

    def line(self) -> str:
        auto = (f"; auto masks on {self.auto_masked} photos, {self.nothing_found} skipped (nothing detected)"
                if self.auto_masked else "")
        return (f"generated {self.generated}, already there {self.already}, failed {self.failed}{auto} -> "
                f"{self.candidates_file}")


def generate(pairs: Sequence[Pair], out_dir: str | os.PathLike, *, bundle: str | os.PathLike | None = None,
             pipe: Any = None, detector: Any = None, per_pair: int = 1, seed: int = 0, round: int = 1,
             dilate_px: int | None = None, steps: int | None = None, batch_size: int = 4, score: bool = True,
             device: str = "cpu", progress: Callable[[int, int], None] | None = None) -> GenerateResult:
    """Run the remover over ``pairs`` and store each result as a candidate under ``out_dir`` (resumable).

    Args:
        pairs: from :func:`load_pairs`; images of any mode (stored and judged as 8-bit RGB), masks white =
            remove, same size as their image. A pair without a mask gets one by the rule of
            :mod:`cleanplate.masks` (the image's transparent pixels, else the detector's mask); when the
            detector finds nothing the photo is skipped (``nothing_found``), its candidates not made.
        out_dir: the flywheel directory (created).
        bundle / pipe: the bundle directory (None: the default bundle), or an already loaded
            :class:`cleanplate.pipeline.RemovalPipeline`.
        detector: the :class:`cleanplate.detector.Detector` for pairs without a mask (None: the bundle's,
            float32 on the pipeline's device, as the torch engine runs it).
        per_pair: candidates per pair (>= 1), seeds ``seed .. seed + per_pair - 1``.
        round: flywheel round (>= 1) recorded with each candidate and part of its id, so a new round of the
            same pairs makes new candidates and a rerun of a round makes none twice.
        dilate_px, steps: removal options (None: the bundle's).
        batch_size: removals per model call.
        score: store the bundle's discriminator score (when it has a discriminator).
        progress: called with (done, total) after each batch.
    Returns:
        :class:`GenerateResult`. A pair that cannot be used (unreadable, size mismatch, empty or full mask)
        is counted in ``failed`` with its message and the others go on.
    Raises:
        InputError: "bad_option" for per_pair/round/batch_size/seed out of range, "busy" when another
            generate holds the directory, "no_detector" when a pair needs the detector and the bundle has none.
    """
    from cleanplate.bundle import load_bundle, read_config
    from cleanplate.masks import MaskSource, bundle_detector, resolve_mask_with
    from cleanplate.pipeline import RemovalPipeline
    from cleanplate.remover import RemovalRequest, ScoreRequest, remove_batch, score_batch

    for name, value, low in (("per_pair", per_pair, 1), ("round", round, 1), ("batch_size", batch_size, 1),
                             ("seed", seed, 0)):
        if int(value) != value or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value}", code=ErrorCode.BAD_OPTION)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = GenerateResult(candidates_file=out / CANDIDATES_FILE)
    with exclusive(out, LOCK_FILE, f"another `flywheel generate` is writing to {out}"):
        done = {c.id for c in read_candidates(out)}
        todo: list[tuple[str, Pair, int]] = []
        for pair in pairs:
            for s in range(seed, seed + per_pair):
                cid = f"r{round}-{pair.key()}-s{s}"
                if cid in done:
                    result.already += 1
                else:
                    todo.append((cid, pair, s))
        if not todo:
            return result
        if pipe is None:
            loaded_bundle = load_bundle(bundle)
            pipe = RemovalPipeline.from_bundle(loaded_bundle, device=device)
            if detector is None and loaded_bundle.detector is not None:
                detector = loaded_bundle.detector.to(pipe.device)  # float32 whatever the dtype, as the engine
        elif detector is None and any(pair.mask is None for _, pair, _ in todo) and read_config(
                pipe_bundle_path(pipe, bundle)).detector:  # a pipeline given without its detector: the bundle's
            detector = bundle_detector(pipe_bundle_path(pipe, bundle))
        bundle_path = str(pipe_bundle_path(pipe, bundle))
        do_score = score and pipe.discriminator is not None
        loaded: dict[Pair, tuple[imaging.DecodedImage, np.ndarray, Any] | str | None] = {}
        skipped: set[Pair] = set()
        skipped_candidates = 0

        def load(pair: Pair) -> tuple[imaging.DecodedImage, np.ndarray, Any] | str | None:
            """(RGB image, mask, the rule's ResolvedMask), an error message, or None: nothing detected."""
            if pair not in loaded:
                try:
                    decoded = imaging.decode_image(pair.source)
                    given = None if pair.mask is None else imaging.decode_mask(pair.mask)
                    used = resolve_mask_with(detector, decoded, given, auto=True,  # cleanplate.masks' rule
                                             what=f"the bundle {bundle_path}")
                    result.auto_masked += used.source is MaskSource.auto
                    got: tuple[imaging.DecodedImage, np.ndarray, Any] | None = None
                    if used.nothing_found:
                        result.nothing_found += 1
                    else:
                        img = _rgb_image(np.ascontiguousarray(decoded.rgb))
                        imaging.validate_mask(used.mask, img.size)
                        got = (img, used.mask, used)
                    loaded.clear()  # keep one pair's pixels at a time (per_pair candidates share them)
                    loaded[pair] = got
                except CleanplateError as exc:
                    if exc.code is ErrorCode.NO_DETECTOR:
                        raise  # every photo without a mask would fail the same way
                    return f"{exc}"
            return loaded[pair]

        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            ready: list[tuple[str, Pair, int, imaging.DecodedImage, np.ndarray, Any]] = []
            for cid, pair, s in chunk:
                got = load(pair) if pair not in skipped else None
                if isinstance(got, str):
                    result.failed += 1
                    result.errors.append((str(pair.source), got))
                    continue
                if got is None:  # the detector found nothing on this photo: no candidate
                    skipped.add(pair)
                    skipped_candidates += 1
                    continue
                ready.append((cid, pair, s, *got))
            outputs: list[tuple[Any, float | None]] = []
            for group in _runnable(pipe, ready, dilate_px, steps, result):
                reqs = [RemovalRequest(img, mask, dilate_px, s, steps) for _, _, s, img, mask, _ in group]
                removed = remove_batch(pipe, reqs, max_batch=batch_size)
                scores: list[float | None] = [None] * len(group)
                if do_score:
                    scores = score_batch(pipe, [ScoreRequest(img, _rgb_image(r.pixels), mask, dilate_px)
                                                for (_, _, _, img, mask, _), r in zip(group, removed, strict=True)])
                outputs.extend(zip(group, zip(removed, scores, strict=True), strict=True))
            for (cid, pair, s, img, mask, used), (removed, sc) in outputs:
                folder = out / CANDIDATES_DIR / cid
                imaging.write_atomic(folder / "source.png", _png(img.rgb))
                imaging.write_atomic(folder / "mask.png", _png(mask.astype(np.uint8) * 255))
                imaging.write_atomic(folder / "result.png", _png(np.ascontiguousarray(removed.pixels)))
                rel = f"{CANDIDATES_DIR}/{cid}"
                cand = Candidate(
                    id=cid, source=f"{rel}/source.png", mask=f"{rel}/mask.png", result=f"{rel}/result.png",
                    seed=s, round=round, bundle=pipe.config.name, bundle_path=bundle_path,
                    gt=_rel(pair.gt, out) if pair.gt is not None else None,
                    pair_source=str(pair.source.resolve()),
                    pair_mask=None if pair.mask is None else str(pair.mask.resolve()),
                    score=None if sc is None else round_(sc), threshold=pipe.threshold if do_score else None,
                    dilate_px=pipe.config.dilate_px if dilate_px is None else dilate_px,
                    steps=pipe.config.steps if steps is None else steps, width=img.width, height=img.height,
                    time=utc_now(), mask_source=used.source.value,
                    detections=None if used.detections is None else len(used.detections))
                _append_line(out / CANDIDATES_FILE, cand.to_json())
                result.generated += 1
            if progress:
                progress(result.generated + result.failed + skipped_candidates, len(todo))
    return result


def _runnable(pipe: Any, ready: list, dilate_px: int | None, steps: int | None,
              result: GenerateResult) -> Iterator[list]:
    """The batch as one group if every item is valid, else each valid item alone (bad ones counted)."""
    from cleanplate.remover import RemovalRequest, prepare

    good = []
    for entry in ready:
        _, pair, s, img, mask, _ = entry
        try:
            prepare(RemovalRequest(img, mask, dilate_px, s, steps), pipe.resolution, pipe.config.dilate_px)
            good.append(entry)
        except CleanplateError as exc:
            result.failed += 1
            result.errors.append((str(pair.source), str(exc)))
    if good:
        yield good


def round_(x: float) -> float:
    return float(f"{x:.6g}")


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def pipe_bundle_path(pipe: Any, bundle: str | os.PathLike | None) -> Path:
    from cleanplate.bundle import default_bundle_path

    return Path(bundle).resolve() if bundle is not None else default_bundle_path()


# ------------------------------------------------------------------------------------- agreement
def agreement(accepted: Sequence[bool], human_yes: Sequence[bool]) -> dict[str, Any]:
    """How the discriminator's accept/reject agrees with human yes/no on the same items.

    Args:
        accepted: discriminator accepts (score >= threshold), one per item.
        human_yes: the human decision (True = yes, a good removal), same items.
    Returns:
        {"n", "tp", "fp", "fn", "tn", "precision", "recall", "accuracy", "kappa"}: precision = tp / (tp + fp)
        (share of accepts that people call good; None without accepts), recall = tp / (tp + fn) (share of the
        good ones accepted; None without a yes), accuracy, and Cohen's kappa
        (p_o - p_e) / (1 - p_e) with p_e from the two raters' marginal rates (None when p_e = 1, i.e. both
        raters gave one answer only; kappa is then undefined). All None for n = 0.
    """
    a = np.asarray(accepted, bool)
    h = np.asarray(human_yes, bool)
    if a.shape != h.shape:
        raise ValueError(f"accepted and human_yes differ in length: {a.shape} vs {h.shape}")
    n = int(a.size)
    tp, fp = int((a & h).sum()), int((a & ~h).sum())
    fn, tn = int((~a & h).sum()), int((~a & ~h).sum())
    out: dict[str, Any] = {"n": n, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": None, "recall": None,
                           "accuracy": None, "kappa": None}
    if n == 0:
        return out
    out["precision"] = tp / (tp + fp) if tp + fp else None
    out["recall"] = tp / (tp + fn) if tp + fn else None
    p_o = (tp + tn) / n
    p_e = ((tp + fp) / n) * ((tp + fn) / n) + ((fn + tn) / n) * ((fp + tn) / n)
    out["accuracy"] = p_o
    out["kappa"] = (p_o - p_e) / (1 - p_e) if p_e < 1 - 1e-12 else None
    return out


# ------------------------------------------------------------------------------------- autolabel
def bundle_threshold(bundle: str | os.PathLike | None) -> tuple[float | None, str]:
    """The gate threshold a bundle's discriminator was calibrated to, else RORem's 0.9.

    Returns (threshold, source) with source "calibrated" or "rorem_default"; (None, "none") without a
    discriminator."""
    from cleanplate.bundle import DISCRIMINATOR_DIR, default_bundle_path, read_config

    root = Path(bundle) if bundle is not None else default_bundle_path()
    if not read_config(root).discriminator:
        return None, "none"
    try:
        cfg = json.loads((root / DISCRIMINATOR_DIR / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ROREM_THRESHOLD, "rorem_default"
    cal = cfg.get("calibration") or {}
    if "threshold" in cal and cfg.get("threshold") is not None:
        return float(cfg["threshold"]), "calibrated"
    return ROREM_THRESHOLD, "rorem_default"


Scorer = Callable[[Sequence[Candidate]], list[float]]


def discriminator_scorer(pipe: Any, directory: Path, batch_size: int = 8) -> Scorer:
    """Scores in [0,1] of candidates by ``pipe``'s discriminator, as the serving gate scores a removal."""
    from cleanplate.remover import ScoreRequest, score_batch

    def run(cands: Sequence[Candidate]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(cands), batch_size):
            reqs = []
            for c in cands[start:start + batch_size]:
                reqs.append(ScoreRequest(imaging.decode_image(directory / c.source),
                                         imaging.decode_image(directory / c.result),
                                         imaging.decode_mask(directory / c.mask), c.dilate_px))
            scores.extend(score_batch(pipe, reqs, max_batch=batch_size))
        return scores

    return run


def autolabel(directory: str | os.PathLike, *, bundle: str | os.PathLike | None = None, round: int | None = None,
              threshold: float | None = None, train_meta: str | os.PathLike | None = None,
              policy: str = "majority", min_votes: int = 1, use_human_labels: bool = True,
              scorer: Scorer | None = None, write: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Let the discriminator label a round's candidates and add the accepted ones to the training set.

    RORem (sec. 3.2): results the discriminator scores at or above the threshold (0.9 there) join the
    remover's training data without a person looking. Here each candidate of ``round`` is scored by
    ``bundle``'s discriminator; with ``use_human_labels`` a human decision (the label store's export
    ``policy``) overrides it: a human yes joins, a human no stays out.

    Args:
        directory: the flywheel directory (``generate``'s output).
        bundle: bundle whose discriminator judges (None: the default bundle).
        round: the candidates' round (None: the newest round in ``candidates.jsonl``).
        threshold: accept when score >= this; None: the bundle's calibrated threshold, else 0.9.
        train_meta: the training ``meta.json`` to add to (default ``DIR/train_meta.json``); created if
            missing. Entries of this round are replaced (a rerun does not duplicate), other rounds kept.
            Entries: {"source", "mask", "GT" (the candidate), "score": 1, "label_kind": "remover",
            "labeled_by": "discriminator" | "human", "disc_score", "item", "round"}; paths relative to it.
        policy, min_votes: how human labels become decisions (:meth:`LabelStore.decisions`).
        scorer: scores for a list of candidates (default: the bundle's discriminator); for tests.
        write: False computes the report without touching ``train_meta`` or the report file.
    Returns:
        The round's report: candidates, scored, threshold (+ its source), disc_accepted (score >= threshold,
        all candidates), human decisions, added (by_discriminator / by_human / total), already_in_train
        (accepted in another round), the agreement on the overlap (:func:`agreement`), score quantiles,
        train_meta and its total size. Also stored under ``rounds[str(round)]`` of
        ``DIR/autolabel_report.json``.
    Raises:
        InputError: no candidates (in that round), a bundle without a discriminator, bad threshold.
    """
    from .label_store import LabelStore

    out = Path(directory)
    cands = read_candidates(out)
    if not cands:
        raise InputError(f"no candidates in {out / CANDIDATES_FILE}; run `cleanplate flywheel generate` first",
                         code=ErrorCode.BAD_OPTION)
    if round is None:
        round = max(c.round for c in cands)
    cands = [c for c in cands if c.round == round]
    if not cands:
        raise InputError(f"no candidates of round {round} in {out / CANDIDATES_FILE}", code=ErrorCode.BAD_OPTION)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold}", code=ErrorCode.BAD_OPTION)
    source = "option"
    if scorer is None:
        from cleanplate.pipeline import RemovalPipeline

        default_t, source_t = bundle_threshold(bundle)
        if default_t is None:
            raise InputError("this bundle has no discriminator, so it cannot autolabel",
                             code=ErrorCode.NO_DISCRIMINATOR)
        if threshold is None:
            threshold, source = default_t, source_t
        scorer = discriminator_scorer(RemovalPipeline.from_bundle(bundle, device=device), out)
    elif threshold is None:
        threshold, source = ROREM_THRESHOLD, "rorem_default"
    scores = [float(s) for s in scorer(cands)]
    accepted = [s >= threshold for s in scores]

    store = LabelStore(out)
    store.sync()
    decisions, _ = store.decisions(policy, min_votes=min_votes, rounds=[round])  # type: ignore[arg-type]
    human = {d.item.id: bool(d.score) for d in decisions}
    overlap = [(acc, human[c.id]) for c, acc in zip(cands, accepted, strict=True) if c.id in human]
    agree = agreement([a for a, _ in overlap], [h for _, h in overlap])

    meta_path = Path(train_meta) if train_meta is not None else out / TRAIN_META
    existing: list[dict[str, Any]] = []
    if meta_path.exists():
        try:
            existing = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {meta_path}: {exc}", code=ErrorCode.BAD_OPTION) from exc
        if not isinstance(existing, list):
            raise InputError(f"{meta_path}: a RORem meta.json is a JSON list", code=ErrorCode.BAD_OPTION)
    kept = [e for e in existing if e.get("round") != round]
    elsewhere = {e.get("item") for e in kept}
    base = meta_path.parent.resolve()
    added: list[dict[str, Any]] = []
    by_disc = by_human = already = 0
    for c, s, acc in zip(cands, scores, accepted, strict=True):
        decided = human.get(c.id) if use_human_labels else None
        take = acc if decided is None else decided
        if not take:
            continue
        if c.id in elsewhere:
            already += 1
            continue
        who = "discriminator" if decided is None else "human"
        by_disc += who == "discriminator"
        by_human += who == "human"
        added.append({"source": _rel(out / c.source, base), "mask": _rel(out / c.mask, base),
                      "GT": _rel(out / c.result, base), "score": 1, "label_kind": "remover", "labeled_by": who,
                      "disc_score": round_(s), "item": c.id, "round": round})
    report = {
        "round": round,
        "bundle": str(Path(bundle).resolve()) if bundle is not None else "default",
        "threshold": threshold,
        "threshold_source": source,
        "candidates": len(cands),
        "scored": len(scores),
        "disc_accepted": int(sum(accepted)),
        "disc_accept_rate": sum(accepted) / len(cands),
        "human_decisions": {"n": len(human), "yes": sum(human.values()), "no": len(human) - sum(human.values()),
                            "policy": policy, "min_votes": min_votes},
        "use_human_labels": use_human_labels,
        "added": {"total": len(added), "by_discriminator": by_disc, "by_human": by_human},
        "already_in_train": already,
        "agreement_on_overlap": agree,
        "score_quantiles": {q: round_(float(np.quantile(scores, float(q)))) for q in ("0.1", "0.5", "0.9")},
        "train_meta": str(meta_path),
        "train_meta_total": len(kept) + len(added),
        "time": utc_now(),
    }
    if write:
        imaging.write_atomic(meta_path, (json.dumps(kept + added, indent=1) + "\n").encode())
        report_path = out / AUTOLABEL_REPORT
        try:
            all_reports = json.loads(report_path.read_text())
        except (OSError, json.JSONDecodeError):
            all_reports = {}
        all_reports.setdefault("rounds", {})[str(round)] = report
        all_reports["rounds"] = dict(sorted(all_reports["rounds"].items(), key=lambda kv: int(kv[0])))
        imaging.write_atomic(report_path, (json.dumps(all_reports, indent=2) + "\n").encode())
    return report
