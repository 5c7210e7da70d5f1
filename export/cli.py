"""``cleanplate export ...`` and ``cleanplate triton ...`` (registered in :mod:`cleanplate.cli`).

Bad input exits 2 with one line ``error: ...``; a failed export (exporter error, parity beyond
tolerance, invalid repository) exits 1 with one line.
"""

from __future__ import annotations

import signal
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cleanplate.cli_options import say

export_app = typer.Typer(help="Export a bundle: ONNX, TensorRT engines, a Triton model repository.",
                         no_args_is_help=True)
triton_app = typer.Typer(help="A local Triton Inference Server (the nvidia-pytriton wheel's binary).",
                         no_args_is_help=True)


class TritonBackend(str, Enum):
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"
    python = "python"


BundleArg = Annotated[Optional[Path], typer.Argument(help="bundle directory (default: the bundled model)")]


@export_app.command("onnx")
def export_onnx_cmd(
    bundle: BundleArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path("onnx"),
    resolution: Annotated[Optional[list[int]], typer.Option(help="resolution bucket in px (repeat; default: the "
                                                                 "bundle's)")] = None,
    max_batch: Annotated[int, typer.Option(help="upper bound of the dynamic batch axis")] = 8,
    graph: Annotated[Optional[list[str]], typer.Option(help="only these graphs (repeat): unet, vae_encoder, "
                                                            "vae_decoder, discriminator, detector")] = None,
    atol: Annotated[float, typer.Option(help="parity tolerance: absolute part")] = 1e-3,
    rtol: Annotated[float, typer.Option(help="parity tolerance: part relative to max |PyTorch output|")] = 1e-3,
    seed: Annotated[Optional[int], typer.Option(help="seed of the random parity inputs (default: fresh)")] = None,
) -> None:
    """Export unet (LCM-LoRA fused), vae_encoder, vae_decoder, discriminator and the overlay detector (those the
    bundle has) as ONNX, with a parity report (parity.json, parity.md) against PyTorch through onnxruntime."""
    from .onnx import export_onnx

    report = export_onnx(bundle, out, buckets=resolution, max_batch=max_batch, graphs=graph, atol=atol, rtol=rtol,
                         seed=seed, progress=say)
    worst = max(report.parity, key=lambda p: p.max_abs)
    say(f"wrote {out}: {', '.join(report.files)}; parity ok (largest max |diff| {worst.max_abs:.2g} in "
         f"{worst.graph}.{worst.output})")


@export_app.command("tensorrt")
def export_tensorrt_cmd(
    onnx_dir: Annotated[Path, typer.Argument(help="a `cleanplate export onnx` directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory for <graph>.plan")] = Path("plans"),
    fp16: Annotated[bool, typer.Option("--fp16", help="allow fp16 kernels (TensorRT keeps fp32 where needed)")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="allow bf16 kernels (Ampere or newer)")] = False,
    profile: Annotated[Optional[list[str]], typer.Option("--profiles", "--profile",
                                                         help="RES:MIN-OPT-MAX batch, e.g. 1024:1-4-8 (repeat; "
                                                              "default: every bucket, 1-max/2-max)")] = None,
    workspace_gib: Annotated[float, typer.Option(help="builder workspace limit in GiB")] = 8.0,
    graph: Annotated[Optional[list[str]], typer.Option(help="only these graphs (repeat)")] = None,
    plan_only: Annotated[bool, typer.Option("--plan-only", help="print the profile plan as JSON; build nothing "
                                                                "(works without a GPU)")] = False,
) -> None:
    """Build TensorRT engines, one optimization profile per resolution bucket and batch range (needs a GPU
    and the tensorrt package)."""
    import json

    from cleanplate.errors import ErrorCode, InputError

    from .tensorrt import build_engines, plan_profiles

    if fp16 and bf16:
        raise InputError("give --fp16 or --bf16, not both", code=ErrorCode.BAD_OPTION)
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    plan = plan_profiles(onnx_dir, profile, graphs=graph)
    if plan_only:
        typer.echo(json.dumps({g: [p.as_dict() for p in ps] for g, ps in plan.items()}, indent=2))
        return
    written = build_engines(onnx_dir, out, plan, precision=precision, workspace_gib=workspace_gib, progress=say)
    say(f"wrote {', '.join(str(p) for p in written)}")


