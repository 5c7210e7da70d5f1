"""ONNX export of a bundle's graphs, with a parity check against PyTorch through onnxruntime.

Five graphs, each with a dynamic batch axis and dynamic latent/image sides (every resolution bucket
runs through the same file):

=================  =====================================================  ==========================
graph              inputs                                                 outputs
=================  =====================================================  ==========================
``unet``           sample (B,2C+1,h,w), timestep (B,), encoder_hidden_    noise_pred (B,C,h,w)
                   states (B,77,D), text_embeds (B,P), time_ids (B,6)
``vae_encoder``    image (B,3,H,W) in [-1,1]                              latent (B,C,h,w), scaled
``vae_decoder``    latent (B,C,h,w), scaled                               image (B,3,H,W) in [-1,1]
``discriminator``  result_latent (B,C,h,w), mask_latent (B,1,h,w),        score (B,) in [0,1]
                   source_latent (B,C,h,w); with pixel statistics also
                   result_image, source_image (B,3,H,W) in [-1,1] and
                   mask_image (B,1,H,W) in {0,1}
``detector``       image (B,3,H,W) in [0,1], H and W multiples of 32      logits (B,1+K,H,W)
=================  =====================================================  ==========================

All float32; H = h·f with f the VAE scale factor. The UNet has the LCM-LoRA fused in (``load_bundle``),
the VAE graphs include the latent scaling (``(z - shift) · scaling_factor``, posterior mode), and the
discriminator graph ends in the sigmoid, so a consumer needs no bundle config to use them, except two
facts that ``export.json`` records: ``prediction_type``, what ``noise_pred`` is (the name is kept for
compatibility): ε for "epsilon", x0 for "sample", v for "v_prediction" (:mod:`cleanplate.sampling`);
and ``masked_source``, how the hole of the image whose latent conditions the UNet is filled: "zero",
"telea" or "ns" (:mod:`cleanplate.masked_source`).

The ``detector`` graph (when the bundle has the overlay detector, :mod:`cleanplate.detector`) is
:meth:`Detector.logits`: its H and W are independent of the resolution buckets (any multiples of 32; a
photo is resized to the detector's working size and padded, :meth:`Detector.preprocess`), and
``export.json`` carries its :class:`~cleanplate.detector.DetectorConfig` (``detector.config``: threshold,
min_area, kinds, working size), so a consumer turns the logits into the same mask with
:meth:`Detector.postprocess`. Its parity check runs at the padded working size.

The exporter is torch's ``torch.export``-based ONNX exporter (``torch.onnx.export(dynamo=True)``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cleanplate.bundle import Bundle, NullConditioning, load_bundle
from cleanplate.detector import network_logits
from cleanplate.errors import ErrorCode, ExportError, InputError
from cleanplate.imaging import write_atomic

GRAPHS = ("unet", "vae_encoder", "vae_decoder", "discriminator", "detector")
MANIFEST = "export.json"
PARITY_JSON, PARITY_MD = "parity.json", "parity.md"
OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # above this, weights go to ``<graph>.onnx.data`` (protobuf's 2 GB limit)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``dims`` uses symbols: B batch, H/W image side, h/w latent side (for the
    detector, H/W is its input side, unrelated to the buckets)."""

    name: str
    dims: tuple[int | str, ...]
    dtype: str = "FP32"  # Triton's type names

    def shape(self, batch: int, resolution: int, vae_scale_factor: int) -> tuple[int, ...]:
        """Concrete shape for a batch size and a resolution bucket R (image R x R, latent R/f x R/f)."""
        sizes = {"B": batch, "H": resolution, "W": resolution,
                 "h": resolution // vae_scale_factor, "w": resolution // vae_scale_factor}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def graph_specs(latent_channels: int, text_dim: int, pooled_dim: int, text_len: int = 77,
                detector_kinds: int = 4, discriminator_pixels: bool = False) -> dict[str, GraphSpec]:
    """The I/O of every graph for a bundle with C latent channels, text sizes (D, P) and a detector with K kinds;
    ``discriminator_pixels``: the discriminator's statistics head also sees the crops (``pixel_stats``)."""
    c = latent_channels
    pixels = (TensorSpec("result_image", ("B", 3, "H", "W")), TensorSpec("mask_image", ("B", 1, "H", "W")),
              TensorSpec("source_image", ("B", 3, "H", "W"))) if discriminator_pixels else ()
    return {
        "unet": GraphSpec("unet", (
            TensorSpec("sample", ("B", 2 * c + 1, "h", "w")), TensorSpec("timestep", ("B",)),
            TensorSpec("encoder_hidden_states", ("B", text_len, text_dim)), TensorSpec("text_embeds", ("B", pooled_dim)),
            TensorSpec("time_ids", ("B", 6))), (TensorSpec("noise_pred", ("B", c, "h", "w")),)),
        "vae_encoder": GraphSpec("vae_encoder", (TensorSpec("image", ("B", 3, "H", "W")),),
                                 (TensorSpec("latent", ("B", c, "h", "w")),)),
        "vae_decoder": GraphSpec("vae_decoder", (TensorSpec("latent", ("B", c, "h", "w")),),
                                 (TensorSpec("image", ("B", 3, "H", "W")),)),
        "discriminator": GraphSpec("discriminator", (
            TensorSpec("result_latent", ("B", c, "h", "w")), TensorSpec("mask_latent", ("B", 1, "h", "w")),
            TensorSpec("source_latent", ("B", c, "h", "w")), *pixels), (TensorSpec("score", ("B",)),)),
        "detector": GraphSpec("detector", (TensorSpec("image", ("B", 3, "H", "W")),),
                              (TensorSpec("logits", ("B", 1 + detector_kinds, "H", "W")),)),
    }


