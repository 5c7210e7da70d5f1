"""Latency per stage of one removal (``cleanplate bench latency``), for each model resolution and batch size.

One repetition cleans ``batch`` copies of a product-photo-like request (:func:`promo_payload`: a JPEG of
``image_size`` px, default = the resolution, with a promo-banner mask) exactly as the gateway does, and
reads a clock between stages (:class:`StageClock`: contiguous stages, so they add up to the end-to-end
time; on CUDA the device is synchronised before every read):

* ``torch`` engine: decode, crop (validate, dilate, context window, to tensors), vae_encode (masked
  source), noise, unet_step_1..N (UNet + LCM update), vae_decode, readback (to uint8 on the host),
  composite (feathered paste-back), gate (discriminator score of the composited result, when the bundle
  has one). The model stages come from :class:`cleanplate.pipeline.RemovalPipeline`'s timing hook, so
  this is the production code path. A second set of repetitions runs the same path with no stage clock
  and one synchronisation at the end (``plain``), which shows what the per-stage synchronisation costs.
* ``opencv`` engine: decode, crop, inpaint (Telea), composite.
* ``triton`` engine: decode, crop, model (the ``cleanplate_remove`` BLS call: the whole N-step loop
  inside Triton; a batch is ``batch`` concurrent requests, batched by Triton's dynamic batcher),
  composite, gate (``cleanplate_score``); plus Triton's own per-model statistics over the measured
  repetitions (queue and compute time of ``vae_encoder``, ``unet``, ``vae_decoder``, ... per request).
  With no ``triton_url`` a local Triton (python backend, ONNX Runtime) is started on a repository
  exported for the requested resolutions.

* ``detect`` (when the bundle, or the engine, has an overlay detector; ``--no-detect`` skips it): the
  auto mask's cost, :meth:`cleanplate.detector.Detector.detect` on the same request photo (per image, after
  ``warmup`` runs, ``repeats`` times; the torch engine's bundle detector in float32 on its device, other
  engines' :meth:`Engine.detect <cleanplate.engines.Engine.detect>`). Only a request without a mask pays it,
  so it is reported next to the stages, not in their sum, with its ratio to one removal (median ms per
  image): issue 17's bar is detection at 512 px <= half a removal on the CPU (``--image-size 512``).

Every case runs ``warmup`` unmeasured repetitions first. Resolution = the model's square input side R
(the crop the UNet sees); the default bundle is trained at 256 but runs at any multiple of its VAE
factor, which is how its cost at 512 or 1024 is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cleanplate.engines import ENGINE_NAMES
from cleanplate.errors import ErrorCode, InputError

from .common import StageClock, environment, fmt_ms, promo_payload, pyplot, save_figure, summarize_ms, with_environment

ENGINES = ENGINE_NAMES
Say = Callable[[str], None]


# -- torch -----------------------------------------------------------------------------------------------
def _torch_rep(pipe: Any, image_bytes: bytes | None, mask_bytes: bytes | None, batch: int, steps: int, gate: bool,
               clock: StageClock, seed: int, instrument: bool = True, decoded: tuple[Any, Any] | None = None,
               ) -> list[np.ndarray]:
    """One timed removal of ``batch`` images through the torch engine's code path; returns the results.

    ``decoded``: an already decoded (DecodedImage, (H,W) bool mask) to start from instead of the bytes
    (no "decode" stage)."""
    from cleanplate import imaging
    from cleanplate.remover import (
        RemovalRequest,
        composite,
        crops_to_tensors,
        masks_to_tensor,
        prepare,
        score_crops,
        to_uint8_crops,
    )

    mark = clock.mark if instrument else (lambda stage: None)
    r = pipe.resolution
    clock.start()
    if decoded is None:
        images = [imaging.decode_image(image_bytes) for _ in range(batch)]
        masks = [imaging.decode_mask(mask_bytes) for _ in range(batch)]
        mark("decode")
    else:
        images, masks = [decoded[0]] * batch, [decoded[1]] * batch
    reqs = [RemovalRequest(img, m, None, seed + i, steps) for i, (img, m) in enumerate(zip(images, masks, strict=False))]
    preps = [prepare(q, r, pipe.config.dilate_px) for q in reqs]
    source, mask = crops_to_tensors([p.crop for p in preps]), masks_to_tensor([p.crop_mask for p in preps])
    mark("crop")
    out = pipe(source, mask, seeds=[q.seed for q in reqs], steps=steps, on_stage=mark if instrument else None)
    crops = to_uint8_crops(out)
    mark("readback")
    pixels = [composite(q, p, c, pipe.config.paste_prefill) for q, p, c in zip(reqs, preps, crops, strict=False)]
    mark("composite")
    if gate:
        cut = [score_crops(q.image.rgb, imaging.to_rgb8(px), p.dilated, p.box, r) for q, p, px in zip(reqs, preps, pixels, strict=False)]
        pipe.score(crops_to_tensors([c[1] for c in cut]), crops_to_tensors([c[0] for c in cut]),
                   masks_to_tensor([c[2] for c in cut]))
        mark("gate")
    if not instrument:
        clock.mark("total")
    return pixels


def _torch_cases(pipe: Any, cases: Sequence[tuple[int, int]], image_size: int | None, steps: int, gate: bool,
                 warmup: int, repeats: int, plain_repeats: int, seed: int, say: Say,
                 detector: Any = None) -> list[dict[str, Any]]:
    import torch

    async def detect(image: np.ndarray) -> Any:
        return detector.detect(image)

    results = []
    detect_by_size: dict[int, dict[str, Any]] = {}
    with torch.inference_mode():
        for resolution, batch in cases:
            p = dataclasses.replace(pipe, config=pipe.config.model_copy(update={"resolution": resolution}),
                                    _schedules={})
            size = image_size or resolution
            image_bytes, mask_bytes = promo_payload(size)
            clock = StageClock.for_device(pipe.device)
            for _ in range(warmup):
                _torch_rep(p, image_bytes, mask_bytes, batch, steps, gate, clock, seed)
            stages: list[dict[str, float]] = []
            totals: list[float] = []
            for _ in range(repeats):
                _torch_rep(p, image_bytes, mask_bytes, batch, steps, gate, clock, seed)
                stages.append(dict(clock.stages))
                totals.append(clock.total_ms)
            plain = []
            for _ in range(plain_repeats):
                _torch_rep(p, image_bytes, mask_bytes, batch, steps, gate, clock, seed, instrument=False)
                plain.append(clock.total_ms)
            results.append(_case(resolution, batch, size, stages, totals, plain=plain))
            if detector is not None:
                if size not in detect_by_size:
                    detect_by_size[size] = asyncio.run(_time_detect(detect, image_bytes, warmup, repeats, clock))
                _add_detect(results[-1], detect_by_size[size])
            say(_case_line(results[-1]))
    return results


async def _time_detect(detect: Callable[[np.ndarray], Awaitable[Any]], image_bytes: bytes, warmup: int,
                       repeats: int, clock: StageClock) -> dict[str, Any]:
    """ms per ``detect`` of the decoded request photo: ``warmup`` (at least 1: an engine may load its detector
    on the first call) unmeasured runs, then ``repeats`` timed."""
    from cleanplate import imaging

    image = imaging.decode_image(image_bytes).rgb
    times, warmup = [], max(1, warmup)
    for i in range(warmup + repeats):
        clock.start()
        await detect(image)
        clock.mark("detect")
        if i >= warmup:
            times.append(clock.total_ms)
    return summarize_ms(times)


def _add_detect(case: dict[str, Any], detect_ms: dict[str, Any]) -> None:
    """The detection stage of a case: ms per image, and its ratio to one removal's median ms per image."""
    case["detect_ms"] = detect_ms
    per_image = case["per_image_ms"]
    case["detect_over_removal"] = detect_ms["median"] / per_image if per_image else None


