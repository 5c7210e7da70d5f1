"""The `cleanplate` command line, end to end on real photos with the tiny random-weight bundle.

Most runs call ``cleanplate.cli.main`` in-process (the console script's entry point, which turns a
CleanplateError into one ``error:`` line and exit 2); one runs the installed console script itself.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cleanplate.imaging import decode_image, dilate_mask

DILATE = 3


def assert_one_error_line(err: str) -> str:
    """Exit-2 contract: the last stderr line is the one ``error:`` line, and there is no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("error: ")
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


# -- inputs ------------------------------------------------------------------------------------------
def _rect_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture(scope="module")
def coffee_files(tmp_path_factory, photos) -> dict[str, Path]:
    """coffee (400x600) as PNG and JPEG, a mask PNG (white = remove) and the mask array."""
    d = tmp_path_factory.mktemp("coffee")
    img = photos["coffee"]
    Image.fromarray(img).save(d / "coffee.png")
    Image.fromarray(img).save(d / "coffee.jpg", quality=90)
    mask = _rect_mask(*img.shape[:2], 150, 190, 260, 330)
    mask[300:310, 40:90] = True  # a second, disjoint mark
    Image.fromarray(mask.astype(np.uint8) * 255).save(d / "mask.png")
    np.save(d / "mask.npy", mask)
    return {"png": d / "coffee.png", "jpg": d / "coffee.jpg", "mask": d / "mask.png",
            "mask_npy": d / "mask.npy"}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize(
    ("src", "suffix", "fmt", "exact"),
    [("png", ".png", "PNG", True), ("png", ".webp", "WEBP", True),  # WEBP is lossless for a PNG source
     ("jpg", ".png", "PNG", True), ("jpg", ".jpg", "JPEG", False)],
)
def test_remove_real_photo(cli, tiny_bundle, coffee_files, tmp_path, src, suffix, fmt, exact):
    out = tmp_path / f"clean{suffix}"
    r = cli("remove", coffee_files[src], "--mask", coffee_files["mask"], "-o", out, "--bundle", tiny_bundle,
            "--dilate-px", DILATE)
    assert r.code == 0, r.err
    assert out.exists()
    assert Image.open(out).format == fmt
    before, after = decode_image(coffee_files[src]), decode_image(out)
    assert after.size == before.size == (600, 400)
    assert after.alpha is None
    mask = np.load(coffee_files["mask_npy"])
    outside = ~dilate_mask(mask, DILATE)
    if exact:
        np.testing.assert_array_equal(after.pixels[outside], before.pixels[outside])
    else:  # JPEG re-encode: close, not equal
        assert _psnr(after.pixels[outside], before.pixels[outside]) > 35
    # the masked pixels were replaced by the (random) model's fill
    assert np.abs(after.pixels[mask].astype(int) - before.pixels[mask].astype(int)).mean() > 5


def test_mask_from_alpha_gives_opaque_output(cli, tiny_bundle, photos, tmp_path):
    rgb = photos["chelsea"]  # 300x451
    hole = _rect_mask(*rgb.shape[:2], 100, 140, 200, 260)
    alpha = np.where(hole, 0, 255).astype(np.uint8)
    src = tmp_path / "cat.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src)
    out = tmp_path / "out.png"
    r = cli("remove", src, "-o", out, "--bundle", tiny_bundle, "--dilate-px", DILATE)
    assert r.code == 0, r.err
    after = decode_image(out)
    assert after.alpha is None and Image.open(out).mode == "RGB"
    assert after.size == (451, 300)
    outside = ~dilate_mask(hole, DILATE)
    np.testing.assert_array_equal(after.pixels[outside], rgb[outside])
    assert not np.array_equal(after.pixels[hole], rgb[hole])