# -- the graphs as modules ---------------------------------------------------------------------------
class UNetGraph(nn.Module):
    """The (LoRA-fused) remover UNet with SDXL's added conditioning as plain inputs.

    Returns (B,C,h,w): ε, x0 or v as the bundle's scheduler ``prediction_type`` says (the graph output
    is named ``noise_pred`` whichever it is).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


class _VAEGraph(nn.Module):
    """A graph around a diffusers ``AutoencoderKL`` with its latent ``shift`` (``shift_factor``, 0 when unset)
    and ``scale`` (``scaling_factor``) as Python floats, so the export bakes them in as constants."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.shift = float(vae.config.get("shift_factor") or 0.0)
        self.scale = float(vae.config.scaling_factor)


class VAEEncoderGraph(_VAEGraph):
    """Image in [-1,1] -> scaled latent ``(mode - shift) * scaling_factor`` (as RemovalPipeline.encode)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.quant_conv(self.vae.encoder(image)) if self.vae.quant_conv is not None \
            else self.vae.encoder(image)
        mode = moments[:, : moments.shape[1] // 2]  # DiagonalGaussianDistribution.mode() = mean
        return (mode - self.shift) * self.scale


class VAEDecoderGraph(_VAEGraph):
    """Scaled latent -> image in [-1,1] (as RemovalPipeline.decode)."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scale + self.shift, return_dict=False)[0].clamp(-1, 1)


class DiscriminatorGraph(nn.Module):
    """Quality score sigmoid(logit) in [0,1] of (result latent, latent mask, source latent)."""

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, result_latent: torch.Tensor, mask_latent: torch.Tensor, source_latent: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.discriminator(result_latent, mask_latent, source_latent))


class PixelDiscriminatorGraph(DiscriminatorGraph):
    """:class:`DiscriminatorGraph` of a discriminator whose statistics head also sees the crops
    (``pixel_stats``): the latents, then the result, mask and source crops at image size."""

    def forward(self, result_latent: torch.Tensor, mask_latent: torch.Tensor, source_latent: torch.Tensor,
                result_image: torch.Tensor, mask_image: torch.Tensor, source_image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.discriminator(result_latent, mask_latent, source_latent, result_image, mask_image,
                                                source_image))


