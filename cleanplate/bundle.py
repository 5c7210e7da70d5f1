"""The model bundle: the one directory that training, export and serving exchange (DESIGN.md).

Layout::

    bundle.json                     BundleConfig below (format version, resolution, steps, ...)
    unet/                           diffusers UNet2DConditionModel (SDXL-inpainting layout, 9 input channels)
    vae/                            diffusers AutoencoderKL
    lcm_lora/                       optional: pytorch_lora_weights.safetensors (diffusers/peft LoRA format)
    null_conditioning.safetensors   prompt_embeds (1,77,D) and pooled_prompt_embeds (1,P) of the empty prompt
    discriminator/                  optional quality gate (cleanplate.discriminator): config.json, model.safetensors
    detector/                       optional overlay detector (cleanplate.detector): config.json, model.safetensors

RORem (arXiv 2501.00740) always prompts with the empty string and guidance 1, so the text conditioning
is a constant: it is computed once here (``from_rorem``) and the text encoders never load at serving time.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BundleError, ErrorCode, missing_extra
from .imaging import write_atomic
from .masked_source import CLASSICAL_FILLS

BUNDLE_FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
NULL_CONDITIONING = "null_conditioning.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
DISCRIMINATOR_DIR = "discriminator"
DETECTOR_DIR = "detector"

# LCMScheduler settings of SDXL (scaled-linear betas 0.00085..0.012 over 1000 steps), as in
# diffusers' LCM-LoRA SDXL recipe; used when a base model gives no scheduler config.
SDXL_LCM_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "original_inference_steps": 50,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": True,
    "clip_sample": False,
    "timestep_scaling": 10.0,
}


# SDXL-inpainting's unet/config.json (diffusers/stable-diffusion-xl-1.0-inpainting-0.1).
SDXL_INPAINT_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 9,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}


class BundleConfig(BaseModel):
    """Contents of ``bundle.json``."""

    model_config = ConfigDict(extra="allow")

    format_version: int = BUNDLE_FORMAT_VERSION
    name: str = "cleanplate"
    resolution: int = Field(512, ge=64, le=4096, description="model input side in px (square)")
    steps: int = Field(4, ge=1, le=50, description="default LCM steps")
    strength: float = Field(1.0, ge=1.0, le=1.0, description="1.0 only: sampling starts from pure noise, as RORem")
    guidance_scale: float = 1.0
    dilate_px: int = Field(8, ge=0, description="default mask dilation radius in source px")
    scheduler: dict[str, Any] = Field(default_factory=lambda: dict(SDXL_LCM_SCHEDULER))
    masked_source: Literal["zero", "telea", "ns"] = Field(
        "zero", description="the UNet's conditioning image: zero = x_s·(1−m) (RORem); telea / ns = the hole "
                            "pre-filled by OpenCV's Telea / Navier-Stokes inpainting (cleanplate.masked_source)")
    decode_residual: bool = Field(
        False, description="the fill is the conditioning image plus the decoded correction, x̃_s + D(ẑ) − D(E(x̃_s)) "
                           "(one more VAE decode): the VAE's reconstruction error of the conditioning image cancels, "
                           "so with a classical masked_source a zero correction returns that fill exactly")
    residual_scale: float = Field(
        1.0, ge=0.0, le=1.0, description="with decode_residual: the fill is x̃_s + s·(D(ẑ) − D(E(x̃_s))); s < 1 damps "
                                         "the learned correction (calibrated on held-out photos, like the gate's threshold)")
    lcm_lora: Literal["none", "separate", "fused"] = "none"
    discriminator: bool = False
    detector: bool = Field(False, description="the bundle has detector/ (the overlay detector that makes masks)")
    provenance: dict[str, Any] = Field(default_factory=dict)

    @property
    def paste_prefill(self) -> str | None:
        """The classical fill ("telea" or "ns") when the fill is that fill plus a learned correction
        (``decode_residual``): paste-back then adds the correction to a full-resolution fill of the window
        (:func:`cleanplate.remover.composite`); None otherwise."""
        return self.masked_source if self.decode_residual and self.masked_source in CLASSICAL_FILLS else None

    @field_validator("scheduler")
    @classmethod
    def _known_prediction_type(cls, scheduler: dict[str, Any]) -> dict[str, Any]:
        from .sampling import PREDICTION_TYPES

        if scheduler.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {scheduler['prediction_type']!r}")
        return scheduler


@dataclass
class NullConditioning:
    """Empty-prompt SDXL conditioning.

    Attributes:
        prompt_embeds: (1, 77, D) float, D = 2048 for SDXL (CLIP-L 768 + OpenCLIP-bigG 1280 penultimate states).
        pooled_prompt_embeds: (1, P) float, P = 1280 for SDXL (text_encoder_2 projection).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor

    @staticmethod
    def add_time_ids(resolution: int) -> torch.Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size), (1, 6) float32.

        The crop is always the full model input, so it is ``[R, R, 0, 0, R, R]`` (SDXL paper, sec. 2.2).
        """
        return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {
                "prompt_embeds": self.prompt_embeds.detach().float().cpu().contiguous(),
                "pooled_prompt_embeds": self.pooled_prompt_embeds.detach().float().cpu().contiguous(),
            },
            str(path),
        )

    @classmethod
    def load(cls, path: Path) -> NullConditioning:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        missing = {"prompt_embeds", "pooled_prompt_embeds"} - tensors.keys()
        if missing:
            raise BundleError(f"{path} lacks tensors {sorted(missing)}", code=ErrorCode.BAD_BUNDLE)
        return cls(tensors["prompt_embeds"], tensors["pooled_prompt_embeds"])


@dataclass
class Bundle:
    """A loaded bundle: modules on the CPU in float32 (the pipeline moves and casts them)."""

    path: Path | None
    config: BundleConfig
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    conditioning: NullConditioning
    discriminator: Any = None  # cleanplate.discriminator.Discriminator when config.discriminator
    detector: Any = None  # cleanplate.detector.Detector when config.detector


def default_bundle_path() -> Path:
    """Directory of the small default bundle shipped inside the package."""
    return Path(str(resources.files("cleanplate") / "default_bundle"))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise BundleError(f"bundle is missing {what}: {path}", code=ErrorCode.BAD_BUNDLE)
    return path


def read_config(bundle_dir: str | Path) -> BundleConfig:
    """Read and validate ``bundle.json``. Raises BundleError naming the file and the bad field."""
    path = _require(Path(bundle_dir) / BUNDLE_JSON, BUNDLE_JSON)
    try:
        config = BundleConfig.model_validate_json(path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BundleError(f"{path}: invalid {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
    if config.format_version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {config.format_version} is newer than this cleanplate")
    return config


def load_bundle(bundle_dir: str | Path | None = None, *, fuse_lora: bool = True) -> Bundle:
    """Load a bundle directory (the default bundle when None).

    With ``fuse_lora`` a separate ``lcm_lora/`` is merged into the UNet weights (W + BA, scale 1)
    so serving runs the plain UNet. Raises BundleError naming the first missing file.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = Path(bundle_dir) if bundle_dir is not None else default_bundle_path()
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    config = read_config(root)
    _require(root / "unet" / "config.json", "unet/config.json")
    _require(root / "vae" / "config.json", "vae/config.json")
    conditioning = NullConditioning.load(_require(root / NULL_CONDITIONING, NULL_CONDITIONING))
    # accelerate (the train extra) only makes loading leaner; without it diffusers loads the same weights the
    # plain way, and is told so rather than warning on every load of the base install.
    lean = importlib.util.find_spec("accelerate") is not None
    try:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=lean)
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=lean)
    except (OSError, ValueError) as exc:  # diffusers reports missing weight files as OSError
        raise BundleError(f"cannot load model weights from {root}: {exc}") from exc
    if unet.config.in_channels != 2 * vae.config.latent_channels + 1:
        raise BundleError(
            f"{root}: unet takes {unet.config.in_channels} channels, an inpainting UNet for this VAE needs "
            f"{2 * vae.config.latent_channels + 1} (latent + mask + masked-source latent)"
        )
    if config.lcm_lora == "separate":
        lora_file = _require(root / "lcm_lora" / LORA_WEIGHTS, f"lcm_lora/{LORA_WEIGHTS}")
        load_lora_into_unet(unet, lora_file.parent)
        if fuse_lora:
            unet.fuse_lora(lora_scale=1.0)
            unet.unload_lora()
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    discriminator = None
    if config.discriminator:
        from .discriminator import load_discriminator

        discriminator = load_discriminator(_require(root / DISCRIMINATOR_DIR, f"{DISCRIMINATOR_DIR}/"))
    detector = None
    if config.detector:
        from .detector import load_detector

        detector = load_detector(_require(root / DETECTOR_DIR, f"{DETECTOR_DIR}/"))
    return Bundle(root, config, unet, vae, conditioning, discriminator, detector)


