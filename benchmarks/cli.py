"""``cleanplate bench ...`` (registered in :mod:`cleanplate.cli`): latency, load, memory, quality, the reference
comparison, the SFT ablation, the quality gate, batch throughput and a flywheel round. Each writes
``OUT.json`` (machines), ``OUT.md`` (people) and PNG plots, and prints the markdown.

List options take several values after one flag, as ``--resolution 256 512 --batch 1 2 4`` (or repeated
flags). Bad input exits 2 with one line ``error: ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from cleanplate.cli_options import say
from cleanplate.engines import ENGINE_NAMES
from cleanplate.errors import ErrorCode, InputError

from .batch_throughput import MODES as BATCH_MODES

bench_app = typer.Typer(help="Benchmarks: per-stage latency, HTTP load, memory, removal quality, a reference "
                             "comparison with diffusers' SDXL inpainting pipeline, the quality gate, batch "
                             "throughput and a data-flywheel round. Results: JSON, markdown and PNG plots.",
                        no_args_is_help=True)

# Options that take several values after one flag, and which tokens belong to them.
_MULTI: dict[str, Callable[[str], bool]] = {
    "--resolution": str.isdigit, "--batch": str.isdigit, "--concurrency": str.isdigit,
    "--engine": lambda t: t in ENGINE_NAMES, "--mode": lambda t: t in BATCH_MODES, "--ray-workers": str.isdigit,
}


def expand_multi(args: Sequence[str], multi: dict[str, Callable[[str], bool]] = _MULTI) -> list[str]:
    """``--resolution 256 512`` -> ``--resolution 256 --resolution 512`` for the options in ``multi``; a token
    joins the list only while it fits the option (digits, or an engine name), so a following positional
    argument is left alone."""
    out: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        out.append(tok)
        i += 1
        if tok in multi and i < len(args):
            out.append(args[i])  # the first value, whatever it is (click validates it)
            i += 1
            while i < len(args) and multi[tok](args[i]):
                out += [tok, args[i]]
                i += 1
    return out


class MultiValueCommand(TyperCommand):
    """A typer command whose list options accept ``--flag v1 v2 ...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi(args))


Engine = Enum("Engine", {name: name for name in ENGINE_NAMES}, type=str)  # cleanplate.engines names them
BatchMode = Enum("BatchMode", {name: name for name in BATCH_MODES}, type=str)  # benchmarks.batch_throughput's


class LatencyArch(str, Enum):
    bundle = "bundle"
    sdxl = "sdxl"


class Arch(str, Enum):
    bundle = "bundle"
    tiny = "tiny"
    sdxl = "sdxl"


def _finish(report: dict[str, Any], out: Path, module: Any) -> None:
    """Write OUT.json, OUT.md and the module's plots; print the markdown."""
    from .common import command_line, plots, write_report

    command = command_line()
    report["command"] = command
    markdown = module.to_markdown(report, command)
    paths = write_report(out, report, markdown) + plots(module, report, out)
    typer.echo(markdown)
    say("wrote " + ", ".join(str(p) for p in paths))


def _device_tag(device: str) -> str:
    return "" if device in ("cpu", "auto") else "_" + device.split(":")[0]


BundleOpt = Annotated[Optional[Path], typer.Option(help="bundle directory (default: the bundled model)")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="torch intra-op threads (default: torch's)")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="output path without suffix (default: "
                                                                       "benchmarks/results/<name>)")]


