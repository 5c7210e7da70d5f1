"""The `cleanplate` command line (typer).

Errors a user can cause (bad file, bad option, bad bundle) print one line ``error: ...`` and exit 2.
"""

from __future__ import annotations

import re
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .benchmarks.cli import bench_app
from .cli_options import BatchOpt, ConfigOpt, LrOpt, MetaOpt, OutOpt, ResOpt, SeedOpt, StepsOpt, WorkOpt, say
from .deploy import deploy_app
from .engines import ENGINE_NAMES
from .errors import CleanplateError, ErrorCode, InputError, missing_extra, require_extra
from .export.cli import export_app, triton_app
from .imaging import ImageFormat
from .options import option_help
from .training.detector_cli import train_detector_cmd
from .training.flywheel_cli import flywheel_app, label_app
from .training.rl_cli import data_dpo_pairs_cmd, train_dpo_cmd, train_grpo_cmd, train_rwd_cmd

app = typer.Typer(help="Remove promo text, watermarks and stickers from product photos.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
bundle_app = typer.Typer(help="Model bundles: convert and inspect.", no_args_is_help=True)
data_app = typer.Typer(help="Training data.", no_args_is_help=True)
train_app = typer.Typer(help="Trainers that write bundles (SFT, LCM-LoRA, DPO, RWD, GRPO) and the small VAE.",
                        no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
batch_app = typer.Typer(help="Batch catalog cleaning: a folder or manifest, resumable, with a report and a review "
                             "queue.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
app.add_typer(export_app, name="export")  # ONNX, TensorRT, Triton repository: export/cli.py
app.add_typer(triton_app, name="triton")  # a local tritonserver: export/cli.py
app.add_typer(deploy_app, name="deploy")  # render/lint the Helm chart: cleanplate/deploy.py
app.add_typer(bench_app, name="bench")  # latency, load, quality, reference: benchmarks/cli.py
app.add_typer(flywheel_app, name="flywheel")  # RORem data flywheel: training/flywheel_cli.py
app.add_typer(label_app, name="label")  # the labeling page and label export: training/flywheel_cli.py


def _needs(extra: str, *modules: str) -> Any:
    """A command group's callback: refuse (one line, exit 2) before any subcommand runs when ``extra`` is not
    installed. Any other import of an extra's module fails in :func:`main` the same way."""
    return lambda: require_extra(extra, *modules)


for _group, _extra, _modules in ((export_app, "export", ("onnx", "onnxscript")),
                                 (triton_app, "export", ("tritonclient",)),
                                 (train_app, "train", ("accelerate", "peft", "transformers", "tensorboard")),
                                 (bench_app, "bench", ("matplotlib", "skimage")),
                                 (deploy_app, "deploy", ("helm_python", "kubernetes_validate"))):
    _group.callback()(_needs(_extra, *_modules))


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def _from_options(model: Any, **given: Any) -> Any:
    """``model(**given)`` for a pydantic model built from command-line options (None = not given).

    Raises InputError ("bad_option") naming the first bad ``--option``.
    """
    from pydantic import ValidationError

    try:
        return model(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", code=ErrorCode.BAD_OPTION) from exc


@app.command()
def remove(
    image: Annotated[Path, typer.Argument(help="an image file, or a folder of images")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output file (format from its suffix) or folder")],
    mask: Annotated[Optional[Path], typer.Option(help="mask file (white = remove), or a folder of same-named "
                                                      "masks; omit to use the image's transparent pixels")] = None,
    auto_mask: Annotated[bool, typer.Option("--auto-mask", help="without a mask file or transparent pixels, remove "
                                                                "what the bundle's overlay detector finds (promo "
                                                                "text, watermarks, badges, logos)")] = False,
    save_mask: Annotated[Optional[Path], typer.Option(help="write the mask used as a PNG (white = removed) here; a "
                                                           "folder when IMAGE is one")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="bundle directory (default: the bundled model)")] = None,
    dilate_px: Annotated[Optional[int], typer.Option(help=option_help("dilate_px"))] = None,
    steps: Annotated[Optional[int], typer.Option(help=option_help("steps"))] = None,
    seed: Annotated[int, typer.Option(help=option_help("seed"))] = 0,
    device: Annotated[Device, typer.Option(help="where the model runs")] = Device.cpu,
    dtype: Annotated[DType, typer.Option(help="model precision")] = DType.fp32,
) -> None:
    """Remove the masked region from one image, or from every image of a folder. The mask: the --mask file,
    else the image's transparent pixels, else (--auto-mask) the overlay detector's; an auto mask that finds
    nothing writes the image unchanged."""
    from . import imaging
    from .bundle import load_bundle
    from .masks import MaskSource, encode_mask, resolve_mask_with
    from .pipeline import RemovalPipeline
    from .remover import remove as run_removal

    if image.is_dir():
        pairs = _folder_pairs(image, mask, output, auto_mask=auto_mask)
        if save_mask is not None:
            if save_mask.exists() and not save_mask.is_dir():
                raise InputError(f"--save-mask must be a folder when IMAGE is a folder: {save_mask}",
                                 code=ErrorCode.BAD_OPTION)
            save_mask.mkdir(parents=True, exist_ok=True)
    else:
        if output.is_dir():
            output = output / image.name
        imaging.format_for_path(output)  # refuse an unknown suffix before loading the model
        pairs = [(image, mask, output)]
    loaded = load_bundle(bundle)
    pipe = RemovalPipeline.from_bundle(loaded, device=device.value, dtype=dtype.value)
    detector, whose = loaded.detector, f"the bundle {loaded.path}"
    failures = 0
    for src_path, mask_path, out_path in pairs:
        try:
            t0 = time.perf_counter()
            decoded = imaging.decode_image(src_path)
            given = None if mask_path is None else imaging.decode_mask(mask_path)
            used = resolve_mask_with(detector, decoded, given, auto=auto_mask, what=whose)  # cleanplate.masks
            if save_mask is not None:
                mask_out = save_mask / (src_path.stem + ".png") if image.is_dir() else save_mask
                imaging.write_atomic(mask_out, encode_mask(used.mask))
            if used.nothing_found:
                pixels, note = decoded.pixels, ", the detector found nothing: unchanged"
            else:
                pixels = run_removal(pipe, decoded, used.mask, dilate_px=dilate_px, seed=seed, steps=steps).pixels
                note = "" if used.detections is None else f", {len(used.detections)} overlays detected"
            # A mask given as transparency is filled in, so the result is opaque.
            data = imaging.encode_image(pixels, decoded, fmt=imaging.format_for_path(out_path),
                                        alpha=None if used.source is MaskSource.alpha else "keep")
            imaging.write_atomic(out_path, data)
            say(f"{out_path}: {decoded.width}x{decoded.height}{note}, {(time.perf_counter() - t0) * 1000:.0f} ms")
        except CleanplateError as exc:
            if len(pairs) == 1:
                raise
            failures += 1
            say(f"error: {src_path.name}: {exc}")
    if failures:
        say(f"error: {failures} of {len(pairs)} images failed")
        raise typer.Exit(2)


@app.command()
def detect(
    image: Annotated[Path, typer.Argument(help="an image file")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="mask PNG to write (same size as the "
                                                                          "image, white = overlay)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the detections as JSON on stdout: box [x0, y0, "
                                                         "x1, y1], kind, score, area")] = False,
    bundle: Annotated[Optional[Path], typer.Option(help="bundle with a detector/ (default: the bundled model)")] = None,
) -> None:
    """Find the overlays a storefront added (promo text, watermarks, badges, logos): the mask `remove
    --auto-mask` would use."""
    import json

    from . import imaging
    from .masks import bundle_detector, detections_json, encode_mask

    if output is None and not as_json:
        raise InputError("give -o MASK.png, --json, or both", code=ErrorCode.BAD_OPTION)
    if output is not None and imaging.format_for_path(output) != "png":
        raise InputError(f"-o: the mask is written as PNG; use a .png name, not {output.name}",
                         code=ErrorCode.BAD_OPTION)
    detector = bundle_detector(bundle)
    t0 = time.perf_counter()
    decoded = imaging.decode_image(image)
    found = detector.detect(decoded.rgb)
    if output is not None:
        imaging.write_atomic(output, encode_mask(found.mask))
    say(f"{output or image}: {decoded.width}x{decoded.height}, {len(found.detections)} overlays, "
        f"{(time.perf_counter() - t0) * 1000:.0f} ms")
    if as_json:
        typer.echo(json.dumps({"image": str(image), "width": decoded.width, "height": decoded.height,
                               "mask": None if output is None else str(output),
                               "mask_pixels": int((found.mask > 0).sum()),
                               "detections": detections_json(found.detections)}, indent=2))


def _folder_pairs(folder: Path, masks: Path | None, output: Path, *,
                  auto_mask: bool = False) -> list[tuple[Path, Path | None, Path]]:
    from .batch.items import pair_folder
    from .imaging import WRITABLE_SUFFIXES

    if masks is not None and not masks.is_dir():
        raise InputError(f"--mask must be a folder when IMAGE is a folder: {masks}", code=ErrorCode.BAD_OPTION)
    if output.exists() and not output.is_dir():
        raise InputError(f"-o must be a folder when IMAGE is a folder: {output}", code=ErrorCode.BAD_OPTION)
    found = pair_folder(folder, masks, recursive=False)  # the batch job's pairing rule, this folder only
    if not found:
        raise InputError(f"no images in {folder}", code=ErrorCode.BAD_OPTION)
    pairs = []
    for pair in found:
        if masks is not None and pair.mask is None and not auto_mask:  # --auto-mask: the rule decides
            raise InputError(pair.missing_mask(masks), code=ErrorCode.MISSING_MASK)
        img = pair.image
        # Outputs keep the input's name; a suffix we cannot write (e.g. .bmp) becomes .png.
        out_name = img.name if img.suffix.lower() in WRITABLE_SUFFIXES else img.stem + ".png"
        pairs.append((img, pair.mask, output / out_name))
    output.mkdir(parents=True, exist_ok=True)
    return pairs


@bundle_app.command("from-rorem")
def bundle_from_rorem(
    base: Annotated[Path, typer.Option(help="diffusers SDXL-inpainting directory (vae, text encoders, tokenizers)")],
    unet: Annotated[Path, typer.Option(help="RORem UNet directory (diffusers format)")],
    out: Annotated[Path, typer.Option(help="bundle directory to write")],
    lora: Annotated[Optional[Path], typer.Option(help="LCM-LoRA directory (pytorch_lora_weights.safetensors)")] = None,
    resolution: Annotated[int, typer.Option(help="model input side in px")] = 512,
) -> None:
    """Convert the published RORem layout into a bundle (empty-prompt embeddings computed once)."""
    from .bundle import from_rorem

    say(f"wrote {from_rorem(base, unet, out, lora_dir=lora, resolution=resolution)}")


@bundle_app.command("info")
def bundle_info(bundle: Annotated[Optional[Path], typer.Argument(help="bundle directory")] = None) -> None:
    """Print a bundle's bundle.json (default: the bundled model)."""
    from .bundle import default_bundle_path, read_config

    typer.echo(read_config(bundle or default_bundle_path()).model_dump_json(indent=2))


@bundle_app.command("tune")
def bundle_tune(
    bundle: Annotated[Path, typer.Argument(help="bundle directory (its bundle.json is rewritten)")],
    meta: Annotated[list[Path], typer.Option(help="held-out RORem meta.json (repeatable)")],
    dilate_px: Annotated[list[int], typer.Option(help="serving dilations to try (repeatable)")],
    residual_scale: Annotated[Optional[list[float]], typer.Option(help="residual scales to try (repeatable)")] = None,
    steps: Annotated[Optional[list[int]], typer.Option(help="sampler steps to try (repeatable; default: the "
                                                            "bundle's)")] = None,
    masked_source: Annotated[Optional[list[str]], typer.Option(
        help="classical prefills to try, telea / ns (repeatable; default: the bundle's)")] = None,
    limit: Annotated[int, typer.Option(min=1, help="first N items of --meta")] = 24,
) -> None:
    """Pick the serving prefill, dilation, residual scale and step count with the best in-mask PSNR on held-out
    photos."""
    from .training.sft import tune_bundle

    best = tune_bundle(bundle, meta, dilations=dilate_px, scales=residual_scale or [1.0], steps=steps,
                       fills=masked_source, limit=limit, say=say)["best"]
    say(f"wrote {bundle}/bundle.json: masked_source {best['masked_source']}, dilate_px {best['dilate_px']}, "
        f"residual_scale {best['residual_scale']:g}, steps {best['steps']} ({best['psnr_mask_db']:.2f} dB in mask "
        f"on {best['n']} items)")


@data_app.command("synth")
def data_synth(
    n: Annotated[int, typer.Option("--n", help="number of triplets")],
    out: Annotated[Path, typer.Option(help="output directory (meta.json, source/, mask/, GT/)")],
    seed: Annotated[int, typer.Option(help="seed; same seed, same data")] = 0,
    size: Annotated[int, typer.Option(help="side of each square image in px")] = 256,
    dev: Annotated[bool, typer.Option(help="held-out dev set: only real photos, from DEV_PHOTOS (none used in "
                                               "training)")] = False,
) -> None:
    """Synthetic e-commerce triplets (product scenes and photos with promo overlays) in RORem's meta.json format."""
    from .training.synth import DEV_PHOTOS, SynthConfig, synth_dataset

    cfg = SynthConfig(size=size, photos=DEV_PHOTOS, photo_fraction=1.0) if dev else SynthConfig(size=size)
    say(f"wrote {synth_dataset(out, n, seed=seed, cfg=cfg)}")


def _common(meta, out, max_steps, batch_size, lr, resolution, seed, work_dir) -> dict:
    return {"meta": meta, "out": out, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
            "resolution": resolution, "seed": seed, "work_dir": work_dir}


@train_app.command("vae")
def train_vae_cmd(config: ConfigOpt = None, meta: MetaOpt = None, out: OutOpt = None, max_steps: StepsOpt = None,
                  batch_size: BatchOpt = None, lr: LrOpt = None, resolution: ResOpt = None, seed: SeedOpt = None,
                  work_dir: WorkOpt = None) -> None:
    """Train a small AutoencoderKL (for bundles trained from scratch). Resumes from OUT.work/checkpoints."""
    from .training.common import load_config
    from .training.vae import VAEConfig, train_vae

    cfg = load_config(VAEConfig, config, _common(meta, out, max_steps, batch_size, lr, resolution, seed, work_dir))
    result = train_vae(cfg)
    say(f"wrote {cfg.out} (scaling_factor {result['scaling_factor']})")


@train_app.command("sft")
def train_sft_cmd(config: ConfigOpt = None, meta: MetaOpt = None, out: OutOpt = None, max_steps: StepsOpt = None,
                  batch_size: BatchOpt = None, lr: LrOpt = None, resolution: ResOpt = None, seed: SeedOpt = None,
                  work_dir: WorkOpt = None,
                  init_bundle: Annotated[Optional[Path], typer.Option(help="bundle to fine-tune")] = None,
                  unet_config: Annotated[Optional[str], typer.Option(help="from scratch: UNet config")] = None,
                  vae: Annotated[Optional[Path], typer.Option(help="from scratch: vae/ directory")] = None) -> None:
    """RORem supervised fine-tuning (ε-MSE on (source, mask, GT) triplets); writes a bundle. Resumable."""
    from .training.common import load_config
    from .training.sft import SFTConfig, train_sft

    overrides = _common(meta, out, max_steps, batch_size, lr, resolution, seed, work_dir)
    overrides.update(init_bundle=init_bundle, unet_config=unet_config, vae=vae)
    cfg = load_config(SFTConfig, config, overrides)
    train_sft(cfg)
    say(f"wrote {cfg.out}")


@train_app.command("lcm")
def train_lcm_cmd(config: ConfigOpt = None, meta: MetaOpt = None, out: OutOpt = None, max_steps: StepsOpt = None,
                  batch_size: BatchOpt = None, lr: LrOpt = None, resolution: ResOpt = None, seed: SeedOpt = None,
                  work_dir: WorkOpt = None,
                  bundle: Annotated[Optional[Path], typer.Option(help="SFT bundle to distill")] = None,
                  lora_rank: Annotated[Optional[int], typer.Option(help="LoRA rank (RORem-4S: 64)")] = None) -> None:
    """LCM-LoRA distillation of an SFT bundle (DDIM solver, skipping steps, boundary scalings). Resumable."""
    from .training.common import load_config
    from .training.lcm import LCMConfig, train_lcm

    overrides = _common(meta, out, max_steps, batch_size, lr, resolution, seed, work_dir)
    overrides.update(bundle=bundle, lora_rank=lora_rank)
    cfg = load_config(LCMConfig, config, overrides)
    train_lcm(cfg)
    say(f"wrote {cfg.out}")


@train_app.command("discriminator")
def train_discriminator_cmd(
    config: ConfigOpt = None, meta: MetaOpt = None, out: OutOpt = None, max_steps: StepsOpt = None,
    batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None, work_dir: WorkOpt = None,
    bundle: Annotated[Optional[Path], typer.Option(help="remover bundle to start from (its UNet and VAE)")] = None,
    val_meta: Annotated[Optional[list[Path]], typer.Option(help="held-out labelled meta.json for the threshold")] = None,
    target_precision: Annotated[Optional[float], typer.Option(help="without gt/source kinds in --val-meta: "
                                                                   "precision the pass threshold must reach")] = None,
    gt_pass_min: Annotated[Optional[float], typer.Option(help="share of held-out GT that must pass (0.9)")] = None,
    gt_pass_confidence: Annotated[Optional[float], typer.Option(help="confidence of the GT target's "
                                                                     "Clopper-Pearson bound (0.95)")] = None,
    source_pass_max: Annotated[Optional[float], typer.Option(help="share of held-out sources (nothing removed) "
                                                                  "that may pass (0.02)")] = None,
) -> None:
    """RORem quality discriminator on labelled meta.json (score 0/1), calibrated on --val-meta; adds it to a bundle."""
    from .training.common import load_config
    from .training.discriminator import DiscriminatorConfig, train_discriminator

    overrides = _common(meta, out, max_steps, batch_size, lr, None, seed, work_dir)
    overrides.update(bundle=bundle, val_meta=val_meta, target_precision=target_precision, gt_pass_min=gt_pass_min,
                     gt_pass_confidence=gt_pass_confidence, source_pass_max=source_pass_max)
    cfg = load_config(DiscriminatorConfig, config, overrides)
    cal = train_discriminator(cfg)["calibration"]
    if "threshold" in cal:
        say(f"threshold {cal['threshold']:.4f} ({cal['rule']}): precision {cal['precision']:.3f}, "
             f"recall {cal['recall']:.3f}, ROC AUC {cal['roc_auc']:.3f} on {cal['n_pos'] + cal['n_neg']} held-out items")
        if "gt_pass_rate" in cal:
            say(f"GT passes {cal['gt_pass_rate']:.1%}, source {cal['source_pass_rate']:.1%}; targets "
                 f"{'met' if cal['targets_met'] else 'NOT met'}")
    say(f"wrote {cfg.out}")


for _name, _cmd in (("dpo", train_dpo_cmd), ("rwd", train_rwd_cmd), ("grpo", train_grpo_cmd)):
    train_app.command(_name)(_cmd)  # RL after SFT: training/rl_cli.py
train_app.command("detector")(train_detector_cmd)  # the overlay detector: training/detector_cli.py
data_app.command("dpo-pairs")(data_dpo_pairs_cmd)


@data_app.command("disc-labels")
def data_disc_labels(
    meta: Annotated[list[Path], typer.Option(help="RORem meta.json with (source, mask, GT) (repeatable)")],
    out: Annotated[Path, typer.Option(help="output directory (meta.json with score, result/, labels.jsonl)")],
    per_item: Annotated[int, typer.Option(help="synthetic labelled candidates per input item (>= 0 with --bundle)")] = 2,
    seed: Annotated[int, typer.Option(help="seed; same seed, same data; also the first removal seed")] = 0,
    positive_fraction: Annotated[float, typer.Option(help="share of good synthetic candidates (without --bundle "
                                                          "or with --no-balance)")] = 0.5,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N input items")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="remover bundle: add its own removals, a Telea fill and the "
                                                        "GT/source anchors, labelled by agreement with the GT")] = None,
    removals_per_item: Annotated[Optional[int], typer.Option(help="removals per item, seeds SEED..SEED+K-1 "
                                                                  "(with --bundle; default 2)")] = None,
    psnr_good: Annotated[float, typer.Option(help="good removal: in-mask PSNR >= this (dB)")] = 24.0,
    ssim_good: Annotated[float, typer.Option(help="good removal: in-mask SSIM >= this")] = 0.7,
    max_cast: Annotated[float, typer.Option(help="good removal: in-mask mean colour shift <= this (0..255 levels; "
                                                 "255 turns it off)")] = 8.0,
    balance: Annotated[bool, typer.Option(help="with --bundle: pick each item's synthetic labels to balance its "
                                               "good and bad candidates")] = True,
    device: Annotated[Device, typer.Option(help="where the bundle runs")] = Device.cpu,
    dtype: Annotated[DType, typer.Option(help="bundle precision")] = DType.fp32,
) -> None:
    """Discriminator labels: good removals (GT and mild variants) and failures (source left in, partial removal,
    blurred or smeared fills, re-drawn text); with --bundle also the bundle's own removals and Telea fills,
    good when in-mask PSNR, SSIM and colour cast agree with the GT. Resumes an interrupted run."""
    import json

    from .training.disc_labels import make_disc_labels, summarize_labels

    path = make_disc_labels(meta, out, per_item=per_item, seed=seed, positive_fraction=positive_fraction, limit=limit,
                            bundle=bundle, removals_per_item=removals_per_item, psnr_good=psnr_good,
                            ssim_good=ssim_good, max_cast=max_cast, balance=balance, device=device.value,
                            dtype=dtype.value)
    for kind, row in summarize_labels(json.loads(path.read_text())).items():
        median = row["psnr_mask_db_median"]
        say(f"{kind:9s} {row['n']:6d} candidates, {row['good']:6d} good"
             + ("" if median is None else f", median in-mask PSNR {median:.1f} dB"))
    say(f"wrote {path}")


@app.command()
def score(
    source: Annotated[Path, typer.Argument(help="the image before removal")],
    result: Annotated[Path, typer.Argument(help="the image after removal (same size)")],
    mask: Annotated[Path, typer.Argument(help="the mask of the removal (white = removed)")],
    bundle: Annotated[Optional[Path], typer.Option(help="bundle with a discriminator (default: the bundled model)")] = None,
    dilate_px: Annotated[Optional[int], typer.Option(help="mask dilation radius in px (default: bundle's)")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="pass threshold (default: the calibrated one)")] = None,
) -> None:
    """Judge a removal with the bundle's discriminator; prints JSON {score, threshold, passed}."""
    import json

    from . import imaging
    from .pipeline import RemovalPipeline
    from .remover import ScoreRequest, score_batch

    request = ScoreRequest(imaging.decode_image(source), imaging.decode_image(result), imaging.decode_mask(mask), dilate_px)
    pipe = RemovalPipeline.from_bundle(bundle)
    value = score_batch(pipe, [request])[0]
    limit = pipe.threshold if threshold is None else threshold
    typer.echo(json.dumps({"score": round(value, 6), "threshold": limit, "passed": value >= limit}))


