"""The ``onnxruntime`` engine: the exported graphs (``cleanplate export onnx``) in this process through ONNX
Runtime, with the removal's numpy math shared with Triton's BLS model (:mod:`cleanplate.graph_removal`).

A CPU fast path without a Triton server: the same graphs and the same numbers as the triton engine, the
gateway's micro-batching (:class:`cleanplate.engines.MicroBatcher`) on one model thread. The bundle gives what
the graphs do not hold: the LCM schedule (with its prediction type), the empty-prompt conditioning, the
masked-source fill, the residual decode and the gate's threshold; the ONNX directory must be exported from
that bundle (``export.json`` names it; resolution and latent sizes are checked at start).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .engines import EngineUnavailable, InpaintItem, MicroBatcher, ScoreItem
from .errors import BundleError, InputError

GRAPHS = ("vae_encoder", "unet", "vae_decoder", "discriminator")


class OnnxRuntimeEngine:
    """Implements :class:`cleanplate.engines.Engine` on ONNX Runtime sessions (CPU, or CUDA when available).

    Args:
        onnx_dir: a ``cleanplate export onnx`` directory (``export.json`` + one ``.onnx`` per graph).
        bundle: the bundle it was exported from (None: the default bundle).
        threads: ONNX Runtime intra-op threads (None: its choice).
        max_batch, window_ms, max_queue, on_batch: micro-batching, as :class:`cleanplate.engines.TorchEngine`.
    Raises:
        InputError ("bad_export"): ``onnx_dir`` is not an export; BundleError: a bad bundle path.
    """

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, bundle: str | Path | None = None, *, threads: int | None = None,
                 max_batch: int = 8, window_ms: float = 10.0, max_queue: int = 64,
                 on_batch: Callable[[str, int, float], None] | None = None) -> None:
        from .bundle import default_bundle_path, read_config
        from .export.onnx import read_manifest

        self.onnx_dir, self.bundle_dir = Path(onnx_dir), Path(bundle) if bundle else default_bundle_path()
        self.manifest = read_manifest(self.onnx_dir)  # fail fast, before the server binds
        self.config = read_config(self.bundle_dir)
        if self.manifest["resolution"] != self.config.resolution:
            raise BundleError(f"{self.onnx_dir} was exported at {self.manifest['resolution']} px, but the bundle "
                              f"{self.bundle_dir} runs at {self.config.resolution}: export it from that bundle")
        self.resolution, self.default_dilate_px = self.config.resolution, self.config.dilate_px
        self.default_steps, self.paste_prefill = self.config.steps, self.config.paste_prefill
        self.threshold: float | None = None
        self._threads = threads
        self._removal: Any = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cleanplate-ort")
        report = on_batch or (lambda queue, n, s: None)
        self._inpaint = MicroBatcher(self._run_inpaint, max_batch=max_batch, window_ms=window_ms,
                                     max_queue=max_queue, executor=self._executor,
                                     on_batch=lambda n, s: report("inpaint", n, s))
        self._score = MicroBatcher(self._run_score, max_batch=max_batch, window_ms=window_ms,
                                   max_queue=max_queue, executor=self._executor,
                                   on_batch=lambda n, s: report("score", n, s))

    def _load(self) -> tuple[Any, float | None]:
        import onnxruntime as ort

        from .bundle import NULL_CONDITIONING, NullConditioning
        from .graph_removal import GraphRemoval
        from .pipeline import MAX_STEPS
        from .sampling import load_schedule_table, schedule_table_json

        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads or 0
        options.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        sessions = {g: ort.InferenceSession(str(self.onnx_dir / f"{g}.onnx"), options, providers=providers)
                    for g in GRAPHS if g in self.manifest["graphs"]}
        ranks = {g: {i.name: len(i.shape) for i in s.get_inputs()} for g, s in sessions.items()}

        def infer(graph: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
            # GraphRemoval passes rank-1 inputs (timestep) as (B, 1), the Triton convention
            feed = {k: np.ascontiguousarray(v.reshape(-1) if ranks[graph][k] == 1 else v) for k, v in inputs.items()}
            return sessions[graph].run([output], feed)[0]

        cond = NullConditioning.load(self.bundle_dir / NULL_CONDITIONING)
        schedules = load_schedule_table(schedule_table_json(self.config.scheduler, MAX_STEPS))
        removal = GraphRemoval(infer, vae_scale_factor=int(self.manifest["vae_scale_factor"]),
                               fill=self.config.masked_source, decode_residual=self.config.decode_residual,
                               residual_scale=float(self.config.residual_scale), schedules=schedules,
                               prompt_embeds=cond.prompt_embeds.float().numpy(),
                               pooled_prompt_embeds=cond.pooled_prompt_embeds.float().numpy())
        threshold = self.manifest.get("threshold") if "discriminator" in sessions else None
        return removal, threshold

    async def start(self) -> None:
        self._removal, self.threshold = await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def close(self) -> None:
        await self._inpaint.close()
        await self._score.close()
        self._executor.shutdown(wait=True)

    def ready(self) -> bool:
        return self._removal is not None

    def queue_depth(self) -> int:
        return self._inpaint.depth() + self._score.depth()

    async def inpaint(self, crop: np.ndarray, mask: np.ndarray, *, seed: int, steps: int) -> np.ndarray:
        if self._removal is None:
            raise EngineUnavailable("the ONNX graphs are still loading")
        if steps not in self._removal.schedules:
            raise InputError(f"steps must be in 1..{max(self._removal.schedules)}, got {steps}", code="bad_option")
        return await self._inpaint.submit(InpaintItem(crop, mask, seed, steps))

    async def score(self, source: np.ndarray, result: np.ndarray, mask: np.ndarray) -> float:
        if self._removal is None:
            raise EngineUnavailable("the ONNX graphs are still loading")
        if self.threshold is None:
            raise InputError("this export has no discriminator, so the quality gate and scoring are unavailable",
                             code="no_discriminator")
        return await self._score.submit(ScoreItem(source, result, mask))

    def _run_inpaint(self, items: list[InpaintItem]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(items)
        by_steps: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_steps.setdefault(item.steps, []).append(i)
        for steps, idx in by_steps.items():
            result = self._removal.remove(np.stack([items[i].crop for i in idx]), np.stack([items[i].mask for i in idx]),
                                          np.array([items[i].seed for i in idx]), steps)
            for j, i in enumerate(idx):
                out[i] = result[j]
        return out  # type: ignore[return-value]

    def _run_score(self, items: list[ScoreItem]) -> list[float]:
        scores = self._removal.score(np.stack([i.source for i in items]), np.stack([i.result for i in items]),
                                     np.stack([i.mask for i in items]).astype(np.uint8))
        return [float(s) for s in scores]
