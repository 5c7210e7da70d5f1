"""Reference comparison (``cleanplate bench reference``): the same removal through diffusers' own
``StableDiffusionXLInpaintPipeline`` with ``LCMScheduler``, run the way RORem's 4-step script runs it,
next to cleanplate's engine, with the same weights, steps and device, in one run.

The diffusers side, per removal (RORem's ``inference_RORem_4S.py`` semantics, without its bugs):
resize the whole photo and its mask to R x R, call the pipeline with the empty prompt, guidance 1,
strength 1 and N LCM steps (so both text encoders run on every call, the image and mask go through
diffusers' processors, the masked image through the VAE encoder), get a PIL image back and resize it to
the photo's size. cleanplate's side: :func:`cleanplate.benchmarks.latency._torch_rep` with the gate off
(context crop, VAE encode, N steps with the precomputed empty-prompt conditioning, VAE decode,
feathered paste-back), the production code path.

Same weights: one UNet module (LCM-LoRA fused) serves both; cleanplate's VAE is a copy of the same
weights (diffusers casts its VAE between fp16 and fp32 inside each call); cleanplate's conditioning is
these text encoders' output for the empty prompt, computed once. The two run interleaved (alternating
which goes first) after a shared warm-up, so drift in machine load hits both alike.

Stages of the diffusers call come from hooks that read the clock (after a device sync): entering
text_encoder (``setup``), leaving text_encoder_2 (``text_encoders``), entering the UNet the first time
(``preprocess_vae_encode``: image/mask processing, VAE encode, latents), each step's
``callback_on_step_end`` (``unet_step_k``), the call's return (``vae_decode_postprocess``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cleanplate.errors import ErrorCode, InputError

from .common import StageClock, environment, fmt_ms, promo_payload, pyplot, save_figure, summarize_ms, with_environment

Say = Callable[[str], None]


def diffusers_pipeline(parts: Any) -> Any:
    """``StableDiffusionXLInpaintPipeline`` over ``parts`` (UNet, VAE, both text encoders and tokenizers)
    with ``LCMScheduler`` from the parts' scheduler config; no watermarker, no aesthetics score."""
    from diffusers import LCMScheduler, StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
        scheduler=LCMScheduler.from_config(parts.scheduler), requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_removal(pipe: Any, rgb: np.ndarray, mask: np.ndarray, *, resolution: int, steps: int, seed: int,
                      clock: StageClock | None = None) -> np.ndarray:
    """RORem-script removal: (H,W,3) uint8 RGB + (H,W) bool mask -> (H,W,3) uint8, the whole image resized to
    ``resolution`` for the model and the output resized back (nothing is pasted: every pixel changes)."""
    import torch
    from PIL import Image

    clock = clock or StageClock()
    device = pipe.unet.device
    hooks = []
    first_unet = [True]

    def on_te1(module: Any, args: Any) -> None:
        clock.mark("setup")

    def on_te2(module: Any, args: Any, output: Any) -> None:
        clock.mark("text_encoders")

    def on_unet(module: Any, args: Any) -> None:
        if first_unet[0]:
            first_unet[0] = False
            clock.mark("preprocess_vae_encode")

    def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        clock.mark(f"unet_step_{i + 1}")
        return kwargs

    hooks.append(pipe.text_encoder.register_forward_pre_hook(on_te1))
    hooks.append(pipe.text_encoder_2.register_forward_hook(on_te2))
    hooks.append(pipe.unet.register_forward_pre_hook(on_unet))
    h, w = mask.shape
    try:
        image = Image.fromarray(rgb).resize((resolution, resolution), Image.BICUBIC)
        mask_im = Image.fromarray(mask.astype(np.uint8) * 255).resize((resolution, resolution), Image.NEAREST)
        clock.mark("resize_in")
        out = pipe(prompt="", image=image, mask_image=mask_im, height=resolution, width=resolution,
                   num_inference_steps=steps, guidance_scale=1.0, strength=1.0, output_type="pil",
                   generator=torch.Generator(device=device).manual_seed(seed), callback_on_step_end=on_step).images[0]
        clock.mark("vae_decode_postprocess")
        result = np.asarray(out.resize((w, h), Image.BICUBIC))
        clock.mark("resize_back")
    finally:
        for hk in hooks:
            hk.remove()
    return result


