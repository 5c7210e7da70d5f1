"""What the command lines share: :func:`say` (every ``cleanplate`` command's status lines), and the typer
option types of the trainer commands (``cleanplate train ...`` in :mod:`cleanplate.cli` and
:mod:`cleanplate.training.rl_cli`): one definition, so the commands read and document them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def say(message: str) -> None:
    """Print one status line on stderr, leaving stdout to a command's results (markdown, JSON)."""
    typer.echo(message, err=True)

ConfigOpt = Annotated[Optional[Path], typer.Option(help="JSON config (fields of the trainer's config); options override it")]
MetaOpt = Annotated[Optional[list[Path]], typer.Option(help="RORem meta.json file (repeatable)")]
OutOpt = Annotated[Optional[Path], typer.Option(help="output directory")]
StepsOpt = Annotated[Optional[int], typer.Option(help="optimizer steps")]
BatchOpt = Annotated[Optional[int], typer.Option(help="batch size per device")]
LrOpt = Annotated[Optional[float], typer.Option(help="learning rate")]
ResOpt = Annotated[Optional[int], typer.Option(help="training resolution in px")]
SeedOpt = Annotated[Optional[int], typer.Option(help="seed")]
WorkOpt = Annotated[Optional[Path], typer.Option(help="checkpoints/logs directory (default OUT.work)")]
