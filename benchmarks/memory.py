"""Memory under big photos (``cleanplate bench memory``): the gateway's resident memory through a burst of
40 MP uploads and a soak of ordinary traffic after it, and the batch job's peak over a folder of 40 MP photos.

1. A local ``cleanplate serve`` with default settings is started and warmed up with ordinary requests; its
   resident set (RSS, ``/proc/PID/status``) is sampled every 0.25 s for the whole run.
2. **Burst**: ``--burst`` clients each upload one ``--megapixels`` photo (a scikit-image photo enlarged, with
   "SALE -30%" stamped on it, JPEG; its mask as PNG) at the same moment. A 429 is retried after its
   Retry-After; every request must end 200. Peak RSS during the burst, and RSS once it settles.
3. **Soak**: ``--soak-clients`` closed-loop clients send the ordinary 600x400 request for ``--soak-minutes``.
   RSS growth from minute ``--soak-from`` to the end, and the level after the burst against the one before.
4. **Batch**: ``cleanplate batch run`` over ``--batch-items`` copies of the big photo, ``--batch-concurrency``
   items at once; the process's peak RSS (its own ``ru_maxrss``, from ``wait4``) against its memory budget.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cleanplate.admission import MiB
from cleanplate.errors import ErrorCode, InputError

from .common import environment, pyplot, save_figure, with_environment


def big_request(megapixels: float, seed: int = 0) -> tuple[bytes, bytes]:
    """A ``megapixels`` JPEG (scikit-image coffee enlarged, with a promo stamped on) and its PNG mask."""
    import cv2
    from PIL import Image
    from skimage import data

    side = int(np.sqrt(megapixels * 1e6))  # floor: 40 MP must stay within the default 40,000,000-pixel limit
    photo = cv2.resize(data.coffee(), (side, side), interpolation=cv2.INTER_CUBIC)
    mask = np.zeros((side, side), np.uint8)
    scale, thick = side / 320, max(2, side // 100)
    org = (side // 8 + seed * 7 % (side // 10), side // 2)
    cv2.putText(photo, "SALE -30%", org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick)
    cv2.putText(mask, "SALE -30%", org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick)
    mask = cv2.dilate(mask, np.ones((5, 5), np.uint8))
    out_image, out_mask = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo).save(out_image, "JPEG", quality=90)
    Image.fromarray(mask).save(out_mask, "PNG")
    return out_image.getvalue(), out_mask.getvalue()


class RssSampler:
    """Samples a process's resident set every ``every_s`` seconds in a thread; ``mark`` names phases. As a
    context manager it samples for the ``with`` block."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.marks: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, self.rss_mib()))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.every_s)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def mark(self, name: str) -> float:
        t = time.monotonic() - self.t0
        self.marks.append((t, name))
        return t

    def between(self, t0: float, t1: float) -> list[float]:
        return [m for t, m in self.samples if t0 <= t <= t1]


async def _burst(url: str, n: int, image: bytes, mask: bytes, timeout_s: float) -> list[list[int]]:
    """``n`` uploads at once; each retried after 429 until it gets another answer. Statuses per client."""
    async def one(client: httpx.AsyncClient, i: int) -> list[int]:
        seen: list[int] = []
        while len(seen) < 100:
            r = await client.post(url + "/v1/remove", files={"image": ("big.jpg", image), "mask": ("m.png", mask)},
                                  data={"seed": str(i)})
            seen.append(r.status_code)
            if r.status_code != 429:
                return seen
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
        return seen

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        return list(await asyncio.gather(*[one(client, i) for i in range(n)]))