def run_reference(*, arch: str = "bundle", bundle: str | Path | None = None, resolution: int | None = None,
                  image_size: int | None = None, steps: int = 4, device: str = "auto", dtype: str = "auto",
                  warmup: int = 2, repeats: int = 10, seed: int = 0, threads: int | None = None,
                  say: Say = lambda m: None) -> dict[str, Any]:
    """Time diffusers' SDXL-inpainting + LCM pipeline against cleanplate on the same parts; returns the report.

    Args:
        arch: "bundle" (``bundle``'s UNet + VAE, tiny random text encoders), "tiny" (a toy SDXL layout) or
            "sdxl" (full-size SDXL-inpainting architecture, random weights; CUDA only).
        resolution: model side R in px (default: the arch's: bundle's, 64, 512); image_size: the photo's
            side (default R). device: "auto" = CUDA when available; dtype: "auto" = fp16 on CUDA, else fp32.
    Raises:
        InputError: bad options; ``sdxl`` on a machine without CUDA.
    """
    import torch

    from cleanplate import imaging
    from cleanplate.pipeline import resolve_device

    from .latency import _torch_rep
    from .models import build_parts

    if warmup < 0 or repeats < 1 or not 1 <= steps <= 50:
        raise InputError("need warmup >= 0, repeats >= 1 and steps in 1..50", code=ErrorCode.BAD_OPTION)
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    if dtype == "auto":
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    t_start = time.perf_counter()
    parts = build_parts(arch, bundle=bundle, device=dev, dtype=dtype, seed=seed)
    say(f"built {arch} on {dev} ({dtype}): " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in parts.parameters.items()))
    r = resolution or parts.resolution
    f = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if r % max(8, f) or r < 16:
        raise InputError(f"resolution must be a multiple of {max(8, f)} px (diffusers' pipeline needs 8), got {r}",
                         code=ErrorCode.BAD_OPTION)
    size = image_size or r
    ref = diffusers_pipeline(parts)
    conditioning = parts.null_conditioning()
    ours = parts.removal_pipeline(conditioning, resolution=r, steps=steps)
    image_bytes, mask_bytes = promo_payload(size)
    image, mask = imaging.decode_image(image_bytes), imaging.decode_mask(mask_bytes)
    runs: dict[str, dict[str, list]] = {"diffusers": {"stages": [], "totals": []}, "cleanplate": {"stages": [], "totals": []}}
    outputs: dict[str, np.ndarray] = {}

    def one(name: str, clock: StageClock) -> np.ndarray:
        clock.start()
        if name == "diffusers":
            return diffusers_removal(ref, image.rgb, mask, resolution=r, steps=steps, seed=seed, clock=clock)
        return _torch_rep(ours, None, None, 1, steps, False, clock, seed, decoded=(image, mask))[0]

    with torch.inference_mode():
        for rep in range(warmup + repeats):
            order = ("diffusers", "cleanplate") if rep % 2 == 0 else ("cleanplate", "diffusers")
            for name in order:
                clock = StageClock.for_device(dev)
                outputs[name] = one(name, clock)
                if rep >= warmup:
                    runs[name]["stages"].append(dict(clock.stages))
                    runs[name]["totals"].append(clock.total_ms)
            if rep == warmup - 1 or (warmup == 0 and rep == 0):
                say("warm-up done")
    sides = {}
    for name, run in runs.items():
        stage_names = list(run["stages"][0])
        unet = [sum(v for k, v in s.items() if k.startswith("unet_step_")) for s in run["stages"]]
        sides[name] = {"total_ms": summarize_ms(run["totals"]),
                       "stages_ms": {k: summarize_ms([s[k] for s in run["stages"]]) for k in stage_names},
                       "unet_steps_ms": summarize_ms(unet), "output_shape": list(outputs[name].shape)}
    d, c = sides["diffusers"]["total_ms"], sides["cleanplate"]["total_ms"]
    report = {
        "harness": "reference",
        "settings": {"arch": arch, "model": parts.source if arch == "bundle" else f"random-weight {arch} architecture",
                     "parameters": parts.parameters, "text_widths": list(parts.text_widths), "resolution": r,
                     "image_size": size, "steps": steps, "device": str(dev), "dtype": dtype, "warmup": warmup,
                     "repeats": repeats, "seed": seed, "scheduler": "LCMScheduler", "guidance_scale": 1.0,
                     "strength": 1.0},
        "diffusers": sides["diffusers"], "cleanplate": sides["cleanplate"],
        "ratio_median": d["median"] / c["median"], "ratio_p95": d["p95"] / c["p95"],
        "wall_s": time.perf_counter() - t_start, "environment": environment(dev),
    }
    say(f"diffusers {fmt_ms(d['median'])} ms, cleanplate {fmt_ms(c['median'])} ms per removal: "
        f"x{report['ratio_median']:.2f}")
    return report