@bench_app.command("latency", cls=MultiValueCommand)
def latency_cmd(
    engine: Annotated[Optional[list[Engine]], typer.Option(help="what runs the model (default: torch); several "
                                                                "engines run back to back and are compared")] = None,
    bundle: BundleOpt = None,
    arch: Annotated[LatencyArch, typer.Option(help="torch engine: the bundle, or a random-weight full-size "
                                                   "SDXL-inpainting architecture (CUDA only)")] = LatencyArch.bundle,
    resolution: Annotated[Optional[list[int]], typer.Option(help="model input side(s) in px (default: the "
                                                                 "bundle's)")] = None,
    batch: Annotated[Optional[list[int]], typer.Option(help="images per call (default: 1)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="LCM steps (default: the bundle's)")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="side of the request photo in px (default: the "
                                                           "resolution)")] = None,
    warmup: Annotated[int, typer.Option(help="unmeasured repetitions per case")] = 3,
    repeats: Annotated[int, typer.Option(help="measured repetitions per case")] = 20,
    device: Annotated[str, typer.Option(help="torch engine: cpu, cuda, cuda:N or auto")] = "cpu",
    dtype: Annotated[str, typer.Option(help="torch engine: fp32, fp16 (CUDA) or bf16")] = "fp32",
    gate: Annotated[Optional[bool], typer.Option("--gate/--no-gate", help="time the quality gate (default: when "
                                                                          "the model has a discriminator)")] = None,
    triton_url: Annotated[Optional[str], typer.Option(help="triton engine: a running Triton (host:port); default: "
                                                           "start a local one")] = None,
    triton_protocol: Annotated[str, typer.Option(help="triton engine: grpc or http")] = "grpc",
    threads: ThreadsOpt = None,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    onnx_dir: Annotated[Optional[Path], typer.Option(help="onnxruntime engine: an ONNX export of the bundle "
                                                          "(default: export it now)")] = None,
    detect: Annotated[bool, typer.Option("--detect/--no-detect", help="also time the overlay detector on the "
                                                                      "request photo (the auto mask's stage), when "
                                                                      "there is one")] = True,
    out: OutOpt = None,
) -> None:
    """Per-stage latency (decode, crop, VAE encode, each UNet step, VAE decode, composite, gate) per resolution
    and batch: median, p95, p99, with warm-up, device sync and the environment recorded; the overlay detector's
    cost on the same photo (the auto mask's stage) next to it, with its ratio to one removal. Several --engine:
    each runs with the same options, back to back, and one report compares their ms per image."""
    from . import latency, latency_compare

    engines = [e.value for e in engine] if engine else ["torch"]
    if triton_protocol not in ("grpc", "http"):
        raise InputError(f"--triton-protocol must be grpc or http, got {triton_protocol!r}", code=ErrorCode.BAD_OPTION)
    if len(engines) > 1:  # refuse what one engine would refuse before any other one runs
        if len(set(engines)) != len(engines):
            raise InputError(f"--engine: give each engine once, got {engines}", code=ErrorCode.BAD_OPTION)
        if arch is not LatencyArch.bundle:
            raise InputError("--arch applies to the torch engine only", code=ErrorCode.BAD_OPTION)
        if "torch" in engines:
            from cleanplate.pipeline import resolve_device, resolve_dtype

            resolve_dtype(dtype, resolve_device(device))
    reports = [latency.run_latency(name, bundle=bundle, arch=arch.value, resolutions=resolution,
                                   batches=batch or [1], steps=steps, image_size=image_size, warmup=warmup,
                                   repeats=repeats, device=device, dtype=dtype, gate=gate, triton_url=triton_url,
                                   triton_protocol=triton_protocol, threads=threads, seed=seed, onnx_dir=onnx_dir,
                                   detect=detect, say=say) for name in engines]
    default = "latency_" + "_vs_".join(engines) + ("_sdxl" if arch is LatencyArch.sdxl else "") + _device_tag(device)
    if len(reports) == 1:
        _finish(reports[0], out or Path("benchmarks/results") / default, latency)
        return
    from .common import command_line

    for r in reports:
        r["command"] = command_line()
    _finish(latency_compare.compare(reports), out or Path("benchmarks/results") / default, latency_compare)


@bench_app.command("load", cls=MultiValueCommand)
def load_cmd(
    url: Annotated[Optional[str], typer.Option(help="gateway base URL (default: start a local `cleanplate serve`)")] = None,
    concurrency: Annotated[Optional[list[int]], typer.Option(help="concurrent clients per level (default: 1 2 4)")] = None,
    duration: Annotated[float, typer.Option(help="seconds per level")] = 20.0,
    image: Annotated[Optional[Path], typer.Option(help="request photo (default: a built-in 600x400 JPEG)")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="request mask (with --image)")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="CLEANPLATE_API_KEY", help="Bearer key")] = None,
    bundle: BundleOpt = None,
    engine: Annotated[Engine, typer.Option(help="local gateway only: its engine")] = Engine.torch,
    max_batch: Annotated[int, typer.Option(min=1, help="local gateway only: micro-batch bound")] = 1,
    max_queue: Annotated[int, typer.Option(min=1, help="local gateway only: queue bound before 429")] = 64,
    threads: Annotated[int, typer.Option(min=1, help="local gateway only: torch threads")] = 1,
    warmup_requests: Annotated[int, typer.Option(help="requests sent (and not counted) before the first level")] = 2,
    timeout: Annotated[float, typer.Option(help="client timeout per request, s")] = 300.0,
    out: OutOpt = None,
) -> None:
    """HTTP load on POST /v1/remove: throughput and p50/p95/p99 per concurrency level, answers by status."""
    from . import load

    image_bytes = mask_bytes = None
    if image is not None or mask is not None:
        if image is None or mask is None:
            raise InputError("give both --image and --mask, or neither", code=ErrorCode.BAD_OPTION)
        try:
            image_bytes, mask_bytes = image.read_bytes(), mask.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the request files: {exc}", code=ErrorCode.BAD_OPTION) from exc
    report = load.run_load_levels(url, concurrency=concurrency or [1, 2, 4], duration_s=duration, image=image_bytes,
                                  mask=mask_bytes, api_key=api_key, bundle=str(bundle) if bundle else None,
                                  engine=engine.value, max_batch=max_batch, max_queue=max_queue, threads=threads,
                                  warmup_requests=warmup_requests, timeout_s=timeout, say=say)
    _finish(report, out or Path("benchmarks/results/load"), load)