# -- opencv and triton (through the gateway's engine interface) ---------------------------------------------
async def _engine_rep(engine: Any, image_bytes: bytes, mask_bytes: bytes, batch: int, steps: int, gate: bool,
                      clock: StageClock, seed: int) -> None:
    from cleanplate import imaging
    from cleanplate.remover import RemovalRequest, composite, prepare, score_crops

    r = engine.resolution
    clock.start()
    images = [imaging.decode_image(image_bytes) for _ in range(batch)]
    masks = [imaging.decode_mask(mask_bytes) for _ in range(batch)]
    clock.mark("decode")
    reqs = [RemovalRequest(img, m, None, seed + i, steps) for i, (img, m) in enumerate(zip(images, masks, strict=False))]
    preps = [prepare(q, r, engine.default_dilate_px) for q in reqs]
    clock.mark("crop")
    crops = await asyncio.gather(*[engine.inpaint(p.crop, p.crop_mask, seed=q.seed, steps=steps)
                                   for q, p in zip(reqs, preps, strict=False)])
    clock.mark("inpaint" if engine.name == "opencv" else "model")
    pixels = [composite(q, p, c, engine.paste_prefill) for q, p, c in zip(reqs, preps, crops, strict=False)]
    clock.mark("composite")
    if gate:
        cut = [score_crops(q.image.rgb, imaging.to_rgb8(px), p.dilated, p.box, r) for q, p, px in zip(reqs, preps, pixels, strict=False)]
        await asyncio.gather(*[engine.score(c[0], c[1], c[2]) for c in cut])
        clock.mark("gate")


