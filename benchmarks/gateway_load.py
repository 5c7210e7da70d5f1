"""Load test of the REST gateway: N concurrent clients for S seconds, micro-batching on and off.

Each mode starts ``cleanplate serve`` (default bundle unless ``--bundle``) on 127.0.0.1 as a child
process, waits for /readyz, then runs ``--concurrency`` asyncio clients (httpx) that POST one real photo
(scikit-image's coffee, 600x400 JPEG, with a sticker pasted on and its mask) in a loop with fresh seeds.
A client that gets 429 waits for the Retry-After the server sent and tries again. Every request sent must
get an HTTP answer: a transport error or timeout is counted as *lost*.

Writes ``benchmarks/results/gateway_load.{json,md}``: per mode throughput (200s per second), p50/p95/p99
latency of the 200s, counts by status, lost requests, and the server's own view (mean batch size,
requests by status) read from /metrics.

Usage::

    python -m cleanplate.benchmarks.gateway_load --concurrency 64 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

RESULTS = Path(__file__).parent / "results"
MODES = {"on": {"CLEANPLATE_MAX_BATCH": "8", "CLEANPLATE_BATCH_WINDOW_MS": "10"},
         "off": {"CLEANPLATE_MAX_BATCH": "1", "CLEANPLATE_BATCH_WINDOW_MS": "0"}}


def request_payload() -> tuple[bytes, bytes]:
    """coffee.jpg with a white 100x60 sticker and its mask (PNG)."""
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


def start_server(env_extra: dict[str, str], bundle: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "-m", "cleanplate.cli", "serve", "--port", str(port), "--log-level", "warning"]
    if bundle:
        cmd += ["--bundle", bundle]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not get ready in 300 s")


def to_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Gateway load test",
        "",
        f"`{report['command']}`  ",
        f"{env['cpus']} CPUs ({env['machine']}), torch threads {env['torch_threads']}, bundle `{env['bundle']}`, "
        f"max_queue {env['max_queue']}; {report['runs'][0]['concurrency']} clients for "
        f"{report['runs'][0]['duration_s']:g} s per mode; request: 600x400 JPEG, 100x60 px mask, 4 steps.",
        "",
        "| micro-batching | 200/s | p50 ms | p95 ms | p99 ms | sent | 200 | 429 | other 4xx/5xx | lost | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        s, lat = run["by_status"], run["latency_ms"]
        other = sum(v for k, v in s.items() if k not in ("200", "429"))
        fmt = (lambda v: "-" if v is None else f"{v:.0f}")
        batch = run["server"]["mean_batch_size"]
        lines.append(f"| {run['mode']} ({run['settings']}) | {run['throughput_rps']:.2f} | {fmt(lat['p50'])} | "
                     f"{fmt(lat['p95'])} | {fmt(lat['p99'])} | {run['sent']} | {s.get('200', 0)} | {s.get('429', 0)} | "
                     f"{other} | {run['lost']} | {'-' if batch is None else f'{batch:.2f}'} |")
    lines += ["", "Latency is client-side, from send to full answer, of the 200 answers only; a 429 is answered at "
              "once (queue full) and the client retries after Retry-After. Reproduce with the command above."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per mode")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["on", "off"])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway_load")
    args = parser.parse_args(argv)
    image, mask = request_payload()
    runs = []
    for mode in args.modes:
        env = {**MODES[mode], "CLEANPLATE_MAX_QUEUE": str(args.max_queue),
               "CLEANPLATE_TORCH_THREADS": str(args.torch_threads)}
        proc, url = start_server(env, args.bundle)
        try:
            result = asyncio.run(run_load(url, concurrency=args.concurrency, duration_s=args.duration,
                                          image=image, mask=mask))
            result.update(mode=mode, settings=f"max_batch {env['CLEANPLATE_MAX_BATCH']}, "
                                              f"window {env['CLEANPLATE_BATCH_WINDOW_MS']} ms",
                          server=server_metrics(url))
            runs.append(result)
            print(json.dumps({k: result[k] for k in ("mode", "throughput_rps", "latency_ms", "by_status", "lost")}))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    report = {
        "command": "python -m cleanplate.benchmarks.gateway_load " + " ".join(argv or sys.argv[1:]),
        "environment": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                        "torch_threads": args.torch_threads, "bundle": args.bundle or "default",
                        "max_queue": args.max_queue},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    failed = [r["mode"] for r in runs if r["lost"] or any(k.startswith("5") for k in r["by_status"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