class DetectorGraph(nn.Module):
    """The overlay detector's network: image (B,3,H,W) in [0,1], H and W multiples of 32 -> logits (B,1+K,H,W),
    as :meth:`cleanplate.detector.Detector.logits` (mask and boxes come from :meth:`Detector.postprocess`).

    With a text prior, ``forward`` runs it through ONNX Runtime as ``Detector.logits`` does (the parity
    reference); the exported file is :class:`DetectorNetGraph` with the text detector composed in front of it
    (:func:`compose_text_prior`), so the ``detector`` graph keeps its one ``image`` input on every engine."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.net = detector.net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        flip = self.detector.config.flip_average
        if self.detector.text_prior is None:
            return network_logits(self.net, image, flip)
        text = torch.from_numpy(self.detector.text_prior(image.float().numpy())).to(image.dtype)
        return network_logits(self.net, torch.cat([image, text], dim=1), flip)


class DetectorNetGraph(nn.Module):
    """The network of a detector with a text prior: image (B,3,H,W) in [0,1] and text (B,1,H,W) in [0,1] ->
    logits (B,1+K,H,W). Only exported, then composed with the text detector (:func:`compose_text_prior`)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.net = detector.net
        self.flip_average = detector.config.flip_average

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return network_logits(self.net, torch.cat([image, text], dim=1), self.flip_average)


