"""HTTP load against a gateway (``cleanplate bench load``): throughput and latency percentiles per
concurrency level, and every answer counted by status.

For each level, ``concurrency`` closed-loop clients (:func:`run_load`: asyncio + httpx, keep-alive) POST
the same photo and mask to ``/v1/remove`` with fresh seeds for ``duration`` seconds; a 429 makes that client
wait the ``Retry-After`` the server sent. A transport error or timeout is a *lost* request, counted by
exception type. Latency is client-side (send to full answer) over the 200 answers. With no ``--url`` a local ``cleanplate serve`` is started (and stopped) for the run; when
the server is a cleanplate gateway its own ``/metrics`` (answers by status, mean micro-batch) are read
before and after each level.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cleanplate.errors import ErrorCode, InputError

from .common import environment, fmt_ms, pyplot, save_figure, with_environment

Say = Callable[[str], None]


# -- the client and the local gateway ------------------------------------------------------------------
def request_payload() -> tuple[bytes, bytes]:
    """The built-in request: scikit-image's coffee (600x400) with a white 100x60 px sticker, as JPEG (quality 92)
    bytes, and its mask (white = the sticker) as PNG bytes."""
    from PIL import Image
    from skimage import data

    img = data.coffee().copy()
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[150:210, 250:350] = 255
    img[mask > 0] = 255
    image, mask_png = io.BytesIO(), io.BytesIO()
    Image.fromarray(img).save(image, "JPEG", quality=92)
    Image.fromarray(mask).save(mask_png, "PNG")
    return image.getvalue(), mask_png.getvalue()


async def run_load(url: str, *, concurrency: int, duration_s: float, image: bytes, mask: bytes,
                   api_key: str | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    """Drive ``POST {url}/v1/remove`` with ``concurrency`` clients for ``duration_s`` seconds.

    Returns: sent, answered, lost, by_status, throughput_rps (200s/s), latency_ms {p50,p95,p99,mean} of the
    200s, latency of the 429 answers, problem codes of 4xx/5xx answers.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ok_ms: list[float] = []
    busy_ms: list[float] = []
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    sent = 0
    stop_at = time.monotonic() + duration_s

    async def client(client_id: int, http: httpx.AsyncClient) -> None:
        nonlocal sent
        rng = random.Random(client_id)
        while time.monotonic() < stop_at:
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/remove", files={"image": ("coffee.jpg", image), "mask": ("m.png", mask)},
                                    data={"seed": str(rng.randrange(2**31))}, headers=headers)
            except httpx.HTTPError as exc:
                lost[type(exc).__name__] += 1
                continue
            ms = (time.perf_counter() - t0) * 1000
            statuses[r.status_code] += 1
            if r.status_code == 200:
                ok_ms.append(ms)
            else:
                if r.headers.get("content-type") == "application/problem+json":
                    codes[r.json().get("code", "?")] += 1
                if r.status_code == 429:
                    busy_ms.append(ms)
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")) * rng.uniform(0.5, 1.5))

    t_start = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        await asyncio.gather(*[client(i, http) for i in range(concurrency)])
    elapsed = time.monotonic() - t_start

    def pct(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p95": None, "p99": None, "mean": None}
        a = np.asarray(values)
        return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
                "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}

    return {"concurrency": concurrency, "duration_s": duration_s, "elapsed_s": elapsed, "sent": sent,
            "answered": sum(statuses.values()), "lost": sum(lost.values()), "lost_by_error": dict(lost),
            "by_status": {str(k): v for k, v in sorted(statuses.items())}, "problem_codes": dict(codes),
            "throughput_rps": statuses[200] / elapsed, "latency_ms": pct(ok_ms), "latency_429_ms": pct(busy_ms)}


def server_metrics(url: str) -> dict[str, Any]:
    """Server-side counts from /metrics: requests by status on /v1/remove and the mean inpaint batch size."""
    by_status: dict[str, float] = {}
    batch_sum = batch_count = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith('cleanplate_requests_total{endpoint="/v1/remove"'):
            status = line.split('status="')[1].split('"')[0]
            by_status[status] = float(line.rsplit(" ", 1)[1])
        elif line.startswith('cleanplate_batch_size_sum{queue="inpaint"}'):
            batch_sum = float(line.rsplit(" ", 1)[1])
        elif line.startswith('cleanplate_batch_size_count{queue="inpaint"}'):
            batch_count = float(line.rsplit(" ", 1)[1])
    return {"requests_by_status": by_status, "batches": batch_count,
            "mean_batch_size": batch_sum / batch_count if batch_count else None}


@contextlib.contextmanager
def local_gateway(env_extra: dict[str, str], bundle: str | None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``cleanplate serve`` on a free 127.0.0.1 port as a child process, with ``env_extra`` added to its
    environment (``CLEANPLATE_*`` settings) and ``bundle`` (None: the default). Yields the process and its base
    URL once /readyz answers 200; on exit stops it with SIGTERM (the gateway drains) and waits up to 120 s.

    Raises RuntimeError when it exits, or is not ready within 300 s, before that.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cleanplate.cli", "serve", "--port", str(port), "--log-level", "warning"]
    if bundle:
        cmd += ["--bundle", bundle]
    proc = subprocess.Popen(cmd, env={**os.environ, **env_extra})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not _ready(url):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not get ready in 300 s")
        time.sleep(0.3)
    try:
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _metrics(url: str) -> dict[str, Any] | None:
    try:
        return server_metrics(url)
    except (httpx.HTTPError, ValueError, IndexError):
        return None


def _metrics_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    by = {k: v - before["requests_by_status"].get(k, 0.0) for k, v in after["requests_by_status"].items()}
    batches = after["batches"] - before["batches"]
    mean = None
    if batches and after["mean_batch_size"] is not None:
        total_after = after["mean_batch_size"] * after["batches"]
        total_before = (before["mean_batch_size"] or 0.0) * before["batches"]
        mean = (total_after - total_before) / batches
    return {"requests_by_status": {k: int(v) for k, v in by.items() if v}, "batches": int(batches),
            "mean_batch_size": mean}


def run_load_levels(url: str | None = None, *, concurrency: Sequence[int] = (1, 2, 4), duration_s: float = 20.0,
                    image: bytes | None = None, mask: bytes | None = None, api_key: str | None = None,
                    bundle: str | None = None, engine: str = "torch", max_batch: int = 1, max_queue: int = 64,
                    threads: int = 1, warmup_requests: int = 2, timeout_s: float = 300.0,
                    say: Say = lambda m: None) -> dict[str, Any]:
    """Run every concurrency level in turn against ``url`` (or a local gateway) and return the report.

    Raises:
        InputError: a level < 1, duration <= 0, only one of image/mask, or a server that is not ready.
    """
    if not concurrency or any(c < 1 for c in concurrency) or duration_s <= 0 or warmup_requests < 0:
        raise InputError("need concurrency levels >= 1, --duration > 0 and warm-up requests >= 0",
                         code=ErrorCode.BAD_OPTION)
    if (image is None) != (mask is None):
        raise InputError("give both --image and --mask, or neither (the built-in request)", code=ErrorCode.BAD_OPTION)
    payload = "built-in: scikit-image coffee 600x400 JPEG, 100x60 px sticker mask"
    if image is None:
        image, mask = request_payload()
    else:
        payload = "user-supplied image and mask"
    where = url
    levels = []
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if url is None:
            env = {"CLEANPLATE_ENGINE": engine, "CLEANPLATE_MAX_BATCH": str(max_batch),
                   "CLEANPLATE_BATCH_WINDOW_MS": "10" if max_batch > 1 else "0",
                   "CLEANPLATE_MAX_QUEUE": str(max_queue), "CLEANPLATE_TORCH_THREADS": str(threads)}
            say(f"starting a local gateway ({engine} engine, max_batch {max_batch}, max_queue {max_queue})")
            _, url = stack.enter_context(local_gateway(env, bundle))
            where = (f"local `cleanplate serve` ({engine} engine, bundle {bundle or 'default'}, max_batch "
                     f"{max_batch}, max_queue {max_queue}, torch threads {threads})")
        url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            ready = httpx.get(url + "/readyz", timeout=30, headers=headers).status_code
        except httpx.HTTPError as exc:
            raise InputError(f"no gateway answers at {url}: {exc}", code=ErrorCode.BAD_OPTION) from exc
        if ready != 200:
            raise InputError(f"{url}/readyz answered {ready}: the gateway is not ready", code=ErrorCode.BAD_OPTION)
        for i in range(warmup_requests):
            httpx.post(url + "/v1/remove", files={"image": ("warmup.jpg", image), "mask": ("m.png", mask)},
                       data={"seed": str(i)}, headers=headers, timeout=timeout_s)
        for c in concurrency:
            before = _metrics(url)
            result = asyncio.run(run_load(url, concurrency=c, duration_s=duration_s, image=image, mask=mask,
                                          api_key=api_key, timeout_s=timeout_s))
            result["server"] = _metrics_delta(before, _metrics(url))
            levels.append(result)
            lat = result["latency_ms"]
            say(f"concurrency {c}: {result['throughput_rps']:.2f} 200/s, p50 {fmt_ms(lat['p50'])} ms, p99 "
                f"{fmt_ms(lat['p99'])} ms, by status {result['by_status']}, lost {result['lost']}")
    return {"harness": "load", "url": where, "payload": payload, "duration_s": duration_s,
            "levels": levels, "wall_s": time.perf_counter() - t_start, "environment": environment()}


def to_markdown(report: dict[str, Any], command: str) -> str:
    lines = [f"# Gateway load: {report['url']}", "", f"`{command}`", "",
             f"Closed-loop clients for {report['duration_s']:g} s per level; request: {report['payload']}; latency "
             "is client-side over the 200 answers; *lost* = no HTTP answer (transport error or timeout).", "",
             "| concurrency | 200/s | p50 ms | p95 ms | p99 ms | mean ms | sent | answers by status | lost | "
             "problem codes | server mean batch |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for lv in report["levels"]:
        lat = lv["latency_ms"]
        status = ", ".join(f"{k}: {v}" for k, v in lv["by_status"].items()) or "-"
        codes = ", ".join(f"{k}: {v}" for k, v in lv["problem_codes"].items()) or "-"
        lost = str(lv["lost"]) + (f" ({', '.join(f'{k}: {v}' for k, v in lv['lost_by_error'].items())})"
                                  if lv["lost"] else "")
        srv = lv.get("server") or {}
        mb = srv.get("mean_batch_size")
        lines.append(f"| {lv['concurrency']} | {lv['throughput_rps']:.2f} | {fmt_ms(lat['p50'])} | {fmt_ms(lat['p95'])} | "
                     f"{fmt_ms(lat['p99'])} | {fmt_ms(lat['mean'])} | {lv['sent']} | {status} | {lost} | {codes} | "
                     f"{'-' if mb is None else f'{mb:.2f}'} |")
    return with_environment(lines, report["environment"], "Environment (the load generator's machine)")


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """``out.png``: throughput (200/s) and p50/p95/p99 latency vs concurrency."""
    plt = pyplot()
    lv = report["levels"]
    xs = [x["concurrency"] for x in lv]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(xs, [x["throughput_rps"] for x in lv], marker="o")
    a.set(xlabel="concurrent clients", ylabel="removals/s (200 answers)", title="throughput vs concurrency")
    a.set_ylim(bottom=0)
    for q in ("p50", "p95", "p99"):
        b.plot(xs, [x["latency_ms"][q] for x in lv], marker="o", label=q)
    b.set(xlabel="concurrent clients", ylabel="latency (ms)", title="latency vs concurrency")
    b.set_ylim(bottom=0)
    b.legend()
    if len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 4:
        for ax in (a, b):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
    return [save_figure(fig, out.with_suffix(".png"))]