@bench_app.command("memory")
def memory_cmd(
    megapixels: Annotated[float, typer.Option(help="size of the big photo")] = 40.0,
    burst: Annotated[int, typer.Option(min=1, help="big uploads sent at once")] = 16,
    soak_clients: Annotated[int, typer.Option(min=1, help="clients of ordinary traffic after the burst")] = 8,
    soak_minutes: Annotated[float, typer.Option(help="length of the soak")] = 30.0,
    soak_from: Annotated[float, typer.Option(help="minute of the soak that RSS growth is measured from")] = 5.0,
    batch_items: Annotated[int, typer.Option(min=0, help="big photos for the batch phase (0: skip it)")] = 20,
    batch_concurrency: Annotated[int, typer.Option(min=1, help="batch phase: --concurrency")] = 4,
    batch_budget_mib: Annotated[int, typer.Option(min=16, help="batch phase: --memory-budget-mib")] = 1024,
    bundle: BundleOpt = None,
    out: OutOpt = None,
) -> None:
    """Gateway RSS through a burst of big uploads and a soak after it; the batch job's peak RSS on big photos."""
    from . import memory

    report = memory.run_memory(megapixels=megapixels, burst=burst, soak_clients=soak_clients,
                               soak_minutes=soak_minutes, soak_from_minute=soak_from, batch_items=batch_items,
                               batch_concurrency=batch_concurrency, batch_budget_mib=batch_budget_mib,
                               bundle=str(bundle) if bundle else None, say=say)
    _finish(report, out or Path("benchmarks/results/memory"), memory)