def compose_text_prior(net_path: Path, text_detector: Path, out_path: Path) -> None:
    """One ONNX file ``out_path`` = the text detector in front of the exported :class:`DetectorNetGraph`.

    ``net_path``: the network (inputs ``image``, ``text``; output ``logits``). ``text_detector``: PP-OCRv4's
    det model (input BGR in [-1, 1], output the text probability (B,1,H,W)), converted to the network's opset
    by ``onnx.version_converter`` (bit-exact on ONNX Runtime here) and prefixed ``text_prior/``. The result
    takes only ``image`` (B,3,H,W) RGB in [0,1]: Gather (RGB -> BGR), x·2 - 1, the text detector, then the
    network with ``text`` = its probability (``onnx.compose.merge_models``)."""
    import onnx
    from onnx import compose, helper, numpy_helper, version_converter

    net = onnx.load(str(net_path))
    opset = next(o.version for o in net.opset_import if o.domain in ("", "ai.onnx"))
    text = compose.add_prefix(version_converter.convert_version(onnx.load(str(text_detector)), opset), "text_prior/")
    text.ir_version = net.ir_version
    graph = text.graph
    (text_in,), (text_out,) = [i.name for i in graph.input], [o.name for o in graph.output]
    image = next(i for i in net.graph.input if i.name == "image")
    preamble = [
        helper.make_node("Constant", [], ["text_prior/bgr_order"], value=numpy_helper.from_array(np.array([2, 1, 0], np.int64))),
        helper.make_node("Constant", [], ["text_prior/two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Constant", [], ["text_prior/one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
        helper.make_node("Gather", ["image", "text_prior/bgr_order"], ["text_prior/bgr"], axis=1),
        helper.make_node("Mul", ["text_prior/bgr", "text_prior/two"], ["text_prior/bgr2"]),
        helper.make_node("Sub", ["text_prior/bgr2", "text_prior/one"], [text_in]),
        helper.make_node("Identity", ["image"], ["text_prior/image"]),
    ]
    nodes = [*preamble, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(image)
    graph.output.append(helper.make_tensor_value_info("text_prior/image", image.type.tensor_type.elem_type, None))
    merged = compose.merge_models(text, net, io_map=[(text_out, "text"), ("text_prior/image", "image")],
                                  outputs=[o.name for o in net.graph.output])
    onnx.checker.check_model(merged)
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save(merged, str(tmp))
    os.replace(tmp, out_path)


def discriminator_pixels(bundle: Bundle) -> bool:
    """Whether the bundle's discriminator graph takes the crops too (a statistics head with ``pixel_stats``)."""
    return bundle.discriminator is not None and bundle.discriminator.takes_crops


def graph_modules(bundle: Bundle) -> dict[str, nn.Module]:
    """The bundle's graphs as eval-mode float32 CPU modules (no discriminator or detector entry without one)."""
    modules: dict[str, nn.Module] = {
        "unet": UNetGraph(bundle.unet), "vae_encoder": VAEEncoderGraph(bundle.vae),
        "vae_decoder": VAEDecoderGraph(bundle.vae)}
    if bundle.discriminator is not None:
        graph = PixelDiscriminatorGraph if discriminator_pixels(bundle) else DiscriminatorGraph
        modules["discriminator"] = graph(bundle.discriminator)
    if bundle.detector is not None:
        modules["detector"] = DetectorGraph(bundle.detector)
    return {k: m.eval().float().requires_grad_(False) for k, m in modules.items()}


# -- export ---------------------------------------------------------------------------------------------
@dataclass
class ParityResult:
    """max/mean |ONNX - PyTorch| of one output for one (batch, resolution); ``limit`` = atol + rtol·max|ref|."""

    graph: str
    output: str
    batch: int
    resolution: int
    max_abs: float
    mean_abs: float
    ref_max_abs: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.limit


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: the directory, the files, the parity results and seconds per graph."""

    out_dir: Path
    files: dict[str, list[str]]
    parity: list[ParityResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.parity)


def _random_inputs(spec: GraphSpec, batch: int, resolution: int, f: int, gen: torch.Generator,
                   conditioning: NullConditioning) -> list[torch.Tensor]:
    out = []
    for t in spec.inputs:
        shape = t.shape(batch, resolution, f)
        if t.name == "timestep":
            x = torch.randint(0, 1000, shape, generator=gen).float()
        elif t.name == "image":
            x = torch.rand(shape, generator=gen)
            x = x if spec.name == "detector" else x * 2 - 1  # the detector takes [0,1], the VAE [-1,1]
        elif t.name in ("mask_latent", "mask_image"):
            x = (torch.rand(shape, generator=gen) > 0.5).float()
        elif t.name in ("result_image", "source_image"):
            x = torch.rand(shape, generator=gen) * 2 - 1
        elif t.name == "time_ids":
            x = NullConditioning.add_time_ids(resolution).expand(batch, -1).contiguous()
        elif t.name in ("encoder_hidden_states", "text_embeds"):
            # The conditioning a server feeds: the bundle's empty prompt, plus noise so every weight matters.
            base = conditioning.prompt_embeds if t.name == "encoder_hidden_states" else conditioning.pooled_prompt_embeds
            x = base.float().expand(batch, *base.shape[1:]) + 0.1 * torch.randn(shape, generator=gen)
        else:
            x = torch.randn(shape, generator=gen)
        out.append(x.contiguous())
    return out


def _dynamic_shapes(spec: GraphSpec, max_batch: int, max_latent: int, f: int) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch)
    lat_h, lat_w = Dim("latent_height", min=2, max=max_latent), Dim("latent_width", min=2, max=max_latent)
    sym = {"B": batch, "h": lat_h, "w": lat_w, "H": lat_h * f, "W": lat_w * f}
    return {t.name: {i: sym[d] for i, d in enumerate(t.dims) if isinstance(d, str)} for t in spec.inputs}


def _export_graph(module: nn.Module, spec: GraphSpec, example: Sequence[torch.Tensor], path: Path, *,
                  max_batch: int, max_latent: int, f: int, opset: int) -> list[str]:
    """Export one graph to ``path`` (plus ``path.data`` when large); returns the files written (names)."""
    import warnings

    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(example), dynamo=True, opset_version=opset, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=_dynamic_shapes(spec, max_batch, max_latent, f), external_data=external)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {spec.name}")
    program.save(str(path), external_data=external)
    return sorted(p.name for p in path.parent.glob(path.name + "*"))


def check_parity(module: nn.Module, spec: GraphSpec, onnx_path: Path, *, batches: Sequence[int],
                 buckets: Sequence[int], f: int, conditioning: NullConditioning, seed: int,
                 atol: float, rtol: float) -> list[ParityResult]:
    """Run the ONNX file (onnxruntime, CPU) and the module on the same fresh random inputs.

    Returns one :class:`ParityResult` per (output, batch, bucket); nothing is raised here.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    results = []
    for resolution in buckets:
        for batch in batches:
            inputs = _random_inputs(spec, batch, resolution, f, gen, conditioning)
            with torch.inference_mode():
                ref = module(*inputs)
            refs = ref if isinstance(ref, tuple) else (ref,)
            feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
            outs = session.run([t.name for t in spec.outputs], feeds)
            for t, r, o in zip(spec.outputs, refs, outs, strict=True):
                r = r.float().numpy()
                if o.shape != r.shape:
                    raise ExportError(f"{spec.name}.{t.name}: ONNX shape {o.shape} != PyTorch {r.shape} "
                                      f"at batch {batch}, resolution {resolution}")
                diff = np.abs(o.astype(np.float64) - r)
                ref_max = float(np.abs(r).max())
                results.append(ParityResult(spec.name, t.name, batch, resolution, float(diff.max()), float(diff.mean()),
                                            ref_max, atol + rtol * ref_max))
    return results


def _parity_markdown(report: ExportReport, atol: float, rtol: float, seed: int) -> str:
    lines = ["# ONNX parity (onnxruntime CPU vs PyTorch fp32)\n",
             f"Fresh random inputs (seed {seed}); pass when max |diff| <= {atol:g} + {rtol:g}·max|ref|.\n",
             "| graph | output | batch | resolution | max abs diff | mean abs diff | max abs ref | limit | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in report.parity:
        lines.append(f"| {p.graph} | {p.output} | {p.batch} | {p.resolution} | {p.max_abs:.3g} | {p.mean_abs:.3g} | "
                     f"{p.ref_max_abs:.3g} | {p.limit:.3g} | {'yes' if p.ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def export_onnx(bundle: str | Path | None, out_dir: str | Path, *, buckets: Sequence[int] | None = None,
                max_batch: int = 8, graphs: Sequence[str] | None = None, opset: int = OPSET, atol: float = 1e-3,
                rtol: float = 1e-3, seed: int | None = None,
                progress: Callable[[str], None] | None = None) -> ExportReport:
    """Export the bundle's graphs to ``out_dir`` as ONNX and check each against PyTorch.

    Args:
        bundle: bundle directory (None: the default bundle).
        out_dir: created if missing; gets ``<graph>.onnx`` (+ ``.onnx.data`` above 1 GiB of weights),
            ``export.json`` (the manifest: I/O specs, buckets, conditioning sizes, versions, the UNet's
            ``prediction_type`` and the ``masked_source`` fill),
            ``parity.json`` and ``parity.md``.
        buckets: square resolutions R in px the graphs must serve (default: the bundle's resolution);
            each a multiple of f·2^(UNet down blocks - 1) (64 for SDXL). Parity runs at each.
        max_batch: upper bound of the dynamic batch axis (parity checks batch 1 and min(3, max_batch)).
        graphs: a subset of :data:`GRAPHS` (default: all the bundle has). The detector's parity runs at its
            padded working size, not at the buckets; ``export.json`` then also holds ``detector``: its
            ``config`` (:class:`~cleanplate.detector.DetectorConfig`), ``stride`` (32) and ``side`` (that size).
        atol, rtol: parity tolerance on max |ONNX - PyTorch| per output.
        seed: seed of the random parity inputs (default: fresh from the OS; recorded in the report).
    Returns:
        The :class:`ExportReport`; the files are written even when parity fails.
    Raises:
        InputError: bad buckets, batch bound or graph names. BundleError: unreadable bundle.
        ExportError: the exporter failed, or parity is beyond tolerance (message names the worst output).
    """
    say = progress or (lambda msg: None)
    b = load_bundle(bundle)
    vae_cfg = b.vae.config
    f = 2 ** (len(vae_cfg.block_out_channels) - 1)
    buckets = sorted(set(buckets or [b.config.resolution]))
    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}", code=ErrorCode.BAD_OPTION)
    step = f * 2 ** (len(b.unet.config.block_out_channels) - 1)  # the UNet halves the latent per down block
    if any(r < step or r % step for r in buckets):
        raise InputError(f"resolution buckets must be positive multiples of {step} px for this bundle, got {buckets}",
                         code=ErrorCode.BAD_OPTION)
    modules = graph_modules(b)
    wanted = list(graphs or modules)
    unknown = [g for g in wanted if g not in GRAPHS]
    missing = [g for g in wanted if g in GRAPHS and g not in modules]
    if unknown or missing:
        raise InputError(f"unknown graphs {unknown}" if unknown else f"the bundle has no {missing[0]}",
                         code=ErrorCode.BAD_OPTION)
    cond = b.conditioning
    specs = graph_specs(int(vae_cfg.latent_channels), int(cond.prompt_embeds.shape[-1]),
                        int(cond.pooled_prompt_embeds.shape[-1]), int(cond.prompt_embeds.shape[1]),
                        len(b.detector.config.kinds) if b.detector is not None else 4, discriminator_pixels(b))
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(out, {})
    max_latent = max(max(buckets) // f, 16)
    detector = None
    if "detector" in wanted:
        from cleanplate.detector import STRIDE

        side = -(-b.detector.config.working_size // STRIDE) * STRIDE  # the largest input preprocess makes
        detector = {"config": b.detector.config.model_dump(mode="json"), "stride": STRIDE, "side": side}
    for name in wanted:
        t0 = time.perf_counter()
        say(f"exporting {name}")
        # the detector's sides are multiples of its stride up to its padded working size, not latent sides
        g_f, g_buckets, g_max = (detector["stride"], [detector["side"]], detector["side"] // detector["stride"]) \
            if name == "detector" else (f, buckets, max_latent)
        example = _random_inputs(specs[name], min(2, max_batch), g_buckets[0], g_f, torch.Generator().manual_seed(0),
                                 cond)
        text_prior = b.detector.text_prior if name == "detector" else None
        try:
            if text_prior is None:
                report.files[name] = _export_graph(modules[name], specs[name], example, out / f"{name}.onnx",
                                                   max_batch=max_batch, max_latent=g_max, f=g_f, opset=opset)
            else:  # the network alone, then the text detector composed in front of it
                net_path = out / "detector_net.onnx"
                net_example = [*example, torch.rand(example[0].shape[0], 1, *example[0].shape[2:])]
                net_spec = GraphSpec("detector", (*specs[name].inputs, TensorSpec("text", ("B", 1, "H", "W"))),
                                     specs[name].outputs)
                _export_graph(DetectorNetGraph(b.detector).eval(), net_spec, net_example, net_path,
                              max_batch=max_batch, max_latent=g_max, f=g_f, opset=opset)
                compose_text_prior(net_path, text_prior.path, out / "detector.onnx")
                net_path.unlink()
                report.files[name] = ["detector.onnx"]
        except ExportError:
            raise
        except Exception as exc:  # the exporter raises many types; the user needs the graph and the cause
            raise ExportError(f"exporting {name} failed: {type(exc).__name__}: {exc}") from exc
        say(f"checking {name} against PyTorch")
        report.parity += check_parity(modules[name], specs[name], out / f"{name}.onnx",
                                      batches=sorted({1, min(3, max_batch)}), buckets=g_buckets, f=g_f,
                                      conditioning=cond, seed=seed, atol=atol, rtol=rtol)
        report.seconds[name] = round(time.perf_counter() - t0, 2)

    threshold = None if b.discriminator is None else float(b.discriminator.threshold)
    manifest = {
        "format_version": 1, "bundle": str(b.path) if b.path else None, "bundle_name": b.config.name,
        "resolution": b.config.resolution, "buckets": buckets, "max_batch": max_batch, "opset": opset,
        "vae_scale_factor": f, "resolution_step": step, "latent_channels": int(vae_cfg.latent_channels), "steps": b.config.steps,
        "dilate_px": b.config.dilate_px, "threshold": threshold,
        # how to read unet's noise_pred (ε, x0 or v) and how to fill the masked source it is conditioned on
        "prediction_type": str(b.config.scheduler.get("prediction_type", "epsilon")),
        "masked_source": b.config.masked_source,
        "decode_residual": b.config.decode_residual,
        "residual_scale": b.config.residual_scale,
        "graphs": {name: {"files": report.files[name], "inputs": [asdict(t) for t in specs[name].inputs],
                          "outputs": [asdict(t) for t in specs[name].outputs]} for name in wanted},
        **({"detector": detector} if detector else {}),
        "versions": {"torch": torch.__version__, "onnx_opset": opset},
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    parity = {"seed": seed, "atol": atol, "rtol": rtol, "ok": report.ok,
              "results": [{**asdict(p), "ok": p.ok} for p in report.parity]}
    write_atomic(out / PARITY_JSON, json.dumps(parity, indent=2).encode())
    write_atomic(out / PARITY_MD, _parity_markdown(report, atol, rtol, seed).encode())
    if not report.ok:
        worst = max((p for p in report.parity if not p.ok), key=lambda p: p.max_abs / max(p.limit, 1e-30))
        raise ExportError(f"parity beyond tolerance: {worst.graph}.{worst.output} max |ONNX - PyTorch| = "
                          f"{worst.max_abs:.3g} > {worst.limit:.3g} at batch {worst.batch}, resolution "
                          f"{worst.resolution} (see {out / PARITY_MD})")
    return report


def read_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    """``export.json`` of an ONNX export directory. Raises InputError when it is missing or unreadable."""
    path = Path(onnx_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not an ONNX export directory ({exc})", code=ErrorCode.BAD_EXPORT) from exc
