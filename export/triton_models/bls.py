"""Triton python-backend BLS models ``cleanplate_remove`` and ``cleanplate_score`` (parameter ``mode``).

``cleanplate_remove`` runs the whole removal of a batch of model crops inside Triton, with the same
semantics as :class:`cleanplate.pipeline.RemovalPipeline` (RORem, arXiv 2501.00740):
masked source (:mod:`masked_source` with the bundle's fill, parameter ``masked_source``: ``zero`` =
``x_s·(1-m)``, ``telea`` / ``ns`` = the hole pre-filled by OpenCV Telea / Navier-Stokes) -> ``vae_encoder`` -> N LCM steps
(``unet`` + :mod:`sampling`; the UNet output is ε, x0 or v as each schedule step's ``prediction_type``
says, from ``schedules.json``) -> ``vae_decoder`` (with parameter ``decode_residual`` = 1 the result is
the masked source plus the decoded correction, x̃_s + s·(D(ẑ) − D(E(x̃_s))) with s the parameter
``residual_scale``, both latents decoded in one batch). The math is :mod:`graph_removal` (shared with the
in-process ONNX Runtime engine); it and the modules it uses are the package's own, copied next to this file.

    inputs   image (B,R,R,3) UINT8 RGB, mask (B,R,R) UINT8 (nonzero = remove),
             seed (B,1) INT64 >= 0, steps (B,1) INT32 in 1..max_steps
    output   result (B,R,R,3) UINT8

``cleanplate_score`` judges removals with the discriminator (sigmoid score, higher = cleaner):

    inputs   source (B,R,R,3) UINT8, result (B,R,R,3) UINT8, mask (B,R,R) UINT8
    output   score (B,1) FP32 in [0,1]

R is any resolution bucket the graphs were exported for (``buckets`` parameter). Requests the dynamic
batcher hands over together run as one batch per (steps, R); a bad request gets its own error
response and does not fail the others.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from graph_removal import GraphRemoval
from masked_source import MASKED_SOURCE_FILLS
from sampling import load_schedule_table


class BadRequest(Exception):
    pass


def _error(message, bad_request):
    """A TritonError a client can classify: INVALID_ARG for a bad request (gRPC INVALID_ARGUMENT, HTTP 400),
    INTERNAL otherwise (status codes exist in python backends of Triton 23.10 and later)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if bad_request else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        self.mode = params["mode"]
        self.f = int(params["vae_scale_factor"])
        self.buckets = [int(r) for r in params["buckets"].split(",")]
        self.sub_batch = int(params["graph_max_batch"])
        gate_pixels = params.get("gate_pixels", "0") == "1"  # the discriminator graph also takes the crops
        self.model = {k: params[f"{k}_model"] for k in ("vae_encoder", "vae_decoder", "unet", "discriminator")
                      if f"{k}_model" in params}
        if self.mode == "remove":
            self.max_steps = int(params["max_steps"])
            self.fill = params.get("masked_source", "zero")  # absent: the bundle default (RORem)
            self.residual = params.get("decode_residual", "0") == "1"
            self.residual_scale = float(params.get("residual_scale", "1.0"))
            if self.fill not in MASKED_SOURCE_FILLS:
                raise pb_utils.TritonModelException(f"masked_source must be one of {MASKED_SOURCE_FILLS}, "
                                                    f"got {self.fill!r}")
            if self.fill != "zero":
                try:  # fail the model load, not every request
                    import cv2  # noqa: F401
                except ImportError as exc:
                    raise pb_utils.TritonModelException(
                        f"masked_source {self.fill} needs OpenCV in Triton's python environment "
                        "(opencv-python-headless; `cleanplate triton setup` installs it)") from exc
            with open(os.path.join(here, "schedules.json")) as fh:
                self.schedules = load_schedule_table(fh.read())
            # the schedule decides how the UNet output is read; the parameter only documents it, so they must agree
            kinds = {step.prediction_type for steps in self.schedules.values() for step in steps}
            if kinds != {params.get("prediction_type", "epsilon")}:
                raise pb_utils.TritonModelException(f"schedules.json reads the UNet output as {sorted(kinds)}, but the "
                                                    f"prediction_type parameter says {params.get('prediction_type')!r}")
            cond = np.load(os.path.join(here, "null_conditioning.npz"))
            self.removal = GraphRemoval(self._infer, vae_scale_factor=self.f, fill=self.fill,
                                        decode_residual=self.residual, residual_scale=self.residual_scale,
                                        schedules=self.schedules,
                                        prompt_embeds=cond["prompt_embeds"].astype(np.float32),
                                        pooled_prompt_embeds=cond["pooled_prompt_embeds"].astype(np.float32),
                                        gate_pixels=gate_pixels)
        else:
            self.removal = GraphRemoval(self._infer, vae_scale_factor=self.f, gate_pixels=gate_pixels)
        memory = getattr(pb_utils, "PreferredMemory", None)
        # GPU graphs (TensorRT) answer in device memory; this model's numpy math needs host memory.
        self.preferred = memory(pb_utils.TRITONSERVER_MEMORY_CPU, 0) if memory is not None else None

    # -- calls into the graph models -----------------------------------------------------------------
    def _infer(self, graph, inputs, output):
        """Run ``graph`` on numpy inputs of equal batch, in chunks of at most graph_max_batch."""
        batch = len(next(iter(inputs.values())))
        parts = []
        for start in range(0, batch, self.sub_batch):
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value[start:start + self.sub_batch]))
                       for name, value in inputs.items()]
            kwargs = {"preferred_memory": self.preferred} if self.preferred is not None else {}
            request = pb_utils.InferenceRequest(model_name=self.model[graph], requested_output_names=[output],
                                                inputs=tensors, **kwargs)
            response = request.exec()
            if response.has_error():
                raise pb_utils.TritonModelException(f"{self.model[graph]}: {response.error().message()}")
            parts.append(pb_utils.get_output_tensor_by_name(response, output).as_numpy())
        return np.concatenate(parts)

    # -- request handling ------------------------------------------------------------------------------
    def _get(self, request, name, dtype, rank):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise BadRequest(f"missing input {name}")
        value = tensor.as_numpy()
        if value.dtype != dtype or value.ndim != rank:
            raise BadRequest(f"{name}: expected {np.dtype(dtype).name} of rank {rank}, got {value.dtype} {value.shape}")
        return value

    def _check_crops(self, image, mask):
        b, r, r2 = image.shape[:3]
        if r != r2 or image.shape[3] != 3 or r not in self.buckets:
            raise BadRequest(f"image must be (B,R,R,3) with R in {self.buckets}, got {image.shape}")
        if mask.shape != (b, r, r):
            raise BadRequest(f"mask must be {(b, r, r)}, got {mask.shape}")

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            try:
                item = self._parse_remove(request) if self.mode == "remove" else self._parse_score(request)
                groups.setdefault(item[0], []).append((i, item[1]))
            except BadRequest as exc:
                responses[i] = pb_utils.InferenceResponse(error=_error(str(exc), bad_request=True))
        for key, members in groups.items():
            try:
                outputs = self._run_remove(key, members) if self.mode == "remove" else self._run_score(members)
                for (i, _), tensor in zip(members, outputs, strict=True):
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
            except pb_utils.TritonModelException as exc:
                for i, _ in members:
                    responses[i] = pb_utils.InferenceResponse(error=_error(str(exc), bad_request=False))
        return responses

    def _parse_remove(self, request):
        image = self._get(request, "image", np.uint8, 4)
        mask = self._get(request, "mask", np.uint8, 3)
        seed = self._get(request, "seed", np.int64, 2).reshape(-1)
        steps = self._get(request, "steps", np.int32, 2).reshape(-1)
        self._check_crops(image, mask)
        if len(seed) != len(image) or len(steps) != len(image):
            raise BadRequest("seed and steps need one value per image")
        if (seed < 0).any():
            raise BadRequest("seed must be >= 0")
        if len(set(steps.tolist())) != 1 or not 1 <= int(steps[0]) <= self.max_steps:
            raise BadRequest(f"steps must be one value in 1..{self.max_steps} per request, got {steps.tolist()}")
        return (int(steps[0]), image.shape[1]), (image, mask, seed)

    def _run_remove(self, key, members):
        steps, _ = key
        image = np.concatenate([m[1][0] for m in members])
        hole = np.concatenate([m[1][1] for m in members]) > 0  # (B,R,R)
        seeds = np.concatenate([m[1][2] for m in members])
        result = self.removal.remove(image, hole, seeds, steps)
        out, start = [], 0
        for _, (img, _, _) in members:
            out.append(pb_utils.Tensor("result", np.ascontiguousarray(result[start:start + len(img)])))
            start += len(img)
        return out

    def _parse_score(self, request):
        source = self._get(request, "source", np.uint8, 4)
        result = self._get(request, "result", np.uint8, 4)
        mask = self._get(request, "mask", np.uint8, 3)
        self._check_crops(source, mask)
        if result.shape != source.shape:
            raise BadRequest(f"result must be {source.shape}, got {result.shape}")
        return source.shape[1], (source, result, mask)

    def _run_score(self, members):
        source = np.concatenate([m[1][0] for m in members])
        result = np.concatenate([m[1][1] for m in members])
        mask = np.concatenate([m[1][2] for m in members])
        score = self.removal.score(source, result, mask)
        out, start = [], 0
        for _, (src, _, _) in members:
            out.append(pb_utils.Tensor("score", np.ascontiguousarray(score[start:start + len(src)].reshape(-1, 1))))
            start += len(src)
        return out