Engine = Enum("Engine", {name: name for name in ENGINE_NAMES}, type=str)  # cleanplate.engines names them


@app.command()
def serve(
    config: Annotated[Optional[Path], typer.Option(help="settings file (.json, .toml, .yaml); env CLEANPLATE_* "
                                                        "and these options override it")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default 8080)")] = None,
    engine: Annotated[Optional[Engine], typer.Option(help="removal engine (default torch)")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="bundle directory (default: the bundled model)")] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device: cpu, cuda, auto")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="micro-batch size bound (1 = off)")] = None,
    batch_window_ms: Annotated[Optional[float], typer.Option(help="micro-batch collection window in ms")] = None,
    max_queue: Annotated[Optional[int], typer.Option(help="queued removals before 429")] = None,
    triton_url: Annotated[Optional[str], typer.Option(help="triton engine: host:port (default 127.0.0.1:8001)")] = None,
    triton_protocol: Annotated[Optional[str], typer.Option(help="triton engine: grpc or http")] = None,
    onnx_dir: Annotated[Optional[Path], typer.Option(help="onnxruntime engine: a `cleanplate export onnx` "
                                                          "directory of the bundle")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the REST gateway (POST /v1/remove, /v1/detect, /v1/score; /healthz, /readyz, /metrics, /docs)."""
    from .serving.server import serve as run_server
    from .serving.settings import load_settings

    settings = load_settings(config, host=host, port=port, engine=engine.value if engine else None, bundle=bundle,
                             device=device, max_batch=max_batch, batch_window_ms=batch_window_ms, max_queue=max_queue,
                             triton_url=triton_url, triton_protocol=triton_protocol, onnx_dir=onnx_dir)
    run_server(settings, log_level=log_level)


class MaskChannel(str, Enum):
    luma = "luma"
    alpha = "alpha"


class ProgressMode(str, Enum):
    auto = "auto"
    bar = "bar"
    log = "log"
    off = "off"


@batch_app.command("run")
def batch_run(
    # Paths or fsspec URLs (s3://bucket/photos, memory://..., file://...): str, as Path would fold "//".
    source: Annotated[str, typer.Argument(help="a folder of images, or a manifest: .jsonl, .csv or a RORem "
                                               "meta.json (a local path or a URL: s3://bucket/photos)")],
    output: Annotated[str, typer.Option("-o", "--output", help="output folder or URL (cleaned images, "
                                                               "report.jsonl, review/)")],
    masks: Annotated[Optional[str], typer.Option(help="folder of masks with the images' relative names (any "
                                                       "image suffix); omit to use each image's transparency")] = None,
    mask_channel: Annotated[MaskChannel, typer.Option(help="how mask files mark what to remove: luma (white) or "
                                                           "alpha (opaque)")] = MaskChannel.luma,
    auto_mask: Annotated[bool, typer.Option("--auto-mask", help="items without a mask file (or without one in "
                                                                "--masks) and without transparent pixels: remove "
                                                                "what the overlay detector finds; the mask used is "
                                                                "kept in the review folder")] = False,
    fmt: Annotated[Optional[ImageFormat], typer.Option("--format", help="output format (default: the input's)")] = None,
    report: Annotated[Optional[str], typer.Option(help="report file (default OUTPUT/report.jsonl)")] = None,
    review: Annotated[Optional[str], typer.Option(help="review folder (default OUTPUT/review)")] = None,
    concurrency: Annotated[int, typer.Option(help="items in the engine at once")] = 4,
    memory_budget_mib: Annotated[int, typer.Option(min=16, help="working memory of the items in flight; items "
                                                                "wait for it (a 40 MP photo needs ~440 MiB)")] = 1024,
    engine: Annotated[Optional[Engine], typer.Option(help="in-process engine (default torch)")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="bundle directory (default: the bundled model)")] = None,
    device: Annotated[Device, typer.Option(help="torch engine: where the model runs")] = Device.cpu,
    dtype: Annotated[DType, typer.Option(help="torch engine: model precision")] = DType.fp32,
    torch_threads: Annotated[Optional[int], typer.Option(help="torch engine: intra-op threads")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="torch engine: micro-batch bound (1 = off)")] = None,
    url: Annotated[Optional[str], typer.Option(help="use a running gateway (cleanplate serve) at this URL")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="CLEANPLATE_API_KEY", show_envvar=True,
                                                   help="gateway API key (Bearer)")] = None,
    onnx_dir: Annotated[Optional[Path], typer.Option(help="onnxruntime engine: a `cleanplate export onnx` "
                                                          "directory of the bundle")] = None,
    triton_url: Annotated[Optional[str], typer.Option(help="use the triton engine: host:port of a Triton server")] = None,
    triton_protocol: Annotated[Optional[str], typer.Option(help="triton engine: grpc or http")] = None,
    # Ranges and meanings: cleanplate.options.RemovalOptions (validated through ItemOptions below).
    seed: Annotated[int, typer.Option(help=option_help("seed") + " (items may set their own)")] = 0,
    steps: Annotated[Optional[int], typer.Option(help=option_help("steps"))] = None,
    dilate_px: Annotated[Optional[int], typer.Option(help=option_help("dilate_px"))] = None,
    quality_gate: Annotated[Optional[bool], typer.Option("--quality-gate/--no-quality-gate",
                                                         help=option_help("quality_gate") + " (default: on when the "
                                                              "engine has a discriminator)")] = None,
    threshold: Annotated[Optional[float], typer.Option(help=option_help("threshold"))] = None,
    max_attempts: Annotated[int, typer.Option(help=option_help("max_attempts"))] = 3,
    retry_failed: Annotated[bool, typer.Option(help="also redo items whose last report line is an error")] = False,
    progress: Annotated[ProgressMode, typer.Option(help="bar on a terminal, log lines otherwise")] = ProgressMode.auto,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="[ADDRESS]",
                                               help="run as a Ray Data pipeline: --ray alone starts a local "
                                                    "cluster, --ray auto joins this machine's, or an address "
                                                    "(needs cleanplate[ray])")] = None,
    workers: Annotated[int, typer.Option(help="--ray: model actors, one engine each")] = 1,
    batch_size: Annotated[int, typer.Option(help="--ray: items per actor call")] = 4,
    num_gpus_per_worker: Annotated[float, typer.Option(help="--ray: GPUs each actor reserves")] = 0.0,
) -> None:
    """Clean a catalog: resumable (a rerun skips finished items), one report line per item, gate failures
    copied to OUTPUT/review. Exit 0 all ok, 1 some items errored, 2 bad command, 130/143 stopped by a signal."""
    import asyncio

    from .admission import MiB, tune_allocator
    from .batch import GatewayBackend, InProcessBackend, ItemOptions, Progress, load_items, run_batch

    if url and triton_url:
        raise InputError("give --url or --triton-url, not both", code=ErrorCode.BAD_OPTION)
    if ray is not None and url:
        raise InputError("--ray runs the engine on Ray actors; --url sends to a gateway: give one",
                         code=ErrorCode.BAD_OPTION)
    wants_triton = bool(triton_url) or (engine is not None and engine.value == "triton")
    if (url or triton_url) and ((engine is not None and engine.value != "triton") or bundle or torch_threads
                                or max_batch):
        raise InputError("--engine, --bundle, --torch-threads and --max-batch are for in-process engines; the "
                         "server at --url/--triton-url has its own", code=ErrorCode.BAD_OPTION)
    defaults = _from_options(ItemOptions, seed=seed, steps=steps, dilate_px=dilate_px, quality_gate=quality_gate,
                             threshold=threshold, max_attempts=max_attempts)
    items = load_items(source, masks=masks, fmt=fmt.value if fmt else None, exclude=[output, *([review] if review else [])],
                       auto_mask=auto_mask)
    backend: Any = None
    if url:
        backend = GatewayBackend(url, api_key=api_key, concurrency=concurrency)
    else:
        from .engines import EngineOptions, make_engine

        if wants_triton:  # Triton's own dynamic batcher makes the batches
            given = dict(engine="triton", triton_url=triton_url, triton_protocol=triton_protocol,
                         max_queue=max(64, 2 * concurrency))
        else:
            given = dict(engine=(engine or Engine.torch).value, bundle=bundle, device=device.value,
                         dtype=dtype.value, torch_threads=torch_threads, max_batch=max_batch, onnx_dir=onnx_dir,
                         max_queue=max(64, 2 * concurrency))
        engine_options = _from_options(EngineOptions, **given)
        if ray is None:
            backend = InProcessBackend(make_engine(engine_options))
    tune_allocator()
    if ray is not None:  # --url with --ray was refused above, so engine_options is set
        from .batch.ray_runner import run_batch_ray

        opts = engine_options.model_dump(exclude_unset=True)
        for name in ("bundle", "onnx_dir"):  # the actors' working folder may differ
            if opts.get(name) is not None:
                opts[name] = Path(opts[name]).absolute()
        result = run_batch_ray(items, opts, output, address=ray, workers=workers, batch_size=batch_size,
                               num_gpus_per_worker=num_gpus_per_worker, defaults=defaults, report_path=report,
                               review_dir=review, retry_failed=retry_failed, mask_channel=mask_channel.value,
                               progress=Progress(progress.value))
        say(result.line())
        raise typer.Exit(result.exit_code)
    result = asyncio.run(run_batch(items, backend, output, defaults=defaults, concurrency=concurrency,
                                   report_path=report, review_dir=review, retry_failed=retry_failed,
                                   mask_channel=mask_channel.value, progress=Progress(progress.value),
                                   memory_budget_bytes=memory_budget_mib * MiB))
    say(result.line())
    raise typer.Exit(result.exit_code)


@batch_app.command("summarize")
def batch_summarize(
    report: Annotated[str, typer.Argument(help="a batch report (report.jsonl; a path or a URL)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Counts, gate pass rate and latency percentiles of a batch report (each item's last line)."""
    import json

    from .batch import format_summary, summarize

    summary = summarize(report)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


_RAY_ADDRESS = re.compile(r"^(auto|local|ray://.+|[A-Za-z0-9.-]+:\d+)$")


def _ray_flag(argv: list[str]) -> list[str]:
    """``batch run ... --ray`` with no address: ``--ray local`` (typer has no optional option values). The
    token after ``--ray`` is its address only when it looks like one (auto, local, host:port, ray://...)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--ray" and (i + 1 == len(out) or not _RAY_ADDRESS.match(out[i + 1])):
            out.insert(i + 1, "local")
            break
    return out


def main() -> None:
    """Entry point: run the app, turning a CleanplateError into one line on stderr and the exit code of its
    ``code`` (``ErrorCode.exit_code``: 2 for a caller's mistake, 1 for a failed export: the input was fine,
    the result was not). A command whose optional packages are not installed (``cleanplate serve`` on the base
    install) says which extra to install, the same way (exit 2)."""
    sys.argv = _ray_flag(sys.argv)
    try:
        try:
            app()
        except ImportError as exc:
            missing = missing_extra(exc)
            if missing is None:
                raise
            raise missing from exc
    except CleanplateError as exc:
        say(f"error: {exc}")
        sys.exit(exc.code.exit_code)


if __name__ == "__main__":
    main()
