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
    from .common import load_config
    from .detector import DetectorTrainConfig, train_detector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(DetectorTrainConfig, config, {"out": out, "max_steps": max_steps, "batch_size": batch_size,
                                                     "lr": lr, "seed": seed, "work_dir": work_dir, "threads": threads})
    result = train_detector(cfg)
    cal = result["calibration"]
    rule = cal["components"]
    how = (f"component rule, candidates at {rule['candidate_threshold']:g}, kept at score {rule['threshold']:g} "
           f"(seed rule: F1 {cal['seed_f1']:.3f})" if rule else
           f"threshold {cal['threshold']:.2f}, min_area {cal['min_area']} px ({cal['rule']})")
    say(f"{how}: held-out F1 {cal['f1']:.3f}, negatives with a detection {cal['fp_image_rate']:.1%}, "
        f"false-positive area {cal['fp_area']:.3%}")
    say(f"wrote {cfg.out}")