def test_rgba_input_with_mask_keeps_alpha(cli, tiny_bundle, photos, tmp_path):
    rgb = photos["chelsea"]
    h, w = rgb.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))  # includes fully transparent pixels
    src = tmp_path / "cat.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src)
    mask = _rect_mask(h, w, 100, 140, 200, 260)
    mpath = tmp_path / "m.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(mpath)
    out = tmp_path / "out.png"
    r = cli("remove", src, "--mask", mpath, "-o", out, "--bundle", tiny_bundle, "--dilate-px", DILATE)
    assert r.code == 0, r.err
    after = decode_image(out)
    assert after.alpha is not None
    np.testing.assert_array_equal(after.alpha, alpha)
    outside = ~dilate_mask(mask, DILATE)
    np.testing.assert_array_equal(after.pixels[outside], rgb[outside])


# -- folders -----------------------------------------------------------------------------------------
def _folder(tmp_path: Path, photos, names: list[str]) -> tuple[Path, Path]:
    images, masks = tmp_path / "in", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, name in enumerate(names):
        rgb = photos[["coffee", "chelsea", "astronaut"][i % 3]][:96, :128]
        Image.fromarray(rgb).save(images / name)
        m = _rect_mask(96, 128, 30 + i, 50 + i, 40, 70)
        Image.fromarray(m.astype(np.uint8) * 255).save(masks / (Path(name).stem + ".png"))
    return images, masks


def test_folder_mode(cli, tiny_bundle, photos, tmp_path):
    images, masks = _folder(tmp_path, photos, ["a.png", "b.jpg", "c.png"])
    out = tmp_path / "out"
    r = cli("remove", images, "--mask", masks, "-o", out, "--bundle", tiny_bundle, "--dilate-px", 2)
    assert r.code == 0, r.err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg", "c.png"]
    for p in out.iterdir():
        assert decode_image(p).size == decode_image(images / p.name).size
    assert Image.open(out / "b.jpg").format == "JPEG"


def test_folder_with_a_broken_image(cli, tiny_bundle, photos, tmp_path):
    images, masks = _folder(tmp_path, photos, ["a.png", "c.png"])
    (images / "b.png").write_bytes(b"this is not a png at all" * 10)
    Image.fromarray(_rect_mask(96, 128, 30, 50, 40, 70).astype(np.uint8) * 255).save(masks / "b.png")
    out = tmp_path / "out"
    r = cli("remove", images, "--mask", masks, "-o", out, "--bundle", tiny_bundle)
    assert r.code == 2
    assert "Traceback" not in r.err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert any("b.png" in line for line in r.err.splitlines() if line.startswith("error:"))
    assert r.err.strip().splitlines()[-1].startswith("error: 1 of 3")


# -- errors ------------------------------------------------------------------------------------------
def _bomb_png(path: Path, w: int = 20000, h: int = 20000) -> None:
    """A real 1x1 PNG whose IHDR claims w x h (CRC fixed up, so only the size check can refuse it)."""
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.fixture
def error_case(tmp_path, photos, tiny_bundle):
    """Build the files of one bad-input case; returns (argv without -o, expected text in the error line)."""
    rgb = photos["coffee"][:120, :160]
    img = tmp_path / "img.png"
    Image.fromarray(rgb).save(img)

    def mask_file(arr: np.ndarray) -> Path:
        p = tmp_path / "mask.png"
        Image.fromarray(arr.astype(np.uint8) * 255).save(p)
        return p

    good_mask = mask_file(_rect_mask(120, 160, 40, 60, 50, 90))

    def build(case: str) -> tuple[list, str]:
        base = ["--bundle", tiny_bundle]
        if case == "unreadable":
            bad = tmp_path / "bad.png"
            bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
            return [bad, "--mask", good_mask, *base], "bad.png"
        if case == "missing":
            return [tmp_path / "nope.png", "--mask", good_mask, *base], "nope.png"
        if case == "size_mismatch":
            return [img, "--mask", mask_file(_rect_mask(60, 160, 10, 20, 10, 20)), *base], "160x60"
        if case == "empty_mask":
            return [img, "--mask", mask_file(np.zeros((120, 160), bool)), *base], "empty"
        if case == "full_mask":
            return [img, "--mask", mask_file(np.ones((120, 160), bool)), *base], "whole image"
        if case == "bomb":  # Pillow's own bomb check refuses it
            bomb = tmp_path / "bomb.png"
            _bomb_png(bomb, 20000, 20000)
            return [bomb, "--mask", good_mask, *base], "pixels"
        if case == "bomb_81mp":  # under Pillow's limit, over cleanplate's 64 MP
            bomb = tmp_path / "bomb.png"
            _bomb_png(bomb, 9000, 9000)
            return [bomb, "--mask", good_mask, *base], "9000x9000"
        if case == "steps0":
            return [img, "--mask", good_mask, "--steps", 0, *base], "steps"
        if case == "cuda":
            return [img, "--mask", good_mask, "--device", "cuda", *base], "cuda"
        if case == "no_bundle_json":
            fake = tmp_path / "fake_bundle"
            shutil.copytree(tiny_bundle, fake)
            (fake / "bundle.json").unlink()
            return [img, "--mask", good_mask, "--bundle", fake], "bundle.json"
        raise AssertionError(case)

    return build


