"""TensorRT engines from a ``cleanplate export onnx`` directory: one optimization profile per resolution
bucket and batch range (TensorRT 10 Python API: ``Builder``, ``OnnxParser``, ``IOptimizationProfile``).

The profile plan (:func:`plan_profiles`) is pure Python and testable anywhere; :func:`build_engines`
needs the ``tensorrt`` package and a CUDA GPU and raises :class:`TensorRTUnavailable` (CLI exit 2)
without them. A plan's profile *i* serves bucket *i*; Triton's config lists every profile for each
instance (``instance_group.profile``), and TensorRT picks the one the request's shape fits. The overlay
detector's input is not a bucket (any multiples of 32 up to its padded working size, non-square), so it
gets one profile of its own over that whole range (:func:`detector_profile`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanplate.errors import ErrorCode, InputError, TensorRTUnavailable
from cleanplate.imaging import write_atomic

from .onnx import GRAPHS, ExportError, TensorSpec, read_manifest

PROFILES_JSON = "profiles.json"
_PROFILE = re.compile(r"^(\d+):(\d+)-(\d+)-(\d+)$")


@dataclass(frozen=True)
class BatchRange:
    """One requested profile: square resolution in px and the batch sizes min <= opt <= max."""

    resolution: int
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Profile:
    """Shapes of every input of one graph for one optimization profile."""

    graph: str
    resolution: int
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)

    def as_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "resolution": self.resolution,
                "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()}}


def parse_profile(text: str, max_batch: int | None = None) -> BatchRange:
    """``"RES:MIN-OPT-MAX"`` (e.g. ``"1024:1-4-8"``) -> :class:`BatchRange`.

    Raises InputError: bad syntax, ``not 1 <= min <= opt <= max``, or max above ``max_batch``.
    """
    m = _PROFILE.match(text.strip())
    if not m:
        raise InputError(f"profile {text!r} is not RES:MIN-OPT-MAX, e.g. 1024:1-4-8", code=ErrorCode.BAD_OPTION)
    res, lo, opt, hi = (int(g) for g in m.groups())
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"profile {text!r}: need 1 <= min <= opt <= max", code=ErrorCode.BAD_OPTION)
    if max_batch is not None and hi > max_batch:
        raise InputError(f"profile {text!r}: max batch {hi} is above the export's max_batch {max_batch}",
                         code=ErrorCode.BAD_OPTION)
    return BatchRange(res, lo, opt, hi)


def default_ranges(buckets: Sequence[int], max_batch: int) -> list[BatchRange]:
    """Every bucket with batch 1..max_batch, optimized for max(1, max_batch // 2)."""
    return [BatchRange(r, 1, max(1, max_batch // 2), max_batch) for r in buckets]


def profiles_for_graph(graph: str, inputs: Sequence[TensorSpec], ranges: Sequence[BatchRange],
                       vae_scale_factor: int) -> list[Profile]:
    """One :class:`Profile` per range: each input's (min, opt, max) shape at that resolution."""
    out = []
    for r in ranges:
        shapes = {t.name: (t.shape(r.min, r.resolution, vae_scale_factor), t.shape(r.opt, r.resolution, vae_scale_factor),
                           t.shape(r.max, r.resolution, vae_scale_factor)) for t in inputs}
        out.append(Profile(graph, r.resolution, shapes))
    return out


def detector_profile(inputs: Sequence[TensorSpec], side: int, stride: int, max_batch: int) -> Profile:
    """The detector's one profile: sides from ``stride`` to ``side`` (its padded working size, optimized for
    side x side, what a photo's long side becomes), batch 1..max_batch optimized for max(1, max_batch // 2).
    ``resolution`` records ``side``."""
    opt = max(1, max_batch // 2)
    shapes = {t.name: (t.shape(1, stride, stride), t.shape(opt, side, stride), t.shape(max_batch, side, stride))
              for t in inputs}
    return Profile("detector", side, shapes)


def plan_profiles(onnx_dir: str | Path, profiles: Sequence[str] | None = None, *,
                  graphs: Sequence[str] | None = None) -> dict[str, list[Profile]]:
    """The optimization profiles to build for each graph of an ONNX export.

    Args:
        onnx_dir: a ``cleanplate export onnx`` directory (its ``export.json``).
        profiles: ``RES:MIN-OPT-MAX`` strings (default: :func:`default_ranges` over the export's buckets);
            they do not apply to the detector, which always gets :func:`detector_profile`.
        graphs: a subset of the exported graphs (default: all).
    Raises:
        InputError: a bad profile string, a profile resolution outside the export's buckets, or an
            unknown graph.
    """
    manifest = read_manifest(onnx_dir)
    f, max_batch = int(manifest["vae_scale_factor"]), int(manifest["max_batch"])
    ranges = [parse_profile(p, max_batch) for p in profiles] if profiles else \
        default_ranges(manifest["buckets"], max_batch)
    for r in ranges:
        if r.resolution not in manifest["buckets"]:
            raise InputError(f"profile resolution {r.resolution} is not one of the exported buckets "
                             f"{manifest['buckets']}", code=ErrorCode.BAD_OPTION)
    wanted = list(graphs or manifest["graphs"])
    unknown = [g for g in wanted if g not in manifest["graphs"]]
    if unknown:
        raise InputError(f"graphs {unknown} are not in {onnx_dir} (it has {sorted(manifest['graphs'])})",
                         code=ErrorCode.BAD_OPTION)
    plan = {}
    for g in wanted:
        inputs = [TensorSpec(t["name"], tuple(t["dims"]), t["dtype"]) for t in manifest["graphs"][g]["inputs"]]
        if g == "detector":
            det = manifest["detector"]
            plan[g] = [detector_profile(inputs, int(det["side"]), int(det["stride"]), max_batch)]
        else:
            plan[g] = profiles_for_graph(g, inputs, ranges, f)
    return plan


def _require_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable("TensorRT is not installed here (pip install tensorrt, on a machine with an NVIDIA "
                                  "GPU and driver); `--plan-only` shows the profiles without building") from exc
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines are built on the GPU they will run on; no CUDA GPU is visible "
                                  "here")
    return trt


def build_engines(onnx_dir: str | Path, out_dir: str | Path, plan: dict[str, list[Profile]], *,
                  precision: str = "fp16", workspace_gib: float = 8.0,
                  progress: Callable[[str], None] | None = None) -> list[Path]:
    """Build ``<graph>.plan`` for each graph of ``plan`` into ``out_dir`` and write ``profiles.json``.

    ``precision``: "fp32", "fp16" or "bf16" (builder flags; TensorRT keeps fp32 where a layer needs it).
    Raises TensorRTUnavailable (no package or GPU), InputError (bad precision), ExportError (parse or
    build failure, with TensorRT's messages).
    """
    if precision not in ("fp32", "fp16", "bf16"):
        raise InputError(f"precision must be fp32, fp16 or bf16, got {precision!r}", code=ErrorCode.BAD_OPTION)
    trt = _require_tensorrt()
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    written = []
    for graph, profiles in plan.items():
        say(f"building {graph}.plan ({precision}, {len(profiles)} profiles)")
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(Path(onnx_dir) / f"{graph}.onnx")):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT could not parse {graph}.onnx: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        for p in profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in p.shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise ExportError(f"TensorRT failed to build {graph} (see the messages above)")
        path = out / f"{graph}.plan"
        write_atomic(path, bytes(engine))
        written.append(path)
    write_atomic(out / PROFILES_JSON, json.dumps({g: [p.as_dict() for p in ps] for g, ps in plan.items()},
                                                 indent=2).encode())
    return written


__all__ = ["GRAPHS", "BatchRange", "Profile", "TensorRTUnavailable", "build_engines", "default_ranges",
           "detector_profile", "parse_profile", "plan_profiles", "profiles_for_graph"]