def attach_discriminator(bundle_dir: str | Path, discriminator: Any, calibration: dict[str, Any] | None = None) -> Path:
    """Write ``discriminator/`` into an existing bundle and set ``discriminator: true`` in its bundle.json.

    The directory is written beside the old one and swapped in; bundle.json is replaced atomically last,
    so an interrupted call leaves the bundle as it was or complete.
    """
    return _attach(bundle_dir, DISCRIMINATOR_DIR, discriminator, calibration)


def attach_detector(bundle_dir: str | Path, detector: Any, calibration: dict[str, Any] | None = None) -> Path:
    """Write ``detector/`` (a :class:`cleanplate.detector.Detector`) into an existing bundle and set
    ``detector: true`` in its bundle.json, the same atomic way as :func:`attach_discriminator`."""
    return _attach(bundle_dir, DETECTOR_DIR, detector, calibration)


def _attach(bundle_dir: str | Path, name: str, component: Any, calibration: dict[str, Any] | None) -> Path:
    """``component.save`` into ``name/`` beside the old one, swapped in; bundle.json (flag ``name``) last."""
    root = Path(bundle_dir)
    config = read_config(root)
    tmp = root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    component.save(tmp, calibration=calibration)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    config = config.model_copy(update={name: True})
    write_atomic(root / BUNDLE_JSON, (json.dumps(config.model_dump(), indent=2) + "\n").encode())
    return final