@bench_app.command("quality", cls=MultiValueCommand)
def quality_cmd(
    set_dir: Annotated[Path, typer.Argument(help="a RORem set: a folder with meta.json, or the meta.json")],
    engine: Annotated[Optional[list[Engine]], typer.Option(help="engine(s) to compare (default: torch opencv)")] = None,
    bundle: BundleOpt = None,
    device: Annotated[str, typer.Option(help="torch engine and the judge: cpu, cuda, cuda:N or auto")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 (CUDA) or bf16")] = "fp32",
    limit: Annotated[Optional[int], typer.Option(help="only the first N items")] = None,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    triton_url: Annotated[Optional[str], typer.Option(help="triton engine: a running Triton (gRPC host:port); "
                                                           "default: start a local one")] = None,
    threads: ThreadsOpt = None,
    onnx_dir: Annotated[Optional[Path], typer.Option(help="onnxruntime engine: an ONNX export of the bundle "
                                                          "(default: export it now)")] = None,
    out: OutOpt = None,
) -> None:
    """PSNR and SSIM in the mask and on the whole image, bit-exactness outside the dilated mask and the
    discriminator's success rate, for each engine next to 'leave as is' and OpenCV Telea."""
    from . import quality

    engines = [e.value for e in engine] if engine else ["torch", "opencv"]
    report = quality.run_quality(set_dir, engines=engines, bundle=bundle, device=device, dtype=dtype, limit=limit,
                                 seed=seed, triton_url=triton_url, threads=threads, onnx_dir=onnx_dir, say=say)
    _finish(report, out or Path("benchmarks/results/quality"), quality)


@bench_app.command("reference")
def reference_cmd(
    arch: Annotated[Arch, typer.Option(help="bundle: its UNet+VAE with tiny text encoders; tiny: a toy SDXL "
                                            "layout; sdxl: full-size SDXL-inpainting, random weights (CUDA only)")
                    ] = Arch.bundle,
    bundle: BundleOpt = None,
    resolution: Annotated[Optional[int], typer.Option(help="model side in px (default: bundle's; tiny 64; sdxl 512)")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="photo side in px (default: the resolution)")] = None,
    steps: Annotated[int, typer.Option(help="LCM steps")] = 4,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16")] = "auto",
    warmup: Annotated[int, typer.Option(help="unmeasured removals per pipeline")] = 2,
    repeats: Annotated[int, typer.Option(help="measured removals per pipeline")] = 10,
    seed: Annotated[int, typer.Option(help="seed of the weights and the noise")] = 0,
    threads: ThreadsOpt = None,
    out: OutOpt = None,
) -> None:
    """diffusers' StableDiffusionXLInpaintPipeline + LCMScheduler (RORem's 4-step script) vs cleanplate: same
    weights, steps and device, one run; time per removal and the ratio."""
    import diffusers

    from . import reference

    diffusers.utils.logging.set_verbosity_error()  # its VAE up/down-casting warns on every call
    report = reference.run_reference(arch=arch.value, bundle=bundle, resolution=resolution, image_size=image_size,
                                     steps=steps, device=device, dtype=dtype, warmup=warmup, repeats=repeats,
                                     seed=seed, threads=threads, say=say)
    dev = report["settings"]["device"]
    _finish(report, out or Path("benchmarks/results") / f"reference_{arch.value}{_device_tag(dev)}", reference)


@bench_app.command("panel")
def panel_cmd(
    set_dir: Annotated[Path, typer.Argument(help="a folder with meta.json (or the meta.json)")],
    bundle: Annotated[list[Path], typer.Option(help="bundle whose removals make a column (repeatable)")],
    label: Annotated[Optional[list[str]], typer.Option(help="column title per bundle (repeatable)")] = None,
    limit: Annotated[int, typer.Option(min=1, help="rows: the first N items")] = 8,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG path")] = Path("benchmarks/results/side_by_side.png"),
) -> None:
    """A side-by-side PNG (source | Telea | each bundle | GT), to look at removals before trusting a number."""
    from . import quality

    if label and len(label) != len(bundle):
        raise InputError(f"give one --label per --bundle ({len(bundle)}), got {len(label)}", code=ErrorCode.BAD_OPTION)
    say(f"wrote {quality.panel(set_dir, bundle, out, limit=limit, labels=label)}")


@bench_app.command("ablation")
def ablation_cmd(
    base: Annotated[Path, typer.Option(help="the SFT config every arm starts from")] = Path(
        "training/configs/default_sft.json"),
    arm: Annotated[Optional[list[str]], typer.Option(help="arms to run (repeatable; default: all)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps per arm")] = 400,
    items: Annotated[int, typer.Option(min=1, help="first N training items of the base config's meta")] = 1000,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help="evaluate every N steps (default: at the end)")] = None,
    work: Annotated[Path, typer.Option(help="arms' bundles, checkpoints and shared latent caches")] = Path(
        "runs/ablation"),
    out: OutOpt = None,
) -> None:
    """Train SFT arms that differ in one objective choice at equal cost and compare their removals (PSNR/SSIM in
    mask through the production path). Resumes arm by arm."""
    from . import ablation

    report = ablation.run_ablation(base, work, steps=steps, items=items, arms=arm or list(ablation.ARMS),
                                   eval_every=eval_every, say=say)
    _finish(report, out or Path("benchmarks/results/sft_ablation"), ablation)