def to_markdown(report: dict[str, Any], command: str) -> str:
    s, d, c = report["settings"], report["diffusers"], report["cleanplate"]
    params = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in s["parameters"].items())
    lines = ["# Reference comparison: diffusers SDXL-inpainting + LCM vs cleanplate", "", f"`{command}`", "",
             f"Same weights ({s['model']}: {params}), same {s['steps']} LCM steps, guidance 1, strength 1, device "
             f"{s['device']} ({s['dtype']}), photo {s['image_size']} px, model side {s['resolution']} px; "
             f"{s['warmup']} warm-up + {s['repeats']} measured removals each, interleaved.", "",
             "| pipeline | median ms | p95 ms | p99 ms | UNet steps ms (median) |", "|---|---:|---:|---:|---:|"]
    for name, side in (("diffusers `StableDiffusionXLInpaintPipeline` (RORem 4-step script)", d),
                       ("cleanplate torch engine", c)):
        t = side["total_ms"]
        lines.append(f"| {name} | {fmt_ms(t['median'])} | {fmt_ms(t['p95'])} | {fmt_ms(t['p99'])} | "
                     f"{fmt_ms(side['unet_steps_ms']['median'])} |")
    lines += ["", f"**diffusers / cleanplate = {report['ratio_median']:.2f}x** (median), {report['ratio_p95']:.2f}x (p95).",
              "", "Median ms per stage:", "", "| diffusers stage | ms | | cleanplate stage | ms |", "|---|---:|---|---|---:|"]
    ds, cs = list(d["stages_ms"].items()), list(c["stages_ms"].items())
    for i in range(max(len(ds), len(cs))):
        left = f"{ds[i][0]} | {fmt_ms(ds[i][1]['median'])}" if i < len(ds) else " | "
        right = f"{cs[i][0]} | {fmt_ms(cs[i][1]['median'])}" if i < len(cs) else " | "
        lines.append(f"| {left} | | {right} |")
    lines += ["", "diffusers runs both text encoders on every call and processes the whole photo at the model size; "
              "cleanplate uses the empty-prompt conditioning computed once, crops the context window and pastes the "
              "result back bit-exactly outside the dilated mask."]
    return with_environment(lines, report["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: stacked median stage times of the two pipelines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab20")
    for x, name in enumerate(("diffusers", "cleanplate")):
        bottom = 0.0
        for i, (stage, v) in enumerate(report[name]["stages_ms"].items()):
            ax.bar(x, v["median"], bottom=bottom, color=cmap(i % 20), edgecolor="white", lw=0.5)
            if v["median"] > 0.06 * report[name]["total_ms"]["median"]:
                ax.text(x, bottom + v["median"] / 2, stage, ha="center", va="center", fontsize=7)
            bottom += v["median"]
    ax.set_xticks([0, 1], ["diffusers SDXL inpaint + LCM", "cleanplate"])
    s = report["settings"]
    ax.set(ylabel="median ms per removal",
           title=f"{s['arch']} @ {s['resolution']} px, {s['steps']} steps, {s['device']}: x{report['ratio_median']:.2f}")
    return [save_figure(fig, out.with_suffix(".png"))]
