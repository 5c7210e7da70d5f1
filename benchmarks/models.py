"""Model parts for the benchmarks: a bundle's UNet + VAE, or an SDXL-inpainting architecture built from its
configs with random weights (no download), plus the two CLIP text encoders and tokenizers that diffusers'
``StableDiffusionXLInpaintPipeline`` needs, built offline to fit the UNet.

Architectures (``arch``):

* ``bundle``: the bundle's UNet (LCM-LoRA fused) and VAE; text encoders are tiny random CLIP models
  whose widths fit the UNet (prompt width = ``cross_attention_dim``, pooled width = the UNet's
  ``text_time`` embedding input minus 6 time ids).
* ``tiny``: an SDXL-shaped toy (2 blocks, width 16/32, VAE factor 2) with random weights; for tests.
* ``sdxl``: the full-size SDXL-inpainting UNet (``cleanplate.bundle.SDXL_INPAINT_UNET_CONFIG``,
  2.6 B parameters), SDXL's VAE, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, random
  weights, built directly on the GPU. Needs CUDA: about 8 GB of GPU memory in fp16 (12 GB while the
  UNet is initialised in fp32).

The tokenizers are CLIP BPE tokenizers over a byte-level vocabulary with no merges (each character is a
token), written to a temporary folder: enough for RORem's empty prompt, and no vocabulary download.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cleanplate.bundle import SDXL_INPAINT_UNET_CONFIG, SDXL_LCM_SCHEDULER, BundleConfig, NullConditioning
from cleanplate.errors import ErrorCode, InputError
from cleanplate.training.common import load_model_config

ARCHS = ("bundle", "tiny", "sdxl")

# SDXL's vae/config.json (stabilityai/stable-diffusion-xl-base-1.0; the inpainting model uses the same VAE).
SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
}
# SDXL's text_encoder (CLIP ViT-L/14 text tower) and text_encoder_2 (OpenCLIP ViT-bigG/14 text tower) configs.
CLIP_L_TEXT: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                               "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
                               "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_BIGG_TEXT: dict[str, Any] = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                                  "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu",
                                  "vocab_size": 49408, "max_position_embeddings": 77}
# SDXL-inpainting layout at toy width: the tests' toy models, one home (training/configs/toy_*.json).
TINY_UNET: dict[str, Any] = load_model_config("toy_unet")
TINY_VAE: dict[str, Any] = load_model_config("toy_vae")


@dataclass
class ModelParts:
    """Everything both pipelines need, on ``device`` in ``dtype`` (the VAE in fp32 when it must upcast).

    Attributes:
        text_widths: (prompt width of text_encoder, of text_encoder_2, pooled width) in channels.
        scheduler: LCMScheduler config dict; resolution: default model side in px.
    """

    arch: str
    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: dict[str, Any]
    resolution: int
    device: torch.device
    dtype: torch.dtype
    dilate_px: int = 8
    discriminator: Any = None
    source: str = ""
    text_widths: tuple[int, int, int] = (0, 0, 0)
    parameters: dict[str, int] = field(default_factory=dict)

    @torch.inference_mode()
    def null_conditioning(self) -> NullConditioning:
        """The empty prompt through both text encoders, as ``StableDiffusionXLPipeline.encode_prompt``:
        concat of penultimate hidden states (1,77,D) and text_encoder_2's projected pooled output (1,P)."""
        states, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
        return NullConditioning(torch.cat(states, dim=-1).float().cpu(), pooled.float().cpu())

    def removal_pipeline(self, conditioning: NullConditioning | None = None, resolution: int | None = None,
                         steps: int = 4) -> Any:
        """cleanplate's :class:`~cleanplate.pipeline.RemovalPipeline` over these same UNet and VAE weights."""
        from cleanplate.pipeline import RemovalPipeline

        vae_dtype = torch.float32 if self.dtype is torch.float16 and self.vae.config.get("force_upcast", False) \
            else self.dtype
        # A copy of the same weights: diffusers' SDXL pipelines cast their VAE between fp16 and fp32 inside
        # each call, which must not change the dtype under cleanplate's pipeline.
        vae = copy.deepcopy(self.vae)
        vae = vae if vae.dtype == vae_dtype else vae.to(vae_dtype)
        config = BundleConfig(name=f"bench-{self.arch}", resolution=resolution or self.resolution, steps=steps,
                              dilate_px=self.dilate_px, scheduler=dict(self.scheduler))
        disc = self.discriminator.to(self.device, self.dtype) if self.discriminator is not None else None
        return RemovalPipeline(self.unet, vae, conditioning or self.null_conditioning(), config, self.device,
                               self.dtype, vae_dtype, disc)