def run_memory(*, megapixels: float = 40.0, burst: int = 16, soak_clients: int = 8, soak_minutes: float = 30.0,
               soak_from_minute: float = 5.0, settle_s: float = 20.0, idle_s: float = 10.0, batch_items: int = 20,
               batch_concurrency: int = 4, batch_budget_mib: int = 1024, bundle: str | None = None,
               timeout_s: float = 900.0,
               say: Any = lambda m: None) -> dict[str, Any]:
    """Run the burst, the soak and the batch phase; return the report (see the module docstring).

    Raises:
        InputError: non-positive sizes or durations, or ``soak_from_minute`` not inside the soak.
    """
    from cleanplate import imaging
    from cleanplate.admission import removal_cost

    from .load import local_gateway, request_payload, run_load

    if megapixels <= 0 or burst < 1 or soak_clients < 1 or soak_minutes <= 0 or batch_items < 0 \
            or batch_concurrency < 1 or not 0 <= soak_from_minute < soak_minutes:
        raise InputError("need --megapixels > 0, --burst/--soak-clients/--batch-concurrency >= 1, --soak-minutes "
                         "> 0 and 0 <= --soak-from < --soak-minutes", code=ErrorCode.BAD_OPTION)
    say(f"making a {megapixels:g} MP request")
    image, mask = big_request(megapixels)
    header = imaging.read_header(image)
    cost = removal_cost(header, extra_images=(imaging.read_header(mask),), encoded_bytes=len(image) + len(mask))
    small_image, small_mask = request_payload()
    report: dict[str, Any] = {
        "harness": "memory", "request": {"width": header.width, "height": header.height, "jpeg_bytes": len(image),
                                         "mask_png_bytes": len(mask), "estimated_cost_mib": cost / MiB}}
    t_start = time.perf_counter()

    say("starting a local gateway with default settings")
    with local_gateway({}, bundle) as (proc, url), RssSampler(proc.pid) as sampler:
        budget = _gauge(url, "cleanplate_memory_budget_bytes")
        for i in range(4):  # warm-up: the model, the thread pools, the first allocations
            httpx.post(url + "/v1/remove", files={"image": small_image, "mask": small_mask}, data={"seed": str(i)},
                       timeout=timeout_s)
        t_idle = sampler.mark("idle")
        time.sleep(idle_s)
        before = float(np.median(sampler.between(t_idle, t_idle + idle_s)))
        say(f"pre-burst RSS {before:.0f} MiB; budget {budget / MiB:.0f} MiB; {burst} x {header.width}x"
            f"{header.height} at once (estimated {cost / MiB:.0f} MiB each)")
        t_burst = sampler.mark("burst")
        statuses = asyncio.run(_burst(url, burst, image, mask, timeout_s))
        t_settle = sampler.mark("settle")
        time.sleep(settle_s)
        peak = max(sampler.between(t_burst, t_settle + 1))
        t_soak = sampler.mark("soak")
        after = float(np.median(sampler.between(t_settle + settle_s / 2, t_soak)))
        flat = [s for seq in statuses for s in seq]
        report["gateway"] = {
            "budget_mib": budget / MiB, "rss_before_mib": before, "burst_peak_rss_mib": peak,
            "rss_after_burst_mib": after, "after_vs_before": after / before - 1,
            "burst": {"clients": burst, "final_status": _count(seq[-1] for seq in statuses),
                      "answers": _count(flat), "5xx": sum(s >= 500 for s in flat),
                      "all_200_after_retries": all(seq[-1] == 200 for seq in statuses),
                      "wall_s": t_settle - t_burst}}
        say(f"burst: peak RSS {peak:.0f} MiB, answers {report['gateway']['burst']['answers']}; after it "
            f"{after:.0f} MiB; soaking {soak_clients} clients for {soak_minutes:g} min")
        load = asyncio.run(run_load(url, concurrency=soak_clients, duration_s=soak_minutes * 60, image=small_image,
                                    mask=small_mask, timeout_s=timeout_s))
        t_end = sampler.mark("end")
        from_t = t_soak + soak_from_minute * 60
        start_level = float(np.median(sampler.between(from_t - 15, from_t + 15)))
        end_level = float(np.median(sampler.between(t_end - 30, t_end)))
        report["gateway"]["soak"] = {
            "clients": soak_clients, "minutes": soak_minutes, "from_minute": soak_from_minute,
            "rss_at_from_mib": start_level, "rss_at_end_mib": end_level, "growth": end_level / start_level - 1,
            "peak_rss_mib": max(sampler.between(t_soak, t_end)), "by_status": load["by_status"],
            "lost": load["lost"], "throughput_rps": load["throughput_rps"], "latency_ms": load["latency_ms"]}
        say(f"soak: {start_level:.0f} -> {end_level:.0f} MiB, answers {load['by_status']}")
    report["gateway"]["rss_mib"] = sampler.samples
    report["gateway"]["marks"] = sampler.marks
    if batch_items:
        report["batch"] = _batch_phase(image, mask, batch_items, batch_concurrency, batch_budget_mib, bundle, say)
    report["wall_s"] = time.perf_counter() - t_start
    report["environment"] = environment()
    return report


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise InputError(f"the gateway at {url} does not export {name}", code=ErrorCode.BAD_OPTION)


def _count(values: Any) -> dict[str, int]:
    return dict(sorted(Counter(str(v) for v in values).items()))


