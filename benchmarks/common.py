"""What every benchmark harness shares: the environment record, percentiles, a stage clock, a request
payload, and writing reports (JSON for machines, markdown for people, PNG plots).

Reports go to ``benchmarks/results/<name>.{json,md,png}``; each JSON carries the command that made it
and the environment it ran in (CPU, load, GPU, driver, library versions), so a number never travels
without its context.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


# -- statistics ------------------------------------------------------------------------------------------
def summarize_ms(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{n, median, p95, p99, mean, min, max, std}`` of a list of durations in ms (None values when empty).

    Percentiles are numpy's linear interpolation; with n samples, p99 is only meaningful for n >= 100,
    so ``n`` is always reported next to them.
    """
    if not len(values):
        return {"n": 0, "median": None, "p95": None, "p99": None, "mean": None, "min": None, "max": None, "std": None}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "min": float(a.min()),
            "max": float(a.max()), "std": float(a.std())}


class StageClock:
    """Contiguous per-stage wall times: each :meth:`mark` closes the stage that began at the previous mark.

    The stages therefore tile the whole interval from :meth:`start` to the last mark with no gap, so their
    sum is the end-to-end time. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before every clock read,
    so asynchronous GPU work is charged to the stage that launched it.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync or (lambda: None)
        self.stages: dict[str, float] = {}
        self._t0 = self._last = 0.0

    @classmethod
    def for_device(cls, device: Any) -> StageClock:
        """A clock that synchronises ``device`` (a torch device or its name) before each read when it is a
        CUDA device (:func:`cuda_sync`), and does not synchronise otherwise."""
        return cls(cuda_sync(device))

    def start(self) -> None:
        self.sync()
        self.stages = {}
        self._t0 = self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (now - self._last) * 1000
        self._last = now

    @property
    def total_ms(self) -> float:
        """From :meth:`start` to the last :meth:`mark`, ms."""
        return (self._last - self._t0) * 1000


def cuda_sync(device: Any) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` bound to ``device`` when it is a CUDA device, else None."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(dev)


# -- environment -----------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi() -> list[dict[str, str]]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            rows.append(dict(zip(("name", "driver", "memory", "max_sm_clock"), parts, strict=False)))
    return rows


def environment(device: Any = None) -> dict[str, Any]:
    """Where a benchmark ran: host, CPU, load, torch threads, GPU(s) with driver, library versions, git commit.

    ``device``: the torch device the benchmark used (recorded as given; GPU facts are gathered whenever
    CUDA is visible).
    """
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    env: dict[str, Any] = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": affinity,
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device) if device is not None else None,
        "versions": {
            "cleanplate": _version("cleanplate"), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "tensorrt": _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt_cu12"),
            "diffusers": _version("diffusers"), "transformers": _version("transformers"),
            "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "tritonclient": _version("tritonclient"), "numpy": np.__version__,
            "opencv": _version("opencv-python-headless") or _version("opencv-python"),
        },
        "gpus": [],
        "git_commit": _git_commit(),
    }
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        env["memory_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        env["memory_gib"] = None
    if torch.cuda.is_available():
        smi = _nvidia_smi()
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpu = {"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                   "memory_gib": round(props.total_memory / 2**30, 1)}
            if i < len(smi):
                gpu |= {"driver": smi[i]["driver"], "max_sm_clock": smi[i]["max_sm_clock"]}
            env["gpus"].append(gpu)
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def env_line(env: dict[str, Any]) -> str:
    """One markdown line: CPU/GPU, threads, load and the main versions."""
    v = env["versions"]
    where = "; ".join(f"{g['name']} (driver {g.get('driver', '?')})" for g in env.get("gpus", [])) or "no GPU"
    return (f"{env['cpu']} ({env['cpu_count']} CPUs, torch threads {env['torch_threads']}, load "
            f"{env['load_avg_1_5_15']}), {where}; torch {v['torch']} (CUDA {v['cuda']}), TensorRT {v['tensorrt']}, "
            f"onnxruntime {v['onnxruntime']}, diffusers {v['diffusers']}; commit {env['git_commit']}; {env['time_utc']}")


def command_line(prog: str = "cleanplate") -> str:
    """The command as the user typed it (``cleanplate bench ...``), for the report."""
    args = sys.argv[1:]
    name = Path(sys.argv[0]).name
    head = prog if name in ("cleanplate", "cli.py", "__main__.py", "-c") or name.startswith("cleanplate") else name
    return " ".join([head, *map(shlex.quote, args)])


# -- payload ---------------------------------------------------------------------------------------------
def promo_payload(size: int, *, fmt: str = "JPEG") -> tuple[bytes, bytes]:
    """A product-photo-like request at ``size`` x ``size`` px: scikit-image's astronaut, resized, with a
    white promo banner stamped on it (about 48% x 13% of the side), encoded as ``fmt`` (JPEG quality 92);
    and its mask as a PNG (white = remove). Returns ``(image_bytes, mask_bytes)``.
    """
    import cv2
    from PIL import Image
    from skimage import data

    img = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA if size < 512 else cv2.INTER_CUBIC)
    mask = np.zeros((size, size), np.uint8)
    y0, y1, x0, x1 = int(0.12 * size), int(0.25 * size), int(0.30 * size), int(0.78 * size)
    mask[y0:y1, x0:x1] = 255
    img = img.copy()
    img[mask > 0] = (255, 250, 240)
    image, mask_png = io.BytesIO(), io.BytesIO()
    Image.fromarray(img).save(image, fmt, **({"quality": 92} if fmt.upper() == "JPEG" else {}))
    Image.fromarray(mask).save(mask_png, "PNG")
    return image.getvalue(), mask_png.getvalue()


# -- reports ---------------------------------------------------------------------------------------------
def write_report(out: Path, report: dict[str, Any], markdown: str) -> list[Path]:
    """Write ``out.json`` and ``out.md`` (``out`` without suffix); returns the paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".json"), out.with_suffix(".md")]
    paths[0].write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    paths[1].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def with_environment(lines: list[str], env: dict[str, Any], label: str = "Environment") -> str:
    """A report's markdown: ``lines``, then a line ``label: <env_line(env)>.``; ends with a newline."""
    return "\n".join([*lines, "", f"{label}: {env_line(env)}.", ""])


def plots(module: Any, report: dict[str, Any], out: Path) -> list[Path]:
    """A harness's PNG plots, ``module.plot(report, out)``; none (with a note on stderr) when matplotlib is
    not installed, so the JSON and markdown are still written."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed (pip install 'cleanplate[bench]'): plots skipped", file=sys.stderr)
        return []
    return module.plot(report, out)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (ImportError without matplotlib: call a harness's ``plot``
    through :func:`plots`, which skips it then)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` (PNG, 110 dpi) and close it; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def fmt_ms(v: float | None) -> str:
    """A duration in ms for a table: 3 significant-ish digits, '-' for None."""
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"