async def _engine_cases(engine: Any, cases: Sequence[tuple[int, int]], image_size: int | None, steps: int,
                        gate: bool, warmup: int, repeats: int, seed: int, say: Say,
                        stats: Callable[[], dict[str, Any]] | None = None, detect: bool = True) -> list[dict[str, Any]]:
    await engine.start()
    results = []
    detect_by_size: dict[int, dict[str, Any]] = {}
    try:
        for resolution, batch in cases:
            engine.resolution = resolution  # Triton: any exported bucket; OpenCV: its crop side
            size = image_size or resolution
            image_bytes, mask_bytes = promo_payload(size)
            clock = StageClock()
            for _ in range(warmup):
                await _engine_rep(engine, image_bytes, mask_bytes, batch, steps, gate, clock, seed)
            before = stats() if stats else None
            stages, totals = [], []
            for _ in range(repeats):
                await _engine_rep(engine, image_bytes, mask_bytes, batch, steps, gate, clock, seed)
                stages.append(dict(clock.stages))
                totals.append(clock.total_ms)
            extra = {"triton_models": _stats_delta(before, stats())} if stats else {}
            results.append(_case(resolution, batch, size, stages, totals, **extra))
            if detect and getattr(engine, "has_detector", False):
                if size not in detect_by_size:
                    detect_by_size[size] = await _time_detect(engine.detect, image_bytes, warmup, repeats, clock)
                _add_detect(results[-1], detect_by_size[size])
            say(_case_line(results[-1]))
    finally:
        await engine.close()
    return results


def triton_statistics(url: str, protocol: str = "grpc") -> dict[str, dict[str, int]]:
    """Triton's cumulative per-model statistics (``/v2/models/stats``): counts and nanoseconds per phase."""
    if protocol == "grpc":
        import tritonclient.grpc as mod

        raw = mod.InferenceServerClient(url).get_inference_statistics(as_json=True)
    else:
        import tritonclient.http as mod

        raw = mod.InferenceServerClient(url).get_inference_statistics()
    out = {}
    for m in raw.get("model_stats", []):
        s = m.get("inference_stats", {})
        row = {"inference_count": int(m.get("inference_count", 0)), "execution_count": int(m.get("execution_count", 0))}
        for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            row[f"{phase}_count"] = int(s.get(phase, {}).get("count", 0))
            row[f"{phase}_ns"] = int(s.get(phase, {}).get("ns", 0))
        out[m["name"]] = row
    return out


