"""The options of one removal, declared once: :class:`RemovalOptions` holds each option's range and meaning.

The others derive from it: the batch job's per-item :class:`~cleanplate.batch.items.ItemOptions` (a
subclass), :class:`~cleanplate.removal.RemoveOptions` (the resolved form :func:`~cleanplate.removal.run_removal`
takes, made by :func:`resolved_field`), the gateway's form fields (:func:`form_bounds`) and the help texts of
``cleanplate remove`` and ``cleanplate batch run`` (:func:`option_help`). :class:`~cleanplate.remover.RemovalRequest`
carries ``dilate_px``, ``seed`` and ``steps`` with the same meaning.

Light on purpose (pydantic only): the CLI reads it when it builds its options.
"""

from __future__ import annotations

from typing import Any

from annotated_types import Ge, Le
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

MAX_SEED = 2**31 - 1
MAX_STEPS = 50  # the sampler's bound (pipeline.MAX_STEPS)
MAX_DILATE_PX = 512
MAX_ATTEMPTS = 16  # the batch job's and the gateway settings' bound; the gateway's request limit is its setting


class RemovalOptions(BaseModel):
    """Options of one removal; None = the caller's default, then the bundle's (engine's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="noise seed of the first attempt")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="LCM steps (default: the bundle's)")
    dilate_px: int | None = Field(None, ge=0, le=MAX_DILATE_PX,
                                  description="mask dilation radius in px (default: the bundle's)")
    quality_gate: bool | None = Field(None, description="score with the discriminator, retry, review")
    threshold: float | None = Field(None, ge=0, le=1, description="gate threshold (default: calibrated)")
    max_attempts: int | None = Field(None, ge=1, le=MAX_ATTEMPTS, description="gate attempts, seed+1 each")


OPTION_FIELDS = tuple(RemovalOptions.model_fields)


def form_bounds(name: str, *, upper: bool = True) -> dict[str, Any]:
    """``ge``, ``le`` and ``description`` of option ``name``, as keyword arguments of a pydantic/FastAPI
    ``Field``/``Form``; ``upper=False`` leaves the upper bound to the caller (the gateway's max_attempts)."""
    info = RemovalOptions.model_fields[name]
    out: dict[str, Any] = {"description": info.description}
    for m in info.metadata:
        if isinstance(m, Ge):
            out["ge"] = m.ge
        elif isinstance(m, Le) and upper:
            out["le"] = m.le
    return out


def option_help(name: str) -> str:
    """The help text of option ``name`` (its description)."""
    return RemovalOptions.model_fields[name].description or name


def resolved_field(name: str, default: Any, *, upper: bool = True) -> FieldInfo:
    """Option ``name``'s field with a concrete ``default`` (for a model whose options are resolved)."""
    return Field(default, **form_bounds(name, upper=upper))
