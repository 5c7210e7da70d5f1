"""``cleanplate train detector`` (registered in :mod:`cleanplate.cli` with the other trainers)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from cleanplate.cli_options import BatchOpt, ConfigOpt, LrOpt, SeedOpt, StepsOpt, WorkOpt, say


def train_detector_cmd(
    config: ConfigOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="output detector/ directory")] = None,
    max_steps: StepsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None,
    work_dir: WorkOpt = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default 1)")] = None,
) -> None:
    """Overlay detector (promo text, watermarks, badges, logos -> removal mask) on synthetic data made on
    first run; threshold calibrated on held-out photos. Resumes from WORK_DIR/checkpoints."""
    from cleanplate.detector import DetectorConfig

    from .common import load_config
    from .detector import DetectorTrainConfig, train_detector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(DetectorTrainConfig, config, {"out": out, "max_steps": max_steps, "batch_size": batch_size,
                                                     "lr": lr, "seed": seed, "work_dir": work_dir, "threads": threads})
    result = train_detector(cfg)
    cal = result["calibration"]
    how = DetectorConfig.model_validate({k: cal[k] for k in ("threshold", "min_area", "grow_threshold",
                                                             "components")}).rule_text()
    seed = f", seed rule F1 {cal['seed_f1']:.3f}" if cal["components"] else ""
    conf = cal.get("fp_image_confidence")
    bound = f" (<= {cal['fp_image_bound']:.1%} with {conf:.0%} confidence)" if conf else ""
    say(f"{how} ({cal['rule']}{seed}): held-out F1 {cal['f1']:.3f}, negatives with a detection "
        f"{cal['fp_image_rate']:.1%}{bound}, false-positive area {cal['fp_area']:.3%}")
    say(f"wrote {cfg.out}")
