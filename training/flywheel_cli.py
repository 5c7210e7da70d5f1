"""``cleanplate flywheel ...`` and ``cleanplate label ...`` (registered in :mod:`cleanplate.cli`).

RORem's data flywheel (:mod:`cleanplate.training.flywheel`): generate candidates with the current bundle,
label them on a local web page, train the discriminator on the export, autolabel the next round.
Bad input exits 2 with one line ``error: ...``.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cleanplate.cli_options import say

flywheel_app = typer.Typer(help="RORem's data flywheel: generate candidates with the current bundle, autolabel "
                                "them with its discriminator.", no_args_is_help=True)
label_app = typer.Typer(help="Human labels of flywheel candidates: a local labeling page and the export to "
                             "meta.json.", no_args_is_help=True)


class Policy(str, Enum):
    majority = "majority"
    latest = "latest"


DirArg = Annotated[Path, typer.Argument(help="flywheel directory (`flywheel generate -o`)")]
RoundOpt = Annotated[Optional[list[int]], typer.Option("--round", help="only items of this round (repeatable)")]
PolicyOpt = Annotated[Policy, typer.Option(help="majority: more yes than no votes (ties left out); latest: the "
                                                "newest vote. Each labeler's latest label counts, skip abstains")]
MinVotesOpt = Annotated[int, typer.Option(help="yes/no votes an item needs to be exported")]


@flywheel_app.command("generate")
def generate_cmd(
    pairs: Annotated[Path, typer.Argument(help="unlabeled pairs: a RORem meta.json (source, mask[, GT]) or a folder "
                                               "of images (with --masks, or --auto-mask for plain photos)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="flywheel directory (candidates/, candidates.jsonl)")],
    masks: Annotated[Optional[Path], typer.Option(help="with a folder: folder of same-named masks")] = None,
    auto_mask: Annotated[bool, typer.Option("--auto-mask", help="photos without a mask file (a folder without "
                                                                "--masks, one missing from --masks, a meta.json "
                                                                "entry without \"mask\") get the mask `remove "
                                                                "--auto-mask` would use: transparent pixels, else "
                                                                "the bundle's overlay detector; a photo where it "
                                                                "finds nothing is skipped and counted")] = False,
    bundle: Annotated[Optional[Path], typer.Option(help="bundle directory (default: the bundled model)")] = None,
    round: Annotated[int, typer.Option("--round", help="flywheel round recorded with (and part of the id of) "
                                                       "each candidate")] = 1,
    per_pair: Annotated[int, typer.Option(help="candidates per pair (seeds SEED, SEED+1, ...)")] = 1,
    seed: Annotated[int, typer.Option(help="first noise seed")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="LCM steps (default: the bundle's)")] = None,
    dilate_px: Annotated[Optional[int], typer.Option(help="mask dilation in px (default: the bundle's)")] = None,
    batch_size: Annotated[int, typer.Option(help="removals per model call")] = 4,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N pairs")] = None,
    score: Annotated[bool, typer.Option("--score/--no-score", help="store the bundle's discriminator score")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
) -> None:
    """Run the bundle over unlabeled (image, mask) pairs and store each result as a candidate. Resumable:
    a rerun makes only the candidates that are missing. Exit 1 when some pairs could not be used. A plain
    folder of photos needs --auto-mask: detection is opt-in here as in `remove` and `batch run`, so a
    forgotten --masks is an error rather than a run on masks nobody drew. The mask rule is `remove`'s (mask
    file, else transparent pixels, else the detector); skipped photos (nothing detected) are not failures."""
    from cleanplate.errors import ErrorCode, InputError

    from .flywheel import generate, load_pairs

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}", code=ErrorCode.BAD_OPTION)
    items = load_pairs(pairs, masks, auto_mask=auto_mask)[:limit]
    result = generate(items, out, bundle=bundle, per_pair=per_pair, seed=seed, round=round, dilate_px=dilate_px,
                      steps=steps, batch_size=batch_size, score=score, device=device,
                      progress=lambda done, total: say(f"{done}/{total}"))
    for source, message in result.errors:
        say(f"error: {source}: {message}")
    say(result.line())
    if result.failed:
        raise typer.Exit(1)


@flywheel_app.command("autolabel")
def autolabel_cmd(
    directory: DirArg,
    bundle: Annotated[Optional[Path], typer.Option(help="bundle whose discriminator judges (default: the bundled "
                                                        "model)")] = None,
    round: Annotated[Optional[int], typer.Option("--round", help="candidates of this round (default: the newest)")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="accept when score >= this (default: the bundle's "
                                                            "calibrated threshold, else RORem's 0.9)")] = None,
    train_meta: Annotated[Optional[Path], typer.Option(help="training meta.json to add to (default "
                                                            "DIR/train_meta.json)")] = None,
    policy: PolicyOpt = Policy.majority,
    min_votes: MinVotesOpt = 1,
    use_human_labels: Annotated[bool, typer.Option("--use-human-labels/--no-use-human-labels",
                                                   help="a human yes/no overrides the discriminator")] = True,
    report: Annotated[Optional[Path], typer.Option(help="also write this round's report here (JSON)")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
) -> None:
    """Score a round's candidates with the discriminator; those at or above the threshold join the training
    meta.json. Prints the round's report (counts, agreement with human labels on the overlap) as JSON."""
    from cleanplate import imaging

    from .flywheel import autolabel

    result = autolabel(directory, bundle=bundle, round=round, threshold=threshold, train_meta=train_meta,
                       policy=policy.value, min_votes=min_votes, use_human_labels=use_human_labels, device=device)
    text = json.dumps(result, indent=2)
    if report is not None:
        imaging.write_atomic(report, (text + "\n").encode())
    typer.echo(text)
    a, agree = result["added"], result["agreement_on_overlap"]
    kappa = "n/a" if agree["kappa"] is None else f"{agree['kappa']:.2f}"
    acc = "n/a" if agree["accuracy"] is None else f"{agree['accuracy']:.2f}"
    say(f"round {result['round']}: {result['candidates']} candidates, {result['disc_accepted']} accepted at "
         f"threshold {result['threshold']:.3f} ({result['threshold_source']}); added {a['total']} "
         f"({a['by_discriminator']} by the discriminator, {a['by_human']} by people) -> {result['train_meta']} "
         f"({result['train_meta_total']} in all); agreement with people on {agree['n']} items: accuracy {acc}, "
         f"kappa {kappa}")