@bench_app.command("gate")
def gate_cmd(
    heldout_meta: Annotated[Path, typer.Argument(help="held-out labelled candidates: the meta.json of `cleanplate data "
                                                      "disc-labels --bundle` on photos the gate never trained on")],
    bundle: BundleOpt = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 (CUDA) or bf16")] = "fp32",
    limit: Annotated[Optional[int], typer.Option(help="only the first N candidates")] = None,
    threads: ThreadsOpt = None,
    out: OutOpt = None,
) -> None:
    """The quality gate on held-out labelled candidates: ROC AUC, pass rate per label kind at the calibrated
    threshold (GT, source, Telea, the bundle's removals, each synthetic kind), Spearman of the score with
    in-mask PSNR across the bundle's removals, and the targets met or not."""
    from . import discriminator

    report = discriminator.run_gate(heldout_meta, bundle=bundle, device=device, dtype=dtype, limit=limit,
                                    threads=threads, say=say)
    _finish(report, out or Path("benchmarks/results/gate"), discriminator)


@bench_app.command("detect")
def detect_cmd(
    work: Annotated[Path, typer.Option(help="where the dev and negative sets are made (reused by a rerun)")] = Path(
        "runs/bench_detect"),
    bundle: BundleOpt = None,
    detector: Annotated[Optional[Path], typer.Option(help="a detector/ directory instead of the bundle's")] = None,
    dev_n: Annotated[int, typer.Option(min=1, help="dev items with overlays")] = 240,
    neg_n: Annotated[int, typer.Option(min=1, help="negatives: clean and in-scene-text photos")] = 120,
    repeats: Annotated[int, typer.Option(min=1, help="timed detect runs at 512 px")] = 10,
    threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 1,
    e2e: Annotated[bool, typer.Option("--e2e/--no-e2e", help="end to end: remove every dev item with the GT mask "
                                                             "and with the auto mask (the bundle's torch engine, "
                                                             "~2 removals per item) and compare in-mask PSNR")] = True,
    seed: Annotated[int, typer.Option(min=0, help="end to end: the removals' noise seed")] = 0,
    out: OutOpt = None,
) -> None:
    """The overlay detector on held-out photos: pixel precision/recall/F1/IoU overall and per kind, false-positive
    area and share of clean and in-scene-text photos with any detection, CPU latency at 512 px, and end to end the
    in-mask PSNR of removals with the auto mask against those with the GT mask."""
    from . import detect

    out = out or Path("benchmarks/results/detect")
    report = detect.run_detect(work, bundle=bundle, detector=detector, dev_n=dev_n, neg_n=neg_n, repeats=repeats,
                               threads=threads, examples=out.with_name(out.name + "_examples.png"), e2e=e2e,
                               seed=seed, say=say)
    _finish(report, out, detect)


@bench_app.command("batch", cls=MultiValueCommand)
def batch_cmd(
    images: Annotated[int, typer.Option(min=1, help="catalog size: held-out dev photos with promo overlays")] = 32,
    concurrency: Annotated[Optional[list[int]], typer.Option(help="items in flight per level (default: 1 2 4 8)")] = None,
    mode: Annotated[Optional[list[BatchMode]], typer.Option(help="in-process (torch engine here), gateway (a local "
                                                                 "`cleanplate serve`) and/or ray (`batch run --ray` "
                                                                 "on a local cluster); default: in-process gateway")
                    ] = None,
    ray_workers: Annotated[Optional[list[int]], typer.Option(help="ray: model actors per run, each level being their "
                                                                  "batch size (default: 1)")] = None,
    bundle: BundleOpt = None,
    threads: Annotated[int, typer.Option(min=1, help="torch threads of the engine")] = 1,
    max_attempts: Annotated[int, typer.Option(min=1, help="quality-gate attempts per image")] = 1,
    size: Annotated[int, typer.Option(min=64, max=4096, help="side of the catalog photos in px")] = 512,
    out: OutOpt = None,
) -> None:
    """`cleanplate batch run` throughput: images/s and item time per concurrency level, in process, through a
    local gateway and on a local Ray cluster (vs the in-process runner at one worker, with a scaling estimate),
    gate on. Exits 1 (after writing the report) when any item was not cleaned."""
    from . import batch_throughput

    report = batch_throughput.run_batch_throughput(
        images=images, concurrency=concurrency or [1, 2, 4, 8],
        modes=[m.value for m in mode] if mode else ["in-process", "gateway"], ray_workers=ray_workers or [1],
        bundle=str(bundle) if bundle else None, threads=threads, max_attempts=max_attempts, size=size, say=say)
    _finish(report, out or Path("benchmarks/results/batch_throughput"), batch_throughput)
    if batch_throughput.failed(report):
        say("error: some items were not cleaned (see the errors column)")
        raise typer.Exit(1)


