"""The ``onnxruntime`` engine: the exported graphs (``cleanplate export onnx``) in this process through ONNX
Runtime, with the removal's numpy math shared with Triton's BLS model (:mod:`cleanplate.graph_removal`).

A CPU fast path without a Triton server: the same graphs and the same numbers as the triton engine, the
gateway's micro-batching (:class:`cleanplate.engines.MicroBatcher`) on one model thread. The bundle gives what
the graphs do not hold: the LCM schedule (with its prediction type), the empty-prompt conditioning, the
masked-source fill, the residual decode and the gate's threshold; the ONNX directory must be exported from
that bundle (``export.json`` names it; resolution and latent sizes are checked at start).

The overlay detector (:meth:`OnnxRuntimeEngine.detect`) is the export's ``detector.onnx`` between
:meth:`cleanplate.detector.Detector.preprocess` and :meth:`~cleanplate.detector.Detector.postprocess`, with
the :class:`~cleanplate.detector.DetectorConfig` recorded in ``export.json`` (the calibration that goes with
those weights), so its mask is the torch engine's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .engines import BatchedEngine
from .errors import BundleError, EngineUnavailable, ErrorCode, InputError

if TYPE_CHECKING:
    from .detector import DetectionResult

GRAPHS = ("vae_encoder", "unet", "vae_decoder", "discriminator", "detector")


class OnnxRuntimeEngine(BatchedEngine):
    """Implements :class:`cleanplate.engines.Engine` on ONNX Runtime sessions (CPU, or CUDA when available).

    Args:
        onnx_dir: a ``cleanplate export onnx`` directory (``export.json`` + one ``.onnx`` per graph).
        bundle: the bundle it was exported from (None: the default bundle).
        threads: ONNX Runtime intra-op threads (None: its choice).
        max_batch, window_ms, max_queue, on_batch: micro-batching, as :class:`cleanplate.engines.TorchEngine`.
    Raises:
        InputError ("bad_export"): ``onnx_dir`` is not an export; BundleError: a bad bundle path.

    ``has_detector`` is whether the export holds ``detector.onnx`` (``cleanplate export onnx`` of a bundle with
    the overlay detector).
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
        self._threads = threads
        self.has_detector = "detector" in self.manifest["graphs"]
        self._detector: Any = None  # (DetectorIO, the detector.onnx session), set by _load
        super().__init__(max_batch=max_batch, window_ms=window_ms, max_queue=max_queue, on_batch=on_batch)

    def _load(self) -> tuple[Any, float | None]:
        import onnxruntime as ort

        from .bundle import NULL_CONDITIONING, NullConditioning
        from .graph_removal import GraphRemoval, gate_pixels
        from .pipeline import MAX_STEPS
        from .sampling import load_schedule_table, schedule_table_json

        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads or 0
        options.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        sessions = {g: ort.InferenceSession(str(self.onnx_dir / f"{g}.onnx"), options, providers=providers)
                    for g in GRAPHS if g in self.manifest["graphs"]}
        ranks = {g: {i.name: len(i.shape) for i in s.get_inputs()} for g, s in sessions.items()}
        if "detector" in sessions:
            from .detector import DetectorConfig, DetectorIO

            config = DetectorConfig.model_validate(self.manifest["detector"]["config"])
            self._detector = (DetectorIO(config), sessions["detector"])

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
                               pooled_prompt_embeds=cond.pooled_prompt_embeds.float().numpy(),
                               gate_pixels=gate_pixels(self.manifest))
        threshold = self.manifest.get("threshold") if "discriminator" in sessions else None
        return removal, threshold

    async def detect(self, image: np.ndarray) -> DetectionResult:
        """The export's overlay detector on an (H, W, 3) uint8 RGB photo: (H, W) uint8 {0, 255} mask and
        detections, as :meth:`cleanplate.detector.Detector.detect`. Runs on the model thread, between batches.

        Raises InputError "no_detector" when the export has no ``detector.onnx``, "bad_input" for a bad array;
        EngineUnavailable while loading.
        """
        if not self.has_detector:
            raise InputError(f"the onnxruntime engine's export {self.onnx_dir} has no detector.onnx (export a bundle "
                             "with an overlay detector)", code=ErrorCode.NO_DETECTOR)
        if self.model is None:
            raise EngineUnavailable("the model is still loading")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._detect, image)

    def _detect(self, image: np.ndarray) -> DetectionResult:
        detector, session = self._detector
        x, working = detector.preprocess(image)
        logits = session.run(["logits"], {"image": x})[0]
        return detector.postprocess(logits[0], working, np.shape(image)[:2])

    def _remove(self, crops: np.ndarray, masks: np.ndarray, seeds: np.ndarray, steps: int) -> np.ndarray:
        return self.model.remove(crops, masks, seeds, steps)

    def _score_batch(self, sources: np.ndarray, results: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return self.model.score(sources, results, masks.astype(np.uint8))