def load_lora_into_unet(unet: Any, lora_dir: str | Path, adapter_name: str = "lcm") -> None:
    """Attach a LoRA saved in diffusers, peft or kohya format (e.g. ``latent-consistency/lcm-lora-sdxl``)."""
    if importlib.util.find_spec("peft") is None:  # diffusers' own error would only say "PEFT backend is required"
        raise missing_extra(ModuleNotFoundError("no peft", name="peft"))
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    # lora_state_dict converts kohya/peft key layouts to diffusers' and returns alphas separately.
    state_dict, network_alphas = StableDiffusionXLPipeline.lora_state_dict(str(lora_dir), weight_name=LORA_WEIGHTS)
    unet_keys = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    if not unet_keys:
        raise BundleError(f"{lora_dir}: no UNet LoRA weights found")
    # save_lora_weights(convert_state_dict_to_diffusers(peft state)) (our LCM trainer) writes attention layers
    # as "lora.down/up" but convs as "lora_A/B"; load_lora_adapter converts only when the *first* key is
    # old-style and would silently drop the rest. Convert every key (a no-op on peft-style keys).
    unet_keys = convert_unet_state_dict_to_peft(unet_keys)
    unet.load_lora_adapter(unet_keys, network_alphas=network_alphas, prefix="unet", adapter_name=adapter_name)