def _stats_delta(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per model over the measured repetitions: requests, executions (batches), and mean ms per request of
    the whole request, the queue wait and the compute phases."""
    out = {}
    for name, a in after.items():
        b = (before or {}).get(name, {})
        d = {k: v - b.get(k, 0) for k, v in a.items()}
        n = d["success_count"]
        if not n:
            continue
        out[name] = {"requests": n, "executions": d["execution_count"],
                     "mean_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else None,
                     **{f"{phase}_ms": d[f"{phase}_ns"] / n / 1e6 for phase in
                        ("success", "queue", "compute_input", "compute_infer", "compute_output")}}
    return out


@contextlib.contextmanager
def local_triton(bundle: str | Path | None, buckets: Sequence[int], max_batch: int, threads: int,
                 say: Say) -> Iterator[Any]:
    """Export ``bundle`` for ``buckets`` (python backend, ONNX Runtime with ``threads`` intra-op threads) into
    a temporary repository and serve it with the local ``tritonserver``; yields the started
    :class:`~cleanplate.export.triton_server.TritonServer`."""
    from cleanplate.export.onnx import export_onnx
    from cleanplate.export.triton import RepositoryOptions, export_triton
    from cleanplate.export.triton_server import TritonServer

    with tempfile.TemporaryDirectory(prefix="cleanplate-bench-triton-") as tmp:
        say(f"exporting the bundle for Triton (buckets {list(buckets)}, batch <= {max_batch})")
        export_onnx(bundle, Path(tmp) / "onnx", buckets=list(buckets), max_batch=max_batch)
        export_triton(bundle, Path(tmp) / "repo", RepositoryOptions(backend="python", max_batch=max_batch,
                                                                    bls_instances=1, intra_op_threads=threads),
                      onnx_dir=Path(tmp) / "onnx")
        server = TritonServer(Path(tmp) / "repo")
        say("starting tritonserver")
        server.start(timeout_s=600)
        try:
            yield server
        finally:
            server.stop()


# -- the harness -----------------------------------------------------------------------------------------
def _case(resolution: int, batch: int, size: int, stages: list[dict[str, float]], totals: list[float],
          plain: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    names = list(stages[0]) if stages else []
    total = summarize_ms(totals)
    unet = [sum(v for k, v in s.items() if k.startswith("unet_step_")) for s in stages]
    case = {"resolution": resolution, "batch": batch, "image_size": size, "repeats": len(totals),
            "total_ms": total, "stages_ms": {k: summarize_ms([s[k] for s in stages]) for k in names},
            "unet_steps_ms": summarize_ms(unet) if any(unet) else None,
            "per_image_ms": total["median"] / batch if total["median"] is not None else None,
            "images_per_s": 1000 * batch / total["median"] if total["median"] else None,
            "stage_sum_ms_median": float(np.median([sum(s.values()) for s in stages])) if stages else None}
    if plain:
        case["plain_total_ms"] = summarize_ms(plain)
    return case | extra


def _case_line(c: dict[str, Any]) -> str:
    detect = f"; detect {fmt_ms(c['detect_ms']['median'])} ms per image" if c.get("detect_ms") else ""
    return (f"R={c['resolution']} batch={c['batch']}: median {fmt_ms(c['total_ms']['median'])} ms, p95 "
            f"{fmt_ms(c['total_ms']['p95'])} ms, {c['images_per_s']:.2f} images/s{detect}")


def run_latency(engine: str = "torch", *, bundle: str | Path | None = None, arch: str = "bundle",
                resolutions: Sequence[int] | None = None, batches: Sequence[int] = (1,), steps: int | None = None,
                image_size: int | None = None, warmup: int = 3, repeats: int = 20, plain_repeats: int | None = None,
                device: str = "cpu", dtype: str = "fp32", gate: bool | None = None, triton_url: str | None = None,
                triton_protocol: str = "grpc", threads: int | None = None, seed: int = 0,
                onnx_dir: str | Path | None = None, detect: bool = True, say: Say = lambda m: None) -> dict[str, Any]:
    """Measure per-stage latency for every (resolution, batch); returns the report dict (see module doc).

    Args:
        engine: one of :data:`cleanplate.engines.ENGINE_NAMES`.
        bundle: bundle directory (default: the bundled one); arch: "bundle" or "sdxl" (torch only:
            a random-weight full-size SDXL-inpainting model, CUDA only, no gate).
        resolutions: model input sides R in px (default: the bundle's); each a multiple of the VAE factor.
        batches: images per removal call (>= 1). steps: LCM steps (default: the bundle's).
        image_size: side of the request photo in px (default: R).
        warmup, repeats: unmeasured and measured repetitions per case; plain_repeats: torch only, the
            uninstrumented repetitions (default: max(3, repeats // 4)).
        gate: time the quality gate (default: when the bundle has a discriminator).
        triton_url: a running Triton with ``cleanplate export triton``'s repository (default: start one).
        threads: torch intra-op threads (and ONNX Runtime's, in-process or in a local Triton).
        onnx_dir: onnxruntime engine: a ``cleanplate export onnx`` directory with the resolutions as buckets
            (default: export the bundle now, parity-checked, to a temporary directory).
        detect: time the overlay detector on the request photo when there is one (module docstring).
    Raises:
        InputError: bad options (engine, sizes, counts, fp16 on CPU, sdxl on CPU, gate without discriminator,
            a resolution that is not a multiple of the VAE factor or not a Triton bucket).
    """
    import torch

    from cleanplate.bundle import default_bundle_path, read_config

    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; use one of {ENGINES}", code=ErrorCode.BAD_OPTION)
    if arch != "bundle" and engine != "torch":
        raise InputError("--arch applies to the torch engine only", code=ErrorCode.BAD_OPTION)
    if warmup < 0 or repeats < 1 or any(b < 1 for b in batches) or (image_size is not None and image_size < 16):
        raise InputError("need warmup >= 0, repeats >= 1, batch >= 1 and image size >= 16", code=ErrorCode.BAD_OPTION)
    if threads:
        torch.set_num_threads(threads)
    say_ = say
    t_start = time.perf_counter()
    if engine == "torch":
        from cleanplate.pipeline import RemovalPipeline

        if arch == "bundle":
            pipe = RemovalPipeline.from_bundle(bundle, device=device, dtype=dtype)
            model = str(bundle or default_bundle_path())
        else:
            from .models import build_parts

            parts = build_parts(arch, bundle=bundle, device=device, dtype=dtype)
            pipe, model = parts.removal_pipeline(steps=steps or 4), f"random-weight {arch} architecture"
        config, f = pipe.config, pipe.vae_scale_factor
        gate = pipe.discriminator is not None if gate is None else gate
        if gate and pipe.discriminator is None:
            raise InputError("--gate: this model has no discriminator", code=ErrorCode.NO_DISCRIMINATOR)
    else:
        config, f = read_config(bundle or default_bundle_path()), 1
    steps = steps or config.steps
    resolutions = list(resolutions or [config.resolution])
    if not 1 <= steps <= 50 or any(r < 16 or r % f for r in resolutions):
        raise InputError(f"steps must be 1..50 and resolutions multiples of {f} px >= 16, got steps {steps}, "
                         f"resolutions {resolutions}", code=ErrorCode.BAD_OPTION)
    cases = [(r, b) for r in resolutions for b in batches]
    plain_repeats = max(3, repeats // 4) if plain_repeats is None else plain_repeats
    meta: dict[str, Any] = {}
    if engine == "torch":
        detector = None
        if detect and arch == "bundle" and read_config(bundle or default_bundle_path()).detector:
            from cleanplate.masks import bundle_detector

            detector = bundle_detector(bundle).to(pipe.device)  # float32, as the torch engine runs it
        cases_out = _torch_cases(pipe, cases, image_size, steps, bool(gate), warmup, repeats, plain_repeats, seed,
                                 say_, detector)
        meta = {"model": model, "arch": arch, "dtype": str(pipe.dtype),
                "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", pipe.unet), ("vae", pipe.vae))},
                "vae_dtype": str(pipe.vae_dtype), "vae_scale_factor": f, "device": str(pipe.device)}
    elif engine == "opencv":
        from cleanplate.engines import OpenCVEngine

        gate = False
        eng = OpenCVEngine(resolution=resolutions[0], dilate_px=config.dilate_px)
        cases_out = asyncio.run(_engine_cases(eng, cases, image_size, steps, False, warmup, repeats, seed, say_,
                                              detect=detect))
        meta = {"model": "cv2.inpaint Telea, radius 5", "device": "cpu"}
    elif engine == "onnxruntime":
        cases_out, meta = _run_onnxruntime(bundle, config, cases, resolutions, batches, image_size, steps, gate,
                                           warmup, repeats, onnx_dir, threads, seed, say_, detect)
        gate = meta.pop("gate")
    else:
        cases_out, meta = _run_triton(bundle, cases, resolutions, batches, image_size, steps, gate, warmup, repeats,
                                      triton_url, triton_protocol, threads or torch.get_num_threads(), seed, say_,
                                      detect)
        gate = meta.pop("gate")
    return {
        "harness": "latency", "engine": engine,
        "settings": {"bundle": str(bundle or default_bundle_path()) if arch == "bundle" else None, "arch": arch,
                     "steps": steps, "resolutions": resolutions, "batches": list(batches), "image_size": image_size,
                     "warmup": warmup, "repeats": repeats, "gate": bool(gate), "seed": seed, **meta},
        "cases": cases_out, "wall_s": time.perf_counter() - t_start,
        "environment": environment(meta.get("device", device)),
    }


def _run_onnxruntime(bundle: Any, config: Any, cases: Any, resolutions: list[int], batches: Sequence[int],
                     image_size: int | None, steps: int, gate: bool | None, warmup: int, repeats: int,
                     onnx_dir: str | Path | None, threads: int | None, seed: int,
                     say: Say, detect: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from cleanplate.bundle import default_bundle_path
    from cleanplate.export.onnx import export_onnx, read_manifest
    from cleanplate.onnxruntime_engine import OnnxRuntimeEngine

    use_gate = bool(config.discriminator) if gate is None else gate
    if use_gate and not config.discriminator:
        raise InputError("--gate: this bundle has no discriminator", code=ErrorCode.NO_DISCRIMINATOR)
    with tempfile.TemporaryDirectory(prefix="cleanplate-onnx-") as tmp:
        if onnx_dir is None:
            say(f"exporting the bundle to ONNX for {resolutions} px")
            export_onnx(bundle, tmp, buckets=resolutions, max_batch=max(2, *batches))  # a dynamic batch needs max >= 2
        where = Path(onnx_dir or tmp)
        buckets = read_manifest(where)["buckets"]
        missing = [r for r in resolutions if r not in buckets]
        if missing:
            raise InputError(f"{where} was exported for {buckets} px, not {missing}", code=ErrorCode.BAD_OPTION)
        eng = OnnxRuntimeEngine(where, bundle, threads=threads, max_batch=max(batches), window_ms=5)
        out = asyncio.run(_engine_cases(eng, cases, image_size, steps, use_gate, warmup, repeats, seed, say,
                                        detect=detect))
    return out, {"model": f"{bundle or default_bundle_path()} exported to ONNX, run by ONNX Runtime in-process",
                 "onnx_dir": str(onnx_dir) if onnx_dir else None, "gate": use_gate, "device": "cpu"}


def _run_triton(bundle: Any, cases: Any, resolutions: list[int], batches: Sequence[int], image_size: int | None,
                steps: int, gate: bool | None, warmup: int, repeats: int, url: str | None, protocol: str,
                threads: int, seed: int, say: Say, detect: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from cleanplate.bundle import default_bundle_path
    from cleanplate.triton_engine import TritonEngine

    def measure(grpc_url: str, proto: str, where: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        eng = TritonEngine(grpc_url, protocol=proto, timeout_s=600, max_inflight=max(64, max(batches) * 2))
        asyncio.run(_probe(eng))
        missing = [r for r in resolutions if r not in eng.buckets]
        if missing:
            raise InputError(f"Triton's repository serves resolutions {eng.buckets}, not {missing}",
                             code=ErrorCode.BAD_OPTION)
        use_gate = eng.threshold is not None if gate is None else gate
        if use_gate and eng.threshold is None:
            raise InputError("--gate: this Triton repository has no discriminator", code=ErrorCode.NO_DISCRIMINATOR)
        out = asyncio.run(_engine_cases(eng, cases, image_size, steps, use_gate, warmup, repeats, seed, say,
                                        stats=lambda: triton_statistics(grpc_url, proto), detect=detect))
        return out, {"model": f"{bundle or default_bundle_path()} exported to a Triton repository", "triton": where,
                     "protocol": proto, "gate": use_gate, "device": "triton"}

    if url:
        return measure(url, protocol, url)
    with local_triton(bundle, resolutions, max(8, max(batches)), threads, say) as server:
        return measure(server.grpc_url, "grpc", f"local tritonserver (python backend, onnxruntime, {threads} threads)")


async def _probe(engine: Any) -> None:
    """Connect once to read the repository's parameters (buckets, threshold), then close."""
    try:
        await asyncio.wait_for(engine.start(), 60)
    except asyncio.TimeoutError as exc:
        raise InputError(f"no ready Triton at {engine.url}", code=ErrorCode.BAD_OPTION) from exc
    finally:
        await engine.close()


# -- reports ---------------------------------------------------------------------------------------------
STAGE_ORDER = ("decode", "crop", "vae_encode", "noise", "unet_steps", "vae_decode", "readback", "model", "inpaint",
               "composite", "gate")


def _stage_columns(report: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for c in report["cases"]:
        for k in c["stages_ms"]:
            if k not in seen:
                seen.append(k)
    return seen


def to_markdown(report: dict[str, Any], command: str) -> str:
    return with_environment(markdown_lines(report, command), report["environment"])


def markdown_lines(report: dict[str, Any], command: str) -> list[str]:
    """The report's markdown lines, without the environment line (:func:`to_markdown` adds it)."""
    s, cases = report["settings"], report["cases"]
    lines = [f"# Latency: {report['engine']} engine", "", f"`{command}`", "",
             f"Model: {s.get('model')}"
             + (f" ({s['arch']}), {s['steps']} steps" if report["engine"] != "opencv" else "")
             + f", device {s.get('device')}" + (f", {s.get('dtype')}" if s.get("dtype") else "")
             + f"; gate {'on' if s['gate'] else 'off'}; "
             f"{s['warmup']} warm-up + {s['repeats']} measured repetitions per case; request: a JPEG photo "
             "of the given side with a promo-banner mask (48% x 13% of the side).", "",
             "| resolution | batch | image px | median ms | p95 ms | p99 ms | per image ms | images/s |"
             + (" plain median ms |" if cases and "plain_total_ms" in cases[0] else ""),
             "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cases and "plain_total_ms" in cases[0] else "")]
    for c in cases:
        t = c["total_ms"]
        row = (f"| {c['resolution']} | {c['batch']} | {c['image_size']} | {fmt_ms(t['median'])} | {fmt_ms(t['p95'])} | "
               f"{fmt_ms(t['p99'])} | {fmt_ms(c['per_image_ms'])} | {c['images_per_s']:.2f} |")
        if "plain_total_ms" in c:
            row += f" {fmt_ms(c['plain_total_ms']['median'])} |"
        lines.append(row)
    stages = _stage_columns(report)
    lines += ["", "Median ms per stage (the stages tile the end-to-end time):", "",
              "| stage | " + " | ".join(f"R{c['resolution']} b{c['batch']}" for c in cases) + " |",
              "|---|" + "---:|" * len(cases)]
    for st in stages:
        lines.append(f"| {st} | " + " | ".join(fmt_ms(c["stages_ms"].get(st, {}).get("median")) for c in cases) + " |")
    lines.append("| **sum of stage medians** | " + " | ".join(
        fmt_ms(sum(v["median"] for v in c["stages_ms"].values())) for c in cases) + " |")
    if any(c.get("detect_ms") for c in cases):
        lines.append("| detect (auto mask only; per image, not in the sum) | " + " | ".join(
            fmt_ms(c["detect_ms"]["median"]) if c.get("detect_ms") else "-" for c in cases) + " |")
        lines.append("| **detect / one removal** (per image) | " + " | ".join(
            f"{c['detect_over_removal']:.2f}" if c.get("detect_over_removal") is not None else "-" for c in cases)
            + " |")
        lines += ["", "*detect*: the overlay detector on the same request photo (each case's image px), what a "
                  "request without a mask pays before the removal; issue 17's bar: <= 0.50 of one removal on "
                  "the CPU at 512 px."]
    tri = [c for c in cases if c.get("triton_models")]
    if tri:
        lines += ["", "Triton's own statistics over the measured repetitions (mean ms per request; "
                  "`compute_infer` is the model's execution, `queue` the dynamic batcher's wait; the BLS model "
                  "`cleanplate_remove` sends each graph one request per batch, so its requests carry several images):",
                  "",
                  "| case | model | requests | mean batch | request ms | queue ms | compute_infer ms |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for c in tri:
            for name, m in c["triton_models"].items():
                mb = "-" if m["mean_batch"] is None else f"{m['mean_batch']:.2f}"
                lines.append(f"| R{c['resolution']} b{c['batch']} | {name} | {m['requests']} | {mb} | "
                             f"{fmt_ms(m['success_ms'])} | {fmt_ms(m['queue_ms'])} | {fmt_ms(m['compute_infer_ms'])} |")
    if cases and "plain_total_ms" in cases[0]:
        lines += ["", "*plain*: the same code path with no stage clock (on CUDA: one synchronisation at the end) "
                  f"({cases[0]['plain_total_ms']['n']} repetitions): the cost of per-stage synchronisation."]
    return lines


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: median latency vs resolution (a line per batch) and per-image latency vs batch (a line
    per resolution); ``out_stages.png``: stacked median stage times per case."""
    plt = pyplot()
    cases = report["cases"]
    res = sorted({c["resolution"] for c in cases})
    bat = sorted({c["batch"] for c in cases})
    by = {(c["resolution"], c["batch"]): c for c in cases}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for bt in bat:
        xs = [r for r in res if (r, bt) in by]
        a.errorbar(xs, [by[r, bt]["total_ms"]["median"] for r in xs],
                   yerr=[[0] * len(xs), [by[r, bt]["total_ms"]["p95"] - by[r, bt]["total_ms"]["median"] for r in xs]],
                   marker="o", capsize=3, label=f"batch {bt}")
    a.set(xlabel="model resolution (px)", ylabel="latency per call, median (ms; bar to p95)",
          title=f"{report['engine']}: latency vs resolution", xticks=res)
    if len(res) > 1 and res[-1] / res[0] >= 4:
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xticks(res, [str(r) for r in res])
    a.legend()
    for r in res:
        xs = [bt for bt in bat if (r, bt) in by]
        b.plot(xs, [by[r, bt]["per_image_ms"] for bt in xs], marker="o", label=f"R {r}")
    b.set(xlabel="batch", ylabel="ms per image (median)", title="per-image latency vs batch", xticks=bat)
    per_image = [c["per_image_ms"] for c in cases if c["per_image_ms"]]
    if per_image and max(per_image) / min(per_image) > 10:
        b.set_yscale("log")
    b.legend()
    paths = [save_figure(fig, out.with_suffix(".png"))]

    stages = _stage_columns(report)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cases) + 3), 4.2))
    labels = [f"R{c['resolution']}\nb{c['batch']}" for c in cases]
    bottom = np.zeros(len(cases))
    cmap = plt.get_cmap("tab20")
    x = np.arange(len(cases))
    for i, st in enumerate(stages):
        vals = np.array([c["stages_ms"].get(st, {}).get("median") or 0.0 for c in cases])
        ax.bar(x, vals, 0.6, bottom=bottom, label=st, color=cmap(i % 20))
        bottom += vals
    if any(c.get("detect_ms") for c in cases):  # beside the stack: only a request without a mask pays it
        ax.bar(x + 0.4, [c["detect_ms"]["median"] if c.get("detect_ms") else 0.0 for c in cases], 0.15,
               color="white", edgecolor="k", hatch="//", label="detect (auto mask only)")
    ax.set_xticks(x, labels)
    ax.set(ylabel="median ms per call", title=f"{report['engine']}: where the time goes")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return [*paths, save_figure(fig, out.with_name(out.name + "_stages.png"))]