def _batch_phase(image: bytes, mask: bytes, n: int, concurrency: int, budget_mib: int, bundle: str | None,
                 say: Any) -> dict[str, Any]:
    """``cleanplate batch run`` over ``n`` copies of the big photo; its peak RSS from the kernel (ru_maxrss)."""
    root = Path(tempfile.mkdtemp(prefix="cleanplate-bench-memory-"))
    try:
        (root / "photos").mkdir()
        (root / "masks").mkdir()
        for i in range(n):
            (root / "photos" / f"p{i:02d}.jpg").write_bytes(image)
            (root / "masks" / f"p{i:02d}.png").write_bytes(mask)
        cmd = [sys.executable, "-m", "cleanplate.cli", "batch", "run", str(root / "photos"), "--masks",
               str(root / "masks"), "-o", str(root / "out"), "--concurrency", str(concurrency), "--progress", "off",
               "--memory-budget-mib", str(budget_mib)]
        if bundle:
            cmd += ["--bundle", bundle]
        say(f"batch: {n} photos, --concurrency {concurrency}")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**os.environ})
        sampler = RssSampler(proc.pid).start()
        # wait4: this child's own peak (RUSAGE_CHILDREN would include the gateway started earlier)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        sampler.stop()
        wall = time.perf_counter() - t0
        peak_kernel = usage.ru_maxrss / 1024
        from cleanplate.batch import summarize

        summary = summarize(root / "out" / "report.jsonl")
        return {"items": n, "concurrency": concurrency, "exit_code": code, "wall_s": wall,
                "images_per_s": n / wall, "ok": summary.get("ok"), "errors": summary.get("errors"),
                "budget_mib": budget_mib, "peak_rss_mib": max(peak_kernel, max((m for _, m in sampler.samples), default=0)),
                "peak_rss_sampled_mib": max((m for _, m in sampler.samples), default=None),
                "rss_mib": sampler.samples}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def to_markdown(report: dict[str, Any], command: str) -> str:
    g, req = report["gateway"], report["request"]
    b, s = g["burst"], g["soak"]
    ok = lambda cond: "yes" if cond else "**no**"  # noqa: E731
    lines = [
        "# Memory under 40 MP photos", "", f"`{command}`", "",
        f"Request: {req['width']}x{req['height']} JPEG ({req['jpeg_bytes'] / MiB:.1f} MiB) + PNG mask; "
        f"admission charges it {req['estimated_cost_mib']:.0f} MiB. Gateway: local `cleanplate serve`, default "
        f"settings (budget {g['budget_mib']:.0f} MiB). RSS sampled every 0.25 s from /proc.", "",
        "| measure | value | target | met |", "|---|---:|---:|---|",
        f"| RSS before the burst | {g['rss_before_mib']:.0f} MiB | | |",
        f"| peak RSS, {b['clients']} uploads at once | {g['burst_peak_rss_mib']:.0f} MiB | <= 2048 MiB | "
        f"{ok(g['burst_peak_rss_mib'] <= 2048)} |",
        f"| burst answers (incl. retries) | {b['answers']} | no 5xx | {ok(b['5xx'] == 0)} |",
        f"| every upload 200 (after 429 retries) | {b['final_status']} | all 200 | {ok(b['all_200_after_retries'])} |",
        f"| RSS after the burst vs before | {g['rss_after_burst_mib']:.0f} MiB ({g['after_vs_before']:+.1%}) | "
        f"within 20% | {ok(abs(g['after_vs_before']) <= 0.2)} |",
        f"| soak RSS growth, minute {s['from_minute']:g} to {s['minutes']:g} ({s['clients']} clients) | "
        f"{s['rss_at_from_mib']:.0f} -> {s['rss_at_end_mib']:.0f} MiB ({s['growth']:+.1%}) | <= 5% | "
        f"{ok(s['growth'] <= 0.05)} |",
        f"| soak answers | {s['by_status']}, lost {s['lost']} | no 5xx | "
        f"{ok(not any(int(k) >= 500 for k in s['by_status']) and s['lost'] == 0)} |",
    ]
    if "batch" in report:
        bt = report["batch"]
        idle = bt["rss_mib"][-1][1] if bt.get("rss_mib") else None  # the process after its last item
        lines.append(f"| batch: {bt['items']} photos, concurrency {bt['concurrency']}: peak RSS | "
                     f"{bt['peak_rss_mib']:.0f} MiB ({bt['ok']} ok, {bt['errors']} errors, "
                     f"{bt['images_per_s']:.2f} images/s) | budget {bt['budget_mib']} MiB + the process "
                     f"({'?' if idle is None else f'{idle:.0f}'} MiB idle) | |")
    return with_environment(lines, report["environment"])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: the gateway's RSS over the run with its phases, and the batch job's."""
    plt = pyplot()
    g = report["gateway"]
    panels = 2 if "batch" in report else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
    a = axes[0][0]
    t, m = zip(*g["rss_mib"], strict=False) if g["rss_mib"] else ((), ())
    a.plot(np.asarray(t) / 60, m, lw=1)
    for tm, name in g["marks"]:
        a.axvline(tm / 60, color="grey", ls=":", lw=1)
        a.text(tm / 60, max(m or [0]) * 1.02, name, fontsize=8, rotation=90, va="bottom")
    a.axhline(2048, color="red", ls="--", lw=1, label="2 GiB target")
    a.set(xlabel="minutes", ylabel="RSS (MiB)", title="gateway: burst of 40 MP uploads, then a soak")
    a.set_ylim(bottom=0)
    a.legend(loc="lower right")
    if panels == 2:
        b = axes[0][1]
        bt = report["batch"]
        if bt["rss_mib"]:
            bx, by = zip(*bt["rss_mib"], strict=False)
            b.plot(bx, by, lw=1)
        b.set(xlabel="seconds", ylabel="RSS (MiB)", title=f"batch: {bt['items']} x 40 MP, concurrency "
                                                           f"{bt['concurrency']}")
        b.set_ylim(bottom=0)
    return [save_figure(fig, out.with_suffix(".png"))]