@label_app.command("serve")
def label_serve(
    directory: DirArg,
    labeler: Annotated[Optional[str], typer.Option(help="your name (the page can also take ?labeler=NAME)")] = None,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8090,
    round: RoundOpt = None,
    policy: PolicyOpt = Policy.majority,
    export_path: Annotated[Optional[Path], typer.Option(help="where the page's Export writes (default "
                                                             "DIR/labels_meta.json)")] = None,
) -> None:
    """Serve the labeling page: source, mask and result side by side; Y yes, N no, S skip, U undo, E export."""
    from .label_server import serve

    serve(directory, host=host, port=port, labeler=labeler, rounds=round, policy=policy.value,
          export_path=export_path, announce=lambda url: say(f"labeling page: {url}"))


@label_app.command("export")
def label_export(
    directory: DirArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="meta.json to write (paths relative to it)")],
    policy: PolicyOpt = Policy.majority,
    min_votes: MinVotesOpt = 1,
    round: RoundOpt = None,
    labeler: Annotated[Optional[list[str]], typer.Option(help="only these labelers' votes (repeatable)")] = None,
) -> None:
    """Export the labels as a RORem discriminator meta.json (GT = the candidate, score 1 yes / 0 no), ready for
    `cleanplate train discriminator`."""
    from .label_store import LabelStore

    counts = LabelStore(directory).export(output, policy.value, min_votes=min_votes, rounds=round,  # type: ignore[arg-type]
                                          labelers=labeler)
    say(f"wrote {output}: {counts['decided']} items (yes {counts['yes']}, no {counts['no']}); left out: "
         f"{counts['unlabeled']} unlabeled, {counts['ties']} ties, {counts['too_few_votes']} with too few votes")
