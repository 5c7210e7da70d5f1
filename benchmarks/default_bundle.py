"""Quality and CPU latency of a bundle on the held-out dev set; writes JSON + markdown.

Superseded by ``cleanplate bench quality`` (PSNR and SSIM in the mask and whole, bit-exactness, the
discriminator's success rate, any engine) and ``cleanplate bench latency`` (per stage, per resolution and
batch); kept because ``benchmarks/results/default_bundle.md`` was made with it.

Quality: PSNR inside the (undilated) mask against the GT, per item, for
  * ``identity``      leave the image as it is (the floor);
  * ``telea``         OpenCV's Telea inpainting (``cv2.inpaint``, radius 3) on the mask as given;
  * ``telea_dilated`` the same on the mask dilated like cleanplate's;
  * each bundle given: the full cleanplate removal (dilate, crop, 4 LCM steps, paste back).
Also checks that every pixel outside the dilated mask is bit-exact the source.

Latency: one 512x512 removal (astronaut photo, a promo-sized mask) with the full flow, after warm-up;
median and p90 of wall time in ms, plus the per-stage split reported by the remover.

Usage::

    python -m cleanplate.benchmarks.default_bundle --set runs/data/dev/meta.json \
        --bundle cleanplate/default_bundle --bundle runs/default/sft --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from cleanplate.training.common import read_meta
from tqdm import tqdm

from cleanplate import imaging
from cleanplate.bundle import default_bundle_path
from cleanplate.pipeline import RemovalPipeline
from cleanplate.remover import remove

from .quality import psnr_in_mask, telea  # the metrics live with `cleanplate bench quality`


def quality(meta: Path, bundles: list[Path], seed: int) -> dict:
    """Per-method PSNR (dB) inside the mask over a RORem meta.json set, bit-exactness, wins over Telea."""
    items = read_meta([meta])
    pipes = {str(b): RemovalPipeline.from_bundle(b) for b in bundles}
    dilate = {name: p.config.dilate_px for name, p in pipes.items()}
    scores: dict[str, list[float]] = {"identity": [], "telea": [], "telea_dilated": []} | {n: [] for n in pipes}
    exact = {n: True for n in pipes}
    telea_dilate_px = next(iter(pipes.values())).config.dilate_px  # telea_dilated uses the first bundle's radius
    for item in tqdm(items, desc="quality", mininterval=5):
        src = imaging.decode_image(item.source)
        gt = imaging.decode_image(item.gt).rgb
        mask = imaging.decode_mask(item.mask)
        dilated = imaging.dilate_mask(mask, telea_dilate_px)
        scores["identity"].append(psnr_in_mask(src.rgb, gt, mask))
        scores["telea"].append(psnr_in_mask(telea(src.rgb, mask), gt, mask))
        scores["telea_dilated"].append(psnr_in_mask(telea(src.rgb, dilated), gt, mask))
        for name, pipe in pipes.items():
            res = remove(pipe, src, mask, seed=seed)
            scores[name].append(psnr_in_mask(res.pixels, gt, mask))
            exact[name] &= bool(np.array_equal(res.pixels[~res.dilated], src.pixels[~res.dilated]))
    summary = {
        name: {"psnr_mask_mean_db": statistics.fmean(v), "psnr_mask_median_db": statistics.median(v),
               "n": len(v), "dilate_px": dilate.get(name), "bit_exact_outside_dilated_mask": exact.get(name)}
        for name, v in scores.items()
    }
    wins = {n: int(sum(a > b for a, b in zip(scores[n], scores["telea"]))) for n in pipes}
    return {"set": str(meta), "seed": seed, "methods": summary, "items_better_than_telea": wins}


def latency(bundle: Path, repeats: int, seed: int) -> dict:
    """Wall time (ms) of full 512x512 removals after 3 warm-up runs: median, p90 and per-stage medians."""
    from skimage import data

    pipe = RemovalPipeline.from_bundle(bundle)
    image = imaging.decode_image(cv2.imencode(".png", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes())
    mask = np.zeros((512, 512), bool)
    mask[60:130, 150:400] = True  # a promo banner-sized region, 250x70 px
    for _ in range(3):
        remove(pipe, image, mask, seed=seed)
    walls, stages = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = remove(pipe, image, mask, seed=seed)
        walls.append((time.perf_counter() - t0) * 1000)
        stages.append(res.timings_ms)
    walls.sort()
    return {
        "bundle": str(bundle), "image": "astronaut 512x512", "steps": pipe.config.steps,
        "model_resolution": pipe.resolution, "repeats": repeats,
        "wall_ms_median": statistics.median(walls), "wall_ms_p90": walls[int(0.9 * (len(walls) - 1))],
        "stage_ms_median": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
    }


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cpu"}


def to_markdown(result: dict) -> str:
    q, lat = result["quality"], result["latency"]
    lines = ["# Default bundle: quality and CPU latency", "",
             f"Dev set `{q['set']}` ({next(iter(q['methods'].values()))['n']} items, held-out scikit-image "
             f"photos with synthetic overlays). PSNR inside the mask against the GT, higher is better.", "",
             "| method | mean PSNR (dB) | median PSNR (dB) | bit-exact outside dilated mask | items better than Telea |",
             "|---|---:|---:|---|---:|"]
    for name, m in q["methods"].items():
        exact = "" if m["bit_exact_outside_dilated_mask"] is None else ("yes" if m["bit_exact_outside_dilated_mask"] else "NO")
        wins = q["items_better_than_telea"].get(name, "")
        lines.append(f"| {name} | {m['psnr_mask_mean_db']:.2f} | {m['psnr_mask_median_db']:.2f} | {exact} | {wins} |")
    lines += ["", f"CPU latency, one {lat['image']} removal, {lat['steps']} steps at model resolution "
              f"{lat['model_resolution']}, {lat['repeats']} runs after warm-up: median **{lat['wall_ms_median']:.0f} ms**, "
              f"p90 {lat['wall_ms_p90']:.0f} ms; stages (median ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in lat["stage_ms_median"].items()) + ".", "",
              f"Environment: {json.dumps(result['environment'])}", "", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="dev meta.json")
    parser.add_argument("--bundle", type=Path, action="append", help="bundle(s) to evaluate (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="default_bundle")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundles = args.bundle or [default_bundle_path()]
    result = {"quality": quality(args.set, bundles, args.seed), "latency": latency(bundles[0], args.repeats, args.seed),
              "environment": environment(),
              "command": "python -m cleanplate.benchmarks.default_bundle " + " ".join(
                  [f"--set {args.set}"] + [f"--bundle {b}" for b in (args.bundle or [])])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