@export_app.command("triton")
def export_triton_cmd(
    bundle: BundleArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="the model repository directory")] = Path("model_repository"),
    backend: Annotated[TritonBackend, typer.Option(help="tensorrt (plans, GPU), onnxruntime, or python (onnxruntime "
                                                        "inside the python backend)")] = TritonBackend.onnxruntime,
    onnx_dir: Annotated[Optional[Path], typer.Option("--onnx", help="reuse this `export onnx` directory")] = None,
    plans: Annotated[Optional[Path], typer.Option(help="`export tensorrt` directory (backend tensorrt)")] = None,
    max_batch: Annotated[int, typer.Option(help="max_batch_size of every model")] = 8,
    queue_delay_us: Annotated[int, typer.Option(help="dynamic batcher max_queue_delay_microseconds")] = 2000,
    instances: Annotated[int, typer.Option(help="instances per graph model")] = 1,
    bls_instances: Annotated[int, typer.Option(help="instances of each BLS model")] = 2,
    max_queue: Annotated[int, typer.Option(help="queued requests per model before Triton rejects (0 = no bound)")] = 64,
    intra_op_threads: Annotated[int, typer.Option(help="python backend: onnxruntime threads per instance")] = 0,
) -> None:
    """Write a Triton model repository: one model per graph, the cleanplate_remove / cleanplate_score BLS
    models, every config.pbtxt validated against Triton's ModelConfig protobuf."""
    from .triton import RepositoryOptions, export_triton

    opts = RepositoryOptions(backend=backend.value, max_batch=max_batch, queue_delay_us=queue_delay_us,
                             instances=instances, bls_instances=bls_instances, max_queue=max_queue,
                             intra_op_threads=intra_op_threads)
    models = export_triton(bundle, out, opts, onnx_dir=onnx_dir, plan_dir=plans, progress=say)
    say(f"wrote {out}: {', '.join(models)} (all config.pbtxt valid)")


@triton_app.command("setup")
def triton_setup_cmd(
    env: Annotated[Optional[Path], typer.Option(help="where (default: $CLEANPLATE_TRITON_ENV or "
                                                     "<this venv>/triton-env)")] = None,
) -> None:
    """Create Triton's own Python environment (nvidia-pytriton's tritonserver, numpy<2, onnxruntime, OpenCV)."""
    from .triton_server import setup_env

    setup_env(env, progress=say)


@triton_app.command("serve")
def triton_serve_cmd(
    repository: Annotated[Path, typer.Argument(help="a `cleanplate export triton` model repository")],
    http_port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port")] = 8002,
    env: Annotated[Optional[Path], typer.Option(help="Triton environment (see `cleanplate triton setup`)")] = None,
    timeout_s: Annotated[float, typer.Option(help="seconds to wait for /v2/health/ready")] = 300.0,
    exit_timeout_s: Annotated[int, typer.Option(help="on stop, seconds Triton waits for clients to disconnect")] = 30,
) -> None:
    """Start tritonserver on 127.0.0.1 with the repository, wait until ready, serve until Ctrl-C or SIGTERM."""
    from .triton import validate_repository
    from .triton_server import TritonServer

    validate_repository(repository)
    server = TritonServer(repository, env=env, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          exit_timeout_s=exit_timeout_s)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start(timeout_s)
    say(f"Triton ready: http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url}/metrics "
         f"(log {server.log_path})")
    try:
        while not stop.wait(1.0):
            if server.process is not None and server.process.poll() is not None:
                say(f"error: tritonserver exited with {server.process.returncode}:\n{server.log_tail()}")
                raise typer.Exit(1)
    finally:
        code = server.stop()
    say(f"Triton stopped ({code})")