def byte_level_tokenizers(folder: Path) -> tuple[Any, Any]:
    """Two CLIPTokenizers (pad ``<|endoftext|>`` as SDXL's tokenizer, ``!`` as its tokenizer_2) over a
    byte-level vocabulary of 514 tokens without merges, written under ``folder``."""
    from transformers import CLIPTokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):  # GPT-2 / CLIP bytes_to_unicode
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tuple(CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                               pad_token=pad) for pad in ("<|endoftext|>", "!"))  # type: ignore[return-value]


def _text_encoders(widths: tuple[int, int, int], vocab: dict[str, int], full: dict[str, Any] | None = None,
                   full_2: dict[str, Any] | None = None) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    if full is not None:
        c1, c2 = CLIPTextConfig(**full, **ids), CLIPTextConfig(**full_2, **ids)
    else:
        small = dict(vocab_size=len(vocab), max_position_embeddings=77, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=4 * max(widths[:2]), **ids)
        c1 = CLIPTextConfig(hidden_size=widths[0], projection_dim=widths[0], **small)
        c2 = CLIPTextConfig(hidden_size=widths[1], projection_dim=widths[2], **small)
    return CLIPTextModel(c1).eval(), CLIPTextModelWithProjection(c2).eval()


def _split_widths(unet_config: Any) -> tuple[int, int, int]:
    """(text_encoder width, text_encoder_2 width, pooled width) that fit a text_time SDXL UNet."""
    d = int(unet_config.cross_attention_dim)
    pooled = int(unet_config.projection_class_embeddings_input_dim) - 6 * int(unet_config.addition_time_embed_dim)
    second = d // 2 if d != 2048 else 1280
    return d - second, second, pooled


def build_parts(arch: str = "bundle", *, bundle: str | Path | None = None, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "fp32", seed: int = 0) -> ModelParts:
    """Build :class:`ModelParts` for ``arch`` (see the module docstring).

    Raises:
        InputError: unknown arch; ``sdxl`` without a CUDA device; fp16 on the CPU.
        BundleError: an unreadable bundle.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from cleanplate.pipeline import resolve_device, resolve_dtype

    if arch not in ARCHS:
        raise InputError(f"unknown arch {arch!r}; use one of {ARCHS}", code=ErrorCode.BAD_OPTION)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if arch == "sdxl" and dev.type not in ("cuda", "meta"):  # meta: build the shapes only (tests)
        raise InputError("--arch sdxl builds the full-size SDXL-inpainting UNet (2.6 B parameters) and both SDXL text "
                         "encoders with random weights in fp16; it needs a CUDA GPU (about 8 GB of GPU memory, 12 GB "
                         f"while building), and this run's device is {dev}", code=ErrorCode.BAD_OPTION)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="cleanplate-tok-") as tmp:
        tokenizer, tokenizer_2 = byte_level_tokenizers(Path(tmp))
    vocab = tokenizer.get_vocab()
    disc, dilate, source = None, 8, arch
    if arch == "bundle":
        from cleanplate.bundle import default_bundle_path, load_bundle

        b = load_bundle(bundle)
        unet, vae, scheduler, resolution = b.unet, b.vae, dict(b.config.scheduler), b.config.resolution
        disc, dilate, source = b.discriminator, b.config.dilate_px, str(bundle or default_bundle_path())
        widths = _split_widths(unet.config)
        te1, te2 = _text_encoders(widths, vocab)
    elif arch == "tiny":
        unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
        scheduler, resolution, dilate = dict(SDXL_LCM_SCHEDULER), 64, 2
        widths = _split_widths(unet.config)
        te1, te2 = _text_encoders(widths, vocab)
    else:
        with torch.device(dev):  # initialise on the GPU: 2.6 B fp32 parameters would take minutes on a CPU
            unet = UNet2DConditionModel(**SDXL_INPAINT_UNET_CONFIG)
            vae = AutoencoderKL(**SDXL_VAE_CONFIG)
            te1, te2 = _text_encoders((768, 1280, 1280), vocab, CLIP_L_TEXT, CLIP_BIGG_TEXT)
        scheduler, resolution, widths = dict(SDXL_LCM_SCHEDULER), 512, (768, 1280, 1280)
    vae_dt = torch.float32 if dt is torch.float16 and vae.config.get("force_upcast", False) else dt
    # Cast only when needed: diffusers warns on every .to(dtype), even a no-op one.
    unet, vae, te1, te2 = (m.to(dev) if m.dtype == want else m.to(dev, want)
                           for m, want in ((unet, dt), (vae, vae_dt), (te1, dt), (te2, dt)))
    for m in (unet, vae, te1, te2):
        m.eval().requires_grad_(False)
    params = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2))}
    return ModelParts(arch, unet, vae, te1, te2, tokenizer, tokenizer_2, scheduler, resolution, dev, dt, dilate, disc,
                      source, widths, params)