ERROR_CASES = ["unreadable", "missing", "size_mismatch", "empty_mask", "full_mask", "bomb", "bomb_81mp",
               "steps0", "cuda", "no_bundle_json"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_exits_2_and_writes_nothing(cli, error_case, tmp_path, case):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, expected = error_case(case)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli("remove", *args, "-o", out_dir / "result.png")
    assert r.code == 2, r.err
    line = assert_one_error_line(r.err)
    assert expected in line
    assert list(out_dir.iterdir()) == []  # no output, no temp file


def test_unknown_output_suffix(cli, error_case, tmp_path):
    args, _ = error_case("size_mismatch")  # the suffix is refused before anything else is looked at
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli("remove", *args, "-o", out_dir / "result.gif")
    assert r.code == 2
    assert ".gif" in assert_one_error_line(r.err)
    assert list(out_dir.iterdir()) == []


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("cleanplate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cleanplate.cli"]


def test_console_script_error_contract(error_case, tmp_path):
    """The installed script itself: exit 2, one last ``error:`` line, no traceback, nothing written."""
    args, expected = error_case("size_mismatch")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*_console_script(), "remove", *map(str, args), "-o", str(out_dir / "r.png")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected in assert_one_error_line(proc.stderr)
    assert list(out_dir.iterdir()) == []


def test_existing_output_is_replaced_atomically(cli, tiny_bundle, coffee_files, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "clean.png"
    out.write_bytes(b"old contents")
    os.chmod(out, 0o640)
    r = cli("remove", coffee_files["png"], "--mask", coffee_files["mask"], "-o", out, "--bundle", tiny_bundle)
    assert r.code == 0, r.err
    assert out.read_bytes() != b"old contents"
    assert decode_image(out).size == (600, 400)
    assert [p.name for p in out_dir.iterdir()] == ["clean.png"]  # no temp file left
    assert out.stat().st_mode & 0o777 == 0o640  # permissions of the replaced file kept


# -- other commands ----------------------------------------------------------------------------------
def test_bundle_info(cli, tiny_bundle):
    r = cli("bundle", "info", tiny_bundle)
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["resolution"] == 64
    assert info["name"] == "tiny"
    assert info["lcm_lora"] == "none"


def test_bundle_info_without_bundle_json(cli, tmp_path):
    r = cli("bundle", "info", tmp_path)
    assert r.code == 2
    assert "bundle.json" in assert_one_error_line(r.err)


def test_data_synth(cli, tmp_path):
    out = tmp_path / "data"
    r = cli("data", "synth", "--n", 3, "--out", out, "--size", 64)
    assert r.code == 0, r.err
    entries = json.loads((out / "meta.json").read_text())
    assert len(entries) == 3
    for e in entries:
        for key in ("source", "mask", "GT"):
            assert Image.open(out / e[key]).size == (64, 64)