def save_bundle(
    out_dir: str | Path,
    *,
    config: BundleConfig,
    unet: Any,
    vae: Any,
    conditioning: NullConditioning,
    lora_dir: str | Path | None = None,
    discriminator: Any = None,
    detector: Any = None,
) -> Path:
    """Write a bundle directory; replaces ``out_dir`` atomically (written beside it, then renamed).

    ``unet`` must not carry LoRA layers (save those with ``lora_dir``, a directory holding
    ``pytorch_lora_weights.safetensors``); ``config.lcm_lora`` is set from what is written, and so are
    ``config.discriminator`` and ``config.detector`` (a config copied from a bundle with a detector does not
    claim one unless ``detector`` is given).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    conditioning.save(tmp / NULL_CONDITIONING)
    if lora_dir is not None:
        (tmp / "lcm_lora").mkdir()
        shutil.copy2(Path(lora_dir) / LORA_WEIGHTS, tmp / "lcm_lora" / LORA_WEIGHTS)
        config = config.model_copy(update={"lcm_lora": "separate"})
    elif config.lcm_lora == "separate":
        config = config.model_copy(update={"lcm_lora": "none"})
    if discriminator is not None:
        discriminator.save(tmp / DISCRIMINATOR_DIR)
    if detector is not None:
        detector.save(tmp / DETECTOR_DIR)
    config = config.model_copy(update={"discriminator": discriminator is not None, "detector": detector is not None})
    (tmp / BUNDLE_JSON).write_text(json.dumps(config.model_dump(), indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


@torch.no_grad()
def encode_empty_prompt(base_dir: str | Path) -> NullConditioning:
    """Run SDXL's two text encoders once on the empty prompt, as StableDiffusionXLPipeline.encode_prompt does.

    prompt_embeds = concat(CLIP-L penultimate hidden states, OpenCLIP-bigG penultimate hidden states);
    pooled = text_encoder_2's projected pooled output. Reads ``tokenizer/``, ``tokenizer_2/``,
    ``text_encoder/``, ``text_encoder_2/`` under ``base_dir``; raises BundleError if one is missing.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = Path(base_dir)
    for sub in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        _require(base / sub, f"{sub}/ in the SDXL-inpainting base")
    states, pooled = [], None
    for tok_dir, enc_dir, cls in (
        ("tokenizer", "text_encoder", CLIPTextModel),
        ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection),
    ):
        tokenizer = CLIPTokenizer.from_pretrained(base / tok_dir)
        encoder = cls.from_pretrained(base / enc_dir).eval()
        ids = tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if cls is CLIPTextModelWithProjection:
            pooled = out.text_embeds
    return NullConditioning(torch.cat(states, dim=-1).float(), pooled.float())


def from_rorem(
    base_dir: str | Path,
    unet_dir: str | Path,
    out_dir: str | Path,
    *,
    lora_dir: str | Path | None = None,
    resolution: int = 512,
    name: str = "rorem",
) -> Path:
    """Convert the published RORem layout into a bundle.

    Args:
        base_dir: diffusers SDXL-inpainting directory (``vae/``, ``text_encoder*/``, ``tokenizer*/``,
            ``scheduler/``; its ``unet/`` is not used).
        unet_dir: the RORem UNet in diffusers format (a directory with ``config.json``, or its parent
            holding ``unet/``).
        lora_dir: optional LCM-LoRA directory holding ``pytorch_lora_weights.safetensors``.
        resolution: model input side in px (RORem trains and runs at 512).
    Raises:
        BundleError: a required directory or file is missing.
    """
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel

    base, unet_path = Path(base_dir), Path(unet_dir)
    if not (unet_path / "config.json").exists() and (unet_path / "unet" / "config.json").exists():
        unet_path = unet_path / "unet"
    _require(unet_path / "config.json", "the RORem UNet config.json")
    _require(base / "vae" / "config.json", "vae/config.json in the SDXL-inpainting base")
    conditioning = encode_empty_prompt(base)
    unet = UNet2DConditionModel.from_pretrained(unet_path)
    vae = AutoencoderKL.from_pretrained(base / "vae")
    scheduler = dict(SDXL_LCM_SCHEDULER)
    if (base / "scheduler" / "scheduler_config.json").exists():
        scheduler = dict(LCMScheduler.from_pretrained(base / "scheduler").config)
    if lora_dir is not None:
        _require(Path(lora_dir) / LORA_WEIGHTS, f"{LORA_WEIGHTS} in the LCM-LoRA directory")
    config = BundleConfig(
        name=name,
        resolution=resolution,
        scheduler={k: v for k, v in scheduler.items() if not k.startswith("_")},
        provenance={"converted_from": {"base": str(base), "unet": str(unet_path), "lora": str(lora_dir)}},
    )
    return save_bundle(out_dir, config=config, unet=unet, vae=vae, conditioning=conditioning, lora_dir=lora_dir)
