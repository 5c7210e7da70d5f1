"""The base install removes: `cleanplate remove` runs with every extra's packages hidden, and a command that
needs a missing extra says which one in one line (exit 2).

The packages are hidden by a ``sitecustomize`` on PYTHONPATH that replaces the path finder with one that
does not see them: ``import fastapi`` raises ModuleNotFoundError and ``importlib.util.find_spec`` and
``importlib.metadata`` answer as if they were not installed, which is what libraries probe (diffusers looks
for accelerate and peft that way).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cleanplate.errors import EXTRA_OF_MODULE
from cleanplate.imaging import dilate_mask

ROOT = Path(__file__).resolve().parents[1]

# Every package an extra brings that a library could import on its own if it found it.
HIDDEN = ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client", "httpx", "onnx",
          "onnxscript", "tritonclient", "peft", "accelerate", "tensorboard", "transformers",
          "matplotlib", "skimage", "helm_python", "kubernetes_validate")

SITECUSTOMIZE = '''
import sys
from importlib.machinery import PathFinder

HIDDEN = set({hidden!r})


class _WithoutExtras:
    """PathFinder, blind to HIDDEN: their modules and distributions are not found."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return PathFinder.find_spec(name, path, target)

    @classmethod
    def invalidate_caches(cls):
        PathFinder.invalidate_caches()

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        for dist in PathFinder.find_distributions(*args, **kwargs):
            if (dist.metadata["Name"] or "").lower().replace("-", "_") not in HIDDEN:
                yield dist


sys.meta_path[:] = [_WithoutExtras if finder is PathFinder else finder for finder in sys.meta_path]
'''


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a subprocess that sees only the base install."""
    site = tmp_path_factory.mktemp("base_install")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=HIDDEN))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    check = subprocess.run([sys.executable, "-c", "import fastapi"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError" in check.stderr, "the hook does not hide the extras"
    return env


def _cleanplate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    code = "import sys; from cleanplate.cli import main; sys.argv[0] = 'cleanplate'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_remove_runs_on_the_base_install(base_env, tmp_path):
    """README's first command, with no extra's package importable: the overlay is removed, the rest kept."""
    out = tmp_path / "coffee_clean.png"
    run = _cleanplate(base_env, "remove", "examples/coffee_sale.jpg", "--mask", "examples/coffee_sale_mask.png",
                      "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "accelerate" not in run.stderr  # diffusers is told, not left to warn
    src = np.asarray(Image.open(ROOT / "examples/coffee_sale.jpg").convert("RGB"))
    mask = np.asarray(Image.open(ROOT / "examples/coffee_sale_mask.png").convert("L")) >= 128
    result = np.asarray(Image.open(out).convert("RGB"))
    assert result.shape == src.shape
    assert np.abs(result[mask].astype(int) - src[mask]).mean() > 10  # the overlay's pixels changed
    keep = ~dilate_mask(mask, 16)  # far from the mask: the input's pixels
    assert keep.any() and np.array_equal(result[keep], src[keep])


def test_auto_mask_runs_on_the_base_install(base_env, tmp_path):
    """`cleanplate detect` needs no extra: the detector and its text prior (ONNX Runtime) are in the base
    install, and the auto mask covers the example's promo overlay."""
    out = tmp_path / "mask.png"
    run = _cleanplate(base_env, "detect", "examples/coffee_sale.jpg", "-o", str(out))
    assert run.returncode == 0, run.stderr
    found = np.asarray(Image.open(out).convert("L")) >= 128
    overlay = np.asarray(Image.open(ROOT / "examples/coffee_sale_mask.png").convert("L")) >= 128
    assert (found & overlay).sum() > 0.8 * overlay.sum() and (found & ~overlay).sum() < 0.5 * overlay.sum()


@pytest.mark.parametrize(("argv", "extra"), [
    (["serve"], "serve"),
    (["export", "onnx", "--out", "{tmp}/onnx"], "export"),
])
def test_a_missing_extra_is_one_line(base_env, tmp_path, argv, extra):
    run = _cleanplate(base_env, *[a.format(tmp=tmp_path) for a in argv])
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f'pip install "cleanplate[{extra}]"' in last, run.stderr


def test_every_hidden_module_has_an_extra():
    """The table the CLI reads covers what the test hides, and names only extras pyproject.toml declares."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(HIDDEN) <= set(EXTRA_OF_MODULE)
    assert set(EXTRA_OF_MODULE.values()) <= set(extras)
