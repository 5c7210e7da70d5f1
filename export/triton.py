"""A Triton Inference Server model repository for a bundle (DESIGN.md, "Engines": triton).

Layout (``cleanplate export triton BUNDLE --out REPO --backend B``)::

    REPO/vae_encoder/    config.pbtxt, 1/model.onnx | 1/model.plan | 1/model.py + 1/model.onnx
    REPO/unet/           the LCM-LoRA-fused UNet, same three forms
    REPO/vae_decoder/
    REPO/discriminator/  when the bundle has one
    REPO/detector/       the overlay detector's network, when the bundle has one: image (B,3,H,W) FP32 in [0,1]
                         -> logits (B,1+K,H,W); parameter ``detector_config`` is its DetectorConfig as JSON
    REPO/cleanplate_remove/  BLS python model: the whole N-step removal inside Triton
                             (1/model.py, 1/sampling.py, 1/masked_source.py, 1/graph_removal.py, 1/schedules.json,
                             1/null_conditioning.npz)
    REPO/cleanplate_score/   BLS python model: discriminator score of (source, result, mask) crops

Every ``config.pbtxt`` is built as Triton's ``ModelConfig`` protobuf (tritonclient's
``model_config_pb2``), written with ``text_format`` and parsed back by :func:`validate_repository`.
Graph models get dynamic batching with a queue delay and ``max_batch_size``; graph inputs or outputs
that are (B,) in the graph (timestep, score) are (B,1) to clients via ``reshape``. The BLS models'
``parameters`` carry what a client needs (resolution, buckets, steps, dilation, gate threshold), so the
gateway's triton engine needs no bundle, and what the removal needs from the bundle: ``masked_source``
(the conditioning fill, zero or telea) and, for reference, ``prediction_type`` (the sampler reads it
from ``schedules.json``, which the bundle's scheduler config produced).

The ``detector`` model is called by the triton engine itself (:meth:`cleanplate.triton_engine.TritonEngine.detect`,
which runs :meth:`Detector.preprocess` / :meth:`Detector.postprocess` around it with ``detector_config``), not by
a BLS model: ``cleanplate_remove`` takes model crops, cut by the gateway around the mask, so the mask has to exist
before the removal request is made.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cleanplate.errors import ErrorCode, InputError
from cleanplate.graph_removal import gate_pixels
from cleanplate.imaging import write_atomic
from cleanplate.pipeline import MAX_STEPS

from .onnx import GRAPHS, ExportError, export_onnx, read_manifest

Backend = Literal["tensorrt", "onnxruntime", "python"]
BACKENDS: tuple[str, ...] = ("tensorrt", "onnxruntime", "python")
REMOVE_MODEL, SCORE_MODEL, DETECTOR_MODEL = "cleanplate_remove", "cleanplate_score", "detector"
MODELS_DIR = Path(__file__).parent / "triton_models"


def _mc() -> Any:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


@dataclass(frozen=True)
class RepositoryOptions:
    """How the repository's models are scheduled.

    Attributes:
        backend: "tensorrt" (model.plan, GPU), "onnxruntime" (model.onnx) or "python" (onnxruntime in
            the python backend, for servers without those backends).
        max_batch: ``max_batch_size`` of every model (the dynamic batcher's bound), >= 1.
        queue_delay_us: ``max_queue_delay_microseconds`` of the dynamic batchers, >= 0.
        instances: model instances per graph (per GPU on GPU), >= 1.
        bls_instances: instances of each BLS model (each runs one batch's loop at a time), >= 1.
        max_queue: per-model queue bound; past it Triton rejects with UNAVAILABLE (0 = unbounded).
        intra_op_threads: onnxruntime threads per python-backend instance (0 = onnxruntime's default).
    """

    backend: Backend = "onnxruntime"
    max_batch: int = 8
    queue_delay_us: int = 2000
    instances: int = 1
    bls_instances: int = 2
    max_queue: int = 64
    intra_op_threads: int = 0

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, got {self.backend!r}", code=ErrorCode.BAD_OPTION)
        for name in ("max_batch", "instances", "bls_instances"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}", code=ErrorCode.BAD_OPTION)
        for name in ("queue_delay_us", "max_queue", "intra_op_threads"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}", code=ErrorCode.BAD_OPTION)


# -- config.pbtxt -------------------------------------------------------------------------------------
def _dims(dims: Sequence[int | str]) -> tuple[list[int], bool]:
    """Graph dims without the batch axis -> Triton dims (-1 = dynamic) and whether a reshape is needed."""
    rest = [d if isinstance(d, int) else -1 for d in dims[1:]]
    return (rest, False) if rest else ([1], True)


def _add_tensors(repeated: Any, specs: Sequence[dict[str, Any]], use_reshape: bool) -> None:
    mc = _mc()
    for spec in specs:
        tensor = repeated.add()
        tensor.name = spec["name"]
        tensor.data_type = mc.DataType.Value(f"TYPE_{spec['dtype']}")
        dims, needs_reshape = _dims(spec["dims"])
        tensor.dims.extend(dims)
        if needs_reshape and use_reshape:
            tensor.reshape.SetInParent()  # (B,1) to clients, (B,) in the graph


def _scheduling(config: Any, opts: RepositoryOptions, kind: str, count: int,
                profiles: Sequence[int] = ()) -> None:
    mc = _mc()
    config.max_batch_size = opts.max_batch
    config.dynamic_batching.max_queue_delay_microseconds = opts.queue_delay_us
    if opts.max_queue:
        config.dynamic_batching.default_queue_policy.max_queue_size = opts.max_queue
    group = config.instance_group.add()
    group.kind = mc.ModelInstanceGroup.Kind.Value(kind)
    group.count = count
    group.profile.extend(str(p) for p in profiles)


def graph_config(name: str, graph: dict[str, Any], opts: RepositoryOptions, n_profiles: int = 1) -> Any:
    """``ModelConfig`` of one exported graph (an entry of ``export.json``'s ``graphs``)."""
    mc = _mc()
    config = mc.ModelConfig(name=name)
    if opts.backend == "tensorrt":
        config.platform = "tensorrt_plan"
        kind, profiles = "KIND_GPU", range(n_profiles)
    elif opts.backend == "onnxruntime":
        config.backend = "onnxruntime"
        kind, profiles = "KIND_AUTO", ()
    else:
        config.backend = "python"
        kind, profiles = "KIND_CPU", ()
        config.parameters["onnx_file"].string_value = "model.onnx"
        config.parameters["intra_op_threads"].string_value = str(opts.intra_op_threads)
    use_reshape = opts.backend != "python"  # the python runner reshapes (B,1) <-> (B,) itself
    _add_tensors(config.input, graph["inputs"], use_reshape)
    _add_tensors(config.output, graph["outputs"], use_reshape)
    _scheduling(config, opts, kind, opts.instances, profiles)
    return config


def bls_config(name: str, manifest: dict[str, Any], opts: RepositoryOptions, graph_names: dict[str, str],
               removal: dict[str, str] | None = None) -> Any:
    """``ModelConfig`` of ``cleanplate_remove`` or ``cleanplate_score`` (python backend, CPU instances).

    ``removal``: parameters of ``cleanplate_remove`` taken from the bundle rather than the ONNX manifest
    (``masked_source``, ``prediction_type``, ``decode_residual``); default: the manifest's, else zero /
    epsilon / off.
    """
    mc = _mc()
    config = mc.ModelConfig(name=name, backend="python")
    u8, tensors = mc.TYPE_UINT8, []
    if name == REMOVE_MODEL:
        tensors = [("input", "image", u8, [-1, -1, 3]), ("input", "mask", u8, [-1, -1]),
                   ("input", "seed", mc.TYPE_INT64, [1]), ("input", "steps", mc.TYPE_INT32, [1]),
                   ("output", "result", u8, [-1, -1, 3])]
    else:
        tensors = [("input", "source", u8, [-1, -1, 3]), ("input", "result", u8, [-1, -1, 3]),
                   ("input", "mask", u8, [-1, -1]), ("output", "score", mc.TYPE_FP32, [1])]
    for where, tname, dtype, dims in tensors:
        tensor = getattr(config, where).add()
        tensor.name, tensor.data_type = tname, dtype
        tensor.dims.extend(dims)
    params = {
        "mode": "remove" if name == REMOVE_MODEL else "score",
        "resolution": manifest["resolution"], "buckets": ",".join(str(r) for r in manifest["buckets"]),
        "vae_scale_factor": manifest["vae_scale_factor"], "latent_channels": manifest["latent_channels"],
        "default_steps": manifest["steps"], "max_steps": MAX_STEPS, "dilate_px": manifest["dilate_px"],
        "graph_max_batch": opts.max_batch, "bundle_name": manifest["bundle_name"],
        **{f"{graph}_model": model for graph, model in graph_names.items()},
    }
    if name == REMOVE_MODEL:
        params["masked_source"] = manifest.get("masked_source", "zero")
        params["prediction_type"] = manifest.get("prediction_type", "epsilon")
        params["decode_residual"] = str(int(bool(manifest.get("decode_residual", False))))
        params["residual_scale"] = repr(float(manifest.get("residual_scale", 1.0)))
        params.update(removal or {})
    if manifest.get("threshold") is not None:
        params["threshold"] = manifest["threshold"]
    if gate_pixels(manifest):  # the discriminator graph takes the crops too (pixel statistics)
        params["gate_pixels"] = "1"
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    _scheduling(config, opts, "KIND_CPU", opts.bls_instances)
    return config


def write_config(model_dir: Path, config: Any) -> None:
    from google.protobuf import text_format

    model_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(model_dir / "config.pbtxt", text_format.MessageToString(config).encode())


# -- the repository -----------------------------------------------------------------------------------
def export_triton(bundle: str | Path | None, out_repo: str | Path, opts: RepositoryOptions = RepositoryOptions(), *,
                  onnx_dir: str | Path | None = None, plan_dir: str | Path | None = None,
                  progress: Callable[[str], None] | None = None) -> list[str]:
    """Write a Triton model repository for ``bundle`` into ``out_repo`` and validate it.

    Args:
        bundle: bundle directory (None: the default bundle); gives the null conditioning, the scheduler
            (``schedules.json``, whose steps carry its prediction_type) and the ``masked_source`` fill.
        out_repo: the repository directory (created; models already in it are replaced).
        opts: backend and scheduling, see :class:`RepositoryOptions`.
        onnx_dir: a ``cleanplate export onnx`` directory to reuse (default: export now, parity-checked).
        plan_dir: for ``backend="tensorrt"``: a ``cleanplate export tensorrt`` directory (``<graph>.plan``).
    Returns:
        The model names written.
    Raises:
        InputError: bad options, a missing plan directory or plan file. ExportError: export or validation failed.
    """
    from cleanplate.bundle import NULL_CONDITIONING, NullConditioning, default_bundle_path, read_config
    from cleanplate.sampling import schedule_table_json

    opts.check()
    say = progress or (lambda msg: None)
    if opts.backend == "tensorrt" and plan_dir is None:
        raise InputError("--backend tensorrt needs --plans DIR from `cleanplate export tensorrt` (built on a GPU)",
                         code=ErrorCode.BAD_OPTION)
    repo = Path(out_repo)
    with tempfile.TemporaryDirectory(prefix="cleanplate-onnx-") as tmp:
        if onnx_dir is None:
            say("exporting ONNX graphs")
            export_onnx(bundle, tmp, max_batch=opts.max_batch, progress=say)
            onnx_dir = tmp
        manifest = read_manifest(onnx_dir)
        if manifest["max_batch"] < opts.max_batch:
            raise InputError(f"the ONNX export allows batch <= {manifest['max_batch']}, below --max-batch "
                             f"{opts.max_batch}", code=ErrorCode.BAD_OPTION)
        graphs = manifest["graphs"]
        plan_profiles: dict[str, Any] = {}
        if opts.backend == "tensorrt":
            missing = [f"{g}.plan" for g in graphs if not (Path(plan_dir) / f"{g}.plan").exists()]
            if missing:  # before anything is written: no half-built repository
                raise InputError(f"{', '.join(missing)} missing in {plan_dir}; build with `cleanplate export tensorrt`",
                                 code=ErrorCode.BAD_OPTION)
            profiles_file = Path(plan_dir) / "profiles.json"
            plan_profiles = json.loads(profiles_file.read_text()) if profiles_file.exists() else {}
        repo.mkdir(parents=True, exist_ok=True)
        for name, graph in graphs.items():
            model_dir = repo / name
            version = model_dir / "1"
            if version.exists():
                shutil.rmtree(version)
            version.mkdir(parents=True)
            if opts.backend == "tensorrt":
                shutil.copy2(Path(plan_dir) / f"{name}.plan", version / "model.plan")
            else:
                files = graph["files"]
                main = f"{name}.onnx"
                shutil.copy2(Path(onnx_dir) / main, version / "model.onnx")
                for extra in files:  # external weights keep the name the .onnx refers to
                    if extra != main:
                        shutil.copy2(Path(onnx_dir) / extra, version / extra)
                if opts.backend == "python":
                    shutil.copy2(MODELS_DIR / "onnx_runner.py", version / "model.py")
            config = graph_config(name, graph, opts, len(plan_profiles.get(name, [None])))
            if name == "detector":  # the triton engine's preprocess/postprocess need the calibrated config
                config.parameters["detector_config"].string_value = json.dumps(manifest["detector"]["config"])
            write_config(model_dir, config)
            say(f"wrote {model_dir}")

        names = {g: g for g in graphs}
        bundle_dir = Path(bundle) if bundle is not None else default_bundle_path()
        bundle_config = read_config(bundle_dir)
        scheduler = bundle_config.scheduler
        removal = {"masked_source": bundle_config.masked_source,
                   "prediction_type": str(scheduler.get("prediction_type", "epsilon")),
                   "decode_residual": str(int(bundle_config.decode_residual)),
                   "residual_scale": repr(float(bundle_config.residual_scale))}
        cond = NullConditioning.load(bundle_dir / NULL_CONDITIONING)
        for bls in (REMOVE_MODEL, SCORE_MODEL):
            if bls == SCORE_MODEL and "discriminator" not in graphs:
                continue
            model_dir = repo / bls
            version = model_dir / "1"
            if version.exists():
                shutil.rmtree(version)
            version.mkdir(parents=True)
            shutil.copy2(MODELS_DIR / "bls.py", version / "model.py")
            shutil.copy2(_sampling_source(), version / "sampling.py")  # the torch engine's own sampler
            shutil.copy2(_masked_source_source(), version / "masked_source.py")  # and its conditioning fill
            shutil.copy2(_module_source("graph_removal"), version / "graph_removal.py")  # the numpy removal
            if bls == REMOVE_MODEL:
                write_atomic(version / "schedules.json", schedule_table_json(scheduler, MAX_STEPS).encode())
                with open(version / "null_conditioning.npz", "wb") as fh:
                    np.savez(fh, prompt_embeds=cond.prompt_embeds.float().numpy(),
                             pooled_prompt_embeds=cond.pooled_prompt_embeds.float().numpy())
            write_config(model_dir, bls_config(bls, manifest, opts, names, removal))
            say(f"wrote {model_dir}")
    return validate_repository(repo)


def _sampling_source() -> Path:
    import cleanplate.sampling

    return Path(cleanplate.sampling.__file__)


def _module_source(name: str) -> Path:
    import importlib

    return Path(importlib.import_module(f"cleanplate.{name}").__file__)


def _masked_source_source() -> Path:
    import cleanplate.masked_source

    return Path(cleanplate.masked_source.__file__)


def validate_repository(repo: str | Path) -> list[str]:
    """Parse every ``config.pbtxt`` into Triton's ``ModelConfig`` and check the repository is servable.

    Checks: the protobuf text parses; ``name`` equals the directory; version ``1/`` holds the file the
    backend loads (model.onnx, model.plan or model.py); batch/queue settings are sane; every model a BLS
    model calls exists with a large enough ``max_batch_size``.
    Returns the model names. Raises ExportError listing every problem found.
    """
    from google.protobuf import text_format

    mc = _mc()
    root = Path(repo)
    if not root.is_dir():
        raise ExportError(f"{root} is not a directory")
    problems: list[str] = []
    configs: dict[str, Any] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        path = model_dir / "config.pbtxt"
        if not path.exists():
            problems.append(f"{model_dir.name}: no config.pbtxt")
            continue
        try:
            config = text_format.Parse(path.read_text(), mc.ModelConfig())
        except text_format.ParseError as exc:
            problems.append(f"{path}: {exc}")
            continue
        configs[config.name] = config
        if config.name != model_dir.name:
            problems.append(f"{path}: name {config.name!r} != directory {model_dir.name!r}")
        expected = {"tensorrt_plan": "model.plan"}.get(config.platform) or \
            {"onnxruntime": "model.onnx", "python": "model.py"}.get(config.backend)
        if expected is None:
            problems.append(f"{path}: unknown platform/backend {config.platform or config.backend!r}")
        elif not (model_dir / "1" / expected).exists():
            problems.append(f"{model_dir.name}: 1/{expected} is missing")
        if config.max_batch_size < 1 or not config.HasField("dynamic_batching"):
            problems.append(f"{path}: needs max_batch_size >= 1 and dynamic_batching")
        if not config.input or not config.output:
            problems.append(f"{path}: no inputs or outputs")
    for name, config in configs.items():
        if config.parameters.get("mode") is None:
            continue
        for key, param in config.parameters.items():
            if key.endswith("_model"):
                target = configs.get(param.string_value)
                if target is None:
                    problems.append(f"{name}: calls {param.string_value!r}, which is not in the repository")
                elif target.max_batch_size < int(config.parameters["graph_max_batch"].string_value):
                    problems.append(f"{name}: {param.string_value} max_batch_size {target.max_batch_size} < "
                                    f"graph_max_batch {config.parameters['graph_max_batch'].string_value}")
    if problems:
        raise ExportError("invalid Triton model repository:\n  " + "\n  ".join(problems))
    if not configs:
        raise ExportError(f"{root} holds no models")
    return sorted(configs)


__all__ = ["BACKENDS", "DETECTOR_MODEL", "GRAPHS", "REMOVE_MODEL", "SCORE_MODEL", "RepositoryOptions", "bls_config", "export_triton",
           "graph_config", "validate_repository"]
