"""The removal and the quality gate's score on exported graphs, in numpy: one implementation for every runtime
that runs the ONNX/TensorRT graphs (``vae_encoder``, ``unet``, ``vae_decoder``, ``discriminator``) instead of
the torch modules: the in-process ONNX Runtime engine (:mod:`cleanplate.onnxruntime_engine`) and Triton's
BLS model (``export/triton_models/bls.py``, which gets a copy of this file, as of ``sampling.py`` and
``masked_source.py``).

Same semantics as :class:`cleanplate.pipeline.RemovalPipeline` (RORem, arXiv 2501.00740): masked source
(``zero`` = ``x_s·(1-m)``, ``telea`` / ``ns`` = the hole pre-filled by OpenCV Telea / Navier-Stokes) -> ``vae_encoder`` -> N LCM steps
(``unet`` + :func:`sampling.lcm_step`; the UNet output is ε, x0 or v as each schedule step's
``prediction_type`` says) -> ``vae_decoder`` (with ``decode_residual`` the result is the masked source plus
the decoded correction, x̃_s + s·(D(ẑ) − D(E(x̃_s))), both latents decoded in one batch).

``infer(graph, inputs, output)`` runs one graph: ``inputs`` maps the graph's input names to numpy arrays of
equal batch (rank-1 inputs such as ``timestep`` are passed as (B, 1)); it returns the named output.
"""

from collections.abc import Callable

import numpy as np

try:  # in the package
    from cleanplate.masked_source import masked_source
    from cleanplate.sampling import LCMStep, lcm_step, sampling_noise
except ImportError:  # inside Triton's python backend: the copies next to this file
    from masked_source import masked_source
    from sampling import LCMStep, lcm_step, sampling_noise

Infer = Callable[[str, dict, str], np.ndarray]


class GraphRemoval:
    """Removal and scoring of batches of model crops through ``infer``.

    Args:
        infer: runs one graph (see the module docstring).
        vae_scale_factor: pixels per latent cell (8 for SDXL's VAE).
        fill: the bundle's ``masked_source`` (:data:`masked_source.MASKED_SOURCE_FILLS`).
        decode_residual, residual_scale: the bundle's residual decode (``BundleConfig``).
        schedules: steps -> the LCM schedule (:func:`sampling.load_schedule_table`).
        prompt_embeds (1, 77, D), pooled_prompt_embeds (1, P): float32 empty-prompt conditioning.
        gate_pixels: the ``discriminator`` graph also takes the crops (``result_image``, ``mask_image``,
            ``source_image``; :func:`gate_pixels`).
    """

    def __init__(self, infer: Infer, *, vae_scale_factor: int, fill: str = "zero", decode_residual: bool = False,
                 residual_scale: float = 1.0, schedules: dict[int, list[LCMStep]] | None = None,
                 prompt_embeds: np.ndarray | None = None, pooled_prompt_embeds: np.ndarray | None = None,
                 gate_pixels: bool = False) -> None:
        self.infer, self.f, self.fill, self.gate_pixels = infer, vae_scale_factor, fill, gate_pixels
        self.residual, self.residual_scale = decode_residual, residual_scale
        self.schedules = schedules or {}
        self.prompt_embeds, self.pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B,R,R,3) uint8, or float32 in [-1,1], NHWC -> scaled latents (B,C,R/f,R/f) float32."""
        return self.infer("vae_encoder", {"image": model_images(images)}, "latent")

    def remove(self, image: np.ndarray, hole: np.ndarray, seeds: np.ndarray, steps: int) -> np.ndarray:
        """Clean a batch of crops.

        Args:
            image: (B,R,R,3) uint8 RGB; hole: (B,R,R) bool, True = remove; seeds: (B,) int >= 0; steps: in
                the schedule table.
        Returns:
            (B,R,R,3) uint8 RGB.
        """
        batch, resolution, f = len(image), image.shape[1], self.f
        masked = masked_source(image, hole, self.fill)  # (B,R,R,3) float32 in [-1,1]
        masked_latent = self.encode(masked)
        mask_latent = hole[:, None, ::f, ::f].astype(np.float32)  # nearest resize by factor f, as F.interpolate
        noise = np.stack([sampling_noise(int(s), steps, masked_latent.shape[1:]) for s in seeds], axis=1)
        cond = {
            "encoder_hidden_states": np.repeat(self.prompt_embeds, batch, axis=0),
            "text_embeds": np.repeat(self.pooled_prompt_embeds, batch, axis=0),
            "time_ids": np.tile(np.array([[resolution, resolution, 0, 0, resolution, resolution]], np.float32),
                                (batch, 1)),
        }
        latent = noise[0]
        for k, step in enumerate(self.schedules[steps]):
            sample = np.concatenate([latent, mask_latent, masked_latent], axis=1)
            timestep = np.full((batch, 1), step.timestep, np.float32)
            # the graph's output keeps the name noise_pred; step.prediction_type says whether it is ε, x0 or v
            model_output = self.infer("unet", {"sample": sample, "timestep": timestep, **cond}, "noise_pred")
            latent = lcm_step(step, latent, model_output, None if step.last else noise[k + 1]).astype(np.float32)
        if self.residual:  # x̃_s + s·(D(ẑ) − D(E(x̃_s))): the VAE's error on the prefill cancels
            both = self.infer("vae_decoder", {"latent": np.concatenate([latent, masked_latent])}, "image")
            correction = self.residual_scale * (both[:batch] - both[batch:])
            decoded = np.clip(np.transpose(masked, (0, 3, 1, 2)) + correction, -1.0, 1.0)
        else:
            decoded = self.infer("vae_decoder", {"latent": latent}, "image")
        return np.clip(np.round((decoded + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    def score(self, source: np.ndarray, result: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Discriminator scores (B,) float32 in [0,1] (higher = cleaner) of (B,R,R,3) uint8 crops and (B,R,R)
        masks (nonzero = removed), as :meth:`cleanplate.pipeline.RemovalPipeline.score`."""
        batch, r, f = len(source), source.shape[1], self.f
        latents = self.encode(np.concatenate([result, source]))
        # A latent cell counts as masked if any of its pixels is (max-pool), as Discriminator.mask_to_latent.
        mask_latent = (mask > 0).astype(np.float32).reshape(batch, 1, r // f, f, r // f, f).max(axis=(3, 5))
        inputs = {"result_latent": latents[:batch], "mask_latent": mask_latent, "source_latent": latents[batch:]}
        if self.gate_pixels:
            inputs |= {"result_image": model_images(result), "mask_image": (mask > 0).astype(np.float32)[:, None],
                       "source_image": model_images(source)}
        return self.infer("discriminator", inputs, "score").reshape(-1).astype(np.float32)


def model_images(images: np.ndarray) -> np.ndarray:
    """The graphs' image input: (B,R,R,3) NHWC uint8 (scaled to [-1,1]) or float32 already in [-1,1] ->
    (B,3,R,R) float32 in [-1,1]."""
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x = x / 127.5 - 1.0
    return np.transpose(x, (0, 3, 1, 2))


def gate_pixels(manifest: dict) -> bool:
    """Whether an ONNX export's ``discriminator`` graph takes the crops as well as their latents (its inputs in
    ``export.json`` name ``result_image``), as a discriminator with pixel statistics does."""
    graph = manifest.get("graphs", {}).get("discriminator", {})
    return any(t.get("name") == "result_image" for t in graph.get("inputs", []))
