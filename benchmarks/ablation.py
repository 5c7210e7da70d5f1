"""SFT objective ablation (``cleanplate bench ablation``): which choice of :mod:`cleanplate.training.sft` buys
how many dB, at equal cost.

Every arm is the base SFT config (``training/configs/default_sft.json``) with a few keys changed, trained for
the same number of steps on the same first ``items`` training items (seeded, cached latents where the base
caches them), from the same VAE, and judged the same way: real N-step removals through the production path
(:func:`cleanplate.training.sft.evaluate_removals`) on the base config's ``eval_meta``, mean in-mask PSNR and
SSIM of the last evaluation. Each arm is a ``cleanplate train sft`` subprocess (one accelerate state per
process) with its own work dir under ``WORK``, so an interrupted ablation resumes arm by arm.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cleanplate.errors import ErrorCode, InputError

from .common import environment, pyplot, save_figure, with_environment

# name -> (description, overrides of the base config)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "rorem": ("RORem's objective: ε, zero fill, uniform t, unweighted",
              {"prediction_type": "epsilon", "masked_source": "zero", "decode_residual": False, "timesteps": "uniform",
               "mask_weight": 1.0}),
    "x0": ("x0 prediction, zero fill, uniform t, unweighted",
           {"prediction_type": "sample", "masked_source": "zero", "decode_residual": False, "timesteps": "uniform",
            "mask_weight": 1.0}),
    "x0_telea": ("x0 + Telea-prefilled conditioning",
                 {"prediction_type": "sample", "masked_source": "telea", "decode_residual": False,
                  "timesteps": "uniform", "mask_weight": 1.0}),
    "x0_telea_residual": ("x0 + Telea prefill + residual decode",
                          {"prediction_type": "sample", "masked_source": "telea", "decode_residual": True,
                           "timesteps": "uniform", "mask_weight": 1.0}),
    "default": ("the default bundle's objective (base config as is)", {}),
    "default_minsnr": ("default + Min-SNR-5 weighting", {"min_snr_gamma": 5.0}),
    "default_ema": ("default + EMA 0.999", {"ema_decay": 0.999}),
}


def _arm_config(base: dict[str, Any], name: str, overrides: dict[str, Any], work: Path, meta: Path, steps: int,
                eval_every: int) -> Path:
    cfg = {**base, **overrides, "meta": [str(meta)], "out": str(work / name), "max_steps": steps,
           "eval_every": eval_every, "checkpoint_every": max(1, min(base.get("checkpoint_every", 250), steps)),
           "warmup_steps": min(base.get("warmup_steps", 50), max(1, steps // 10)), "cache_dir": str(work / "cache")}
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_ablation(base_config: Path, work: Path, *, steps: int, items: int, arms: list[str], eval_every: int | None,
                 say: Any = print) -> dict[str, Any]:
    """Train every arm (skipping those already done) and collect their evaluations.

    Raises InputError: unknown arm, unreadable base config, or a trainer that failed.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise InputError(f"unknown arms {unknown}; choose from {sorted(ARMS)}", code=ErrorCode.BAD_OPTION)
    try:
        base = json.loads(base_config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {base_config}: {exc}", code=ErrorCode.BAD_OPTION) from exc
    work.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    for meta in base["meta"]:
        root = Path(meta).resolve().parent
        entries += [{k: (str(root / v) if k in ("source", "mask", "GT") else v) for k, v in e.items()}
                    for e in json.loads(Path(meta).read_text())]
    subset = work / "train_subset.json"
    subset.write_text(json.dumps(entries[:items]))
    results: dict[str, Any] = {}
    for name in arms:
        desc, overrides = ARMS[name]
        cfg_path = _arm_config(base, name, overrides, work, subset, steps, eval_every or steps)
        best = work / f"{name}.work" / "best.json"
        t0 = time.perf_counter()
        if not (work / name / "bundle.json").is_file():
            say(f"arm {name}: {desc}")
            done = subprocess.run([sys.executable, "-m", "cleanplate.cli", "train", "sft", "--config", str(cfg_path)])
            if done.returncode != 0:
                raise InputError(f"arm {name} failed (exit {done.returncode})", code=ErrorCode.BAD_OPTION)
        history = json.loads(best.read_text())["history"]
        results[name] = {"description": desc, "overrides": overrides, "evals": history, "last": history[-1],
                         "wall_s": time.perf_counter() - t0}
    return {"harness": "ablation", "base_config": str(base_config), "steps": steps, "items": items,
            "eval_meta": base.get("eval_meta"), "arms": results, "environment": environment("cpu")}


def to_markdown(report: dict[str, Any], command: str) -> str:
    lines = [f"# SFT objective ablation ({report['steps']} steps, first {report['items']} training items)", "",
             f"`{command}`", "",
             f"Base config `{report['base_config']}`; every arm changes only the keys shown. Judged by real removals "
             f"through the production path on `{', '.join(report['eval_meta'] or [])}` (mean in-mask PSNR / SSIM at "
             "the last evaluation; higher is better).", "",
             "| arm | what changes | PSNR in mask (dB) | SSIM in mask | Δ PSNR vs RORem |", "|---|---|---:|---:|---:|"]
    arms = report["arms"]
    ref = arms.get("rorem", {}).get("last", {}).get("psnr_mask_db")
    for name, a in arms.items():
        last = a["last"]
        delta = "-" if ref is None else f"{last['psnr_mask_db'] - ref:+.2f}"
        lines.append(f"| {name} | {a['description']} | {last['psnr_mask_db']:.2f} | {last['ssim_mask']:.3f} | {delta} |")
    return with_environment(lines, report["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: eval PSNR in mask against training step, one line per arm."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, a in report["arms"].items():
        ax.plot([e["step"] for e in a["evals"]], [e["psnr_mask_db"] for e in a["evals"]], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("PSNR in mask (dB)")
    ax.legend(fontsize=8)
    ax.set_title("SFT ablation: eval through the production path")
    return [save_figure(fig, out.with_suffix(".png"))]
