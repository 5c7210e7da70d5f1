"""Shared fixtures: tiny models built from configs (no download), real photos from scikit-image."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cleanplate.training.common import load_model_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one intra-op thread is faster than two, and far faster beside any other CPU work.
torch.set_num_threads(1)

# SDXL-inpainting UNet layout at toy width and its VAE: one home, training/configs/toy_unet.json and
# toy_vae.json, which the benchmarks' --arch tiny builds too.
TINY_UNET = load_model_config("toy_unet")
TINY_VAE = load_model_config("toy_vae")


def make_tiny_bundle(out: Path, resolution: int = 64, seed: int = 0) -> Path:
    """A random-weight bundle with SDXL-shaped modules (VAE factor 2) at ``resolution``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from cleanplate.bundle import BundleConfig, NullConditioning, save_bundle

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    cond = NullConditioning(torch.randn(1, 77, 16), torch.randn(1, 16))
    return save_bundle(out, config=BundleConfig(name="tiny", resolution=resolution, dilate_px=2),
                       unet=unet, vae=vae, conditioning=cond)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos: RGB astronaut (512²), coffee (400x600), chelsea (300x451), grey camera (512²)."""
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
            "camera": data.camera()}


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic 64 px triplets (meta.json) for trainer tests."""
    from cleanplate.training.synth import SynthConfig, synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("synth"), 12, seed=5, cfg=SynthConfig(size=64), progress=False)


def overlaid_photos(photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For the detector's engines: real photos (one non-square) with a storefront overlay drawn by data synth
    (names ending in "+overlay"), and a clean one; the shipped detector finds the overlays and leaves the
    clean photo clean."""
    from cleanplate.training.synth import add_overlay

    return {"coffee+overlay": add_overlay(photos["coffee"], np.random.default_rng([99, 1]))[0],
            "astronaut+overlay": add_overlay(photos["astronaut"], np.random.default_rng([99, 2]))[0],
            "chelsea": photos["chelsea"]}


def make_tiny_gated_bundle(out: Path, resolution: int = 64) -> Path:
    """:func:`make_tiny_bundle` plus a random-init discriminator (threshold 0.5) in ``discriminator/``."""
    from cleanplate.bundle import attach_discriminator, load_bundle
    from cleanplate.discriminator import Discriminator

    path = make_tiny_bundle(out, resolution)
    b = load_bundle(path)
    torch.manual_seed(1)
    disc = Discriminator.from_unet(b.unet, b.conditioning, vae_scale_factor=2, head_channels=16)
    attach_discriminator(path, disc, {"note": "random init, for tests"})
    return path


def bundle_variant(src: Path, out: Path, *, prediction_type: str | None = None,
                   masked_source: str | None = None, decode_residual: bool | None = None,
                   residual_scale: float | None = None) -> Path:
    """A copy of the bundle ``src`` at ``out`` (same weights) whose bundle.json says another
    ``scheduler.prediction_type``, ``masked_source`` and/or ``decode_residual``; validated by reading it back."""
    import json
    import shutil

    from cleanplate.bundle import BUNDLE_JSON, read_config

    shutil.copytree(src, out)
    config = json.loads((out / BUNDLE_JSON).read_text())
    if prediction_type is not None:
        config["scheduler"]["prediction_type"] = prediction_type
    if masked_source is not None:
        config["masked_source"] = masked_source
    if decode_residual is not None:
        config["decode_residual"] = decode_residual
    if residual_scale is not None:
        config["residual_scale"] = residual_scale
    (out / BUNDLE_JSON).write_text(json.dumps(config, indent=2) + "\n")
    read_config(out)
    return out


@pytest.fixture(scope="session")
def gated_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gated_bundle(tmp_path_factory.mktemp("gated") / "tiny")


@pytest.fixture(scope="session")
def gated_onnx(gated_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cleanplate export onnx`` of :func:`gated_bundle`: buckets 64 and 128, batch <= 4, parity seed 11."""
    from cleanplate.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    export_onnx(gated_bundle, out, buckets=[64, 128], max_batch=4, seed=11)
    return out


@contextmanager
def serve_in_thread(app, timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``app`` under a real uvicorn on 127.0.0.1 (free port) in a thread; yields the base URL once
    /readyz answers (or /healthz, for apps whose engine never gets ready); stops the server after."""
    import threading
    import time

    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    while httpx.get(url + "/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``cleanplate ARGS`` in this process through ``main()``; returns exit code, stdout, stderr."""

    def run(*args: object) -> Run:
        monkeypatch.setattr(sys, "argv", ["cleanplate", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            from cleanplate.cli import main

            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run