@bench_app.command("flywheel")
def flywheel_cmd(
    work: Annotated[Path, typer.Option(help="scratch folder (pairs, candidates, labels, the new bundle); a rerun "
                                            "reuses it")] = Path("runs/flywheel_round"),
    fresh: Annotated[bool, typer.Option(help="delete --work first")] = False,
    bundle: BundleOpt = None,
    pairs: Annotated[int, typer.Option(help="synthetic pairs, half per round")] = 40,
    cal_pairs: Annotated[int, typer.Option(help="extra pairs for the calibration labels")] = 8,
    seed: Annotated[int, typer.Option(help="seed of the synthetic pairs")] = 7000,
    size: Annotated[int, typer.Option(min=64, max=4096, help="side of the synthetic pairs in px")] = 256,
    label_r1: Annotated[int, typer.Option(help="round-1 candidates the script labels (training labels)")] = 12,
    label_r2: Annotated[int, typer.Option(help="round-2 candidates the script labels (held-out overlap)")] = 8,
    psnr_yes: Annotated[float, typer.Option(help="scripted labeler: yes at this in-mask PSNR, dB")] = 12.0,
    human_repeat: Annotated[int, typer.Option(help="times the scripted labels appear in training")] = 2,
    disc_steps: Annotated[int, typer.Option(help="discriminator training steps")] = 60,
    out: OutOpt = None,
) -> None:
    """One round of RORem's data flywheel on synthetic pairs: generate, label by script (a stand-in for a
    person), train the discriminator, autolabel; the counts of each step and the new gate's agreement."""
    from . import flywheel_round

    report = flywheel_round.run_flywheel_round(
        work, bundle=bundle, pairs=pairs, cal_pairs=cal_pairs, seed=seed, size=size, label_r1=label_r1,
        label_r2=label_r2, psnr_yes=psnr_yes, human_repeat=human_repeat, disc_steps=disc_steps, fresh=fresh, say=say)
    _finish(report, out or Path("benchmarks/results/flywheel_round"), flywheel_round)


@bench_app.command("report")
def report_cmd(
    report_json: Annotated[Path, typer.Argument(help="a report written by `cleanplate bench ...` (OUT.json)")],
) -> None:
    """Rewrite a report's markdown and plots from its JSON (e.g. one copied back from a GPU machine)."""
    import json

    from . import (
        ablation,
        batch_throughput,
        detect,
        discriminator,
        flywheel_round,
        latency,
        latency_compare,
        load,
        memory,
        quality,
        reference,
    )
    from .common import plots, write_report

    try:
        report = json.loads(report_json.read_text())
        module = {"latency": latency, "load": load, "quality": quality, "reference": reference,
                  "ablation": ablation, "gate": discriminator, "memory": memory, "batch": batch_throughput,
                  "flywheel": flywheel_round, latency_compare.HARNESS: latency_compare,
                  detect.HARNESS: detect}[report["harness"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{report_json} is not a `cleanplate bench` report: {exc}", code=ErrorCode.BAD_OPTION) from exc
    out = report_json.with_suffix("")
    markdown = module.to_markdown(report, report.get("command", "?"))
    paths = write_report(out, report, markdown) + plots(module, report, out)
    typer.echo(markdown)
    say("wrote " + ", ".join(str(p) for p in paths))
